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
const JGE_K: u16 = 0x35;
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

/// What the filter does with one syscall number it singles out.
enum Rule {
    /// Handed to the supervisor (the common case: one comparison, no block of its own).
    Notify,
    /// A block of its own, which returns on every path.
    Block(Vec<SockFilter>),
}

fn rule(nr: libc::c_long, network: Network) -> Option<Rule> {
    if DENIED.iter().any(|&(_, n)| n == nr) {
        return Some(Rule::Notify);
    }
    Some(Rule::Block(match nr {
        // glibc tries clone3 first and falls back to clone, whose flags we can inspect.
        libc::SYS_clone3 => vec![stmt(RET_K, RET_ERRNO | libc::ENOSYS as u32)],
        // ioctl(fd, TIOCSTI | TIOCLINUX, ...): injecting input into a terminal.
        libc::SYS_ioctl => vec![
            stmt(LD_W_ABS, off_arg_low(1)),
            jump(JEQ_K, TIOCSTI, 2, 0),
            jump(JEQ_K, TIOCLINUX, 1, 0),
            stmt(RET_K, RET_ALLOW),
            stmt(RET_K, RET_USER_NOTIF),
        ],
        libc::SYS_socket if network == Network::None => vec![
            stmt(LD_W_ABS, off_arg_low(0)),
            jump(JEQ_K, libc::AF_INET as u32, 3, 0),
            jump(JEQ_K, libc::AF_INET6 as u32, 2, 0),
            jump(JEQ_K, libc::AF_PACKET as u32, 1, 0),
            stmt(RET_K, RET_ALLOW),
            stmt(RET_K, RET_USER_NOTIF),
        ],
        // clone(flags) creating namespaces: nested user namespaces are the classic way in.
        libc::SYS_clone => vec![
            stmt(LD_W_ABS, off_arg_low(0)),
            jump(JSET_K, NAMESPACE_FLAGS, 1, 0),
            stmt(RET_K, RET_ALLOW),
            stmt(RET_K, RET_USER_NOTIF),
        ],
        _ => return None,
    }))
}

/// The BPF program for a job under the given network policy.
///
/// After the ABI checks, a binary search on the syscall number (`JGE` nodes, one `JEQ` per
/// leaf) reaches the few numbers with a rule of their own; every other number is allowed.
/// Depth is what costs: the kernel runs the program on each syscall the job makes that it
/// could not prove always allowed, and proves that when the filter is installed by running
/// the program for every syscall number (`seccomp_cache_prepare`, with interrupts off, on
/// pid 1's way to the job). A list of ~45 comparisons made that ~450 × 90 steps; the tree
/// makes it ~450 × 10. Leaves that only notify jump to one shared return.
pub fn program(network: Network) -> Vec<SockFilter> {
    let mut p = vec![
        stmt(LD_W_ABS, OFF_ARCH),
        jump(JEQ_K, AUDIT_ARCH_X86_64, 1, 0),
        stmt(RET_K, RET_KILL_PROCESS),
        stmt(LD_W_ABS, OFF_NR),
        jump(JSET_K, X32_SYSCALL_BIT, 0, 1),
        stmt(RET_K, RET_KILL_PROCESS),
    ];
    let mut rules: Vec<(u32, Rule)> = DENIED
        .iter()
        .map(|&(_, nr)| nr)
        .chain([
            libc::SYS_clone3,
            libc::SYS_ioctl,
            libc::SYS_socket,
            libc::SYS_clone,
        ])
        .filter_map(|nr| rule(nr, network).map(|r| (nr as u32, r)))
        .collect();
    rules.sort_by_key(|&(nr, _)| nr);
    rules.dedup_by_key(|&mut (nr, _)| nr);
    let mut tree = Vec::new();
    let mut exits = Vec::new();
    search(&rules, &mut tree, &mut exits);
    // The shared returns follow the tree: ALLOW first, then USER_NOTIF.
    let len = tree.len();
    for (at, exit) in exits {
        let distance =
            |end: usize| u8::try_from(len + end - (at + 1)).expect("the tree fits a jump");
        let insn = &mut tree[at];
        match exit {
            Exit::Allow => insn.jf = distance(0),
            Exit::NotifyOrAllow => (insn.jt, insn.jf) = (distance(1), distance(0)),
        }
    }
    p.extend(tree);
    p.extend([stmt(RET_K, RET_ALLOW), stmt(RET_K, RET_USER_NOTIF)]);
    p
}

/// Which shared return a leaf's comparison jumps to, patched once the tree's length is known.
enum Exit {
    /// Not equal: allow (equal: the leaf's block follows).
    Allow,
    /// Equal: notify; not equal: allow.
    NotifyOrAllow,
}

