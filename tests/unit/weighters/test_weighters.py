"""Sample weighting (``train_type: dynamic_weight``): formulas, the weighted loss, and real runs.

Unit tests check each weighter against hand-computed values and the weighted loss's gradient
against per-sample gradients; the end-to-end runs use real LLaMA-Factory on the tiny model:
uniform weights reproduce plain training bit for bit (GA > 1, 2 processes), the weights are the
same on 1 and 2 processes, ``stage: pt`` trains, a resumed run continues with the same weights,
and the original DataFlex's weighter YAMLs train.
"""

from __future__ import annotations

import json
import logging
import math
import shutil
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import yaml

from support.helpers import REPO_ROOT, failure_report, kill_at_step, llamafactory_cli, run_command, weight_lines, write_yaml

from dataflex.errors import ConfigError
from dataflex.weighters.adapt import AdaptParams, AdaptWeighter, adapt_weights
from dataflex.weighters.base import WeightContext, WeightSignals
from dataflex.weighters.custom import CustomWeighter, CustomWeightParams
from dataflex.weighters.joint_update_aware import (JointUpdateAwareParams, JointUpdateAwareWeighter,
                                                   joint_weights)
from dataflex.weighters.loss import LossWeighter, LossWeightParams, loss_weights, rescale, strategy_score

LOSSES = torch.tensor([1.0, 2.0, 3.0, 5.0], dtype=torch.float64)  # min 1, max 5


# =========================================================================== formulas
def test_losses_are_rescaled_onto_minus_delta_delta():
    assert rescale(LOSSES, 1.0).tolist() == [-1.0, -0.5, 0.0, 1.0]
    assert rescale(LOSSES, 2.0).tolist() == [-2.0, -1.0, 0.0, 2.0]
    assert rescale(torch.tensor([3.0, 3.0], dtype=torch.float64), 1.0).tolist() == [0.0, 0.0]  # span clamped


@pytest.mark.parametrize("strategy, scores", [
    ("linupper", [0.0, 0.5, 1.0, 1.0]),       # min(l̂ + δ, δ)
    ("uniform", [-1.0, -0.5, 0.0, 1.0]),      # l̂
    ("quadratic", [0.0, 0.75, 1.0, 0.0]),     # 1 − l̂²/δ²
    ("extremes", [1.0, 0.5, 0.0, 1.0]),       # |l̂|
])
def test_strategy_scores_and_weights_hand_computed(strategy, scores):
    scaled = rescale(LOSSES, 1.0)
    assert strategy_score(scaled, strategy, 1.0).tolist() == scores
    for r in (1.0, 0.5):
        e = [math.exp(s / r) for s in scores]
        expected = [4 * x / sum(e) for x in e]  # n · softmax(score / r), mean 1
        assert loss_weights(LOSSES, strategy, 1.0, r).tolist() == pytest.approx(expected, rel=1e-12)


def test_loss_weights_skip_samples_without_tokens():
    losses = torch.tensor([1.0, float("nan"), 3.0], dtype=torch.float64)
    w = loss_weights(losses, "linupper", 1.0, 1.0)
    # valid: [1, 3] -> l̂ = [-1, 1] -> scores [0, 1] -> 2 · softmax
    e = [1.0, math.e]
    assert w.tolist() == pytest.approx([2 * e[0] / sum(e), 1.0, 2 * e[1] / sum(e)], rel=1e-12)


def test_adapt_weights_hand_computed():
    phi = torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.6, 0.8], [float("nan"), float("nan")]])
    anchor = torch.tensor([0.5, 0.5], dtype=torch.float64)  # the mean of two unit anchors
    w, s = adapt_weights(phi, anchor, tau=0.5, clip=None)
    sims = [0.5, 0.5, 0.7]
    assert s[:3].tolist() == pytest.approx(sims)
    assert w[:3].tolist() == pytest.approx([1 / (1 + math.exp(-x / 0.5)) for x in sims])
    assert w[3].item() == 1.0 and math.isnan(s[3].item())
    clipped, _ = adapt_weights(phi, anchor, tau=0.5, clip=0.75)
    assert clipped[:3].tolist() == pytest.approx([0.7311, 0.7311, 0.75], abs=1e-4)


