"""dataflex.compare.plan without a model: what --quick sets, the measured sets (--test-dataset,
--eval-extra), and combining the parts of a comparison across modes."""

from __future__ import annotations

import pytest
from support.helpers import write_yaml

from dataflex.compare.plan import QUICK_EVAL_ROWS, combine, prepare
from dataflex.errors import ConfigError


@pytest.fixture()
def config(tmp_path, train_config):
    """A select config (8 steps: warm-up 2 + 3 x 2) whose model does not exist: planning must not load it."""
    def make(name="cfg.yaml", **keys):
        cfg = train_config(tmp_path / "no-model-here", tmp_path / "ignored")
        cfg.update({"eval_dataset": "demo_add_eval", "warmup_step": 2, "update_step": 2, "update_times": 3,
                    "max_steps": None, **keys})
        return write_yaml(tmp_path / name, {k: v for k, v in cfg.items() if v is not None})
    return make


def test_quick_sets_seeds_steps_checkpoints_and_eval_rows(config, tmp_path):
    full = prepare(config(max_steps=40), "random,loss", out=tmp_path / "o")
    assert (full.seeds, full.steps, full.eval_every, full.eval_cap, full.quick) == (3, 40, 10, None, False)
    quick = prepare(config(max_steps=40), "random,loss", out=tmp_path / "o", quick=True)
    assert (quick.seeds, quick.steps, quick.eval_every, quick.eval_cap, quick.quick) == (2, 20, 20, QUICK_EVAL_ROWS, True)
    assert [r.cfg["max_steps"] for r in quick.runs] == [20] * 4 and {r.cfg["save_steps"] for r in quick.runs} == {20}
    # a shorter config keeps its steps; what is given explicitly wins over --quick
    assert prepare(config(), "random,loss", out=tmp_path / "o", quick=True).steps == 8
    mine = prepare(config(max_steps=40), "random,loss", out=tmp_path / "o", quick=True, seeds=3, eval_every=5,
                   overrides=["max_steps=30"])
    assert (mine.seeds, mine.steps, mine.eval_every) == (3, 30, 5)


def test_test_dataset_and_extra_sets_are_checked_and_named(config, tmp_path):
    setup = prepare(config(), "random,loss", out=tmp_path / "o", test_dataset="demo_arith",
                    eval_extra=["code=demo_code", "demo_graded"])
    assert setup.measure_cfg["eval_dataset"] == "demo_arith" and setup.cfg["eval_dataset"] == "demo_add_eval"
    assert setup.extra_sets == {"code": "demo_code", "demo_graded": "demo_graded"}
    assert all(r.cfg["eval_dataset"] == "demo_add_eval" for r in setup.runs)  # what the methods aim at is kept
    for kwargs, message in [
        ({"test_dataset": "demo_mix"}, "--test-dataset: row 0 of 'demo_mix' is also a training row of 'demo_mix'"),
        ({"eval_extra": ["x=nope"]}, "--eval-extra: 'nope' is not registered in "),
        ({"eval_extra": ["a:b=demo_code"]}, "--eval-extra: 'a:b=demo_code' is invalid; allowed: NAME=DATASET"),
        ({"eval_extra": ["x=demo_code", "x=demo_arith"]}, "--eval-extra: 'x=demo_arith' is invalid"),
    ]:
        with pytest.raises(ConfigError) as err:
            prepare(config(), "random,loss", out=tmp_path / "o", **kwargs)
        assert str(err.value).startswith(message), str(err.value)


def test_combine_puts_other_modes_against_the_main_baseline(config, tmp_path):
    main = prepare(config(), "random,loss", out=tmp_path / "sel", budget="both", seeds=2)
    weight = prepare(config("w.yaml", train_type="dynamic_weight", component_name="loss", update_step=None,
                            update_times=None, max_steps=8), "loss,plain", out=tmp_path / "w", baseline="loss", seeds=2)
    both = combine(main, [(weight, "weight ")])
    assert [m.label for m in both.methods] == ["random", "loss", "weight loss", "weight plain"]
    assert both.baseline.label == "random" and both.budgets == ["steps", "compute"]
    labels = [(r.method.label, r.role, r.index) for r in both.runs]
    assert labels[-4:] == [("weight loss", "main", 0), ("weight loss", "main", 1), ("weight plain", "main", 0),
                           ("weight plain", "main", 1)]
    assert len(labels) == 2 * 2 + 2 * 1 + 4  # random main + long, loss, then the weighters' main runs
    assert [r.cfg["train_type"] for r in both.runs if r.method.label == "weight loss"] == ["dynamic_weight"] * 2
    with pytest.raises(ConfigError, match="combine: method 'random' is in two parts"):
        combine(main, [(prepare(config(), "random,loss", out=tmp_path / "x", seeds=2), "")])
    with pytest.raises(ConfigError, match="has seeds 3, .* 2; allowed: the same seeds"):
        combine(main, [(prepare(config(), "random,loss", out=tmp_path / "x"), "again ")])
    with pytest.raises(ConfigError, match="combine: two parts train into the same folder"):
        combine(main, [(prepare(config(), "random,loss", out=tmp_path / "sel", seeds=2), "again ")])


