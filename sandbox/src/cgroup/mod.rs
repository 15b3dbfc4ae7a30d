//! Job cgroups: discovery of the host's hierarchy (v2, or v1 with one mount per
//! controller), creation with limits, accounting and event counters, killing and removal.
//! Both versions sit behind [`CgroupVersion`]; discovery takes the mountinfo text as a
//! parameter so tests run on fake trees. [`REQUIRE_ENV`] pins the version a host must
//! offer (CI on a pure-v2 kernel must not pass by quietly running the v1 path).

mod pool;
mod v1;
mod v2;

use std::collections::BTreeMap;
use std::io;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::{Deserialize, Serialize};

pub use pool::{CgroupPool, CgroupPoolStats};
pub use v1::V1;
pub use v2::V2;

use crate::spec::SandboxLimits;

#[derive(Debug, thiserror::Error)]
pub enum CgroupError {
    #[error(
        "no usable cgroup hierarchy: cgroup v2 {v2}; cgroup v1 lacks the controllers {v1_missing:?}"
    )]
    NoUsableHierarchy { v2: String, v1_missing: Vec<String> },
    #[error("{REQUIRE_ENV}={wanted} but this host offers {found}")]
    WrongVersion { wanted: String, found: String },
    #[error("{REQUIRE_ENV}={0:?} is neither v1 nor v2")]
    BadRequirement(String),
    #[error(
        "the controllers {missing:?} are not delegated to {dir} (absent from its cgroup.controllers: \
         the cgroup above it must enable them, e.g. systemd's Delegate=yes)"
    )]
    NotDelegated { dir: PathBuf, missing: Vec<String> },
    #[error("creating cgroup {path}")]
    Create { path: PathBuf, source: io::Error },
    #[error("writing {value:?} to {path}")]
    Write {
        path: PathBuf,
        value: String,
        source: io::Error,
    },
    #[error("reading {path}")]
    Read { path: PathBuf, source: io::Error },
    #[error("malformed {path}: {line:?}")]
    Parse { path: PathBuf, line: String },
    #[error("removing cgroup {path}")]
    Remove { path: PathBuf, source: io::Error },
}

/// What the job's cgroup counted. Read once the job is dead.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct CgroupStats {
    pub cpu_user: Duration,
    pub cpu_system: Duration,
    pub memory_peak: u64,
    pub pids_peak: u64,
    /// Processes the memory controller killed for exceeding the limit.
    pub oom_kills: u64,
    /// Times the job hit its memory limit and reclaim could not make room (v2 `oom` in
    /// `memory.events`), whether or not a process was killed for it.
    #[serde(default)]
    pub oom_events: u64,
    /// Times the pids controller refused a fork or clone.
    pub pids_limit_hits: u64,
    pub io_read: Option<u64>,
    pub io_write: Option<u64>,
}

/// The operations that differ between cgroup v1 and v2.
pub trait CgroupVersion {
    /// Writes the memory (no swap), pids and CPU quota limits.
    fn apply(&self, limits: &SandboxLimits) -> Result<(), CgroupError>;
    /// Files the job's first process is written to (one per hierarchy for v1).
    fn procs_files(&self) -> Vec<PathBuf>;
    /// Files a single-threaded process writes `0` to, to move itself in. A thread moving
    /// itself skips the global threadgroup lock, whose write side waits for an RCU grace
    /// period (milliseconds) — the dominant cost of joining a v1 cgroup. `None` on v2,
    /// where a domain cgroup only takes whole processes.
    fn self_join_files(&self) -> Option<Vec<PathBuf>>;
    /// Where a process that joined with [`CgroupVersion::self_join_files`] writes `0` to
    /// leave again, into the parent cgroup (same cheap self-move). `None` on v2.
    fn self_leave_files(&self) -> Option<Vec<PathBuf>>;
    /// Total CPU time so far (user + system), for the CPU-seconds limit.
    fn cpu_usage(&self) -> Result<Duration, CgroupError>;
    /// The files [`Counters::read`] reads, opened now.
    fn counters(&self) -> Result<Counters, CgroupError>;
    /// What the cgroup counted so far: [`CgroupVersion::counters`], read once.
    fn stats(&self) -> Result<CgroupStats, CgroupError> {
        self.counters()?.read()
    }
    /// Pids still in the cgroup.
    fn pids(&self) -> Result<Vec<i32>, CgroupError>;
    /// Kills every process in the cgroup (repeat until [`CgroupVersion::pids`] is empty).
    fn kill_all(&self) -> Result<(), CgroupError>;
    /// Removes the (empty) cgroup directories.
    fn remove(&self) -> Result<(), CgroupError>;
    /// The counters of limits the kernel enforced, and how it tells of a change, for
    /// watching them while the job runs.
    fn event_counters(&self) -> Vec<EventCounter>;
}

