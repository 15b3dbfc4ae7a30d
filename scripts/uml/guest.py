"""The checks scripts/test-v2 runs inside its user-mode Linux guest (pure cgroup v2).

Each check prints `@@ PASS name` or `@@ FAIL name: why` on the console; scripts/test-v2
counts them. `@@ USAGE name {json}` lines carry accounting figures the host compares with
the same job on its own (v1) hierarchy. Everything is written below /tmp, /run or /var/tmp,
which the guest's init mounted as tmpfs: the rest of / is the host's own tree.
"""

import io
import json
import os
import pathlib
import signal
import subprocess
import sys
import tempfile
import time

PLAN = json.loads(pathlib.Path(sys.argv[1]).read_text())
REPO = pathlib.Path(PLAN["repo"])
CORRAL = PLAN["corral"]
ROOTFS = PLAN["rootfs"]
CGROUP = pathlib.Path("/sys/fs/cgroup")

os.chdir(REPO)
os.environ.update(
    {
        "CI": "true",
        "CORRAL_REQUIRE_CGROUP": "v2",
        "CORRAL_TEST_ROOTFS": ROOTFS,
        "RUST_LOG": "warn,lapin=error",
        "RUST_BACKTRACE": "1",
    }
)
results = []


def report(name, ok, why=""):
    results.append(ok)
    line = f"@@ {'PASS' if ok else 'FAIL'} {name}" + ("" if ok else f": {why}")
    print(line, flush=True)


def check(name, fn):
    started = time.monotonic()
    try:
        why = fn()
    except Exception as err:  # a check that crashes has failed, with its reason
        why = f"{type(err).__name__}: {err}"
    print(f"   ({name}: {time.monotonic() - started:.1f} s)", flush=True)
    report(name, not why, why or "")


def run(args, timeout=600, **kw):
    return subprocess.run(args, capture_output=True, text=True, timeout=timeout, **kw)


def tail(text, n=30):
    return "\n".join(text.splitlines()[-n:])


# --- 1. The required version is enforced, and what was found is named. ---------------------
def required_version():
    wrong = run(
        [CORRAL, "sandbox", "--rootfs", ROOTFS, "--", "true"],
        env={**os.environ, "CORRAL_REQUIRE_CGROUP": "v1"},
    )
    said = wrong.stdout + wrong.stderr
    if wrong.returncode == 0:
        return f"CORRAL_REQUIRE_CGROUP=v1 on a v2 host ran the job: {said}"
    if "CORRAL_REQUIRE_CGROUP=v1 but this host offers cgroup v2 (unified) at /sys/fs/cgroup" not in said:
        return f"the refusal does not name what was found: {said}"
    right = run([CORRAL, "sandbox", "--rootfs", ROOTFS, "--", "true"])
    if right.returncode != 0:
        return f"CORRAL_REQUIRE_CGROUP=v2 refused a v2 host: {right.stdout}{right.stderr}"
    return ""


# --- 2. The sandbox test set: crate unit tests, and the real-kernel integration tests. -------
def test_binary(path, *extra):
    def go():
        out = run([path, *extra], timeout=900)
        print(tail(out.stdout + out.stderr, 40), flush=True)
        return "" if out.returncode == 0 else f"exit {out.returncode}"

    return go


# --- 3. Abuse fixtures through `corral sandbox` (the CLI a developer runs). ------------------
ABUSE = ["memory_hog", "fork_bomb_processes", "fork_bomb_threads", "cpu_spin", "wall_sleep", "disk_fill"]


def sandbox_args(case, jobs_dir):
    limits = case.get("limits", {})
    args = [CORRAL, "sandbox", "--rootfs", ROOTFS, "--quiet"]
    args += ["--bind", f"{REPO}/fixtures/abuse/probes:/probes"]
    args += ["--memory", limits.get("memory", "512MiB"), "--pids", str(limits.get("pids", 128))]
    args += ["--cpus", str(limits.get("cpus", 1.0)), "--wall", str(limits.get("wall_secs", 30))]
    if "cpu_seconds" in limits:
        args += ["--cpu-seconds", str(limits["cpu_seconds"])]
    if "disk" in limits:
        args += ["--disk", limits["disk"], "--disk-dir", jobs_dir]
    if "cwd" in case:
        args += ["--cwd", case["cwd"]]
    for key, value in case.get("env", {}).items():
        args += ["--env", f"{key}={value}"]
    return args + ["--"] + case["argv"]


