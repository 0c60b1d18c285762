"""scripts/long_context.py: the task generators are exact, scoring is aligned with greedy decoding, and the --quick
run writes its JSON report and heat maps."""

import json
import re
import subprocess
import sys
from argparse import Namespace
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import load_script

REPO = Path(__file__).resolve().parents[1]


lc = load_script("long_context")


@pytest.fixture(scope="module")
def fillers():
    return lc.Filler.split(lc.DATA)


def text_of(ids) -> str:
    return bytes(np.asarray(ids, dtype=np.uint8)).decode()


@pytest.mark.parametrize("length", [lc.passkey_min_length(), 300, 1024, 5000])
@pytest.mark.parametrize("depth", [0.0, 0.3, 0.5, 1.0])
def test_passkey_exact(fillers, length, depth):
    _, filler = fillers
    ex = lc.make_passkey(np.random.default_rng([length, int(depth * 10)]), filler, length, depth)
    ids = ex["input_ids"]
    assert ids.shape == (length,) and ids.dtype == np.int64 and ids.max() < 256
    text = text_of(ids)
    key = ex["key"]
    assert re.fullmatch(r"\d{5}", key)
    prompt = text[: -lc.KEY_DIGITS]
    assert prompt.count(key) == 1 and len(re.findall(r"\d", prompt)) == lc.KEY_DIGITS  # no other digit anywhere
    # the answer is parseable from the needle and is what the last 5 bytes (the scored positions) hold
    assert re.search(r"The pass key is (\d{5})\. Remember it\.", prompt).group(1) == key
    assert prompt.endswith(lc.QUESTION) and text[-5:] == key
    assert list(ex["answers"][0]) == list(range(length - 5, length))
    # the needle sits at the requested depth of the filler
    needle = lc.NEEDLE.format(key=key)
    n_fill = length - len(needle) - len(lc.QUESTION) - lc.KEY_DIGITS
    assert text.index(needle) == ex["needle_start"] == round(depth * n_fill)
    assert abs(ex["depths"][0] - depth) <= 1 / max(n_fill, 1)
    if depth == 1.0:
        assert text[ex["needle_end"] :].startswith(lc.QUESTION)


def test_passkey_too_short(fillers):
    with pytest.raises(ValueError, match="passkey needs length"):
        lc.make_passkey(np.random.default_rng(0), fillers[1], lc.passkey_min_length() - 1, 0.5)


@pytest.mark.parametrize("length,pairs,queries", [(61, 4, 2), (256, 4, 4), (2048, 8, 4), (9000, 16, 5)])
def test_mqar_exact(fillers, length, pairs, queries):
    ex = lc.make_mqar(np.random.default_rng(length), fillers[1], length, pairs, queries)
    ids = ex["input_ids"]
    assert ids.shape == (length,)
    text = text_of(ids)
    body, suffix = text.rsplit("\n", 1)
    found = re.findall(r"\[([a-z]{4})=(\d{3})\]", body)
    assert len(found) == pairs and len({k for k, _ in found}) == pairs  # distinct keys, each stored once
    table = dict(found)
    asked = re.findall(r"\[([a-z]{4})=(\d{3})\]", suffix)
    assert len(asked) == queries and "".join(f"[{k}={v}]" for k, v in asked) == suffix
    assert [k for k, _ in asked] == ex["keys"] and [table[k] for k in ex["keys"]] == ex["values"]
    assert len(ex["answers"]) == queries and len(ex["depths"]) == queries
    for positions, value, depth in zip(ex["answers"], ex["values"], ex["depths"], strict=True):
        assert text_of(ids[positions]) == value  # the scored positions hold the queried value
        assert 0 <= depth <= 1
    assert len(re.findall(r"\d", body)) == 3 * pairs  # the filler has no digits


def test_mqar_too_short(fillers):
    with pytest.raises(ValueError, match="mqar needs length"):
        lc.make_mqar(np.random.default_rng(0), fillers[1], lc.mqar_min_length(4, 2) - 1, 4, 2)


