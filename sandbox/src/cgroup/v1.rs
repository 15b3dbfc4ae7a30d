//! cgroup v1: one directory per controller hierarchy (memory, pids, cpu, cpuacct, and
//! blkio where mounted).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::{Deserialize, Serialize};

use super::{
    CgroupError, CgroupStats, CgroupVersion, CounterFile, EnforcedLimit, EventCounter, Notice,
    kill_pids, mkdir, read_pids, read_u64, rmdir, write,
};
use crate::spec::SandboxLimits;

/// A job's directories in each v1 hierarchy. Co-mounted controllers share one directory.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct V1 {
    pub memory: PathBuf,
    pub pids: PathBuf,
    pub cpu: PathBuf,
    pub cpuacct: PathBuf,
    /// Where the blkio hierarchy is mounted (the disk bandwidth limit).
    #[serde(default)]
    pub blkio: Option<PathBuf>,
}

/// CFS period for the CPU quota.
const PERIOD_US: u64 = 100_000;

impl V1 {
    pub(super) fn create(
        mounts: &BTreeMap<String, PathBuf>,
        parent: &str,
        name: &str,
    ) -> Result<Self, CgroupError> {
        let cg = Self::at(mounts, parent, name);
        for d in cg.dirs() {
            // The parent exists but on a hierarchy's first job: try the job's dir first.
            match mkdir(d) {
                Err(CgroupError::Create { source, .. })
                    if source.kind() == std::io::ErrorKind::NotFound =>
                {
                    if let Some(p) = d.parent() {
                        mkdir(p)?;
                    }
                    mkdir(d)?;
                }
                made => made?,
            }
        }
        Ok(cg)
    }

    /// The job cgroup `<parent>/<name>` in each hierarchy, without making it.
    pub(super) fn at(mounts: &BTreeMap<String, PathBuf>, parent: &str, name: &str) -> Self {
        let dir = |ctl: &str| mounts[ctl].join(parent).join(name);
        V1 {
            memory: dir("memory"),
            pids: dir("pids"),
            cpu: dir("cpu"),
            cpuacct: dir("cpuacct"),
            blkio: mounts.contains_key("blkio").then(|| dir("blkio")),
        }
    }

    fn dirs(&self) -> Vec<&Path> {
        let mut dirs: Vec<&Path> = vec![&self.memory, &self.pids, &self.cpu, &self.cpuacct];
        dirs.extend(self.blkio.as_deref());
        dirs.sort();
        dirs.dedup();
        dirs
    }
}

/// A v1 job cgroup's accounting files, open.
#[derive(Debug)]
pub(super) struct Counters {
    usage_user: CounterFile,
    usage_sys: CounterFile,
    max_usage: CounterFile,
    pids_peak: Option<CounterFile>,
    oom_control: CounterFile,
    pids_events: CounterFile,
}

impl Counters {
    pub(super) fn read(&self) -> Result<CgroupStats, CgroupError> {
        Ok(CgroupStats {
            // Nanoseconds.
            cpu_user: Duration::from_nanos(self.usage_user.u64()?),
            cpu_system: Duration::from_nanos(self.usage_sys.u64()?),
            memory_peak: self.max_usage.u64()?,
            pids_peak: match &self.pids_peak {
                Some(f) => f.u64()?,
                None => 0,
            },
            oom_kills: self.oom_control.keyed("oom_kill")?,
            // v1 counts no OOM without a kill (failcnt also counts reclaimed hits).
            oom_events: 0,
            pids_limit_hits: self.pids_events.keyed("max")?,
            io_read: None,
            io_write: None,
        })
    }
}

impl CgroupVersion for V1 {
    fn apply(&self, limits: &SandboxLimits) -> Result<(), CgroupError> {
        if let Some(mem) = limits.memory_bytes {
            write(&self.memory.join("memory.limit_in_bytes"), &mem.to_string())?;
            // Without swap accounting the file is absent and swap cannot be limited here;
            // where it exists, memory+swap = memory means no swap.
            let memsw = self.memory.join("memory.memsw.limit_in_bytes");
            if memsw.exists() {
                write(&memsw, &mem.to_string())?;
            }
            write(&self.memory.join("memory.swappiness"), "0")?;
        }
        if let Some(pids) = limits.pids {
            write(&self.pids.join("pids.max"), &pids.to_string())?;
        }
        if let Some(cores) = limits.cpu_quota {
            write(&self.cpu.join("cpu.cfs_period_us"), &PERIOD_US.to_string())?;
            let quota = ((cores * PERIOD_US as f64) as u64).max(1000);
            write(&self.cpu.join("cpu.cfs_quota_us"), &quota.to_string())?;
        }
        // v1 throttles the I/O a job's processes issue themselves (direct and synchronous);
        // buffered writeback is done by the kernel's flushers, charged to the root cgroup,
        // so the job's page cache (its memory limit) bounds that. A host without blkio
        // mounted has no bandwidth limit (`corral doctor` says which layout it found).
        if let (Some(bps), Some((major, minor)), Some(blkio)) = (
            limits.disk_bytes_per_second,
            limits.disk_device,
            self.blkio.as_ref(),
        ) {
            for file in [
                "blkio.throttle.read_bps_device",
                "blkio.throttle.write_bps_device",
            ] {
                write(&blkio.join(file), &format!("{major}:{minor} {bps}"))?;
            }
        }
        Ok(())
    }

