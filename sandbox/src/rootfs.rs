//! The job's root filesystem: the overlay over the lower layers, a minimal `/dev`, a
//! size-limited `/tmp`, read-only binds, a fresh masked `/proc`, and the `pivot_root` into
//! it. Every step goes through [`Syscalls`], so the order the kernel sees is unit-tested
//! against a recording fake without root.
//!
//! What does not depend on the job is made before pid 1 knows its job ([`stage`]): `/dev`
//! with its nodes, a devpts and a proc instance, created detached with the new mount API
//! and attached where the job's root needs them once it exists. On a kernel without that
//! API (before 5.12) they are made in place, after the overlay, as before.

use std::io;
use std::os::fd::{AsFd, OwnedFd};
use std::path::{Path, PathBuf};

use crate::spec::SandboxSpec;
use crate::trace::{Mark, mark};

#[derive(Debug, thiserror::Error)]
pub enum RootfsError {
    #[error("mounting {what} at {target}")]
    Mount {
        what: String,
        target: PathBuf,
        source: io::Error,
    },
    #[error("preparing mount point {path}")]
    MountPoint { path: PathBuf, source: io::Error },
    #[error("pivot_root into {root}")]
    PivotRoot { root: PathBuf, source: io::Error },
    #[error("lower dir {path} is not usable as an overlay layer (it contains ':' or ',')")]
    LowerDirName { path: PathBuf },
    #[error("{path} is not inside the scratch dir {scratch}")]
    OutsideScratch { path: PathBuf, scratch: PathBuf },
}

/// The filesystem syscalls the root setup makes; real in [`Kernel`], recorded in tests.
pub trait Syscalls {
    fn mount(
        &self,
        source: Option<&Path>,
        target: &Path,
        fstype: Option<&str>,
        flags: libc::c_ulong,
        data: Option<&str>,
    ) -> io::Result<()>;
    fn pivot_root_here(&self, root: &Path) -> io::Result<()>;
    fn mkdir_all(&self, path: &Path) -> io::Result<()>;
    /// Creates an empty regular file (a bind target) unless something exists there.
    fn touch(&self, path: &Path) -> io::Result<()>;
    fn symlink(&self, target: &str, link: &Path) -> io::Result<()>;
    /// Creates a character device node (the mode is applied exactly, not via umask).
    fn mknod_char(&self, path: &Path, mode: u32, major: u32, minor: u32) -> io::Result<()>;
    fn chown(&self, path: &Path, uid: u32, gid: u32) -> io::Result<()>;
    fn exists(&self, path: &Path) -> bool;
    fn is_dir(&self, path: &Path) -> bool;
    /// A new `fstype` instance mounted detached, with `MOUNT_ATTR_*` `attrs`.
    fn mount_detached(
        &self,
        fstype: &str,
        flags: &[&str],
        options: &[(&str, &str)],
        attrs: u64,
    ) -> io::Result<OwnedFd>;
    /// Attaches a detached mount at `target`.
    fn attach(&self, mount: &OwnedFd, target: &Path) -> io::Result<()>;
    /// Sets `MOUNT_ATTR_*` bits on a mount.
    fn set_attrs(&self, mount: &OwnedFd, attrs: u64) -> io::Result<()>;
    /// A character device node `name` in the directory `dir` (the mode applied exactly).
    fn mknod_char_at(
        &self,
        dir: &OwnedFd,
        name: &str,
        mode: u32,
        major: u32,
        minor: u32,
    ) -> io::Result<()>;
    fn mkdir_at(&self, dir: &OwnedFd, name: &str) -> io::Result<()>;
    fn symlink_at(&self, target: &str, dir: &OwnedFd, name: &str) -> io::Result<()>;
}

/// The real kernel.
pub struct Kernel;

