"""``dynamic_lego`` end to end on the tiny model: a one-stage pipeline trains exactly as its own mode, a
five-stage pipeline (doremi weighing the domains beside a loss weigher) trains, records and reports every
stage, runs the same on one and two processes and resumes exactly after a kill; a doremi stage updates its
weights as dynamic_mix does; the original's presets load and its lego examples train."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import yaml

from support.helpers import REPO_ROOT, failure_report, kill_at_step, manifest

from dataflex.components_file import PACKAGED_COMPONENTS, build_component, load_components

ORIGINAL = REPO_ROOT / "examples" / "compat" / "pipelines.yaml"
EXAMPLES = REPO_ROOT / "examples" / "train_full" / "lego"
CPU = ["bf16=false", "deepspeed=null", "preprocessing_num_workers=1", "dataloader_num_workers=0", "template=default",
       "cutoff_len=48", "logging_steps=1", "save_steps=1000", "plot_loss=false", "per_device_train_batch_size=2",
       "gradient_accumulation_steps=2"]

# the packaged components plus the pipelines of these tests (stage steps small enough for a dozen steps)
PIPELINES = {
    "sel": [{"family": "selector", "component": "loss", "mode": "draw"}],
    "all4": [{"family": "weighter", "component": "loss", "warmup_step": 3},
             {"family": "reorder", "component": "dynamic_saw", "every": 2},
             {"family": "mixer", "component": "odm", "every": 4},
             {"family": "selector", "component": "loss", "mode": "filter", "keep_ratio": 0.5, "every": 6},
             {"family": "mixer", "component": "doremi_ref", "warmup_step": 2, "every": 3}],
    "dre": [{"family": "mixer", "component": "doremi_ref", "warmup_step": 4, "every": 4}],
}


def reference_model(tiny_model: Path, folder: Path) -> Path:
    """The tiny model with its weights nudged by seeded noise: per token it is a little better or worse
    than the model trained, so DoReMi's excess losses are neither all 0 nor alike across domains."""
    import torch
    from transformers import AutoModelForCausalLM

    if (folder / "config.json").exists():
        return folder
    model = AutoModelForCausalLM.from_pretrained(tiny_model)
    gen = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=gen) * 0.05 * (p.std() if p.numel() > 1 else 1.0))
    model.save_pretrained(folder)
    return folder


def components(folder: Path, reference: Path | None = None) -> Path:
    data = yaml.safe_load(PACKAGED_COMPONENTS.read_text())
    data["pipelines"] = {k: {"name": k, "params": {"stages": v}} for k, v in PIPELINES.items()
                         if reference is not None or k == "sel"}
    if reference is not None:
        data["mixers"]["doremi_ref"] = {"name": "doremi", "params": {"reference_model_path": str(reference)}}
    path = folder / "components.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def update_records(out: Path) -> dict[int, dict]:
    folder = Path(manifest(out)["records"])
    return {r["step"]: r for r in (json.loads(p.read_text()) for p in folder.glob("step_*.json"))}


def stage_records(out: Path, stage: str) -> dict[int, dict]:
    folder = Path(manifest(out)["records"]) / stage
    return {r["step"]: r for r in (json.loads(p.read_text()) for p in folder.glob("step_*.json"))}


def weight_lines(out: Path, stage: str) -> list[dict]:
    path = Path(manifest(out)["records"]) / stage / "weights.jsonl"
    return [json.loads(x) for x in path.read_text().splitlines() if x]


def adapter(out: Path) -> dict:
    from safetensors.torch import load_file

    return load_file(str(out / "adapter_model.safetensors"))


# ------------------------------------------------------------------------------------------ presets
def test_the_original_pipelines_load_and_the_packaged_file_holds_them(caplog):
    original = load_components(ORIGINAL)["pipelines"]
    packaged = load_components(PACKAGED_COMPONENTS)["pipelines"]
    assert sorted(original) == sorted(packaged) == ["hierarchical", "mix_then_weight", "select_only",
                                                    "select_then_reorder"]
    for key, spec in original.items():
        mine, theirs = build_component(packaged[key]), build_component(spec)
        assert [(s.label, s.mode, s.keep_ratio if s.mode == "filter" else None, s.warmup_step, s.every)
                for s in mine.stages] == \
               [(s.label, s.mode, s.keep_ratio if s.mode == "filter" else None, s.warmup_step, s.every)
                for s in theirs.stages], key
    hier = build_component(original["hierarchical"])
    assert [s.label for s in hier.stages] == ["selector:loss", "mixer:odm", "reorder:dynamic_saw", "weighter:loss"]
    assert hier.stages[0].built.params.scoring_batch_size == 8  # the original's score_batch_size


