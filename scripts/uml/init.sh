#!/bin/sh
# pid 1 of the user-mode Linux guest that scripts/test-v2 boots. The guest's / is the host's
# / through hostfs, read-write: everything written here goes to a tmpfs (/tmp, /run,
# /var/tmp) or to the guest's own kernel file systems, never through to the host.
# Kernel command-line words the kernel does not know arrive here as environment variables:
# CORRAL_V2_PLAN (the plan file scripts/test-v2 wrote), CORRAL_V2_NET (guest address/prefix).
export PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin
export HOME=/tmp TMPDIR=/tmp LANG=C.UTF-8
mount -t proc proc /proc
mount -t sysfs sys /sys
mount -t tmpfs -o mode=1777 tmpfs /tmp
mount -t tmpfs -o mode=755 tmpfs /run
# Job filesystems, bases and stores: the worker wants room for a base (512 MiB) free.
mount -t tmpfs -o mode=1777,size=2G tmpfs /var/tmp
mountpoint -q /dev || mount -t devtmpfs dev /dev
# overlayfs and loop are modules in Debian's UML kernel (built in when scripts/uml/kernel
# built one).
if ! grep -qw overlay /proc/filesystems; then
    modules=/usr/lib/uml/modules/$(uname -r)/kernel
    insmod "$modules/fs/overlayfs/overlay.ko"
    insmod "$modules/drivers/block/loop.ko"
fi
# A pure v2 hierarchy where a distribution mounts it; the root hands every controller down,
# as systemd's does.
mount -t cgroup2 cgroup2 /sys/fs/cgroup
echo "+memory +pids +cpu +io" > /sys/fs/cgroup/cgroup.subtree_control
hostname corral-v2
ip link set lo up
if [ -n "$CORRAL_V2_NET" ]; then
    ip addr add "$CORRAL_V2_NET" dev eth0 && ip link set eth0 up
fi
# Read once here, not passed on: corral warns about CORRAL_* variables it does not know.
plan=$CORRAL_V2_PLAN
unset CORRAL_V2_PLAN CORRAL_V2_NET
python3 "$(dirname "$0")/guest.py" "$plan"
echo "@@ guest exit $?"
# Then systemd as pid 1 (it replaces this script) for the shipped unit's check; it needs
# the broker and the base the worker run above imported.
if [ -n "$(ip -o addr show dev eth0 2>/dev/null)" ]; then
    if "$(dirname "$0")/boot-systemd.sh" "$plan"; then
        cd /run/sd/root && pivot_root . oldroot &&
            exec chroot . /lib/systemd/systemd --system --unit=corral-v2-check.target
    fi
    echo "@@ FAIL systemd:boot: preparing systemd's root failed"
fi
poweroff -f
