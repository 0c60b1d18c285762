"""Can the model copy? The smallest retrieval task: a random string, then the same string again.

Each example is `S` random lowercase letters followed by the same `S` letters. The loss and the accuracy count only
the copy's bytes after its first (which nothing predicts): a model that retrieves "what followed the earlier
occurrence of the byte I just read" gets them all right; one that cannot stays at chance (ln 26 = 3.258 nats, 1/26
accuracy). Passkey retrieval and associative recall (scripts/long_context.py) need exactly this ability.

With a fixed S the copy is always S - 1 bytes back, so position alone can find it (a DFN trained that way scores
chance at other S; see the README). `--min-string-length` draws S per example and pads with random letters to
`2 * --string-length` bytes, so that only the content can find the copy.

Models (all trained the same way through `transformers.Trainer`, same seed and data):

* `llama`: a same-size LlamaForCausalLM (sdpa);
* `dfn`: the default DFN. Its kernel is symmetric: entity i finds entity j where j finds i, so it can find "an
  entity like me" but not "the entity after one like me";
* `dfn-query-flow`: `use_query_flow=True`, each entity looks from a moved point `p_i' + α W_q s_i`;
* `dfn-query-flow-all`: the same with `num_neighbors` = the whole sequence: every earlier entity is a candidate.

    python scripts/copy_task.py --quick                  # seconds; the test suite runs it
    python scripts/copy_task.py                          # the four models, 300 steps each (~20 min on 1 CPU core)
    python scripts/copy_task.py --min-string-length 24   # S from 24 to 48: copying by content only

Writes `<out-dir>/copy_task.json` and `<out-dir>/copy_task.png` (loss curves) and prints a table.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

import torch
from torch.utils.data import IterableDataset

sys.path.insert(0, str(Path(__file__).resolve().parent))

import train as train_lib  # noqa: E402  (scripts/train.py)
from cli import non_negative_int, positive_int, quick_defaults, refuse_overwrite  # noqa: E402

MODELS = ("llama", "dfn", "dfn-query-flow", "dfn-query-flow-all")
LETTERS = 26
FIRST_LETTER = ord("a")
IGNORE = -100


def copy_example(generator: torch.Generator, length: int, min_length: int | None = None) -> dict:
    """S random letters twice, S drawn from [`min_length`, `length`] (default: always `length`), then random letters
    up to `2 * length` bytes; labels only on the copy's bytes after its first. With a fixed S the copy sits at a
    fixed offset, which position alone can find; a varying S leaves only the content to find it by."""
    size = length if min_length is None else int(torch.randint(min_length, length + 1, (), generator=generator))
    letters = torch.randint(FIRST_LETTER, FIRST_LETTER + LETTERS, (2 * length - size,), generator=generator)
    ids = torch.cat([letters[:size], letters])
    labels = torch.full_like(ids, IGNORE)
    labels[size + 1 : 2 * size] = ids[size + 1 : 2 * size]
    return {"input_ids": ids, "labels": labels}


class CopyStream(IterableDataset):
    """Endless copy examples from a fixed seed."""

    def __init__(self, length: int, seed: int, min_length: int | None = None):
        self.length, self.seed, self.min_length = length, seed, min_length

    def __iter__(self):
        generator = torch.Generator().manual_seed(self.seed)
        while True:
            yield copy_example(generator, self.length, self.min_length)


def build_model(name: str, args):
    from transformers import set_seed

    from dfn import DFNForCausalLM
    from dfn.baselines import same_size_llama

    variants = {
        "dfn": {},
        "dfn-query-flow": {"use_query_flow": True},
        "dfn-query-flow-all": {"use_query_flow": True, "num_neighbors": 2 * args.string_length},
    }
    set_seed(args.seed)
    if name == "llama":
        return same_size_llama(train_lib.dfn_config_from_args(args), max_position_embeddings=2 * args.string_length)
    if name not in variants:
        raise ValueError(f"unknown model {name!r}; known: {MODELS}")
    return DFNForCausalLM(train_lib.dfn_config_from_args(args, **variants[name]))


def train_model(model, name: str, args) -> dict:
    out_dir = str(Path(args.out_dir) / "runs" / name)
    stream = CopyStream(args.string_length, args.seed, args.min_string_length)
    logging_steps = max(1, args.steps // 30)
    return train_lib.train_on_stream(model, stream, out_dir, args, logging_steps, disable_tqdm=args.no_progress)


@torch.no_grad()
def evaluate(model, args) -> dict:
    """Copy loss and accuracy; for DFN also with `--eval-neighbors` neighbours (a model trained with every earlier
    entity as a candidate, read with only the K nearest: does its learned geometry put the answer among them?), and
    with `--eval-min-string-length` on strings of varying length (did it learn the content or the offset?)."""
    result = score(model, args, args.min_string_length)
    if getattr(model.config, "model_type", "") == "dfn" and args.eval_neighbors:
        trained, model.config.num_neighbors = model.config.num_neighbors, args.eval_neighbors
        sparse = score(model, args, args.min_string_length)
        model.config.num_neighbors = trained
        result.update({f"{name}_k{args.eval_neighbors}": value for name, value in sparse.items()})
    if args.eval_min_string_length is not None:
        varied = score(model, args, args.eval_min_string_length)
        result.update({f"{name}_varied": value for name, value in varied.items()})
    return result


@torch.no_grad()
def score(model, args, min_length: int | None) -> dict:
    """Loss (nats) and accuracy of the argmax over the copy bytes of `--eval-examples` unseen examples (strings of
    `--string-length` letters, or from `min_length` to that)."""
    model.eval()
    generator = torch.Generator().manual_seed(args.seed + 1)
    batch = [copy_example(generator, args.string_length, min_length) for _ in range(args.eval_examples)]
    ids = torch.stack([b["input_ids"] for b in batch]).to(model.device)
    targets = torch.stack([b["labels"] for b in batch])[:, 1:].to(model.device)
    logits = model(ids).logits[:, :-1].float()
    scored = targets != IGNORE
    loss = torch.nn.functional.cross_entropy(logits[scored], targets[scored]).item()
    accuracy = (logits.argmax(-1)[scored] == targets[scored]).float().mean().item()
    return {"copy_loss": loss, "copy_accuracy": accuracy}


def string_sizes(args) -> str:
    """S as the report shows it: `48`, or `24-48` when it varies."""
    if args.min_string_length is None:
        return str(args.string_length)
    return f"{args.min_string_length}-{args.string_length}"


def plot(results: dict, path: Path, args) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for name, r in results.items():
        steps, losses = zip(*r["loss_curve"], strict=True) if r["loss_curve"] else ((), ())
        ax.plot(steps, losses, marker=".", label=f"{name} (final {r['copy_loss']:.3f}, acc {r['copy_accuracy']:.2f})")
    ax.axhline(math.log(LETTERS), color="grey", linestyle=":", label="chance (ln 26)")
    ax.set_xlabel("step")
    ax.set_ylabel("training loss on the copy (nats)")
    ax.set_title(f"Copy task: {string_sizes(args)} random letters, then the same again")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="tiny models, a few steps (seconds); explicit flags win")
    p.add_argument("--models", default=",".join(MODELS), help=f"comma list of {MODELS}")
    p.add_argument("--steps", type=positive_int, default=300)
    p.add_argument("--string-length", type=positive_int, default=48, help="S: letters before the copy (the longest S)")
    p.add_argument(
        "--min-string-length",
        type=positive_int,
        default=None,
        help="draw S per example from [this, --string-length] (default: S fixed), so the copy's offset varies",
    )
    p.add_argument("--batch-size", type=positive_int, default=32)
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--geometry-lr-scale", type=float, default=train_lib.TrainConfig.geometry_lr_scale)
    train_lib.add_model_size_args(p, layers=2, num_neighbors=16, memory_slots=8)
    p.add_argument("--eval-examples", type=positive_int, default=256)
    p.add_argument(
        "--eval-neighbors", type=non_negative_int, default=16, help="DFN models are also scored with this K (0: no)"
    )
    p.add_argument(
        "--eval-min-string-length",
        type=positive_int,
        default=None,
        help="also score every model on S drawn from [this, --string-length] (after training on a fixed S: does it "
        "copy by content or by the fixed offset?)",
    )
    p.add_argument("--threads", type=int, default=1, help="torch threads (one is fastest on a shared 2-core machine)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-progress", action="store_true")
    p.add_argument("--out-dir", default="outputs/copy_task")
    p.add_argument("--overwrite", action="store_true", help="replace the results of an earlier run in --out-dir")
    args = p.parse_args(argv)
    if args.quick:
        quick_defaults(args, p, argv, steps=4, string_length=8, batch_size=4, hidden_size=32, num_neighbors=4)
        quick_defaults(args, p, argv, memory_slots=2, memory_chunk_size=8, eval_examples=8, eval_neighbors=4)
    for flag in ("min_string_length", "eval_min_string_length"):
        value = getattr(args, flag)
        if value is not None and not 2 <= value <= args.string_length:
            p.error(f"--{flag.replace('_', '-')} must be in [2, --string-length = {args.string_length}]")
    unknown = set(args.models.split(",")) - set(MODELS)
    if unknown:
        p.error(f"unknown models {sorted(unknown)}; known: {MODELS}")
    return args


def main(argv=None) -> dict:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    out = Path(args.out_dir)
    refuse_overwrite([out], args.overwrite)
    out.mkdir(parents=True, exist_ok=True)
    print(f"machine: {train_lib.hardware_string()} torch_threads={torch.get_num_threads()}")
    print(f"command: {' '.join(sys.argv)}")
    results = {}
    for name in args.models.split(","):
        model = build_model(name, args)
        params = sum(p.numel() for p in model.parameters())
        print(f"== {name}: {params:,} parameters, {args.steps} steps", flush=True)
        results[name] = {"params": params, **train_model(model, name, args), **evaluate(model, args)}
        with open(out / "copy_task.json", "w") as f:
            json.dump({"args": vars(args), "results": results}, f, indent=2)
    plot(results, out / "copy_task.png", args)
    print(f"\ncopy task, S = {string_sizes(args)}; chance: loss {math.log(LETTERS):.3f}, accuracy {1 / LETTERS:.3f}")
    k, varied = args.eval_neighbors, args.eval_min_string_length
    print(
        f"| model | params | copy loss (nats) | copy accuracy | accuracy read with K={k} "
        f"| accuracy at S = {varied}-{args.string_length} | train s |"
    )
    print("|---|---:|---:|---:|---:|---:|---:|")
    for name, r in results.items():
        sparse, other = (f"{r[key]:.3f}" if key in r else "" for key in (f"copy_accuracy_k{k}", "copy_accuracy_varied"))
        print(
            f"| {name} | {r['params']:,} | {r['copy_loss']:.3f} | {r['copy_accuracy']:.3f} | {sparse} | {other} "
            f"| {r['seconds']:.0f} |"
        )
    print(f"written: {out}/copy_task.json, copy_task.png")
    return results


if __name__ == "__main__":
    main()
