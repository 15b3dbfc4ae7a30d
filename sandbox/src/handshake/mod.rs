//! The one handshake between the processes of a run: worker ↔ zygote, worker ↔ shim, and
//! shim ↔ the job's init (its pid 1). Every message is one frame,
//!
//! ```text
//! length: u32 LE (of what follows) | version: u8 | kind: u8 | body
//! ```
//!
//! sent with a single `write`/`sendmsg`: a seqpacket receiver gets it whole, a stream
//! receiver reassembles it. The version is checked on receipt, so a worker, zygote or shim
//! started from different builds of the binary (an upgrade under a running worker) refuse
//! each other instead of misreading a frame. Each direction of each link has its own
//! message type, so a frame meant for one never parses as another's.
//!
//! | link | transport | messages |
//! |---|---|---|
//! | worker → zygote | seqpacket, the zygote's fd 0 | [`ToZygote::Fork`] with 3 fds: control socket, stdout, stderr |
//! | zygote → worker | the same | [`FromZygote`]: the forked shim's pid, or why the fork failed |
//! | worker → shim | stream, the shim's fd 0 | [`ToShim::Request`] once, then [`ToShim::Cancel`]; end of stream cancels at once |
//! | shim → worker | the same | [`FromShim::Egress`] with the egress proxy's listening socket (egress jobs, before the job starts), [`FromShim::Event`] while the job runs (never blocking the shim: dropped and counted when the worker does not read), then [`FromShim::Report`] once, then the shim exits |
//! | shim → init | seqpacket | [`ToInit::Job`] (init is cloned before the job is known), then [`ToInit::Cgroup`], then [`ToInit::Mapped`] |
//! | init → shim | the same | [`FromInit::Unshared`] (with the egress listener for egress jobs), [`FromInit::Listener`] with the seccomp listener, then [`FromInit::Status`] or [`FromInit::Failed`] |
//!
//! Small messages have fixed binary bodies (init speaks under the job's seccomp filter and
//! writes its status in one go once the job is dead); the request and the report, whose
//! shapes follow [`crate::SandboxSpec`] and the outcome, carry JSON bodies.

use std::io::{self, Read, Write};
use std::os::fd::{OwnedFd, RawFd};

use crate::sys;

mod messages;
mod setup;

pub(crate) use messages::*;
pub use setup::{SetupError, SetupStep};

/// Version of the frames this build speaks; bumped whenever a message changes.
pub const VERSION: u8 = 3;

/// Length field, version and kind.
const HEADER: usize = 4 + 1 + 1;

/// Refused before reading a body: no message of ours comes near it.
const MAX_FRAME: usize = 16 << 20;

