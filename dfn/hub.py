"""Sharing DFN checkpoints on the Hugging Face Hub: assemble a repo folder, verify it loads, render its card, upload.

Used by `scripts/push_to_hub.py`. This module is *not* one of the remote-code files copied next to a checkpoint
(those are the `*_dfn.py` files), so it may import freely.

A source folder is either
- a saved model (training output): `config.json` with `auto_map`, `model.safetensors` (or a sharded index),
  the `*_dfn.py` code files, tokenizer files, `generation_config.json`, optionally `training_summary.json` and
  plots (`*.png`); or
- a PEFT adapter: `adapter_config.json` + `adapter_model.safetensors` (+ optional tokenizer, summary and plots).

The model card is rendered from `model_cards/dfn_model_card.md` with `huggingface_hub.ModelCard` and filled only from
files of the run (`config.json`, the weights' headers, `training_summary.json`, `adapter_config.json`).
"""

from __future__ import annotations

import copy
import importlib.metadata
import json
import math
import os
import re
import shlex
import shutil
import subprocess
import sys
import tempfile
from dataclasses import dataclass, field
from datetime import date
from pathlib import Path
from typing import Any

from huggingface_hub import EvalResult, HfApi, ModelCard, ModelCardData, get_token
from huggingface_hub.utils import HFValidationError, validate_repo_id

PROJECT_ROOT = Path(__file__).resolve().parent.parent
MODEL_CARD_TEMPLATE = PROJECT_ROOT / "model_cards" / "dfn_model_card.md"

CONFIG = "config.json"
GENERATION_CONFIG = "generation_config.json"
WEIGHTS = "model.safetensors"
WEIGHTS_INDEX = "model.safetensors.index.json"
ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
TOKENIZER_CONFIG = "tokenizer_config.json"
TOKENIZER_FILES = (
    TOKENIZER_CONFIG,
    "special_tokens_map.json",
    "added_tokens.json",
    "tokenizer.json",
    "chat_template.jinja",
)
SUMMARY = "training_summary.json"
README = "README.md"
PLOTS = {"loss_curve.png": "Training and validation loss", "scaling.png": "Scaling"}
REQUIRED_AUTO_MAP = ("AutoConfig", "AutoModelForCausalLM")
UNSAFE_WEIGHTS = ("pytorch_model.bin", "pytorch_model.bin.index.json", "adapter_model.bin")
TRAIN_CONFIG = "train_config.json"  # the training script's resolved config
# Training corpora -> Hub dataset ids (for the card's `datasets` metadata), matched in the summary's "dataset" text.
HUB_DATASETS = {r"\btiny_?shakespeare\b": "karpathy/tiny_shakespeare"}
NUMERIC_SUMMARY_KEYS = (
    "train_steps",
    "batch_size",
    "block_size",
    "learning_rate",
    "train_time_s",
    "val_loss",
    "val_bpb",
    "train_loss",
    "parameters",
    "tokens_per_s",
    "val_ppl",
    "unigram_val_bpb",
)
# train_config.json fields shown as hyper-parameters (when present)
HYPERPARAMETERS = (
    "warmup_steps",
    "min_lr_ratio",
    "weight_decay",
    "adam_beta1",
    "adam_beta2",
    "max_grad_norm",
    "grad_accum",
    "bf16",
    "seed",
    "val_fraction",
)
VERIFY_PROMPT = "ROMEO:\nWhat say"


class HubError(Exception):
    """A user-facing error: the message says what is wrong and how to fix it."""


@dataclass
class Source:
    """A checked source folder: `kind` is "model" or "adapter"; `notes` are non-fatal findings to report."""

    path: Path
    kind: str
    config: dict
    summary: dict | None
    notes: list[str] = field(default_factory=list)


# --------------------------------------------------------------------------------------------------------------------
# small helpers


def exists(value) -> bool:
    return value is not None


def read_json(path: Path) -> dict:
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except json.JSONDecodeError as e:
        raise HubError(f"{path} is not valid JSON: {e}") from None
    if not isinstance(data, dict):
        raise HubError(f"{path} must hold a JSON object, got {type(data).__name__}")
    return data


def write_json(path: Path, data: dict):
    path.write_text(json.dumps(data, indent=2, sort_keys=True, ensure_ascii=False) + "\n", encoding="utf-8")


def redact(text: str, secret: str | None) -> str:
    """`text` with every occurrence of `secret` replaced, for messages that may echo a request."""
    return text.replace(secret, "***") if secret else text


def human_count(n: int) -> str:
    for unit, scale in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= scale:
            return f"{n / scale:.2f}{unit}"
    return str(n)


