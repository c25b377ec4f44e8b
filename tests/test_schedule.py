"""Unit tests of the pure parts: schedule, seeds, records, selector params, components files."""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass, field
from typing import Literal

import pytest
import torch

from dataflex.components import (
    PACKAGED_COMPONENTS,
    ComponentSpec,
    build_selector,
    get_component,
    load_components,
    resolve_components_path,
)
from dataflex.errors import ConfigError
from dataflex.records import (
    atomic_write_json,
    fingerprint,
    load_record,
    record_path,
    write_record,
)
from dataflex.schedule import Schedule, Stretch, rank_micro_batch
from dataflex.selectors import SELECTORS, Params, get_selector_class
from dataflex.selectors.base import uniform_draw
from dataflex.selectors.random import RandomParams, RandomSelector
from dataflex.seeding import derive_seed, seeded_generator


def W(start, n, cycle):
    return Stretch("warmup", start, n, cycle)


def S(start, n, cycle, selection, t):
    return Stretch("select", start, n, cycle, selection, t)


# =========================================================================== schedule
class TestScheduleBuild:
    def test_basic_two_selections(self):
        s = Schedule.build(10, 10, 2, global_batch=4)
        assert s.total_steps == 30
        assert s.cycle_length == 30
        assert s.stretches == (W(0, 10, 0), S(10, 10, 0, 0, 0), S(20, 10, 0, 1, 1))
        assert [x.start_step for x in s.selections] == [10, 20]
        assert s.num_selections == 2
        assert [s.samples_for(x) for x in s.stretches] == [40, 40, 40]
        assert s.stretches[1].end_step == 20 and s.stretches[1].is_selection
        assert not s.stretches[0].is_selection
        assert s.describe().startswith("30 optimizer steps x 4 samples")
        assert "2 selection(s) at step(s) [10, 20]" in s.describe()

    def test_update_times_one_repeats_cycles(self):
        s = Schedule.build(5, 3, 1, global_batch=2, num_train_epochs=2.0)
        assert s.total_steps == 16
        assert s.stretches == (W(0, 5, 0), S(5, 3, 0, 0, 0), W(8, 5, 1), S(13, 3, 1, 1, 0))
        assert [x.t for x in s.selections] == [0, 0]
        assert [x.selection for x in s.selections] == [0, 1]
        assert s.samples_for(s.selections[0]) == 6

    def test_epochs_one_and_a_half_truncates_last_selection(self):
        # cycle = 2 + 3 * 2 = 8 steps; 1.5 epochs = 12 steps: the second cycle stops inside its first selection
        s = Schedule.build(2, 3, 2, global_batch=8, num_train_epochs=1.5)
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
        s = Schedule.build(2, 3, 2, global_batch=1, num_train_epochs=1.3)
        assert s.total_steps == 11
        assert s.stretches[-1] == S(10, 1, 1, 2, 0)
        # float noise does not add a step: 1.1 * 10 = 11.000000000000002 -> 11
        assert Schedule.build(0, 10, 1, global_batch=1, num_train_epochs=1.1).total_steps == 11
        # a tiny fraction still gives at least one step
        assert Schedule.build(4, 2, 1, global_batch=1, num_train_epochs=0.01).total_steps == 1

    def test_truncated_warmup_has_no_selection(self):
        # cycle 6, 1.5 epochs = 9 steps: the second warm-up is cut to 3 steps, no selection follows
        s = Schedule.build(4, 2, 1, global_batch=3, num_train_epochs=1.5)
        assert s.stretches == (W(0, 4, 0), S(4, 2, 0, 0, 0), W(6, 3, 1))
        assert s.num_selections == 1
        assert s.samples_for(s.stretches[-1]) == 9

    def test_max_steps_overrides_epochs(self):
        s = Schedule.build(2, 2, 2, global_batch=4, num_train_epochs=100.0, max_steps=7)
        assert s.total_steps == 7
        assert s.stretches == (W(0, 2, 0), S(2, 2, 0, 0, 0), S(4, 2, 0, 1, 1), W(6, 1, 1))
        # max_steps longer than one cycle repeats cycles
        s = Schedule.build(1, 2, 1, global_batch=4, num_train_epochs=0.5, max_steps=8)
        assert s.stretches == (W(0, 1, 0), S(1, 2, 0, 0, 0), W(3, 1, 1), S(4, 2, 1, 1, 0), W(6, 1, 2), S(7, 1, 2, 2, 0))

    @pytest.mark.parametrize("max_steps", [-1, 0, None])
    def test_max_steps_not_positive_uses_epochs(self, max_steps):
        assert Schedule.build(2, 2, 2, global_batch=4, num_train_epochs=2.0, max_steps=max_steps).total_steps == 12

    def test_warmup_zero(self):
        s = Schedule.build(0, 3, 2, global_batch=2, num_train_epochs=2.0)
        assert s.total_steps == 12
        assert s.stretches == (S(0, 3, 0, 0, 0), S(3, 3, 0, 1, 1), S(6, 3, 1, 2, 0), S(9, 3, 1, 3, 1))
        assert all(x.is_selection for x in s.stretches)

    def test_update_times_zero_is_warmup_only(self):
        s = Schedule.build(5, 0, 0, global_batch=2, num_train_epochs=2.0)
        assert s.stretches == (W(0, 5, 0), W(5, 5, 1))
        assert s.num_selections == 0

    def test_stretches_tile_the_run(self):
        for args in [(3, 2, 3, 1.7), (0, 1, 1, 3.0), (7, 5, 2, 0.4), (1, 4, 3, 2.25)]:
            s = Schedule.build(*args[:3], global_batch=5, num_train_epochs=args[3])
            step = 0
            for x in s.stretches:
                assert x.start_step == step and x.num_steps >= 1
                step = x.end_step
            assert step == s.total_steps

    def test_stretch_at_boundaries(self):
        s = Schedule.build(10, 10, 2, global_batch=4)
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
        w = Schedule.build(5, 0, 0, global_batch=1, num_train_epochs=2.0)
        assert w.stretch_at(4).cycle == 0 and w.stretch_at(5).cycle == 1

    @pytest.mark.parametrize(
        "kwargs, word",
        [
            (dict(warmup_step=-1, update_step=2, update_times=2, global_batch=4), "warmup_step"),
            (dict(warmup_step=2, update_step=-2, update_times=2, global_batch=4), "update_step"),
            (dict(warmup_step=2, update_step=2, update_times=-1, global_batch=4), "update_times"),
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
            Schedule.build(**kwargs)

    def test_max_steps_makes_epochs_irrelevant(self):
        # epochs 0 is only an error when it decides the length
        assert Schedule.build(2, 2, 2, global_batch=1, num_train_epochs=0, max_steps=3).total_steps == 3


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


# =========================================================================== records
class TestRecords:
    def test_write_record_atomic_no_temp_file(self, tmp_path):
        cache = tmp_path / "cache" / "nested"
        path = write_record(cache, 12, {"indices": [3, 1, 2], "metric": {}, "fingerprint": "abc"})
        assert path == record_path(cache, 12) == cache / "step_12.json"
        assert sorted(os.listdir(cache)) == ["step_12.json"]
        data = json.loads(path.read_text())
        assert data["indices"] == [3, 1, 2]
        assert data["version"] == 1

    def test_failed_write_keeps_old_file_and_leaves_no_temp(self, tmp_path):
        path = tmp_path / "step_0.json"
        atomic_write_json(path, {"indices": [1]})
        with pytest.raises(TypeError):
            atomic_write_json(path, {"indices": [object()]})  # not JSON-serialisable
        assert os.listdir(tmp_path) == ["step_0.json"]
        assert json.loads(path.read_text()) == {"indices": [1]}

    def test_load_record_roundtrip_and_fingerprint(self, tmp_path):
        write_record(tmp_path, 4, {"indices": [9, 8], "fingerprint": "fp1"})
        rec = load_record(tmp_path, 4, "fp1")
        assert rec is not None and rec["indices"] == [9, 8]
        assert load_record(tmp_path, 4, "other") is None  # another run's record
        assert load_record(tmp_path, 6, "fp1") is None  # no record

    @pytest.mark.parametrize(
        "text",
        [
            '{"indices": [1, 2], "fingerprint": "fp"',  # truncated
            "",
            '{"fingerprint": "fp"}',  # no indices
            '{"indices": [1, "2"], "fingerprint": "fp"}',
            '{"indices": {"a": 1}, "fingerprint": "fp"}',
            "[1, 2, 3]",
        ],
    )
    def test_corrupt_record_is_ignored(self, tmp_path, text):
        (tmp_path / "step_2.json").write_text(text)
        assert load_record(tmp_path, 2, "fp") is None

    def test_fingerprint_stable_and_sensitive(self):
        a = fingerprint({"seed": 1, "model": "m", "train": {"size": 3}})
        assert a == fingerprint({"train": {"size": 3}, "model": "m", "seed": 1})  # key order irrelevant
        assert a != fingerprint({"seed": 2, "model": "m", "train": {"size": 3}})
        assert len(a) == 16 and int(a, 16) >= 0


# =========================================================================== selector params
@dataclass
class _SampleParams(Params):
    """A selector's params with every supported kind of type (module level: string annotations)."""

    n: int = 1
    x: float = 0.5
    mode: Literal["a", "b"] = "a"
    ks: list[int] = field(default_factory=list)
    opt: int | None = None

    def check(self):
        if self.n < 1:
            self.fail("n", "an integer >= 1")


class TestParams:
    def test_random_params_defaults_and_values(self):
        p = RandomParams.from_dict("c", None)
        assert p.replacement is False and p.cache_dir is None
        p = RandomParams.from_dict("c", {"replacement": True, "cache_dir": "/x"})
        assert p.to_dict() == {"cache_dir": "/x", "replacement": True}

    def test_unknown_key_names_component_and_key(self):
        with pytest.raises(ConfigError) as err:
            RandomParams.from_dict("mycomp", {"replacment": True})
        msg = str(err.value)
        assert "mycomp" in msg and "'replacment'" in msg and "replacement" in msg and "cache_dir" in msg
        assert "\n" not in msg

    @pytest.mark.parametrize(
        "key, value",
        [("replacement", "yes"), ("replacement", 1), ("replacement", None), ("cache_dir", 5), ("cache_dir", ["a"])],
    )
    def test_wrong_type_names_key(self, key, value):
        with pytest.raises(ConfigError) as err:
            RandomParams.from_dict("mycomp", {key: value})
        msg = str(err.value)
        assert "mycomp" in msg and f"'{key}'" in msg and "wrong type" in msg

    def test_coercion_rules_and_range_check(self):
        P = _SampleParams
        p = P.from_dict("c", {"n": 3, "x": 2, "mode": "b", "ks": [1, 2], "opt": None})
        assert (p.n, p.x, p.mode, p.ks, p.opt) == (3, 2.0, "b", [1, 2], None)
        assert isinstance(p.x, float)
        for bad in ({"n": 1.5}, {"n": True}, {"x": "1"}, {"mode": "c"}, {"ks": [1, "2"]}, {"ks": 3}, {"opt": "1"}):
            with pytest.raises(ConfigError, match=f"'{next(iter(bad))}'"):
                P.from_dict("c", bad)
        with pytest.raises(ConfigError, match=r"param 'n' = 0 is invalid; allowed: an integer >= 1"):
            P.from_dict("c", {"n": 0})
        rows = {r[0]: r for r in P.describe()}
        assert rows["mode"][1] == "a | b" and rows["ks"][2] == [] and "cache_dir" in rows

    def test_registry(self):
        assert SELECTORS["random"] is RandomSelector
        assert get_selector_class("random") is RandomSelector
        with pytest.raises(ConfigError, match=r"component 'k': unknown selector name 'bogus'; available: .*random"):
            get_selector_class("bogus", "k")


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
mixers:            # not a selector entry: skipped
  weights: [1, 2]
"""


class TestComponentsFile:
    def test_with_top_level_selectors(self, tmp_path):
        path = tmp_path / "c.yaml"
        path.write_text(SEEDS_FORMAT)
        specs = load_components(path)
        assert list(specs) == ["loss", "plain"]
        assert specs["loss"] == ComponentSpec(
            "loss", "random", {"cache_dir": "../dataflex_saves/loss_output", "replacement": True}, path
        )
        assert specs["plain"].params == {}
        sel = build_selector(get_component(path, "loss"))
        assert isinstance(sel, RandomSelector)
        assert sel.params.replacement is True and sel.params.cache_dir == "../dataflex_saves/loss_output"

    def test_without_top_level_selectors(self, tmp_path):
        path = tmp_path / "c.yaml"
        path.write_text(FLAT_FORMAT)
        specs = load_components(path)
        assert list(specs) == ["mine"]
        assert build_selector(specs["mine"]).params.replacement is False

    def test_empty_file_has_no_components(self, tmp_path):
        path = tmp_path / "c.yaml"
        path.write_text("# nothing\n")
        assert load_components(path) == {}
        with pytest.raises(ConfigError, match=r"known components: \(none\)"):
            get_component(path, "random")

    def test_unknown_component_lists_known(self, tmp_path):
        path = tmp_path / "c.yaml"
        path.write_text(SEEDS_FORMAT)
        with pytest.raises(ConfigError) as err:
            get_component(path, "nope")
        assert str(err.value).startswith("component_name: 'nope'")
        assert "known components: loss, plain" in str(err.value)

    @pytest.mark.parametrize(
        "text, match",
        [
            ("a: [unclosed\n", r"is not valid YAML \(line 2\): expected ',' or '\]'"),
            ("a:\n  name: random\n b: 1\n", r"is not valid YAML \(line 3\): expected <block end>"),
            ("- just\n- a list\n", "must hold a mapping"),
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
        assert isinstance(build_selector(get_component(path, "ok")), RandomSelector)

    def test_bad_params_in_file(self, tmp_path):
        path = tmp_path / "c.yaml"
        path.write_text("selectors:\n  r:\n    name: random\n    params: {replacment: true}\n")
        with pytest.raises(ConfigError, match=r"component 'r': unknown param 'replacment'"):
            build_selector(get_component(path, "r"))

    def test_missing_file(self, tmp_path):
        with pytest.raises(ConfigError, match="cannot read"):
            load_components(tmp_path / "absent.yaml")

    def test_packaged_file(self):
        assert PACKAGED_COMPONENTS.is_file()
        specs = load_components(PACKAGED_COMPONENTS)
        assert specs["random"].selector == "random"
        assert isinstance(build_selector(specs["random"]), RandomSelector)


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
