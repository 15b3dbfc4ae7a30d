//! Builds that download, end to end as root through `corral replay`: the online python-app
//! fixture installs its pinned wheels with pip from a real HTTPS index (scripts/fixture-index,
//! TLS on 127.0.0.2:8443 with a CA made for the run) through the job's egress proxy and gives
//! the offline fixture's image digest; the abuse fixtures in `fixtures/abuse/egress/` (direct
//! connections, CONNECTs to the broker, to cloud metadata, to a name resolving to loopback,
//! a download past `network_bytes`, a slow-loris client) end with the outcome and events
//! each names; a job asking for more than the worker allows is rejected. Under `corral work`
//! at concurrency 2, the online build succeeds through its proxy while another job keeps its
//! own proxy at the connection cap, and the egress events reach the broker.

use std::io::BufRead;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::OnceLock;

use serde::Deserialize;
use serde_json::Value;

mod common;
#[path = "common/corral_work.rs"]
mod corral_work;
use common::{have, is_root, repo, require, rootfs};

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

fn prerequisites() -> bool {
    require(is_root(), "root (namespaces, mounts, cgroups)")
        && require(
            rootfs().join("usr/bin/python3").exists(),
            "the test rootfs at $CORRAL_TEST_ROOTFS",
        )
        && require(have("openssl"), "openssl (the index's test CA)")
        && require(
            repo().join("fixtures/bundles/python-app/wheels").is_dir(),
            "the python-app wheels (run scripts/fixtures)",
        )
}

/// The index, the data dir (the base imported, the python-app bundle in the store by one
/// offline build, whose digest is kept) and the worker config, made once for the binary.
struct World {
    dir: tempfile::TempDir,
    _index: Index,
    offline_digest: String,
}

struct Index(Child);

impl Drop for Index {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

impl World {
    fn data(&self) -> PathBuf {
        self.dir.path().join("data")
    }

    fn config(&self) -> PathBuf {
        self.dir.path().join("worker.toml")
    }
}

fn world() -> &'static World {
    static WORLD: OnceLock<World> = OnceLock::new();
    WORLD.get_or_init(|| {
        let dir = tempfile::Builder::new()
            .prefix("corral-egress-")
            .tempdir_in("/var/tmp")
            .unwrap();
        let index_dir = dir.path().join("index");
        let mut child = Command::new(repo().join("scripts/fixture-index"))
            .arg(&index_dir)
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .unwrap();
        let mut ready = String::new();
        std::io::BufReader::new(child.stdout.take().unwrap())
            .read_line(&mut ready)
            .unwrap();
        let index = Index(child);
        assert!(ready.starts_with("ready "), "the index did not start: {ready:?}");
        let ca = ready["ready ".len()..].trim().to_owned();
        std::fs::write(
            dir.path().join("worker.toml"),
            format!(
                "[egress]\nallow = [\"127.0.0.2:8443\", \"localhost:8443\"]\nca = {ca:?}\nconnections = 8\n"
            ),
        )
        .unwrap();

        let data = dir.path().join("data");
        common::import_test_base(&data);
        let offline = corral(&[
            "replay",
            "fixtures/jobs/python-app.json",
            "--json",
            "--no-cache",
            "--data-dir",
            data.to_str().unwrap(),
        ]);
        let result: Value = serde_json::from_slice(&offline.stdout)
            .unwrap_or_else(|e| panic!("offline python-app: {e}: {}", text(&offline.stderr)));
        assert_eq!(result["status"], "succeeded", "{}", text(&offline.stderr));
        World {
            offline_digest: result["artifact"]["manifest_digest"]
                .as_str()
                .unwrap()
                .to_owned(),
            dir,
            _index: index,
        }
    })
}

fn corral(args: &[&str]) -> Output {
    common::corral()
        .current_dir(repo())
        .args(args)
        .output()
        .unwrap()
}

/// Tests share the index, the data dir and the proxy's port: one build at a time.
fn serial() -> std::sync::MutexGuard<'static, ()> {
    static LOCK: std::sync::Mutex<()> = std::sync::Mutex::new(());
    LOCK.lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
}

struct Replay {
    code: i32,
    result: Value,
    stderr: String,
    events: Vec<Value>,
}

fn replay(world: &World, job: &Path) -> Replay {
    let events = world.dir.path().join("events.jsonl");
    let data = world.data();
    let config = world.config();
    let out = corral(&[
        "replay",
        job.to_str().unwrap(),
        "--json",
        "--no-cache",
        "--config",
        config.to_str().unwrap(),
        "--data-dir",
        data.to_str().unwrap(),
        "--events",
        events.to_str().unwrap(),
    ]);
    let stderr = text(&out.stderr);
    let result = serde_json::from_slice(&out.stdout)
        .unwrap_or_else(|e| panic!("{}: no JSON result ({e}): {stderr}", job.display()));
    let events = std::fs::read_to_string(&events)
        .unwrap_or_default()
        .lines()
        .filter_map(|l| serde_json::from_str(l).ok())
        .collect();
    Replay {
        code: out.status.code().unwrap_or(-1),
        result,
        stderr,
        events,
    }
}

