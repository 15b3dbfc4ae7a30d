//! The stores against real things: the directory store read by skopeo and umoci, the
//! registry store against Debian's docker-registry (started by `scripts/registry` on
//! 127.0.0.1), and faults from a tiny in-test HTTP server.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use corral_protocol::{Digest, Layer};
use corral_worker::image::{self, ImageSettings};
use corral_worker::store::{
    self, MEDIA_TYPE_LAYER_GZIP, PutOutcome, RetryPolicy, Store, StoreError, StoreOptions,
};
use sha2::{Digest as _, Sha256};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

mod common;
use common::{have, is_root, require};

fn run(cmd: &mut Command) -> String {
    let out = cmd
        .output()
        .unwrap_or_else(|e| panic!("running {cmd:?}: {e}"));
    assert!(
        out.status.success(),
        "{cmd:?} failed: {}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn sha256(bytes: &[u8]) -> Digest {
    Digest::from_sha256(Sha256::digest(bytes).into())
}

/// A gzip layer holding `files`, spooled into `dir`: (layer descriptor, spool path).
fn make_layer(dir: &Path, files: &[(&str, &[u8])]) -> (Layer, PathBuf) {
    let mut tar = tar::Builder::new(Vec::new());
    for (name, data) in files {
        let mut h = tar::Header::new_gnu();
        h.set_size(data.len() as u64);
        h.set_mode(0o644);
        h.set_mtime(1_700_000_000);
        h.set_entry_type(tar::EntryType::Regular);
        tar.append_data(&mut h, name, *data).unwrap();
    }
    let tar = tar.into_inner().unwrap();
    let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
    gz.write_all(&tar).unwrap();
    let gz = gz.finish().unwrap();
    let mut spool = tempfile::Builder::new().tempfile_in(dir).unwrap();
    spool.write_all(&gz).unwrap();
    let (_, path) = spool.keep().unwrap();
    (
        Layer {
            digest: sha256(&gz),
            diff_id: sha256(&tar),
            size: gz.len() as u64,
            media_type: MEDIA_TYPE_LAYER_GZIP.into(),
        },
        path,
    )
}

fn random_bytes(n: usize, seed: u64) -> Vec<u8> {
    // xorshift: incompressible enough that gzip keeps the size.
    let mut x = seed | 1;
    (0..n)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect()
}

/// Pushes [base, source, build] and the image under `tag`; returns the manifest digest.
async fn push_image(store: &Store, spool: &Path, tag: &str, big: &[u8]) -> (Digest, Vec<Layer>) {
    let layers = [
        make_layer(spool, &[("etc/os-release", b"ID=corral-test\n")]),
        make_layer(spool, &[("app/main.py", b"print('hello')\n")]),
        make_layer(spool, &[("app/out.txt", b"built\n"), ("app/big.bin", big)]),
    ];
    for (layer, path) in &layers {
        let outcome = store
            .put_blob_file(path, &layer.digest, layer.size)
            .await
            .unwrap();
        assert_eq!(outcome, PutOutcome::Uploaded);
        let _ = std::fs::remove_file(path);
    }
    let layers: Vec<Layer> = layers.into_iter().map(|(l, _)| l).collect();
    let img = image::build(
        &layers,
        &ImageSettings {
            created_epoch: 1_700_000_000,
            env: vec!["PATH=/usr/local/bin:/usr/bin:/bin".into()],
            cmd: vec!["python3".into(), "/app/main.py".into()],
            working_dir: "/app".into(),
            ..ImageSettings::default()
        },
    );
    let (digest, reference) = image::publish(store, tag, &layers, &img).await.unwrap();
    assert_eq!(digest, img.manifest_digest);
    assert_eq!(reference, store.reference(tag));
    assert!(store.has_blob(&img.config_digest).await.unwrap());
    let fetched = store.get_manifest(tag).await.unwrap();
    assert_eq!(fetched.digest, digest);
    assert_eq!(fetched.bytes, img.manifest);
    assert_eq!(fetched.media_type, store::MEDIA_TYPE_MANIFEST);
    let by_digest = store.get_manifest(digest.as_str()).await.unwrap();
    assert_eq!(by_digest.bytes, img.manifest);
    (digest, layers)
}

/// `umoci unpack` of `oci_dir:tag` shows the files of all three layers.
fn assert_unpacks(oci_dir: &Path, tag: &str, big: &[u8]) {
    let bundle = tempfile::tempdir().unwrap();
    let target = bundle.path().join("bundle");
    let mut cmd = Command::new("umoci");
    cmd.arg("unpack");
    if !is_root() {
        cmd.arg("--rootless");
    }
    run(cmd
        .arg("--image")
        .arg(format!("{}:{tag}", oci_dir.display()))
        .arg(&target));
    let rootfs = target.join("rootfs");
    assert_eq!(
        std::fs::read_to_string(rootfs.join("etc/os-release")).unwrap(),
        "ID=corral-test\n"
    );
    assert_eq!(
        std::fs::read_to_string(rootfs.join("app/main.py")).unwrap(),
        "print('hello')\n"
    );
    assert_eq!(
        std::fs::read_to_string(rootfs.join("app/out.txt")).unwrap(),
        "built\n"
    );
    assert_eq!(std::fs::read(rootfs.join("app/big.bin")).unwrap(), big);
}

fn tools_for_images() -> bool {
    require(have("skopeo"), "skopeo") && require(have("umoci"), "umoci")
}

// ---------------------------------------------------------------- directory store

#[tokio::test]
async fn dir_store_image_is_read_unchanged_by_skopeo_and_umoci() {
    if !tools_for_images() {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path().join("store");
    let store = Store::open(&format!("oci-dir:{}", root.display()), None)
        .await
        .unwrap();
    let spool = store.spool_dir().unwrap();
    let big = random_bytes(200_000, 7);
    let (digest, layers) = push_image(&store, &spool, "job-1", &big).await;
    assert_eq!(
        store.reference("job-1"),
        format!("oci:{}:job-1", root.display())
    );

    // Pushing a layer again writes nothing.
    let (again, path) = make_layer(&spool, &[("app/main.py", b"print('hello')\n")]);
    assert_eq!(again.digest, layers[1].digest);
    assert_eq!(
        store
            .put_blob_file(&path, &again.digest, again.size)
            .await
            .unwrap(),
        PutOutcome::AlreadyPresent
    );

    let raw = run(Command::new("skopeo").args(["inspect", "--raw", &store.reference("job-1")]));
    assert_eq!(sha256(raw.as_bytes()), digest);
    let other = tmp.path().join("other");
    run(Command::new("skopeo").args([
        "copy",
        "--quiet",
        &store.reference("job-1"),
        &format!("oci:{}:job-1", other.display()),
    ]));
    let copied = run(Command::new("skopeo").args([
        "inspect",
        "--raw",
        &format!("oci:{}:job-1", other.display()),
    ]));
    assert_eq!(
        sha256(copied.as_bytes()),
        digest,
        "skopeo changed the manifest"
    );
    assert_unpacks(&root, "job-1", &big);

    // A tag moves to the newest manifest; the old one stays reachable by digest.
    let big2 = random_bytes(1000, 8);
    let (digest2, _) = push_image_again(&store, &spool, &big2).await;
    assert_ne!(digest2, digest);
    assert_eq!(store.get_manifest("job-1").await.unwrap().digest, digest2);
    assert_eq!(
        store.get_manifest(digest.as_str()).await.unwrap().digest,
        digest
    );
    let index: serde_json::Value =
        serde_json::from_slice(&std::fs::read(root.join("index.json")).unwrap()).unwrap();
    let tagged = index["manifests"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|m| m["annotations"]["org.opencontainers.image.ref.name"] == "job-1")
        .count();
    assert_eq!(tagged, 1);
}

async fn push_image_again(store: &Store, spool: &Path, big: &[u8]) -> (Digest, ()) {
    let (layer, path) = make_layer(spool, &[("app/big.bin", big)]);
    store
        .put_blob_file(&path, &layer.digest, layer.size)
        .await
        .unwrap();
    let img = image::build(&[layer], &ImageSettings::default());
    store.put_blob_bytes(&img.config).await.unwrap();
    let d = store
        .put_manifest("job-1", &img.manifest, img.manifest_media_type)
        .await
        .unwrap();
    (d, ())
}

#[tokio::test]
async fn dir_store_concurrent_writers_of_one_blob_and_of_tags() {
    let tmp = tempfile::tempdir().unwrap();
    let store = Store::open(&format!("oci-dir:{}", tmp.path().display()), None)
        .await
        .unwrap();
    let spool = store.spool_dir().unwrap();
    let data = random_bytes(3 << 20, 11);
    let digest = sha256(&data);
    let mut tasks = Vec::new();
    for _ in 0..8 {
        let (store, spool, data, digest) =
            (store.clone(), spool.clone(), data.clone(), digest.clone());
        tasks.push(tokio::spawn(async move {
            let mut f = tempfile::Builder::new().tempfile_in(&spool).unwrap();
            f.write_all(&data).unwrap();
            let path = f.into_temp_path();
            store
                .put_blob_file(&path, &digest, data.len() as u64)
                .await
                .unwrap()
        }));
    }
    let mut uploaded = 0;
    for t in tasks {
        if t.await.unwrap() == PutOutcome::Uploaded {
            uploaded += 1;
        }
    }
    assert_eq!(uploaded, 1, "exactly one writer's file became the blob");
    let out = tmp.path().join("out");
    assert_eq!(
        store.get_blob_to_file(&digest, &out).await.unwrap(),
        data.len() as u64
    );
    assert_eq!(std::fs::read(&out).unwrap(), data);

    // Concurrent tag updates: none is lost.
    let mut tasks = Vec::new();
    for i in 0..16 {
        let store = store.clone();
        tasks.push(tokio::spawn(async move {
            let body = format!(r#"{{"schemaVersion":2,"n":{i}}}"#);
            store
                .put_manifest(
                    &format!("t{i}"),
                    body.as_bytes(),
                    store::MEDIA_TYPE_MANIFEST,
                )
                .await
                .unwrap()
        }));
    }
    for (i, t) in tasks.into_iter().enumerate() {
        let d = t.await.unwrap();
        assert_eq!(
            store.get_manifest(&format!("t{i}")).await.unwrap().digest,
            d
        );
    }
    // Nothing but blobs under blobs/sha256, and every one of them hashes to its name.
    for entry in std::fs::read_dir(tmp.path().join("blobs/sha256")).unwrap() {
        let entry = entry.unwrap();
        let bytes = std::fs::read(entry.path()).unwrap();
        assert_eq!(sha256(&bytes).hex(), entry.file_name().to_str().unwrap());
    }
}

/// Two stores on one layout (two worker instances of a host, or skopeo writing beside
/// them): each one's tags survive the other's updates, whatever each had read before, and
/// members of `index.json` the worker does not know are kept. The file stays canonical
/// JSON (compact, keys sorted), as it was when the whole document was rewritten.
#[tokio::test]
async fn dir_store_tags_from_other_writers_are_kept() {
    let tmp = tempfile::tempdir().unwrap();
    let url = format!("oci-dir:{}", tmp.path().display());
    let (a, b) = (
        Store::open(&url, None).await.unwrap(),
        Store::open(&url, None).await.unwrap(),
    );
    let put = |store: &Store, tag: String, n: usize| {
        let store = store.clone();
        async move {
            let body = format!(r#"{{"schemaVersion":2,"n":{n}}}"#);
            store
                .put_manifest(&tag, body.as_bytes(), store::MEDIA_TYPE_MANIFEST)
                .await
                .unwrap()
        }
    };
    put(&a, "first".into(), 0).await;
    // Another tool adds a member of its own and a tag, by rewriting the file.
    let index_path = tmp.path().join("index.json");
    let mut index: serde_json::Value =
        serde_json::from_slice(&std::fs::read(&index_path).unwrap()).unwrap();
    index["annotations"] = serde_json::json!({"written.by": "another tool"});
    let other = index["manifests"][0].clone();
    let mut other = other;
    other["annotations"]["org.opencontainers.image.ref.name"] = "by-hand".into();
    index["manifests"].as_array_mut().unwrap().push(other);
    std::fs::write(&index_path, serde_json::to_vec_pretty(&index).unwrap()).unwrap();

    let mut tasks = Vec::new();
    for i in 0..24 {
        let store = if i % 2 == 0 { &a } else { &b };
        tasks.push(tokio::spawn(put(store, format!("t{i}"), i)));
    }
    let mut digests = Vec::new();
    for t in tasks {
        digests.push(t.await.unwrap());
    }
    // `first` moves: both stores must see where it points now.
    let moved = put(&b, "first".into(), 99).await;
    for store in [&a, &b] {
        for (i, d) in digests.iter().enumerate() {
            assert_eq!(
                &store.get_manifest(&format!("t{i}")).await.unwrap().digest,
                d
            );
        }
        assert_eq!(store.get_manifest("first").await.unwrap().digest, moved);
        store.get_manifest("by-hand").await.unwrap();
    }
    let bytes = std::fs::read(&index_path).unwrap();
    let parsed: serde_json::Value = serde_json::from_slice(&bytes).unwrap();
    assert_eq!(parsed["annotations"]["written.by"], "another tool");
    assert_eq!(parsed["manifests"].as_array().unwrap().len(), 24 + 2);
    assert_eq!(
        String::from_utf8(serde_json::to_vec(&parsed).unwrap()).unwrap(),
        String::from_utf8(bytes).unwrap(),
        "index.json is canonical"
    );
}

#[tokio::test]
async fn dir_store_copies_a_blob_from_another_filesystem_and_leaves_it_alone() {
    let shm = Path::new("/dev/shm");
    if !require(
        shm.is_dir(),
        "a tmpfs at /dev/shm (another filesystem than the store)",
    ) {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let store = Store::open(&format!("oci-dir:{}", tmp.path().display()), None)
        .await
        .unwrap();
    let data = random_bytes(500_000, 21);
    let digest = sha256(&data);
    let mut outside = tempfile::Builder::new().tempfile_in(shm).unwrap();
    outside.write_all(&data).unwrap();
    assert_eq!(
        store
            .put_blob_file(outside.path(), &digest, data.len() as u64)
            .await
            .unwrap(),
        PutOutcome::Uploaded
    );
    let blob = tmp.path().join("blobs/sha256").join(digest.hex());
    assert_eq!(std::fs::read(&blob).unwrap(), data);
    assert_eq!(
        std::fs::read_dir(store.spool_dir().unwrap())
            .unwrap()
            .count(),
        0,
        "temp files left"
    );
    assert!(
        outside.path().exists(),
        "a file on another filesystem is copied, not moved"
    );
    // An existing blob is not written again.
    let err = store.put_blob_file(outside.path(), &digest, 1).await;
    assert!(matches!(err, Ok(PutOutcome::AlreadyPresent)), "{err:?}");
    let other = random_bytes(10, 22);
    let mut f = tempfile::Builder::new().tempfile_in(shm).unwrap();
    f.write_all(&other).unwrap();
    let err = store
        .put_blob_file(f.path(), &sha256(&other), 11)
        .await
        .unwrap_err();
    assert!(matches!(err, StoreError::SizeMismatch { .. }), "{err}");
}

#[tokio::test]
async fn dir_store_crash_before_rename_leaves_no_visible_blob() {
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path().join("store");
    let store = Store::open(&format!("oci-dir:{}", root.display()), None)
        .await
        .unwrap();
    let data = random_bytes(1 << 20, 5);
    let digest = sha256(&data);
    // A writer that died after writing half of its temp file, before the rename.
    let mut partial = tempfile::Builder::new()
        .tempfile_in(store.spool_dir().unwrap())
        .unwrap();
    partial.write_all(&data[..data.len() / 2]).unwrap();
    let (_, leftover) = partial.keep().unwrap();

    // Another process opening the same store sees no such blob.
    let reopened = Store::open(&format!("oci-dir:{}", root.display()), None)
        .await
        .unwrap();
    assert!(!reopened.has_blob(&digest).await.unwrap());
    let err = reopened
        .get_blob_to_file(&digest, &tmp.path().join("x"))
        .await
        .unwrap_err();
    assert!(err.is_not_found(), "{err}");
    assert!(!tmp.path().join("x").exists());
    assert_eq!(
        std::fs::read_dir(root.join("blobs/sha256"))
            .unwrap()
            .count(),
        0
    );

    // A wrong file under the right name is refused and stays invisible too.
    assert!(matches!(
        reopened
            .put_blob_file(&leftover, &digest, data.len() as u64)
            .await,
        Err(StoreError::DigestMismatch { .. })
    ));
    assert!(!reopened.has_blob(&digest).await.unwrap());

    let (d, _) = reopened.put_blob_bytes(&data).await.unwrap();
    assert_eq!(d, digest);
    assert!(reopened.has_blob(&digest).await.unwrap());

    // A leftover temp file is cleaned up once it is old enough to be nobody's.
    let mut partial = tempfile::Builder::new()
        .tempfile_in(store.spool_dir().unwrap())
        .unwrap();
    partial.write_all(b"half").unwrap();
    let (file, leftover) = partial.keep().unwrap();
    let two_days = std::time::SystemTime::now() - Duration::from_secs(2 * 24 * 3600);
    file.set_modified(two_days).unwrap();
    drop(file);
    Store::open(&format!("oci-dir:{}", root.display()), None)
        .await
        .unwrap();
    assert!(!leftover.exists(), "a stale temp file survived");
}

#[tokio::test]
async fn dir_store_detects_a_tampered_blob_on_read() {
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path().join("store");
    let store = Store::open(&format!("oci-dir:{}", root.display()), None)
        .await
        .unwrap();
    let (digest, _) = store.put_blob_bytes(b"the real bytes").await.unwrap();
    let manifest = store
        .put_manifest("t", br#"{"schemaVersion":2}"#, store::MEDIA_TYPE_MANIFEST)
        .await
        .unwrap();
    for d in [&digest, &manifest] {
        let path = root.join("blobs/sha256").join(d.hex());
        let mut perms = std::fs::metadata(&path).unwrap().permissions();
        std::os::unix::fs::PermissionsExt::set_mode(&mut perms, 0o644);
        std::fs::set_permissions(&path, perms).unwrap();
        std::fs::write(&path, b"evil bytes").unwrap();
    }
    let dest = tmp.path().join("got");
    let err = store.get_blob_to_file(&digest, &dest).await.unwrap_err();
    assert!(matches!(err, StoreError::DigestMismatch { .. }), "{err}");
    assert!(!err.is_retryable());
    assert!(!dest.exists(), "unverified bytes were left behind");
    let err = store.get_manifest("t").await.unwrap_err();
    assert!(matches!(err, StoreError::DigestMismatch { .. }), "{err}");
}

/// An image naming a layer the store does not hold is refused with the layer named, and
/// neither its config nor its manifest nor its tag appears.
#[tokio::test]
async fn dir_store_refuses_an_image_naming_a_missing_layer() {
    let tmp = tempfile::tempdir().unwrap();
    let store = Store::open(
        &format!("oci-dir:{}", tmp.path().join("store").display()),
        None,
    )
    .await
    .unwrap();
    let (held, path) = make_layer(tmp.path(), &[("app/a.txt", b"a\n")]);
    store
        .put_blob_file(&path, &held.digest, held.size)
        .await
        .unwrap();
    let (missing, _) = make_layer(tmp.path(), &[("app/b.txt", b"b\n")]);
    let layers = [held, missing.clone()];
    let img = image::build(&layers, &ImageSettings::default());
    let err = image::publish(&store, "refused", &layers, &img)
        .await
        .unwrap_err();
    assert!(matches!(err, StoreError::NotFound { .. }), "{err}");
    assert!(err.is_not_found(), "{err}");
    assert!(err.to_string().contains(missing.digest.hex()), "{err}");
    assert!(!store.has_blob(&img.config_digest).await.unwrap());
    assert!(store.get_manifest("refused").await.is_err());
    assert!(!store.has_blob(&img.manifest_digest).await.unwrap());
}

// ---------------------------------------------------------------- registry store

/// A docker-registry started by `scripts/registry`, stopped (by pid) on drop.
struct Registry {
    dir: tempfile::TempDir,
    addr: String,
    pid: u32,
    auth: Option<String>,
    tls: bool,
    access_log: bool,
}

fn registry_script() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../scripts/registry")
}

impl Registry {
    fn start(auth: Option<&str>) -> Option<Registry> {
        Registry::start_with(auth, false)
    }

    fn start_with(auth: Option<&str>, tls: bool) -> Option<Registry> {
        Registry::start_full(auth, tls, false)
    }

    /// A registry that logs every request (see [`Registry::requests`]).
    fn start_logged() -> Option<Registry> {
        Registry::start_full(None, false, true)
    }

    fn start_full(auth: Option<&str>, tls: bool, access_log: bool) -> Option<Registry> {
        if !require(
            have("docker-registry"),
            "docker-registry (apt-get install docker-registry)",
        ) {
            return None;
        }
        if tls && !require(have("openssl"), "openssl (for a TLS registry)") {
            return None;
        }
        let dir = tempfile::tempdir().unwrap();
        let mut r = Registry {
            dir,
            addr: String::new(),
            pid: 0,
            auth: auth.map(str::to_string),
            tls,
            access_log,
        };
        r.launch(None);
        Some(r)
    }

    /// The requests the registry logged so far, as `METHOD /path` (query dropped). Waits
    /// until the log stops growing: the registry writes a line after its answer.
    fn requests(&self) -> Vec<String> {
        let log = self.dir.path().join("registry.log");
        let read = || {
            std::fs::read_to_string(&log)
                .unwrap_or_default()
                .lines()
                .filter_map(|line| {
                    let quoted = line.split('"').nth(1)?;
                    let mut words = quoted.split(' ');
                    let (method, target) = (words.next()?, words.next()?);
                    target
                        .starts_with("/v2/")
                        .then(|| format!("{method} {}", target.split('?').next().unwrap_or(target)))
                })
                .collect::<Vec<_>>()
        };
        let mut last = read();
        loop {
            std::thread::sleep(Duration::from_millis(300));
            let now = read();
            if now == last {
                return now;
            }
            last = now;
        }
    }

    fn launch(&mut self, port: Option<&str>) {
        let mut cmd = Command::new(registry_script());
        if let Some(auth) = &self.auth {
            cmd.args(["--auth", auth]);
        }
        if let Some(port) = port {
            cmd.args(["--port", port]);
        }
        if self.tls {
            cmd.arg("--tls");
        }
        if self.access_log {
            cmd.arg("--access-log");
        }
        let out = run(cmd.arg(self.dir.path()));
        for line in out.lines() {
            if let Some(v) = line.strip_prefix("CORRAL_TEST_REGISTRY=") {
                self.addr = v.to_string();
            }
            if let Some(v) = line.strip_prefix("CORRAL_TEST_REGISTRY_PID=") {
                self.pid = v.parse().unwrap();
            }
        }
        assert!(
            self.pid > 0 && !self.addr.is_empty(),
            "scripts/registry said {out}"
        );
    }

    fn kill(&self) {
        let _ = Command::new("kill")
            .args(["-9", &self.pid.to_string()])
            .status();
        while Path::new(&format!("/proc/{}", self.pid)).exists()
            && !std::fs::read_to_string(format!("/proc/{}/stat", self.pid))
                .unwrap_or_default()
                .contains(") Z")
        {
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    fn restart(&mut self) {
        self.kill();
        let port = self.addr.rsplit(':').next().unwrap().to_string();
        self.launch(Some(&port));
    }

    fn url(&self, repo: &str) -> String {
        format!("oci+http://{}/{repo}", self.addr)
    }
}

impl Drop for Registry {
    fn drop(&mut self) {
        self.kill();
    }
}

fn fast_retry(attempts: u32) -> RetryPolicy {
    RetryPolicy {
        attempts,
        initial_backoff: Duration::from_millis(20),
        max_backoff: Duration::from_millis(500),
    }
}

#[tokio::test]
async fn registry_image_is_pulled_by_skopeo_and_unpacked_by_umoci() {
    let Some(reg) = Registry::start(None) else {
        return;
    };
    if !tools_for_images() {
        return;
    }
    let options = StoreOptions {
        chunk_size: 64 << 10, // the 300 KB build layer goes up in PATCH chunks
        ..StoreOptions::default()
    };
    let store = Store::open_with(&reg.url("corral/builds"), options.clone())
        .await
        .unwrap();
    let spool = tempfile::tempdir().unwrap();
    let big = random_bytes(300_000, 3);
    let (digest, layers) = push_image(&store, spool.path(), "job-42", &big).await;
    let reference = store.reference("job-42");
    assert_eq!(
        reference,
        format!("docker://{}/corral/builds:job-42", reg.addr)
    );

    let inspect = run(Command::new("skopeo").args(["inspect", "--tls-verify=false", &reference]));
    let inspect: serde_json::Value = serde_json::from_str(&inspect).unwrap();
    assert_eq!(inspect["Digest"], digest.as_str());
    assert_eq!(inspect["Layers"].as_array().unwrap().len(), 3);
    let oci = spool.path().join("pulled");
    run(Command::new("skopeo").args([
        "copy",
        "--quiet",
        "--src-tls-verify=false",
        &reference,
        &format!("oci:{}:job-42", oci.display()),
    ]));
    assert_unpacks(&oci, "job-42", &big);

    // Everything is there now: a second push uploads nothing.
    for layer in &layers {
        assert!(store.has_blob(&layer.digest).await.unwrap());
        let (again, path) = (layer, spool.path().join("again"));
        store.get_blob_to_file(&again.digest, &path).await.unwrap();
        assert_eq!(
            store
                .put_blob_file(&path, &again.digest, again.size)
                .await
                .unwrap(),
            PutOutcome::AlreadyPresent
        );
    }
    // Another repository mounts the base layer instead of uploading it.
    let other = Store::open_with(
        &reg.url("corral/other"),
        StoreOptions {
            mount_from: vec!["corral/builds".into()],
            ..options
        },
    )
    .await
    .unwrap();
    let base = spool.path().join("base");
    store
        .get_blob_to_file(&layers[0].digest, &base)
        .await
        .unwrap();
    assert_eq!(
        other
            .put_blob_file(&base, &layers[0].digest, layers[0].size)
            .await
            .unwrap(),
        PutOutcome::Mounted
    );
    assert!(other.has_blob(&layers[0].digest).await.unwrap());
    let missing = other.get_manifest("no-such-tag").await.unwrap_err();
    assert!(missing.is_not_found(), "{missing}");
}

/// The methods of the requests logged after the first `skip`, each with the last part of
/// its path kind (`blobs`, `uploads`, `manifests`).
fn methods_since(reg: &Registry, skip: usize) -> Vec<String> {
    reg.requests()
        .into_iter()
        .skip(skip)
        .map(|r| {
            let (method, path) = r.split_once(' ').unwrap();
            let kind = if path.contains("/blobs/uploads/") {
                "uploads"
            } else if path.contains("/blobs/") {
                "blob"
            } else {
                "manifest"
            };
            format!("{method} {kind}")
        })
        .collect()
}

#[tokio::test]
async fn pushes_cost_the_fewest_requests_against_a_real_registry() {
    let Some(reg) = Registry::start_logged() else {
        return;
    };
    let spool = tempfile::tempdir().unwrap();
    let data = random_bytes(5 << 20, 21);
    let digest = sha256(&data);
    let path = spool.path().join("layer");
    std::fs::write(&path, &data).unwrap();
    let size = data.len() as u64;
    let open = |repo: &str, options: StoreOptions| {
        let url = reg.url(repo);
        async move { Store::open_with(&url, options).await.unwrap() }
    };

    // A new layer: HEAD, POST, and one PUT that streams the file and commits it.
    let store = open("corral/builds", StoreOptions::default()).await;
    let seen = reg.requests().len();
    let outcome = store.put_blob_file(&path, &digest, size).await.unwrap();
    assert_eq!(outcome, PutOutcome::Uploaded);
    assert_eq!(
        methods_since(&reg, seen),
        ["HEAD blob", "POST uploads", "PUT uploads"]
    );
    // Checking it right after (as publishing an image does) asks nothing.
    let seen = reg.requests().len();
    assert!(store.has_blob(&digest).await.unwrap());
    assert_eq!(methods_since(&reg, seen), Vec::<String>::new());

    // The same unchanged layer pushed again, by a fresh store (another worker): one HEAD.
    let again = open("corral/builds", StoreOptions::default()).await;
    let seen = reg.requests().len();
    let outcome = again.put_blob_file(&path, &digest, size).await.unwrap();
    assert_eq!(outcome, PutOutcome::AlreadyPresent);
    assert_eq!(methods_since(&reg, seen), ["HEAD blob"]);

    // Another repository mounts it: HEAD, then one POST that the registry answers 201.
    let other = open(
        "corral/other",
        StoreOptions {
            mount_from: vec!["corral/builds".into()],
            ..StoreOptions::default()
        },
    )
    .await;
    let seen = reg.requests().len();
    let outcome = other.put_blob_file(&path, &digest, size).await.unwrap();
    assert_eq!(outcome, PutOutcome::Mounted);
    assert_eq!(methods_since(&reg, seen), ["HEAD blob", "POST uploads"]);
    assert!(
        open("corral/other", StoreOptions::default())
            .await
            .has_blob(&digest)
            .await
            .unwrap()
    );

    // A mount the registry cannot do (the source lacks the blob) opens a plain session,
    // which the upload uses: no extra POST.
    let third = open(
        "corral/third",
        StoreOptions {
            mount_from: vec!["corral/empty".into()],
            ..StoreOptions::default()
        },
    )
    .await;
    let seen = reg.requests().len();
    let outcome = third.put_blob_file(&path, &digest, size).await.unwrap();
    assert_eq!(outcome, PutOutcome::Uploaded);
    assert_eq!(
        methods_since(&reg, seen),
        ["HEAD blob", "POST uploads", "PUT uploads"]
    );

    // With a chunk size, the file goes up in streamed PATCHes and the PUT carries the rest.
    let chunked = open(
        "corral/chunked",
        StoreOptions {
            chunk_size: 2 << 20,
            ..StoreOptions::default()
        },
    )
    .await;
    let seen = reg.requests().len();
    let outcome = chunked.put_blob_file(&path, &digest, size).await.unwrap();
    assert_eq!(outcome, PutOutcome::Uploaded);
    assert_eq!(
        methods_since(&reg, seen),
        [
            "HEAD blob",
            "POST uploads",
            "PATCH uploads",
            "PATCH uploads",
            "PUT uploads"
        ]
    );
    for repo in ["corral/builds", "corral/third", "corral/chunked"] {
        let got = spool.path().join("got");
        let store = open(repo, StoreOptions::default()).await;
        assert_eq!(store.get_blob_to_file(&digest, &got).await.unwrap(), size);
        assert_eq!(std::fs::read(&got).unwrap(), data, "{repo}");
    }

    // A file that no longer matches its digest is refused by the registry, not stored.
    let changed = spool.path().join("changed");
    let mut bytes = data.clone();
    bytes[size as usize / 2] ^= 1;
    std::fs::write(&changed, &bytes).unwrap();
    let wrong = sha256(&data[..data.len() - 1]);
    let fresh = open("corral/fresh", StoreOptions::default()).await;
    let err = fresh
        .put_blob_file(&changed, &wrong, size)
        .await
        .unwrap_err();
    assert!(!err.is_retryable(), "{err}");
    assert!(!fresh.has_blob(&wrong).await.unwrap());
}

#[tokio::test]
async fn registry_over_tls_trusts_the_configured_ca_only() {
    let Some(reg) = Registry::start_with(Some("corral:tls-pw"), true) else {
        return;
    };
    let ca = reg.dir.path().join("ca.pem");
    let url = format!("oci://{}/corral/tls", reg.addr);
    let creds = Some(store::Credentials::new("corral", "tls-pw"));
    let store = Store::open_with(
        &url,
        StoreOptions {
            credentials: creds.clone(),
            ca_certificates: vec![ca.clone()],
            ..StoreOptions::default()
        },
    )
    .await
    .unwrap();
    let (digest, outcome) = store.put_blob_bytes(b"over TLS").await.unwrap();
    assert_eq!(outcome, PutOutcome::Uploaded);
    let manifest = format!(
        r#"{{"schemaVersion":2,"mediaType":"{}","config":{{"mediaType":"{}","digest":"{digest}","size":8}},"layers":[]}}"#,
        store::MEDIA_TYPE_MANIFEST,
        store::MEDIA_TYPE_CONFIG
    );
    let md = store
        .put_manifest("tls-1", manifest.as_bytes(), store::MEDIA_TYPE_MANIFEST)
        .await
        .unwrap();
    assert_eq!(store.get_manifest("tls-1").await.unwrap().digest, md);
    if have("skopeo") {
        // skopeo, trusting the same CA, sees the same manifest.
        let certs = tempfile::tempdir().unwrap();
        std::fs::copy(&ca, certs.path().join("ca.crt")).unwrap();
        let raw = run(Command::new("skopeo").args([
            "inspect",
            "--raw",
            "--creds",
            "corral:tls-pw",
            "--cert-dir",
            certs.path().to_str().unwrap(),
            &store.reference("tls-1"),
        ]));
        assert_eq!(sha256(raw.as_bytes()), md);
    }

    // Without the CA the certificate is refused, finally (retrying would not help).
    let untrusting = Store::open_with(
        &url,
        StoreOptions {
            credentials: creds,
            retry: fast_retry(3),
            ..StoreOptions::default()
        },
    )
    .await
    .unwrap();
    let err = untrusting.has_blob(&digest).await.unwrap_err();
    assert!(matches!(err, StoreError::Tls { .. }), "{err}");
    assert!(!err.is_retryable());
}

#[tokio::test]
async fn registry_with_htpasswd_takes_the_right_credentials_only() {
    let Some(reg) = Registry::start(Some("corral:s3cret-pw")) else {
        return;
    };
    let url = reg.url("corral/auth");
    let good = Store::open(&url, Some(store::Credentials::new("corral", "s3cret-pw")))
        .await
        .unwrap();
    let (digest, outcome) = good.put_blob_bytes(b"behind a password").await.unwrap();
    assert_eq!(outcome, PutOutcome::Uploaded);
    assert!(good.has_blob(&digest).await.unwrap());

    for creds in [Some(store::Credentials::new("corral", "wrong")), None] {
        let bad = Store::open_with(
            &url,
            StoreOptions {
                credentials: creds,
                retry: fast_retry(5),
                ..StoreOptions::default()
            },
        )
        .await
        .unwrap();
        let err = bad.has_blob(&digest).await.unwrap_err();
        assert!(
            matches!(err, StoreError::Unauthorized { status: 401, .. }),
            "{err}"
        );
        assert!(!err.is_retryable());
        let err = bad.put_blob_bytes(b"nope").await.unwrap_err();
        assert!(
            matches!(err, StoreError::Unauthorized { .. }),
            "not retried: {err}"
        );
    }
}

#[tokio::test]
async fn registry_down_at_start_is_a_retryable_error_after_bounded_retries() {
    // A port that nothing listens on: bound, then released.
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let store = Store::open_with(
        &format!("oci+http://127.0.0.1:{port}/corral/down"),
        StoreOptions {
            retry: fast_retry(3),
            ..StoreOptions::default()
        },
    )
    .await
    .unwrap();
    let err = store.has_blob(&sha256(b"x")).await.unwrap_err();
    match &err {
        StoreError::Exhausted { attempts, last, .. } => {
            assert_eq!(*attempts, 3);
            assert!(matches!(**last, StoreError::Connect { .. }), "{last}");
        }
        other => panic!("expected Exhausted, got {other}"),
    }
    assert!(err.is_retryable());
}

#[tokio::test]
async fn registry_restarted_mid_upload_the_retry_succeeds() {
    // The retries show up in the test's output.
    let _ = tracing_subscriber::fmt().with_test_writer().try_init();
    let Some(mut reg) = Registry::start(None) else {
        return;
    };
    let store = Store::open_with(
        &reg.url("corral/restart"),
        StoreOptions {
            chunk_size: 64 << 10,
            retry: RetryPolicy {
                attempts: 40,
                initial_backoff: Duration::from_millis(50),
                max_backoff: Duration::from_millis(500),
            },
            ..StoreOptions::default()
        },
    )
    .await
    .unwrap();
    let data = random_bytes(48 << 20, 9);
    let digest = sha256(&data);
    let spool = tempfile::tempdir().unwrap();
    let path = spool.path().join("blob");
    std::fs::write(&path, &data).unwrap();
    let upload = {
        let (store, path, digest) = (store.clone(), path.clone(), digest.clone());
        tokio::spawn(async move { store.put_blob_file(&path, &digest, data.len() as u64).await })
    };
    // Wait until the registry holds part of the upload, then kill and restart it.
    let uploads = reg
        .dir
        .path()
        .join("storage/docker/registry/v2/repositories/corral/restart/_uploads");
    loop {
        assert!(
            !upload.is_finished(),
            "the upload ended before the registry could be killed"
        );
        let started = std::fs::read_dir(&uploads)
            .into_iter()
            .flatten()
            .flatten()
            .any(|e| std::fs::metadata(e.path().join("data")).is_ok_and(|m| m.len() > 0));
        if started {
            break;
        }
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    reg.restart();
    let outcome = upload.await.unwrap().unwrap();
    assert!(
        matches!(outcome, PutOutcome::Uploaded | PutOutcome::AlreadyPresent),
        "{outcome:?}"
    );
    let got = spool.path().join("got");
    assert_eq!(
        store.get_blob_to_file(&digest, &got).await.unwrap(),
        std::fs::metadata(&path).unwrap().len()
    );
    assert_eq!(sha256(&std::fs::read(&got).unwrap()), digest);
}

// ---------------------------------------------------------------- faults from a fake registry

/// What the fake registry answers: status, headers, body.
type Answer = (u16, Vec<(String, String)>, Vec<u8>);

/// A minimal HTTP/1.1 server: answers the n-th request with `respond(n, method, path,
/// request head)`, counting requests.
async fn fake_registry(
    respond: impl Fn(usize, &str, &str, &str) -> Answer + Send + Sync + 'static,
) -> (String, Arc<AtomicUsize>) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap().to_string();
    let count = Arc::new(AtomicUsize::new(0));
    let respond = Arc::new(respond);
    let counter = count.clone();
    tokio::spawn(async move {
        loop {
            let Ok((mut sock, _)) = listener.accept().await else {
                return;
            };
            let (respond, counter) = (respond.clone(), counter.clone());
            tokio::spawn(async move {
                let mut buf = Vec::new();
                loop {
                    // Read one request head and its body, answer, repeat (keep-alive).
                    let head_end = loop {
                        if let Some(at) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
                            break at + 4;
                        }
                        let mut chunk = [0u8; 4096];
                        match sock.read(&mut chunk).await {
                            Ok(0) | Err(_) => return,
                            Ok(n) => buf.extend_from_slice(&chunk[..n]),
                        }
                    };
                    let head = String::from_utf8_lossy(&buf[..head_end]).to_string();
                    let len: usize = head
                        .lines()
                        .find_map(|l| {
                            let (k, v) = l.split_once(':')?;
                            k.eq_ignore_ascii_case("content-length")
                                .then(|| v.trim().parse().ok())?
                        })
                        .unwrap_or(0);
                    while buf.len() < head_end + len {
                        let mut chunk = [0u8; 65536];
                        match sock.read(&mut chunk).await {
                            Ok(0) | Err(_) => return,
                            Ok(n) => buf.extend_from_slice(&chunk[..n]),
                        }
                    }
                    buf.drain(..head_end + len);
                    let mut words = head.split_whitespace();
                    let (method, path) = (words.next().unwrap_or(""), words.next().unwrap_or(""));
                    let n = counter.fetch_add(1, Ordering::SeqCst);
                    let (status, headers, body) = respond(n, method, path, &head);
                    let mut out =
                        format!("HTTP/1.1 {status} X\r\ncontent-length: {}\r\n", body.len());
                    for (k, v) in headers {
                        out.push_str(&format!("{k}: {v}\r\n"));
                    }
                    out.push_str("\r\n");
                    let mut bytes = out.into_bytes();
                    if method != "HEAD" {
                        bytes.extend_from_slice(&body);
                    }
                    if sock.write_all(&bytes).await.is_err() {
                        return;
                    }
                }
            });
        }
    });
    (addr, count)
}

async fn fake_store(addr: &str) -> Store {
    Store::open_with(
        &format!("oci+http://{addr}/corral/fake"),
        StoreOptions {
            retry: fast_retry(4),
            ..StoreOptions::default()
        },
    )
    .await
    .unwrap()
}

#[tokio::test]
async fn a_5xx_is_retried_then_succeeds() {
    let blob = b"served after one failure".to_vec();
    let digest = sha256(&blob);
    let served = blob.clone();
    let (addr, count) = fake_registry(move |n, _, _, _| {
        if n == 0 {
            (503, vec![], b"busy".to_vec())
        } else {
            (200, vec![], served.clone())
        }
    })
    .await;
    let store = fake_store(&addr).await;
    let dest = tempfile::tempdir().unwrap();
    let path = dest.path().join("blob");
    assert_eq!(
        store.get_blob_to_file(&digest, &path).await.unwrap(),
        blob.len() as u64
    );
    assert_eq!(std::fs::read(&path).unwrap(), blob);
    assert_eq!(count.load(Ordering::SeqCst), 2);
}

#[tokio::test]
async fn a_4xx_is_final_and_not_retried() {
    let (addr, count) =
        fake_registry(|_, _, _, _| (400, vec![], br#"{"errors":[]}"#.to_vec())).await;
    let store = fake_store(&addr).await;
    let err = store.has_blob(&sha256(b"x")).await.unwrap_err();
    assert!(
        matches!(err, StoreError::Status { status: 400, .. }),
        "{err}"
    );
    assert!(!err.is_retryable());
    assert_eq!(count.load(Ordering::SeqCst), 1);
}

#[tokio::test]
async fn a_digest_mismatch_is_final_and_leaves_no_blob() {
    let wanted = sha256(b"the bytes the job named");
    let (addr, count) = fake_registry(|_, _, _, _| (200, vec![], b"other bytes".to_vec())).await;
    let store = fake_store(&addr).await;
    let dest = tempfile::tempdir().unwrap();
    let path = dest.path().join("blob");
    let err = store.get_blob_to_file(&wanted, &path).await.unwrap_err();
    assert!(matches!(err, StoreError::DigestMismatch { .. }), "{err}");
    assert!(!err.is_retryable());
    assert!(!path.exists(), "the unverified download was left behind");
    assert_eq!(count.load(Ordering::SeqCst), 1);

    // A registry that confirms an upload under another digest is caught too.
    let lying = sha256(b"something else");
    let (addr, _) = fake_registry(move |_, method, _, _| match method {
        "HEAD" => (404, vec![], vec![]),
        "POST" => (
            202,
            vec![("location".into(), "/v2/corral/fake/blobs/uploads/u1".into())],
            vec![],
        ),
        _ => (
            201,
            vec![("docker-content-digest".into(), lying.to_string())],
            vec![],
        ),
    })
    .await;
    let err = fake_store(&addr)
        .await
        .put_blob_bytes(b"payload")
        .await
        .unwrap_err();
    assert!(matches!(err, StoreError::DigestMismatch { .. }), "{err}");
}

#[test]
fn sha256_file_matches_sha256sum() {
    if !require(have("sha256sum"), "sha256sum") {
        return;
    }
    let mut f = tempfile::NamedTempFile::new().unwrap();
    f.write_all(&random_bytes(100_000, 1)).unwrap();
    let (d, size) = store::sha256_file(f.path()).unwrap();
    assert_eq!(size, 100_000);
    let out = run(Command::new("sha256sum").arg(f.path()));
    assert_eq!(d.hex(), out.split_whitespace().next().unwrap());
}

#[tokio::test]
async fn bearer_token_challenge_is_answered_with_the_configured_credentials() {
    let blob = b"behind a token".to_vec();
    let digest = sha256(&blob);
    let served = blob.clone();
    let addr_cell = Arc::new(std::sync::OnceLock::<String>::new());
    let realm = addr_cell.clone();
    let (addr, count) = fake_registry(move |_, _, path, head| {
        let auth = head
            .lines()
            .find_map(|l| l.strip_prefix("authorization: ").or_else(|| l.strip_prefix("Authorization: ")))
            .unwrap_or("")
            .to_string();
        if path.starts_with("/token") {
            // corral:pw in basic auth, asking for the scope of the challenge.
            assert_eq!(auth, "Basic Y29ycmFsOnB3", "token request credentials");
            assert!(path.contains("scope=repository%3Acorral%2Ffake%3Apull"), "{path}");
            assert!(path.contains("service=fake-registry"), "{path}");
            return (200, vec![], br#"{"token":"t0ken"}"#.to_vec());
        }
        if auth == "Bearer t0ken" {
            return (200, vec![("docker-content-digest".into(), sha256(&served).to_string())], served.clone());
        }
        let challenge = format!(
            r#"Bearer realm="http://{}/token",service="fake-registry",scope="repository:corral/fake:pull""#,
            realm.get().unwrap()
        );
        (401, vec![("www-authenticate".into(), challenge)], vec![])
    })
    .await;
    addr_cell.set(addr.clone()).unwrap();
    let store = Store::open_with(
        &format!("oci+http://{addr}/corral/fake"),
        StoreOptions {
            credentials: Some(store::Credentials::new("corral", "pw")),
            retry: fast_retry(2),
            ..StoreOptions::default()
        },
    )
    .await
    .unwrap();
    let dest = tempfile::tempdir().unwrap();
    let path = dest.path().join("blob");
    assert_eq!(
        store.get_blob_to_file(&digest, &path).await.unwrap(),
        blob.len() as u64
    );
    // challenge, token, retried request; then the cached token serves the next call at once.
    assert_eq!(count.load(Ordering::SeqCst), 3);
    assert!(store.has_blob(&digest).await.unwrap());
    assert_eq!(count.load(Ordering::SeqCst), 4);
}

#[tokio::test]
async fn a_manifest_never_names_a_missing_layer() {
    let tmp = tempfile::tempdir().unwrap();
    let store = Store::open(&format!("oci-dir:{}", tmp.path().display()), None)
        .await
        .unwrap();
    let (layer, _path) = make_layer(tmp.path(), &[("a", b"never stored")]);
    let img = image::build(std::slice::from_ref(&layer), &ImageSettings::default());
    let err = image::publish(&store, "job-x", &[layer], &img)
        .await
        .unwrap_err();
    assert!(err.is_not_found(), "{err}");
    assert!(
        store
            .get_manifest("job-x")
            .await
            .unwrap_err()
            .is_not_found()
    );
}

#[tokio::test]
async fn a_blob_over_the_size_cap_is_refused_before_it_is_read() {
    let body = vec![b'z'; 10_000];
    let digest = sha256(&body);
    let (addr, count) = fake_registry(move |_, _, _, _| (200, vec![], body.clone())).await;
    let store = fake_store(&addr).await;
    let dest = tempfile::tempdir().unwrap();
    let path = dest.path().join("blob");
    let err = store
        .get_blob_to_file_max(&digest, &path, 100)
        .await
        .unwrap_err();
    assert!(
        matches!(err, StoreError::TooLarge { limit: 100, .. }),
        "{err}"
    );
    assert!(!err.is_retryable());
    assert!(!path.exists());
    assert_eq!(count.load(Ordering::SeqCst), 1);
    assert_eq!(
        store
            .get_blob_to_file_max(&digest, &path, 10_000)
            .await
            .unwrap(),
        10_000
    );
}

#[tokio::test]
async fn credentials_never_follow_a_location_to_another_host() {
    let payload = b"uploaded elsewhere".to_vec();
    let digest = sha256(&payload);
    let saw_auth = Arc::new(AtomicUsize::new(0));
    let seen = saw_auth.clone();
    let confirmed = digest.clone();
    let (elsewhere, hits) = fake_registry(move |_, _, _, head| {
        if head.to_ascii_lowercase().contains("\r\nauthorization:") {
            seen.fetch_add(1, Ordering::SeqCst);
        }
        (
            201,
            vec![("docker-content-digest".into(), confirmed.to_string())],
            vec![],
        )
    })
    .await;
    let (addr, _) = fake_registry(move |_, method, _, head| {
        if !head
            .to_ascii_lowercase()
            .contains("\r\nauthorization: basic")
        {
            return (
                401,
                vec![("www-authenticate".into(), r#"Basic realm="fake""#.into())],
                vec![],
            );
        }
        match method {
            "HEAD" => (404, vec![], vec![]),
            _ => (
                202,
                vec![("location".into(), format!("http://{elsewhere}/upload/u1"))],
                vec![],
            ),
        }
    })
    .await;
    let store = Store::open_with(
        &format!("oci+http://{addr}/corral/fake"),
        StoreOptions {
            credentials: Some(store::Credentials::new("corral", "pw")),
            retry: fast_retry(2),
            ..StoreOptions::default()
        },
    )
    .await
    .unwrap();
    let (_, outcome) = store.put_blob_bytes(&payload).await.unwrap();
    assert_eq!(outcome, PutOutcome::Uploaded);
    assert_eq!(
        hits.load(Ordering::SeqCst),
        1,
        "the upload went to the Location"
    );
    assert_eq!(
        saw_auth.load(Ordering::SeqCst),
        0,
        "credentials were sent to another host"
    );
}

#[tokio::test]
async fn a_manifest_refused_for_a_lost_blob_forgets_what_the_store_saw() {
    // The registry had the blob (a HEAD said so) and then lost it: the manifest PUT is
    // refused with MANIFEST_BLOB_UNKNOWN.
    let blob = sha256(b"a base layer the registry later collected");
    let header = blob.to_string();
    let (addr, count) = fake_registry(move |_, method, _, _| {
        match method {
        "HEAD" => (
            200,
            vec![("docker-content-digest".into(), header.clone())],
            vec![],
        ),
        _ => (
            400,
            vec![],
            br#"{"errors":[{"code":"MANIFEST_BLOB_UNKNOWN","message":"blob unknown to registry"}]}"#
                .to_vec(),
        ),
    }
    })
    .await;
    let store = fake_store(&addr).await;
    assert!(store.has_blob(&blob).await.unwrap());
    assert!(store.has_blob(&blob).await.unwrap());
    assert_eq!(
        count.load(Ordering::SeqCst),
        1,
        "the second check is answered from what the store saw"
    );
    let err = store
        .put_manifest("t", b"{}", "application/vnd.oci.image.manifest.v1+json")
        .await
        .unwrap_err();
    assert!(err.is_blobs_missing(), "{err}");
    assert!(
        err.is_retryable(),
        "a later attempt may upload the blob again"
    );
    assert_eq!(
        count.load(Ordering::SeqCst),
        2,
        "the same PUT is not repeated"
    );
    // Nothing seen there is trusted any more: the next check asks the registry.
    assert!(store.has_blob(&blob).await.unwrap());
    assert_eq!(count.load(Ordering::SeqCst), 3);
}
