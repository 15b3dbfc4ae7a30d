#!/usr/bin/env python3
"""Independent result collector for the AMQP tests: binds an exclusive queue to a results
exchange (key `#`), prints `ready`, then prints each result message body on one line until
it has seen N distinct job ids (then exits 0) or the timeout passes (exits 1).

    pika_collect.py AMQP_URL RESULTS_EXCHANGE N [TIMEOUT_SECONDS]
"""
import json
import sys
import time

import pika


def main():
    url, exchange, want = sys.argv[1], sys.argv[2], int(sys.argv[3])
    timeout = float(sys.argv[4]) if len(sys.argv) > 4 else 120.0
    conn = pika.BlockingConnection(pika.URLParameters(url))
    ch = conn.channel()
    ch.exchange_declare(exchange, "topic", durable=True)
    queue = ch.queue_declare("", exclusive=True, auto_delete=True).method.queue
    ch.queue_bind(queue, exchange, "#")
    print("ready", flush=True)
    seen = set()
    deadline = time.monotonic() + timeout
    for method, props, body in ch.consume(queue, auto_ack=False, inactivity_timeout=0.5):
        if method is not None:
            result = json.loads(body)
            assert props.message_id == result["job_id"], (props.message_id, result["job_id"])
            assert props.correlation_id == result["job_id"]
            assert props.delivery_mode == 2, "results must be persistent"
            print(json.dumps(result), flush=True)
            seen.add(result["job_id"])
            ch.basic_ack(method.delivery_tag)
        if len(seen) >= want:
            break
        if time.monotonic() > deadline:
            conn.close()
            sys.exit(1)
    conn.close()


if __name__ == "__main__":
    main()
