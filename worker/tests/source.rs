//! Source bundles: the hostile corpus in `fixtures/bundles/hostile/` (table-driven from its
//! `expected.json`), bundles made by GNU tar, fetching by digest from a store, and
//! `corral source push`.

use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::process::Command;

use corral_protocol::{Digest, Rule, SourceRef};
use corral_worker::source::{self, ExtractLimits, Owner, SourceError};
use corral_worker::store::Store;
use sha2::{Digest as _, Sha256};

mod common;
use common::{corral, is_root, require};

fn corpus() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../fixtures/bundles/hostile")
}

const PWNED: &str = "corral-hostile-pwned";

fn pwned_anywhere(scratch: &Path) -> Vec<PathBuf> {
    let mut found: Vec<PathBuf> = ["/", "/tmp", "/etc"]
        .iter()
        .map(|d| Path::new(d).join(PWNED))
        .filter(|p| p.symlink_metadata().is_ok())
        .collect();
    // Anything that landed beside the destination instead of inside it.
    for entry in walk(scratch) {
        if entry.file_name().is_some_and(|n| n == PWNED) && !entry.starts_with(scratch.join("dest"))
        {
            found.push(entry);
        }
    }
    found
}

fn walk(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    if let Ok(rd) = std::fs::read_dir(dir) {
        for e in rd.flatten() {
            let p = e.path();
            out.push(p.clone());
            if e.file_type().is_ok_and(|t| t.is_dir()) {
                out.extend(walk(&p));
            }
        }
    }
    out
}

#[test]
fn hostile_corpus_ends_in_the_expected_errors() {
    let expected: serde_json::Value = serde_json::from_slice(
        &std::fs::read(corpus().join("expected.json"))
            .expect("fixtures/bundles/hostile/expected.json"),
    )
    .unwrap();
    let bundles = expected["bundles"].as_array().unwrap();
    assert!(bundles.len() >= 25, "the corpus shrank");
    let owner = is_root().then_some(Owner {
        uid: 4242,
        gid: 4343,
    });
    let mut failures = Vec::new();
    for case in bundles {
        let file = case["file"].as_str().unwrap();
        let expect = case["expect"].as_str().unwrap();
        let mut limits = ExtractLimits::default();
        if let Some(l) = case.get("limits") {
            if let Some(n) = l["max_entries"].as_u64() {
                limits.max_entries = n;
            }
            if let Some(n) = l["max_total_bytes"].as_u64() {
                limits.max_total_bytes = n;
            }
            if let Some(n) = l["max_header_bytes"].as_u64() {
                limits.max_header_bytes = n;
            }
        }
        let scratch = tempfile::tempdir().unwrap();
        let dest = scratch.path().join("dest");
        std::fs::create_dir(&dest).unwrap();
        let result = source::extract(&corpus().join(file), &dest, owner, &limits);
        let got = match &result {
            Ok(_) => "ok",
            Err(e) => e.kind(),
        };
        if got != expect {
            failures.push(format!("{file}: expected {expect}, got {got} ({result:?})"));
            continue;
        }
        if let Err(e) = &result {
            assert!(e.is_job_fault(), "{file}: {e}");
            let pe = e.to_protocol_error();
            assert!(pe.field.starts_with("source"), "{file}: {pe}");
        }
        let escaped = pwned_anywhere(scratch.path());
        assert!(
            escaped.is_empty(),
            "{file} wrote outside the destination: {escaped:?}"
        );
        for (path, content) in case["files"].as_object().into_iter().flatten() {
            let p = dest.join(path);
            let meta = p
                .symlink_metadata()
                .unwrap_or_else(|e| panic!("{file}: {path}: {e}"));
            assert!(meta.is_file(), "{file}: {path} is not a regular file");
            assert_eq!(
                std::fs::read_to_string(&p).unwrap(),
                content.as_str().unwrap(),
                "{file}: {path}"
            );
            if let Some(o) = owner {
                assert_eq!(
                    (meta.uid(), meta.gid()),
                    (o.uid, o.gid),
                    "{file}: {path} owner"
                );
            }
            assert_eq!(meta.mode() & 0o7000, 0, "{file}: {path} kept a special bit");
        }
        for (path, target) in case["symlinks"].as_object().into_iter().flatten() {
            let p = dest.join(path);
            assert_eq!(
                std::fs::read_link(&p).unwrap().to_str().unwrap(),
                target.as_str().unwrap(),
                "{file}: {path}"
            );
            if let Some(o) = owner {
                let meta = p.symlink_metadata().unwrap();
                assert_eq!(
                    (meta.uid(), meta.gid()),
                    (o.uid, o.gid),
                    "{file}: {path} owner"
                );
            }
        }
    }
    assert!(
        failures.is_empty(),
        "corpus mismatches:\n{}",
        failures.join("\n")
    );
}

