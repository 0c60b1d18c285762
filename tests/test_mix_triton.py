"""`mix_kernel="triton"`: the fused Triton kernel mix equals the PyTorch one. On a CUDA machine it runs compiled;
without CUDA on CPU tensors in Triton's interpreter (conftest sets `TRITON_INTERPRET=1` before triton is imported).
Skipped where Triton is not installed (`pip install triton`); the PyTorch fallback is tested everywhere."""

import logging

import pytest
import torch
from conftest import make_model, max_diff, random_ids, tiny_config

import dfn.mix_triton as mix_triton
import dfn.modeling_dfn as modeling_dfn
from dfn import DFNCache
from dfn.modeling_dfn import DFNFlowLayer, kernel_average_reference

CUDA = torch.cuda.is_available()


@pytest.fixture
def triton_device():
    """The device the kernel runs on here: CUDA, or the CPU through Triton's interpreter."""
    pytest.importorskip("triton")
    return torch.device("cuda" if CUDA else "cpu")


@pytest.mark.parametrize(
    "batch, length, keys, heads, pos_dim, head_dim, width",
    [(2, 9, 13, 2, 2, 3, 4), (1, 5, 40, 3, 3, 8, 5), (2, 7, 7, 4, 1, 16, 32)],
)
def test_triton_kernel_average_equals_the_reference(
    triton_device, batch, length, keys, heads, pos_dim, head_dim, width
):
    """Neighbours picked by several queries, invalid slots, a query with none valid (the reference then averages its
    slots uniformly), K and D that are not powers of two, keys that are a strided view."""
    generator = torch.Generator().manual_seed(length)
    queries = torch.randn(batch, length, heads, pos_dim, generator=generator)
    # the first keys of a longer buffer, as a decoding step's view of the cache (not contiguous when batch > 1)
    features = torch.randn(batch, keys + 3, heads, pos_dim + head_dim + 1, generator=generator)[:, :keys]
    inv_two_var = torch.rand(heads, generator=generator) + 0.2
    indices = torch.randint(0, keys, (batch, length, heads, width), generator=generator)
    valid = torch.rand(batch, length, heads, width, generator=generator) > 0.25
    valid[0, 0] = False
    inputs = [t.to(triton_device) for t in (queries, features, inv_two_var, indices, valid)]
    ours = mix_triton.triton_kernel_average(*inputs, pos_dim)
    reference = kernel_average_reference(queries, features, inv_two_var, indices, valid, pos_dim)
    for a, b in zip(ours, reference, strict=True):
        assert max_diff(a.cpu(), b) <= 1e-5


def test_decoding_through_the_triton_mix_equals_the_pytorch_full_pass(triton_device, monkeypatch):
    """A model with `mix_kernel="triton"`: its cached decoding steps mix through the kernel (counted) and give the
    logits of the same weights' full pass with the PyTorch mix; a training step never uses the kernel (it has no
    backward), also with the reference search."""
    if not CUDA:  # the interpreter runs on CPU tensors, which the layer would otherwise hand to PyTorch
        monkeypatch.setattr(DFNFlowLayer, "_triton_mix_runs", staticmethod(lambda queries: True))
    calls = []
    kernel = mix_triton.triton_kernel_average
    monkeypatch.setattr("dfn.modeling_dfn.triton_kernel_average", lambda *args: calls.append(1) or kernel(*args))
    torch_model = make_model(tiny_config("k3-mem-residual")).to(triton_device)
    model = make_model(tiny_config("k3-mem-residual", mix_kernel="triton")).to(triton_device)
    ids = random_ids(2, 30, seed=3).to(triton_device)
    with torch.no_grad():
        full = torch_model(ids, use_cache=False).logits
        cache = DFNCache(model.config)
        model(ids[:, :20], cache=cache, use_cache=True)
        steps = torch.cat([model(ids[:, i : i + 1], cache=cache, use_cache=True).logits for i in range(20, 30)], 1)
    assert len(calls) == 2 * 11 and max_diff(steps, full[:, 20:]) <= 1e-4  # 2 layers x (prefill + 10 steps)
    for search in ("auto", "reference"):
        model.config.neighbor_search = torch_model.config.neighbor_search = search
        grads = []
        for m in (model, torch_model):
            m.zero_grad()
            m(ids, labels=ids, use_cache=False).loss.backward()
            grads.append(m.model.layers[0].value_proj.weight.grad)
        assert len(calls) == 2 * 11 and max_diff(*grads) <= 1e-6, search


def test_triton_mix_falls_back_to_pytorch_off_cuda(caplog):
    """Where the kernel cannot run (CPU tensors, or no Triton), the PyTorch mix runs, with a warning."""
    modeling_dfn.logger.warning_once.cache_clear()  # warned once per process: an earlier fallback would hide it
    ids = random_ids(1, 12, seed=4)
    torch_model = make_model(tiny_config("k3-mem-residual"))
    triton_model = make_model(tiny_config("k3-mem-residual", mix_kernel="triton"))
    with torch.no_grad(), caplog.at_level(logging.WARNING):
        assert torch.equal(triton_model(ids).logits, torch_model(ids).logits)
    assert 'mix_kernel="triton" needs CUDA tensors' in caplog.text


def test_mix_kernel_is_validated():
    with pytest.raises(ValueError, match="mix_kernel"):
        tiny_config(mix_kernel="cuda")
