"""DFNCache and generate(): cache parity (DESIGN.md §2 invariant 2), cache surgery and every generation mode."""

import pytest
import torch
import torch.utils._pytree as pytree
from conftest import EOS_ID, PAD_ID, make_model, max_diff, pad_batch, random_ids, tiny_config
from torch.utils._python_dispatch import TorchDispatchMode

from dfn import DFNCache, DFNForCausalLM, modeling_dfn
from dfn.modeling_dfn import MASK_PAST_CHECKED

LENGTH = 30
# mixed chunk sizes (sum 30) that cross memory-chunk boundaries (chunk sizes 5-8) inside and at chunk edges
CHUNKS = [1, 4, 7, 2, 9, 1, 6]
# eos disabled: rows never stop early, so every comparison covers all generated tokens
GREEDY = dict(do_sample=False, eos_token_id=None)


def decode_in_chunks(model, ids, sizes, attention_mask=None, cache=None):
    """Feed `ids` through the model in consecutive chunks of `sizes`, carrying the cache; concatenated logits."""
    assert sum(sizes) == ids.shape[1]
    logits, start = [], 0
    past = cache.get_seq_length() if cache is not None else 0
    with torch.no_grad():
        for size in sizes:
            mask = None if attention_mask is None else attention_mask[:, : past + start + size]
            out = model(ids[:, start : start + size], attention_mask=mask, cache=cache, use_cache=True)
            assert isinstance(out.cache, DFNCache)
            cache = out.cache
            logits.append(out.logits)
            start += size
    return torch.cat(logits, 1), cache


def assert_memory_equal(cache_a, cache_b, tol=1e-4):
    for layer_a, layer_b in zip(cache_a.layers, cache_b.layers, strict=True):
        assert (layer_a.memory is None) == (layer_b.memory is None)
        if layer_a.memory is not None:
            assert layer_a.memory.keys() == layer_b.memory.keys()
            for name in layer_a.memory:
                assert max_diff(layer_a.memory[name], layer_b.memory[name]) <= tol, name


def entity_state(layer) -> dict:
    """The per-entity tensors `(B, T, ...)` a cache layer holds (its documented accessors)."""
    return {"positions": layer.positions, "values": layer.entity_values, "log_weights": layer.log_weights}


def assert_caches_equal(cache_a, cache_b, tol=1e-4):
    """Same length, same padding and the same state of every real (non-padding) entity and of the memory."""
    assert cache_a.get_seq_length() == cache_b.get_seq_length()
    assert torch.equal(cache_a.entity_mask, cache_b.entity_mask)
    real = cache_a.entity_mask
    for layer_a, layer_b in zip(cache_a.layers, cache_b.layers, strict=True):
        assert layer_a.get_seq_length() == cache_a.get_seq_length()
        for layer in (layer_a, layer_b):  # the coordinate-major copy of the positions lines up with the packed rows
            assert torch.equal(layer.positions, layer.features[..., : layer.pos_dim])
        state_a, state_b = entity_state(layer_a), entity_state(layer_b)
        for name in state_a:
            assert max_diff(state_a[name][real], state_b[name][real]) <= tol, name
    assert_memory_equal(cache_a, cache_b, tol)


# ---------------------------------------------------------------------------------------------------------------
# 2. Cache parity
# ---------------------------------------------------------------------------------------------------------------


def test_token_by_token_equals_full_forward(model, config):
    ids = random_ids(2, LENGTH, seed=1)
    with torch.no_grad():
        full = model(ids, use_cache=True)
    logits, cache = decode_in_chunks(model, ids, [1] * LENGTH)
    assert max_diff(logits, full.logits) <= 1e-4
    assert cache.get_seq_length() == LENGTH
    assert torch.equal(cache.real_lengths(2, "cpu"), torch.tensor([LENGTH, LENGTH]))
    # the memory carried in the cache is the full pass's memory
    assert_caches_equal(cache, full.cache)
    if config.use_memory:
        assert all(layer.memory is not None for layer in cache.layers)


def test_mixed_chunks_equal_full_forward(model, config):
    ids = random_ids(2, LENGTH, seed=2)
    with torch.no_grad():
        full = model(ids, use_cache=True)
    logits, cache = decode_in_chunks(model, ids, CHUNKS)
    assert max_diff(logits, full.logits) <= 1e-4
    assert_caches_equal(cache, full.cache)
    # a second split, chunk sizes reversed
    logits, _ = decode_in_chunks(model, ids, CHUNKS[::-1])
    assert max_diff(logits, full.logits) <= 1e-4