def test_weighters_turn_signals_into_weights():
    sig = WeightSignals(step=3, indices=[0, 1, 2, 3], tokens=torch.tensor([5, 5, 5, 5]), losses=LOSSES)
    w, summary = LossWeighter(LossWeightParams.from_dict("w", {"strategy": "extremes"})).weights(sig)
    assert w.tolist() == pytest.approx(loss_weights(LOSSES, "extremes", 1.0, 1.0).tolist())
    assert summary == {"loss_min": 1.0, "loss_max": 5.0}
    w, _ = CustomWeighter(CustomWeightParams.from_dict("w", {})).weights(sig)
    assert w.tolist() == [1.0] * 4


@pytest.mark.parametrize("cls, params, key", [
    (LossWeightParams, {"strategy": "lower"}, "strategy"),
    (LossWeightParams, {"delta": 0}, "delta"),
    (LossWeightParams, {"r": -1}, "r"),
    (LossWeightParams, {"scope": "step"}, "scope"),
    (AdaptParams, {"tau": 0}, "tau"),
    (AdaptParams, {"refresh_interval": 0}, "refresh_interval"),
    (AdaptParams, {"clip": 0}, "clip"),
    (CustomWeightParams, {"strategy": "random"}, "strategy"),
    (JointUpdateAwareParams, {"beta": -0.1}, "beta"),
    (JointUpdateAwareParams, {"tau": 0}, "tau"),
    (JointUpdateAwareParams, {"damping": 0}, "damping"),
    (JointUpdateAwareParams, {"damping": 1.5}, "damping"),
    (JointUpdateAwareParams, {"max_iter": 0}, "max_iter"),
    (JointUpdateAwareParams, {"tol": 0}, "tol"),
    (JointUpdateAwareParams, {"target_update_step": 0}, "target_update_step"),
    (JointUpdateAwareParams, {"target_num_batches": -1}, "target_num_batches"),
    (JointUpdateAwareParams, {"pooling": "max"}, "pooling"),
])
def test_bad_params_are_one_line_errors(cls, params, key):
    with pytest.raises(ConfigError, match=f"'{key}'") as err:
        cls.from_dict("w", params)
    assert "\n" not in str(err.value)


# --------------------------------------------------------------------------- joint_update_aware
def _hand_made(seed=0, b=6, d=4):
    gen = torch.Generator().manual_seed(seed)
    z = torch.nn.functional.normalize(torch.randn(b, d, generator=gen, dtype=torch.float64), dim=1)
    u = torch.nn.functional.normalize(torch.randn(d, generator=gen, dtype=torch.float64), dim=0)
    return z, u


@pytest.mark.parametrize("beta, tau", [(0.5, 0.2), (2.0, 0.1), (5.0, 0.5)])
def test_joint_weights_solve_the_simplex_problem(beta, tau):
    """The fixed point against scipy's SLSQP on the same objective, and the KKT conditions: at an
    interior optimum s_i − β(Sw)_i − τ(log w_i + 1) is the same for every row."""
    from scipy.optimize import minimize

    z, u = _hand_made()
    w, info = joint_weights(z, u, beta, tau, damping=0.5, max_iter=5000, tol=1e-13)
    assert info["converged"]
    s, gram = (z @ u).numpy(), (z @ z.T).numpy()

    def negative(x):
        x = np.clip(x, 1e-300, None)
        return -(s @ x - beta / 2 * x @ gram @ x - tau * np.sum(x * np.log(x)))

    res = minimize(negative, np.full(len(s), 1 / len(s)), method="SLSQP", bounds=[(1e-12, 1)] * len(s),
                   constraints=[{"type": "eq", "fun": lambda x: x.sum() - 1}], options={"ftol": 1e-14, "maxiter": 500})
    assert res.success
    assert w.numpy() == pytest.approx(res.x, abs=1e-5)
    assert float(w.sum()) == pytest.approx(1.0, abs=1e-12) and bool((w > 0).all())
    grad = s - beta * gram @ w.numpy() - tau * (np.log(w.numpy()) + 1)
    assert np.ptp(grad) < 1e-9


