"""DFNModel / DFNForCausalLM behaviour: causality, padding, round trip, gradients, loss, outputs, tying, checkpointing.

DESIGN.md §2 invariants 1 (causal), 4 (padding and batching), 5 (round trip, in-process half) and 6 (positions
learn), for every config of `conftest.CONFIGS`.
"""

import copy
import math

import pytest
import torch
import torch.nn.functional as F
from conftest import (
    CONFIGS,
    make_model,
    max_diff,
    pad_batch,
    random_ids,
    real_slice,
    tiny_config,
)
from transformers import AutoConfig, AutoModel, AutoModelForCausalLM

from dfn import DFNConfig, DFNForCausalLM, DFNModel

LENGTH = 30  # > 3 memory chunks for every config (chunk sizes 5-8)


def cut_points(config) -> list[int]:
    chunk = config.memory_chunk_size
    return sorted({1, 3, chunk - 1, chunk, chunk + 1, 2 * chunk + 2, LENGTH - 1})


def change_from(ids: torch.Tensor, cut: int, seed: int) -> torch.Tensor:
    """`ids` with every id at positions >= cut replaced by a different byte."""
    changed = ids.clone()
    shift = random_ids(ids.shape[0], ids.shape[1] - cut, seed=seed, high=255) + 1
    changed[:, cut:] = (ids[:, cut:] + shift) % 256
    assert bool((changed[:, cut:] != ids[:, cut:]).all())
    return changed


# ---------------------------------------------------------------------------------------------------------------
# 1. Causality
# ---------------------------------------------------------------------------------------------------------------


def test_future_inputs_do_not_change_past_outputs(model, config):
    ids = random_ids(2, LENGTH, seed=1)
    with torch.no_grad():
        ref = model(ids, output_hidden_states=True, output_positions=True)
        for cut in cut_points(config):
            out = model(change_from(ids, cut, seed=100 + cut), output_hidden_states=True, output_positions=True)
            assert max_diff(out.logits[:, :cut], ref.logits[:, :cut]) <= 1e-6, cut
            for layer, (a, b) in enumerate(zip(out.hidden_states, ref.hidden_states, strict=True)):
                assert max_diff(a[:, :cut], b[:, :cut]) <= 1e-6, (cut, layer)
            for layer, (a, b) in enumerate(zip(out.positions, ref.positions, strict=True)):
                assert max_diff(a[:, :cut], b[:, :cut]) <= 1e-6, (cut, layer)
            # the change is seen from `cut` on (the test would be vacuous otherwise)
            assert max_diff(out.logits[:, cut], ref.logits[:, cut]) > 1e-3


def test_future_embeddings_do_not_change_past_outputs(model, config):
    """Same with continuous perturbations of `inputs_embeds` (moves the flow and the memory write smoothly)."""
    embeds = model.get_input_embeddings()(random_ids(2, LENGTH, seed=2)).detach()
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        ref = model(inputs_embeds=embeds).logits
        for cut in cut_points(config):
            changed = embeds.clone()
            changed[:, cut:] += torch.randn(changed[:, cut:].shape, generator=generator) * 0.5
            out = model(inputs_embeds=changed).logits
            assert max_diff(out[:, :cut], ref[:, :cut]) <= 1e-6, cut
            assert max_diff(out[:, cut:], ref[:, cut:]) > 1e-4


def test_no_gradient_from_future(model, config):
    ids = random_ids(2, LENGTH, seed=3)
    embeds = model.get_input_embeddings()(ids).detach().requires_grad_(True)
    logits = model(inputs_embeds=embeds).logits
    for i in [0, *cut_points(config)]:
        (grad,) = torch.autograd.grad(logits[:, i].sum(), embeds, retain_graph=True)
        assert torch.count_nonzero(grad[:, i + 1 :]) == 0, f"output {i} has a gradient from a later input"
        assert torch.isfinite(grad).all()
        assert grad[:, i].abs().sum() > 0
        if i > 0:
            assert grad[:, :i].abs().sum() > 0, f"output {i} ignores its past"


@pytest.mark.parametrize("config_name", [name for name, c in CONFIGS.items() if c["use_memory"]])
def test_no_gradient_from_future_through_memory_of_earlier_chunks(config_name):
    """A query in chunk 3 reads the memory written by chunks 0-2: gradient flows to chunk 0, never to its future."""
    config = tiny_config(config_name)
    model = make_model(config)
    chunk = config.memory_chunk_size
    ids = random_ids(1, 4 * chunk, seed=4)
    embeds = model.get_input_embeddings()(ids).detach().requires_grad_(True)
    logits = model(inputs_embeds=embeds).logits
    query = 3 * chunk + 1
    (grad,) = torch.autograd.grad(logits[:, query].sum(), embeds)
    assert torch.count_nonzero(grad[:, query + 1 :]) == 0
    # chunk 0 reaches the query (with time-only positions, the K=4 nearest over two layers reach back 8 entities at
    # most, so there only the memory can carry it)
    assert grad[:, :chunk].abs().sum() > 0


