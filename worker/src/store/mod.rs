//! Content-addressed stores of OCI blobs and manifests: an OCI image-layout directory
//! (`oci-dir:/path`, the embedded default) and an OCI distribution registry
//! (`oci://host:port/repo` over TLS, `oci+http://host:port/repo` in plain HTTP for tests).
//!
//! Every blob is addressed by its sha256 [`Digest`] and every read is verified against it,
//! so a store never hands out bytes other than the ones asked for. The store's credentials
//! live here, in the worker, and never reach a job.

mod dir;
mod registry;

use std::fmt;
use std::io::{self, Read};
use std::path::{Path, PathBuf};
use std::time::Duration;

use corral_protocol::Digest;
use sha2::{Digest as _, Sha256};

pub use dir::DirStore;
pub use registry::RegistryStore;

/// Media type of an OCI image manifest.
pub const MEDIA_TYPE_MANIFEST: &str = "application/vnd.oci.image.manifest.v1+json";
/// Media type of an OCI image config.
pub const MEDIA_TYPE_CONFIG: &str = "application/vnd.oci.image.config.v1+json";
/// Media type of a gzip-compressed OCI layer.
pub const MEDIA_TYPE_LAYER_GZIP: &str = "application/vnd.oci.image.layer.v1.tar+gzip";
/// Media type of an uncompressed OCI layer.
pub const MEDIA_TYPE_LAYER_TAR: &str = "application/vnd.oci.image.layer.v1.tar";

/// A failed store operation, named after the step that failed.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("store URL {url:?}: {reason}")]
    Url { url: String, reason: String },
    #[error("reading the registry password file {path}")]
    PasswordFile { path: PathBuf, source: io::Error },
    #[error("creating store directory {path}")]
    CreateDir { path: PathBuf, source: io::Error },
    #[error("locking the store index {path}")]
    Lock { path: PathBuf, source: io::Error },
    #[error("reading {path}")]
    Read { path: PathBuf, source: io::Error },
    #[error("writing {path}")]
    Write { path: PathBuf, source: io::Error },
    #[error("moving {from} into the store as {to}")]
    Rename {
        from: PathBuf,
        to: PathBuf,
        source: io::Error,
    },
    #[error("the store index {path} is not a valid OCI index: {reason}")]
    Index { path: PathBuf, reason: String },
    #[error("{what}: expected digest {expected}, got {actual}")]
    DigestMismatch {
        what: String,
        expected: Digest,
        actual: Digest,
    },
    #[error("{what}: expected {expected} bytes, got {actual}")]
    SizeMismatch {
        what: String,
        expected: u64,
        actual: u64,
    },
    #[error("{what} is larger than the {limit} bytes allowed")]
    TooLarge { what: String, limit: u64 },
    #[error("{what} not found in the store")]
    NotFound { what: String },
    #[error("{step} {url}: cannot reach the registry")]
    Connect {
        step: &'static str,
        url: String,
        source: reqwest::Error,
    },
    #[error("{step} {url}: TLS: {reason}")]
    Tls {
        step: &'static str,
        url: String,
        reason: String,
    },
    #[error("{step} {url}: the registry answered {status}: {body}")]
    Status {
        step: &'static str,
        url: String,
        status: u16,
        body: String,
    },
    #[error("{step} {url}: the registry refused the credentials ({status}): {body}")]
    Unauthorized {
        step: &'static str,
        url: String,
        status: u16,
        body: String,
    },
    #[error("{step} {url}: the registry lost the upload session ({status}); starting again")]
    UploadSessionLost {
        step: &'static str,
        url: String,
        status: u16,
    },
    #[error("{step} {url}: {reason}")]
    Protocol {
        step: &'static str,
        url: String,
        reason: String,
    },
    #[error(
        "{step} {url}: the registry does not hold a blob the manifest names ({body}); \
         the blobs are checked again on the next attempt"
    )]
    BlobsMissing {
        step: &'static str,
        url: String,
        body: String,
    },
    #[error("{step}: giving up after {attempts} attempts")]
    Exhausted {
        step: &'static str,
        attempts: u32,
        #[source]
        last: Box<StoreError>,
    },
    #[error("the store's worker thread failed: {0}")]
    Join(String),
}

