//! The directory store: an OCI image layout (`oci-layout`, `index.json`,
//! `blobs/sha256/<hex>`) that skopeo, umoci and podman read as `oci:DIR:TAG`.
//!
//! A blob becomes visible only by a no-replace rename of a complete, fsynced file whose
//! digest was checked, so concurrent writers of one blob are safe, an existing blob is never
//! rewritten, and a crash leaves at most a temp file under `.corral/tmp/`, never a partial
//! blob. `index.json` is replaced atomically under an exclusive lock on `.corral/index.lock`;
//! a tag is the `org.opencontainers.image.ref.name` annotation of a manifest descriptor.

use std::collections::BTreeMap;
use std::fs::{self, File, OpenOptions};
use std::io::{self, Write};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use corral_protocol::Digest;
use rustix::fs::{FlockOperation, RenameFlags};
use serde_json::{Value, json};

use super::{
    FetchedManifest, MEDIA_TYPE_MANIFEST, PutOutcome, StoreError, blocking, sha256_bytes,
    sha256_reader,
};
use crate::file_id::FileId;

const REF_NAME: &str = "org.opencontainers.image.ref.name";
const MEDIA_TYPE_INDEX: &str = "application/vnd.oci.image.index.v1+json";
/// Age after which a temp file in the store is a crashed writer's leftover.
const STALE_TEMP: std::time::Duration = std::time::Duration::from_secs(24 * 3600);

#[derive(Debug, Clone)]
pub struct DirStore {
    root: Arc<PathBuf>,
    /// Held by the one thread of this process writing `index.json`.
    index: Arc<Mutex<IndexCache>>,
    /// Tags waiting for that writer (see [`DirStore::set_tag`]).
    tags: Arc<Mutex<TagQueue>>,
}

/// Group commit of tags: whoever writes `index.json` writes every tag waiting, so tags set
/// by concurrent jobs share one write and its two fsyncs instead of taking turns for them
/// (each fsync is milliseconds on a slow disk, and the writes are serialized by the lock).
#[derive(Debug, Default)]
struct TagQueue {
    last_ticket: u64,
    /// In the order they were set: the last of one tag wins.
    waiting: Vec<(u64, String, Value)>,
    /// Tickets another caller's write made durable, for their callers to collect.
    written: std::collections::HashSet<u64>,
}

/// `index.json` as this process last read or wrote it, each descriptor kept serialized
/// beside its tag: a tag update parses the file again only when another writer replaced
/// it, and writes it back by joining the descriptors. (Every job adds a tag; with the whole
/// index read, parsed and serialized each time, a job's store time grew by about 1.4 µs
/// per tag.) The bytes are the same as serializing the parsed document: compact, keys
/// sorted.
#[derive(Debug, Default)]
struct IndexCache {
    file: Option<FileId>,
    /// `index.json` files this process wrote.
    writes: u64,
    /// The members other than `manifests`, serialized, by key.
    members: BTreeMap<String, String>,
    manifests: Vec<Descriptor>,
}

#[derive(Debug)]
struct Descriptor {
    tag: Option<String>,
    digest: Option<String>,
    media_type: Option<String>,
    json: String,
}

impl Descriptor {
    fn new(value: &Value) -> Descriptor {
        let text = |key: &str| value.get(key).and_then(Value::as_str).map(str::to_string);
        Descriptor {
            tag: ref_name(value).map(str::to_string),
            digest: text("digest"),
            media_type: text("mediaType"),
            json: value.to_string(),
        }
    }
}

impl IndexCache {
    fn parse(&mut self, bytes: &[u8], path: &Path) -> Result<(), StoreError> {
        let bad = |reason: String| StoreError::Index {
            path: path.to_path_buf(),
            reason,
        };
        let index: Value = serde_json::from_slice(bytes).map_err(|e| bad(e.to_string()))?;
        let Value::Object(members) = index else {
            return Err(bad("not a JSON object".into()));
        };
        let mut manifests = None;
        self.members.clear();
        for (key, value) in members {
            if key == "manifests" {
                manifests = Some(value);
            } else {
                self.members.insert(key, value.to_string());
            }
        }
        let Some(Value::Array(manifests)) = manifests else {
            return Err(bad("no manifests array".into()));
        };
        self.manifests = manifests.iter().map(Descriptor::new).collect();
        Ok(())
    }

