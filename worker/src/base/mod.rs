//! The base catalogue: named, read-only root filesystems in the worker's data dir, each with
//! its facts (size, file count, origin, layer digest) recorded once, when it is created.
//!
//! ```text
//! <data>/bases/
//!   <name>/base.json        BaseInfo, written once
//!   <name>/rootfs/          the root filesystem; never written after creation
//!   <name>/layer.tar.gz     the base's OCI layer blob, when the layer writer made one
//!   .<name>.lock            serialises creations of <name>
//!   .build-<name>/          a creation in progress (or one that crashed); never a base
//! ```
//!
//! A creation builds into `.build-<name>/` and renames it into place, so a base is either
//! complete or absent; a lock file per name makes concurrent creations of one name safe.

pub mod debootstrap;
pub mod import;
pub mod prerequisites;

use std::collections::HashMap;
use std::fs::{self, File};
use std::io;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::{Arc, Mutex, PoisonError};

use corral_protocol::{BaseName, ByteSize, Layer};
use serde::{Deserialize, Serialize};

use crate::file_id::FileId;

pub use debootstrap::Recipe;
pub use import::ImportFormat;

/// Where the worker keeps its state (bases, stores, caches) unless told otherwise: the
/// config's default `data_dir`.
pub const DEFAULT_DATA_DIR: &str = crate::config::defaults::DATA_DIR;

const BASE_JSON: &str = "base.json";
const ROOTFS: &str = "rootfs";
const LAYER_BLOB: &str = "layer.tar.gz";

/// Everything that can go wrong with bases. Each variant names the step that failed.
#[derive(Debug, thiserror::Error)]
pub enum BaseError {
    #[error("unknown base \"{name}\"; {}", available_text(available, dir))]
    Unknown {
        name: BaseName,
        available: Vec<BaseName>,
        dir: PathBuf,
    },
    #[error("base \"{name}\" already exists in {}; pass --replace to rebuild it", dir.display())]
    Exists { name: BaseName, dir: PathBuf },
    #[error("creating directory {}: {source}", path.display())]
    CreateDir { path: PathBuf, source: io::Error },
    #[error("locking {}: {source}", path.display())]
    Lock { path: PathBuf, source: io::Error },
    #[error("listing {}: {source}", path.display())]
    List { path: PathBuf, source: io::Error },
    #[error("reading {}: {source}", path.display())]
    ReadInfo { path: PathBuf, source: io::Error },
    #[error("{} is not a valid base.json: {source}", path.display())]
    ParseInfo {
        path: PathBuf,
        source: serde_json::Error,
    },
    #[error("writing {}: {source}", path.display())]
    WriteInfo { path: PathBuf, source: io::Error },
    #[error("measuring {}: {source}", path.display())]
    Measure { path: PathBuf, source: io::Error },
    #[error("computing the layer of {}: {source}", path.display())]
    Layer {
        path: PathBuf,
        source: Box<dyn std::error::Error + Send + Sync>,
    },
    #[error("moving {} to {}: {source}", from.display(), to.display())]
    Publish {
        from: PathBuf,
        to: PathBuf,
        source: io::Error,
    },
    #[error("removing {}: {source}", path.display())]
    Remove { path: PathBuf, source: io::Error },
    #[error("{} still has mounts below it ({}); unmount them, then retry", path.display(), list_paths(mounts))]
    StillMounted { path: PathBuf, mounts: Vec<PathBuf> },
    #[error("reading the mount table {}: {source}", path.display())]
    Mounts { path: PathBuf, source: io::Error },