def test_left_padded_batch_cached_decoding_equals_full_forward(model):
    sequences = [random_ids(1, n, seed=3 + n)[0] for n in (LENGTH, 24, 19)]
    ids, mask = pad_batch(sequences, "left", garbage=True)
    with torch.no_grad():
        full = model(ids, attention_mask=mask).logits
        alone = [model(seq[None]).logits[0] for seq in sequences]
    # the first chunk holds a real entity of every row; then mixed sizes, then token by token
    logits, cache = decode_in_chunks(model, ids, [12, 1, 5, 3, 4, 1, 1, 1, 1, 1], attention_mask=mask)
    real = mask.bool()
    assert max_diff(logits[real], full[real]) <= 1e-4
    for row, seq in enumerate(sequences):
        assert max_diff(logits[row, -len(seq) :], alone[row]) <= 1e-4
    assert torch.equal(cache.entity_mask, real)
    assert torch.equal(cache.real_lengths(3, "cpu"), torch.tensor([LENGTH, 24, 19]))


def test_cache_reads_document_in_segments_with_padding_inside_cache(model):
    """Left-padded segment, then more tokens: the cache keeps the padding and skips it (attention_mask covers both)."""
    seq = random_ids(1, 20, seed=5)[0]
    ids, mask = pad_batch([seq, random_ids(1, 14, seed=6)[0]], "left")
    more = random_ids(2, 9, seed=7)
    full_mask = torch.cat([mask, torch.ones(2, 9, dtype=torch.long)], 1)
    with torch.no_grad():
        full = model(torch.cat([ids, more], 1), attention_mask=full_mask).logits
        first = model(ids, attention_mask=mask, use_cache=True)
        second = model(more, attention_mask=full_mask, cache=first.cache, use_cache=True)
    assert max_diff(second.logits, full[:, -9:]) <= 1e-4


class MaskReads(TorchDispatchMode):
    """Counts the elements that operations (views excepted) read from one tensor's storage."""

    def __init__(self, tensor: torch.Tensor):
        super().__init__()
        self.storage, self.read = tensor.untyped_storage().data_ptr(), 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if not func.is_view:
            for arg in pytree.tree_leaves((args, kwargs)):
                if isinstance(arg, torch.Tensor) and arg.untyped_storage().data_ptr() == self.storage:
                    self.read += arg.numel()
        return func(*args, **(kwargs or {}))


def test_decoding_step_reads_a_bounded_part_of_the_attention_mask(monkeypatch):
    """generate() hands every step the whole attention_mask: a step reads only its last `MASK_PAST_CHECKED` past
    columns (O(1) in the context), and still checks those against the cache's record."""
    model, past = make_model(tiny_config()), 8 * MASK_PAST_CHECKED
    with torch.no_grad():
        cache = model(random_ids(1, past), use_cache=True).cache
        mask = torch.ones(1, past + 1, dtype=torch.long)
        with MaskReads(mask) as reads:
            model(random_ids(1, 1, seed=1), attention_mask=mask, cache=cache, use_cache=True)
        # a few passes over the columns read, where one pass over the whole mask alone would read more
        assert 0 < reads.read < mask.numel()
        warned = []
        monkeypatch.setattr(modeling_dfn.logger, "warning_once", warned.append)
        mask = torch.ones(1, past + 2, dtype=torch.long)
        mask[0, past - 3] = 0  # the cache holds this entity as real
        model(random_ids(1, 1, seed=2), attention_mask=mask, cache=cache, use_cache=True)
        assert len(warned) == 1 and "disagrees with the cache" in warned[0]
        mask = torch.ones(1, past + 3, dtype=torch.long)
        mask[0, past - 3] = 2
        with pytest.raises(ValueError, match="only 0 and 1"):
            model(random_ids(1, 1, seed=2), attention_mask=mask, cache=cache, use_cache=True)


def test_right_padded_segment_then_continuation(model):
    """Padding in the middle of a row's cached history (a right-padded segment, then more tokens) is skipped: each
    row continues exactly as its real entities alone."""
    first_a, first_b = random_ids(1, 14, seed=11)[0], random_ids(1, 20, seed=12)[0]
    ids, mask = pad_batch([first_a, first_b], "right", garbage=True)
    more = random_ids(2, 9, seed=13)
    full_mask = torch.cat([mask, torch.ones(2, 9, dtype=torch.long)], 1)
    with torch.no_grad():
        cache = model(ids, attention_mask=mask, use_cache=True).cache
        got = model(more, attention_mask=full_mask, cache=cache, use_cache=True).logits
        for row, first in enumerate((first_a, first_b)):
            alone = model(torch.cat([first, more[row]])[None]).logits[0, -9:]
            assert max_diff(got[row], alone) <= 1e-4, row
    assert torch.equal(cache.real_lengths(2, "cpu"), torch.tensor([23, 29]))


