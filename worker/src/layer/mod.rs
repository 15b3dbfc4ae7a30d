//! The layer writer: turns a directory (an overlay upper dir, or a plain tree such as a base
//! rootfs or an unpacked source) into a deterministic OCI image layer, in one pass:
//! fd-relative walk → tar → sha256 (`diff_id`) → gzip or zstd → sha256 (`digest`) + size →
//! the caller's writer. Synchronous and CPU-bound: async callers run it on a blocking thread.
//!
//! # Policies (the format contract; changing any of them changes digests)
//!
//! - Entries are sorted bytewise per directory, parents before children (depth first);
//!   within a directory the opaque marker comes first, then whiteouts, then the rest.
//! - mtimes are clamped to `[0, epoch]`; no atime/ctime; empty user/group names; numeric
//!   ids mapped by [`IdMap`]; ustar headers with PAX records only where needed.
//! - [`Mode::Upper`]: a character device 0/0 is a whiteout (`.wh.NAME`); a directory whose
//!   `trusted.overlay.opaque` or `user.overlay.opaque` is `y` gets a `.wh..wh..opq` marker;
//!   other overlay xattrs are dropped; `redirect`/`metacopy` are refused.
//!   [`Mode::Plain`]: no overlay semantics; a 0/0 device is an ordinary device node.
//! - Names starting with `.wh.` are never stored (they would read back as whiteouts) and are
//!   reported as skipped. Sockets are skipped and reported. Device nodes follow
//!   [`DevicePolicy`] (default: skipped and reported). FIFOs are stored.
//! - Setuid/setgid bits of regular files are stripped unless [`SetIdPolicy::Keep`]; the
//!   count is reported. Directories keep their setgid bit (group inheritance, not a privilege).
//! - Permission bits come from the tree (the writer never consults the process umask; what
//!   made the tree did), unless [`PermissionPolicy::Normalized`] keeps only what git keeps:
//!   directories 0755, regular files 0755 when any execute bit is set and 0644 otherwise.
//! - Hard links: the first path in archive order is stored as the file, later ones as link
//!   entries (whiteouts, which overlay hard-links to one inode, are never grouped).
//! - Paths longer than [`LayerOptions::max_path_bytes`] (default 4096, what extractors can
//!   open) are refused with [`LayerError::PathTooLong`].
//! - gzip: the tar stream in 1 MiB blocks, each a gzip member of its own (libdeflate at
//!   the given level, a fixed header: mtime 0, OS 255): byte-identical for any thread count.
//!   zstd: always the library's multi-threaded mode (at least one worker) with a fixed job
//!   size ([`ZSTD_JOB_SIZE`]), whose output does not depend on the worker count; no
//!   checksum, no content size.
//! - Memory stays bounded whatever the tree's size: file data streams through one 1 MiB
//!   buffer, the gzip workers get at most a few blocks each (queue, in flight, output
//!   buffers recycled), zstd's job buffers are sized by [`ZSTD_JOB_SIZE`].

mod deflate;
mod tar;
mod walk;
mod whiteout;

use std::fmt;
use std::io::{self, Write};
use std::path::{Path, PathBuf};

use corral_protocol::Digest;
use sha2::{Digest as _, Sha256};

pub use deflate::BLOCK_SIZE as GZIP_BLOCK_SIZE;

/// Input bytes per zstd job (each compressed by one worker, with an overlap of the previous
/// job's data). Part of the zstd format contract like the level: the frames depend on it,
/// never on the worker count. Set rather than left to the library, whose default for level
/// 3 (8 MiB and up, by window size) costs about 60 MiB of job buffers with two workers;
/// 4 MiB halves that for a ~0.1% larger blob.
pub const ZSTD_JOB_SIZE: u32 = 4 << 20;

/// OCI media type of a gzip-compressed layer.
pub const MEDIA_TYPE_GZIP: &str = "application/vnd.oci.image.layer.v1.tar+gzip";
/// OCI media type of a zstd-compressed layer.
pub const MEDIA_TYPE_ZSTD: &str = "application/vnd.oci.image.layer.v1.tar+zstd";

/// The compressor and its level.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Compression {
    /// Deflate level 1–9 (libdeflate's scale, which follows zlib's).
    Gzip { level: u32 },
    /// zstd level 1–19.
    Zstd { level: i32 },
}

