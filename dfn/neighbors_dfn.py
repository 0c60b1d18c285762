"""Causal K-nearest-neighbour search over entity positions.

Axis legend: B batch, N new (query) entities, T all entities (cached + new), H heads, k pos_dim, K neighbours.

Query `i` (0 <= i < N) sits at global index `query_offset + i` of the key axis; it may only select keys
`j <= query_offset + i` whose `key_valid[b, j]` is True. Among keys at equal distance the more recent (larger j)
wins. Indices carry no gradient: positions get theirs through the kernel weights of the chosen neighbours.
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
        `K' = min(K, query_offset + N)`, ordered nearest first. Slots beyond the number of valid earlier keys are
        marked invalid.
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
            dist = (q.unsqueeze(3) - keys.unsqueeze(2)).pow(2).sum(-1)  # (B, H, n, t)
            key_index = torch.arange(num_keys - 1, -1, -1, device=q.device)  # flipped global index
            query_index = torch.arange(start, stop, device=q.device) + query_offset
            allowed = (key_index.view(1, -1) <= query_index.view(-1, 1)).view(1, 1, stop - start, num_keys)
            allowed = allowed & key_valid[:, :num_keys].flip(1).view(batch, 1, 1, num_keys)
            dist = dist.masked_fill(~allowed, float("inf"))
            order = torch.sort(dist, dim=-1, stable=True).indices[..., :width]  # (B, H, n, K')
            indices.append((num_keys - 1 - order).permute(0, 2, 1, 3))
            valid.append(allowed.expand_as(dist).gather(-1, order).permute(0, 2, 1, 3))
    return torch.cat(indices, 1), torch.cat(valid, 1)


def causal_knn(
    query_pos: torch.Tensor,
    key_pos: torch.Tensor,
    key_valid: torch.Tensor,
    num_neighbors: int,
    query_offset: int = 0,
    method: str = "auto",
) -> tuple[torch.Tensor, torch.Tensor]:
    """Dispatch to the configured search (`"reference"`, `"fast"`, `"auto"`); same signature and result."""
    return causal_knn_reference(query_pos, key_pos, key_valid, num_neighbors, query_offset)


__all__ = ["causal_knn", "causal_knn_reference"]
