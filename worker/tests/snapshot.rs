//! `corral snapshot` as users and OCI tools see it: layers read back by GNU tar, Python's
//! tarfile, umoci and skopeo; digests checked independently; determinism; and the
//! hostile-tree corpus in `fixtures/trees/`.

use std::collections::{BTreeMap, HashMap};
use std::ffi::OsString;
use std::fs;
use std::io::Write;
use std::os::unix::ffi::{OsStrExt, OsStringExt};
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use rustix::fs::{FileType, Mode, OFlags};
use serde_json::Value;
use sha2::{Digest as _, Sha256};

mod common;
use common::{have, is_root, repo, require};

/// The effective uid: /proc/self belongs to it.
fn euid() -> u32 {
    fs::metadata("/proc/self").unwrap().uid()
}

/// A scratch dir removed with `rm -rf`, which (unlike a recursive remover on the stack)
/// copes with 100 000-deep trees.
struct Scratch(PathBuf);

impl Scratch {
    fn new() -> Scratch {
        let dir = tempfile::Builder::new()
            .prefix("corral-snapshot-test.")
            .tempdir()
            .unwrap()
            .keep();
        Scratch(dir)
    }
    fn path(&self) -> &Path {
        &self.0
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = Command::new("rm").arg("-rf").arg(&self.0).status();
    }
}

struct Run {
    code: i32,
    json: Value,
    stderr: String,
}

fn snapshot(dir: &Path, output: &Path, args: &[&str]) -> Run {
    let out: Output = Command::new(env!("CARGO_BIN_EXE_corral"))
        .arg("snapshot")
        .arg(dir)
        .arg("--output")
        .arg(output)
        .args(args)
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    let json = serde_json::from_str(stdout.trim()).unwrap_or(Value::Null);
    Run {
        code: out.status.code().unwrap_or(-1),
        json,
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    }
}

fn snapshot_ok(dir: &Path, output: &Path, args: &[&str]) -> Value {
    let run = snapshot(dir, output, args);
    assert_eq!(run.code, 0, "corral snapshot failed: {}", run.stderr);
    run.json
}