impl Default for Compression {
    fn default() -> Self {
        Compression::Gzip { level: 6 }
    }
}

impl Compression {
    /// The encoding and its level, as the action key and results name it: `gzip-6`.
    pub fn label(&self) -> String {
        match self {
            Compression::Gzip { level } => format!("gzip-{level}"),
            Compression::Zstd { level } => format!("zstd-{level}"),
        }
    }

    pub fn media_type(&self) -> &'static str {
        match self {
            Compression::Gzip { .. } => MEDIA_TYPE_GZIP,
            Compression::Zstd { .. } => MEDIA_TYPE_ZSTD,
        }
    }
}

/// What kind of directory is being snapshotted.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Mode {
    /// An overlayfs upper dir: whiteouts and opaque directories become OCI markers.
    #[default]
    Upper,
    /// An ordinary directory tree (base rootfs, unpacked source): stored as it is.
    Plain,
}

/// Maps host ids (the project's uid/gid outside the sandbox) back to the ids the job saw.
/// Ids not listed pass through unchanged.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct IdMap {
    uids: Vec<(u32, u32)>,
    gids: Vec<(u32, u32)>,
    /// Every id becomes this one (for packing a developer's directory: who owned the
    /// checkout must not change the digest).
    squash: Option<(u32, u32)>,
}

impl IdMap {
    /// The identity map.
    pub fn identity() -> Self {
        IdMap::default()
    }

    /// Adds `host -> inner` for user ids.
    pub fn uid(mut self, host: u32, inner: u32) -> Self {
        self.uids.push((host, inner));
        self
    }

    /// Adds `host -> inner` for group ids.
    pub fn gid(mut self, host: u32, inner: u32) -> Self {
        self.gids.push((host, inner));
        self
    }

    /// Maps every uid to `uid` and every gid to `gid`.
    pub fn squash(uid: u32, gid: u32) -> Self {
        IdMap {
            squash: Some((uid, gid)),
            ..IdMap::default()
        }
    }

    pub fn map_uid(&self, host: u32) -> u32 {
        self.squash
            .map_or_else(|| lookup(&self.uids, host), |(uid, _)| uid)
    }

    pub fn map_gid(&self, host: u32) -> u32 {
        self.squash
            .map_or_else(|| lookup(&self.gids, host), |(_, gid)| gid)
    }
}

fn lookup(pairs: &[(u32, u32)], id: u32) -> u32 {
    pairs
        .iter()
        .find(|(host, _)| *host == id)
        .map_or(id, |(_, inner)| *inner)
}

/// What happens to setuid/setgid bits on regular files.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum SetIdPolicy {
    /// Clear them and count how many files had them (the default: a build's output should
    /// not grant privileges unless the job's config says so).
    #[default]
    Strip,
    /// Store them as they are.
    Keep,
}

/// Which permission bits a layer records.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum PermissionPolicy {
    /// The tree's own bits (the snapshot of what a build wrote, a base as imported).
    #[default]
    AsIs,
    /// git's policy, for trees whose bits say more about the host than the content (a
    /// checkout's group and other bits follow the umask of whoever made it): directories
    /// 0755, regular files 0755 when any execute bit is set and 0644 otherwise; symlinks
    /// 0777; FIFOs 0644.
    Normalized,
}

impl PermissionPolicy {
    /// The bits stored for an entry of `kind` whose tree mode is `mode` (setuid/setgid
    /// already applied by the caller).
    pub(crate) fn apply(self, kind: EntryKind, mode: u32) -> u32 {
        match (self, kind) {
            (PermissionPolicy::AsIs, _) => mode & 0o7777,
            (PermissionPolicy::Normalized, EntryKind::Dir) => 0o755,
            (PermissionPolicy::Normalized, EntryKind::File) if mode & 0o111 != 0 => 0o755,
            (PermissionPolicy::Normalized, EntryKind::Symlink) => 0o777,
            (PermissionPolicy::Normalized, _) => 0o644,
        }
    }
}

/// The kinds of entry [`PermissionPolicy`] tells apart.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum EntryKind {
    Dir,
    File,
    Symlink,
    Other,
}

/// What happens to character and block device nodes (other than whiteouts in an upper).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum DevicePolicy {
    /// Leave them out and report them in [`LayerSummary::skipped`] (the default).
    #[default]
    Skip,
    /// Fail with [`LayerError::Device`].
    Refuse,
    /// Store them (for trusted trees, e.g. a base rootfs built by the platform).
    Keep,
}