    // Building with debootstrap.
    #[error(transparent)]
    Prerequisite(#[from] prerequisites::PrerequisiteError),
    #[error(
        "not enough space for a base in {}: {} free, about {} needed; free some space or pass \
         --data-dir DIR on a larger filesystem",
        path.display(), ByteSize(*free), ByteSize(*needed)
    )]
    NoSpace {
        path: PathBuf,
        free: u64,
        needed: u64,
    },
    #[error("running {program}: {source} (is it installed, and are you root?)")]
    Spawn {
        program: &'static str,
        source: io::Error,
    },
    #[error(
        "no Debian mirror given and none found in {}; pass --mirror URL",
        list_paths(searched)
    )]
    NoMirror { searched: Vec<PathBuf> },
    #[error("debootstrap failed ({status}); its log is {}:\n{tail}", log.display())]
    Debootstrap {
        status: std::process::ExitStatus,
        log: PathBuf,
        tail: String,
    },
    #[error("writing the debootstrap log {}: {source}", path.display())]
    Log { path: PathBuf, source: io::Error },
    #[error("stripping {}: {source}", path.display())]
    Strip { path: PathBuf, source: io::Error },
    #[error("reading the base recipe {}: {source}", path.display())]
    ReadRecipe { path: PathBuf, source: io::Error },
    #[error("{} is not a valid base recipe: {source}", path.display())]
    ParseRecipe {
        path: PathBuf,
        source: serde_json::Error,
    },

    // Importing a tarball.
    #[error("opening {}: {source}", path.display())]
    Open { path: PathBuf, source: io::Error },
    #[error("reading the tarball {}: {source}", path.display())]
    ReadTar { path: PathBuf, source: io::Error },
    #[error("{}: {why}", path.display())]
    Format { path: PathBuf, why: String },
    #[error("refusing entry {entry:?}: {why}")]
    Hostile { entry: String, why: String },
    #[error("extracting {}: {source}", path.display())]
    Extract { path: PathBuf, source: io::Error },
}

fn available_text(available: &[BaseName], dir: &Path) -> String {
    if available.is_empty() {
        format!(
            "there are no bases in {} yet (create one with `corral base build` or `corral base import`)",
            dir.display()
        )
    } else {
        let names: Vec<&str> = available.iter().map(BaseName::as_str).collect();
        format!("available: {}", names.join(", "))
    }
}

fn list_paths(paths: &[PathBuf]) -> String {
    let shown: Vec<String> = paths.iter().map(|p| p.display().to_string()).collect();
    shown.join(", ")
}

/// The facts of one base, as `base.json` records them.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct BaseInfo {
    pub name: BaseName,
    /// Bytes of file content in the root filesystem (each hard-linked file counted once).
    pub size: u64,
    /// Entries in the root filesystem: files, directories, links.
    pub files: u64,
    pub created: Creation,
    /// The base as an OCI layer; `None` when no layer writer was available at creation.
    pub layer: Option<Layer>,
}

/// When, by what and from what a base was made.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Creation {
    /// RFC 3339, UTC.
    pub at: String,
    /// e.g. `corral 0.1.0`.
    pub by: String,
    pub origin: Origin,
}

/// What a base's root filesystem was made from.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum Origin {
    Debootstrap {
        suite: String,
        variant: String,
        include: Vec<String>,
        mirror: String,
        docs: bool,
    },
    Import {
        file: PathBuf,
        /// sha256 of the tarball as given (compressed or not).
        sha256: String,
        format: ImportFormat,
    },
}

/// One base of the catalogue.
#[derive(Debug, Clone)]
pub struct Base {
    pub info: BaseInfo,
    dir: PathBuf,
}

impl Base {
    pub fn name(&self) -> &BaseName {
        &self.info.name
    }

    /// `<data>/bases/<name>`.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The root filesystem: the lower layer of every job on this base. Read-only by contract.
    pub fn rootfs(&self) -> PathBuf {
        self.dir.join(ROOTFS)
    }

    pub fn layer(&self) -> Option<&Layer> {
        self.info.layer.as_ref()
    }

    /// The base's layer blob (gzip tar), if its layer was computed at creation.
    pub fn layer_blob(&self) -> Option<PathBuf> {
        self.info.layer.as_ref().map(|_| self.dir.join(LAYER_BLOB))
    }
}

/// What to do when a creation finds the name taken.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum IfExists {
    /// Refuse with [`BaseError::Exists`].
    Fail,
    /// Return the existing base untouched (get-or-create).
    Keep,
    /// Build a new one and swap it in. The old one is deleted: drain the jobs that use it
    /// first, since their overlays have it as a lower layer.
    Replace,
}

