//! The job's init, its pid 1 (the role runc, youki and crun call the container's init):
//! builds the root, starts the job, reaps every orphan, forwards termination requests, and
//! when the job's main process ends, kills everything left and reports its status.
//! It is corral's own code (never customer code), non-dumpable, under the job's seccomp
//! filter, and keeps its capabilities only in the job's user namespace.

use std::io::Write;
use std::os::fd::{AsRawFd, OwnedFd, RawFd};
use std::path::Path;

use crate::handshake::{self, FromInit, SetupError, SetupStep, Status, ToInit};
use crate::rootfs::Staged;
use crate::spec::{JOB_GID, JOB_UID, JOB_UMASK, SandboxSpec};
use crate::sys;
use crate::trace::{Mark, mark};

/// The most cgroup files the shim hands over: a join and a leave file for each v1
/// hierarchy (memory, pids, cpu, cpuacct, blkio, when none is co-mounted).
const MAX_CGROUP_FILES: usize = 16;

const SIGNALS: [libc::c_int; 5] = [
    libc::SIGCHLD,
    libc::SIGTERM,
    libc::SIGINT,
    libc::SIGHUP,
    libc::SIGQUIT,
];

/// Runs in the cloned child, `link` its end of the seqpacket link to the shim. With
/// `netns` (made ahead, loopback up) the clone kept the shim's network namespace and we
/// enter that one first. We may be cloned before the job is known: what does not depend
/// on it is done first, then we wait for [`ToInit::Job`]. Never returns.
pub fn run(link: OwnedFd, netns: Option<OwnedFd>) -> ! {
    let fresh_netns = netns.is_none();
    let staged = match ahead(netns) {
        Ok(staged) => staged,
        Err(error) => fail(link.as_raw_fd(), error),
    };
    let job = match handshake::recv::<ToInit>(link.as_raw_fd(), 0) {
        Ok(Some((ToInit::Job(job), _))) => job,
        // The shim went away without a job (a shim kept ready that was let go), or broke
        // the protocol: nothing was started.
        _ => sys::exit_now(0),
    };
    mark(Mark::JobReceived);
    let (exec, leave) = match setup(&job.spec, &job.root, link.as_raw_fd(), staged, fresh_netns) {
        Ok(ready) => ready,
        Err(error) => fail(link.as_raw_fd(), error),
    };
    drop(job);
    let job = match exec.spawn() {
        Ok(pid) => pid,
        Err(err) => fail(link.as_raw_fd(), SetupError::io(SetupStep::Start, &err)),
    };
    mark(Mark::Spawned);
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
                mark(Mark::Reaped);
                // The job is over: nothing of it may outlive it (double-forked daemons).
                let _ = sys::kill(-1, libc::SIGKILL);
                while let Ok(Some(_)) = sys::wait4(-1, 0) {}
                mark(Mark::RestKilled);
                // Only we still see the job's mounts (they die with us).
                let disk_full =
                    crate::shim::is_full(Path::new("/")) || crate::shim::is_full(Path::new("/tmp"));
                mark(Mark::DiskChecked);
                // Out of the job's cgroup (v1): the shim can read and remove it while our
                // namespaces are torn down.
                let left_cgroup =
                    !leave.is_empty() && leave.into_iter().all(|mut f| f.write_all(b"0").is_ok());
                mark(Mark::LeftCgroup);
                // Whoever reads the job's output sees its end now, not once we are gone.
                let _ = sys::close_range(0, 2);
                let status = Status {
                    wait_status: reaped.status,
                    disk_full,
                    left_cgroup,
                    usage: sys::children_usage().unwrap_or_default(),
                };
                // One frame, sent once every process of the job is dead and reaped: the
                // shim may act on it before we have finished exiting.
                mark(Mark::StatusSent);
                let _ = handshake::send(link.as_raw_fd(), &FromInit::Status(status), &[]);
                sys::exit_now(0);
            }
        }
    }
}

