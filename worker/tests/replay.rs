//! `corral replay` end to end, as root, on a real base: every fixture job in
//! `fixtures/jobs/` gives the result its `.expect.json` names; the same job gives the same
//! digest twice and the second run is an action-cache hit; `--no-cache` rebuilds to the same
//! digest; the python-app image, unpacked by umoci, runs its entry point with the venv's
//! interpreter inside a sandbox; nothing (mount, job dir, cgroup) is left behind.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::OnceLock;

use serde_json::Value;

mod common;
use common::{have, is_root, repo, require, rootfs};

fn corral(args: &[&str]) -> Output {
    common::corral().args(args).output().unwrap()
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

/// One data dir for the whole binary, with the `python-3.11` base imported from the test
/// rootfs (a debootstrap of the same recipe; `corral base build` itself is covered by
/// `tests/base.rs`).
fn data_dir() -> &'static Path {
    static DIR: OnceLock<tempfile::TempDir> = OnceLock::new();
    DIR.get_or_init(|| {
        let dir = tempfile::Builder::new()
            .prefix("corral-replay-")
            .tempdir_in("/var/tmp")
            .unwrap();
        common::import_test_base(&dir.path().join("data"));
        dir
    })
    .path()
}

fn data() -> PathBuf {
    data_dir().join("data")
}

/// Tests share the data dir and some job ids: one build at a time.
fn serial() -> std::sync::MutexGuard<'static, ()> {
    static LOCK: std::sync::Mutex<()> = std::sync::Mutex::new(());
    LOCK.lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
}

fn prerequisites() -> bool {
    require(is_root(), "root (namespaces, mounts, cgroups)")
        && require(
            rootfs().join("usr/bin/python3").exists(),
            "the test rootfs at $CORRAL_TEST_ROOTFS",
        )
        && require(have("umoci"), "umoci")
        && require(
            repo().join("fixtures/bundles/python-app/wheels").is_dir(),
            "the python-app wheels (run scripts/fixtures)",
        )
}

struct Replay {
    code: i32,
    result: Value,
    stderr: String,
}

fn replay(job: &str, extra: &[&str]) -> Replay {
    let data = data();
    let mut args = vec![
        "replay",
        job,
        "--json",
        "--data-dir",
        data.to_str().unwrap(),
    ];
    args.extend_from_slice(extra);
    let out = corral(&args);
    let stderr = text(&out.stderr);
    let result = serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
        panic!(
            "{job}: no JSON result ({e}): {}\n{stderr}",
            text(&out.stdout)
        )
    });
    Replay {
        code: out.status.code().unwrap_or(-1),
        result,
        stderr,
    }
}

/// The `corral.event.v1` objects among `text`'s lines (other lines are the build's output).
fn read_events(text: &str) -> Vec<Value> {
    text.lines()
        .filter_map(|line| serde_json::from_str::<Value>(line).ok())
        .filter(|v| v["schema"] == "corral.event.v1")
        .collect()
}

/// What is wrong with a run's lifecycle events: exactly one `job_started`, then exactly one
/// `job_finished`, last, naming the same job.
fn lifecycle_problems(events: &[Value]) -> Vec<String> {
    let kinds: Vec<&str> = events.iter().filter_map(|e| e["kind"].as_str()).collect();
    let mut problems = Vec::new();
    let started = kinds.iter().position(|k| *k == "job_started");
    let finished = kinds.iter().position(|k| *k == "job_finished");
    match (started, finished) {
        (Some(s), Some(f)) if s < f && f + 1 == kinds.len() => {}
        _ => problems.push(format!("lifecycle events out of order: {kinds:?}")),
    }
    if kinds.iter().filter(|k| **k == "job_finished").count() != 1 {
        problems.push(format!("not one job_finished: {kinds:?}"));
    }
    problems
}

/// Names in the build layer of a result (the third layer).
fn build_layer_names(result: &Value) -> Vec<String> {
    let digest = result["artifact"]["layers"][2]["digest"].as_str().unwrap();
    let blob = data()
        .join("store/blobs/sha256")
        .join(digest.trim_start_matches("sha256:"));
    let out = Command::new("tar").arg("-tzf").arg(&blob).output().unwrap();
    assert!(out.status.success());
    text(&out.stdout)
        .lines()
        .map(|l| l.trim_end_matches('/').to_string())
        .collect()
}

