"""How far back does each head read? Neighbour ages of a DFN checkpoint, attention ages of a Llama one.

    python scripts/reach.py outputs/compare/cpu/dfn-ctx2048 outputs/compare/cpu/llama-ctx2048 --length 2048

Each checkpoint reads `--windows` consecutive windows of `--length` bytes from the validation split of the text
(default: Tiny Shakespeare, nanoGPT's split). Only queries at index >= `--skip` count, so every one has that many
earlier bytes to choose from. Per layer and head:

* DFN: the share of each entity's K neighbours that are older than K bytes. Time-only positions (the flow-off
  ablation) give 0, because their K nearest are the K most recent; what the flow moves in or out shows here. Also
  the kernel mass at age >= K and >= 256, among the K neighbours (the field memory's share is not counted), and the
  median neighbour age, and how many nats the flow's content coordinates typically move a kernel logit
  (`flow_logit_scale`). The neighbours and weights are those the layer used: its kernel mix's inputs are recorded
  during the forward.
* Llama: the attention mass at age >= K and >= 256 (eager attention).

Prints a table; `--json` writes the numbers.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import torch
from transformers import AutoModelForCausalLM

sys.path.insert(0, str(Path(__file__).resolve().parent))

from cli import check_writable_file, non_negative_int, positive_int, refuse_overwrite  # noqa: E402

from dfn import DFNForCausalLM  # noqa: E402
from dfn.data import read_text_bytes, train_val_split  # noqa: E402
from dfn.modeling_dfn import gather_neighbors, kernel_weights  # noqa: E402


def windows(path: str, split: str, length: int, count: int) -> torch.Tensor:
    """`(count, length)` consecutive byte windows from the `split` ("train", "val" or "all") of the text."""
    data = read_text_bytes(path)
    if split != "all":
        data = dict(zip(("train", "val"), train_val_split(data), strict=True))[split]
    if len(data) < length * count:
        raise ValueError(f"{path} ({split}) has {len(data)} bytes, fewer than --windows x --length = {length * count}")
    return torch.from_numpy(np.asarray(data[: length * count], dtype=np.int64)).view(count, length)


def record_mix_inputs(model) -> list[dict]:
    """Wrap every DFN layer's kernel mix so that each call records the neighbours it weighed and their inputs."""
    records = []
    for layer in model.model.layers:

        def recorded(queries, features, inv_two_var, indices, valid, _mix=layer._mix):
            records.append(dict(queries=queries, features=features, inv=inv_two_var, indices=indices, valid=valid))
            return _mix(queries, features, inv_two_var, indices, valid)

        layer._mix = recorded
    return records


def mass_at_age(weights: torch.Tensor, age: torch.Tensor, limit: int, query_axes: tuple) -> list[float]:
    """Per head, the mean over `query_axes` of the weight that lies at `age >= limit` (last axis: the keys)."""
    return (weights * (age >= limit)).sum(-1).mean(query_axes).tolist()


def flow_logit_scale(positions: torch.Tensor, inv_two_var: torch.Tensor) -> list[float]:
    """Per head, `sd^2 / σ^2` with `sd` the spread over entities of the flow coordinates (1..k-1, time excluded) of
    `positions` `(B, T, H, k)`: how many nats the flow's content placement typically moves a kernel logit (two entities
    `sd·√2` apart cost `sd^2/σ^2`). 0 for time-only positions."""
    if positions.shape[-1] == 1:
        return [0.0] * positions.shape[2]
    spread = positions[..., 1:].flatten(0, 1).var(0).sum(-1)  # (H,)
    return (spread * 2 * inv_two_var).tolist()


