"""Persistent field memory: M slots per head, each a position and a value, bounded whatever the length.

Axis legend: B batch, N entities, C memory chunk size, H heads, M slots, k pos_dim, D head_dim.

Chunks are absolute: chunk c holds the entities whose real position id lies in [cC, (c+1)C). Entities of chunk c
read the slots as they stood after chunk c-1. While chunk c is read, its entities are absorbed into running
accumulators (an online softmax over the chunk, per slot, of `log w_j - |P_m - p_j|^2 / 2σ^2`); when its last entity
has been seen the slots move toward the affinity-weighted mean of the chunk by a learned gate:
`P_m <- P_m + g_m (mean_pos_m - P_m)`, `V_m <- V_m + g_m (mean_val_m - V_m)`. The accumulators make the write
independent of how the entities were split into calls, so cached decoding gives the full pass's memory exactly.
"""

import torch

# finite stand-in for -inf: masked entries get exactly zero weight without NaN gradients
NEG = -1e30

STATE_KEYS = ("pos", "val", "acc_max", "acc_sum", "acc_pos", "acc_val")


def squared_distance(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """`|a - b|^2` over the last (coordinate) axis, broadcasting the others.

    A sum of per-coordinate squares: k is 1-8, and reducing over such a short trailing axis is several times slower
    on CPU than k elementwise passes. Never the `|a|^2 + |b|^2 - 2ab` form: it cancels badly at large positions.
    """
    total = (a[..., 0] - b[..., 0]).square()
    for c in range(1, a.shape[-1]):
        total = total + (a[..., c] - b[..., c]).square()
    return total


def initial_memory_state(slot_pos: torch.Tensor, slot_val: torch.Tensor, batch_size: int) -> dict:
    """Fresh memory for `batch_size` rows from the learned initial slots `(H, M, k)` and `(H, M, D)`."""
    num_heads, num_slots, _ = slot_pos.shape
    zeros = slot_pos.new_zeros(batch_size, num_heads, num_slots)
    return {
        "pos": slot_pos.unsqueeze(0).expand(batch_size, -1, -1, -1),
        "val": slot_val.unsqueeze(0).expand(batch_size, -1, -1, -1),
        "acc_max": zeros + NEG,
        "acc_sum": zeros,
        "acc_pos": torch.zeros_like(slot_pos).unsqueeze(0).expand(batch_size, -1, -1, -1),
        "acc_val": torch.zeros_like(slot_val).unsqueeze(0).expand(batch_size, -1, -1, -1),
    }


def memory_read(
    query_pos: torch.Tensor, state: dict, slot_log_weight: torch.Tensor, inv_two_var: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Kernel read of the slots. `query_pos` `(B, C, H, k)` -> values `(B, C, H, D)` and log-normaliser `(B, C, H)`."""
    dist2 = squared_distance(query_pos.unsqueeze(3), state["pos"].unsqueeze(1))  # (B, C, H, M)
    logits = slot_log_weight - dist2 * inv_two_var.view(1, 1, -1, 1)
    lse = torch.logsumexp(logits, dim=-1)
    out = torch.einsum("bchm,bhmd->bchd", torch.softmax(logits, dim=-1), state["val"])
    return out, lse


def memory_absorb(
    state: dict,
    pos: torch.Tensor,
    val: torch.Tensor,
    log_weight: torch.Tensor,
    valid: torch.Tensor,
    inv_two_var: torch.Tensor,
) -> dict:
    """Add one chunk's entities `pos (B, C, H, k)`, `val (B, C, H, D)`, `log_weight (B, C, H)`, `valid (B, C)`
    to the running accumulators (online softmax over entities, per slot)."""
    dist2 = squared_distance(pos.unsqueeze(3), state["pos"].unsqueeze(1))  # (B, C, H, M)
    logits = log_weight.unsqueeze(-1) - dist2 * inv_two_var.view(1, 1, -1, 1)
    mask = valid.view(*valid.shape, 1, 1)
    logits = logits.masked_fill(~mask, NEG)
    new_max = torch.maximum(state["acc_max"], logits.amax(dim=1))  # (B, H, M)
    scale_old = torch.exp(state["acc_max"] - new_max)
    weights = torch.exp(logits - new_max.unsqueeze(1)) * mask  # (B, C, H, M)
    return {
        "pos": state["pos"],
        "val": state["val"],
        "acc_max": new_max,
        "acc_sum": state["acc_sum"] * scale_old + weights.sum(1),
        "acc_pos": state["acc_pos"] * scale_old.unsqueeze(-1) + torch.einsum("bchm,bchk->bhmk", weights, pos),
        "acc_val": state["acc_val"] * scale_old.unsqueeze(-1) + torch.einsum("bchm,bchd->bhmd", weights, val),
    }


def memory_commit(state: dict, complete: torch.Tensor, gate: torch.Tensor) -> dict:
    """Move the slots of rows whose chunk is `complete` `(B,)` toward the chunk mean by `gate` `(H, M)`;
    reset those rows' accumulators."""
    if not bool(complete.any()):  # most decoding steps complete no chunk
        return state
    rows = complete.view(-1, 1, 1)
    norm = state["acc_sum"].clamp_min(1e-30).unsqueeze(-1)
    step = gate.unsqueeze(-1) * rows.unsqueeze(-1)  # (B, H, M, 1)
    reset = ~rows
    return {
        "pos": state["pos"] + step * (state["acc_pos"] / norm - state["pos"]),
        "val": state["val"] + step * (state["acc_val"] / norm - state["val"]),
        "acc_max": torch.where(reset, state["acc_max"], torch.full_like(state["acc_max"], NEG)),
        "acc_sum": state["acc_sum"] * reset,
        "acc_pos": state["acc_pos"] * reset.unsqueeze(-1),
        "acc_val": state["acc_val"] * reset.unsqueeze(-1),
    }


def chunk_layout(position_ids: torch.Tensor, valid: torch.Tensor, chunk_size: int):
    """Place each real entity at `(chunk - first_chunk) * C + position % C` of a padded chunked axis.

    Returns the slot index `(B, N)` (padding entities go to a trash slot at the end), the number of chunks and the
    validity `(B, num_chunks * C)` of the chunked axis.
    """
    chunk = torch.div(position_ids, chunk_size, rounding_mode="floor")
    first = chunk[valid].min()
    num_chunks = int(chunk[valid].max() - first) + 1
    trash = num_chunks * chunk_size
    slot = torch.where(valid, (chunk - first) * chunk_size + position_ids % chunk_size, trash)
    laid_valid = valid.new_zeros(valid.shape[0], trash + 1).scatter(1, slot, valid)[:, :trash]
    return slot, num_chunks, laid_valid


def _to_layout(x: torch.Tensor, slot: torch.Tensor, length: int) -> torch.Tensor:
    """Scatter `x` `(B, N, ...)` to the chunked axis `(B, length, ...)` (padding lands in a dropped trash slot)."""
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
    """Read and write the memory over a segment of entities, chunk by chunk.

    Args:
        state: memory state as produced by `initial_memory_state` or a previous scan (keys `STATE_KEYS`).
        pos: `(B, N, H, k)` entity positions (after this layer's flow).
        val: `(B, N, H, D)` entity values.
        log_weight: `(B, N, H)` log influence weights.
        position_ids: `(B, N)` real-entity positions (absolute; chunk boundaries derive from them).
        valid: `(B, N)` bool, False for padding; at least one entity must be valid.
        params: `slot_log_weight (H, M)`, `gate (H, M)`, `inv_two_var (H,)`.
        read: also return each entity's read of the memory (False when only rebuilding the state).

    Returns:
        read values `(B, N, H, D)`, read log-normalisers `(B, N, H)` (or None) and the new state.
    """
    if pos.shape[1] == 1:  # one entity per row (decoding): it is its own chunk slice, no layout needed
        out, lse = memory_read(pos, state, params["slot_log_weight"], params["inv_two_var"]) if read else (None, None)
        state = memory_absorb(state, pos, val, log_weight, valid, params["inv_two_var"])
        completes = valid[:, 0] & (position_ids[:, 0] % chunk_size == chunk_size - 1)
        return out, lse, memory_commit(state, completes, params["gate"])
    slot, num_chunks, laid_valid = chunk_layout(position_ids, valid, chunk_size)
    length = num_chunks * chunk_size
    laid = [_to_layout(x, slot, length) for x in (pos, val, log_weight)]
    outs, lses = [], []
    for c in range(num_chunks):
        span = slice(c * chunk_size, (c + 1) * chunk_size)
        c_pos, c_val, c_logw = (x[:, span] for x in laid)
        c_valid = laid_valid[:, span]
        if read:
            out, lse = memory_read(c_pos, state, params["slot_log_weight"], params["inv_two_var"])
            outs.append(out)
            lses.append(lse)
        state = memory_absorb(state, c_pos, c_val, c_logw, c_valid, params["inv_two_var"])
        state = memory_commit(state, c_valid[:, -1], params["gate"])
    if not read:
        return None, None, state
    gather = slot.clamp_max(length - 1)
    out = torch.cat(outs, 1).gather(1, gather.view(*gather.shape, 1, 1).expand(-1, -1, *val.shape[2:]))
    lse = torch.cat(lses, 1).gather(1, gather.unsqueeze(-1).expand(-1, -1, log_weight.shape[-1]))
    return out, lse, state


__all__ = ["STATE_KEYS", "squared_distance", "initial_memory_state", "memory_scan"]
