//! The eBPF datapath: load, adopt pinned maps, attach and pin links, and
//! program service tables into the maps.
//!
//! Pins under the bpffs directory `DIR`:
//! - `DIR/maps/<MAP>`: every map; a later agent adopts them as they are.
//! - `DIR/links/<hook>`: one link per hook; it keeps the program attached
//!   while no agent runs. A later agent attaches its own programs first and
//!   only then drops the old links, so no connect goes untranslated.

use std::{
    collections::{BTreeMap, BTreeSet, HashSet},
    fs,
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr},
    path::{Path, PathBuf},
};

use anyhow::{Context as _, Result, anyhow, bail};
use aya::{
    Ebpf, EbpfLoader,
    maps::{Array, HashMap, MapData, MapInfo, PerCpuArray, PerCpuValues},
    programs::{
        CgroupAttachMode, CgroupSockAddr,
        links::{FdLink, PinnedLink},
    },
};
use slog::{Logger, info};
use socklb_common::{
    Addr, BackendSlotKey, Endpoint, GUEST_ADDR_V4, GUEST_ADDR_V6, MAX_BACKEND_SLOTS, MAX_SERVICES,
    MAX_VIPS, MemberKey, REVERSE_ENTRIES, ReverseKey, STICKY_ENTRIES, ServiceCounters, Sticky,
    StickyKey, is_v4_mapped, map_names, v4_mapped,
};
use socklb_table::{Protocol, Service, ServiceKey, Table, TableError};

/// The programs, built by build.rs from ebpf/programs.
static PROGRAMS: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/socklb"));

/// A hook: the program's symbol and the name its link is pinned under.
pub struct Hook {
    pub program: &'static str,
    pub name: &'static str,
}

pub const HOOKS: [Hook; 10] = [
    Hook {
        program: "lb_connect4",
        name: "connect4",
    },
    Hook {
        program: "lb_connect6",
        name: "connect6",
    },
    Hook {
        program: "lb_sendmsg4",
        name: "sendmsg4",
    },
    Hook {
        program: "lb_sendmsg6",
        name: "sendmsg6",
    },
    Hook {
        program: "lb_recvmsg4",
        name: "recvmsg4",
    },
    Hook {
        program: "lb_recvmsg6",
        name: "recvmsg6",
    },
    Hook {
        program: "lb_getpeername4",
        name: "getpeername4",
    },
    Hook {
        program: "lb_getpeername6",
        name: "getpeername6",
    },
    Hook {
        program: "lb_getsockname4",
        name: "getsockname4",
    },
    Hook {
        program: "lb_getsockname6",
        name: "getsockname6",
    },
];

/// What `apply` changed.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct ApplySummary {
    pub added: usize,
    pub updated: usize,
    pub removed: usize,
    pub unchanged: usize,
}

/// A service as the maps hold it.
#[derive(Clone)]
struct Programmed {
    entry: socklb_common::Service,
    backends: Vec<Endpoint>,
}

/// How full a map is.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct MapUsage {
    pub map: &'static str,
    pub entries: usize,
    pub capacity: usize,
}

pub struct Datapath {
    ebpf: Ebpf,
    dir: PathBuf,
    links_dir: PathBuf,
    services: HashMap<MapData, socklb_common::ServiceKey, socklb_common::Service>,
    vips: HashMap<MapData, Addr, u8>,
    slots: HashMap<MapData, BackendSlotKey, Endpoint>,
    members: HashMap<MapData, MemberKey, u8>,
    stats: PerCpuArray<MapData, ServiceCounters>,
    guest_addrs: Array<MapData, Addr>,
    opt_out_cgroups: HashMap<MapData, u64, u8>,
    opt_out_count: Array<MapData, u32>,
    /// The cgroup the hooks are attached to, once they are.
    cgroup: Option<PathBuf>,
    sticky: HashMap<MapData, StickyKey, Sticky>,
    reverse: HashMap<MapData, ReverseKey, Endpoint>,
    /// Ids of the programmed services and their total backend slots, kept
    /// beside the maps so a write checks capacity without reading them all.
    used_ids: BTreeSet<u32>,
    /// Where the search for a free service id starts (see `free_ids`).
    next_service_id: u32,
    slot_count: usize,
    /// Services per VIP: a VIP stays in `VIPS` while it has one.
    services_per_vip: BTreeMap<Addr, usize>,
    log: Logger,
}

