"""Seeds derived from a run's seed and a purpose: stable across Python runs, ranks and devices."""

from __future__ import annotations

import hashlib
from typing import Any

import torch


def derive_seed(seed: Any, *tags: Any) -> int:
    """A 63-bit seed from ``seed`` and ``tags`` (hash of ``"seed:tag1:tag2..."``)."""
    text = ":".join(str(t) for t in (seed, *tags))
    return int.from_bytes(hashlib.sha256(text.encode()).digest()[:8], "little") & (2**63 - 1)


def seeded_generator(seed: Any, *tags: Any) -> torch.Generator:
    """A CPU generator seeded with :func:`derive_seed` of the same arguments."""
    return torch.Generator().manual_seed(derive_seed(seed, *tags))
