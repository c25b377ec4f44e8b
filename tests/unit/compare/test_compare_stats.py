"""dataflex.compare's statistics and planning, by hand: t quantiles, intervals, paired differences,
verdicts, method overrides, the compute budget's interpolation, missing seeds."""

from __future__ import annotations

import math
import re

import pytest

from dataflex.compare.analysis import render, table
from dataflex.compare.plan import parse_methods
from dataflex.compare.stats import interval, paired_difference, seeds_needed, t_quantile, verdict
from dataflex.errors import ConfigError

# Student t 0.975 quantiles from the printed tables (df = 1, 2, 3, 4, 10, 30)
T975 = {1: 12.706204736, 2: 4.302652730, 3: 3.182446305, 4: 2.776445105, 10: 2.228138852, 30: 2.042272456}


def test_t_quantiles_match_the_printed_table():
    for df, want in T975.items():
        assert t_quantile(0.975, df) == pytest.approx(want, abs=1e-8)
    assert t_quantile(0.025, 4) == pytest.approx(-T975[4], abs=1e-8)


def test_interval_and_paired_difference_by_hand():
    a, b = [1.0, 2.0, 4.0], [0.0, 2.0, 2.0]
    iv = interval([(x, 1.0) for x in a])
    sd = math.sqrt(((1 - 7 / 3) ** 2 + (2 - 7 / 3) ** 2 + (4 - 7 / 3) ** 2) / 2)
    assert iv.mean == pytest.approx(7 / 3)
    assert iv.hi - iv.mean == pytest.approx(T975[2] * sd / math.sqrt(3), rel=1e-9)
    d = paired_difference([(x, 1.0) for x in a], [(x, 1.0) for x in b])  # differences 1, 0, 2
    assert d.mean == pytest.approx(1.0)
    assert d.hi - d.mean == pytest.approx(T975[2] * 1.0 / math.sqrt(3), rel=1e-9)  # sd of (1, 0, 2) is 1
    one = interval([(5.0, 1.0)])
    assert (one.mean, one.lo, one.hi) == (5.0, None, None)


def test_ratio_interval_is_the_per_token_mean_with_its_linearised_error():
    pairs = [(2.0, 1.0), (9.0, 3.0), (8.0, 2.0), (1.0, 2.0)]  # 20 / 8 = 2.5 per token
    iv = interval(pairs)
    resid = [x - 2.5 * w for x, w in pairs]  # -0.5, 1.5, 3, -4
    se = math.sqrt(sum(r * r for r in resid) / (4 * 3)) / 2.0
    assert iv.mean == 2.5 and iv.hi - iv.mean == pytest.approx(T975[3] * se, rel=1e-9)


def test_verdict_reads_the_interval_of_the_difference_only():
    from dataflex.compare.stats import Interval

    assert verdict(Interval(-0.2, -0.3, -0.1, 3), higher_is_better=False) == "better"  # lower loss
    assert verdict(Interval(-0.2, -0.3, -0.1, 3), higher_is_better=True) == "worse"
    assert verdict(Interval(0.5, -0.01, 1.0, 3), higher_is_better=True) == "tie"
    assert verdict(Interval(0.5, None, None, 1), higher_is_better=True) is None
    # a difference of one paired sd needs 10 seeds for 80 % power at 95 %
    assert seeds_needed(1.0, 1.0) == 10 and seeds_needed(0.5, 1.0) == 34


def test_methods_and_their_overrides():
    ms = parse_methods("plain, random,less:candidate_pool=0.1:proj_dim=256")
    assert [(m.label, m.name, m.params) for m in ms] == [
        ("plain", "plain", {}), ("random", "random", {}),
        ("less:candidate_pool=0.1:proj_dim=256", "less", {"candidate_pool": 0.1, "proj_dim": 256})]
    assert ms[2].folder == "less__candidate_pool=0.1__proj_dim=256"
    for bad, words in (("less:oops", "not key=value"), ("random,random", "listed twice"), ("", "no method"),
                       ("plain:x=1", "plain takes no overrides")):
        with pytest.raises(ConfigError, match=words):
            parse_methods(bad)


