"""A saved checkpoint folder loads as remote code in a fresh process that cannot import `dfn` (DESIGN.md §2.5).

One subprocess does all the remote-side checks: config/model/tokenizer through the Auto classes with
`trust_remote_code=True`, identical logits and greedy tokens, and a text-generation pipeline.
"""

import json
import os
import shutil
import site
import subprocess
import sys
import textwrap

import torch
from conftest import make_model, random_ids, tiny_config

from dfn import DFNByteTokenizer

CODE_FILES = [
    "modeling_dfn.py",
    "configuration_dfn.py",
    "cache_dfn.py",
    "memory_dfn.py",
    "mix_triton.py",
    "neighbors_dfn.py",
    "tokenization_dfn.py",
]

# Run with `python -I -S`: no PYTHONPATH, no user site, no cwd, and no `site` processing, so the `.pth` files that
# install the editable `dfn` finder are never read. The venv's site-packages are added back as plain directories.
REMOTE_SCRIPT = textwrap.dedent(
    """
    import importlib.util, json, os, sys
    args = json.loads(sys.argv[1])
    sys.path.extend(args["site_dirs"])
    result = {
        "sys_path": sys.path,
        "dfn_importable": importlib.util.find_spec("dfn") is not None,
        "package_dirs_on_path": [p for p in sys.path if os.path.isfile(os.path.join(p or ".", "dfn", "__init__.py"))],
    }
    import torch
    torch.set_num_threads(1)
    from transformers import AutoConfig, AutoModel, AutoModelForCausalLM, AutoTokenizer, pipeline

    folder = args["folder"]
    expected = torch.load(args["expected"], weights_only=True)
    config = AutoConfig.from_pretrained(folder, trust_remote_code=True)
    model = AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True)
    backbone = AutoModel.from_pretrained(folder, trust_remote_code=True)
    result["classes"] = [type(x).__name__ for x in (config, model, backbone)]
    result["modules"] = [type(x).__module__ for x in (config, model, backbone)]
    result["training"] = model.training
    with torch.no_grad():
        logits = model(expected["ids"]).logits
        hidden = backbone(expected["ids"]).last_hidden_state
    result["logits_diff"] = (logits - expected["logits"]).abs().max().item()
    result["hidden_diff"] = (hidden - expected["hidden"]).abs().max().item()
    generated = model.generate(expected["prompt"], max_new_tokens=8, do_sample=False, eos_token_id=None)
    result["generate_equal"] = torch.equal(generated, expected["generated"])

    tok = AutoTokenizer.from_pretrained(folder, trust_remote_code=True)
    result["tokenizer"] = [type(tok).__name__, type(tok).__module__]
    result["encoded"] = tok.encode("hé 🚀")
    result["decoded"] = tok.decode(result["encoded"])

    pipe = pipeline("text-generation", model=folder, trust_remote_code=True)
    out = pipe(args["text"], max_new_tokens=5, do_sample=False)
    result["pipeline_text"] = out[0]["generated_text"]
    result["pipeline_model"] = type(pipe.model).__module__
    result["dfn_imported"] = sorted(m for m in sys.modules if m == "dfn" or m.startswith("dfn."))
    print("RESULT " + json.dumps(result))
    """
)


def test_saved_folder_has_code_and_auto_map(tmp_path):
    model = make_model(tiny_config())
    model.save_pretrained(tmp_path)
    DFNByteTokenizer().save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["auto_map"] == {
        "AutoConfig": "configuration_dfn.DFNConfig",
        "AutoModel": "modeling_dfn.DFNModel",
        "AutoModelForCausalLM": "modeling_dfn.DFNForCausalLM",
    }
    tokenizer_config = json.loads((tmp_path / "tokenizer_config.json").read_text())
    assert tokenizer_config["auto_map"]["AutoTokenizer"][0] == "tokenization_dfn.DFNByteTokenizer"
    for name in CODE_FILES:
        assert (tmp_path / name).is_file(), name
    # the copied code imports nothing of the package but its sibling files (relative imports only)
    for name in CODE_FILES:
        text = (tmp_path / name).read_text()
        assert "from dfn" not in text and "import dfn" not in text, name
        assert "from . import" not in text, name


def test_remote_code_load_in_fresh_process(tmp_path):
    saved = tmp_path / "saved"
    model = make_model(tiny_config())
    tokenizer = DFNByteTokenizer()
    model.save_pretrained(saved)
    tokenizer.save_pretrained(saved)

    text = "To be, or"
    ids = random_ids(2, 20, seed=3)
    prompt = random_ids(1, 9, seed=4)
    with torch.no_grad():
        expected = {
            "ids": ids,
            "logits": model(ids).logits,
            "hidden": model.model(ids).last_hidden_state,
            "prompt": prompt,
            "generated": model.generate(prompt, max_new_tokens=8, do_sample=False, eos_token_id=None),
        }
        text_ids = tokenizer(text, return_tensors="pt").input_ids
        text_out = model.generate(text_ids, max_new_tokens=5, do_sample=False)
    expected_text = tokenizer.decode(text_out[0], skip_special_tokens=True)
    torch.save(expected, tmp_path / "expected.pt")

    work = tmp_path / "work"
    shutil.copytree(saved, work / "checkpoint")
    folder = str(work / "checkpoint")
    site_dirs = [d for d in site.getsitepackages() if os.path.isdir(d)]
    args = dict(
        site_dirs=site_dirs,
        folder=folder,
        expected=str(tmp_path / "expected.pt"),
        text=text,
    )
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME", "PYTHONSTARTUP")}
    env.update(HF_HUB_OFFLINE="1", HF_HOME=str(tmp_path / "hf_home"), TRANSFORMERS_VERBOSITY="error")
    proc = subprocess.run(
        [sys.executable, "-I", "-S", "-c", REMOTE_SCRIPT, json.dumps(args)],
        cwd=work,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    line = next(ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT "))
    result = json.loads(line[len("RESULT ") :])

    # the process really could not import the package
    assert result["dfn_importable"] is False, result["sys_path"]
    assert result["package_dirs_on_path"] == [], result["sys_path"]
    assert result["dfn_imported"] == []

    assert result["classes"] == ["DFNConfig", "DFNForCausalLM", "DFNModel"]
    assert all(m.startswith("transformers_modules") for m in result["modules"]), result["modules"]
    assert result["training"] is False
    assert result["logits_diff"] == 0.0
    assert result["hidden_diff"] == 0.0
    assert result["generate_equal"] is True

    assert result["tokenizer"][0] == "DFNByteTokenizer"
    assert result["tokenizer"][1].startswith("transformers_modules")
    assert result["encoded"] == list("hé 🚀".encode())
    assert result["decoded"] == "hé 🚀"

    assert result["pipeline_model"].startswith("transformers_modules")
    assert result["pipeline_text"].startswith(text)
    assert result["pipeline_text"] == expected_text