def human_size(n: int) -> str:
    for unit, scale in (("GB", 1 << 30), ("MB", 1 << 20), ("KB", 1 << 10)):
        if n >= scale:
            return f"{n / scale:.1f} {unit}"
    return f"{n} B"


def human_duration(seconds: float) -> str:
    if seconds < 120:
        return f"{seconds:.0f} s"
    if seconds < 7200:
        return f"{seconds:.0f} s ({seconds / 60:.1f} min)"
    return f"{seconds:.0f} s ({seconds / 3600:.2f} h)"


def fmt_number(value) -> str:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return str(value)
    if isinstance(value, int):
        return f"{value:,}"
    if value != 0 and (abs(value) < 1e-3 or abs(value) >= 1e6):
        return f"{value:.3g}"
    return f"{value:.4f}".rstrip("0").rstrip(".") if abs(value) < 1 else f"{value:.4f}"


def package_requirement(name: str, default: str) -> str:
    """The version spec of `name` in dfn's own dependencies (e.g. `transformers>=5.24,<5.40`)."""
    try:
        requirements = importlib.metadata.requires("dfn") or []
    except importlib.metadata.PackageNotFoundError:
        return default
    for req in requirements:
        match = re.match(rf"^{re.escape(name)}\s*([<>=!~][^;]*)?(;.*)?$", req.strip(), flags=re.IGNORECASE)
        if match and not match.group(2):
            spec = (match.group(1) or "").replace(" ", "")
            parts = sorted(spec.split(","), key=lambda p: not p.startswith(">")) if spec else []
            return name + ",".join(parts)
    return default


def default_license() -> str:
    try:
        text = importlib.metadata.metadata("dfn").get("License") or ""
    except importlib.metadata.PackageNotFoundError:
        text = ""
    return text.strip().lower() or "apache-2.0"


def check_repo_id(repo_id: str, what: str = "--repo-id"):
    try:
        validate_repo_id(repo_id)
    except HFValidationError as e:
        raise HubError(f"{what} {repo_id!r} is not a valid Hub repo id: {e}") from None
    if repo_id.count("/") != 1:
        raise HubError(f"{what} must be USER/NAME (or ORG/NAME), got {repo_id!r}")


def resolve_token(explicit: str | None) -> str:
    """The token from `--token`, else `HF_TOKEN`, else the one saved by `hf auth login`."""
    token = explicit or get_token()
    if not token:
        raise HubError(
            "No Hugging Face token found: set HF_TOKEN, run `hf auth login`, or pass --token "
            "(a write token from https://huggingface.co/settings/tokens). "
            "Use --dry-run to build and check the folder without one."
        )
    return token


# --------------------------------------------------------------------------------------------------------------------
# source inspection


def load_summary(folder: Path) -> dict | None:
    path = folder / SUMMARY
    if not path.is_file():
        return None
    summary = read_json(path)
    for key in NUMERIC_SUMMARY_KEYS:
        value = summary.get(key)
        is_number = isinstance(value, (int, float)) and not isinstance(value, bool)
        if exists(value) and not (is_number and math.isfinite(value)):
            raise HubError(f"{path}: {key!r} must be a finite number, got {value!r}")
    if isinstance(summary.get("command"), list):  # argv as a list
        summary["command"] = shlex.join(str(a) for a in summary["command"])
    comparison = summary.get("comparison")
    if exists(comparison) and not isinstance(comparison, dict):
        raise HubError(f"{path}: 'comparison' must be an object, got {type(comparison).__name__}")
    # Bits and nats per byte are the same measurement: derive the missing one (1 nat = 1/ln 2 bits).
    if exists(summary.get("val_loss")) and not exists(summary.get("val_bpb")):
        summary["val_bpb"] = summary["val_loss"] / math.log(2)
    if exists(summary.get("val_bpb")) and not exists(summary.get("val_loss")):
        summary["val_loss"] = summary["val_bpb"] * math.log(2)
    return summary


def _code_module_file(folder: Path, reference: str, where: str) -> Path | None:
    """`configuration_dfn.DFNConfig` -> folder/configuration_dfn.py (None for code in another repo: `repo--mod.Cls`)."""
    if "--" in reference:
        return None
    module, _, cls = reference.rpartition(".")
    if not module or not cls:
        raise HubError(f"{where}: auto_map entry {reference!r} is not of the form module.ClassName")
    path = folder / f"{module}.py"
    if not path.is_file():
        raise HubError(f"{where}: auto_map points to {reference!r} but {path.name} is missing from {folder}")
    return path


def _auto_map_refs(auto_map: dict) -> list[str]:
    refs = []
    for value in auto_map.values():
        refs.extend(v for v in (value if isinstance(value, (list, tuple)) else [value]) if v)
    return refs


