"""Scaling benchmark: DFN against a same-parameter-count LlamaForCausalLM (sdpa), side by side in one run.

For each sequence length it measures forward time, forward+backward time and peak memory of both models on the same
random byte inputs, and cached decoding latency per token at several context lengths. On the CPU each measurement runs
in a fresh subprocess (in this one with --quick) so that its peak RSS belongs to that measurement alone; on a GPU they
run in this process, with the allocator's cache emptied and its peak counters (allocated, reserved) reset before each.
Prints a table, fitted scaling exponents, DFN/Llama ratios, machine, threads and versions; writes JSON and a log-log
PNG. The baseline is skipped (and marked) where its predicted time or memory exceeds the caps.

    python scripts/benchmark.py --quick                      # seconds: the test suite runs this
    python scripts/benchmark.py                              # CPU: 512 .. 131072 bytes (long)
    python scripts/benchmark.py --device cuda --lengths 1024,4096,16384,65536,262144,1048576 --train-max-length 262144
    python scripts/benchmark.py --compile-decoding           # DFN decoding through model.compile_decoding()
"""

import argparse
import gc
import json
import math
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

import torch
from cli import non_negative_int, positive_int, quick_defaults, refuse_overwrite

REPO = Path(__file__).resolve().parents[1]


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=1, help="torch threads for both models (0: torch's default)")
    parser.add_argument("--min-length", type=positive_int, default=512)
    parser.add_argument("--max-length", type=positive_int, default=131072)
    parser.add_argument(
        "--lengths",
        type=lambda text: sorted(positive_int(n) for n in text.split(",")),
        default=None,
        help="comma-separated lengths (replaces the powers of two from --min-length to --max-length)",
    )
    parser.add_argument(
        "--train-max-length", type=positive_int, default=16384, help="longest forward+backward measured"
    )
    parser.add_argument("--decode-contexts", default="1024,8192,32768,131072")
    parser.add_argument("--decode-steps", type=positive_int, default=16)
    parser.add_argument(
        "--decode-flat-max",
        type=non_negative_int,
        default=0,
        help="DFN decoding: most nodes of a box-tree level a step bounds all at once (eager: it starts at the "
        "lowest such level; compiled: at the level above the blocks, else eagerly) (0: the library's)",
    )
    parser.add_argument(
        "--compile-decoding",
        action="store_true",
        help="DFN decoding through `model.compile_decoding()` (torch.compile; the first 66 steps compile, untimed)",
    )
    parser.add_argument("--hidden-size", type=positive_int, default=256)
    parser.add_argument("--layers", type=positive_int, default=4)
    parser.add_argument("--heads", type=positive_int, default=4)
    parser.add_argument("--num-neighbors", type=positive_int, default=32)
    parser.add_argument(
        "--mix-kernel", default="torch", choices=["torch", "triton"], help="DFN's kernel mix without gradients"
    )
    parser.add_argument("--repeats", type=positive_int, default=3)
    parser.add_argument(
        "--long-length",
        type=positive_int,
        default=16384,
        help="from this length on: one warm-up call and one timed call",
    )
    parser.add_argument(
        "--cold-cap",
        type=float,
        default=60.0,
        help="seconds: a long run whose warm-up call takes longer reports that (cold) call instead of repeating it",
    )
    parser.add_argument("--baseline-time-cap", type=float, default=200.0, help="seconds per baseline call")
    parser.add_argument("--baseline-mem-cap", type=float, default=16.0, help="GiB per baseline measurement")
    parser.add_argument("--out-dir", default="outputs/benchmark")
    parser.add_argument("--overwrite", action="store_true", help="replace benchmark.json and scaling.png there")
    parser.add_argument("--quick", action="store_true", help="tiny models and lengths (seconds); explicit flags win")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.quick:
        quick_defaults(args, parser, argv, min_length=256, max_length=512, train_max_length=512, decode_steps=4)
        quick_defaults(args, parser, argv, decode_contexts="128,256", repeats=1, hidden_size=32, layers=2, heads=2)
        quick_defaults(args, parser, argv, num_neighbors=8)
    if args.lengths:
        args.min_length, args.max_length = args.lengths[0], args.lengths[-1]
    return args


# ----------------------------------------------------------------------------- models


def dfn_config(args):
    from dfn import DFNConfig

    return DFNConfig(
        hidden_size=args.hidden_size,
        num_hidden_layers=args.layers,
        num_attention_heads=args.heads,
        num_neighbors=args.num_neighbors,
        mix_kernel=args.mix_kernel,
    )


