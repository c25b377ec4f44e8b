"""DeepSpeed: the example configs load, and selection under ZeRO-2/3 picks what a run without
DeepSpeed picks.

DeepSpeed runs on CPU (its CPU accelerator, gloo, and a small shared-memory op it compiles on
first use), so ZeRO-2/3 are tested here for real: the tiny model trained with the same global
batch of 4 (2 x 2 on one process without DeepSpeed, 1 x 2 on each of two ZeRO ranks) must select
the same samples with the same scores at every selection. ZeRO-3 partitions the LoRA weights
across the two ranks and ZeRO-2 the optimizer state, so this covers per-sample gradients and the
gathered Adam moments (``less``), and perturbations of partitioned weights, random or along the
eval gradient (``zeroth``, which also runs the engine's batched losses). The GPU test at the end
makes the same comparison in bf16 where CUDA devices are present (two ranks with two GPUs; with
one GPU, a one-rank ZeRO run against a one-rank run without DeepSpeed).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from conftest import REPO_ROOT, failure_report

DS_DIR = REPO_ROOT / "examples" / "deepspeed"
SCHEDULE = {"warmup_step": 2, "update_step": 2, "update_times": 2, "max_samples": 32, "dataset": "demo_mix",
            "eval_dataset": "demo_add_eval", "gradient_accumulation_steps": 2, "save_steps": 2}
# less selects at step 0 too: before any optimizer step there are no Adam moments (plain gradients
# on every rank), at step 2 there are
WARMUP = {"less": 0}
# relative agreement of the recorded scores with the run without DeepSpeed (reduction order differs;
# zeroth divides a float32 loss difference by a step of 1e-3 x rms(θ))
SCORE_RTOL = {"less": 1e-4, "zeroth": 5e-3, "zeroth_eval": 5e-3}
# zeroth along the eval-gradient direction: the eval gradient comes from a backward pass
COMPONENTS = """selectors:
  zeroth_eval:
    name: zeroth
    params:
      direction: eval_gradient
