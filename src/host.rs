//! What the host is: CPU lists and NUMA nodes from sysfs (used by the config's core checks,
//! `tie doctor` and `tie devices`).
#![forbid(unsafe_code)]

use std::path::Path;

/// The contents of a sysfs or procfs file, trimmed; `None` when it cannot be read.
pub fn read_trimmed(path: impl AsRef<Path>) -> Option<String> {
    std::fs::read_to_string(path)
        .ok()
        .map(|s| s.trim().to_string())
}

/// Parses a kernel CPU list (`0-3,8,10-11`).
pub fn parse_cpu_list(list: &str) -> Vec<usize> {
    let mut cpus = Vec::new();
    for part in list.split(',').map(str::trim).filter(|p| !p.is_empty()) {
        match part.split_once('-') {
            Some((a, b)) => {
                if let (Ok(a), Ok(b)) = (a.parse::<usize>(), b.parse::<usize>()) {
                    cpus.extend(a..=b);
                }
            }
            None => cpus.extend(part.parse::<usize>().ok()),
        }
    }
    cpus
}

/// The other hardware threads of `cpu`'s core (its SMT siblings), from sysfs; empty when SMT is
/// off, the topology is not exposed (as in many virtual machines) or it cannot be read.
pub fn smt_siblings(cpu: usize) -> Vec<usize> {
    read_trimmed(format!(
        "/sys/devices/system/cpu/cpu{cpu}/topology/thread_siblings_list"
    ))
    .map(|l| parse_cpu_list(&l))
    .unwrap_or_default()
    .into_iter()
    .filter(|&s| s != cpu)
    .collect()
}

/// [`smt_siblings`], read once per CPU in the process's life: `tie serve` reads its poller
/// cores' at start, so a batch thread that moves off its poller's core later reads no file
/// there.
pub fn smt_siblings_cached(cpu: usize) -> Vec<usize> {
    use crate::sync::Locked;
    static READ: std::sync::Mutex<std::collections::BTreeMap<usize, Vec<usize>>> =
        std::sync::Mutex::new(std::collections::BTreeMap::new());
    READ.locked()
        .entry(cpu)
        .or_insert_with(|| smt_siblings(cpu))
        .clone()
}

/// The NUMA node of a CPU, from sysfs.
pub fn cpu_numa_node(cpu: usize) -> Option<i64> {
    let dir = std::fs::read_dir(format!("/sys/devices/system/cpu/cpu{cpu}")).ok()?;
    dir.filter_map(|e| e.ok())
        .filter_map(|e| e.file_name().to_str().map(str::to_string))
        .find_map(|n| n.strip_prefix("node").and_then(|v| v.parse().ok()))
}

/// Makes directory `dir` (owner-only when made here), checks that only this user can write
/// there (another user able to would swap files under the server), and takes its lock
/// (`.lock`, held while the returned file is open); `held` says why when another process holds
/// it.
///
/// # Errors
/// The directory cannot be made or belongs to another user or is writable by others (the
/// message says which), or its lock is held.
pub fn private_dir(dir: &Path, held: &str) -> std::io::Result<std::fs::File> {
    use std::os::unix::fs::{DirBuilderExt, MetadataExt, OpenOptionsExt};
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)?;
    let meta = std::fs::symlink_metadata(dir)?;
    let me = rustix::process::geteuid().as_raw();
    if !meta.is_dir() || meta.uid() != me || meta.mode() & 0o022 != 0 {
        return Err(std::io::Error::other(format!(
            "must be a directory of this user ({me}) that no one else can write to (it is {}, owner {}, mode {:o})",
            if meta.is_dir() { "a directory" } else { "not a directory" },
            meta.uid(),
            meta.mode() & 0o7777
        )));
    }
    let lock = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .mode(0o600)
        .custom_flags(rustix::fs::OFlags::NOFOLLOW.bits() as i32)
        .open(dir.join(".lock"))?;
    if rustix::fs::flock(&lock, rustix::fs::FlockOperation::NonBlockingLockExclusive).is_err() {
        return Err(std::io::Error::other(held.to_string()));
    }
    Ok(lock)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cpu_lists() {
        assert_eq!(parse_cpu_list("0-3,8,10-11\n"), vec![0, 1, 2, 3, 8, 10, 11]);
        assert_eq!(parse_cpu_list(""), Vec::<usize>::new());
        assert_eq!(parse_cpu_list("5"), vec![5]);
    }
}
