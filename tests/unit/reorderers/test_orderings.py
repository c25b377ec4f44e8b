"""The data-organization paper's orderings (``shuffle`` ... ``saw``) and the original's ``reorders:`` presets.

Each pattern against a permutation worked out by hand, a property test that every ordering is a
permutation, the params' one-line errors, the presets loading unchanged, the round (epochs, step
counts, resume) with hand-made scores; end to end: the original's two example YAMLs train on the CPU,
one and two processes consume the same rows in the same order, a killed run resumes the same order.
"""

from __future__ import annotations

import json
import random
import shutil
from pathlib import Path

import pytest
import torch

from support.helpers import REPO_ROOT, failure_report, kill_at_step, manifest

from dataflex.components_file import ComponentSpec, build_component, get_component, load_components
from dataflex.core.records import RunLog
from dataflex.dist.agreement import Agreement
from dataflex.errors import ConfigError
from dataflex.modes.reorder import ReorderRound, ordering_steps, reorder_steps
from dataflex.reorderers import REORDERERS
from dataflex.reorderers.base import ReorderContext
from dataflex.reorderers.orderings import read_score_file, read_selection_metric
from dataflex.reorderers.patterns import PATTERNS, arrange, fold, transitions, zigzag

PACKAGED = REPO_ROOT / "src" / "dataflex" / "configs" / "components.yaml"
ORIGINAL_REORDERS = REPO_ROOT / "examples" / "compat" / "reorders.yaml"


def gen(seed=7):
    return torch.Generator().manual_seed(seed)


# =========================================================================== one pattern each, by hand
def test_shuffle_is_the_seeded_permutation_and_ignores_the_scores():
    assert arrange("shuffle", [5.0] * 8, gen()) == [7, 0, 3, 4, 1, 5, 2, 6]  # torch.randperm(8) under seed 7
    assert arrange("shuffle", [float(i) for i in range(8)], gen()) == [7, 0, 3, 4, 1, 5, 2, 6]


def test_sorting_is_the_score_axis():
    keys = [3.0, 1.0, 2.0, 0.0, 5.0, 4.0]
    assert arrange("sorting", keys, gen()) == [3, 1, 2, 0, 5, 4]
    assert arrange("sorting", keys, gen(), ascending=False) == [4, 5, 0, 2, 1, 3]
    assert arrange("sorting", [1.0, 0.0, 1.0, 0.0], gen()) == [1, 3, 0, 2]  # ties keep their input order


def test_folding_takes_every_lth_row_of_the_axis_in_l_sweeps():
    assert arrange("folding", list(range(9)), gen(), layers=3) == [0, 3, 6, 1, 4, 7, 2, 5, 8]
    assert fold(list(range(10)), 3) == [0, 3, 6, 9, 1, 4, 7, 2, 5, 8]  # uneven layers: 4, 3, 3
    keys = [8.0, 7.0, 6.0, 5.0, 4.0, 3.0]  # the axis is positions 5, 4, 3, 2, 1, 0
    assert arrange("folding", keys, gen(), layers=2) == [5, 3, 1, 4, 2, 0]


def test_zigzag_reverses_every_odd_sweep():
    assert arrange("zigzag", list(range(9)), gen(), layers=3) == [0, 3, 6, 7, 4, 1, 2, 5, 8]
    assert zigzag(list(range(7)), 2) == [0, 2, 4, 6, 5, 3, 1]
    assert zigzag(list(range(4)), 1) == [0, 1, 2, 3]


def test_segment_draws_its_front_and_back_from_the_chosen_ends():
    keys = [float(i) for i in range(10)]
    # 20 % front from the low end {0, 1}, 30 % back from the high end {7, 8, 9}, the rest between; each shuffled
    out = arrange("segment", keys, gen(), x_pct=20, y_pct=30, front_is_high=False, back_is_high=True)
    assert out == [1, 0, 4, 2, 6, 3, 5, 7, 9, 8]
    # both from the high end: the top 4 rows {6, 7, 8, 9} shared at random between front (2) and back (2)
    out = arrange("segment", keys, gen(), x_pct=20, y_pct=20, front_is_high=True, back_is_high=True)
    assert out == [9, 8, 1, 3, 5, 2, 4, 0, 7, 6]
    assert set(out[:2]) | set(out[-2:]) == {6, 7, 8, 9} and set(out[2:8]) == set(range(6))


