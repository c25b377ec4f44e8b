"""``train_type: dynamic_reorder``: the order rows are consumed in (static and dynamic reorderers).

Unit tests drive the round with hand-made scores (pacing formulas, permutations, resume); the end-to-end
tests train the tiny model through ``dataflex-cli`` on 1 and 2 processes, kill and resume a run, and
check the one-line errors.
"""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import pytest
import torch

from conftest import REPO_ROOT, failure_report, kill_at_step, manifest, traces

from dataflex.core.records import RunLog
from dataflex.dist.agreement import Agreement
from dataflex.errors import ConfigError
from dataflex.modes.reorder import ReorderRound, ordering_steps, reorder_steps
from dataflex.reorderers.base import OrderResult, ReorderContext, Reorderer, sort_rows
from dataflex.reorderers.dynamic import DynamicParams, DynamicReorderer, pool_of
from dataflex.reorderers.static import StaticParams, StaticReorderer, competence
from dataflex.seeding import seeded_generator


# =========================================================================== the formulas
def test_competence_hand_computed():
    # root: c(t) = min(1, sqrt(t (1 - c0^2) / T + c0^2))
    assert competence("root", 0, 10, 0.1) == pytest.approx(0.1)
    assert competence("root", 5, 10, 0.1) == pytest.approx(math.sqrt(0.5 * 0.99 + 0.01))  # 0.71063
    assert competence("root", 10, 10, 0.1) == pytest.approx(1.0)
    assert competence("root", 30, 10, 0.1) == 1.0  # clamped
    # linear: c0 + t (1 - c0) / T
    assert competence("linear", 3, 10, 0.2) == pytest.approx(0.2 + 0.3 * 0.8)
    # step: four equal stairs from 0.2 to 1 at t = 0, 2.5, 5, 7.5, 10
    assert [competence("step", t, 10, 0.2, 4) for t in (0, 2, 3, 5, 7, 8, 10)] == pytest.approx(
        [0.2, 0.2, 0.4, 0.6, 0.6, 0.8, 1.0])
    assert competence("none", 0, 10, 0.1) == 1.0


def test_sort_rows_breaks_ties_by_a_seeded_shuffle_and_puts_unscored_rows_last():
    rows = [10, 11, 12, 13, 14, 15]
    scores = [2.0, 1.0, None, 1.0, float("nan"), 3.0]
    a = sort_rows(rows, scores, False, seeded_generator(1, "t"))
    b = sort_rows(rows, scores, False, seeded_generator(1, "t"))
    assert a == b  # seeded
    assert set(a[:2]) == {11, 13} and a[2:4] == [10, 15] and set(a[4:]) == {12, 14}
    d = sort_rows(rows, scores, True, seeded_generator(1, "t"))
    assert d[:2] == [15, 10] and set(d[2:4]) == {11, 13}
    ties = {tuple(sort_rows(rows[:4], [1.0] * 4, False, seeded_generator(s, "t"))) for s in range(20)}
    assert len(ties) > 1  # ties really are shuffled, not kept in input order


def test_step_counts():
    assert reorder_steps(10, 4, 1.0, -1, None) == 3  # ceil(10 / 4)
    assert reorder_steps(10, 4, 2.5, -1, None) == 7  # ceil(25 / 4)
    assert reorder_steps(96, 8, 1.5, -1, None) == 18
    assert reorder_steps(10, 4, 1.0, 5, None) == 5 and reorder_steps(10, 4, 1.0, -1, 9) == 9
    assert ordering_steps(False, 2, None, None, 12) == [2]
    assert ordering_steps(True, 2, 4, None, 12) == [2, 6, 10]  # unset: until the run ends
    assert ordering_steps(True, 2, 4, -1, 12) == [2, 6, 10]
    assert ordering_steps(True, 0, 3, 2, 12) == [0, 3]
    assert ordering_steps(True, 12, 3, None, 12) == []


