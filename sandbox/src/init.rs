//! The job's init, its pid 1 (the role runc, youki and crun call the container's init):
//! builds the root, starts the job, reaps every orphan, forwards termination requests, and
//! when the job's main process ends, kills everything left and reports its status.
//! It is corral's own code (never customer code), non-dumpable, under the job's seccomp
//! filter, and keeps its capabilities only in the job's user namespace.

use std::io::Write;
use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};

use crate::spec::{JOB_GID, JOB_UID, SandboxSpec};
use crate::sys;

/// Status record written to the status pipe: `S` + the raw wait status of the job's main
/// process (4 bytes, little endian) + 1 if the root or `/tmp` filled up + 1 if pid 1 has
/// left the job's cgroup + the job's [`sys::Usage`] (user and system CPU in microseconds,
/// blocks in and out: 4 × 8 bytes, little endian), or `E` + a message when the sandbox
/// could not be set up. Written in one go (under `PIPE_BUF`), once every process of the
/// job is dead and reaped: the helper may act on it before pid 1 has finished exiting.
pub const STATUS_TAG: u8 = b'S';
pub const ERROR_TAG: u8 = b'E';
/// Length of an `S` record.
pub const STATUS_LEN: usize = 1 + 4 + 1 + 1 + 4 * 8;

/// Builds an `S` record.
pub fn status_record(status: i32, full: bool, left: bool, usage: &sys::Usage) -> Vec<u8> {
    let mut record = vec![STATUS_TAG];
    record.extend(status.to_le_bytes());
    record.push(full as u8);
    record.push(left as u8);
    for n in [
        usage.utime.as_micros() as u64,
        usage.stime.as_micros() as u64,
        usage.inblock,
        usage.oublock,
    ] {
        record.extend(n.to_le_bytes());
    }
    record
}

/// A parsed `S` record: (wait status, disk full, pid 1 left the cgroup, usage).
pub fn parse_status(record: &[u8]) -> Option<(i32, bool, bool, sys::Usage)> {
    if record.len() != STATUS_LEN || record[0] != STATUS_TAG {
        return None;
    }
    let u64_at = |i: usize| {
        let mut b = [0u8; 8];
        b.copy_from_slice(&record[i..i + 8]);
        u64::from_le_bytes(b)
    };
    let status = i32::from_le_bytes([record[1], record[2], record[3], record[4]]);
    let usage = sys::Usage {
        utime: std::time::Duration::from_micros(u64_at(7)),
        stime: std::time::Duration::from_micros(u64_at(15)),
        inblock: u64_at(23),
        oublock: u64_at(31),
    };
    Some((status, record[5] != 0, record[6] != 0, usage))
}

const SIGNALS: [libc::c_int; 5] = [
    libc::SIGCHLD,
    libc::SIGTERM,
    libc::SIGINT,
    libc::SIGHUP,
    libc::SIGQUIT,
];

/// The pipes between the helper and the job's pid 1.
pub struct Pipes {
    /// Helper → pid 1: [`MAPPED`] once the id maps are written.
    pub sync: OwnedFd,
    /// Pid 1 → helper: [`UNSHARED`] once it sits in its own user namespace.
    pub ready: OwnedFd,
    /// Pid 1 → helper: the status record.
    pub status: OwnedFd,
    /// Job → helper: the seccomp listener.
    pub notify: OwnedFd,
}

/// Runs in the cloned child. Never returns.
pub fn run(spec: &SandboxSpec, root: &Path, pipes: Pipes) -> ! {
    let Pipes {
        sync,
        ready,
        status,
        notify,
    } = pipes;
    let mut status = std::fs::File::from(status);
    let (exec, leave) = match setup(spec, root, sync, ready, notify) {
        Ok(ready) => ready,
        Err(msg) => {
            let _ = status.write_all(&[ERROR_TAG]);
            let _ = status.write_all(msg.as_bytes());
            sys::exit_now(1);
        }
    };
    let job = match exec.spawn() {
        Ok(pid) => pid,
        Err(err) => {
            let _ = status
                .write_all(format!("{}start of the job: {err}", ERROR_TAG as char).as_bytes());
            sys::exit_now(1);
        }
    };
    drop(exec);
    loop {
        let sig = match sys::wait_signal(&SIGNALS) {
            Ok(s) => s,
            Err(_) => sys::exit_now(1),
        };
        if sig != libc::SIGCHLD {
            // kill(-1) reaches every process of the pid namespace except ourselves.
            let _ = sys::kill(-1, libc::SIGTERM);
            continue;
        }
        while let Ok(Some(reaped)) = sys::wait4(-1, libc::WNOHANG) {
            if reaped.pid == job {
                // The job is over: nothing of it may outlive it (double-forked daemons).
                let _ = sys::kill(-1, libc::SIGKILL);
                while let Ok(Some(_)) = sys::wait4(-1, 0) {}
                // Only we still see the job's mounts (they die with us).
                let full =
                    crate::shim::is_full(Path::new("/")) || crate::shim::is_full(Path::new("/tmp"));
                // Out of the job's cgroup (v1): the helper can read and remove it while
                // our namespaces are torn down.
                let left =
                    !leave.is_empty() && leave.into_iter().all(|mut f| f.write_all(b"0").is_ok());
                // Whoever reads the job's output sees its end now, not once we are gone.
                let _ = sys::close_range(0, 2);
                let usage = sys::children_usage().unwrap_or_default();
                let record = status_record(reaped.status, full, left, &usage);
                let _ = status.write_all(&record);
                sys::exit_now(0);
            }
        }
    }
}