/// The accounting files of one job cgroup, open. Opened ahead (a pooled cgroup's are
/// opened by the pool's thread when it makes the cgroup), reading them when the job ends
/// costs a `pread` or two per file instead of a path walk, an open, a stat and a close.
/// Each [`Counters::read`] reads them afresh from the start.
#[derive(Debug)]
pub struct Counters(CounterSet);

#[derive(Debug)]
enum CounterSet {
    V1(v1::Counters),
    V2(v2::Counters),
}

impl Counters {
    pub fn read(&self) -> Result<CgroupStats, CgroupError> {
        match &self.0 {
            CounterSet::V1(c) => c.read(),
            CounterSet::V2(c) => c.read(),
        }
    }
}

/// One open cgroup file and its path (for errors).
#[derive(Debug)]
pub(crate) struct CounterFile {
    path: PathBuf,
    file: std::fs::File,
}

impl CounterFile {
    pub(crate) fn open(path: PathBuf) -> Result<CounterFile, CgroupError> {
        match std::fs::File::open(&path) {
            Ok(file) => Ok(CounterFile { path, file }),
            Err(source) => Err(CgroupError::Read { path, source }),
        }
    }

    /// `None` when the kernel has no such file (a counter newer than it).
    pub(crate) fn open_optional(path: PathBuf) -> Result<Option<CounterFile>, CgroupError> {
        match Self::open(path) {
            Ok(f) => Ok(Some(f)),
            Err(CgroupError::Read { source, .. }) if source.kind() == io::ErrorKind::NotFound => {
                Ok(None)
            }
            Err(err) => Err(err),
        }
    }

    /// The whole file, read from its start (kernfs regenerates it at offset 0).
    pub(crate) fn text(&self) -> Result<String, CgroupError> {
        use std::os::unix::fs::FileExt;
        let mut text = Vec::new();
        let mut chunk = [0u8; 1024];
        loop {
            match self.file.read_at(&mut chunk, text.len() as u64) {
                Ok(0) => break,
                Ok(n) => text.extend_from_slice(&chunk[..n]),
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(source) => {
                    return Err(CgroupError::Read {
                        path: self.path.clone(),
                        source,
                    });
                }
            }
        }
        String::from_utf8(text).map_err(|e| CgroupError::Parse {
            path: self.path.clone(),
            line: String::from_utf8_lossy(e.as_bytes()).into_owned(),
        })
    }

    /// The file's one integer (`max` counts as `u64::MAX`).
    pub(crate) fn u64(&self) -> Result<u64, CgroupError> {
        parse_u64(&self.path, &self.text()?)
    }

    /// The value of `key` in this flat keyed file, 0 when absent.
    pub(crate) fn keyed(&self, key: &str) -> Result<u64, CgroupError> {
        keyed_in(&self.path, &self.text()?, key)
    }
}

/// A counter in a flat keyed cgroup file that grows each time the kernel enforces a limit.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EventCounter {
    pub limit: EnforcedLimit,
    pub file: PathBuf,
    pub key: &'static str,
    pub notice: Notice,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EnforcedLimit {
    /// The memory controller killed a process.
    Oom,
    /// The pids controller refused a fork or clone.
    Pids,
}

/// How the kernel tells that a counter may have changed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Notice {
    /// kernfs raises `IN_MODIFY` on the file itself (v2 event files).
    Inotify,
    /// An eventfd registered as `<eventfd> <fd of file>` in this `cgroup.event_control`
    /// (v1 `memory.oom_control`); it fires when the cgroup goes out of memory, before the
    /// kill is counted.
    EventControl(PathBuf),
    /// No notification (v1 `pids.events`, checked on Linux 6.18): read now and then.
    None,
}

