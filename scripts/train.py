"""Train a byte-level DFN (or the same-size Llama baseline) with `transformers.Trainer`.

Reads top to bottom: config (preset JSON + command-line overrides) -> data (text -> bytes -> packed blocks)
-> model -> `TrainingArguments` -> `Trainer` -> final full validation, checkpoint, summary, loss curve.

    # small CPU run first (a couple of minutes on 2 cores)
    python scripts/train.py --preset tiny --output_dir outputs/tiny
    # the comparison size, with overrides (flags = field names below; model fields via --model key=value)
    python scripts/train.py --preset small --max_steps 400 --model use_flow=false --output_dir outputs/small-noflow
    # any text files, or a local `datasets` dataset (save_to_disk folder or text files)
    python scripts/train.py --preset tiny --train_files a.txt b.txt --val_files c.txt --output_dir outputs/x
    python scripts/train.py --preset tiny --dataset path/to/saved_dataset --output_dir outputs/x
    # checkpoints every N steps, and an exact resume from the last one in --output_dir
    python scripts/train.py --preset tiny --save_steps 50 --output_dir outputs/tiny
    python scripts/train.py --preset tiny --save_steps 50 --output_dir outputs/tiny --resume
    # two processes (DDP over gloo) on one CPU-only machine (`--multi_gpu` picks accelerate's torchrun launcher;
    # with no GPU the processes train on CPU; `accelerate launch --cpu` alone would start ONE process), or GPUs
    accelerate launch --config_file accelerate_configs/cpu_ddp.yaml scripts/train.py --preset tiny --output_dir o/ddp
    accelerate launch --multi_gpu --num_processes 2 scripts/train.py --preset tiny --output_dir outputs/ddp
    accelerate launch --config_file accelerate_configs/ddp.yaml scripts/train.py --preset base --bf16 \
        --output_dir outputs/base

The output folder holds the final model + tokenizer (loads with
`AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True)`), `train_config.json` (the resolved
config, also written into every `checkpoint-N/`), `log.csv`, `training_summary.json` and `loss_curve.png`.
An existing non-empty `--output_dir` is refused unless `--resume` (continue it) or `--overwrite` (delete it first).
`--resume PATH` outside `--output_dir` continues PATH's state into `--output_dir`: it must be empty, or `--overwrite`.
Losses are in nats/byte; bits/byte (bpb) = loss / ln 2.
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import json
import math
import os
import platform
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
CONFIG_DIR = REPO_ROOT / "configs"

import torch  # noqa: E402
from cli import boolean, positive_int  # noqa: E402
from transformers import (  # noqa: E402
    LlamaConfig,
    LlamaForCausalLM,
    ProgressCallback,
    Trainer,
    TrainerCallback,
    TrainingArguments,
    set_seed,
)
from transformers.trainer_utils import get_last_checkpoint  # noqa: E402

from dfn import DFNByteTokenizer, DFNConfig, DFNForCausalLM  # noqa: E402
from dfn.data import (  # noqa: E402
    PackedBlocks,
    collate_blocks,
    load_dataset_bytes,
    read_text_bytes,
    train_val_split,
    unigram_baseline,
)

LN2 = math.log(2)


# ----------------------------------------------------------------------------------------------------------------------
# Config


@dataclass
class TrainConfig:
    """Everything a run needs. Presets in `configs/*.json` set these fields; flags of the same name override them."""

    model_type: str = "dfn"  # "dfn" or "llama" (the baseline of scripts/compare.py)
    model: dict = field(default_factory=dict)  # DFNConfig / LlamaConfig keyword arguments
    train_files: list = field(default_factory=lambda: ["data/tinyshakespeare.txt"])
    val_files: list | None = None  # None: the last `val_fraction` of the training bytes (nanoGPT split)
    dataset: str | None = None  # a local `datasets` dataset (save_to_disk folder or text file) instead of files
    val_fraction: float = 0.1
    block_size: int = 256
    batch_size: int = 16  # per device
    grad_accum: int = 1
    max_steps: int = 1000
    learning_rate: float = 1e-3
    min_lr_ratio: float = 0.1  # cosine decays to learning_rate * min_lr_ratio
    warmup_steps: int = 100
    weight_decay: float = 0.1
    # learning-rate multiplier (and no weight decay) for DFN's geometry parameters. Measured (compare.py cpu preset,
    # 150 steps, val nats/byte at ctx 256 / 2048): x1 2.1384 / 2.1710, x10 2.1249 / 2.1479, x30 2.1103 / 2.1237,
    # x100 2.1028 / 2.1254
    geometry_lr_scale: float = 30.0
    adam_beta1: float = 0.9
    adam_beta2: float = 0.99
    max_grad_norm: float = 1.0
    eval_steps: int = 100  # 0: no evaluation during training
    eval_blocks: int = 64  # fixed, evenly spaced validation blocks for the periodic evaluations (0 = all)
    final_eval_blocks: int = 0  # validation blocks for the final evaluation (0 = all)
    logging_steps: int = 10
    save_steps: int = 0  # 0: no intermediate checkpoints
    save_total_limit: int | None = None
    seed: int = 1337
    bf16: bool = False
    gradient_checkpointing: bool = False
    num_workers: int = 0
    report_to: str = "auto"  # "auto" = tensorboard when installed, else none; or "none", "tensorboard", ...
    output_dir: str = "outputs/run"
    overwrite: bool = False
    resume: str | None = None  # "last" (latest checkpoint in output_dir) or a checkpoint folder
    time_budget_s: float = 0  # stop training (cleanly, then evaluate and save) after this many seconds; 0 = none
    plot: bool = True
    quiet: bool = False  # no per-log console lines (the progress bar stays)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def load_preset(name_or_path: str) -> dict:
    """A preset by name (`configs/<name>.json`) or a path to a JSON file. Keys starting with `_` are comments."""
    path = Path(name_or_path)
    if not path.suffix:
        path = CONFIG_DIR / f"{name_or_path}.json"
    if not path.exists():
        known = sorted(p.stem for p in CONFIG_DIR.glob("*.json"))
        raise FileNotFoundError(f"no preset {name_or_path!r} (looked for {path}; known presets: {known})")
    raw = json.loads(path.read_text())
    return {k: v for k, v in raw.items() if not k.startswith("_")}


def _parse_value(text: str):
    lowered = text.lower()
    if lowered in ("true", "false"):
        return lowered == "true"
    if lowered in ("none", "null"):
        return None
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return text


def make_config(preset: str | None = None, overrides: dict | None = None, model_overrides: dict | None = None):
    """Resolve a `TrainConfig`: dataclass defaults <- preset file <- `overrides` <- `model_overrides` (model kwargs)."""
    values = load_preset(preset) if preset else {}
    values.update({k: v for k, v in (overrides or {}).items() if v is not None})
    names = {f.name for f in dataclasses.fields(TrainConfig)}
    unknown = sorted(set(values) - names)
    if unknown:
        raise ValueError(f"unknown config keys {unknown}; known: {sorted(names)}")
    cfg = TrainConfig(**values)
    check_values(cfg)
    cfg.model = {**cfg.model, **(model_overrides or {})}
    if cfg.model_type not in ("dfn", "llama"):
        raise ValueError(f"model_type must be 'dfn' or 'llama', got {cfg.model_type!r}")
    return cfg


def check_values(cfg: TrainConfig) -> None:
    """Values that would otherwise mean something else: steps, sizes and rates (a negative max_steps trains an epoch),
    switches that are not true or false (the word "no" would count as true), and validation files --dataset ignores."""
    for f in dataclasses.fields(TrainConfig):
        if f.type == "bool" and not isinstance(getattr(cfg, f.name), bool):
            raise ValueError(f"{f.name} must be true or false, got {getattr(cfg, f.name)!r}")
    if cfg.dataset and cfg.val_files:
        raise ValueError("val_files cannot be used with dataset: its validation split is the last val_fraction")
    for name, low in (
        ("block_size", 1),
        ("batch_size", 1),
        ("grad_accum", 1),
        ("max_steps", 1),
        ("logging_steps", 1),
        ("warmup_steps", 0),
        ("eval_steps", 0),
        ("eval_blocks", 0),
        ("final_eval_blocks", 0),
        ("save_steps", 0),
        ("num_workers", 0),
    ):
        value = getattr(cfg, name)
        if isinstance(value, bool) or not isinstance(value, int) or value < low:
            raise ValueError(f"{name} must be an integer >= {low}, got {value!r}")
    if not cfg.learning_rate > 0 or not cfg.time_budget_s >= 0:
        raise ValueError(
            f"learning_rate must be > 0 and time_budget_s >= 0, got {cfg.learning_rate}, {cfg.time_budget_s}"
        )


def build_arg_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__
    )
    parser.add_argument("--preset", default="tiny", help="name in configs/ (demo, tiny, small, base) or a JSON path")
    parser.add_argument(
        "--model", action="append", default=[], metavar="KEY=VALUE", help="model config override, repeatable"
    )
    for f in dataclasses.fields(TrainConfig):
        if f.name in ("model",):
            continue
        flag = f"--{f.name}"
        if f.name in ("train_files", "val_files"):
            parser.add_argument(flag, nargs="+", default=None)
        elif f.name == "resume":
            parser.add_argument(
                flag, nargs="?", const="last", default=None, help="resume from the last checkpoint or from PATH"
            )
        elif f.type in ("bool",):
            parser.add_argument(flag, nargs="?", const=True, default=None, type=boolean)
        elif f.type in ("int", "int | None"):
            parser.add_argument(flag, type=int, default=None)
        elif f.type == "float":
            parser.add_argument(flag, type=float, default=None)
        else:
            parser.add_argument(flag, default=None)
    return parser


def parse_args(argv: list[str] | None = None) -> TrainConfig:
    parser = build_arg_parser()
    args = parser.parse_args(argv)
    if args.dataset and args.train_files:
        parser.error("--dataset replaces --train_files: give one of them")
    overrides = {k: v for k, v in vars(args).items() if k not in ("preset", "model")}
    return make_config(args.preset, overrides, parse_model_overrides(args.model))


def parse_model_overrides(items: list[str]) -> dict:
    """`["KEY=VALUE", ...]` (the repeatable --model flag) -> config overrides with parsed values."""
    overrides = {}
    for item in items:
        if "=" not in item:
            raise SystemExit(f"--model expects KEY=VALUE, got {item!r}")
        key, value = item.split("=", 1)
        overrides[key.strip()] = _parse_value(value.strip())
    return overrides


def resolve_path(path: str) -> str:
    """Paths relative to the current folder, falling back to the repository root (so presets work from anywhere)."""
    if os.path.exists(path) or os.path.isabs(path):
        return path
    candidate = REPO_ROOT / path
    return str(candidate) if candidate.exists() else path


# ----------------------------------------------------------------------------------------------------------------------
# Data


def load_data(cfg: TrainConfig):
    """Return (train bytes, val bytes, a one-line description) as uint8 numpy arrays."""
    if cfg.dataset:
        data = load_dataset_bytes(resolve_path(cfg.dataset))
        train, val = train_val_split(data, cfg.val_fraction)
        return train, val, f"{cfg.dataset} (datasets; first {1 - cfg.val_fraction:.0%} train / rest val)"
    train_files = [resolve_path(p) for p in cfg.train_files]
    data = read_text_bytes(train_files)
    names = ", ".join(os.path.basename(p) for p in cfg.train_files)
    if cfg.val_files:
        val = read_text_bytes([resolve_path(p) for p in cfg.val_files])
        return data, val, f"{names} (val: {', '.join(os.path.basename(p) for p in cfg.val_files)})"
    train, val = train_val_split(data, cfg.val_fraction)
    return train, val, f"{names} (byte-level, nanoGPT split: first {1 - cfg.val_fraction:.0%} train / rest val)"


def build_datasets(cfg: TrainConfig, train_bytes, val_bytes):
    """Packed training blocks, the fixed periodic-eval subset, and the final-eval set."""
    train_ds = PackedBlocks(train_bytes, cfg.block_size)
    val_full = PackedBlocks(val_bytes, cfg.block_size)
    return train_ds, val_full.subset(cfg.eval_blocks), val_full.subset(cfg.final_eval_blocks)


# ----------------------------------------------------------------------------------------------------------------------
# Model


def build_model(cfg: TrainConfig, seed: int | None = None):
    """A freshly initialised DFNForCausalLM (or byte-vocab LlamaForCausalLM) from `cfg.model`."""
    set_seed(cfg.seed if seed is None else seed)
    if cfg.model_type == "dfn":
        return DFNForCausalLM(DFNConfig(**cfg.model))
    llama_kwargs = dict(
        vocab_size=259,
        pad_token_id=256,
        bos_token_id=257,
        eos_token_id=258,
        tie_word_embeddings=True,
        max_position_embeddings=max(cfg.block_size, 256),
        attention_dropout=0.0,
    )
    llama_kwargs.update(cfg.model)
    config = LlamaConfig(**llama_kwargs)
    config._attn_implementation = "sdpa"
    return LlamaForCausalLM(config)


def count_parameters(model) -> int:
    """Unique trainable parameters (tied embeddings counted once)."""
    return sum(p.numel() for p in {id(p): p for p in model.parameters() if p.requires_grad}.values())


# ----------------------------------------------------------------------------------------------------------------------
# Trainer pieces


class ByteLMTrainer(Trainer):
    """Trainer whose evaluations also report bits per byte and perplexity (`<prefix>_bpb`, `<prefix>_ppl`), whose
    schedule follows a `CosineHorizon` when one is given (time-budgeted runs), and whose optimizer gives a DFN's
    geometry parameters `geometry_lr_scale` times the learning rate (`split_geometry_group`)."""

    def __init__(self, *args, lr_horizon: CosineHorizon | None = None, geometry_lr_scale: float = 1.0, **kwargs):
        super().__init__(*args, **kwargs)
        self.lr_horizon = lr_horizon
        self.geometry_lr_scale = geometry_lr_scale

    def create_optimizer(self, model=None):
        if self.optimizer is None:
            super().create_optimizer(model)
            split_geometry_group(self.optimizer, self.model if model is None else model, self.geometry_lr_scale)
        return self.optimizer

    def create_scheduler(self, num_training_steps: int, optimizer=None):
        if self.lr_horizon is None or self.lr_scheduler is not None:
            return super().create_scheduler(num_training_steps, optimizer)
        self.lr_scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer or self.optimizer, self.lr_horizon)
        self._created_lr_scheduler = True
        return self.lr_scheduler

    def evaluation_loop(self, *args, **kwargs):
        output = super().evaluation_loop(*args, **kwargs)
        prefix = kwargs.get("metric_key_prefix", "eval")
        loss = output.metrics.get(f"{prefix}_loss")
        if loss is not None:
            output.metrics[f"{prefix}_bpb"] = loss / LN2
            output.metrics[f"{prefix}_ppl"] = math.exp(min(loss, 50.0))
        return output


def split_geometry_group(optimizer: torch.optim.Optimizer, model, lr_scale: float) -> None:
    """Move the model's geometry parameters (`_geometry_parameters` name suffixes, see modeling_dfn.py) into their
    own group with `lr_scale` times the learning rate and no weight decay. Models without them are left alone."""
    suffixes = getattr(model, "_geometry_parameters", ())
    geometry = {id(p) for n, p in model.named_parameters() if p.requires_grad and n.split(".")[-1] in suffixes}
    if not geometry or lr_scale == 1.0:
        return
    params = []
    for group in optimizer.param_groups:
        params += [p for p in group["params"] if id(p) in geometry]
        group["params"] = [p for p in group["params"] if id(p) not in geometry]
    base = optimizer.param_groups[0]
    optimizer.add_param_group({"params": params, "lr": base["lr"] * lr_scale, "weight_decay": 0.0})


class CSVLoggerCallback(TrainerCallback):
    """Appends every log (train loss, lr, grad norm, eval loss/bpb) as a row of `log.csv` (main process only)."""

    COLUMNS = ["step", "epoch", "time_s", "loss", "learning_rate", "grad_norm", "eval_loss", "eval_bpb", "eval_ppl"]

    def __init__(self, path: str):
        self.path = path
        self.start = time.time()

    def on_train_begin(self, args, state, control, **kwargs):
        """A run resumed at step k logs again the steps after k that the interrupted run logged: drop those rows,
        and go on counting time from the last row kept."""
        if not state.is_world_process_zero or not state.global_step or not os.path.exists(self.path):
            return
        with open(self.path, newline="") as f:
            kept = [row for row in csv.DictReader(f) if int(row["step"]) <= state.global_step]
        with open(self.path, "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=self.COLUMNS)
            writer.writeheader()
            writer.writerows(kept)
        if kept:
            self.start = time.time() - float(kept[-1]["time_s"])

    def on_log(self, args, state, control, logs=None, **kwargs):
        if not state.is_world_process_zero or not logs:
            return
        row = {"step": state.global_step, "epoch": state.epoch, "time_s": round(time.time() - self.start, 2)}
        row.update({k: logs[k] for k in self.COLUMNS[3:] if k in logs})
        if len(row) == 3:
            return
        new = not os.path.exists(self.path)
        with open(self.path, "a", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=self.COLUMNS)
            if new:
                writer.writeheader()
            writer.writerow(row)


class StepTimerCallback(TrainerCallback):
    """Wall time spent inside training steps only (no evaluation, saving or logging): for tokens per second."""

    def __init__(self):
        self.seconds, self.steps, self._t = 0.0, 0, None

    def on_step_begin(self, args, state, control, **kwargs):
        self._t = time.perf_counter()

    def on_step_end(self, args, state, control, **kwargs):
        if self._t is not None:
            self.seconds += time.perf_counter() - self._t
            self.steps += 1
            self._t = None


class SaveRunConfigCallback(TrainerCallback):
    """Writes the resolved `train_config.json` into every checkpoint folder."""

    def __init__(self, cfg: TrainConfig):
        self.cfg = cfg

    def on_save(self, args, state, control, **kwargs):
        if state.is_world_process_zero:
            folder = os.path.join(args.output_dir, f"checkpoint-{state.global_step}")
            if os.path.isdir(folder):
                write_json(os.path.join(folder, "train_config.json"), self.cfg.to_dict())


class CosineHorizon:
    """Linear warmup then cosine decay to `min_ratio` over a horizon that a `TimeBudgetCallback` may shorten while
    training runs (same curve as Trainer's "cosine_with_min_lr" when the horizon stays at max_steps)."""

    def __init__(self, warmup_steps: int, total_steps: int, min_ratio: float):
        self.warmup_steps, self.total_steps, self.min_ratio = warmup_steps, total_steps, min_ratio

    def __call__(self, step: int) -> float:
        if step < self.warmup_steps:
            return step / max(1, self.warmup_steps)
        progress = min(1.0, (step - self.warmup_steps) / max(1, self.total_steps - self.warmup_steps))
        return self.min_ratio + (1 - self.min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


class TimeBudgetCallback(TrainerCallback):
    """Fits a run into `budget_s` seconds of training: from step `calibrate_from` on it measures the seconds per step
    and sets the cosine horizon (at most max_steps) so that the schedule completes within the budget. The horizon
    follows the pace both ways: a machine that was busy at the start and then freed does not keep the short schedule
    it fitted then. A hard stop at the budget remains as a safety net. Evaluations count against the budget. The
    horizon is not saved in checkpoints: a time-budgeted run is not exactly resumable."""

    def __init__(self, budget_s: float, horizon: CosineHorizon | None = None, calibrate_from: int = 5):
        self.budget_s, self.horizon, self.calibrate_from = budget_s, horizon, calibrate_from
        self.start = self.mark = None
        self.mark_step = 0
        self.announced = None  # the horizon last printed

    def _sync(self, args, value: float) -> float:
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            t = torch.tensor([value], dtype=torch.float64, device=args.device)
            torch.distributed.broadcast(t, src=0)  # every rank takes rank 0's decision (or DDP would hang)
            value = float(t.item())
        return value

    def on_train_begin(self, args, state, control, **kwargs):
        self.start = time.time()

    def on_step_end(self, args, state, control, **kwargs):
        now = time.time()
        step = state.global_step
        if step == self.calibrate_from:
            self.mark, self.mark_step = now, step  # the first steps are slow (allocation, warm-up)
        elif self.horizon is not None and self.mark is not None and step % 5 == 0:
            per_step = (now - self.mark) / (step - self.mark_step)
            remaining = self.budget_s - (now - self.start)
            total = min(state.max_steps, step + max(1, int(remaining / per_step)))
            total = max(int(self._sync(args, total)), step)
            if state.is_world_process_zero and abs(total - (self.announced or state.max_steps)) >= 10:
                print(f"time budget {self.budget_s:.0f}s at {per_step:.2f}s/step: cosine horizon -> {total} steps")
                self.announced = total
            self.horizon.total_steps = total
        over = self._sync(args, float(now - self.start > self.budget_s))
        done = self.horizon is not None and step >= self.horizon.total_steps
        if (over or done) and step < state.max_steps:
            control.should_training_stop = True
            if state.is_world_process_zero:
                reason = "time budget reached" if over else "end of the budget-fitted schedule"
                print(f"{reason}: stopping at step {step} of {state.max_steps}")


class LossPrinterCallback(ProgressCallback):
    """Trainer's progress bar, with one readable line per log instead of a raw dict (or none: `print_logs=False`)."""

    def __init__(self, print_logs: bool = True):
        super().__init__()
        self.print_logs = print_logs

    def on_prediction_step(self, args, state, control, eval_dataloader=None, **kwargs):
        pass  # no second bar for the short periodic evaluations

    def on_log(self, args, state, control, logs=None, **kwargs):
        if not self.print_logs or not state.is_world_process_zero or self.training_bar is None or not logs:
            return
        step = f"step {state.global_step:>5}/{state.max_steps}"
        if "loss" in logs:
            line = f"{step} | train loss {logs['loss']:.4f} | lr {logs.get('learning_rate', float('nan')):.2e}"
        elif "eval_loss" in logs:
            line = f"{step} | val loss {logs['eval_loss']:.4f} nats/byte ({logs['eval_bpb']:.3f} bpb)"
        else:
            return
        self.training_bar.write(line)


def build_training_args(cfg: TrainConfig) -> TrainingArguments:
    report_to = cfg.report_to
    if report_to == "auto":
        try:
            import tensorboard  # noqa: F401

            report_to = "tensorboard"
        except ImportError:
            report_to = "none"
    return TrainingArguments(
        output_dir=cfg.output_dir,
        per_device_train_batch_size=cfg.batch_size,
        per_device_eval_batch_size=cfg.batch_size,
        gradient_accumulation_steps=cfg.grad_accum,
        max_steps=cfg.max_steps,
        learning_rate=cfg.learning_rate,
        lr_scheduler_type="cosine_with_min_lr",
        lr_scheduler_kwargs={"min_lr_rate": cfg.min_lr_ratio},
        warmup_steps=cfg.warmup_steps,
        optim="adamw_torch",
        weight_decay=cfg.weight_decay,
        adam_beta1=cfg.adam_beta1,
        adam_beta2=cfg.adam_beta2,
        max_grad_norm=cfg.max_grad_norm,
        bf16=cfg.bf16,
        activation_checkpointing=cfg.gradient_checkpointing,
        logging_strategy="steps",
        logging_steps=cfg.logging_steps,
        logging_first_step=True,
        eval_strategy="steps" if cfg.eval_steps else "no",
        eval_steps=cfg.eval_steps or None,
        save_strategy="steps" if cfg.save_steps else "no",
        save_steps=cfg.save_steps or 500,
        save_total_limit=cfg.save_total_limit,
        seed=cfg.seed,
        data_seed=cfg.seed,
        dataloader_num_workers=cfg.num_workers,
        dataloader_drop_last=False,
        dataloader_pin_memory=torch.cuda.is_available(),
        remove_unused_columns=False,
        report_to=report_to,
        disable_tqdm=False,
        # no GPU: run on CPU; several processes (torchrun / accelerate launch --multi_gpu) then use DDP over gloo
        use_cpu=not torch.cuda.is_available(),
        ddp_backend="gloo" if int(os.environ.get("WORLD_SIZE", "1")) > 1 and not torch.cuda.is_available() else None,
        ddp_find_unused_parameters=False,
    )


# ----------------------------------------------------------------------------------------------------------------------
# Helpers: output folder, summary, plot


def add_model_size_args(parser: argparse.ArgumentParser, **defaults) -> None:
    """The DFN size flags the task scripts share (and `--model KEY=VALUE` for any other config field); `defaults` maps
    their `dest` names to default values."""
    for flag, default in (
        ("--hidden-size", 128),
        ("--layers", 4),
        ("--heads", 4),
        ("--pos-dim", 2),
        ("--num-neighbors", 32),
        ("--memory-slots", 16),
        ("--memory-chunk-size", 64),
    ):
        dest = flag[2:].replace("-", "_")
        parser.add_argument(flag, type=positive_int, default=defaults.get(dest, default))
    parser.add_argument(
        "--model",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="DFN config override (e.g. use_query_flow=true, time_scale_min=1e-4), repeatable",
    )


def dfn_config_from_args(args, **overrides):
    """A `DFNConfig` from the flags of `add_model_size_args`: the size flags, then `--model` overrides, then any field
    in `overrides`."""
    from dfn import DFNConfig

    size = dict(
        hidden_size=args.hidden_size,
        num_hidden_layers=args.layers,
        num_attention_heads=args.heads,
        pos_dim=args.pos_dim,
        num_neighbors=args.num_neighbors,
        memory_slots=args.memory_slots,
        memory_chunk_size=args.memory_chunk_size,
    )
    return DFNConfig(**{**size, **parse_model_overrides(args.model), **overrides})


def train_on_stream(
    model, stream, out_dir: str, args, logging_steps: int, trainer_class=None, trainer_kwargs=None, **training_args
) -> dict:
    """Train `model` through `ByteLMTrainer` (or its subclass `trainer_class`, given `trainer_kwargs`) on an endless
    `IterableDataset` of `{"input_ids", "labels"}` examples, with warmup (10 % of the steps) and cosine decay; `args`
    gives `steps`, `batch_size`, `lr`, `seed` and `geometry_lr_scale`, `training_args` any other `TrainingArguments`
    field. Returns the training seconds and the logged loss curve `[(step, loss), ...]`."""
    from transformers import default_data_collator

    targs = TrainingArguments(
        output_dir=out_dir,
        max_steps=args.steps,
        per_device_train_batch_size=args.batch_size,
        learning_rate=args.lr,
        lr_scheduler_type="cosine",
        warmup_steps=max(1, args.steps // 10),
        weight_decay=0.01,
        max_grad_norm=1.0,
        logging_steps=logging_steps,
        save_strategy="no",
        report_to="none",
        seed=args.seed,
        remove_unused_columns=False,
        use_cpu=not torch.cuda.is_available(),
        **training_args,
    )
    trainer = (trainer_class or ByteLMTrainer)(  # geometry parameters get their own learning rate
        model=model,
        args=targs,
        train_dataset=stream,
        data_collator=default_data_collator,
        geometry_lr_scale=args.geometry_lr_scale,
        **(trainer_kwargs or {}),
    )
    start = time.perf_counter()
    trainer.train()
    seconds = time.perf_counter() - start
    model.eval()
    curve = [(h["step"], h["loss"]) for h in trainer.state.log_history if "loss" in h]
    return {"seconds": seconds, "loss_curve": curve}


def write_json(path: str, obj) -> None:
    with open(path, "w") as f:
        json.dump(obj, f, indent=2, default=str)
        f.write("\n")


def prepare_output_dir(cfg: TrainConfig, is_main: bool) -> str | None:
    """Apply the overwrite/resume rules; return the checkpoint to resume from (or None)."""
    out = Path(cfg.output_dir)
    non_empty = out.is_dir() and any(out.iterdir())
    if cfg.resume:
        if cfg.resume == "last":
            last = get_last_checkpoint(str(out)) if out.is_dir() else None
            if last is None:
                raise FileNotFoundError(f"--resume: no checkpoint-* folder in {out}")
            return last
        if not os.path.isdir(cfg.resume):
            raise FileNotFoundError(f"--resume: {cfg.resume} is not a checkpoint folder")
        resume = Path(cfg.resume).resolve()
        if out.resolve() in resume.parents:  # continuing this run
            return cfg.resume
        if resume == out.resolve() or resume in out.resolve().parents:
            raise FileExistsError(f"--resume {cfg.resume} is or contains --output_dir: give a checkpoint-* folder")
    if non_empty:
        if not cfg.overwrite:
            raise FileExistsError(
                f"{out} exists and is not empty: pass --overwrite to delete it first, or --resume to continue it"
            )
        if is_main:
            shutil.rmtree(out)
    return cfg.resume or None


def git_commit() -> str:
    try:
        sha = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], cwd=REPO_ROOT, capture_output=True, text=True, check=True
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"], cwd=REPO_ROOT, capture_output=True, text=True
        ).stdout.strip()
        return sha + ("-dirty" if dirty else "")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def hardware_string(world_size: int = 1) -> str:
    if torch.cuda.is_available():
        dev = f"{torch.cuda.device_count()}x {torch.cuda.get_device_name(0)}"
    else:
        name = platform.processor() or platform.machine()
        try:
            with open("/proc/cpuinfo") as f:
                name = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
        except (OSError, StopIteration):
            pass
        dev = f"CPU {name}, {os.cpu_count()} cores, {torch.get_num_threads()} torch threads"
    return f"{dev}; {world_size} process(es); torch {torch.__version__}; {platform.system()}"


def plot_loss_curve(log_history: list[dict], path: str, title: str = "", baseline: float | None = None) -> None:
    """Train and validation loss (nats/byte) against step, with the unigram baseline for reference."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    train = [(h["step"], h["loss"]) for h in log_history if "loss" in h]
    val = [(h["step"], h["eval_loss"]) for h in log_history if "eval_loss" in h]
    fig, ax = plt.subplots(figsize=(7, 4.5))
    if train:
        ax.plot(*zip(*train, strict=True), label="train", alpha=0.8)
    if val:
        ax.plot(*zip(*val, strict=True), "o-", label="val")
    if baseline is not None:
        ax.axhline(baseline, color="gray", ls="--", label=f"unigram baseline ({baseline:.2f})")
    ax.set_xlabel("step")
    ax.set_ylabel("loss (nats/byte)")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


# ----------------------------------------------------------------------------------------------------------------------
# The run


def train(cfg: TrainConfig, command: str | None = None, extra_callbacks=(), model=None) -> dict:
    """Train according to `cfg`; returns the summary dict (also written to `training_summary.json`).

    `model`: train this model (e.g. a PEFT-wrapped pretrained one, see finetune_lora.py) instead of a fresh one
    built from `cfg.model`. The returned dict additionally holds the live `trainer` under the key `"_trainer"`
    (not serialised)."""
    args = build_training_args(cfg)  # also sets up the (distributed) process state
    is_main = args.process_index == 0
    resume_from = prepare_output_dir(cfg, is_main)
    if args.world_size == 1 and os.environ.get("ACCELERATE_USE_CPU", "").lower() == "true" and is_main:
        print(
            "note: `accelerate launch --cpu` starts a single process unless given --mpirun_hostfile; for several CPU "
            "processes use `accelerate launch --multi_gpu --num_processes N` (torchrun; DDP over gloo on CPU) or "
            "`torchrun --nproc_per_node N`"
        )
    from accelerate import PartialState

    PartialState().wait_for_everyone()

    train_bytes, val_bytes, data_desc = load_data(cfg)
    train_ds, eval_ds, final_eval_ds = build_datasets(cfg, train_bytes, val_bytes)
    baseline = unigram_baseline(train_bytes, val_bytes)

    if model is None:
        model = build_model(cfg)
    else:
        set_seed(cfg.seed)
    tokenizer = DFNByteTokenizer()
    n_params = count_parameters(model)
    if is_main:
        print(
            f"data: {data_desc}: {len(train_bytes):,} train / {len(val_bytes):,} val bytes; "
            f"{len(train_ds):,} train blocks of {cfg.block_size}"
        )
        print(
            f"unigram baseline (byte frequencies of the train split): val {baseline['val_loss']:.4f} nats/byte "
            f"({baseline['val_bpb']:.3f} bpb)"
        )
        total = sum(p.numel() for p in {id(p): p for p in model.parameters()}.values())
        counts = f"{n_params:,} parameters" if total == n_params else f"{n_params:,} trainable of {total:,} parameters"
        print(f"model: {cfg.model_type} {counts}; world size {args.world_size}; output {cfg.output_dir}")

    os.makedirs(cfg.output_dir, exist_ok=True)
    if is_main:
        write_json(os.path.join(cfg.output_dir, "train_config.json"), cfg.to_dict())
    timer = StepTimerCallback()
    callbacks = [CSVLoggerCallback(os.path.join(cfg.output_dir, "log.csv")), SaveRunConfigCallback(cfg), timer]
    horizon = None
    if cfg.time_budget_s:
        horizon = CosineHorizon(cfg.warmup_steps, cfg.max_steps, cfg.min_lr_ratio)
        callbacks.append(TimeBudgetCallback(cfg.time_budget_s, horizon))
    trainer = ByteLMTrainer(
        model=model,
        args=args,
        train_dataset=train_ds,
        eval_dataset=eval_ds if cfg.eval_steps else None,
        data_collator=collate_blocks,
        processing_class=tokenizer,
        callbacks=callbacks + list(extra_callbacks),
        lr_horizon=horizon,
        geometry_lr_scale=cfg.geometry_lr_scale,
    )
    trainer.remove_callback(ProgressCallback)
    trainer.add_callback(LossPrinterCallback(print_logs=not cfg.quiet))

    start = time.time()
    train_output = trainer.train(resume_from_checkpoint=resume_from)
    train_time = time.time() - start

    final = trainer.evaluate(eval_dataset=final_eval_ds, metric_key_prefix="final_val")
    train_losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    summary = {
        "dataset": data_desc,
        "model_type": cfg.model_type,
        "parameters": n_params,  # trainable
        "train_steps": trainer.state.global_step,
        "planned_steps": cfg.max_steps,
        "batch_size": cfg.batch_size * cfg.grad_accum * args.world_size,
        "block_size": cfg.block_size,
        "learning_rate": cfg.learning_rate,
        "train_time_s": round(train_time, 1),
        "tokens_per_s": round(
            timer.steps * cfg.batch_size * cfg.grad_accum * args.world_size * cfg.block_size / max(timer.seconds, 1e-9),
            1,
        ),  # training steps only (evaluation excluded)
        "hardware": hardware_string(args.world_size),
        "val_loss": final["final_val_loss"],
        "val_bpb": final["final_val_bpb"],
        "val_ppl": final["final_val_ppl"],
        "val_bytes_scored": len(final_eval_ds) * (cfg.block_size - 1),
        "train_loss": train_losses[-1] if train_losses else None,
        "train_loss_run_mean": train_output.training_loss,
        "unigram_val_loss": baseline["val_loss"],
        "unigram_val_bpb": baseline["val_bpb"],
        "commit": git_commit(),
        "command": command or " ".join(sys.argv),
    }

    # the final model: generation-ready config (Trainer switched use_cache off for training)
    trainer.model.config.use_cache = True
    trainer.save_model(cfg.output_dir)
    if is_main:
        write_json(os.path.join(cfg.output_dir, "training_summary.json"), summary)
        if cfg.plot:
            plot_loss_curve(
                trainer.state.log_history,
                os.path.join(cfg.output_dir, "loss_curve.png"),
                title=f"{cfg.model_type} on {os.path.basename(cfg.train_files[0]) if not cfg.dataset else cfg.dataset}",
                baseline=baseline["val_loss"],
            )
    summary["_trainer"] = trainer
    return summary


def main(argv: list[str] | None = None) -> dict:
    cfg = parse_args(argv)
    try:
        summary = train(cfg, command=" ".join(["python", *sys.argv]) if argv is None else None)
    except (FileExistsError, FileNotFoundError) as e:
        raise SystemExit(f"error: {e}") from None
    trainer = summary.pop("_trainer")
    if trainer.args.process_index == 0:
        print(
            f"final val loss {summary['val_loss']:.4f} nats/byte ({summary['val_bpb']:.3f} bpb) "
            f"vs unigram {summary['unigram_val_loss']:.4f}; {summary['train_steps']} steps in "
            f"{summary['train_time_s']:.0f}s; saved to {cfg.output_dir}"
        )
    return summary


if __name__ == "__main__":
    main()
