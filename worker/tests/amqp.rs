//! `corral work`'s AMQP layer against the real RabbitMQ, real queues: workers are this test
//! binary re-executed as a process worker (`common/process_worker.rs`: jobs run as plain
//! child processes, which no shipped binary can do).
//! Each test uses its own name prefix and deletes what it declared. Tests that disturb the
//! whole broker (closing connections, stopping the app, memory alarm) hold an exclusive file
//! lock; all others hold it shared, so they never overlap with those.
//!
//! Broker: `CORRAL_TEST_AMQP_URL`, default `amqp://guest:guest@127.0.0.1:5672/%2f`.

use std::collections::{BTreeMap, HashMap};
use std::io::{BufRead, BufReader};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use corral_protocol::{JobResult, LogChunk, Status, Stream};
use corral_worker::amqp::{Names, declare};
use lapin::options::{
    BasicAckOptions, BasicGetOptions, BasicPublishOptions, ConfirmSelectOptions,
    ExchangeDeleteOptions, QueueBindOptions, QueueDeclareOptions, QueueDeleteOptions,
};
use lapin::types::{AMQPValue, FieldArray, FieldTable, LongString};
use lapin::{BasicProperties, Channel, Connection, ConnectionProperties};
use serde_json::json;

mod common;
#[path = "common/process_worker.rs"]
mod process_worker;
use common::require;

const DELIVERY_LIMIT: u32 = 2;
/// Generous bound on waiting for results: a hang fails the test instead of blocking CI.
const PATIENCE: Duration = Duration::from_secs(90);

fn url() -> String {
    std::env::var("CORRAL_TEST_AMQP_URL")
        .unwrap_or_else(|_| "amqp://guest:guest@127.0.0.1:5672/%2f".into())
}

/// Serializes broker-wide faults against everything else.
fn broker_lock(exclusive: bool) -> std::fs::File {
    let file = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(std::env::temp_dir().join("corral-amqp-tests.lock"))
        .unwrap();
    if exclusive {
        file.lock().unwrap();
    } else {
        file.lock_shared().unwrap();
    }
    file
}

