//! The zygote: one long-lived, single-threaded process per worker (`corral __sandbox-zygote`)
//! that forks a fresh sandbox shim for each job. A job then pays for a `fork` of a small,
//! warm process instead of an `exec` of the whole `corral-worker` binary (dynamic loading,
//! relocations, runtime start-up: about a millisecond of CPU per job on a 2-core machine).
//!
//! The forked shim runs exactly the code of an exec'd one ([`crate::shim::main`]): the
//! worker hands it the same three fds (control socket, stdout and stderr pipes) and talks to
//! it the same way. Only the zygote itself is exec'd, once, from the worker — never forked
//! from the worker's threads.
//!
//! On the zygote's fd 0 (a `SOCK_SEQPACKET` socket from the worker) it speaks the
//! [handshake](crate::handshake): each [`ToZygote::Fork`] comes with three fds (control,
//! stdout, stderr), each answer is a [`FromZygote`]. End of stream from the worker ends the
//! zygote; shims it forked live on until their jobs end.
//!
//! The worker's handle ([`Zygote`]) asks for one shim more than its jobs take: a shim forked
//! ahead waits on its control socket until the next job's request comes (see
//! [`Zygote::take_ready`]), so a job's start does not wait for a fork.
//!
//! Between requests the zygote also makes each job's network namespace ahead of time (a
//! [`NetnsPool`]): creating one costs the kernel ~0.45 ms (per-namespace sysctls, devices,
//! protocol state), more than every other namespace of a job together (~0.07 ms). A shim
//! forked with one gets it as fd 3, and the job's pid 1 enters it instead of cloning a new
//! one. Each namespace is fresh (loopback up, nothing else, owned by the initial user
//! namespace like a cloned one), serves exactly one job, and goes away with it.

use std::io;
use std::io::PipeReader;
use std::os::fd::{AsFd, AsRawFd, OwnedFd};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use crate::handshake::{self, FromZygote, HandshakeError, ToZygote};
use crate::sys::{self, Forked};

/// The first argument that selects the zygote in the `corral-worker` binary.
pub const ZYGOTE_ARG: &str = "__sandbox-zygote";

/// Entry point of `corral __sandbox-zygote`. Never returns.
pub fn main() -> ! {
    let _ = sys::close_range(3, u32::MAX);
    // The worker's death ends us by end of stream on fd 0 (its end is close-on-exec, held by
    // no one else). Not by a parent-death signal: that follows the *thread* that started
    // us, and the worker starts us from whichever thread runs its first job (a tokio
    // blocking thread, which ends after 10 s idle): every quiet spell killed the zygote
    // and the next job paid for a new one.
    // Out of the worker's process group: a terminal's Ctrl-C is the worker's to handle (it
    // stops its jobs with their grace period); it must not kill the shims outright.
    let _ = sys::setsid();
    // The kernel reaps our shims: nobody here waits for them.
    if sys::auto_reap_children(true).is_err() {
        sys::exit_now(70);
    }
    let mut pool = NetnsPool::new();
    loop {
        // Refilled one namespace at a time, and only once no request has come for a
        // moment: right after a fork the new shim usually waits on our CPU, and making a
        // namespace then would delay its start by as much as it saves (measured: the
        // shim read its request 0.42 ms after the fork instead of 0.08 ms).
        if pool.wants_more() && !request_within(NetnsPool::QUIET_MS) {
            pool.make_one();
            continue;
        }
        let answer = match handshake::recv::<ToZygote>(0, 3) {
            Ok(None) => sys::exit_now(0),
            Ok(Some((ToZygote::Fork, fds))) if fds.len() == 3 => match sys::fork() {
                Ok(Forked::Child) => become_shim(&fds, pool.take()),
                Ok(Forked::Parent(pid)) => {
                    // The child has its own copy; ours must never serve another job.
                    drop(pool.take());
                    FromZygote::Forked { pid: pid as u32 }
                }
                Err(e) => FromZygote::ForkFailed {
                    errno: e.raw_os_error().unwrap_or(0),
                },
            },
            Ok(Some((ToZygote::Fork, _))) => FromZygote::ForkFailed { errno: libc::EBADF },
            Err(HandshakeError::Io(_)) => sys::exit_now(70),
            // Another build's worker, or garbage: refused, and the zygote carries on.
            Err(_) => FromZygote::ForkFailed {
                errno: libc::EPROTO,
            },
        };
        if handshake::send(0, &answer, &[]).is_err() {
            sys::exit_now(0);
        }
    }
}

