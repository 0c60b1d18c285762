"""The same-size transformer baseline: a byte-vocabulary `LlamaForCausalLM` matched to a DFN's parameter count."""

from transformers import LlamaConfig, LlamaForCausalLM

from .modeling_dfn import DFNForCausalLM


def llama_intermediate_size(num_params: int, hidden_size: int, num_layers: int, vocab_size: int = 259) -> int:
    """MLP width that gives a Llama (tied embeddings) `num_params` parameters:
    `params = V d + d + L (4 d^2 + 2 d + 3 d I)`."""
    fixed = vocab_size * hidden_size + hidden_size + num_layers * (4 * hidden_size**2 + 2 * hidden_size)
    return max(8, round((num_params - fixed) / (3 * hidden_size * num_layers)))


def same_size_llama(dfn_config, max_position_embeddings: int) -> LlamaForCausalLM:
    """A freshly initialised sdpa Llama with the DFN's width, depth, heads, byte vocabulary and special tokens, and
    (within a few parameters) its parameter count."""
    num_params = sum(p.numel() for p in DFNForCausalLM(dfn_config).parameters())
    d, layers = dfn_config.hidden_size, dfn_config.num_hidden_layers
    config = LlamaConfig(
        vocab_size=dfn_config.vocab_size,
        hidden_size=d,
        intermediate_size=llama_intermediate_size(num_params, d, layers, dfn_config.vocab_size),
        num_hidden_layers=layers,
        num_attention_heads=dfn_config.num_attention_heads,
        num_key_value_heads=dfn_config.num_attention_heads,
        max_position_embeddings=max_position_embeddings,
        tie_word_embeddings=True,
        pad_token_id=dfn_config.pad_token_id,
        bos_token_id=dfn_config.bos_token_id,
        eos_token_id=dfn_config.eos_token_id,
        attn_implementation="sdpa",
    )
    return LlamaForCausalLM(config)


__all__ = ["llama_intermediate_size", "same_size_llama"]