    fn to_bytes(&self) -> Vec<u8> {
        let size = self
            .manifests
            .iter()
            .map(|d| d.json.len() + 1)
            .sum::<usize>()
            + 256;
        let mut out = Vec::with_capacity(size);
        out.push(b'{');
        let manifests = ("manifests", None);
        let mut members: Vec<(&str, Option<&str>)> = self
            .members
            .iter()
            .map(|(k, v)| (k.as_str(), Some(v.as_str())))
            .chain(std::iter::once(manifests))
            .collect();
        members.sort_by(|a, b| a.0.cmp(b.0));
        for (i, (key, value)) in members.into_iter().enumerate() {
            if i > 0 {
                out.push(b',');
            }
            out.extend_from_slice(Value::from(key).to_string().as_bytes());
            out.push(b':');
            match value {
                Some(value) => out.extend_from_slice(value.as_bytes()),
                None => {
                    out.push(b'[');
                    for (j, d) in self.manifests.iter().enumerate() {
                        if j > 0 {
                            out.push(b',');
                        }
                        out.extend_from_slice(d.json.as_bytes());
                    }
                    out.push(b']');
                }
            }
        }
        out.push(b'}');
        out
    }
}

impl DirStore {
    /// Opens the layout at `root`, creating it (and its parents) when missing.
    pub async fn open(root: PathBuf) -> Result<DirStore, StoreError> {
        let root = if root.is_absolute() {
            root
        } else {
            std::env::current_dir()
                .map_err(|source| StoreError::Read {
                    path: root.clone(),
                    source,
                })?
                .join(root)
        };
        let store = DirStore {
            root: Arc::new(root),
            index: Arc::default(),
            tags: Arc::default(),
        };
        let s = store.clone();
        blocking(move || s.create_layout()).await?;
        Ok(store)
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    pub(super) fn tmp_dir(&self) -> PathBuf {
        self.root.join(".corral/tmp")
    }

    fn blob_path(&self, digest: &Digest) -> PathBuf {
        self.root.join("blobs/sha256").join(digest.hex())
    }

    fn index_path(&self) -> PathBuf {
        self.root.join("index.json")
    }

    fn create_layout(&self) -> Result<(), StoreError> {
        // The layout is read by others (skopeo as another user, a web server); the temp
        // dir holds unverified bytes and is the worker's alone.
        for (dir, mode) in [
            (self.root.join("blobs/sha256"), 0o755),
            (self.tmp_dir(), 0o700),
        ] {
            create_dirs(&dir, mode)
                .map_err(|source| StoreError::CreateDir { path: dir, source })?;
        }
        self.write_new_file("oci-layout", br#"{"imageLayoutVersion":"1.0.0"}"#)?;
        let empty = json!({"schemaVersion": 2, "mediaType": MEDIA_TYPE_INDEX, "manifests": []});
        self.write_new_file("index.json", &to_vec(&empty))?;
        self.remove_stale_temps();
        Ok(())
    }

    /// Removes temp files that a crashed writer left behind. Only old ones: a live writer
    /// in another process may be spooling right now.
    fn remove_stale_temps(&self) {
        let Ok(entries) = fs::read_dir(self.tmp_dir()) else {
            return;
        };
        for entry in entries.flatten() {
            let stale = entry
                .metadata()
                .and_then(|m| m.modified())
                .is_ok_and(|t| t.elapsed().is_ok_and(|age| age > STALE_TEMP));
            if stale {
                tracing::info!(path = %entry.path().display(), "store: removing a stale temp file");
                let _ = fs::remove_file(entry.path());
            }
        }
    }

    /// Creates `root/name` with `bytes` unless it exists (another worker may be creating it
    /// at the same moment: whoever renames first wins, and both wrote the same thing).
    fn write_new_file(&self, name: &str, bytes: &[u8]) -> Result<(), StoreError> {
        let path = self.root.join(name);
        if path.exists() {
            return Ok(());
        }
        let tmp = self.spool_readable(bytes)?;
        match tmp.persist_noclobber(&path) {
            Ok(_) => sync_dir(&self.root),
            Err(e) if e.error.kind() == io::ErrorKind::AlreadyExists => Ok(()),
            Err(e) => Err(StoreError::Rename {
                from: e.file.path().to_path_buf(),
                to: path,
                source: e.error,
            }),
        }
    }

    /// [`Self::spool`], mode 0644: a file of the layout that others read.
    fn spool_readable(&self, bytes: &[u8]) -> Result<tempfile::NamedTempFile, StoreError> {
        let tmp = self.spool(bytes)?;
        tmp.as_file()
            .set_permissions(std::os::unix::fs::PermissionsExt::from_mode(0o644))
            .map_err(|source| StoreError::Write {
                path: tmp.path().to_path_buf(),
                source,
            })?;
        Ok(tmp)
    }

    /// Writes `bytes` to a fresh, fsynced temp file in the store.
    fn spool(&self, bytes: &[u8]) -> Result<tempfile::NamedTempFile, StoreError> {
        let dir = self.tmp_dir();
        let write = |source| StoreError::Write {
            path: dir.clone(),
            source,
        };
        let mut tmp = tempfile::Builder::new()
            .prefix("spool-")
            .tempfile_in(&dir)
            .map_err(write)?;
        tmp.write_all(bytes).map_err(write)?;
        tmp.as_file().sync_all().map_err(write)?;
        Ok(tmp)
    }

    pub async fn has_blob(&self, digest: &Digest) -> Result<bool, StoreError> {
        let s = self.clone();
        let digest = digest.clone();
        blocking(move || s.has_blob_sync(&digest)).await
    }

    fn has_blob_sync(&self, digest: &Digest) -> Result<bool, StoreError> {
        let path = self.blob_path(digest);
        match std::fs::symlink_metadata(&path) {
            Ok(meta) => Ok(meta.is_file()),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(false),
            Err(source) => Err(StoreError::Read { path, source }),
        }
    }

    pub async fn put_blob_file(
        &self,
        path: &Path,
        digest: &Digest,
        size: u64,
    ) -> Result<PutOutcome, StoreError> {
        let s = self.clone();
        let (path, digest) = (path.to_path_buf(), digest.clone());
        blocking(move || s.put_blob_file_sync(&path, &digest, size)).await
    }

    /// [`DirStore::put_blob_file`] on the calling thread (a blocking one: it hashes the
    /// file, and a new blob is fsynced).
    pub fn put_blob_file_sync(
        &self,
        path: &Path,
        digest: &Digest,
        size: u64,
    ) -> Result<PutOutcome, StoreError> {
        let target = self.blob_path(digest);
        if target.is_file() {
            return Ok(PutOutcome::AlreadyPresent);
        }
        let read = |source| StoreError::Read {
            path: path.to_path_buf(),
            source,
        };
        let file = File::open(path).map_err(read)?;
        let (actual, actual_size) = sha256_reader(&file).map_err(read)?;
        check(path, digest, size, &actual, actual_size)?;
        drop(file);
        // Adopt the file into the store's temp dir first: a rename when it is on the same
        // filesystem (the caller's file is consumed), a verified copy otherwise (the
        // caller's file is left as it was).
        let dir = self.tmp_dir();
        let adopted = tempfile::Builder::new()
            .prefix("adopt-")
            .tempfile_in(&dir)
            .map_err(|source| StoreError::Write {
                path: dir.clone(),
                source,
            })?
            .into_temp_path();
        match fs::rename(path, &adopted) {
            Ok(()) => {}
            Err(e) if e.raw_os_error() == Some(rustix::io::Errno::XDEV.raw_os_error()) => {
                return self.copy_in(path, digest, size);
            }
            Err(source) => {
                return Err(StoreError::Rename {
                    from: path.to_path_buf(),
                    to: adopted.to_path_buf(),
                    source,
                });
            }
        }
        let adopted_file = File::open(&adopted).map_err(read)?;
        // Readable by whoever reads the layout (skopeo as another user, say); never writable.
        adopted_file
            .set_permissions(std::os::unix::fs::PermissionsExt::from_mode(0o444))
            .map_err(read)?;
        adopted_file.sync_all().map_err(read)?;
        drop(adopted_file);
        match rustix::fs::renameat_with(
            rustix::fs::CWD,
            &*adopted,
            rustix::fs::CWD,
            &target,
            RenameFlags::NOREPLACE,
        ) {
            Ok(()) => {
                // Renamed away: nothing left for the TempPath to delete.
                let _ = adopted.keep();
                sync_dir(target.parent().unwrap_or(&self.root))?;
                Ok(PutOutcome::Uploaded)
            }
            Err(rustix::io::Errno::EXIST) => Ok(PutOutcome::AlreadyPresent),
            Err(e) => Err(StoreError::Rename {
                from: adopted.to_path_buf(),
                to: target,
                source: e.into(),
            }),
        }
    }

    fn copy_in(&self, path: &Path, digest: &Digest, size: u64) -> Result<PutOutcome, StoreError> {
        let dir = self.tmp_dir();
        let write = |source| StoreError::Write {
            path: dir.clone(),
            source,
        };
        let mut tmp = tempfile::Builder::new()
            .prefix("copy-")
            .tempfile_in(&dir)
            .map_err(write)?;
        let mut src = File::open(path).map_err(|source| StoreError::Read {
            path: path.to_path_buf(),
            source,
        })?;
        let mut tee = HashingWriter::new(tmp.as_file_mut());
        io::copy(&mut src, &mut tee).map_err(write)?;
        let (actual, actual_size) = tee.finish();
        check(path, digest, size, &actual, actual_size)?;
        tmp.as_file().sync_all().map_err(write)?;
        self.persist_blob(tmp, digest)
    }

    fn persist_blob(
        &self,
        tmp: tempfile::NamedTempFile,
        digest: &Digest,
    ) -> Result<PutOutcome, StoreError> {
        let target = self.blob_path(digest);
        fs::set_permissions(
            tmp.path(),
            std::os::unix::fs::PermissionsExt::from_mode(0o444),
        )
        .map_err(|source| StoreError::Write {
            path: tmp.path().to_path_buf(),
            source,
        })?;
        match tmp.persist_noclobber(&target) {
            Ok(_) => {
                sync_dir(target.parent().unwrap_or(&self.root))?;
                Ok(PutOutcome::Uploaded)
            }
            Err(e) if e.error.kind() == io::ErrorKind::AlreadyExists => {
                Ok(PutOutcome::AlreadyPresent)
            }
            Err(e) => Err(StoreError::Rename {
                from: e.file.path().to_path_buf(),
                to: target,
                source: e.error,
            }),
        }
    }

    pub async fn put_blob_bytes(
        &self,
        bytes: &[u8],
        digest: &Digest,
    ) -> Result<PutOutcome, StoreError> {
        let s = self.clone();
        let (bytes, digest) = (bytes.to_vec(), digest.clone());
        blocking(move || s.put_blob_bytes_sync(&bytes, &digest)).await
    }

    /// [`DirStore::put_blob_bytes`] on the calling thread (a blocking one: a new blob is
    /// fsynced).
    pub fn put_blob_bytes_sync(
        &self,
        bytes: &[u8],
        digest: &Digest,
    ) -> Result<PutOutcome, StoreError> {
        if self.blob_path(digest).is_file() {
            return Ok(PutOutcome::AlreadyPresent);
        }
        let actual = sha256_bytes(bytes);
        if &actual != digest {
            return Err(StoreError::DigestMismatch {
                what: "blob to store".into(),
                expected: digest.clone(),
                actual,
            });
        }
        let tmp = self.spool(bytes)?;
        self.persist_blob(tmp, digest)
    }

    pub async fn get_blob_to_file(
        &self,
        digest: &Digest,
        dest: &Path,
        max_bytes: u64,
    ) -> Result<u64, StoreError> {
        let s = self.clone();
        let (dest, digest) = (dest.to_path_buf(), digest.clone());
        blocking(move || {
            let path = s.blob_path(&digest);
            let src = open_blob(&path, &digest)?;
            let len = src
                .metadata()
                .map_err(|source| StoreError::Read {
                    path: path.clone(),
                    source,
                })?
                .len();
            if len > max_bytes {
                return Err(StoreError::TooLarge {
                    what: format!("blob {digest}"),
                    limit: max_bytes,
                });
            }
            // The file may grow under us (a tampered store); never copy more than allowed.
            let mut src = io::Read::take(src, max_bytes.saturating_add(1));
            let mut out = File::create(&dest).map_err(|source| StoreError::Write {
                path: dest.clone(),
                source,
            })?;
            let mut tee = HashingWriter::new(&mut out);
            io::copy(&mut src, &mut tee).map_err(|source| StoreError::Read {
                path: path.clone(),
                source,
            })?;
            let (actual, size) = tee.finish();
            if size > max_bytes {
                return Err(StoreError::TooLarge {
                    what: format!("blob {digest}"),
                    limit: max_bytes,
                });
            }
            if actual != digest {
                return Err(StoreError::DigestMismatch {
                    what: format!("blob {}", path.display()),
                    expected: digest,
                    actual,
                });
            }
            Ok(size)
        })
        .await
    }

    fn read_blob_verified(&self, digest: &Digest) -> Result<Vec<u8>, StoreError> {
        let path = self.blob_path(digest);
        let mut bytes = Vec::new();
        io::Read::read_to_end(&mut open_blob(&path, digest)?, &mut bytes).map_err(|source| {
            StoreError::Read {
                path: path.clone(),
                source,
            }
        })?;
        let actual = sha256_bytes(&bytes);
        if &actual != digest {
            return Err(StoreError::DigestMismatch {
                what: format!("blob {}", path.display()),
                expected: digest.clone(),
                actual,
            });
        }
        Ok(bytes)
    }

    pub async fn put_manifest(
        &self,
        tag: &str,
        bytes: &[u8],
        media_type: &str,
    ) -> Result<Digest, StoreError> {
        let s = self.clone();
        let (tag, bytes, media_type) = (tag.to_string(), bytes.to_vec(), media_type.to_string());
        blocking(move || s.put_manifest_sync(&tag, &bytes, &media_type)).await
    }

    fn put_manifest_sync(
        &self,
        tag: &str,
        bytes: &[u8],
        media_type: &str,
    ) -> Result<Digest, StoreError> {
        let digest = sha256_bytes(bytes);
        self.put_blob_bytes_sync(bytes, &digest)?;
        self.set_tag(
            tag,
            &json!({
                "mediaType": media_type,
                "digest": digest.as_str(),
                "size": bytes.len(),
                "annotations": {REF_NAME: tag},
            }),
        )?;
        Ok(digest)
    }

    /// [`crate::store::Store::publish_image`] in one trip to the blocking pool: every layer
    /// blob checked, the config put, the manifest put and tagged.
    pub async fn publish_image(
        &self,
        tag: &str,
        layers: &[Digest],
        config: &[u8],
        manifest: (&[u8], &str),
    ) -> Result<Digest, StoreError> {
        let s = self.clone();
        let tag = tag.to_string();
        let layers = layers.to_vec();
        let config = config.to_vec();
        let (manifest, media_type) = (manifest.0.to_vec(), manifest.1.to_string());
        blocking(move || {
            for layer in &layers {
                if !s.has_blob_sync(layer)? {
                    return Err(StoreError::missing_layer(layer));
                }
            }
            s.put_blob_bytes_sync(&config, &sha256_bytes(&config))?;
            s.put_manifest_sync(&tag, &manifest, &media_type)
        })
        .await
    }

    /// Points `tag` at `descriptor`: a read-modify-write of `index.json` under the store's
    /// lock, replaced by rename. Returns once an `index.json` with the tag is durable: the
    /// one this call wrote, or one another thread wrote with this tag among the ones
    /// waiting while it held the writer's place. A write that failed leaves each tag it
    /// took to its own caller, which writes it again and gets its own error.
    fn set_tag(&self, tag: &str, descriptor: &Value) -> Result<(), StoreError> {
        let ticket = {
            let mut queue = lock(&self.tags);
            queue.last_ticket += 1;
            let ticket = queue.last_ticket;
            queue
                .waiting
                .push((ticket, tag.to_owned(), descriptor.clone()));
            ticket
        };
        let mut index = lock(&self.index);
        let batch = {
            let mut queue = lock(&self.tags);
            if queue.written.remove(&ticket) {
                return Ok(());
            }
            // Ours is among them: only the writer takes tags, and none took ours.
            std::mem::take(&mut queue.waiting)
        };
        let result = self.write_tags(&mut index, &batch);
        let mut queue = lock(&self.tags);
        let others = batch.into_iter().filter(|(t, _, _)| *t != ticket);
        if result.is_ok() {
            queue.written.extend(others.map(|(t, _, _)| t));
        } else {
            // Back in front of anything set since, in their order.
            let mut again: Vec<_> = others.collect();
            again.append(&mut queue.waiting);
            queue.waiting = again;
        }
        result
    }

    /// [`DirStore::set_tag`]'s write: every tag of `batch`, in one `index.json`.
    fn write_tags(
        &self,
        index: &mut IndexCache,
        batch: &[(u64, String, Value)],
    ) -> Result<(), StoreError> {
        let lock_path = self.root.join(".corral/index.lock");
        let lock = OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&lock_path)
            .map_err(|source| StoreError::Lock {
                path: lock_path.clone(),
                source,
            })?;
        rustix::fs::flock(&lock, FlockOperation::LockExclusive).map_err(|e| StoreError::Lock {
            path: lock_path.clone(),
            source: e.into(),
        })?;
        let result = self.write_index(index, batch);
        if result.is_err() {
            // Whatever happened to the file, read it afresh next time.
            index.file = None;
        }
        // The flock is released when `lock` is dropped, after the rename is durable.
        drop(lock);
        result
    }

    fn write_index(
        &self,
        index: &mut IndexCache,
        batch: &[(u64, String, Value)],
    ) -> Result<(), StoreError> {
        self.load_index(index)?;
        for (_, tag, descriptor) in batch {
            index
                .manifests
                .retain(|d| d.tag.as_deref() != Some(tag.as_str()));
            index.manifests.push(Descriptor::new(descriptor));
        }
        let tmp = self.spool_readable(&index.to_bytes())?;
        let path = self.index_path();
        let file = tmp.persist(&path).map_err(|e| StoreError::Rename {
            from: e.file.path().to_path_buf(),
            to: path.clone(),
            source: e.error,
        })?;
        sync_dir(&self.root)?;
        // The file just renamed into place (no other writer can replace it while the lock
        // is held): its id once the rename touched it.
        let written = file
            .metadata()
            .map_err(|source| StoreError::Read { path, source })?;
        index.file = Some(FileId::of(&written));
        index.writes += 1;
        Ok(())
    }

    /// Brings `index` up to date with `index.json`, reading and parsing the file only when it
    /// is not the one last seen.
    fn load_index(&self, index: &mut IndexCache) -> Result<(), StoreError> {
        let path = self.index_path();
        let read = |source| StoreError::Read {
            path: path.clone(),
            source,
        };
        let mut file = File::open(&path).map_err(read)?;
        let id = FileId::of(&file.metadata().map_err(read)?);
        if index.file == Some(id) {
            return Ok(());
        }
        index.file = None;
        let mut bytes = Vec::new();
        io::Read::read_to_end(&mut file, &mut bytes).map_err(read)?;
        index.parse(&bytes, &path)?;
        index.file = Some(id);
        Ok(())
    }

    pub async fn get_manifest(&self, tag_or_digest: &str) -> Result<FetchedManifest, StoreError> {
        let s = self.clone();
        let wanted = tag_or_digest.to_string();
        blocking(move || {
            let (digest, media_type) = {
                let mut index = lock(&s.index);
                s.load_index(&mut index)?;
                let manifests = &index.manifests;
                if wanted.starts_with("sha256:") {
                    let digest = Digest::parse(&wanted).map_err(|e| StoreError::Url {
                        url: wanted.clone(),
                        reason: e.message,
                    })?;
                    let media_type = manifests
                        .iter()
                        .find(|d| d.digest.as_deref() == Some(digest.as_str()))
                        .and_then(|d| d.media_type.clone());
                    (digest, media_type)
                } else {
                    let found = manifests
                        .iter()
                        .rev()
                        .find(|d| d.tag.as_deref() == Some(wanted.as_str()))
                        .ok_or_else(|| StoreError::NotFound {
                            what: format!("tag {wanted:?}"),
                        })?;
                    let digest = found
                        .digest
                        .as_deref()
                        .and_then(|d| Digest::parse(d).ok())
                        .ok_or_else(|| StoreError::Index {
                            path: s.index_path(),
                            reason: format!("tag {wanted:?} has no valid digest"),
                        })?;
                    (digest, found.media_type.clone())
                }
            };
            let bytes = s.read_blob_verified(&digest)?;
            let media_type = media_type
                .or_else(|| {
                    let v: Value = serde_json::from_slice(&bytes).ok()?;
                    Some(v.get("mediaType")?.as_str()?.to_string())
                })
                .unwrap_or_else(|| MEDIA_TYPE_MANIFEST.to_string());
            Ok(FetchedManifest {
                bytes,
                media_type,
                digest,
            })
        })
        .await
    }

    pub fn reference(&self, tag: &str) -> String {
        format!("oci:{}:{tag}", self.root.display())
    }
}

fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
}

