"""Logging for the ``dataflex`` logger, in the same shape as LLaMA-Factory's lines."""

from __future__ import annotations

import logging
import sys

_FORMAT = "[%(levelname)s|%(asctime)s] %(name)s: %(message)s"


def setup_logging(level: int = logging.INFO) -> logging.Logger:
    logger = logging.getLogger("dataflex")
    if not any(getattr(h, "_dataflex", False) for h in logger.handlers):
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter(_FORMAT, datefmt="%Y-%m-%d %H:%M:%S"))
        handler._dataflex = True  # type: ignore[attr-defined]
        logger.addHandler(handler)
        logger.propagate = False
    logger.setLevel(level)
    return logger
