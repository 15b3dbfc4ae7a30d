//! Thin wrappers over the raw syscalls the sandbox needs, one file per kernel concept. The
//! only place in the workspace with `unsafe`; everything above speaks in `io::Result` and
//! owned fds. `lib.rs` allows `unsafe` for this module alone.

mod caps;
mod exec;
mod fd;
mod fs;
mod loopdev;
mod mount;
mod netns;
mod notify;
mod ns;
mod process;
mod sched;
mod seccomp;
mod shared;
mod signal;
mod socket;

pub use caps::*;
pub use exec::*;
pub use fd::*;
pub use fs::*;
pub use loopdev::*;
pub use mount::*;
pub use netns::*;
pub use notify::*;
pub use ns::*;
pub use process::*;
pub use sched::*;
pub use seccomp::*;
pub use shared::*;
pub use signal::*;
pub use socket::*;

use std::ffi::{CString, OsStr};
use std::io;
use std::os::unix::ffi::OsStrExt;
use std::path::Path;

fn cstr(path: &Path) -> io::Result<CString> {
    os_cstr(path.as_os_str())
}

fn os_cstr(s: &OsStr) -> io::Result<CString> {
    CString::new(s.as_bytes()).map_err(|_| io::Error::from(io::ErrorKind::InvalidInput))
}

fn check(ret: libc::c_int) -> io::Result<libc::c_int> {
    if ret < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(ret)
    }
}

fn check_long(ret: libc::c_long) -> io::Result<libc::c_long> {
    if ret < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(ret)
    }
}
