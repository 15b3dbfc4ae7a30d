//! The syscall filter: what builds never need and attacks do. Denied calls are handed to
//! the supervising shim (`SECCOMP_RET_USER_NOTIF`), which fails them with an errno and
//! counts them by name; foreign ABIs (i386, x32) kill the job outright.

use crate::spec::Network;
use crate::sys::SockFilter;

const AUDIT_ARCH_X86_64: u32 = 0xC000_003E;
const X32_SYSCALL_BIT: u32 = 0x4000_0000;

const RET_KILL_PROCESS: u32 = 0x8000_0000;
const RET_ERRNO: u32 = 0x0005_0000;
const RET_USER_NOTIF: u32 = 0x7FC0_0000;
const RET_ALLOW: u32 = 0x7FFF_0000;

const LD_W_ABS: u16 = 0x20;
const JEQ_K: u16 = 0x15;
const JSET_K: u16 = 0x45;
const RET_K: u16 = 0x06;

const OFF_NR: u32 = 0;
const OFF_ARCH: u32 = 4;
const fn off_arg_low(i: u32) -> u32 {
    16 + 8 * i
}

const TIOCSTI: u32 = 0x5412;
const TIOCLINUX: u32 = 0x541C;
const NAMESPACE_FLAGS: u32 = (libc::CLONE_NEWUSER
    | libc::CLONE_NEWNS
    | libc::CLONE_NEWPID
    | libc::CLONE_NEWNET
    | libc::CLONE_NEWIPC
    | libc::CLONE_NEWUTS
    | libc::CLONE_NEWCGROUP) as u32;

/// Syscalls refused outright (by number on x86_64), with the name the outcome reports.
pub const DENIED: &[(&str, libc::c_long)] = &[
    ("mount", libc::SYS_mount),
    ("umount2", libc::SYS_umount2),
    ("pivot_root", libc::SYS_pivot_root),
    ("open_tree", libc::SYS_open_tree),
    ("move_mount", libc::SYS_move_mount),
    ("fsopen", libc::SYS_fsopen),
    ("fsconfig", libc::SYS_fsconfig),
    ("fsmount", libc::SYS_fsmount),
    ("fspick", libc::SYS_fspick),
    ("mount_setattr", libc::SYS_mount_setattr),
    ("unshare", libc::SYS_unshare),
    ("setns", libc::SYS_setns),
    ("keyctl", libc::SYS_keyctl),
    ("add_key", libc::SYS_add_key),
    ("request_key", libc::SYS_request_key),
    ("bpf", libc::SYS_bpf),
    ("perf_event_open", libc::SYS_perf_event_open),
    ("userfaultfd", libc::SYS_userfaultfd),
    ("ptrace", libc::SYS_ptrace),
    ("process_vm_readv", libc::SYS_process_vm_readv),
    ("process_vm_writev", libc::SYS_process_vm_writev),
    ("pidfd_getfd", libc::SYS_pidfd_getfd),
    ("kexec_load", libc::SYS_kexec_load),
    ("kexec_file_load", libc::SYS_kexec_file_load),
    ("init_module", libc::SYS_init_module),
    ("finit_module", libc::SYS_finit_module),
    ("delete_module", libc::SYS_delete_module),
    ("reboot", libc::SYS_reboot),
    ("swapon", libc::SYS_swapon),
    ("swapoff", libc::SYS_swapoff),
    ("acct", libc::SYS_acct),
    ("quotactl", libc::SYS_quotactl),
    ("open_by_handle_at", libc::SYS_open_by_handle_at),
    ("name_to_handle_at", libc::SYS_name_to_handle_at),
    ("iopl", libc::SYS_iopl),
    ("ioperm", libc::SYS_ioperm),
    // io_uring can open sockets and files without passing through this filter.
    ("io_uring_setup", libc::SYS_io_uring_setup),
    ("io_uring_enter", libc::SYS_io_uring_enter),
    ("io_uring_register", libc::SYS_io_uring_register),
];

fn stmt(code: u16, k: u32) -> SockFilter {
    SockFilter {
        code,
        jt: 0,
        jf: 0,
        k,
    }
}

fn jump(code: u16, k: u32, jt: u8, jf: u8) -> SockFilter {
    SockFilter { code, jt, jf, k }
}

