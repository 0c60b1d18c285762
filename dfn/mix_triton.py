"""The kernel mix without gradients as one fused Triton kernel (GPU; `DFNConfig(mix_kernel="triton")`).

`kernel_average_reference` (modeling_dfn.py) gathers each query's K neighbours `(B, N, H, K, k + D + 1)`, then computes
the kernel logits, their softmax, the weighted sum and the log-normaliser in separate passes: about ten kernel launches
and the gathered block in memory. Here one program per (entity, head) row reads its K neighbours' rows once and
writes the mixed value and log-normaliser: the same arithmetic in float32, in the same order per neighbour (the
squared distance summed coordinate by coordinate).

Triton is optional: without it (or off CUDA) the model keeps the PyTorch path. `TRITON_INTERPRET=1`, set before
triton is first imported, runs the kernel on CPU tensors in Triton's interpreter (how the tests check it without a
GPU).
"""

import torch

try:
    import triton
    import triton.language as tl
except ImportError:
    triton = None


def triton_available() -> bool:
    return triton is not None


if triton is not None:

    @triton.jit
    def kernel_average(
        queries,  # (R, k) float32, R = B·N·H rows
        features,  # float32 packed key rows of F = k + D + 1: position (k), value (D), log weight (1)
        inv_two_var,  # (H,) float32
        key_offsets,  # (R, K) int64: where the neighbours' rows start in `features`
        valid,  # (R, K) int8
        mixed,  # (R, D) float32 out
        log_norm,  # (R,) float32 out
        heads,
        num_neighbors,
        head_dim,
        width,  # F = k + D + 1
        POS_DIM: tl.constexpr,
        BLOCK_K: tl.constexpr,
        BLOCK_D: tl.constexpr,
    ):
        """One program per (entity, head) row: its K neighbours' kernel logits, softmax-weighted values and
        log-normaliser."""
        row = tl.program_id(0).to(tl.int64)
        slot = tl.arange(0, BLOCK_K)
        in_k = slot < num_neighbors
        base = tl.load(key_offsets + row * num_neighbors + slot, mask=in_k, other=0)
        ok = tl.load(valid + row * num_neighbors + slot, mask=in_k, other=0) != 0
        dist2 = tl.zeros([BLOCK_K], dtype=tl.float32)
        for c in tl.static_range(POS_DIM):
            gap = tl.load(queries + row * POS_DIM + c) - tl.load(features + base + c, mask=in_k, other=0.0)
            dist2 += gap * gap
        log_w = tl.load(features + base + (width - 1), mask=in_k, other=0.0)
        logits = log_w - dist2 * tl.load(inv_two_var + row % heads)
        logits = tl.where(ok, logits, -1e30)  # modeling_dfn's NEG: finite, as there
        logits = tl.where(in_k, logits, float("-inf"))  # padding lanes of the block weigh nothing
        top = tl.max(logits, axis=0)
        p = tl.exp(logits - top)
        total = tl.sum(p, axis=0)
        d = tl.arange(0, BLOCK_D)
        in_d = d < head_dim
        values = tl.load(
            features + base[:, None] + POS_DIM + d[None, :], mask=in_k[:, None] & in_d[None, :], other=0.0
        )  # (BLOCK_K, BLOCK_D)
        out = tl.sum(p[:, None] * values, axis=0) / total
        tl.store(mixed + row * head_dim + d, out, mask=in_d)
        tl.store(log_norm + row, top + tl.log(total))


def triton_kernel_average(queries, features, inv_two_var, indices, valid, pos_dim: int):
    """`kernel_average_reference` (modeling_dfn.py) as one Triton kernel, without gradients.

    Args:
        queries: `(B, N, H, k)` query points.
        features: `(B, T, H, k + D + 1)` packed keys (positions, values, log influence weight).
        inv_two_var: `(H,)` the kernel's `1/2σ²`.
        indices, valid: `(B, N, H, K)` neighbour indices on the key axis and their validity.

    Returns:
        mixed values `(B, N, H, D)` and log-normalisers `(B, N, H)`, float32.
    """
    batch, length, heads, _ = queries.shape
    width = features.shape[-1]
    num_neighbors, head_dim = indices.shape[-1], width - pos_dim - 1
    features = features.float()
    if features.stride(-1) != 1:
        features = features.contiguous()
    # offsets through the strides: a decoding step's keys are a view of the cache's buffer, never copied
    stride_b, stride_t, stride_h = features.stride()[:3]
    key_offsets = indices * stride_t + (torch.arange(heads, device=indices.device) * stride_h).view(1, 1, heads, 1)
    key_offsets = key_offsets + (torch.arange(batch, device=indices.device) * stride_b).view(batch, 1, 1, 1)
    mixed = queries.new_empty(batch, length, heads, head_dim, dtype=torch.float32)
    log_norm = queries.new_empty(batch, length, heads, dtype=torch.float32)
    rows = batch * length * heads
    if rows == 0:
        return mixed, log_norm
    kernel_average[(rows,)](
        queries.float().contiguous(),
        features,
        inv_two_var.float().contiguous(),
        key_offsets.contiguous(),
        valid.to(torch.int8).contiguous(),
        mixed,
        log_norm,
        heads,
        num_neighbors,
        head_dim,
        width,
        POS_DIM=pos_dim,
        BLOCK_K=triton.next_power_of_2(num_neighbors),
        BLOCK_D=triton.next_power_of_2(head_dim),
    )
    return mixed, log_norm


__all__ = ["triton_available", "triton_kernel_average"]
