#!/usr/bin/env python3
"""Draw bench/http/results.svg from the table after the `<!-- plot -->` line in
bench/http/README.md (the latest full run; no dependencies).
Usage: python3 bench/http/plot.py"""
import os
import re

here = os.path.dirname(os.path.abspath(__file__))
rows = []
lines = open(os.path.join(here, "README.md")).read().split("<!-- plot -->", 1)[1].splitlines()
for line in lines[1:]:
    if rows and not line.startswith("|"):
        break  # the end of the table
    m = re.match(r"\| (h1|h2c[^|]*?) \| ([^|]+) \| \**([\d,]+)\** \|", line)
    if m and "direct" not in m.group(2):
        rows.append((f"{m.group(1)}: {m.group(2).strip('* ')}", int(m.group(3).replace(",", ""))))
w, bar, gap, left = 760, 22, 10, 300
h = 60 + len(rows) * (bar + gap)
top = max(v for _, v in rows)
out = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{w}" height="{h}" font-family="sans-serif" font-size="13">',
       f'<text x="10" y="24" font-size="15" font-weight="bold">Requests/s through each proxy, 100 regex rules (1,000 where noted), one core</text>']
for i, (name, v) in enumerate(rows):
    y = 44 + i * (bar + gap)
    length = (w - left - 90) * v / top
    color = "#d9480f" if "tollgate" in name else "#868e96"
    out.append(f'<text x="{left - 8}" y="{y + 16}" text-anchor="end">{name}</text>')
    out.append(f'<rect x="{left}" y="{y}" width="{length:.0f}" height="{bar}" fill="{color}"/>')
    out.append(f'<text x="{left + length + 6:.0f}" y="{y + 16}">{v:,}</text>')
out.append("</svg>")
open(os.path.join(here, "results.svg"), "w").write("\n".join(out))
print(f"wrote results.svg ({len(rows)} rows)")