# =========================================================================== the round
class Column(Reorderer):
    """A static reorderer over given scores (no model)."""

    name = "column-test"

    def __init__(self, values, descending=False, pace=None):
        super().__init__(StaticParams(score="column", column="x"))
        self.values, self.descending, self.pace = values, descending, pace

    def order(self, ctx):
        rows = sort_rows(ctx.rows, [self.values[i] for i in ctx.rows], self.descending, ctx.generator)
        return OrderResult(rows, [self.values[i] for i in rows])

    def competence(self, t, steps):
        return None if self.pace is None else competence("root", t, self.pace, 0.25)


class LossLike(Column):
    """A dynamic reorderer whose scores change with the number of the ordering (as losses do)."""

    dynamic = True

    def order(self, ctx):
        scores = [((i * 7 + 3 * ctx.number) % 11) for i in ctx.rows]
        rows = sort_rows(ctx.rows, scores, False, ctx.generator)
        by = dict(zip(ctx.rows, scores))
        return OrderResult(rows, [by[i] for i in rows])


def _round(comp, n, g, total, warmup, at, tmp, seed=3):
    log = RunLog(tmp, "run")

    def context(step, number, rows):
        return ReorderContext(step, number, rows, list(range(n)), None, seeded_generator(seed, "reorder", number))

    r = ReorderRound(comp, n, g, total, warmup, at, context, Agreement(), log, seed, "c")
    return r


def test_without_pacing_every_epoch_is_a_permutation_and_follows_the_scores(tmp_path):
    n, g = 10, 4
    values = [5, 3, 9, 1, 7, 2, 8, 0, 6, 4]
    total = reorder_steps(n, g, 2.0, -1, None)  # 5 steps, 20 rows: exactly two epochs
    r = _round(Column(values), n, g, total, 1, [1], tmp_path)
    stream = [i for s in range(total) for i in r.rows(s)]
    assert len(stream) == 20
    first, second = stream[:10], stream[10:]
    assert sorted(first) == list(range(10)) and sorted(second) == list(range(10))  # none dropped, none repeated
    rest = first[g:]  # after the one warm-up step: the rows left, by score
    assert [values[i] for i in rest] == sorted(values[i] for i in rest)
    assert [values[i] for i in second] == list(range(10))  # the next epoch in the stored score order
    lines = [json.loads(x) for x in (tmp_path / "run" / "order.jsonl").read_text().splitlines()]
    assert [ln["step"] for ln in lines] == list(range(5)) and lines[0]["scores"] == [None] * 4
    assert [ln["epoch"] for ln in lines] == [0, 0, 0, 1, 1]  # the epoch a step starts in: step 2 takes rows 8-9 of
    assert [ln["position"] for ln in lines] == [0, 4, 8, 2, 6]  # epoch 0 and rows 0-1 of epoch 1
    assert r.rows(4) == lines[4]["indices"]  # asking again for the same step gives the same rows


def test_a_dynamic_reorder_keeps_consumed_rows_and_reorders_the_rest(tmp_path):
    n, g = 12, 2
    r = _round(LossLike([0] * n), n, g, 12, 1, [1, 3, 5], tmp_path)
    got = [r.rows(s) for s in range(6)]
    stream = [i for rows in got for i in rows]
    assert sorted(stream) == list(range(12))  # one epoch: a permutation
    records = {int(p.stem.split("_")[1]): json.loads(p.read_text()) for p in (tmp_path / "run").glob("step_*.json")}
    assert sorted(records) == [1, 3, 5]
    for step, rec in records.items():
        assert rec["consumed_before"] == 2 * step and sorted(rec["rows"]) == sorted(stream[2 * step:])
        assert rec["rows"][:2] == got[step]  # the step right after an ordering takes its first rows
        scores = [s for s in rec["scores"]]
        assert scores == sorted(scores)


