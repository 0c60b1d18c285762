"""Bad input -> a clear error that says what is wrong; nothing silently wrong (issue 2, "Bad input")."""

import copy
import os

import pytest
import torch
from conftest import make_model, random_ids, tiny_config
from safetensors.torch import load_file, save_file

from dfn import DFNCache, DFNConfig, DFNForCausalLM, DFNModel


@pytest.fixture(scope="module")
def model():
    return make_model(tiny_config())


# ---------------------------------------------------------------------------------------------------------------
# input_ids / inputs_embeds
# ---------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "ids, match",
    [
        (torch.tensor([[1, 2, 259]]), r"vocab_size=259.*\[1, 259\]"),
        (torch.tensor([[1, 2, 10_000]]), r"vocab_size=259"),
        (torch.tensor([[1, -1, 3]]), r"input_ids must lie in \[0, vocab_size=259\).*-1"),
        (torch.tensor([[1.0, 2.0]]), r"input_ids must be an integer tensor.*float"),
        (torch.tensor([[True, False]]), r"input_ids must be an integer tensor.*bool"),
        (torch.tensor([1, 2, 3]), r"input_ids must have shape \(batch_size, sequence_length\), got \(3,\)"),
        (torch.ones(1, 2, 3, dtype=torch.long), r"input_ids must have shape .*\(1, 2, 3\)"),
        (torch.ones(1, 0, dtype=torch.long), r"input_ids is empty"),
        (torch.ones(0, 4, dtype=torch.long), r"input_ids is empty"),
    ],
    ids=["above-vocab", "far-above-vocab", "negative", "float", "bool", "1-D", "3-D", "empty-seq", "empty-batch"],
)
def test_bad_input_ids(model, ids, match):
    with pytest.raises(ValueError, match=match):
        model(ids)


def test_input_ids_as_list_is_rejected(model):
    with pytest.raises(ValueError, match="input_ids must be an integer tensor"):
        model([[1, 2, 3]])


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
def test_non_finite_inputs_embeds(model, bad):
    embeds = torch.randn(2, 5, 32)
    embeds[1, 3, 7] = bad
    with pytest.raises(ValueError, match="inputs_embeds contains NaN or inf"):
        model(inputs_embeds=embeds)


@pytest.mark.parametrize(
    "shape, match",
    [
        ((2, 5, 16), r"inputs_embeds must have shape \(batch_size, sequence_length, 32\)"),
        ((5, 32), "inputs_embeds"),
        ((1, 0, 32), "inputs_embeds is empty"),
    ],
)
def test_bad_inputs_embeds_shape(model, shape, match):
    with pytest.raises(ValueError, match=match):
        model(inputs_embeds=torch.randn(*shape))


def test_exactly_one_of_ids_and_embeds(model):
    ids = random_ids(1, 4)
    with pytest.raises(ValueError, match="exactly one of input_ids or inputs_embeds"):
        model(ids, inputs_embeds=model.get_input_embeddings()(ids))
    with pytest.raises(ValueError, match="exactly one of input_ids or inputs_embeds"):
        model()


# ---------------------------------------------------------------------------------------------------------------
# attention_mask and labels
# ---------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "mask, match",
    [
        (torch.ones(2, 5, dtype=torch.long), r"attention_mask must have shape .* = \(2, 6\), got \(2, 5\)"),
        (torch.ones(1, 6, dtype=torch.long), r"attention_mask must have shape .* = \(2, 6\), got \(1, 6\)"),
        (torch.ones(2, 6, 1, dtype=torch.long), r"attention_mask must have shape .*got \(2, 6, 1\)"),
        (torch.tensor([[1, 1, 1, 1, 1, 1], [0, 0, 0, 0, 0, 0]]), r"row with no real entity \(all zeros\)"),
        (torch.tensor([[1, 1, 1, 1, 1, 2], [1, 1, 1, 1, 1, 1]]), r"attention_mask must contain only 0 and 1"),
        (torch.tensor([[0.5, 1, 1, 1, 1, 1], [1, 1, 1, 1, 1, 1]]), r"attention_mask must contain only 0 and 1"),
        (torch.tensor([[-1, 1, 1, 1, 1, 1], [1, 1, 1, 1, 1, 1]]), r"attention_mask must contain only 0 and 1"),
    ],
    ids=["short", "batch", "3-D", "all-zero-row", "two", "half", "minus-one"],
)
def test_bad_attention_mask(model, mask, match):
    with pytest.raises(ValueError, match=match):
        model(random_ids(2, 6), attention_mask=mask)