/// Everything between the clone and the job's start. We start as real root in fresh mount,
/// pid, net, ipc and uts namespaces (all owned by the initial user namespace, so nothing
/// the job does later can remount, rename or reconfigure them), build and enter the root,
/// and only then move into the job's own user namespace. Returns the job's prepared exec.
fn setup(
    spec: &SandboxSpec,
    root: &Path,
    sync: OwnedFd,
    ready: OwnedFd,
    notify: OwnedFd,
) -> Result<(sys::PreparedExec, Vec<std::fs::File>), String> {
    // If the supervising helper dies, so does the job (pid 1 takes the namespace with it).
    sys::set_parent_death_signal(libc::SIGKILL).map_err(|e| format!("pdeathsig: {e}"))?;
    let kernel = crate::rootfs::Kernel;
    crate::rootfs::prepare(&kernel, spec, root).map_err(|e| format!("{e}: {}", source_of(&e)))?;
    // What the job inherits and does not depend on namespaces, done now in case the helper
    // is still making the cgroup. Ignored signals survive exec; we only wait for blocked
    // ones, so the defaults suit us.
    sys::mask_signals(&SIGNALS, true).map_err(|e| format!("sigprocmask: {e}"))?;
    sys::reset_signal_dispositions().map_err(|e| format!("signal dispositions: {e}"))?;
    // Meanwhile the helper made the job's cgroup. On v1 we move ourselves (cheap), through
    // host paths, so before the pivot; on v2 the helper has moved us and the list is empty.
    let (join, leave) = await_cgroup(&sync)?;
    for file in join {
        std::fs::write(&file, "0").map_err(|e| format!("joining {}: {e}", file.display()))?;
    }
    // Opened now, while the host's cgroup tree is in reach; written at the very end.
    let leave = leave
        .iter()
        .map(|f| {
            std::fs::OpenOptions::new()
                .write(true)
                .open(f)
                .map_err(|e| format!("opening {}: {e}", f.display()))
        })
        .collect::<Result<Vec<_>, _>>()?;
    crate::rootfs::enter(&kernel, root).map_err(|e| format!("{e}: {}", source_of(&e)))?;
    std::env::set_current_dir(&spec.cwd)
        .map_err(|e| format!("chdir {}: {e}", spec.cwd.display()))?;
    sys::sethostname(&spec.hostname).map_err(|e| format!("sethostname: {e}"))?;
    sys::loopback_up().map_err(|e| format!("loopback up: {e}"))?;
    sys::unshare(libc::CLONE_NEWUSER).map_err(|e| format!("user namespace: {e}"))?;
    std::fs::File::from(ready)
        .write_all(&[UNSHARED])
        .map_err(|e| format!("signalling the helper: {e}"))?;
    // While the helper writes our id maps: everything the job inherits and we can do
    // without them (a new user namespace grants its creator every capability at once).
    // We already sit in the job's cgroup: root the cgroup namespace there.
    sys::unshare(libc::CLONE_NEWCGROUP).map_err(|e| format!("cgroup namespace: {e}"))?;
    sys::set_dumpable(false).map_err(|e| format!("dumpable: {e}"))?;
    // We never exec, so the bounding set only matters to the job; its own capabilities go
    // after the fork.
    sys::drop_inheritable_capabilities().map_err(|e| format!("dropping the bounding set: {e}"))?;
    // Ours too: open files, core dumps, file size (we write only pipes), stack, CPU.
    crate::rlimits::apply(&spec.limits).map_err(|e| format!("rlimits: {e}"))?;
    // The seccomp filter binds us as well as the job. Nothing we still do is on its
    // lists (no more mounts or namespaces); its listener goes to the helper.
    let filter = crate::seccomp::program(spec.network);
    let listener =
        sys::seccomp_install_with_listener(&filter).map_err(|e| format!("seccomp: {e}"))?;
    sys::send_fd(notify.as_raw_fd(), listener.as_raw_fd())
        .map_err(|e| format!("handing over the seccomp listener: {e}"))?;
    drop((listener, notify));
    let env: Vec<String> = spec.env.iter().map(|(k, v)| format!("{k}={v}")).collect();
    let path = spec.env.iter().find(|(k, _)| k == "PATH");
    let exec = sys::PreparedExec::new(
        &candidates(&spec.argv[0], path.map(|(_, v)| v.as_str())),
        &spec.argv,
        &env,
        JOB_UID,
        JOB_GID,
        &SIGNALS,
    )
    .map_err(|e| format!("the job's command line or environment: {e}"))?;
    await_byte(&sync, MAPPED);
    drop(sync);
    Ok((exec, leave))
}

