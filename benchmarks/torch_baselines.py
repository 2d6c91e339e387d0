#!/usr/bin/env python3
"""PyTorch baselines for one Llama-3-8B attention layer's decode step (32 query heads, 8 KV heads,
head dim 128, bf16), measured on the machine the CUDA kernels run on, so ratios compare like with like.

  gpu_sdpa_us      dense GQA decode with torch SDPA on the GPU, best backend of flash / efficient /
                   cudnn / math, per "<tokens>x<batch>"
  cpu_sdpa_us      the same on the CPU (bf16, all threads), "131072x1"
  full_offload_us  pinned host -> device copy of the layer's K and V, then the best GPU SDPA

GPU times: CUDA events, warm-up, median of many repetitions; input buffers rotate when several
copies fit in twice the L2 so no repetition reads a cache-warm layer. This script is a benchmark
helper, not a dependency of the library.
Usage: torch_baselines.py --out torch_baselines.json
"""
import argparse
import json
import statistics
import time

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

Q_HEADS, KV_HEADS, DIM = 32, 8, 128
GPU_SHAPES = [(32768, 1), (131072, 1), (131072, 8), (32768, 4), (131072, 4), (32768, 16), (131072, 16)]
KERNEL_SHAPES = [(32768, 1), (131072, 1), (131072, 8)]
OFFLOAD_SHAPES = [(32768, 1), (131072, 1), (131072, 4)]
BACKENDS = {
    "flash": SDPBackend.FLASH_ATTENTION,
    "efficient": SDPBackend.EFFICIENT_ATTENTION,
    "cudnn": SDPBackend.CUDNN_ATTENTION,
    "math": SDPBackend.MATH,
}


def gqa_sdpa(q, k, v):
    # q [b, 32, 1, d]; k, v [b, 8, s, d]. enable_gqa avoids materialising repeated KV heads.
    return F.scaled_dot_product_attention(q, k, v, enable_gqa=True)