def code_files(folder: Path) -> list[Path]:
    """The code files the folder's `auto_map`s reference, with the files they import relatively (recursively)."""
    from transformers.dynamic_module_utils import get_relative_imports

    todo: list[tuple[Path, str]] = []
    for name in (CONFIG, TOKENIZER_CONFIG):
        if (folder / name).is_file():
            for ref in _auto_map_refs(read_json(folder / name).get("auto_map") or {}):
                module_file = _code_module_file(folder, ref, str(folder / name))
                if exists(module_file):
                    todo.append((module_file, f"auto_map of {name}"))
    files: set[Path] = set()
    while todo:
        file, wanted_by = todo.pop()
        if file in files:
            continue
        if not file.is_file():
            raise HubError(f"{folder}: {file.name} (imported by {wanted_by}) is missing from the folder")
        files.add(file)
        todo.extend((folder / f"{module}.py", file.name) for module in get_relative_imports(str(file)))
    return sorted(files)


def _check_weights(folder: Path) -> list[Path]:
    if (folder / WEIGHTS).is_file():
        return [folder / WEIGHTS]
    if (folder / WEIGHTS_INDEX).is_file():
        shards = sorted(set(read_json(folder / WEIGHTS_INDEX).get("weight_map", {}).values()))
        missing = [s for s in shards if not (folder / s).is_file()]
        if not shards or missing:
            raise HubError(f"{folder / WEIGHTS_INDEX} lists weight shards that are missing: {missing or 'none listed'}")
        return [folder / WEIGHTS_INDEX, *(folder / s for s in shards)]
    unsafe = [name for name in UNSAFE_WEIGHTS if (folder / name).is_file()]
    if unsafe:
        raise HubError(
            f"{folder} has only pickled weights ({', '.join(unsafe)}): the Hub repo must hold safetensors. "
            "Re-save the model with `model.save_pretrained(folder)` (safetensors is the default)."
        )
    raise HubError(f"{folder} has no model weights: expected {WEIGHTS} (or {WEIGHTS_INDEX} with its shards)")


def inspect_source(folder: str | os.PathLike) -> Source:
    """Check that `folder` is a pushable DFN model or adapter folder; raise `HubError` saying what is missing."""
    path = Path(folder).expanduser().resolve()
    if not path.is_dir():
        raise HubError(f"--source {folder} is not a folder")
    summary = load_summary(path)
    notes = [] if exists(summary) else [f"no {SUMMARY} in {path}: the card will have no training/evaluation numbers"]

    if (path / ADAPTER_CONFIG).is_file():
        config = read_json(path / ADAPTER_CONFIG)
        if not (path / ADAPTER_WEIGHTS).is_file():
            hint = (
                " (found adapter_model.bin: re-save with PEFT's save_pretrained, safetensors)"
                if (path / "adapter_model.bin").is_file()
                else ""
            )
            raise HubError(f"{path} is an adapter folder without {ADAPTER_WEIGHTS}{hint}")
        return Source(path, "adapter", config, summary, notes)

    if not (path / CONFIG).is_file():
        raise HubError(f"{path} has no {CONFIG} (nor {ADAPTER_CONFIG}): not a saved model or adapter folder")
    config = read_json(path / CONFIG)
    if config.get("model_type") != "dfn":
        raise HubError(f"{path / CONFIG} has model_type {config.get('model_type')!r}, expected 'dfn'")
    _check_weights(path)
    auto_map = config.get("auto_map") or {}
    absent = [key for key in REQUIRED_AUTO_MAP if key not in auto_map]
    if absent:
        raise HubError(
            f"{path / CONFIG} has no auto_map entry for {', '.join(absent)}: the Hub could not load it with "
            "trust_remote_code=True. Save the model after `import dfn` (which calls register_for_auto_class) so that "
            "save_pretrained writes auto_map and copies the code files."
        )
    code_files(path)  # raises when a referenced code file is missing
    if not (path / TOKENIZER_CONFIG).is_file():
        notes.append(f"no tokenizer files in {path}: adding the default DFNByteTokenizer")
    if not (path / GENERATION_CONFIG).is_file():
        notes.append(f"no {GENERATION_CONFIG} in {path}: writing one from the special token ids of {CONFIG}")
    return Source(path, "model", config, summary, notes)


def count_parameters(files: list[Path]) -> int:
    """Number of stored parameters (tied weights count once), read from the safetensors headers."""
    from safetensors import safe_open

    total = 0
    for file in files:
        if file.suffix != ".safetensors":
            continue
        with safe_open(str(file), framework="pt") as f:
            for key in f.keys():
                total += math.prod(f.get_slice(key).get_shape())
    return total


