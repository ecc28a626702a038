//! The eBPF datapath. This file owns its lifecycle: load the programs,
//! adopt pinned maps (refusing another layout), attach and pin links,
//! detach. `maps` is the boundary under table programming (the kernel's
//! maps, or the same contract in memory), `program` writes service tables
//! into them: `ledger` counts what they hold, `plan` works out a write
//! without touching them, `program` runs it. `stats` reads counters and
//! usage back, `convert` maps the table's types to the maps'. `trace` reads
//! the hooks' decisions for tracers, and `twins` swaps in the programs that
//! write them.
//!
//! Pins under the bpffs directory `DIR`:
//! - `DIR/maps/<MAP>`: every map; a later agent adopts them as they are.
//! - `DIR/links/<hook>`: one link per hook; it keeps the program attached
//!   while no agent runs. A later agent attaches its own programs first and
//!   only then drops the old links, so no connect goes untranslated.

mod convert;
mod ledger;
mod maps;
mod plan;
mod program;
mod stats;
mod trace;
mod twins;

use std::{
    collections::BTreeSet,
    fs,
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
    os::fd::{AsFd as _, OwnedFd},
    path::{Path, PathBuf},
};

use anyhow::{Context as _, Result, anyhow, bail};
use aya::{
    Ebpf, EbpfLoader,
    maps::{Array, HashMap, Map, MapData, MapInfo, PerCpuArray, RingBuf},
    programs::{
        CgroupAttachMode, CgroupSockAddr,
        links::{FdLink, PinnedLink},
    },
};
use slog::{Logger, info};
use socklb_common::{Addr, GUEST_ADDR_V4, GUEST_ADDR_V6, MAP_LAYOUTS, MapLayout, map_names};

#[cfg(test)]
pub(crate) use convert::translation_bytes;
pub use convert::{addr_words, translation_from_bytes};
pub use maps::{TableMaps, WriteFaults};
pub use plan::ApplySummary;
pub use program::ProgrammedTable;
pub use stats::{HookStats, MapUsage, enable_run_time_stats, hook_stats, lru_usage};
pub use trace::{Attached, Decision, DecisionCounts, TraceMaps, Tracer};
use twins::{Program, TracedTwins, Twin};

/// The programs, built by build.rs from ebpf/programs.
static PROGRAMS: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/socklb"));

/// A hook: the program's symbol, the name its link is pinned under, and
/// (forward hooks) the traced twin's symbol.
pub struct Hook {
    pub program: &'static str,
    pub name: &'static str,
    pub traced: Option<&'static str>,
}

pub const HOOKS: [Hook; 10] = [
    Hook {
        program: "lb_connect4",
        name: "connect4",
        traced: Some("traced_connect4"),
    },
    Hook {
        program: "lb_connect6",
        name: "connect6",
        traced: Some("traced_connect6"),
    },
    Hook {
        program: "lb_sendmsg4",
        name: "sendmsg4",
        traced: Some("traced_sendmsg4"),
    },
    Hook {
        program: "lb_sendmsg6",
        name: "sendmsg6",
        traced: Some("traced_sendmsg6"),
    },
    Hook {
        program: "lb_recvmsg4",
        name: "recvmsg4",
        traced: None,
    },
    Hook {
        program: "lb_recvmsg6",
        name: "recvmsg6",
        traced: None,
    },
    Hook {
        program: "lb_getpeername4",
        name: "getpeername4",
        traced: None,
    },
    Hook {
        program: "lb_getpeername6",
        name: "getpeername6",
        traced: None,
    },
    Hook {
        program: "lb_getsockname4",
        name: "getsockname4",
        traced: None,
    },
    Hook {
        program: "lb_getsockname6",
        name: "getsockname6",
        traced: None,
    },
];

pub struct Datapath {
    ebpf: Ebpf,
    dir: PathBuf,
    links_dir: PathBuf,
    guest_addrs: Array<MapData, Addr>,
    opt_out_cgroups: HashMap<MapData, u64, u8>,
    opt_out_count: Array<MapData, u32>,
    /// The cgroup the hooks are attached to, once they are.
    cgroup: Option<PathBuf>,
    log: Logger,
}

