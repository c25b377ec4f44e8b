"""The docs stay true: their CPU commands run, their YAML snippets validate, their links resolve."""

from __future__ import annotations

import os
import re
import shlex
import sys
from pathlib import Path

import pytest
import yaml

from support.helpers import REPO_ROOT, failure_report, run_command

DOCS = sorted([REPO_ROOT / "README.md", *(REPO_ROOT / "docs").rglob("*.md")])
FENCE = re.compile(r"```(\w*)\n(.*?)```", re.S)


def _blocks(lang: str):
    for doc in DOCS:
        for kind, body in FENCE.findall(doc.read_text(encoding="utf-8")):
            if kind == lang:
                yield doc, body


def _commands(prefix: str) -> list[str]:
    """Every shell line (in code blocks or inline code) of the docs that starts with ``prefix``."""
    found = []
    for doc in DOCS:
        text = doc.read_text(encoding="utf-8")
        for line in re.findall(r"`([^`\n]+)`", text) + [ln.strip() for _, b in FENCE.findall(text) for ln in b.splitlines()]:
            line = line.split("  #")[0].strip()
            if line.startswith(prefix) and line not in found:
                found.append(line)
    return found


def test_docs_exist_for_every_component():
    from dataflex.components_file import available
    from dataflex.modes import SECTIONS as KINDS

    for kind in KINDS:
        for name in available(kind):
            assert (REPO_ROOT / "docs" / kind / f"{name}.md").is_file(), f"docs/{kind}/{name}.md"


def test_relative_links_resolve():
    for doc in DOCS:
        for target in re.findall(r"\]\(([^)#\s]+)(?:#[^)]*)?\)", doc.read_text(encoding="utf-8")):
            if "://" in target or target.startswith("mailto:"):
                continue
            assert (doc.parent / target).exists(), f"{doc.relative_to(REPO_ROOT)} links to missing {target}"


def test_yaml_snippets_validate(tmp_path):
    """Components snippets build their components; training snippets pass DataFlex's checks."""
    from dataflex.components_file import build_component, load_components
    from dataflex.integration import known_train_keys
    from dataflex.modes import SECTIONS as KINDS
    from dataflex.plan import RunPlan

    known = known_train_keys()
    checked = 0
    for doc, body in _blocks("yaml"):
        data = yaml.safe_load(body)
        if not isinstance(data, dict):
            continue
        sections = [data[k] for k in KINDS if isinstance(data.get(k), dict)] or [data]
        if all(isinstance(v, dict) and "name" in v for entries in sections for v in entries.values()):
            path = tmp_path / "components.yaml"
            if set(data) == {"pipelines"}:  # pipelines alone: their stages name the packaged file's presets
                from dataflex.components_file import PACKAGED_COMPONENTS

                packaged = yaml.safe_load(PACKAGED_COMPONENTS.read_text(encoding="utf-8"))
                body = yaml.safe_dump({**{k: v for k, v in packaged.items() if k != "pipelines"}, **data})
            path.write_text(body)
            loaded = load_components(path)
            trained_first = {k for k, v in (data.get("mixers") or {}).items()
                             if str((v.get("params") or {}).get("reference_model_path", "")).startswith("saves/")}
            for specs in ([loaded["pipelines"]] if set(data) == {"pipelines"} else loaded.values()):
                for spec in specs.values():
                    if ":" in spec.name or spec.name == "shortest" or spec.key in trained_first or \
                            any(st.get("component") in trained_first for st in spec.params.get("stages") or []):
                        continue  # a tutorial's own component, or one using a model the page trains first
                    build_component(spec)
                    checked += 1
        elif "train_type" in data:
            unknown = [k for k in data if k not in known]
            assert not unknown, f"{doc.name}: unknown keys {unknown}"
            if data.get("component_name") not in (None, "shortest", "mine") and "components_cfg_file" not in data:
                RunPlan.build(data, yaml_dir=REPO_ROOT)
            checked += 1
    assert checked >= 5


# Train commands that only pick another selector or schedule for the quick-start YAML are checked
# the way `dataflex-cli train` checks a config before it trains (DataFlex's checks, LLaMA-Factory's
# parser, datasets, model, output_dir) instead of being trained: each of these selectors trains end
# to end in its own tests, and a run here would repeat that run. Commands whose output another
# command reads, other train_types and multi-process commands are run.
CHECK_ONLY_KEYS = {"component_name", "update_times", "update_step", "warmup_step"}


def _check_only(args: list[str], env: dict, named: str | None, read: set[str]) -> bool:
    overrides = [a.split("=", 1)[0] for a in args[3:]]
    return not env and named not in read and bool(overrides) and set(overrides) <= CHECK_ONLY_KEYS


