//! `corral check-config` as an operator uses it: the annotated example is valid and says the
//! defaults, every kind of mistake exits 65 naming the key, environment and flags override
//! the file, and secrets never reach the output.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

fn example() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/corral.example.toml")
}

/// Runs `corral check-config` with a clean `CORRAL_*` environment plus `env`.
fn check(file: &Path, env: &[(&str, &str)], args: &[&str]) -> Output {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_corral"));
    for (var, _) in std::env::vars() {
        if var.starts_with("CORRAL_") {
            cmd.env_remove(var);
        }
    }
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