fn sha256_hex(bytes: &[u8]) -> String {
    hex(&Sha256::digest(bytes))
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn sh(script: &str) -> Vec<u8> {
    let out = Command::new("sh").args(["-c", script]).output().unwrap();
    assert!(
        out.status.success(),
        "{script}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    out.stdout
}

/// One member of a layer as Python's tarfile reads it.
#[derive(Debug, Clone)]
struct Member {
    kind: String,
    mode: u32,
    size: u64,
    uid: u64,
    mtime: u64,
    link: Vec<u8>,
    sha256: Option<String>,
    xattrs: BTreeMap<String, String>,
    major: u64,
    minor: u64,
}

const LIST_PY: &str = r#"
import hashlib, json, sys, tarfile
with tarfile.open(sys.argv[1]) as t:
    for m in t:
        e = {"name": m.name.encode("utf-8", "surrogateescape").hex(), "type": m.type.decode(),
             "mode": m.mode, "size": m.size, "uid": m.uid, "mtime": int(m.mtime),
             "link": m.linkname.encode("utf-8", "surrogateescape").hex(),
             "xattrs": {k[13:]: v for k, v in m.pax_headers.items() if k.startswith("SCHILY.xattr.")},
             "major": m.devmajor, "minor": m.devminor}
        if m.isreg():
            h = hashlib.sha256()
            f = t.extractfile(m)
            while True:
                b = f.read(1 << 20)
                if not b:
                    break
                h.update(b)
            e["sha256"] = h.hexdigest()
        print(json.dumps(e))
"#;

/// Lists a gzip layer with Python's tarfile, in archive order.
fn python_list(layer: &Path) -> Vec<(Vec<u8>, Member)> {
    let out = Command::new("python3")
        .args(["-c", LIST_PY])
        .arg(layer)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "python tarfile: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout)
        .unwrap()
        .lines()
        .map(|line| {
            let v: Value = serde_json::from_str(line).unwrap();
            let unhex = |s: &str| {
                (0..s.len())
                    .step_by(2)
                    .map(|i| u8::from_str_radix(&s[i..i + 2], 16).unwrap())
                    .collect::<Vec<u8>>()
            };
            let kind = match v["type"].as_str().unwrap() {
                "0" => "file",
                "1" => "hardlink",
                "2" => "symlink",
                "3" => "char",
                "4" => "block",
                "5" => "dir",
                "6" => "fifo",
                other => panic!("unexpected tar type {other}"),
            };
            let member = Member {
                kind: kind.into(),
                mode: v["mode"].as_u64().unwrap() as u32,
                size: v["size"].as_u64().unwrap(),
                uid: v["uid"].as_u64().unwrap(),
                mtime: v["mtime"].as_u64().unwrap(),
                link: unhex(v["link"].as_str().unwrap()),
                sha256: v["sha256"].as_str().map(String::from),
                xattrs: v["xattrs"]
                    .as_object()
                    .unwrap()
                    .iter()
                    .map(|(k, v)| (k.clone(), v.as_str().unwrap().to_string()))
                    .collect(),
                major: v["major"].as_u64().unwrap(),
                minor: v["minor"].as_u64().unwrap(),
            };
            (unhex(v["name"].as_str().unwrap()), member)
        })
        .collect()
}

/// `%XX` in fixture paths stands for the byte 0xXX.
fn decode_path(s: &str) -> Vec<u8> {
    let b = s.as_bytes();
    let mut out = Vec::new();
    let mut i = 0;
    while i < b.len() {
        let byte = (b[i] == b'%' && i + 3 <= b.len())
            .then(|| std::str::from_utf8(&b[i + 1..i + 3]).ok())
            .flatten()
            .and_then(|h| u8::from_str_radix(h, 16).ok());
        match byte {
            Some(v) => {
                out.push(v);
                i += 3;
            }
            None => {
                out.push(b[i]);
                i += 1;
            }
        }
    }
    out
}

fn os(bytes: &[u8]) -> PathBuf {
    PathBuf::from(OsString::from_vec(bytes.to_vec()))
}

fn mode_of(step: &Value) -> Option<u32> {
    step["mode"]
        .as_str()
        .map(|m| u32::from_str_radix(m, 8).unwrap())
}

/// Builds one fixture tree under `root`.
fn build_tree(root: &Path, steps: &[Value]) {
    for step in steps {
        let at = |key: &str| step[key].as_str().map(|p| root.join(os(&decode_path(p))));
        if let Some(p) = at("dir") {
            fs::create_dir(&p).unwrap();
            if let Some(mode) = mode_of(step) {
                fs::set_permissions(&p, fs::Permissions::from_mode(mode)).unwrap();
            }
        } else if let Some(p) = at("file") {
            let mut f = fs::File::create(&p).unwrap();
            if let Some(content) = step["content"].as_str() {
                f.write_all(content.as_bytes()).unwrap();
            } else if let Some(size) = step["size"].as_u64() {
                f.set_len(size).unwrap();
            } else if let Some(size) = step["random"].as_u64() {
                let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
                let mut buf = Vec::with_capacity(size as usize);
                while buf.len() < size as usize {
                    x ^= x << 13;
                    x ^= x >> 7;
                    x ^= x << 17;
                    buf.extend_from_slice(&x.to_le_bytes());
                }
                buf.truncate(size as usize);
                f.write_all(&buf).unwrap();
            }
            drop(f);
            if let Some(mode) = mode_of(step) {
                fs::set_permissions(&p, fs::Permissions::from_mode(mode)).unwrap();
            }
        } else if let Some(p) = at("symlink") {
            let target = decode_path(step["target"].as_str().unwrap());
            std::os::unix::fs::symlink(os(&target), &p).unwrap();
        } else if let Some(p) = at("hardlink") {
            let to = at("to").unwrap();
            fs::hard_link(&to, &p).unwrap();
        } else if let Some(p) = at("fifo") {
            rustix::fs::mknodat(
                rustix::fs::CWD,
                &p,
                FileType::Fifo,
                Mode::from_raw_mode(0o644),
                0,
            )
            .unwrap();
        } else if let Some(p) = at("socket") {
            // The listener is dropped at once; the socket file stays.
            std::os::unix::net::UnixListener::bind(&p).unwrap();
        } else if let Some(p) = at("device") {
            let kind = match step["kind"].as_str().unwrap() {
                "char" => FileType::CharacterDevice,
                "block" => FileType::BlockDevice,
                other => panic!("unknown device kind {other}"),
            };
            let dev = rustix::fs::makedev(
                step["major"].as_u64().unwrap() as u32,
                step["minor"].as_u64().unwrap() as u32,
            );
            rustix::fs::mknodat(rustix::fs::CWD, &p, kind, Mode::from_raw_mode(0o644), dev)
                .unwrap();
        } else if let Some(p) = at("xattr") {
            let name = step["name"].as_str().unwrap();
            let value = step["value"].as_str().unwrap();
            rustix::fs::lsetxattr(&p, name, value.as_bytes(), rustix::fs::XattrFlags::empty())
                .unwrap();
        } else if let Some(p) = at("deep") {
            fs::create_dir(&p).unwrap();
            // fd-relative, one open fd at a time: the path quickly passes PATH_MAX.
            let mut fd =
                rustix::fs::open(&p, OFlags::DIRECTORY | OFlags::RDONLY, Mode::empty()).unwrap();
            for _ in 1..step["depth"].as_u64().unwrap() {
                rustix::fs::mkdirat(&fd, "d", Mode::from_raw_mode(0o755)).unwrap();
                fd =
                    rustix::fs::openat(&fd, "d", OFlags::DIRECTORY | OFlags::RDONLY, Mode::empty())
                        .unwrap();
            }
        } else if let Some(p) = at("many") {
            fs::create_dir(&p).unwrap();
            for i in 0..step["count"].as_u64().unwrap() {
                fs::write(p.join(format!("f{i:06}")), b"x").unwrap();
            }
        } else {
            panic!("unknown build step {step}");
        }
    }
}

#[test]
fn hostile_tree_corpus() {
    let dir = repo().join("fixtures/trees");
    let mut cases: Vec<PathBuf> = fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "json"))
        .collect();
    cases.sort();
    assert!(cases.len() >= 15, "the corpus is in {}", dir.display());
    if !require(have("python3"), "python3") {
        return;
    }
    let mut failures = Vec::new();
    for case in &cases {
        let name = case.file_stem().unwrap().to_string_lossy().into_owned();
        let spec: Value = serde_json::from_slice(&fs::read(case).unwrap()).unwrap();
        if spec["needs_root"].as_bool().unwrap_or(false)
            && !require(is_root(), &format!("root, for fixture {name}"))
        {
            continue;
        }
        eprintln!("fixture {name}");
        if let Err(why) = std::panic::catch_unwind(|| run_fixture(&spec)) {
            let why = why
                .downcast_ref::<String>()
                .cloned()
                .or_else(|| why.downcast_ref::<&str>().map(|s| s.to_string()))
                .unwrap_or_default();
            failures.push(format!("{name}: {why}"));
        }
    }
    assert!(
        failures.is_empty(),
        "fixtures failed:\n{}",
        failures.join("\n")
    );
}

