//! Hostile-input safe extraction of a tar or tar.gz bundle.
//!
//! Paths are never resolved as strings against the host: every entry is placed by walking
//! its parent one component at a time from a directory fd with `openat2(RESOLVE_BENEATH |
//! RESOLVE_NO_SYMLINKS)` and `O_NOFOLLOW`, and created with `*at` calls relative to that fd.
//! So a symlink the archive created earlier can never be written through, and nothing
//! lands outside the destination, whatever the names say. Names are also checked up front
//! (absolute paths and `..` are refused outright, not normalised away) so the error says
//! what was wrong.
//!
//! Policy: device nodes and FIFOs are refused; setuid/setgid regular files are refused,
//! while setgid/sticky bits on directories are stripped (they only steer group inheritance,
//! which the chown to one gid makes moot); a later entry may replace an earlier file or
//! symlink (tar semantics, done by unlink then create, never through the old entry) but
//! never a directory; hard links must name an earlier regular file inside the tree.
//! Directory modes and times are applied at the end so read-only directories do not block
//! their own contents.
//!
//! Modes come from the bundle alone, never from the process umask: a file or directory
//! gets its entry's permission bits (less what the policy above strips), applied with
//! `fchmod`; a directory the bundle implies but does not list gets 0755; symlinks have no
//! mode. The destination itself (the bundle's `./`) keeps the mode its caller gave it.

use std::cell::Cell;
use std::fs::File;
use std::io::{self, BufReader, Read, Seek, Write};
use std::os::fd::{AsFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::rc::Rc;

use flate2::read::MultiGzDecoder;
use rustix::fs::{AtFlags, FileType, Gid, Mode, OFlags, ResolveFlags, Timespec, Timestamps, Uid};
use rustix::io::Errno;
use tar::EntryType;

use super::{ExtractLimits, Owner, SourceError};

/// What an extraction laid out.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ExtractStats {
    pub entries: u64,
    pub files: u64,
    pub bytes: u64,
}

const NAME_MAX: usize = 255;
const PATH_MAX: usize = 4096;
/// The mode of a directory the bundle implies (a parent of an entry) but does not list.
const IMPLIED_DIR_MODE: u32 = 0o755;
/// Deepest nesting accepted. Each entry is placed by walking its parents one `openat2` at
/// a time, so this bounds the work a bundle of many deep paths can cost.
const MAX_DEPTH: usize = 256;

/// Checks that `bundle` is a safe bundle by extracting it into a throwaway directory.
pub fn validate(bundle: &Path, limits: &ExtractLimits) -> Result<ExtractStats, SourceError> {
    let scratch = tempfile::Builder::new()
        .prefix("corral-validate-")
        .tempdir()
        .map_err(|source| SourceError::Write {
            path: std::env::temp_dir(),
            source,
        })?;
    extract(bundle, scratch.path(), None, limits)
}

/// Extracts `bundle` (tar, or gzip-compressed tar) into the existing directory `dest`.
/// Every entry is chowned to `owner` when given.
pub fn extract(
    bundle: &Path,
    dest: &Path,
    owner: Option<Owner>,
    limits: &ExtractLimits,
) -> Result<ExtractStats, SourceError> {
    extract_with(bundle, dest, owner, limits, false)
}

/// Extracts an OCI image layer into the existing directory `dest`, to be an overlay lower
/// dir: the same hostile-input rules as a bundle, except that setuid and setgid bits are
/// dropped rather than refused (a base has such programs; `no_new_privs` makes them plain
/// anyway), and OCI whiteouts become overlayfs ones: `.wh.NAME` a 0/0 character device
/// `NAME`, `.wh..wh..opq` the `trusted.overlay.opaque` mark on its directory. Entries keep
/// the extracting process's owner (root): a layer cache is shared by every project.
pub fn extract_layer(
    blob: &Path,
    dest: &Path,
    limits: &ExtractLimits,
) -> Result<ExtractStats, SourceError> {
    extract_with(blob, dest, None, limits, true)
}