impl Datapath {
    /// Loads the programs into the kernel, adopting maps pinned under `dir`
    /// (creating and pinning them when absent).
    pub fn load(dir: &Path, log: &Logger) -> Result<Datapath> {
        let maps_dir = dir.join("maps");
        let links_dir = dir.join("links");
        for d in [&maps_dir, &links_dir] {
            fs::create_dir_all(d).with_context(|| format!("cannot create {}", d.display()))?;
        }
        check_pinned_layouts(&maps_dir)?;
        let mut ebpf = EbpfLoader::new()
            .default_map_pin_directory(&maps_dir)
            .load(PROGRAMS)
            .context("loading the eBPF object")?;
        for hook in &HOOKS {
            let program: &mut CgroupSockAddr = program(&mut ebpf, hook)?;
            program.load().with_context(|| {
                format!(
                    "the kernel refused the {} program (attach type cgroup/{}): it needs \
                     BPF_PROG_TYPE_CGROUP_SOCK_ADDR with that attach type",
                    hook.program, hook.name
                )
            })?;
        }
        let mut take = |name: &str| {
            ebpf.take_map(name)
                .ok_or_else(|| anyhow!("the eBPF object has no map {name}"))
        };
        let services = HashMap::try_from(take(map_names::SERVICES)?)?;
        let vips = HashMap::try_from(take(map_names::VIPS)?)?;
        let slots = HashMap::try_from(take(map_names::BACKEND_SLOTS)?)?;
        let members = HashMap::try_from(take(map_names::MEMBERS)?)?;
        let stats = PerCpuArray::try_from(take(map_names::SERVICE_STATS)?)?;
        let guest_addrs = Array::try_from(take(map_names::GUEST_ADDRS)?)?;
        let opt_out_cgroups = HashMap::try_from(take(map_names::OPT_OUT_CGROUPS)?)?;
        let opt_out_count = Array::try_from(take(map_names::OPT_OUT_COUNT)?)?;
        let sticky = HashMap::try_from(take(map_names::STICKY)?)?;
        let reverse = HashMap::try_from(take(map_names::REVERSE)?)?;
        let log = log.new(slog::o!("component" => "datapath"));
        let mut datapath = Datapath {
            ebpf,
            dir: dir.to_path_buf(),
            links_dir,
            services,
            vips,
            slots,
            members,
            stats,
            guest_addrs,
            opt_out_cgroups,
            opt_out_count,
            cgroup: None,
            sticky,
            reverse,
            used_ids: BTreeSet::new(),
            next_service_id: 0,
            slot_count: 0,
            services_per_vip: BTreeMap::new(),
            log,
        };
        let programmed = datapath.read_programmed()?;
        datapath.sweep_orphans(&programmed)?;
        datapath.used_ids = programmed.values().map(|p| p.entry.id).collect();
        datapath.next_service_id = datapath
            .used_ids
            .last()
            .map_or(0, |id| (id + 1) % MAX_SERVICES);
        datapath.slot_count = programmed.values().map(|p| p.backends.len()).sum();
        for key in programmed.keys() {
            *datapath.services_per_vip.entry(key.vip).or_default() += 1;
        }
        datapath.reconcile_vips()?;
        info!(datapath.log, "programs loaded"; "bpffs" => dir.display().to_string(),
              "adopted_services" => datapath.used_ids.len());
        Ok(datapath)
    }

