//! The forward hooks' traced twins, swapped into the hooks' pinned links
//! while a tracer is attached and out when the last one leaves. Each swap
//! is one BPF_LINK_UPDATE, atomic for the sockets connecting meanwhile,
//! and names the program it expects to replace: an agent only ever swaps
//! its own programs, never those of a later agent that took the links
//! over (an in-place upgrade).

use std::{
    ffi::CString,
    io,
    os::{
        fd::{AsFd as _, AsRawFd as _, FromRawFd as _, OwnedFd},
        unix::ffi::OsStrExt as _,
    },
    path::{Path, PathBuf},
};

use anyhow::{Context as _, Result, bail};
use aya::programs::{
    ProgramFd,
    links::{FdLink, PinnedLink},
};
use aya_obj::generated::{BPF_F_REPLACE, bpf_attr, bpf_cmd};

/// A loaded program: its descriptor, to swap it in, and its id, to tell
/// it in a link.
pub(super) struct Program {
    pub(super) fd: ProgramFd,
    pub(super) id: u32,
}

/// One forward hook: its pinned link and its two programs.
pub(super) struct Twin {
    pub(super) hook: &'static str,
    pub(super) link_pin: PathBuf,
    pub(super) plain: Program,
    pub(super) traced: Program,
}

/// Every forward hook's twins.
pub(super) struct TracedTwins(pub(super) Vec<Twin>);

impl TracedTwins {
    /// Makes every forward hook's link run its traced twin (`traced`) or
    /// its plain program; a link already running the wanted program is
    /// left as it is. Swapping the twins in is all or none: a refused swap
    /// puts back the ones this call made. Swapping them out goes as far as
    /// it can, so a refusal on one hook leaves no other traced.
    pub(super) fn run_traced(&self, traced: bool) -> Result<()> {
        let mut swapped = Vec::new();
        let mut refused = Vec::new();
        for twin in &self.0 {
            match twin.swap(traced) {
                Ok(true) => swapped.push(twin),
                Ok(false) => {}
                Err(err) if traced => {
                    let put_back: Vec<String> = swapped
                        .iter()
                        .filter_map(|done| done.swap(false).err())
                        .map(|back| format!("{back:#}"))
                        .collect();
                    if put_back.is_empty() {
                        return Err(err);
                    }
                    bail!(
                        "{err:#}; putting the twins back failed too: {}",
                        put_back.join("; ")
                    );
                }
                Err(err) => refused.push(format!("{err:#}")),
            }
        }
        if !refused.is_empty() {
            bail!("{}", refused.join("; "));
        }
        Ok(())
    }
}

impl Twin {
    /// Swaps the traced twin (`traced`) or the plain program into the
    /// link; false if it ran that one already.
    fn swap(&self, traced: bool) -> Result<bool> {
        let (from, to) = if traced {
            (&self.plain, &self.traced)
        } else {
            (&self.traced, &self.plain)
        };
        let running = FdLink::from(
            PinnedLink::from_pin(&self.link_pin)
                .with_context(|| format!("cannot open pinned link {}", self.link_pin.display()))?,
        )
        .info()
        .with_context(|| format!("cannot read the {} link's program", self.hook))?
        .program_id();
        if running == to.id {
            return Ok(false);
        }
        if running != from.id {
            bail!(
                "the {} link runs program {running}, neither of this agent's ({} or {}): \
                 a later agent's?",
                self.hook,
                self.plain.id,
                self.traced.id
            );
        }
        replace_program(&self.link_pin, from, to).with_context(|| {
            format!(
                "cannot swap the {} program {} its traced twin",
                self.hook,
                if traced { "for" } else { "back from" }
            )
        })?;
        Ok(true)
    }
}

/// Swaps the program of the link pinned at `pin` from `from` to `to`; the
/// kernel refuses if the link no longer runs `from`.
fn replace_program(pin: &Path, from: &Program, to: &Program) -> Result<()> {
    let link = open_pin(pin)?;
    let mut attr = zeroed_attr();
    attr.link_update.link_fd = link.as_raw_fd() as u32;
    attr.link_update.__bindgen_anon_1.new_prog_fd = to.fd.as_fd().as_raw_fd() as u32;
    attr.link_update.__bindgen_anon_2.old_prog_fd = from.fd.as_fd().as_raw_fd() as u32;
    attr.link_update.flags = BPF_F_REPLACE;
    bpf(bpf_cmd::BPF_LINK_UPDATE, &mut attr).with_context(|| {
        format!(
            "BPF_LINK_UPDATE of {} (EPERM: its program changed meanwhile, or a security \
             module forbids it)",
            pin.display()
        )
    })?;
    Ok(())
}

/// A descriptor of the object pinned at `pin` (BPF_OBJ_GET): aya's
/// `FdLink` does not lend its own.
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
