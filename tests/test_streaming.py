"""Reading a document in segments through the cache: exact in unbounded mode, constant-size in bounded mode."""

import pytest
import torch

from dfn import DFNCache, DFNConfig, DFNForCausalLM


def tiny_model(**overrides):
    torch.manual_seed(0)
    fields = dict(
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        pos_dim=2,
        num_neighbors=4,
        memory_slots=3,
        memory_chunk_size=8,
    )
    config = DFNConfig(**{**fields, **overrides})
    return DFNForCausalLM(config).eval()


@torch.no_grad()
@pytest.mark.parametrize("use_memory", [True, False])
def test_segment_parity_across_memory_chunks(use_memory):
    model = tiny_model(use_memory=use_memory)
    ids = torch.randint(0, 256, (2, 61))
    full = model(ids).logits
    cache, pieces, start = DFNCache(model.config), [], 0
    for size in (13, 21, 5, 22):  # >= 3 segments, each crossing memory chunks of 8
        pieces.append(model(ids[:, start : start + size], cache=cache, use_cache=True).logits)
        start += size
    streamed = torch.cat(pieces, 1)
    print("max abs diff", (full - streamed).abs().max().item())
    assert torch.allclose(full, streamed, atol=1e-4, rtol=0)
    assert cache.get_seq_length() == 61 and cache.layers[0].length == 61


@torch.no_grad()
def test_bounded_cache_keeps_window_and_memory_only():
    model, window = tiny_model(), 16
    ids = torch.randint(0, 256, (1, 120))
    cache = DFNCache(model.config, window=window)
    for start in range(0, 120, 10):
        out = model(ids[:, start : start + 10], cache=cache, use_cache=True)
        assert torch.isfinite(out.logits).all()
        for layer in cache.layers:
            assert layer.length <= window  # entities kept per layer never exceed W (memory adds M slots)
            assert layer.memory["pos"].shape[2] == model.config.memory_slots
    assert cache.entity_mask.shape[1] <= window and cache.get_seq_length() == 120
    assert int(cache.real_lengths(1, "cpu")) == 120
    with pytest.raises(ValueError, match="cannot be cropped"):
        cache.crop(-1)


@pytest.mark.parametrize("memory_grad", [False, True])
def test_memory_grad_backpropagates_through_the_memory_across_calls(memory_grad):
    """With `memory_grad` a loss in a later call reaches, through the field memory, bytes that no cache holds any
    more; without it each call's memory starts detached and their gradient is exactly 0."""
    model = tiny_model()
    ids = torch.randint(0, 256, (1, 64))
    cache, embedded = DFNCache(model.config, window=8, memory_grad=memory_grad), []
    hook = model.get_input_embeddings().register_forward_hook(lambda m, a, out: embedded.append(out))
    logits = [model(ids[:, i : i + 8], cache=cache, use_cache=True).logits for i in range(0, 64, 8)]
    hook.remove()
    loss = logits[-1][:, -1].logsumexp(-1).sum()
    first = torch.autograd.grad(loss, embedded[0], allow_unused=True)[0]  # 56+ bytes back; None: not in the graph
    assert (first is not None and first.abs().max() > 0) == memory_grad


@torch.no_grad()
def test_bounded_cache_equals_full_pass_while_everything_fits():
    model = tiny_model()
    ids = torch.randint(0, 256, (1, 30))
    cache = DFNCache(model.config, window=64)
    streamed = torch.cat([model(ids[:, i : i + 10], cache=cache, use_cache=True).logits for i in (0, 10, 20)], 1)
    assert torch.allclose(model(ids).logits, streamed, atol=1e-4, rtol=0)


@torch.no_grad()
def test_memory_write_is_causal_per_chunk():
    """With K = 1 (each entity's only neighbour is itself) entities interact through the memory alone: chunk c
    reads the memory as it stood after chunk c-1, so an earlier entity of the *same* chunk has no effect, while
    earlier chunks do."""
    model = tiny_model(num_neighbors=1)
    ids = torch.randint(0, 256, (1, 40))
    base = model(ids).logits
    same_chunk = ids.clone()
    same_chunk[:, 16] = (ids[:, 16] + 1) % 256  # first entity of chunk 2 (16..23)
    out = model(same_chunk).logits
    assert torch.equal(base[:, 17:24], out[:, 17:24])
    assert (base[:, 24:] - out[:, 24:]).abs().max() > 1e-6  # chunk 3 on read the updated memory
    no_memory = tiny_model(num_neighbors=1, use_memory=False)
    assert torch.equal(no_memory(ids).logits[:, 17:], no_memory(same_chunk).logits[:, 17:])


@torch.no_grad()
def test_decoding_over_block_structure_matches_full_pass(monkeypatch):
    """Past 32 complete blocks the cache's box tree drives each decoding step's search: still the full pass."""
    import dfn.neighbors_dfn as nd

    searches = []
    blocks_search = nd.causal_knn_blocks
    monkeypatch.setattr(nd, "causal_knn_blocks", lambda *args: searches.append(1) or blocks_search(*args))
    model = tiny_model()
    length, prefill = 2200, 2180
    ids = torch.randint(0, 256, (2, length))
    mask = torch.ones(2, length, dtype=torch.long)
    mask[1, :37] = 0  # left padding: empty boxes for padding-only blocks
    full = model(ids, attention_mask=mask).logits
    cache = DFNCache(model.config)
    model(ids[:, :prefill], attention_mask=mask[:, :prefill], cache=cache, use_cache=True)
    assert cache.layers[0].boxes.num_blocks == prefill // 64 > nd._SCAN_MAX_BLOCKS
    steps = [
        model(ids[:, i : i + 1], attention_mask=mask[:, : i + 1], cache=cache, use_cache=True).logits
        for i in range(prefill, length)
    ]
    assert len(searches) == (length - prefill) * model.config.num_hidden_layers
    assert torch.allclose(full[:, prefill:], torch.cat(steps, 1), atol=1e-4, rtol=0)