def test_pacing_draws_only_from_the_available_share(tmp_path):
    n, g, total = 40, 4, 12
    values = list(range(n))[::-1]  # row 39 is the easiest
    r = _round(Column(values, pace=8), n, g, total, 2, [2], tmp_path)
    ranked = None
    for s in range(total):
        rows = r.rows(s)
        if s < 2:
            continue
        ranked = ranked or r.ranked
        c = competence("root", s - 2, 8, 0.25)
        avail = math.ceil(c * n - 1e-9)
        assert all(ranked.index(i) < avail for i in rows), (s, rows)
        assert len(set(rows)) == g  # without replacement inside a step
    assert ranked[:3] == [39, 38, 37]
    lines = [json.loads(x) for x in (tmp_path / "run" / "order.jsonl").read_text().splitlines()]
    assert lines[2]["available"] == 10 and lines[2]["competence"] == pytest.approx(0.25)
    assert lines[-1]["available"] == 40


@pytest.mark.parametrize("comp, at", [(lambda: Column([3, 1, 2, 0, 5, 4, 7, 6, 9, 8]), [2]),
                                      (lambda: LossLike([0] * 10), [2, 5, 8]),
                                      (lambda: Column(list(range(10)), pace=4), [2])])
def test_a_round_restored_from_its_state_continues_exactly(comp, at, tmp_path):
    n, g, total = 10, 3, 14
    ref = _round(comp(), n, g, total, 2, at, tmp_path / "a")
    want = [ref.rows(s) for s in range(total)]
    first = _round(comp(), n, g, total, 2, at, tmp_path / "b")
    for s in range(6):
        first.rows(s)
    state = json.loads(json.dumps(first.state_dict()))  # through JSON, as in the checkpoint
    again = _round(comp(), n, g, total, 2, at, tmp_path / "c")
    again.load_state_dict(state)
    assert [again.rows(s) for s in range(6, total)] == want[6:]
    with pytest.raises(RuntimeError, match="step 14 is next"):
        again.rows(3)


def test_the_dynamic_candidate_pool_is_a_seeded_subset_in_row_order():
    rows = [9, 4, 7, 1, 8, 2]
    assert pool_of(rows, None, seeded_generator(0)) == rows
    sub = pool_of(rows, 3, seeded_generator(0))
    assert len(sub) == 3 and [rows.index(i) for i in sub] == sorted(rows.index(i) for i in sub)
    assert pool_of(rows, 0.5, seeded_generator(0)) == sub  # 0.5 x 6 = 3, the same draw
    assert pool_of(rows, 10, seeded_generator(0)) == rows


class _Scorer:
    def __init__(self, losses):
        self.losses_ = losses

    def losses(self, dataset, indices, batch_size=16, desc=""):
        return torch.tensor([self.losses_[i] for i in indices], dtype=torch.float64)


def test_the_dynamic_reorderer_puts_its_scored_pool_first_and_keeps_the_rest_in_place():
    losses = [0.5, 0.1, float("nan"), 0.9, 0.3, 0.7]
    comp = DynamicReorderer(DynamicParams.from_dict("d", {"candidate_pool": 4}))
    ctx = ReorderContext(5, 1, [5, 0, 3, 2, 1, 4], list(range(6)), _Scorer(losses), seeded_generator(1, "x"))
    pool = pool_of(ctx.rows, 4, seeded_generator(1, "x"))
    out = comp.order(ReorderContext(5, 1, ctx.rows, ctx.train_dataset, ctx.scorer, seeded_generator(1, "x")))
    scored = [i for i in pool if not math.isnan(losses[i])]
    assert out.rows[:len(scored)] == sorted(scored, key=lambda i: losses[i])
    assert out.rows[len(pool):] == [i for i in ctx.rows if i not in pool]
    assert out.scores[:len(scored)] == [losses[i] for i in out.rows[:len(scored)]]


