"""Unit tests of the pure parts: schedule, seeds, records, state, component params, components files."""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass, field
from typing import Any, Literal

import pytest
import torch

from dataflex.components_file import component_class
from dataflex.components_file import (
    PACKAGED_COMPONENTS,
    ComponentSpec,
    build_component,
    get_component,
    load_components,
    resolve_components_path,
)
from dataflex.core.records import RunLog, atomic_write_json, fingerprint, read_lines, read_records
from dataflex.core.state import ResumeError, check_setup, load_state, save_state
from dataflex.errors import ConfigError
from dataflex.params import Params
from dataflex.schedule import Schedule, Stretch, rank_micro_batch, total_steps
from dataflex.selectors import SELECTORS
from dataflex.selectors.base import uniform_draw
from dataflex.selectors.random import RandomParams, RandomSelector
from dataflex.seeding import derive_seed, seeded_generator


def W(start, n, cycle):
    return Stretch("warmup", start, n, cycle)


def S(start, n, cycle, selection, t):
    return Stretch("update", start, n, cycle, selection, t)


def H(start, n, cycle):
    return Stretch("hold", start, n, cycle)


def build(warmup_step, update_step, update_times, global_batch, num_train_epochs=1.0, max_steps=-1, train_step=None,
          rows=None, cycles=True):
    """A schedule with its total computed as the trainer computes it."""
    total = total_steps(warmup_step, update_step, update_times, global_batch, num_train_epochs=num_train_epochs,
                        max_steps=max_steps, train_step=train_step, rows=rows, cycles=cycles)
    return Schedule.build(warmup_step, update_step, update_times, global_batch, total, cycles=cycles)


