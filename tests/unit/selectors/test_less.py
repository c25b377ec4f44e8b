"""The `less` selector: batched per-sample gradients, Adam preconditioning, the projection, the
choice on demo data, and end to end on 1 and 2 processes."""

from __future__ import annotations

import json
import logging
import math

import pytest
import torch

from support.helpers import failure_report

from dataflex.errors import ConfigError
from dataflex.scoring.engine import ScoringEngine, eval_mode
from dataflex.scoring.gradients import (
    GradientFeaturizer,
    UnsupportedParameters,
    decoder_layers,
    per_sample_gradients,
    sharded_features,
    trainable_linears,
)
from dataflex.scoring.optimizer_state import AdamMoment, adam_direction, adam_moments
from dataflex.scoring.projection import CountSketchProjector
from dataflex.selectors.base import SelectionContext
from dataflex.selectors.less import LessParams, LessSelector


def _tasks(data_dir):
    return [r["task"] for r in json.loads((data_dir / "demo_mix_train.json").read_text())]


# --------------------------------------------------------------------------- per-sample gradients
@pytest.fixture(scope="module")
def lf_pipeline(tiny_model, data_dir, tmp_path_factory):
    """Tiny model with LoRA (dropout 0.1) on all linear layers, demo data tokenized by LLaMA-Factory.

    LoRA B starts at zero (then every lora_A gradient is zero too), so the adapter weights are
    moved off their initial values, seeded, before anything is compared.
    """
    from support.helpers import load_lf_pipeline

    out = tmp_path_factory.mktemp("less-pipeline")
    parts = load_lf_pipeline(tiny_model, out, max_samples=30)
    gen = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for p in parts["model"].parameters():
            if p.requires_grad:
                p.add_(torch.randn(p.shape, generator=gen) * 0.05)
    return parts


def _rows(dataset, n_masked=2):
    rows = [dataset[i] for i in range(len(dataset))]
    for r in rows[:n_masked]:  # no supervised token at all: gradient 0, feature undefined
        rows.append({**r, "labels": [-100] * len(r["labels"])})
    return rows


def _batch1_gradients(model, collator, row):
    """The reference: this sample alone, loss.backward(), read .grad (dropout off)."""
    with eval_mode(model):
        model.zero_grad(set_to_none=True)
        model(**collator([row])).loss.backward()
        grads = {n: p.grad.reshape(-1).clone() for n, p in model.named_parameters() if p.requires_grad}
        model.zero_grad(set_to_none=True)
    return grads


def test_batched_per_sample_gradients_equal_batch1(lf_pipeline):
    model, collator = lf_pipeline["model"], lf_pipeline["collator"]
    rows = _rows(lf_pipeline["train_dataset"])
    lengths = [len(r["input_ids"]) for r in rows]
    assert len(set(lengths)) > 5  # the batch below is padded, heavily for its shortest rows
    batch = collator(rows)
    labels = batch.pop("labels")
    assert int((batch["attention_mask"] == 0).sum()) > 100
    model.train()  # LoRA dropout 0.1 and gradient checkpointing: per_sample_gradients switches both off
    result = per_sample_gradients(model, {**batch, "use_cache": False}, labels)
    grads = result.as_dict()
    assert model.training
    assert all(p.grad is None for p in model.parameters())  # .grad buffers untouched
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    assert sorted(grads) == sorted(names) and len(names) == 2 * 7 * 2  # A and B of 7 linears x 2 layers
    assert result.counts[-2:].tolist() == [0, 0]

    worst = 0.0
    for i, row in enumerate(rows):
        if all(label == -100 for label in row["labels"]):
            assert all(float(grads[n][i].abs().max()) == 0.0 for n in names)
            continue
        ref = _batch1_gradients(model, collator, row)
        for n in names:
            scale = float(ref[n].abs().max())
            assert scale > 0, n  # every LoRA matrix gets a gradient (B is not zero any more)
            worst = max(worst, float((grads[n][i] - ref[n]).abs().max()) / scale)
    assert worst < 1e-5, worst


