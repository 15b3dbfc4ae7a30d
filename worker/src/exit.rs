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

/// Standard output was closed by its reader (`corral schema job | head -1`): 128 + SIGPIPE,
/// the status a shell shows for `cat` or `grep` ended the same way. Nothing is printed.
pub const STDOUT_CLOSED: u8 = 141;

/// The exit code for a command's outcome; an error is printed to stderr first. The one
/// place that turns a closed standard output, from any command, into a quiet end.
pub fn code(outcome: anyhow::Result<u8>) -> u8 {
    match outcome {
        Ok(code) => code,
        Err(err) if err.chain().any(|e| e.is::<StdoutClosed>()) => STDOUT_CLOSED,
        Err(err) => {
            eprintln!("corral: error: {err:#}");
            INTERNAL
        }
    }
}

/// The reader of standard output went away. Commands return it (through `?`) instead of
/// panicking the way `println!` does, so their cleanup still runs before the quiet exit.
#[derive(Debug, thiserror::Error)]
#[error("standard output was closed by its reader")]
pub struct StdoutClosed;

/// Writing to standard output failed for another reason (a full disk behind a redirect).
#[derive(Debug, thiserror::Error)]
#[error("writing to standard output: {0}")]
pub struct StdoutFailed(#[source] std::io::Error);

/// Writes to standard output and flushes; what [`outln!`](crate::outln) expands to.
pub fn write_stdout(args: std::fmt::Arguments<'_>) -> anyhow::Result<()> {
    use std::io::Write as _;
    let mut stdout = std::io::stdout().lock();
    stdout
        .write_fmt(args)
        .and_then(|()| stdout.flush())
        .map_err(|err| match err.kind() {
            std::io::ErrorKind::BrokenPipe => anyhow::Error::new(StdoutClosed),
            _ => anyhow::Error::new(StdoutFailed(err)),
        })
}

/// `println!` for commands: returns an error instead of panicking on a closed stdout. Use
/// with `?`; [`code`] ends the process quietly when the reader went away.
#[macro_export]
macro_rules! outln {
    () => {
        $crate::exit::write_stdout(format_args!("\n"))
    };
    ($($arg:tt)*) => {
        $crate::exit::write_stdout(format_args!("{}\n", format_args!($($arg)*)))
    };
}

/// `print!` for commands; see [`outln!`](crate::outln).
#[macro_export]
macro_rules! out {
    ($($arg:tt)*) => {
        $crate::exit::write_stdout(format_args!($($arg)*))
    };
}
