#!/usr/bin/env python3
"""Writes the kafka_request and kafka_response seed corpora from real traffic: a recording
relay between real clients (confluent-kafka/librdkafka 2.16: admin, producer incl. idempotent,
consumer group; kafka-python) and a real broker (tansu), on loopback.

usage: fuzz/capture-kafka.py   (needs ../shared/peers: tansu installed, the Python venv;
run it with that venv's python: /tmp/tollgate-peers/venv/bin/python fuzz/capture-kafka.py)
Each distinct (API key, version) pair is kept once per direction; names say which.
"""
import hashlib, os, socket, struct, subprocess, sys, threading, time

here = os.path.dirname(os.path.abspath(__file__))
tansu = os.environ.get("TANSU", "/tmp/tollgate-peers/opt/bin/tansu")
req_dir = os.path.join(here, "corpus", "kafka_request")
resp_dir = os.path.join(here, "corpus", "kafka_response")
os.makedirs(req_dir, exist_ok=True)
os.makedirs(resp_dir, exist_ok=True)
seen = set()


def free_port():
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    p = s.getsockname()[1]
    s.close()
    return p


def save(d, kind, key, ver, data):
    tag = (kind, key, ver)
    if tag in seen:
        return
    seen.add(tag)
    name = f"k{key}-v{ver}-{hashlib.sha1(data).hexdigest()[:10]}"
    with open(os.path.join(d, name), "wb") as f:
        f.write(data)


def frames(sock):
    buf = b""
    while True:
        while len(buf) >= 4:
            n = struct.unpack(">i", buf[:4])[0]
            if len(buf) < 4 + n:
                break
            yield buf[: 4 + n]
            buf = buf[4 + n :]
        chunk = sock.recv(65536)
        if not chunk:
            return
        buf += chunk


def relay(client, broker_port):
    broker = socket.create_connection(("127.0.0.1", broker_port))
    asked = []  # (key, version) in request order

    def up():
        try:
            for f in frames(client):
                key, ver = struct.unpack(">hh", f[4:8])
                save(req_dir, "req", key, ver, f[4:])
                if not (key == 0 and len(f) > 20 and acks_zero(f)):
                    asked.append((key, ver))
                broker.sendall(f)
        except OSError:
            pass
        broker.close()

    def down():
        try:
            for f in frames(broker):
                while not asked:
                    time.sleep(0.001)
                key, ver = asked.pop(0)
                save(resp_dir, "resp", key, ver, struct.pack(">hh", key, ver) + f[4:])
                client.sendall(f)
        except OSError:
            pass
        client.close()

    threading.Thread(target=up, daemon=True).start()
    threading.Thread(target=down, daemon=True).start()


def acks_zero(f):
    return False  # the capture clients below always use acks >= 1


def main():
    broker_port, relay_port = free_port(), free_port()
    b = subprocess.Popen(
        [tansu, "broker", "--cluster-id", "capture",
         "--listener-url", f"tcp://127.0.0.1:{broker_port}",
         "--advertised-listener-url", f"tcp://127.0.0.1:{relay_port}",
         "--storage-engine", "memory://tansu/"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env={**os.environ, "RUST_LOG": "warn"})
    try:
        for _ in range(100):
            try:
                socket.create_connection(("127.0.0.1", broker_port)).close()
                break
            except OSError:
                time.sleep(0.05)
        ls = socket.socket()
        ls.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        ls.bind(("127.0.0.1", relay_port))
        ls.listen(64)

        def accept():
            while True:
                c, _ = ls.accept()
                relay(c, broker_port)

        threading.Thread(target=accept, daemon=True).start()
        boot = f"127.0.0.1:{relay_port}"
        from confluent_kafka import Consumer, Producer
        from confluent_kafka.admin import AdminClient, NewTopic
        a = AdminClient({"bootstrap.servers": boot})
        for f in a.create_topics([NewTopic("orders", 2, 1), NewTopic("audit", 1, 1)]).values():
            f.result(10)
        for idem in (False, True):
            p = Producer({"bootstrap.servers": boot, "enable.idempotence": idem, "acks": "all"})
            for i in range(20):
                p.produce("orders" if i % 2 else "audit", f"m{i}".encode(), key=b"k")
            p.flush(10)
        c = Consumer({"bootstrap.servers": boot, "group.id": "billing", "auto.offset.reset": "earliest"})
        c.subscribe(["orders", "audit"])
        end, got = time.time() + 10, 0
        while time.time() < end and got < 20:
            m = c.poll(0.5)
            if m is not None and not m.error():
                got += 1
        c.commit(asynchronous=False)
        c.close()
        try:
            from kafka import KafkaProducer
            kp = KafkaProducer(bootstrap_servers=boot)
            kp.send("orders", b"kafka-python").get(10)
            kp.close()
        except Exception as e:  # a client missing must not hide the others' seeds
            print("kafka-python:", e, file=sys.stderr)
        print(f"captured {sum(1 for s in seen if s[0]=='req')} request and "
              f"{sum(1 for s in seen if s[0]=='resp')} response kinds")
    finally:
        b.kill()
        b.wait()


main()
