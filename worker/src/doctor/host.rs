//! The host checks: each does what the sandbox or the worker will do (mount an overlay with
//! the snapshot's options, make and remove a cgroup under the configured parent, write in
//! the data dir) or reads what the kernel reports, and says how to fix what fails.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use serde_json::json;

use super::Check;
use crate::base::prerequisites::{self, Package, Role};
use crate::config::Config;

/// close_range (5.9) for the helper's fds and the overlay's `volatile` option (5.10).
const KERNEL_MIN: (u32, u32) = (5, 10);

/// The options the sandbox mounts every job's overlay with (`corral_sandbox`'s
/// `rootfs::overlay_options`): the snapshot relies on the upper dir alone being the diff.
const OVERLAY_OPTIONS: &str = "redirect_dir=off,metacopy=off,index=off,xino=off,volatile";

/// Controllers a build is limited and measured by; `io` is `blkio` on cgroup v1.
const CONTROLLERS: [(&str, &str); 4] = [
    ("memory", "memory"),
    ("pids", "pids"),
    ("cpu", "cpu"),
    ("io", "blkio"),
];

const GIB: u64 = 1 << 30;

pub(super) fn checks(config: &Config, scope: super::Scope) -> Vec<Check> {
    let mountinfo = corral_sandbox::mountinfo::read_own().unwrap_or_default();
    let mut checks = vec![
        kernel(),
        user_namespaces(),
        overlayfs(),
        cgroups(&mountinfo),
        cgroup_parent(config, &mountinfo),
        seccomp(),
        disk_limit(config, &mountinfo),
        data_dir(&config.data_dir, &mountinfo),
    ];
    if scope.all_tools {
        checks.push(app_forwarding());
    }
    checks.extend(
        prerequisites::packages()
            .iter()
            .filter(|p| match p.role {
                Role::Run => true,
                Role::Base | Role::Fixtures | Role::Optional => scope.all_tools,
                Role::Test => false,
            })
            .map(tool),
    );
    checks
}

fn read(path: &str) -> Option<String> {
    std::fs::read_to_string(path).ok()
}

fn kernel() -> Check {
    let Some(release) = read("/proc/sys/kernel/osrelease") else {
        return Check::fail(
            "kernel",
            "cannot read /proc/sys/kernel/osrelease",
            "mount /proc",
        );
    };
    let release = release.trim().to_string();
    let mut numbers = release
        .split(|c: char| !c.is_ascii_digit())
        .filter_map(|n| n.parse::<u32>().ok());
    let version = (numbers.next().unwrap_or(0), numbers.next().unwrap_or(0));
    let details =
        json!({ "release": release, "minimum": format!("{}.{}", KERNEL_MIN.0, KERNEL_MIN.1) });
    if version >= KERNEL_MIN {
        Check::ok(
            "kernel",
            format!(
                "Linux {release} ({}.{} or later needed)",
                KERNEL_MIN.0, KERNEL_MIN.1
            ),
        )
        .with_details(details)
    } else {
        Check::fail(
            "kernel",
            format!(
                "Linux {release} is older than {}.{} (close_range, overlayfs `volatile`)",
                KERNEL_MIN.0, KERNEL_MIN.1
            ),
            "upgrade the kernel (Debian bookworm ships 6.1)",
        )
        .with_details(details)
    }
}

fn user_namespaces() -> Check {
    let id = "user_namespaces";
    if !Path::new("/proc/self/ns/user").exists() {
        return Check::fail(
            id,
            "the kernel has no user namespaces (no /proc/self/ns/user)",
            "use a kernel built with CONFIG_USER_NS=y",
        );
    }
    match read("/proc/sys/user/max_user_namespaces").and_then(|s| s.trim().parse::<u64>().ok()) {
        Some(0) => Check::fail(
            id,
            "user namespaces are turned off (user.max_user_namespaces = 0)",
            "sysctl -w user.max_user_namespaces=15000 (and set it in /etc/sysctl.d/ to keep it)",
        ),
        Some(max) => Check::ok(id, format!("available (user.max_user_namespaces = {max})"))
            .with_details(json!({ "max_user_namespaces": max })),
        None => Check::warn(
            id,
            "cannot read /proc/sys/user/max_user_namespaces",
            "check that /proc is mounted with its sysctls",
        ),
    }
}