fn extract_with(
    bundle: &Path,
    dest: &Path,
    owner: Option<Owner>,
    limits: &ExtractLimits,
    layer: bool,
) -> Result<ExtractStats, SourceError> {
    let open = |source| SourceError::Open {
        path: bundle.to_path_buf(),
        source,
    };
    let mut file = File::open(bundle).map_err(open)?;
    let mut magic = [0u8; 2];
    let gzip = file.read_exact(&mut magic).is_ok() && magic == [0x1f, 0x8b];
    file.rewind().map_err(open)?;

    let compressed = Rc::new(Cell::new(0u64));
    let uncompressed = Rc::new(Cell::new(0u64));
    let file_bytes = Rc::new(Cell::new(0u64));
    let counted = Counting {
        inner: BufReader::new(file),
        count: compressed.clone(),
        guard: None,
    };
    let stream: Box<dyn Read> = if gzip {
        Box::new(MultiGzDecoder::new(counted))
    } else {
        Box::new(counted)
    };
    // The guard stops the tar reader itself: it buffers PAX and GNU long-name members
    // whole, so a bomb hidden there must be cut off inside the read, not after it.
    let stream = Counting {
        inner: stream,
        count: uncompressed.clone(),
        guard: Some(Guard {
            compressed: gzip.then(|| compressed.clone()),
            file_bytes: file_bytes.clone(),
            limits: *limits,
        }),
    };
    let root = rustix::fs::open(
        dest,
        OFlags::DIRECTORY | OFlags::RDONLY | OFlags::CLOEXEC | OFlags::NOFOLLOW,
        Mode::empty(),
    )
    .map_err(|e| SourceError::Open {
        path: dest.to_path_buf(),
        source: e.into(),
    })?;
    let mut x = Extraction {
        root,
        dest: dest.to_path_buf(),
        owner,
        limits: *limits,
        gzip,
        compressed,
        uncompressed,
        stats: ExtractStats::default(),
        file_bytes,
        dirs: Vec::new(),
        layer,
    };
    let mut archive = tar::Archive::new(stream);
    let entries = archive.entries().map_err(|e| corrupt("", &e))?;
    let stream_err = |x: &Extraction, e: &io::Error| x.bomb_or_corrupt("", e);
    for entry in entries {
        let mut entry = entry.map_err(|e| stream_err(&x, &e))?;
        x.stats.entries += 1;
        if x.stats.entries > limits.max_entries {
            return Err(SourceError::TooManyEntries {
                limit: limits.max_entries,
            });
        }
        x.entry(&mut entry)?;
        x.check_ratio()?;
    }
    x.finish_dirs()?;
    Ok(x.stats)
}

/// The prefix of an OCI whiteout's name, and the name of an opaque-directory marker.
const WHITEOUT: &[u8] = b".wh.";
const OPAQUE: &[u8] = b".wh..wh..opq";

struct Extraction {
    root: OwnedFd,
    dest: PathBuf,
    owner: Option<Owner>,
    limits: ExtractLimits,
    gzip: bool,
    compressed: Rc<Cell<u64>>,
    uncompressed: Rc<Cell<u64>>,
    stats: ExtractStats,
    /// `stats.bytes`, shared with the stream guard.
    file_bytes: Rc<Cell<u64>>,
    /// Directories whose mode and mtime are applied last: (components, mode, mtime).
    dirs: Vec<(Vec<Vec<u8>>, u32, u64)>,
    /// An image layer rather than a source bundle (see [`extract_layer`]).
    layer: bool,
}

