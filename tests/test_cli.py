"""The scripts' command lines: nonsense counts are refused with a message naming the flag, and nothing a user saved is
overwritten without being asked (every script that writes results refuses, before any work, to replace an existing
file or a non-empty folder unless --overwrite)."""

import pytest
from conftest import load_script

MINE = '{"saved": "by the user"}'


@pytest.mark.parametrize(
    "script, taken, argv",
    [
        ("benchmark", "benchmark.json", ["--quick", "--out-dir", "{dir}"]),
        ("copy_task", "copy_task.json", ["--quick", "--out-dir", "{dir}"]),
        ("long_context", "long_context.json", ["--quick", "--out-dir", "{dir}"]),
        ("long_context", "models/dfn/train.json", ["--quick", "--models", "dfn", "--out-dir", "{dir}"]),
        (
            "long_context",
            "runs/dfn/trainer_state.json",
            ["--quick", "--reuse", "--models", "dfn", "--out-dir", "{dir}"],
        ),
        ("finetune_lora", "lora/adapter_config.json", ["--base", "no-base", "--output_dir", "{dir}/lora"]),
        ("evaluate", "scores.json", ["no-checkpoint", "no-text.txt", "--json", "{dir}/scores.json"]),
        ("reach", "reach.json", ["no-checkpoint", "--json", "{dir}/reach.json"]),
    ],
    ids=[
        "benchmark",
        "copy_task",
        "long_context",
        "long_context-models",
        "long_context-reuse-trains",
        "finetune_lora",
        "evaluate-json",
        "reach-json",
    ],
)
def test_script_refuses_to_overwrite_results(tmp_path, script, taken, argv):
    saved = tmp_path / taken
    saved.parent.mkdir(parents=True, exist_ok=True)
    saved.write_text(MINE)
    with pytest.raises(SystemExit, match="Not overwriting .*pass --overwrite"):
        load_script(script).main([a.format(dir=tmp_path) for a in argv])
    assert saved.read_text() == MINE


def test_json_into_a_missing_folder_is_refused_before_the_work(tmp_path):
    with pytest.raises(SystemExit, match="the folder .* does not exist"):
        load_script("evaluate").main(["no-checkpoint", "no-text.txt", "--json", str(tmp_path / "no" / "s.json")])


@pytest.mark.parametrize("output", ["{base}", "{base}/adapter", "{parent}"])
def test_lora_output_never_holds_the_base(tmp_path, output):
    base = tmp_path / "base"
    base.mkdir()
    (base / "config.json").write_text(MINE)
    argv = ["--base", str(base), "--output_dir", output.format(base=base, parent=tmp_path), "--overwrite"]
    with pytest.raises(SystemExit, match="must not be the base checkpoint, inside it, or contain it"):
        load_script("finetune_lora").main(argv)
    assert (base / "config.json").read_text() == MINE


def test_train_resume_from_elsewhere_keeps_a_non_empty_output_dir(tmp_path):
    """`--resume PATH` from one of --output_dir's checkpoints continues that run there; from elsewhere it continues
    PATH's state into --output_dir, so another run's files there are refused, not replaced."""
    train = load_script("train")
    checkpoint, other_run = tmp_path / "run-a" / "checkpoint-2", tmp_path / "run-b"
    checkpoint.mkdir(parents=True)
    other_run.mkdir()
    (other_run / "model.safetensors").write_text(MINE)
    cfg = train.TrainConfig(output_dir=str(other_run), resume=str(checkpoint))
    with pytest.raises(FileExistsError, match="not empty: pass --overwrite"):
        train.prepare_output_dir(cfg, is_main=True)
    assert (other_run / "model.safetensors").read_text() == MINE
    own = train.TrainConfig(output_dir=str(tmp_path / "run-a"), resume=str(checkpoint))
    assert train.prepare_output_dir(own, is_main=True) == str(checkpoint)
    fresh = train.TrainConfig(output_dir=str(tmp_path / "run-c"), resume=str(checkpoint))
    assert train.prepare_output_dir(fresh, is_main=True) == str(checkpoint)


@pytest.mark.parametrize(
    "script, argv, message",
    [
        ("evaluate", ["ckpt", "t.txt", "--batch-size", "0"], "--batch-size: must be an integer >= 1, got 0"),
        ("evaluate", ["ckpt", "t.txt", "--max-bytes", "-5"], "--max-bytes: must be an integer >= 0, got -5"),
        ("evaluate", ["ckpt", "t.txt", "--block-size", "1"], "--block-size must be >= 2"),
        ("compare", ["--steps", "0"], "--steps: must be an integer >= 1, got 0"),
        ("copy_task", ["--steps", "-3"], "--steps: must be an integer >= 1, got -3"),
        ("long_context", ["--eval-batch", "0"], "--eval-batch: must be an integer >= 1, got 0"),
        ("benchmark", ["--repeats", "0"], "--repeats: must be an integer >= 1, got 0"),
        ("benchmark", ["--lengths", "512,0"], "--lengths: must be an integer >= 1, got 0"),
        ("reach", ["ckpt", "--windows", "x"], "--windows: expected an integer, got 'x'"),
        ("finetune_lora", ["--base", "b", "--max_steps", "-1"], "--max_steps: must be an integer >= 1, got -1"),
        ("demo", ["--max-steps", "0"], "--max-steps: must be an integer >= 1, got 0"),
    ],
)
def test_nonsense_counts_are_refused(script, argv, message, capsys):
    with pytest.raises(SystemExit) as stop:
        load_script(script).main(argv)
    assert stop.value.code == 2
    assert message in capsys.readouterr().err


@pytest.mark.parametrize("field, value", [("max_steps", -5), ("max_steps", 0), ("batch_size", 0), ("eval_steps", -1)])
def test_train_config_counts_are_checked(field, value):
    with pytest.raises(ValueError, match=f"{field} must be an integer >= "):
        load_script("train").make_config(overrides={field: value})


@pytest.mark.parametrize(
    "script, argv, name, value, quick_name, quick_value",
    [
        ("long_context", ["--quick", "--lengths", "512"], "lengths", [512], "steps", 24),
        ("copy_task", ["--quick", "--steps", "2"], "steps", 2, "batch_size", 4),
        ("benchmark", ["--quick", "--decode-steps", "7"], "decode_steps", 7, "repeats", 1),
        ("long_context", ["--quick", "--steps", "300"], "steps", 300, "segment", 256),
        ("long_context", ["--quick", "--segment=2048"], "segment", 2048, "steps", 24),
        ("copy_task", ["--quick", "--batch-size", "32"], "batch_size", 32, "steps", 4),
        ("benchmark", ["--quick", "--repeats", "3"], "repeats", 3, "decode_steps", 4),
    ],
)
def test_quick_keeps_explicit_flags(script, argv, name, value, quick_name, quick_value):
    """--quick shrinks what was left at its default, and never replaces a flag given on the command line, even one
    given with its default value."""
    args = load_script(script).parse_args(argv)
    assert getattr(args, name) == value and getattr(args, quick_name) == quick_value
