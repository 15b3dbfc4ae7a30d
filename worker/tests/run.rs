//! `corral run` end to end, as root, on a real base: the python-app fixture is built with
//! `corral replay`, run with `corral run python-app --publish 127.0.0.1:PORT` (its Procfile
//! names the command), and a page is
//! fetched through the published port; stopping it leaves nothing behind (cgroups, mounts,
//! unpacked temporaries), and a second run finds every layer in the layer cache. Then every
//! abuse app in `fixtures/apps/` gives what its `expect` says.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use serde_json::Value;

mod common;
use common::{have, is_root, repo, require, rootfs};

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

fn corral(args: &[&str]) -> Output {
    common::corral().args(args).output().unwrap()
}

fn prerequisites() -> bool {
    require(is_root(), "root (namespaces, mounts, cgroups)")
        && require(
            rootfs().join("usr/bin/python3").exists(),
            "the test rootfs at $CORRAL_TEST_ROOTFS",
        )
        && require(have("tar"), "tar")
        && require(
            repo().join("fixtures/bundles/python-app/wheels").is_dir(),
            "the python-app wheels (run scripts/fixtures)",
        )
}

/// One data dir for the whole binary: the `python-3.11` base imported from the test rootfs,
/// and the python-app image built into its store by `corral replay`.
fn data() -> PathBuf {
    static DIR: OnceLock<tempfile::TempDir> = OnceLock::new();
    DIR.get_or_init(|| {
        let dir = tempfile::Builder::new()
            .prefix("corral-run-")
            .tempdir_in("/var/tmp")
            .unwrap();
        let data = dir.path().join("data");
        let data_text = data.to_str().unwrap();
        common::import_test_base(&data);
        let out = corral(&[
            "replay",
            "fixtures/jobs/python-app.json",
            "--json",
            "--data-dir",
            data_text,
        ]);
        assert!(
            out.status.success(),
            "replay python-app: {}\n{}",
            text(&out.stdout),
            text(&out.stderr)
        );
        dir
    })
    .path()
    .join("data")
}

/// Tests share the data dir and the scratch mount point: one app at a time.
fn serial() -> std::sync::MutexGuard<'static, ()> {
    static LOCK: std::sync::Mutex<()> = std::sync::Mutex::new(());
    LOCK.lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// The cgroup parent of one test's apps, under every hierarchy.
fn cgroup_parent(name: &str) -> String {
    format!("corral-test-run-{name}")
}

/// Job cgroups left under the test's parent, in any hierarchy.
fn cgroups_left(name: &str) -> Vec<PathBuf> {
    let mut left = Vec::new();
    let root = Path::new("/sys/fs/cgroup");
    let mut parents = vec![root.join(cgroup_parent(name))];
    if let Ok(hierarchies) = std::fs::read_dir(root) {
        parents.extend(
            hierarchies
                .flatten()
                .map(|h| h.path().join(cgroup_parent(name))),
        );
    }
    for parent in parents {
        if let Ok(entries) = std::fs::read_dir(&parent) {
            left.extend(
                entries
                    .flatten()
                    .filter(|e| e.path().is_dir())
                    .map(|e| e.path()),
            );
        }
    }
    left
}

/// Removes the test's (empty) cgroup parents.
fn remove_parents(name: &str) {
    let root = Path::new("/sys/fs/cgroup");
    let _ = std::fs::remove_dir(root.join(cgroup_parent(name)));
    if let Ok(hierarchies) = std::fs::read_dir(root) {
        for h in hierarchies.flatten() {
            let _ = std::fs::remove_dir(h.path().join(cgroup_parent(name)));
        }
    }
}

/// A running `corral run`.
struct App {
    child: Child,
    events: PathBuf,
    publish: SocketAddr,
    _dir: tempfile::TempDir,
}

fn start(name: &str, args: &[String], command: &[String]) -> App {
    let dir = common::scratch();
    let events = dir.path().join("events.jsonl");
    let publish: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
    let data = data();
    let mut cmd = common::corral();
    cmd.args(["run", "python-app", "--data-dir"])
        .arg(&data)
        .arg("--publish")
        .arg(publish.to_string())
        .arg("--events")
        .arg(&events)
        .arg("--app-id")
        .arg(name.replace('_', "-"))
        .args(args)
        .args(if command.is_empty() {
            &[][..]
        } else {
            &["--"][..]
        })
        .args(command)
        .env(
            "CORRAL_SANDBOX_CGROUP_PARENT",
            format!("/{}", cgroup_parent(name)),
        )
        .stdout(Stdio::null())
        .stderr(Stdio::piped());
    App {
        child: cmd.spawn().unwrap(),
        events,
        publish,
        _dir: dir,
    }
}

