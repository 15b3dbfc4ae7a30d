//! CPU placement: affinity sets and whether anything else is runnable.

use super::check;
use std::io;

/// A set of CPUs a process may run on (`sched_setaffinity`).
#[derive(Clone, Copy)]
pub struct CpuSet(libc::cpu_set_t);

impl CpuSet {
    /// The CPUs the calling process may run on.
    pub fn current() -> io::Result<CpuSet> {
        // SAFETY: an all-zero cpu_set_t is the empty set.
        let mut set: libc::cpu_set_t = unsafe { std::mem::zeroed() };
        // SAFETY: the kernel writes at most size_of::<cpu_set_t>() bytes into `set`.
        check(unsafe { libc::sched_getaffinity(0, std::mem::size_of_val(&set), &mut set) })?;
        Ok(CpuSet(set))
    }

    /// This set without `cpu`, or `None` when nothing would be left.
    pub fn without(&self, cpu: usize) -> Option<CpuSet> {
        let mut set = self.0;
        if cpu < libc::CPU_SETSIZE as usize {
            // SAFETY: `cpu` is within the set's bounds (checked above).
            unsafe { libc::CPU_CLR(cpu, &mut set) };
        }
        // SAFETY: counts the bits of a valid set.
        (unsafe { libc::CPU_COUNT(&set) } > 0).then_some(CpuSet(set))
    }

    /// Restricts `pid` (0: the caller) to this set; a thread on a CPU outside it moves.
    pub fn apply(&self, pid: libc::pid_t) -> io::Result<()> {
        // SAFETY: the kernel only reads the set.
        check(unsafe { libc::sched_setaffinity(pid, std::mem::size_of_val(&self.0), &self.0) })
            .map(drop)
    }
}

/// Whether the caller is the only runnable task on the machine right now (the running
/// count in `/proc/loadavg`), i.e. every other CPU it could use is idle.
pub fn running_alone() -> bool {
    let mut buf = [0u8; 128];
    let Ok(n) = std::fs::File::open("/proc/loadavg").and_then(|mut f| {
        use std::io::Read;
        f.read(&mut buf)
    }) else {
        return false;
    };
    std::str::from_utf8(&buf[..n]).is_ok_and(alone_in)
}

/// `/proc/loadavg` text, e.g. "0.52 0.58 0.59 1/467 12345": the fourth field is
/// running/total, the reader included.
fn alone_in(loadavg: &str) -> bool {
    loadavg
        .split(' ')
        .nth(3)
        .and_then(|field| field.split_once('/'))
        .and_then(|(running, _)| running.parse::<u32>().ok())
        .is_some_and(|running| running <= 1)
}

/// The CPU the caller is running on right now.
pub fn current_cpu() -> Option<usize> {
    // SAFETY: no arguments.
    let cpu = unsafe { libc::sched_getcpu() };
    usize::try_from(cpu).ok()
}

/// Sets the calling thread's nice value (`setpriority(PRIO_PROCESS, 0, nice)`; raising it
/// back needs `CAP_SYS_NICE`).
pub fn set_nice(nice: libc::c_int) -> io::Result<()> {
    // SAFETY: plain syscall on integers.
    check(unsafe { libc::setpriority(libc::PRIO_PROCESS, 0, nice) }).map(drop)
}

/// The calling thread's nice value.
pub fn nice() -> io::Result<libc::c_int> {
    // SAFETY: errno is thread-local; getpriority may legitimately return -1, so errno
    // tells failure apart.
    unsafe {
        *libc::__errno_location() = 0;
        let nice = libc::getpriority(libc::PRIO_PROCESS, 0);
        if nice == -1 && *libc::__errno_location() != 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(nice)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn loadavg_running_count_says_whether_we_run_alone() {
        assert!(alone_in("0.52 0.58 0.59 1/467 12345\n"));
        assert!(!alone_in("2.08 2.18 2.25 3/138 8797\n"));
        assert!(!alone_in("garbage"), "unreadable means not alone");
    }

    #[test]
    fn a_cpu_set_without_its_only_cpu_is_none() {
        let all = CpuSet::current().unwrap();
        let cpu = current_cpu().unwrap();
        // SAFETY: counts the bits of a valid set.
        let count = |s: &CpuSet| unsafe { libc::CPU_COUNT(&s.0) };
        match all.without(cpu) {
            Some(rest) => assert_eq!(count(&rest), count(&all) - 1),
            None => assert_eq!(count(&all), 1),
        }
    }
}
