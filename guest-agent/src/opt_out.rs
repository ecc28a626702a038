//! Opt-out cgroups: cgroups whose sockets socklb leaves untranslated (a
//! container with a service-mesh sidecar, whose redirect and
//! `SO_ORIGINAL_DST` must see the VIP; a debugging shell). The host names
//! them by path below the cgroup the hooks are attached to; the datapath
//! keeps them by cgroup id, which on cgroup2 is the inode number of the
//! cgroup's directory (what `bpf_get_current_ancestor_cgroup_id` returns).

use std::{
    collections::{BTreeMap, BTreeSet},
    fs,
    os::unix::fs::MetadataExt as _,
    path::{Component, Path, PathBuf},
};

use socklb_common::MAX_OPT_OUT_CGROUPS;

/// A list the agent refuses before touching the datapath.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum OptOutError {
    #[error(
        "opt-out cgroup {path:?}: not a path below the attach cgroup (no \"..\", \".\" or empty parts)"
    )]
    Malformed { path: String },
    #[error("opt-out cgroup {path:?}: {} is no cgroup directory ({reason})", full.display())]
    NotACgroup {
        path: String,
        full: PathBuf,
        reason: String,
    },
    #[error("{count} opt-out cgroups, at most {MAX_OPT_OUT_CGROUPS}")]
    TooMany { count: usize },
    #[error("the hooks are not attached yet, so there is no cgroup to resolve paths below")]
    NotAttached,
}

/// The cgroup ids of `paths` (below `attach`, "" for `attach` itself).
pub fn resolve(attach: &Path, paths: &[String]) -> Result<BTreeMap<u64, String>, OptOutError> {
    if paths.len() > MAX_OPT_OUT_CGROUPS as usize {
        return Err(OptOutError::TooMany { count: paths.len() });
    }
    let mut ids = BTreeMap::new();
    for path in paths {
        let relative = path.trim_matches('/');
        let malformed = || OptOutError::Malformed { path: path.clone() };
        if !relative.is_empty()
            && (relative.split('/').any(str::is_empty)
                || !Path::new(relative)
                    .components()
                    .all(|c| matches!(c, Component::Normal(_))))
        {
            return Err(malformed());
        }
        let full = attach.join(relative);
        let not_a_cgroup = |reason: String| OptOutError::NotACgroup {
            path: path.clone(),
            full: full.clone(),
            reason,
        };
        let metadata = fs::metadata(&full).map_err(|err| not_a_cgroup(err.to_string()))?;
        // Every cgroup2 directory has cgroup.procs; a plain directory not.
        if !metadata.is_dir() || !full.join("cgroup.procs").exists() {
            return Err(not_a_cgroup("no cgroup.procs in it".into()));
        }
        ids.insert(metadata.ino(), relative.to_string());
    }
    Ok(ids)
}

/// The path below `attach` of each of `ids`, found by walking the tree;
/// an id whose cgroup is gone is left out.
pub fn paths_of(attach: &Path, ids: &BTreeSet<u64>) -> BTreeMap<u64, String> {
    let mut found = BTreeMap::new();
    let mut pending = vec![(attach.to_path_buf(), String::new())];
    while let Some((dir, relative)) = pending.pop() {
        if found.len() == ids.len() {
            break;
        }
        let Ok(metadata) = fs::metadata(&dir) else {
            continue;
        };
        if ids.contains(&metadata.ino()) {
            found.insert(metadata.ino(), relative.clone());
        }
        let Ok(entries) = fs::read_dir(&dir) else {
            continue;
        };
        for entry in entries.flatten() {
            if entry.file_type().is_ok_and(|t| t.is_dir()) {
                let name = entry.file_name().to_string_lossy().into_owned();
                let child = if relative.is_empty() {
                    name
                } else {
                    format!("{relative}/{name}")
                };
                pending.push((entry.path(), child));
            }
        }
    }
    found
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn paths_are_resolved_below_the_attach_cgroup_only() {
        let attach = tempfile::tempdir().unwrap();
        let child = attach.path().join("pod").join("ctr");
        fs::create_dir_all(&child).unwrap();
        fs::write(child.join("cgroup.procs"), "").unwrap();
        fs::write(attach.path().join("cgroup.procs"), "").unwrap();
        let ids = resolve(attach.path(), &["/pod/ctr/".into(), "".into()]).unwrap();
        let resolved: BTreeSet<&str> = ids.values().map(String::as_str).collect();
        assert_eq!(resolved, BTreeSet::from(["pod/ctr", ""]));
        let paths = paths_of(attach.path(), &ids.keys().copied().collect());
        assert_eq!(paths, ids);
        for bad in ["../x", "pod/../pod", "pod//ctr", "./pod"] {
            assert_eq!(
                resolve(attach.path(), &[bad.into()]),
                Err(OptOutError::Malformed { path: bad.into() }),
                "{bad}"
            );
        }
        // A directory that is no cgroup (no cgroup.procs), and a missing one.
        for missing in ["pod", "nope"] {
            assert!(matches!(
                resolve(attach.path(), &[missing.into()]),
                Err(OptOutError::NotACgroup { .. })
            ));
        }
    }
}
