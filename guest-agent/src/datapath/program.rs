//! Programming service tables into the maps: whole tables (all or
//! nothing), upserts and deletes, each service written so a concurrent
//! lookup sees its old backend set or its new one; and the repair of what
//! an agent killed half way through an update leaves.

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};

use anyhow::{Context as _, Result, anyhow};
use slog::{Logger, info};
use socklb_common::{Addr, BackendSlotKey, Endpoint, MAX_BACKEND_SLOTS, MAX_SERVICES, MemberKey};
use socklb_table::{Service, ServiceKey, Table, TableError};

use super::{
    convert::{endpoint, map_key, socket_addr, table_key, table_of},
    maps::TableMaps,
};
use crate::{services::WriteError, sockets::RemovedBackend};

/// What `apply` changed.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct ApplySummary {
    pub added: usize,
    pub updated: usize,
    pub removed: usize,
    pub unchanged: usize,
    /// Backends that some service had before the write and none has after.
    pub removed_backends: BTreeSet<RemovedBackend>,
}

/// A service as the maps hold it.
#[derive(Clone)]
pub(super) struct Programmed {
    pub(super) entry: socklb_common::Service,
    pub(super) backends: Vec<Endpoint>,
}

/// The service table as the maps hold it, and the ledger kept beside them
/// so a write checks capacity and counts without reading every map.
pub struct ProgrammedTable {
    pub(super) maps: TableMaps,
    /// Ids of the programmed services.
    pub(super) used_ids: BTreeSet<u32>,
    /// Where the search for a free service id starts (see `free_ids`).
    next_service_id: u32,
    /// Backend slots summed over the services.
    pub(super) slot_count: usize,
    /// Services per VIP: a VIP stays in `VIPS` while it has one.
    pub(super) services_per_vip: BTreeMap<Addr, usize>,
    /// Services per (protocol, backend): a backend is removed, and its
    /// sockets closed, once no service has it.
    backend_uses: HashMap<(u8, Endpoint), usize>,
    log: Logger,
}

impl ProgrammedTable {
    /// Takes over what `maps` hold (an earlier agent's table, or nothing),
    /// first repairing what an agent killed half way through a write left.
    pub fn adopt(maps: TableMaps, log: &Logger) -> Result<ProgrammedTable> {
        let mut table = ProgrammedTable {
            maps,
            used_ids: BTreeSet::new(),
            next_service_id: 0,
            slot_count: 0,
            services_per_vip: BTreeMap::new(),
            backend_uses: HashMap::new(),
            log: log.new(slog::o!("component" => "table")),
        };
        let programmed = table.read_programmed()?;
        table.sweep_orphans(&programmed)?;
        table.used_ids = programmed.values().map(|p| p.entry.id).collect();
        table.next_service_id = table
            .used_ids
            .last()
            .map_or(0, |id| (id + 1) % MAX_SERVICES);
        table.slot_count = programmed.values().map(|p| p.backends.len()).sum();
        for key in programmed.keys() {
            *table.services_per_vip.entry(key.vip).or_default() += 1;
        }
        table.count_backend_uses(&programmed);
        table.reconcile_vips()?;
        Ok(table)
    }

    /// Makes the maps hold exactly `table`, or leaves them as they were: a
    /// table refused (capacity) changes nothing, and after a kernel error
    /// half way the previous table is written back, once: if that fails
    /// too, the error says the maps hold neither table.
    pub fn apply(&mut self, table: &Table) -> Result<ApplySummary, WriteError> {
        let before = self.read_programmed()?;
        let summary = match self.replace_with(table) {
            Ok(summary) => summary,
            Err(WriteError::Failed(err)) => {
                let restored = self.replace_with(&table_of(before));
                self.recount_backend_uses();
                return Err(WriteError::Failed(match restored {
                    Ok(_) => err.context("writing the table failed half way; the previous table is restored"),
                    Err(restore) => err.context(format!(
                        "writing the table failed half way and restoring the previous one failed too \
                         ({restore:#}): the maps may hold part of each table"
                    )),
                }));
            }
            Err(refused) => return Err(refused),
        };
        info!(self.log, "table applied"; "services" => table.services.len(),
              "added" => summary.added, "updated" => summary.updated,
              "removed" => summary.removed, "unchanged" => summary.unchanged);
        Ok(summary)
    }

