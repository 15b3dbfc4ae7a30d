//! cgroup v2: one directory in the unified hierarchy.

use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::{Deserialize, Serialize};

use super::{
    CgroupError, CgroupStats, CgroupVersion, CounterFile, EnforcedLimit, EventCounter, Notice,
    keyed, keyed_in, mkdir, read, read_pids, rmdir, write,
};
use crate::spec::SandboxLimits;

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct V2 {
    pub dir: PathBuf,
}

const PERIOD_US: u64 = 100_000;

impl V2 {
    /// Makes `<root>/<parent>/<name>` with the job's controllers enabled on the way.
    ///
    /// v2 delegation: a cgroup may enable for its children only what its own
    /// `cgroup.controllers` lists, and only the owner of a subtree may write its
    /// `cgroup.subtree_control`. The deepest existing level on the way is ours (the
    /// delegated cgroup under systemd, the configured parent elsewhere): controllers are
    /// enabled there and in what we create below it, never above it.
    pub(super) fn create(root: &Path, parent: &str, name: &str) -> Result<Self, CgroupError> {
        let parent_dir = parent
            .split('/')
            .filter(|c| !c.is_empty())
            .fold(root.to_path_buf(), |dir, c| dir.join(c));
        let mut ours = parent_dir.clone();
        let mut to_make = Vec::new();
        while ours != root && !ours.join("cgroup.controllers").exists() {
            to_make.push(ours.clone());
            ours = ours
                .parent()
                .map_or_else(|| root.to_path_buf(), Path::to_path_buf);
        }
        let available = read(&ours.join("cgroup.controllers"))?;
        let missing: Vec<String> = super::V2_CONTROLLERS
            .iter()
            .filter(|c| !available.split_whitespace().any(|a| a == **c))
            .map(|c| (*c).to_owned())
            .collect();
        if !missing.is_empty() {
            return Err(CgroupError::NotDelegated { dir: ours, missing });
        }
        let wanted: Vec<&str> = super::V2_CONTROLLERS
            .iter()
            .chain(super::V2_OPTIONAL.iter())
            .copied()
            .filter(|c| available.split_whitespace().any(|a| a == *c))
            .collect();
        enable(&ours, &wanted)?;
        for dir in to_make.iter().rev() {
            mkdir(dir)?;
            enable(dir, &wanted)?;
        }
        let dir = parent_dir.join(name);
        mkdir(&dir)?;
        Ok(V2 { dir })
    }

    fn file(&self, name: &str) -> PathBuf {
        self.dir.join(name)
    }
}

/// Enables `wanted` in `dir`'s `cgroup.subtree_control` where not yet enabled. Fails with
/// EBUSY when `dir` holds processes (the no-internal-processes rule).
fn enable(dir: &Path, wanted: &[&str]) -> Result<(), CgroupError> {
    let control = dir.join("cgroup.subtree_control");
    let enabled = read(&control)?;
    let add: Vec<String> = wanted
        .iter()
        .filter(|c| !enabled.split_whitespace().any(|e| e == **c))
        .map(|c| format!("+{c}"))
        .collect();
    if add.is_empty() {
        return Ok(());
    }
    write(&control, &add.join(" "))
}

/// `dir` and every cgroup below it, parents before children.
fn subtree(dir: &Path) -> Vec<PathBuf> {
    let mut all = vec![dir.to_path_buf()];
    let mut i = 0;
    while i < all.len() {
        if let Ok(entries) = std::fs::read_dir(&all[i]) {
            let mut children: Vec<PathBuf> = entries
                .flatten()
                .filter(|e| e.file_type().is_ok_and(|t| t.is_dir()))
                .map(|e| e.path())
                .collect();
            children.sort();
            all.extend(children);
        }
        i += 1;
    }
    all
}

/// A v2 job cgroup's accounting files, open.
#[derive(Debug)]
pub(super) struct Counters {
    cpu_stat: CounterFile,
    memory_peak: Option<CounterFile>,
    pids_peak: Option<CounterFile>,
    memory_events: CounterFile,
    pids_events: CounterFile,
    io_stat: Option<CounterFile>,
}

