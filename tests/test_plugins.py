"""The plugin hook (``DATAFLEX_PLUGINS``): modules imported and installed in every training process.

The trace and fault tests elsewhere run through this hook too (conftest.py sets
``DATAFLEX_PLUGINS=dataflex.diagnostics,plugins.faults``), the two-process ones in torchrun workers.
"""

from __future__ import annotations

import sys

import pytest

PLUGIN = """
import os
CALLS = []

def install():
    CALLS.append(os.environ.get("MARK"))
"""


@pytest.fixture
def plugin_env(tmp_path, monkeypatch):
    from dataflex import plugins

    (tmp_path / "df_plugin_one.py").write_text(PLUGIN)
    (tmp_path / "df_plugin_two.py").write_text(PLUGIN)
    (tmp_path / "df_plugin_bare.py").write_text("X = 1\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setattr(plugins, "_installed", set())
    yield plugins
    for name in ("df_plugin_one", "df_plugin_two", "df_plugin_bare"):
        sys.modules.pop(name, None)


def test_plugins_are_installed_once_in_order(plugin_env, monkeypatch):
    monkeypatch.setenv("DATAFLEX_PLUGINS", " df_plugin_two, df_plugin_one ,")
    monkeypatch.setenv("MARK", "first")
    assert plugin_env.names() == ["df_plugin_two", "df_plugin_one"]
    assert plugin_env.install_plugins() == ["df_plugin_two", "df_plugin_one"]
    monkeypatch.setenv("MARK", "again")
    assert plugin_env.install_plugins() == []  # a second call in the same process installs nothing
    assert sys.modules["df_plugin_one"].CALLS == ["first"]
    assert sys.modules["df_plugin_two"].CALLS == ["first"]


def test_no_variable_no_plugins(plugin_env, monkeypatch):
    monkeypatch.delenv("DATAFLEX_PLUGINS", raising=False)
    assert plugin_env.install_plugins() == []
    plugin_env.check_plugins()


@pytest.mark.parametrize("value, message", [
    ("df_plugin_absent", "DATAFLEX_PLUGINS: plugin module 'df_plugin_absent' cannot be imported (No module named "
                         "'df_plugin_absent'); allowed: modules on PYTHONPATH, comma-separated"),
    ("df_plugin_bare", "DATAFLEX_PLUGINS: plugin module 'df_plugin_bare' has no install() function; allowed: modules "
                       "that define install()"),
])
def test_bad_plugin_is_a_config_error(plugin_env, monkeypatch, value, message):
    from dataflex.errors import ConfigError

    monkeypatch.setenv("DATAFLEX_PLUGINS", f"df_plugin_one,{value}")
    with pytest.raises(ConfigError) as err:
        plugin_env.install_plugins()
    assert str(err.value) == message


def test_check_plugins_finds_missing_modules(plugin_env, monkeypatch):
    from dataflex.errors import ConfigError

    monkeypatch.setenv("DATAFLEX_PLUGINS", "df_plugin_one,df_plugin_absent.sub")
    with pytest.raises(ConfigError) as err:
        plugin_env.check_plugins()
    assert str(err.value) == ("DATAFLEX_PLUGINS: plugin module 'df_plugin_absent.sub' cannot be imported (not found); "
                              "allowed: modules on PYTHONPATH, comma-separated")


@pytest.mark.parametrize("torchrun", [False, True], ids=["one-process", "torchrun"])
def test_cli_reports_a_missing_plugin_in_one_line(run_cli, make_train_yaml, tmp_path, torchrun):
    """Before any model is loaded; under torchrun before any worker is started."""
    path = make_train_yaml(tmp_path)
    env = {"DATAFLEX_PLUGINS": "dataflex.diagnostics,df_no_such_plugin"}
    if torchrun:
        env.update({"FORCE_TORCHRUN": "1", "NPROC_PER_NODE": "2"})
    res = run_cli(["train", path], env=env, timeout=200)
    assert res.returncode == 2, res.stderr[-2000:]
    errors = [line for line in res.stderr.splitlines() if "error" in line.lower()]
    assert errors[-1].startswith("dataflex-cli: error: DATAFLEX_PLUGINS: plugin module 'df_no_such_plugin' cannot be "
                                 "imported"), res.stderr[-2000:]
    assert "Traceback" not in res.stderr
    assert "launching" not in res.stderr  # no torchrun was started
    assert not (tmp_path / "out" / "adapter_model.safetensors").exists()