    /// Brings the maps to exactly `table` (one attempt, no restore).
    fn replace_with(&mut self, table: &Table) -> Result<ApplySummary, WriteError> {
        let mut current = self.read_programmed()?;
        let mut wanted: BTreeMap<socklb_common::ServiceKey, Option<&Service>> =
            current.keys().map(|key| (*key, None)).collect();
        for service in &table.services {
            wanted.insert(map_key(&service.key), Some(service));
        }
        self.write(wanted, &mut current)
    }

    /// Adds or replaces `services` (validated each, distinct keys), leaving
    /// every other service as it is.
    pub fn upsert(&mut self, services: &[Service]) -> Result<ApplySummary, WriteError> {
        let mut wanted = BTreeMap::new();
        for service in services {
            if wanted
                .insert(map_key(&service.key), Some(service))
                .is_some()
            {
                return Err(TableError::Field {
                    service: service.label(),
                    field: "vip/port/protocol".into(),
                    message: format!("{} is listed twice in one request", service.key),
                }
                .into());
            }
        }
        let mut current = self.read_some(wanted.keys())?;
        let written = self.write(wanted, &mut current);
        if written.is_err() {
            self.recount_backend_uses();
        }
        written
    }

    /// Removes the services with `keys`; refuses all if one is unknown.
    pub fn delete(&mut self, keys: &[ServiceKey]) -> Result<ApplySummary, WriteError> {
        let wanted: BTreeMap<_, Option<&Service>> =
            keys.iter().map(|key| (map_key(key), None)).collect();
        let mut current = self.read_some(wanted.keys())?;
        if let Some(missing) = keys.iter().find(|key| !current.contains_key(&map_key(key))) {
            return Err(TableError::UnknownService {
                key: missing.to_string(),
            }
            .into());
        }
        let written = self.write(wanted, &mut current);
        if written.is_err() {
            self.recount_backend_uses();
        }
        written
    }

    /// Counts each backend's services from `programmed`.
    fn count_backend_uses(&mut self, programmed: &BTreeMap<socklb_common::ServiceKey, Programmed>) {
        self.backend_uses.clear();
        for (key, programmed) in programmed {
            for backend in &programmed.backends {
                *self.backend_uses.entry((key.proto, *backend)).or_default() += 1;
            }
        }
    }

    /// After a write that failed half way, the counts kept step by step may
    /// not match the maps: count again from what they hold. Unreadable
    /// maps leave the counts as they are.
    fn recount_backend_uses(&mut self) {
        if let Ok(programmed) = self.read_programmed() {
            self.count_backend_uses(&programmed);
        }
    }

