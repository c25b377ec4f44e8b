"""``early_stopping_min_delta``: the checks of the key, its wiring into the EarlyStoppingCallback that
LLaMA-Factory builds, and two runs of the tiny model whose only difference is the key."""

from __future__ import annotations

import json
import logging

import pytest

from dataflex.args import DataFlexArguments
from dataflex.errors import ConfigError
from dataflex.plan import RunPlan


@pytest.mark.parametrize("value,fragment", [
    (-0.1, "early_stopping_min_delta: -0.1 is invalid; allowed: a number >= 0"),
    (True, "early_stopping_min_delta: True is invalid"),
    ("0.1", "early_stopping_min_delta: '0.1' is invalid"),
    ("1e-3", "YAML reads 1e-3 as a string; write 0.001"),
    (float("nan"), "early_stopping_min_delta: nan is invalid"),
    (float("inf"), "early_stopping_min_delta: inf is invalid"),
])
def test_bad_values_fail_in_one_line_with_or_without_train_type(value, fragment, train_config, tmp_path):
    cfg = train_config("/nonexistent/model", tmp_path / "out")
    plain = {k: v for k, v in cfg.items() if k not in ("train_type", "component_name", "warmup_step", "update_step",
                                                       "update_times")}
    for config in (cfg, plain):
        with pytest.raises(ConfigError) as err:
            RunPlan.build({**config, "early_stopping_min_delta": value, "early_stopping_steps": 2})
        assert fragment in str(err.value) and "\n" not in str(err.value)
    with pytest.raises(ConfigError, match="early_stopping_min_delta"):  # the parser's own check (LLaMA-Factory path)
        DataFlexArguments(early_stopping_min_delta=value).check_dataflex_args()


def test_good_values_pass_and_a_useless_one_warns(train_config, tmp_path, caplog):
    cfg = train_config("/nonexistent/model", tmp_path / "out")
    for value in (0, 0.0, 0.25, 3):
        assert RunPlan.build({**cfg, "early_stopping_min_delta": value, "early_stopping_steps": 2}).cfg[
            "early_stopping_min_delta"] == value
    with caplog.at_level(logging.WARNING, logger="dataflex"):
        RunPlan.build({**cfg, "early_stopping_min_delta": 0.1})
    assert "early_stopping_min_delta has no effect without early_stopping_steps" in caplog.text


@pytest.mark.parametrize("cfg,threshold", [({}, 0.0), ({"early_stopping_min_delta": 0.05}, 0.05),
                                           ({"early_stopping_min_delta": 2}, 2.0)])
def test_the_callback_llamafactory_builds_gets_the_threshold(cfg, threshold):
    import llamafactory.train.tuner as tuner
    from transformers import EarlyStoppingCallback

    from dataflex.integration import Run, _bound

    assert tuner.EarlyStoppingCallback is EarlyStoppingCallback
    with _bound(Run(RunPlan({"output_dir": "unused", **cfg}))):
        callback = tuner.EarlyStoppingCallback(early_stopping_patience=3)  # the call tuner.py makes
    assert isinstance(callback, EarlyStoppingCallback)
    assert (callback.early_stopping_patience, callback.early_stopping_threshold) == (3, threshold)
    assert tuner.EarlyStoppingCallback is EarlyStoppingCallback  # put back after the run


# ------------------------------------------------------------------------------------------ end to end
STEPS = 8


def _stop_step(losses: list[tuple[int, float]], patience: int, threshold: float) -> int:
    """The step at which transformers' rule stops: an eval that lowers the best loss by more than
    ``threshold`` resets the count of failed evals, any other adds one; ``patience`` failures stop."""
    best, failures = None, 0
    for step, loss in losses:
        if best is None or (loss < best and best - loss > threshold):
            failures = 0
        else:
            failures += 1
        best = loss if best is None else min(best, loss)
        if failures >= patience:
            return step
    return losses[-1][0]


def _run(folder, make_train_yaml, run_cli, min_delta):
    config = make_train_yaml(folder, eval_dataset="demo_add_eval", eval_strategy="steps", eval_steps=1,
                             per_device_eval_batch_size=8, metric_for_best_model="eval_loss",
                             early_stopping_steps=2, early_stopping_min_delta=min_delta, max_steps=STEPS,
                             train_step=STEPS, warmup_step=2, update_step=2, update_times=-1, learning_rate=1.0e-2)
    result = run_cli(["train", config], cwd=folder, timeout=300)
    assert result.returncode == 0, (result.stdout + result.stderr)[-4000:]
    state = json.loads((folder / "out" / "trainer_state.json").read_text())
    losses = [(e["step"], e["eval_loss"]) for e in state["log_history"] if "eval_loss" in e]
    return state["global_step"], losses


@pytest.mark.e2e
def test_min_delta_decides_when_training_stops(tmp_path, make_train_yaml, run_cli):
    """Same run twice: with min_delta 0 the eval loss keeps falling, so it trains all STEPS steps; with a
    min_delta larger than any eval-to-eval gain, evals 2 and 3 count as failures and it stops at step 3."""
    free_step, free_losses = _run(tmp_path / "free", make_train_yaml, run_cli, 0.0)
    strict_step, strict_losses = _run(tmp_path / "strict", make_train_yaml, run_cli, 10.0)
    assert [s for s, _ in free_losses] == list(range(1, free_step + 1))
    assert free_step == _stop_step(free_losses, 2, 0.0) == STEPS
    assert strict_step == _stop_step(strict_losses, 2, 10.0) == 3
    assert [s for s, _ in strict_losses] == [1, 2, 3]
    assert [v for _, v in strict_losses] == pytest.approx([v for _, v in free_losses[:3]])  # same run up to the stop
