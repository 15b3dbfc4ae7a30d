//! `corral check-config` as an operator uses it: the annotated example is valid and says the
//! defaults, every kind of mistake exits 65 naming the key, environment and flags override
//! the file, and secrets never reach the output. `--effective` shows that every `CORRAL_*`
//! variable, every `--set` and every flag of `corral work` reaches the key it names, with
//! that layer as the value's origin.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::process::Output;

mod common;
use common::corral;

fn example() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/corral.example.toml")
}

/// Runs `corral check-config` with a clean `CORRAL_*` environment plus `env`.
fn check(file: &Path, env: &[(&str, &str)], args: &[&str]) -> Output {
    let mut cmd = corral();
    cmd.arg("check-config")
        .arg(file)
        .args(args)
        .envs(env.iter().copied());
    cmd.output().expect("running corral")
}

fn stdout(out: &Output) -> String {
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn stderr(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

fn write(dir: &Path, name: &str, text: &str) -> PathBuf {
    let path = dir.join(name);
    std::fs::write(&path, text).unwrap();
    path
}

/// The effective config without the leading comment that names the file.
fn effective(out: &Output) -> toml::Table {
    assert_eq!(out.status.code(), Some(0), "stderr: {}", stderr(out));
    stdout(out).parse().expect("effective config is TOML")
}

#[test]
fn example_is_valid_and_states_the_defaults() {
    let dir = tempfile::tempdir().unwrap();
    let empty = write(dir.path(), "empty.toml", "");
    let from_example = effective(&check(&example(), &[], &[]));
    let from_defaults = effective(&check(&empty, &[], &[]));
    assert_eq!(from_example, from_defaults);
}

#[test]
fn example_lists_every_key() {
    let text = std::fs::read_to_string(example()).unwrap();
    let mut section = String::new();
    let mut listed = BTreeSet::new();
    for line in text.lines() {
        let line = line.trim();
        if let Some(name) = line.strip_prefix('[').and_then(|l| l.strip_suffix(']')) {
            section = name.to_string();
            continue;
        }
        // A key line, active (`key = …`) or shown commented out (`# key = …`).
        let body = line.strip_prefix("# ").unwrap_or(line);
        let Some((key, _)) = body.split_once(" = ") else {
            continue;
        };
        if key.is_empty() || !key.bytes().all(|b| b.is_ascii_lowercase() || b == b'_') {
            continue;
        }
        listed.insert(if section.is_empty() {
            key.to_string()
        } else {
            format!("{section}.{key}")
        });
    }
    let known: BTreeSet<String> = corral_worker::config::keys()
        .iter()
        .map(|k| k.name.clone())
        .collect();
    assert_eq!(listed, known);
}

#[test]
fn each_kind_of_mistake_names_its_key() {
    let dir = tempfile::tempdir().unwrap();
    let cases: &[(&str, &str, &str)] = &[
        ("unknown top-level key", "concurency = 2\n", "concurency"),
        (
            "unknown key in a section",
            "[amqp]\nheartbeat = 10\n",
            "amqp.heartbeat",
        ),
        ("unknown section", "[amqpp]\nurl = \"x\"\n", "amqpp"),
        (
            "wrong type",
            "[amqp]\nheartbeat_seconds = \"fast\"\n",
            "amqp.heartbeat_seconds",
        ),
        (
            "out of range",
            "[amqp]\nheartbeat_seconds = 600\n",
            "amqp.heartbeat_seconds",
        ),
        (
            "above the protocol maximum",
            "[limits]\nmemory_bytes = \"32 GiB\"\n",
            "limits.memory_bytes",
        ),
        (
            "not a byte size",
            "[limits]\ndisk_bytes = \"lots\"\n",
            "limits.disk_bytes",
        ),
        (
            "password in the URL",
            "[amqp]\nurl = \"amqp://u:p@h/v\"\n",
            "amqp.url",
        ),
        (
            "bad store URL",
            "[store]\nurl = \"s3://bucket\"\n",
            "store.url",
        ),
        (
            "both secret forms",
            "[amqp]\npassword = \"a\"\npassword_file = \"/etc/hostname\"\n",
            "amqp.password_file",
        ),
        (
            "missing secret file",
            "[amqp]\npassword_file = \"/nonexistent/pw\"\n",
            "amqp.password_file",
        ),
        (
            "credentials for a directory store",
            "[store]\ntoken = \"t\"\n",
            "store.url",
        ),
        (
            "wall limit beyond the lease",
            "[limits]\nwall_seconds = 3600\n",
            "limits.wall_seconds",
        ),
        ("relative path", "data_dir = \"var/lib\"\n", "data_dir"),
        (
            "bad enum value",
            "[snapshot]\ncompression = \"xz\"\n",
            "snapshot.compression",
        ),
        (
            "bad address",
            "[metrics]\nlisten = \"everywhere\"\n",
            "metrics.listen",
        ),
        (
            "bad pool name",
            "[amqp]\npool = \"GPU pool\"\n",
            "amqp.pool",
        ),
    ];
    for (what, text, key) in cases {
        let file = write(dir.path(), "bad.toml", text);
        let out = check(&file, &[], &[]);
        let err = stderr(&out);
        assert_eq!(out.status.code(), Some(65), "{what}: {err}");
        assert!(
            err.lines()
                .any(|l| l.trim_start().starts_with(&format!("{key}: "))),
            "{what}: expected key {key} in:\n{err}"
        );
        assert!(stdout(&out).is_empty(), "{what}: printed a config");
    }
    let syntax = write(dir.path(), "syntax.toml", "[amqp\nurl = 1\n");
    let out = check(&syntax, &[], &[]);
    assert_eq!(out.status.code(), Some(65));
    assert!(stderr(&out).contains("line"), "{}", stderr(&out));
}

#[test]
fn all_bad_keys_are_named_at_once() {
    let dir = tempfile::tempdir().unwrap();
    let file = write(
        dir.path(),
        "bad.toml",
        "concurrency = 0\nbogus = 1\n[amqp]\nheartbeat_seconds = \"x\"\n",
    );
    let err = stderr(&check(&file, &[], &[]));
    for key in ["concurrency:", "bogus:", "amqp.heartbeat_seconds:"] {
        assert!(err.contains(key), "{key} missing from\n{err}");
    }
}

#[test]
fn environment_overrides_file_and_flags_override_environment() {
    let dir = tempfile::tempdir().unwrap();
    let file = write(
        dir.path(),
        "c.toml",
        "concurrency = 4\n[worker]\ninstance = \"a\"\n",
    );
    let env = [("CORRAL_CONCURRENCY", "7"), ("CORRAL_WORKER_INSTANCE", "2")];
    let t = effective(&check(&file, &env, &[]));
    assert_eq!(t["concurrency"].as_integer(), Some(7));
    assert_eq!(t["worker"]["instance"].as_str(), Some("2"));
    assert_eq!(
        t["worker"]["scratch_dir"].as_str(),
        Some("/var/lib/corral/2")
    );

    let t = effective(&check(
        &file,
        &env,
        &["--concurrency", "3", "--set", "amqp.pool=gpu"],
    ));
    assert_eq!(t["concurrency"].as_integer(), Some(3));
    assert_eq!(t["amqp"]["jobs_queue"].as_str(), Some("corral.jobs.gpu"));

    let out = check(&file, &[("CORRAL_AMQP_HEARTBEAT_SECONDS", "1")], &[]);
    assert_eq!(out.status.code(), Some(65));
    let err = stderr(&out);
    assert!(
        err.contains("amqp.heartbeat_seconds") && err.contains("CORRAL_AMQP_HEARTBEAT_SECONDS"),
        "{err}"
    );
    let out = check(&file, &[], &["--set", "amqp.nope=1"]);
    assert_eq!(out.status.code(), Some(65));
    assert!(stderr(&out).contains("amqp.nope: unknown key"));
}

#[test]
fn secrets_come_from_files_and_are_never_printed() {
    let dir = tempfile::tempdir().unwrap();
    let pw = write(dir.path(), "amqp.password", "s3cr3t-from-file\n");
    let token = write(dir.path(), "registry.token", "t0ken-from-file");
    let file = write(
        dir.path(),
        "c.toml",
        &format!(
            "[amqp]\npassword_file = \"{}\"\n[store]\nurl = \"oci://registry.invalid/corral\"\ntoken_file = \"{}\"\n",
            pw.display(),
            token.display()
        ),
    );
    let out = check(&file, &[], &[]);
    let t = effective(&out);
    let text = stdout(&out) + &stderr(&out);
    assert!(
        !text.contains("s3cr3t") && !text.contains("t0ken"),
        "{text}"
    );
    assert_eq!(t["amqp"]["password_file"].as_str(), pw.to_str());
    assert_eq!(t["store"]["token_file"].as_str(), token.to_str());

    let out = check(&file, &[("CORRAL_AMQP_PASSWORD", "hunter2")], &[]);
    assert_eq!(out.status.code(), Some(65), "inline and file at once");

    let plain = write(dir.path(), "plain.toml", "");
    let out = check(&plain, &[("CORRAL_AMQP_PASSWORD", "hunter2")], &[]);
    let t = effective(&out);
    assert!(!stdout(&out).contains("hunter2"));
    assert_eq!(t["amqp"]["password"].as_str(), Some("<redacted>"));
}

/// Runs `corral check-config --effective ARGS…` with a clean `CORRAL_*` environment plus
/// `env`; returns the annotated output as (TOML table, origin of each dotted key).
fn effective_with_origins(
    args: &[&str],
    env: &[(&str, &str)],
) -> (toml::Table, std::collections::BTreeMap<String, String>) {
    let out = corral()
        .args(["check-config", "--effective"])
        .args(args)
        .envs(env.iter().copied())
        .output()
        .expect("running corral");
    let table = effective(&out);
    let mut origins = std::collections::BTreeMap::new();
    let mut section = String::new();
    for line in stdout(&out).lines() {
        if let Some(name) = line.strip_prefix('[').and_then(|l| l.strip_suffix(']')) {
            section = format!("{name}.");
        } else if let Some((entry, origin)) = line.rsplit_once(" # ")
            && let Some((key, _)) = entry.split_once(" = ")
        {
            origins.insert(format!("{section}{key}"), origin.to_string());
        }
    }
    (table, origins)
}

fn lookup<'a>(table: &'a toml::Table, key: &str) -> Option<&'a toml::Value> {
    match key.split_once('.') {
        Some((section, rest)) => table.get(section)?.as_table()?.get(rest),
        None => table.get(key),
    }
}