def test_sharded_features_equal_batch1_and_are_dropout_free(lf_pipeline):
    model, collator = lf_pipeline["model"], lf_pipeline["collator"]
    rows = _rows(lf_pipeline["train_dataset"])
    engine = ScoringEngine(model, collator, "cpu", show_progress=False)
    featurizer = GradientFeaturizer(model, CountSketchProjector(512, seed=7))
    model.train()  # LoRA dropout 0.1 would change every feature if it were left on
    batched = sharded_features(engine, rows, range(len(rows)), 7, featurizer)
    tokens = sum(len(r["input_ids"]) for r in rows)
    assert engine.work.as_dict() == {"forward_tokens": tokens, "backward_tokens": tokens}  # one fwd + bwd per row
    single = sharded_features(engine, rows, range(len(rows)), 1, featurizer)
    assert model.training and all(p.grad is None for p in model.parameters())
    assert batched.shape == (len(rows), 512)
    nan_rows = torch.isnan(batched).all(dim=1)
    assert nan_rows.tolist() == [False] * (len(rows) - 2) + [True, True]
    assert torch.allclose(batched[~nan_rows].norm(dim=1), torch.ones(len(rows) - 2), atol=1e-5)
    cos = (batched[~nan_rows] * single[~nan_rows]).sum(dim=1)
    assert float(cos.min()) > 0.99999
    # a reduce runs where the features are computed and only its values come back
    target = batched[0]
    scores = sharded_features(engine, rows, [3, 0, 5], 2, featurizer, reduce=lambda f: f @ target)
    assert scores.shape == (3,)
    assert torch.allclose(scores, batched[[3, 0, 5]] @ target, atol=1e-5)


def _features_kept_whole(featurizer, inputs, labels):
    """The features as they were formed before the recomputing pass: every layer's inputs and output
    gradients kept to the end of one backward, then projected layer by layer."""
    out = torch.zeros(labels.shape[0], featurizer.projector.proj_dim)
    grads = per_sample_gradients(featurizer.model, inputs, labels, featurizer.targets)
    for name, g in grads:
        if featurizer.moments is not None:
            g = adam_direction(g, featurizer.moments[name])
        featurizer.projector.project_into(out, name, g)
    return out, grads.counts > 0


def _compare_recomputed_features(model, collator, rows, proj_dim=512):
    """Features from the streamed, recomputing pass against the whole-batch pass (with Adam moments)."""
    featurizer = GradientFeaturizer(model, CountSketchProjector(proj_dim, seed=7))
    assert featurizer.recompute and len(decoder_layers(model)) == model.config.num_hidden_layers
    gen = torch.Generator().manual_seed(3)
    featurizer.moments = {}
    for t in featurizer.targets:
        numel = t.module.weight.numel()
        featurizer.moments[t.weight_name] = AdamMoment(torch.randn(numel, generator=gen) * 1e-3,
                                                       torch.rand(numel, generator=gen) * 1e-6, 0.9, 0.999, 1e-8)
    batch = collator(rows)
    labels = batch.pop("labels")
    inputs = {**batch, "use_cache": False}
    model.train()
    new, valid = featurizer(inputs, labels)
    assert model.training and all(p.grad is None for p in model.parameters())
    forwards = []
    handle = featurizer.targets[0].module.register_forward_hook(lambda *a: forwards.append(1))
    try:
        featurizer(inputs, labels)
    finally:
        handle.remove()
    assert len(forwards) == 2  # once in the forward, once more in the backward's recompute
    featurizer.recompute = False
    plain, _ = featurizer(inputs, labels)
    old, old_valid = _features_kept_whole(featurizer, inputs, labels)
    assert valid.tolist() == old_valid.tolist()
    cos = torch.nn.functional.cosine_similarity(new[valid], old[valid], dim=1)
    cos_plain = torch.nn.functional.cosine_similarity(plain[valid], old[valid], dim=1)
    assert float(cos.min()) >= 0.99999 and float(cos_plain.min()) >= 0.99999, (cos.min(), cos_plain.min())
    assert torch.allclose(new[valid].norm(dim=1), old[valid].norm(dim=1), rtol=1e-4)
    assert torch.allclose(new[~valid], old[~valid], rtol=1e-4, atol=1e-6)  # the moments alone there
    return cos


def test_recomputed_features_equal_the_whole_batch_pass(lf_pipeline):
    """The memory-saving pass (blocks recomputed in the backward, each layer's gradient formed and
    projected as soon as it arrives) gives the features the whole-batch pass gives."""
    rows = _rows(lf_pipeline["train_dataset"])
    _compare_recomputed_features(lf_pipeline["model"], lf_pipeline["collator"], rows)


