#!/usr/bin/env python3
"""Real Kafka clients for tollgate's Kafka tests: one scenario per run, ONE JSON object on stdout
with what the client actually observed (counts, Kafka error names, exception class names).

usage: clients.py SCENARIO --bootstrap HOST:PORT [--client confluent|aiokafka|kafka-python|kcat] ...

scenarios (clients):
  create-topics  --topics a,b [--partitions P]                      (confluent admin)
  produce        --topic T --n N                                    (all four)
  consume        --topic T --n N [--group G] [--read-committed]     (all four; no --group = no
                                                                     consumer group, partitions assigned)
  mixed-produce  --allowed T --denied T --n N                       (confluent, aiokafka, kafka-python;
                 N to each, interleaved, on one producer, then N more to the allowed topic)
  group          --topic T --group G --n N                          (join, consume N, commit, read the
                                                                     committed offsets back; all four)
  idempotent     --topic T --n N                                    (all four; enable.idempotence)
  transactional  --topic T --txn-id X --n N                         (all four; init/begin/commit)
  raw            [--steps apiversions:127,apiversions:3,metadata:12:T2,metadata:127] [--topic T]
                 (plain socket, no library: each step is one request on ONE connection; a
                 step after the connection closed is reported "not sent")

Every wait is bounded by --timeout (seconds, default 5); the whole run by a SIGALRM watchdog.
Error names are Kafka's (TOPIC_AUTHORIZATION_FAILED, ...) or librdkafka's local ones (_MSG_TIMED_OUT).
"""
import argparse
import asyncio
import json
import os
import re
import signal
import socket
import struct
import subprocess
import sys
import time
import traceback
import uuid
import weakref

OUT = {}

# Count the TCP connections the Python clients open (kafka-python calls connect_ex until the
# non-blocking connect completes, asyncio calls connect): one per socket object, so a denial
# that costs the connection shows up as one more here.
_connects = []
_seen = weakref.WeakSet()
_orig_connect, _orig_connect_ex = socket.socket.connect, socket.socket.connect_ex


def _count(sock, addr):
    if sock not in _seen and isinstance(addr, tuple) and len(addr) >= 2:
        _seen.add(sock)
        _connects.append(f"{addr[0]}:{addr[1]}")


def _connect(self, addr):
    _count(self, addr)
    return _orig_connect(self, addr)


def _connect_ex(self, addr):
    _count(self, addr)
    return _orig_connect_ex(self, addr)


socket.socket.connect, socket.socket.connect_ex = _connect, _connect_ex


def err_name(e):
    """A Kafka error name for whatever a client handed us (KafkaError, exception, string)."""
    if e is None:
        return None
    try:
        from confluent_kafka import KafkaError, KafkaException
        if isinstance(e, KafkaException) and e.args and isinstance(e.args[0], KafkaError):
            e = e.args[0]
        if isinstance(e, KafkaError):
            return e.name()
    except ImportError:
        pass
    msg = getattr(e, "message", None)  # kafka-python / aiokafka BrokerResponseError subclasses
    if isinstance(msg, str) and msg.isupper():
        return msg
    # kafka-python wraps some broker errors: KafkaError('Unexpected error in
    # InitProducerIdResponse: [Error 31] ClusterAuthorizationFailedError')
    m = re.search(r"\[Error (-?\d+)\]", str(e))
    if m:
        try:
            from kafka.errors import for_code
            return for_code(int(m.group(1))).message
        except Exception:
            return KAFKA_ERR.get(int(m.group(1)), type(e).__name__)
    return type(e).__name__


def exc_info(e):
    return {"class": type(e).__name__, "name": err_name(e), "text": str(e)[:300]}


def bump(d, k, n=1):
    d[k] = d.get(k, 0) + n


# ---------------------------------------------------------------- confluent-kafka (librdkafka)

def rd_conf(a, extra=None):
    c = {"bootstrap.servers": a.bootstrap, "client.id": a.client_id, "socket.timeout.ms": int(a.timeout * 1000),
         "statistics.interval.ms": 100}
    c.update(extra or {})
    return c


class RdStats:
    """librdkafka's own statistics: per-broker connects and disconnects (the bootstrap handle
    included) - how the C client reports that a connection was torn down."""

    def __init__(self):
        self.last = None
        self.n = 0

    def cb(self, s):
        self.last = json.loads(s)
        self.n += 1

    def report(self, handle):
        """Wait (bounded, 2 s) for one more statistics callback, so the figures are current."""
        n0, end = self.n, time.time() + 2
        while self.n == n0 and time.time() < end:
            try:
                handle.poll(0.05)
            except Exception:  # a fatal error (already reported) surfaces from poll() too
                break
        if not self.last:
            return {}
        b = self.last.get("brokers", {}).values()
        return {"rd_connects": sum(x.get("connects", 0) for x in b),
                "rd_disconnects": sum(x.get("disconnects", 0) for x in b)}