def test_float_and_bool_binary_masks_are_accepted(model):
    ids = random_ids(2, 6)
    mask = torch.tensor([[0, 1, 1, 1, 1, 1], [1, 1, 1, 1, 1, 1]])
    with torch.no_grad():
        ref = model(ids, attention_mask=mask).logits
        assert torch.equal(model(ids, attention_mask=mask.float()).logits, ref)
        assert torch.equal(model(ids, attention_mask=mask.bool()).logits, ref)


@pytest.mark.parametrize("shape", [(2, 5), (2, 7), (1, 6), (12,)])
def test_labels_shape_mismatch(model, shape):
    with pytest.raises(ValueError, match=r"labels must have shape \(batch_size, sequence_length\) = \(2, 6\)"):
        model(random_ids(2, 6), labels=torch.zeros(shape, dtype=torch.long))


def test_logits_to_keep_as_entity_indices(model):
    ids = random_ids(2, 6)
    with torch.no_grad():
        full = model(ids).logits
        kept = model(ids, logits_to_keep=torch.tensor([0, 4])).logits
    torch.testing.assert_close(kept, full[:, [0, 4]], rtol=0, atol=0)
    with torch.no_grad():
        torch.testing.assert_close(model(ids, logits_to_keep=None).logits, full, rtol=0, atol=0)
        torch.testing.assert_close(model(ids, logits_to_keep=torch.tensor(2)).logits, full[:, -2:], rtol=0, atol=0)
    with pytest.raises(ValueError, match="logits_to_keep must be an int or a 1-D integer tensor"):
        model(ids, logits_to_keep=torch.tensor([0.0, 4.0]))


def test_position_ids_are_refused(model):
    """DFN counts real entities for time: explicit position_ids (packed documents) would be silently ignored."""
    ids = random_ids(1, 6)
    for module in (model, model.model):
        with pytest.raises(ValueError, match="DFN takes no position_ids"):
            module(ids, position_ids=torch.arange(6).view(1, -1))


def test_past_key_values_is_the_cache(model):
    """The keyword Llama still takes (deprecated in 5.24) continues the cache, with a warning; it is not dropped."""
    ids = random_ids(1, 10)
    with torch.no_grad():
        full = model(ids).logits
        for module in (model, model.model):
            cache = module(ids[:, :7], use_cache=True).cache
            with pytest.warns(FutureWarning, match="past_key_values"):
                out = module(ids[:, 7:], past_key_values=cache, use_cache=True)
            assert out.cache.get_seq_length() == 10
            if module is model:
                torch.testing.assert_close(out.logits, full[:, 7:], rtol=0, atol=1e-5)


def test_cache_of_another_class_is_refused(model):
    from transformers import DynamicCache

    with pytest.raises(ValueError, match="A DFN model needs a DFNCache .* got DynamicCache"):
        model(random_ids(1, 4), cache=DynamicCache(), use_cache=True)


@pytest.mark.parametrize(
    "labels, match",
    [
        (torch.full((1, 6), 2.0), "labels must be an integer tensor, got torch.float32"),
        (torch.full((1, 6), 300), r"labels must lie in \[0, vocab_size=259\) or be -100, got 300"),
        (torch.full((1, 6), -5), r"labels must lie in \[0, vocab_size=259\) or be -100, got -5"),
    ],
    ids=["float", "above-vocab", "negative"],
)
def test_bad_label_values(model, labels, match):
    with pytest.raises(ValueError, match=match):
        model(random_ids(1, 6), labels=labels)


def test_byte_ids_of_any_integer_dtype(model):
    ids = random_ids(1, 6)
    with torch.no_grad():
        torch.testing.assert_close(model(ids.to(torch.uint8)).logits, model(ids).logits, rtol=0, atol=0)


@pytest.mark.parametrize("dtype", [torch.uint8, torch.int16, torch.int32])
def test_labels_of_any_integer_dtype(model, dtype):
    """Bytes as uint8 (the natural type) or int32 labels give the int64 labels' loss; -100 still masks."""
    ids = random_ids(2, 6)
    labels = ids.clone()
    if dtype != torch.uint8:  # which has no -100
        labels[0, :2] = -100
    with torch.no_grad():
        assert model(ids, labels=labels.to(dtype)).loss == model(ids, labels=labels).loss


def test_negative_logits_to_keep_is_refused(model):
    with pytest.raises(ValueError, match=r"logits_to_keep must be >= 0 \(0 keeps all\), got -2"):
        model(random_ids(1, 6), logits_to_keep=-2)


