#!/usr/bin/env python3
"""Every kernel of a step, alone: reads Nsight Compute's console report (ncu --section SpeedOfLight)
and prints one markdown row per kernel name with its launches, grid and the range of its durations.
Usage: step_kernels.py NCU_REPORT.txt"""
import re
import sys

HEADER = re.compile(r"^  (?:void )?(?:[\w:]*<unnamed>::|[\w:]*::)?(\w+)[<(].*?\((\d+), (\d+), (\d+)\)x\((\d+), (\d+), (\d+)\)")
DURATION = re.compile(r"^\s+Duration\s+(\w+)\s+([\d.,]+)")
SCALE = {"ns": 1e-3, "us": 1.0, "usecond": 1.0, "ms": 1e3, "msecond": 1e3}


def main(path):
    rows = {}  # name -> (grid, block, [durations in us])
    name = None
    with open(path, errors="replace") as f:
        for line in f:
            m = HEADER.match(line)
            if m:
                name = m.group(1)
                grid = "x".join(m.group(i) for i in (2, 3, 4))
                block = "x".join(m.group(i) for i in (5, 6, 7))
                rows.setdefault(name, (grid, block, []))
                continue
            d = DURATION.match(line)
            if d and name is not None:
                rows[name][2].append(float(d.group(2).replace(",", "")) * SCALE.get(d.group(1), 1.0))
                name = None
    if not rows:
        sys.exit(f"step_kernels: no kernel with a Duration in {path}")
    print("| kernel | launches | grid x block | us alone (min-max) |")
    print("|---|---|---|---|")
    for kernel, (grid, block, us) in rows.items():
        span = f"{min(us):.1f}-{max(us):.1f}" if us else "-"
        print(f"| {kernel} | {len(us)} | {grid} x {block} | {span} |")


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit(__doc__)
    main(sys.argv[1])