/// Nothing of a job may outlive it: no mount under the data dir, no job dir, no scratch,
/// no build cgroup.
fn assert_clean(job: &str) {
    let mounts = std::fs::read_to_string("/proc/self/mountinfo").unwrap();
    let data = data();
    let data_text = data.to_str().unwrap();
    assert!(
        !mounts.contains(data_text),
        "{job}: a mount is left under {data_text}:\n{mounts}"
    );
    for dir in ["jobs", "tmp"] {
        let left: Vec<_> = std::fs::read_dir(data.join(dir))
            .map(|d| d.flatten().map(|e| e.file_name()).collect())
            .unwrap_or_default();
        let left: Vec<_> = left
            .iter()
            .filter(|n| n.to_string_lossy().contains(job))
            .collect();
        assert!(left.is_empty(), "{job}: left in {dir}: {left:?}");
    }
    for controller in ["memory", "pids", "cpu", "unified"] {
        let parent = Path::new("/sys/fs/cgroup").join(controller).join("corral");
        if let Ok(entries) = std::fs::read_dir(&parent) {
            let left: Vec<_> = entries
                .flatten()
                .filter(|e| e.path().is_dir())
                .map(|e| e.file_name())
                .collect();
            assert!(
                left.is_empty(),
                "{job}: cgroups left under {}: {left:?}",
                parent.display()
            );
        }
    }
}

