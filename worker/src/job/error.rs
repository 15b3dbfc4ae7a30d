//! [`JobError`]: every way a step of a job's life can fail, named after the step, and the one
//! place that decides whose fault a failure is: the job's (its input or its output; final)
//! or the platform's (retried unless known to be permanent).

use std::path::PathBuf;

use corral_protocol::{ProtocolError, Rule};

use crate::base::BaseError;
use crate::layer::LayerError;
use crate::source::SourceError;
use crate::store::StoreError;

/// `outer: inner: innermost`, for messages that travel in results.
pub use corral_sandbox::error_chain;

#[derive(Debug, thiserror::Error)]
pub enum JobError {
    /// The job asks for more than this worker allows (or is otherwise invalid here).
    #[error("checking the job against this worker's maxima: {0}")]
    Spec(ProtocolError),
    #[error("opening the worker's state under {path}")]
    Open {
        path: PathBuf,
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },
    #[error("reading the base")]
    Base(#[source] BaseError),
    #[error("the base {0} has no layer digest (re-create it with `corral base build --replace`)")]
    BaseWithoutLayer(String),
    #[error("assigning the project's identity")]
    Identity(#[source] corral_sandbox::IdentityError),
    #[error("preparing the job's scratch dir {path}")]
    Scratch {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("fetching the source bundle")]
    Source(#[source] SourceError),
    #[error("preparing the job dir")]
    JobDir(#[source] corral_sandbox::JobDirError),
    #[error("running the sandbox")]
    Sandbox(#[source] corral_sandbox::Error),
    #[error("writing the build log to {path}")]
    Log {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("snapshotting {what}")]
    Snapshot {
        what: &'static str,
        #[source]
        source: LayerError,
    },
    #[error("spooling {what} at {path}")]
    Spool {
        what: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("storing {what}")]
    Store {
        what: &'static str,
        #[source]
        source: StoreError,
    },
    #[error(
        "the broker dead-lettered the job ({reason}) in {rounds} rounds of deliveries, each \
         lost with its worker or its broker connection"
    )]
    GivenUp { rounds: u32, reason: String },
    #[error("a blocking task died: {0}")]
    Join(String),
}

/// What a job did wrong, when a failure is its own.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum JobFault {
    /// Its input: the job is rejected with this error.
    Input(ProtocolError),
    /// Its output cannot be stored (too large, an unacceptable tree): the build failed.
    Output(String),
}

impl JobError {
    /// Whether the job caused this failure, and how. `None`: the platform failed.
    pub fn job_fault(&self) -> Option<JobFault> {
        match self {
            JobError::Spec(err) => Some(JobFault::Input(err.clone())),
            JobError::Base(err @ BaseError::Unknown { .. }) => Some(JobFault::Input(
                ProtocolError::new("base", Rule::Unknown, err.to_string()),
            )),
            JobError::Source(err) if err.is_job_fault() => {
                Some(JobFault::Input(err.to_protocol_error()))
            }
            JobError::Snapshot { source, .. } if source.is_tree_fault() => Some(JobFault::Output(
                format!("the build's output cannot be stored: {source}"),
            )),
            _ => None,
        }
    }

    /// Whether a retry may help a platform failure. Everything not the job's fault is the
    /// platform's; only a few of those are known to be permanent (bad credentials, a refused
    /// request).
    pub fn is_retryable(&self) -> bool {
        match self {
            _ if self.job_fault().is_some() => false,
            JobError::Store { source, .. } => source.is_retryable(),
            JobError::GivenUp { .. } => false,
            _ => true,
        }
    }
}