def test_stair_and_saw_fold_or_zigzag_only_around_the_section_boundaries():
    # n = 12, 3 sections: boundaries 4 and 8; radius round(12 x 0.125) = 2: zones [2, 6) and [6, 10)
    stair = arrange("stair", list(range(12)), gen(), num_sections=3, folding_ratio=0.125, layers=2)
    assert stair == [0, 1, 2, 4, 3, 5, 6, 8, 7, 9, 10, 11]
    saw = arrange("saw", list(range(12)), gen(), num_sections=3, folding_ratio=0.125, layers=2)
    assert saw == [0, 1, 2, 4, 5, 3, 6, 8, 9, 7, 10, 11]
    # one section, or a zero radius: the plain axis
    assert transitions(list(range(6)), 1, 0.4, 2, zig=True) == list(range(6))
    assert transitions(list(range(6)), 2, 0.0, 2, zig=False) == list(range(6))


def test_jit_shuffles_inside_windows_only():
    out = arrange("sorting", [float(i) for i in range(7)], gen(), window_size=3)
    assert out == [0, 1, 2, 4, 3, 5, 6]
    out = arrange("folding", [float(i) for i in range(12)], gen(3), layers=2, window_size=4)
    plain = fold(list(range(12)), 2)
    assert [sorted(out[i:i + 4]) for i in (0, 4, 8)] == [sorted(plain[i:i + 4]) for i in (0, 4, 8)]


def test_every_ordering_is_a_permutation_over_sizes_and_parameters():
    rng = random.Random(0)
    for trial in range(400):
        n = rng.randrange(0, 60)
        keys = [float(rng.randrange(0, 5)) if rng.random() < 0.5 else rng.random() for _ in range(n)]
        sections = rng.randrange(1, 6)
        ratio = rng.uniform(0, 1 / (2 * sections) - 1e-6)
        x = rng.uniform(0, 100)
        kwargs = dict(ascending=rng.random() < 0.5, window_size=rng.choice([0, 1, 2, 5, 17]),
                      layers=rng.randrange(1, 7), num_sections=sections, folding_ratio=ratio, x_pct=x,
                      y_pct=rng.uniform(0, 100 - x), front_is_high=rng.random() < 0.5,
                      back_is_high=rng.random() < 0.5)
        for pattern in PATTERNS:
            out = arrange(pattern, keys, gen(trial), **kwargs)
            assert sorted(out) == list(range(n)), (pattern, n, kwargs)
            assert out == arrange(pattern, keys, gen(trial), **kwargs)  # seeded: the same twice


# =========================================================================== params
def build(name, **params):
    return REORDERERS[name](REORDERERS[name].Params.from_dict(name, params))


def test_polarity_and_its_aliases():
    keys = {0: 3.0, 1: 1.0, 2: 2.0, 3: 0.0}
    later = build("sorting", polarity="higher_is_better")
    earlier = build("sorting", polarity="lower_is_better")
    backwards = build("sorting", ascending=False)
    assert later.params.direction == "higher_later" and earlier.params.direction == "higher_earlier"
    results = [r.order(ctx_for(list(keys.values()), list(keys))).rows for r in (later, earlier, backwards)]
    assert results == [[3, 1, 2, 0], [0, 2, 1, 3], [0, 2, 1, 3]]


