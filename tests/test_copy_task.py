"""scripts/copy_task.py: the examples are what the task says, only the copy is scored, and --quick writes its report."""

import json
import math
import subprocess
import sys
from pathlib import Path

import torch
from conftest import load_script

REPO = Path(__file__).resolve().parents[1]


def test_copy_example_repeats_letters_and_scores_only_the_predictable_copy():
    ct = load_script("copy_task")
    ex = ct.copy_example(torch.Generator().manual_seed(0), 10)
    ids, labels = ex["input_ids"], ex["labels"]
    assert ids.shape == labels.shape == (20,)
    assert torch.equal(ids[:10], ids[10:])
    assert bool(((ids >= ord("a")) & (ids <= ord("z"))).all())
    assert bool((labels[:11] == ct.IGNORE).all()) and torch.equal(labels[11:], ids[11:])


def test_varying_string_length_moves_the_copy():
    """With --min-string-length, S varies per example: the copy starts right after the string, whatever its size,
    only its bytes after the first are scored, and every example keeps the same length (no padding)."""
    ct = load_script("copy_task")
    generator = torch.Generator().manual_seed(0)
    sizes = set()
    for _ in range(40):
        ex = ct.copy_example(generator, 10, min_length=4)
        ids, labels = ex["input_ids"], ex["labels"]
        assert ids.shape == (20,)
        scored = (labels != ct.IGNORE).nonzero().flatten()
        size = int(scored[0]) - 1  # the copy starts at S; its first byte is unpredictable
        assert 4 <= size <= 10 and torch.equal(scored, torch.arange(size + 1, 2 * size))
        assert torch.equal(ids[:size], ids[size : 2 * size]) and torch.equal(labels[scored], ids[scored])
        sizes.add(size)
    assert len(sizes) >= 5


def test_quick_run(tmp_path):
    proc = subprocess.run(
        [sys.executable, "scripts/copy_task.py", "--quick", "--no-progress", "--out-dir", str(tmp_path)],
        capture_output=True,
        text=True,
        cwd=REPO,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "torch_threads=" in proc.stdout and "| dfn-query-flow-all |" in proc.stdout
    report = json.loads((tmp_path / "copy_task.json").read_text())["results"]
    assert list(report) == ["llama", "dfn", "dfn-query-flow", "dfn-query-flow-all"]
    assert abs(report["llama"]["params"] - report["dfn"]["params"]) / report["dfn"]["params"] < 0.05
    for name, result in report.items():
        assert math.isfinite(result["copy_loss"]) and 0 <= result["copy_accuracy"] <= 1
        assert len(result["loss_curve"]) == 4
        assert ("copy_accuracy_k4" in result) == name.startswith("dfn")
    # the plain DFN trains with K = 4 already: reading it with K = 4 changes nothing
    assert report["dfn"]["copy_accuracy_k4"] == report["dfn"]["copy_accuracy"]
    assert (tmp_path / "copy_task.png").stat().st_size > 0


def test_sparse_read_takes_effect_and_restores_the_trained_k():
    ct = load_script("copy_task")
    args = ct.parse_args(["--quick"])
    model = ct.build_model("dfn-query-flow-all", args)  # every earlier entity a candidate: K = 2 S = 16
    result = ct.evaluate(model, args)
    assert model.config.num_neighbors == 2 * args.string_length
    assert result["copy_loss_k4"] != result["copy_loss"]  # read with the 4 nearest only: another mix


def test_varied_read_scores_strings_of_other_lengths():
    """--eval-min-string-length scores the trained model on varying S as well (fixed-offset solutions fail there)."""
    ct = load_script("copy_task")
    args = ct.parse_args(["--quick", "--eval-min-string-length", "3"])
    model = ct.build_model("llama", args)
    result = ct.evaluate(model, args)
    assert result["copy_loss_varied"] == ct.score(model, args, 3)["copy_loss"]
    assert result["copy_loss_varied"] != result["copy_loss"]  # other strings at other offsets
    assert ct.score(model, args, None)["copy_loss"] == result["copy_loss"]