/// What a long creation is doing, for progress displays.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Step {
    /// debootstrap: fetching and checking the release and package indices.
    Resolve,
    /// debootstrap: fetching packages.
    Download,
    /// debootstrap: extracting the required packages.
    Extract,
    /// debootstrap: unpacking and configuring packages inside the new root.
    Install,
    /// Removing what a build base should not carry.
    Strip,
    /// Reading a tarball into the new root.
    Import,
    /// Counting files and bytes.
    Measure,
    /// Writing the base's OCI layer.
    Layer,
}

impl Step {
    pub fn as_str(self) -> &'static str {
        match self {
            Step::Resolve => "resolve",
            Step::Download => "download",
            Step::Extract => "extract",
            Step::Install => "install",
            Step::Strip => "strip",
            Step::Import => "import",
            Step::Measure => "measure",
            Step::Layer => "layer",
        }
    }
}

/// One progress report.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Progress<'a> {
    /// A step starts.
    Step(Step),
    /// The `done`th item of a step (a package, a file); `total` when known.
    Item {
        step: Step,
        name: &'a str,
        done: u64,
        total: Option<u64>,
    },
    /// A line of a tool's output that is not progress (warnings, errors).
    Note(&'a str),
}

/// The bases of one data dir.
#[derive(Debug, Clone)]
pub struct Catalogue {
    dir: PathBuf,
    /// Bases read before, by name, with the identity of the `base.json` they came from
    /// (shared by clones): a worker asks for the same few bases for every job.
    read: Arc<Mutex<HashMap<BaseName, (FileId, Base)>>>,
}

impl Catalogue {
    /// The catalogue under `<data_dir>/bases`, created if missing.
    pub fn open(data_dir: &Path) -> Result<Self, BaseError> {
        let dir = data_dir.join("bases");
        fs::create_dir_all(&dir).map_err(|source| BaseError::CreateDir {
            path: dir.clone(),
            source,
        })?;
        Ok(Catalogue {
            dir,
            read: Arc::default(),
        })
    }

    /// `<data>/bases`.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Names of the complete bases, sorted.
    pub fn names(&self) -> Result<Vec<BaseName>, BaseError> {
        let entries = fs::read_dir(&self.dir).map_err(|source| BaseError::List {
            path: self.dir.clone(),
            source,
        })?;
        let mut names = Vec::new();
        for entry in entries {
            let entry = entry.map_err(|source| BaseError::List {
                path: self.dir.clone(),
                source,
            })?;
            // Lock files and builds in progress start with a dot, which no base name does.
            let Some(name) = entry
                .file_name()
                .to_str()
                .and_then(|s| BaseName::new(s).ok())
            else {
                continue;
            };
            if entry.path().join(BASE_JSON).is_file() {
                names.push(name);
            }
        }
        names.sort();
        Ok(names)
    }

    /// Every complete base, sorted by name.
    pub fn list(&self) -> Result<Vec<Base>, BaseError> {
        self.names()?.iter().map(|name| self.load(name)).collect()
    }

    /// The base called `name`, or [`BaseError::Unknown`] listing the available ones.
    /// A base read before is answered from memory while its `base.json` is the same file,
    /// unchanged (one `stat`, no read or parse).
    pub fn get(&self, name: &BaseName) -> Result<Base, BaseError> {
        let path = self.dir.join(name.as_str()).join(BASE_JSON);
        if let Some(file) = fs::metadata(&path)
            .ok()
            .filter(fs::Metadata::is_file)
            .map(|m| FileId::of(&m))
        {
            let mut read = self.read.lock().unwrap_or_else(PoisonError::into_inner);
            if let Some((seen, base)) = read.get(name)
                && *seen == file
            {
                return Ok(base.clone());
            }
            let base = self.load(name)?;
            // Remembered only if the file did not change while it was read.
            if fs::metadata(&path).is_ok_and(|m| FileId::of(&m) == file) {
                read.insert(name.clone(), (file, base.clone()));
            }
            return Ok(base);
        }
        Err(BaseError::Unknown {
            name: name.clone(),
            available: self.names()?,
            dir: self.dir.clone(),
        })
    }

    fn load(&self, name: &BaseName) -> Result<Base, BaseError> {
        let dir = self.dir.join(name.as_str());
        let path = dir.join(BASE_JSON);
        let bytes = fs::read(&path).map_err(|source| BaseError::ReadInfo {
            path: path.clone(),
            source,
        })?;
        let info: BaseInfo = serde_json::from_slice(&bytes)
            .map_err(|source| BaseError::ParseInfo { path, source })?;
        Ok(Base { info, dir })
    }

