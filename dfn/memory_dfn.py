"""Persistent field memory: M slots per head, each a position and a value, bounded whatever the length.

Axis legend: B batch, N entities, C memory chunk size, H heads, M slots, k pos_dim, D head_dim, F = (k - 1) + D.

The memory lives in the *flow* coordinates of the positions (1..k-1): coordinate 0 is time, and a slot that kept
the time of what it absorbed would fade from every later query (read weight exp(-(Δt scale)^2 / 2σ^2)), which is
exactly what a long-range memory must not do. Slot m has a fixed learned home `A_m` (its write anchor and initial
position), a current position `P_m` and a value `V_m`.

Write. Chunks are absolute: chunk c holds the entities whose real position id lies in [cC, (c+1)C). Entity j offers
slot m the write score `z_jm = log w_j + log β_m - |p_j - A_m|^2 / 2σ^2 <= 0` (β_m in (0, 1) learned). When chunk c
completes, with `S_m = Σ_j exp(z_jm)` its absolute write mass,
    g_m = 1 - exp(-S_m),     X_m <- (1 - g_m) X_m + g_m Σ_j exp(z_jm) x_j / S_m     for X = P and V.
A chunk that offers a slot nothing (S ≈ 0) leaves it as it is, so content survives any number of later chunks until
something the slot attends to arrives; a chunk with one strong entity (z ≈ 0) overwrites 63 % of it. That is the
"gated" write. The "mean" write (`DFNConfig.memory_write`) makes the gate relative instead: each slot also keeps the
mass `D_m` it has absorbed (starting from a learned prior mass `D_0`), and a chunk commits
    D_m <- D_m + S_m,     X_m <- (1 - g_m) X_m + g_m Σ_j exp(z_jm) x_j / S_m     with g_m = S_m / D_m (the new D),
so the slot holds the mass-weighted mean of everything it absorbed: a key written with 100 times the mass of each
filler chunk still holds a third of its slot after 200 filler chunks, where the gated write needs the key's mass
itself near 1 to hold any. Scores do not depend on the memory state, and `D` is a cumulative sum, so either update is
a linear recurrence `X_c = a_c X_{c-1} + b_c` over chunks, solved for a whole segment at once by a parallel
(doubling) scan.

Read. Entities of chunk c read the slots as they stood after chunk c-1, with kernel logits
`log u_m - |p_i - P_m|^2 / 2σ^2` (flow coordinates); the caller merges them with the K nearest entities' logits.

While a chunk is incomplete its sums are kept in accumulators (`acc_sum` = Σ_j exp(z_jm), `acc_pos`, `acc_val`), so
the memory does not depend on how a document was split into calls: cached decoding gives the full pass's memory. The
"mean" write's state also has `mass` (D).
"""

import torch

STATE_KEYS = ("pos", "val", "acc_sum", "acc_pos", "acc_val")  # plus "mass" for the "mean" write
# entities per parallel scan: bounds its (B, N, H, M) and (B, N, H, k + D) temporaries on very long inputs
SCAN_BLOCK = 16384
MIN_PRIOR_MASS = 1e-30  # the mean write's smallest D_0 (float32's smallest normal number is 1.2e-38)