    /// Brings each listed service to its wanted state (`None`: removed).
    /// Capacity is checked before anything changes. Each service's update
    /// is atomic for concurrent lookups (see `write_service`); removals and
    /// shrinking services go first, so the maps never hold more than the
    /// larger of the old and the new table.
    fn write(
        &mut self,
        wanted: BTreeMap<socklb_common::ServiceKey, Option<&Service>>,
        current: &mut BTreeMap<socklb_common::ServiceKey, Programmed>,
    ) -> Result<ApplySummary, WriteError> {
        let mut summary = ApplySummary::default();
        let (mut added, mut removed, mut slots_after) = (0, 0, self.slot_count);
        for (key, service) in &wanted {
            let old = current.get(key);
            match (service, old) {
                (Some(_), None) => added += 1,
                (None, Some(_)) => removed += 1,
                _ => {}
            }
            slots_after = slots_after + service.map_or(0, |s| s.backends.len())
                - old.map_or(0, |p| p.backends.len());
        }
        socklb_table::check_capacity(self.used_ids.len() + added - removed, slots_after)?;

        // Ids this write frees: removals run before any service is written,
        // so when no other id is free (a full table replaced by another) a
        // new service takes one of them; otherwise a freed id waits its
        // turn (see `free_ids`).
        let freed: Vec<u32> = wanted
            .iter()
            .filter(|(_, service)| service.is_none())
            .filter_map(|(key, _)| current.get(key))
            .map(|programmed| programmed.entry.id)
            .collect();
        let mut free_ids = free_ids(&self.used_ids, self.next_service_id, added)
            .into_iter()
            .chain(freed);
        let mut removals = Vec::new();
        let mut changes = Vec::new();
        for (key, service) in wanted {
            let old = current.remove(&key);
            let Some(service) = service else {
                if let Some(old) = old {
                    removals.push((key, old));
                }
                continue;
            };
            let backends: Vec<Endpoint> = service.backends.iter().map(endpoint).collect();
            let entry = socklb_common::Service {
                id: match &old {
                    Some(old) => old.entry.id,
                    None => {
                        let id = free_ids
                            .next()
                            .ok_or_else(|| anyhow!("no free service id"))?;
                        self.next_service_id = (id + 1) % MAX_SERVICES;
                        id
                    }
                },
                backend_count: backends.len() as u32,
                affinity_timeout_secs: service.affinity_timeout_secs.unwrap_or(0),
                _pad: 0,
            };
            match &old {
                Some(old) if old.entry == entry && old.backends == backends => {
                    summary.unchanged += 1;
                    continue;
                }
                Some(_) => summary.updated += 1,
                None => summary.added += 1,
            }
            changes.push((key, entry, backends, old));
        }
        changes.sort_by_key(|(_, entry, _, old)| {
            i64::from(entry.backend_count)
                - old.as_ref().map_or(0, |o| i64::from(o.entry.backend_count))
        });
        check_members_peak(
            self.slot_count
                - removals
                    .iter()
                    .map(|(_, old)| old.backends.len())
                    .sum::<usize>(),
            changes
                .iter()
                .map(|(_, _, backends, old)| (backends.as_slice(), old.as_ref())),
        )?;
        let mut dropped = Vec::new();
        for (key, old) in removals {
            self.remove(&key, &old)?;
            dropped.extend(old.backends.iter().map(|backend| (key.proto, *backend)));
            summary.removed += 1;
        }
        for (key, entry, backends, old) in changes {
            if let Some(old) = &old {
                dropped.extend(
                    old.backends
                        .iter()
                        .filter(|backend| !backends.contains(backend))
                        .map(|backend| (key.proto, *backend)),
                );
            }
            self.write_service(&key, entry, &backends, old)?;
        }
        // A backend moved from one service to another in this write stays.
        summary.removed_backends = dropped
            .into_iter()
            .filter(|use_key| !self.backend_uses.contains_key(use_key))
            .map(|(protocol, backend)| RemovedBackend {
                protocol,
                addr: socket_addr(&backend),
            })
            .collect();
        Ok(summary)
    }

    /// The table as the maps hold it (names are not kept in the datapath).
    pub fn read_table(&self) -> Result<Table> {
        Ok(table_of(self.read_programmed()?))
    }

    pub fn service_count(&self) -> usize {
        self.used_ids.len()
    }

    /// Makes slots and members agree with the service entries: removes
    /// slots and members whose service is gone or beyond its count, and
    /// members that are in none of their service's slots; adds a member for
    /// every slot that lacks one. An agent killed in the middle of an
    /// update leaves such state (a removed backend still a member would
    /// keep its sticky clients for good), and a later service given the
    /// same id must not inherit it.
    fn sweep_orphans(
        &mut self,
        programmed: &BTreeMap<socklb_common::ServiceKey, Programmed>,
    ) -> Result<()> {
        let live: std::collections::HashMap<u32, &Programmed> =
            programmed.values().map(|p| (p.entry.id, p)).collect();
        let orphan_slots: Vec<BackendSlotKey> = self
            .maps
            .slots
            .entries()?
            .into_iter()
            .map(|(key, _)| key)
            .filter(|key| {
                live.get(&key.service_id)
                    .is_none_or(|p| key.slot > p.entry.backend_count)
            })
            .collect();
        for key in &orphan_slots {
            self.maps.slots.remove(key)?;
        }
        let members: HashSet<MemberKey> = self
            .maps
            .members
            .entries()?
            .into_iter()
            .map(|(key, _)| key)
            .collect();
        let orphan_members: Vec<&MemberKey> = members
            .iter()
            .filter(|key| {
                live.get(&key.service_id)
                    .is_none_or(|p| !p.backends.contains(&key.backend))
            })
            .collect();
        for key in &orphan_members {
            self.maps.members.remove(key)?;
        }
        let missing_members: Vec<MemberKey> = live
            .values()
            .flat_map(|p| {
                p.backends.iter().map(|backend| MemberKey {
                    service_id: p.entry.id,
                    backend: *backend,
                })
            })
            .filter(|key| !members.contains(key))
            .collect();
        for key in &missing_members {
            self.maps.members.insert(*key, 1)?;
        }
        if !orphan_slots.is_empty() || !orphan_members.is_empty() || !missing_members.is_empty() {
            info!(self.log, "repaired leftovers of an interrupted update";
                  "slots_removed" => orphan_slots.len(), "members_removed" => orphan_members.len(),
                  "members_added" => missing_members.len());
        }
        Ok(())
    }