/// A TOML value as written after `=`.
fn toml_value(text: &str) -> toml::Value {
    let table: toml::Table = format!("v = {text}").parse().unwrap();
    table["v"].clone()
}

/// A value for every key, other than its default, and how the effective config prints it;
/// some keys need others set (in a file) to be valid.
fn every_key(secret: &Path) -> Vec<(&'static str, String, String, String)> {
    let secret = secret.display().to_string();
    let registry = "[store]\nurl = \"oci://registry.invalid/corral\"\n";
    let basic = format!("{registry}username = \"u\"\n");
    let s = |v: &str| v.to_string();
    let q = |v: &str| format!("{v:?}");
    let none = String::new();
    vec![
        (
            "data_dir",
            s("/srv/corral-x"),
            q("/srv/corral-x"),
            none.clone(),
        ),
        ("concurrency", s("4"), s("4"), none.clone()),
        ("drain_deadline_seconds", s("45"), s("45"), none.clone()),
        ("worker.id", s("box-7"), q("box-7"), none.clone()),
        ("worker.instance", s("3"), q("3"), none.clone()),
        (
            "worker.scratch_dir",
            s("/scratch/3"),
            q("/scratch/3"),
            none.clone(),
        ),
        (
            "store.url",
            s("oci+http://127.0.0.1:5000/corral"),
            q("oci+http://127.0.0.1:5000/corral"),
            none.clone(),
        ),
        (
            "store.username",
            s("u"),
            q("u"),
            format!("{registry}password = \"p\"\n"),
        ),
        (
            "store.password",
            s("hunter2"),
            q("<redacted>"),
            basic.clone(),
        ),
        (
            "store.password_file",
            secret.clone(),
            q(&secret),
            basic.clone(),
        ),
        ("store.token", s("t0k"), q("<redacted>"), s(registry)),
        ("store.token_file", secret.clone(), q(&secret), s(registry)),
        (
            "amqp.url",
            s("amqp://corral@10.1.2.3:5673/builds"),
            q("amqp://corral@10.1.2.3:5673/builds"),
            none.clone(),
        ),
        ("amqp.prefix", s("acme"), q("acme"), none.clone()),
        ("amqp.password", s("hunter2"), q("<redacted>"), none.clone()),
        (
            "amqp.password_file",
            secret.clone(),
            q(&secret),
            none.clone(),
        ),
        ("amqp.pool", s("gpu"), q("gpu"), none.clone()),
        ("amqp.jobs_exchange", s("x.jobs"), q("x.jobs"), none.clone()),
        ("amqp.jobs_queue", s("x.q"), q("x.q"), none.clone()),
        (
            "amqp.dead_letter_exchange",
            s("x.dead"),
            q("x.dead"),
            none.clone(),
        ),
        ("amqp.dead_letter_queue", s("x.dq"), q("x.dq"), none.clone()),
        (
            "amqp.results_exchange",
            s("x.results"),
            q("x.results"),
            none.clone(),
        ),
        (
            "amqp.events_exchange",
            s("x.events"),
            q("x.events"),
            none.clone(),
        ),
        ("amqp.logs_exchange", s("x.logs"), q("x.logs"), none.clone()),
        (
            "amqp.control_exchange",
            s("x.control"),
            q("x.control"),
            none.clone(),
        ),
        ("amqp.prefetch", s("9"), s("9"), none.clone()),
        ("amqp.delivery_limit", s("9"), s("9"), none.clone()),
        ("amqp.heartbeat_seconds", s("20"), s("20"), none.clone()),
        ("amqp.lease_seconds", s("3600"), s("3600"), none.clone()),
        (
            "amqp.lease_margin_seconds",
            s("120"),
            s("120"),
            none.clone(),
        ),
        ("amqp.reconnect_max_seconds", s("45"), s("45"), none.clone()),
        ("amqp.blocked_wait_seconds", s("60"), s("60"), none.clone()),
        (
            "amqp.consumer_refresh_seconds",
            s("20"),
            s("20"),
            none.clone(),
        ),
        (
            "amqp.cancel_memory_seconds",
            s("600"),
            s("600"),
            none.clone(),
        ),
        ("sandbox.uid_start", s("200000"), s("200000"), none.clone()),
        ("sandbox.gid_start", s("300000"), s("300000"), none.clone()),
        ("sandbox.id_count", s("1000"), s("1000"), none.clone()),
        (
            "sandbox.cgroup_parent",
            s("/corral/builds"),
            q("/corral/builds"),
            none.clone(),
        ),
        (
            "sandbox.helper",
            s("/opt/corral-worker"),
            q("/opt/corral-worker"),
            none.clone(),
        ),
        ("sandbox.cpus_per_build", s("1.5"), s("1.5"), none.clone()),
        (
            "sandbox.cpu_saturated_seconds",
            s("5"),
            s("5"),
            none.clone(),
        ),
        ("sandbox.kill_grace_seconds", s("20"), s("20"), none.clone()),
        ("limits.wall_seconds", s("600"), s("600"), none.clone()),
        ("limits.cpu_seconds", s("600"), s("600"), none.clone()),
        ("limits.memory_bytes", s("1GiB"), q("1 GiB"), none.clone()),
        (
            "limits.disk_bytes_per_second",
            s("8MiB"),
            q("8 MiB"),
            none.clone(),
        ),
        ("limits.pids", s("64"), s("64"), none.clone()),
        ("limits.disk_bytes", s("2 GiB"), q("2 GiB"), none.clone()),
        ("limits.open_files", s("1024"), s("1024"), none.clone()),
        ("limits.log_bytes", s("1048576"), q("1 MiB"), none.clone()),
        ("snapshot.compression", s("zstd"), q("zstd"), none.clone()),
        ("snapshot.level", s("5"), s("5"), none.clone()),
        ("snapshot.threads", s("2"), s("2"), none.clone()),
        (
            "snapshot.max_output_bytes",
            s("1 GiB"),
            q("1 GiB"),
            none.clone(),
        ),
        (
            "metrics.listen",
            s("127.0.0.1:9999"),
            q("127.0.0.1:9999"),
            none.clone(),
        ),
        ("log.format", s("json"), q("json"), none.clone()),
        ("limits.network_bytes", s("2 GiB"), q("2 GiB"), none.clone()),
        (
            "egress.allow",
            s("pypi.test:443, files.test:443"),
            s(r#"["files.test:443", "pypi.test:443"]"#),
            none.clone(),
        ),
        ("egress.connections", s("8"), s("8"), none.clone()),
        (
            "egress.ca",
            s("/etc/corral/mirror-ca.pem"),
            q("/etc/corral/mirror-ca.pem"),
            none,
        ),
    ]
}

#[test]
fn every_environment_variable_and_set_reaches_its_key() {
    let dir = tempfile::tempdir().unwrap();
    let secret = write(dir.path(), "secret", "s3cr3t\n");
    let table = every_key(&secret);
    let covered: BTreeSet<String> = table.iter().map(|row| row.0.to_string()).collect();
    let known: BTreeSet<String> = corral_worker::config::keys()
        .iter()
        .map(|k| k.name.clone())
        .collect();
    assert_eq!(covered, known, "the table must cover every key");

    for (key, text, printed, companions) in &table {
        let file = write(dir.path(), "companions.toml", companions);
        let file = file.to_str().unwrap();
        let var = format!("CORRAL_{}", key.replace('.', "_").to_uppercase());
        let set = format!("{key}={text}");
        let by_env = [(var.as_str(), text.as_str())];
        let ways = [
            (&[file][..], &by_env[..], format!("environment {var}")),
            (&[file, "--set", &set], &[], format!("flag --set {key}")),
        ];
        for (args, env, origin) in ways {
            let (effective, origins) = effective_with_origins(args, env);
            assert_eq!(
                lookup(&effective, key),
                Some(&toml_value(printed)),
                "{key} by {origin}"
            );
            assert_eq!(origins.get(*key), Some(&origin), "{key}");
        }
    }
}

#[test]
fn every_flag_reaches_its_key() {
    let flags: &[(&str, &str, &str, &str)] = &[
        ("--instance", "3", "worker.instance", "\"3\""),
        ("--worker-id", "box-7", "worker.id", "\"box-7\""),
        ("--data-dir", "/srv/x", "data_dir", "\"/srv/x\""),
        ("--concurrency", "4", "concurrency", "4"),
        ("--drain-deadline", "2m", "drain_deadline_seconds", "120"),
        (
            "--amqp-url",
            "amqp://corral@10.1.2.3:5673/builds",
            "amqp.url",
            "\"amqp://corral@10.1.2.3:5673/builds\"",
        ),
        ("--pool", "gpu", "amqp.pool", "\"gpu\""),
        ("--prefix", "acme", "amqp.prefix", "\"acme\""),
        ("--delivery-limit", "9", "amqp.delivery_limit", "9"),
        ("--lease", "1h", "amqp.lease_seconds", "3600"),
        ("--lease-margin", "2m", "amqp.lease_margin_seconds", "120"),
        ("--heartbeat", "20s", "amqp.heartbeat_seconds", "20"),
        ("--blocked-wait", "1m", "amqp.blocked_wait_seconds", "60"),
        (
            "--cancel-memory",
            "10m",
            "amqp.cancel_memory_seconds",
            "600",
        ),
        (
            "--consumer-refresh",
            "20s",
            "amqp.consumer_refresh_seconds",
            "20",
        ),
        ("--backoff-max", "45", "amqp.reconnect_max_seconds", "45"),
        (
            "--metrics-listen",
            "127.0.0.1:9999",
            "metrics.listen",
            "\"127.0.0.1:9999\"",
        ),
        ("--log-format", "json", "log.format", "\"json\""),
    ];
    for (flag, text, key, printed) in flags {
        let (effective, origins) = effective_with_origins(&[flag, text], &[]);
        assert_eq!(
            lookup(&effective, key),
            Some(&toml_value(printed)),
            "{flag}"
        );
        assert_eq!(origins.get(*key), Some(&format!("flag {flag}")), "{flag}");
    }

    // `corral work` takes exactly these, besides its own and the global ones.
    let out = corral().args(["work", "--help"]).output().unwrap();
    let help = stdout(&out);
    let mut offered = BTreeSet::new();
    for line in help.lines() {
        // Flags start within the option column; a wrapped description line is indented
        // far deeper, and may begin with a `--` of its own text.
        let indent = line.len() - line.trim_start().len();
        if indent > 6 {
            continue;
        }
        let line = line.trim_start();
        // `-v, --verbose`: the long name after a short one.
        let line = match line.get(..4) {
            Some(short) if short.starts_with('-') && short.ends_with(", ") => &line[4..],
            _ => line,
        };
        if let Some(rest) = line.strip_prefix("--") {
            let name: String = rest
                .chars()
                .take_while(|c| c.is_ascii_alphanumeric() || *c == '-')
                .collect();
            offered.insert(format!("--{name}"));
        }
    }
    let mut expected: BTreeSet<String> = flags.iter().map(|f| f.0.to_string()).collect();
    for own in ["--set", "--config", "--verbose", "--help", "--version"] {
        expected.insert(own.to_string());
    }
    assert_eq!(offered, expected, "{help}");

    // Flags win over the environment, and `--set` over the other flags.
    let (effective, origins) = effective_with_origins(
        &[
            "--concurrency",
            "3",
            "--set",
            "concurrency=5",
            "--pool",
            "gpu",
        ],
        &[("CORRAL_CONCURRENCY", "7"), ("CORRAL_AMQP_POOL", "cpu")],
    );
    assert_eq!(effective["concurrency"].as_integer(), Some(5));
    assert_eq!(origins["concurrency"], "flag --set concurrency");
    assert_eq!(effective["amqp"]["pool"].as_str(), Some("gpu"));
    assert_eq!(
        effective["amqp"]["jobs_queue"].as_str(),
        Some("corral.jobs.gpu")
    );
}

#[test]
fn a_bad_flag_is_named_like_a_bad_key() {
    for (args, key) in [
        (&["--lease", "soon"][..], "amqp.lease_seconds"),
        (&["--drain-deadline", "1500ms"], "drain_deadline_seconds"),
        (&["--concurrency", "0"], "concurrency"),
        (&["--heartbeat", "600"], "amqp.heartbeat_seconds"),
        (&["--set", "amqp.pool"], "amqp.pool"),
    ] {
        let out = corral().arg("check-config").args(args).output().unwrap();
        let err = stderr(&out);
        assert_eq!(out.status.code(), Some(65), "{args:?}: {err}");
        assert!(
            err.lines()
                .any(|l| l.trim_start().starts_with(&format!("{key}: ")) && l.contains("flag --")),
            "{args:?}: expected {key} set by a flag in:\n{err}"
        );
    }
}

#[test]
fn defaults_without_a_file_reach_the_local_broker() {
    let (effective, origins) = effective_with_origins(&[], &[]);
    assert_eq!(
        effective["amqp"]["url"].as_str(),
        Some("amqp://guest@127.0.0.1:5672/%2F")
    );
    assert_eq!(effective["drain_deadline_seconds"].as_integer(), Some(300));
    assert_eq!(
        effective["amqp"]["jobs_exchange"].as_str(),
        Some("corral.jobs")
    );
    assert!(origins.values().all(|o| o == "default"), "{origins:?}");
    // The derived defaults follow what they derive from.
    let (effective, _) = effective_with_origins(
        &["--prefix", "acme", "--lease", "1h", "--instance", "4"],
        &[],
    );
    assert_eq!(
        effective["amqp"]["jobs_exchange"].as_str(),
        Some("acme.jobs")
    );
    assert_eq!(
        effective["amqp"]["jobs_queue"].as_str(),
        Some("acme.jobs.default")
    );
    assert_eq!(
        effective["amqp"]["dead_letter_queue"].as_str(),
        Some("acme.jobs.dead")
    );
    assert_eq!(effective["limits"]["wall_seconds"].as_integer(), Some(3300));
    assert_eq!(
        effective["worker"]["scratch_dir"].as_str(),
        Some("/var/lib/corral/4")
    );
}

#[test]
fn a_password_in_a_flag_url_is_a_redacted_secret() {
    let (effective, origins) = effective_with_origins(
        &["--amqp-url", "amqp://builder:s3cr%40t@127.0.0.1:5672/%2f"],
        &[],
    );
    assert_eq!(
        effective["amqp"]["url"].as_str(),
        Some("amqp://builder@127.0.0.1:5672/%2F")
    );
    assert_eq!(effective["amqp"]["password"].as_str(), Some("<redacted>"));
    assert_eq!(origins["amqp.password"], "flag --amqp-url");
    let out = corral()
        .args(["check-config", "--effective"])
        .env(
            "CORRAL_AMQP_URL",
            "amqp://builder:s3cr%40t@127.0.0.1:5672/%2f",
        )
        .output()
        .unwrap();
    let text = stdout(&out) + &stderr(&out);
    assert!(out.status.success(), "{text}");
    assert!(!text.contains("s3cr"), "{text}");

    // With a password given twice, neither wins silently.
    let out = corral()
        .args(["check-config", "--amqp-url", "amqp://b:x@127.0.0.1/%2f"])
        .env("CORRAL_AMQP_PASSWORD", "y")
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(65));
    assert!(stderr(&out).contains("amqp.url: "), "{}", stderr(&out));
}

