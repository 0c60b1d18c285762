"""LoRA fine-tuning of a trained DFN checkpoint on another text, with PEFT and transformers.Trainer.

    # a Tiny-Shakespeare model (e.g. from `make demo`) adapted to the bundled War and Peace excerpt
    python scripts/finetune_lora.py --base outputs/demo/latest --output_dir outputs/lora-wp
    python scripts/finetune_lora.py --base outputs/demo/latest --text my.txt --r 16 --max_steps 300 --merge \
        --output_dir outputs/lora-mine

The base is loaded as a user would (`AutoModelForCausalLM.from_pretrained(base, trust_remote_code=True)`) and
wrapped by `peft.get_peft_model(model, LoraConfig(...))`; only the adapter weights train. The text is split like
Tiny Shakespeare (first 90 % train, last 10 % val) and the validation loss is measured before and after.

DFN's adaptable projections (`--target_modules`, default all of them), per flow layer `model.layers.<i>`:
  flow_proj       hidden -> heads x pos_dim   the flow f_i = W_f s_i that moves entity positions
  influence_proj  hidden -> heads             the influence weights w_i
  value_proj      hidden -> hidden            the values W_v s_j mixed over neighbours
  mlp.up_proj     2 x hidden -> mlp hidden    the layer's MLP over [FlowNorm(s), y] (the output path)
  mlp.gate_proj   2 x hidden -> mlp hidden    its gate (only in models with mlp_type="swiglu", the default)
  mlp.down_proj   mlp hidden -> hidden
  query_flow_proj hidden -> heads x pos_dim   where entities search from (only in models with use_query_flow)

Writes to --output_dir: the adapter (`adapter_config.json`, `adapter_model.safetensors`), `lora_summary.json` (val
loss before/after), the training log/curve of scripts/train.py, and with `--merge` a merged full model in
`merged/` (`merge_and_unload()`; loads with trust_remote_code like the base). Load the adapter with
`PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base, trust_remote_code=True), output_dir)`.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402
import train as train_lib  # noqa: E402  (scripts/train.py)
from cli import non_negative_int, positive_int, refuse_overwrite  # noqa: E402

from dfn.hub import paths_overlap  # noqa: E402

DFN_LORA_TARGETS = ["flow_proj", "influence_proj", "value_proj", "mlp.up_proj", "mlp.down_proj"]


def lora_targets(config) -> list[str]:
    """Every adaptable projection a DFN with this config has."""
    base = [t for t in DFN_LORA_TARGETS if t != "flow_proj" or getattr(config, "use_flow", True)]
    gate = ["mlp.gate_proj"] if getattr(config, "mlp_type", "gelu") == "swiglu" else []
    return base + gate + (["query_flow_proj"] if getattr(config, "use_query_flow", False) else [])


def lora_config(r: int = 8, alpha: int = 16, dropout: float = 0.0, target_modules=None):
    from peft import LoraConfig

    return LoraConfig(
        task_type="CAUSAL_LM",
        r=r,
        lora_alpha=alpha,
        lora_dropout=dropout,
        target_modules=list(target_modules or DFN_LORA_TARGETS),
        bias="none",
    )


def load_base(folder: str, device: str = "cpu"):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True).to(device)


def add_lora(model, config, seed: int | None = None):
    """Wrap `model` with LoRA adapters; everything but the adapters is frozen. Every target must name a module of the
    model (PEFT itself only refuses a list where none does, so a misspelt one would silently adapt less). `seed` seeds
    the adapters' random initialisation."""
    from peft import get_peft_model
    from transformers import set_seed

    names = [name for name, _ in model.named_modules()]
    unmatched = [t for t in config.target_modules if not any(n == t or n.endswith("." + t) for n in names)]
    if unmatched:
        raise ValueError(
            f"LoRA target_modules {unmatched} name no module of this model; it has {lora_targets(model.config)}"
        )
    if seed is not None:
        set_seed(seed)
    return get_peft_model(model, config)


