//! A running job's network namespace, seen from the worker: a thread of its own that has
//! entered the namespace makes sockets there on request (a socket stays in the namespace it
//! was made in, so the worker can connect to a server the job runs on its loopback) and asks
//! that namespace's kernel which sockets listen (NETLINK_SOCK_DIAG), without asking the job.
//!
//! Only that one thread ever changes namespace; the caller (a tokio worker, say) does not.

use std::io;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::os::fd::{AsFd, OwnedFd};
use std::os::unix::fs::MetadataExt;
use std::sync::mpsc;

use serde::{Deserialize, Serialize};

/// The transport of a listening socket.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Transport {
    Tcp,
    Udp,
}

impl Transport {
    pub fn as_str(self) -> &'static str {
        match self {
            Transport::Tcp => "tcp",
            Transport::Udp => "udp",
        }
    }
}

/// A socket that accepts traffic: TCP in LISTEN, or an unconnected UDP socket with a port.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct Listener {
    pub transport: Transport,
    pub address: IpAddr,
    pub port: u16,
}

enum Request {
    TcpSocket {
        v6: bool,
        reply: mpsc::SyncSender<io::Result<OwnedFd>>,
    },
    Listeners {
        reply: mpsc::SyncSender<io::Result<Vec<Listener>>>,
    },
    Run {
        command: Box<std::process::Command>,
        input: Vec<u8>,
        reply: mpsc::SyncSender<io::Result<std::process::Output>>,
    },
}

/// The network namespace of a running job, held by a thread inside it. Dropping this ends
/// the thread; the namespace itself lives as long as the job (or an fd on it) does.
pub struct JobNetwork {
    requests: mpsc::Sender<Request>,
    /// The namespace itself, for what is configured from outside it (an interface moved in).
    namespace: OwnedFd,
}

impl std::fmt::Debug for JobNetwork {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("JobNetwork").finish_non_exhaustive()
    }
}

impl JobNetwork {
    /// Enters the network namespace of host process `pid` on a new thread. Refused when
    /// that is the caller's own namespace (the process has not been moved into its own yet,
    /// or is not a job process at all).
    pub fn of_pid(pid: u32) -> io::Result<Self> {
        let path = format!("/proc/{pid}/ns/net");
        let ns = std::fs::File::open(&path)?;
        let own = std::fs::metadata("/proc/self/ns/net")?;
        let theirs = ns.metadata()?;
        if (own.dev(), own.ino()) == (theirs.dev(), theirs.ino()) {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("{path} is the worker's own network namespace"),
            ));
        }
        let namespace = OwnedFd::from(ns.try_clone()?);
        let (requests, inbox) = mpsc::channel::<Request>();
        let (ready_tx, ready_rx) = mpsc::sync_channel(1);
        std::thread::Builder::new()
            .name("corral-netns".to_owned())
            .spawn(move || {
                let entered = crate::sys::setns_net(ns.as_fd());
                drop(ns);
                let ok = entered.is_ok();
                let _ = ready_tx.send(entered);
                if !ok {
                    return;
                }
                for request in inbox {
                    match request {
                        Request::TcpSocket { v6, reply } => {
                            let _ = reply.send(crate::sys::tcp_socket(v6));
                        }
                        Request::Listeners { reply } => {
                            let _ = reply.send(listeners_here());
                        }
                        Request::Run {
                            mut command,
                            input,
                            reply,
                        } => {
                            let _ = reply.send(run_here(&mut command, &input));
                        }
                    }
                }
            })?;
        ready_rx
            .recv()
            .map_err(|_| io::Error::other("the namespace thread ended"))??;
        Ok(JobNetwork {
            requests,
            namespace,
        })
    }

    /// A path naming the namespace while this value lives (`/proc/<worker>/fd/<n>`), for a
    /// host tool that moves something into it (`ip link … netns PATH`).
    pub fn path(&self) -> std::path::PathBuf {
        use std::os::fd::AsRawFd;
        format!(
            "/proc/{}/fd/{}",
            std::process::id(),
            self.namespace.as_raw_fd()
        )
        .into()
    }

    /// Runs `command` inside the namespace (a child of the thread that is in it), with
    /// `input` on its stdin, and waits for it.
    pub fn run(
        &self,
        command: std::process::Command,
        input: &[u8],
    ) -> io::Result<std::process::Output> {
        let (reply, answer) = mpsc::sync_channel(1);
        self.ask(Request::Run {
            command: Box::new(command),
            input: input.to_vec(),
            reply,
        })?;
        answer
            .recv()
            .map_err(|_| io::Error::other("the namespace thread ended"))?
    }

    /// A non-blocking TCP socket inside the namespace, not yet connected.
    pub fn tcp_socket(&self, v6: bool) -> io::Result<OwnedFd> {
        let (reply, answer) = mpsc::sync_channel(1);
        self.ask(Request::TcpSocket { v6, reply })?;
        answer
            .recv()
            .map_err(|_| io::Error::other("the namespace thread ended"))?
    }

    /// Every TCP socket in LISTEN and every unconnected, bound UDP socket of the namespace,
    /// IPv4 and IPv6, sorted.
    pub fn listeners(&self) -> io::Result<Vec<Listener>> {
        let (reply, answer) = mpsc::sync_channel(1);
        self.ask(Request::Listeners { reply })?;
        answer
            .recv()
            .map_err(|_| io::Error::other("the namespace thread ended"))?
    }

    fn ask(&self, request: Request) -> io::Result<()> {
        self.requests
            .send(request)
            .map_err(|_| io::Error::other("the namespace thread ended"))
    }
}

