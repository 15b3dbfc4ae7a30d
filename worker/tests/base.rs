//! `corral base`: import, list, show, concurrent creation, hostile tarballs and a real
//! debootstrap build, all through the real `corral` binary and real GNU tar.

use std::collections::BTreeMap;
use std::fs;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};

use serde_json::Value;

mod common;
use common::{is_root, repo, require};

fn corral(args: &[&str], data: &Path) -> Output {
    common::corral()
        .args(args)
        .arg("--data-dir")
        .arg(data)
        .output()
        .expect("running corral")
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

const PYTHON: &str = "#!not really python\n";

/// A small root filesystem with the kinds of entries a real one has.
fn make_tree(root: &Path) {
    for dir in [
        "usr/bin",
        "usr/lib/python3.11",
        "etc/alternatives",
        "var/lib/private",
    ] {
        fs::create_dir_all(root.join(dir)).unwrap();
    }
    let python = root.join("usr/bin/python3.11");
    fs::write(&python, PYTHON).unwrap();
    fs::set_permissions(&python, fs::Permissions::from_mode(0o755)).unwrap();
    fs::write(root.join("usr/bin/su"), "setuid\n").unwrap();
    fs::set_permissions(root.join("usr/bin/su"), fs::Permissions::from_mode(0o4755)).unwrap();
    fs::hard_link(&python, root.join("usr/bin/python3.11-hl")).unwrap();
    fs::write(
        root.join("usr/lib/python3.11/os.py"),
        "import sys\n".repeat(100),
    )
    .unwrap();
    fs::write(root.join("etc/os-release"), "ID=test\n").unwrap();
    std::os::unix::fs::symlink("/usr/bin/python3.11", root.join("etc/alternatives/python"))
        .unwrap();
    std::os::unix::fs::symlink("usr/bin", root.join("bin")).unwrap();
    fs::set_permissions(
        root.join("var/lib/private"),
        fs::Permissions::from_mode(0o700),
    )
    .unwrap();
    let when = filetime::FileTime::from_unix_time(1_700_000_000, 0);
    filetime::set_file_mtime(root.join("etc/os-release"), when).unwrap();
}

fn gnu_tar(src: &Path, out: &Path, gzip: bool) {
    let status = Command::new("tar")
        .arg("--numeric-owner")
        .arg("-C")
        .arg(src)
        .arg(if gzip { "-czf" } else { "-cf" })
        .arg(out)
        .arg(".")
        .status()
        .expect("running GNU tar");
    assert!(status.success());
}

fn list_json(data: &Path) -> Vec<Value> {
    let out = corral(&["base", "list", "--json"], data);
    assert!(out.status.success(), "{}", text(&out.stderr));
    match serde_json::from_slice::<Value>(&out.stdout).unwrap() {
        Value::Array(items) => items,
        other => panic!("base list --json printed {other}"),
    }
}

/// Builds or old bases left in the bases dir (anything but complete bases and lock files).
fn leftovers(data: &Path) -> Vec<String> {
    fs::read_dir(data.join("bases"))
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n.starts_with(".build-") || n.starts_with(".old-"))
        .collect()
}

