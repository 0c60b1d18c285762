"""PyTorch Dynamic Flow Networks (DFN).

Every byte is an entity with a state and, per head, a position. Each layer moves the positions by a learned flow and
mixes each entity with its K nearest earlier entities (and the persistent field-memory slots) through a Gaussian
kernel weighted by learned influence weights. See DESIGN.md for the reference semantics.

Axis legend: B batch, N new entities, T all entities (cached + new), H heads, k pos_dim, K neighbours,
D head_dim, E hidden_size, M memory slots.
"""

import math
import numbers
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import torch
import torch.nn.functional as F
from safetensors import SafetensorError
from torch import nn
from transformers import GenerationMixin, PreTrainedModel
from transformers import initialization as init
from transformers.modeling_layers import GradientCheckpointingLayer
from transformers.modeling_outputs import BaseModelOutputWithPast, CausalLMOutputWithPast
from transformers.utils import can_return_tuple, logging
from transformers.utils.deprecation import deprecate_kwarg

from .cache_dfn import DFNCache, DFNCacheLayer
from .configuration_dfn import DFNConfig
from .memory_dfn import initial_memory_state, memory_scan, squared_distance
from .mix_triton import triton_available, triton_kernel_average
from .neighbors_dfn import causal_knn, causal_knn_step_blocks, searches_box_tree, step_boxes

logger = logging.get_logger(__name__)

# finite stand-in for -inf: masked neighbours get exactly zero weight without NaN gradients
NEG = -1e30

# entities processed at once by the MLP: bounds its (B, n, mlp_ratio * E) intermediate at long lengths
QUERY_CHUNK = 4096
# queries (batch x sequence) processed at once by the neighbour gather. The (B, n, H, K, k + D + 1) gather is the
# largest buffer of a layer; kept a few MB, glibc reuses it from the heap instead of mapping fresh pages for every
# chunk (page faults on fresh 100+ MB buffers cost more than the gather itself. Measured: 4.5 s -> 3.1 s for a 16k
# forward; a 16 x 256 training step, d=128, 1.3 s -> 1.0 s once the chunk counted the batch too).
NEIGHBOR_CHUNK = 256
# the same on an accelerator, whose caching allocator reuses its blocks without page faults, while every chunk costs
# a dozen kernel launches: a 64 x 256 training step of the GPU preset (6 layers) made 768 chunk passes with 256
# (measured on an H200: 0.9 s per step, 17.5k tokens/s against Llama's 432k); with 8192 it makes 24. The largest
# buffer is the gather of the path without gradients, (n, H, K, k + D + 1) floats: 0.84 GB for the GPU preset (H 6,
# K 64, D 64), 0.28 GB for the benchmark's model (H 4, K 32, D 64). The training path gathers k + 1 per neighbour.
ACCELERATOR_NEIGHBOR_CHUNK = 8192
# past columns of `attention_mask` a call with a cache reads (see `DFNModel._entity_mask`): the cache records which
# past entities are padding, so more would only make each decoding step read the whole context
MASK_PAST_CHECKED = 1024


@dataclass
class DFNModelOutput(BaseModelOutputWithPast):
    r"""
    cache (`DFNCache`, *optional*): entity positions, values, weights and field memory, for incremental decoding.
    positions (`tuple(torch.Tensor)`, *optional*, returned with `output_positions=True`):
        entity positions of shape `(batch_size, sequence_length, num_heads, pos_dim)`: the initial ones, then those
        after each layer's flow.
    """

    positions: tuple[torch.Tensor, ...] | None = None


@dataclass
class DFNCausalLMOutput(CausalLMOutputWithPast):
    r"""
    positions (`tuple(torch.Tensor)`, *optional*, returned with `output_positions=True`): see [`DFNModelOutput`].
    """

    positions: tuple[torch.Tensor, ...] | None = None


class FlowNormFunction(torch.autograd.Function):
    """`weight ⊙ x / sqrt(mean(x²) + ε)` over the last axis of `x` `(..., E)`, computed in float32 and cast back to
    `x`'s dtype before the weight, with a hand-written backward: autograd through the composite formula makes about
    twice as many passes over the `(B, N, E)` tensors and saves the normalised copy."""

    @staticmethod
    def forward(ctx, x, weight, eps: float):
        x32 = x.float()
        scale = torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)  # (..., 1)
        ctx.save_for_backward(x, scale, weight)
        return weight * (x32 * scale).to(x.dtype)

    @staticmethod
    @torch.autograd.function.once_differentiable  # the saved scale is detached from x: a 2nd derivative would be wrong
    def backward(ctx, grad):
        x, scale, weight = ctx.saved_tensors
        normed = x.float() * scale
        grad_weight = (grad * normed.to(x.dtype)).sum(tuple(range(grad.dim() - 1)))
        grad_normed = (grad * weight).float()
        grad_x = scale * (grad_normed - normed * (grad_normed * normed).mean(-1, keepdim=True))
        return grad_x.to(x.dtype), grad_weight.to(weight.dtype), None


class DFNFlowNorm(nn.Module):
    """`FlowNorm(x_i) = γ ⊙ x_i / sqrt(mean(x_i²) + ε)`: per entity, never across entities (that would leak)."""

    def __init__(self, hidden_size: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(hidden_size))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if torch.is_grad_enabled() and (x.requires_grad or self.weight.requires_grad):
            return FlowNormFunction.apply(x, self.weight, self.eps)
        # the same formula as one fused operation: a decoding step normalises one entity, where the autograd
        # Function's own overhead costs several times the arithmetic
        return self.weight * F.rms_norm(x.float(), (x.shape[-1],), eps=self.eps).to(x.dtype)


def make_norm(config) -> nn.Module:
    return DFNFlowNorm(config.hidden_size, config.flownorm_eps) if config.use_flownorm else nn.Identity()


class DFNMLP(nn.Module):
    """`MLP([a, b])`: `(B, N, 2E)` -> `(B, N, E)`, either gated (`mlp_type="swiglu"`: `down(silu(gate(u)) ⊙ up(u))`)
    or `down(gelu(up(u)))` (`"gelu"`), with about the same number of weights. Applied in sequence chunks of
    `QUERY_CHUNK` entities so that the `(B, N, inner)` intermediate never exists whole at long lengths."""

    def __init__(self, config):
        super().__init__()
        width = 2 * config.hidden_size
        if config.mlp_type == "swiglu":
            # 2 x (2E x inner) + inner x E weights ~ the GELU MLP's 2E x rE + rE x E (r = mlp_ratio) at inner = 0.6 rE,
            # rounded to a multiple of 32 floats: every row of the (B, N, inner) activations then takes the same
            # vectorised path through silu (a scalar tail rounds differently, and identical rows would differ)
            inner = 32 * max(1, round(0.6 * config.mlp_ratio * config.hidden_size / 32))
            self.gate_proj = nn.Linear(width, inner, bias=False)
            self.up_proj = nn.Linear(width, inner, bias=False)
            self.down_proj = nn.Linear(inner, config.hidden_size, bias=False)
        else:
            inner = int(config.mlp_ratio * config.hidden_size)
            self.gate_proj = None
            self.up_proj = nn.Linear(width, inner)
            self.down_proj = nn.Linear(inner, config.hidden_size)
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        chunks = [self._inner(part) for part in x.split(QUERY_CHUNK, dim=1)]
        return self.dropout(torch.cat(chunks, dim=1) if len(chunks) > 1 else chunks[0])

    def _inner(self, x: torch.Tensor) -> torch.Tensor:
        if self.gate_proj is None:
            return self.down_proj(F.gelu(self.up_proj(x)))
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