/// Mounts a small overlay with the sandbox's options, writes through it, checks that the
/// write landed in the upper dir, and unmounts it.
fn overlayfs() -> Check {
    let id = "overlayfs";
    let fix = "load the overlay module (modprobe overlay) and run as root; the sandbox mounts \
               every job's root this way";
    let dir = match tempfile::Builder::new().prefix("corral-doctor-").tempdir() {
        Ok(dir) => dir,
        Err(err) => {
            return Check::fail(
                id,
                format!("cannot make a temp dir for a test overlay: {err}"),
                "make the temp dir (TMPDIR or /tmp) writable",
            );
        }
    };
    let [lower, upper, work, merged] =
        ["lower", "upper", "work", "merged"].map(|d| dir.path().join(d));
    for d in [&lower, &upper, &work, &merged] {
        if let Err(err) = std::fs::create_dir(d) {
            return Check::fail(id, format!("creating {}: {err}", d.display()), fix);
        }
    }
    let options = format!(
        "lowerdir={},upperdir={},workdir={},{OVERLAY_OPTIONS}",
        lower.display(),
        upper.display(),
        work.display()
    );
    let details = json!({ "options": OVERLAY_OPTIONS, "mount_point": merged });
    if prerequisites::find_command("mount", None).is_none() {
        return Check::fail(
            id,
            "cannot mount a test overlay: mount is not on PATH",
            "apt-get install mount",
        )
        .with_details(details);
    }
    let mounted = run(
        "mount",
        &["-t", "overlay", "overlay", "-o", &options],
        &merged,
    );
    if let Err(err) = mounted {
        return Check::fail(
            id,
            format!("mounting a test overlay with {OVERLAY_OPTIONS} failed: {err}"),
            fix,
        )
        .with_details(details);
    }
    let wrote = std::fs::write(merged.join("probe"), b"corral");
    let landed = upper.join("probe").is_file();
    let unmounted = run("umount", &[], &merged);
    if unmounted.is_err() {
        let _ = run("umount", &["-l"], &merged);
    }
    match (wrote, landed, unmounted) {
        (Ok(()), true, Ok(())) => Check::ok(
            id,
            format!("mounted, wrote through and unmounted a test overlay with {OVERLAY_OPTIONS}"),
        )
        .with_details(details),
        (Err(err), _, _) => Check::fail(id, format!("writing through a test overlay: {err}"), fix)
            .with_details(details),
        (Ok(()), false, _) => Check::fail(
            id,
            "a file written through a test overlay is not in its upper dir",
            fix,
        )
        .with_details(details),
        (Ok(()), true, Err(err)) => Check::warn(
            id,
            format!(
                "unmounting the test overlay {} failed: {err}",
                merged.display()
            ),
            format!("umount {}", merged.display()),
        )
        .with_details(details),
    }
}

/// Runs `program args target`, its stderr becoming the error.
fn run(program: &str, args: &[&str], target: &Path) -> Result<(), String> {
    let out = Command::new(program)
        .args(args)
        .arg(target)
        .stdin(Stdio::null())
        .output()
        .map_err(|e| format!("running {program}: {e}"))?;
    if out.status.success() {
        Ok(())
    } else {
        Err(String::from_utf8_lossy(&out.stderr).trim().to_string())
    }
}

