"""scripts/train.py on transformers.Trainer: loss falls, outputs, presets/overrides, exact resume, DDP on CPU."""

from __future__ import annotations

import csv
import json
import os
import shutil
import socket
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "scripts"))

import train as train_lib  # noqa: E402
from conftest import TINY_MODEL  # noqa: E402

from dfn.data import (  # noqa: E402
    PackedBlocks,
    collate_blocks,
    load_dataset_bytes,
    read_text_bytes,
    train_val_split,
    unigram_baseline,  # noqa: E402
)


@pytest.fixture(scope="module")
def texts(tmp_path_factory):
    """A small train text and val text cut from Tiny Shakespeare."""
    folder = tmp_path_factory.mktemp("text")
    data = (REPO / "data" / "tinyshakespeare.txt").read_bytes()
    (folder / "train.txt").write_bytes(data[:40_000])
    (folder / "val.txt").write_bytes(data[-4_000:])
    return folder / "train.txt", folder / "val.txt"


def tiny_config(texts, output_dir, **overrides):
    values = dict(
        train_files=[str(texts[0])],
        val_files=[str(texts[1])],
        block_size=32,
        batch_size=4,
        max_steps=30,
        learning_rate=1e-2,
        warmup_steps=3,
        eval_steps=0,
        eval_blocks=4,
        final_eval_blocks=8,
        logging_steps=1,
        save_steps=0,
        output_dir=str(output_dir),
        plot=True,
        quiet=True,
        report_to="none",
    )
    values.update(overrides)
    return train_lib.make_config("tiny", values, TINY_MODEL)


def run(cfg):
    summary = train_lib.train(cfg, command="pytest")
    return summary, summary.pop("_trainer")


# ---------------------------------------------------------------------------------------------------------------------
# data helpers


def test_split_blocks_and_unigram():
    data = np.arange(1000, dtype=np.int64).astype(np.uint8)
    train, val = train_val_split(data, 0.1)
    assert len(train) == 900 and len(val) == 100 and train[-1] == data[899]
    blocks = PackedBlocks(train, 64)
    assert len(blocks) == 900 // 64
    item = blocks[1]
    assert torch.equal(item["input_ids"], torch.from_numpy(train[64:128].astype(np.int64)))
    assert torch.equal(item["labels"], item["input_ids"])
    sub = blocks.subset(3)
    assert len(sub) == 3 and sub.indices == [0, 6, 13]
    batch = collate_blocks([blocks[0], blocks[1]])
    assert batch["input_ids"].shape == (2, 64)
    # one symbol: the unigram loss is ~0; uniform over 2 symbols: ln 2
    assert unigram_baseline(np.zeros(100, np.uint8), np.zeros(10, np.uint8), smoothing=1e-9)["val_loss"] < 1e-6
    two = np.array([0, 1] * 50, np.uint8)
    assert abs(unigram_baseline(two, two, smoothing=1e-9)["val_loss"] - np.log(2)) < 1e-6


def test_text_and_datasets_inputs_give_the_same_bytes(tmp_path):
    """A text file given as --dataset trains on its raw bytes, Windows line ends included; a glob goes through the
    datasets "text" builder, which keeps the line breaks."""
    text = "First Citizen:\r\nBefore we proceed any further, hear me speak.\r\n\r\nAll: Speak, speak. é✓\n"
    path = tmp_path / "t.txt"
    path.write_bytes(text.encode())
    expected = np.frombuffer(text.encode(), np.uint8)
    assert np.array_equal(read_text_bytes(path), expected)
    assert np.array_equal(load_dataset_bytes(str(path)), expected)
    unix = text.replace("\r\n", "\n")
    (tmp_path / "u.txt").write_bytes(unix.encode())
    assert np.array_equal(load_dataset_bytes(str(tmp_path / "u*.txt")), np.frombuffer(unix.encode(), np.uint8))


# ---------------------------------------------------------------------------------------------------------------------
# config


