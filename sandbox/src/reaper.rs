//! The job's pid 1: starts the job, reaps every orphan, forwards termination requests,
//! and when the job's main process ends, kills everything left and reports its status.
//! It is corral's own code (never customer code), non-dumpable, and keeps its capabilities
//! only in the job's user namespace until it forks the job.

use std::io::Write;
use std::os::fd::{AsRawFd, OwnedFd};
use std::path::Path;

use crate::cgroup::JobCgroup;
use crate::spec::{JOB_GID, JOB_UID, SandboxSpec};
use crate::sys::{self, Forked};

/// Status record written to the status pipe: `S` + the raw wait status of the job's main
/// process (4 bytes, little endian) + 1 if the root or `/tmp` filled up, or `E` + a
/// message when the sandbox could not be set up.
pub const STATUS_TAG: u8 = b'S';
pub const ERROR_TAG: u8 = b'E';

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
pub fn run(spec: &SandboxSpec, cgroup: &JobCgroup, root: &Path, pipes: Pipes) -> ! {
    let Pipes {
        sync,
        ready,
        status,
        notify,
    } = pipes;
    let mut status = std::fs::File::from(status);
    match setup(spec, cgroup, root, sync, ready) {
        Ok(()) => {}
        Err(msg) => {
            let _ = status.write_all(&[ERROR_TAG]);
            let _ = status.write_all(msg.as_bytes());
            sys::exit_now(1);
        }
    }
    let job = match sys::fork() {
        Ok(Forked::Child) => exec_job(spec, notify),
        Ok(Forked::Parent(pid)) => pid,
        Err(err) => {
            let _ =
                status.write_all(format!("{}fork of the job: {err}", ERROR_TAG as char).as_bytes());
            sys::exit_now(1);
        }
    };
    drop(notify);
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
                let mut record = vec![STATUS_TAG];
                record.extend(reaped.status.to_le_bytes());
                // Only we still see the job's mounts (they die with us).
                let full =
                    crate::init::is_full(Path::new("/")) || crate::init::is_full(Path::new("/tmp"));
                record.push(full as u8);
                let _ = status.write_all(&record);
                sys::exit_now(0);
            }
        }
    }
}

/// Everything between clone and fork. We start as real root in fresh mount, pid, net, ipc
/// and uts namespaces (all owned by the initial user namespace, so nothing the job does
/// later can remount, rename or reconfigure them), build and enter the root, and only then
/// move into the job's own user namespace.
fn setup(
    spec: &SandboxSpec,
    cgroup: &JobCgroup,
    root: &Path,
    sync: OwnedFd,
    ready: OwnedFd,
) -> Result<(), String> {
    // If the supervising helper dies, so does the job (pid 1 takes the namespace with it).
    sys::set_parent_death_signal(libc::SIGKILL).map_err(|e| format!("pdeathsig: {e}"))?;
    // On v1 we move ourselves (cheap); otherwise the helper moves us meanwhile.
    for file in cgroup.version().self_join_files().unwrap_or_default() {
        std::fs::write(&file, "0").map_err(|e| format!("joining {}: {e}", file.display()))?;
    }
    let kernel = crate::rootfs::Kernel;
    crate::rootfs::prepare(&kernel, spec, root).map_err(|e| format!("{e}: {}", source_of(&e)))?;
    crate::rootfs::enter(&kernel, root).map_err(|e| format!("{e}: {}", source_of(&e)))?;
    std::env::set_current_dir(&spec.cwd)
        .map_err(|e| format!("chdir {}: {e}", spec.cwd.display()))?;
    sys::sethostname(&spec.hostname).map_err(|e| format!("sethostname: {e}"))?;
    sys::loopback_up().map_err(|e| format!("loopback up: {e}"))?;
    sys::unshare(libc::CLONE_NEWUSER).map_err(|e| format!("user namespace: {e}"))?;
    std::fs::File::from(ready)
        .write_all(&[UNSHARED])
        .map_err(|e| format!("signalling the helper: {e}"))?;
    // MAPPED also means we sit in the job's cgroup: root the cgroup namespace there.
    await_byte(&sync, MAPPED);
    drop(sync);
    sys::unshare(libc::CLONE_NEWCGROUP).map_err(|e| format!("cgroup namespace: {e}"))?;
    sys::set_dumpable(false).map_err(|e| format!("dumpable: {e}"))?;
    sys::mask_signals(&SIGNALS, true).map_err(|e| format!("sigprocmask: {e}"))?;
    Ok(())
}

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