#[test]
fn imports_a_rootfs_tarball_and_lists_it() {
    let tmp = tempfile::tempdir().unwrap();
    let (src, data, tarball) = (
        tmp.path().join("src"),
        tmp.path().join("data"),
        tmp.path().join("tree.tar.gz"),
    );
    make_tree(&src);
    gnu_tar(&src, &tarball, true);

    let out = corral(
        &["base", "import", "tiny", tarball.to_str().unwrap()],
        &data,
    );
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert!(
        text(&out.stdout).starts_with("base tiny: "),
        "{}",
        text(&out.stdout)
    );

    let rootfs = data.join("bases/tiny/rootfs");
    assert_eq!(
        fs::read_to_string(rootfs.join("usr/lib/python3.11/os.py")).unwrap(),
        "import sys\n".repeat(100)
    );
    assert_eq!(
        fs::read_link(rootfs.join("etc/alternatives/python")).unwrap(),
        Path::new("/usr/bin/python3.11")
    );
    assert_eq!(
        fs::read_link(rootfs.join("bin")).unwrap(),
        Path::new("usr/bin")
    );
    let python = fs::metadata(rootfs.join("usr/bin/python3.11")).unwrap();
    let linked = fs::metadata(rootfs.join("usr/bin/python3.11-hl")).unwrap();
    assert_eq!(python.ino(), linked.ino(), "hard links stay hard links");
    assert_eq!(python.mode() & 0o7777, 0o755);
    assert_eq!(
        fs::metadata(rootfs.join("var/lib/private")).unwrap().mode() & 0o7777,
        0o700
    );
    if is_root() {
        assert_eq!(
            fs::metadata(rootfs.join("usr/bin/su")).unwrap().mode() & 0o7777,
            0o4755
        );
    }
    assert_eq!(
        fs::metadata(rootfs.join("etc/os-release")).unwrap().mtime(),
        1_700_000_000
    );

    let bases = list_json(&data);
    assert_eq!(bases.len(), 1);
    let base = &bases[0];
    assert_eq!(base["name"], "tiny");
    // 9 directories, 4 files and a hard link to one of them, 2 symlinks.
    assert_eq!(base["files"], 16, "{base}");
    let size = PYTHON.len() + "setuid\n".len() + 1100 + "ID=test\n".len();
    assert_eq!(base["size"], size as u64, "hard-linked content counts once");
    let origin = &base["created"]["origin"];
    assert_eq!(origin["kind"], "import");
    assert_eq!(origin["format"], "rootfs_tar");
    let sha = Command::new("sha256sum").arg(&tarball).output().unwrap();
    let sha = text(&sha.stdout);
    assert_eq!(
        origin["sha256"],
        format!("sha256:{}", sha.split_whitespace().next().unwrap())
    );
    // The base's layer is computed once, at import: its blob sits beside the rootfs and is
    // what its digest says, and its tar is what diff_id says.
    let layer = &base["layer"];
    assert_eq!(
        layer["media_type"],
        "application/vnd.oci.image.layer.v1.tar+gzip"
    );
    let blob = data.join("bases/tiny/layer.tar.gz");
    let sha = Command::new("sha256sum").arg(&blob).output().unwrap();
    assert_eq!(
        layer["digest"],
        format!(
            "sha256:{}",
            text(&sha.stdout).split_whitespace().next().unwrap()
        )
    );
    assert_eq!(layer["size"], fs::metadata(&blob).unwrap().len());
    let tar = Command::new("sh")
        .arg("-c")
        .arg(format!("gzip -dc {} | sha256sum", blob.display()))
        .output()
        .unwrap();
    assert_eq!(
        layer["diff_id"],
        format!(
            "sha256:{}",
            text(&tar.stdout).split_whitespace().next().unwrap()
        )
    );

    let table = corral(&["base", "list"], &data);
    let table = text(&table.stdout);
    assert!(table.starts_with("NAME"), "{table}");
    assert!(
        table.lines().nth(1).unwrap().starts_with("tiny "),
        "{table}"
    );
    assert!(leftovers(&data).is_empty());
}

#[test]
fn imports_a_single_layer_image_archive() {
    let tmp = tempfile::tempdir().unwrap();
    let (src, image, archive) = (
        tmp.path().join("src"),
        tmp.path().join("image"),
        tmp.path().join("image.tar"),
    );
    make_tree(&src);
    // A `docker save` style archive: manifest.json naming one layer tarball.
    fs::create_dir_all(image.join("abc")).unwrap();
    gnu_tar(&src, &image.join("abc/layer.tar"), false);
    fs::write(image.join("abc.json"), "{}").unwrap();
    fs::write(
        image.join("manifest.json"),
        r#"[{"Config":"abc.json","RepoTags":["t:1"],"Layers":["abc/layer.tar"]}]"#,
    )
    .unwrap();
    gnu_tar(&image, &archive, false);

    let data = tmp.path().join("data");
    let out = corral(&["base", "import", "img", archive.to_str().unwrap()], &data);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let base = &list_json(&data)[0];
    assert_eq!(base["created"]["origin"]["format"], "docker_archive");
    assert!(data.join("bases/img/rootfs/usr/bin/python3.11").is_file());
    assert!(!data.join("bases/img/rootfs/manifest.json").exists());
}