    /// Makes `VIPS` hold exactly the VIPs of the programmed services: an
    /// agent killed half way through an update, or one of a version before
    /// `VIPS`, can leave it behind `SERVICES`.
    fn reconcile_vips(&mut self) -> Result<()> {
        let pinned: Vec<Addr> = self
            .maps
            .vips
            .entries()?
            .into_iter()
            .map(|(vip, _)| vip)
            .collect();
        for vip in pinned
            .iter()
            .filter(|vip| !self.services_per_vip.contains_key(*vip))
        {
            self.maps.vips.remove(vip)?;
        }
        for vip in self.services_per_vip.keys() {
            if !pinned.contains(vip) {
                self.maps.vips.insert(*vip, 1)?;
            }
        }
        Ok(())
    }

    fn read_programmed(&self) -> Result<BTreeMap<socklb_common::ServiceKey, Programmed>> {
        let mut programmed = BTreeMap::new();
        for item in self
            .maps
            .services
            .entries()
            .context("reading the services map")?
        {
            let (key, entry) = item;
            programmed.insert(key, self.read_backends(&key, &entry)?);
        }
        Ok(programmed)
    }

    /// Writes one service so that a concurrent lookup sees the old set or
    /// the new one: members and slots first, the entry (with the count)
    /// next, surplus slots and members last.
    fn write_service(
        &mut self,
        key: &socklb_common::ServiceKey,
        entry: socklb_common::Service,
        backends: &[Endpoint],
        old: Option<Programmed>,
    ) -> Result<()> {
        let (old_entry, old_backends) = match old {
            Some(old) => (Some(old.entry), old.backends),
            None => {
                // A fresh id may have counted for a removed service.
                self.maps.counters.reset(entry.id)?;
                // The VIP before the entry: a VIP missing from `VIPS` passes
                // untranslated whatever `SERVICES` holds.
                self.maps.vips.insert(key.vip, 1)?;
                (None, Vec::new())
            }
        };
        let is_new = old_entry.is_none();
        let old_set: HashSet<Endpoint> = old_backends.iter().copied().collect();
        let new_set: HashSet<Endpoint> = backends.iter().copied().collect();
        let member = |backend: Endpoint| MemberKey {
            service_id: entry.id,
            backend,
        };
        for backend in new_set.difference(&old_set) {
            self.maps.members.insert(member(*backend), 1)?;
            *self.backend_uses.entry((key.proto, *backend)).or_default() += 1;
        }
        for (index, backend) in backends.iter().enumerate() {
            if old_backends.get(index) != Some(backend) {
                let slot = BackendSlotKey {
                    service_id: entry.id,
                    slot: index as u32 + 1,
                };
                self.maps.slots.insert(slot, *backend)?;
            }
        }
        if old_entry != Some(entry) {
            if let Err(err) = self.maps.services.insert(*key, entry) {
                if is_new && !self.services_per_vip.contains_key(&key.vip) {
                    // Best effort: a VIP left in `VIPS` without a service
                    // would refuse its connects until the next agent start.
                    let _ = self.maps.vips.remove(&key.vip);
                }
                return Err(err);
            }
            if is_new {
                *self.services_per_vip.entry(key.vip).or_default() += 1;
            }
        }
        for slot in backends.len() + 1..=old_backends.len() {
            self.maps.slots.remove(&BackendSlotKey {
                service_id: entry.id,
                slot: slot as u32,
            })?;
        }
        for backend in old_set.difference(&new_set) {
            self.maps.members.remove(&member(*backend))?;
            self.release_backend(key.proto, *backend);
        }
        self.used_ids.insert(entry.id);
        self.slot_count = self.slot_count + backends.len() - old_backends.len();
        Ok(())
    }

