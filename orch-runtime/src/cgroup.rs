//! Memory and CPU limits for [`ProcessRuntime`](crate::ProcessRuntime) instances, through Linux
//! control groups: the unified hierarchy (cgroup v2) where the host has it, else the v1 `memory`
//! and `cpu` controllers.
//!
//! Each runtime keeps its instances' groups under one directory of its own, beneath the group
//! the runtime's process runs in (`orch-<hash of the runtime's root>`), and each instance gets a
//! group named after its id. The process joins its group before it runs the workload's program
//! (a `/bin/sh` wrapper writes its own pid into the group, then execs the program), so nothing
//! it does is ever outside the limits. Where no group can be made (no cgroup file system, no
//! write permission, v2 controllers not delegated), [`LimitSupport::Unsupported`] says why and
//! the runtime reports `resource_limits: false` in its capabilities.

use std::path::{Path, PathBuf};
use std::time::Duration;

use orch_core::kinds::{Container, resource};
use orch_core::runtime::RuntimeError;

const MOUNT: &str = "/sys/fs/cgroup";
/// Held while a runtime's own group is made or removed, so a start never finds it gone.
static BASE: std::sync::Mutex<()> = std::sync::Mutex::new(());
/// The CFS period the CPU quota is counted in (the kernel's default, 100 ms).
const CPU_PERIOD_US: i64 = 100_000;
/// Smallest CPU limit: the kernel refuses quotas below 1 ms per period.
const MIN_MILLI_CPU: i64 = 10;
/// Smallest memory limit accepted: below it a process cannot even start its program.
const MIN_MEMORY: i64 = 1 << 20;

/// Whether (and how) this host lets the process runtime enforce limits.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LimitSupport {
    /// cgroup v2: instance groups live under `base`, which has the `memory` and `cpu`
    /// controllers enabled for its children.
    V2 {
        /// The runtime's own group.
        base: PathBuf,
    },
    /// cgroup v1: instance groups live under `memory` (the memory controller's hierarchy) and
    /// `cpu` (the CPU controller's).
    V1 {
        /// The runtime's group in the memory hierarchy.
        memory: PathBuf,
        /// The runtime's group in the CPU hierarchy.
        cpu: PathBuf,
    },
    /// Limits are not enforced, for the reason given.
    Unsupported(String),
}

/// The limits of one container, as the kernel takes them.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub(crate) struct Limits {
    /// Bytes of memory (and no swap beyond them).
    pub(crate) memory: Option<i64>,
    /// Microseconds of CPU time per [`CPU_PERIOD_US`].
    pub(crate) cpu_quota_us: Option<i64>,
}

impl Limits {
    /// Reads and checks `container.resources.limits`; an error names the field.
    pub(crate) fn of(c: &Container) -> Result<Limits, RuntimeError> {
        let mut limits = Limits::default();
        if let Some(q) = c.resources.limits.get(resource::MEMORY) {
            let bytes = q.units_ceil();
            if bytes < MIN_MEMORY {
                return Err(RuntimeError::invalid(
                    "container.resources.limits.memory",
                    format!("{q} is below 1Mi, too little to start a process"),
                ));
            }
            limits.memory = Some(bytes);
        }
        if let Some(q) = c.resources.limits.get(resource::CPU) {
            let milli = q.milli_ceil();
            if milli < MIN_MILLI_CPU {
                return Err(RuntimeError::invalid(
                    "container.resources.limits.cpu",
                    format!("{q} is below 10m, the smallest CPU quota the kernel takes"),
                ));
            }
            limits.cpu_quota_us = Some(milli.saturating_mul(CPU_PERIOD_US / 1000));
        }
        Ok(limits)
    }

    pub(crate) fn is_empty(&self) -> bool {
        self.memory.is_none() && self.cpu_quota_us.is_none()
    }
}

/// A short, stable name for the runtime rooted at `root` (FNV-1a of its path), so two runtimes
/// of one process (or two agents of one host) never share instance groups.
fn runtime_group(root: &Path) -> String {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in root.as_os_str().as_encoded_bytes() {
        h ^= u64::from(*b);
        h = h.wrapping_mul(0x0100_0000_01b3);
    }
    format!("orch-{h:016x}")
}