def rd_producer(a, extra=None):
    from confluent_kafka import Producer
    st = RdStats()
    conf = rd_conf(a, {"acks": "all", "message.timeout.ms": int(a.timeout * 1000), "linger.ms": 5,
                       "enable.idempotence": False, "stats_cb": st.cb, "error_cb": lambda e: bump(OUT.setdefault("client_errors", {}), e.name())})
    conf.update(extra or {})
    return Producer(conf), st


def rd_produce(a, p, topic, n, res, tag):
    def cb(e, m):
        if e is None:
            bump(res.setdefault(m.topic(), {}), "delivered")
        else:
            bump(res.setdefault(m.topic(), {}).setdefault("errors", {}), e.name())
    from confluent_kafka import KafkaException
    for i in range(n):
        try:
            p.produce(topic, key=f"k{i}".encode(), value=f"{tag}-{i}".encode(), on_delivery=cb)
        except KafkaException as e:  # refused at once: the topic is already known to be denied
            bump(res.setdefault(topic, {}).setdefault("errors", {}), err_name(e))
        p.poll(0)


def confluent_produce(a):
    p, st = rd_producer(a)
    res = {}
    rd_produce(a, p, a.topic, a.n, res, "p")
    left = p.flush(a.timeout + 2)
    t = res.get(a.topic, {})
    return {"delivered": t.get("delivered", 0), "errors": t.get("errors", {}), "unflushed": left, **st.report(p)}


def confluent_mixed(a):
    p, st = rd_producer(a)
    res = {}
    for i in range(a.n):  # interleaved on one producer (one connection per broker)
        rd_produce(a, p, a.allowed, 1, res, f"a{i}")
        rd_produce(a, p, a.denied, 1, res, f"d{i}")
    left = p.flush(a.timeout + 2)
    rd_produce(a, p, a.allowed, a.n, res, "after")  # and carries on after the denials
    left += p.flush(a.timeout + 2)
    return {"allowed": res.get(a.allowed, {}), "denied": res.get(a.denied, {}), "unflushed": left, **st.report(p)}


def rd_consumer(a, group, extra=None):
    from confluent_kafka import Consumer
    st = RdStats()
    conf = rd_conf(a, {"auto.offset.reset": "earliest", "enable.auto.commit": False, "stats_cb": st.cb,
                       "session.timeout.ms": 6000, "heartbeat.interval.ms": 500,
                       "error_cb": lambda e: bump(OUT.setdefault("client_errors", {}), e.name())})
    # librdkafka's Python consumer cannot exist without a group.id (an empty one aborts the
    # process: Consumer_init assertion) and looks up that group's coordinator even when it
    # only assign()s partitions; it never joins. Without --group we use billing-assign-<id>.
    conf["group.id"] = group or f"billing-assign-{a.client_id}"
    if getattr(a, "read_committed", False):
        conf["isolation.level"] = "read_committed"
    conf.update(extra or {})
    return Consumer(conf), st


def rd_poll(a, c, res, n):
    end = time.time() + a.timeout
    while res["consumed"] < n and time.time() < end:
        m = c.poll(0.2)
        if m is None:
            continue
        if m.error():
            bump(res["errors"], m.error().name())
            if m.error().fatal() or m.error().name() in ("TOPIC_AUTHORIZATION_FAILED", "GROUP_AUTHORIZATION_FAILED"):
                break
            continue
        res["consumed"] += 1


def confluent_consume(a, commit=False):
    from confluent_kafka import TopicPartition, OFFSET_BEGINNING
    res = {"consumed": 0, "errors": {}}
    c, st = rd_consumer(a, a.group)
    try:
        if a.group:
            c.subscribe([a.topic])
        else:
            md = c.list_topics(a.topic, timeout=a.timeout)
            t = md.topics.get(a.topic)
            if t is None or t.error is not None:
                res["metadata_error"] = t.error.name() if t is not None and t.error else "NO_TOPIC"
                bump(res["errors"], res["metadata_error"])
                parts = []
            else:
                parts = sorted(t.partitions)
            res["partitions"] = len(parts)
            if parts:
                c.assign([TopicPartition(a.topic, p, OFFSET_BEGINNING) for p in parts])
        rd_poll(a, c, res, a.n)
        if commit and res["consumed"]:
            try:
                done = c.commit(asynchronous=False)
                res["commit"] = "ok"
                errs = [tp.error.name() for tp in done or [] if tp.error]
                if errs:
                    res["commit"] = errs[0]
                got = c.committed(c.assignment(), timeout=a.timeout)
                res["committed_offsets"] = sum(tp.offset for tp in got if tp.offset >= 0)
            except Exception as e:
                res["commit"] = err_name(e)
                res["commit_exception"] = exc_info(e)
    finally:
        res.update(st.report(c))
        c.close()
    return res


