"""The plugin hook: modules named in ``DATAFLEX_PLUGINS`` are imported and installed in every process.

``DATAFLEX_PLUGINS=pkg.mod1,mod2`` makes each training process (the ``dataflex-cli train``
process itself, or every torchrun worker, which re-imports everything) import those modules
before LLaMA-Factory runs and call their ``install()`` once. What a plugin does there is its own
business (wrap a trainer hook to trace it, log to a service, ...): DataFlex knows nothing else of
it. The modules must be importable in the workers too, so put their folder on ``PYTHONPATH``
(torchrun passes the environment on). See docs/plugins.md.
"""

from __future__ import annotations

import importlib
import os

from .errors import ConfigError

ENV = "DATAFLEX_PLUGINS"

_installed: set[str] = set()


def names() -> list[str]:
    """The plugin modules ``DATAFLEX_PLUGINS`` names, in order (empty when unset)."""
    return [n.strip() for n in os.environ.get(ENV, "").split(",") if n.strip()]


def check_plugins() -> None:
    """Fail early, before workers are started, when a plugin module cannot be found."""
    import importlib.util

    for name in names():
        try:
            found = importlib.util.find_spec(name) is not None
        except (ImportError, ValueError):
            found = False
        if not found:
            raise ConfigError(f"{ENV}: plugin module '{name}' cannot be imported (not found); allowed: modules on "
                              "PYTHONPATH, comma-separated")


def install_plugins() -> list[str]:
    """Import every plugin module and call its ``install()`` (once per module and process)."""
    done = []
    for name in names():
        if name in _installed:
            continue
        try:
            module = importlib.import_module(name)
        except ImportError as err:
            raise ConfigError(f"{ENV}: plugin module '{name}' cannot be imported ({err}); allowed: modules on "
                              "PYTHONPATH, comma-separated") from None
        install = getattr(module, "install", None)
        if not callable(install):
            raise ConfigError(f"{ENV}: plugin module '{name}' has no install() function; allowed: modules that "
                              "define install()")
        install()
        _installed.add(name)
        done.append(name)
    return done
