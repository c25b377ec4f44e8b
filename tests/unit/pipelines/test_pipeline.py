"""The pipeline rules (docs/pipelines.md): parsing, order, the budget-taker, updates, the weight product."""

from __future__ import annotations

import json
import logging
from types import SimpleNamespace

import pytest
import torch

from dataflex.core.records import RunLog
from dataflex.dist.agreement import Agreement
from dataflex.errors import ConfigError
from dataflex.modes.base import WEIGHT_KEY
from dataflex.modes.lego import IndexStage, LegoMode, LegoRound, SelectStage, fit_budget
from dataflex.modes.loss import LossSignals
from dataflex.pipelines import Pipeline, PipelineParams, Stage, compose, parse_stage
from dataflex.schedule import Schedule


def stages(*raw):
    return [s for i, r in enumerate(raw) if (s := parse_stage("p", i, r)) is not None]


def labels(composed):
    return [s.label for s in composed]


# ------------------------------------------------------------------------------------------ the rules
def test_index_stages_run_select_mix_reorder_whatever_the_written_order(caplog):
    written = stages({"family": "weighter", "component": "w"}, {"family": "reorder", "component": "o"},
                     {"family": "mixer", "component": "m"}, {"family": "selector", "component": "s"})
    with caplog.at_level(logging.WARNING, logger="dataflex"):
        out = compose("p", written)
    assert labels(out) == ["selector:s", "mixer:m", "reorder:o", "weighter:w"]
    warned = [r.getMessage() for r in caplog.records]
    assert warned == ["[DataFlex] pipeline 'p': stages written as reorder:o -> mixer:m -> selector:s run as "
                      "selector:s -> mixer:m -> reorder:o (index-space stages always run select -> mix -> reorder)"]


def test_the_canonical_order_says_nothing(caplog):
    with caplog.at_level(logging.WARNING, logger="dataflex"):
        out = compose("p", stages({"family": "selector", "component": "s"}, {"family": "reorder", "component": "o"}))
    assert labels(out) == ["selector:s", "uniform", "reorder:o"]
    assert caplog.records == []


@pytest.mark.parametrize("written, expected", [
    # a filter only shrinks the pool: the uniform draw takes the budget, before the reorder
    ([{"family": "selector", "component": "s"}], ["selector:s", "uniform"]),
    ([{"family": "selector", "component": "s", "mode": "filter"}, {"family": "reorder", "component": "o"}],
     ["selector:s", "uniform", "reorder:o"]),
    ([{"family": "weighter", "component": "w"}], ["uniform", "weighter:w"]),
    ([{"family": "reorder", "component": "o"}, {"family": "weighter", "component": "w"}],
     ["uniform", "reorder:o", "weighter:w"]),
    # a draw or a mixer takes it: nothing is added
    ([{"family": "selector", "component": "s", "mode": "draw"}], ["selector:s"]),
    ([{"family": "selector", "component": "s"}, {"family": "mixer", "component": "m"}], ["selector:s", "mixer:m"]),
])
def test_exactly_one_stage_takes_the_budget(written, expected):
    out = compose("p", stages(*written))
    assert labels(out) == expected
    assert sum(s.takes_budget for s in out) == 1


def test_two_budget_takers_are_refused():
    with pytest.raises(ConfigError, match=r"^pipeline 'p': selector:s and mixer:m both take the update's rows; "
                                          r"allowed: one budget-taker"):
        compose("p", stages({"family": "mixer", "component": "m"}, {"family": "selector", "component": "s",
                                                                    "mode": "draw"}))


def test_disabled_stages_are_left_out_and_an_empty_pipeline_is_refused():
    assert parse_stage("p", 0, {"family": "selector", "component": "s", "enabled": False}) is None
    with pytest.raises(ConfigError, match="pipeline 'p': no enabled stage"):
        compose("p", [])


@pytest.mark.parametrize("raw, message", [
    ({"family": "sampler", "component": "x"}, "stage 1: family 'sampler' is unknown; allowed: selector, mixer"),
    ({"family": "selector"}, "stage 1: 'component' is required"),
    ({"family": "selector", "component": "s", "mode": "pick"}, "'mode' = 'pick' is invalid; allowed: filter, draw"),
    ({"family": "selector", "component": "s", "mode": "draw", "keep_ratio": 0.5}, "'keep_ratio' only applies to "
                                                                                  "mode: filter"),
    ({"family": "selector", "component": "s", "keep_ratio": 0}, "'keep_ratio' = 0 is invalid"),
    ({"family": "mixer", "component": "m", "mode": "draw"}, "'mode' only applies to selector stages"),
    ({"family": "mixer", "component": "m", "every": 0}, "'every' = 0 is invalid; allowed: an integer >= 1"),
    ({"family": "mixer", "component": "m", "warmup_step": -1}, "'warmup_step' = -1 is invalid"),
    ({"family": "mixer", "component": "m", "enabled": "no"}, "'enabled' = 'no' is invalid; allowed: true, false"),
    ("selector", "stage 1 must be a mapping"),
])
def test_a_bad_stage_is_one_line(raw, message):
    with pytest.raises(ConfigError) as err:
        parse_stage("p", 0, raw)
    assert message in str(err.value) and "\n" not in str(err.value)


