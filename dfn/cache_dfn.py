"""Generation cache of DFN: per layer the entity positions, values, influence weights and the field memory.

Axis legend: B batch, T cached entities (padding included), H heads, k pos_dim, D head_dim, M memory slots.
"""

import torch
from transformers.cache_utils import Cache, CacheLayerMixin


def cache_signature(config) -> dict:
    """The config fields a cache's tensors depend on; a cache is only valid for a model with the same ones."""
    return {
        "num_hidden_layers": config.num_hidden_layers,
        "num_attention_heads": config.num_attention_heads,
        "head_dim": config.hidden_size // config.num_attention_heads,
        "pos_dim": config.pos_dim,
        "use_memory": config.use_memory,
        "memory_slots": config.memory_slots,
        "memory_chunk_size": config.memory_chunk_size,
    }


class DFNCacheLayer(CacheLayerMixin):
    """One layer's cache.

    `features` `(B, T, H, k + D + 1)` packs, per entity and head, the position after the layer's flow (what
    neighbours are compared in), the value and the log influence weight: exactly what a neighbour lookup gathers.
    It lives in a buffer whose capacity doubles when full, so appending one entity costs O(1) amortised instead of
    a copy of the whole context. `memory` is the field-memory state (a dict of tensors, see `memory_dfn.py`). After
    `crop` the memory is marked stale and the model rebuilds it exactly from the cached entities on the next forward.
    """

    is_croppable = True
    is_sliding = False

    def __init__(self, pos_dim: int):
        super().__init__()
        self.pos_dim = pos_dim
        self.buffer: torch.Tensor | None = None
        self.length = 0
        self.memory: dict | None = None
        self.memory_stale = False

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor | None = None) -> None:
        batch, _, heads, features = key_states.shape
        self.buffer = key_states.new_zeros(batch, 64, heads, features)
        self.length = 0
        self.is_initialized = True

    def update(self, key_states: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        """Append new entities' packed features `(B, N, H, F)`; returns all cached ones `(B, T + N, H, F)`."""
        if not self.is_initialized:
            self.lazy_initialization(key_states)
        needed = self.length + key_states.shape[1]
        if needed > self.buffer.shape[1]:
            grown = self.buffer.new_zeros(
                self.buffer.shape[0], max(needed, 2 * self.buffer.shape[1]), *self.buffer.shape[2:]
            )
            grown[:, : self.length] = self.buffer[:, : self.length]
            self.buffer = grown
        self.buffer[:, self.length : needed] = key_states.detach()
        self.length = needed
        return self.features

    @property
    def features(self) -> torch.Tensor | None:
        return None if self.buffer is None else self.buffer[:, : self.length]

    @property
    def positions(self) -> torch.Tensor:
        """`(B, T, H, k)` cached entity positions."""
        return self.features[..., : self.pos_dim]

    @property
    def entity_values(self) -> torch.Tensor:
        """`(B, T, H, D)` cached entity values."""
        return self.features[..., self.pos_dim : -1]

    @property
    def log_weights(self) -> torch.Tensor:
        """`(B, T, H)` cached log influence weights."""
        return self.features[..., -1]

    def get_seq_length(self) -> int:
        return self.length

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self.length + query_length, 0

    def get_max_length(self) -> int:
        return -1

    def reset(self) -> None:
        self.buffer, self.length, self.memory = None, 0, None
        self.memory_stale = False
        self.is_initialized = False

    def offload(self):
        raise NotImplementedError("DFNCache does not support offloading")

    prefetch = offload

    def _apply(self, fn) -> None:
        """Apply `fn` to every batch-first tensor this layer holds."""
        if not self.is_initialized:
            return
        self.buffer = fn(self.buffer)
        if self.memory is not None:
            self.memory = {name: fn(t) for name, t in self.memory.items()}

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        self._apply(lambda t: t.index_select(0, beam_idx.to(t.device)))

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        self._apply(lambda t: t[indices])

    def batch_repeat_interleave(self, repeats: int) -> None:
        self._apply(lambda t: t.repeat_interleave(repeats, dim=0))

    def crop(self, tokens_to_remove: int) -> None:
        """Remove the last `-tokens_to_remove` entities (a negative count, as in `DynamicLayer.crop`)."""
        if tokens_to_remove > 0:
            raise ValueError(f"crop takes a negative number of entities to remove, got {tokens_to_remove}")
        if tokens_to_remove == 0 or not self.is_initialized:
            return
        keep = max(self.get_seq_length() + tokens_to_remove, 0)
        self.keys, self.values, self.log_weights = (
            self.keys[:, :keep],
            self.values[:, :keep],
            self.log_weights[:, :keep],
        )
        if self.memory is not None:
            self.memory, self.memory_stale = None, True


class DFNCache(Cache):
    """Cache of a [`DFNModel`] for incremental decoding and reading documents in segments.

    Besides one [`DFNCacheLayer`] per layer it holds `entity_mask` `(B, T)`: which cached entities are real (not
    padding). Real-entity counts, hence time coordinates and memory-chunk boundaries, derive from it.

    Args:
        config: the model's config; a cache only fits models whose `cache_signature` matches.
    """

    def __init__(self, config):
        super().__init__(layers=[DFNCacheLayer(config.pos_dim) for _ in range(config.num_hidden_layers)])
        self.signature = cache_signature(config)
        self.entity_mask: torch.Tensor | None = None

    def check_compatible(self, config, batch_size: int) -> None:
        """Raise a clear error if this cache was made for another model or another batch."""
        expected = cache_signature(config)
        if self.signature != expected:
            wrong = {k: (self.signature.get(k), v) for k, v in expected.items() if self.signature.get(k) != v}
            raise ValueError(f"This DFNCache was built for another model configuration: (cache, model) = {wrong}")
        if self.entity_mask is not None and self.entity_mask.shape[0] != batch_size:
            raise ValueError(
                f"This DFNCache holds {self.entity_mask.shape[0]} sequences but the input has batch size {batch_size}"
            )

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return 0 if self.entity_mask is None else self.entity_mask.shape[1]

    def real_lengths(self, batch_size: int, device) -> torch.Tensor:
        """`(B,)` number of real (non-padding) entities seen so far per row."""
        if self.entity_mask is None:
            return torch.zeros(batch_size, dtype=torch.long, device=device)
        return self.entity_mask.sum(1)

    def append_mask(self, mask: torch.Tensor) -> torch.Tensor:
        """Append the new entities' mask `(B, N)`; returns the full mask `(B, T + N)`."""
        mask = mask.bool()
        self.entity_mask = mask if self.entity_mask is None else torch.cat([self.entity_mask, mask], 1)
        return self.entity_mask

    def _apply_mask(self, fn) -> None:
        if self.entity_mask is not None:
            self.entity_mask = fn(self.entity_mask)

    def reorder_cache(self, beam_idx: torch.LongTensor):
        super().reorder_cache(beam_idx)
        self._apply_mask(lambda t: t.index_select(0, beam_idx.to(t.device)))

    def batch_select_indices(self, indices: torch.Tensor):
        super().batch_select_indices(indices)
        self._apply_mask(lambda t: t[indices])

    def batch_repeat_interleave(self, repeats: int):
        super().batch_repeat_interleave(repeats)
        self._apply_mask(lambda t: t.repeat_interleave(repeats, dim=0))

    def crop(self, tokens_to_remove: int) -> None:
        super().crop(tokens_to_remove)
        if tokens_to_remove < 0:
            self._apply_mask(lambda t: t[:, : max(t.shape[1] + tokens_to_remove, 0)])

    def reset(self):
        super().reset()
        self.entity_mask = None


__all__ = ["DFNCache", "DFNCacheLayer", "cache_signature"]