# =========================================================================== schedule
class TestScheduleBuild:
    def test_basic_two_selections(self):
        s = build(10, 10, 2, global_batch=4)
        assert s.total_steps == 30
        assert s.stretches == (W(0, 10, 0), S(10, 10, 0, 0, 0), S(20, 10, 0, 1, 1))
        assert [x.start_step for x in s.updates] == [10, 20]
        assert s.num_updates == 2
        assert [s.samples_for(x) for x in s.stretches] == [40, 40, 40]
        assert s.stretches[1].end_step == 20 and s.stretches[1].is_update
        assert not s.stretches[0].is_update
        assert s.describe().startswith("30 optimizer steps x 4 rows")
        assert "2 selection(s) at step(s) [10, 20]" in s.describe()

    def test_update_times_one_repeats_cycles(self):
        s = build(5, 3, 1, global_batch=2, num_train_epochs=2.0)
        assert s.total_steps == 16
        assert s.stretches == (W(0, 5, 0), S(5, 3, 0, 0, 0), W(8, 5, 1), S(13, 3, 1, 1, 0))
        assert [x.t for x in s.updates] == [0, 0]
        assert [x.number for x in s.updates] == [0, 1]
        assert s.samples_for(s.updates[0]) == 6

    def test_epochs_one_and_a_half_truncates_last_selection(self):
        # cycle = 2 + 3 * 2 = 8 steps; 1.5 epochs = 12 steps: the second cycle stops inside its first selection
        s = build(2, 3, 2, global_batch=8, num_train_epochs=1.5)
        assert s.total_steps == 12
        assert s.stretches == (
            W(0, 2, 0), S(2, 3, 0, 0, 0), S(5, 3, 0, 1, 1),
            W(8, 2, 1), S(10, 2, 1, 2, 0),
        )
        last = s.stretches[-1]
        assert last.end_step == s.total_steps
        assert s.samples_for(last) == 16  # only the 2 steps that run, not update_step = 3
        assert s.samples_for(s.stretches[1]) == 24
        assert s.samples_for(s.stretches[3]) == 16  # the second cycle's warm-up: 2 steps x 8

    def test_epochs_ceil(self):
        # 1.3 * 8 = 10.4 -> 11 steps: one step of the second cycle's selection
        s = build(2, 3, 2, global_batch=1, num_train_epochs=1.3)
        assert s.total_steps == 11
        assert s.stretches[-1] == S(10, 1, 1, 2, 0)
        # float noise does not add a step: 1.1 * 10 = 11.000000000000002 -> 11
        assert build(0, 10, 1, global_batch=1, num_train_epochs=1.1).total_steps == 11
        # a tiny fraction still gives at least one step
        assert build(4, 2, 1, global_batch=1, num_train_epochs=0.01).total_steps == 1

    def test_truncated_warmup_has_no_selection(self):
        # cycle 6, 1.5 epochs = 9 steps: the second warm-up is cut to 3 steps, no selection follows
        s = build(4, 2, 1, global_batch=3, num_train_epochs=1.5)
        assert s.stretches == (W(0, 4, 0), S(4, 2, 0, 0, 0), W(6, 3, 1))
        assert s.num_updates == 1
        assert s.samples_for(s.stretches[-1]) == 9

    def test_max_steps_overrides_epochs(self):
        s = build(2, 2, 2, global_batch=4, num_train_epochs=100.0, max_steps=7)
        assert s.total_steps == 7
        assert s.stretches == (W(0, 2, 0), S(2, 2, 0, 0, 0), S(4, 2, 0, 1, 1), W(6, 1, 1))
        # max_steps longer than one cycle repeats cycles
        s = build(1, 2, 1, global_batch=4, num_train_epochs=0.5, max_steps=8)
        assert s.stretches == (W(0, 1, 0), S(1, 2, 0, 0, 0), W(3, 1, 1), S(4, 2, 1, 1, 0), W(6, 1, 2), S(7, 1, 2, 2, 0))

    @pytest.mark.parametrize("max_steps", [-1, 0, None])
    def test_max_steps_not_positive_uses_epochs(self, max_steps):
        assert build(2, 2, 2, global_batch=4, num_train_epochs=2.0, max_steps=max_steps).total_steps == 12

    def test_warmup_zero(self):
        s = build(0, 3, 2, global_batch=2, num_train_epochs=2.0)
        assert s.total_steps == 12
        assert s.stretches == (S(0, 3, 0, 0, 0), S(3, 3, 0, 1, 1), S(6, 3, 1, 2, 0), S(9, 3, 1, 3, 1))
        assert all(x.is_update for x in s.stretches)

    def test_update_times_zero_is_warmup_only(self):
        s = build(5, 0, 0, global_batch=2, num_train_epochs=2.0)
        assert s.stretches == (W(0, 5, 0), W(5, 5, 1))
        assert s.num_updates == 0

    def test_stretches_tile_the_run(self):
        for args in [(3, 2, 3, 1.7), (0, 1, 1, 3.0), (7, 5, 2, 0.4), (1, 4, 3, 2.25)]:
            s = build(*args[:3], global_batch=5, num_train_epochs=args[3])
            step = 0
            for x in s.stretches:
                assert x.start_step == step and x.num_steps >= 1
                step = x.end_step
            assert step == s.total_steps

    def test_stretch_at_boundaries(self):
        s = build(10, 10, 2, global_batch=4)
        warm, sel0, sel1 = s.stretches
        assert s.stretch_at(0) == warm
        assert s.stretch_at(9) == warm
        assert s.stretch_at(10) == sel0
        assert s.stretch_at(19) == sel0
        assert s.stretch_at(20) == sel1
        assert s.stretch_at(29) == sel1
        for bad in (30, 31, -1):
            with pytest.raises(IndexError):
                s.stretch_at(bad)
        # two consecutive warm-ups of different cycles are different stretches
        w = build(5, 0, 0, global_batch=1, num_train_epochs=2.0)
        assert w.stretch_at(4).cycle == 0 and w.stretch_at(5).cycle == 1

    @pytest.mark.parametrize(
        "kwargs, word",
        [
            (dict(warmup_step=-1, update_step=2, update_times=2, global_batch=4), "warmup_step"),
            (dict(warmup_step=2, update_step=-2, update_times=2, global_batch=4), "update_step"),
            (dict(warmup_step=2, update_step=2, update_times=-2, global_batch=4), "update_times"),
            (dict(warmup_step=2, update_step=2, update_times=-1, global_batch=4), "update_times: -1 needs"),
            (dict(warmup_step=2.0, update_step=2, update_times=2, global_batch=4), "warmup_step"),
            (dict(warmup_step=True, update_step=2, update_times=2, global_batch=4), "warmup_step"),
            (dict(warmup_step=2, update_step="2", update_times=2, global_batch=4), "update_step"),
            (dict(warmup_step=2, update_step=0, update_times=2, global_batch=4), "update_step"),
            (dict(warmup_step=2, update_step=2, update_times=2, global_batch=0), "global batch"),
            (dict(warmup_step=0, update_step=0, update_times=0, global_batch=4), "no steps"),
            (dict(warmup_step=0, update_step=5, update_times=0, global_batch=4), "no steps"),
            (dict(warmup_step=2, update_step=2, update_times=2, global_batch=4, num_train_epochs=0), "num_train_epochs"),
            (dict(warmup_step=2, update_step=2, update_times=2, global_batch=4, num_train_epochs=-1.0), "num_train_epochs"),
        ],
    )
    def test_invalid_inputs(self, kwargs, word):
        with pytest.raises(ValueError, match=word):
            build(**kwargs)

    def test_max_steps_makes_epochs_irrelevant(self):
        # epochs 0 is only an error when it decides the length
        assert build(2, 2, 2, global_batch=1, num_train_epochs=0, max_steps=3).total_steps == 3