def test_list_shows_the_pipelines(run_cli):
    res = run_cli(["list"])
    assert res.returncode == 0, failure_report(res)
    for key in ("hierarchical", "select_then_reorder", "mix_then_weight", "select_only"):
        assert any(line.split()[:2] == ["pipeline", key] for line in res.stdout.splitlines()), key
    assert "Pipelines (train_type: dynamic_lego" in res.stdout


# ------------------------------------------------------------------------------------------ one stage
@pytest.mark.e2e
def test_a_one_stage_pipeline_trains_as_its_own_mode(make_train_yaml, run_cli, tmp_path):
    comps = components(tmp_path)
    base = {"max_samples": 40, "cutoff_len": 48, "components_cfg_file": str(comps)}
    lego = make_train_yaml(tmp_path / "lego", train_type="dynamic_lego", component_name="sel", **base)
    own = make_train_yaml(tmp_path / "own", train_type="dynamic_select", component_name="loss", **base)
    for path in (lego, own):
        res = run_cli(["train", path], timeout=300)
        assert res.returncode == 0, failure_report(res)
    a, b = update_records(tmp_path / "lego" / "out"), update_records(tmp_path / "own" / "out")
    assert sorted(a) == [0, 2, 4] and sorted(b) == [2, 4]  # the pipeline records its warm-up draw too
    assert [a[s]["indices"] for s in (2, 4)] == [b[s]["indices"] for s in (2, 4)]
    sel = stage_records(tmp_path / "lego" / "out", "stage-0-selector")
    assert sorted(sel) == [2, 4] and all(sel[s]["indices"] == b[s]["indices"] for s in (2, 4))
    assert sel[2]["per_sample"] == b[2]["per_sample"]  # the same scores
    ta, tb = adapter(tmp_path / "lego" / "out"), adapter(tmp_path / "own" / "out")
    assert sorted(ta) == sorted(tb) and all(ta[k].equal(tb[k]) for k in ta)


# ------------------------------------------------------------------------------------------ four stages
def _all4(make_train_yaml, folder: Path, comps: Path, **extra) -> Path:
    return make_train_yaml(folder, train_type="dynamic_lego", component_name="all4", components_cfg_file=str(comps),
                           dataset="demo_mix,demo_graded", max_samples=24, cutoff_len=48, warmup_step=2, update_step=2,
                           update_times=2, num_train_epochs=2.0, save_steps=4, **extra)


@pytest.fixture(scope="module")
def all4_runs(make_train_yaml, run_cli, tiny_model, tmp_path_factory):
    """Four index and loss stages plus doremi (a mixer weighing the domains' losses) on two domains (48 rows;
    two cycles of 6 steps of 4 rows): one process (2 x GA 2)."""
    tmp = tmp_path_factory.mktemp("all4")
    comps = components(tmp, reference_model(tiny_model, tmp / "reference"))
    res = run_cli(["train", _all4(make_train_yaml, tmp / "one", comps)], timeout=400)
    assert res.returncode == 0, failure_report(res)
    return tmp, comps, res


def alphas(out: Path, stage: str = "stage-3-mixer") -> dict[int, list[float]]:
    return {s: r["loss_weights"] for s, r in stage_records(out, stage).items()}