def confluent_idempotent(a):
    p, st = rd_producer(a, {"enable.idempotence": True})
    res = {}
    rd_produce(a, p, a.topic, a.n, res, "idem")
    left = p.flush(a.timeout + 2)
    t = res.get(a.topic, {})
    return {"delivered": t.get("delivered", 0), "errors": t.get("errors", {}), "unflushed": left, **st.report(p)}


def confluent_transactional(a):
    p, st = rd_producer(a, {"transactional.id": a.txn_id, "enable.idempotence": True, "transaction.timeout.ms": 60000})
    res = {"delivered": 0, "errors": {}, "steps": {}}
    step = "init"
    try:
        p.init_transactions(a.timeout)
        res["steps"]["init"] = "ok"
        step = "begin"
        p.begin_transaction()
        res["steps"]["begin"] = "ok"
        step = "produce"
        r = {}
        rd_produce(a, p, a.topic, a.n, r, "tx")
        p.flush(a.timeout)
        res["delivered"] = r.get(a.topic, {}).get("delivered", 0)
        res["errors"] = r.get(a.topic, {}).get("errors", {})
        step = "commit"
        p.commit_transaction(a.timeout)
        res["steps"]["commit"] = "ok"
    except Exception as e:
        res["steps"][step] = err_name(e)
        res["exception"] = exc_info(e)
    res.update(st.report(p))
    return res


def confluent_create(a):
    from confluent_kafka.admin import AdminClient, NewTopic
    ad = AdminClient({"bootstrap.servers": a.bootstrap, "socket.timeout.ms": int(a.timeout * 1000)})
    res = {}
    fs = ad.create_topics([NewTopic(t, num_partitions=a.partitions, replication_factor=1) for t in a.topics.split(",")],
                          operation_timeout=a.timeout, request_timeout=a.timeout)
    for t, f in fs.items():
        try:
            f.result(a.timeout + 1)
            res[t] = "ok"
        except Exception as e:
            res[t] = err_name(e)
    md = ad.list_topics(timeout=a.timeout)
    return {"created": res, "partitions": {t: len(md.topics[t].partitions) for t in a.topics.split(",") if t in md.topics}}


# ---------------------------------------------------------------- kafka-python

def kp_produce_into(p, topic, n, res, tag, a):
    futs = [p.send(topic, key=f"k{i}".encode(), value=f"{tag}-{i}".encode()) for i in range(n)]
    p.flush(a.timeout)
    for f in futs:
        try:
            f.get(timeout=a.timeout)
            bump(res.setdefault(topic, {}), "delivered")
        except Exception as e:
            bump(res.setdefault(topic, {}).setdefault("errors", {}), err_name(e))


def kp_producer(a, **kw):
    """kafka-python 3.x is idempotent by default (InitProducerId first, like the Java client
    since 3.0); the plain produce scenario turns that off, the idempotent one turns it on."""
    from kafka import KafkaProducer
    kw.setdefault("enable_idempotence", False)
    return KafkaProducer(bootstrap_servers=a.bootstrap, client_id=a.client_id, acks="all",
                         request_timeout_ms=int(a.timeout * 1000), max_block_ms=int(a.timeout * 1000),
                         retries=1, **kw)


def kp_send_each(p, topic, n, res, tag, a):
    """send() itself raises for a topic whose metadata is refused (max_block_ms)."""
    try:
        kp_produce_into(p, topic, n, res, tag, a)
    except Exception as e:
        bump(res.setdefault(topic, {}).setdefault("errors", {}), err_name(e), n)


def kafka_python_produce(a, **kw):
    res = {}
    p = kp_producer(a, **kw)
    try:
        kp_send_each(p, a.topic, a.n, res, "kp", a)
    finally:
        p.close(timeout=a.timeout)
    t = res.get(a.topic, {})
    return {"delivered": t.get("delivered", 0), "errors": t.get("errors", {})}


def kafka_python_mixed(a):
    res = {}
    p = kp_producer(a)
    try:
        for i in range(a.n):
            kp_send_each(p, a.allowed, 1, res, f"a{i}", a)
            kp_send_each(p, a.denied, 1, res, f"d{i}", a)
        kp_send_each(p, a.allowed, a.n, res, "after", a)
    finally:
        p.close(timeout=a.timeout)
    return {"allowed": res.get(a.allowed, {}), "denied": res.get(a.denied, {})}