#[test]
fn ok_tree_directories_get_their_modes_times_and_no_setgid() {
    let scratch = tempfile::tempdir().unwrap();
    source::extract(
        &corpus().join("ok-tree.tar.gz"),
        scratch.path(),
        None,
        &ExtractLimits::default(),
    )
    .unwrap();
    let shared = std::fs::metadata(scratch.path().join("app/shared")).unwrap();
    assert_eq!(shared.mode() & 0o7777, 0o775);
    assert_eq!(shared.mtime(), 1_700_000_000);
    let main = std::fs::metadata(scratch.path().join("app/main.py")).unwrap();
    assert_eq!(main.mode() & 0o7777, 0o755);
    assert_eq!(main.mtime(), 1_700_000_000);
    let hard = std::fs::metadata(scratch.path().join("app/hard.py")).unwrap();
    assert_eq!(
        hard.ino(),
        main.ino(),
        "the hard link is a link, not a copy"
    );
}

#[test]
fn gnu_tar_bundles_extract_identically() {
    if !require(
        Command::new("tar")
            .arg("--version")
            .output()
            .is_ok_and(|o| o.status.success()),
        "GNU tar",
    ) {
        return;
    }
    let scratch = tempfile::tempdir().unwrap();
    let src = scratch.path().join("src");
    std::fs::create_dir_all(src.join("pkg/sub")).unwrap();
    std::fs::write(src.join("setup.py"), "from setuptools import setup\n").unwrap();
    std::fs::write(src.join("pkg/__init__.py"), "").unwrap();
    std::fs::write(src.join("pkg/sub/data.bin"), vec![7u8; 100_000]).unwrap();
    std::os::unix::fs::symlink("../setup.py", src.join("pkg/setup-link")).unwrap();
    std::fs::write(
        src.join("pkg/".to_string() + &"n".repeat(200)),
        "long name\n",
    )
    .unwrap();
    for (name, flags) in [("b.tar", "-cf"), ("b.tar.gz", "-czf")] {
        let bundle = scratch.path().join(name);
        let st = Command::new("tar")
            .args([
                "--sort=name",
                "--owner=0",
                "--group=0",
                "--numeric-owner",
                flags,
            ])
            .arg(&bundle)
            .arg("-C")
            .arg(&src)
            .arg(".")
            .status()
            .unwrap();
        assert!(st.success());
        let dest = scratch.path().join(format!("out-{name}"));
        std::fs::create_dir(&dest).unwrap();
        let stats = source::extract(&bundle, &dest, None, &ExtractLimits::default()).unwrap();
        assert_eq!(stats.files, 4);
        let diff = Command::new("diff")
            .arg("-r")
            .arg("--no-dereference")
            .arg(&src)
            .arg(&dest)
            .output()
            .unwrap();
        assert!(
            diff.status.success(),
            "{}",
            String::from_utf8_lossy(&diff.stdout)
        );
    }
}

fn sha256(bytes: &[u8]) -> Digest {
    Digest::from_sha256(Sha256::digest(bytes).into())
}

#[tokio::test]
async fn fetch_verifies_the_digest_and_size_from_the_store() {
    let scratch = tempfile::tempdir().unwrap();
    let root = scratch.path().join("store");
    let store = Store::open(&format!("oci-dir:{}", root.display()), None)
        .await
        .unwrap();
    let bundle = std::fs::read(corpus().join("ok-tree.tar.gz")).unwrap();
    let (digest, _) = store.put_blob_bytes(&bundle).await.unwrap();

    let dest = scratch.path().join("dest");
    std::fs::create_dir(&dest).unwrap();
    let source = SourceRef {
        digest: digest.clone(),
        size: Some(bundle.len() as u64),
    };
    let stats = source::fetch_and_extract(
        &store,
        &source,
        &scratch.path().join("spool"),
        &dest,
        None,
        ExtractLimits::default(),
    )
    .await
    .unwrap();
    assert!(stats.files >= 4);
    assert_eq!(
        std::fs::read_to_string(dest.join("app/main.py")).unwrap(),
        "print('hi')\n"
    );

    let wrong_size = SourceRef {
        digest: digest.clone(),
        size: Some(1),
    };
    let err = source::fetch(&store, &wrong_size, &scratch.path().join("x"), u64::MAX)
        .await
        .unwrap_err();
    assert_eq!(err.kind(), "size_mismatch");
    assert!(!scratch.path().join("x").exists());
    let unsized_ref = SourceRef {
        digest: digest.clone(),
        size: None,
    };
    let err = source::fetch(&store, &unsized_ref, &scratch.path().join("x"), 100)
        .await
        .unwrap_err();
    assert_eq!(err.kind(), "bundle_too_large");
    assert!(err.is_job_fault());

    let missing = SourceRef {
        digest: sha256(b"never stored"),
        size: None,
    };
    let err = source::fetch(&store, &missing, &scratch.path().join("x"), u64::MAX)
        .await
        .unwrap_err();
    assert_eq!(err.kind(), "not_found");
    assert!(err.is_job_fault());

    // The bytes in the store no longer match their name: a typed invalid_job, no crash.
    let blob = root.join("blobs/sha256").join(digest.hex());
    std::fs::remove_file(&blob).unwrap();
    std::fs::write(&blob, b"tampered").unwrap();
    let err = source::fetch(&store, &source, &scratch.path().join("x"), u64::MAX)
        .await
        .unwrap_err();
    assert!(matches!(err, SourceError::DigestMismatch { .. }), "{err}");
    assert!(err.is_job_fault());
    let pe = err.to_protocol_error();
    assert_eq!(
        (pe.field.as_str(), pe.rule),
        ("source.digest", Rule::Content)
    );
    assert!(!scratch.path().join("x").exists());
}