#[test]
fn renamed_variables_are_refused_with_their_new_name() {
    let out = corral()
        .arg("check-config")
        .env("CORRAL_POOL", "gpu")
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(65));
    let err = stderr(&out);
    assert!(
        err.contains("CORRAL_POOL: ") && err.contains("CORRAL_AMQP_POOL"),
        "{err}"
    );
    // What `corral work` refuses to start with, check-config refuses too.
    let out = corral()
        .arg("check-config")
        .env("CORRAL_RUNNER", "pipeline")
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2), "{}", stderr(&out));
    assert!(stderr(&out).contains("CORRAL_RUNNER=pipeline is set"));
}

/// The one config sizes both what the broker hands this worker and the job filesystems kept
/// ready for it; a flag or variable that set only one would leave builds waiting.
#[test]
fn concurrency_sizes_the_prefetch_and_the_job_dir_pool() {
    use corral_worker::amqp::AmqpSettings;
    use corral_worker::config::{Config, Sources, WorkerFlags};
    use corral_worker::job::Settings;

    let load = |env: &[(&str, &str)], flags: WorkerFlags| {
        let mut vars = vec![("CORRAL_SANDBOX_CGROUP_PARENT", "/corral-test")];
        vars.extend_from_slice(env);
        let sources = Sources {
            file: None,
            env: vars
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
            flags: flags.values(),
            hostname: "h".into(),
        };
        Config::load(&sources).unwrap().config
    };
    let by_flag = WorkerFlags {
        concurrency: Some("4".into()),
        ..WorkerFlags::default()
    };
    for (config, n) in [
        (load(&[], WorkerFlags::default()), 2),
        (load(&[], by_flag), 4),
        (
            load(&[("CORRAL_CONCURRENCY", "5")], WorkerFlags::default()),
            5,
        ),
    ] {
        let amqp = AmqpSettings::from_config(&config);
        assert_eq!((amqp.concurrency, amqp.prefetch), (n, n + 1));
        // One more than run at once: the filesystem being wiped after a build.
        assert_eq!(
            Settings::from_config(&config).unwrap().job_dir_pool,
            usize::from(n) + 1
        );
    }
}