def kafka_python_consume(a, commit=False):
    from kafka import KafkaConsumer
    res = {"consumed": 0, "errors": {}}
    c = KafkaConsumer(bootstrap_servers=a.bootstrap, client_id=a.client_id, group_id=a.group,
                      auto_offset_reset="earliest", enable_auto_commit=False,
                      request_timeout_ms=int(max(a.timeout, 6) * 1000) + 500, session_timeout_ms=6000,
                      heartbeat_interval_ms=500,
                      isolation_level="read_committed" if getattr(a, "read_committed", False) else "read_uncommitted")
    try:
        # Without a group: subscribe with group_id=None - kafka-python assigns every partition
        # of the topic from that topic's metadata (partitions_for_topic() would ask for the
        # metadata of ALL topics instead).
        c.subscribe([a.topic])
        end = time.time() + a.timeout
        while res["consumed"] < a.n and time.time() < end:
            try:
                batch = c.poll(timeout_ms=200, max_records=a.n - res["consumed"])
            except Exception as e:
                bump(res["errors"], err_name(e))
                res["exception"] = exc_info(e)
                break
            res["consumed"] += sum(len(v) for v in batch.values())
        res["partitions"] = len(c.assignment())
        unauthorized_seen(c._client.cluster, a.topic, res)
        if commit and res["consumed"]:
            try:
                c.commit()
                res["commit"] = "ok"
                res["committed_offsets"] = sum(c.committed(tp) or 0 for tp in c.assignment())
            except Exception as e:
                res["commit"] = err_name(e)
                res["commit_exception"] = exc_info(e)
    finally:
        c.close(autocommit=False)
    return res


def unauthorized_seen(cluster, topic, res):
    """kafka-python and aiokafka keep a Metadata TOPIC_AUTHORIZATION_FAILED in their cluster
    view and may just never assign the topic: report it as an error the client saw."""
    if topic in getattr(cluster, "unauthorized_topics", set()) and "TOPIC_AUTHORIZATION_FAILED" not in res["errors"]:
        bump(res["errors"], "TOPIC_AUTHORIZATION_FAILED")


def kafka_python_transactional(a):
    res = {"delivered": 0, "errors": {}, "steps": {}}
    step = "init"
    p = None
    try:
        p = kp_producer(a, transactional_id=a.txn_id, enable_idempotence=True)
        p.init_transactions()
        res["steps"]["init"] = "ok"
        step = "begin"
        p.begin_transaction()
        res["steps"]["begin"] = "ok"
        step = "produce"
        r = {}
        kp_produce_into(p, a.topic, a.n, r, "tx", a)
        res["delivered"] = r.get(a.topic, {}).get("delivered", 0)
        res["errors"] = r.get(a.topic, {}).get("errors", {})
        step = "commit"
        p.commit_transaction()
        res["steps"]["commit"] = "ok"
    except Exception as e:
        res["steps"][step] = err_name(e)
        res["exception"] = exc_info(e)
    finally:
        if p is not None:
            try:
                p.close(timeout=a.timeout)
            except Exception:
                pass
    return res


# ---------------------------------------------------------------- aiokafka

def aio_run(coro, a):
    # Each send has its own bound (a.timeout); the whole run gets room for a few of them.
    return asyncio.run(asyncio.wait_for(coro, a.timeout * 10 + 5))


async def aio_send(p, topic, n, res, tag, a):
    for i in range(n):
        try:
            await asyncio.wait_for(p.send_and_wait(topic, key=f"k{i}".encode(), value=f"{tag}-{i}".encode()), a.timeout)
            bump(res.setdefault(topic, {}), "delivered")
        except Exception as e:
            bump(res.setdefault(topic, {}).setdefault("errors", {}), err_name(e))


def aio_producer(a, **kw):
    from aiokafka import AIOKafkaProducer
    return AIOKafkaProducer(bootstrap_servers=a.bootstrap, client_id=a.client_id, acks="all",
                            request_timeout_ms=int(a.timeout * 1000), metadata_max_age_ms=60000, **kw)


def aiokafka_produce(a, **kw):
    async def go():
        res = {}
        p = aio_producer(a, **kw)
        await p.start()
        try:
            await aio_send(p, a.topic, a.n, res, "aio", a)
        finally:
            await p.stop()
        t = res.get(a.topic, {})
        return {"delivered": t.get("delivered", 0), "errors": t.get("errors", {})}
    return aio_run(go(), a)


def aiokafka_mixed(a):
    async def go():
        res = {}
        p = aio_producer(a)
        await p.start()
        try:
            for i in range(a.n):
                await aio_send(p, a.allowed, 1, res, f"a{i}", a)
                await aio_send(p, a.denied, 1, res, f"d{i}", a)
            await aio_send(p, a.allowed, a.n, res, "after", a)
        finally:
            await p.stop()
        return {"allowed": res.get(a.allowed, {}), "denied": res.get(a.denied, {})}
    return aio_run(go(), a)


