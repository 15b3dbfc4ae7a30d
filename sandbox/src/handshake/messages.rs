//! The messages of each link, and their bodies.

use std::collections::BTreeMap;
use std::ffi::OsStr;
use std::os::unix::ffi::OsStrExt;
use std::path::PathBuf;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use super::{HEADER, HandshakeError, MAX_FRAME, Message, SetupError, SetupStep};
use crate::cgroup::JobCgroup;
use crate::event::LiveEvent;
use crate::outcome::Exit;
use crate::spec::SandboxSpec;
use crate::sys;

/// Worker → zygote.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum ToZygote {
    /// Fork a shim; its fds 0, 1 and 2 are the three fds attached.
    Fork,
}

/// Zygote → worker.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum FromZygote {
    Forked {
        pid: u32,
    },
    /// The request or the fork failed (errno; 0 for a request without its three fds).
    ForkFailed {
        errno: i32,
    },
}

/// Worker → shim.
#[derive(Debug)]
pub(crate) enum ToShim {
    /// What to run; sent once, first.
    Request(Box<Request>),
    /// TERM every process of the job, KILL after `grace`; a later, shorter grace wins.
    Cancel { grace: Duration },
}

/// Shim → worker.
#[derive(Debug)]
pub(crate) enum FromShim {
    /// The egress proxy's listening socket (attached), made by init in the job's network
    /// namespace; once, before the job starts, for `Network::Egress` only.
    Egress,
    /// Something the job did while it runs; any number, before the report.
    Event(LiveEvent),
    /// How the run ended; the last message, sent once init is gone.
    Report(Box<Report>),
}

/// Shim → init.
#[derive(Debug, PartialEq)]
pub(crate) enum ToInit {
    /// The job: init was cloned before it was known, and builds its root now. The first
    /// message, once.
    Job(Box<Job>),
    /// The files init writes `0` to: `join` to enter the job's cgroup now (cgroup v1: a
    /// task moving itself is cheap), `leave` to leave it once the job is dead. Both empty
    /// when the shim placed init itself (v2).
    Cgroup {
        join: Vec<PathBuf>,
        leave: Vec<PathBuf>,
    },
    /// Init's uid and gid maps are written: it may start the job.
    Mapped,
}

/// Init → shim.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum FromInit {
    /// Init sits in its own user namespace: the shim writes its id maps.
    Unshared,
    /// The seccomp listener is attached: the shim answers the job's denied syscalls.
    Listener,
    /// Every process of the job is dead: how the job's main process ended.
    Status(Status),
    /// The sandbox could not be built; init exits.
    Failed(SetupError),
}

/// What the worker asks of a shim.
#[derive(Debug, Serialize, Deserialize)]
pub(crate) struct Request {
    pub spec: SandboxSpec,
    pub cgroup: JobCgroup,
    /// Empty directory the job's root is mounted on (in init's mount namespace only).
    pub root: PathBuf,
    /// Take timing marks (see [`crate::trace`]) and send them back in the report.
    #[serde(default)]
    pub trace: bool,
}

/// What a pid 1 cloned ahead learns once the shim has its request.
#[derive(Debug, PartialEq, Serialize, Deserialize)]
pub(crate) struct Job {
    pub spec: SandboxSpec,
    /// The empty directory the job's root is mounted on.
    pub root: PathBuf,
}

/// Which of the shim's own limits ended the job, if any.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum EndedBy {
    WallTimeout,
    CpuLimit,
    Cancelled,
}

/// What a shim tells the worker at the end of a run.
#[derive(Debug, Default, Serialize, Deserialize)]
pub(crate) struct Report {
    pub exit: Option<Exit>,
    pub ended_by: Option<EndedBy>,
    pub denied_syscalls: BTreeMap<String, u64>,
    pub network_attempts: u64,
    /// The network attempts by address family, for the live events' counts.
    #[serde(skip)]
    pub network_by_family: BTreeMap<String, u64>,
    pub wall: Duration,
    pub cpu_user: Duration,
    pub cpu_system: Duration,
    pub io_read: u64,
    pub io_write: u64,
    /// The upper dir's filesystem or `/tmp` had no space or inodes left at the end.
    pub disk_full: bool,
    /// Set when the sandbox itself could not be built (the job never ran).
    pub error: Option<SetupError>,
    /// Live events the shim dropped because the worker did not read them in time.
    pub events_dropped: u64,
    /// The shim's and pid 1's timing marks, when the request asked for them.
    #[serde(default)]
    pub timings: crate::trace::Timings,
}

