//! The build: the sandbox runs the job's command over its staged root while its output is
//! streamed, capped at the job's `log_bytes` (the one place the log limit is enforced), to
//! the log file and to whoever follows the job live.

use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use corral_protocol::{Artifact, BuildInputs, Job, LogRef, NetworkPolicy, Stream};
use corral_sandbox::{
    Identity, Network, Outcome, PooledJobDir, Sandbox, SandboxLimits, SandboxSpec,
};

use super::error::JobError;
use super::{LogSink, RunContext, Settings, blocking};

/// A build that ran to its end, and what became of its output.
#[derive(Debug, Clone)]
pub struct Built {
    pub outcome: Outcome,
    /// The build wrote more than its log limit (and was stopped for it).
    pub log_truncated: bool,
    /// Bytes of regular files the build left in its upper dir.
    pub upper_bytes: u64,
    /// The stored build log.
    pub log: Option<LogRef>,
    pub output: Output,
    /// What the output's digest depends on (the action key's inputs).
    pub inputs: Option<Box<BuildInputs>>,
}

/// What became of a build's output.
#[derive(Debug, Clone, PartialEq)]
pub enum Output {
    /// Not snapshotted: the build failed, or this runner keeps no output.
    NotTaken,
    /// Snapshotted and stored as an image.
    Stored(Box<Artifact>),
    /// The tree cannot be stored (too large, an unacceptable entry): the job's fault.
    Refused(String),
}

/// A build's output on its way to the log file and the live log, capped at `limit` bytes:
/// past it, the notice goes to the live log, `on_limit` stops the build, and the rest of the
/// output is read and dropped so the build never blocks on a full pipe while it dies.
pub struct BuildLog {
    file: Option<Mutex<std::fs::File>>,
    sink: LogSink,
    limit: u64,
    written: AtomicU64,
    truncated: AtomicBool,
}

impl BuildLog {
    pub fn new(limit: u64, file: Option<std::fs::File>, sink: LogSink) -> Arc<Self> {
        Arc::new(BuildLog {
            file: file.map(Mutex::new),
            sink,
            limit,
            written: AtomicU64::new(0),
            truncated: AtomicBool::new(false),
        })
    }

    /// Whether the build passed its limit.
    pub fn truncated(&self) -> bool {
        self.truncated.load(Ordering::SeqCst)
    }

    /// Reads `pipe` to its end on a thread of its own (a pipe read blocks).
    pub fn read(
        self: &Arc<Self>,
        mut pipe: impl Read + Send + 'static,
        stream: Stream,
        on_limit: impl Fn() + Send + 'static,
    ) -> std::thread::JoinHandle<()> {
        let log = self.clone();
        std::thread::spawn(move || {
            let mut buf = vec![0u8; 64 * 1024];
            loop {
                let n = match pipe.read(&mut buf) {
                    Ok(0) | Err(_) => break,
                    Ok(n) => n,
                };
                if log.append(stream, &buf[..n]) {
                    on_limit();
                }
            }
        })
    }

    /// Takes what fits of `chunk`; true when this chunk passed the limit.
    fn append(&self, stream: Stream, chunk: &[u8]) -> bool {
        let before = self.written.fetch_add(chunk.len() as u64, Ordering::SeqCst);
        let room = self.limit.saturating_sub(before);
        let take = usize::try_from(room.min(chunk.len() as u64)).unwrap_or(chunk.len());
        if take > 0 {
            if let Some(file) = &self.file {
                let mut file = file
                    .lock()
                    .unwrap_or_else(std::sync::PoisonError::into_inner);
                let _ = file.write_all(&chunk[..take]);
            }
            let _ = self
                .sink
                .blocking_send((stream, Bytes::copy_from_slice(&chunk[..take])));
        }
        if take == chunk.len() || self.truncated.swap(true, Ordering::SeqCst) {
            return false;
        }
        let notice = format!(
            "corral: the build's output reached its limit of {} bytes; stopping it\n",
            self.limit
        );
        let _ = self
            .sink
            .blocking_send((Stream::System, Bytes::from(notice)));
        true
    }
}

/// What the sandbox runs: the job's command, env and limits over `lower_dirs` (topmost
/// first) and the job dir's upper, as the project's identity.
pub fn spec(
    job: &Job,
    settings: &Settings,
    lower_dirs: Vec<PathBuf>,
    job_dir: &PooledJobDir,
    identity: Identity,
) -> SandboxSpec {
    let disk = job.limits.disk_bytes.bytes();
    SandboxSpec {
        lower_dirs,
        upper: job_dir.upper(),
        work: job_dir.work(),
        identity,
        argv: job.command.clone(),
        env: super::spec::build_env(job),
        cwd: PathBuf::from(job.workdir.as_str()),
        limits: SandboxLimits {
            memory_bytes: Some(job.limits.memory_bytes.bytes()),
            pids: Some(job.limits.pids),
            cpu_quota: Some(settings.cpus_per_build),
            wall: Duration::from_secs(job.limits.wall_seconds),
            cpu_seconds: Some(job.limits.cpu_seconds),
            open_files: job.limits.open_files,
            tmp_bytes: (disk / 4).max(16 << 20),
            file_size_bytes: Some(disk),
        },
        network: match job.network {
            NetworkPolicy::None => Network::None,
            NetworkPolicy::Loopback => Network::Loopback,
        },
        read_only_binds: Vec::new(),
        hostname: "corral".to_string(),
        scratch: None,
    }
}

