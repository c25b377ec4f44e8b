"""Plugins the tests install in training processes through ``DATAFLEX_PLUGINS`` (see conftest.py)."""
