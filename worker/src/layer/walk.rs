//! The walk over a hostile tree: every open is relative to an already-open directory fd
//! with `O_NOFOLLOW`, so no symlink is ever followed; the walk keeps its own stack (no
//! recursion) and holds at most [`OPEN_DIRS`] directory fds, re-reaching an ancestor through
//! `..` checked against its recorded inode; file data streams through one fixed buffer.

use std::collections::HashMap;
use std::ffi::OsString;
use std::io::{self, Read, Write};
use std::os::fd::OwnedFd;
use std::os::unix::ffi::OsStringExt;
use std::path::{Path, PathBuf};

use rustix::fs::{AtFlags, Dir, FileType, Mode as FsMode, OFlags, Stat};
use rustix::io::Errno;

use super::tar::{self, Header, TypeFlag};
use super::whiteout::{self, OverlayXattr};
use super::{
    DevicePolicy, EntryKind, LayerError, LayerOptions, Mode, SetIdPolicy, SkipReason, Skipped,
    TarStream,
};

/// Directory fds kept open along the current path; deeper trees re-open ancestors via `..`.
const OPEN_DIRS: usize = 64;
/// Read size for file data.
const READ_CHUNK: usize = 1024 * 1024;
/// The largest value Linux allows for one extended attribute.
const XATTR_MAX: usize = 64 * 1024;

/// Extended attributes to store, as (name, value), sorted by name.
type Xattrs = Vec<(Vec<u8>, Vec<u8>)>;

/// Counts the walk reports.
pub(crate) struct WalkStats {
    pub entries: u64,
    pub skipped: Vec<Skipped>,
    pub setid_stripped: u64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    Dir,
    File,
    Symlink,
    Fifo,
    Char,
    Block,
    Whiteout,
}

/// The parts of `stat` the layer records, taken without following links.
#[derive(Debug, Clone, Copy)]
struct Meta {
    mode: u32,
    uid: u32,
    gid: u32,
    size: u64,
    mtime: i64,
    rdev: u64,
    ino: u64,
    dev: u64,
    nlink: u64,
}

impl From<&Stat> for Meta {
    // `stat` field types differ between architectures; the conversions are for the others.
    #[allow(clippy::useless_conversion)]
    fn from(st: &Stat) -> Self {
        Meta {
            mode: st.st_mode,
            uid: st.st_uid,
            gid: st.st_gid,
            size: u64::try_from(st.st_size).unwrap_or(0),
            mtime: st.st_mtime,
            rdev: u64::from(st.st_rdev),
            ino: u64::from(st.st_ino),
            dev: u64::from(st.st_dev),
            nlink: u64::from(st.st_nlink),
        }
    }
}

struct Entry {
    /// Name in the directory on disk.
    name: Vec<u8>,
    /// Name in the layer (differs for whiteouts).
    layer_name: Vec<u8>,
    kind: Kind,
    meta: Meta,
}

struct Frame {
    fd: Option<OwnedFd>,
    dev: u64,
    ino: u64,
    /// Length of this directory's path prefix (with its trailing `/`) in the path buffer.
    prefix: usize,
    /// Entries still to write, in reverse order (popped from the end).
    pending: Vec<Entry>,
}

pub(crate) fn open_root(dir: &Path) -> Result<OwnedFd, LayerError> {
    rustix::fs::open(
        dir,
        OFlags::RDONLY | OFlags::DIRECTORY | OFlags::CLOEXEC,
        FsMode::empty(),
    )
    .map_err(|e| LayerError::OpenRoot {
        path: dir.to_owned(),
        source: e.into(),
    })
}

fn path_of(bytes: &[u8]) -> PathBuf {
    PathBuf::from(OsString::from_vec(bytes.to_vec()))
}

struct Walker<'a, 'o, W: Write> {
    opts: &'a LayerOptions,
    out: &'a mut TarStream<'o, W>,
    stats: WalkStats,
    /// First archive path of each multiply-linked inode.
    links: HashMap<(u64, u64), Vec<u8>>,
    header: Vec<u8>,
    buf: Vec<u8>,
    xattr_names: Vec<u8>,
    xattr_value: Vec<u8>,
}