fn run_fixture(spec: &Value) {
    let scratch = Scratch::new();
    let tree = scratch.path().join("tree");
    fs::create_dir(&tree).unwrap();
    build_tree(&tree, spec["build"].as_array().unwrap());
    let layer = scratch.path().join("layer.tar.gz");
    let args: Vec<&str> = spec["args"]
        .as_array()
        .unwrap()
        .iter()
        .map(|a| a.as_str().unwrap())
        .collect();
    let run = snapshot(&tree, &layer, &args);
    let expect = &spec["expect"];
    if expect["outcome"] == "error" {
        assert_eq!(
            run.json["error"], expect["error"],
            "expected error {}, got {} / {}",
            expect["error"], run.json, run.stderr
        );
        assert_eq!(i64::from(run.code), expect["exit"].as_i64().unwrap());
        assert!(!layer.exists(), "no layer may be left behind on failure");
        return;
    }
    assert_eq!(run.code, 0, "snapshot failed: {}", run.stderr);
    let members = python_list(&layer);
    // GNU tar must accept the same layer.
    sh(&format!("tar -tzf '{}' >/dev/null", layer.display()));
    assert_eq!(
        run.json["entries"].as_u64().unwrap(),
        members.len() as u64,
        "reported entries vs tar members"
    );
    if let Some(count) = expect["count"].as_u64() {
        assert_eq!(members.len() as u64, count, "tar member count");
    }
    let by_name: HashMap<Vec<u8>, Member> = members.into_iter().collect();
    for e in expect["entries"].as_array().unwrap() {
        let path = decode_path(e["path"].as_str().unwrap());
        let shown = String::from_utf8_lossy(&path).into_owned();
        let m = by_name
            .get(&path)
            .unwrap_or_else(|| panic!("{shown:?} missing from the layer"));
        assert_eq!(m.kind, e["type"].as_str().unwrap(), "{shown:?} type");
        if let Some(mode) = mode_of(e) {
            assert_eq!(m.mode, mode, "{shown:?} mode {:o}", m.mode);
        }
        if let Some(link) = e["link"].as_str() {
            assert_eq!(m.link, decode_path(link), "{shown:?} link target");
        }
        if let Some(content) = e["content"].as_str() {
            assert_eq!(
                m.sha256.as_deref(),
                Some(sha256_hex(content.as_bytes()).as_str()),
                "{shown:?} content"
            );
        }
        if let Some(size) = e["size"].as_u64() {
            assert_eq!(m.size, size, "{shown:?} size");
            if e["zeros"].as_bool() == Some(true) {
                let mut h = Sha256::new();
                let zeros = vec![0u8; 1 << 20];
                let mut left = size;
                while left > 0 {
                    let n = left.min(zeros.len() as u64) as usize;
                    h.update(&zeros[..n]);
                    left -= n as u64;
                }
                assert_eq!(m.sha256.as_deref(), Some(hex(&h.finalize()).as_str()));
            }
        }
        if let Some(xattrs) = e["xattrs"].as_object() {
            let want: BTreeMap<String, String> = xattrs
                .iter()
                .map(|(k, v)| (k.clone(), v.as_str().unwrap().to_string()))
                .collect();
            assert_eq!(m.xattrs, want, "{shown:?} xattrs");
        }
        if let Some(uid) = e["uid"].as_u64() {
            assert_eq!(m.uid, uid, "{shown:?} uid");
        }
        if let Some(major) = e["major"].as_u64() {
            assert_eq!((m.major, m.minor), (major, e["minor"].as_u64().unwrap()));
        }
    }
    for absent in expect["absent"].as_array().unwrap() {
        let path = decode_path(absent.as_str().unwrap());
        assert!(
            !by_name.contains_key(&path),
            "{absent} must not be in the layer"
        );
    }
    let mut skipped: Vec<(String, String)> = run.json["skipped"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| {
            (
                s["path"].as_str().unwrap().to_string(),
                s["reason"].as_str().unwrap().to_string(),
            )
        })
        .collect();
    skipped.sort();
    let mut want: Vec<(String, String)> = expect["skipped"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| {
            let pair = p.as_array().unwrap();
            (
                pair[0].as_str().unwrap().to_string(),
                pair[1].as_str().unwrap().to_string(),
            )
        })
        .collect();
    want.sort();
    assert_eq!(skipped, want, "skipped entries");
    assert_eq!(run.json["setid_stripped"], expect["setid_stripped"]);
}