fn ref_name(descriptor: &Value) -> Option<&str> {
    descriptor.get("annotations")?.get(REF_NAME)?.as_str()
}

fn open_blob(path: &Path, digest: &Digest) -> Result<File, StoreError> {
    File::open(path).map_err(|source| {
        if source.kind() == io::ErrorKind::NotFound {
            StoreError::NotFound {
                what: format!("blob {digest}"),
            }
        } else {
            StoreError::Read {
                path: path.to_path_buf(),
                source,
            }
        }
    })
}

fn check(
    path: &Path,
    digest: &Digest,
    size: u64,
    actual: &Digest,
    actual_size: u64,
) -> Result<(), StoreError> {
    if actual != digest {
        return Err(StoreError::DigestMismatch {
            what: format!("blob file {}", path.display()),
            expected: digest.clone(),
            actual: actual.clone(),
        });
    }
    if actual_size != size {
        return Err(StoreError::SizeMismatch {
            what: format!("blob file {}", path.display()),
            expected: size,
            actual: actual_size,
        });
    }
    Ok(())
}

fn sync_dir(dir: &Path) -> Result<(), StoreError> {
    File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(|source| StoreError::Write {
            path: dir.to_path_buf(),
            source,
        })
}

fn to_vec(value: &Value) -> Vec<u8> {
    // serde_json's Map is a BTreeMap here (no preserve_order), so the bytes are canonical.
    serde_json::to_vec(value).unwrap_or_default()
}