impl StoreError {
    /// An image names a layer blob the store does not hold.
    pub(crate) fn missing_layer(layer: &Digest) -> StoreError {
        StoreError::NotFound {
            what: format!("layer blob {layer}"),
        }
    }

    /// Whether the failure is the platform's transient fault (a connection error, a 5xx,
    /// a lost upload session, a local I/O error) so that a later attempt may succeed; `false`
    /// for final answers (4xx, refused credentials, a digest mismatch, a bad URL).
    pub fn is_retryable(&self) -> bool {
        match self {
            StoreError::Connect { .. } | StoreError::UploadSessionLost { .. } => true,
            // The registry dropped a blob (garbage collection) since it was seen: a new
            // attempt looks again and uploads what is missing.
            StoreError::BlobsMissing { .. } => true,
            StoreError::Status { status, .. } => *status >= 500,
            StoreError::CreateDir { .. }
            | StoreError::Lock { .. }
            | StoreError::Read { .. }
            | StoreError::Write { .. }
            | StoreError::Rename { .. }
            | StoreError::Join(_) => true,
            StoreError::Exhausted { last, .. } => last.is_retryable(),
            StoreError::Url { .. }
            | StoreError::PasswordFile { .. }
            | StoreError::Index { .. }
            | StoreError::DigestMismatch { .. }
            | StoreError::SizeMismatch { .. }
            | StoreError::TooLarge { .. }
            | StoreError::NotFound { .. }
            | StoreError::Unauthorized { .. }
            | StoreError::Tls { .. }
            | StoreError::Protocol { .. } => false,
        }
    }

    /// Whether the registry refused a manifest for a blob it does not hold.
    pub fn is_blobs_missing(&self) -> bool {
        match self {
            StoreError::BlobsMissing { .. } => true,
            StoreError::Exhausted { last, .. } => last.is_blobs_missing(),
            _ => false,
        }
    }

    /// Whether the store said that the blob or manifest does not exist.
    pub fn is_not_found(&self) -> bool {
        match self {
            StoreError::NotFound { .. } => true,
            StoreError::Exhausted { last, .. } => last.is_not_found(),
            _ => false,
        }
    }
}

/// What [`Store::put_blob_file`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PutOutcome {
    /// The bytes were written to the store.
    Uploaded,
    /// The store already had a blob with this digest; nothing was written.
    AlreadyPresent,
    /// A registry mounted the blob from another repository without an upload.
    Mounted,
}

/// A manifest as read back from a store.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FetchedManifest {
    pub bytes: Vec<u8>,
    pub media_type: String,
    pub digest: Digest,
}

/// Registry credentials, from the worker's config. Never passed to a job.
#[derive(Clone, PartialEq, Eq)]
pub struct Credentials {
    pub username: String,
    pub password: String,
}

impl Credentials {
    pub fn new(username: impl Into<String>, password: impl Into<String>) -> Self {
        Credentials {
            username: username.into(),
            password: password.into(),
        }
    }

    /// Reads the password from a file (first line, trailing newline dropped).
    pub fn from_password_file(
        username: impl Into<String>,
        path: &Path,
    ) -> Result<Self, StoreError> {
        let text = std::fs::read_to_string(path).map_err(|source| StoreError::PasswordFile {
            path: path.to_path_buf(),
            source,
        })?;
        let password = text.lines().next().unwrap_or_default().to_string();
        Ok(Credentials::new(username, password))
    }
}

impl fmt::Debug for Credentials {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // A password must never end up in a log line.
        f.debug_struct("Credentials")
            .field("username", &self.username)
            .field("password", &"<redacted>")
            .finish()
    }
}

