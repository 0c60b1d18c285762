"""The local `evaluate` metric module (dfn/metrics/bits_per_byte) and scripts/evaluate.py."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import load_script

from dfn.metrics import BITS_PER_BYTE_PATH, load_bits_per_byte

REPO = Path(__file__).resolve().parent.parent
LN2, LN3 = math.log(2), math.log(3)

# vocab 3, one sequence of 3 labels. HF convention (shift): logits[t] predicts labels[t + 1].
#   t=0: uniform -> p(label 2) = 1/3 -> ln 3 nats;  t=1: probs (1/4, 1/2, 1/4) -> p(label 1) = 1/2 -> ln 2 nats
KNOWN_LOGITS = [[[0.0, 0.0, 0.0], [0.0, LN2, 0.0], [5.0, -1.0, 2.0]]]
KNOWN_LABELS = [[0, 2, 1]]
KNOWN_NATS = (LN3 + LN2) / 2


def test_loads_offline_in_a_fresh_process_and_matches_a_hand_computation(tmp_path):
    script = tmp_path / "check.py"
    script.write_text(
        textwrap.dedent(
            f"""
            import json, evaluate
            metric = evaluate.load({BITS_PER_BYTE_PATH!r})
            print(json.dumps(metric.compute(predictions={KNOWN_LOGITS!r}, references={KNOWN_LABELS!r})))
            """
        )
    )
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf_home")}
    proc = subprocess.run(
        [sys.executable, str(script)], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    scores = json.loads(proc.stdout.strip().splitlines()[-1])
    assert scores["nats_per_byte"] == pytest.approx(KNOWN_NATS, abs=1e-6)
    assert scores["bits_per_byte"] == pytest.approx(KNOWN_NATS / LN2, abs=1e-6)
    assert scores["perplexity"] == pytest.approx(math.sqrt(6), abs=1e-5)  # exp((ln3 + ln2) / 2)
    assert scores["num_tokens"] == 2


def test_ignore_index_no_shift_and_bytes_per_token():
    metric = load_bits_per_byte()
    # shift=False: logits[t] scores labels[t]; -100 skipped
    out = metric.compute(predictions=[[[0.0, 0.0, 0.0], [0.0, LN2, 0.0]]], references=[[2, -100]], shift=False)
    assert out["nats_per_byte"] == pytest.approx(LN3, abs=1e-6) and out["num_tokens"] == 1
    out = metric.compute(predictions=KNOWN_LOGITS, references=KNOWN_LABELS, bytes_per_token=2.0)
    assert out["nats_per_byte"] == pytest.approx(KNOWN_NATS / 2, abs=1e-6)
    with pytest.raises(ValueError, match="no labels"):
        metric.compute(predictions=[[[0.0, 0.0]]], references=[[-100]], shift=False)


def test_log_probs_form_agrees_with_logits_form():
    rng = np.random.default_rng(0)
    logits = rng.standard_normal((3, 17, 11)).astype(np.float32)
    labels = rng.integers(0, 11, (3, 17))
    labels[1, 5:9] = -100
    full = load_bits_per_byte().compute(predictions=list(logits), references=list(labels))
    t = torch.from_numpy(logits)
    lp = torch.log_softmax(t[:, :-1].double(), -1).gather(-1, torch.from_numpy(labels[:, 1:]).clamp_min(0)[..., None])
    cheap = load_bits_per_byte("log_probs").compute(
        predictions=list(lp[..., 0].numpy()), references=list(labels[:, 1:]), shift=False
    )
    assert cheap["num_tokens"] == full["num_tokens"] == 3 * 16 - 4
    assert cheap["bits_per_byte"] == pytest.approx(full["bits_per_byte"], abs=1e-5)


def saved_model_and_script(tmp_path):
    """A tiny DFN saved to `tmp_path / "ckpt"`, and scripts/evaluate.py loaded as a module."""
    from dfn import DFNConfig, DFNForCausalLM

    torch.manual_seed(0)
    model = DFNForCausalLM(
        DFNConfig(
            hidden_size=32,
            num_hidden_layers=2,
            num_attention_heads=2,
            num_neighbors=8,
            memory_slots=4,
            memory_chunk_size=16,
        )
    ).eval()
    model.save_pretrained(tmp_path / "ckpt")
    return model, load_script("evaluate")


def test_evaluate_script_agrees_with_the_model_loss(tmp_path):
    model, script = saved_model_and_script(tmp_path)
    text = (REPO / "data" / "tinyshakespeare.txt").read_bytes()[: 32 * 6 + 10]  # 6 full blocks + a short tail
    (tmp_path / "t.txt").write_bytes(text)

    scores = script.main(
        [
            str(tmp_path / "ckpt"),
            str(tmp_path / "t.txt"),
            "--block-size",
            "32",
            "--batch-size",
            "4",
            "--json",
            str(tmp_path / "s.json"),
        ]
    )

    ids = torch.tensor(list(text), dtype=torch.long)
    total, count = 0.0, 0
    with torch.no_grad():
        for start in range(0, len(ids), 32):
            block = ids[start : start + 32][None]
            n = block.shape[1] - 1
            total += float(model(input_ids=block, labels=block, use_cache=False).loss) * n
            count += n
    assert scores["num_tokens"] == count == 6 * 31 + 9
    assert scores["nats_per_byte"] == pytest.approx(total / count, abs=1e-5)
    assert json.loads((tmp_path / "s.json").read_text())["bits_per_byte"] == pytest.approx(total / count / LN2)


def test_evaluate_by_context_groups_each_scored_byte_by_its_context(tmp_path):
    """--by-context: the loss of bytes scored after 1, 2-3, 4-7, ... bytes of their block, by hand from the model."""
    model, script = saved_model_and_script(tmp_path)
    text = (REPO / "data" / "tinyshakespeare.txt").read_bytes()[: 32 * 3 + 12]  # 3 full blocks + a short tail
    (tmp_path / "t.txt").write_bytes(text)
    args = [str(tmp_path / "ckpt"), str(tmp_path / "t.txt"), "--block-size", "32", "--batch-size", "2", "--by-context"]
    scores = script.main(args)

    ids = torch.tensor(list(text), dtype=torch.long)
    losses = torch.zeros(31, dtype=torch.float64)
    counts = torch.zeros(31, dtype=torch.long)
    with torch.no_grad():
        for start in range(0, len(ids), 32):
            block = ids[start : start + 32][None]
            log_probs = torch.log_softmax(model(input_ids=block, use_cache=False).logits[0, :-1], -1)
            nll = -log_probs.gather(-1, block[0, 1:, None])[:, 0]
            losses[: len(nll)] += nll.double()
            counts[: len(nll)] += 1
    edges = [(1, 2), (2, 4), (4, 8), (8, 16), (16, 32)]
    assert [bucket["context"] for bucket in scores["by_context"]] == [[low, high - 1] for low, high in edges]
    for bucket, (low, high) in zip(scores["by_context"], edges, strict=True):
        assert bucket["bytes"] == int(counts[low - 1 : high - 1].sum())
        expected = float(losses[low - 1 : high - 1].sum()) / bucket["bytes"]
        assert bucket["nats_per_byte"] == pytest.approx(expected, abs=1e-5)
    assert sum(bucket["bytes"] for bucket in scores["by_context"]) == scores["num_tokens"] == 3 * 31 + 11
    with pytest.raises(SystemExit):
        script.main([*args, "--stream"])


def test_evaluate_stream_scores_the_text_as_one_document(tmp_path):
    """--stream reads the text in segments through the (remote-code) DFNCache: unbounded, it equals one full pass;
    bounded, it stays finite and reports peak memory."""
    model, script = saved_model_and_script(tmp_path)
    text = (REPO / "data" / "tinyshakespeare.txt").read_bytes()[:300]
    (tmp_path / "t.txt").write_bytes(text)
    streamed = script.main([str(tmp_path / "ckpt"), str(tmp_path / "t.txt"), "--stream", "--segment", "70"])
    ids = torch.tensor(list(text), dtype=torch.long)[None]
    with torch.no_grad():
        full = float(model(input_ids=ids, labels=ids, use_cache=False).loss)
    assert streamed["num_tokens"] == len(text) - 1
    assert streamed["nats_per_byte"] == pytest.approx(full, abs=1e-5)
    bounded = script.main(
        [str(tmp_path / "ckpt"), str(tmp_path / "t.txt"), "--stream", "--segment", "50", "--window", "64"]
    )
    assert math.isfinite(bounded["nats_per_byte"]) and bounded["peak_rss_gib"] > 0


def test_evaluate_stream_refuses_a_model_without_dfn_cache(tmp_path):
    from dfn import DFNConfig
    from dfn.baselines import same_size_llama

    same_size_llama(DFNConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2), 64).save_pretrained(
        tmp_path / "llama"
    )
    (tmp_path / "t.txt").write_bytes(b"some text to score")
    with pytest.raises(SystemExit, match="--stream reads through DFN's cache: .* is a llama model"):
        load_script("evaluate").main([str(tmp_path / "llama"), str(tmp_path / "t.txt"), "--stream"])