def aiokafka_consume(a, commit=False):
    from aiokafka import AIOKafkaConsumer

    async def go():
        res = {"consumed": 0, "errors": {}}
        c = AIOKafkaConsumer(bootstrap_servers=a.bootstrap, client_id=a.client_id, group_id=a.group,
                             auto_offset_reset="earliest", enable_auto_commit=False,
                             request_timeout_ms=int(max(a.timeout, 6) * 1000) + 500, session_timeout_ms=6000,
                             heartbeat_interval_ms=500,
                             isolation_level="read_committed" if getattr(a, "read_committed", False) else "read_uncommitted")
        try:
            await asyncio.wait_for(c.start(), a.timeout)
            # Without a group, aiokafka assigns every partition of a subscribed topic itself.
            c.subscribe([a.topic])
            end = time.time() + a.timeout
            while res["consumed"] < a.n and time.time() < end:
                try:
                    # getmany() waits for an assignment before its own timeout counts: bound it.
                    batch = await asyncio.wait_for(c.getmany(timeout_ms=200, max_records=a.n - res["consumed"]), 1)
                except asyncio.TimeoutError:
                    continue
                except Exception as e:
                    bump(res["errors"], err_name(e))
                    res["exception"] = exc_info(e)
                    break
                res["consumed"] += sum(len(v) for v in batch.values())
            res["partitions"] = len(c.assignment())
            unauthorized_seen(c._client.cluster, a.topic, res)
            if commit and res["consumed"]:
                try:
                    await asyncio.wait_for(c.commit(), a.timeout)
                    res["commit"] = "ok"
                    tot = 0
                    for tp in c.assignment():
                        tot += (await c.committed(tp)) or 0
                    res["committed_offsets"] = tot
                except Exception as e:
                    res["commit"] = err_name(e)
                    res["commit_exception"] = exc_info(e)
        except Exception as e:
            bump(res["errors"], err_name(e))
            res["exception"] = exc_info(e)
        finally:
            try:
                await asyncio.wait_for(c.stop(), a.timeout)
            except Exception:
                pass
        return res
    return aio_run(go(), a)


def aiokafka_transactional(a):
    async def go():
        res = {"delivered": 0, "errors": {}, "steps": {}}
        step = "init"
        p = aio_producer(a, transactional_id=a.txn_id)
        started = False
        try:
            await asyncio.wait_for(p.start(), a.timeout)  # start() runs InitProducerId
            started = True
            res["steps"]["init"] = "ok"
            step = "begin"
            async with p.transaction():
                res["steps"]["begin"] = "ok"
                step = "produce"
                r = {}
                await aio_send(p, a.topic, a.n, r, "tx", a)
                res["delivered"] = r.get(a.topic, {}).get("delivered", 0)
                res["errors"] = r.get(a.topic, {}).get("errors", {})
                step = "commit"
            res["steps"]["commit"] = "ok"
        except Exception as e:
            res["steps"][step] = err_name(e)
            res["exception"] = exc_info(e)
        finally:
            try:
                await asyncio.wait_for(p.stop(), a.timeout) if started else None
            except Exception:
                pass
        return res
    return aio_run(go(), a)


# ---------------------------------------------------------------- kcat (librdkafka 2.16 via kcat.sh)

def kcat_cmd():
    peers = os.environ.get("TOLLGATE_PEERS", os.path.join(os.path.dirname(__file__), "../../../../shared/peers"))
    return [os.path.join(peers, "kcat.sh")]


RD_DESC = None


def rd_names_in(text):
    """Kafka error names for the librdkafka error descriptions kcat prints."""
    global RD_DESC
    if RD_DESC is None:
        from confluent_kafka import KafkaError
        RD_DESC = {}
        for k in dir(KafkaError):
            v = getattr(KafkaError, k)
            if isinstance(v, int) and not k.startswith("__"):
                try:
                    RD_DESC[KafkaError(v).str()] = KafkaError(v).name()
                except Exception:
                    pass
    out = {}
    for line in text.splitlines():
        # longest description first: "Broker: Topic authorization failed" before "Broker: ..."
        found = sorted((d for d in RD_DESC if d and d in line), key=len, reverse=True)[:1]
        for d in found:
            bump(out, RD_DESC[d])
        if not found:
            # librdkafka prints a broker's own error message when there is one (Kafka's
            # GroupAuthorizationException text, e.g. "FindCoordinator response error: Not
            # authorized to access group: g").
            for pat, name in BROKER_TEXTS:
                if pat in line:
                    bump(out, name)
                    break
    return out


BROKER_TEXTS = [("Not authorized to access group", "GROUP_AUTHORIZATION_FAILED"),
                ("Not authorized to access topics", "TOPIC_AUTHORIZATION_FAILED"),
                ("Transactional Id authorization failed", "TRANSACTIONAL_ID_AUTHORIZATION_FAILED"),
                ("Cluster authorization failed", "CLUSTER_AUTHORIZATION_FAILED")]