impl Counters {
    pub(super) fn read(&self) -> Result<CgroupStats, CgroupError> {
        let (io_read, io_write) = match self
            .io_stat
            .as_ref()
            .and_then(|f| f.text().ok())
            .and_then(|text| io_bytes(&text))
        {
            Some((r, w)) => (Some(r), Some(w)),
            None => (None, None),
        };
        let cpu = self.cpu_stat.text()?;
        let cpu = |key| keyed_in(&self.cpu_stat.path, &cpu, key);
        // memory.events (not .local) counts the whole subtree, including cgroups a process
        // of the job made below its own.
        let memory = self.memory_events.text()?;
        let memory = |key| keyed_in(&self.memory_events.path, &memory, key);
        let optional = |f: &Option<CounterFile>| f.as_ref().map_or(Ok(0), CounterFile::u64);
        Ok(CgroupStats {
            cpu_user: Duration::from_micros(cpu("user_usec")?),
            cpu_system: Duration::from_micros(cpu("system_usec")?),
            memory_peak: optional(&self.memory_peak)?,
            pids_peak: optional(&self.pids_peak)?,
            oom_kills: memory("oom_kill")?,
            oom_events: memory("oom")?,
            pids_limit_hits: self.pids_events.keyed("max")?,
            io_read,
            io_write,
        })
    }
}

/// Sums `rbytes=` and `wbytes=` over the devices of an `io.stat` file; `None` when it
/// names no device (no block I/O was charged here: a caller falls back to the processes'
/// own counters, which also see writes the block layer did not attribute to the cgroup).
fn io_bytes(text: &str) -> Option<(u64, u64)> {
    if text.trim().is_empty() {
        return None;
    }
    let mut r = 0;
    let mut w = 0;
    for field in text.split_whitespace() {
        if let Some(v) = field.strip_prefix("rbytes=") {
            r += v.parse::<u64>().unwrap_or(0);
        } else if let Some(v) = field.strip_prefix("wbytes=") {
            w += v.parse::<u64>().unwrap_or(0);
        }
    }
    Some((r, w))
}

impl CgroupVersion for V2 {
    fn apply(&self, limits: &SandboxLimits) -> Result<(), CgroupError> {
        if let Some(mem) = limits.memory_bytes {
            write(&self.file("memory.max"), &mem.to_string())?;
            // Absent without swap accounting (no swap to limit then).
            let swap = self.file("memory.swap.max");
            if swap.exists() {
                write(&swap, "0")?;
            }
        }
        // An OOM kills the whole build, not one process of it that a build tool would
        // survive and report as some other failure. The job's init goes too (the shim,
        // outside this cgroup, then reads the end from the init's wait status and the
        // cgroup's counters).
        let group = self.file("memory.oom.group");
        if group.exists() {
            write(&group, "1")?;
        }
        if let Some(pids) = limits.pids {
            write(&self.file("pids.max"), &pids.to_string())?;
        }
        if let Some(cores) = limits.cpu_quota {
            let quota = ((cores * PERIOD_US as f64) as u64).max(1000);
            write(&self.file("cpu.max"), &format!("{quota} {PERIOD_US}"))?;
        }
        // io.max exists where the io controller is enabled for us (it is when the host
        // has it; without it there is no bandwidth limit).
        if let (Some(bps), Some((major, minor))) =
            (limits.disk_bytes_per_second, limits.disk_device)
            && self.file("io.max").exists()
        {
            write(
                &self.file("io.max"),
                &format!("{major}:{minor} rbps={bps} wbps={bps}"),
            )?;
        }
        Ok(())
    }

    fn procs_files(&self) -> Vec<PathBuf> {
        vec![self.file("cgroup.procs")]
    }

    fn self_join_files(&self) -> Option<Vec<PathBuf>> {
        None
    }

    fn self_leave_files(&self) -> Option<Vec<PathBuf>> {
        None
    }

    fn cpu_usage(&self) -> Result<Duration, CgroupError> {
        Ok(Duration::from_micros(keyed(
            &self.file("cpu.stat"),
            "usage_usec",
        )?))
    }

