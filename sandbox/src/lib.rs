//! corral-sandbox: runs one hostile build command in user, mount, pid, net, ipc, uts and
//! cgroup namespaces over an overlayfs root, with cgroup (v1 or v2) limits, rlimits, a
//! seccomp filter, and accounting. It knows nothing of the wire protocol or of AMQP.
