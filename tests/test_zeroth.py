"""The zeroth-order (SPSA) selector: finite differences, restoring the parameters, the estimate
against exact autograd gradients, determinism, parameter checks, and `dataflex-cli train` end to
end on 1 and 2 processes."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml

from conftest import failure_report

from dataflex.errors import ConfigError, SelectionError
from dataflex.scoring.engine import ScoringEngine
from dataflex.scoring.zeroth import (
    OutputPerturbation,
    Perturbation,
    ZerothOrderProbe,
    direction_seed,
    gaussian_direction,
    tensor_direction,
    trainable_parameters,
)


# --------------------------------------------------------------------------- helpers
def spearman(a: torch.Tensor, b: torch.Tensor) -> float:
    from scipy.stats import spearmanr

    return float(spearmanr(a.numpy(), b.numpy()).statistic)


def snapshot(model) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def assert_bit_exact(model, before: dict[str, torch.Tensor]) -> None:
    for name, p in model.named_parameters():
        assert p.dtype == before[name].dtype, name
        assert torch.equal(p.detach(), before[name]), f"{name} changed"


def exact_gradients(model, collator, dataset, ids) -> torch.Tensor:
    """Per-sample gradients of the mean token loss (flattened trainable params), batch-1 autograd."""
    params = [p for _, p in trainable_parameters(model)]
    rows = []
    model.eval()
    for i in ids:
        loss = model(**collator([dataset[int(i)]])).loss
        grads = torch.autograd.grad(loss, params)
        rows.append(torch.cat([g.reshape(-1).double() for g in grads]))
    return torch.stack(rows)


def train_briefly(model, collator, dataset, steps: int, lr: float = 3e-3) -> None:
    """A few seeded Adam steps on the LoRA weights, so lora_B is no longer zero (a mid-training state)."""
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.Adam(params, lr=lr)
    g = torch.Generator().manual_seed(0)
    model.train()
    for _ in range(steps):
        ids = torch.randint(len(dataset), (8,), generator=g).tolist()
        model(**collator([dataset[i] for i in ids])).loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    model.eval()


@pytest.fixture(scope="module")
def lf(tiny_model, data_dir, tmp_path_factory):
    """Tiny LoRA model briefly trained on demo_mix, eval set demo_add_eval, via LLaMA-Factory itself."""
    from conftest import load_lf_pipeline

    torch.manual_seed(0)
    out = tmp_path_factory.mktemp("zeroth-pipeline")
    parts = load_lf_pipeline(tiny_model, out, dataset="demo_mix", cutoff_len=64, max_samples=80)
    train_briefly(parts["model"], parts["collator"], parts["train_dataset"], steps=40)
    return parts


def make_ctx(lf, selection=0, num_samples=10, records_dir="."):
    from dataflex.selectors.base import SelectionContext

    model = lf["model"]
    return SelectionContext(
        step=4, selection=selection, num_selections=2, num_samples=num_samples, train_dataset=lf["train_dataset"],
        scorer=ScoringEngine(model, lf["collator"], "cpu", show_progress=False),
        generator=torch.Generator().manual_seed(selection), records_dir=records_dir, eval_dataset=lf["eval_dataset"],
    )


def zeroth(**params):
    from dataflex.components import ComponentSpec, build_component

    return build_component(ComponentSpec("z", "selectors", "zeroth", params, Path("components.yaml")))


# --------------------------------------------------------------------------- restoring parameters
def test_parameters_restored_bit_exactly(lf):
    model = lf["model"]
    model.train()  # LoRA dropout on: scoring must switch it off and switch training back on
    before = snapshot(model)
    assert all(p.grad is None for p in model.parameters())
    probe = ZerothOrderProbe(ScoringEngine(model, lf["collator"], "cpu", show_progress=False), 1e-3)
    train_ids, eval_ids = range(20), range(10)
    d_train, d_eval = probe.differences([(lf["train_dataset"], train_ids), (lf["eval_dataset"], eval_ids)],
                                        [gaussian_direction(7, 0, k) for k in range(2)], batch_size=8)
    assert d_train.shape == (20, 2) and d_eval.shape == (10, 2)
    assert torch.isfinite(d_train).all() and d_train.abs().max() > 0
    assert_bit_exact(model, before)
    grad, n = probe.eval_gradient(lf["eval_dataset"], eval_ids, batch_size=4)
    assert n == 10 and any(g.abs().max() > 0 for g in grad)
    assert_bit_exact(model, before)
    assert all(p.grad is None for p in model.parameters())  # .grad never written
    assert model.training
    model.eval()


def test_parameters_restored_after_a_failing_forward(lf):
    model = lf["model"]
    before = snapshot(model)
    probe = ZerothOrderProbe(ScoringEngine(model, lf["collator"], "cpu", show_progress=False), 1e-3)
    # the second set has an index past the end: the forward of that set raises while θ is perturbed
    sets = [(lf["train_dataset"], range(8)), (lf["eval_dataset"], [0, 10_000])]
    with pytest.raises((SelectionError, IndexError)):
        probe.differences(sets, [gaussian_direction(1, 0, 0)], batch_size=4)
    assert_bit_exact(model, before)


def test_output_perturbation_equals_perturbing_the_weights(lf):
    """The ZeRO-3 path (hooks adding x·(hξ)^T to each LoRA linear's output) computes the same
    losses as writing θ0 + hξ into the weights, and never writes a parameter."""
    model, collator = lf["model"], lf["collator"]
    engine = ScoringEngine(model, collator, "cpu", show_progress=False)
    params = trainable_parameters(model)
    before = snapshot(model)
    hooks = sum(len(m._forward_hooks) for m in model.modules())
    direction, ids = gaussian_direction(13, 0, 0), range(24)
    plain = engine.losses(lf["train_dataset"], ids, 8)
    with Perturbation(params) as pert:
        pert.apply(direction, 0.05)
        in_place = engine.losses(lf["train_dataset"], ids, 8)
    with OutputPerturbation(model, params) as pert:
        pert.apply(direction, 0.05)
        via_outputs = engine.losses(lf["train_dataset"], ids, 8)
        assert_bit_exact(model, before)
        pert.restore()
        assert torch.equal(engine.losses(lf["train_dataset"], ids, 8), plain)  # restored: no offset left
    assert (in_place - plain).abs().max() > 1e-3  # the step is large enough to matter
    assert torch.allclose(via_outputs, in_place, rtol=1e-5, atol=1e-6)
    assert sum(len(m._forward_hooks) for m in model.modules()) == hooks  # its hooks removed on exit


def test_output_perturbation_needs_linear_trainables():
    model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.LayerNorm(4))
    with pytest.raises(ValueError, match=r"ZeRO-3 perturbs linear layers only: trainable parameter '1.weight'"):
        OutputPerturbation(model, trainable_parameters(model))


def test_probe_via_outputs_matches_in_place_probe(lf):
    """Differences and the eval gradient without touching θ (what ZeRO-3 runs) agree with the default path."""
    model, collator = lf["model"], lf["collator"]
    before = snapshot(model)
    sets = [(lf["train_dataset"], range(30)), (lf["eval_dataset"], range(12))]
    dirs = [gaussian_direction(21, 0, k) for k in range(3)]
    results = {}
    for via in (False, True):
        probe = ZerothOrderProbe(ScoringEngine(model, collator, "cpu", show_progress=False), 1e-2, via_outputs=via)
        grad, n = probe.eval_gradient(lf["eval_dataset"], range(12), batch_size=5)
        results[via] = probe.differences(sets, dirs, batch_size=8), grad, n
    (d0, g0, n0), (d1, g1, n1) = results[False], results[True]
    for a, b in zip(d0, d1):
        assert float((a - b).norm() / a.norm()) < 1e-3
    assert n0 == n1 == 12
    for a, b in zip(g0, g1):
        assert torch.allclose(a, b, rtol=1e-4, atol=1e-7)
    assert_bit_exact(model, before)
    assert all(p.grad is None for p in model.parameters())


def test_half_precision_parameters_restored_and_perturbed_in_fp32():
    layer = torch.nn.Linear(16, 8).to(torch.bfloat16)
    params = list(layer.named_parameters())
    before = {n: p.detach().clone() for n, p in params}
    direction = gaussian_direction(3, 0, 0)
    with Perturbation(params) as pert:
        pert.apply(direction, 0.05)
        w = dict(params)["weight"]
        expected = (before["weight"].float() + 0.05 * direction(0, "weight", w)).to(torch.bfloat16)
        assert torch.equal(w.detach(), expected)  # one rounding, from the fp32 sum
        pert.apply(direction, -0.05)
        pert.apply(direction, 0.05)  # applying again from the copy: no drift
        assert torch.equal(w.detach(), expected)
    for n, p in params:
        assert torch.equal(p.detach(), before[n])


def test_half_precision_model_warns_about_small_epsilon():
    import logging

    model = torch.nn.Sequential(torch.nn.Linear(4, 4).to(torch.bfloat16), torch.nn.Linear(4, 4))
    for p in model[0].parameters():
        p.requires_grad_(False)
    records: list[str] = []
    handler = logging.Handler()
    handler.emit = lambda record: records.append(record.getMessage())
    logger = logging.getLogger("dataflex")
    logger.addHandler(handler)
    old_level = logger.level
    logger.setLevel(logging.INFO)
    try:
        ZerothOrderProbe(ScoringEngine(model, None, "cpu", show_progress=False), 1e-3)
        assert any("computes in torch.bfloat16" in r and "epsilon 0.01" in r for r in records), records
        records.clear()
        ZerothOrderProbe(ScoringEngine(model, None, "cpu", show_progress=False), 2e-2)
        assert records == []
        model[0].float()
        ZerothOrderProbe(ScoringEngine(model, None, "cpu", show_progress=False), 1e-3)
        assert records == []  # float32 model: the default epsilon is fine
    finally:
        logger.removeHandler(handler)
        logger.setLevel(old_level)


# --------------------------------------------------------------------------- the finite difference
def test_finite_difference_matches_directional_derivative_float64(tiny_model):
    """Smooth case: the tiny model in float64 with LoRA; d must equal ∇f·ξ (autograd) to O(h²)."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer, DataCollatorForSeq2Seq

    torch.manual_seed(0)
    base = AutoModelForCausalLM.from_pretrained(str(tiny_model), dtype=torch.float64)
    model = get_peft_model(base, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "up_proj"],
                                            lora_dropout=0.0))
    with torch.no_grad():  # lora_B starts at zero: give it values so every parameter matters
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.05)
    model.eval()
    collator = DataCollatorForSeq2Seq(AutoTokenizer.from_pretrained(str(tiny_model)), label_pad_token_id=-100)
    g = torch.Generator().manual_seed(2)
    rows = []
    for _ in range(6):
        ids = torch.randint(1, 400, (int(torch.randint(8, 24, (1,), generator=g)),), generator=g).tolist()
        rows.append({"input_ids": ids, "attention_mask": [1] * len(ids), "labels": [-100] * 4 + ids[4:]})

    params = trainable_parameters(model)
    direction = gaussian_direction(5, 0, 0)
    xi = [direction(i, n, p).double() for i, (n, p) in enumerate(params)]
    exact = []
    for r in rows:
        grads = torch.autograd.grad(model(**collator([r])).loss, [p for _, p in params])
        exact.append(sum(float((gr * x).sum()) for gr, x in zip(grads, xi)))
    exact = torch.tensor(exact, dtype=torch.float64)

    probe = ZerothOrderProbe(ScoringEngine(model, collator, "cpu", show_progress=False), 1e-3)
    errors = {}
    for h in (2e-2, 1e-2, 1e-3):
        (d,) = probe.differences([(rows, range(len(rows)))], [direction], batch_size=3, h=h)
        errors[h] = float((d[:, 0] - exact).norm() / exact.norm())
    assert errors[1e-3] < 2e-3, errors  # matches ∇f·ξ (the loss itself is reduced in float32)
    # central difference: the error falls like h² (a one-sided difference would give a ratio of 2)
    assert 3.0 < errors[2e-2] / errors[1e-2] < 5.0, errors

    # forward difference: (f(θ+hξ) − f(θ)) / h, one shared f(θ); its error falls like h
    forward = {}
    for h in (2e-2, 1e-2, 1e-3):
        (d,) = probe.differences([(rows, range(len(rows)))], [direction], batch_size=3, h=h, scheme="forward")
        forward[h] = float((d[:, 0] - exact).norm() / exact.norm())
    assert 1.6 < forward[2e-2] / forward[1e-2] < 2.4, forward
    # one order of h less: 2.4 % at h = 1e-3 here (central 0.05 %); the selector's default step,
    # epsilon x rms(θ), is one to two orders smaller still
    assert forward[1e-3] < 5e-2 and forward[1e-3] > 10 * errors[1e-3], (forward, errors)
    # by hand: the unperturbed losses and the perturbed ones, through the model's own loss
    h = 1e-2
    with torch.no_grad():
        base_losses = torch.tensor([float(model(**collator([r])).loss) for r in rows], dtype=torch.float64)
        backup = [p.detach().clone() for _, p in params]
        for (_, p), x in zip(params, xi):
            p.add_(h * x)
        plus = torch.tensor([float(model(**collator([r])).loss) for r in rows], dtype=torch.float64)
        for (_, p), b in zip(params, backup):
            p.copy_(b)
    (d,) = probe.differences([(rows, range(len(rows)))], [direction], batch_size=3, h=h, scheme="forward")
    # (float32 loss reductions of batched vs single rows differ in the last digits, divided by h; the
    # central difference differs from this by ~20 % here, so the tolerance still tells them apart)
    assert d[:, 0].tolist() == pytest.approx(((plus - base_losses) / h).tolist(), rel=1e-3, abs=5e-4)
    with pytest.raises(ValueError, match="scheme"):
        probe.differences([(rows, range(len(rows)))], [direction], batch_size=3, h=h, scheme="backward")