def test_stream_deterministic_batches_share_length(fillers):
    args = Namespace(loss="answer", num_pairs=4, num_queries=2, copy_fraction=0.0, tasks=list(lc.TASKS))
    stream = lc.TaskStream(fillers[0], [128, 256], batch_size=3, args=args, seed=5)
    items = [stream.example(i) for i in range(12)]
    again = lc.TaskStream(fillers[0], [128, 256], batch_size=3, args=args, seed=5)
    assert all(torch.equal(a["input_ids"], again.example(i)["input_ids"]) for i, a in enumerate(items))
    for b in range(0, 12, 3):
        assert len({len(x["input_ids"]) for x in items[b : b + 3]}) == 1
    assert {len(x["input_ids"]) for x in items} == {128, 256}
    for x in items:
        scored = x["labels"] != lc.IGNORE
        assert scored.sum() in (5, 6)  # passkey: 5 digits; mqar: 2 queries x 3 digits
        assert torch.equal(x["labels"][scored], x["input_ids"][scored])
        assert bool(((x["input_ids"][scored] >= ord("0")) & (x["input_ids"][scored] <= ord("9"))).all())


@pytest.mark.parametrize("length", [96, 256])
def test_copy_warmup_exact(fillers, length):
    """The copy warm-up example holds one random string twice; its labels are the second copy after its first byte."""
    for seed in range(20):
        ex = lc.make_copy(np.random.default_rng(seed), fillers[0], length)
        ids, (answer,) = ex["input_ids"], ex["answers"]
        assert len(ids) == length
        size = len(answer) + 1
        second = ids[answer[0] - 1 : answer[-1] + 1]
        assert 8 <= size <= length // 2 - 2 and bool(np.isin(second, lc.ALNUM).all())
        before = bytes(ids[: answer[0] - 1])
        assert before.count(bytes(second)) == 1  # the first copy, earlier (filler holds no digits)


def test_stream_mixes_in_copy_examples(fillers):
    args = Namespace(loss="answer", num_pairs=4, num_queries=2, copy_fraction=0.5, tasks=list(lc.TASKS))
    stream = lc.TaskStream(fillers[0], [128], batch_size=4, args=args, seed=1)
    scored = [int((stream.example(i)["labels"] != lc.IGNORE).sum()) for i in range(40)]
    copies = [n for n in scored if n not in (5, 6)]  # passkey 5 and mqar 6 scored bytes; copy 7-61
    assert 8 < len(copies) < 32 and all(7 <= n <= 61 for n in copies)


@pytest.mark.parametrize("kind", ["dfn", "llama"])
def test_teacher_forced_score_matches_greedy(kind, fillers):
    """Streaming in segments, the argmax scored at each answer position is the greedy continuation."""
    args = Namespace(
        hidden_size=32, layers=2, heads=2, pos_dim=2, num_neighbors=4, memory_slots=3, memory_chunk_size=8,
        model=[], seed=0, lengths=[256], train_length=256, segment=37, window=0,
    )  # fmt: skip
    model = lc.build_model(kind, args).eval()
    torch.manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.3 * torch.randn_like(p))
    ex = lc.make_passkey(np.random.default_rng(1), fillers[1], 150, 0.5)
    prompt = torch.from_numpy(ex["input_ids"][:-5]).unsqueeze(0)
    with torch.no_grad():
        greedy = model.generate(prompt, max_new_tokens=5, do_sample=False, min_new_tokens=5, pad_token_id=256)
    seq = greedy
    scores = lc.score_batch(model, seq, [[np.arange(145, 150)]], args)
    assert scores[0][0].all(), scores
    # and a different continuation is scored wrong at its first differing position
    other = seq.clone()
    other[0, 145] = (other[0, 145] + 1) % 259
    assert not lc.score_batch(model, other, [[np.arange(145, 150)]], args)[0][0][0]