impl Extraction {
    fn entry<R: Read>(&mut self, entry: &mut tar::Entry<'_, R>) -> Result<(), SourceError> {
        let raw = entry.path_bytes().into_owned();
        let shown = show(&raw);
        let mut kind = entry.header().entry_type();
        // Pre-POSIX archives mark directories only by a trailing slash.
        if kind == EntryType::Regular && raw.ends_with(b"/") && entry.size() == 0 {
            kind = EntryType::Directory;
        }
        if kind == EntryType::XGlobalHeader {
            return Ok(());
        }
        let comps = components(&raw)?;
        let mode = entry.header().mode().map_err(|e| corrupt(&shown, &e))?;
        let mtime = entry.header().mtime().unwrap_or(0);
        let Some((name, parents)) = comps.split_last() else {
            // `./` itself: the destination exists already; its mode is the caller's.
            return Ok(());
        };
        if self.layer
            && matches!(kind, EntryType::Regular | EntryType::Continuous)
            && name.starts_with(WHITEOUT)
        {
            return self.whiteout(parents, name, &shown);
        }
        match kind {
            EntryType::Regular | EntryType::Continuous => {
                if mode & 0o6000 != 0 && !self.layer {
                    return Err(SourceError::SetId { path: shown, mode });
                }
                let size = entry.size();
                if self.stats.bytes.saturating_add(size) > self.limits.max_total_bytes {
                    return Err(SourceError::TooLarge {
                        limit: self.limits.max_total_bytes,
                    });
                }
                let parent = self.walk(parents, &shown, true)?;
                self.make_room(&parent, name, &shown)?;
                let fd = rustix::fs::openat(
                    &parent,
                    name.as_slice(),
                    OFlags::CREATE
                        | OFlags::EXCL
                        | OFlags::WRONLY
                        | OFlags::NOFOLLOW
                        | OFlags::CLOEXEC,
                    Mode::from_raw_mode(0o600),
                )
                .map_err(|e| self.write_err(&shown, e))?;
                let mut out = File::from(fd);
                self.copy(entry, &mut out, &shown)?;
                self.own(&out, &shown)?;
                rustix::fs::fchmod(&out, Mode::from_raw_mode(mode & 0o777))
                    .map_err(|e| self.write_err(&shown, e))?;
                rustix::fs::futimens(&out, &times(mtime)).map_err(|e| self.write_err(&shown, e))?;
                self.stats.files += 1;
            }
            EntryType::Directory => {
                let parent = self.walk(parents, &shown, true)?;
                match rustix::fs::mkdirat(&parent, name.as_slice(), Mode::from_raw_mode(0o700)) {
                    Ok(()) => self.own_at(&parent, name, &shown)?,
                    Err(Errno::EXIST) => {
                        let st =
                            rustix::fs::statat(&parent, name.as_slice(), AtFlags::SYMLINK_NOFOLLOW)
                                .map_err(|e| self.write_err(&shown, e))?;
                        if FileType::from_raw_mode(st.st_mode) != FileType::Directory {
                            return Err(SourceError::Collision { path: shown });
                        }
                    }
                    Err(e) => return Err(self.write_err(&shown, e)),
                }
                self.dirs.push((comps.clone(), mode & 0o777, mtime));
            }
            EntryType::Symlink => {
                let target = entry
                    .link_name_bytes()
                    .map(|t| t.into_owned())
                    .filter(|t| !t.is_empty() && !t.contains(&0))
                    .ok_or_else(|| SourceError::Corrupt {
                        entry: shown.clone(),
                        reason: "symlink without a usable target".into(),
                    })?;
                if target.len() > PATH_MAX {
                    return Err(SourceError::PathTooLong { path: shown });
                }
                let parent = self.walk(parents, &shown, true)?;
                self.make_room(&parent, name, &shown)?;
                rustix::fs::symlinkat(target.as_slice(), &parent, name.as_slice())
                    .map_err(|e| self.write_err(&shown, e))?;
                self.own_at(&parent, name, &shown)?;
                rustix::fs::utimensat(
                    &parent,
                    name.as_slice(),
                    &times(mtime),
                    AtFlags::SYMLINK_NOFOLLOW,
                )
                .map_err(|e| self.write_err(&shown, e))?;
            }
            EntryType::Link => {
                let target_raw = entry
                    .link_name_bytes()
                    .map(|t| t.into_owned())
                    .unwrap_or_default();
                let target = show(&target_raw);
                let out_of_tree = || SourceError::HardLinkOutOfTree {
                    path: shown.clone(),
                    target: target.clone(),
                };
                let tcomps = match components(&target_raw) {
                    Ok(c) if !c.is_empty() => c,
                    Ok(_)
                    | Err(SourceError::AbsolutePath { .. })
                    | Err(SourceError::ParentDir { .. }) => return Err(out_of_tree()),
                    Err(e) => return Err(e),
                };
                let (tname, tparents) = tcomps.split_last().expect("not empty");
                let tparent = match self.walk(tparents, &shown, false) {
                    Ok(fd) => fd,
                    Err(SourceError::Write { source, .. })
                        if source.kind() == io::ErrorKind::NotFound =>
                    {
                        return Err(SourceError::HardLinkTarget {
                            path: shown,
                            target,
                            reason: "no such file earlier in the bundle",
                        });
                    }
                    Err(e) => return Err(e),
                };
                let st =
                    match rustix::fs::statat(&tparent, tname.as_slice(), AtFlags::SYMLINK_NOFOLLOW)
                    {
                        Ok(st) => st,
                        Err(Errno::NOENT) => {
                            return Err(SourceError::HardLinkTarget {
                                path: shown,
                                target,
                                reason: "no such file earlier in the bundle",
                            });
                        }
                        Err(e) => return Err(self.write_err(&shown, e)),
                    };
                if FileType::from_raw_mode(st.st_mode) != FileType::RegularFile {
                    return Err(SourceError::HardLinkTarget {
                        path: shown,
                        target,
                        reason: "the target is not a regular file",
                    });
                }
                let parent = self.walk(parents, &shown, true)?;
                self.make_room(&parent, name, &shown)?;
                rustix::fs::linkat(
                    &tparent,
                    tname.as_slice(),
                    &parent,
                    name.as_slice(),
                    AtFlags::empty(),
                )
                .map_err(|e| self.write_err(&shown, e))?;
            }
            EntryType::Char => {
                return Err(SourceError::SpecialFile {
                    path: shown,
                    kind: "character device",
                });
            }
            EntryType::Block => {
                return Err(SourceError::SpecialFile {
                    path: shown,
                    kind: "block device",
                });
            }
            EntryType::Fifo => {
                return Err(SourceError::SpecialFile {
                    path: shown,
                    kind: "FIFO",
                });
            }
            other => {
                return Err(SourceError::UnsupportedEntry {
                    path: shown,
                    kind: format!("{other:?}"),
                });
            }
        }
        Ok(())
    }