/// In the forked child: the three fds become 0, 1 and 2, as for an exec'd shim, and the
/// job's network namespace, when the pool had one, fd 3.
fn become_shim(fds: &[OwnedFd], netns: Option<OwnedFd>) -> ! {
    if sys::auto_reap_children(false).is_err() {
        sys::exit_now(70);
    }
    for (i, fd) in fds.iter().enumerate() {
        if sys::dup2(fd.as_raw_fd(), i as i32).is_err() {
            sys::exit_now(70);
        }
    }
    match netns {
        Some(ns) => {
            if sys::dup2(ns.as_raw_fd(), crate::shim::NETNS_FD).is_err() {
                sys::exit_now(70);
            }
            crate::shim::main_with_netns()
        }
        None => crate::shim::main(),
    }
}

/// Network namespaces made ahead of the jobs that will use them, by the zygote between
/// requests. Making one switches the zygote's own namespace and back; it is single
/// threaded and forks only from its home namespace.
struct NetnsPool {
    /// The zygote's own network namespace; `None` when it (or our nice value) could not be
    /// read, and then no namespace is made ahead (each job's pid 1 clones its own).
    home: Option<OwnedFd>,
    /// The nice value the zygote got from the worker, which its shims inherit: restored
    /// after each namespace is made at nice 19.
    nice: libc::c_int,
    ready: Vec<OwnedFd>,
}

impl NetnsPool {
    /// Two: one for the job being forked, one for the next, at the worker's usual
    /// concurrency; a job arriving at an empty pool clones its own namespace as before.
    const SIZE: usize = 2;

    /// How long no request must have come before a namespace is made.
    const QUIET_MS: i32 = 1;

    fn new() -> Self {
        let nice = sys::nice();
        NetnsPool {
            home: std::fs::File::open("/proc/thread-self/ns/net")
                .ok()
                .map(OwnedFd::from)
                .filter(|_| nice.is_ok()),
            nice: nice.unwrap_or(0),
            ready: Vec::with_capacity(Self::SIZE),
        }
    }

    fn wants_more(&self) -> bool {
        self.home.is_some() && self.ready.len() < Self::SIZE
    }

    fn make_one(&mut self) {
        let Some(home) = &self.home else { return };
        // At the lowest priority: a job's start that wants the CPU meanwhile gets it.
        let niced = sys::set_nice(19).is_ok();
        let made = make_netns(home);
        if niced && sys::set_nice(self.nice).is_err() {
            // Shims forked at nice 19 would run their jobs there.
            sys::exit_now(70);
        }
        match made {
            Ok(ns) => self.ready.push(ns),
            // Not permitted here (or out of memory): jobs clone their own from now on.
            Err(_) => self.home = None,
        }
    }

    fn take(&mut self) -> Option<OwnedFd> {
        self.ready.pop()
    }
}

/// Whether a request (or the worker's end of stream) arrives on fd 0 within `ms`.
fn request_within(ms: i32) -> bool {
    match sys::poll(&[(0, libc::POLLIN)], ms) {
        Ok(revents) => revents.first().is_some_and(|&r| r != 0),
        // Interrupted or failing: let the blocking receive find out.
        Err(_) => true,
    }
}

/// A fresh network namespace with its loopback up. We return to `home` whatever happens:
/// a zygote left in another namespace would hand its shims the wrong one, so if that
/// fails it exits (the worker starts another).
fn make_netns(home: &OwnedFd) -> io::Result<OwnedFd> {
    sys::unshare(libc::CLONE_NEWNET)?;
    let made = std::fs::File::open("/proc/thread-self/ns/net")
        .map(OwnedFd::from)
        .and_then(|ns| sys::loopback_up().map(|()| ns));
    if sys::setns_net(home.as_fd()).is_err() {
        sys::exit_now(70);
    }
    made
}

/// The worker's handle on its zygote, started on first use and restarted if it died.
///
/// Once jobs run, it also keeps a shim forked ahead ([`ReadyShim`]): a job takes one that
/// is already waiting on its control socket, and a background thread forks the next one
/// while the job runs. The fork and the round trip to the zygote (about 0.2 ms) leave the
/// job's start. Shims kept ahead are let go after [`Zygote::READY_IDLE`] without a job, so
/// an idle worker holds no process beyond the zygote.
pub struct Zygote {
    inner: Arc<Inner>,
}

struct Inner {
    exe: PathBuf,
    running: Mutex<Option<Running>>,
    ready: Mutex<Ready>,
    /// Wakes the refill thread: a shim was taken, or the zygote is dropped.
    wake: Condvar,
    /// Wakes [`Zygote::settle`]: a shim was forked ahead.
    filled: Condvar,
}

#[derive(Default)]
struct Ready {
    shims: Vec<ReadyShim>,
    /// When a job last took (or asked for) a shim; `None` before the first.
    last_use: Option<Instant>,
    /// The refill thread runs (started with the first job).
    filling: bool,
    /// The handle is dropped: the refill thread ends.
    closed: bool,
}

