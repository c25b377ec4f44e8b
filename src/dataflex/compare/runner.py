"""Running a comparison: every method x seed through ``dataflex-cli train``, then its checkpoints measured.

Each run trains in its own process with the ordinary command (so ``FORCE_TORCHRUN=1`` and DeepSpeed
work as they do for ``dataflex-cli train``), writes its ordinary outputs into ``OUT/<method>/seed-<k>/``
and, once trained and measured, ``compare_run.json`` there: the run's key, config, seconds and curve.
A rerun of the same command finds that file with the same key and skips the run; a run without it
(killed, crashed, interrupted) is trained again from scratch. ``compare.json`` in OUT is rewritten
after every run, so an interrupted comparison still has its table of what finished.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any, Callable, Iterator

import yaml

from ..errors import ConfigError
from . import analysis
from .plan import RunSpec, Setup, prepare

FORMAT = 2  # 2: curve points carry the decisions' token passes and "work"
_BAR = re.compile(r"(\d+)/(\d+) \[")


def _say(text: str) -> None:
    print(text, file=sys.stderr, flush=True)


class RunFailed(Exception):
    pass


LOCK = "compare.lock"


def _holder_alive(holder: str) -> bool:
    """Whether the process named by a lock's ``"<host> <pid>"`` still runs; one on another host counts as alive
    (this host cannot tell), as does a lock it cannot read."""
    host, _, pid = holder.strip().rpartition(" ")
    if host != socket.gethostname() or not pid.isdigit():
        return True
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


@contextlib.contextmanager
def claim(out: Path) -> Iterator[None]:
    """Hold ``OUT/compare.lock`` while a comparison writes OUT: a second comparison started on the same folder
    would train the same runs into the same run folders. A lock left by a killed comparison (its process is gone)
    is taken over; one held by a running comparison raises :class:`ConfigError` before anything is written."""
    path = out / LOCK
    me = f"{socket.gethostname()} {os.getpid()}"
    for _ in range(3):
        try:
            fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            try:
                holder = path.read_text(encoding="utf-8")
            except FileNotFoundError:  # released between the two calls
                continue
            if _holder_alive(holder):
                host, _, pid = holder.strip().rpartition(" ")
                raise ConfigError(f"--out: {out} is being written by another comparison (pid {pid or '?'} on "
                                  f"{host or '?'}); wait for it to end, choose another --out, or delete {path} if "
                                  "no comparison runs there") from None
            path.unlink(missing_ok=True)  # left by a comparison that was killed
            continue
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(me)
        break
    else:
        raise ConfigError(f"--out: could not take {path}: another comparison keeps taking it")
    try:
        yield
    finally:
        with contextlib.suppress(OSError):
            if path.read_text(encoding="utf-8") == me:
                path.unlink()


class Progress:
    """One line per run and about one every few seconds while it trains: method, seed, step, ETA."""

    def __init__(self, total_runs: int, say: Callable[[str], None] = _say, every: float = 5.0):
        self.total, self.say, self.every = total_runs, say, every
        self.done_seconds: list[float] = []
        self.number = 0

    def eta_rest(self, spec: RunSpec, left_in_run: float, step_time: float | None, remaining: list[RunSpec]) -> float:
        per_step = step_time or 0.0
        if self.done_seconds:
            per = sum(self.done_seconds) / len(self.done_seconds)
            return left_in_run + per * len(remaining)
        return left_in_run + per_step * sum(r.steps for r in remaining)


def _fmt_seconds(s: float) -> str:
    s = int(round(s))
    return f"{s // 3600}h{s % 3600 // 60:02d}m" if s >= 3600 else f"{s // 60}m{s % 60:02d}s" if s >= 60 else f"{s}s"


def train(spec: RunSpec, progress: Progress, remaining: list[RunSpec], env: dict[str, str] | None = None) -> None:
    """Train one run with ``dataflex-cli train`` in a child process; its output goes to ``train.log``."""
    if spec.out.exists():
        shutil.rmtree(spec.out)  # an unfinished earlier attempt: start again from scratch
    spec.out.mkdir(parents=True)
    cfg = dict(spec.cfg)
    if spec.method.params:
        spec.components_path.write_text(yaml.safe_dump(spec.components, sort_keys=False), encoding="utf-8")
        cfg["components_cfg_file"] = str(spec.components_path.resolve())
    spec.config_path.write_text(yaml.safe_dump(cfg, sort_keys=False), encoding="utf-8")
    cmd = [sys.executable, "-m", "dataflex.cli", "train", str(spec.config_path)]
    log_path = spec.out / "train.log"
    start = time.monotonic()
    seen: dict[str, Any] = {"first": None, "step": 0, "last_said": 0.0}

    def on_text(text: str) -> None:
        for piece in re.split(r"[\r\n]", text):
            m = _BAR.search(piece)
            if not m or int(m.group(2)) != spec.steps:
                continue
            step, now = int(m.group(1)), time.monotonic()
            if seen["first"] is None:
                seen["first"] = (step, now)
            seen["step"] = step
            first_step, first_time = seen["first"]
            step_time = (now - first_time) / (step - first_step) if step > first_step else None
            if step == seen.get("said_step") or (now - seen["last_said"] < progress.every and step != spec.steps):
                continue
            seen["last_said"], seen["said_step"] = now, step
            left = (spec.steps - step) * step_time if step_time else None
            rest = progress.eta_rest(spec, left or 0.0, step_time, remaining) if step_time else None
            eta = f", ETA run {_fmt_seconds(left)}, all {_fmt_seconds(rest)}" if left is not None else ""
            progress.say(f"[compare] run {progress.number}/{progress.total} {spec.name}: step {step}/{spec.steps}"
                         + (f", {step_time:.2f} s/step" if step_time else "") + eta)

    with log_path.open("w", encoding="utf-8") as log:
        # its own process group, so that stopping it stops everything it started (torchrun's workers); and
        # ended by the kernel if this process dies without a chance to stop it (SIGKILL)
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.PIPE, env=env, start_new_session=True,
                                preexec_fn=_die_with_parent)

        def pump() -> None:
            buf = b""
            while True:
                chunk = proc.stderr.read1(4096) if hasattr(proc.stderr, "read1") else proc.stderr.read(4096)
                if not chunk:
                    break
                log.write(chunk.decode("utf-8", errors="replace"))
                log.flush()
                buf += chunk
                cut = max(buf.rfind(b"\r"), buf.rfind(b"\n"))
                if cut >= 0:
                    on_text(buf[:cut + 1].decode("utf-8", errors="replace"))
                    buf = buf[cut + 1:]

        reader = threading.Thread(target=pump, daemon=True)
        reader.start()
        try:
            code = proc.wait()
        except BaseException:
            _stop(proc)
            raise
        finally:
            reader.join(timeout=10)
    if code != 0:
        tail = [line for line in log_path.read_text(encoding="utf-8", errors="replace").splitlines()
                if "error" in line.lower()][-1:]
        raise RunFailed(f"{spec.name}: dataflex-cli train exited with {code}"
                        + (f" ({tail[0].strip()[:200]})" if tail else "") + f"; log {log_path}")
    progress.done_seconds.append(time.monotonic() - start)


def _die_with_parent() -> None:
    """In the child, before exec: ask Linux for SIGKILL when the parent dies (elsewhere: nothing)."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


