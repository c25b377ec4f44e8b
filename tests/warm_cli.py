"""A warm ``dataflex-cli`` for the tests: import torch / transformers / LLaMA-Factory once per worker,
then fork a fresh child per run.

Each ``python -m dataflex.cli`` subprocess spends 10-20 s importing the stack before it does
anything. Here one *zygote* process per pytest worker imports everything once and never runs a
command itself; every CLI run is an ``os.fork()`` of it that sets the run's environment, cwd,
argv and output files, calls the same typer app the console script calls and exits with its code.
So each run starts from the same untouched state a new process would have, minus the imports.

The zygote is a separate process (not the pytest worker) because in-process tests patch
LLaMA-Factory, install logging handlers and leave caches behind; a child of the zygote sees none
of that. Runs whose environment differs from the zygote's in anything read at import time (see
:meth:`Zygote.can_run`) still use a real subprocess, and ``DATAFLEX_TEST_SUBPROCESS=1`` turns the fork
path off entirely.

Protocol (one run at a time per zygote): the client writes one JSON request per line on the
zygote's stdin; the zygote answers on a pipe with ``{"pid": N}`` once forked and
``{"pid": N, "code": C}`` when the child ended (``C`` as ``Popen.returncode``: ``-9`` for SIGKILL).
"""

from __future__ import annotations

import json
import os
import select
import subprocess
import sys
import time
from collections.abc import Mapping, Sequence
from pathlib import Path

SUBPROCESS_ENV = "DATAFLEX_TEST_SUBPROCESS"  # "1": every CLI run is a real subprocess
PROG_NAME = "python -m dataflex.cli"  # what click calls the program under `python -m dataflex.cli`

# Variables that may differ between the zygote and a run: all are read while the run runs, none at
# import time. Any other difference (HF_HOME, OMP_NUM_THREADS, HOME, CUDA_VISIBLE_DEVICES, ...)
# sends the run to a real subprocess.
RUNTIME_VARS = frozenset({
    "FORCE_TORCHRUN", "NPROC_PER_NODE", "NNODES", "NODE_RANK", "MASTER_ADDR", "MASTER_PORT", "RDZV_ID",
    "MIN_NNODES", "MAX_NNODES", "MAX_RESTARTS", "ALLOW_EXTRA_ARGS", "PYTEST_CURRENT_TEST",
    "PYTORCH_NVML_BASED_CUDA_CHECK",  # set by in-process tests; read when torch.cuda is first asked
})
RUNTIME_PREFIXES = ("DATAFLEX_PLUGINS", "DATAFLEX_TRACE_DIR", "DATAFLEX_TEST_FAULT", "DATAFLEX_TEST_PAUSE_")

# What the zygote imports up front: the CLI and the whole stack a training run touches.
WARM_MODULES = (
    "torch", "transformers", "peft", "datasets", "accelerate", "safetensors.torch", "typer", "yaml",
    "llamafactory.train.tuner", "llamafactory.train.sft.workflow", "llamafactory.train.pt.workflow",
    "llamafactory.hparams.parser", "llamafactory.data.parser", "llamafactory.model",
    "transformers.models.qwen2.modeling_qwen2", "transformers.models.qwen2.tokenization_qwen2_fast",
)


def enabled() -> bool:
    return os.environ.get(SUBPROCESS_ENV, "") in ("", "0")


def import_time_differences(env: Mapping[str, str], base: Mapping[str, str]) -> list[str]:
    """The variables that differ between ``env`` and the zygote's ``base`` and may matter at import time."""
    return sorted(key for key in set(env) | set(base) if env.get(key) != base.get(key)
                  and key not in RUNTIME_VARS and not key.startswith(RUNTIME_PREFIXES))


