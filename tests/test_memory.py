"""Field memory (dfn/memory_dfn.py): the parallel scan equals the entity-by-entity decoding step, whatever the
split into calls and the padding, and the write rule keeps content that later chunks do not overwrite."""

import math

import pytest
import torch
from conftest import max_diff

from dfn import memory_dfn
from dfn.memory_dfn import initial_memory_state, memory_scan, memory_scan_reference

HEADS, SLOTS, HEAD_DIM = 2, 3, 4


def make_params(flow_coords: int, seed: int = 0) -> dict:
    gen = torch.Generator().manual_seed(seed)
    return {
        "home": torch.randn(HEADS, SLOTS, flow_coords, generator=gen),
        "write_log_scale": -torch.rand(HEADS, SLOTS, generator=gen) * 3,
        "slot_log_weight": -torch.rand(HEADS, SLOTS, generator=gen),
        "inv_two_var": torch.rand(HEADS, generator=gen) + 0.2,
    }


def make_inputs(batch: int, length: int, flow_coords: int, seed: int = 1):
    gen = torch.Generator().manual_seed(seed)
    pos = torch.randn(batch, length, HEADS, flow_coords, generator=gen)
    val = torch.randn(batch, length, HEADS, HEAD_DIM, generator=gen)
    log_w = torch.nn.functional.logsigmoid(torch.randn(batch, length, HEADS, generator=gen) * 2)
    return pos, val, log_w


def fresh(params: dict, batch: int, write: str = "gated") -> dict:
    """A fresh memory; for the "mean" write the slots start with random masses between e^-3 and 1."""
    gen = torch.Generator().manual_seed(7)
    prior = -3 * torch.rand(HEADS, SLOTS, generator=gen) if write == "mean" else None
    return initial_memory_state(params["home"], torch.randn(HEADS, SLOTS, HEAD_DIM, generator=gen), batch, prior)


def assert_states_equal(a: dict, b: dict, tol: float = 1e-5):
    assert a.keys() == b.keys()
    for name in a:
        assert max_diff(a[name], b[name]) <= tol, name


@pytest.mark.parametrize("write", ["gated", "mean"])
@pytest.mark.parametrize("flow_coords", [0, 1, 3])
@pytest.mark.parametrize("chunk_size", [1, 4, 5])
@pytest.mark.parametrize("padded", [True, False], ids=["padded", "in_order"])
def test_parallel_scan_equals_entity_by_entity(flow_coords, chunk_size, padded, write):
    """Padded: row 1 is left-padded by 3 and row 0 starts mid-chunk (position ids from 2). In order: both rows start
    at position 0 with no padding (the layout needs no scatter)."""
    batch, length = 2, 23
    params = make_params(flow_coords)
    pos, val, log_w = make_inputs(batch, length, flow_coords)
    valid = torch.ones(batch, length, dtype=torch.bool)
    position_ids = torch.arange(length).expand(batch, -1)
    if padded:
        valid[1, :3] = False
        position_ids = torch.stack([torch.arange(length) + 2, (valid[1].long().cumsum(0) - 1).clamp_min(0)])
    start = fresh(params, batch, write)
    out, lse, state = memory_scan(start, pos, val, log_w, position_ids, valid, params, chunk_size)
    ref_out, ref_lse, ref_state = memory_scan_reference(start, pos, val, log_w, position_ids, valid, params, chunk_size)
    real = valid.view(batch, length, 1)
    assert max_diff(out * real.unsqueeze(-1), ref_out * real.unsqueeze(-1)) <= 1e-5
    assert max_diff(lse * real, ref_lse * real) <= 1e-5
    assert_states_equal(state, ref_state)