# ---------------------------------------------------------------------------------------------------------------
# Cache surgery: crop, reorder, select, repeat
# ---------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("remove", [1, 4, 9, 17])
def test_crop_then_refeed_reproduces_logits(model, config, remove):
    """After `cache.crop(-n)` the cropped-off tokens give the full pass's logits again; crops that undo a memory
    commit (crossing a chunk boundary) force the exact memory rebuild."""
    sequences = [random_ids(1, n, seed=8 + n)[0] for n in (LENGTH, 26)]
    ids, mask = pad_batch(sequences, "left")
    with torch.no_grad():
        full = model(ids, attention_mask=mask, use_cache=True)
        cache = full.cache
        cache.crop(-remove)
        assert cache.get_seq_length() == LENGTH - remove
        assert cache.entity_mask.shape == (2, LENGTH - remove)
        again = model(ids[:, -remove:], attention_mask=mask, cache=cache, use_cache=True)
        assert max_diff(again.logits, full.logits[:, -remove:]) <= 1e-4
        # ... and the cache is the full pass's cache again (memory rebuilt exactly)
        reference = model(ids, attention_mask=mask, use_cache=True).cache
        assert_caches_equal(again.cache, reference, tol=1e-4)

        # a different continuation after the crop equals a full pass over the new sequence
        cache = reference
        cache.crop(-remove)
        other = (ids[:, -remove:] + 1) % 256
        new_ids = torch.cat([ids[:, :-remove], other], 1)
        expected = model(new_ids, attention_mask=mask).logits[:, -remove:]
        got = model(other, attention_mask=mask, cache=cache, use_cache=True).logits
        assert max_diff(got, expected) <= 1e-4


def test_crop_everything_then_restart(model):
    ids = random_ids(1, 20, seed=9)
    with torch.no_grad():
        full = model(ids, use_cache=True)
        full.cache.crop(-100)
        assert full.cache.get_seq_length() == 0
        again = model(ids, cache=full.cache, use_cache=True)
    assert max_diff(again.logits, full.logits) <= 1e-5


def test_crop_rejects_positive_count(model):
    with torch.no_grad():
        cache = model(random_ids(1, 5), use_cache=True).cache
    with pytest.raises(ValueError, match="negative"):
        cache.crop(3)


def padded_cache(model, ids, mask):
    with torch.no_grad():
        return model(ids, attention_mask=mask, use_cache=True).cache


def continue_decoding(model, cache, mask, steps):
    """Decode `steps` new tokens (different per row) on top of `cache`; logits `(B, steps, V)`."""
    new = random_ids(mask.shape[0], steps, seed=99)
    new[1::2] = (new[1::2] + 1) % 256
    full_mask = torch.cat([mask, torch.ones_like(new)], 1)
    logits, _ = decode_in_chunks(model, new, [1] * steps, attention_mask=full_mask, cache=cache)
    return logits


@pytest.fixture
def padded_batch():
    """Three sequences (30, 23, 17 entities) left-padded with garbage ids, so each row's padding differs."""
    return pad_batch([random_ids(1, n, seed=n)[0] for n in (LENGTH, 23, 17)], "left", garbage=True)


@pytest.mark.parametrize(
    "operation, rows", [("reorder_cache", [2, 0, 0]), ("batch_select_indices", [2, 1])], ids=["reorder", "select"]
)
def test_row_operations_keep_rows_consistent(model, padded_batch, operation, rows):
    """Reordering (beam search) or selecting rows gives the cache those rows would have had from the start."""
    ids, mask = padded_batch
    rows = torch.tensor(rows)
    cache = padded_cache(model, ids, mask)
    getattr(cache, operation)(rows)
    reference = padded_cache(model, ids[rows], mask[rows])
    assert_caches_equal(cache, reference)
    got, expected = continue_decoding(model, cache, mask[rows], 8), continue_decoding(model, reference, mask[rows], 8)
    assert max_diff(got, expected) <= 1e-5