/// `sandbox.gid_start` reaches the build: the job runs as gid `gid_start` + offset on the
/// host, as its uid is `uid_start` + offset (the kernel's id maps, read inside the job, say
/// so), and its files come back in the layer as the job's own user and group.
#[test]
fn a_build_runs_as_uid_start_and_gid_start_plus_its_offset() {
    use std::os::unix::fs::symlink;
    if !common::prerequisites() {
        return;
    }
    // Its own cgroup parent, so that other tests' checks for leftovers never see this job.
    let _dirs = common::leaves_nothing("ids");
    let scratch = tempfile::Builder::new()
        .prefix("corral-test-ids-")
        .tempdir_in("/var/tmp")
        .unwrap();
    let data = scratch.path().join("data");
    common::import_test_base(&data);

    // A fixtures tree of one job: the hello bundle, a command that shows the id maps.
    let fixtures = scratch.path().join("fixtures");
    std::fs::create_dir_all(fixtures.join("jobs")).unwrap();
    for dir in ["bundles", "bases"] {
        symlink(
            common::repo().join("fixtures").join(dir),
            fixtures.join(dir),
        )
        .unwrap();
    }
    let mut job: serde_json::Value = serde_json::from_slice(
        &std::fs::read(common::repo().join("fixtures/jobs/hello.json")).unwrap(),
    )
    .unwrap();
    job["job_id"] = "id-maps".into();
    job["command"] = serde_json::json!([
        "sh",
        "-c",
        "cat /proc/self/uid_map /proc/self/gid_map; mkdir -p /app/out; touch /app/out/mine"
    ]);
    let job_file = fixtures.join("jobs/id-maps.json");
    std::fs::write(&job_file, serde_json::to_vec(&job).unwrap()).unwrap();

    let out = corral()
        .arg("replay")
        .arg(&job_file)
        .args(["--json", "--no-cache", "--data-dir"])
        .arg(&data)
        .env("CORRAL_SANDBOX_UID_START", "230000")
        .env("CORRAL_SANDBOX_GID_START", "330000")
        .env("CORRAL_SANDBOX_ID_COUNT", "100")
        .env("CORRAL_SANDBOX_CGROUP_PARENT", "/corral-test-ids")
        .output()
        .unwrap();
    let err = stderr(&out);
    let result: serde_json::Value = serde_json::from_slice(&out.stdout)
        .unwrap_or_else(|e| panic!("no result ({e}): {}\n{err}", stdout(&out)));
    assert_eq!(result["status"], "succeeded", "{result}\n{err}");
    let maps: Vec<Vec<&str>> = err
        .lines()
        .map(|l| l.split_whitespace().collect::<Vec<_>>())
        .filter(|fields| fields.len() == 3 && fields[2] == "1")
        .collect();
    let (uid, gid) = (
        corral_sandbox::JOB_UID.to_string(),
        corral_sandbox::JOB_GID.to_string(),
    );
    // The project's uid is derived from its id (the same on every worker with this range);
    // its gid sits at the same offset from gid_start.
    let ids = tempfile::tempdir().unwrap();
    let offset = corral_sandbox::IdentityMap::open(ids.path(), 230_000..=230_099)
        .unwrap()
        .slot("demo")
        - 230_000;
    let (host_uid, host_gid) = (
        (230_000 + offset).to_string(),
        (330_000 + offset).to_string(),
    );
    assert_eq!(
        maps,
        vec![
            vec![uid.as_str(), host_uid.as_str(), "1"],
            vec![gid.as_str(), host_gid.as_str(), "1"]
        ],
        "{err}"
    );

    let digest = result["artifact"]["layers"][2]["digest"].as_str().unwrap();
    let blob = data
        .join("store/blobs/sha256")
        .join(digest.trim_start_matches("sha256:"));
    let listing = std::process::Command::new("tar")
        .args(["--numeric-owner", "-tvzf"])
        .arg(&blob)
        .output()
        .unwrap();
    let listing = stdout(&listing);
    let mine = listing
        .lines()
        .find(|l| l.ends_with("app/out/mine"))
        .unwrap_or_else(|| panic!("app/out/mine not in the layer:\n{listing}"));
    assert!(mine.contains(&format!(" {uid}/{gid} ")), "{mine}");
}

/// `corral work` logs in the format its config names (here from `--set`, the highest layer):
/// its first line, a warning about a stray variable, is already JSON. (It then stops on a
/// metrics address already taken, before it touches a data dir or a broker.)
#[test]
fn work_logs_in_the_configured_format() {
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = taken.local_addr().unwrap().to_string();
    let out = corral()
        .args([
            "work",
            "--set",
            "log.format=json",
            "--metrics-listen",
            &addr,
        ])
        .env("CORRAL_NOT_A_KEY", "x")
        .output()
        .unwrap();
    let err = stderr(&out);
    assert_eq!(out.status.code(), Some(70), "{err}");
    let first = err.lines().next().unwrap_or_default();
    let line: serde_json::Value =
        serde_json::from_str(first).unwrap_or_else(|e| panic!("not JSON ({e}): {err}"));
    assert!(line.to_string().contains("CORRAL_NOT_A_KEY"), "{err}");
    assert!(err.contains("binding the metrics listener"), "{err}");
}
