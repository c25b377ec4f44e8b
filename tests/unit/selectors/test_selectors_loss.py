"""loss and delta_loss selectors: formulas against hand-computed values on fixed loss vectors.

The scorer here is a fixed table of losses (the engine itself is tested against the model in
test_scoring.py); everything else is the real selector code.
"""

from __future__ import annotations

import math

import pytest
import torch

from dataflex.dist.agreement import Agreement
from dataflex.errors import ConfigError
from dataflex.selectors.base import SelectionContext, SelectionResult, sampling_probabilities, weighted_draw
from dataflex.selectors.delta_loss import DeltaLossParams, DeltaLossSelector, window_bounds
from dataflex.selectors.loss import LossParams, LossSelector, band_of, loss_weights


class TableScorer:
    """Returns losses from a table; ``now`` can be swapped between selections."""

    rank, world_size, agreement = 0, 1, Agreement()

    def __init__(self, losses):
        self.now = torch.tensor(losses, dtype=torch.float64)
        self.calls = []

    def losses(self, dataset, indices, batch_size=16, desc=""):
        indices = list(indices)
        self.calls.append(indices)
        return self.now[indices].clone()


def ctx_for(scorer, n, k, selection=0, num_selections=1, seed=0):
    return SelectionContext(step=10, selection=selection, num_selections=num_selections, num_samples=k,
                            train_dataset=list(range(n)), scorer=scorer, generator=torch.Generator().manual_seed(seed))


LOSSES = [float(v) for v in range(1, 11)]  # 1..10


def test_bands_and_thresholds_hand_computed():
    losses = torch.tensor(LOSSES, dtype=torch.float64)
    weights, (q1, q2), bands = loss_weights(losses, [0.33, 0.66], "high", 5.0)
    # linear interpolation: position 0.33 * 9 = 2.97 -> 3 + 0.97 = 3.97 ; 0.66 * 9 = 5.94 -> 6.94
    assert q1 == pytest.approx(3.97) and q2 == pytest.approx(6.94)
    assert bands.tolist() == [0, 0, 0, 1, 1, 1, 2, 2, 2, 2]
    assert weights.tolist() == [1, 1, 1, 1, 1, 1, 5, 5, 5, 5]
    # boundaries: l == q1 is low, l == q2 is medium
    assert band_of(torch.tensor([3.97, 6.94, float("nan")], dtype=torch.float64), 3.97, 6.94).tolist() == [0, 1, -1]


def test_probabilities_with_temperature_hand_computed():
    w = torch.tensor([1, 1, 1, 1, 1, 1, 5, 5, 5, 5], dtype=torch.float64)
    p1 = sampling_probabilities(w, 1.0)
    assert p1[0].item() == pytest.approx(1 / 26) and p1[-1].item() == pytest.approx(5 / 26)
    p2 = sampling_probabilities(w, 2.0)
    total = 6 + 4 * math.sqrt(5)
    assert p2[0].item() == pytest.approx(1 / total) and p2[-1].item() == pytest.approx(math.sqrt(5) / total)
    p0 = sampling_probabilities(torch.tensor([0.0, 2.0, 2.0]), 0.5)
    assert p0.tolist() == pytest.approx([0.0, 0.5, 0.5])


def test_loss_selector_draw_is_reproducible_and_respects_bands():
    scorer = TableScorer(LOSSES + [float("nan")])  # index 10 has no supervised token
    sel = LossSelector(LossParams.from_dict("loss", {"focus": "low", "focus_weight": 1000.0}))
    a = sel.select(ctx_for(scorer, 11, 3, seed=7))
    b = sel.select(ctx_for(scorer, 11, 3, seed=7))
    assert a.indices == b.indices
    assert sorted(a.indices) == [0, 1, 2]  # the low band (1, 2, 3) dominates with weight 1000
    assert a.summary["band_counts"] == {"low": 3, "medium": 3, "high": 4}
    assert a.summary["unscored"] == 1
    assert a.per_sample["loss"] == [LOSSES[i] for i in a.indices]
    assert not a.summary["replacement"]


def test_loss_selector_records_pool_scores_only_when_asked():
    scorer = TableScorer(LOSSES + [float("nan")])
    plain = LossSelector(LossParams.from_dict("loss", {})).select(ctx_for(scorer, 11, 3))
    assert "pool_scores" not in plain.summary
    res = LossSelector(LossParams.from_dict("loss", {"record_scores": True, "candidate_pool": 5})).select(
        ctx_for(scorer, 11, 3))
    scores = res.summary["pool_scores"]
    assert len(scores["indices"]) == 5 and scores["indices"] == sorted(scores["indices"])
    assert scores["values"] == [None if i == 10 else LOSSES[i] for i in scores["indices"]]