def test_recomputed_features_equal_the_whole_batch_pass_on_smollm2(smollm2, tmp_path):
    """The same on the real SmolLM2 (30 Llama blocks, grouped-query attention), 4 short rows."""
    from support.helpers import load_lf_pipeline

    parts = load_lf_pipeline(smollm2, tmp_path, template="smollm2", max_samples=4, cutoff_len=64)
    with torch.no_grad():  # LoRA B off zero, so the A matrices get gradients too
        gen = torch.Generator().manual_seed(5)
        for p in parts["model"].parameters():
            if p.requires_grad:
                p.add_(torch.randn(p.shape, generator=gen) * 0.01)
    rows = [parts["train_dataset"][i] for i in range(len(parts["train_dataset"]))]
    _compare_recomputed_features(parts["model"], parts["collator"], rows, proj_dim=2048)


def test_trainable_parameters_outside_linear_layers_are_rejected():
    model = torch.nn.Sequential(torch.nn.Embedding(10, 4), torch.nn.Linear(4, 3))
    model[1].weight.requires_grad_(False)
    with pytest.raises(UnsupportedParameters, match="'0.weight' is not part of a linear layer"):
        trainable_linears(model)
    model[0].weight.requires_grad_(False)
    (target,) = trainable_linears(model)  # a trainable bias alone is covered
    assert (target.weight_name, target.bias_name) == (None, "1.bias")
    model[1].bias.requires_grad_(False)
    with pytest.raises(UnsupportedParameters, match="no trainable parameters"):
        trainable_linears(model)


# --------------------------------------------------------------------------- Adam
def test_adam_direction_hand_computed():
    # m' = 0.9*0.1 + 0.1*0.5 = 0.14,  v' = 0.999*0.01 + 0.001*0.25 = 0.01024,  Γ = 0.14 / (√0.01024 + 1e-8)
    # m' = 0.9*0.2 - 0.1*1.0 = 0.08,  v' = 0.999*0.04 + 0.001*1.00 = 0.04096,  Γ = 0.08 / (√0.04096 + 1e-8)
    moment = AdamMoment(torch.tensor([0.1, 0.2]), torch.tensor([0.01, 0.04]), 0.9, 0.999, 1e-8)
    gamma = adam_direction(torch.tensor([[0.5, -1.0], [0.0, 0.0]]), moment)
    assert gamma[0].tolist() == pytest.approx([0.14 / math.sqrt(0.01024), 0.08 / math.sqrt(0.04096)], rel=1e-5)
    # a zero gradient still moves along the momentum: 0.09 / sqrt(0.00999), 0.18 / sqrt(0.03996)
    assert gamma[1].tolist() == pytest.approx([0.09 / math.sqrt(0.00999), 0.18 / math.sqrt(0.03996)], rel=1e-5)
    assert moment.exp_avg.tolist() == pytest.approx([0.1, 0.2])  # the optimizer's state is not modified


def test_adam_moments_read_through_accelerate_wrapper():
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.ReLU(), torch.nn.Linear(4, 2, bias=False))
    names = [n for n, _ in model.named_parameters()]
    try:
        accelerator = Accelerator(cpu=True)
        opt = accelerator.prepare(torch.optim.AdamW(model.parameters(), lr=0.1, betas=(0.8, 0.95), eps=1e-6))
        moments, reason = adam_moments(opt, model, names)
        assert moments is None and "no moments yet" in reason
        model(torch.randn(5, 3)).square().sum().backward()
        opt.step()
        moments, reason = adam_moments(opt, model, names)
    finally:
        AcceleratorState._reset_state(True)
    assert reason == "" and sorted(moments) == sorted(names)
    inner = opt.optimizer
    for name, p in model.named_parameters():
        m = moments[name]
        assert (m.beta1, m.beta2, m.eps) == (0.8, 0.95, 1e-6)
        assert torch.equal(m.exp_avg, inner.state[p]["exp_avg"].reshape(-1))
        assert torch.equal(m.exp_avg_sq, inner.state[p]["exp_avg_sq"].reshape(-1))
    sgd = torch.optim.SGD(model.parameters(), lr=0.1)
    model(torch.randn(5, 3)).sum().backward()
    sgd.step()
    moments, reason = adam_moments(sgd, model, names)
    assert moments is None and "SGD" in reason


