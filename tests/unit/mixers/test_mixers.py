"""Domain mixing (``train_type: dynamic_mix``): mixer formulas, rows per domain, DoReMi's three steps, real runs.

Unit tests check DoReMi, ODM and dynamic MoE updates against hand-computed values and the
α-weighted loss against per-domain gradients; the end-to-end runs use real LLaMA-Factory on the
tiny models: the rows each rank trains on per domain equal the records on 1 and 2 processes,
DoReMi's loss weights are the same on every rank and its weights JSON feeds step 3, ``stage: pt``
blocks never cross domains, and the original DataFlex's mixer YAMLs train.
"""

from __future__ import annotations

import json
import math
import shutil
from collections import Counter
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import yaml

from support.helpers import REPO_ROOT, failure_report, records, traces

from dataflex.values import read_proportions
from dataflex.dist.agreement import Agreement
from dataflex.core.records import RunLog
from dataflex.modes.mix import MixRound, MixSetup
from dataflex.core.sampling import DomainSampler, largest_remainder
from dataflex.errors import ConfigError
from dataflex.mixers.base import DomainStats, MixContext
from dataflex.mixers.doremi import doremi_update
from dataflex.mixers.dynamic_moe import gate_loads, moe_update, routing_distance
from dataflex.mixers.odm import OdmMixer, OdmParams, exploration, odm_policy
from dataflex.mixers.random import RandomMixer, RandomMixParams
from dataflex.mixers.static import StaticMixer, StaticParams
from dataflex.schedule import Schedule


# =========================================================================== formulas
def test_doremi_update_hand_computed():
    alpha = torch.tensor([0.5, 0.5], dtype=torch.float64)
    lam = torch.tensor([0.2, 0.0], dtype=torch.float64)
    got = doremi_update(alpha, lam, eta=1.0, eps=0.1)
    a = [0.5 * math.exp(0.2), 0.5]
    expected = [0.9 * x / sum(a) + 0.1 / 2 for x in a]  # (1 − c) α'/Σα' + c/k
    assert got.tolist() == pytest.approx(expected, rel=1e-12)
    assert got[0] > got[1]  # the domain with the larger excess loss gets the larger weight


def test_odm_exploration_and_policy_hand_computed():
    assert exploration(0, 4, 0.0) == 0.25
    assert exploration(1, 4, 0.0) == 0.25  # sqrt(ln 4 / 4) = 0.59 > 1/K
    assert exploration(10, 4, 0.0) == pytest.approx(math.sqrt(math.log(4) / 40))
    assert exploration(10_000, 4, 0.03) == 0.03
    rewards = torch.tensor([1.0, 3.0], dtype=torch.float64)
    eps_prev, eps_now = 0.3, 0.2
    e = [math.exp(0.3 * 1.0), math.exp(0.3 * 3.0)]
    expected = [(1 - 2 * 0.2) * x / sum(e) + 0.2 for x in e]
    assert odm_policy(rewards, eps_prev, eps_now).tolist() == pytest.approx(expected, rel=1e-12)


def _stats(loss_sum, tokens, excess=None):
    k = len(loss_sum)
    return DomainStats(torch.tensor(loss_sum, dtype=torch.float64), torch.tensor(tokens, dtype=torch.float64),
                       torch.tensor(excess or [0.0] * k, dtype=torch.float64), torch.ones(k, dtype=torch.float64))


def _mix_ctx(step, proportions, stats, update=0):
    k = len(proportions)
    return MixContext(step=step, update=update, domains=[f"d{i}" for i in range(k)], sizes=[10] * k,
                      proportions=proportions, stats=stats, steps_since=1, total_steps=100, seed=0)