/// One way of adding to a tree.
type Step = Box<dyn Fn(&Path)>;

/// A small but varied tree with known content.
fn sample_tree(root: &Path, reverse: bool) {
    let mut steps: Vec<Step> = vec![
        Box::new(|r| fs::create_dir_all(r.join("lib/python3/site-packages/pkg")).unwrap()),
        Box::new(|r| fs::write(r.join("README"), b"hello layer\n").unwrap()),
        Box::new(|r| {
            fs::create_dir_all(r.join("bin")).unwrap();
            fs::write(r.join("bin/tool"), b"#!/bin/sh\necho tool\n").unwrap();
            fs::set_permissions(r.join("bin/tool"), fs::Permissions::from_mode(0o755)).unwrap();
        }),
        Box::new(|r| {
            fs::create_dir_all(r.join("lib/python3/site-packages/pkg")).unwrap();
            let big: Vec<u8> = (0..3_000_000u32).map(|i| (i * 7 % 251) as u8).collect();
            fs::write(r.join("lib/python3/site-packages/pkg/data.bin"), big).unwrap();
            fs::write(
                r.join("lib/python3/site-packages/pkg/__init__.py"),
                b"VERSION = 1\n",
            )
            .unwrap();
        }),
        Box::new(|r| {
            fs::create_dir_all(r.join("bin")).unwrap();
            std::os::unix::fs::symlink("tool", r.join("bin/alias")).unwrap();
        }),
        Box::new(|r| {
            fs::write(r.join("private"), b"secret-ish").unwrap();
            fs::set_permissions(r.join("private"), fs::Permissions::from_mode(0o600)).unwrap();
        }),
    ];
    if reverse {
        steps.reverse();
    }
    for step in &steps {
        step(root);
    }
}

