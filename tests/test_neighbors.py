"""Causal kNN: the oracle on a hand-made example, and the fast search against the oracle.

The fast search must return exactly the oracle's neighbours (same indices, same order, same tie rule) on
every layout, and stay causal. Small block geometries make small inputs exercise many levels, window
growth and chunking.
"""

import pytest
import torch
from conftest import LAYOUTS, layout, make_model, masks, max_diff, pad_batch, random_ids, tiny_config

import dfn.neighbors_dfn as nd
from dfn.neighbors_dfn import (
    DECODE_BLOCK,
    BlockBoxes,
    causal_knn,
    causal_knn_blocks,
    causal_knn_fast,
    causal_knn_reference,
    causal_knn_scan,
)

# (leaf L, previous leaves P, first window, budget): the default and small ones that reach deep levels
GEOMETRIES = {
    "default": (64, 1, 64, 1 << 20),
    "small": (4, 0, 2, 1 << 20),
    "small-chunks": (8, 2, 4, 512),
}


@pytest.fixture(params=sorted(GEOMETRIES))
def geometry(request, monkeypatch):
    leaf, previous, window, budget = GEOMETRIES[request.param]
    monkeypatch.setattr(nd, "_LEAF", leaf)
    monkeypatch.setattr(nd, "_PREVIOUS", previous)
    monkeypatch.setattr(nd, "_WINDOW", window)
    monkeypatch.setattr(nd, "_BUDGET", budget)
    return request.param


def neighbour_dist(query_pos, key_pos, indices, valid) -> torch.Tensor:
    """`(B, N, H, K')` squared distances of the chosen neighbours (as every search computes them), 0 where invalid."""
    batch, _, heads, _ = query_pos.shape
    b = torch.arange(batch).view(-1, 1, 1, 1)
    h = torch.arange(heads).view(1, 1, -1, 1)
    near = key_pos[b, indices, h]  # (B, N, H, K', k)
    return nd._sq_dist(query_pos.unsqueeze(3).unbind(-1), near.unbind(-1)).masked_fill(~valid, 0.0)


def assert_matches_oracle(query_pos, key_pos, key_valid, num_neighbors, offset, label="") -> dict:
    """The fast search returns the oracle's neighbours (indices, order, validity); returns its stats."""
    ref_idx, ref_valid = causal_knn_reference(query_pos, key_pos, key_valid, num_neighbors, offset)
    stats: dict = {}
    idx, valid = causal_knn_fast(query_pos, key_pos, key_valid, num_neighbors, offset, stats=stats)
    assert idx.shape == ref_idx.shape and idx.dtype == torch.long, label
    assert torch.equal(valid, ref_valid), label
    ref_dist = neighbour_dist(query_pos, key_pos, ref_idx, ref_valid)
    dist = neighbour_dist(query_pos, key_pos, idx, valid)
    diff = (ref_dist - dist).abs().max().item() if dist.numel() else 0.0
    print(f"{label}: largest neighbour-distance difference {diff}")
    assert diff == 0.0, label
    ref_set, fast_set = ref_idx.masked_fill(~ref_valid, -1), idx.masked_fill(~valid, -1)
    assert torch.equal(ref_set.sort(-1).values, fast_set.sort(-1).values), label
    assert torch.equal(ref_set, fast_set), label  # same order, ties included
    own = torch.arange(query_pos.shape[1]).view(1, -1, 1, 1) + offset
    assert bool(((idx >= 0) & (idx <= own)).all()), label  # every slot, valid or not, is a causal index
    return stats


def test_oracle_hand_made_example():
    # one head, k = 1; positions by time index: 0.0, 1.0, 3.0, 1.0, 2.0, 10.0 (key 2 is padding)
    pos = torch.tensor([0.0, 1.0, 3.0, 1.0, 2.0, 10.0]).view(1, 6, 1, 1)
    key_valid = torch.tensor([[True, True, False, True, True, True]])
    idx, valid = causal_knn_reference(pos, pos, key_valid, 3)
    assert idx.shape == (1, 6, 1, 3)
    expected = [
        [0],  # query 0 sees only itself
        [1, 0],
        [1, 0],  # query 2 (padding) sees valid keys 0 and 1, never itself
        [3, 1, 0],  # keys 1 and 3 both at distance 0 from query 3: the more recent (3) first
        [4, 3, 1],  # keys 1 and 3 tie at distance 1 from query 4: 3 before 1, and key 0 (distance 2) drops
        [5, 4, 3],  # keys 3 and 1 tie at distance 9: the more recent (3) wins the last slot
    ]
    for i, want in enumerate(expected):
        got = idx[0, i, 0][valid[0, i, 0]].tolist()
        assert got == want, (i, got, want)
    assert valid.sum().item() == sum(len(w) for w in expected)