def test_odm_updates_against_hand_computed_rewards():
    odm = OdmMixer(OdmParams.from_dict("o", {"alpha": 0.5, "warmup_steps": 3, "reward_scale": 2.0}))
    odm.setup(["a", "b"], [10, 10], [0.5, 0.5], 100, warmup_step=1)
    assert odm.start_step == 3  # max(warmup_step, warmup_steps)
    d = odm.update(_mix_ctx(2, [0.5, 0.5], _stats([9.0, 9.0], [3, 3])))
    assert d.proportions == [0.5, 0.5] and d.summary["phase"] == "warm-up"
    first = odm.update(_mix_ctx(3, [0.5, 0.5], _stats([9.0, 9.0], [3, 3])))  # starts: no reward learnt yet
    assert odm.rewards.tolist() == [0.0, 0.0] and first.proportions == pytest.approx([0.5, 0.5])
    # a step drawn with π = [0.25, 0.75]: a's loss 2.0 (4 / 2 tokens), b's 1.0; rewards importance-weighted
    second = odm.update(_mix_ctx(4, [0.25, 0.75], _stats([4.0, 3.0], [2, 3])))
    r = [0.5 * 0 + 0.5 * 2.0 * 2.0 / 0.25, 0.5 * 0 + 0.5 * 2.0 * 1.0 / 0.75]
    assert odm.rewards.tolist() == pytest.approx(r, rel=1e-12)
    eps1, eps2 = exploration(1, 2, 0.0), exploration(2, 2, 0.0)
    assert second.proportions == pytest.approx(odm_policy(torch.tensor(r, dtype=torch.float64), eps1, eps2).tolist(),
                                               rel=1e-12)
    # a domain not trained on in the step keeps its reward
    odm.update(_mix_ctx(5, second.proportions, _stats([2.0, 0.0], [1, 0])))
    assert odm.rewards[1] == pytest.approx(r[1])


def test_dynamic_moe_gate_loads_distance_and_update_hand_computed():
    # one layer's router logits for 2 samples x 3 tokens, 3 experts, top-2; the last token of sample 1 is padding
    logits = torch.tensor([[3, 2, 0], [3, 0, 2], [0, 3, 2], [3, 2, 0], [3, 2, 0], [0, 0, 9]], dtype=torch.float32)
    mask = torch.tensor([[1, 1, 1], [1, 1, 0]])
    loads = gate_loads(logits, 2, mask, batch=2)
    assert loads.tolist() == [[2.0, 2.0, 2.0], [2.0, 2.0, 0.0]]
    o = torch.tensor([[0.5, 0.5, 0.0], [0.5, 0.5, 0.0], [0.0, 0.0, 1.0]], dtype=torch.float64)
    delta = routing_distance(o)
    far = math.sqrt(0.25 + 0.25 + 1.0)
    assert delta.tolist() == pytest.approx([far / 3, far / 3, 2 * far / 3])  # mean over all domains, itself included
    w = torch.tensor([0.2, 0.3, 0.5], dtype=torch.float64)
    a = torch.softmax(torch.log(w) + 10 * delta, dim=0)
    expected = (0.95 * a + 0.05 / 3)
    assert moe_update(w, delta, 10.0, 0.05).tolist() == pytest.approx((expected / expected.sum()).tolist())


def test_random_and_static_mixers():
    mixer = RandomMixer(RandomMixParams.from_dict("r", {"seed": 7}))
    a = mixer.update(_mix_ctx(0, [0.5, 0.5], _stats([0, 0], [0, 0]), update=0)).proportions
    b = mixer.update(_mix_ctx(0, [0.5, 0.5], _stats([0, 0], [0, 0]), update=1)).proportions
    again = RandomMixer(RandomMixParams.from_dict("r", {"seed": 7})).update(
        _mix_ctx(0, [0.5, 0.5], _stats([0, 0], [0, 0]), update=0)).proportions
    assert a != b and a == again and sum(a) == pytest.approx(1.0)  # fresh at every update, seeded
    static = StaticMixer(StaticParams.from_dict("s", {"proportions": [0.2, 0.8]}))
    static.setup(["a", "b"], [1, 1], [0.5, 0.5], 10, 0)
    assert static.update(_mix_ctx(0, [0.5, 0.5], _stats([0, 0], [0, 0]))).proportions == [0.2, 0.8]
    with pytest.raises(ConfigError, match="param 'proportions'.* 3 numbers"):
        StaticMixer(StaticParams.from_dict("s", {"proportions": [0.2, 0.8]})).setup(["a", "b", "c"], [1] * 3, [1 / 3] * 3, 1, 0)


