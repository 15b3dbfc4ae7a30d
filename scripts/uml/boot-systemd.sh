#!/bin/sh
# The second stage of scripts/test-v2's guest: systemd as pid 1, running the shipped
# corral-worker@.service (Delegate=yes) and scripts/uml/systemd_check.py against it.
# Called by init.sh once guest.py is done, to prepare systemd's root at /run/sd/root; init.sh
# (pid 1) then pivots into it and execs systemd, which so becomes pid 1.
#
# The guest's / is the host's / through hostfs, and systemd would write to it (and start the
# host's own services). So systemd gets an overlay of it instead, whose writes go to a tmpfs:
# lower = the host's tree, upper = guest memory. Only what the check needs is set up in it:
# a target that pulls the check and nothing else, the shipped unit as it is, the corral
# binaries where the unit runs them, and the worker's data dir (with the base guest.py
# imported) bound where the unit's StateDirectory is.
set -eu
plan=$1
repo=$(cd "$(dirname "$0")/../.." && pwd)
corral=$(python3 -c 'import json,sys; print(json.load(open(sys.argv[1]))["corral"])' "$plan")
mkdir -p /run/sd/upper /run/sd/work /run/sd/root
mount -t overlay overlay \
    -o lowerdir=/,upperdir=/run/sd/upper,workdir=/run/sd/work,redirect_dir=off,metacopy=off,index=off,xino=off \
    /run/sd/root
R=/run/sd/root
units=$R/etc/systemd/system
mkdir -p "$units" "$R/usr/local/bin" "$R/var/lib/corral" "$R/etc/corral" "$R/oldroot"
cp "$repo/deploy/systemd/corral-worker@.service" "$repo/deploy/systemd/corral-workers.target" "$units/"
ln -sf "$corral" "$R/usr/local/bin/corral"
ln -sf "$corral-worker" "$R/usr/local/bin/corral-worker"
# The host's network-online units would wait for interfaces the guest does not have.
ln -sf /dev/null "$units/network-online.target"
cat > "$units/corral-v2-check.target" <<UNIT
[Unit]
Description=corral cgroup v2 check under systemd
Requires=corral-v2-check.service
After=corral-v2-check.service
Wants=systemd-journald.socket
AllowIsolate=yes
UNIT
cat > "$units/corral-v2-check.service" <<UNIT
[Unit]
Description=corral-worker@.service under systemd on cgroup v2
DefaultDependencies=no
SuccessAction=poweroff-force
FailureAction=poweroff-force

After=systemd-journald.socket

[Service]
Type=oneshot
StandardOutput=tty
StandardError=tty
TTYPath=/dev/console
WorkingDirectory=$repo
ExecStart=/usr/bin/python3 $repo/scripts/uml/systemd_check.py $plan
UNIT
# /tmp and /var/tmp of their own, as a distribution's tmp.mount gives: the unit's PrivateTmp
# makes its /tmp there, and the worker's start-up check mounts a test overlay in it (an
# overlay's upper cannot be on the overlay that is systemd's root).
mount -t tmpfs -o mode=1777 tmpfs "$R/tmp"
mount -t tmpfs -o mode=1777 tmpfs "$R/var/tmp"
# What the worker run of guest.py left: the base and the store, in guest memory.
if [ -d /var/tmp/corral-v2-work ]; then
    mount --bind /var/tmp/corral-v2-work "$R/var/lib/corral"
fi
