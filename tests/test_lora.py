"""LoRA with PEFT on DFN (scripts/finetune_lora.py): targets, only adapters train, save/load onto a remote-code base
in a fresh process, merge_and_unload is exact, fine-tuning lowers the other text's loss."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "scripts"))

import finetune_lora  # noqa: E402
import train as train_lib  # noqa: E402
from conftest import TINY_MODEL  # noqa: E402

IDS = torch.tensor([list(b"ROMEO: But soft, what light"), list(b"Well, Prince, so Genoa and ")])


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    """A tiny DFN trained for a few steps on Tiny Shakespeare, saved as a checkpoint folder; and the other text."""
    folder = tmp_path_factory.mktemp("lora")
    shakespeare = (REPO / "data" / "tinyshakespeare.txt").read_bytes()
    (folder / "train.txt").write_bytes(shakespeare[:40_000])
    (folder / "val.txt").write_bytes(shakespeare[-4_000:])
    other = folder / "other.txt"  # the War and Peace excerpt, shortened for speed
    other.write_bytes((REPO / "data" / "war_and_peace_excerpt.txt").read_bytes()[:30_000])
    cfg = train_lib.make_config(
        "tiny",
        dict(
            train_files=[str(folder / "train.txt")],
            val_files=[str(folder / "val.txt")],
            block_size=32,
            batch_size=8,
            max_steps=40,
            learning_rate=1e-2,
            warmup_steps=4,
            eval_steps=0,
            final_eval_blocks=4,
            logging_steps=10,
            save_steps=0,
            output_dir=str(folder / "base"),
            plot=False,
            quiet=True,
            report_to="none",
        ),
        TINY_MODEL,
    )
    train_lib.train(cfg, command="pytest").pop("_trainer")
    return folder / "base", other


def test_lora_wraps_every_dfn_projection_and_trains_only_adapters(base):
    model = finetune_lora.add_lora(finetune_lora.load_base(str(base[0])), finetune_lora.lora_config(r=4))
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all("lora_A" in n or "lora_B" in n for n in trainable), trainable
    for layer in range(TINY_MODEL["num_hidden_layers"]):
        for target in finetune_lora.DFN_LORA_TARGETS:
            prefix = f"model.layers.{layer}.{target}.lora_"
            assert any(prefix in n for n in trainable), f"no adapter on {prefix}"
    frozen = sum(p.numel() for p in model.parameters() if not p.requires_grad)
    assert sum(p.numel() for n, p in model.named_parameters() if n in trainable) < frozen / 3


def test_default_targets_follow_the_model_query_flow_and_mlp_gate():
    """The default targets are every projection the model has: the query flow only when on, the MLP gate only in a
    SwiGLU MLP (the default); a GELU model gets exactly the base list."""
    from dfn import DFNConfig, DFNForCausalLM

    config = DFNConfig(**TINY_MODEL, use_query_flow=True)
    targets = finetune_lora.lora_targets(config)
    assert targets == [*finetune_lora.DFN_LORA_TARGETS, "mlp.gate_proj", "query_flow_proj"]
    assert finetune_lora.lora_targets(DFNConfig(**TINY_MODEL)) == [*finetune_lora.DFN_LORA_TARGETS, "mlp.gate_proj"]
    gelu = DFNConfig(**TINY_MODEL, mlp_type="gelu")
    assert finetune_lora.lora_targets(gelu) == finetune_lora.DFN_LORA_TARGETS
    model = finetune_lora.add_lora(DFNForCausalLM(config), finetune_lora.lora_config(r=4, target_modules=targets))
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    for layer in range(TINY_MODEL["num_hidden_layers"]):
        for target in ("query_flow_proj", "mlp.gate_proj"):
            assert any(f"model.layers.{layer}.{target}.lora_" in n for n in trainable), target


def test_targets_name_modules_the_model_has():
    """A model without the flow has no flow_proj to adapt; a target that names no module is refused, not dropped."""
    from dfn import DFNConfig, DFNForCausalLM

    no_flow = DFNConfig(**TINY_MODEL, use_flow=False)
    assert "flow_proj" not in finetune_lora.lora_targets(no_flow)
    model = DFNForCausalLM(no_flow)
    finetune_lora.add_lora(model, finetune_lora.lora_config(r=4, target_modules=finetune_lora.lora_targets(no_flow)))
    with pytest.raises(ValueError, match=r"\['influence_prj'\] name no module of this model"):
        finetune_lora.add_lora(
            DFNForCausalLM(no_flow), finetune_lora.lora_config(r=4, target_modules=["value_proj", "influence_prj"])
        )


def test_seeded_adapters_start_the_same():
    from dfn import DFNConfig, DFNForCausalLM

    config = DFNConfig(**TINY_MODEL)
    made = [
        finetune_lora.add_lora(DFNForCausalLM(config), finetune_lora.lora_config(r=4), seed=5).state_dict()
        for _ in range(2)
    ]
    lora = [name for name in made[0] if "lora_A" in name]
    assert lora and all(torch.equal(made[0][name], made[1][name]) for name in lora)


FRESH = textwrap.dedent(
    """
    import sys
    sys.modules["dfn"] = None  # the package must not be importable: the base comes from the folder's own code
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained({base!r}, trust_remote_code=True)
    assert type(base).__module__.startswith("transformers_modules"), type(base).__module__
    model = PeftModel.from_pretrained(base, {adapter!r}).eval()
    with torch.no_grad():
        logits = model(input_ids=torch.load({ids!r}), use_cache=False).logits
    torch.save(logits, {out!r})
    """
)


def test_finetune_lowers_other_text_loss_saves_loads_and_merges(base, tmp_path):
    base_dir, other = base
    out = tmp_path / "adapter"
    result = finetune_lora.main(
        [
            "--base",
            str(base_dir),
            "--text",
            str(other),
            "--output_dir",
            str(out),
            "--r",
            "4",
            "--block_size",
            "32",
            "--batch_size",
            "8",
            "--max_steps",
            "40",
            "--learning_rate",
            "1e-2",
            "--warmup_steps",
            "4",
            "--eval_steps",
            "0",
            "--logging_steps",
            "10",
            "--merge",
            "--quiet",
        ]
    )
    # fine-tuning lowers the other text's validation loss
    assert result["val_loss_after"] < result["val_loss_before"] - 0.05, result
    assert json.loads((out / "lora_summary.json").read_text())["val_loss_after"] == result["val_loss_after"]

    # only the adapter was saved, and the base weights on disk are what training started from
    adapter = load_file(str(out / "adapter_model.safetensors"))
    assert adapter and all("lora_" in k for k in adapter)
    assert json.loads((out / "adapter_config.json").read_text())["base_model_name_or_path"] == str(base_dir)

    # reload: base from its folder (remote code) + adapter, in-process
    from peft import PeftModel

    adapted = PeftModel.from_pretrained(finetune_lora.load_base(str(base_dir)), str(out)).eval()
    plain = finetune_lora.load_base(str(base_dir)).eval()
    with torch.no_grad():
        want = adapted(input_ids=IDS, use_cache=False).logits
        assert (want - plain(input_ids=IDS, use_cache=False).logits).abs().max() > 1e-3  # the adapter does something

        # merge_and_unload gives the same logits, in memory and from the saved merged/ folder
        merged = adapted.merge_and_unload().eval()
        assert torch.allclose(merged(input_ids=IDS, use_cache=False).logits, want, atol=1e-5)
        from_folder = finetune_lora.load_base(str(out / "merged")).eval()
        assert torch.allclose(from_folder(input_ids=IDS, use_cache=False).logits, want, atol=1e-5)

    # a fresh process that cannot import `dfn`: base with trust_remote_code=True + adapter -> same logits
    torch.save(IDS, tmp_path / "ids.pt")
    script = tmp_path / "fresh.py"
    script.write_text(
        FRESH.format(
            base=str(base_dir), adapter=str(out), ids=str(tmp_path / "ids.pt"), out=str(tmp_path / "logits.pt")
        )
    )
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env.update(HF_HUB_OFFLINE="1", HF_HOME=str(tmp_path / "hf_home"))
    proc = subprocess.run(
        [sys.executable, str(script)], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert torch.allclose(torch.load(tmp_path / "logits.pt"), want, atol=1e-5)
