"""Time the exact fast causal kNN against the brute-force oracle on realistic and i.i.d. layouts.

    .venv/bin/python scripts/knn_bench.py --lengths 1024 4096 16384 65536 --reference-max 16384

Realistic layout: per head h, coordinate 0 = t · s_h (s_h log-spaced from 0.01 to 1) plus a drift, the
other coordinates a drift only; the drift is Gaussian with standard deviation `--spreads` (the learned flow
moves positions by ~0.1-1 per layer, so a few layers give ~0.3-3). Prints wall and CPU seconds (the best of
`--repeats`; CPU time is the steadier figure on a shared machine), candidates evaluated per query, blocks
searched per query, the fraction of block searches whose first window had to grow, and whether the fast
result equals the oracle's.
"""

import argparse
import os
import platform
import time

import torch

from dfn.neighbors_dfn import causal_knn_fast, causal_knn_reference


def layout(name: str, length: int, heads: int, dim: int, spread: float, seed: int = 0) -> torch.Tensor:
    """`(1, N, H, k)` positions."""
    gen = torch.Generator().manual_seed(seed)
    if name == "iid":
        return torch.rand(1, length, heads, dim, generator=gen)
    scale = torch.logspace(-2, 0, heads).view(1, 1, heads, 1)
    time_coord = torch.arange(length, dtype=torch.float32).view(1, -1, 1, 1) * scale
    pos = torch.cat([time_coord, torch.zeros(1, length, heads, dim - 1)], dim=-1)
    return pos + spread * torch.randn(1, length, heads, dim, generator=gen)


def timed(fn, args: tuple, repeats: int) -> tuple[float, float, object]:
    """Best wall and CPU seconds of `fn(*args)` over `repeats` runs, and its result."""
    wall, cpu, out = float("inf"), float("inf"), None
    for _ in range(repeats):
        start, start_cpu = time.perf_counter(), time.process_time()
        out = fn(*args)
        wall, cpu = min(wall, time.perf_counter() - start), min(cpu, time.process_time() - start_cpu)
    return wall, cpu, out


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--lengths", type=int, nargs="+", default=[1024, 4096, 16384, 65536])
    parser.add_argument("--reference-max", type=int, default=16384)
    parser.add_argument("--layouts", nargs="+", default=["realistic", "iid"])
    parser.add_argument("--spreads", type=float, nargs="+", default=[0.5, 2.0])
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--dim", type=int, default=2)
    parser.add_argument("--neighbors", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    machine = platform.processor() or platform.machine()
    load = ", ".join(f"{x:.1f}" for x in os.getloadavg())
    print(f"torch {torch.__version__}, {args.threads} threads, {machine}, {os.cpu_count()} cpus, load {load}")
    print(f"B=1 H={args.heads} k={args.dim} K={args.neighbors}; best of {args.repeats} (reference: 1 run)")
    print(
        f"{'layout':<16}{'N':>8}{'ref wall':>10}{'ref cpu':>9}{'fast wall':>10}{'fast cpu':>9}"
        f"{'cpu ratio':>10}{'cand/q':>8}{'visits/q':>9}{'fallback':>9}  equal"
    )
    cases = [(name, s) for name in args.layouts for s in (args.spreads if name == "realistic" else [0.0])]
    for name, spread in cases:
        for length in args.lengths:
            pos = layout(name, length, args.heads, args.dim, spread)
            inputs = (pos, pos, torch.ones(1, length, dtype=torch.bool), args.neighbors)
            fast_wall, fast_cpu, fast = timed(causal_knn_fast, inputs, args.repeats)
            stats: dict = {}
            causal_knn_fast(*inputs, stats=stats)
            ref_wall, ref_cpu, same = float("nan"), float("nan"), "-"
            if length <= args.reference_max:
                ref_wall, ref_cpu, ref = timed(causal_knn_reference, inputs, 1)
                same = str(torch.equal(ref[1], fast[1]) and torch.equal(ref[0][ref[1]], fast[0][fast[1]]))
            label = name + (f" s={spread:g}" if name == "realistic" else "")
            queries, visits = stats["queries"], stats["block_visits"]
            print(
                f"{label:<16}{length:>8}{ref_wall:>10.3f}{ref_cpu:>9.3f}{fast_wall:>10.3f}{fast_cpu:>9.3f}"
                f"{ref_cpu / fast_cpu:>10.1f}{stats['candidates'] / queries:>8.0f}"
                f"{visits / queries:>9.2f}{stats['fallbacks'] / max(visits, 1):>9.3f}"
                f"  {same}",
                flush=True,
            )


if __name__ == "__main__":
    main()
