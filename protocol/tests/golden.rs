//! Golden messages: every job in `fixtures/jobs/` decodes, every message in
//! `fixtures/invalid/` fails with the field and rule that `expected.json` names, the
//! committed JSON Schemas are current, and an independent validator (Python `jsonschema`)
//! agrees with the Rust decoder on all of them.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;

use corral_protocol::{Rule, decode_job, schemas};
use serde::Deserialize;

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .unwrap()
        .to_path_buf()
}

fn json_files(dir: &Path) -> Vec<PathBuf> {
    let mut files: Vec<PathBuf> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "json"))
        .filter(|p| {
            !p.file_name()
                .unwrap()
                .to_string_lossy()
                .ends_with(".expect.json")
        })
        .collect();
    files.sort();
    files
}

/// In CI a missing prerequisite fails the test; elsewhere it is skipped, loudly.
fn require(ok: bool, what: &str) -> bool {
    if ok {
        return true;
    }
    if std::env::var("CI").is_ok_and(|v| v == "true") {
        panic!("prerequisite missing in CI: {what}");
    }
    eprintln!("SKIPPED: prerequisite missing: {what}");
    false
}

#[test]
fn golden_jobs_decode() {
    let files = json_files(&root().join("fixtures/jobs"));
    assert!(!files.is_empty());
    for file in files {
        let bytes = std::fs::read(&file).unwrap();
        if let Err(err) = decode_job(&bytes) {
            panic!("{}: {err}", file.display());
        }
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Expected {
    field: String,
    rule: Rule,
    #[serde(default)]
    message_contains: Option<String>,
}

#[test]
fn invalid_messages_fail_with_the_expected_field_and_rule() {
    let dir = root().join("fixtures/invalid");
    let expected: BTreeMap<String, Expected> =
        serde_json::from_slice(&std::fs::read(dir.join("expected.json")).unwrap()).unwrap();
    let files: Vec<String> = json_files(&dir)
        .iter()
        .map(|p| p.file_name().unwrap().to_string_lossy().into_owned())
        .filter(|n| n != "expected.json")
        .collect();
    assert_eq!(
        files,
        expected.keys().cloned().collect::<Vec<_>>(),
        "every file in fixtures/invalid has exactly one expectation"
    );
    let mut failures = Vec::new();
    for (name, want) in &expected {
        let bytes = std::fs::read(dir.join(name)).unwrap();
        match decode_job(&bytes) {
            Ok(_) => failures.push(format!(
                "{name}: accepted, expected {} {}",
                want.field, want.rule
            )),
            Err(err) => {
                let text_ok = want
                    .message_contains
                    .as_ref()
                    .is_none_or(|t| err.to_string().contains(t.as_str()));
                if err.field != want.field || err.rule != want.rule || !text_ok {
                    failures.push(format!(
                        "{name}: got `{err}` [{}], expected field {} rule {} {:?}",
                        err.rule, want.field, want.rule, want.message_contains
                    ));
                }
            }
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

#[test]
fn committed_schemas_are_current() {
    let dir = root().join("protocol/schema");
    let update = std::env::var("CORRAL_UPDATE_SCHEMAS").is_ok_and(|v| v == "1");
    let mut stale = Vec::new();
    for (name, schema) in schemas() {
        let path = dir.join(&name);
        let fresh = serde_json::to_string_pretty(&schema).unwrap() + "\n";
        if update {
            std::fs::create_dir_all(&dir).unwrap();
            std::fs::write(&path, &fresh).unwrap();
        } else if std::fs::read_to_string(&path).ok().as_deref() != Some(fresh.as_str()) {
            stale.push(name);
        }
    }
    assert!(
        stale.is_empty(),
        "stale schemas {stale:?}: run `CORRAL_UPDATE_SCHEMAS=1 cargo test -p corral-protocol --test golden` \
         (or `corral schema --write protocol/schema`) and commit the result"
    );
}

#[test]
fn an_independent_validator_agrees() {
    let probe = Command::new("python3")
        .args(["-c", "import jsonschema"])
        .status();
    if !require(
        probe.is_ok_and(|s| s.success()),
        "python3 with the jsonschema module",
    ) {
        return;
    }
    let out = Command::new("python3")
        .arg(root().join("protocol/tests/schema_check.py"))
        .arg(root())
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{text}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(text.contains("agree"), "{text}");
}
