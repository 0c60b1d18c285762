"""Generation cache of DFN: per layer the entity positions, values, influence weights and the field memory.

Axis legend: B batch, T cached entities (padding included), H heads, k pos_dim, D head_dim, F = k + D + 1.
"""

import weakref
from typing import NamedTuple

import torch
from transformers.cache_utils import Cache, CacheLayerMixin

from .neighbors_dfn import DECODE_BLOCK, BlockBoxes, capacity_dynamic


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
        "memory_write": config.memory_write,
    }


BOUNDED_FIRST_ROW = 2  # where a bounded cache's buffers keep their rows from (see `RowBuffer`)


class RowBuffer:
    """Rows `(B, T, ...)` appended along dim 1 into a buffer that is compacted to the front, or doubled, only when
    full: an append costs O(1) amortised instead of a copy of every kept row. `rows` is a view of the kept ones.

    `time_dim` is where the buffer stores the row axis: 1, or -1 to keep each row's values apart with the rows
    innermost (a scan over the rows of one coordinate then reads contiguous memory); `rows` is `(B, T, ...)` either way.
    """

    def __init__(self, like: torch.Tensor, time_dim: int = 1, first: int = 0):
        """An empty buffer for rows like `like`'s, with room for them and a quarter more (so the decoding steps
        after a prefill do not copy the whole context). The rows start at row `first`, also after each compaction: a
        bounded cache's buffers use `BOUNDED_FIRST_ROW`, so the start a compiled decoding step is handed (or its
        offset in the mask) is never 0 or 1, values Dynamo specialises a graph on. Else the step compiled again once
        the window began to slide."""
        length = like.shape[1]
        self.time_dim = time_dim
        self.first = first
        self.buffer = self._empty(like.movedim(1, time_dim), max(64, first + length + length // 4))
        self.start = self.end = first

    def _empty(self, like: torch.Tensor, capacity: int) -> torch.Tensor:
        shape = list(like.shape)
        shape[self.time_dim] = capacity
        return capacity_dynamic(like.new_zeros(shape), self.time_dim)

    def append(self, new: torch.Tensor) -> None:
        self.reserve(new.shape[1])
        self.write(self.buffer, self.time_dim, self.end, new)
        self.end += new.shape[1]

    def reserve(self, count: int) -> None:
        """Make room for `count` more rows after `end`: compact the rows to the front, doubling if still half full."""
        axis = self.time_dim
        # the rows never fill the buffer exactly: a view of a whole buffer would make compiled decoding steps compile
        # once more (several seconds in the middle of a generation)
        if self.end + count >= self.buffer.shape[axis]:
            needed, capacity = self.first + self.length + count, self.buffer.shape[axis]
            if 2 * needed >= capacity:
                capacity = max(needed + 1, 2 * capacity)
            grown = self._empty(self.buffer, capacity)
            grown.narrow(axis, self.first, self.length).copy_(self.buffer.narrow(axis, self.start, self.length))
            self.buffer, self.start, self.end = grown, self.first, self.first + self.length

    @staticmethod
    def write(buffer: torch.Tensor, time_dim: int, end: int, new: torch.Tensor) -> None:
        """Write rows `new` `(B, N, ...)` into `buffer` from row `end` on (room reserved). Static, as a compiled
        decoding step calls it on the buffer it was handed."""
        buffer.narrow(time_dim, end, new.shape[1]).copy_(new.detach().movedim(1, time_dim))

    @staticmethod
    def view(buffer: torch.Tensor, time_dim: int, start: int, length: int) -> torch.Tensor:
        """Rows `start` to `start + length` of `buffer` as `(B, length, ...)`."""
        return buffer.narrow(time_dim, start, length).movedim(time_dim, 1)

    @property
    def length(self) -> int:
        return self.end - self.start

    @property
    def rows(self) -> torch.Tensor:
        return self.view(self.buffer, self.time_dim, self.start, self.length)

    def keep_last(self, count: int) -> None:
        self.start = max(self.start, self.end - count)

    def keep_first(self, count: int) -> None:
        self.end = self.start + min(max(count, 0), self.length)

    def apply(self, fn) -> None:
        """Apply a batch-first `fn` (reorder, select or repeat sequences) to the whole buffer, headroom included."""
        self.buffer = capacity_dynamic(fn(self.buffer), self.time_dim)


POSITIONS_TIME_DIM = -1  # `DFNCacheLayer.key_positions` keeps the entities innermost


class StepStore(NamedTuple):
    """A cache layer's buffers, with room for one more entity, handed to a compiled decoding step that appends the
    new entity itself (`DFNCacheLayer.step_store`): its kept rows are those of the layer's `span` in both buffers."""

    features: torch.Tensor  # RowBuffer buffer of the packed rows (B, capacity, H, F)
    positions: torch.Tensor  # RowBuffer buffer of the positions, entities innermost (B, H, k, capacity)


class DFNCacheLayer(CacheLayerMixin):
    """One layer's cache.

    `features` `(B, T, H, F)` packs, per entity and head, the position after the layer's flow (what neighbours are
    compared in), the value and the log influence weight: exactly what a neighbour lookup gathers. They live in a
    `RowBuffer`, so one decoding step costs O(1) amortised instead of a copy of the whole context. `trim(window)`
    drops all but the last `window` entities (bounded mode). The positions are kept a second time, coordinate by
    coordinate with the entities innermost (`key_positions`): a decoding step's scan over them then runs on contiguous
    memory, several times faster than over the packed rows. Both buffers go through the same appends and cuts, so
    their rows always line up (`entities.start`/`end` index both). `memory` is the field-memory state (a dict of
    tensors, see `memory_dfn.py`); after `crop` it is marked stale and the model rebuilds it exactly from the cached
    entities on the next forward.
    """

    is_croppable = True
    is_sliding = False

    def __init__(self, pos_dim: int, bounded: bool = False, memory_grad: bool = False):
        super().__init__()
        self.pos_dim = pos_dim
        self.bounded = bounded  # a bounded cache's layer: no block structure (it searches at most its window)
        self.memory_grad = memory_grad  # keep the memory state's autograd graph across calls (see DFNCache)
        self.entities: RowBuffer | None = None
        self.key_positions: RowBuffer | None = None
        self.memory: dict | None = None
        self.memory_stale = False
        self.boxes: BlockBoxes | None = None

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor | None = None) -> None:
        first = BOUNDED_FIRST_ROW if self.bounded else 0
        self.entities = RowBuffer(key_states, first=first)
        self.key_positions = RowBuffer(key_states[..., : self.pos_dim], time_dim=POSITIONS_TIME_DIM, first=first)
        self.is_initialized = True

    def update(self, key_states: torch.Tensor, key_valid: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        """Append new entities' packed features `(B, N, H, F)`; returns all cached ones `(B, T + N, H, F)`.
        `key_valid` `(B, T + N)` marks the real entities among them (for the block boxes)."""
        if not self.is_initialized:
            self.lazy_initialization(key_states)
        self.entities.append(key_states)
        self.key_positions.append(key_states[..., : self.pos_dim])
        if not self.bounded:
            self._extend_boxes(key_valid)
        return self.features

    def step_store(self) -> StepStore | None:
        """For a compiled decoding step that appends one new entity itself (`write_step`), then `advance`: the
        buffers with room for it. None where nothing is cached yet."""
        if not self.is_initialized:
            return None
        self.entities.reserve(1)
        self.key_positions.reserve(1)
        return StepStore(self.entities.buffer, self.key_positions.buffer)

    @property
    def span(self) -> tuple[int, int]:
        """`(start, end)`: the kept rows of both buffers. Every layer of a cache has the same (they move together)."""
        return self.entities.start, self.entities.end

    @staticmethod
    def write_step(store: StepStore, span: tuple[int, int], new_features: torch.Tensor) -> tuple:
        """Inside a compiled decoding step: write the new entity's packed features `(B, 1, H, F)` after the rows
        `span` of `store`; returns every key's features `(B, T + 1, H, F)` and positions `(B, T + 1, H, k)` (as
        `update` and `positions`)."""
        start, end = span
        pos_dim = store.positions.shape[-2]
        RowBuffer.write(store.features, 1, end, new_features)
        RowBuffer.write(store.positions, POSITIONS_TIME_DIM, end, new_features[..., :pos_dim])
        return (
            RowBuffer.view(store.features, 1, start, end + 1 - start),
            RowBuffer.view(store.positions, POSITIONS_TIME_DIM, start, end + 1 - start),
        )

    def advance(self, key_valid: torch.Tensor) -> None:
        """Keep the entity a compiled decoding step wrote (`write_step`) into the buffers of `step_store`;
        `key_valid` `(B, T + 1)` as in `update`. Where it completes a block, the block's box joins the tree here:
        the step searched that block as part of the unfinished tail."""
        self.entities.end += 1
        self.key_positions.end += 1
        if not self.bounded:
            self._extend_boxes(key_valid)

    def _extend_boxes(self, key_valid: torch.Tensor) -> None:
        """Add the bounding boxes of newly completed blocks to the decoding search structure (`causal_knn_blocks`)."""
        done = 0 if self.boxes is None else self.boxes.num_blocks
        complete = self.entities.end // DECODE_BLOCK
        if complete > done:
            if self.boxes is None:
                self.boxes = BlockBoxes()
            self.boxes.extend(self.positions, key_valid, done, complete)

    def trim(self, window: int) -> None:
        """Keep only the last `window` entities."""
        self.entities.keep_last(window)
        self.key_positions.keep_last(window)

    @property
    def length(self) -> int:
        return 0 if self.entities is None else self.entities.length

    @property
    def features(self) -> torch.Tensor | None:
        return None if self.entities is None else self.entities.rows

    @property
    def positions(self) -> torch.Tensor:
        """`(B, T, H, k)` cached entity positions (a view of `key_positions`: the entity axis is innermost)."""
        return None if self.key_positions is None else self.key_positions.rows

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
        self.entities, self.key_positions, self.memory, self.boxes = None, None, None, None
        self.memory_stale = False
        self.is_initialized = False

    def offload(self):
        raise NotImplementedError("DFNCache does not support offloading")

    prefetch = offload

    def _apply(self, fn) -> None:
        """Apply `fn` to every batch-first tensor this layer holds."""
        if not self.is_initialized:
            return
        self.entities.apply(fn)
        self.key_positions.apply(fn)
        if self.boxes is not None:
            self.boxes.apply(fn)
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
        kept = self.length + tokens_to_remove
        self.entities.keep_first(kept)
        self.key_positions.keep_first(kept)
        if self.boxes is not None:
            self.boxes.crop(self.entities.end // DECODE_BLOCK)
        if self.memory is not None:
            self.memory, self.memory_stale = None, True


class DFNCache(Cache):
    """Cache of a [`DFNModel`] for incremental decoding and reading documents in segments.

    Besides one [`DFNCacheLayer`] per layer it holds `entity_mask` `(B, T)` (which cached entities are real, not
    padding), the number of real entities seen per row (time coordinates and memory-chunk boundaries derive from
    it) and the total number of entities seen.

    Args:
        config: the model's config; a cache only fits models whose `cache_signature` matches.
        window (`int`, *optional*): bounded mode: after each forward only the last `window` entities per layer
            are kept (plus the field memory), so a document of any length is read in constant memory. Entities of
            one call still see each other and the kept window; results then differ from a full pass once
            neighbours fall out of the window. `None` (default) keeps everything and matches a full pass exactly.
        memory_grad (`bool`, *optional*): keep the field memory's autograd graph from call to call, so a loss in a
            later call backpropagates through the memory into earlier calls (training through a bounded cache; call
            `backward` once, after the last call). The cached entities are stored without their graph either way.
            Default `False`: each call's memory starts detached (truncated backpropagation).
    """

    def __init__(self, config, window: int | None = None, memory_grad: bool = False):
        bounded = window is not None
        layers = [DFNCacheLayer(config.pos_dim, bounded, memory_grad) for _ in range(config.num_hidden_layers)]
        super().__init__(layers=layers)
        if window is not None and (isinstance(window, bool) or not isinstance(window, int) or window < 1):
            raise ValueError(f"DFNCache window must be None or an integer >= 1, got {window!r}")
        self.signature = cache_signature(config)
        self.window = window
        self.mask_rows: RowBuffer | None = None
        self.real_seen: torch.Tensor | None = None
        self.seen = 0
        self.owner: weakref.ref | None = None  # the model whose entities it holds (see `check_compatible`)

    @property
    def entity_mask(self) -> torch.Tensor | None:
        """`(B, T)` bool: which kept entities are real (not padding)."""
        return None if self.mask_rows is None else self.mask_rows.rows

    @property
    def is_croppable(self) -> bool:
        return self.window is None

    def check_compatible(self, model, batch_size: int) -> None:
        """Raise a clear error if this cache holds another model's entities (a cache belongs to the first model that
        writes to it, until `reset`: another model, even of the same configuration, would read states it never made)
        or another batch's. An empty cache is checked against the model's configuration and adopted."""
        held = self.seen > 0 and self.owner is not None
        if not held or self.owner() is not model:
            expected = cache_signature(model.config)
            if self.signature != expected:
                wrong = {k: (self.signature.get(k), v) for k, v in expected.items() if self.signature.get(k) != v}
                raise ValueError(f"This DFNCache was built for another model configuration: (cache, model) = {wrong}")
            if held:
                raise ValueError(
                    "This DFNCache holds the entities of another model instance: its states and positions mean "
                    "nothing to this one. Give each model its own cache (or reset() this one)."
                )
            self.owner = weakref.ref(model)
        if self.entity_mask is not None and self.entity_mask.shape[0] != batch_size:
            raise ValueError(
                f"This DFNCache holds {self.entity_mask.shape[0]} sequences but the input has batch size {batch_size}"
            )

    def get_seq_length(self, layer_idx: int = 0) -> int:
        """All entities seen so far (also those a bounded cache has dropped)."""
        return self.seen

    def real_lengths(self, batch_size: int, device) -> torch.Tensor:
        """`(B,)` number of real (non-padding) entities seen so far per row."""
        if self.real_seen is None:
            return torch.zeros(batch_size, dtype=torch.long, device=device)
        return self.real_seen

    def step_mask(self, span: tuple[int, int]) -> torch.Tensor | None:
        """For a compiled decoding step: the entity mask's whole buffer, where its kept rows are the layers' `span`
        and the new entity (`mask_view` gives `entity_mask` from it), else None. `entity_mask` itself is a view whose
        batch stride is the buffer's capacity: handed to the step, a capacity equal to another size (64, the
        benchmark model's head_dim) was specialised with it, and the step compiled again when the buffer grew."""
        start, end = span
        if (self.mask_rows.start, self.mask_rows.end) != (start, end + 1):
            return None
        return self.mask_rows.buffer

    @staticmethod
    def mask_view(buffer: torch.Tensor, span: tuple[int, int]) -> torch.Tensor:
        """Inside a compiled decoding step: `entity_mask` `(B, T + 1)` from `step_mask`'s buffer and the layers'
        `span`."""
        return RowBuffer.view(buffer, 1, span[0], span[1] + 1 - span[0])

    def append_mask(self, mask: torch.Tensor) -> torch.Tensor:
        """Record the new entities' mask `(B, N)`; returns the mask of the kept and new entities `(B, T + N)`."""
        mask = mask.bool()
        if self.mask_rows is None:
            self.mask_rows = RowBuffer(mask, first=0 if self.window is None else BOUNDED_FIRST_ROW)
        self.mask_rows.append(mask)
        self.real_seen = mask.sum(1) if self.real_seen is None else self.real_seen + mask.sum(1)
        self.seen += mask.shape[1]
        return self.entity_mask

    def trim(self) -> None:
        """Bounded mode: drop all but the last `window` entities (called after each forward)."""
        if self.window is None or self.mask_rows is None:
            return
        self.mask_rows.keep_last(self.window)
        for layer in self.layers:
            layer.trim(self.window)

    def _apply_rows(self, fn) -> None:
        if self.mask_rows is not None:
            self.mask_rows.apply(fn)
            self.real_seen = fn(self.real_seen)

    def reorder_cache(self, beam_idx: torch.LongTensor):
        super().reorder_cache(beam_idx)
        self._apply_rows(lambda t: t.index_select(0, beam_idx.to(t.device)))

    def batch_select_indices(self, indices: torch.Tensor):
        super().batch_select_indices(indices)
        self._apply_rows(lambda t: t[indices])

    def batch_repeat_interleave(self, repeats: int):
        super().batch_repeat_interleave(repeats)
        self._apply_rows(lambda t: t.repeat_interleave(repeats, dim=0))

    def crop(self, tokens_to_remove: int) -> None:
        if not self.is_croppable:
            raise ValueError("A bounded DFNCache (window set) cannot be cropped: the dropped entities are gone")
        super().crop(tokens_to_remove)
        if tokens_to_remove < 0 and self.entity_mask is not None:
            keep = max(self.seen + tokens_to_remove, 0)
            self.real_seen = self.real_seen - self.entity_mask[:, keep:].sum(1)
            self.mask_rows.keep_first(keep)
            self.seen = keep

    def reset(self):
        super().reset()
        self.mask_rows = self.real_seen = self.owner = None
        self.seen = 0


__all__ = ["DFNCache", "DFNCacheLayer", "StepStore", "cache_signature"]