impl Datapath {
    /// Loads the programs into the kernel, adopting maps pinned under `dir`
    /// (creating and pinning them when absent), and the table they hold.
    pub fn load(dir: &Path, log: &Logger) -> Result<(Datapath, ProgrammedTable)> {
        let maps_dir = dir.join("maps");
        let links_dir = dir.join("links");
        for d in [&maps_dir, &links_dir] {
            fs::create_dir_all(d).with_context(|| format!("cannot create {}", d.display()))?;
        }
        retire_maps(&maps_dir, log)?;
        check_pinned_layouts(&maps_dir)?;
        let mut ebpf = EbpfLoader::new()
            .default_map_pin_directory(&maps_dir)
            .load(PROGRAMS)
            .context("loading the eBPF object")?;
        for hook in &HOOKS {
            for symbol in std::iter::once(hook.program).chain(hook.traced) {
                let program: &mut CgroupSockAddr = program(&mut ebpf, symbol)?;
                program.load().with_context(|| {
                    format!(
                        "the kernel refused the {symbol} program (attach type cgroup/{}): it \
                         needs BPF_PROG_TYPE_CGROUP_SOCK_ADDR with that attach type",
                        hook.name
                    )
                })?;
            }
        }
        let mut take = |name: &str| {
            ebpf.take_map(name)
                .ok_or_else(|| anyhow!("the eBPF object has no map {name}"))
        };
        let maps = TableMaps::kernel(
            HashMap::try_from(take(map_names::SERVICES)?)?,
            HashMap::try_from(take(map_names::VIPS)?)?,
            HashMap::try_from(take(map_names::BACKEND_SLOTS)?)?,
            HashMap::try_from(take(map_names::MEMBERS)?)?,
            PerCpuArray::try_from(take(map_names::SERVICE_COUNTERS)?)?,
        );
        let guest_addrs = Array::try_from(take(map_names::GUEST_ADDRS)?)?;
        let opt_out_cgroups = HashMap::try_from(take(map_names::OPT_OUT_CGROUPS)?)?;
        let opt_out_count = Array::try_from(take(map_names::OPT_OUT_COUNT)?)?;
        let log = log.new(slog::o!("component" => "datapath"));
        let table = ProgrammedTable::adopt(maps, &log)?;
        info!(log, "programs loaded"; "bpffs" => dir.display().to_string(),
              "adopted_services" => table.service_count());
        let datapath = Datapath {
            ebpf,
            dir: dir.to_path_buf(),
            links_dir,
            guest_addrs,
            opt_out_cgroups,
            opt_out_count,
            cgroup: None,
            log,
        };
        Ok((datapath, table))
    }