/// The BPF program for a job under the given network policy.
pub fn program(network: Network) -> Vec<SockFilter> {
    let mut p = vec![
        stmt(LD_W_ABS, OFF_ARCH),
        jump(JEQ_K, AUDIT_ARCH_X86_64, 1, 0),
        stmt(RET_K, RET_KILL_PROCESS),
        stmt(LD_W_ABS, OFF_NR),
        jump(JSET_K, X32_SYSCALL_BIT, 0, 1),
        stmt(RET_K, RET_KILL_PROCESS),
        // glibc tries clone3 first and falls back to clone, whose flags we can inspect.
        jump(JEQ_K, libc::SYS_clone3 as u32, 0, 1),
        stmt(RET_K, RET_ERRNO | libc::ENOSYS as u32),
    ];
    for &(_, nr) in DENIED {
        p.push(jump(JEQ_K, nr as u32, 0, 1));
        p.push(stmt(RET_K, RET_USER_NOTIF));
    }
    // ioctl(fd, TIOCSTI | TIOCLINUX, ...): injecting input into a terminal.
    p.extend([
        jump(JEQ_K, libc::SYS_ioctl as u32, 0, 5),
        stmt(LD_W_ABS, off_arg_low(1)),
        jump(JEQ_K, TIOCSTI, 2, 0),
        jump(JEQ_K, TIOCLINUX, 1, 0),
        stmt(RET_K, RET_ALLOW),
        stmt(RET_K, RET_USER_NOTIF),
    ]);
    if network == Network::None {
        p.extend([
            jump(JEQ_K, libc::SYS_socket as u32, 0, 6),
            stmt(LD_W_ABS, off_arg_low(0)),
            jump(JEQ_K, libc::AF_INET as u32, 3, 0),
            jump(JEQ_K, libc::AF_INET6 as u32, 2, 0),
            jump(JEQ_K, libc::AF_PACKET as u32, 1, 0),
            stmt(RET_K, RET_ALLOW),
            stmt(RET_K, RET_USER_NOTIF),
            stmt(LD_W_ABS, OFF_NR),
        ]);
    }
    // clone(flags) creating namespaces: nested user namespaces are the classic way in.
    p.extend([
        jump(JEQ_K, libc::SYS_clone as u32, 0, 4),
        stmt(LD_W_ABS, off_arg_low(0)),
        jump(JSET_K, NAMESPACE_FLAGS, 1, 0),
        stmt(RET_K, RET_ALLOW),
        stmt(RET_K, RET_USER_NOTIF),
        stmt(RET_K, RET_ALLOW),
    ]);
    p
}

/// What a notification means for the outcome.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verdict {
    /// A denied syscall, by the name the outcome reports.
    Denied(String),
    /// An attempt to open an IP or packet socket under `Network::None`.
    NetworkAttempt,
}

/// Names a notified syscall from its number and arguments.
pub fn classify(nr: i64, args: &[u64; 6]) -> Verdict {
    if nr == libc::SYS_socket {
        return Verdict::NetworkAttempt;
    }
    if nr == libc::SYS_ioctl {
        let name = match args[1] as u32 {
            TIOCSTI => "ioctl(TIOCSTI)",
            TIOCLINUX => "ioctl(TIOCLINUX)",
            _ => "ioctl",
        };
        return Verdict::Denied(name.to_owned());
    }
    if nr == libc::SYS_clone {
        return Verdict::Denied("clone(namespaces)".to_owned());
    }
    match DENIED.iter().find(|(_, n)| *n == nr) {
        Some((name, _)) => Verdict::Denied((*name).to_owned()),
        None => Verdict::Denied(format!("syscall_{nr}")),
    }
}