@pytest.mark.e2e
def test_a_five_stage_pipeline_records_every_stage(all4_runs):
    tmp, _, res = all4_runs
    out = tmp / "one" / "out"
    log = res.stdout + res.stderr
    assert "pipeline 'all4': stages written as reorder:dynamic_saw -> mixer:odm -> selector:loss run as " \
           "selector:loss -> mixer:odm -> reorder:dynamic_saw" in log
    updates = update_records(out)
    # cycles of 2 warm-up + 2 x 2 update steps over 12 steps: updates at 2, 4, 8, 10
    assert sorted(updates) == [0, 2, 4, 6, 8, 10]
    assert [updates[s]["kind"] for s in sorted(updates)] == ["warmup", "update", "update", "warmup", "update", "update"]
    acts = {s: [(t["label"], t["action"]) for t in updates[s]["stages"]] for s in (2, 4, 8, 10)}
    assert acts[2] == [("selector:loss", "decided"), ("mixer:odm", "decided"), ("reorder:dynamic_saw", "decided")]
    # step 4: the filter (every 6) keeps its pool, the mixer (every 4) is not due, the reorder (every 2) is: it
    # orders again the rows the mixer handed on; step 8: the filter is due, so every stage after it decides
    assert acts[4] == [("selector:loss", "kept"), ("mixer:odm", "kept"), ("reorder:dynamic_saw", "decided")]
    assert acts[8] == [(label, "decided") for label, _ in acts[2]]
    assert updates[2]["stages"][0]["rows_in"] == 48 and updates[2]["stages"][0]["rows_out"] == 24
    assert all(len(updates[s]["indices"]) == 8 for s in updates)  # 2 steps x 4 rows
    filt = stage_records(out, "stage-0-selector")
    mix = stage_records(out, "stage-1-mixer")
    order = stage_records(out, "stage-2-reorder")
    assert sorted(filt) == [2, 8] and sorted(mix) == [2, 8] and sorted(order) == [2, 4, 8, 10]
    for s in (2, 8):
        pool = set(filt[s]["indices"])
        assert len(pool) == 24 and set(mix[s]["indices"]) <= pool  # the mixer draws from the filter's pool
        assert sorted(order[s]["rows"]) == sorted(mix[s]["indices"])  # the reorder orders the mixer's rows
        assert updates[s]["indices"] == order[s]["rows"]  # and they are trained on in that order
        assert sum(mix[s]["counts"]) == 8 and mix[s]["domains"] == ["demo_mix", "demo_graded"]
    lines = weight_lines(out, "stage-4-weighter")
    assert [ln["step"] for ln in lines] == list(range(3, 12))  # the weighter from its warmup_step 3 on
    for ln in lines:  # each step's weights are over that step's rows
        step_rows = updates[max(s for s in updates if s <= ln["step"])]["indices"]
        offset = (ln["step"] - max(s for s in updates if s <= ln["step"])) * 4
        assert ln["indices"] == step_rows[offset: offset + 4]
    # doremi takes no rows (the update records list the index stages only); its α moves at its warmup_step 2
    # and every 3 steps after, from the excess losses over the reference model, as dynamic_mix records them
    assert all("mixer:doremi_ref" not in [t["label"] for t in updates[s]["stages"]] for s in updates)
    dre = stage_records(out, "stage-3-mixer")
    assert sorted(dre) == [2, 5, 8, 11]
    from dataflex.mixers.doremi import doremi_update

    import torch
    alpha = torch.tensor([0.5, 0.5], dtype=torch.float64)
    for s in sorted(dre):
        st = dre[s]["statistics"]
        lam = [e / t for e, t in zip(st["excess_sum"], st["tokens"])]
        assert dre[s]["summary"]["excess_loss"] == pytest.approx(lam, rel=1e-9)
        alpha = doremi_update(alpha, torch.tensor(lam, dtype=torch.float64), 1.0, 1e-3)
        assert dre[s]["loss_weights"] == pytest.approx(alpha.tolist(), rel=1e-9)
    assert st["tokens"][0] > 0 and st["tokens"][1] > 0 and lam[0] != lam[1] and min(lam) > 0
    saved = json.loads((out / "doremi_domain_weights.json").read_text())
    # α of the updates at 2, 5, 8 and 11, each in force until the next (11 until the end at 12): averaged
    avg = [(3 * sum(dre[s]["loss_weights"][d] for s in (2, 5, 8)) + dre[11]["loss_weights"][d]) / 10 for d in (0, 1)]
    assert saved["domains"] == ["demo_mix", "demo_graded"] and saved["steps_averaged"] == 10
    assert saved["weights"] == pytest.approx([a / sum(avg) for a in avg], rel=1e-9)


@pytest.mark.e2e
def test_a_pipeline_run_is_reported_stage_by_stage(all4_runs, run_cli, tmp_path):
    tmp, _, _ = all4_runs
    out = tmp / "one" / "out"
    res = run_cli(["report", out, "--html", tmp_path / "page.html"])
    assert res.returncode == 0, failure_report(res)
    text = res.stdout
    for line in ("  0. selector:loss, mode filter, keep 0.5, every 6 steps",
                 "  1. mixer:odm, takes the update's rows, every 4 steps",
                 "  2. reorder:dynamic_saw, every 2 steps",
                 "  3. mixer:doremi_ref, weighs the domains' losses, from step 2, every 3 steps",
                 "  4. weighter:loss, from step 3",
                 "Stage 0: selector:loss (loss), 2 record(s)",
                 "Stage 1: mixer:odm (odm), 2 record(s)",
                 "Stage 2: reorder:dynamic_saw (dynamic_saw), 4 record(s)",
                 "Stage 3: mixer:doremi_ref (doremi), 4 record(s)",
                 "  domains demo_mix, demo_graded; loss weights and excess losses per update:",
                 "Stage 4: weighter:loss (loss), 9 record(s)"):
        assert line in text, line
    assert "  step     4: selector:loss kept; mixer:odm kept; reorder:dynamic_saw decided 8->8 -> 8 rows" in text
    page = (tmp_path / "page.html").read_text()
    for sid in ("pipeline", "updates", "stage-0", "stage-1", "stage-2", "stage-3", "stage-4", "selections", "weights",
                "loss-weights", "excess-loss"):
        assert f'id="{sid}"' in page, sid