# ---------------------------------------------------------------------------------------------------------------
# 3. Padding and batching
# ---------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("side", ["left", "right"])
def test_padded_batch_matches_each_sequence_alone(model, side):
    lengths = [LENGTH, 17, 9, 1]
    sequences = [random_ids(1, n, seed=10 + n)[0] for n in lengths]
    ids, mask = pad_batch(sequences, side, garbage=True)  # padding content must not matter
    with torch.no_grad():
        batch = model(ids, attention_mask=mask, output_positions=True)
        for row, seq in enumerate(sequences):
            alone = model(seq[None], output_positions=True)
            real = real_slice(len(seq), ids.shape[1], side)
            assert max_diff(batch.logits[row, real], alone.logits[0]) <= 1e-5, (side, row)
            for a, b in zip(batch.positions, alone.positions, strict=True):
                assert max_diff(a[row, real], b[0]) <= 1e-5, (side, row)


def test_left_padding_shifts_no_time_coordinate(model):
    seq = random_ids(1, 12, seed=5)[0]
    ids, mask = pad_batch([seq, random_ids(1, 20, seed=6)[0]], "left")
    with torch.no_grad():
        positions = model(ids, attention_mask=mask, output_positions=True).positions[0]
    scale = model.model.log_time_scale.detach().exp()
    expected = torch.arange(12, dtype=torch.float32)[:, None] * scale
    assert max_diff(positions[0, -12:, :, 0], expected) <= 1e-6


def test_padding_entities_are_nobodys_neighbours(model):
    """Right padding in the middle of nowhere: changing the padded ids changes no real output."""
    seq = random_ids(1, 20, seed=7)[0]
    ids, mask = pad_batch([seq, random_ids(1, LENGTH, seed=8)[0]], "right")
    other = ids.clone()
    other[0, 20:] = (ids[0, 20:] + 7) % 256
    with torch.no_grad():
        a = model(ids, attention_mask=mask).logits
        b = model(other, attention_mask=mask).logits
    assert max_diff(a[0, :20], b[0, :20]) == 0.0
    assert max_diff(a[1], b[1]) == 0.0


# ---------------------------------------------------------------------------------------------------------------
# 4. Round trip
# ---------------------------------------------------------------------------------------------------------------


def test_save_load_round_trip(model, config, tmp_path):
    model.save_pretrained(tmp_path)
    loaded = DFNForCausalLM.from_pretrained(tmp_path)
    assert not loaded.training
    assert loaded.config.to_diff_dict() == model.config.to_diff_dict()
    ref_state, new_state = model.state_dict(), loaded.state_dict()
    assert ref_state.keys() == new_state.keys()
    for name, tensor in ref_state.items():
        assert torch.equal(tensor, new_state[name]), name
    ids = random_ids(2, LENGTH, seed=9)
    with torch.no_grad():
        assert torch.equal(model(ids).logits, loaded(ids).logits)


def test_checkpoint_saved_before_mlp_type_loads_its_gelu_mlp(tmp_path):
    """A config.json without `mlp_type` (saved before the SwiGLU default) describes a GELU MLP and loads as one, with
    its weights and logits; a config saved now keeps its SwiGLU MLP."""
    import json

    old = make_model(tiny_config(mlp_type="gelu"))
    old.save_pretrained(tmp_path / "old")
    path = tmp_path / "old" / "config.json"
    saved = json.loads(path.read_text())
    del saved["mlp_type"]
    path.write_text(json.dumps(saved))
    loaded = DFNForCausalLM.from_pretrained(tmp_path / "old")
    assert loaded.config.mlp_type == "gelu" and loaded.model.layers[0].mlp.gate_proj is None
    ids = random_ids(2, LENGTH, seed=9)
    with torch.no_grad():
        assert torch.equal(old(ids).logits, loaded(ids).logits)
    tiny_config().save_pretrained(tmp_path / "new")
    assert DFNConfig.from_pretrained(tmp_path / "new").mlp_type == "swiglu"


