"""The quality benchmark runs end to end (who wins is not asserted: that is the benchmark's job)."""

from __future__ import annotations

import sys

import pytest

from support.helpers import REPO_ROOT, failure_report, run_command

pytestmark = pytest.mark.e2e


def test_quality_benchmark_runs(tmp_path):
    """--tiny: the whole pipeline (pretraining, the level-2 runs through compare's engine, the benchmark's
    own per-run shares, equal-compute read-out, the random_share curve, transfer through report
    --export-dataset and llamafactory-cli)."""
    import json

    out = tmp_path / "quality"
    only = ["less", "less:random_share=0.5", "plain", "order dynamic_saw"]
    res = run_command([sys.executable, "bench/quality.py", "--tiny", "--out", out, "--only", *only, "--shares", "0.5"],
                      timeout=900)
    assert res.returncode == 0, failure_report(res)
    table = (out / "results.md").read_text()
    for label in ("random", "less", "less:random_share=0.5"):
        assert f"| {label} | 1 |" in table
    result = json.loads((out / "results.json").read_text())
    rows = {r["label"]: r for r in result["summary"]["rows"]}
    assert set(rows) == {"random", *only}
    for row in rows.values():
        assert 0.0 <= row["target_em"][0] <= 1.0 and 0.0 <= row["other_em"][0] <= 1.0
        if row["label"] != "plain":  # LLaMA-Factory's own training has no DataFlex trace of its rows
            assert 0.0 <= row["target_share"][0] <= 1.0
    assert rows["less"]["compute_diff"] is not None and rows["random"]["target_em_diff"] is None
    compare = result["compare"]  # compare.json: its runs, checkpoints every 3 steps, random's long runs to 12
    runs = {(r["method"], r["role"]): r for r in compare["runs"]}
    assert [p["step"] for p in runs[("random", "long")]["curve"]] == [3, 6, 9, 12]
    assert [p["step"] for p in runs[("less", "main")]["curve"]] == [3, 6]
    assert set(runs[("less", "main")]["curve"][-1]["values"]) == {"loss", "exact", "other:loss", "other:exact"}
    assert compare["start"]["values"]["exact"] == 0.0  # the untrained base has never seen the target task
    # #35: the ordering against plain training, paired by seed, through compare's analysis
    tables = result["summary"]["against_plain"]
    assert list(tables) == ["exact", "loss", "other:exact"] and {t["baseline"] for t in tables.values()} == {"plain"}
    for metric, t in tables.items():
        plain = {r["method"]: r for r in t["rows"]}
        assert "diff_mean" not in plain["plain"] and plain["order dynamic_saw"]["seeds"] == 1
        assert plain["order dynamic_saw"]["diff_mean"] == pytest.approx(
            plain["order dynamic_saw"]["mean"] - plain["plain"]["mean"], abs=1e-12), metric
    assert "| order dynamic_saw | 1 |" in table.split("Orderings and the pipeline against plain training")[1]
    assert runs[("order dynamic_saw", "main")]["config"]["train_type"] == "dynamic_reorder"
    assert "train_type" not in runs[("plain", "main")]["config"]  # plain: LLaMA-Factory's own training
    assert result["transfer"]["rows"] > 0 and set(result["transfer"]["rows_by_data"]) == {
        "less selection (exported)", "random draw, same size"}
    for name in ("accuracy_vs_step.png", "accuracy_vs_compute.png", "random_share.png"):
        assert (out / name).stat().st_size > 1000
    base = next(out.glob("base-h48-l2-*"))
    assert json.loads((base / "pretrain.json").read_text())["never_seen"] == "date_us"
    # rerunning adds nothing: every run is found finished by compare's resume
    again = run_command([sys.executable, "bench/quality.py", "--tiny", "--out", out, "--no-transfer",
                         "--only", *only, "--shares", "0.5"], timeout=600)
    assert again.returncode == 0, failure_report(again)
    assert again.stderr.count("finished earlier") == len(compare["runs"])


def test_selector_agreement_benchmark_runs(tmp_path):
    stray = REPO_ROOT / "embeddings"  # a selection context without a cache_dir writes here (cwd)
    before = set(stray.glob("*")) if stray.exists() else set()
    res = run_command([sys.executable, "bench/selector_agreement.py", "--quick", "--out", tmp_path], timeout=600)
    assert res.returncode == 0, failure_report(res)
    assert (set(stray.glob("*")) if stray.exists() else set()) == before
    import json

    result = json.loads((tmp_path / "selectors.json").read_text())
    row = result["ranking"]["cluster_less"][0]
    assert row["gradients"] < result["ranking"]["less"]["gradients"]  # fewer gradients than full LESS
    assert -1 <= row["spearman"] <= 1 and result["search"]["torch_s"] > 0