def _stop(proc: subprocess.Popen) -> None:
    """End a training child and everything it started (its own process group)."""
    for sig in (signal.SIGINT, signal.SIGKILL):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
        try:
            proc.wait(timeout=10)
            return
        except subprocess.TimeoutExpired:
            continue


def finished(spec: RunSpec, measure_key: str | tuple[str, ...] | None = None, needs_work: bool = False
             ) -> tuple[dict[str, Any] | None, bool]:
    """(the run's entry when it finished earlier with the same key and was measured the same way, whether it
    was trained with the same key). A trained run measured otherwise (another metric, test set, extra set or
    cap) is measured again, not trained again. An entry of format 1 (before counted work and measurement
    keys) serves a comparison that does not need counted work, as it was measured then. ``measure_key``: the
    key, or the keys, under which its measurements count."""
    try:
        entry = json.loads(spec.done_path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None, False
    if entry.get("key") not in spec.keys or entry.get("format") not in (1, FORMAT):
        return None, False
    if entry.get("format") != FORMAT:  # its checkpoints carry no counted decision work: train again for it
        return (None, False) if needs_work else (entry, True)
    accepted = (measure_key,) if isinstance(measure_key, str) else measure_key
    same = accepted is None or entry.get("measure_key") in accepted
    return (entry if same else None), True


def measure(spec: RunSpec, evaluator: Any, after_run: Callable[[RunSpec], dict[str, Any]] | None = None,
            measure_key: str | None = None) -> dict[str, Any]:
    """Measure every checkpoint of a trained run and write its ``compare_run.json`` (last, atomically).

    ``after_run(spec)``: the caller's own measurements of the run (its folder is ``spec.out``), kept in
    the entry as ``extra`` (a JSON-able dict), so a resumed comparison has them too."""
    from .evaluate import checkpoints, compute_of

    compute = compute_of(spec.out)
    curve = []
    for step, folder in checkpoints(spec.out):
        metrics = evaluator.measure(folder, spec.out / "compare_eval")
        curve.append({"step": step, **compute[step],
                      "values": {k: analysis.value(v) for k, v in metrics.items()},
                      "metrics": {k: [list(p) for p in v] for k, v in metrics.items()}})
    shutil.rmtree(spec.out / "compare_eval", ignore_errors=True)
    results = {}
    for name in ("all_results.json", "train_results.json"):
        path = spec.out / name
        if path.is_file():
            results = json.loads(path.read_text(encoding="utf-8"))
            break
    entry = {"format": FORMAT, "key": spec.key, "measure_key": measure_key, "method": spec.method.label,
             "seed_index": spec.index,
             "seed": spec.seed, "role": spec.role, "steps": spec.steps, "out": str(spec.out),
             "config": spec.cfg, "components": spec.components,
             "seconds": {"train": results.get("train_runtime"), "decisions": results.get("dataflex_seconds", 0.0)},
             "decision_tokens": {"forward": results.get("dataflex_decision_tokens_forward", 0),
                                 "backward": results.get("dataflex_decision_tokens_backward", 0)},
             "curve": curve, "extra": after_run(spec) if after_run is not None else None}
    tmp = spec.done_path.with_suffix(".tmp")
    tmp.write_text(json.dumps(entry), encoding="utf-8")
    tmp.replace(spec.done_path)
    return entry


def summarise(setup: Setup, entries: dict[str, dict[str, Any]], failures: list[str],
              start: dict[str, Any] | None = None) -> dict[str, Any]:
    """The compare.json dict: the setup, the untrained model's metrics (``start``), every run's entry, the tables."""
    labels = [m.label for m in setup.methods]
    runs: dict[str, dict[str, list]] = {m.label: {} for m in setup.methods}
    for spec in setup.runs:
        runs[spec.method.label].setdefault(spec.role, [None] * setup.seeds)[spec.index] = entries.get(str(spec.out))
    own = ["loss"] + ({"choice": ["choice", "choice_norm"], "exact": ["exact"]}.get(setup.metric, []))
    metrics = own + [f"{name}:{m}" for name in setup.extra_sets for m in own]
    tables = []
    for budget in setup.budgets:
        for metric in metrics:
            tables.append(analysis.table(runs, labels, setup.baseline.label, budget, metric, setup.steps,
                                         setup.compute_unit))
    missing = [f"{s.name} ({s.out})" for s in setup.runs if str(s.out) not in entries]
    return {"format": FORMAT, "config": str(setup.config), "methods": labels, "baseline": setup.baseline.label,
            "seeds": setup.seeds, "budgets": setup.budgets, "metric": setup.metric, "compute": setup.compute_unit,
            "steps": setup.steps, "baseline_steps": setup.baseline_steps, "eval_every": setup.eval_every,
            "measure_key": _measure_key(setup), "eval_rows": setup.eval_rows, "eval_cap": setup.eval_cap, "quick": setup.quick,
            "extra_sets": setup.extra_sets, "start": start, "out": str(setup.out), "missing": missing,
            "failures": failures,
            "runs": [entries[str(s.out)] for s in setup.runs if str(s.out) in entries], "tables": tables}


def write_json(path: Path, data: dict[str, Any]) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(data, indent=1), encoding="utf-8")
    tmp.replace(path)