def test_domain_loss_weights_make_the_alpha_weighted_domain_loss():
    """w_i = α_d N / N_d: Σ_i w_i S_i / N equals Σ_d α_d S_d / N_d (each domain's mean token loss, weighted)."""
    rnd = SimpleNamespace(loss_weights=[0.7, 0.3])
    domains = torch.tensor([0, 0, 1, 1, 1])
    tokens = torch.tensor([3.0, 5.0, 2.0, 2.0, 4.0], dtype=torch.float64)
    sums = torch.tensor([6.0, 4.0, 1.0, 3.0, 2.0], dtype=torch.float64)
    n_d = torch.tensor([8.0, 8.0], dtype=torch.float64)
    w = MixRound.sample_loss_weights(rnd, domains, n_d)
    loss = float((w * sums).sum() / tokens.sum())
    assert loss == pytest.approx(0.7 * 10.0 / 8 + 0.3 * 6.0 / 8)
    assert MixRound.sample_loss_weights(SimpleNamespace(loss_weights=None), domains, n_d) is None


def test_doremi_weights_json_reads_as_the_next_steps_proportions(tmp_path):
    path = tmp_path / "doremi_domain_weights.json"
    path.write_text(json.dumps({"domains": ["a", "b"], "domain_weights": {"a": 0.30000001, "b": 0.7}}))
    assert read_proportions(str(path), ["a", "b"]) == pytest.approx([0.3, 0.7], abs=1e-7)
    assert read_proportions(str(path), ["b", "a"]) == pytest.approx([0.7, 0.3], abs=1e-7)  # by name
    with pytest.raises(ConfigError, match="has weights for a, b but not for dataset 'c'"):
        read_proportions(str(path), ["a", "c"])
    with pytest.raises(ConfigError, match="neither a list of proportions nor an existing weights JSON"):
        read_proportions(str(tmp_path / "missing.json"), ["a", "b"])


# =========================================================================== a mixing round without a trainer
def _round(tmp_path, mixer, initial, granularity_world=1, per_device=2, ga=2, static=False, steps=10):
    parts = [("a", 0, 30), ("b", 30, 40), ("c", 40, 100)]
    sched = Schedule.build(2, 3, -1, per_device * ga * granularity_world, steps, cycles=False)
    if mixer is not None:
        mixer.setup([p[0] for p in parts], [30, 10, 60], initial, steps, 2)
    setup = MixSetup(["a", "b", "c"], [30, 10, 60], initial, "mixture", static, per_device, ga, granularity_world, steps)
    return MixRound(sched, mixer, DomainSampler(parts, seed=1), setup, lambda: None, Agreement(),
                    RunLog(tmp_path, "r"), seed=1, component="m")


def test_mix_round_rows_follow_the_proportions_and_the_records(tmp_path):
    static = StaticMixer(StaticParams.from_dict("s", {"proportions": [0.5, 0.25, 0.25]}))
    rnd = _round(tmp_path, static, [0.2, 0.2, 0.6])
    domain = lambda r: 0 if r < 30 else 1 if r < 40 else 2  # noqa: E731
    consumed: dict[int, Counter] = {}
    for step in range(10):
        rows = rnd.rows(step)
        assert len(rows) == 4
        start = rnd.stretch.start_step
        consumed.setdefault(start, Counter()).update(domain(r) for r in rows)
    recs = {int(p.stem[5:]): json.loads(p.read_text()) for p in (tmp_path / "r").glob("step_*.json")}
    assert sorted(recs) == [0, 2, 5, 8]
    for start, rec in recs.items():
        assert [consumed[start][d] for d in range(3)] == rec["counts"]  # what was trained == the record
        assert rec["counts"] == largest_remainder(rec["proportions"], 4 * rec["num_steps"])
    assert recs[0]["proportions"] == [0.2, 0.2, 0.6] and recs[2]["proportions"] == [0.5, 0.25, 0.25]