# --------------------------------------------------------------------------- projection
def test_projection_is_deterministic_and_linear():
    gen = torch.Generator().manual_seed(0)
    a, b = torch.randn(3, 1000, generator=gen), torch.randn(3, 300, generator=gen)
    p1, p2 = CountSketchProjector(64, seed=123), CountSketchProjector(64, seed=123)
    out1 = p1.project({"a": a, "b": b})
    assert torch.equal(out1, p2.project({"a": a, "b": b}))  # another instance: bit for bit the same
    assert torch.allclose(out1, p2.project({"b": b, "a": a}), atol=1e-5)  # blocks in another order
    assert torch.allclose(out1, p1.project({"a": a}) + p1.project({"b": b}), atol=1e-5)
    assert not torch.allclose(out1, CountSketchProjector(64, seed=124).project({"a": a, "b": b}))
    bucket, sign = p1.hashes("a", 1000)
    assert bucket.min() >= 0 and bucket.max() < 64 and set(sign.unique().tolist()) == {-1.0, 1.0}
    assert p1.memory_bytes() == 1300 * 12  # O(num_params): an int64 bucket and an fp32 sign each


def test_projection_preserves_inner_products_within_jl_error():
    gen = torch.Generator().manual_seed(1)
    n, dim, k = 24, 20000, 1024
    base = torch.randn(dim, generator=gen)
    x = torch.randn(n, dim, generator=gen) + base * torch.linspace(0, 2, n)[:, None]  # cosines from ~0 to ~0.8
    x = x / x.norm(dim=1, keepdim=True)
    proj = CountSketchProjector(k, seed=123).project({"g": x})
    i, j = torch.triu_indices(n, n, 1)
    true = (x[i] * x[j]).sum(1)
    est = (proj[i] * proj[j]).sum(1)
    # the sketch's variance for this pair: (|x|²|y|² + <x,y>² - 2 Σ x²y²) / k
    var = (1 + true**2 - 2 * (x[i] ** 2 * x[j] ** 2).sum(1)) / k
    z = (est - true) / var.sqrt()
    assert float(true.max()) > 0.5 and float(true.abs().min()) < 0.05
    assert float(z.abs().max()) < 5.0
    assert 0.6 < float((z**2).mean()) < 1.5  # errors of the size the formula predicts
    norms = proj.norm(dim=1) ** 2
    assert float((norms - 1).abs().max()) < 5 * math.sqrt(2 / k)


# --------------------------------------------------------------------------- the selector
def test_params_are_checked():
    assert LessParams.from_dict("less", {}).proj_dim == 8192
    assert LessParams.from_dict("less", {}).gradient_type == "adam"
    with pytest.raises(ConfigError, match="param 'proj_dim' = 0 is invalid"):
        LessParams.from_dict("less", {"proj_dim": 0})
    with pytest.raises(ConfigError, match="param 'gradient_type'"):
        LessParams.from_dict("less", {"gradient_type": "adamw"})
    with pytest.raises(ConfigError, match="unknown param 'proj_dims'"):
        LessParams.from_dict("less", {"proj_dims": 8})
    # the seeds' components entry, cache_dir included, and the packaged one
    from dataflex.components_file import build_component, get_component, resolve_components_path

    seed = LessParams.from_dict("less", {"cache_dir": "../dataflex_saves/less_output", "gradient_type": "adam",
                                         "proj_dim": 4096, "seed": 123})
    assert (seed.proj_dim, seed.seed, seed.cumulative) == (4096, 123, True)
    packaged = build_component(get_component(resolve_components_path(None), "less"))
    assert isinstance(packaged, LessSelector) and packaged.params.proj_dim == 4096


@pytest.fixture(scope="module")
def demo_mix(tiny_model, data_dir, tmp_path_factory):
    """The whole demo mixture (600 rows, 15% "add") and the held-out "add" eval set, cutoff 64."""
    from support.helpers import load_lf_pipeline

    out = tmp_path_factory.mktemp("less-demo")
    return load_lf_pipeline(tiny_model, out, lora_rank=8, lora_dropout=None, dataset="demo_mix", cutoff_len=64,
                            max_samples=None)