def test_mlp_types_have_about_the_same_weights():
    """The SwiGLU MLP (the default) and the GELU MLP have the same weight count to within 5 %, so the comparison's
    `gelu_mlp` ablation changes the MLP's form, not its size."""
    from dfn.modeling_dfn import DFNMLP

    config = DFNConfig(hidden_size=128, num_attention_heads=4)
    counts = {
        kind: sum(p.numel() for p in DFNMLP(DFNConfig(**{**config.to_dict(), "mlp_type": kind})).parameters())
        for kind in ("swiglu", "gelu")
    }
    assert config.mlp_type == "swiglu"
    assert abs(counts["swiglu"] / counts["gelu"] - 1) < 0.05, counts


def test_auto_classes_load_in_process(tmp_path):
    model = make_model(tiny_config())
    model.save_pretrained(tmp_path)
    assert type(AutoConfig.from_pretrained(tmp_path)).__name__ == "DFNConfig"
    lm = AutoModelForCausalLM.from_pretrained(tmp_path)
    backbone = AutoModel.from_pretrained(tmp_path)
    assert isinstance(lm, DFNForCausalLM) and isinstance(backbone, DFNModel)
    ids = random_ids(1, 20, seed=11)
    with torch.no_grad():
        assert torch.equal(lm(ids).logits, model(ids).logits)
        assert torch.equal(backbone(ids).last_hidden_state, model.model(ids).last_hidden_state)


# ---------------------------------------------------------------------------------------------------------------
# 5. Positions learn
# ---------------------------------------------------------------------------------------------------------------


def test_gradients_reach_flow_kernel_influence_and_memory(config):
    model = make_model(config).train()
    ids = random_ids(2, LENGTH, seed=12)
    model(ids, labels=ids).loss.backward()
    names = ["log_kernel_width", "influence_proj.weight", "influence_proj.bias", "value_proj.weight"]
    if config.use_flow:
        names += ["flow_proj.weight", "flow_alpha"]
    if config.use_query_flow:
        names += ["query_flow_proj.weight"]
    if config.use_memory:
        names += ["memory_val", "memory_write_scale", "memory_log_weight"]
        names += ["memory_pos", "memory_log_width"] if config.pos_dim > 1 else []
        names += ["memory_prior_log_mass"] if config.memory_write == "mean" else []
    checked = [(f"layers.{i}.{n}", layer.get_parameter(n)) for i, layer in enumerate(model.model.layers) for n in names]
    checked.append(("log_time_scale", model.model.log_time_scale))
    for name, param in checked:
        assert param.grad is not None, f"{name} gets no gradient"
        assert torch.isfinite(param.grad).all(), f"{name} has a non-finite gradient"
        assert param.grad.abs().sum() > 0, f"{name} has an all-zero gradient"
        if param.dim() >= 1 and name.split(".")[-1] in ("flow_alpha", "log_kernel_width", "log_time_scale"):
            assert bool((param.grad != 0).all()), f"{name}: some head gets no gradient"
    for name, param in model.named_parameters():
        if param.grad is not None:
            assert torch.isfinite(param.grad).all(), name


def test_every_parameter_is_used(config):
    """Every parameter gets a gradient: no dead weights in a checkpoint (switched-off parts are not built)."""
    model = make_model(config).train()
    ids = random_ids(2, LENGTH, seed=12)
    model(ids, labels=ids).loss.backward()
    unused = [name for name, param in model.named_parameters() if param.grad is None or not param.grad.abs().sum()]
    assert unused == []
    assert any("flow_proj" in name for name, _ in model.named_parameters()) == config.use_flow


def test_zero_query_flow_is_the_plain_flow():
    """The query flow only moves where an entity looks from: zeroed, the model is the one without it."""
    plain = make_model(tiny_config("k2-queryflow-mem-residual", use_query_flow=False))
    looking = DFNForCausalLM(tiny_config("k2-queryflow-mem-residual")).eval()
    missing, unexpected = looking.load_state_dict(plain.state_dict(), strict=False)
    assert unexpected == [] and sorted(missing) == [f"model.layers.{i}.query_flow_proj.weight" for i in range(2)]
    ids = random_ids(2, LENGTH, seed=14)
    with torch.no_grad():
        for layer in looking.model.layers:
            layer.query_flow_proj.weight.zero_()
        assert max_diff(looking(ids).logits, plain(ids).logits) == 0.0
        for layer in looking.model.layers:
            layer.query_flow_proj.weight.normal_(std=0.5)
        assert max_diff(looking(ids).logits, plain(ids).logits) > 1e-3