def test_the_static_reorderer_scores_once_and_keeps_the_scores_in_its_state():
    comp = StaticReorderer(StaticParams.from_dict("s", {"score": "loss", "order": "descending"}))
    ctx = ReorderContext(3, 0, [0, 1, 2, 3], list(range(4)), _Scorer([0.2, 0.8, 0.5, 0.1]), seeded_generator(0))
    assert comp.order(ctx).rows == [1, 2, 0, 3]
    comp2 = StaticReorderer(comp.params)
    comp2.load_state_dict(json.loads(json.dumps(comp.state_dict())))
    ctx2 = ReorderContext(9, 1, [3, 0], list(range(4)), None, seeded_generator(0))  # no scorer: not re-scored
    assert comp2.order(ctx2).rows == [0, 3] and comp2.scored_at == 3


@pytest.mark.parametrize("cls, params, key", [
    (StaticParams, {"score": "column"}, "column"),
    (StaticParams, {"column": "difficulty"}, "column"),
    (StaticParams, {"c0": 0.0}, "c0"),
    (StaticParams, {"c0": 1.5}, "c0"),
    (StaticParams, {"pacing_steps": 0}, "pacing_steps"),
    (StaticParams, {"stages": 0}, "stages"),
    (StaticParams, {"pacing": "sqrt"}, "pacing"),
    (StaticParams, {"order": "random"}, "order"),
    (DynamicParams, {"candidate_pool": 0}, "candidate_pool"),
    (DynamicParams, {"candidate_pool": 1.5}, "candidate_pool"),
    (DynamicParams, {"scoring_batch_size": 0}, "scoring_batch_size"),
])
def test_bad_params_are_one_line_errors(cls, params, key):
    with pytest.raises(ConfigError) as err:
        cls.from_dict("r", params)
    msg = str(err.value)
    assert f"param '{key}'" in msg and "\n" not in msg and ("allowed" in msg or "expected" in msg)


# =========================================================================== end to end
BASE = {"train_type": "dynamic_reorder", "dataset": "demo_graded", "max_samples": None, "cutoff_len": 64,
        "per_device_train_batch_size": 4, "gradient_accumulation_steps": 2, "logging_steps": 1, "warmup_step": 2,
        "update_step": None, "update_times": None}


def _components(folder: Path) -> Path:
    path = folder / "components.yaml"
    folder.mkdir(parents=True, exist_ok=True)
    path.write_text("reorderers:\n"
                    "  graded: {name: static, params: {score: column, column: difficulty}}\n"
                    "  paced: {name: static, params: {score: length, pacing: linear, c0: 0.25, pacing_steps: 6}}\n"
                    "  dyn: {name: dynamic, params: {candidate_pool: 0.5, scoring_batch_size: 8}}\n"
                    "  bad_column: {name: static, params: {score: column, column: level}}\n"
                    "  text_column: {name: static, params: {score: column, column: task}}\n")
    return path


def _config(make_train_yaml, folder, component, **extra):
    cfg = {**BASE, "component_name": component, "components_cfg_file": str(_components(Path(folder))), **extra}
    return make_train_yaml(folder, **cfg)


def order_lines(out):
    return [json.loads(x) for x in (Path(manifest(out)["records"]) / "order.jsonl").read_text().splitlines() if x]


def _flat(lines):
    """Every recorded score of the lines, in order (NaN for a row not yet scored)."""
    return [float("nan") if s is None else s for ln in lines for s in ln["scores"]]


def _by_step(folder, rank=None):
    """{step: rows trained on, over all ranks in the order a distributed sampler lays them out}."""
    per_rank = traces(folder)
    out = {}
    for rank, lines in sorted(per_rank.items()):
        for ln in lines:
            out.setdefault(ln["step"], {}).setdefault(rank, []).append(ln["indices"])
    return {s: [i for m in range(len(v[0])) for r in sorted(v) for i in v[r][m]] for s, v in out.items()}


