//! The registry store: the OCI distribution API over HTTPS (rustls) or plain HTTP.
//!
//! Blob pushes HEAD first and skip what the registry has (an unchanged layer costs that one
//! request), ask for a cross-repository mount from the configured repositories (one POST,
//! which opens an ordinary session when the registry cannot mount), then upload: the file
//! streams from disk in the PUT that commits it (PATCH chunks first only when a chunk size
//! is configured), read once and never held in memory; the registry checks the digest.
//! Manifests are PUT under a tag (the job id). Basic and bearer-token auth answer the
//! registry's `WWW-Authenticate` challenge. Each operation is retried as a whole with capped
//! exponential backoff on connection errors, 5xx and lost upload sessions (a registry
//! restarted mid-upload forgets them), never on any other 4xx. Every `Docker-Content-Digest`
//! and `Content-Type` that a response carries is checked, and every byte read is verified
//! against its digest.

use std::collections::HashMap;
use std::fmt;
use std::future::Future;
use std::path::Path;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use base64::Engine as _;
use bytes::Bytes;
use corral_protocol::Digest;
use reqwest::header::{
    ACCEPT, AUTHORIZATION, CONTENT_LENGTH, CONTENT_TYPE, HeaderMap, HeaderValue, LOCATION,
    WWW_AUTHENTICATE,
};
use reqwest::{Method, Response, StatusCode};
use sha2::{Digest as _, Sha256};
use tokio::io::AsyncWriteExt;
use tokio::sync::Mutex;

use super::{
    FetchedManifest, MEDIA_TYPE_MANIFEST, PutOutcome, StoreError, StoreOptions, sha256_bytes,
};

const DOCKER_CONTENT_DIGEST: &str = "docker-content-digest";
const OCTET_STREAM: &str = "application/octet-stream";
/// Manifest media types this store reads back.
const MANIFEST_TYPES: [&str; 4] = [
    MEDIA_TYPE_MANIFEST,
    "application/vnd.oci.image.index.v1+json",
    "application/vnd.docker.distribution.manifest.v2+json",
    "application/vnd.docker.distribution.manifest.list.v2+json",
];

#[derive(Clone)]
pub struct RegistryStore {
    inner: Arc<Inner>,
}

struct Inner {
    /// `https://host:port` or `http://host:port`.
    base: String,
    /// `host:port`, as skopeo names the registry.
    host: String,
    repo: String,
    client: reqwest::Client,
    options: StoreOptions,
    /// The `Authorization` value that the last challenge earned.
    auth: Mutex<Option<HeaderValue>>,
    /// Blobs this store saw in the repository lately (pushed, found by a push's HEAD,
    /// mounted) and when: [`RegistryStore::has_blob`] answers from it without a request, so
    /// checking an image's layers right after pushing them costs nothing. A push always
    /// asks the registry. Safe to trust: the registry refuses a manifest that names a
    /// blob it lacks ([`StoreError::BlobsMissing`]), which empties this table so that the
    /// caller's next attempt asks again and uploads what is gone.
    known: std::sync::Mutex<HashMap<Digest, Instant>>,
}

/// How long a blob seen in the repository counts as present without asking again.
const KNOWN_FOR: Duration = Duration::from_secs(600);
/// Entries kept in the known-blob table before it is emptied and refilled.
const KNOWN_MAX: usize = 4096;

impl fmt::Debug for RegistryStore {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RegistryStore")
            .field("base", &self.inner.base)
            .field("repo", &self.inner.repo)
            .finish_non_exhaustive()
    }
}