# --------------------------------------------------------------------------------------------------------------------
# assembling the repo folder


def paths_overlap(a: Path, b: Path) -> bool:
    """Whether the resolved folders `a` and `b` are the same, or one lies inside the other."""
    return a == b or a in b.parents or b in a.parents


def prepare_out(out: str | os.PathLike, source: Path, overwrite: bool, base: Path | None = None) -> Path:
    """Create (or, with `overwrite`, empty) the target folder; refuse a non-empty one or one that holds the source or
    the local base model of an adapter (`base`)."""
    out = Path(out).expanduser().resolve()
    for kept, what in ((source, "source"), (base, "base model's")):
        if kept is not None and paths_overlap(out, Path(kept)):
            raise HubError(f"--out {out} must not be the {what} folder, inside it, or contain it ({kept})")
    if out.exists() and not out.is_dir():
        raise HubError(f"--out {out} exists and is not a folder")
    if out.is_dir() and any(out.iterdir()):
        if not overwrite:
            raise HubError(
                f"--out {out} is not empty: pass --overwrite to replace its contents, or choose another folder"
            )
        for child in out.iterdir():
            if child.is_dir() and not child.is_symlink():
                shutil.rmtree(child)
            else:
                child.unlink()
    out.mkdir(parents=True, exist_ok=True)
    return out


def _complete_auto_map(config: dict, folder: Path) -> list[str]:
    """Add the package's auto_map entries that config.json lacks (e.g. AutoModel) when their class is in the folder."""
    try:
        from dfn import AUTO_MAP
    except ImportError:
        return []
    added = []
    auto_map = config.setdefault("auto_map", {})
    for key, ref in AUTO_MAP.items():
        module, _, cls = ref.rpartition(".")
        file = folder / f"{module}.py"
        if key not in auto_map and file.is_file() and re.search(rf"^class {cls}\b", file.read_text(), flags=re.M):
            auto_map[key] = ref
            added.append(key)
    return added


def _copy(src: Path, dst_folder: Path) -> str:
    shutil.copyfile(src, dst_folder / src.name)
    return src.name


def assemble(
    source: Source,
    out: Path,
    *,
    repo_id: str,
    base_model: str | None = None,
    revision: str | None = None,
    license: str | None = None,
    language: str | None = "en",
    dataset_id: str | None = None,
    base_config: dict | None = None,
) -> tuple[list[str], ModelCard, list[str]]:
    """Write the repo folder into the (empty) `out`; return (relative file names, rendered card, notes)."""
    notes = list(source.notes)
    files: set[str] = set()
    src = source.path
    if source.kind == "model":
        files.update(_copy(p, out) for p in _check_weights(src))
        config = copy.deepcopy(source.config)
        added = _complete_auto_map(config, src)
        if added:
            notes.append(f"{CONFIG}: added auto_map entries {added} (the saved config lacked them)")
            write_json(out / CONFIG, config)
        else:
            _copy(src / CONFIG, out)  # byte for byte
        files.add(CONFIG)
        files.update(_copy(p, out) for p in code_files(src))
        if (src / GENERATION_CONFIG).is_file():
            files.add(_copy(src / GENERATION_CONFIG, out))
        else:
            from transformers import GenerationConfig

            ids = {k: config.get(k) for k in ("bos_token_id", "eos_token_id", "pad_token_id")}
            GenerationConfig(**ids).save_pretrained(out)
            files.add(GENERATION_CONFIG)
    else:
        if not base_model:
            raise HubError("an adapter needs --base-model USER/NAME: the Hub repo id of the base DFN model")
        check_repo_id(base_model, "--base-model")
        adapter_config = copy.deepcopy(source.config)
        adapter_config["base_model_name_or_path"] = base_model
        write_json(out / ADAPTER_CONFIG, adapter_config)
        files.update({ADAPTER_CONFIG, _copy(src / ADAPTER_WEIGHTS, out)})

    if (src / TOKENIZER_CONFIG).is_file():
        files.update(_copy(src / name, out) for name in TOKENIZER_FILES if (src / name).is_file())
        files.update(_copy(p, out) for p in code_files(src) if p.name not in files)  # the tokenizer's code
    elif source.kind == "model":
        from dfn import DFNByteTokenizer

        saved = DFNByteTokenizer().save_pretrained(out)
        files.update(Path(p).name for p in saved if Path(p).is_file())
        files.update(p.name for p in out.glob("tokenization_*.py"))
    if source.summary is not None:
        files.add(_copy(src / SUMMARY, out))
    if (src / TRAIN_CONFIG).is_file():
        read_json(src / TRAIN_CONFIG)  # must be valid JSON
        files.add(_copy(src / TRAIN_CONFIG, out))
    files.update(_copy(p, out) for p in sorted(src.glob("*.png")))

    card = render_card(
        out,
        kind=source.kind,
        repo_id=repo_id,
        summary=source.summary,
        base_model=base_model,
        revision=revision,
        license=license,
        language=language,
        dataset_id=dataset_id,
        base_config=base_config,
    )
    card.save(out / README)
    files.add(README)
    return sorted(files), card, notes