/// A directory packs to the same digest whatever its owners, timestamps, creation order or
/// the umask of whoever made it (its group and other bits), and what is stored unpacks to
/// the same tree.
#[test]
fn source_push_packs_a_directory_deterministically() {
    let scratch = tempfile::tempdir().unwrap();
    let store = format!("oci-dir:{}", scratch.path().join("store").display());
    let make = |name: &str, reverse: bool, mtime: &str| {
        let dir = scratch.path().join(name);
        let mut files = vec![
            ("a.txt", "alpha\n"),
            ("sub/b.py", "print('b')\n"),
            ("run.sh", "#!/bin/sh\n"),
        ];
        if reverse {
            files.reverse();
        }
        for (path, text) in files {
            let path = dir.join(path);
            std::fs::create_dir_all(path.parent().unwrap()).unwrap();
            std::fs::write(&path, text).unwrap();
        }
        std::fs::set_permissions(
            dir.join("run.sh"),
            std::os::unix::fs::PermissionsExt::from_mode(0o755),
        )
        .unwrap();
        let touched = Command::new("touch")
            .args(["-h", "-d", mtime])
            .arg(dir.join("a.txt"))
            .status()
            .unwrap();
        assert!(touched.success());
        dir
    };
    let push = |dir: &Path| common::source_push(dir, &store);
    let one = push(&make("one", false, "2001-01-01"));
    let two_dir = make("two", true, "2020-02-02");
    let uid = Command::new("id").arg("-u").output().unwrap().stdout;
    if uid == b"0\n" {
        let chowned = Command::new("chown")
            .args(["-R", "4242:4343"])
            .arg(&two_dir)
            .status()
            .unwrap();
        assert!(chowned.success());
    }
    // As a checkout made under umask 002 has it.
    let writable = Command::new("chmod")
        .args(["-R", "g+w,o+w"])
        .arg(&two_dir)
        .status()
        .unwrap();
    assert!(writable.success());
    let two = push(&two_dir);
    assert_eq!(one, two, "same content, same digest");
    let digest = Digest::parse(one).unwrap();
    let blob = scratch.path().join("store/blobs/sha256").join(digest.hex());
    let listing = Command::new("tar")
        .arg("-tvzf")
        .arg(&blob)
        .output()
        .unwrap();
    let listing = String::from_utf8(listing.stdout).unwrap();
    assert!(listing.contains("sub/b.py"), "{listing}");
    assert!(
        listing.contains("-rwxr-xr-x 0/0")
            && listing.contains("-rw-r--r-- 0/0")
            && listing.contains("drwxr-xr-x 0/0"),
        "owners are 0:0 and modes as git keeps them: {listing}"
    );
}

#[test]
fn source_push_uploads_a_tarball_as_is_and_prints_its_digest() {
    let scratch = tempfile::tempdir().unwrap();
    let store_dir = scratch.path().join("store");
    let bundle = corpus().join("ok-tree.tar.gz");
    let out = corral()
        .args(["source", "push"])
        .arg(&bundle)
        .arg("--store")
        .arg(format!("oci-dir:{}", store_dir.display()))
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let printed = String::from_utf8(out.stdout).unwrap();
    let bytes = std::fs::read(&bundle).unwrap();
    let digest = sha256(&bytes);
    assert_eq!(printed.trim(), digest.as_str());
    assert_eq!(
        std::fs::read(store_dir.join("blobs/sha256").join(digest.hex())).unwrap(),
        bytes
    );
    assert!(bundle.exists(), "the user's tarball was moved");

    // Twice is fine and prints the same.
    let again = corral()
        .args(["source", "push"])
        .arg(&bundle)
        .env(
            "CORRAL_STORE_URL",
            format!("oci-dir:{}", store_dir.display()),
        )
        .output()
        .unwrap();
    assert!(again.status.success());
    assert_eq!(
        String::from_utf8(again.stdout).unwrap().trim(),
        digest.as_str()
    );
}