/// Where each controller lives: the sandbox's own discovery decides which hierarchy it
/// uses; the table shows what the host offers, for people.
fn cgroups(mountinfo: &str) -> Check {
    let id = "cgroups";
    let mut v1: Vec<(String, PathBuf)> = Vec::new();
    let mut v2_root: Option<PathBuf> = None;
    for entry in corral_sandbox::mountinfo::entries(mountinfo) {
        match entry.fstype.as_str() {
            "cgroup2" => v2_root = v2_root.or(Some(entry.mount_point)),
            "cgroup" => {
                for opt in entry.super_options.split(',') {
                    if !v1.iter().any(|(c, _)| c == opt) {
                        v1.push((opt.to_string(), entry.mount_point.clone()));
                    }
                }
            }
            _ => {}
        }
    }
    let v2_controllers: Vec<String> = v2_root
        .as_ref()
        .and_then(|root| std::fs::read_to_string(root.join("cgroup.controllers")).ok())
        .map(|text| text.split_whitespace().map(str::to_string).collect())
        .unwrap_or_default();
    let mut controllers = serde_json::Map::new();
    let mut parts = Vec::new();
    for (name, v1_name) in CONTROLLERS {
        let (version, path) = if let Some((_, path)) = v1.iter().find(|(c, _)| c == v1_name) {
            (Some("v1"), Some(path.clone()))
        } else if v2_controllers.iter().any(|c| c == name) {
            (Some("v2"), v2_root.clone())
        } else {
            (None, None)
        };
        parts.push(match (version, &path) {
            (Some(v), Some(p)) => format!("{name} {v} ({})", p.display()),
            _ => format!("{name} nowhere"),
        });
        controllers.insert(
            name.to_string(),
            json!({ "version": version, "path": path }),
        );
    }
    let v2_text = match &v2_root {
        None => "cgroup v2 is not mounted".to_string(),
        Some(root) if v2_controllers.is_empty() => {
            format!("cgroup v2 at {} holds no controllers", root.display())
        }
        Some(root) => format!(
            "cgroup v2 at {} holds {}",
            root.display(),
            v2_controllers.join(", ")
        ),
    };
    let layout = corral_sandbox::discover_cgroups(mountinfo);
    let used = match &layout {
        Ok(corral_sandbox::Layout::V1 { .. }) => Some("v1"),
        Ok(corral_sandbox::Layout::V2 { .. }) => Some("v2"),
        Err(_) => None,
    };
    let details = json!({
        "controllers": controllers,
        "v2": v2_root.as_ref().map(|p| json!({ "path": p, "controllers": v2_controllers })),
        "used": used,
    });
    let summary = format!("{}; {v2_text}", parts.join(", "));
    match layout {
        Ok(_) => Check::ok(
            id,
            format!("{summary}; builds use cgroup {}", used.unwrap_or("?")),
        )
        .with_details(details),
        Err(err) => Check::fail(
            id,
            format!("{summary}; {err}"),
            "boot with the unified hierarchy and its controllers (systemd.unified_cgroup_hierarchy=1), \
             or mount cgroup v1 memory, pids, cpu and cpuacct",
        )
        .with_details(details),
    }
}

/// Makes and removes a cgroup where builds' cgroups go, exactly as a build would.
fn cgroup_parent(config: &Config, mountinfo: &str) -> Check {
    let id = "cgroup_parent";
    let Ok(layout) = corral_sandbox::discover_cgroups(mountinfo) else {
        return Check::fail(
            id,
            "no usable cgroup hierarchy (see cgroups)",
            "fix the cgroups check first",
        );
    };
    let parent = match crate::job::stage::cgroup_parent(&config.sandbox.cgroup_parent, &layout) {
        Ok(parent) => parent,
        Err(err) => {
            return Check::fail(
                id,
                format!("resolving sandbox.cgroup_parent: {err}"),
                "set sandbox.cgroup_parent to a cgroup path, or run under systemd with Delegate=yes",
            );
        }
    };
    let name = format!("doctor-{}", std::process::id());
    let made = corral_sandbox::JobCgroup::create(&layout, &parent, &name)
        .and_then(|cgroup| cgroup.destroy());
    let details = json!({ "parent": parent });
    match made {
        Ok(()) => Check::ok(
            id,
            format!("made and removed a build cgroup under /{parent}"),
        )
        .with_details(details),
        Err(err) => Check::fail(
            id,
            format!(
                "cannot make a build cgroup under /{parent}: {}",
                corral_sandbox::error_chain(&err)
            ),
            "run as root, or delegate that cgroup to the worker's user (systemd Delegate=yes)",
        )
        .with_details(details),
    }
}