def test_gradient_reach_sees_only_paths_that_exist(fillers):
    """The answer's gradient reaches the key only through a path: none in a DFN without memory whose K nearest and
    two layers stay within the question (exactly 0); some through the field memory, and through Llama's attention,
    which reads every byte."""
    args = Namespace(
        hidden_size=32, layers=2, heads=2, pos_dim=2, num_neighbors=4, memory_slots=3, memory_chunk_size=16,
        model=[], seed=0, lengths=[256], train_length=256,
    )  # fmt: skip
    reach = {}
    for kind in ("dfn", "dfn-nomem", "llama"):
        model = lc.build_model(kind, args)
        reach[kind] = lc.gradient_reach(model, fillers[1], 200, seed=0, count=2)
        assert model.training and all(p.grad is None for p in model.parameters())  # left as it was
    assert reach["dfn-nomem"]["key"] == 0 and reach["dfn-nomem"]["filler"] == 0
    by_distance = reach["dfn-nomem"]["by_distance"]  # two layers of K = 4 neighbours read at most 8 bytes back
    assert by_distance["1-1"] > 0 and by_distance["4-7"] > 0 and by_distance["16-31"] == by_distance["64-127"] == 0
    assert all(value > 0 for value in reach["llama"]["by_distance"].values())
    assert all(r["local"] > 0 for r in reach.values())
    assert reach["dfn"]["key"] > 0 and reach["llama"]["key"] > 0
    assert reach["llama"]["key_over_local"] > 100 * reach["dfn"]["key_over_local"]


def test_needle_swap_changes_every_key_digit(fillers, monkeypatch):
    """The swap check scores against the original key with every digit of the needle's key changed: a reader that
    copies the needle gets every digit right, then none; one that ignores the needle keeps its score."""

    def copies_the_needle(model, ids, answers, args):
        rows = []
        for b, row in enumerate(answers):
            text = bytes(ids[b].tolist()[: row[0][0]])
            key = text.index(b"pass key is ") + len("pass key is ")
            rows.append([(ids[b, key : key + lc.KEY_DIGITS] == ids[b, ans]).numpy() for ans in row])
        return rows

    def ignores_it(model, ids, answers, args):
        return [[np.ones(len(ans), bool) for ans in row] for row in answers]

    args = Namespace(depths=[0.0, 0.5, 1.0], eval_examples=3, eval_batch=2, seed=0, tasks=["passkey"])
    monkeypatch.setattr(lc, "score_batch", copies_the_needle)
    swap = lc.needle_swap(None, args, fillers[1], 300)
    assert swap["by_depth"] == {str(d): {"digit": 1.0, "digit_needle_swapped": 0.0} for d in args.depths}
    monkeypatch.setattr(lc, "score_batch", ignores_it)
    assert lc.needle_swap(None, args, fillers[1], 300)["by_depth"]["0.5"] == {"digit": 1.0, "digit_needle_swapped": 1.0}
    # an accuracy `evaluate` measured is taken as it is, not scored again; a skipped cell is scored
    measured = {"0.0": {"digit_acc": 0.25}, "0.5": {"skipped": "over the cap"}}
    by_depth = lc.needle_swap(None, args, fillers[1], 300, measured)["by_depth"]
    assert by_depth["0.0"]["digit"] == 0.25 and by_depth["0.5"]["digit"] == 1.0


def test_bounded_gradient_reach_goes_through_the_memory(fillers):
    """Read as `--train-window` trains, a key beyond the cache's reach gets gradient only through the field memory:
    exactly none without it, and more when the slots start with more kernel mass (`memory_init_log_mass`)."""
    args = Namespace(
        hidden_size=32, layers=2, heads=2, pos_dim=2, num_neighbors=4, memory_slots=3, memory_chunk_size=16,
        seed=0, lengths=[256], train_length=256,
    )  # fmt: skip
    bounded = {"window": 16, "segment": 16}  # the key, > 32 bytes before the question, is in no call's cache
    reach = {}
    for kind, mass in (("dfn-nomem", -5), ("dfn", -5), ("dfn", 0)):
        model = lc.build_model(kind, Namespace(**vars(args), model=[f"memory_init_log_mass={mass}"]))
        reach[kind, mass] = lc.gradient_reach(model, fillers[1], 200, seed=0, count=2, depth=0.0, bounded=bounded)
    assert reach["dfn-nomem", -5]["key"] == 0 and reach["dfn-nomem", -5]["local"] > 0
    assert 0 < reach["dfn", -5]["key_over_local"] < reach["dfn", 0]["key_over_local"] / 10


