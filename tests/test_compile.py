"""`compile_decoding`: cached decoding through the compiled step gives the eager model's logits and generations, on
both sides of the box-tree threshold (the scan inside the compiled update; past it, the compiled search over the
blocks' boxes, across a block's completion), on each device (Inductor generates C++ on the CPU, Triton on CUDA)."""

import shutil
from itertools import pairwise

import pytest
import torch
from conftest import make_model, max_diff, random_ids, tiny_config

from dfn import DFNCache
from dfn.cache_dfn import BOUNDED_FIRST_ROW
from dfn.modeling_dfn import CompiledStep
from dfn.neighbors_dfn import _SCAN_MAX_BLOCKS, BOX_FANOUT, DECODE_BLOCK

pytestmark = pytest.mark.skipif(
    shutil.which("g++") is None and shutil.which("c++") is None, reason="torch.compile on CPU needs a C++ compiler"
)


def decode(model, ids, start):
    """Logits of `ids[:, start:]` decoded one entity at a time after a prefill of `ids[:, :start]`."""
    with torch.no_grad():
        cache = DFNCache(model.config)
        model(ids[:, :start], cache=cache, use_cache=True)
        return torch.cat(
            [model(ids[:, i : i + 1], cache=cache, use_cache=True).logits for i in range(start, ids.shape[1])], 1
        )


def counted(step, name: str, calls: dict):
    def call(*args):
        calls[name] += 1
        return step(*args)

    return call


def test_compiled_decoding_equals_the_full_pass_and_eager_generation(device):
    torch._dynamo.reset()
    model = make_model(tiny_config("k3-mem-residual")).to(device)
    prompt = random_ids(1, 9, seed=1).to(device)  # one row, as below: a batch of 2 would compile other graphs
    eager = model.generate(prompt, max_new_tokens=14, do_sample=False, eos_token_id=None)
    tree = (_SCAN_MAX_BLOCKS + 1) * DECODE_BLOCK + 58  # past the threshold: the box tree is searched
    ids = random_ids(1, tree + 10, seed=2).to(device)  # decoding completes a block
    with torch.no_grad():
        full = model(ids).logits
    model.compile_decoding()  # the default: on the CPU the one-call step runs Inductor's C++ wrapper
    calls = dict.fromkeys(CompiledStep._fields, 0)
    step = model.model.layers[0].compiled_step
    step = CompiledStep(*(counted(function, name, calls) for name, function in step._asdict().items()))
    for layer in model.model.layers:  # count the compiled steps' calls (one step shared by all layers, as compiled)
        layer.compiled_step = step
    assert max_diff(decode(model, ids[:, :60], 45), full[:, 45:60]) <= 1e-4  # memory commits every 6 entities
    # one call per step for all layers, the scan inside (15 steps)
    assert calls == {"project": 0, "update": 0, "tree_search": 0, "update_then_project": 0, "decode_layers": 15}
    assert max_diff(decode(model, ids, tree), full[:, tree:]) <= 1e-4
    # 10 steps past the threshold, one call each; the one that completes a block searches it as part of the tail
    # and its box joins the tree eagerly after the call
    assert calls == {"project": 0, "update": 0, "tree_search": 0, "update_then_project": 0, "decode_layers": 25}
    decode_layers = step.decode_layers

    def inexact(*args):  # as if a box search was not exact: the step runs again layer by layer, on the same rows
        hidden_states, memories, _ = decode_layers(*args)
        return hidden_states, memories, torch.tensor(False)

    inexact_step = step._replace(decode_layers=inexact)
    for layer in model.model.layers:
        layer.compiled_step = inexact_step
    assert max_diff(decode(model, ids, tree), full[:, tree:]) <= 1e-4
    assert calls == {"project": 10, "update": 0, "tree_search": 20, "update_then_project": 20, "decode_layers": 35}
    for layer in model.model.layers:
        layer.compiled_step = step
    compiled = model.generate(prompt, max_new_tokens=14, do_sample=False, eos_token_id=None)
    assert torch.equal(compiled, eager)
    # asked for every layer's states, a step runs layer by layer (compiled projections and updates)
    with torch.no_grad():
        cache = DFNCache(model.config)
        model(ids[:, :45], cache=cache, use_cache=True)
        out = model(ids[:, 45:46], cache=cache, use_cache=True, output_hidden_states=True)
    assert calls["update"] == 2 and max_diff(out.logits, full[:, 45:46]) <= 1e-4