def test_micro_batch_granularity_gives_every_micro_batch_one_domain(tmp_path):
    odm = OdmMixer(OdmParams.from_dict("o", {}))
    rnd = _round(tmp_path, odm, [1 / 3] * 3, granularity_world=2, per_device=2, ga=2)
    domain = lambda r: 0 if r < 30 else 1 if r < 40 else 2  # noqa: E731
    from dataflex.schedule import rank_micro_batch

    for step in range(6):
        rows = rnd.rows(step)
        for micro in range(2):
            for rank in range(2):
                block = rank_micro_batch(rows, micro, rank, 2, 2)
                assert len({domain(r) for r in block}) == 1


def test_mix_state_survives_a_restart(tmp_path):
    odm = OdmMixer(OdmParams.from_dict("o", {}))
    rnd = _round(tmp_path, odm, [1 / 3] * 3)
    for step in range(5):
        rnd.rows(step)
        rnd.observe(torch.tensor([0, 2]), torch.tensor([3.0, 4.0]), torch.tensor([2, 2]))
    state = json.loads(json.dumps(rnd.state_dict()))
    other_mixer = OdmMixer(OdmParams.from_dict("o", {}))
    other = _round(tmp_path / "b", other_mixer, [1 / 3] * 3)
    other.load_state_dict(state)
    assert [rnd.rows(s) for s in range(5, 10)] == [other.rows(s) for s in range(5, 10)]
    assert odm.rewards.tolist() == other_mixer.rewards.tolist()


# =========================================================================== end to end
ORIGINAL = {"lora": REPO_ROOT / "examples" / "train_lora" / "mixers", "full": REPO_ROOT / "examples" / "train_full" / "mixers"}
# what a CPU run of the original's YAMLs changes: the tiny model and its template, no bf16 / DeepSpeed, one
# tokenizer process; then a short run
CPU = ["bf16=false", "deepspeed=null", "preprocessing_num_workers=1", "template=default", "report_to=none",
       "cutoff_len=64", "logging_steps=1", "save_steps=1000", "plot_loss=false"]


def _work(tmp_path: Path) -> Path:
    work = tmp_path / "work"
    if not work.exists():
        shutil.copytree(REPO_ROOT / "data", work / "data")
    return work


def _run(run_cli, yaml_path, model, out, work, *extra, env=None, timeout=400):
    args = ["train", yaml_path, f"model_name_or_path={model}", f"output_dir={out}", *CPU, *extra]
    res = run_cli(args, cwd=work, env=env, timeout=timeout)
    assert res.returncode == 0, failure_report(res)
    return res.stderr + res.stdout


@pytest.fixture(scope="module")
def doremi(tiny_model, run_cli, tmp_path_factory):
    """The original's DoReMi steps 1, 2 and 3 (pt, full fine-tuning from scratch), CPU-sized."""
    tmp = tmp_path_factory.mktemp("doremi")
    work = _work(tmp)
    short = ["max_steps=6", "warmup_step=2", "update_step=2", "update_times=2", "per_device_train_batch_size=2",
             "gradient_accumulation_steps=2"]
    step1 = tmp / "step1"
    _run(run_cli, ORIGINAL["full"] / "doremi_step1_static_qwen_pt_full.yaml", tiny_model, step1, work, *short)
    comps = tmp / "components.yaml"
    comps.write_text(yaml.safe_dump({"mixers": {"doremi": {"name": "doremi", "params": {
        "reference_model_path": str(step1), "reweight_eta": 1.0, "reweight_eps": 0.001}}}}))
    step2 = tmp / "step2"
    log2 = _run(run_cli, ORIGINAL["full"] / "doremi_step2_dynamic_qwen_pt_full.yaml", tiny_model, step2, work, *short,
                f"components_cfg_file={comps}", "per_device_train_batch_size=1",
                env={"FORCE_TORCHRUN": "1", "NPROC_PER_NODE": "2", "DATAFLEX_TRACE_DIR": str(tmp / "trace2")})
    weights = step2 / "doremi_domain_weights.json"
    step3 = tmp / "step3"
    _run(run_cli, ORIGINAL["full"] / "doremi_step3_static_qwen_pt_full.yaml", tiny_model, step3, work, *short,
         f"init_mixture_proportions={weights}")
    return SimpleNamespace(tmp=tmp, step1=step1, step2=step2, step3=step3, weights=weights, log2=log2)


