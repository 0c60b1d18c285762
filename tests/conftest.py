"""Shared tiny configs and helpers for the model, cache/generation, error and remote-code tests.

All model tests run in fp32 on tiny configs (hidden 32, 2 layers, 2 heads, K 4, 3 memory slots, memory chunks of
5-8 entities) with sequences of at most 40 entities, so that every sequence crosses several memory chunks.
The weights are perturbed away from the (near-zero) initialisation so that flow, influence weights, kernel widths
and memory all matter and greedy decoding does not collapse to one repeated byte.
"""

import importlib.util
import os
import sys
from pathlib import Path

import pytest
import torch

if not torch.cuda.is_available():  # Triton kernels (where Triton is installed) run in its interpreter on CPU tensors;
    os.environ.setdefault("TRITON_INTERPRET", "1")  # it must be set before anything imports triton

from dfn import DFNConfig, DFNForCausalLM  # noqa: E402

# The tensors here are tiny: one thread is many times faster than two on a shared 2-core machine.
torch.set_num_threads(1)

SCRIPTS = Path(__file__).resolve().parents[1] / "scripts"
VOCAB_BYTES = 256  # ids 0-255 are bytes; 256 pad, 257 bos, 258 eos
PAD_ID = 256
EOS_ID = 258

# the DFNConfig fields of the tiny models the training, LoRA and metric tests train for a few steps
TINY_MODEL = {
    "hidden_size": 32,
    "num_hidden_layers": 2,
    "num_attention_heads": 2,
    "pos_dim": 2,
    "num_neighbors": 8,
    "memory_slots": 4,
    "memory_chunk_size": 16,
    "mlp_ratio": 2.0,
}

TINY = dict(
    hidden_size=32,
    num_hidden_layers=2,
    num_attention_heads=2,
    num_neighbors=4,
    memory_slots=3,
    memory_chunk_size=6,
    mlp_ratio=2.0,
    kernel_width_init=0.7,
    time_scale_min=0.3,
    time_scale_max=1.0,
    flow_alpha_init=0.5,
    initializer_range=0.2,
)

# name -> overrides of TINY; together they cover pos_dim 1/2/3, memory on/off, both layer variants, flow on/off, the
# query flow, FlowNorm off, memory chunk sizes 5-8, both memory writes ("gated", the default, and "mean"), both MLP
# types (SwiGLU, the default, and GELU) and both the default ("auto") and the reference neighbour search.
CONFIGS = {
    "k3-mem-residual": dict(pos_dim=3, use_memory=True, layer_variant="residual", memory_chunk_size=6),
    "k1-mem-seed": dict(pos_dim=1, use_memory=True, layer_variant="seed", memory_chunk_size=5, mlp_type="gelu"),
    "k3-nomem-seed": dict(pos_dim=3, use_memory=False, layer_variant="seed", neighbor_search="reference"),
    "k2-queryflow-mem-residual": dict(
        pos_dim=2,
        use_query_flow=True,
        use_memory=True,
        memory_write="mean",
        layer_variant="residual",
        memory_chunk_size=7,
    ),
    "k1-noflow-nonorm-residual": dict(
        pos_dim=1, use_memory=True, use_flow=False, use_flownorm=False, layer_variant="residual", memory_chunk_size=8
    ),
}
# a smaller set for the slower generate()-based tests
GEN_CONFIGS = ["k3-mem-residual", "k1-mem-seed", "k3-nomem-seed", "k2-queryflow-mem-residual"]


DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


@pytest.fixture(params=DEVICES)
def device(request) -> torch.device:
    """Each device this machine has: the CPU always, CUDA when present."""
    return torch.device(request.param)


def tiny_config(name: str = "k3-mem-residual", **overrides) -> DFNConfig:
    return DFNConfig(**{**TINY, **CONFIGS[name], **overrides})


def make_model(config: DFNConfig, seed: int = 0, noise: float | None = None) -> DFNForCausalLM:
    """A tiny fp32 model in eval mode whose every parameter is perturbed (deterministically per seed)."""
    if noise is None:
        noise = 0.3 if config.use_flownorm else 0.2  # without FlowNorm, larger weights blow the logits up
    torch.manual_seed(seed)
    model = DFNForCausalLM(config).float()
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("flow_alpha") or name.endswith("log_kernel_width") or name.endswith("log_time_scale"):
                param.add_(0.1 * torch.randn_like(param))
            elif name.endswith("memory_log_weight"):  # initialised small on purpose; here the slots must matter
                param.copy_(noise * torch.randn_like(param))
            else:
                param.add_(noise * torch.randn_like(param))
    return model.eval()