def test_presets_and_overrides():
    for name in ("demo", "tiny", "small", "base"):
        cfg = train_lib.make_config(name)
        assert cfg.model["hidden_size"] > 0 and cfg.max_steps > 0
    base = train_lib.make_config("base")
    assert (base.model["num_hidden_layers"], base.model["hidden_size"], base.block_size) == (6, 384, 256)
    cfg = train_lib.parse_args(
        [
            "--preset",
            "small",
            "--max_steps",
            "7",
            "--learning_rate",
            "3e-4",
            "--bf16",
            "--model",
            "use_flow=false",
            "--model",
            "num_neighbors=8",
            "--train_files",
            "a.txt",
            "b.txt",
            "--resume",
        ]
    )
    assert cfg.max_steps == 7 and cfg.learning_rate == 3e-4 and cfg.bf16 is True
    assert cfg.model["use_flow"] is False and cfg.model["num_neighbors"] == 8 and cfg.model["hidden_size"] == 128
    assert cfg.train_files == ["a.txt", "b.txt"] and cfg.resume == "last"
    with pytest.raises(ValueError, match="unknown config keys"):
        train_lib.make_config("tiny", {"max_stepz": 3})
    with pytest.raises(FileNotFoundError, match="known presets"):
        train_lib.make_config("nope")


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--overwrite", "no"], None),
        (["--bf16", "off"], None),
        (["--overwrite", "nope"], "--overwrite: expected true or false, got 'nope'"),
        (["--dataset", "d.txt", "--train_files", "a.txt"], "--dataset replaces --train_files"),
    ],
)
def test_command_line_switches_and_sources(argv, message, capsys):
    """A switch reads true/false, yes/no, on/off or 1/0 and refuses any other word (any word used to count as true:
    `--overwrite no` deleted the output folder); --dataset and --train_files do not mix."""
    if message is None:
        assert getattr(train_lib.parse_args(argv), argv[0][2:]) is False
        return
    with pytest.raises(SystemExit):
        train_lib.parse_args(argv)
    assert message in capsys.readouterr().err


@pytest.mark.parametrize(
    "overrides, message",
    [
        ({"overwrite": "no"}, "overwrite must be true or false, got 'no'"),
        ({"dataset": "d.txt", "val_files": ["v.txt"]}, "val_files cannot be used with dataset"),
    ],
)
def test_config_switches_and_sources_are_checked(overrides, message):
    with pytest.raises(ValueError, match=message):
        train_lib.make_config("tiny", overrides)