impl Syscalls for Kernel {
    fn mount(
        &self,
        source: Option<&Path>,
        target: &Path,
        fstype: Option<&str>,
        flags: libc::c_ulong,
        data: Option<&str>,
    ) -> io::Result<()> {
        crate::sys::mount(source, target, fstype, flags, data)
    }
    fn pivot_root_here(&self, root: &Path) -> io::Result<()> {
        // pivot_root(".", ".") stacks the old root on top of the new one; detaching "."
        // then drops the whole host tree without needing a put_old directory.
        std::env::set_current_dir(root)?;
        crate::sys::pivot_root(Path::new("."), Path::new("."))?;
        crate::sys::umount2(Path::new("."), libc::MNT_DETACH)?;
        std::env::set_current_dir("/")
    }
    fn mkdir_all(&self, path: &Path) -> io::Result<()> {
        std::fs::create_dir_all(path)
    }
    fn touch(&self, path: &Path) -> io::Result<()> {
        match std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .open(path)
        {
            Ok(_) => Ok(()),
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists => Ok(()),
            Err(e) => Err(e),
        }
    }
    fn symlink(&self, target: &str, link: &Path) -> io::Result<()> {
        std::os::unix::fs::symlink(target, link)
    }
    fn mknod_char(&self, path: &Path, mode: u32, major: u32, minor: u32) -> io::Result<()> {
        crate::sys::mknod_char(path, mode, major, minor)
    }
    fn chown(&self, path: &Path, uid: u32, gid: u32) -> io::Result<()> {
        std::os::unix::fs::chown(path, Some(uid), Some(gid))
    }
    fn exists(&self, path: &Path) -> bool {
        path.symlink_metadata().is_ok()
    }
    fn is_dir(&self, path: &Path) -> bool {
        path.is_dir()
    }
    fn mount_detached(
        &self,
        fstype: &str,
        flags: &[&str],
        options: &[(&str, &str)],
        attrs: u64,
    ) -> io::Result<OwnedFd> {
        crate::sys::mount_detached(fstype, flags, options, attrs)
    }
    fn attach(&self, mount: &OwnedFd, target: &Path) -> io::Result<()> {
        crate::sys::attach_mount(mount.as_fd(), target)
    }
    fn set_attrs(&self, mount: &OwnedFd, attrs: u64) -> io::Result<()> {
        crate::sys::set_mount_attrs(mount.as_fd(), attrs)
    }
    fn mknod_char_at(
        &self,
        dir: &OwnedFd,
        name: &str,
        mode: u32,
        major: u32,
        minor: u32,
    ) -> io::Result<()> {
        crate::sys::mknod_char_at(dir.as_fd(), name, mode, major, minor)
    }
    fn mkdir_at(&self, dir: &OwnedFd, name: &str) -> io::Result<()> {
        crate::sys::mkdir_at(dir.as_fd(), name, 0o755)
    }
    fn symlink_at(&self, target: &str, dir: &OwnedFd, name: &str) -> io::Result<()> {
        crate::sys::symlink_at(target, dir.as_fd(), name)
    }
}

/// Character devices created in the job's `/dev`: (name, major, minor). Created with
/// mknod by init (still real root) rather than bind-mounted from the host: same nodes,
/// six mounts fewer to copy into the job's namespace and to tear down.
pub const DEVICES: [(&str, u32, u32); 6] = [
    ("null", 1, 3),
    ("zero", 1, 5),
    ("full", 1, 7),
    ("random", 1, 8),
    ("urandom", 1, 9),
    ("tty", 5, 0),
];

/// `/proc` files hidden behind `/dev/null` (kernel memory, keys, timing side channels).
const MASKED_FILES: [&str; 5] = [
    "kcore",
    "keys",
    "timer_list",
    "sysrq-trigger",
    "sched_debug",
];
/// `/proc` directories made read-only. Others (irq, bus, fs) hold only files owned by
/// host root, which is not even mapped in the job's user namespace.
const READ_ONLY_DIRS: [&str; 1] = ["sys"];

const NOSUID_NODEV: libc::c_ulong = libc::MS_NOSUID | libc::MS_NODEV;

/// `/dev`'s tmpfs options: room for its nodes and links, nothing more.
const DEV_OPTIONS: [(&str, &str); 3] = [("mode", "755"), ("size", "64k"), ("nr_inodes", "64")];
/// Directories of `/dev` that get mounts of their own.
const DEV_DIRS: [&str; 2] = ["pts", "shm"];
/// `/dev`'s symbolic links: (name, target).
const DEV_LINKS: [(&str, &str); 5] = [
    ("ptmx", "pts/ptmx"),
    ("fd", "/proc/self/fd"),
    ("stdin", "/proc/self/fd/0"),
    ("stdout", "/proc/self/fd/1"),
    ("stderr", "/proc/self/fd/2"),
];
/// devpts: a private instance, its `ptmx` usable by all.
const PTS_FLAGS: [&str; 1] = ["newinstance"];
const PTS_OPTIONS: [(&str, &str); 2] = [("ptmxmode", "0666"), ("mode", "0620")];

/// The mounts pid 1 makes before it knows its job ([`stage`]), detached until [`prepare`]
/// and [`enter`] attach them: a read-only `/dev` with its nodes and links, a devpts
/// instance, and a proc instance of the job's pid namespace.
#[derive(Debug)]
pub struct Staged {
    dev: OwnedFd,
    pts: OwnedFd,
    proc: OwnedFd,
}

