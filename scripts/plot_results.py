#!/usr/bin/env python3
"""Plots from docs/results JSON (written by hattn-eval and hattn-bench) into docs/figures/.

quality.json -> quality_vs_budget.png: mass recall, output relative L2 error and needle hit rate
               against the average budget actually used, one curve per system (all heads), plus
               quality_by_kind.png: output error per head kind at each system's 5% point.
e2e.json     -> e2e_step_time.png: per-layer step time of every system per context x batch.
trace_128k_b1[_no_cache].json -> trace_128k_b1[_no_cache]_fluxion.png: one step's timeline (caller
               thread, GPU phases from CUDA events, CPU side) per layer, from hattn-bench --trace.

Usage: scripts/plot_results.py [--results docs/results] [--figures docs/figures]
Files that are missing are skipped with a note; plots are made on the development machine.
"""
import argparse
import json
import os
import sys

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

STYLE = {
    "fluxion": dict(color="tab:red", marker="o", label="Fluxion (default)"),
    "fixed": dict(color="tab:blue", marker="s", label="FixedBudget + HybridGen (Fixed5 at 5%)"),
    "fixed5": dict(color="tab:blue", marker="s", label="Fixed 5% hybrid"),
    "quest_gpu": dict(color="tab:green", marker="^", label="Quest-like GPU only"),
    "psa": dict(color="tab:purple", marker="D", label="PSA-like mass threshold"),
    "dense": dict(color="black", marker="*", label="dense (100%)"),
    # Baselines of the end-to-end benchmark: each its own colour so bars are told apart.
    "gpu_dense": dict(color="tab:gray", label="GPU-resident dense (ours)"),
    "cpu_dense": dict(color="tab:orange", label="CPU-only dense"),
    "full_offload": dict(color="tab:brown", label="full offload (ours)"),
    "torch_sdpa": dict(color="black", label="PyTorch SDPA, resident"),
    "torch_full_offload": dict(color="tab:pink", label="PyTorch full offload"),
}


def load(path):
    if not os.path.exists(path):
        print(f"plot_results: {path} missing, skipped", file=sys.stderr)
        return None
    with open(path) as f:
        return json.load(f)


def caption(doc):
    return f"{doc.get('device', '?')}, {doc.get('date', '?')}, commit {str(doc.get('commit', '?'))[:10]}"


def plot_quality(doc, out_dir):
    rows = [r for r in doc.get("rows", []) if r["kind"] == "all"]
    systems = sorted({r["system"] for r in rows}, key=lambda s: list(STYLE).index(s) if s in STYLE else 99)
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.5))
    metrics = [("mass_recall", "attention-mass recall", None), ("output_rel_l2", "output relative L2 error", "log"),
               ("needle_hit_rate", "needle hit rate", None)]
    for ax, (key, title, scale) in zip(axes, metrics):
        for s in systems:
            if key == "output_rel_l2" and s == "dense":
                continue  # rounding-level error: it would only stretch the log axis
            pts = sorted((r["budget_used"], r[key]) for r in rows if r["system"] == s and r[key] is not None)
            if not pts:
                continue
            st = STYLE.get(s, dict(marker="x", label=s))
            ax.plot([p[0] for p in pts], [p[1] for p in pts], **st)
        ax.set_xscale("log")
        if scale:
            ax.set_yscale(scale)
        ax.set_xlabel("average budget used (share of pages)")
        ax.set_title(title)
        ax.grid(True, which="both", alpha=0.3)
    axes[0].axhline(0.95, color="gray", ls="--", lw=0.8)
    axes[2].axhline(0.99, color="gray", ls="--", lw=0.8)
    axes[0].legend(fontsize=8)
    fig.suptitle(f"Quality vs average budget on the head zoo ({caption(doc)})", fontsize=10)
    fig.tight_layout()
    path = os.path.join(out_dir, "quality_vs_budget.png")
    fig.savefig(path, dpi=110)
    plt.close(fig)
    print(f"plot_results: wrote {path}")

    kinds = ["local", "retrieval", "clustered", "diffuse"]
    five = [r for r in doc.get("rows", []) if abs(r["avg_budget"] - 0.05) < 1e-9 and r["kind"] in kinds]
    if not five:
        return
    systems5 = [s for s in systems if any(r["system"] == s and r["output_rel_l2"] is not None for r in five)]
    fig, ax = plt.subplots(figsize=(8, 4))
    width = 0.8 / max(1, len(systems5))
    for i, s in enumerate(systems5):
        vals = []
        for k in kinds:
            # Systems without an output (the oracle selection) have None here.
            m = [r["output_rel_l2"] for r in five if r["system"] == s and r["kind"] == k and r["output_rel_l2"] is not None]
            vals.append(m[0] if m else 0)
        ax.bar([j + i * width for j in range(len(kinds))], vals, width, color=STYLE.get(s, {}).get("color"),
               label=STYLE.get(s, {}).get("label", s))
    ax.set_xticks([j + width * (len(systems5) - 1) / 2 for j in range(len(kinds))], kinds)
    ax.set_ylabel("output relative L2 error")
    ax.set_yscale("log")
    ax.set_title(f"Per head kind at avg_budget 0.05 ({caption(doc)})", fontsize=9)
    ax.legend(fontsize=8)
    fig.tight_layout()
    path = os.path.join(out_dir, "quality_by_kind.png")
    fig.savefig(path, dpi=110)
    plt.close(fig)
    print(f"plot_results: wrote {path}")


