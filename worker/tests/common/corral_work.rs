//! Support for tests that run `corral work` against the real broker: a worker process with
//! its config and log, readiness through the metrics endpoint, operators' `corral events`
//! followers, and the cleanup of the test's broker objects however the test ends.
#![allow(dead_code)]

use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// A free TCP port on loopback.
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// Whether the test broker answers on 127.0.0.1:5672.
pub fn broker_up() -> bool {
    TcpStream::connect("127.0.0.1:5672").is_ok()
}

/// Whether python3 has pika (the cleanup's client, and the outside producers').
pub fn have_pika() -> bool {
    Command::new("python3")
        .args(["-c", "import pika"])
        .status()
        .is_ok_and(|s| s.success())
}

/// A child process killed when the test ends, however it ends.
pub struct Reaped(pub Child);

impl Drop for Reaped {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// `corral events ARGS --config CONFIG`, its stdout and stderr in files under `dir`, once it
/// says it is subscribed.
pub fn follow_events(dir: &Path, name: &str, config: &Path, args: &[&str]) -> Reaped {
    let out = std::fs::File::create(dir.join(format!("{name}.out"))).unwrap();
    let err_path = dir.join(format!("{name}.err"));
    let err = std::fs::File::create(&err_path).unwrap();
    let child = crate::common::corral()
        .arg("events")
        .args(args)
        .arg("--config")
        .arg(config)
        .stdout(out)
        .stderr(err)
        .spawn()
        .unwrap();
    let child = Reaped(child);
    let deadline = Instant::now() + Duration::from_secs(30);
    while !std::fs::read_to_string(&err_path)
        .unwrap_or_default()
        .contains("corral: following")
    {
        assert!(
            Instant::now() < deadline,
            "corral events never subscribed: {}",
            std::fs::read_to_string(&err_path).unwrap_or_default()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    child
}

/// One HTTP/1.1 GET on loopback, the whole response as text.
pub fn http_get(port: u16, path: &str) -> String {
    let mut stream = TcpStream::connect(("127.0.0.1", port)).unwrap();
    write!(
        stream,
        "GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
    )
    .unwrap();
    let mut response = String::new();
    stream.read_to_string(&mut response).unwrap();
    response
}

/// A running `corral work --config CONFIG` (logging at `info` into `log`), stopped with
/// SIGTERM (then SIGKILL after 30 s) and its broker objects (`<prefix>.*`) removed when
/// dropped, even when the test fails.
pub struct Worker {
    pub child: Option<Child>,
    pub prefix: String,
    pub log: PathBuf,
}

impl Worker {
    /// Starts the worker and waits until its metrics endpoint (`metrics_port`) says ready.
    pub fn start(config: &Path, prefix: &str, log: PathBuf, metrics_port: u16) -> Self {
        let file = std::fs::File::create(&log).unwrap();
        let child = crate::common::corral()
            .env("RUST_LOG", "info,lapin=error")
            .arg("work")
            .arg("--config")
            .arg(config)
            .stdout(Stdio::null())
            .stderr(file)
            .spawn()
            .unwrap();
        let worker = Worker {
            child: Some(child),
            prefix: prefix.to_owned(),
            log,
        };
        let deadline = Instant::now() + Duration::from_secs(60);
        while !TcpStream::connect(("127.0.0.1", metrics_port))
            .is_ok_and(|_| http_get(metrics_port, "/readyz").starts_with("HTTP/1.1 200"))
        {
            assert!(Instant::now() < deadline, "never ready:\n{}", worker.log());
            std::thread::sleep(Duration::from_millis(200));
        }
        worker
    }

    /// What the worker logged so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// SIGTERM, as systemd stops it: the worker drains and exits; its exit status.
    pub fn stop(&mut self) -> std::process::ExitStatus {
        let mut worker = self.child.take().expect("the worker runs");
        assert!(
            Command::new("kill")
                .args(["-TERM", &worker.id().to_string()])
                .status()
                .unwrap()
                .success()
        );
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            if let Some(status) = worker.try_wait().unwrap() {
                return status;
            }
            assert!(
                Instant::now() < deadline,
                "worker did not stop:\n{}",
                self.log()
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }
}

impl Drop for Worker {
    fn drop(&mut self) {
        if let Some(mut worker) = self.child.take() {
            let _ = Command::new("kill")
                .args(["-TERM", &worker.id().to_string()])
                .status();
            let deadline = Instant::now() + Duration::from_secs(30);
            while worker.try_wait().ok().flatten().is_none() && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(100));
            }
            let _ = worker.kill();
            let _ = worker.wait();
        }
        let p = &self.prefix;
        let script = format!(
            "import pika\nc = pika.BlockingConnection(pika.URLParameters('amqp://guest:guest@127.0.0.1:5672/%2f'))\n\
             ch = c.channel()\n\
             for q in ['{p}.jobs.default', '{p}.jobs.dead', '{p}.jobs.dead.unanswered']:\n    ch.queue_delete(q)\n\
             for e in ['jobs', 'dead', 'results', 'events', 'logs', 'control']:\n    ch.exchange_delete('{p}.' + e)\n\
             c.close()\n"
        );
        let _ = Command::new("python3").arg("-c").arg(script).status();
    }
}
