"""Resume after a real SIGKILL, and a failure on one rank ending every rank with its message."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import time

import pytest

from conftest import cli_command, failure_report, _cli_env  # noqa: F401  (shared helpers)

pytestmark = pytest.mark.e2e

# 8 steps: warm-up 0-1, selections at 2, 4, 6; checkpoints every 2 steps.
RESUME_CFG = {"component_name": "delta_loss", "warmup_step": 2, "update_step": 2, "update_times": 3,
              "max_samples": 120, "cutoff_len": 64, "per_device_train_batch_size": 4,
              "gradient_accumulation_steps": 1, "save_steps": 2, "eval_dataset": "demo_add_eval"}


def _trace(folder):
    by_step: dict[int, list[int]] = {}
    for line in (folder / "trace_rank0.jsonl").read_text().splitlines():
        row = json.loads(line)
        by_step.setdefault(row["step"], []).extend(row["indices"])
    return by_step


def _records(out):
    return {p.name: json.loads(p.read_text()) for p in sorted((out / "dataflex").glob("step_*.json"))}


def test_resume_after_sigkill_consumes_what_an_uninterrupted_run_would(make_train_yaml, run_cli, tmp_path):
    # uninterrupted reference
    ref_yaml = make_train_yaml(tmp_path / "ref", **RESUME_CFG)
    ref = run_cli(["train", ref_yaml], env={"DATAFLEX_TRACE_DIR": tmp_path / "ref_trace"}, timeout=300)
    assert ref.returncode == 0, failure_report(ref)

    # the same run, killed with SIGKILL at step 5 (checkpoint-4 saved, selection at step 4 made)
    yaml_path = make_train_yaml(tmp_path / "crash", **RESUME_CFG)
    marker = tmp_path / "paused"
    env = _cli_env({"DATAFLEX_TRACE_DIR": str(tmp_path / "crash_trace"), "DATAFLEX_TEST_PAUSE_AT_STEP": "5",
                    "DATAFLEX_TEST_PAUSE_FILE": str(marker)})
    proc = subprocess.Popen(cli_command(["train", yaml_path]), env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        deadline = time.time() + 240
        while not marker.exists():
            assert proc.poll() is None, proc.stderr.read()[-3000:]
            assert time.time() < deadline, "run never reached step 5"
            time.sleep(0.5)
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
    assert proc.returncode == -signal.SIGKILL
    out = tmp_path / "crash" / "out"
    assert (out / "checkpoint-4").is_dir()
    assert sorted(_records(out)) == ["step_2.json", "step_4.json"]  # step 6 was never reached

    resumed = run_cli(["train", yaml_path, f"resume_from_checkpoint={out / 'checkpoint-4'}"],
                      env={"DATAFLEX_TRACE_DIR": tmp_path / "resume_trace"}, timeout=300)
    assert resumed.returncode == 0, failure_report(resumed)
    assert "selector state restored from step_2.json" in resumed.stderr
    assert "reusing step_4.json" in resumed.stderr

    ref_trace = _trace(tmp_path / "ref_trace")
    crash_trace, resume_trace = _trace(tmp_path / "crash_trace"), _trace(tmp_path / "resume_trace")
    assert sorted(resume_trace) == [4, 5, 6, 7]
    combined = {s: crash_trace[s] for s in range(4)} | resume_trace
    assert combined == ref_trace  # exactly the samples, in the order, of the uninterrupted run

    ref_recs, recs = _records(tmp_path / "ref" / "out"), _records(out)
    assert sorted(recs) == sorted(ref_recs) == ["step_2.json", "step_4.json", "step_6.json"]
    for name in ref_recs:
        assert recs[name]["indices"] == ref_recs[name]["indices"], name
        assert recs[name]["fingerprint"] == ref_recs[name]["fingerprint"]
    # step 6 was selected after the resume with the restored baseline: same deltas as the reference
    assert recs["step_6.json"]["metric"]["delta"] == pytest.approx(ref_recs["step_6.json"]["metric"]["delta"], abs=1e-5)


def test_a_failing_rank_ends_all_ranks_with_its_message(make_train_yaml, run_cli, tmp_path):
    yaml_path = make_train_yaml(tmp_path, component_name="loss", eval_dataset="demo_add_eval",
                                max_samples=60, cutoff_len=64)
    start = time.time()
    res = run_cli(["train", yaml_path], env={"FORCE_TORCHRUN": "1", "NPROC_PER_NODE": "2",
                                             "DATAFLEX_TEST_FAIL_SCORING": "1"}, timeout=240)
    assert res.returncode != 0
    text = res.stderr
    assert "scoring failed on rank 1: RuntimeError: injected scoring fault on rank 1" in text
    # whichever rank exits first prints the one-line error (torchrun then stops the other)
    assert re.search(r"\[rank [01]\] dataflex-cli: error: selection 1 at step 2 \(selector 'loss'\) "
                     r"scoring failed on rank 1", text)
    assert "dataflex-cli: error: training failed in a worker process" in text
    assert time.time() - start < 200
