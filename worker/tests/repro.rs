//! Same inputs, same bytes, whatever the host. A reproducibility matrix in the spirit of
//! reprotest: every fixture job that succeeds is built with `corral replay --no-cache`
//! once as the reference (umask 022, TZ=UTC, LC_ALL=C, a fresh data dir, the directory
//! store, cold caches), then again with the host changed: the worker's umask (077, 002,
//! and 027 on the second worker); time zone, locale, uid range and snapshot thread count
//! together; a second worker (another data dir path, its base imported from the same
//! tarball); the registry store instead of the directory store; a warm store and a warm
//! action cache; all jobs at once, beside a build on the second worker. Every run must
//! give the reference's manifest digest and the same `inputs`. When one differs, the
//! failure names the job, the change and the layer, with a short diffoscope diff of the
//! two layers when diffoscope is installed.
//!
//! Also: `corral sandbox` under a hardened umask starts its command, which sees umask 0022;
//! the files of the directory store get their modes from corral, not from the umask.

use std::collections::BTreeMap;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};

use serde_json::Value;

mod common;
use common::{have, is_root, repo, require, rootfs, without_corral_settings};

const BIN: &str = env!("CARGO_BIN_EXE_corral");
const LAYERS: [&str; 3] = ["base", "source", "build"];

/// How one run's host differs from the reference.
#[derive(Clone, Default)]
struct Host {
    umask: &'static str,
    env: Vec<(&'static str, &'static str)>,
}

impl Host {
    fn reference() -> Host {
        Host {
            umask: "022",
            env: vec![("TZ", "UTC"), ("LC_ALL", "C"), ("LANG", "C")],
        }
    }

    fn umask(umask: &'static str) -> Host {
        Host {
            umask,
            ..Host::reference()
        }
    }

    /// `corral ARGS` started from a shell under this umask and environment.
    fn command(&self, args: &[&str]) -> Command {
        let mut cmd = Command::new("sh");
        cmd.arg("-c")
            .arg(r#"umask "$0" && exec "$@""#)
            .arg(self.umask)
            .arg(BIN)
            .args(args)
            .current_dir(repo())
            .env("RUST_LOG", "warn");
        without_corral_settings(&mut cmd);
        for (k, v) in &self.env {
            cmd.env(k, v);
        }
        cmd
    }

    fn run(&self, args: &[&str]) -> Output {
        self.command(args).output().unwrap()
    }
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

fn prerequisites() -> bool {
    require(is_root(), "root (namespaces, mounts, cgroups)")
        && require(
            rootfs().join("usr/bin/python3").exists(),
            "the test rootfs at $CORRAL_TEST_ROOTFS",
        )
        && require(
            repo().join("fixtures/bundles/python-app/wheels").is_dir(),
            "the python-app wheels (run scripts/fixtures)",
        )
        && require(
            have("docker-registry"),
            "docker-registry (apt-get install docker-registry)",
        )
        && require(have("curl"), "curl")
}

/// The fixture jobs whose expected result is `succeeded`, by name; `CORRAL_TEST_REPRO_JOBS`
/// (names, comma-separated) narrows them down while working on one.
fn succeeding_jobs() -> Vec<String> {
    let only = std::env::var("CORRAL_TEST_REPRO_JOBS").ok();
    let wanted = |job: &str| {
        only.as_deref()
            .is_none_or(|o| o.split(',').any(|j| j == job))
    };
    let mut jobs: Vec<String> = std::fs::read_dir(repo().join("fixtures/jobs"))
        .unwrap()
        .flatten()
        .filter_map(|e| {
            let name = e.file_name().to_string_lossy().into_owned();
            let job = name.strip_suffix(".expect.json")?.to_string();
            let expect: Value = serde_json::from_slice(&std::fs::read(e.path()).ok()?).ok()?;
            (expect["status"] == "succeeded" && wanted(&job)).then_some(job)
        })
        .collect();
    jobs.sort();
    jobs
}

/// Where a run's blobs can be read back.
#[derive(Clone)]
enum Blobs {
    Dir(PathBuf),
    Registry { addr: String, repo: String },
}

/// What a run produced, as a user sees it.
struct Built {
    manifest: String,
    layers: Vec<String>,
    inputs: Value,
    cached: bool,
    blobs: Blobs,
}

/// A data dir with the `python-3.11` base imported from `tarball` under `host`.
fn data_dir(parent: &Path, rel: &str, tarball: &Path, host: &Host) -> PathBuf {
    let data = parent.join(rel);
    let out = host.run(&[
        "base",
        "import",
        "python-3.11",
        tarball.to_str().unwrap(),
        "--data-dir",
        data.to_str().unwrap(),
    ]);
    assert!(out.status.success(), "base import: {}", text(&out.stderr));
    data
}

fn replay_args<'a>(job: &'a str, data: &'a Path, extra: &[&'a str]) -> Vec<String> {
    let mut args = vec![
        "replay".to_string(),
        format!("fixtures/jobs/{job}.json"),
        "--json".into(),
        "--data-dir".into(),
        data.to_str().unwrap().into(),
    ];
    args.extend(extra.iter().map(|s| s.to_string()));
    args
}