def test_the_pipeline_component_reads_the_original_keys():
    params = PipelineParams.from_dict("h", {"cache_dir": "x", "score_batch_size": 8, "save_plans": False, "stages": [
        {"family": "selector", "component": "loss", "mode": "filter", "keep_ratio": 0.5, "warmup_step": 10,
         "every": 200}, {"family": "weighter", "component": "loss", "warmup_step": 10}]}, warn=False)
    pipe = Pipeline(params)
    built = []
    pipe.resolve(lambda section, key: built.append((section, key)) or object())
    assert built == [("selectors", "loss"), ("weighters", "loss")]
    assert labels(pipe.stages) == ["selector:loss", "uniform", "weighter:loss"]  # composed once built
    s = pipe.stages[0]
    assert (s.mode, s.keep_ratio, s.warmup_step, s.every) == ("filter", 0.5, 10, 200)


def _pipe(*raw):
    return Pipeline(PipelineParams.from_dict("p", {"stages": list(raw)}, warn=False))


def test_a_mixer_acting_on_the_loss_is_a_loss_space_stage_and_takes_no_rows():
    """doremi declares acts_on = "loss": it runs beside the weighters, so the rows need another taker."""
    from dataflex.mixers.doremi import DoremiMixer
    from dataflex.mixers.odm import OdmMixer

    assert (DoremiMixer.acts_on, OdmMixer.acts_on) == ("loss", "rows")
    kinds = {"d": SimpleNamespace(acts_on="loss"), "o": SimpleNamespace(acts_on="rows"), "s": object(), "w": object()}
    build = lambda section, key: kinds[key]  # noqa: E731
    pipe = _pipe({"family": "weighter", "component": "w"}, {"family": "mixer", "component": "d", "every": 3})
    pipe.resolve(build)
    assert labels(pipe.stages) == ["uniform", "mixer:d", "weighter:w"]  # the uniform draw takes the rows
    assert [s.index_space for s in pipe.stages] == [True, False, False]
    assert pipe.describe() == "rows: uniform; loss weights: mixer:d weighs the domains' losses every 3 steps x " \
                              "weighter:w"
    # a selector in mode: draw, or a mixer acting on the rows, takes them beside it
    pipe = _pipe({"family": "mixer", "component": "d"}, {"family": "selector", "component": "s", "mode": "draw"})
    pipe.resolve(build)
    assert labels(pipe.stages) == ["selector:s", "mixer:d"]
    pipe = _pipe({"family": "mixer", "component": "d"}, {"family": "mixer", "component": "o"})
    pipe.resolve(build)
    assert labels(pipe.stages) == ["mixer:o", "mixer:d"] and pipe.stages[0].takes_budget
    with pytest.raises(ConfigError, match=r"^pipeline 'p': 2 mixer stages that weigh the domains' losses "
                                          r"\(stages 1, 2\); allowed: at most one$"):
        _pipe({"family": "mixer", "component": "d"}, {"family": "mixer", "component": "d"}).resolve(build)


# ------------------------------------------------------------------------------------------ updates
def test_fit_budget():
    gen = torch.Generator().manual_seed(0)
    assert fit_budget([5, 6, 7], 3, False, gen) == ([5, 6, 7], None)
    assert fit_budget([5, 6, 7, 8], 2, True, gen) == ([5, 6], "head")
    assert fit_budget([5, 6, 7], 7, False, gen) == ([5, 6, 7, 5, 6, 7, 5], "repeated")
    rows, how = fit_budget(list(range(10)), 4, False, gen)
    assert how == "drawn" and len(set(rows)) == 4 and set(rows) <= set(range(10))


class Fake(IndexStage):
    """Keeps every ``k``-th row of its pool (or the first n when it takes the budget); counts its calls."""

    def __init__(self, stage, index, k=2, takes=False):
        super().__init__(stage, index)
        self.k, self.takes, self.calls = k, takes, []

    def apply(self, pool, stretch, n):
        self.calls.append(stretch.start_step)
        return pool[:n] if self.takes else pool[:: self.k]


def make_round(tmp_path, warmup=1, update_step=2, update_times=3):
    sched = Schedule.build(warmup, update_step, update_times, 2, warmup + update_step * update_times)
    rnd = LegoRound(sched, 20, Agreement(), 7)
    rnd.log = RunLog(tmp_path, "run")
    return rnd


