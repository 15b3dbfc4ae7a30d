//! Prerequisites shared by the tests that run real sandboxes as root (`sandbox.rs`,
//! `jobdir.rs`).

use std::path::{Path, PathBuf};

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