impl RegistryStore {
    /// `rest` is `host[:port]/repo` (the URL after its scheme).
    pub(super) fn new(
        url: &str,
        tls: bool,
        rest: &str,
        options: StoreOptions,
    ) -> Result<RegistryStore, StoreError> {
        let bad = |reason: &str| StoreError::Url {
            url: url.to_string(),
            reason: reason.to_string(),
        };
        let (host, repo) = rest
            .split_once('/')
            .ok_or_else(|| bad("expected host[:port]/repository"))?;
        let repo = repo.trim_end_matches('/');
        if host.is_empty() || host.contains(['@', '?', '#']) {
            return Err(bad("the registry host is empty or not a host[:port]"));
        }
        let repo_ok = !repo.is_empty()
            && repo.split('/').all(|part| {
                !part.is_empty()
                    && part
                        .bytes()
                        .all(|b| matches!(b, b'a'..=b'z' | b'0'..=b'9' | b'.' | b'_' | b'-'))
            });
        if !repo_ok {
            return Err(bad(
                "the repository must be lowercase [a-z0-9._-] path components",
            ));
        }
        if options.chunk_size == 0 {
            return Err(bad("the upload chunk size must be positive"));
        }
        let mut builder = reqwest::Client::builder()
            .user_agent(concat!("corral/", env!("CARGO_PKG_VERSION")))
            .connect_timeout(Duration::from_secs(10))
            .read_timeout(Duration::from_secs(120));
        if !options.ca_certificates.is_empty() {
            let mut certs = Vec::new();
            for path in &options.ca_certificates {
                let pem = std::fs::read(path).map_err(|source| StoreError::Read {
                    path: path.clone(),
                    source,
                })?;
                let cert = reqwest::Certificate::from_pem(&pem).map_err(|e| {
                    bad(&format!("{} is not a PEM certificate: {e}", path.display()))
                })?;
                certs.push(cert);
            }
            builder = builder.tls_certs_merge(certs);
        }
        let client = builder
            .build()
            .map_err(|e| bad(&format!("cannot build an HTTP client: {e}")))?;
        let scheme = if tls { "https" } else { "http" };
        Ok(RegistryStore {
            inner: Arc::new(Inner {
                base: format!("{scheme}://{host}"),
                host: host.to_string(),
                repo: repo.to_string(),
                client,
                options,
                auth: Mutex::new(None),
                known: std::sync::Mutex::new(HashMap::new()),
            }),
        })
    }

    fn url(&self, tail: &str) -> String {
        format!("{}/v2/{}/{tail}", self.inner.base, self.inner.repo)
    }

    pub fn reference(&self, tag: &str) -> String {
        format!("docker://{}/{}:{tag}", self.inner.host, self.inner.repo)
    }