@pytest.fixture(scope="module")
def graded_runs(make_train_yaml, run_cli, tmp_path_factory):
    """static by a difficulty column, 1.5 epochs: one process (4 x GA 2) and two (4 x GA 1), same global batch."""
    tmp = tmp_path_factory.mktemp("graded")
    one = _config(make_train_yaml, tmp / "one", "graded", num_train_epochs=1.5, plot_loss=True)
    two = _config(make_train_yaml, tmp / "two", "graded", num_train_epochs=1.5, gradient_accumulation_steps=1,
                  per_device_train_batch_size=4)
    r1 = run_cli(["train", one], env={"DATAFLEX_TRACE_DIR": tmp / "trace1"}, timeout=300)
    assert r1.returncode == 0, failure_report(r1)
    r2 = run_cli(["train", two], env={"FORCE_TORCHRUN": "1", "NPROC_PER_NODE": "2", "DATAFLEX_TRACE_DIR": tmp / "trace2"},
                 timeout=400)
    assert r2.returncode == 0, failure_report(r2)
    return tmp, r1


@pytest.mark.e2e
def test_a_column_curriculum_consumes_every_row_once_per_epoch_easy_first(graded_runs):
    tmp, res = graded_runs
    out = tmp / "one" / "out"
    rows = json.loads((REPO_ROOT / "data" / "demo_graded.json").read_text())
    lines = order_lines(out)
    assert [ln["step"] for ln in lines] == list(range(18))  # ceil(96 x 1.5 / 8)
    stream = [i for ln in lines for i in ln["indices"]]
    assert sorted(stream[:96]) == list(range(96))  # epoch 0: every row exactly once
    assert len(set(stream[96:])) == 48  # half of epoch 1, no row twice
    difficulty = [rows[i]["difficulty"] for i in stream]
    assert difficulty[16:96] == sorted(difficulty[16:96])  # after the 2 warm-up steps: easy to hard
    assert difficulty[96:] == sorted(difficulty[96:]) and difficulty[96] == 1  # epoch 1 starts easy again
    assert all(s == rows[i]["difficulty"] for ln in lines[2:] for i, s in zip(ln["indices"], ln["scores"]))
    assert _by_step(tmp / "trace1") == {ln["step"]: ln["indices"] for ln in lines}  # trained on what was recorded
    state = json.loads((out / "trainer_state.json").read_text())
    assert state["global_step"] == 18
    assert (out / "dataflex_order.png").stat().st_size > 1000
    assert "ordering 1 at step 2 by 'static'" in res.stderr + res.stdout


@pytest.mark.e2e
def test_one_and_two_processes_consume_the_same_rows_in_the_same_order(graded_runs):
    tmp, _ = graded_runs
    a, b = order_lines(tmp / "one" / "out"), order_lines(tmp / "two" / "out")
    assert [ln["indices"] for ln in a] == [ln["indices"] for ln in b]
    assert _by_step(tmp / "trace2") == {ln["step"]: ln["indices"] for ln in b}  # the two ranks split each step


@pytest.mark.e2e
def test_report_text_and_html_show_the_order(graded_runs, run_cli):
    tmp, _ = graded_runs
    out = tmp / "one" / "out"
    res = run_cli(["report", out, "--html", tmp / "page.html"], timeout=120)
    assert res.returncode == 0, failure_report(res)
    assert "96 of 96 rows consumed" in res.stdout and "ordering(s) at step(s) [2]" in res.stdout
    page = (tmp / "page.html").read_text()
    assert 'id="order"' in page and 'id="consumed"' in page and "<polygon" in page
    res = run_cli(["report", out, "--export-dataset", tmp / "export"], timeout=120)
    assert res.returncode != 0 and "reorder run trains on every row" in res.stderr