def test_no_flow_means_positions_are_time_only():
    config = tiny_config("k1-noflow-nonorm-residual")
    model = make_model(config)
    with torch.no_grad():
        positions = model(random_ids(1, 20, seed=13), output_positions=True).positions
    for p in positions[1:]:
        assert torch.equal(p, positions[0])


# ---------------------------------------------------------------------------------------------------------------
# 7. Loss and outputs
# ---------------------------------------------------------------------------------------------------------------


def manual_loss(logits, labels, reduction="mean"):
    logits, targets = logits[:, :-1].reshape(-1, logits.shape[-1]), labels[:, 1:].reshape(-1)
    keep = targets != -100
    return F.cross_entropy(logits[keep].double(), targets[keep], reduction=reduction), int(keep.sum())


def test_loss_ignores_minus_100_and_equals_manual_cross_entropy(model):
    ids = random_ids(2, 20, seed=14)
    labels = ids.clone()
    labels[0, 3:7] = -100
    labels[1, -5:] = -100
    out = model(ids, labels=labels)
    expected, _ = manual_loss(out.logits, labels)
    assert abs(out.loss.item() - expected.item()) <= 1e-5
    # the ignored positions did count for something: with their real labels the loss differs
    assert abs(model(ids, labels=ids).loss.item() - out.loss.item()) > 1e-4
    # the first label is never a target (labels are shifted inside)
    first = labels.clone()
    first[:, 0] = 7
    assert model(ids, labels=first).loss.item() == out.loss.item()


@pytest.mark.parametrize("as_tensor", [False, True])
def test_num_items_in_batch_is_honoured(model, as_tensor):
    ids = random_ids(2, 20, seed=15)
    labels = ids.clone()
    labels[1, :8] = -100
    logits = model(ids).logits
    summed, count = manual_loss(logits, labels, reduction="sum")
    for n in (count, 3 * count, 1):
        items = torch.tensor(n) if as_tensor else n
        loss = model(ids, labels=labels, num_items_in_batch=items).loss
        assert math.isclose(loss.item(), summed.item() / n, rel_tol=1e-5), n


def test_hidden_states_output(model, config):
    ids = random_ids(2, 20, seed=16)
    with torch.no_grad():
        out = model(ids, output_hidden_states=True)
        base = model.model(ids, output_hidden_states=True)
        plain = model(ids)
    assert plain.hidden_states is None and plain.positions is None
    assert len(out.hidden_states) == config.num_hidden_layers + 1
    assert all(h.shape == (2, 20, config.hidden_size) for h in out.hidden_states)
    assert torch.equal(out.hidden_states[0], model.get_input_embeddings()(ids))
    assert torch.equal(base.hidden_states[-1], base.last_hidden_state)
    assert torch.equal(out.hidden_states[-1], base.last_hidden_state)
    assert max_diff(model.lm_head(base.last_hidden_state), plain.logits) <= 1e-6
    assert torch.equal(out.logits, plain.logits)


def test_positions_output(model, config):
    ids = random_ids(2, 20, seed=17)
    with torch.no_grad():
        positions = model(ids, output_positions=True).positions
    shape = (2, 20, config.num_attention_heads, config.pos_dim)
    assert len(positions) == config.num_hidden_layers + 1
    assert all(p.shape == shape and p.dtype == torch.float32 for p in positions)
    time = torch.arange(20, dtype=torch.float32).view(1, -1, 1)
    scale = model.model.log_time_scale.detach().exp().view(1, 1, -1)
    assert max_diff(positions[0][..., 0], (time * scale).expand(2, -1, -1)) <= 1e-6
    assert torch.count_nonzero(positions[0][..., 1:]) == 0
    for before, after in zip(positions[:-1], positions[1:], strict=True):
        moved = max_diff(before, after)
        assert moved > 1e-4 if config.use_flow else moved == 0.0


def test_return_dict_false_gives_tuple(model):
    ids = random_ids(1, 10, seed=18)
    with torch.no_grad():
        as_tuple = model(ids, labels=ids, return_dict=False)
        as_dict = model(ids, labels=ids)
    assert isinstance(as_tuple, tuple)
    assert torch.equal(as_tuple[0], as_dict.loss) and torch.equal(as_tuple[1], as_dict.logits)


def test_logits_to_keep(model):
    ids = random_ids(2, 15, seed=19)
    with torch.no_grad():
        full = model(ids).logits
        last = model(ids, logits_to_keep=3).logits
    assert last.shape == (2, 3, full.shape[-1])
    assert max_diff(last, full[:, -3:]) <= 1e-6


