//! A kernel configuration judged against the fragments: what is missing,
//! required or recommended.

use std::{fmt, io::Read as _};

use anyhow::{Context as _, Result};

use crate::fragments::{AGENT_REQUIRED, KATA_RECOMMENDED, options_of, requirements};

/// One option a fragment requires, with its reason.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Requirement {
    pub option: String,
    pub fragment: &'static str,
    pub reason: String,
}

/// What a configuration lacks.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Missing {
    pub requirement: Requirement,
    /// The value found (`None`: not set at all).
    pub found: Option<String>,
}

impl fmt::Display for Missing {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let r = &self.requirement;
        match &self.found {
            Some(value) => write!(f, "{}={value} ({}: {})", r.option, r.fragment, r.reason),
            None => write!(f, "{} is not set ({}: {})", r.option, r.fragment, r.reason),
        }
    }
}

/// A kernel configuration judged for socklb.
#[derive(Debug, PartialEq, Eq)]
pub struct Verdict {
    /// Options the agent cannot run without.
    pub required: Vec<Missing>,
    /// Options that cost speed or features when absent.
    pub recommended: Vec<Missing>,
}

/// Judges `config` (a kernel .config) against what the agent requires and
/// recommends; modules count as present when `modules_allowed`.
pub fn judge(config: &str, modules_allowed: bool) -> Verdict {
    Verdict {
        required: missing(config, options_of(&AGENT_REQUIRED), modules_allowed),
        recommended: missing(config, options_of(&KATA_RECOMMENDED), modules_allowed),
    }
}

/// The options of `config` (a kernel .config) that fail the own kernel's
/// fragments. A module (`=m`) passes when `modules_allowed`: a kernel like
/// Debian's loads virtio and vsock as modules.
pub fn check(config: &str, modules_allowed: bool) -> Vec<Missing> {
    missing(config, requirements(), modules_allowed)
}

pub(crate) fn missing(
    config: &str,
    wanted: Vec<Requirement>,
    modules_allowed: bool,
) -> Vec<Missing> {
    let values: std::collections::HashMap<&str, &str> = config
        .lines()
        .filter_map(|line| line.split_once('='))
        .collect();
    wanted
        .into_iter()
        .filter_map(|requirement| {
            let found = values.get(requirement.option.as_str()).copied();
            match found {
                Some("y") => None,
                Some("m") if modules_allowed => None,
                _ => Some(Missing {
                    requirement,
                    found: found.map(String::from),
                }),
            }
        })
        .collect()
}

/// The running kernel's configuration: /proc/config.gz, else
/// /boot/config-<release>.
pub fn running_config() -> Result<(String, String)> {
    if let Ok(file) = std::fs::File::open("/proc/config.gz") {
        let mut text = String::new();
        flate2::read::GzDecoder::new(file).read_to_string(&mut text)?;
        return Ok(("/proc/config.gz".into(), text));
    }
    let release = std::fs::read_to_string("/proc/sys/kernel/osrelease")?;
    let path = format!("/boot/config-{}", release.trim());
    let text = std::fs::read_to_string(&path)
        .with_context(|| format!("neither /proc/config.gz nor {path} is readable"))?;
    Ok((path, text))
}