/// Capped exponential backoff for the platform's transient faults.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RetryPolicy {
    /// Attempts in all, the first included. 1 means no retry.
    pub attempts: u32,
    /// Wait after the first failure; doubled after each further one.
    pub initial_backoff: Duration,
    pub max_backoff: Duration,
}

impl Default for RetryPolicy {
    fn default() -> Self {
        RetryPolicy {
            attempts: 6,
            initial_backoff: Duration::from_millis(250),
            max_backoff: Duration::from_secs(8),
        }
    }
}

impl RetryPolicy {
    /// The wait before attempt `attempt + 1` (`attempt` counts from 1).
    pub fn backoff(&self, attempt: u32) -> Duration {
        let factor = 1u32
            .checked_shl(attempt.saturating_sub(1))
            .unwrap_or(u32::MAX);
        self.initial_backoff
            .checked_mul(factor)
            .unwrap_or(self.max_backoff)
            .min(self.max_backoff)
    }
}

/// How to open a store, beyond its URL.
#[derive(Debug, Clone)]
pub struct StoreOptions {
    pub credentials: Option<Credentials>,
    pub retry: RetryPolicy,
    /// The most bytes one request carries. A blob file streams from disk (read once, never
    /// held in memory) in the request that commits it; a larger one first goes up in PATCH
    /// requests of this size (for a proxy in front of the registry that caps bodies).
    /// Default: no cap, one streamed request per blob.
    pub chunk_size: u64,
    /// Other repositories of the same registry to mount a missing blob from (the base
    /// images' repositories), tried before uploading.
    pub mount_from: Vec<String>,
    /// PEM files of extra CAs to trust for `oci://` (a registry with a private CA), on top
    /// of the system's roots.
    pub ca_certificates: Vec<PathBuf>,
}

impl Default for StoreOptions {
    fn default() -> Self {
        StoreOptions {
            credentials: None,
            retry: RetryPolicy::default(),
            chunk_size: u64::MAX,
            mount_from: Vec::new(),
            ca_certificates: Vec::new(),
        }
    }
}

/// A store, selected by URL. Cheap to clone; clones share connections and locks.
#[derive(Debug, Clone)]
pub enum Store {
    Dir(DirStore),
    Registry(RegistryStore),
}

impl Store {
    /// Opens `oci-dir:/path`, `oci://host[:port]/repo` or `oci+http://host[:port]/repo`.
    /// A directory store creates its layout if missing; a registry store does not touch
    /// the network until the first call.
    pub async fn open(url: &str, credentials: Option<Credentials>) -> Result<Store, StoreError> {
        Store::open_with(
            url,
            StoreOptions {
                credentials,
                ..StoreOptions::default()
            },
        )
        .await
    }

    pub async fn open_with(url: &str, options: StoreOptions) -> Result<Store, StoreError> {
        if let Some(path) = url.strip_prefix("oci-dir:") {
            if path.is_empty() {
                return Err(StoreError::Url {
                    url: url.to_string(),
                    reason: "oci-dir: needs a directory path".into(),
                });
            }
            return Ok(Store::Dir(DirStore::open(PathBuf::from(path)).await?));
        }
        let (tls, rest) = if let Some(rest) = url.strip_prefix("oci://") {
            (true, rest)
        } else if let Some(rest) = url.strip_prefix("oci+http://") {
            (false, rest)
        } else {
            return Err(StoreError::Url {
                url: url.to_string(),
                reason: "expected oci-dir:/path, oci://host:port/repo or oci+http://host:port/repo"
                    .into(),
            });
        };
        Ok(Store::Registry(RegistryStore::new(
            url, tls, rest, options,
        )?))
    }

    pub async fn has_blob(&self, digest: &Digest) -> Result<bool, StoreError> {
        match self {
            Store::Dir(s) => s.has_blob(digest).await,
            Store::Registry(s) => s.has_blob(digest).await,
        }
    }

