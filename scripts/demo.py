"""`make demo`: train a small DFN on Tiny Shakespeare for a few minutes on CPU, then write with it.

    HF_HUB_OFFLINE=1 .venv/bin/python scripts/demo.py                      # what `make demo` runs
    .venv/bin/python scripts/demo.py --max-steps 60                          # a quicker look
    .venv/bin/python scripts/demo.py --output-dir outputs/my-demo --overwrite

Training goes through `scripts/train.py` (transformers.Trainer, preset `configs/demo.json`: d=128, 4 layers,
4 heads, K=32 neighbours, field memory on, 300 steps of 16 x 256 bytes, AdamW, warmup + cosine). Training is
fitted into 7 minutes (`time_budget_s` in the preset): on a slow or busy machine the cosine schedule is shortened, from
the measured seconds per step, so that it still completes. It picks 1 or all CPU threads by a short trial. It prints the
unigram baseline, the train/val loss as it falls (validation every 50 steps on 32 fixed val blocks), the final loss
on the whole validation split, then a sample continuing a prompt.

Output folder: by default a fresh `outputs/demo/<timestamp>/` per run (`outputs/demo/latest` points at the newest),
so running the demo twice never overwrites anything. `--output-dir DIR` writes exactly there; a non-empty DIR is
refused unless `--overwrite`, which deletes it first. The folder holds the model and tokenizer
(`AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True)`), `training_summary.json`, `log.csv`,
`train_config.json` and `loss_curve.png`.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import train as train_lib  # noqa: E402  (scripts/train.py)
from cli import positive_int  # noqa: E402


def parse_args(argv=None):
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], epilog=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--output-dir", default=None, help="default: a fresh outputs/demo/<timestamp>/")
    parser.add_argument("--overwrite", action="store_true", help="delete a non-empty --output-dir first")
    parser.add_argument("--preset", default="demo")
    parser.add_argument("--max-steps", type=positive_int, default=None, help="override the preset's 300 steps")
    parser.add_argument("--seed", type=int, default=None)
    parser.add_argument("--prompt", default="ROMEO:")
    parser.add_argument("--sample-bytes", type=positive_int, default=200)
    parser.add_argument("--temperature", type=float, default=0.8)
    parser.add_argument(
        "--threads",
        type=int,
        default=0,
        help="torch CPU threads; 0 = pick 1 or all cores by a 2-second trial (busy machines run "
        "several times faster on 1 thread than on oversubscribed cores)",
    )
    return parser.parse_args(argv)


def default_output_dir() -> Path:
    root = train_lib.REPO_ROOT / "outputs" / "demo"
    return root / time.strftime("%Y%m%d-%H%M%S")


def point_latest(folder: Path) -> None:
    latest = folder.parent / "latest"
    try:
        if latest.is_symlink() or latest.exists():
            latest.unlink()
        latest.symlink_to(folder.name)
    except OSError:
        pass  # symlinks are a convenience only


def choose_threads(requested: int, model_kwargs: dict) -> int:
    """Time a few forward+backward passes of the demo model with all cores and with one thread; keep the faster."""
    import torch

    cores = os.cpu_count() or 1
    if requested or cores == 1 or torch.cuda.is_available():
        return requested or torch.get_num_threads()
    from dfn import DFNConfig, DFNForCausalLM

    model = DFNForCausalLM(DFNConfig(**model_kwargs))
    x = torch.randint(0, 256, (4, 128))
    timings = {}
    for threads in (cores, 1, cores):
        torch.set_num_threads(threads)
        t = time.perf_counter()
        for _ in range(2):
            model(input_ids=x, labels=x, use_cache=False).loss.backward()
        timings[threads] = min(timings.get(threads, float("inf")), time.perf_counter() - t)
    best = min(timings, key=timings.get)
    print(f"CPU threads: {best} (trial: " + ", ".join(f"{k} -> {v:.2f}s" for k, v in timings.items()) + ")")
    return best


def generate_sample(folder: str, prompt: str, max_new_tokens: int, temperature: float, seed: int) -> str:
    """Load the saved folder the way a user would and continue `prompt`."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(folder, trust_remote_code=True)
    model = AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True).eval()
    inputs = tokenizer(prompt, return_tensors="pt", add_special_tokens=False)
    torch.manual_seed(seed)
    with torch.no_grad():
        out = model.generate(
            **inputs,
            max_new_tokens=max_new_tokens,
            do_sample=True,
            temperature=temperature,
            top_k=0,
            pad_token_id=tokenizer.pad_token_id,
        )
    return tokenizer.decode(out[0], skip_special_tokens=True)


def main(argv=None) -> dict:
    args = parse_args(argv)
    fresh = args.output_dir is None
    output_dir = default_output_dir() if fresh else Path(args.output_dir)
    overrides = {
        "output_dir": str(output_dir),
        "overwrite": args.overwrite,
        "max_steps": args.max_steps,
        "seed": args.seed,
    }
    if args.max_steps is not None:
        overrides["warmup_steps"] = max(1, args.max_steps // 10)
    cfg = train_lib.make_config(args.preset, overrides)
    command = " ".join(["python", "scripts/demo.py", *(sys.argv[1:] if argv is None else argv)])

    wall = time.time()
    import torch

    torch.set_num_threads(choose_threads(args.threads, cfg.model))
    try:
        summary = train_lib.train(cfg, command=command)
    except FileExistsError:
        raise SystemExit(
            f"error: {output_dir} exists and is not empty: pass --overwrite to delete it first, or another --output-dir"
        ) from None
    summary.pop("_trainer")
    if fresh:
        point_latest(output_dir)

    t = time.time()
    sample = generate_sample(str(output_dir), args.prompt, args.sample_bytes, args.temperature, cfg.seed)
    gen_s = time.time() - t
    wall = time.time() - wall

    below = summary["unigram_val_loss"] - summary["val_loss"]
    print("\n" + "=" * 78)
    print(f"sample ({args.sample_bytes} bytes, temperature {args.temperature}, {gen_s:.1f}s):\n")
    print(sample)
    print("=" * 78)
    print(f"val loss     {summary['val_loss']:.4f} nats/byte  ({summary['val_bpb']:.3f} bits/byte, whole val split)")
    print(
        f"unigram      {summary['unigram_val_loss']:.4f} nats/byte  ({summary['unigram_val_bpb']:.3f} bits/byte)"
        f"  -> {below:.2f} nats/byte better"
    )
    print(f"train loss   {summary['train_loss']:.4f} (last logging window)")
    print(
        f"steps        {summary['train_steps']} x {summary['batch_size']} x {summary['block_size']} bytes; "
        f"training {summary['train_time_s']:.0f}s, whole demo {wall:.0f}s; {summary['hardware']}"
    )
    print(f"checkpoint   {output_dir}  (loss_curve.png, training_summary.json inside)")
    print(f"load it      AutoModelForCausalLM.from_pretrained({str(output_dir)!r}, trust_remote_code=True)")
    if below < 0.5:
        print("WARNING: the model did not get clearly below the unigram baseline", file=sys.stderr)
    return summary


if __name__ == "__main__":
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    main()