# ---------------------------------------------------------------------------------------------------------------
# 8. Weight tying, gradient checkpointing, inputs_embeds
# ---------------------------------------------------------------------------------------------------------------


def test_weights_are_tied(tmp_path):
    model = make_model(tiny_config())
    assert model.lm_head.weight is model.model.embed_tokens.weight
    model.save_pretrained(tmp_path)
    loaded = DFNForCausalLM.from_pretrained(tmp_path)
    assert loaded.lm_head.weight is loaded.model.embed_tokens.weight
    assert torch.equal(loaded.lm_head.weight, model.lm_head.weight)
    with torch.no_grad():
        loaded.model.embed_tokens.weight[5].add_(1.0)
    assert torch.equal(loaded.lm_head.weight[5], loaded.model.embed_tokens.weight[5])


def test_untied_weights_round_trip(tmp_path):
    model = make_model(tiny_config(tie_word_embeddings=False))
    assert model.lm_head.weight is not model.model.embed_tokens.weight
    assert not torch.equal(model.lm_head.weight, model.model.embed_tokens.weight)
    model.save_pretrained(tmp_path)
    loaded = DFNForCausalLM.from_pretrained(tmp_path)
    assert loaded.lm_head.weight is not loaded.model.embed_tokens.weight
    assert torch.equal(loaded.lm_head.weight, model.lm_head.weight)
    ids = random_ids(1, 12, seed=20)
    with torch.no_grad():
        assert torch.equal(loaded(ids).logits, model(ids).logits)


@pytest.mark.parametrize("config_name, dropout", [("k3-mem-residual", 0.0), ("k1-mem-seed", 0.2)])
def test_gradient_checkpointing_gives_same_loss_and_grads(config_name, dropout):
    """Same loss and gradients with and without checkpointing (with dropout: same seed, same masks on recompute)."""
    model = make_model(tiny_config(config_name, dropout=dropout)).train()
    checkpointed = copy.deepcopy(model)
    checkpointed.activation_checkpointing_enable()
    assert checkpointed.is_activation_checkpointing and not model.is_activation_checkpointing
    calls = []
    for layer in checkpointed.model.layers:
        layer.value_proj.register_forward_pre_hook(lambda module, args, i=layer.layer_idx: calls.append(i))
    ids = random_ids(2, LENGTH, seed=21)
    torch.manual_seed(0)
    out = model(ids, labels=ids, use_cache=False)
    torch.manual_seed(0)
    out_ckpt = checkpointed(ids, labels=ids)
    assert out_ckpt.cache is None
    out.loss.backward()
    out_ckpt.loss.backward()
    # each layer's inside ran twice: forward, then recomputed in backward
    assert sorted(calls) == sorted(2 * list(range(len(checkpointed.model.layers))))
    assert abs(out.loss.item() - out_ckpt.loss.item()) <= 1e-6
    ckpt_params = dict(checkpointed.named_parameters())
    for name, param in model.named_parameters():
        other = ckpt_params[name]
        assert (param.grad is None) == (other.grad is None), name
        if param.grad is not None:
            assert max_diff(param.grad, other.grad) <= 1e-6, name


@pytest.mark.parametrize("neighbor_chunk, query_chunk", [(6, 7), (12, 4096), (1, 1)])  # batch 3: 2, 4, 1 queries
def test_chunked_mixing_and_mlp_give_same_loss_and_grads(monkeypatch, neighbor_chunk, query_chunk):
    """The neighbour gather (batch-aware query chunks) and the MLP run in chunks at long lengths or large batches;
    any chunking gives the unchunked loss and gradients on a padded batch."""
    import dfn.modeling_dfn as modeling

    sequences = [random_ids(1, n, seed=n)[0] for n in (LENGTH, 17, 23)]
    ids, mask = pad_batch(sequences, "left", garbage=True)
    labels = ids.masked_fill(mask == 0, -100)
    model = make_model(tiny_config("k3-mem-residual")).train()
    chunked = copy.deepcopy(model)
    out = model(ids, attention_mask=mask, labels=labels, use_cache=False)
    monkeypatch.setattr(modeling, "NEIGHBOR_CHUNK", neighbor_chunk)
    monkeypatch.setattr(modeling, "QUERY_CHUNK", query_chunk)
    out_chunked = chunked(ids, attention_mask=mask, labels=labels, use_cache=False)
    assert abs(out.loss.item() - out_chunked.loss.item()) <= 1e-6
    out.loss.backward()
    out_chunked.loss.backward()
    chunked_params = dict(chunked.named_parameters())
    for name, param in model.named_parameters():
        # float32 products summed in another order (e.g. the embedding gradient, which collects every entity's)
        assert max_diff(param.grad, chunked_params[name].grad) <= 5e-6, name


