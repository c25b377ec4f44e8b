"""Long stress runs, excluded from the default suite (``python -m pytest -m slow tests/e2e/test_stress.py``)."""

from __future__ import annotations

import json
import sys

import pytest

from support.helpers import REPO_ROOT, failure_report, run_command

pytestmark = [pytest.mark.slow, pytest.mark.e2e]


@pytest.mark.timeout(4 * 3600)
def test_fifty_two_process_runs_all_finish_with_their_model(tmp_path):
    res = run_command([sys.executable, "bench/stress_teardown.py", "--runs", "50", "--out", tmp_path],
                      cwd=REPO_ROOT, timeout=4 * 3600)
    assert res.returncode == 0, failure_report(res)
    result = json.loads((tmp_path / "stress_teardown.json").read_text())
    assert result["runs"] == 50 and result["failures"] == 0, result