def test_measurement_key_depends_on_what_is_measured_not_where_it_is_written(config, tmp_path):
    """A comparison moved to another folder (or another checkout) keeps its measurements; another measured set
    measures again."""
    from dataflex.compare.runner import _measure_key

    here = prepare(config(), "random,loss", out=tmp_path / "a")
    moved = prepare(config("moved.yaml", output_dir=str(tmp_path / "elsewhere")), "random,loss", out=tmp_path / "b")
    assert here.measure_cfg["output_dir"] != moved.measure_cfg["output_dir"]
    assert _measure_key(here) == _measure_key(moved)
    assert [r.key for r in here.runs] == [r.key for r in moved.runs]
    other = prepare(config(), "random,loss", out=tmp_path / "a", test_dataset="demo_arith")
    capped = prepare(config(), "random,loss", out=tmp_path / "a", quick=True)
    assert len({_measure_key(here), _measure_key(other), _measure_key(capped)}) == 3


def test_keys_follow_the_data_the_runs_read_not_the_folders_path(config, tmp_path):
    """The data folder copied elsewhere (an absolute dataset_dir that differs) keeps every run and measurement
    key; a dataset the runs read, edited in place, changes them; one they do not read changes nothing."""
    import json
    import shutil

    from support.helpers import DATA_DIR

    from dataflex.compare.runner import _measure_key

    copy = tmp_path / "copied-data"
    shutil.copytree(DATA_DIR, copy)

    def plan(folder, out):
        return prepare(config(f"{out}.yaml", dataset_dir=str(folder)), "random,loss", out=tmp_path / out,
                       eval_extra=["code=demo_code"])

    here, moved = plan(DATA_DIR, "a"), plan(copy, "b")
    assert here.runs[0].cfg["dataset_dir"] != moved.runs[0].cfg["dataset_dir"]
    assert [r.key for r in here.runs] == [r.key for r in moved.runs]
    assert _measure_key(here) == _measure_key(moved)

    info = json.loads((copy / "dataset_info.json").read_text())
    trained, unused = info[here.cfg["dataset"]]["file_name"], info["wiki_demo"]["file_name"]
    (copy / unused).write_bytes((copy / unused).read_bytes() + b" ")
    assert [r.key for r in plan(copy, "c").runs] == [r.key for r in here.runs]
    rows = json.loads((copy / trained).read_text())
    (copy / trained).write_text(json.dumps(rows[:-1]))  # one training row less: every run trains again
    edited = plan(copy, "d")
    assert not {r.key for r in edited.runs} & {r.key for r in here.runs}
    assert _measure_key(edited) == _measure_key(here)  # the measured sets did not change
    code = info["demo_code"]["file_name"]
    (copy / code).write_text(json.dumps(json.loads((copy / code).read_text())[:-1]))  # an --eval-extra set did
    assert _measure_key(plan(copy, "e")) != _measure_key(here)


def test_a_run_finished_under_the_path_based_key_still_counts(config, tmp_path):
    """Runs that compare finished before the keys followed the data's content are not trained again."""
    import json

    from dataflex.compare.plan import path_run_key, without_outputs
    from dataflex.compare.runner import FORMAT, _measure_key, _measure_keys, finished

    setup = prepare(config(), "random,loss", out=tmp_path / "o")
    spec = setup.runs[0]
    assert spec.key != path_run_key(spec.cfg, spec.components)
    spec.out.mkdir(parents=True)
    for key, counts in [(path_run_key(spec.cfg, spec.components), True), (spec.key, True), ("0" * 16, False)]:
        spec.done_path.write_text(json.dumps({"format": FORMAT, "key": key, "measure_key": "m"}))
        assert finished(spec, "m")[1] is counts, key
    # and so do its measurements: the key the earlier version gave them, by hand, is accepted beside today's
    old = path_run_key({"measure": without_outputs(setup.measure_cfg), "extra": {}, "cap": None,
                        "metric": setup.metric}, None)
    keys = _measure_keys(setup)
    assert keys == (_measure_key(setup), old) and keys[0] != old
    for measured, counts in [(old, True), (keys[0], True), ("0" * 16, False)]:
        spec.done_path.write_text(json.dumps({"format": FORMAT, "key": spec.key, "measure_key": measured}))
        assert (finished(spec, keys)[0] is not None) is counts, measured