def test_gpu_script_dry_run_runs_its_plan_on_the_cpu(tmp_path):
    import json

    import torch

    res = run_command([sys.executable, "bench/gpu.py", "--dry-run", "--out", tmp_path], timeout=900)
    assert res.returncode == 0, failure_report(res)
    result = json.loads((tmp_path / "gpu.json").read_text())
    assert result["dry_run"] is True and [s["status"] for s in result["steps"]] == ["ok"] * 8
    by_name = {s["step"]: s for s in result["steps"]}
    scoring = by_name["scoring demo (cpu)"]["data"]
    assert scoring["rows"][0]["engine_vs_floor"] > 0 and scoring["machine"]["torch"] == torch.__version__
    less = by_name["less demo (cpu)"]["data"]
    assert less["seconds_vs_floor"] > 0 and less["min_cosine_vs_batch1"] > 0.999  # batched == batch-1 features
    (peaks,) = less["micro_batch_memory"]  # the LESS pass's peak against a training step's, micro-batch 2
    assert peaks["rows"] == 2 and peaks["train_checkpointing"] and peaks["less_vs_train"] >= 0
    weighting = by_name["weighting demo (cpu)"]["data"]["modes"]
    assert set(weighting) == {"plain", "loss_global"} and weighting["loss_global"]["ratio_to_plain"] > 0
    projection = by_name["projection demo (cpu)"]["data"]
    methods = [r["method"].split(" (")[0] for r in projection["rows"]]
    assert methods == ["count sketch", "factored", "dense gaussian", "dense rademacher"]
    # every projection estimates the exact cosines and squared norms to within a few sqrt(1/proj_dim)
    # (0.016 at 4096); the norms catch a projection that is merely random (cosines near 0 would not)
    # (the factored one, k = 16 per side over the demo's few layers, is the loosest: 0.12 measured)
    for row in projection["rows"]:
        assert row["cos_err_rms"] < 0.08, row
        assert row["sq_norm_err_rms"] < (0.35 if row["method"].startswith("factored") else 0.1), row
    e2e = by_name["e2e less train (demo)"]["data"]
    assert 0 < e2e["selection_share"] < 1
    assert "| e2e less train (demo) | ok |" in result["table"]
    if not torch.cuda.is_available():  # without --dry-run it refuses, in one line, before doing anything
        res = run_command([sys.executable, "bench/gpu.py", "--out", tmp_path / "real"], timeout=120)
        assert res.returncode == 2 and "no CUDA device here" in res.stderr
        assert not (tmp_path / "real").exists()


@pytest.mark.slow
def test_real_model_benchmark_runs_end_to_end_on_stand_in_tasks(smollm2, tmp_path):
    """bench/real.py (level 1) on SmolLM2 with made-up task files in BIG-bench's format, taken from a
    folder as from a checkout (``DATAFLEX_BIGBENCH_DIR``): the harness works where the real task files
    cannot be fetched. Who wins is not asserted."""
    import json

    sys.path.insert(0, str(REPO_ROOT / "bench"))
    import real

    tasks = tmp_path / "tasks"
    for t, name in enumerate(real.ALL_TASKS):
        examples = [{"input": f"[{name}] Is {i} larger than {t + 7}?", "target_scores": {"Yes": int(i > t + 7),
                                                                                         "No": int(i <= t + 7)}}
                    for i in range(24)]
        (tasks / name).mkdir(parents=True)
        (tasks / name / "task.json").write_text(json.dumps({"name": name, "task_prefix": f"Task {name}.",
                                                            "examples": examples}))
    assets = tmp_path / "assets"  # the stand-in task files must not reach the real cache
    assets.mkdir()
    (assets / "smollm2").symlink_to(smollm2)
    out = tmp_path / "out"
    res = run_command([sys.executable, "bench/real.py", "--quick", "--data", "bigbench", "--selectors", "random,loss,less,near",
                       "--n-eval", "4", "--levels", "1", "--out", out],
                      env={"DATAFLEX_ASSETS": str(assets), "DATAFLEX_BIGBENCH_DIR": str(tasks),
                           "DATAFLEX_BIGBENCH_SDIST": None}, timeout=900)
    assert res.returncode == 0, failure_report(res)
    level1 = json.loads((out / "level1.json").read_text())
    assert [r["selector"] for r in level1["table"]] == ["random", "loss", "less", "near"]
    for r in level1["results"]:
        assert r["kind"] == "hard" and r["k"] == 3 and len(r["picks"]) == 3 and len(set(r["picks"])) == 3
        assert 0 <= r["target_share"] <= 1 and 0 <= r["wrong_share"] <= 1
    assert (out / "precision.png").stat().st_size > 0 and "| hard | less |" in (out / "level1.md").read_text()
    assert "not checked against" in res.stderr


BBH = REPO_ROOT.parent / "shared" / "data" / "bbh"


