"""The warm CLI runner (tests/support/warm_cli.py) must be indistinguishable from ``python -m dataflex.cli``:
the same records, scores, losses and adapter, the same exit codes and messages."""

from __future__ import annotations

import json

import pytest
from safetensors.torch import load_file

from support.helpers import failure_report, records, run_command, cli_command, traces

pytestmark = pytest.mark.e2e


def _state(out):
    return json.loads((out / "trainer_state.json").read_text())


def test_a_forked_run_trains_exactly_like_a_subprocess(make_train_yaml, run_cli, tmp_path):
    outs = {}
    for how in ("fork", "subprocess"):
        path = make_train_yaml(tmp_path / how, component_name="loss", eval_dataset="demo_add_eval", max_samples=40,
                               cutoff_len=48)
        res = run_cli(["train", path], env={"DATAFLEX_TRACE_DIR": tmp_path / how / "trace"}, timeout=300,
                      real=how == "subprocess")  # real=False: forked, or the test fails
        assert res.returncode == 0, failure_report(res)
        assert "selection 2/2 at step 4 by 'loss'" in res.stderr
        outs[how] = tmp_path / how / "out"
    fork, sub = (records(outs[h]) for h in ("fork", "subprocess"))
    assert sorted(fork) == sorted(sub) == [2, 4]
    for step in fork:
        assert fork[step]["indices"] == sub[step]["indices"]
        assert fork[step]["per_sample"] == sub[step]["per_sample"]
    assert fork[2]["run_id"] != sub[2]["run_id"]
    assert traces(tmp_path / "fork" / "trace") == traces(tmp_path / "subprocess" / "trace")
    losses = [[h["loss"] for h in _state(outs[h])["log_history"] if "loss" in h] for h in ("fork", "subprocess")]
    assert losses[0] == losses[1] and len(losses[0]) == 6
    a, b = (load_file(outs[h] / "adapter_model.safetensors") for h in ("fork", "subprocess"))
    assert a.keys() == b.keys() and all((a[k] == b[k]).all() for k in a)


@pytest.mark.parametrize("args", [["version"], ["train", "/nonexistent/train.yaml"], ["bogus-command"], []])
def test_a_forked_run_exits_and_prints_like_a_subprocess(args, run_cli):
    forked, real = run_cli(args, real=False), run_command(cli_command(args))
    assert forked.returncode == real.returncode
    assert forked.stdout == real.stdout
    assert forked.stderr == real.stderr