@pytest.mark.parametrize("write", ["gated", "mean"])
def test_rows_far_apart_are_laid_out_apart(write):
    """Row 0 a million entities further on than row 1 (a row that was padding for a long stream): each row's chunks
    are laid out from its own first one, so the scan's chunked axis stays N / C + 2 long, and it equals the step."""
    batch, length, chunk_size = 2, 23, 4
    params = make_params(2)
    pos, val, log_w = make_inputs(batch, length, 2)
    valid = torch.ones(batch, length, dtype=torch.bool)
    valid[1, :5] = False
    position_ids = torch.stack([torch.arange(length) + 10**6 + 3, (valid[1].long().cumsum(0) - 1).clamp_min(0)])
    _, num_chunks, _ = memory_dfn.chunk_layout(position_ids, valid, chunk_size)
    assert num_chunks <= length // chunk_size + 2
    start = fresh(params, batch, write)
    out, _, state = memory_scan(start, pos, val, log_w, position_ids, valid, params, chunk_size)
    ref_out, _, ref_state = memory_scan_reference(start, pos, val, log_w, position_ids, valid, params, chunk_size)
    real = valid.view(batch, length, 1, 1)
    assert max_diff(out * real, ref_out * real) <= 1e-5
    assert_states_equal(state, ref_state)


@pytest.mark.parametrize("write", ["gated", "mean"])
@pytest.mark.parametrize("splits", [[7, 1, 9, 6], [5, 5, 5, 8], [1] * 23, [23], "blocks"])
def test_scan_over_segments_equals_one_scan(splits, write, monkeypatch):
    """Calls that end mid-chunk carry the chunk's sums; a row with no real entity in a call keeps its memory."""
    batch, length, chunk_size = 2, 23, 4
    params = make_params(2)
    pos, val, log_w = make_inputs(batch, length, 2)
    valid = torch.ones(batch, length, dtype=torch.bool)
    valid[1, :9] = False  # row 1 has no real entity in the first call(s)
    if splits == "blocks":
        valid[0, 5:10] = False  # right after the first block of 5, one with no real entity in any row
    position_ids = (valid.long().cumsum(1) - 1).clamp_min(0)
    args = (pos, val, log_w, position_ids, valid, params, chunk_size)
    full_out, _, full_state = memory_scan(fresh(params, batch, write), *args)
    if splits == "blocks":  # one call that scans internally in blocks of 5
        monkeypatch.setattr(memory_dfn, "SCAN_BLOCK", 5)
        splits = [23]
    state, outs, start = fresh(params, batch, write), [], 0
    for size in splits:
        part = slice(start, start + size)
        out, _, state = memory_scan(
            state, pos[:, part], val[:, part], log_w[:, part], position_ids[:, part], valid[:, part], params, chunk_size
        )
        outs.append(out)
        start += size
    real = valid.view(batch, length, 1, 1)
    assert max_diff(torch.cat(outs, 1) * real, full_out * real) <= 1e-5
    assert_states_equal(state, full_state)


def test_unaddressed_slot_keeps_its_content_over_many_chunks():
    """A chunk offers a slot write mass S and moves it by 1 - exp(-S): content written once survives hundreds of
    chunks whose entities the slot does not attend to (far from its home), then is overwritten by one that it does."""
    chunk_size, chunks = 8, 300
    params = make_params(1)
    params["home"] = torch.tensor([0.0, 50.0, 100.0]).view(1, SLOTS, 1).expand(HEADS, -1, -1).contiguous()
    params["write_log_scale"] = torch.zeros(HEADS, SLOTS)
    params["inv_two_var"] = torch.ones(HEADS)
    length = chunk_size * chunks
    pos = torch.full((1, length, HEADS, 1), 100.0)  # filler sits at slot 2's home
    pos[:, :chunk_size] = 0.0  # the first chunk is the "key", at slot 0's home
    val = torch.zeros(1, length, HEADS, HEAD_DIM)
    val[:, :chunk_size] = 1.0
    log_w = torch.zeros(1, length, HEADS)
    position_ids = torch.arange(length).view(1, -1)
    valid = torch.ones(1, length, dtype=torch.bool)
    _, _, state = memory_scan(fresh(params, 1), pos, val, log_w, position_ids, valid, params, chunk_size)
    # slot 0 absorbed the key chunk (mass 8: gate 1 - e^-8) and no filler chunk offered it any mass
    assert torch.allclose(state["val"][0, :, 0], torch.ones(HEADS, HEAD_DIM), atol=1e-3)
    assert torch.allclose(state["val"][0, :, 2], torch.zeros(HEADS, HEAD_DIM), atol=1e-3)
    # one chunk at slot 0's home overwrites it
    pos[:, -chunk_size:] = 0.0
    val[:, -chunk_size:] = -1.0
    _, _, state = memory_scan(fresh(params, 1), pos, val, log_w, position_ids, valid, params, chunk_size)
    assert torch.allclose(state["val"][0, :, 0], -torch.ones(HEADS, HEAD_DIM), atol=1e-2)