/// Which extended attributes are stored (as `SCHILY.xattr.*` PAX records). Overlay's own
/// attributes are never stored whatever this says.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct XattrPolicy {
    /// Exact names, or prefixes when they end in `.`.
    pub keep: Vec<String>,
}

impl Default for XattrPolicy {
    fn default() -> Self {
        XattrPolicy {
            keep: vec!["security.capability".into(), "user.".into()],
        }
    }
}

impl XattrPolicy {
    /// Store no extended attributes.
    pub fn none() -> Self {
        XattrPolicy { keep: Vec::new() }
    }

    pub fn keeps(&self, name: &[u8]) -> bool {
        self.keep.iter().any(|k| {
            let k = k.as_bytes();
            if k.ends_with(b".") {
                name.starts_with(k)
            } else {
                name == k
            }
        })
    }
}

/// How to write a layer.
#[derive(Debug, Clone)]
pub struct LayerOptions {
    /// Source-date epoch: later mtimes are clamped to it.
    pub epoch: u64,
    pub compression: Compression,
    /// Compression threads (0 or 1: compress on the calling thread).
    pub threads: usize,
    pub mode: Mode,
    pub id_map: IdMap,
    pub setid: SetIdPolicy,
    pub devices: DevicePolicy,
    /// Stop with [`LayerError::OutputTooLarge`] once the compressed blob would exceed this.
    pub max_output_bytes: Option<u64>,
    /// Stop with [`LayerError::TarTooLarge`] once the uncompressed tar would exceed this
    /// (sparse files cost no disk but expand in the tar).
    pub max_tar_bytes: Option<u64>,
    /// Longest path stored; longer ones fail with [`LayerError::PathTooLong`].
    pub max_path_bytes: usize,
    pub xattrs: XattrPolicy,
    pub permissions: PermissionPolicy,
}

impl Default for LayerOptions {
    fn default() -> Self {
        LayerOptions {
            epoch: 0,
            compression: Compression::default(),
            threads: 1,
            mode: Mode::default(),
            id_map: IdMap::identity(),
            setid: SetIdPolicy::default(),
            devices: DevicePolicy::default(),
            max_output_bytes: None,
            max_tar_bytes: None,
            max_path_bytes: 4096,
            xattrs: XattrPolicy::default(),
            permissions: PermissionPolicy::default(),
        }
    }
}

/// Why an entry was left out of the layer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SkipReason {
    Socket,
    Device,
    /// A real file whose name starts with `.wh.`, which OCI reserves for whiteouts.
    ReservedName,
}

impl SkipReason {
    pub fn as_str(self) -> &'static str {
        match self {
            SkipReason::Socket => "socket",
            SkipReason::Device => "device",
            SkipReason::ReservedName => "reserved_name",
        }
    }
}

/// One entry left out of the layer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Skipped {
    /// Path relative to the snapshotted directory.
    pub path: PathBuf,
    pub reason: SkipReason,
}

/// What was written.
#[derive(Debug, Clone)]
pub struct LayerSummary {
    /// sha256 of the compressed blob.
    pub digest: Digest,
    /// sha256 of the uncompressed tar.
    pub diff_id: Digest,
    /// Bytes of the compressed blob.
    pub size: u64,
    /// Bytes of the uncompressed tar.
    pub tar_size: u64,
    pub media_type: &'static str,
    /// Tar entries written (files, dirs, links, whiteouts, opaque markers).
    pub entries: u64,
    pub skipped: Vec<Skipped>,
    /// Regular files whose setuid/setgid bits were cleared.
    pub setid_stripped: u64,
}

