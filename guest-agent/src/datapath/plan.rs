//! A write to the maps planned without touching them, from the ledger, what
//! the maps hold of the services concerned and what is wanted of them: the
//! steps and their order, the ids new services take, whether the write fits
//! (at the end and on the way) and what it will change. `program` executes
//! a plan against the maps.

use std::{collections::BTreeMap, net::SocketAddr};

use anyhow::anyhow;
use foldhash::HashMap;
use socklb_common::{Endpoint, MAX_BACKEND_SLOTS, ServiceEntry, ServiceEntryKey};
use socklb_table::{Service, TableError};

use super::{
    convert::{Programmed, endpoint, entry_flags, socket_addr, table_key},
    ledger::Ledger,
};
use crate::{
    service_table::WriteError,
    sockets::{DroppedBackend, Removals, RemovedBackend},
};

/// What a write changed.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct ApplySummary {
    pub added: usize,
    pub updated: usize,
    pub removed: usize,
    pub unchanged: usize,
    /// The backends each service lost, and those no service has after.
    pub removals: Removals,
}

/// The steps of a write, in the order they are to run: removals first,
/// then additions and changes, those that shrink first, so the maps never
/// hold more than the larger of the old and the new table.
#[derive(Debug)]
pub(super) struct Plan {
    /// Services to remove, as the maps hold them.
    pub(super) removals: Vec<(ServiceEntryKey, Programmed)>,
    pub(super) changes: Vec<Change>,
    /// The last id a new service takes (the next search starts past it).
    pub(super) last_new_id: Option<u32>,
    /// What the write changes once every step has run.
    pub(super) summary: ApplySummary,
}

/// A service to add (`old` None) or to change.
#[derive(Debug, PartialEq, Eq)]
pub(super) struct Change {
    pub(super) key: ServiceEntryKey,
    pub(super) new: Programmed,
    pub(super) old: Option<Programmed>,
}

impl Plan {
    /// Plans bringing each service of `wanted` (None: removed) from what
    /// `current` holds of it (absent: not programmed) to its wanted state.
    /// A write past capacity, at the end or on the way, is refused.
    pub(super) fn new(
        ledger: &Ledger,
        wanted: BTreeMap<ServiceEntryKey, Option<&Service>>,
        mut current: BTreeMap<ServiceEntryKey, Programmed>,
    ) -> Result<Plan, WriteError> {
        let (mut added, mut removed, mut slots_after) = (0, 0, ledger.slot_count());
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
        socklb_table::check_capacity(ledger.service_count() + added - removed, slots_after)?;

        // Ids this write frees: removals run before any service is written,
        // so when no other id is free (a full table replaced by another) a
        // new service takes one of them; otherwise a freed id waits its
        // turn (see `Ledger::free_ids`).
        let freed: Vec<u32> = wanted
            .iter()
            .filter(|(_, service)| service.is_none())
            .filter_map(|(key, _)| current.get(key))
            .map(|programmed| programmed.entry.id)
            .collect();
        let mut free_ids = ledger.free_ids(added).into_iter().chain(freed);
        let mut plan = Plan {
            removals: Vec::new(),
            changes: Vec::new(),
            last_new_id: None,
            summary: ApplySummary::default(),
        };
        for (key, service) in wanted {
            let old = current.remove(&key);
            let Some(service) = service else {
                if let Some(old) = old {
                    plan.removals.push((key, old));
                }
                continue;
            };
            let id = match &old {
                Some(old) => old.entry.id,
                None => {
                    let id = free_ids
                        .next()
                        .ok_or_else(|| anyhow!("no free service id"))?;
                    plan.last_new_id = Some(id);
                    id
                }
            };
            let backends: Vec<Endpoint> = service.backends.iter().map(endpoint).collect();
            let new = Programmed {
                entry: ServiceEntry {
                    id,
                    backend_count: backends.len() as u32,
                    affinity_timeout_secs: service.affinity_timeout_secs.unwrap_or(0),
                    flags: entry_flags(service.vip_kind),
                },
                backends,
            };
            match &old {
                Some(old) if *old == new => {
                    plan.summary.unchanged += 1;
                    continue;
                }
                Some(_) => plan.summary.updated += 1,
                None => plan.summary.added += 1,
            }
            plan.changes.push(Change { key, new, old });
        }
        plan.changes.sort_by_key(|change| {
            i64::from(change.new.entry.backend_count)
                - change
                    .old
                    .as_ref()
                    .map_or(0, |old| i64::from(old.entry.backend_count))
        });
        let removed_slots: usize = plan
            .removals
            .iter()
            .map(|(_, old)| old.backends.len())
            .sum();
        check_members_peak(
            ledger.slot_count() - removed_slots,
            plan.changes
                .iter()
                .map(|change| (change.new.backends.as_slice(), change.old.as_ref())),
        )?;
        plan.summary.removed = plan.removals.len();
        plan.summary.removals = plan.removals(ledger);
        Ok(plan)
    }