@pytest.mark.parametrize("write", ["gated", "mean"])
@pytest.mark.parametrize("depth", [0.0, 1.0])
def test_diagnose_any_depth(fillers, depth, write):
    """The diagnosis holds at every depth and for either memory write: a needle in the query's own chunk (depth 1)
    is not yet in the memory, so the write-side fields (gate, retention) are left out instead of failing."""
    args = Namespace(
        hidden_size=32, layers=2, heads=2, pos_dim=2, num_neighbors=4, memory_slots=3,
        memory_chunk_size=128 if depth else 32, model=[f"memory_write={write}"], seed=0, lengths=[256],
        train_length=256,
    )  # fmt: skip
    diag = lc.diagnose(lc.build_model("dfn", args).eval(), args, fillers[1], 200, depth=depth)
    for row in diag["per_layer"]:
        assert 0 <= np.mean(row["needle_total"]) <= 1 and 0 <= np.mean(row["mem_frac"]) <= 1
        assert ("retention" in row) == (depth == 0.0)
        if depth == 0.0:  # the key's chunk and at least one filler chunk were written before the question
            assert row["chunks_between"] >= 1
            assert all(0 < g <= 1 for g in row["key_gate"]) and all(0 < r < 1 for r in row["retention"])


def test_bounded_stream_training_loss():
    """`--train-window` trains as a bounded cache reads: with a window longer than the sequence the loss is the full
    pass's; with a short one, a byte beyond the cache's reach gets gradient only through the field memory."""
    from dfn import DFNConfig, DFNForCausalLM

    torch.manual_seed(0)
    ids = torch.randint(0, 256, (2, 64))
    labels = torch.full_like(ids, lc.IGNORE)
    labels[:, -4:] = ids[:, -4:]
    grads = {}
    for use_memory in (True, False):
        config = DFNConfig(
            hidden_size=32, num_hidden_layers=2, num_attention_heads=2, pos_dim=2, num_neighbors=4, memory_slots=3,
            memory_chunk_size=8, use_memory=use_memory,
        )  # fmt: skip
        model = DFNForCausalLM(config)
        full = model(input_ids=ids, labels=labels).loss
        wide = lc.BoundedStreamTrainer.compute_loss(
            Namespace(window=1000, segment=16), model, {"input_ids": ids, "labels": labels}
        )
        assert torch.allclose(wide, full, atol=1e-5)
        embedded = []
        hook = model.get_input_embeddings().register_forward_hook(lambda m, a, out, seen=embedded: seen.append(out))
        narrow = lc.BoundedStreamTrainer.compute_loss(
            Namespace(window=8, segment=8), model, {"input_ids": ids, "labels": labels}
        )
        hook.remove()
        grads[use_memory] = torch.autograd.grad(narrow, embedded[0])[0]  # the first call's 8 bytes, 56+ bytes back
    assert grads[False].abs().max() == 0 and grads[True].abs().max() > 0


def test_tasks_flag_names_known_tasks():
    assert lc.parse_args(["--tasks", "passkey"]).tasks == ["passkey"]
    with pytest.raises(SystemExit):
        lc.parse_args(["--tasks", "passkey,sorting"])


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--models", ","], "--models must name some of"),
        (["--tasks", "mqar", "--num-pairs", "2", "--num-queries", "4"], "--num-queries (4) must be <= --num-pairs (2)"),
        (["--diagnose-length", "40"], "--diagnose-length must be 0 or >= 81"),
    ],
)
def test_nonsense_flags_are_refused_before_the_work(argv, message, capsys):
    with pytest.raises(SystemExit):
        lc.parse_args(argv)
    assert message in capsys.readouterr().err