/// Runs `rabbitmqctl ARGS`, which must succeed; its stdout.
fn rabbitmqctl(args: &[&str]) -> String {
    let out = Command::new("rabbitmqctl").args(args).output().unwrap();
    assert!(
        out.status.success(),
        "rabbitmqctl {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// `start_app` can fail while the old listener socket is still closing: retry.
fn start_app() -> bool {
    for _ in 0..30 {
        let ok = Command::new("rabbitmqctl")
            .arg("start_app")
            .output()
            .is_ok_and(|o| o.status.success());
        if ok {
            return Command::new("rabbitmqctl")
                .arg("await_startup")
                .output()
                .is_ok_and(|o| o.status.success());
        }
        std::thread::sleep(Duration::from_secs(1));
    }
    false
}

struct Env {
    prefix: String,
    names: Names,
    collect: String,
    logs: String,
    _lock: std::fs::File,
    workers: Vec<Child>,
    log_dir: tempfile::TempDir,
    cleaned: bool,
}

async fn connect() -> lapin::Result<(Connection, Channel)> {
    let conn = Connection::connect(&url(), ConnectionProperties::default()).await?;
    let ch = conn.create_channel().await?;
    ch.confirm_select(ConfirmSelectOptions::default()).await?;
    Ok((conn, ch))
}

impl Env {
    async fn new(exclusive: bool) -> Option<Env> {
        let lock = broker_lock(exclusive);
        let up = connect().await.is_ok();
        if !require(up, &format!("RabbitMQ at {url}", url = url())) {
            return None;
        }
        let prefix = format!("t{:08x}", fastrand::u32(..));
        let pool = corral_protocol::PoolName::new("default").unwrap();
        let names = Names::new(&prefix, &pool);
        let env = Env {
            collect: format!("{prefix}.collect"),
            logs: format!("{prefix}.logcollect"),
            names,
            prefix,
            _lock: lock,
            workers: Vec::new(),
            log_dir: tempfile::tempdir().unwrap(),
            cleaned: false,
        };
        let (conn, ch) = connect().await.unwrap();
        declare(&conn, &env.names, "default", DELIVERY_LIMIT)
            .await
            .unwrap();
        // Durable collector queues: they must outlive connection faults and broker restarts.
        for (queue, exchange) in [
            (&env.collect, &env.names.results),
            (&env.logs, &env.names.logs),
        ] {
            ch.queue_declare(
                queue.as_str().into(),
                QueueDeclareOptions::durable(),
                FieldTable::default(),
            )
            .await
            .unwrap();
            ch.queue_bind(
                queue.as_str().into(),
                exchange.as_str().into(),
                "#".into(),
                QueueBindOptions::default(),
                FieldTable::default(),
            )
            .await
            .unwrap();
        }
        let _ = conn.close(200, "".into()).await;
        Some(env)
    }

    fn worker(&mut self, extra: &[&str], env: &[(&str, &str)]) -> usize {
        let n = self.workers.len();
        let log =
            std::fs::File::create(self.log_dir.path().join(format!("worker{n}.log"))).unwrap();
        let (url, limit, id) = (
            url(),
            DELIVERY_LIMIT.to_string(),
            format!("{}-w{n}", self.prefix),
        );
        let mut args = vec!["work", "--prefix", &self.prefix];
        args.extend(["--amqp-url", &url, "--lease", "10m"]);
        args.extend(["--delivery-limit", &limit, "--backoff-max", "2s"]);
        args.extend(["--worker-id", &id]);
        args.extend(extra);
        let mut cmd = process_worker::command(&args);
        cmd.env("CORRAL_CONCURRENCY", "2")
            .env("RUST_LOG", "info,lapin=error")
            .envs(env.iter().copied())
            .stdout(Stdio::null())
            .stderr(log);
        self.workers.push(cmd.spawn().unwrap());
        n
    }

    fn signal(&self, n: usize, signal: &str) {
        let pid = self.workers[n].id().to_string();
        assert!(
            Command::new("kill")
                .args([&format!("-{signal}"), &pid])
                .status()
                .unwrap()
                .success()
        );
    }

    /// Waits for worker `n` to exit (bounded) and returns its exit code.
    fn wait(&mut self, n: usize) -> Option<i32> {
        let deadline = Instant::now() + PATIENCE;
        loop {
            if let Some(status) = self.workers[n].try_wait().unwrap() {
                return status.code();
            }
            assert!(
                Instant::now() < deadline,
                "worker {n} did not exit; log:\n{}",
                self.worker_log(n)
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    fn worker_log(&self, n: usize) -> String {
        std::fs::read_to_string(self.log_dir.path().join(format!("worker{n}.log")))
            .unwrap_or_default()
    }

    fn job(&self, id: &str, script: &str, extra: serde_json::Value) -> Vec<u8> {
        let mut job = json!({
            "schema": "corral.job.v1",
            "job_id": id,
            "project": "acme",
            "base": "python-3.11",
            "source": {"digest": format!("sha256:{}", "0".repeat(64))},
            "command": ["sh", "-c", script],
            "limits": {"wall_seconds": 120},
        });
        if let serde_json::Value::Object(extra) = extra {
            for (k, v) in extra {
                job[k] = v;
            }
        }
        serde_json::to_vec(&job).unwrap()
    }

    async fn publish(&self, exchange: &str, key: &str, body: &[u8]) {
        self.publish_with(exchange, key, body, BasicProperties::default())
            .await;
    }

    async fn publish_with(&self, exchange: &str, key: &str, body: &[u8], props: BasicProperties) {
        let (conn, ch) = connect().await.unwrap();
        let confirm = ch
            .basic_publish(
                exchange.into(),
                key.into(),
                BasicPublishOptions {
                    mandatory: true,
                    ..BasicPublishOptions::default()
                },
                body,
                props.with_delivery_mode(2),
            )
            .await
            .unwrap()
            .await
            .unwrap();
        assert!(confirm.is_ack());
        assert!(
            confirm.take_message().is_none(),
            "unroutable publish to {exchange}/{key}"
        );
        let _ = conn.close(200, "".into()).await;
    }

    async fn submit(&self, body: &[u8]) {
        self.publish(&self.names.jobs_exchange, "default", body)
            .await;
    }

    async fn cancel(&self, id: &str) {
        let cancel = json!({"schema": "corral.cancel.v1", "job_id": id, "reason": "test"});
        self.publish(&self.names.control, "", cancel.to_string().as_bytes())
            .await;
    }

    /// Drains a queue with basic.get, reconnecting across broker faults.
    async fn drain_queue(&self, queue: &str) -> Vec<Vec<u8>> {
        let mut out = Vec::new();
        let Ok((conn, ch)) = connect().await else {
            return out;
        };
        while let Ok(Some(msg)) = ch.basic_get(queue.into(), BasicGetOptions::default()).await {
            out.push(msg.delivery.data.clone());
            if msg
                .delivery
                .acker
                .ack(BasicAckOptions::default())
                .await
                .is_err()
            {
                break;
            }
        }
        let _ = conn.close(200, "".into()).await;
        out
    }

    /// Collects results until every id in `ids` has one (bounded), then a little longer to
    /// catch duplicates. Returns every result per job id.
    async fn results(&self, ids: &[String]) -> HashMap<String, Vec<JobResult>> {
        let mut all: HashMap<String, Vec<JobResult>> = HashMap::new();
        let deadline = Instant::now() + PATIENCE;
        while !ids.iter().all(|id| all.contains_key(id)) {
            assert!(
                Instant::now() < deadline,
                "missing results for {:?}; worker logs:\n{}",
                ids.iter()
                    .filter(|id| !all.contains_key(*id))
                    .collect::<Vec<_>>(),
                (0..self.workers.len())
                    .map(|n| self.worker_log(n))
                    .collect::<Vec<_>>()
                    .join("\n---\n")
            );
            for body in self.drain_queue(&self.collect).await {
                let r: JobResult = corral_protocol::decode(&body).expect("a valid result");
                all.entry(r.job_id.to_string()).or_default().push(r);
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        all
    }

    async fn count(&self, queue: &str) -> u32 {
        let (conn, ch) = connect().await.unwrap();
        let q = ch
            .queue_declare(
                queue.into(),
                QueueDeclareOptions {
                    passive: true,
                    ..Default::default()
                },
                FieldTable::default(),
            )
            .await
            .unwrap();
        let _ = conn.close(200, "".into()).await;
        q.message_count()
    }

    /// Stops every worker still running (SIGTERM, then waits), and checks that the job
    /// queue holds nothing: no job left unacked (it would be back to ready once its
    /// consumer is gone) and none left unanswered.
    async fn stop_all_and_check_queue_empty(&mut self) {
        for n in 0..self.workers.len() {
            if self.workers[n].try_wait().unwrap().is_none() {
                self.signal(n, "TERM");
                self.wait(n);
            }
        }
        let left = self.count(&self.names.jobs_queue).await;
        assert_eq!(left, 0, "jobs left in {}", self.names.jobs_queue);
    }

    /// Explicit end of a test; [`Drop`] does the same when a test panics.
    async fn cleanup(&mut self) {
        self.kill_workers();
        cleanup_names(
            self.names.clone(),
            [self.collect.clone(), self.logs.clone()],
        )
        .await;
        self.cleaned = true;
    }

    fn kill_workers(&mut self) {
        for w in &mut self.workers {
            let _ = w.kill();
            let _ = w.wait();
        }
    }
}

impl Drop for Env {
    fn drop(&mut self) {
        if self.cleaned {
            return;
        }
        self.kill_workers();
        let names = self.names.clone();
        let extra = [self.collect.clone(), self.logs.clone()];
        // Drop may run inside the test's runtime: clean up from a thread with its own.
        let _ = std::thread::spawn(move || {
            tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap()
                .block_on(cleanup_names(names, extra))
        })
        .join();
    }
}

async fn cleanup_names(names: Names, extra: [String; 2]) {
    let Ok((conn, ch)) = connect().await else {
        return;
    };
    for q in [
        &names.jobs_queue,
        &names.dead_queue,
        &names.dead_unanswered(),
        &extra[0],
        &extra[1],
    ] {
        let _ = ch
            .queue_delete(q.as_str().into(), QueueDeleteOptions::default())
            .await;
    }
    for e in [
        &names.jobs_exchange,
        &names.dead_exchange,
        &names.results,
        &names.events,
        &names.logs,
        &names.control,
    ] {
        let _ = ch
            .exchange_delete(e.as_str().into(), ExchangeDeleteOptions::default())
            .await;
    }
    let _ = conn.close(200, "".into()).await;
}

/// Every job has exactly one final result, or duplicates that agree on the outcome.
fn one_outcome_each(results: &HashMap<String, Vec<JobResult>>) {
    for (id, rs) in results {
        let first = &rs[0];
        for r in rs {
            assert_eq!(
                (r.status, r.reason, r.exit_code),
                (first.status, first.reason, first.exit_code),
                "job {id} has conflicting results"
            );
        }
    }
}

fn ids(prefix: &str, n: usize) -> Vec<String> {
    (0..n).map(|i| format!("{prefix}-{i}")).collect()
}

/// The process worker's entry: the tests start this binary as their workers, and only then
/// (with its arguments in the environment) does it serve.
#[test]
#[ignore = "the workers' entry point, started by the tests themselves"]
fn process_worker() {
    process_worker::serve_if_asked();
}

#[tokio::test(flavor = "multi_thread")]
async fn happy_path_results_reach_an_independent_pika_consumer() {
    let Some(mut env) = Env::new(false).await else {
        return;
    };
    if !require(
        Command::new("python3")
            .args(["-c", "import pika"])
            .status()
            .is_ok_and(|s| s.success()),
        "python3 with pika",
    ) {
        return env.cleanup().await;
    }
    let jobs = ids("ok", 8);
    let script = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/pika_collect.py");
    let mut pika = Command::new("python3")
        .arg(script)
        .args([&url(), &env.names.results, &jobs.len().to_string(), "90"])
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let mut lines = BufReader::new(pika.stdout.take().unwrap()).lines();
    assert_eq!(lines.next().unwrap().unwrap(), "ready");
    for (i, id) in jobs.iter().enumerate() {
        // Half succeed, half fail: both are final results, never retried.
        let script = if i % 2 == 0 {
            format!("echo {id}")
        } else {
            "exit 3".into()
        };
        env.submit(&env.job(id, &script, json!({}))).await;
    }
    env.worker(&[], &[]);
    let mut seen: BTreeMap<String, Vec<JobResult>> = BTreeMap::new();
    for line in lines {
        let r: JobResult = serde_json::from_str(&line.unwrap()).unwrap();
        seen.entry(r.job_id.to_string()).or_default().push(r);
    }
    assert!(
        pika.wait().unwrap().success(),
        "pika collector timed out; got {seen:?}"
    );
    for (i, id) in jobs.iter().enumerate() {
        let r = &seen[id][0];
        if i % 2 == 0 {
            assert_eq!(r.status, Status::Succeeded, "{r:?}");
        } else {
            assert_eq!((r.status, r.exit_code), (Status::Failed, Some(3)), "{r:?}");
        }
    }
    let results = env.results(&jobs).await;
    one_outcome_each(&results);
    env.stop_all_and_check_queue_empty().await;
    assert_eq!(env.count(&env.names.dead_queue).await, 0);
    env.cleanup().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn invalid_messages_are_dead_lettered_with_rejected_results() {
    let Some(mut env) = Env::new(false).await else {
        return;
    };
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../fixtures/invalid");
    let expected: serde_json::Value =
        serde_json::from_slice(&std::fs::read(dir.join("expected.json")).unwrap()).unwrap();
    let mut want = BTreeMap::new();
    let mut published = 0;
    for (i, (file, rule)) in expected.as_object().unwrap().iter().enumerate() {
        let mut bytes = std::fs::read(dir.join(file)).unwrap();
        // Give each a distinct id where it has a usable one, so results can be told apart.
        if let Ok(serde_json::Value::Object(mut map)) = serde_json::from_slice(&bytes)
            && corral_protocol::recover_ids(&bytes).0.is_some()
        {
            map.insert("job_id".into(), json!(format!("inv-{i}")));
            bytes = serde_json::to_vec(&map).unwrap();
        }
        if let (Some(id), _) = corral_protocol::recover_ids(&bytes) {
            want.insert(id.to_string(), (file.clone(), rule.clone()));
        }
        env.submit(&bytes).await;
        published += 1;
    }
    // A job whose wall limit exceeds the lease is refused up front.
    env.submit(&env.job(
        "too-long",
        "true",
        json!({"limits": {"wall_seconds": 3600}}),
    ))
    .await;
    published += 1;
    want.insert(
        "too-long".into(),
        (
            "(lease)".into(),
            json!({"field": "limits.wall_seconds", "rule": "maximum"}),
        ),
    );
    env.worker(&[], &[]);
    let ids: Vec<String> = want.keys().cloned().collect();
    let results = env.results(&ids).await;
    one_outcome_each(&results);
    for (id, (file, rule)) in &want {
        let r = &results[id][0];
        assert_eq!(r.status, Status::Rejected, "{file}: {r:?}");
        let err = r.error.as_ref().expect("a rejected result names the error");
        assert_eq!(err.field, rule["field"].as_str().unwrap(), "{file}");
        assert_eq!(err.rule.as_str(), rule["rule"].as_str().unwrap(), "{file}");
    }
    env.stop_all_and_check_queue_empty().await;
    assert_eq!(env.count(&env.names.dead_queue).await, published);
    env.cleanup().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_job_that_crashes_the_worker_every_time_is_dead_lettered_after_the_delivery_limit() {
    let Some(mut env) = Env::new(false).await else {
        return;
    };
    env.submit(&env.job("crash-1", "true", json!({}))).await;
    let mut runs = 0;
    loop {
        // Dead-lettering after the last crash happens asynchronously in the quorum queue:
        // give it a moment, or the next worker would wait for a job that is already gone.
        let settle = Instant::now() + Duration::from_secs(3);
        let mut dead = env.count(&env.names.dead_queue).await;
        while dead == 0 && runs > 0 && Instant::now() < settle {
            tokio::time::sleep(Duration::from_millis(100)).await;
            dead = env.count(&env.names.dead_queue).await;
        }
        if dead > 0 {
            break;
        }
        runs += 1;
        assert!(
            runs <= DELIVERY_LIMIT as usize + 3,
            "not dead-lettered after {runs} crashes"
        );
        let n = env.worker(&[], &[("CORRAL_FAULT_ABORT_JOB", "crash-")]);
        env.wait(n);
    }
    assert_eq!(
        runs,
        DELIVERY_LIMIT as usize + 1,
        "one delivery plus the limit's redeliveries"
    );
    // A platform failure is retried with backoff, then dead-lettered with an `error` result.
    env.submit(&env.job("plat-1", "true", json!({}))).await;
    env.submit(&env.job("fine-1", "true", json!({}))).await;
    env.worker(&[], &[("CORRAL_FAULT_PLATFORM_JOB", "plat-")]);
    let results = env.results(&["plat-1".into(), "fine-1".into()]).await;
    one_outcome_each(&results);
    assert_eq!(results["plat-1"][0].status, Status::Error);
    assert_eq!(results["fine-1"][0].status, Status::Succeeded);
    env.stop_all_and_check_queue_empty().await;
    assert_eq!(env.count(&env.names.dead_queue).await, 2);
    env.cleanup().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn kill_9_mid_build_loses_no_job() {
    let Some(mut env) = Env::new(false).await else {
        return;
    };
    let jobs = ids("k9", 5);
    for id in &jobs {
        env.submit(&env.job(id, "sleep 1; echo done", json!({})))
            .await;
    }
    let w = env.worker(&[], &[]);
    tokio::time::sleep(Duration::from_millis(1500)).await;
    env.signal(w, "KILL");
    env.wait(w);
    env.worker(&[], &[]);
    let results = env.results(&jobs).await;
    one_outcome_each(&results);
    assert!(
        jobs.iter()
            .all(|id| results[id][0].status == Status::Succeeded),
        "{results:?}"
    );
    env.stop_all_and_check_queue_empty().await;
    env.cleanup().await;
}

/// Every event on the test's events exchange until `done` says the collection is complete
/// (bounded), from a queue of the test's own, exclusive to its connection.
async fn collect_events(
    ch: &Channel,
    queue: &str,
    done: impl Fn(&[corral_protocol::Event]) -> bool,
) -> Vec<corral_protocol::Event> {
    let mut events = Vec::new();
    let deadline = Instant::now() + PATIENCE;
    while !done(&events) {
        assert!(Instant::now() < deadline, "events so far: {events:#?}");
        match ch
            .basic_get(queue.into(), BasicGetOptions { no_ack: true })
            .await
            .unwrap()
        {
            Some(message) => {
                events.push(corral_protocol::decode(&message.delivery.data).expect("a valid event"))
            }
            None => tokio::time::sleep(Duration::from_millis(50)).await,
        }
    }
    events
}

#[tokio::test(flavor = "multi_thread")]
async fn events_say_a_job_was_redelivered_and_a_flood_while_it_runs() {
    use corral_protocol::EventKind;
    let Some(mut env) = Env::new(false).await else {
        return;
    };
    let (conn, ch) = connect().await.unwrap();
    let queue = ch
        .queue_declare(
            "".into(),
            QueueDeclareOptions::exclusive().auto_delete(),
            FieldTable::default(),
        )
        .await
        .unwrap();
    ch.queue_bind(
        queue.name().clone(),
        env.names.events.as_str().into(),
        "*.*.acme".into(),
        QueueBindOptions::default(),
        FieldTable::default(),
    )
    .await
    .unwrap();
    let queue = queue.name().to_string();

    // A worker dies mid-build; the next one runs the job again and says it was redelivered.
    env.submit(&env.job("ev-again", "sleep 2; echo done", json!({})))
        .await;
    let w = env.worker(&[], &[]);
    tokio::time::sleep(Duration::from_millis(1200)).await;
    env.signal(w, "KILL");
    env.wait(w);
    env.worker(&[], &[]);
    // 3 MiB of output at once, then the job goes on for 2 s.
    env.submit(&env.job(
        "ev-flood",
        "yes flood | head -c 3145728; sleep 2; echo calm",
        json!({}),
    ))
    .await;
    let finished = |events: &[corral_protocol::Event], id: &str| {
        events
            .iter()
            .any(|e| e.kind == EventKind::JobFinished && e.job_id.as_ref().unwrap().as_str() == id)
    };
    let events = collect_events(&ch, &queue, |events| {
        finished(events, "ev-again") && finished(events, "ev-flood")
    })
    .await;
    let of = |id: &str| -> Vec<&corral_protocol::Event> {
        events
            .iter()
            .filter(|e| e.job_id.as_ref().is_some_and(|j| j.as_str() == id))
            .collect()
    };

    let again: Vec<EventKind> = of("ev-again").iter().map(|e| e.kind).collect();
    let redelivered = again
        .iter()
        .position(|k| *k == EventKind::JobRedelivered)
        .unwrap_or_else(|| panic!("no job_redelivered: {again:?}"));
    assert_eq!(
        again[redelivered..],
        [
            EventKind::JobRedelivered,
            EventKind::JobStarted,
            EventKind::JobFinished
        ],
        "{again:?}"
    );
    let again_events = of("ev-again");
    let last = again_events.last().unwrap();
    assert_eq!(last.details["status"], "succeeded");
    assert_eq!(last.worker, format!("{}-w1", env.prefix));

    let flood = of("ev-flood");
    let kinds: Vec<EventKind> = flood.iter().map(|e| e.kind).collect();
    assert_eq!(
        kinds,
        [
            EventKind::JobStarted,
            EventKind::LogFlood,
            EventKind::JobFinished
        ]
    );
    assert_eq!(flood[1].routing_key(), "warning.log_flood.acme");
    assert!(
        flood[1].at_ms + 1500 <= flood[2].at_ms,
        "log_flood at {}, job_finished at {}: not while the job ran",
        flood[1].at_ms,
        flood[2].at_ms
    );
    assert_eq!(flood[2].details["alerts"], json!(["log_flood"]));
    assert_eq!(flood[2].details["dropped"], json!({}));

    let _ = conn.close(200, "".into()).await;
    env.stop_all_and_check_queue_empty().await;
    env.cleanup().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn sigterm_drains_running_builds_and_requeues_the_rest() {
    let Some(mut env) = Env::new(false).await else {
        return;
    };
    // Concurrency 1: `short` runs and finishes within the drain; `long` would outlast the
    // drain deadline and is requeued; `queued` never starts.
    env.submit(&env.job("short", "sleep 2; echo finished", json!({})))
        .await;
    env.submit(&env.job("queued", "echo never here", json!({})))
        .await;
    let w = env.worker(&["--concurrency", "1", "--drain-deadline", "3s"], &[]);
    tokio::time::sleep(Duration::from_millis(800)).await;
    env.signal(w, "TERM");
    assert_eq!(env.wait(w), Some(0), "{}", env.worker_log(w));
    let results = env.results(&["short".into()]).await;
    assert_eq!(results["short"][0].status, Status::Succeeded);
    assert!(!results.contains_key("queued"));
    assert_eq!(
        env.count(&env.names.jobs_queue).await,
        1,
        "the unstarted job is back in the queue"
    );

    env.submit(&env.job("long", "echo started; sleep 60", json!({})))
        .await;
    let w = env.worker(&["--concurrency", "1", "--drain-deadline", "2s"], &[]);
    // `queued` runs first (FIFO), then `long`.
    let results = env.results(&["queued".into()]).await;
    assert_eq!(results["queued"][0].status, Status::Succeeded);
    tokio::time::sleep(Duration::from_millis(800)).await;
    env.signal(w, "TERM");
    assert_eq!(env.wait(w), Some(0), "{}", env.worker_log(w));
    assert_eq!(
        env.count(&env.names.jobs_queue).await,
        1,
        "the build cut by the deadline is requeued"
    );
    assert!(
        env.drain_queue(&env.collect).await.is_empty(),
        "no result for the requeued build"
    );

    // A second signal does not wait for the (default, 5 min) drain deadline.
    env.drain_queue(&env.logs).await;
    let w = env.worker(&["--concurrency", "1"], &[]);
    let deadline = Instant::now() + PATIENCE;
    while env.drain_queue(&env.logs).await.is_empty() {
        assert!(
            Instant::now() < deadline,
            "the long job never started: {}",
            env.worker_log(w)
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    env.signal(w, "TERM");
    tokio::time::sleep(Duration::from_millis(300)).await;
    env.signal(w, "TERM");
    assert_eq!(env.wait(w), Some(0), "{}", env.worker_log(w));
    assert_eq!(
        env.count(&env.names.jobs_queue).await,
        1,
        "the stopped build is requeued"
    );
    assert!(env.drain_queue(&env.collect).await.is_empty());
    env.cleanup().await;
}

/// `concurrency` bounds the builds, `amqp.prefetch` (by default one more) the deliveries
/// held. With one build slot the second job is delivered while the first builds, waits for
/// the slot, and only then builds: the queue empties by one, and no two builds overlap.
#[tokio::test(flavor = "multi_thread")]
async fn a_delivery_beyond_the_build_slots_waits_for_one() {
    let Some(mut env) = Env::new(false).await else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let trace = dir.path().join("trace");
    let jobs = ids("slot", 3);
    for id in &jobs {
        let script = format!(
            "echo {id} start >> {t}; sleep 1.5; echo {id} end >> {t}",
            t = trace.display()
        );
        env.submit(&env.job(id, &script, json!({}))).await;
    }
    let lines = || {
        std::fs::read_to_string(&trace)
            .unwrap_or_default()
            .lines()
            .map(str::to_string)
            .collect::<Vec<_>>()
    };
    let w = env.worker(&["--concurrency", "1"], &[]);
    poll_until("the first build starts", lines, |l| !l.is_empty()).await;
    // The second job is held (prefetch 2), the third still queued.
    let deadline = Instant::now() + Duration::from_secs(1);
    let mut queued = env.count(&env.names.jobs_queue).await;
    while queued != 1 && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(50)).await;
        queued = env.count(&env.names.jobs_queue).await;
    }
    assert_eq!(
        lines().len(),
        1,
        "the first build still runs: {:?}",
        lines()
    );
    assert_eq!(queued, 1, "two of three jobs delivered to one build slot");
    let results = env.results(&jobs).await;
    one_outcome_each(&results);
    assert!(
        jobs.iter()
            .all(|id| results[id][0].status == Status::Succeeded)
    );
    let expected: Vec<String> = jobs
        .iter()
        .flat_map(|id| [format!("{id} start"), format!("{id} end")])
        .collect();
    assert_eq!(lines(), expected, "one build at a time, in queue order");
    env.signal(w, "TERM");
    assert_eq!(env.wait(w), Some(0), "{}", env.worker_log(w));

    // `amqp.prefetch = 1`: nothing is held beyond the build.
    let more = ids("slot-one", 2);
    for id in &more {
        env.submit(&env.job(id, "echo started; sleep 1.5", json!({})))
            .await;
    }
    env.drain_queue(&env.logs).await;
    env.worker(&["--concurrency", "1", "--set", "amqp.prefetch=1"], &[]);
    let deadline = Instant::now() + PATIENCE;
    while env.drain_queue(&env.logs).await.is_empty() {
        assert!(Instant::now() < deadline, "the job never started");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(env.count(&env.names.jobs_queue).await, 1);
    one_outcome_each(&env.results(&more).await);
    env.stop_all_and_check_queue_empty().await;
    env.cleanup().await;
}

/// The headers the broker gives a message it dead-letters from the job queue (`x-death`,
/// latest first), with `rounds` of the worker's own count of trips through the dead letters.
fn dead_lettered(names: &Names, reason: &str, rounds: Option<u32>) -> BasicProperties {
    let mut death = FieldTable::default();
    for (k, v) in [
        ("reason", reason),
        ("queue", names.jobs_queue.as_str()),
        ("exchange", names.jobs_exchange.as_str()),
    ] {
        death.insert(k.into(), AMQPValue::LongString(LongString::from(v)));
    }
    death.insert("count".into(), AMQPValue::LongLongInt(1));
    let mut headers = FieldTable::default();
    headers.insert(
        "x-death".into(),
        AMQPValue::FieldArray(FieldArray::from(vec![AMQPValue::FieldTable(death)])),
    );
    if let Some(n) = rounds {
        headers.insert("corral-dead-letter-rounds".into(), AMQPValue::LongUInt(n));
    }
    BasicProperties::default().with_headers(headers)
}

/// A quorum queue also counts the deliveries that died with a worker or a connection, and
/// past `x-delivery-limit` dead-letters the job with no worker having answered it. Workers
/// read those from `<dead queue>.unanswered`: such a job goes round again (and is built), and
/// after the last round is answered `error`; what a worker dead-lettered itself was answered
/// already and gets nothing more. Operators' dead-letter queue keeps a copy of each.
#[tokio::test(flavor = "multi_thread")]
async fn a_job_the_broker_dead_lettered_unanswered_goes_round_again_then_is_answered() {
    let Some(mut env) = Env::new(false).await else {
        return;
    };
    let dead = env.names.dead_exchange.clone();
    for (id, reason, rounds) in [
        ("lost-once", "delivery_limit", None),
        ("lost-every-round", "delivery_limit", Some(2)),
        ("answered-before", "rejected", None),
    ] {
        let body = env.job(id, "echo built", json!({}));
        env.publish_with(&dead, "", &body, dead_lettered(&env.names, reason, rounds))
            .await;
    }
    assert_eq!(env.count(&env.names.dead_unanswered()).await, 3);
    env.worker(&[], &[]);
    let results = env
        .results(&["lost-once".into(), "lost-every-round".into()])
        .await;
    one_outcome_each(&results);
    assert_eq!(results["lost-once"][0].status, Status::Succeeded);
    let given_up = &results["lost-every-round"][0];
    assert_eq!(given_up.status, Status::Error, "{given_up:?}");
    assert!(
        given_up
            .message
            .as_deref()
            .is_some_and(|m| m.contains("dead-lettered the job (delivery_limit) in 3 rounds")),
        "{given_up:?}"
    );
    assert!(
        !results.contains_key("answered-before"),
        "{:?}",
        results.get("answered-before")
    );
    assert_eq!(env.count(&env.names.dead_unanswered()).await, 0);
    assert_eq!(env.count(&env.names.dead_queue).await, 3);
    env.stop_all_and_check_queue_empty().await;
    env.cleanup().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn cancel_stops_a_running_job_and_answers_a_queued_one() {
    let Some(mut env) = Env::new(false).await else {
        return;
    };
    env.submit(&env.job("running", "echo started; sleep 60", json!({})))
        .await;
    env.submit(&env.job("waiting", "echo should not run", json!({})))
        .await;
    env.worker(&["--concurrency", "1"], &[]);
    // Wait until `running` has produced output, so it surely runs.
    let deadline = Instant::now() + PATIENCE;
    while env.drain_queue(&env.logs).await.is_empty() {
        assert!(
            Instant::now() < deadline,
            "the job never started: {}",
            env.worker_log(0)
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    env.cancel("waiting").await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    env.cancel("running").await;
    let results = env.results(&["running".into(), "waiting".into()]).await;
    one_outcome_each(&results);
    assert_eq!(results["running"][0].status, Status::Cancelled);
    assert_eq!(results["waiting"][0].status, Status::Cancelled);
    assert_eq!(
        results["waiting"][0].message.as_deref(),
        Some("cancelled before it started")
    );
    env.stop_all_and_check_queue_empty().await;
    env.cleanup().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn log_chunks_arrive_in_order_and_complete_and_the_limit_ends_the_job() {
    let Some(mut env) = Env::new(false).await else {
        return;
    };
    let script = "i=0; while [ $i -lt 20000 ]; do echo line $i; i=$((i+1)); done; echo oops >&2";
    env.submit(&env.job("chatty", script, json!({}))).await;
    env.submit(&env.job(
        "flood",
        "yes 0123456789abcdef | head -c 10000000",
        json!({"limits": {"wall_seconds": 120, "log_bytes": 65536}}),
    ))
    .await;
    env.worker(&[], &[]);
    let results = env.results(&["chatty".into(), "flood".into()]).await;
    assert_eq!(results["chatty"][0].status, Status::Succeeded);
    let flood = &results["flood"][0];
    assert_eq!(
        (flood.status, flood.reason),
        (Status::Killed, Some(corral_protocol::Reason::LogLimit))
    );
    let mut chunks: HashMap<String, Vec<LogChunk>> = HashMap::new();
    for body in env.drain_queue(&env.logs).await {
        let c: LogChunk = corral_protocol::decode(&body).unwrap();
        chunks.entry(c.job_id.to_string()).or_default().push(c);
    }
    let chatty = &chunks["chatty"];
    assert!(chatty.len() > 1, "a long log comes in several chunks");
    for (i, c) in chatty.iter().enumerate() {
        assert_eq!(c.seq, i as u64, "chunks arrive in order");
        assert_eq!(c.eof, i == chatty.len() - 1, "only the last chunk is eof");
    }
    let stdout: Vec<u8> = chatty
        .iter()
        .filter(|c| c.stream == Stream::Stdout)
        .flat_map(|c| c.bytes().unwrap())
        .collect();
    let expected: String = (0..20000).map(|i| format!("line {i}\n")).collect();
    assert_eq!(
        String::from_utf8(stdout).unwrap(),
        expected,
        "the log is complete"
    );
    let stderr: Vec<u8> = chatty
        .iter()
        .filter(|c| c.stream == Stream::Stderr)
        .flat_map(|c| c.bytes().unwrap())
        .collect();
    assert_eq!(stderr, b"oops\n");
    let flood_out: usize = chunks["flood"]
        .iter()
        .filter(|c| c.stream == Stream::Stdout)
        .map(|c| c.bytes().unwrap().len())
        .sum();
    assert_eq!(flood_out, 65536, "the live log stops at limits.log_bytes");
    env.stop_all_and_check_queue_empty().await;
    env.cleanup().await;
}

/// Restores the broker even when the test fails.
struct BrokerRestore;

impl Drop for BrokerRestore {
    fn drop(&mut self) {
        start_app();
        let _ = Command::new("rabbitmqctl")
            .args(["set_vm_memory_high_watermark", "0.4"])
            .output();
    }
}

fn have_rabbitmqctl() -> bool {
    require(
        Command::new("rabbitmqctl")
            .args(["-q", "status"])
            .output()
            .is_ok_and(|o| o.status.success()),
        "rabbitmqctl with rights on the local broker",
    )
}

#[tokio::test(flavor = "multi_thread")]
async fn connection_loss_and_broker_restart_lose_nothing() {
    let Some(mut env) = Env::new(true).await else {
        return;
    };
    if !have_rabbitmqctl() {
        return env.cleanup().await;
    }
    let _restore = BrokerRestore;
    let jobs = ids("fault", 8);
    for id in &jobs {
        env.submit(&env.job(id, "sleep 0.5; echo done", json!({})))
            .await;
    }
    env.worker(&[], &[]);
    tokio::time::sleep(Duration::from_millis(700)).await;
    rabbitmqctl(&["close_all_connections", "test: connection loss"]);
    tokio::time::sleep(Duration::from_millis(1200)).await;
    rabbitmqctl(&["stop_app"]);
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert!(start_app(), "the broker did not come back");
    let results = env.results(&jobs).await;
    one_outcome_each(&results);
    assert!(
        jobs.iter()
            .all(|id| results[id][0].status == Status::Succeeded),
        "{results:?}"
    );
    env.stop_all_and_check_queue_empty().await;
    env.cleanup().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn results_due_during_a_memory_alarm_are_published_once_it_clears() {
    let Some(mut env) = Env::new(true).await else {
        return;
    };
    if !have_rabbitmqctl() {
        return env.cleanup().await;
    }
    let restore = BrokerRestore;
    let jobs = ids("alarm", 4);
    for id in &jobs {
        env.submit(&env.job(id, "sleep 0.3; echo done", json!({})))
            .await;
    }
    rabbitmqctl(&["set_vm_memory_high_watermark", "0"]);
    env.worker(&[], &[]);
    tokio::time::sleep(Duration::from_secs(3)).await;
    // Publishing is blocked: no result can be out yet.
    let early = env.count(&env.collect).await;
    rabbitmqctl(&["set_vm_memory_high_watermark", "0.4"]);
    drop(restore);
    let results = env.results(&jobs).await;
    assert_eq!(early, 0, "results were published during the alarm");
    one_outcome_each(&results);
    assert!(
        jobs.iter()
            .all(|id| results[id][0].status == Status::Succeeded)
    );
    env.stop_all_and_check_queue_empty().await;
    env.cleanup().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn submit_wait_prints_the_result() {
    let Some(mut env) = Env::new(false).await else {
        return;
    };
    env.worker(&[], &[]);
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("job.json");
    std::fs::write(&file, env.job("sub-1", "echo hi", json!({}))).unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_corral"))
        .args([
            "submit",
            file.to_str().unwrap(),
            "--wait",
            "--timeout",
            "90s",
        ])
        .args(["--amqp-url", &url(), "--prefix", &env.prefix])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let r: JobResult = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!((r.job_id.as_str(), r.status), ("sub-1", Status::Succeeded));
    // The same from Python, as fixtures/producer.py shows other producers.
    if require(
        Command::new("python3")
            .args(["-c", "import pika"])
            .status()
            .is_ok_and(|s| s.success()),
        "python3 with pika",
    ) {
        std::fs::write(&file, env.job("py-1", "exit 4", json!({}))).unwrap();
        let producer = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../fixtures/producer.py");
        let out = Command::new("python3")
            .arg(producer)
            .arg(&file)
            .args(["--url", &url(), "--prefix", &env.prefix, "--timeout", "90"])
            .output()
            .unwrap();
        assert_eq!(
            out.status.code(),
            Some(1),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let r: JobResult = serde_json::from_slice(&out.stdout).unwrap();
        assert_eq!(
            (r.job_id.as_str(), r.status, r.exit_code),
            ("py-1", Status::Failed, Some(4))
        );
    }
    env.stop_all_and_check_queue_empty().await;
    env.cleanup().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_deleted_job_queue_is_redeclared_and_consumed_again() {
    let Some(mut env) = Env::new(false).await else {
        return;
    };
    env.submit(&env.job("before", "true", json!({}))).await;
    env.worker(&[], &[]);
    env.results(&["before".into()]).await;
    // The broker cancels the consumer when its queue is deleted; the worker starts over.
    let (conn, ch) = connect().await.unwrap();
    ch.queue_delete(
        env.names.jobs_queue.as_str().into(),
        QueueDeleteOptions::default(),
    )
    .await
    .unwrap();
    let _ = conn.close(200, "".into()).await;
    let deadline = Instant::now() + PATIENCE;
    loop {
        let (conn, ch) = connect().await.unwrap();
        let q = ch
            .queue_declare(
                env.names.jobs_queue.as_str().into(),
                QueueDeclareOptions {
                    passive: true,
                    ..Default::default()
                },
                FieldTable::default(),
            )
            .await;
        let _ = conn.close(200, "".into()).await;
        if q.is_ok_and(|q| q.consumer_count() > 0) {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "queue not redeclared: {}",
            env.worker_log(0)
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    env.submit(&env.job("after", "true", json!({}))).await;
    let results = env.results(&["after".into()]).await;
    assert_eq!(results["after"][0].status, Status::Succeeded);
    env.stop_all_and_check_queue_empty().await;
    env.cleanup().await;
}

/// The consumer tags on `queue`, as `rabbitmqctl list_consumers` prints them.
fn consumer_tags(queue: &str) -> Vec<String> {
    rabbitmqctl(&[
        "list_consumers",
        "-q",
        "--no-table-headers",
        "queue_name",
        "consumer_tag",
    ])
    .lines()
    .filter_map(|line| line.split_once('\t'))
    .filter(|(q, _)| *q == queue)
    .map(|(_, tag)| tag.trim().to_string())
    .collect()
}

/// A quorum queue whose leader died can count deliveries that never arrived as held by a
/// consumer until its channel closes; an idle worker therefore consumes afresh on a new
/// channel every `consumer_refresh`. This checks what a producer can see of that: the tag
/// moves on while the worker is idle, the worker never holds more jobs than its slots
/// (refreshing every second while jobs come and go), and every job gets its one outcome.
#[tokio::test(flavor = "multi_thread")]
async fn an_idle_worker_consumes_afresh_but_never_while_it_holds_jobs() {
    let Some(mut env) = Env::new(false).await else {
        return;
    };
    if !have_rabbitmqctl() {
        return;
    }
    env.worker(&["--consumer-refresh", "1s"], &[]);
    let queue = env.names.jobs_queue.clone();
    let dead = env.names.dead_unanswered();
    let tags = |queue: &str| {
        let queue = queue.to_owned();
        move || consumer_tags(&queue)
    };
    let first = poll_until("the worker consuming", tags(&queue), |t| t.len() == 1).await;
    let idle = poll_until("a fresh consumer while idle", tags(&queue), |t| {
        t.len() == 1 && t[0] != first[0]
    })
    .await;
    assert!(
        idle[0].starts_with(&format!("{}-w0.", env.prefix)),
        "{idle:?}"
    );
    // The consumer of what the broker dead-lettered unanswered too.
    let first_dead = poll_until("the worker consuming dead letters", tags(&dead), |t| {
        t.len() == 1
    })
    .await;
    poll_until("a fresh dead-letter consumer", tags(&dead), |t| {
        t.len() == 1 && t[0] != first_dead[0]
    })
    .await;

    // Three jobs for two slots, and a refresh every second: never more than two may run at
    // once (a consumer made while another still held deliveries would get prefetch credit
    // of its own). Jobs run as plain processes here, so each counts the running ones.
    let running = env.log_dir.path().join("running");
    std::fs::create_dir(&running).unwrap();
    let counts = env.log_dir.path().join("counts");
    let script = format!(
        "touch {r}/$$; ls {r} | wc -l >> {c}; sleep 3; rm {r}/$$",
        r = running.display(),
        c = counts.display()
    );
    let ids = ids("held", 3);
    for id in &ids {
        env.submit(&env.job(id, &script, json!({}))).await;
    }
    let results = env.results(&ids).await;
    let most = std::fs::read_to_string(&counts)
        .unwrap()
        .lines()
        .map(|n| n.trim().parse::<u32>().unwrap())
        .max();
    assert_eq!(
        most,
        Some(2),
        "most jobs running at once (two slots); worker log:\n{}",
        env.worker_log(0)
    );
    one_outcome_each(&results);
    for id in &ids {
        assert_eq!(results[id][0].status, Status::Succeeded, "{id}");
    }
    let holding = consumer_tags(&queue);
    poll_until("a fresh consumer once idle again", tags(&queue), |t| {
        t.len() == 1 && t[0] != holding[0]
    })
    .await;
    env.stop_all_and_check_queue_empty().await;
    env.cleanup().await;
}

/// The publisher connections named `name`, as `rabbitmqctl list_connections` sees them:
/// each one's name (its client address) and its number of open channels.
fn publisher_connections(name: &str) -> Vec<(String, u32)> {
    rabbitmqctl(&[
        "list_connections",
        "-q",
        "--no-table-headers",
        "name",
        "channels",
        "client_properties",
    ])
    .lines()
    .filter(|line| line.contains(name))
    .filter_map(|line| {
        let mut cols = line.split('\t');
        let conn = cols.next()?.to_owned();
        let channels = cols.next()?.trim().parse().ok()?;
        Some((conn, channels))
    })
    .collect()
}

/// Calls `probe` until `ok` holds of what it returns, within [`PATIENCE`]; that value.
async fn poll_until<T: std::fmt::Debug>(
    what: &str,
    probe: impl Fn() -> T,
    ok: impl Fn(&T) -> bool,
) -> T {
    let deadline = Instant::now() + PATIENCE;
    loop {
        let now = probe();
        if ok(&now) {
            return now;
        }
        assert!(Instant::now() < deadline, "{what}: {now:?}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// A publish the broker nacks is never tried again on its channel, and nacks in a row move
/// the publisher to a new connection; once the broker takes messages again, the next
/// publish goes through. (Here the nack comes from a full `reject-publish` queue. In the
/// fleet test RabbitMQ 3.10 nacked every result published on channels opened while a
/// quorum queue elected a new leader, for minutes, until those channels closed.)
#[tokio::test(flavor = "multi_thread")]
async fn a_nacked_publish_gets_a_fresh_channel_and_nacks_in_a_row_a_fresh_connection() {
    use corral_worker::amqp::{Node, Nodes, PublishError, Publisher};
    use std::sync::Arc;
    let Some(mut env) = Env::new(false).await else {
        return;
    };
    let queue = format!("{}.full", env.prefix);
    let (conn, ch) = connect().await.unwrap();
    let mut args = FieldTable::default();
    args.insert("x-max-length".into(), AMQPValue::LongInt(1));
    args.insert(
        "x-overflow".into(),
        AMQPValue::LongString("reject-publish".into()),
    );
    ch.queue_declare(queue.as_str().into(), QueueDeclareOptions::default(), args)
        .await
        .unwrap();
    let fill = ch
        .basic_publish(
            "".into(),
            queue.as_str().into(),
            BasicPublishOptions::default(),
            b"fill",
            BasicProperties::default(),
        )
        .await
        .unwrap()
        .await
        .unwrap();
    assert!(fill.is_ack());

    let name = format!("corral-test-publisher-{}", env.prefix);
    let node = Node {
        uri: url().parse().unwrap(),
        name: "test broker".into(),
    };
    let publisher = Publisher::new(
        Arc::new(Nodes::new(vec![node])),
        name.clone(),
        Duration::from_secs(5),
    );
    let publish = || {
        publisher.publish(
            "",
            &queue,
            b"job result",
            BasicProperties::default().with_message_id("r".into()),
        )
    };
    let nacked = |r: Result<(), PublishError>| matches!(r, Err(PublishError::Nacked { .. }));
    assert!(nacked(publish().await), "the full queue's nack");
    // The connection keeps its pipelined channel only: the nacked one is closed.
    let connections = || publisher_connections(&name);
    let first = poll_until("the nacked channel closed", connections, |c| {
        c.len() == 1 && c[0].1 == 1
    })
    .await;
    assert!(nacked(publish().await), "the second nack");
    assert!(nacked(publish().await), "the third nack");
    poll_until(
        "the connection of 3 nacks in a row closed",
        connections,
        |c| c.iter().all(|(conn, _)| *conn != first[0].0),
    )
    .await;

    ch.queue_purge(queue.as_str().into(), Default::default())
        .await
        .unwrap();
    publish().await.expect("published once the queue has room");
    let now = publisher_connections(&name);
    assert!(
        now.len() == 1 && now[0].0 != first[0].0,
        "a new connection took it: {now:?} (first {first:?})"
    );
    let got = ch
        .basic_get(queue.as_str().into(), BasicGetOptions::default())
        .await
        .unwrap()
        .expect("the published message");
    assert_eq!(got.delivery.data, b"job result");

    publisher.close().await;
    ch.queue_delete(queue.as_str().into(), QueueDeleteOptions::default())
        .await
        .unwrap();
    let _ = conn.close(200, "".into()).await;
    env.cleanup().await;
}