@pytest.mark.parametrize("name, params, message", [
    ("saw", {"polarity": "up"}, "param 'polarity' = 'up' is invalid; allowed: higher_later | higher_earlier"),
    ("saw", {"pattern_params": {"layer": 2}}, "param 'pattern_params.layer' = 2 is invalid; allowed: only the keys "
                                               "layers, num_sections"),
    ("saw", {"pattern_params": {"num_sections": 3, "folding_ratio": 0.2}},
     "param 'pattern_params.folding_ratio' = 0.2 is invalid; allowed: a number >= 0 below 1 / (2 num_sections)"),
    ("segment", {"pattern_params": {"x_pct": 60, "y_pct": 50}}, "param 'pattern_params.y_pct' = 50.0 is invalid; "
                                                                "allowed: at most 40"),
    ("folding", {"pattern_params": {"layers": 0}}, "param 'pattern_params.layers' = 0 is invalid"),
    ("folding", {"pattern_params": {"layers": 2, "folding_layer": 3}}, "param 'pattern_params.folding_layer' = 3"),
    ("dynamic_saw", {"consume_once": False}, "param 'consume_once' = False is invalid; allowed: true"),
    ("dynamic_saw", {"apply_at": "raw"}, "param 'apply_at' = 'raw' is invalid; allowed: index with kind: dynamic"),
    ("dynamic_saw", {"score_params": {"score_field": "x"}}, "param 'score_params.score_field' = 'x' is invalid; "
                                                            "allowed: with score_source: model_loss only the keys"),
    ("dynamic_saw", {"reorder_every": 0}, "param 'reorder_every' = 0 is invalid; allowed: an integer >= 1"),
    ("sorting", {"window_size": -1}, "param 'window_size' = -1 is invalid"),
    ("reuse_selector_scores", {"score_params": {}}, "param 'score_params.cache_path' = None is invalid"),
])
def test_bad_params_are_one_line_errors(name, params, message):
    with pytest.raises(ConfigError) as err:
        build(name, **params)
    assert message in str(err.value) and "\n" not in str(err.value) and f"component '{name}'" in str(err.value)


def test_the_layer_aliases_of_the_papers_code_are_layers():
    assert build("zigzag", pattern_params={"zigzag_layer": 4}).params.shape["layers"] == 4
    assert build("saw").params.shape == {"layers": 3, "num_sections": 2, "folding_ratio": 0.1, "x_pct": 10.0,
                                         "y_pct": 10.0, "front_is_high": False, "back_is_high": True}


# =========================================================================== the presets
def test_the_original_reorders_presets_load_unchanged_and_are_the_packaged_ones(tmp_path, monkeypatch):
    original = load_components(ORIGINAL_REORDERS)["reorderers"]
    assert sorted(original) == sorted(["sorting", "shuffle", "segment", "folding", "zigzag", "stair", "saw",
                                       "dynamic_saw", "dynamic_folding", "reuse_selector_scores"])
    packaged = load_components(PACKAGED)["reorderers"]
    assert {k: (s.name, s.params) for k, s in packaged.items() if k in original} == \
        {k: (s.name, s.params) for k, s in original.items()}
    assert {"static", "dynamic"} <= set(packaged)  # this project's own, beside them
    for key, spec in original.items():
        comp = build_component(spec)
        for param, value in spec.params.items():
            assert getattr(comp.params, param) == value, (key, param)
        assert comp.dynamic == (spec.params["kind"] == "dynamic")
    # the selector record the last one names is a placeholder: one line when it is chosen
    comp = build_component(original["reuse_selector_scores"])
    spec = original["reuse_selector_scores"]
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ConfigError, match=r"^component 'reuse_selector_scores': param 'score_params.cache_path' = "
                                          r"'../dataflex_saves/loss_output/step_10.json': no such file"):
        comp.check_config({"stage": "sft"}, spec)