    fn remove(&mut self, key: &socklb_common::ServiceKey, programmed: &Programmed) -> Result<()> {
        let id = programmed.entry.id;
        self.maps.services.remove(key)?;
        if let Some(count) = self.services_per_vip.get_mut(&key.vip) {
            *count -= 1;
            if *count == 0 {
                self.services_per_vip.remove(&key.vip);
                self.maps.vips.remove(&key.vip)?;
            }
        }
        for slot in 1..=programmed.entry.backend_count {
            self.maps.slots.remove(&BackendSlotKey {
                service_id: id,
                slot,
            })?;
        }
        for backend in &programmed.backends {
            self.maps.members.remove(&MemberKey {
                service_id: id,
                backend: *backend,
            })?;
            self.release_backend(key.proto, *backend);
        }
        self.used_ids.remove(&id);
        self.slot_count -= programmed.backends.len();
        Ok(())
    }

    fn release_backend(&mut self, protocol: u8, backend: Endpoint) {
        if let std::collections::hash_map::Entry::Occupied(mut uses) =
            self.backend_uses.entry((protocol, backend))
        {
            *uses.get_mut() -= 1;
            if *uses.get() == 0 {
                uses.remove();
            }
        }
    }

    /// The programmed state of the services with `keys` (absent ones left out).
    fn read_some<'k>(
        &self,
        keys: impl Iterator<Item = &'k socklb_common::ServiceKey>,
    ) -> Result<BTreeMap<socklb_common::ServiceKey, Programmed>> {
        let mut programmed = BTreeMap::new();
        for key in keys {
            if let Some(entry) = self.maps.services.get(key)? {
                programmed.insert(*key, self.read_backends(key, &entry)?);
            }
        }
        Ok(programmed)
    }

    fn read_backends(
        &self,
        key: &socklb_common::ServiceKey,
        entry: &socklb_common::Service,
    ) -> Result<Programmed> {
        let backends = (1..=entry.backend_count)
            .map(|slot| {
                self.maps
                    .slots
                    .get(&BackendSlotKey {
                        service_id: entry.id,
                        slot,
                    })?
                    .with_context(|| {
                        format!("service {} lacks backend slot {slot}", table_key(key))
                    })
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(Programmed {
            entry: *entry,
            backends,
        })
    }
}

/// Refuses, before anything is written, a write whose members would pass
/// `MEMBERS`' capacity on the way although the final table fits: while a
/// service is rewritten, its new backends are members before its old ones
/// stop being (see `write_service`), and services are written in `changes`'
/// order starting from `members` entries.
fn check_members_peak<'a>(
    mut members: usize,
    changes: impl Iterator<Item = (&'a [Endpoint], Option<&'a Programmed>)>,
) -> Result<(), TableError> {
    for (backends, old) in changes {
        let old: &[Endpoint] = old.map_or(&[], |o| &o.backends);
        let added = backends.iter().filter(|b| !old.contains(b)).count();
        let peak = members + added;
        if peak > MAX_BACKEND_SLOTS as usize {
            return Err(TableError::Capacity {
                what: "backends while the update is written (a service's new backends are \
                       members before its old ones are dropped)",
                count: peak,
                limit: MAX_BACKEND_SLOTS as usize,
            });
        }
        members = members + backends.len() - old.len();
    }
    Ok(())
}

/// `count` service ids not in `used`, searched from `from` upward (wrapping).
/// A freed id thus comes back only after every other free id has been
/// handed out, long after any connect that read the removed service's
/// entry has finished; handing it out at once could let such a connect
/// pick a slot of the new service.
fn free_ids(used: &BTreeSet<u32>, from: u32, count: usize) -> Vec<u32> {
    (0..MAX_SERVICES)
        .map(|offset| (from + offset) % MAX_SERVICES)
        .filter(|id| !used.contains(id))
        .take(count)
        .collect()
}

#[cfg(test)]
mod tests {
    use std::net::{IpAddr, Ipv4Addr};

    use socklb_table::Protocol;

    use super::*;
    use crate::datapath::{TableMaps, WriteFaults};

    fn in_memory(faults: &WriteFaults) -> ProgrammedTable {
        let log = Logger::root(slog::Discard, slog::o!());
        ProgrammedTable::adopt(TableMaps::in_memory(faults.clone()), &log).unwrap()
    }

