//! Source bundles: fetch a job's tar or tar.gz bundle from the store by digest, verify it,
//! and extract it — hostile-input safe — into the directory that becomes the build's
//! read-only source layer.
//!
//! A bad bundle is the job's fault: every such [`SourceError`] maps to an `invalid_job`
//! result whose error names the field `source` (or `source.digest`) and a rule. A store that
//! fails is the platform's fault and keeps its [`StoreError`].

mod extract;

use std::io;
use std::path::{Path, PathBuf};

use corral_protocol::{Digest, ProtocolError, Rule, SourceRef};

use crate::store::{Store, StoreError};

pub use extract::{ExtractStats, extract, extract_layer, validate};

/// Caps on what one bundle may unpack to. A bundle over any of them is refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ExtractLimits {
    /// Archive members, directories and links included.
    pub max_entries: u64,
    /// Sum of the sizes of the regular files.
    pub max_total_bytes: u64,
    /// Bytes of the tar stream beyond file contents: headers, padding, PAX records and
    /// long names (which the tar reader buffers whole, so they must be capped too).
    pub max_header_bytes: u64,
    /// Uncompressed tar bytes per compressed byte (only checked for gzip bundles, and only
    /// once the tar stream is past [`ExtractLimits::ratio_floor_bytes`]).
    pub max_ratio: u64,
    /// Below this many uncompressed bytes the ratio is not checked: a tiny bundle of
    /// empty files compresses very well and is harmless.
    pub ratio_floor_bytes: u64,
}

impl Default for ExtractLimits {
    fn default() -> Self {
        ExtractLimits {
            max_entries: 100_000,
            max_total_bytes: 2 << 30,
            max_header_bytes: 256 << 20,
            max_ratio: 100,
            ratio_floor_bytes: 8 << 20,
        }
    }
}

/// Host uid/gid to own every extracted entry (the job's mapped ids).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Owner {
    pub uid: u32,
    pub gid: u32,
}

/// Why a bundle could not be fetched or laid out. `kind()` names are stable (the hostile
/// corpus's expectations use them).
#[derive(Debug, thiserror::Error)]
pub enum SourceError {
    #[error("fetching source bundle {digest}")]
    Fetch {
        digest: Digest,
        #[source]
        source: StoreError,
    },
    #[error("source bundle {digest} is not in the store")]
    NotFound { digest: Digest },
    #[error("source bundle digest mismatch: the job names {expected}, the bytes hash to {actual}")]
    DigestMismatch { expected: Digest, actual: Digest },
    #[error("source bundle {digest}: the job says {expected} bytes, the bundle has {actual}")]
    SizeMismatch {
        digest: Digest,
        expected: u64,
        actual: u64,
    },
    #[error("the source bundle is larger than the {limit} bytes allowed")]
    BundleTooLarge { limit: u64 },
    #[error("opening {path}")]
    Open { path: PathBuf, source: io::Error },
    #[error("writing {path}")]
    Write { path: PathBuf, source: io::Error },
    #[error("the bundle is not a readable tar or tar.gz (at {entry:?}): {reason}")]
    Corrupt { entry: String, reason: String },
    #[error("{path:?}: absolute paths are refused")]
    AbsolutePath { path: String },
    #[error("{path:?}: `..` components are refused")]
    ParentDir { path: String },
    #[error("{path:?}: path or name too long")]
    PathTooLong { path: String },
    #[error("{path:?}: goes through a symlink (or a non-directory) that the bundle created")]
    ThroughSymlink { path: String },
    #[error("{path:?}: hard link to {target:?} points out of the tree")]
    HardLinkOutOfTree { path: String, target: String },
    #[error("{path:?}: hard link to {target:?}: {reason}")]
    HardLinkTarget {
        path: String,
        target: String,
        reason: &'static str,
    },
    #[error("{path:?}: {kind} entries are refused")]
    SpecialFile { path: String, kind: &'static str },
    #[error("{path:?}: {kind} entries are not supported")]
    UnsupportedEntry { path: String, kind: String },
    #[error("{path:?}: setuid/setgid files are refused (mode {mode:o})")]
    SetId { path: String, mode: u32 },
    #[error("{path:?}: would replace a directory with a non-directory")]
    ReplaceDirectory { path: String },
    #[error("{path:?}: a directory where the bundle already put a non-directory")]
    Collision { path: String },
    #[error("more than {limit} entries")]
    TooManyEntries { limit: u64 },
    #[error("more than {limit} bytes of files")]
    TooLarge { limit: u64 },
    #[error("more than {limit} bytes of tar headers, PAX records and long names")]
    HeadersTooLarge { limit: u64 },
    #[error("compression ratio above {limit}:1 (an archive bomb?)")]
    CompressionRatio { limit: u64 },
}

impl SourceError {
    /// A stable snake_case name of the failure.
    pub fn kind(&self) -> &'static str {
        match self {
            SourceError::Fetch { .. } => "fetch",
            SourceError::NotFound { .. } => "not_found",
            SourceError::DigestMismatch { .. } => "digest_mismatch",
            SourceError::SizeMismatch { .. } => "size_mismatch",
            SourceError::BundleTooLarge { .. } => "bundle_too_large",
            SourceError::Open { .. } => "open",
            SourceError::Write { .. } => "write",
            SourceError::Corrupt { .. } => "corrupt",
            SourceError::AbsolutePath { .. } => "absolute_path",
            SourceError::ParentDir { .. } => "parent_dir",
            SourceError::PathTooLong { .. } => "path_too_long",
            SourceError::ThroughSymlink { .. } => "through_symlink",
            SourceError::HardLinkOutOfTree { .. } => "hardlink_out_of_tree",
            SourceError::HardLinkTarget { .. } => "hardlink_target",
            SourceError::SpecialFile { .. } => "special_file",
            SourceError::UnsupportedEntry { .. } => "unsupported_entry",
            SourceError::SetId { .. } => "setid",
            SourceError::ReplaceDirectory { .. } => "replace_directory",
            SourceError::Collision { .. } => "collision",
            SourceError::TooManyEntries { .. } => "too_many_entries",
            SourceError::TooLarge { .. } => "too_large",
            SourceError::HeadersTooLarge { .. } => "headers_too_large",
            SourceError::CompressionRatio { .. } => "compression_ratio",
        }
    }