pub(crate) fn walk<W: Write>(
    root: OwnedFd,
    opts: &LayerOptions,
    out: &mut TarStream<'_, W>,
) -> Result<WalkStats, LayerError> {
    let mut w = Walker {
        opts,
        out,
        stats: WalkStats {
            entries: 0,
            skipped: Vec::new(),
            setid_stripped: 0,
        },
        links: HashMap::new(),
        header: Vec::with_capacity(2048),
        buf: Vec::new(),
        xattr_names: Vec::new(),
        xattr_value: Vec::new(),
    };
    let st = rustix::fs::fstat(&root).map_err(|e| LayerError::Stat {
        path: PathBuf::from("."),
        source: e.into(),
    })?;
    let mut path: Vec<u8> = Vec::new();
    let pending = w.list(&root, &path)?;
    let mut frames = vec![Frame {
        fd: Some(root),
        dev: Meta::from(&st).dev,
        ino: Meta::from(&st).ino,
        prefix: 0,
        pending,
    }];
    // frames[open_from..] hold open fds.
    let mut open_from = 0;
    while let Some(top) = frames.last_mut() {
        let Some(entry) = top.pending.pop() else {
            let done = frames.pop().expect("a frame is on the stack");
            if let Some(parent) = frames.last_mut()
                && parent.fd.is_none()
            {
                parent.fd = Some(reopen_parent(&done, parent, &path)?);
                open_from = frames.len() - 1;
            }
            continue;
        };
        path.truncate(top.prefix);
        path.extend_from_slice(&entry.layer_name);
        let dir_fd = top.fd.as_ref().expect("the top frame's fd is open");
        if entry.kind != Kind::Dir {
            w.check_len(&path)?;
            w.write_leaf(dir_fd, &entry, &path)?;
            continue;
        }
        path.push(b'/');
        w.check_len(&path)?;
        let child = w.write_dir(dir_fd, &entry, &path)?;
        frames.push(child);
        if frames.len() - open_from > OPEN_DIRS {
            frames[open_from].fd = None;
            open_from += 1;
        }
    }
    Ok(w.stats)
}

/// Re-opens `parent` (whose fd was closed to bound open fds) from its child through `..`,
/// checking it is the same directory.
fn reopen_parent(child: &Frame, parent: &Frame, path: &[u8]) -> Result<OwnedFd, LayerError> {
    let parent_path = || path_of(&path[..parent.prefix]);
    let child_fd = child.fd.as_ref().expect("a finished frame's fd is open");
    let fd = rustix::fs::openat(
        child_fd,
        "..",
        OFlags::RDONLY | OFlags::DIRECTORY | OFlags::NOFOLLOW | OFlags::CLOEXEC,
        FsMode::empty(),
    )
    .map_err(|e| LayerError::OpenDir {
        path: parent_path(),
        source: e.into(),
    })?;
    let st = rustix::fs::fstat(&fd).map_err(|e| LayerError::Stat {
        path: parent_path(),
        source: e.into(),
    })?;
    let meta = Meta::from(&st);
    if meta.ino != parent.ino || meta.dev != parent.dev {
        return Err(LayerError::Changed {
            path: parent_path(),
        });
    }
    Ok(fd)
}

impl<W: Write> Walker<'_, '_, W> {
    fn check_len(&self, path: &[u8]) -> Result<(), LayerError> {
        let max = self.opts.max_path_bytes;
        if path.len() > max {
            return Err(LayerError::PathTooLong {
                path: path_of(&path[..256.min(path.len())]),
                len: path.len(),
                max,
            });
        }
        Ok(())
    }