/// Init's last word on a job that ran.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Status {
    /// Raw wait status of the job's main process.
    pub wait_status: i32,
    /// The root or `/tmp` filled up.
    pub disk_full: bool,
    /// Init has left the job's cgroup: the shim may read and remove it while init exits.
    pub left_cgroup: bool,
    /// CPU and block I/O of every process of the job.
    pub usage: sys::Usage,
}

/// Reads the fixed-layout bodies.
struct Body<'a> {
    link: &'static str,
    bytes: &'a [u8],
}

impl<'a> Body<'a> {
    fn take(&mut self, n: usize) -> Result<&'a [u8], HandshakeError> {
        if self.bytes.len() < n {
            return Err(self.malformed("short body"));
        }
        let (head, rest) = self.bytes.split_at(n);
        self.bytes = rest;
        Ok(head)
    }

    fn u8(&mut self) -> Result<u8, HandshakeError> {
        Ok(self.take(1)?[0])
    }

    fn u32(&mut self) -> Result<u32, HandshakeError> {
        let b = self.take(4)?;
        Ok(u32::from_le_bytes([b[0], b[1], b[2], b[3]]))
    }

    fn u64(&mut self) -> Result<u64, HandshakeError> {
        let mut b = [0u8; 8];
        b.copy_from_slice(self.take(8)?);
        Ok(u64::from_le_bytes(b))
    }

    fn bool(&mut self) -> Result<bool, HandshakeError> {
        match self.u8()? {
            0 => Ok(false),
            1 => Ok(true),
            _ => Err(self.malformed("not a boolean")),
        }
    }

    fn rest(&mut self) -> &'a [u8] {
        std::mem::take(&mut self.bytes)
    }

    fn end(self) -> Result<(), HandshakeError> {
        match self.bytes.is_empty() {
            true => Ok(()),
            false => Err(self.malformed("bytes after the body")),
        }
    }

    fn malformed(&self, why: &str) -> HandshakeError {
        HandshakeError::Malformed {
            link: self.link,
            why: why.to_owned(),
        }
    }

    fn json<T: for<'de> Deserialize<'de>>(self) -> Result<T, HandshakeError> {
        serde_json::from_slice(self.bytes).map_err(|e| self.malformed(&e.to_string()))
    }
}

fn body<'a>(link: &'static str, bytes: &'a [u8]) -> Body<'a> {
    Body { link, bytes }
}

fn put_json(out: &mut Vec<u8>, value: &impl Serialize) {
    // Serializing plain data into a Vec cannot fail.
    let _ = serde_json::to_writer(out, value);
}

const FORK: u8 = b'F';
const FORKED: u8 = b'P';
const FORK_FAILED: u8 = b'X';
const REQUEST: u8 = b'R';
const CANCEL: u8 = b'C';
const REPORT: u8 = b'O';
const EVENT: u8 = b'V';
const EGRESS: u8 = b'N';
const JOB: u8 = b'J';
const CGROUP: u8 = b'G';
const MAPPED: u8 = b'M';
const UNSHARED: u8 = b'U';
const LISTENER: u8 = b'L';
const STATUS: u8 = b'S';
const FAILED: u8 = b'E';

impl Message for ToZygote {
    const LINK: &'static str = "worker-to-zygote";
    const MAX_LEN: usize = 64;

    fn kind(&self) -> u8 {
        FORK
    }

    fn put_body(&self, _: &mut Vec<u8>) {}

    fn parse(kind: u8, bytes: &[u8]) -> Result<Self, HandshakeError> {
        match kind {
            FORK => body(Self::LINK, bytes).end().map(|()| ToZygote::Fork),
            kind => Err(HandshakeError::Kind {
                link: Self::LINK,
                kind,
            }),
        }
    }
}

impl Message for FromZygote {
    const LINK: &'static str = "zygote-to-worker";
    const MAX_LEN: usize = 64;

    fn kind(&self) -> u8 {
        match self {
            FromZygote::Forked { .. } => FORKED,
            FromZygote::ForkFailed { .. } => FORK_FAILED,
        }
    }