def kcat_run(a, args, stdin=None):
    cmd = kcat_cmd() + ["-b", a.bootstrap, "-X", f"client.id={a.client_id}", "-X", f"socket.timeout.ms={int(a.timeout * 1000)}"] + args
    try:
        p = subprocess.run(cmd, input=stdin, capture_output=True, timeout=a.timeout * 3 + 5)
        return p.returncode, p.stdout.decode(errors="replace"), p.stderr.decode(errors="replace")
    except subprocess.TimeoutExpired as e:
        return "timeout", (e.stdout or b"").decode(errors="replace"), (e.stderr or b"").decode(errors="replace")


def kcat_produce(a, extra=()):
    msgs = "".join(f"kc-{i}\n" for i in range(a.n)).encode()
    # kcat -P prints nothing per delivered message: failures come as "% Delivery failed ..."
    # lines (or "% ERROR: ..." for fatal ones, e.g. a transaction); delivered = n - failed only
    # when kcat exited 0 after its final flush.
    rc, out, err = kcat_run(a, ["-P", "-t", a.topic, "-X", f"message.timeout.ms={int(a.timeout * 1000)}",
                                "-X", "acks=all", *extra], msgs)
    errors = rd_names_in(err)
    failed = sum(1 for l in err.splitlines() if "Delivery failed" in l)
    # After a fatal error kcat may still exit 0: "Producer terminating with N messages (...)
    # still in queue or transit" - those were never delivered either.
    m = re.search(r"terminating with (\d+) messages", err)
    stuck = int(m.group(1)) if m else 0
    return {"exit": rc, "delivered": (a.n - failed - stuck) if rc == 0 else None, "failed": failed,
            "undelivered_at_exit": stuck, "errors": errors,
            "error_lines": [l for l in err.splitlines() if "ERROR" in l or "failed" in l][:10], "stderr": err[-600:]}


def kcat_consume(a):
    opts = ["-e", "-q", "-c", str(a.n), "-o", "beginning", "-X", "auto.offset.reset=earliest"]
    if getattr(a, "read_committed", False):
        opts += ["-X", "isolation.level=read_committed"]
    if a.group:
        # balanced consumer (kcat -G GROUP TOPIC), committing as it goes (auto commit)
        args = ["-G", a.group, "-X", "session.timeout.ms=6000", "-X", "heartbeat.interval.ms=500",
                "-X", "auto.commit.interval.ms=200", *opts, a.topic]
    else:
        args = ["-C", *opts, "-t", a.topic]
    rc, out, err = kcat_run(a, args)
    lines = [l for l in out.splitlines() if l]
    return {"exit": rc, "consumed": len(lines), "errors": rd_names_in(err), "stderr": err[-600:]}


def kcat_group(a):
    """kcat's balanced consumer commits by itself (auto commit, and on close); read the group's
    committed offsets back with an OffsetFetch from librdkafka (no join)."""
    res = kcat_consume(a)
    if res["consumed"]:
        from confluent_kafka import Consumer, TopicPartition
        c = Consumer(rd_conf(a, {"group.id": a.group, "enable.auto.commit": False}))
        try:
            md = c.list_topics(a.topic, timeout=a.timeout)
            tps = [TopicPartition(a.topic, p) for p in sorted(md.topics[a.topic].partitions)]
            got = c.committed(tps, timeout=a.timeout)
            res["commit"] = "ok"
            res["committed_offsets"] = sum(tp.offset for tp in got if tp.offset >= 0)
        except Exception as e:
            res["commit"] = err_name(e)
            res["commit_exception"] = exc_info(e)
        finally:
            c.close()
    return res


# ---------------------------------------------------------------- raw socket (no library)

KAFKA_ERR = {0: "NONE", 3: "UNKNOWN_TOPIC_OR_PARTITION", 29: "TOPIC_AUTHORIZATION_FAILED",
             30: "GROUP_AUTHORIZATION_FAILED", 31: "CLUSTER_AUTHORIZATION_FAILED", 35: "UNSUPPORTED_VERSION",
             42: "INVALID_REQUEST", 53: "TRANSACTIONAL_ID_AUTHORIZATION_FAILED", -1: "UNKNOWN_SERVER_ERROR"}


def uvarint(n):
    b = b""
    while True:
        x = n & 0x7F
        n >>= 7
        if n:
            b += bytes([x | 0x80])
        else:
            return b + bytes([x])


def read_uvarint(buf, off):
    n, shift = 0, 0
    while True:
        x = buf[off]
        off += 1
        n |= (x & 0x7F) << shift
        if not x & 0x80:
            return n, off
        shift += 7


def cstr(s):
    s = s.encode()
    return uvarint(len(s) + 1) + s