def build_model(kind: str, args):
    """DFN, or the same-parameter-count Llama (sdpa)."""
    from dfn import DFNForCausalLM
    from dfn.baselines import same_size_llama

    config = dfn_config(args)
    if kind == "dfn":
        return DFNForCausalLM(config)
    return same_size_llama(config, max_position_embeddings=max(args.max_length, 4096) * 2)


def peak_memory(device) -> dict:
    if device.type == "cuda":
        return {
            "allocated_gib": torch.cuda.max_memory_allocated() / 2**30,
            "reserved_gib": torch.cuda.max_memory_reserved() / 2**30,
        }
    import resource

    return {"rss_gib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20}


def wall_seconds(fn, device) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - start


def timed(fn, device, repeats: int, long_run: bool, cold_cap: float) -> dict:
    """Median wall seconds of `fn()` over `repeats` calls (one for long runs) after a warm-up call.

    The first call at a new length pays for faulting in fresh memory (measured: 9 s of system time in an 18 s DFN
    forward+backward at 16k; the second call took 8.8 s), which steady-state training and serving do not pay, so it
    is reported as `first_call_seconds` but not timed. A long run whose warm-up call alone exceeds `cold_cap` reports
    that call, marked `cold`, instead of running twice.
    """
    first = wall_seconds(fn, device)
    if long_run and first > cold_cap:
        return {"seconds": first, "first_call_seconds": first, "cold": True}
    times = sorted(wall_seconds(fn, device) for _ in range(1 if long_run else repeats))
    return {"seconds": times[len(times) // 2], "first_call_seconds": first}


def weight_pass_ms(model, device, passes: int = 32) -> float:
    """Median milliseconds of one matrix-vector product with every `nn.Linear` weight of `model`, each read once:
    what a decoding step of one token spends at least on its matrix products (a floor set by memory bandwidth and
    cache size, not by the architecture)."""
    weights = [m.weight for m in model.modules() if isinstance(m, torch.nn.Linear)]
    inputs = [torch.randn(1, w.shape[1], dtype=w.dtype, device=device) for w in weights]

    def one_pass():
        for x, w in zip(inputs, weights, strict=True):
            torch.nn.functional.linear(x, w)

    one_pass()
    return 1000 * sorted(wall_seconds(one_pass, device) for _ in range(passes))[passes // 2]


def worker(spec: dict, args) -> dict:
    """One measurement in this (fresh) process: `spec` = {kind, mode: "forward"|"train"|"decode", length}."""
    torch.manual_seed(0)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    if args.decode_flat_max:
        import dfn.neighbors_dfn

        dfn.neighbors_dfn._FLAT_MAX_BOXES = args.decode_flat_max
    model = build_model(spec["kind"], args).to(device)
    ids = torch.randint(0, 256, (1, spec["length"]), device=device)
    result = {"params": sum(p.numel() for p in model.parameters())}
    long_run = spec["length"] >= args.long_length
    if spec["mode"] == "forward":
        model.eval()
        with torch.no_grad():
            result.update(timed(lambda: model(ids, use_cache=False), device, args.repeats, long_run, args.cold_cap))
    elif spec["mode"] == "train":
        model.train()

        def step():
            model.zero_grad(set_to_none=True)
            model(ids, labels=ids, use_cache=False).loss.backward()

        result.update(timed(step, device, args.repeats, long_run, args.cold_cap))
    else:
        model.eval()
        with torch.no_grad():
            out = model(ids, use_cache=True, logits_to_keep=1)
            cache, token = out.cache, out.logits.argmax(-1)
            if args.compile_decoding and spec["kind"] == "dfn":
                model.compile_decoding()
            # warm-up steps; compiled, the graphs compile here, also those of the steps around a completed block
            for _ in range(66 if args.compile_decoding else 2):
                out = model(token, cache=cache, use_cache=True)
                cache, token = out.cache, out.logits[:, -1:].argmax(-1)
            if device.type == "cuda":
                torch.cuda.synchronize()
            start = time.perf_counter()
            for _ in range(args.decode_steps):
                out = model(token, cache=cache, use_cache=True)
                cache, token = out.cache, out.logits[:, -1:].argmax(-1)
            if device.type == "cuda":
                torch.cuda.synchronize()
            result["ms_per_token"] = 1000 * (time.perf_counter() - start) / args.decode_steps
            result["weight_pass_ms"] = weight_pass_ms(model, device)
    result.update(peak_memory(device))
    return result


def run_worker(spec: dict, args, argv: list[str]) -> dict:
    """Run one measurement in a fresh process on the CPU; in this one on a GPU (peak counters reset) and with --quick
    (memory figures are then process-wide)."""
    if args.device.startswith("cuda"):
        gc.collect()  # the previous measurement's model, if a reference cycle holds it
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
        try:
            return worker(spec, args)
        except Exception as error:  # noqa: BLE001 - reported like a failed subprocess; the sweep goes on
            return {"error": f"{type(error).__name__}: {error}".splitlines()[0]}
    if args.quick:
        return worker(spec, args)
    command = [sys.executable, __file__, *argv, "--worker", json.dumps(spec)]
    proc = subprocess.run(command, capture_output=True, text=True, cwd=REPO)
    if proc.returncode != 0:
        return {"error": proc.stderr.strip().splitlines()[-1] if proc.stderr.strip() else f"exit {proc.returncode}"}
    return json.loads(proc.stdout.strip().splitlines()[-1])


# ----------------------------------------------------------------------------- sweep


def predicted_exceeds(previous: dict | None, factor: float, args) -> bool:
    """Whether the baseline's next run would pass a cap: time extrapolated quadratically in length (attention),
    memory linearly."""
    if previous is None or "seconds" not in previous:
        return False
    memory = previous.get("rss_gib", previous.get("allocated_gib", 0))
    return previous["seconds"] * factor**2 > args.baseline_time_cap or memory * factor > args.baseline_mem_cap


def sweep(args, argv, partial: Path) -> dict:
    """Every measurement, the results so far rewritten to `partial` after each one (a run cut short keeps them)."""
    from tqdm import tqdm

    lengths = args.lengths or [
        2**p for p in range(int(math.log2(args.min_length)), int(math.log2(args.max_length)) + 1)
    ]
    contexts = [int(c) for c in args.decode_contexts.split(",")]
    jobs = [
        (mode, n) for n in lengths for mode in ("forward", "train") if mode == "forward" or n <= args.train_max_length
    ]
    jobs += [("decode", c) for c in contexts]
    results = {kind: {mode: {} for mode in ("forward", "train", "decode")} for kind in ("dfn", "llama")}
    last = {}  # (kind, mode) -> (length, result) of the longest run measured
    for mode, n in tqdm(jobs, desc="benchmark", unit="run"):
        for kind in ("dfn", "llama"):
            # a decoding run starts with a forward (prefill) over its context: predict from the forward runs
            length, previous = last.get((kind, "forward" if mode == "decode" else mode), (n, None))
            if kind == "llama" and predicted_exceeds(previous, n / length, args):
                results[kind][mode][n] = {"skipped": "predicted to exceed the time/memory cap"}
                continue
            results[kind][mode][n] = run_worker({"kind": kind, "mode": mode, "length": n}, args, argv)
            if "seconds" in results[kind][mode][n]:
                last[(kind, mode)] = (n, results[kind][mode][n])
            partial.write_text(json.dumps(results, indent=2))
    return results


def fitted_exponent(curve: dict, key: str, min_length: int) -> float | None:
    """Slope of log(value) against log(length) over the measured points at or above `min_length`."""
    points = [(math.log(n), math.log(r[key])) for n, r in curve.items() if key in r and n >= min_length and r[key] > 0]
    if len(points) < 2:
        return None
    mean_x = sum(x for x, _ in points) / len(points)
    mean_y = sum(y for _, y in points) / len(points)
    return sum((x - mean_x) * (y - mean_y) for x, y in points) / sum((x - mean_x) ** 2 for x, _ in points)


def environment(args) -> dict:
    import transformers

    info = {
        "machine": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "torch_threads": args.threads or torch.get_num_threads(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "device": args.device,
    }
    if args.device.startswith("cuda") and torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name()
    try:
        info["commit"] = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, cwd=REPO
        ).stdout.strip()
    except OSError:
        pass
    return info


def memory_key(result: dict) -> str:
    return "rss_gib" if "rss_gib" in result else "allocated_gib"


def show(result: dict, key: str, unit: str) -> str:
    if key in result:
        return f"{result[key]:.4g}{unit}" + ("*" if result.get("cold") else "")
    return "skipped" if "skipped" in result else "error"


def print_report(results: dict, env: dict, args) -> dict:
    print("\n" + "  ".join(f"{k}={v}" for k, v in env.items()))
    print(
        f"DFN params {next(iter(results['dfn']['forward'].values())).get('params')}, "
        f"Llama params {next(iter(results['llama']['forward'].values())).get('params')}"
    )
    header = f"{'mode':8} {'length':>8} {'DFN':>12} {'Llama':>12} {'Llama/DFN':>10} {'DFN mem':>9} {'Llama mem':>9}"
    print(header + "\n" + "-" * len(header))
    for mode, key, unit in (("forward", "seconds", "s"), ("train", "seconds", "s"), ("decode", "ms_per_token", "ms")):
        for n, d in results["dfn"][mode].items():
            b = results["llama"][mode].get(n, {})

            ratio = f"{b[key] / d[key]:.2f}x" if key in b and key in d else "-"
            mem_d = f"{d[memory_key(d)]:.2f}G" if memory_key(d) in d else "-"
            mem_b = f"{b[memory_key(b)]:.2f}G" if memory_key(b) in b else "-"
            print(
                f"{mode:8} {n:>8} {show(d, key, unit):>12} {show(b, key, unit):>12} {ratio:>10} {mem_d:>9} {mem_b:>9}"
            )
    for kind, name in (("dfn", "DFN"), ("llama", "Llama")):
        decode = results[kind]["decode"].items()
        floors = [f"{n}: {r['weight_pass_ms']:.3g}" for n, r in decode if "weight_pass_ms" in r]
        if floors:
            print(f"{name} decoding floor, one product with each weight matrix (ms): " + ", ".join(floors))
    if any(r.get("cold") for kind in results.values() for mode in kind.values() for r in mode.values()):
        print("(* a single cold call: its warm-up call passed --cold-cap, so it includes first-touch page faults)")
    exponents = {}
    fit_from = 4096 if args.max_length >= 16384 else args.min_length
    for kind in ("dfn", "llama"):
        for mode, key in (("forward", "seconds"), ("train", "seconds"), ("decode", "ms_per_token")):
            exponents[f"{kind}_{mode}"] = fitted_exponent(results[kind][mode], key, fit_from)
        exponents[f"{kind}_forward_memory"] = fitted_exponent(
            results[kind]["forward"], memory_key(next(iter(results[kind]["forward"].values()))), fit_from
        )
    print(f"\nfitted scaling exponents (log-log slope, lengths >= {fit_from}):")
    for name, value in exponents.items():
        print(f"  {name:24} {'-' if value is None else f'{value:.3f}'}")
    for name, rows in (
        (
            "errors",
            [
                (k, m, n, r["error"])
                for k in results
                for m in results[k]
                for n, r in results[k][m].items()
                if "error" in r
            ],
        ),
    ):
        for row in rows:
            print(f"{name}: {row}")
    return exponents


def plot(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = (
        ("forward", "seconds", "forward time (s)"),
        ("train", "seconds", "forward+backward time (s)"),
        ("forward", None, "peak memory, forward (GiB)"),
        ("decode", "ms_per_token", "decode latency (ms/token)"),
    )
    fig, axes = plt.subplots(1, 4, figsize=(18, 4.2))
    for ax, (mode, key, title) in zip(axes, panels, strict=True):
        for kind, style in (("dfn", "o-"), ("llama", "s--")):
            curve = results[kind][mode]
            points = [(n, r[key or memory_key(r)]) for n, r in curve.items() if (key or memory_key(r)) in r]
            if points:
                ax.plot(*zip(*points, strict=True), style, label="DFN" if kind == "dfn" else "Llama (sdpa)")
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("context length (bytes)")
        ax.set_title(title)
        ax.grid(True, which="both", alpha=0.3)
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    if args.worker:
        print(json.dumps(worker(json.loads(args.worker), args)))
        return
    try:
        dfn_config(args)
    except ValueError as error:
        raise SystemExit(f"error: {error}") from None
    out_dir = Path(args.out_dir)
    refuse_overwrite([out_dir / "benchmark.json", out_dir / "scaling.png"], args.overwrite)
    out_dir.mkdir(parents=True, exist_ok=True)
    results = sweep(args, argv, out_dir / "benchmark.partial.json")
    env = environment(args)
    exponents = print_report(results, env, args)
    report = {"environment": env, "args": vars(args), "results": results, "exponents": exponents}
    (out_dir / "benchmark.json").write_text(json.dumps(report, indent=2))
    (out_dir / "benchmark.partial.json").unlink()
    plot(results, out_dir / "scaling.png")
    print(f"\nwrote {out_dir / 'benchmark.json'} and {out_dir / 'scaling.png'}")
    failed = [
        f"{kind} {mode} {n}"
        for kind, modes in results.items()
        for mode, runs in modes.items()
        for n, r in runs.items()
        if "error" in r
    ]
    if failed:
        raise SystemExit(f"{len(failed)} measurement(s) failed: {', '.join(failed)} (their errors are above)")


if __name__ == "__main__":
    main()