    /// `count` services on VIPs 10.`net`.x.y, each with one backend.
    fn table(net: u8, count: u32) -> Table {
        let services = (0..count)
            .map(|i| Service {
                name: None,
                key: ServiceKey {
                    vip: IpAddr::V4(Ipv4Addr::new(10, net, (i >> 8) as u8, i as u8)),
                    port: 80,
                    protocol: Protocol::Tcp,
                },
                affinity_timeout_secs: None,
                backends: vec![
                    format!("10.244.{}.{}:8080", (i >> 8) as u8, i as u8)
                        .parse()
                        .unwrap(),
                ],
            })
            .collect();
        Table::new(services).unwrap()
    }

    #[test]
    fn a_full_table_replaces_any_other_whatever_its_keys() {
        let faults = WriteFaults::default();
        let mut programmed = in_memory(&faults);
        programmed.apply(&table(1, 3)).unwrap();
        // At capacity over a table of other keys: the ids the removals
        // free are the only ones left for the last new services.
        let full = table(2, MAX_SERVICES);
        programmed.apply(&full).unwrap();
        assert_eq!(programmed.service_count(), MAX_SERVICES as usize);
        let other = table(3, MAX_SERVICES);
        programmed.apply(&other).unwrap();
        assert!(programmed.read_table().unwrap().digest() == other.digest());
    }

    #[test]
    fn refusals_touch_no_map_and_a_kernel_failure_is_told_apart() {
        let faults = WriteFaults::default();
        let mut programmed = in_memory(&faults);
        let before = table(1, 2);
        programmed.apply(&before).unwrap();
        // Every write fails from now on: a refusal must come before any.
        faults.fail_after(0);
        let unknown = table(2, 1).services[0].key;
        assert!(matches!(
            programmed.delete(&[unknown]),
            Err(WriteError::Table(TableError::UnknownService { .. }))
        ));
        let twice = [before.services[0].clone(), before.services[0].clone()];
        assert!(matches!(
            programmed.upsert(&twice),
            Err(WriteError::Table(TableError::Field { .. }))
        ));
        assert!(matches!(
            programmed.apply(&table(2, 2)),
            Err(WriteError::Failed(_))
        ));
    }

    #[test]
    fn a_restore_that_fails_too_is_tried_once_and_said() {
        let faults = WriteFaults::default();
        let mut programmed = in_memory(&faults);
        let before = table(1, 4);
        programmed.apply(&before).unwrap();
        // The kernel refuses every write from the tenth on: the write
        // fails half way and so does its restore, which is not retried.
        faults.fail_after(10);
        let err = programmed.apply(&table(2, 4)).unwrap_err();
        let err = format!("{err:#}");
        assert!(
            err.contains("restoring the previous one failed too")
                && err.contains("may hold part of each table"),
            "{err}"
        );
        // Once the kernel takes writes again, the next write succeeds.
        faults.heal();
        let after = table(3, 2);
        programmed.apply(&after).unwrap();
        assert!(programmed.read_table().unwrap().digest() == after.digest());
    }

    #[test]
    fn a_replace_that_would_pass_capacity_half_way_is_refused_up_front() {
        let endpoint = |i: u32| Endpoint {
            addr: [0, 0, 0, i],
            ..Default::default()
        };
        let old = Programmed {
            entry: socklb_common::Service::default(),
            backends: (0..4).map(endpoint).collect(),
        };
        let replaced: Vec<Endpoint> = (4..8).map(endpoint).collect();
        let full = MAX_BACKEND_SLOTS as usize;
        // At capacity, four backends replaced by four others: the final
        // table fits, but eight are members for a moment.
        let err =
            check_members_peak(full, [(replaced.as_slice(), Some(&old))].into_iter()).unwrap_err();
        assert!(
            matches!(err, TableError::Capacity { count, .. } if count == full + 4),
            "{err}"
        );
        // With room for the four, or keeping the same backends, it fits.
        check_members_peak(full - 4, [(replaced.as_slice(), Some(&old))].into_iter()).unwrap();
        check_members_peak(full, [(old.backends.as_slice(), Some(&old))].into_iter()).unwrap();
    }

    #[test]
    fn a_freed_service_id_is_not_handed_out_again_at_once() {
        let used = BTreeSet::from([0, 2, 3]);
        // Id 1 was freed; the search goes on from 4.
        assert_eq!(free_ids(&used, 4, 2), [4, 5]);
        assert_eq!(
            free_ids(&used, MAX_SERVICES - 1, 3),
            [MAX_SERVICES - 1, 1, 4]
        );
    }
}