def test_compiled_decoding_compiles_nothing_more_after_warm_up():
    """Memory commits and the growth of the cache's buffers keep every tensor's layout: a long generation never stops
    for seconds to compile again (the buffer's rows once filled it exactly; past the box-tree threshold, each time
    the block boxes' buffer grew, while the step read views of it; the first step with a tail of one entity after a
    completed block, a graph of its own until the tail was padded; in a bounded cache, once the window began to
    slide, and once its rows compacted, until they started at row 2; when a buffer whose capacity equalled another
    size grew, until capacities were marked dynamic and the entity mask was handed over whole). The memory state a
    prefill leaves is stored contiguous, as a decoding step's is: with the benchmark's model, its views made the first
    commit recompile (seen with TORCH_LOGS=recompiles; this tiny model does not show it, so the layout is checked
    directly)."""
    torch._dynamo.reset()
    model = make_model(tiny_config("k3-mem-residual"))
    chunk = model.config.memory_chunk_size
    start = (DECODE_BLOCK - 4) // chunk * chunk  # a chunk boundary a few entities before the first block completes
    ids = random_ids(1, start + 60, seed=3)
    with torch.no_grad():
        cache = DFNCache(model.config)
        model(ids[:, :start], cache=cache, use_cache=True)  # the prefill's memory state, then decoding's
        assert all(t.is_contiguous() for layer in cache.layers for t in layer.memory.values())
        model.compile_decoding()  # the first test's graphs: on a cold Inductor cache they compile only there
        for i in range(start, DECODE_BLOCK + 1):  # warm-up: a block completes, no memory commit yet
            model(ids[:, i : i + 1], cache=cache, use_cache=True)
        assert start + chunk > DECODE_BLOCK + 1 and cache.layers[0].boxes.num_blocks == 1
        graphs = torch._dynamo.utils.counters["stats"]["unique_graphs"]
        capacity = cache.layers[0].entities.buffer.shape[1]
        for i in range(DECODE_BLOCK + 1, ids.shape[1]):  # commits, and the buffers grow
            model(ids[:, i : i + 1], cache=cache, use_cache=True)
    assert cache.layers[0].entities.buffer.shape[1] > capacity
    assert cache.layers[0].key_positions.buffer.shape[-1] > capacity
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == graphs

    # past the threshold, every block complete (the tail starts empty), and the level above the blocks holds 16 boxes
    # in a buffer of 16, the head_dim: Dynamo's duck sizing once gave both one symbol, specialised to 16
    start = BOX_FANOUT * BOX_FANOUT * DECODE_BLOCK
    assert start > (_SCAN_MAX_BLOCKS + 1) * DECODE_BLOCK
    assert model.config.hidden_size // model.config.num_attention_heads == BOX_FANOUT
    ids = random_ids(1, start + DECODE_BLOCK + 2, seed=4)
    with torch.no_grad():
        cache = DFNCache(model.config)
        model(ids[:, :start], cache=cache, use_cache=True)
        model(ids[:, start : start + 1], cache=cache, use_cache=True)  # warm-up: a tail of one entity
        graphs = torch._dynamo.utils.counters["stats"]["unique_graphs"]
        capacities = [buffer.shape[1] for buffer in cache.layers[0].boxes.low[:2]]
        for i in range(start + 1, ids.shape[1]):  # longer tails, a block completes, both levels' buffers grow
            model(ids[:, i : i + 1], cache=cache, use_cache=True)
    assert capacities == [BOX_FANOUT**2, BOX_FANOUT]
    assert [buffer.shape[1] for buffer in cache.layers[0].boxes.low[:2]] == [2 * BOX_FANOUT**2, 2 * BOX_FANOUT]
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == graphs

    window = 2 * DECODE_BLOCK  # bounded: the kept rows slide through their buffers, which compact to the front
    torch._dynamo.reset()  # graphs compiled for this cache alone (an unbounded cache's rows always start at 0)
    with torch.no_grad():
        cache = DFNCache(model.config, window=window)
        model(ids[:, : window - 20], cache=cache, use_cache=True)  # shorter than the window
        model(ids[:, window - 20 : window - 19], cache=cache, use_cache=True)  # warm-up
        graphs = torch._dynamo.utils.counters["stats"]["unique_graphs"]
        starts = []
        for i in range(window - 19, 3 * window):  # the window fills, slides, and its buffers compact
            model(ids[:, i : i + 1], cache=cache, use_cache=True)
            starts.append(cache.layers[0].entities.start)
    assert starts[0] == BOUNDED_FIRST_ROW and any(later < earlier for earlier, later in pairwise(starts))
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == graphs

    # a short prompt: the rows' buffers start with 64 rows, here the hidden size. Unmarked, or seen through the entity
    # mask's view (whose batch stride is the capacity), that capacity took the hidden size's symbol, specialised to 64
    torch._dynamo.reset()
    model = make_model(tiny_config("k3-mem-residual", hidden_size=64, num_hidden_layers=1))
    model.compile_decoding(options={"cpp_wrapper": False})  # (Dynamo's symbols: the same with either wrapper)
    ids = random_ids(1, 80, seed=5)
    with torch.no_grad():
        cache = DFNCache(model.config)
        model(ids[:, :20], cache=cache, use_cache=True)
        model(ids[:, 20:21], cache=cache, use_cache=True)  # warm-up
        graphs = torch._dynamo.utils.counters["stats"]["unique_graphs"]
        capacities = [cache.mask_rows.buffer.shape[1], cache.layers[0].entities.buffer.shape[1]]
        for i in range(21, ids.shape[1]):  # the buffers grow
            model(ids[:, i : i + 1], cache=cache, use_cache=True)
    assert capacities == [64, 64] and cache.mask_rows.buffer.shape[1] > 64
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == graphs


