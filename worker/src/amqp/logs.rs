//! [`LogPump`]: turns a build's output into ordered LogChunks on `<prefix>.logs` (key
//! `<project>.<job_id>`), while the build runs. Output is coalesced into chunks of at most
//! [`CHUNK_BYTES`], flushed at most every [`FLUSH_EVERY`] unless a chunk is full, so the rate
//! is bounded; the total is bounded by the job's `limits.log_bytes`, past which the build is
//! stopped and ends `log_limit`. The last chunk has `eof: true`.

use std::sync::Arc;
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use corral_protocol::{JobId, LogChunk, ProjectId, Stream};
use lapin::BasicProperties;
use tokio::sync::mpsc;

use super::publisher::{PublishError, Publisher};

pub const CHUNK_BYTES: usize = 64 * 1024;
pub const FLUSH_EVERY: Duration = Duration::from_millis(100);
/// Attempts per chunk before the live log of this job is given up (the build goes on).
const ATTEMPTS: u32 = 5;

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
}

impl Out<'_> {
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
        let body = serde_json::to_vec(&chunk).unwrap_or_default();
        let props = BasicProperties::default()
            .with_content_type("application/json".into())
            .with_message_id(format!("{}.{}", self.pump.job_id, self.seq).into());
        for attempt in 0..ATTEMPTS {
            match self
                .pump
                .publisher
                .publish(&self.pump.exchange, &self.key, &body, props.clone())
                .await
            {
                // Nobody follows this job's log live: fine.
                Ok(()) | Err(PublishError::Unroutable { .. }) => {
                    self.seq += 1;
                    return;
                }
                Err(err) => {
                    tracing::warn!(job = %self.pump.job_id, attempt, error = %err, "log chunk not published");
                    tokio::time::sleep(Duration::from_millis(200 << attempt)).await;
                }
            }
        }
        tracing::error!(job = %self.pump.job_id, "giving up the live log of this job");
        self.broken = true;
    }
}

impl LogPump {
    /// Runs until every sender of `rx` is dropped (the build ended), then publishes the
    /// final chunk.
    pub async fn run(self, mut rx: mpsc::Receiver<(Stream, Bytes)>) -> LogTally {
        let mut out = Out {
            key: format!("{}.{}", self.project, self.job_id),
            pump: &self,
            seq: 0,
            broken: false,
        };
        let mut tally = LogTally::default();
        let mut pending = BytesMut::new();
        let mut pending_stream = Stream::Stdout;
        let mut deadline: Option<tokio::time::Instant> = None;
        loop {
            let next = match deadline {
                Some(at) => tokio::select! {
                    item = rx.recv() => Some(item),
                    () = tokio::time::sleep_until(at) => None,
                },
                None => Some(rx.recv().await),
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
        tally
    }
}