def abuse(name):
    def go():
        case = json.loads((REPO / "fixtures/abuse" / f"{name}.json").read_text())
        with tempfile.TemporaryDirectory(dir="/var/tmp") as jobs:
            out = run(sandbox_args(case, jobs), timeout=120)
        try:
            outcome = json.loads(out.stdout.strip().splitlines()[-1])
        except (IndexError, ValueError):
            return f"no outcome (exit {out.returncode}): {out.stdout} {out.stderr}"
        want = case["expect"]
        if outcome["reason"] != want["reason"]:
            return f"reason {outcome['reason']}, expected {want['reason']}: {outcome}"
        exit_want = want.get("exit")
        if isinstance(exit_want, dict) and outcome["exit"] != exit_want:
            return f"exit {outcome['exit']}, expected {exit_want}"
        if exit_want == "nonzero" and outcome["exit"] == {"code": 0}:
            return f"exit 0, expected a failure: {outcome}"
        if out.returncode != 1:
            return f"corral sandbox exited {out.returncode} for a failed job, expected 1"
        if name == "memory_hog" and not 0 < outcome["usage"]["memory_peak"] <= 64 << 20:
            return f"memory peak {outcome['usage']['memory_peak']} outside (0, 64 MiB]"
        if name == "fork_bomb_processes" and not 0 < outcome["usage"]["pids_peak"] <= 32:
            return f"pids peak {outcome['usage']['pids_peak']} outside (0, 32]"
        return ""

    return go


# --- 4. Fixture jobs through `corral replay` (the whole pipeline). ---------------------------
REPLAY = ["hello", "fail", "oom", "forkbomb", "timeout"]
DATA = pathlib.Path("/var/tmp/corral-v2-data")


def import_base():
    tarball = "/var/tmp/rootfs.tar"
    tar = run(["tar", "-C", ROOTFS, "--numeric-owner", "-cf", tarball, "."])
    if tar.returncode != 0:
        return tar.stderr
    out = run([CORRAL, "base", "import", "python-3.11", tarball, "--data-dir", str(DATA)])
    os.unlink(tarball)
    return "" if out.returncode == 0 else out.stderr


def replay(name):
    def go():
        job = f"fixtures/jobs/{name}.json"
        out = run([CORRAL, "replay", job, "--json", "--no-cache", "--data-dir", str(DATA)], timeout=300)
        try:
            result = json.loads(out.stdout)
        except ValueError:
            return f"no JSON result (exit {out.returncode}): {tail(out.stderr)}"
        expect = json.loads((REPO / f"fixtures/jobs/{name}.expect.json").read_text())
        # The same reading of an .expect.json as worker/tests/replay.rs.
        for key in ["status", "reason", "exit_code"]:
            if key in expect and result.get(key) != expect[key]:
                return f"{key} = {result.get(key)!r}, expected {expect[key]!r}: {result}"
        want_code = 0 if expect["status"] == "succeeded" else 1
        if out.returncode != want_code:
            return f"corral replay exited {out.returncode}, expected {want_code}"
        for key in ["stdout_contains", "stderr_contains"]:
            # With --json the build's output goes to stderr.
            if key in expect and expect[key] not in out.stderr:
                return f"output lacks {expect[key]!r}: {tail(out.stderr)}"
        if result["status"] == "succeeded":
            layers = result["artifact"]["layers"]
            if len(layers) != 3:
                return f"{len(layers)} layers, expected base, source, build"
            blob = DATA / "store/blobs/sha256" / layers[2]["digest"].removeprefix("sha256:")
            names = [n.rstrip("/") for n in run(["tar", "-tzf", str(blob)]).stdout.splitlines()]
            for want in expect.get("layer_has", []):
                if want not in names:
                    return f"build layer lacks {want}: {names}"
        left = [p.name for p in CGROUP.joinpath("corral").glob("job-*")]
        return f"build cgroups left: {left}" if left else ""

    return go


