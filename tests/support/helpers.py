"""What the tests share besides fixtures: reading what a run wrote, running the CLI (forked from the
warm CLI or as a subprocess), killing a run mid-step, training YAMLs, LLaMA-Factory's pipeline.

Tests import these by name (``from support.helpers import records, failure_report``); tests/ is on
sys.path (pytest's ``pythonpath``).
"""

from __future__ import annotations

import atexit
import os
import re
import signal
import subprocess
import sys
import tempfile
import time
import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import yaml

from support.environment import DATA_DIR, HF_HOME, QUICKSTART_YAML, REPO_ROOT, TESTS_DIR
from support.warm_cli import Zygote, enabled, import_time_differences

__all__ = [
    "DATA_DIR", "QUICKSTART_YAML", "REPO_ROOT", "TESTS_DIR", "base_train_config", "cli_command",
    "consumed_by_step", "failure_report", "kill_at_step", "llamafactory_cli", "load_lf_pipeline",
    "manifest", "records", "run_cli", "run_command", "run_forked", "traces", "warm_up", "weight_lines",
    "write_yaml",
]


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
# Every worker forks its CLI runs from one zygote that has imported the whole stack (tests/support/warm_cli.py);
# DATAFLEX_TEST_SUBPROCESS=1 makes them real subprocesses again.
_BASE_ENV = dict(os.environ)  # the environment support.environment set, the zygote's
_ZYGOTES: list[Zygote] = []


def _zygote() -> Zygote:
    """This worker's zygote, started on first use (or again if it died)."""
    if not _ZYGOTES or not _ZYGOTES[-1].alive():
        log = Path(HF_HOME) / f"warm-cli-{os.getpid()}-{len(_ZYGOTES)}.log"
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


def warm_up() -> None:
    """Start this worker's zygote now (it imports the stack while the caller sets up)."""
    if enabled():
        _zygote()


def run_cli(args: Sequence[Any], env: Mapping[str, str | None] | None = None, cwd=None, timeout: float = 120,
            real: bool | None = None) -> subprocess.CompletedProcess:
    """``python -m dataflex.cli ARGS``: a fork of the warm zygote where the environment allows it,
    a real subprocess otherwise or with ``real=True``; ``real=False`` insists on the fork."""
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