class TestRankMicroBatch:
    def test_single_process_ga_two(self):
        step = [10, 11, 12, 13]  # per_device 2, GA 2, world 1 -> G 4
        assert rank_micro_batch(step, 0, 0, 2, 1) == [10, 11]
        assert rank_micro_batch(step, 1, 0, 2, 1) == [12, 13]

    def test_ga_three_world_two_hand_computed(self):
        per_device, ga, world = 2, 3, 2
        g = per_device * ga * world
        assert g == 12
        step = list(range(100, 112))
        expected = {
            (0, 0): [100, 101], (0, 1): [102, 103],
            (1, 0): [104, 105], (1, 1): [106, 107],
            (2, 0): [108, 109], (2, 1): [110, 111],
        }
        for (micro, rank), ids in expected.items():
            assert rank_micro_batch(step, micro, rank, per_device, world) == ids

    @pytest.mark.parametrize("per_device, ga, world", [(1, 1, 1), (2, 2, 1), (2, 2, 2), (3, 4, 2), (1, 3, 4)])
    def test_every_index_exactly_once_in_order(self, per_device, ga, world):
        g = per_device * ga * world
        step = [7 * i + 3 for i in range(g)]  # arbitrary distinct values
        pieces = [rank_micro_batch(step, m, r, per_device, world) for m in range(ga) for r in range(world)]
        assert all(len(p) == per_device for p in pieces)
        # micro-major, then rank: concatenation is the step itself
        assert [i for p in pieces for i in p] == step

    def test_step_slices_of_a_stretch(self):
        # a stretch of 3 steps with G = 4 consumes indices[j*G:(j+1)*G] at step j
        indices = list(range(50, 62))
        g = 4
        consumed = []
        for j in range(3):
            step = indices[j * g:(j + 1) * g]
            for m in range(2):
                consumed += rank_micro_batch(step, m, 0, 2, 1)
        assert consumed == indices


# =========================================================================== seeds
class TestSeeds:
    def test_derive_seed_is_sha256_of_tags(self):
        expected = int.from_bytes(hashlib.sha256(b"42:warmup:0").digest()[:8], "little") & (2**63 - 1)
        assert derive_seed(42, "warmup", 0) == expected

    def test_derive_seed_properties(self):
        a = derive_seed(42, "select", 3)
        assert a == derive_seed(42, "select", 3)
        assert 0 <= a < 2**63
        assert len({derive_seed(42, "select", 3), derive_seed(43, "select", 3), derive_seed(42, "select", 4),
                    derive_seed(42, "order", 3), derive_seed(42, "warmup", 3)}) == 5

    def test_seeded_generator_determinism(self):
        a = torch.randperm(100, generator=seeded_generator(7, "warmup", 0))
        b = torch.randperm(100, generator=seeded_generator(7, "warmup", 0))
        c = torch.randperm(100, generator=seeded_generator(7, "warmup", 1))
        assert torch.equal(a, b)
        assert not torch.equal(a, c)
        # independent of the global RNG state
        torch.manual_seed(123)
        d = torch.randperm(100, generator=seeded_generator(7, "warmup", 0))
        assert torch.equal(a, d)

    def test_uniform_draw(self):
        ids, repl = uniform_draw(10, 10, seeded_generator(1, "x"))
        assert sorted(ids) == list(range(10)) and repl is False
        ids, repl = uniform_draw(5, 12, seeded_generator(1, "x"))
        assert len(ids) == 12 and repl is True and all(0 <= i < 5 for i in ids)
        with pytest.raises(ValueError):
            uniform_draw(0, 1, seeded_generator(1, "x"))