def test_batch_repeat_interleave_gives_identical_rows(model, padded_batch):
    """Each copy of a repeated row decodes as the other copy, and as its sequence alone."""
    ids, mask = padded_batch
    ids, mask = ids[1:], mask[1:]
    cache = padded_cache(model, ids, mask)
    cache.batch_repeat_interleave(2)
    mask = mask.repeat_interleave(2, dim=0)
    assert cache.entity_mask.shape == mask.shape
    assert_caches_equal(cache, padded_cache(model, ids.repeat_interleave(2, dim=0), mask))
    new = random_ids(2, 8, seed=30).repeat_interleave(2, dim=0)  # the same tokens for both copies
    full_mask = torch.cat([mask, torch.ones_like(new)], 1)
    logits, _ = decode_in_chunks(model, new, [1] * 8, attention_mask=full_mask, cache=cache)
    # equal up to rounding: a batched nn.Linear may round identical rows differently (measured on an AVX-512/AMX
    # CPU: 1e-7 apart after the first flow projection of a 4-row batch)
    assert max_diff(logits[0], logits[1]) <= 1e-5 and max_diff(logits[2], logits[3]) <= 1e-5
    # and each copy continues its own sequence exactly
    with torch.no_grad():
        for row in range(2):
            seq = ids[row][mask[2 * row].bool()]
            alone = model(torch.cat([seq, new[2 * row]])[None]).logits[0, -8:]
            assert max_diff(logits[2 * row], alone) <= 1e-4


# ---------------------------------------------------------------------------------------------------------------
# 6. Generation
# ---------------------------------------------------------------------------------------------------------------


def argmax_loop(model, ids, steps, attention_mask=None):
    """Greedy decoding by full forward passes (no cache): the ground truth for generate()."""
    with torch.no_grad():
        for _ in range(steps):
            logits = model(ids, attention_mask=attention_mask, use_cache=False).logits[:, -1]
            ids = torch.cat([ids, logits.argmax(-1, keepdim=True)], 1)
            if attention_mask is not None:
                attention_mask = torch.cat([attention_mask, torch.ones_like(attention_mask[:, :1])], 1)
    return ids


def test_greedy_with_cache_equals_without_cache(gen_model):
    prompt = random_ids(2, 9, seed=40)
    with_cache = gen_model.generate(prompt, max_new_tokens=14, **GREEDY)
    without = gen_model.generate(prompt, max_new_tokens=14, use_cache=False, **GREEDY)
    assert with_cache.shape == (2, 23)
    assert torch.equal(with_cache[:, :9], prompt)
    assert torch.equal(with_cache, without)
    assert torch.equal(with_cache, argmax_loop(gen_model, prompt, 14))
    assert len(set(with_cache[0, 9:].tolist())) > 1, "degenerate model: greedy repeats one byte"


def test_sampling_with_seed_is_reproducible(gen_model):
    prompt = random_ids(2, 8, seed=41)
    kwargs = dict(do_sample=True, max_new_tokens=12, top_k=0, temperature=1.5, eos_token_id=None)
    torch.manual_seed(0)
    first = gen_model.generate(prompt, **kwargs)
    torch.manual_seed(0)
    second = gen_model.generate(prompt, **kwargs)
    torch.manual_seed(0)
    uncached = gen_model.generate(prompt, use_cache=False, **kwargs)
    torch.manual_seed(1)
    other = gen_model.generate(prompt, **kwargs)
    assert torch.equal(first, second)
    assert torch.equal(first, uncached)
    assert not torch.equal(first, other)
    # several samples per prompt: reproducible, and not all alike
    torch.manual_seed(2)
    many = gen_model.generate(prompt, num_return_sequences=3, **kwargs)
    torch.manual_seed(2)
    assert torch.equal(many, gen_model.generate(prompt, num_return_sequences=3, **kwargs))
    assert many.shape == (6, 20)
    assert torch.equal(many[:, :8], prompt.repeat_interleave(3, dim=0))
    assert len({tuple(row.tolist()) for row in many[:3]}) > 1


def test_num_beams_one_equals_greedy(gen_model):
    prompt = random_ids(2, 9, seed=42)
    greedy = gen_model.generate(prompt, max_new_tokens=10, **GREEDY)
    beams_one = gen_model.generate(prompt, max_new_tokens=10, num_beams=1, **GREEDY)
    assert torch.equal(greedy, beams_one)