    /// Attaches every hook to `cgroup` and pins its link, replacing the link
    /// an earlier agent pinned only once the new one is attached.
    pub fn attach(&mut self, cgroup: &Path) -> Result<()> {
        let cgroup_dir = fs::File::open(cgroup)
            .with_context(|| format!("cannot open cgroup {}", cgroup.display()))?;
        for hook in &HOOKS {
            let program: &mut CgroupSockAddr = program(&mut self.ebpf, hook.program)?;
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

    /// The maps the hooks trace through and the traced twins (see `trace`,
    /// `twins`), once: the tracer owns them.
    pub fn take_trace_maps(&mut self) -> Result<TraceMaps> {
        let mut twins = Vec::new();
        for hook in &HOOKS {
            if let Some(traced) = hook.traced {
                let mut loaded = |symbol| -> Result<Program> {
                    let program = program(&mut self.ebpf, symbol)?;
                    Ok(Program {
                        fd: program.fd()?.try_clone()?,
                        id: program.info()?.id(),
                    })
                };
                twins.push(Twin {
                    hook: hook.name,
                    link_pin: self.links_dir.join(hook.name),
                    plain: loaded(hook.program)?,
                    traced: loaded(traced)?,
                });
            }
        }
        let mut take = |name: &str| {
            self.ebpf
                .take_map(name)
                .ok_or_else(|| anyhow!("the eBPF object has no map {name} (taken already?)"))
        };
        Ok(TraceMaps {
            events: RingBuf::try_from(take(map_names::TRACE_EVENTS)?)?,
            config: Array::try_from(take(map_names::TRACE_CONFIG)?)?,
            budget: PerCpuArray::try_from(take(map_names::TRACE_BUDGET)?)?,
            decisions: PerCpuArray::try_from(take(map_names::DECISIONS)?)?,
            twins: TracedTwins(twins),
        })
    }

    /// The cgroup the hooks are attached to (opt-out paths are below it).
    pub fn attached_cgroup(&self) -> Option<&Path> {
        self.cgroup.as_deref()
    }

    /// A descriptor of `CONNECTED_VIP`, whose value for each socket a
    /// sock_diag dump carries when asked with it (see `sockets`).
    pub fn connected_vip_map(&self) -> Result<OwnedFd> {
        let name = map_names::CONNECTED_VIP;
        match self.ebpf.map(name) {
            Some(Map::SkStorage(map)) => Ok(map.fd().as_fd().try_clone_to_owned()?),
            Some(_) => bail!("the eBPF object's {name} is no socket storage map"),
            None => bail!("the eBPF object has no map {name}"),
        }
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

    /// Hooks whose link is pinned, i.e. attached.
    pub fn attached_hooks(&self) -> Vec<&'static str> {
        HOOKS
            .iter()
            .filter(|hook| self.links_dir.join(hook.name).exists())
            .map(|hook| hook.name)
            .collect()
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

fn program<'a>(ebpf: &'a mut Ebpf, symbol: &str) -> Result<&'a mut CgroupSockAddr> {
    ebpf.program_mut(symbol)
        .ok_or_else(|| anyhow!("the eBPF object has no program {symbol}"))?
        .try_into()
        .with_context(|| format!("{symbol} is not a cgroup sock_addr program"))
}

fn remove_if_present(path: &Path) -> Result<()> {
    match fs::remove_file(path) {
        Err(err) if err.kind() != std::io::ErrorKind::NotFound => {
            Err(err).with_context(|| format!("cannot remove {}", path.display()))
        }
        _ => Ok(()),
    }
}

/// Maps earlier agents pinned whose data this one does not take over, with
/// what replaced them. Their pins are removed at load, so an agent upgraded
/// in place starts (programs still attached keep using the old map until
/// their links are replaced).
const RETIRED_MAPS: [(&str, &str); 3] = [
    (
        "SERVICE_STATS",
        "per-service counters, now SERVICE_COUNTERS with failed inserts",
    ),
    (
        "REVERSE",
        "translations by socket cookie, now socket-local CONNECTED_VIP and DATAGRAM_VIPS",
    ),
    (
        "STICKY",
        "affinity and UDP socket choices, now AFFINITY and socket-local DATAGRAM_VIPS",
    ),
];

fn retire_maps(maps_dir: &Path, log: &Logger) -> Result<()> {
    for (name, replaced_by) in RETIRED_MAPS {
        let pin = maps_dir.join(name);
        if pin.exists() {
            fs::remove_file(&pin)
                .with_context(|| format!("cannot remove the retired map {}", pin.display()))?;
            info!(log, "removed a map an earlier agent pinned"; "map" => name,
                  "replaced_by" => replaced_by);
        }
    }
    Ok(())
}

/// Refuses pinned maps whose layout differs from this build's (an agent of
/// another version left them): adopting them would misread every entry.
fn check_pinned_layouts(maps_dir: &Path) -> Result<()> {
    for MapLayout {
        name,
        key_size,
        value_size,
    } in MAP_LAYOUTS
    {
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_programs_declare_the_maps_of_the_layout_table() {
        let object = aya_obj::Object::parse(PROGRAMS).unwrap();
        // Sections the loader turns into maps (.rodata, .bss) are not ours.
        let mut built: Vec<_> = object
            .maps
            .iter()
            .filter(|(name, _)| !name.starts_with('.'))
            .map(|(name, map)| {
                let sizes = (map.key_size() as usize, map.value_size() as usize);
                (name.clone(), sizes)
            })
            .collect();
        built.sort();
        let mut table: Vec<_> = MAP_LAYOUTS
            .iter()
            .map(|layout| {
                (
                    layout.name.to_string(),
                    (layout.key_size, layout.value_size),
                )
            })
            .collect();
        table.sort();
        assert_eq!(built, table);
    }
}