# --------------------------------------------------------------------------------------------------------------------
# model card


def _comparison_table(summary: dict) -> tuple[list[str], list[list[str]]]:
    """`comparison = {"llama_val_bpb": x, ...}` -> header ["", "this model", "llama"] and one row per metric."""
    if isinstance(summary.get("command"), list):  # argv as a list
        summary["command"] = shlex.join(str(a) for a in summary["command"])
    comparison = summary.get("comparison") or {}
    baselines: dict[str, dict[str, Any]] = {}
    for key, value in comparison.items():
        name, sep, metric = key.partition("_")
        if sep and isinstance(value, (int, float, str)) and not isinstance(value, bool):
            baselines.setdefault(name, {})[metric] = value
    if not baselines:
        return [], []
    metrics = []
    for values in baselines.values():
        metrics += [m for m in values if m not in metrics]
    labels = {
        "val_bpb": "val bits per byte",
        "val_loss": "val loss (nats/byte)",
        "train_loss": "train loss",
        "params": "parameters",
        "parameters": "parameters",
        "train_time_s": "train time (s)",
        "tokens_per_s": "throughput (bytes/s)",
    }
    header = ["metric", "DFN (this model)", *(f"{name} (same size)" for name in baselines)]
    rows = []
    for metric in metrics:
        row = [labels.get(metric, metric), fmt_number(summary[metric]) if exists(summary.get(metric)) else "–"]
        row += [fmt_number(values[metric]) if metric in values else "–" for values in baselines.values()]
        rows.append(row)
    return header, rows


def _architecture_rows(config: dict) -> list[tuple[str, str]]:
    fields = [
        ("hidden_size", "hidden size"),
        ("num_hidden_layers", "layers"),
        ("num_attention_heads", "heads"),
        ("pos_dim", "position coordinates per head"),
        ("num_neighbors", "neighbours per entity (K)"),
        ("memory_slots", "field-memory slots per layer and head"),
        ("memory_chunk_size", "memory chunk size"),
        ("vocab_size", "vocabulary (256 bytes + pad/bos/eos)"),
        ("layer_variant", "layer variant"),
        ("use_flow", "flow"),
        ("use_memory", "field memory"),
    ]
    return [(label, fmt_number(config[key])) for key, label in fields if key in config]


def _training_rows(summary: dict) -> list[tuple[str, str]]:
    rows = []

    def add(label, key, fmt=fmt_number):
        if exists(summary.get(key)):
            rows.append((label, fmt(summary[key])))

    add("data", "dataset")
    add("steps", "train_steps")
    add("batch size (sequences, all devices)", "batch_size")
    add("block size (bytes)", "block_size")
    if all(isinstance(summary.get(k), int) for k in ("train_steps", "batch_size", "block_size")):
        rows.append(("bytes seen", fmt_number(summary["train_steps"] * summary["batch_size"] * summary["block_size"])))
    add("peak learning rate", "learning_rate", lambda v: f"{v:g}")
    add("hardware", "hardware")
    add("wall time", "train_time_s", human_duration)
    add("throughput (bytes/s)", "tokens_per_s", lambda v: f"{v:,.0f}")
    add("code commit", "commit", lambda v: f"`{v}`")
    return rows


def _hyperparameter_rows(train_config: dict | None) -> list[tuple[str, str]]:
    train_config = train_config or {}

    def fmt(value):
        return f"{value:g}" if isinstance(value, float) else str(value)

    return [(key, fmt(train_config[key])) for key in HYPERPARAMETERS if exists(train_config.get(key))]


def dataset_names(summary: dict, dataset_id: str | None = None) -> tuple[str | None, str | None]:
    """(short name for prose, Hub dataset id) from the summary's "dataset" text, e.g.
    "tinyshakespeare.txt (byte-level, nanoGPT split: ...)" -> ("tinyshakespeare.txt", "karpathy/tiny_shakespeare")."""
    text = summary.get("dataset")
    short = str(text).split(" (")[0].strip() if exists(text) else None
    if not dataset_id:
        known = [hub_id for pattern, hub_id in HUB_DATASETS.items() if re.search(pattern, str(text or ""), re.I)]
        as_id = short if short and short.count("/") == 1 and not Path(short).exists() else None
        dataset_id = summary.get("dataset_id") or (known[0] if known else as_id)
    return short, dataset_id