/// A failed snapshot. Every variant names the step; paths are relative to the snapshotted
/// directory and may be any bytes.
#[derive(Debug, thiserror::Error)]
pub enum LayerError {
    #[error("invalid layer options: {0}")]
    Options(String),
    #[error("opening the directory to snapshot {path:?}")]
    OpenRoot { path: PathBuf, source: io::Error },
    #[error("opening directory {path:?}")]
    OpenDir { path: PathBuf, source: io::Error },
    #[error("reading directory {path:?}")]
    ReadDir { path: PathBuf, source: io::Error },
    #[error("inspecting {path:?}")]
    Stat { path: PathBuf, source: io::Error },
    #[error("opening file {path:?}")]
    OpenFile { path: PathBuf, source: io::Error },
    #[error("reading file {path:?}")]
    ReadFile { path: PathBuf, source: io::Error },
    #[error("reading symlink {path:?}")]
    ReadLink { path: PathBuf, source: io::Error },
    #[error("reading extended attributes of {path:?}")]
    ReadXattr { path: PathBuf, source: io::Error },
    #[error("{path:?} changed while it was being snapshotted")]
    Changed { path: PathBuf },
    #[error(
        "{path:?} carries {name}: the overlay was mounted with redirect_dir, which a layer cannot express"
    )]
    Redirect { path: PathBuf, name: String },
    #[error(
        "{path:?} carries {name}: the overlay was mounted with metacopy, which a layer cannot express"
    )]
    Metacopy { path: PathBuf, name: String },
    #[error("{path:?} is a device node ({major}:{minor}) and the device policy refuses them")]
    Device {
        path: PathBuf,
        major: u32,
        minor: u32,
    },
    #[error("a path of {len} bytes exceeds the {max}-byte limit: {path:?}…")]
    PathTooLong {
        path: PathBuf,
        len: usize,
        max: usize,
    },
    #[error("the compressed layer exceeds the {limit}-byte output cap")]
    OutputTooLarge { limit: u64 },
    #[error("the uncompressed layer exceeds the {limit}-byte tar cap")]
    TarTooLarge { limit: u64 },
    #[error("compressing the layer")]
    Compress { source: io::Error },
    #[error("writing the layer")]
    Write { source: io::Error },
}

impl LayerError {
    /// A stable snake_case name for the failure (for JSON output and metrics).
    pub fn kind(&self) -> &'static str {
        match self {
            LayerError::Options(_) => "options",
            LayerError::OpenRoot { .. } => "open_root",
            LayerError::OpenDir { .. } => "open_dir",
            LayerError::ReadDir { .. } => "read_dir",
            LayerError::Stat { .. } => "stat",
            LayerError::OpenFile { .. } => "open_file",
            LayerError::ReadFile { .. } => "read_file",
            LayerError::ReadLink { .. } => "read_link",
            LayerError::ReadXattr { .. } => "read_xattr",
            LayerError::Changed { .. } => "changed",
            LayerError::Redirect { .. } => "overlay_redirect",
            LayerError::Metacopy { .. } => "overlay_metacopy",
            LayerError::Device { .. } => "device",
            LayerError::PathTooLong { .. } => "path_too_long",
            LayerError::OutputTooLarge { .. } => "output_too_large",
            LayerError::TarTooLarge { .. } => "tar_too_large",
            LayerError::Compress { .. } => "compress",
            LayerError::Write { .. } => "write",
        }
    }

    /// Whether the tree itself (written by the job) is at fault: final, not worth a retry.
    /// Everything else is the platform's (I/O, a misconfigured overlay, the destination).
    pub fn is_tree_fault(&self) -> bool {
        matches!(
            self,
            LayerError::Device { .. }
                | LayerError::PathTooLong { .. }
                | LayerError::OutputTooLarge { .. }
                | LayerError::TarTooLarge { .. }
        )
    }
}