def test_directions_depend_only_on_seed_selection_and_name():
    p = torch.empty(3, 4)
    a = gaussian_direction(42, 1, 0)(0, "w", p)
    assert torch.equal(a, gaussian_direction(42, 1, 0)(5, "w", p))  # position in the list does not matter
    assert not torch.equal(a, gaussian_direction(42, 1, 1)(0, "w", p))
    assert not torch.equal(a, gaussian_direction(42, 2, 0)(0, "w", p))
    assert not torch.equal(a, gaussian_direction(43, 1, 0)(0, "w", p))
    assert not torch.equal(a, gaussian_direction(42, 1, 0)(0, "v", p))
    assert direction_seed(42, 1, 0, "w") == direction_seed(42, 1, 0, "w") < 2**63


# --------------------------------------------------------------------------- against exact gradients
@pytest.fixture(scope="module")
def exact_scores(lf):
    """Exact g(z)·ḡ_eval for the first 60 training samples (autograd, batch-1 loop)."""
    model, collator = lf["model"], lf["collator"]
    train_ids = list(range(60))
    g_train = exact_gradients(model, collator, lf["train_dataset"], train_ids)
    g_eval = exact_gradients(model, collator, lf["eval_dataset"], range(len(lf["eval_dataset"]))).mean(dim=0)
    return train_ids, g_train @ g_eval, g_eval


