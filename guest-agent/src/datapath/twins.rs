//! The forward hooks' traced twins, swapped into the hooks' pinned links
//! while a tracer is attached and out when the last one leaves. Each swap
//! is one BPF_LINK_UPDATE, atomic for the sockets connecting meanwhile,
//! and names the program it expects to replace: the kernel refuses it if
//! the link runs another (a later agent's, after an in-place upgrade), so
//! an agent only ever swaps its own programs.

use std::{
    ffi::CString,
    io,
    os::{
        fd::{AsFd as _, AsRawFd as _, FromRawFd as _, OwnedFd},
        unix::ffi::OsStrExt as _,
    },
    path::{Path, PathBuf},
};

use anyhow::{Context as _, Result, anyhow};
use aya::programs::ProgramFd;
use aya_obj::generated::{BPF_F_REPLACE, bpf_attr, bpf_cmd};

/// One forward hook: its pinned link and its two programs.
struct Twin {
    hook: &'static str,
    link_pin: PathBuf,
    plain: ProgramFd,
    traced: ProgramFd,
}

/// Which of each forward hook's programs its link runs, and the swap.
pub struct TracedTwins {
    twins: Vec<Twin>,
    traced: bool,
}

impl TracedTwins {
    /// `twins`: each forward hook's name, link pin and (plain, traced)
    /// programs; the links run the plain ones (as `Datapath::attach`
    /// leaves them).
    pub(super) fn new(twins: Vec<(&'static str, PathBuf, ProgramFd, ProgramFd)>) -> TracedTwins {
        TracedTwins {
            twins: twins
                .into_iter()
                .map(|(hook, link_pin, plain, traced)| Twin {
                    hook,
                    link_pin,
                    plain,
                    traced,
                })
                .collect(),
            traced: false,
        }
    }

    /// Makes every forward hook's link run its traced twin (`traced`) or
    /// its plain program; all or none: a refused swap puts back the ones
    /// already made.
    pub fn run_traced(&mut self, traced: bool) -> Result<()> {
        if traced == self.traced {
            return Ok(());
        }
        let step = |twin: &Twin, traced: bool| {
            let (from, to) = if traced {
                (&twin.plain, &twin.traced)
            } else {
                (&twin.traced, &twin.plain)
            };
            replace_program(&twin.link_pin, from, to).with_context(|| {
                format!(
                    "cannot swap the {} program {} its traced twin in {}",
                    twin.hook,
                    if traced { "for" } else { "back from" },
                    twin.link_pin.display()
                )
            })
        };
        for (done, twin) in self.twins.iter().enumerate() {
            if let Err(err) = step(twin, traced) {
                for swapped in &self.twins[..done] {
                    // Best effort: the error names the hook that failed.
                    let _ = step(swapped, !traced);
                }
                return Err(err);
            }
        }
        self.traced = traced;
        Ok(())
    }
}

/// Swaps the program of the link pinned at `pin` from `from` to `to`.
fn replace_program(pin: &Path, from: &ProgramFd, to: &ProgramFd) -> Result<()> {
    let link = open_pin(pin)?;
    let mut attr = zeroed_attr();
    attr.link_update.link_fd = link.as_raw_fd() as u32;
    attr.link_update.__bindgen_anon_1.new_prog_fd = to.as_fd().as_raw_fd() as u32;
    attr.link_update.__bindgen_anon_2.old_prog_fd = from.as_fd().as_raw_fd() as u32;
    attr.link_update.flags = BPF_F_REPLACE;
    match bpf(bpf_cmd::BPF_LINK_UPDATE, &mut attr) {
        Ok(_) => Ok(()),
        Err(err) if err.raw_os_error() == Some(libc::EPERM) => Err(anyhow!(
            "the link runs another program than this agent's (a later agent's?)"
        )),
        Err(err) => Err(anyhow::Error::from(err).context("BPF_LINK_UPDATE")),
    }
}

/// A descriptor of the object pinned at `pin` (BPF_OBJ_GET).
fn open_pin(pin: &Path) -> Result<OwnedFd> {
    let path = CString::new(pin.as_os_str().as_bytes())
        .with_context(|| format!("{} holds a NUL byte", pin.display()))?;
    let mut attr = zeroed_attr();
    // bindgen's name for the BPF_OBJ_PIN/BPF_OBJ_GET member.
    attr.__bindgen_anon_4.pathname = path.as_ptr() as u64;
    let fd = bpf(bpf_cmd::BPF_OBJ_GET, &mut attr)
        .with_context(|| format!("cannot open pinned link {}", pin.display()))?;
    // SAFETY: BPF_OBJ_GET answered a new descriptor, owned by nobody else.
    Ok(unsafe { OwnedFd::from_raw_fd(fd as i32) })
}

fn zeroed_attr() -> bpf_attr {
    // SAFETY: bpf_attr is a union of plain integers; all zeroes is what the
    // kernel expects in every field a command does not use.
    unsafe { std::mem::zeroed() }
}

fn bpf(cmd: bpf_cmd, attr: &mut bpf_attr) -> io::Result<i64> {
    // SAFETY: `attr` is a whole bpf_attr, valid for the call, with the
    // command's fields set and the rest zero.
    let ret = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            cmd as libc::c_int,
            attr as *mut bpf_attr,
            std::mem::size_of::<bpf_attr>(),
        )
    };
    if ret < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(ret)
    }
}