@pytest.mark.parametrize("dim", range(1, 9))
def test_every_search_rounds_near_ties_alike(dim):
    """Keys whose coordinates are permutations of one another are equally far from the origin up to rounding: the
    oracle, the fast search and the decoding scan must round them alike (the oracle's `sum(-1)` once added 5-7
    coordinates in another order than the others and picked another key)."""
    gen = torch.Generator().manual_seed(dim)
    base = torch.randn(64, dim, generator=gen)
    keys = [base[:, torch.randperm(dim, generator=gen)] for _ in range(4)] + [torch.zeros(1, dim)]
    pos = torch.cat(keys).view(1, -1, 1, dim)  # the origin is the last entity
    valid = torch.ones(1, pos.shape[1], dtype=torch.bool)
    last = pos.shape[1] - 1
    for num_neighbors in (1, 2, 8, 32):
        assert_matches_oracle(pos, pos, valid, num_neighbors, 0, f"k={dim} K={num_neighbors} full pass")
        ref_idx, _ = causal_knn_reference(pos[:, last:], pos, valid, num_neighbors, last)
        idx, _ = causal_knn_scan(pos[:, last:], pos, valid, num_neighbors, last)
        assert torch.equal(idx, ref_idx), (dim, num_neighbors)


@pytest.mark.parametrize("dim", [1, 2, 3])
@pytest.mark.parametrize("name", LAYOUTS)
def test_fast_equals_oracle_full_pass(geometry, name, dim):
    # batch elements: no padding, left padding, right padding, holes; K from 1 to more than N
    for length in (1, 5, 70, 301):
        pos = layout(name, 4, length, 2, dim, seed=length)
        for num_neighbors in (1, 4, 16):
            label = f"{geometry} {name} k={dim} N={length} K={num_neighbors}"
            assert_matches_oracle(pos, pos, masks(length), num_neighbors, 0, label)


@pytest.mark.parametrize("dim", [1, 2, 3])
@pytest.mark.parametrize("name", LAYOUTS)
def test_fast_equals_oracle_cached_queries(geometry, name, dim):
    length = 233
    pos = layout(name, 4, length, 2, dim, seed=7)
    for new in (1, 3, 70):
        offset = length - new
        for num_neighbors in (1, 4, 16):
            label = f"{geometry} {name} k={dim} offset={offset} K={num_neighbors}"
            assert_matches_oracle(pos[:, offset:], pos, masks(length), num_neighbors, offset, label)


@pytest.mark.parametrize("dim", [1, 2, 3])
@pytest.mark.parametrize("name", LAYOUTS)
def test_scan_equals_oracle_for_decoding_steps(name, dim):
    """The decoding-step search (`causal_knn_scan`) returns the oracle's neighbours, order and ties included."""
    length = 233
    pos = layout(name, 4, length, 2, dim, seed=8)
    for new in (1, 2, 5):
        offset = length - new
        for num_neighbors in (1, 4, 16, 300):
            ref_idx, ref_valid = causal_knn_reference(pos[:, offset:], pos, masks(length), num_neighbors, offset)
            idx, valid = causal_knn_scan(pos[:, offset:], pos, masks(length), num_neighbors, offset)
            assert torch.equal(valid, ref_valid)
            assert torch.equal(idx.masked_fill(~valid, -1), ref_idx.masked_fill(~ref_valid, -1))