@pytest.mark.slow
@pytest.mark.skipif(not BBH.is_dir(), reason="no ../shared/data/bbh on this machine")
def test_real_model_benchmark_runs_end_to_end_on_bbh(smollm2, tmp_path):
    """bench/real.py on its default source, the BBH files beside the repository: a hard navigate pool
    (its sibling sports_understanding), and level 2's quick cell through compare. Who wins is not
    asserted; the shapes, the splits and the resume are."""
    import json
    import re

    out = tmp_path / "out"
    cmd = [sys.executable, "bench/real.py", "--quick", "--selectors", "random,loss", "--n-eval", "4",
           "--l2-steps", "2", "--l2-train", "8", "--l2-test", "6", "--out", out]
    res = run_command(cmd, env={"DATAFLEX_BBH_DIR": None}, timeout=900)
    assert res.returncode == 0, failure_report(res)
    level1 = json.loads((out / "level1.json").read_text())
    assert level1["args"]["data"] == "bbh"
    for r in level1["results"]:
        assert r["kind"] == "hard" and r["target"] == "navigate" and r["k"] == 3 and len(set(r["picks"])) == 3
    # level 2 is one compare cell (boolean_expressions, weighters vs plain), written under <out>/level2
    cells = json.loads((out / "level2.json").read_text())["cells"]
    assert [(c["target"], c["family"]) for c in cells] == [("boolean_expressions", "weight")]
    rows = [r["method"] for r in cells[0]["tables"][0]["rows"]]
    assert rows == ["plain", "loss", "adapt", "joint_update_aware"]
    cell = out / "level2" / "boolean_expressions-weight"
    assert len(json.loads((cell / "data" / "test.json").read_text())) == 6 and (out / "level2" / "verdicts.md").exists()
    first_cpu = float(re.search(r"wall, ([\d.]+) s of CPU", res.stderr).group(1))
    # level 1 resumes pool by pool, level 2 cell by cell: a second run scores and trains nothing again
    res = run_command(cmd, env={"DATAFLEX_BBH_DIR": None}, timeout=600)
    assert res.returncode == 0, failure_report(res)
    assert "done before, skipped" in res.stderr and "finished earlier with these settings" in res.stderr
    assert json.loads((out / "level1.json").read_text())["results"] == level1["results"]
    assert json.loads((out / "level2.json").read_text())["cells"] == cells
    # the CPU count includes the training processes: the first run's four trainings dwarf the rerun's nothing
    assert float(re.search(r"wall, ([\d.]+) s of CPU", res.stderr).group(1)) < first_cpu / 3


@pytest.mark.slow
@pytest.mark.skipif(not BBH.is_dir(), reason="no ../shared/data/bbh on this machine")
def test_bbh_probe_runs_and_resumes(smollm2, tmp_path):
    """bench/bbh_probe.py on one short task: floor, a one-epoch ceiling, the table; a rerun reuses every
    finished piece (no training, no scoring) and writes the same table."""
    import json

    out = tmp_path / "probe"
    cmd = [sys.executable, "bench/bbh_probe.py", "--tasks", "sports_understanding", "--train", "8", "--test", "10",
           "--epochs", "1", "--out", out]
    res = run_command(cmd, timeout=600)
    assert res.returncode == 0, failure_report(res)
    probe = json.loads((out / "probe.json").read_text())["results"]
    assert [r["task"] for r in probe] == ["sports_understanding"] and probe[0]["floor"]["n"] == 10
    assert probe[0]["train"]["n"] == 8 and probe[0]["answers"] == 2 and len(probe[0]["epochs"]) == 1
    table = (out / "probe.md").read_text()
    stamp = (out / "tasks" / "sports_understanding" / "floor.json").stat().st_mtime_ns
    res = run_command(cmd, timeout=300)
    assert res.returncode == 0, failure_report(res)
    assert (out / "probe.md").read_text() == table
    assert (out / "tasks" / "sports_understanding" / "floor.json").stat().st_mtime_ns == stamp


@pytest.mark.slow
@pytest.mark.skipif(not BBH.is_dir(), reason="no ../shared/data/bbh on this machine")
def test_bbh_level2_through_compare(smollm2, tmp_path):
    """bench/bbh_level2.py: a weighter against plain training on a BBH task, through dataflex.compare, with
    the probe's held-out questions as the eval set; the table has both methods and a verdict."""
    import json

    out = tmp_path / "l2"
    res = run_command([sys.executable, "bench/bbh_level2.py", "--target", "sports_understanding", "--family", "weight",
                       "--methods", "loss", "--seeds", "1", "--steps", "2", "--train", "16", "--test", "6",
                       "--eval-every", "2", "--out", out], timeout=900)
    assert res.returncode == 0, failure_report(res)
    data = json.loads((out / "compare.json").read_text())
    assert [r["method"] for r in data["tables"][0]["rows"]][:2] == ["plain", "loss"]
    test = json.loads((out / "data" / "test.json").read_text())
    assert len(test) == 6 and all(r["answer"] in r["options"] for r in test)
    assert "verdict" in (out / "table.md").read_text()