def test_joint_weights_with_beta_zero_are_softmax_over_tau():
    z, u = _hand_made(1)
    w, _ = joint_weights(z, u, beta=0.0, tau=0.3, damping=1.0, tol=1e-15)
    assert torch.allclose(w, torch.softmax(z @ u / 0.3, dim=0), atol=1e-12)


def test_rows_that_repeat_each_other_share_their_weight():
    """Two copies of one row and one other row with the same alignment: with beta > 0 the copies get less
    each than the single row (their updates would add up); with beta 0 all three are equal."""
    u = torch.tensor([1.0, 0.0, 0.0], dtype=torch.float64)
    a = torch.tensor([0.6, 0.8, 0.0], dtype=torch.float64)
    b = torch.tensor([0.6, 0.0, 0.8], dtype=torch.float64)
    z = torch.stack([a, a, b])
    w0, _ = joint_weights(z, u, 0.0, 0.2)
    w, _ = joint_weights(z, u, 2.0, 0.2, max_iter=2000, tol=1e-12)
    assert torch.allclose(w0, torch.full((3,), 1 / 3, dtype=torch.float64))
    assert w[0] == pytest.approx(float(w[1]), abs=1e-9) and w[0] < w[2]


def test_the_weighter_gives_mean_one_over_rows_with_tokens_and_keeps_its_target_in_the_state():
    z, u = _hand_made(2, b=5)
    z = torch.cat([z.float(), torch.full((1, 4), float("nan"))])  # a row without tokens
    jw = JointUpdateAwareWeighter(JointUpdateAwareParams(beta=1.0, tau=0.2))
    jw.target, jw.target_step = u, 3
    weights, info = jw.weights(WeightSignals(step=4, indices=list(range(6)), tokens=torch.ones(6), embeddings=z))
    expected, _ = joint_weights(z[:5], u, 1.0, 0.2)
    assert torch.allclose(weights[:5], expected * 5, atol=1e-6) and float(weights[5]) == 1.0
    assert info["target_step"] == 3
    again = JointUpdateAwareWeighter(JointUpdateAwareParams(beta=1.0, tau=0.2))
    again.load_state_dict(json.loads(json.dumps(jw.state_dict())))
    assert torch.equal(again.target, jw.target) and again.target_step == 3


def test_without_an_eval_set_the_target_is_the_batch_mean_with_one_warning(caplog):
    z, _ = _hand_made(3)
    jw = JointUpdateAwareWeighter(JointUpdateAwareParams(beta=0.0, tau=0.5))
    jw.prepare(WeightContext(step=0, scorer=None, eval_dataset=None))
    with caplog.at_level(logging.WARNING, logger="dataflex"):
        w, _ = jw.weights(WeightSignals(step=0, indices=list(range(6)), tokens=torch.ones(6), embeddings=z.float()))
        jw.weights(WeightSignals(step=1, indices=list(range(6)), tokens=torch.ones(6), embeddings=z.float()))
    mean = z.mean(dim=0)
    want = torch.softmax(z @ (mean / mean.norm()) / 0.5, dim=0) * 6
    assert torch.allclose(w, want, atol=1e-5)
    assert sum("no eval_dataset" in r.message for r in caplog.records) == 1


def test_pooling_the_last_token_takes_each_rows_last_attended_position():
    from dataflex.scoring.embeddings import pool_states

    hidden = torch.arange(2 * 3 * 2, dtype=torch.float32).reshape(2, 3, 2) + 1
    mask = torch.tensor([[1, 1, 0], [0, 0, 0]])
    out = pool_states([hidden], mask, layer=-1, pooling="last")
    assert torch.allclose(out[0], torch.nn.functional.normalize(hidden[0, 1], dim=0))
    assert bool(torch.isnan(out[1]).all())