/// A frame that could not be read or understood.
#[derive(Debug, thiserror::Error)]
pub enum HandshakeError {
    #[error("frame of handshake version {got}; this build speaks version {VERSION}")]
    Version { got: u8 },
    #[error("unexpected {link} message kind {kind:#04x}")]
    Kind { link: &'static str, kind: u8 },
    #[error("malformed {link} message: {why}")]
    Malformed { link: &'static str, why: String },
    #[error("frame length {len} out of range")]
    Length { len: usize },
    #[error("the link closed in the middle of a frame")]
    Truncated,
    #[error("on the handshake link")]
    Io(#[from] io::Error),
}

/// One direction of one link.
pub(crate) trait Message: Sized {
    /// For errors: which link this is.
    const LINK: &'static str;
    /// The largest frame a seqpacket receiver of this type accepts.
    const MAX_LEN: usize;
    fn kind(&self) -> u8;
    fn put_body(&self, out: &mut Vec<u8>);
    fn parse(kind: u8, body: &[u8]) -> Result<Self, HandshakeError>;
}

/// The frame of `message`, ready for one write.
pub(crate) fn encode<M: Message>(message: &M) -> Vec<u8> {
    let mut out = vec![0, 0, 0, 0, VERSION, message.kind()];
    message.put_body(&mut out);
    let len = (out.len() - 4) as u32;
    out[..4].copy_from_slice(&len.to_le_bytes());
    out
}

/// The message framed at the start of `bytes` and the frame's length, or `None` while
/// the frame is incomplete.
pub(crate) fn decode<M: Message>(bytes: &[u8]) -> Result<Option<(M, usize)>, HandshakeError> {
    if bytes.len() > 4 && bytes[4] != VERSION {
        return Err(HandshakeError::Version { got: bytes[4] });
    }
    let Some(len) = bytes.get(..4) else {
        return Ok(None);
    };
    let len = u32::from_le_bytes([len[0], len[1], len[2], len[3]]) as usize;
    if !(HEADER - 4..=MAX_FRAME).contains(&len) {
        return Err(HandshakeError::Length { len });
    }
    let Some(frame) = bytes.get(..4 + len) else {
        return Ok(None);
    };
    let message = M::parse(frame[5], &frame[HEADER..])?;
    Ok(Some((message, frame.len())))
}

/// Sends one frame on a seqpacket socket, with `fds` attached.
pub(crate) fn send<M: Message>(sock: RawFd, message: &M, fds: &[RawFd]) -> io::Result<()> {
    sys::send_fds(sock, &encode(message), fds)
}

/// Receives one frame from a seqpacket socket, with up to `max_fds` fds (close-on-exec).
/// `None` at end of stream.
pub(crate) fn recv<M: Message>(
    sock: RawFd,
    max_fds: usize,
) -> Result<Option<(M, Vec<OwnedFd>)>, HandshakeError> {
    // A buffer the frame's size, not MAX_LEN: zeroing (and faulting in) tens of KiB for a
    // frame of a few bytes is most of a small receive's cost. A frame longer than MAX_LEN
    // is cut to it, and `decode` rejects it.
    let len = loop {
        match sys::peek_len(sock) {
            Ok(len) => break len,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(e.into()),
        }
    };
    let mut buf = vec![0u8; len.clamp(1, M::MAX_LEN)];
    let (n, fds) = loop {
        match sys::recv_fds(sock, &mut buf, max_fds) {
            Ok(Some(got)) => break got,
            Ok(None) => return Ok(None),
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(e.into()),
        }
    };
    match decode(&buf[..n])? {
        Some((message, len)) if len == n => Ok(Some((message, fds))),
        Some(_) => Err(HandshakeError::Malformed {
            link: M::LINK,
            why: "bytes after the frame".to_owned(),
        }),
        // The frame did not fit the buffer (or its sender cut it): never a message.
        None => Err(HandshakeError::Truncated),
    }
}

/// Writes one frame on a stream.
pub(crate) fn write<M: Message>(stream: &mut impl Write, message: &M) -> io::Result<()> {
    stream.write_all(&encode(message))
}

/// Reassembles the frames of a stream link.
#[derive(Debug, Default)]
pub(crate) struct Frames {
    buf: Vec<u8>,
    /// Descriptors received with the bytes ([`Frames::read_with_fds`]), oldest first.
    fds: std::collections::VecDeque<OwnedFd>,
}

impl Frames {
    /// Reads once (what is there: after `poll` said readable this does not block).
    /// `false` at end of stream.
    pub fn fill(&mut self, stream: &mut impl Read) -> io::Result<bool> {
        let mut chunk = [0u8; 8192];
        loop {
            match stream.read(&mut chunk) {
                Ok(n) => {
                    self.buf.extend_from_slice(&chunk[..n]);
                    return Ok(n > 0);
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(e),
            }
        }
    }

    /// [`Frames::read`] on a unix stream whose frames may carry descriptors (each sent
    /// with its frame in one `sendmsg`, see [`send`]): they are kept in order for
    /// [`Frames::take_fd`].
    pub fn read_with_fds<M: Message>(&mut self, sock: RawFd) -> Result<Option<M>, HandshakeError> {
        loop {
            if let Some(message) = self.next()? {
                return Ok(Some(message));
            }
            if !self.fill_with_fds(sock)? {
                return match self.buf.is_empty() {
                    true => Ok(None),
                    false => Err(HandshakeError::Truncated),
                };
            }
        }
    }

    /// [`Frames::fill`] on a unix stream whose frames may carry descriptors (kept for
    /// [`Frames::take_fd`]): reads once, so after `poll` said readable it does not block.
    /// `false` at end of stream.
    pub fn fill_with_fds(&mut self, sock: RawFd) -> io::Result<bool> {
        let mut chunk = [0u8; 8192];
        loop {
            match sys::recv_fds(sock, &mut chunk, 4) {
                Ok(Some((n, fds))) => {
                    self.buf.extend_from_slice(&chunk[..n]);
                    self.fds.extend(fds);
                    return Ok(true);
                }
                Ok(None) => return Ok(false),
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(e),
            }
        }
    }

    /// Whether bytes of an unfinished frame are held.
    pub fn is_empty(&self) -> bool {
        self.buf.is_empty()
    }

    /// The oldest descriptor received and not yet taken.
    pub fn take_fd(&mut self) -> Option<OwnedFd> {
        self.fds.pop_front()
    }

    /// The next whole message already read, if any.
    pub fn next<M: Message>(&mut self) -> Result<Option<M>, HandshakeError> {
        Ok(decode(&self.buf)?.map(|(message, len)| {
            self.buf.drain(..len);
            message
        }))
    }

    /// Blocks for the next message; `None` at a clean end of stream.
    pub fn read<M: Message>(
        &mut self,
        stream: &mut impl Read,
    ) -> Result<Option<M>, HandshakeError> {
        loop {
            if let Some(message) = self.next()? {
                return Ok(Some(message));
            }
            if !self.fill(stream)? {
                return match self.buf.is_empty() {
                    true => Ok(None),
                    false => Err(HandshakeError::Truncated),
                };
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Read;
    use std::time::Duration;

    #[test]
    fn another_version_is_refused() {
        let mut frame = encode(&ToInit::Mapped);
        frame[4] = VERSION + 1;
        assert!(matches!(
            decode::<ToInit>(&frame),
            Err(HandshakeError::Version { got }) if got == VERSION + 1
        ));
    }

    #[test]
    fn an_absurd_length_is_refused_before_reading_a_body() {
        let frame = [0xff, 0xff, 0xff, 0x7f, VERSION, b'C'];
        assert!(matches!(
            decode::<ToShim>(&frame),
            Err(HandshakeError::Length { .. })
        ));
    }

    #[test]
    fn stream_frames_reassemble_across_reads() {
        let mut bytes = encode(&ToShim::Cancel {
            grace: Duration::from_millis(1500),
        });
        bytes.extend(encode(&ToShim::Cancel {
            grace: Duration::ZERO,
        }));
        let mut frames = Frames::default();
        // One byte per read, as a slow stream could deliver them.
        let mut reader = OneByte(&bytes);
        let mut graces = Vec::new();
        while let Some(message) = frames.read::<ToShim>(&mut reader).unwrap() {
            let ToShim::Cancel { grace } = message else {
                panic!("not a cancel");
            };
            graces.push(grace);
        }
        assert_eq!(graces, [Duration::from_millis(1500), Duration::ZERO]);

        let mut cut = OneByte(&bytes[..bytes.len() - 1]);
        let mut frames = Frames::default();
        assert!(frames.read::<ToShim>(&mut cut).unwrap().is_some());
        assert!(matches!(
            frames.read::<ToShim>(&mut cut),
            Err(HandshakeError::Truncated)
        ));
    }

    struct OneByte<'a>(&'a [u8]);

    impl Read for OneByte<'_> {
        fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
            let Some((&first, rest)) = self.0.split_first() else {
                return Ok(0);
            };
            buf[0] = first;
            self.0 = rest;
            Ok(1)
        }
    }

    #[test]
    fn stream_frames_carry_the_egress_listener_in_order() {
        use std::os::fd::AsRawFd;
        use std::os::unix::net::UnixStream;
        let (mut shim, worker) = UnixStream::pair().unwrap();
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        // As the shim sends it: the frame and its descriptor in one sendmsg.
        sys::send_fds(
            shim.as_raw_fd(),
            &encode(&FromShim::Egress),
            &[listener.as_raw_fd()],
        )
        .unwrap();
        drop(listener);
        write(&mut shim, &FromShim::Report(Box::default())).unwrap();
        drop(shim);
        let mut frames = Frames::default();
        let first = frames
            .read_with_fds::<FromShim>(worker.as_raw_fd())
            .unwrap();
        assert!(matches!(first, Some(FromShim::Egress)));
        let fd = frames.take_fd().expect("the listener came with its frame");
        assert_eq!(
            std::net::TcpListener::from(fd).local_addr().unwrap().port(),
            port
        );
        assert!(matches!(
            frames
                .read_with_fds::<FromShim>(worker.as_raw_fd())
                .unwrap(),
            Some(FromShim::Report(_))
        ));
        assert!(
            frames
                .read_with_fds::<FromShim>(worker.as_raw_fd())
                .unwrap()
                .is_none()
        );
        assert!(frames.take_fd().is_none());
    }

    #[test]
    fn seqpacket_frames_carry_fds() {
        let (a, b) = sys::seqpacket_pair().unwrap();
        let (mut r, w) = std::io::pipe().unwrap();
        use std::os::fd::AsRawFd;
        send(a.as_raw_fd(), &FromInit::Listener, &[w.as_raw_fd()]).unwrap();
        drop(w);
        let (message, fds) = recv::<FromInit>(b.as_raw_fd(), 1).unwrap().unwrap();
        assert_eq!(message, FromInit::Listener);
        assert_eq!(fds.len(), 1);
        std::fs::File::from(fds.into_iter().next().unwrap())
            .write_all(b"x")
            .unwrap();
        let mut got = [0u8; 1];
        r.read_exact(&mut got).unwrap();
        assert_eq!(&got, b"x");
        drop(a);
        assert!(recv::<FromInit>(b.as_raw_fd(), 1).unwrap().is_none());
    }
}