@pytest.mark.e2e
def test_dynamic_reorder_resumes_exactly_after_a_kill_with_its_records_deleted(make_train_yaml, run_cli, tmp_path):
    common = dict(update_step=3, num_train_epochs=1.0, save_steps=4)
    ref = _config(make_train_yaml, tmp_path / "ref", "dyn", **common)
    res = run_cli(["train", ref], env={"DATAFLEX_TRACE_DIR": tmp_path / "tref"}, timeout=300)
    assert res.returncode == 0, failure_report(res)
    crash = _config(make_train_yaml, tmp_path / "crash", "dyn", **common)
    kill_at_step(["train", crash], 10, tmp_path, env={"DATAFLEX_TRACE_DIR": str(tmp_path / "tcrash")})
    out = tmp_path / "crash" / "out"
    state = json.loads((out / "checkpoint-8" / "dataflex_state.json").read_text())
    # steps 0-7 done: orderings at 2 and 5 (the one at 8 is made when step 8 starts, after the resume)
    assert state["round"]["orderings"] == 2 and state["round"]["consumed"] == 64
    shutil.rmtree(out / "dataflex")  # the records go: the checkpoint alone must be enough
    res = run_cli(["train", crash, f"resume_from_checkpoint={out / 'checkpoint-8'}"],
                  env={"DATAFLEX_TRACE_DIR": tmp_path / "tresumed"}, timeout=300)
    assert res.returncode == 0, failure_report(res)
    a, b = order_lines(tmp_path / "ref" / "out"), order_lines(out)
    assert [ln["step"] for ln in b] == [8, 9, 10, 11]
    assert [ln["indices"] for ln in a[8:]] == [ln["indices"] for ln in b]
    assert _flat(a[8:]) == pytest.approx(_flat(b), nan_ok=True)
    ref_steps, resumed = _by_step(tmp_path / "tref"), _by_step(tmp_path / "tresumed")
    assert {s: ref_steps[s] for s in range(8, 12)} == resumed
    stream = [i for ln in a for i in ln["indices"]]
    assert sorted(stream) == list(range(96))


@pytest.mark.e2e
def test_dynamic_reorder_on_two_processes_and_pretraining_blocks(make_train_yaml, run_cli, tmp_path):
    """Loss scoring sharded over two ranks orders as one process does; stage pt reorders token blocks."""
    common = dict(update_step=3, train_step=7)
    one = _config(make_train_yaml, tmp_path / "one", "dyn", **common)
    two = _config(make_train_yaml, tmp_path / "two", "dyn", gradient_accumulation_steps=1, **common)
    res = run_cli(["train", one], timeout=300)
    assert res.returncode == 0, failure_report(res)
    res = run_cli(["train", two], env={"FORCE_TORCHRUN": "1", "NPROC_PER_NODE": "2"}, timeout=400)
    assert res.returncode == 0, failure_report(res)
    a, b = order_lines(tmp_path / "one" / "out"), order_lines(tmp_path / "two" / "out")
    assert [ln["indices"] for ln in a] == [ln["indices"] for ln in b]
    assert _flat(a) == pytest.approx(_flat(b), abs=1e-5, nan_ok=True)
    pt = _config(make_train_yaml, tmp_path / "pt", "paced", stage="pt", dataset="wiki_demo,demo_code", max_samples=40,
                 per_device_train_batch_size=2, num_train_epochs=2.0)
    res = run_cli(["train", pt], timeout=300)
    assert res.returncode == 0, failure_report(res)
    lines = order_lines(tmp_path / "pt" / "out")
    assert lines[2]["competence"] == pytest.approx(0.25) and lines[-1]["competence"] == 1.0
    assert all(len(ln["indices"]) == 4 for ln in lines)


@pytest.mark.e2e
@pytest.mark.parametrize("component, extra, expected", [
    ("bad_column", {}, "component 'bad_column': param 'column' = 'level' is not a column of dataset 'demo_graded'; "
                       "its columns: instruction, input, output, difficulty"),
    ("text_column", {"dataset": "demo_mix"}, "component 'text_column': param 'column' = 'task': training row 0 holds"),
    ("graded", {"stage": "pt", "dataset": "wiki_demo"}, "param 'score' = 'column' cannot be used with stage: pt"),
    ("dyn", {}, "update_step: required with reorderer 'dynamic'"),
])
def test_mistakes_are_one_line_errors_before_training(component, extra, expected, make_train_yaml, run_cli, tmp_path):
    cfg = _config(make_train_yaml, tmp_path, component, **extra)
    res = run_cli(["train", cfg], timeout=200)
    assert res.returncode != 0
    errors = [ln for ln in res.stderr.splitlines() if "dataflex-cli: error:" in ln]
    assert len(errors) == 1 and expected in errors[0], res.stderr[-3000:]
    out = tmp_path / "out"
    assert not list(out.glob("checkpoint-*")) and not (out / "adapter_model.safetensors").exists()