def test_random_directions_estimate_correlates_with_exact(lf, exact_scores):
    train_ids, exact, _ = exact_scores
    probe = ZerothOrderProbe(ScoringEngine(lf["model"], lf["collator"], "cpu", show_progress=False), 1e-3)
    eval_ids = range(len(lf["eval_dataset"]))
    K = 32
    d_train, d_eval = probe.differences([(lf["train_dataset"], train_ids), (lf["eval_dataset"], eval_ids)],
                                        [gaussian_direction(11, 0, k) for k in range(K)], batch_size=16)
    estimate = d_train @ d_eval.mean(dim=0) / K
    rho = spearman(estimate, exact)
    assert rho > 0.4, rho  # 60 samples: chance gives |rho| ~ 0.13
    assert probe.cost.sample_forwards == 2 * K * (len(train_ids) + len(eval_ids))
    # the K-direction score is the mean of K single-direction (seed formula) scores
    singles = torch.stack([d_train[:, k] * d_eval[:, k].mean() for k in range(K)], 1)
    assert torch.allclose(singles.mean(1), estimate)


def test_eval_gradient_direction_matches_exact(lf, exact_scores):
    train_ids, exact, g_eval = exact_scores
    probe = ZerothOrderProbe(ScoringEngine(lf["model"], lf["collator"], "cpu", show_progress=False), 1e-3)
    grad, n = probe.eval_gradient(lf["eval_dataset"], range(len(lf["eval_dataset"])), batch_size=7)
    flat = torch.cat([g.reshape(-1).double() for g in grad])
    assert n == len(lf["eval_dataset"])
    assert torch.allclose(flat, g_eval, rtol=1e-4, atol=1e-6)  # batched backward = batch-1 autograd mean
    norm = float(flat.norm())
    root_n = probe.num_params ** 0.5
    (d,) = probe.differences([(lf["train_dataset"], train_ids)], [tensor_direction(grad, root_n / norm)], 16)
    estimate = d[:, 0] * norm / root_n
    assert spearman(estimate, exact) > 0.98
    assert float((estimate - exact).norm() / exact.norm()) < 0.05