/// The errno a notified syscall fails with in the job.
pub fn errno_for(verdict: &Verdict) -> i32 {
    match verdict {
        // What socket(2) documents for "not permitted to create this kind of socket".
        Verdict::NetworkAttempt => libc::EACCES,
        Verdict::Denied(_) => libc::EPERM,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A tiny classic-BPF interpreter, enough to run our program on a fake seccomp_data.
    fn run(prog: &[SockFilter], arch: u32, nr: u32, args: [u64; 6]) -> u32 {
        let mut data = Vec::new();
        data.extend(nr.to_le_bytes());
        data.extend(arch.to_le_bytes());
        data.extend(0u64.to_le_bytes());
        for a in args {
            data.extend(a.to_le_bytes());
        }
        let mut acc = 0u32;
        let mut pc = 0usize;
        loop {
            let i = prog[pc];
            match i.code {
                LD_W_ABS => {
                    let o = i.k as usize;
                    acc = u32::from_le_bytes(data[o..o + 4].try_into().unwrap());
                    pc += 1;
                }
                JEQ_K => pc += 1 + if acc == i.k { i.jt } else { i.jf } as usize,
                JSET_K => pc += 1 + if acc & i.k != 0 { i.jt } else { i.jf } as usize,
                RET_K => return i.k,
                other => panic!("unexpected opcode {other:#x}"),
            }
        }
    }

    fn nr(n: libc::c_long) -> u32 {
        n as u32
    }

    #[test]
    fn denied_calls_go_to_the_supervisor_and_others_pass() {
        let p = program(Network::None);
        for &(_, n) in DENIED {
            assert_eq!(run(&p, AUDIT_ARCH_X86_64, nr(n), [0; 6]), RET_USER_NOTIF);
        }
        for n in [
            libc::SYS_read,
            libc::SYS_openat,
            libc::SYS_execve,
            libc::SYS_wait4,
        ] {
            assert_eq!(run(&p, AUDIT_ARCH_X86_64, nr(n), [0; 6]), RET_ALLOW);
        }
    }

    #[test]
    fn foreign_abis_are_killed() {
        let p = program(Network::Loopback);
        assert_eq!(run(&p, 0x4000_0003, 1, [0; 6]), RET_KILL_PROCESS, "i386");
        assert_eq!(
            run(&p, AUDIT_ARCH_X86_64, X32_SYSCALL_BIT | 1, [0; 6]),
            RET_KILL_PROCESS,
            "x32"
        );
    }

    #[test]
    fn argument_checks() {
        let p = program(Network::None);
        let x = AUDIT_ARCH_X86_64;
        let ioctl = nr(libc::SYS_ioctl);
        assert_eq!(
            run(&p, x, ioctl, [0, TIOCSTI as u64, 0, 0, 0, 0]),
            RET_USER_NOTIF
        );
        assert_eq!(
            run(&p, x, ioctl, [0, (1 << 32) | TIOCSTI as u64, 0, 0, 0, 0]),
            RET_USER_NOTIF
        );
        assert_eq!(
            run(&p, x, ioctl, [0, 0x5401, 0, 0, 0, 0]),
            RET_ALLOW,
            "TCGETS"
        );
        let clone = nr(libc::SYS_clone);
        assert_eq!(
            run(&p, x, clone, [libc::CLONE_NEWUSER as u64, 0, 0, 0, 0, 0]),
            RET_USER_NOTIF
        );
        assert_eq!(
            run(
                &p,
                x,
                clone,
                [(libc::CLONE_VM | libc::CLONE_THREAD) as u64, 0, 0, 0, 0, 0]
            ),
            RET_ALLOW
        );
        assert_eq!(
            run(&p, x, nr(libc::SYS_clone3), [0; 6]),
            RET_ERRNO | libc::ENOSYS as u32
        );
        let socket = nr(libc::SYS_socket);
        for af in [libc::AF_INET, libc::AF_INET6, libc::AF_PACKET] {
            assert_eq!(
                run(&p, x, socket, [af as u64, 1, 0, 0, 0, 0]),
                RET_USER_NOTIF
            );
            let open = program(Network::Loopback);
            assert_eq!(run(&open, x, socket, [af as u64, 1, 0, 0, 0, 0]), RET_ALLOW);
        }
        assert_eq!(
            run(&p, x, socket, [libc::AF_UNIX as u64, 1, 0, 0, 0, 0]),
            RET_ALLOW
        );
        // After the socket block the syscall number is reloaded for the clone check.
        assert_eq!(
            run(&p, x, clone, [libc::CLONE_NEWNET as u64, 0, 0, 0, 0, 0]),
            RET_USER_NOTIF
        );
    }

    #[test]
    fn notifications_are_named() {
        assert_eq!(
            classify(libc::SYS_keyctl, &[0; 6]),
            Verdict::Denied("keyctl".into())
        );
        assert_eq!(
            classify(libc::SYS_ioctl, &[0, TIOCSTI as u64, 0, 0, 0, 0]),
            Verdict::Denied("ioctl(TIOCSTI)".into())
        );
        assert_eq!(
            classify(libc::SYS_socket, &[2, 1, 0, 0, 0, 0]),
            Verdict::NetworkAttempt
        );
        assert_eq!(errno_for(&Verdict::NetworkAttempt), libc::EACCES);
    }
}
