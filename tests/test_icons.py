"""``icons``: the tasks of the eval set, the vote on hand-computed scores, the original's params, and
one run on the tiny model (records) plus a wrong ``task_boundaries`` (one-line error)."""

from __future__ import annotations

import logging

import pytest
import torch

from dataflex.errors import ConfigError
from dataflex.selectors.icons import IconsParams, IconsSelector, consensus, task_groups
from dataflex.selectors.less import group_means, rank_order

NAN = float("nan")


def test_the_originals_entry_loads_unchanged(caplog):
    original = {"cache_dir": "../dataflex_saves/icons_output", "gradient_type": "adam", "proj_dim": 4096,
                "seed": 123, "save_interval": 16, "task_boundaries": None}
    with caplog.at_level(logging.WARNING, logger="dataflex"):
        p = IconsParams.from_dict("icons", original)
    assert (p.proj_dim, p.seed, p.task_boundaries, p.cumulative) == (4096, 123, None, True)
    assert "param 'save_interval' has no effect here" in caplog.text
    assert IconsParams.from_dict("icons", {"task_boundaries": [40, 25]}).task_boundaries == [40, 25]
    assert IconsParams.from_dict("icons", {"task_boundaries": []}).task_boundaries == []  # the original: one task
    with pytest.raises(ConfigError, match=r"param 'task_boundaries' = \[3, 0\] is invalid; allowed: a list of row"):
        IconsParams.from_dict("icons", {"task_boundaries": [3, 0]})
    with pytest.raises(ConfigError, match="param 'task_boundaries' = 5 has the wrong type; expected: list of int"):
        IconsParams.from_dict("icons", {"task_boundaries": 5})
    with pytest.raises(ConfigError, match="unknown param 'eval_aggregate'"):
        IconsParams.from_dict("icons", {"eval_aggregate": "task_max"})


def test_packaged_entry():
    from dataflex.components import build_component, get_component, resolve_components_path

    packaged = build_component(get_component(resolve_components_path(None), "icons"))
    assert isinstance(packaged, IconsSelector) and packaged.params.task_boundaries is None
    assert packaged.needs_eval and packaged.supported_finetuning == ("lora",)


def test_task_groups_from_sizes_eval_datasets_or_one_task():
    assert task_groups([3, 1, 2], 6, None) == [("task 1", 0, 3), ("task 2", 3, 4), ("task 3", 4, 6)]
    named = [("math", 0, 4), ("code", 4, 6)]
    assert task_groups(None, 6, named) == named
    assert task_groups([], 6, named) == named
    assert task_groups([2, 4], 6, named) == [("task 1", 0, 2), ("task 2", 2, 6)]  # explicit sizes win
    assert task_groups(None, 6, None) == [("eval set", 0, 6)]
    with pytest.raises(ValueError, match=r"task_boundaries \[3, 2\] sum to 5, the eval set has 6 rows"):
        task_groups([3, 2], 6, None)


def test_check_data_names_the_key_and_the_size():
    selector = IconsSelector(IconsParams.from_dict("mine", {"task_boundaries": [30, 15]}))
    selector.check_data(120, 45)
    selector.check_data(120, None)
    with pytest.raises(ConfigError) as err:
        selector.check_data(120, 40)
    assert str(err.value) == ("component 'mine': param 'task_boundaries' = [30, 15] sums to 45, but the eval set has "
                              "40 rows after tokenization; allowed: task sizes summing to 40")


def test_task_targets_are_the_means_of_each_tasks_valid_rows():
    feats = torch.tensor([[1.0, 0.0], [0.0, 1.0], [NAN, NAN], [0.6, 0.8], [0.8, -0.6]])
    target, n = group_means(feats, task_groups([3, 2], 5, None), "icons", what="task")
    assert n == 4
    assert torch.allclose(target, torch.tensor([[0.5, 0.5], [0.7, 0.1]]))
    with pytest.raises(ValueError, match="selector 'icons': task 'task 2' has no row with a supervised token"):
        group_means(feats, task_groups([2, 1, 2], 5, None), "icons", what="task")