# --------------------------------------------------------------------------- the selector
def test_selector_picks_top_scores_and_is_deterministic(lf):
    params = {"seed": 5, "num_directions": 3, "scoring_batch_size": 8, "candidate_pool": 50}
    a = zeroth(**params).select(make_ctx(lf, selection=1, num_samples=12))
    b = zeroth(**params).select(make_ctx(lf, selection=1, num_samples=12))
    assert a.indices == b.indices and a.per_sample["score"] == b.per_sample["score"]  # same seed: same result, exactly
    assert a.per_sample["score"] == sorted(a.per_sample["score"], reverse=True)
    assert len(set(a.indices)) == 12 and a.summary["num_directions"] == 3
    assert a.summary["sample_forwards"] == 2 * 3 * (50 + len(lf["eval_dataset"]))
    assert min(a.per_sample["score"]) >= a.summary["pool_score_mean"]
    # another batching changes the float32 losses in the last digits only; divided by 2h that stays small
    c = zeroth(**{**params, "scoring_batch_size": 16}).select(make_ctx(lf, selection=1, num_samples=12))
    assert len(set(a.indices) & set(c.indices)) >= 10
    assert c.per_sample["score"][:5] == pytest.approx(a.per_sample["score"][:5], rel=1e-2)
    other = zeroth(**{**params, "seed": 6}).select(make_ctx(lf, selection=1, num_samples=12))
    assert other.per_sample["score"] != a.per_sample["score"]  # another seed: other directions
    later = zeroth(**params).select(make_ctx(lf, selection=2, num_samples=12))
    assert later.per_sample["score"] != a.per_sample["score"]  # another selection: other directions