impl Drop for App {
    /// A test that failed half-way leaves no `corral run` behind.
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl App {
    fn events(&self) -> Vec<Value> {
        std::fs::read_to_string(&self.events)
            .unwrap_or_default()
            .lines()
            .filter_map(|l| serde_json::from_str(l).ok())
            .collect()
    }

    /// Waits (at most `limit`) for an event of `kind`.
    fn wait_for(&mut self, kind: &str, limit: Duration) -> Option<Value> {
        let until = Instant::now() + limit;
        while Instant::now() < until {
            if let Some(e) = self.events().into_iter().find(|e| e["kind"] == kind) {
                return Some(e);
            }
            if self.child.try_wait().unwrap().is_some() {
                return self.events().into_iter().find(|e| e["kind"] == kind);
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        None
    }

    fn get(&self, path: &str) -> String {
        http_get(self.publish, path).unwrap_or_else(|e| panic!("GET {path}: {e}"))
    }

    fn terminate(&self) {
        let status = Command::new("kill")
            .args(["-TERM", &self.child.id().to_string()])
            .status()
            .unwrap();
        assert!(status.success());
    }

    /// Waits for `corral run` to exit (killing it past `limit`): its code and stderr.
    fn finish(mut self, limit: Duration) -> (i32, String, Vec<Value>) {
        let until = Instant::now() + limit;
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                let mut err = String::new();
                let _ = self.child.stderr.take().unwrap().read_to_string(&mut err);
                return (status.code().unwrap_or(-1), err, self.events());
            }
            if Instant::now() > until {
                let _ = self.child.kill();
                let _ = self.child.wait();
                let mut err = String::new();
                let _ = self.child.stderr.take().unwrap().read_to_string(&mut err);
                panic!("corral run did not end within {limit:?}:\n{err}");
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

fn http_get(addr: SocketAddr, path: &str) -> std::io::Result<String> {
    let mut stream = TcpStream::connect_timeout(&addr, Duration::from_secs(5))?;
    stream.set_read_timeout(Some(Duration::from_secs(10)))?;
    write!(
        stream,
        "GET {path} HTTP/1.0\r\nHost: localhost\r\nConnection: close\r\n\r\n"
    )?;
    let mut response = String::new();
    stream.read_to_string(&mut response)?;
    Ok(response)
}

fn python_app_command() -> Vec<String> {
    vec!["/app/.venv/bin/python".into(), "/app/main.py".into()]
}

#[test]
fn the_python_app_serves_through_the_published_port_and_leaves_nothing() {
    if !prerequisites() {
        return;
    }
    let _serial = serial();
    let name = "python_app";
    let data = data();
    // No command: the image's Procfile says what serves it.
    let mut app = start(name, &["--grace".into(), "5".into()], &[]);
    let ready = app.wait_for("app_ready", Duration::from_secs(60));
    assert!(ready.is_some(), "never ready: {:?}", app.events());
    let page = app.get("/?name=corral");
    assert!(page.starts_with("HTTP/1."), "{page}");
    assert!(page.contains(" 200 "), "{page}");
    assert!(page.contains("Hello, corral!"), "{page}");
    let health = app.get("/healthz");
    assert!(health.contains("\"status\":\"ok\""), "{health}");
    assert!(health.contains("/app/.venv"), "{health}");
    app.terminate();
    let publish = app.publish;
    let (code, stderr, events) = app.finish(Duration::from_secs(60));
    assert_eq!(code, 0, "{stderr}");
    let stopped = events
        .iter()
        .find(|e| e["kind"] == "app_stopped")
        .unwrap_or_else(|| panic!("no app_stopped: {events:?}"));
    assert_eq!(stopped["details"]["outcome"], "stopped");
    assert_eq!(stopped["project"], "demo");
    assert_eq!(stopped["job_id"], "python-app");
    // Nothing is left: no job cgroup, no mount of the app, no half-unpacked layer, and the
    // published port is closed.
    assert!(cgroups_left(name).is_empty(), "{:?}", cgroups_left(name));
    let mounts = std::fs::read_to_string("/proc/self/mountinfo").unwrap();
    assert!(
        !mounts.contains(data.to_str().unwrap()),
        "a mount under the data dir:\n{mounts}"
    );
    let tmp: Vec<_> = std::fs::read_dir(data.join("layers/tmp"))
        .unwrap()
        .flatten()
        .map(|e| e.file_name())
        .collect();
    assert!(tmp.is_empty(), "left in layers/tmp: {tmp:?}");
    assert!(
        TcpStream::connect_timeout(&publish, Duration::from_secs(2)).is_err(),
        "the published port still accepts"
    );
    // Every layer of the image is in the layer cache now: a second start unpacks none.
    let mut again = start(name, &["--grace".into(), "5".into()], &python_app_command());
    assert!(
        again
            .wait_for("app_ready", Duration::from_secs(60))
            .is_some()
    );
    again.terminate();
    let (code, stderr, _) = again.finish(Duration::from_secs(60));
    assert_eq!(code, 0, "{stderr}");
    assert!(
        stderr.contains("3 layers, 0 unpacked now"),
        "the second run unpacked again:\n{stderr}"
    );
    remove_parents(name);
}

#[test]
fn an_unknown_image_is_refused_as_invalid_input() {
    if !prerequisites() {
        return;
    }
    let _serial = serial();
    let data = data();
    let out = corral(&[
        "run",
        "no-such-image",
        "--data-dir",
        data.to_str().unwrap(),
        "--",
        "true",
    ]);
    assert_eq!(out.status.code(), Some(65), "{}", text(&out.stderr));
    assert!(
        text(&out.stderr).contains("no-such-image"),
        "{}",
        text(&out.stderr)
    );
}

/// Whether `event` is of `kind` and its details hold every key of `details` with that value.
fn matches(event: &Value, want: &Value) -> bool {
    if event["kind"] != want["kind"] {
        return false;
    }
    let Some(details) = want.get("details").and_then(Value::as_object) else {
        return true;
    };
    details
        .iter()
        .all(|(key, value)| &event["details"][key] == value)
}

#[test]
fn every_abuse_app_gives_its_expected_outcome() {
    if !prerequisites() {
        return;
    }
    let _serial = serial();
    let names = common::json_fixtures("apps", 6);
    let mut failures = Vec::new();
    for path in names {
        let name = path.file_stem().unwrap().to_str().unwrap().to_owned();
        let fixture: Value = serde_json::from_slice(&std::fs::read(&path).unwrap()).unwrap();
        let strings = |v: &Value| -> Vec<String> {
            v.as_array()
                .map(|a| a.iter().map(|s| s.as_str().unwrap().to_owned()).collect())
                .unwrap_or_default()
        };
        let expect = &fixture["expect"];
        let mut app = start(
            &name,
            &strings(&fixture["args"]),
            &strings(&fixture["command"]),
        );
        let mut problems = Vec::new();
        if fixture["stop"] == "when_ready" {
            if app.wait_for("app_ready", Duration::from_secs(60)).is_none() {
                problems.push("never ready".to_owned());
            } else {
                if let Some(want) = expect["page_contains"].as_str() {
                    match http_get(app.publish, "/") {
                        Ok(page) if page.contains(want) => {}
                        other => problems.push(format!("page without {want:?}: {other:?}")),
                    }
                }
                if let Some(probe) = expect.get("host_port_not_serving") {
                    // The unexpected listener is reported within a second; then, from the
                    // host, its port is either closed or some other program's.
                    let _ = app.wait_for("unexpected_listen", Duration::from_secs(5));
                    let port = probe["port"].as_u64().unwrap() as u16;
                    let secret = probe["secret"].as_str().unwrap();
                    let addr: SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
                    if let Ok(mut s) = TcpStream::connect_timeout(&addr, Duration::from_secs(2)) {
                        let _ = s.set_read_timeout(Some(Duration::from_secs(2)));
                        let mut got = String::new();
                        let _ = s.read_to_string(&mut got);
                        if got.contains(secret) {
                            problems.push(format!("the host reached the app's port {port}"));
                        }
                    }
                }
            }
            app.terminate();
        }
        let (code, stderr, events) = app.finish(Duration::from_secs(120));
        if Some(i64::from(code)) != expect["exit_code"].as_i64() {
            problems.push(format!(
                "exit code {code}, expected {}",
                expect["exit_code"]
            ));
        }
        match events.iter().find(|e| e["kind"] == "app_stopped") {
            Some(stopped) if stopped["details"]["outcome"] == expect["outcome"] => {}
            other => problems.push(format!(
                "outcome {:?}, expected {}",
                other.map(|e| &e["details"]["outcome"]),
                expect["outcome"]
            )),
        }
        for want in expect["events"].as_array().unwrap() {
            if !events.iter().any(|e| matches(e, want)) {
                problems.push(format!("no event like {want}"));
            }
        }
        for kind in strings(&expect["absent"]) {
            if events.iter().any(|e| e["kind"] == kind.as_str()) {
                problems.push(format!("an event {kind}"));
            }
        }
        if let Some(counts) = expect["count_at_least"].as_object() {
            for (kind, at_least) in counts {
                let n = events.iter().filter(|e| e["kind"] == kind.as_str()).count() as u64;
                if n < at_least.as_u64().unwrap() {
                    problems.push(format!("{n} {kind} events, expected at least {at_least}"));
                }
            }
        }
        // Every process of it is gone with its cgroup.
        if !cgroups_left(&name).is_empty() {
            problems.push(format!("cgroups left: {:?}", cgroups_left(&name)));
        }
        remove_parents(&name);
        if !problems.is_empty() {
            let kinds: Vec<_> = events
                .iter()
                .map(|e| format!("{} {}", e["kind"], e["details"]))
                .collect();
            failures.push(format!(
                "{name}: {}\n  events: {kinds:#?}\n  stderr: {}",
                problems.join("; "),
                stderr
                    .lines()
                    .rev()
                    .take(15)
                    .collect::<Vec<_>>()
                    .join("\n    ")
            ));
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n\n"));
}

fn amqp_url() -> String {
    std::env::var("CORRAL_TEST_AMQP_URL")
        .unwrap_or_else(|_| "amqp://guest:guest@127.0.0.1:5672/%2f".to_owned())
}

/// With a broker configured, the app's events also reach `<prefix>.events`, routed
/// `<severity>.<kind>.<project>`.
#[test]
fn the_events_reach_the_broker_when_one_is_configured() {
    use lapin::options::{
        BasicGetOptions, ExchangeDeclareOptions, QueueBindOptions, QueueDeclareOptions,
    };
    use lapin::types::FieldTable;
    use lapin::{Connection, ConnectionProperties, ExchangeKind};
    if !prerequisites() {
        return;
    }
    let runtime = tokio::runtime::Runtime::new().unwrap();
    let url = amqp_url();
    let Some(conn) = runtime
        .block_on(Connection::connect(&url, ConnectionProperties::default()))
        .ok()
    else {
        require(false, "a RabbitMQ broker at $CORRAL_TEST_AMQP_URL");
        return;
    };
    let _serial = serial();
    let prefix = format!("corral-test-run-{}", std::process::id());
    let exchange = format!("{prefix}.events");
    let ch = runtime.block_on(conn.create_channel()).unwrap();
    let queue = runtime.block_on(async {
        ch.exchange_declare(
            exchange.as_str().into(),
            ExchangeKind::Topic,
            ExchangeDeclareOptions {
                durable: true,
                ..ExchangeDeclareOptions::default()
            },
            FieldTable::default(),
        )
        .await
        .unwrap();
        let queue = ch
            .queue_declare(
                "".into(),
                QueueDeclareOptions {
                    exclusive: true,
                    ..QueueDeclareOptions::default()
                },
                FieldTable::default(),
            )
            .await
            .unwrap();
        ch.queue_bind(
            queue.name().as_str().into(),
            exchange.as_str().into(),
            "#".into(),
            QueueBindOptions::default(),
            FieldTable::default(),
        )
        .await
        .unwrap();
        queue.name().as_str().to_owned()
    });
    let name = "broker";
    let data = data();
    let out = common::corral()
        .args(["run", "python-app", "--data-dir"])
        .arg(&data)
        .args([
            "--publish",
            &format!("127.0.0.1:{}", free_port()),
            "--app-id",
            "broker-events",
            "--boot-timeout",
            "2",
            "--grace",
            "1",
            "--",
            "/bin/sleep",
            "60",
        ])
        .env("CORRAL_AMQP_URL", &url)
        .env("CORRAL_AMQP_PREFIX", &prefix)
        .env(
            "CORRAL_SANDBOX_CGROUP_PARENT",
            format!("/{}", cgroup_parent(name)),
        )
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1), "{}", text(&out.stderr));
    let mut got = Vec::new();
    runtime.block_on(async {
        let until = Instant::now() + Duration::from_secs(30);
        while !got
            .iter()
            .any(|(_, e): &(String, Value)| e["kind"] == "app_stopped")
        {
            assert!(Instant::now() < until, "events so far: {got:?}");
            match ch
                .basic_get(queue.as_str().into(), BasicGetOptions { no_ack: true })
                .await
                .unwrap()
            {
                Some(message) => got.push((
                    message.delivery.routing_key.as_str().to_owned(),
                    serde_json::from_slice(&message.delivery.data).unwrap(),
                )),
                None => tokio::time::sleep(Duration::from_millis(50)).await,
            }
        }
        let _ = ch
            .exchange_delete(exchange.as_str().into(), Default::default())
            .await;
        let _ = conn.close(200, "".into()).await;
    });
    let keys: Vec<&str> = got.iter().map(|(k, _)| k.as_str()).collect();
    assert_eq!(
        keys,
        [
            "info.app_started.demo",
            "warning.boot_timeout.demo",
            "warning.app_stopped.demo"
        ],
        "{got:?}"
    );
    assert_eq!(got[2].1["job_id"], "broker-events");
    assert_eq!(got[2].1["details"]["outcome"], "boot_timeout");
    assert!(cgroups_left(name).is_empty());
    remove_parents(name);
}

/// One hostile layer from `fixtures/layers/` as a gzipped tar, its names written raw (a tar
/// library refuses to write them).
fn hostile_layer(entries: &[Value]) -> Vec<u8> {
    let mut builder = tar::Builder::new(Vec::new());
    for e in entries {
        let mut header = tar::Header::new_gnu();
        let path = e["path"].as_str().unwrap().as_bytes();
        header.as_gnu_mut().unwrap().name[..path.len()].copy_from_slice(path);
        if let Some(target) = e["target"].as_str() {
            header.as_gnu_mut().unwrap().linkname[..target.len()]
                .copy_from_slice(target.as_bytes());
        }
        let content = e["content"].as_str().unwrap_or("").as_bytes();
        let kind = match e["type"].as_str().unwrap() {
            "file" => tar::EntryType::Regular,
            "dir" => tar::EntryType::Directory,
            "symlink" => tar::EntryType::Symlink,
            "hardlink" => tar::EntryType::Link,
            "char" => tar::EntryType::Char,
            other => panic!("unknown entry type {other}"),
        };
        header.set_entry_type(kind);
        header.set_size(if kind == tar::EntryType::Regular {
            content.len() as u64
        } else {
            0
        });
        if kind == tar::EntryType::Char {
            header
                .set_device_major(e["major"].as_u64().unwrap() as u32)
                .unwrap();
            header
                .set_device_minor(e["minor"].as_u64().unwrap() as u32)
                .unwrap();
        }
        header.set_mode(0o644);
        header.set_mtime(0);
        header.set_cksum();
        let data: &[u8] = if kind == tar::EntryType::Regular {
            content
        } else {
            &[]
        };
        builder.append(&header, data).unwrap();
    }
    builder.into_inner().unwrap()
}

#[test]
fn every_hostile_layer_is_refused_and_nothing_escapes() {
    use corral_worker::image::{ImageSettings, build, publish};
    use corral_worker::store::{MEDIA_TYPE_LAYER_GZIP, Store, sha256_bytes};
    if !require(is_root(), "root (the layer cache's owner)") {
        return;
    }
    let runtime = tokio::runtime::Runtime::new().unwrap();
    let dir = common::scratch();
    let store_url = format!("oci-dir:{}", dir.path().join("store").display());
    let data = dir.path().join("data");
    let names = common::json_fixtures("layers", 5);
    let mut failures = Vec::new();
    for path in names {
        let name = path
            .file_stem()
            .unwrap()
            .to_str()
            .unwrap()
            .replace('_', "-");
        let fixture: Value = serde_json::from_slice(&std::fs::read(&path).unwrap()).unwrap();
        let tar = hostile_layer(fixture["entries"].as_array().unwrap());
        let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
        gz.write_all(&tar).unwrap();
        let gz = gz.finish().unwrap();
        let layer = corral_protocol::Layer {
            digest: sha256_bytes(&gz),
            diff_id: sha256_bytes(&tar),
            size: gz.len() as u64,
            media_type: MEDIA_TYPE_LAYER_GZIP.to_owned(),
        };
        runtime.block_on(async {
            let store = Store::open(&store_url, None).await.unwrap();
            store.put_blob_bytes(&gz).await.unwrap();
            let image = build(std::slice::from_ref(&layer), &ImageSettings::default());
            publish(&store, &name, std::slice::from_ref(&layer), &image)
                .await
                .unwrap();
        });
        let out = corral(&[
            "run",
            &name,
            "--store",
            &store_url,
            "--data-dir",
            data.to_str().unwrap(),
            "--",
            "/bin/true",
        ]);
        let stderr = text(&out.stderr);
        let expect = &fixture["expect"];
        let mut problems = Vec::new();
        if out.status.code() != Some(65) {
            problems.push(format!("exit {:?}, expected 65", out.status.code()));
        }
        let want = expect["stderr_contains"].as_str().unwrap();
        if !stderr.contains(want) {
            problems.push(format!("stderr without {want:?}"));
        }
        if let Some(escape) = expect["escape"].as_str() {
            // Relative: from the directory a layer is unpacked in, <data>/layers/tmp/<x>/tree.
            let target = if escape.starts_with('/') {
                PathBuf::from(escape)
            } else {
                data.join("layers/tmp/x/tree").join(escape)
            };
            let target = std::path::absolute(&target).unwrap();
            let normal: PathBuf = target.components().fold(PathBuf::new(), |mut p, c| {
                match c {
                    std::path::Component::ParentDir => {
                        p.pop();
                    }
                    other => p.push(other),
                }
                p
            });
            if normal.exists() {
                let _ = std::fs::remove_file(&normal);
                problems.push(format!("{} was written", normal.display()));
            }
        }
        let cached = std::fs::read_dir(data.join("layers/sha256"))
            .map(|d| d.count())
            .unwrap_or(0);
        let tmp = std::fs::read_dir(data.join("layers/tmp"))
            .map(|d| d.count())
            .unwrap_or(0);
        if cached + tmp > 0 {
            problems.push(format!(
                "left in the layer cache: {cached} layers, {tmp} temporaries"
            ));
        }
        if !problems.is_empty() {
            failures.push(format!("{name}: {}\n  {stderr}", problems.join("; ")));
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

/// An app that listens on every address inside is reached through the kernel (a link into
/// its namespace and a DNAT rule), and that link lets it reach nothing on the host, nor the
/// host reach any of its ports but the published one; both are gone when it stops.
#[test]
fn kernel_forwarding_serves_the_app_and_keeps_it_off_the_host() {
    if !prerequisites() || !require(have("nft"), "nft (Debian package nftables)") {
        return;
    }
    let _serial = serial();
    let name = "kernel_forwarding";
    // What a worker killed before it could clean up leaves: a table whose link is gone.
    let stale = "corral_crl16000";
    let added = Command::new("nft")
        .args(["add", "table", "ip", stale])
        .status()
        .unwrap();
    assert!(added.success());
    // A service on every address of the host: what the app must not reach.
    let service = TcpListener::bind("0.0.0.0:0").unwrap();
    let service_port = service.local_addr().unwrap().port();
    service.set_nonblocking(true).unwrap();
    let app = r#"
import http.server, os, socket, threading
secret = socket.socket()
secret.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
secret.bind(("0.0.0.0", 9471))
secret.listen()
def serve_secret():
    while True:
        c, _ = secret.accept()
        c.sendall(b"SECRET")
        c.close()
threading.Thread(target=serve_secret, daemon=True).start()
def host_address():
    # The host's end of the link: the first address of eth0's /30.
    for line in open("/proc/net/route").read().splitlines()[1:]:
        f = line.split()
        if f[0] == "eth0" and f[7] == "FCFFFFFF":
            net = int(f[1], 16)
            return socket.inet_ntoa((net + (1 << 24)).to_bytes(4, "little"))
    return None
class H(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        host = host_address()
        try:
            socket.create_connection((host, int(os.environ["SERVICE_PORT"])), timeout=3).close()
            body = "host %s: CONNECTED" % host
        except (OSError, TypeError) as e:
            body = "host %s: unreachable (%s)" % (host, type(e).__name__)
        body = ("client %s; %s" % (self.client_address[0], body)).encode()
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)
    def log_message(self, *a):
        pass
http.server.ThreadingHTTPServer(("0.0.0.0", int(os.environ["PORT"])), H).serve_forever()
"#;
    let mut running = start(
        name,
        &[
            "--grace".into(),
            "2".into(),
            "--env".into(),
            format!("SERVICE_PORT={service_port}"),
        ],
        &["/usr/bin/python3".into(), "-c".into(), app.into()],
    );
    let ready = running
        .wait_for("app_ready", Duration::from_secs(60))
        .unwrap_or_else(|| panic!("never ready: {:?}", running.events()));
    assert_eq!(ready["details"]["forwarding"], "kernel", "{ready}");
    let link = ready["details"]["link"].as_str().unwrap().to_owned();
    let app_address: std::net::IpAddr = ready["details"]["app_address"]
        .as_str()
        .unwrap()
        .parse()
        .unwrap();
    assert!(Path::new("/sys/class/net").join(&link).exists());
    let tables = text(
        &Command::new("nft")
            .args(["list", "tables"])
            .output()
            .unwrap()
            .stdout,
    );
    assert!(
        !tables.contains(stale),
        "the stale table is left:\n{tables}"
    );

    // Served, and by the kernel: the app sees the host's end of the link as the client (the
    // userspace forwarder connects from 127.0.0.1 inside).
    let page = running.get("/");
    assert!(page.contains(" 200 "), "{page}");
    let host_end = match app_address {
        std::net::IpAddr::V4(a) => std::net::Ipv4Addr::from(u32::from(a) - 1),
        other => panic!("{other}"),
    };
    assert!(
        page.contains(&format!("client {host_end}; host {host_end}: ")),
        "{page}"
    );
    // The app cannot reach the host's service through its link, though the host can.
    assert!(page.contains(": unreachable ("), "{page}");
    assert!(!page.contains("host None"), "{page}");
    assert!(
        TcpStream::connect_timeout(
            &SocketAddr::from(([127, 0, 0, 1], service_port)),
            Duration::from_secs(2)
        )
        .is_ok()
    );
    let accepted = std::iter::from_fn(|| service.accept().ok()).count();
    assert_eq!(accepted, 1, "the app reached the host's service");
    // Nothing on the host reaches the app's address directly: not its second port, not even
    // `$PORT`; only what comes through the published address is let in.
    for port in [9471, 8080] {
        let direct =
            TcpStream::connect_timeout(&SocketAddr::new(app_address, port), Duration::from_secs(2));
        assert!(direct.is_err(), "the host reached {app_address}:{port}");
    }
    // Nor through the published address on the second port.
    let second = SocketAddr::new(running.publish.ip(), 9471);
    if let Ok(mut stream) = TcpStream::connect_timeout(&second, Duration::from_secs(2)) {
        let _ = stream.set_read_timeout(Some(Duration::from_secs(2)));
        let mut got = String::new();
        let _ = stream.read_to_string(&mut got);
        assert!(!got.contains("SECRET"), "the second port answered: {got}");
    }

    running.terminate();
    let (code, stderr, _) = running.finish(Duration::from_secs(60));
    assert_eq!(code, 0, "{stderr}");
    assert!(
        !Path::new("/sys/class/net").join(&link).exists(),
        "{link} is left"
    );
    let tables = Command::new("nft")
        .args(["list", "tables"])
        .output()
        .unwrap();
    let tables = text(&tables.stdout);
    assert!(
        !tables.contains(&format!("corral_{link}\n")),
        "the app's table is left:\n{tables}"
    );
    remove_parents(name);
}

/// `corral run` stops when asked even when nothing reads its stderr any more (a log pipe
/// whose reader died): what it says there is best effort.
#[test]
fn a_closed_stderr_does_not_keep_corral_run_from_stopping() {
    if !prerequisites() {
        return;
    }
    let _serial = serial();
    let name = "closed_stderr";
    let mut app = start(name, &["--grace".into(), "2".into()], &python_app_command());
    assert!(
        app.wait_for("app_ready", Duration::from_secs(60)).is_some(),
        "never ready: {:?}",
        app.events()
    );
    drop(app.child.stderr.take());
    app.terminate();
    let until = Instant::now() + Duration::from_secs(30);
    let status = loop {
        if let Some(status) = app.child.try_wait().unwrap() {
            break status;
        }
        assert!(
            Instant::now() < until,
            "corral run did not stop within 30 s of SIGTERM"
        );
        std::thread::sleep(Duration::from_millis(50));
    };
    assert_eq!(status.code(), Some(0));
    let events = app.events();
    let stopped = events.iter().find(|e| e["kind"] == "app_stopped");
    assert_eq!(
        stopped.map(|e| e["details"]["outcome"].clone()),
        Some(Value::from("stopped")),
        "{events:?}"
    );
    remove_parents(name);
}

/// With `--egress`, the app reaches what is listed (within the config's `[egress] allow`)
/// through a proxy of its own, as builds do: anything else is refused with
/// `egress_denied`, the proxy's socket inside is not an unexpected listener, and
/// `app_stopped` accounts the traffic per destination. Asking beyond the config is invalid
/// input.
#[test]
fn an_app_reaches_only_its_egress_list_through_its_proxy() {
    if !prerequisites() {
        return;
    }
    let _serial = serial();
    let name = "app_egress";
    // The allowed upstream, on an address of its own (loopback is refused unless listed).
    let upstream = TcpListener::bind("127.0.0.3:0").unwrap();
    let upstream_port = upstream.local_addr().unwrap().port();
    std::thread::spawn(move || {
        for mut conn in upstream.incoming().flatten() {
            let mut head = [0u8; 4096];
            let _ = conn.read(&mut head);
            let body = "UPSTREAM-OK";
            let _ = write!(
                conn,
                "HTTP/1.0 200 OK\r\nContent-Length: {}\r\n\r\n{body}",
                body.len()
            );
        }
    });
    let dir = common::scratch();
    let config = dir.path().join("worker.toml");
    std::fs::write(
        &config,
        format!("[egress]\nallow = [\"127.0.0.3:{upstream_port}\"]\n"),
    )
    .unwrap();
    let refused_port = free_port();
    let app = format!(
        r#"
import http.server, os, urllib.request, urllib.error
TARGETS = {{"/allowed": "http://127.0.0.3:{upstream_port}/", "/refused": "http://127.0.0.3:{refused_port}/"}}
class H(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        try:
            body = "got " + urllib.request.urlopen(TARGETS[self.path], timeout=10).read().decode()
        except urllib.error.HTTPError as e:
            body = "refused %d" % e.code
        except Exception as e:
            body = "failed %s" % type(e).__name__
        body = body.encode()
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)
    def log_message(self, *a):
        pass
http.server.HTTPServer(("127.0.0.1", int(os.environ["PORT"])), H).serve_forever()
"#
    );
    let mut running = start(
        name,
        &[
            "--grace".into(),
            "2".into(),
            "--config".into(),
            config.to_str().unwrap().into(),
            "--egress".into(),
            format!("127.0.0.3:{upstream_port}"),
        ],
        &["/usr/bin/python3".into(), "-c".into(), app],
    );
    assert!(
        running
            .wait_for("app_ready", Duration::from_secs(60))
            .is_some(),
        "never ready: {:?}",
        running.events()
    );
    let allowed = running.get("/allowed");
    assert!(allowed.contains("got UPSTREAM-OK"), "{allowed}");
    let refused = running.get("/refused");
    assert!(refused.contains("refused 403"), "{refused}");
    running.terminate();
    let (code, stderr, events) = running.finish(Duration::from_secs(60));
    assert_eq!(code, 0, "{stderr}");
    let denied: Vec<_> = events
        .iter()
        .filter(|e| e["kind"] == "egress_denied")
        .collect();
    assert_eq!(denied.len(), 1, "{events:?}");
    assert_eq!(denied[0]["details"]["port"], refused_port);
    assert!(
        !events.iter().any(|e| e["kind"] == "unexpected_listen"),
        "the proxy's socket was taken for the app's: {events:?}"
    );
    let stopped = events
        .iter()
        .find(|e| e["kind"] == "app_stopped")
        .unwrap_or_else(|| panic!("no app_stopped: {events:?}"));
    let rows = stopped["details"]["network"]["destinations"]
        .as_array()
        .unwrap_or_else(|| panic!("no network usage: {stopped}"));
    let row = |port: u16| {
        rows.iter()
            .find(|r| r["destination"] == format!("127.0.0.3:{port}"))
            .unwrap_or_else(|| panic!("no row for port {port}: {rows:?}"))
    };
    assert_eq!(row(upstream_port)["connections"], 1);
    assert!(row(upstream_port)["bytes_in"].as_u64().unwrap() > 0);
    assert_eq!(row(refused_port)["denied"], 1);

    // Beyond the config's ceiling: refused before anything runs.
    let out = common::corral()
        .args(["run", "python-app", "--data-dir"])
        .arg(data())
        .args(["--config", config.to_str().unwrap()])
        .args(["--egress", "127.0.0.4:80"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(65), "{}", text(&out.stderr));
    assert!(
        text(&out.stderr).contains("127.0.0.4:80"),
        "{}",
        text(&out.stderr)
    );
    remove_parents(name);
}