fn parse(job: &str, what: &str, out: &Output, blobs: Blobs) -> Built {
    let stderr = text(&out.stderr);
    let result: Value = serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
        panic!(
            "{job} ({what}): no JSON result ({e}): {}\n{stderr}",
            text(&out.stdout)
        )
    });
    assert_eq!(
        result["status"], "succeeded",
        "{job} ({what}) did not succeed: {result:#}\n{stderr}"
    );
    let artifact = &result["artifact"];
    Built {
        manifest: artifact["manifest_digest"].as_str().unwrap().to_string(),
        layers: artifact["layers"]
            .as_array()
            .unwrap()
            .iter()
            .map(|l| l["digest"].as_str().unwrap().to_string())
            .collect(),
        inputs: result["inputs"].clone(),
        cached: result["cached"].as_bool().unwrap_or(false),
        blobs,
    }
}

fn replay(job: &str, what: &str, host: &Host, data: &Path, extra: &[&str], blobs: Blobs) -> Built {
    let args = replay_args(job, data, extra);
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let out = host.run(&args);
    parse(job, what, &out, blobs)
}

/// The blob of `digest` as a local file (fetched from the registry into `scratch`).
fn blob_file(blobs: &Blobs, digest: &str, scratch: &Path) -> Option<PathBuf> {
    let hex = digest.trim_start_matches("sha256:");
    match blobs {
        Blobs::Dir(data) => Some(data.join("store/blobs/sha256").join(hex)),
        Blobs::Registry { addr, repo } => {
            let path = scratch.join(format!("registry-{hex}.tar.gz"));
            let ok = Command::new("curl")
                .args(["-sfL", "-o"])
                .arg(&path)
                .arg(format!("http://{addr}/v2/{repo}/blobs/{digest}"))
                .status()
                .is_ok_and(|s| s.success());
            ok.then_some(path)
        }
    }
}

/// Why `run` is not the reference: which layers differ, and a short diff of each.
fn differences(reference: &Built, run: &Built, scratch: &Path) -> Option<String> {
    if run.manifest == reference.manifest && run.inputs == reference.inputs {
        return None;
    }
    let mut report = format!(
        "manifest {} (reference {})",
        run.manifest, reference.manifest
    );
    if run.inputs != reference.inputs {
        report += &format!(
            "\n    inputs {} (reference {})",
            run.inputs, reference.inputs
        );
    }
    for (i, name) in LAYERS.iter().enumerate() {
        let (a, b) = (&reference.layers[i], &run.layers[i]);
        if a == b {
            continue;
        }
        report += &format!("\n    the {name} layer differs: {b} (reference {a})");
        let (Some(fa), Some(fb)) = (
            blob_file(&reference.blobs, a, scratch),
            blob_file(&run.blobs, b, scratch),
        ) else {
            report += "\n      (a blob could not be read back for a diff)";
            continue;
        };
        if !have("diffoscope") {
            report += &format!(
                "\n      install diffoscope (Debian: diffoscope-minimal) for a diff of {} and {}",
                fa.display(),
                fb.display()
            );
            continue;
        }
        let out = Command::new("diffoscope")
            .args([
                "--no-progress",
                "--text-color",
                "never",
                "--max-report-size",
                "20000",
            ])
            .arg(&fa)
            .arg(&fb)
            .stdin(Stdio::null())
            .output()
            .unwrap();
        let diff = text(&out.stdout);
        let lines: Vec<&str> = diff.lines().take(60).collect();
        report += &format!("\n      diffoscope:\n      {}", lines.join("\n      "));
    }
    Some(report)
}

/// A docker-registry started by `scripts/registry`, stopped (by pid) on drop.
struct Registry {
    _dir: tempfile::TempDir,
    addr: String,
    pid: u32,
}