def test_adapt_refreshes_its_anchors_every_refresh_interval():
    class Engine:
        rank, world_size = 0, 1
        calls = 0

    embedded = []

    def fake_embed(engine, dataset, indices, batch_size, layer=-1, desc=""):
        embedded.append(len(list(indices)))
        return torch.tensor([[1.0, 0.0], [0.0, 1.0]])

    import dataflex.weighters.adapt as adapt

    original = adapt.embed
    adapt.embed = fake_embed
    try:
        w = AdaptWeighter(AdaptParams.from_dict("a", {"refresh_interval": 3}))
        for step in range(10, 17):
            w.prepare(SimpleNamespace(step=step, scorer=Engine(), eval_dataset=[0, 1]))
    finally:
        adapt.embed = original
    assert len(embedded) == 3 and w.anchor_step == 16  # at steps 10, 13 and 16 only
    state = json.loads(json.dumps(w.state_dict()))
    again = AdaptWeighter(w.params)
    again.load_state_dict(state)
    assert torch.equal(again.anchor, w.anchor) and again.anchor_step == 16


# =========================================================================== the weighted loss
def test_weighted_loss_gradient_equals_the_hand_weighted_sum_of_per_sample_gradients(tiny_model):
    """L = model loss + Σ (w_i − 1) S_i / N has the gradient Σ_i w_i ∇S_i / N."""
    from transformers import AutoModelForCausalLM

    from dataflex.scoring.losses import sample_loss_sums
    from dataflex.modes.loss import weight_correction

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(str(tiny_model), dtype=torch.float64)
    ids = torch.randint(1, 400, (3, 9))
    labels = ids.clone()
    labels[0, :4] = -100
    labels[2, :7] = -100
    mask = torch.ones_like(ids)
    weights = torch.tensor([0.5, 2.0, 0.5], dtype=torch.float64)
    fake = SimpleNamespace(model_accepts_loss_kwargs=True, compute_loss_func=None,
                           args=SimpleNamespace(average_tokens_across_devices=False, n_gpu=1))
    n_items = int((labels[:, 1:] != -100).sum())
    out = model(input_ids=ids, attention_mask=mask, labels=labels, num_items_in_batch=n_items)
    sums, counts = sample_loss_sums(out.logits, labels)
    loss = out.loss + weight_correction(fake, weights, sums, counts, n_items)
    params = [p for p in model.parameters()]
    got = torch.autograd.grad(loss, params)

    expected = [torch.zeros_like(p) for p in params]
    for i in range(3):  # each sample alone: its own summed token loss S_i, weighted by hand
        o = model(input_ids=ids[i:i + 1], attention_mask=mask[i:i + 1], labels=labels[i:i + 1])
        s_i = o.loss * int((labels[i, 1:] != -100).sum())
        for acc, g in zip(expected, torch.autograd.grad(s_i, params)):
            acc += weights[i] * g / n_items
    for g, e in zip(got, expected):
        assert torch.allclose(g, e, atol=1e-6, rtol=1e-5)
    # with weights exactly 1 the correction is exactly 0: the model's own loss, bit for bit
    zero = weight_correction(fake, torch.ones(3, dtype=torch.float64), sums, counts, n_items)
    assert zero.item() == 0.0


# =========================================================================== end to end
BASE = {"train_type": "dynamic_weight", "max_samples": 64, "cutoff_len": 64, "warmup_step": 1, "train_step": 5,
        "per_device_train_batch_size": 2, "gradient_accumulation_steps": 2, "logging_steps": 1}


def _weight_config(make_train_yaml, folder, component, drop=("update_step", "update_times"), **extra):
    cfg = {**BASE, "component_name": component, **extra}
    return make_train_yaml(folder, **cfg, **{k: None for k in drop})


def _losses(out: Path) -> list[float]:
    state = json.loads((out / "trainer_state.json").read_text())
    return [h["loss"] for h in state["log_history"] if "loss" in h]


@pytest.fixture(scope="module")
def uniform_vs_plain(make_train_yaml, run_cli, tmp_path_factory):
    """custom (uniform weights) through dataflex-cli vs plain llamafactory-cli, both on 2 processes, GA 2."""
    tmp = tmp_path_factory.mktemp("uniform")
    ours = _weight_config(make_train_yaml, tmp / "ours", "custom", warmup_step=0)
    env = {"FORCE_TORCHRUN": "1", "NPROC_PER_NODE": "2"}
    r1 = run_cli(["train", ours], env=env, timeout=400)
    assert r1.returncode == 0, failure_report(r1)
    plain = yaml.safe_load(ours.read_text())
    for key in ("train_type", "component_name", "warmup_step", "components_cfg_file"):
        plain.pop(key, None)
    plain["max_steps"] = plain.pop("train_step")
    plain["output_dir"] = str(tmp / "plain" / "out")
    path = write_yaml(tmp / "plain.yaml", plain)
    r2 = run_command([*llamafactory_cli(), "train", path], env=env, timeout=400)
    assert r2.returncode == 0, failure_report(r2)
    return tmp / "ours" / "out", tmp / "plain" / "out", r1.stderr + r1.stdout