    /// Opens the directory `comps` beneath the root, one component at a time, never
    /// following a symlink; missing directories are created when `create`.
    fn walk(&self, comps: &[Vec<u8>], shown: &str, create: bool) -> Result<OwnedFd, SourceError> {
        let mut dir = open_beneath(&self.root, b".").map_err(|e| self.write_err(shown, e))?;
        for comp in comps {
            let next = match open_beneath(&dir, comp.as_slice()) {
                Err(Errno::NOENT) if create => {
                    let made = match rustix::fs::mkdirat(
                        &dir,
                        comp.as_slice(),
                        Mode::from_raw_mode(IMPLIED_DIR_MODE),
                    ) {
                        Ok(()) => {
                            self.own_at(&dir, comp, shown)?;
                            true
                        }
                        Err(Errno::EXIST) => false,
                        Err(e) => return Err(self.write_err(shown, e)),
                    };
                    let opened = open_beneath(&dir, comp.as_slice());
                    // mkdir's mode went through the umask; the policy's mode must not.
                    if made && let Ok(fd) = &opened {
                        rustix::fs::fchmod(fd, Mode::from_raw_mode(IMPLIED_DIR_MODE))
                            .map_err(|e| self.write_err(shown, e))?;
                    }
                    opened
                }
                other => other,
            };
            dir = match next {
                Ok(fd) => fd,
                // A symlink (ELOOP, EXDEV from RESOLVE_BENEATH) or a file (ENOTDIR) where a
                // directory should be: the archive is trying to steer a later write.
                Err(Errno::LOOP | Errno::XDEV | Errno::NOTDIR) => {
                    return Err(SourceError::ThroughSymlink {
                        path: shown.to_string(),
                    });
                }
                Err(e) => return Err(self.write_err(shown, e)),
            };
        }
        Ok(dir)
    }

