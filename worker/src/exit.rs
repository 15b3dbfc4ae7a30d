//! Exit codes of the `corral` binary. They say whose fault a failure is, so scripts and
//! operators can tell a job that failed from a platform that failed.

/// The command did what was asked (for a build: it succeeded).
pub const SUCCESS: u8 = 0;
/// The job's fault: the build failed, hit a limit, or was cancelled. Final; do not retry.
pub const JOB_FAILED: u8 = 1;
/// The command line itself was wrong (clap's own convention).
pub const USAGE: u8 = 2;
/// The input was invalid: a job message, a config file or a bundle that fails validation
/// (sysexits `EX_DATAERR`). Final; fix the input.
pub const INVALID_INPUT: u8 = 65;
/// An unexpected internal error (sysexits `EX_SOFTWARE`).
pub const INTERNAL: u8 = 70;
/// The platform's fault: a store, the broker or the host failed (sysexits `EX_TEMPFAIL`).
/// Retrying later may succeed.
pub const PLATFORM_ERROR: u8 = 75;

/// The exit code that says how a job ended.
pub fn for_status(status: corral_protocol::Status) -> u8 {
    use corral_protocol::Status;
    match status {
        Status::Succeeded => SUCCESS,
        Status::Rejected => INVALID_INPUT,
        Status::Error => PLATFORM_ERROR,
        Status::Failed | Status::TimedOut | Status::Killed | Status::Cancelled => JOB_FAILED,
    }
}

/// The exit code for a command's outcome; an error is printed to stderr first.
pub fn code(outcome: anyhow::Result<u8>) -> u8 {
    match outcome {
        Ok(code) => code,
        Err(err) => {
            eprintln!("corral: error: {err:#}");
            INTERNAL
        }
    }
}
