"""DeepSpeed: the example configs load; selection under ZeRO-2/3 runs where a GPU is present."""

from __future__ import annotations

import json

import pytest
import torch

from conftest import REPO_ROOT

DS_DIR = REPO_ROOT / "examples" / "deepspeed"


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
    from dataflex.launcher import prepare

    path = make_train_yaml(tmp_path, deepspeed=str(DS_DIR / "ds_z3_config.json"), component_name="loss")
    cfg = prepare(path)
    assert cfg["deepspeed"].endswith("ds_z3_config.json")


@pytest.mark.gpu
@pytest.mark.e2e
@pytest.mark.skipif(not torch.cuda.is_available(), reason="DeepSpeed training needs a CUDA device")
@pytest.mark.parametrize("stage", [2, 3])
@pytest.mark.parametrize("component", ["loss", "less"])
def test_selection_under_zero(stage, component, make_train_yaml, run_cli, tmp_path):
    path = make_train_yaml(tmp_path, component_name=component, eval_dataset="demo_add_eval",
                           deepspeed=str(DS_DIR / f"ds_z{stage}_config.json"), bf16=True, max_samples=64)
    res = run_cli(["train", path], env={"FORCE_TORCHRUN": "1", "NPROC_PER_NODE": "1"}, timeout=900)
    assert res.returncode == 0, res.stderr[-3000:]
    records = sorted((tmp_path / "out" / "dataflex").glob("step_*.json"))
    assert [p.name for p in records] == ["step_2.json", "step_4.json"]