    /// The backends each removal or change drops from its service, and
    /// those of them that no service has once the plan has run (a backend
    /// moved from one service to another is dropped, not unused).
    fn removals(&self, ledger: &Ledger) -> Removals {
        let steps = || {
            self.removals
                .iter()
                .map(|(key, old)| (key, Some(old), None))
                .chain(
                    self.changes
                        .iter()
                        .map(|change| (&change.key, change.old.as_ref(), Some(&change.new))),
                )
                .map(|(key, old, new)| {
                    let old: &[Endpoint] = old.map_or(&[], |old| &old.backends);
                    let new: &[Endpoint] = new.map_or(&[], |new| &new.backends);
                    (key, old, new)
                })
        };
        let mut dropped = Vec::new();
        for (key, old, new) in steps() {
            dropped.extend(
                old.iter()
                    .filter(|backend| !new.contains(backend))
                    .map(|backend| (key, *backend)),
            );
        }
        // Uses are counted for the dropped backends alone: a whole Sync
        // adds tens of thousands of backends and usually drops none.
        let mut change_of_uses: HashMap<(u8, Endpoint), isize> = dropped
            .iter()
            .map(|(key, backend)| ((key.proto, *backend), 0))
            .collect();
        if !change_of_uses.is_empty() {
            for (key, old, new) in steps() {
                let changes = old
                    .iter()
                    .map(|b| (b, -1))
                    .chain(new.iter().map(|b| (b, 1)));
                for (backend, change) in changes {
                    if let Some(uses) = change_of_uses.get_mut(&(key.proto, *backend)) {
                        *uses += change;
                    }
                }
            }
        }
        let unused = dropped
            .iter()
            .filter(|(key, backend)| {
                ledger.uses(key.proto, backend) as isize + change_of_uses[&(key.proto, *backend)]
                    == 0
            })
            .map(|(key, backend)| RemovedBackend {
                protocol: key.proto,
                addr: socket_addr(backend),
            })
            .collect();
        let dropped = dropped
            .iter()
            .map(|(key, backend)| {
                let service = table_key(key);
                DroppedBackend {
                    protocol: key.proto,
                    vip: SocketAddr::new(service.vip, service.port),
                    backend: socket_addr(backend),
                }
            })
            .collect();
        Removals { dropped, unused }
    }
}

/// Refuses, before anything is written, a write whose members would pass
/// `MEMBERS`' capacity on the way although the final table fits: while a
/// service is rewritten, its new backends are members before its old ones
/// stop being (see `ProgrammedTable::write_service`), and services are
/// written in `changes`' order starting from `members` entries.
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

#[cfg(test)]
mod tests {
    use std::net::SocketAddr;

    use socklb_table::{Protocol, VipKind};

    use super::*;
    use crate::datapath::convert::map_key;

    /// A TCP service on 10.96.0.`vip`:80 with backends 10.244.0.`b`:8080.
    fn service(vip: u8, backends: &[u8]) -> Service {
        Service {
            name: None,
            key: socklb_table::ServiceKey {
                vip: [10, 96, 0, vip].into(),
                port: 80,
                protocol: Protocol::Tcp,
            },
            vip_kind: VipKind::Cluster,
            affinity_timeout_secs: None,
            backends: backends
                .iter()
                .map(|b| SocketAddr::from(([10, 244, 0, *b], 8080)))
                .collect(),
        }
    }

    /// `service` as the maps hold it under `id`.
    fn programmed(id: u32, service: &Service) -> (ServiceEntryKey, Programmed) {
        let backends: Vec<Endpoint> = service.backends.iter().map(endpoint).collect();
        let entry = ServiceEntry {
            id,
            backend_count: backends.len() as u32,
            ..Default::default()
        };
        (map_key(&service.key), Programmed { entry, backends })
    }