def load_script(name: str):
    """Import `scripts/<name>.py` as a module (the scripts folder on the path, as when the script runs)."""
    if str(SCRIPTS) not in sys.path:
        sys.path.insert(0, str(SCRIPTS))
    spec = importlib.util.spec_from_file_location(name, SCRIPTS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def random_ids(batch: int, length: int, seed: int = 0, high: int = VOCAB_BYTES) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(0, high, (batch, length), generator=generator)


def max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    assert a.shape == b.shape, (a.shape, b.shape)
    return (a.double() - b.double()).abs().max().item() if a.numel() else 0.0


def pad_batch(sequences: list[torch.Tensor], side: str, pad_id: int = PAD_ID, garbage: bool = False):
    """Pad 1-D id tensors to a batch `(B, L)` with its attention mask; `garbage=True` fills padding with random bytes
    instead of `pad_id` (padding content must never matter)."""
    length = max(len(s) for s in sequences)
    ids = torch.full((len(sequences), length), pad_id, dtype=torch.long)
    if garbage:
        ids = random_ids(len(sequences), length, seed=1234)
    mask = torch.zeros(len(sequences), length, dtype=torch.long)
    for row, seq in enumerate(sequences):
        span = slice(length - len(seq), length) if side == "left" else slice(0, len(seq))
        ids[row, span] = seq
        mask[row, span] = 1
    return ids, mask


def real_slice(length: int, total: int, side: str) -> slice:
    return slice(total - length, total) if side == "left" else slice(0, length)


@pytest.fixture(params=list(CONFIGS), ids=list(CONFIGS))
def config_name(request) -> str:
    return request.param


@pytest.fixture
def config(config_name) -> DFNConfig:
    return tiny_config(config_name)


@pytest.fixture
def model(config) -> DFNForCausalLM:
    return make_model(config)


@pytest.fixture(params=GEN_CONFIGS, ids=GEN_CONFIGS)
def gen_model(request) -> DFNForCausalLM:
    return make_model(tiny_config(request.param))


# neighbour-search inputs: the layouts every search is tested on
LAYOUTS = ("time", "iid", "clustered", "equal", "duplicates", "lattice", "reversed")


def layout(name: str, batch: int, length: int, heads: int, dim: int, seed: int = 0) -> torch.Tensor:
    """`(B, T, H, k)` positions."""
    gen = torch.Generator().manual_seed(seed)
    shape = (batch, length, heads, dim)
    time = torch.arange(length, dtype=torch.float32).view(1, -1, 1, 1)
    if name == "time":  # the model's layout: coordinate 0 = t · time scale + drift, the others drift
        scale = torch.logspace(-2, 0, heads).view(1, 1, heads, 1)
        base = torch.cat([(time * scale).expand(batch, -1, heads, 1), torch.zeros(*shape[:3], dim - 1)], -1)
        return base + 0.5 * torch.randn(shape, generator=gen)
    if name == "iid":
        return torch.rand(shape, generator=gen)
    if name == "clustered":
        centres = 5 * torch.randn(4, dim, generator=gen)
        which = torch.randint(0, 4, shape[:3], generator=gen)
        return centres[which] + 0.01 * torch.randn(shape, generator=gen)
    if name == "equal":
        return torch.full(shape, 0.5)
    if name == "duplicates":
        return torch.randint(0, 3, shape, generator=gen).float()
    if name == "lattice":  # time-ordered groups of equal coordinate 0, integer offsets: ties everywhere
        pos = torch.randint(0, 2, shape, generator=gen).float()
        pos[..., 0] = (time // 3).view(1, -1, 1)
        return pos
    if name == "reversed":
        return -time.expand(shape).clone() + 0.1 * torch.randn(shape, generator=gen)
    raise ValueError(name)


def masks(length: int, seed: int = 1) -> torch.Tensor:
    """`(4, T)` key masks, one per batch element: none, left padding, right padding, random holes."""
    key_valid = torch.ones(4, length, dtype=torch.bool)
    key_valid[1, : (2 * length) // 3] = False
    key_valid[2, length // 2 :] = False
    key_valid[3] = torch.rand(length, generator=torch.Generator().manual_seed(seed)) > 0.3
    return key_valid
