//! The host packages corral relies on, from the one list `scripts/test` installs too
//! (`worker/host-packages.txt`, compiled in): finding whether each is present, and
//! installing a missing one with apt when that is allowed (root on Debian or Ubuntu, not
//! turned off). Anywhere else a missing tool is an error that names the tool, its package
//! and the command that installs it, never a bare "No such file or directory".

use std::ffi::OsStr;
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::LazyLock;
use std::time::{Duration, Instant};

/// The list itself; see its header for the columns.
pub const LIST: &str = include_str!("../../host-packages.txt");

/// What a package is needed for (the list's `for` column).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Role {
    /// Every worker host.
    Run,
    /// Building bases with debootstrap.
    Base,
    /// Preparing the fixture bundles on a fixture job's first replay.
    Fixtures,
    /// Useful beside corral, never required.
    Optional,
    /// The test suite and benchmarks.
    Test,
}

/// How to tell that a package is installed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Probe {
    /// A command on `PATH`.
    Command(String),
    /// A module `python3` can import.
    PythonModule(String),
}

impl std::fmt::Display for Probe {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Probe::Command(name) => f.write_str(name),
            Probe::PythonModule(module) => write!(f, "python3 module {module}"),
        }
    }
}

/// One row of the list.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Package {
    pub name: String,
    pub probe: Probe,
    pub role: Role,
    pub why: String,
}

impl Package {
    /// The command that installs it.
    pub fn install_command(&self) -> String {
        format!("apt-get install {}", self.name)
    }

    /// Whether the probe finds it, with `path` as the `PATH` to search.
    pub fn present(&self, path: Option<&OsStr>) -> bool {
        match &self.probe {
            Probe::Command(name) => find_command(name, path).is_some(),
            Probe::PythonModule(module) => {
                let Some(python) = find_command("python3", path) else {
                    return false;
                };
                Command::new(python)
                    .args(["-c", &format!("import {module}")])
                    .stdin(Stdio::null())
                    .stdout(Stdio::null())
                    .stderr(Stdio::null())
                    .status()
                    .is_ok_and(|s| s.success())
            }
        }
    }
}

/// Parses the list's text: whitespace-separated columns, `#` comments.
pub fn parse(text: &str) -> Result<Vec<Package>, String> {
    let mut packages = Vec::new();
    for (n, line) in text.lines().enumerate() {
        let line = line.split('#').next().unwrap_or("").trim();
        if line.is_empty() {
            continue;
        }
        let mut words = line.split_whitespace();
        let (Some(name), Some(probe), Some(role)) = (words.next(), words.next(), words.next())
        else {
            return Err(format!("line {}: expected `package probe for why`", n + 1));
        };
        let probe = match probe.strip_prefix("python3:") {
            Some(module) => Probe::PythonModule(module.to_string()),
            None => Probe::Command(probe.to_string()),
        };
        let role = match role {
            "run" => Role::Run,
            "base" => Role::Base,
            "fixtures" => Role::Fixtures,
            "optional" => Role::Optional,
            "test" => Role::Test,
            other => return Err(format!("line {}: unknown role {other:?}", n + 1)),
        };
        packages.push(Package {
            name: name.to_string(),
            probe,
            role,
            why: words.collect::<Vec<_>>().join(" "),
        });
    }
    Ok(packages)
}

/// Every package of the list.
pub fn packages() -> &'static [Package] {
    static PACKAGES: LazyLock<Vec<Package>> =
        LazyLock::new(|| parse(LIST).expect("host-packages.txt is checked by a unit test"));
    &PACKAGES
}

/// The packages needed for `role`, in the list's order.
pub fn needed_for(role: Role) -> impl Iterator<Item = &'static Package> {
    packages().iter().filter(move |p| p.role == role)
}

/// The first executable file called `name` in the directories of `path` (`PATH` when
/// `None`). A name with a slash is taken as it is.
pub fn find_command(name: &str, path: Option<&OsStr>) -> Option<PathBuf> {
    use std::os::unix::fs::PermissionsExt;
    let executable = |p: &Path| {
        std::fs::metadata(p).is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
    };
    if name.contains('/') {
        let p = PathBuf::from(name);
        return executable(&p).then_some(p);
    }
    let path = match path {
        Some(path) => path.to_os_string(),
        None => std::env::var_os("PATH")?,
    };
    std::env::split_paths(&path)
        .map(|dir| dir.join(name))
        .find(|p| executable(p))
}