def test_loss_selector_switches_to_replacement_when_short():
    scorer = TableScorer([1.0, 2.0, float("nan"), 3.0])
    sel = LossSelector(LossParams.from_dict("loss", {}))
    res = sel.select(ctx_for(scorer, 4, 8))
    assert res.summary["replacement"] is True
    assert len(res.indices) == 8 and 2 not in res.indices  # the unscored sample is never drawn
    res = LossSelector(LossParams.from_dict("loss", {"replacement": True})).select(ctx_for(scorer, 4, 2))
    assert res.summary["replacement"] is True


def test_weighted_draw_without_replacement_is_distinct():
    idx, replaced = weighted_draw(torch.ones(10), 10, torch.Generator().manual_seed(0))
    assert sorted(idx) == list(range(10)) and not replaced


def test_candidate_pool_scores_only_the_pool():
    scorer = TableScorer([float(i) for i in range(100)])
    sel = LossSelector(LossParams.from_dict("loss", {"candidate_pool": 0.2}))
    res = sel.select(ctx_for(scorer, 100, 5))
    assert len(scorer.calls[0]) == 20
    assert set(res.indices) <= set(scorer.calls[0])
    sel = LossSelector(LossParams.from_dict("loss", {"candidate_pool": 30}))
    sel.select(ctx_for(scorer, 100, 5))
    assert len(scorer.calls[1]) == 30


@pytest.mark.parametrize("params, key", [
    ({"focus": "mid"}, "focus"),
    ({"quantiles": [0.7, 0.3]}, "quantiles"),
    ({"quantiles": [0.2, 1.5]}, "quantiles"),
    ({"quantiles": [0.5]}, "quantiles"),
    ({"temperature": 0}, "temperature"),
    ({"temperature": "hot"}, "temperature"),
    ({"focus_weight": -1}, "focus_weight"),
    ({"scoring_batch_size": 0}, "scoring_batch_size"),
    ({"candidate_pool": 1.5}, "candidate_pool"),
    ({"candidate_pool": 0}, "candidate_pool"),
    ({"focuss": "low"}, "focuss"),
])
def test_loss_params_rejected(params, key):
    with pytest.raises(ConfigError, match=f"'{key}'"):
        LossParams.from_dict("loss", params)


# ---------------------------------------------------------------- delta_loss
@pytest.mark.parametrize("t, T, n, s, expected", [
    (0, 2, 100, 0.2, (0, 20)),     # u = sigmoid(-5) = 0.00669 -> floor(0.535) = 0
    (1, 2, 100, 0.2, (40, 60)),    # u = 0.5 -> floor(0.5 * 80) = 40
    (2, 2, 100, 0.2, (79, 99)),    # u = sigmoid(5) = 0.99331 -> floor(79.46) = 79
    (0, 0, 100, 0.2, (0, 20)),     # a single delta selection: t/T taken as 0
    (1, 3, 10, 0.3, (1, 4)),       # u = sigmoid(-10/6) = 0.15887 -> floor(1.11) = 1, width 3
    (1, 2, 100, 0.29, (35, 64)),   # width floor(29.0) = 29 (not 28), start floor(0.5 * 71) = 35
])
def test_window_bounds_hand_computed(t, T, n, s, expected):
    deltas = torch.linspace(10, 1, n, dtype=torch.float64)  # all positive, descending
    start, end, _ = window_bounds(deltas, t, T, s, 10.0)
    assert (start, end) == expected


def test_window_cut_at_first_negative_delta():
    deltas = torch.cat([torch.linspace(5, 0.1, 50), -torch.linspace(0.1, 5, 50)]).double()
    assert window_bounds(deltas, 1, 2, 0.2, 10.0)[:2] == (40, 50)
    deltas = torch.cat([torch.linspace(5, 0.1, 30), -torch.linspace(0.1, 5, 70)]).double()
    start, end, _ = window_bounds(deltas, 1, 2, 0.2, 10.0)
    assert (start, end) == (40, 40)  # window entirely past the cut: empty


def test_delta_loss_selector_flow():
    n = 50
    scorer = TableScorer([5.0] * n)
    sel = DeltaLossSelector(DeltaLossParams.from_dict("delta_loss", {"window_size": 0.2}))
    first = sel.select(ctx_for(scorer, n, 10, selection=0, num_selections=3))
    assert first.summary["phase"] == "baseline" and len(set(first.indices)) == 10
    assert sel.state_dict()["baseline_selection"] == 0
    # now: sample i dropped by (n - i) / 10 -> descending Δ order is 0, 1, 2, ...; samples 45.. got worse
    scorer.now = torch.tensor([5.0 - (n - 5 - i) / 10 for i in range(n)], dtype=torch.float64)
    second = sel.select(ctx_for(scorer, n, 10, selection=1, num_selections=3))
    # delta selection t=0 of T=1: u = sigmoid(-5): start 0, end 10
    assert second.summary["window"] == [0, 10] and second.summary["t"] == 0 and second.summary["T"] == 1
    assert second.per_sample["delta"] == [pytest.approx((n - 5 - i) / 10) for i in second.indices]
    third = sel.select(ctx_for(scorer, n, 10, selection=2, num_selections=3))
    # t=1 of T=1: u = sigmoid(5) -> start floor(0.99331 * 40) = 39, end 49 cut at first Δ<0 (rank 46)
    assert third.summary["window"] == [39, 46]
    # restart: the baseline comes back from the state dict
    clone = DeltaLossSelector(DeltaLossParams.from_dict("delta_loss", {}))
    clone.load_state_dict(sel.state_dict())
    assert torch.equal(clone.baseline, sel.baseline) and clone.baseline_selection == 0