def header_v2(key, ver, corr, client_id):
    c = client_id.encode()
    return struct.pack(">hhih", key, ver, corr, len(c)) + c + b"\x00"


def apiversions_body():  # the v3+ body: client_software_name, client_software_version, tags
    return cstr("tollgate-raw") + cstr("1.0") + b"\x00"


def metadata_body(topic):
    """Shaped like v10-v12: topics [topic_id, name, tags], allow_auto_topic_creation,
    include_topic_authorized_operations, tags."""
    return uvarint(2) + b"\x00" * 16 + cstr(topic) + b"\x00" + b"\x00" + b"\x00" + b"\x00"


def read_cstr(buf, off):
    n, off = read_uvarint(buf, off)
    if n == 0:
        return None, off
    return buf[off:off + n - 1].decode(), off + n - 1


def parse_metadata_v12(resp):
    """resp = body after the correlation id (response header v1: tagged fields first)."""
    off = read_uvarint(resp, 0)[1]  # header tags
    off += 4  # throttle_time_ms
    brokers = []
    n, off = read_uvarint(resp, off)
    for _ in range(max(n - 1, 0)):
        (node,) = struct.unpack(">i", resp[off:off + 4])
        host, off = read_cstr(resp, off + 4)
        (port,) = struct.unpack(">i", resp[off:off + 4])
        rack, off = read_cstr(resp, off + 4)
        _, off = read_uvarint(resp, off)
        brokers.append(f"{host}:{port}")
    _, off = read_cstr(resp, off)  # cluster id
    off += 4  # controller id
    topics = {}
    n, off = read_uvarint(resp, off)
    for _ in range(max(n - 1, 0)):
        (ec,) = struct.unpack(">h", resp[off:off + 2])
        name, off = read_cstr(resp, off + 2)
        off += 16 + 1  # topic id, is_internal
        parts, off = read_uvarint(resp, off)
        for _ in range(max(parts - 1, 0)):
            off += 2 + 4 + 4 + 4
            for _arr in range(3):  # replicas, isr, offline
                k, off = read_uvarint(resp, off)
                off += 4 * max(k - 1, 0)
            _, off = read_uvarint(resp, off)
        off += 4  # topic_authorized_operations
        _, off = read_uvarint(resp, off)
        topics[name] = KAFKA_ERR.get(ec, str(ec))
    return {"brokers": brokers, "topics": topics}


def parse_apiversions(resp, ver):
    """resp = body after the correlation id. v0 layout when the broker fell back (KIP-511)."""
    (ec,) = struct.unpack(">h", resp[:2])
    out = {"error_code": ec, "error_name": KAFKA_ERR.get(ec, str(ec))}
    try:
        apis = {}
        if ver >= 3 and ec != 35:
            n, off = read_uvarint(resp, 2)
            for _ in range(max(n - 1, 0)):
                k, lo, hi = struct.unpack(">hhh", resp[off:off + 6])
                off += 6
                tags, off = read_uvarint(resp, off)
                apis[k] = [lo, hi]
            out["layout"] = "v3"
        else:
            (n,) = struct.unpack(">i", resp[2:6])
            off = 6
            for _ in range(n):
                k, lo, hi = struct.unpack(">hhh", resp[off:off + 6])
                off += 6
                apis[k] = [lo, hi]
            out["layout"] = "v0"
        out["api_count"] = len(apis)
        out["apis"] = {str(k): v for k, v in sorted(apis.items())}
    except Exception as e:
        out["parse_error"] = exc_info(e)
    return out


def raw(a):
    host, port = a.bootstrap.rsplit(":", 1)
    s = socket.create_connection((host, int(port)), timeout=a.timeout)
    s.settimeout(a.timeout)
    steps = []
    alive = True

    def rd(n):
        b = b""
        while len(b) < n:
            c = s.recv(n - len(b))
            if not c:
                raise EOFError("connection closed by peer")
            b += c
        return b

    for i, st in enumerate(a.steps.split(",")):
        name, ver, *rest = st.split(":")  # apiversions:VER | metadata:VER[:TOPIC]
        ver = int(ver)
        topic = rest[0] if rest else a.topic
        key = {"apiversions": 18, "metadata": 3}[name]
        corr = 1000 + i
        body = header_v2(key, ver, corr, a.client_id) + (apiversions_body() if key == 18 else metadata_body(topic))
        r = {"request": st, "correlation_id": corr}
        if not alive:
            r["outcome"] = "not sent (connection gone)"
            steps.append(r)
            continue
        try:
            s.sendall(struct.pack(">i", len(body)) + body)
            (ln,) = struct.unpack(">i", rd(4))
            resp = rd(ln)
            (got,) = struct.unpack(">i", resp[:4])
            r["outcome"] = "response"
            r["response_correlation_id"] = got
            r["correlation_ok"] = got == corr
            r["length"] = ln
            if key == 18:
                r.update(parse_apiversions(resp[4:], ver))
            elif ver == 12:
                try:
                    r.update(parse_metadata_v12(resp[4:]))
                except Exception as e:
                    r["parse_error"] = exc_info(e)
            else:
                r["head_hex"] = resp[:24].hex()
        except EOFError as e:
            r["outcome"] = "closed"
            alive = False
        except socket.timeout:
            r["outcome"] = "timeout"
            alive = False
        except OSError as e:
            r["outcome"] = type(e).__name__
            alive = False
        steps.append(r)
    s.close()
    last = steps[-1] if steps else {}
    return {"steps": steps, "connection_survived": alive and last.get("outcome") == "response"}