def test_forward_differences_cost_k_plus_one_forwards_and_rank_alike(lf):
    """difference: forward shares f(θ) across the K directions: K + 1 forwards per sample instead of
    2K, and at the default step the ranking is that of the central differences."""
    params = {"seed": 5, "num_directions": 4, "scoring_batch_size": 8, "candidate_pool": 50}
    central = zeroth(**params).select(make_ctx(lf, selection=1, num_samples=50))
    forward = zeroth(**params, difference="forward").select(make_ctx(lf, selection=1, num_samples=50))
    n = 50 + len(lf["eval_dataset"])
    assert central.summary["sample_forwards"] == 2 * 4 * n and central.summary["difference"] == "central"
    assert forward.summary["sample_forwards"] == (4 + 1) * n and forward.summary["difference"] == "forward"
    rank_c = dict(zip(central.indices, central.per_sample["score"]))
    rank_f = dict(zip(forward.indices, forward.per_sample["score"]))
    common = sorted(rank_c)
    assert sorted(rank_f) == common
    a = torch.tensor([rank_c[i] for i in common]).argsort().argsort().double()
    b = torch.tensor([rank_f[i] for i in common]).argsort().argsort().double()
    rho = float(torch.corrcoef(torch.stack([a, b]))[0, 1])  # Spearman: Pearson of the ranks (no ties here)
    assert rho > 0.99, rho