#[test]
fn source_push_refuses_a_hostile_tarball_with_exit_65() {
    let scratch = tempfile::tempdir().unwrap();
    let store_dir = scratch.path().join("store");
    let out = corral()
        .args(["source", "push"])
        .arg(corpus().join("symlink-then-write.tar"))
        .arg("--store")
        .arg(format!("oci-dir:{}", store_dir.display()))
        .output()
        .unwrap();
    assert_eq!(
        out.status.code(),
        Some(65),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.stdout.is_empty());
    assert!(String::from_utf8_lossy(&out.stderr).contains("symlink"));
    let blobs = std::fs::read_dir(store_dir.join("blobs/sha256"))
        .map(|d| d.count())
        .unwrap_or(0);
    assert_eq!(blobs, 0, "a refused bundle reached the store");
}

/// A docker-registry with basic auth from `scripts/registry`, killed (by pid) on drop.
struct AuthRegistry {
    _dir: tempfile::TempDir,
    addr: String,
    pid: String,
}

impl AuthRegistry {
    fn start(user_password: &str) -> Option<AuthRegistry> {
        let have = Command::new("sh")
            .args(["-c", "command -v docker-registry"])
            .output()
            .is_ok_and(|o| o.status.success());
        if !require(have, "docker-registry (apt-get install docker-registry)") {
            return None;
        }
        let dir = tempfile::tempdir().unwrap();
        let out = Command::new(Path::new(env!("CARGO_MANIFEST_DIR")).join("../scripts/registry"))
            .args(["--auth", user_password])
            .arg(dir.path())
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let text = String::from_utf8(out.stdout).unwrap();
        let get = |key: &str| {
            text.lines()
                .find_map(|l| l.strip_prefix(key))
                .unwrap_or_else(|| panic!("scripts/registry printed no {key}: {text}"))
                .to_string()
        };
        Some(AuthRegistry {
            addr: get("CORRAL_TEST_REGISTRY="),
            pid: get("CORRAL_TEST_REGISTRY_PID="),
            _dir: dir,
        })
    }
}

impl Drop for AuthRegistry {
    fn drop(&mut self) {
        let _ = Command::new("kill").arg(&self.pid).status();
    }
}

#[test]
fn source_push_to_a_registry_with_a_password_file() {
    let Some(reg) = AuthRegistry::start("producer:pushpw") else {
        return;
    };
    let scratch = tempfile::tempdir().unwrap();
    let good = scratch.path().join("good");
    std::fs::write(&good, "pushpw\n").unwrap();
    let bad = scratch.path().join("bad");
    std::fs::write(&bad, "nope\n").unwrap();
    let bundle = corpus().join("ok-tree.tar.gz");
    let push = |password_file: &Path| {
        corral()
            .args(["source", "push"])
            .arg(&bundle)
            .args([
                "--store",
                &format!("oci+http://{}/corral/sources", reg.addr),
            ])
            .args(["--username", "producer", "--password-file"])
            .arg(password_file)
            .output()
            .unwrap()
    };
    let out = push(&good);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let digest = sha256(&std::fs::read(&bundle).unwrap());
    assert_eq!(
        String::from_utf8(out.stdout).unwrap().trim(),
        digest.as_str()
    );

    let out = push(&bad);
    assert_eq!(
        out.status.code(),
        Some(75),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("refused the credentials"), "{stderr}");
    assert!(
        !stderr.contains("nope"),
        "the password leaked into the error: {stderr}"
    );
}

#[test]
fn concurrent_pushes_from_separate_processes_agree() {
    let scratch = tempfile::tempdir().unwrap();
    let store_url = format!("oci-dir:{}", scratch.path().join("store").display());
    let bundle = corpus().join("ok-tree.tar.gz");
    let children: Vec<_> = (0..6)
        .map(|_| {
            corral()
                .args(["source", "push"])
                .arg(&bundle)
                .args(["--store", &store_url])
                .stdout(std::process::Stdio::piped())
                .stderr(std::process::Stdio::piped())
                .spawn()
                .unwrap()
        })
        .collect();
    let digest = sha256(&std::fs::read(&bundle).unwrap());
    for child in children {
        let out = child.wait_with_output().unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        assert_eq!(
            String::from_utf8(out.stdout).unwrap().trim(),
            digest.as_str()
        );
    }
    let blobs: Vec<_> = std::fs::read_dir(scratch.path().join("store/blobs/sha256"))
        .unwrap()
        .flatten()
        .map(|e| e.file_name().into_string().unwrap())
        .collect();
    assert_eq!(blobs, vec![digest.hex().to_string()]);
    let leftovers = std::fs::read_dir(scratch.path().join("store/.corral/tmp"))
        .unwrap()
        .count();
    assert_eq!(leftovers, 0, "spool files left behind");
}