def _domains_of_rows(out: Path) -> list[list[int]]:
    from support.helpers import manifest

    return manifest(out)["data_sources"]["parts"]


@pytest.mark.e2e
def test_doremi_step1_trains_on_fixed_proportions(doremi):
    recs = records(doremi.step1)
    assert all(r["proportions"] == [0.5, 0.5] for r in recs.values())  # static_mix: the initial ones throughout
    assert all(r["kind"] in ("warmup", "hold") for r in recs.values())
    assert (doremi.step1 / "model.safetensors").is_file()


@pytest.mark.e2e
def test_doremi_step2_rows_per_domain_equal_the_records_on_every_rank(doremi):
    recs = records(doremi.step2)
    parts = _domains_of_rows(doremi.step2)
    domain = lambda r: next(d for d, (_, s, e) in enumerate(parts) if s <= r < e)  # noqa: E731
    trace = traces(doremi.tmp / "trace2")
    assert sorted(trace) == [0, 1]
    by_stretch: dict[int, Counter] = {}
    starts = sorted(recs)
    for rank, lines in trace.items():
        for line in lines:
            start = max(s for s in starts if s <= line["step"])
            by_stretch.setdefault(start, Counter()).update(domain(i) for i in line["indices"])
            assert all(domain(i) == d for i, d in zip(line["indices"], line["domains"]))
    for start, rec in recs.items():
        assert [by_stretch[start][d] for d in range(len(parts))] == rec["counts"], start


@pytest.mark.e2e
def test_doremi_step2_loss_weights_are_the_same_on_every_rank_and_follow_alpha(doremi):
    recs = records(doremi.step2)
    trace = traces(doremi.tmp / "trace2")
    starts = sorted(recs)
    for step in range(6):
        rec = recs[max(s for s in starts if s <= step)]
        alpha = rec["loss_weights"]
        lines = [ln for rank in (0, 1) for ln in trace[rank] if ln["step"] == step]
        # every rank weights a domain's rows by α_d · N / N_d with the step's supervised tokens over all ranks
        n_d = Counter()
        for ln in lines:
            for t, d in zip(ln["tokens"], ln["domains"]):
                n_d[d] += t
        for ln in lines:
            for d, w in zip(ln["domains"], ln["weights"]):
                assert w == pytest.approx(alpha[d] * sum(n_d.values()) / n_d[d], rel=1e-5)
    updates = [r for r in recs.values() if r["kind"] == "update"]
    assert len(updates) == 2
    for rec in updates:
        lam, alpha = rec["summary"]["excess_loss"], rec["loss_weights"]
        order = sorted(range(len(lam)), key=lambda d: lam[d])
        assert alpha[order[-1]] >= alpha[order[0]]  # the larger excess loss gets the larger weight
    assert "dataflex/excess_loss_wiki_demo" in doremi.log2


@pytest.mark.e2e
def test_doremi_counts_the_reference_models_forwards_as_decision_work(doremi):
    """Step 2 runs the reference model forward over every training micro-batch on both ranks: its decision
    work is every trained row's non-padding tokens, summed over the two ranks (the trace's lengths); step 1
    (static, no reference) does no decision work."""
    trace = traces(doremi.tmp / "trace2")
    trained = sum(sum(line["lengths"]) for rank in (0, 1) for line in trace[rank])
    assert trained > 0 and all(len(line["lengths"]) == len(line["indices"]) for line in trace[0] + trace[1])
    step2 = json.loads((doremi.step2 / "train_results.json").read_text())
    assert (step2["dataflex_decision_tokens_forward"], step2["dataflex_decision_tokens_backward"]) == (trained, 0)
    step1 = json.loads((doremi.step1 / "train_results.json").read_text())
    assert (step1["dataflex_decision_tokens_forward"], step1["dataflex_decision_tokens_backward"]) == (0, 0)


@pytest.mark.e2e
def test_doremi_weights_json_feeds_step3_unchanged(doremi):
    data = json.loads(doremi.weights.read_text())
    assert data["domains"] == ["wiki_demo", "c4_demo"] and sum(data["weights"]) == pytest.approx(1.0)
    assert data["steps_averaged"] == 4  # α of the updates at steps 2 and 4, in force for 2 steps each
    recs = records(doremi.step3)
    for rec in recs.values():
        assert rec["proportions"] == pytest.approx(data["weights"], abs=1e-9)


