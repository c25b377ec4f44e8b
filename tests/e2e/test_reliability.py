"""Resume after a real SIGKILL from the checkpoint alone, and failures on one rank ending every rank.

Every multi-process run here has a bounded timeout, and every failure case asserts how long it
took, so a protocol regression shows up as a test failure, not as a hung CI job.
"""

from __future__ import annotations

import json
import re
import shutil
import time

import pytest

from support.helpers import REPO_ROOT, consumed_by_step, failure_report, kill_at_step, records

pytestmark = pytest.mark.e2e

# 8 steps: warm-up 0-1, selections at 2, 4, 6; checkpoints every 2 steps; the run is killed at step 5
RESUME_CFG = {"warmup_step": 2, "update_step": 2, "update_times": 3, "max_samples": 60, "cutoff_len": 48,
              "per_device_train_batch_size": 4, "gradient_accumulation_steps": 1, "save_steps": 2,
              "eval_dataset": "demo_add_eval", "dataset": "demo_mix", "num_train_epochs": 1.0}
LESS_COMPONENTS = "selectors:\n  less:\n    name: less\n    params: {proj_dim: 256, scoring_batch_size: 8}\n"


def _kill_at(step: int, yaml_path, trace_dir, tmp_path, timeout: float = 240) -> None:
    kill_at_step(["train", yaml_path], step, tmp_path, env={"DATAFLEX_TRACE_DIR": str(trace_dir)}, timeout=timeout)


# loss keeps no state of its own beyond the core's: delta_loss (baseline losses) and less (cumulative
# scores) cover the same resume path and more; loss is in the slow set
@pytest.mark.parametrize("component", [pytest.param("loss", marks=pytest.mark.slow), "delta_loss", "less"])
def test_resume_from_the_checkpoint_alone_consumes_what_an_uninterrupted_run_would(component, make_train_yaml,
                                                                                    run_cli, tmp_path):
    extra = {"component_name": component}
    if component == "less":
        (tmp_path / "components.yaml").write_text(LESS_COMPONENTS)
        extra["components_cfg_file"] = str(tmp_path / "components.yaml")
    ref_yaml = make_train_yaml(tmp_path / "ref", **RESUME_CFG, **extra)
    ref = run_cli(["train", ref_yaml], env={"DATAFLEX_TRACE_DIR": tmp_path / "ref_trace"}, timeout=300)
    assert ref.returncode == 0, failure_report(ref)

    # the same run, killed with SIGKILL at step 5 (checkpoint-4 was saved just before the selection at step 4)
    yaml_path = make_train_yaml(tmp_path / "crash", **RESUME_CFG, **extra)
    _kill_at(5, yaml_path, tmp_path / "crash_trace", tmp_path)
    out = tmp_path / "crash" / "out"
    assert (out / "checkpoint-4" / "dataflex_state.json").is_file()
    run_id = json.loads((out / "checkpoint-4" / "dataflex_state.json").read_text())["run_id"]
    shutil.rmtree(out / "dataflex")  # the records and the manifest: resuming must not need them

    resumed = run_cli(["train", yaml_path, f"resume_from_checkpoint={out / 'checkpoint-4'}"],
                      env={"DATAFLEX_TRACE_DIR": tmp_path / "resume_trace"}, timeout=300)
    assert resumed.returncode == 0, failure_report(resumed)
    assert f"resuming run {run_id} at step 4 from" in resumed.stderr

    ref_trace = consumed_by_step(tmp_path / "ref_trace")
    crash, resume = consumed_by_step(tmp_path / "crash_trace"), consumed_by_step(tmp_path / "resume_trace")
    assert sorted(resume) == [4, 5, 6, 7]
    assert {s: crash[s] for s in range(4)} | resume == ref_trace  # the samples, in the order, of the uninterrupted run

    ref_recs, recs = records(tmp_path / "ref" / "out"), records(out)
    assert sorted(recs) == [4, 6] and sorted(ref_recs) == [2, 4, 6]  # what ran after the resume is logged again
    key = {"loss": "loss", "delta_loss": "delta", "less": "cumulative_score"}[component]
    for step in (4, 6):
        assert recs[step]["run_id"] == run_id and recs[step]["indices"] == ref_recs[step]["indices"]
        # the selections after the resume used the restored state (delta_loss's baseline, LESS's sums)
        assert recs[step]["per_sample"][key] == pytest.approx(ref_recs[step]["per_sample"][key], abs=1e-5)
    # the scoring work counts on from the checkpoint's: the resumed run ends with the uninterrupted run's total
    work = [(r["dataflex_decision_tokens_forward"], r["dataflex_decision_tokens_backward"])
            for r in (json.loads((d / "train_results.json").read_text()) for d in (tmp_path / "ref" / "out", out))]
    assert work[0] == work[1] and work[0][0] > 0 and (work[0][1] > 0) == (component == "less")


NEAR_COMPONENTS = "selectors:\n  near:\n    name: near\n    params: {neighbours: 6, refresh: false, scoring_batch_size: 8}\n"


