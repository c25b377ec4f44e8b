"""Test support code (no tests): the environment, shared helpers, the warm CLI."""