    /// Whether the job (its bundle or its source reference) is at fault: final, reported as
    /// `invalid_job`. Otherwise the platform failed and the job may be retried.
    pub fn is_job_fault(&self) -> bool {
        match self {
            SourceError::Fetch { source, .. } => !source.is_retryable(),
            SourceError::Open { .. } | SourceError::Write { .. } => false,
            _ => true,
        }
    }

    /// The `rejected`/`invalid_job` error to publish for a job-fault failure.
    pub fn to_protocol_error(&self) -> ProtocolError {
        let (field, rule) = match self {
            SourceError::NotFound { .. } => ("source.digest", Rule::Unknown),
            SourceError::DigestMismatch { .. } => ("source.digest", Rule::Content),
            SourceError::SizeMismatch { .. } => ("source.size", Rule::Size),
            SourceError::BundleTooLarge { .. } => ("source", Rule::Size),
            SourceError::Corrupt { .. } => ("source", Rule::Content),
            SourceError::AbsolutePath { .. }
            | SourceError::ParentDir { .. }
            | SourceError::PathTooLong { .. }
            | SourceError::ThroughSymlink { .. }
            | SourceError::HardLinkOutOfTree { .. }
            | SourceError::HardLinkTarget { .. }
            | SourceError::ReplaceDirectory { .. }
            | SourceError::Collision { .. } => ("source", Rule::Path),
            SourceError::SpecialFile { .. }
            | SourceError::UnsupportedEntry { .. }
            | SourceError::SetId { .. } => ("source", Rule::Type),
            SourceError::TooManyEntries { .. }
            | SourceError::TooLarge { .. }
            | SourceError::HeadersTooLarge { .. }
            | SourceError::CompressionRatio { .. } => ("source", Rule::Size),
            SourceError::Fetch { .. } | SourceError::Open { .. } | SourceError::Write { .. } => {
                ("source", Rule::Digest)
            }
        };
        ProtocolError::new(field, rule, self.to_string())
    }
}

/// Fetches the bundle `source` names into `dest` (a file), verifying digest and size. A
/// bundle larger than `source.size` (when given) or than `max_bytes` is refused without
/// reading it all.
pub async fn fetch(
    store: &Store,
    source: &SourceRef,
    dest: &Path,
    max_bytes: u64,
) -> Result<u64, SourceError> {
    let digest = &source.digest;
    let max = source.size.map_or(max_bytes, |s| s.min(max_bytes));
    let size = match store.get_blob_to_file_max(digest, dest, max).await {
        Ok(size) => size,
        Err(e) => {
            return Err(match e {
                StoreError::DigestMismatch {
                    expected, actual, ..
                } => SourceError::DigestMismatch { expected, actual },
                StoreError::TooLarge { limit, .. } => match source.size {
                    Some(expected) if expected == limit => SourceError::SizeMismatch {
                        digest: digest.clone(),
                        expected,
                        actual: limit.saturating_add(1),
                    },
                    _ => SourceError::BundleTooLarge { limit },
                },
                e if e.is_not_found() => SourceError::NotFound {
                    digest: digest.clone(),
                },
                source => SourceError::Fetch {
                    digest: digest.clone(),
                    source,
                },
            });
        }
    };
    if let Some(expected) = source.size
        && expected != size
    {
        let _ = tokio::fs::remove_file(dest).await;
        return Err(SourceError::SizeMismatch {
            digest: digest.clone(),
            expected,
            actual: size,
        });
    }
    Ok(size)
}

/// Fetches the bundle into `spool` (a file path, removed afterwards) and extracts it into
/// the existing, empty directory `dest`, owned by `owner`. On error `dest` may hold part
/// of the bundle: the caller discards it.
pub async fn fetch_and_extract(
    store: &Store,
    source: &SourceRef,
    spool: &Path,
    dest: &Path,
    owner: Option<Owner>,
    limits: ExtractLimits,
) -> Result<ExtractStats, SourceError> {
    let max = limits
        .max_total_bytes
        .saturating_add(limits.max_header_bytes);
    fetch(store, source, spool, max).await?;
    let (spool_owned, dest) = (spool.to_path_buf(), dest.to_path_buf());
    let result = tokio::task::spawn_blocking(move || extract(&spool_owned, &dest, owner, &limits))
        .await
        .map_err(|e| SourceError::Open {
            path: spool.to_path_buf(),
            source: io::Error::other(e.to_string()),
        })?;
    let _ = tokio::fs::remove_file(spool).await;
    result
}