@pytest.mark.e2e
def test_pt_blocks_never_cross_domains(tiny_model, tmp_path):
    """Every domain tokenized alone: its rows are exactly what LLaMA-Factory makes of that dataset alone."""
    from support.helpers import DATA_DIR

    from dataflex.diagnostics import load_pipeline

    common = {"model_name_or_path": str(tiny_model), "stage": "pt", "do_train": True, "finetuning_type": "lora",
              "dataset_dir": str(DATA_DIR), "template": "default", "cutoff_len": 64, "preprocessing_num_workers": 1,
              "output_dir": str(tmp_path / "out"), "report_to": "none", "bf16": False, "max_samples": 50}
    alone = {}
    for name in ("wiki_demo", "demo_code"):
        alone[name] = load_pipeline({**common, "dataset": name})["train_dataset"]
    mixed = load_pipeline({**common, "dataset": "wiki_demo,demo_code", "train_type": "dynamic_mix",
                           "component_name": "static"})
    parts = mixed["data_info"].parts
    assert [p[0] for p in parts] == ["wiki_demo", "demo_code"]
    train = mixed["train_dataset"]
    for name, start, end in parts:
        assert end - start == len(alone[name])
        assert [train[i]["input_ids"] for i in range(start, end)] == [r["input_ids"] for r in alone[name]]