# ---------------------------------------------------------------- dispatch

TABLE = {
    ("produce", "confluent"): confluent_produce,
    ("produce", "kafka-python"): kafka_python_produce,
    ("produce", "aiokafka"): aiokafka_produce,
    ("produce", "kcat"): kcat_produce,
    ("consume", "confluent"): confluent_consume,
    ("consume", "kafka-python"): kafka_python_consume,
    ("consume", "aiokafka"): aiokafka_consume,
    ("consume", "kcat"): kcat_consume,
    ("mixed-produce", "confluent"): confluent_mixed,
    ("mixed-produce", "kafka-python"): kafka_python_mixed,
    ("mixed-produce", "aiokafka"): aiokafka_mixed,
    ("group", "confluent"): lambda a: confluent_consume(a, commit=True),
    ("group", "kafka-python"): lambda a: kafka_python_consume(a, commit=True),
    ("group", "aiokafka"): lambda a: aiokafka_consume(a, commit=True),
    ("group", "kcat"): kcat_group,
    ("idempotent", "confluent"): confluent_idempotent,
    ("idempotent", "kafka-python"): lambda a: kafka_python_produce(a, enable_idempotence=True),
    ("idempotent", "aiokafka"): lambda a: aiokafka_produce(a, enable_idempotence=True),
    ("idempotent", "kcat"): lambda a: kcat_produce(a, ["-X", "enable.idempotence=true"]),
    ("transactional", "confluent"): confluent_transactional,
    ("transactional", "kafka-python"): kafka_python_transactional,
    ("transactional", "aiokafka"): aiokafka_transactional,
    ("transactional", "kcat"): lambda a: kcat_produce(a, ["-X", f"transactional.id={a.txn_id}"]),
    ("create-topics", "confluent"): confluent_create,
    ("raw", "socket"): raw,
}


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("scenario", choices=sorted({s for s, _ in TABLE}))
    ap.add_argument("--bootstrap", required=True)
    ap.add_argument("--client", default=None, help="confluent | aiokafka | kafka-python | kcat")
    ap.add_argument("--client-id", default="tollgate-test")
    ap.add_argument("--topic", default="tg-test")
    ap.add_argument("--topics", default="tg-test")
    ap.add_argument("--partitions", type=int, default=1)
    ap.add_argument("--allowed")
    ap.add_argument("--denied")
    ap.add_argument("--group", default=None)
    ap.add_argument("--txn-id", default=None)
    ap.add_argument("--read-committed", action="store_true")
    ap.add_argument("--n", type=int, default=10)
    ap.add_argument("--steps", default="apiversions:127,apiversions:3,metadata:12,apiversions:3")
    ap.add_argument("--timeout", type=float, default=5.0)
    a = ap.parse_args()
    client = a.client or {"raw": "socket", "create-topics": "confluent"}.get(a.scenario, "confluent")
    fn = TABLE.get((a.scenario, client))
    OUT.update({"scenario": a.scenario, "client": client, "bootstrap": a.bootstrap})
    if fn is None:
        OUT["exception"] = {"class": "Unsupported", "name": None, "text": f"{a.scenario} has no {client} variant"}
        print(json.dumps(OUT))
        return 2

    def watchdog(*_):
        OUT["exception"] = {"class": "WatchdogTimeout", "name": None, "text": "scenario did not finish in time"}
        print(json.dumps(OUT), flush=True)
        os._exit(3)
    signal.signal(signal.SIGALRM, watchdog)
    signal.alarm(int(a.timeout * 12 + 15))
    t0 = time.time()
    try:
        OUT.update(fn(a))
    except Exception as e:
        OUT["exception"] = exc_info(e)
        OUT["traceback"] = traceback.format_exc()[-1500:]
    OUT["tcp_connects"] = len(_connects)
    OUT["elapsed_s"] = round(time.time() - t0, 3)
    signal.alarm(0)
    print(json.dumps(OUT, sort_keys=True), flush=True)
    return 0


if __name__ == "__main__":
    # Client libraries log to stderr; stdout carries only the JSON object.
    sys.exit(main())
