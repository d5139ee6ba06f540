#!/usr/bin/env python3
"""Writes the dns_message seed corpus from real traffic: the queries dig sends (UDP with and
without EDNS, DNSSEC OK, several types) and the answers a real resolver gives them.

usage: fuzz/capture-dns.py RESOLVER_PORT [CASE...]   (a resolver on 127.0.0.1 serving the zone
of proxy/tests/dns_real.rs: unbound for most cases, dnsmasq for `cname`, whose CNAME chain
unbound's local data does not follow)
"""
import os, socket, subprocess, sys

port = int(sys.argv[1])
out = os.path.join(os.path.dirname(os.path.abspath(__file__)), "corpus", "dns_message")
os.makedirs(out, exist_ok=True)
cases = {
    "a": ["api.example.com", "A"],
    "aaaa-mixed-case": ["Api.Example.COM", "AAAA"],
    "noedns": ["+noedns", "api.example.com", "A"],
    "dnssec-ok": ["+dnssec", "api.example.com", "A"],
    "txt-large": ["+bufsize=4096", "big.example.com", "TXT"],
    "cname": ["www.example.com", "A"],
    "refused-zone": ["evil.example.org", "A"],
}
only = sys.argv[2:]
for name, args in cases.items():
    if only and name not in only:
        continue
    trap = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    trap.bind(("127.0.0.1", 0))
    trap.settimeout(5)
    dig = subprocess.Popen(["dig", "@127.0.0.1", "-p", str(trap.getsockname()[1]), "+tries=1", "+time=1"] + args,
                           stdout=subprocess.DEVNULL)
    query, _ = trap.recvfrom(65535)
    dig.wait()
    with open(os.path.join(out, f"query-{name}"), "wb") as f:
        f.write(query)
    up = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    up.settimeout(2)
    up.sendto(query, ("127.0.0.1", port))
    try:
        answer = up.recv(65535)
        with open(os.path.join(out, f"answer-{name}"), "wb") as f:
            f.write(answer)
    except socket.timeout:
        print(f"{name}: no answer from the resolver", file=sys.stderr)
print(f"wrote {len(os.listdir(out))} files to {out}")