def test_an_embedding_selector_resumes_with_the_embeddings_it_pinned(make_train_yaml, run_cli, tmp_path):
    """near with refresh: false embeds the pool once, with the model of the first selection. After a kill
    and a resume from checkpoint-4 (a later model), the checkpoint's pinned keys must find those
    embeddings in the cache, so the selections match the uninterrupted run's; without the cache the
    resume says so instead of silently embedding with the current model."""
    (tmp_path / "components.yaml").write_text(NEAR_COMPONENTS)
    extra = {"component_name": "near", "components_cfg_file": str(tmp_path / "components.yaml")}
    ref_yaml = make_train_yaml(tmp_path / "ref", **RESUME_CFG, **extra)
    ref = run_cli(["train", ref_yaml], timeout=300)
    assert ref.returncode == 0, failure_report(ref)
    yaml_path = make_train_yaml(tmp_path / "crash", **RESUME_CFG, **extra)
    _kill_at(5, yaml_path, tmp_path / "crash_trace", tmp_path)
    out = tmp_path / "crash" / "out"
    state = json.loads((out / "checkpoint-4" / "dataflex_state.json").read_text())
    assert "embedding_keys" in json.dumps(state)
    for path in (out / "dataflex").iterdir():  # keep only the embedding cache
        if path.name != "embeddings":
            shutil.rmtree(path) if path.is_dir() else path.unlink()
    cached = sorted(p.name for p in (out / "dataflex" / "embeddings").iterdir())

    resumed = run_cli(["train", yaml_path, f"resume_from_checkpoint={out / 'checkpoint-4'}"], timeout=300)
    assert resumed.returncode == 0, failure_report(resumed)
    assert "embeddings reused from" in resumed.stderr and "pinned by the checkpoint" not in resumed.stderr
    assert sorted(p.name for p in (out / "dataflex" / "embeddings").iterdir()) == cached  # nothing re-embedded
    ref_recs, recs = records(tmp_path / "ref" / "out"), records(out)
    assert sorted(recs) == [4, 6]
    for step in (4, 6):
        assert recs[step]["indices"] == ref_recs[step]["indices"]

    shutil.rmtree(out / "dataflex")
    again = run_cli(["train", yaml_path, f"resume_from_checkpoint={out / 'checkpoint-4'}"], timeout=300)
    assert again.returncode == 0, failure_report(again)
    assert "pinned by the checkpoint" in again.stderr and "can differ from an uninterrupted run" in again.stderr


def test_resume_with_another_setup_is_refused(make_train_yaml, run_cli, tmp_path):
    path = make_train_yaml(tmp_path, **{**RESUME_CFG, "max_samples": 40}, component_name="random")
    res = run_cli(["train", path], timeout=300)
    assert res.returncode == 0, failure_report(res)
    checkpoint = tmp_path / "out" / "checkpoint-4"
    res = run_cli(["train", path, f"resume_from_checkpoint={checkpoint}", "per_device_train_batch_size=2"], timeout=300)
    assert res.returncode != 0
    assert re.search(r"dataflex-cli: error: resume_from_checkpoint: '.*checkpoint-4' was written with another "
                     r"DataFlex setup \(global_batch: 4 there, 2 now\)", res.stderr), res.stderr[-3000:]


def _two_ranks(make_train_yaml, run_cli, tmp_path, fault: str, component: str = "loss", **extra):
    if component == "less":
        (tmp_path / "components.yaml").write_text(LESS_COMPONENTS)
        extra["components_cfg_file"] = str(tmp_path / "components.yaml")
    yaml_path = make_train_yaml(tmp_path, component_name=component, eval_dataset="demo_add_eval", max_samples=40,
                                cutoff_len=48, ddp_timeout=180000000, **extra)
    start = time.time()
    res = run_cli(["train", yaml_path], env={"FORCE_TORCHRUN": "1", "NPROC_PER_NODE": "2",
                                             "DATAFLEX_TEST_FAULT": fault}, timeout=240)
    return res, time.time() - start


# a failure between forwards (collation) is also ended under ZeRO-3 below, where it is hardest; here it
# is in the slow set
@pytest.mark.parametrize("fault, where", [
    pytest.param("collate:1:1", "scoring losses, batch 1/", marks=pytest.mark.slow),  # between forwards
    ("forward:1:1", "scoring losses, batch 1/"),  # inside the first scoring forward
    ("selection:1:1", "selection 1"),  # before the engine's first collective
])
def test_a_failing_rank_ends_all_ranks_with_its_message(fault, where, make_train_yaml, run_cli, tmp_path):
    res, seconds = _two_ranks(make_train_yaml, run_cli, tmp_path, fault)
    assert res.returncode != 0
    what = fault.split(":")[0]
    message = f"RuntimeError: injected {what} fault on rank 1"
    # the original message, from the failing rank's point of view, on every rank that reports it
    pattern = (rf"\[rank [01]\] dataflex-cli: error: selection 1 at step 2 \(selector 'loss'\) failed on rank 1 "
               rf"\({re.escape(where)}[^)]*\): {message}")
    lines = re.findall(pattern, res.stderr)
    assert len(lines) == 2, failure_report(res)  # both ranks agreed and stopped with the same line
    assert "dataflex-cli: error: training failed in a worker process" in res.stderr
    assert seconds < 200


# both failure points and both scorers, in two runs instead of four (each pair shares all its code paths)
@pytest.mark.parametrize("component, what", [("loss", "collate"), ("less", "forward")])
def test_zero3_failure_during_scoring_ends_every_rank(component, what, make_train_yaml, run_cli, tmp_path):
    """Under ZeRO-3 every forward gathers weights collectively: a rank failing between forwards must
    stop its peer before the next forward (the fence), and one failing inside a forward must end at
    once (its peer may be waiting inside the forward) - never a hang, whatever ddp_timeout says."""
    ds = REPO_ROOT / "examples" / "deepspeed" / "ds_z3_config.json"
    res, seconds = _two_ranks(make_train_yaml, run_cli, tmp_path, f"{what}:1:1", component=component,
                              deepspeed=str(ds), per_device_train_batch_size=1, warmup_step=2)
    assert res.returncode != 0
    assert f"RuntimeError: injected {what} fault on rank 1" in res.stderr, failure_report(res)
    assert re.search(r"\[rank 1\] dataflex-cli: error: .*failed on rank 1", res.stderr), failure_report(res)
    assert "dataflex-cli: error: training failed in a worker process" in res.stderr
    assert seconds < 200
