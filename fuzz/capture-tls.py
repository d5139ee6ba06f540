#!/usr/bin/env python3
"""Regenerate the TLS ClientHello seeds from real clients on loopback (curl, openssl s_client).

A plain TCP listener stores the first bytes each client sends. Writes to
fuzz/corpus/tls_client_hello/ and parsers/tests/data/tls/.
Usage: python3 fuzz/capture-tls.py
"""
import os
import socket
import subprocess

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
OUTS = [os.path.join(ROOT, "fuzz/corpus/tls_client_hello"), os.path.join(ROOT, "parsers/tests/data/tls")]


def capture(name, cmd, port):
    listener = socket.socket()
    listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    listener.bind(("127.0.0.1", port))
    listener.listen(1)
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, stdin=subprocess.DEVNULL)
    conn, _ = listener.accept()
    conn.settimeout(2)
    data = b""
    try:
        while len(data) < 65536:
            chunk = conn.recv(65536)
            if not chunk:
                break
            data += chunk
    except OSError:
        pass
    conn.close()
    listener.close()
    proc.kill()
    for out in OUTS:
        os.makedirs(out, exist_ok=True)
        with open(os.path.join(out, name), "wb") as f:
            f.write(data)
    print(name, len(data))


capture("curl-sni-alpn", ["curl", "-sk", "--max-time", "3", "--resolve", "api.example.com:19501:127.0.0.1", "https://api.example.com:19501/"], 19501)
capture("openssl-s_client-sni", ["openssl", "s_client", "-connect", "127.0.0.1:19502", "-servername", "x.svc.example.com"], 19502)
capture("openssl-s_client-tls12-no-sni", ["openssl", "s_client", "-connect", "127.0.0.1:19503", "-tls1_2", "-noservername"], 19503)
