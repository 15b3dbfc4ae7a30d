//! `corral work` in production shape: a config file, the sandboxed pipeline runner, the real
//! broker, sources uploaded by `corral submit --source`, and the metrics endpoint scraped
//! after the jobs: its counters match the jobs run. Operators following `corral events` see
//! each job start before it finishes, and a flooding job's `log_flood` while it still runs.

use std::process::Command;
use std::time::{Duration, Instant};

use serde_json::Value;

mod common;
#[path = "common/corral_work.rs"]
mod corral_work;
use common::{corral, is_root, repo, require, rootfs};
use corral_work::{Worker, broker_up, follow_events, free_port, have_pika, http_get};

#[test]
fn work_runs_jobs_through_the_sandboxed_pipeline_and_counts_them() {
    if !(require(is_root(), "root")
        && require(
            rootfs().join("usr/bin/python3").exists(),
            "the test rootfs at $CORRAL_TEST_ROOTFS",
        )
        && require(broker_up(), "RabbitMQ on 127.0.0.1:5672")
        && require(have_pika(), "python3 with pika"))
    {
        return;
    }
    let scratch = tempfile::Builder::new()
        .prefix("corral-work-")
        .tempdir_in("/var/tmp")
        .unwrap();
    let data = scratch.path().join("data");
    let prefix = format!("tw{}", std::process::id());
    common::import_test_base(&data);

    let port = free_port();
    let config = scratch.path().join("worker.toml");
    std::fs::write(
        &config,
        format!(
            r#"data_dir = "{data}"
concurrency = 2

[amqp]
url = "amqp://guest@127.0.0.1:5672/%2f"
password = "guest"
pool = "default"
jobs_exchange = "{prefix}.jobs"
jobs_queue = "{prefix}.jobs.default"
dead_letter_exchange = "{prefix}.dead"
dead_letter_queue = "{prefix}.jobs.dead"
results_exchange = "{prefix}.results"
events_exchange = "{prefix}.events"
logs_exchange = "{prefix}.logs"
control_exchange = "{prefix}.control"

[sandbox]
uid_start = 220000
gid_start = 220000
id_count = 1000

[metrics]
listen = "127.0.0.1:{port}"
"#,
            data = data.display()
        ),
    )
    .unwrap();
    let check = corral()
        .arg("check-config")
        .arg("-q")
        .arg(&config)
        .output()
        .unwrap();
    assert!(
        check.status.success(),
        "{}",
        String::from_utf8_lossy(&check.stdout)
    );

    // Ready once consuming.
    let mut worker = Worker::start(&config, &prefix, scratch.path().join("worker.log"), port);
    let worker_log = || worker.log();
    assert!(http_get(port, "/healthz").starts_with("HTTP/1.1 200"));

    // An operator follows every event as JSON; another waits 20 s for job_finished lines.
    let mut following = follow_events(scratch.path(), "follow", &config, &["--follow", "--json"]);
    let mut waiting = follow_events(
        scratch.path(),
        "wait",
        &config,
        &[
            "--kind",
            "job_finished",
            "--project",
            "demo",
            "--wait",
            "20s",
        ],
    );

    let store = format!("oci-dir:{}", data.join("store").display());
    let submit = |job: &str, bundle: &str| -> Value {
        let out = corral()
            .args([
                "submit",
                job,
                "--wait",
                "--timeout",
                "5m",
                "--prefix",
                &prefix,
                "--store",
                &store,
                "--source",
            ])
            .arg(repo().join("fixtures/bundles").join(bundle))
            .output()
            .unwrap();
        serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
            panic!(
                "{job}: no result ({e}): {}\n{}\nworker:\n{}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr),
                worker_log()
            )
        })
    };
    let hello = submit("fixtures/jobs/hello.json", "hello");
    assert_eq!(hello["status"], "succeeded", "{hello}");
    assert_eq!(
        hello["artifact"]["layers"].as_array().map(Vec::len),
        Some(3),
        "{hello}"
    );
    let fail = submit("fixtures/jobs/fail.json", "abuse");
    assert_eq!(fail["status"], "failed", "{fail}");
    assert_eq!(fail["reason"], "nonzero_exit");
    assert_eq!(fail["exit_code"], 3);
    let flood = submit("fixtures/jobs/log-flood.json", "abuse");
    assert_eq!(flood["status"], "succeeded", "{flood}");

    // What `corral events --follow --json` saw, once it is stopped as an operator would.
    let deadline = Instant::now() + Duration::from_secs(10);
    let events = loop {
        let text = std::fs::read_to_string(scratch.path().join("follow.out")).unwrap();
        let events: Vec<Value> = text
            .lines()
            .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{e}: {l}")))
            .collect();
        let finished = events
            .iter()
            .filter(|e| e["kind"] == "job_finished")
            .count();
        if finished == 3 || Instant::now() > deadline {
            break events;
        }
        std::thread::sleep(Duration::from_millis(100));
    };
    assert!(
        Command::new("kill")
            .args(["-TERM", &following.0.id().to_string()])
            .status()
            .unwrap()
            .success()
    );
    assert!(following.0.wait().unwrap().success());
    let of = |job: &str, kind: &str| -> Vec<&Value> {
        events
            .iter()
            .filter(|e| e["job_id"] == job && e["kind"] == kind)
            .collect()
    };
    let position = |job: &str, kind: &str| {
        events
            .iter()
            .position(|e| e["job_id"] == job && e["kind"] == kind)
            .unwrap_or_else(|| panic!("no {kind} of {job} in {events:#?}"))
    };
    for (job, alerts) in [
        ("hello", serde_json::json!([])),
        ("fail", serde_json::json!([])),
        ("log-flood", serde_json::json!(["log_flood"])),
    ] {
        assert_eq!(of(job, "job_started").len(), 1, "{events:#?}");
        assert_eq!(of(job, "job_finished").len(), 1, "{events:#?}");
        assert!(position(job, "job_started") < position(job, "job_finished"));
        let started = of(job, "job_started")[0];
        let finished = of(job, "job_finished")[0];
        assert!(started["at_ms"].as_u64() <= finished["at_ms"].as_u64());
        assert_eq!(started["details"]["pool"], "default");
        assert_eq!(started["details"]["base"], "python-3.11");
        assert_eq!(finished["details"]["alerts"], alerts, "{job}: {finished}");
        assert_eq!(finished["worker"], started["worker"]);
    }
    assert_eq!(of("fail", "job_finished")[0]["details"]["exit_code"], 3);
    // The flood is seen while the job still runs (it sleeps 3 s after it), and routed as
    // `<severity>.<kind>.<project>` says.
    let flood_alert = of("log-flood", "log_flood");
    assert_eq!(flood_alert.len(), 1, "{events:#?}");
    assert_eq!(flood_alert[0]["severity"], "warning");
    assert!(position("log-flood", "log_flood") < position("log-flood", "job_finished"));
    let flood_at = flood_alert[0]["at_ms"].as_u64().unwrap();
    let finished_at = of("log-flood", "job_finished")[0]["at_ms"]
        .as_u64()
        .unwrap();
    assert!(
        flood_at + 2000 <= finished_at,
        "log_flood at {flood_at}, job_finished at {finished_at}"
    );

    // Without --follow: the job_finished lines of the wait, as human lines, then exit 0.
    let status = waiting.0.wait().unwrap();
    assert!(status.success(), "corral events --wait exited {status}");
    let human = std::fs::read_to_string(scratch.path().join("wait.out")).unwrap();
    let lines: Vec<&str> = human.lines().collect();
    assert_eq!(lines.len(), 3, "{human}");
    for (line, job) in lines.iter().zip(["hello", "fail", "log-flood"]) {
        assert!(line.starts_with("- "), "{line}");
        assert!(
            line.contains(&format!(" info job_finished demo/{job} ")),
            "{line}"
        );
    }
    assert!(lines[2].contains("alerts=log_flood"), "{}", lines[2]);

    let metrics = http_get(port, "/metrics");
    assert!(
        metrics.contains(r#"corral_jobs_total{status="succeeded",reason=""} 2"#),
        "{metrics}"
    );
    assert!(
        metrics.contains(r#"corral_jobs_total{status="failed",reason="nonzero_exit"} 1"#),
        "{metrics}"
    );
    assert!(
        metrics.contains("corral_build_seconds_count 3"),
        "{metrics}"
    );
    assert!(
        metrics.contains("corral_snapshot_seconds_count 2"),
        "{metrics}"
    );
    // The first job's filesystem is made on the spot; the later ones' were ready.
    assert!(
        metrics.contains(r#"corral_job_dir_takes_total{outcome="made"} 1"#),
        "{metrics}"
    );
    assert!(
        metrics.contains(r#"corral_job_dir_takes_total{outcome="ready"} 2"#),
        "{metrics}"
    );
    for (kind, n) in [("job_started", 3), ("job_finished", 3), ("log_flood", 1)] {
        assert!(
            metrics.contains(&format!(r#"corral_events_total{{kind="{kind}"}} {n}"#)),
            "{metrics}"
        );
    }
    assert!(
        metrics.contains(r#"corral_alerts_total{kind="log_flood"} 1"#),
        "{metrics}"
    );

    // SIGTERM: the worker drains and exits cleanly.
    let status = worker.stop();
    assert!(status.success(), "worker exit {status}:\n{}", worker.log());
    // Its ready job filesystems went with it.
    let mounts = std::fs::read_to_string("/proc/self/mountinfo").unwrap();
    let data_text = data.to_str().unwrap();
    assert!(
        !mounts.contains(data_text),
        "a mount is left under {data_text}:\n{mounts}"
    );
    let jobs: Vec<_> = std::fs::read_dir(data.join("jobs"))
        .unwrap()
        .flatten()
        .map(|e| e.file_name())
        .collect();
    assert!(jobs.is_empty(), "left in the jobs dir: {jobs:?}");
}

#[test]
fn events_refuses_an_exchange_no_worker_declared_and_leaves_none() {
    if !require(broker_up(), "RabbitMQ on 127.0.0.1:5672") {
        return;
    }
    let prefix = format!("te{}", std::process::id());
    let out = corral()
        .args(["events", "--wait", "1s", "--prefix", &prefix])
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(75), "{stderr}");
    assert!(
        stderr.contains(&format!(
            "the events exchange {prefix}.events is not on the broker"
        )),
        "{stderr}"
    );
    // Asking again gives the same answer: the first run declared nothing.
    let again = corral()
        .args(["events", "--wait", "1s", "--prefix", &prefix])
        .output()
        .unwrap();
    assert_eq!(again.status.code(), Some(75));
}

/// A one-shot command given a broker cluster's URLs goes on to the next node when the first
/// does not answer, and says which node it used.
#[test]
fn events_reaches_the_next_broker_node_when_the_first_is_down() {
    if !require(broker_up(), "RabbitMQ on 127.0.0.1:5672") {
        return;
    }
    // A port nothing listens on: bound, then released.
    let down = free_port();
    let prefix = format!("tn{}", std::process::id());
    let out = corral()
        .env(
            "CORRAL_AMQP_URL",
            format!(
                "amqp://guest:guest@127.0.0.1:{down}/%2f amqp://guest:guest@127.0.0.1:5672/%2f"
            ),
        )
        .args(["events", "--wait", "1s", "--prefix", &prefix])
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    // The second node answered: the command got as far as looking for the exchange there.
    assert_eq!(out.status.code(), Some(75), "{stderr}");
    assert!(
        stderr.contains("is not on the broker at amqp://guest:***@127.0.0.1:5672"),
        "{stderr}"
    );
    assert!(stderr.contains(&format!("127.0.0.1:{down}")), "{stderr}");
}
