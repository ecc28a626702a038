//! Programming service tables into the maps: whole tables (all or
//! nothing), upserts and deletes, each run as its `Plan` says and each
//! service written so a concurrent lookup sees its old backend set or its
//! new one; and the repair of what an agent killed half way through an
//! update leaves.

use std::collections::{BTreeMap, BTreeSet};

use anyhow::{Context as _, Result};
use foldhash::{HashMap, HashSet};
use slog::{Logger, info, warn};
use socklb_common::{
    Addr, BackendSlotKey, Endpoint, MemberKey, ServiceCounters, ServiceEntry, ServiceEntryKey,
};
use socklb_table::{Service, ServiceKey, Table, TableError};

use super::{
    convert::{Programmed, map_key, table_key, table_of},
    ledger::Ledger,
    maps::TableMaps,
    plan::{ApplySummary, Plan},
};
use crate::service_table::WriteError;

/// The service table as the maps hold it, and the ledger kept beside them
/// so a write checks capacity and counts without reading every map.
pub struct ProgrammedTable {
    pub(super) maps: TableMaps,
    pub(super) ledger: Ledger,
    /// VIPs a failed step may have left in `VIPS` with another kind than
    /// the ledger counts (or without a service): put right at once if the
    /// kernel lets, else before the next write.
    vips_to_repair: BTreeSet<Addr>,
    /// What the services this agent removed had counted: a removed id's
    /// counters are reset when it is reused.
    removed_counts: ServiceCounters,
    /// What the services it adopted had counted before it started (the
    /// counters are pinned), left out of `counted`.
    adopted_counts: ServiceCounters,
    log: Logger,
}

impl ProgrammedTable {
    /// Takes over what `maps` hold (an earlier agent's table, or nothing),
    /// first repairing what an agent killed half way through a write left.
    pub fn adopt(maps: TableMaps, log: &Logger) -> Result<ProgrammedTable> {
        let mut table = ProgrammedTable {
            maps,
            ledger: Ledger::default(),
            vips_to_repair: BTreeSet::new(),
            removed_counts: ServiceCounters::default(),
            adopted_counts: ServiceCounters::default(),
            log: log.new(slog::o!("component" => "table")),
        };
        let programmed = table.read_programmed()?;
        table.sweep_orphans(&programmed)?;
        table.ledger = Ledger::of(&programmed);
        table.reconcile_vips()?;
        table.adopted_counts = table.counted()?;
        Ok(table)
    }