@pytest.mark.e2e
def test_uniform_weights_reproduce_plain_llamafactory_bit_for_bit(uniform_vs_plain):
    from safetensors.torch import load_file

    ours, plain, log = uniform_vs_plain
    a, b = _losses(ours), _losses(plain)
    assert len(a) == len(b) == 5 and a == b  # exactly, every logged step
    lines = weight_lines(ours)
    assert [ln["step"] for ln in lines] == [0, 1, 2, 3, 4]  # weighted from step 0 (warmup_step 0)
    assert all(w == 1.0 for ln in lines for w in ln["weights"]) and all(len(ln["weights"]) == 8 for ln in lines)
    wa, wb = load_file(ours / "adapter_model.safetensors"), load_file(plain / "adapter_model.safetensors")
    assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)
    # the run says that its weights never left 1, once (rank 0), and records their range
    assert log.count("weighter 'custom': every weight of its 5 weighted step(s) stayed within [1.0000, 1.0000]") == 1
    results = json.loads((ours / "train_results.json").read_text())
    assert (results["dataflex_weight_min"], results["dataflex_weight_max"]) == (1.0, 1.0)


@pytest.fixture(scope="module")
def loss_weight_runs(make_train_yaml, run_cli, tmp_path_factory):
    """The loss weighter on one process (2 x GA 2) and on two (2 x GA 1): the same global batch of 4."""
    tmp = tmp_path_factory.mktemp("lossw")
    one = _weight_config(make_train_yaml, tmp / "one", "loss", plot_loss=True)
    two = _weight_config(make_train_yaml, tmp / "two", "loss", gradient_accumulation_steps=1)
    r1 = run_cli(["train", one], env={"DATAFLEX_TRACE_DIR": tmp / "trace1"}, timeout=400)
    assert r1.returncode == 0, failure_report(r1)
    r2 = run_cli(["train", two], env={"FORCE_TORCHRUN": "1", "NPROC_PER_NODE": "2", "DATAFLEX_TRACE_DIR": tmp / "trace2"},
                 timeout=400)
    assert r2.returncode == 0, failure_report(r2)
    return tmp, r1.stderr + r1.stdout


@pytest.mark.e2e
def test_one_and_two_processes_give_the_same_weights(loss_weight_runs):
    tmp, log = loss_weight_runs
    one, two = weight_lines(tmp / "one" / "out"), weight_lines(tmp / "two" / "out")
    assert [ln["step"] for ln in one] == [ln["step"] for ln in two] == [1, 2, 3, 4]  # warmup_step 1
    for a, b in zip(one, two):
        wa, wb = dict(zip(a["indices"], a["weights"])), dict(zip(b["indices"], b["weights"]))
        assert wa.keys() == wb.keys()  # the same samples in the step (LLaMA-Factory's sampler)
        assert all(wa[i] == pytest.approx(wb[i], abs=1e-5) for i in wa)
        assert len(set(a["weights"])) > 1  # not uniform
        assert sum(a["weights"]) == pytest.approx(4.0, abs=1e-5)  # mean 1
    # what each rank trained on carries exactly the recorded weights
    from support.helpers import traces

    for folder, lines in (("trace1", one), ("trace2", two)):
        recorded = {ln["step"]: dict(zip(ln["indices"], ln["weights"])) for ln in lines}
        for rank, trace in traces(tmp / folder).items():
            for line in trace:
                if line["step"] in recorded:
                    got = dict(zip(line["indices"], line["weights"]))
                    assert all(got[i] == pytest.approx(recorded[line["step"]][i], abs=1e-6) for i in got)
    assert "dataflex/weight_ess" in log and (tmp / "one" / "out" / "dataflex_weights.png").stat().st_size > 1000
    # the run's range of weights is the records' (one and two processes alike); spread weights are not warned about
    for lines, folder in ((one, "one"), (two, "two")):
        results = json.loads((tmp / folder / "out" / "train_results.json").read_text())
        low, high = min(ln["min"] for ln in lines), max(ln["max"] for ln in lines)
        assert (results["dataflex_weight_min"], results["dataflex_weight_max"]) == (low, high) and high - low > 0.02
    assert "stayed within" not in log


