"""LESS's eval side over several eval datasets (``eval_aggregate: task_max``) and zeroth's ``normalize``
parameters: hand-computed scores and one-line errors."""

from __future__ import annotations

import math

import pytest
import torch

from dataflex.errors import ConfigError
from dataflex.selectors.cluster_less import ClusterLessParams
from dataflex.selectors.less import LessParams, eval_targets
from dataflex.selectors.nice import NiceParams
from dataflex.selectors.zeroth import ZerothParams

NAN = float("nan")


def test_mean_is_the_mean_of_every_valid_eval_row():
    feats = torch.tensor([[1.0, 0.0], [0.0, 1.0], [NAN, NAN], [0.6, 0.8]])
    target, n = eval_targets(feats, None, "mean", "less")
    assert n == 3
    assert torch.allclose(target, torch.tensor([[1.6 / 3, 1.8 / 3]]))


def test_task_max_scores_a_row_by_its_best_eval_dataset():
    # eval dataset a: rows 0-1, b: rows 2-4 (row 3 has no supervised token)
    feats = torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.6, 0.8], [NAN, NAN], [0.8, -0.6]])
    groups = [("a", 0, 2), ("b", 2, 5)]
    target, n = eval_targets(feats, groups, "task_max", "less")
    assert n == 4
    assert torch.allclose(target, torch.tensor([[0.5, 0.5], [0.7, 0.1]]))
    train = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    score = (train @ target.T).max(dim=1).values  # what less's reduce computes per training row
    # row 0: a -> 0.5, b -> 0.7: 0.7; row 1: a -> 0.5, b -> 0.1: 0.5
    assert score.tolist() == pytest.approx([0.7, 0.5])
    # the plain mean over all four valid rows ranks the two rows the other way round
    mean, _ = eval_targets(feats, groups, "mean", "less")
    assert (train @ mean.T).flatten().tolist() == pytest.approx([2.4 / 4, 1.2 / 4])


def test_task_max_without_groups_or_with_an_empty_group_fails_in_one_line():
    feats = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    with pytest.raises(ValueError, match="task_max needs several eval datasets .*eval_on_each_dataset"):
        eval_targets(feats, None, "task_max", "less")
    with pytest.raises(ValueError, match="task_max needs several eval datasets"):
        eval_targets(feats, [("a", 0, 2)], "task_max", "less")
    with pytest.raises(ValueError, match="eval dataset 'b' has no row with a supervised token"):
        eval_targets(torch.tensor([[1.0, 0.0], [NAN, NAN]]), [("a", 0, 1), ("b", 1, 2)], "task_max", "less")


NICE_REQUIRED = {"reward_model_backend": "callable", "reward_function": "math:fabs"}


@pytest.mark.parametrize("cls,name,base", [(LessParams, "less", {}), (ClusterLessParams, "cluster_less", {}),
                                           (NiceParams, "nice", NICE_REQUIRED)])
def test_eval_aggregate_is_a_checked_param(cls, name, base):
    assert cls.from_dict(name, {**base, "eval_aggregate": "task_max"}).eval_aggregate == "task_max"
    with pytest.raises(ConfigError, match="eval_aggregate"):
        cls.from_dict(name, {**base, "eval_aggregate": "max"})


def test_zeroth_normalize_params_are_checked():
    p = ZerothParams.from_dict("zeroth", {"direction": "eval_gradient", "normalize": True, "norm_directions": 4})
    assert p.normalize and p.norm_directions == 4
    with pytest.raises(ConfigError, match="num_directions"):
        ZerothParams.from_dict("zeroth", {"normalize": True, "num_directions": 1})
    with pytest.raises(ConfigError, match="norm_directions"):
        ZerothParams.from_dict("zeroth", {"normalize": True, "norm_directions": 0})
    assert not math.isnan(ZerothParams.from_dict("zeroth", {}).epsilon)