/// A shim forked ahead of its job, blocked reading its control socket: the worker's ends
/// of that socket and of the shim's stdout and stderr pipes. Dropping it ends the shim (end
/// of stream before any request).
pub(crate) struct ReadyShim {
    pub pid: u32,
    pub ctl: UnixStream,
    pub stdout: PipeReader,
    pub stderr: PipeReader,
}

struct Running {
    child: Child,
    sock: OwnedFd,
}

impl std::fmt::Debug for Zygote {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Zygote")
            .field("exe", &self.inner.exe)
            .finish()
    }
}

impl Zygote {
    /// Shims kept forked ahead: one, for the next job's start (the refill thread forks the
    /// next while a job runs, so at a worker's usual concurrency the next job finds one).
    const READY: usize = 1;

    /// How long after a job took a shim the next is forked: the fork, and the work the new
    /// shim does ahead (its pid 1 and staged mounts), should not share the CPUs with the
    /// job that just started.
    const REFILL_AFTER: Duration = Duration::from_millis(3);

    /// How long the shims kept ahead outlive the last job.
    pub const READY_IDLE: Duration = Duration::from_secs(5);

    /// A zygote of `exe` (the `corral-worker` binary); nothing starts until the first job.
    pub fn new(exe: &Path) -> Self {
        Zygote {
            inner: Arc::new(Inner {
                exe: exe.to_owned(),
                running: Mutex::new(None),
                ready: Mutex::new(Ready::default()),
                wake: Condvar::new(),
                filled: Condvar::new(),
            }),
        }
    }

    /// Pid of the zygote process, if it runs.
    pub fn pid(&self) -> Option<u32> {
        let running = self.inner.running.lock().ok()?;
        running.as_ref().map(|r| r.child.id())
    }

    /// Pids of the shims forked ahead and waiting for a job.
    pub fn ready_pids(&self) -> Vec<u32> {
        self.inner
            .ready
            .lock()
            .map(|r| r.shims.iter().map(|s| s.pid).collect())
            .unwrap_or_default()
    }

    /// Waits (at most `limit`) until the shims kept ahead are forked again after the last
    /// job took one, as they are on a worker between jobs. For benchmarks: a round then
    /// does not share the machine with the previous round's background work.
    pub fn settle(&self, limit: Duration) {
        let deadline = Instant::now() + limit;
        let Ok(mut ready) = self.inner.ready.lock() else {
            return;
        };
        while ready.filling && !ready.closed && ready.shims.len() < Zygote::READY {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return;
            }
            ready = match self.inner.filled.wait_timeout(ready, left) {
                Ok((r, _)) => r,
                Err(_) => return,
            };
        }
    }

    /// A shim forked ahead, if one waits and is alive; either way the refill thread is
    /// told to fork the next one (and started, on the first call).
    pub(crate) fn take_ready(&self) -> Option<ReadyShim> {
        let mut ready = self.inner.ready.lock().ok()?;
        ready.last_use = Some(Instant::now());
        if !ready.filling && !ready.closed {
            let inner = Arc::clone(&self.inner);
            let started = std::thread::Builder::new()
                .name("corral-shim-pool".to_owned())
                .spawn(move || inner.refill());
            ready.filling = started.is_ok();
        }
        let mut taken = None;
        while let Some(shim) = ready.shims.pop() {
            // A shim that died while waiting (killed from outside) has hung up its end.
            if shim.alive() {
                taken = Some(shim);
                break;
            }
        }
        self.inner.wake.notify_one();
        taken
    }

    /// Forks a shim that gets `ctl`, `stdout` and `stderr` as its fds 0, 1 and 2.
    /// Returns the shim's pid.
    pub(crate) fn fork_shim(
        &self,
        ctl: &OwnedFd,
        stdout: &OwnedFd,
        stderr: &OwnedFd,
    ) -> io::Result<u32> {
        self.inner.fork_shim(ctl, stdout, stderr)
    }
}

impl ReadyShim {
    /// Whether the shim still holds its end of the control socket.
    fn alive(&self) -> bool {
        sys::poll(&[(self.ctl.as_raw_fd(), 0)], 0)
            .is_ok_and(|revents| revents.first().is_some_and(|&r| r == 0))
    }
}