@pytest.fixture(scope="module")
def odm_run(tiny_model, run_cli, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("odm")
    work = _work(tmp)
    out = tmp / "out"
    log = _run(run_cli, ORIGINAL["full"] / "odm_dynamic_qwen_pt_full.yaml", tiny_model, out, work, "max_steps=8",
               "warmup_step=2", "per_device_train_batch_size=2", "gradient_accumulation_steps=2", "save_steps=4",
               "num_train_epochs=1.0", env={"DATAFLEX_TRACE_DIR": str(tmp / "trace")})
    return SimpleNamespace(tmp=tmp, work=work, out=out, log=log)


@pytest.mark.e2e
def test_the_original_odm_yaml_trains_one_domain_per_micro_batch(odm_run):
    recs = records(odm_run.out)
    assert sorted(recs) == [0, 2, 3, 4, 5, 6, 7]  # warm-up, then an update after every step
    assert "warmup_steps" in odm_run.log or "odm" in odm_run.log
    for line in traces(odm_run.tmp / "trace")[0]:
        assert len(set(line["domains"])) == 1  # a micro-batch comes from one domain
    # its components_cfg_file is the packaged one (warmup_steps 0): ODM learns from the first update on
    assert recs[0]["proportions"] == recs[2]["proportions"] == [0.5, 0.5]
    assert all(sum(r["proportions"]) == pytest.approx(1.0) for r in recs.values())
    assert [r["summary"]["t"] for s, r in sorted(recs.items()) if s >= 2] == [1, 2, 3, 4, 5, 6]
    assert recs[7]["proportions"] != [0.5, 0.5]


@pytest.mark.e2e
def test_a_mixing_run_resumes_from_its_checkpoint(odm_run, tiny_model, run_cli):

    from support.helpers import consumed_by_step, kill_at_step

    comps = odm_run.tmp / "odm.yaml"
    comps.write_text("mixers:\n  odm: {name: odm, params: {alpha: 0.5, reward_scale: 1.0}}\n")
    # the original YAML saves the model only; a resumable checkpoint needs the optimizer and LR schedule too
    args = [f"model_name_or_path={tiny_model}", *CPU, "max_steps=8", "warmup_step=2", "per_device_train_batch_size=2",
            "gradient_accumulation_steps=2", "save_steps=4", "num_train_epochs=1.0", f"components_cfg_file={comps}",
            "save_only_model=false"]
    yaml_path = ORIGINAL["full"] / "odm_dynamic_qwen_pt_full.yaml"
    ref = odm_run.tmp / "ref"
    res = run_cli(["train", yaml_path, f"output_dir={ref}", *args], cwd=odm_run.work,
                  env={"DATAFLEX_TRACE_DIR": str(odm_run.tmp / "ref_trace")}, timeout=400)
    assert res.returncode == 0, failure_report(res)
    crash = odm_run.tmp / "crash"
    kill_at_step(["train", yaml_path, f"output_dir={crash}", *args], 6, odm_run.tmp, cwd=odm_run.work,
                 env={"DATAFLEX_TRACE_DIR": str(odm_run.tmp / "crash_trace")})
    res = run_cli(["train", yaml_path, f"output_dir={crash}", *args, f"resume_from_checkpoint={crash / 'checkpoint-4'}"],
                  cwd=odm_run.work, env={"DATAFLEX_TRACE_DIR": str(odm_run.tmp / "resume_trace")}, timeout=400)
    assert res.returncode == 0, failure_report(res)
    a = consumed_by_step(odm_run.tmp / "ref_trace")
    b = {**{s: v for s, v in consumed_by_step(odm_run.tmp / "crash_trace").items() if s < 4},
         **consumed_by_step(odm_run.tmp / "resume_trace")}
    assert a == b  # the rows of every step, as the uninterrupted run drew them
    ra, rb = records(ref), records(crash)
    for step in (4, 5, 6, 7):
        assert ra[step]["proportions"] == pytest.approx(rb[step]["proportions"], rel=1e-9)
        assert ra[step]["summary"]["rewards"] == pytest.approx(rb[step]["summary"]["rewards"], rel=1e-9)


@pytest.mark.e2e
@pytest.mark.parametrize("name", ["random", "doremi_step2_dynamic_qwen_pt_lora"])
def test_the_original_lora_mixer_yamls_train(name, tiny_model, run_cli, tmp_path, doremi):
    work = _work(tmp_path)
    for dataset in ("alpaca_en_demo.json", "alpaca_zh_demo.json"):
        shutil.copy(REPO_ROOT / "data" / "demo_mix_train.json", work / "data" / dataset)
    extra = ["max_steps=4", "warmup_step=2", "update_step=1", "update_times=2", "max_samples=40",
             "gradient_accumulation_steps=1", "per_device_train_batch_size=2"]
    if name == "random":
        extra.append("eval_dataset=alpaca_zh_demo")  # the YAML's mmlu_eval is not a demo set here
    else:
        comps = tmp_path / "components.yaml"
        comps.write_text(yaml.safe_dump({"mixers": {"doremi": {"name": "doremi", "params": {
            "reference_model_path": str(doremi.step1)}}}}))
        extra.append(f"components_cfg_file={comps}")
    _run(run_cli, ORIGINAL["lora"] / f"{name}.yaml", tiny_model, tmp_path / "out", work, *extra)
    recs = records(tmp_path / "out")
    assert sorted(recs) == [0, 2, 3]
    if name == "random":
        assert recs[2]["proportions"] != recs[3]["proportions"]  # a fresh draw at every update


@pytest.mark.e2e
def test_the_original_dynamic_moe_yaml_trains_a_moe_with_frozen_routers(run_cli, tmp_path):
    from dataflex.demo import build_tiny_moe

    model = build_tiny_moe(tmp_path / "moe", REPO_ROOT / "data")
    work = _work(tmp_path)
    rows = json.loads((REPO_ROOT / "data" / "demo_mix_train.json").read_text())
    tasks = {"code": ["sort"], "math": ["add"], "sharegpt": ["reverse", "upper"], "orca": ["vowels"]}
    info = json.loads((work / "data" / "dataset_info.json").read_text())
    for name, wanted in tasks.items():
        mine = [r for r in rows if r["task"] in wanted]
        (work / "data" / f"{name}.json").write_text(json.dumps(mine[:-10]))
        (work / "data" / f"{name}_eval.json").write_text(json.dumps(mine[-10:]))
        info[name] = {"file_name": f"{name}.json"}
        info[f"{name}_eval"] = {"file_name": f"{name}_eval.json"}
    (work / "data" / "dataset_info.json").write_text(json.dumps(info))
    log = _run(run_cli, ORIGINAL["full"] / "dynamic_moe_mixer.yaml", model, tmp_path / "out", work, "max_steps=5",
               "train_step=5", "warmup_step=1", "update_step=2", "per_device_train_batch_size=2",
               "gradient_accumulation_steps=1")
    assert "freeze_gate: 2 router(s) frozen" in log
    recs = records(tmp_path / "out")
    updates = [r for r in recs.values() if r["kind"] == "update"]
    assert len(updates) == 2
    for rec in updates:
        loads = rec["summary"]["gate_loads"]
        assert len(loads) == 4 and all(sum(row) == pytest.approx(1.0) for row in loads)
        assert sum(rec["proportions"]) == pytest.approx(1.0)
    assert updates[0]["proportions"] != [0.25] * 4


@pytest.mark.e2e
def test_selection_on_pretraining_text(make_train_yaml, run_cli, tmp_path):
    path = make_train_yaml(tmp_path, stage="pt", dataset="wiki_demo,demo_arith", component_name="loss", max_samples=40)
    res = run_cli(["train", path], timeout=300)
    assert res.returncode == 0, failure_report(res)
    recs = records(tmp_path / "out")
    assert sorted(recs) == [2, 4] and all(len(r["indices"]) == 8 for r in recs.values())


def test_starting_proportions_by_rule_yaml_and_mixer():
    """init_mixture_proportions wins; unset, the mixer's own starting proportions hold from step 0."""
    from dataflex.mixers.base import starting_proportions
    from dataflex.mixers.odm import OdmMixer, OdmParams
    from dataflex.mixers.random import RandomMixer

    odm = OdmMixer(OdmParams(initial_proportions=[9, 1]))
    domains, sizes = ["a", "b"], [30, 10]
    assert starting_proportions("mixture", sizes, None, domains, odm)[0] == [0.9, 0.1]
    assert starting_proportions("mixture", sizes, [0.3, 0.7], domains, odm) == ([0.3, 0.7], "init_mixture_proportions")
    assert starting_proportions("mixture", sizes, None, domains, OdmMixer(OdmParams()))[0] == [0.5, 0.5]
    assert starting_proportions("mixture", sizes, None, domains, RandomMixer(RandomMixer.Params()))[0] == [0.5, 0.5]
    assert starting_proportions("stratified", sizes, None, domains, odm)[0] == [0.75, 0.25]
    assert starting_proportions("uniform", sizes, [0.3, 0.7], domains, odm)[0] == [0.5, 0.5]
    with pytest.raises(ConfigError, match="initial_proportions"):
        starting_proportions("mixture", sizes, None, ["a", "b", "c"], odm)


@pytest.mark.e2e
def test_odm_initial_proportions_hold_through_the_yaml_warm_up(tiny_model, run_cli, tmp_path):
    """warmup_step 3, ODM warmup_steps 6, initial_proportions [0.9, 0.1], no init_mixture_proportions:
    [0.9, 0.1] is in force from step 0 (it used to be [0.5, 0.5] until step 3) until ODM starts at 6."""
    work = _work(tmp_path)
    comps = tmp_path / "odm.yaml"
    comps.write_text("mixers:\n  odm: {name: odm, params: {warmup_steps: 6, initial_proportions: [0.9, 0.1]}}\n")
    out = tmp_path / "out"
    _run(run_cli, ORIGINAL["full"] / "odm_dynamic_qwen_pt_full.yaml", tiny_model, out, work, "max_steps=7",
         "warmup_step=3", "per_device_train_batch_size=2", "gradient_accumulation_steps=1", "num_train_epochs=1.0",
         f"components_cfg_file={comps}", "init_mixture_proportions=null")
    recs = records(out)
    assert (recs[0]["kind"], recs[0]["num_steps"]) == ("warmup", 3)  # the YAML's warm-up: steps 0-2
    for step in (0, 3, 4, 5):  # then ODM's own warm-up, one record per step
        assert recs[step]["proportions"] == pytest.approx([0.9, 0.1]), (step, recs[step]["proportions"])
    assert recs[6]["proportions"] == pytest.approx([0.5, 0.5])  # ODM's first policy: no reward yet