# --- 5. `corral work` end to end, under a delegated subtree made the way systemd makes it. ---
SERVICE = CGROUP / "system.slice" / "corral-worker@v2.service"


def delegate():
    """What systemd does for a unit with Delegate=yes: the slice above hands the unit every
    controller (its subtree_control), the unit's cgroup is the worker's to manage, and the
    worker is started inside it."""
    slice_ = SERVICE.parent
    slice_.mkdir(exist_ok=True)
    (slice_ / "cgroup.subtree_control").write_text("+memory +pids +cpu +io")
    SERVICE.mkdir(exist_ok=True)


def job_cgroups():
    return sorted(p.name for p in SERVICE.glob("job-*"))


def running_builds():
    """Job cgroups with a process in them: the worker also keeps empty spares made ahead."""
    def populated(name):
        try:
            return "populated 1" in (SERVICE / name / "cgroup.events").read_text()
        except OSError:
            return False
    return [name for name in job_cgroups() if populated(name)]


class Finished:
    """A submit that ended at once, with what it printed, as the callers read a Popen."""

    def __init__(self, code, out, err):
        self.returncode, self.stdout, self.stderr = code, io.StringIO(out), io.StringIO(err)

    def poll(self):
        return self.returncode

    def communicate(self, timeout=None):
        return self.stdout.read(), self.stderr.read()


def work():
    prefix = PLAN["prefix"]
    # The worker checks for room for a base before it starts: the replay data goes first.
    subprocess.run(["rm", "-rf", str(DATA)], check=True)
    data = pathlib.Path("/var/tmp/corral-v2-work")
    data.mkdir()
    # The base: the same import as for replay, into the worker's own data dir.
    tarball = "/var/tmp/rootfs-work.tar"
    run(["tar", "-C", ROOTFS, "--numeric-owner", "-cf", tarball, "."])
    out = run([CORRAL, "base", "import", "python-3.11", tarball, "--data-dir", str(data)])
    os.unlink(tarball)
    if out.returncode != 0:
        return f"base import: {out.stderr}"
    config = data / "worker.toml"
    names = "\n".join(
        f'{key} = "{prefix}.{value}"'
        for key, value in [
            ("jobs_exchange", "jobs"),
            ("jobs_queue", "jobs.default"),
            ("dead_letter_exchange", "dead"),
            ("dead_letter_queue", "jobs.dead"),
            ("results_exchange", "results"),
            ("events_exchange", "events"),
            ("logs_exchange", "logs"),
            ("control_exchange", "control"),
        ]
    )
    # No sandbox.cgroup_parent: the worker's own (delegated) cgroup, as under systemd.
    config.write_text(
        f'data_dir = "{data}"\nconcurrency = 1\n\n[amqp]\nurl = "{PLAN["amqp_url"]}"\n'
        f'password = "guest"\npool = "default"\n{names}\n\n'
        "[sandbox]\nuid_start = 230000\ngid_start = 230000\nid_count = 1000\n"
    )
    delegate()
    log = open(data / "worker.log", "w")
    worker = subprocess.Popen(
        ["sh", "-c", f'echo $$ > {SERVICE}/cgroup.procs && exec {CORRAL} work --config {config}'],
        stdout=subprocess.DEVNULL,
        stderr=log,
    )
    store = f"oci-dir:{data}/store"

    seen = set()

    def submit(job, bundle):
        # The worker moves into its leaf before it declares its queue, and a submit to a pool
        # without one is refused at once: tried again until the queue is there.
        deadline = time.monotonic() + 60
        while True:
            proc = start_submit(job, bundle)
            # Build cgroups that come and go meanwhile are seen too.
            until = time.monotonic() + 3
            while proc.poll() is None and time.monotonic() < until:
                seen.update(running_builds())
                time.sleep(0.02)
            if proc.poll() is None:
                return proc
            out, err = proc.communicate()
            if "no queue is bound" not in err or time.monotonic() > deadline:
                return Finished(proc.returncode, out, err)
            time.sleep(0.2)

    def start_submit(job, bundle):
        return subprocess.Popen(
            [CORRAL, "submit", job, "--wait", "--timeout", "5m", "--amqp-url", PLAN["amqp_url"],
             "--prefix", prefix, "--store", store, "--source", f"fixtures/bundles/{bundle}"],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )

    def worker_log():
        return tail((data / "worker.log").read_text())

    try:
        # The worker moved itself into a leaf before making build cgroups beside it.
        deadline = time.monotonic() + 60
        while not (SERVICE / "worker").is_dir() and time.monotonic() < deadline:
            time.sleep(0.2)
        leaf = (SERVICE / "worker" / "cgroup.procs").read_text().split()
        if str(worker.pid) not in leaf:
            return f"the worker ({worker.pid}) is not in its leaf: {leaf}\n{worker_log()}"
        if (SERVICE / "cgroup.procs").read_text().strip():
            return "processes left in the delegated cgroup itself (no internal processes)"
        hello = submit("fixtures/jobs/hello.json", "hello")
        while hello.poll() is None:
            seen.update(running_builds())
            time.sleep(0.05)
        result = json.loads(hello.stdout.read() or "null")
        if not result or result.get("status") != "succeeded":
            return f"hello: {result} {hello.stderr.read()}\n{worker_log()}"
        if not seen:
            return f"no build cgroup was seen under {SERVICE}\n{worker_log()}"
        enabled = (SERVICE / "cgroup.subtree_control").read_text().split()
        if not {"memory", "pids", "cpu"} <= set(enabled):
            return f"controllers not enabled in the delegated cgroup: {enabled}"
        # A stop while a build runs: the worker drains (the build finishes, its result is
        # published) and no build cgroup is left behind.
        slow = submit("fixtures/jobs/hello.json", "hello")
        deadline = time.monotonic() + 60
        while not running_builds() and time.monotonic() < deadline and slow.poll() is None:
            time.sleep(0.02)
        worker.send_signal(signal.SIGTERM)
        code = worker.wait(timeout=120)
        slow_out, slow_err = slow.communicate(timeout=120)
        if code != 0:
            return f"the worker exited {code} on SIGTERM\n{worker_log()}"
        if "names no config key" in (data / "worker.log").read_text():
            return f"the worker warned of a CORRAL_* variable it reads:\n{worker_log()}"
        left = job_cgroups()
        if left:
            return f"build cgroups left after the stop: {left}"
        slow_result = json.loads(slow_out or "null")
        if not slow_result or slow_result.get("status") != "succeeded":
            return f"the build running at the stop was not drained to its end: {slow_out} {slow_err}"
        print(f"   build cgroups seen under {SERVICE}: {sorted(seen)}", flush=True)
        return ""
    finally:
        if worker.poll() is None:
            worker.kill()
            worker.wait()