def squared_distance(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """`|a - b|^2` over the last (coordinate) axis, broadcasting the others (0 when there are no coordinates).

    A sum of per-coordinate squares: k is 1-8, and reducing over such a short trailing axis is several times slower
    on CPU than k elementwise passes. Never the `|a|^2 + |b|^2 - 2ab` form: it cancels badly at large positions.
    """
    total = (a[..., 0] - b[..., 0]).square() if a.shape[-1] else (a.sum(-1) + b.sum(-1)) * 0
    for c in range(1, a.shape[-1]):
        total = total + (a[..., c] - b[..., c]).square()
    return total


def initial_memory_state(
    slot_pos: torch.Tensor, slot_val: torch.Tensor, batch_size: int, prior_log_mass: torch.Tensor | None = None
) -> dict:
    """Fresh memory for `batch_size` rows from the learned slot homes `(H, M, k - 1)` and values `(H, M, D)`; for the
    "mean" write, `prior_log_mass (H, M)` is log D_0, the mass the slots start with."""
    heads, slots, _ = slot_pos.shape
    features = slot_pos.shape[-1] + slot_val.shape[-1]
    state = {
        "pos": slot_pos.unsqueeze(0).expand(batch_size, -1, -1, -1),
        "val": slot_val.unsqueeze(0).expand(batch_size, -1, -1, -1),
        "acc_sum": slot_pos.new_zeros(batch_size, heads, slots),
        "acc_pos": slot_pos.new_zeros(batch_size, heads, slots, slot_pos.shape[-1]),
        "acc_val": slot_val.new_zeros(batch_size, heads, slots, features - slot_pos.shape[-1]),
    }
    if prior_log_mass is not None:
        # D_0 > 0 even where a learned prior underflows: a chunk that offers the slot nothing then has gate 0, not 0/0
        prior_mass = torch.exp(prior_log_mass).clamp_min(MIN_PRIOR_MASS)
        state["mass"] = prior_mass.unsqueeze(0).expand(batch_size, -1, -1)
    return state


def write_scores(pos: torch.Tensor, log_weight: torch.Tensor, params: dict) -> torch.Tensor:
    """`z = log w_j + log β_m - |p_j - A_m|^2 / 2σ^2`: `pos (..., H, k-1)`, `log_weight (..., H)` -> `(..., H, M)`."""
    dist2 = squared_distance(pos.unsqueeze(-2), params["home"])
    return log_weight.unsqueeze(-1) + params["write_log_scale"] - dist2 * params["inv_two_var"].unsqueeze(-1)


def memory_read(query_pos: torch.Tensor, slot_pos: torch.Tensor, slot_val: torch.Tensor, params: dict):
    """Kernel read of the slots: `query_pos (..., C, H, k-1)` against `slot_pos (..., H, M, k-1)` and `slot_val
    (..., H, M, D)` -> values `(..., C, H, D)` and log-normaliser `(..., C, H)`."""
    dist2 = squared_distance(query_pos.unsqueeze(-2), slot_pos.unsqueeze(-4))  # (..., C, H, M)
    logits = params["slot_log_weight"] - dist2 * params["inv_two_var"].unsqueeze(-1)
    out = torch.matmul(torch.softmax(logits, dim=-1).transpose(-2, -3), slot_val).transpose(-2, -3)
    return out, torch.logsumexp(logits, dim=-1)


def commit_coefficients(mass: torch.Tensor, before: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """For a chunk of write mass `S`: the decay `a` and the factor `r` that turns the chunk's score-weighted sums into
    `g * mean`. Gated write (`before` None): `a = exp(-S)`, `r = (1 - exp(-S)) / S` (r -> 1 as S -> 0, computed
    without dividing by 0). Mean write, the slot having absorbed `before` = D: `a = D / (D + S)`, `r = 1 / (D + S)`."""
    if before is not None:
        after = before + mass
        return before / after, after.reciprocal()
    safe = mass.clamp_min(1e-4)
    ratio = torch.where(mass > 1e-4, -torch.expm1(-safe) / safe, 1.0 - 0.5 * mass)
    return torch.exp(-mass), ratio


def split_features(x: torch.Tensor, pos_features: int) -> tuple[torch.Tensor, torch.Tensor]:
    return x[..., :pos_features], x[..., pos_features:]


def memory_step(state: dict, pos, val, log_weight, valid, completes, params: dict, read: bool = True):
    """One entity per row (cached decoding): `pos (B, H, k-1)`, `val (B, H, D)`, `log_weight (B, H)`, `valid (B,)`,
    `completes (B,)` (this entity is its chunk's last). Reads the memory, absorbs the entity and commits rows whose
    chunk completes. Returns the read `(B, 1, H, D)`, `(B, 1, H)` (or None) and the new state."""
    out, lse = memory_read(pos.unsqueeze(1), state["pos"], state["val"], params) if read else (None, None)
    weight = torch.exp(write_scores(pos, log_weight, params)) * valid.view(-1, 1, 1)  # (B, H, M)
    acc_sum = state["acc_sum"] + weight
    acc_pos = state["acc_pos"] + weight.unsqueeze(-1) * pos.unsqueeze(-2)
    acc_val = state["acc_val"] + weight.unsqueeze(-1) * val.unsqueeze(-2)
    # most decoding steps complete no chunk; a compiled graph always takes the commit path (same result, no sync)
    if not torch.compiler.is_compiling() and not bool(completes.any()):
        return out, lse, dict(state, acc_sum=acc_sum, acc_pos=acc_pos, acc_val=acc_val)
    decay, ratio = commit_coefficients(acc_sum, state.get("mass"))
    done = completes.view(-1, 1, 1)
    keep = (~done).unsqueeze(-1)
    new_state = {"acc_sum": acc_sum * ~done, "acc_pos": acc_pos * keep, "acc_val": acc_val * keep}
    if "mass" in state:
        new_state["mass"] = state["mass"] + acc_sum * done
    decay = torch.where(done, decay, 1.0).unsqueeze(-1)
    ratio = (ratio * done).unsqueeze(-1)
    new_state["pos"] = decay * state["pos"] + ratio * acc_pos
    new_state["val"] = decay * state["val"] + ratio * acc_val
    return out, lse, new_state


def linear_scan(decay: torch.Tensor, inputs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Inclusive scan of `X_c = decay_c X_{c-1} + inputs_c` over axis 1 by recursive doubling (log2 steps).

    `decay (B, n, ...)`, `inputs (B, n, ..., F)` -> `(A, Bc)` with `X_c = A_c X_{-1} + Bc_c`: A the cumulative
    decay, Bc what the chunks up to c contribute. Only products of decays in (0, 1] are formed, so it is stable.
    """
    total, acc = decay, inputs
    step = 1
    while step < decay.shape[1]:
        acc = torch.cat([acc[:, :step], total[:, step:].unsqueeze(-1) * acc[:, :-step] + acc[:, step:]], dim=1)
        total = torch.cat([total[:, :step], total[:, step:] * total[:, :-step]], dim=1)
        step *= 2
    return total, acc


def chunk_layout(position_ids: torch.Tensor, valid: torch.Tensor, chunk_size: int):
    """Place each real entity at `(chunk - its row's first chunk) * C + position % C` of a padded chunked axis: rows
    are laid out apart, so the axis spans the longest row's chunks (at most N / C + 2), whatever the rows' positions.

    Returns the slot index `(B, N)` (padding entities go to a trash slot at the end), the number of chunks and the
    validity `(B, num_chunks * C)` of the chunked axis.
    """
    chunk = torch.div(position_ids, chunk_size, rounding_mode="floor")
    chunk = chunk - chunk.masked_fill(~valid, torch.iinfo(chunk.dtype).max).amin(1, keepdim=True)
    num_chunks = int(chunk[valid].max()) + 1
    trash = num_chunks * chunk_size
    slot = torch.where(valid, chunk * chunk_size + position_ids % chunk_size, trash)
    laid_valid = valid.new_zeros(valid.shape[0], trash + 1).scatter(1, slot, valid)[:, :trash]
    return slot, num_chunks, laid_valid


def _to_layout(x: torch.Tensor, slot: torch.Tensor, length: int, in_order: bool) -> torch.Tensor:
    """Scatter `x` `(B, N, ...)` to the chunked axis `(B, length, ...)` (padding lands in a dropped trash slot).
    `in_order`: every row's entity i sits at slot i (no padding, rows aligned), so only the tail needs padding."""
    if in_order:
        tail = length - x.shape[1]
        return torch.cat([x, x.new_zeros(x.shape[0], tail, *x.shape[2:])], 1) if tail else x
    index = slot.view(*slot.shape, *([1] * (x.dim() - 2))).expand_as(x)
    out = x.new_zeros(x.shape[0], length + 1, *x.shape[2:])
    return out.scatter(1, index, x)[:, :length]


def memory_scan(
    state: dict,
    pos: torch.Tensor,
    val: torch.Tensor,
    log_weight: torch.Tensor,
    position_ids: torch.Tensor,
    valid: torch.Tensor,
    params: dict,
    chunk_size: int,
    read: bool = True,
) -> tuple[torch.Tensor | None, torch.Tensor | None, dict]:
    """Read and write the memory over a segment of entities, all chunks at once.

    Args:
        state: memory state as produced by `initial_memory_state` or a previous scan (keys `STATE_KEYS`).
        pos: `(B, N, H, k-1)` entity flow coordinates (after this layer's flow).
        val: `(B, N, H, D)` entity values.
        log_weight: `(B, N, H)` log influence weights.
        position_ids: `(B, N)` real-entity positions (absolute; chunk boundaries derive from them).
        valid: `(B, N)` bool, False for padding (a row may have no valid entity when the caller holds a cache).
        params: `home (H, M, k-1)`, `write_log_scale (H, M)`, `slot_log_weight (H, M)`, `inv_two_var (H,)`.
        read: also return each entity's read of the memory (False when only rebuilding the state).

    Returns:
        read values `(B, N, H, D)`, read log-normalisers `(B, N, H)` (or None) and the new state.
    """
    if pos.shape[1] == 1:  # decoding: one entity per row, no layout needed
        completes = valid[:, 0] & (position_ids[:, 0] % chunk_size == chunk_size - 1)
        return memory_step(state, pos[:, 0], val[:, 0], log_weight[:, 0], valid[:, 0], completes, params, read)
    if pos.shape[1] > SCAN_BLOCK:
        return _scan_in_blocks(state, pos, val, log_weight, position_ids, valid, params, chunk_size, read)
    batch, _, heads, pos_features = pos.shape
    slot, num_chunks, laid_valid = chunk_layout(position_ids, valid, chunk_size)
    length = num_chunks * chunk_size
    # the common case (training, one document per row) needs no scatter: skipping it saves copies of (B, N, H, D)
    in_order = bool(valid.all()) and torch.equal(slot, torch.arange(slot.shape[1], device=slot.device).expand_as(slot))
    laid_pos, laid_val, laid_logw = (_to_layout(x, slot, length, in_order) for x in (pos, val, log_weight))
    laid_pos = laid_pos.view(batch, num_chunks, chunk_size, heads, pos_features)
    laid_valid = laid_valid.view(batch, num_chunks, chunk_size)
    mass, sums = _chunk_sums(laid_pos, laid_val.view(*laid_pos.shape[:-1], -1), laid_logw, laid_valid, params)

    # each row's first and last chunk here; the previous call's pending sums belong to the first
    rows = torch.arange(batch, device=pos.device)
    has_any = valid.any(1)
    first = torch.div(slot.masked_fill(~valid, length).amin(1).clamp_max(length - 1), chunk_size, rounding_mode="floor")
    last = torch.div(slot.masked_fill(~valid, -1).amax(1).clamp_min(0), chunk_size, rounding_mode="floor")
    pending = torch.cat([state["acc_pos"], state["acc_val"]], dim=-1)
    onto_first = (torch.arange(num_chunks, device=pos.device) == first.view(-1, 1)) & has_any.view(-1, 1)  # (B, n)
    mass = mass + onto_first.view(batch, num_chunks, 1, 1) * state["acc_sum"].unsqueeze(1)
    sums = sums + onto_first.view(batch, num_chunks, 1, 1, 1) * pending.unsqueeze(1)

    complete = laid_valid[:, :, -1]  # (B, n): the chunk's last entity is in this call, so it commits here
    start = torch.cat([state["pos"], state["val"]], dim=-1).unsqueeze(1)  # (B, 1, H, M, F)
    before_mass = mass_before_chunks(state["mass"], mass, complete) if "mass" in state else None
    after = _commit_chunks(start, mass, sums, complete, before_mass)  # (B, n, H, M, F): the memory after each chunk

    # a row whose last chunk is incomplete carries its sums to the next call; a row with no entity keeps its own
    carry = (has_any & ~complete[rows, last]).view(-1, 1, 1)
    keep = (~has_any).view(-1, 1, 1)
    new_pending = torch.where(carry.unsqueeze(-1), sums[rows, last], torch.where(keep.unsqueeze(-1), pending, 0.0))
    new_state = dict(zip(("pos", "val"), split_features(after[:, -1], pos_features), strict=True))
    new_state["acc_sum"] = torch.where(carry, mass[rows, last], torch.where(keep, state["acc_sum"], 0.0))
    new_state["acc_pos"], new_state["acc_val"] = split_features(new_pending, pos_features)
    if before_mass is not None:
        new_state["mass"] = before_mass[:, -1] + mass[:, -1] * complete[:, -1].view(-1, 1, 1)
    if not read:
        return None, None, new_state

    before = torch.cat([start, after[:, :-1]], dim=1)  # what chunk c reads: the memory after chunk c-1
    out, lse = memory_read(laid_pos, *split_features(before, pos_features), params)
    out, lse = out.reshape(batch, length, heads, -1), lse.reshape(batch, length, heads)
    if in_order:
        return out[:, : slot.shape[1]], lse[:, : slot.shape[1]], new_state
    gather = slot.clamp_max(length - 1)
    out = out.gather(1, gather.view(batch, -1, 1, 1).expand(-1, -1, *val.shape[2:]))
    lse = lse.gather(1, gather.unsqueeze(-1).expand(-1, -1, heads))
    return out, lse, new_state


def _scan_in_blocks(state, pos, val, log_weight, position_ids, valid, params, chunk_size, read):
    """`memory_scan` over consecutive blocks of `SCAN_BLOCK` entities, carrying the state (exact: a scan split into
    calls equals one scan). A block with no real entity in any row leaves the state as it is."""
    outs, lses = [], []
    for start in range(0, pos.shape[1], SCAN_BLOCK):
        part = [x[:, start : start + SCAN_BLOCK] for x in (pos, val, log_weight, position_ids, valid)]
        if bool(part[-1].any()):
            out, lse, state = memory_scan(state, *part, params, chunk_size, read)
        else:
            out = part[1].new_zeros(part[1].shape) if read else None
            lse = part[2].new_full(part[2].shape, -1e30) if read else None
        outs.append(out)
        lses.append(lse)
    return (torch.cat(outs, 1), torch.cat(lses, 1), state) if read else (None, None, state)


def _chunk_sums(pos, val, log_weight, valid, params: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """Per chunk, the write mass `(B, n, H, M)` and score-weighted sums `(B, n, H, M, F)` of its entities
    `pos (B, n, C, H, k-1)`, `val (B, n, C, H, D)`, `log_weight (B, n * C, H)`, `valid (B, n, C)`."""
    weight = torch.exp(write_scores(pos, log_weight.view(*pos.shape[:-1]), params))  # (B, n, C, H, M)
    weight = weight * valid.unsqueeze(-1).unsqueeze(-1)
    sums = torch.einsum("bnchm,bnchf->bnhmf", weight, torch.cat([pos, val], dim=-1))
    return weight.sum(2), sums


def mass_before_chunks(start_mass, mass, complete) -> torch.Tensor:
    """The mean write's absorbed mass D `(B, n, H, M)` before each chunk, from `start_mass (B, H, M)` and the chunk
    masses `(B, n, H, M)`; only complete chunks add theirs."""
    added = (mass * complete.view(*complete.shape, 1, 1)).cumsum(1)
    return start_mass.unsqueeze(1) + torch.cat([torch.zeros_like(added[:, :1]), added[:, :-1]], dim=1)


def _commit_chunks(start, mass, sums, complete, before_mass=None) -> torch.Tensor:
    """The memory `(B, n, H, M, F)` after each chunk, from `start (B, 1, H, M, F)`: complete chunks commit
    `X <- a X + r sums` (`commit_coefficients`; `before_mass` is D before each chunk for the mean write), the others
    leave it as it is."""
    decay, ratio = commit_coefficients(mass, before_mass)
    done = complete.view(*complete.shape, 1, 1)
    cum_decay, cum_input = linear_scan(torch.where(done, decay, 1.0), (ratio * done).unsqueeze(-1) * sums)
    return cum_decay.unsqueeze(-1) * start + cum_input


def memory_scan_reference(state, pos, val, log_weight, position_ids, valid, params, chunk_size):
    """The scan entity by entity through `memory_step` (the decoding path): the oracle `memory_scan` is tested
    against. Entities must be in position order within each row."""
    outs, lses = [], []
    for i in range(pos.shape[1]):
        completes = valid[:, i] & (position_ids[:, i] % chunk_size == chunk_size - 1)
        out, lse, state = memory_step(state, pos[:, i], val[:, i], log_weight[:, i], valid[:, i], completes, params)
        outs.append(out)
        lses.append(lse)
    return torch.cat(outs, 1), torch.cat(lses, 1), state


__all__ = ["STATE_KEYS", "squared_distance", "initial_memory_state", "memory_scan", "memory_scan_reference"]
