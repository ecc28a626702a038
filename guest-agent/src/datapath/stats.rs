//! What the datapath reports: per-service counters, per-hook run time
//! (the kernel's BPF run-time stats) and how full each map is.

use std::path::Path;

use anyhow::{Context as _, Result};
use aya::{
    maps::{HashMap, Map, MapData},
    programs::links::{FdLink, PinnedLink},
};
use socklb_common::{
    AFFINITY_ENTRIES, Affinity, AffinityKey, MAX_BACKEND_SLOTS, MAX_SERVICES, MAX_VIPS,
    ServiceCounters, map_names,
};
use socklb_table::ServiceKey;

use super::{Datapath, HOOKS, ProgrammedTable, convert::table_key};

/// How full a map is.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct MapUsage {
    pub map: &'static str,
    pub entries: usize,
    pub capacity: usize,
}

impl Datapath {
    pub fn hook_stats(&self) -> Result<Vec<HookStats>> {
        hook_stats(&self.dir)
    }

    /// The bpffs directory the maps and links are pinned under.
    pub fn pin_dir(&self) -> &Path {
        &self.dir
    }
}

impl ProgrammedTable {
    /// Translations and rejects per service, summed over CPUs.
    pub fn service_stats(&self) -> Result<Vec<(ServiceKey, ServiceCounters)>> {
        let mut stats = Vec::new();
        for (key, entry) in self.maps.services.entries()? {
            stats.push((table_key(&key), self.maps.counters.total(entry.id)?));
        }
        stats.sort_by_key(|(key, _)| *key);
        Ok(stats)
    }

    /// Entries in use and capacity of the maps the agent writes (counted
    /// beside them, so this reads no map); see [`lru_usage`] for the others.
    pub fn map_usage(&self) -> Vec<MapUsage> {
        vec![
            MapUsage {
                map: map_names::SERVICES,
                entries: self.ledger.service_count(),
                capacity: MAX_SERVICES as usize,
            },
            MapUsage {
                map: map_names::VIPS,
                entries: self.ledger.vip_count(),
                capacity: MAX_VIPS as usize,
            },
            MapUsage {
                map: map_names::BACKEND_SLOTS,
                entries: self.ledger.slot_count(),
                capacity: MAX_BACKEND_SLOTS as usize,
            },
            MapUsage {
                map: map_names::MEMBERS,
                entries: self.ledger.slot_count(),
                capacity: MAX_BACKEND_SLOTS as usize,
            },
        ]
    }
}

/// One hook's program as the kernel accounts for it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct HookStats {
    pub hook: &'static str,
    pub program_id: u32,
    pub run_count: u64,
    pub run_time: std::time::Duration,
}

/// Run count and time of the program behind each pinned link under `dir`.
/// The kernel accumulates them only while run-time stats are enabled (see
/// [`enable_run_time_stats`]).
pub fn hook_stats(dir: &Path) -> Result<Vec<HookStats>> {
    let mut programs: std::collections::HashMap<u32, aya::programs::ProgramInfo> =
        aya::programs::loaded_programs()
            .filter_map(|info| info.ok())
            .map(|info| (info.id(), info))
            .collect();
    HOOKS
        .iter()
        .map(|hook| {
            let pin = dir.join("links").join(hook.name);
            let link = PinnedLink::from_pin(&pin)
                .with_context(|| format!("cannot open pinned link {}", pin.display()))?;
            let program_id = FdLink::from(link).info()?.program_id();
            let info = programs
                .remove(&program_id)
                .with_context(|| format!("program {program_id} of {} is not loaded", hook.name))?;
            Ok(HookStats {
                hook: hook.name,
                program_id,
                run_count: info.run_count(),
                run_time: info.run_time(),
            })
        })
        .collect()
}

/// Entries in use and capacity of the LRU map the programs fill
/// (`AFFINITY`), counted by walking its keys through the pin under `dir`:
/// one syscall per entry, up to 65,536, so it is done without the table
/// lock and holds up no write. The per-socket maps have no entries to
/// count from user space (the kernel keeps them with each socket).
pub fn lru_usage(dir: &Path) -> Result<Vec<MapUsage>> {
    let pin = dir.join("maps").join(map_names::AFFINITY);
    let map = MapData::from_pin(&pin)
        .with_context(|| format!("cannot open pinned map {}", pin.display()))?;
    let entries = HashMap::<_, AffinityKey, Affinity>::try_from(Map::LruHashMap(map))?
        .keys()
        .count();
    Ok(vec![MapUsage {
        map: map_names::AFFINITY,
        entries,
        capacity: AFFINITY_ENTRIES as usize,
    }])
}

/// Turns on the kernel's BPF run-time accounting until the returned file
/// descriptor closes. It costs two clock reads per program run.
pub fn enable_run_time_stats() -> Result<std::os::fd::OwnedFd> {
    aya::sys::enable_stats(aya::sys::Stats::RunTime)
        .context("enabling BPF run-time stats (BPF_ENABLE_STATS)")
}