def gqa_sdpa_grouped(q, k, v):
    # Equivalent formulation for backends without enable_gqa: the group's query heads become query
    # rows of one KV head: q [b, 8, 4, d] against k, v [b, 8, s, d].
    b = q.shape[0]
    out = F.scaled_dot_product_attention(q.view(b, KV_HEADS, Q_HEADS // KV_HEADS, DIM), k, v)
    return out.view(b, Q_HEADS, 1, DIM)


def cuda_median_us(fn, reps, warmup=5):
    for _ in range(warmup):
        fn(0)
    torch.cuda.synchronize()
    start = [torch.cuda.Event(enable_timing=True) for _ in range(reps)]
    stop = [torch.cuda.Event(enable_timing=True) for _ in range(reps)]
    for i in range(reps):
        start[i].record()
        fn(i)
        stop[i].record()
    torch.cuda.synchronize()
    return statistics.median(s.elapsed_time(e) * 1e3 for s, e in zip(start, stop))


def make_inputs(tokens, batch, device, copies):
    q = [torch.randn(batch, Q_HEADS, 1, DIM, device=device, dtype=torch.bfloat16) for _ in range(copies)]
    k = [torch.randn(batch, KV_HEADS, tokens, DIM, device=device, dtype=torch.bfloat16) for _ in range(copies)]
    v = [torch.randn(batch, KV_HEADS, tokens, DIM, device=device, dtype=torch.bfloat16) for _ in range(copies)]
    return q, k, v


def copies_for(tokens, batch):
    layer_bytes = 2 * batch * KV_HEADS * tokens * DIM * 2
    l2 = getattr(torch.cuda.get_device_properties(0), "L2_cache_size", 50 << 20)
    # Rotate among enough copies that the set exceeds twice the L2, within 16 GB.
    n = 1
    while n * layer_bytes < 2 * l2 and (n + 1) * layer_bytes < (16 << 30):
        n += 1
    return n


def best_gpu_sdpa(tokens, batch, log):
    copies = copies_for(tokens, batch)
    q, k, v = make_inputs(tokens, batch, "cuda", copies)
    results = {}
    for name, backend in BACKENDS.items():
        for label, fn in (("gqa", gqa_sdpa), ("grouped", gqa_sdpa_grouped)):
            try:
                with sdpa_kernel([backend]):
                    us = cuda_median_us(lambda i: fn(q[i % copies], k[i % copies], v[i % copies]), reps=50)
                results[f"{name}/{label}"] = us
            except Exception as e:  # a backend that does not support this shape or dtype
                log.append(f"{tokens}x{batch} {name}/{label}: unavailable ({type(e).__name__}: {str(e)[:120]})")
    del q, k, v
    torch.cuda.empty_cache()
    best = min(results, key=results.get)
    log.append(f"{tokens}x{batch}: " + ", ".join(f"{k}={v:.1f}us" for k, v in sorted(results.items())) + f" -> {best}")
    return results[best], best


def cpu_sdpa_us(tokens, batch, threads):
    torch.set_num_threads(threads)
    q, k, v = make_inputs(tokens, batch, "cpu", 1)
    times = []
    for i in range(8):
        t0 = time.perf_counter()
        gqa_sdpa_grouped(q[0], k[0], v[0])
        times.append((time.perf_counter() - t0) * 1e6)
    return statistics.median(times[2:])


def full_offload_us(tokens, batch, best_fn):
    host_k = torch.randn(batch, KV_HEADS, tokens, DIM, dtype=torch.bfloat16).pin_memory()
    host_v = torch.randn(batch, KV_HEADS, tokens, DIM, dtype=torch.bfloat16).pin_memory()
    dev_k = torch.empty_like(host_k, device="cuda")
    dev_v = torch.empty_like(host_v, device="cuda")
    q = torch.randn(batch, Q_HEADS, 1, DIM, device="cuda", dtype=torch.bfloat16)

    def step(_):
        dev_k.copy_(host_k, non_blocking=True)
        dev_v.copy_(host_v, non_blocking=True)
        best_fn(q, dev_k, dev_v)

    return cuda_median_us(step, reps=20, warmup=3)


def cpu_name():
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return "cpu"


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", required=True)
    ap.add_argument("--cpu-threads", type=int, default=16)
    only = ap.add_mutually_exclusive_group()
    only.add_argument("--kernel-shapes-only", action="store_true",
                      help="only the GPU shapes of docs/results/cuda_kernels.json (no offload, no CPU): ~1 minute")
    only.add_argument("--cpu-only", action="store_true",
                      help="only the CPU SDPA of docs/results/cpu_kernel.json (scripts/device/cpu.sh): seconds")
    args = ap.parse_args()
    log = []
    gpu, chosen = {}, {}
    shapes = [] if args.cpu_only else KERNEL_SHAPES if args.kernel_shapes_only else GPU_SHAPES
    for tokens, batch in shapes:
        us, best = best_gpu_sdpa(tokens, batch, log)
        gpu[f"{tokens}x{batch}"] = us
        chosen[f"{tokens}x{batch}"] = best
        print(log[-1], flush=True)

    def best_fn_for(key):
        name, label = chosen[key].split("/")
        fn = gqa_sdpa if label == "gqa" else gqa_sdpa_grouped

        def run(q, k, v):
            with sdpa_kernel([BACKENDS[name]]):
                return fn(q, k, v)

        return run

    offload, cpu = {}, {}
    for tokens, batch in [] if args.kernel_shapes_only or args.cpu_only else OFFLOAD_SHAPES:
        key = f"{tokens}x{batch}"
        offload[key] = full_offload_us(tokens, batch, best_fn_for(key))
        print(f"full offload {key}: {offload[key]:.1f} us", flush=True)
    if not args.kernel_shapes_only:
        cpu["131072x1"] = cpu_sdpa_us(131072, 1, args.cpu_threads)
        print(f"cpu sdpa 131072x1: {cpu['131072x1']:.1f} us", flush=True)
    result = {
        "device": cpu_name() if args.cpu_only or not torch.cuda.is_available() else torch.cuda.get_device_name(0),
        "torch": torch.__version__,
        "shape": {"q_heads": Q_HEADS, "kv_heads": KV_HEADS, "head_dim": DIM, "dtype": "bf16"},
        "gpu_sdpa_us": gpu,
        "gpu_sdpa_backend": chosen,
        "cpu_sdpa_us": cpu,
        "full_offload_us": offload,
        "log": log,
    }
    with open(args.out, "w") as f:
        json.dump(result, f, indent=2)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