/// Where the controllers live on this host.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Layout {
    /// The unified hierarchy with memory, pids and cpu available.
    V2 { root: PathBuf },
    /// Legacy hierarchies: controller name → mount point.
    V1 { mounts: BTreeMap<String, PathBuf> },
}

impl Layout {
    /// `v1` or `v2`, as [`REQUIRE_ENV`] names them.
    pub fn version(&self) -> &'static str {
        match self {
            Layout::V2 { .. } => "v2",
            Layout::V1 { .. } => "v1",
        }
    }

    /// One line for an operator: the version and where its controllers are.
    pub fn describe(&self) -> String {
        match self {
            Layout::V2 { root } => format!("cgroup v2 (unified) at {}", root.display()),
            Layout::V1 { mounts } => {
                let at: Vec<String> = mounts
                    .iter()
                    .map(|(c, p)| format!("{c} at {}", p.display()))
                    .collect();
                format!("cgroup v1 ({})", at.join(", "))
            }
        }
    }
}

/// Environment variable naming the cgroup version this host must offer (`v1` or `v2`).
pub const REQUIRE_ENV: &str = "CORRAL_REQUIRE_CGROUP";

/// Checks `layout` against a required version (the value of [`REQUIRE_ENV`]; `None` or
/// empty accepts either).
pub fn check_required(layout: &Layout, required: Option<&str>) -> Result<(), CgroupError> {
    match required.map(str::trim) {
        None | Some("") => Ok(()),
        Some(wanted @ ("v1" | "v2")) if wanted == layout.version() => Ok(()),
        Some(wanted @ ("v1" | "v2")) => Err(CgroupError::WrongVersion {
            wanted: wanted.to_owned(),
            found: layout.describe(),
        }),
        Some(other) => Err(CgroupError::BadRequirement(other.to_owned())),
    }
}

/// The hierarchy of the running process, checked against [`REQUIRE_ENV`].
pub fn host_layout() -> Result<Layout, CgroupError> {
    let mountinfo = crate::mountinfo::read_own().map_err(|source| CgroupError::Read {
        path: PathBuf::from("/proc/self/mountinfo"),
        source,
    })?;
    discover_required(&mountinfo)
}

/// [`discover`], then [`check_required`] against [`REQUIRE_ENV`]. A wrong version is
/// reported even when discovery finds nothing usable: the requirement is the question.
pub fn discover_required(mountinfo: &str) -> Result<Layout, CgroupError> {
    let required = std::env::var(REQUIRE_ENV).ok();
    let layout = discover(mountinfo);
    if let (Some(wanted), Err(err)) = (required.as_deref(), &layout)
        && !wanted.trim().is_empty()
    {
        return Err(CgroupError::WrongVersion {
            wanted: wanted.trim().to_owned(),
            found: format!("no usable hierarchy: {err}"),
        });
    }
    let layout = layout?;
    check_required(&layout, required.as_deref())?;
    Ok(layout)
}

/// Controllers the sandbox needs.
const V1_CONTROLLERS: [&str; 4] = ["memory", "pids", "cpu", "cpuacct"];
/// Used where mounted (the disk bandwidth limit), not required.
const V1_OPTIONAL: [&str; 1] = ["blkio"];
const V2_CONTROLLERS: [&str; 3] = ["memory", "pids", "cpu"];
/// Enabled for jobs where delegated: per-build I/O accounting (`io.stat`).
const V2_OPTIONAL: [&str; 1] = ["io"];

