"""End to end: loss and delta_loss through `dataflex-cli train`, on 1 and on 2 processes.

Both runs use the same global batch (4 x 1 x 1 and 2 x 1 x 2), so they train on the same
samples in the same steps; the scores recorded at every selection must then agree, and so must
the chosen indices.
"""

from __future__ import annotations

import json

import pytest

pytestmark = pytest.mark.e2e

SCHEDULE = {"warmup_step": 2, "update_step": 2, "update_times": 2, "max_samples": 120, "cutoff_len": 64,
            "gradient_accumulation_steps": 1, "eval_dataset": "demo_add_eval"}


def _records(out):
    folder = out / "dataflex"
    return {p.name: json.loads(p.read_text()) for p in sorted(folder.glob("step_*.json"))}


@pytest.fixture(scope="module", params=["loss", "delta_loss"])
def runs(request, make_train_yaml, run_cli, tmp_path_factory):
    component = request.param
    tmp = tmp_path_factory.mktemp(component)
    one = make_train_yaml(tmp / "one", component_name=component, per_device_train_batch_size=4, **SCHEDULE)
    two = make_train_yaml(tmp / "two", component_name=component, per_device_train_batch_size=2, **SCHEDULE)
    r1 = run_cli(["train", one], timeout=300)
    assert r1.returncode == 0, r1.stderr[-3000:]
    r2 = run_cli(["train", two], env={"FORCE_TORCHRUN": "1", "NPROC_PER_NODE": "2"}, timeout=300)
    assert r2.returncode == 0, r2.stderr[-3000:]
    return component, tmp / "one" / "out", tmp / "two" / "out", r1.stderr + r1.stdout


def test_records_for_every_selection(runs):
    component, one, _, log = runs
    recs = _records(one)
    assert sorted(recs) == ["step_2.json", "step_4.json"]
    for name, rec in recs.items():
        assert rec["selector"] == component and len(rec["indices"]) == 8
        assert all(0 <= i < 120 for i in rec["indices"])
    state = json.loads((one / "trainer_state.json").read_text())
    assert state["global_step"] == 6
    assert f"by '{component}'" in log


def test_scores_and_choices_match_across_world_sizes(runs):
    component, one, two, _ = runs
    r1, r2 = _records(one), _records(two)
    assert r1.keys() == r2.keys()
    key = "loss" if component == "loss" else "delta"
    for name in r1:
        assert r1[name]["indices"] == r2[name]["indices"], name
        if key in r1[name]["metric"]:
            assert r1[name]["metric"][key] == pytest.approx(r2[name]["metric"][key], abs=1e-4)


def test_selector_specific_metrics(runs):
    component, one, _, _ = runs
    recs = _records(one)
    if component == "loss":
        m = recs["step_2.json"]["metric"]
        q1, q2 = m["thresholds"]
        assert q1 < q2 and sum(m["band_counts"].values()) == 120 - m["unscored"]
        for loss, band in zip(m["loss"], m["band"]):
            assert band == ("low" if loss <= q1 else "medium" if loss <= q2 else "high")
    else:
        first, second = recs["step_2.json"], recs["step_4.json"]
        assert first["metric"]["phase"] == "baseline"
        assert len(first["selector_state"]["baseline"]) == 120
        assert second["metric"]["t"] == 0 and second["metric"]["T"] == 0
        start, end = second["metric"]["window"]
        assert start == 0 and 0 <= end <= 24  # u = sigmoid(-5): window at the top, width floor(0.2 * N)
