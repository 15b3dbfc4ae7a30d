//! The sandbox against the real kernel, as root, on the real test rootfs: the abuse suite
//! (`fixtures/abuse/*.json`, one table-driven test), cancellation, a shim crash, typed setup
//! errors, and the `corral sandbox` command. The `corral-worker` binary under test is the
//! sandbox shim and zygote.

mod common;
use common::{
    Ran, drain, leaves_nothing, prerequisites, repo, rootfs, sandbox_config, spawn_and_wait,
};
use std::collections::BTreeMap;
use std::io::Read;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

use corral_sandbox::{
    DeathReason, Exit, IdentityMap, JobCgroup, JobDir, Layout, Network, Outcome, Sandbox,
    SandboxConfig, SandboxLimits, SandboxSpec, Zygote, discover_cgroups,
};
use serde::Deserialize;

/// Each test has its own cgroup parent, run dir and uid, so the tests' checks for
/// leftovers do not see each other's live jobs.
fn config(test: &str) -> SandboxConfig {
    sandbox_config(test)
}

/// [`config`] with shims forked from a zygote, as the worker runs them.
fn zygote_config(test: &str) -> SandboxConfig {
    static ZYGOTE: std::sync::OnceLock<std::sync::Arc<Zygote>> = std::sync::OnceLock::new();
    SandboxConfig {
        zygote: Some(
            ZYGOTE
                .get_or_init(|| {
                    std::sync::Arc::new(Zygote::new(Path::new(env!("CARGO_BIN_EXE_corral-worker"))))
                })
                .clone(),
        ),
        ..config(test)
    }
}

/// [`config`] with a zygote of its own (not shared with other tests), and that zygote.
fn own_zygote_config(test: &str) -> (std::sync::Arc<Zygote>, SandboxConfig) {
    let zygote = std::sync::Arc::new(Zygote::new(Path::new(env!("CARGO_BIN_EXE_corral-worker"))));
    let cfg = SandboxConfig {
        zygote: Some(zygote.clone()),
        ..config(test)
    };
    (zygote, cfg)
}