@pytest.mark.skipif(not BBH.is_dir(), reason="no ../shared/data/bbh on this machine")
def test_bbh_level2_select_and_mix_cells_are_sized_as_documented(tmp_path):
    """The select cell's pool is the target and three other tasks at half ``--train`` rows each, its scoring
    selectors less and loss score ``--candidate-pool`` rows per decision (near embeds the whole pool, random nothing), and none of the measured
    questions is in the pool; the mix cell has one dataset per task and every domain's held-out questions."""
    import argparse
    import json

    import yaml

    sys.path.insert(0, str(REPO_ROOT / "bench"))
    import bbh_level2

    args = argparse.Namespace(train=20, test=12, other_test=5, n_eval=4, seed=0, lr=5e-4, steps=6, candidate_pool=7,
                              family="select")
    cfg = yaml.safe_load(bbh_level2.write_config(tmp_path / "s", tmp_path / "model", "boolean_expressions",
                                                 args).read_text())
    data = tmp_path / "s" / "data"
    pool = json.loads((data / "bb_pool.json").read_text())
    assert cfg["dataset"] == "bb_pool" and cfg["eval_dataset"] == "bb_eval_boolean_expressions"
    assert cfg["warmup_step"] == cfg["update_step"] == 1 and cfg["update_times"] == -1
    tasks = ["boolean_expressions", "sports_understanding", "navigate", "disambiguation_qa"]
    assert sorted(r["task"] for r in pool) == sorted(t for t in tasks for _ in range(10))
    comps = yaml.safe_load((tmp_path / "s" / "components.yaml").read_text())["selectors"]
    assert {k: v["params"].get("candidate_pool") for k, v in comps.items()} == {
        "random": None, "less": 7, "near": None, "loss": 7}
    measured = json.loads((data / "bb_test_boolean_expressions.json").read_text())
    assert len(measured) == 12 and len(json.loads((data / "bb_eval_boolean_expressions.json").read_text())) == 4
    for t in tasks[1:]:
        assert len(json.loads((data / f"bb_test_{t}.json").read_text())) == 5
        measured += json.loads((data / f"bb_test_{t}.json").read_text())
    assert not {r["instruction"] for r in measured} & {r["instruction"] for r in pool}

    args.family = "mix"
    cfg = yaml.safe_load(bbh_level2.write_config(tmp_path / "m", tmp_path / "model", "boolean_expressions",
                                                 args).read_text())
    assert cfg["dataset"] == ",".join(f"bb_train_{t}" for t in tasks) and cfg["mixture_sample_rule"] == "mixture"
    data = tmp_path / "m" / "data"
    assert [len(json.loads((data / f"bb_train_{t}.json").read_text())) for t in tasks] == [10] * 4
    test_all = json.loads((data / "bb_test_all.json").read_text())
    assert sorted(r["task"] for r in test_all) == sorted(t for t in tasks for _ in range(6))


def test_real_quick_and_full_level2_cells_never_land_in_the_tracked_grid(tmp_path):
    """The CPU grid's cells are bench/out/bbh-level2/<target>-<family>; --quick and --full train cells of the same
    names at other sizes, so theirs (and any --out's) go under the run's own folder."""
    import argparse

    sys.path.insert(0, str(REPO_ROOT / "bench"))
    import real

    def ns(**kw):
        return argparse.Namespace(**{"out": None, "quick": False, "full": False, **kw})

    grid = REPO_ROOT / "bench" / "out" / "bbh-level2"
    assert real.cells_root(ns(), tmp_path / "bbh") == grid
    assert real.cells_root(ns(quick=True), tmp_path / "bbh-quick") == tmp_path / "bbh-quick" / "level2"
    assert real.cells_root(ns(full=True), tmp_path / "bbh-full") == tmp_path / "bbh-full" / "level2"
    assert real.cells_root(ns(out=tmp_path / "x"), tmp_path / "x") == tmp_path / "x" / "level2"


def test_bbh_level2_equal_work_compares_each_method_at_its_first_checkpoint_with_the_baselines_work():
    """A method that scores rows does more work per step than random: its earliest checkpoint whose counted work is
    at least random's whole run is compared with random's end, seed by seed (hand-made curves)."""
    sys.path.insert(0, str(REPO_ROOT / "bench"))
    import bbh_level2

    def run(method, k, points):
        return {"method": method, "seed_index": k, "role": "main", "curve": [
            {"step": s, "work": w, "metrics": {"choice": [[v, 1.0]] * 4}} for s, w, v in points]}

    data = {"baseline": "random", "steps": 4, "methods": ["random", "less", "near", "cheap"], "runs": [
        run("random", 0, [(2, 50, 0.5), (4, 100, 0.5)]), run("random", 1, [(2, 60, 0.25), (4, 120, 0.75)]),
        run("less", 0, [(2, 130, 1.0), (4, 260, 0.0)]), run("less", 1, [(2, 150, 0.5), (4, 300, 0.0)]),
        run("near", 0, [(2, 90, 0.0), (4, 180, 0.75)]), run("near", 1, [(2, 119, 0.0), (4, 200, 1.0)]),
        run("cheap", 0, [(2, 40, 0.5), (4, 80, 0.5)]), run("cheap", 1, [(2, 40, 0.5), (4, 90, 0.5)])]}
    table = bbh_level2.equal_work_table(data)
    rows = {r["method"]: r for r in table["rows"]}
    assert rows["random"]["per_seed"] == [0.5, 0.75]
    assert rows["less"]["at"] == [(2, 1.3), (2, 1.25)] and rows["less"]["per_seed"] == [1.0, 0.5]
    assert rows["near"]["at"] == [(4, 1.8), (4, 200 / 120)] and rows["near"]["per_seed"] == [0.75, 1.0]
    assert rows["less"]["diff_mean"] == 0.125 and rows["near"]["diff_mean"] == 0.25
    # a run that never reaches the baseline's work is compared at its end, and says so
    assert rows["cheap"]["at"] == [(4, 0.8), (4, 0.75)]
    assert any("cheap seed 0: its whole run did less work" in n for n in table["notes"])
    # runs made before work was counted: no table
    for r in data["runs"]:
        for q in r["curve"]:
            q["work"] = None
    assert bbh_level2.equal_work_table(data) is None