impl Registry {
    fn start() -> Registry {
        let dir = tempfile::tempdir().unwrap();
        let out = Command::new(repo().join("scripts/registry"))
            .arg(dir.path())
            .output()
            .unwrap();
        let said = text(&out.stdout);
        let value = |key: &str| {
            said.lines()
                .find_map(|l| l.strip_prefix(key))
                .unwrap_or_else(|| panic!("scripts/registry said {said}{}", text(&out.stderr)))
                .to_string()
        };
        Registry {
            addr: value("CORRAL_TEST_REGISTRY="),
            pid: value("CORRAL_TEST_REGISTRY_PID=").parse().unwrap(),
            _dir: dir,
        }
    }
}

impl Drop for Registry {
    fn drop(&mut self) {
        let _ = Command::new("kill")
            .args(["-9", &self.pid.to_string()])
            .status();
    }
}

fn mode(path: &Path) -> u32 {
    std::fs::metadata(path).unwrap().permissions().mode() & 0o7777
}

#[test]
fn every_succeeding_fixture_job_builds_the_same_image_whatever_the_host() {
    if !prerequisites() {
        return;
    }
    let jobs = succeeding_jobs();
    assert!(
        !jobs.is_empty()
            && (std::env::var_os("CORRAL_TEST_REPRO_JOBS").is_some()
                || (jobs.len() >= 3 && jobs.iter().any(|j| j == "python-app"))),
        "succeeding fixture jobs: {jobs:?}"
    );
    let tmp = tempfile::Builder::new()
        .prefix("corral-repro-")
        .tempdir_in("/var/tmp")
        .unwrap();
    let tarball = common::rootfs_tarball(tmp.path());
    let reference_host = Host::reference();
    let a = data_dir(tmp.path(), "a/data", &tarball, &reference_host);
    // A second worker: another path, its base imported from the same tarball under the
    // umask a hardened unit gives it.
    let b = data_dir(
        tmp.path(),
        "second/worker/state",
        &tarball,
        &Host::umask("077"),
    );
    std::fs::remove_file(&tarball).unwrap();
    // Elsewhere: another time zone and locale, another uid range, more snapshot threads.
    let elsewhere_config = tmp.path().join("elsewhere.toml");
    std::fs::write(
        &elsewhere_config,
        "[sandbox]\nuid_start = 2000000\ngid_start = 2000000\nid_count = 65536\n\n\
         [snapshot]\nthreads = 4\n",
    )
    .unwrap();
    let elsewhere_config = elsewhere_config.to_str().unwrap();
    let elsewhere = Host {
        umask: "022",
        env: vec![
            ("TZ", "Asia/Tokyo"),
            ("LC_ALL", "C.UTF-8"),
            ("LANG", "C.UTF-8"),
        ],
    };
    let registry = Registry::start();
    let registry_repo = format!("repro-{}", std::process::id());
    let registry_url = format!("oci+http://{}/{registry_repo}", registry.addr);
    let in_registry = Blobs::Registry {
        addr: registry.addr.clone(),
        repo: registry_repo.clone(),
    };
    let (in_a, in_b) = (Blobs::Dir(a.clone()), Blobs::Dir(b.clone()));

    // (what changed, host, data dir, extra arguments, where its blobs are). One thing at a
    // time for the umask, the leak this guards against; the rest of the host together, as
    // reprotest varies it (a failure names them all: bisect by hand).
    let variations: Vec<(&str, Host, &Path, Vec<&str>, &Blobs)> = vec![
        (
            "worker umask 077",
            Host::umask("077"),
            &a,
            vec!["--no-cache"],
            &in_a,
        ),
        (
            "worker umask 002",
            Host::umask("002"),
            &a,
            vec!["--no-cache"],
            &in_a,
        ),
        (
            "TZ=Asia/Tokyo, LC_ALL=C.UTF-8, [sandbox] uid_start = 2000000, [snapshot] threads = 4",
            elsewhere.clone(),
            &a,
            vec!["--no-cache", "--config", elsewhere_config],
            &in_a,
        ),
        (
            "a second worker: another data dir, its base imported from the same tarball, umask 027",
            Host::umask("027"),
            &b,
            vec!["--no-cache"],
            &in_b,
        ),
        (
            "the registry store",
            reference_host.clone(),
            &a,
            vec!["--no-cache", "--store", &registry_url],
            &in_registry,
        ),
        // Warm: the action cache answers, with the same image and inputs.
        (
            "a warm action cache",
            reference_host.clone(),
            &a,
            vec![],
            &in_a,
        ),
    ];

    let mut references = BTreeMap::new();
    let mut failures = Vec::new();
    let mut check = |job: &str, what: &str, reference: &Built, run: &Built| {
        if let Some(diff) = differences(reference, run, tmp.path()) {
            failures.push(format!("{job}, {what}:\n    {diff}"));
        }
    };
    for job in &jobs {
        // Cold: a fresh action cache, and a store without the job's blobs.
        let reference = replay(
            job,
            "reference",
            &reference_host,
            &a,
            &["--no-cache"],
            in_a.clone(),
        );
        assert!(
            reference.inputs.is_object() && reference.inputs["umask"] == "0022",
            "{job}: the result names its inputs: {}",
            reference.inputs
        );
        for (what, host, data, extra, blobs) in &variations {
            let run = replay(job, what, host, data, extra, (*blobs).clone());
            if extra.is_empty() {
                assert!(run.cached, "{job}: the run with the cache on was not a hit");
            }
            check(job, what, &reference, &run);
        }
        references.insert(job.clone(), reference);
    }

    // Concurrency: every job at once in one worker's data dir (warm store, cold builds),
    // with the python-app building beside them in the second worker's too.
    let mut children = Vec::new();
    for job in &jobs {
        let args = replay_args(job, &a, &["--no-cache"]);
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        let child = reference_host
            .command(&args)
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        children.push((job.clone(), Blobs::Dir(a.clone()), child));
    }
    let beside = jobs.iter().find(|j| *j == "python-app").unwrap_or(&jobs[0]);
    let args = replay_args(beside, &b, &["--no-cache"]);
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let child = Host::umask("077")
        .command(&args)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    children.push((beside.clone(), Blobs::Dir(b.clone()), child));
    let what = format!("{} builds at once", children.len());
    for (job, blobs, child) in children {
        let out = child.wait_with_output().unwrap();
        let run = parse(&job, &what, &out, blobs);
        check(&job, &what, &references[&job], &run);
    }

    assert!(
        failures.is_empty(),
        "{} run(s) differ from their job's reference (umask 022, TZ=UTC, LC_ALL=C, first \
         data dir, directory store, cold caches):\n{}",
        failures.len(),
        failures.join("\n")
    );

    // Both workers' stores were made by corral, the second under umasks 077 and 027: the modes of
    // what others read are corral's.
    for data in [&a, &b] {
        let store = data.join("store");
        assert_eq!(
            mode(&store.join("index.json")),
            0o644,
            "{}",
            store.display()
        );
        assert_eq!(
            mode(&store.join("oci-layout")),
            0o644,
            "{}",
            store.display()
        );
        assert_eq!(
            mode(&store.join("blobs/sha256")),
            0o755,
            "{}",
            store.display()
        );
        for blob in std::fs::read_dir(store.join("blobs/sha256")).unwrap() {
            let blob = blob.unwrap().path();
            assert_eq!(mode(&blob), 0o444, "{}", blob.display());
        }
    }
}

