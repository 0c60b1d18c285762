"""Hub sharing: assembled repo folder, offline remote-code loading, rendered model card, upload arguments, bad inputs.

Offline: the Hub API is replaced by a fake `HfApi`; the load check runs in fresh subprocesses that cannot import dfn.
"""

import importlib.util
import json
import math
import shutil
import socket
import struct
import zlib
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from huggingface_hub import ModelCard

from dfn import DFNByteTokenizer, DFNConfig, DFNForCausalLM, hub

ROOT = Path(__file__).resolve().parents[1]
TOKEN = "hf_FAKEtokenForTests0123456789abcdef"
REPO = "someone/dfn-tiny-shakespeare"
CODE_FILES = {
    "cache_dfn.py",
    "configuration_dfn.py",
    "memory_dfn.py",
    "mix_triton.py",
    "modeling_dfn.py",
    "neighbors_dfn.py",
    "tokenization_dfn.py",
}
REPO_FILES = CODE_FILES | {
    "README.md",
    "config.json",
    "generation_config.json",
    "model.safetensors",
    "tokenizer_config.json",
    "training_summary.json",
    "train_config.json",
    "loss_curve.png",
    "scaling.png",
}
# As written by scripts/train.py, plus the optional comparison with the same-size baseline.
SUMMARY = {
    "dataset": "tinyshakespeare.txt (byte-level, nanoGPT split: first 90% train / rest val)",
    "model_type": "dfn",
    "parameters": 35968,
    "train_steps": 1500,
    "batch_size": 16,
    "block_size": 128,
    "learning_rate": 0.003,
    "train_time_s": 754.3,
    "tokens_per_s": 4072.9,
    "hardware": "CPU x86_64, 2 cores, 1 threads; 1 process(es); torch 2.13.0+cpu; Linux",
    "val_loss": 0.9927,
    "val_bpb": 1.4321,
    "val_ppl": 2.6985,
    "val_bytes_scored": 111125,
    "train_loss": 0.9512,
    "train_loss_run_mean": 1.2345,
    "unigram_val_loss": 3.3154,
    "unigram_val_bpb": 4.7832,
    "commit": "abc1234",
    "command": "python scripts/train.py --preset tiny --max_steps 1500 --output_dir outputs/tiny",
    "comparison": {"llama_val_loss": 1.0405, "llama_val_bpb": 1.5012, "llama_parameters": 41000},
}
TRAIN_CONFIG = {"model_type": "dfn", "warmup_steps": 20, "weight_decay": 0.1, "adam_beta2": 0.99, "seed": 1337}

_spec = importlib.util.spec_from_file_location("push_to_hub", ROOT / "scripts" / "push_to_hub.py")
push_to_hub = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(push_to_hub)