def _curve(points):
    """points: [(step, seconds, loss value)] with one question of one token, so value = pair."""
    return [{"step": s, "seconds": sec, "tokens": None, "values": {"loss": v}, "metrics": {"loss": [[v, 1.0]]}}
            for s, sec, v in points]


def test_compute_budget_interpolates_the_baseline_and_says_when_a_method_ran_past_it():
    base = [{"curve": _curve([(2, 1.0, 3.0), (4, 2.0, 2.0), (8, 4.0, 1.0)])},
            {"curve": _curve([(2, 1.0, 3.5), (4, 2.0, 2.5), (8, 4.0, 1.5)])}]
    # method A reaches step 4 at 3.0 s (seed 0) and 5.0 s (seed 1: past the baseline's 4.0 s)
    meth = [{"curve": _curve([(4, 3.0, 1.2)])}, {"curve": _curve([(4, 5.0, 1.4)])}]
    runs = {"random": {"main": base, "long": base}, "A": {"main": meth}}
    tab = table(runs, ["random", "A"], "random", "compute", "loss", steps=4)
    row = tab["rows"][1]
    # seed 0: baseline at 3.0 s is halfway between 2.0 (2.0 s) and 1.0 (4.0 s) = 1.5; seed 1: last point 1.5
    diffs = [1.2 - 1.5, 1.4 - 1.5]
    assert row["diff_mean"] == pytest.approx(sum(diffs) / 2)
    sd = abs(diffs[0] - diffs[1]) / math.sqrt(2)
    assert row["diff_hi"] - row["diff_mean"] == pytest.approx(T975[1] * sd / math.sqrt(2))
    assert row["verdict"] == "tie" and row["compute"] == [3.0, 5.0]
    assert tab["notes"] == ["A: its seconds run past the baseline's last checkpoint for seed 1 (compared with "
                            "that checkpoint; raise --baseline-factor)"]
    steps = table(runs, ["random", "A"], "random", "steps", "loss", steps=4)
    assert steps["rows"][1]["diff_mean"] == pytest.approx(((1.2 - 2.0) + (1.4 - 2.5)) / 2)


def test_missing_seeds_are_left_out_of_both_sides_and_named():
    base = [{"curve": _curve([(4, 1.0, 2.0)])}, {"curve": _curve([(4, 1.0, 3.0)])}, {"curve": _curve([(4, 1.0, 2.5)])}]
    meth = [{"curve": _curve([(4, 1.0, 1.0)])}, None, {"curve": _curve([(4, 1.0, 2.0)])}]
    tab = table({"random": {"main": base}, "A": {"main": meth}}, ["random", "A"], "random", "steps", "loss", steps=4)
    row = tab["rows"][1]
    assert row["seeds"] == 2 and row["missing"] == [1]
    assert row["diff_mean"] == pytest.approx(((1.0 - 2.0) + (2.0 - 2.5)) / 2)
    assert "A: missing seed 1 (not finished)" in tab["notes"]
    text = render(tab)
    assert "note: A: missing seed 1" in text and re.search(r"A\s+2\s+1\.5000 ± ", text)


def test_an_extra_sets_metric_reads_as_its_own_metric():
    """``other:exact`` (an --eval-extra set) is an accuracy: a higher value is better; ``other:loss`` lower."""
    def runs(metric, base_values, meth_values):
        def curve(v):
            return [{"step": 4, "seconds": 1.0, "values": {metric: v}, "metrics": {metric: [[v, 1.0]]}}]
        return {"random": {"main": [{"curve": curve(v)} for v in base_values]},
                "A": {"main": [{"curve": curve(v)} for v in meth_values]}}
    # A is 0.2, 0.3, 0.25 higher than random seed by seed: an interval clear of 0 on the positive side
    data = runs("other:exact", [0.5, 0.4, 0.6], [0.7, 0.7, 0.85])
    assert table(data, ["random", "A"], "random", "steps", "other:exact", steps=4)["rows"][1]["verdict"] == "better"
    data = runs("other:loss", [0.5, 0.4, 0.6], [0.7, 0.7, 0.85])
    tab = table(data, ["random", "A"], "random", "steps", "other:loss", steps=4)
    assert tab["rows"][1]["verdict"] == "worse" and "metric other:loss (lower is better)" in render(tab)


# --------------------------------------------------------------------------- refusals (no model loaded)