def _batch1_losses(model, collator, rows):
    """Each sample alone through the model's own loss: no DataFlex code involved."""
    out = []
    with torch.no_grad():
        for row in rows:
            if all(label == -100 for label in row["labels"][1:]):
                out.append(float("nan"))
                continue
            out.append(model(**collator([row])).loss.double().item())
    return torch.tensor(out, dtype=torch.float64)


def test_selector_scores_equal_an_independent_finite_difference(lf):
    """score(z) = (1/K) Σ_k d_k(z) · mean_z' d_k(z'), recomputed here by perturbing θ by hand."""
    import math

    from dataflex.selectors.base import candidate_indices
    from dataflex.seeding import derive_seed

    # eps 1e-2: the float32 rounding of a loss, divided by 2h, then stays well below the tolerance on any
    # CPU's kernels (at 1e-3 it reached 1.6 % on an AVX-512 machine); both sides use the same h
    seed, K, eps = 9, 2, 1e-2
    ctx = make_ctx(lf, selection=0, num_samples=5)
    res = zeroth(seed=seed, num_directions=K, candidate_pool=30, epsilon=eps).select(ctx)
    pool = candidate_indices(make_ctx(lf, selection=0), 30)
    model, collator = lf["model"], lf["collator"]
    train = [lf["train_dataset"][i] for i in pool]
    evals = [lf["eval_dataset"][i] for i in range(len(lf["eval_dataset"]))]
    params = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    original = [p.detach().clone() for _, p in params]
    h = eps * math.sqrt(sum(float(p.double().pow(2).sum()) for p in original) / sum(p.numel() for p in original))
    model.eval()
    d_train, d_eval = [], []
    try:
        for k in range(K):
            noise = [torch.randn(p.shape, generator=torch.Generator().manual_seed(
                derive_seed("zeroth", seed, 0, k, n)), dtype=torch.float32) for n, p in params]
            side = {}
            for sign in (1, -1):
                with torch.no_grad():
                    for (_, p), p0, xi in zip(params, original, noise):
                        p.copy_(p0 + sign * h * xi)
                side[sign] = (_batch1_losses(model, collator, train), _batch1_losses(model, collator, evals))
            d_train.append((side[1][0] - side[-1][0]) / (2 * h))
            d_eval.append((side[1][1] - side[-1][1]) / (2 * h))
    finally:
        with torch.no_grad():
            for (_, p), p0 in zip(params, original):
                p.copy_(p0)
    d_train, d_eval = torch.stack(d_train, 1), torch.stack(d_eval, 1)
    target = d_eval[~torch.isnan(d_eval[:, 0])].mean(dim=0)
    scores = d_train @ target / K
    top = torch.argsort(-torch.nan_to_num(scores, nan=-float("inf")), stable=True)[:5]
    assert res.indices == [pool[int(i)] for i in top]
    # batch-1 float32 forwards against the engine's padded batches: the rounding, divided by 2h, is ~0.2%
    assert res.per_sample["score"] == pytest.approx(scores[top].tolist(), rel=5e-3)


def test_selector_eval_gradient_and_saved_differences(lf, tmp_path):
    sel = zeroth(direction="eval_gradient", scoring_batch_size=16, save_differences=True)
    ctx = make_ctx(lf, num_samples=8, records_dir=str(tmp_path))
    res = sel.select(ctx)
    assert res.summary["direction"] == "eval_gradient" and len(res.indices) == 8
    saved = torch.load(tmp_path / "zeroth_step_4.pt")
    top = torch.argsort(-saved["scores"], stable=True)[:8]
    assert [saved["pool"][int(i)] for i in top] == res.indices
    assert res.summary["sample_forwards"] == len(lf["eval_dataset"]) + 2 * len(lf["train_dataset"])


