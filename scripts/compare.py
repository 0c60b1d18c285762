"""DFN against a same-parameter-count Llama (byte vocabulary) on Tiny Shakespeare, plus DFN ablations.

Every run uses scripts/train.py (transformers.Trainer) with the same data (nanoGPT byte split), steps, batch,
schedule (AdamW, warmup + cosine to 10 %) and seed; only the model differs. Reports val loss (nats/byte) and
bits/byte on the whole validation split, training tokens/s, the curves on one PNG (against steps and against
wall-clock seconds), and a Markdown table with the command, hardware, commit and wall time.

    python scripts/compare.py --preset quick            # seconds: tiny models, a few steps (the test suite's check)
    python scripts/compare.py --preset cpu --jobs 2     # < 60 min on 2 cores (d=128, 4 layers, contexts 256 + 2048)
    python scripts/compare.py --preset cpu --jobs 2 --seeds 1337 1338   # dfn, no_flow and llama twice: the spread
    python scripts/compare.py --preset gpu              # nanoGPT shakespeare_char: 6 layers, 384 wide, 256 ctx, 5000 it
    python scripts/compare.py --preset cpu --steps 150 --contexts 256 --variants dfn llama no_flow

Variants: dfn (full), llama (LlamaForCausalLM, intermediate size chosen to match DFN's parameter count), no_flow
(use_flow=False: time-only positions), no_memory (use_memory=False), no_flownorm (use_flownorm=False), seed_layer
(layer_variant="seed"), eight_heads (8 position heads; Llama keeps the preset's attention heads), gelu_mlp
(mlp_type="gelu": the ungated MLP DFN had before SwiGLU, about the same weights). Ablations run at the first context;
other contexts run dfn, no_flow and llama.
Outputs in --output_dir (default outputs/compare/<preset>): results.json, results.md, compare.png, one folder per run.
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import multiprocessing
import os
import shutil
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

import train as train_lib  # noqa: E402  (scripts/train.py)
from cli import positive_int  # noqa: E402

from dfn import DFNConfig, DFNForCausalLM  # noqa: E402
from dfn.baselines import llama_intermediate_size  # noqa: E402

ABLATIONS = {
    "dfn": {},
    "no_flow": {"use_flow": False},
    "no_memory": {"use_memory": False},
    "no_flownorm": {"use_flownorm": False},
    "seed_layer": {"layer_variant": "seed"},
    "eight_heads": {"num_attention_heads": 8},
    "gelu_mlp": {"mlp_type": "gelu"},
}
ALL_VARIANTS = ["dfn", "llama", "no_flow", "no_memory", "no_flownorm", "seed_layer", "eight_heads", "gelu_mlp"]
# the runs the targets compare: they also run at later contexts and with extra seeds
TARGET_VARIANTS = ["dfn", "no_flow", "llama"]

PRESETS = {
    # the test suite's check: every code path, tiny models, seconds
    "quick": dict(
        model=dict(
            hidden_size=32,
            num_hidden_layers=2,
            num_attention_heads=2,
            pos_dim=2,
            num_neighbors=8,
            memory_slots=4,
            memory_chunk_size=16,
            mlp_ratio=4.0,
            dropout=0.0,
        ),
        contexts=[32],
        tokens_per_batch=128,
        steps=6,
        learning_rate=1e-2,
        warmup_steps=2,
        eval_steps=3,
        eval_blocks=4,
        final_eval_blocks=8,
    ),
    # fits < 60 min on 2 idle CPU cores (measured per-step costs: DFN ~1-1.5 s, Llama ~0.4 s at 16 x 256 bytes)
    "cpu": dict(
        model=dict(
            hidden_size=128,
            num_hidden_layers=4,
            num_attention_heads=4,
            pos_dim=2,
            num_neighbors=32,
            memory_slots=16,
            memory_chunk_size=64,
            mlp_ratio=4.0,
            dropout=0.0,
        ),
        contexts=[256, 2048],
        tokens_per_batch=16 * 256,
        steps=300,
        learning_rate=2e-3,
        warmup_steps=30,
        eval_steps=50,
        eval_blocks=32,
        final_eval_blocks=0,
    ),
    # nanoGPT config/train_shakespeare_char.py: n_layer 6, n_head 6, n_embd 384, block 256, batch 64, 5000 iters,
    # lr 1e-3, min lr 1e-4, warmup 100, beta2 0.99, dropout 0.2 (nanoGPT's transformer reaches val 1.4697)
    "gpu": dict(
        model=dict(
            hidden_size=384,
            num_hidden_layers=6,
            num_attention_heads=6,
            pos_dim=2,
            num_neighbors=64,
            memory_slots=16,
            memory_chunk_size=64,
            mlp_ratio=4.0,
            dropout=0.2,
        ),
        contexts=[256, 2048],
        tokens_per_batch=64 * 256,
        steps=5000,
        learning_rate=1e-3,
        warmup_steps=100,
        eval_steps=250,
        eval_blocks=200,
        final_eval_blocks=0,
    ),
}


def llama_kwargs_matching(dfn_params: int, model: dict) -> dict:
    """LlamaConfig kwargs with DFN's width, depth and heads and the MLP width that matches `dfn_params`."""
    d, layers = model["hidden_size"], model["num_hidden_layers"]
    return dict(
        hidden_size=d,
        num_hidden_layers=layers,
        num_attention_heads=model["num_attention_heads"],
        num_key_value_heads=model["num_attention_heads"],
        intermediate_size=llama_intermediate_size(dfn_params, d, layers),
        attention_dropout=model.get("dropout", 0.0),
        rms_norm_eps=1e-6,
    )