# --- 6. Accounting figures of fixed jobs, for the host to compare with v1. ------------------
def accounting(name):
    def go():
        with tempfile.TemporaryDirectory(dir="/var/tmp") as jobs:
            args = [a.replace("@JOBS@", jobs) for a in PLAN["accounting"][name]]
            out = run([CORRAL, *args], timeout=300)
        if out.returncode != 0:
            return f"exit {out.returncode}: {out.stdout} {out.stderr}"
        outcome = json.loads(out.stdout.strip().splitlines()[-1])
        print(f"@@ USAGE {name} {json.dumps(outcome['usage'])}", flush=True)
        return ""

    return go


check("require-cgroup", required_version)
check("sandbox-unit-tests", test_binary(PLAN["sandbox_unit"]))
check("sandbox-integration-tests", test_binary(PLAN["sandbox_it"], "--include-ignored"))
for name in ABUSE:
    check(f"sandbox-cli:{name}", abuse(name))
base = import_base()
report("replay:base-import", not base, base)
if not base:
    for name in REPLAY:
        check(f"replay:{name}", replay(name))
if PLAN.get("amqp_url"):
    check("work:delegated-end-to-end", work)
else:
    report("work:delegated-end-to-end", False, "no broker reachable from the guest")
for name in PLAN["accounting"]:
    check(f"accounting:{name}", accounting(name))
print(f"@@ DONE {sum(results)} passed, {len(results) - sum(results)} failed", flush=True)
sys.exit(0 if all(results) else 1)