    /// An OCI whiteout as overlayfs reads it in a lower dir.
    fn whiteout(
        &mut self,
        parents: &[Vec<u8>],
        name: &[u8],
        shown: &str,
    ) -> Result<(), SourceError> {
        let parent = self.walk(parents, shown, true)?;
        if name == OPAQUE {
            return rustix::fs::fsetxattr(
                &parent,
                "trusted.overlay.opaque",
                b"y",
                rustix::fs::XattrFlags::empty(),
            )
            .map_err(|e| self.write_err(shown, e));
        }
        let hidden = &name[WHITEOUT.len()..];
        if hidden.is_empty() || hidden == b"." || hidden == b".." {
            return Err(SourceError::Corrupt {
                entry: shown.to_owned(),
                reason: "a whiteout that names nothing".into(),
            });
        }
        self.make_room(&parent, hidden, shown)?;
        rustix::fs::mknodat(
            &parent,
            hidden,
            FileType::CharacterDevice,
            Mode::empty(),
            rustix::fs::makedev(0, 0),
        )
        .map_err(|e| self.write_err(shown, e))
    }

    /// Removes an earlier file or symlink of the same name; refuses to replace a directory.
    fn make_room(&self, parent: &OwnedFd, name: &[u8], shown: &str) -> Result<(), SourceError> {
        match rustix::fs::statat(parent, name, AtFlags::SYMLINK_NOFOLLOW) {
            Err(Errno::NOENT) => Ok(()),
            Err(e) => Err(self.write_err(shown, e)),
            Ok(st) if FileType::from_raw_mode(st.st_mode) == FileType::Directory => {
                Err(SourceError::ReplaceDirectory {
                    path: shown.to_string(),
                })
            }
            Ok(_) => rustix::fs::unlinkat(parent, name, AtFlags::empty())
                .map_err(|e| self.write_err(shown, e)),
        }
    }

    fn copy<R: Read>(
        &mut self,
        entry: &mut tar::Entry<'_, R>,
        out: &mut File,
        shown: &str,
    ) -> Result<(), SourceError> {
        let mut buf = vec![0u8; 1 << 16];
        loop {
            let n = match entry.read(&mut buf) {
                Ok(0) => break,
                Ok(n) => n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(self.bomb_or_corrupt(shown, &e)),
            };
            self.stats.bytes += n as u64;
            self.file_bytes.set(self.stats.bytes);
            if self.stats.bytes > self.limits.max_total_bytes {
                return Err(SourceError::TooLarge {
                    limit: self.limits.max_total_bytes,
                });
            }
            out.write_all(&buf[..n])
                .map_err(|source| SourceError::Write {
                    path: self.dest.join(shown),
                    source,
                })?;
            self.check_ratio()?;
        }
        Ok(())
    }

    fn check_ratio(&self) -> Result<(), SourceError> {
        let (c, u) = (self.compressed.get(), self.uncompressed.get());
        if self.gzip && u > self.limits.ratio_floor_bytes && u / c.max(1) > self.limits.max_ratio {
            return Err(SourceError::CompressionRatio {
                limit: self.limits.max_ratio,
            });
        }
        Ok(())
    }

    /// A read error is a corrupt archive, unless the stream was already past a cap.
    fn bomb_or_corrupt(&self, shown: &str, e: &io::Error) -> SourceError {
        if let Err(bomb) = self.check_ratio() {
            return bomb;
        }
        if is_stream_too_long(e) {
            return SourceError::HeadersTooLarge {
                limit: self.limits.max_header_bytes,
            };
        }
        corrupt(shown, e)
    }

    fn own(&self, fd: impl AsFd, shown: &str) -> Result<(), SourceError> {
        if let Some(o) = self.owner {
            rustix::fs::fchown(fd, Some(Uid::from_raw(o.uid)), Some(Gid::from_raw(o.gid)))
                .map_err(|e| self.write_err(shown, e))?;
        }
        Ok(())
    }