def test_gradient_checkpointing_through_a_cache_is_refused():
    """The backward pass replays each checkpointed layer: through a cache it would write the segment twice."""
    model = make_model(tiny_config("k3-mem-residual")).train()
    model.activation_checkpointing_enable()
    ids = random_ids(2, 12)
    with pytest.raises(ValueError, match="activation checkpointing cannot train through a DFNCache"):
        model(ids, labels=ids, cache=DFNCache(model.config, window=16, memory_grad=True))
    with torch.no_grad():  # reading through a cache needs no replay
        model(ids, cache=DFNCache(model.config), use_cache=True)


def test_inputs_embeds_of_another_dtype(model):
    with pytest.raises(ValueError, match="inputs_embeds must have the model's dtype torch.float32, got torch.float64"):
        model(inputs_embeds=torch.zeros(1, 4, model.config.hidden_size, dtype=torch.float64))


def test_labels_with_logits_to_keep(model):
    ids = random_ids(1, 6)
    with pytest.raises(ValueError, match="labels cannot be combined with logits_to_keep"):
        model(ids, labels=ids, logits_to_keep=1)


# ---------------------------------------------------------------------------------------------------------------
# Config
# ---------------------------------------------------------------------------------------------------------------


CONFIG_ERRORS = [
    ("vocab_size", 0, r"DFNConfig.vocab_size must be an integer >= 1, got 0"),
    ("hidden_size", 0, r"DFNConfig.hidden_size must be an integer >= 1"),
    ("hidden_size", 32.0, r"DFNConfig.hidden_size must be an integer"),
    ("num_hidden_layers", 0, r"DFNConfig.num_hidden_layers must be an integer >= 1"),
    ("num_attention_heads", -2, r"DFNConfig.num_attention_heads must be an integer >= 1"),
    ("num_attention_heads", 3, r"DFNConfig.hidden_size \(256\) must be divisible by num_attention_heads \(3\)"),
    ("pos_dim", 0, r"DFNConfig.pos_dim must be an integer >= 1"),
    ("pos_dim", 9, r"DFNConfig.pos_dim must be in \[1, 8\], got 9"),
    ("num_neighbors", 0, r"DFNConfig.num_neighbors must be an integer >= 1"),
    ("num_neighbors", True, r"DFNConfig.num_neighbors must be an integer"),
    ("memory_slots", 0, r"DFNConfig.memory_slots must be an integer >= 1"),
    ("memory_chunk_size", 0, r"DFNConfig.memory_chunk_size must be an integer >= 1"),
    ("kernel_width_init", 0.0, r"DFNConfig.kernel_width_init must be a finite number > 0"),
    ("kernel_width_init", float("nan"), r"DFNConfig.kernel_width_init must be a finite number > 0"),
    ("mlp_ratio", -1.0, r"DFNConfig.mlp_ratio must be a finite number > 0"),
    ("mlp_type", "relu", r"DFNConfig.mlp_type must be one of \('swiglu', 'gelu'\), got 'relu'"),
    ("initializer_range", 0, r"DFNConfig.initializer_range must be a finite number > 0"),
    ("flownorm_eps", 0.0, r"DFNConfig.flownorm_eps must be a finite number > 0"),
    ("time_scale_min", 2.0, r"DFNConfig.time_scale_min \(2.0\) must be <= time_scale_max"),
    ("time_scale_max", -1.0, r"DFNConfig.time_scale_max must be a finite number > 0"),
    ("flow_alpha_init", -0.1, r"DFNConfig.flow_alpha_init must be a number in \[0, 10\]"),
    ("flow_alpha_init", "0.1", r"DFNConfig.flow_alpha_init must be a number"),
    ("memory_init_log_mass", 11.0, r"DFNConfig.memory_init_log_mass must be a number in \[-30, 10\], got 11.0"),
    ("memory_init_log_mass", float("nan"), r"DFNConfig.memory_init_log_mass must be a number"),
    ("memory_init_log_mass", True, r"DFNConfig.memory_init_log_mass must be a number"),
    ("memory_prior_log_mass", -31.0, r"DFNConfig.memory_prior_log_mass must be a number in \[-30, 10\], got -31.0"),
    ("memory_write", "sum", r"DFNConfig.memory_write must be one of \('gated', 'mean'\), got 'sum'"),
    ("dropout", 1.0, r"DFNConfig.dropout must be in \[0, 1\), got 1.0"),
    ("dropout", -0.1, r"DFNConfig.dropout must be in \[0, 1\)"),
    ("kernel_width_init", float("inf"), r"DFNConfig.kernel_width_init must be a finite number > 0"),
    ("time_scale_max", float("inf"), r"DFNConfig.time_scale_max must be a finite number > 0"),
    ("use_flow", "yes", r"DFNConfig.use_flow must be True or False"),
    ("use_cache", "no", r"DFNConfig.use_cache must be True or False"),
    ("tie_word_embeddings", "no", r"DFNConfig.tie_word_embeddings must be True or False"),
    ("pad_token_id", True, r"DFNConfig.pad_token_id must be None or an id"),
    ("use_query_flow", 1, r"DFNConfig.use_query_flow must be True or False"),
    ("use_memory", 1, r"DFNConfig.use_memory must be True or False"),
    ("use_flownorm", None, r"DFNConfig.use_flownorm must be True or False"),
    ("layer_variant", "plain", r"DFNConfig.layer_variant must be one of \('residual', 'seed'\), got 'plain'"),
    ("neighbor_search", "approx", r"DFNConfig.neighbor_search must be one of .*got 'approx'"),
    ("pad_token_id", 259, r"DFNConfig.pad_token_id must be None or an id in \[0, vocab_size=259\)"),
    ("eos_token_id", -1, r"DFNConfig.eos_token_id must be None, an id or a non-empty list of ids in \[0, vocab"),
    ("eos_token_id", [258, 300], r"DFNConfig.eos_token_id must be None, an id or a non-empty list"),
    ("eos_token_id", [], r"DFNConfig.eos_token_id must be None, an id or a non-empty list"),
]