/// Run by the job's pid 1 as real root in its fresh pid namespace, before it knows its job
/// and still in the host's mount namespace: stages what every job's root gets the same,
/// detached (nothing is attached to any tree here). `None` where the kernel has no new
/// mount API: [`prepare`] and [`enter`] then make those mounts in place.
pub fn stage(sys: &dyn Syscalls) -> Result<Option<Staged>, RootfsError> {
    let unsupported = |e: &io::Error| e.raw_os_error() == Some(libc::ENOSYS);
    let dev_path = Path::new("/dev");
    use crate::sys::{MOUNT_ATTR_NODEV, MOUNT_ATTR_NOEXEC, MOUNT_ATTR_NOSUID, MOUNT_ATTR_RDONLY};
    let dev = match sys.mount_detached(
        "tmpfs",
        &[],
        &DEV_OPTIONS,
        MOUNT_ATTR_NOSUID | MOUNT_ATTR_NOEXEC,
    ) {
        Ok(dev) => dev,
        Err(e) if unsupported(&e) => return Ok(None),
        Err(e) => return Err(mount_err("tmpfs /dev", dev_path)(e)),
    };
    for (name, major, minor) in DEVICES {
        sys.mknod_char_at(&dev, name, 0o666, major, minor)
            .map_err(point_err(&dev_path.join(name)))?;
    }
    for dir in DEV_DIRS {
        sys.mkdir_at(&dev, dir)
            .map_err(point_err(&dev_path.join(dir)))?;
    }
    for (link, target) in DEV_LINKS {
        sys.symlink_at(target, &dev, link)
            .map_err(point_err(&dev_path.join(link)))?;
    }
    // No more nodes may appear in /dev.
    match sys.set_attrs(&dev, MOUNT_ATTR_RDONLY) {
        Ok(()) => {}
        Err(e) if unsupported(&e) => return Ok(None),
        Err(e) => return Err(mount_err("read-only /dev", dev_path)(e)),
    }
    let pts = sys
        .mount_detached(
            "devpts",
            &PTS_FLAGS,
            &PTS_OPTIONS,
            MOUNT_ATTR_NOSUID | MOUNT_ATTR_NOEXEC,
        )
        .map_err(mount_err("devpts", &dev_path.join("pts")))?;
    // proc belongs to the pid namespace of whoever creates it: ours, the job's.
    let proc = sys
        .mount_detached(
            "proc",
            &[],
            &[],
            MOUNT_ATTR_NOSUID | MOUNT_ATTR_NODEV | MOUNT_ATTR_NOEXEC,
        )
        .map_err(mount_err("proc", Path::new("/proc")))?;
    mark(Mark::Staged);
    Ok(Some(Staged { dev, pts, proc }))
}

/// Joins an absolute in-sandbox path onto the root.
pub fn inside(root: &Path, path: &Path) -> PathBuf {
    root.join(path.strip_prefix("/").unwrap_or(path))
}

fn mount_err(what: &str, target: &Path) -> impl FnOnce(io::Error) -> RootfsError {
    let what = what.to_owned();
    let target = target.to_owned();
    move |source| RootfsError::Mount {
        what,
        target,
        source,
    }
}

fn point_err(path: &Path) -> impl FnOnce(io::Error) -> RootfsError {
    let path = path.to_owned();
    move |source| RootfsError::MountPoint { path, source }
}

/// The overlay's mount options. `redirect_dir`, `metacopy` and `index` off so that the
/// upper dir alone is a faithful, self-contained diff for the snapshot. `volatile` because
/// the worker reads the upper dir through the same page cache and a job interrupted by a
/// crash is rerun from scratch: syncing the upper filesystem at every unmount would only
/// wait on the whole host disk.
pub fn overlay_options(spec: &SandboxSpec) -> Result<String, RootfsError> {
    let mut lowers = Vec::with_capacity(spec.lower_dirs.len());
    for dir in &spec.lower_dirs {
        let s = dir.to_string_lossy();
        if s.contains(':') || s.contains(',') {
            return Err(RootfsError::LowerDirName { path: dir.clone() });
        }
        lowers.push(s.into_owned());
    }
    Ok(format!(
        "lowerdir={},upperdir={},workdir={},redirect_dir=off,metacopy=off,index=off,xino=off,volatile",
        lowers.join(":"),
        spec.upper.display(),
        spec.work.display()
    ))
}

