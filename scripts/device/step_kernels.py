#!/usr/bin/env python3
"""Every kernel of a step, alone: reads Nsight Compute's console report (ncu --section SpeedOfLight)
and prints one markdown row per kernel (name, template arguments and launch shape) with its launches
and the range of its durations.
Usage: step_kernels.py NCU_REPORT.txt"""
import re
import sys

HEADER = re.compile(r"^  (?:void )?(?:[\w:]*<unnamed>::|[\w:]*::)?(\w+)(<[^(]*>)?\(.*?\((\d+), (\d+), (\d+)\)x\((\d+), (\d+), (\d+)\)")
DURATION = re.compile(r"^\s+Duration\s+(\w+)\s+([\d.,]+)")
SCALE = {"ns": 1e-3, "nsecond": 1e-3, "us": 1.0, "usecond": 1.0, "ms": 1e3, "msecond": 1e3, "s": 1e6, "second": 1e6}


def main(path):
    rows = {}  # (name, template arguments, grid, block) -> [durations in us]
    key = None
    with open(path, errors="replace") as f:
        for line in f:
            m = HEADER.match(line)
            if m:
                grid = "x".join(m.group(i) for i in (3, 4, 5))
                block = "x".join(m.group(i) for i in (6, 7, 8))
                key = (m.group(1), m.group(2) or "", grid, block)
                rows.setdefault(key, [])
                continue
            d = DURATION.match(line)
            if d and key is not None:
                unit = d.group(1)
                if unit not in SCALE:
                    sys.exit(f"step_kernels: unknown duration unit {unit!r} in {path}")
                rows[key].append(float(d.group(2).replace(",", "")) * SCALE[unit])
                key = None
    if not rows:
        sys.exit(f"step_kernels: no kernel with a Duration in {path}")
    print("| kernel | launches | grid x block | us alone (min-max) |")
    print("|---|---|---|---|")
    for (name, targs, grid, block), us in rows.items():
        span = f"{min(us):.1f}-{max(us):.1f}" if us else "-"
        print(f"| {name}{targs} | {len(us)} | {grid} x {block} | {span} |")


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit(__doc__)
    main(sys.argv[1])
