#!/usr/bin/env python3
"""Produce round-trip latency, one message at a time (confluent-kafka, acks=1, linger 0): each
message is produced and flushed (its delivery report received) before the next is sent.
usage: latency.py BOOTSTRAP TOPIC N [SIZE]  ->  one line: n=.. p50_ms=.. p99_ms=.. max_ms=.. failed=..
"""
import sys
import time
from confluent_kafka import Producer

boot, topic, n = sys.argv[1], sys.argv[2], int(sys.argv[3])
size = int(sys.argv[4]) if len(sys.argv) > 4 else 100
p = Producer({"bootstrap.servers": boot, "acks": "1", "linger.ms": 0, "enable.idempotence": False,
              "socket.nagle.disable": True, "message.timeout.ms": 5000})
failed = [0]


def cb(e, m):
    if e is not None:
        failed[0] += 1


payload = b"x" * size
lat = []
for i in range(n + 100):  # the first 100 warm up (metadata, connection) and are not counted
    t0 = time.perf_counter()
    p.produce(topic, payload, on_delivery=cb)
    if p.flush(5) != 0:
        failed[0] += 1
    if i >= 100:
        lat.append((time.perf_counter() - t0) * 1000)
lat.sort()
q = lambda x: lat[min(len(lat) - 1, int(x * len(lat)))]
print(f"n={len(lat)} p50_ms={q(0.5):.3f} p99_ms={q(0.99):.3f} max_ms={lat[-1]:.3f} failed={failed[0]}")