#[test]
fn every_fixture_job_gives_its_expected_result() {
    if !prerequisites() {
        return;
    }
    let _serial = serial();
    let mut jobs: Vec<PathBuf> = std::fs::read_dir(repo().join("fixtures/jobs"))
        .unwrap()
        .flatten()
        .map(|e| e.path())
        .filter(|p| p.to_string_lossy().ends_with(".expect.json"))
        .collect();
    jobs.sort();
    assert!(jobs.len() >= 8, "fixture jobs: {jobs:?}");
    let mut failures = Vec::new();
    for expect_path in jobs {
        let expect: Value = serde_json::from_slice(&std::fs::read(&expect_path).unwrap()).unwrap();
        let name = expect_path
            .file_name()
            .unwrap()
            .to_string_lossy()
            .trim_end_matches(".expect.json")
            .to_string();
        let job = format!("fixtures/jobs/{name}.json");
        let events_file = data_dir().join(format!("{name}.events.jsonl"));
        let run = replay(
            &job,
            &["--no-cache", "--events", events_file.to_str().unwrap()],
        );
        let r = &run.result;
        let mut problems = Vec::new();
        let events = read_events(&std::fs::read_to_string(&events_file).unwrap_or_default());
        problems.extend(lifecycle_problems(&events));
        // Alerts raised live, while the job still ran: the fixture does the bad thing, prints
        // when (`<cause_marker><unix ms>` on stderr), then keeps running for seconds.
        if let Some(kinds) = expect["live_events"].as_array() {
            let finished = events.iter().find(|e| e["kind"] == "job_finished");
            let cause_ms = expect["cause_marker"].as_str().and_then(|marker| {
                let at = run.stderr.find(marker)? + marker.len();
                let digits: String = run.stderr[at..]
                    .chars()
                    .take_while(char::is_ascii_digit)
                    .collect();
                digits.parse::<u64>().ok()
            });
            if cause_ms.is_none() {
                problems.push("the fixture did not print when it did the bad thing".into());
            }
            for kind in kinds {
                let Some(alert) = events.iter().find(|e| &e["kind"] == kind) else {
                    problems.push(format!("no {kind} event"));
                    continue;
                };
                let at = alert["at_ms"].as_u64().unwrap_or(0);
                let finished_at = finished.and_then(|f| f["at_ms"].as_u64()).unwrap_or(0);
                if at + 1000 > finished_at {
                    problems.push(format!(
                        "{kind} at {at} is not a second before job_finished at {finished_at}"
                    ));
                }
                if let Some(cause) = cause_ms
                    && !(cause..=cause + 1000).contains(&at)
                {
                    problems.push(format!(
                        "{kind} at {at}, not within 1 s of its cause at {cause}"
                    ));
                }
                if !finished.is_some_and(|f| {
                    f["details"]["alerts"]
                        .as_array()
                        .is_some_and(|a| a.contains(kind))
                }) {
                    problems.push(format!("job_finished does not list {kind}"));
                }
                if !run
                    .stderr
                    .contains(&format!(" {} ", kind.as_str().unwrap()))
                {
                    problems.push(format!("no human line of {kind} on stderr"));
                }
            }
        }
        if r["status"] != expect["status"] {
            problems.push(format!(
                "status {} (expected {})",
                r["status"], expect["status"]
            ));
        }
        if expect.get("reason").is_some() && r["reason"] != expect["reason"] {
            problems.push(format!(
                "reason {} (expected {})",
                r["reason"], expect["reason"]
            ));
        }
        if expect.get("exit_code").is_some() && r["exit_code"] != expect["exit_code"] {
            problems.push(format!(
                "exit code {} (expected {})",
                r["exit_code"], expect["exit_code"]
            ));
        }
        let want_code = match expect["status"].as_str().unwrap() {
            "succeeded" => 0,
            _ => 1,
        };
        if run.code != want_code {
            problems.push(format!("exit status {} (expected {want_code})", run.code));
        }
        // With --json the build's output goes to stderr.
        for key in ["stdout_contains", "stderr_contains"] {
            if let Some(needle) = expect[key].as_str()
                && !run.stderr.contains(needle)
            {
                problems.push(format!("output lacks {needle:?}"));
            }
        }
        if let Some(min) = expect["network_attempts_min"].as_u64() {
            let seen = r["usage"]["network_attempts"].as_u64().unwrap_or(0);
            if seen < min {
                problems.push(format!(
                    "{seen} network attempts counted (expected at least {min})"
                ));
            }
        }
        if let Some(names) = expect["layer_has"].as_array() {
            let layer = build_layer_names(r);
            for name in names {
                let name = name.as_str().unwrap();
                if !layer.iter().any(|n| n == name) {
                    problems.push(format!("build layer lacks {name}"));
                }
            }
        }
        if r["status"] == "succeeded" {
            let layers = r["artifact"]["layers"].as_array().map_or(0, Vec::len);
            if layers != 3 {
                problems.push(format!("{layers} layers (expected base, source, build)"));
            }
        }
        assert_clean(&name);
        if !problems.is_empty() {
            failures.push(format!("{name}: {}\n{}", problems.join("; "), run.stderr));
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n\n"));
}

#[test]
fn replay_writes_the_job_events_as_json_lines_on_stdout() {
    if !prerequisites() {
        return;
    }
    let _serial = serial();
    let data = data();
    let out = corral(&[
        "replay",
        "fixtures/jobs/fail.json",
        "--no-cache",
        "--events",
        "-",
        "--data-dir",
        data.to_str().unwrap(),
    ]);
    let stdout = text(&out.stdout);
    assert_eq!(
        out.status.code(),
        Some(1),
        "{stdout}\n{}",
        text(&out.stderr)
    );
    let events = read_events(&stdout);
    assert!(lifecycle_problems(&events).is_empty(), "{stdout}");
    let started = &events[0];
    assert_eq!(started["kind"], "job_started");
    assert_eq!(started["job_id"], "fail");
    assert_eq!(started["project"], "demo");
    assert_eq!(started["details"]["base"], "python-3.11");
    assert_eq!(started["details"]["pool"], "default");
    assert!(
        started["details"]["limits"]["memory_bytes"].is_number(),
        "{started}"
    );
    let finished = events.last().unwrap();
    assert_eq!(finished["details"]["status"], "failed");
    assert_eq!(finished["details"]["reason"], "nonzero_exit");
    assert_eq!(finished["details"]["exit_code"], 3);
    assert_eq!(finished["details"]["alerts"], serde_json::json!([]));
    assert!(finished["at_ms"].as_u64() >= started["at_ms"].as_u64());
    // A plain failure is no alert: no alert line on stderr.
    assert!(
        !text(&out.stderr).lines().any(|l| l.starts_with("! ")),
        "{}",
        text(&out.stderr)
    );
}

#[test]
fn the_same_job_gives_the_same_digest_and_hits_the_cache() {
    if !prerequisites() {
        return;
    }
    let _serial = serial();
    let job = "fixtures/jobs/whiteout.json";
    let first = replay(job, &["--no-cache"]);
    assert_eq!(first.result["status"], "succeeded", "{}", first.stderr);
    let digest = first.result["artifact"]["manifest_digest"].clone();
    let cached = replay(job, &[]);
    assert_eq!(cached.result["cached"], true, "{}", cached.stderr);
    assert_eq!(cached.result["artifact"]["manifest_digest"], digest);
    let rebuilt = replay(job, &["--no-cache"]);
    assert_eq!(rebuilt.result["cached"], false);
    assert_eq!(
        rebuilt.result["artifact"]["manifest_digest"], digest,
        "a rebuild gives the same bytes"
    );
    assert_eq!(
        rebuilt.result["artifact"]["layers"],
        first.result["artifact"]["layers"]
    );
    // The human summary says it came from the cache.
    let data = data();
    let out = corral(&["replay", job, "--data-dir", data.to_str().unwrap()]);
    assert!(out.status.success());
    assert!(
        text(&out.stdout).contains("from the action cache"),
        "{}",
        text(&out.stdout)
    );
    assert_clean("whiteout");
}

#[test]
fn the_python_app_image_runs_its_entry_point_from_the_venv() {
    if !prerequisites() {
        return;
    }
    let _serial = serial();
    let run = replay("fixtures/jobs/python-app.json", &[]);
    assert_eq!(run.result["status"], "succeeded", "{}", run.stderr);
    let scratch = tempfile::Builder::new()
        .prefix("corral-unpack-")
        .tempdir_in("/var/tmp")
        .unwrap();
    let bundle = scratch.path().join("bundle");
    let image = format!("{}:python-app", data().join("store").display());
    let out = Command::new("umoci")
        .args(["unpack", "--image", &image])
        .arg(&bundle)
        .output()
        .unwrap();
    assert!(out.status.success(), "umoci unpack: {}", text(&out.stderr));
    let root = bundle.join("rootfs");
    assert!(
        root.join("app/.venv/bin/python").exists(),
        "the venv is in the image"
    );
    let out = corral(&[
        "sandbox",
        "--rootfs",
        root.to_str().unwrap(),
        "--",
        "/app/.venv/bin/python",
        "-B",
        "/app/main.py",
        "--check",
    ]);
    let stdout = text(&out.stdout);
    assert!(
        stdout.contains("greeter: ok"),
        "{stdout}\n{}",
        text(&out.stderr)
    );
}

#[test]
fn an_unknown_base_is_rejected_with_the_available_ones() {
    if !prerequisites() {
        return;
    }
    let _serial = serial();
    let scratch = tempfile::tempdir().unwrap();
    let job: Value =
        serde_json::from_slice(&std::fs::read(repo().join("fixtures/jobs/hello.json")).unwrap())
            .unwrap();
    let mut job = job;
    job["base"] = Value::from("python-2.7");
    job["job_id"] = Value::from("unknown-base");
    let path = scratch.path().join("job.json");
    std::fs::write(&path, serde_json::to_vec(&job).unwrap()).unwrap();
    let run = replay(path.to_str().unwrap(), &[]);
    assert_eq!(run.code, 65);
    assert_eq!(run.result["status"], "rejected");
    assert_eq!(run.result["reason"], "invalid_job");
    assert_eq!(run.result["error"]["field"], "base");
    assert_eq!(run.result["error"]["rule"], "unknown");
    let message = run.result["message"].as_str().unwrap();
    assert!(
        message.contains("python-3.11"),
        "lists the available bases: {message}"
    );
}

#[test]
fn ctrl_c_cancels_the_build_and_cleans_up() {
    if !prerequisites() {
        return;
    }
    let _serial = serial();
    let data = data();
    let mut child = Command::new(env!("CARGO_BIN_EXE_corral"))
        .current_dir(repo())
        .args([
            "replay",
            "fixtures/jobs/timeout.json",
            "--json",
            "--no-cache",
            "--data-dir",
        ])
        .arg(&data)
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    // The build sleeps for longer than its 3 s wall limit; interrupt it once it runs.
    let stderr = child.stderr.take().unwrap();
    let (started_tx, started) = std::sync::mpsc::channel();
    let drain = std::thread::spawn(move || {
        let mut seen = String::new();
        for line in std::io::BufRead::lines(std::io::BufReader::new(stderr)).map_while(Result::ok) {
            if line.contains("build starting") {
                let _ = started_tx.send(());
            }
            seen.push_str(&line);
            seen.push('\n');
        }
        seen
    });
    started
        .recv_timeout(std::time::Duration::from_secs(120))
        .expect("the build never started");
    std::thread::sleep(std::time::Duration::from_millis(500));
    assert!(
        Command::new("kill")
            .args(["-INT", &child.id().to_string()])
            .status()
            .unwrap()
            .success()
    );
    let mut stdout = String::new();
    std::io::Read::read_to_string(child.stdout.as_mut().unwrap(), &mut stdout).unwrap();
    let status = child.wait().unwrap();
    let log = drain.join().unwrap();
    let result: Value = serde_json::from_str(&stdout)
        .unwrap_or_else(|e| panic!("no result ({e}): {stdout}\n{log}"));
    assert_eq!(result["status"], "cancelled", "{result}");
    assert_eq!(status.code(), Some(1));
    assert_clean("timeout");
}