@pytest.mark.e2e
def test_readme_quick_start_and_doc_commands(tmp_path, monkeypatch):
    """`bash examples/quickstart.sh`, then every CPU command the docs show, as written - in a copy of
    the repository's examples and data, so nothing is written into the checkout."""
    import shutil

    from dataflex.launcher import make_plan

    work = tmp_path / "checkout"
    for folder in ("examples", "data"):
        shutil.copytree(REPO_ROOT / folder, work / folder)
    # the commands as a user types them: the console scripts of this interpreter's environment first
    path_env = {"PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"}
    saves_before = sorted((REPO_ROOT / "saves").rglob("*")) if (REPO_ROOT / "saves").exists() else []
    res = run_command(["bash", "examples/quickstart.sh"], env=path_env, cwd=work, timeout=600)
    assert res.returncode == 0, failure_report(res)
    adapter = work / "saves" / "tiny-qwen2" / "lora" / "quickstart"
    assert (adapter / "adapter_model.safetensors").is_file()
    assert sorted(p.name for p in (adapter / "dataflex").glob("*/step_*.json")) == [
        "step_10.json", "step_20.json", "step_30.json"]
    assert (work / "saves" / "tiny-qwen2" / "merged" / "model.safetensors").is_file()
    assert "Selection records:" in res.stdout and "(3 file(s))" in res.stdout

    commands = _commands("dataflex-cli ") + _commands("FORCE_TORCHRUN=1 NPROC_PER_NODE=2 dataflex-cli ")
    # training first: a page may name a run in its text (`dataflex-cli report DIR`) before the block that trains it
    commands.sort(key=lambda line: " train " not in f" {line} ")
    ran = 0
    # a train command's output_dir, wherever report / export commands name it (in any page, before or after)
    moved = {a.split("=", 1)[1]: str(tmp_path / f"out{i}") for i, a in enumerate(
        a for line in commands for a in shlex.split(line) if a.startswith("output_dir="))}
    seen = {((), ("dataflex-cli", "train", "examples/train_lora/quickstart_cpu.yaml"))}  # quickstart.sh ran it
    read = {a for line in commands if not line.startswith("dataflex-cli train") for a in shlex.split(line)}
    checked = 0
    for line in commands:
        args = shlex.split(line)
        env = {}
        while args and "=" in args[0] and not args[0].startswith("dataflex-cli"):
            key, value = args.pop(0).split("=", 1)
            env[key] = value
        if len(args) < 3:
            continue
        if args[:2] == ["dataflex-cli", "train"]:
            if not args[2].endswith("quickstart_cpu.yaml"):
                continue  # GPU examples (real models from the hub)
            # as written, into a temporary output_dir, on fewer samples to keep the suite short
            args = [a for a in args if not a.startswith("output_dir=")]
            key = (tuple(sorted(env.items())), tuple(args))
            if key in seen:
                continue
            seen.add(key)
            named = next((a.split("=", 1)[1] for a in shlex.split(line) if a.startswith("output_dir=")), None)
            args += [f"output_dir={moved.get(named, tmp_path / f'run{ran}')}", "max_samples=100"]
            if _check_only(args[:-2], env, named, read):
                monkeypatch.chdir(work)
                cfg = make_plan(work / args[2], args[3:]).cfg
                assert cfg["train_type"] == "dynamic_select" and cfg["output_dir"] == args[-2].split("=", 1)[1], line
                checked += 1
                continue
        elif args[:2] in (["dataflex-cli", "list"], ["dataflex-cli", "report"], ["dataflex-cli", "export"]):
            if any("smollm2" in a for a in args):
                continue  # the real-model example: tests/e2e/test_real_model.py trains and reports SmolLM2
            if any(a.isupper() or a.startswith("[") for a in args) or any(
                    a.endswith(".yaml") and not (REPO_ROOT / a).exists() for a in args):
                continue  # a usage synopsis or a placeholder file, not a command to run
            args = [moved.get(a, a) if a != "saves/selected" else str(tmp_path / "selected") for a in args]
        else:
            continue
        res = run_command([sys.executable, "-m", "dataflex.cli", *args[1:]], env=env, cwd=work, timeout=600)
        assert res.returncode == 0, f"{line}\n{failure_report(res)}"
        ran += 1
    assert ran >= 5 and checked >= 4, (ran, checked, commands)
    assert (tmp_path / "selected" / "dataset_info.json").is_file()
    # getting started writes the quick-start run's HTML report: one offline page, small enough to attach
    page = work / "saves" / "quickstart_report.html"
    assert page.is_file() and page.stat().st_size < 2_000_000
    saves_after = sorted((REPO_ROOT / "saves").rglob("*")) if (REPO_ROOT / "saves").exists() else []
    assert saves_after == saves_before  # the checkout's saves/ was not touched