/// Appends the search over `rules` (sorted by number, distinct) to `code`. Jumps only go
/// forward, so a node is `JGE middle → [lower half] [upper half]`.
fn search(rules: &[(u32, Rule)], code: &mut Vec<SockFilter>, exits: &mut Vec<(usize, Exit)>) {
    match rules {
        [] => {}
        [(nr, Rule::Notify)] => {
            exits.push((code.len(), Exit::NotifyOrAllow));
            code.push(jump(JEQ_K, *nr, 0, 0));
        }
        [(nr, Rule::Block(block))] => {
            exits.push((code.len(), Exit::Allow));
            code.push(jump(JEQ_K, *nr, 0, 0));
            code.extend_from_slice(block);
        }
        _ => {
            let mid = rules.len() / 2;
            let node = code.len();
            code.push(jump(JGE_K, rules[mid].0, 0, 0));
            search(&rules[..mid], code, exits);
            code[node].jt =
                u8::try_from(code.len() - node - 1).expect("the lower half fits a jump");
            search(&rules[mid..], code, exits);
        }
    }
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
                JGE_K => pc += 1 + if acc >= i.k { i.jt } else { i.jf } as usize,
                JSET_K => pc += 1 + if acc & i.k != 0 { i.jt } else { i.jf } as usize,
                RET_K => return i.k,
                other => panic!("unexpected opcode {other:#x}"),
            }
        }
    }

    fn nr(n: libc::c_long) -> u32 {
        n as u32
    }

    /// Instructions run for a syscall number, with zero arguments.
    fn steps(prog: &[SockFilter], nr: u32) -> usize {
        let mut pc = 0usize;
        let mut acc = 0u32;
        for step in 1.. {
            let i = prog[pc];
            match i.code {
                LD_W_ABS if i.k == OFF_ARCH => acc = AUDIT_ARCH_X86_64,
                LD_W_ABS if i.k == OFF_NR => acc = nr,
                LD_W_ABS => acc = 0,
                JEQ_K => pc += if acc == i.k { i.jt } else { i.jf } as usize,
                JGE_K => pc += if acc >= i.k { i.jt } else { i.jf } as usize,
                JSET_K => pc += if acc & i.k != 0 { i.jt } else { i.jf } as usize,
                RET_K => return step,
                other => panic!("unexpected opcode {other:#x}"),
            }
            pc += 1;
        }
        unreachable!()
    }

    /// What the filter must decide, written plainly.
    fn expected(network: Network, nr: u32, args: [u64; 6]) -> u32 {
        let n = libc::c_long::from(nr);
        let terminal = [TIOCSTI, TIOCLINUX].contains(&(args[1] as u32));
        let ip = [libc::AF_INET, libc::AF_INET6, libc::AF_PACKET].contains(&(args[0] as i32));
        let namespaces = args[0] & NAMESPACE_FLAGS as u64 != 0;
        let notify = DENIED.iter().any(|&(_, d)| d == n)
            || (n == libc::SYS_ioctl && terminal)
            || (n == libc::SYS_socket && network == Network::None && ip)
            || (n == libc::SYS_clone && namespaces);
        if nr & X32_SYSCALL_BIT != 0 {
            RET_KILL_PROCESS
        } else if notify {
            RET_USER_NOTIF
        } else if n == libc::SYS_clone3 {
            RET_ERRNO | libc::ENOSYS as u32
        } else {
            RET_ALLOW
        }
    }

    #[test]
    fn every_syscall_number_gets_what_its_rule_says() {
        let argsets = [
            [0; 6],
            [libc::AF_INET as u64, TIOCSTI as u64, 0, 0, 0, 0],
            [libc::AF_INET6 as u64, TIOCLINUX as u64, 0, 0, 0, 0],
            [libc::AF_PACKET as u64, 0x5401, 0, 0, 0, 0],
            [libc::AF_UNIX as u64, 0, 0, 0, 0, 0],
            [libc::CLONE_NEWUSER as u64, 0, 0, 0, 0, 0],
            [(libc::CLONE_VM | libc::CLONE_THREAD) as u64, 0, 0, 0, 0, 0],
        ];
        for network in [Network::None, Network::Loopback] {
            let p = program(network);
            let numbers = (0..1024).chain([u32::MAX, X32_SYSCALL_BIT - 1, 0x3fff_ffff]);
            for n in numbers {
                for args in argsets {
                    assert_eq!(
                        run(&p, AUDIT_ARCH_X86_64, n, args),
                        expected(network, n, args),
                        "{network:?}: syscall {n} with {args:?}"
                    );
                }
            }
        }
    }

    #[test]
    fn the_search_is_shallow() {
        // The kernel runs the program once per syscall number when the filter is installed
        // and on every syscall it cannot prove allowed; the list it replaced took up to ~90
        // steps.
        for network in [Network::None, Network::Loopback] {
            let p = program(network);
            let deepest = (0..1024).map(|n| steps(&p, n)).max().unwrap();
            assert!(deepest <= 16, "{network:?}: {deepest} steps");
            // No longer than the list it replaced: the kernel checks and compiles each
            // instruction at install time.
            assert!(p.len() <= 2 * DENIED.len() + 32, "{network:?}: {}", p.len());
        }
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
