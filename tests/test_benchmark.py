"""The scaling benchmark runs end to end in --quick mode and writes its report and plot."""

import json
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def test_benchmark_quick(tmp_path):
    proc = subprocess.run(
        [sys.executable, "scripts/benchmark.py", "--quick", "--out-dir", str(tmp_path)],
        capture_output=True,
        text=True,
        cwd=REPO,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "fitted scaling exponents" in proc.stdout and "Llama/DFN" in proc.stdout
    assert "torch_threads=" in proc.stdout and "transformers=" in proc.stdout
    report = json.loads((tmp_path / "benchmark.json").read_text())
    for kind in ("dfn", "llama"):
        forward = report["results"][kind]["forward"]
        assert set(forward) == {"256", "512"} and all(r["seconds"] > 0 for r in forward.values())
        decode = report["results"][kind]["decode"].values()
        assert all(0 < r["weight_pass_ms"] < r["ms_per_token"] for r in decode)
    dfn_params = report["results"]["dfn"]["forward"]["256"]["params"]
    llama_params = report["results"]["llama"]["forward"]["256"]["params"]
    assert abs(dfn_params - llama_params) / dfn_params < 0.02  # same-size baseline
    assert (tmp_path / "scaling.png").stat().st_size > 10_000
