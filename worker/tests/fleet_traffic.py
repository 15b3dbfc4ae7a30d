#!/usr/bin/env python3
"""The fleet test's independent client of the broker cluster and the registry, with pika and
the standard library only (nothing of corral's own code).

    fleet_traffic.py publish URLS PREFIX JOBS.jsonl
        Declares a durable quorum queue PREFIX.fleet.results bound to the results exchange
        (so no result is missed while the collector reconnects), then publishes every job
        of JOBS.jsonl to PREFIX.jobs (key = its pool) with publisher confirms, mandatory and
        persistent, and prints `published N`.

    fleet_traffic.py collect URLS PREFIX N OUT.jsonl TIMEOUT_SECONDS
        Consumes PREFIX.fleet.results and appends one line per result publish to OUT.jsonl:
        {"at_ms", "redelivered", "delivery_count", "result"}. A message the collector itself
        got twice (its own ack lost in a fault) has the very same bytes and is written once.
        Stops once N distinct jobs have results and nothing came for 5 s, or at the timeout
        (exit 1). Reconnects to the next node of URLS on any connection failure. After 10 s
        without a message while results are missing it consumes on a fresh connection (it has
        acked all it got): a quorum queue whose leader died may count deliveries that never
        reached the consumer as held by it until its channel closes.

    fleet_traffic.py verify REGISTRY REPO DIGESTS.txt
        For every manifest digest: the manifest's bytes hash to it, and every blob it names
        (config, layers) exists and hashes to its digest. Prints `manifests M blobs B corrupt C`
        and one line per problem.

URLS is a space-separated list of amqp:// URLs, tried in turn.
"""
import hashlib
import json
import sys
import time
import urllib.error
import urllib.request

import pika


def params(urls):
    return [pika.URLParameters(u + ("&" if "?" in u else "?") + "heartbeat=10&blocked_connection_timeout=30")
            for u in urls.split()]


def connect(urls, start=0):
    ps = params(urls)
    last = None
    for i in range(len(ps) * 20):
        p = ps[(start + i) % len(ps)]
        try:
            return pika.BlockingConnection(p), (start + i) % len(ps)
        except Exception as e:  # noqa: BLE001 - any failure means: try the next node
            last = e
            time.sleep(0.5)
    raise SystemExit(f"no broker node reachable: {last}")


def publish(urls, prefix, jobs_file):
    with open(jobs_file) as f:
        jobs = [line for line in f if line.strip()]
    conn, _ = connect(urls)
    ch = conn.channel()
    results = f"{prefix}.fleet.results"
    ch.queue_declare(results, durable=True, arguments={"x-queue-type": "quorum"})
    ch.queue_bind(results, f"{prefix}.results", "#")
    ch.confirm_delivery()
    for line in jobs:
        job = json.loads(line)
        ch.basic_publish(
            f"{prefix}.jobs",
            job["pool"],
            line.encode(),
            pika.BasicProperties(delivery_mode=2, content_type="application/json"),
            mandatory=True,
        )
    conn.close()
    print(f"published {len(jobs)}", flush=True)


def collect(urls, prefix, want, out_file, timeout):
    deadline = time.monotonic() + timeout
    seen_bodies = set()
    jobs = set()
    last_new = time.monotonic()
    node = 0
    with open(out_file, "a") as out:
        while True:
            if time.monotonic() > deadline:
                print(f"timeout: {len(jobs)} of {want} jobs have results", flush=True)
                sys.exit(1)
            try:
                conn, node = connect(urls, node)
                ch = conn.channel()
                ch.basic_qos(prefetch_count=200)
                last_msg = time.monotonic()
                for method, props, body in ch.consume(f"{prefix}.fleet.results", inactivity_timeout=0.5):
                    if method is None and len(jobs) < want and time.monotonic() - last_msg > 10:
                        print(f"collector: nothing for 10 s with {len(jobs)} of {want}; consuming afresh", flush=True)
                        conn.close()
                        break
                    if method is not None:
                        last_msg = time.monotonic()
                        digest = hashlib.sha256(body).hexdigest()
                        if digest not in seen_bodies:
                            seen_bodies.add(digest)
                            headers = props.headers or {}
                            result = json.loads(body)
                            out.write(json.dumps({
                                "at_ms": int(time.time() * 1000),
                                "redelivered": bool(headers.get("corral-redelivered", False)),
                                "delivery_count": int(headers.get("corral-delivery-count", 0)),
                                "result": result,
                            }) + "\n")
                            out.flush()
                            if result["job_id"] not in jobs:
                                jobs.add(result["job_id"])
                                last_new = time.monotonic()
                        ch.basic_ack(method.delivery_tag)
                    if len(jobs) >= want and time.monotonic() - last_new > 5:
                        conn.close()
                        print(f"collected {len(jobs)}", flush=True)
                        return
                    if time.monotonic() > deadline:
                        break
            except (pika.exceptions.AMQPError, OSError) as e:
                print(f"collector: node {node + 1} failed ({e!r}); next node", flush=True)
                node = (node + 1) % len(urls.split())
                time.sleep(0.5)


def fetch(registry, repo, kind, digest, accept=None):
    """The sha256 of what the registry serves for DIGEST, and the bytes of a manifest
    (blobs are hashed as they stream, never held)."""
    req = urllib.request.Request(f"http://{registry}/v2/{repo}/{kind}/{digest}")
    if accept:
        req.add_header("Accept", accept)
    h = hashlib.sha256()
    kept = []
    with urllib.request.urlopen(req, timeout=60) as r:
        while chunk := r.read(1 << 20):
            h.update(chunk)
            if kind == "manifests":
                kept.append(chunk)
    return "sha256:" + h.hexdigest(), b"".join(kept)


def verify(registry, repo, digests_file):
    accept = ",".join([
        "application/vnd.oci.image.manifest.v1+json",
        "application/vnd.docker.distribution.manifest.v2+json",
    ])
    with open(digests_file) as f:
        manifests = sorted({line.strip() for line in f if line.strip()})
    blobs = {}
    corrupt = 0
    for m in manifests:
        try:
            got, body = fetch(registry, repo, "manifests", m, accept)
        except urllib.error.HTTPError as e:
            print(f"manifest {m}: HTTP {e.code}")
            corrupt += 1
            continue
        if got != m:
            print(f"manifest {m}: bytes hash to {got}")
            corrupt += 1
            continue
        manifest = json.loads(body)
        for d in [manifest["config"]] + manifest["layers"]:
            blobs.setdefault(d["digest"], d.get("size"))
    for digest, size in sorted(blobs.items()):
        try:
            got, _ = fetch(registry, repo, "blobs", digest)
        except urllib.error.HTTPError as e:
            print(f"blob {digest}: HTTP {e.code}")
            corrupt += 1
            continue
        if got != digest:
            print(f"blob {digest}: bytes hash to {got}")
            corrupt += 1
    print(f"manifests {len(manifests)} blobs {len(blobs)} corrupt {corrupt}", flush=True)


def main():
    cmd = sys.argv[1]
    if cmd == "publish":
        publish(sys.argv[2], sys.argv[3], sys.argv[4])
    elif cmd == "collect":
        collect(sys.argv[2], sys.argv[3], int(sys.argv[4]), sys.argv[5], float(sys.argv[6]))
    elif cmd == "verify":
        verify(sys.argv[2], sys.argv[3], sys.argv[4])
    else:
        raise SystemExit(f"unknown command {cmd}")


if __name__ == "__main__":
    main()