/// The group this process is in, per hierarchy: `(controllers, path)` from `/proc/self/cgroup`.
fn own_groups() -> Vec<(String, String)> {
    std::fs::read_to_string("/proc/self/cgroup")
        .unwrap_or_default()
        .lines()
        .filter_map(|l| {
            let mut parts = l.splitn(3, ':');
            let (_, controllers, path) = (parts.next()?, parts.next()?, parts.next()?);
            Some((controllers.to_string(), path.to_string()))
        })
        .collect()
}

fn join(mount: &Path, group: &str) -> PathBuf {
    mount.join(group.trim_start_matches('/'))
}

fn write(path: &Path, value: &str) -> Result<(), String> {
    std::fs::write(path, value).map_err(|e| format!("cannot write {value:?} to {}: {e}", path.display()))
}

fn mkdir(path: &Path) -> Result<(), String> {
    match std::fs::create_dir(path) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => Ok(()),
        Err(e) => Err(format!("cannot create {}: {e}", path.display())),
    }
}

impl LimitSupport {
    /// Finds out what this host allows for a runtime rooted at `root` (by making the runtime's
    /// own group, and removing it again unless it holds instances).
    pub(crate) fn detect(root: &Path) -> LimitSupport {
        let name = runtime_group(root);
        let mount = Path::new(MOUNT);
        let result = if mount.join("cgroup.controllers").is_file() {
            Self::detect_v2(mount, &name)
        } else if mount.join("memory").is_dir() && mount.join("cpu").is_dir() {
            Self::detect_v1(mount, &name)
        } else {
            Err(format!("no cgroup file system at {MOUNT} (neither v2 nor the v1 memory and cpu controllers)"))
        };
        result.unwrap_or_else(LimitSupport::Unsupported)
    }

    fn detect_v2(mount: &Path, name: &str) -> Result<LimitSupport, String> {
        let own = own_groups().into_iter().find(|(c, _)| c.is_empty()).map(|(_, p)| p).unwrap_or_else(|| "/".into());
        let parent = join(mount, &own);
        let available = std::fs::read_to_string(parent.join("cgroup.controllers")).unwrap_or_default();
        for needed in ["memory", "cpu"] {
            if !available.split_whitespace().any(|c| c == needed) {
                return Err(format!(
                    "cgroup v2: the {needed} controller is not delegated to {} (its cgroup.controllers: {:?})",
                    parent.display(),
                    available.trim()
                ));
            }
        }
        let enabled = |dir: &Path| std::fs::read_to_string(dir.join("cgroup.subtree_control")).unwrap_or_default();
        if !["memory", "cpu"].iter().all(|c| enabled(&parent).split_whitespace().any(|e| e == *c)) {
            // Fails when the parent holds processes itself (the "no internal processes" rule):
            // run the agent in a leaf group of a delegated subtree then.
            write(&parent.join("cgroup.subtree_control"), "+memory +cpu").map_err(|e| {
                format!(
                    "cgroup v2: cannot enable the memory and cpu controllers for the children of the agent's group: {e}"
                )
            })?;
        }
        let base = parent.join(name);
        mkdir(&base)?;
        if !["memory", "cpu"].iter().all(|c| enabled(&base).split_whitespace().any(|e| e == *c)) {
            write(&base.join("cgroup.subtree_control"), "+memory +cpu")?;
        }
        // Made to see that it can be; the first start makes it again (an agent's earlier
        // instances may still be in it, and then it stays).
        let _ = std::fs::remove_dir(&base);
        Ok(LimitSupport::V2 { base })
    }

    fn detect_v1(mount: &Path, name: &str) -> Result<LimitSupport, String> {
        let groups = own_groups();
        let own = |controller: &str| {
            groups
                .iter()
                .find(|(c, _)| c.split(',').any(|c| c == controller))
                .map_or_else(|| "/".to_string(), |(_, p)| p.clone())
        };
        // The hierarchy a controller is mounted at may be shared with others ("cpu,cpuacct").
        let memory = join(&mount.join("memory"), &own("memory")).join(name);
        let cpu = join(&mount.join("cpu"), &own("cpu")).join(name);
        mkdir(&memory).map_err(|e| format!("cgroup v1: {e}"))?;
        mkdir(&cpu).map_err(|e| format!("cgroup v1: {e}"))?;
        let complete = memory.join("memory.limit_in_bytes").is_file() && cpu.join("cpu.cfs_quota_us").is_file();
        let _ = std::fs::remove_dir(&memory);
        let _ = std::fs::remove_dir(&cpu);
        if !complete {
            return Err("cgroup v1: the memory or cpu controller lacks its limit files".into());
        }
        Ok(LimitSupport::V1 { memory, cpu })
    }