@pytest.mark.e2e
def test_batch_size_one_with_accumulation_still_weights_the_global_batch(make_train_yaml, run_cli, tmp_path):
    """per_device_train_batch_size 1 on one process: the original weighted each 1-sample micro-batch alone
    (every weight 1); here the 4 micro-batches of a step are weighted together."""
    cfg = _weight_config(make_train_yaml, tmp_path, "loss", per_device_train_batch_size=1, gradient_accumulation_steps=4,
                         train_step=3)
    res = run_cli(["train", cfg], timeout=300)
    assert res.returncode == 0, failure_report(res)
    lines = weight_lines(tmp_path / "out")
    assert [len(ln["weights"]) for ln in lines] == [4, 4]
    assert all(ln["std"] > 0.01 for ln in lines), lines


@pytest.mark.e2e
def test_pretraining_text_and_micro_batch_scope(make_train_yaml, run_cli, tmp_path):
    (tmp_path / "components.yaml").write_text(
        "weighters:\n  lossm:\n    name: loss\n    params: {strategy: quadratic, scope: micro_batch}\n")
    cfg = _weight_config(make_train_yaml, tmp_path, "lossm", stage="pt", dataset="wiki_demo,demo_code",
                         components_cfg_file=str(tmp_path / "components.yaml"), max_samples=40)
    res = run_cli(["train", cfg], timeout=300)
    assert res.returncode == 0, failure_report(res)
    lines = weight_lines(tmp_path / "out")
    assert {ln["micro"] for ln in lines} == {0, 1} and len(lines) == 2 * 4  # one decision per micro-batch
    assert all(len(ln["weights"]) == 2 for ln in lines)
    assert "weights of step" not in res.stderr  # no error lines
    assert all(math.isfinite(x) for x in _losses(tmp_path / "out"))


@pytest.mark.e2e
def test_adapt_resumes_with_the_weights_of_an_uninterrupted_run(make_train_yaml, run_cli, tmp_path):

    (tmp_path / "components.yaml").write_text(
        "weighters:\n  adapt:\n    name: adapt\n    params: {refresh_interval: 4, tau: 0.1}\n")
    common = dict(eval_dataset="demo_add_eval", components_cfg_file=str(tmp_path / "components.yaml"), train_step=8,
                  save_steps=3, warmup_step=1)
    ref = _weight_config(make_train_yaml, tmp_path / "ref", "adapt", **common)
    res = run_cli(["train", ref], timeout=300)
    assert res.returncode == 0, failure_report(res)
    crash = _weight_config(make_train_yaml, tmp_path / "crash", "adapt", **common)
    kill_at_step(["train", crash], 7, tmp_path)
    out = tmp_path / "crash" / "out"
    # checkpoint-6 holds the anchors of the refresh at step 5 (steps 1 and 5 refresh; 6 does not)
    state = json.loads((out / "checkpoint-6" / "dataflex_state.json").read_text())
    assert state["round"]["component"]["anchor_step"] == 5
    res = run_cli(["train", crash, f"resume_from_checkpoint={out / 'checkpoint-6'}"], timeout=300)
    assert res.returncode == 0, failure_report(res)
    a, b = weight_lines(tmp_path / "ref" / "out"), weight_lines(out)
    assert [ln["step"] for ln in a] == [ln["step"] for ln in b] == list(range(1, 8))
    for x, y in zip(a, b):
        assert x["indices"] == y["indices"]  # LLaMA-Factory's sampler resumes where it was
        assert x["weights"] == pytest.approx(y["weights"], abs=1e-6)
        assert x["anchor_step"] == y["anchor_step"]