    /// Attaches every hook to `cgroup` and pins its link, replacing the link
    /// an earlier agent pinned only once the new one is attached.
    pub fn attach(&mut self, cgroup: &Path) -> Result<()> {
        let cgroup_dir = fs::File::open(cgroup)
            .with_context(|| format!("cannot open cgroup {}", cgroup.display()))?;
        for hook in &HOOKS {
            let program: &mut CgroupSockAddr = program(&mut self.ebpf, hook)?;
            // A cgroup bpf_link always coexists with other links (the kernel
            // refuses attach flags on links), so the old and new programs
            // overlap for a moment: the first rewrites, the second passes.
            let link_id = program
                .attach(&cgroup_dir, CgroupAttachMode::Single)
                .with_context(|| {
                    format!(
                        "attaching {} to cgroup {} failed (the kernel needs CONFIG_CGROUP_BPF)",
                        hook.name,
                        cgroup.display()
                    )
                })?;
            let link: FdLink = program.take_link(link_id)?.try_into()?;
            let pin = self.links_dir.join(hook.name);
            // bpffs reserves names with dots for itself.
            let staged = self.links_dir.join(format!("{}_staged", hook.name));
            // A staged pin left by an agent that died mid-replacement holds a
            // duplicate link: dropping it detaches that duplicate.
            remove_if_present(&staged)?;
            link.pin(&staged)
                .with_context(|| format!("cannot pin link {}", staged.display()))?;
            let replaced = pin.exists();
            if replaced {
                let old = PinnedLink::from_pin(&pin)
                    .with_context(|| format!("cannot open pinned link {}", pin.display()))?;
                drop(old.unpin()?);
            }
            fs::rename(&staged, &pin).with_context(|| {
                format!("cannot rename {} to {}", staged.display(), pin.display())
            })?;
            info!(self.log, "attached"; "hook" => hook.name, "cgroup" => cgroup.display().to_string(),
                  "replaced_previous" => replaced);
        }
        self.cgroup = Some(cgroup.to_path_buf());
        Ok(())
    }

    /// The cgroup the hooks are attached to (opt-out paths are below it).
    pub fn attached_cgroup(&self) -> Option<&Path> {
        self.cgroup.as_deref()
    }

    /// Ids of the cgroups whose sockets are left untranslated.
    pub fn opt_out_cgroups(&self) -> Result<BTreeSet<u64>> {
        Ok(self.opt_out_cgroups.keys().collect::<Result<_, _>>()?)
    }

    /// Makes the opt-out cgroups exactly `ids`: new ones first, then the
    /// count the programs check, then the ones no longer wanted.
    pub fn set_opt_out_cgroups(&mut self, ids: &BTreeSet<u64>) -> Result<()> {
        let current = self.opt_out_cgroups()?;
        for id in ids.difference(&current) {
            self.opt_out_cgroups.insert(id, 1, 0)?;
        }
        self.opt_out_count.set(0, ids.len() as u32, 0)?;
        for id in current.difference(ids) {
            self.opt_out_cgroups.remove(id)?;
        }
        Ok(())
    }

    /// Makes the maps hold exactly `table`, or leaves them as they were: a
    /// table refused (capacity) changes nothing, and after a kernel error
    /// half way the previous table is written back.
    pub fn apply(&mut self, table: &Table) -> Result<ApplySummary> {
        let mut current = self.read_programmed()?;
        let before = current.clone();
        let mut wanted: BTreeMap<socklb_common::ServiceKey, Option<&Service>> =
            current.keys().map(|key| (*key, None)).collect();
        for service in &table.services {
            wanted.insert(map_key(&service.key), Some(service));
        }
        let summary = match self.write(wanted, &mut current) {
            Ok(summary) => summary,
            Err(err) if err.downcast_ref::<TableError>().is_some() => return Err(err),
            Err(err) => {
                return Err(match self.apply(&table_of(before)) {
                    Ok(_) => err.context("writing the table failed half way; the previous table is restored"),
                    Err(restore) => err.context(format!(
                        "writing the table failed half way and restoring the previous one failed too: {restore:#}"
                    )),
                });
            }
        };
        info!(self.log, "table applied"; "services" => table.services.len(),
              "added" => summary.added, "updated" => summary.updated,
              "removed" => summary.removed, "unchanged" => summary.unchanged);
        Ok(summary)
    }

    /// Adds or replaces `services` (validated each, distinct keys), leaving
    /// every other service as it is.
    pub fn upsert(&mut self, services: &[Service]) -> Result<ApplySummary> {
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
        self.write(wanted, &mut current)
    }