const NLMSG_ERROR: u16 = 2;
const NLMSG_DONE: u16 = 3;
const SOCK_DIAG_BY_FAMILY: u16 = 20;
const NLM_F_REQUEST: u16 = 1;
const NLM_F_DUMP: u16 = 0x300;
const TCP_LISTEN: u8 = 10;
const TCP_CLOSE: u8 = 7;
const NLMSG_HDRLEN: usize = 16;

/// Runs `command` in the calling thread's namespace (see [`JobNetwork::run`]).
fn run_here(command: &mut std::process::Command, input: &[u8]) -> io::Result<std::process::Output> {
    use std::io::Write;
    use std::process::Stdio;
    let mut child = command
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()?;
    if let Some(mut stdin) = child.stdin.take() {
        stdin.write_all(input)?;
    }
    child.wait_with_output()
}

/// Asks the calling thread's namespace for its listeners (see [`JobNetwork::listeners`]).
fn listeners_here() -> io::Result<Vec<Listener>> {
    let sock = crate::sys::sock_diag_socket()?;
    let mut out = Vec::new();
    let mut seq = 0;
    for family in [libc::AF_INET as u8, libc::AF_INET6 as u8] {
        for (protocol, states) in [
            (libc::IPPROTO_TCP as u8, 1u32 << TCP_LISTEN),
            (libc::IPPROTO_UDP as u8, 1u32 << TCP_CLOSE),
        ] {
            seq += 1;
            crate::sys::netlink_send(sock.as_fd(), &diag_request(seq, family, protocol, states))?;
            let transport = if protocol == libc::IPPROTO_TCP as u8 {
                Transport::Tcp
            } else {
                Transport::Udp
            };
            read_dump(&sock, transport, &mut out)?;
        }
    }
    out.sort();
    out.dedup();
    Ok(out)
}

/// An `inet_diag_req_v2` dump request behind its `nlmsghdr`.
fn diag_request(seq: u32, family: u8, protocol: u8, states: u32) -> Vec<u8> {
    let len: u32 = 16 + 56;
    let mut b = Vec::with_capacity(len as usize);
    b.extend(len.to_ne_bytes());
    b.extend(SOCK_DIAG_BY_FAMILY.to_ne_bytes());
    b.extend((NLM_F_REQUEST | NLM_F_DUMP).to_ne_bytes());
    b.extend(seq.to_ne_bytes());
    b.extend(0u32.to_ne_bytes());
    b.extend([family, protocol, 0, 0]);
    b.extend(states.to_ne_bytes());
    b.extend([0u8; 48]); // inet_diag_sockid: any
    b
}

/// Reads one dump's datagrams until NLMSG_DONE.
fn read_dump(sock: &OwnedFd, transport: Transport, out: &mut Vec<Listener>) -> io::Result<()> {
    let mut buf = vec![0u8; 32 * 1024];
    loop {
        let n = crate::sys::netlink_recv(sock.as_fd(), &mut buf)?;
        if n == 0 {
            return Err(io::Error::from(io::ErrorKind::UnexpectedEof));
        }
        if parse_dump(&buf[..n], transport, out)? {
            return Ok(());
        }
    }
}