/// Names, modes, link targets and content hashes of a tree on disk.
fn describe(root: &Path) -> BTreeMap<Vec<u8>, (String, u32, String)> {
    let mut out = BTreeMap::new();
    let mut stack = vec![PathBuf::new()];
    while let Some(rel) = stack.pop() {
        for entry in fs::read_dir(root.join(&rel)).unwrap() {
            let entry = entry.unwrap();
            let rel = rel.join(entry.file_name());
            let meta = fs::symlink_metadata(entry.path()).unwrap();
            let mode = meta.mode() & 0o7777;
            let key = rel.as_os_str().as_bytes().to_vec();
            let value = if meta.is_dir() {
                stack.push(rel);
                ("dir".into(), mode, String::new())
            } else if meta.file_type().is_symlink() {
                let t = fs::read_link(entry.path()).unwrap();
                ("symlink".into(), mode, t.to_string_lossy().into_owned())
            } else if !meta.is_file() {
                ("special".into(), mode, String::new())
            } else {
                let data = fs::read(entry.path()).unwrap();
                ("file".into(), mode, sha256_hex(&data))
            };
            out.insert(key, value);
        }
    }
    out
}

#[test]
fn gnu_tar_and_python_read_back_the_tree() {
    if !require(have("tar") && have("python3"), "GNU tar and python3") {
        return;
    }
    let scratch = Scratch::new();
    let tree = scratch.path().join("tree");
    fs::create_dir(&tree).unwrap();
    sample_tree(&tree, false);
    let layer = scratch.path().join("layer.tar.gz");
    snapshot_ok(&tree, &layer, &["--plain"]);

    let extracted = scratch.path().join("gnu");
    fs::create_dir(&extracted).unwrap();
    sh(&format!(
        "tar --numeric-owner -xpzf '{}' -C '{}'",
        layer.display(),
        extracted.display()
    ));
    assert_eq!(describe(&extracted), describe(&tree), "GNU tar extraction");

    let listed: BTreeMap<Vec<u8>, (String, u32, String)> = python_list(&layer)
        .into_iter()
        .map(|(name, m)| {
            let detail = match m.kind.as_str() {
                "file" => m.sha256.clone().unwrap(),
                "symlink" => String::from_utf8(m.link.clone()).unwrap(),
                _ => String::new(),
            };
            assert_eq!(m.mtime, 0, "mtimes are clamped to the epoch (0)");
            assert_eq!(m.uid, u64::from(euid()));
            (name, (m.kind, m.mode, detail))
        })
        .collect();
    assert_eq!(listed, describe(&tree), "Python tarfile listing");
}