def test_an_update_runs_the_first_due_stage_and_every_stage_after_it(tmp_path):
    rnd = make_round(tmp_path)
    filt = Fake(Stage("selector", "s", warmup_step=0, every=4, mode="filter"), 0)
    take = Fake(Stage("uniform", ""), 1, takes=True)
    rnd.stages = [filt, take]
    assert rnd.rows(0) == rnd.rows(0)  # warm-up: the seeded uniform draw, 2 steps x 2 rows
    rows1 = [*rnd.rows(1), *rnd.rows(2)]
    assert rows1 == [0, 2, 4, 6]  # the filter halved the 20 rows, the taker took 4 of its 10
    [*rnd.rows(3), *rnd.rows(4)]  # step 3: the filter is not due (every 4), the taker is: the kept pool again
    [*rnd.rows(5), *rnd.rows(6)]  # step 5: both due
    assert filt.calls == [1, 5] and take.calls == [1, 3, 5]
    recs = {r["step"]: r for r in map(lambda p: json.loads(p.read_text()),
                                      sorted((tmp_path / "run").glob("step_*.json")))}
    assert recs[0]["kind"] == "warmup" and len(recs[0]["indices"]) == 2
    assert [t["action"] for t in recs[3]["stages"]] == ["kept", "decided"]
    assert recs[3]["stages"][1]["rows_in"] == 10 and recs[3]["indices"] == [0, 2, 4, 6]


def test_a_stage_in_its_warm_up_passes_the_pool_through_and_the_update_is_fitted(tmp_path):
    rnd = make_round(tmp_path, warmup=0, update_step=2, update_times=2)
    late = Fake(Stage("selector", "s", warmup_step=2, mode="filter"), 0, k=4)
    rnd.stages = [late]
    first = rnd.rows(0) + rnd.rows(1)
    assert len(first) == 4 and late.calls == []  # 20 rows passed through, drawn down to the update's 4
    second = rnd.rows(2) + rnd.rows(3)
    assert late.calls == [2]
    assert len(set(second)) == 4 and set(second) <= {0, 4, 8, 12, 16}  # 4 drawn from the filter's 5 (no order)


# ------------------------------------------------------------------------------------------ a filter
def test_a_select_filter_keeps_its_share_of_the_pool_as_training_rows(tmp_path):
    from dataflex.components_file import PACKAGED_COMPONENTS, build_component, get_component

    selector = build_component(get_component(PACKAGED_COMPONENTS, "random"))
    train = [{"input_ids": [i]} for i in range(30)]
    trainer = SimpleNamespace(args=SimpleNamespace(seed=3, learning_rate=0.1), optimizer=None, log=lambda _: None)
    ctx = SimpleNamespace(train=train, agreement=Agreement(), args=trainer.args, trainer=trainer, eval=None,
                          eval_groups=None, cache_dir=str(tmp_path), engine=lambda: None)
    sched = Schedule.build(0, 2, 2, 2, 4)
    mode = SimpleNamespace(ctx=ctx, schedule=sched)
    stage = SelectStage(Stage("selector", "random", mode="filter", keep_ratio=0.4, built=selector), 0, mode)
    stage.log = RunLog(tmp_path, "stage-0-selector")
    pool = list(range(10, 30))  # what an earlier stage left: 20 rows
    rows = stage.apply(pool, sched.stretches[0], 4)
    assert len(rows) == 8 and len(set(rows)) == 8 and set(rows) <= set(pool)  # int(20 x 0.4) rows of the pool
    rec = json.loads((tmp_path / "stage-0-selector" / "step_0.json").read_text())
    assert rec["indices"] == rows  # recorded as training rows, not as positions in the pool


# ------------------------------------------------------------------------------------------ the loss space
class FakeWeighter:
    """A weighter stage's WeightMode as the lego mode drives it: fixed weights per call."""

    def __init__(self, scope, weights):
        self.component = SimpleNamespace(params=SimpleNamespace(scope=scope), needs=frozenset())
        self.round = SimpleNamespace(active=lambda step: True, last_logs={})
        self.weights = weights
        self.micro = 0

    def weigh_micro(self, signals):
        return torch.tensor(self.weights, dtype=torch.float64)

    def weigh_step(self, batches):
        for b in batches:
            b[WEIGHT_KEY] = torch.tensor(self.weights, dtype=torch.float64)


def lego_with(weighters, reweighters=()):
    mode = LegoMode.__new__(LegoMode)
    mode.ctx = SimpleNamespace(step=5, pending_logs={}, agreement=Agreement())
    mode.weighters = [(i, Stage("weighter", f"w{i}"), wm) for i, wm in enumerate(weighters)]
    mode.mixers = []
    mode.reweighters = list(reweighters)
    return mode


