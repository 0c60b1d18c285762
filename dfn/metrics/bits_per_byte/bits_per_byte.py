# Copyright 2026 The DFN authors. Apache-2.0.
"""Bits per byte (and nats per byte, perplexity) of a causal language model, from its logits and labels.

A local `evaluate` module: load it by path, offline, e.g.
`evaluate.load("dfn/metrics/bits_per_byte")` (or `dfn.metrics.load_bits_per_byte()`).
"""

import math

import datasets
import evaluate
import numpy as np

_DESCRIPTION = """
Cross-entropy of next-token predictions, reported as bits per byte (bpb), nats per byte and perplexity.
`predictions` are the logits of each example, shape (sequence_length, vocab_size); `references` are the labels,
shape (sequence_length,), -100 = ignored. With `shift=True` (default, the Hugging Face causal-LM convention:
labels = input_ids) logits at position t are scored against the label at t+1; with `shift=False` logits and labels
are already aligned. For a byte-level model one token is one byte; for other tokenizers pass `bytes_per_token`
(total bytes / total scored tokens) to convert per-token loss into per-byte loss.
"""

_KWARGS_DESCRIPTION = """
Args:
    predictions (`list` of float arrays of shape (sequence_length, vocab_size)): logits. With the configuration
        "log_probs" (`evaluate.load(path, "log_probs")`), shape (sequence_length,): the log-probability (natural log)
        the model gave to the next label (position t holds log p(references[t + 1]) when shift=True), a cheap
        form for long texts.
    references (`list` of int arrays of shape (sequence_length,)): labels; -100 is ignored.
    shift (`bool`, defaults to True): score logits[t] against references[t + 1].
    ignore_index (`int`, defaults to -100).
    bytes_per_token (`float`, defaults to 1.0): bytes represented by one scored token.
Returns:
    bits_per_byte, nats_per_byte, perplexity (per token: exp of the mean token loss), num_tokens.
Examples:
    >>> metric = evaluate.load("dfn/metrics/bits_per_byte")
    >>> metric.compute(predictions=[[[0.0, 0.0], [0.0, 0.0]]], references=[[0, 1]])["bits_per_byte"]
    1.0
"""

_CITATION = """
@misc{dfn2026, title={Dynamic Flow Networks}, year={2026}}
"""


def _log_softmax(x: np.ndarray) -> np.ndarray:
    x = x.astype(np.float64)
    x = x - x.max(axis=-1, keepdims=True)
    return x - np.log(np.exp(x).sum(axis=-1, keepdims=True))


@evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _KWARGS_DESCRIPTION)
class BitsPerByte(evaluate.Metric):
    def _info(self):
        return evaluate.MetricInfo(
            module_type="metric",
            description=_DESCRIPTION,
            citation=_CITATION,
            inputs_description=_KWARGS_DESCRIPTION,
            features=datasets.Features(
                {
                    "predictions": datasets.Sequence(datasets.Sequence(datasets.Value("float32")))
                    if self.config_name != "log_probs"
                    else datasets.Sequence(datasets.Value("float32")),
                    "references": datasets.Sequence(datasets.Value("int64")),
                }
            ),
        )

    def _compute(self, predictions, references, shift=True, ignore_index=-100, bytes_per_token=1.0):
        if self.config_name == "log_probs":
            return self._from_log_probs(predictions, references, shift, ignore_index, bytes_per_token)
        total_nats, total_tokens = 0.0, 0
        for logits, labels in zip(predictions, references, strict=True):
            logits = np.asarray(logits, dtype=np.float32)
            labels = np.asarray(labels, dtype=np.int64)
            if logits.ndim != 2 or labels.ndim != 1 or logits.shape[0] != labels.shape[0]:
                raise ValueError(
                    f"each prediction must be (sequence_length, vocab_size) logits and each reference "
                    f"(sequence_length,) labels; got {logits.shape} and {labels.shape}"
                )
            if shift:
                logits, labels = logits[:-1], labels[1:]
            keep = labels != ignore_index
            if not keep.any():
                continue
            logits, labels = logits[keep], labels[keep]
            if labels.min() < 0 or labels.max() >= logits.shape[-1]:
                raise ValueError(f"labels must be in [0, {logits.shape[-1]}) or {ignore_index}")
            log_probs = _log_softmax(logits)
            total_nats -= float(log_probs[np.arange(len(labels)), labels].sum())
            total_tokens += int(len(labels))
        return self._result(total_nats, total_tokens, bytes_per_token)

    def _from_log_probs(self, predictions, references, shift, ignore_index, bytes_per_token):
        total_nats, total_tokens = 0.0, 0
        for log_probs, labels in zip(predictions, references, strict=True):
            log_probs = np.asarray(log_probs, dtype=np.float64)
            labels = np.asarray(labels, dtype=np.int64)
            if log_probs.shape != labels.shape:
                raise ValueError(
                    f"log_probs and labels must have the same shape, got {log_probs.shape} and {labels.shape}"
                )
            if shift:
                log_probs, labels = log_probs[:-1], labels[1:]
            keep = labels != ignore_index
            total_nats -= float(log_probs[keep].sum())
            total_tokens += int(keep.sum())
        return self._result(total_nats, total_tokens, bytes_per_token)

    @staticmethod
    def _result(total_nats, total_tokens, bytes_per_token):
        if total_tokens == 0:
            raise ValueError("no labels to score (all ignored or empty)")
        nats_per_token = total_nats / total_tokens
        nats_per_byte = nats_per_token / bytes_per_token
        return {
            "bits_per_byte": nats_per_byte / math.log(2),
            "nats_per_byte": nats_per_byte,
            "perplexity": math.exp(min(nats_per_token, 700.0)),
            "num_tokens": total_tokens,
        }
