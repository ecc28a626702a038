//! The lowest layer under table programming: the maps a service table
//! lives in (`SERVICES`, `VIPS`, `BACKEND_SLOTS`, `MEMBERS`,
//! `SERVICE_COUNTERS`), reduced to the few operations programming uses.
//! [`TableMaps::kernel`] reaches the pinned BPF maps through aya;
//! [`TableMaps::in_memory`] keeps the same contract in process memory
//! (capacity, refusal of absent keys), so the agent's whole API runs
//! without a kernel, as aya fakes only its syscall layer. Everything above
//! this file is the same code in both.

use std::{
    hash::Hash,
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    },
    time::Duration,
};

use anyhow::{Result, anyhow};
use aya::{
    Pod,
    maps::{MapData, MapError, PerCpuArray, PerCpuValues},
};
use foldhash::HashMap;
use socklb_common::{
    Addr, BackendSlotKey, Endpoint, MAX_BACKEND_SLOTS, MAX_SERVICES, MAX_VIPS, MemberKey,
    ServiceCounters, ServiceEntry, ServiceEntryKey,
};

/// A hash map as table programming uses it.
pub(super) trait TableMap<K, V>: Send {
    fn get(&self, key: &K) -> Result<Option<V>>;
    /// Adds or replaces; refused when the map is full.
    fn insert(&mut self, key: K, value: V) -> Result<()>;
    /// Refused when `key` is absent.
    fn remove(&mut self, key: &K) -> Result<()>;
    fn entries(&self) -> Result<Vec<(K, V)>>;
}

/// Per-service counters, indexed by service id.
pub(super) trait Counters: Send {
    /// Zeroes the counters of `id` (a fresh id may have counted for a
    /// removed service).
    fn reset(&mut self, id: u32) -> Result<()>;
    /// The counters of `id`, summed over CPUs.
    fn total(&self, id: u32) -> Result<ServiceCounters>;
}

/// The maps one service table lives in.
pub struct TableMaps {
    pub(super) services: Box<dyn TableMap<ServiceEntryKey, ServiceEntry>>,
    pub(super) vips: Box<dyn TableMap<Addr, u8>>,
    pub(super) slots: Box<dyn TableMap<BackendSlotKey, Endpoint>>,
    pub(super) members: Box<dyn TableMap<MemberKey, u8>>,
    pub(super) counters: Box<dyn Counters>,
}

impl TableMaps {
    /// The pinned BPF maps the programs read.
    pub(super) fn kernel(
        services: aya::maps::HashMap<MapData, ServiceEntryKey, ServiceEntry>,
        vips: aya::maps::HashMap<MapData, Addr, u8>,
        slots: aya::maps::HashMap<MapData, BackendSlotKey, Endpoint>,
        members: aya::maps::HashMap<MapData, MemberKey, u8>,
        counters: PerCpuArray<MapData, ServiceCounters>,
    ) -> TableMaps {
        TableMaps {
            services: Box::new(services),
            vips: Box::new(vips),
            slots: Box::new(slots),
            members: Box::new(members),
            counters: Box::new(counters),
        }
    }

    /// Maps in process memory with the kernel maps' capacities; every
    /// insert or removal goes through `write_faults` (none at first).
    pub fn in_memory(write_faults: WriteFaults) -> TableMaps {
        TableMaps {
            services: Box::new(MemoryMap::new(MAX_SERVICES, write_faults.clone())),
            vips: Box::new(MemoryMap::new(MAX_VIPS, write_faults.clone())),
            slots: Box::new(MemoryMap::new(MAX_BACKEND_SLOTS, write_faults.clone())),
            members: Box::new(MemoryMap::new(MAX_BACKEND_SLOTS, write_faults)),
            counters: Box::new(MemoryCounters),
        }
    }
}

impl<K: Pod + Send, V: Pod + Send> TableMap<K, V> for aya::maps::HashMap<MapData, K, V> {
    fn get(&self, key: &K) -> Result<Option<V>> {
        match aya::maps::HashMap::get(self, key, 0) {
            Ok(value) => Ok(Some(value)),
            Err(MapError::KeyNotFound) => Ok(None),
            Err(err) => Err(err.into()),
        }
    }

    fn insert(&mut self, key: K, value: V) -> Result<()> {
        Ok(aya::maps::HashMap::insert(self, key, value, 0)?)
    }

    fn remove(&mut self, key: &K) -> Result<()> {
        Ok(aya::maps::HashMap::remove(self, key)?)
    }

    fn entries(&self) -> Result<Vec<(K, V)>> {
        Ok(self.iter().collect::<Result<_, _>>()?)
    }
}

impl Counters for PerCpuArray<MapData, ServiceCounters> {
    fn reset(&mut self, id: u32) -> Result<()> {
        let cpus = aya::util::nr_cpus().map_err(|(_, err)| err)?;
        let zero = PerCpuValues::try_from(vec![ServiceCounters::default(); cpus])?;
        Ok(self.set(id, zero, 0)?)
    }

    fn total(&self, id: u32) -> Result<ServiceCounters> {
        let mut total = ServiceCounters::default();
        for per_cpu in self.get(&id, 0)?.iter() {
            total.add(per_cpu);
        }
        Ok(total)
    }
}

