//! `corral doctor` on this host, driving the real binary: the cgroup layout it reports is
//! the one `/proc/self/mountinfo` shows; the text form has one line per check; with a
//! config it reaches the real broker, and names refused credentials; `corral work` refuses
//! to start on a host check that fails, naming it.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use serde_json::Value;

mod common;
use common::{is_root, require};

fn corral(args: &[&str]) -> Output {
    common::corral().args(args).output().unwrap()
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

/// The JSON report of a `corral doctor --json` run, or a panic showing what it printed.
fn json_report(out: &Output) -> Value {
    serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
        panic!(
            "no JSON ({e}): stdout {} stderr {}",
            text(&out.stdout),
            text(&out.stderr)
        )
    })
}

fn check<'a>(report: &'a Value, id: &str) -> &'a Value {
    report["checks"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["id"] == id)
        .unwrap_or_else(|| panic!("no check {id} in {report:#}"))
}

/// What the test itself reads from the kernel: each controller's cgroup version and
/// mount point (`io` is `blkio` on v1), and the v2 mount with its controllers.
fn expected_cgroups() -> (Vec<(&'static str, Value, Value)>, Value) {
    let mountinfo = std::fs::read_to_string("/proc/self/mountinfo").unwrap();
    let mut v1: Vec<(String, String)> = Vec::new();
    let mut v2: Option<String> = None;
    for line in mountinfo.lines() {
        let (left, right) = line.split_once(" - ").unwrap();
        let mount_point = left.split(' ').nth(4).unwrap().to_string();
        let fields: Vec<&str> = right.split(' ').collect();
        match fields[0] {
            "cgroup2" if v2.is_none() => v2 = Some(mount_point),
            "cgroup" => {
                for opt in fields[2].split(',') {
                    if !v1.iter().any(|(c, _)| c == opt) {
                        v1.push((opt.to_string(), mount_point.clone()));
                    }
                }
            }
            _ => {}
        }
    }
    let v2_controllers: Vec<String> = v2
        .as_ref()
        .and_then(|p| std::fs::read_to_string(Path::new(p).join("cgroup.controllers")).ok())
        .map(|t| t.split_whitespace().map(String::from).collect())
        .unwrap_or_default();
    let mut controllers = Vec::new();
    for (name, v1_name) in [
        ("memory", "memory"),
        ("pids", "pids"),
        ("cpu", "cpu"),
        ("io", "blkio"),
    ] {
        let (version, path) = match v1.iter().find(|(c, _)| c == v1_name) {
            Some((_, path)) => (Value::from("v1"), Value::from(path.clone())),
            None if v2_controllers.iter().any(|c| c == name) => {
                (Value::from("v2"), Value::from(v2.clone().unwrap()))
            }
            None => (Value::Null, Value::Null),
        };
        controllers.push((name, version, path));
    }
    let v2 = match v2 {
        Some(path) => serde_json::json!({ "path": path, "controllers": v2_controllers }),
        None => Value::Null,
    };
    (controllers, v2)
}

#[test]
fn doctor_json_reports_the_cgroup_layout_this_host_really_has() {
    if !require(is_root(), "root (test overlay mount, cgroups)") {
        return;
    }
    let data = tempfile::tempdir_in("/var/tmp").unwrap();
    let out = corral(&[
        "doctor",
        "--json",
        "--data-dir",
        data.path().to_str().unwrap(),
    ]);
    let report = json_report(&out);
    let failed: Vec<&Value> = report["checks"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|c| c["status"] == "fail")
        .collect();
    assert_eq!(report["ok"], failed.is_empty(), "{report:#}");
    assert_eq!(
        out.status.code(),
        Some(if failed.is_empty() { 0 } else { 1 }),
        "exit code follows the failures: {failed:#?}"
    );

    let cgroups = check(&report, "cgroups");
    let (controllers, v2) = expected_cgroups();
    for (name, version, path) in controllers {
        let reported = &cgroups["details"]["controllers"][name];
        assert_eq!(reported["version"], version, "{name}: {cgroups:#}");
        assert_eq!(reported["path"], path, "{name}: {cgroups:#}");
    }
    assert_eq!(cgroups["details"]["v2"], v2, "{cgroups:#}");
    // The sandbox's own discovery picks the hierarchy that holds every controller it needs.
    let used = &cgroups["details"]["used"];
    let all_on = |v: &str| {
        ["memory", "pids", "cpu"]
            .iter()
            .all(|c| cgroups["details"]["controllers"][c]["version"] == v)
    };
    assert!(
        (used == "v1" && all_on("v1")) || (used == "v2" && all_on("v2")),
        "{cgroups:#}"
    );
    if cgroups["details"]["v2"]["controllers"] == serde_json::json!([]) {
        assert!(
            cgroups["summary"]
                .as_str()
                .unwrap()
                .contains("holds no controllers"),
            "a v2 mount without controllers is said so: {cgroups:#}"
        );
    }

    for id in [
        "kernel",
        "user_namespaces",
        "overlayfs",
        "cgroup_parent",
        "seccomp",
        "disk_limit",
        "tool:debootstrap",
    ] {
        let c = check(&report, id);
        assert_eq!(c["status"], "ok", "on this host every check passes: {c:#}");
        assert_eq!(c["fix"], Value::Null);
    }
    // Usable; a warning (an unjournaled ext4, little free space) comes with its fix.
    let data_dir = check(&report, "data_dir");
    assert_ne!(data_dir["status"], "fail", "{data_dir:#}");
    assert_eq!(data_dir["fix"].is_string(), data_dir["status"] == "warn");
    let release = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap();
    assert_eq!(
        check(&report, "kernel")["details"]["release"],
        release.trim()
    );
    assert_eq!(
        check(&report, "data_dir")["details"]["path"],
        data.path().to_str().unwrap()
    );
    // Without a config there is no broker or store to check.
    let ids: Vec<&str> = report["checks"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c["id"].as_str().unwrap())
        .collect();
    assert!(
        !ids.contains(&"broker") && !ids.contains(&"store"),
        "{ids:?}"
    );
    // This run's test overlay is gone again (other tests' doctors may have theirs up now).
    let mount_point = check(&report, "overlayfs")["details"]["mount_point"]
        .as_str()
        .expect("the overlay check names its mount point")
        .to_string();
    assert!(mount_point.contains("corral-doctor-"), "{mount_point}");
    let mountinfo = std::fs::read_to_string("/proc/self/mountinfo").unwrap();
    assert!(
        !mountinfo
            .lines()
            .any(|l| l.split(' ').nth(4) == Some(mount_point.as_str())),
        "{mount_point} is still mounted: {mountinfo}"
    );
}

#[test]
fn doctor_text_is_one_line_per_check_with_the_fix_below_failures() {
    if !require(is_root(), "root (test overlay mount, cgroups)") {
        return;
    }
    let tmpfs = TinyTmpfs::mount("16m");
    let data = tmpfs.path().join("data");
    let out = corral(&["doctor", "--data-dir", data.to_str().unwrap()]);
    let stdout = text(&out.stdout);
    assert_eq!(out.status.code(), Some(1), "{stdout}{}", text(&out.stderr));
    let lines: Vec<&str> = stdout.lines().collect();
    let verdicts: Vec<&&str> = lines
        .iter()
        .filter(|l| l.starts_with("ok ") || l.starts_with("warn ") || l.starts_with("fail "))
        .collect();
    assert!(verdicts.len() >= 9, "{stdout}");
    let data_line = lines
        .iter()
        .position(|l| l.starts_with("fail") && l.contains("data_dir"))
        .unwrap_or_else(|| panic!("a 16 MiB data dir fails: {stdout}"));
    assert!(lines[data_line].contains("free"), "{stdout}");
    assert!(
        lines[data_line + 1].trim_start().starts_with("fix: "),
        "the fix follows the failure: {stdout}"
    );
    assert!(
        lines.last().unwrap().contains("1 failure"),
        "a total ends the report: {stdout}"
    );
}

#[test]
fn doctor_with_a_config_reaches_the_broker_and_names_refused_credentials() {
    if !require(is_root(), "root")
        || !require(
            std::net::TcpStream::connect("127.0.0.1:5672").is_ok(),
            "a RabbitMQ broker on 127.0.0.1:5672",
        )
    {
        return;
    }
    let dir = tempfile::tempdir_in("/var/tmp").unwrap();
    let config = |user: &str, password: &str| -> PathBuf {
        let password_file = dir.path().join(format!("{user}.password"));
        std::fs::write(&password_file, password).unwrap();
        let path = dir.path().join(format!("{user}.toml"));
        std::fs::write(
            &path,
            format!(
                "data_dir = \"{data}\"\n\n[store]\nurl = \"oci-dir:{data}/store\"\n\n\
                 [amqp]\nurl = \"amqp://{user}@127.0.0.1:5672/%2f\"\n\
                 password_file = \"{}\"\n",
                password_file.display(),
                data = dir.path().join("data").display(),
            ),
        )
        .unwrap();
        path
    };

    let good = config("guest", "guest");
    let out = corral(&["doctor", "--json", "--config", good.to_str().unwrap()]);
    let report = json_report(&out);
    let broker = check(&report, "broker");
    assert!(
        broker["status"] == "ok" || broker["status"] == "warn",
        "guest is accepted: {broker:#}"
    );
    assert!(
        broker["summary"]
            .as_str()
            .unwrap()
            .starts_with("connected to")
    );
    let store = check(&report, "store");
    assert_eq!(store["status"], "ok", "{store:#}");

    let bad = config("nosuchuser", "wrong");
    let out = corral(&["doctor", "--json", "--config", bad.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(1), "{}", text(&out.stderr));
    let report = json_report(&out);
    let broker = check(&report, "broker");
    assert_eq!(broker["status"], "fail", "{broker:#}");
    assert!(
        broker["fix"].as_str().unwrap().contains("credentials"),
        "{broker:#}"
    );
    assert!(
        !broker["summary"].as_str().unwrap().contains("wrong"),
        "no password in the report: {broker:#}"
    );
}

/// With a broker cluster's URLs, doctor checks the other nodes too and names the one that
/// does not answer.
#[test]
fn doctor_names_a_broker_node_that_does_not_answer() {
    if !require(is_root(), "root")
        || !require(
            std::net::TcpStream::connect("127.0.0.1:5672").is_ok(),
            "a RabbitMQ broker on 127.0.0.1:5672",
        )
    {
        return;
    }
    let dir = tempfile::tempdir_in("/var/tmp").unwrap();
    let down = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let path = dir.path().join("cluster.toml");
    std::fs::write(
        &path,
        format!(
            "data_dir = \"{data}\"\n\n[store]\nurl = \"oci-dir:{data}/store\"\n\n\
             [amqp]\nurl = [\"amqp://guest@127.0.0.1:5672/%2f\", \"amqp://guest@127.0.0.1:{down}/%2f\"]\n\
             password = \"guest\"\n",
            data = dir.path().join("data").display(),
        ),
    )
    .unwrap();
    let out = corral(&["doctor", "--json", "--config", path.to_str().unwrap()]);
    let report = json_report(&out);
    let nodes = check(&report, "broker_nodes");
    assert_eq!(nodes["status"], "warn", "{nodes:#}");
    assert!(
        nodes["summary"]
            .as_str()
            .unwrap()
            .contains(&format!("127.0.0.1:{down}")),
        "{nodes:#}"
    );
}

#[test]
fn work_refuses_to_start_naming_the_failed_check() {
    if !require(is_root(), "root") {
        return;
    }
    let tmpfs = TinyTmpfs::mount("16m");
    let data = tmpfs.path().join("data");
    let config = tmpfs.path().join("worker.toml");
    std::fs::write(
        &config,
        format!(
            "data_dir = \"{}\"\n\n[amqp]\nurl = \"amqp://guest@127.0.0.1:5672/%2f\"\n",
            data.display()
        ),
    )
    .unwrap();
    let started = std::time::Instant::now();
    let out = common::corral()
        .env("RUST_LOG", "info")
        .args(["work", "--config", config.to_str().unwrap()])
        .output()
        .unwrap();
    let stderr = text(&out.stderr);
    assert_eq!(out.status.code(), Some(75), "{stderr}");
    assert!(stderr.contains("refusing to start"), "{stderr}");
    assert!(
        stderr.contains("data_dir:"),
        "the failed check is named: {stderr}"
    );
    assert!(stderr.contains("fix:"), "{stderr}");
    assert!(
        started.elapsed() < std::time::Duration::from_secs(30),
        "it refuses at once, before any broker work"
    );
}

/// A small tmpfs mounted for one test, unmounted when dropped.
struct TinyTmpfs {
    dir: tempfile::TempDir,
}

impl TinyTmpfs {
    fn mount(size: &str) -> TinyTmpfs {
        let dir = tempfile::tempdir_in("/var/tmp").unwrap();
        let status = Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs"])
            .arg(dir.path())
            .status()
            .unwrap();
        assert!(status.success());
        TinyTmpfs { dir }
    }

    fn path(&self) -> &Path {
        self.dir.path()
    }
}

impl Drop for TinyTmpfs {
    fn drop(&mut self) {
        let _ = Command::new("umount")
            .arg("-l")
            .arg(self.dir.path())
            .status();
    }
}

/// The app forwarding check: the kernel accepts `corral run`'s rules here, and a forwarding
/// table whose link is gone (left by a `corral run` that was killed) is named with the
/// command that removes it.
#[test]
fn doctor_checks_app_forwarding_and_names_a_stale_table() {
    if !require(is_root(), "root (nftables)")
        || !require(common::have("nft"), "nft (Debian package nftables)")
    {
        return;
    }
    let out = corral(&["doctor", "--json"]);
    let report = json_report(&out);
    let forwarding = check(&report, "app_forwarding");
    assert_eq!(forwarding["status"], "ok", "{forwarding}");
    assert!(
        forwarding["summary"]
            .as_str()
            .unwrap()
            .contains("kernel forward"),
        "{forwarding}"
    );

    let stale = "corral_crl16002";
    let added = std::process::Command::new("nft")
        .args(["add", "table", "ip", stale])
        .status()
        .unwrap();
    assert!(added.success());
    let out = corral(&["doctor", "--json"]);
    let _ = std::process::Command::new("nft")
        .args(["delete", "table", "ip", stale])
        .status();
    let report = json_report(&out);
    let forwarding = check(&report, "app_forwarding");
    assert_eq!(forwarding["status"], "warn", "{forwarding}");
    assert!(
        forwarding["summary"].as_str().unwrap().contains(stale),
        "{forwarding}"
    );
    assert!(
        forwarding["fix"]
            .as_str()
            .unwrap()
            .contains(&format!("nft delete table ip {stale}")),
        "{forwarding}"
    );
}