# --------------------------------------------------------------------------- client side
class Zygote:
    """One warm zygote process; :meth:`start` forks a run and returns a :class:`ForkedRun`."""

    def __init__(self, env: Mapping[str, str], cwd: str | os.PathLike, log: str | os.PathLike):
        self.env = dict(env)
        self.log = Path(log)
        read_fd, write_fd = os.pipe()
        with self.log.open("wb") as out:
            self.proc = subprocess.Popen([sys.executable, __file__, str(write_fd)], stdin=subprocess.PIPE,
                                         stdout=out, stderr=subprocess.STDOUT, env=self.env, cwd=str(cwd),
                                         pass_fds=(write_fd,), start_new_session=True)
        os.close(write_fd)
        self._fd, self._buffer, self._ready, self.busy = read_fd, b"", False, False
        self.set_by_imports: dict[str, str] = {}  # variables the zygote's imports set (a new process sets them too)

    def _message(self, timeout: float | None) -> dict | None:
        """The next reply, or None when none came within ``timeout`` seconds."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while b"\n" not in self._buffer:
            left = None if deadline is None else max(0.0, deadline - time.monotonic())
            if not select.select([self._fd], [], [], left)[0]:
                return None
            chunk = os.read(self._fd, 65536)
            if not chunk:
                tail = self.log.read_text(errors="replace")[-3000:] if self.log.exists() else ""
                raise RuntimeError(f"the warm CLI zygote exited (code {self.proc.poll()}):\n{tail}")
            self._buffer += chunk
        line, self._buffer = self._buffer.split(b"\n", 1)
        return json.loads(line)

    def wait_ready(self, timeout: float = 600) -> None:
        if not self._ready:
            message = self._message(timeout)
            assert message and message.get("ready"), f"the warm CLI zygote did not start: {message}"
            self.set_by_imports, self._ready = message["set_by_imports"], True

    def can_run(self, env: Mapping[str, str]) -> bool:
        """Whether a run with environment ``env`` sees what a new process would at import time.
        Variables the imports set themselves (TORCHINDUCTOR_CACHE_DIR) count as equal when ``env``
        lacks them or agrees: the child gets them as a new process would."""
        self.wait_ready()
        env = {**self.set_by_imports, **env}
        return not import_time_differences(env, {**self.env, **self.set_by_imports})

    def alive(self) -> bool:
        return self.proc.poll() is None

    def start(self, args: Sequence[str], env: Mapping[str, str], cwd: str | os.PathLike,
              stdout: str | os.PathLike, stderr: str | os.PathLike) -> "ForkedRun":
        self.wait_ready()
        assert not self.busy, "one run at a time per zygote"
        request = {"args": [str(a) for a in args], "env": dict(env), "cwd": str(cwd),
                   "stdout": str(stdout), "stderr": str(stderr)}
        self.proc.stdin.write((json.dumps(request) + "\n").encode())
        self.proc.stdin.flush()
        self.busy = True
        reply = self._message(60)
        assert reply is not None and "pid" in reply, f"the warm CLI zygote did not fork: {reply}"
        return ForkedRun(self, reply["pid"])

    def close(self) -> None:
        try:
            self.proc.stdin.close()
            self.proc.wait(timeout=30)
        except (OSError, subprocess.TimeoutExpired):
            self.proc.kill()
            self.proc.wait()
        os.close(self._fd)


class ForkedRun:
    """A forked CLI run, with the part of ``subprocess.Popen`` the tests use (pid, poll, wait)."""

    def __init__(self, zygote: Zygote, pid: int):
        self.zygote, self.pid, self.returncode = zygote, pid, None

    def poll(self) -> int | None:
        return self.wait(timeout=0, raise_on_timeout=False)

    def wait(self, timeout: float | None = None, raise_on_timeout: bool = True) -> int | None:
        if self.returncode is None:
            message = self.zygote._message(timeout)
            if message is None:
                if raise_on_timeout:
                    raise subprocess.TimeoutExpired(f"forked dataflex-cli (pid {self.pid})", timeout)
                return None
            assert message.get("pid") == self.pid, message
            self.returncode = message["code"]
            self.zygote.busy = False
        return self.returncode


# --------------------------------------------------------------------------- zygote side
def _child(request: dict) -> None:
    """In the forked child: become the CLI run the request describes; never returns."""
    code = 1
    try:
        os.setsid()  # its own process group, like start_new_session: a test can kill the whole run
        os.chdir(request["cwd"])
        os.environ.clear()
        os.environ.update({**request["set_by_imports"], **request["env"]})
        null = os.open(os.devnull, os.O_RDONLY)
        os.dup2(null, 0)
        for fd, key in ((1, "stdout"), (2, "stderr")):
            out = os.open(request[key], os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
            os.dup2(out, fd)
            os.close(out)
        # a new process would draw fresh seeds for Python and NumPy, and start torch at its default seed
        import random

        import numpy
        import torch

        random.seed()
        numpy.random.seed()
        torch.manual_seed(torch.initial_seed())
        from dataflex import cli

        sys.argv = [cli.__file__, *request["args"]]
        sys.path[0] = os.getcwd()  # `python -m` puts the working directory first
        try:
            cli.app(args=request["args"], prog_name=PROG_NAME)
            code = 0
        except SystemExit as exit_:
            if exit_.code is None or isinstance(exit_.code, int):
                code = exit_.code or 0
            else:
                print(exit_.code, file=sys.stderr)
                code = 1
        except BaseException:  # what the interpreter would print for an uncaught exception
            import traceback

            traceback.print_exc()
            code = 1
        import atexit

        atexit._run_exitfuncs()  # what a normal interpreter exit runs (logging.shutdown, ...)
    finally:
        for stream in (sys.stdout, sys.stderr):
            try:
                stream.flush()
            except Exception:
                pass
        os._exit(code)


def serve(reply_fd: int) -> None:
    """The zygote: import the stack, then fork one child per request line on stdin."""
    import importlib

    start_env = dict(os.environ)
    for name in WARM_MODULES:
        try:
            importlib.import_module(name)
        except Exception as err:  # a module renamed upstream only costs warmth
            print(f"warm_cli: could not import {name}: {err}", file=sys.stderr)
    import pkgutil

    import dataflex

    for info in pkgutil.walk_packages(dataflex.__path__, "dataflex."):
        try:
            importlib.import_module(info.name)
        except Exception as err:
            print(f"warm_cli: could not import {info.name}: {err}", file=sys.stderr)

    def reply(message: dict) -> None:
        os.write(reply_fd, (json.dumps(message) + "\n").encode())

    set_by_imports = {k: v for k, v in os.environ.items() if start_env.get(k) != v}
    reply({"ready": True, "set_by_imports": set_by_imports})
    for line in sys.stdin:
        request = {**json.loads(line), "set_by_imports": set_by_imports}
        sys.stdout.flush()
        sys.stderr.flush()
        pid = os.fork()
        if pid == 0:
            os.close(reply_fd)
            _child(request)
        reply({"pid": pid})
        _, status = os.waitpid(pid, 0)
        reply({"pid": pid, "code": os.waitstatus_to_exitcode(status)})


if __name__ == "__main__":
    sys.path[0] = os.getcwd()  # not tests/: the children's sys.path is that of `python -m dataflex.cli`
    serve(int(sys.argv[1]))