    /// Stores the file at `path` as the blob `digest` of `size` bytes. The file is checked
    /// against both before it becomes visible. The directory store renames the file into
    /// place when it can (see [`Store::spool_dir`]), so the caller must treat the file as
    /// consumed.
    pub async fn put_blob_file(
        &self,
        path: &Path,
        digest: &Digest,
        size: u64,
    ) -> Result<PutOutcome, StoreError> {
        match self {
            Store::Dir(s) => s.put_blob_file(path, digest, size).await,
            Store::Registry(s) => s.put_blob_file(path, digest, size).await,
        }
    }

    /// Stores a small blob (an image config, say) held in memory; returns its digest.
    pub async fn put_blob_bytes(&self, bytes: &[u8]) -> Result<(Digest, PutOutcome), StoreError> {
        let digest = sha256_bytes(bytes);
        let outcome = match self {
            Store::Dir(s) => s.put_blob_bytes(bytes, &digest).await?,
            Store::Registry(s) => s.put_blob_bytes(bytes, &digest).await?,
        };
        Ok((digest, outcome))
    }

    /// Copies the blob into `dest` (created or truncated) and verifies its digest; on a
    /// mismatch `dest` is removed and the error is [`StoreError::DigestMismatch`]. Returns
    /// the size.
    pub async fn get_blob_to_file(&self, digest: &Digest, dest: &Path) -> Result<u64, StoreError> {
        self.get_blob_to_file_max(digest, dest, u64::MAX).await
    }

    /// [`Store::get_blob_to_file`], refusing a blob larger than `max_bytes`
    /// ([`StoreError::TooLarge`]) before or while reading it, never after.
    pub async fn get_blob_to_file_max(
        &self,
        digest: &Digest,
        dest: &Path,
        max_bytes: u64,
    ) -> Result<u64, StoreError> {
        let result = match self {
            Store::Dir(s) => s.get_blob_to_file(digest, dest, max_bytes).await,
            Store::Registry(s) => s.get_blob_to_file(digest, dest, max_bytes).await,
        };
        if result.is_err() {
            // Half-written or unverified bytes must not be mistaken for the blob.
            let _ = tokio::fs::remove_file(dest).await;
        }
        result
    }

    /// Stores an image whose layer blobs are already here: checks each layer is, puts the
    /// config blob, then the manifest under `tag` (a manifest never names a missing blob:
    /// [`StoreError::NotFound`] when one is). Returns the manifest's digest. The directory
    /// store does it all in one trip to the blocking pool.
    pub async fn publish_image(
        &self,
        tag: &str,
        layers: &[Digest],
        config: &[u8],
        manifest: &[u8],
        media_type: &str,
    ) -> Result<Digest, StoreError> {
        check_tag(tag)?;
        match self {
            Store::Dir(s) => {
                s.publish_image(tag, layers, config, (manifest, media_type))
                    .await
            }
            Store::Registry(_) => {
                for layer in layers {
                    if !self.has_blob(layer).await? {
                        return Err(StoreError::missing_layer(layer));
                    }
                }
                self.put_blob_bytes(config).await?;
                self.put_manifest(tag, manifest, media_type).await
            }
        }
    }

    /// Stores a manifest and tags it; returns its digest.
    pub async fn put_manifest(
        &self,
        tag: &str,
        bytes: &[u8],
        media_type: &str,
    ) -> Result<Digest, StoreError> {
        check_tag(tag)?;
        match self {
            Store::Dir(s) => s.put_manifest(tag, bytes, media_type).await,
            Store::Registry(s) => s.put_manifest(tag, bytes, media_type).await,
        }
    }

    /// Reads a manifest by tag or by digest (`sha256:…`), verified against its digest.
    pub async fn get_manifest(&self, tag_or_digest: &str) -> Result<FetchedManifest, StoreError> {
        match self {
            Store::Dir(s) => s.get_manifest(tag_or_digest).await,
            Store::Registry(s) => s.get_manifest(tag_or_digest).await,
        }
    }

    /// What a user passes to skopeo to fetch the image tagged `tag`:
    /// `oci:/path:tag` or `docker://host:port/repo:tag`.
    pub fn reference(&self, tag: &str) -> String {
        match self {
            Store::Dir(s) => s.reference(tag),
            Store::Registry(s) => s.reference(tag),
        }
    }

