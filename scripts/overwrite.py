"""The rule every script follows before it writes results: nothing a user saved is replaced unless asked."""

from __future__ import annotations

from pathlib import Path


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
