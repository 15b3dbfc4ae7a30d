//! The fleet under its faults: a 3-node RabbitMQ cluster, a registry and 4 `corral work`
//! workers, all started by `scripts/cluster`, run trivial jobs and real python-app builds
//! while, in turn, the quorum leader node is killed (`kill -9`), a worker host is killed
//! mid-build, every broker connection is cut (`rabbitmqctl close_all_connections`), the
//! registry is stopped for 10 s, a node leaves the cluster (`stop_app`) and returns, and
//! a new release rolls through the workers one at a time (each drained with SIGTERM, as
//! `systemctl stop` under Ansible's `serial: 1` does, then started again).
//!
//! What a platform would observe, through an independent client (pika, in
//! `fleet_traffic.py`): no job lost, exactly one final result per job (a duplicate, from a
//! redelivery whose ack was lost, is identical and marked `corral-redelivered`), every
//! manifest in the registry with all its blobs present and hashing to their digests, and
//! once the workers drained: no mount, cgroup, upper dir or process of theirs left.
//!
//! 1,000 trivial jobs and 20 python-app builds by default (about 3 minutes on 2 cores);
//! `CORRAL_FLEET_JOBS` and `CORRAL_FLEET_BUILDS` size it otherwise. `scripts/cluster test`
//! runs it on its own.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use serde_json::{Value, json};

mod common;
use common::{have, is_root, repo, require, rootfs};

fn now_ms() -> u64 {
    u64::try_from(
        SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap()
            .as_millis(),
    )
    .unwrap()
}

