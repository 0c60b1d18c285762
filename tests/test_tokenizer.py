import json
import os
import shutil
import subprocess
import sys
import textwrap

import pytest
import torch

from dfn.tokenization_dfn import DFNByteTokenizer

TEXTS = [
    "hello world",
    "",
    "héllo çà et là, Ærøskøbing",
    "日本語のテキスト，中文",
    "emoji 😀🚀 and a family 👩‍👩‍👧‍👦 and a flag 🏳️‍🌈",
    "line one\nline two\r\n\ttabbed\x00nul",
    "literal <s> and </s> and <pad> in text",
]


@pytest.fixture
def tok():
    return DFNByteTokenizer()


def test_vocabulary_and_special_ids(tok):
    assert tok.vocab_size == 259
    assert len(tok) == 259
    assert (tok.pad_token, tok.bos_token, tok.eos_token) == ("<pad>", "<s>", "</s>")
    assert (tok.pad_token_id, tok.bos_token_id, tok.eos_token_id) == (256, 257, 258)
    assert sorted(tok.all_special_ids) == [256, 257, 258]
    vocab = tok.get_vocab()
    assert len(vocab) == 259
    assert sorted(vocab.values()) == list(range(259))


def test_known_ids(tok):
    assert tok.encode("hé") == [104, 195, 169]
    assert tok("hé")["input_ids"] == [104, 195, 169]
    assert tok.encode("😀") == [240, 159, 152, 128]
    assert tok.encode("") == []
    assert tok.tokenize("hé") == ["<0x68>", "<0xC3>", "<0xA9>"]
    assert tok.convert_tokens_to_ids(["<0x00>", "<0xFF>", "</s>"]) == [0, 255, 258]


@pytest.mark.parametrize("text", TEXTS)
def test_round_trip(tok, text):
    ids = tok.encode(text, split_special_tokens=True)
    assert ids == list(text.encode("utf-8"))
    assert tok.decode(ids) == text
    assert tok.decode(tok.encode(text)) == text


def test_special_token_strings_in_text(tok):
    assert tok.encode("a<s>b</s>") == [97, 257, 98, 258]
    assert tok.encode("a<s>b", split_special_tokens=True) == [97, 60, 115, 62, 98]
    # No whitespace is stripped around special tokens.
    assert tok.decode(tok.encode(" <pad> x ")) == " <pad> x "


def test_partial_multibyte_decodes_with_replacement(tok):
    ids = tok.encode("a😀")
    assert tok.decode(ids[:3]) == "a\ufffd"
    assert tok.decode([0xFF]) == "\ufffd"
    # A streaming decoder can decode every prefix; the full sequence decodes exactly.
    text = "日本 👩‍👧 ok"
    ids = tok.encode(text)
    for n in range(len(ids) + 1):
        assert isinstance(tok.decode(ids[:n]), str)
    assert tok.decode(ids) == text


def test_skip_special_tokens(tok):
    ids = [257, 104, 105, 258, 256, 256]
    assert tok.decode(ids) == "<s>hi</s><pad><pad>"
    assert tok.decode(ids, skip_special_tokens=True) == "hi"
    assert tok.convert_ids_to_tokens([257, 104]) == ["<s>", "<0x68>"]


@pytest.mark.parametrize("bad", [259, 300, -1])
def test_out_of_range_ids_raise(tok, bad):
    with pytest.raises(ValueError, match=f"Token id {bad} is outside the vocabulary \\(ids 0-258\\)"):
        tok.decode([104, bad])
    with pytest.raises(ValueError, match="outside the vocabulary"):
        tok.decode([[104], [bad]])


def test_bos_eos_options():
    plain = DFNByteTokenizer()
    assert plain.encode("hi") == [104, 105]
    assert plain.num_special_tokens_to_add() == 0

    both = DFNByteTokenizer(add_bos_token=True, add_eos_token=True)
    assert both.encode("hi") == [257, 104, 105, 258]
    assert both.encode("hi", add_special_tokens=False) == [104, 105]
    assert both.encode("hi", "yo") == [257, 104, 105, 258, 257, 121, 111, 258]
    enc = both("hi", return_special_tokens_mask=True)
    assert enc["special_tokens_mask"] == [1, 0, 0, 1]
    assert both.get_special_tokens_mask([257, 104, 258], already_has_special_tokens=True) == [1, 0, 1]

    assert DFNByteTokenizer(add_bos_token=True).encode("hi") == [257, 104, 105]
    assert DFNByteTokenizer(add_eos_token=True).encode("hi") == [104, 105, 258]


@pytest.mark.parametrize("side", ["right", "left"])
def test_batch_padding(side):
    tok = DFNByteTokenizer(add_eos_token=True, padding_side=side)
    batch = tok(["a", "héé"], padding=True, return_tensors="pt")
    assert batch["input_ids"].shape == (2, 6)
    assert batch["input_ids"].dtype == torch.long
    row0 = [97, 258] + [256] * 4 if side == "right" else [256] * 4 + [97, 258]
    mask0 = [1, 1, 0, 0, 0, 0] if side == "right" else [0, 0, 0, 0, 1, 1]
    assert batch["input_ids"].tolist() == [row0, [104, 195, 169, 195, 169, 258]]
    assert batch["attention_mask"].tolist() == [mask0, [1] * 6]
    assert tok.decode(batch["input_ids"], skip_special_tokens=True) == ["a", "héé"]


