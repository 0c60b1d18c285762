"""Configuration of Dynamic Flow Networks (DFN)."""

import difflib
import functools
import inspect
import math

from transformers import PreTrainedConfig
from transformers.utils import logging

logger = logging.get_logger(__name__)

LAYER_VARIANTS = ("residual", "seed")
NEIGHBOR_SEARCHES = ("auto", "reference", "fast")
MIX_KERNELS = ("torch", "triton")
MLP_TYPES = ("swiglu", "gelu")
MEMORY_WRITES = ("gated", "mean")
# written into every saved config so that the Auto classes find the remote code of a checkpoint folder
AUTO_MAP = {
    "AutoConfig": "configuration_dfn.DFNConfig",
    "AutoModel": "modeling_dfn.DFNModel",
    "AutoModelForCausalLM": "modeling_dfn.DFNForCausalLM",
}


@functools.cache
def _library_fields() -> frozenset:
    """What every config of the library has or takes (made once: a default `PreTrainedConfig` is not free)."""
    return frozenset(vars(PreTrainedConfig())) | frozenset(dir(PreTrainedConfig)) | {"auto_map", "transformers_version"}


class DFNConfig(PreTrainedConfig):
    r"""
    Configuration of a [`DFNModel`] / [`DFNForCausalLM`].

    Every entity (byte) has a state of size `hidden_size` and, per head, a position of `pos_dim` coordinates.
    Each layer moves the positions by a learned flow and mixes each entity with its `num_neighbors` nearest
    earlier entities (and the `memory_slots` field-memory slots) through a Gaussian kernel.

    Args:
        vocab_size (`int`, defaults to 259): 256 byte ids + pad, bos, eos.
        hidden_size (`int`, defaults to 256): width of entity states.
        num_hidden_layers (`int`, defaults to 4): number of flow layers.
        num_attention_heads (`int`, defaults to 4): heads; each has its own positions, flow, kernel and memory.
        pos_dim (`int`, defaults to 2): coordinates per head position (the first is time).
        num_neighbors (`int`, defaults to 32): K, the nearest earlier entities each entity mixes with.
        flow_alpha_init (`float`, defaults to 0.1): initial step size α of the flow.
        kernel_width_init (`float`, defaults to 1.0): initial Gaussian kernel width σ (in position units).
        time_scale_min / time_scale_max (`float`): per-head scale of the time coordinate at initialisation,
            spaced geometrically across heads (large = local head, small = near-global head).
        memory_slots (`int`, defaults to 16): M field-memory slots per layer and head.
        memory_chunk_size (`int`, defaults to 64): C, the memory is written once per absolute chunk of C entities.
        memory_init_log_mass (`float`, defaults to -5.0): log of the kernel mass the M slots together start with,
            relative to one neighbour at distance 0 with influence weight 1 (each slot's log weight starts at this
            minus log M). The default starts the memory almost silent, which language modelling prefers early on; a
            larger value gives a read through the memory alone more gradient at initialisation (see the README).
        memory_write (`str`, defaults to "gated"): how a chunk updates a slot (see `memory_dfn.py`): "gated" moves it
            by `1 - exp(-S)` of the chunk's write mass S; "mean" keeps the mass-weighted mean of all it absorbed
            (gate `S / D`, D the slot's total mass so far), so what a slot holds depends on relative, not absolute,
            write masses.
        memory_prior_log_mass (`float`, defaults to -5.0): "mean" write only: log of the mass D_0 each slot starts
            with (learned), i.e. how much the slot's initial value weighs against what is written. At -5 the first
            chunks of a fresh model (write mass about 0.01) take most of a slot.
        mlp_ratio (`float`, defaults to 4.0): MLP size: the "gelu" MLP's hidden width as a multiple of `hidden_size`;
            the "swiglu" MLP has about the same number of weights (hidden width `0.6 * mlp_ratio * hidden_size`,
            rounded to a multiple of 32).
        mlp_type (`str`, defaults to "swiglu"): the layer's MLP over `[FlowNorm(s), y]`: "swiglu" (gated,
            `down(silu(gate(u)) * up(u))`, no biases) or "gelu" (`down(gelu(up(u)))`, the MLP of checkpoints saved
            before this field existed; their configs load as "gelu").
        dropout (`float`, defaults to 0.0): dropout on the mixed values and the MLP output.
        use_flow (`bool`): move positions by the flow (False: α = 0, time-only positions).
        use_query_flow (`bool`, defaults to False): each entity looks for its neighbours from `p_i' + α W_q s_i`
            instead of from its own position `p_i'` (where others find it). With one position per entity the kernel
            is symmetric and cannot express "find the entity after the one like me" (copying); see the README.
        use_memory (`bool`): use the persistent field memory.
        use_flownorm (`bool`): FlowNorm (per-entity RMS normalisation); False replaces it by identity.
        layer_variant (`str`): "residual" (pre-norm residual block, default) or "seed" (the seed's literal layer
            `FlowNorm(MLP([s, y]))` without residual path).
        neighbor_search (`str`): "reference" (brute-force exact oracle, kernel mix differentiated by autograd: the
            test reference), "fast", or "auto" (the fastest exact search for each problem size).
        mix_kernel (`str`, defaults to "torch"): the kernel mix where no gradient is needed (inference, decoding):
            "torch" (PyTorch operations) or "triton" (one fused Triton kernel, `mix_triton.py`; on CUDA tensors when
            Triton is installed, else the PyTorch path with a warning; compiled decoding keeps its own fused code).
        initializer_range (`float`): std of the normal initialisation of linear and embedding weights.
        flownorm_eps (`float`): epsilon of FlowNorm.
    """

    model_type = "dfn"
    keys_to_ignore_at_inference = ["cache", "past_key_values"]

    def __init__(
        self,
        vocab_size: int = 259,
        hidden_size: int = 256,
        num_hidden_layers: int = 4,
        num_attention_heads: int = 4,
        pos_dim: int = 2,
        num_neighbors: int = 32,
        flow_alpha_init: float = 0.1,
        kernel_width_init: float = 1.0,
        time_scale_min: float = 0.01,
        time_scale_max: float = 1.0,
        memory_slots: int = 16,
        memory_chunk_size: int = 64,
        memory_init_log_mass: float = -5.0,
        memory_write: str = "gated",
        memory_prior_log_mass: float = -5.0,
        mlp_ratio: float = 4.0,
        mlp_type: str = "swiglu",
        dropout: float = 0.0,
        use_flow: bool = True,
        use_query_flow: bool = False,
        use_memory: bool = True,
        use_flownorm: bool = True,
        layer_variant: str = "residual",
        neighbor_search: str = "auto",
        mix_kernel: str = "torch",
        initializer_range: float = 0.02,
        flownorm_eps: float = 1e-6,
        use_cache: bool = True,
        pad_token_id: int | None = 256,
        bos_token_id: int | None = 257,
        eos_token_id: int | None = 258,
        tie_word_embeddings: bool = True,
        **kwargs,
    ):
        self.vocab_size = vocab_size
        self.hidden_size = hidden_size
        self.num_hidden_layers = num_hidden_layers
        self.num_attention_heads = num_attention_heads
        self.pos_dim = pos_dim
        self.num_neighbors = num_neighbors
        self.flow_alpha_init = flow_alpha_init
        self.kernel_width_init = kernel_width_init
        self.time_scale_min = time_scale_min
        self.time_scale_max = time_scale_max
        self.memory_slots = memory_slots
        self.memory_chunk_size = memory_chunk_size
        self.memory_init_log_mass = memory_init_log_mass
        self.memory_write = memory_write
        self.memory_prior_log_mass = memory_prior_log_mass
        self.mlp_ratio = mlp_ratio
        self.mlp_type = mlp_type
        self.dropout = dropout
        self.use_flow = use_flow
        self.use_query_flow = use_query_flow
        self.use_memory = use_memory
        self.use_flownorm = use_flownorm
        self.layer_variant = layer_variant
        self.neighbor_search = neighbor_search
        self.mix_kernel = mix_kernel
        self.initializer_range = initializer_range
        self.flownorm_eps = flownorm_eps
        self.use_cache = use_cache
        self.pad_token_id = pad_token_id
        self.bos_token_id = bos_token_id
        self.eos_token_id = eos_token_id
        self.tie_word_embeddings = tie_word_embeddings
        kwargs.setdefault("auto_map", dict(AUTO_MAP))
        head_dim = kwargs.pop("head_dim", None)  # derived, not set (a config.json written by other tools may hold it)
        super().__init__(**kwargs)
        self._warn_unknown(kwargs)
        self._validate_dfn()
        if head_dim is not None and head_dim != self.head_dim:
            raise ValueError(
                f"DFNConfig.head_dim is hidden_size / num_attention_heads = {self.head_dim}, got {head_dim!r}: set "
                "hidden_size and num_attention_heads instead"
            )

    def _warn_unknown(self, kwargs: dict) -> None:
        """Fields no config of the library knows are kept (as every config does) but read by nothing: a typo such as
        `num_heads` would silently leave the default in place, so name them, with the field probably meant. (What
        `PreTrainedConfig` takes itself, such as `attn_implementation` or generation parameters, it pops: not kept.)"""
        fields = list(inspect.signature(type(self).__init__).parameters)
        known = set(fields) | _library_fields()
        for name in sorted(k for k in kwargs if k in self.__dict__ and k not in known):
            close = difflib.get_close_matches(name, fields, n=1, cutoff=0.5)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            logger.warning(f"DFNConfig got the unknown field {name!r}{hint}: it is stored, but DFN does not read it")

    @classmethod
    def from_dict(cls, config_dict: dict, **kwargs):
        """As `PreTrainedConfig.from_dict`, but another model type is an error, and the result (with the keyword
        overrides) is validated. A saved config without `mlp_type` predates the SwiGLU default and describes a GELU
        MLP, so it loads as one (its weights have no `gate_proj`)."""
        model_type = config_dict.get("model_type", cls.model_type)
        if model_type != cls.model_type:
            raise ValueError(f"This config describes a {model_type!r} model, not DFN (model_type {cls.model_type!r})")
        if "mlp_type" not in config_dict and "mlp_type" not in kwargs:
            config_dict = {**config_dict, "mlp_type": "gelu"}
        loaded = super().from_dict(config_dict, **kwargs)
        (loaded[0] if isinstance(loaded, tuple) else loaded)._validate_dfn()  # kwargs were set after __init__
        return loaded

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    def _validate_dfn(self):
        def positive_int(name):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"DFNConfig.{name} must be an integer >= 1, got {value!r}")

        def positive_float(name):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value < math.inf:
                raise ValueError(f"DFNConfig.{name} must be a finite number > 0, got {value!r}")

        for name in (
            "vocab_size",
            "hidden_size",
            "num_hidden_layers",
            "num_attention_heads",
            "pos_dim",
            "num_neighbors",
            "memory_slots",
            "memory_chunk_size",
        ):
            positive_int(name)
        for name in (
            "kernel_width_init",
            "time_scale_min",
            "time_scale_max",
            "mlp_ratio",
            "initializer_range",
            "flownorm_eps",
        ):
            positive_float(name)
        if self.hidden_size % self.num_attention_heads:
            raise ValueError(
                f"DFNConfig.hidden_size ({self.hidden_size}) must be divisible by num_attention_heads "
                f"({self.num_attention_heads})"
            )
        if self.mlp_type == "gelu" and int(self.mlp_ratio * self.hidden_size) < 1:
            raise ValueError(
                f"DFNConfig.mlp_ratio ({self.mlp_ratio}) times hidden_size ({self.hidden_size}) must be >= 1: the GELU "
                "MLP would have no hidden unit"
            )
        if not 1 <= self.pos_dim <= 8:
            raise ValueError(f"DFNConfig.pos_dim must be in [1, 8], got {self.pos_dim}")
        if self.time_scale_min > self.time_scale_max:
            raise ValueError(
                f"DFNConfig.time_scale_min ({self.time_scale_min}) must be <= time_scale_max ({self.time_scale_max})"
            )
        if (
            isinstance(self.flow_alpha_init, bool)
            or not isinstance(self.flow_alpha_init, (int, float))
            or not (0 <= self.flow_alpha_init <= 10)
        ):
            raise ValueError(f"DFNConfig.flow_alpha_init must be a number in [0, 10], got {self.flow_alpha_init!r}")
        for name in ("memory_init_log_mass", "memory_prior_log_mass"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not -30 <= value <= 10:
                raise ValueError(f"DFNConfig.{name} must be a number in [-30, 10], got {value!r}")
        if self.memory_write not in MEMORY_WRITES:
            raise ValueError(f"DFNConfig.memory_write must be one of {MEMORY_WRITES}, got {self.memory_write!r}")
        if isinstance(self.dropout, bool) or not isinstance(self.dropout, (int, float)) or not 0 <= self.dropout < 1:
            raise ValueError(f"DFNConfig.dropout must be in [0, 1), got {self.dropout!r}")
        for name in ("use_flow", "use_query_flow", "use_memory", "use_flownorm", "use_cache", "tie_word_embeddings"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"DFNConfig.{name} must be True or False, got {getattr(self, name)!r}")
        if self.use_query_flow and not self.use_flow:
            raise ValueError("DFNConfig.use_query_flow needs use_flow=True (the query flow shares the flow's step α)")
        if self.layer_variant not in LAYER_VARIANTS:
            raise ValueError(f"DFNConfig.layer_variant must be one of {LAYER_VARIANTS}, got {self.layer_variant!r}")
        if self.mlp_type not in MLP_TYPES:
            raise ValueError(f"DFNConfig.mlp_type must be one of {MLP_TYPES}, got {self.mlp_type!r}")
        if self.neighbor_search not in NEIGHBOR_SEARCHES:
            raise ValueError(
                f"DFNConfig.neighbor_search must be one of {NEIGHBOR_SEARCHES}, got {self.neighbor_search!r}"
            )
        if self.mix_kernel not in MIX_KERNELS:
            raise ValueError(f"DFNConfig.mix_kernel must be one of {MIX_KERNELS}, got {self.mix_kernel!r}")

        def token_id(value) -> bool:
            return isinstance(value, int) and not isinstance(value, bool) and 0 <= value < self.vocab_size

        for name in ("pad_token_id", "bos_token_id", "eos_token_id"):
            value = getattr(self, name)
            ids = value if name == "eos_token_id" and isinstance(value, list) and value else [value]
            if value is not None and not all(token_id(v) for v in ids):
                allowed = "None, an id or a non-empty list of ids" if name == "eos_token_id" else "None or an id"
                raise ValueError(
                    f"DFNConfig.{name} must be {allowed} in [0, vocab_size={self.vocab_size}), got {value!r}"
                )


__all__ = ["AUTO_MAP", "DFNConfig"]