def test_loss_space_stages_multiply_their_weights():
    mode = lego_with([FakeWeighter("micro_batch", [0.5, 1.5, 2.0]), FakeWeighter("micro_batch", [1.0, 2.0, 0.25])])
    signals = LossSignals(torch.tensor([3, 4, 5]), None, torch.zeros(3), torch.ones(3), None, {}, None, None,
                          torch.tensor([2.0, 1.0, 4.0], dtype=torch.float64))  # what the batch carried already
    w = mode.loss_hook()(signals)
    assert w.tolist() == [1.0, 3.0, 2.0]  # 2 x 0.5 x 1, 1 x 1.5 x 2, 4 x 2 x 0.25


def test_global_batch_weighters_multiply_before_the_step():
    mode = lego_with([FakeWeighter("global_batch", [0.5, 4.0]), FakeWeighter("global_batch", [3.0, 0.5])])
    assert mode.loss_hook() is None  # nothing left for the training forward
    batches = [{}, {}]
    mode.weigh_step(batches)
    assert [b[WEIGHT_KEY].tolist() for b in batches] == [[1.5, 2.0], [1.5, 2.0]]


def _doremi_stage(mode, alpha, warmup_step=0, every=1, last_run=None):
    """A ReweightStage as LegoMode builds it, without a model: α in force, its schedule."""
    from dataflex.modes.lego import ReweightStage

    rw = ReweightStage.__new__(ReweightStage)
    rw.stage = Stage("mixer", "doremi", warmup_step=warmup_step, every=every, loss_space=True)
    rw.mode, rw.loss_weights, rw.last_run = mode, alpha, last_run
    rw.updates_at = []
    rw.update = lambda step: rw.updates_at.append(step)
    return rw


def _batch(domains, tokens):
    """A micro-batch whose rows have these domains and these supervised tokens (labels shifted by one)."""
    labels = torch.full((len(domains), 6), -100)
    for r, t in enumerate(tokens):
        labels[r, 1: 1 + t] = 7
    return {"labels": labels, "domains": torch.tensor(domains)}


def test_a_doremi_stage_weighs_as_dynamic_mix_and_multiplies_with_a_weighter():
    """w_i = α_d(i) N / N_d(i) over the step's micro-batches (N_d: domain d's supervised tokens in the step),
    as dynamic_mix weighs; times a global_batch weighter's weights."""
    from dataflex.modes.base import DOMAIN_KEY

    mode = lego_with([FakeWeighter("global_batch", [2.0, 0.5])])
    rw = _doremi_stage(mode, [0.25, 0.75])
    mode.reweighters = [rw]
    batches = [_batch([0, 1], [3, 1]), _batch([1, 0], [4, 2])]
    for b in batches:
        b[DOMAIN_KEY] = b.pop("domains")
    mode.weigh_step(batches)
    # N_0 = 3 + 2 = 5, N_1 = 1 + 4 = 5, N = 10: domain 0 weighs 0.25 x 10 / 5 = 0.5, domain 1 0.75 x 2 = 1.5
    assert [b[WEIGHT_KEY].tolist() for b in batches] == [[1.0, 0.75], [3.0, 0.25]]
    assert rw.updates_at == [5]  # due (never updated, past its warmup_step 0): α is updated before the weights
    from dataflex.modes.mix import MixRound

    rnd = SimpleNamespace(loss_weights=[0.25, 0.75])  # dynamic_mix's formula on the same step
    alone = MixRound.sample_loss_weights(rnd, torch.tensor([0, 1, 1, 0]), torch.tensor([5.0, 5.0]))
    assert alone.tolist() == [0.5, 1.5, 1.5, 0.5]


def test_a_doremi_stage_weighs_from_its_warmup_step_and_updates_every_few_steps():
    from dataflex.modes.base import DOMAIN_KEY

    mode = lego_with([])
    rw = _doremi_stage(mode, [0.5, 0.5], warmup_step=6, every=3)
    mode.reweighters = [rw]
    seen = {}
    for step in range(12):
        mode.ctx.step = step
        batches = [_batch([0, 1], [1, 3])]
        batches[0][DOMAIN_KEY] = batches[0].pop("domains")
        mode.weigh_step(batches)
        if rw.updates_at and rw.updates_at[-1] == step:
            rw.last_run = step
        seen[step] = batches[0].get(WEIGHT_KEY)
    assert rw.updates_at == [6, 9]
    assert all(seen[s] is None for s in range(6))  # before its warmup_step: plain loss
    assert seen[6].tolist() == [2.0, 2.0 / 3]  # 0.5 x 4 / 1, 0.5 x 4 / 3