/// Message on the sync pipe from the helper, first: [`CGROUP`], the length of the rest (4
/// bytes, little endian), then the files pid 1 writes `0` to, each tagged `j` (to join the
/// job's cgroup now) or `l` (to leave it at the end) and followed by a NUL.
pub fn cgroup_message(join: &[PathBuf], leave: &[PathBuf]) -> Vec<u8> {
    let mut body = Vec::new();
    for (tag, files) in [(b'j', join), (b'l', leave)] {
        for f in files {
            body.push(tag);
            body.extend_from_slice(f.as_os_str().as_bytes());
            body.push(0);
        }
    }
    let mut message = vec![CGROUP];
    message.extend((body.len() as u32).to_le_bytes());
    message.extend(body);
    message
}

/// Reads the [`cgroup_message`]. A closed pipe means the helper could not make the cgroup
/// (its reason is its own to report): we only stop.
fn await_cgroup(sync: &OwnedFd) -> Result<(Vec<PathBuf>, Vec<PathBuf>), String> {
    use std::io::Read;
    let mut pipe = std::fs::File::from(sync.try_clone().map_err(|e| format!("sync pipe: {e}"))?);
    let mut head = [0u8; 5];
    if pipe.read_exact(&mut head).is_err() || head[0] != CGROUP {
        sys::exit_now(1);
    }
    let len = u32::from_le_bytes([head[1], head[2], head[3], head[4]]) as usize;
    let mut body = vec![0u8; len];
    pipe.read_exact(&mut body)
        .map_err(|e| format!("reading the cgroup from the helper: {e}"))?;
    let (mut join, mut leave) = (Vec::new(), Vec::new());
    for entry in body.split(|&b| b == 0).filter(|f| !f.is_empty()) {
        let path = PathBuf::from(std::ffi::OsStr::from_bytes(&entry[1..]));
        match entry[0] {
            b'j' => join.push(path),
            b'l' => leave.push(path),
            _ => return Err("malformed cgroup message from the helper".to_owned()),
        }
    }
    Ok((join, leave))
}

/// Byte on the sync pipe from the helper: the cgroup message follows.
pub const CGROUP: u8 = b'c';
/// Byte on the sync pipe from the helper: the id maps are written.
pub const MAPPED: u8 = b'm';
/// Byte on the ready pipe to the helper: pid 1 has its user namespace.
pub const UNSHARED: u8 = b'u';

/// Reads the expected byte; anything else means the helper gave up on us.
fn await_byte(sync: &OwnedFd, expected: u8) {
    let mut byte = [0u8; 1];
    match sys_read(sync, &mut byte) {
        Ok(1) if byte[0] == expected => {}
        _ => sys::exit_now(1),
    }
}

fn source_of(err: &dyn std::error::Error) -> String {
    err.source().map(|s| s.to_string()).unwrap_or_default()
}

fn sys_read(fd: &OwnedFd, buf: &mut [u8]) -> std::io::Result<usize> {
    use std::io::Read;
    let mut f = std::fs::File::from(fd.try_clone()?);
    f.read(buf)
}

/// Where `execvp` would look for `cmd`: itself when it has a slash, otherwise each dir of
/// `PATH` (default: the usual system dirs). The job's process tries them in order.
pub fn candidates(cmd: &str, path: Option<&str>) -> Vec<String> {
    if cmd.contains('/') {
        return vec![cmd.to_owned()];
    }
    let path = path.unwrap_or("/usr/local/bin:/usr/bin:/bin:/usr/local/sbin:/usr/sbin:/sbin");
    path.split(':')
        .filter(|d| !d.is_empty())
        .map(|dir| format!("{dir}/{cmd}"))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn status_records_round_trip() {
        let usage = sys::Usage {
            utime: std::time::Duration::from_micros(1_234_567),
            stime: std::time::Duration::from_micros(89),
            inblock: 16,
            oublock: 1 << 40,
        };
        let record = status_record(9, true, false, &usage);
        assert_eq!(record.len(), STATUS_LEN, "one write under PIPE_BUF");
        assert_eq!(parse_status(&record), Some((9, true, false, usage)));
        assert_eq!(
            parse_status(&record[..STATUS_LEN - 1]),
            None,
            "a partial read"
        );
        assert_eq!(parse_status(b"Esetup failed"), None);
    }

    #[test]
    fn execvp_candidates() {
        assert_eq!(candidates("/bin/sh", Some("/x")), ["/bin/sh"]);
        assert_eq!(candidates("./run", None), ["./run"]);
        assert_eq!(candidates("sh", Some("/a::/b")), ["/a/sh", "/b/sh"]);
        assert_eq!(candidates("sh", None)[0], "/usr/local/bin/sh");
    }
}
