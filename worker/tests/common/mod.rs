//! Helpers every integration test shares: where the repository and the test rootfs are,
//! and prerequisites that fail under `CI=true` and skip loudly elsewhere. Each test crate
//! uses a part of it.
#![allow(dead_code)]

use std::path::{Path, PathBuf};

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

/// A missing prerequisite fails under `CI=true` and skips loudly otherwise.
pub fn require(cond: bool, what: &str) -> bool {
    if cond {
        return true;
    }
    if std::env::var("CI").as_deref() == Ok("true") {
        panic!("prerequisite missing under CI=true: {what}");
    }
    eprintln!("SKIPPING: prerequisite missing: {what}");
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
    }
}

/// What a run produced, as a user would see it.
pub struct Ran {
    pub outcome: corral_sandbox::Outcome,
    pub stdout: String,
    pub stderr: String,
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
    let outcome = running.wait().expect("wait");
    Ran {
        outcome,
        stdout: out.join().unwrap(),
        stderr: err.join().unwrap(),
    }
}