/// Runs `sh -c 'echo hi'` as `uid` in a new job dir `name` under `jobs`, checks that it
/// printed `hi` and exited 0, and removes the job dir. Returns the pid of its shim.
fn echo_hi(cfg: &SandboxConfig, jobs: &Path, name: &str, uid: u32) -> u32 {
    let job = JobDir::create(jobs, name, 16 << 20).unwrap();
    let mut running =
        Sandbox::spawn(&simple_spec(&job, uid, &["sh", "-c", "echo hi"]), cfg).unwrap();
    let shim = running.shim_pid();
    let out = drain(running.stdout.take());
    let outcome = running.wait().unwrap();
    assert_eq!(outcome.exit, Exit::Code(0), "{name}");
    assert_eq!(out.join().unwrap(), "hi\n", "{name}");
    job.remove().unwrap();
    shim
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct Case {
    name: String,
    #[allow(dead_code)]
    about: String,
    argv: Vec<String>,
    #[serde(default)]
    cwd: Option<PathBuf>,
    #[serde(default)]
    env: BTreeMap<String, String>,
    #[serde(default)]
    network: Option<Network>,
    #[serde(default)]
    limits: CaseLimits,
    expect: Expect,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct CaseLimits {
    memory: Option<String>,
    pids: Option<u64>,
    cpus: Option<f64>,
    cpu_seconds: Option<u64>,
    wall_secs: Option<u64>,
    tmp: Option<String>,
    disk: Option<String>,
    /// Seconds at the CPU quota that raise `cpu_saturated`.
    cpu_saturated_secs: Option<u64>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct Expect {
    reason: DeathReason,
    #[serde(default)]
    exit: Option<ExpectExit>,
    #[serde(default)]
    denied: BTreeMap<String, u64>,
    #[serde(default)]
    network_attempts: Option<u64>,
    #[serde(default)]
    stdout_contains: Vec<String>,
    #[serde(default)]
    stdout_lacks: Vec<String>,
    #[serde(default)]
    stderr_contains: Vec<String>,
    #[serde(default)]
    upper_owned_by_project: Vec<PathBuf>,
    /// Kinds of live event that must arrive while the job runs, before the probe's
    /// `done=<time>` line and within a second of its `cause=<time>` line.
    #[serde(default)]
    live: Vec<String>,
    /// Seconds after the cause a live event of a kind is due, when not at once (a window
    /// the cause must last): the one-second bound counts from then.
    #[serde(default)]
    live_after: BTreeMap<String, f64>,
    /// At most this many live events of a kind (the rate limit).
    #[serde(default)]
    live_at_most: BTreeMap<String, usize>,
    /// Fields the first live event of a kind carries, as in its JSON.
    #[serde(default)]
    live_detail: BTreeMap<String, BTreeMap<String, serde_json::Value>>,
    /// At least this many OOM kills and refused forks in the outcome.
    #[serde(default)]
    oom_kills: Option<u64>,
    #[serde(default)]
    pids_limit_hits: Option<u64>,
    /// What applies instead on a kernel without the 32-bit x86 ABI (no IA32 emulation, as
    /// user-mode Linux): there `int 0x80` is no i386 entry at all.
    #[serde(default)]
    without_ia32_emulation: Option<Box<Expect>>,
    /// What applies instead on cgroup v2, where `memory.oom.group=1` makes an OOM kill the
    /// whole build rather than one process of it.
    #[serde(default)]
    with_oom_group: Option<Box<Expect>>,
}

/// Whether jobs here run in cgroup v2 (with `memory.oom.group`).
fn oom_group() -> bool {
    let mountinfo = std::fs::read_to_string("/proc/self/mountinfo").unwrap();
    matches!(discover_cgroups(&mountinfo), Ok(Layout::V2 { .. }))
}

/// Whether this kernel runs 32-bit x86 code (`abi.vsyscall32` exists only then).
fn ia32_emulation() -> bool {
    Path::new("/proc/sys/abi/vsyscall32").exists()
}

#[derive(Debug, Deserialize)]
#[serde(untagged)]
enum ExpectExit {
    Exact(Exit),
    /// `"nonzero"`: any exit code but 0, or any signal.
    Word(String),
}

fn bytes(s: &str) -> u64 {
    s.parse::<corral_protocol::ByteSize>().unwrap().0
}

/// Through a zygote-forked shim, as in the worker.
fn run(spec: &SandboxSpec) -> Ran {
    spawn_and_wait(spec, &zygote_config("abuse"))
}

/// Everything that would count as an escape once a job is over.
fn assert_nothing_left(test: &str, uid: u32, name: &str) {
    for entry in std::fs::read_dir("/proc").unwrap().flatten() {
        let Ok(status) = std::fs::read_to_string(entry.path().join("status")) else {
            continue;
        };
        let owner = status
            .lines()
            .find(|l| l.starts_with("Uid:"))
            .and_then(|l| l.split_whitespace().nth(1))
            .and_then(|u| u.parse::<u32>().ok());
        assert_ne!(
            owner,
            Some(uid),
            "{name}: process {:?} of the job survived",
            entry.file_name()
        );
    }
    let mounts = std::fs::read_to_string("/proc/self/mountinfo").unwrap();
    assert!(
        !mounts.contains(&format!("/run/corral-test-{test}/")),
        "{name}: a sandbox mount leaked to the host"
    );
    // The per-test parent in each hierarchy: the unified one on v2, one per controller on v1.
    let parents: Vec<PathBuf> = match discover_cgroups(&mounts).unwrap() {
        Layout::V2 { root } => vec![root],
        Layout::V1 { mounts } => mounts.into_values().collect(),
    }
    .into_iter()
    .map(|root| root.join(format!("corral-test-{test}")))
    .collect();
    for parent in parents {
        let leftovers: Vec<_> = std::fs::read_dir(&parent)
            .map(|d| {
                d.flatten()
                    .filter(|e| e.file_type().map(|t| t.is_dir()).unwrap_or(false))
                    .map(|e| e.file_name())
                    .collect()
            })
            .unwrap_or_default();
        assert!(
            leftovers.is_empty(),
            "{name}: cgroups left behind in {}: {leftovers:?}",
            parent.display()
        );
    }
}

struct Canaries {
    _dir: tempfile::TempDir,
    config_file: PathBuf,
    other_upper: JobDir,
    other_file: PathBuf,
}

fn canaries(jobs: &Path) -> Canaries {
    let dir = tempfile::tempdir().unwrap();
    let config_dir = dir.path().join("etc-corral");
    std::fs::create_dir(&config_dir).unwrap();
    let config_file = config_dir.join("worker.toml");
    std::fs::write(&config_file, "amqp_password = \"CANARY-CONFIG\"\n").unwrap();
    let other_upper = JobDir::create(jobs, "other-project-job", 16 << 20).unwrap();
    let other_file = other_upper.upper().join("secret.txt");
    std::fs::write(&other_file, "CANARY-OTHER-PROJECT\n").unwrap();
    Canaries {
        _dir: dir,
        config_file,
        other_upper,
        other_file,
    }
}

#[test]
fn abuse_suite() {
    if !prerequisites() {
        return;
    }
    let _dirs = leaves_nothing("abuse");
    let data = tempfile::tempdir().unwrap();
    let jobs = tempfile::tempdir_in("/var/tmp").unwrap();
    let ids = IdentityMap::open(data.path(), 210_000..=210_999).unwrap();
    let identity = ids.identity("abuse-project").unwrap();
    assert_ne!(ids.identity("other-project").unwrap(), identity);
    let canary = canaries(jobs.path());
    // The broker port and a host abstract socket exist for the network probes to fail on.
    let _broker = std::net::TcpListener::bind("127.0.0.1:5672").ok();
    let _abstract = {
        use std::os::linux::net::SocketAddrExt;
        let addr =
            std::os::unix::net::SocketAddr::from_abstract_name(b"corral-test-host-socket").unwrap();
        std::os::unix::net::UnixListener::bind_addr(&addr).ok()
    };
    let only = std::env::var("CORRAL_ABUSE_CASE").ok();

    let mut files: Vec<PathBuf> = std::fs::read_dir(repo().join("fixtures/abuse"))
        .unwrap()
        .flatten()
        .map(|e| e.path())
        .filter(|p| p.extension().is_some_and(|e| e == "json"))
        .collect();
    files.sort();
    assert!(files.len() >= 25, "the abuse fixtures are missing");
    let mut failures = Vec::new();
    for file in &files {
        let case: Case = serde_json::from_slice(&std::fs::read(file).unwrap())
            .unwrap_or_else(|e| panic!("{}: {e}", file.display()));
        if only
            .as_ref()
            .is_some_and(|o| !case.name.contains(o.as_str()))
        {
            continue;
        }
        let l = &case.limits;
        let disk = l.disk.as_deref().map_or(64 << 20, bytes);
        let job = JobDir::create(jobs.path(), &case.name, disk).unwrap();
        let mut env = vec![
            ("PATH".to_owned(), "/usr/local/bin:/usr/bin:/bin".to_owned()),
            ("HOME".to_owned(), "/tmp".to_owned()),
            (
                "CANARY_CONFIG".to_owned(),
                canary.config_file.display().to_string(),
            ),
            (
                "CANARY_OTHER".to_owned(),
                canary.other_file.display().to_string(),
            ),
        ];
        for (k, v) in &case.env {
            env.retain(|(key, _)| key != k);
            env.push((k.clone(), v.clone()));
        }
        let spec = SandboxSpec {
            lower_dirs: vec![rootfs()],
            upper: job.upper(),
            work: job.work(),
            identity,
            argv: case.argv.clone(),
            env,
            cwd: case.cwd.clone().unwrap_or_else(|| PathBuf::from("/")),
            limits: SandboxLimits {
                memory_bytes: Some(l.memory.as_deref().map_or(512 << 20, bytes)),
                pids: Some(l.pids.unwrap_or(128)),
                cpu_quota: Some(l.cpus.unwrap_or(1.0)),
                wall: Duration::from_secs(l.wall_secs.unwrap_or(30)),
                cpu_seconds: l.cpu_seconds,
                open_files: 1024,
                tmp_bytes: l.tmp.as_deref().map_or(64 << 20, bytes),
                file_size_bytes: None,
                cpu_saturated_after: l
                    .cpu_saturated_secs
                    .map_or(corral_sandbox::CPU_SATURATED_AFTER, Duration::from_secs),
                disk_bytes_per_second: None,
                disk_device: None,
            },
            network: case.network.unwrap_or_default(),
            read_only_binds: vec![(
                repo().join("fixtures/abuse/probes"),
                PathBuf::from("/probes"),
            )],
            hostname: "corral".to_owned(),
            scratch: None,
        };
        let ran = run(&spec);
        assert_nothing_left("abuse", identity.host_uid, &case.name);
        let expect = match (
            &case.expect.without_ia32_emulation,
            &case.expect.with_oom_group,
        ) {
            (Some(instead), _) if !ia32_emulation() => instead,
            (_, Some(instead)) if oom_group() => instead,
            _ => &case.expect,
        };
        let problems = check(expect, &ran, &job.upper(), identity.host_uid);
        eprintln!(
            "{:<32} {:<13} {:?} denied={:?} net={} {}",
            case.name,
            serde_json::to_string(&ran.outcome.reason).unwrap(),
            ran.outcome.exit,
            ran.outcome.denied_syscalls,
            ran.outcome.network_attempts,
            if problems.is_empty() { "ok" } else { "FAILED" }
        );
        if !problems.is_empty() {
            failures.push(format!(
                "{}: {}\n  outcome: {}\n  stdout: {:?}\n  stderr: {:?}",
                case.name,
                problems.join("; "),
                serde_json::to_string(&ran.outcome).unwrap(),
                ran.stdout,
                ran.stderr
            ));
        }
        job.remove().unwrap();
    }
    canary.other_upper.remove().unwrap();
    assert!(
        failures.is_empty(),
        "abuse cases failed:\n{}",
        failures.join("\n")
    );
}

fn check(expect: &Expect, ran: &Ran, upper: &Path, uid: u32) -> Vec<String> {
    let mut problems = Vec::new();
    let o = &ran.outcome;
    if o.reason != expect.reason {
        problems.push(format!(
            "reason {:?}, expected {:?}",
            o.reason, expect.reason
        ));
    }
    match &expect.exit {
        Some(ExpectExit::Exact(e)) if *e != o.exit => {
            problems.push(format!("exit {:?}, expected {e:?}", o.exit))
        }
        Some(ExpectExit::Word(w)) if w == "nonzero" && o.exit == Exit::Code(0) => {
            problems.push("exit 0, expected a failure".to_owned())
        }
        _ => {}
    }
    for (name, min) in &expect.denied {
        let got = o.denied_syscalls.get(name).copied().unwrap_or(0);
        if got < *min {
            problems.push(format!(
                "{name} denied {got} times, expected at least {min}"
            ));
        }
    }
    if let Some(n) = expect.network_attempts
        && o.network_attempts != n
    {
        problems.push(format!(
            "{} network attempts, expected {n}",
            o.network_attempts
        ));
    }
    for s in &expect.stdout_contains {
        if !ran.stdout.contains(s.as_str()) {
            problems.push(format!("stdout lacks {s:?}"));
        }
    }
    for s in &expect.stdout_lacks {
        if ran.stdout.contains(s.as_str()) {
            problems.push(format!("stdout contains {s:?}"));
        }
    }
    for s in &expect.stderr_contains {
        if !ran.stderr.contains(s.as_str()) {
            problems.push(format!("stderr lacks {s:?}"));
        }
    }
    if let Some(n) = expect.oom_kills
        && o.oom_kills < n
    {
        problems.push(format!("{} OOM kills, expected at least {n}", o.oom_kills));
    }
    if let Some(n) = expect.pids_limit_hits
        && o.pids_limit_hits < n
    {
        problems.push(format!(
            "{} refused forks, expected at least {n}",
            o.pids_limit_hits
        ));
    }
    problems.extend(check_live(expect, ran));
    for rel in &expect.upper_owned_by_project {
        match std::fs::symlink_metadata(upper.join(rel)) {
            Ok(m) if m.uid() == uid && m.gid() == uid => {}
            Ok(m) => problems.push(format!(
                "{} owned by {}:{}, expected {uid}",
                rel.display(),
                m.uid(),
                m.gid()
            )),
            Err(e) => problems.push(format!("{} not in the upper dir: {e}", rel.display())),
        }
    }
    problems
}

/// The time a probe printed as `<what>=<unix seconds>`.
fn stamped(stdout: &str, what: &str) -> Option<SystemTime> {
    let secs: f64 = stdout
        .lines()
        .find_map(|l| l.strip_prefix(what)?.strip_prefix('='))?
        .parse()
        .ok()?;
    Some(SystemTime::UNIX_EPOCH + Duration::from_secs_f64(secs))
}

/// Seconds from `a` to `b` (negative when `b` is earlier).
fn secs_between(a: SystemTime, b: SystemTime) -> f64 {
    match b.duration_since(a) {
        Ok(d) => d.as_secs_f64(),
        Err(e) => -e.duration().as_secs_f64(),
    }
}

fn check_live(expect: &Expect, ran: &Ran) -> Vec<String> {
    let mut problems = Vec::new();
    if !expect.live.is_empty() && ran.outcome.events_dropped > 0 {
        problems.push(format!(
            "{} live events dropped",
            ran.outcome.events_dropped
        ));
    }
    for (kind, most) in &expect.live_at_most {
        let n = ran
            .events
            .iter()
            .filter(|(e, _)| e.kind.name() == kind)
            .count();
        if n > *most {
            problems.push(format!("{n} {kind} events, expected at most {most}"));
        }
    }
    if expect.live.is_empty() {
        return problems;
    }
    let (Some(cause), Some(done)) = (stamped(&ran.stdout, "cause"), stamped(&ran.stdout, "done"))
    else {
        problems.push("the probe printed no cause= and done= times".to_owned());
        return problems;
    };
    for kind in &expect.live {
        let Some((event, received)) = ran.events.iter().find(|(e, _)| e.kind.name() == kind) else {
            problems.push(format!("no live {kind} event"));
            continue;
        };
        let json = serde_json::to_value(event).unwrap();
        for (field, want) in expect.live_detail.get(kind).into_iter().flatten() {
            if json.get(field) != Some(want) {
                problems.push(format!(
                    "live {kind} has {field} {:?}, expected {want}",
                    json.get(field)
                ));
            }
        }
        let due = expect.live_after.get(kind).copied().unwrap_or(0.0);
        let seen = secs_between(cause, event.at) - due;
        let heard = secs_between(cause, *received) - due;
        eprintln!(
            "  live {kind}: seen {seen:.3} s after the cause (+{due} s), received after {heard:.3} s"
        );
        // A little slack before the cause: the probe stamps just before acting.
        if !(-0.05..=1.0).contains(&seen) || heard > 1.0 {
            problems.push(format!(
                "live {kind} seen {seen:.3} s and received {heard:.3} s after its cause, expected within 1 s"
            ));
        }
        if *received >= done {
            problems.push(format!(
                "live {kind} arrived {:.3} s after the job's end, expected while it ran",
                secs_between(done, *received)
            ));
        }
    }
    problems
}

fn simple_spec(job: &JobDir, uid: u32, argv: &[&str]) -> SandboxSpec {
    SandboxSpec {
        lower_dirs: vec![rootfs()],
        upper: job.upper(),
        work: job.work(),
        identity: corral_sandbox::Identity {
            host_uid: uid,
            host_gid: uid,
        },
        argv: argv.iter().map(|s| s.to_string()).collect(),
        env: vec![("PATH".to_owned(), "/usr/bin:/bin".to_owned())],
        cwd: PathBuf::from("/"),
        limits: SandboxLimits {
            wall: Duration::from_secs(60),
            ..SandboxLimits::default()
        },
        network: Network::None,
        read_only_binds: vec![],
        hostname: "corral".to_owned(),
        scratch: None,
    }
}

/// Starts `argv` with `config` and waits until it printed `ready\n`.
fn start_ready(
    config: &SandboxConfig,
    uid: u32,
    job: &JobDir,
    argv: &[&str],
) -> (corral_sandbox::Running, std::io::PipeReader) {
    let mut running = Sandbox::spawn(&simple_spec(job, uid, argv), config).unwrap();
    let mut stdout = running.stdout.take().unwrap();
    let mut first = [0u8; 6];
    stdout.read_exact(&mut first).unwrap();
    assert_eq!(&first, b"ready\n");
    (running, stdout)
}

/// The disk bandwidth limit, on whichever cgroup version this host has: the kernel's files
/// hold it for the job filesystem's loop device, and a job writing with direct I/O moves
/// no faster than it (a lower bound on its time, which load can only lengthen), with all
/// its bytes accounted.
#[test]
fn disk_bandwidth_is_enforced_on_the_job_filesystems_device() {
    if !prerequisites() {
        return;
    }
    let _dirs = leaves_nothing("disk-bw");
    let jobs = tempfile::tempdir_in("/var/tmp").unwrap();
    let job = JobDir::create(jobs.path(), "disk-bw", 64 << 20).unwrap();
    let device = corral_sandbox::block_device_of(&job.upper(), Path::new("/sys/dev/block"))
        .expect("the job filesystem is on a block device");
    let loop_name = std::fs::read_link(format!("/sys/dev/block/{}:{}", device.0, device.1))
        .unwrap()
        .file_name()
        .unwrap()
        .to_string_lossy()
        .into_owned();
    assert!(loop_name.starts_with("loop"), "{loop_name}");
    let bps: u64 = 4 << 20;
    let limits = SandboxLimits {
        disk_bytes_per_second: Some(bps),
        disk_device: Some(device),
        ..SandboxLimits::default()
    };

    // The files, on a cgroup of the job's kind.
    let mountinfo = std::fs::read_to_string("/proc/self/mountinfo").unwrap();
    let layout = discover_cgroups(&mountinfo).unwrap();
    let cg = JobCgroup::create(&layout, "corral-test-disk-bw", "files").unwrap();
    cg.version().apply(&limits).unwrap();
    let (major, minor) = device;
    match &cg {
        JobCgroup::V2(v2) => {
            let max = std::fs::read_to_string(v2.dir.join("io.max")).unwrap();
            assert!(
                max.lines()
                    .any(|l| l
                        == format!("{major}:{minor} rbps={bps} wbps={bps} riops=max wiops=max")),
                "io.max: {max:?}"
            );
        }
        JobCgroup::V1(v1) => {
            let blkio = v1.blkio.as_ref().expect("blkio mounted");
            for file in [
                "blkio.throttle.read_bps_device",
                "blkio.throttle.write_bps_device",
            ] {
                let text = std::fs::read_to_string(blkio.join(file)).unwrap();
                assert_eq!(text.trim(), format!("{major}:{minor} {bps}"), "{file}");
            }
        }
    }
    cg.destroy().unwrap();

    // A job writing 12 MiB with direct I/O at 4 MiB/s.
    let written: u64 = 12 << 20;
    let mut spec = simple_spec(
        &job,
        211_020,
        &[
            "dd",
            "if=/dev/zero",
            "of=f",
            "bs=1M",
            "count=12",
            "oflag=direct",
        ],
    );
    spec.limits.disk_bytes_per_second = Some(bps);
    spec.cwd = PathBuf::from("/work");
    let ran = spawn_and_wait(&spec, &config("disk-bw"));
    assert_eq!(ran.outcome.reason, DeathReason::Completed, "{}", ran.stderr);
    assert!(ran.stderr.contains("12582912 bytes"), "{}", ran.stderr);
    let usage = &ran.outcome.usage;
    assert!(usage.io_write >= written, "{usage:?}");
    // The first 4 MiB may pass at once (the kernel's budget for a new group); the rest
    // waits for its share.
    let floor = Duration::from_secs_f64((written - bps) as f64 / bps as f64 * 0.9);
    assert!(
        usage.wall >= floor,
        "12 MiB at 4 MiB/s took {:?}, under {floor:?}: not throttled",
        usage.wall
    );
    assert_nothing_left("disk-bw", 211_020, "disk bandwidth");
    job.remove().unwrap();
}

/// `Running::wait_outcome_live` reads everything on the waiting thread: more output than a
/// pipe holds, from both pipes, a live event as it comes, and the report, in one call that
/// returns once the pipes are at their end.
#[test]
fn the_waiting_thread_reads_the_output_the_events_and_the_report() {
    if !prerequisites() {
        return;
    }
    #[derive(Default)]
    struct Heard {
        out: Vec<u8>,
        err: Vec<u8>,
        events: Vec<corral_sandbox::LiveEventKind>,
    }
    impl corral_sandbox::Live for Heard {
        fn output(&mut self, pipe: corral_sandbox::OutputPipe, bytes: &[u8]) {
            match pipe {
                corral_sandbox::OutputPipe::Stdout => self.out.extend_from_slice(bytes),
                corral_sandbox::OutputPipe::Stderr => self.err.extend_from_slice(bytes),
            }
        }
        fn event(&mut self, event: corral_sandbox::LiveEvent) {
            self.events.push(event.kind);
        }
    }
    let _dirs = leaves_nothing("live-wait");
    let jobs = tempfile::tempdir_in("/var/tmp").unwrap();
    let job = JobDir::create(jobs.path(), "live-wait", 16 << 20).unwrap();
    let script = "import socket, sys\n\
                  sys.stdout.write('y' * (1 << 20)); sys.stdout.flush()\n\
                  try: socket.socket()\n\
                  except OSError as e: print('refused', e.errno, file=sys.stderr)\n";
    let running = Sandbox::spawn(
        &simple_spec(&job, 211_050, &["python3", "-c", script]),
        &zygote_config("live-wait"),
    )
    .unwrap();
    let mut heard = Heard::default();
    let (outcome, teardown) = running.wait_outcome_live(&mut heard);
    teardown.wait();
    let outcome = outcome.unwrap();
    assert_eq!(
        outcome.exit,
        Exit::Code(0),
        "{}",
        String::from_utf8_lossy(&heard.err)
    );
    assert_eq!(heard.out.len(), 1 << 20);
    assert!(heard.out.iter().all(|&b| b == b'y'));
    assert_eq!(String::from_utf8_lossy(&heard.err), "refused 13\n");
    assert!(
        heard
            .events
            .iter()
            .any(|e| matches!(e, corral_sandbox::LiveEventKind::NetworkAttempt { .. })),
        "{:?}",
        heard.events
    );
    assert_eq!(outcome.events_dropped, 0);
    assert_nothing_left("live-wait", 211_050, "live-wait");
    job.remove().unwrap();
}

#[test]
fn cancel_sends_term_then_kills_everything() {
    if !prerequisites() {
        return;
    }
    let _dirs = leaves_nothing("cancel");
    let jobs = tempfile::tempdir_in("/var/tmp").unwrap();
    let job = JobDir::create(jobs.path(), "cancel", 16 << 20).unwrap();
    // The shim exec'd per job.
    let (running, mut stdout) = start_ready(
        &config("cancel"),
        211_001,
        &job,
        &[
            "sh",
            "-c",
            "trap 'echo got-term; exit 0' TERM; sleep 3600 & echo ready; wait",
        ],
    );
    running.cancel_handle().cancel(Duration::from_secs(5));
    let outcome = running.wait().unwrap();
    let mut rest = String::new();
    stdout.read_to_string(&mut rest).unwrap();
    assert_eq!(outcome.reason, DeathReason::Cancelled);
    assert!(
        rest.contains("got-term"),
        "TERM reached the job first: {rest:?}"
    );
    assert_nothing_left("cancel", 211_001, "cancel");
    job.remove().unwrap();
}

#[test]
fn cancel_of_a_term_ignoring_job_kills_after_the_grace() {
    if !prerequisites() {
        return;
    }
    let _dirs = leaves_nothing("stubborn");
    let jobs = tempfile::tempdir_in("/var/tmp").unwrap();
    let job = JobDir::create(jobs.path(), "stubborn", 16 << 20).unwrap();
    let (running, _stdout) = start_ready(
        &zygote_config("stubborn"),
        211_002,
        &job,
        &[
            "sh",
            "-c",
            "trap '' TERM; echo ready; while :; do sleep 1; done",
        ],
    );
    running.cancel_handle().cancel(Duration::from_millis(300));
    let outcome = running.wait().unwrap();
    assert_eq!(outcome.reason, DeathReason::Cancelled);
    assert_eq!(outcome.exit, Exit::Signal(9));
    assert_nothing_left("stubborn", 211_002, "stubborn");
    job.remove().unwrap();
}

#[test]
fn shim_crash_leaves_no_mount_process_or_cgroup() {
    if !prerequisites() {
        return;
    }
    let _dirs = leaves_nothing("crash");
    let jobs = tempfile::tempdir_in("/var/tmp").unwrap();
    let job = JobDir::create(jobs.path(), "crash", 16 << 20).unwrap();
    // A shim forked by the zygote, as in the worker.
    let (running, _stdout) = start_ready(
        &zygote_config("crash"),
        211_003,
        &job,
        &["sh", "-c", "echo ready; sleep 3600"],
    );
    let shim = running.shim_pid().to_string();
    assert!(
        std::process::Command::new("kill")
            .args(["-KILL", &shim])
            .status()
            .unwrap()
            .success()
    );
    let err = running.wait().expect_err("a killed shim cannot report");
    assert!(matches!(err, corral_sandbox::Error::ShimDied), "{err}");
    assert_nothing_left("crash", 211_003, "crash");
    // The upper dir's filesystem is free again: the worker can unmount it.
    job.remove().unwrap();
}

/// A sandbox that cannot be built says which step failed and why, as a typed value that
/// crossed every link (init → shim → worker), through an exec'd shim and a forked one.
#[test]
fn a_setup_failure_names_its_step_and_errno() {
    if !prerequisites() {
        return;
    }
    let _dirs = leaves_nothing("setup");
    let jobs = tempfile::tempdir_in("/var/tmp").unwrap();
    for (how, config) in [
        ("exec'd shim", config("setup")),
        ("forked shim", zygote_config("setup")),
    ] {
        let job = JobDir::create(jobs.path(), "setup", 16 << 20).unwrap();
        // A file as the working directory: the root builds, then chdir fails in init.
        let spec = SandboxSpec {
            cwd: PathBuf::from("/etc/passwd"),
            ..simple_spec(&job, 211_005, &["true"])
        };
        let err = Sandbox::spawn(&spec, &config)
            .unwrap()
            .wait()
            .expect_err("a job whose workdir is a file cannot start");
        let corral_sandbox::Error::Setup(setup) = &err else {
            panic!("{how}: not a setup error: {err}");
        };
        assert_eq!(
            setup.step,
            corral_sandbox::SetupStep::Workdir,
            "{how}: {err}"
        );
        assert_eq!(setup.errno, Some(20), "{how}: ENOTDIR expected: {err}");
        assert!(
            err.to_string()
                .contains("chdir: /etc/passwd: Not a directory"),
            "{how}: {err}"
        );
        assert_nothing_left("setup", 211_005, "setup");
        job.remove().unwrap();
    }
}

/// A shim refuses a request framed by another build of the handshake (an upgrade under a
/// running worker) and says so in a report of its own version, instead of misreading it.
#[test]
fn a_shim_refuses_a_frame_of_another_handshake_version() {
    use std::io::Write;
    use std::os::unix::net::UnixStream;
    let (mut ours, theirs) = UnixStream::pair().unwrap();
    let mut shim = std::process::Command::new(env!("CARGO_BIN_EXE_corral-worker"))
        .arg(corral_sandbox::SHIM_ARG)
        .env_clear()
        .stdin(std::os::fd::OwnedFd::from(theirs))
        .stdout(std::process::Stdio::null())
        .spawn()
        .unwrap();
    // length (of what follows) | version | kind (R: the request) | body
    let body = b"{}";
    let newer = corral_sandbox::HANDSHAKE_VERSION + 1;
    let mut frame = ((2 + body.len()) as u32).to_le_bytes().to_vec();
    frame.extend([newer, b'R']);
    frame.extend(body);
    ours.write_all(&frame).unwrap();
    let mut reply = Vec::new();
    ours.read_to_end(&mut reply).unwrap();
    assert!(shim.wait().unwrap().success());
    assert!(reply.len() > 6, "no report: {reply:?}");
    let len = u32::from_le_bytes(reply[..4].try_into().unwrap()) as usize;
    assert_eq!(len + 4, reply.len(), "one frame, whole");
    assert_eq!(reply[4], corral_sandbox::HANDSHAKE_VERSION);
    assert_eq!(reply[5], b'O', "a report");
    let report: serde_json::Value = serde_json::from_slice(&reply[6..]).unwrap();
    assert_eq!(report["error"]["step"], "request", "{report}");
    let detail = report["error"]["detail"].as_str().unwrap();
    assert!(
        detail.contains(&format!("version {newer}")),
        "the report names the version it refused: {detail}"
    );
}

/// A zygote that died (killed between jobs) is replaced: the next job starts (in a shim
/// forked ahead, or forked by a new zygote) and the zygote is running again after it. The
/// shims it forked are not its own children's problem: each reports over its own socket.
#[test]
fn a_dead_zygote_is_replaced() {
    if !prerequisites() {
        return;
    }
    let _dirs = leaves_nothing("zygote");
    let jobs = tempfile::tempdir_in("/var/tmp").unwrap();
    let (zygote, cfg) = own_zygote_config("zygote");
    let mut killed = Vec::new();
    for round in 0..2 {
        echo_hi(&cfg, jobs.path(), &format!("zygote-{round}"), 211_004);
        let pid = eventually(|| zygote.pid().filter(|p| !killed.contains(p)))
            .expect("a live zygote after a job");
        kill(pid);
        killed.push(pid);
    }
    assert_nothing_left("zygote", 211_004, "zygote-1");
}

/// Polls `f` every 50 ms for up to 10 s; its first `Some`.
fn eventually<T>(mut f: impl FnMut() -> Option<T>) -> Option<T> {
    (0..200).find_map(|_| {
        let found = f();
        if found.is_none() {
            std::thread::sleep(Duration::from_millis(50));
        }
        found
    })
}

fn kill(pid: u32) {
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(pid as i32),
        nix::sys::signal::Signal::SIGKILL,
    )
    .unwrap();
}

fn gone(pid: u32) -> bool {
    eventually(|| (!Path::new(&format!("/proc/{pid}")).exists()).then_some(())).is_some()
}

/// The children of `pid` (none once it is gone).
fn children(pid: u32) -> Vec<u32> {
    std::fs::read_to_string(format!("/proc/{pid}/task/{pid}/children"))
        .unwrap_or_default()
        .split_whitespace()
        .filter_map(|p| p.parse().ok())
        .collect()
}

/// A job whose spec is larger than a seqpacket socket takes by default (about 208 KiB)
/// still reaches its pid 1: through a shim forked from the zygote, an exec'd shim, and
/// `corral sandbox` supervising in its own process.
#[test]
fn a_job_larger_than_a_socket_buffer_reaches_its_pid_1() {
    if !prerequisites() {
        return;
    }
    let _dirs = leaves_nothing("big-job");
    let jobs = tempfile::tempdir_in("/var/tmp").unwrap();
    let uid = 211_021;
    // Each value under the kernel's 128 KiB limit on one exec string.
    let value = "x".repeat(100 << 10);
    let script = "echo ${#BIG0} ${#BIG1} ${#BIG2} ${#BIG3}";
    let expected = "102400 102400 102400 102400\n";
    for (name, cfg) in [
        ("zygote", zygote_config("big-job")),
        ("exec", config("big-job")),
    ] {
        let job = JobDir::create(jobs.path(), name, 16 << 20).unwrap();
        let mut spec = simple_spec(&job, uid, &["sh", "-c", script]);
        spec.env
            .extend((0..4).map(|i| (format!("BIG{i}"), value.clone())));
        let ran = spawn_and_wait(&spec, &cfg);
        assert_eq!(
            ran.outcome.exit,
            Exit::Code(0),
            "{name}: {:?} {}",
            ran.outcome,
            ran.stderr
        );
        assert_eq!(ran.stdout, expected, "{name}");
        job.remove().unwrap();
    }
    assert_nothing_left("big-job", uid, "exec");

    let mut cli = std::process::Command::new(env!("CARGO_BIN_EXE_corral"));
    cli.args(["sandbox", "--rootfs"]).arg(rootfs());
    for i in 0..4 {
        cli.arg("--env").arg(format!("BIG{i}={value}"));
    }
    let out = cli.args(["--", "sh", "-c", script]).output().unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        stdout.starts_with(expected),
        "corral sandbox: {stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Once jobs run, the zygote keeps a shim forked ahead and the next job starts in it; one
/// killed while it waits is passed over (the job forks its own); those kept ahead go after
/// a few seconds without a job, and with the handle.
#[test]
fn the_next_job_starts_in_a_shim_forked_ahead() {
    if !prerequisites() {
        return;
    }
    let _dirs = leaves_nothing("ready-shim");
    let jobs = tempfile::tempdir_in("/var/tmp").unwrap();
    let (zygote, cfg) = own_zygote_config("ready-shim");
    let uid = 211_008;
    echo_hi(&cfg, jobs.path(), "ready-0", uid);
    // Forked a moment after the job took its own (`Zygote::REFILL_AFTER`); `settle` waits
    // for it.
    zygote.settle(Duration::from_secs(10));
    let ready = *zygote
        .ready_pids()
        .first()
        .expect("a shim is forked ahead once jobs run");
    // It cloned the job's pid 1 before any job came, into namespaces of its own but the
    // mount namespace, which it makes once its job comes (with the job's dir mounted).
    let init = eventually(|| children(ready).first().copied())
        .expect("a shim kept ahead clones its pid 1 ahead");
    let ns = |pid: &str, ns: &str| std::fs::read_link(format!("/proc/{pid}/ns/{ns}")).unwrap();
    for kind in ["pid", "uts", "ipc", "net"] {
        assert_ne!(ns(&init.to_string(), kind), ns("self", kind), "{kind}");
    }
    assert_eq!(ns(&init.to_string(), "mnt"), ns("self", "mnt"));
    let shim = echo_hi(&cfg, jobs.path(), "ready-1", uid);
    assert_eq!(
        shim, ready,
        "the job did not start in the shim forked ahead"
    );
    assert!(gone(init), "the job's pid 1 outlived its job");

    let waiting = eventually(|| zygote.ready_pids().first().copied().filter(|&p| p != ready))
        .expect("the next shim is forked ahead");
    let waiting_init = eventually(|| children(waiting).first().copied())
        .expect("the next shim clones its pid 1 ahead");
    kill(waiting);
    assert!(gone(waiting), "the killed shim is still there");
    assert!(
        gone(waiting_init),
        "the pid 1 of a killed shim kept ahead outlived it"
    );
    let shim = echo_hi(&cfg, jobs.path(), "ready-2", uid);
    assert_ne!(shim, waiting, "a dead shim was handed a job");

    // Idle: let go after `READY_IDLE`.
    let idle = eventually(|| zygote.ready_pids().first().copied())
        .expect("a shim is forked ahead after the job");
    let idle_init = eventually(|| children(idle).first().copied())
        .expect("a shim kept ahead clones its pid 1 ahead");
    std::thread::sleep(Zygote::READY_IDLE);
    assert!(gone(idle), "a shim forked ahead outlived the idle time");
    assert!(gone(idle_init), "the pid 1 of a shim let go outlived it");
    assert!(zygote.ready_pids().is_empty());

    // Busy again, then the handle goes: so do the shims kept ahead.
    echo_hi(&cfg, jobs.path(), "ready-3", uid);
    let last = eventually(|| zygote.ready_pids().first().copied())
        .expect("shims are forked ahead again once a job comes");
    drop(cfg);
    drop(zygote);
    assert!(gone(last), "a shim forked ahead outlived its zygote handle");
    assert_nothing_left("ready-shim", uid, "ready-3");
}

/// Jobs started through the zygote, several at once (more than it makes ahead, so some
/// enter a namespace made in advance and one clones its own): each gets a network
/// namespace of its own, not the host's and not another job's, holding only a working
/// loopback.
#[test]
fn each_job_gets_a_fresh_network_namespace_of_its_own() {
    if !prerequisites() {
        return;
    }
    let _dirs = leaves_nothing("netns");
    let jobs = tempfile::tempdir_in("/var/tmp").unwrap();
    let (_zygote, cfg) = own_zygote_config("netns");
    let probe = "import os, socket, time\n\
        s = socket.socket(); s.bind(('127.0.0.1', 0)); s.listen()\n\
        c = socket.create_connection(s.getsockname()); a, _ = s.accept()\n\
        c.sendall(b'ping'); echo = a.recv(4).decode()\n\
        ifaces = sorted(l.split(':')[0].strip() for l in open('/proc/net/dev').readlines()[2:])\n\
        print(os.readlink('/proc/self/ns/net'), ','.join(ifaces), echo)\n\
        time.sleep(0.5)\n";
    let host = std::fs::read_link("/proc/self/ns/net").unwrap();
    // The second round gets namespaces the zygote made after the first. Compared within a
    // round only, among jobs alive at once: the kernel reuses a gone namespace's inode
    // number.
    for round in 0..2 {
        let mut seen = std::collections::BTreeSet::new();
        let started: Vec<_> = (0..3)
            .map(|i| {
                let job =
                    JobDir::create(jobs.path(), &format!("netns-{round}-{i}"), 16 << 20).unwrap();
                let mut spec = simple_spec(&job, 211_006, &["python3", "-c", probe]);
                spec.network = Network::Loopback;
                let mut running = Sandbox::spawn(&spec, &cfg).unwrap();
                let out = drain(running.stdout.take());
                (job, running, out)
            })
            .collect();
        for (job, running, out) in started {
            let outcome = running.wait().unwrap();
            let out = out.join().unwrap();
            assert_eq!(outcome.exit, Exit::Code(0), "{out}");
            let fields: Vec<&str> = out.split_whitespace().collect();
            let [netns, ifaces, echo] = fields[..] else {
                panic!("unexpected output: {out:?}");
            };
            assert_ne!(
                Path::new(netns),
                host,
                "a job ran in the host's network namespace"
            );
            assert!(seen.insert(netns.to_owned()), "two jobs shared {netns}");
            assert_eq!(ifaces, "lo", "only loopback exists in a job's namespace");
            assert_eq!(echo, "ping", "the job's loopback is up");
            job.remove().unwrap();
        }
    }
    assert_nothing_left("netns", 211_006, "netns-1-2");
}

/// The zygote outlives the thread that started it (the worker starts it from whichever
/// thread runs its first job, often a blocking-pool thread that ends when idle) and keeps
/// serving jobs from other threads.
#[test]
fn the_zygote_outlives_the_thread_that_started_it() {
    if !prerequisites() {
        return;
    }
    let _dirs = leaves_nothing("zygote-thread");
    let jobs = tempfile::tempdir_in("/var/tmp").unwrap();
    let (zygote, cfg) = own_zygote_config("zygote-thread");
    std::thread::scope(|s| {
        s.spawn(|| echo_hi(&cfg, jobs.path(), "from-a-thread", 211_007))
            .join()
            .unwrap()
    });
    let first = zygote.pid().expect("the zygote runs after a job");
    // Had it been killed along with its starting thread, it would be gone (or a zombie) by now.
    std::thread::sleep(Duration::from_millis(300));
    let state = std::fs::read_to_string(format!("/proc/{first}/stat")).unwrap();
    let state = state
        .rsplit(')')
        .next()
        .unwrap()
        .split_whitespace()
        .next()
        .unwrap();
    assert_ne!(
        state, "Z",
        "the zygote died with the thread that started it"
    );
    echo_hi(&cfg, jobs.path(), "from-main", 211_007);
    assert_eq!(
        zygote.pid(),
        Some(first),
        "the same zygote served the next job"
    );
    assert_nothing_left("zygote-thread", 211_007, "from-main");
    // Its worker's end of the socket closing (the worker exiting or killed) is what ends
    // it now; dropping the handle closes that end and reaps it.
    drop(cfg);
    std::thread::spawn(move || drop(zygote));
    let gone = (0..100).any(|_| {
        std::thread::sleep(Duration::from_millis(100));
        !Path::new(&format!("/proc/{first}")).exists()
    });
    assert!(gone, "the zygote outlived its worker's end of the socket");
}

#[test]
fn debug_command_prints_the_outcome_as_json() {
    if !prerequisites() {
        return;
    }
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_corral"))
        .args(["sandbox", "--rootfs"])
        .arg(rootfs())
        .args([
            "--memory",
            "128MiB",
            "--pids",
            "16",
            "--wall",
            "20",
            "--network",
            "none",
        ])
        .args([
            "--",
            "sh",
            "-c",
            "echo hello; grep Cpus_allowed_list /proc/self/status; exit 4",
        ])
        .output()
        .unwrap();
    let stdout = String::from_utf8(out.stdout).unwrap();
    assert_eq!(
        out.status.code(),
        Some(1),
        "a failed job is the job's fault: {stdout}"
    );
    let mut lines = stdout.lines();
    assert_eq!(lines.next(), Some("hello"));
    // Pid 1 may start away from the CLI's CPU; the job still gets every CPU we have.
    let ours = std::fs::read_to_string("/proc/self/status").unwrap();
    let ours = ours.lines().find(|l| l.starts_with("Cpus_allowed_list"));
    assert_eq!(lines.next(), ours);
    let outcome: Outcome = serde_json::from_str(lines.next().unwrap()).unwrap();
    assert_eq!(outcome.exit, Exit::Code(4));
    assert_eq!(outcome.reason, DeathReason::Completed);
    let help = std::process::Command::new(env!("CARGO_BIN_EXE_corral"))
        .arg("--help")
        .output()
        .unwrap();
    let help = String::from_utf8(help.stdout).unwrap();
    assert!(
        help.contains("sandbox") && !help.contains("__sandbox-shim"),
        "{help}"
    );
}

/// The issue's fork bomb behind a sleep, through `corral sandbox --events -`: the refusal
/// reaches stderr as a JSON line while the job still runs, and the outcome, `completed`,
/// counts it.
#[test]
fn debug_command_streams_live_events_and_counts_a_survived_fork_bomb() {
    if !prerequisites() {
        return;
    }
    let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_corral"))
        .args(["sandbox", "--rootfs"])
        .arg(rootfs())
        .args(["--pids", "16", "--wall", "30", "--events", "-", "--bind"])
        .arg(format!(
            "{}:/probes",
            repo().join("fixtures/abuse/probes").display()
        ))
        .args(["--", "python3", "/probes/live.py", "forks", "3"])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let stderr = child.stderr.take().unwrap();
    let lines = std::thread::spawn(move || {
        use std::io::BufRead;
        std::io::BufReader::new(stderr)
            .lines()
            .map_while(Result::ok)
            .map(|l| (l, SystemTime::now()))
            .collect::<Vec<_>>()
    });
    let mut stdout = String::new();
    child
        .stdout
        .take()
        .unwrap()
        .read_to_string(&mut stdout)
        .unwrap();
    let status = child.wait().unwrap();
    let lines = lines.join().unwrap();
    assert!(status.success(), "{stdout}\n{lines:?}");
    let outcome: Outcome = serde_json::from_str(stdout.lines().last().unwrap()).unwrap();
    assert_eq!(outcome.reason, DeathReason::Completed, "{stdout}");
    assert!(outcome.pids_limit_hits >= 1, "{stdout}");
    assert_eq!(outcome.events_dropped, 0);
    let (cause, done) = (
        stamped(&stdout, "cause").unwrap(),
        stamped(&stdout, "done").unwrap(),
    );
    let (event, received) = lines
        .iter()
        .find_map(|(line, at)| {
            let event: corral_sandbox::LiveEvent = serde_json::from_str(line).ok()?;
            (event.kind.name() == "pids_limit").then_some((event, *at))
        })
        .unwrap_or_else(|| panic!("no pids_limit event on stderr: {lines:?}"));
    assert!(
        matches!(
            event.kind,
            corral_sandbox::LiveEventKind::PidsLimit { refused, limit: Some(16) } if refused >= 1
        ),
        "{event:?}"
    );
    assert!(
        secs_between(cause, received) <= 1.0,
        "{:.3} s",
        secs_between(cause, received)
    );
    assert!(received < done, "the event came after the job's end");
}

/// A reader that went away: the outcome cannot be printed, and `corral sandbox` ends
/// quietly with exit 141 (as `cat` does) instead of dying of SIGPIPE; with fd 1 closed
/// altogether the outcome goes nowhere and the run succeeds. Neither leaves anything on
/// the host.
#[test]
fn debug_command_survives_a_closed_stdout() {
    if !prerequisites() {
        return;
    }
    // The pipe's reader is closed before the command starts (`| true` would race: on a slow
    // kernel `true` may still be reading when the outcome is written).
    let script = r#"
        python3 -c 'import os, subprocess, sys
r, w = os.pipe()
os.close(r)
sys.exit(subprocess.call(sys.argv[1:], stdout=w))' \
            "$CORRAL" sandbox --rootfs "$ROOTFS" --quiet -- sh -c 'echo x >/written'
        echo "piped=$?" >&2
        "$CORRAL" sandbox --rootfs "$ROOTFS" --quiet -- /bin/true >&-
        echo "closed=$?" >&2
    "#;
    let out = std::process::Command::new("bash")
        .args(["-c", script])
        .env("CORRAL", env!("CARGO_BIN_EXE_corral"))
        .env("ROOTFS", rootfs())
        .output()
        .unwrap();
    let stderr = String::from_utf8(out.stderr).unwrap();
    // A closed stdout ends every command quietly with 128 + SIGPIPE (exit::STDOUT_CLOSED).
    assert!(stderr.contains("piped=141"), "{stderr}");
    assert!(!stderr.contains("panicked"), "{stderr}");
    assert!(
        !stderr.contains("corral:"),
        "a closed pipe is no error: {stderr}"
    );
    assert!(stderr.contains("closed=0"), "{stderr}");
    // The default upper dir is a tmpfs inside the sandbox: the host's mount point for it
    // stays empty, whatever the jobs wrote.
    let scratch: Vec<_> = std::fs::read_dir("/run/corral/scratch").unwrap().collect();
    assert!(scratch.is_empty(), "{scratch:?}");
}

/// `corral sandbox` supervises the job itself: Ctrl-C (SIGINT) cancels the job, the outcome
/// still comes out, and the job's cgroup is gone.
#[test]
fn debug_command_interrupted_reports_cancelled_and_cleans_up() {
    if !prerequisites() {
        return;
    }
    use std::io::BufRead;
    let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_corral"))
        .args(["sandbox", "--rootfs"])
        .arg(rootfs())
        .args([
            "--wall",
            "60",
            "--",
            "sh",
            "-c",
            "echo started; exec sleep 50",
        ])
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let pid = child.id();
    let mut out = std::io::BufReader::new(child.stdout.take().unwrap());
    let mut line = String::new();
    out.read_line(&mut line).unwrap();
    assert_eq!(line, "started\n");
    let started = std::time::Instant::now();
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(pid as i32),
        nix::sys::signal::Signal::SIGINT,
    )
    .unwrap();
    let mut rest = String::new();
    out.read_to_string(&mut rest).unwrap();
    let status = child.wait().unwrap();
    assert!(
        started.elapsed() < Duration::from_secs(20),
        "the job outlived the interrupt"
    );
    assert_eq!(status.code(), Some(1), "{rest}");
    let outcome: Outcome = serde_json::from_str(rest.trim()).unwrap();
    assert_eq!(outcome.reason, DeathReason::Cancelled, "{rest}");
    assert_eq!(outcome.exit, Exit::Signal(15), "sleep dies of the TERM");
    let mountinfo = std::fs::read_to_string("/proc/self/mountinfo").unwrap();
    let parent = match corral_sandbox::discover_cgroups(&mountinfo).unwrap() {
        corral_sandbox::Layout::V1 { mounts } => mounts["memory"].join("corral"),
        corral_sandbox::Layout::V2 { root } => root.join("corral"),
    };
    let prefix = format!("job-{pid}-");
    let leftovers: Vec<_> = std::fs::read_dir(&parent)
        .map(|d| {
            d.flatten()
                .filter(|e| e.file_name().to_string_lossy().starts_with(&prefix))
                .map(|e| e.path())
                .collect()
        })
        .unwrap_or_default();
    assert!(leftovers.is_empty(), "cgroups left behind: {leftovers:?}");
}

/// The in-process supervisor refuses a multi-threaded caller (this test harness) instead of
/// cloning the job's pid 1 from it.
#[test]
fn in_process_supervision_needs_a_single_threaded_caller() {
    let _dirs = leaves_nothing("threads");
    let worker = std::thread::spawn(|| std::thread::sleep(Duration::from_millis(500)));
    let dir = tempfile::tempdir().unwrap();
    let spec = SandboxSpec {
        lower_dirs: vec![rootfs()],
        upper: dir.path().join("upper"),
        work: dir.path().join("work"),
        identity: corral_sandbox::Identity {
            host_uid: 250_000,
            host_gid: 250_000,
        },
        argv: vec!["true".to_owned()],
        env: Vec::new(),
        cwd: PathBuf::from("/"),
        limits: SandboxLimits::default(),
        network: Network::None,
        read_only_binds: Vec::new(),
        hostname: "corral".to_owned(),
        scratch: None,
    };
    let err = Sandbox::run(&spec, &config("threads"), corral_sandbox::Output::Discard)
        .expect_err("a multi-threaded caller must be refused");
    assert!(
        matches!(err, corral_sandbox::Error::NotSingleThreaded),
        "{err}"
    );
    worker.join().unwrap();
}

// cgroup v2 only. This host kind runs its controllers on v1, so these run where v2 is real:
// `scripts/test-v2` boots a pure-v2 kernel (user-mode Linux) and runs this binary there with
// `--include-ignored` and CORRAL_REQUIRE_CGROUP=v2.
const V2_ONLY: &str = "needs a cgroup v2 host: scripts/test-v2 runs it";

/// The unified root, or a failure: an ignored test only runs when asked for on v2.
fn v2_root() -> PathBuf {
    let mountinfo = std::fs::read_to_string("/proc/self/mountinfo").unwrap();
    match discover_cgroups(&mountinfo).unwrap() {
        Layout::V2 { root } => root,
        other => panic!("{V2_ONLY}; this host offers {}", other.describe()),
    }
}

#[test]
#[ignore = "needs a cgroup v2 host: scripts/test-v2 runs it"]
fn v2_oom_kills_the_whole_build_not_one_process() {
    assert!(prerequisites());
    v2_root();
    let _dirs = leaves_nothing("v2-oom");
    let jobs = tempfile::tempdir_in("/var/tmp").unwrap();
    let job = JobDir::create(jobs.path(), "v2-oom", 16 << 20).unwrap();
    // Without memory.oom.group the kernel kills python alone and the shell goes on to exit 0.
    let mut spec = simple_spec(
        &job,
        211_101,
        &[
            "sh",
            "-c",
            "python3 -c 'x = bytearray(200 << 20)'; echo survived",
        ],
    );
    spec.limits.memory_bytes = Some(64 << 20);
    let ran = spawn_and_wait(&spec, &config("v2-oom"));
    assert_eq!(ran.outcome.reason, DeathReason::Oom, "{:?}", ran.outcome);
    assert!(!ran.stdout.contains("survived"), "{}", ran.stdout);
    assert!(
        ran.outcome.usage.memory_peak >= 60 << 20,
        "{:?}",
        ran.outcome.usage
    );
    assert!(
        ran.outcome.usage.memory_peak <= 64 << 20,
        "{:?}",
        ran.outcome.usage
    );
    drop(job);
    assert_nothing_left("v2-oom", 211_101, "v2 oom");
}

#[test]
#[ignore = "needs a cgroup v2 host: scripts/test-v2 runs it"]
fn v2_limits_land_in_the_kernel_files_and_controllers_only_in_our_subtree() {
    let root = v2_root();
    let _dirs = leaves_nothing("v2-files");
    let layout = Layout::V2 { root: root.clone() };
    let root_control_before = std::fs::read_to_string(root.join("cgroup.subtree_control")).unwrap();
    let cg = JobCgroup::create(&layout, "corral-test-v2-files", "job").unwrap();
    let JobCgroup::V2(v2) = &cg else {
        panic!("a v1 cgroup on a v2 host")
    };
    cg.version()
        .apply(&SandboxLimits {
            memory_bytes: Some(96 << 20),
            pids: Some(33),
            cpu_quota: Some(0.5),
            ..SandboxLimits::default()
        })
        .unwrap();
    let r = |f: &str| std::fs::read_to_string(v2.dir.join(f)).unwrap();
    assert_eq!(r("memory.max").trim(), (96u64 << 20).to_string());
    assert_eq!(r("memory.swap.max").trim(), "0");
    assert_eq!(r("memory.oom.group").trim(), "1");
    assert_eq!(r("pids.max").trim(), "33");
    assert_eq!(r("cpu.max").trim(), "50000 100000");
    let mut have: Vec<String> = r("cgroup.controllers")
        .split_whitespace()
        .map(str::to_owned)
        .collect();
    have.sort();
    assert_eq!(
        have,
        ["cpu", "io", "memory", "pids"],
        "the job's controllers"
    );
    // The root's subtree_control was the init's (or systemd's) to set, not ours.
    assert_eq!(
        std::fs::read_to_string(root.join("cgroup.subtree_control")).unwrap(),
        root_control_before
    );
    cg.destroy().unwrap();
    assert!(!v2.dir.exists());
}

#[test]
#[ignore = "needs a cgroup v2 host: scripts/test-v2 runs it"]
fn v2_a_process_that_escaped_into_a_child_cgroup_is_killed_and_removed() {
    let root = v2_root();
    let _dirs = leaves_nothing("v2-escape");
    let layout = Layout::V2 { root };
    let cg = JobCgroup::create(&layout, "corral-test-v2-escape", "job").unwrap();
    let JobCgroup::V2(v2) = &cg else {
        panic!("a v1 cgroup on a v2 host")
    };
    cg.version().apply(&SandboxLimits::default()).unwrap();
    let mut sleeper = std::process::Command::new("sleep")
        .arg("600")
        .spawn()
        .unwrap();
    let deeper = v2.dir.join("escape/deeper");
    std::fs::create_dir_all(&deeper).unwrap();
    std::fs::write(deeper.join("cgroup.procs"), sleeper.id().to_string()).unwrap();
    assert_eq!(cg.version().pids().unwrap(), vec![sleeper.id() as i32]);
    cg.destroy().unwrap();
    assert!(
        !v2.dir.exists(),
        "the job's cgroup is gone with its children"
    );
    let status = sleeper.wait().unwrap();
    use std::os::unix::process::ExitStatusExt as _;
    assert_eq!(status.signal(), Some(9), "{status:?}");
}

/// Job cgroups from a pool (as `corral work` takes them): each job gets a cgroup no process
/// was ever in, so its counters start at zero whatever the job before did; the early
/// outcome (`wait_outcome`) comes back with every process dead; the pool removes the used
/// cgroups and its spares, and the teardown ends with the shim.
#[test]
fn pooled_cgroups_are_fresh_for_every_job_and_all_removed() {
    if !prerequisites() {
        return;
    }
    let _dirs = leaves_nothing("cgpool");
    let jobs = tempfile::tempdir_in("/var/tmp").unwrap();
    let base = zygote_config("cgpool");
    let layout = corral_sandbox::host_cgroup_layout().unwrap();
    let pool = std::sync::Arc::new(
        corral_sandbox::CgroupPool::new(layout, &base.cgroup_parent, 2).unwrap(),
    );
    let cfg = SandboxConfig {
        cgroup_pool: Some(pool.clone()),
        ..base
    };
    pool.settle();
    // A pooled cgroup comes with its counters open (the job's end reads them without a
    // path walk), and a fresh one has counted nothing.
    let (cg, counters) = pool.take().unwrap();
    let counted = counters
        .expect("a real cgroup's counters open ahead")
        .read()
        .unwrap();
    assert_eq!(counted, corral_sandbox::CgroupStats::default());
    pool.give_back(cg);
    pool.settle();
    let mut outcomes = Vec::new();
    for (round, script) in [
        // 48 MiB on the job's /tmp (a tmpfs charged to its memory cgroup), 20 processes,
        // and an OOM kill: everything a later job's counters must not inherit.
        "dd if=/dev/zero of=/tmp/fill bs=1M count=48 2>/dev/null; \
         for i in $(seq 20); do sleep 0.2 & done; wait; \
         python3 -c 'b = bytearray(200 << 20)' ; true",
        "true",
    ]
    .into_iter()
    .enumerate()
    {
        let job = JobDir::create(jobs.path(), &format!("cgpool-{round}"), 64 << 20).unwrap();
        let mut spec = simple_spec(&job, 211_040, &["sh", "-c", script]);
        spec.limits.memory_bytes = Some(128 << 20);
        let mut running = Sandbox::spawn(&spec, &cfg).unwrap();
        let out = drain(running.stdout.take());
        let err = drain(running.stderr.take());
        let (outcome, teardown) = running.wait_outcome();
        let outcome = outcome.unwrap();
        // cgroup v1 kills the biggest process (python) and the script goes on; v2 kills
        // the whole job (`memory.oom.group`), the script's shell with it.
        let survived = outcome.exit == Exit::Code(0);
        let group_killed = round == 0 && outcome.exit == Exit::Signal(9);
        assert!(
            survived || group_killed,
            "round {round}: {outcome:?}: {}",
            err.join().unwrap()
        );
        let _ = out.join();
        teardown.wait();
        job.remove().unwrap();
        outcomes.push(outcome);
    }
    let (first, second) = (&outcomes[0], &outcomes[1]);
    assert!(first.usage.memory_peak >= 48 << 20, "{first:?}");
    assert!(first.oom_kills >= 1, "{first:?}");
    assert!(
        second.usage.memory_peak < 16 << 20,
        "the second job's peak is its own: {second:?}"
    );
    assert_eq!(second.oom_kills, 0, "{second:?}");
    assert!(second.usage.pids_peak < 10, "{second:?}");
    assert!(
        second.usage.cpu_user + second.usage.cpu_system < Duration::from_millis(500),
        "{second:?}"
    );
    pool.settle();
    assert_eq!(pool.stats().to_remove, 0);
    assert_eq!(pool.stats().failures, 0);
    drop(cfg);
    drop(std::sync::Arc::into_inner(pool).expect("the last holder"));
    assert_nothing_left("cgpool", 211_040, "cgpool-1");
}