def run_one(name: str, context: int, seed: int, preset: dict, args, out_root: Path, dfn_params: int) -> dict:
    model = dict(preset["model"])
    model_type = "llama" if name == "llama" else "dfn"
    if model_type == "llama":
        model = llama_kwargs_matching(dfn_params, preset["model"])
    else:
        model.update(ABLATIONS[name])
    batch = max(1, preset["tokens_per_batch"] // context)
    cfg = train_lib.make_config(
        None,
        dict(
            model_type=model_type,
            model=model,
            train_files=[args.data],
            block_size=context,
            batch_size=batch,
            max_steps=args.steps or preset["steps"],
            learning_rate=preset["learning_rate"],
            geometry_lr_scale=args.geometry_lr_scale,
            warmup_steps=preset["warmup_steps"],
            eval_steps=preset["eval_steps"],
            eval_blocks=preset["eval_blocks"],
            final_eval_blocks=preset["final_eval_blocks"],
            logging_steps=max(1, preset["eval_steps"] // 5),
            save_steps=0,
            seed=seed,
            bf16=args.bf16,
            time_budget_s=args.time_budget_s,
            output_dir=str(out_root / f"{name}-ctx{context}{'' if seed == args.seeds[0] else f'-seed{seed}'}"),
            overwrite=True,
            quiet=True,
            report_to="none",
        ),
    )
    t = time.time()
    summary = train_lib.train(cfg, command=" ".join(["python", "scripts/compare.py", *sys.argv[1:]]))
    summary.pop("_trainer")
    rows = list(csv.DictReader(open(os.path.join(cfg.output_dir, "log.csv"))))
    curve = [(int(r["step"]), float(r["time_s"]), float(r["eval_loss"])) for r in rows if r.get("eval_loss")]
    result = dict(
        run=name,
        context=context,
        seed=seed,
        model_type=model_type,
        parameters=summary["parameters"],
        steps=summary["train_steps"],
        batch_size=batch,
        val_loss=summary["val_loss"],
        val_bpb=summary["val_bpb"],
        train_loss=summary["train_loss"],
        tokens_per_s=summary["tokens_per_s"],
        wall_s=round(time.time() - t, 1),
        curve=curve,
        model_overrides=(
            ABLATIONS.get(name, {}) if model_type == "dfn" else {"intermediate_size": model["intermediate_size"]}
        ),
    )
    print(
        f"  {name:<12} ctx {context:>5} seed {seed}: val {result['val_loss']:.4f} nats/byte "
        f"({result['val_bpb']:.3f} bpb), {result['parameters']:,} params, "
        f"{result['tokens_per_s']:.0f} tok/s, {result['wall_s']:.0f}s",
        flush=True,
    )
    return result


def run_all(jobs: list[tuple[str, int, int]], preset: dict, args, out_root: Path, dfn_params: int) -> list[dict]:
    """`run_one` for every (variant, context, seed), `args.jobs` at a time in fresh processes (1 = in this one)."""
    if args.jobs == 1:
        return [run_one(*job, preset, args, out_root, dfn_params) for job in jobs]
    spawn = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(args.jobs, mp_context=spawn, initializer=set_threads, initargs=(args.threads,)) as pool:
        futures = [pool.submit(run_one, *job, preset, args, out_root, dfn_params) for job in jobs]
        return [future.result() for future in futures]


def set_threads(threads: int) -> None:
    if threads:
        import torch

        torch.set_num_threads(threads)


def equal_time_losses(a: dict, b: dict) -> tuple[float, float, float] | None:
    """Periodic-eval losses of runs `a` and `b` interpolated at the wall-clock time where the shorter run ended."""
    if not a["curve"] or not b["curve"]:
        return None
    t = min(a["curve"][-1][1], b["curve"][-1][1])

    def at(curve):
        times, losses = [c[1] for c in curve], [c[2] for c in curve]
        if t <= times[0]:
            return losses[0] if t == times[0] else math.nan
        return float(np.interp(t, times, losses))

    return t, at(a["curve"]), at(b["curve"])


def relative_gain(baseline: list[float], model: list[float]) -> str:
    """`(baseline - model) / baseline` on the means over seeds, with the per-seed values when there are several."""
    gain = (sum(baseline) / len(baseline) - sum(model) / len(model)) / (sum(baseline) / len(baseline))
    if len(model) == 1:
        return f"{gain:+.2%}"
    per_seed = ", ".join(f"{(b - m) / b:+.2%}" for b, m in zip(baseline, model, strict=False))
    return f"{gain:+.2%} on the mean over seeds (per seed: {per_seed})"


def plot(results: list[dict], path: Path, title: str) -> None:
    """Val-loss curves, one row per context, against steps and against wall-clock seconds: a colour per variant,
    a line style per seed."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    contexts = sorted({r["context"] for r in results})
    seeds = sorted({r["seed"] for r in results})
    fig, axes = plt.subplots(len(contexts), 2, figsize=(13, 4.2 * len(contexts)), squeeze=False)
    for r in results:
        if not r["curve"]:
            continue
        steps, seconds, losses = zip(*r["curve"], strict=True)
        row = axes[contexts.index(r["context"])]
        style = dict(
            color=f"C{ALL_VARIANTS.index(r['run'])}",
            linestyle=("-", "--", ":", "-.")[seeds.index(r["seed"]) % 4],
            marker=".",
            label=f"{r['run']} seed {r['seed']} ({r['val_loss']:.3f})",
        )
        row[0].plot(steps, losses, **style)
        row[1].plot(seconds, losses, **style)
    for context, row in zip(contexts, axes, strict=True):
        row[0].set_xlabel("step")
        row[1].set_xlabel("wall-clock seconds (incl. evaluation)")
        for ax in row:
            ax.set_ylabel(f"val loss, context {context} (nats/byte)")
            ax.grid(alpha=0.3)
        row[1].legend(fontsize=8)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def markdown(results: list[dict], meta: dict) -> str:
    budget = f"steps ({meta['steps']})"
    if meta.get("time_budget_s"):
        budget = f"time budget ({meta['time_budget_s']:.0f} s per run, schedule fitted to it, <= {meta['steps']} steps)"
    lines = [
        f"# DFN vs Llama on Tiny Shakespeare (bytes) — preset `{meta['preset']}`",
        "",
        f"Command: `{meta['command']}`  ",
        f"Hardware: {meta['hardware']}; {meta['jobs']} run(s) at a time  ",
        f"Commit: `{meta['commit']}`; date {meta['date']}; total wall time {meta['wall_s'] / 60:.1f} min  ",
        f"Same data (nanoGPT byte split; val = last 10 %, final score on "
        f"{meta['final_eval_blocks'] or 'all'} val blocks), {budget}, "
        f"tokens per batch ({meta['tokens_per_batch']}) and schedule for every run; seeds {meta['seeds']} "
        f"(extra seeds repeat {', '.join(TARGET_VARIANTS)}). "
        f"Losses in nats/byte; bpb = loss / ln 2; 'vs Llama' = val loss / Llama's at the same context and seed; "
        "'lowest periodic' = the lowest of the evaluations during training (on a subset of val blocks; a run that "
        "overfits ends above it).",
        "",
        "| run | context | seed | params | steps | val loss (nats/byte) | val bpb | vs Llama | lowest periodic (step) "
        "| tokens/s | wall s |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    llama = {(r["context"], r["seed"]): r["val_loss"] for r in results if r["run"] == "llama"}
    for r in results:
        key = (r["context"], r["seed"])
        ratio = f"{r['val_loss'] / llama[key]:.3f}" if key in llama else "–"
        lowest = min(r["curve"], key=lambda point: point[2]) if r["curve"] else None
        lowest = f"{lowest[2]:.4f} ({lowest[0]})" if lowest else "–"
        lines.append(
            f"| {r['run']} | {r['context']} | {r['seed']} | {r['parameters']:,} | {r['steps']} | {r['val_loss']:.4f} "
            f"| {r['val_bpb']:.3f} | {ratio} | {lowest} | {r['tokens_per_s']:.0f} | {r['wall_s']:.0f} |"
        )
    lines.append("")
    losses = {}
    for r in results:
        losses.setdefault((r["run"], r["context"]), []).append(r["val_loss"])
    mean = {key: sum(v) / len(v) for key, v in losses.items()}
    for ctx in sorted({r["context"] for r in results}):
        if ("dfn", ctx) in mean and ("no_flow", ctx) in mean:
            lines.append(
                f"- context {ctx}: flow gain (no_flow - dfn) / no_flow = "
                f"{relative_gain(losses['no_flow', ctx], losses['dfn', ctx])} (target at 2048: >= +2 %)"
            )
        if ("dfn", ctx) in mean and ("llama", ctx) in mean:
            ratios = ", ".join(f"{d / b:.3f}" for d, b in zip(losses["dfn", ctx], losses["llama", ctx], strict=False))
            lines.append(
                f"- context {ctx}: DFN / Llama val loss = {mean['dfn', ctx] / mean['llama', ctx]:.3f} on the mean "
                f"over seeds (per seed: {ratios}; target <= 0.97)"
            )
            runs = {r["run"]: r for r in results if r["context"] == ctx and r["seed"] == meta["seeds"][0]}
            same_time = equal_time_losses(runs["dfn"], runs["llama"])
            if same_time:
                t, dfn_loss, llama_loss = same_time
                lines.append(
                    f"- context {ctx}: at equal wall-clock ({t:.0f} s, periodic-eval losses interpolated): DFN "
                    f"{dfn_loss:.4f}, Llama {llama_loss:.4f} (ratio {dfn_loss / llama_loss:.3f})"
                )
    return "\n".join(lines) + "\n"


def main(argv=None) -> list[dict]:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], epilog=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--preset", choices=sorted(PRESETS), default="cpu")
    parser.add_argument("--quick", action="store_true", help="= --preset quick (seconds; used by the tests)")
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (0 = torch's default)")
    parser.add_argument(
        "--jobs", type=positive_int, default=1, help="runs at a time, each in its own process (2 on a 2-core machine)"
    )
    parser.add_argument("--steps", type=positive_int, default=None, help="override the preset's steps")
    parser.add_argument("--contexts", type=positive_int, nargs="+", default=None, help="override the preset's contexts")
    parser.add_argument(
        "--variants",
        nargs="+",
        choices=ALL_VARIANTS,
        default=None,
        help="runs at the first context (default: all); later contexts run dfn, no_flow, llama",
    )
    parser.add_argument(
        "--model",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="DFN config override for every DFN run (repeatable); Llama's size follows the overridden DFN",
    )
    parser.add_argument(
        "--geometry_lr_scale",
        type=float,
        default=train_lib.TrainConfig.geometry_lr_scale,
        help="learning-rate multiplier for DFN's geometry parameters (as train.py --geometry_lr_scale)",
    )
    parser.add_argument("--data", default="data/tinyshakespeare.txt")
    parser.add_argument(
        "--seeds",
        "--seed",
        type=int,
        nargs="+",
        default=[1337],
        help=f"seeds; the extra ones repeat {', '.join(TARGET_VARIANTS)}",
    )
    parser.add_argument("--bf16", action="store_true")
    parser.add_argument(
        "--time_budget_s",
        type=float,
        default=0,
        help="seconds per run: the cosine schedule is fitted to it (train.py --time_budget_s); 0 = the preset's steps",
    )
    parser.add_argument("--output_dir", default=None)
    parser.add_argument("--overwrite", action="store_true")
    args = parser.parse_args(argv)

    if args.quick:
        args.preset = "quick"
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    preset = dict(PRESETS[args.preset])
    preset["model"] = {**preset["model"], **train_lib.parse_model_overrides(args.model)}
    contexts = args.contexts or preset["contexts"]
    variants = args.variants or ALL_VARIANTS
    out_root = Path(args.output_dir or train_lib.REPO_ROOT / "outputs" / "compare" / args.preset)
    if out_root.exists() and any(out_root.iterdir()):
        if not args.overwrite:
            raise SystemExit(f"{out_root} is not empty: pass --overwrite (deletes it) or another --output_dir")
        shutil.rmtree(out_root)
    out_root.mkdir(parents=True)

    start, commit = time.time(), train_lib.git_commit()  # the code the runs use, whatever is committed meanwhile
    jobs = [
        (name, context, seed)
        for seed_index, seed in enumerate(args.seeds)
        for i, context in enumerate(contexts)
        for name in (variants if i == 0 else [v for v in TARGET_VARIANTS if v in variants])
        if seed_index == 0 or name in TARGET_VARIANTS
    ]
    dfn_params = train_lib.count_parameters(DFNForCausalLM(DFNConfig(**preset["model"])))  # Llama is sized to it
    print(f"{len(jobs)} runs, {args.jobs} at a time: {', '.join(f'{n}@{c}/{s}' for n, c, s in jobs)}", flush=True)
    results = run_all(jobs, preset, args, out_root, dfn_params)

    meta = dict(
        preset=args.preset,
        command=" ".join(["python", "scripts/compare.py", *(sys.argv[1:] if argv is None else argv)]),
        hardware=train_lib.hardware_string(),
        commit=commit,
        date=time.strftime("%Y-%m-%d %H:%M"),
        wall_s=time.time() - start,
        steps=args.steps or preset["steps"],
        time_budget_s=args.time_budget_s,
        tokens_per_batch=preset["tokens_per_batch"],
        seeds=args.seeds,
        final_eval_blocks=preset["final_eval_blocks"],
        threads=__import__("torch").get_num_threads(),
        jobs=args.jobs,
    )
    table = markdown(results, meta)
    (out_root / "results.md").write_text(table)
    with open(out_root / "results.json", "w") as f:
        json.dump({"meta": meta, "results": results}, f, indent=2)
    plot(results, out_root / "compare.png", f"DFN vs Llama, Tiny Shakespeare bytes, preset {args.preset}")
    print("\n" + table)
    print(f"written: {out_root}/results.md, results.json, compare.png")
    assert all(math.isfinite(r["val_loss"]) for r in results)
    return results


if __name__ == "__main__":
    main()