def test_refuses_non_empty_output_dir(texts, tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    (out / "something.txt").write_text("keep me")
    with pytest.raises(FileExistsError, match="--overwrite"):
        train_lib.train(tiny_config(texts, out, max_steps=1))
    assert (out / "something.txt").exists()


# ---------------------------------------------------------------------------------------------------------------------
# training


def test_trainer_loss_falls_and_writes_a_loadable_checkpoint(texts, tmp_path):
    out = tmp_path / "run"
    summary, trainer = run(tiny_config(texts, out, eval_steps=15))
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    assert np.mean(losses[-5:]) < np.mean(losses[:3]) - 0.5, losses
    assert summary["val_loss"] < summary["unigram_val_loss"] + 0.3  # a 30-step toy; the demo asserts "clearly below"
    assert abs(summary["val_bpb"] - summary["val_loss"] / np.log(2)) < 1e-9

    written = json.loads((out / "training_summary.json").read_text())
    for key in (
        "dataset",
        "train_steps",
        "batch_size",
        "block_size",
        "learning_rate",
        "train_time_s",
        "hardware",
        "val_loss",
        "val_bpb",
        "train_loss",
        "commit",
        "command",
    ):
        assert key in written, key
    assert written["train_steps"] == 30
    assert (out / "loss_curve.png").stat().st_size > 1000
    rows = csv_rows(out / "log.csv")
    assert any(r["eval_loss"] for r in rows) and any(r["loss"] for r in rows)
    resolved = json.loads((out / "train_config.json").read_text())
    assert resolved["model"]["hidden_size"] == 32 and resolved["max_steps"] == 30

    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(out, trust_remote_code=True).eval()
    tok = AutoTokenizer.from_pretrained(out, trust_remote_code=True)
    ids = tok("ROMEO:", return_tensors="pt", add_special_tokens=False).input_ids
    with torch.no_grad():
        expected = trainer.model.eval()(ids, use_cache=False).logits
        assert torch.allclose(model(ids).logits, expected, atol=1e-5)
    assert model.config.use_cache is True  # generation-ready (Trainer turns it off for training)


def test_geometry_parameters_get_their_own_learning_rate_and_no_decay(texts, tmp_path):
    cfg = tiny_config(texts, tmp_path / "run", max_steps=3, final_eval_blocks=1, plot=False, geometry_lr_scale=10.0)
    cfg.model["memory_write"] = "mean"  # its prior mass stays in the base group
    _, trainer = run(cfg)
    names = {id(p): n for n, p in trainer.model.named_parameters()}
    *others, geometry = trainer.optimizer.param_groups
    suffixes = {names[id(p)].split(".")[-1] for p in geometry["params"]}
    assert suffixes == {
        "flow_alpha",
        "log_kernel_width",
        "log_time_scale",
        "memory_log_weight",
        "memory_write_scale",
        "memory_log_width",
        "memory_pos",
    }
    assert geometry["weight_decay"] == 0.0
    assert all(id(p) not in {id(q) for q in geometry["params"]} for g in others for p in g["params"])
    assert sum(len(g["params"]) for g in trainer.optimizer.param_groups) == len(names)
    *other_lrs, geometry_lr = trainer.lr_scheduler.get_last_lr()
    assert geometry_lr == pytest.approx(10.0 * other_lrs[0]) and geometry_lr > 0


def test_time_budget_horizon_follows_the_pace_both_ways(monkeypatch):
    """Slow first steps shorten the cosine horizon; when the pace recovers it grows back (never past max_steps);
    the run stops at the end of the fitted schedule or at the budget."""
    from types import SimpleNamespace

    clock = [0.0]
    monkeypatch.setattr(train_lib.time, "time", lambda: clock[0])
    horizon = train_lib.CosineHorizon(warmup_steps=5, total_steps=100, min_ratio=0.1)
    callback = train_lib.TimeBudgetCallback(budget_s=100.0, horizon=horizon)
    state = SimpleNamespace(global_step=0, max_steps=100, is_world_process_zero=True)
    args = SimpleNamespace(device="cpu")
    callback.on_train_begin(args, state, None)
    horizons = {}
    for step in range(1, 101):
        clock[0] += 3.0 if step <= 20 else 0.4  # a busy machine, then a free one
        state.global_step = step
        control = SimpleNamespace(should_training_stop=False)
        callback.on_step_end(args, state, control)
        horizons[step] = horizon.total_steps
        if control.should_training_stop:
            break
    assert horizons[20] < 50  # fitted to 3 s/step: 100 s hold about 33 steps
    assert horizons[step] > horizons[20] + 20 and max(horizons.values()) <= 100
    assert step == horizons[step] or clock[0] > 100.0
    assert horizon(5) == 1.0 and horizon(horizon.total_steps) == pytest.approx(0.1)


def csv_rows(path) -> list[dict]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def test_resume_is_exact(texts, tmp_path):
    """A run resumed from step k reaches the same loss and weights at step 2k as an uninterrupted run."""
    k = 4
    full = tmp_path / "full"
    _, trainer = run(
        tiny_config(texts, full, max_steps=2 * k, save_steps=k, final_eval_blocks=2, plot=False, geometry_lr_scale=10.0)
    )
    uninterrupted = [h["loss"] for h in trainer.state.log_history if "loss" in h]

    resumed = tmp_path / "resumed"
    resumed.mkdir()
    shutil.copytree(full / f"checkpoint-{k}", resumed / f"checkpoint-{k}")  # as if the first run stopped at step k
    full_log = csv_rows(full / "log.csv")
    with open(resumed / "log.csv", "w", newline="") as f:  # ... after logging step k + 2
        writer = csv.DictWriter(f, fieldnames=list(full_log[0]))
        writer.writeheader()
        writer.writerows(row for row in full_log if int(row["step"]) <= k + 2)
    assert json.loads((resumed / f"checkpoint-{k}" / "train_config.json").read_text())["max_steps"] == 2 * k
    _, trainer2 = run(
        tiny_config(
            texts,
            resumed,
            max_steps=2 * k,
            save_steps=k,
            final_eval_blocks=2,
            plot=False,
            resume="last",
            geometry_lr_scale=10.0,
        )
    )
    after = [h["loss"] for h in trainer2.state.log_history if "loss" in h]
    assert after[-1] == pytest.approx(uninterrupted[-1], abs=1e-6), (after, uninterrupted)
    resumed_log = csv_rows(resumed / "log.csv")  # steps k+1, k+2 logged once, the clock never goes back
    assert [row["step"] for row in resumed_log] == [row["step"] for row in full_log]
    times = [float(row["time_s"]) for row in resumed_log]
    assert times == sorted(times)
    a = load_file(str(full / "model.safetensors"))
    b = load_file(str(resumed / "model.safetensors"))
    assert a.keys() == b.keys()
    assert max((a[n] - b[n]).abs().max().item() for n in a) <= 1e-6


# ---------------------------------------------------------------------------------------------------------------------
# two processes through accelerate (DDP over gloo on CPU)

WORKER = textwrap.dedent(
    """
    import hashlib, json, os, sys
    sys.path.insert(0, {scripts!r})
    import torch
    import train as train_lib

    seen = []
    original = train_lib.collate_blocks

    def recording_collate(features):
        batch = original(features)
        seen.append(hashlib.sha1(batch["input_ids"].numpy().tobytes()).hexdigest())
        return batch

    train_lib.collate_blocks = recording_collate
    cfg = train_lib.make_config("tiny", json.loads({overrides!r}), json.loads({model!r}))
    summary = train_lib.train(cfg, command="ddp test")
    trainer = summary.pop("_trainer")
    model = trainer.accelerator.unwrap_model(trainer.model)
    weights = hashlib.sha1(b"".join(p.detach().cpu().numpy().tobytes() for p in model.parameters())).hexdigest()
    rank = int(os.environ.get("RANK", "0"))
    with open(os.path.join({record!r}, f"rank{{rank}}.json"), "w") as f:
        json.dump({{"world_size": trainer.args.world_size, "batches": seen, "weights": weights,
                   "steps": trainer.state.global_step}}, f)
    """
)


def test_accelerate_two_process_ddp_on_cpu(texts, tmp_path):
    """accelerate_configs/cpu_ddp.yaml: 2 processes, DDP over gloo; ranks read different blocks, end identical."""
    out, record = tmp_path / "out", tmp_path / "record"
    record.mkdir()
    overrides = dict(
        train_files=[str(texts[0])],
        val_files=[str(texts[1])],
        block_size=32,
        batch_size=4,
        max_steps=4,
        warmup_steps=1,
        eval_steps=0,
        final_eval_blocks=2,
        logging_steps=1,
        save_steps=0,
        output_dir=str(out),
        plot=False,
        quiet=True,
        report_to="none",
    )
    script = tmp_path / "worker.py"
    script.write_text(
        WORKER.format(
            scripts=str(REPO / "scripts"),
            overrides=json.dumps(overrides),
            model=json.dumps(TINY_MODEL),
            record=str(record),
        )
    )
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    with socket.socket() as s:  # a free port, so parallel test runs do not collide
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    accelerate = Path(sys.executable).parent / "accelerate"
    proc = subprocess.run(
        [
            str(accelerate),
            "launch",
            "--config_file",
            str(REPO / "accelerate_configs" / "cpu_ddp.yaml"),
            "--main_process_port",
            str(port),
            str(script),
        ],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    ranks = [json.loads((record / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert all(r["world_size"] == 2 and r["steps"] == 4 for r in ranks)
    train0 = ranks[0]["batches"][:4]
    train1 = ranks[1]["batches"][:4]
    assert len(train0) == len(train1) == 4
    assert not set(train0) & set(train1), "both ranks saw the same training data"
    assert ranks[0]["weights"] == ranks[1]["weights"], "ranks ended with different weights"
    assert (out / "model.safetensors").exists()


# ---------------------------------------------------------------------------------------------------------------------
# scripts/compare.py --quick


def test_compare_quick_runs_every_variant(tmp_path):
    import compare

    results = compare.main(["--quick", "--steps", "4", "--output_dir", str(tmp_path / "cmp")])
    runs = {r["run"]: r for r in results}
    assert set(runs) == set(compare.ALL_VARIANTS)
    dfn, llama = runs["dfn"], runs["llama"]
    assert abs(llama["parameters"] - dfn["parameters"]) / dfn["parameters"] < 0.02  # same parameter count
    assert all(np.isfinite(r["val_loss"]) and r["tokens_per_s"] > 0 and r["steps"] == 4 for r in results)
    for name in ("results.md", "results.json", "compare.png"):
        assert (tmp_path / "cmp" / name).stat().st_size > 0
    assert "| llama |" in (tmp_path / "cmp" / "results.md").read_text()
    resolved = json.loads((tmp_path / "cmp" / "no_flow-ctx32" / "train_config.json").read_text())
    assert resolved["model"]["use_flow"] is False
    heads = {
        name: json.loads((tmp_path / "cmp" / f"{name}-ctx32" / "train_config.json").read_text())["model"]
        for name in ("eight_heads", "llama")
    }
    assert heads["eight_heads"]["num_attention_heads"] == 8 and heads["llama"]["num_attention_heads"] == 2


def test_compare_parallel_jobs_and_seeds(tmp_path):
    """--jobs 2 runs each variant in its own process: same losses as one after another. Extra seeds repeat only
    the runs the targets compare, and the summary lines average over seeds."""
    import compare

    common = ["--quick", "--steps", "3", "--threads", "1", "--variants", "dfn", "llama", "no_memory"]
    one = compare.main([*common, "--seeds", "1", "2", "--output_dir", str(tmp_path / "one")])
    two = compare.main([*common, "--seeds", "1", "2", "--jobs", "2", "--output_dir", str(tmp_path / "two")])
    assert [(r["run"], r["seed"]) for r in one] == [
        ("dfn", 1),
        ("llama", 1),
        ("no_memory", 1),
        ("dfn", 2),
        ("llama", 2),
    ]
    assert [(r["run"], r["seed"], r["parameters"]) for r in one] == [
        (r["run"], r["seed"], r["parameters"]) for r in two
    ]
    for a, b in zip(one, two, strict=True):
        assert b["val_loss"] == pytest.approx(a["val_loss"], abs=1e-6), (a["run"], a["val_loss"], b["val_loss"])
    assert one[0]["val_loss"] != one[3]["val_loss"]  # the seed changes the run
    assert (tmp_path / "one" / "dfn-ctx32-seed2" / "log.csv").exists()
    table = (tmp_path / "two" / "results.md").read_text()
    assert "2 run(s) at a time" in table and "at equal wall-clock" in table
    mean_ratio = (one[0]["val_loss"] + one[3]["val_loss"]) / (one[1]["val_loss"] + one[4]["val_loss"])
    assert f"DFN / Llama val loss = {mean_ratio:.3f} on the mean over seeds" in table


# ---------------------------------------------------------------------------------------------------------------------
# make demo (a shortened run; the real one trains for minutes)


@pytest.mark.slow
def test_demo_short_run_saves_a_folder_that_loads_in_a_fresh_process(tmp_path):
    out = tmp_path / "demo"
    proc = subprocess.run(
        [
            sys.executable,
            str(REPO / "scripts" / "demo.py"),
            "--max-steps",
            "8",
            "--sample-bytes",
            "20",
            "--output-dir",
            str(out),
            "--threads",
            "1",
        ],
        env={**os.environ, "HF_HUB_OFFLINE": "1"},
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "unigram" in proc.stdout and "val loss" in proc.stdout
    summary = json.loads((out / "training_summary.json").read_text())
    assert summary["train_steps"] == 8 and summary["val_loss"] < summary["unigram_val_loss"] + 1.0
    assert (out / "loss_curve.png").exists()
    check = (
        "import sys; sys.modules['dfn'] = None\nfrom transformers import AutoModelForCausalLM\n"
        f"m = AutoModelForCausalLM.from_pretrained({str(out)!r}, trust_remote_code=True)\n"
        "assert type(m).__module__.startswith('transformers_modules')\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env.update(HF_HUB_OFFLINE="1", HF_HOME=str(tmp_path / "hf"))
    proc = subprocess.run(
        [sys.executable, "-c", check], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
