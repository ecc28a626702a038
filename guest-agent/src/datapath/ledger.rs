//! The ledger kept beside the maps: what a write needs to know of the whole
//! table (the service ids in use, backend slots, services per VIP and per
//! backend) without reading every map. It reads and writes no map: it
//! counts what the maps hold, and changes by one service recorded as
//! written or removed.

use std::{
    collections::{BTreeMap, BTreeSet, hash_map::Entry},
    hash::Hash,
};

use foldhash::HashMap;
use socklb_common::{Addr, Endpoint, MAX_SERVICES, ServiceEntryKey, VIP_CLUSTER, VIP_EXTERNAL};
use socklb_table::VipKind;

use super::convert::{Programmed, vip_kind_of};

#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub(super) struct Ledger {
    /// Ids of the programmed services.
    used_ids: BTreeSet<u32>,
    /// Where the search for a free service id starts (see `free_ids`).
    next_service_id: u32,
    /// Backend slots summed over the services.
    slot_count: usize,
    /// Services per VIP: a VIP stays in `VIPS` while it has one.
    services_per_vip: HashMap<Addr, usize>,
    /// Cluster services per VIP: a VIP with one is a cluster VIP.
    cluster_services_per_vip: HashMap<Addr, usize>,
    /// Services per (protocol, backend): a backend is removed, and its
    /// sockets closed, once no service has it.
    backend_uses: HashMap<(u8, Endpoint), usize>,
}

impl Ledger {
    /// The counts of `programmed`, what the maps hold; ids are searched
    /// from past the highest in use.
    pub(super) fn of(programmed: &BTreeMap<ServiceEntryKey, Programmed>) -> Ledger {
        let mut ledger = Ledger::default();
        for (key, service) in programmed {
            ledger.record(key, None, Some(service));
        }
        ledger.next_service_id = ledger
            .used_ids
            .last()
            .map_or(0, |id| (id + 1) % MAX_SERVICES);
        ledger
    }

    /// Counts the service at `key` as `new` instead of `old` (None: absent).
    pub(super) fn record(
        &mut self,
        key: &ServiceEntryKey,
        old: Option<&Programmed>,
        new: Option<&Programmed>,
    ) {
        if let Some(old) = old {
            self.used_ids.remove(&old.entry.id);
            self.slot_count -= old.backends.len();
            decrement(&mut self.services_per_vip, key.vip);
            if is_cluster(old) {
                decrement(&mut self.cluster_services_per_vip, key.vip);
            }
            for backend in &old.backends {
                decrement(&mut self.backend_uses, (key.proto, *backend));
            }
        }
        if let Some(new) = new {
            self.used_ids.insert(new.entry.id);
            self.slot_count += new.backends.len();
            *self.services_per_vip.entry(key.vip).or_default() += 1;
            if is_cluster(new) {
                *self.cluster_services_per_vip.entry(key.vip).or_default() += 1;
            }
            for backend in &new.backends {
                *self.backend_uses.entry((key.proto, *backend)).or_default() += 1;
            }
        }
    }

    /// The ids of the programmed services.
    pub(super) fn service_ids(&self) -> impl Iterator<Item = u32> + '_ {
        self.used_ids.iter().copied()
    }

    pub(super) fn service_count(&self) -> usize {
        self.used_ids.len()
    }

    pub(super) fn slot_count(&self) -> usize {
        self.slot_count
    }

    pub(super) fn vip_count(&self) -> usize {
        self.services_per_vip.len()
    }

    /// The VIPs that have a service.
    pub(super) fn vips(&self) -> impl Iterator<Item = &Addr> {
        self.services_per_vip.keys()
    }

    pub(super) fn services_on(&self, vip: &Addr) -> usize {
        self.services_per_vip.get(vip).copied().unwrap_or(0)
    }

    /// What `VIPS` holds for `vip` (`VIP_CLUSTER`, `VIP_EXTERNAL`; None:
    /// no service has it).
    pub(super) fn vip_kind(&self, vip: &Addr) -> Option<u8> {
        self.vip_kind_after(vip, None, None)
    }

    /// [`Ledger::vip_kind`] once the service on `vip` that is `old` (None:
    /// absent) is `new`: a cluster VIP while any of its services is one.
    pub(super) fn vip_kind_after(
        &self,
        vip: &Addr,
        old: Option<&Programmed>,
        new: Option<&Programmed>,
    ) -> Option<u8> {
        let count = |counts: &HashMap<Addr, usize>, counted: fn(&Programmed) -> bool| {
            counts.get(vip).copied().unwrap_or(0) + usize::from(new.is_some_and(counted))
                - usize::from(old.is_some_and(counted))
        };
        if count(&self.services_per_vip, |_| true) == 0 {
            None
        } else if count(&self.cluster_services_per_vip, is_cluster) > 0 {
            Some(VIP_CLUSTER)
        } else {
            Some(VIP_EXTERNAL)
        }
    }

    /// How many services have `backend` for `protocol`.
    pub(super) fn uses(&self, protocol: u8, backend: &Endpoint) -> usize {
        self.backend_uses
            .get(&(protocol, *backend))
            .copied()
            .unwrap_or(0)
    }

    /// `count` service ids not in use, searched from where the last search
    /// stopped (wrapping). A freed id thus comes back only after every
    /// other free id has been handed out, long after any connect that read
    /// the removed service's entry has finished; handing it out at once
    /// could let such a connect pick a slot of the new service.
    pub(super) fn free_ids(&self, count: usize) -> Vec<u32> {
        (0..MAX_SERVICES)
            .map(|offset| (self.next_service_id + offset) % MAX_SERVICES)
            .filter(|id| !self.used_ids.contains(id))
            .take(count)
            .collect()
    }

    /// The next search for free ids starts past `id`, the last handed out.
    pub(super) fn handed_out(&mut self, id: u32) {
        self.next_service_id = (id + 1) % MAX_SERVICES;
    }

    /// The counts alone, to compare with those of what the maps hold
    /// (which cannot know where the id search stopped).
    #[cfg(test)]
    pub(super) fn without_id_search(&self) -> Ledger {
        Ledger {
            next_service_id: 0,
            ..self.clone()
        }
    }
}