def test_bbh_level2_worst_domain_is_paired_by_seed_with_a_student_t_interval():
    """Hand values: the baseline's worst domains 0.40 / 0.36 / 0.40, odm's 0.40 each: differences 0 / 0.04 / 0,
    mean 0.0133, half-width t(2) x sd / sqrt(3) = 4.303 x 0.02309 / 1.732 = 0.0574 - a tie (the baseline's own
    interval is the same size: its sd is also 0.02309)."""
    sys.path.insert(0, str(REPO_ROOT / "bench"))
    import bbh_level2

    def seeds(*worst):
        return {"per_seed": [{"a": w + 0.1, "b": w, "worst": w} for w in worst]}

    text = bbh_level2.worst_domain_text({"static": seeds(0.4, 0.36, 0.4), "odm": seeds(0.4, 0.4, 0.4),
                                         "random": seeds(0.5, 0.46, 0.5)}, "static")
    lines = text.splitlines()
    assert lines[3].split() == ["static", "3", "0.3867", "±", "0.0574", "(baseline)"]
    assert lines[4].split() == ["odm", "3", "0.4000", "±", "0.0000", "+0.0133", "±", "0.0574", "tie"]
    assert lines[5].split() == ["random", "3", "0.4867", "±", "0.0574", "+0.1000", "±", "0.0000", "better"]


def test_bbh_level2_pick_shares_count_every_selection_record_by_the_pools_task_column(tmp_path):
    """Two seeds of one selector: picks [0, 1, 2, 0] and [3, 3] over a pool whose rows 0-1 are task a, 2-3 task b;
    a non-selection record and a run folder that is not a seed are ignored."""
    import json

    sys.path.insert(0, str(REPO_ROOT / "bench"))
    import bbh_level2

    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "bb_pool.json").write_text(json.dumps([{"task": "a"}, {"task": "a"}, {"task": "b"},
                                                                {"task": "b"}]))
    for seed, records in ((0, [[0, 1], [2, 0]]), (1, [[3, 3]]), ("1-long", [[0]])):
        run = tmp_path / "compare" / "less" / f"seed-{seed}" / "dataflex" / "r1"
        run.mkdir(parents=True)
        for k, picks in enumerate(records):
            (run / f"step_{4 * (k + 1)}.json").write_text(json.dumps({"kind": "selection", "indices": picks}))
        (run / "step_0.json").write_text(json.dumps({"kind": "warmup", "indices": [2, 2, 2]}))
    assert bbh_level2.pick_shares(tmp_path) == {"less": [{"a": 0.75, "b": 0.25}, {"b": 1.0}]}


def test_bbh_level2_skips_a_cell_whose_tracked_result_has_the_same_settings(tmp_path, monkeypatch):
    """A fresh checkout has each cell's compare.json and cell.json (tracked) but not its runs: the same
    settings skip the cell without loading anything; other settings (or --rerun) run it."""
    import json

    sys.path.insert(0, str(REPO_ROOT / "bench"))
    import bbh_level2

    import dataflex.assets

    loads = []
    monkeypatch.setattr(dataflex.assets, "fetch_locked", lambda name: loads.append(name) or 1 / 0)
    argv = ["--target", "boolean_expressions", "--family", "weight", "--steps", "24", "--out", str(tmp_path)]
    settings = bbh_level2.cell_settings(bbh_level2.parser().parse_args(argv))
    assert settings["steps"] == 24 and settings["seeds"] == 3 and "out" not in settings
    assert settings["methods"] == "loss,adapt,joint_update_aware"  # the family's default, resolved
    (tmp_path / "cell.json").write_text(json.dumps({"settings": settings}))
    with pytest.raises(ZeroDivisionError):  # no compare.json yet: the cell runs (and loads the model)
        bbh_level2.main(argv)
    (tmp_path / "compare.json").write_text("{}")
    assert bbh_level2.main(argv) == 0 and loads == ["smollm2"]
    with pytest.raises(SystemExit):  # DoReMi's steps belong to the doremi family: refused before anything is made
        bbh_level2.main(["--family", "mix", "--methods", "doremi", "--out", str(tmp_path / "mix")])
    assert not (tmp_path / "mix").exists() and loads == ["smollm2"]
    for other in (["--steps", "12"], ["--rerun"], ["--seeds", "2"], ["--methods", "loss"]):
        with pytest.raises(ZeroDivisionError):
            bbh_level2.main([*argv, *other])
    assert loads == ["smollm2"] * 5
    # a result made when the family compared fewer methods by default is not this cell's: it runs
    (tmp_path / "cell.json").write_text(json.dumps({"settings": {**settings, "methods": "loss,adapt"}}))
    with pytest.raises(ZeroDivisionError):
        bbh_level2.main(argv)
    assert loads == ["smollm2"] * 6