    /// True when limits are enforced.
    pub fn enforced(&self) -> bool {
        !matches!(self, LimitSupport::Unsupported(_))
    }

    /// The groups instance `id` is (or would be) in: one for v2, the memory then the cpu group
    /// for v1, none when limits are not enforced.
    pub fn groups_of(&self, id: &str) -> Vec<PathBuf> {
        match self {
            LimitSupport::V2 { base } => vec![base.join(id)],
            LimitSupport::V1 { memory, cpu } => vec![memory.join(id), cpu.join(id)],
            LimitSupport::Unsupported(_) => Vec::new(),
        }
    }

    /// Makes the groups of instance `id` with `limits`; returns the files the process writes its
    /// pid to. Undoes itself on failure.
    pub(crate) fn create(&self, id: &str, limits: &Limits) -> Result<Vec<PathBuf>, RuntimeError> {
        let made = {
            let _one_at_a_time = BASE.lock().unwrap_or_else(|e| e.into_inner());
            self.create_inner(id, limits)
        };
        if made.is_err() {
            self.remove(id);
        }
        made.map_err(|reason| RuntimeError::Unavailable {
            message: format!("setting the limits of {id}: {reason}"),
            source: None,
        })
    }

    fn create_inner(&self, id: &str, limits: &Limits) -> Result<Vec<PathBuf>, String> {
        match self {
            LimitSupport::V2 { base } => {
                // The runtime's group goes when its last instance does (see `remove`).
                mkdir(base)?;
                let enabled = std::fs::read_to_string(base.join("cgroup.subtree_control")).unwrap_or_default();
                if !["memory", "cpu"].iter().all(|c| enabled.split_whitespace().any(|e| e == *c)) {
                    write(&base.join("cgroup.subtree_control"), "+memory +cpu")?;
                }
                let dir = base.join(id);
                mkdir(&dir)?;
                if let Some(bytes) = limits.memory {
                    write(&dir.join("memory.max"), &bytes.to_string())?;
                    if dir.join("memory.swap.max").exists() {
                        write(&dir.join("memory.swap.max"), "0")?;
                    }
                }
                if let Some(quota) = limits.cpu_quota_us {
                    write(&dir.join("cpu.max"), &format!("{quota} {CPU_PERIOD_US}"))?;
                }
                Ok(vec![dir.join("cgroup.procs")])
            }
            LimitSupport::V1 { memory, cpu } => {
                mkdir(memory)?;
                mkdir(cpu)?;
                // Both groups always, so every instance has the same two (a missing limit is
                // the kernel's default: none).
                let (mem, cpu) = (memory.join(id), cpu.join(id));
                mkdir(&mem)?;
                mkdir(&cpu)?;
                if let Some(bytes) = limits.memory {
                    write(&mem.join("memory.limit_in_bytes"), &bytes.to_string())?;
                    // With swap accounting on, memory plus swap is held to the same figure.
                    if mem.join("memory.memsw.limit_in_bytes").exists() {
                        write(&mem.join("memory.memsw.limit_in_bytes"), &bytes.to_string())?;
                    }
                }
                if let Some(quota) = limits.cpu_quota_us {
                    write(&cpu.join("cpu.cfs_period_us"), &CPU_PERIOD_US.to_string())?;
                    write(&cpu.join("cpu.cfs_quota_us"), &quota.to_string())?;
                }
                Ok(vec![mem.join("cgroup.procs"), cpu.join("cgroup.procs")])
            }
            LimitSupport::Unsupported(reason) => Err(reason.clone()),
        }
    }

