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

from support.helpers import REPO_ROOT, failure_report, records, traces

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


def _components_file(folder):
    judge = folder / "judge.py"
    judge.write_text("def reward(prompt, response):\n    return float(len(response) % 3)\n")
    comps = yaml.safe_load(yaml.safe_dump(COMPONENTS))
    comps["selectors"]["nice"]["params"]["reward_function"] = f"{judge}:reward"
    path = folder / "components.yaml"
    path.write_text(yaml.safe_dump(comps))
    return path


@pytest.fixture
def components_file(tmp_path):
    return _components_file(tmp_path)


@pytest.fixture(scope="module", params=["near", "cluster_less", "nice"])
def runs(request, make_train_yaml, run_cli, tmp_path_factory):
    """One process (2 per device x 2 accumulation) and two (1 x 2 each): the same G = 4."""
    component = request.param
    tmp = tmp_path_factory.mktemp(component)
    comps = _components_file(tmp)
    one = make_train_yaml(tmp / "one", component_name=component, components_cfg_file=str(comps), **SMALL)
    two = make_train_yaml(tmp / "two", component_name=component, components_cfg_file=str(comps),
                          per_device_train_batch_size=1, **SMALL)
    r1 = run_cli(["train", one], cwd=tmp, timeout=400)
    assert r1.returncode == 0, failure_report(r1)
    r2 = run_cli(["train", two], env={"FORCE_TORCHRUN": "1", "NPROC_PER_NODE": "2"}, cwd=tmp, timeout=400)
    assert r2.returncode == 0, failure_report(r2)
    return component, records(tmp / "one" / "out"), records(tmp / "two" / "out")


PER_SAMPLE = {"near": "neighbour_rank", "cluster_less": "cluster_score", "nice": "score"}
SUMMARY = {"near": "queries", "cluster_less": "clusters", "nice": "reward_mean"}


def test_model_based_selectors_train(runs):
    component, recs, _ = runs
    assert sorted(recs) == [2, 4]
    for rec in recs.values():
        assert rec["selector"] == component and len(rec["indices"]) == 8
        assert all(0 <= i < 40 for i in rec["indices"])
        assert len(rec["per_sample"][PER_SAMPLE[component]]) == 8 and SUMMARY[component] in rec["summary"]
    if component == "near":  # refresh: true re-embeds with the trained model, both selections from the eval set
        assert all(rec["summary"]["refreshed"] for rec in recs.values())
    if component == "nice":
        assert recs[2]["summary"]["responses"] == 3 * 2


def test_one_and_two_processes_choose_the_same_rows(runs):
    component, one, two = runs
    assert sorted(one) == sorted(two)
    for step in one:
        assert sorted(one[step]["indices"]) == sorted(two[step]["indices"]), (component, step)
        key = PER_SAMPLE[component]
        if key != "neighbour_rank":
            by_row_1 = dict(zip(one[step]["indices"], one[step]["per_sample"][key]))
            by_row_2 = dict(zip(two[step]["indices"], two[step]["per_sample"][key]))
            assert by_row_2 == pytest.approx(by_row_1, rel=1e-3, abs=1e-5)


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


def test_near_finds_planted_copies_of_the_queries(make_train_yaml, run_cli, tmp_path):
    """Planted data: the 4 eval rows are also training rows 3, 11, 20 and 33. Identical text embeds
    identically, so each query's nearest neighbour is its copy, and round-robin takes every query's
    first neighbour before any second one: the rank-0 picks of each selection are exactly the copies
(the copies, all of one task, also fill each other's next ranks, so the other 4 picks come later)."""
    import json

    demo = json.loads((REPO_ROOT / "data" / "demo_mix_train.json").read_text())
    queries = json.loads((REPO_ROOT / "data" / "demo_add_eval.json").read_text())[:4]
    planted = {3: queries[0], 11: queries[1], 20: queries[2], 33: queries[3]}
    rest = iter(r for r in demo if r["task"] != "add")  # no other row of the queries' task
    train = [planted[i] if i in planted else next(rest) for i in range(40)]
    data = tmp_path / "data"
    data.mkdir()
    (data / "train.json").write_text(json.dumps(train))
    (data / "queries.json").write_text(json.dumps(queries))
    (data / "dataset_info.json").write_text(json.dumps({"planted": {"file_name": "train.json"},
                                                        "queries": {"file_name": "queries.json"}}))
    comps = tmp_path / "components.yaml"
    comps.write_text("selectors:\n  near:\n    name: near\n    params: {neighbours: 8, scoring_batch_size: 8}\n")
    path = make_train_yaml(tmp_path / "run", component_name="near", components_cfg_file=str(comps),
                           dataset="planted", eval_dataset="queries", dataset_dir=str(data), max_samples=None,
                           cutoff_len=96)
    res = run_cli(["train", path], cwd=tmp_path, timeout=300)
    assert res.returncode == 0, failure_report(res)
    recs = records(tmp_path / "run" / "out")
    assert sorted(recs) == [2, 4]
    for rec in recs.values():
        first = sorted(i for i, r in zip(rec["indices"], rec["per_sample"]["neighbour_rank"]) if r == 0)
        assert first == sorted(planted), rec
        assert not rec["summary"]["repeated"] and len(set(rec["indices"])) == 8  # then 4 rows further down the lists