def neighbor_rows(keys: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
    """Rows of `keys` `(B, T, H, F)` viewed as `(B·T·H, F)` that `indices` `(B, N, H, K)` pick (each head its own)."""
    batch, length, heads, _ = keys.shape
    offsets = torch.arange(heads, device=indices.device).view(1, 1, heads, 1) + (
        torch.arange(batch, device=indices.device) * (length * heads)
    ).view(batch, 1, 1, 1)
    return (indices * heads + offsets).reshape(-1)


def gather_neighbors(keys: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
    """`keys` `(B, T, H, F)`, `indices` `(B, N, H, K)` -> `(B, N, H, K, F)` (each head gathers its own keys)."""
    rows = keys.reshape(-1, keys.shape[-1]).index_select(0, neighbor_rows(keys, indices))
    return rows.view(*indices.shape, keys.shape[-1])


def neighbor_chunk(device: torch.device) -> int:
    """Queries (batch x sequence) mixed at once on `device`."""
    return NEIGHBOR_CHUNK if device.type == "cpu" else ACCELERATOR_NEIGHBOR_CHUNK


def query_chunks(batch: int, length: int, device: torch.device) -> list[slice]:
    """Slices of the query axis holding about `neighbor_chunk(device)` queries of the whole batch each."""
    step = max(1, neighbor_chunk(device) // batch)
    return [slice(i, i + step) for i in range(0, length, step)]


def kernel_weights(queries, near_pos, near_log_w, valid, inv_two_var):
    """Logits `(B, n, H, K)` of the Gaussian kernel `log w_j - |p_i - p_j|^2 / 2σ^2` over the gathered neighbours
    (`NEG` where not `valid`) and the squared distances they came from."""
    dist2 = squared_distance(queries.unsqueeze(3), near_pos)  # (B, n, H, K)
    logits = near_log_w.squeeze(-1) - dist2 * inv_two_var.view(1, 1, -1, 1)
    return logits.masked_fill(~valid, NEG), dist2


def kernel_average_chunk(queries, features, inv_two_var, indices, valid, pos_dim: int):
    """Kernel-weighted average of the chosen neighbours of queries `(B, n, H, k)`, each with neighbour `indices` and
    `valid` `(B, n, H, K)` into `features` `(B, T, H, k + D + 1)`: mixed values `(B, n, H, D)`, log-normaliser
    `(B, n, H)`."""
    near_pos, near_val, near_log_w = gather_neighbors(features, indices).split(
        [pos_dim, features.shape[-1] - pos_dim - 1, 1], dim=-1
    )
    logits, _ = kernel_weights(queries, near_pos, near_log_w, valid, inv_two_var)
    mixed = torch.matmul(torch.softmax(logits, dim=-1).unsqueeze(-2), near_val).squeeze(-2)
    return mixed, torch.logsumexp(logits, dim=-1)


def kernel_average_reference(queries, features, inv_two_var, indices, valid, pos_dim: int):
    """`kernel_average_chunk` over all queries `(B, N, H, k)` chunk by chunk, differentiated by autograd: the
    reference `NeighborKernelAverage` is tested against."""
    batch, length, heads, _ = queries.shape
    if batch * length <= neighbor_chunk(queries.device):  # one chunk (a decoding step): no whole-sequence outputs
        return kernel_average_chunk(queries, features, inv_two_var, indices, valid, pos_dim)
    # written into whole-sequence outputs: thousands of per-chunk pieces kept alive until a final cat fragment
    # the heap (measured: peak RSS 8.8 GiB instead of 3.1 GiB for a 256k forward)
    mixed = features.new_empty(batch, length, heads, features.shape[-1] - pos_dim - 1)
    log_norm = features.new_empty(batch, length, heads)
    for part in query_chunks(batch, length, queries.device):
        mixed[:, part], log_norm[:, part] = kernel_average_chunk(
            queries[:, part], features, inv_two_var, indices[:, part], valid[:, part], pos_dim
        )
    return mixed, log_norm


def sparse_csr(crow: torch.Tensor, col: torch.Tensor, values: torch.Tensor, size: tuple) -> torch.Tensor:
    """`torch.sparse_csr_tensor` without its one-time warnings (beta support; invariant checks off, which CUDA builds
    announce); no invariant checks (indices are in range by construction)."""
    with warnings.catch_warnings():
        for message in ("Sparse CSR tensor support is in beta", "Sparse invariant checks are implicitly disabled"):
            warnings.filterwarnings("ignore", message=message, category=UserWarning)
        return torch.sparse_csr_tensor(crow, col, values, size=size, check_invariants=False)


def mix_matrix(weights: torch.Tensor, rows: torch.Tensor, num_keys: int) -> torch.Tensor:
    """The kernel mix of `Q` queries as a sparse CSR matrix `(Q, num_keys)`: query row q holds its weights `(Q, K)`
    at the key rows `rows` `(Q·K,)` it chose. `matrix @ values` mixes without gathering `(Q, K, D)` values."""
    count, width = weights.shape
    crow = torch.arange(0, count * width + 1, width, dtype=rows.dtype, device=rows.device)
    return sparse_csr(crow, rows, weights.reshape(-1), (count, num_keys))


def transposed_mix_matrix(weights: torch.Tensor, rows: torch.Tensor, num_keys: int) -> torch.Tensor:
    """`mix_matrix(weights, rows, num_keys)` transposed, as a CSR matrix `(num_keys, Q)`: key row r holds the weights
    of the (query, slot) pairs that chose it. Its product with `(Q, D)` query gradients accumulates the value
    gradients with one sort instead of `index_add_`'s scattered adds of every (query, slot) pair's gradient row."""
    order = torch.sort(rows).indices
    crow = rows.new_zeros(num_keys + 1)
    torch.cumsum(torch.bincount(rows, minlength=num_keys), 0, dtype=rows.dtype, out=crow[1:])
    values = weights.reshape(-1)[order]
    queries = order.div_(weights.shape[1], rounding_mode="floor").to(rows.dtype)
    return sparse_csr(crow, queries, values, (num_keys, weights.shape[0]))


def neighbor_geometry(queries, geometry, rows, valid, inv_two_var):
    """Kernel logits `(B, n, H, K)` of queries `(B, n, H, k)` over the neighbours at `rows` `(B·n·H·K,)` of
    `geometry` `(B·T·H, k + 1)` (positions, then log-weight), the gaps `q - p` `(B, n, H, K, k)` and the squared
    distances `(B, n, H, K)`. The same sums in the same order as `kernel_weights`."""
    pos_dim = queries.shape[-1]
    near = geometry.index_select(0, rows).view(*valid.shape, pos_dim + 1)
    gap = queries.unsqueeze(3) - near[..., :pos_dim]
    dist2 = gap[..., 0].square()
    for c in range(1, pos_dim):
        dist2 = dist2 + gap[..., c].square()
    logits = near[..., pos_dim] - dist2 * inv_two_var.view(1, 1, -1, 1)
    return logits.masked_fill(~valid, NEG), gap, dist2


class NeighborKernelAverage(torch.autograd.Function):
    """`kernel_average_reference` with a hand-written backward: same outputs, same gradients, less work and memory.

    Through autograd, every chunk's gather saves its `(B, n, H, K, k + D + 1)` block for the backward, and its
    backward zero-fills and adds a gradient the size of all keys: O(chunks x T) work per layer. Here values are never
    gathered: each chunk's kernel weights form a sparse matrix whose product with the values mixes them (forward),
    whose product with the output gradients sampled at its entries gives the weights' gradients, and whose transpose
    for the whole sequence accumulates the value gradients (backward). Only positions and log-weights, `k + 1` numbers
    per neighbour, are gathered. Inputs as `kernel_average_reference`; `indices`, `valid` and `pos_dim` get no
    gradient."""

    @staticmethod
    def forward(ctx, queries, features, inv_two_var, indices, valid, pos_dim):
        ctx.save_for_backward(queries, features, inv_two_var, indices, valid)
        batch, length, heads, _ = queries.shape
        flat = features.reshape(-1, features.shape[-1])  # (B·T·H, k + D + 1)
        geometry, values, index_dtype = _key_geometry(flat, pos_dim), flat[:, pos_dim:-1], _index_dtype(indices, flat)
        mixed = values.new_empty(batch, length, heads, values.shape[1])
        log_norm = values.new_empty(batch, length, heads)
        device = queries.device.type
        # under autocast the reference's product runs in bf16: round its operands and result as it would (sparse
        # products have no bf16 kernel), so that both paths agree to the same precision
        low = torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else values.dtype
        values = values.to(low).to(values.dtype)
        with torch.autocast(device, enabled=False):
            for part in query_chunks(batch, length, queries.device):
                rows = neighbor_rows(features, indices[:, part])
                logits, _, _ = neighbor_geometry(queries[:, part], geometry, rows, valid[:, part], inv_two_var)
                weights = torch.softmax(logits, dim=-1).to(low).to(values.dtype)
                matrix = mix_matrix(weights.view(-1, weights.shape[-1]), rows.to(index_dtype), len(values))
                mixed[:, part] = (matrix @ values).view(*weights.shape[:-1], -1).to(low)
                log_norm[:, part] = torch.logsumexp(logits, dim=-1)
        return mixed, log_norm

    @staticmethod
    def backward(ctx, grad_mixed, grad_log_norm):
        queries, features, inv_two_var, indices, valid = ctx.saved_tensors
        pos_dim, (batch, length) = queries.shape[-1], queries.shape[:2]
        flat = features.reshape(-1, features.shape[-1])  # (B·T·H, k + D + 1)
        geometry, values = _key_geometry(flat, pos_dim), slice(pos_dim, -1)
        grad_queries = torch.zeros_like(queries)
        grad_geometry = torch.zeros_like(geometry)
        grad_inv_two_var = torch.zeros_like(inv_two_var)
        probs = flat.new_empty(indices.shape)  # (B, N, H, K) and the key rows they weigh, for the value gradients
        all_rows = torch.empty(indices.shape, dtype=_index_dtype(indices, flat), device=indices.device)
        for part in query_chunks(batch, length, queries.device):
            rows = neighbor_rows(features, indices[:, part])  # int64: index_add_ is several times slower with int32
            logits, gap, dist2 = neighbor_geometry(queries[:, part], geometry, rows, valid[:, part], inv_two_var)
            weights = torch.softmax(logits, dim=-1)  # (B, n, H, K)
            probs[:, part], all_rows[:, part] = weights, rows.view_as(weights)
            # the output gradients padded to whole key rows with zeros: the sampled product reads the key rows as
            # they are stored instead of a contiguous copy of every value
            g_mixed = flat.new_zeros(*weights.shape[:-1], flat.shape[1])
            g_mixed[..., values] = grad_mixed[:, part]
            matrix = mix_matrix(weights.view(-1, weights.shape[-1]), all_rows[:, part].reshape(-1), len(flat))
            g_probs = torch.sparse.sampled_addmm(matrix, g_mixed.view(-1, flat.shape[1]), flat.t(), beta=0.0)
            g_probs = g_probs.values().view_as(weights)
            # softmax and logsumexp backward; masked logits were filled, so they pass no gradient
            g_logits = weights * (g_probs - (weights * g_probs).sum(-1, keepdim=True) + grad_log_norm[:, part, :, None])
            g_logits = g_logits * valid[:, part]
            g_pos = gap * (2.0 * g_logits * inv_two_var.view(1, 1, -1, 1)).unsqueeze(-1)  # (B, n, H, K, k)
            grad_queries[:, part] = -g_pos.sum(3)
            grad_geometry.index_add_(0, rows, torch.cat([g_pos, g_logits.unsqueeze(-1)], -1).view(-1, pos_dim + 1))
            grad_inv_two_var -= (g_logits * dist2).sum((0, 1, 3))
        grad_features = torch.empty_like(flat)
        transposed = transposed_mix_matrix(probs.view(-1, probs.shape[-1]), all_rows.view(-1), len(flat))
        grad_features[:, values].addmm_(transposed, grad_mixed.reshape(-1, grad_mixed.shape[-1]), beta=0.0)
        grad_features[:, :pos_dim], grad_features[:, -1] = grad_geometry[:, :pos_dim], grad_geometry[:, pos_dim]
        return grad_queries, grad_features.view(features.shape), grad_inv_two_var, None, None, None


def _key_geometry(flat: torch.Tensor, pos_dim: int) -> torch.Tensor:
    """Positions and log-weight `(B·T·H, k + 1)` of the packed key rows `flat` `(B·T·H, k + D + 1)`, contiguous: what
    the kernel weights gather."""
    return torch.cat([flat[:, :pos_dim], flat[:, -1:]], dim=-1)


def _index_dtype(indices: torch.Tensor, flat: torch.Tensor) -> torch.dtype:
    """int32 for the sparse matrices' indices where every count fits (MKL's sparse kernels take 32-bit indices)."""
    return torch.int32 if max(indices.numel(), len(flat)) < 2**31 else torch.int64


class DFNFlowLayer(GradientCheckpointingLayer):
    """One Dynamic Flow Attention layer (flow, causal kNN kernel mix, field memory) and its MLP."""

    def __init__(self, config, layer_idx: int):
        super().__init__()
        self.config = config
        self.layer_idx = layer_idx
        heads, pos_dim, head_dim = (
            config.num_attention_heads,
            config.pos_dim,
            config.hidden_size // config.num_attention_heads,
        )
        self.num_heads, self.pos_dim, self.head_dim = heads, pos_dim, head_dim
        self.input_norm = make_norm(config) if config.layer_variant == "residual" else nn.Identity()
        self.influence_proj = nn.Linear(config.hidden_size, heads)
        self.value_proj = nn.Linear(config.hidden_size, config.hidden_size, bias=False)
        if config.use_flow:
            self.flow_proj = nn.Linear(config.hidden_size, heads * pos_dim, bias=False)
            self.flow_alpha = nn.Parameter(torch.full((heads,), float(config.flow_alpha_init)))
        if config.use_query_flow:
            self.query_flow_proj = nn.Linear(config.hidden_size, heads * pos_dim, bias=False)
        self.log_kernel_width = nn.Parameter(torch.full((heads,), math.log(config.kernel_width_init)))
        self.mix_dropout = nn.Dropout(config.dropout)
        self.mlp = DFNMLP(config)
        self.output_norm = make_norm(config) if config.layer_variant == "seed" else None
        if config.use_memory:
            slots = config.memory_slots
            self.memory_val = nn.Parameter(torch.zeros(heads, slots, head_dim))
            self.memory_log_weight = nn.Parameter(torch.zeros(heads, slots))
            self.memory_write_scale = nn.Parameter(torch.zeros(heads, slots))
            if config.memory_write == "mean":
                self.memory_prior_log_mass = nn.Parameter(torch.zeros(heads, slots))
            if pos_dim > 1:  # slots live in the flow coordinates 1..k-1 (see memory_dfn.py); none when k = 1
                self.memory_pos = nn.Parameter(torch.zeros(heads, slots, pos_dim - 1))
                self.memory_log_width = nn.Parameter(torch.full((heads,), math.log(config.kernel_width_init)))
        self.compiled_step = None  # a CompiledStep for decoding: see compile_decoding

    def forward(
        self,
        hidden_states: torch.Tensor,
        positions: torch.Tensor,
        position_ids: torch.Tensor,
        entity_mask: torch.Tensor,
        key_mask: torch.Tensor,
        cache_layer=None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """
        Args:
            hidden_states: `(B, N, E)` entity states.
            positions: `(B, N, H, k)` float32 positions entering the layer.
            position_ids: `(B, N)` real-entity index of each entity.
            entity_mask: `(B, N)` bool, False for padding.
            key_mask: `(B, T)` bool over cached + new entities.
            cache_layer: this layer's `DFNCacheLayer`, or None.

        Returns:
            new states `(B, N, E)` and moved positions `(B, N, H, k)`.
        """
        step = self._decoding_step(cache_layer, hidden_states.shape[1])
        compiled = step is not None
        projected = (step.project if compiled else DFNFlowLayer._project)(self, hidden_states, positions)
        inputs = self._prepare(projected, key_mask, cache_layer, step)
        hidden_states, memory = (step.update if compiled else DFNFlowLayer._update)(
            self, hidden_states, *inputs, position_ids, entity_mask
        )
        self._store_memory(cache_layer, memory)
        return hidden_states, projected[1]

    def _decoding_step(self, cache_layer, length: int) -> "CompiledStep | None":
        """The compiled step (see `DFNPreTrainedModel.compile_decoding`) where this call is a decoding step that can
        use it: one new entity per row, a cache, no gradients, no global module hooks (which expect every module's
        forward to run eagerly)."""
        if self.compiled_step is None or cache_layer is None or length != 1 or torch.is_grad_enabled():
            return None
        if nn.modules.module._global_forward_hooks or nn.modules.module._global_forward_pre_hooks:
            return None
        return self.compiled_step

    def _prepare(self, projected: tuple, key_mask, cache_layer, step: "CompiledStep | None") -> tuple:
        """Between `_project` and `_update`, what needs the cache: append the new entities, search the box tree (its
        data-dependent fallback runs here, not inside a compiled `_update`) and fetch the memory state. Returns
        `_update`'s arguments from `x` to `memory`."""
        x, positions, queries, values, log_weights, inv_two_var = projected
        length = positions.shape[1]
        features, keys = self._append(positions, values, log_weights, key_mask, cache_layer)
        neighbors = None
        boxes = cache_layer.boxes if cache_layer is not None else None
        if self._searches_tree(boxes, length):
            tree_search = step.tree_search if step is not None else None
            neighbors = self._tree_neighbors(queries, keys, key_mask, boxes, tree_search)
        memory = None
        if self.config.use_memory:  # (DFNModel rejects calls whose new entities are all padding)
            memory = self._memory_state(cache_layer, key_mask[:, : key_mask.shape[1] - length])
        return (*projected, features, keys, key_mask, neighbors, memory)

    @staticmethod
    def _store_memory(cache_layer, memory: dict | None) -> None:
        if cache_layer is not None and memory is not None:
            keep_graph = cache_layer.memory_grad
            cache_layer.memory = {name: DFNFlowLayer._kept(t, keep_graph) for name, t in memory.items()}
            cache_layer.memory_stale = False

    @staticmethod
    def _kept(t: torch.Tensor, keep_graph: bool) -> torch.Tensor:
        """A memory tensor as the cache keeps it: with its autograd graph if `keep_graph` (backpropagation through
        the memory across calls), else detached. Contiguous: a prefill leaves views of one packed tensor, a decoding
        step fresh tensors; one layout keeps compiled decoding steps from compiling again at the first memory commit
        (a decoding step's own tensors are kept as they are: a copy per tensor would cost more than the rest of this
        bookkeeping)."""
        if keep_graph and t.requires_grad:
            return t.contiguous()
        return t if t._base is None and t.is_contiguous() and not t.requires_grad else t.detach().contiguous()

    def _project(self, hidden_states: torch.Tensor, positions: torch.Tensor) -> tuple:
        """The new entities' normalised states `(B, N, E)`, positions moved by the flow `(B, N, H, k)`, query points
        (the same unless the query flow moves them), values `(B, N, H, D)`, log influence weights `(B, N, H)` and the
        kernel's `1/2σ²` `(H,)`."""
        batch, length, _ = hidden_states.shape
        x = self.input_norm(hidden_states)
        if self.config.use_flow:
            flow = self.flow_proj(x).view(batch, length, self.num_heads, self.pos_dim).float()
            positions = positions + self.flow_alpha.float().view(1, 1, -1, 1) * flow
        queries = positions
        if self.config.use_query_flow:
            look = self.query_flow_proj(x).view(batch, length, self.num_heads, self.pos_dim).float()
            queries = positions + self.flow_alpha.float().view(1, 1, -1, 1) * look
        log_weights = F.logsigmoid(self.influence_proj(x).float())
        values = self.value_proj(x).view(batch, length, self.num_heads, self.head_dim).float()
        inv_two_var = 0.5 * torch.exp(-2.0 * self.log_kernel_width.float())
        return x, positions, queries, values, log_weights, inv_two_var

    def _append(self, positions, values, log_weights, key_mask, cache_layer) -> tuple[torch.Tensor, torch.Tensor]:
        """The packed features `(B, T, H, k + D + 1)` (positions, value, log influence weight) of every key, the
        cached entities, to which the new ones are appended, and the new ones; and the keys' positions `(B, T, H, k)`
        (without gradients, the cache's coordinate-major copy, which its scans read faster)."""
        new_features = self._pack(positions, values, log_weights)
        if cache_layer is None:
            return new_features, positions
        if new_features.requires_grad or (torch.is_grad_enabled() and self.log_kernel_width.requires_grad):
            # keep the new entities' gradient path (the cache stores detached copies), and never let the backward see
            # a view of the cache buffer that later calls overwrite in place
            features = torch.cat([cache_layer.features, new_features], dim=1) if cache_layer.length else new_features
            cache_layer.update(new_features, key_mask)
            return features, features[..., : self.pos_dim]
        return cache_layer.update(new_features, key_mask), cache_layer.positions

    @staticmethod
    def _pack(positions, values, log_weights) -> torch.Tensor:
        """The cache's packed features `(B, N, H, k + D + 1)` of entities: positions, value, log influence weight."""
        return torch.cat([positions, values, log_weights.unsqueeze(-1)], dim=-1)

    def _searches_tree(self, boxes, length: int) -> bool:
        """Whether `length` new entities search the cache's box tree `boxes` (else they scan every key)."""
        return self.config.neighbor_search == "auto" and searches_box_tree(boxes, length)

    def _neighbors(self, queries, keys, key_mask, boxes=None) -> tuple:
        """Indices and validity `(B, N, H, K)` of the K earlier entities nearest to each query point `(B, N, H, k)`
        among the key positions `keys` `(B, T, H, k)` (the new entities are the last N keys)."""
        return causal_knn(
            queries.detach(),
            keys.detach(),
            key_mask,
            self.config.num_neighbors,
            keys.shape[1] - queries.shape[1],
            self.config.neighbor_search,
            boxes=boxes,
        )

    def _tree_neighbors(self, queries, keys, key_mask, boxes, tree_search=None) -> tuple:
        """A decoding step's neighbours over the cache's box tree `boxes`: through `tree_search` (a compiled
        `_step_tree_search`) where `step_boxes` gives its buffers, with the scan where that does not settle the answer;
        else the eager search (`causal_knn_blocks`)."""
        levels = step_boxes(boxes) if tree_search is not None else None
        if levels is None:
            return self._neighbors(queries, keys, key_mask, boxes)
        indices, valid, settled = tree_search(self, queries, keys, key_mask, *levels)
        return (indices, valid) if bool(settled) else self._neighbors(queries, keys, key_mask)

    def _step_tree_search(self, queries, keys, key_mask, *levels) -> tuple:
        """`causal_knn_step_blocks` for this layer's queries and key positions (see `_tree_neighbors`)."""
        offset = keys.shape[1] - queries.shape[1]
        return causal_knn_step_blocks(queries, keys, key_mask, self.config.num_neighbors, offset, *levels)

    def _update(
        self, hidden_states, x, positions, queries, values, log_weights, inv_two_var, features, keys, key_mask,
        neighbors, memory, position_ids, entity_mask,
    ) -> tuple:  # fmt: skip
        """The neighbour search (unless `neighbors`, its indices and validity, are given), the kernel mix over the
        chosen neighbours, the field memory's read and write (when `memory`, its state before the new entities, is
        given) and the MLP: new states `(B, N, E)` and the memory's new state."""
        batch, length, _ = hidden_states.shape
        indices, valid = self._neighbors(queries, keys, key_mask) if neighbors is None else neighbors
        mixed, log_norm = self._mix(queries, features, inv_two_var, indices, valid)
        if memory is not None:
            mem, mem_log_norm, memory = memory_scan(
                memory,
                positions[..., 1:],
                values,
                log_weights,
                position_ids,
                entity_mask,
                self._memory_params(),
                self.config.memory_chunk_size,
            )
            total = torch.logaddexp(log_norm, mem_log_norm).unsqueeze(-1)
            mixed = (
                torch.exp(log_norm.unsqueeze(-1) - total) * mixed + torch.exp(mem_log_norm.unsqueeze(-1) - total) * mem
            )
        mixed = self.mix_dropout(mixed.reshape(batch, length, -1).to(hidden_states.dtype))
        if self.output_norm is None:
            return hidden_states + self.mlp(torch.cat([x, mixed], dim=-1)), memory
        return self.output_norm(self.mlp(torch.cat([hidden_states, mixed], dim=-1))), memory

    def _mix(self, queries, features, inv_two_var, indices, valid) -> tuple:
        """Gaussian-kernel average of the chosen neighbours' values for each query `(B, N, H, k)`: `(B, N, H, D)` and
        its log-normaliser `(B, N, H)`."""
        # without gradients the gather path: it reads only the chosen keys, where the fused one copies every key's
        # position (O(T) per call: too much for a decoding step)
        needs_grad = torch.is_grad_enabled() and any(t.requires_grad for t in (queries, features, inv_two_var))
        fused = needs_grad and self.config.neighbor_search != "reference"
        mix = NeighborKernelAverage.apply if fused else kernel_average_reference
        if not needs_grad and self.config.mix_kernel == "triton" and self._triton_mix_runs(queries):
            mix = triton_kernel_average  # (it has no backward)
        return mix(queries, features, inv_two_var, indices, valid, self.pos_dim)

    @staticmethod
    def _triton_mix_runs(queries: torch.Tensor) -> bool:
        """Whether `mix_kernel="triton"` can run here: CUDA tensors, Triton installed, eager (a compiled step fuses
        the mix itself). Warns once where the PyTorch path stands in."""
        if torch.compiler.is_compiling():
            return False
        if not (queries.is_cuda and triton_available()):
            logger.warning_once('mix_kernel="triton" needs CUDA tensors and Triton installed: the PyTorch mix runs')
            return False
        return True

    def _memory_params(self) -> dict:
        return {
            "home": self._memory_home(),
            "write_log_scale": F.logsigmoid(self.memory_write_scale.float()),
            "slot_log_weight": F.logsigmoid(self.memory_log_weight.float()),
            "inv_two_var": 0.5 * torch.exp(-2.0 * self.memory_log_width.float())
            if self.pos_dim > 1
            else self.memory_log_weight.new_zeros(self.num_heads, dtype=torch.float32),
        }

    def _prior_log_mass(self) -> torch.Tensor | None:
        """`(H, M)` log D_0 of the "mean" write (None for the gated write)."""
        return self.memory_prior_log_mass.float() if self.config.memory_write == "mean" else None

    def _memory_home(self) -> torch.Tensor:
        """`(H, M, k-1)` learned slot homes (an empty coordinate axis when pos_dim is 1)."""
        if self.pos_dim > 1:
            return self.memory_pos.float()
        return self.memory_val.new_zeros(self.num_heads, self.config.memory_slots, 0, dtype=torch.float32)

    def _memory_state(self, cache_layer, past_mask: torch.Tensor) -> dict:
        """The memory as it stands before the new entities: from the cache, fresh, or rebuilt after a crop."""
        if cache_layer is not None and cache_layer.memory is not None and not cache_layer.memory_stale:
            return cache_layer.memory
        params = self._memory_params()
        prior = self._prior_log_mass()
        fresh = initial_memory_state(params["home"], self.memory_val.float(), past_mask.shape[0], prior)
        if cache_layer is None or not bool(past_mask.any()):
            return fresh
        length = past_mask.shape[1]
        _, _, state = memory_scan(
            fresh,
            cache_layer.positions[:, :length, :, 1:],
            cache_layer.entity_values[:, :length],
            cache_layer.log_weights[:, :length],
            entity_times(past_mask, None),
            past_mask,
            params,
            self.config.memory_chunk_size,
            read=False,
        )
        return {name: t.contiguous() for name, t in state.items()}  # the layout a decoding step's state has


def _update_then_project(layer, following, hidden_states, x, positions, *update_args) -> tuple:
    """`layer._update`, then `following._project` of its output (None for the last layer): one compiled call where
    the layer-by-layer step makes two (each call of a compiled function costs tens of microseconds of its own)."""
    hidden_states, memory = DFNFlowLayer._update(layer, hidden_states, x, positions, *update_args)
    projected = None if following is None else DFNFlowLayer._project(following, hidden_states, positions)
    return hidden_states, memory, projected


def entity_times(entity_mask: torch.Tensor, past_real: torch.Tensor | None) -> torch.Tensor:
    """`(B, N)` time index of each new entity: its count among the real entities of its row (`entity_mask` `(B, N)`),
    continuing from `past_real` `(B,)` real entities before them (None: none); padding gets its predecessor's."""
    times = entity_mask.long().cumsum(1).sub(1).clamp_min(0)
    return times if past_real is None else times + past_real.view(-1, 1)


def _decode_layers(model, inputs_embeds, past_real, entity_mask, span, mask_buffer, stores, memories, boxes):
    """A whole decoding step's tensor work through `model` (a `DFNModel`), as one compiled call: the new entities'
    time positions, then per layer its projections, the new entity's write into the cache's buffers (`stores`, see
    `DFNCacheLayer.step_store`; the kept rows are `span`, the same in every layer), the search over the box tree
    where `boxes` gives its buffers (`step_boxes`), the update with the memory state of `memories` and the mask of
    every key (`DFNCache.step_mask`); then the final norm. One `span` for all layers: each integer argument costs the
    C++ wrapper a tensor of its own (about 9 µs). Returns the normalised states `(B, 1, E)`, each layer's new memory
    state, and whether every box search was exact (a 0-d bool; None where none ran), else the caller runs the step
    layer by layer."""
    layers = model.layers
    key_mask = DFNCache.mask_view(mask_buffer, span)
    position_ids = entity_times(entity_mask, past_real)
    hidden_states = inputs_embeds
    projected = DFNFlowLayer._project(layers[0], hidden_states, model.initial_positions(position_ids))
    new_memories, settled = [], None
    for index, layer in enumerate(layers):
        _, moved, queries, values, log_weights, _ = projected
        new_features = DFNFlowLayer._pack(moved, values, log_weights)
        features, keys = DFNCacheLayer.write_step(stores[index], span, new_features)
        neighbors = None
        if boxes[index] is not None:
            *neighbors, exact = DFNFlowLayer._step_tree_search(layer, queries, keys, key_mask, *boxes[index])
            settled = exact if settled is None else settled & exact
        hidden_states, memory = DFNFlowLayer._update(
            layer, hidden_states, *projected, features, keys, key_mask, neighbors, memories[index], position_ids,
            entity_mask,
        )  # fmt: skip
        new_memories.append(memory)
        if index + 1 < len(layers):
            projected = DFNFlowLayer._project(layers[index + 1], hidden_states, moved)
    return model.norm(hidden_states), new_memories, settled


class CompiledStep(NamedTuple):
    """The tensor work of a decoding step, compiled (see `DFNPreTrainedModel.compile_decoding`)."""

    project: Callable  # DFNFlowLayer._project
    update: Callable  # DFNFlowLayer._update
    tree_search: Callable  # DFNFlowLayer._step_tree_search
    update_then_project: Callable  # _update_then_project
    decode_layers: Callable  # _decode_layers


_COMPILED_STEPS: dict[str, CompiledStep] = {}


def _compiled_step(compile_options: dict, cpu: bool) -> CompiledStep:
    """The `CompiledStep` functions compiled with `torch.compile(dynamic=True, **compile_options)`, once per process
    and options: the layers are arguments, so all layers of one structure share a graph (`_update_then_project` has a
    second one for the last layer, which has no next layer to project for). For a model on the CPU, `_decode_layers`
    runs Inductor's C++ wrapper unless the options set `mode` or `cpp_wrapper`: it calls a step's kernels and matrix
    products without the generated Python wrapper (hundreds of lines per call), which costs about 0.2-0.5 ms a step
    (its compile takes about twice as long)."""
    key = repr((sorted(compile_options.items()), cpu))
    if key not in _COMPILED_STEPS:
        kwargs = {"dynamic": True, **compile_options}
        whole = kwargs
        if cpu and "mode" not in kwargs:
            whole = {**kwargs, "options": {"cpp_wrapper": True, **kwargs.get("options", {})}}
        layerwise = (DFNFlowLayer._project, DFNFlowLayer._update, DFNFlowLayer._step_tree_search, _update_then_project)
        _COMPILED_STEPS[key] = CompiledStep(
            *(torch.compile(step, **kwargs) for step in layerwise), torch.compile(_decode_layers, **whole)
        )
    return _COMPILED_STEPS[key]


def check_call(cache, kwargs: dict) -> None:
    """Reject what a forward of a DFN model cannot honour, instead of ignoring it: a cache of another class, and
    explicit `position_ids` (each entity's time comes from `attention_mask`: real entities are counted)."""
    if cache is not None and not isinstance(cache, DFNCache):
        raise ValueError(f"A DFN model needs a DFNCache (or None, and one is made), got {type(cache).__name__}")
    if kwargs.get("position_ids") is not None:
        raise ValueError(
            "DFN takes no position_ids: each entity's time is its count of real entities in attention_mask. Give "
            "packed documents their own rows (or padding) instead."
        )


class DFNPreTrainedModel(PreTrainedModel):
    config_class = DFNConfig
    config: DFNConfig
    base_model_prefix = "model"
    supports_gradient_checkpointing = True
    _no_split_modules = ["DFNFlowLayer"]
    # per-head scalars and slot positions that set the field's geometry (name suffixes). Adam moves a parameter by
    # about the learning rate per step whatever its gradient, so at 2e-3 these log-scale quantities move < 0.3 in a
    # 150-step run: training scripts give them their own, larger learning rate and no weight decay.
    _geometry_parameters = (
        "flow_alpha",
        "log_kernel_width",
        "log_time_scale",
        "memory_log_weight",
        "memory_write_scale",
        "memory_log_width",
        "memory_pos",
    )  # not the mean write's memory_prior_log_mass: with 30x the rate, the passkey recipe learned later (README)

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, *args, **kwargs):
        """As `PreTrainedModel.from_pretrained`, but a corrupt weights file or missing weights raise an error that
        names the file or the weights, instead of a bare deserialisation error or a warning and random weights."""
        return_info = kwargs.pop("output_loading_info", False)
        try:
            model, info = super().from_pretrained(
                pretrained_model_name_or_path, *args, output_loading_info=True, **kwargs
            )
        except SafetensorError as error:
            files = ", ".join(sorted(str(p) for p in Path(str(pretrained_model_name_or_path)).glob("*.safetensors")))
            raise OSError(
                f"The weights of {pretrained_model_name_or_path} cannot be read: {files or 'the safetensors file'} "
                f"is corrupt or truncated ({error})"
            ) from error
        if info["missing_keys"]:
            raise OSError(
                f"The checkpoint {pretrained_model_name_or_path} lacks weights this {cls.__name__} needs: "
                f"{sorted(info['missing_keys'])[:10]} (incompatible or incomplete checkpoint)"
            )
        # (weights offloaded by a device_map stay on the meta device)
        loaded = [(n, p) for n, p in model.named_parameters() if p.is_floating_point() and p.device.type != "meta"]
        broken = [name for name, p in loaded if not p.isfinite().all()]
        if broken:
            raise OSError(
                f"The checkpoint {pretrained_model_name_or_path} has NaN or infinite weights in {broken[:10]} (a "
                "diverged or corrupt checkpoint)"
            )
        return (model, info) if return_info else model

    def save_pretrained(self, save_directory, *args, **kwargs):
        """As `PreTrainedModel.save_pretrained`, after checking the config (changed in place since the model was
        made, e.g. by `resize_token_embeddings`) so that what is saved also loads."""
        try:
            self.config._validate_dfn()
        except ValueError as error:
            raise ValueError(f"Not saved: this model's config would not load again. {error}") from error
        return super().save_pretrained(save_directory, *args, **kwargs)

    def compile_decoding(self, **compile_options):
        """Compile the tensor work of cached decoding steps (one new entity per row, no gradients) with
        `torch.compile(dynamic=True, **compile_options)`. A step is one compiled call through all layers
        (`_decode_layers`): the new entity's time position, per layer its projections and flow, its write into the
        cache's buffers, the exact scan or the search over the box tree's blocks, the kernel mix, the field memory and
        the MLP, then the final norm. On the CPU that call runs Inductor's C++ wrapper (see `_compiled_step`). A step
        goes layer by layer instead, through the compiled `_project` and `_update_then_project` (a layer's update and
        the next layer's projections), where the memory state is rebuilt after a crop, a box search was not exact,
        the tree has more blocks than a step bounds at once, every layer's states or positions are asked for, or a
        layer or the final norm has hooks (e.g. accelerate's offloading); with global module hooks a step is eager.
        The cache's bookkeeping and the tree's deeper descent and fallback stay eager (a completed block's box joins
        the tree after the call), so a growing cache (new blocks, memory commits, longer contexts) reuses the same
        graphs. Full passes, training and calls with several new entities are unchanged; the eager step stays the
        reference (tested equal). The first decoding steps compile: a minute or two on the CPU, where a C++ compiler
        is needed. Returns the model."""
        step = _compiled_step(compile_options, self.device.type == "cpu")
        for layer in self.base_model.layers:
            layer.compiled_step = step
        return self

    def _init_weights(self, module):
        super()._init_weights(module)
        config = self.config
        if isinstance(module, DFNFlowNorm):
            init.ones_(module.weight)
        elif isinstance(module, DFNFlowLayer):
            if config.use_flow:
                init.constant_(module.flow_alpha, float(config.flow_alpha_init))
            init.constant_(module.log_kernel_width, math.log(config.kernel_width_init))
            init.normal_(
                module.mlp.down_proj.weight, std=config.initializer_range / math.sqrt(2 * config.num_hidden_layers)
            )
            if config.use_memory:
                if config.pos_dim > 1:
                    init.normal_(module.memory_pos, std=1.0)
                    init.constant_(module.memory_log_width, math.log(config.kernel_width_init))
                init.normal_(module.memory_val, std=config.initializer_range)
                # by default the slots together start with ~1 % of a near neighbour's kernel mass: a fresh memory holds
                # no context yet. Measured (compare.py cpu preset, 150 steps, ctx 256): val 2.2596 with weight 1/2 per
                # slot, 2.1507 at a tenth of a neighbour's mass, 2.1384 at this init.
                init.constant_(module.memory_log_weight, config.memory_init_log_mass - math.log(config.memory_slots))
                # write scale β = 1/C: a chunk of average entities moves a slot part of the way, not all of it
                init.constant_(module.memory_write_scale, -math.log(config.memory_chunk_size))
                if config.memory_write == "mean":
                    init.constant_(module.memory_prior_log_mass, config.memory_prior_log_mass)
        elif isinstance(module, DFNModel):
            heads = config.num_attention_heads
            scales = torch.logspace(
                math.log10(config.time_scale_max), math.log10(config.time_scale_min), heads, dtype=torch.float32
            )
            init.copy_(module.log_time_scale, scales.log())


class DFNModel(DFNPreTrainedModel):
    """The DFN backbone: byte embeddings, `num_hidden_layers` flow layers and a final FlowNorm."""

    def __init__(self, config: DFNConfig):
        config._validate_dfn()  # fields may have been changed since the config was made
        super().__init__(config)
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(DFNFlowLayer(config, i) for i in range(config.num_hidden_layers))
        self.norm = make_norm(config)
        self.log_time_scale = nn.Parameter(torch.zeros(config.num_attention_heads))
        self.gradient_checkpointing = False
        self.post_init()

    def get_input_embeddings(self):
        return self.embed_tokens

    def set_input_embeddings(self, value):
        self.embed_tokens = value

    def initial_positions(self, position_ids: torch.Tensor) -> torch.Tensor:
        """`(B, N)` real-entity indices -> `(B, N, H, k)` positions: scaled time first, zeros elsewhere."""
        time = position_ids.float().unsqueeze(-1) * torch.exp(self.log_time_scale.float())  # (B, N, H)
        rest = time.new_zeros(*time.shape, self.config.pos_dim - 1)
        return torch.cat([time.unsqueeze(-1), rest], dim=-1)

    @can_return_tuple
    @deprecate_kwarg("past_key_values", "5.40.0", new_name="cache")
    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        inputs_embeds: torch.Tensor | None = None,
        cache: DFNCache | None = None,
        use_cache: bool | None = None,
        output_hidden_states: bool | None = None,
        output_positions: bool = False,
        **kwargs,
    ) -> DFNModelOutput:
        r"""
        Args:
            input_ids (`torch.LongTensor` of shape `(batch_size, sequence_length)`): byte ids (new entities only when
                a non-empty `cache` is given).
            attention_mask (`torch.Tensor` of shape `(batch_size, cache_length + sequence_length)`): 1 for real
                entities, 0 for padding (left or right).
            inputs_embeds (`torch.Tensor` of shape `(batch_size, sequence_length, hidden_size)`): instead of ids.
            cache (`DFNCache`): state from previous calls; the new entities continue it.
            use_cache (`bool`): return a `DFNCache` (a new one if none was given).
            output_positions (`bool`): return the entity positions entering and leaving each layer.
        """
        check_call(cache, kwargs)
        output_hidden_states = (
            output_hidden_states if output_hidden_states is not None else self.config.output_hidden_states
        )
        use_cache = use_cache if use_cache is not None else (self.config.use_cache and not self.training)
        if self.gradient_checkpointing and self.training:
            use_cache = False
            if cache is not None and torch.is_grad_enabled():
                raise ValueError(
                    "activation checkpointing cannot train through a DFNCache: the backward pass replays each layer, "
                    "which would write the segment into the cache twice; call model.activation_checkpointing_disable()"
                )
        inputs_embeds = self._embed(input_ids, inputs_embeds)
        batch, length, _ = inputs_embeds.shape
        if cache is not None:
            cache.check_compatible(self, batch)
        # a row may have no real entity yet only while a document is read in segments into a given cache
        entity_mask = self._entity_mask(attention_mask, cache, batch, length, inputs_embeds.device)
        if use_cache and cache is None:
            cache = DFNCache(self.config)
            cache.check_compatible(self, batch)  # (it now belongs to this model)
        past_real = None  # real entities before the new ones, per row
        if cache is not None:
            past_real = cache.real_lengths(batch, inputs_embeds.device)
        key_mask = cache.append_mask(entity_mask) if cache is not None else entity_mask

        step = self._fused_decoding_step(cache, length, output_hidden_states or output_positions)
        hidden_states = all_hidden = all_positions = None
        if step is not None:
            hidden_states = self._decode_layers_at_once(step, inputs_embeds, past_real, entity_mask, key_mask, cache)
        if hidden_states is None:
            hidden_states, all_hidden, all_positions = self._run_layers(
                step, inputs_embeds, entity_times(entity_mask, past_real), entity_mask, key_mask, cache,
                output_hidden_states, output_positions,
            )  # fmt: skip
        if cache is not None:
            cache.trim()
        return DFNModelOutput(
            last_hidden_state=hidden_states,
            cache=cache if use_cache else None,
            hidden_states=all_hidden,
            positions=all_positions,
        )

    def _run_layers(
        self, step, hidden_states, position_ids, entity_mask, key_mask, cache, output_hidden_states, output_positions
    ) -> tuple:
        """The layers one by one (each layer's forward, or `step`'s layer-by-layer compiled calls), then the final
        norm. Returns the normalised states `(B, N, E)` and, where asked for, every layer's states and positions."""
        positions = self.initial_positions(position_ids)
        if step is not None:
            args = (hidden_states, positions, position_ids, entity_mask, key_mask, cache)
            return self.norm(self._compiled_layer_by_layer(step, *args)), None, None
        all_hidden = (hidden_states,) if output_hidden_states else None
        all_positions = (positions,) if output_positions else None
        for layer in self.layers:
            cache_layer = cache.layers[layer.layer_idx] if cache is not None else None
            hidden_states, positions = layer(hidden_states, positions, position_ids, entity_mask, key_mask, cache_layer)
            if output_hidden_states:
                all_hidden += (hidden_states,)
            if output_positions:
                all_positions += (positions,)
        hidden_states = self.norm(hidden_states)
        if output_hidden_states:
            all_hidden = all_hidden[:-1] + (hidden_states,)
        return hidden_states, all_hidden, all_positions

    def _fused_decoding_step(self, cache, length: int, every_layer: bool) -> CompiledStep | None:
        """The `CompiledStep` all layers share where this call can run it (`_decode_layers_at_once`, else
        `_run_layers`): a decoding step (see `DFNFlowLayer._decoding_step`) that asks for no layer's output
        (`every_layer`) and calls no forward hooks of the layers or the final norm (accelerate's device maps and
        offloading hook the layers' forward, which the compiled step does not call)."""
        step = self.layers[0]._decoding_step(cache.layers[0] if cache is not None else None, length)
        if step is None or every_layer:
            return None
        shared = all(layer.compiled_step is step and "_hf_hook" not in layer.__dict__ for layer in self.layers)
        hooked = any(module._forward_hooks or module._forward_pre_hooks for module in (*self.layers, self.norm))
        return step if shared and not hooked else None

    def _compiled_layer_by_layer(self, step, hidden_states, positions, position_ids, entity_mask, key_mask, cache):
        """A compiled decoding step that `_decode_layers_at_once` does not take: as each layer's forward, but each
        layer's update and the next layer's projections run as one compiled call (`_update_then_project`). Returns
        the last layer's states."""
        projected = step.project(self.layers[0], hidden_states, positions)
        for layer, following in zip(self.layers, [*self.layers[1:], None], strict=True):
            cache_layer = cache.layers[layer.layer_idx]
            inputs = layer._prepare(projected, key_mask, cache_layer, step)
            hidden_states, memory, next_projected = step.update_then_project(
                layer, following, hidden_states, *inputs, position_ids, entity_mask
            )
            layer._store_memory(cache_layer, memory)
            projected = next_projected
        return hidden_states

    def _decode_layers_at_once(self, step, inputs_embeds, past_real, entity_mask, key_mask, cache):
        """`step.decode_layers` where it applies: every layer's cache holds entities, its memory state is at hand
        and its box search needs no eager descent. The cache keeps the new entities and memory states only if every
        box search was exact. Returns the normalised states, or None (then the step runs layer by layer)."""
        cache_layers = [cache.layers[layer.layer_idx] for layer in self.layers]
        stores = [cache_layer.step_store() for cache_layer in cache_layers]
        if any(store is None for store in stores):
            return None
        spans = {cache_layer.span for cache_layer in cache_layers}
        mask_buffer = cache.step_mask(*spans) if len(spans) == 1 else None
        if mask_buffer is None:
            return None  # (never expected: the layers' and the mask's rows move together, and the graph relies on it)
        span = spans.pop()
        memories = [None] * len(cache_layers)
        if self.config.use_memory:
            if any(cache_layer.memory is None or cache_layer.memory_stale for cache_layer in cache_layers):
                return None
            memories = [cache_layer.memory for cache_layer in cache_layers]
        boxes = []
        for layer, cache_layer in zip(self.layers, cache_layers, strict=True):
            searched = layer._searches_tree(cache_layer.boxes, 1)
            levels = step_boxes(cache_layer.boxes) if searched else None
            if searched and levels is None:
                return None  # a tree too large for the step's two levels: the eager descent
            boxes.append(levels)
        hidden_states, memories, settled = step.decode_layers(
            self, inputs_embeds, past_real, entity_mask, span, mask_buffer, stores, memories, boxes
        )
        if settled is not None and not bool(settled):
            return None  # a box search was not exact: the layer-by-layer step writes the same rows again
        for cache_layer, memory in zip(cache_layers, memories, strict=True):
            cache_layer.advance(key_mask)
            DFNFlowLayer._store_memory(cache_layer, memory)
        return hidden_states

    def _embed(self, input_ids, inputs_embeds) -> torch.Tensor:
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("Pass exactly one of input_ids or inputs_embeds")
        if input_ids is not None:
            if (
                not isinstance(input_ids, torch.Tensor)
                or input_ids.dtype.is_floating_point
                or input_ids.dtype == torch.bool
            ):
                raise ValueError(
                    f"input_ids must be an integer tensor, got {getattr(input_ids, 'dtype', type(input_ids))}"
                )
            if input_ids.dim() != 2:
                raise ValueError(
                    f"input_ids must have shape (batch_size, sequence_length), got {tuple(input_ids.shape)}"
                )
            if input_ids.numel() == 0:
                raise ValueError(f"input_ids is empty (shape {tuple(input_ids.shape)}): give at least one entity")
            low, high = (int(bound) for bound in torch.aminmax(input_ids))
            if low < 0 or high >= self.config.vocab_size:
                raise ValueError(
                    f"input_ids must lie in [0, vocab_size={self.config.vocab_size}), got values in [{low}, {high}]"
                )
            return self.embed_tokens(input_ids.long())
        if inputs_embeds.dtype != self.embed_tokens.weight.dtype:
            raise ValueError(
                f"inputs_embeds must have the model's dtype {self.embed_tokens.weight.dtype}, got {inputs_embeds.dtype}"
            )
        if inputs_embeds.dim() != 3 or inputs_embeds.shape[-1] != self.config.hidden_size:
            raise ValueError(
                f"inputs_embeds must have shape (batch_size, sequence_length, {self.config.hidden_size}), "
                f"got {tuple(inputs_embeds.shape)}"
            )
        if inputs_embeds.shape[0] == 0 or inputs_embeds.shape[1] == 0:
            raise ValueError(f"inputs_embeds is empty (shape {tuple(inputs_embeds.shape)})")
        if not torch.isfinite(inputs_embeds).all():
            raise ValueError("inputs_embeds contains NaN or inf")
        return inputs_embeds

    @staticmethod
    def _entity_mask(attention_mask, cache, batch, length, device) -> torch.Tensor:
        """Validate `attention_mask` `(B, past + N)` against the cache; return the new entities' mask `(B, N)`. With
        a cache, only the last `MASK_PAST_CHECKED` past columns are read (and compared with the cache's record,
        which is what counts): generate() hands every step the whole mask, and reading all of it made a decoding
        step O(context)."""
        if attention_mask is None:
            return torch.ones(batch, length, dtype=torch.bool, device=device)
        past_length = cache.get_seq_length() if cache is not None else 0
        if attention_mask.dim() != 2 or tuple(attention_mask.shape) != (batch, past_length + length):
            raise ValueError(
                f"attention_mask must have shape (batch_size, cache_length + sequence_length) = "
                f"({batch}, {past_length + length}), got {tuple(attention_mask.shape)}"
            )
        read = attention_mask[:, max(past_length - MASK_PAST_CHECKED, 0) :]
        if not binary(read):
            raise ValueError("attention_mask must contain only 0 and 1")
        mask = read.bool()
        past, new = mask[:, : mask.shape[1] - length], mask[:, mask.shape[1] - length :]
        kept = cache.entity_mask if past_length else None
        compared = min(past.shape[1], kept.shape[1]) if kept is not None else 0
        if compared and not torch.equal(past[:, past.shape[1] - compared :], kept[:, kept.shape[1] - compared :]):
            # e.g. generate() continuing from a cache re-derives the mask from pad tokens written after an eos
            logger.warning_once(
                "attention_mask disagrees with the cache about which past entities are padding; the cache's record "
                "(how those entities were processed) is kept"
            )
        if cache is None and not bool(mask.any(1).all()):
            raise ValueError("attention_mask has a row with no real entity (all zeros)")
        if not bool(new.any()):
            raise ValueError("attention_mask marks every new entity as padding")
        return new


def binary(mask: torch.Tensor) -> bool:
    """Whether `mask` holds only 0 and 1 (one `aminmax` for an integer mask: a decoding step checks one per call)."""
    if mask.dtype == torch.bool:
        return True
    if mask.dtype.is_floating_point or mask.dtype.is_complex:
        return bool(((mask == 0) | (mask == 1)).all())
    low, high = torch.aminmax(mask)
    return int(low) >= 0 and int(high) <= 1


def check_labels(labels: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """Labels are integer ids in [0, vocab_size), or -100 where no loss is taken; returned as int64 (the loss takes
    no other integer type, and uint8 bytes, like input ids, are accepted)."""
    if labels.dtype.is_floating_point or labels.dtype.is_complex or labels.dtype == torch.bool:
        raise ValueError(f"labels must be an integer tensor, got {labels.dtype}")
    labels = labels.long()
    wrong = (labels != -100) & ((labels < 0) | (labels >= vocab_size))
    if bool(wrong.any()):
        raise ValueError(f"labels must lie in [0, vocab_size={vocab_size}) or be -100, got {int(labels[wrong][0])}")
    return labels


def _kept_entities(logits_to_keep) -> slice | torch.Tensor | None:
    """The entities whose logits `logits_to_keep` asks for: None for all (None or 0), the last n for an int (or a 0-d
    tensor), else a 1-D tensor of indices."""
    if isinstance(logits_to_keep, torch.Tensor) and logits_to_keep.dim() == 0:
        logits_to_keep = int(logits_to_keep)
    if logits_to_keep is None or isinstance(logits_to_keep, numbers.Integral):
        if logits_to_keep is not None and logits_to_keep < 0:
            raise ValueError(f"logits_to_keep must be >= 0 (0 keeps all), got {logits_to_keep}")
        return slice(-int(logits_to_keep), None) if logits_to_keep else None
    if logits_to_keep.dim() != 1 or logits_to_keep.dtype.is_floating_point or logits_to_keep.dtype == torch.bool:
        raise ValueError(
            f"logits_to_keep must be an int or a 1-D integer tensor of entity indices, got a {logits_to_keep.dtype} "
            f"tensor of shape {tuple(logits_to_keep.shape)}"
        )
    return logits_to_keep


class DFNForCausalLM(DFNPreTrainedModel, GenerationMixin):
    """DFN with a language-modelling head (tied to the byte embeddings by default)."""

    _tied_weights_keys = {"lm_head.weight": "model.embed_tokens.weight"}

    def __init__(self, config: DFNConfig):
        super().__init__(config)
        self.model = DFNModel(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.post_init()

    @classmethod
    def _supports_default_dynamic_cache(cls) -> bool:
        return False  # generate() must not hand the model a DynamicCache

    def _prepare_cache_for_generation(self, generation_config, model_kwargs, *args, **kwargs):
        """Give generate() a `DFNCache` up front (assisted decoding needs one before the first forward)."""
        super()._prepare_cache_for_generation(generation_config, model_kwargs, *args, **kwargs)
        if model_kwargs.get("cache") is None and generation_config.use_cache:
            model_kwargs["cache"] = DFNCache(self.config)

    def get_input_embeddings(self):
        return self.model.embed_tokens

    def set_input_embeddings(self, value):
        self.model.embed_tokens = value

    def get_output_embeddings(self):
        return self.lm_head

    def set_output_embeddings(self, new_embeddings):
        self.lm_head = new_embeddings

    @can_return_tuple
    @deprecate_kwarg("past_key_values", "5.40.0", new_name="cache")
    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        inputs_embeds: torch.Tensor | None = None,
        cache: DFNCache | None = None,
        labels: torch.LongTensor | None = None,
        use_cache: bool | None = None,
        output_hidden_states: bool | None = None,
        output_positions: bool = False,
        logits_to_keep: int | torch.Tensor = 0,
        **kwargs,
    ) -> DFNCausalLMOutput:
        r"""
        labels (`torch.LongTensor` of shape `(batch_size, sequence_length)`): next-byte targets (shifted inside);
            -100 is ignored. `num_items_in_batch` (from Trainer) is honoured.
        logits_to_keep (`int` or `torch.Tensor`): an int computes logits for the last `logits_to_keep` entities only
            (0 = all); a 1-D tensor of entity indices, for those entities.
        """
        check_call(cache, kwargs)
        outputs = self.model(
            input_ids=input_ids,
            attention_mask=attention_mask,
            inputs_embeds=inputs_embeds,
            cache=cache,
            use_cache=use_cache,
            output_hidden_states=output_hidden_states,
            output_positions=output_positions,
        )
        hidden_states = outputs.last_hidden_state
        kept = _kept_entities(logits_to_keep)
        if kept is not None:
            hidden_states = hidden_states[:, kept]
        logits = self.lm_head(hidden_states)
        loss = None
        if labels is not None:
            expected = tuple(outputs.last_hidden_state.shape[:2])
            if tuple(labels.shape) != expected:
                raise ValueError(
                    f"labels must have shape (batch_size, sequence_length) = {expected}, got {tuple(labels.shape)}"
                )
            if kept is not None:
                raise ValueError("labels cannot be combined with logits_to_keep")
            labels = check_labels(labels, self.config.vocab_size)
            loss = self.loss_function(logits, labels, vocab_size=self.config.vocab_size, **kwargs)
        return DFNCausalLMOutput(
            loss=loss,
            logits=logits,
            cache=outputs.cache,
            hidden_states=outputs.hidden_states,
            positions=outputs.positions,
        )


__all__ = ["DFNForCausalLM", "DFNModel", "DFNPreTrainedModel", "DFNCache"]