fn env_count(var: &str, default: usize) -> usize {
    std::env::var(var)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// `scripts/cluster ARGS`: its stdout, or a panic with its stderr.
fn cluster(args: &[&str]) -> String {
    let out = Command::new(repo().join("scripts/cluster"))
        .args(args)
        .env("CORRAL_BIN", env!("CARGO_BIN_EXE_corral"))
        .env("CORRAL_CLUSTER_CONCURRENCY", "2")
        .env("RUST_LOG", "info,lapin=error")
        .stdin(Stdio::null())
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "scripts/cluster {args:?}: {}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

/// Takes the whole fleet down when the test ends, however it ends.
/// A failed run keeps its logs (workers', nodes', the collector's) and says where.
struct Fleet {
    scratch: Option<tempfile::TempDir>,
    dir: PathBuf,
    collector: Option<Child>,
}

impl Drop for Fleet {
    fn drop(&mut self) {
        // Before the collector goes: its channel's unacked count is part of the picture.
        let keep = std::thread::panicking();
        if keep
            && let Ok(out) = Command::new(repo().join("scripts/cluster"))
                .arg("queues")
                .arg(&self.dir)
                .output()
        {
            eprintln!(
                "fleet: queues at the failure:\n{}",
                String::from_utf8_lossy(&out.stdout)
            );
        }
        if let Some(mut child) = self.collector.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
        let _ = Command::new(repo().join("scripts/cluster"))
            .arg("down")
            .arg(&self.dir)
            .args(keep.then_some("--keep"))
            .status();
        if keep && let Some(scratch) = self.scratch.take() {
            eprintln!("fleet: logs kept in {}", scratch.keep().display());
        }
    }
}

/// One result publish as the collector saw it.
struct Seen {
    at_ms: u64,
    redelivered: bool,
    result: Value,
}

fn seen(out: &Path) -> Vec<Seen> {
    std::fs::read_to_string(out)
        .unwrap_or_default()
        .lines()
        .filter_map(|l| serde_json::from_str::<Value>(l).ok())
        .map(|v| Seen {
            at_ms: v["at_ms"].as_u64().unwrap(),
            redelivered: v["redelivered"].as_bool().unwrap(),
            result: v["result"].clone(),
        })
        .collect()
}

fn jobs_with_results(out: &Path) -> BTreeSet<String> {
    seen(out)
        .iter()
        .map(|s| s.result["job_id"].as_str().unwrap().to_owned())
        .collect()
}

/// Waits until every job of `expected` has a result, bounded: the fleet made progress.
/// A failure names the jobs still without one and shows what the workers' logs (under
/// `cluster`) say of them, with each worker's last warnings: CI keeps no files.
fn done_by(out: &Path, cluster: &Path, expected: &[Value], what: &str) {
    let deadline = Instant::now() + Duration::from_secs(300);
    loop {
        let done = jobs_with_results(out);
        let missing: Vec<&str> = expected
            .iter()
            .map(|j| j["job_id"].as_str().unwrap())
            .filter(|id| !done.contains(*id))
            .collect();
        if missing.is_empty() {
            return;
        }
        if Instant::now() >= deadline {
            let shown = &missing[..missing.len().min(20)];
            panic!(
                "{what}: no progress past {} of {} results; still without one: {shown:?}\n{}",
                expected.len() - missing.len(),
                expected.len(),
                worker_log_excerpts(cluster, &shown[..shown.len().min(4)])
            );
        }
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// Each worker's log lines that name one of `jobs` (a job id as a whole word), and its
/// last warnings and errors.
fn worker_log_excerpts(cluster: &Path, jobs: &[&str]) -> String {
    let names_one = |line: &str| {
        jobs.iter().any(|id| {
            line.match_indices(id).any(|(at, _)| {
                let after = line[at + id.len()..].chars().next();
                !after.is_some_and(|c| c.is_ascii_alphanumeric() || c == '-')
            })
        })
    };
    let mut text = String::new();
    for n in 1.. {
        let dir = cluster.join(format!("worker{n}"));
        if !dir.is_dir() {
            break;
        }
        let log = std::fs::read_to_string(dir.join("worker.log")).unwrap_or_default();
        let lines: Vec<&str> = log.lines().collect();
        let about: Vec<&str> = lines.iter().copied().filter(|l| names_one(l)).collect();
        let warnings: Vec<&str> = lines
            .iter()
            .copied()
            .filter(|l| l.contains("WARN") || l.contains("ERROR"))
            .collect();
        // The first lines say how each job began, the last where it is stuck.
        let about = if about.len() > 30 {
            let mut ends = about[..10].to_vec();
            ends.push("…");
            ends.extend_from_slice(&about[about.len() - 20..]);
            ends
        } else {
            about
        };
        text.push_str(&format!(
            "-- worker {n}: lines naming {jobs:?}\n{}\n-- worker {n}: last warnings\n{}\n",
            about.join("\n"),
            warnings[warnings.len().saturating_sub(15)..].join("\n")
        ));
    }
    text
}

/// The cgroup directories below a worker's cgroup parent, in every hierarchy: its builds.
fn job_cgroups(parent: &str) -> Vec<PathBuf> {
    let mut found = Vec::new();
    let root = Path::new("/sys/fs/cgroup");
    let mut bases = vec![root.join(parent)];
    if let Ok(hierarchies) = std::fs::read_dir(root) {
        bases.extend(hierarchies.flatten().map(|h| h.path().join(parent)));
    }
    for base in bases {
        if let Ok(entries) = std::fs::read_dir(&base) {
            found.extend(
                entries
                    .flatten()
                    .filter(|e| e.file_type().is_ok_and(|t| t.is_dir()))
                    .map(|e| e.path()),
            );
        }
    }
    found
}

#[test]
fn a_fleet_loses_no_job_through_broker_worker_and_registry_faults() {
    let pika = Command::new("python3")
        .args(["-c", "import pika"])
        .status()
        .is_ok_and(|s| s.success());
    if !(require(is_root(), "root (the workers' sandboxes)")
        && require(
            rootfs().join("usr/bin/python3").exists(),
            "the test rootfs at $CORRAL_TEST_ROOTFS",
        )
        && require(
            Path::new("/usr/lib/rabbitmq/bin/rabbitmq-server").exists(),
            "rabbitmq-server (apt-get install rabbitmq-server)",
        )
        && require(have("docker-registry"), "docker-registry")
        && require(pika, "python3 with pika")
        && require(
            repo().join("fixtures/bundles/python-app/wheels").is_dir(),
            "the python-app wheels (scripts/fixtures)",
        ))
    {
        return;
    }
    let trivial = env_count("CORRAL_FLEET_JOBS", 1000);
    let builds = env_count("CORRAL_FLEET_BUILDS", 20);
    let total = trivial + builds;
    let workers = 4;

    let scratch = tempfile::Builder::new()
        .prefix("corral-fleet-")
        .tempdir_in("/var/tmp")
        .unwrap();
    let scratch_path = scratch.path().to_owned();
    let dir = scratch_path.join("cluster");
    let prefix = format!("fleet{}", std::process::id());
    let mut fleet = Fleet {
        scratch: Some(scratch),
        dir: dir.clone(),
        collector: None,
    };
    let dir_text = dir.to_str().unwrap().to_owned();
    let up = cluster(&[
        "up",
        &dir_text,
        "--workers",
        &workers.to_string(),
        "--prefix",
        &prefix,
    ]);
    let vars: BTreeMap<&str, &str> = up
        .lines()
        .filter_map(|l| l.split_once('='))
        .map(|(k, v)| (k, v.trim_matches('"')))
        .collect();
    let urls = vars["CORRAL_CLUSTER_URLS"].to_owned();
    let registry = vars["CORRAL_CLUSTER_REGISTRY"].to_owned();
    let store = format!("oci+http://{registry}/corral");

    // The sources, uploaded once to the shared registry.
    let push =
        |bundle: &str| common::source_push(&repo().join("fixtures/bundles").join(bundle), &store);
    let hello = push("hello");
    let app = push("python-app");

    // Trivial jobs (distinct inputs: each is really built, snapshotted and stored) with the
    // python-app builds spread among them.
    let mut jobs = Vec::new();
    let every = (trivial / builds.max(1)).max(1);
    let (mut t, mut b) = (0, 0);
    while t < trivial || b < builds {
        if b < builds && (t % every == 0 || t >= trivial) {
            jobs.push(json!({
                "schema": "corral.job.v1", "job_id": format!("app-{b}"), "project": "fleet-app",
                "pool": "default", "base": "python-3.11", "source": {"digest": app},
                "command": ["sh", "/app/build.sh"], "source_date_epoch": 1700000000,
                "env": {"BUILD": b.to_string()},
                "limits": {"memory_bytes": 536870912u64, "wall_seconds": 600},
            }));
            b += 1;
        }
        if t < trivial {
            jobs.push(json!({
                "schema": "corral.job.v1", "job_id": format!("t-{t}"),
                "project": format!("fleet-p{}", t % 13), "pool": "default",
                "base": "python-3.11", "source": {"digest": hello},
                "command": ["true"], "env": {"N": t.to_string()},
            }));
            t += 1;
        }
    }
    let traffic = repo().join("worker/tests/fleet_traffic.py");
    let out = scratch_path.join("results.jsonl");

    // The jobs go out in 8 batches: one before the faults, one as each fault begins (so the
    // fault hits a fleet busy with it; publishing completes on a healthy cluster first, so
    // no job is published twice), one after. Each phase lasts until its batch has results.
    let batches: Vec<&[Value]> = jobs.chunks(jobs.len().div_ceil(8)).collect();
    let mut published = 0;
    let mut publish_next = |batch: usize| -> usize {
        let file = scratch_path.join(format!("jobs-{batch}.jsonl"));
        std::fs::write(
            &file,
            batches[batch]
                .iter()
                .map(|j| format!("{j}\n"))
                .collect::<String>(),
        )
        .unwrap();
        let publish = Command::new("python3")
            .arg(&traffic)
            .args(["publish", &urls, &prefix])
            .arg(&file)
            .output()
            .unwrap();
        assert!(
            publish.status.success(),
            "{}",
            String::from_utf8_lossy(&publish.stderr)
        );
        published += batches[batch].len();
        published
    };
    let collector_log = std::fs::File::create(scratch_path.join("collector.log")).unwrap();
    // The collector's queue exists before the first result: the first publish declares it.
    let until = publish_next(0);
    let started_ms = now_ms();
    fleet.collector = Some(
        Command::new("python3")
            .arg(&traffic)
            .args(["collect", &urls, &prefix, &total.to_string()])
            .arg(&out)
            .arg("1500")
            .stdout(collector_log.try_clone().unwrap())
            .stderr(collector_log)
            .spawn()
            .unwrap(),
    );
    let mut phases: Vec<(String, u64, u64)> = Vec::new();
    let dir_s = dir_text.as_str();
    done_by(&out, &dir, &jobs[..until], "before the faults");
    let before_faults = now_ms();

    let queue = format!("{prefix}.jobs.default");
    let mut batch = 0;
    let mut phase = |name: &str, fault: &mut dyn FnMut(usize)| {
        batch += 1;
        let until = publish_next(batch);
        let start = now_ms();
        fault(until);
        phases.push((name.to_owned(), start, now_ms()));
    };
    phase("quorum leader killed", &mut |until| {
        let leader = cluster(&["leader", dir_s, &queue]).trim().to_owned();
        eprintln!("fleet: kill -9 of node {leader}, the leader of {queue}");
        cluster(&["node", dir_s, &leader, "kill"]);
        done_by(&out, &dir, &jobs[..until], "with the leader killed");
        cluster(&["node", dir_s, &leader, "start"]);
    });
    phase("worker killed mid-build", &mut |until| {
        let parent = format!("corral-test-fleet-{prefix}-w1");
        let deadline = Instant::now() + Duration::from_secs(300);
        while job_cgroups(&parent).is_empty() {
            assert!(Instant::now() < deadline, "worker 1 never ran a build");
            std::thread::sleep(Duration::from_millis(10));
        }
        eprintln!("fleet: kill -9 of worker 1 while it builds");
        cluster(&["worker", dir_s, "1", "kill"]);
        done_by(&out, &dir, &jobs[..until], "with worker 1 dead");
        cluster(&["worker", dir_s, "1", "start"]);
    });
    phase("connections closed", &mut |until| {
        for node in ["1", "2", "3"] {
            cluster(&["close-connections", dir_s, node]);
        }
        done_by(
            &out,
            &dir,
            &jobs[..until],
            "after the connections were closed",
        );
    });
    phase("registry down 10 s", &mut |until| {
        cluster(&["registry", dir_s, "stop"]);
        std::thread::sleep(Duration::from_secs(10));
        cluster(&["registry", dir_s, "start"]);
        done_by(&out, &dir, &jobs[..until], "after the registry's return");
    });
    phase("node 3 partitioned", &mut |until| {
        cluster(&["node", dir_s, "3", "stop_app"]);
        done_by(&out, &dir, &jobs[..until], "with node 3 out");
        cluster(&["node", dir_s, "3", "start_app"]);
    });
    phase("rolling restart", &mut |until| {
        // What a release does: each host drained (its running builds finish and are
        // answered, its unstarted deliveries go back to the queue) and started again while
        // the others take the traffic.
        for n in 1..=workers {
            let n = n.to_string();
            cluster(&["worker", dir_s, &n, "drain"]);
            cluster(&["worker", dir_s, &n, "start"]);
        }
        eprintln!("fleet: rolled {workers} workers one at a time");
        done_by(&out, &dir, &jobs[..until], "after the rolling restart");
    });
    let after_faults = now_ms();
    publish_next(7);

    let status = fleet.collector.take().unwrap().wait().unwrap();
    let finished_ms = now_ms();
    assert!(
        status.success(),
        "the collector did not see every job: {}",
        std::fs::read_to_string(scratch_path.join("collector.log")).unwrap_or_default()
    );

    // Drain every worker (SIGTERM) and look for what they left.
    for n in 1..=workers {
        cluster(&["worker", dir_s, &n.to_string(), "term"]);
    }
    for n in 1..=workers {
        let pid: i32 = std::fs::read_to_string(dir.join(format!("worker{n}/pid")))
            .unwrap()
            .trim()
            .parse()
            .unwrap();
        let deadline = Instant::now() + Duration::from_secs(180);
        while Path::new(&format!("/proc/{pid}")).exists() {
            assert!(Instant::now() < deadline, "worker {n} did not drain");
            std::thread::sleep(Duration::from_millis(100));
        }
    }
    let mountinfo = std::fs::read_to_string("/proc/self/mountinfo").unwrap();
    let orphan_mounts = mountinfo.lines().filter(|l| l.contains(dir_s)).count();
    let orphan_cgroups: Vec<PathBuf> = (1..=workers)
        .flat_map(|n| job_cgroups(&format!("corral-test-fleet-{prefix}-w{n}")))
        .collect();
    let orphan_uppers: Vec<PathBuf> = (1..=workers)
        .flat_map(|n| {
            std::fs::read_dir(dir.join(format!("worker{n}/data/jobs")))
                .map(|d| d.flatten().map(|e| e.path()).collect::<Vec<_>>())
                .unwrap_or_default()
        })
        .collect();
    let orphan_processes: Vec<String> = std::fs::read_dir("/proc")
        .unwrap()
        .flatten()
        .filter_map(|e| std::fs::read(e.path().join("cmdline")).ok())
        .map(|c| String::from_utf8_lossy(&c).replace('\0', " "))
        .filter(|c| c.contains(dir_s) && c.contains("worker.toml"))
        .collect();

    // A project runs as the same host uid on every worker that ran it: the workers'
    // identity maps, as an operator's audit reads them, agree.
    let mut uids: BTreeMap<String, BTreeMap<u64, Vec<usize>>> = BTreeMap::new();
    for n in 1..=workers {
        let map: BTreeMap<String, u64> =
            std::fs::read_to_string(dir.join(format!("worker{n}/data/identities.json")))
                .map(|t| serde_json::from_str(&t).unwrap())
                .unwrap_or_default();
        for (project, uid) in map {
            uids.entry(project)
                .or_default()
                .entry(uid)
                .or_default()
                .push(n);
        }
    }
    let shared = uids
        .values()
        .filter(|by_uid| by_uid.values().map(Vec::len).sum::<usize>() > 1)
        .count();
    let unstable: Vec<_> = uids.iter().filter(|(_, by_uid)| by_uid.len() > 1).collect();
    eprintln!(
        "fleet: {} projects, {shared} of them ran on several workers, {} with differing uids",
        uids.len(),
        unstable.len()
    );

    // Results: one final result per job; duplicates identical and marked.
    let all = seen(&out);
    let mut by_job: BTreeMap<String, Vec<&Seen>> = BTreeMap::new();
    for s in &all {
        by_job
            .entry(s.result["job_id"].as_str().unwrap().to_owned())
            .or_default()
            .push(s);
    }
    let lost = jobs
        .iter()
        .filter(|j| !by_job.contains_key(j["job_id"].as_str().unwrap()))
        .count();
    let mut duplicates = 0;
    let mut differing = Vec::new();
    let mut unmarked = Vec::new();
    let mut not_succeeded = Vec::new();
    let essence = |r: &Value| {
        json!([
            r["status"],
            r["reason"],
            r["exit_code"],
            r["artifact"]["manifest_digest"]
        ])
    };
    for (job, results) in &by_job {
        let first = &results[0].result;
        if first["status"] != "succeeded" {
            not_succeeded.push(format!("{job}: {first}"));
        }
        for dup in &results[1..] {
            duplicates += 1;
            if essence(&dup.result) != essence(first) {
                differing.push(format!("{job}: {} vs {}", dup.result, first));
            }
            if !dup.redelivered {
                unmarked.push(job.clone());
            }
        }
    }
    let manifests: BTreeSet<String> = all
        .iter()
        .filter_map(|s| s.result["artifact"]["manifest_digest"].as_str())
        .map(str::to_owned)
        .collect();
    let digests = scratch_path.join("manifests.txt");
    std::fs::write(
        &digests,
        manifests
            .iter()
            .map(|d| format!("{d}\n"))
            .collect::<String>(),
    )
    .unwrap();
    let verify = Command::new("python3")
        .arg(&traffic)
        .args(["verify", &registry, "corral"])
        .arg(&digests)
        .output()
        .unwrap();
    let verified = String::from_utf8_lossy(&verify.stdout).into_owned();
    assert!(
        verify.status.success(),
        "{verified}{}",
        String::from_utf8_lossy(&verify.stderr)
    );
    let corrupt: usize = verified
        .lines()
        .last()
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|n| n.parse().ok())
        .unwrap_or(usize::MAX);

    // Throughput (first results per second) before, during and after each fault.
    let firsts: Vec<u64> = by_job.values().map(|r| r[0].at_ms).collect();
    let rate = |from: u64, to: u64| {
        let n = firsts.iter().filter(|&&t| t >= from && t < to).count();
        #[allow(clippy::cast_precision_loss)]
        let per_s = n as f64 * 1000.0 / (to.saturating_sub(from).max(1)) as f64;
        format!(
            "{n} jobs in {:.1} s = {per_s:.2}/s",
            (to - from) as f64 / 1000.0
        )
    };
    eprintln!(
        "fleet: before the faults: {}",
        rate(started_ms, before_faults)
    );
    let mut last_end = before_faults;
    for (name, start, end) in &phases {
        eprintln!(
            "fleet:   healing the previous fault: {}",
            rate(last_end, *start)
        );
        eprintln!("fleet:   during {name}: {}", rate(*start, *end));
        last_end = *end;
    }
    eprintln!(
        "fleet: after the faults: {}",
        rate(after_faults, finished_ms)
    );
    // What the workers went through that only their logs tell.
    let logged = |what: &str| -> usize {
        (1..=workers)
            .map(|n| {
                std::fs::read_to_string(dir.join(format!("worker{n}/worker.log")))
                    .unwrap_or_default()
                    .lines()
                    .filter(|l| l.contains(what))
                    .count()
            })
            .sum()
    };
    eprintln!(
        "fleet: results nacked {}, publisher connections replaced after nacks {}",
        logged("refused (nack)"),
        logged("nacks every publish")
    );
    eprintln!(
        "fleet: orphans: mounts {orphan_mounts}, cgroups {}, upper dirs {}, processes {}",
        orphan_cgroups.len(),
        orphan_uppers.len(),
        orphan_processes.len()
    );
    let identical = if differing.is_empty() {
        "identical"
    } else {
        "DIFFERING"
    };
    eprintln!(
        "jobs {}, lost {lost}, duplicates {duplicates} ({identical}), corrupt {corrupt}",
        jobs.len()
    );

    assert!(shared > 0, "no project ran on two workers: {uids:?}");
    assert!(unstable.is_empty(), "{unstable:?}");
    assert_eq!(lost, 0, "jobs without a result");
    assert!(not_succeeded.is_empty(), "{not_succeeded:#?}");
    assert!(differing.is_empty(), "{differing:#?}");
    assert!(
        unmarked.is_empty(),
        "duplicates not marked redelivered: {unmarked:?}"
    );
    assert_eq!(corrupt, 0, "{verified}");
    assert_eq!(orphan_mounts, 0, "{mountinfo}");
    assert!(orphan_cgroups.is_empty(), "{orphan_cgroups:?}");
    assert!(orphan_uppers.is_empty(), "{orphan_uppers:?}");
    assert!(orphan_processes.is_empty(), "{orphan_processes:?}");
}