def neighbor_mix_inputs(dtype=torch.float32, batch=2, length=9, keys=13, heads=2, pos_dim=2, head_dim=3, width=4):
    """Random inputs of the neighbour kernel average: queries, features, 1/2σ², indices (repeats included), valid
    (with invalid slots and one query whose slots are all invalid)."""
    generator = torch.Generator().manual_seed(7)
    queries = torch.randn(batch, length, heads, pos_dim, generator=generator, dtype=dtype)
    features = torch.randn(batch, keys, heads, pos_dim + head_dim + 1, generator=generator, dtype=dtype)
    inv_two_var = torch.rand(heads, generator=generator, dtype=dtype) + 0.2
    indices = torch.randint(0, keys, (batch, length, heads, width), generator=generator)
    valid = torch.rand(batch, length, heads, width, generator=generator) > 0.25
    valid[0, 0] = False
    return queries, features, inv_two_var, indices, valid, pos_dim


@pytest.mark.parametrize("neighbor_chunk", [256, 4, 1])
def test_neighbor_kernel_average_backward_equals_autograd(monkeypatch, neighbor_chunk):
    """The hand-written backward of the fused neighbour mix gives autograd's gradients through the reference, with
    keys picked by several queries and chunks (index_add accumulation), invalid slots and an all-invalid query."""
    import dfn.modeling_dfn as modeling

    monkeypatch.setattr(modeling, "NEIGHBOR_CHUNK", neighbor_chunk)
    queries, features, inv_two_var, indices, valid, pos_dim = neighbor_mix_inputs()
    grad_mixed, grad_log_norm = torch.randn(2, 9, 2, 3), torch.randn(2, 9, 2)
    results = []
    for mix in (modeling.kernel_average_reference, modeling.NeighborKernelAverage.apply):
        inputs = [t.clone().requires_grad_() for t in (queries, features, inv_two_var)]
        mixed, log_norm = mix(*inputs, indices, valid, pos_dim)
        torch.autograd.backward([mixed, log_norm], [grad_mixed, grad_log_norm])
        results.append([mixed, log_norm, *(t.grad for t in inputs)])
    names = ["mixed", "log_norm", "queries", "features", "1/2σ²"]
    for name, ours, reference in zip(names, *reversed(results), strict=True):
        assert max_diff(ours, reference) <= 1e-5, name


def test_neighbor_kernel_average_passes_gradcheck():
    """Float64 finite differences agree with the hand-written backward."""
    import dfn.modeling_dfn as modeling

    queries, features, inv_two_var, indices, valid, pos_dim = neighbor_mix_inputs(torch.float64, length=5, keys=7)
    inputs = [t.requires_grad_() for t in (queries, features, inv_two_var)]
    assert torch.autograd.gradcheck(
        lambda q, f, v: modeling.NeighborKernelAverage.apply(q, f, v, indices, valid, pos_dim), inputs
    )


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_flow_norm_backward_equals_autograd(dtype):
    """FlowNorm's hand-written backward gives autograd's gradients through the composite formula (computed in
    float32, cast to the input's dtype before the weight)."""
    import dfn.modeling_dfn as modeling

    generator = torch.Generator().manual_seed(11)
    x = (3 * torch.randn(2, 5, 8, generator=generator)).to(dtype)
    weight = (1 + 0.5 * torch.randn(8, generator=generator)).to(dtype)
    grad = torch.randn(2, 5, 8, generator=generator).to(dtype)

    def composite(x, weight):
        x32 = x.float()
        return weight * (x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + 1e-6)).to(x.dtype)

    results = []
    for norm in (composite, lambda x, w: modeling.FlowNormFunction.apply(x, w, 1e-6)):
        inputs = [t.clone().requires_grad_() for t in (x, weight)]
        out = norm(*inputs)
        out.backward(grad)
        results.append([out, *(t.grad for t in inputs)])
    tolerance = 1e-6 if dtype == torch.float32 else 1e-2
    for name, ours, reference in zip(["output", "x", "weight"], *reversed(results), strict=True):
        assert ours.dtype == reference.dtype, name
        assert max_diff(ours.float(), reference.float()) <= tolerance * reference.abs().max().item(), name


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_flow_norm_without_gradients_equals_the_autograd_function(dtype):
    """Without gradients FlowNorm runs as one fused `rms_norm` (the decoding path): the same values as the autograd
    Function that training runs."""
    import dfn.modeling_dfn as modeling

    generator = torch.Generator().manual_seed(12)
    norm = modeling.DFNFlowNorm(8, 1e-6).to(dtype)
    with torch.no_grad():
        norm.weight.copy_(1 + 0.5 * torch.randn(8, generator=generator))
        x = (3 * torch.randn(2, 5, 8, generator=generator)).to(dtype)
        fused = norm(x)
    reference = modeling.FlowNormFunction.apply(x, norm.weight, 1e-6)
    assert fused.dtype == reference.dtype == dtype
    assert max_diff(fused.float(), reference.float()) <= (1e-6 if dtype == torch.float32 else 1e-2) * 3


