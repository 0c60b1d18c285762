"""Score a checkpoint folder on any text file: bits per byte, nats per byte, perplexity.

    python scripts/evaluate.py outputs/demo/latest data/tinyshakespeare.txt
    python scripts/evaluate.py outputs/demo/latest data/tinyshakespeare.txt --split val   # nanoGPT val split only
    python scripts/evaluate.py outputs/run other.txt --block-size 1024 --batch-size 4 --json scores.json
    python scripts/evaluate.py outputs/run other.txt --block-size 2048 --by-context   # loss by context length

The folder is loaded as a user would (`AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True)`), so
any causal LM with a byte vocabulary works (DFN or the Llama baseline of scripts/compare.py). The text is read as
raw UTF-8 bytes and cut into non-overlapping blocks of `--block-size` bytes (the tail shorter than a block is scored
as its own block); within a block every byte after the first is scored, so each block starts from an empty context.
Scores go through the local `evaluate` module `dfn/metrics/bits_per_byte` (form "log_probs").

    python scripts/evaluate.py outputs/demo/latest book.txt --stream --segment 4096 --window 8192

`--stream` (DFN only) reads the whole text as ONE document: segments of `--segment` bytes go through the model
with a `DFNCache`, so every byte is scored with all the context before it. With `--window W` the cache is bounded
(the last W entities per layer plus the field memory): a book is scored in constant memory. Peak memory (RSS) is
reported at each power-of-two number of bytes read.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time

import numpy as np
import torch
from cli import check_writable_file, doubling_ranges, non_negative_int, positive_int, refuse_overwrite
from tqdm.auto import tqdm

from dfn.data import read_text_bytes, train_val_split
from dfn.metrics import load_bits_per_byte  # handles this file's name clash with the `evaluate` library


def text_blocks(data: np.ndarray, block_size: int) -> list[np.ndarray]:
    """Non-overlapping blocks; the remainder (if at least 2 bytes) becomes a last, shorter block."""
    blocks = [data[i : i + block_size] for i in range(0, len(data), block_size)]
    return [b for b in blocks if len(b) >= 2]


@torch.no_grad()
def score_bytes(
    model, data: np.ndarray, block_size: int = 256, batch_size: int = 8, progress: bool = True, by_context=False
) -> dict:
    """Bits/byte of `model` on the byte array `data`, through the `evaluate` metric. With `by_context`, also the loss
    of the bytes scored with 1, 2-3, 4-7, ... bytes of context before them in their block: how much of the block the
    model makes use of."""
    if block_size < 2:
        raise ValueError(f"block_size must be >= 2 (a block scores each byte after its first), got {block_size}")
    metric = load_bits_per_byte("log_probs")
    device = next(model.parameters()).device
    blocks = text_blocks(data, block_size)
    if not blocks:
        raise ValueError("the text is shorter than 2 bytes: nothing to score")
    bar = tqdm(total=sum(len(b) - 1 for b in blocks), unit="B", unit_scale=True, disable=not progress, desc="scoring")
    losses, counts = torch.zeros(block_size - 1, dtype=torch.float64), torch.zeros(block_size - 1, dtype=torch.long)
    for start in range(0, len(blocks), batch_size):
        batch = blocks[start : start + batch_size]
        width = max(len(b) for b in batch)
        ids = torch.full((len(batch), width), 256, dtype=torch.long)  # right padding with the pad id
        mask = torch.zeros((len(batch), width), dtype=torch.long)
        for row, block in enumerate(batch):
            ids[row, : len(block)] = torch.from_numpy(block.astype(np.int64))
            mask[row, : len(block)] = 1
        kwargs = {"use_cache": False}
        if not bool(mask.all()):
            kwargs["attention_mask"] = mask.to(device)
        logits = model(input_ids=ids.to(device), **kwargs).logits.float()
        log_probs = torch.log_softmax(logits[:, :-1], dim=-1).gather(-1, ids[:, 1:, None].to(device))[..., 0]
        labels = ids[:, 1:].masked_fill(mask[:, 1:] == 0, -100)
        metric.add_batch(predictions=list(log_probs.cpu().numpy()), references=list(labels.numpy()))
        if by_context:
            scored = mask[:, 1:].bool()
            losses[: width - 1] -= log_probs.cpu().double().masked_fill(~scored, 0).sum(0)
            counts[: width - 1] += scored.sum(0)
        bar.update(int(mask[:, 1:].sum()))
    bar.close()
    scores = metric.compute(shift=False)
    if by_context:
        scores["by_context"] = context_buckets(losses, counts)
    return scores


def context_buckets(losses: torch.Tensor, counts: torch.Tensor) -> list[dict]:
    """Summed losses and counts of the bytes scored after 1, 2, ... bytes of context `(block_size - 1,)`, grouped
    into power-of-two ranges of context: nats per byte and bytes scored per range."""
    buckets = []
    for low, high in doubling_ranges(len(losses)):
        total, count = float(losses[low - 1 : high].sum()), int(counts[low - 1 : high].sum())
        if count:
            buckets.append({"context": [low, high], "nats_per_byte": total / count, "bytes": count})
    return buckets


def rss_gib() -> float:
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


@torch.no_grad()
def score_stream(model, data: np.ndarray, segment: int, window: int | None, progress: bool = True) -> dict:
    """Bits/byte of the whole byte array as one document, read in segments through the model's `DFNCache`."""
    cache_class = sys.modules[type(model).__module__].DFNCache  # the checkpoint's own (remote) code
    cache = cache_class(model.config, window=window)
    metric = load_bits_per_byte("log_probs")
    device = next(model.parameters()).device
    ids = torch.from_numpy(data.astype(np.int64)).view(1, -1)
    previous = None  # the last logit of the previous segment predicts this segment's first byte
    peaks, checkpoint = {}, 1 << 16
    bar = tqdm(total=ids.shape[1], unit="B", unit_scale=True, disable=not progress, desc="streaming")
    for start in range(0, ids.shape[1], segment):
        piece = ids[:, start : start + segment].to(device)
        logits = model(input_ids=piece, cache=cache, use_cache=True).logits.float()
        if previous is not None:
            logits = torch.cat([previous, logits], dim=1)
            piece = torch.cat([ids[:, start - 1 : start].to(device), piece], dim=1)
        log_probs = torch.log_softmax(logits[:, :-1], dim=-1).gather(-1, piece[:, 1:, None])[..., 0]
        metric.add_batch(predictions=list(log_probs.cpu().numpy()), references=list(piece[:, 1:].cpu().numpy()))
        previous = logits[:, -1:]
        bar.update(min(segment, ids.shape[1] - start))
        while start + segment >= checkpoint:
            peaks[checkpoint] = round(rss_gib(), 3)
            checkpoint *= 2
    bar.close()
    scores = metric.compute(shift=False)
    scores.update(peak_rss_gib=round(rss_gib(), 3), peak_rss_gib_by_bytes=peaks, segment=segment, window=window)
    return scores


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], epilog=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("checkpoint", help="a folder written by save_pretrained (e.g. by scripts/train.py)")
    parser.add_argument("text", nargs="+", help="text file(s), concatenated as bytes")
    parser.add_argument(
        "--split",
        choices=["all", "train", "val"],
        default="all",
        help="score the whole text, or only the first 90%% / last 10%% (nanoGPT split)",
    )
    parser.add_argument("--val-fraction", type=float, default=0.1)
    parser.add_argument("--block-size", type=positive_int, default=256)
    parser.add_argument("--batch-size", type=positive_int, default=8)
    parser.add_argument("--max-bytes", type=non_negative_int, default=0, help="score only the first N bytes (0 = all)")
    parser.add_argument("--stream", action="store_true", help="score the text as one document through the cache")
    parser.add_argument("--segment", type=positive_int, default=4096, help="bytes per call with --stream")
    parser.add_argument(
        "--window", type=non_negative_int, default=0, help="bounded cache of W entities with --stream (0: all)"
    )
    parser.add_argument(
        "--by-context", action="store_true", help="also the loss by bytes of context before each scored byte"
    )
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing --json file")
    parser.add_argument("--json", default=None, help="also write the scores to this JSON file")
    args = parser.parse_args(argv)
    if args.block_size < 2:
        parser.error(f"--block-size must be >= 2 (a block scores each byte after its first), got {args.block_size}")
    if args.by_context and args.stream:
        parser.error("--by-context groups the bytes of blocks; with --stream every byte has all the text before it")
    if args.json:
        refuse_overwrite([args.json], args.overwrite)
        check_writable_file(args.json)

    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(args.checkpoint, trust_remote_code=True).to(args.device).eval()
    data = read_text_bytes(args.text)
    if args.split != "all":
        train, val = train_val_split(data, args.val_fraction)
        data = train if args.split == "train" else val
    if args.max_bytes:
        data = data[: args.max_bytes]
    start = time.time()
    if args.stream:
        if model.config.model_type != "dfn":
            raise SystemExit(
                f"--stream reads through DFN's cache: {args.checkpoint} is a {model.config.model_type} model"
            )
        scores = score_stream(model, data, args.segment, args.window or None)
    else:
        scores = score_bytes(model, data, args.block_size, args.batch_size, by_context=args.by_context)
    scores.update(
        checkpoint=args.checkpoint,
        text=args.text,
        split=args.split,
        bytes=int(len(data)),
        block_size=args.block_size,
        seconds=round(time.time() - start, 1),
    )
    how = (
        f"streamed in segments of {args.segment}, window {args.window or 'all'}"
        if args.stream
        else (f"blocks of {args.block_size}")
    )
    print(
        f"{', '.join(args.text)} [{args.split}, {len(data):,} bytes, {how}]: "
        f"{scores['bits_per_byte']:.4f} bits/byte, {scores['nats_per_byte']:.4f} nats/byte, "
        f"perplexity {scores['perplexity']:.3f} ({scores['seconds']}s)"
    )
    if args.stream:
        print(f"peak RSS {scores['peak_rss_gib']} GiB; by bytes read: {scores['peak_rss_gib_by_bytes']}")
    for bucket in scores.get("by_context", []):
        low, high = bucket["context"]
        print(f"  context {low:>6}-{high:<6} {bucket['nats_per_byte']:.4f} nats/byte ({bucket['bytes']:,} bytes)")
    assert math.isfinite(scores["bits_per_byte"])
    if args.json:
        with open(args.json, "w") as f:
            json.dump(scores, f, indent=2)
    return scores


if __name__ == "__main__":
    main()