    fn put_body(&self, out: &mut Vec<u8>) {
        match *self {
            FromZygote::Forked { pid } => out.extend(pid.to_le_bytes()),
            FromZygote::ForkFailed { errno } => out.extend(errno.to_le_bytes()),
        }
    }

    fn parse(kind: u8, bytes: &[u8]) -> Result<Self, HandshakeError> {
        let mut b = body(Self::LINK, bytes);
        let message = match kind {
            FORKED => FromZygote::Forked { pid: b.u32()? },
            FORK_FAILED => FromZygote::ForkFailed {
                errno: b.u32()? as i32,
            },
            kind => {
                return Err(HandshakeError::Kind {
                    link: Self::LINK,
                    kind,
                });
            }
        };
        b.end().map(|()| message)
    }
}

impl Message for ToShim {
    const LINK: &'static str = "worker-to-shim";
    const MAX_LEN: usize = MAX_FRAME;

    fn kind(&self) -> u8 {
        match self {
            ToShim::Request(_) => REQUEST,
            ToShim::Cancel { .. } => CANCEL,
        }
    }

    fn put_body(&self, out: &mut Vec<u8>) {
        match self {
            ToShim::Request(request) => put_json(out, request),
            ToShim::Cancel { grace } => out.extend((grace.as_millis() as u64).to_le_bytes()),
        }
    }

    fn parse(kind: u8, bytes: &[u8]) -> Result<Self, HandshakeError> {
        let mut b = body(Self::LINK, bytes);
        match kind {
            REQUEST => Ok(ToShim::Request(Box::new(b.json()?))),
            CANCEL => {
                let grace = Duration::from_millis(b.u64()?);
                b.end().map(|()| ToShim::Cancel { grace })
            }
            kind => Err(HandshakeError::Kind {
                link: Self::LINK,
                kind,
            }),
        }
    }
}

impl Message for FromShim {
    const LINK: &'static str = "shim-to-worker";
    const MAX_LEN: usize = MAX_FRAME;

    fn kind(&self) -> u8 {
        match self {
            FromShim::Egress => EGRESS,
            FromShim::Event(_) => EVENT,
            FromShim::Report(_) => REPORT,
        }
    }

    fn put_body(&self, out: &mut Vec<u8>) {
        match self {
            FromShim::Egress => {}
            FromShim::Event(event) => put_json(out, event),
            FromShim::Report(report) => put_json(out, report),
        }
    }

    fn parse(kind: u8, bytes: &[u8]) -> Result<Self, HandshakeError> {
        match kind {
            EGRESS => body(Self::LINK, bytes).end().map(|()| FromShim::Egress),
            EVENT => Ok(FromShim::Event(body(Self::LINK, bytes).json()?)),
            REPORT => Ok(FromShim::Report(Box::new(body(Self::LINK, bytes).json()?))),
            kind => Err(HandshakeError::Kind {
                link: Self::LINK,
                kind,
            }),
        }
    }
}

impl Message for ToInit {
    const LINK: &'static str = "shim-to-init";
    const MAX_LEN: usize = MAX_FRAME;

    fn kind(&self) -> u8 {
        match self {
            ToInit::Job(_) => JOB,
            ToInit::Cgroup { .. } => CGROUP,
            ToInit::Mapped => MAPPED,
        }
    }

    /// `Job`: JSON. `Cgroup`: the number of `join` files (u32), then every path
    /// NUL-terminated.
    fn put_body(&self, out: &mut Vec<u8>) {
        match self {
            ToInit::Job(job) => put_json(out, job),
            ToInit::Cgroup { join, leave } => {
                out.extend((join.len() as u32).to_le_bytes());
                for path in join.iter().chain(leave) {
                    out.extend_from_slice(path.as_os_str().as_bytes());
                    out.push(0);
                }
            }
            ToInit::Mapped => {}
        }
    }

    fn parse(kind: u8, bytes: &[u8]) -> Result<Self, HandshakeError> {
        let mut b = body(Self::LINK, bytes);
        match kind {
            JOB => Ok(ToInit::Job(Box::new(b.json()?))),
            CGROUP => {
                let joins = b.u32()? as usize;
                let rest = b.rest();
                let mut paths: Vec<PathBuf> = match rest.split_last() {
                    None => Vec::new(),
                    Some((0, paths)) => paths
                        .split(|&c| c == 0)
                        .map(|p| PathBuf::from(OsStr::from_bytes(p)))
                        .collect(),
                    Some(_) => return Err(b.malformed("a path without its NUL")),
                };
                if joins > paths.len() {
                    return Err(b.malformed("fewer paths than files to join"));
                }
                let leave = paths.split_off(joins);
                Ok(ToInit::Cgroup { join: paths, leave })
            }
            MAPPED => b.end().map(|()| ToInit::Mapped),
            kind => Err(HandshakeError::Kind {
                link: Self::LINK,
                kind,
            }),
        }
    }
}