/// Builds the job's root at `root`, run by the job's pid 1 as real root in its fresh mount
/// namespace (before it enters its user namespace), after [`stage`]: overlay, `/dev`,
/// `/tmp`, binds, cwd.
pub fn prepare(
    sys: &dyn Syscalls,
    spec: &SandboxSpec,
    root: &Path,
    staged: Option<&Staged>,
) -> Result<(), RootfsError> {
    // Nothing mounted from here on may propagate back to the host.
    sys.mount(
        None,
        Path::new("/"),
        None,
        libc::MS_REC | libc::MS_PRIVATE,
        None,
    )
    .map_err(mount_err("private propagation", Path::new("/")))?;
    mark(Mark::RootPrivate);
    if let Some(scratch) = &spec.scratch {
        for dir in [&spec.upper, &spec.work] {
            if !dir.starts_with(&scratch.dir) || dir == &scratch.dir {
                return Err(RootfsError::OutsideScratch {
                    path: dir.clone(),
                    scratch: scratch.dir.clone(),
                });
            }
        }
        sys.mount(
            Some(Path::new("tmpfs")),
            &scratch.dir,
            Some("tmpfs"),
            NOSUID_NODEV,
            Some(&format!("mode=755,size={}", scratch.size_bytes)),
        )
        .map_err(mount_err("scratch tmpfs", &scratch.dir))?;
        for dir in [&spec.upper, &spec.work] {
            sys.mkdir_all(dir).map_err(point_err(dir))?;
        }
        mark(Mark::Scratch);
    }
    let opts = overlay_options(spec)?;
    sys.mount(
        Some(Path::new("overlay")),
        root,
        Some("overlay"),
        NOSUID_NODEV,
        Some(&opts),
    )
    .map_err(mount_err("overlay", root))?;
    mark(Mark::Overlay);

    let dev = root.join("dev");
    sys.mkdir_all(&dev).map_err(point_err(&dev))?;
    let dev_options = DEV_OPTIONS.map(|(k, v)| format!("{k}={v}")).join(",");
    match staged {
        Some(staged) => sys
            .attach(&staged.dev, &dev)
            .map_err(mount_err("staged /dev", &dev))?,
        None => {
            sys.mount(
                Some(Path::new("tmpfs")),
                &dev,
                Some("tmpfs"),
                libc::MS_NOSUID | libc::MS_NOEXEC,
                Some(&dev_options),
            )
            .map_err(mount_err("tmpfs /dev", &dev))?;
            for (name, major, minor) in DEVICES {
                let node = dev.join(name);
                sys.mknod_char(&node, 0o666, major, minor)
                    .map_err(point_err(&node))?;
            }
            for dir in DEV_DIRS {
                let d = dev.join(dir);
                sys.mkdir_all(&d).map_err(point_err(&d))?;
            }
            for (link, target) in DEV_LINKS {
                let l = dev.join(link);
                sys.symlink(target, &l).map_err(point_err(&l))?;
            }
        }
    }
    mark(Mark::Dev);
    let tmp_size = format!("mode=1777,size={}", spec.limits.tmp_bytes);
    let shm = dev.join("shm");
    sys.mount(
        Some(Path::new("tmpfs")),
        &shm,
        Some("tmpfs"),
        NOSUID_NODEV,
        Some(&tmp_size),
    )
    .map_err(mount_err("tmpfs /dev/shm", &shm))?;
    let tmp = root.join("tmp");
    sys.mkdir_all(&tmp).map_err(point_err(&tmp))?;
    sys.mount(
        Some(Path::new("tmpfs")),
        &tmp,
        Some("tmpfs"),
        NOSUID_NODEV,
        Some(&tmp_size),
    )
    .map_err(mount_err("tmpfs /tmp", &tmp))?;
    mark(Mark::Tmp);
    if staged.is_none() {
        // No more nodes may appear in /dev (a staged one is read-only already).
        sys.mount(
            None,
            &dev,
            None,
            libc::MS_REMOUNT | libc::MS_RDONLY | libc::MS_NOSUID | libc::MS_NOEXEC,
            Some(&dev_options),
        )
        .map_err(mount_err("read-only /dev", &dev))?;
        mark(Mark::DevReadOnly);
    }

    for (host, target) in &spec.read_only_binds {
        let t = inside(root, target);
        if sys.is_dir(host) {
            sys.mkdir_all(&t).map_err(point_err(&t))?;
        } else {
            if let Some(p) = t.parent() {
                sys.mkdir_all(p).map_err(point_err(p))?;
            }
            sys.touch(&t).map_err(point_err(&t))?;
        }
        bind_read_only(sys, host, &t, NOSUID_NODEV, &host.to_string_lossy())?;
    }

    let proc_dir = root.join("proc");
    sys.mkdir_all(&proc_dir).map_err(point_err(&proc_dir))?;
    let cwd = inside(root, &spec.cwd);
    if !sys.exists(&cwd) {
        sys.mkdir_all(&cwd).map_err(point_err(&cwd))?;
        sys.chown(&cwd, spec.identity.host_uid, spec.identity.host_gid)
            .map_err(point_err(&cwd))?;
    }
    mark(Mark::Binds);
    Ok(())
}