#[test]
fn the_online_python_app_downloads_through_the_proxy_to_the_offline_digest() {
    if !prerequisites() {
        return;
    }
    let _serial = serial();
    let world = world();
    let run = replay(world, &repo().join("fixtures/jobs/python-app-online.json"));
    assert_eq!(run.code, 0, "{}", run.stderr);
    let r = &run.result;
    assert_eq!(r["status"], "succeeded", "{}", run.stderr);
    assert_eq!(
        r["artifact"]["manifest_digest"], world.offline_digest,
        "the same wheels through the proxy give the same image"
    );
    let wheels: u64 = std::fs::read_dir(repo().join("fixtures/bundles/python-app/wheels"))
        .unwrap()
        .map(|e| e.unwrap().metadata().unwrap().len())
        .sum();
    let net = &r["usage"]["network"];
    assert!(
        net["bytes_in"].as_u64().unwrap() > wheels,
        "{net} against {wheels} bytes of wheels"
    );
    assert!(net["connections"].as_u64().unwrap() >= 1, "{net}");
    assert_eq!(net["denied"], 0, "{net}");
    let rows = net["destinations"].as_array().unwrap();
    assert_eq!(rows.len(), 1, "{net}");
    assert_eq!(rows[0]["destination"], "127.0.0.2:8443");
    assert_eq!(rows[0]["address"], "127.0.0.2:8443");
    assert!(
        run.events.iter().all(|e| e["kind"] != "egress_denied"),
        "{:?}",
        run.events
    );
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct Case {
    name: String,
    #[allow(dead_code)]
    about: String,
    egress: Vec<String>,
    script: String,
    #[serde(default)]
    limits: serde_json::Map<String, Value>,
    expect: Expect,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct Expect {
    status: String,
    #[serde(default)]
    reason: Option<String>,
    #[serde(default)]
    stdout_contains: Vec<String>,
    #[serde(default)]
    stdout_lacks: Vec<String>,
    /// `egress_denied` events that must have been raised, by their details.
    events: Vec<serde_json::Map<String, Value>>,
    denied_at_least: u64,
}

/// The host's first non-loopback IPv4 address: where a build would find the broker if it
/// had a route out.
fn host_address() -> String {
    let out = Command::new("hostname").arg("-I").output().unwrap();
    text(&out.stdout)
        .split_whitespace()
        .find(|a| {
            a.parse::<std::net::Ipv4Addr>()
                .is_ok_and(|ip| !ip.is_loopback())
        })
        .unwrap_or("192.0.2.1")
        .to_owned()
}

#[test]
fn egress_abuse_fixtures_end_as_expected() {
    if !prerequisites() {
        return;
    }
    let _serial = serial();
    let world = world();
    let online: Value = serde_json::from_str(
        &std::fs::read_to_string(repo().join("fixtures/jobs/python-app-online.json")).unwrap(),
    )
    .unwrap();
    let mut cases: Vec<PathBuf> = std::fs::read_dir(repo().join("fixtures/abuse/egress"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    cases.sort();
    assert!(cases.len() >= 6, "{cases:?}");
    let mut failures = Vec::new();
    for path in cases {
        let case: Case = serde_json::from_str(&std::fs::read_to_string(&path).unwrap())
            .unwrap_or_else(|e| panic!("{}: {e}", path.display()));
        let mut limits =
            serde_json::Map::from_iter([("wall_seconds".to_owned(), Value::from(120))]);
        limits.extend(case.limits.clone());
        let job = serde_json::json!({
            "schema": "corral.job.v1",
            "job_id": format!("egress-{}", case.name.replace('_', "-")),
            "project": "abuse",
            "base": "python-3.11",
            "source": online["source"],
            "command": ["python3", "-c", case.script],
            "env": {"HOST_ADDR": host_address()},
            "limits": limits,
            "network": {"egress": case.egress},
        });
        let file = world.dir.path().join(format!("{}.json", case.name));
        std::fs::write(&file, serde_json::to_vec_pretty(&job).unwrap()).unwrap();
        let run = replay(world, &file);
        let r = &run.result;
        let mut wrong = Vec::new();
        if r["status"] != case.expect.status.as_str() {
            wrong.push(format!(
                "status {} (expected {})",
                r["status"], case.expect.status
            ));
        }
        if r["reason"].as_str() != case.expect.reason.as_deref() {
            wrong.push(format!(
                "reason {} (expected {:?})",
                r["reason"], case.expect.reason
            ));
        }
        for want in &case.expect.stdout_contains {
            if !run.stderr.contains(want.as_str()) {
                wrong.push(format!("output lacks {want:?}"));
            }
        }
        for unwanted in &case.expect.stdout_lacks {
            if run.stderr.contains(unwanted.as_str()) {
                wrong.push(format!("output has {unwanted:?}"));
            }
        }
        let denied: Vec<&Value> = run
            .events
            .iter()
            .filter(|e| e["kind"] == "egress_denied" && e["details"]["reason"].is_string())
            .collect();
        for want in &case.expect.events {
            let seen = denied.iter().any(|e| {
                want.iter().all(|(k, v)| &e["details"][k] == v)
                    && e["project"] == "abuse"
                    && e["job_id"] == job["job_id"]
            });
            if !seen {
                wrong.push(format!("no egress_denied event with {want:?}: {denied:?}"));
            }
        }
        if case.expect.events.is_empty() && !denied.is_empty() {
            wrong.push(format!("unexpected egress_denied events {denied:?}"));
        }
        let got = r["usage"]["network"]["denied"].as_u64().unwrap_or(0);
        if got < case.expect.denied_at_least {
            wrong.push(format!(
                "usage.network.denied {got} < {}",
                case.expect.denied_at_least
            ));
        }
        if !wrong.is_empty() {
            failures.push(format!(
                "{}: {}\n--- result: {}\n--- output:\n{}",
                case.name,
                wrong.join("; "),
                r,
                run.stderr
            ));
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n\n"));
}

#[test]
fn a_job_asking_for_more_than_the_worker_allows_is_rejected() {
    if !prerequisites() {
        return;
    }
    let _serial = serial();
    let world = world();
    let mut job: Value = serde_json::from_str(
        &std::fs::read_to_string(repo().join("fixtures/jobs/python-app-online.json")).unwrap(),
    )
    .unwrap();
    job["job_id"] = "egress-too-much".into();
    job["network"] = serde_json::json!({"egress": ["127.0.0.2:8443", "pypi.org:443"]});
    let file = world.dir.path().join("too-much.json");
    std::fs::write(&file, serde_json::to_vec(&job).unwrap()).unwrap();
    let run = replay(world, &file);
    assert_eq!(run.code, 65, "{}", run.stderr);
    let r = &run.result;
    assert_eq!(r["status"], "rejected");
    assert_eq!(r["error"]["field"], "network.egress", "{r}");
    assert_eq!(r["error"]["rule"], "not_allowed", "{r}");
    assert!(
        r["error"]["message"]
            .as_str()
            .unwrap()
            .contains("pypi.org:443"),
        "{r}"
    );
}

/// A slow-loris job under `corral work`: it keeps its proxy at the connection cap (idle
/// connections, reopened as the proxy's head timeout cuts them, and one more each second,
/// refused). Its proxy is its own: the online build beside it downloads through another and
/// finishes while the attacker still holds every connection it may.
#[test]
fn under_corral_work_a_build_downloads_while_another_job_holds_its_proxy_at_the_cap() {
    if !(prerequisites()
        && require(corral_work::broker_up(), "RabbitMQ on 127.0.0.1:5672")
        && require(corral_work::have_pika(), "python3 with pika"))
    {
        return;
    }
    let _serial = serial();
    let world = world();
    let scratch = tempfile::Builder::new()
        .prefix("corral-egress-work-")
        .tempdir_in("/var/tmp")
        .unwrap();
    let prefix = format!("teg{}", std::process::id());
    let port = corral_work::free_port();
    let config = scratch.path().join("worker.toml");
    std::fs::write(
        &config,
        format!(
            "data_dir = {data:?}\nconcurrency = 2\n\n\
             [amqp]\nurl = \"amqp://guest@127.0.0.1:5672/%2f\"\npassword = \"guest\"\nprefix = {prefix:?}\n\n\
             [metrics]\nlisten = \"127.0.0.1:{port}\"\n\n{egress}",
            data = world.data().to_str().unwrap(),
            egress = std::fs::read_to_string(world.config()).unwrap(),
        ),
    )
    .unwrap();
    let mut worker =
        corral_work::Worker::start(&config, &prefix, scratch.path().join("worker.log"), port);
    let denied = corral_work::follow_events(
        scratch.path(),
        "denied",
        &config,
        &["--follow", "--json", "--kind", "egress_denied"],
    );

    let online: Value = serde_json::from_str(
        &std::fs::read_to_string(repo().join("fixtures/jobs/python-app-online.json")).unwrap(),
    )
    .unwrap();
    let holder_id = format!("egress-holder-{}", std::process::id());
    let holder = serde_json::json!({
        "schema": "corral.job.v1",
        "job_id": holder_id,
        "project": "abuse",
        "base": "python-3.11",
        "source": online["source"],
        "command": ["python3", "-c", SLOW_LORIS],
        "limits": {"wall_seconds": 900},
        "network": {"egress": ["127.0.0.2:8443"]},
    });
    let holder_file = scratch.path().join("holder.json");
    std::fs::write(&holder_file, serde_json::to_vec(&holder).unwrap()).unwrap();
    let submit = |file: &Path| {
        common::corral()
            .args(["submit", "--wait", "--timeout", "15m", "--config"])
            .arg(&config)
            .arg(file)
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap()
    };
    let mut holding = corral_work::Reaped(submit(&holder_file));

    // The attacker is at the cap once its proxy refuses a connection for it.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(300);
    let capped =
        |e: &Value| e["job_id"] == holder_id.as_str() && e["details"]["reason"] == "connection_cap";
    while !events(scratch.path(), "denied").iter().any(capped) {
        assert!(
            std::time::Instant::now() < deadline,
            "the holder never reached its proxy's cap:\n{}",
            worker.log()
        );
        assert!(
            holding.0.try_wait().unwrap().is_none(),
            "the holder ended early"
        );
        std::thread::sleep(std::time::Duration::from_millis(200));
    }

    let mut online_job = online.clone();
    online_job["job_id"] = format!("egress-online-{}", std::process::id()).into();
    let online_file = scratch.path().join("online.json");
    std::fs::write(&online_file, serde_json::to_vec(&online_job).unwrap()).unwrap();
    let out = submit(&online_file).wait_with_output().unwrap();
    let result: Value = serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
        panic!(
            "online: no result ({e}): {}\nworker:\n{}",
            text(&out.stderr),
            worker.log()
        )
    });
    assert_eq!(result["status"], "succeeded", "{result}");
    assert_eq!(result["artifact"]["manifest_digest"], world.offline_digest);
    assert_eq!(result["usage"]["network"]["denied"], 0, "{result}");
    assert!(
        holding.0.try_wait().unwrap().is_none(),
        "the holder ended before the online build"
    );
    assert!(
        !events(scratch.path(), "denied")
            .iter()
            .any(|e| e["job_id"] == online_job["job_id"]),
        "the online build was refused a connection"
    );

    // The operator cancels the attacker: one final result, its refusals counted.
    let cancel = format!(
        "import json, pika\nc = pika.BlockingConnection(pika.URLParameters('amqp://guest:guest@127.0.0.1:5672/%2f'))\n\
         c.channel().basic_publish('{prefix}.control', '', json.dumps({{'schema': 'corral.cancel.v1', 'job_id': '{holder_id}', 'reason': 'slow loris'}}))\n\
         c.close()\n"
    );
    assert!(
        Command::new("python3")
            .arg("-c")
            .arg(cancel)
            .status()
            .unwrap()
            .success()
    );
    let mut stdout = String::new();
    std::io::Read::read_to_string(holding.0.stdout.as_mut().unwrap(), &mut stdout).unwrap();
    let held: Value = serde_json::from_str(&stdout)
        .unwrap_or_else(|e| panic!("holder: no result ({e}): {stdout}\n{}", worker.log()));
    assert_eq!(held["status"], "cancelled", "{held}");
    let net = &held["usage"]["network"];
    assert!(net["denied"].as_u64().unwrap() >= 1, "{net}");
    // Idle connections never reached a destination: nothing went out for it.
    assert_eq!(net["connections"], 0, "{net}");
    assert_eq!(net["bytes_out"], 0, "{net}");
    drop(denied);
    let status = worker.stop();
    assert!(status.success(), "worker exit {status}:\n{}", worker.log());
}

/// The events a `corral events --json` follower printed so far.
fn events(dir: &Path, name: &str) -> Vec<Value> {
    std::fs::read_to_string(dir.join(format!("{name}.out")))
        .unwrap_or_default()
        .lines()
        .filter_map(|l| serde_json::from_str(l).ok())
        .collect()
}

/// Keeps the proxy's 8 connections open and idle (reopening those its head timeout cuts) and
/// tries one more each second, until stopped.
const SLOW_LORIS: &str = "\
import select, socket, time
held = []
while True:
    while len(held) < 9:
        held.append(socket.create_connection(('127.0.0.1', 3128), timeout=10))
    ready, _, _ = select.select(held, [], [], 1.0)
    for s in ready:
        s.recv(100)
        held.remove(s)
        s.close()
    time.sleep(1)
";
