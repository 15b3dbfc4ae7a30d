//! The `corral` binary's command line as a user types it: help, version, and the job check
//! that README's first command runs.

use std::process::Command;

mod common;
use common::{corral, repo};

#[test]
fn help_lists_subcommands_and_version_prints() {
    let out = corral().arg("--help").output().unwrap();
    assert!(out.status.success());
    let help = String::from_utf8(out.stdout).unwrap();
    for sub in ["validate", "schema"] {
        assert!(help.contains(sub), "{sub} missing from --help:\n{help}");
    }
    let out = corral().arg("--version").output().unwrap();
    assert_eq!(
        String::from_utf8(out.stdout).unwrap().trim(),
        format!("corral {}", env!("CARGO_PKG_VERSION"))
    );
}

#[test]
fn validate_accepts_golden_jobs_and_names_the_broken_rule() {
    let out = corral()
        .args(["validate", "fixtures/jobs/hello.json"])
        .output()
        .unwrap();
    assert_eq!(
        out.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&out.stdout)
    );

    let out = corral()
        .args([
            "validate",
            "fixtures/jobs/hello.json",
            "fixtures/invalid/memory-above-maximum.json",
        ])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(65));
    let text = String::from_utf8(out.stdout).unwrap();
    assert!(
        text.contains("limits.memory_bytes: 64 GiB exceeds the maximum of 16 GiB [maximum]"),
        "{text}"
    );

    let out = corral()
        .args(["validate", "--json", "fixtures/invalid/workdir-dotdot.json"])
        .output()
        .unwrap();
    let verdict: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(verdict["valid"], false);
    assert_eq!(verdict["error"]["field"], "workdir");
    assert_eq!(verdict["error"]["rule"], "path");
}

#[test]
fn schema_command_prints_the_committed_schema() {
    let out = corral().args(["schema", "job"]).output().unwrap();
    assert!(out.status.success());
    let printed: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let committed: serde_json::Value = serde_json::from_slice(
        &std::fs::read(repo().join("protocol/schema/corral.job.v1.schema.json")).unwrap(),
    )
    .unwrap();
    assert_eq!(printed, committed);
}

/// `corral sandbox` is parsed by its own parser when it comes first; it accepts what the
/// full command line accepts there, global flags included, and still refuses typos.
#[test]
fn sandbox_flags_parse_alike_in_both_positions() {
    let help = corral().args(["sandbox", "--help"]).output().unwrap();
    assert!(help.status.success());
    let help = String::from_utf8(help.stdout).unwrap();
    assert!(help.contains("Usage: corral sandbox"), "{help}");
    for flag in [
        "--rootfs",
        "--memory",
        "--network",
        "--log-format",
        "--verbose",
    ] {
        assert!(
            help.contains(flag),
            "{flag} missing from sandbox --help:\n{help}"
        );
    }
    for args in [
        &["sandbox", "-v", "--log-format", "json", "--rootfs"][..],
        &["-v", "--log-format", "json", "sandbox", "--rootfs"][..],
    ] {
        // A rootfs that does not exist: parsing succeeds, the run fails (not exit 2).
        let out = corral()
            .args(args)
            .args(["/nonexistent-rootfs", "--", "true"])
            .output()
            .unwrap();
        assert_ne!(out.status.code(), Some(2), "{args:?} was refused: {out:?}");
    }
    let typo = corral()
        .args(["sandbox", "--rootf", "/", "--", "true"])
        .output()
        .unwrap();
    assert_eq!(typo.status.code(), Some(2), "{typo:?}");
}

/// `corral` runs every command but `sandbox` in `corral-worker`, found beside the real file
/// (through a symlink too); without it, it says so and exits 70, while `sandbox` needs
/// nothing else.
#[test]
fn corral_hands_commands_to_the_worker_binary_beside_it() {
    let dir = tempfile::tempdir().unwrap();
    let link = dir.path().join("corral");
    std::os::unix::fs::symlink(env!("CARGO_BIN_EXE_corral"), &link).unwrap();
    let out = Command::new(&link).arg("--version").output().unwrap();
    assert!(out.status.success(), "{out:?}");
    assert_eq!(
        String::from_utf8(out.stdout).unwrap().trim(),
        format!("corral {}", env!("CARGO_PKG_VERSION"))
    );
    // The worker sees `corral` as its name, so its messages name the command typed.
    let out = Command::new(&link).arg("no-such-command").output().unwrap();
    assert_eq!(out.status.code(), Some(2), "{out:?}");
    let err = String::from_utf8(out.stderr).unwrap();
    assert!(err.contains("Usage: corral "), "{err}");

    let alone = dir.path().join("alone");
    std::fs::create_dir(&alone).unwrap();
    std::fs::copy(env!("CARGO_BIN_EXE_corral"), alone.join("corral")).unwrap();
    let out = Command::new(alone.join("corral"))
        .arg("--version")
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(70), "{out:?}");
    let err = String::from_utf8(out.stderr).unwrap();
    assert!(
        err.contains(&format!(
            "running {}",
            alone.join("corral-worker").display()
        )) && err.contains("No such file"),
        "{err}"
    );
    let help = Command::new(alone.join("corral"))
        .args(["sandbox", "--help"])
        .output()
        .unwrap();
    assert!(help.status.success(), "{help:?}");
}

/// Runs `cmd`, killing it if it is still running after `patience` (a worker that did not
/// refuse to start would run until stopped).
fn output_within(cmd: &mut Command, patience: std::time::Duration) -> std::process::Output {
    use std::process::Stdio;
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let deadline = std::time::Instant::now() + patience;
    while child.try_wait().unwrap().is_none() {
        if std::time::Instant::now() > deadline {
            let _ = child.kill();
            let out = child.wait_with_output().unwrap();
            panic!(
                "still running after {patience:?}; stderr:\n{}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    child.wait_with_output().unwrap()
}

#[test]
fn work_has_no_way_to_run_jobs_outside_the_sandbox() {
    // The broker address is a closed port: a worker that started would retry it forever.
    let broker = ["--amqp-url", "amqp://guest:guest@127.0.0.1:9/%2f"];
    let patience = std::time::Duration::from_secs(20);
    for value in ["process", "pipeline", ""] {
        let out = output_within(
            corral()
                .arg("work")
                .args(broker)
                .env("CORRAL_RUNNER", value),
            patience,
        );
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(
            out.status.code(),
            Some(2),
            "CORRAL_RUNNER={value:?}: {stderr}"
        );
        assert!(
            stderr.contains(&format!("CORRAL_RUNNER={value} is set"))
                && stderr.contains("runs every job in the sandbox"),
            "CORRAL_RUNNER={value:?}: the refusal says why: {stderr}"
        );
    }
    let out = output_within(
        corral()
            .args(["work", "--runner", "process"])
            .args(broker)
            .env_remove("CORRAL_RUNNER"),
        patience,
    );
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{stderr}");
    assert!(
        stderr.contains("unexpected argument '--runner'"),
        "--runner is a usage error: {stderr}"
    );
    let out = corral().args(["work", "--help"]).output().unwrap();
    let help = String::from_utf8(out.stdout).unwrap();
    assert!(out.status.success());
    assert!(
        !help.contains("--runner") && !help.contains("CORRAL_RUNNER"),
        "work --help offers no runner choice:\n{help}"
    );
}