/// Binds `source` at `target` (recursively), then remounts the bind read-only with `flags`:
/// a bind mount ignores MS_RDONLY until it is remounted.
fn bind_read_only(
    sys: &dyn Syscalls,
    source: &Path,
    target: &Path,
    flags: libc::c_ulong,
    what: &str,
) -> Result<(), RootfsError> {
    sys.mount(
        Some(source),
        target,
        None,
        libc::MS_BIND | libc::MS_REC,
        None,
    )
    .map_err(mount_err(what, target))?;
    sys.mount(
        None,
        target,
        None,
        libc::MS_BIND | libc::MS_REMOUNT | libc::MS_RDONLY | flags,
        None,
    )
    .map_err(mount_err("read-only remount", target))
}

/// Finishes the root from inside the job's pid and mount namespaces (proc must be made by
/// a member of the new pid namespace), then pivots into it. The staged mounts are
/// attached (or, without them, made here) and their descriptors closed.
pub fn enter(sys: &dyn Syscalls, root: &Path, staged: Option<Staged>) -> Result<(), RootfsError> {
    let proc_dir = root.join("proc");
    let proc_flags = libc::MS_NOSUID | libc::MS_NODEV | libc::MS_NOEXEC;
    match &staged {
        Some(staged) => sys.attach(&staged.proc, &proc_dir),
        None => sys.mount(
            Some(Path::new("proc")),
            &proc_dir,
            Some("proc"),
            proc_flags,
            None,
        ),
    }
    .map_err(mount_err("proc", &proc_dir))?;
    mark(Mark::Proc);
    let null = root.join("dev/null");
    for name in MASKED_FILES {
        let f = proc_dir.join(name);
        if sys.exists(&f) {
            sys.mount(Some(&null), &f, None, libc::MS_BIND, None)
                .map_err(mount_err("mask", &f))?;
        }
    }
    for name in READ_ONLY_DIRS {
        let d = proc_dir.join(name);
        if sys.exists(&d) {
            // A remount inside a user namespace must keep the locked flags of proc.
            bind_read_only(sys, &d, &d, proc_flags, "read-only bind")?;
        }
    }
    mark(Mark::ProcMasked);
    let pts = root.join("dev/pts");
    match staged {
        Some(staged) => sys.attach(&staged.pts, &pts),
        None => {
            let options: Vec<String> = PTS_FLAGS
                .iter()
                .map(|f| f.to_string())
                .chain(PTS_OPTIONS.iter().map(|(k, v)| format!("{k}={v}")))
                .collect();
            sys.mount(
                Some(Path::new("devpts")),
                &pts,
                Some("devpts"),
                libc::MS_NOSUID | libc::MS_NOEXEC,
                Some(&options.join(",")),
            )
        }
    }
    .map_err(mount_err("devpts", &pts))?;
    mark(Mark::Devpts);
    sys.pivot_root_here(root)
        .map_err(|source| RootfsError::PivotRoot {
            root: root.to_owned(),
            source,
        })?;
    mark(Mark::Pivot);
    Ok(())
}

#[cfg(test)]
mod tests {
    use std::cell::RefCell;
    use std::os::fd::{AsRawFd, RawFd};
    use std::time::Duration;

    use super::*;
    use crate::spec::{Identity, Network, SandboxLimits};

    /// Records every call; every path "exists" only once created. Detached mounts are
    /// descriptors of /dev/null, named in the log by their filesystem type.
    #[derive(Default)]
    struct Recorder {
        calls: RefCell<Vec<String>>,
        existing: RefCell<Vec<PathBuf>>,
        detached: RefCell<Vec<(RawFd, String)>>,
        /// A kernel without the new mount API.
        old_kernel: bool,
    }

    impl Recorder {
        fn log(&self, s: String) {
            self.calls.borrow_mut().push(s);
        }
        fn name(&self, fd: &OwnedFd) -> String {
            let raw = fd.as_raw_fd();
            let detached = self.detached.borrow();
            detached.iter().find(|(f, _)| *f == raw).unwrap().1.clone()
        }
    }