/// The pipeline's first layer: a real Debian rootfs snapshotted in plain mode reads back
/// (GNU tar) as the same tree, minus the device nodes it reports as skipped.
#[test]
fn base_rootfs_becomes_a_plain_layer() {
    let rootfs = PathBuf::from(
        std::env::var("CORRAL_TEST_ROOTFS")
            .unwrap_or_else(|_| "/var/cache/corral-test/rootfs".into()),
    );
    if !require(rootfs.is_dir(), "the test rootfs (CORRAL_TEST_ROOTFS)")
        || !require(is_root(), "root (to extract a rootfs faithfully)")
        || !require(have("tar"), "GNU tar")
    {
        return;
    }
    let scratch = Scratch::new();
    let layer = scratch.path().join("base.tgz");
    let json = snapshot_ok(&rootfs, &layer, &["--plain", "--keep-setid"]);
    let skipped: Vec<Vec<u8>> = json["skipped"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| {
            assert_eq!(s["reason"], "device", "{s}");
            s["path"].as_str().unwrap().as_bytes().to_vec()
        })
        .collect();
    assert!(
        skipped.contains(&b"dev/null".to_vec()),
        "devices are skipped: {skipped:?}"
    );
    let extracted = scratch.path().join("x");
    fs::create_dir(&extracted).unwrap();
    sh(&format!(
        "tar --numeric-owner -xpzf '{}' -C '{}'",
        layer.display(),
        extracted.display()
    ));
    let mut want = describe(&rootfs);
    for path in &skipped {
        assert_eq!(want.remove(path).map(|v| v.0), Some("special".to_string()));
    }
    assert_eq!(describe(&extracted), want);
}

#[test]
fn digests_are_independently_verifiable() {
    if !require(
        have("gzip") && have("zstd") && have("sha256sum"),
        "gzip, zstd and sha256sum",
    ) {
        return;
    }
    let scratch = Scratch::new();
    let tree = scratch.path().join("tree");
    fs::create_dir(&tree).unwrap();
    sample_tree(&tree, false);
    for (compression, decompress, media) in [
        (
            "gzip",
            "gzip -dc",
            "application/vnd.oci.image.layer.v1.tar+gzip",
        ),
        (
            "zstd",
            "zstd -dc",
            "application/vnd.oci.image.layer.v1.tar+zstd",
        ),
    ] {
        let layer = scratch.path().join(format!("layer.{compression}"));
        let json = snapshot_ok(&tree, &layer, &["--plain", "--compression", compression]);
        let blob = fs::read(&layer).unwrap();
        let tar = sh(&format!("{decompress} '{}'", layer.display()));
        assert_eq!(json["media_type"], media);
        assert_eq!(json["size"].as_u64().unwrap(), blob.len() as u64);
        assert_eq!(json["tar_size"].as_u64().unwrap(), tar.len() as u64);
        assert_eq!(
            json["digest"].as_str().unwrap(),
            format!("sha256:{}", sha256_hex(&blob))
        );
        assert_eq!(
            json["diff_id"].as_str().unwrap(),
            format!("sha256:{}", sha256_hex(&tar)),
            "diff_id is the sha256 of the uncompressed tar ({compression})"
        );
    }
}

#[test]
fn same_content_gives_same_digest_whatever_its_history_or_threads() {
    let scratch = Scratch::new();
    let a = scratch.path().join("a");
    let b = scratch.path().join("b");
    fs::create_dir(&a).unwrap();
    fs::create_dir(&b).unwrap();
    sample_tree(&a, false);
    // Different creation order, later times, different inode numbers and readdir order.
    std::thread::sleep(std::time::Duration::from_millis(1100));
    sample_tree(&b, true);
    let epoch = "1700000000";
    for compression in ["gzip", "zstd"] {
        let mut digests = Vec::new();
        for (tree, threads) in [(&a, "1"), (&a, "2"), (&b, "2"), (&b, "3")] {
            let out = scratch
                .path()
                .join(format!("{compression}-{threads}-{}.layer", digests.len()));
            let json = snapshot_ok(
                tree,
                &out,
                &[
                    "--plain",
                    "--compression",
                    compression,
                    "--threads",
                    threads,
                    "--epoch",
                    epoch,
                ],
            );
            digests.push((json["digest"].clone(), json["diff_id"].clone()));
        }
        assert!(
            digests.windows(2).all(|w| w[0] == w[1]),
            "{compression}: {digests:?}"
        );
    }
}

