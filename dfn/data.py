"""Byte-level data helpers: text -> byte ids -> packed blocks, the nanoGPT split, and a unigram baseline.

Byte ids are the raw UTF-8 bytes (0-255), exactly what `DFNByteTokenizer` produces without special tokens, so a
model trained on these blocks reads and writes plain text through the tokenizer.

Not part of the remote code a checkpoint needs (training only).
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence

import numpy as np
import torch
from torch.utils.data import Dataset


def read_text_bytes(paths: str | os.PathLike | Sequence[str | os.PathLike]) -> np.ndarray:
    """Read one or more files as raw bytes and concatenate them. Returns a `uint8` array."""
    if isinstance(paths, (str, os.PathLike)):
        paths = [paths]
    if not paths:
        raise ValueError("no text files given")
    chunks = []
    for path in paths:
        with open(path, "rb") as f:
            chunks.append(f.read())
    data = np.frombuffer(b"".join(chunks), dtype=np.uint8).copy()
    if data.size == 0:
        raise ValueError(f"the text files {list(map(str, paths))} are empty")
    return data


def load_dataset_bytes(path: str, split: str = "train", text_column: str = "text") -> np.ndarray:
    """Bytes of a local `datasets` dataset: a folder written by `save_to_disk` (rows joined by newlines), a text file
    (its raw bytes, as `read_text_bytes`), or text files named by a folder or glob, read with the `text` builder
    (`load_dataset("text", data_files=..., keep_linebreaks=True)`; it reads in text mode, so "\r\n" becomes "\n")."""
    import datasets

    if os.path.isfile(path):  # the text builder would turn "\r\n" into "\n": not the bytes --train_files trains on
        return read_text_bytes(path)
    saved = os.path.isdir(path) and any(
        os.path.exists(os.path.join(path, name)) for name in ("dataset_info.json", "dataset_dict.json")
    )
    if saved:
        ds = datasets.load_from_disk(path)
        joiner = "\n"
    else:
        ds = datasets.load_dataset("text", data_files=path, keep_linebreaks=True)
        joiner = ""
    if isinstance(ds, datasets.DatasetDict):
        if split not in ds:
            raise ValueError(f"dataset {path!r} has no split {split!r} (splits: {list(ds)})")
        ds = ds[split]
    if text_column not in ds.column_names:
        raise ValueError(f"dataset {path!r} has no column {text_column!r} (columns: {ds.column_names})")
    text = joiner.join(ds[text_column])
    data = np.frombuffer(text.encode("utf-8"), dtype=np.uint8).copy()
    if data.size == 0:
        raise ValueError(f"dataset {path!r} is empty")
    return data


def train_val_split(data: np.ndarray, val_fraction: float = 0.1) -> tuple[np.ndarray, np.ndarray]:
    """nanoGPT split: the first `1 - val_fraction` of the bytes train, the rest validate."""
    if not 0 < val_fraction < 1:
        raise ValueError(f"val_fraction must be in (0, 1), got {val_fraction}")
    n = int((1 - val_fraction) * len(data))
    return data[:n], data[n:]


class PackedBlocks(Dataset):
    """Non-overlapping blocks of `block_size` bytes cut from one long byte stream (the tail that does not fill a
    block is dropped). Each item is `{"input_ids": (block_size,), "labels": (block_size,)}`; the model shifts the
    labels, so a block trains `block_size - 1` next-byte predictions.

    `indices` (optional) keeps a fixed subset of the blocks, e.g. evenly spaced validation blocks.
    """

    def __init__(self, data: np.ndarray, block_size: int, indices: Sequence[int] | None = None):
        if block_size < 2:
            raise ValueError(f"block_size must be >= 2, got {block_size}")
        num_blocks = len(data) // block_size
        if num_blocks == 0:
            raise ValueError(f"the text ({len(data)} bytes) is shorter than one block of {block_size} bytes")
        self.blocks = torch.from_numpy(np.asarray(data[: num_blocks * block_size], dtype=np.int64)).view(
            num_blocks, block_size
        )
        self.indices = list(range(num_blocks)) if indices is None else [int(i) for i in indices]
        self.block_size = block_size

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        block = self.blocks[self.indices[i]]
        return {"input_ids": block, "labels": block}

    @property
    def num_bytes(self) -> int:
        return len(self) * self.block_size

    def subset(self, max_blocks: int | None) -> PackedBlocks:
        """A fixed subset of at most `max_blocks` blocks, evenly spaced over the stream (deterministic)."""
        if max_blocks is None or max_blocks <= 0 or max_blocks >= len(self):
            return self
        picks = np.linspace(0, len(self) - 1, max_blocks).round().astype(int)
        out = PackedBlocks.__new__(PackedBlocks)
        out.blocks, out.block_size = self.blocks, self.block_size
        out.indices = [self.indices[i] for i in picks]
        return out


def collate_blocks(features: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """Stack equal-length blocks into `input_ids` and `labels` of shape `(batch_size, block_size)`."""
    input_ids = torch.stack([f["input_ids"] for f in features])
    labels = torch.stack([f["labels"] for f in features])
    return {"input_ids": input_ids, "labels": labels}


def unigram_baseline(train: np.ndarray, val: np.ndarray, smoothing: float = 1.0) -> dict[str, float]:
    """Cross-entropy (nats/byte) of `val` under the byte-frequency distribution of `train` (add-`smoothing` counts
    over the 256 byte values), and the entropy of that distribution on `train` itself."""
    counts = np.bincount(train, minlength=256).astype(np.float64) + smoothing
    log_p = np.log(counts / counts.sum())
    val_counts = np.bincount(val, minlength=256)
    train_counts = np.bincount(train, minlength=256)
    val_nats = float(-(val_counts * log_p).sum() / max(1, val_counts.sum()))
    train_nats = float(-(train_counts * log_p).sum() / max(1, train_counts.sum()))
    return {
        "val_loss": val_nats,
        "val_bpb": val_nats / math.log(2),
        "train_loss": train_nats,
        "train_bpb": train_nats / math.log(2),
    }


__all__ = [
    "PackedBlocks",
    "collate_blocks",
    "load_dataset_bytes",
    "read_text_bytes",
    "train_val_split",
    "unigram_baseline",
]