    fn own_at(&self, parent: &OwnedFd, name: &[u8], shown: &str) -> Result<(), SourceError> {
        if let Some(o) = self.owner {
            rustix::fs::chownat(
                parent,
                name,
                Some(Uid::from_raw(o.uid)),
                Some(Gid::from_raw(o.gid)),
                AtFlags::SYMLINK_NOFOLLOW,
            )
            .map_err(|e| self.write_err(shown, e))?;
        }
        Ok(())
    }

    /// Applies directory modes and times, deepest first so a parent's mtime is final.
    fn finish_dirs(&mut self) -> Result<(), SourceError> {
        let mut dirs = std::mem::take(&mut self.dirs);
        dirs.sort_by(|a, b| b.0.len().cmp(&a.0.len()).then_with(|| a.0.cmp(&b.0)));
        for (comps, mode, mtime) in dirs {
            let shown = show(&comps.join(&b'/'));
            let fd = self.walk(&comps, &shown, false)?;
            rustix::fs::fchmod(&fd, Mode::from_raw_mode(mode))
                .map_err(|e| self.write_err(&shown, e))?;
            rustix::fs::futimens(&fd, &times(mtime)).map_err(|e| self.write_err(&shown, e))?;
        }
        Ok(())
    }

    fn write_err(&self, shown: &str, e: Errno) -> SourceError {
        SourceError::Write {
            path: self.dest.join(shown),
            source: e.into(),
        }
    }
}

/// Splits an archive path into its components, refusing absolute paths and `..`; `.` and
/// empty components are dropped.
fn components(raw: &[u8]) -> Result<Vec<Vec<u8>>, SourceError> {
    let shown = || show(raw);
    if raw.first() == Some(&b'/') {
        return Err(SourceError::AbsolutePath { path: shown() });
    }
    if raw.len() > PATH_MAX {
        return Err(SourceError::PathTooLong { path: shown() });
    }
    if raw.contains(&0) {
        return Err(SourceError::Corrupt {
            entry: shown(),
            reason: "a NUL byte in a name".into(),
        });
    }
    let mut out = Vec::new();
    for comp in raw.split(|&b| b == b'/') {
        match comp {
            b"" | b"." => {}
            b".." => return Err(SourceError::ParentDir { path: shown() }),
            c if c.len() > NAME_MAX => return Err(SourceError::PathTooLong { path: shown() }),
            c => out.push(c.to_vec()),
        }
    }
    if out.len() > MAX_DEPTH {
        return Err(SourceError::PathTooLong { path: shown() });
    }
    Ok(out)
}

/// Whether `e` (possibly wrapped by the tar reader) is the stream guard's length cap.
fn is_stream_too_long(e: &io::Error) -> bool {
    let mut cur: Option<&(dyn std::error::Error + 'static)> = e.get_ref().map(|r| r as _);
    while let Some(err) = cur {
        if err.is::<StreamTooLong>() {
            return true;
        }
        cur = err.source();
    }
    e.to_string().contains("larger than their cap allows")
}

fn show(raw: &[u8]) -> String {
    String::from_utf8_lossy(raw).chars().take(300).collect()
}

fn corrupt(shown: &str, e: &io::Error) -> SourceError {
    SourceError::Corrupt {
        entry: shown.to_string(),
        reason: e.to_string(),
    }
}

fn times(mtime: u64) -> Timestamps {
    let t = Timespec {
        tv_sec: i64::try_from(mtime).unwrap_or(i64::MAX),
        tv_nsec: 0,
    };
    Timestamps {
        last_access: t,
        last_modification: t,
    }
}

struct Counting<R> {
    inner: R,
    count: Rc<Cell<u64>>,
    guard: Option<Guard>,
}

/// Caps on the raw tar stream, checked on every read.
struct Guard {
    /// Compressed bytes read so far, for gzip bundles.
    compressed: Option<Rc<Cell<u64>>>,
    /// File content bytes extracted so far; the rest of the stream is headers.
    file_bytes: Rc<Cell<u64>>,
    limits: ExtractLimits,
}

impl Guard {
    fn check(&self, u: u64) -> io::Result<()> {
        if let Some(c) = &self.compressed
            && u > self.limits.ratio_floor_bytes
            && u / c.get().max(1) > self.limits.max_ratio
        {
            return Err(io::Error::other("compression ratio cap exceeded"));
        }
        if u.saturating_sub(self.file_bytes.get()) > self.limits.max_header_bytes {
            return Err(io::Error::other(StreamTooLong));
        }
        Ok(())
    }
}

#[derive(Debug)]
struct StreamTooLong;

impl std::fmt::Display for StreamTooLong {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("the tar headers are larger than their cap allows")
    }
}

