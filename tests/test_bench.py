"""The quality benchmark runs end to end (who wins is not asserted: that is the benchmark's job)."""

from __future__ import annotations

import sys

import pytest

from conftest import failure_report, run_command

pytestmark = pytest.mark.e2e


def test_quality_benchmark_runs(tmp_path):
    out = tmp_path / "quality"
    res = run_command([sys.executable, "bench/quality.py", "--out", out, "--only", "random", "less",
                       "--seeds", "1", "--warmup-steps", "2", "--steps-per-selection", "2", "--selections", "1"],
                      timeout=600)
    assert res.returncode == 0, failure_report(res)
    table = (out / "results.md").read_text()
    assert "| random (seed 1) |" in table and "| less |" in table
    assert (out / "eval_loss.png").stat().st_size > 1000


def test_selector_agreement_benchmark_runs(tmp_path):
    res = run_command([sys.executable, "bench/selector_agreement.py", "--quick", "--out", tmp_path], timeout=600)
    assert res.returncode == 0, failure_report(res)
    import json

    result = json.loads((tmp_path / "selectors.json").read_text())
    row = result["ranking"]["cluster_less"][0]
    assert row["gradients"] < result["ranking"]["less"]["gradients"]  # fewer gradients than full LESS
    assert -1 <= row["spearman"] <= 1 and result["search"]["torch_s"] > 0