def test_head_dim_is_derived():
    assert DFNConfig(hidden_size=32, num_attention_heads=2, head_dim=16).head_dim == 16
    with pytest.raises(ValueError, match=r"DFNConfig.head_dim is hidden_size / num_attention_heads = 16, got 8"):
        DFNConfig(hidden_size=32, num_attention_heads=2, head_dim=8)


def test_gelu_mlp_needs_a_hidden_unit():
    with pytest.raises(ValueError, match=r"DFNConfig.mlp_ratio \(0.001\) times hidden_size \(32\) must be >= 1"):
        DFNConfig(hidden_size=32, num_attention_heads=2, mlp_type="gelu", mlp_ratio=0.001)
    DFNConfig(hidden_size=32, num_attention_heads=2, mlp_type="gelu", mlp_ratio=1 / 32)


def test_query_flow_without_flow_is_rejected():
    with pytest.raises(ValueError, match=r"DFNConfig.use_query_flow needs use_flow=True"):
        DFNConfig(use_flow=False, use_query_flow=True)


@pytest.mark.parametrize("field, value, match", CONFIG_ERRORS, ids=[f"{f}={v!r}" for f, v, _ in CONFIG_ERRORS])
def test_invalid_config_names_the_field(field, value, match):
    with pytest.raises(ValueError, match=match):
        DFNConfig(**{field: value})


def test_valid_config_edge_values_are_accepted():
    config = DFNConfig(
        hidden_size=8,
        num_attention_heads=8,
        pos_dim=8,
        num_neighbors=1,
        memory_slots=1,
        memory_chunk_size=1,
        flow_alpha_init=0.0,
        dropout=0.0,
        pad_token_id=None,
        time_scale_min=0.5,
        time_scale_max=0.5,
    )
    assert config.head_dim == 1


def test_eos_token_id_list_round_trips(tmp_path):
    config = tiny_config(eos_token_id=[258, 10])
    config.save_pretrained(tmp_path)
    assert DFNConfig.from_pretrained(tmp_path).eos_token_id == [258, 10]