def test_bbh_level2_doremi_reference_is_the_adapter_merged_into_the_base(tiny_model, tmp_path):
    """DoReMi's step-1 model is a model folder: the LoRA adapter merged into the base gives the same logits as the
    base with the adapter; a second call finds it and merges nothing; no half-written folder is left."""
    import torch
    from peft import LoraConfig, PeftModel, get_peft_model
    from transformers import AutoModelForCausalLM

    sys.path.insert(0, str(REPO_ROOT / "bench"))
    import bbh_level2

    torch.manual_seed(0)
    peft_model = get_peft_model(AutoModelForCausalLM.from_pretrained(tiny_model),
                                LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]))
    for name, p in peft_model.named_parameters():
        if "lora_B" in name:  # B starts at zero: give the adapter an effect
            torch.nn.init.normal_(p, std=0.5)
    adapter = tmp_path / "run" / "checkpoint-6"
    peft_model.save_pretrained(adapter)
    assert bbh_level2.last_adapter(tmp_path / "run") == adapter
    ref = bbh_level2.merge_reference(adapter, tiny_model, tmp_path / "reference")
    ids = torch.tensor([[1, 5, 9, 3, 7]])
    merged = AutoModelForCausalLM.from_pretrained(ref)
    with torch.no_grad():
        want = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_model), adapter)(ids).logits
        base = AutoModelForCausalLM.from_pretrained(tiny_model)(ids).logits
        got = merged(ids).logits
    assert torch.allclose(got, want, atol=1e-5) and not torch.allclose(got, base, atol=1e-3)
    stamp = (ref / "config.json").stat().st_mtime_ns
    assert bbh_level2.merge_reference(adapter, tiny_model, ref) == ref
    assert (ref / "config.json").stat().st_mtime_ns == stamp and not (tmp_path / "reference.partial").exists()


def test_bbh_level2_doremi_final_proportions_are_the_proxies_mean_and_sum_to_one(tmp_path):
    import json

    sys.path.insert(0, str(REPO_ROOT / "bench"))
    import bbh_level2

    files = []
    for k, w in enumerate(([0.2, 0.3, 0.5], [0.4, 0.1, 0.5], [0.3, 0.3, 0.4])):
        files.append(tmp_path / f"w{k}.json")
        files[-1].write_text(json.dumps({"domains": ["a", "b", "c"], "weights": w}))
    domains, mean, per_proxy = bbh_level2.mean_weights(files)
    assert domains == ["a", "b", "c"] and mean == [0.3, 0.233333, 0.466667] and abs(sum(mean) - 1) < 1e-12
    assert per_proxy == [[0.2, 0.3, 0.5], [0.4, 0.1, 0.5], [0.3, 0.3, 0.4]]
    files[2].write_text(json.dumps({"domains": ["a", "c", "b"], "weights": [0.3, 0.3, 0.4]}))
    with pytest.raises(ValueError, match="different domains"):
        bbh_level2.mean_weights(files)
    with pytest.raises(FileNotFoundError, match="no checkpoint-N"):
        bbh_level2.last_adapter(tmp_path)


def test_bbh_level2_doremi_chain_trains_the_reference_then_the_proxies_then_names_the_final_proportions(
        tmp_path, monkeypatch):
    """The chain's order and wiring, with compare's run replaced: static seed 0 first (the reference, merged), the
    proxies against that reference, and step 3 a static mixer on the proxies' mean weights; the components file
    names both, and the mix cell's other entries are kept."""
    import argparse
    import json
    from pathlib import Path

    import yaml

    sys.path.insert(0, str(REPO_ROOT / "bench"))
    import bbh_level2

    args = argparse.Namespace(train=20, test=12, other_test=5, n_eval=4, seed=0, lr=5e-4, steps=6, candidate_pool=7,
                              family="doremi")
    config = bbh_level2.write_config(tmp_path, tmp_path / "model", "boolean_expressions", args)
    # the doremi cell trains the mix cell's runs: its static baseline's config is the mix cell's, key for key
    args.family = "mix"
    mix = yaml.safe_load(bbh_level2.write_config(tmp_path / "mix", tmp_path / "model", "boolean_expressions",
                                                 args).read_text())
    folders = ("dataset_dir", "output_dir", "components_cfg_file")  # where each cell keeps its files
    assert {k: v for k, v in mix.items() if k not in folders} == {
        k: v for k, v in yaml.safe_load(config.read_text()).items() if k not in folders}
    assert (tmp_path / "mix" / "components.yaml").read_text() == (tmp_path / "components.yaml").read_text()
    assert (tmp_path / "mix" / "data" / "bb_train_navigate.json").read_text() == (
        tmp_path / "data" / "bb_train_navigate.json").read_text()
    calls = []
    weights = {0: [0.1, 0.2, 0.3, 0.4], 1: [0.3, 0.2, 0.1, 0.4]}

    def fake_run(cfg, methods, seeds, **options):
        calls.append((methods, seeds, options["baseline"], options.get("eval_every")))
        runs = Path(options["out"])
        (runs / "static" / "seed-0" / "checkpoint-6").mkdir(parents=True, exist_ok=True)
        if "doremi" in methods.split(","):
            comps = yaml.safe_load(Path(yaml.safe_load(Path(cfg).read_text())["components_cfg_file"]).read_text())
            assert comps["mixers"]["doremi"]["params"]["reference_model_path"] == str(tmp_path / "doremi-reference")
            for k in range(seeds):
                (runs / "doremi" / f"seed-{k}").mkdir(parents=True)
                (runs / "doremi" / f"seed-{k}" / "doremi_domain_weights.json").write_text(json.dumps(
                    {"domains": ["bb_train_" + t for t in ("boolean_expressions", "sports_understanding", "navigate",
                                                            "disambiguation_qa")], "weights": weights[k]}))
        return {}

    merged = []
    monkeypatch.setattr(bbh_level2, "merge_reference",
                        lambda adapter, base, into: merged.append((adapter, base)) or into)
    chain = bbh_level2.doremi_chain(config, tmp_path, 2, fake_run, {"eval_every": 3})
    assert calls == [("static", 1, "static", 3), ("static,doremi", 2, "static", 3)]
    assert merged == [(tmp_path / "compare" / "static" / "seed-0" / "checkpoint-6", tmp_path / "model")]
    comps = yaml.safe_load((tmp_path / "components.yaml").read_text())["mixers"]
    assert comps["doremi_final"] == {"name": "static", "params": {"proportions": [0.2, 0.2, 0.2, 0.4]}}
    assert {"static", "odm", "random", "doremi", "doremi_final"} <= set(comps)
    assert chain["proportions"] == [0.2, 0.2, 0.2, 0.4] and chain["per_proxy"] == [weights[0], weights[1]]