def build_card_data(
    *,
    kind: str,
    repo_id: str,
    summary: dict | None,
    base_model: str | None,
    license: str | None,
    language: str | None,
    dataset_id: str | None,
) -> ModelCardData:
    summary = summary or {}
    model_name = repo_id.split("/")[-1]
    dataset_name, dataset_id = dataset_names(summary, dataset_id)
    eval_results = []
    split = summary.get("val_split")
    for key, metric_type, metric_name in (
        ("val_bpb", "bpb", "Validation bits per byte"),
        ("val_loss", "loss", "Validation loss (nats per byte)"),
    ):
        if exists(summary.get(key)):
            eval_results.append(
                EvalResult(
                    task_type="text-generation",
                    task_name="Byte-level language modelling",
                    dataset_type=dataset_id or str(dataset_name or "unknown"),
                    dataset_name=str(dataset_name or dataset_id or "validation set"),
                    dataset_split=split,
                    metric_type=metric_type,
                    metric_name=metric_name,
                    metric_value=summary[key],
                )
            )
    tags = ["dfn", "custom_code", "byte-level", "text-generation"]
    extra = {}
    if kind == "adapter":
        tags += ["peft", "lora"]
        extra["base_model_relation"] = "adapter"
    return ModelCardData(
        license=license or default_license(),
        language=language,
        library_name="peft" if kind == "adapter" else "transformers",
        pipeline_tag="text-generation",
        tags=tags,
        datasets=[dataset_id] if dataset_id else None,
        base_model=base_model if kind == "adapter" else None,
        model_name=model_name,
        eval_results=eval_results or None,
        **extra,
    )


def render_card(
    folder: Path,
    *,
    kind: str,
    repo_id: str,
    summary: dict | None,
    base_model: str | None = None,
    revision: str | None = None,
    license: str | None = None,
    language: str | None = "en",
    dataset_id: str | None = None,
    base_config: dict | None = None,
    template_path: Path = MODEL_CARD_TEMPLATE,
) -> ModelCard:
    """Render the card of the assembled `folder` from its own files and the run's `summary`."""
    if not template_path.is_file():
        raise HubError(f"model card template {template_path} not found (it lives in the repository's model_cards/)")
    folder = Path(folder)
    card_data = build_card_data(
        kind=kind,
        repo_id=repo_id,
        summary=summary,
        base_model=base_model,
        license=license,
        language=language,
        dataset_id=dataset_id,
    )
    summary = summary or {}
    is_adapter = kind == "adapter"
    if is_adapter:
        adapter = read_json(folder / ADAPTER_CONFIG)
        model_config = base_config or {}
        weights = [folder / ADAPTER_WEIGHTS]
        targets = adapter.get("target_modules")
        targets = ", ".join(f"`{m}`" for m in sorted(targets)) if isinstance(targets, list) else f"`{targets}`"
        adapter_rows = [
            ("method", str(adapter.get("peft_type", "LORA")).lower()),
            ("rank r", fmt_number(adapter.get("r"))),
            ("lora_alpha", fmt_number(adapter.get("lora_alpha"))),
            ("lora_dropout", fmt_number(adapter.get("lora_dropout"))),
            ("target modules", targets),
        ]
    else:
        model_config = read_json(folder / CONFIG)
        index = folder / WEIGHTS_INDEX
        shards = sorted(set(read_json(index)["weight_map"].values())) if index.is_file() else [WEIGHTS]
        weights = [folder / s for s in shards]
        adapter_rows = []
    dataset_name, _ = dataset_names(summary, dataset_id)
    dataset_ids = card_data.datasets or []
    total = count_parameters(weights) if all(w.is_file() for w in weights) else None
    own = dict(summary)
    if not is_adapter and exists(total):
        own.setdefault("parameters", total)
        own.setdefault("params", own["parameters"])
    header, comparison_rows = _comparison_table(own)
    plots = {name: caption for name, caption in PLOTS.items() if (folder / name).is_file()}
    other_plots = sorted(p.name for p in folder.glob("*.png") if p.name not in PLOTS)
    prompt = summary.get("sample_prompt") or ("ROMEO:" if "shakespeare" in str(dataset_name).lower() else "The ")
    has_tokenizer = (folder / TOKENIZER_CONFIG).is_file()
    train_config = read_json(folder / TRAIN_CONFIG) if (folder / TRAIN_CONFIG).is_file() else None

    def optional_number(key):
        return fmt_number(summary[key]) if exists(summary.get(key)) else None

    card = ModelCard.from_template(
        card_data,
        template_path=str(template_path),
        repo_id=repo_id,
        model_name=card_data.model_name,
        is_adapter=is_adapter,
        base_model=base_model,
        revision=revision,
        tokenizer_repo=repo_id if (has_tokenizer or not is_adapter) else base_model,
        transformers_requirement=package_requirement("transformers", "transformers>=5.24"),
        peft_requirement=package_requirement("peft", "peft>=0.21.2"),
        parameter_count=human_count(total) if exists(total) else None,
        architecture_rows=_architecture_rows(model_config),
        adapter_rows=adapter_rows,
        code_files=sorted(p.name for p in folder.glob("*.py")),
        has_summary=bool(summary),
        summary=summary,
        dataset_name=dataset_name,
        dataset_id=dataset_ids[0] if dataset_ids else None,
        training_rows=_training_rows(summary),
        hyperparameter_rows=_hyperparameter_rows(train_config),
        train_config_file=TRAIN_CONFIG if exists(train_config) else None,
        val_ppl=optional_number("val_ppl"),
        val_bytes_scored=optional_number("val_bytes_scored"),
        unigram_val_bpb=optional_number("unigram_val_bpb"),
        val_bpb=optional_number("val_bpb"),
        val_loss=optional_number("val_loss"),
        train_loss=optional_number("train_loss"),
        comparison_header=header,
        comparison_rows=comparison_rows,
        eval_command=summary.get("eval_command"),
        plots=plots,
        other_plots=other_plots,
        prompt=prompt,
        year=date.today().year,
    )
    return ModelCard(re.sub(r"\n{3,}", "\n\n", str(card)).strip() + "\n")


