"""Local `evaluate` metric modules (loadable offline by path).

`bits_per_byte/`: bits per byte, nats per byte and perplexity of a causal LM from logits (default configuration)
or from the log-probabilities of the labels (configuration "log_probs").
"""

from __future__ import annotations

import os
import sys

BITS_PER_BYTE_PATH = os.path.join(os.path.dirname(os.path.abspath(__file__)), "bits_per_byte")


def import_evaluate():
    """Import the `evaluate` library even when a script folder holding an `evaluate.py` (like scripts/) is first on
    `sys.path`."""
    cached = sys.modules.get("evaluate")
    if cached is not None and hasattr(cached, "load"):
        return cached
    sys.modules.pop("evaluate", None)
    shadowing = [p for p in sys.path if os.path.isfile(os.path.join(p or os.getcwd(), "evaluate.py"))]
    saved = list(sys.path)
    sys.path[:] = [p for p in sys.path if p not in shadowing]
    try:
        import evaluate
    finally:
        sys.path[:] = saved
    return evaluate


def load_bits_per_byte(config_name: str | None = None, **kwargs):
    """`evaluate.load` of the local bits-per-byte module ("log_probs" for the cheap input form)."""
    return import_evaluate().load(BITS_PER_BYTE_PATH, config_name, **kwargs)


__all__ = ["BITS_PER_BYTE_PATH", "import_evaluate", "load_bits_per_byte"]