    /// Builds a base with debootstrap.
    pub fn build(
        &self,
        name: &BaseName,
        recipe: &Recipe,
        if_exists: IfExists,
        progress: &mut dyn FnMut(Progress<'_>),
    ) -> Result<Base, BaseError> {
        self.create_with(name, if_exists, progress, |rootfs, progress| {
            debootstrap::build(recipe, rootfs, progress)
        })
    }

    /// Imports a rootfs tarball or a single-layer image tarball as a base.
    pub fn import(
        &self,
        name: &BaseName,
        tarball: &Path,
        if_exists: IfExists,
        progress: &mut dyn FnMut(Progress<'_>),
    ) -> Result<Base, BaseError> {
        self.create_with(name, if_exists, progress, |rootfs, progress| {
            progress(Progress::Step(Step::Import));
            let imported = import::import(tarball, rootfs, progress)?;
            Ok(Origin::Import {
                file: tarball.to_path_buf(),
                sha256: imported.sha256,
                format: imported.format,
            })
        })
    }

    /// Creates base `name`: `fill` writes the root filesystem into the empty dir it is given
    /// and says where it came from; then the base is measured, its layer computed, and the
    /// whole renamed into place. Holds the name's lock throughout, so a concurrent creation
    /// of the same name waits and then sees this one.
    pub fn create_with(
        &self,
        name: &BaseName,
        if_exists: IfExists,
        progress: &mut dyn FnMut(Progress<'_>),
        fill: impl FnOnce(&Path, &mut dyn FnMut(Progress<'_>)) -> Result<Origin, BaseError>,
    ) -> Result<Base, BaseError> {
        let _lock = self.lock(name)?;
        let final_dir = self.dir.join(name.as_str());
        let exists = final_dir.join(BASE_JSON).is_file();
        match (exists, if_exists) {
            (true, IfExists::Fail) => {
                return Err(BaseError::Exists {
                    name: name.clone(),
                    dir: self.dir.clone(),
                });
            }
            (true, IfExists::Keep) => return self.load(name),
            _ => {}
        }

        let build = self.dir.join(format!(".build-{name}"));
        remove_tree(&build)?;
        let rootfs = build.join(ROOTFS);
        fs::create_dir_all(&rootfs).map_err(|source| BaseError::CreateDir {
            path: rootfs.clone(),
            source,
        })?;
        match self.fill_and_describe(name, &build, progress, fill) {
            Ok(info) => {
                self.publish(&build, &final_dir, name)?;
                Ok(Base {
                    info,
                    dir: final_dir,
                })
            }
            Err(err) => {
                // Leave nothing half-built behind, unless something is still mounted in it
                // (removing through a mount would delete the mounted filesystem's files).
                if let Err(cleanup) = remove_tree(&build) {
                    tracing::warn!(%cleanup, "could not remove the failed build");
                }
                Err(err)
            }
        }
    }

    fn fill_and_describe(
        &self,
        name: &BaseName,
        build: &Path,
        progress: &mut dyn FnMut(Progress<'_>),
        fill: impl FnOnce(&Path, &mut dyn FnMut(Progress<'_>)) -> Result<Origin, BaseError>,
    ) -> Result<BaseInfo, BaseError> {
        let rootfs = build.join(ROOTFS);
        let origin = fill(&rootfs, progress)?;
        let mounts = mounts_below(Path::new(MOUNTINFO), &rootfs)?;
        if !mounts.is_empty() {
            return Err(BaseError::StillMounted {
                path: rootfs,
                mounts,
            });
        }
        progress(Progress::Step(Step::Measure));
        let tally = measure(&rootfs)?;
        progress(Progress::Step(Step::Layer));
        let layer = compute_layer(&rootfs, &build.join(LAYER_BLOB))?;
        let info = BaseInfo {
            name: name.clone(),
            size: tally.bytes,
            files: tally.entries,
            created: Creation {
                at: now_rfc3339(),
                by: format!("corral {}", env!("CARGO_PKG_VERSION")),
                origin,
            },
            layer,
        };
        let path = build.join(BASE_JSON);
        let mut json = serde_json::to_vec_pretty(&info).expect("BaseInfo serialises");
        json.push(b'\n');
        fs::write(&path, json).map_err(|source| BaseError::WriteInfo { path, source })?;
        Ok(info)
    }

    /// Swaps the finished build into place. A replaced base is moved aside first and removed
    /// after, so its name always points to one complete base.
    fn publish(&self, build: &Path, final_dir: &Path, name: &BaseName) -> Result<(), BaseError> {
        let old = self.dir.join(format!(".old-{name}"));
        let replacing = final_dir.exists();
        if replacing {
            remove_tree(&old)?;
            rename(final_dir, &old)?;
        }
        rename(build, final_dir)?;
        if replacing {
            remove_tree(&old)?;
        }
        // The renames are durable once the catalogue dir is synced.
        File::open(&self.dir)
            .and_then(|dir| dir.sync_all())
            .map_err(|source| BaseError::Publish {
                from: build.to_path_buf(),
                to: final_dir.to_path_buf(),
                source,
            })
    }

    fn lock(&self, name: &BaseName) -> Result<File, BaseError> {
        let path = self.dir.join(format!(".{name}.lock"));
        let file = File::options()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&path)
            .map_err(|source| BaseError::Lock {
                path: path.clone(),
                source,
            })?;
        // Blocking: a second creation of the same name waits for the first, then sees it.
        file.lock()
            .map_err(|source| BaseError::Lock { path, source })?;
        Ok(file)
    }
}

/// The one place where a base becomes an OCI layer. It runs once per base, at creation, and
/// writes the gzip blob to `out` (kept beside the rootfs, so the pipeline can put it in any
/// store without computing it again).
pub fn compute_layer(rootfs: &Path, out: &Path) -> Result<Option<Layer>, BaseError> {
    use crate::layer::{LayerOptions, Mode, SetIdPolicy, write_layer};
    let err = |source: Box<dyn std::error::Error + Send + Sync>| BaseError::Layer {
        path: rootfs.to_path_buf(),
        source,
    };
    let blob = File::create(out).map_err(|e| err(e.into()))?;
    let options = LayerOptions {
        mode: Mode::Plain,
        // Clamp nothing: a base keeps its own mtimes (its .pyc files check them). The layer
        // is computed once, so its digest is fixed for the base's life; nor may the time
        // of the import matter, so that one tarball imported anywhere gives one digest.
        epoch: u64::MAX,
        // The base as built (su, mount): the sandbox runs with no_new_privs anyway.
        setid: SetIdPolicy::Keep,
        threads: std::thread::available_parallelism().map_or(1, usize::from),
        ..LayerOptions::default()
    };
    let mut writer = io::BufWriter::new(blob);
    let summary = write_layer(rootfs, &options, &mut writer).map_err(|e| err(e.into()))?;
    let blob = writer
        .into_inner()
        .map_err(|e| err(e.into_error().into()))?;
    blob.sync_all().map_err(|e| err(e.into()))?;
    Ok(Some(Layer {
        digest: summary.digest,
        diff_id: summary.diff_id,
        size: summary.size,
        media_type: summary.media_type.to_string(),
    }))
}

/// Files and bytes of a tree.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Tally {
    pub entries: u64,
    pub bytes: u64,
}

/// Counts the entries under `root` (not following links) and the bytes of regular files,
/// each hard-linked inode once.
pub fn measure(root: &Path) -> Result<Tally, BaseError> {
    let mut tally = Tally::default();
    let mut seen = std::collections::HashSet::new();
    let mut pending = vec![root.to_path_buf()];
    while let Some(dir) = pending.pop() {
        let err = |source| BaseError::Measure {
            path: dir.clone(),
            source,
        };
        for entry in fs::read_dir(&dir).map_err(err)? {
            let entry = entry.map_err(err)?;
            let meta = entry.metadata().map_err(err)?;
            tally.entries += 1;
            if meta.is_dir() {
                pending.push(entry.path());
            } else if meta.is_file() && (meta.nlink() == 1 || seen.insert((meta.dev(), meta.ino())))
            {
                tally.bytes += meta.len();
            }
        }
    }
    Ok(tally)
}

const MOUNTINFO: &str = "/proc/self/mountinfo";

/// Mount points at or below `path`, from a mountinfo file (a parameter, so tests can feed a
/// fake one).
pub fn mounts_below(mountinfo: &Path, path: &Path) -> Result<Vec<PathBuf>, BaseError> {
    let text = fs::read_to_string(mountinfo).map_err(|source| BaseError::Mounts {
        path: mountinfo.to_path_buf(),
        source,
    })?;
    Ok(parse_mounts_below(&text, path))
}

fn parse_mounts_below(mountinfo: &str, path: &Path) -> Vec<PathBuf> {
    mountinfo
        .lines()
        .filter_map(|line| line.split(' ').nth(4))
        .map(|field| PathBuf::from(unescape_mount_field(field)))
        .filter(|mount| mount.starts_with(path))
        .collect()
}

/// mountinfo escapes space, tab, newline and backslash as `\ooo`.
fn unescape_mount_field(field: &str) -> String {
    let bytes = field.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let octal = bytes
            .get(i + 1..i + 4)
            .filter(|d| bytes[i] == b'\\' && d.iter().all(|c| (b'0'..=b'7').contains(c)));
        match octal {
            Some(d) => {
                out.push((d[0] - b'0') * 64 + (d[1] - b'0') * 8 + (d[2] - b'0'));
                i += 4;
            }
            None => {
                out.push(bytes[i]);
                i += 1;
            }
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// Removes a build or an old base. Refuses while anything is mounted below it; tries a lazy
/// unmount first, since the only mounts there are those a crashed debootstrap left.
fn remove_tree(path: &Path) -> Result<(), BaseError> {
    if fs::symlink_metadata(path).is_err() {
        return Ok(());
    }
    let mountinfo = Path::new(MOUNTINFO);
    if !mounts_below(mountinfo, path)?.is_empty() {
        let _ = Command::new("umount")
            .args(["--recursive", "--lazy"])
            .arg(path)
            .status();
        let mounts = mounts_below(mountinfo, path)?;
        if !mounts.is_empty() {
            return Err(BaseError::StillMounted {
                path: path.to_path_buf(),
                mounts,
            });
        }
    }
    fs::remove_dir_all(path).map_err(|source| BaseError::Remove {
        path: path.to_path_buf(),
        source,
    })
}

fn rename(from: &Path, to: &Path) -> Result<(), BaseError> {
    fs::rename(from, to).map_err(|source| BaseError::Publish {
        from: from.to_path_buf(),
        to: to.to_path_buf(),
        source,
    })
}

fn now_rfc3339() -> String {
    time::OffsetDateTime::now_utc()
        .replace_nanosecond(0)
        .ok()
        .and_then(|t| {
            t.format(&time::format_description::well_known::Rfc3339)
                .ok()
        })
        .unwrap_or_default()
}

/// A size for people, e.g. `183.2 MiB`.
pub fn human_size(bytes: u64) -> String {
    ByteSize(bytes).to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_mounts_below_a_path_including_escaped_ones() {
        let info = "\
22 1 0:21 / / rw shared:1 - ext4 /dev/vda rw
90 22 0:5 / /var/lib/corral/bases/.build-py/rootfs/proc rw - proc proc rw
91 22 0:6 / /var/lib/corral/bases/.build-py/rootfs/odd\\040dir rw - tmpfs tmpfs rw
92 22 0:7 / /var/lib/corral/bases/.build-py2/rootfs/proc rw - proc proc rw
";
        let below = parse_mounts_below(info, Path::new("/var/lib/corral/bases/.build-py"));
        assert_eq!(
            below,
            vec![
                PathBuf::from("/var/lib/corral/bases/.build-py/rootfs/proc"),
                PathBuf::from("/var/lib/corral/bases/.build-py/rootfs/odd dir"),
            ]
        );
    }

    #[test]
    fn unknown_base_lists_the_available_ones() {
        let name = BaseName::new("nope").unwrap();
        let err = BaseError::Unknown {
            name: name.clone(),
            available: vec![
                BaseName::new("python-3.11").unwrap(),
                BaseName::new("tiny").unwrap(),
            ],
            dir: PathBuf::from("/d/bases"),
        };
        assert_eq!(
            err.to_string(),
            "unknown base \"nope\"; available: python-3.11, tiny"
        );
        let none = BaseError::Unknown {
            name,
            available: vec![],
            dir: PathBuf::from("/d/bases"),
        };
        assert!(none.to_string().contains("no bases in /d/bases yet"));
    }

    fn fill(rootfs: &Path, content: &str) -> Result<Origin, BaseError> {
        fs::create_dir(rootfs.join("etc")).unwrap();
        fs::write(rootfs.join("etc/os-release"), content).unwrap();
        Ok(Origin::Import {
            file: "test.tar".into(),
            sha256: "sha256:00".into(),
            format: ImportFormat::RootfsTar,
        })
    }

    #[test]
    fn creation_keeps_fails_or_replaces_an_existing_base() {
        let data = tempfile::tempdir().unwrap();
        let catalogue = Catalogue::open(data.path()).unwrap();
        let name = BaseName::new("b").unwrap();
        let quiet = &mut |_: Progress<'_>| {};
        let base = catalogue
            .create_with(&name, IfExists::Fail, quiet, |r, _| fill(r, "one"))
            .unwrap();
        assert_eq!((base.info.files, base.info.size), (2, 3));
        assert_eq!(catalogue.get(&name).unwrap().info, base.info);

        let err = catalogue
            .create_with(&name, IfExists::Fail, quiet, |r, _| fill(r, "two"))
            .unwrap_err();
        assert!(matches!(err, BaseError::Exists { .. }));
        let kept = catalogue
            .create_with(&name, IfExists::Keep, quiet, |_, _| {
                panic!("must not rebuild")
            })
            .unwrap();
        assert_eq!(kept.info, base.info);
        let replaced = catalogue
            .create_with(&name, IfExists::Replace, quiet, |r, _| fill(r, "three"))
            .unwrap();
        assert_eq!(
            fs::read_to_string(replaced.rootfs().join("etc/os-release")).unwrap(),
            "three"
        );
        // The base read before is not answered from memory once replaced, by this
        // catalogue or a clone of it; nor once its base.json is rewritten in place.
        let clone = catalogue.clone();
        assert_eq!(catalogue.get(&name).unwrap().info, replaced.info);
        assert_eq!(clone.get(&name).unwrap().info, replaced.info);
        assert_ne!(replaced.info, base.info);
        let path = replaced.dir().join(BASE_JSON);
        let mut edited = replaced.info.clone();
        edited.size += 1;
        fs::write(&path, serde_json::to_vec(&edited).unwrap()).unwrap();
        assert_eq!(clone.get(&name).unwrap().info, edited);
        assert_eq!(catalogue.get(&name).unwrap().info, edited);

        // A failed creation leaves neither a base nor a build behind.
        let other = BaseName::new("c").unwrap();
        let err = catalogue
            .create_with(&other, IfExists::Fail, quiet, |rootfs, _| {
                fs::write(rootfs.join("half"), "x").unwrap();
                Err(BaseError::Format {
                    path: "x.tar".into(),
                    why: "broken".into(),
                })
            })
            .unwrap_err();
        assert!(matches!(err, BaseError::Format { .. }));
        assert_eq!(catalogue.names().unwrap(), vec![name]);
        let hidden: Vec<_> = fs::read_dir(catalogue.dir())
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .filter(|n| !n.ends_with(".lock") && n.starts_with('.'))
            .collect();
        assert!(hidden.is_empty(), "{hidden:?}");
    }

    #[test]
    fn base_info_round_trips_with_and_without_a_layer() {
        let info = BaseInfo {
            name: BaseName::new("b").unwrap(),
            size: 10,
            files: 2,
            created: Creation {
                at: now_rfc3339(),
                by: "corral test".into(),
                origin: Origin::Debootstrap {
                    suite: "bookworm".into(),
                    variant: "minbase".into(),
                    include: vec!["python3".into()],
                    mirror: "http://mirror.invalid/debian".into(),
                    docs: false,
                },
            },
            layer: None,
        };
        let json = serde_json::to_value(&info).unwrap();
        assert_eq!(json["layer"], serde_json::Value::Null);
        assert_eq!(json["created"]["origin"]["kind"], "debootstrap");
        assert_eq!(serde_json::from_value::<BaseInfo>(json).unwrap(), info);
    }
}