@torch.no_grad()
def block_loss(model, dataset, batch_size: int = 16) -> float:
    """Mean next-byte loss (nats/byte) over a `PackedBlocks` dataset."""
    model.eval()
    total, count = 0.0, 0
    for start in range(0, len(dataset), batch_size):
        ids = torch.stack([dataset[i]["input_ids"] for i in range(start, min(start + batch_size, len(dataset)))])
        ids = ids.to(next(model.parameters()).device)
        loss = model(input_ids=ids, labels=ids, use_cache=False).loss
        n = ids.shape[0] * (ids.shape[1] - 1)
        total += float(loss) * n
        count += n
    return total / count


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], epilog=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--base", required=True, help="checkpoint folder of the base model (save_pretrained output)")
    p.add_argument("--text", nargs="+", default=["data/war_and_peace_excerpt.txt"])
    p.add_argument("--output_dir", default="outputs/lora")
    p.add_argument("--overwrite", action="store_true")
    p.add_argument("--r", type=positive_int, default=8)
    p.add_argument("--alpha", type=positive_int, default=16)
    p.add_argument("--lora_dropout", type=float, default=0.0)
    p.add_argument("--target_modules", nargs="+", default=None, help="default: every adaptable projection")
    p.add_argument("--block_size", type=positive_int, default=256)
    p.add_argument("--batch_size", type=positive_int, default=16)
    p.add_argument("--max_steps", type=positive_int, default=150)
    p.add_argument("--learning_rate", type=float, default=3e-3)
    p.add_argument("--warmup_steps", type=non_negative_int, default=15)
    p.add_argument("--eval_steps", type=non_negative_int, default=50)
    p.add_argument("--eval_blocks", type=non_negative_int, default=32)
    p.add_argument("--logging_steps", type=positive_int, default=10)
    p.add_argument("--seed", type=int, default=1337)
    p.add_argument("--merge", action="store_true", help="also save merge_and_unload() as a full model in merged/")
    p.add_argument("--quiet", action="store_true")
    return p


def main(argv=None) -> dict:
    args = build_parser().parse_args(argv)
    base, out = Path(args.base).resolve(), Path(args.output_dir).resolve()
    if paths_overlap(out, base):
        raise SystemExit(f"--output_dir {out} must not be the base checkpoint, inside it, or contain it ({base})")
    refuse_overwrite([out], args.overwrite)  # before loading and scoring the base, not after
    cfg = train_lib.make_config(
        None,
        dict(
            model_type="dfn",
            train_files=list(args.text),
            val_files=None,
            block_size=args.block_size,
            batch_size=args.batch_size,
            max_steps=args.max_steps,
            learning_rate=args.learning_rate,
            warmup_steps=args.warmup_steps,
            weight_decay=0.0,
            eval_steps=args.eval_steps,
            eval_blocks=args.eval_blocks,
            logging_steps=args.logging_steps,
            save_steps=0,
            seed=args.seed,
            output_dir=args.output_dir,
            overwrite=args.overwrite,
            quiet=args.quiet,
        ),
    )
    train_bytes, val_bytes, _ = train_lib.load_data(cfg)
    _, _, val_ds = train_lib.build_datasets(cfg, train_bytes, val_bytes)

    base = load_base(args.base)
    before = block_loss(base, val_ds, args.batch_size)
    args.target_modules = args.target_modules or lora_targets(base.config)
    model = add_lora(base, lora_config(args.r, args.alpha, args.lora_dropout, args.target_modules), args.seed)
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    if not trainable or not all("lora_" in n for n in trainable):
        raise RuntimeError(f"expected only LoRA parameters to train, got {trainable[:5]}")
    model.print_trainable_parameters()
    print(f"val loss of the base on {', '.join(args.text)}: {before:.4f} nats/byte ({before / math.log(2):.3f} bpb)")

    summary = train_lib.train(
        cfg, command=" ".join(["python", "scripts/finetune_lora.py", *(argv or sys.argv[1:])]), model=model
    )
    trainer = summary.pop("_trainer")  # train() saved the adapter (PeftModel.save_pretrained) in output_dir
    model = trainer.model
    after = block_loss(model, val_ds, args.batch_size)
    result = {
        "base": args.base,
        "text": args.text,
        "val_loss_before": before,
        "val_loss_after": after,
        "val_bpb_before": before / math.log(2),
        "val_bpb_after": after / math.log(2),
        "r": args.r,
        "alpha": args.alpha,
        "target_modules": list(args.target_modules),
        "trainable_parameters": sum(p.numel() for p in model.parameters() if p.requires_grad),
        "train_steps": summary["train_steps"],
        "train_time_s": summary["train_time_s"],
        "commit": summary["commit"],
        "command": summary["command"],
    }
    if args.merge:
        merged = model.merge_and_unload()
        merged.config.use_cache = True
        merged.save_pretrained(os.path.join(args.output_dir, "merged"))
        from dfn import DFNByteTokenizer

        DFNByteTokenizer().save_pretrained(os.path.join(args.output_dir, "merged"))
        result["merged"] = os.path.join(args.output_dir, "merged")
    with open(os.path.join(args.output_dir, "lora_summary.json"), "w") as f:
        json.dump(result, f, indent=2)
    print(
        f"val loss on {', '.join(args.text)}: {before:.4f} -> {after:.4f} nats/byte "
        f"({result['val_bpb_before']:.3f} -> {result['val_bpb_after']:.3f} bpb) after {summary['train_steps']} "
        f"LoRA steps; adapter in {args.output_dir}"
    )
    return result


if __name__ == "__main__":
    main()