/// Runs the sandbox on a blocking thread, its output through a [`BuildLog`] into `log_path`
/// and `ctx.logs`, stopping it when `ctx.stop` fires or the log limit is passed. Returns the
/// outcome and whether the log limit was passed.
pub async fn sandbox(
    spec: SandboxSpec,
    settings: &Settings,
    log_limit: u64,
    log_path: &Path,
    ctx: &RunContext,
) -> Result<(Outcome, bool), JobError> {
    let config = settings.sandbox.clone();
    let mut running = blocking(move || Sandbox::spawn(&spec, &config))
        .await?
        .map_err(JobError::Sandbox)?;
    let cancel = running.cancel_handle();
    let grace = settings.kill_grace;
    let log_file = std::fs::File::create(log_path).map_err(|source| JobError::Log {
        path: log_path.to_path_buf(),
        source,
    })?;
    let log = BuildLog::new(log_limit, Some(log_file), ctx.logs.clone());
    let mut readers = Vec::new();
    let stop_on_limit = || {
        let cancel = cancel.clone();
        move || cancel.cancel(grace)
    };
    if let Some(pipe) = running.stdout.take() {
        readers.push(log.read(pipe, Stream::Stdout, stop_on_limit()));
    }
    if let Some(pipe) = running.stderr.take() {
        readers.push(log.read(pipe, Stream::Stderr, stop_on_limit()));
    }
    let watcher = {
        let (stop, cancel) = (ctx.stop.clone(), cancel.clone());
        tokio::spawn(async move {
            stop.stopped().await;
            cancel.cancel(grace);
        })
    };
    let outcome = blocking(move || running.wait()).await;
    watcher.abort();
    let readers_done = blocking(move || {
        for reader in readers {
            let _ = reader.join();
        }
    })
    .await;
    let outcome = outcome?.map_err(JobError::Sandbox)?;
    readers_done?;
    Ok((outcome, log.truncated()))
}

/// Bytes of regular files under `dir`, without following links (best effort).
pub fn dir_bytes(dir: &Path) -> u64 {
    let mut total = 0;
    let mut pending: Vec<PathBuf> = vec![dir.to_path_buf()];
    while let Some(dir) = pending.pop() {
        let Ok(entries) = std::fs::read_dir(&dir) else {
            continue;
        };
        for entry in entries.flatten() {
            let Ok(meta) = entry.metadata() else { continue };
            if meta.is_dir() {
                pending.push(entry.path());
            } else if meta.is_file() {
                total += meta.len();
            }
        }
    }
    total
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::AtomicUsize;

    use super::*;

    #[test]
    fn the_log_stops_at_its_limit_once_and_says_so() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("build.log");
        let (sink, mut live) = tokio::sync::mpsc::channel(64);
        let log = BuildLog::new(10, Some(std::fs::File::create(&path).unwrap()), sink);
        let stops = Arc::new(AtomicUsize::new(0));
        let counted = stops.clone();
        // The limit falls inside the first read; a later read on another stream adds nothing.
        let out = log.read(
            std::io::Cursor::new(b"0123456789abcdef".repeat(8)),
            Stream::Stdout,
            move || {
                counted.fetch_add(1, Ordering::SeqCst);
            },
        );
        out.join().unwrap();
        let err = log.read(
            std::io::Cursor::new(b"late".to_vec()),
            Stream::Stderr,
            || panic!("the limit stops the build once"),
        );
        err.join().unwrap();
        drop(log);
        assert_eq!(std::fs::read(&path).unwrap(), b"0123456789");
        let mut chunks = Vec::new();
        while let Ok(chunk) = live.try_recv() {
            chunks.push(chunk);
        }
        assert_eq!(
            chunks[0],
            (Stream::Stdout, Bytes::from_static(b"0123456789"))
        );
        assert_eq!(chunks[1].0, Stream::System);
        assert!(
            String::from_utf8_lossy(&chunks[1].1).contains("limit of 10 bytes"),
            "{chunks:?}"
        );
        assert_eq!(
            chunks.len(),
            2,
            "nothing past the limit goes live: {chunks:?}"
        );
        assert_eq!(stops.load(Ordering::SeqCst), 1);
    }

    #[test]
    fn output_within_the_limit_is_kept_whole() {
        let (sink, mut live) = tokio::sync::mpsc::channel(64);
        let log = BuildLog::new(100, None, sink);
        log.read(
            std::io::Cursor::new(b"hello\n".to_vec()),
            Stream::Stderr,
            || panic!("within the limit"),
        )
        .join()
        .unwrap();
        assert!(!log.truncated());
        assert_eq!(
            live.try_recv().unwrap(),
            (Stream::Stderr, Bytes::from_static(b"hello\n"))
        );
    }
}