# =========================================================================== records and state
class TestRecords:
    def test_records_go_to_a_folder_per_run(self, tmp_path):
        a, b = RunLog(tmp_path, "run-a"), RunLog(tmp_path, "run-b")
        a.write_record(12, {"step": 12, "indices": [3, 1, 2]})
        b.write_record(12, {"step": 12, "indices": [9]})
        assert sorted(os.listdir(tmp_path)) == ["run-a", "run-b"]
        assert sorted(os.listdir(tmp_path / "run-a")) == ["step_12.json"]
        data = json.loads((tmp_path / "run-a" / "step_12.json").read_text())
        assert data["indices"] == [3, 1, 2] and data["run_id"] == "run-a" and data["version"] == 2
        assert [r["indices"] for r in read_records(tmp_path / "run-b", "run-b")] == [[9]]
        assert read_records(tmp_path / "run-b", "run-a") == []  # a record of another run is not this run's

    def test_disabled_log_writes_nothing(self, tmp_path):
        log = RunLog(tmp_path, "r", enabled=False)
        log.write_record(1, {"indices": []})
        log.append("weights.jsonl", {"step": 1})
        log.write_manifest(tmp_path / "out", {})
        assert os.listdir(tmp_path) == []

    def test_jsonl_append_and_truncate(self, tmp_path):
        log = RunLog(tmp_path, "r")
        for step in range(5):
            log.append("weights.jsonl", {"step": step, "w": [step]})
        log.truncate("weights.jsonl", lambda line: line["step"] < 3)
        assert [ln["step"] for ln in read_lines(tmp_path / "r" / "weights.jsonl")] == [0, 1, 2]

    def test_failed_write_keeps_old_file_and_leaves_no_temp(self, tmp_path):
        path = tmp_path / "step_0.json"
        atomic_write_json(path, {"indices": [1]})
        with pytest.raises(TypeError):
            atomic_write_json(path, {"indices": [object()]})  # not JSON-serialisable
        assert os.listdir(tmp_path) == ["step_0.json"]
        assert json.loads(path.read_text()) == {"indices": [1]}

    def test_unreadable_records_are_skipped(self, tmp_path):
        (tmp_path / "step_2.json").write_text('{"indices": [1, 2]')  # truncated
        (tmp_path / "step_4.json").write_text(json.dumps({"step": 4, "indices": [1], "run_id": "r"}))
        assert [r["step"] for r in read_records(tmp_path, "r")] == [4]

    def test_fingerprint_stable_and_sensitive(self):
        a = fingerprint({"seed": 1, "model": "m", "train": {"size": 3}})
        assert a == fingerprint({"train": {"size": 3}, "model": "m", "seed": 1})  # key order irrelevant
        assert a != fingerprint({"seed": 2, "model": "m", "train": {"size": 3}})
        assert len(a) == 16 and int(a, 16) >= 0