    /// Reads, classifies and sorts one directory's entries; returns them in reverse order.
    fn list(&mut self, fd: &OwnedFd, dir_path: &[u8]) -> Result<Vec<Entry>, LayerError> {
        let err_path = || path_of(if dir_path.is_empty() { b"." } else { dir_path });
        let dir = Dir::read_from(fd).map_err(|e| LayerError::ReadDir {
            path: err_path(),
            source: e.into(),
        })?;
        let mut entries = Vec::new();
        for item in dir {
            let item = item.map_err(|e| LayerError::ReadDir {
                path: err_path(),
                source: e.into(),
            })?;
            let name = item.file_name().to_bytes();
            if name == b"." || name == b".." {
                continue;
            }
            let st = rustix::fs::statat(fd, name, AtFlags::SYMLINK_NOFOLLOW).map_err(|e| {
                LayerError::Stat {
                    path: path_of(&[dir_path, name].concat()),
                    source: e.into(),
                }
            })?;
            let meta = Meta::from(&st);
            let full = || path_of(&[dir_path, name].concat());
            if whiteout::is_reserved(name) {
                self.skip(full(), SkipReason::ReservedName);
                continue;
            }
            let kind = match FileType::from_raw_mode(meta.mode) {
                FileType::Directory => Kind::Dir,
                FileType::RegularFile => Kind::File,
                FileType::Symlink => Kind::Symlink,
                FileType::Fifo => Kind::Fifo,
                FileType::CharacterDevice if meta.rdev == 0 && self.opts.mode == Mode::Upper => {
                    Kind::Whiteout
                }
                FileType::CharacterDevice => Kind::Char,
                FileType::BlockDevice => Kind::Block,
                FileType::Socket | FileType::Unknown => {
                    self.skip(full(), SkipReason::Socket);
                    continue;
                }
            };
            if matches!(kind, Kind::Char | Kind::Block) && self.opts.devices == DevicePolicy::Skip {
                self.skip(full(), SkipReason::Device);
                continue;
            }
            let layer_name = if kind == Kind::Whiteout {
                whiteout::whiteout_name(name)
            } else {
                name.to_vec()
            };
            entries.push(Entry {
                name: name.to_vec(),
                layer_name,
                kind,
                meta,
            });
        }
        // Whiteouts first, then everything else; bytewise within each group. Reversed so
        // the walk pops them in order.
        entries.sort_unstable_by(|a, b| {
            (a.kind != Kind::Whiteout, &a.layer_name)
                .cmp(&(b.kind != Kind::Whiteout, &b.layer_name))
                .reverse()
        });
        Ok(entries)
    }

    fn skip(&mut self, path: PathBuf, reason: SkipReason) {
        self.stats.skipped.push(Skipped { path, reason });
    }

    fn mtime(&self, meta: &Meta) -> u64 {
        u64::try_from(meta.mtime).unwrap_or(0).min(self.opts.epoch)
    }

    fn header(&mut self, h: &Header<'_>) -> Result<(), LayerError> {
        self.header.clear();
        tar::encode(h, &mut self.header);
        self.stats.entries += 1;
        let header = std::mem::take(&mut self.header);
        let result = self.out.write(&header);
        self.header = header;
        result
    }

