"""The model on every device this machine has (the CPU always, CUDA when present) against the CPU: the same
neighbours, logits, gradients and generations. On a GPU machine, `pytest tests/test_device.py` is the CUDA check
(README, "On a GPU"); here the same assertions run on the CPU, so the checks themselves are exercised.

Matrix products on CUDA may use TF32 if a user enables it; these tests keep PyTorch's default (full fp32), under
which the tolerances below hold.
"""

import copy

import pytest
import torch
from conftest import CONFIGS, LAYOUTS, layout, make_model, masks, max_diff, pad_batch, random_ids, tiny_config

from dfn import DFNCache
from dfn.neighbors_dfn import (
    DECODE_BLOCK,
    BlockBoxes,
    causal_knn_blocks,
    causal_knn_fast,
    causal_knn_reference,
    causal_knn_scan,
)

GREEDY = dict(do_sample=False, eos_token_id=None)


def on_cpu(indices: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """Neighbour indices with invalid slots at -1, on the CPU (comparable across devices)."""
    return indices.masked_fill(~valid, -1).cpu()


@pytest.mark.parametrize("name", LAYOUTS)
def test_searches_on_device_return_the_cpu_oracles_neighbours(device, name):
    """Full pass, decoding scan and box-tree decoding on the device: the CPU oracle's neighbours, ties included."""
    length = 2300  # several dyadic levels, and enough blocks for the box tree
    pos, key_valid = layout(name, 4, length, 2, 2, seed=3), masks(length)
    ref_idx, ref_valid = causal_knn_reference(pos, pos, key_valid, 16)
    idx, valid = causal_knn_fast(pos.to(device), pos.to(device), key_valid.to(device), 16)
    assert torch.equal(on_cpu(idx, valid), on_cpu(ref_idx, ref_valid))

    boxes = BlockBoxes()
    boxes.extend(pos.to(device), key_valid.to(device), 0, length // DECODE_BLOCK)
    for offset in (length - 2, length - 1):
        query = pos[:, offset : offset + 1]
        expected = on_cpu(ref_idx[:, offset : offset + 1], ref_valid[:, offset : offset + 1])
        args = (query.to(device), pos.to(device), key_valid.to(device), 16, offset)
        assert torch.equal(on_cpu(*causal_knn_scan(*args)), expected)
        assert torch.equal(on_cpu(*causal_knn_blocks(*args, boxes)), expected)


@pytest.mark.parametrize("config_name", list(CONFIGS))
def test_logits_and_gradients_on_device_equal_the_cpus(device, config_name):
    cpu_model = make_model(tiny_config(config_name))
    model = copy.deepcopy(cpu_model).to(device)
    ids, mask = pad_batch([random_ids(1, 23, seed=1)[0], random_ids(1, 31, seed=2)[0]], "left")
    labels = ids.masked_fill(mask == 0, -100)
    expected = cpu_model(ids, attention_mask=mask, labels=labels)
    out = model(ids.to(device), attention_mask=mask.to(device), labels=labels.to(device))
    assert max_diff(out.logits.cpu()[mask.bool()], expected.logits[mask.bool()]) <= 1e-4
    expected.loss.backward()
    out.loss.backward()
    for (name, param), (_, cpu_param) in zip(model.named_parameters(), cpu_model.named_parameters(), strict=True):
        scale = cpu_param.grad.abs().max().item() + 1e-6
        assert max_diff(param.grad.cpu(), cpu_param.grad) <= 1e-4 * max(1.0, scale), name


def test_future_inputs_do_not_change_past_outputs_on_device(device):
    model = make_model(tiny_config("k2-queryflow-mem-residual")).to(device)
    ids = random_ids(2, 40, seed=4).to(device)
    changed = ids.clone()
    changed[:, 25:] = random_ids(2, 15, seed=5).to(device)
    with torch.no_grad():
        a, b = model(ids).logits, model(changed).logits
    assert max_diff(a[:, :25], b[:, :25]) <= 1e-6


def test_long_cached_decoding_on_device_equals_the_full_pass(device):
    """A prefill past the box tree's threshold, then single-token steps: the full pass's logits on the device."""
    model = make_model(tiny_config("k3-mem-residual")).to(device)
    ids = random_ids(1, 2200, seed=6).to(device)
    with torch.no_grad():
        full = model(ids).logits
        cache = DFNCache(model.config)
        model(ids[:, :2190], cache=cache, use_cache=True)
        steps = [model(ids[:, i : i + 1], cache=cache, use_cache=True).logits for i in range(2190, 2200)]
    assert max_diff(torch.cat(steps, 1), full[:, 2190:]) <= 1e-4


@pytest.mark.parametrize("mode", [dict(num_beams=1), dict(num_beams=3)], ids=["greedy", "beam"])
def test_generation_on_device_equals_the_cpus(device, mode):
    cpu_model = make_model(tiny_config("k3-mem-residual"))
    model = copy.deepcopy(cpu_model).to(device)
    ids, mask = pad_batch([random_ids(1, 9, seed=7)[0], random_ids(1, 14, seed=8)[0]], "left")
    expected = cpu_model.generate(ids, attention_mask=mask, max_new_tokens=12, **GREEDY, **mode)
    out = model.generate(ids.to(device), attention_mask=mask.to(device), max_new_tokens=12, **GREEDY, **mode)
    assert torch.equal(out.cpu(), expected)


def test_bf16_autocast_training_step_on_device(device):
    """Mixed precision as training uses it: finite loss and gradients that agree with fp32 to bf16 precision."""
    model = make_model(tiny_config("k3-mem-residual")).to(device).train()
    ids = random_ids(2, 40, seed=9).to(device)
    reference = model(ids, labels=ids).loss
    with torch.autocast(device.type, dtype=torch.bfloat16):
        loss = model(ids, labels=ids).loss
    loss.backward()
    assert torch.isfinite(loss) and abs(loss.item() - reference.item()) <= 0.05 * reference.item()
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)