    /// Makes the maps hold exactly `table`, or leaves them as they were: a
    /// table refused (capacity) changes nothing, and after a kernel error
    /// half way the previous table is written back, once: if that fails
    /// too, the error says the maps hold neither table.
    pub fn apply(&mut self, table: &Table) -> Result<ApplySummary, WriteError> {
        // Read once: at 10,000 services that is 90,000 map lookups, and the
        // copy kept for a restore costs a fraction of them.
        let before = self.read_programmed()?;
        let summary = match self.replace_with(table, before.clone()) {
            Ok(summary) => summary,
            Err(WriteError::Failed(err)) => {
                let restored = self
                    .read_programmed()
                    .map_err(WriteError::from)
                    .and_then(|now| self.replace_with(&table_of(before), now));
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

    /// Brings the maps, which hold `current`, to exactly `table` (one
    /// attempt, no restore).
    fn replace_with(
        &mut self,
        table: &Table,
        current: BTreeMap<ServiceEntryKey, Programmed>,
    ) -> Result<ApplySummary, WriteError> {
        let mut wanted: BTreeMap<ServiceEntryKey, Option<&Service>> =
            current.keys().map(|key| (*key, None)).collect();
        for service in &table.services {
            wanted.insert(map_key(&service.key), Some(service));
        }
        self.write(wanted, current)
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
        let current = self.read_some(wanted.keys())?;
        self.write(wanted, current)
    }

    /// Removes the services with `keys`; refuses all if one is unknown.
    pub fn delete(&mut self, keys: &[ServiceKey]) -> Result<ApplySummary, WriteError> {
        let wanted: BTreeMap<_, Option<&Service>> =
            keys.iter().map(|key| (map_key(key), None)).collect();
        let current = self.read_some(wanted.keys())?;
        if let Some(missing) = keys.iter().find(|key| !current.contains_key(&map_key(key))) {
            return Err(TableError::UnknownService {
                key: missing.to_string(),
            }
            .into());
        }
        self.write(wanted, current)
    }

    /// Plans the write (nothing is written if it is refused), then runs
    /// its steps. Each step's service is counted in the ledger once the
    /// step has run; a step that fails half way leaves its service as the
    /// maps then hold it (`settle`), so the ledger never counts what the
    /// maps do not hold.
    fn write(
        &mut self,
        wanted: BTreeMap<ServiceEntryKey, Option<&Service>>,
        current: BTreeMap<ServiceEntryKey, Programmed>,
    ) -> Result<ApplySummary, WriteError> {
        let plan = Plan::new(&self.ledger, wanted, current)?;
        self.repair_vips()?;
        if let Some(id) = plan.last_new_id {
            self.ledger.handed_out(id);
        }
        for (key, old) in &plan.removals {
            let removed = self.remove(key, old);
            self.settle(key, Some(old), None, removed)?;
        }
        for change in &plan.changes {
            let written = self.write_service(&change.key, &change.new, change.old.as_ref());
            self.settle(&change.key, change.old.as_ref(), Some(&change.new), written)?;
        }
        Ok(plan.summary)
    }

    /// Counts the service at `key` in the ledger as a step left it: `new`
    /// once the step has run; after a failure, as the maps hold it (a
    /// service may be rewritten in part). Unreadable maps leave the count
    /// as it was. A service whose id leaves the ledger leaves its counts
    /// in `removed_counts`, so `counted` has them once.
    fn settle(
        &mut self,
        key: &ServiceEntryKey,
        old: Option<&Programmed>,
        new: Option<&Programmed>,
        step: Result<()>,
    ) -> Result<()> {
        let gone = match &step {
            Ok(()) => {
                self.ledger.record(key, old, new);
                new.is_none()
            }
            Err(_) => match self.read_some(std::iter::once(key)) {
                Ok(now) => {
                    self.ledger.record(key, old, now.get(key));
                    !now.contains_key(key)
                }
                Err(_) => false,
            },
        };
        if let (Some(old), true) = (old, gone) {
            self.keep_removed_counts(old.entry.id);
        }
        if let Err(err) = step {
            self.vips_to_repair.insert(key.vip);
            // Best effort: `write` tries again.
            let _ = self.repair_vips();
            return Err(err);
        }
        Ok(())
    }

    /// Adds what the removed service `id` counted to `removed_counts`: read
    /// once no connect finds the service, before a reuse of the id resets
    /// its counters.
    fn keep_removed_counts(&mut self, id: u32) {
        match self.maps.counters.total(id) {
            Ok(counted) => self.removed_counts.add(&counted),
            Err(err) => {
                warn!(self.log, "a removed service's counts are lost"; "service_id" => id,
                      "error" => format!("{err:#}"));
            }
        }
    }

    /// The table as the maps hold it (names are not kept in the datapath).
    pub fn read_table(&self) -> Result<Table> {
        Ok(table_of(self.read_programmed()?))
    }

    pub fn service_count(&self) -> usize {
        self.ledger.service_count()
    }

    /// Makes slots and members agree with the service entries: removes
    /// slots and members whose service is gone or beyond its count, and
    /// members that are in none of their service's slots; adds a member for
    /// every slot that lacks one. An agent killed in the middle of an
    /// update leaves such state (a removed backend still a member would
    /// keep its sticky clients for good), and a later service given the
    /// same id must not inherit it.
    fn sweep_orphans(&mut self, programmed: &BTreeMap<ServiceEntryKey, Programmed>) -> Result<()> {
        let live: HashMap<u32, &Programmed> =
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

    /// Makes `VIPS` hold exactly the VIPs of the programmed services, each
    /// with its kind: an agent killed half way through an update, or one of
    /// a version before `VIPS` (or before external VIPs), can leave it
    /// behind `SERVICES`.
    fn reconcile_vips(&mut self) -> Result<()> {
        let pinned: HashMap<Addr, u8> = self.maps.vips.entries()?.into_iter().collect();
        for vip in pinned
            .keys()
            .filter(|vip| self.ledger.services_on(vip) == 0)
        {
            self.maps.vips.remove(vip)?;
        }
        for vip in self.ledger.vips() {
            let kind = self.ledger.vip_kind(vip);
            if let Some(kind) = kind
                && pinned.get(vip) != Some(&kind)
            {
                self.maps.vips.insert(*vip, kind)?;
            }
        }
        Ok(())
    }

    /// Makes `VIPS` hold the kind the ledger counts for each VIP to repair.
    fn repair_vips(&mut self) -> Result<()> {
        while let Some(vip) = self.vips_to_repair.first().copied() {
            let held = self.maps.vips.get(&vip)?;
            self.change_vip_kind(&vip, held, self.ledger.vip_kind(&vip))?;
            self.vips_to_repair.remove(&vip);
        }
        Ok(())
    }

    /// Changes `vip`'s kind in `VIPS` from `from` to `to` (None: absent).
    fn change_vip_kind(&mut self, vip: &Addr, from: Option<u8>, to: Option<u8>) -> Result<()> {
        match to {
            _ if to == from => Ok(()),
            Some(kind) => self.maps.vips.insert(*vip, kind),
            None => self.maps.vips.remove(vip),
        }
    }

    fn read_programmed(&self) -> Result<BTreeMap<ServiceEntryKey, Programmed>> {
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
        key: &ServiceEntryKey,
        new: &Programmed,
        old: Option<&Programmed>,
    ) -> Result<()> {
        let (entry, backends) = (new.entry, new.backends.as_slice());
        let old_backends: &[Endpoint] = old.map_or(&[], |old| &old.backends);
        if old.is_none() {
            // A fresh id may have counted for a removed service.
            self.maps.counters.reset(entry.id)?;
        }
        // The VIP and its kind before the entry: a VIP missing from `VIPS`
        // passes untranslated whatever `SERVICES` holds.
        self.change_vip_kind(
            &key.vip,
            self.ledger.vip_kind(&key.vip),
            self.ledger.vip_kind_after(&key.vip, old, Some(new)),
        )?;
        let old_set: HashSet<Endpoint> = old_backends.iter().copied().collect();
        let new_set: HashSet<Endpoint> = backends.iter().copied().collect();
        let member = |backend: Endpoint| MemberKey {
            service_id: entry.id,
            backend,
        };
        for backend in new_set.difference(&old_set) {
            self.maps.members.insert(member(*backend), 1)?;
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
        if old.map(|old| old.entry) != Some(entry) {
            self.maps.services.insert(*key, entry)?;
        }
        for slot in backends.len() + 1..=old_backends.len() {
            self.maps.slots.remove(&BackendSlotKey {
                service_id: entry.id,
                slot: slot as u32,
            })?;
        }
        for backend in old_set.difference(&new_set) {
            self.maps.members.remove(&member(*backend))?;
        }
        Ok(())
    }

    fn remove(&mut self, key: &ServiceEntryKey, programmed: &Programmed) -> Result<()> {
        let id = programmed.entry.id;
        self.maps.services.remove(key)?;
        // Gone with the last service of its VIP, external with its last
        // cluster service (the ledger counts it until this step has run).
        self.change_vip_kind(
            &key.vip,
            self.ledger.vip_kind(&key.vip),
            self.ledger.vip_kind_after(&key.vip, Some(programmed), None),
        )?;
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
        }
        Ok(())
    }

    /// What the hooks counted for the services since this agent started:
    /// those programmed now and those it removed, less what the services
    /// it adopted had counted before.
    pub fn counted(&self) -> Result<ServiceCounters> {
        let mut total = self.removed_counts;
        // The ledger's ids: one counter read a service, no map walk.
        for id in self.ledger.service_ids() {
            total.add(&self.maps.counters.total(id)?);
        }
        Ok(total.since(&self.adopted_counts))
    }

    /// The programmed state of the services with `keys` (absent ones left out).
    fn read_some<'k>(
        &self,
        keys: impl Iterator<Item = &'k ServiceEntryKey>,
    ) -> Result<BTreeMap<ServiceEntryKey, Programmed>> {
        let mut programmed = BTreeMap::new();
        for key in keys {
            if let Some(entry) = self.maps.services.get(key)? {
                programmed.insert(*key, self.read_backends(key, &entry)?);
            }
        }
        Ok(programmed)
    }

    fn read_backends(&self, key: &ServiceEntryKey, entry: &ServiceEntry) -> Result<Programmed> {
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

#[cfg(test)]
mod tests {
    use std::net::{IpAddr, Ipv4Addr};

    use socklb_common::{MAX_SERVICES, VIP_CLUSTER, VIP_EXTERNAL};
    use socklb_table::{Protocol, VipKind};

    use super::*;
    use crate::datapath::{TableMaps, WriteFaults, convert};

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
                vip_kind: VipKind::Cluster,
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
    fn vips_holds_each_vips_kind_a_cluster_service_making_it_cluster() {
        let faults = WriteFaults::default();
        let mut programmed = in_memory(&faults);
        let service = |port: u16, kind: &str| {
            Table::parse(&format!(
                "services: [{{vip: 192.0.2.1, port: {port}, vipKind: {kind}}}]"
            ))
            .unwrap()
            .services
            .remove(0)
        };
        let vip = convert::addr_words("192.0.2.1".parse().unwrap());
        let kind_held = |programmed: &ProgrammedTable| programmed.maps.vips.get(&vip).unwrap();
        programmed.upsert(&[service(80, "external")]).unwrap();
        assert_eq!(kind_held(&programmed), Some(VIP_EXTERNAL));
        programmed.upsert(&[service(81, "cluster")]).unwrap();
        assert_eq!(kind_held(&programmed), Some(VIP_CLUSTER));
        programmed.delete(&[service(81, "cluster").key]).unwrap();
        assert_eq!(kind_held(&programmed), Some(VIP_EXTERNAL));
        programmed.upsert(&[service(80, "cluster")]).unwrap();
        assert_eq!(kind_held(&programmed), Some(VIP_CLUSTER));
        let external = Table::new(vec![service(80, "external"), service(81, "external")]).unwrap();
        programmed.apply(&external).unwrap();
        assert_eq!(kind_held(&programmed), Some(VIP_EXTERNAL));
        assert_eq!(programmed.read_table().unwrap(), external, "read back");
        programmed.apply(&Table::default()).unwrap();
        assert_eq!(kind_held(&programmed), None);
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
    fn after_a_write_failing_at_any_step_the_ledger_counts_what_the_maps_hold() {
        let table = |services: serde_json::Value| {
            Table::parse(&serde_json::json!({ "services": services }).to_string()).unwrap()
        };
        let backends = |ips: &[&str]| {
            ips.iter()
                .map(|ip| serde_json::json!({"ip": ip, "port": 8080}))
                .collect::<Vec<_>>()
        };
        let before = table(serde_json::json!([
            {"vip": "10.96.0.1", "port": 80, "backends": backends(&["10.244.0.1", "10.244.0.2"])},
            {"vip": "10.96.0.1", "port": 81, "backends": backends(&["10.244.0.2"])},
            {"vip": "10.96.0.2", "port": 80, "backends": backends(&["10.244.0.3"])},
            {"vip": "10.96.0.2", "port": 81, "vipKind": "external", "backends": []},
        ]));
        // Grows and changes the first, empties the second, adds a fourth
        // on a backend of the first.
        let upserted = table(serde_json::json!([
            {"vip": "10.96.0.1", "port": 80,
             "backends": backends(&["10.244.0.4", "10.244.0.5", "10.244.0.6"])},
            {"vip": "10.96.0.1", "port": 81, "backends": []},
            {"vip": "10.96.0.3", "port": 80, "backends": backends(&["10.244.0.1"])},
            {"vip": "10.96.0.2", "port": 80, "vipKind": "external", "backends": []},
        ]));
        let replaced = table(serde_json::json!([
            {"vip": "10.96.0.4", "port": 80, "backends": backends(&["10.244.0.2", "10.244.0.7"])},
        ]));
        let mut failed = 0;
        for writes in 0..40 {
            for write in ["upsert", "delete", "apply"] {
                let faults = WriteFaults::default();
                let mut programmed = in_memory(&faults);
                programmed.apply(&before).unwrap();
                faults.fail_after(writes);
                let result = match write {
                    "upsert" => programmed.upsert(&upserted.services),
                    "delete" => {
                        programmed.delete(&[before.services[0].key, before.services[2].key])
                    }
                    _ => programmed.apply(&replaced),
                };
                failed += usize::from(result.is_err());
                faults.heal();
                // The next write (here of nothing) puts `VIPS` right.
                programmed.upsert(&[]).unwrap();
                let held = Ledger::of(&programmed.read_programmed().unwrap());
                assert_eq!(
                    programmed.ledger.without_id_search(),
                    held.without_id_search(),
                    "{write} failing after {writes} writes"
                );
                let vips: HashMap<Addr, u8> = programmed
                    .maps
                    .vips
                    .entries()
                    .unwrap()
                    .into_iter()
                    .collect();
                let counted: HashMap<Addr, u8> = held
                    .vips()
                    .map(|vip| (*vip, held.vip_kind(vip).unwrap()))
                    .collect();
                assert_eq!(vips, counted, "VIPS, {write} failing after {writes} writes");
            }
        }
        assert!(failed > 20, "the writes failed half way {failed} times");
    }
}