    impl Syscalls for Recorder {
        fn mount(
            &self,
            source: Option<&Path>,
            target: &Path,
            fstype: Option<&str>,
            flags: libc::c_ulong,
            data: Option<&str>,
        ) -> io::Result<()> {
            let mut f = Vec::new();
            for (bit, name) in [
                (libc::MS_BIND, "bind"),
                (libc::MS_REC, "rec"),
                (libc::MS_PRIVATE, "private"),
                (libc::MS_REMOUNT, "remount"),
                (libc::MS_RDONLY, "ro"),
                (libc::MS_NOSUID, "nosuid"),
                (libc::MS_NODEV, "nodev"),
                (libc::MS_NOEXEC, "noexec"),
            ] {
                if flags & bit != 0 {
                    f.push(name);
                }
            }
            self.log(format!(
                "mount {} {} {} [{}] {}",
                source.map_or("-".into(), |s| s.display().to_string()),
                target.display(),
                fstype.unwrap_or("-"),
                f.join(","),
                data.unwrap_or("-")
            ));
            Ok(())
        }
        fn pivot_root_here(&self, root: &Path) -> io::Result<()> {
            self.log(format!("pivot_root {}", root.display()));
            Ok(())
        }
        fn mkdir_all(&self, path: &Path) -> io::Result<()> {
            self.existing.borrow_mut().push(path.to_owned());
            self.log(format!("mkdir {}", path.display()));
            Ok(())
        }
        fn touch(&self, path: &Path) -> io::Result<()> {
            self.log(format!("touch {}", path.display()));
            Ok(())
        }
        fn symlink(&self, target: &str, link: &Path) -> io::Result<()> {
            self.log(format!("symlink {} -> {target}", link.display()));
            Ok(())
        }
        fn mknod_char(&self, path: &Path, mode: u32, major: u32, minor: u32) -> io::Result<()> {
            self.log(format!(
                "mknod {} c {major}:{minor} {mode:o}",
                path.display()
            ));
            Ok(())
        }
        fn chown(&self, path: &Path, uid: u32, gid: u32) -> io::Result<()> {
            self.log(format!("chown {} {uid}:{gid}", path.display()));
            Ok(())
        }
        fn exists(&self, path: &Path) -> bool {
            self.existing.borrow().iter().any(|p| p == path) || path.starts_with("/r/proc")
        }
        fn is_dir(&self, path: &Path) -> bool {
            !path.to_string_lossy().ends_with(".conf")
        }
        fn mount_detached(
            &self,
            fstype: &str,
            flags: &[&str],
            options: &[(&str, &str)],
            attrs: u64,
        ) -> io::Result<OwnedFd> {
            if self.old_kernel {
                return Err(io::Error::from_raw_os_error(libc::ENOSYS));
            }
            let fd = OwnedFd::from(std::fs::File::open("/dev/null")?);
            let config: Vec<String> = flags
                .iter()
                .map(|f| f.to_string())
                .chain(options.iter().map(|(k, v)| format!("{k}={v}")))
                .collect();
            self.log(format!("fsmount {fstype} {} {attrs:#x}", config.join(",")));
            self.detached
                .borrow_mut()
                .push((fd.as_raw_fd(), fstype.to_owned()));
            Ok(fd)
        }
        fn attach(&self, mount: &OwnedFd, target: &Path) -> io::Result<()> {
            self.log(format!("attach {} {}", self.name(mount), target.display()));
            Ok(())
        }
        fn set_attrs(&self, mount: &OwnedFd, attrs: u64) -> io::Result<()> {
            self.log(format!("setattr {} {attrs:#x}", self.name(mount)));
            Ok(())
        }
        fn mknod_char_at(
            &self,
            dir: &OwnedFd,
            name: &str,
            mode: u32,
            major: u32,
            minor: u32,
        ) -> io::Result<()> {
            self.log(format!(
                "mknodat {}:{name} c {major}:{minor} {mode:o}",
                self.name(dir)
            ));
            Ok(())
        }
        fn mkdir_at(&self, dir: &OwnedFd, name: &str) -> io::Result<()> {
            self.log(format!("mkdirat {}:{name}", self.name(dir)));
            Ok(())
        }
        fn symlink_at(&self, target: &str, dir: &OwnedFd, name: &str) -> io::Result<()> {
            self.log(format!("symlinkat {}:{name} -> {target}", self.name(dir)));
            Ok(())
        }
    }

    fn spec() -> SandboxSpec {
        SandboxSpec {
            lower_dirs: vec!["/layers/src".into(), "/layers/base".into()],
            upper: "/job/upper".into(),
            work: "/job/work".into(),
            identity: Identity {
                host_uid: 200_001,
                host_gid: 200_001,
            },
            argv: vec!["true".into()],
            env: vec![],
            cwd: "/build".into(),
            limits: SandboxLimits {
                tmp_bytes: 1 << 20,
                wall: Duration::from_secs(1),
                ..SandboxLimits::default()
            },
            network: Network::None,
            read_only_binds: vec![
                ("/host/probes".into(), "/probes".into()),
                ("/host/x.conf".into(), "/etc/x.conf".into()),
            ],
            hostname: "corral".into(),
            scratch: None,
        }
    }