class TestCheckpointState:
    def test_roundtrip(self, tmp_path):
        save_state(tmp_path, {"run_id": "r", "round": {"indices": [1, 2]}})
        assert load_state(tmp_path)["round"] == {"indices": [1, 2]}
        assert [p.name for p in tmp_path.iterdir()] == ["dataflex_state.json"]

    def test_missing_or_corrupt_state_is_one_line(self, tmp_path):
        with pytest.raises(ResumeError, match=r"resume_from_checkpoint: .* has no dataflex_state.json") as err:
            load_state(tmp_path)
        assert "\n" not in str(err.value)
        (tmp_path / "dataflex_state.json").write_text("{")
        with pytest.raises(ResumeError, match="unreadable"):
            load_state(tmp_path)
        (tmp_path / "dataflex_state.json").write_text('{"version": 99}')
        with pytest.raises(ResumeError, match="state version 99"):
            load_state(tmp_path)

    def test_another_setup_is_refused_naming_what_differs(self, tmp_path):
        same = {"global_batch": 8, "seed": 1}
        check_setup(same, dict(same), tmp_path)
        with pytest.raises(ResumeError, match=r"\(global_batch: 8 there, 4 now\)"):
            check_setup(same, {"global_batch": 4, "seed": 1}, tmp_path)


# =========================================================================== selector params
@dataclass
class _SampleParams(Params):
    """A selector's params with every supported kind of type (module level: string annotations)."""

    n: int = 1
    x: float = 0.5
    mode: Literal["a", "b"] = "a"
    ks: list[int] = field(default_factory=list)
    opt: int | None = None
    table: dict[str, Any] = field(default_factory=dict)

    inert = {"flush_every": "a flush interval of the original; nothing is flushed here"}

    def check(self):
        if self.n < 1:
            self.fail("n", "an integer >= 1")


class TestParams:
    def test_random_params_defaults_and_values(self):
        p = RandomParams.from_dict("c", None)
        assert p.replacement is False and p.cache_dir is None and p.seed is None
        p = RandomParams.from_dict("c", {"replacement": True, "cache_dir": "/x", "seed": 3})
        assert p.to_dict() == {"cache_dir": "/x", "seed": 3, "replacement": True}

    def test_unknown_key_names_component_and_key(self):
        with pytest.raises(ConfigError) as err:
            RandomParams.from_dict("mycomp", {"replacment": True})
        msg = str(err.value)
        assert "mycomp" in msg and "'replacment'" in msg and "did you mean 'replacement'" in msg and "cache_dir" in msg
        assert "\n" not in msg

    @pytest.mark.parametrize(
        "key, value",
        [("replacement", "yes"), ("replacement", 1), ("replacement", None), ("cache_dir", 5), ("cache_dir", ["a"]),
         ("seed", 1.5)],
    )
    def test_wrong_type_names_key(self, key, value):
        with pytest.raises(ConfigError) as err:
            RandomParams.from_dict("mycomp", {key: value})
        msg = str(err.value)
        assert "mycomp" in msg and f"'{key}'" in msg and "wrong type" in msg

    def test_coercion_rules_and_range_check(self):
        P = _SampleParams
        p = P.from_dict("c", {"n": 3, "x": 2, "mode": "b", "ks": [1, 2], "opt": None, "table": {"a": 1}})
        assert (p.n, p.x, p.mode, p.ks, p.opt, p.table) == (3, 2.0, "b", [1, 2], None, {"a": 1})
        assert isinstance(p.x, float)
        for bad in ({"n": 1.5}, {"n": True}, {"x": "1"}, {"mode": "c"}, {"ks": [1, "2"]}, {"ks": 3}, {"opt": "1"},
                    {"table": [1]}):
            with pytest.raises(ConfigError, match=f"'{next(iter(bad))}'"):
                P.from_dict("c", bad)
        with pytest.raises(ConfigError, match=r"param 'n' = 0 is invalid; allowed: an integer >= 1"):
            P.from_dict("c", {"n": 0})
        rows = {r[0]: r for r in P.describe()}
        assert rows["mode"][1] == "a | b" and rows["ks"][2] == [] and "cache_dir" in rows and rows["table"][1] == "mapping"

    def test_inert_params_are_accepted_with_one_warning(self, caplog):
        with caplog.at_level("WARNING", logger="dataflex"):
            p = _SampleParams.from_dict("c", {"n": 2, "flush_every": 16})
        assert p.n == 2 and not hasattr(p, "flush_every")
        lines = [r.getMessage() for r in caplog.records]
        assert lines == ["[DataFlex] component 'c': param 'flush_every' has no effect here (a flush interval of the "
                         "original; nothing is flushed here)"]
        with pytest.raises(ConfigError, match="unknown param 'flush_evry'"):  # a misspelt one still fails
            _SampleParams.from_dict("c", {"flush_evry": 16})

    def test_registry(self):
        assert SELECTORS["random"] is RandomSelector
        assert component_class("selectors", "random", "k") is RandomSelector
        with pytest.raises(ConfigError, match=r"component 'k': unknown selector name 'bogus'; available: .*random"):
            component_class("selectors", "bogus", "k")
        with pytest.raises(ConfigError, match=r"unknown weighter name 'random'; available: adapt, custom, joint_update_aware, loss"):
            component_class("weighters", "random", "k")