def test_kernel_average_of_one_chunk_equals_the_chunked_one(monkeypatch):
    """Inputs that fit one chunk (a decoding step) skip the whole-sequence outputs; the values are those of the
    same inputs mixed query by query."""
    import dfn.modeling_dfn as modeling

    inputs = neighbor_mix_inputs()
    whole = modeling.kernel_average_reference(*inputs)
    monkeypatch.setattr(modeling, "NEIGHBOR_CHUNK", 1)
    for ours, reference in zip(whole, modeling.kernel_average_reference(*inputs), strict=True):
        assert max_diff(ours, reference) <= 1e-6


def test_flow_norm_refuses_a_second_derivative():
    """Its backward is not differentiable (the saved scale is detached from x): asking for a second derivative raises
    instead of returning a wrong one."""
    import dfn.modeling_dfn as modeling

    x = torch.randn(3, 8, dtype=torch.float64, requires_grad=True)
    out = modeling.FlowNormFunction.apply(x, torch.ones(8, dtype=torch.float64), 1e-6)
    (grad,) = torch.autograd.grad(out.pow(2).sum(), x, create_graph=True)
    with pytest.raises(RuntimeError, match="once_differentiable"):
        grad.sum().backward()


def test_mix_matrices_equal_the_dense_mix_and_its_transpose():
    """The fused mix multiplies by the kernel weights as a sparse matrix, and accumulates the value gradients through
    its transpose, built by sorting the key rows: both act as the dense matrices do, with a key chosen several times
    by one query, keys chosen by several queries, and keys chosen by none."""
    import dfn.modeling_dfn as modeling

    generator = torch.Generator().manual_seed(3)
    weights = torch.rand(6, 4, generator=generator)
    rows = torch.tensor([[2, 2, 0, 5], [5, 1, 1, 1], [0, 2, 7, 7], [7, 0, 5, 2], [1, 1, 1, 1], [2, 5, 0, 7]])
    dense = torch.zeros(6, 8).index_put_((torch.arange(6).repeat_interleave(4), rows.view(-1)), weights.view(-1), True)
    values, grads = torch.randn(8, 3, generator=generator), torch.randn(6, 3, generator=generator)
    rows = rows.view(-1).int()
    assert max_diff(modeling.mix_matrix(weights, rows, 8) @ values, dense @ values) <= 1e-6
    assert max_diff(modeling.transposed_mix_matrix(weights, rows, 8) @ grads, dense.t() @ grads) <= 1e-6


def test_fused_and_gather_forwards_agree(model):
    """With gradients the kernel mix runs the fused (sparse product) forward, without them the gather path. They sum
    in different orders, so they agree to fp32 rounding of the logits' scale (measured: up to 1.2e-6 of it)."""
    ids = random_ids(2, LENGTH, seed=4)
    with torch.no_grad():
        gathered = model(ids, use_cache=False).logits
    fused = model(ids, use_cache=False).logits
    assert fused.requires_grad
    assert max_diff(fused, gathered) <= 4e-6 * gathered.abs().max().item()


def test_float64_model_keeps_the_field_in_float32(model):
    """A float64 model (`model.double()`) runs its positions and kernel in float32, as every dtype does, on both mixing
    paths; they and the float32 model agree to float32 rounding."""
    ids = random_ids(2, LENGTH, seed=4)
    with torch.no_grad():
        single = model(ids, use_cache=False).logits
        model.double()
        gathered = model(ids, use_cache=False).logits
    fused = model(ids, use_cache=False).logits
    assert gathered.dtype == fused.dtype == torch.float64
    assert max_diff(fused, gathered) <= 4e-6 * gathered.abs().max().item()
    assert max_diff(gathered, single) <= 1e-5 * single.abs().max().item()