    fn procs_files(&self) -> Vec<PathBuf> {
        self.dirs()
            .into_iter()
            .map(|d| d.join("cgroup.procs"))
            .collect()
    }

    fn self_join_files(&self) -> Option<Vec<PathBuf>> {
        Some(self.dirs().into_iter().map(|d| d.join("tasks")).collect())
    }

    fn self_leave_files(&self) -> Option<Vec<PathBuf>> {
        self.dirs()
            .into_iter()
            .map(|d| d.parent().map(|p| p.join("tasks")))
            .collect()
    }

    fn cpu_usage(&self) -> Result<Duration, CgroupError> {
        Ok(Duration::from_nanos(read_u64(
            &self.cpuacct.join("cpuacct.usage"),
        )?))
    }

    fn counters(&self) -> Result<super::Counters, CgroupError> {
        let open = CounterFile::open;
        Ok(super::Counters(super::CounterSet::V1(Counters {
            usage_user: open(self.cpuacct.join("cpuacct.usage_user"))?,
            usage_sys: open(self.cpuacct.join("cpuacct.usage_sys"))?,
            max_usage: open(self.memory.join("memory.max_usage_in_bytes"))?,
            // pids.peak reached v1 in Linux 6.1; older kernels report 0.
            pids_peak: CounterFile::open_optional(self.pids.join("pids.peak"))?,
            oom_control: open(self.memory.join("memory.oom_control"))?,
            pids_events: open(self.pids.join("pids.events"))?,
        })))
    }

    fn pids(&self) -> Result<Vec<i32>, CgroupError> {
        let mut all = Vec::new();
        for d in self.dirs() {
            all.extend(read_pids(&d.join("cgroup.procs"))?);
        }
        all.sort_unstable();
        all.dedup();
        Ok(all)
    }

    fn kill_all(&self) -> Result<(), CgroupError> {
        // v1 has no cgroup.kill; a fork racing this is caught by the caller's next round.
        kill_pids(&self.pids()?);
        Ok(())
    }

    fn remove(&self) -> Result<(), CgroupError> {
        for d in self.dirs() {
            rmdir(d)?;
        }
        Ok(())
    }

    fn event_counters(&self) -> Vec<EventCounter> {
        vec![
            EventCounter {
                limit: EnforcedLimit::Oom,
                file: self.memory.join("memory.oom_control"),
                key: "oom_kill",
                notice: Notice::EventControl(self.memory.join("cgroup.event_control")),
            },
            EventCounter {
                limit: EnforcedLimit::Pids,
                file: self.pids.join("pids.events"),
                key: "max",
                notice: Notice::None,
            },
        ]
    }
}