def plot_e2e(doc, out_dir):
    rows = [r for r in doc.get("rows", []) if r.get("step_us") and r["step_us"] > 0]
    if not rows:
        return
    cases = sorted({(r["context"], r["batch"]) for r in rows})
    systems = []
    for r in rows:
        if r["system"] not in systems:
            systems.append(r["system"])
    fig, ax = plt.subplots(figsize=(max(8, 2 * len(cases)), 4.5))
    width = 0.8 / len(systems)
    for i, s in enumerate(systems):
        vals = []
        for c in cases:
            m = [r["step_us"] for r in rows if r["system"] == s and (r["context"], r["batch"]) == c]
            vals.append(m[0] if m else 0)
        ax.bar([j + i * width for j in range(len(cases))], vals, width, label=s,
               color=STYLE.get(s, {}).get("color"))
    ax.set_xticks([j + width * (len(systems) - 1) / 2 for j in range(len(cases))],
                  [f"{c[0] // 1024}K x{c[1]}" for c in cases])
    ax.set_yscale("log")
    ax.set_ylabel("per-layer step time (us, median)")
    ax.set_title(f"Decode step of one Llama-3-8B layer ({caption(doc)})", fontsize=9)
    ax.legend(fontsize=8, ncol=2)
    ax.grid(True, axis="y", which="both", alpha=0.3)
    fig.tight_layout()
    path = os.path.join(out_dir, "e2e_step_time.png")
    fig.savefig(path, dpi=110)
    plt.close(fig)
    print(f"plot_results: wrote {path}")


def plot_trace(doc, out_dir, name, system):
    layers = doc.get("steps", {}).get(system)
    if not layers:
        return
    lanes = ["caller thread", "GPU: score + select", "GPU: cache + decode", "GPU: CPU wait + merge", "CPU side"]
    colors = ["#888888", "#1f77b4", "#2ca02c", "#9467bd", "#d62728"]
    fig, ax = plt.subplots(figsize=(10, 3.2))

    def bar(lane, begin, end, label=None):
        if begin is None or end is None or begin < 0 or end <= begin:
            return
        ax.broken_barh([(begin, end - begin)], (lane - 0.35, 0.7), color=colors[lane], alpha=0.85)
        if label:
            ax.text(begin + (end - begin) / 2, lane, label, ha="center", va="center", fontsize=7, color="white")

    for l in layers:
        tag = f"L{l['layer']}"
        bar(0, l["caller_begin"], l["caller_end"])
        bar(1, l["gpu_begin"], l["gpu_selected"], tag)
        bar(2, l["gpu_selected"], l["gpu_decoded"], tag)
        bar(3, l["gpu_decoded"], l["gpu_end"])
        bar(4, l["cpu_begin"], l["cpu_end"], tag)
    ax.set_yticks(range(len(lanes)), lanes, fontsize=8)
    ax.invert_yaxis()
    ax.set_xlabel("us from the first layer's run() call")
    ax.set_title(f"One decode step, {system}, layers back to back ({caption(doc)})", fontsize=9)
    ax.grid(True, axis="x", alpha=0.3)
    fig.tight_layout()
    path = os.path.join(out_dir, f"{name}_{system}.png")
    fig.savefig(path, dpi=110)
    plt.close(fig)
    print(f"plot_results: wrote {path}")


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--results", default="docs/results")
    ap.add_argument("--figures", default="docs/figures")
    args = ap.parse_args()
    os.makedirs(args.figures, exist_ok=True)
    q = load(os.path.join(args.results, "quality.json"))
    if q:
        plot_quality(q, args.figures)
    e = load(os.path.join(args.results, "e2e.json"))
    if e:
        plot_e2e(e, args.figures)
    for name in ("trace_128k_b1", "trace_128k_b1_no_cache"):
        t = load(os.path.join(args.results, name + ".json"))
        if t:
            plot_trace(t, args.figures, name, "fluxion")


if __name__ == "__main__":
    main()