def write_png(path: Path):
    """A valid 1x1 RGB PNG, standing in for the training script's plots."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", 1, 1, 8, 2, 0, 0, 0)
    path.write_bytes(
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", ihdr)
        + chunk(b"IDAT", zlib.compress(b"\x00\xff\x00\x00"))
        + chunk(b"IEND", b"")
    )


def logits_and_greedy(model, tokenizer, prompt=hub.VERIFY_PROMPT, n=4):
    inputs = tokenizer(prompt, return_tensors="pt")
    with torch.no_grad():
        logits = model(**inputs).logits[0]
        generated = model.generate(**inputs, max_new_tokens=n, do_sample=False)
    return inputs["input_ids"][0].tolist(), logits, generated[0, inputs["input_ids"].shape[1] :].tolist()


@pytest.fixture(scope="module")
def source(tmp_path_factory):
    """A training output folder: tiny random DFN + byte tokenizer + training_summary.json + plots."""
    folder = tmp_path_factory.mktemp("run")
    torch.manual_seed(0)
    config = DFNConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, num_neighbors=4, memory_slots=3)
    model = DFNForCausalLM(config).eval()
    tokenizer = DFNByteTokenizer()
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    (folder / "training_summary.json").write_text(json.dumps(SUMMARY, indent=2))
    write_png(folder / "loss_curve.png")
    write_png(folder / "scaling.png")
    (folder / "train_config.json").write_text(json.dumps(TRAIN_CONFIG, indent=2))
    # training leftovers that must not be uploaded
    (folder / "training_args.bin").write_bytes(b"pickle")
    (folder / "log.csv").write_text("step,loss\n")
    (folder / "checkpoint-100").mkdir()
    (folder / "checkpoint-100" / "optimizer.pt").write_bytes(b"not for the Hub")
    ids, logits, greedy = logits_and_greedy(model, tokenizer)
    return SimpleNamespace(path=folder, model=model, tokenizer=tokenizer, ids=ids, logits=logits, greedy=greedy)


@pytest.fixture(scope="module")
def assembled(source, tmp_path_factory):
    """The repo folder assembled from `source`, and the result of loading it in a fresh process without dfn."""
    src = hub.inspect_source(source.path)
    out = hub.prepare_out(tmp_path_factory.mktemp("repo") / "dfn-tiny", src.path, overwrite=False)
    files, card, notes = hub.assemble(src, out, repo_id=REPO)
    result = hub.verify_loads(out)
    return SimpleNamespace(path=out, files=files, card=card, notes=notes, result=result)


@pytest.fixture
def fake_api(monkeypatch):
    """Replace `HfApi` by a recorder; `calls` lists (method, args, kwargs); upload_folder records the files."""
    calls = []

    class FakeHfApi:
        fail_with = None

        def __init__(self, endpoint=None, token=None, **kwargs):
            calls.append(("init", (), {"endpoint": endpoint, "token": token, **kwargs}))

        def create_repo(self, *args, **kwargs):
            calls.append(("create_repo", args, kwargs))
            if FakeHfApi.fail_with:
                raise FakeHfApi.fail_with
            return f"https://hub.invalid/{args[0]}"

        def create_branch(self, *args, **kwargs):
            calls.append(("create_branch", args, kwargs))

        def upload_folder(self, **kwargs):
            folder = Path(kwargs["folder_path"])
            files = sorted(str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file())
            calls.append(("upload_folder", (), {**kwargs, "files": files}))
            return SimpleNamespace(commit_url=f"https://hub.invalid/{kwargs['repo_id']}/commit/0123")

    monkeypatch.setattr(hub, "HfApi", FakeHfApi)
    return SimpleNamespace(calls=calls, cls=FakeHfApi)


@pytest.fixture
def no_verify(monkeypatch):
    """Skip the (separately tested) subprocess load check; record the folders it was asked to check."""
    checked = []

    def fake_verify(folder, base_folder=None, **kwargs):
        checked.append((Path(folder), base_folder, sorted(p.name for p in Path(folder).iterdir())))
        return {"model_class": "transformers_modules.x.modeling_dfn.DFNForCausalLM", "generated_text": "abc"}

    monkeypatch.setattr(push_to_hub, "verify_loads", fake_verify)
    return checked


def run_cli(capsys, *argv):
    rc = push_to_hub.main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return rc, out, err


# --------------------------------------------------------------------------------------------------------------------
# assembled folder and offline loading


def test_assembled_folder_holds_exactly_the_repo_files(assembled):
    assert set(assembled.files) == REPO_FILES
    assert {p.name for p in assembled.path.iterdir()} == REPO_FILES
    config = json.loads((assembled.path / "config.json").read_text())
    assert config["architectures"] == ["DFNForCausalLM"]
    assert config["auto_map"]["AutoConfig"] == "configuration_dfn.DFNConfig"
    assert config["auto_map"]["AutoModelForCausalLM"] == "modeling_dfn.DFNForCausalLM"
    assert config["auto_map"]["AutoModel"] == "modeling_dfn.DFNModel"
    tokenizer_config = json.loads((assembled.path / "tokenizer_config.json").read_text())
    assert tokenizer_config["auto_map"]["AutoTokenizer"][0] == "tokenization_dfn.DFNByteTokenizer"


def test_loads_without_dfn_and_reproduces_logits(source, assembled):
    result = assembled.result
    # The classes come from the folder's code (transformers_modules), not from the dfn package.
    assert result["dfn_importable"] is False
    assert result["model_class"].startswith("transformers_modules.")
    assert result["model_class"].endswith(".modeling_dfn.DFNForCausalLM")
    assert result["tokenizer_class"].endswith(".tokenization_dfn.DFNByteTokenizer")
    assert result["input_ids"] == source.ids
    remote = torch.tensor(result["logits"])
    diff = (remote - source.logits).abs().max().item()
    print(f"max |logits difference| = {diff:.3g}")
    assert remote.shape == source.logits.shape
    assert diff < 1e-5
    assert result["generated_ids"] == source.greedy
    assert result["generated_text"] == source.tokenizer.decode(source.greedy)
    assert result["pipeline_text"] == hub.VERIFY_PROMPT + result["generated_text"]


# --------------------------------------------------------------------------------------------------------------------
# model card


def test_card_parses_back_with_metadata_and_numbers(assembled):
    card = ModelCard.load(assembled.path / "README.md")
    data = card.data
    assert data.library_name == "transformers"
    assert data.pipeline_tag == "text-generation"
    assert {"custom_code", "dfn"} <= set(data.tags)
    assert data.license == "apache-2.0"
    assert data.language == "en"
    assert data.datasets == ["karpathy/tiny_shakespeare"]
    assert data.model_name == "dfn-tiny-shakespeare"
    assert data.eval_results[0].dataset_name == "tinyshakespeare.txt"
    metrics = {r.metric_type: r for r in data.eval_results}
    assert metrics["bpb"].metric_value == SUMMARY["val_bpb"]
    assert metrics["loss"].metric_value == SUMMARY["val_loss"]
    assert metrics["bpb"].dataset_type == "karpathy/tiny_shakespeare"
    assert metrics["bpb"].task_type == "text-generation"

    text = card.text
    for expected in (
        "1.4321",
        "0.9927",
        "0.9512",
        "1.5012",
        "1.0405",
        "| steps | 1,500 |",
        "| batch size (sequences, all devices) | 16 |",
        "| block size (bytes) | 128 |",
        "| peak learning rate | 0.003 |",
        "754 s",
        "| data | tinyshakespeare.txt (byte-level, nanoGPT split: first 90% train / rest val) |",
        "[tinyshakespeare.txt](https://huggingface.co/datasets/karpathy/tiny_shakespeare)",
        "trained on\ntinyshakespeare.txt.",
        "| validation perplexity (per byte) | 2.6985 |",
        "| unigram baseline (byte frequencies), bits per byte | 4.7832 |",
        "| validation bytes scored | 111,125 |",
        "| throughput (bytes/s) | 4,073 |",
        "| warmup_steps | 20 |",
        "| seed | 1337 |",
        "final evaluation at the end of the training command above",
        "| adam_beta2 | 0.99 |",
        "| parameters | 35,968 | 41,000 |",
        "| hardware | CPU x86_64, 2 cores, 1 threads; 1 process(es); torch 2.13.0+cpu; Linux |",
        "`abc1234`",
        SUMMARY["command"],
        "bytes seen | 3,072,000",
        "AutoModelForCausalLM.from_pretrained(repo, trust_remote_code=True)",
        f'repo = "{REPO}"',
        "transformers>=5.24",
        "![Training and validation loss](loss_curve.png)",
        "![Scaling](scaling.png)",
        "## Limitations",
        "## Citation",
        "llama (same size)",
    ):
        assert expected in text, expected
    assert "None" not in text and "More Information Needed" not in text
    params = hub.count_parameters([assembled.path / "model.safetensors"])
    assert params == sum(
        p.numel()
        for n, p in DFNForCausalLM(
            DFNConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, num_neighbors=4, memory_slots=3)
        ).named_parameters()
        if n != "lm_head.weight"
    )
    assert f"| parameters | {hub.human_count(params)} |" in text


def test_card_without_summary_and_with_partial_summary(assembled, tmp_path):
    bare = hub.render_card(assembled.path, kind="model", repo_id=REPO, summary=None)
    card = ModelCard(str(bare))
    assert card.data.eval_results is None and card.data.library_name == "transformers"
    assert "No training summary" in card.text and "No evaluation results" in card.text

    # Only val_loss recorded: bits per byte is derived (same measurement), no baseline table.
    (tmp_path / "training_summary.json").write_text(json.dumps({"dataset": "tinyshakespeare", "val_loss": 1.0}))
    summary = hub.load_summary(tmp_path)
    assert summary["val_bpb"] == pytest.approx(1 / math.log(2))
    card = ModelCard(str(hub.render_card(assembled.path, kind="model", repo_id=REPO, summary=summary)))
    assert {r.metric_type: r.metric_value for r in card.data.eval_results}["bpb"] == pytest.approx(1 / math.log(2))
    assert "No same-size transformer baseline" in card.text


def test_missing_tokenizer_generation_config_and_summary_are_filled_in(source, tmp_path):
    folder = tmp_path / "bare"
    folder.mkdir()
    for name in ["config.json", "model.safetensors", *CODE_FILES - {"tokenization_dfn.py"}]:
        shutil.copyfile(source.path / name, folder / name)
    src = hub.inspect_source(folder)
    out = hub.prepare_out(tmp_path / "repo", src.path, overwrite=False)
    files, card, notes = hub.assemble(src, out, repo_id=REPO)
    assert set(files) == REPO_FILES - {"training_summary.json", "train_config.json", "loss_curve.png", "scaling.png"}
    assert any("no training_summary.json" in n for n in notes)
    assert any("default DFNByteTokenizer" in n for n in notes) and any("generation_config.json" in n for n in notes)
    generation = json.loads((out / "generation_config.json").read_text())
    assert (generation["bos_token_id"], generation["eos_token_id"], generation["pad_token_id"]) == (257, 258, 256)
    assert json.loads((out / "tokenizer_config.json").read_text())["auto_map"]["AutoTokenizer"][0] == (
        "tokenization_dfn.DFNByteTokenizer"
    )
    assert ModelCard.load(out / "README.md").data.eval_results is None


def test_summary_with_bad_numbers_is_refused(tmp_path):
    (tmp_path / "training_summary.json").write_text(json.dumps({"val_bpb": "low"}))
    with pytest.raises(hub.HubError, match="'val_bpb' must be a finite number"):
        hub.load_summary(tmp_path)


# --------------------------------------------------------------------------------------------------------------------
# CLI: dry run and upload


def test_dry_run_prints_files_and_card_without_network(source, tmp_path, capsys, monkeypatch, no_verify):
    class NoNetwork:
        def __init__(self, *args, **kwargs):
            raise AssertionError("--dry-run must not construct HfApi")

    monkeypatch.setattr(hub, "HfApi", NoNetwork)
    monkeypatch.setattr(socket.socket, "connect", lambda *a: pytest.fail("--dry-run opened a connection"))
    monkeypatch.delenv("HF_TOKEN", raising=False)
    monkeypatch.setattr(hub, "get_token", lambda: None)  # no token needed for a dry run
    out = tmp_path / "repo"
    rc, stdout, stderr = run_cli(capsys, "--source", source.path, "--repo-id", REPO, "--out", out, "--dry-run")
    assert rc == 0, stderr
    for name in REPO_FILES:
        assert f"  {name} " in stdout
    assert "model-index:" in stdout and "trust_remote_code=True" in stdout and "dry run: nothing uploaded" in stdout
    assert {p.name for p in out.iterdir()} == REPO_FILES
    assert no_verify[0][0] == out.resolve()


def test_upload_sends_exact_files_and_commit_arguments(source, capsys, fake_api, no_verify):
    rc, stdout, stderr = run_cli(
        capsys,
        "--source",
        source.path,
        "--repo-id",
        REPO,
        "--private",
        "--revision",
        "exp-1",
        "--commit-message",
        "DFN tiny, first run",
        "--token",
        TOKEN,
    )
    assert rc == 0, stderr
    names = [c[0] for c in fake_api.calls]
    assert names == ["init", "create_repo", "create_branch", "upload_folder"]
    assert fake_api.calls[0][2] == {"endpoint": None, "token": TOKEN}
    assert fake_api.calls[1][1:] == ((REPO,), {"private": True, "exist_ok": True})
    assert fake_api.calls[2][1:] == ((REPO,), {"branch": "exp-1", "exist_ok": True})
    upload = fake_api.calls[3][2]
    assert upload["repo_id"] == REPO
    assert upload["revision"] == "exp-1"
    assert upload["commit_message"] == "DFN tiny, first run"
    assert upload["files"] == sorted(REPO_FILES)
    # Verified the very folder that was uploaded, before uploading; the temporary folder is cleaned up afterwards.
    assert no_verify[0][0] == Path(upload["folder_path"]) and no_verify[0][2] == sorted(REPO_FILES)
    assert not Path(upload["folder_path"]).exists()
    assert "https://hub.invalid/" in stdout
    assert TOKEN not in stdout + stderr


def test_upload_defaults_token_from_env_public_main_branch(source, capsys, fake_api, no_verify, monkeypatch):
    monkeypatch.setenv("HF_TOKEN", TOKEN)
    rc, stdout, stderr = run_cli(capsys, "--source", source.path, "--repo-id", REPO)
    assert rc == 0, stderr
    assert [c[0] for c in fake_api.calls] == ["init", "create_repo", "upload_folder"]
    assert fake_api.calls[0][2]["token"] == TOKEN
    assert fake_api.calls[1][2] == {"private": False, "exist_ok": True}
    upload = fake_api.calls[2][2]
    assert upload["revision"] is None
    assert upload["commit_message"] == "Upload DFN model (trained on tinyshakespeare.txt, val bpb 1.4321)"
    assert TOKEN not in stdout + stderr


def test_token_never_printed_even_when_the_hub_echoes_it(source, capsys, fake_api, no_verify):
    fake_api.cls.fail_with = RuntimeError(f"401 Unauthorized: bad credentials for 'Bearer {TOKEN}'")
    rc, stdout, stderr = run_cli(capsys, "--source", source.path, "--repo-id", REPO, "--token", TOKEN)
    assert rc == 1
    assert "401 Unauthorized" in stderr and "***" in stderr
    assert TOKEN not in stdout + stderr


def test_missing_token_is_a_clear_error(source, tmp_path, capsys, fake_api, no_verify, monkeypatch):
    monkeypatch.delenv("HF_TOKEN", raising=False)
    monkeypatch.setattr(hub, "get_token", lambda: None)
    out = tmp_path / "repo"
    rc, stdout, stderr = run_cli(capsys, "--source", source.path, "--repo-id", REPO, "--out", out)
    assert rc == 2
    assert "No Hugging Face token found" in stderr and "HF_TOKEN" in stderr and "--dry-run" in stderr
    assert fake_api.calls == [] and no_verify == [] and not out.exists()


# --------------------------------------------------------------------------------------------------------------------
# bad inputs


def broken_copy(source, tmp_path, change):
    folder = tmp_path / "broken"
    shutil.copytree(source.path, folder)
    change(folder)
    return folder


def drop_auto_map(folder):
    config = json.loads((folder / "config.json").read_text())
    del config["auto_map"]
    (folder / "config.json").write_text(json.dumps(config))


def to_pickle(folder):
    (folder / "model.safetensors").rename(folder / "pytorch_model.bin")


@pytest.mark.parametrize(
    "change, message",
    [
        (lambda f: (f / "model.safetensors").unlink(), "has no model weights: expected model.safetensors"),
        (to_pickle, "only pickled weights"),
        (drop_auto_map, "has no auto_map entry for AutoConfig, AutoModelForCausalLM"),
        (lambda f: (f / "neighbors_dfn.py").unlink(), "neighbors_dfn.py"),
        (lambda f: (f / "config.json").unlink(), "has no config.json"),
    ],
    ids=["missing-weights", "pickle-weights", "no-auto-map", "missing-code-file", "no-config"],
)
def test_bad_source_is_refused(source, tmp_path, capsys, fake_api, change, message, monkeypatch):
    monkeypatch.setattr(push_to_hub, "verify_loads", lambda *a, **k: pytest.fail("must fail before verification"))
    folder = broken_copy(source, tmp_path, change)
    rc, stdout, stderr = run_cli(capsys, "--source", folder, "--repo-id", REPO, "--token", TOKEN)
    assert rc == 2
    assert message in stderr
    assert [c for c in fake_api.calls if c[0] == "upload_folder"] == []


def test_non_empty_out_needs_overwrite(source, tmp_path, capsys, no_verify):
    out = tmp_path / "repo"
    out.mkdir()
    (out / "stale.txt").write_text("left from an earlier run")
    rc, stdout, stderr = run_cli(capsys, "--source", source.path, "--repo-id", REPO, "--out", out, "--dry-run")
    assert rc == 2 and "is not empty: pass --overwrite" in stderr
    assert (out / "stale.txt").exists() and no_verify == []

    rc, stdout, stderr = run_cli(
        capsys, "--source", source.path, "--repo-id", REPO, "--out", out, "--dry-run", "--overwrite"
    )
    assert rc == 0, stderr
    assert {p.name for p in out.iterdir()} == REPO_FILES


@pytest.mark.parametrize("where", ["source", "inside"])
def test_out_must_not_touch_the_source(source, capsys, no_verify, where):
    out = source.path if where == "source" else source.path / "hub"
    rc, stdout, stderr = run_cli(
        capsys, "--source", source.path, "--repo-id", REPO, "--out", out, "--dry-run", "--overwrite"
    )
    assert rc == 2 and "must not be the source folder" in stderr
    assert (source.path / "model.safetensors").is_file()


@pytest.mark.parametrize("where", ["base", "inside"])
def test_out_must_not_touch_an_adapters_local_base(adapter, source, capsys, no_verify, where):
    out = source.path if where == "base" else source.path / "hub"
    argv = ["--source", adapter.path, "--repo-id", "someone/lora", "--base-model", REPO, "--base-source", source.path]
    rc, stdout, stderr = run_cli(capsys, *argv, "--out", out, "--dry-run", "--overwrite")
    assert rc == 2 and "must not be the base model's folder" in stderr
    assert (source.path / "model.safetensors").is_file()


@pytest.mark.parametrize("repo_id", ["no-namespace", "a/b/c", "bad name/x"])
def test_bad_repo_id(source, capsys, no_verify, repo_id):
    rc, stdout, stderr = run_cli(capsys, "--source", source.path, "--repo-id", repo_id, "--dry-run")
    assert rc == 2 and "--repo-id" in stderr and no_verify == []


def test_refuses_to_push_a_folder_that_does_not_load(source, tmp_path, capsys, fake_api):
    def break_code(folder):
        with open(folder / "modeling_dfn.py", "a") as f:
            f.write("\nraise RuntimeError('modeling code broken on purpose')\n")

    folder = broken_copy(source, tmp_path, break_code)
    rc, stdout, stderr = run_cli(capsys, "--source", folder, "--repo-id", REPO, "--token", TOKEN)  # real check
    assert rc == 2
    assert "does not load in a fresh process" in stderr and "refusing to push" in stderr
    assert "modeling code broken on purpose" in stderr
    assert [c[0] for c in fake_api.calls] == []
    assert TOKEN not in stdout + stderr


# --------------------------------------------------------------------------------------------------------------------
# LoRA adapter


@pytest.fixture(scope="module")
def adapter(source, tmp_path_factory):
    from peft import LoraConfig, PeftModel, get_peft_model

    folder = tmp_path_factory.mktemp("lora")
    torch.manual_seed(1)
    base = DFNForCausalLM.from_pretrained(source.path).eval()
    lora = LoraConfig(r=2, lora_alpha=4, target_modules=["value_proj", "up_proj"], init_lora_weights=False)
    get_peft_model(base, lora).save_pretrained(folder)  # base_model_name_or_path = the local source folder
    (folder / "training_summary.json").write_text(json.dumps({**SUMMARY, "train_steps": 200, "comparison": None}))
    model = PeftModel.from_pretrained(DFNForCausalLM.from_pretrained(source.path), folder).eval()
    ids, logits, greedy = logits_and_greedy(model, source.tokenizer)
    return SimpleNamespace(path=folder, ids=ids, logits=logits, greedy=greedy)


def test_adapter_repo_loads_onto_base_and_has_adapter_card(adapter, assembled, tmp_path):
    src = hub.inspect_source(adapter.path)
    assert src.kind == "adapter"
    out = hub.prepare_out(tmp_path / "lora-repo", src.path, overwrite=False)
    base_config = json.loads((assembled.path / "config.json").read_text())
    files, card, _ = hub.assemble(src, out, repo_id="someone/dfn-tiny-lora", base_model=REPO, base_config=base_config)
    assert set(files) == {"README.md", "adapter_config.json", "adapter_model.safetensors", "training_summary.json"}
    assert json.loads((out / "adapter_config.json").read_text())["base_model_name_or_path"] == REPO

    result = hub.verify_loads(out, base_folder=assembled.path)
    diff = (torch.tensor(result["logits"]) - adapter.logits).abs().max().item()
    print(f"adapter: max |logits difference| = {diff:.3g}")
    assert result["input_ids"] == adapter.ids and diff < 1e-5
    assert result["generated_ids"] == adapter.greedy

    card = ModelCard.load(out / "README.md")
    assert card.data.base_model == REPO
    assert card.data.library_name == "peft"
    assert card.data.pipeline_tag == "text-generation"
    assert {"custom_code", "dfn", "lora", "peft"} <= set(card.data.tags)
    assert {r.metric_type: r.metric_value for r in card.data.eval_results}["bpb"] == SUMMARY["val_bpb"]
    text = card.text
    assert 'PeftModel.from_pretrained(base, "someone/dfn-tiny-lora")' in text
    assert f'AutoModelForCausalLM.from_pretrained("{REPO}", trust_remote_code=True)' in text
    assert f'AutoTokenizer.from_pretrained("{REPO}", trust_remote_code=True)' in text  # no tokenizer in the adapter
    assert "| rank r | 2 |" in text and "`up_proj`, `value_proj`" in text and "| hidden size | 32 |" in text
    assert "The model code is in the base model's repository and is\nloaded with `trust_remote_code=True`." in text
    assert "None" not in text


def test_adapter_card_says_its_code_is_the_tokenizer(adapter, assembled, tmp_path):
    """finetune_lora saves the tokenizer beside the adapter: its code is the tokenizer's, not the model's."""
    folder = tmp_path / "lora-with-tokenizer"
    shutil.copytree(adapter.path, folder)
    DFNByteTokenizer().save_pretrained(folder)
    out = hub.prepare_out(tmp_path / "repo", folder, overwrite=False)
    base_config = json.loads((assembled.path / "config.json").read_text())
    _, card, _ = hub.assemble(
        hub.inspect_source(folder), out, repo_id="someone/lora", base_model=REPO, base_config=base_config
    )
    text = " ".join(card.text.split())
    assert (
        "The model code is in the base model's repository, the tokenizer's code (`tokenization_dfn.py`) in this one"
        in text
    )
    assert "The model code (`tokenization_dfn.py`)" not in text
    assert "runs the Python files of the base model's and this repository" in text


def test_adapter_cli_needs_base_model_and_finds_local_base(adapter, capsys, fake_api, no_verify, tmp_path):
    rc, stdout, stderr = run_cli(capsys, "--source", adapter.path, "--repo-id", "someone/lora", "--token", TOKEN)
    assert rc == 2 and "needs --base-model" in stderr

    # base_model_name_or_path of the PEFT save is the local base folder: used for the offline check.
    rc, stdout, stderr = run_cli(
        capsys, "--source", adapter.path, "--repo-id", "someone/lora", "--token", TOKEN, "--base-model", REPO
    )
    assert rc == 0, stderr
    assert (
        Path(no_verify[0][1])
        == Path(json.loads((adapter.path / "adapter_config.json").read_text())["base_model_name_or_path"]).resolve()
    )
    upload = [c for c in fake_api.calls if c[0] == "upload_folder"][0][2]
    assert upload["files"] == ["README.md", "adapter_config.json", "adapter_model.safetensors", "training_summary.json"]
    assert upload["commit_message"].startswith("Upload DFN LoRA adapter")

    rc, stdout, stderr = run_cli(
        capsys,
        "--source",
        adapter.path,
        "--repo-id",
        "someone/lora",
        "--token",
        TOKEN,
        "--base-model",
        REPO,
        "--base-source",
        tmp_path / "nowhere",
    )
    assert rc == 2 and "pass --base-source" in stderr
