//! The job dir pool against the real kernel, as root: real loop-mounted ext4 filesystems,
//! real sandbox runs writing into them (the `corral` binary under test is the sandbox
//! helper). A reused filesystem must be indistinguishable from a fresh one, a dirty one must
//! not be reused, sizes must not mix, and a crashed pool's leftovers must go at the next start.

mod common;
use common::{Ran, leaves_nothing, prerequisites, rootfs, sandbox_config, spawn_and_wait};
use std::collections::BTreeMap;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use corral_sandbox::{
    DeathReason, Exit, Identity, JobDir, JobDirPool, Network, PooledJobDir, SandboxConfig,
    SandboxLimits, SandboxSpec,
};

const MIB: u64 = 1 << 20;
const SETTLE: Duration = Duration::from_secs(30);

/// Each test has its own cgroup parent and run dir.
fn config(test: &str) -> SandboxConfig {
    sandbox_config(&format!("pool-{test}"))
}

/// Runs `script` with `sh -c` in the sandbox over `lowers` and the rootfs, on `dir`, as
/// the project whose host uid is `uid`.
fn run(test: &str, dir: &PooledJobDir, lowers: &[&Path], uid: u32, script: &str) -> Ran {
    let mut lower_dirs: Vec<PathBuf> = lowers.iter().map(|p| p.to_path_buf()).collect();
    lower_dirs.push(rootfs());
    let spec = SandboxSpec {
        lower_dirs,
        upper: dir.upper(),
        work: dir.work(),
        identity: Identity {
            host_uid: uid,
            host_gid: uid,
        },
        argv: vec!["sh".into(), "-c".into(), script.into()],
        env: vec![("PATH".to_owned(), "/usr/bin:/bin".to_owned())],
        cwd: PathBuf::from("/work"),
        limits: SandboxLimits {
            wall: Duration::from_secs(60),
            pids: Some(256),
            ..SandboxLimits::default()
        },
        network: Network::None,
        read_only_binds: vec![],
        hostname: "corral".to_owned(),
        scratch: None,
    };
    spawn_and_wait(&spec, &config(test))
}

/// What a job could observe of a job filesystem, and what could leak through it.
#[derive(Debug, PartialEq, Eq)]
struct Observed {
    /// Names at the filesystem's root.
    top: Vec<String>,
    /// Entries under `upper/` and `work/`.
    upper_entries: usize,
    work_entries: usize,
    /// (mode, uid, gid, nlink, xattr names) of the root, `upper/` and `work/`.
    inodes: Vec<(u32, u32, u32, u64, Vec<u8>)>,
    free_blocks: u64,
    free_inodes: u64,
    size: u64,
}

fn observe(dir: &Path) -> Observed {
    let mut top: Vec<String> = std::fs::read_dir(dir)
        .unwrap()
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .collect();
    top.sort();
    let count = |p: PathBuf| std::fs::read_dir(p).map_or(usize::MAX, |d| d.count());
    let inodes = [dir.to_path_buf(), dir.join("upper"), dir.join("work")]
        .iter()
        .map(|p| {
            let meta = std::fs::symlink_metadata(p).unwrap();
            let mut names = vec![0u8; 4096];
            let n = rustix::fs::llistxattr(p, &mut names[..]).unwrap();
            names.truncate(n);
            (meta.mode(), meta.uid(), meta.gid(), meta.nlink(), names)
        })
        .collect();
    let vfs = rustix::fs::statvfs(dir).unwrap();
    Observed {
        top,
        upper_entries: count(dir.join("upper")),
        work_entries: count(dir.join("work")),
        inodes,
        free_blocks: vfs.f_bfree,
        free_inodes: vfs.f_ffree,
        size: vfs.f_blocks * vfs.f_frsize,
    }
}