def test_bbh_probe_refuses_pieces_made_with_other_settings(tmp_path):
    """A task's pieces are reported under the run's settings, so pieces made with others (or with unknown ones)
    are refused with one line naming the option; a task begun now records its settings (not with --table-only)."""
    import argparse
    import json

    sys.path.insert(0, str(REPO_ROOT / "bench"))
    import bbh_probe

    args = argparse.Namespace(train=96, test=100, seed=0, epochs=3, lr=5e-4, batch=8, rank=16, cutoff=512,
                              table_only=True)
    cell = tmp_path / "tasks" / "navigate"
    bbh_probe.check_settings(cell, "navigate", args)
    assert not cell.exists()  # --table-only writes nothing
    args.table_only = False
    bbh_probe.check_settings(cell, "navigate", args)
    assert json.loads((cell / "settings.json").read_text())["lr"] == 5e-4
    bbh_probe.check_settings(cell, "navigate", args)  # the same settings: resumes
    args.lr, args.epochs = 1e-3, 4
    with pytest.raises(SystemExit, match=r"navigate under .* was probed with --epochs 3, --lr 0.0005 \(this run: "
                                         r"--epochs 4, --lr 0.001\)"):
        bbh_probe.check_settings(cell, "navigate", args)
    (cell / "settings.json").unlink()
    (cell / "floor.json").write_text("{}")
    with pytest.raises(SystemExit, match="holds floor.json but no settings.json"):
        bbh_probe.check_settings(cell, "navigate", args)
    # the tracked probe's tasks all carry the settings the published table was made with
    tracked = sorted((REPO_ROOT / "bench" / "out" / "bbh-probe" / "tasks").iterdir())
    assert len(tracked) == 17
    assert {json.loads((t / "settings.json").read_text())["lr"] for t in tracked} == {5e-4}


def test_bbh_level2_a_relative_out_gives_the_runs_absolute_paths(tmp_path, monkeypatch):
    """compare's run keys hash the config, data folder included: a cell given as a relative --out must write the
    same config as the same folder given absolutely, or its finished runs would be trained again."""
    from pathlib import Path

    import yaml

    sys.path.insert(0, str(REPO_ROOT / "bench"))
    import bbh_level2

    import dataflex.assets
    import dataflex.compare

    seen = []

    def stop(config, *a, **k):
        seen.append(yaml.safe_load(Path(config).read_text()))
        raise KeyboardInterrupt

    monkeypatch.setattr(dataflex.assets, "fetch_locked", lambda name: tmp_path / "model")
    monkeypatch.setattr(dataflex.compare, "run", stop)
    monkeypatch.chdir(tmp_path)
    argv = ["--target", "boolean_expressions", "--family", "weight", "--train", "8", "--test", "4"]
    for out in ("cell", str(tmp_path / "cell")):
        with pytest.raises(KeyboardInterrupt):
            bbh_level2.main([*argv, "--out", out])
    assert seen[0] == seen[1] and seen[0]["dataset_dir"] == str(tmp_path / "cell" / "data")


def test_bbh_level2_refuses_a_folder_of_cells_as_a_cells_out(tmp_path, monkeypatch, capsys):
    """--out names one cell's folder; given the folder that holds the cells (as --verdicts takes), a cell would
    write its runs and data beside the finished cells: refused before anything is written."""
    sys.path.insert(0, str(REPO_ROOT / "bench"))
    import bbh_level2

    import dataflex.compare

    monkeypatch.setattr(dataflex.compare, "run", lambda *a, **k: pytest.fail("compare ran"))
    (tmp_path / "boolean_expressions-weight").mkdir()
    (tmp_path / "boolean_expressions-weight" / "compare.json").write_text("{}")
    before = sorted(p.name for p in tmp_path.rglob("*"))
    with pytest.raises(SystemExit) as e:
        bbh_level2.main(["--target", "geometric_shapes", "--family", "reorder", "--out", str(tmp_path)])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert "--out" in err and str(tmp_path / "geometric_shapes-reorder") in err
    assert sorted(p.name for p in tmp_path.rglob("*")) == before


