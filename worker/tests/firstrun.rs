//! A new user's first `corral replay`, driving the real binary: on a fresh data dir and a
//! fresh wheel cache the python-app fixture succeeds with each preparation step announced
//! and timed; without debootstrap and with installing turned off (or impossible) it stops
//! naming the tool, its package and the install command (exit 75); an unwritable data dir
//! and a data dir without room for the base stop at once with what to do. A closed
//! standard output ends every command quietly.

use std::path::Path;
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

mod common;
use common::{have, is_root, require};

/// The shared `corral` command (repository root, no inherited `CORRAL_*` settings), with no
/// standard input.
fn corral() -> Command {
    let mut command = common::corral();
    command.stdin(Stdio::null());
    command
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

/// Runs `command` with a standard output whose reader is already gone: what
/// `corral … | head -1` becomes as soon as `head` has its line, without the race.
fn into_closed_pipe(command: &mut Command) -> Output {
    let (reader, writer) = std::io::pipe().unwrap();
    drop(reader);
    command
        .stdout(writer)
        .stderr(Stdio::piped())
        .output()
        .unwrap()
}

fn assert_quiet_end(out: &Output, what: &str) {
    let stderr = text(&out.stderr);
    assert!(!stderr.contains("panicked"), "{what}: {stderr}");
    assert!(!stderr.contains("Broken pipe"), "{what}: {stderr}");
    assert_eq!(
        out.status.code(),
        Some(141),
        "{what}: ends as a closed pipe ends cat (128 + SIGPIPE), not 101: {stderr}"
    );
}

fn no_leftovers(data: &Path) {
    let bases = data.join("bases");
    if let Ok(entries) = std::fs::read_dir(&bases) {
        for entry in entries.flatten() {
            let name = entry.file_name().to_string_lossy().into_owned();
            assert!(
                !name.starts_with(".build-"),
                "a failed creation leaves nothing half-built: {name}"
            );
        }
    }
    let mountinfo = std::fs::read_to_string("/proc/self/mountinfo").unwrap();
    let data = data.to_string_lossy();
    let below = mountinfo
        .lines()
        .filter(|l| l.contains(&format!("{data}/")))
        .count();
    assert_eq!(below, 0, "nothing stays mounted below {data}:\n{mountinfo}");
}

#[test]
fn a_first_run_on_a_fresh_machine_prepares_everything_announced_and_succeeds() {
    if !require(is_root(), "root (namespaces, mounts, cgroups, debootstrap)")
        || !require(
            have("debootstrap"),
            "debootstrap (apt-get install debootstrap)",
        )
        || !require(
            have("python3"),
            "python3 with pip or venv, for scripts/fixtures",
        )
    {
        return;
    }
    let dir = tempfile::Builder::new()
        .prefix("corral-firstrun-")
        .tempdir_in("/var/tmp")
        .unwrap();
    let data = dir.path().join("data");
    let wheels = dir.path().join("wheels");
    let started = Instant::now();
    let out = corral()
        .env("CORRAL_WHEEL_CACHE", &wheels)
        // Nothing may be installed by a test: on this host nothing needs to be.
        .env("CORRAL_NO_INSTALL", "1")
        .args(["replay", "fixtures/jobs/python-app.json", "--data-dir"])
        .arg(&data)
        .output()
        .unwrap();
    let took = started.elapsed();
    let (stdout, stderr) = (text(&out.stdout), text(&out.stderr));
    eprintln!("first run took {:.1} s\n{stderr}", took.as_secs_f64());
    assert_eq!(out.status.code(), Some(0), "{stdout}\n{stderr}");
    assert!(stdout.contains("python-app SUCCEEDED"), "{stdout}");
    assert!(stdout.contains("digest: sha256:"), "{stdout}");
    // Each step says what it does before, and how long it took after.
    let announced = [
        "first run: base python-3.11 is not in",
        "building base python-3.11 with debootstrap (bookworm minbase + python3,python3-venv)",
        "base python-3.11 ready in",
        "first run: source sha256:",
        "fixture bundles ready in",
        "pushed fixture bundle",
    ];
    let mut at = 0;
    for step in announced {
        let found = stderr[at..]
            .find(step)
            .unwrap_or_else(|| panic!("{step:?} not announced (in order):\n{stderr}"));
        at += found;
    }
    // Not a terminal: debootstrap's progress comes as plain, timed lines, no spinner.
    assert!(stderr.contains("download done in"), "{stderr}");
    assert!(stderr.contains("install done in"), "{stderr}");
    assert!(!stderr.contains('\r') && !stderr.contains('⠋'), "{stderr}");
    assert!(!stderr.contains("os error"), "{stderr}");
    let fetched = std::fs::read_dir(&wheels)
        .unwrap()
        .flatten()
        .filter(|e| e.file_name().to_string_lossy().ends_with(".whl"))
        .count();
    assert!(
        fetched >= 5,
        "the pinned wheels were fetched into {wheels:?}"
    );

    // The second run prepares nothing.
    let again = corral()
        .args(["replay", "fixtures/jobs/python-app.json", "--data-dir"])
        .arg(&data)
        .output()
        .unwrap();
    let stderr = text(&again.stderr);
    assert_eq!(again.status.code(), Some(0), "{stderr}");
    assert!(!stderr.contains("first run"), "{stderr}");

    // `| head -1` on commands with a result to print: quiet, and the build cleaned up.
    let base_list = into_closed_pipe(corral().args(["base", "list", "--data-dir"]).arg(&data));
    assert_quiet_end(&base_list, "corral base list | head -1");
    let replay = into_closed_pipe(
        corral()
            .args([
                "replay",
                "fixtures/jobs/hello.json",
                "--no-cache",
                "--data-dir",
            ])
            .arg(&data),
    );
    assert_quiet_end(&replay, "corral replay fixtures/jobs/hello.json | head -1");
    assert!(
        text(&replay.stderr).contains("running job hello"),
        "the build ran: {}",
        text(&replay.stderr)
    );
    no_leftovers(&data);
}

#[test]
fn without_debootstrap_and_no_way_to_install_it_the_message_names_package_and_command() {
    if !require(is_root(), "root") {
        return;
    }
    let dir = tempfile::tempdir_in("/var/tmp").unwrap();
    // A PATH with the tools every build needs, and neither debootstrap nor apt-get.
    let empty_path = dir.path().join("bin");
    std::fs::create_dir(&empty_path).unwrap();
    for tool in ["mkfs.ext4", "mount", "modprobe"] {
        let found = std::env::split_paths(&std::env::var_os("PATH").unwrap())
            .map(|d| d.join(tool))
            .find(|p| p.is_file())
            .unwrap_or_else(|| panic!("{tool} is on this host's PATH"));
        std::os::unix::fs::symlink(found, empty_path.join(tool)).unwrap();
    }
    // Installing turned off; then allowed but impossible (no apt-get on PATH).
    for (env, reason) in [
        (Some("1"), "installing is turned off"),
        (None, "apt-get is not on PATH"),
    ] {
        let data = dir.path().join(format!("data-{}", env.is_some()));
        let mut command = corral();
        command
            .env("PATH", &empty_path)
            .args(["replay", "fixtures/jobs/python-app.json", "--data-dir"])
            .arg(&data);
        if let Some(value) = env {
            command.env("CORRAL_NO_INSTALL", value);
        }
        let out = command.output().unwrap();
        let stderr = text(&out.stderr);
        assert_eq!(out.status.code(), Some(75), "{stderr}");
        for wanted in [
            "debootstrap is not installed",
            "the Debian package debootstrap",
            "`apt-get install debootstrap`",
            reason,
        ] {
            assert!(stderr.contains(wanted), "{wanted:?} missing:\n{stderr}");
        }
        assert!(!stderr.contains("os error 2"), "{stderr}");
        assert!(out.stdout.is_empty(), "{}", text(&out.stdout));
        no_leftovers(&data);
    }
    // Any job, fixture or not, needs the tools of every build first.
    let bare = dir.path().join("bare");
    std::fs::create_dir(&bare).unwrap();
    let out = corral()
        .env("PATH", &bare)
        .env("CORRAL_NO_INSTALL", "1")
        .args(["replay", "fixtures/jobs/hello.json", "--data-dir"])
        .arg(dir.path().join("data-bare"))
        .output()
        .unwrap();
    let stderr = text(&out.stderr);
    assert_eq!(out.status.code(), Some(75), "{stderr}");
    assert!(stderr.contains("mkfs.ext4 is not installed"), "{stderr}");
    assert!(stderr.contains("`apt-get install e2fsprogs`"), "{stderr}");
    // `--no-install` says the same as the variable.
    let out = corral()
        .env("PATH", &empty_path)
        .args(["base", "build", "x", "--no-install", "--data-dir"])
        .arg(dir.path().join("data-flag"))
        .output()
        .unwrap();
    let stderr = text(&out.stderr);
    assert_eq!(out.status.code(), Some(75), "{stderr}");
    assert!(stderr.contains("`apt-get install debootstrap`"), "{stderr}");
    assert!(stderr.contains("installing is turned off"), "{stderr}");
}

#[test]
fn an_unwritable_data_dir_stops_the_first_run_with_what_to_do() {
    if !require(is_root(), "root (mounts a read-only tmpfs)") {
        return;
    }
    let mount = Tmpfs::mount("ro,size=1m");
    let data = mount.path().join("data");
    let out = corral()
        .env("CORRAL_NO_INSTALL", "1")
        .args(["replay", "fixtures/jobs/python-app.json", "--data-dir"])
        .arg(&data)
        .output()
        .unwrap();
    let stderr = text(&out.stderr);
    assert_eq!(out.status.code(), Some(75), "{stderr}");
    for wanted in [
        format!("the data dir {} is not writable", data.display()),
        format!("creating {}", data.display()),
        "pass --data-dir DIR".to_string(),
    ] {
        assert!(stderr.contains(&wanted), "{wanted:?} missing:\n{stderr}");
    }
}

#[test]
fn no_room_for_the_base_stops_before_debootstrap_runs() {
    if !require(is_root(), "root (mounts a small tmpfs)")
        || !require(have("debootstrap"), "debootstrap")
    {
        return;
    }
    let mount = Tmpfs::mount("size=64m");
    let data = mount.path().join("data");
    let started = Instant::now();
    let out = corral()
        .env("CORRAL_NO_INSTALL", "1")
        .args(["replay", "fixtures/jobs/python-app.json", "--data-dir"])
        .arg(&data)
        .output()
        .unwrap();
    let stderr = text(&out.stderr);
    assert_eq!(out.status.code(), Some(75), "{stderr}");
    for wanted in [
        format!(
            "not enough space for a base in {}",
            data.join("bases").display()
        ),
        "MiB free".to_string(),
        "needed".to_string(),
        "--data-dir DIR on a larger filesystem".to_string(),
    ] {
        assert!(stderr.contains(&wanted), "{wanted:?} missing:\n{stderr}");
    }
    assert!(
        started.elapsed() < Duration::from_secs(30),
        "stopped before fetching anything"
    );
    no_leftovers(&data);
}

#[test]
fn schema_and_validate_into_a_closed_pipe_end_quietly() {
    let schema = into_closed_pipe(corral().args(["schema", "job"]));
    assert_quiet_end(&schema, "corral schema job | head -1");
    let validate = into_closed_pipe(corral().args(["validate", "fixtures/jobs/hello.json"]));
    assert_quiet_end(&validate, "corral validate … | head -1");
    // The literal pipeline: whatever the timing, never a panic.
    let out = Command::new("sh")
        .arg("-c")
        .arg(format!(
            "{} schema job | head -1",
            env!("CARGO_BIN_EXE_corral")
        ))
        .output()
        .unwrap();
    assert_eq!(text(&out.stdout), "{\n");
    assert!(
        !text(&out.stderr).contains("panicked"),
        "{}",
        text(&out.stderr)
    );
}

/// A tmpfs mounted for one test, unmounted when dropped.
struct Tmpfs {
    dir: tempfile::TempDir,
}

impl Tmpfs {
    fn mount(options: &str) -> Tmpfs {
        let dir = tempfile::tempdir_in("/var/tmp").unwrap();
        let status = Command::new("mount")
            .args(["-t", "tmpfs", "-o", options, "tmpfs"])
            .arg(dir.path())
            .status()
            .unwrap();
        assert!(status.success());
        Tmpfs { dir }
    }

    fn path(&self) -> &Path {
        self.dir.path()
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = Command::new("umount")
            .arg("-l")
            .arg(self.dir.path())
            .status();
    }
}