    /// Runs `op` until it succeeds, fails finally, or runs out of attempts.
    async fn with_retry<T, F, Fut>(&self, step: &'static str, mut op: F) -> Result<T, StoreError>
    where
        F: FnMut() -> Fut,
        Fut: Future<Output = Result<T, StoreError>>,
    {
        let policy = self.inner.options.retry;
        let mut attempt = 1;
        loop {
            match op().await {
                Ok(v) => return Ok(v),
                // Putting the same manifest again cannot help: the caller uploads first.
                Err(e)
                    if e.is_retryable() && !e.is_blobs_missing() && attempt < policy.attempts =>
                {
                    let wait = policy.backoff(attempt);
                    tracing::warn!(step, attempt, ?wait, error = %e, "store: retrying");
                    tokio::time::sleep(wait).await;
                    attempt += 1;
                }
                Err(e) if e.is_retryable() && attempt > 1 => {
                    return Err(StoreError::Exhausted {
                        step,
                        attempts: attempt,
                        last: Box::new(e),
                    });
                }
                Err(e) => return Err(e),
            }
        }
    }

    /// Sends one request, answering at most one auth challenge. Any status comes back as a
    /// response except a 401/403 that remains after authenticating.
    async fn send(
        &self,
        step: &'static str,
        method: Method,
        url: &str,
        headers: HeaderMap,
        body: Option<Bytes>,
    ) -> Result<Response, StoreError> {
        match body {
            Some(bytes) => {
                let make = move || reqwest::Body::from(bytes.clone());
                self.send_body(step, method, url, headers, Some(&make))
                    .await
            }
            None => self.send_body(step, method, url, headers, None).await,
        }
    }

    /// [`RegistryStore::send`] with a body made by `body` for each attempt (a streamed body
    /// cannot be replayed after an auth challenge; its maker starts it again).
    async fn send_body(
        &self,
        step: &'static str,
        method: Method,
        url: &str,
        headers: HeaderMap,
        body: Option<&(dyn Fn() -> reqwest::Body + Send + Sync)>,
    ) -> Result<Response, StoreError> {
        let mut challenged = false;
        loop {
            let mut req = self
                .inner
                .client
                .request(method.clone(), url)
                .headers(headers.clone());
            // Credentials go to the registry itself only, never to a host that a Location
            // header names (a storage backend's pre-signed URL, say).
            let same_origin = url
                .strip_prefix(self.inner.base.as_str())
                .is_some_and(|rest| rest.starts_with('/'));
            if same_origin && let Some(auth) = self.inner.auth.lock().await.clone() {
                req = req.header(AUTHORIZATION, auth);
            }
            if let Some(body) = body {
                req = req.body(body());
            } else if method == Method::PUT || method == Method::POST || method == Method::PATCH {
                req = req.header(CONTENT_LENGTH, 0);
            }
            let resp = req.send().await.map_err(|e| connect(step, url, e))?;
            let status = resp.status();
            if status != StatusCode::UNAUTHORIZED && status != StatusCode::FORBIDDEN {
                return Ok(resp);
            }
            let challenge = resp
                .headers()
                .get(WWW_AUTHENTICATE)
                .and_then(|v| v.to_str().ok())
                .map(str::to_string);
            match challenge {
                Some(challenge) if !challenged && status == StatusCode::UNAUTHORIZED => {
                    challenged = true;
                    let auth = self.answer(step, url, &challenge).await?;
                    *self.inner.auth.lock().await = Some(auth);
                }
                _ => {
                    let status = status.as_u16();
                    return Err(StoreError::Unauthorized {
                        step,
                        url: shown_url(url),
                        status,
                        body: body_text(resp).await,
                    });
                }
            }
        }
    }

    /// Turns a `WWW-Authenticate` challenge into an `Authorization` value.
    async fn answer(
        &self,
        step: &'static str,
        url: &str,
        challenge: &str,
    ) -> Result<HeaderValue, StoreError> {
        let refused = |reason: String| StoreError::Unauthorized {
            step,
            url: shown_url(url),
            status: 401,
            body: reason,
        };
        let (scheme, params) = challenge.split_once(' ').unwrap_or((challenge, ""));
        let basic = self.inner.options.credentials.as_ref().map(|c| {
            let raw = format!("{}:{}", c.username, c.password);
            format!(
                "Basic {}",
                base64::engine::general_purpose::STANDARD.encode(raw)
            )
        });
        if scheme.eq_ignore_ascii_case("basic") {
            let basic = basic.ok_or_else(|| refused("the registry wants credentials".into()))?;
            return header_value(&basic).map_err(refused);
        }
        if !scheme.eq_ignore_ascii_case("bearer") {
            return Err(refused(format!("unsupported auth challenge {challenge:?}")));
        }
        let params = parse_challenge(params);
        let realm = params
            .iter()
            .find(|(k, _)| k == "realm")
            .map(|(_, v)| v.clone())
            .ok_or_else(|| refused(format!("bearer challenge without realm: {challenge:?}")))?;
        if self.inner.base.starts_with("https://") && !realm.starts_with("https://") {
            return Err(refused(format!(
                "the token realm {realm:?} is not HTTPS; not sending credentials there"
            )));
        }
        let mut token_url = realm;
        let mut sep = if token_url.contains('?') { '&' } else { '?' };
        for (k, v) in params
            .iter()
            .filter(|(k, _)| k == "service" || k == "scope")
        {
            token_url.push(sep);
            token_url.push_str(&format!("{k}={}", encode_query(v)));
            sep = '&';
        }
        let mut req = self.inner.client.get(&token_url);
        if let Some(basic) = &basic {
            req = req.header(AUTHORIZATION, basic.as_str());
        }
        let resp = req
            .send()
            .await
            .map_err(|e| connect("fetch a bearer token", &token_url, e))?;
        let status = resp.status();
        if status.is_server_error() {
            return Err(StoreError::Status {
                step: "fetch a bearer token",
                url: token_url,
                status: status.as_u16(),
                body: body_text(resp).await,
            });
        }
        if !status.is_success() {
            return Err(StoreError::Unauthorized {
                step: "fetch a bearer token",
                url: token_url,
                status: status.as_u16(),
                body: body_text(resp).await,
            });
        }
        let bytes = resp
            .bytes()
            .await
            .map_err(|e| connect("fetch a bearer token", &token_url, e))?;
        let json: serde_json::Value =
            serde_json::from_slice(&bytes).map_err(|e| StoreError::Protocol {
                step: "fetch a bearer token",
                url: token_url.clone(),
                reason: format!("the token answer is not JSON: {e}"),
            })?;
        let token = json
            .get("token")
            .or_else(|| json.get("access_token"))
            .and_then(|t| t.as_str())
            .ok_or_else(|| StoreError::Protocol {
                step: "fetch a bearer token",
                url: token_url.clone(),
                reason: "the token answer has no token".into(),
            })?;
        header_value(&format!("Bearer {token}")).map_err(refused)
    }

    pub async fn has_blob(&self, digest: &Digest) -> Result<bool, StoreError> {
        if self.known(digest) {
            return Ok(true);
        }
        let present = self
            .with_retry("check a blob", || self.head_blob(digest))
            .await?;
        if present {
            self.remember(digest);
        }
        Ok(present)
    }

    /// Whether the blob was seen in the repository within [`KNOWN_FOR`].
    fn known(&self, digest: &Digest) -> bool {
        let known = self.inner.known.lock().unwrap_or_else(|e| e.into_inner());
        known
            .get(digest)
            .is_some_and(|seen| seen.elapsed() < KNOWN_FOR)
    }

    fn forget_known(&self) {
        self.inner
            .known
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clear();
    }

    fn remember(&self, digest: &Digest) {
        let mut known = self.inner.known.lock().unwrap_or_else(|e| e.into_inner());
        if known.len() >= KNOWN_MAX {
            known.clear();
        }
        known.insert(digest.clone(), Instant::now());
    }

    async fn head_blob(&self, digest: &Digest) -> Result<bool, StoreError> {
        let step = "check a blob";
        let url = self.url(&format!("blobs/{digest}"));
        let resp = self
            .send(step, Method::HEAD, &url, HeaderMap::new(), None)
            .await?;
        match resp.status() {
            StatusCode::OK => {
                check_digest_header(step, &url, &resp, digest)?;
                Ok(true)
            }
            StatusCode::NOT_FOUND => Ok(false),
            _ => Err(status_error(step, &url, resp).await),
        }
    }

    pub async fn put_blob_file(
        &self,
        path: &Path,
        digest: &Digest,
        size: u64,
    ) -> Result<PutOutcome, StoreError> {
        let outcome = self
            .with_retry("upload a blob", || {
                self.upload_file_once(path, digest, size)
            })
            .await?;
        self.remember(digest);
        Ok(outcome)
    }

    pub async fn put_blob_bytes(
        &self,
        bytes: &[u8],
        digest: &Digest,
    ) -> Result<PutOutcome, StoreError> {
        let body = Bytes::copy_from_slice(bytes);
        let outcome = self
            .with_retry("upload a blob", || async {
                if self.head_blob(digest).await? {
                    return Ok(PutOutcome::AlreadyPresent);
                }
                let location = match self.start_upload(digest).await? {
                    Session::Mounted => return Ok(PutOutcome::Mounted),
                    Session::Open(location) => location,
                };
                let len = body.len() as u64;
                self.finish_upload(&location, digest, len, || reqwest::Body::from(body.clone()))
                    .await?;
                Ok(PutOutcome::Uploaded)
            })
            .await?;
        self.remember(digest);
        Ok(outcome)
    }

    async fn upload_file_once(
        &self,
        path: &Path,
        digest: &Digest,
        size: u64,
    ) -> Result<PutOutcome, StoreError> {
        let read = |source| StoreError::Read {
            path: path.to_path_buf(),
            source,
        };
        let file = std::fs::File::open(path).map_err(read)?;
        let actual_size = file.metadata().map_err(read)?.len();
        if actual_size != size {
            return Err(StoreError::SizeMismatch {
                what: format!("blob file {}", path.display()),
                expected: size,
                actual: actual_size,
            });
        }
        if self.head_blob(digest).await? {
            return Ok(PutOutcome::AlreadyPresent);
        }
        let mut location = match self.start_upload(digest).await? {
            Session::Mounted => return Ok(PutOutcome::Mounted),
            Session::Open(location) => location,
        };
        // The file is read once, streamed from disk into the request bodies; the digest
        // that the snapshot computed while writing it is checked by the registry when the
        // upload is committed (`PUT ?digest=` fails unless the bytes match), so the layer is
        // never hashed or held in memory here.
        let file = Arc::new(file);
        let chunk_size = self.inner.options.chunk_size;
        let mut offset = 0u64;
        while size - offset > chunk_size {
            let end = offset + chunk_size;
            location = self
                .patch_chunk(&location, offset, end - 1, || {
                    file_body(&file, path, offset, end)
                })
                .await?;
            offset = end;
        }
        self.finish_upload(&location, digest, size - offset, || {
            file_body(&file, path, offset, size)
        })
        .await?;
        Ok(PutOutcome::Uploaded)
    }

    /// Opens an upload session, or mounts the blob from the first other repository that
    /// has it. The mount is asked for directly (one POST per candidate, no probe): a
    /// registry that mounts answers 201; one that cannot (the blob is not there, the
    /// source may not be read, mounts are off) answers 202 with an ordinary session, which
    /// the last candidate's attempt keeps and the others' give back.
    async fn start_upload(&self, digest: &Digest) -> Result<Session, StoreError> {
        let candidates: Vec<&String> = self
            .inner
            .options
            .mount_from
            .iter()
            .filter(|from| **from != self.inner.repo)
            .collect();
        for (i, from) in candidates.iter().enumerate() {
            let step = "mount a blob";
            let url = self.url(&format!(
                "blobs/uploads/?mount={digest}&from={}",
                encode_query(from)
            ));
            let resp = match self
                .send(step, Method::POST, &url, HeaderMap::new(), None)
                .await
            {
                Ok(resp) => resp,
                // Credentials that may not read `from`: not a reason to fail the push.
                Err(StoreError::Unauthorized { .. }) => continue,
                Err(e) => return Err(e),
            };
            match resp.status() {
                StatusCode::CREATED => {
                    check_digest_header(step, &url, &resp, digest)?;
                    return Ok(Session::Mounted);
                }
                // Not mounted: the registry opened an ordinary session instead.
                StatusCode::ACCEPTED => {
                    let location = self.location(step, &url, &resp)?;
                    if i + 1 == candidates.len() {
                        return Ok(Session::Open(location));
                    }
                    self.cancel_upload(&location).await;
                }
                s if s.is_server_error() => return Err(status_error(step, &url, resp).await),
                // A registry without mounts may refuse the parameters: upload normally.
                _ => {}
            }
        }
        let step = "start a blob upload";
        let url = self.url("blobs/uploads/");
        let resp = self
            .send(step, Method::POST, &url, HeaderMap::new(), None)
            .await?;
        if resp.status() != StatusCode::ACCEPTED {
            return Err(status_error(step, &url, resp).await);
        }
        Ok(Session::Open(self.location(step, &url, &resp)?))
    }

    /// Gives an unused upload session back (best effort: an abandoned one expires).
    async fn cancel_upload(&self, location: &str) {
        let _ = self
            .send(
                "cancel a blob upload",
                Method::DELETE,
                location,
                HeaderMap::new(),
                None,
            )
            .await;
    }

    /// Sends bytes `start..=end` of the blob in one PATCH, the body made by `body`.
    async fn patch_chunk(
        &self,
        location: &str,
        start: u64,
        end: u64,
        body: impl Fn() -> reqwest::Body + Send + Sync,
    ) -> Result<String, StoreError> {
        let step = "upload a blob chunk";
        let mut headers = HeaderMap::new();
        headers.insert(CONTENT_TYPE, HeaderValue::from_static(OCTET_STREAM));
        headers.insert(
            "content-range",
            HeaderValue::from_str(&format!("{start}-{end}")).expect("digits and a dash"),
        );
        headers.insert(CONTENT_LENGTH, HeaderValue::from(end + 1 - start));
        let resp = self
            .send_body(step, Method::PATCH, location, headers, Some(&body))
            .await?;
        if resp.status() != StatusCode::ACCEPTED {
            return Err(session_error(step, location, resp).await);
        }
        let range = resp.headers().get("range").and_then(|v| v.to_str().ok());
        if let Some(range) = range
            && range != format!("0-{end}")
        {
            return Err(StoreError::Protocol {
                step,
                url: location.to_string(),
                reason: format!("the registry holds bytes {range}, expected 0-{end}"),
            });
        }
        self.location(step, location, &resp)
    }

    /// Closes an upload session with `?digest=`, sending the last `len` bytes (made by
    /// `body`) with it; the registry checks the whole blob against the digest.
    async fn finish_upload(
        &self,
        location: &str,
        digest: &Digest,
        len: u64,
        body: impl Fn() -> reqwest::Body + Send + Sync,
    ) -> Result<(), StoreError> {
        let step = "finish a blob upload";
        let sep = if location.contains('?') { '&' } else { '?' };
        let url = format!("{location}{sep}digest={digest}");
        let mut headers = HeaderMap::new();
        headers.insert(CONTENT_TYPE, HeaderValue::from_static(OCTET_STREAM));
        let resp = if len == 0 {
            self.send(step, Method::PUT, &url, headers, None).await?
        } else {
            headers.insert(CONTENT_LENGTH, HeaderValue::from(len));
            self.send_body(step, Method::PUT, &url, headers, Some(&body))
                .await?
        };
        if resp.status() != StatusCode::CREATED {
            return Err(session_error(step, location, resp).await);
        }
        check_digest_header(step, &url, &resp, digest)
    }

    /// The absolute upload URL from a `Location` header (registries often send a path).
    fn location(
        &self,
        step: &'static str,
        url: &str,
        resp: &Response,
    ) -> Result<String, StoreError> {
        let location = resp
            .headers()
            .get(LOCATION)
            .and_then(|v| v.to_str().ok())
            .ok_or_else(|| StoreError::Protocol {
                step,
                url: shown_url(url),
                reason: "no Location header on an upload answer".into(),
            })?;
        if location.starts_with("http://") || location.starts_with("https://") {
            Ok(location.to_string())
        } else if location.starts_with('/') {
            Ok(format!("{}{location}", self.inner.base))
        } else {
            Err(StoreError::Protocol {
                step,
                url: shown_url(url),
                reason: format!("unusable Location {location:?}"),
            })
        }
    }

    pub async fn get_blob_to_file(
        &self,
        digest: &Digest,
        dest: &Path,
        max_bytes: u64,
    ) -> Result<u64, StoreError> {
        self.with_retry("download a blob", || {
            self.get_blob_once(digest, dest, max_bytes)
        })
        .await
    }

    async fn get_blob_once(
        &self,
        digest: &Digest,
        dest: &Path,
        max_bytes: u64,
    ) -> Result<u64, StoreError> {
        let step = "download a blob";
        let url = self.url(&format!("blobs/{digest}"));
        let mut resp = self
            .send(step, Method::GET, &url, HeaderMap::new(), None)
            .await?;
        match resp.status() {
            StatusCode::OK => {}
            StatusCode::NOT_FOUND => {
                return Err(StoreError::NotFound {
                    what: format!("blob {digest}"),
                });
            }
            _ => return Err(status_error(step, &url, resp).await),
        }
        check_digest_header(step, &url, &resp, digest)?;
        let too_large = || StoreError::TooLarge {
            what: format!("blob {digest}"),
            limit: max_bytes,
        };
        if resp.content_length().is_some_and(|len| len > max_bytes) {
            return Err(too_large());
        }
        let write = |source| StoreError::Write {
            path: dest.to_path_buf(),
            source,
        };
        let mut out = tokio::fs::File::create(dest).await.map_err(write)?;
        let mut hasher = Sha256::new();
        let mut size = 0u64;
        while let Some(chunk) = resp.chunk().await.map_err(|e| connect(step, &url, e))? {
            hasher.update(&chunk);
            size += chunk.len() as u64;
            if size > max_bytes {
                return Err(too_large());
            }
            out.write_all(&chunk).await.map_err(write)?;
        }
        out.flush().await.map_err(write)?;
        let actual = Digest::from_sha256(hasher.finalize().into());
        if &actual != digest {
            return Err(StoreError::DigestMismatch {
                what: format!("blob from {url}"),
                expected: digest.clone(),
                actual,
            });
        }
        Ok(size)
    }

    pub async fn put_manifest(
        &self,
        tag: &str,
        bytes: &[u8],
        media_type: &str,
    ) -> Result<Digest, StoreError> {
        let step = "put a manifest";
        let digest = sha256_bytes(bytes);
        let url = self.url(&format!("manifests/{tag}"));
        let body = Bytes::copy_from_slice(bytes);
        let content_type = header_value(media_type).map_err(|reason| StoreError::Protocol {
            step,
            url: url.clone(),
            reason,
        })?;
        self.with_retry(step, || async {
            let mut headers = HeaderMap::new();
            headers.insert(CONTENT_TYPE, content_type.clone());
            let resp = self
                .send(step, Method::PUT, &url, headers, Some(body.clone()))
                .await?;
            if resp.status() == StatusCode::BAD_REQUEST {
                let body = body_text(resp).await;
                // MANIFEST_BLOB_UNKNOWN (or BLOB_UNKNOWN): a blob this worker saw there is
                // gone, so nothing it remembers of the repository can be trusted.
                if body.contains("BLOB_UNKNOWN") {
                    self.forget_known();
                    return Err(StoreError::BlobsMissing {
                        step,
                        url: shown_url(&url),
                        body,
                    });
                }
                return Err(StoreError::Status {
                    step,
                    url: shown_url(&url),
                    status: 400,
                    body,
                });
            }
            if resp.status() != StatusCode::CREATED {
                return Err(status_error(step, &url, resp).await);
            }
            check_digest_header(step, &url, &resp, &digest)?;
            Ok(digest.clone())
        })
        .await
    }

    pub async fn get_manifest(&self, tag_or_digest: &str) -> Result<FetchedManifest, StoreError> {
        let step = "get a manifest";
        let wanted = if tag_or_digest.starts_with("sha256:") {
            Some(Digest::parse(tag_or_digest).map_err(|e| StoreError::Url {
                url: tag_or_digest.to_string(),
                reason: e.message,
            })?)
        } else {
            super::check_tag(tag_or_digest)?;
            None
        };
        let url = self.url(&format!("manifests/{tag_or_digest}"));
        self.with_retry(step, || async {
            let mut headers = HeaderMap::new();
            headers.insert(
                ACCEPT,
                HeaderValue::from_str(&MANIFEST_TYPES.join(", ")).expect("ASCII media types"),
            );
            let resp = self.send(step, Method::GET, &url, headers, None).await?;
            match resp.status() {
                StatusCode::OK => {}
                StatusCode::NOT_FOUND => {
                    return Err(StoreError::NotFound {
                        what: format!("manifest {tag_or_digest}"),
                    });
                }
                _ => return Err(status_error(step, &url, resp).await),
            }
            let media_type = resp
                .headers()
                .get(CONTENT_TYPE)
                .and_then(|v| v.to_str().ok())
                .map(|v| v.split(';').next().unwrap_or_default().trim().to_string())
                .unwrap_or_default();
            if !MANIFEST_TYPES.contains(&media_type.as_str()) {
                return Err(StoreError::Protocol {
                    step,
                    url: url.clone(),
                    reason: format!("Content-Type {media_type:?} is not a manifest type"),
                });
            }
            let header_digest = digest_header(step, &url, &resp)?;
            let bytes = resp.bytes().await.map_err(|e| connect(step, &url, e))?;
            let digest = sha256_bytes(&bytes);
            for expected in wanted.iter().chain(header_digest.iter()) {
                if expected != &digest {
                    return Err(StoreError::DigestMismatch {
                        what: format!("manifest from {url}"),
                        expected: expected.clone(),
                        actual: digest,
                    });
                }
            }
            Ok(FetchedManifest {
                bytes: bytes.to_vec(),
                media_type,
                digest,
            })
        })
        .await
    }
}

enum Session {
    Mounted,
    Open(String),
}

/// A URL as errors show it: upload sessions carry a long opaque `_state` query that says
/// nothing to a reader.
fn shown_url(url: &str) -> String {
    match url.split_once("?_state=") {
        Some((head, _)) => format!("{head}?…"),
        None => url.to_string(),
    }
}

fn connect(step: &'static str, url: &str, e: reqwest::Error) -> StoreError {
    if e.is_builder() {
        return StoreError::Protocol {
            step,
            url: shown_url(url),
            reason: e.to_string(),
        };
    }
    // A certificate the client does not trust will not become trusted by retrying. reqwest
    // reports it as a connect error; rustls's reason is down the source chain.
    let mut cause: Option<&(dyn std::error::Error + 'static)> = Some(&e);
    while let Some(err) = cause {
        let text = err.to_string();
        if text.contains("certificate") || text.contains("InvalidCertificate") {
            return StoreError::Tls {
                step,
                url: shown_url(url),
                reason: text,
            };
        }
        cause = err.source();
    }
    StoreError::Connect {
        step,
        url: shown_url(url),
        source: e,
    }
}

async fn body_text(resp: Response) -> String {
    let text = resp.text().await.unwrap_or_default();
    let text = text.trim();
    // Enough to read a registry's JSON error; never a whole HTML page in a log line.
    match text.char_indices().nth(400) {
        Some((at, _)) => format!("{}…", &text[..at]),
        None => text.to_string(),
    }
}

async fn status_error(step: &'static str, url: &str, resp: Response) -> StoreError {
    let status = resp.status().as_u16();
    StoreError::Status {
        step,
        url: shown_url(url),
        status,
        body: body_text(resp).await,
    }
}

/// A 404, or a 400 naming the upload, on a session URL means the registry forgot the
/// session (it restarted with a fresh secret, or the session expired): start over.
async fn session_error(step: &'static str, url: &str, resp: Response) -> StoreError {
    let status = resp.status().as_u16();
    let body = body_text(resp).await;
    let lost = status == 404
        || (status == 400
            && (body.contains("BLOB_UPLOAD_UNKNOWN") || body.contains("BLOB_UPLOAD_INVALID")));
    if lost {
        StoreError::UploadSessionLost {
            step,
            url: shown_url(url),
            status,
        }
    } else {
        StoreError::Status {
            step,
            url: shown_url(url),
            status,
            body,
        }
    }
}

fn digest_header(
    step: &'static str,
    url: &str,
    resp: &Response,
) -> Result<Option<Digest>, StoreError> {
    let Some(value) = resp.headers().get(DOCKER_CONTENT_DIGEST) else {
        return Ok(None);
    };
    let text = value.to_str().unwrap_or_default();
    Digest::parse(text)
        .map(Some)
        .map_err(|e| StoreError::Protocol {
            step,
            url: shown_url(url),
            reason: format!("bad Docker-Content-Digest: {}", e.message),
        })
}

fn check_digest_header(
    step: &'static str,
    url: &str,
    resp: &Response,
    expected: &Digest,
) -> Result<(), StoreError> {
    match digest_header(step, url, resp)? {
        Some(actual) if &actual != expected => Err(StoreError::DigestMismatch {
            what: format!("Docker-Content-Digest of {url}"),
            expected: expected.clone(),
            actual,
        }),
        _ => Ok(()),
    }
}

/// Bytes read from a blob file per body frame.
const READ_CHUNK: usize = 1 << 20;
/// Frames read ahead of the connection: the file is read while the previous bytes are sent.
const READ_AHEAD: usize = 4;

/// A request body streaming bytes `start..end` of `file`: a blocking reader fills a short
/// queue ([`READ_AHEAD`] frames of [`READ_CHUNK`]), so memory stays bounded whatever the
/// blob's size. A file shorter than `end` fails the request (the registry then never sees
/// a complete blob).
fn file_body(file: &Arc<std::fs::File>, path: &Path, start: u64, end: u64) -> reqwest::Body {
    let (tx, rx) = tokio::sync::mpsc::channel::<std::io::Result<Bytes>>(READ_AHEAD);
    let (file, path) = (Arc::clone(file), path.to_path_buf());
    tokio::task::spawn_blocking(move || {
        use std::os::unix::fs::FileExt as _;
        let mut at = start;
        while at < end {
            let want = usize::try_from(end - at)
                .unwrap_or(usize::MAX)
                .min(READ_CHUNK);
            let mut buf = vec![0u8; want];
            let frame = match file.read_at(&mut buf, at) {
                Ok(0) => Err(std::io::Error::new(
                    std::io::ErrorKind::UnexpectedEof,
                    format!("{} shrank while it was uploaded", path.display()),
                )),
                Ok(n) => {
                    buf.truncate(n);
                    at += n as u64;
                    Ok(Bytes::from(buf))
                }
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                Err(e) => Err(e),
            };
            let failed = frame.is_err();
            // The receiver is gone when the request failed: stop reading.
            if tx.blocking_send(frame).is_err() || failed {
                return;
            }
        }
    });
    reqwest::Body::wrap(FileBody {
        frames: rx,
        left: end - start,
    })
}

/// The receiving end of [`file_body`], with its exact length (sent as `Content-Length`).
struct FileBody {
    frames: tokio::sync::mpsc::Receiver<std::io::Result<Bytes>>,
    left: u64,
}

impl http_body::Body for FileBody {
    type Data = Bytes;
    type Error = std::io::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<http_body::Frame<Bytes>, std::io::Error>>> {
        if self.left == 0 {
            return Poll::Ready(None);
        }
        match self.frames.poll_recv(cx) {
            Poll::Ready(Some(Ok(bytes))) => {
                self.left = self.left.saturating_sub(bytes.len() as u64);
                Poll::Ready(Some(Ok(http_body::Frame::data(bytes))))
            }
            Poll::Ready(Some(Err(e))) => Poll::Ready(Some(Err(e))),
            Poll::Ready(None) => Poll::Ready(Some(Err(std::io::Error::other(
                "the blob file reader stopped early",
            )))),
            Poll::Pending => Poll::Pending,
        }
    }

    fn is_end_stream(&self) -> bool {
        self.left == 0
    }

    fn size_hint(&self) -> http_body::SizeHint {
        http_body::SizeHint::with_exact(self.left)
    }
}

fn header_value(s: &str) -> Result<HeaderValue, String> {
    let mut value = HeaderValue::from_str(s)
        .map_err(|_| "a header value with forbidden characters".to_string())?;
    // Kept out of any debug output of the request.
    value.set_sensitive(true);
    Ok(value)
}

/// Parses `k="v",k2="v2"` (values may hold commas inside quotes).
fn parse_challenge(params: &str) -> Vec<(String, String)> {
    let mut out = Vec::new();
    let mut rest = params.trim();
    while !rest.is_empty() {
        let Some((key, after)) = rest.split_once('=') else {
            break;
        };
        let key = key
            .trim()
            .trim_start_matches(',')
            .trim()
            .to_ascii_lowercase();
        let (value, tail) = if let Some(quoted) = after.strip_prefix('"') {
            match quoted.find('"') {
                Some(end) => (&quoted[..end], &quoted[end + 1..]),
                None => (quoted, ""),
            }
        } else {
            match after.find(',') {
                Some(end) => (&after[..end], &after[end..]),
                None => (after, ""),
            }
        };
        out.push((key, value.to_string()));
        rest = tail.trim_start().trim_start_matches(',').trim_start();
    }
    out
}

fn encode_query(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.' | b'~') {
            out.push(char::from(b));
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_bearer_challenges() {
        let p = parse_challenge(
            r#"realm="https://auth.example/token",service="registry",scope="repository:a/b:pull,push""#,
        );
        assert_eq!(
            p,
            vec![
                ("realm".into(), "https://auth.example/token".into()),
                ("service".into(), "registry".into()),
                ("scope".into(), "repository:a/b:pull,push".into()),
            ]
        );
    }

    #[test]
    fn encodes_queries() {
        assert_eq!(
            encode_query("repository:a/b:pull,push"),
            "repository%3Aa%2Fb%3Apull%2Cpush"
        );
    }

    #[test]
    fn parses_urls() {
        let s = RegistryStore::new(
            "x",
            false,
            "127.0.0.1:5000/corral/builds",
            StoreOptions::default(),
        )
        .unwrap();
        assert_eq!(
            s.url("blobs/uploads/"),
            "http://127.0.0.1:5000/v2/corral/builds/blobs/uploads/"
        );
        assert_eq!(
            s.reference("j1"),
            "docker://127.0.0.1:5000/corral/builds:j1"
        );
        for bad in ["host", "host/", "/repo", "host/Repo", "host/a//b"] {
            assert!(
                RegistryStore::new("x", true, bad, StoreOptions::default()).is_err(),
                "{bad}"
            );
        }
    }
}
