//! Building a base with debootstrap (`--variant=minbase`): finding the host's Debian mirror,
//! running debootstrap while turning its output into progress, and stripping what a build
//! base should not carry (apt caches and lists, logs, the host's name and resolver, device
//! nodes, and optionally documentation).

use std::fs::{self, File};
use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::mpsc;

use serde::{Deserialize, Serialize};

use super::{BaseError, Origin, Progress, Step};

/// What to build. Also the format of a base recipe file (`fixtures/bases/<name>.json`):
/// `{"suite": "bookworm", "include": ["python3", "python3-venv"]}`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Recipe {
    /// Debian suite, e.g. `bookworm`.
    pub suite: String,
    /// Packages beyond minbase, e.g. `python3`, `python3-venv`.
    #[serde(default)]
    pub include: Vec<String>,
    /// Mirror URL; `None` reads it from the host's apt sources.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mirror: Option<String>,
    /// Keep `/usr/share/doc`, `man` and `info`.
    #[serde(default)]
    pub docs: bool,
}

impl Recipe {
    /// Reads a recipe file.
    pub fn load(path: &Path) -> Result<Recipe, BaseError> {
        let bytes = fs::read(path).map_err(|source| BaseError::ReadRecipe {
            path: path.to_path_buf(),
            source,
        })?;
        serde_json::from_slice(&bytes).map_err(|source| BaseError::ParseRecipe {
            path: path.to_path_buf(),
            source,
        })
    }
}

const VARIANT: &str = "minbase";

/// Where the host's apt sources live.
pub const APT_SOURCES: &str = "/etc/apt";

/// Free space a build needs on the data dir's filesystem while it runs: bookworm minbase
/// with python3 is ~190 MB, its downloaded packages another ~70 MB (removed when done) and
/// the base's layer blob ~70 MB. Checked first, so a full disk stops the build at once
/// with a clear message instead of minutes later inside debootstrap.
pub const SPACE_NEEDED: u64 = 512 << 20;

/// Runs debootstrap into the empty dir `rootfs` and strips the result.
pub fn build(
    recipe: &Recipe,
    rootfs: &Path,
    progress: &mut dyn FnMut(Progress<'_>),
) -> Result<Origin, BaseError> {
    // Reported on the catalogue dir (`<data>/bases`), the place a user recognises.
    check_space(
        rootfs.parent().and_then(Path::parent).unwrap_or(rootfs),
        SPACE_NEEDED,
    )?;
    let mirror = match &recipe.mirror {
        Some(mirror) => mirror.clone(),
        None => mirror_from_apt(Path::new(APT_SOURCES), &recipe.suite).ok_or_else(|| {
            BaseError::NoMirror {
                searched: vec![
                    Path::new(APT_SOURCES).join("sources.list.d/*.sources"),
                    Path::new(APT_SOURCES).join("sources.list"),
                ],
            }
        })?,
    };
    // Next to the rootfs, so it is kept with the base as a record of how it was made.
    let log_path = rootfs.parent().unwrap_or(rootfs).join("debootstrap.log");
    run(recipe, &mirror, rootfs, &log_path, progress)?;
    progress(Progress::Step(Step::Strip));
    strip(rootfs, recipe.docs)?;
    Ok(Origin::Debootstrap {
        suite: recipe.suite.clone(),
        variant: VARIANT.into(),
        include: recipe.include.clone(),
        mirror,
        docs: recipe.docs,
    })
}

/// Fails with [`BaseError::NoSpace`] when the filesystem of `dir` has less than `needed`
/// bytes available to this process.
pub fn check_space(dir: &Path, needed: u64) -> Result<(), BaseError> {
    let stat = rustix::fs::statvfs(dir).map_err(|errno| BaseError::Measure {
        path: dir.to_path_buf(),
        source: errno.into(),
    })?;
    let free = stat.f_bavail.saturating_mul(stat.f_frsize);
    if free < needed {
        return Err(BaseError::NoSpace {
            path: dir.to_path_buf(),
            free,
            needed,
        });
    }
    Ok(())
}

fn run(
    recipe: &Recipe,
    mirror: &str,
    rootfs: &Path,
    log_path: &Path,
    progress: &mut dyn FnMut(Progress<'_>),
) -> Result<(), BaseError> {
    let mut command = Command::new("debootstrap");
    command.arg(format!("--variant={VARIANT}"));
    if !recipe.include.is_empty() {
        command.arg(format!("--include={}", recipe.include.join(",")));
    }
    command
        .arg(&recipe.suite)
        .arg(rootfs)
        .arg(mirror)
        .env("DEBIAN_FRONTEND", "noninteractive")
        .env("LC_ALL", "C.UTF-8")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    tracing::debug!(?command, "running debootstrap");
    let mut child = command.spawn().map_err(|source| BaseError::Spawn {
        program: "debootstrap",
        source,
    })?;

    // Both streams carry progress; merge them line by line in arrival order.
    let (lines, merged) = mpsc::channel::<String>();
    let readers: Vec<_> = [
        child
            .stdout
            .take()
            .map(|s| Box::new(s) as Box<dyn std::io::Read + Send>),
        child
            .stderr
            .take()
            .map(|s| Box::new(s) as Box<dyn std::io::Read + Send>),
    ]
    .into_iter()
    .flatten()
    .map(|stream| {
        let lines = lines.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(stream).lines().map_while(Result::ok) {
                if lines.send(line).is_err() {
                    break;
                }
            }
        })
    })
    .collect();
    drop(lines);

    let log_err = |source| BaseError::Log {
        path: log_path.to_path_buf(),
        source,
    };
    let mut log = File::create(log_path).map_err(log_err)?;
    let mut stages = Stages::default();
    let mut tail = std::collections::VecDeque::new();
    for line in merged {
        writeln!(log, "{line}").map_err(log_err)?;
        if tail.len() == 20 {
            tail.pop_front();
        }
        tail.push_back(line.clone());
        stages.feed(&line, progress);
    }
    for reader in readers {
        let _ = reader.join();
    }
    let status = child.wait().map_err(|source| BaseError::Spawn {
        program: "debootstrap",
        source,
    })?;
    if !status.success() {
        return Err(BaseError::Debootstrap {
            status,
            log: log_path.to_path_buf(),
            tail: Vec::from(tail).join("\n"),
        });
    }
    Ok(())
}