def test_the_vote_on_hand_computed_scores():
    # 3 tasks, 6 rows (row 5 unscored), 2 picks: every task votes for the rows at or above its 2nd best
    S = torch.tensor([[0.875, 0.125, 0.5],
                      [0.75, 0.625, 0.125],
                      [0.125, 0.75, 0.5],
                      [0.25, 0.5, 0.75],
                      [0.375, 0.25, 0.25],
                      [NAN, NAN, NAN]], dtype=torch.float64)
    now = S.clone()
    now[1] = 1.0  # breaks the tie of rows 0 and 1 (2 votes, mean S 0.5 each)
    order, votes, thresholds = consensus(S, now, 2)
    # task 1: rows 0, 1 (0.75); task 2: rows 2, 1 (0.625); task 3: row 3 and rows 0, 2 tied at 0.5
    assert thresholds == [0.75, 0.625, 0.5]
    assert votes.tolist() == [2, 2, 2, 1, 0, 0]
    # 2 votes: row 1 (mean S 0.5, mean now 1), row 0 (0.5), row 2 (0.458); then row 3, row 4
    assert order == [1, 0, 2, 3, 4]
    # ranked by the mean over the tasks, row 3 (0.5) would come before row 2 (0.458); by the best task
    # (less's task_max) row 0 would lead and rows 1-3 tie at 0.75
    mean = S.mean(dim=1)
    assert float(mean[3]) > float(mean[2])
    # asking for more than can be scored: every task votes for every scored row
    order, votes, thresholds = consensus(S, now, 9)
    assert votes.tolist() == [3, 3, 3, 3, 3, 0] and order == [1, 0, 3, 2, 4]
    assert consensus(torch.full((2, 2), NAN, dtype=torch.float64), torch.zeros(2, 2), 1)[0] == []


def test_one_task_is_the_ranking_of_less():
    gen = torch.Generator().manual_seed(0)
    S = torch.round(torch.randn(50, 1, generator=gen, dtype=torch.float64) * 4) / 4  # many ties
    now = torch.round(torch.randn(50, 1, generator=gen, dtype=torch.float64) * 4) / 4
    S[7] = NAN
    now[7] = NAN
    for k in (1, 10, 25, 49, 60):
        order, votes, _ = consensus(S, now, k)
        assert order == rank_order(S[:, 0], now[:, 0])
        assert int(votes.sum()) >= min(k, 49)


# --------------------------------------------------------------------------- end to end
COMPONENTS = """selectors:
  icons_tiny:
    name: icons
    params:
      cache_dir: null
      gradient_type: adam
      proj_dim: 256
      seed: 123
      save_interval: 16
      scoring_batch_size: 8
      task_boundaries: [25, 15]
  icons_wrong:
    name: icons
    params:
      proj_dim: 256
      task_boundaries: [30, 15]
"""
SCHEDULE = {"warmup_step": 2, "update_step": 2, "update_times": 2, "max_samples": 120, "cutoff_len": 64,
            "per_device_train_batch_size": 4, "gradient_accumulation_steps": 1, "eval_dataset": "demo_add_eval",
            "dataset": "demo_mix"}


@pytest.mark.e2e
def test_e2e_icons_records(make_train_yaml, run_cli, tmp_path):
    from conftest import records

    components = tmp_path / "components.yaml"
    components.write_text(COMPONENTS)
    config = make_train_yaml(tmp_path / "run", components_cfg_file=str(components), component_name="icons_tiny",
                             **SCHEDULE)
    result = run_cli(["train", config], timeout=300)
    assert result.returncode == 0, (result.stdout + result.stderr)[-4000:]
    recs = records(tmp_path / "run" / "out")
    assert sorted(recs) == [2, 4]
    for rec in recs.values():
        assert rec["selector"] == "icons" and len(set(rec["indices"])) == 8
        m = rec["summary"]
        assert m["tasks"] == [["task 1", 25], ["task 2", 15]] and m["eval_samples"] == 40 and m["scored"] == 120
        assert m["gradient_type"] == "adam" and m["ranked_by"] == "votes on cumulative_score"
        thresholds = m["task_thresholds"]
        per = rec["per_sample"]
        for votes, scores, cum in zip(per["votes"], per["task_scores"], per["cumulative_score"]):
            assert votes == sum(s >= t for s, t in zip(scores, thresholds))  # the vote, from the record alone
            assert cum == pytest.approx(sum(scores) / 2, rel=1e-9)
        assert max(per["votes"]) == 2  # 8 of 120 rows: some row is among the best 8 of both tasks
    assert "[DataFlex] icons: 40 eval / 120 train gradients (adam, proj_dim 256" in result.stdout + result.stderr

    wrong = make_train_yaml(tmp_path / "wrong", components_cfg_file=str(components), component_name="icons_wrong",
                            **SCHEDULE)
    result = run_cli(["train", wrong], timeout=300)
    err = result.stderr.strip()
    assert result.returncode == 2, err[-3000:]
    # found once the eval set is tokenized (after LLaMA-Factory's own log lines): the last line is the error
    assert err.splitlines()[-1] == (
        "dataflex-cli: error: component 'icons_wrong': param 'task_boundaries' = [30, 15] sums to 45, but the eval set "
        "has 40 rows after tokenization; allowed: task sizes summing to 40")
    assert "Traceback" not in err