def test_compiled_decoding_of_padded_rows_after_a_crop_and_with_hooks():
    """pos_dim 1, left padding, a crop then more steps: compiled as eager. A layer with a forward hook (as accelerate's
    offloading adds) is called through its forward, so the step goes layer by layer and the hook runs; so does a hook
    on the final norm, and with a global module hook the whole step is eager."""
    torch._dynamo.reset()
    model = make_model(tiny_config("k1-mem-seed"))
    ids = random_ids(2, 40, seed=4)
    mask = torch.ones_like(ids)
    mask[1, :5] = 0

    def decode_padded(model):
        with torch.no_grad():
            cache = DFNCache(model.config)
            model(ids[:, :20], attention_mask=mask[:, :20], cache=cache, use_cache=True)
            steps = [
                model(ids[:, i : i + 1], attention_mask=mask[:, : i + 1], cache=cache).logits for i in range(20, 30)
            ]
            cache.crop(-4)
            steps += [
                model(ids[:, i : i + 1], attention_mask=mask[:, : i + 1], cache=cache).logits for i in range(26, 40)
            ]
        return torch.cat(steps, 1)

    eager = decode_padded(model)
    model.compile_decoding(options={"cpp_wrapper": False})  # (the default C++ wrapper: tested above)
    assert max_diff(decode_padded(model), eager) <= 1e-4
    hooked = []
    with model.model.layers[1].register_forward_hook(lambda *args: hooked.append(1)):
        assert max_diff(decode_padded(model), eager) <= 1e-4
    assert len(hooked) == 1 + 10 + 14  # the prefill and every step
    # a hook on the final norm is called too (the one-call step would run the norm inside)
    with model.model.norm.register_forward_hook(lambda *args: hooked.append(2)):
        assert max_diff(decode_padded(model), eager) <= 1e-4
    assert hooked.count(2) == 1 + 10 + 14

    def on_module(module, *args):  # a global hook: every module's forward runs eagerly, the compiled step not at all
        if module is model.model.norm or module is model.model.layers[0].mlp:
            hooked.append(3)

    with torch.nn.modules.module.register_module_forward_hook(on_module):
        assert max_diff(decode_padded(model), eager) <= 1e-4
    assert hooked.count(3) == 2 * (1 + 10 + 14)


@pytest.mark.slow
def test_compiled_decoding_of_a_bounded_cache_and_beam_search():
    """The one-call step where the kept rows no longer start at the buffer's front (a bounded cache drops the oldest
    entities), and where beam search reorders the cache's buffers between steps: compiled as eager. (Slow: each new
    graph compiles for about a minute on a cold Inductor cache.)"""
    torch._dynamo.reset()
    model = make_model(tiny_config("k3-mem-residual"))
    ids = random_ids(1, 100, seed=5)
    prompt = random_ids(2, 9, seed=1)

    def bounded(model):
        with torch.no_grad():
            cache = DFNCache(model.config, window=40)
            model(ids[:, :50], cache=cache)
            logits = torch.cat([model(ids[:, i : i + 1], cache=cache).logits for i in range(50, 100)], 1)
        return logits, cache

    eager, _ = bounded(model)
    eager_beams = model.generate(prompt, num_beams=3, do_sample=False, max_new_tokens=12, eos_token_id=None)
    model.compile_decoding()
    calls = {"decode_layers": 0}
    step = model.model.layers[0].compiled_step
    counted_step = step._replace(decode_layers=counted(step.decode_layers, "decode_layers", calls))
    for layer in model.model.layers:
        layer.compiled_step = counted_step
    compiled, cache = bounded(model)
    assert cache.layers[0].entities.start > 0 and calls["decode_layers"] == 50
    assert max_diff(compiled, eager) <= 1e-4
    compiled_beams = model.generate(prompt, num_beams=3, do_sample=False, max_new_tokens=12, eos_token_id=None)
    assert torch.equal(compiled_beams, eager_beams) and calls["decode_layers"] > 50