def execute(setup: Setup, say: Callable[[str], None] = _say, evaluator: Any = None,
            run_env: Callable[[RunSpec], dict[str, str]] | None = None,
            after_run: Callable[[RunSpec], dict[str, Any]] | None = None) -> dict[str, Any]:
    """Train and measure every unfinished run of a prepared setup; returns the compare.json dict.

    ``run_env(spec)``: the environment of that run's training process (default: this one's), e.g. to
    switch a plugin on with a folder of the run's own. ``after_run``: see :func:`measure`.
    KeyboardInterrupt ends the running child, writes compare.json with what finished and propagates.
    One comparison at a time writes a folder (:func:`claim`)."""
    setup.out.mkdir(parents=True, exist_ok=True)
    with claim(setup.out):
        return _execute(setup, say, evaluator, run_env, after_run)


def _execute(setup: Setup, say: Callable[[str], None], evaluator: Any,
             run_env: Callable[[RunSpec], dict[str, str]] | None,
             after_run: Callable[[RunSpec], dict[str, Any]] | None) -> dict[str, Any]:
    if evaluator is None:
        from .evaluate import Evaluators

        sets = {"": setup.measure_cfg or setup.cfg}
        sets.update({name: {**setup.cfg, "eval_dataset": dataset} for name, dataset in setup.extra_sets.items()})
        evaluator = Evaluators(sets, setup.metric, setup.options_column, cap=setup.eval_cap)
    order = sorted(setup.runs, key=lambda s: (s.index, s.role != "main"))  # seed 0 of every method first
    entries: dict[str, dict[str, Any]] = {}
    todo, again = [], []
    keys = _measure_keys(setup)
    key = keys[0]
    needs_work = setup.compute_unit == "work" and "compute" in setup.budgets
    elsewhere: dict[str, Path] | None = None  # --reuse: the other comparisons' finished runs, read once if needed
    for spec in order:
        entry, trained = finished(spec, keys, needs_work)
        if entry is None and not trained and setup.reuse:
            if elsewhere is None:
                elsewhere = _finished_runs(setup.reuse)
            if _take(setup, spec, elsewhere, say):
                entry, trained = finished(spec, keys, needs_work)
        if entry is not None:
            entries[str(spec.out)] = entry
            say(f"[compare] {spec.name}: finished earlier (key {spec.key}), skipped")
        elif trained:
            again.append(spec)
        else:
            todo.append(spec)
    progress = Progress(len(todo), say)
    failures: list[str] = []
    path = setup.out / "compare.json"
    start = _start_point(setup, evaluator, path, keys)
    try:
        for spec in again:
            say(f"[compare] {spec.name}: trained earlier (key {spec.key}), measured again for this metric / "
                "test set")
            entries[str(spec.out)] = measure(spec, evaluator, after_run, key)
            write_json(path, summarise(setup, entries, failures, start))
        for i, spec in enumerate(todo):
            progress.number = i + 1
            say(f"[compare] run {i + 1}/{len(todo)} {spec.name}: training {spec.steps} steps into {spec.out}")
            try:
                train(spec, progress, todo[i + 1:], env=run_env(spec) if run_env is not None else None)
                entries[str(spec.out)] = measure(spec, evaluator, after_run, key)
            except RunFailed as err:
                failures.append(str(err))
                say(f"[compare] {err}")
            write_json(path, summarise(setup, entries, failures, start))
    finally:
        data = summarise(setup, entries, failures, start)
        write_json(path, data)
    return data