# =========================================================================== components files
SEEDS_FORMAT = """\
selectors:
  loss:
    name: random
    params: {cache_dir: ../dataflex_saves/loss_output, replacement: true}
  plain:
    name: random
"""

FLAT_FORMAT = """\
mine:
  name: random
  params:
    replacement: false
other: [1, 2]      # not a component entry: skipped
"""

SECTIONS_FORMAT = """\
selectors:
  loss: {name: loss, params: {focus: high}}
mixers:
  loss: {name: static, params: {proportions: [0.25, 0.75]}}
weighters:
  loss: {name: loss, params: {strategy: quadratic}}
"""


class TestComponentsFile:
    def test_with_top_level_selectors(self, tmp_path):
        path = tmp_path / "c.yaml"
        path.write_text(SEEDS_FORMAT)
        specs = load_components(path)["selectors"]
        assert list(specs) == ["loss", "plain"]
        assert specs["loss"] == ComponentSpec(
            "loss", "selectors", "random", {"cache_dir": "../dataflex_saves/loss_output", "replacement": True}, path
        )
        assert specs["plain"].params == {}
        sel = build_component(get_component(path, "loss"))
        assert isinstance(sel, RandomSelector)
        assert sel.params.replacement is True and sel.params.cache_dir == "../dataflex_saves/loss_output"

    def test_without_sections_everything_is_a_selector(self, tmp_path):
        path = tmp_path / "c.yaml"
        path.write_text(FLAT_FORMAT)
        sections = load_components(path)
        assert list(sections["selectors"]) == ["mine"] and sections["mixers"] == {} == sections["weighters"]
        assert build_component(sections["selectors"]["mine"]).params.replacement is False

    def test_train_type_decides_the_section(self, tmp_path):
        path = tmp_path / "c.yaml"
        path.write_text(SECTIONS_FORMAT)
        sel = build_component(get_component(path, "loss", "selectors"))
        mix = build_component(get_component(path, "loss", "mixers"))
        wei = build_component(get_component(path, "loss", "weighters"))
        assert (sel.kind, sel.name, sel.params.focus) == ("selectors", "loss", "high")
        assert (mix.kind, mix.name, mix.params.proportions) == ("mixers", "static", [0.25, 0.75])
        assert (wei.kind, wei.name, wei.params.strategy) == ("weighters", "loss", "quadratic")

    def test_empty_file_has_no_components(self, tmp_path):
        path = tmp_path / "c.yaml"
        path.write_text("# nothing\n")
        assert load_components(path) == {"selectors": {}, "mixers": {}, "weighters": {}, "reorderers": {}, "pipelines": {}}
        with pytest.raises(ConfigError, match=r"known selector components: \(none\)"):
            get_component(path, "random")

    def test_unknown_component_lists_known(self, tmp_path):
        path = tmp_path / "c.yaml"
        path.write_text(SEEDS_FORMAT)
        with pytest.raises(ConfigError) as err:
            get_component(path, "nope")
        assert str(err.value).startswith("component_name: 'nope' is not in the selectors of")
        assert "known selector components: loss, plain" in str(err.value)
        with pytest.raises(ConfigError, match="known mixer components: \\(none\\)"):
            get_component(path, "loss", "mixers")

    @pytest.mark.parametrize(
        "text, match",
        [
            ("a: [unclosed\n", r"is not valid YAML \(line 2\): expected ',' or '\]'"),
            ("a:\n  name: random\n b: 1\n", r"is not valid YAML \(line 3\): expected <block end>"),
            ("- just\n- a list\n", "must hold a mapping"),
            ("mixers: [1, 2]\nselectors: {}\n", "section 'mixers' .* must be a mapping"),
        ],
    )
    def test_invalid_files(self, tmp_path, text, match):
        path = tmp_path / "c.yaml"
        path.write_text(text)
        with pytest.raises(ConfigError, match=match) as err:
            load_components(path)
        assert str(err.value).startswith("components_cfg_file:")
        assert "\n" not in str(err.value)

    @pytest.mark.parametrize(
        "entry, match",
        [
            ("{name: random, parms: {}}", "component 'c' in '.*': unknown key 'parms'; allowed: name, params"),
            ("{name: random, params: [1]}", "component 'c' in '.*': params must be a mapping"),
        ],
    )
    def test_malformed_entry_fails_when_chosen(self, tmp_path, entry, match):
        path = tmp_path / "c.yaml"
        path.write_text(f"selectors:\n  ok: {{name: random}}\n  c: {entry}\n")
        with pytest.raises(ConfigError, match=match) as err:
            get_component(path, "c")
        assert "\n" not in str(err.value)
        assert isinstance(build_component(get_component(path, "ok")), RandomSelector)

    def test_bad_params_in_file(self, tmp_path):
        path = tmp_path / "c.yaml"
        path.write_text("selectors:\n  r:\n    name: random\n    params: {replacment: true}\n")
        with pytest.raises(ConfigError, match=r"component 'r': unknown param 'replacment'"):
            build_component(get_component(path, "r"))

    def test_missing_file(self, tmp_path):
        with pytest.raises(ConfigError, match="cannot read"):
            load_components(tmp_path / "absent.yaml")

    def test_packaged_file_builds_every_component_but_doremi(self):
        sections = load_components(PACKAGED_COMPONENTS)
        assert set(sections["selectors"]) >= {"random", "loss", "delta_loss", "less", "zeroth"}
        assert set(sections["mixers"]) >= {"static", "random", "doremi", "odm", "dynamic_moe"}
        assert set(sections["weighters"]) >= {"loss", "adapt", "custom"}
        for kind, specs in sections.items():
            for key, spec in specs.items():
                if key == "doremi":  # needs the user's reference model
                    with pytest.raises(ConfigError, match="reference_model_path"):
                        build_component(spec)
                    continue
                assert build_component(spec).kind == kind