/// Tells the shim why the sandbox could not be built, and exits.
fn fail(link: RawFd, error: SetupError) -> ! {
    let _ = handshake::send(link, &FromInit::Failed(error), &[]);
    sys::exit_now(1)
}

/// What does not depend on the job, done as soon as we are cloned (possibly before the
/// shim has its request). We start as real root in fresh pid, net, ipc and uts namespaces
/// (still in the host's mount namespace), all owned by the initial user namespace, so
/// nothing the job does later can remount, rename or reconfigure them.
fn ahead(netns: Option<OwnedFd>) -> Result<Option<Staged>, SetupError> {
    use SetupStep as Step;
    let io = |step: Step| move |e: std::io::Error| SetupError::io(step, &e);
    // Before anything that could open a socket. The descriptor goes at once: the job must
    // not inherit a handle on a namespace.
    if let Some(ns) = netns {
        use std::os::fd::AsFd;
        sys::setns_net(ns.as_fd()).map_err(io(Step::NetworkNamespace))?;
    }
    // If the shim dies, so does the job (pid 1 takes the namespace with it).
    sys::set_parent_death_signal(libc::SIGKILL).map_err(io(Step::ParentDeathSignal))?;
    // The worker's umask is its operator's choice; the job's root and the job get ours.
    sys::set_umask(JOB_UMASK);
    mark(Mark::DeathSignal);
    let staged = crate::rootfs::stage(&crate::rootfs::Kernel)
        .map_err(|e| SetupError::chain(Step::Rootfs, &e))?;
    // What the job inherits and does not depend on namespaces. Ignored signals survive
    // exec; we only wait for blocked ones, so the defaults suit us.
    sys::mask_signals(&SIGNALS, true).map_err(io(Step::Signals))?;
    sys::reset_signal_dispositions().map_err(io(Step::Signals))?;
    mark(Mark::Signals);
    Ok(staged)
}