fn seccomp() -> Check {
    let id = "seccomp";
    let Some(actions) = read("/proc/sys/kernel/seccomp/actions_avail") else {
        return Check::fail(
            id,
            "the kernel has no seccomp filters (no /proc/sys/kernel/seccomp/actions_avail)",
            "use a kernel built with CONFIG_SECCOMP_FILTER=y",
        );
    };
    let have: Vec<&str> = actions.split_whitespace().collect();
    let missing: Vec<&str> = ["errno", "user_notif", "kill_process"]
        .into_iter()
        .filter(|a| !have.contains(a))
        .collect();
    let details = json!({ "actions": have });
    if missing.is_empty() {
        Check::ok(
            id,
            "filters with errno, user_notif and kill_process (denied calls are counted by name)",
        )
        .with_details(details)
    } else {
        Check::fail(
            id,
            format!("the seccomp actions {} are missing", missing.join(", ")),
            "use Linux 5.10 or later with CONFIG_SECCOMP_FILTER=y",
        )
        .with_details(details)
    }
}

/// The job filesystems: ext4 images on loop devices, kept under `<data_dir>/jobs`.
fn disk_limit(config: &Config, mountinfo: &str) -> Check {
    let id = "disk_limit";
    let fix_loop = "load the loop module (modprobe loop) and run as root";
    let control = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/loop-control");
    if let Err(err) = control {
        return Check::fail(
            id,
            format!("cannot open /dev/loop-control: {err}; builds' disk limits need loop devices"),
            fix_loop,
        );
    }
    if prerequisites::find_command("mkfs.ext4", None).is_none() {
        return Check::fail(
            id,
            "mkfs.ext4 is not on PATH; each build's disk limit is an ext4 filesystem",
            "apt-get install e2fsprogs",
        );
    }
    let jobs = config.data_dir.join("jobs");
    let fs = mount_of(mountinfo, &existing_ancestor(&jobs));
    let fstype = fs.as_ref().map_or("unknown", |(_, t)| t.as_str());
    let details = json!({ "images": jobs, "backing_filesystem": fstype });
    if fstype == "tmpfs" {
        return Check::warn(
            id,
            format!(
                "loop devices and mkfs.ext4 work, but the job images in {} would be on tmpfs \
                 (held in RAM)",
                jobs.display()
            ),
            "put the data dir on a disk filesystem",
        )
        .with_details(details);
    }
    Check::ok(
        id,
        format!(
            "loop devices and mkfs.ext4 available; job filesystems are ext4 images in {} on {fstype}",
            jobs.display()
        ),
    )
    .with_details(details)
}

fn existing_ancestor(path: &Path) -> PathBuf {
    path.ancestors()
        .find(|p| p.exists())
        .unwrap_or(Path::new("/"))
        .to_path_buf()
}

/// The mount point and filesystem type holding `dir` (the deepest, latest mount).
fn mount_of(mountinfo: &str, dir: &Path) -> Option<(PathBuf, String)> {
    let dir = std::fs::canonicalize(dir).unwrap_or_else(|_| dir.to_path_buf());
    let mut best: Option<(usize, PathBuf, String)> = None;
    for entry in corral_sandbox::mountinfo::entries(mountinfo) {
        let depth = entry.mount_point.components().count();
        if dir.starts_with(&entry.mount_point) && best.as_ref().is_none_or(|(d, ..)| depth >= *d) {
            best = Some((depth, entry.mount_point, entry.fstype));
        }
    }
    best.map(|(_, point, fstype)| (point, fstype))
}