/// Enough data for many gzip blocks and several zstd jobs, so the workers really split one
/// big file; the gzip blob (a member per block) is one file to `gzip -t` and `tar -tz`.
#[test]
fn large_layers_are_byte_identical_for_any_thread_count() {
    let scratch = Scratch::new();
    let tree = scratch.path().join("tree");
    fs::create_dir(&tree).unwrap();
    let mut x: u64 = 7;
    let data: Vec<u8> = (0..48 << 20)
        .map(|i: u32| {
            x = x.wrapping_mul(6_364_136_223_846_793_005).wrapping_add(1);
            // Text-like: mostly a small alphabet, some noise.
            if i.is_multiple_of(5) {
                (x >> 56) as u8
            } else {
                b"abcdefgh\n "[(x >> 60) as usize % 10]
            }
        })
        .collect();
    fs::write(tree.join("big"), &data).unwrap();
    for compression in ["gzip", "zstd"] {
        let digests: Vec<Value> = ["1", "2", "4"]
            .iter()
            .map(|threads| {
                let out = scratch.path().join(format!("{compression}-{threads}"));
                let args = [
                    "--plain",
                    "--compression",
                    compression,
                    "--threads",
                    threads,
                ];
                let digest = snapshot_ok(&tree, &out, &args)["digest"].clone();
                let bytes = fs::read(&out).unwrap();
                assert_eq!(format!("sha256:{}", sha256_hex(&bytes)), digest);
                if compression == "gzip" && require(have("gzip"), "gzip") {
                    let test = Command::new("gzip").arg("-t").arg(&out).output().unwrap();
                    assert!(test.status.success(), "gzip -t: {test:?}");
                    let list = Command::new("tar").arg("-tzvf").arg(&out).output().unwrap();
                    assert!(list.status.success(), "tar -tz: {list:?}");
                    let listing = String::from_utf8_lossy(&list.stdout);
                    assert!(listing.contains(&format!(" {} ", data.len())), "{listing}");
                    assert!(listing.trim_end().ends_with(" big"), "{listing}");
                }
                digest
            })
            .collect();
        assert!(
            digests.windows(2).all(|w| w[0] == w[1]),
            "{compression}: {digests:?}"
        );
    }
}

/// An OCI image layout with the given layers (blobs already written under `blobs/sha256`).
fn write_image(layout: &Path, layers: &[(Value, Vec<u8>)]) {
    let blobs = layout.join("blobs/sha256");
    fs::create_dir_all(&blobs).unwrap();
    let put = |bytes: &[u8]| {
        let hex = sha256_hex(bytes);
        fs::write(blobs.join(&hex), bytes).unwrap();
        (format!("sha256:{hex}"), bytes.len())
    };
    for (_, blob) in layers {
        put(blob);
    }
    let config = serde_json::json!({
        "architecture": "amd64",
        "os": "linux",
        "config": {},
        "rootfs": {
            "type": "layers",
            "diff_ids": layers.iter().map(|(s, _)| s["diff_id"].clone()).collect::<Vec<_>>(),
        },
    });
    let (config_digest, config_size) = put(&serde_json::to_vec(&config).unwrap());
    let manifest = serde_json::json!({
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "config": {
            "mediaType": "application/vnd.oci.image.config.v1+json",
            "digest": config_digest,
            "size": config_size,
        },
        "layers": layers.iter().map(|(s, _)| serde_json::json!({
            "mediaType": s["media_type"],
            "digest": s["digest"],
            "size": s["size"],
        })).collect::<Vec<_>>(),
    });
    let (manifest_digest, manifest_size) = put(&serde_json::to_vec(&manifest).unwrap());
    let index = serde_json::json!({
        "schemaVersion": 2,
        "manifests": [{
            "mediaType": "application/vnd.oci.image.manifest.v1+json",
            "digest": manifest_digest,
            "size": manifest_size,
            "annotations": {"org.opencontainers.image.ref.name": "test"},
        }],
    });
    fs::write(
        layout.join("index.json"),
        serde_json::to_vec(&index).unwrap(),
    )
    .unwrap();
    fs::write(
        layout.join("oci-layout"),
        br#"{"imageLayoutVersion":"1.0.0"}"#,
    )
    .unwrap();
}

fn mount_overlay(lower: &Path, upper: &Path, work: &Path, merged: &Path) -> bool {
    Command::new("mount")
        .args(["-t", "overlay", "overlay", "-o"])
        .arg(format!(
            "lowerdir={},upperdir={},workdir={},redirect_dir=off,metacopy=off",
            lower.display(),
            upper.display(),
            work.display()
        ))
        .arg(merged)
        .status()
        .is_ok_and(|s| s.success())
}