    #[test]
    fn removals_go_first_then_the_changes_that_shrink_most() {
        let (gone, grows, shrinks, same) = (
            service(1, &[1]),
            service(2, &[1]),
            service(3, &[1, 2, 3]),
            service(4, &[4]),
        );
        let current = BTreeMap::from([
            programmed(5, &gone),
            programmed(6, &grows),
            programmed(7, &shrinks),
            programmed(8, &same),
        ]);
        let ledger = Ledger::of(&current);
        let (grown, shrunk, added) = (
            service(2, &[1, 2, 3]),
            service(3, &[3]),
            service(9, &[1, 5]),
        );
        let wanted = BTreeMap::from([
            (map_key(&gone.key), None),
            (map_key(&grows.key), Some(&grown)),
            (map_key(&shrinks.key), Some(&shrunk)),
            (map_key(&same.key), Some(&same)),
            (map_key(&added.key), Some(&added)),
        ]);
        let plan = Plan::new(&ledger, wanted, current.clone()).unwrap();
        assert_eq!(plan.removals, [programmed(5, &gone)]);
        let order: Vec<(u32, Option<u32>)> = plan
            .changes
            .iter()
            .map(|change| (change.new.entry.id, change.old.as_ref().map(|o| o.entry.id)))
            .collect();
        // Shrinking by 2 first, then those growing by 2 in key order: id 6,
        // and the new one, with id 9 (past the highest in use, not the
        // freed 5).
        assert_eq!(order, [(7, Some(7)), (6, Some(6)), (9, None)]);
        assert_eq!(plan.last_new_id, Some(9));
        assert_eq!(
            (
                plan.summary.added,
                plan.summary.updated,
                plan.summary.removed,
                plan.summary.unchanged
            ),
            (1, 2, 1, 1)
        );
        // Each service's loss is told (1 by the removal, 1 and 2 by the
        // shrink), but 1 and 2 are kept by other services: none is unused.
        let lost: Vec<(SocketAddr, SocketAddr)> = plan
            .summary
            .removals
            .dropped
            .iter()
            .map(|dropped| (dropped.vip, dropped.backend))
            .collect();
        let vip = |service: &Service| SocketAddr::new(service.key.vip, service.key.port);
        assert_eq!(
            lost,
            [
                (vip(&gone), gone.backends[0]),
                (vip(&shrinks), shrinks.backends[0]),
                (vip(&shrinks), shrinks.backends[1]),
            ]
        );
        assert!(plan.summary.removals.unused.is_empty());
    }

    #[test]
    fn a_backend_goes_when_no_service_keeps_it() {
        let (a, b) = (service(1, &[1, 2]), service(2, &[2]));
        let current = BTreeMap::from([programmed(0, &a), programmed(1, &b)]);
        let ledger = Ledger::of(&current);
        let (a_after, c) = (service(1, &[3]), service(3, &[1]));
        // 1 moves from a to c, 2 stays with b; a new backend 3 drops none.
        let moved = BTreeMap::from([
            (map_key(&a.key), Some(&a_after)),
            (map_key(&c.key), Some(&c)),
        ]);
        let plan = Plan::new(&ledger, moved, current.clone()).unwrap();
        assert_eq!(plan.summary.removals.dropped.len(), 2);
        assert!(plan.summary.removals.unused.is_empty());
        // Without c, 1 goes; with b removed too, 2 as well.
        let dropped = BTreeMap::from([(map_key(&a.key), Some(&a_after)), (map_key(&b.key), None)]);
        let plan = Plan::new(&ledger, dropped, current).unwrap();
        let gone: Vec<SocketAddr> = plan
            .summary
            .removals
            .unused
            .iter()
            .map(|removed| removed.addr)
            .collect();
        assert_eq!(gone, [a.backends[0], a.backends[1]]);
    }

    #[test]
    fn a_replace_that_would_pass_capacity_half_way_is_refused_up_front() {
        let endpoint = |i: u32| Endpoint {
            addr: [0, 0, 0, i],
            ..Default::default()
        };
        let old = Programmed {
            entry: ServiceEntry::default(),
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
}