fn data_dir(dir: &Path, mountinfo: &str) -> Check {
    let id = "data_dir";
    let fix_other = "pass --data-dir DIR (or set data_dir in the config) with a writable directory";
    let at = existing_ancestor(dir);
    let writable = tempfile::Builder::new()
        .prefix(".corral-doctor-")
        .tempfile_in(&at);
    let (mount_point, fstype) =
        mount_of(mountinfo, &at).unwrap_or((PathBuf::from("/"), "unknown".into()));
    let free = rustix::fs::statvfs(&at)
        .map(|s| s.f_bavail.saturating_mul(s.f_frsize))
        .ok();
    let details = json!({
        "path": dir,
        "exists": dir.exists(),
        "filesystem": fstype,
        "mount_point": mount_point,
        "free_bytes": free,
    });
    let place = if at == dir {
        format!("{} on {fstype} ({})", dir.display(), mount_point.display())
    } else {
        format!(
            "{} (created on first use in {}) on {fstype} ({})",
            dir.display(),
            at.display(),
            mount_point.display()
        )
    };
    if let Err(err) = writable {
        return Check::fail(
            id,
            format!("{place}: cannot create a file in {}: {err}", at.display()),
            fix_other,
        )
        .with_details(details);
    }
    let free_text = free.map_or_else(
        || "free space unknown".into(),
        |f| format!("{} free", crate::base::human_size(f)),
    );
    let needed = crate::base::debootstrap::SPACE_NEEDED;
    match free {
        Some(f) if f < needed => Check::fail(
            id,
            format!(
                "{place}, writable, {free_text}: a base alone needs about {}",
                crate::base::human_size(needed)
            ),
            format!("free some space there, or {fix_other} on a larger filesystem"),
        )
        .with_details(details),
        Some(f) if f < 4 * GIB => Check::warn(
            id,
            format!("{place}, writable, only {free_text}"),
            "builds, bases and the store want several GiB: free some space or move the data dir",
        )
        .with_details(details),
        _ => match crate::datadisk::warning(&at) {
            Some(warning) => Check::warn(id, format!("{place}, writable, {free_text}"), warning)
                .with_details(details),
            None => Check::ok(id, format!("{place}, writable, {free_text}")).with_details(details),
        },
    }
}

/// Whether `corral run` can have the kernel forward a published port: root, `ip`, `nft`,
/// and a kernel that accepts the rules (checked by `nft --check`, nothing is installed).
fn app_forwarding() -> Check {
    let id = "app_forwarding";
    let userspace = |why: String| {
        Check::ok(
            id,
            format!("corral run copies published ports in userspace: {why}"),
        )
    };
    if prerequisites::effective_uid() != Some(0) {
        return userspace("kernel forwarding needs root".into());
    }
    for tool in ["ip", "nft"] {
        if prerequisites::find_command(tool, None).is_none() {
            return userspace(format!("{tool} is not installed (iproute2, nftables)"));
        }
    }
    let stale = crate::app::route::stale_tables();
    if !stale.is_empty() {
        return Check::warn(
            id,
            format!(
                "forwarding tables of apps that are gone still take their published ports' connections: {}",
                stale.join(", ")
            ),
            format!(
                "remove them (the next corral run does too): {}",
                stale
                    .iter()
                    .map(|t| format!("nft delete table ip {t}"))
                    .collect::<Vec<_>>()
                    .join("; ")
            ),
        );
    }
    // The very rules an app gets, checked by the kernel, not installed.
    match crate::app::route::check_rules() {
        Ok(()) => Check::ok(
            id,
            "corral run can have the kernel forward a published port (veth, nftables DNAT)",
        ),
        Err(crate::app::route::RouteError::Command { detail, .. }) => Check::warn(
            id,
            format!(
                "the kernel refuses corral run's forwarding rules, so published ports are copied in userspace: {detail}"
            ),
            "load nf_tables NAT (modprobe nft_nat nft_fib_ipv4 nft_reject_inet), or keep --forwarding userspace",
        ),
        Err(err) => userspace(err.to_string()),
    }
}