def test_delta_inside_window_is_favoured():
    n = 200
    scorer = TableScorer([5.0] * n)
    sel = DeltaLossSelector(DeltaLossParams.from_dict("delta_loss", {"window_size": 0.1}))
    sel.select(ctx_for(scorer, n, 10, selection=0, num_selections=2))
    scorer.now = torch.tensor([5.0 - (n - i) / 100 for i in range(n)], dtype=torch.float64)
    res = sel.select(ctx_for(scorer, n, 20, selection=1, num_selections=2))
    inside = sum(1 for r in res.per_sample["rank"] if 0 <= r < 20)
    # weights: 20 ranks x 1.0 vs 180 x 0.025 = 4.5 -> ~82% of draws fall inside the window
    assert inside >= 12


@pytest.mark.parametrize("params, key", [
    ({"window_size": 0}, "window_size"),
    ({"window_size": 1.2}, "window_size"),
    ({"sharpness": -1}, "sharpness"),
    ({"outside_weight": -0.1}, "outside_weight"),
    ({"window": 0.2}, "window"),
])
def test_delta_params_rejected(params, key):
    with pytest.raises(ConfigError, match=f"'{key}'"):
        DeltaLossParams.from_dict("delta_loss", params)


@pytest.mark.parametrize("selector", [LossSelector(LossParams.from_dict("loss", {})),
                                      DeltaLossSelector(DeltaLossParams.from_dict("delta_loss", {}))])
def test_no_supervised_token_anywhere_is_one_clear_error(selector):
    scorer = TableScorer([float("nan")] * 5)  # every response cut off by cutoff_len, say
    with pytest.raises(ValueError, match=r"^no training sample has a supervised token \(check cutoff_len and dataset\)$"):
        selector.select(ctx_for(scorer, 5, 2))


def test_outside_weight_zero_with_an_empty_window_falls_back_to_samples_that_did_not_get_worse(caplog):
    """Every scored sample got worse except a few: the window is cut to nothing and outside_weight is 0."""
    n = 20
    scorer = TableScorer([5.0] * n)
    sel = DeltaLossSelector(DeltaLossParams.from_dict("delta_loss", {"outside_weight": 0.0}))
    sel.select(ctx_for(scorer, n, 4, selection=0, num_selections=3))
    # Δ = 5 - now: samples 0..2 unchanged (Δ = 0), the rest got worse (Δ < 0); the last delta selection
    # (t = T = 1) puts the window at start floor(σ(5) x 16) = 15, past the cut at rank 3: empty
    scorer.now = torch.tensor([5.0] * 3 + [5.5] * (n - 3), dtype=torch.float64)
    with caplog.at_level("WARNING", logger="dataflex"):
        res = sel.select(ctx_for(scorer, n, 6, selection=2, num_selections=3))
    start, end = res.summary["window"]
    assert start == end == 15  # the window is empty
    assert res.summary["fallback"] == "delta>=0"
    assert set(res.indices) <= {0, 1, 2} and len(res.indices) == 6  # with replacement: only 3 are eligible
    assert all(math.isfinite(d) and d >= 0 for d in res.per_sample["delta"])
    assert any("the window" in r.getMessage() and "outside_weight is 0" in r.getMessage() for r in caplog.records)
    # nobody improved or stayed: every scored sample is eligible
    scorer.now = torch.tensor([6.0] * n, dtype=torch.float64)
    res = sel.select(ctx_for(scorer, n, 6, selection=2, num_selections=3))
    assert res.summary["fallback"] == "all" and len(res.indices) == 6


def test_summaries_are_never_reordered_with_the_indices():
    """With num_samples == 2, loss's two thresholds have the length of the indices: they must stay put."""
    scorer = TableScorer(LOSSES)
    res = LossSelector(LossParams.from_dict("loss", {})).select(ctx_for(scorer, 10, 2))
    assert len(res.summary["thresholds"]) == len(res.indices) == 2
    flipped = res.reordered([1, 0])
    assert flipped.indices == res.indices[::-1]
    assert flipped.per_sample["loss"] == res.per_sample["loss"][::-1]
    assert flipped.summary["thresholds"] == res.summary["thresholds"]
    with pytest.raises(RuntimeError, match="per-sample 'x' has 1 values for 2 indices"):
        SelectionResult([1, 2], per_sample={"x": [0.5]}).check(2, 10)