fn run(command: &mut Command) {
    let out = command.output().expect("running a tool");
    assert!(out.status.success(), "{command:?}: {}", text(&out.stderr));
}

/// An OCI image made by umoci, tarred: one layer imports, two are refused.
#[test]
fn imports_a_single_layer_oci_archive_and_refuses_more_layers() {
    let umoci = Command::new("umoci").arg("--version").output().is_ok();
    if !require(umoci, "umoci") {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let (layout, bundle) = (tmp.path().join("layout"), tmp.path().join("bundle"));
    let image = format!("{}:t", layout.display());
    run(Command::new("umoci")
        .arg("init")
        .arg("--layout")
        .arg(&layout));
    run(Command::new("umoci").args(["new", "--image", &image]));
    run(Command::new("umoci")
        .args(["unpack", "--rootless", "--image", &image])
        .arg(&bundle));
    make_tree(&bundle.join("rootfs"));
    run(Command::new("umoci")
        .args(["repack", "--image", &image])
        .arg(&bundle));
    let one_layer = tmp.path().join("one.tar");
    gnu_tar(&layout, &one_layer, false);

    let data = tmp.path().join("data");
    let out = corral(
        &["base", "import", "oci", one_layer.to_str().unwrap()],
        &data,
    );
    assert!(out.status.success(), "{}", text(&out.stderr));
    let base = &list_json(&data)[0];
    assert_eq!(base["created"]["origin"]["format"], "oci_archive");
    let rootfs = data.join("bases/oci/rootfs");
    assert_eq!(
        fs::read_link(rootfs.join("etc/alternatives/python")).unwrap(),
        Path::new("/usr/bin/python3.11")
    );
    assert!(!rootfs.join("index.json").exists());

    // A repack adds one layer to the image its bundle was unpacked from.
    let bundle2 = tmp.path().join("bundle2");
    run(Command::new("umoci")
        .args(["unpack", "--rootless", "--image", &image])
        .arg(&bundle2));
    fs::write(bundle2.join("rootfs/etc/second"), "layer two\n").unwrap();
    run(Command::new("umoci")
        .args(["repack", "--image", &image])
        .arg(&bundle2));
    let two_layers = tmp.path().join("two.tar");
    gnu_tar(&layout, &two_layers, false);
    let out = corral(
        &["base", "import", "oci2", two_layers.to_str().unwrap()],
        &data,
    );
    assert_eq!(out.status.code(), Some(65));
    assert!(
        text(&out.stderr).contains("the image has 2 layers; only single-layer images"),
        "{}",
        text(&out.stderr)
    );
}

#[test]
fn an_unknown_base_is_an_error_listing_the_available_ones() {
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("data");
    let out = corral(&["base", "show", "nope"], &data);
    assert_eq!(out.status.code(), Some(65));
    assert!(
        text(&out.stderr).contains("unknown base \"nope\"; there are no bases"),
        "{}",
        text(&out.stderr)
    );

    let src = tmp.path().join("src");
    make_tree(&src);
    let tarball = tmp.path().join("t.tar");
    gnu_tar(&src, &tarball, false);
    for name in ["python-3.11", "alpha"] {
        let out = corral(&["base", "import", name, tarball.to_str().unwrap()], &data);
        assert!(out.status.success(), "{}", text(&out.stderr));
    }
    let out = corral(&["base", "show", "python-3.12"], &data);
    assert_eq!(out.status.code(), Some(65));
    assert_eq!(
        text(&out.stderr).trim(),
        "corral: error: unknown base \"python-3.12\"; available: alpha, python-3.11"
    );
    let out = corral(&["base", "show", "alpha", "--json"], &data);
    assert!(out.status.success());
    let info: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(info["name"], "alpha");

    // Names are validated before anything touches the disk.
    let out = corral(&["base", "show", "../etc"], &data);
    assert_eq!(out.status.code(), Some(2));
}

#[test]
fn concurrent_creations_of_one_name_are_safe() {
    let tmp = tempfile::tempdir().unwrap();
    let (src, data, tarball) = (
        tmp.path().join("src"),
        tmp.path().join("data"),
        tmp.path().join("t.tar"),
    );
    make_tree(&src);
    // Enough files that the creations overlap.
    for i in 0..1500 {
        fs::write(
            src.join(format!("usr/lib/python3.11/m{i}.py")),
            format!("x = {i}\n"),
        )
        .unwrap();
    }
    gnu_tar(&src, &tarball, false);
    let run_together = |count: usize, replace: bool| -> Vec<Output> {
        let children: Vec<_> = (0..count)
            .map(|_| {
                let mut command = Command::new(env!("CARGO_BIN_EXE_corral"));
                command
                    .args(["base", "import", "same", tarball.to_str().unwrap()])
                    .arg("--data-dir")
                    .arg(&data)
                    .stdout(Stdio::null())
                    .stderr(Stdio::piped());
                if replace {
                    command.arg("--replace");
                }
                command.spawn().unwrap()
            })
            .collect();
        children
            .into_iter()
            .map(|child| child.wait_with_output().unwrap())
            .collect()
    };

    let outcomes = run_together(4, false);
    let won = outcomes.iter().filter(|o| o.status.success()).count();
    assert_eq!(won, 1, "exactly one creation wins");
    for lost in outcomes.iter().filter(|o| !o.status.success()) {
        assert_eq!(lost.status.code(), Some(65));
        assert!(
            text(&lost.stderr).contains("already exists"),
            "{}",
            text(&lost.stderr)
        );
    }
    let bases = list_json(&data);
    assert_eq!(bases.len(), 1);
    let files = bases[0]["files"].clone();
    assert_eq!(files, 16 + 1500);

    // Concurrent replacements all succeed, one after the other, and leave one whole base.
    for outcome in run_together(3, true) {
        assert!(outcome.status.success(), "{}", text(&outcome.stderr));
    }
    let bases = list_json(&data);
    assert_eq!(bases.len(), 1);
    assert_eq!(bases[0]["files"], files);
    assert_eq!(
        fs::read_dir(data.join("bases/same/rootfs/usr/lib/python3.11"))
            .unwrap()
            .count(),
        1501
    );
    assert!(leftovers(&data).is_empty(), "{:?}", leftovers(&data));
}

/// Writes `entries` into a GNU tar with their names and link targets exactly as given.
fn hostile_tar(entries: &[Value], outside: &Path, out: &Path) {
    let subst = |s: &str| s.replace("$OUTSIDE", outside.to_str().unwrap());
    let mut builder = tar::Builder::new(fs::File::create(out).unwrap());
    for entry in entries {
        let path = subst(entry["path"].as_str().unwrap());
        let content = entry["content"].as_str().unwrap_or("").as_bytes().to_vec();
        let (kind, mode) = match entry["type"].as_str().unwrap() {
            "file" => (tar::EntryType::Regular, 0o644),
            "dir" => (tar::EntryType::Directory, 0o755),
            "symlink" => (tar::EntryType::Symlink, 0o777),
            "hardlink" => (tar::EntryType::Link, 0o644),
            "chardev" => (tar::EntryType::Char, 0o600),
            "fifo" => (tar::EntryType::Fifo, 0o600),
            other => panic!("unknown entry type {other}"),
        };
        let body: &[u8] = if kind == tar::EntryType::Regular {
            &content
        } else {
            &[]
        };
        let mut header = tar::Header::new_gnu();
        header.set_entry_type(kind);
        header.set_mode(entry["mode"].as_u64().map_or(mode, |m| m as u32));
        header.set_size(body.len() as u64);
        header.set_mtime(1_700_000_000);
        let gnu = header.as_gnu_mut().unwrap();
        assert!(path.len() < gnu.name.len(), "keep fixture names short");
        gnu.name[..path.len()].copy_from_slice(path.as_bytes());
        if let Some(target) = entry["target"].as_str() {
            let target = subst(target);
            gnu.linkname[..target.len()].copy_from_slice(target.as_bytes());
        }
        header.set_cksum();
        builder.append(&header, body).unwrap();
    }
    builder.finish().unwrap();
}

/// Every path under `dir` with its content, to see that nothing changed.
fn snapshot(dir: &Path) -> BTreeMap<PathBuf, Vec<u8>> {
    let mut seen = BTreeMap::new();
    let mut pending = vec![dir.to_path_buf()];
    while let Some(d) = pending.pop() {
        for entry in fs::read_dir(&d).unwrap() {
            let path = entry.unwrap().path();
            let meta = fs::symlink_metadata(&path).unwrap();
            if meta.is_dir() {
                pending.push(path.clone());
            }
            let content = if meta.is_file() {
                fs::read(&path).unwrap()
            } else {
                Vec::new()
            };
            seen.insert(path, content);
        }
    }
    seen
}

#[test]
fn hostile_tarballs_are_refused() {
    let fixture = repo().join("fixtures/base-import/hostile.json");
    let cases: Value = serde_json::from_str(&fs::read_to_string(&fixture).unwrap()).unwrap();
    let cases = cases["cases"].as_array().unwrap();
    assert!(cases.len() >= 10);
    let tmp = tempfile::tempdir().unwrap();
    let outside = tmp.path().join("outside");
    let reset_outside = || {
        let _ = fs::remove_dir_all(&outside);
        fs::create_dir(&outside).unwrap();
        fs::write(outside.join("sentinel"), "untouched").unwrap();
    };
    reset_outside();
    let before = snapshot(&outside);
    let mut failures = Vec::new();

    for (i, case) in cases.iter().enumerate() {
        let name = case["name"].as_str().unwrap();
        let data = tmp.path().join(format!("data{i}"));
        let tarball = tmp.path().join(format!("case{i}.tar"));
        hostile_tar(case["entries"].as_array().unwrap(), &outside, &tarball);
        let out = corral(
            &["base", "import", "hostile", tarball.to_str().unwrap()],
            &data,
        );
        let stderr = text(&out.stderr);
        if snapshot(&outside) != before {
            failures.push(format!("{name}: changed {}", outside.display()));
            reset_outside();
        }
        if Path::new("/tmp/corral-hostile-absolute").exists() {
            failures.push(format!("{name}: wrote /tmp/corral-hostile-absolute"));
        }
        if let Some(refused) = case["expect"]["refused"].as_str() {
            if out.status.code() != Some(65) || !stderr.contains(refused) {
                failures.push(format!(
                    "{name}: expected exit 65 and {refused:?}, got {:?}: {stderr}",
                    out.status.code()
                ));
            }
            if !list_json(&data).is_empty() || !leftovers(&data).is_empty() {
                failures.push(format!("{name}: a refused import left a base or a build"));
            }
            continue;
        }
        if !out.status.success() {
            failures.push(format!("{name}: expected success, got {stderr}"));
            continue;
        }
        let rootfs = data.join("bases/hostile/rootfs");
        for check in case["expect"]["ok"].as_array().unwrap() {
            let path = rootfs.join(check["path"].as_str().unwrap());
            let meta = fs::symlink_metadata(&path).ok();
            let holds = match check["type"].as_str().unwrap() {
                "absent" => meta.is_none(),
                "file" => {
                    meta.is_some_and(|m| m.is_file())
                        && fs::read_to_string(&path).unwrap() == check["content"].as_str().unwrap()
                }
                "symlink" => {
                    meta.is_some_and(|m| m.is_symlink())
                        && fs::read_link(&path).unwrap()
                            == Path::new(check["target"].as_str().unwrap())
                }
                other => panic!("unknown check {other}"),
            };
            if !holds {
                failures.push(format!("{name}: {check} does not hold"));
            }
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

/// The real bookworm rootfs, tarred by GNU tar, comes back identical: owners, modes,
/// times, links and contents (device nodes aside: the sandbox brings its own /dev).
#[test]
fn a_real_rootfs_round_trips_through_import() {
    let rootfs = PathBuf::from(
        std::env::var("CORRAL_TEST_ROOTFS")
            .unwrap_or_else(|_| "/var/cache/corral-test/rootfs".into()),
    );
    if !require(is_root(), "root")
        || !require(rootfs.is_dir(), "a test rootfs (CORRAL_TEST_ROOTFS)")
    {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let (data, tarball) = (tmp.path().join("data"), tmp.path().join("rootfs.tar"));
    gnu_tar(&rootfs, &tarball, false);
    let out = corral(
        &["base", "import", "bookworm", tarball.to_str().unwrap()],
        &data,
    );
    assert!(out.status.success(), "{}", text(&out.stderr));
    let imported = data.join("bases/bookworm/rootfs");

    let listing = |root: &Path| {
        let out = Command::new("find")
            .args([".", "-path", "./dev", "-prune", "-o", "-printf"])
            .arg("%p %y %m %U %G %Ts %l %s\\n")
            .current_dir(root)
            .output()
            .unwrap();
        let mut lines: Vec<String> = text(&out.stdout)
            .lines()
            // A directory's size depends on its history, not on its content.
            .map(|l| match l.split(' ').nth(1) {
                Some("d") => l.rsplit_once(' ').unwrap().0.to_string(),
                _ => l.to_string(),
            })
            .collect();
        lines.sort();
        lines
    };
    let (want, got) = (listing(&rootfs), listing(&imported));
    assert!(want.len() > 1000);
    let differ: Vec<_> = want
        .iter()
        .zip(&got)
        .filter(|(a, b)| a != b)
        .take(5)
        .collect();
    assert!(differ.is_empty() && want.len() == got.len(), "{differ:?}");
    let diff = Command::new("diff")
        .args(["-r", "--no-dereference", "-x", "dev"])
        .arg(&rootfs)
        .arg(&imported)
        .output()
        .unwrap();
    assert!(diff.status.success(), "{}", text(&diff.stdout));
}

/// One real debootstrap build (about a minute): python works in the result, and the apt
/// lists and caches are gone.
#[test]
fn builds_a_base_with_debootstrap() {
    let debootstrap = Command::new("debootstrap")
        .arg("--version")
        .output()
        .is_ok();
    let mirror =
        corral_worker::base::debootstrap::mirror_from_apt(Path::new("/etc/apt"), "bookworm");
    if !require(is_root(), "root")
        || !require(debootstrap, "debootstrap")
        || !require(mirror.is_some(), "a Debian mirror in the /etc/apt sources")
    {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("data");
    let out = corral(
        &[
            "base",
            "build",
            "py",
            "--suite",
            "bookworm",
            "--include",
            "python3,python3-venv",
        ],
        &data,
    );
    let stderr = text(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    // Not a terminal: plain lines, one per finished step.
    for step in [
        "resolve", "download", "extract", "install", "strip", "measure",
    ] {
        assert!(
            stderr.contains(&format!(" {step} done in ")),
            "{step} missing from:\n{stderr}"
        );
    }
    let rootfs = data.join("bases/py/rootfs");
    let python = Command::new("chroot")
        .arg(&rootfs)
        .args([
            "/usr/bin/python3",
            "-c",
            "import venv, ensurepip, sys; print(sys.version_info[:2])",
        ])
        .output()
        .unwrap();
    assert_eq!(
        text(&python.stdout).trim(),
        "(3, 11)",
        "{}",
        text(&python.stderr)
    );
    let lists: Vec<_> = fs::read_dir(rootfs.join("var/lib/apt/lists"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.is_file())
        .collect();
    assert!(lists.is_empty(), "{lists:?}");
    assert!(!rootfs.join("var/cache/apt/pkgcache.bin").exists());
    assert!(!rootfs.join("etc/resolv.conf").exists());
    let base = &list_json(&data)[0];
    assert_eq!(base["created"]["origin"]["kind"], "debootstrap");
    assert_eq!(
        base["created"]["origin"]["mirror"],
        mirror.unwrap().as_str()
    );
    assert!(data.join("bases/py/debootstrap.log").is_file());
    assert!(leftovers(&data).is_empty());
}