fn is_cluster(service: &Programmed) -> bool {
    vip_kind_of(service.entry.flags) == VipKind::Cluster
}

/// One count less for `key`; a count that reaches zero goes.
fn decrement<K: Hash + Eq>(counts: &mut HashMap<K, usize>, key: K) {
    if let Entry::Occupied(mut count) = counts.entry(key) {
        *count.get_mut() -= 1;
        if *count.get() == 0 {
            count.remove();
        }
    }
}

#[cfg(test)]
mod tests {
    use socklb_common::ServiceEntry;

    use super::*;

    /// A service with id `id`, as the maps hold it, on VIP `vip`.
    fn programmed(id: u32, vip: u32, backends: &[u32]) -> (ServiceEntryKey, Programmed) {
        let key = ServiceEntryKey {
            vip: [0, 0, 0, vip],
            port: 80,
            proto: 6,
            ..Default::default()
        };
        let backends: Vec<Endpoint> = backends
            .iter()
            .map(|i| Endpoint {
                addr: [0, 0, 0, *i],
                ..Default::default()
            })
            .collect();
        let entry = ServiceEntry {
            id,
            backend_count: backends.len() as u32,
            ..Default::default()
        };
        (key, Programmed { entry, backends })
    }

    #[test]
    fn a_freed_service_id_is_not_handed_out_again_at_once() {
        let programmed = BTreeMap::from([
            programmed(0, 1, &[]),
            programmed(2, 2, &[]),
            programmed(3, 3, &[]),
        ]);
        let mut ledger = Ledger::of(&programmed);
        // Id 1 was freed; the search goes on from 4.
        assert_eq!(ledger.free_ids(2), [4, 5]);
        ledger.handed_out(MAX_SERVICES - 2);
        assert_eq!(ledger.free_ids(3), [MAX_SERVICES - 1, 1, 4]);
    }

    #[test]
    fn a_service_recorded_and_recorded_away_leaves_no_count() {
        let (a_key, a) = programmed(0, 1, &[7, 8]);
        let (b_key, b) = programmed(1, 1, &[8]);
        let mut ledger = Ledger::of(&BTreeMap::from([(a_key, a.clone())]));
        ledger.record(&b_key, None, Some(&b));
        assert_eq!(
            (
                ledger.service_count(),
                ledger.slot_count(),
                ledger.vip_count()
            ),
            (2, 3, 1)
        );
        assert_eq!(ledger.services_on(&a_key.vip), 2);
        assert_eq!(ledger.uses(6, &b.backends[0]), 2);
        // Changed to other backends: 7 has no service left, 8 one.
        let (_, a_changed) = programmed(0, 1, &[9]);
        ledger.record(&a_key, Some(&a), Some(&a_changed));
        assert_eq!(ledger.uses(6, &a.backends[0]), 0);
        assert_eq!(ledger.uses(6, &b.backends[0]), 1);
        ledger.record(&a_key, Some(&a_changed), None);
        ledger.record(&b_key, Some(&b), None);
        assert_eq!(
            ledger,
            Ledger {
                next_service_id: 1,
                ..Ledger::default()
            },
            "only where the id search goes on is left"
        );
    }
}