"""


@pytest.mark.parametrize("stage", [0, 2, 3])
def test_example_configs_load_through_transformers(stage):
    from transformers.integrations import HfDeepSpeedConfig

    path = DS_DIR / f"ds_z{stage}_config.json"
    raw = json.loads(path.read_text())
    assert raw["zero_optimization"]["stage"] == stage
    cfg = HfDeepSpeedConfig(str(path))  # the object transformers builds from `deepspeed:` in the YAML
    assert cfg.get_value("zero_optimization.stage") == stage
    assert cfg.is_zero3() == (stage == 3)


def test_deepspeed_key_passes_dataflex_checks(make_train_yaml, tmp_path):
    from dataflex.launcher import make_plan

    path = make_train_yaml(tmp_path, deepspeed=str(DS_DIR / "ds_z3_config.json"), component_name="loss")
    cfg = make_plan(path).cfg
    assert cfg["deepspeed"].endswith("ds_z3_config.json")


# --------------------------------------------------------------------------- ZeRO on CPU
def _records(out: Path) -> dict[str, dict]:
    from conftest import records

    recs = {f"step_{k}.json": v for k, v in records(out).items()}
    last = max(int(p.name.split("-")[1]) for p in out.glob("checkpoint-*"))
    state = json.loads((out / f"checkpoint-{last}" / "dataflex_state.json").read_text())
    return {**recs, "final_state": state["round"]["component"]}


@pytest.fixture(scope="module")
def train_run(make_train_yaml, run_cli, tmp_path_factory):
    """``train_run(component, stage)`` -> (records, log) of a run; stage None: one process, no
    DeepSpeed; stage 0/2/3: two processes under that ZeRO stage. Each run happens once per module."""
    done: dict[tuple[str, int | None], tuple[dict, str]] = {}

    def run(component: str, stage: int | None) -> tuple[dict, str]:
        key = (component, stage)
        if key not in done:
            tmp = tmp_path_factory.mktemp(f"{component}-z{stage}")
            extra = dict(SCHEDULE, warmup_step=WARMUP.get(component, SCHEDULE["warmup_step"]))
            if component == "zeroth_eval":
                (tmp / "components.yaml").write_text(COMPONENTS)
                extra["components_cfg_file"] = str(tmp / "components.yaml")
            if stage is None:
                path = make_train_yaml(tmp, component_name=component, per_device_train_batch_size=2, **extra)
                res = run_cli(["train", path], timeout=600)
            else:
                path = make_train_yaml(tmp, component_name=component, per_device_train_batch_size=1,
                                       deepspeed=str(DS_DIR / f"ds_z{stage}_config.json"), **extra)
                res = run_cli(["train", path], env={"FORCE_TORCHRUN": "1", "NPROC_PER_NODE": "2"}, timeout=600)
            assert res.returncode == 0, failure_report(res)
            done[key] = _records(tmp / "out"), res.stderr + res.stdout
        return done[key]

    return run


@pytest.mark.e2e
# ZeRO-0 wraps the model but keeps parameters and moments whole: the ZeRO-2 and ZeRO-3 cases cover its paths
# zeroth along the eval gradient under ZeRO-3 (a backward, then perturbed forwards of partitioned
# weights) is in the slow set: less-3 covers the backward, zeroth-3 the perturbations, and
# test_zeroth.py compares one and two processes along the eval gradient
@pytest.mark.parametrize("component,stage", [("less", 3), ("zeroth", 3), ("less", 2),
                                             pytest.param("zeroth_eval", 3, marks=pytest.mark.slow)])
def test_zero_selects_what_a_run_without_deepspeed_selects(component, stage, train_run):
    plain, _ = train_run(component, None)
    zero, log = train_run(component, stage)
    assert f"[DataFlex] DeepSpeed ZeRO-{stage}:" in log  # DeepSpeed really ran
    first = WARMUP.get(component, SCHEDULE["warmup_step"])
    assert sorted(zero) == sorted(plain) == sorted([f"step_{first}.json", f"step_{first + 2}.json", "final_state"])
    if component == "zeroth_eval":
        assert plain["step_2.json"]["summary"]["direction"] == "eval_gradient"
    for name, rec in plain.items():
        if name == "final_state":
            continue
        assert zero[name]["indices"] == rec["indices"], name
        assert zero[name]["per_sample"]["score"] == pytest.approx(rec["per_sample"]["score"], rel=SCORE_RTOL[component])
        if component == "less":
            expected = "sgd" if name == "step_0.json" else "adam"
            assert zero[name]["summary"]["gradient_type"] == rec["summary"]["gradient_type"] == expected
    if component == "less":
        # every sample's cumulative score (the checkpoint's state), not only the chosen ones: the whole pool agrees
        assert zero["final_state"]["cumulative_score"] == pytest.approx(plain["final_state"]["cumulative_score"],
                                                                        rel=SCORE_RTOL[component])


# --------------------------------------------------------------------------- ZeRO on a GPU (bf16)
@pytest.mark.gpu
@pytest.mark.e2e
@pytest.mark.skipif(not torch.cuda.is_available(), reason="DeepSpeed training needs a CUDA device")
@pytest.mark.parametrize("stage", [2, 3])
@pytest.mark.parametrize("component", ["loss", "less", "zeroth"])
def test_selection_under_zero_on_gpu_matches_a_run_without_deepspeed(stage, component, make_train_yaml, run_cli,
                                                                     tmp_path):
    """bf16 on CUDA: with two GPUs, two ZeRO ranks (1 x 2 each) against one GPU without DeepSpeed (2 x 2);
    with one GPU, one ZeRO rank against one rank without DeepSpeed (same batch). Same selections,
    scores within bf16 tolerance."""
    world = 2 if torch.cuda.device_count() >= 2 else 1
    common = dict(SCHEDULE, component_name=component, bf16=True, warmup_step=WARMUP.get(component, 2))
    base = make_train_yaml(tmp_path / "base", per_device_train_batch_size=2, **common)
    res = run_cli(["train", base], env={"CUDA_VISIBLE_DEVICES": "0"}, timeout=900)
    assert res.returncode == 0, failure_report(res)
    zero = make_train_yaml(tmp_path / "zero", per_device_train_batch_size=2 // world,
                           deepspeed=str(DS_DIR / f"ds_z{stage}_config.json"), **common)
    res = run_cli(["train", zero], env={"FORCE_TORCHRUN": "1", "NPROC_PER_NODE": str(world)}, timeout=900)
    assert res.returncode == 0, failure_report(res)
    assert f"[DataFlex] DeepSpeed ZeRO-{stage}:" in res.stderr + res.stdout
    a, b = _records(tmp_path / "base" / "out"), _records(tmp_path / "zero" / "out")
    assert sorted(a) == sorted(b)
    for name in a:
        if name == "final_state":
            continue
        assert a[name]["indices"] == b[name]["indices"], name
        if "score" in a[name]["per_sample"]:
            assert b[name]["per_sample"]["score"] == pytest.approx(a[name]["per_sample"]["score"], rel=5e-2, abs=5e-3)


# --------------------------------------------------------------------------- ZeRO-1/2 moment layout
class _FlatPartitions:
    """The layout a ZeRO-1/2 optimizer keeps (one process): the attributes LESS reads from it."""

    def __init__(self, flat: torch.Tensor, params: list[torch.nn.Parameter], optimizer: torch.optim.Optimizer):
        self.bit16_groups_flat = [flat]
        self.bit16_groups = [params]
        self.single_partition_of_fp32_groups = [optimizer.param_groups[0]["params"][0]]
        self.optimizer = optimizer


def _layout(order: list[int]):
    """Two parameters viewed out of one flat buffer in ``order``; Adam stepped once on the fp32 copy."""
    model = torch.nn.Sequential(torch.nn.Linear(3, 2, bias=False), torch.nn.Linear(2, 4, bias=False))
    params = [model[0].weight, model[1].weight]
    flat = torch.zeros(sum(p.numel() for p in params))
    offset = 0
    for i in order:  # the flat buffer holds the parameters in `order`, not in the model's order
        p = params[i]
        flat[offset:offset + p.numel()] = p.detach().reshape(-1)
        p.data = flat[offset:offset + p.numel()].view_as(p)
        offset += p.numel()
    master = torch.nn.Parameter(flat.clone())
    opt = torch.optim.Adam([master], lr=0.1, betas=(0.8, 0.9))
    master.grad = torch.arange(flat.numel(), dtype=torch.float32)
    opt.step()
    flat.copy_(master.detach())
    return model, _FlatPartitions(flat, params, opt), master


NAMES = ["0.weight", "1.weight"]


def test_zero12_moments_follow_where_each_parameter_lies_in_the_flat_buffer():
    from dataflex.scoring.optimizer_state import adam_moments

    model, zero, master = _layout([1, 0])  # the second layer's weight first
    moments, reason = adam_moments(zero, model, NAMES)
    assert reason == ""
    g = torch.arange(14, dtype=torch.float32)
    # flat = [layer 1 (8 values), layer 0 (6 values)]: exp_avg = (1 - b1) g, exp_avg_sq = (1 - b2) g^2
    assert torch.allclose(moments["1.weight"].exp_avg, 0.2 * g[:8])
    assert torch.allclose(moments["0.weight"].exp_avg, 0.2 * g[8:])
    assert torch.allclose(moments["0.weight"].exp_avg_sq, 0.1 * g[8:] ** 2)
    assert (moments["0.weight"].beta1, moments["0.weight"].beta2) == (0.8, 0.9)


def test_zero12_moments_refuse_a_layout_they_do_not_understand():
    from dataflex.scoring.optimizer_state import adam_moments

    model, zero, master = _layout([0, 1])
    with torch.no_grad():
        master.add_(1.0)  # the fp32 master copy no longer matches the model: the layout is not the assumed one
    moments, reason = adam_moments(zero, model, NAMES)
    assert moments is None and "layout was not understood" in reason and "'0.weight'" in reason


def test_zero12_moments_before_the_first_step():
    from dataflex.scoring.optimizer_state import adam_moments

    model, zero, master = _layout([0, 1])
    zero.optimizer.state.clear()
    assert adam_moments(zero, model, NAMES) == (None, "the optimizer has no moments yet (no optimizer step taken)")
