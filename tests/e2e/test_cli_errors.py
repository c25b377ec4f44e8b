"""``dataflex-cli`` as a user meets it: one-line errors for bad configs, and the informational commands.

Every bad config fails before a model is loaded (the model path does not even exist), so a case
costs what importing LLaMA-Factory costs: once, in the warm CLI, for all but the first case.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from support.helpers import run_command, write_yaml

NO_MODEL = "/nonexistent/dataflex-test-model"  # proves no model is loaded before the error

LEGO = {"train_type": "dynamic_lego", "components_cfg_file": "comps.yaml", "component_name": "p"}
PIPE = "pipelines:\n  p: {{name: p, params: {{stages: [{}]}}}}\n"

# id -> (YAML overrides (None removes a key), extra files {name: text}, extra CLI args, expected fragments)
# These go through the CLI: the first one selected in a real subprocess (it pays for importing
# LLaMA-Factory), the others forked from the warm CLI (tests/support/warm_cli.py).
CASES = {
    "unknown_yaml_key": ({"warmup_stepz": 2}, {}, [], ["unknown key 'warmup_stepz'", "did you mean 'warmup_step'"]),
    "unknown_component": ({"component_name": "nope"}, {}, [],
                          ["component_name: 'nope'", "known selector components: ", "random"]),
    "missing_components_file": ({"components_cfg_file": "no_such_components.yaml"}, {}, [],
                                ["components_cfg_file: 'no_such_components.yaml' not found"]),
    "invalid_components_yaml": ({"components_cfg_file": "broken.yaml", "component_name": "r"},
                                {"broken.yaml": "selectors:\n  r: [unclosed\n"}, [],
                                ["components_cfg_file:", "broken.yaml", "is not valid YAML"]),
    "bad_train_type": ({"train_type": "static_select"}, {}, [],
                       ["train_type: 'static_select' is not supported", "dynamic_select"]),
    "train_type_without_component": ({"component_name": None}, {}, [], ["component_name: required"]),
    "negative_warmup_step": ({"warmup_step": -1}, {}, [], ["warmup_step: -1 is invalid"]),
    "update_step_zero": ({"update_step": 0, "update_times": 2}, {}, [],
                         ["update_step: 0 is invalid with update_times = 2"]),
    "unknown_selector_param": ({"components_cfg_file": "comps.yaml", "component_name": "r"},
                               {"comps.yaml": "selectors:\n  r:\n    name: random\n    params: {replacment: true}\n"},
                               [], ["component 'r': unknown param 'replacment'", "replacement"]),
    "unregistered_dataset": ({"dataset": "demo_mix,no_such_set"}, {}, ["seed=7"],
                             ["dataset: 'no_such_set' is not registered", "demo_mix"]),
    "lego_two_budget_takers_cli": ({**LEGO, "dataset": "wiki_demo,c4_demo"},
                                   {"comps.yaml": "selectors:\n  r: {name: random}\nmixers:\n  m: {name: random}\n" +
                                    PIPE.format("{family: selector, component: r, mode: draw}, "
                                                "{family: mixer, component: m}")}, [],
                                   ["pipeline 'p': selector:r and mixer:m both take the update's rows"]),
}

# More bad configs, checked in-process through the same `prepare` the CLI calls (fast).
PREPARE_CASES = {
    "unknown_override_key": ({}, {}, ["update_stepp=3"], ["unknown key 'update_stepp'"]),
    "override_negative_warmup": ({}, {}, ["warmup_step=-3"], ["warmup_step: -3 is invalid"]),
    "missing_update_times": ({"update_times": None}, {}, [], ["update_times: required"]),
    "missing_update_step": ({"update_step": None}, {}, [], ["update_step: required"]),
    "bool_update_times": ({"update_times": True}, {}, [], ["update_times: True is invalid"]),
    "empty_schedule": ({"warmup_step": 0, "update_step": 0, "update_times": 0}, {}, [], ["the schedule has no steps"]),
    "wrong_selector_param_type": ({"components_cfg_file": "comps.yaml", "component_name": "r"},
                                  {"comps.yaml": "r:\n  name: random\n  params: {replacement: 'yes'}\n"},
                                  [], ["param 'replacement'", "wrong type"]),
    "unknown_selector_name": ({"components_cfg_file": "comps.yaml", "component_name": "r"},
                              {"comps.yaml": "selectors:\n  r: {name: bogus}\n"},
                              [], ["unknown selector name 'bogus'", "available: ", "random"]),
    "unknown_component_entry_key": ({"components_cfg_file": "comps.yaml", "component_name": "r"},
                                    {"comps.yaml": "r: {name: random, parms: {}}\n"}, [], ["unknown key 'parms'"]),
    "unregistered_eval_dataset": ({"eval_dataset": "nope_eval"}, {}, [], ["eval_dataset: 'nope_eval'"]),
    "stage_not_sft_or_pt": ({"stage": "dpo"}, {}, [], ["stage: 'dpo'"]),
    "early_stopping_min_delta_negative": ({"early_stopping_steps": 2}, {}, ["early_stopping_min_delta=-0.5"],
                                          ["early_stopping_min_delta: -0.5 is invalid; allowed: a number >= 0"]),
    "choice_param_out_of_set": ({"components_cfg_file": "comps.yaml", "component_name": "l"},
                                {"comps.yaml": "l: {name: loss, params: {focus: mid}}\n"},
                                [], ["param 'focus' = 'mid' is invalid; allowed: low | medium | high"]),
    "bad_override_syntax": ({}, {}, ["update_times=[1"], ["command-line overrides", "could not be applied"]),
    "registered_file_missing": ({"dataset_dir": "{tmp}/localdata", "dataset": "ghost"},
                                {"localdata/dataset_info.json": '{"ghost": {"file_name": "ghost.json"}}'}, [],
                                ["dataset: dataset 'ghost' is registered as", "localdata/ghost.json, which does not exist"]),
    "less_without_eval_dataset": ({"component_name": "less", "eval_dataset": None}, {}, [],
                                  ["eval_dataset: required by selector 'less'"]),
    "zeroth_with_full_finetuning": ({"component_name": "zeroth", "eval_dataset": "demo_add_eval",
                                     "finetuning_type": "full"}, {}, [],
                                    ["finetuning_type: 'full' is not supported by selector 'zeroth'; supported: lora"]),
    "less_bad_proj_dim": ({"components_cfg_file": "comps.yaml", "component_name": "x", "eval_dataset": "demo_add_eval"},
                          {"comps.yaml": "x: {name: less, params: {proj_dim: 0}}\n"}, [], ["param 'proj_dim' = 0 is invalid"]),
    "zeroth_bad_directions": ({"components_cfg_file": "comps.yaml", "component_name": "x",
                               "eval_dataset": "demo_add_eval"},
                              {"comps.yaml": "x: {name: zeroth, params: {num_directions: 0}}\n"}, [],
                              ["param 'num_directions' = 0 is invalid"]),
    "delta_bad_window": ({"components_cfg_file": "comps.yaml", "component_name": "x"},
                         {"comps.yaml": "x: {name: delta_loss, params: {window_size: 1.5}}\n"}, [],
                         ["param 'window_size' = 1.5 is invalid"]),
    "loss_bad_temperature": ({"components_cfg_file": "comps.yaml", "component_name": "x"},
                             {"comps.yaml": "x: {name: loss, params: {temperature: 0}}\n"}, [],
                             ["param 'temperature' = 0.0 is invalid"]),
    # keys of LLaMA-Factory / transformers a DataFlex mode cannot serve (before any model is loaded)
    "fsdp": ({"fsdp": "full_shard"}, {}, [], ["fsdp: FSDP is not supported with train_type", "deepspeed"]),
    "fsdp_config": ({"fsdp_config": {"min_num_params": 1}}, {}, [], ["fsdp: FSDP is not supported"]),
    "streaming": ({"streaming": True}, {}, [], ["streaming: true cannot be used with train_type"]),
    "auto_find_batch_size": ({"auto_find_batch_size": True}, {}, [], ["auto_find_batch_size: true cannot be used"]),
    "train_step_disagrees_with_max_steps": ({"train_step": 5, "max_steps": 7}, {}, [],
                                            ["train_step: 5 disagrees with max_steps: 7"]),
    "resume_from_missing_checkpoint": ({"resume_from_checkpoint": "{tmp}/no-checkpoint"}, {}, [],
                                       ["resume_from_checkpoint: '", "no-checkpoint' is not a folder"]),
    "output_dir_not_writable": ({"output_dir": "/proc/dataflex-no-such-dir"}, {}, [],
                                ["output_dir: cannot write to '/proc/dataflex-no-such-dir'"]),
    "cache_dir_not_writable": ({"components_cfg_file": "comps.yaml", "component_name": "r"},
                               {"comps.yaml": "r: {name: random, params: {cache_dir: /proc/dataflex-cache}}\n"}, [],
                               ["component 'r': param 'cache_dir': cannot write to '/proc/dataflex-cache'"]),
    "seed_param_of_random_is_typed": ({"components_cfg_file": "comps.yaml", "component_name": "r"},
                                      {"comps.yaml": "r: {name: random, params: {seed: '42'}}\n"}, [],
                                      ["param 'seed' = '42' has the wrong type; expected: int or null"]),
    # dynamic_weight
    "weight_with_liger": ({"train_type": "dynamic_weight", "component_name": "loss", "enable_liger_kernel": True},
                          {}, [], ["enable_liger_kernel: true cannot be used with weighter 'loss'", "logits"]),
    "weight_with_label_smoothing": ({"train_type": "dynamic_weight", "component_name": "loss",
                                     "label_smoothing_factor": 0.1}, {}, [],
                                    ["label_smoothing_factor: 0.1 cannot be combined with weighter 'loss'"]),
    "weight_unknown_strategy": ({"train_type": "dynamic_weight", "components_cfg_file": "comps.yaml",
                                 "component_name": "w"},
                                {"comps.yaml": "weighters:\n  w: {name: loss, params: {strategy: lower}}\n"}, [],
                                ["param 'strategy' = 'lower' is invalid; allowed: linupper | uniform | quadratic | extremes"]),
    "weight_delta_not_positive": ({"train_type": "dynamic_weight", "components_cfg_file": "comps.yaml",
                                   "component_name": "w"},
                                  {"comps.yaml": "weighters:\n  w: {name: loss, params: {delta: 0}}\n"}, [],
                                  ["param 'delta' = 0.0 is invalid; allowed: a number > 0"]),
    "adapt_tau_not_positive": ({"train_type": "dynamic_weight", "components_cfg_file": "comps.yaml",
                                "component_name": "w", "eval_dataset": "demo_add_eval"},
                               {"comps.yaml": "weighters:\n  w: {name: adapt, params: {tau: -1}}\n"}, [],
                               ["param 'tau' = -1.0 is invalid"]),
    "adapt_without_eval_dataset": ({"train_type": "dynamic_weight", "component_name": "adapt", "eval_dataset": None},
                                   {}, [], ["eval_dataset: required by weighter 'adapt'"]),
    "weight_component_from_the_selectors": ({"train_type": "dynamic_weight", "component_name": "random"}, {}, [],
                                            ["component_name: 'random' is not in the weighters of",
                                             "known weighter components: adapt, custom, joint_update_aware, loss"]),
    # dynamic_mix
    "mix_without_update_step": ({"train_type": "dynamic_mix", "component_name": "random", "update_step": None,
                                 "dataset": "wiki_demo,c4_demo"}, {}, [], ["update_step: required with train_type: dynamic_mix"]),
    "mix_wrong_number_of_proportions": ({"train_type": "dynamic_mix", "component_name": "random",
                                         "dataset": "wiki_demo,c4_demo", "init_mixture_proportions": [0.2, 0.3, 0.5]},
                                        {}, [], ["init_mixture_proportions: 3 proportions for 2 datasets"]),
    "mix_proportions_do_not_sum_to_one": ({"train_type": "dynamic_mix", "component_name": "random",
                                           "dataset": "wiki_demo,c4_demo", "init_mixture_proportions": [0.5, 0.6]},
                                          {}, [], ["init_mixture_proportions: [0.5, 0.6] sums to 1.1"]),
    "mix_negative_proportion": ({"train_type": "dynamic_mix", "component_name": "random", "dataset": "wiki_demo,c4_demo",
                                 "init_mixture_proportions": [1.5, -0.5]}, {}, [],
                                ["init_mixture_proportions: [1.5, -0.5] is invalid; allowed: numbers >= 0"]),
    "mix_bad_sample_rule": ({"train_type": "dynamic_mix", "component_name": "random", "dataset": "wiki_demo,c4_demo",
                             "mixture_sample_rule": "proportional"}, {}, [],
                            ["mixture_sample_rule: 'proportional' is not supported; allowed: mixture, stratified, uniform"]),
    "mix_interleave": ({"train_type": "dynamic_mix", "component_name": "random", "dataset": "wiki_demo,c4_demo",
                        "mix_strategy": "interleave_under"}, {}, [], ["mix_strategy: 'interleave_under' cannot be used"]),
    "doremi_placeholder_reference": ({"train_type": "dynamic_mix", "components_cfg_file": "comps.yaml",
                                      "component_name": "d", "dataset": "wiki_demo,c4_demo"},
                                     {"comps.yaml": "mixers:\n  d: {name: doremi, params: {reference_model_path: "
                                                    "/path/to/checkpoint-xxx}}\n"}, [],
                                     ["param 'reference_model_path' = '/path/to/checkpoint-xxx' is invalid",
                                      "DoReMi step 1"]),
    "dynamic_moe_without_eval_sets": ({"train_type": "dynamic_mix", "component_name": "dynamic_moe",
                                       "dataset": "wiki_demo,c4_demo"}, {}, [],
                                      ["mixer_eval_dataset: mixer 'dynamic_moe' needs one eval dataset per training dataset"]),
    "odm_exploration_out_of_range": ({"train_type": "dynamic_mix", "components_cfg_file": "comps.yaml",
                                      "component_name": "o", "dataset": "wiki_demo,c4_demo"},
                                     {"comps.yaml": "mixers:\n  o: {name: odm, params: {min_exploration_rate: 2}}\n"},
                                     [], ["param 'min_exploration_rate' = 2.0 is invalid"]),
    "unknown_mixer": ({"train_type": "dynamic_mix", "components_cfg_file": "comps.yaml", "component_name": "m",
                       "dataset": "wiki_demo,c4_demo"},
                      {"comps.yaml": "mixers:\n  m: {name: doremix}\n"}, [],
                      ["unknown mixer name 'doremix'; available: doremi, dynamic_moe, odm, random, static"]),
    "mix_stage_dpo": ({"train_type": "dynamic_mix", "component_name": "random", "stage": "dpo"}, {}, [],
                      ["stage: 'dpo' cannot be used with train_type; allowed: sft, pt"]),
    # dynamic_lego: bad pipelines (docs/pipelines.md); LEGO = the pipeline `p` of comps.yaml
    "lego_unknown_family": (LEGO, {"comps.yaml": PIPE.format("{family: sampler, component: loss}")}, [],
                            ["pipeline 'p': stage 1: family 'sampler' is unknown; allowed: selector, mixer, reorder, "
                             "weighter"]),
    "lego_unknown_preset": (LEGO, {"comps.yaml": "selectors:\n  loss: {name: loss}\n" +
                                   PIPE.format("{family: selector, component: nope}")}, [],
                            ["pipeline 'p': selector stage 'nope': component_name: 'nope' is not in the selectors",
                             "known selector components: loss"]),
    "lego_two_budget_takers": ({**LEGO, "dataset": "wiki_demo,c4_demo"},
                               {"comps.yaml": "selectors:\n  r: {name: random}\nmixers:\n  m: {name: random}\n" +
                                PIPE.format("{family: selector, component: r, mode: draw}, "
                                            "{family: mixer, component: m}")}, [],
                               ["pipeline 'p': selector:r and mixer:m both take the update's rows; allowed: one "
                                "budget-taker"]),
    "lego_two_selectors": (LEGO, {"comps.yaml": "selectors:\n  r: {name: random}\n" +
                                  PIPE.format("{family: selector, component: r}, "
                                              "{family: selector, component: r, mode: draw}")}, [],
                           ["pipeline 'p': 2 selector stages (stages 1, 2); allowed: at most one per family"]),
    "lego_empty_pipeline": (LEGO, {"comps.yaml": PIPE.format("")}, [], ["pipeline 'p': no enabled stage"]),
    "lego_all_stages_disabled": (LEGO, {"comps.yaml": "selectors:\n  r: {name: random}\n" +
                                        PIPE.format("{family: selector, component: r, enabled: false}")}, [],
                                 ["pipeline 'p': no enabled stage"]),
    "lego_unknown_stage_key": (LEGO, {"comps.yaml": "selectors:\n  r: {name: random}\n" +
                                      PIPE.format("{family: selector, component: r, evry: 2}")}, [],
                               ["pipeline 'p': stage 1: unknown key 'evry'; allowed: family, component"]),
    "lego_bad_keep_ratio": (LEGO, {"comps.yaml": "selectors:\n  r: {name: random}\n" +
                                   PIPE.format("{family: selector, component: r, keep_ratio: 1.5}")}, [],
                            ["stage 1 (selector 'r'): 'keep_ratio' = 1.5 is invalid; allowed: a number in (0, 1]"]),
    "lego_mixer_it_cannot_serve": ({**LEGO, "dataset": "wiki_demo,c4_demo"},
                                   {"comps.yaml": "mixers:\n  d: {name: dynamic_moe}\n"
                                    + PIPE.format("{family: mixer, component: d}")}, [],
                                   ["stage 1 (mixer:d): mixer 'dynamic_moe' cannot run as a pipeline stage",
                                    "allowed mixers: static, random, odm, doremi"]),
    "lego_paced_reorder_it_cannot_serve": (LEGO, {"comps.yaml": "reorderers:\n  o: {name: static, params: "
                                                  "{pacing: linear}}\n" + PIPE.format("{family: reorder, component: o}")},
                                           [], ["stage 1 (reorder:o): reorderer with pacing 'linear' cannot run as a "
                                                "pipeline stage"]),
    "lego_without_update_step": ({"train_type": "dynamic_lego", "component_name": "select_only", "update_step": None},
                                 {}, [], ["update_step: required with train_type: dynamic_lego"]),
}


def _write_case(folder: Path, train_config, overrides, files) -> Path:
    cfg = train_config(NO_MODEL, folder / "out")
    for key, value in overrides.items():
        if value is None:
            cfg.pop(key, None)
        else:
            cfg[key] = value.replace("{tmp}", str(folder)) if isinstance(value, str) else value
    for name, text in files.items():
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        (folder / name).write_text(text, encoding="utf-8")
    return write_yaml(folder / "train.yaml", cfg)


def _selected_cases(request) -> list[str]:
    """The CASES this session will actually check (so `-k one_case` runs one CLI)."""
    wanted = []
    for item in request.session.items:
        callspec = getattr(item, "callspec", None)
        if item.originalname == "test_bad_config_fails_with_one_line" and callspec is not None:
            wanted.append(callspec.params["case"])
    return wanted or list(CASES)


@pytest.fixture(scope="module")
def bad_config_runs(request, tmp_path_factory, train_config, repo_root, run_cli):
    """Run every selected bad config through the CLI; {case: (result, output_dir)}. The first case is a
    real ``python -m dataflex.cli`` subprocess, the others forks of the warm CLI (the same app, warm)."""
    runs = {}
    for n, case in enumerate(_selected_cases(request)):
        overrides, files, args, _ = CASES[case]
        folder = tmp_path_factory.mktemp(case)
        config = _write_case(folder, train_config, overrides, files)
        runs[case] = (run_cli(["train", config, *args], cwd=repo_root, real=n == 0), folder / "out")
    return runs


def assert_one_line_error(result: subprocess.CompletedProcess, *fragments: str) -> str:
    assert result.returncode != 0, f"expected failure, got 0\nstdout:\n{result.stdout}"
    err = result.stderr.strip()
    assert "\n" not in err, f"stderr is not one line:\n{result.stderr}"
    assert err.startswith("dataflex-cli: error: "), err
    for fragment in fragments:
        assert fragment in err, f"{fragment!r} not in {err!r}"
    assert "Traceback" not in result.stdout + result.stderr
    return err


@pytest.mark.parametrize("case", list(CASES))
def test_bad_config_fails_with_one_line(case, bad_config_runs):
    result, output_dir = bad_config_runs[case]
    assert_one_line_error(result, *CASES[case][3])
    assert result.returncode == 2
    assert not output_dir.exists(), "output_dir was created for a config that cannot train"


@pytest.mark.parametrize("case", list(CASES) + list(PREPARE_CASES))
def test_prepare_rejects(case, tmp_path, train_config, repo_root, monkeypatch):
    """The same checks in-process: ConfigError, one line, before any model or output_dir exists."""
    from dataflex.errors import ConfigError
    from dataflex.launcher import make_plan

    overrides, files, args, fragments = {**CASES, **PREPARE_CASES}[case]
    config = _write_case(tmp_path, train_config, overrides, files)
    monkeypatch.chdir(repo_root)
    with pytest.raises(ConfigError) as err:
        make_plan(config, list(args))
    msg = str(err.value)
    assert "\n" not in msg
    for fragment in fragments:
        assert fragment in msg, f"{fragment!r} not in {msg!r}"
    assert not (tmp_path / "out").exists()


def test_prepare_resolves_components_and_leaves_plain_configs_alone(tmp_path, train_config, repo_root, monkeypatch):
    from dataflex.components_file import PACKAGED_COMPONENTS
    from dataflex.launcher import make_plan

    monkeypatch.chdir(repo_root)
    (tmp_path / "comps.yaml").write_text("r: {name: random}\n")
    config = _write_case(tmp_path, train_config, {"components_cfg_file": "comps.yaml", "component_name": "r"}, {})
    cfg = make_plan(config, ["warmup_step=3"]).cfg
    assert cfg["components_cfg_file"] == str((tmp_path / "comps.yaml").resolve())
    assert cfg["warmup_step"] == 3
    config = _write_case(tmp_path, train_config, {}, {})
    assert make_plan(config).cfg["components_cfg_file"] == str(PACKAGED_COMPONENTS)

    plain = train_config(NO_MODEL, tmp_path / "out")
    for key in ("train_type", "component_name", "warmup_step", "update_step", "update_times"):
        plain.pop(key)
    path = write_yaml(tmp_path / "plain.yaml", plain)
    assert make_plan(path).cfg == plain  # no DataFlex key added, nothing resolved


def test_missing_config_file(run_cli, tmp_path):
    result = run_cli(["train", tmp_path / "absent.yaml"])
    assert_one_line_error(result, "config file", "absent.yaml", "not found")


def test_unreadable_config_file(run_cli, tmp_path):
    path = tmp_path / "broken.yaml"
    path.write_text("model_name_or_path: [unclosed\n")
    assert_one_line_error(run_cli(["train", path]), "config file", "broken.yaml", "not valid YAML")


def test_read_config_malformed_yaml_is_config_error(tmp_path):
    from dataflex.args import read_config
    from dataflex.errors import ConfigError

    path = tmp_path / "broken.yaml"
    path.write_text("a: [unclosed\n")
    with pytest.raises(ConfigError, match="not valid YAML") as err:
        read_config(path)
    assert "\n" not in str(err.value)


def test_read_config_overrides_and_non_mapping(tmp_path):
    from dataflex.args import read_config
    from dataflex.errors import ConfigError

    path = tmp_path / "c.yaml"
    path.write_text("a: 1\nb: x\n")
    assert read_config(path, ["a=2", "c=hello world"]) == {"a": 2, "b": "x", "c": "hello world"}
    (tmp_path / "c.json").write_text('{"a": 1}')
    assert read_config(tmp_path / "c.json", ["b=3"]) == {"a": 1, "b": 3}
    with pytest.raises(ConfigError, match="not found"):
        read_config(tmp_path / "absent.yaml")


def test_read_config_top_level_list_is_config_error(tmp_path):
    from dataflex.args import read_config
    from dataflex.errors import ConfigError

    (tmp_path / "l.yaml").write_text("- 1\n- 2\n")
    with pytest.raises(ConfigError, match="must hold a mapping"):
        read_config(tmp_path / "l.yaml")


def test_export_missing_config(run_cli, tmp_path):
    assert_one_line_error(run_cli(["export", tmp_path / "absent.yaml"]), "absent.yaml", "not found")


# --------------------------------------------------------------------------- informational commands
def test_help(run_cli):
    result = run_cli(["--help"])
    assert result.returncode == 0, result.stderr
    for command in ("train", "export", "list", "version"):
        assert command in result.stdout


@pytest.mark.parametrize("command", ["train", "export", "list", "version"])
def test_command_help(run_cli, command):
    result = run_cli([command, "--help"])
    assert result.returncode == 0, result.stderr
    assert "Usage:" in result.stdout
    if command == "train":
        assert "CONFIG" in result.stdout and "--debug" in result.stdout


def test_no_args_shows_help(run_cli):
    result = run_cli([])
    assert "Usage:" in result.stdout + result.stderr


def test_version(run_cli):
    from dataflex import __version__

    result = run_cli(["version"])
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert lines[0] == f"dataflex {__version__}"
    assert "llamafactory 0.9.5" in lines


def test_console_script_exists_and_runs():
    script = Path(sys.executable).parent / "dataflex-cli"
    if not script.exists():
        pytest.skip("dataflex-cli console script not installed next to this interpreter")
    result = run_command([script, "version"])
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("dataflex ")


def test_list(run_cli):
    result = run_cli(["list"])
    assert result.returncode == 0, result.stderr
    out = result.stdout
    assert "random:" in out and "replacement" in out and "cache_dir" in out
    for header in ("Selectors (train_type: dynamic_select", "Mixers (train_type: dynamic_mix",
                   "Weighters (train_type: dynamic_weight"):
        assert header in out
    for name in ("doremi:", "odm:", "dynamic_moe:", "adapt:", "reweight_eta", "refresh_interval", "strategy"):
        assert name in out
    assert "Components (packaged" in out
    assert "name: random" in out and "mixer" in out and "weighter" in out
    # the components table stays aligned with long keys/names (joint_update_aware is 18 characters)
    table = [line for line in out.splitlines() if "  name: " in line and "  params: " in line]
    assert any("joint_update_aware" in line for line in table) and any("reorderer" in line for line in table)
    assert len({line.index(" name: ") for line in table}) == 1 and len({line.index(" params: ") for line in table}) == 1


def test_list_custom_file_and_errors(run_cli, tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("selectors:\n  mine: {name: random, params: {replacement: true}}\n")
    result = run_cli(["list", "--components", path])
    assert result.returncode == 0, result.stderr
    assert "mine" in result.stdout and "'replacement': True" in result.stdout
    assert_one_line_error(run_cli(["list", "-c", tmp_path / "absent.yaml"]), "components_cfg_file")


# --------------------------------------------------------------------------- torchrun command (pure)
def test_torchrun_command_honours_env():
    from dataflex.cli import torchrun_command

    env = {"NPROC_PER_NODE": "2", "NNODES": "3", "NODE_RANK": "1", "MASTER_ADDR": "10.0.0.5", "MASTER_PORT": "29555"}
    cmd = torchrun_command("my config.yaml", ["output_dir=/tmp/a b", "seed=3"], env, device_count=0)
    assert cmd[:3] == [sys.executable, "-m", "torch.distributed.run"]
    args = cmd[3:]
    assert args[args.index("--nproc_per_node") + 1] == "2"
    assert args[args.index("--nnodes") + 1] == "3"
    assert args[args.index("--node_rank") + 1] == "1"
    assert args[args.index("--master_addr") + 1] == "10.0.0.5"
    assert args[args.index("--master_port") + 1] == "29555"
    assert cmd[-5:] == ["-m", "dataflex.launcher", "my config.yaml", "output_dir=/tmp/a b", "seed=3"]


def test_torchrun_command_defaults_and_elastic():
    from dataflex.cli import torchrun_command
    from dataflex.errors import ConfigError

    cmd = torchrun_command("c.yaml", [], {}, device_count=4)
    assert cmd[cmd.index("--nproc_per_node") + 1] == "4"
    assert cmd[cmd.index("--nnodes") + 1] == "1"
    assert cmd[cmd.index("--master_port") + 1].isdigit()
    cmd = torchrun_command("c.yaml", [], {"NPROC_PER_NODE": "2", "RDZV_ID": "job", "MIN_NNODES": "1",
                                          "MAX_NNODES": "4", "MASTER_PORT": "1234"}, device_count=0)
    assert cmd[cmd.index("--nnodes") + 1] == "1:4"
    assert cmd[cmd.index("--rdzv-endpoint") + 1] == "127.0.0.1:1234"
    with pytest.raises(ConfigError, match="NPROC_PER_NODE"):
        torchrun_command("c.yaml", [], {}, device_count=0)


def test_args_name_no_mode_and_ask_the_mode_table():
    """args.py is generic: mode-specific key checks live in the mode class (check_args), reached
    through the mode table, and the train_type help is built from the table."""
    import dataclasses

    from dataflex import args
    from dataflex.errors import ConfigError
    from dataflex.modes import TABLE

    text = Path(args.__file__).read_text(encoding="utf-8")
    for mode in TABLE:
        assert mode.train_type not in text
        assert f'"{mode.name}"' not in text and f"({mode.name}" not in text
    (field,) = [f for f in dataclasses.fields(args.DataFlexArguments) if f.name == "train_type"]
    assert field.metadata["help"] == ("The DataFlex mode, one of: dynamic_select (a selector), dynamic_mix (a mixer), "
                                      "dynamic_weight (a weighter), dynamic_reorder (a reorderer), dynamic_lego (a pipeline); "
                                      "unset = plain "
                                      "LLaMA-Factory.")
    # the select mode's reading of the keys, through the table; the other modes accept the same keys
    keys = {"component_name": "x", "warmup_step": 0, "update_step": 0, "update_times": 0}
    with pytest.raises(ConfigError, match=r"^warmup_step/update_step/update_times: the schedule has no steps"):
        args.DataFlexArguments(train_type="dynamic_select", **keys).check_dataflex_args()
    args.DataFlexArguments(train_type="dynamic_weight", **keys).check_dataflex_args()
