"""Seeded random projection of gradient vectors to ``proj_dim`` numbers (a count sketch).

Coordinate ``j`` of parameter tensor ``P`` goes to bucket ``h_P(j)`` with sign ``s_P(j) = ±1``,
both drawn from a generator seeded with ``(seed, name of P)``: the same projection on every rank,
device and run with that seed, whatever the order parameters are projected in. Only the bucket
and sign of each coordinate are kept (12 bytes per parameter) and a batch costs one ``index_add_``
per tensor. The sketch is linear and unbiased; why it was chosen over dense projections, its
variance and the measurements are in ``docs/selectors/less.md`` and ``docs/benchmarks.md``.
"""

from __future__ import annotations

from typing import Any

import torch

from ..seeding import seeded_generator


class CountSketchProjector:
    """Projects named blocks of gradient coordinates into a shared ``proj_dim`` sketch.

    ``project_into(out, key, values)`` adds the projection of ``values`` (``batch x numel``,
    the coordinates of the parameter called ``key``) to ``out`` (``batch x proj_dim``).
    """

    def __init__(self, proj_dim: int, seed: int):
        if proj_dim < 1:
            raise ValueError(f"proj_dim must be >= 1, got {proj_dim}")
        self.proj_dim = int(proj_dim)
        self.seed = int(seed)
        self._hashes: dict[tuple[str, int, str], tuple[torch.Tensor, torch.Tensor]] = {}

    def hashes(self, key: str, numel: int, device: Any = "cpu") -> tuple[torch.Tensor, torch.Tensor]:
        """``(bucket, sign)`` of the ``numel`` coordinates of block ``key`` (cached per device)."""
        device = torch.device(device)
        cache_key = (key, int(numel), str(device))
        if cache_key not in self._hashes:
            gen = seeded_generator(self.seed, key)
            bucket = torch.randint(self.proj_dim, (numel,), generator=gen)
            sign = torch.randint(2, (numel,), generator=gen).to(torch.float32).mul_(2).sub_(1)
            self._hashes[cache_key] = (bucket.to(device), sign.to(device))
        return self._hashes[cache_key]

    def project_into(self, out: torch.Tensor, key: str, values: torch.Tensor) -> torch.Tensor:
        values = values.reshape(values.shape[0], -1)
        bucket, sign = self.hashes(key, values.shape[1], values.device)
        out.index_add_(1, bucket, values.to(out.dtype) * sign.to(out.dtype))
        return out

    def project(self, values: torch.Tensor | dict[str, torch.Tensor]) -> torch.Tensor:
        """Project a ``batch x N`` tensor (block key ``"x"``) or a dict of named blocks."""
        blocks = values if isinstance(values, dict) else {"x": values}
        first = next(iter(blocks.values()))
        out = torch.zeros(first.shape[0], self.proj_dim, dtype=torch.float32, device=first.device)
        for key, block in blocks.items():
            self.project_into(out, key, block.float())
        return out

    def memory_bytes(self) -> int:
        return sum(b.numel() * b.element_size() + s.numel() * s.element_size() for b, s in self._hashes.values())