/// A fake v1 hierarchy for tests: one directory per controller in a temp dir, and the
/// mount table naming them.
#[cfg(test)]
pub(super) fn fake_mounts() -> (tempfile::TempDir, BTreeMap<String, PathBuf>) {
    let t = tempfile::tempdir().unwrap();
    let mut mounts = BTreeMap::new();
    for c in ["memory", "pids", "cpu", "cpuacct"] {
        std::fs::create_dir(t.path().join(c)).unwrap();
        mounts.insert(c.to_owned(), t.path().join(c));
    }
    (t, mounts)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fake() -> (tempfile::TempDir, V1) {
        let (t, mounts) = fake_mounts();
        let cg = V1::create(&mounts, "corral", "job1").unwrap();
        (t, cg)
    }

    #[test]
    fn limits_are_written_in_v1_units() {
        let (_t, cg) = fake();
        std::fs::write(cg.memory.join("memory.memsw.limit_in_bytes"), "").unwrap();
        let limits = SandboxLimits {
            memory_bytes: Some(256 << 20),
            pids: Some(64),
            cpu_quota: Some(0.5),
            ..SandboxLimits::default()
        };
        cg.apply(&limits).unwrap();
        let r = |p: PathBuf| std::fs::read_to_string(p).unwrap();
        assert_eq!(r(cg.memory.join("memory.limit_in_bytes")), "268435456");
        assert_eq!(
            r(cg.memory.join("memory.memsw.limit_in_bytes")),
            "268435456"
        );
        assert_eq!(r(cg.pids.join("pids.max")), "64");
        assert_eq!(r(cg.cpu.join("cpu.cfs_quota_us")), "50000");
        assert_eq!(r(cg.cpu.join("cpu.cfs_period_us")), "100000");
        assert_eq!(cg.procs_files().len(), 4);
        assert_eq!(cg.self_join_files().map(|f| f.len()), Some(4));
        // Leaving moves back into the parent of each hierarchy's job dir.
        let leave = cg.self_leave_files().unwrap();
        assert_eq!(leave.len(), 4);
        assert!(leave.contains(&cg.memory.parent().unwrap().join("tasks")));
    }

    #[test]
    fn stats_come_from_v1_counters() {
        let (_t, cg) = fake();
        let w = |p: PathBuf, s: &str| std::fs::write(p, s).unwrap();
        w(cg.cpuacct.join("cpuacct.usage_user"), "1500000000\n");
        w(cg.cpuacct.join("cpuacct.usage_sys"), "250000000\n");
        w(cg.cpuacct.join("cpuacct.usage"), "1750000000\n");
        w(cg.memory.join("memory.max_usage_in_bytes"), "123456\n");
        w(
            cg.memory.join("memory.oom_control"),
            "oom_kill_disable 0\nunder_oom 0\noom_kill 2\n",
        );
        w(cg.pids.join("pids.events"), "max 7\n");
        w(cg.pids.join("pids.peak"), "64\n");
        let s = cg.stats().unwrap();
        assert_eq!(s.cpu_user, Duration::from_millis(1500));
        assert_eq!(s.cpu_system, Duration::from_millis(250));
        assert_eq!(s.memory_peak, 123456);
        assert_eq!(s.oom_kills, 2);
        assert_eq!(s.pids_limit_hits, 7);
        assert_eq!(s.pids_peak, 64);
        assert_eq!(cg.cpu_usage().unwrap(), Duration::from_millis(1750));
    }

    #[test]
    fn counters_opened_ahead_read_what_the_files_hold_when_read() {
        let (_t, cg) = fake();
        let w = |p: PathBuf, s: &str| std::fs::write(p, s).unwrap();
        let files = [
            ("cpuacct.usage_user", &cg.cpuacct),
            ("cpuacct.usage_sys", &cg.cpuacct),
            ("memory.max_usage_in_bytes", &cg.memory),
            ("pids.events", &cg.pids),
        ];
        for (name, dir) in files {
            w(dir.join(name), "0\n");
        }
        w(cg.memory.join("memory.oom_control"), "oom_kill 0\n");
        // No pids.peak (a kernel before 6.1): 0.
        let counters = cg.counters().unwrap();
        assert_eq!(counters.read().unwrap(), CgroupStats::default());
        // The same inodes, rewritten (as the kernel's counters grow): read from the start.
        w(cg.cpuacct.join("cpuacct.usage_user"), "2000000\n");
        w(cg.memory.join("memory.max_usage_in_bytes"), "4096\n");
        w(
            cg.memory.join("memory.oom_control"),
            "oom_kill_disable 0\nunder_oom 0\noom_kill 3\n",
        );
        let s = counters.read().unwrap();
        assert_eq!(s.cpu_user, Duration::from_millis(2));
        assert_eq!((s.memory_peak, s.oom_kills, s.pids_peak), (4096, 3, 0));
        // A missing required file is an error naming it, when the counters are opened.
        std::fs::remove_file(cg.pids.join("pids.events")).unwrap();
        let err = cg.counters().unwrap_err();
        assert!(
            matches!(err, CgroupError::Read { ref path, .. } if path.ends_with("pids.events")),
            "{err:?}"
        );
    }

    #[test]
    fn garbage_counter_is_a_parse_error_naming_the_file() {
        let (_t, cg) = fake();
        std::fs::write(cg.cpuacct.join("cpuacct.usage"), "lots\n").unwrap();
        let err = cg.cpu_usage().unwrap_err();
        assert!(
            matches!(err, CgroupError::Parse { ref path, .. } if path.ends_with("cpuacct.usage"))
        );
    }
}