impl Message for FromInit {
    const LINK: &'static str = "init-to-shim";
    const MAX_LEN: usize = 8 << 10;

    fn kind(&self) -> u8 {
        match self {
            FromInit::Unshared => UNSHARED,
            FromInit::Listener => LISTENER,
            FromInit::Status(_) => STATUS,
            FromInit::Failed(_) => FAILED,
        }
    }

    /// `Status`: wait status (i32), disk full, left the cgroup (a byte each), then user
    /// and system CPU in microseconds, blocks in and out (u64 each). `Failed`: the step
    /// (u8), errno (i32, 0 for none), the detail (UTF-8, cut to fit the frame).
    fn put_body(&self, out: &mut Vec<u8>) {
        match self {
            FromInit::Unshared | FromInit::Listener => {}
            FromInit::Status(s) => {
                out.extend(s.wait_status.to_le_bytes());
                out.push(u8::from(s.disk_full));
                out.push(u8::from(s.left_cgroup));
                for n in [
                    s.usage.utime.as_micros() as u64,
                    s.usage.stime.as_micros() as u64,
                    s.usage.inblock,
                    s.usage.oublock,
                ] {
                    out.extend(n.to_le_bytes());
                }
            }
            FromInit::Failed(e) => {
                out.push(e.step.code());
                out.extend(e.errno.unwrap_or(0).to_le_bytes());
                let room = Self::MAX_LEN - HEADER - 5;
                let mut cut = e.detail.len().min(room);
                while !e.detail.is_char_boundary(cut) {
                    cut -= 1;
                }
                out.extend_from_slice(&e.detail.as_bytes()[..cut]);
            }
        }
    }

