//! Test support every integration test shares: the binary under test, where the repository
//! and the test rootfs are, a scratch data dir, and prerequisites that fail under `CI=true`
//! and skip visibly elsewhere (a `SKIPPED:` line on the terminal, counted by `scripts/test`).
//! Each test crate uses a part of it.
#![allow(dead_code)]

use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::process::Command;

/// The repository root (fixtures, scripts).
pub fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("the worker crate sits in the workspace")
        .to_path_buf()
}

/// Whether `tool` is on PATH.
pub fn have(tool: &str) -> bool {
    std::process::Command::new("sh")
        .args(["-c", &format!("command -v {tool}")])
        .stdout(std::process::Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

/// The `corral` command as a user runs it: from the repository root (fixture paths are
/// relative to it), with a quiet log and none of the caller's `CORRAL_*` settings, which
/// would otherwise point the command under test at the developer's own data dir or broker.
pub fn corral() -> Command {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_corral"));
    cmd.current_dir(repo()).env("RUST_LOG", "warn,lapin=error");
    without_corral_settings(&mut cmd);
    cmd
}

/// Removes the caller's `CORRAL_*` settings (but not `CORRAL_TEST_*`) from `cmd`'s
/// environment.
pub fn without_corral_settings(cmd: &mut Command) -> &mut Command {
    for (key, _) in std::env::vars_os() {
        if key.to_str().is_some_and(|k| {
            // A required cgroup version is the host's property, not the caller's.
            k.starts_with("CORRAL_")
                && !k.starts_with("CORRAL_TEST_")
                && k != corral_sandbox::REQUIRE_CGROUP_ENV
        }) {
            cmd.env_remove(key);
        }
    }
    cmd
}

/// A fresh, empty data dir (or any scratch dir), removed when dropped.
pub fn scratch() -> tempfile::TempDir {
    tempfile::Builder::new()
        .prefix("corral-test-")
        .tempdir()
        .expect("creating a scratch dir")
}

/// Where `scripts/test` collects the skipped tests, to count them at the end of the run.
pub const SKIP_LOG_VAR: &str = "CORRAL_TEST_SKIP_LOG";

/// A missing prerequisite fails under `CI=true`. Elsewhere the test skips, and says so where
/// it is seen: libtest captures `eprintln!` of passing tests, so the `SKIPPED:` line goes
/// straight to the terminal's stderr, and to the skip log when `scripts/test` names one.
pub fn require(cond: bool, what: &str) -> bool {
    if cond {
        return true;
    }
    if std::env::var("CI").as_deref() == Ok("true") {
        panic!("prerequisite missing under CI=true: {what}");
    }
    let test = std::thread::current().name().unwrap_or("a test").to_owned();
    let line = format!("SKIPPED: {test}: prerequisite missing: {what}\n");
    let _ = std::io::stderr().write_all(line.as_bytes());
    if let Some(log) = std::env::var_os(SKIP_LOG_VAR)
        && let Ok(mut file) = std::fs::OpenOptions::new()
            .append(true)
            .create(true)
            .open(log)
    {
        let _ = file.write_all(line.as_bytes());
    }
    false
}

pub fn rootfs() -> PathBuf {
    std::env::var_os("CORRAL_TEST_ROOTFS")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("/var/cache/corral-test/rootfs"))
}

pub fn is_root() -> bool {
    std::fs::read_to_string("/proc/self/status")
        .map(|s| {
            s.lines()
                .any(|l| l.starts_with("Uid:") && l.split_whitespace().nth(2) == Some("0"))
        })
        .unwrap_or(false)
}

/// Root, the test rootfs, loop devices and mkfs.ext4: what real sandboxes need.
pub fn prerequisites() -> bool {
    require(is_root(), "running as root")
        && require(
            rootfs().join("usr/bin/python3").exists(),
            "the test rootfs with python3 ($CORRAL_TEST_ROOTFS)",
        )
        && require(
            Path::new("/dev/loop-control").exists(),
            "loop devices (modprobe loop)",
        )
        && require(
            std::process::Command::new("mkfs.ext4")
                .arg("-V")
                .output()
                .is_ok(),
            "mkfs.ext4 (e2fsprogs)",
        )
}

/// A sandbox config of its own for one test (cgroup parent and run dir named after it), so
/// that tests' checks for leftovers do not see each other's live jobs.
pub fn sandbox_config(name: &str) -> corral_sandbox::SandboxConfig {
    corral_sandbox::SandboxConfig {
        helper_exe: PathBuf::from(env!("CARGO_BIN_EXE_corral-worker")),
        cgroup_parent: format!("corral-test-{name}"),
        run_dir: PathBuf::from(format!("/run/corral-test-{name}")),
        mountinfo: None,
        zygote: None,
        cgroup_pool: None,
    }
}

/// Removes, when dropped at the end of a test, what [`sandbox_config`] names for it and what
/// outlives its jobs: the empty per-test cgroup parent in every hierarchy and the run dir
/// with its empty mount points. Only empty directories go (`rmdir`), so a leftover job
/// cgroup or a mount still fails the test's own checks instead of vanishing here.
pub struct TestDirs {
    name: String,
}

/// The guard for `sandbox_config(name)`; hold it for the whole test: `let _dirs = leaves_nothing("x");`.
pub fn leaves_nothing(name: &str) -> TestDirs {
    TestDirs {
        name: name.to_owned(),
    }
}

impl Drop for TestDirs {
    fn drop(&mut self) {
        let parent = format!("corral-test-{}", self.name);
        let root = Path::new("/sys/fs/cgroup");
        // cgroup v2 (the unified root) and every v1 hierarchy below it.
        let _ = std::fs::remove_dir(root.join(&parent));
        if let Ok(hierarchies) = std::fs::read_dir(root) {
            for hierarchy in hierarchies.flatten() {
                let _ = std::fs::remove_dir(hierarchy.path().join(&parent));
            }
        }
        let run = PathBuf::from(format!("/run/{parent}"));
        if let Ok(entries) = std::fs::read_dir(&run) {
            for entry in entries.flatten() {
                let _ = std::fs::remove_dir(entry.path());
            }
        }
        let _ = std::fs::remove_dir(&run);
    }
}

/// What a run produced, as a user would see it.
pub struct Ran {
    pub outcome: corral_sandbox::Outcome,
    pub stdout: String,
    pub stderr: String,
    /// The live events, each with the time it reached us.
    pub events: Vec<(corral_sandbox::LiveEvent, std::time::SystemTime)>,
}

/// Reads a job's output stream to its end on a thread of its own.
pub fn drain(r: Option<impl std::io::Read + Send + 'static>) -> std::thread::JoinHandle<String> {
    std::thread::spawn(move || {
        let mut s = String::new();
        if let Some(mut r) = r {
            let _ = r.read_to_string(&mut s);
        }
        s
    })
}

/// Runs `spec` with `config` to its end, collecting both output streams.
pub fn spawn_and_wait(
    spec: &corral_sandbox::SandboxSpec,
    config: &corral_sandbox::SandboxConfig,
) -> Ran {
    let mut running = corral_sandbox::Sandbox::spawn(spec, config).expect("spawn");
    let out = drain(running.stdout.take());
    let err = drain(running.stderr.take());
    let events = running.events().expect("the events, taken once");
    let events = std::thread::spawn(move || {
        events
            .iter()
            .map(|e| (e, std::time::SystemTime::now()))
            .collect()
    });
    let outcome = running.wait().expect("wait");
    Ran {
        outcome,
        stdout: out.join().unwrap(),
        stderr: err.join().unwrap(),
        events: events.join().unwrap(),
    }
}

/// A tarball of the test rootfs, written into `dir`: what `corral base import` takes.
pub fn rootfs_tarball(dir: &Path) -> PathBuf {
    let tarball = dir.join("rootfs.tar");
    let status = Command::new("tar")
        .arg("-C")
        .arg(rootfs())
        .args(["--numeric-owner", "-cf"])
        .arg(&tarball)
        .arg(".")
        .status()
        .expect("running tar");
    assert!(status.success(), "tar of the test rootfs failed");
    tarball
}

/// Imports the test rootfs (a debootstrap of the base recipe; `corral base build` itself is
/// covered by `tests/base.rs`) as the `python-3.11` base into the data dir `data`.
pub fn import_test_base(data: &Path) {
    let scratch = data.parent().expect("a data dir has a parent");
    std::fs::create_dir_all(scratch).unwrap();
    let tarball = rootfs_tarball(scratch);
    let out = corral()
        .args(["base", "import", "python-3.11"])
        .arg(&tarball)
        .arg("--data-dir")
        .arg(data)
        .output()
        .expect("running corral base import");
    assert!(
        out.status.success(),
        "corral base import: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    std::fs::remove_file(&tarball).unwrap();
}

/// `corral source push DIR --store STORE`: the pushed source's reference (its stdout).
pub fn source_push(dir: &Path, store: &str) -> String {
    let out = corral()
        .args(["source", "push"])
        .arg(dir)
        .args(["--store", store])
        .output()
        .expect("running corral source push");
    assert!(
        out.status.success(),
        "corral source push {}: {}",
        dir.display(),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap().trim().to_owned()
}

/// The `*.json` fixtures of `fixtures/<dir>`, sorted; at least `at_least` of them (a lost
/// fixture directory must not pass as "every fixture gave its outcome").
pub fn json_fixtures(dir: &str, at_least: usize) -> Vec<PathBuf> {
    let mut paths: Vec<_> = std::fs::read_dir(repo().join("fixtures").join(dir))
        .unwrap_or_else(|e| panic!("fixtures/{dir}: {e}"))
        .flatten()
        .map(|e| e.path())
        .filter(|p| p.extension().is_some_and(|x| x == "json"))
        .collect();
    paths.sort();
    assert!(paths.len() >= at_least, "fixtures/{dir}: {paths:?}");
    paths
}