/// Finds a usable hierarchy from `/proc/self/mountinfo` text: v2 when it offers the
/// controllers, otherwise v1 when each controller is mounted. Reads `cgroup.controllers`
/// below the v2 mount point found in `mountinfo`.
pub fn discover(mountinfo: &str) -> Result<Layout, CgroupError> {
    let mut v2_root = None;
    let mut v1 = BTreeMap::new();
    for entry in crate::mountinfo::entries(mountinfo) {
        let mount_point = entry.mount_point;
        match entry.fstype.as_str() {
            "cgroup2" => v2_root = Some(mount_point),
            "cgroup" => {
                for opt in entry.super_options.split(',') {
                    if V1_CONTROLLERS.contains(&opt) || V1_OPTIONAL.contains(&opt) {
                        v1.entry(opt.to_owned())
                            .or_insert_with(|| mount_point.clone());
                    }
                }
            }
            _ => {}
        }
    }
    let v2_verdict = match &v2_root {
        None => "is not mounted".to_owned(),
        Some(root) => {
            let file = root.join("cgroup.controllers");
            match std::fs::read_to_string(&file) {
                Ok(text) => {
                    let have: Vec<&str> = text.split_whitespace().collect();
                    let missing: Vec<&str> = V2_CONTROLLERS
                        .iter()
                        .copied()
                        .filter(|c| !have.contains(c))
                        .collect();
                    if missing.is_empty() {
                        return Ok(Layout::V2 { root: root.clone() });
                    }
                    format!("at {} lacks the controllers {missing:?}", root.display())
                }
                Err(err) => format!("at {} is unreadable: {err}", root.display()),
            }
        }
    };
    let v1_missing: Vec<String> = V1_CONTROLLERS
        .iter()
        .filter(|c| !v1.contains_key(**c))
        .map(|c| (*c).to_owned())
        .collect();
    if v1_missing.is_empty() {
        return Ok(Layout::V1 { mounts: v1 });
    }
    Err(CgroupError::NoUsableHierarchy {
        v2: v2_verdict,
        v1_missing,
    })
}

/// The limits `spec` asks of its cgroup: its own, with the block device under its upper dir
/// for a disk bandwidth limit (none for a scratch upper, which lives on a tmpfs).
pub fn limits_for(spec: &crate::SandboxSpec) -> SandboxLimits {
    let mut limits = spec.limits.clone();
    if limits.disk_bytes_per_second.is_some() && limits.disk_device.is_none() {
        limits.disk_device = spec
            .scratch
            .is_none()
            .then(|| block_device_of(&spec.upper, Path::new("/sys/dev/block")))
            .flatten();
    }
    limits
}

/// The whole disk (major, minor) holding `path`, from `sys_dev_block` (`/sys/dev/block`):
/// the kernel throttles whole disks only, so a partition gives its disk. None for a
/// filesystem on no block device (tmpfs, overlay: major 0).
pub fn block_device_of(path: &Path, sys_dev_block: &Path) -> Option<(u32, u32)> {
    use std::os::unix::fs::MetadataExt;
    let dev = std::fs::metadata(path).ok()?.dev();
    let (major, minor) = (libc::major(dev), libc::minor(dev));
    if major == 0 {
        return None;
    }
    let entry = sys_dev_block.join(format!("{major}:{minor}"));
    if !entry.join("partition").exists() {
        return Some((major, minor));
    }
    // A partition's sysfs dir sits in its disk's, whose `dev` says `major:minor`.
    let disk = std::fs::canonicalize(&entry).ok()?.parent()?.join("dev");
    let text = std::fs::read_to_string(disk).ok()?;
    let (ma, mi) = text.trim().split_once(':')?;
    Some((ma.parse().ok()?, mi.parse().ok()?))
}

/// One job's cgroup, of whichever version the host offers.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum JobCgroup {
    V1(V1),
    V2(V2),
}

impl JobCgroup {
    /// Creates `<parent>/<name>` in the hierarchy (and the parent when missing).
    pub fn create(layout: &Layout, parent: &str, name: &str) -> Result<Self, CgroupError> {
        match layout {
            Layout::V1 { mounts } => V1::create(mounts, parent, name).map(JobCgroup::V1),
            Layout::V2 { root } => V2::create(root, parent, name).map(JobCgroup::V2),
        }
    }

    pub fn version(&self) -> &dyn CgroupVersion {
        match self {
            JobCgroup::V1(v) => v,
            JobCgroup::V2(v) => v,
        }
    }

    /// Kills what is left, waits for the cgroup to be empty, and removes it. The usual case
    /// (everything already dead) costs only the removal: the kernel refuses to remove a
    /// cgroup that still has processes, and only then are they looked for and killed.
    pub fn destroy(&self) -> Result<(), CgroupError> {
        let cg = self.version();
        for attempt in 0..200 {
            match cg.remove() {
                Ok(()) => return Ok(()),
                Err(err) if attempt == 199 => return Err(err),
                Err(_) => {}
            }
            let left = cg.pids()?;
            if !left.is_empty() {
                cg.kill_all()?;
            }
            std::thread::sleep(Duration::from_millis(if attempt < 20 { 1 } else { 10 }));
        }
        cg.remove()
    }
}