impl std::error::Error for StreamTooLong {}

impl<R: Read> Read for Counting<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.inner.read(buf)?;
        let total = self.count.get() + n as u64;
        self.count.set(total);
        if let Some(guard) = &self.guard {
            guard.check(total)?;
        }
        Ok(n)
    }
}

/// Opens the directory `name` (one path component, never `..`: the caller checked) in
/// `dir`, never through a symlink: `openat2` beneath `dir` without symlinks, or where the
/// kernel or a seccomp filter refuses `openat2` with ENOSYS (Linux before 5.6, and systemd's
/// `RestrictSUIDSGID=`, which cannot inspect its flags), `openat` with `O_NOFOLLOW`, which
/// for one component that is not `..` resolves the same.
fn open_beneath(dir: &OwnedFd, name: &[u8]) -> rustix::io::Result<OwnedFd> {
    let flags = OFlags::DIRECTORY | OFlags::RDONLY | OFlags::NOFOLLOW | OFlags::CLOEXEC;
    let resolve = ResolveFlags::BENEATH | ResolveFlags::NO_SYMLINKS | ResolveFlags::NO_MAGICLINKS;
    match rustix::fs::openat2(dir, name, flags, Mode::empty(), resolve) {
        Err(Errno::NOSYS) => open_component(dir, name, flags),
        other => other,
    }
}

fn open_component(dir: &OwnedFd, name: &[u8], flags: OFlags) -> rustix::io::Result<OwnedFd> {
    debug_assert!(name != b".." && !name.contains(&b'/'));
    rustix::fs::openat(dir, name, flags, Mode::empty())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_openat_fallback_opens_directories_and_never_a_symlink() {
        let t = tempfile::tempdir().unwrap();
        std::fs::create_dir(t.path().join("dir")).unwrap();
        std::fs::write(t.path().join("file"), "").unwrap();
        std::os::unix::fs::symlink("/etc", t.path().join("link")).unwrap();
        let root: OwnedFd = std::fs::File::open(t.path()).unwrap().into();
        let flags = OFlags::DIRECTORY | OFlags::RDONLY | OFlags::NOFOLLOW | OFlags::CLOEXEC;
        // The errors `walk` reads as "a symlink or a file where a directory should be".
        let refused = |r: rustix::io::Result<OwnedFd>| {
            matches!(r, Err(Errno::LOOP | Errno::XDEV | Errno::NOTDIR))
        };
        assert!(open_component(&root, b"dir", flags).is_ok());
        assert!(open_beneath(&root, b"dir").is_ok());
        for name in [&b"link"[..], b"file"] {
            assert!(refused(open_component(&root, name, flags)));
            assert!(refused(open_beneath(&root, name)));
        }
    }

    #[test]
    fn components_refuse_escapes() {
        assert_eq!(
            components(b"./a//b/./c/").unwrap(),
            vec![b"a".to_vec(), b"b".to_vec(), b"c".to_vec()]
        );
        assert!(components(b"./").unwrap().is_empty());
        assert!(matches!(
            components(b"/etc/passwd"),
            Err(SourceError::AbsolutePath { .. })
        ));
        assert!(matches!(
            components(b"a/../../b"),
            Err(SourceError::ParentDir { .. })
        ));
        assert!(matches!(
            components(&[b'a'; 256]),
            Err(SourceError::PathTooLong { .. })
        ));
        assert_eq!(components("a/".repeat(256).as_bytes()).unwrap().len(), 256);
        assert!(matches!(
            components("a/".repeat(257).as_bytes()),
            Err(SourceError::PathTooLong { .. })
        ));
    }
}