/// A writer that hashes what passes through it.
pub(crate) struct HashingWriter<W> {
    inner: W,
    hasher: sha2::Sha256,
    size: u64,
}

impl<W: Write> HashingWriter<W> {
    pub(crate) fn new(inner: W) -> Self {
        HashingWriter {
            inner,
            hasher: <sha2::Sha256 as sha2::Digest>::new(),
            size: 0,
        }
    }

    pub(crate) fn finish(self) -> (Digest, u64) {
        let hash = sha2::Digest::finalize(self.hasher);
        (Digest::from_sha256(hash.into()), self.size)
    }
}

impl<W: Write> Write for HashingWriter<W> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let n = self.inner.write(buf)?;
        sha2::Digest::update(&mut self.hasher, &buf[..n]);
        self.size += n as u64;
        Ok(n)
    }
    fn flush(&mut self) -> io::Result<()> {
        self.inner.flush()
    }
}

/// Creates `dir` and its missing parents, each with exactly `mode` (never the umask's
/// version of it). Directories that exist already are left as they are: they may be an
/// operator's.
fn create_dirs(dir: &Path, mode: u32) -> io::Result<()> {
    use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
    let mut missing = Vec::new();
    let mut cur = Some(dir);
    while let Some(d) = cur {
        if d.as_os_str().is_empty() || d.is_dir() {
            break;
        }
        missing.push(d);
        cur = d.parent();
    }
    for d in missing.into_iter().rev() {
        match fs::DirBuilder::new().mode(mode).create(d) {
            Ok(()) => fs::set_permissions(d, fs::Permissions::from_mode(mode))?,
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists && d.is_dir() => {}
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn descriptor(tag: &str, n: usize) -> Value {
        json!({
            "mediaType": super::super::MEDIA_TYPE_MANIFEST,
            "digest": format!("sha256:{n:064x}"),
            "size": n,
            "annotations": {REF_NAME: tag},
        })
    }

    fn tags_in(root: &Path) -> Vec<(String, String)> {
        let index: Value =
            serde_json::from_slice(&fs::read(root.join("index.json")).unwrap()).unwrap();
        let mut tags: Vec<(String, String)> = index["manifests"]
            .as_array()
            .unwrap()
            .iter()
            .map(|d| {
                let tag = ref_name(d).unwrap().to_owned();
                (tag, d["digest"].as_str().unwrap().to_owned())
            })
            .collect();
        tags.sort();
        tags
    }

    /// Starts `n` threads setting tags `t0..` while the writer's place is held, and waits
    /// until all of them are queued.
    fn queue_behind_held_writer(
        store: &DirStore,
        n: usize,
    ) -> Vec<std::thread::JoinHandle<Result<(), StoreError>>> {
        let threads: Vec<_> = (0..n)
            .map(|i| {
                let (store, tag) = (store.clone(), format!("t{i}"));
                std::thread::spawn(move || store.set_tag(&tag, &descriptor(&tag, i)))
            })
            .collect();
        while lock(&store.tags).waiting.len() < n {
            std::thread::sleep(std::time::Duration::from_millis(1));
        }
        threads
    }

    #[tokio::test]
    async fn tags_set_while_another_is_written_share_one_write() {
        let tmp = tempfile::tempdir().unwrap();
        let store = DirStore::open(tmp.path().to_path_buf()).await.unwrap();
        store.set_tag("first", &descriptor("first", 100)).unwrap();
        let before = lock(&store.index).writes;
        let held = lock(&store.index);
        let threads = queue_behind_held_writer(&store, 8);
        drop(held);
        for t in threads {
            t.join().unwrap().unwrap();
        }
        assert_eq!(
            lock(&store.index).writes - before,
            1,
            "eight tags waiting, one index.json written"
        );
        let mut want: Vec<(String, String)> = (0..8)
            .map(|i| (format!("t{i}"), format!("sha256:{i:064x}")))
            .collect();
        want.push(("first".into(), format!("sha256:{:064x}", 100)));
        want.sort();
        assert_eq!(tags_in(tmp.path()), want);
        assert!(lock(&store.tags).written.is_empty());
        assert!(lock(&store.tags).waiting.is_empty());
    }

    #[tokio::test]
    async fn a_failed_shared_write_fails_each_tag_with_its_own_attempt() {
        let tmp = tempfile::tempdir().unwrap();
        let store = DirStore::open(tmp.path().to_path_buf()).await.unwrap();
        store.set_tag("first", &descriptor("first", 100)).unwrap();
        // No temp file can be made: every write of index.json fails.
        let tmp_dir = store.tmp_dir();
        fs::remove_dir_all(&tmp_dir).unwrap();
        fs::write(&tmp_dir, "not a dir").unwrap();
        let before = lock(&store.index).writes;
        let held = lock(&store.index);
        let threads = queue_behind_held_writer(&store, 4);
        drop(held);
        for t in threads {
            let err = t.join().unwrap().unwrap_err();
            assert!(matches!(err, StoreError::Write { .. }), "{err:?}");
        }
        assert_eq!(lock(&store.index).writes, before);
        assert!(lock(&store.tags).waiting.is_empty());
        assert!(lock(&store.tags).written.is_empty());
        // The store works again once the disk does; nothing of the failed tags was kept.
        fs::remove_file(&tmp_dir).unwrap();
        fs::create_dir(&tmp_dir).unwrap();
        store.set_tag("t9", &descriptor("t9", 9)).unwrap();
        let tags: Vec<String> = tags_in(tmp.path()).into_iter().map(|(t, _)| t).collect();
        assert_eq!(tags, ["first", "t9"]);
    }
}