fn mounted_under(root: &Path) -> Vec<String> {
    let root = std::fs::canonicalize(root).unwrap();
    std::fs::read_to_string("/proc/self/mountinfo")
        .unwrap()
        .lines()
        .filter_map(|l| l.split(' ').nth(4))
        .filter(|p| Path::new(p).starts_with(&root))
        .map(str::to_owned)
        .collect()
}

/// Loop devices whose backing file is under `root`.
fn loops_under(root: &Path) -> Vec<String> {
    let root = std::fs::canonicalize(root).unwrap();
    let mut found = Vec::new();
    for entry in std::fs::read_dir("/sys/block").unwrap().flatten() {
        if let Ok(backing) = std::fs::read_to_string(entry.path().join("loop/backing_file"))
            && Path::new(backing.trim()).starts_with(&root)
        {
            found.push(format!(
                "{}: {}",
                entry.file_name().to_string_lossy(),
                backing.trim()
            ));
        }
    }
    found
}

/// Loop devices detach themselves a moment after the unmount (autoclear).
fn wait_for_no_loops(root: &Path) -> Vec<String> {
    for _ in 0..100 {
        if loops_under(root).is_empty() {
            break;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    loops_under(root)
}

/// A source-like lower dir owned by the project, so that the job can delete from it
/// (overlay then writes whiteouts and opaque dirs into the upper dir).
fn project_lower(uid: u32) -> tempfile::TempDir {
    let lower = tempfile::tempdir_in("/var/tmp").unwrap();
    let app = lower.path().join("work");
    std::fs::create_dir_all(app.join("olddir/deeper")).unwrap();
    std::fs::write(app.join("old.txt"), "old\n").unwrap();
    std::fs::write(app.join("olddir/deeper/x"), "x\n").unwrap();
    for p in [
        app.clone(),
        app.join("old.txt"),
        app.join("olddir"),
        app.join("olddir/deeper"),
        app.join("olddir/deeper/x"),
    ] {
        std::os::unix::fs::chown(&p, Some(uid), Some(uid)).unwrap();
    }
    lower
}

/// Everything a build can leave on its filesystem: files, dirs, links, a fifo, odd modes,
/// xattrs, whiteouts and opaque dirs, and then every inode it can get.
const HOSTILE: &str = r#"
set -u
mkdir -p a/b/c/d
for i in $(seq 1 50); do echo "secret $i" > a/b/file$i; done
head -c 3000000 /dev/urandom > a/b/c/big
ln a/b/file1 a/hardlink
ln -s /etc/passwd a/symlink
mkfifo a/fifo
chmod 4755 a/b/file2
chmod 0777 a/b/c
python3 -c 'import os; os.setxattr("a/b/file3", "user.note", b"PREVIOUS-PROJECT"); os.setxattr("a/b", "user.dir", b"x" * 2000)'
rm old.txt
rm -r olddir && mkdir olddir && echo new > olddir/new
mkdir -p /var/tmp/elsewhere 2>/dev/null; echo leak > /var/tmp/elsewhere/f 2>/dev/null
python3 -c '
import os
os.makedirs("many", exist_ok=True)
n = 0
try:
    while True:
        open("many/f%d" % n, "w").close()
        n += 1
except OSError as e:
    print("inodes filled after", n, "files:", e.strerror)
'
echo done
"#;

#[test]
fn a_reused_filesystem_is_indistinguishable_from_a_fresh_one() {
    if !prerequisites() {
        return;
    }
    let _dirs = leaves_nothing("pool-reuse");
    let uid = 212_001;
    let other_uid = 212_002;
    let jobs = tempfile::tempdir_in("/var/tmp").unwrap();
    let pool = JobDirPool::open(jobs.path(), 1).unwrap();
    let lower = project_lower(uid);

    let mut dir = pool.take(32 * MIB).unwrap();
    assert!(!dir.was_ready(), "an empty pool makes the first one");
    let path = dir.path().to_path_buf();
    let fresh = observe(&path);
    assert_eq!(fresh.top, ["upper", "work"]);
    assert_eq!((fresh.upper_entries, fresh.work_entries), (0, 0));

    let ran = run("reuse", &dir, &[lower.path()], uid, HOSTILE);
    assert!(
        ran.stdout.contains("inodes filled after") && ran.stdout.contains("done"),
        "the hostile build ran: {}\n{}",
        ran.stdout,
        ran.stderr
    );
    let upper = dir.upper();
    assert!(upper.join("work/a/b/file50").exists());
    let whiteout = std::fs::symlink_metadata(upper.join("work/old.txt")).unwrap();
    assert!(
        std::os::unix::fs::FileTypeExt::is_char_device(&whiteout.file_type()),
        "a whiteout in the upper dir"
    );
    let dirty = observe(&path);
    assert_eq!(dirty.free_inodes, 0, "the build took every inode");
    assert_ne!(dirty, fresh);

    dir.mark_quiescent();
    drop(dir);
    assert!(pool.settle(SETTLE));
    let stats = pool.stats();
    assert_eq!((stats.reused, stats.discarded), (1, 0), "{stats:?}");

    let dir = pool.take(32 * MIB).unwrap();
    assert!(dir.was_ready());
    assert_eq!(dir.path(), path, "the same filesystem, reused");
    assert_eq!(
        observe(&path),
        fresh,
        "the reused filesystem is exactly as fresh"
    );

    // Another project on it sees nothing of the first and writes normally.
    let ran = run(
        "reuse",
        &dir,
        &[],
        other_uid,
        "ls -A /work; ls -A /var/tmp; cat /work/a/b/file1 2>&1; echo fine > /work/mine && cat /work/mine",
    );
    assert_eq!(ran.outcome.reason, DeathReason::Completed, "{}", ran.stderr);
    assert!(!ran.stdout.contains("secret"), "{}", ran.stdout);
    assert!(!ran.stdout.contains("many"), "{}", ran.stdout);
    assert!(!ran.stdout.contains("elsewhere"), "{}", ran.stdout);
    assert!(ran.stdout.contains("fine"), "{}", ran.stdout);
    let mine = std::fs::symlink_metadata(dir.upper().join("work/mine")).unwrap();
    assert_eq!((mine.uid(), mine.gid()), (other_uid, other_uid));
    drop(dir);
    drop(pool);
    assert_eq!(mounted_under(jobs.path()), Vec::<String>::new());
    assert_eq!(wait_for_no_loops(jobs.path()), Vec::<String>::new());
}

#[test]
fn a_filesystem_that_cannot_be_made_fresh_is_not_reused() {
    if !prerequisites() {
        return;
    }
    let jobs = tempfile::tempdir_in("/var/tmp").unwrap();
    let pool = JobDirPool::open(jobs.path(), 1).unwrap();
    let mut dir = pool.take(16 * MIB).unwrap();
    let path = dir.path().to_path_buf();
    // A file still open when the dir comes back: the wipe removes its name, but its inode
    // and blocks stay allocated, so the filesystem is not as fresh.
    let held_path = dir.upper().join("held");
    std::fs::write(&held_path, vec![7u8; 2 * MIB as usize]).unwrap();
    let held = std::fs::File::open(&held_path).unwrap();
    dir.mark_quiescent();
    drop(dir);
    assert!(pool.settle(SETTLE));
    let stats = pool.stats();
    assert_eq!((stats.reused, stats.discarded), (0, 1), "{stats:?}");
    assert!(!path.exists(), "the dirty filesystem is torn down");

    // Its replacement was made ahead and is fresh.
    let dir = pool.take(16 * MIB).unwrap();
    assert!(dir.was_ready());
    assert_ne!(dir.path(), path);
    let seen = observe(dir.path());
    assert_eq!((seen.upper_entries, seen.work_entries), (0, 0));
    drop(dir);
    drop(held);
    drop(pool);
    assert_eq!(mounted_under(jobs.path()), Vec::<String>::new());
    assert_eq!(wait_for_no_loops(jobs.path()), Vec::<String>::new());
}

#[test]
fn a_dir_not_marked_quiescent_is_torn_down() {
    if !prerequisites() {
        return;
    }
    let jobs = tempfile::tempdir_in("/var/tmp").unwrap();
    let pool = JobDirPool::open(jobs.path(), 1).unwrap();
    let dir = pool.take(16 * MIB).unwrap();
    let path = dir.path().to_path_buf();
    drop(dir);
    assert!(pool.settle(SETTLE));
    assert!(!path.exists());
    assert_eq!(pool.stats().reused, 0);
    assert_ne!(pool.take(16 * MIB).unwrap().path(), path);
}

#[test]
fn sizes_are_kept_apart() {
    if !prerequisites() {
        return;
    }
    let jobs = tempfile::tempdir_in("/var/tmp").unwrap();
    let pool = JobDirPool::open(jobs.path(), 1).unwrap();
    let mut paths = BTreeMap::new();
    for size in [16 * MIB, 48 * MIB] {
        let mut dir = pool.take(size).unwrap();
        let seen = observe(dir.path());
        // ext4 keeps some of the size for itself.
        assert!(
            seen.size <= size && seen.size > size * 8 / 10,
            "{size}: {seen:?}"
        );
        paths.insert(size, dir.path().to_path_buf());
        dir.mark_quiescent();
    }
    assert!(pool.settle(SETTLE));
    assert_eq!(pool.stats().ready, 2);
    for size in [48 * MIB, 16 * MIB] {
        let dir = pool.take(size).unwrap();
        assert!(dir.was_ready());
        assert_eq!(dir.path(), paths[&size], "{size}");
        let seen = observe(dir.path());
        assert!(seen.size <= size && seen.size > size * 8 / 10, "{size}");
    }
}

/// Should the test fail half-way, a pool opened on the root removes what it leaked.
struct Recover(PathBuf);

impl Drop for Recover {
    fn drop(&mut self) {
        let _ = JobDirPool::open(&self.0, 0);
    }
}

#[test]
fn a_crashed_pools_leftovers_are_removed_at_the_next_start() {
    if !prerequisites() {
        return;
    }
    let jobs = tempfile::tempdir_in("/var/tmp").unwrap();
    let _recover_even_on_failure = Recover(jobs.path().to_path_buf());
    // A pool that dies without cleaning up: one dir in use (with a file), one ready.
    let crashed = JobDirPool::open(jobs.path(), 2).unwrap();
    // A job-named dir as the worker made them before the pool, still mounted.
    let old = JobDir::create(jobs.path(), "job-before-the-pool", 16 * MIB).unwrap();
    std::fs::write(old.upper().join("f"), "old").unwrap();
    std::mem::forget(old);
    let leased = crashed.take(16 * MIB).unwrap();
    std::fs::write(leased.upper().join("f"), "in use").unwrap();
    assert!(crashed.settle(SETTLE));
    assert_eq!(crashed.stats().ready, 1);
    let crashed_dir = crashed.dir().to_path_buf();
    std::mem::forget(leased);
    std::mem::forget(crashed);
    assert_eq!(mounted_under(jobs.path()).len(), 3);
    assert_eq!(loops_under(jobs.path()).len(), 3);

    let pool = JobDirPool::open(jobs.path(), 1).unwrap();
    let recovery = pool.recovery();
    assert!(recovery.errors.is_empty(), "{:?}", recovery.errors);
    assert_eq!(recovery.unmounted.len(), 3, "{recovery:?}");
    assert!(!crashed_dir.exists());
    assert!(!jobs.path().join("job-before-the-pool").exists());
    assert!(!jobs.path().join("job-before-the-pool.img").exists());
    assert_eq!(mounted_under(jobs.path()), Vec::<String>::new());
    assert_eq!(wait_for_no_loops(jobs.path()), Vec::<String>::new());
    let mut left: Vec<PathBuf> = std::fs::read_dir(jobs.path())
        .unwrap()
        .flatten()
        .map(|e| e.path())
        .collect();
    left.sort();
    let own = std::fs::canonicalize(pool.dir()).unwrap();
    let mut own_lock = own.as_os_str().to_owned();
    own_lock.push(".lock");
    let jobs_root = std::fs::canonicalize(jobs.path()).unwrap();
    let left: Vec<PathBuf> = left
        .iter()
        .map(|p| jobs_root.join(p.file_name().unwrap()))
        .collect();
    assert_eq!(left, [own.clone(), PathBuf::from(own_lock)]);

    // The new pool works, and leaves nothing when dropped.
    let mut dir = pool.take(16 * MIB).unwrap();
    dir.mark_quiescent();
    drop(dir);
    drop(pool);
    assert_eq!(mounted_under(jobs.path()), Vec::<String>::new());
    assert_eq!(wait_for_no_loops(jobs.path()), Vec::<String>::new());
    assert_eq!(std::fs::read_dir(jobs.path()).unwrap().count(), 0);
}

#[test]
fn the_disk_limit_holds_on_a_reused_filesystem() {
    if !prerequisites() {
        return;
    }
    let _dirs = leaves_nothing("pool-disk");
    let uid = 212_003;
    let jobs = tempfile::tempdir_in("/var/tmp").unwrap();
    let pool = JobDirPool::open(jobs.path(), 1).unwrap();
    let mut dir = pool.take(32 * MIB).unwrap();
    let ran = run(
        "disk",
        &dir,
        &[],
        uid,
        "head -c 20000000 /dev/zero > twenty && echo wrote",
    );
    assert_eq!(ran.outcome.reason, DeathReason::Completed, "{}", ran.stderr);
    dir.mark_quiescent();
    drop(dir);
    assert!(pool.settle(SETTLE));

    let dir = pool.take(32 * MIB).unwrap();
    assert!(dir.was_ready());
    // The 20 MB of the last job are free again: 20 more fit, 200 do not.
    let ran = run(
        "disk",
        &dir,
        &[],
        uid,
        "head -c 20000000 /dev/zero > again && echo fits; dd if=/dev/zero of=big bs=1M count=200",
    );
    assert!(
        ran.stdout.contains("fits"),
        "{}\n{}",
        ran.stdout,
        ran.stderr
    );
    assert_eq!(ran.outcome.reason, DeathReason::DiskLimit, "{}", ran.stderr);
    assert_ne!(ran.outcome.exit, Exit::Code(0));
    assert!(ran.stderr.contains("No space left"), "{}", ran.stderr);
}

#[test]
fn a_tree_deeper_than_path_max_is_torn_down_not_walked() {
    if !prerequisites() {
        return;
    }
    let _dirs = leaves_nothing("pool-deep");
    let jobs = tempfile::tempdir_in("/var/tmp").unwrap();
    let pool = JobDirPool::open(jobs.path(), 1).unwrap();
    let mut dir = pool.take(256 * MIB).unwrap();
    let path = dir.path().to_path_buf();
    // Far deeper than PATH_MAX, and than a recursive walk's stack would survive.
    let ran = run(
        "deep",
        &dir,
        &[],
        212_004,
        "python3 -c 'import os\nfor _ in range(9000):\n    os.mkdir(\"d\"); os.chdir(\"d\")\nprint(\"deep\")'",
    );
    assert!(
        ran.stdout.contains("deep"),
        "{}\n{}",
        ran.stdout,
        ran.stderr
    );
    dir.mark_quiescent();
    drop(dir);
    assert!(pool.settle(SETTLE));
    let stats = pool.stats();
    assert_eq!((stats.reused, stats.discarded), (0, 1), "{stats:?}");
    assert!(!path.exists());
    let dir = pool.take(256 * MIB).unwrap();
    assert!(dir.was_ready());
    assert_eq!(observe(dir.path()).upper_entries, 0);
}
