"""near, tsds, cluster_less and nice train end to end on the tiny model.

The original's files run unchanged (with the offline ``.npy`` files they name, made here); the
embedding and gradient modes run from a components file of small params; tsds under two
processes trains on exactly the rows its record names (one draw, made once).
"""

from __future__ import annotations

from collections import Counter

import numpy as np
import pytest
import yaml

from conftest import REPO_ROOT, failure_report, records, traces

from dataflex.selectors.near import round_robin

pytestmark = pytest.mark.e2e

ORIGINAL_COMPONENTS = REPO_ROOT / "examples" / "compat" / "components.yaml"
SMALL = dict(eval_dataset="demo_add_eval", max_samples=40, cutoff_len=48)  # 40 training rows, G = 4, 8 per selection


@pytest.mark.parametrize("component", ["near", "tsds"])
def test_the_original_offline_files_run_unchanged(component, make_train_yaml, run_cli, tmp_path):
    import torch

    work = tmp_path / "work"  # the original's paths are relative: ./src/dataflex/offline_selector/...
    offline = work / "src" / "dataflex" / "offline_selector"
    offline.mkdir(parents=True)
    ids = np.array([[3, 7, 11], [7, 20, 2], [39, 0, 5]])
    probs = np.zeros(40)
    probs[[1, 4, 9, 16, 25, 36, 30, 31, 32, 33]] = np.arange(1, 11)
    np.save(offline / "top_indices.npy", ids)
    np.save(offline / "tsds_probs.npy", probs)
    path = make_train_yaml(tmp_path / "run", component_name=component, components_cfg_file=str(ORIGINAL_COMPONENTS),
                           **SMALL)
    res = run_cli(["train", path], cwd=work, timeout=300)
    assert res.returncode == 0, failure_report(res)
    recs = records(tmp_path / "run" / "out")
    assert sorted(recs) == [2, 4]
    for rec in recs.values():
        if component == "near":  # the fixed list, round-robin over its queries (trained in shuffled order)
            assert sorted(rec["indices"]) == sorted(round_robin(torch.tensor(ids), 8)[0])
        else:  # drawn without replacement from the rows with a positive probability
            assert len(set(rec["indices"])) == 8 and set(rec["indices"]) <= set(np.nonzero(probs)[0].tolist())
            assert rec["summary"]["source"] == "probs_path"


COMPONENTS = {
    "selectors": {
        "near": {"name": "near", "params": {"neighbours": 10, "scoring_batch_size": 8}},
        "tsds": {"name": "tsds", "params": {"alpha": 0.6, "C": 1.0, "scoring_batch_size": 8}},
        "cluster_less": {"name": "cluster_less", "params": {"proj_dim": 256, "cluster_size": 8,
                                                            "samples_per_cluster": 2, "seed": 5}},
        "nice": {"name": "nice", "params": {"proj_dim": 256, "mc_samples": 2, "max_new_tokens": 6, "eval_prompts": 3,
                                            "reward_model_backend": "callable"}},
    }
}


@pytest.fixture
def components_file(tmp_path):
    judge = tmp_path / "judge.py"
    judge.write_text("def reward(prompt, response):\n    return float(len(response) % 3)\n")
    comps = yaml.safe_load(yaml.safe_dump(COMPONENTS))
    comps["selectors"]["nice"]["params"]["reward_function"] = f"{judge}:reward"
    path = tmp_path / "components.yaml"
    path.write_text(yaml.safe_dump(comps))
    return path


@pytest.mark.parametrize("component, per_sample, summary", [
    ("near", "neighbour_rank", "queries"),
    ("cluster_less", "cluster_score", "clusters"),
    ("nice", "score", "reward_mean"),
])
def test_model_based_selectors_train(component, per_sample, summary, components_file, make_train_yaml, run_cli,
                                     tmp_path):
    path = make_train_yaml(tmp_path / "run", component_name=component, components_cfg_file=str(components_file),
                           cache_dir=None, **SMALL)
    res = run_cli(["train", path], cwd=tmp_path, timeout=400)
    assert res.returncode == 0, failure_report(res)
    recs = records(tmp_path / "run" / "out")
    assert sorted(recs) == [2, 4]
    for rec in recs.values():
        assert rec["selector"] == component and len(rec["indices"]) == 8
        assert all(0 <= i < 40 for i in rec["indices"])
        assert len(rec["per_sample"][per_sample]) == 8 and summary in rec["summary"]
    if component == "near":  # refresh: true re-embeds with the trained model, both selections from the eval set
        assert all(rec["summary"]["refreshed"] for rec in recs.values())
    if component == "nice":
        assert recs[2]["summary"]["responses"] == 3 * 2


def test_tsds_two_processes_train_on_the_rows_of_one_draw(components_file, make_train_yaml, run_cli, tmp_path):
    path = make_train_yaml(tmp_path / "run", component_name="tsds", components_cfg_file=str(components_file), **SMALL)
    env = {"FORCE_TORCHRUN": "1", "NPROC_PER_NODE": "2", "DATAFLEX_TRACE_DIR": str(tmp_path / "trace")}
    res = run_cli(["train", path], env=env, cwd=tmp_path, timeout=400)
    assert res.returncode == 0, failure_report(res)
    recs = records(tmp_path / "run" / "out")
    trace = traces(tmp_path / "trace")
    assert sorted(trace) == [0, 1] and sorted(recs) == [2, 4]
    for start, rec in recs.items():
        assert len(rec["indices"]) == 16  # G = 2 x 2 x 2, two steps per selection
        seen = Counter(i for rank in (0, 1) for line in trace[rank] if start <= line["step"] < start + 2
                       for i in line["indices"])
        assert seen == Counter(rec["indices"])