    #[test]
    fn stage_makes_a_read_only_dev_devpts_and_proc_detached() {
        let rec = Recorder::default();
        let staged = stage(&rec).unwrap();
        assert!(staged.is_some());
        let calls = rec.calls.borrow().clone();
        assert!(
            calls
                .iter()
                .all(|c| !c.starts_with("mount ") && !c.starts_with("attach")),
            "staging runs in the host's mount namespace: it must attach nothing: {calls:#?}"
        );
        assert_eq!(calls[0], "fsmount tmpfs mode=755,size=64k,nr_inodes=64 0xa");
        assert!(calls.contains(&"mknodat tmpfs:null c 1:3 666".to_owned()));
        assert!(calls.contains(&"mknodat tmpfs:tty c 5:0 666".to_owned()));
        assert!(calls.contains(&"mkdirat tmpfs:shm".to_owned()));
        assert!(calls.contains(&"symlinkat tmpfs:ptmx -> pts/ptmx".to_owned()));
        let ro = calls.iter().position(|c| c == "setattr tmpfs 0x1").unwrap();
        let last_write = calls
            .iter()
            .rposition(|c| c.starts_with("mknodat") || c.starts_with("symlinkat"))
            .unwrap();
        assert!(ro > last_write, "/dev is made read-only once populated");
        assert_eq!(
            calls[calls.len() - 2],
            "fsmount devpts newinstance,ptmxmode=0666,mode=0620 0xa"
        );
        assert_eq!(calls.last().unwrap(), "fsmount proc  0xe");
        let (dev, pts, proc) = {
            let s = staged.as_ref().unwrap();
            (rec.name(&s.dev), rec.name(&s.pts), rec.name(&s.proc))
        };
        assert_eq!(
            (dev.as_str(), pts.as_str(), proc.as_str()),
            ("tmpfs", "devpts", "proc")
        );

        // Attached where the root needs them, instead of made there.
        rec.calls.borrow_mut().clear();
        prepare(&rec, &spec(), Path::new("/r"), staged.as_ref()).unwrap();
        enter(&rec, Path::new("/r"), staged).unwrap();
        let calls = rec.calls.into_inner();
        let at = |c: &str| calls.iter().position(|x| x == c).unwrap();
        let overlay = calls
            .iter()
            .position(|c| c.starts_with("mount overlay /r "))
            .unwrap();
        assert!(overlay < at("attach tmpfs /r/dev"));
        assert!(
            at("attach tmpfs /r/dev")
                < at("mount tmpfs /r/dev/shm tmpfs [nosuid,nodev] mode=1777,size=1048576")
        );
        assert!(at("attach proc /r/proc") < at("mount /r/dev/null /r/proc/kcore - [bind] -"));
        assert!(at("attach devpts /r/dev/pts") < at("pivot_root /r"));
        assert!(
            !calls.iter().any(|c| c.starts_with("mount tmpfs /r/dev ")
                || c.starts_with("mknod ")
                || c.starts_with("mount proc")
                || c.starts_with("mount devpts")
                || c.contains("[remount,ro")),
            "nothing staged is made again: {calls:#?}"
        );
    }

    #[test]
    fn without_the_new_mount_api_everything_is_made_in_place() {
        let rec = Recorder {
            old_kernel: true,
            ..Recorder::default()
        };
        assert!(stage(&rec).unwrap().is_none());
        assert!(rec.calls.borrow().is_empty());
        prepare(&rec, &spec(), Path::new("/r"), None).unwrap();
        enter(&rec, Path::new("/r"), None).unwrap();
        let calls = rec.calls.into_inner();
        for made in [
            "mount tmpfs /r/dev tmpfs [nosuid,noexec] mode=755,size=64k,nr_inodes=64",
            "mknod /r/dev/null c 1:3 666",
            "mount proc /r/proc proc [nosuid,nodev,noexec] -",
            "mount devpts /r/dev/pts devpts [nosuid,noexec] newinstance,ptmxmode=0666,mode=0620",
        ] {
            assert!(calls.contains(&made.to_owned()), "{made} in {calls:#?}");
        }
    }

