"""End to end: random, loss and delta_loss through `dataflex-cli train`, on 1 and on 2 processes.

Both runs use the same global batch (4 x 1 x 1 and 2 x 1 x 2), so they train on the same
samples in the same steps; the scores recorded at every selection must then agree, and so must
the chosen indices - two independent runs with a fixed seed select the same samples.
"""

from __future__ import annotations

import json
import math

import pytest
import yaml

from support.helpers import failure_report

pytestmark = pytest.mark.e2e

# two datasets mixed (max_samples applies to each: 120 + 80 chat samples = 200 rows)
SCHEDULE = {"warmup_step": 2, "update_step": 2, "update_times": 2, "max_samples": 120, "cutoff_len": 64,
            "gradient_accumulation_steps": 1, "eval_dataset": "demo_add_eval", "dataset": "demo_mix,demo_chat"}
N_TRAIN = 200


def _records(out):
    from support.helpers import records

    return {f"step_{k}.json": v for k, v in records(out).items()}


# random's records and its 1-vs-2-process draws are in test_e2e_random.py (traces of every step), and
# loss / delta_loss draw through the same seeded core: random here is in the slow set
@pytest.fixture(scope="module", params=[pytest.param("random", marks=pytest.mark.slow), "loss", "delta_loss"])
def runs(request, make_train_yaml, run_cli, tmp_path_factory):
    component = request.param
    tmp = tmp_path_factory.mktemp(component)
    one = make_train_yaml(tmp / "one", component_name=component, per_device_train_batch_size=4, plot_loss=True,
                          **SCHEDULE)
    two = make_train_yaml(tmp / "two", component_name=component, per_device_train_batch_size=2, **SCHEDULE)
    r1 = run_cli(["train", one], timeout=300)
    assert r1.returncode == 0, failure_report(r1)
    r2 = run_cli(["train", two], env={"FORCE_TORCHRUN": "1", "NPROC_PER_NODE": "2"}, timeout=300)
    assert r2.returncode == 0, failure_report(r2)
    return component, tmp / "one" / "out", tmp / "two" / "out", r1.stderr + r1.stdout


def test_records_for_every_selection(runs):
    component, one, _, log = runs
    recs = _records(one)
    assert sorted(recs) == ["step_2.json", "step_4.json"]
    for name, rec in recs.items():
        assert rec["selector"] == component and len(rec["indices"]) == 8
        assert all(0 <= i < N_TRAIN for i in rec["indices"])
    state = json.loads((one / "trainer_state.json").read_text())
    assert state["global_step"] == 6
    assert f"by '{component}'" in log


def test_scores_and_choices_match_across_world_sizes(runs):
    component, one, two, _ = runs
    r1, r2 = _records(one), _records(two)
    assert r1.keys() == r2.keys()
    key = {"loss": "loss", "delta_loss": "delta"}.get(component)
    for name in r1:
        assert r1[name]["indices"] == r2[name]["indices"], name
        if key and key in r1[name]["per_sample"]:
            assert r1[name]["per_sample"][key] == pytest.approx(r2[name]["per_sample"][key], abs=1e-4)


def test_selector_specific_metrics(runs):
    component, one, _, _ = runs
    recs = _records(one)
    if component == "random":
        assert all(r["summary"] == {"replacement": False} and r["per_sample"] == {} for r in recs.values())
    elif component == "loss":
        m, per = recs["step_2.json"]["summary"], recs["step_2.json"]["per_sample"]
        q1, q2 = m["thresholds"]
        assert q1 < q2 and sum(m["band_counts"].values()) == N_TRAIN - m["unscored"]
        for loss, band in zip(per["loss"], per["band"]):
            assert band == ("low" if loss <= q1 else "medium" if loss <= q2 else "high")
    else:
        first, second = recs["step_2.json"], recs["step_4.json"]
        assert first["summary"]["phase"] == "baseline"
        assert second["summary"]["t"] == 0 and second["summary"]["T"] == 0
        start, end = second["summary"]["window"]
        n = N_TRAIN - second["summary"]["unscored"]
        u = second["summary"]["u"]
        assert u == pytest.approx(1 / (1 + math.exp(5)))  # single delta selection: t/T := 0
        assert start == math.floor(u * (n - 0.2 * n))
        assert start <= end <= start + math.floor(0.2 * n)  # cut where the loss got worse


def test_report_plot_and_export(runs, run_cli, tmp_path):
    """The selection report of a finished run, its plot, and the export trained by plain LLaMA-Factory."""
    from support.helpers import DATA_DIR, llamafactory_cli, run_command, write_yaml

    component, one, _, _ = runs
    assert (one / "dataflex_selection.png").stat().st_size > 1000  # plot_loss: true
    assert (one / "training_loss.png").is_file()
    export = tmp_path / "export"
    res = run_cli(["report", one, "--export-dataset", export, "--name", "picked"])
    assert res.returncode == 0, res.stderr
    out = res.stdout
    assert f"component '{component}' ({component})" in out and "demo_mix [0, 120), demo_chat [120, 200)" in out
    recs = _records(one)
    picks = [i for r in recs.values() for i in r["indices"]]
    assert f"{len(set(picks))} distinct samples" in out
    from_mix = sum(1 for i in picks if i < 120)
    assert f"picks by dataset: demo_mix {from_mix} (" in out
    info = json.loads((export / "dataset_info.json").read_text())
    mix_rows = json.loads((export / "picked_demo_mix.json").read_text())
    source = json.loads((DATA_DIR / "demo_mix_train.json").read_text())
    assert mix_rows == [source[i] for i in sorted({i for i in picks if i < 120})]
    if any(i >= 120 for i in picks):
        assert info["picked_demo_chat"]["formatting"] == "sharegpt"
    if component != "loss":
        return
    # static selection: plain llamafactory-cli trains on the exported subset
    names = ",".join(sorted(info))
    base = yaml.safe_load((one.parent / "train.yaml").read_text())
    for key in ("train_type", "component_name", "warmup_step", "update_step", "update_times", "eval_dataset",
                "components_cfg_file"):
        base.pop(key, None)
    base.update({"dataset": names, "dataset_dir": str(export), "output_dir": str(tmp_path / "static"),
                 "max_steps": 2, "plot_loss": False})
    static = write_yaml(tmp_path / "static.yaml", base)
    res = run_command([*llamafactory_cli(), "train", static], timeout=300)
    assert res.returncode == 0, failure_report(res)
    assert (tmp_path / "static" / "adapter_model.safetensors").is_file()