def test_config_broken_in_place_is_not_saved(tmp_path):
    """resize_token_embeddings below the special ids would save a checkpoint that does not load: refused, nothing
    written."""
    model = make_model(tiny_config())
    model.resize_token_embeddings(200)
    with pytest.raises(ValueError, match=r"Not saved.*pad_token_id must be None or an id in \[0, vocab_size=200\)"):
        model.save_pretrained(tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_unknown_config_field_is_named(tmp_path, caplog):
    """A typo would leave the default silently in place: the field is kept (as in every config) but named."""
    import logging

    with caplog.at_level(logging.WARNING):
        config = tiny_config(num_heads=8)
    assert "unknown field 'num_heads' (did you mean 'num_attention_heads'?)" in caplog.text
    assert config.num_heads == 8
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        tiny_config(attn_implementation="eager", max_length=20)  # taken (popped) by PreTrainedConfig itself
    assert "unknown field" not in caplog.text
    with caplog.at_level(logging.WARNING):
        make_model(tiny_config()).save_pretrained(tmp_path)
        DFNForCausalLM.from_pretrained(tmp_path)
    assert "unknown field" not in caplog.text


def test_config_overrides_at_load_are_validated(tmp_path):
    tiny_config().save_pretrained(tmp_path)
    with pytest.raises(ValueError, match="DFNConfig.num_neighbors must be an integer >= 1, got 0"):
        DFNConfig.from_pretrained(tmp_path, num_neighbors=0)


def test_config_changed_in_place_is_checked_when_a_model_is_built():
    config = tiny_config()
    config.num_neighbors = -3
    with pytest.raises(ValueError, match="DFNConfig.num_neighbors must be an integer >= 1, got -3"):
        DFNForCausalLM(config)


def test_checkpoint_of_another_model_type_is_refused(tmp_path):
    from transformers import LlamaConfig

    LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2).save_pretrained(
        tmp_path
    )
    with pytest.raises(ValueError, match="describes a 'llama' model, not DFN"):
        DFNForCausalLM.from_pretrained(tmp_path)


def test_invalid_config_in_saved_folder_is_rejected_at_load(tmp_path):
    tiny_config().save_pretrained(tmp_path)
    text = (tmp_path / "config.json").read_text().replace('"layer_variant": "residual"', '"layer_variant": "bogus"')
    (tmp_path / "config.json").write_text(text)
    with pytest.raises(ValueError, match="DFNConfig.layer_variant must be one of"):
        DFNConfig.from_pretrained(tmp_path)


# ---------------------------------------------------------------------------------------------------------------
# Cache that does not fit
# ---------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "other, field",
    [
        (dict(num_hidden_layers=3), "num_hidden_layers"),
        (dict(pos_dim=1), "pos_dim"),
        (dict(memory_chunk_size=5), "memory_chunk_size"),
        (dict(memory_slots=4), "memory_slots"),
        (dict(use_memory=False), "use_memory"),
        (dict(memory_write="mean"), "memory_write"),
        (dict(num_attention_heads=4), "num_attention_heads"),
    ],
)
def test_cache_from_another_config(model, other, field):
    other_model = make_model(tiny_config(**other))
    with torch.no_grad():
        cache = other_model(random_ids(1, 8), use_cache=True).cache
    with pytest.raises(ValueError, match=rf"built for another model configuration.*{field}"):
        model(random_ids(1, 2), cache=cache, use_cache=True)
    # an empty cache made for the other config is refused too
    with pytest.raises(ValueError, match=rf"another model configuration.*{field}"):
        model(random_ids(1, 2), cache=DFNCache(other_model.config), use_cache=True)


def test_cache_from_another_config_in_generate(model):
    other_model = make_model(tiny_config(num_hidden_layers=3))
    prompt = random_ids(1, 8)
    out = other_model.generate(prompt, max_new_tokens=2, do_sample=False, return_dict_in_generate=True)
    with pytest.raises(ValueError, match="num_hidden_layers"):
        model.generate(out.sequences, cache=out.cache, max_new_tokens=2, do_sample=False)


def test_cache_from_another_model_of_the_same_config(model):
    """Same config, other weights: the cache's states would be silently wrong for this model, so it is refused. A
    deep copy of the cache still belongs to its model; after reset() it is anyone's."""
    other_model = make_model(tiny_config(), seed=1)
    with torch.no_grad():
        cache = other_model(random_ids(1, 8), use_cache=True).cache
        with pytest.raises(ValueError, match="another model instance"):
            model(random_ids(1, 1), cache=cache, use_cache=True)
        with pytest.raises(ValueError, match="another model instance"):
            model.generate(random_ids(1, 9), cache=cache, max_new_tokens=2, do_sample=False)
        other_model(random_ids(1, 1), cache=copy.deepcopy(cache), use_cache=True)
        cache.reset()
        fresh = model(random_ids(1, 8), use_cache=True).logits
        assert torch.equal(model(random_ids(1, 8), cache=cache, use_cache=True).logits, fresh)


def test_cache_with_another_batch_size(model):
    with torch.no_grad():
        cache = model(random_ids(2, 8), use_cache=True).cache
    with pytest.raises(ValueError, match="holds 2 sequences but the input has batch size 3"):
        model(random_ids(3, 1), cache=cache, use_cache=True)


