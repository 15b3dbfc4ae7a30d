//! Per-process resource limits of the job (cgroups cover the whole job; these cover what
//! cgroups cannot: open files, core dumps, file size, stack, and a per-process CPU cap).

use std::io;

use crate::spec::SandboxLimits;

/// `(resource, soft, hard)` for each limit the job gets.
pub fn plan(limits: &SandboxLimits) -> Vec<(libc::__rlimit_resource_t, u64, u64)> {
    let mut out = vec![
        (libc::RLIMIT_NOFILE, limits.open_files, limits.open_files),
        (libc::RLIMIT_CORE, 0, 0),
        (libc::RLIMIT_STACK, 8 << 20, 64 << 20),
    ];
    if let Some(fsize) = limits.file_size_bytes {
        out.push((libc::RLIMIT_FSIZE, fsize, fsize));
    }
    if let Some(cpu) = limits.cpu_seconds {
        // SIGXCPU at the soft limit, SIGKILL a second later; the whole-job limit is
        // enforced from the cgroup by the supervisor.
        out.push((libc::RLIMIT_CPU, cpu, cpu + 1));
    }
    out
}

pub fn apply(limits: &SandboxLimits) -> io::Result<()> {
    for (resource, soft, hard) in plan(limits) {
        crate::sys::set_rlimit(resource, soft, hard)?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn core_dumps_are_off_and_optional_limits_only_when_set() {
        let mut l = SandboxLimits::default();
        let p = plan(&l);
        assert!(p.contains(&(libc::RLIMIT_CORE, 0, 0)));
        assert!(
            !p.iter()
                .any(|(r, _, _)| *r == libc::RLIMIT_CPU || *r == libc::RLIMIT_FSIZE)
        );
        l.cpu_seconds = Some(5);
        l.file_size_bytes = Some(1 << 20);
        let p = plan(&l);
        assert!(p.contains(&(libc::RLIMIT_CPU, 5, 6)));
        assert!(p.contains(&(libc::RLIMIT_FSIZE, 1 << 20, 1 << 20)));
    }
}