/// The job process: drop to the project's identity, lose every capability, set
/// `no_new_privs`, rlimits and the seccomp filter (handing its listener to the
/// supervisor), then exec. Never returns.
fn exec_job(spec: &SandboxSpec, notify: OwnedFd) -> ! {
    let fail = |what: &str, err: std::io::Error| -> ! {
        let _ = writeln!(std::io::stderr(), "corral-sandbox: {what}: {err}");
        sys::exit_now(127)
    };
    if let Err(e) = sys::reset_signal_dispositions() {
        fail("signal dispositions", e)
    }
    if let Err(e) = sys::mask_signals(&SIGNALS, false) {
        fail("sigprocmask", e)
    }
    // Own session: the job cannot signal or read the terminal of anything outside.
    let _ = setsid();
    match std::fs::File::open("/dev/null") {
        Ok(null) => {
            if let Err(e) = sys::dup2(null.as_raw_fd(), 0) {
                fail("stdin", e)
            }
        }
        Err(e) => fail("open /dev/null", e),
    }
    if let Err(e) = sys::set_ids(JOB_UID, JOB_GID) {
        fail("setresuid", e)
    }
    if let Err(e) = sys::drop_all_capabilities() {
        fail("dropping capabilities", e)
    }
    if let Err(e) = sys::set_no_new_privs() {
        fail("no_new_privs", e)
    }
    if let Err(e) = crate::rlimits::apply(&spec.limits) {
        fail("rlimits", e)
    }
    let env: Vec<String> = spec.env.iter().map(|(k, v)| format!("{k}={v}")).collect();
    let path = resolve(
        &spec.argv[0],
        spec.env
            .iter()
            .find(|(k, _)| k == "PATH")
            .map(|(_, v)| v.as_str()),
    );
    let filter = crate::seccomp::program(spec.network);
    match sys::seccomp_install_with_listener(&filter) {
        Ok(listener) => {
            if let Err(e) = sys::send_fd(notify.as_raw_fd(), listener.as_raw_fd()) {
                fail("handing over the seccomp listener", e)
            }
        }
        Err(e) => fail("seccomp", e),
    }
    drop(notify);
    // Only 0-2 reach the job, whatever its supervisor had open without close-on-exec.
    let _ = sys::close_fds_from(3);
    let err = sys::execve(&path, &spec.argv, &env);
    let _ = writeln!(
        std::io::stderr(),
        "corral-sandbox: exec {}: {err}",
        spec.argv[0]
    );
    sys::exit_now(if err.kind() == std::io::ErrorKind::NotFound {
        127
    } else {
        126
    })
}

fn setsid() -> std::io::Result<()> {
    crate::sys::setsid()
}

/// `execvp`-style lookup of a bare command name in `PATH` (default: the usual system dirs).
pub fn resolve(cmd: &str, path: Option<&str>) -> String {
    if cmd.contains('/') {
        return cmd.to_owned();
    }
    let path = path.unwrap_or("/usr/local/bin:/usr/bin:/bin:/usr/local/sbin:/usr/sbin:/sbin");
    for dir in path.split(':').filter(|d| !d.is_empty()) {
        let candidate = format!("{dir}/{cmd}");
        if Path::new(&candidate).is_file() {
            return candidate;
        }
    }
    cmd.to_owned()
}