def test_beam_search_scores_match_full_forward(gen_model):
    """Beam search on a left-padded batch: each returned sequence's score is its log-probability under a fresh
    full forward pass, which fails if reorder_cache mixes up the beams' states."""
    sequences = [random_ids(1, 10, seed=43)[0], random_ids(1, 6, seed=44)[0]]
    prompt, mask = pad_batch(sequences, "left")
    new = 8
    out = gen_model.generate(
        prompt,
        attention_mask=mask,
        max_new_tokens=new,
        num_beams=3,
        num_return_sequences=2,
        length_penalty=0.0,
        return_dict_in_generate=True,
        output_scores=True,
        **GREEDY,
    )
    sequences_out = out.sequences
    assert sequences_out.shape == (4, prompt.shape[1] + new)
    assert torch.equal(sequences_out[:, : prompt.shape[1]], prompt.repeat_interleave(2, dim=0))
    assert not torch.equal(sequences_out[0], sequences_out[1]) and not torch.equal(sequences_out[2], sequences_out[3])
    assert out.sequences_scores.shape == (4,)
    assert bool((out.sequences_scores[0::2] >= out.sequences_scores[1::2]).all())
    full_mask = torch.cat([mask.repeat_interleave(2, dim=0), torch.ones(4, new, dtype=torch.long)], 1)
    with torch.no_grad():
        log_probs = gen_model(sequences_out, attention_mask=full_mask).logits.log_softmax(-1)
    start = prompt.shape[1]
    chosen = log_probs[:, start - 1 : -1].gather(-1, sequences_out[:, start:, None]).squeeze(-1).sum(-1)
    assert max_diff(chosen, out.sequences_scores) <= 1e-4


def test_return_dict_in_generate_with_scores(gen_model):
    prompt = random_ids(2, 9, seed=45)
    new = 10
    out = gen_model.generate(prompt, max_new_tokens=new, return_dict_in_generate=True, output_scores=True, **GREEDY)
    assert out.sequences.shape == (2, 9 + new)
    assert len(out.scores) == new
    assert all(s.shape == (2, gen_model.config.vocab_size) for s in out.scores)
    generated = out.sequences[:, 9:]
    assert torch.equal(torch.stack([s.argmax(-1) for s in out.scores], 1), generated)
    with torch.no_grad():
        full = gen_model(out.sequences).logits
    assert max_diff(torch.stack(out.scores, 1), full[:, 8:-1]) <= 1e-4
    assert isinstance(out.cache, DFNCache)
    assert out.cache.get_seq_length() == out.sequences.shape[1] - 1  # the last token is not fed yet


def test_continue_generation_from_returned_cache(gen_model):
    prompt = random_ids(2, 9, seed=46)
    in_one_go = gen_model.generate(prompt, max_new_tokens=13, **GREEDY)
    first = gen_model.generate(prompt, max_new_tokens=6, return_dict_in_generate=True, **GREEDY)
    second = gen_model.generate(first.sequences, cache=first.cache, max_new_tokens=7, **GREEDY)
    assert torch.equal(second, in_one_go)


def test_batched_left_padded_generation_equals_per_sequence(gen_model):
    sequences = [random_ids(1, n, seed=47 + n)[0] for n in (12, 7, 3)]
    prompt, mask = pad_batch(sequences, "left")
    batched = gen_model.generate(prompt, attention_mask=mask, max_new_tokens=10, pad_token_id=PAD_ID, **GREEDY)
    for row, seq in enumerate(sequences):
        alone = gen_model.generate(seq[None], max_new_tokens=10, **GREEDY)
        assert torch.equal(batched[row, -10:], alone[0, -10:]), row


def test_generate_from_inputs_embeds_equals_from_ids(gen_model):
    prompt = random_ids(1, 9, seed=48)
    from_ids = gen_model.generate(prompt, max_new_tokens=8, **GREEDY)
    embeds = gen_model.get_input_embeddings()(prompt).detach()
    from_embeds = gen_model.generate(inputs_embeds=embeds, max_new_tokens=8, **GREEDY)
    assert torch.equal(from_embeds[:, -8:], from_ids[:, -8:])


def test_generation_stops_at_eos():
    model = make_model(tiny_config())
    prompt = random_ids(1, 9, seed=49)
    greedy = model.generate(prompt, max_new_tokens=6, **GREEDY)
    stop = int(greedy[0, 11])  # make the third generated byte the end-of-sequence token
    out = model.generate(prompt, max_new_tokens=6, do_sample=False, eos_token_id=stop)
    assert torch.equal(out, greedy[:, : out.shape[1]])
    assert out[0, -1] == stop and out.shape[1] <= 12
    assert EOS_ID == model.generation_config.eos_token_id


def test_assisted_decoding_equals_greedy(gen_model):
    """Assisted decoding verifies drafts and crops the cache back on rejection: the output is greedy's exactly."""
    torch.manual_seed(0)
    assistant = DFNForCausalLM(gen_model.config).eval()  # an untrained draft model: most drafts are rejected
    prompt = random_ids(1, 9, seed=49)
    greedy = gen_model.generate(prompt, max_new_tokens=16, **GREEDY)
    assisted = gen_model.generate(prompt, max_new_tokens=16, assistant_model=assistant, **GREEDY)
    assert torch.equal(assisted, greedy)