def test_small_pool_repeats_the_ranking(lf):
    res = zeroth(num_directions=1, candidate_pool=5).select(make_ctx(lf, num_samples=8))
    assert res.summary["repeated"] is True and res.summary["pool_size"] == 5
    assert res.per_sample["score_rank"] == [0, 1, 2, 3, 4, 0, 1, 2]
    assert res.indices[5:] == res.indices[:3] and len(set(res.indices)) == 5


@pytest.mark.parametrize("params, key", [
    ({"num_directions": 0}, "num_directions"),
    ({"num_directions": -3}, "num_directions"),
    ({"epsilon": 0}, "epsilon"),
    ({"epsilon": -1e-3}, "epsilon"),
    ({"epsilon": float("inf")}, "epsilon"),
    ({"direction": "eval-gradient"}, "direction"),
    ({"difference": "backward"}, "difference"),
    ({"num_direction": 4}, "num_direction"),
    ({"seed": "42"}, "seed"),
    ({"scoring_batch_size": 0}, "scoring_batch_size"),
])
def test_bad_params_are_one_line_config_errors(params, key):
    with pytest.raises(ConfigError) as err:
        zeroth(**params)
    msg = str(err.value)
    assert "\n" not in msg and f"'{key}'" in msg and "component 'z'" in msg


def test_seed_components_entry_and_packaged_entry(tmp_path):
    from dataflex.components import PACKAGED_COMPONENTS, build_component, get_component

    path = tmp_path / "components.yaml"  # the seed page's entry, verbatim keys and values
    path.write_text("zeroth:\n  name: zeroth\n  params:\n    cache_dir: ../dataflex_saves/zeroth_output\n"
                    "    seed: 42\n")
    sel = build_component(get_component(path, "zeroth"))
    assert sel.params.seed == 42 and sel.params.cache_dir == "../dataflex_saves/zeroth_output"
    assert sel.needs_eval and sel.supported_finetuning == ("lora",)
    packaged = build_component(get_component(PACKAGED_COMPONENTS, "zeroth"))
    assert packaged.params.seed == 42 and packaged.params.direction == "random"


def test_seed_training_yaml_passes_the_selector_checks(repo_root, monkeypatch):
    """The seed page's training YAML (examples/train_lora/selectors/zeroth.yaml) validates with this selector."""
    from dataflex.plan import RunPlan
    from dataflex.components import PACKAGED_COMPONENTS

    monkeypatch.chdir(repo_root)
    path = repo_root / "examples" / "train_lora" / "selectors" / "zeroth.yaml"
    cfg = yaml.safe_load(path.read_text())
    assert cfg["component_name"] == "zeroth" and cfg["finetuning_type"] == "lora"
    checked = RunPlan.build(cfg, path.parent).cfg
    assert checked["components_cfg_file"] == str(PACKAGED_COMPONENTS)
    cfg.pop("eval_dataset")
    with pytest.raises(ConfigError, match="eval_dataset: required by selector 'zeroth'"):
        RunPlan.build(cfg, path.parent)
    with pytest.raises(ConfigError, match="finetuning_type: 'full' is not supported by selector 'zeroth'"):
        RunPlan.build({**cfg, "eval_dataset": "x", "finetuning_type": "full"}, path.parent)


# --------------------------------------------------------------------------- end to end
E2E = {"warmup_step": 2, "update_step": 2, "update_times": 2, "max_samples": 120, "cutoff_len": 64,
       "gradient_accumulation_steps": 1, "eval_dataset": "demo_add_eval", "dataset": "demo_mix",
       "lora_rank": 4}


def _records(out: Path) -> dict[str, dict]:
    from conftest import records

    return {f"step_{k}.json": v for k, v in records(out).items()}


@pytest.mark.e2e
# random directions with central differences on two processes are also compared with one process in
# test_deepspeed.py (ZeRO-3); here random runs with forward differences (the shared unperturbed pass)
@pytest.mark.parametrize("direction, difference", [pytest.param("random", "central", marks=pytest.mark.slow),
                                                   ("random", "forward"), ("eval_gradient", "central")])