fn tool(package: &Package) -> Check {
    let id = format!("tool:{}", package.name);
    let details = json!({ "package": package.name, "probe": package.probe.to_string(), "role": package.role });
    let found = match &package.probe {
        prerequisites::Probe::Command(name) => {
            prerequisites::find_command(name, None).map(|p| p.display().to_string())
        }
        prerequisites::Probe::PythonModule(_) => package.present(None).then(|| "importable".into()),
    };
    if let Some(found) = found {
        let place = match &package.probe {
            prerequisites::Probe::Command(name) => format!("{name} at {found}"),
            probe => format!("{probe} {found}"),
        };
        return Check::ok(id, format!("{place}: {}", package.why)).with_details(details);
    }
    let missing = format!("{} is not installed: {}", package.probe, package.why);
    let fix = package.install_command();
    match package.role {
        Role::Run => Check::fail(id, missing, fix),
        Role::Base | Role::Fixtures => Check::warn(id, missing, fix),
        Role::Optional | Role::Test => Check::ok(id, format!("{missing}; optional")),
    }
    .with_details(details)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::Value;

    /// A mountinfo line for `fstype` at `point` with per-superblock `options`.
    fn line(id: u32, point: &Path, fstype: &str, options: &str) -> String {
        format!(
            "{id} 1 0:{id} / {} rw,relatime - {fstype} {fstype} rw,{options}\n",
            point.display()
        )
    }

    #[test]
    fn v1_controllers_beside_an_empty_v2_mount_are_reported_as_such() {
        let v2 = tempfile::tempdir().unwrap();
        std::fs::write(v2.path().join("cgroup.controllers"), "\n").unwrap();
        let mut mountinfo = String::new();
        for (n, ctl) in ["memory", "pids", "cpu", "cpuacct", "blkio"]
            .iter()
            .enumerate()
        {
            let point = PathBuf::from("/sys/fs/cgroup").join(ctl);
            mountinfo += &line(30 + n as u32, &point, "cgroup", ctl);
        }
        mountinfo += &line(40, v2.path(), "cgroup2", "nsdelegate");
        let check = cgroups(&mountinfo);
        assert_eq!(check.status, super::super::Status::Ok, "{check:?}");
        let d = &check.details;
        assert_eq!(d["used"], "v1");
        assert_eq!(d["controllers"]["io"]["version"], "v1");
        assert_eq!(d["controllers"]["io"]["path"], "/sys/fs/cgroup/blkio");
        assert_eq!(d["controllers"]["memory"]["path"], "/sys/fs/cgroup/memory");
        assert_eq!(d["v2"]["controllers"], json!([]));
        assert!(
            check.summary.contains("holds no controllers"),
            "{}",
            check.summary
        );
    }

    #[test]
    fn a_unified_hierarchy_with_its_controllers_is_used_and_a_missing_one_fails() {
        let v2 = tempfile::tempdir().unwrap();
        std::fs::write(
            v2.path().join("cgroup.controllers"),
            "cpuset cpu io memory pids\n",
        )
        .unwrap();
        let mountinfo = line(40, v2.path(), "cgroup2", "nsdelegate");
        let check = cgroups(&mountinfo);
        assert_eq!(check.details["used"], "v2");
        assert_eq!(check.details["controllers"]["pids"]["version"], "v2");
        assert_eq!(check.fix, None);

        std::fs::write(v2.path().join("cgroup.controllers"), "cpu io\n").unwrap();
        let check = cgroups(&mountinfo);
        assert_eq!(check.status, super::super::Status::Fail, "{check:?}");
        assert_eq!(check.details["used"], Value::Null);
        assert_eq!(
            check.details["controllers"]["memory"]["version"],
            Value::Null
        );
        assert!(check.fix.is_some());
    }

    #[test]
    fn the_deepest_mount_holds_a_path() {
        let mountinfo = "22 1 254:0 / / rw - ext4 /dev/vda rw\n\
                         30 22 0:40 / /var/lib/corral rw - xfs /dev/vdb rw\n";
        let (point, fstype) = mount_of(mountinfo, Path::new("/var/lib/corral/jobs")).unwrap();
        assert_eq!(
            (point.as_path(), fstype.as_str()),
            (Path::new("/var/lib/corral"), "xfs")
        );
        let (_, fstype) = mount_of(mountinfo, Path::new("/var/lib/other")).unwrap();
        assert_eq!(fstype, "ext4");
    }
}