impl Inner {
    /// The refill thread: keeps [`Zygote::READY`] shims forked while jobs come, lets them
    /// go after [`Zygote::READY_IDLE`] without one, ends when the handle is dropped.
    fn refill(&self) {
        let Ok(mut ready) = self.ready.lock() else {
            return;
        };
        loop {
            if ready.closed {
                return;
            }
            let idle_for = ready.last_use.map_or(Duration::MAX, |t| t.elapsed());
            if idle_for >= Zygote::READY_IDLE {
                ready.shims.clear();
                ready = match self.wake.wait(ready) {
                    Ok(r) => r,
                    Err(_) => return,
                };
                continue;
            }
            if ready.shims.len() >= Zygote::READY {
                let left = Zygote::READY_IDLE - idle_for;
                ready = match self.wake.wait_timeout(ready, left) {
                    Ok((r, _)) => r,
                    Err(_) => return,
                };
                continue;
            }
            if idle_for < Zygote::REFILL_AFTER {
                ready = match self
                    .wake
                    .wait_timeout(ready, Zygote::REFILL_AFTER - idle_for)
                {
                    Ok((r, _)) => r,
                    Err(_) => return,
                };
                continue;
            }
            drop(ready);
            let forked = self.fork_ready();
            ready = match self.ready.lock() {
                Ok(r) => r,
                Err(_) => return,
            };
            match forked {
                Ok(shim) if !ready.closed => {
                    ready.shims.push(shim);
                    self.filled.notify_all();
                }
                Ok(_) => {}
                // The zygote cannot fork now: jobs fork their own shim (and say why) until
                // the next one is taken.
                Err(_) => {
                    ready = match self.wake.wait(ready) {
                        Ok(r) => r,
                        Err(_) => return,
                    };
                }
            }
        }
    }

    fn fork_ready(&self) -> io::Result<ReadyShim> {
        let (ours, theirs) = UnixStream::pair()?;
        let (out_r, out_w) = std::io::pipe()?;
        let (err_r, err_w) = std::io::pipe()?;
        let pid = self.fork_shim(
            &OwnedFd::from(theirs),
            &OwnedFd::from(out_w),
            &OwnedFd::from(err_w),
        )?;
        Ok(ReadyShim {
            pid,
            ctl: ours,
            stdout: out_r,
            stderr: err_r,
        })
    }

    fn fork_shim(&self, ctl: &OwnedFd, stdout: &OwnedFd, stderr: &OwnedFd) -> io::Result<u32> {
        let mut running = self
            .running
            .lock()
            .map_err(|_| io::Error::other("sandbox zygote lock poisoned"))?;
        let fds = [ctl.as_raw_fd(), stdout.as_raw_fd(), stderr.as_raw_fd()];
        let mut last_err = None;
        // A zygote that died (killed, crashed) is replaced once per request.
        for _ in 0..2 {
            if running.is_none() {
                *running = Some(self.start()?);
            }
            let Some(zygote) = running.as_mut() else {
                continue;
            };
            match ask(&zygote.sock, &fds) {
                Ok(FromZygote::Forked { pid }) => return Ok(pid),
                Ok(FromZygote::ForkFailed { errno }) => {
                    let why = io::Error::from_raw_os_error(errno);
                    return Err(io::Error::other(format!(
                        "the sandbox zygote could not fork: {why}"
                    )));
                }
                Err(err) => {
                    if let Some(mut dead) = running.take() {
                        let _ = dead.child.kill();
                        let _ = dead.child.wait();
                    }
                    last_err = Some(err);
                }
            }
        }
        Err(last_err.unwrap_or_else(|| io::Error::other("the sandbox zygote is gone")))
    }

    fn start(&self) -> io::Result<Running> {
        let (ours, theirs) = sys::seqpacket_pair()?;
        let child = Command::new(&self.exe)
            .arg(ZYGOTE_ARG)
            .env_clear()
            .stdin(Stdio::from(theirs))
            .stdout(Stdio::null())
            .spawn()?;
        Ok(Running { child, sock: ours })
    }
}

/// One request and its answer.
fn ask(sock: &OwnedFd, fds: &[i32; 3]) -> io::Result<FromZygote> {
    handshake::send(sock.as_raw_fd(), &ToZygote::Fork, fds)?;
    match handshake::recv::<FromZygote>(sock.as_raw_fd(), 0) {
        Ok(Some((answer, _))) => Ok(answer),
        Ok(None) => Err(io::Error::from(io::ErrorKind::UnexpectedEof)),
        Err(HandshakeError::Io(err)) => Err(err),
        Err(err) => Err(io::Error::new(io::ErrorKind::InvalidData, err)),
    }
}

impl Drop for Zygote {
    fn drop(&mut self) {
        // The refill thread ends, and the shims kept ahead with it (end of stream).
        if let Ok(mut ready) = self.inner.ready.lock() {
            ready.closed = true;
            ready.shims.clear();
        }
        self.inner.wake.notify_all();
        if let Ok(mut running) = self.inner.running.lock()
            && let Some(Running { mut child, sock }) = running.take()
        {
            // End of stream ends the zygote.
            drop(sock);
            let _ = child.wait();
        }
    }
}