/// Whether a missing package may be installed, and if not, why not.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Install {
    /// Root on Debian or Ubuntu with apt-get.
    Allowed { apt_get: PathBuf },
    /// Installing is not possible or not wanted here; the reason is shown to the user.
    Refused(String),
}

impl Install {
    /// Decides for this host. `turned_off` is `--no-install` or `CORRAL_NO_INSTALL=1`.
    pub fn for_host(turned_off: bool) -> Install {
        if turned_off {
            return Install::Refused(
                "installing is turned off (--no-install or CORRAL_NO_INSTALL=1)".into(),
            );
        }
        if effective_uid() != Some(0) {
            return Install::Refused("it is not running as root".into());
        }
        if !Path::new("/etc/debian_version").is_file() {
            return Install::Refused("this host is not Debian or Ubuntu".into());
        }
        match find_command("apt-get", None) {
            Some(apt_get) => Install::Allowed { apt_get },
            None => Install::Refused("apt-get is not on PATH".into()),
        }
    }
}

/// The effective uid, from `/proc/self/status` (`Uid: real effective saved fs`).
pub fn effective_uid() -> Option<u32> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let uids = status.lines().find_map(|l| l.strip_prefix("Uid:"))?;
    uids.split_whitespace().nth(1)?.parse().ok()
}

#[derive(Debug, thiserror::Error)]
pub enum PrerequisiteError {
    #[error(
        "{probe} is not installed; it {why}. Install the Debian package {package} with \
         `{command}` (as root) and run this again. corral did not install it itself: {reason}",
        command = install_command(package)
    )]
    Missing {
        probe: Probe,
        package: String,
        why: String,
        /// Why corral did not install it itself.
        reason: String,
    },
    #[error(
        "installing {package} with `{command}` failed ({status}); run it yourself to see why, \
         then run this again. apt-get's last lines:\n{tail}"
    )]
    InstallFailed {
        package: String,
        command: String,
        status: String,
        tail: String,
    },
    #[error("{probe} is still missing after installing {package}; check `dpkg -L {package}`")]
    StillMissing { probe: Probe, package: String },
}

fn install_command(package: &str) -> String {
    format!("apt-get install {package}")
}

/// Makes sure every package needed for `role` is present, installing the missing ones
/// when `install` allows it. `say` hears what is about to happen (and why) before it
/// happens, and how long it took after.
pub fn ensure(
    role: Role,
    install: &Install,
    say: &mut dyn FnMut(String),
) -> Result<(), PrerequisiteError> {
    for package in needed_for(role) {
        ensure_one(package, install, None, say)?;
    }
    Ok(())
}

/// [`ensure`] for one package, with `path` as the `PATH` probes search.
pub fn ensure_one(
    package: &Package,
    install: &Install,
    path: Option<&OsStr>,
    say: &mut dyn FnMut(String),
) -> Result<(), PrerequisiteError> {
    if package.present(path) {
        return Ok(());
    }
    let apt_get = match install {
        Install::Allowed { apt_get } => apt_get,
        Install::Refused(reason) => {
            return Err(PrerequisiteError::Missing {
                probe: package.probe.clone(),
                package: package.name.clone(),
                why: package.why.clone(),
                reason: reason.clone(),
            });
        }
    };
    say(format!(
        "{} is missing; it {}. Installing the Debian package {} with `apt-get install -y {}` \
         (--no-install or CORRAL_NO_INSTALL=1 turns this off)",
        package.probe, package.why, package.name, package.name
    ));
    let started = Instant::now();
    // A fresh machine's package lists may be absent or stale: update once, then retry.
    if let Err(first) = apt_install(apt_get, &package.name) {
        say(
            "apt-get could not install it from the current package lists; running apt-get update"
                .into(),
        );
        apt(apt_get, &["update"]).map_err(|_| first)?;
        apt_install(apt_get, &package.name)?;
    }
    if !package.present(path) {
        return Err(PrerequisiteError::StillMissing {
            probe: package.probe.clone(),
            package: package.name.clone(),
        });
    }
    say(format!(
        "installed {} in {}",
        package.name,
        seconds(started.elapsed())
    ));
    Ok(())
}

fn apt_install(apt_get: &Path, package: &str) -> Result<(), PrerequisiteError> {
    apt(apt_get, &["install", "-y", package])
}