    /// Removes the services with `keys`; refuses all if one is unknown.
    pub fn delete(&mut self, keys: &[ServiceKey]) -> Result<ApplySummary> {
        let wanted: BTreeMap<_, Option<&Service>> =
            keys.iter().map(|key| (map_key(key), None)).collect();
        let mut current = self.read_some(wanted.keys())?;
        if let Some(missing) = keys.iter().find(|key| !current.contains_key(&map_key(key))) {
            return Err(TableError::UnknownService {
                key: missing.to_string(),
            }
            .into());
        }
        self.write(wanted, &mut current)
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
    ) -> Result<ApplySummary> {
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

        let mut free_ids = free_ids(&self.used_ids, self.next_service_id, added).into_iter();
        let mut changes = Vec::new();
        for (key, service) in wanted {
            let old = current.remove(&key);
            let Some(service) = service else {
                if let Some(old) = old {
                    self.remove(&key, &old)?;
                    summary.removed += 1;
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
        for (key, entry, backends, old) in changes {
            self.write_service(&key, entry, &backends, old)?;
        }
        Ok(summary)
    }

    /// The table as the maps hold it (names are not kept in the datapath).
    pub fn read_table(&self) -> Result<Table> {
        Ok(table_of(self.read_programmed()?))
    }

    pub fn service_count(&self) -> usize {
        self.used_ids.len()
    }

    /// Hooks whose link is pinned, i.e. attached.
    pub fn attached_hooks(&self) -> Vec<&'static str> {
        HOOKS
            .iter()
            .filter(|hook| self.links_dir.join(hook.name).exists())
            .map(|hook| hook.name)
            .collect()
    }

    pub fn hook_stats(&self) -> Result<Vec<HookStats>> {
        hook_stats(&self.dir)
    }

    /// Tells getsockname the guest's own addresses (see the programs'
    /// `local_view`); `None` clears a family.
    pub fn set_guest_addrs(&mut self, v4: Option<Ipv4Addr>, v6: Option<Ipv6Addr>) -> Result<()> {
        let v4 = v4.map_or([0; 4], |ip| addr_words(IpAddr::V4(ip)));
        let v6 = v6.map_or([0; 4], |ip| addr_words(IpAddr::V6(ip)));
        self.guest_addrs.set(GUEST_ADDR_V4, v4, 0)?;
        self.guest_addrs.set(GUEST_ADDR_V6, v6, 0)?;
        Ok(())
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
            .slots
            .keys()
            .filter_map(|key| key.ok())
            .filter(|key| {
                live.get(&key.service_id)
                    .is_none_or(|p| key.slot > p.entry.backend_count)
            })
            .collect();
        for key in &orphan_slots {
            self.slots.remove(key)?;
        }
        let members: HashSet<MemberKey> = self.members.keys().filter_map(|key| key.ok()).collect();
        let orphan_members: Vec<&MemberKey> = members
            .iter()
            .filter(|key| {
                live.get(&key.service_id)
                    .is_none_or(|p| !p.backends.contains(&key.backend))
            })
            .collect();
        for key in &orphan_members {
            self.members.remove(key)?;
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
            self.members.insert(key, 1, 0)?;
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
        let pinned: Vec<Addr> = self.vips.keys().collect::<Result<_, _>>()?;
        for vip in pinned
            .iter()
            .filter(|vip| !self.services_per_vip.contains_key(*vip))
        {
            self.vips.remove(vip)?;
        }
        for vip in self.services_per_vip.keys() {
            if !pinned.contains(vip) {
                self.vips.insert(vip, 1, 0)?;
            }
        }
        Ok(())
    }

    fn read_programmed(&self) -> Result<BTreeMap<socklb_common::ServiceKey, Programmed>> {
        let mut programmed = BTreeMap::new();
        for item in self.services.iter() {
            let (key, entry) = item.context("reading the services map")?;
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
                let zero =
                    vec![ServiceCounters::default(); aya::util::nr_cpus().map_err(|(_, e)| e)?];
                self.stats.set(entry.id, PerCpuValues::try_from(zero)?, 0)?;
                // The VIP before the entry: a VIP missing from `VIPS` passes
                // untranslated whatever `SERVICES` holds.
                self.vips.insert(key.vip, 1, 0)?;
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
            self.members.insert(member(*backend), 1, 0)?;
        }
        for (index, backend) in backends.iter().enumerate() {
            if old_backends.get(index) != Some(backend) {
                let slot = BackendSlotKey {
                    service_id: entry.id,
                    slot: index as u32 + 1,
                };
                self.slots.insert(slot, backend, 0)?;
            }
        }
        if old_entry != Some(entry) {
            if let Err(err) = self.services.insert(key, entry, 0) {
                if is_new && !self.services_per_vip.contains_key(&key.vip) {
                    // Best effort: a VIP left in `VIPS` without a service
                    // would refuse its connects until the next agent start.
                    let _ = self.vips.remove(&key.vip);
                }
                return Err(err.into());
            }
            if is_new {
                *self.services_per_vip.entry(key.vip).or_default() += 1;
            }
        }
        for slot in backends.len() + 1..=old_backends.len() {
            self.slots.remove(&BackendSlotKey {
                service_id: entry.id,
                slot: slot as u32,
            })?;
        }
        for backend in old_set.difference(&new_set) {
            self.members.remove(&member(*backend))?;
        }
        self.used_ids.insert(entry.id);
        self.slot_count = self.slot_count + backends.len() - old_backends.len();
        Ok(())
    }

    fn remove(&mut self, key: &socklb_common::ServiceKey, programmed: &Programmed) -> Result<()> {
        let id = programmed.entry.id;
        self.services.remove(key)?;
        if let Some(count) = self.services_per_vip.get_mut(&key.vip) {
            *count -= 1;
            if *count == 0 {
                self.services_per_vip.remove(&key.vip);
                self.vips.remove(&key.vip)?;
            }
        }
        for slot in 1..=programmed.entry.backend_count {
            self.slots.remove(&BackendSlotKey {
                service_id: id,
                slot,
            })?;
        }
        for backend in &programmed.backends {
            self.members.remove(&MemberKey {
                service_id: id,
                backend: *backend,
            })?;
        }
        self.used_ids.remove(&id);
        self.slot_count -= programmed.backends.len();
        Ok(())
    }

    /// The programmed state of the services with `keys` (absent ones left out).
    fn read_some<'k>(
        &self,
        keys: impl Iterator<Item = &'k socklb_common::ServiceKey>,
    ) -> Result<BTreeMap<socklb_common::ServiceKey, Programmed>> {
        let mut programmed = BTreeMap::new();
        for key in keys {
            match self.services.get(key, 0) {
                Ok(entry) => {
                    programmed.insert(*key, self.read_backends(key, &entry)?);
                }
                Err(aya::maps::MapError::KeyNotFound) => {}
                Err(err) => return Err(err.into()),
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
                self.slots
                    .get(
                        &BackendSlotKey {
                            service_id: entry.id,
                            slot,
                        },
                        0,
                    )
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

    /// Translations and rejects per service, summed over CPUs.
    pub fn service_stats(&self) -> Result<Vec<(ServiceKey, ServiceCounters)>> {
        let mut stats = Vec::new();
        for item in self.services.iter() {
            let (key, entry) = item?;
            let per_cpu = self.stats.get(&entry.id, 0)?;
            let total = per_cpu
                .iter()
                .fold(ServiceCounters::default(), |sum, c| ServiceCounters {
                    translations: sum.translations + c.translations,
                    rejects: sum.rejects + c.rejects,
                    insert_failures: sum.insert_failures + c.insert_failures,
                });
            stats.push((table_key(&key), total));
        }
        stats.sort_by_key(|(key, _)| *key);
        Ok(stats)
    }

    /// Entries in use and capacity of each map that fills up.
    pub fn map_usage(&self) -> Vec<MapUsage> {
        vec![
            MapUsage {
                map: map_names::SERVICES,
                entries: self.used_ids.len(),
                capacity: MAX_SERVICES as usize,
            },
            MapUsage {
                map: map_names::VIPS,
                entries: self.services_per_vip.len(),
                capacity: MAX_VIPS as usize,
            },
            MapUsage {
                map: map_names::BACKEND_SLOTS,
                entries: self.slot_count,
                capacity: MAX_BACKEND_SLOTS as usize,
            },
            MapUsage {
                map: map_names::MEMBERS,
                entries: self.slot_count,
                capacity: MAX_BACKEND_SLOTS as usize,
            },
            MapUsage {
                map: map_names::STICKY,
                entries: self.sticky.keys().count(),
                capacity: STICKY_ENTRIES as usize,
            },
            MapUsage {
                map: map_names::REVERSE,
                entries: self.reverse.keys().count(),
                capacity: REVERSE_ENTRIES as usize,
            },
        ]
    }
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

/// Removes every link and map socklb pinned under `dir`; dropping the links
/// detaches the programs from their cgroup.
pub fn detach(dir: &Path, log: &Logger) -> Result<()> {
    if !dir.exists() {
        info!(log, "nothing pinned"; "bpffs" => dir.display().to_string());
        return Ok(());
    }
    for sub in ["links", "maps"] {
        let sub = dir.join(sub);
        if !sub.exists() {
            continue;
        }
        for entry in fs::read_dir(&sub).with_context(|| format!("cannot list {}", sub.display()))? {
            let path = entry?.path();
            fs::remove_file(&path).with_context(|| format!("cannot unpin {}", path.display()))?;
            info!(log, "unpinned"; "pin" => path.display().to_string());
        }
        fs::remove_dir(&sub).with_context(|| format!("cannot remove {}", sub.display()))?;
    }
    fs::remove_dir(dir).with_context(|| format!("cannot remove {}", dir.display()))?;
    Ok(())
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

/// Turns on the kernel's BPF run-time accounting until the returned file
/// descriptor closes. It costs two clock reads per program run.
pub fn enable_run_time_stats() -> Result<std::os::fd::OwnedFd> {
    aya::sys::enable_stats(aya::sys::Stats::RunTime)
        .context("enabling BPF run-time stats (BPF_ENABLE_STATS)")
}

fn program<'a>(ebpf: &'a mut Ebpf, hook: &Hook) -> Result<&'a mut CgroupSockAddr> {
    ebpf.program_mut(hook.program)
        .ok_or_else(|| anyhow!("the eBPF object has no program {}", hook.program))?
        .try_into()
        .with_context(|| format!("{} is not a cgroup sock_addr program", hook.program))
}

fn remove_if_present(path: &Path) -> Result<()> {
    match fs::remove_file(path) {
        Err(err) if err.kind() != std::io::ErrorKind::NotFound => {
            Err(err).with_context(|| format!("cannot remove {}", path.display()))
        }
        _ => Ok(()),
    }
}

/// Refuses pinned maps whose layout differs from this build's (an agent of
/// another version left them): adopting them would misread every entry.
fn check_pinned_layouts(maps_dir: &Path) -> Result<()> {
    use std::mem::size_of;
    let layouts = [
        (
            map_names::SERVICES,
            size_of::<socklb_common::ServiceKey>(),
            size_of::<socklb_common::Service>(),
        ),
        (map_names::VIPS, size_of::<Addr>(), size_of::<u8>()),
        (
            map_names::BACKEND_SLOTS,
            size_of::<BackendSlotKey>(),
            size_of::<Endpoint>(),
        ),
        (map_names::MEMBERS, size_of::<MemberKey>(), size_of::<u8>()),
        (
            map_names::STICKY,
            size_of::<StickyKey>(),
            size_of::<Sticky>(),
        ),
        (
            map_names::REVERSE,
            size_of::<ReverseKey>(),
            size_of::<Endpoint>(),
        ),
        (
            map_names::SERVICE_STATS,
            size_of::<u32>(),
            size_of::<ServiceCounters>(),
        ),
        (map_names::GUEST_ADDRS, size_of::<u32>(), size_of::<Addr>()),
        (
            map_names::OPT_OUT_CGROUPS,
            size_of::<u64>(),
            size_of::<u8>(),
        ),
        (map_names::OPT_OUT_COUNT, size_of::<u32>(), size_of::<u32>()),
    ];
    for (name, key_size, value_size) in layouts {
        let path = maps_dir.join(name);
        if !path.exists() {
            continue;
        }
        let info = MapInfo::from_pin(&path)
            .with_context(|| format!("cannot open pinned map {}", path.display()))?;
        if (info.key_size() as usize, info.value_size() as usize) != (key_size, value_size) {
            bail!(
                "pinned map {} has key/value sizes {}/{}, this agent needs {key_size}/{value_size}: \
                 remove the old datapath with `socklb-agent --detach --bpffs {}` first",
                path.display(),
                info.key_size(),
                info.value_size(),
                maps_dir.parent().unwrap_or(maps_dir).display()
            );
        }
    }
    Ok(())
}

/// An address as the programs see it (v4 as v4-mapped).
pub fn addr_words(ip: IpAddr) -> Addr {
    match ip {
        IpAddr::V4(v4) => v4_mapped(u32::from_ne_bytes(v4.octets())),
        IpAddr::V6(v6) => {
            let o = v6.octets();
            std::array::from_fn(|i| {
                u32::from_ne_bytes([o[4 * i], o[4 * i + 1], o[4 * i + 2], o[4 * i + 3]])
            })
        }
    }
}

fn ip_of(addr: &Addr) -> IpAddr {
    if is_v4_mapped(addr) {
        IpAddr::V4(Ipv4Addr::from(addr[3].to_ne_bytes()))
    } else {
        let mut octets = [0u8; 16];
        for (i, word) in addr.iter().enumerate() {
            octets[4 * i..4 * i + 4].copy_from_slice(&word.to_ne_bytes());
        }
        IpAddr::V6(Ipv6Addr::from(octets))
    }
}

fn endpoint(addr: &SocketAddr) -> Endpoint {
    Endpoint {
        addr: addr_words(addr.ip()),
        port: addr.port().to_be(),
        _pad: 0,
    }
}

fn socket_addr(endpoint: &Endpoint) -> SocketAddr {
    SocketAddr::new(ip_of(&endpoint.addr), u16::from_be(endpoint.port))
}

/// Programmed services as a table (without names: the maps keep none).
fn table_of(programmed: BTreeMap<socklb_common::ServiceKey, Programmed>) -> Table {
    let services = programmed
        .into_iter()
        .map(|(key, programmed)| Service {
            name: None,
            key: table_key(&key),
            affinity_timeout_secs: match programmed.entry.affinity_timeout_secs {
                0 => None,
                secs => Some(secs),
            },
            backends: programmed.backends.iter().map(socket_addr).collect(),
        })
        .collect();
    Table { services }
}

fn map_key(key: &ServiceKey) -> socklb_common::ServiceKey {
    socklb_common::ServiceKey {
        vip: addr_words(key.vip),
        port: key.port.to_be(),
        proto: key.protocol.number(),
        _pad: 0,
    }
}

fn table_key(key: &socklb_common::ServiceKey) -> ServiceKey {
    ServiceKey {
        vip: ip_of(&key.vip),
        port: u16::from_be(key.port),
        protocol: if key.proto == socklb_common::PROTO_UDP {
            Protocol::Udp
        } else {
            Protocol::Tcp
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

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

    #[test]
    fn keys_round_trip() {
        for text in [
            "10.96.0.20:80",
            "[fd00::a]:53",
            "[::1]:1",
            "127.0.0.1:65535",
        ] {
            let addr: SocketAddr = text.parse().unwrap();
            assert_eq!(socket_addr(&endpoint(&addr)), addr);
            let key = ServiceKey {
                vip: addr.ip(),
                port: addr.port(),
                protocol: Protocol::Udp,
            };
            assert_eq!(table_key(&map_key(&key)), key);
        }
    }

    #[test]
    fn v4_is_stored_v4_mapped_in_network_order() {
        let words = addr_words("10.96.0.20".parse().unwrap());
        let v6: Ipv6Addr = "::ffff:10.96.0.20".parse().unwrap();
        assert_eq!(words, addr_words(IpAddr::V6(v6)));
        assert_eq!(words[3].to_ne_bytes(), [10, 96, 0, 20]);
    }
}