    fn parse(kind: u8, bytes: &[u8]) -> Result<Self, HandshakeError> {
        let mut b = body(Self::LINK, bytes);
        let message = match kind {
            UNSHARED => FromInit::Unshared,
            LISTENER => FromInit::Listener,
            STATUS => FromInit::Status(Status {
                wait_status: b.u32()? as i32,
                disk_full: b.bool()?,
                left_cgroup: b.bool()?,
                usage: sys::Usage {
                    utime: Duration::from_micros(b.u64()?),
                    stime: Duration::from_micros(b.u64()?),
                    inblock: b.u64()?,
                    oublock: b.u64()?,
                },
            }),
            FAILED => {
                let code = b.u8()?;
                let step = SetupStep::from_code(code).ok_or_else(|| b.malformed("unknown step"))?;
                let errno = b.u32()? as i32;
                let detail = String::from_utf8_lossy(b.rest()).into_owned();
                FromInit::Failed(SetupError {
                    step,
                    errno: (errno != 0).then_some(errno),
                    detail,
                })
            }
            kind => {
                return Err(HandshakeError::Kind {
                    link: Self::LINK,
                    kind,
                });
            }
        };
        b.end().map(|()| message)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::handshake::{decode, encode};

    fn round_trip<M: Message + std::fmt::Debug + PartialEq>(message: M) {
        let frame = encode(&message);
        let (back, len) = decode::<M>(&frame).unwrap().unwrap();
        assert_eq!(back, message);
        assert_eq!(len, frame.len());
        for cut in 0..frame.len() {
            assert!(
                decode::<M>(&frame[..cut]).unwrap().is_none(),
                "{cut} bytes of {message:?} are not a frame"
            );
        }
    }

    #[test]
    fn every_fixed_message_round_trips() {
        round_trip(ToZygote::Fork);
        round_trip(FromZygote::Forked { pid: 4_194_304 });
        round_trip(FromZygote::ForkFailed {
            errno: libc::EAGAIN,
        });
        round_trip(ToInit::Mapped);
        round_trip(ToInit::Job(Box::new(Job {
            spec: SandboxSpec {
                lower_dirs: vec!["/layers/src".into(), "/layers/base".into()],
                upper: "/job/upper".into(),
                work: "/job/work".into(),
                identity: crate::spec::Identity {
                    host_uid: 200_001,
                    host_gid: 200_001,
                },
                argv: vec!["sh".into(), "-c".into(), "echo é".into()],
                env: vec![("PATH".into(), "/usr/bin:/bin".into())],
                cwd: "/build".into(),
                limits: crate::spec::SandboxLimits::default(),
                network: crate::spec::Network::Egress { port: 3128 },
                read_only_binds: vec![("/host/probes".into(), "/probes".into())],
                hostname: "corral".into(),
                scratch: None,
            },
            root: "/run/corral/jobs/j1/root".into(),
        })));
        round_trip(ToInit::Cgroup {
            join: vec![],
            leave: vec![],
        });
        round_trip(ToInit::Cgroup {
            join: vec!["/sys/fs/cgroup/memory/job-1/cgroup.procs".into()],
            leave: vec!["/a".into(), "/b".into()],
        });
        round_trip(FromInit::Unshared);
        round_trip(FromInit::Listener);
        round_trip(FromInit::Status(Status {
            wait_status: 9,
            disk_full: true,
            left_cgroup: false,
            usage: sys::Usage {
                utime: Duration::from_micros(1_234_567),
                stime: Duration::from_micros(89),
                inblock: 16,
                oublock: 1 << 40,
            },
        }));
        for step in SetupStep::ALL {
            round_trip(FromInit::Failed(SetupError {
                step,
                errno: Some(libc::ENOENT),
                detail: "/app: No such file or directory".to_owned(),
            }));
        }
        round_trip(FromInit::Failed(SetupError::new(SetupStep::Start, "")));
    }

    #[test]
    fn events_and_the_report_share_the_shim_link() {
        let event = LiveEvent {
            at: std::time::SystemTime::UNIX_EPOCH + Duration::from_millis(1_700_000_000_125),
            kind: crate::event::LiveEventKind::SeccompDenied {
                syscall: "keyctl".into(),
                count: 3,
            },
        };
        let mut stream = encode(&FromShim::Event(event.clone()));
        stream.extend(encode(&FromShim::Report(Box::new(Report {
            events_dropped: 2,
            ..Report::default()
        }))));
        let mut frames = crate::handshake::Frames::default();
        let mut reader = &stream[..];
        match frames.read::<FromShim>(&mut reader).unwrap() {
            Some(FromShim::Event(back)) => assert_eq!(back, event),
            other => panic!("expected the event first, got {other:?}"),
        }
        match frames.read::<FromShim>(&mut reader).unwrap() {
            Some(FromShim::Report(report)) => assert_eq!(report.events_dropped, 2),
            other => panic!("expected the report, got {other:?}"),
        }
        assert!(frames.read::<FromShim>(&mut reader).unwrap().is_none());
    }

    #[test]
    fn the_status_is_one_small_write() {
        let status = encode(&FromInit::Status(Status {
            wait_status: 0,
            disk_full: false,
            left_cgroup: true,
            usage: sys::Usage::default(),
        }));
        assert!(status.len() <= libc::PIPE_BUF, "{} bytes", status.len());
    }

    #[test]
    fn a_frame_of_another_link_is_refused() {
        let frame = encode(&FromInit::Unshared);
        assert!(matches!(
            decode::<ToInit>(&frame),
            Err(HandshakeError::Kind { kind: UNSHARED, .. })
        ));
        let mut longer = encode(&ToInit::Mapped);
        longer.push(0);
        longer[0] += 1;
        assert!(matches!(
            decode::<ToInit>(&longer),
            Err(HandshakeError::Malformed { .. })
        ));
    }

    #[test]
    fn a_long_setup_error_is_cut_to_fit_its_frame() {
        let long = "é".repeat(FromInit::MAX_LEN);
        let frame = encode(&FromInit::Failed(SetupError::new(SetupStep::Rootfs, long)));
        assert!(frame.len() <= FromInit::MAX_LEN);
        let Some((FromInit::Failed(e), _)) = decode::<FromInit>(&frame).unwrap() else {
            panic!("not a Failed frame");
        };
        assert_eq!(e.step, SetupStep::Rootfs);
        assert!(e.detail.chars().all(|c| c == 'é'));
    }
}
