"""Seeded random projection of gradient vectors to ``proj_dim`` numbers (a count sketch).

Why a count sketch
------------------
LESS compares gradients of millions of parameters through a random projection to a few thousand
dimensions. A dense Gaussian or Rademacher matrix of ``num_params x proj_dim`` cannot be stored,
and regenerating it block by block costs ``num_params x proj_dim`` random numbers and
multiply-adds for every batch - on a CPU that is far more than the per-sample gradients
themselves (``bench/projection.py``: at the Qwen2.5-0.5B LoRA r16 shape a dense projection to
4096 takes ~8x the forward + backward, the count sketch 2 % of it, at the same accuracy). We
use the sparse alternative of the same family, the count sketch (a sparse Johnson-Lindenstrauss
transform with one non-zero per input coordinate):

    coordinate j of parameter tensor P goes to bucket h_P(j) in [0, proj_dim) with sign s_P(j) = ±1
    (S x)[c] = sum over j with h(j) = c of s(j) x_j

``h_P`` and ``s_P`` are drawn from a CPU ``torch.Generator`` seeded with ``(seed, name of P)``,
so the projection is the same on every rank, on every device and in every run with that seed,
and it does not depend on the order in which parameters are projected. The projection matrix
is never formed: for each parameter tensor only its bucket index (int64) and sign (fp32) are
kept, 12 bytes per trainable parameter - O(num_params), not O(num_params x proj_dim). Projecting
a batch costs one ``index_add_`` of ``batch x numel`` values per parameter tensor.

Accuracy
--------
The sketch is linear, so parameter tensors can be projected one at a time and summed. It is
unbiased, E<Sx, Sy> = <x, y>, with variance

    Var <Sx, Sy> = (|x|^2 |y|^2 + <x, y>^2 - 2 sum_j x_j^2 y_j^2) / proj_dim,

never larger than that of a dense Gaussian projection scaled by 1/sqrt(proj_dim),
(|x|^2 |y|^2 + <x, y>^2) / proj_dim. For unit vectors the error of an inner product (a cosine)
therefore has a standard deviation of at most sqrt(2 / proj_dim): 0.022 at 4096, 0.016 at 8192,
and about sqrt(1 / proj_dim) for nearly orthogonal vectors. Its weakness compared with a dense
projection is the tail for vectors dominated by a handful of coordinates (two heavy coordinates
that collide in one bucket stay collided); Adam-preconditioned LoRA gradients, whose entries are
of similar size, are the favourable case. ``tests/test_less.py`` checks determinism and the
error on random vectors against this formula.
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