@pytest.mark.e2e
def test_one_and_two_processes_and_a_resumed_run_agree(all4_runs, make_train_yaml, run_cli):
    """Two processes (2 x GA 1 each) decide the same rows; a run killed at step 6 and resumed from
    checkpoint-4 alone (its records deleted) decides the same rows from step 4 on and ends on the same adapter."""
    tmp, comps, _ = all4_runs
    one = tmp / "one" / "out"
    res = run_cli(["train", _all4(make_train_yaml, tmp / "two", comps, gradient_accumulation_steps=1)],
                  env={"FORCE_TORCHRUN": "1", "NPROC_PER_NODE": "2"}, timeout=500)
    assert res.returncode == 0, failure_report(res)
    two = tmp / "two" / "out"
    a, b = update_records(one), update_records(two)
    assert sorted(a) == sorted(b) and all(a[s]["indices"] == b[s]["indices"] for s in a)
    ma, mb = stage_records(one, "stage-1-mixer"), stage_records(two, "stage-1-mixer")
    assert sorted(ma) == sorted(mb) == [2, 8]
    assert all(ma[s]["proportions"] == pytest.approx(mb[s]["proportions"], abs=1e-6) for s in ma)
    da, db = alphas(one), alphas(two)
    assert sorted(da) == sorted(db) == [2, 5, 8, 11]
    assert all(da[s] == pytest.approx(db[s], abs=1e-6) for s in da)
    wa, wb = weight_lines(one, "stage-4-weighter"), weight_lines(two, "stage-4-weighter")
    assert [w["indices"] for w in wa] == [w["indices"] for w in wb]
    assert [w["weights"] for w in wa] == [pytest.approx(w["weights"], abs=1e-4) for w in wb]

    crash = _all4(make_train_yaml, tmp / "crash", comps)
    kill_at_step(["train", crash], 6, tmp)
    out = tmp / "crash" / "out"
    shutil.rmtree(out / "dataflex")
    res = run_cli(["train", crash, f"resume_from_checkpoint={out / 'checkpoint-4'}"], timeout=400)
    assert res.returncode == 0, failure_report(res)
    c = update_records(out)
    assert sorted(c) == [4, 6, 8, 10] and all(c[s]["indices"] == a[s]["indices"] for s in c)
    assert [w["step"] for w in weight_lines(out, "stage-4-weighter")] == list(range(4, 12))
    assert [w["weights"] for w in weight_lines(out, "stage-4-weighter")] == [w["weights"] for w in wa[1:]]
    dc = alphas(out)  # doremi's α and the statistics since its update at step 2 came back from checkpoint-4
    assert sorted(dc) == [5, 8, 11] and all(dc[s] == da[s] for s in dc)
    assert json.loads((out / "doremi_domain_weights.json").read_text()) == \
        json.loads((one / "doremi_domain_weights.json").read_text())
    ta, tc = adapter(one), adapter(out)
    assert all(ta[k].equal(tc[k]) for k in ta)
    # the decisions' counted work (the loss stage's scoring and the reference model's forwards over every
    # trained row) is the same on one and two processes, and the resumed run counts on from checkpoint-4's
    work = [tuple(json.loads((d / "train_results.json").read_text())[f"dataflex_decision_tokens_{k}"]
                  for k in ("forward", "backward")) for d in (one, two, out)]
    assert work[0] == work[1] == work[2] and work[0][0] > 0