/// Parses one datagram of `inet_diag_msg`s; true once the dump is done.
fn parse_dump(mut b: &[u8], transport: Transport, out: &mut Vec<Listener>) -> io::Result<bool> {
    let short = || io::Error::new(io::ErrorKind::InvalidData, "short netlink message");
    while b.len() >= NLMSG_HDRLEN {
        let len = u32::from_ne_bytes(b[0..4].try_into().map_err(|_| short())?) as usize;
        let kind = u16::from_ne_bytes(b[4..6].try_into().map_err(|_| short())?);
        if len < NLMSG_HDRLEN || len > b.len() {
            return Err(short());
        }
        let body = &b[NLMSG_HDRLEN..len];
        match kind {
            NLMSG_DONE => return Ok(true),
            NLMSG_ERROR => {
                let code = i32::from_ne_bytes(
                    body.get(0..4)
                        .ok_or_else(short)?
                        .try_into()
                        .map_err(|_| short())?,
                );
                if code != 0 {
                    return Err(io::Error::from_raw_os_error(-code));
                }
            }
            SOCK_DIAG_BY_FAMILY if body.len() >= 40 => {
                let family = body[0];
                let port = u16::from_be_bytes([body[4], body[5]]);
                let src = &body[8..24];
                let address = if family == libc::AF_INET6 as u8 {
                    let mut a = [0u8; 16];
                    a.copy_from_slice(src);
                    IpAddr::V6(Ipv6Addr::from(a))
                } else {
                    IpAddr::V4(Ipv4Addr::new(src[0], src[1], src[2], src[3]))
                };
                if port != 0 {
                    out.push(Listener {
                        transport,
                        address,
                        port,
                    });
                }
            }
            _ => {}
        }
        let next = (len + 3) & !3;
        b = b.get(next..).unwrap_or(&[]);
    }
    Ok(false)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn message(kind: u16, body: &[u8]) -> Vec<u8> {
        let mut m = Vec::new();
        m.extend(((NLMSG_HDRLEN + body.len()) as u32).to_ne_bytes());
        m.extend(kind.to_ne_bytes());
        m.extend([0u8; 10]);
        m.extend(body);
        while m.len() % 4 != 0 {
            m.push(0);
        }
        m
    }

    fn diag(family: u8, port: u16, addr: &[u8]) -> Vec<u8> {
        let mut body = vec![family, TCP_LISTEN, 0, 0];
        body.extend(port.to_be_bytes());
        body.extend([0, 0]);
        let mut src = [0u8; 16];
        src[..addr.len()].copy_from_slice(addr);
        body.extend(src);
        body.extend([0u8; 16 + 4 + 8 + 20]);
        body
    }

    #[test]
    fn a_dump_reads_as_listeners_until_done() {
        let mut dgram = message(
            SOCK_DIAG_BY_FAMILY,
            &diag(libc::AF_INET as u8, 8080, &[127, 0, 0, 1]),
        );
        dgram.extend(message(
            SOCK_DIAG_BY_FAMILY,
            &diag(libc::AF_INET6 as u8, 9000, &[0; 16]),
        ));
        let mut out = Vec::new();
        assert!(!parse_dump(&dgram, Transport::Tcp, &mut out).unwrap());
        assert_eq!(
            out,
            vec![
                Listener {
                    transport: Transport::Tcp,
                    address: IpAddr::V4(Ipv4Addr::LOCALHOST),
                    port: 8080
                },
                Listener {
                    transport: Transport::Tcp,
                    address: IpAddr::V6(Ipv6Addr::UNSPECIFIED),
                    port: 9000
                },
            ]
        );
        assert!(parse_dump(&message(NLMSG_DONE, &[0; 4]), Transport::Tcp, &mut out).unwrap());
        let err = parse_dump(
            &message(NLMSG_ERROR, &(-libc::EPERM).to_ne_bytes()),
            Transport::Tcp,
            &mut out,
        )
        .unwrap_err();
        assert_eq!(err.raw_os_error(), Some(libc::EPERM));
    }

    #[test]
    fn a_truncated_message_is_an_error_not_a_panic() {
        let mut m = message(SOCK_DIAG_BY_FAMILY, &[0; 40]);
        m.truncate(20);
        assert!(parse_dump(&m, Transport::Tcp, &mut Vec::new()).is_err());
    }
}
