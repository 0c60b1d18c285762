"""Causal K-nearest-neighbour search over entity positions.

Axis legend: B batch, N new (query) entities, T all entities (cached + new), H heads, k pos_dim,
K neighbours.

Query `i` (0 <= i < N) sits at global index `query_offset + i` of the key axis; it may only select keys
`j <= query_offset + i` whose `key_valid[b, j]` is True. Among keys at equal distance the more recent
(larger j) wins. Indices carry no gradient: positions get theirs through the kernel weights of the chosen
neighbours.

`causal_knn_reference` is the brute-force oracle; `causal_knn_fast` is exact too (same result for every
layout) and sub-quadratic on time-ordered layouts; `causal_knn` dispatches.
"""

import torch


def causal_knn_reference(
    query_pos: torch.Tensor,
    key_pos: torch.Tensor,
    key_valid: torch.Tensor,
    num_neighbors: int,
    query_offset: int = 0,
    query_chunk: int = 128,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Brute-force exact causal kNN: the oracle every faster search is tested against.

    Args:
        query_pos: `(B, N, H, k)` positions of the new entities.
        key_pos: `(B, T, H, k)` positions of all entities (cached then new), `T >= query_offset + N`.
        key_valid: `(B, T)` bool, False for padding entities (never anyone's neighbour).
        num_neighbors: K.
        query_offset: global index of query 0 on the key axis.
        query_chunk: queries processed at once; memory is O(B·H·query_chunk·T).

    Returns:
        indices `(B, N, H, K')` (long, into the key axis) and valid `(B, N, H, K')` (bool), with
        `K' = min(K, query_offset + N)`, ordered nearest first. Slots beyond the number of valid earlier keys
        are marked invalid.
    """
    batch, num_queries, num_heads, _ = query_pos.shape
    width = min(num_neighbors, query_offset + num_queries)
    indices, valid = [], []
    with torch.no_grad():
        for start in range(0, num_queries, query_chunk):
            stop = min(start + query_chunk, num_queries)
            num_keys = query_offset + stop
            q = query_pos[:, start:stop].transpose(1, 2).float()  # (B, H, n, k)
            keys = key_pos[:, :num_keys].transpose(1, 2).float()  # (B, H, t, k)
            # flip the key axis so that a stable ascending sort prefers the more recent key on ties
            keys = keys.flip(2)
            dist = _sq_dist(q.unsqueeze(3).unbind(-1), keys.unsqueeze(2).unbind(-1))  # (B, H, n, t)
            key_index = torch.arange(num_keys - 1, -1, -1, device=q.device)  # flipped global index
            query_index = torch.arange(start, stop, device=q.device) + query_offset
            allowed = (key_index.view(1, -1) <= query_index.view(-1, 1)).view(1, 1, stop - start, num_keys)
            allowed = allowed & key_valid[:, :num_keys].flip(1).view(batch, 1, 1, num_keys)
            dist = dist.masked_fill(~allowed, float("inf"))
            order = torch.sort(dist, dim=-1, stable=True).indices[..., :width]  # (B, H, n, <= K')
            chosen = allowed.expand_as(dist).gather(-1, order)
            if order.shape[-1] < width:  # an early query chunk has fewer than K' keys: pad with invalid slots
                missing = order.new_zeros(*order.shape[:-1], width - order.shape[-1])
                order, chosen = torch.cat([order, missing], -1), torch.cat([chosen, missing.bool()], -1)
            indices.append((num_keys - 1 - order).permute(0, 2, 1, 3))
            valid.append(chosen.permute(0, 2, 1, 3))
    return torch.cat(indices, 1), torch.cat(valid, 1)


# ----------------------------------------------------------------------------------------------------------
# Fast exact search. Axes: R = B·H rows (batch element, head), Q = R·N queries (query q = r·N + i),
# L leaf size, S block size, u blocks of a level.

_LEAF = 64  # L: entities per leaf block
_PREVIOUS = 1  # P: leaves before a query's own leaf that are searched densely with it
_WINDOW = 64  # entries of a block's coordinate-0 order in the first window searched around a query
_BUDGET = 1 << 20  # candidate slots evaluated at once (bounds temporaries; small buffers are reused)
_NO_KEY = torch.iinfo(torch.int64).max  # sort key of an empty or invalid slot
_NO_INDEX = 1 << 40  # index of a missing K-th neighbour: above every real index
# "auto" uses the oracle up to this many (query, key) pairs (measured crossover, 16 x 4 rows: oracle 8.5 ms vs fast
# 10.1 ms at 64 x 64, 36.8 vs 19.5 ms at 128 x 128, 86.8 vs 42.6 ms at 256 x 256)
_REFERENCE_MAX_PAIRS = 64 * 64
# the same on an accelerator, where the oracle's few large batched kernels beat the fast search's many small ones and
# host syncs up to about a training context (its largest buffer: B·H·128·T floats per query chunk)
_ACCELERATOR_REFERENCE_MAX_PAIRS = 1024 * 1024


def _sq_dist(query: list, key: list) -> torch.Tensor:
    """Squared distance from per-coordinate tensors, summed coordinate by coordinate in order.

    Every search computes distances with it, the oracle included, so all round alike: `pow(2).sum(-1)` may add in
    another order (on an AVX CPU it does for 5-7 coordinates) and then picks another of two near-tied keys. Rounding
    is monotone, so a point whose per-coordinate gaps to the query are at least `|query - key|` never gets a smaller
    computed distance (the bounds rely on it).
    """
    dist = (query[0] - key[0]).pow_(2)
    for q, k in zip(query[1:], key[1:], strict=True):
        dist += (q - k).pow_(2)
    return dist


def _sort_keys(dist: torch.Tensor, index: torch.Tensor, ok: torch.Tensor) -> torch.Tensor:
    """int64 keys in the oracle's order: nearer first, the larger index first among equal distances.

    `dist >= 0`, so its float bits order like the floats: they fill the high 32 bits, `2^32 - 1 - index` the low ones
    (`0 <= index < 2^32`). Written without a 32-bit mask constant: compiled for CUDA, such a literal next to a 32-bit
    index variable fails in Triton ("out of range for type int32"). `ok` False: last."""
    key = dist.view(torch.int32).long().add_(1).bitwise_left_shift_(32).sub_(index).sub_(1)
    return key.masked_fill_(~ok, _NO_KEY)


def _key_index(key: torch.Tensor) -> torch.Tensor:
    """The index held by a `_sort_keys` key."""
    return (key >> 32).add_(1).bitwise_left_shift_(32).sub_(key).sub_(1)


def _kth(kth_key: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Squared distance and index of K-th best candidates from their keys; `(inf, _NO_INDEX)` if missing."""
    missing = kth_key == _NO_KEY
    dist = (kth_key >> 32).to(torch.int32).view(torch.float32).masked_fill(missing, float("inf"))
    return dist, _key_index(kth_key).masked_fill_(missing, _NO_INDEX)


def _ordered_bits(x: torch.Tensor) -> torch.Tensor:
    """float32 -> int64 in `[1, 2^32)`, same order (-0 == +0), so floats can be searched inside int keys."""
    bits = x.view(torch.int32).long()
    return torch.where(bits >= 0, bits, -(bits & 0x7FFFFFFF)) + (1 << 31)


def _chunks(count: int, width: int) -> list[slice]:
    """Slices of at most `_BUDGET // width` items covering `range(count)`."""
    step = max(1, _BUDGET // max(width, 1))
    return [slice(start, min(start + step, count)) for start in range(0, count, step)]


class _Search:
    """The flattened problem and, per query, its K' best candidate keys so far (unordered) and the K-th."""

    def __init__(self, query_pos, key_pos, key_valid, query_offset: int, width: int, stats: dict):
        self.batch, self.num_new, self.heads, self.dim = query_pos.shape
        self.rows, self.offset, self.stats = self.batch * self.heads, query_offset, stats
        self.num_keys = key_pos.shape[1]
        shape = (self.rows, -1, self.dim)
        self.keys = key_pos.detach().float().transpose(1, 2).reshape(shape)  # (R, T, k)
        self.valid = key_valid.bool().unsqueeze(1).expand(-1, self.heads, -1).reshape(self.rows, -1)  # (R, T)
        self.queries = query_pos.detach().float().transpose(1, 2).reshape(shape)  # (R, N, k)
        self.query_cols = [self.queries[..., c].flatten() for c in range(self.dim)]  # k × (Q,)
        count, device = self.rows * self.num_new, query_pos.device
        self.best = torch.full((count, width), _NO_KEY, device=device)  # (Q, K')
        self.kth = torch.full((count,), _NO_KEY, device=device)  # (Q,)

    def position(self, qid: torch.Tensor) -> torch.Tensor:
        """Key-axis index `g` of queries `qid`."""
        return qid % self.num_new + self.offset

    def merge(self, qid: torch.Tensor, cand: torch.Tensor) -> None:
        """Merge candidate keys `(q, c)` of the distinct queries `qid` `(q,)` into their best K'."""
        merged = torch.cat([self.best[qid], cand], dim=1)
        best = merged.topk(self.best.shape[1], dim=1, largest=False, sorted=False).values
        self.best[qid] = best
        self.kth[qid] = best.max(dim=1).values
        self.stats["candidates"] += cand.numel()

    def result(self) -> tuple[torch.Tensor, torch.Tensor]:
        """`(B, N, H, K')` indices (invalid slots point at the query itself) and valid mask, nearest first."""
        indices, valid = torch.empty_like(self.best), torch.empty_like(self.best, dtype=torch.bool)
        for part in _chunks(self.best.shape[0], self.best.shape[1]):  # small chunks: no big temporaries
            best = self.best[part].sort(dim=1).values
            valid[part] = best != _NO_KEY
            own = self.position(torch.arange(part.start, part.stop, device=best.device)).unsqueeze(1)
            indices[part] = torch.where(valid[part], _key_index(best), own)
        shape = (self.batch, self.heads, self.num_new, self.best.shape[1])
        return indices.view(shape).permute(0, 2, 1, 3), valid.view(shape).permute(0, 2, 1, 3)


def _dense_search(search: _Search) -> None:
    """Brute force over each query's own leaf and the P leaves before it: keys `[(g // L - P)·L, g]`.

    Queries are padded to whole leaves; padded leaf `a` meets the keys `[(a - P)·L, (a + 1)·L)`."""
    rows, num_new, dim, width = search.rows, search.num_new, search.dim, search.best.shape[1]
    span = (_PREVIOUS + 1) * _LEAF
    first = search.offset // _LEAF  # leaf of query 0
    front = search.offset - first * _LEAF  # padding queries before query 0
    leaves = -(-(front + num_new) // _LEAF)
    queries = torch.nn.functional.pad(search.queries, (0, 0, front, leaves * _LEAF - front - num_new))
    queries = queries.view(rows, leaves, _LEAF, dim)
    start, stop = (first - _PREVIOUS) * _LEAF, (first + leaves) * _LEAF  # key span of the padded leaves
    pad = (max(0, -start), max(0, stop - search.num_keys))
    keys = torch.nn.functional.pad(search.keys[:, max(start, 0) : stop], (0, 0, *pad))
    keys = keys.unfold(1, span, _LEAF)  # (R, leaves, k, span)
    key_ok = torch.nn.functional.pad(search.valid[:, max(start, 0) : stop], pad).unfold(1, span, _LEAF)
    steps = torch.arange(span, device=keys.device)
    best = search.best.view(rows, num_new, width)
    for part in _chunks(leaves, rows * _LEAF * span):
        q, pos = queries[:, part].unsqueeze(4), keys[:, part].unsqueeze(2)  # (R,c,L,k,1), (R,c,1,k,span)
        dist = _sq_dist([q[..., c, :] for c in range(dim)], [pos[..., c, :] for c in range(dim)])
        leaf = torch.arange(part.start, part.stop, device=keys.device).view(-1, 1, 1) + first  # (c, 1, 1)
        index = (leaf - _PREVIOUS) * _LEAF + steps  # (c, 1, span)
        g = leaf * _LEAF + torch.arange(_LEAF, device=keys.device).view(-1, 1)  # (c, L, 1)
        cand = _sort_keys(dist, index, key_ok[:, part].unsqueeze(2) & (index <= g))  # (R,c,L,span)
        if span < width:  # fewer dense slots than neighbours: pad (F.pad's float value cannot hold _NO_KEY)
            cand = torch.cat([cand, cand.new_full((*cand.shape[:-1], width - span), _NO_KEY)], dim=-1)
        top = cand.topk(width, dim=-1, largest=False, sorted=False).values.flatten(1, 2)  # (R, c·L, K')
        lo, hi = max(part.start * _LEAF - front, 0), min(part.stop * _LEAF - front, num_new)  # real queries
        shift = front - part.start * _LEAF
        best[:, lo:hi] = top[:, lo + shift : hi + shift]
    search.kth.copy_(search.best.max(dim=1).values)
    search.stats["candidates"] += rows * leaves * _LEAF * span


class _Level:
    """Search structure of the dyadic blocks `blocks` `(u,)` of S entities (block b: keys `[b·S, (b+1)·S)`).

    Built from each block's own entities only. Per row and block, entries sorted by coordinate 0 (stable;
    invalid keys as +inf, last, never candidates): their coordinates, validity and reversed key index, the
    running max of the key index from the left and from the right, and the bounding boxes of the valid
    entities in its first 1, 2, ... leaves. Flat arrays are indexed by `block·S + entry` with flat block
    `r·u + slot`."""

    def __init__(self, search: _Search, blocks: torch.Tensor, size: int):
        rows, dim, device = search.rows, search.dim, blocks.device
        members = (blocks.unsqueeze(1) * size + torch.arange(size, device=device)).flatten()  # (u·S,)
        pos = search.keys[:, members].view(rows, -1, size, dim)  # (R, u, S, k)
        ok = search.valid[:, members].view(rows, -1, size)  # (R, u, S)
        x0, order = torch.sort(pos[..., 0].masked_fill(~ok, float("inf")), dim=-1, stable=True)
        index = members.view(1, -1, size).expand(rows, -1, -1).gather(-1, order)  # (R, u, S)
        self.size = size
        self.cols = [x0.flatten()] + [pos[..., c].gather(-1, order).flatten() for c in range(1, dim)]
        self.ok = ok.gather(-1, order).flatten()
        self.index = index.flatten()
        self.max_left = index.cummax(-1).values.flatten()
        self.max_right = index.flip(-1).cummax(-1).values.flip(-1).flatten()
        block_id = torch.arange(ok.shape[0] * ok.shape[1], device=device).repeat_interleave(size)
        self.search_keys = (block_id << 32) | _ordered_bits(self.cols[0])  # ascending
        leaf_pos = pos.view(rows, ok.shape[1], -1, _LEAF, dim)  # (R, u, S/L, L, k)
        leaf_ok = ok.view(*leaf_pos.shape[:-1], 1)
        low = leaf_pos.masked_fill(~leaf_ok, float("inf")).amin(3).cummin(2).values  # (R, u, S/L, k)
        high = leaf_pos.masked_fill(~leaf_ok, -float("inf")).amax(3).cummax(2).values
        self.low, self.high = low.flatten(0, 1), high.flatten(0, 1)  # box of the first j + 1 leaves

    def box_bound(self, query: list, block: torch.Tensor, leaves: torch.Tensor) -> torch.Tensor:
        """Lower bound `(q,)` on the squared distance from queries (k × `(q,)`) to the entities in the first
        `leaves` leaves of `block` (both `(q,)`, `leaves >= 1`)."""
        low, high = self.low[block, leaves - 1], self.high[block, leaves - 1]  # (q, k)
        gaps = [torch.maximum(low[:, c] - x, x - high[:, c]).clamp_(min=0) for c, x in enumerate(query)]
        return _sq_dist(gaps, [0.0] * len(gaps))

    def side_done(self, query0, dist_k, index_k, base, edge, left: bool) -> torch.Tensor:
        """Whether no entry left of `edge` (left) / from `edge` on (right) can beat the K-th candidate.

        Such an entry's coordinate 0 is <= / >= that of the entry next to the edge, so its distance is at
        least that gap; at an equal distance it loses if no entry there has an index above the K-th's."""
        end = (edge == 0) if left else (edge == self.size)
        at = base + (edge - 1 if left else edge).clamp(0, self.size - 1)
        gap2 = ((query0 - self.cols[0][at]) if left else (self.cols[0][at] - query0)).pow_(2)
        newest = (self.max_left if left else self.max_right)[at]
        return end | (gap2 > dist_k) | ((gap2 == dist_k) & (newest < index_k))


class _Windows:
    """Per (query, block) pair, a window `[lo, hi)` of the block's coordinate-0 order, all `(a,)`."""

    def __init__(self, search: _Search, level: _Level, qid: torch.Tensor, block: torch.Tensor):
        self.search, self.level, self.qid = search, level, qid
        self.base = block * level.size
        self.query0 = search.query_cols[0][qid]
        where = torch.searchsorted(level.search_keys, (block << 32) | _ordered_bits(self.query0), right=True)
        self.lo = where - self.base  # entries before `lo` have coordinate 0 <= the query's
        self.hi = self.lo.clone()
        self.covered = (search.position(qid) // _LEAF - _PREVIOUS).clamp(min=0) * _LEAF  # dense from here

    def unsettled(self, pending: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The windows of `pending` that may still miss a neighbour, and which of their sides to grow."""
        dist_k, index_k = _kth(self.search.kth[self.qid[pending]])
        args = (self.query0[pending], dist_k, index_k, self.base[pending])
        left = ~self.level.side_done(*args, self.lo[pending], left=True)
        right = ~self.level.side_done(*args, self.hi[pending], left=False)
        keep = left | right
        return pending[keep], left[keep], right[keep]

    def grow(self, rows: torch.Tensor, left: torch.Tensor, right: torch.Tensor, step: int) -> None:
        """Extend windows `rows` by `step` entries on the flagged sides and merge the new entries."""
        size, lo, hi = self.level.size, self.lo[rows], self.hi[rows]
        new_lo = torch.where(left, (lo - step).clamp(min=0), lo)
        new_hi = torch.where(right, (hi + step).clamp(max=size), hi)
        offsets = torch.arange(step, device=rows.device)
        entry = torch.cat([(lo - step).unsqueeze(1) + offsets, hi.unsqueeze(1) + offsets], dim=1)  # (a, 2s)
        flat = self.base[rows].unsqueeze(1) + entry.clamp(0, size - 1)
        index = self.level.index[flat]
        ok = (entry >= new_lo.unsqueeze(1)) & (entry < new_hi.unsqueeze(1)) & self.level.ok[flat]
        ok &= index < self.covered[rows].unsqueeze(1)  # not already a dense candidate
        qid = self.qid[rows]
        query = [x[qid].unsqueeze(1) for x in self.search.query_cols]
        dist = _sq_dist(query, [col[flat] for col in self.level.cols])
        self.search.merge(qid, _sort_keys(dist, index, ok))
        self.lo[rows], self.hi[rows] = new_lo, new_hi


def _window_search(search: _Search, level: _Level, qid: torch.Tensor, block: torch.Tensor) -> None:
    """Exact search of one block for each query (`qid`, flat `block`, both `(a,)`).

    A window of the block's coordinate-0 order, starting empty at the query's coordinate 0, grows
    (doubling) on each side whose remaining entries could still beat the K-th candidate, until neither
    side can; it may end up covering the whole block (brute force on it), so the search is always exact."""
    windows = _Windows(search, level, qid, block)
    pending = torch.arange(qid.shape[0], device=qid.device)
    step, rounds = max(_WINDOW // 2, 1), 0
    while True:
        pending, left, right = windows.unsettled(pending)
        if pending.numel() == 0:
            return
        if rounds == 1:  # the first window did not settle these
            search.stats["fallbacks"] += pending.numel()
        for part in _chunks(pending.numel(), 2 * step):
            windows.grow(pending[part], left[part], right[part], step)
        step, rounds = step * 2, rounds + 1


def _level_search(search: _Search, level: int) -> None:
    """For each query whose leaf number `m = g // L` has bit `level` set: the dyadic block of `L·2^level`
    keys ending at `(m >> level << level)·L`, unless it lies among the densely searched keys or the box of
    its leaves not searched densely is no nearer than the K-th candidate (those entities are all older than
    every candidate, so they lose ties too)."""
    size = _LEAF << level
    m = (torch.arange(search.num_new, device=search.best.device) + search.offset) // _LEAF
    start = ((m >> level) - 1) * size
    new = ((((m >> level) & 1) == 1) & (start < (m - _PREVIOUS) * _LEAF)).nonzero().squeeze(1)  # (n,)
    if new.numel() == 0:
        return
    blocks, slot = torch.unique(start[new] // size, return_inverse=True)
    structure = _Level(search, blocks, size)
    row = torch.arange(search.rows, device=new.device).unsqueeze(1)
    qid, block = (row * search.num_new + new).flatten(), (row * blocks.shape[0] + slot).flatten()  # (R·n,)
    unsearched = ((m[new] - _PREVIOUS) * _LEAF - start[new]).clamp(max=size) // _LEAF  # leaves not dense
    leaves = unsearched.expand(search.rows, -1).flatten()  # (R·n,)
    for part in _chunks(qid.numel(), 1):
        q, b = qid[part], block[part]
        bound = structure.box_bound([x[q] for x in search.query_cols], b, leaves[part])
        near = bound < _kth(search.kth[q])[0]
        search.stats["block_visits"] += int(near.sum())
        _window_search(search, structure, q[near], b[near])


def causal_knn_fast(
    query_pos: torch.Tensor,
    key_pos: torch.Tensor,
    key_valid: torch.Tensor,
    num_neighbors: int,
    query_offset: int = 0,
    stats: dict | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Exact causal kNN: the result of `causal_knn_reference` (indices, order, tie rule) for every layout,
    in ~O(N log N) time and O(N·K) memory when coordinate 0 roughly follows time (as the model's does).

    Algorithm. Fixed, data-independent time blocks: leaves of L entities and dyadic blocks
    `[a·L·2^l, (a+1)·L·2^l)`. The past of query `g` (leaf `m = g // L`) is the keys `[m·L, g]` plus one
    complete dyadic block per set bit `l` of `m` (the binary expansion of `m`; the lowest bit is the newest
    block). Each query keeps its K' best candidates as int64 keys (squared-distance bits, then the reversed
    index), so `topk` over keys reproduces the oracle's order and tie rule.
      1. Brute force (dense, no gathers) over the own leaf up to `g` and the P leaves before it.
      2. For l = 0, 1, ...: each query's level-l block, newest first, less the leaves step 1 covered. Skip
         it when the lower bound from the bounding box of those entities is >= the K-th candidate's
         distance: they are older than every candidate, so they lose ties too. Otherwise search it through
         its coordinate-0 order: a window around the query's coordinate 0 grows until the coordinate-0 gap
         to the entries outside proves that none of them can beat the K-th candidate
         (`_Level.side_done`), in the worst case until it covers the block.
    Exact: every earlier valid entity is a candidate or proven to sort after the K-th (the bounds use the
    oracle's float formula, rounding is monotone, and the K-th only improves); there is no approximate path.
    Causal: block boundaries are fixed; a block is searched only by queries after its end, and its order,
    box and index maxima come from its own entities; nothing is computed across the sequence.

    Cost: time-ordered layouts need `(P+1)·L` dense candidates plus about one window per query and skip old
    blocks by their box. Without time order (i.i.d.) the windows grow to a strip of every block, about
    `N^(1-1/k)` candidates per query: exact, far below brute force for k <= 2, near it for k = 4.
    `stats` (optional dict) accumulates `queries`, `candidates` (distance evaluations), `block_visits`
    (blocks searched, not skipped by their box) and `fallbacks` (block searches whose first window did not
    settle and had to grow; growing is exact, it only costs time).

    Args and returns: as `causal_knn_reference`; invalid slots point at the query itself.
    """
    stats = stats if stats is not None else {}
    for name in ("queries", "candidates", "block_visits", "fallbacks"):
        stats.setdefault(name, 0)
    width = min(num_neighbors, query_offset + query_pos.shape[1])
    with torch.no_grad():
        search = _Search(query_pos, key_pos, key_valid, query_offset, width, stats)
        stats["queries"] += search.best.shape[0]
        if width > 0 and search.best.shape[0] > 0:
            _dense_search(search)
            for level in range(((query_offset + search.num_new - 1) // _LEAF).bit_length()):
                _level_search(search, level)
        return search.result()


def causal_knn_scan(
    query_pos: torch.Tensor,
    key_pos: torch.Tensor,
    key_valid: torch.Tensor,
    num_neighbors: int,
    query_offset: int = 0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Exact causal kNN for a few queries (a decoding step): one pass over the keys and an integer top-k.

    Same signature and result as `causal_knn_reference`. Each (distance, index) pair is packed into an int64 key
    that orders as the oracle does (nearer first, the larger index first among equal distances); keys are unique,
    so `topk` is exact and deterministic. O(N·T) like the oracle but without its sort: for N = 1 it reads each
    cached position once.
    """
    batch, num_queries, heads, dim = query_pos.shape
    num_keys = query_offset + num_queries
    width = min(num_neighbors, num_keys)
    device = query_pos.device
    with torch.no_grad():
        query = query_pos.float().transpose(1, 2)  # (B, H, N, k)
        keys = key_pos[:, :num_keys].float().transpose(1, 2)  # (B, H, T, k)
        # each coordinate copied contiguous: the result then is too (it follows its inputs' layout, and every
        # later pass over a (B, H, N, T) result laid out like the cache's strides is several times slower)
        coords = [keys[..., c].contiguous().unsqueeze(2) for c in range(dim)]  # (B, H, 1, T) each
        dist = _sq_dist([query[..., c, None] for c in range(dim)], coords)
        index = torch.arange(num_keys, device=device)
        key = _sort_keys(dist, index, key_valid[:, :num_keys].view(batch, 1, 1, num_keys))  # (B, H, N, T)
        if num_queries > 1:  # query i may not see the later new entities (for one query every key is earlier)
            later = torch.ones(num_queries, num_queries, dtype=torch.bool, device=device).triu_(1)
            key[..., query_offset:].masked_fill_(later, _NO_KEY)
        best = torch.topk(key, width, dim=-1, largest=False).values
        valid = best != _NO_KEY
        chosen = _key_index(best).masked_fill_(~valid, 0)
    return chosen.transpose(1, 2), valid.transpose(1, 2)


DECODE_BLOCK = 64  # entities per block of the decoding search structure kept in the cache
BOX_FANOUT = 16  # children per node of the box tree above the blocks
_DECODE_TOP_BLOCKS = 8  # blocks searched densely per decoding step (besides the unfinished tail)
_TREE_BEAM = 8  # nodes kept per tree level on the way down to the blocks
# an eager decoding step bounds every node of the lowest tree level that has at most this many; a compiled one bounds
# every node of the level above the blocks, up to this many
_FLAT_MAX_BOXES = 4096
# "auto" decoding scans every key up to this many complete blocks (2,048 keys): one pass over them costs fewer small
# operations than the tree (measured per step and layer, 4 heads: 116 vs 334 us at 1,024 keys, 206 vs 327 us at 2,048,
# 587 vs 300 us at 4,096)
_SCAN_MAX_BLOCKS = 32


def block_boxes(
    key_pos: torch.Tensor, key_valid: torch.Tensor, first: int, last: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Bounding boxes `(B, last - first, H, k)` (low, high) of the valid keys of blocks `first..last-1` of
    `DECODE_BLOCK` entities of `key_pos` `(B, T, H, k)`; a block without valid keys gets an empty box (+inf, -inf)."""
    span = slice(first * DECODE_BLOCK, last * DECODE_BLOCK)
    pos = key_pos[:, span].float()
    valid = key_valid[:, span].view(pos.shape[0], -1, 1, 1)
    blocks = (pos.shape[0], last - first, DECODE_BLOCK, *pos.shape[2:])
    low = pos.masked_fill(~valid, float("inf")).reshape(blocks).amin(2)
    high = pos.masked_fill(~valid, float("-inf")).reshape(blocks).amax(2)
    return low, high


class BlockBoxes:
    """The decoding search structure a cache layer keeps: a tree of bounding boxes.

    Level 0 holds the boxes `(B, n_0, H, k)` of the complete blocks of `DECODE_BLOCK` keys; node j of level l + 1
    bounds nodes `[j F, (j + 1) F)` of level l (F = `BOX_FANOUT`), up to a single root. Levels grow in place with
    capacity doubling, so completing a block costs O(F log n) amortised, never a copy of every box. A level's
    buffer holds empty boxes (+inf, -inf) past its count: a compiled decoding step reads whole buffers.
    """

    def __init__(self):
        self.low: list[torch.Tensor] = []  # per level, a (B, capacity, H, k) buffer
        self.high: list[torch.Tensor] = []
        self.counts: list[int] = []

    @property
    def num_blocks(self) -> int:
        return self.counts[0] if self.counts else 0

    def level(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        """`(low, high)` boxes `(B, n_l, H, k)` of level `index`."""
        count = self.counts[index]
        return self.low[index][:, :count], self.high[index][:, :count]

    def extend(self, key_pos: torch.Tensor, key_valid: torch.Tensor, first: int, last: int) -> None:
        """Add blocks `first..last-1` of `key_pos` `(B, T, H, k)` (`first` = the current block count)."""
        self._write(0, first, *block_boxes(key_pos, key_valid, first, last))
        self._refresh_parents(first, last)

    def crop(self, num_blocks: int) -> None:
        """Keep the first `num_blocks` blocks (their ancestors are rebuilt)."""
        self.counts = [min(self.num_blocks, num_blocks)]
        self.low[0][:, self.counts[0] :], self.high[0][:, self.counts[0] :] = float("inf"), float("-inf")
        del self.low[1:], self.high[1:]
        self._refresh_parents(0, self.counts[0])

    def apply(self, fn) -> None:
        """Apply a batch-first `fn` (e.g. a beam reorder) to every level."""
        self.low, self.high = (
            [capacity_dynamic(fn(t)) for t in self.low],
            [capacity_dynamic(fn(t)) for t in self.high],
        )

    def _write(self, level: int, start: int, low: torch.Tensor, high: torch.Tensor) -> None:
        stop = start + low.shape[1]
        if level == len(self.counts):
            self.low.append(low.new_empty(low.shape[0], 0, *low.shape[2:]))
            self.high.append(high.new_empty(high.shape[0], 0, *high.shape[2:]))
            self.counts.append(0)
        if stop > self.low[level].shape[1]:
            capacity = max(stop, 2 * self.low[level].shape[1], 16)
            for buffers, empty in ((self.low, float("inf")), (self.high, float("-inf"))):
                grown = buffers[level].new_full((buffers[level].shape[0], capacity, *buffers[level].shape[2:]), empty)
                grown[:, : self.counts[level]] = buffers[level][:, : self.counts[level]]
                buffers[level] = capacity_dynamic(grown)
        self.low[level][:, start:stop] = low
        self.high[level][:, start:stop] = high
        self.counts[level] = max(self.counts[level], stop)

    def _refresh_parents(self, first: int, last: int) -> None:
        """Recompute the ancestors of level-0 nodes `first..last-1`."""
        level = 0
        while self.counts[level] > 1 and last > first:
            count = self.counts[level]
            parent_first, parent_last = first // BOX_FANOUT, (last - 1) // BOX_FANOUT + 1
            span = slice(parent_first * BOX_FANOUT, min(parent_last * BOX_FANOUT, count))
            low, high = self.low[level][:, span], self.high[level][:, span]
            missing = (parent_last - parent_first) * BOX_FANOUT - low.shape[1]
            if missing:  # the last parent has fewer children: pad with empty boxes
                low = torch.cat([low, low.new_full((low.shape[0], missing, *low.shape[2:]), float("inf"))], 1)
                high = torch.cat([high, high.new_full((high.shape[0], missing, *high.shape[2:]), float("-inf"))], 1)
            groups = (low.shape[0], parent_last - parent_first, BOX_FANOUT, *low.shape[2:])
            self._write(level + 1, parent_first, low.view(groups).amin(2), high.view(groups).amax(2))
            level, first, last = level + 1, parent_first, parent_last


def capacity_dynamic(buffer: torch.Tensor, dim: int = 1) -> torch.Tensor:
    """`buffer` (a cache buffer that grows along `dim`), its capacity marked as a size of its own for compiled decoding
    steps. Unmarked, Dynamo gives sizes of equal value one symbol ("duck sizing"): a capacity of 16 or 64 would share
    the head_dim's, be specialised with it, and the step would compile again when the buffer grows (57 s in the middle
    of a generation with the benchmark's model after a short prompt)."""
    torch._dynamo.maybe_mark_dynamic(buffer, dim % buffer.dim())
    return buffer


def _box_bounds(query: torch.Tensor, low: torch.Tensor, high: torch.Tensor) -> torch.Tensor:
    """Lower bounds `(B, H, c)` of the squared distance from `query` `(B, H, k)` to any key in boxes `(B, H, c, k)`."""
    query = query.unsqueeze(2)
    gap = (low - query).clamp_min(0) + (query - high).clamp_min(0)
    return _sq_dist([gap[..., c] for c in range(gap.shape[-1])], [torch.zeros_like(gap[..., 0])] * gap.shape[-1])


def _descend(query: torch.Tensor, levels: list, stats: dict | None = None) -> tuple:
    """A beam descent of box levels `[(low, high) (B, n, H, k)]`, from the level it starts at down to the blocks:
    every node of the first level is bounded, then the `_TREE_BEAM` nearest nodes of each level open their children.
    Returns the `_DECODE_TOP_BLOCKS` blocks `(B, H, top)` with the smallest box bounds and the smallest bound `(B, H)`
    among the nodes left out on the way (None if none; keys in blocks not chosen are at least that far). Below the
    first level a chosen index may lie past the last block (a child of a partial node, or an empty box): the caller
    masks blocks past its count."""
    batch, heads, _ = query.shape
    low, high = levels[0]
    bound = _box_bounds(query, low.transpose(1, 2), high.transpose(1, 2))  # every node of the starting level
    nodes, left_out, reads = None, None, bound.shape[-1]  # nodes None: the identity (node j is bound j)
    for depth in range(len(levels)):
        keep = _DECODE_TOP_BLOCKS if depth == len(levels) - 1 else _TREE_BEAM
        if bound.shape[-1] > keep:
            best, order = torch.topk(bound, keep + 1, dim=-1, largest=False)
            left_out = best[..., keep] if left_out is None else torch.minimum(left_out, best[..., keep])
            nodes = order[..., :keep] if nodes is None else nodes.gather(-1, order[..., :keep])
        elif nodes is None:
            nodes = torch.arange(bound.shape[-1], device=query.device).expand(batch, heads, -1)
        if depth == len(levels) - 1:
            break
        nodes = (nodes.unsqueeze(-1) * BOX_FANOUT + torch.arange(BOX_FANOUT, device=query.device)).flatten(2)
        low, high = levels[depth + 1]
        inside, clamped = nodes < low.shape[1], nodes.clamp_max(low.shape[1] - 1)
        rows = torch.arange(batch, device=query.device).view(-1, 1, 1)
        head_index = torch.arange(heads, device=query.device).view(1, -1, 1)
        bound = _box_bounds(query, low[rows, clamped, head_index], high[rows, clamped, head_index])
        bound = bound.masked_fill(~inside, float("inf"))
        reads += nodes.shape[-1]
    if stats is not None:
        stats["box_reads"] = stats.get("box_reads", 0) + reads
    return nodes, left_out


def causal_knn_blocks(
    query_pos: torch.Tensor,
    key_pos: torch.Tensor,
    key_valid: torch.Tensor,
    num_neighbors: int,
    query_offset: int,
    boxes: BlockBoxes,
    stats: dict | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Exact causal kNN for one decoding query per row over the cache's box tree; result as the oracle's.

    Candidates: the unfinished tail after the complete blocks (at most one block), plus the `_DECODE_TOP_BLOCKS`
    blocks that `_descend` finds nearest. The answer is exact when every row and head found K valid candidates
    strictly nearer than every box left out (their entities cannot win, not even a tie); otherwise the step falls
    back to `causal_knn_scan` (counted in `stats["fallbacks"]`). Cost per step: O(log n) box bounds plus
    O(K + top blocks x block) distances, instead of O(T) distances and a top-k over them.
    """
    # start at the lowest level with at most _FLAT_MAX_BOXES nodes: O(_FLAT_MAX_BOXES + levels x beam x fanout) box
    # bounds, O(log n) in the number of blocks
    start = next(i for i, count in enumerate(boxes.counts) if count <= _FLAT_MAX_BOXES)
    with torch.no_grad():
        levels = [boxes.level(index) for index in range(start, -1, -1)]
        blocks, left_out = _descend(query_pos[:, -1].float(), levels, stats)
        found, valid, settled = _search_blocks(
            query_pos, key_pos, key_valid, num_neighbors, query_offset, blocks, left_out, boxes.num_blocks
        )
    if stats is not None:  # the chosen blocks and the tail, read as a whole block
        stats["steps"] = stats.get("steps", 0) + 1
        stats["candidates"] = stats.get("candidates", 0) + (blocks.shape[-1] + 1) * DECODE_BLOCK
    if not bool(settled):
        if stats is not None:
            stats["fallbacks"] = stats.get("fallbacks", 0) + 1
        return causal_knn_scan(query_pos, key_pos, key_valid, num_neighbors, query_offset)
    return found, valid


def step_boxes(boxes: BlockBoxes) -> tuple[torch.Tensor, ...] | None:
    """What a compiled decoding step descends (`causal_knn_step_blocks`): the whole buffers `(low, high)`
    `(B, capacity, H, k)` of the tree's first level above the blocks, then of the blocks, empty boxes past their
    counts; None past `_FLAT_MAX_BOXES` nodes of that level (the eager search starts higher).

    Whole buffers, not views of their filled part: a view's strides follow the capacity while its shape follows the
    count, and a compiled graph would compile again each time a buffer grows. Fixed at two levels, the step bounds
    O(n / BOX_FANOUT + beam x fanout) boxes where bounding every block box cost about 30 µs a layer more at 128k."""
    if len(boxes.counts) < 2 or boxes.counts[1] > _FLAT_MAX_BOXES:
        return None
    return boxes.low[1], boxes.high[1], boxes.low[0], boxes.high[0]


def causal_knn_step_blocks(query_pos, key_pos, key_valid, num_neighbors: int, query_offset: int, *levels):
    """`causal_knn_blocks` over the box buffers `levels` of `step_boxes`, without the fallback: tensor work only (no
    host sync, no Python state), so a compiled graph can run it. The blocks are those completed before the query
    (a block the query completes is searched as the unfinished tail). Returns the neighbours and `settled` (a 0-d
    bool): where False, the answer is `causal_knn_scan`'s instead."""
    with torch.no_grad():
        pairs = [levels[index : index + 2] for index in range(0, len(levels), 2)]
        blocks, left_out = _descend(query_pos[:, -1].float(), pairs)
        return _search_blocks(
            query_pos, key_pos, key_valid, num_neighbors, query_offset, blocks, left_out, query_offset // DECODE_BLOCK
        )


def _search_blocks(query_pos, key_pos, key_valid, num_neighbors, query_offset, blocks, left_out, num_blocks):
    """The K nearest among the chosen `blocks` `(B, H, top)` (those past the first `num_blocks` stand for none) and
    the unfinished tail after them, and whether that is exact (`settled`, a 0-d bool tensor): every K-th found is
    nearer than `left_out` `(B, H)`, the nearest box left out (None: none left out), and K candidates were found."""
    batch, num_queries, heads, dim = query_pos.shape
    num_keys = query_offset + num_queries
    query = query_pos[:, -1].float()  # (B, H, k)
    real = blocks < num_blocks  # (B, H, top)
    offsets = torch.arange(DECODE_BLOCK, device=query.device)
    chosen = blocks.clamp_max(num_blocks - 1).unsqueeze(-1) * DECODE_BLOCK + offsets
    chosen = chosen.flatten(2)  # (B, H, top * block)
    # the unfinished tail (at most DECODE_BLOCK keys) as one whole block, the keys past the last masked: a fixed shape,
    # so a compiled step has one graph whatever the tail's length (a tail of 1 would be a graph of its own)
    tail = (num_blocks * DECODE_BLOCK + offsets).expand(batch, heads, -1)
    index = torch.cat([chosen, tail], dim=-1)  # (B, H, C)
    inside = index < num_keys
    index = index.clamp_max(num_keys - 1)
    rows = torch.arange(batch, device=query.device).view(-1, 1, 1)
    cand = key_pos[rows, index, torch.arange(heads, device=query.device).view(1, -1, 1)].float()  # (B, H, C, k)
    dist = _sq_dist([query[..., c].unsqueeze(-1) for c in range(dim)], [cand[..., c] for c in range(dim)])
    ok = key_valid[rows.view(-1, 1), index.flatten(1)].view_as(index) & inside
    ok[..., : chosen.shape[-1]] &= real.repeat_interleave(DECODE_BLOCK, dim=-1)
    best = torch.topk(
        _sort_keys(dist, index, ok), min(num_neighbors, index.shape[-1]), dim=-1, largest=False
    ).values  # (B, H, K')
    kth_dist, _ = _kth(best[..., -1])
    # exact where the K-th found is nearer than every left-out box (trivially when nothing was left out)
    settled = torch.ones((), dtype=torch.bool, device=query.device) if left_out is None else (kth_dist < left_out).all()
    if best.shape[-1] < min(num_neighbors, num_keys):
        settled = torch.zeros_like(settled)
    valid = best != _NO_KEY
    found = _key_index(best).masked_fill_(~valid, 0)
    return found.unsqueeze(1), valid.unsqueeze(1), settled


def searches_box_tree(boxes: BlockBoxes | None, num_queries: int) -> bool:
    """Whether the "auto" search of `num_queries` new entities descends the cache's box tree `boxes` (a decoding step
    past `_SCAN_MAX_BLOCKS` blocks) rather than scanning every key."""
    return num_queries == 1 and boxes is not None and boxes.num_blocks > _SCAN_MAX_BLOCKS


def reference_max_pairs(device: torch.device) -> int:
    """The most (query, key) pairs for which `"auto"` runs the oracle on `device`."""
    return _REFERENCE_MAX_PAIRS if device.type == "cpu" else _ACCELERATOR_REFERENCE_MAX_PAIRS


def causal_knn(
    query_pos: torch.Tensor,
    key_pos: torch.Tensor,
    key_valid: torch.Tensor,
    num_neighbors: int,
    query_offset: int = 0,
    method: str = "auto",
    boxes: BlockBoxes | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Dispatch to the configured search; every method returns the same result.

    `"reference"`: the brute-force oracle. `"fast"`: `causal_knn_fast`. `"auto"`: for a decoding step
    `causal_knn_blocks` over the cache's box tree past `_SCAN_MAX_BLOCKS` blocks (else `causal_knn_scan`, as for two
    queries), the oracle for small problems (up to 64 x 64 pairs on the CPU, 1024 x 1024 on an accelerator), else
    the fast search."""
    if method not in ("auto", "fast", "reference"):
        raise ValueError(f"unknown neighbour search {method!r}")
    num_queries = query_pos.shape[1]
    if method == "reference":
        return causal_knn_reference(query_pos, key_pos, key_valid, num_neighbors, query_offset)
    if method == "auto" and searches_box_tree(boxes, num_queries):
        return causal_knn_blocks(query_pos, key_pos, key_valid, num_neighbors, query_offset, boxes)
    if method == "auto" and num_queries <= 2:
        return causal_knn_scan(query_pos, key_pos, key_valid, num_neighbors, query_offset)
    if method == "auto" and num_queries * (query_offset + num_queries) <= reference_max_pairs(query_pos.device):
        return causal_knn_reference(query_pos, key_pos, key_valid, num_neighbors, query_offset)
    return causal_knn_fast(query_pos, key_pos, key_valid, num_neighbors, query_offset)


__all__ = [
    "DECODE_BLOCK",
    "BlockBoxes",
    "block_boxes",
    "capacity_dynamic",
    "causal_knn",
    "causal_knn_blocks",
    "causal_knn_fast",
    "causal_knn_reference",
    "causal_knn_scan",
    "causal_knn_step_blocks",
    "searches_box_tree",
    "step_boxes",
]
