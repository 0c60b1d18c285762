"""Long-context evaluation: passkey retrieval and multi-query associative recall (MQAR), trained short, tested long.

Tasks (bytes, filler = real text from data/tinyshakespeare.txt with its few digits removed):

* passkey: `<filler> The pass key is 12345. Remember it. <filler> What is the pass key? The pass key is 12345`.
  The needle starts at `round(depth * F)` bytes into the F filler bytes (depth 0 = first byte, 1 = right before the
  question), so the key occurs exactly once before the answer. The sequence ends with the 5 answer digits.
* mqar: k pairs `[abcd=123]` (4 lowercase letters, 3 digits, distinct keys) at uniformly random places in the
  filler, then `\\n` and q of them queried in random order in the same format: `[abcd=123][efgh=456]...`. Each pair's
  depth is its start over the filler length; accuracy is reported per depth bin (nearest of `--depths`).

Scoring: teacher forcing. The whole sequence, answers included, is read once; an answer counts as correct when the
argmax at every one of its digit positions equals the digit. This is exactly greedy decoding's exact match (greedy
produces the key iff each argmax given the correct prefix is correct); per-digit accuracy is reported as well
(chance 0.1; exact-match chance 1e-5 for passkey, 1e-3 for an MQAR value).

Training: `transformers.Trainer` on an on-the-fly `IterableDataset` (fixed seed; passkey and MQAR mixed 50/50; each
batch has one length drawn from `--train-length` / 4, / 2, x 1, so no padding is needed). Loss on the answer bytes
only by default (`--loss answer`: filler bytes carry no task signal and swamp it at this scale); `--loss all` trains
on every byte. Filler comes from the first 90 % of the text for training and the last 10 % for evaluation.
`--copy-fraction f` mixes in a warm-up task (a random string twice in filler, the second copy scored: the retrieval
that passkey and MQAR need, with more scored bytes per example). `--train-neighbors K` trains DFN models with K
neighbour candidates (the longest training length: every earlier entity) and reads them with `--num-neighbors`.

Evaluation reads every sequence in segments of `--segment` bytes: DFN through a `DFNCache` (exact, or bounded to the
last `--window` entities plus the field memory), Llama through its KV cache. A bounded cache evicts after each call,
so a query sees between W and W + S bytes back (W = `--window`, S = `--segment`): to test what only the memory
carries, put the key further back than that (e.g. `--segment 256`). Every (model, task, length) cell is
timed; a cell whose predicted time (from the previous length: x ratio for DFN in bounded mode, x ratio^2 otherwise)
exceeds `--eval-time-cap` is skipped and marked. All models see the same evaluation examples.

Models: `dfn`, `dfn-nomem` (use_memory=False), `dfn-noflow` (use_flow=False) and `llama` (LlamaForCausalLM, sdpa,
vocab 259, MLP width chosen for the DFN's parameter count), all trained the same way; `--model KEY=VALUE` changes the
config of every DFN model (e.g. `use_query_flow=true`; the flow-off ablation keeps no query flow, which needs the
flow). For memory models a diagnosis traces, at the query position, how much kernel mass reaches the needle directly
(K nearest to where the query looks from) and through the memory (an exact tracer run of the memory write/read).
For every model, before and after training, the gradient reach: how strongly the first answer digit's log-probability
depends on the key's bytes, against the bytes just before the answer (`gradient_reach`): what training has to start
from. `--tasks passkey` trains and scores one task only.

    python scripts/long_context.py --quick                       # < 1 min; the test suite runs it
    nice -n 10 python scripts/long_context.py --steps 300 --lengths 1024,4096 --models dfn,llama
    python scripts/long_context.py --lengths 1024,4096,16384,65536 --window 4096

Writes `<out-dir>/long_context.json` (also after each model), `<out-dir>/heatmap_<model>.png`, the trained models
(`<out-dir>/models/<name>`, reused by `--reuse`, whose report and heat maps are named by their lengths:
`long_context_reuse_1024-4096.json`, or trained further by a later run's `--init-from <out-dir>`: a length
curriculum) and prints the tables. Runs on one torch
thread by default (`--threads`): on a shared 2-core machine that is several times faster than two.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import sys
import time
from pathlib import Path

import numpy as np
import torch
import transformers
from torch.utils.data import IterableDataset

sys.path.insert(0, str(Path(__file__).resolve().parent))

import train as train_lib  # noqa: E402  (scripts/train.py)
from cli import doubling_ranges, non_negative_int, positive_int, quick_defaults, refuse_overwrite  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
DATA = REPO / "data" / "tinyshakespeare.txt"
PAD_ID = 256
IGNORE = -100
MODELS = ("dfn", "dfn-nomem", "dfn-noflow", "llama")
TASKS = ("passkey", "mqar")

NEEDLE = " The pass key is {key}. Remember it. "
QUESTION = " What is the pass key? The pass key is "
KEY_DIGITS = 5
MQAR_KEY_LETTERS = 4
MQAR_VALUE_DIGITS = 3
LETTERS = np.frombuffer(b"abcdefghijklmnopqrstuvwxyz", dtype=np.uint8)
ALNUM = np.frombuffer(b"abcdefghijklmnopqrstuvwxyz0123456789", dtype=np.uint8)


# ----------------------------------------------------------------------------------------------------------------------
# Tasks


class Filler:
    """Real text as bytes (digits and square brackets removed, so keys, values and pairs are unambiguous)."""

    def __init__(self, data: np.ndarray):
        keep = ~(((data >= ord("0")) & (data <= ord("9"))) | (data == ord("[")) | (data == ord("]")))
        self.data = data[keep]
        if self.data.size < 1024:
            raise ValueError(f"filler text too short ({self.data.size} bytes)")

    @classmethod
    def split(cls, path: Path = DATA, val_fraction: float = 0.1) -> tuple[Filler, Filler]:
        data = np.frombuffer(Path(path).read_bytes(), dtype=np.uint8)
        cut = int(len(data) * (1 - val_fraction))
        return cls(data[:cut]), cls(data[cut:])

    def sample(self, rng: np.random.Generator, n: int) -> np.ndarray:
        """`n` contiguous bytes from a random offset (the text is tiled when `n` exceeds it)."""
        start = int(rng.integers(0, self.data.size))
        if start + n <= self.data.size:
            return self.data[start : start + n]
        return np.tile(self.data, n // self.data.size + 2)[start : start + n]


def _b(text: str) -> np.ndarray:
    return np.frombuffer(text.encode(), dtype=np.uint8)


def _digits(rng: np.random.Generator, n: int) -> str:
    return "".join(str(d) for d in rng.integers(0, 10, n))


def passkey_min_length() -> int:
    return len(NEEDLE.format(key="0" * KEY_DIGITS)) + len(QUESTION) + KEY_DIGITS


def make_passkey(rng: np.random.Generator, filler: Filler, length: int, depth: float | None = None) -> dict:
    """One passkey example of exactly `length` bytes; the last `KEY_DIGITS` bytes are the answer."""
    if length < passkey_min_length():
        raise ValueError(f"passkey needs length >= {passkey_min_length()}, got {length}")
    depth = float(rng.uniform()) if depth is None else float(depth)
    if not 0 <= depth <= 1:
        raise ValueError(f"depth must be in [0, 1], got {depth}")
    key = _digits(rng, KEY_DIGITS)
    needle, question = _b(NEEDLE.format(key=key)), _b(QUESTION)
    n_fill = length - len(needle) - len(question) - KEY_DIGITS
    text = filler.sample(rng, n_fill)
    cut = round(depth * n_fill)
    ids = np.concatenate([text[:cut], needle, text[cut:], question, _b(key)]).astype(np.int64)
    answer = np.arange(length - KEY_DIGITS, length)
    return {
        "task": "passkey",
        "input_ids": ids,
        "answers": [answer],  # list of position arrays, one per scored answer
        "depths": [cut / max(n_fill, 1)],
        "key": key,
        "needle_start": cut,
        "needle_end": cut + len(needle),
    }


def mqar_min_length(num_pairs: int, num_queries: int) -> int:
    pair = MQAR_KEY_LETTERS + MQAR_VALUE_DIGITS + 3
    return num_pairs * pair + 1 + num_queries * pair


def make_mqar(rng: np.random.Generator, filler: Filler, length: int, num_pairs: int, num_queries: int) -> dict:
    """k `[abcd=123]` pairs scattered in filler, then `\\n` and `num_queries` of them asked in the same format."""
    if not 1 <= num_queries <= num_pairs:
        raise ValueError(f"need 1 <= num_queries <= num_pairs, got {num_queries}, {num_pairs}")
    if length < mqar_min_length(num_pairs, num_queries):
        raise ValueError(f"mqar needs length >= {mqar_min_length(num_pairs, num_queries)}, got {length}")
    keys: list[str] = []
    while len(keys) < num_pairs:
        key = bytes(rng.choice(LETTERS, MQAR_KEY_LETTERS)).decode()
        if key not in keys:
            keys.append(key)
    values = [_digits(rng, MQAR_VALUE_DIGITS) for _ in keys]
    pairs = [_b(f"[{k}={v}]") for k, v in zip(keys, values, strict=True)]
    asked = rng.permutation(num_pairs)[:num_queries]
    suffix = b"\n" + b"".join(f"[{keys[i]}={values[i]}]".encode() for i in asked)
    n_fill = length - sum(len(p) for p in pairs) - len(suffix)
    text = filler.sample(rng, n_fill)
    cuts = np.sort(rng.integers(0, n_fill + 1, num_pairs))
    pieces, depth_of, prev = [], {}, 0
    for i, cut in enumerate(cuts):
        pieces += [text[prev:cut], pairs[i]]
        depth_of[i] = float(cut) / max(n_fill, 1)
        prev = cut
    pieces.append(text[prev:])
    ids = np.concatenate([*pieces, np.frombuffer(suffix, dtype=np.uint8)]).astype(np.int64)
    start = length - len(suffix) + 1
    pair_len = len(pairs[0])
    answers = [
        start + q * pair_len + 1 + MQAR_KEY_LETTERS + 1 + np.arange(MQAR_VALUE_DIGITS) for q in range(len(asked))
    ]
    return {
        "task": "mqar",
        "input_ids": ids,
        "answers": answers,
        "depths": [depth_of[int(i)] for i in asked],
        "keys": [keys[int(i)] for i in asked],
        "values": [values[int(i)] for i in asked],
    }


def make_copy(rng: np.random.Generator, filler: Filler, length: int) -> dict:
    """Training warm-up: a random string of letters and digits (8 to length / 2 - 2 bytes), twice, at random places
    in filler. The answer is the second occurrence after its first byte: copying it needs "what followed the earlier
    occurrence of what I just read" at a distance that varies, which is what passkey and MQAR answers need too."""
    size = int(rng.integers(8, length // 2 - 1))
    string = rng.choice(ALNUM, size)
    text = filler.sample(rng, length - 2 * size)
    first, second = np.sort(rng.integers(0, len(text) + 1, 2))
    ids = np.concatenate([text[:first], string, text[first:second], string, text[second:]]).astype(np.int64)
    start = second + size
    return {"task": "copy", "input_ids": ids, "answers": [np.arange(start + 1, start + size)]}


def make_example(task: str, rng: np.random.Generator, filler: Filler, length: int, args, depth=None) -> dict:
    if task == "passkey":
        return make_passkey(rng, filler, length, depth)
    if task == "copy":
        return make_copy(rng, filler, length)
    return make_mqar(rng, filler, length, args.num_pairs, args.num_queries)


class TaskStream(IterableDataset):
    """Endless training examples, generated on the fly from a fixed seed.

    Example i is drawn from `default_rng([seed, i])`: a copy warm-up example with probability `args.copy_fraction`,
    else passkey or MQAR with equal odds. Each run of `batch_size` consecutive examples shares one length (drawn from
    `lengths` by `default_rng([seed, -1, i // batch_size])`), so batches need no padding.
    """

    def __init__(self, filler: Filler, lengths: list[int], batch_size: int, args, seed: int):
        self.filler, self.lengths, self.batch_size, self.args, self.seed = filler, lengths, batch_size, args, seed

    def example(self, i: int) -> dict:
        length = int(np.random.default_rng([self.seed, 1, i // self.batch_size]).choice(self.lengths))
        rng = np.random.default_rng([self.seed, 0, i])
        copy = self.args.copy_fraction > 0 and rng.uniform() < self.args.copy_fraction
        task = "copy" if copy else self.args.tasks[int(rng.integers(0, len(self.args.tasks)))]
        ex = make_example(task, rng, self.filler, length, self.args)
        ids = torch.from_numpy(ex["input_ids"])
        if self.args.loss == "all":
            labels = ids.clone()
        else:
            labels = torch.full_like(ids, IGNORE)
            for pos in ex["answers"]:
                labels[pos] = ids[pos]
        return {"input_ids": ids, "labels": labels}

    def __iter__(self):
        i = 0
        while True:
            yield self.example(i)
            i += 1


# ----------------------------------------------------------------------------------------------------------------------
# Models


def build_model(name: str, args, num_neighbors: int | None = None):
    """A fresh model by name, with the `--model` overrides (the flow-off ablation also drops the query flow, which
    needs the flow); the Llama's MLP width makes its parameter count match the full DFN's."""
    from transformers import set_seed

    from dfn import DFNForCausalLM
    from dfn.baselines import same_size_llama

    candidates = {"num_neighbors": num_neighbors} if num_neighbors else {}
    ablation = {
        "dfn": {},
        "dfn-nomem": {"use_memory": False},
        "dfn-noflow": {"use_flow": False, "use_query_flow": False},
    }
    set_seed(args.seed)
    if name in ablation:
        return DFNForCausalLM(train_lib.dfn_config_from_args(args, **candidates, **ablation[name]))
    if name != "llama":
        raise ValueError(f"unknown model {name!r}; known: {MODELS}")
    longest = max(max(args.lengths), args.train_length)
    return same_size_llama(train_lib.dfn_config_from_args(args), max_position_embeddings=longest)


def init_folder(name: str, args) -> Path:
    return Path(args.init_from) / "models" / name


def init_train(name: str, args) -> dict | None:
    record = init_folder(name, args) / "train.json"
    return json.loads(record.read_text()) if record.exists() else None


def start_model(name: str, args):
    """The model a run trains: fresh, or with `--init-from` the one an earlier run saved (its architecture wins over
    the size flags; DFN models train with `--train-neighbors` candidates as fresh ones do)."""
    if not args.init_from:
        return build_model(name, args, num_neighbors=args.train_neighbors)
    folder = init_folder(name, args)
    if not (folder / "config.json").exists():
        raise SystemExit(f"--init-from: no saved model {name!r} in {folder} (a run's --out-dir holds models/<name>)")
    model = load_model(name, folder)
    if is_dfn(model):
        model.config.num_neighbors = args.train_neighbors or args.num_neighbors
    return model


def num_params(model) -> int:
    return sum(p.numel() for p in model.parameters())


def load_model(name: str, folder: Path):
    """A model saved by an earlier run (`<out-dir>/models/<name>`)."""
    from transformers import LlamaForCausalLM

    from dfn import DFNForCausalLM

    cls = LlamaForCausalLM if name == "llama" else DFNForCausalLM
    return cls.from_pretrained(folder).eval()


class BoundedStreamTrainer(train_lib.ByteLMTrainer):
    """Trains a DFN as a bounded cache reads it: each batch goes through a `DFNCache(window=window)` in calls of
    `segment` bytes, with gradients through the field memory from call to call (`memory_grad`; the kept entities
    carry none), so a byte more than `window + segment` back reaches the loss only through the memory (in a full
    pass the K nearest can reach it too)."""

    def __init__(self, *args, window: int, segment: int, **kwargs):
        super().__init__(*args, **kwargs)
        self.window, self.segment = window, segment

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        logits = bounded_logits(model, self.window, self.segment, input_ids=inputs["input_ids"])  # (B, L, V)
        loss = model.loss_function(logits, inputs["labels"], vocab_size=model.config.vocab_size)  # as the full pass's
        return (loss, {"logits": logits}) if return_outputs else loss


def bounded_logits(model, window: int, segment: int, input_ids=None, inputs_embeds=None) -> torch.Tensor:
    """Logits `(B, L, V)` of a DFN reading `input_ids` `(B, L)` or `inputs_embeds` `(B, L, E)` through a
    `DFNCache(window=window)` in calls of `segment` bytes, with gradients through the field memory across calls."""
    from dfn import DFNCache

    name, x = ("input_ids", input_ids) if inputs_embeds is None else ("inputs_embeds", inputs_embeds)
    cache = DFNCache(model.config, window=window, memory_grad=True)
    calls = [
        model(**{name: x[:, i : i + segment]}, cache=cache, use_cache=True).logits
        for i in range(0, x.shape[1], segment)
    ]
    return torch.cat(calls, dim=1)


def training_read(model, args) -> dict:
    """How training reads a model: `{"window", "segment"}` of a bounded cache (`--train-window`, DFN only), or {}
    (full passes)."""
    if args.train_window and is_dfn(model):
        return {"window": args.train_window, "segment": args.train_segment}
    return {}


def train_model(model, name: str, args, filler: Filler) -> dict:
    """Train through `transformers.Trainer` on the on-the-fly task stream (DFN models through a bounded cache with
    `--train-window`); returns timings and the loss curve."""
    lengths = train_lengths(args)
    stream = TaskStream(filler, lengths, args.batch_size, args, seed=args.seed)
    out_dir = str(Path(args.out_dir) / "runs" / name)
    bounded = training_read(model, args)
    run = train_lib.train_on_stream(
        model, stream, out_dir, args, max(1, args.steps // 20), adam_beta2=0.99, disable_tqdm=args.no_progress,
        trainer_class=BoundedStreamTrainer if bounded else None, trainer_kwargs=bounded,
    )  # fmt: skip
    curve = run["loss_curve"]
    return {
        "steps": args.steps,
        "seconds": run["seconds"],
        "train_lengths": lengths,
        "loss_curve": curve,
        "final_loss": curve[-1][1] if curve else None,
        "bounded": bounded or None,
    }


def task_min_length(args) -> int:
    """The shortest sequence every task of `args.tasks` fits in."""
    needs = {"passkey": passkey_min_length(), "mqar": mqar_min_length(args.num_pairs, args.num_queries)}
    return max(needs[task] for task in args.tasks)


def train_lengths(args) -> list[int]:
    floor = min(task_min_length(args) + 32, args.train_length)
    return sorted({max(floor, args.train_length // 4), max(floor, args.train_length // 2), args.train_length})


# ----------------------------------------------------------------------------------------------------------------------
# Evaluation


def is_dfn(model) -> bool:
    return getattr(model.config, "model_type", "") == "dfn"


@torch.no_grad()
def score_batch(model, ids: torch.Tensor, answers: list[list[np.ndarray]], args) -> list[list[np.ndarray]]:
    """Read `ids` `(B, L)` in segments through the model's cache; for each row and answer, the per-digit correctness
    of the argmax prediction (teacher forcing)."""
    from dfn import DFNCache

    batch, length = ids.shape
    needed = sorted({int(p) - 1 for row in answers for ans in row for p in ans})
    logits_at: dict[int, torch.Tensor] = {}
    cache = DFNCache(model.config, window=args.window or None) if is_dfn(model) else None
    for start in range(0, length, args.segment):
        stop = min(start + args.segment, length)
        inside = [p for p in needed if start <= p < stop]
        keep = stop - min(inside) if inside else 1
        out = model(input_ids=ids[:, start:stop], cache=cache, use_cache=True, logits_to_keep=keep)
        cache = out.cache  # DFN: the same DFNCache object; Llama: its DynamicCache (created on the first call)
        for p in inside:
            logits_at[p] = out.logits[:, p - (stop - keep)].argmax(-1)
    return [
        [np.array([int(logits_at[int(p) - 1][b]) == int(ids[b, p]) for p in ans]) for ans in answers[b]]
        for b in range(batch)
    ]


def eval_examples(task: str, length: int, depth_index: int, depth, filler: Filler, args) -> list[dict]:
    """The evaluation examples of one cell: identical for every model (seeded by task, length and depth)."""
    count = args.eval_examples
    out = []
    for j in range(count):
        rng = np.random.default_rng([args.seed + 1000, TASKS.index(task), length, depth_index, j])
        out.append(make_example(task, rng, filler, length, args, depth=depth))
    return out


def nearest_bin(depth: float, depths: list[float]) -> int:
    return int(np.argmin([abs(depth - d) for d in depths]))


def evaluate(model, name: str, args, filler: Filler) -> dict:
    """Accuracy per task, length and depth. MQAR examples scatter their pairs; answers are binned by depth."""
    from tqdm.auto import tqdm

    results: dict = {}
    cells = [(task, length) for task in args.tasks for length in args.lengths]
    bar = tqdm(cells, desc=f"eval {name}", disable=args.no_progress)
    last: dict[str, tuple[int, float]] = {}
    exponent = 1.0 if (is_dfn(model) and args.window) else 2.0
    for task, length in bar:
        bar.set_postfix(task=task, length=length)
        per_length = results.setdefault(task, {}).setdefault(str(length), {})
        if task in last:
            prev_len, prev_s = last[task]
            predicted = prev_s * (length / prev_len) ** exponent
            if predicted > args.eval_time_cap:
                reason = f"predicted {predicted:.0f} s > cap {args.eval_time_cap:.0f} s"
                per_length.update({str(d): {"skipped": reason} for d in args.depths})
                per_length["all"] = {"skipped": reason}
                last[task] = (length, predicted)
                continue
        start = time.perf_counter()
        # passkey: one run per depth; mqar: as many runs of scattered pairs, answers binned by depth afterwards
        depth_runs = [(i, d if task == "passkey" else None) for i, d in enumerate(args.depths)]
        exact = {i: [] for i in range(len(args.depths))}
        digit = {i: [] for i in range(len(args.depths))}
        for d_index, depth in depth_runs:
            examples = eval_examples(task, length, d_index, depth, filler, args)
            ids = torch.from_numpy(np.stack([ex["input_ids"] for ex in examples]))
            for b in range(0, len(examples), args.eval_batch):
                part = examples[b : b + args.eval_batch]
                scores = score_batch(model, ids[b : b + args.eval_batch], [ex["answers"] for ex in part], args)
                for ex, row in zip(part, scores, strict=True):
                    for ans_depth, correct in zip(ex["depths"], row, strict=True):
                        k = d_index if task == "passkey" else nearest_bin(ans_depth, args.depths)
                        exact[k].append(bool(correct.all()))
                        digit[k].append(float(correct.mean()))
        seconds = time.perf_counter() - start
        for k, depth in enumerate(args.depths):
            per_length[str(depth)] = summarise(exact[k], digit[k])
        per_length["all"] = summarise(sum(exact.values(), []), sum(digit.values(), []))
        per_length["all"]["seconds"] = seconds
        last[task] = (length, seconds)
    return results


def summarise(exact: list[bool], digit: list[float]) -> dict:
    if not exact:
        return {"acc": None, "digit_acc": None, "n": 0}
    return {"acc": float(np.mean(exact)), "digit_acc": float(np.mean(digit)), "n": len(exact)}


# ----------------------------------------------------------------------------------------------------------------------
# Diagnosis: does the needle reach the query, directly or through the memory?


def gradient_reach(
    model, filler: Filler, length: int, seed: int, depth: float = 0.25, count: int = 4, bounded: dict | None = None
) -> dict:
    """How much the answer can learn from the key: over `count` passkey examples of `length` bytes, the gradient of
    the first answer digit's log-probability with respect to the input embeddings (a full pass without cache unless
    `bounded`, below; dropout off). Its mean norm at the key's digits (`key`), at the 16 bytes before the byte that
    predicts the answer (`local`; that byte itself reaches the answer through the residual stream, not through a
    read) and at the filler before the needle (`filler`), and by how far back a byte lies from that byte
    (`by_distance`: ranges 1, 2-3, 4-7, ...). Any model: DFN or Llama. A model whose `key_over_local` is tiny at
    initialisation gets almost no training signal toward retrieval and stays on the plateau of guessing digits (a
    larger one does not ensure that training leaves it: seeds of equal reach differ). `bounded` (`window`,
    `segment`): read the way `BoundedStreamTrainer` trains, so a key beyond `window + segment` bytes reaches the
    answer through the memory only."""
    was_training = model.training
    model.eval()
    embed = model.get_input_embeddings()
    sums, profile = np.zeros(3), {}
    try:
        for j in range(count):
            ex = make_passkey(np.random.default_rng([seed + 3000, length, j]), filler, length, depth)
            ids = torch.from_numpy(ex["input_ids"]).unsqueeze(0)
            inputs = embed(ids).detach().requires_grad_(True)
            query = int(ex["answers"][0][0]) - 1  # the byte whose logits predict the first digit
            if bounded:
                logits = bounded_logits(model, bounded["window"], bounded["segment"], inputs_embeds=inputs)[0, query]
            else:
                logits = model(inputs_embeds=inputs, use_cache=False).logits[0, query]
            (grad,) = torch.autograd.grad(torch.log_softmax(logits.float(), -1)[ids[0, query + 1]], inputs)
            norms = grad[0].norm(dim=-1)
            key = ex["needle_start"] + NEEDLE.index("{key}")
            parts = (norms[key : key + KEY_DIGITS], norms[query - 16 : query], norms[: ex["needle_start"]])
            sums += [float(part.mean()) if part.numel() else 0.0 for part in parts]
            for low, high in doubling_ranges(query):  # bytes low..high back from the query byte
                name = f"{low}-{high}"
                profile[name] = profile.get(name, 0.0) + float(norms[query - high : query - low + 1].mean())
    finally:
        model.train(was_training)
    key, local, before = (float(x) for x in sums / count)
    return {
        "length": length,
        "bounded": bounded or None,
        "key": key,
        "local": local,
        "filler": before,
        "key_over_local": key / local,
        "by_distance": {name: total / count for name, total in profile.items()},
    }


@torch.no_grad()
def needle_swap(model, args, filler: Filler, length: int, measured: dict | None = None) -> dict:
    """Does the answer come from the needle? Per depth, the per-digit accuracy of the passkey cells at `length` (read
    as `evaluate` reads them), and again with the needle's key replaced by other digits (each digit changed) while
    the answer is scored against the original key: what the model gets right without the needle. Any model.
    `measured`: `evaluate`'s passkey cells at `length`, whose `digit_acc` is taken instead of scoring them again."""
    out = {}
    for index, depth in enumerate(args.depths):
        examples = eval_examples("passkey", length, index, depth, filler, args)
        rng = np.random.default_rng([args.seed + 4000, length, index])
        known = ((measured or {}).get(str(depth)) or {}).get("digit_acc")
        hits = {"digit_needle_swapped": []} if known is not None else {"digit": [], "digit_needle_swapped": []}
        for start in range(0, len(examples), args.eval_batch):
            batch = examples[start : start + args.eval_batch]
            ids = torch.from_numpy(np.stack([ex["input_ids"] for ex in batch]))
            swapped = ids.clone()
            for row, ex in enumerate(batch):
                at = ex["needle_start"] + NEEDLE.index("{key}")
                shift = torch.from_numpy(rng.integers(1, 10, KEY_DIGITS))
                swapped[row, at : at + KEY_DIGITS] = (ids[row, at : at + KEY_DIGITS] - ord("0") + shift) % 10 + ord("0")
            answers = [ex["answers"] for ex in batch]
            for key, source in (("digit", ids), ("digit_needle_swapped", swapped)):
                if key in hits:
                    hits[key] += [float(a.mean()) for row in score_batch(model, source, answers, args) for a in row]
        out[str(depth)] = {"digit": known, **{key: float(np.mean(values)) for key, values in hits.items()}}
    return {"length": length, "by_depth": out}


@torch.no_grad()
def diagnose(model, args, filler: Filler, length: int, depth: float = 0.5, count: int = 2) -> dict:
    """For DFN models: at the position that predicts the first key digit, per layer and head,

    * `mem_frac`: the share of the kernel mass that goes to the memory slots (vs the K nearest entities);
    * `needle_knn`: the kernel mass on needle entities among the K nearest (how often the flow brought them close);
    * `needle_mem`: the needle's share of what the memory read returns, measured exactly by a tracer: the memory
      scan re-run with value 1 on needle entities and 0 elsewhere (the write is linear in the values);
    * `needle_total` = (1 - mem_frac) * needle_knn + mem_frac * needle_mem, to compare with `needle_bytes / length`
      (what a uniform average over the context would give);
    * `slot_needle_share`: the needle's share of the slot that holds most of it, in the memory the query reads;
    * `key_gate`: the gate (1 - exp(-S) for the gated write, S / D for the mean write) with which the key's chunk
      writes the slot it writes most into; `filler_gate`: the median gate of the later (filler) chunks on that slot;
      `retention`: the product of (1 - gate) over those chunks, the share of the key's write that is still in the
      slot when the query reads it;
    * `logw_key_minus_filler`: mean log influence weight of the key digits minus that of the filler.
    """
    from dfn.memory_dfn import (
        commit_coefficients,
        initial_memory_state,
        mass_before_chunks,
        memory_scan,
        squared_distance,
        write_scores,
    )
    from dfn.neighbors_dfn import causal_knn

    cfg = model.config
    layers = model.model.layers
    captured: dict = {}
    hooks = []
    for i, layer in enumerate(layers):
        hooks.append(layer.influence_proj.register_forward_hook(lambda m, a, o, i=i: captured.__setitem__(("w", i), o)))
        if cfg.use_query_flow:
            hook = layer.query_flow_proj.register_forward_hook(lambda m, a, o, i=i: captured.__setitem__(("q", i), o))
            hooks.append(hook)
    rows = []
    try:
        for j in range(count):
            ex = make_passkey(np.random.default_rng([args.seed + 2000, length, j]), filler, length, depth)
            ids = torch.from_numpy(ex["input_ids"]).unsqueeze(0)
            out = model(input_ids=ids, use_cache=False, output_positions=True)
            q = int(ex["answers"][0][0]) - 1
            key_start = ex["needle_start"] + NEEDLE.index("{key}")
            needle = torch.zeros(length, dtype=torch.bool)
            needle[ex["needle_start"] : ex["needle_end"]] = True
            for i, layer in enumerate(layers):
                pos = out.positions[i + 1]  # (1, N, H, k) after the flow
                heads = pos.shape[2]
                log_w = torch.nn.functional.logsigmoid(captured[("w", i)].float())  # (1, N, H)
                inv_two_var = 0.5 * torch.exp(-2.0 * layer.log_kernel_width)
                valid_all = torch.ones(1, length, dtype=torch.bool)
                query = pos[:, q : q + 1]  # (1, 1, H, k): where q looks from
                if cfg.use_query_flow:
                    look = captured[("q", i)][:, q : q + 1].float().view(1, 1, heads, cfg.pos_dim)
                    query = query + layer.flow_alpha.view(1, 1, -1, 1) * look
                idx, ok = causal_knn(query, pos[:, : q + 1], valid_all[:, : q + 1], cfg.num_neighbors, q)
                near = pos[0, idx[0, 0], torch.arange(heads).view(-1, 1)]  # (H, K, k)
                dist2 = squared_distance(query[0, 0].unsqueeze(1), near)
                logits = log_w[0, idx[0, 0], torch.arange(heads).view(-1, 1)] - dist2 * inv_two_var.view(-1, 1)
                logits = logits.masked_fill(~ok[0, 0], -1e30)
                soft = torch.softmax(logits, -1)
                needle_knn = (soft * needle[idx[0, 0]].float()).sum(-1)  # (H,)
                row = {"layer": i, "needle_knn": needle_knn.tolist(), "needle_in_knn": needle[idx[0, 0]].any(-1)}
                row["needle_in_knn"] = row["needle_in_knn"].tolist()
                filler_mask = ~needle
                filler_mask[q - len(QUESTION) :] = False
                row["logw_key_minus_filler"] = (
                    log_w[0, key_start : key_start + KEY_DIGITS].mean(0) - log_w[0, filler_mask].mean(0)
                ).tolist()
                if cfg.use_memory:
                    params = layer._memory_params()
                    flow = pos[..., 1:]
                    tracer = needle.view(1, -1, 1, 1).float().expand(1, length, heads, 1)
                    prior = layer._prior_log_mass()
                    state = initial_memory_state(params["home"], flow.new_zeros(heads, cfg.memory_slots, 1), 1, prior)
                    prefix = (q // cfg.memory_chunk_size) * cfg.memory_chunk_size  # chunks complete before q's
                    ids_all = torch.arange(length).view(1, -1)
                    _, _, before_q = memory_scan(
                        state, flow[:, :prefix], tracer[:, :prefix], log_w[:, :prefix], ids_all[:, :prefix],
                        valid_all[:, :prefix], params, cfg.memory_chunk_size, read=False,
                    )  # fmt: skip
                    read, mem_lse, _ = memory_scan(
                        state, flow, tracer, log_w, ids_all, valid_all, params, cfg.memory_chunk_size
                    )
                    knn_lse = torch.logsumexp(logits, -1)
                    mem_frac = torch.sigmoid(mem_lse[0, q] - knn_lse)
                    needle_mem = read[0, q, :, 0]
                    # write mass S (chunks, H, M) and the decay 1 - gate each complete chunk applies to each slot
                    mass = torch.exp(write_scores(flow[0, :prefix], log_w[0, :prefix], params))
                    mass = mass.view(-1, cfg.memory_chunk_size, heads, cfg.memory_slots).sum(1)
                    before = None
                    if prior is not None:  # every chunk before q's is complete
                        every = torch.ones(1, len(mass), dtype=torch.bool)
                        before = mass_before_chunks(state["mass"], mass[None], every)[0]
                    decay = commit_coefficients(mass, before)[0]
                    row.update(
                        slot_needle_share=before_q["val"][0, :, :, 0].amax(-1).tolist(),
                        mem_frac=mem_frac.tolist(),
                        needle_mem=needle_mem.tolist(),
                        needle_total=((1 - mem_frac) * needle_knn + mem_frac * needle_mem).tolist(),
                    )
                    key_chunk = key_start // cfg.memory_chunk_size
                    if key_chunk < len(mass):  # else the key's chunk is not yet written when q reads
                        best = mass[key_chunk].argmax(-1)  # (H,) the slot the key's chunk writes most into
                        slot_decay = decay.gather(2, best.view(1, -1, 1).expand(decay.shape[0], -1, 1))[..., 0]
                        later = slot_decay[key_chunk + 1 :]
                        row.update(
                            key_gate=(1 - slot_decay[key_chunk]).tolist(),
                            filler_gate=(1 - later).median(0).values.tolist() if len(later) else None,
                            retention=later.prod(0).tolist(),
                            chunks_between=len(later),
                        )
                else:
                    row["needle_total"] = row["needle_knn"]
                rows.append(row)
    finally:
        for h in hooks:
            h.remove()
    needle_bytes = len(NEEDLE.format(key="0" * KEY_DIGITS))
    per_layer = []
    for i in range(len(layers)):
        mine = [r for r in rows if r["layer"] == i]
        shared = [k for k in mine[0] if k != "layer" and all(r.get(k) is not None for r in mine)]
        entry = {k: np.mean([r[k] for r in mine], axis=0).tolist() for k in shared}
        per_layer.append({"layer": i, **entry})
    return {
        "length": length,
        "depth": depth,
        "examples": count,
        "uniform_needle_share": needle_bytes / length,
        "per_layer": per_layer,
        "time_scale": torch.exp(model.model.log_time_scale).tolist(),
        "flow_alpha": [getattr(layer, "flow_alpha", torch.zeros(0)).tolist() for layer in layers],
        "kernel_width": [torch.exp(layer.log_kernel_width).tolist() for layer in layers],
        "memory_read_weight": [
            torch.sigmoid(layer.memory_log_weight).sum(-1).tolist() for layer in layers if cfg.use_memory
        ],
    }


# ----------------------------------------------------------------------------------------------------------------------
# Report


def fmt_cell(cell: dict) -> str:
    if "skipped" in cell:
        return "skip"
    if cell.get("acc") is None:
        return "-"
    return f"{cell['acc']:.2f} ({cell['digit_acc']:.2f})"


def print_tables(report: dict, args) -> None:
    lengths = [str(x) for x in args.lengths]
    width = 14
    print("\nAccuracy: exact match (per-digit) over all depths; 'skip' = over the eval time cap")
    print(f"{'model':<12}{'task':<9}" + "".join(f"{x:>{width}}" for x in lengths))
    for name, res in report["models"].items():
        for task in args.tasks:
            cells = [fmt_cell(res["eval"][task][x]["all"]) for x in lengths]
            print(f"{name:<12}{task:<9}" + "".join(f"{c:>{width}}" for c in cells))
    for name, res in report["models"].items():
        for task in args.tasks:
            print(f"\n{name} / {task}: exact (per-digit) by depth (rows) and length (columns)")
            print(f"{'depth':<8}" + "".join(f"{x:>{width}}" for x in lengths))
            for d in args.depths:
                cells = [fmt_cell(res["eval"][task][x][str(d)]) for x in lengths]
                print(f"{d:<8}" + "".join(f"{c:>{width}}" for c in cells))


def print_reach(report: dict) -> None:
    print("\nGradient reach: mean gradient norm of the first answer digit's log-probability at the key's digits,")
    print("at the 16 bytes before the byte that predicts it and at the filler before the needle (see gradient_reach)")
    rows = [
        (name, when, reach)
        for name, res in report["models"].items()
        for when, reach in (("init", res["train"].get("gradient_reach_at_init")), ("trained", res["gradient_reach"]))
        if reach
    ]
    print(f"{'model':<12}{'when':<9}{'key':>10}{'local':>10}{'filler':>10}{'key/local':>11}")
    for name, when, reach in rows:
        values = "".join(f"{reach[k]:>10.2e}" for k in ("key", "local", "filler"))
        print(f"{name:<12}{when:<9}{values}{reach['key_over_local']:>11.2e}")
    print("\nThe same gradient by how many bytes back a byte lies")
    print(f"{'model':<12}{'when':<9}" + "".join(f"{d:>10}" for d in rows[0][2]["by_distance"]))
    for name, when, reach in rows:
        print(f"{name:<12}{when:<9}" + "".join(f"{v:>10.1e}" for v in reach["by_distance"].values()))


def print_needle_swap(report: dict) -> None:
    if not report["needle_swap"]:
        return
    print("\nNeedle swap: passkey per-digit accuracy, and with the needle's key changed (scored against the original:")
    print("what is right without the needle; chance 0.1)")
    for name, swap in report["needle_swap"].items():
        cells = "  ".join(
            f"depth {d}: {r['digit']:.2f} -> {r['digit_needle_swapped']:.2f}" for d, r in swap["by_depth"].items()
        )
        print(f"{name:<12}length {swap['length']}: {cells}")


def plot_heatmaps(report: dict, args, out_dir: Path) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    paths = []
    lengths = [str(x) for x in args.lengths]
    for name, res in report["models"].items():
        tasks = args.tasks
        fig, axes = plt.subplots(
            1, len(tasks), figsize=(3 + 1.6 * len(lengths) * len(tasks), 1.2 + 0.6 * len(args.depths)), squeeze=False
        )
        for ax, task in zip(axes[0], tasks, strict=True):
            grid = np.full((len(args.depths), len(lengths)), np.nan)
            for r, d in enumerate(args.depths):
                for c, x in enumerate(lengths):
                    cell = res["eval"][task][x][str(d)]
                    if "skipped" not in cell and cell.get("acc") is not None:
                        grid[r, c] = cell["acc"]
            cmap = matplotlib.colormaps["viridis"].copy()
            cmap.set_bad("lightgrey")
            ax.imshow(np.ma.masked_invalid(grid), vmin=0, vmax=1, cmap=cmap, aspect="auto")
            for r, d in enumerate(args.depths):
                for c, x in enumerate(lengths):
                    cell = res["eval"][task][x][str(d)]
                    text = "skip" if "skipped" in cell else ("-" if cell.get("acc") is None else fmt_cell(cell))
                    ax.text(
                        c,
                        r,
                        text.replace(" ", "\n"),
                        ha="center",
                        va="center",
                        fontsize=7,
                        color="black" if np.isnan(grid[r, c]) or grid[r, c] > 0.5 else "white",
                    )
            ax.set_xticks(range(len(lengths)), lengths)
            ax.set_yticks(range(len(args.depths)), [str(d) for d in args.depths])
            ax.set_xlabel("context length (bytes)")
            ax.set_ylabel("depth" if task == "passkey" else "depth bin of queried pair")
            ax.set_title(f"{name}: {task} exact match (per-digit)", fontsize=9)
        fig.tight_layout()
        path = out_dir / f"heatmap_{name}{run_tag(args)}.png"
        fig.savefig(path, dpi=110)
        plt.close(fig)
        paths.append(str(path))
    return paths


def machine_info() -> dict:
    return {
        "python": platform.python_version(),
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "numpy": np.__version__,
        "device": "cuda" if torch.cuda.is_available() else "cpu",
    }


# ----------------------------------------------------------------------------------------------------------------------
# CLI


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument(
        "--quick", action="store_true", help="tiny models, a few dozen steps, lengths 256/512 (< 1 min); flags win"
    )
    p.add_argument("--models", default=",".join(MODELS), help=f"comma list of {MODELS}")
    p.add_argument("--tasks", default=",".join(TASKS), help=f"comma list of {TASKS}, trained (equal odds) and scored")
    p.add_argument("--steps", type=positive_int, default=300, help="training steps per model")
    p.add_argument("--lengths", default="1024,4096,16384,65536", help="evaluation context lengths (bytes)")
    p.add_argument("--depths", default="0,0.25,0.5,0.75,1", help="needle depths (fraction of the filler)")
    p.add_argument("--train-length", type=positive_int, default=1024, help="longest training sequence (<= 2048)")
    p.add_argument("--batch-size", type=positive_int, default=8)
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument(
        "--geometry-lr-scale",
        type=float,
        default=train_lib.TrainConfig.geometry_lr_scale,
        help="as train.py --geometry_lr_scale",
    )
    p.add_argument("--loss", choices=("answer", "all"), default="answer", help="train on answer bytes or all bytes")
    p.add_argument(
        "--copy-fraction",
        type=float,
        default=0.0,
        help="share of training examples that are the copy warm-up (a random string twice in filler; see make_copy)",
    )
    train_lib.add_model_size_args(p)
    p.add_argument(
        "--train-neighbors",
        type=non_negative_int,
        default=0,
        help="DFN models train with this many neighbour candidates and are read with --num-neighbors "
        "(0 = --num-neighbors; the longest training length = every earlier entity)",
    )
    p.add_argument(
        "--train-window",
        type=non_negative_int,
        default=0,
        help="train DFN models through a bounded cache of this many entities, read in --train-segment calls, so far "
        "bytes reach the loss only through the field memory (0 = full passes)",
    )
    p.add_argument("--train-segment", type=positive_int, default=256, help="bytes per call with --train-window")
    p.add_argument("--num-pairs", type=positive_int, default=8, help="MQAR key-value pairs per example")
    p.add_argument("--num-queries", type=positive_int, default=4, help="MQAR queries per example")
    p.add_argument("--eval-examples", type=positive_int, default=8, help="examples per (task, length, depth) cell")
    p.add_argument("--eval-batch", type=positive_int, default=8)
    p.add_argument("--segment", type=positive_int, default=2048, help="bytes per forward call when streaming")
    p.add_argument(
        "--window", type=non_negative_int, default=0, help="DFN bounded cache: keep the last W entities (0 = exact)"
    )
    p.add_argument("--eval-time-cap", type=float, default=300.0, help="seconds per (model, task, length) cell")
    p.add_argument(
        "--diagnose-length", type=non_negative_int, default=0, help="diagnosis length (0 = largest eval length <= 4096)"
    )
    p.add_argument("--no-diagnose", action="store_true")
    p.add_argument(
        "--diagnose-only",
        action="store_true",
        help="only the diagnosis of the models saved in <out-dir>/models/ (writes diagnosis_<length>.json)",
    )
    p.add_argument(
        "--init-from",
        default="",
        help="continue training the models an earlier run saved in <DIR>/models/<name> (a length curriculum: "
        "train short, then on longer sequences) instead of fresh ones",
    )
    p.add_argument("--no-save", action="store_true", help="do not save the trained models to <out-dir>/models/")
    p.add_argument(
        "--reuse",
        action="store_true",
        help="evaluate the models saved in <out-dir>/models/ instead of "
        "training (e.g. at other lengths); models not found there are trained",
    )
    p.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch threads (0 = torch's default); 1 is several times faster than 2 on a shared 2-core machine",
    )
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.add_argument("--out-dir", default="outputs/long_context")
    p.add_argument("--overwrite", action="store_true", help="replace the results and models of an earlier run there")
    args = p.parse_args(argv)
    if args.quick:
        quick_defaults(args, p, argv, steps=24, train_length=256, batch_size=4, lengths="256,512", depths="0,0.5,1")
        quick_defaults(args, p, argv, eval_examples=2, eval_batch=2, hidden_size=32, layers=2, heads=2, num_neighbors=8)
        quick_defaults(args, p, argv, memory_slots=4, memory_chunk_size=16, num_pairs=4, num_queries=2, segment=256)
        quick_defaults(args, p, argv, eval_time_cap=60.0)
    args.reuse = args.reuse or args.diagnose_only
    if not 0 <= args.copy_fraction < 1:
        p.error("--copy-fraction must be in [0, 1)")
    args.models = [m.strip() for m in args.models.split(",") if m.strip()]
    args.tasks = [t.strip() for t in args.tasks.split(",") if t.strip()]
    if not args.tasks or any(t not in TASKS for t in args.tasks):
        p.error(f"--tasks must name some of {TASKS}, got {args.tasks}")
    args.lengths = sorted(int(x) for x in str(args.lengths).split(","))
    args.depths = [float(x) for x in str(args.depths).split(",")]
    unknown = [m for m in args.models if m not in MODELS]
    if unknown or not args.models:
        p.error(f"--models must name some of {MODELS}, got {args.models}")
    if not 0 < args.train_length <= 2048:
        p.error("--train-length must be in (0, 2048]")
    if any(not 0 <= d <= 1 for d in args.depths):
        p.error("--depths must lie in [0, 1]")
    if "mqar" in args.tasks and args.num_queries > args.num_pairs:
        p.error(f"--num-queries ({args.num_queries}) must be <= --num-pairs ({args.num_pairs})")
    shortest = task_min_length(args)
    if min(args.lengths) < shortest or args.train_length < shortest:
        p.error(f"lengths must be >= {shortest} bytes for these tasks")
    if not args.no_diagnose and 0 < args.diagnose_length < passkey_min_length():
        p.error(f"--diagnose-length must be 0 or >= {passkey_min_length()} (the diagnosis reads a passkey)")
    return args


def run_tag(args) -> str:
    """The tag in a run's file names: none for a run that trains; for a rerun of saved models (`--reuse`) its
    lengths, so its report and heat maps sit beside the first run's instead of replacing them."""
    return f"_reuse_{'-'.join(str(n) for n in args.lengths)}" if args.reuse else ""


def report_name(args) -> str:
    if args.diagnose_only:
        return f"diagnosis_{diagnose_length(args)}.json"
    return f"long_context{run_tag(args)}.json"


def main(argv=None) -> dict:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.no_progress:
        transformers.utils.logging.disable_progress_bar()  # save_pretrained's shard bar
    out_dir = Path(args.out_dir)
    path = out_dir / report_name(args)
    missing = [name for name in args.models if not (out_dir / "models" / name / "train.json").is_file()]
    if args.diagnose_only and missing:
        raise SystemExit(f"--diagnose-only: no saved model {missing} in {out_dir / 'models'} (no train.json)")
    to_train = missing if args.reuse else args.models  # --reuse trains (and writes) only the models not saved
    refuse_overwrite([path, *(out_dir / sub / name for name in to_train for sub in ("models", "runs"))], args.overwrite)
    out_dir.mkdir(parents=True, exist_ok=True)
    info = machine_info()
    print("machine: " + " ".join(f"{k}={v}" for k, v in info.items()), flush=True)
    print(f"command: {' '.join(sys.argv)}", flush=True)
    train_filler, eval_filler = Filler.split(DATA)
    report = {
        "meta": {**info, "args": {k: v for k, v in vars(args).items()}},
        "models": {},
        "needle_swap": {},
        "diagnosis": {},
    }
    wall = time.perf_counter()
    for name in args.models:
        saved = out_dir / "models" / name
        if args.reuse and (saved / "train.json").exists():
            model = load_model(name, saved)
            train = json.loads((saved / "train.json").read_text())
            print(f"\n== {name}: reusing the model trained in {saved}", flush=True)
        else:
            model = start_model(name, args)
            reach_at_init = gradient_reach(
                model, eval_filler, max(train_lengths(args)), args.seed, bounded=training_read(model, args)
            )
            print(
                f"\n== {name}: {num_params(model):,} parameters; training {args.steps} steps on lengths "
                f"{train_lengths(args)}",
                flush=True,
            )
            train = train_model(model, name, args, train_filler)
            train["gradient_reach_at_init"] = reach_at_init
            if args.init_from:
                train["init_from"] = {"folder": str(init_folder(name, args)), "train": init_train(name, args)}
            print(f"{name}: trained in {train['seconds']:.0f} s, final loss {train['final_loss']}", flush=True)
            if is_dfn(model):  # trained with --train-neighbors candidates, read (and saved) with --num-neighbors
                train["train_neighbors"] = model.config.num_neighbors
                model.config.num_neighbors = args.num_neighbors
            if not args.no_save:
                model.save_pretrained(saved)
                (saved / "train.json").write_text(json.dumps(train))
        reach = gradient_reach(
            model, eval_filler, max(train_lengths(args)), args.seed, bounded=training_read(model, args)
        )
        report["models"][name] = {"params": num_params(model), "train": train, "gradient_reach": reach}
        if not args.diagnose_only:
            report["models"][name]["eval"] = evaluate(model, name, args, eval_filler)
        if "passkey" in args.tasks and not args.no_diagnose:
            length = diagnose_length(args)
            measured = report["models"][name].get("eval", {}).get("passkey", {}).get(str(length))
            report["needle_swap"][name] = needle_swap(model, args, eval_filler, length, measured)
        if is_dfn(model) and not args.no_diagnose:
            length = diagnose_length(args)
            try:
                report["diagnosis"][name] = diagnose(model, args, eval_filler, length)
            except Exception as error:  # a diagnostic must never cost the measured results
                report["diagnosis"][name] = {"error": f"{type(error).__name__}: {error}"}
                print(f"diagnosis of {name} failed: {error!r}", flush=True)
        path.write_text(json.dumps(report, indent=1, default=_json_default))  # partial results survive a crash
        del model
    report["meta"]["wall_seconds"] = time.perf_counter() - wall
    if not args.diagnose_only:
        print_tables(report, args)
    print_reach(report)
    print_needle_swap(report)
    if report["diagnosis"]:
        print("\nDiagnosis at the query (mean over heads; uniform share = needle bytes / length):")
        for name, diag in report["diagnosis"].items():
            if "error" in diag:
                print(f"{name}: diagnosis failed ({diag['error']})")
                continue
            print(
                f"{name} (length {diag['length']}, depth {diag['depth']}, uniform {diag['uniform_needle_share']:.4f})"
            )
            for row in diag["per_layer"]:
                parts = [
                    f"{k}={np.mean(row[k]):.3g}"
                    for k in (
                        "needle_knn",
                        "slot_needle_share",
                        "mem_frac",
                        "needle_mem",
                        "needle_total",
                        "key_gate",
                        "filler_gate",
                        "retention",
                        "logw_key_minus_filler",
                    )
                    if k in row
                ]
                print(f"  layer {row['layer']}: " + " ".join(parts))
    report["heatmaps"] = [] if args.diagnose_only else plot_heatmaps(report, args, out_dir)
    path.write_text(json.dumps(report, indent=1, default=_json_default))
    print(f"\nwall {report['meta']['wall_seconds']:.0f} s; wrote {', '.join([str(path), *report['heatmaps']])}")
    return report


def diagnose_length(args) -> int:
    return args.diagnose_length or max([x for x in args.lengths if x <= 4096] or [min(args.lengths)])


def _json_default(x):
    if isinstance(x, (np.integer, np.floating)):
        return x.item()
    if isinstance(x, np.ndarray):
        return x.tolist()
    if isinstance(x, float) and math.isnan(x):
        return None
    raise TypeError(f"not JSON serialisable: {type(x)}")


if __name__ == "__main__":
    main()