/// What [`remove_stale`] did.
#[derive(Debug, Default)]
pub struct StaleCgroups {
    /// Job cgroups removed (by name under the parent).
    pub removed: Vec<String>,
    /// Those that could not be removed, with why.
    pub errors: Vec<CgroupError>,
}

static SEQUENCE: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);

/// A new job cgroup's name, unique in this process: `job-<pid>-<sequence>` (what
/// [`remove_stale`] recognises once the process is gone).
pub(crate) fn job_cgroup_name() -> String {
    format!(
        "job-{}-{}",
        std::process::id(),
        SEQUENCE.fetch_add(1, std::sync::atomic::Ordering::Relaxed)
    )
}

/// The process that made a job cgroup: its names are `job-<pid>-<sequence>`
/// ([`crate::Sandbox`] names them so).
fn job_cgroup_owner(name: &str) -> Option<i32> {
    let (pid, seq) = name.strip_prefix("job-")?.split_once('-')?;
    seq.parse::<u64>().ok()?;
    pid.parse().ok()
}

/// Removes the job cgroups under `parent` whose maker is gone: a worker killed with SIGKILL
/// (or a crashed host service) never removes its jobs' cgroups, and a cgroup outlives its
/// processes. What is still inside one is killed first. A cgroup whose maker still runs
/// (another worker sharing the parent) is left alone.
pub fn remove_stale(layout: &Layout, parent: &str) -> StaleCgroups {
    let parent = parent.trim_matches('/');
    let dirs: Vec<PathBuf> = match layout {
        Layout::V2 { root } => vec![root.join(parent)],
        Layout::V1 { mounts } => {
            let mut d: Vec<PathBuf> = mounts.values().map(|m| m.join(parent)).collect();
            d.sort();
            d.dedup();
            d
        }
    };
    let own = std::process::id() as i32;
    let mut names: Vec<String> = dirs
        .iter()
        .filter_map(|d| std::fs::read_dir(d).ok())
        .flat_map(|entries| entries.flatten())
        .filter(|e| e.file_type().is_ok_and(|t| t.is_dir()))
        .filter_map(|e| e.file_name().into_string().ok())
        .filter(|name| {
            job_cgroup_owner(name)
                .is_some_and(|pid| pid != own && !Path::new(&format!("/proc/{pid}")).exists())
        })
        .collect();
    names.sort();
    names.dedup();
    let mut out = StaleCgroups::default();
    for name in names {
        let cg = match layout {
            Layout::V2 { root } => JobCgroup::V2(V2 {
                dir: root.join(parent).join(&name),
            }),
            Layout::V1 { mounts } => JobCgroup::V1(V1::at(mounts, parent, &name)),
        };
        match cg.destroy() {
            Ok(()) => out.removed.push(name),
            Err(err) => out.errors.push(err),
        }
    }
    out
}

pub fn write(path: &Path, value: &str) -> Result<(), CgroupError> {
    std::fs::write(path, value).map_err(|source| CgroupError::Write {
        path: path.to_owned(),
        value: value.to_owned(),
        source,
    })
}

pub(crate) fn read(path: &Path) -> Result<String, CgroupError> {
    std::fs::read_to_string(path).map_err(|source| CgroupError::Read {
        path: path.to_owned(),
        source,
    })
}

/// Reads a file holding one integer (`max` counts as `u64::MAX`).
pub(crate) fn read_u64(path: &Path) -> Result<u64, CgroupError> {
    parse_u64(path, &read(path)?)
}

fn parse_u64(path: &Path, text: &str) -> Result<u64, CgroupError> {
    let t = text.trim();
    if t == "max" {
        return Ok(u64::MAX);
    }
    t.parse().map_err(|_| CgroupError::Parse {
        path: path.to_owned(),
        line: t.to_owned(),
    })
}

/// Value of `key` in a flat keyed file (`key value` per line), 0 when absent.
pub(crate) fn keyed(path: &Path, key: &str) -> Result<u64, CgroupError> {
    keyed_in(path, &read(path)?, key)
}