def test_bbh_level2_takes_the_same_targets_other_cells_runs_through_reuse(tmp_path, monkeypatch):
    """The weight and reorder cells train the same plain runs (the same key): a cell hands compare the same
    target's other cells as --reuse, and no other target's."""
    sys.path.insert(0, str(REPO_ROOT / "bench"))
    import bbh_level2

    import dataflex.assets
    import dataflex.compare

    seen = []

    def stop(config, methods, **kwargs):
        seen.append(kwargs)
        raise KeyboardInterrupt

    monkeypatch.setattr(dataflex.assets, "fetch_locked", lambda name: tmp_path / "model")
    monkeypatch.setattr(dataflex.compare, "run", stop)
    for cell in ("boolean_expressions-reorder", "boolean_expressions-mix", "geometric_shapes-reorder"):
        (tmp_path / cell / "compare").mkdir(parents=True)
    (tmp_path / "boolean_expressions-select").mkdir()  # no runs yet
    with pytest.raises(KeyboardInterrupt):
        bbh_level2.main(["--target", "boolean_expressions", "--family", "weight", "--train", "8", "--test", "4",
                         "--out", str(tmp_path / "boolean_expressions-weight")])
    assert seen[0]["reuse"] == [tmp_path / "boolean_expressions-mix" / "compare",
                                tmp_path / "boolean_expressions-reorder" / "compare"]


def test_bbh_level2_order_answers_count_each_quarter_of_the_trained_rows_by_answer(tmp_path):
    """Rows 0-3 answer A, A, B, C; one order trains [3, 0] then [1, 2] (records out of step order on disk), so its
    halves hold {C, A} and {A, B}; a seed folder that is not a seed and a run without order records are left out."""
    import json

    sys.path.insert(0, str(REPO_ROOT / "bench"))
    import bbh_level2

    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "dataset_info.json").write_text(json.dumps({"bbh_train": {"file_name": "train.json"}}))
    (tmp_path / "data" / "train.json").write_text(json.dumps([{"output": a} for a in "AABC"]))
    run = tmp_path / "compare" / "dynamic" / "seed-0" / "dataflex" / "r1"
    run.mkdir(parents=True)
    (run / "order.jsonl").write_text(json.dumps({"step": 2, "indices": [1, 2]}) + "\n"
                                     + json.dumps({"step": 1, "indices": [3, 0]}) + "\n")
    (tmp_path / "compare" / "dynamic" / "seed-0-long" / "dataflex" / "r1").mkdir(parents=True)
    (tmp_path / "compare" / "plain" / "seed-0").mkdir(parents=True)
    assert bbh_level2.order_answers(tmp_path, parts=2) == {"dynamic": [[{"A": 1, "C": 1}, {"A": 1, "B": 1}]]}
    assert bbh_level2.order_answers(tmp_path, parts=4) == {"dynamic": [[{"C": 1}, {"A": 1}, {"A": 1}, {"B": 1}]]}


def test_bbh_level2_verdict_rows_put_the_answer_loss_beside_the_accuracy(tmp_path):
    """A cell with a choice and a loss table per budget: each method's row carries both verdicts, its loss from
    the same budget; the equal-work table (choice only) gets '-' for the loss."""
    import json

    sys.path.insert(0, str(REPO_ROOT / "bench"))
    import bbh_level2

    def row(method, mean, diff, lo, hi, verdict):
        return {"method": method, "seeds": 3, "mean": mean, "lo": mean - 0.1, "hi": mean + 0.1, "diff_mean": diff,
                "diff_lo": lo, "diff_hi": hi, "verdict": verdict}

    base = {"method": "plain", "verdict": None}
    def table(metric, budget, *dyn):
        return {"metric": metric, "budget": budget, "baseline": "plain", "rows": [base, row("dyn", *dyn)]}

    tables = [table("choice", "steps", 0.3, -0.07, -0.3, 0.2, "tie"),
              table("loss", "steps", 0.44, 0.107, 0.068, 0.145, "worse"),
              table("loss", "compute", 0.5, -0.2, -0.3, -0.1, "better")]
    cell = tmp_path / "geometric_shapes-reorder"
    cell.mkdir()
    (cell / "compare.json").write_text(json.dumps({"tables": tables}))
    (cell / "equal_work.json").write_text(json.dumps({"tables": [{**tables[0], "budget": "work"}]}))
    assert bbh_level2.verdict_rows(tmp_path) == [
        "| geometric_shapes | reorder | dyn | plain | steps | 3 | 0.300 [0.200, 0.400] | -0.070 [-0.300, +0.200] | tie "
        "| +0.107 [+0.068, +0.145] | worse |",
        "| geometric_shapes | reorder | dyn | plain | work | 3 | 0.300 [0.200, 0.400] | -0.070 [-0.300, +0.200] | tie "
        "| - | - |"]
