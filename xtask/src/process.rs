//! Running commands, and where the workspace and its build output are.

use std::{
    path::{Path, PathBuf},
    process::Command,
    sync::OnceLock,
    time::Instant,
};

use anyhow::{Context as _, Result, bail};

struct Workspace {
    root: PathBuf,
    target: PathBuf,
}

/// The workspace root and target directory, as cargo reports them (a
/// CARGO_TARGET_DIR or build.target-dir moves the latter).
fn workspace() -> &'static Workspace {
    static WORKSPACE: OnceLock<Workspace> = OnceLock::new();
    WORKSPACE.get_or_init(|| {
        let manifest = Path::new(env!("CARGO_MANIFEST_DIR")).join("../Cargo.toml");
        let metadata = cargo_metadata::MetadataCommand::new()
            .manifest_path(manifest)
            .no_deps()
            .exec()
            .expect("cargo metadata of the workspace");
        Workspace {
            root: metadata.workspace_root.into_std_path_buf(),
            target: metadata.target_directory.into_std_path_buf(),
        }
    })
}

pub(crate) fn workspace_root() -> &'static Path {
    &workspace().root
}

/// `target/<profile>` or `target/<triple>/<profile>`.
pub(crate) fn target_dir() -> &'static Path {
    &workspace().target
}

pub(crate) fn cargo() -> Command {
    let mut command = Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()));
    command.current_dir(workspace_root());
    command
}

pub(crate) fn run(command: &mut Command) -> Result<()> {
    eprintln!("+ {command:?}");
    let status = command
        .status()
        .with_context(|| format!("cannot start {:?}", command.get_program()))?;
    if !status.success() {
        bail!("{command:?} failed: {status}");
    }
    Ok(())
}

pub(crate) fn output(command: &mut Command) -> Result<String> {
    let output = command
        .output()
        .with_context(|| format!("cannot start {:?}", command.get_program()))?;
    if !output.status.success() {
        bail!(
            "{command:?} failed: {}",
            String::from_utf8_lossy(&output.stderr).trim()
        );
    }
    Ok(String::from_utf8_lossy(&output.stdout).into_owned())
}

pub(crate) fn is_root() -> bool {
    output(Command::new("id").arg("-u")).is_ok_and(|uid| uid.trim() == "0")
}

static STARTED: OnceLock<Instant> = OnceLock::new();

/// Starts the clock [`step`] reports against: the command's start.
pub(crate) fn start_clock() {
    STARTED.get_or_init(Instant::now);
}

/// Runs one step of a command: says what it is, then how long it took
/// and how long the command has run.
pub(crate) fn step<T>(what: &str, f: impl FnOnce() -> Result<T>) -> Result<T> {
    let started = *STARTED.get_or_init(Instant::now);
    eprintln!("==> {what}");
    let begun = Instant::now();
    let result = f()?;
    eprintln!(
        "==> {what}: {} (at {})",
        minutes(begun.elapsed().as_secs()),
        minutes(started.elapsed().as_secs())
    );
    Ok(result)
}

fn minutes(secs: u64) -> String {
    format!("{}m{:02}s", secs / 60, secs % 60)
}