def _finished_runs(folders: list[Path]) -> dict[str, Path]:
    """run key -> the folder of a finished run under these comparisons' folders (the first found)."""
    found: dict[str, Path] = {}
    for folder in folders:
        for path in sorted(folder.rglob("compare_run.json")):
            try:
                entry = json.loads(path.read_text(encoding="utf-8"))
            except (OSError, ValueError):
                continue
            if isinstance(entry, dict) and entry.get("format") in (1, FORMAT) and isinstance(entry.get("key"), str):
                found.setdefault(entry["key"], path.parent)
    return found


def _link_or_copy(src: str, dst: str) -> None:
    try:
        os.link(src, dst)  # safe to share: a run trained again is deleted first, its records are replaced whole
    except OSError:
        shutil.copy2(src, dst)


def _take(setup: Setup, spec: RunSpec, elsewhere: dict[str, Path], say: Callable[[str], None]) -> bool:
    """``--reuse``: take a run not finished here from another comparison that finished a run with its key (its
    resolved config, parameters and data content) - its folder linked (or copied) into this run's, its record
    relabelled as this comparison's - instead of training it; whether it was taken. It is then measured here as
    any finished run is: not at all when its measurement key is this comparison's, from its checkpoints when not."""
    src = next((elsewhere[k] for k in spec.keys if k in elsewhere), None)
    if src is None or src.resolve() == spec.out.resolve() or setup.out.resolve() in src.resolve().parents:
        return False
    if spec.out.exists():
        shutil.rmtree(spec.out)  # an unfinished attempt of its own
    shutil.copytree(src, spec.out, copy_function=_link_or_copy)
    entry = json.loads(spec.done_path.read_text(encoding="utf-8"))
    entry.update({"method": spec.method.label, "seed_index": spec.index, "seed": spec.seed, "role": spec.role,
                  "out": str(spec.out), "config": spec.cfg, "components": spec.components, "taken_from": str(src)})
    tmp = spec.done_path.with_suffix(".tmp")
    tmp.write_text(json.dumps(entry), encoding="utf-8")
    tmp.replace(spec.done_path)  # a new file: the original's record stays as it was
    say(f"[compare] {spec.name}: the same run (key {entry['key']}) finished in {src}; taken, not trained")
    return True