def built_boxes(pos: torch.Tensor, key_valid: torch.Tensor, num_blocks: int, step: int = 3) -> BlockBoxes:
    """The box tree of the first `num_blocks` blocks, grown a few blocks at a time as a cache grows it."""
    boxes = BlockBoxes()
    for first in range(0, num_blocks, step):
        boxes.extend(pos, key_valid, first, min(first + step, num_blocks))
    return boxes


# (fanout, beam, flat maximum): the default (one flat level below 4096 blocks) and tiny trees whose beam descent
# crosses several levels on these small inputs
TREES = {"flat": (16, 8, 4096), "tree": (2, 3, 2), "tree-wide": (4, 2, 4)}


@pytest.mark.parametrize("tree", sorted(TREES))
@pytest.mark.parametrize("name", ["time", "iid", "clustered", "duplicates", "lattice", "equal"])
def test_block_decoding_search_equals_oracle_and_reads_few_candidates(name, tree, monkeypatch):
    """Decoding over the cache's box tree: the oracle's answer every step; candidates read per step stay bounded by
    the searched blocks plus the unfinished tail (not the context), box bounds by the descent, fallbacks counted."""
    fanout, beam, flat = TREES[tree]
    monkeypatch.setattr(nd, "BOX_FANOUT", fanout)
    monkeypatch.setattr(nd, "_TREE_BEAM", beam)
    monkeypatch.setattr(nd, "_FLAT_MAX_BOXES", flat)
    length, heads = 1500, 2
    pos = layout(name, 4, length, heads, 2, seed=9)
    key_valid = masks(length)
    stats: dict = {}
    for offset in range(1100, length, 37):
        boxes = built_boxes(pos, key_valid, (offset + 1) // DECODE_BLOCK)
        for num_neighbors in (1, 16):
            ref_idx, ref_valid = causal_knn_reference(
                pos[:, offset : offset + 1], pos, key_valid, num_neighbors, offset
            )
            idx, valid = causal_knn_blocks(
                pos[:, offset : offset + 1], pos, key_valid, num_neighbors, offset, boxes, stats
            )
            assert torch.equal(valid, ref_valid), (name, offset)
            assert torch.equal(idx.masked_fill(~valid, -1), ref_idx.masked_fill(~ref_valid, -1)), (name, offset)
    steps = stats["steps"]
    assert stats["candidates"] / steps <= 8 * DECODE_BLOCK + 2 * DECODE_BLOCK  # top blocks + tail, not ~1300 keys
    if tree != "flat":  # ~20 blocks: the descent bounds a few nodes per level, not every block
        assert stats["box_reads"] / steps <= flat + 5 * beam * fanout
    if name == "time":
        assert stats.get("fallbacks", 0) == 0  # time-ordered positions settle without the full scan


def test_box_tree_reads_grow_logarithmically(monkeypatch):
    """Box bounds per decoding step: O(log n) in the number of blocks once past the flat level (counted)."""
    monkeypatch.setattr(nd, "_FLAT_MAX_BOXES", 16)
    reads = {}
    for num_blocks in (64, 256, 1024):
        length = num_blocks * DECODE_BLOCK + 1
        pos = layout("time", 1, length, 1, 2, seed=3)
        key_valid = torch.ones(1, length, dtype=torch.bool)
        stats: dict = {}
        boxes = built_boxes(pos, key_valid, num_blocks, step=num_blocks)
        idx, valid = causal_knn_blocks(pos[:, -1:], pos, key_valid, 16, length - 1, boxes, stats)
        ref_idx, ref_valid = causal_knn_reference(pos[:, -1:], pos, key_valid, 16, length - 1)
        assert torch.equal(idx.masked_fill(~valid, -1), ref_idx.masked_fill(~ref_valid, -1))
        reads[num_blocks] = stats["box_reads"]
    # each 4x more blocks adds half a level of fanout 16: a constant number of reads, not 4x
    assert reads[1024] <= reads[64] + 2 * nd._TREE_BEAM * nd.BOX_FANOUT, reads
    assert reads[1024] < 1024 / 4, reads


def test_box_tree_growth_crop_and_reorder_equal_a_fresh_build(monkeypatch):
    """Growing block by block, cropping and reordering rows give the boxes a fresh build of those blocks gives."""
    monkeypatch.setattr(nd, "BOX_FANOUT", 3)
    pos = layout("iid", 3, 40 * DECODE_BLOCK, 2, 2, seed=5)
    key_valid = masks(40 * DECODE_BLOCK)[:3]

    def same(a: BlockBoxes, b: BlockBoxes):
        assert a.counts == b.counts
        for level in range(len(a.counts)):
            for x, y in zip(a.level(level), b.level(level), strict=True):
                assert torch.equal(x, y), level

    grown = built_boxes(pos, key_valid, 40, step=1)
    same(grown, built_boxes(pos, key_valid, 40, step=40))
    assert grown.counts == [40, 14, 5, 2, 1]
    low, high = grown.level(len(grown.counts) - 1)  # the root bounds every valid key
    valid = key_valid.view(3, -1, 1, 1)
    assert torch.equal(low[:, 0], pos.masked_fill(~valid, float("inf")).amin(1))
    assert torch.equal(high[:, 0], pos.masked_fill(~valid, float("-inf")).amax(1))
    grown.crop(22)
    same(grown, built_boxes(pos, key_valid, 22, step=22))
    grown.extend(pos, key_valid, 22, 31)
    same(grown, built_boxes(pos, key_valid, 31, step=31))
    order = torch.tensor([2, 0, 0])
    grown.apply(lambda t: t.index_select(0, order))
    same(grown, built_boxes(pos[order], key_valid[order], 31, step=31))


def test_reference_pads_early_query_chunks():
    """More neighbours than keys seen by an early chunk of queries: padded with invalid slots, not a crash."""
    pos = layout("time", 1, 300, 1, 2)
    idx, valid = causal_knn_reference(pos, pos, torch.ones(1, 300, dtype=torch.bool), 200, 0, query_chunk=128)
    assert idx.shape == (1, 300, 1, 200)
    assert bool((valid.sum(-1).view(-1) == torch.arange(1, 301).clamp_max(200)).all())


def test_fast_equals_oracle_queries_differ_from_keys():
    # the contract allows query positions other than the keys' own (e.g. a moved query)
    keys = layout("time", 1, 300, 3, 2)
    queries = keys[:, 200:] + 0.3 * torch.randn(1, 100, 3, 2, generator=torch.Generator().manual_seed(3))
    assert_matches_oracle(queries, keys, torch.ones(1, 300, dtype=torch.bool), 8, 200, "moved queries")


@pytest.mark.parametrize("name", ["time", "iid", "duplicates", "lattice"])
def test_fast_equals_oracle_long(name):
    # default geometry, several levels of dyadic blocks and windows that grow within big blocks
    pos = layout(name, 1, 2600, 2, 2, seed=5)
    key_valid = masks(2600)[3:]
    assert_matches_oracle(pos, pos, key_valid, 16, 0, f"long {name}")


def test_fast_more_neighbours_than_the_dense_span():
    # default geometry: K > (P+1)·L dense slots (the oracle needs offset + 128 >= K, so queries start late)
    pos = layout("time", 1, 400, 2, 2)
    assert_matches_oracle(pos[:, 200:], pos, masks(400)[3:], 150, 200, "K=150")


@pytest.mark.parametrize("name", ["time", "iid", "duplicates"])
def test_fast_is_causal(geometry, name):
    length, cut = 260, 150
    pos = layout(name, 4, length, 2, 2)
    key_valid = masks(length)
    idx, valid = causal_knn_fast(pos, pos, key_valid, 8)
    moved = pos.clone()
    moved[:, cut:] = 100 * torch.randn(4, length - cut, 2, 2) if name != "duplicates" else 0.0
    moved_valid = key_valid.clone()
    moved_valid[:, cut:] = ~moved_valid[:, cut:]
    idx2, valid2 = causal_knn_fast(moved, moved, moved_valid, 8)
    assert torch.equal(valid[:, :cut], valid2[:, :cut])
    before, after = idx.masked_fill(~valid, -1)[:, :cut], idx2.masked_fill(~valid2, -1)[:, :cut]
    assert torch.equal(before, after)


def run_fast(pos: torch.Tensor, num_neighbors: int = 16) -> dict:
    stats: dict = {}
    causal_knn_fast(pos, pos, torch.ones(pos.shape[:2], dtype=torch.bool), num_neighbors, stats=stats)
    return stats


def test_stats_count_the_work():
    length = 4096
    # a pure time line: the K nearest earlier entities are the K most recent, all in the dense leaves, and
    # every older block is excluded by its box: no block is searched, nothing falls back
    line = torch.arange(length, dtype=torch.float32).view(1, -1, 1, 1).expand(1, length, 2, 2).clone()
    line[..., 1] = 0.0
    stats = run_fast(line)
    assert stats["queries"] == 2 * length
    assert stats["block_visits"] == 0 and stats["fallbacks"] == 0
    # the model's layout: some block searches need a second window; far fewer candidates than the oracle's
    # N²/2 (query, key) pairs
    stats = run_fast(layout("time", 1, length, 2, 2))
    print("time", stats)
    assert 0 < stats["fallbacks"] <= stats["block_visits"] <= stats["queries"] * 6
    assert stats["candidates"] < 0.1 * stats["queries"] * length / 2
    # i.i.d. points ignore time: every block is searched and first windows rarely settle; still exact
    stats = run_fast(layout("iid", 1, length, 2, 2))
    print("iid", stats)
    assert stats["fallbacks"] > 0.5 * stats["block_visits"] > 0
    # counters accumulate over calls into the same dict
    before = stats["queries"]
    causal_knn_fast(line, line, torch.ones(1, length, dtype=torch.bool), 16, stats=stats)
    assert stats["queries"] == before + 2 * length


def test_dispatch():
    pos = layout("time", 4, 300, 2, 2)
    key_valid = masks(300)
    ref = causal_knn_reference(pos, pos, key_valid, 8)
    for method in ("reference", "fast", "auto"):
        idx, valid = causal_knn(pos, pos, key_valid, 8, 0, method)
        assert torch.equal(valid, ref[1])
        assert torch.equal(idx.masked_fill(~valid, -1), ref[0].masked_fill(~valid, -1))
    step = causal_knn(pos[:, -1:], pos, key_valid, 8, 299, "auto")  # one decoding step
    assert torch.equal(step[0].masked_fill(~step[1], -1), ref[0][:, -1:].masked_fill(~ref[1][:, -1:], -1))
    with pytest.raises(ValueError):
        causal_knn(pos, pos, key_valid, 8, 0, "approximate")


def test_auto_dispatch_runs_the_oracle_up_to_a_training_context_on_an_accelerator(monkeypatch):
    """The oracle's few batched kernels against the fast search's many small ones and host syncs: the CPU keeps the
    fast search from 64 x 64 pairs, an accelerator runs the oracle up to 1024 x 1024 (a 256-byte context included)."""
    assert nd.reference_max_pairs(torch.device("cpu")) == 64 * 64
    assert nd.reference_max_pairs(torch.device("cuda")) == 1024 * 1024
    calls = []
    monkeypatch.setattr(nd, "causal_knn_reference", lambda *args: calls.append("reference"))
    monkeypatch.setattr(nd, "causal_knn_fast", lambda *args: calls.append("fast"))
    monkeypatch.setattr(nd, "reference_max_pairs", lambda device: 256 * 256)  # as on an accelerator
    pos, key_valid = layout("time", 1, 256, 2, 2), masks(256)
    nd.causal_knn(pos, pos, key_valid, 8)
    nd.causal_knn(layout("time", 1, 257, 2, 2), layout("time", 1, 257, 2, 2), masks(257), 8)
    assert calls == ["reference", "fast"]


def test_fast_handles_empty_and_degenerate_inputs():
    pos = torch.zeros(1, 0, 2, 2)
    idx, valid = causal_knn_fast(pos, pos, torch.ones(1, 0, dtype=torch.bool), 4)
    assert idx.shape == (1, 0, 2, 0) and valid.shape == (1, 0, 2, 0)
    pos = layout("iid", 2, 50, 2, 2)
    none_valid = torch.zeros(2, 50, dtype=torch.bool)
    idx, valid = causal_knn_fast(pos, pos, none_valid, 4)
    assert not valid.any()
    assert_matches_oracle(pos, pos, none_valid, 4, 0, "no valid key")


@pytest.mark.parametrize("config_name", ["k3-mem-residual", "k1-mem-seed", "k2-queryflow-mem-residual"])
def test_model_with_fast_search_equals_reference(config_name):
    sequences = [random_ids(1, n, seed=n)[0] for n in (300, 211)]
    ids, mask = pad_batch(sequences, "left", garbage=True)
    real = mask.bool()
    logits = {}
    for method in ("reference", "fast"):
        model = make_model(tiny_config(config_name, neighbor_search=method, num_neighbors=16))
        with torch.no_grad():
            logits[method] = model(ids, attention_mask=mask).logits
    diff = max_diff(logits["fast"][real], logits["reference"][real])
    print(f"{config_name}: largest logit difference fast vs reference {diff}")
    assert diff <= 1e-5
    # cached decoding with the fast search, in chunks of mixed sizes, equals the full pass
    cache, parts, start = None, [], 0
    with torch.no_grad():
        for size in (150, 7, 1, 60, 1, 81):
            out = model(ids[:, start : start + size], attention_mask=mask[:, : start + size], cache=cache)
            cache, start = out.cache, start + size
            parts.append(out.logits)
    diff = max_diff(torch.cat(parts, 1)[real], logits["fast"][real])
    print(f"{config_name}: largest logit difference cached vs full pass {diff}")
    assert diff <= 1e-4


@pytest.mark.parametrize("name", ["time", "iid", "clustered", "duplicates", "lattice", "equal"])
def test_step_block_search_equals_oracle_where_it_settles(name):
    """The sync-free block search of compiled decoding, over the tree's whole buffers: where it reports `settled` its
    answer is the oracle's, also where the query completes a block that is already in the tree, and on the model's
    time-ordered layout it settles (elsewhere the caller falls back to the scan, as the eager search)."""
    length, heads = 1500, 2
    pos, key_valid = layout(name, 4, length, heads, 2, seed=9), masks(length)
    settled_steps = offsets = 0
    for offset in [*range(1100, length, 37), 20 * DECODE_BLOCK - 1, 21 * DECODE_BLOCK]:
        for completed in {offset // DECODE_BLOCK, (offset + 1) // DECODE_BLOCK}:  # as the one call, as layer by layer
            boxes = built_boxes(pos, key_valid, completed)
            levels = nd.step_boxes(boxes)
            assert levels is not None and levels[2].shape[1] > boxes.num_blocks  # whole buffers, capacity to spare
            ref_idx, ref_valid = causal_knn_reference(pos[:, offset : offset + 1], pos, key_valid, 16, offset)
            query = pos[:, offset : offset + 1]
            idx, valid, settled = nd.causal_knn_step_blocks(query, pos, key_valid, 16, offset, *levels)
            offsets += 1
            if bool(settled):
                settled_steps += 1
                assert torch.equal(valid, ref_valid), (name, offset)
                assert torch.equal(idx.masked_fill(~valid, -1), ref_idx.masked_fill(~ref_valid, -1)), (name, offset)
    if name == "time":
        assert settled_steps == offsets


def test_step_boxes_reads_whole_buffers_with_empty_boxes_past_the_counts(monkeypatch):
    """The buffers a compiled step reads hold empty boxes past each level's count, also after a crop; past
    `_FLAT_MAX_BOXES` nodes above the blocks there are none (the eager descent starts higher)."""
    pos, key_valid = layout("iid", 2, 40 * DECODE_BLOCK, 2, 2, seed=5), masks(40 * DECODE_BLOCK)[:2]
    boxes = built_boxes(pos, key_valid, 40, step=7)
    boxes.crop(23)
    low1, high1, low0, high0 = nd.step_boxes(boxes)
    for low, high, count in ((low1, high1, boxes.counts[1]), (low0, high0, 23)):
        assert torch.equal(low[:, :count], boxes.level(0 if low is low0 else 1)[0])
        assert (low[:, count:] == float("inf")).all() and (high[:, count:] == float("-inf")).all()
        assert low[:, count:].numel() > 0
    monkeypatch.setattr(nd, "_FLAT_MAX_BOXES", 1)
    assert nd.step_boxes(boxes) is None
