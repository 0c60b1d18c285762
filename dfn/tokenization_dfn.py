"""Byte-level tokenizer for Dynamic Flow Networks.

Self-contained (imports only `transformers` and the standard library) so that it can be saved next to a
checkpoint and loaded as remote code with `AutoTokenizer.from_pretrained(..., trust_remote_code=True)`.
"""

import json

from transformers import AddedToken, PreTrainedTokenizer

NUM_BYTES = 256


class DFNByteTokenizer(PreTrainedTokenizer):
    """
    Byte-level tokenizer: a text is its UTF-8 bytes, one id per byte.

    Ids 0-255 are the raw byte values; 256 is `pad_token`, 257 `bos_token`, 258 `eos_token` (vocab_size 259).
    Byte tokens are spelled `<0x00>` ... `<0xFF>`, so they never collide with text or added tokens. Special
    token strings that occur in the text are encoded as the special id (pass `split_special_tokens=True` to
    encode them as plain bytes). Decoding joins the bytes and decodes them with `errors="replace"`, so an
    incomplete multi-byte sequence (as seen while streaming) gives U+FFFD instead of an error; ids outside
    the vocabulary raise `ValueError`.

    Args:
        pad_token (`str`, *optional*, defaults to `"<pad>"`): padding token, id 256.
        bos_token (`str`, *optional*, defaults to `"<s>"`): beginning-of-sequence token, id 257.
        eos_token (`str`, *optional*, defaults to `"</s>"`): end-of-sequence token, id 258.
        add_bos_token (`bool`, *optional*, defaults to `False`): prepend `bos_token` to each sequence when
            special tokens are added.
        add_eos_token (`bool`, *optional*, defaults to `False`): append `eos_token` to each sequence when
            special tokens are added.
        padding_side (`str`, *optional*, defaults to `"right"`): `"right"` or `"left"`; saved with the
            tokenizer, including later changes to the attribute.
        kwargs: passed to [`PreTrainedTokenizer`] (e.g. `model_max_length`, `truncation_side`).
    """

    model_input_names = ["input_ids", "attention_mask"]

    def __init__(
        self,
        pad_token="<pad>",
        bos_token="<s>",
        eos_token="</s>",
        add_bos_token=False,
        add_eos_token=False,
        padding_side="right",
        **kwargs,
    ):
        self.add_bos_token = add_bos_token
        self.add_eos_token = add_eos_token
        self._byte_tokens = [f"<0x{b:02X}>" for b in range(NUM_BYTES)]
        self._byte_ids = {token: b for b, token in enumerate(self._byte_tokens)}
        # Fix the special ids before the base class would append the special tokens wherever they fall.
        specials = (pad_token, bos_token, eos_token)
        self._added_tokens_decoder = {
            NUM_BYTES + i: AddedToken(tok, special=True, normalized=False) if isinstance(tok, str) else tok
            for i, tok in enumerate(specials)
            if tok is not None
        }
        super().__init__(
            pad_token=pad_token,
            bos_token=bos_token,
            eos_token=eos_token,
            add_bos_token=add_bos_token,
            add_eos_token=add_eos_token,
            padding_side=padding_side,
            **kwargs,
        )

    @property
    def vocab_size(self):
        return NUM_BYTES + 3

    def get_vocab(self):
        return {**self._byte_ids, **self.added_tokens_encoder}

    def _tokenize(self, text, **kwargs):
        return [self._byte_tokens[b] for b in text.encode("utf-8")]

    def _convert_token_to_id(self, token):
        return self._byte_ids.get(token)

    def _convert_id_to_token(self, index):
        if not 0 <= index < NUM_BYTES:
            raise ValueError(f"Token id {index} is outside the vocabulary (ids 0-{len(self) - 1}).")
        return self._byte_tokens[index]

    def convert_tokens_to_string(self, tokens):
        data = bytearray()
        for token in tokens:
            byte = self._byte_ids.get(token)
            data += token.encode("utf-8") if byte is None else bytes((byte,))
        return data.decode("utf-8", errors="replace")

    def build_inputs_with_special_tokens(self, token_ids_0, token_ids_1=None):
        return self._wrap(token_ids_0, token_ids_1, self.bos_token_id, self.eos_token_id)

    def get_special_tokens_mask(self, token_ids_0, token_ids_1=None, already_has_special_tokens=False):
        if already_has_special_tokens:
            return super().get_special_tokens_mask(token_ids_0, token_ids_1, already_has_special_tokens=True)
        zeros_1 = None if token_ids_1 is None else [0] * len(token_ids_1)
        return self._wrap([0] * len(token_ids_0), zeros_1, 1, 1)

    def _wrap(self, ids_0, ids_1, bos, eos):
        """Concatenate the sequences, each as `[bos] ids [eos]` with bos/eos only where enabled."""
        prefix = [bos] if self.add_bos_token else []
        suffix = [eos] if self.add_eos_token else []
        sequences = [ids_0] if ids_1 is None else [ids_0, ids_1]
        return [i for ids in sequences for i in prefix + list(ids) + suffix]

    def _save_pretrained(self, save_directory, file_names, legacy_format=None, filename_prefix=None):
        # transformers 5 drops `add_bos_token`/`add_eos_token` from tokenizer_config.json (fast tokenizers
        # keep them in tokenizer.json): write them back into it (`file_names[0]`) before any upload.
        with open(file_names[0], encoding="utf-8") as f:
            config = json.load(f)
        config.update(add_bos_token=self.add_bos_token, add_eos_token=self.add_eos_token)
        with open(file_names[0], "w", encoding="utf-8") as f:
            f.write(json.dumps(config, indent=2, sort_keys=True, ensure_ascii=False) + "\n")
        return super()._save_pretrained(save_directory, file_names, legacy_format, filename_prefix)

    def save_vocabulary(self, save_directory, filename_prefix=None):
        return ()


__all__ = ["DFNByteTokenizer"]