class TestResolveComponentsPath:
    @pytest.mark.parametrize("value", [None, "", "   "])
    def test_unset_is_packaged(self, value):
        assert resolve_components_path(value) == PACKAGED_COMPONENTS

    def test_absolute(self, tmp_path, monkeypatch):
        path = tmp_path / "abs.yaml"
        path.write_text(FLAT_FORMAT)
        monkeypatch.chdir(tmp_path.parent)
        assert resolve_components_path(str(path), yaml_dir="/somewhere/else") == path.resolve()

    def test_cwd_relative(self, tmp_path, monkeypatch):
        (tmp_path / "cfg").mkdir()
        (tmp_path / "cfg" / "c.yaml").write_text(FLAT_FORMAT)
        monkeypatch.chdir(tmp_path)
        assert resolve_components_path("cfg/c.yaml") == (tmp_path / "cfg" / "c.yaml").resolve()

    def test_yaml_folder_relative(self, tmp_path, monkeypatch):
        yaml_dir = tmp_path / "exp"
        yaml_dir.mkdir()
        (yaml_dir / "c.yaml").write_text(FLAT_FORMAT)
        work = tmp_path / "work"
        work.mkdir()
        monkeypatch.chdir(work)
        assert resolve_components_path("c.yaml", yaml_dir=yaml_dir) == (yaml_dir / "c.yaml").resolve()
        with pytest.raises(ConfigError):  # without the YAML folder it is not found
            resolve_components_path("c.yaml")

    def test_cwd_wins_over_yaml_folder(self, tmp_path, monkeypatch):
        for sub in ("work", "exp"):
            (tmp_path / sub).mkdir()
            (tmp_path / sub / "c.yaml").write_text(FLAT_FORMAT)
        monkeypatch.chdir(tmp_path / "work")
        assert resolve_components_path("c.yaml", yaml_dir=tmp_path / "exp") == (tmp_path / "work" / "c.yaml").resolve()

    def test_seed_path_from_repo_root(self, repo_root, monkeypatch):
        monkeypatch.chdir(repo_root)
        got = resolve_components_path("src/dataflex/configs/components.yaml")
        assert got == (repo_root / "src/dataflex/configs/components.yaml").resolve()

    @pytest.mark.parametrize("value", ["src/dataflex/configs/components.yaml", "../x/src/dataflex/configs/components.yaml"])
    def test_seed_path_falls_back_to_packaged(self, tmp_path, monkeypatch, value):
        monkeypatch.chdir(tmp_path)
        assert resolve_components_path(value, yaml_dir=tmp_path) == PACKAGED_COMPONENTS

    def test_seed_path_prefers_a_real_file(self, tmp_path, monkeypatch):
        own = tmp_path / "src/dataflex/configs/components.yaml"
        own.parent.mkdir(parents=True)
        own.write_text(FLAT_FORMAT)
        monkeypatch.chdir(tmp_path)
        assert resolve_components_path("src/dataflex/configs/components.yaml") == own.resolve()

    def test_missing_names_key_and_candidates(self, tmp_path, monkeypatch):
        monkeypatch.chdir(tmp_path)
        with pytest.raises(ConfigError) as err:
            resolve_components_path("nope.yaml", yaml_dir=tmp_path / "exp")
        msg = str(err.value)
        assert msg.startswith("components_cfg_file: 'nope.yaml' not found")
        assert str(tmp_path / "nope.yaml") in msg and str(tmp_path / "exp" / "nope.yaml") in msg
        with pytest.raises(ConfigError, match="not found"):
            resolve_components_path(str(tmp_path / "absent.yaml"))

    def test_home_expansion(self, tmp_path, monkeypatch):
        (tmp_path / "c.yaml").write_text(FLAT_FORMAT)
        monkeypatch.setenv("HOME", str(tmp_path))
        assert resolve_components_path("~/c.yaml") == (tmp_path / "c.yaml").resolve()


