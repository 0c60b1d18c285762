"""What every script shares on its command line: count arguments that reject nonsense, the rule before writing
results (nothing a user saved is replaced unless asked), and the doubling ranges results are grouped by."""

from __future__ import annotations

import argparse
from pathlib import Path


def positive_int(text: str) -> int:
    """argparse type: an integer >= 1 (steps, sizes, counts)."""
    return _int_at_least(text, 1)


def non_negative_int(text: str) -> int:
    """argparse type: an integer >= 0 (where 0 means "none" or "all", as each flag's help says)."""
    return _int_at_least(text, 0)


def boolean(text: str) -> bool:
    """argparse type: true/false, yes/no, on/off or 1/0 (any case); any other word is refused, never read as true."""
    lowered = text.strip().lower()
    if lowered in ("true", "yes", "on", "1"):
        return True
    if lowered in ("false", "no", "off", "0"):
        return False
    raise argparse.ArgumentTypeError(f"expected true or false, got {text!r}")


def _int_at_least(text: str, low: int) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
    if value < low:
        raise argparse.ArgumentTypeError(f"must be an integer >= {low}, got {value}")
    return value


def doubling_ranges(n: int) -> list[tuple[int, int]]:
    """The ranges 1, 2-3, 4-7, ... (inclusive `(low, high)` pairs) that cover 1..n, the last one cut at n."""
    ranges, low = [], 1
    while low <= n:
        ranges.append((low, min(2 * low, n + 1) - 1))
        low *= 2
    return ranges


def quick_defaults(args: argparse.Namespace, parser: argparse.ArgumentParser, argv, **values) -> None:
    """`--quick`'s small settings, for the flags the command line `argv` (None: `sys.argv`) did not give: a flag given
    explicitly keeps its value, even one equal to its default (`--quick --steps 300`)."""
    unset = object()  # argparse only fills in defaults for names the namespace lacks
    given = parser.parse_args(argv, namespace=argparse.Namespace(**dict.fromkeys(values, unset)))
    for name, value in values.items():
        if getattr(given, name) is unset:
            setattr(args, name, value)


def refuse_overwrite(paths, overwrite: bool) -> None:
    """Stop with a message if any of `paths` already holds results (a file, or a folder that is not empty), unless
    `overwrite`. Scripts call it before any work, so a refused run costs nothing."""
    taken = [str(p) for p in map(Path, paths) if p.is_file() or (p.is_dir() and any(p.iterdir()))]
    if taken and not overwrite:
        raise SystemExit(
            f"Not overwriting {', '.join(taken)}: pass --overwrite to replace what is there, or write elsewhere"
        )


def check_writable_file(path) -> None:
    """Stop with a message if the file `path` cannot be written: its folder is missing (found before the work)."""
    folder = Path(path).resolve().parent
    if not folder.is_dir():
        raise SystemExit(f"Cannot write {path}: the folder {folder} does not exist")