/// Value of `key` in the text of a flat keyed file read from `path`, 0 when absent.
fn keyed_in(path: &Path, text: &str, key: &str) -> Result<u64, CgroupError> {
    for line in text.lines() {
        let mut it = line.split_whitespace();
        if it.next() == Some(key) {
            let v = it.next().unwrap_or("");
            return v.parse().map_err(|_| CgroupError::Parse {
                path: path.to_owned(),
                line: line.to_owned(),
            });
        }
    }
    Ok(0)
}

pub(crate) fn read_pids(path: &Path) -> Result<Vec<i32>, CgroupError> {
    match std::fs::read_to_string(path) {
        Ok(text) => Ok(text.lines().filter_map(|l| l.trim().parse().ok()).collect()),
        Err(err) if err.kind() == io::ErrorKind::NotFound => Ok(Vec::new()),
        Err(source) => Err(CgroupError::Read {
            path: path.to_owned(),
            source,
        }),
    }
}

pub(crate) fn kill_pids(pids: &[i32]) {
    for &pid in pids {
        // A pid that already exited is fine: we only need the cgroup to drain.
        let _ = crate::sys::kill(pid, libc::SIGKILL);
    }
}

pub(crate) fn mkdir(path: &Path) -> Result<(), CgroupError> {
    match std::fs::create_dir(path) {
        Ok(()) => Ok(()),
        Err(err) if err.kind() == io::ErrorKind::AlreadyExists => Ok(()),
        Err(source) => Err(CgroupError::Create {
            path: path.to_owned(),
            source,
        }),
    }
}