def _context(parts, engine, optimizer, lr, selection, n=90, pool_gen_seed=0):
    return SelectionContext(
        step=10 * selection, selection=selection, num_selections=2, num_samples=n, train_dataset=parts["train_dataset"],
        scorer=engine, generator=torch.Generator().manual_seed(pool_gen_seed), eval_dataset=parts["eval_dataset"],
        optimizer=optimizer, learning_rate=lr,
    )


def test_less_picks_the_eval_task(demo_mix, data_dir, caplog):
    model, collator, train = demo_mix["model"], demo_mix["collator"], demo_mix["train_dataset"]
    tasks = _tasks(data_dir)
    assert len(train) == len(tasks) == 600 and len(demo_mix["eval_dataset"]) == 40
    share = tasks.count("add") / len(tasks)
    assert share == pytest.approx(0.15)
    engine = ScoringEngine(model, collator, "cpu", show_progress=False)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    selector = LessSelector(LessParams.from_dict("less", {"proj_dim": 1024, "scoring_batch_size": 16}))

    # before any optimizer step there are no moments: plain gradients, with a warning
    logger = logging.getLogger("dataflex")
    logger.addHandler(caplog.handler)
    try:
        first = selector.select(_context(demo_mix, engine, opt, 1e-3, 0))
    finally:
        logger.removeHandler(caplog.handler)
    assert first.summary["gradient_type"] == "sgd"
    assert "no moments yet" in caplog.text and "plain gradients (sgd)" in caplog.text

    # a few real AdamW steps on random batches of the mixture
    gen = torch.Generator().manual_seed(0)
    model.train()
    for _ in range(10):
        ids = torch.randperm(len(train), generator=gen)[:8].tolist()
        opt.zero_grad()
        model(**collator([train[i] for i in ids])).loss.backward()
        opt.step()
    opt.zero_grad(set_to_none=True)
    second = selector.select(_context(demo_mix, engine, opt, 5e-4, 1))
    assert second.summary["gradient_type"] == "adam"

    for result in (first, second):
        precision = sum(tasks[i] == "add" for i in result.indices) / len(result.indices)
        assert precision > 0.6, precision  # the minority share is 0.15
        assert len(set(result.indices)) == 90
    # S = η1·Score1 + η2·Score2, and the chosen are the 90 highest S
    S = selector.cumulative
    assert not torch.isnan(S).any()
    score1 = dict(zip(first.indices, first.per_sample["score"]))
    for i, s, c in zip(second.indices, second.per_sample["score"], second.per_sample["cumulative_score"]):
        assert float(S[i]) == pytest.approx(c)
        if i in score1:
            assert c == pytest.approx(1e-3 * score1[i] + 5e-4 * s, rel=1e-9)
    threshold = min(second.per_sample["cumulative_score"])
    others = [float(S[i]) for i in range(len(train)) if i not in set(second.indices)]
    assert max(others) <= threshold
    assert -1.0 <= min(second.per_sample["score"]) and max(second.per_sample["score"]) <= 1.0

    # the state survives a restart as JSON
    state = json.loads(json.dumps(selector.state_dict()))
    restored = LessSelector(selector.params)
    restored.load_state_dict(state)
    assert torch.equal(restored.cumulative, S) and restored.learning_rates == [1e-3, 5e-4]

    # cumulative: false ranks by this selection's score alone
    current = LessSelector(LessParams.from_dict("less", {"proj_dim": 1024, "cumulative": False}))
    current.load_state_dict(state)
    only_now = current.select(_context(demo_mix, engine, opt, 5e-4, 1))
    assert only_now.summary["ranked_by"] == "score"
    assert only_now.per_sample["score"] == pytest.approx(sorted(only_now.per_sample["score"], reverse=True))
    assert min(only_now.per_sample["score"]) >= min(second.per_sample["score"]) - 1e-6


# --------------------------------------------------------------------------- end to end
SCHEDULE = {"warmup_step": 2, "update_step": 2, "update_times": 2, "max_samples": 120, "cutoff_len": 64,
            "gradient_accumulation_steps": 1, "eval_dataset": "demo_add_eval", "dataset": "demo_mix",
            "component_name": "less_tiny", "save_steps": 2}