    /// The directory store, for work already on a blocking thread that can then store its
    /// result in the same trip ([`DirStore::put_blob_file_sync`]); `None` for a registry,
    /// whose puts are network requests made from the runtime.
    pub fn dir(&self) -> Option<&DirStore> {
        match self {
            Store::Dir(s) => Some(s),
            Store::Registry(_) => None,
        }
    }

    /// A directory on the store's filesystem where callers should spool blobs, so that
    /// [`Store::put_blob_file`] is a rename rather than a copy; `None` for a registry.
    pub fn spool_dir(&self) -> Option<PathBuf> {
        match self {
            Store::Dir(s) => Some(s.tmp_dir()),
            Store::Registry(_) => None,
        }
    }
}

/// Tags as the distribution spec allows them (`[A-Za-z0-9_][A-Za-z0-9._-]{0,127}`).
pub fn check_tag(tag: &str) -> Result<(), StoreError> {
    let ok = !tag.is_empty()
        && tag.len() <= 128
        && tag
            .bytes()
            .next()
            .is_some_and(|b| b.is_ascii_alphanumeric() || b == b'_')
        && tag
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'.' | b'-'));
    if ok {
        Ok(())
    } else {
        Err(StoreError::Url {
            url: tag.to_string(),
            reason: "a tag is 1 to 128 of [A-Za-z0-9._-], not starting with . or -".into(),
        })
    }
}

pub fn sha256_bytes(bytes: &[u8]) -> Digest {
    Digest::from_sha256(Sha256::digest(bytes).into())
}

/// Hashes a reader to its end: (digest, size).
pub fn sha256_reader(mut reader: impl Read) -> io::Result<(Digest, u64)> {
    let mut hasher = Sha256::new();
    let mut buf = vec![0u8; 1 << 16];
    let mut size = 0u64;
    loop {
        let n = match reader.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(e),
        };
        hasher.update(&buf[..n]);
        size += n as u64;
    }
    Ok((Digest::from_sha256(hasher.finalize().into()), size))
}

/// Hashes a file: (digest, size).
pub fn sha256_file(path: &Path) -> Result<(Digest, u64), StoreError> {
    let read = |source| StoreError::Read {
        path: path.to_path_buf(),
        source,
    };
    let file = std::fs::File::open(path).map_err(read)?;
    sha256_reader(file).map_err(read)
}

async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> Result<T, StoreError> + Send + 'static,
) -> Result<T, StoreError> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| StoreError::Join(e.to_string()))?
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_doubles_and_caps() {
        let p = RetryPolicy {
            attempts: 10,
            initial_backoff: Duration::from_millis(100),
            max_backoff: Duration::from_secs(1),
        };
        assert_eq!(p.backoff(1), Duration::from_millis(100));
        assert_eq!(p.backoff(2), Duration::from_millis(200));
        assert_eq!(p.backoff(4), Duration::from_millis(800));
        assert_eq!(p.backoff(5), Duration::from_secs(1));
        assert_eq!(p.backoff(64), Duration::from_secs(1));
    }

    #[test]
    fn tags() {
        assert!(check_tag("job-01H.x_1").is_ok());
        for bad in ["", ".x", "-x", "a/b", "a:b", &"a".repeat(129)] {
            assert!(check_tag(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn credentials_do_not_print_the_password() {
        let c = Credentials::new("u", "hunter2");
        assert!(!format!("{c:?}").contains("hunter2"));
    }

    #[tokio::test]
    async fn refuses_unknown_urls() {
        for url in [
            "http://x/y",
            "oci-dir:",
            "oci://",
            "oci://host",
            "oci+http://host:5000/",
        ] {
            let err = Store::open(url, None).await.unwrap_err();
            assert!(matches!(err, StoreError::Url { .. }), "{url}: {err}");
            assert!(!err.is_retryable());
        }
    }
}