    /// The processes in instance `id`'s groups (none without limits): those that left its
    /// process group (`setsid`) are still here.
    pub(crate) fn members(&self, id: &str) -> Vec<i32> {
        let mut pids: Vec<i32> = self
            .groups_of(id)
            .iter()
            .filter_map(|g| std::fs::read_to_string(g.join("cgroup.procs")).ok())
            .flat_map(|text| text.lines().filter_map(|l| l.trim().parse().ok()).collect::<Vec<i32>>())
            .filter(|pid| *pid > 1)
            .collect();
        pids.sort_unstable();
        pids.dedup();
        pids
    }

    /// True when the kernel's OOM killer killed a process of instance `id`'s group.
    pub(crate) fn oom_killed(&self, id: &str) -> bool {
        let (file, dir) = match self {
            LimitSupport::V2 { base } => ("memory.events", base.join(id)),
            LimitSupport::V1 { memory, .. } => ("memory.oom_control", memory.join(id)),
            LimitSupport::Unsupported(_) => return false,
        };
        let text = std::fs::read_to_string(dir.join(file)).unwrap_or_default();
        text.lines().any(|l| {
            let mut f = l.split_whitespace();
            f.next() == Some("oom_kill") && f.next().and_then(|n| n.parse::<u64>().ok()).is_some_and(|n| n > 0)
        })
    }

    /// Removes instance `id`'s groups once its processes are gone, and the runtime's own group
    /// when that was its last instance (it is made again on the next start).
    pub(crate) fn remove(&self, id: &str) {
        for dir in self.groups_of(id) {
            // The kernel unlinks an exited process from its group a moment after it is reaped.
            for _ in 0..50 {
                match std::fs::remove_dir(&dir) {
                    Err(e) if e.raw_os_error() == Some(16) => std::thread::sleep(Duration::from_millis(2)),
                    _ => break,
                }
            }
            let _one_at_a_time = BASE.lock().unwrap_or_else(|e| e.into_inner());
            if let Some(parent) = dir.parent() {
                // Fails, as it should, while other instances' groups are in it.
                let _ = std::fs::remove_dir(parent);
            }
        }
    }
}

/// The `/bin/sh` program that joins the groups named by its first arguments (their count comes
/// first), then execs the rest. Exit code 125 when a group cannot be joined.
pub(crate) const JOIN_SCRIPT: &str = r#"n=$1; shift
while [ "$n" -gt 0 ]; do echo $$ > "$1" || exit 125; shift; n=$((n-1)); done
exec "$@""#;

#[cfg(test)]
mod tests {
    use super::*;

    fn container(limits: &[(&str, &str)]) -> Container {
        let mut c = Container { name: "main".into(), command: vec!["true".into()], ..Default::default() };
        for (k, v) in limits {
            c.resources.limits.insert((*k).into(), v.parse().expect("quantity"));
        }
        c
    }

    #[test]
    fn limits_are_read_in_kernel_units_and_bad_ones_name_their_field() {
        let l = Limits::of(&container(&[("memory", "64Mi"), ("cpu", "250m")])).expect("valid");
        assert_eq!(l, Limits { memory: Some(64 << 20), cpu_quota_us: Some(25_000) });
        assert!(Limits::of(&container(&[])).expect("none").is_empty());
        let e = Limits::of(&container(&[("memory", "100Ki")])).expect_err("too small").to_string();
        assert!(e.contains("container.resources.limits.memory"), "{e}");
        let e = Limits::of(&container(&[("cpu", "5m")])).expect_err("too small").to_string();
        assert!(e.contains("container.resources.limits.cpu"), "{e}");
    }

    #[test]
    fn runtime_groups_differ_by_root_and_are_stable() {
        let a = runtime_group(Path::new("/var/lib/orch/a"));
        assert_eq!(a, runtime_group(Path::new("/var/lib/orch/a")));
        assert_ne!(a, runtime_group(Path::new("/var/lib/orch/b")));
        assert!(a.starts_with("orch-") && a.len() == 21, "{a}");
    }

    #[test]
    fn unsupported_hosts_have_no_groups_and_say_why_on_create() {
        let none = LimitSupport::Unsupported("no cgroup file system".into());
        assert!(!none.enforced());
        assert!(none.groups_of("x").is_empty());
        let e = none.create("x", &Limits { memory: Some(1 << 30), cpu_quota_us: None }).expect_err("refused");
        assert!(e.to_string().contains("no cgroup file system"), "{e}");
        assert!(!none.oom_killed("x"));
    }
}