pub(crate) fn rmdir(path: &Path) -> Result<(), CgroupError> {
    match std::fs::remove_dir(path) {
        Ok(()) => Ok(()),
        Err(err) if err.kind() == io::ErrorKind::NotFound => Ok(()),
        Err(source) => Err(CgroupError::Remove {
            path: path.to_owned(),
            source,
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const THIS_HOST: &str = "\
31 23 0:28 / /sys/fs/cgroup rw,relatime - tmpfs tmpfs rw,mode=755
32 31 0:29 / CG/cpu rw,relatime - cgroup cgroup rw,cpu
33 31 0:30 / CG/cpuacct rw,relatime - cgroup cgroup rw,cpuacct
35 31 0:32 / CG/memory rw,relatime - cgroup cgroup rw,memory
39 31 0:36 / CG/pids rw,relatime - cgroup cgroup rw,pids
41 31 0:38 / CG/unified rw,relatime - cgroup2 cgroup2 rw
";

    fn fake_tree(controllers: &str) -> (tempfile::TempDir, String) {
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir(dir.path().join("unified")).unwrap();
        std::fs::write(dir.path().join("unified/cgroup.controllers"), controllers).unwrap();
        let info = THIS_HOST.replace("CG", dir.path().to_str().unwrap());
        (dir, info)
    }

    #[test]
    fn job_cgroups_of_a_dead_maker_are_removed_and_others_kept() {
        let t = tempfile::tempdir().unwrap();
        let mounts: BTreeMap<String, PathBuf> = ["memory", "pids", "cpu", "cpuacct"]
            .iter()
            .map(|c| ((*c).to_owned(), t.path().join(c)))
            .collect();
        let layout = Layout::V1 { mounts };
        // Above the kernel's largest pid_max: never a live process.
        let dead = 4_194_305;
        let own = std::process::id();
        let names = [
            format!("job-{dead}-1"),
            format!("job-{dead}-22"),
            format!("job-{own}-3"),
            "job-1-4".to_owned(),
            "job-x-1".to_owned(),
            "worker".to_owned(),
        ];
        for ctl in ["memory", "pids", "cpu", "cpuacct"] {
            for name in &names {
                std::fs::create_dir_all(t.path().join(ctl).join("corral").join(name)).unwrap();
            }
        }
        let stale = remove_stale(&layout, "/corral");
        assert_eq!(
            stale.removed,
            vec![format!("job-{dead}-1"), format!("job-{dead}-22")]
        );
        assert!(stale.errors.is_empty(), "{:?}", stale.errors);
        for ctl in ["memory", "pids", "cpu", "cpuacct"] {
            let mut left: Vec<String> = std::fs::read_dir(t.path().join(ctl).join("corral"))
                .unwrap()
                .map(|e| e.unwrap().file_name().into_string().unwrap())
                .collect();
            left.sort();
            let mut kept = vec![
                format!("job-{own}-3"),
                "job-1-4".to_owned(),
                "job-x-1".to_owned(),
                "worker".to_owned(),
            ];
            kept.sort();
            assert_eq!(left, kept);
        }
        // No parent yet (a first start): nothing to do.
        assert!(remove_stale(&layout, "absent").removed.is_empty());
    }

    #[test]
    fn controllerless_v2_falls_back_to_v1() {
        let (dir, info) = fake_tree("\n");
        let layout = discover(&info).unwrap();
        let Layout::V1 { mounts } = layout else {
            panic!("expected v1, got {layout:?}")
        };
        assert_eq!(mounts["memory"], dir.path().join("memory"));
        assert_eq!(mounts["cpuacct"], dir.path().join("cpuacct"));
    }

    #[test]
    fn v2_with_controllers_wins() {
        let (dir, info) = fake_tree("cpuset cpu io memory pids\n");
        assert_eq!(
            discover(&info).unwrap(),
            Layout::V2 {
                root: dir.path().join("unified")
            }
        );
    }

    #[test]
    fn comounted_v1_controllers_are_found() {
        let info = "1 0 0:1 / /cg/cpu,cpuacct rw - cgroup cgroup rw,cpu,cpuacct\n\
                    2 0 0:2 / /cg/memory rw - cgroup cgroup rw,memory\n\
                    3 0 0:3 / /cg/pids rw - cgroup cgroup rw,pids\n";
        let Layout::V1 { mounts } = discover(info).unwrap() else {
            panic!()
        };
        assert_eq!(mounts["cpu"], PathBuf::from("/cg/cpu,cpuacct"));
        assert_eq!(mounts["cpuacct"], PathBuf::from("/cg/cpu,cpuacct"));
    }

    #[test]
    fn neither_version_usable_is_a_typed_error() {
        let (_dir, info) = fake_tree("cpu\n");
        let info: String = info
            .lines()
            .filter(|l| !l.contains("memory"))
            .map(|l| format!("{l}\n"))
            .collect();
        match discover(&info) {
            Err(CgroupError::NoUsableHierarchy { v1_missing, v2 }) => {
                assert_eq!(v1_missing, vec!["memory".to_owned()]);
                assert!(v2.contains("lacks"), "{v2}");
            }
            other => panic!("expected NoUsableHierarchy, got {other:?}"),
        }
        let err = discover("").unwrap_err();
        assert!(err.to_string().contains("not mounted"), "{err}");
    }

    #[test]
    fn a_required_version_is_checked_and_names_what_was_found() {
        let (dir, info) = fake_tree("cpu io memory pids\n");
        let v2 = discover(&info).unwrap();
        let (_d, info1) = fake_tree("\n");
        let v1 = discover(&info1).unwrap();
        for ok in [None, Some(""), Some("v2"), Some(" v2\n")] {
            check_required(&v2, ok).unwrap();
        }
        check_required(&v1, Some("v1")).unwrap();
        let err = check_required(&v1, Some("v2")).unwrap_err();
        let msg = err.to_string();
        assert!(
            msg.starts_with("CORRAL_REQUIRE_CGROUP=v2 but this host offers cgroup v1 ("),
            "{msg}"
        );
        assert!(msg.contains("memory at "), "{msg}");
        let err = check_required(&v2, Some("v1")).unwrap_err().to_string();
        assert!(
            err.contains(&format!(
                "cgroup v2 (unified) at {}",
                dir.path().join("unified").display()
            )),
            "{err}"
        );
        assert!(matches!(
            check_required(&v2, Some("2")),
            Err(CgroupError::BadRequirement(v)) if v == "2"
        ));
    }

    #[test]
    fn mount_points_are_unescaped() {
        assert_eq!(
            crate::mountinfo::unescape("/a\\040b"),
            PathBuf::from("/a b")
        );
        assert_eq!(
            crate::mountinfo::unescape("/plain"),
            PathBuf::from("/plain")
        );
    }
}