class TestMixAndOpenSchedules:
    def test_mix_has_one_warmup_then_updates_then_holds(self):
        s = build(2, 3, 2, global_batch=4, max_steps=14, cycles=False)
        assert s.stretches == (W(0, 2, 0), S(2, 3, 0, 0, 0), S(5, 3, 0, 1, 1), H(8, 3, 0), H(11, 3, 0))
        assert [x.index for x in s.stretches] == [0, 1, 2, 3, 4]
        assert "2 warm-up steps, then 2 x" in s.describe("mixture update")

    def test_update_times_minus_one_updates_until_the_end(self):
        s = build(1, 2, -1, global_batch=4, train_step=6, cycles=False)
        assert s.stretches == (W(0, 1, 0), S(1, 2, 0, 0, 0), S(3, 2, 0, 1, 1), S(5, 1, 0, 2, 2))
        sel = build(1, 2, -1, global_batch=4, max_steps=5)  # select: one cycle, selections to the end
        assert [x.kind for x in sel.stretches] == ["warmup", "update", "update"]

    def test_static_mix_holds_the_whole_run(self):
        s = Schedule.build(0, 0, 0, 8, 250, cycles=False)
        assert all(x.kind == "hold" for x in s.stretches) and s.stretches[0].num_steps == 100
        assert sum(x.num_steps for x in s.stretches) == 250

    def test_total_steps_rules(self):
        assert total_steps(2, 2, 2, 4, num_train_epochs=3.0) == 18
        assert total_steps(2, 2, 2, 4, num_train_epochs=3.0, train_step=5) == 5
        assert total_steps(2, 2, 2, 4, num_train_epochs=3.0, train_step=5, max_steps=7) == 7  # max_steps wins
        # update_times -1: as many steps as plain training over the rows
        assert total_steps(2, 2, -1, 4, num_train_epochs=2.0, rows=10) == 6
        with pytest.raises(ValueError, match="update_times: -1 needs"):
            total_steps(2, 2, -1, 4)
