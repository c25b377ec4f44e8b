"""One comparison at a time writes an --out folder: compare.lock names the process that holds it."""

from __future__ import annotations

import os
import socket
import subprocess
import sys

import pytest

from dataflex.compare.runner import LOCK, claim
from dataflex.errors import ConfigError


def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def test_the_lock_names_this_process_while_held_and_is_gone_after(tmp_path):
    with claim(tmp_path):
        assert (tmp_path / LOCK).read_text() == f"{socket.gethostname()} {os.getpid()}"
    assert not (tmp_path / LOCK).exists()


def test_a_running_comparisons_lock_is_refused_in_one_line_and_left_alone(tmp_path):
    with subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"]) as other:
        try:
            (tmp_path / LOCK).write_text(f"{socket.gethostname()} {other.pid}")
            with pytest.raises(ConfigError) as err, claim(tmp_path):
                pytest.fail("claimed a folder another comparison holds")
        finally:
            other.kill()
    message = str(err.value)
    assert message.startswith(f"--out: {tmp_path} is being written by another comparison (pid {other.pid} on ")
    assert "\n" not in message and str(tmp_path / LOCK) in message
    assert (tmp_path / LOCK).read_text() == f"{socket.gethostname()} {other.pid}"


def test_a_killed_comparisons_lock_is_taken_over(tmp_path):
    (tmp_path / LOCK).write_text(f"{socket.gethostname()} {_dead_pid()}")
    with claim(tmp_path):
        assert (tmp_path / LOCK).read_text() == f"{socket.gethostname()} {os.getpid()}"
    assert not (tmp_path / LOCK).exists()


def test_a_lock_from_another_host_counts_as_held(tmp_path):
    """A shared filesystem: this host cannot tell whether the other host's process runs, so it does not guess."""
    (tmp_path / LOCK).write_text(f"not-{socket.gethostname()} {_dead_pid()}")
    with pytest.raises(ConfigError, match="delete .*compare.lock if no comparison runs there"), claim(tmp_path):
        pass


def test_the_same_process_cannot_claim_a_folder_twice(tmp_path):
    with claim(tmp_path):
        with pytest.raises(ConfigError), claim(tmp_path):
            pass
        assert (tmp_path / LOCK).exists()  # the refused inner claim does not release the outer one
    assert not (tmp_path / LOCK).exists()
