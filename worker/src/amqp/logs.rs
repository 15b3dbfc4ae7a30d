//! [`LogPump`]: turns a build's output into ordered LogChunks on `<prefix>.logs` (key
//! `<project>.<job_id>`), while the build runs. Output is coalesced into chunks of at most
//! [`CHUNK_BYTES`], flushed at most every [`FLUSH_EVERY`] unless a chunk is full, so the rate
//! is bounded; the total is bounded by the job's `limits.log_bytes`, past which the build is
//! stopped and ends `log_limit`. The last chunk has `eof: true`.
//!
//! Chunks do not wait for each other's confirms (up to [`WINDOW`] are in flight), and the
//! job's result waits only until the last chunk is on its way, not confirmed. After a
//! broker failure the pump publishes again from the first chunk that failed, so a reader
//! may see a `seq` again; keeping each chunk whose `seq` is the next one expected gives the
//! whole log, in order, once.

use std::sync::Arc;
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use corral_protocol::{JobId, LogChunk, ProjectId, Stream};
use lapin::BasicProperties;
use tokio::sync::{mpsc, oneshot};

use super::ordered::{Message, Ordered};
use super::publisher::Publisher;

pub const CHUNK_BYTES: usize = 64 * 1024;
pub const FLUSH_EVERY: Duration = Duration::from_millis(100);
/// Attempts per chunk before the live log of this job is given up (the build goes on).
const ATTEMPTS: u32 = 5;
/// Chunks published and not yet confirmed, at most (a noisy build waits beyond that).
const WINDOW: usize = 16;

pub struct LogPump {
    pub publisher: Arc<Publisher>,
    pub exchange: String,
    pub job_id: JobId,
    pub project: ProjectId,
}

/// What the pump saw.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct LogTally {
    pub bytes: u64,
    pub chunks: u64,
}

struct Out<'a> {
    pump: &'a LogPump,
    key: String,
    seq: u64,
    broken: bool,
    stream: Ordered<Arc<Publisher>>,
}

impl Out<'_> {
    /// Publishes the next chunk; waits only while [`WINDOW`] chunks await their confirm.
    async fn send(&mut self, stream: Stream, data: &[u8], eof: bool) {
        if self.broken {
            return;
        }
        let chunk = LogChunk::new(
            self.pump.job_id.clone(),
            self.pump.project.clone(),
            self.seq,
            stream,
            data,
            eof,
        );
        let props = BasicProperties::default()
            .with_content_type("application/json".into())
            .with_message_id(format!("{}.{}", self.pump.job_id, self.seq).into());
        let msg = Message {
            exchange: self.pump.exchange.clone(),
            key: self.key.clone(),
            body: serde_json::to_vec(&chunk).unwrap_or_default(),
            props,
        };
        self.seq += 1;
        let gave_up = self.stream.push(msg).await;
        self.check(gave_up.is_empty());
    }

    /// Settles the confirms that came in.
    async fn settle(&mut self) {
        let gave_up = self.stream.settle().await;
        self.check(gave_up.is_empty());
    }

    fn check(&mut self, ok: bool) {
        if !ok && !self.broken {
            tracing::error!(job = %self.pump.job_id, "giving up the live log of this job");
            self.broken = true;
            self.stream.clear();
        }
    }
}

impl LogPump {
    /// Runs until every sender of `rx` is dropped (the build ended), then publishes the
    /// final chunk and says so on `sent` (the job's result may go out: the log is complete
    /// on the wire before it), then waits for the outstanding confirms, going back to a
    /// chunk that failed (see [`super::ordered`]).
    pub async fn run(
        self,
        mut rx: mpsc::Receiver<(Stream, Bytes)>,
        sent: oneshot::Sender<LogTally>,
    ) -> LogTally {
        let mut out = Out {
            key: format!("{}.{}", self.project, self.job_id),
            pump: &self,
            seq: 0,
            broken: false,
            stream: Ordered::new(
                self.publisher.clone(),
                WINDOW,
                ATTEMPTS,
                Duration::from_millis(200),
            ),
        };
        let mut tally = LogTally::default();
        let mut pending = BytesMut::new();
        let mut pending_stream = Stream::Stdout;
        let mut deadline: Option<tokio::time::Instant> = None;
        loop {
            let next = tokio::select! {
                item = rx.recv() => Some(item),
                () = sleep_until(deadline) => None,
                // A confirm came in: settle it now, not at the next chunk.
                () = out.stream.ready() => {
                    out.settle().await;
                    continue;
                }
            };
            match next {
                // The flush timer fired.
                None => {
                    out.send(pending_stream, &pending, false).await;
                    pending.clear();
                    deadline = None;
                }
                // The build ended.
                Some(None) => break,
                Some(Some((stream, mut data))) => {
                    tally.bytes += data.len() as u64;
                    if stream != pending_stream && !pending.is_empty() {
                        out.send(pending_stream, &pending, false).await;
                        pending.clear();
                    }
                    pending_stream = stream;
                    while !data.is_empty() {
                        let n = data.len().min(CHUNK_BYTES - pending.len());
                        pending.extend_from_slice(&data.split_to(n));
                        if pending.len() == CHUNK_BYTES {
                            out.send(pending_stream, &pending, false).await;
                            pending.clear();
                        }
                    }
                    deadline = if pending.is_empty() {
                        None
                    } else {
                        deadline.or_else(|| Some(tokio::time::Instant::now() + FLUSH_EVERY))
                    };
                }
            }
        }
        if pending.is_empty() {
            out.send(Stream::System, b"", true).await;
        } else {
            out.send(pending_stream, &pending, true).await;
        }
        tally.chunks = out.seq;
        let _ = sent.send(tally.clone());
        let gave_up = out.stream.finish().await;
        out.check(gave_up.is_empty());
        tally
    }
}

/// Sleeps until `at`, or forever without one.
async fn sleep_until(at: Option<tokio::time::Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
    }
}