@torch.no_grad()
def dfn_reach(model, ids: torch.Tensor, skip: int) -> list[dict]:
    config = model.config
    records = record_mix_inputs(model)
    model.model(ids, use_cache=False)
    rows = []
    for layer, rec in enumerate(records):
        indices, valid, features = rec["indices"], rec["valid"], rec["features"]
        near = gather_neighbors(features, indices)  # (B, N, H, K, k + D + 1): positions, value, log-weight
        logits, _ = kernel_weights(rec["queries"], near[..., : config.pos_dim], near[..., -1:], valid, rec["inv"])
        weights = torch.softmax(logits, -1)[:, skip:]
        age = (torch.arange(ids.shape[1]).view(1, -1, 1, 1) - indices)[:, skip:]
        valid = valid[:, skip:]
        older = ((age >= config.num_neighbors) & valid).float().sum(-1) / valid.sum(-1)
        median = age.float().masked_fill(~valid, float("nan")).nanmedian(-1).values
        rows.append(
            dict(
                layer=layer,
                neighbors_older_than_K=older.mean((0, 1)).tolist(),
                median_neighbor_age=median.nanmedian(1).values.median(0).values.tolist(),
                mass_age_ge_K=mass_at_age(weights, age, config.num_neighbors, (0, 1)),
                mass_age_ge_256=mass_at_age(weights, age, 256, (0, 1)),
                flow_logit_scale=flow_logit_scale(features[..., : config.pos_dim], rec["inv"]),
            )
        )
    return rows


@torch.no_grad()
def llama_reach(model, ids: torch.Tensor, skip: int, num_neighbors: int) -> list[dict]:
    attentions = model(ids, output_attentions=True).attentions  # per layer (B, H, T, T)
    length = ids.shape[1]
    age = (torch.arange(length).view(-1, 1) - torch.arange(length).view(1, -1))[skip:]
    return [
        dict(
            layer=layer,
            mass_age_ge_K=mass_at_age(a[:, :, skip:], age, num_neighbors, (0, 2)),
            mass_age_ge_256=mass_at_age(a[:, :, skip:], age, 256, (0, 2)),
        )
        for layer, a in enumerate(attentions)
    ]


def reach(folder: str, ids: torch.Tensor, skip: int, num_neighbors: int) -> dict:
    if json.loads((Path(folder) / "config.json").read_text())["model_type"] == "dfn":
        # this package's classes (not the folder's copy of the code): the recording wraps their methods
        model = DFNForCausalLM.from_pretrained(folder).eval()
        return {"model": "dfn", "num_neighbors": model.config.num_neighbors, "layers": dfn_reach(model, ids, skip)}
    model = AutoModelForCausalLM.from_pretrained(folder, attn_implementation="eager").eval()
    return {
        "model": model.config.model_type,
        "num_neighbors": num_neighbors,
        "layers": llama_reach(model, ids, skip, num_neighbors),
    }


def print_table(folder: str, result: dict) -> None:
    k = result["num_neighbors"]
    print(f"\n{folder} ({result['model']}): per head, layer by layer")
    for row in result["layers"]:
        parts = [
            f"{name.replace('_ge_K', f'_ge_{k}')}=" + " ".join(f"{v:.3f}" for v in values)
            for name, values in row.items()
            if name != "layer"
        ]
        print(f"  layer {row['layer']}: " + "  ".join(parts))


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("checkpoints", nargs="+", help="checkpoint folders (DFN or a Llama of scripts/compare.py)")
    p.add_argument("--text", default="data/tinyshakespeare.txt")
    p.add_argument("--split", default="val", choices=["train", "val", "all"])
    p.add_argument("--length", type=positive_int, default=2048, help="bytes per window")
    p.add_argument("--windows", type=positive_int, default=2)
    p.add_argument("--skip", type=non_negative_int, default=256, help="queries before this index are not counted")
    p.add_argument("--num-neighbors", type=positive_int, default=32, help="K for attention models (DFN uses its own)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --json file")
    p.add_argument("--json", help="write the numbers here")
    args = p.parse_args(argv)
    if args.json:
        refuse_overwrite([args.json], args.overwrite)
        check_writable_file(args.json)
    if not 0 <= args.skip < args.length:
        raise SystemExit(f"--skip must lie in [0, --length), got {args.skip}")
    ids = windows(args.text, args.split, args.length, args.windows)
    results = {}
    for folder in args.checkpoints:
        results[folder] = reach(folder, ids, args.skip, args.num_neighbors)
        print_table(folder, results[folder])
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1))
    return results


if __name__ == "__main__":
    main()