    #[test]
    fn prepare_mounts_in_the_order_the_kernel_needs() {
        let rec = Recorder::default();
        prepare(&rec, &spec(), Path::new("/r"), None).unwrap();
        let calls = rec.calls.into_inner();
        let mounts: Vec<&String> = calls.iter().filter(|c| c.starts_with("mount")).collect();
        assert_eq!(
            mounts[0], "mount - / - [rec,private] -",
            "propagation must be private first"
        );
        assert_eq!(
            mounts[1],
            "mount overlay /r overlay [nosuid,nodev] lowerdir=/layers/src:/layers/base,upperdir=/job/upper,workdir=/job/work,redirect_dir=off,metacopy=off,index=off,xino=off,volatile"
        );
        assert_eq!(
            mounts[2],
            "mount tmpfs /r/dev tmpfs [nosuid,noexec] mode=755,size=64k,nr_inodes=64"
        );
        let dev_mount = calls
            .iter()
            .position(|c| c.starts_with("mount tmpfs /r/dev "))
            .unwrap();
        let null = calls
            .iter()
            .position(|c| c == "mknod /r/dev/null c 1:3 666")
            .unwrap();
        assert!(
            null > dev_mount,
            "device nodes go on the private /dev tmpfs"
        );
        assert!(calls.contains(&"mknod /r/dev/tty c 5:0 666".to_owned()));
        assert!(calls.contains(&"symlink /r/dev/ptmx -> pts/ptmx".to_owned()));
        assert!(calls.contains(
            &"mount tmpfs /r/tmp tmpfs [nosuid,nodev] mode=1777,size=1048576".to_owned()
        ));
        let ro_dev = calls
            .iter()
            .position(|c| c.starts_with("mount - /r/dev - [remount,ro"))
            .unwrap();
        let last_dev_write = calls
            .iter()
            .rposition(|c| c.starts_with("symlink") || c.contains("/r/dev/shm"))
            .unwrap();
        assert!(
            ro_dev > last_dev_write,
            "/dev is made read-only after it is populated"
        );
        let bind = calls
            .iter()
            .position(|c| c == "mount /host/probes /r/probes - [bind,rec] -")
            .unwrap();
        assert_eq!(
            calls[bind + 1],
            "mount - /r/probes - [bind,remount,ro,nosuid,nodev] -"
        );
        assert!(
            calls.contains(&"touch /r/etc/x.conf".to_owned()),
            "a file bind gets a file mount point"
        );
        assert!(
            calls.contains(&"chown /r/build 200001:200001".to_owned()),
            "a missing cwd is the job's"
        );
        assert!(
            !calls.iter().any(|c| c.contains("proc proc")),
            "proc belongs to the job's pid namespace"
        );
    }

    #[test]
    fn enter_mounts_proc_masks_then_pivots() {
        let rec = Recorder::default();
        enter(&rec, Path::new("/r"), None).unwrap();
        let calls = rec.calls.into_inner();
        assert_eq!(calls[0], "mount proc /r/proc proc [nosuid,nodev,noexec] -");
        assert!(calls.contains(&"mount /r/dev/null /r/proc/kcore - [bind] -".to_owned()));
        assert!(
            calls.contains(
                &"mount - /r/proc/sys - [bind,remount,ro,nosuid,nodev,noexec] -".to_owned()
            )
        );
        assert_eq!(
            calls[calls.len() - 2],
            "mount devpts /r/dev/pts devpts [nosuid,noexec] newinstance,ptmxmode=0666,mode=0620"
        );
        assert_eq!(calls.last().unwrap(), "pivot_root /r");
    }

    #[test]
    fn a_scratch_tmpfs_holds_upper_and_work_under_the_overlay() {
        let rec = Recorder::default();
        let mut s = spec();
        s.upper = "/run/scratch/upper".into();
        s.work = "/run/scratch/work".into();
        s.scratch = Some(crate::Scratch {
            dir: "/run/scratch".into(),
            size_bytes: 1 << 20,
        });
        let staged = stage(&rec).unwrap();
        prepare(&rec, &s, Path::new("/r"), staged.as_ref()).unwrap();
        let calls = rec.calls.into_inner();
        let at = |c: &str| calls.iter().position(|x| x == c).unwrap();
        let tmpfs = at("mount tmpfs /run/scratch tmpfs [nosuid,nodev] mode=755,size=1048576");
        assert!(
            at("mount - / - [rec,private] -") < tmpfs,
            "nothing reaches the host"
        );
        let overlay = calls
            .iter()
            .position(|c| c.starts_with("mount overlay"))
            .unwrap();
        assert!(tmpfs < at("mkdir /run/scratch/upper"));
        assert!(at("mkdir /run/scratch/work") < overlay);

        s.work = "/elsewhere/work".into();
        assert!(matches!(
            prepare(&Recorder::default(), &s, Path::new("/r"), None),
            Err(RootfsError::OutsideScratch { .. })
        ));
    }

    #[test]
    fn lower_dir_with_separator_is_refused() {
        let mut s = spec();
        s.lower_dirs.push("/layers/a:b".into());
        assert!(matches!(
            overlay_options(&s),
            Err(RootfsError::LowerDirName { .. })
        ));
    }
}