@pytest.mark.e2e
def test_a_score_column_of_mixed_types_is_a_one_line_error(make_train_yaml, run_cli, tmp_path):
    """Numbers in most rows and a string in one: the JSON loader cannot build the column."""
    rows = json.loads((REPO_ROOT / "data" / "demo_graded.json").read_text())
    rows[5]["difficulty"] = "hard"
    data = tmp_path / "data"
    data.mkdir()
    (data / "graded_mixed.json").write_text(json.dumps(rows))
    (data / "dataset_info.json").write_text(json.dumps({"graded_mixed": {"file_name": "graded_mixed.json"}}))
    cfg = _config(make_train_yaml, tmp_path, "graded", dataset="graded_mixed", dataset_dir=str(data))
    res = run_cli(["train", cfg], timeout=200)
    assert res.returncode == 2, failure_report(res)
    errors = [ln for ln in res.stderr.splitlines() if "dataflex-cli: error:" in ln]
    assert errors == ["dataflex-cli: error: dataset 'graded_mixed': column 'difficulty' cannot be read (could not "
                      "convert 'hard' with type str: tried to convert to int64); allowed: one type in every row of a "
                      "column (e.g. numbers only)"], res.stderr[-3000:]
    assert "Traceback" not in res.stderr
    assert not (tmp_path / "out" / "adapter_model.safetensors").exists()


# --------------------------------------------------------------------------- the original-style YAMLs
ORIGINAL = REPO_ROOT / "examples" / "train_lora" / "reorderers"
CPU = ["bf16=false", "cutoff_len=64", "max_samples=48", "train_step=4", "save_steps=1000", "logging_steps=1",
       "gradient_accumulation_steps=2", "plot_loss=false", "update_step=2"]


@pytest.mark.e2e
@pytest.mark.parametrize("name", ["static", "dynamic"])
def test_the_example_reorderer_yamls_train(name, tiny_model, run_cli, tmp_path):
    work = tmp_path / "work"
    shutil.copytree(REPO_ROOT / "data", work / "data")
    shutil.copy(REPO_ROOT / "data" / "demo_mix_train.json", work / "data" / "alpaca_en_demo.json")
    args = ["train", ORIGINAL / f"{name}.yaml", f"model_name_or_path={tiny_model}", "template=default",
            f"output_dir={tmp_path / 'out'}", "warmup_step=1", *CPU]
    res = run_cli(args, cwd=work, timeout=300)
    assert res.returncode == 0, failure_report(res)
    lines = order_lines(tmp_path / "out")
    assert [ln["step"] for ln in lines] == [0, 1, 2, 3] and all(len(ln["indices"]) == 4 for ln in lines)
    assert len({i for ln in lines for i in ln["indices"]}) == 16  # 16 of the 48 rows, none twice


@pytest.mark.e2e
def test_a_rank_failing_inside_the_loss_scoring_ends_both_ranks_with_its_message(make_train_yaml, run_cli, tmp_path):
    import re

    cfg = _config(make_train_yaml, tmp_path, "dyn", update_step=3, train_step=6, gradient_accumulation_steps=1)
    res = run_cli(["train", cfg], env={"FORCE_TORCHRUN": "1", "NPROC_PER_NODE": "2",
                                       "DATAFLEX_TEST_FAULT": "forward:1:1"}, timeout=300)
    assert res.returncode != 0
    pattern = (r"\[rank [01]\] dataflex-cli: error: ordering 1 at step 2 \(reorderer 'dynamic'\) failed on rank 1 "
               r"\(reorder 1: scoring losses, batch 1/[^)]*\): RuntimeError: injected forward fault on rank 1")
    assert len(re.findall(pattern, res.stderr)) == 2, failure_report(res)