def test_padding_side_per_call_and_max_length(tok):
    batch = tok(["ab", "c"], padding="max_length", max_length=4, padding_side="left")
    assert batch["input_ids"] == [[256, 256, 97, 98], [256, 256, 256, 99]]
    assert batch["attention_mask"] == [[0, 0, 1, 1], [0, 0, 0, 1]]
    truncated = tok("abcdef", truncation=True, max_length=3)
    assert truncated["input_ids"] == [97, 98, 99]


def test_added_tokens_get_new_ids(tok):
    # Byte tokens are spelled <0xHH>, so adding a one-character token does not alias a byte id.
    assert tok.add_tokens(["é", "<sep>"]) == 2
    assert tok.encode("é<sep>a") == [259, 260, 97]
    assert tok.decode([259, 260, 97]) == "é<sep>a"
    assert len(tok) == 261


def test_save_and_load_round_trip(tmp_path, monkeypatch):
    monkeypatch.setattr(DFNByteTokenizer, "_auto_class", None)  # not registered: no code copied, no auto_map
    tok = DFNByteTokenizer(add_bos_token=True, model_max_length=512)
    tok.add_tokens(["<sep>"])
    tok.padding_side = "left"
    files = tok.save_pretrained(tmp_path)
    assert tok.save_vocabulary(str(tmp_path)) == ()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["added_tokens.json", "tokenizer_config.json"]
    assert str(tmp_path / "tokenizer_config.json") in files

    config = json.loads((tmp_path / "tokenizer_config.json").read_text())
    assert config["tokenizer_class"] == "DFNByteTokenizer"
    assert config["add_bos_token"] is True
    assert config["add_eos_token"] is False
    assert "auto_map" not in config

    loaded = DFNByteTokenizer.from_pretrained(tmp_path)
    assert loaded.padding_side == "left"
    assert loaded.model_max_length == 512
    assert (loaded.add_bos_token, loaded.add_eos_token) == (True, False)
    assert (loaded.pad_token_id, loaded.bos_token_id, loaded.eos_token_id) == (256, 257, 258)
    assert loaded.encode("hé<sep>") == [257, 104, 195, 169, 259]
    assert loaded.added_tokens_decoder == tok.added_tokens_decoder


def test_custom_special_token_strings_keep_ids(tmp_path):
    tok = DFNByteTokenizer(pad_token="[PAD]", bos_token="[BOS]", eos_token="[EOS]")
    assert (tok.pad_token_id, tok.bos_token_id, tok.eos_token_id) == (256, 257, 258)
    tok.save_pretrained(tmp_path)
    loaded = DFNByteTokenizer.from_pretrained(tmp_path)
    assert loaded.encode("[BOS]x") == [257, 120]
    assert loaded.eos_token == "[EOS]"


REMOTE_SCRIPT = textwrap.dedent(
    """
    import json, sys
    from transformers import AutoTokenizer
    tok = AutoTokenizer.from_pretrained(sys.argv[1], trust_remote_code=True)
    ids = tok.encode("hé 👩‍👧")
    print(json.dumps({
        "class": type(tok).__name__,
        "module": type(tok).__module__,
        "ids": ids,
        "text": tok.decode(ids, skip_special_tokens=True),
        "pad": tok.pad_token_id,
        "side": tok.padding_side,
        "dfn_imported": any(m == "dfn" or m.startswith("dfn.") for m in sys.modules),
    }))
    """
)


def test_remote_code_load_in_fresh_process(tmp_path, monkeypatch):
    monkeypatch.setattr(DFNByteTokenizer, "_auto_class", DFNByteTokenizer._auto_class)
    DFNByteTokenizer.register_for_auto_class("AutoTokenizer")
    saved = tmp_path / "saved"
    DFNByteTokenizer(add_eos_token=True, padding_side="left").save_pretrained(saved)
    config = json.loads((saved / "tokenizer_config.json").read_text())
    assert config["auto_map"] == {"AutoTokenizer": ["tokenization_dfn.DFNByteTokenizer", None]}
    assert (saved / "tokenization_dfn.py").is_file()

    work = tmp_path / "work"
    shutil.copytree(saved, work / "model")
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env.update(HF_HUB_OFFLINE="1", HF_HOME=str(tmp_path / "hf_home"))
    result = subprocess.run(
        [sys.executable, "-c", REMOTE_SCRIPT, "model"],
        cwd=work,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr
    out = json.loads(result.stdout.strip().splitlines()[-1])
    assert out["class"] == "DFNByteTokenizer"
    assert out["module"].startswith("transformers_modules")
    assert out["ids"] == list("hé 👩‍👧".encode()) + [258]
    assert out["text"] == "hé 👩‍👧"
    assert (out["pad"], out["side"]) == (256, "left")
    assert out["dfn_imported"] is False