def _start_point(setup: Setup, evaluator: Any, path: Path, keys: tuple[str, ...]) -> dict[str, Any]:
    """The untrained model's metrics (step 0 of every curve): measured once, kept in compare.json (and kept
    while its measurement key is one of ``keys``)."""
    try:
        old = json.loads(path.read_text(encoding="utf-8"))
        if old.get("format") == FORMAT and old.get("start") and old.get("measure_key") in keys:
            return old["start"]
    except (OSError, ValueError):
        pass
    metrics = evaluator.measure(None, setup.out / "compare_eval")
    shutil.rmtree(setup.out / "compare_eval", ignore_errors=True)
    return {"step": 0, "values": {k: analysis.value(v) for k, v in metrics.items()},
            "metrics": {k: [list(p) for p in v] for k, v in metrics.items()}}


def _measure_key(setup: Setup) -> str:
    """What the measurements depend on: the measured set's config (not where the comparison writes) and
    content, the extra sets', the cap and the metric."""
    return _measure_keys(setup)[0]


def _measure_keys(setup: Setup) -> tuple[str, str]:
    """:func:`_measure_key`, and the key that compare gave the same measurements before it keyed the data by
    content (``dataset_dir`` as a path): measurements made under it still count."""
    from .plan import key_hash, keyed, path_run_key, without_outputs

    rest = {"extra": setup.extra_sets, "cap": setup.eval_cap, "metric": setup.metric}
    return (key_hash({"measure": keyed(setup.measure_cfg, tuple(setup.extra_sets.values()), train=False), **rest}),
            path_run_key({"measure": without_outputs(setup.measure_cfg), **rest}, None))


def run(config: str | os.PathLike, methods: str, seeds: int | None = None, budget: str = "steps", metric: str = "loss",
        out: str | os.PathLike = "compare_out", overrides: list[str] | None = None,
        run_env: Callable[[RunSpec], dict[str, str]] | None = None,
        after_run: Callable[[RunSpec], dict[str, Any]] | None = None, **options: Any) -> dict[str, Any]:
    """The whole comparison from Python (what ``dataflex-cli compare`` does): returns the compare.json dict.
    ``options``: :func:`~dataflex.compare.plan.prepare`'s; ``run_env``, ``after_run``: :func:`execute`'s."""
    setup = prepare(config, methods, seeds=seeds, budget=budget, metric=metric, out=out, overrides=overrides, **options)
    return execute(setup, run_env=run_env, after_run=after_run)


def text_report(data: dict[str, Any]) -> str:
    parts = [analysis.render(t) for t in data["tables"]]
    if data["missing"]:
        parts.append("missing runs (rerun the same command to finish them): " + "; ".join(data["missing"]))
    return "\n\n".join(parts)