def test_a_name_in_both_sections_is_refused(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("reorderers:\n  saw: {name: static}\nreorders:\n  saw: {name: saw}\n")
    with pytest.raises(ConfigError, match="component 'saw' is in both 'reorderers' and 'reorders'"):
        load_components(path)
    path.write_text("reorderers:\n  mine: {name: static}\nreorders:\n  saw: {name: saw}\n")
    assert get_component(path, "saw", "reorderers").name == "saw"
    assert sorted(load_components(path)["reorderers"]) == ["mine", "saw"]


# =========================================================================== score sources
class Losses:
    """A stand-in scorer: the loss of row i is table[i]; remembers what it was asked."""

    def __init__(self, table):
        self.table, self.asked = table, []

    def losses(self, dataset, rows, batch_size, desc=""):
        rows = list(rows)
        self.asked.append(rows)
        return torch.tensor([self.table[i] for i in rows], dtype=torch.float64)


def ctx_for(column, rows, number=0, scorer=None, step=0):
    return ReorderContext(step, number, list(rows), list(range(len(column))), scorer, gen(100 + number),
                          column=[float(v) for v in column])


def test_score_files_and_selection_records(tmp_path):
    import numpy as np

    np.save(tmp_path / "s.npy", np.array([[1.5, 2.0], [0.5, 3.0]]))
    assert read_score_file(tmp_path / "s.npy", "score") == [1.5, 2.0, 0.5, 3.0]
    (tmp_path / "s.jsonl").write_text('{"score": 2}\n\n{"score": 1.5}\n')
    assert read_score_file(tmp_path / "s.jsonl", "score") == [2.0, 1.5]
    (tmp_path / "s.json").write_text('{"metric": {"q": [1, 2]}}')
    assert read_score_file(tmp_path / "s.json", "q") == [1.0, 2.0]
    (tmp_path / "bad.jsonl").write_text('{"score": 2}\n{"other": 1}\n')
    with pytest.raises(ValueError, match=r"bad.jsonl:2 has no field 'score'"):
        read_score_file(tmp_path / "bad.jsonl", "score")
    # this project's record (per_sample) and the original's (metric); a repeated row keeps its first value
    (tmp_path / "mine.json").write_text(json.dumps({"indices": [4, 1, 4], "per_sample": {"loss": [0.5, 2.0, 0.7]}}))
    (tmp_path / "theirs.json").write_text(json.dumps({"indices": [3], "metric": {"loss": [1.25]}}))
    assert read_selection_metric(tmp_path / "mine.json", "loss") == {4: 0.5, 1: 2.0}
    assert read_selection_metric(tmp_path / "theirs.json", "loss") == {3: 1.25}
    with pytest.raises(ValueError, match="has no per-sample 'grad'; it has: loss"):
        read_selection_metric(tmp_path / "mine.json", "grad")


def test_cached_selection_orders_by_the_record_and_fills_the_rest(tmp_path):
    (tmp_path / "step_10.json").write_text(json.dumps({"indices": [0, 2, 5], "per_sample": {"loss": [3.0, 1.0, 2.0]}}))
    comp = build("reuse_selector_scores", pattern="sorting",
                 score_params={"cache_path": str(tmp_path / "step_10.json"), "metric_key": "loss", "fill_value": 9})
    spec = ComponentSpec("reuse", "reorderers", "reuse_selector_scores", {}, tmp_path / "components.yaml")
    comp.check_config({}, spec)
    comp.check_data(6, None)
    with pytest.raises(ConfigError, match="row 5 is not a row of this training set"):
        comp.check_data(5, None)
    res = comp.order(ctx_for([0] * 6, [0, 1, 2, 3, 4, 5]))
    assert res.rows == [2, 5, 0, 1, 3, 4] and res.scores == [1.0, 2.0, 3.0, 9.0, 9.0, 9.0]


def test_a_score_file_must_have_one_score_per_row(tmp_path):
    (tmp_path / "q.json").write_text("[3, 1, 2]")
    comp = build("sorting", score_params={"score_path": str(tmp_path / "q.json")})
    assert comp.column is None and build("sorting").column == "score"
    assert build("shuffle").column is None  # reads no score: the rows need no score field
    assert build("shuffle").order(ReorderContext(0, 0, [0, 1, 2], [0, 1, 2], None, gen())).scores == [None] * 3
    spec = ComponentSpec("sorting", "reorderers", "sorting", {}, tmp_path / "components.yaml")
    comp.check_config({}, spec)
    with pytest.raises(ConfigError, match=r"3 scores for 4 dataset rows as read; allowed: exactly one score per row"):
        comp.check_data(4, None)
    assert comp.order(ctx_for([0, 0, 0], [0, 1, 2])).rows == [1, 2, 0]


def test_model_loss_scores_a_seeded_subset_and_orders_the_rest_at_the_median():
    table = {i: float(i % 5) for i in range(10)}
    comp = build("dynamic_saw", pattern="sorting", score_params={"max_samples": 4, "seed": 1})
    scorer = Losses(table)
    res = comp.order(ctx_for([0] * 10, range(10), scorer=scorer))
    (asked,) = scorer.asked
    assert len(asked) == 4 and asked == sorted(asked)
    median = sorted(table[i] for i in asked)[1:3]
    assert res.scores.count(None) == 6
    keys = [table[r] if s is not None else sum(median) / 2 for r, s in zip(res.rows, res.scores)]
    assert keys == sorted(keys)  # the unscored rows sit at the median of the scored ones


def test_reorder_every_keeps_the_order_between_rescorings():
    table = {i: float((i * 7) % 10) for i in range(10)}
    comp = build("dynamic_folding", reorder_every=2, pattern_params={"layers": 2})
    scorer = Losses(table)
    first = comp.order(ctx_for([0] * 10, range(10), 0, scorer))
    assert first.rows == fold(sorted(range(10), key=lambda i: table[i]), 2)
    left = first.rows[4:]
    second = comp.order(ctx_for([0] * 10, left, 1, scorer))
    assert second.rows == left and second.summary["rescored"] is False and len(scorer.asked) == 1
    assert second.scores == [table[r] for r in left]  # the scores it was last ordered by
    third = comp.order(ctx_for([0] * 10, left, 2, scorer))
    assert len(scorer.asked) == 2 and third.summary["rescored"] is True


# =========================================================================== the round: epochs, steps, resume
def _round(comp, column, g, total, warmup, at, tmp, seed=3, scorer=None):
    n = len(column)

    def context(step, number, rows):
        return ReorderContext(step, number, rows, list(range(n)), scorer, torch.Generator().manual_seed(
            seed * 1000 + number), column=[float(v) for v in column])

    return ReorderRound(comp, n, g, total, warmup, at, context, Agreement(), RunLog(tmp, "run"), seed, "c")


@pytest.mark.parametrize("name, params", [
    ("saw", {"pattern_params": {"num_sections": 3, "folding_ratio": 0.1, "layers": 2}}),
    ("zigzag", {"window_size": 3}),
    ("segment", {"seed": 5}),
    ("shuffle", {}),
])
def test_a_static_ordering_consumes_every_row_once_per_epoch_in_its_pattern(name, params, tmp_path):
    column = [float((i * 37) % 23) for i in range(23)]
    comp = build(name, **params)
    total = reorder_steps(23, 4, 2.0, -1, None)
    assert total == 12  # ceil(23 x 2 / 4)
    rnd = _round(comp, column, 4, total, 0, ordering_steps(False, 0, None, None, total), tmp_path)
    stream = [i for s in range(total) for i in rnd.rows(s)]
    assert len(stream) == 48 and sorted(stream[:23]) == list(range(23)) and sorted(stream[23:46]) == list(range(23))
    if name in ("saw",):  # no randomness left but ties: the scores follow the pattern exactly
        expect = [sorted(column)[q] for q in arrange("saw", sorted(column), gen(), **comp.params.shape)]
        assert [column[i] for i in stream[:23]] == expect == [column[i] for i in stream[23:46]]


def test_a_restored_round_continues_the_same_dynamic_order(tmp_path):
    table = {i: float((i * 13) % 17) + i / 100 for i in range(30)}
    column = [0.0] * 30

    def run(stop=None, state=None, folder="a"):
        comp = build("dynamic_saw", pattern_params={"num_sections": 2, "folding_ratio": 0.2, "layers": 2})
        total = reorder_steps(30, 4, 2.0, -1, None)
        rnd = _round(comp, column, 4, total, 1, ordering_steps(True, 1, 3, None, total), tmp_path / folder,
                     scorer=Losses(table))
        start = 0
        if state is not None:
            rnd.load_state_dict(json.loads(json.dumps(state)))
            start = state["next_step"]
        return rnd, [rnd.rows(s) for s in range(start, stop or total)]

    _, full = run()
    stream = [i for rows in full for i in rows]
    assert len(full) == 15 and sorted(stream[:30]) == list(range(30)) and len(set(stream[30:])) == 30
    part, _ = run(stop=8, folder="b")
    _, rest = run(state=part.state_dict(), folder="c")
    assert rest == full[8:]


# =========================================================================== end to end
def order_lines(out):
    return [json.loads(x) for x in (Path(manifest(out)["records"]) / "order.jsonl").read_text().splitlines() if x]


def _scored_alpaca(work: Path) -> list[float]:
    """The run's data folder, with alpaca_en_demo replaced by demo_graded scored by its difficulty plus a
    distinct fraction (so no two rows tie); returns the scores."""
    shutil.copytree(REPO_ROOT / "data", work / "data")
    rows = json.loads((REPO_ROOT / "data" / "demo_graded.json").read_text())
    scores = [r["difficulty"] + (i * 37 % len(rows)) / 1000 for i, r in enumerate(rows)]
    scored = [{k: v for k, v in r.items() if k != "difficulty"} | {"score": s} for r, s in zip(rows, scores)]
    (work / "data" / "alpaca_en_demo.json").write_text(json.dumps(scored))
    return scores


EXAMPLES = REPO_ROOT / "examples" / "train_full" / "reorder"
CPU = ["bf16=false", "deepspeed=null", "preprocessing_num_workers=1", "dataloader_num_workers=0", "template=default",
       "cutoff_len=64", "logging_steps=1", "save_steps=1000", "plot_loss=false", "per_device_train_batch_size=4",
       "gradient_accumulation_steps=2"]


@pytest.mark.e2e
def test_the_original_static_saw_yaml_trains_in_saw_order(tiny_model, run_cli, tmp_path):
    work = tmp_path / "work"
    score = _scored_alpaca(work)
    out = tmp_path / "out"
    res = run_cli(["train", EXAMPLES / "saw_qwen_sft_full.yaml", f"model_name_or_path={tiny_model}",
                   f"output_dir={out}", *CPU, "warmup_step=0"], cwd=work, timeout=300)
    assert res.returncode == 0, failure_report(res)
    assert "update_step, update_times: ignored with reorderer 'saw'" in res.stderr + res.stdout
    lines = order_lines(out)
    assert [ln["step"] for ln in lines] == list(range(12))  # ceil(96 / 8): one epoch
    stream = [i for ln in lines for i in ln["indices"]]
    assert sorted(stream) == list(range(96))
    axis = sorted(score)  # SAW-3, layers 2, radius round(96 x 0.075) = 7 around rows 32 and 64
    expect = [axis[q] for q in arrange("saw", axis, gen(), num_sections=3, folding_ratio=0.075, layers=2)]
    assert [score[i] for i in stream] == expect
    assert expect != axis  # the transition zones really are zigzagged
    assert all(s == score[i] for ln in lines for i, s in zip(ln["indices"], ln["scores"]))


def _dyn_config(make_train_yaml, folder, **extra):
    cfg = {"train_type": "dynamic_reorder", "dataset": "demo_graded", "max_samples": None, "cutoff_len": 64,
           "per_device_train_batch_size": 4, "gradient_accumulation_steps": 2, "logging_steps": 1, "warmup_step": 2,
           "update_step": 3, "update_times": None, "num_train_epochs": 1.0, "save_steps": 4,
           "component_name": "dynamic_saw",
           "components_cfg_file": "src/dataflex/configs/components.yaml", **extra}
    return make_train_yaml(folder, **cfg)


@pytest.fixture(scope="module")
def dynamic_saw_runs(make_train_yaml, run_cli, tmp_path_factory):
    """dynamic_saw, one epoch of demo_graded: one process (4 x GA 2), two (4 x GA 1), and one killed at step 10
    and resumed from checkpoint-8 with its records deleted."""
    tmp = tmp_path_factory.mktemp("dynsaw")
    one = _dyn_config(make_train_yaml, tmp / "one")
    res = run_cli(["train", one], timeout=300)
    assert res.returncode == 0, failure_report(res)
    two = _dyn_config(make_train_yaml, tmp / "two", gradient_accumulation_steps=1)
    res = run_cli(["train", two], env={"FORCE_TORCHRUN": "1", "NPROC_PER_NODE": "2"}, timeout=400)
    assert res.returncode == 0, failure_report(res)
    crash = _dyn_config(make_train_yaml, tmp / "crash")
    kill_at_step(["train", crash], 10, tmp)
    out = tmp / "crash" / "out"
    shutil.rmtree(out / "dataflex")
    res = run_cli(["train", crash, f"resume_from_checkpoint={out / 'checkpoint-8'}"], timeout=300)
    assert res.returncode == 0, failure_report(res)
    return tmp


@pytest.mark.e2e
def test_one_and_two_processes_consume_the_same_rows_in_the_same_dynamic_saw_order(dynamic_saw_runs):
    a, b = order_lines(dynamic_saw_runs / "one" / "out"), order_lines(dynamic_saw_runs / "two" / "out")
    assert [ln["step"] for ln in a] == list(range(12))
    assert [ln["indices"] for ln in a] == [ln["indices"] for ln in b]
    stream = [i for ln in a for i in ln["indices"]]
    assert sorted(stream) == list(range(96))  # one epoch, every row once
    # after each re-scoring the rows left follow SAW over the losses it recorded
    records = {json.loads(p.read_text())["step"]: json.loads(p.read_text())
               for p in Path(manifest(dynamic_saw_runs / "one" / "out")["records"]).glob("step_*.json")}
    assert sorted(records) == [2, 5, 8, 11]
    rec = records[2]
    axis = sorted(rec["scores"])
    expect = [axis[q] for q in arrange("saw", axis, gen(), num_sections=3, folding_ratio=0.075, layers=2)]
    assert rec["scores"] == expect and rec["summary"]["pattern"] == "saw" and len(rec["rows"]) == 80


@pytest.mark.e2e
def test_a_killed_dynamic_saw_run_resumes_the_same_order(dynamic_saw_runs):
    a, b = order_lines(dynamic_saw_runs / "one" / "out"), order_lines(dynamic_saw_runs / "crash" / "out")
    assert [ln["step"] for ln in b] == [8, 9, 10, 11]
    assert [ln["indices"] for ln in a[8:]] == [ln["indices"] for ln in b]


@pytest.mark.e2e
def test_the_original_dynamic_saw_yaml_trains(tiny_model, run_cli, tmp_path):
    work = tmp_path / "work"
    shutil.copytree(REPO_ROOT / "data", work / "data")
    shutil.copy(REPO_ROOT / "data" / "demo_mix_train.json", work / "data" / "alpaca_en_demo.json")
    out = tmp_path / "out"
    res = run_cli(["train", EXAMPLES / "dynamic_saw_qwen_sft_full.yaml", f"model_name_or_path={tiny_model}",
                   f"output_dir={out}", *CPU, "max_samples=48", "warmup_step=1", "update_step=2"], cwd=work,
                  timeout=300)
    assert res.returncode == 0, failure_report(res)
    lines = order_lines(out)
    assert [ln["step"] for ln in lines] == list(range(6))  # ceil(48 / 8)
    assert sorted(i for ln in lines for i in ln["indices"]) == list(range(48))
    assert "ordering 1 at step 1 by 'dynamic_saw'" in res.stderr + res.stdout
