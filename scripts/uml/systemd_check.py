"""scripts/test-v2's check of the shipped unit under systemd as pid 1 on cgroup v2.

Runs as a oneshot service of the guest's systemd (see boot-systemd.sh): starts
corral-worker@sd.service as shipped (Delegate=yes, Type=notify), checks that the worker
moved itself into a leaf of the unit's delegated cgroup and builds its jobs' cgroups beside
that leaf, then stops the unit while a build runs and checks the build was drained to its
result and no build cgroup is left. Prints `@@ PASS name` / `@@ FAIL name: why` on the
console for scripts/test-v2 to count; the service's end powers the guest off.
"""

import json
import pathlib
import subprocess
import sys
import time

PLAN = json.loads(pathlib.Path(sys.argv[1]).read_text())
REPO = pathlib.Path(PLAN["repo"])
CORRAL = "/usr/local/bin/corral"
UNIT = "corral-worker@sd.service"
PREFIX = PLAN["prefix"] + "sd"
DATA = pathlib.Path("/var/lib/corral")
failed = 0


def report(name, why):
    global failed
    if why:
        failed += 1
        print(f"@@ FAIL {name}: {why}", flush=True)
    else:
        print(f"@@ PASS {name}", flush=True)


def sh(*args, timeout=300):
    return subprocess.run(args, capture_output=True, text=True, timeout=timeout)


def journal():
    return sh("journalctl", "-u", UNIT, "--no-pager", "-n", "40").stdout


def unit_cgroup():
    path = sh("systemctl", "show", "-P", "ControlGroup", UNIT).stdout.strip()
    return pathlib.Path("/sys/fs/cgroup" + path) if path else None


def job_cgroups(cg):
    return sorted(p.name for p in cg.glob("job-*")) if cg and cg.is_dir() else []


def populated(cgroup):
    try:
        return "populated 1" in (cgroup / "cgroup.events").read_text()
    except OSError:
        return False


def running_builds(cg):
    """Job cgroups with a process in them: the worker also keeps empty spares made ahead."""
    return [name for name in job_cgroups(cg) if populated(cg / name)]


def submit(job_id, command):
    job = json.loads((REPO / "fixtures/jobs/hello.json").read_text())
    job["job_id"] = job_id
    job["command"] = command
    path = pathlib.Path(f"/run/{job_id}.json")
    path.write_text(json.dumps(job))
    return subprocess.Popen(
        [CORRAL, "submit", str(path), "--wait", "--timeout", "3m", "--amqp-url",
         PLAN["amqp_url"], "--prefix", PREFIX, "--store", f"oci-dir:{DATA}/store",
         "--source", "fixtures/bundles/hello"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def result_of(proc):
    out, err = proc.communicate(timeout=300)
    try:
        return json.loads(out), err
    except ValueError:
        return None, err


def start():
    if not (DATA / "bases").is_dir():
        return f"no imported base in {DATA} (the delegated work run must come first)"
    names = "\n".join(
        f'{key} = "{PREFIX}.{value}"'
        for key, value in [
            ("jobs_exchange", "jobs"), ("jobs_queue", "jobs.default"),
            ("dead_letter_exchange", "dead"), ("dead_letter_queue", "jobs.dead"),
            ("results_exchange", "results"), ("events_exchange", "events"),
            ("logs_exchange", "logs"), ("control_exchange", "control"),
        ])
    pathlib.Path("/etc/corral/worker.toml").write_text(
        f'data_dir = "{DATA}"\nconcurrency = 1\ndrain_deadline_seconds = 120\n\n'
        f'[amqp]\nurl = "{PLAN["amqp_url"]}"\npassword = "guest"\npool = "default"\n{names}\n\n'
        "[sandbox]\nuid_start = 231000\ngid_start = 231000\nid_count = 1000\n")
    pathlib.Path("/etc/corral/worker.env").write_text(
        "CORRAL_REQUIRE_CGROUP=v2\nRUST_LOG=warn,lapin=error\n")
    out = sh("systemctl", "start", UNIT, timeout=200)
    if out.returncode != 0:
        return f"systemctl start: {out.returncode} {out.stderr}\n{journal()}"
    return ""


def delegated():
    cg = unit_cgroup()
    if not cg or not cg.is_dir():
        return f"no cgroup for {UNIT}: {cg}"
    main = sh("systemctl", "show", "-P", "MainPID", UNIT).stdout.strip()
    leaf = (cg / "worker" / "cgroup.procs")
    if not leaf.exists() or main not in leaf.read_text().split():
        return f"the worker ({main}) is not in {leaf}"
    if (cg / "cgroup.procs").read_text().strip():
        return f"processes in the delegated cgroup itself: {(cg / 'cgroup.procs').read_text()}"
    enabled = set((cg / "cgroup.subtree_control").read_text().split())
    if not {"memory", "pids", "cpu"} <= enabled:
        return f"controllers the worker enabled in {cg}: {enabled}"
    print(f"   {UNIT}: cgroup {cg}, worker in its leaf, subtree_control {sorted(enabled)}",
          flush=True)
    return ""


def builds_below_the_unit():
    cg = unit_cgroup()
    seen = set()
    # A command of its own: the same job as the worker run before built is in the action
    # cache, and would be answered without a build.
    hello = submit("sd-hello", ["sh", "-c", "sh /app/build.sh && echo built under systemd"])
    while hello.poll() is None:
        seen.update(running_builds(cg))
        time.sleep(0.05)
    result, err = result_of(hello)
    if not result or result.get("status") != "succeeded":
        return f"hello: {result} {err}\n{journal()}"
    if not seen:
        return f"no build cgroup was seen under {cg}"
    print(f"   build cgroups seen under {cg}: {sorted(seen)}", flush=True)
    return ""


def stop_drains():
    cg = unit_cgroup()
    slow = submit("sd-slow", ["sh", "-c", "sleep 4; echo drained > /app/drained"])
    deadline = time.monotonic() + 120
    while not running_builds(cg) and time.monotonic() < deadline and slow.poll() is None:
        time.sleep(0.02)
    if not running_builds(cg):
        return f"the build never started: {slow.poll()}\n{journal()}"
    stop = sh("systemctl", "stop", UNIT, timeout=400)
    if stop.returncode != 0:
        return f"systemctl stop: {stop.returncode} {stop.stderr}"
    result, err = result_of(slow)
    if not result or result.get("status") != "succeeded":
        return f"the build running at the stop was not drained to its end: {result} {err}"
    state = sh("systemctl", "show", "-P", "ActiveState", UNIT).stdout.strip()
    if state != "inactive":
        return f"{UNIT} is {state} after the stop\n{journal()}"
    left = job_cgroups(cg)
    if left:
        return f"build cgroups left after the stop: {left}"
    if cg.exists() and any(p.is_dir() for p in cg.iterdir()):
        return f"cgroups left below {cg}: {[p.name for p in cg.iterdir() if p.is_dir()]}"
    return ""


why = start()
report("systemd:start", why)
if not why:
    report("systemd:delegated-subtree", delegated())
    report("systemd:builds-below-the-unit", builds_below_the_unit())
    report("systemd:stop-drains-and-leaves-no-cgroup", stop_drains())
print(f"@@ SYSTEMD {'failed' if failed else 'passed'}", flush=True)
sys.exit(1 if failed else 0)
