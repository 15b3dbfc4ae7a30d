//! The namespaces a job gets and the identity mapping of its user namespace.

use std::io;

use crate::spec::{Identity, JOB_GID, JOB_UID};

/// Created at clone time, owned by the initial user namespace: the job's pid 1 mounts its
/// root as real root, and nothing in the job can ever reconfigure these namespaces. The
/// mount namespace, the cgroup and the user namespaces come later, from inside (see
/// `init::setup`): pid 1 may be cloned before its job is known, and its mount namespace
/// must be a copy of the host's mounts as they are when the job comes (its job dir and
/// layers may be mounted after the clone).
pub const CLONE_FLAGS: libc::c_int =
    libc::CLONE_NEWPID | libc::CLONE_NEWNET | libc::CLONE_NEWIPC | libc::CLONE_NEWUTS;

/// `uid_map` content: only the project's host uid exists inside, as [`JOB_UID`]. Host root
/// is not mapped, so root-owned files of the base show as `nobody` and stay root's.
pub fn uid_map(identity: &Identity) -> String {
    format!("{JOB_UID} {} 1\n", identity.host_uid)
}

pub fn gid_map(identity: &Identity) -> String {
    format!("{JOB_GID} {} 1\n", identity.host_gid)
}

/// Writes the maps of a freshly cloned child (from the parent, which holds the privilege).
/// `setgroups` is denied first so the job can never drop a group to get around a
/// group-deny permission.
pub fn write_id_maps(pid: libc::pid_t, identity: &Identity) -> io::Result<()> {
    let proc = format!("/proc/{pid}");
    std::fs::write(format!("{proc}/setgroups"), "deny")?;
    std::fs::write(format!("{proc}/uid_map"), uid_map(identity))?;
    std::fs::write(format!("{proc}/gid_map"), gid_map(identity))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_the_project_identity_is_mapped() {
        let id = Identity {
            host_uid: 200_007,
            host_gid: 200_008,
        };
        assert_eq!(uid_map(&id), "1000 200007 1\n");
        assert_eq!(gid_map(&id), "1000 200008 1\n");
    }
}