/// A real overlay: the job deletes base files and replaces a base directory; the upper dir's
/// layer, stacked on the base's, unpacks (umoci) to exactly the merged view.
#[test]
fn umoci_unpacks_base_plus_upper_layer_from_a_real_overlay() {
    if !require(is_root(), "root (overlay mount, umoci unpack)")
        || !require(have("umoci"), "umoci")
        || !require(have("skopeo"), "skopeo")
    {
        return;
    }
    let scratch = Scratch::new();
    let p = |n: &str| {
        let d = scratch.path().join(n);
        fs::create_dir_all(&d).unwrap();
        d
    };
    let (lower, upper, work, merged) = (p("lower"), p("upper"), p("work"), p("merged"));
    fs::write(lower.join("keep"), b"base keep\n").unwrap();
    fs::write(lower.join("doomed"), b"base doomed\n").unwrap();
    fs::create_dir_all(lower.join("cache/deep")).unwrap();
    fs::write(lower.join("cache/old"), b"old\n").unwrap();
    fs::write(lower.join("cache/deep/older"), b"older\n").unwrap();
    fs::create_dir_all(lower.join("etc")).unwrap();
    fs::write(lower.join("etc/conf"), b"v1\n").unwrap();

    assert!(
        mount_overlay(&lower, &upper, &work, &merged),
        "mounting overlay"
    );
    let job = || -> std::io::Result<()> {
        fs::remove_file(merged.join("doomed"))?;
        fs::remove_dir_all(merged.join("cache"))?;
        fs::create_dir(merged.join("cache"))?;
        fs::write(merged.join("cache/new"), b"new\n")?;
        fs::write(merged.join("etc/conf"), b"v2\n")?;
        fs::write(merged.join("built"), b"artifact\n")?;
        Ok(())
    };
    let result = job();
    let merged_view = describe(&merged);
    assert!(
        Command::new("umount")
            .arg(&merged)
            .status()
            .unwrap()
            .success()
    );
    result.unwrap();

    let base_layer = scratch.path().join("base.tgz");
    let base = snapshot_ok(&lower, &base_layer, &["--plain"]);
    let upper_layer = scratch.path().join("upper.tgz");
    let top = snapshot_ok(&upper, &upper_layer, &[]);
    let names: Vec<Vec<u8>> = python_list(&upper_layer)
        .into_iter()
        .map(|(n, _)| n)
        .collect();
    assert!(names.contains(&b".wh.doomed".to_vec()), "{names:?}");
    assert!(names.contains(&b"cache/.wh..wh..opq".to_vec()), "{names:?}");

    let layout = scratch.path().join("image");
    write_image(
        &layout,
        &[
            (base, fs::read(&base_layer).unwrap()),
            (top, fs::read(&upper_layer).unwrap()),
        ],
    );
    let bundle = scratch.path().join("bundle");
    sh(&format!(
        "umoci unpack --image '{}:test' '{}'",
        layout.display(),
        bundle.display()
    ));
    let rootfs = bundle.join("rootfs");
    assert!(
        !rootfs.join("doomed").exists(),
        "whiteout removed the base file"
    );
    assert!(
        !rootfs.join("cache/old").exists(),
        "opaque dir hides base files"
    );
    assert!(
        !rootfs.join("cache/deep").exists(),
        "opaque dir hides base dirs"
    );
    assert_eq!(fs::read(rootfs.join("cache/new")).unwrap(), b"new\n");
    assert_eq!(fs::read(rootfs.join("keep")).unwrap(), b"base keep\n");
    assert_eq!(fs::read(rootfs.join("etc/conf")).unwrap(), b"v2\n");
    assert_eq!(
        describe(&rootfs),
        merged_view,
        "unpacked image = merged overlay view"
    );

    // skopeo verifies every blob against its digest while copying.
    let copied = scratch.path().join("copied");
    sh(&format!(
        "skopeo copy --quiet oci:'{}':test dir:'{}'",
        layout.display(),
        copied.display()
    ));
}