    fn counters(&self) -> Result<super::Counters, CgroupError> {
        let open = |name| CounterFile::open(self.file(name));
        let optional = |name| CounterFile::open_optional(self.file(name));
        Ok(super::Counters(super::CounterSet::V2(Counters {
            cpu_stat: open("cpu.stat")?,
            // memory.peak appeared in Linux 5.19; older kernels report 0.
            memory_peak: optional("memory.peak")?,
            pids_peak: optional("pids.peak")?,
            memory_events: open("memory.events")?,
            pids_events: open("pids.events")?,
            // Only where the io controller is enabled for jobs.
            io_stat: optional("io.stat").ok().flatten(),
        })))
    }

    /// Including processes in cgroups below the job's (a job may make its own).
    fn pids(&self) -> Result<Vec<i32>, CgroupError> {
        let mut all = Vec::new();
        for dir in subtree(&self.dir) {
            all.extend(read_pids(&dir.join("cgroup.procs"))?);
        }
        Ok(all)
    }

    fn kill_all(&self) -> Result<(), CgroupError> {
        // cgroup.kill (Linux 5.14) kills the whole subtree at once, forks in flight included.
        let kill = self.file("cgroup.kill");
        if kill.exists() {
            return write(&kill, "1");
        }
        super::kill_pids(&self.pids()?);
        Ok(())
    }

    /// Children first: a cgroup with child cgroups cannot be removed.
    fn remove(&self) -> Result<(), CgroupError> {
        for dir in subtree(&self.dir).iter().rev() {
            rmdir(dir)?;
        }
        Ok(())
    }