COMPONENTS = """selectors:
  less_tiny:
    name: less
    params:
      gradient_type: adam
      proj_dim: 256
      seed: 123
      scoring_batch_size: 8
"""


def _records(out):
    from support.helpers import records

    return {f"step_{k}.json": v for k, v in records(out).items()}


def _cumulative(out, checkpoint):
    """S per training row as the checkpoint's DataFlex state holds it."""
    state = json.loads((out / f"checkpoint-{checkpoint}" / "dataflex_state.json").read_text())
    return state["round"]["component"]["cumulative_score"]


@pytest.fixture(scope="module")
def less_runs(make_train_yaml, run_cli, tmp_path_factory):
    """The same run on 1 process (4 x 1) and on 2 processes (2 x 2): same global batch of 4."""
    tmp = tmp_path_factory.mktemp("less-e2e")
    components = tmp / "components.yaml"
    components.write_text(COMPONENTS)
    one = make_train_yaml(tmp / "one", per_device_train_batch_size=4, components_cfg_file=str(components), **SCHEDULE)
    two = make_train_yaml(tmp / "two", per_device_train_batch_size=2, components_cfg_file=str(components), **SCHEDULE)
    r1 = run_cli(["train", one], timeout=300)
    assert r1.returncode == 0, failure_report(r1)
    r2 = run_cli(["train", two], env={"FORCE_TORCHRUN": "1", "NPROC_PER_NODE": "2"}, timeout=300)
    assert r2.returncode == 0, failure_report(r2)
    return tmp / "one" / "out", tmp / "two" / "out", r1.stderr + r1.stdout


@pytest.mark.e2e
def test_e2e_records_and_log(less_runs):
    one, _, log = less_runs
    recs = _records(one)
    assert sorted(recs) == ["step_2.json", "step_4.json"]
    for rec in recs.values():
        assert rec["selector"] == "less" and len(rec["indices"]) == 8 and len(set(rec["indices"])) == 8
        m = rec["summary"]
        assert m["gradient_type"] == "adam" and m["eval_samples"] == 40 and m["scored"] == 120
        assert len(rec["per_sample"]["score"]) == len(rec["per_sample"]["cumulative_score"]) == 8
    # checkpoint-4 was saved after the selection at step 2 and before the one at step 4
    assert len(_cumulative(one, 4)) == 120
    # S at the second selection = S at the first + η2 · Score2, for every chosen sample
    second = recs["step_4.json"]
    s_before = _cumulative(one, 4)
    lr2 = second["summary"]["learning_rate"]
    assert lr2 > 0
    for i, score, cum in zip(second["indices"], second["per_sample"]["score"], second["per_sample"]["cumulative_score"]):
        assert cum == pytest.approx(s_before[i] + lr2 * score, rel=1e-9)
    assert "[DataFlex] less: 40 eval / 120 train gradients (adam, proj_dim 256" in log
    assert "by 'less'" in log


@pytest.mark.e2e
def test_e2e_two_processes_score_like_one(less_runs):
    one, two, _ = less_runs
    r1, r2 = _records(one), _records(two)
    assert r1.keys() == r2.keys()
    for name in r1:
        assert r1[name]["indices"] == r2[name]["indices"], name
        for key in ("score", "cumulative_score"):
            assert r1[name]["per_sample"][key] == pytest.approx(r2[name]["per_sample"][key], abs=1e-4, rel=1e-3), key
    assert _cumulative(one, 6) == pytest.approx(_cumulative(two, 6), abs=1e-7, rel=1e-3)


def test_missing_eval_dataset_is_a_one_line_error(train_config, run_cli, tmp_path):
    from support.helpers import write_yaml

    cfg = train_config("/nonexistent/dataflex-test-model", tmp_path / "out")
    cfg.update(component_name="less")
    cfg.pop("eval_dataset", None)
    res = run_cli(["train", write_yaml(tmp_path / "train.yaml", cfg)])
    err = res.stderr.strip()
    assert res.returncode == 2, res.stderr[-2000:]
    assert "\n" not in err and err.startswith("dataflex-cli: error: eval_dataset:"), err
    assert "selector 'less'" in err
    assert not (tmp_path / "out").exists()