# --------------------------------------------------------------------------------------------------------------------
# verification in a fresh process that cannot import dfn

_VERIFY_SCRIPT = r"""
import importlib.abc, json, os, sys

args = json.loads(sys.argv[1])
project_root = os.path.realpath(args["project_root"])

def provides_dfn(entry):
    entry = os.path.realpath(entry or os.getcwd())
    return entry == project_root or os.path.isfile(os.path.join(entry, "dfn", "__init__.py"))

sys.path[:] = [p for p in sys.path if p and not provides_dfn(p)]
sys.meta_path[:] = [f for f in sys.meta_path if not type(f).__module__.startswith("__editable___dfn")]

class BlockDFN(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name == "dfn" or name.startswith("dfn."):
            raise ModuleNotFoundError(f"No module named {name!r} (hidden: the folder must load without the package)")
        return None

sys.meta_path.insert(0, BlockDFN())
try:
    import dfn  # noqa: F401
except ModuleNotFoundError:
    dfn_importable = False
else:
    raise SystemExit("could not hide the dfn package from the verification process")

import torch
from transformers import AutoConfig, AutoModel, AutoModelForCausalLM, AutoTokenizer, pipeline

folder, base_folder, n = args["folder"], args["base_folder"], args["max_new_tokens"]
load = dict(trust_remote_code=True)
if base_folder:
    from peft import PeftModel

    base = AutoModelForCausalLM.from_pretrained(base_folder, **load)
    model = PeftModel.from_pretrained(base, folder).eval()
    model_class = type(base)
    tokenizer_folder = folder if os.path.isfile(os.path.join(folder, "tokenizer_config.json")) else base_folder
else:
    config = AutoConfig.from_pretrained(folder, **load)
    model = AutoModelForCausalLM.from_pretrained(folder, **load).eval()
    model_class = type(model)
    if "AutoModel" in (getattr(config, "auto_map", None) or {}):
        AutoModel.from_pretrained(folder, **load)
    tokenizer_folder = folder
tokenizer = AutoTokenizer.from_pretrained(tokenizer_folder, **load)
for obj in (model_class, type(tokenizer)):
    if not obj.__module__.startswith("transformers_modules."):
        raise SystemExit(f"{obj.__name__} was not loaded from the folder's code (module {obj.__module__})")

inputs = tokenizer(args["prompt"], return_tensors="pt")
with torch.no_grad():
    logits = model(**inputs).logits
    generated = model.generate(**inputs, max_new_tokens=n, do_sample=False)
new = generated[0, inputs["input_ids"].shape[1]:]
if new.numel() == 0:
    raise SystemExit("generate() returned no new tokens")
if not torch.isfinite(logits).all():
    raise SystemExit("the model produced non-finite logits")
result = {
    "dfn_importable": dfn_importable,
    "model_class": model_class.__module__ + "." + model_class.__name__,
    "tokenizer_class": type(tokenizer).__module__ + "." + type(tokenizer).__name__,
    "input_ids": inputs["input_ids"][0].tolist(),
    "logits": logits[0].float().tolist(),
    "generated_ids": new.tolist(),
    "generated_text": tokenizer.decode(new),
}
if not base_folder:
    generator = pipeline("text-generation", model=model, tokenizer=tokenizer)
    out = generator(args["prompt"], max_new_tokens=n, do_sample=False)
    result["pipeline_text"] = out[0]["generated_text"]
with open(args["result_path"], "w", encoding="utf-8") as f:
    json.dump(result, f)
"""