/// Everything between the job's arrival and its start: build and enter the root, and
/// only then move into the job's own user namespace. Returns the job's prepared exec.
fn setup(
    spec: &SandboxSpec,
    root: &Path,
    link: RawFd,
    staged: Option<Staged>,
    fresh_netns: bool,
) -> Result<(sys::PreparedExec, Vec<std::fs::File>), SetupError> {
    use SetupStep as Step;
    let io = |step: Step| move |e: std::io::Error| SetupError::io(step, &e);
    // Our mount namespace: a copy of the host's mounts as they are now, with the job's
    // dir and layers, which may have been mounted after our clone.
    sys::unshare(libc::CLONE_NEWNS).map_err(io(Step::MountNamespace))?;
    mark(Mark::MountNamespace);
    let kernel = crate::rootfs::Kernel;
    crate::rootfs::prepare(&kernel, spec, root, staged.as_ref())
        .map_err(|e| SetupError::chain(Step::Rootfs, &e))?;
    // Meanwhile the shim made the job's cgroup. On v1 we move ourselves (cheap) through
    // the `tasks` files the shim opened and sent with the message, the join files first
    // (see `shim::place`); on v2 the shim has moved us and the lists are empty.
    let (join, _leave, mut files) = match handshake::recv::<ToInit>(link, MAX_CGROUP_FILES) {
        Ok(Some((ToInit::Cgroup { join, leave }, files)))
            if files.len() == join.len() + leave.len() =>
        {
            (join, leave, files)
        }
        // The shim could not make the cgroup (its reason is its own to report), or the
        // link broke: we only stop.
        _ => sys::exit_now(1),
    };
    mark(Mark::CgroupWait);
    let leave_files = files.split_off(join.len());
    for (path, fd) in join.iter().zip(files) {
        std::fs::File::from(fd)
            .write_all(b"0")
            .map_err(|e| SetupError::io_on(Step::JoinCgroup, path.display(), &e))?;
    }
    mark(Mark::CgroupJoined);
    // Written at the very end, once the job is dead.
    let leave: Vec<std::fs::File> = leave_files.into_iter().map(std::fs::File::from).collect();
    crate::rootfs::enter(&kernel, root, staged)
        .map_err(|e| SetupError::chain(Step::EnterRoot, &e))?;
    std::env::set_current_dir(&spec.cwd)
        .map_err(|e| SetupError::io_on(Step::Workdir, spec.cwd.display(), &e))?;
    sys::sethostname(&spec.hostname).map_err(io(Step::Hostname))?;
    // A namespace made ahead came with its loopback up.
    if fresh_netns {
        sys::loopback_up().map_err(io(Step::Loopback))?;
    }
    mark(Mark::Host);
    // The proxy's socket is made here, in the job's network namespace and still outside its
    // user namespace: it listens before the job starts, so the job's first connection
    // waits in its backlog until the worker serves it, and the job can neither close nor
    // take over a socket it never holds (only the shim gets the descriptor).
    let egress = match spec.network {
        crate::spec::Network::Egress { port } => Some(
            std::net::TcpListener::bind((std::net::Ipv4Addr::LOCALHOST, port))
                .map_err(|e| SetupError::io_on(Step::Egress, format!("127.0.0.1:{port}"), &e))?,
        ),
        crate::spec::Network::None | crate::spec::Network::Loopback => None,
    };
    sys::unshare(libc::CLONE_NEWUSER).map_err(io(Step::UserNamespace))?;
    let handed: Vec<RawFd> = egress.iter().map(|l| l.as_raw_fd()).collect();
    handshake::send(link, &FromInit::Unshared, &handed).map_err(io(Step::Link))?;
    mark(Mark::UserNs);
    drop(egress);
    // While the shim writes our id maps: everything the job inherits and we can do
    // without them (a new user namespace grants its creator every capability at once).
    // We already sit in the job's cgroup: root the cgroup namespace there.
    sys::unshare(libc::CLONE_NEWCGROUP).map_err(io(Step::CgroupNamespace))?;
    sys::set_dumpable(false).map_err(io(Step::Dumpable))?;
    // We never exec, so the bounding set only matters to the job; its own capabilities go
    // after the fork.
    sys::drop_inheritable_capabilities().map_err(io(Step::BoundingSet))?;
    // Ours too: open files, core dumps, file size (we write only sockets), stack, CPU.
    crate::rlimits::apply(&spec.limits).map_err(io(Step::Rlimits))?;
    mark(Mark::Caps);
    // The seccomp filter binds us as well as the job. Nothing we still do is on its
    // lists (no more mounts or namespaces); its listener goes to the shim.
    let filter = crate::seccomp::program(spec.network);
    let listener = sys::seccomp_install_with_listener(&filter).map_err(io(Step::Seccomp))?;
    handshake::send(link, &FromInit::Listener, &[listener.as_raw_fd()])
        .map_err(|e| SetupError::io_on(Step::Seccomp, "handing over the listener", &e))?;
    drop(listener);
    mark(Mark::Seccomp);
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
    .map_err(io(Step::Command))?;
    mark(Mark::ExecPrepared);
    // Anything but `Mapped` means the shim gave up on us.
    match handshake::recv::<ToInit>(link, 0) {
        Ok(Some((ToInit::Mapped, _))) => {
            mark(Mark::MapsWait);
            Ok((exec, leave))
        }
        _ => sys::exit_now(1),
    }
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
    fn execvp_candidates() {
        assert_eq!(candidates("/bin/sh", Some("/x")), ["/bin/sh"]);
        assert_eq!(candidates("./run", None), ["./run"]);
        assert_eq!(candidates("sh", Some("/a::/b")), ["/a/sh", "/b/sh"]);
        assert_eq!(candidates("sh", None)[0], "/usr/local/bin/sh");
    }
}