@pytest.mark.e2e
def test_joint_update_aware_on_one_and_two_processes_and_after_a_kill(make_train_yaml, run_cli, tmp_path):
    """The same weights on 1 process (2 x GA 2) and 2 (2 x GA 1); a run killed at step 7 and resumed
    from checkpoint-6 gives the uninterrupted run's weights (its target u comes from the checkpoint)."""
    (tmp_path / "components.yaml").write_text(
        "weighters:\n  jua:\n    name: joint_update_aware\n    params: {beta: 2.0, tau: 0.05, target_update_step: 4}\n")
    common = dict(eval_dataset="demo_add_eval", components_cfg_file=str(tmp_path / "components.yaml"), train_step=8,
                  save_steps=3, warmup_step=1)
    ref = _weight_config(make_train_yaml, tmp_path / "ref", "jua", **common)
    res = run_cli(["train", ref], timeout=300)
    assert res.returncode == 0, failure_report(res)
    two = _weight_config(make_train_yaml, tmp_path / "two", "jua", gradient_accumulation_steps=1, **common)
    res = run_cli(["train", two], env={"FORCE_TORCHRUN": "1", "NPROC_PER_NODE": "2"}, timeout=400)
    assert res.returncode == 0, failure_report(res)
    crash = _weight_config(make_train_yaml, tmp_path / "crash", "jua", **common)
    kill_at_step(["train", crash], 7, tmp_path)
    out = tmp_path / "crash" / "out"
    state = json.loads((out / "checkpoint-6" / "dataflex_state.json").read_text())
    assert state["round"]["component"]["target_step"] == 5  # steps 1 and 5 recompute u
    res = run_cli(["train", crash, f"resume_from_checkpoint={out / 'checkpoint-6'}"], timeout=300)
    assert res.returncode == 0, failure_report(res)
    a, b, c = weight_lines(tmp_path / "ref" / "out"), weight_lines(tmp_path / "two" / "out"), weight_lines(out)
    assert [ln["step"] for ln in a] == [ln["step"] for ln in b] == [ln["step"] for ln in c] == list(range(1, 8))
    for x, y, z in zip(a, b, c):
        assert x["converged"] and len(set(x["weights"])) > 1
        assert sum(x["weights"]) == pytest.approx(len(x["weights"]), abs=1e-5)  # mean 1
        wx, wy = dict(zip(x["indices"], x["weights"])), dict(zip(y["indices"], y["weights"]))
        assert wx.keys() == wy.keys() and all(wx[i] == pytest.approx(wy[i], abs=1e-4) for i in wx)
        assert x["indices"] == z["indices"] and x["weights"] == pytest.approx(z["weights"], abs=1e-6)
        assert x["target_step"] == z["target_step"]


# --------------------------------------------------------------------------- the original's YAMLs
ORIGINAL = REPO_ROOT / "examples" / "train_lora" / "weighters"
CPU = ["bf16=false", "cutoff_len=64", "max_samples=48", "train_step=4", "warmup_step=2", "save_steps=1000",
       "gradient_accumulation_steps=2", "logging_steps=1", "plot_loss=false"]


@pytest.mark.e2e
@pytest.mark.parametrize("name", ["loss", "adapt", "custom", "joint_update_aware"])
def test_the_original_weighter_yamls_train(name, tiny_model, run_cli, tmp_path):
    """The original's example YAMLs, unchanged on disk; on the command line only what a CPU run needs
    (the tiny model, no bf16, the demo data) and a short run."""
    work = tmp_path / "work"
    shutil.copytree(REPO_ROOT / "data", work / "data")
    for dataset in ("alpaca_en_demo.json", "alpaca_zh_demo.json"):  # stand-ins for LLaMA-Factory's demo files
        shutil.copy(REPO_ROOT / "data" / "demo_mix_train.json", work / "data" / dataset)
    args = ["train", ORIGINAL / f"{name}.yaml", f"model_name_or_path={tiny_model}", "template=default",
            f"output_dir={tmp_path / 'out'}", *CPU]
    res = run_cli(args, cwd=work, timeout=300)
    assert res.returncode == 0, failure_report(res)
    lines = weight_lines(tmp_path / "out")
    assert [ln["step"] for ln in lines] == [2, 3] and all(len(ln["weights"]) == 4 for ln in lines)