def verify_loads(
    folder: str | os.PathLike,
    *,
    base_folder: str | os.PathLike | None = None,
    prompt: str = VERIFY_PROMPT,
    max_new_tokens: int = 4,
    timeout: float = 600,
) -> dict:
    """Load `folder` in a fresh Python process that cannot import `dfn` and generate `max_new_tokens` greedily.

    The process runs in a temporary working directory with `PYTHONPATH` unset, every `sys.path` entry that would
    provide `dfn` removed, `HF_HUB_OFFLINE=1` and a temporary `HF_HOME`, and loads with `AutoConfig`,
    `AutoModelForCausalLM` (and `AutoModel` when mapped), `AutoTokenizer` and `pipeline`, all with
    `trust_remote_code=True`; an adapter folder is loaded with PEFT onto `base_folder`. Returns the loaded class
    names, the prompt's ids and logits, and the generated ids and text; raises `HubError` with the child's output
    when anything fails.
    """
    folder = Path(folder).resolve()
    with tempfile.TemporaryDirectory(prefix="dfn-verify-") as tmp:
        result_path = Path(tmp) / "result.json"
        args = {
            "folder": str(folder),
            "base_folder": str(Path(base_folder).resolve()) if base_folder else None,
            "max_new_tokens": max_new_tokens,
            "prompt": prompt,
            "project_root": str(PROJECT_ROOT),
            "result_path": str(result_path),
        }
        env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "HF_TOKEN", "HF_MODULES_CACHE")}
        env.update(
            HF_HUB_OFFLINE="1",
            TRANSFORMERS_OFFLINE="1",
            HF_HOME=str(Path(tmp) / "hf_home"),
            HF_HUB_DISABLE_TELEMETRY="1",
            TOKENIZERS_PARALLELISM="false",
        )
        cwd = Path(tmp) / "cwd"
        cwd.mkdir()
        try:
            proc = subprocess.run(
                [sys.executable, "-c", _VERIFY_SCRIPT, json.dumps(args)],
                cwd=cwd,
                env=env,
                capture_output=True,
                text=True,
                timeout=timeout,
            )
        except subprocess.TimeoutExpired:
            raise HubError(f"loading {folder} in a fresh process took longer than {timeout:.0f} s") from None
        if proc.returncode != 0 or not result_path.is_file():
            tail = "\n".join((proc.stderr + proc.stdout).strip().splitlines()[-25:])
            raise HubError(
                f"{folder} does not load in a fresh process (offline, trust_remote_code=True, without the dfn "
                f"package); refusing to push it. Output:\n{tail}"
            )
        return json.loads(result_path.read_text(encoding="utf-8"))


# --------------------------------------------------------------------------------------------------------------------
# upload


def upload(
    folder: str | os.PathLike,
    *,
    repo_id: str,
    token: str,
    private: bool = False,
    revision: str | None = None,
    commit_message: str,
    endpoint: str | None = None,
):
    """Create the repo (and branch) if needed and upload `folder` as one commit; returns the `CommitInfo`.

    Uses `upload_folder`, not `model.push_to_hub`, so the rendered README.md is what lands on the Hub.
    """
    api = HfApi(endpoint=endpoint, token=token)
    api.create_repo(repo_id, private=private, exist_ok=True)
    if revision:
        api.create_branch(repo_id, branch=revision, exist_ok=True)
    return api.upload_folder(repo_id=repo_id, folder_path=str(folder), revision=revision, commit_message=commit_message)


def default_commit_message(source: Source) -> str:
    summary = source.summary or {}
    what = "LoRA adapter" if source.kind == "adapter" else "model"
    parts = [f"Upload DFN {what}"]
    dataset, _ = dataset_names(summary)
    if dataset:
        parts.append(f"trained on {dataset}")
    if exists(summary.get("val_bpb")):
        parts.append(f"val bpb {summary['val_bpb']:.4f}")
    return parts[0] + (f" ({', '.join(parts[1:])})" if parts[1:] else "")


__all__ = [
    "HubError",
    "Source",
    "assemble",
    "build_card_data",
    "check_repo_id",
    "code_files",
    "count_parameters",
    "dataset_names",
    "default_commit_message",
    "human_size",
    "inspect_source",
    "load_summary",
    "prepare_out",
    "read_json",
    "redact",
    "render_card",
    "resolve_token",
    "upload",
    "verify_loads",
]