def test_mean_write_keeps_a_slot_offered_nothing_when_its_prior_underflows():
    """A learned prior mass of e^-200 is 0 in float32; a slot so far from every entity that its write mass is 0 too
    must keep its content (gate 0), in the scan and in the entity-by-entity step, not become 0/0."""
    chunk_size, length = 4, 12
    params = make_params(1)
    params["home"] = torch.tensor([0.0, 0.0, 1e4]).view(1, SLOTS, 1).expand(HEADS, -1, -1).contiguous()
    pos, val, log_w = make_inputs(2, length, 1)
    position_ids = torch.arange(length).expand(2, -1)
    valid = torch.ones(2, length, dtype=torch.bool)
    slot_val = torch.randn(HEADS, SLOTS, HEAD_DIM)
    start = initial_memory_state(params["home"], slot_val, 2, torch.full((HEADS, SLOTS), -200.0))
    for scan in (memory_scan, memory_scan_reference):
        out, _, state = scan(start, pos, val, log_w, position_ids, valid, params, chunk_size)
        assert torch.isfinite(out).all() and all(torch.isfinite(state[k]).all() for k in state), scan.__name__
        assert torch.equal(state["val"][:, :, 2], slot_val[:, 2].expand(2, -1, -1)), scan.__name__


@pytest.mark.parametrize("write", ["gated", "mean"])
def test_weak_key_against_weaker_filler(write):
    """One slot, a key chunk of write mass 0.05 (value 1), then 200 filler chunks of mass 5e-4 each (value 0). The
    gated write keeps (1 - e^-0.05) e^-0.1 = 4.4 % of the key; the mean write keeps its share of all the mass the slot
    absorbed, 0.05 / (D_0 + 0.05 + 0.1) = 33 % with D_0 = e^-10: relative write masses decide, not absolute ones."""
    chunk_size, chunks = 4, 201
    params = make_params(1)
    params["home"] = torch.zeros(HEADS, SLOTS, 1)
    params["write_log_scale"] = torch.zeros(HEADS, SLOTS)
    params["inv_two_var"] = torch.ones(HEADS)
    length = chunk_size * chunks
    log_w = torch.full((1, length, HEADS), math.log(5e-4 / chunk_size))
    log_w[:, :chunk_size] = math.log(0.05 / chunk_size)
    val = torch.zeros(1, length, HEADS, HEAD_DIM)
    val[:, :chunk_size] = 1.0
    pos = torch.zeros(1, length, HEADS, 1)
    position_ids = torch.arange(length).view(1, -1)
    valid = torch.ones(1, length, dtype=torch.bool)
    prior = torch.full((HEADS, SLOTS), -10.0) if write == "mean" else None
    start = initial_memory_state(params["home"], torch.zeros(HEADS, SLOTS, HEAD_DIM), 1, prior)
    _, _, state = memory_scan(start, pos, val, log_w, position_ids, valid, params, chunk_size)
    expected = 0.05 / (math.exp(-10) + 0.15) if write == "mean" else -math.expm1(-0.05) * math.exp(-0.1)
    assert torch.allclose(state["val"], torch.full_like(state["val"], expected), rtol=1e-4)
    if write == "mean":
        assert torch.allclose(state["mass"], torch.full_like(state["mass"], math.exp(-10) + 0.15), rtol=1e-4)
