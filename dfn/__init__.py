"""Dynamic Flow Networks as a Hugging Face Transformers model."""

from transformers import AutoConfig, AutoModel, AutoModelForCausalLM, AutoTokenizer

from .cache_dfn import DFNCache
from .configuration_dfn import AUTO_MAP, DFNConfig
from .modeling_dfn import DFNForCausalLM, DFNModel, DFNPreTrainedModel
from .tokenization_dfn import DFNByteTokenizer

AutoConfig.register("dfn", DFNConfig, exist_ok=True)
AutoModel.register(DFNConfig, DFNModel, exist_ok=True)
AutoModelForCausalLM.register(DFNConfig, DFNForCausalLM, exist_ok=True)
AutoTokenizer.register(DFNConfig, slow_tokenizer_class=DFNByteTokenizer, exist_ok=True)

DFNConfig.register_for_auto_class()
DFNModel.register_for_auto_class("AutoModel")
DFNForCausalLM.register_for_auto_class("AutoModelForCausalLM")
DFNByteTokenizer.register_for_auto_class("AutoTokenizer")

__all__ = ["AUTO_MAP", "DFNByteTokenizer", "DFNCache", "DFNConfig", "DFNForCausalLM", "DFNModel", "DFNPreTrainedModel"]