/// Runs apt-get non-interactively; its output is kept for the error, not shown.
fn apt(apt_get: &Path, args: &[&str]) -> Result<(), PrerequisiteError> {
    let command = format!("apt-get {}", args.join(" "));
    let package = args.last().copied().unwrap_or_default().to_string();
    let failed = |status: String, tail: String| PrerequisiteError::InstallFailed {
        package: package.clone(),
        command: command.clone(),
        status,
        tail,
    };
    let mut child = Command::new(apt_get)
        .args(args)
        .env("DEBIAN_FRONTEND", "noninteractive")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| {
            failed(
                format!("could not start {}: {e}", apt_get.display()),
                String::new(),
            )
        })?;
    let stderr = child.stderr.take();
    let err_reader = std::thread::spawn(move || {
        stderr
            .map(|s| {
                BufReader::new(s)
                    .lines()
                    .map_while(Result::ok)
                    .collect::<Vec<_>>()
            })
            .unwrap_or_default()
    });
    let mut lines: Vec<String> = child
        .stdout
        .take()
        .map(|s| BufReader::new(s).lines().map_while(Result::ok).collect())
        .unwrap_or_default();
    lines.extend(err_reader.join().unwrap_or_default());
    let status = child
        .wait()
        .map_err(|e| failed(format!("waiting for apt-get: {e}"), String::new()))?;
    if status.success() {
        return Ok(());
    }
    let tail = lines[lines.len().saturating_sub(10)..].join("\n");
    Err(failed(status.to_string(), tail))
}

/// `3.2 s`, `1 min 24 s`: how long a step took, for people.
pub fn seconds(took: Duration) -> String {
    let secs = took.as_secs_f64();
    if secs < 60.0 {
        format!("{secs:.1} s")
    } else {
        format!("{} min {:02} s", took.as_secs() / 60, took.as_secs() % 60)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_list_parses_and_names_the_first_run_tools() {
        let packages = parse(LIST).unwrap();
        let debootstrap = packages.iter().find(|p| p.name == "debootstrap").unwrap();
        assert_eq!(debootstrap.role, Role::Base);
        assert_eq!(debootstrap.probe, Probe::Command("debootstrap".into()));
        assert_eq!(debootstrap.install_command(), "apt-get install debootstrap");
        assert!(
            packages.iter().all(|p| !p.why.is_empty()),
            "every row says why"
        );
        let venv = packages.iter().find(|p| p.name == "python3-venv").unwrap();
        assert_eq!(venv.probe, Probe::PythonModule("ensurepip".into()));
        assert!(parse("a b nowhere why").is_err());
        assert!(parse("a b").is_err());
    }

    #[test]
    fn a_missing_tool_with_installing_refused_names_tool_package_and_command() {
        let package = Package {
            name: "debootstrap".into(),
            probe: Probe::Command("debootstrap".into()),
            role: Role::Base,
            why: "builds a Debian base root filesystem".into(),
        };
        let empty = tempfile::tempdir().unwrap();
        let refused = Install::Refused("installing is turned off".into());
        let err = ensure_one(
            &package,
            &refused,
            Some(empty.path().as_os_str()),
            &mut |_| {},
        )
        .unwrap_err();
        let text = err.to_string();
        for wanted in [
            "debootstrap is not installed",
            "Debian package debootstrap",
            "`apt-get install debootstrap`",
            "installing is turned off",
        ] {
            assert!(text.contains(wanted), "{wanted:?} not in {text:?}");
        }
    }

    #[test]
    fn commands_are_found_on_the_given_path_only() {
        let dir = tempfile::tempdir().unwrap();
        let tool = dir.path().join("tool");
        std::fs::write(&tool, "#!/bin/sh\n").unwrap();
        let path = dir.path().as_os_str();
        assert_eq!(find_command("tool", Some(path)), None, "not executable");
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&tool, std::fs::Permissions::from_mode(0o755)).unwrap();
        assert_eq!(find_command("tool", Some(path)), Some(tool));
        assert_eq!(find_command("sh", Some(path)), None);
    }

    #[test]
    fn durations_read_as_seconds_then_minutes() {
        assert_eq!(seconds(Duration::from_millis(3240)), "3.2 s");
        assert_eq!(seconds(Duration::from_secs(84)), "1 min 24 s");
    }
}