def test_mask_must_cover_cache_and_new_entities(model):
    ids = random_ids(1, 8)
    with torch.no_grad():
        cache = model(ids, use_cache=True).cache
    with pytest.raises(ValueError, match=r"cache_length \+ sequence_length\) = \(1, 10\)"):
        model(random_ids(1, 2), attention_mask=torch.ones(1, 2, dtype=torch.long), cache=cache, use_cache=True)


def test_mask_disagreeing_with_cache_padding_follows_the_cache(model):
    """generate() continuing from a cache re-derives the mask from pad tokens written after an eos; the cache's
    record of how past entities were processed wins (with a warning), so results do not depend on it."""
    ids, new = random_ids(1, 8), random_ids(1, 2, seed=3)
    with torch.no_grad():
        cache_a = model(ids, use_cache=True).cache
        cache_b = model(ids, use_cache=True).cache
        mask = torch.ones(1, 10, dtype=torch.long)
        expected = model(new, attention_mask=mask, cache=cache_a, use_cache=True).logits
        mask[0, 2] = 0  # the cache holds entity 2 as real
        assert torch.equal(model(new, attention_mask=mask, cache=cache_b, use_cache=True).logits, expected)


def test_all_new_entities_padding(model):
    with torch.no_grad():
        cache = model(random_ids(1, 8), use_cache=True).cache
    mask = torch.ones(1, 10, dtype=torch.long)
    mask[0, 8:] = 0
    with pytest.raises(ValueError, match="marks every new entity as padding"):
        model(random_ids(1, 2), attention_mask=mask, cache=cache, use_cache=True)


# ---------------------------------------------------------------------------------------------------------------
# Checkpoint folders with missing or corrupt weights
# ---------------------------------------------------------------------------------------------------------------


@pytest.fixture
def saved(tmp_path):
    make_model(tiny_config()).save_pretrained(tmp_path)
    assert (tmp_path / "model.safetensors").is_file()
    return tmp_path


def test_missing_weights_file_names_it(saved):
    os.remove(saved / "model.safetensors")
    with pytest.raises(OSError, match="model.safetensors"):
        DFNForCausalLM.from_pretrained(saved)


@pytest.mark.parametrize("damage", ["truncated", "garbage", "empty", "zeroed-header"])
def test_corrupt_weights_file_names_it(saved, damage):
    path = saved / "model.safetensors"
    data = path.read_bytes()
    if damage == "truncated":
        data = data[: len(data) // 2]
    elif damage == "garbage":
        data = bytes((i * 37 + 11) % 256 for i in range(len(data)))
    elif damage == "empty":
        data = b""
    else:
        data = bytes(8) + data[8:]
    path.write_bytes(data)
    for loader in (DFNForCausalLM.from_pretrained, DFNModel.from_pretrained):
        with pytest.raises(OSError, match=r"model\.safetensors"):
            loader(saved)


def test_weights_file_missing_a_tensor_is_an_error(saved):
    """A readable file that lacks weights must not load silently with freshly initialised ones."""
    path = saved / "model.safetensors"
    state = load_file(path)
    dropped = next(name for name in state if name.endswith("memory_pos"))
    del state[dropped]
    save_file(state, path, metadata={"format": "pt"})
    with pytest.raises(OSError, match="memory_pos"):
        DFNForCausalLM.from_pretrained(saved)


def test_weights_with_nan_are_an_error(saved):
    path = saved / "model.safetensors"
    state = load_file(path)
    name = next(n for n in state if n.endswith("value_proj.weight"))
    state[name][0, 0] = float("nan")
    save_file(state, path, metadata={"format": "pt"})
    with pytest.raises(OSError, match=rf"NaN or infinite weights in .*{name}"):
        DFNForCausalLM.from_pretrained(saved)


def test_weights_offloaded_to_disk_load(saved, tmp_path):
    """The NaN check skips what device_map leaves on the meta device (offloaded), instead of failing on it."""
    device_map = {"model.embed_tokens": "cpu", "lm_head": "cpu", "model.layers.0": "cpu", "model.layers.1": "disk"}
    device_map |= {"model.norm": "cpu", "model.log_time_scale": "cpu"}
    model = DFNForCausalLM.from_pretrained(saved, device_map=device_map, offload_folder=str(tmp_path / "offload"))
    assert {p.device.type for p in model.parameters()} == {"cpu", "meta"}
