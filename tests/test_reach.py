"""scripts/reach.py: time-only positions read exactly the K most recent entities, the flow moves neighbours beyond
them, and attention ages are shares of a distribution."""

from pathlib import Path

import pytest
from conftest import load_script, make_model, tiny_config

from dfn.baselines import same_size_llama

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    root = tmp_path_factory.mktemp("reach")
    folders = {
        "no_flow": tiny_config("k1-noflow-nonorm-residual"),
        "flow": tiny_config("k3-mem-residual", flow_alpha_init=3.0),
    }
    for name, config in folders.items():
        make_model(config).save_pretrained(root / name)
    same_size_llama(folders["flow"], 64).save_pretrained(root / "llama")
    argv = [str(root / n) for n in ("no_flow", "flow", "llama")]
    argv += ["--text", str(REPO / "data/tinyshakespeare.txt"), "--split", "all", "--length", "64", "--skip", "16"]
    return load_script("reach").main(argv + ["--json", str(root / "reach.json")]), root


def test_time_only_positions_read_the_most_recent_entities(report):
    results, root = report
    for row in results[str(root / "no_flow")]["layers"]:
        assert row["neighbors_older_than_K"] == [0.0, 0.0]
        assert row["mass_age_ge_K"] == [0.0, 0.0]
        assert all(age <= 4 for age in row["median_neighbor_age"])  # K = 4: ages 0-3
        assert row["flow_logit_scale"] == [0.0, 0.0]  # pos_dim 1: no flow coordinates


def test_the_flow_moves_neighbours_beyond_the_most_recent(report):
    results, root = report
    rows = results[str(root / "flow")]["layers"]
    assert max(max(row["neighbors_older_than_K"]) for row in rows) > 0.05
    assert min(min(row["flow_logit_scale"]) for row in rows) > 0.01
    for row in rows:
        for ge_k, ge_256 in zip(row["mass_age_ge_K"], row["mass_age_ge_256"], strict=True):
            assert 0.0 <= ge_256 <= ge_k <= 1.0 + 1e-6
            assert ge_256 == 0.0  # a 64-byte window has nothing 256 bytes back


def test_attention_ages_are_shares_of_the_attention(report):
    results, root = report
    rows = results[str(root / "llama")]["layers"]
    assert len(rows) == 2
    for row in rows:
        assert all(0.0 < share <= 1.0 for share in row["mass_age_ge_K"])  # near-uniform attention at init
        assert row["mass_age_ge_256"] == [0.0] * len(row["mass_age_ge_256"])
    assert (root / "reach.json").stat().st_size > 100