def test_cli_train_one_and_two_processes_agree(direction, difference, make_train_yaml, run_cli, tmp_path):
    """Same global batch (4 x 1 process, 2 x 2 processes): the same samples are trained on, so every
    selection must choose the same indices with the same scores."""
    runs = {}
    for name, per_device, env in (("one", 4, None), ("two", 2, {"FORCE_TORCHRUN": "1", "NPROC_PER_NODE": "2"})):
        cache = tmp_path / name / "zeroth_output"
        comps_file = tmp_path / f"components_{name}.yaml"
        comps_file.write_text(yaml.safe_dump({"selectors": {"zeroth": {"name": "zeroth", "params": {
            "cache_dir": str(cache), "seed": 42, "num_directions": 2, "scoring_batch_size": 16,
            # epsilon 1e-2: the float32 rounding that padding moves between 1 and 2 processes, divided by
            # h, stays far from the gaps between ranked scores on any CPU's kernels (1e-3 swapped a pick
            # with forward differences on an AVX-512 machine)
            "epsilon": 1e-2, "direction": direction, "difference": difference}}}}))
        cfg = make_train_yaml(tmp_path / name, component_name="zeroth", components_cfg_file=str(comps_file),
                              per_device_train_batch_size=per_device, **E2E)
        res = run_cli(["train", cfg], env=env, timeout=400)
        assert res.returncode == 0, failure_report(res)
        runs[name] = (tmp_path / name / "out", res.stdout + res.stderr)
    for name, world in (("one", 1), ("two", 2)):
        manifest = json.loads((tmp_path / name / "out" / "dataflex" / "run.json").read_text())
        assert manifest["world_size"] == world and manifest["name"] == "zeroth"
        assert Path(manifest["records"]).parent == tmp_path / name / "zeroth_output"  # cache_dir/<run id>
    one, two = _records(runs["one"][0]), _records(runs["two"][0])
    assert sorted(one) == sorted(two) == ["step_2.json", "step_4.json"]
    K = 2 if direction == "random" else 1
    passes = 2 * K if difference == "central" else K + 1
    forwards = passes * (120 + 40) if direction == "random" else 40 + 2 * 120
    for step in one:
        a, b = one[step], two[step]
        assert a["selector"] == "zeroth" and len(a["indices"]) == 8
        assert a["indices"] == b["indices"], step  # same directions and scores on 1 and 2 ranks
        # DDP's gradient averaging leaves θ different in the last float32 digits; the float32 loss
        # rounding that this moves is divided by 2h (about 1e-4 here): a few 1e-3 relative
        assert a["per_sample"]["score"] == pytest.approx(b["per_sample"]["score"], rel=2e-2, abs=1e-4)
        assert a["summary"]["direction"] == direction and a["summary"]["num_directions"] == K
        assert a["summary"]["difference"] == b["summary"]["difference"] == difference
        assert a["summary"]["eval_samples"] == 40 and a["summary"]["sample_forwards"] == forwards
    assert one["step_2.json"]["per_sample"]["score"] != one["step_4.json"]["per_sample"]["score"]
    log = runs["one"][1]
    assert "by 'zeroth'" in log
    if direction == "random":
        assert "[DataFlex] zeroth: 2 random direction(s) over 120 train + 40 eval samples" in log
    else:
        assert "[DataFlex] zeroth: the eval-gradient direction over 120 train + 40 eval samples" in log


def test_missing_eval_dataset_is_a_one_line_error(train_config, run_cli, tmp_path):
    from conftest import write_yaml

    cfg = train_config("/nonexistent/dataflex-test-model", tmp_path / "out")
    cfg.update(component_name="zeroth")
    cfg.pop("eval_dataset", None)
    res = run_cli(["train", write_yaml(tmp_path / "train.yaml", cfg)])
    assert res.returncode != 0
    err = res.stderr.strip()
    assert "\n" not in err and err.startswith("dataflex-cli: error: "), res.stderr
    assert "eval_dataset" in err and "zeroth" in err
    assert not (tmp_path / "out").exists()