    fn event_counters(&self) -> Vec<EventCounter> {
        vec![
            EventCounter {
                limit: EnforcedLimit::Oom,
                file: self.file("memory.events"),
                key: "oom_kill",
                notice: Notice::Inotify,
            },
            EventCounter {
                limit: EnforcedLimit::Pids,
                file: self.file("pids.events"),
                key: "max",
                notice: Notice::Inotify,
            },
        ]
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A fake root offering every controller, with the job parent `corral` already made
    /// and enabling `corral_enabled`.
    fn fake_with(corral_enabled: &str) -> (tempfile::TempDir, V2) {
        let t = tempfile::tempdir().unwrap();
        let all = "cpuset cpu io memory hugetlb pids rdma misc\n";
        std::fs::write(t.path().join("cgroup.controllers"), all).unwrap();
        std::fs::write(t.path().join("cgroup.subtree_control"), "").unwrap();
        std::fs::create_dir(t.path().join("corral")).unwrap();
        std::fs::write(t.path().join("corral/cgroup.controllers"), all).unwrap();
        std::fs::write(
            t.path().join("corral/cgroup.subtree_control"),
            corral_enabled,
        )
        .unwrap();
        let cg = V2::create(t.path(), "corral", "job1").unwrap();
        (t, cg)
    }

    fn fake() -> (tempfile::TempDir, V2) {
        fake_with("memory pids cpu\n")
    }

    #[test]
    fn controllers_are_enabled_only_in_our_own_cgroup() {
        let (t, _cg) = fake();
        // The root is not ours (systemd's, the host's): never written.
        let root = std::fs::read_to_string(t.path().join("cgroup.subtree_control")).unwrap();
        assert_eq!(root, "");
        // Ours lacked only io.
        let parent =
            std::fs::read_to_string(t.path().join("corral/cgroup.subtree_control")).unwrap();
        assert_eq!(parent, "+io");
    }

    #[test]
    fn nothing_is_written_when_everything_is_enabled() {
        let (t, _cg) = fake_with("cpu io memory pids\n");
        let parent =
            std::fs::read_to_string(t.path().join("corral/cgroup.subtree_control")).unwrap();
        assert_eq!(parent, "cpu io memory pids\n");
    }

    #[test]
    fn a_missing_parent_is_made_below_the_deepest_existing_cgroup() {
        let t = tempfile::tempdir().unwrap();
        std::fs::write(t.path().join("cgroup.controllers"), "cpu memory pids\n").unwrap();
        std::fs::write(t.path().join("cgroup.subtree_control"), "").unwrap();
        // A fake tree has no kernel to fill in a new cgroup's files: pre-make them.
        let err = V2::create(t.path(), "a/b", "job").unwrap_err();
        assert!(
            matches!(err, CgroupError::Read { ref path, .. } if path.ends_with("a/cgroup.subtree_control")),
            "{err:?}"
        );
        assert_eq!(
            std::fs::read_to_string(t.path().join("cgroup.subtree_control")).unwrap(),
            "+memory +pids +cpu",
            "io is not offered here, so not asked for"
        );
        assert!(t.path().join("a").is_dir());
    }

    #[test]
    fn controllers_not_delegated_to_us_are_a_typed_error() {
        let t = tempfile::tempdir().unwrap();
        std::fs::create_dir(t.path().join("svc")).unwrap();
        std::fs::write(t.path().join("svc/cgroup.controllers"), "cpu pids\n").unwrap();
        std::fs::write(t.path().join("svc/cgroup.subtree_control"), "").unwrap();
        match V2::create(t.path(), "svc", "job") {
            Err(CgroupError::NotDelegated { dir, missing }) => {
                assert_eq!(dir, t.path().join("svc"));
                assert_eq!(missing, vec!["memory".to_owned()]);
            }
            other => panic!("expected NotDelegated, got {other:?}"),
        }
        assert!(!t.path().join("svc/job").exists());
    }

    #[test]
    fn limits_are_written_in_v2_format() {
        let (_t, cg) = fake();
        let limits = SandboxLimits {
            memory_bytes: Some(1 << 30),
            pids: Some(100),
            cpu_quota: Some(1.5),
            ..SandboxLimits::default()
        };
        // Present where the kernel has them (swap accounting, Linux 4.19).
        std::fs::write(cg.dir.join("memory.swap.max"), "max").unwrap();
        std::fs::write(cg.dir.join("memory.oom.group"), "0").unwrap();
        cg.apply(&limits).unwrap();
        let r = |n: &str| std::fs::read_to_string(cg.dir.join(n)).unwrap();
        assert_eq!(r("memory.max"), "1073741824");
        assert_eq!(r("memory.swap.max"), "0");
        assert_eq!(r("pids.max"), "100");
        assert_eq!(r("cpu.max"), "150000 100000");
        assert_eq!(r("memory.oom.group"), "1");
    }

    #[test]
    fn stats_come_from_v2_counters() {
        let (_t, cg) = fake();
        let w = |n: &str, s: &str| std::fs::write(cg.dir.join(n), s).unwrap();
        w(
            "cpu.stat",
            "usage_usec 3000000\nuser_usec 2000000\nsystem_usec 1000000\nnr_periods 0\n",
        );
        w("memory.peak", "4096\n");
        w("pids.peak", "12\n");
        w(
            "memory.events",
            "low 0\nhigh 0\nmax 9\noom 1\noom_kill 1\noom_group_kill 1\n",
        );
        w("pids.events", "max 0\n");
        w(
            "io.stat",
            "8:0 rbytes=100 wbytes=50 rios=1 wios=1\n8:16 rbytes=1 wbytes=2 rios=1 wios=1\n",
        );
        let s = cg.stats().unwrap();
        assert_eq!(s.cpu_user, Duration::from_secs(2));
        assert_eq!(s.cpu_system, Duration::from_secs(1));
        assert_eq!(s.memory_peak, 4096);
        assert_eq!(s.pids_peak, 12);
        assert_eq!(s.oom_kills, 1);
        assert_eq!(s.oom_events, 1);
        assert_eq!(s.pids_limit_hits, 0);
        assert_eq!((s.io_read, s.io_write), (Some(101), Some(52)));
        w("io.stat", "");
        let s = cg.stats().unwrap();
        assert_eq!(
            (s.io_read, s.io_write),
            (None, None),
            "no device: unknown, not zero"
        );
        assert_eq!(cg.cpu_usage().unwrap(), Duration::from_secs(3));
    }
}