@pytest.mark.e2e
def test_a_doremi_stage_updates_its_weights_as_dynamic_mix(all4_runs, make_train_yaml, run_cli):
    """A pipeline of one doremi stage (a uniform draw takes the rows) against dynamic_mix doremi, at learning
    rate 0 so that the model stays as it starts: every stretch of 4 steps x 4 rows trains each of the 16 rows
    once in both runs, so the excess losses, and the weights α, agree update by update."""
    tmp, comps, _ = all4_runs
    common = dict(components_cfg_file=str(comps), dataset="demo_mix,demo_graded", max_samples=8, cutoff_len=48,
                  warmup_step=4, update_step=4, update_times=-1, max_steps=12, learning_rate=0.0)
    runs = {"lego": make_train_yaml(tmp / "dre", train_type="dynamic_lego", component_name="dre", **common),
            "mix": make_train_yaml(tmp / "mix", train_type="dynamic_mix", component_name="doremi_ref", **common)}
    for path in runs.values():
        res = run_cli(["train", path], timeout=300)
        assert res.returncode == 0, failure_report(res)
    lego, mix = alphas(tmp / "dre" / "out", "stage-1-mixer"), update_records(tmp / "mix" / "out")
    ups = {s: r for s, r in mix.items() if r["kind"] == "update"}
    assert sorted(lego) == sorted(ups) == [4, 8]
    for s in (4, 8):
        assert lego[s] == pytest.approx(ups[s]["loss_weights"], rel=1e-6)
    assert lego[8] != pytest.approx([0.5, 0.5], abs=1e-4)  # the weights moved
    a, b = (json.loads((tmp / d / "out" / "doremi_domain_weights.json").read_text()) for d in ("dre", "mix"))
    assert a["steps_averaged"] == b["steps_averaged"] == 8
    assert a["weights"] == pytest.approx(b["weights"], rel=1e-6)


# ------------------------------------------------------------------------------------------ the examples
def _work(tmp_path: Path, names: dict[str, str]) -> Path:
    """A folder to run from, with a data/ where the example's dataset names are the demo sets."""
    work = tmp_path / "work"
    shutil.copytree(REPO_ROOT / "data", work / "data")
    info = json.loads((work / "data" / "dataset_info.json").read_text())
    for name, demo in names.items():
        info[name] = info[demo]
    (work / "data" / "dataset_info.json").write_text(json.dumps(info))
    return work  # the examples' components_cfg_file (src/dataflex/configs/components.yaml) is the packaged file


@pytest.mark.e2e
@pytest.mark.parametrize("example, names, updates", [
    ("select_then_reorder_qwen_sft_full.yaml", {"alpaca_en_demo": "demo_mix"}, [12, 16]),
    ("hierarchical_qwen_sft_full.yaml", {"math": "demo_mix", "code": "demo_graded", "orca": "demo_add_eval"}, [12, 16]),
])
def test_the_original_lego_examples_train(example, names, updates, tiny_model, run_cli, tmp_path):
    """As written apart from the model, bf16, DeepSpeed and a CPU-sized batch and run (20 steps, an update every
    4 steps after a warm-up of 12, so the stages' own warm-ups of 10 steps end inside it)."""
    work = _work(tmp_path, names)
    out = tmp_path / "out"
    res = run_cli(["train", EXAMPLES / example, f"model_name_or_path={tiny_model}", f"output_dir={out}", *CPU,
                   "max_samples=20", "max_steps=20", "warmup_step=12", "update_step=4"], cwd=work, timeout=400)
    assert res.returncode == 0, failure_report(res)
    recs = update_records(out)
    assert [s for s in sorted(recs) if recs[s]["kind"] == "update"] == updates
    first = recs[updates[0]]["stages"]
    assert first[0]["label"] == "selector:loss" and first[0]["action"] == "decided"  # past its warmup_step 10
    assert first[-1]["label"] == "reorder:dynamic_saw" and first[-1]["action"] == "decided"


@pytest.mark.e2e
def test_a_rank_failing_inside_a_stage_ends_both_ranks_with_its_message(make_train_yaml, run_cli, tmp_path):
    """A loss-scoring forward that fails on rank 1 inside the pipeline's selector stage: both ranks stop, each
    with the one line that names the stage, the failing rank and the original error (bounded by the timeout)."""
    import re

    comps = components(tmp_path)
    cfg = make_train_yaml(tmp_path / "lego", train_type="dynamic_lego", component_name="sel", max_samples=40,
                          cutoff_len=48, components_cfg_file=str(comps), gradient_accumulation_steps=1)
    res = run_cli(["train", cfg], env={"FORCE_TORCHRUN": "1", "NPROC_PER_NODE": "2",
                                       "DATAFLEX_TEST_FAULT": "forward:1:1"}, timeout=300)
    assert res.returncode != 0
    pattern = (r"\[rank ([01])\] dataflex-cli: error: selection 1 at step 2 \(selector 'loss'\) failed on rank 1 "
               r"\(scoring losses, batch 1/2\): RuntimeError: injected forward fault on rank 1")
    assert sorted(re.findall(pattern, res.stderr)) == ["0", "1"], failure_report(res)