/// What maps in memory do on each write, changed while they are in use:
/// take a while (a slow sandbox), or fail from some write on (a kernel
/// that refuses, to test what a half-written update leaves). Atomics, not
/// a lock: a node benchmark's 199 stand-ins make 50 million writes.
#[derive(Clone, Default)]
pub struct WriteFaults(Arc<Faults>);

struct Faults {
    delay_ns: AtomicU64,
    /// Writes that still succeed; `ALL_WRITES`: all.
    writes_left: AtomicU64,
}

const ALL_WRITES: u64 = u64::MAX;

impl Default for Faults {
    fn default() -> Faults {
        Faults {
            delay_ns: AtomicU64::new(0),
            writes_left: AtomicU64::new(ALL_WRITES),
        }
    }
}

impl WriteFaults {
    /// Makes every write take `delay`.
    pub fn slow_down(&self, delay: Duration) {
        let nanos = u64::try_from(delay.as_nanos()).unwrap_or(u64::MAX);
        self.0.delay_ns.store(nanos, Ordering::Relaxed);
    }

    /// Makes every write after the next `writes` fail.
    pub fn fail_after(&self, writes: usize) {
        let writes = u64::try_from(writes).unwrap_or(ALL_WRITES - 1);
        self.0.writes_left.store(writes, Ordering::SeqCst);
    }

    /// Lets every write succeed again.
    pub fn heal(&self) {
        self.0.writes_left.store(ALL_WRITES, Ordering::SeqCst);
    }

    fn write(&self) -> Result<()> {
        let counted = self
            .0
            .writes_left
            .try_update(Ordering::SeqCst, Ordering::SeqCst, |left| match left {
                ALL_WRITES | 0 => None,
                left => Some(left - 1),
            });
        if counted == Err(0) {
            return Err(anyhow!("the write failed (injected): EFAULT"));
        }
        let delay = self.0.delay_ns.load(Ordering::Relaxed);
        if delay != 0 {
            std::thread::sleep(Duration::from_nanos(delay));
        }
        Ok(())
    }
}

/// A BPF hash map's contract in memory: bounded, and absent keys are
/// refused on removal (ENOENT), as the kernel refuses them.
struct MemoryMap<K, V> {
    entries: HashMap<K, V>,
    capacity: usize,
    write_faults: WriteFaults,
}

impl<K, V> MemoryMap<K, V> {
    fn new(capacity: u32, write_faults: WriteFaults) -> MemoryMap<K, V> {
        MemoryMap {
            entries: HashMap::default(),
            capacity: capacity as usize,
            write_faults,
        }
    }
}

impl<K: Copy + Eq + Hash + Send, V: Copy + Send> TableMap<K, V> for MemoryMap<K, V> {
    fn get(&self, key: &K) -> Result<Option<V>> {
        Ok(self.entries.get(key).copied())
    }

    fn insert(&mut self, key: K, value: V) -> Result<()> {
        self.write_faults.write()?;
        if self.entries.len() >= self.capacity && !self.entries.contains_key(&key) {
            return Err(anyhow!(
                "the map is full ({} entries): E2BIG",
                self.capacity
            ));
        }
        self.entries.insert(key, value);
        Ok(())
    }

    fn remove(&mut self, key: &K) -> Result<()> {
        self.write_faults.write()?;
        self.entries
            .remove(key)
            .map(drop)
            .ok_or_else(|| anyhow!("no such key: ENOENT"))
    }

    fn entries(&self) -> Result<Vec<(K, V)>> {
        Ok(self.entries.iter().map(|(k, v)| (*k, *v)).collect())
    }
}

/// Counters in memory: nothing translates there, so they stay at zero.
struct MemoryCounters;

impl MemoryCounters {
    /// The kernel's array refuses an index beyond its size.
    fn check(id: u32) -> Result<()> {
        if id >= MAX_SERVICES {
            return Err(anyhow!(
                "service id {id} is beyond the counters' {MAX_SERVICES}"
            ));
        }
        Ok(())
    }
}

impl Counters for MemoryCounters {
    fn reset(&mut self, id: u32) -> Result<()> {
        MemoryCounters::check(id)
    }

    fn total(&self, id: u32) -> Result<ServiceCounters> {
        MemoryCounters::check(id)?;
        Ok(ServiceCounters::default())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn memory_maps_keep_the_kernel_maps_contract() {
        let mut map = MemoryMap::<u32, u8>::new(2, WriteFaults::default());
        map.insert(1, 1).unwrap();
        map.insert(2, 1).unwrap();
        map.insert(2, 7).unwrap();
        let err = map.insert(3, 1).unwrap_err();
        assert!(err.to_string().contains("E2BIG"), "{err}");
        assert_eq!(map.get(&2).unwrap(), Some(7));
        assert_eq!(map.get(&3).unwrap(), None);
        map.remove(&1).unwrap();
        let err = map.remove(&1).unwrap_err();
        assert!(err.to_string().contains("ENOENT"), "{err}");
        assert_eq!(map.entries().unwrap(), vec![(2, 7)]);
    }
}