def test_diagnose_only_never_trains_a_missing_model(tmp_path, monkeypatch):
    monkeypatch.setattr(lc, "train_model", lambda *a, **k: pytest.fail("--diagnose-only trained a model"))
    with pytest.raises(SystemExit, match=r"--diagnose-only: no saved model \['dfn'\]"):
        lc.main(["--quick", "--diagnose-only", "--models", "dfn", "--out-dir", str(tmp_path)])


def test_training_lengths_stay_within_train_length():
    args = lc.parse_args(["--tasks", "passkey", "--train-length", "100", "--lengths", "100"])
    assert lc.train_lengths(args) == [100]


def test_quick_run(tmp_path):
    proc = subprocess.run(
        [sys.executable, "scripts/long_context.py", "--quick", "--no-progress", "--out-dir", str(tmp_path)],
        capture_output=True,
        text=True,
        cwd=REPO,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = proc.stdout
    assert "torch_threads=" in out and "transformers=" in out and "Accuracy: exact match" in out
    assert "Gradient reach" in out
    assert "it/s]" not in proc.stderr and "s/it]" not in proc.stderr  # --no-progress: no bars, training's included
    report = json.loads((tmp_path / "long_context.json").read_text())
    assert set(report["models"]) == {"dfn", "dfn-nomem", "dfn-noflow", "llama"}
    params = {name: res["params"] for name, res in report["models"].items()}
    assert abs(params["llama"] - params["dfn"]) / params["dfn"] < 0.05  # same-size baseline
    for res in report["models"].values():
        assert res["train"]["steps"] == 24 and len(res["train"]["loss_curve"]) > 0
        for reach in (res["train"]["gradient_reach_at_init"], res["gradient_reach"]):
            assert reach["local"] > 0 and reach["key"] >= 0 and reach["key_over_local"] == reach["key"] / reach["local"]
        for task in ("passkey", "mqar"):
            assert set(res["eval"][task]) == {"256", "512"}
            for cells in res["eval"][task].values():
                assert set(cells) == {"0.0", "0.5", "1.0", "all"}
                cell = cells["all"]
                assert "skipped" in cell or (0 <= cell["acc"] <= 1 and 0 <= cell["digit_acc"] <= 1 and cell["n"] > 0)
        assert res["eval"]["passkey"]["256"]["all"]["n"] == 6  # 3 depths x 2 examples
        assert res["eval"]["mqar"]["256"]["all"]["n"] == 12  # 3 runs x 2 examples x 2 queries
    for name, swap in report["needle_swap"].items():  # every model, at the diagnosis length
        assert swap["length"] == 512 and set(swap["by_depth"]) == {"0.0", "0.5", "1.0"}
        assert all(0 <= v <= 1 for cell in swap["by_depth"].values() for v in cell.values())
        cells = report["models"][name]["eval"]["passkey"]["512"]  # the unswapped accuracy is the evaluation's
        assert all(swap["by_depth"][d]["digit"] == cells[d]["digit_acc"] for d in swap["by_depth"])
    assert set(report["needle_swap"]) == set(report["models"])
    diag = report["diagnosis"]["dfn"]
    assert diag["length"] == 512 and len(diag["per_layer"]) == 2
    expected = {"needle_knn", "mem_frac", "needle_mem", "needle_total", "key_gate", "retention"}
    assert expected <= set(diag["per_layer"][0])
    for name in report["models"]:
        png = tmp_path / f"heatmap_{name}.png"
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 5_000


def test_quick_run_dense_training_sparse_reading(tmp_path):
    """--train-neighbors trains DFN models with more candidates than they are read and saved with; --model overrides
    reach every DFN model except where the ablation forbids them (no query flow without the flow)."""
    proc = subprocess.run(
        [
            sys.executable, "scripts/long_context.py", "--quick", "--no-progress", "--out-dir", str(tmp_path),
            "--models", "dfn,dfn-noflow", "--copy-fraction", "0.5", "--train-neighbors", "64",
            "--model", "use_query_flow=true", "--lengths", "256", "--tasks", "passkey",
        ],
        capture_output=True, text=True, cwd=REPO, timeout=300,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads((tmp_path / "long_context.json").read_text())
    for name, query_flow in (("dfn", True), ("dfn-noflow", False)):
        assert report["models"][name]["train"]["train_neighbors"] == 64
        config = json.loads((tmp_path / "models" / name / "config.json").read_text())
        assert config["num_neighbors"] == 8 and config["use_query_flow"] is query_flow
    assert all(set(res["eval"]) == {"passkey"} for res in report["models"].values())  # --tasks
    per_layer = report["diagnosis"]["dfn"]["per_layer"]
    assert len(per_layer) == 2 and all(0 <= np.mean(row["needle_knn"]) <= 1 for row in per_layer)
    # a rerun of the saved models at other lengths (--quick's) writes beside the first run's report, replacing nothing
    first = (tmp_path / "long_context.json").read_text()
    proc = subprocess.run(
        [
            sys.executable, "scripts/long_context.py", "--quick", "--no-progress", "--out-dir", str(tmp_path),
            "--models", "dfn", "--reuse", "--no-diagnose",
        ],
        capture_output=True, text=True, cwd=REPO, timeout=300,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert (tmp_path / "long_context.json").read_text() == first
    rerun = json.loads((tmp_path / "long_context_reuse_256-512.json").read_text())
    assert set(rerun["models"]["dfn"]["eval"]["passkey"]) == {"256", "512"}
    assert (tmp_path / "heatmap_dfn_reuse_256-512.png").is_file()
    # --init-from: the curriculum run starts from the saved weights (its gradient reach before training, read through
    # its bounded cache, is the saved model's) and records where it started
    then = tmp_path / "longer"
    proc = subprocess.run(
        [
            sys.executable, "scripts/long_context.py", "--quick", "--no-progress", "--out-dir", str(then),
            "--models", "dfn", "--init-from", str(tmp_path), "--steps", "2", "--lengths", "256", "--no-diagnose",
            "--tasks", "passkey", "--train-window", "64", "--train-segment", "32",
        ],
        capture_output=True, text=True, cwd=REPO, timeout=300,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    train = json.loads((then / "models" / "dfn" / "train.json").read_text())
    assert train["steps"] == 2 and train["init_from"]["folder"] == str(tmp_path / "models" / "dfn")
    assert train["init_from"]["train"]["train_neighbors"] == 64 and train["init_from"]["train"]["bounded"] is None
    assert train["bounded"] == {"window": 64, "segment": 32}
    saved = lc.load_model("dfn", tmp_path / "models" / "dfn")
    saved.config.num_neighbors = train["train_neighbors"]
    bounded = {"window": 64, "segment": 32}
    expected = lc.gradient_reach(saved, lc.Filler.split()[1], 256, seed=0, bounded=bounded)
    before = train["gradient_reach_at_init"]
    assert before["bounded"] == bounded and report["models"]["dfn"]["gradient_reach"]["bounded"] is None
    assert before["key"] == pytest.approx(expected["key"], rel=1e-5) and before["key"] > 0
    assert before["local"] == pytest.approx(expected["local"], rel=1e-5)
    proc = subprocess.run(
        [sys.executable, "scripts/long_context.py", "--quick", "--models", "dfn", "--init-from", str(then / "none"),
         "--out-dir", str(tmp_path / "never")],
        capture_output=True, text=True, cwd=REPO, timeout=300,
    )  # fmt: skip
    assert proc.returncode != 0 and "--init-from: no saved model 'dfn'" in proc.stderr
