//! cgroup v2: one directory in the unified hierarchy.

use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::{Deserialize, Serialize};

use super::{
    CgroupError, CgroupStats, CgroupVersion, EnforcedLimit, EventCounter, Notice, keyed, mkdir,
    read, read_pids, read_u64, rmdir, write,
};
use crate::spec::SandboxLimits;

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct V2 {
    pub dir: PathBuf,
}

const PERIOD_US: u64 = 100_000;

impl V2 {
    pub(super) fn create(root: &Path, parent: &str, name: &str) -> Result<Self, CgroupError> {
        let parent_dir = root.join(parent);
        mkdir(&parent_dir)?;
        // Controllers must be enabled on every level above the job ("no internal
        // processes": the parent holds only child cgroups).
        for dir in [root, parent_dir.as_path()] {
            let control = dir.join("cgroup.subtree_control");
            let enabled = read(&control)?;
            let wanted: Vec<String> = ["memory", "pids", "cpu"]
                .iter()
                .filter(|c| !enabled.split_whitespace().any(|e| e == **c))
                .map(|c| format!("+{c}"))
                .collect();
            if !wanted.is_empty() {
                write(&control, &wanted.join(" "))?;
            }
        }
        let dir = parent_dir.join(name);
        mkdir(&dir)?;
        Ok(V2 { dir })
    }

    fn file(&self, name: &str) -> PathBuf {
        self.dir.join(name)
    }
}

/// Sums `rbytes=` and `wbytes=` over the devices of an `io.stat` file.
fn io_bytes(text: &str) -> (u64, u64) {
    let mut r = 0;
    let mut w = 0;
    for field in text.split_whitespace() {
        if let Some(v) = field.strip_prefix("rbytes=") {
            r += v.parse::<u64>().unwrap_or(0);
        } else if let Some(v) = field.strip_prefix("wbytes=") {
            w += v.parse::<u64>().unwrap_or(0);
        }
    }
    (r, w)
}

impl CgroupVersion for V2 {
    fn apply(&self, limits: &SandboxLimits) -> Result<(), CgroupError> {
        if let Some(mem) = limits.memory_bytes {
            write(&self.file("memory.max"), &mem.to_string())?;
            write(&self.file("memory.swap.max"), "0")?;
            // No memory.oom.group: a group kill would take the job's init, which shares the
            // cgroup and reports the job's end, along with the job.
        }
        if let Some(pids) = limits.pids {
            write(&self.file("pids.max"), &pids.to_string())?;
        }
        if let Some(cores) = limits.cpu_quota {
            let quota = ((cores * PERIOD_US as f64) as u64).max(1000);
            write(&self.file("cpu.max"), &format!("{quota} {PERIOD_US}"))?;
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

    fn stats(&self) -> Result<CgroupStats, CgroupError> {
        let cpu = self.file("cpu.stat");
        let peak = self.file("memory.peak");
        let (io_read, io_write) = match std::fs::read_to_string(self.file("io.stat")) {
            Ok(text) => {
                let (r, w) = io_bytes(&text);
                (Some(r), Some(w))
            }
            Err(_) => (None, None),
        };
        Ok(CgroupStats {
            cpu_user: Duration::from_micros(keyed(&cpu, "user_usec")?),
            cpu_system: Duration::from_micros(keyed(&cpu, "system_usec")?),
            // memory.peak appeared in Linux 5.19; older kernels report 0.
            memory_peak: if peak.exists() { read_u64(&peak)? } else { 0 },
            pids_peak: if self.file("pids.peak").exists() {
                read_u64(&self.file("pids.peak"))?
            } else {
                0
            },
            oom_kills: keyed(&self.file("memory.events"), "oom_kill")?,
            pids_limit_hits: keyed(&self.file("pids.events"), "max")?,
            io_read,
            io_write,
        })
    }

    fn pids(&self) -> Result<Vec<i32>, CgroupError> {
        read_pids(&self.file("cgroup.procs"))
    }

    fn kill_all(&self) -> Result<(), CgroupError> {
        let kill = self.file("cgroup.kill");
        if kill.exists() {
            return write(&kill, "1");
        }
        super::kill_pids(&self.pids()?);
        Ok(())
    }

    fn remove(&self) -> Result<(), CgroupError> {
        rmdir(&self.dir)
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

    fn fake() -> (tempfile::TempDir, V2) {
        let t = tempfile::tempdir().unwrap();
        std::fs::write(t.path().join("cgroup.subtree_control"), "").unwrap();
        std::fs::create_dir(t.path().join("corral")).unwrap();
        std::fs::write(
            t.path().join("corral/cgroup.subtree_control"),
            "memory pids cpu\n",
        )
        .unwrap();
        let cg = V2::create(t.path(), "corral", "job1").unwrap();
        (t, cg)
    }

    #[test]
    fn controllers_are_enabled_only_where_missing() {
        let (t, _cg) = fake();
        let root = std::fs::read_to_string(t.path().join("cgroup.subtree_control")).unwrap();
        assert_eq!(root, "+memory +pids +cpu");
        let parent =
            std::fs::read_to_string(t.path().join("corral/cgroup.subtree_control")).unwrap();
        assert_eq!(parent, "memory pids cpu\n");
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
        cg.apply(&limits).unwrap();
        let r = |n: &str| std::fs::read_to_string(cg.dir.join(n)).unwrap();
        assert_eq!(r("memory.max"), "1073741824");
        assert_eq!(r("memory.swap.max"), "0");
        assert_eq!(r("pids.max"), "100");
        assert_eq!(r("cpu.max"), "150000 100000");
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
        assert_eq!(s.pids_limit_hits, 0);
        assert_eq!((s.io_read, s.io_write), (Some(101), Some(52)));
        assert_eq!(cg.cpu_usage().unwrap(), Duration::from_secs(3));
    }
}