#[test]
fn the_sandbox_starts_its_command_under_a_hardened_umask_with_umask_0022() {
    if !require(is_root(), "root (namespaces, mounts, cgroups)")
        || !require(
            rootfs().join("bin/sh").exists(),
            "the test rootfs at $CORRAL_TEST_ROOTFS",
        )
    {
        return;
    }
    for umask in ["077", "027", "022", "002"] {
        let out = Host::umask(umask).run(&[
            "sandbox",
            "--rootfs",
            rootfs().to_str().unwrap(),
            "--",
            "/bin/sh",
            "-c",
            "umask; stat -c '%a %n' / /tmp /dev /dev/null /dev/shm; touch /tmp/f; mkdir /tmp/d; stat -c '%a %n' /tmp/f /tmp/d",
        ]);
        assert_eq!(
            out.status.code(),
            Some(0),
            "worker umask {umask}: {}\n{}",
            text(&out.stdout),
            text(&out.stderr)
        );
        let stdout = text(&out.stdout);
        let lines: Vec<&str> = stdout.lines().collect();
        assert_eq!(
            lines.first(),
            Some(&"0022"),
            "worker umask {umask}: {stdout}"
        );
        assert!(
            stdout.contains("755 /\n")
                && stdout.contains("1777 /tmp\n")
                && stdout.contains("755 /dev\n")
                && stdout.contains("666 /dev/null\n")
                && stdout.contains("644 /tmp/f\n")
                && stdout.contains("755 /tmp/d"),
            "worker umask {umask}: {stdout}"
        );
    }
}