    fn base<'p>(&self, path: &'p [u8], kind: TypeFlag, meta: &Meta) -> Header<'p> {
        let class = match kind {
            TypeFlag::Directory => EntryKind::Dir,
            TypeFlag::Regular | TypeFlag::HardLink => EntryKind::File,
            TypeFlag::Symlink => EntryKind::Symlink,
            _ => EntryKind::Other,
        };
        Header {
            path,
            kind,
            mode: self.opts.permissions.apply(class, meta.mode),
            uid: u64::from(self.opts.id_map.map_uid(meta.uid)),
            gid: u64::from(self.opts.id_map.map_gid(meta.gid)),
            size: 0,
            mtime: self.mtime(meta),
            link: b"",
            dev_major: 0,
            dev_minor: 0,
            xattrs: &[],
        }
    }

    /// Writes a directory's header (and opaque marker) and returns its frame.
    fn write_dir(
        &mut self,
        parent: &OwnedFd,
        entry: &Entry,
        path: &[u8],
    ) -> Result<Frame, LayerError> {
        let fd = rustix::fs::openat(
            parent,
            entry.name.as_slice(),
            OFlags::RDONLY | OFlags::DIRECTORY | OFlags::NOFOLLOW | OFlags::CLOEXEC,
            FsMode::empty(),
        )
        .map_err(|e| LayerError::OpenDir {
            path: path_of(path),
            source: e.into(),
        })?;
        self.same_inode(&fd, entry, path)?;
        let (xattrs, opaque) = self.xattrs(&fd, path, true)?;
        let mut h = self.base(path, TypeFlag::Directory, &entry.meta);
        h.xattrs = &xattrs;
        self.header(&h)?;
        if opaque {
            let marker = [path, whiteout::OPAQUE_MARKER].concat();
            self.check_len(&marker)?;
            let mut h = self.base(&marker, TypeFlag::Regular, &entry.meta);
            h.mode = 0o644;
            self.header(&h)?;
        }
        let pending = self.list(&fd, path)?;
        Ok(Frame {
            fd: Some(fd),
            dev: entry.meta.dev,
            ino: entry.meta.ino,
            prefix: path.len(),
            pending,
        })
    }

    fn same_inode(&self, fd: &OwnedFd, entry: &Entry, path: &[u8]) -> Result<Stat, LayerError> {
        let st = rustix::fs::fstat(fd).map_err(|e| LayerError::Stat {
            path: path_of(path),
            source: e.into(),
        })?;
        let same_type =
            FileType::from_raw_mode(st.st_mode) == FileType::from_raw_mode(entry.meta.mode);
        let meta = Meta::from(&st);
        if meta.ino != entry.meta.ino || meta.dev != entry.meta.dev || !same_type {
            return Err(LayerError::Changed {
                path: path_of(path),
            });
        }
        Ok(st)
    }

    /// Everything but a directory.
    fn write_leaf(&mut self, dir: &OwnedFd, entry: &Entry, path: &[u8]) -> Result<(), LayerError> {
        let meta = &entry.meta;
        if entry.kind == Kind::Whiteout {
            return self.header(&self.base(path, TypeFlag::Regular, meta));
        }
        if meta.nlink > 1 {
            if let Some(first) = self.links.get(&(meta.dev, meta.ino)) {
                let first = first.clone();
                let mut h = self.base(path, TypeFlag::HardLink, meta);
                h.link = &first;
                h.mode = self.file_mode(meta.mode, false);
                return self.header(&h);
            }
            self.links.insert((meta.dev, meta.ino), path.to_vec());
        }
        match entry.kind {
            Kind::File => self.write_file(dir, entry, path),
            Kind::Symlink => {
                let target = rustix::fs::readlinkat(dir, entry.name.as_slice(), Vec::new())
                    .map_err(|e| LayerError::ReadLink {
                        path: path_of(path),
                        source: e.into(),
                    })?;
                let mut h = self.base(path, TypeFlag::Symlink, meta);
                h.link = target.as_bytes();
                self.header(&h)
            }
            Kind::Fifo => self.header(&self.base(path, TypeFlag::Fifo, meta)),
            Kind::Char | Kind::Block => {
                let (major, minor) = (rustix::fs::major(meta.rdev), rustix::fs::minor(meta.rdev));
                if self.opts.devices == DevicePolicy::Refuse {
                    return Err(LayerError::Device {
                        path: path_of(path),
                        major,
                        minor,
                    });
                }
                let flag = if entry.kind == Kind::Char {
                    TypeFlag::Char
                } else {
                    TypeFlag::Block
                };
                let mut h = self.base(path, flag, meta);
                h.dev_major = major;
                h.dev_minor = minor;
                self.header(&h)
            }
            Kind::Dir | Kind::Whiteout => unreachable!("handled by the caller"),
        }
    }

    /// A regular file's mode after the set-id policy; `count` records a strip.
    fn file_mode(&mut self, mode: u32, count: bool) -> u32 {
        let mut mode = mode & 0o7777;
        if self.opts.setid == SetIdPolicy::Strip && mode & 0o6000 != 0 {
            if count {
                self.stats.setid_stripped += 1;
            }
            mode &= !0o6000;
        }
        self.opts.permissions.apply(EntryKind::File, mode)
    }

    fn write_file(&mut self, dir: &OwnedFd, entry: &Entry, path: &[u8]) -> Result<(), LayerError> {
        // O_NONBLOCK: if something swapped a FIFO in, the open must not hang the worker.
        let fd = rustix::fs::openat(
            dir,
            entry.name.as_slice(),
            OFlags::RDONLY | OFlags::NOFOLLOW | OFlags::CLOEXEC | OFlags::NOCTTY | OFlags::NONBLOCK,
            FsMode::empty(),
        )
        .map_err(|e| LayerError::OpenFile {
            path: path_of(path),
            source: e.into(),
        })?;
        let st = self.same_inode(&fd, entry, path)?;
        let meta = Meta::from(&st);
        let (xattrs, _) = self.xattrs(&fd, path, false)?;
        let mut h = self.base(path, TypeFlag::Regular, &meta);
        h.mode = self.file_mode(meta.mode, true);
        h.size = meta.size;
        h.xattrs = &xattrs;
        self.header(&h)?;
        let mut file = std::fs::File::from(fd);
        // Sized for the largest file so far (in powers of two, up to a chunk): most files
        // of a build are small.
        let need = usize::try_from(meta.size)
            .unwrap_or(usize::MAX)
            .clamp(1, READ_CHUNK)
            .next_power_of_two()
            .min(READ_CHUNK);
        if self.buf.len() < need {
            self.buf = vec![0; need];
        }
        let mut left = meta.size;
        while left > 0 {
            let want = usize::try_from(left)
                .unwrap_or(usize::MAX)
                .min(self.buf.len());
            let n = match file.read(&mut self.buf[..want]) {
                Ok(0) => {
                    return Err(LayerError::Changed {
                        path: path_of(path),
                    });
                }
                Ok(n) => n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(source) => {
                    return Err(LayerError::ReadFile {
                        path: path_of(path),
                        source,
                    });
                }
            };
            let buf = std::mem::take(&mut self.buf);
            let result = self.out.write(&buf[..n]);
            self.buf = buf;
            result?;
            left -= n as u64;
        }
        let pad = tar::padding(meta.size);
        if pad > 0 {
            self.out.write(&tar::END[..pad])?;
        }
        Ok(())
    }

    /// The xattrs to store (sorted by name) and whether the directory is opaque.
    fn xattrs(
        &mut self,
        fd: &OwnedFd,
        path: &[u8],
        is_dir: bool,
    ) -> Result<(Xattrs, bool), LayerError> {
        let err = |e: Errno| LayerError::ReadXattr {
            path: path_of(path),
            source: e.into(),
        };
        if self.xattr_names.is_empty() {
            self.xattr_names = vec![0; 4096];
            self.xattr_value = vec![0; XATTR_MAX];
        }
        let len = loop {
            match rustix::fs::flistxattr(fd, &mut self.xattr_names[..]) {
                Ok(n) => break n,
                Err(Errno::RANGE) => {
                    let grow = self.xattr_names.len() * 4;
                    self.xattr_names.resize(grow, 0);
                }
                Err(Errno::NOTSUP) => return Ok((Vec::new(), false)),
                Err(e) => return Err(err(e)),
            }
        };
        if len == 0 {
            return Ok((Vec::new(), false));
        }
        let mut names: Vec<Vec<u8>> = self.xattr_names[..len]
            .split(|&b| b == 0)
            .filter(|n| !n.is_empty())
            .map(<[u8]>::to_vec)
            .collect();
        names.sort_unstable();
        let upper = self.opts.mode == Mode::Upper;
        let mut kept = Vec::new();
        let mut opaque = false;
        for name in names {
            let class = whiteout::classify(&name);
            let name_str = || String::from_utf8_lossy(&name).into_owned();
            match class {
                OverlayXattr::Redirect if upper => {
                    return Err(LayerError::Redirect {
                        path: path_of(path),
                        name: name_str(),
                    });
                }
                OverlayXattr::Metacopy if upper => {
                    return Err(LayerError::Metacopy {
                        path: path_of(path),
                        name: name_str(),
                    });
                }
                OverlayXattr::Opaque if upper && is_dir => {
                    let value = self.xattr(fd, &name).map_err(err)?;
                    opaque |= value.as_deref().is_some_and(whiteout::is_opaque_value);
                }
                OverlayXattr::Foreign if self.opts.xattrs.keeps(&name) => {
                    if let Some(value) = self.xattr(fd, &name).map_err(err)? {
                        kept.push((name, value));
                    }
                }
                _ => {}
            }
        }
        Ok((kept, opaque))
    }

    /// One xattr's value; `None` if it vanished between listing and reading.
    fn xattr(&mut self, fd: &OwnedFd, name: &[u8]) -> Result<Option<Vec<u8>>, Errno> {
        match rustix::fs::fgetxattr(fd, name, &mut self.xattr_value[..]) {
            Ok(n) => Ok(Some(self.xattr_value[..n].to_vec())),
            Err(Errno::NODATA) => Ok(None),
            Err(e) => Err(e),
        }
    }
}