/// Turns debootstrap's `I:` lines into steps and items. It prints no totals; every
/// downloaded package is later unpacked and configured once, which gives the install total.
#[derive(Debug, Default)]
struct Stages {
    step: Option<Step>,
    downloaded: u64,
    done: u64,
}

impl Stages {
    fn feed(&mut self, line: &str, progress: &mut dyn FnMut(Progress<'_>)) {
        let Some((step, item)) = classify(line) else {
            if line.starts_with("W:") || line.starts_with("E:") {
                progress(Progress::Note(line));
            }
            return;
        };
        if self.step != Some(step) {
            self.step = Some(step);
            self.done = 0;
            progress(Progress::Step(step));
        }
        let Some(name) = item else { return };
        self.done += 1;
        if step == Step::Download {
            self.downloaded = self.done;
        }
        let total = match step {
            Step::Install => Some(2 * self.downloaded).filter(|t| *t >= self.done),
            _ => None,
        };
        progress(Progress::Item {
            step,
            name,
            done: self.done,
            total,
        });
    }
}

/// The step a debootstrap line belongs to, and the package it names, if any.
fn classify(line: &str) -> Option<(Step, Option<&str>)> {
    let message = line.strip_prefix("I: ")?.trim_end();
    // "apt 2.6.1" and "adduser..." name a package; "required packages..." is a heading.
    fn package(rest: &str) -> Option<&str> {
        let rest = rest.trim_end_matches("...");
        let heading = rest.contains("packages") || rest.starts_with("the ");
        rest.split(' ').next().filter(|p| !p.is_empty() && !heading)
    }
    if let Some(rest) = message.strip_prefix("Retrieving ") {
        return match rest.trim() {
            "InRelease" | "Release" | "Release.gpg" | "Packages" => Some((Step::Resolve, None)),
            rest => Some((Step::Download, package(rest))),
        };
    }
    if let Some(rest) = message.strip_prefix("Validating ") {
        // Each package is validated right after it is retrieved: not a step of its own.
        return (rest.trim() == "Packages").then_some((Step::Resolve, None));
    }
    if ["Checking ", "Valid Release", "Resolving ", "Found "]
        .iter()
        .any(|p| message.starts_with(p))
    {
        return Some((Step::Resolve, None));
    }
    if let Some(rest) = message.strip_prefix("Extracting ") {
        return Some((Step::Extract, package(rest)));
    }
    if let Some(rest) = message
        .strip_prefix("Unpacking ")
        .or_else(|| message.strip_prefix("Configuring "))
    {
        return Some((Step::Install, package(rest)));
    }
    if message.starts_with("Installing ") {
        return Some((Step::Install, None));
    }
    None
}

/// The mirror for `suite` from the host's apt sources under `etc_apt` (deb822
/// `sources.list.d/*.sources` first, then one-line `sources.list` and `sources.list.d/*.list`):
/// the first `deb` source that carries the suite itself, else the first that is not a
/// security or updates pocket.
pub fn mirror_from_apt(etc_apt: &Path, suite: &str) -> Option<String> {
    let mut sources: Vec<(String, Vec<String>)> = Vec::new();
    let dir = etc_apt.join("sources.list.d");
    let mut files: Vec<PathBuf> = fs::read_dir(&dir)
        .map(|entries| entries.filter_map(|e| e.ok().map(|e| e.path())).collect())
        .unwrap_or_default();
    files.sort();
    for file in files
        .iter()
        .filter(|f| f.extension().is_some_and(|e| e == "sources"))
    {
        if let Ok(text) = fs::read_to_string(file) {
            sources.extend(parse_deb822(&text));
        }
    }
    let mut one_line = vec![etc_apt.join("sources.list")];
    one_line.extend(
        files
            .iter()
            .filter(|f| f.extension().is_some_and(|e| e == "list"))
            .cloned(),
    );
    for file in one_line {
        if let Ok(text) = fs::read_to_string(file) {
            sources.extend(parse_one_line(&text));
        }
    }
    let exact = sources
        .iter()
        .find(|(_, suites)| suites.iter().any(|s| s == suite));
    let plain = || {
        sources.iter().find(|(_, suites)| {
            suites
                .iter()
                .all(|s| !s.contains("security") && !s.contains("-updates"))
        })
    };
    exact
        .or_else(plain)
        .map(|(uri, _)| uri.trim_end_matches('/').to_string())
}

/// `(uri, suites)` of each enabled `deb` stanza of a deb822 sources file.
fn parse_deb822(text: &str) -> Vec<(String, Vec<String>)> {
    let mut out = Vec::new();
    for stanza in text.split("\n\n") {
        let mut fields = std::collections::HashMap::new();
        let mut key: Option<String> = None;
        for line in stanza.lines() {
            if line.starts_with('#') || line.trim().is_empty() {
                continue;
            }
            if line.starts_with([' ', '\t']) {
                // A continuation line belongs to the previous field.
                if let Some(k) = &key {
                    let value: &mut String = fields.entry(k.clone()).or_default();
                    value.push(' ');
                    value.push_str(line.trim());
                }
                continue;
            }
            if let Some((k, v)) = line.split_once(':') {
                let k = k.trim().to_ascii_lowercase();
                fields.insert(k.clone(), v.trim().to_string());
                key = Some(k);
            }
        }
        let words = |k: &str| -> Vec<String> {
            fields
                .get(k)
                .map(|v| v.split_whitespace().map(str::to_string).collect())
                .unwrap_or_default()
        };
        let enabled = fields
            .get("enabled")
            .is_none_or(|v| !v.eq_ignore_ascii_case("no"));
        if enabled && words("types").iter().any(|t| t == "deb") {
            for uri in words("uris") {
                out.push((uri, words("suites")));
            }
        }
    }
    out
}

/// `(uri, [suite])` of each `deb` line of a one-line sources file.
fn parse_one_line(text: &str) -> Vec<(String, Vec<String>)> {
    let mut out = Vec::new();
    for line in text.lines() {
        let line = line.split('#').next().unwrap_or("").trim();
        let Some(rest) = line.strip_prefix("deb ") else {
            continue;
        };
        let mut rest = rest.trim_start();
        if rest.starts_with('[') {
            let Some(end) = rest.find(']') else { continue };
            rest = &rest[end + 1..];
        }
        let mut words = rest.split_whitespace();
        if let (Some(uri), Some(suite)) = (words.next(), words.next()) {
            out.push((uri.to_string(), vec![suite.to_string()]));
        }
    }
    out
}

/// Paths (relative to the rootfs) whose contents a build base should not carry: package
/// caches and indices (stale the day after), logs of the build, the host's identity, and
/// device nodes (the sandbox mounts its own `/dev`).
const STRIP_CONTENTS: &[&str] = &[
    "var/cache/apt",
    "var/lib/apt/lists",
    "var/log",
    "dev",
    "tmp",
];
/// Single files of the same kinds.
const STRIP_FILES: &[&str] = &[
    "etc/hostname",
    "etc/resolv.conf",
    "var/cache/debconf/config.dat-old",
    "var/cache/debconf/templates.dat-old",
    "var/lib/dpkg/status-old",
    "var/lib/dpkg/diversions-old",
];
/// Documentation, removed unless asked to keep it (license files stay).
const DOCS: &[&str] = &["usr/share/man", "usr/share/info", "usr/share/doc"];

/// Removes what a build base should not carry; returns the bytes freed.
pub fn strip(rootfs: &Path, docs: bool) -> Result<u64, BaseError> {
    let mut freed = 0;
    for dir in STRIP_CONTENTS {
        freed += empty_dir(&rootfs.join(dir), false, &|_| true)?;
    }
    for file in STRIP_FILES {
        let path = rootfs.join(file);
        if let Ok(meta) = fs::symlink_metadata(&path) {
            fs::remove_file(&path).map_err(|source| BaseError::Strip { path, source })?;
            freed += meta.len();
        }
    }
    if !docs {
        for dir in DOCS {
            freed += empty_dir(&rootfs.join(dir), true, &|path| {
                path.file_name().is_none_or(|n| n != "copyright")
            })?;
        }
    }
    tracing::debug!(freed, "stripped the base");
    Ok(freed)
}

/// Removes the files and symlinks inside `dir` that `remove` picks, never following
/// symlinks. Subdirectories stay (tools expect e.g. `/var/lib/apt/lists/partial`) unless
/// `prune` is set and they end up empty.
fn empty_dir(dir: &Path, prune: bool, remove: &dyn Fn(&Path) -> bool) -> Result<u64, BaseError> {
    let Ok(entries) = fs::read_dir(dir) else {
        return Ok(0);
    };
    let err = |path: &Path| {
        let path = path.to_path_buf();
        move |source| BaseError::Strip { path, source }
    };
    let mut freed = 0;
    for entry in entries {
        let entry = entry.map_err(err(dir))?;
        let path = entry.path();
        let meta = fs::symlink_metadata(&path).map_err(err(&path))?;
        if meta.is_dir() {
            freed += empty_dir(&path, prune, remove)?;
            if prune {
                // Fails, and so keeps it, when something in it was spared (a license).
                let _ = fs::remove_dir(&path);
            }
        } else if remove(&path) {
            fs::remove_file(&path).map_err(err(&path))?;
            freed += meta.len();
        }
    }
    Ok(freed)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn debootstrap_lines_become_steps_and_items() {
        let log = "\
I: Target architecture can be executed
I: Retrieving InRelease 
I: Checking Release signature
I: Valid Release signature (key id 4D64FEC119C2029067D6E791F8D2585B8783D481)
I: Retrieving Packages 
I: Validating Packages 
I: Resolving dependencies of required packages...
I: Checking component main on http://mirror.invalid/debian...
I: Retrieving adduser 3.134
I: Validating adduser 3.134
I: Retrieving apt 2.6.1
I: Validating apt 2.6.1
I: Chosen extractor for .deb packages: dpkg-deb
I: Extracting adduser...
I: Extracting apt...
I: Installing core packages...
I: Unpacking required packages...
I: Unpacking adduser...
I: Configuring required packages...
I: Configuring adduser...
I: Configuring apt...
W: something odd
I: Base system installed successfully.
";
        let mut seen = Vec::new();
        let mut stages = Stages::default();
        for line in log.lines() {
            stages.feed(line, &mut |p| {
                seen.push(match p {
                    Progress::Step(s) => format!("step {}", s.as_str()),
                    Progress::Item {
                        step,
                        name,
                        done,
                        total,
                    } => format!("{} {name} {done}/{total:?}", step.as_str()),
                    Progress::Note(n) => format!("note {n}"),
                })
            });
        }
        assert_eq!(
            seen,
            [
                "step resolve",
                "step download",
                "download adduser 1/None",
                "download apt 2/None",
                "step extract",
                "extract adduser 1/None",
                "extract apt 2/None",
                "step install",
                "install adduser 1/Some(4)",
                "install adduser 2/Some(4)",
                "install apt 3/Some(4)",
                "note W: something odd",
            ]
        );
    }

    #[test]
    fn fixture_recipes_load() {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../fixtures/bases");
        let recipe = Recipe::load(&dir.join("python-3.11.json")).unwrap();
        assert_eq!(recipe.suite, "bookworm");
        assert_eq!(recipe.include, ["python3", "python3-venv"]);
        assert_eq!(recipe.mirror, None);
    }

    #[test]
    fn mirror_comes_from_deb822_sources_for_the_suite() {
        let dir = tempfile::tempdir().unwrap();
        fs::create_dir(dir.path().join("sources.list.d")).unwrap();
        fs::write(
            dir.path().join("sources.list.d/debian.sources"),
            "\
Types: deb
# a comment
URIs: http://mirror.invalid/debian
Suites: bookworm bookworm-updates
Components: main
Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg

Types: deb
URIs: http://mirror.invalid/debian-security
Suites: bookworm-security
Components: main
",
        )
        .unwrap();
        assert_eq!(
            mirror_from_apt(dir.path(), "bookworm").as_deref(),
            Some("http://mirror.invalid/debian")
        );
        // Another suite: the first source that is not a security or updates pocket.
        assert_eq!(
            mirror_from_apt(dir.path(), "trixie").as_deref(),
            None,
            "bookworm-updates makes that stanza a pocket source"
        );
    }

    #[test]
    fn mirror_comes_from_one_line_sources_list() {
        let dir = tempfile::tempdir().unwrap();
        fs::write(
            dir.path().join("sources.list"),
            "\
# deb http://old.invalid/debian bookworm main
deb [signed-by=/k.gpg arch=amd64] http://mirror.invalid/debian/ bookworm main
deb http://mirror.invalid/debian-security bookworm-security main
",
        )
        .unwrap();
        assert_eq!(
            mirror_from_apt(dir.path(), "bookworm").as_deref(),
            Some("http://mirror.invalid/debian")
        );
        assert_eq!(
            mirror_from_apt(dir.path(), "trixie").as_deref(),
            Some("http://mirror.invalid/debian")
        );
        assert_eq!(mirror_from_apt(&dir.path().join("none"), "bookworm"), None);
    }

    #[test]
    fn strip_empties_caches_and_docs_but_keeps_licenses() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path();
        for file in [
            "var/lib/apt/lists/deb_dists_bookworm_InRelease",
            "var/lib/apt/lists/partial/x",
            "var/cache/apt/pkgcache.bin",
            "var/log/dpkg.log",
            "etc/resolv.conf",
            "usr/share/doc/bash/README",
            "usr/share/doc/bash/copyright",
            "usr/share/man/man1/bash.1.gz",
            "usr/bin/python3",
        ] {
            fs::create_dir_all(root.join(file).parent().unwrap()).unwrap();
            fs::write(root.join(file), "x").unwrap();
        }
        strip(root, false).unwrap();
        assert!(root.join("var/lib/apt/lists/partial").is_dir());
        assert!(!root.join("var/lib/apt/lists/partial/x").exists());
        assert!(
            !root
                .join("var/lib/apt/lists/deb_dists_bookworm_InRelease")
                .exists()
        );
        assert!(!root.join("var/cache/apt/pkgcache.bin").exists());
        assert!(!root.join("etc/resolv.conf").exists());
        assert!(!root.join("usr/share/doc/bash/README").exists());
        assert!(root.join("usr/share/doc/bash/copyright").exists());
        assert!(!root.join("usr/share/man/man1").exists());
        assert!(root.join("usr/bin/python3").exists());
    }
}