/// Writes the layer of `dir` into `out` and says what was written. On error, `out` holds a
/// partial blob the caller must discard.
pub fn write_layer(
    dir: &Path,
    opts: &LayerOptions,
    out: impl Write,
) -> Result<LayerSummary, LayerError> {
    validate(opts)?;
    let root = walk::open_root(dir)?;
    std::thread::scope(|scope| {
        let blob = Blob {
            out,
            sha: Sha256::new(),
            size: 0,
            cap: opts.max_output_bytes,
        };
        let compressor = match opts.compression {
            Compression::Gzip { level } => Compressor::Gzip(
                deflate::GzipWriter::new(scope, level, opts.threads, blob)
                    .map_err(|e| map_out_err(e, opts))?,
            ),
            Compression::Zstd { level } => {
                let mut enc = zstd::stream::write::Encoder::new(blob, level)
                    .map_err(|source| LayerError::Compress { source })?;
                // Multi-threaded mode with any worker count gives the same frames; the
                // single-threaded mode (0 workers) would give different ones.
                let workers = u32::try_from(opts.threads.max(1)).unwrap_or(u32::MAX);
                enc.multithread(workers)
                    .and_then(|()| {
                        enc.set_parameter(zstd::stream::raw::CParameter::JobSize(ZSTD_JOB_SIZE))
                    })
                    .and_then(|()| enc.include_checksum(false))
                    .and_then(|()| enc.include_contentsize(false))
                    .map_err(|source| LayerError::Compress { source })?;
                Compressor::Zstd(enc)
            }
        };
        let mut stream = TarStream {
            sha: Sha256::new(),
            size: 0,
            cap: opts.max_tar_bytes,
            compressor: Some(compressor),
            opts,
        };
        let stats = walk::walk(root, opts, &mut stream)?;
        stream.write(&tar::END)?;
        let diff_id = Digest::from_sha256(stream.sha.clone().finalize().into());
        let tar_size = stream.size;
        let blob = match stream.compressor.take() {
            Some(Compressor::Gzip(w)) => w.finish(),
            Some(Compressor::Zstd(e)) => e.finish(),
            None => unreachable!("the compressor is only taken here"),
        }
        .map_err(|e| map_out_err(e, opts))?;
        let mut out = blob.out;
        out.flush().map_err(|source| LayerError::Write { source })?;
        Ok(LayerSummary {
            digest: Digest::from_sha256(blob.sha.finalize().into()),
            diff_id,
            size: blob.size,
            tar_size,
            media_type: opts.compression.media_type(),
            entries: stats.entries,
            skipped: stats.skipped,
            setid_stripped: stats.setid_stripped,
        })
    })
}

fn validate(opts: &LayerOptions) -> Result<(), LayerError> {
    match opts.compression {
        Compression::Gzip { level } if !(1..=9).contains(&level) => Err(LayerError::Options(
            format!("gzip level {level} is not in 1..=9"),
        )),
        Compression::Zstd { level } if !(1..=19).contains(&level) => Err(LayerError::Options(
            format!("zstd level {level} is not in 1..=19"),
        )),
        _ => Ok(()),
    }
}

/// Marks the io::Error the blob writer returns when the output cap is hit, so it survives
/// the trip through the compressor and comes back typed.
#[derive(Debug)]
struct OutputCap;

impl fmt::Display for OutputCap {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("layer output cap reached")
    }
}

impl std::error::Error for OutputCap {}

fn map_out_err(err: io::Error, opts: &LayerOptions) -> LayerError {
    if err.get_ref().is_some_and(|e| e.is::<OutputCap>()) {
        LayerError::OutputTooLarge {
            limit: opts.max_output_bytes.unwrap_or(0),
        }
    } else {
        LayerError::Write { source: err }
    }
}

/// The compressed blob on its way out: hashed (digest), counted and capped.
struct Blob<W> {
    out: W,
    sha: Sha256,
    size: u64,
    cap: Option<u64>,
}

impl<W: Write> Write for Blob<W> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let size = self.size + buf.len() as u64;
        if self.cap.is_some_and(|cap| size > cap) {
            return Err(io::Error::other(OutputCap));
        }
        self.out.write_all(buf)?;
        self.sha.update(buf);
        self.size = size;
        Ok(buf.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        self.out.flush()
    }
}

enum Compressor<W: Write> {
    Gzip(deflate::GzipWriter<Blob<W>>),
    Zstd(zstd::stream::write::Encoder<'static, Blob<W>>),
}

/// The tar stream: hashed (diff_id), counted, capped, then compressed.
pub(crate) struct TarStream<'o, W: Write> {
    sha: Sha256,
    size: u64,
    cap: Option<u64>,
    compressor: Option<Compressor<W>>,
    opts: &'o LayerOptions,
}

impl<W: Write> TarStream<'_, W> {
    pub(crate) fn write(&mut self, data: &[u8]) -> Result<(), LayerError> {
        let size = self.size + data.len() as u64;
        if let Some(limit) = self.cap.filter(|&cap| size > cap) {
            return Err(LayerError::TarTooLarge { limit });
        }
        self.sha.update(data);
        self.size = size;
        let result = match self.compressor.as_mut() {
            Some(Compressor::Gzip(w)) => w.write(data),
            Some(Compressor::Zstd(e)) => e.write_all(data),
            None => Ok(()),
        };
        result.map_err(|e| map_out_err(e, self.opts))
    }
}