@pytest.mark.parametrize("config_name", ["k3-mem-residual", "k2-queryflow-mem-residual"])
def test_reference_and_fused_mixing_give_same_loss_and_grads(config_name):
    """A model with neighbor_search="reference" (oracle search, autograd mixing) and the same weights with the default
    (fused mixing) agree on loss and every gradient, on a padded batch."""
    sequences = [random_ids(1, n, seed=n)[0] for n in (LENGTH, 19)]
    ids, mask = pad_batch(sequences, "right", garbage=True)
    labels = ids.masked_fill(mask == 0, -100)
    grads = []
    for method in ("reference", "auto"):
        model = make_model(tiny_config(config_name, neighbor_search=method)).train()
        loss = model(ids, attention_mask=mask, labels=labels, use_cache=False).loss
        loss.backward()
        grads.append((loss.item(), {name: p.grad for name, p in model.named_parameters()}))
    (loss_ref, grads_ref), (loss_auto, grads_auto) = grads
    assert abs(loss_ref - loss_auto) <= 1e-6
    for name, grad in grads_ref.items():
        assert max_diff(grads_auto[name], grad) <= 1e-5, name


def test_segment_training_with_only_kernel_widths_trainable():
    """Reading a document in cached segments with grad on, where only the kernel widths train (the new entities need
    no gradient): the backward never sees a cache buffer a later segment overwrote, and both mixing paths agree."""
    ids = random_ids(1, LENGTH, seed=9)
    grads = []
    for method in ("reference", "auto"):
        model = make_model(tiny_config("k3-mem-residual", neighbor_search=method)).train()
        for name, param in model.named_parameters():
            param.requires_grad_(name.endswith("log_kernel_width"))
        cache, loss = None, 0.0
        for part in (slice(0, 12), slice(12, 20), slice(20, LENGTH)):
            out = model(ids[:, part], labels=ids[:, part], cache=cache, use_cache=True)
            cache, loss = out.cache, loss + out.loss
        loss.backward()
        grads.append({n: p.grad for n, p in model.named_parameters() if p.requires_grad})
    for name, grad in grads[0].items():
        assert grad is not None and max_diff(grads[1][name], grad) <= 1e-5, name


def test_bf16_autocast_training_step_grads_agree_on_both_mixing_paths():
    """`--bf16` trains under autocast. The fused kernel mix differentiates in fp32 where autograd through the reference
    runs in bf16, so the gradients agree only to bf16 precision (measured: 1.4 % of each tensor's largest entry); a
    wrong backward under autocast is off by far more."""
    ids = random_ids(2, LENGTH, seed=5)
    grads = []
    for method in ("reference", "auto"):
        model = make_model(tiny_config("k3-mem-residual", neighbor_search=method)).train()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = model(ids, labels=ids, use_cache=False).loss
        loss.backward()
        grads.append({name: p.grad for name, p in model.named_parameters()})
    for name, grad in grads[0].items():
        assert bool(torch.isfinite(grads[1][name]).all()), name
        assert max_diff(grads[1][name], grad) <= 0.1 * grad.abs().max().item(), name


def test_inputs_embeds_equals_input_ids(model):
    sequences = [random_ids(1, n, seed=22 + n)[0] for n in (LENGTH, 14)]
    ids, mask = pad_batch(sequences, "left")
    embeds = model.get_input_embeddings()(ids)
    with torch.no_grad():
        by_ids = model(ids, attention_mask=mask, labels=ids)
        by_embeds = model(inputs_embeds=embeds, attention_mask=mask, labels=ids)
    assert torch.equal(by_ids.logits, by_embeds.logits)
    assert torch.equal(by_ids.loss, by_embeds.loss)


def test_config_round_trip_keeps_every_field(tmp_path):
    config = tiny_config("k1-noflow-nonorm-residual", dropout=0.1, neighbor_search="reference")
    config.save_pretrained(tmp_path)
    loaded = DFNConfig.from_pretrained(tmp_path)
    for field in (*CONFIGS["k1-noflow-nonorm-residual"], "dropout", "neighbor_search", "hidden_size", "pos_dim"):
        assert getattr(loaded, field) == getattr(config, field), field


def test_an_accelerator_mixes_a_training_batch_in_few_chunks():
    """On the CPU the neighbour mix runs in small chunks (fresh large buffers cost page faults); on an accelerator
    every chunk costs kernel launches instead, so the GPU preset's 64 x 256 batch takes 2 chunks instead of 64."""
    import dfn.modeling_dfn as modeling

    assert len(modeling.query_chunks(64, 256, torch.device("cpu"))) == 64
    assert len(modeling.query_chunks(64, 256, torch.device("cuda"))) == 2
