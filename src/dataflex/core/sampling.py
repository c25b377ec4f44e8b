"""Turning domain proportions into training rows (mix mode).

* Counts: ``largest_remainder(p, n)`` - floor of ``p_d x n`` for every domain, then the
  leftover rows one each to the largest fractional parts (ties: lower domain index). The counts
  sum to ``n`` exactly and differ from ``p_d x n`` by less than one.
* Rows inside a domain are drawn without replacement from a seeded permutation of the domain;
  when it is used up, the next permutation (a new seed) starts - a *reshuffle*, logged. The
  positions are the sampler's state (saved in the checkpoint).
* The stretch's rows are then put in a seeded random order (sample granularity), or laid out
  as one domain per micro-batch (micro-batch granularity, ODM).
"""

from __future__ import annotations

import math
from typing import Any, Sequence

import torch

from ..seeding import seeded_generator


def pool_positions(n: int, pool: int | float | None, generator: torch.Generator) -> list[int]:
    """Positions ``0..n-1`` to score: all of them, or a seeded random subset of ``pool`` (a count, or a
    fraction of ``n``), sorted. Selectors' and reorderers' ``candidate_pool``."""
    if pool is None:
        return list(range(n))
    size = pool if isinstance(pool, int) else max(1, round(pool * n))
    if size >= n:
        return list(range(n))
    return sorted(torch.randperm(n, generator=generator)[:size].tolist())


def largest_remainder(proportions: Sequence[float], n: int) -> list[int]:
    """Integer counts summing to ``n``, as close to ``p x n`` as integers allow."""
    if n < 0:
        raise ValueError(f"n must be >= 0, got {n}")
    total = float(sum(proportions))
    if total <= 0 or any(p < 0 or not math.isfinite(p) for p in proportions):
        raise ValueError(f"proportions must be finite, >= 0 and not all 0, got {list(proportions)}")
    exact = [p / total * n for p in proportions]
    counts = [math.floor(x + 1e-9) for x in exact]
    left = n - sum(counts)
    order = sorted(range(len(exact)), key=lambda d: (-(exact[d] - counts[d]), d))
    for d in order[:left]:
        counts[d] += 1
    return counts


class DomainSampler:
    """Rows of each domain without replacement, from seeded permutations that renew when used up."""

    def __init__(self, parts: Sequence[tuple[str, int, int]], seed: int):
        """``parts``: ``(name, start, end)`` of every domain's rows in the training set."""
        self.parts = [(str(n), int(s), int(e)) for n, s, e in parts]
        for name, start, end in self.parts:
            if end <= start:
                raise ValueError(f"domain '{name}' has no rows")
        self.seed = seed
        self.epoch = [0] * len(self.parts)  # which permutation of the domain is in use
        self.position = [0] * len(self.parts)  # rows of it already handed out
        self.reshuffles: list[tuple[str, int]] = []  # (domain, new epoch) since the last call of take_reshuffles
        self._perm: dict[int, tuple[int, list[int]]] = {}

    @property
    def names(self) -> list[str]:
        return [n for n, _, _ in self.parts]

    @property
    def sizes(self) -> list[int]:
        return [e - s for _, s, e in self.parts]

    def domain_of(self, row: int) -> int:
        for d, (_, start, end) in enumerate(self.parts):
            if start <= row < end:
                return d
        raise IndexError(f"row {row} belongs to no domain")

    def _permutation(self, d: int) -> list[int]:
        cached = self._perm.get(d)
        if cached is None or cached[0] != self.epoch[d]:
            size = self.sizes[d]
            perm = torch.randperm(size, generator=seeded_generator(self.seed, "domain", self.parts[d][0], self.epoch[d]))
            cached = (self.epoch[d], perm.tolist())
            self._perm[d] = cached
        return cached[1]

    def take(self, d: int, k: int) -> list[int]:
        """``k`` rows of domain ``d`` (training-set indices), continuing its permutation."""
        start = self.parts[d][1]
        out: list[int] = []
        while len(out) < k:
            perm = self._permutation(d)
            room = len(perm) - self.position[d]
            if room == 0:
                self.epoch[d] += 1
                self.position[d] = 0
                self.reshuffles.append((self.parts[d][0], self.epoch[d]))
                continue
            n = min(room, k - len(out))
            out.extend(start + i for i in perm[self.position[d]: self.position[d] + n])
            self.position[d] += n
        return out

    def take_reshuffles(self) -> list[tuple[str, int]]:
        out, self.reshuffles = self.reshuffles, []
        return out

    def draw(self, counts: Sequence[int], seed_tag: Any) -> list[int]:
        """``counts[d]`` rows of every domain, in one seeded random order."""
        rows = [r for d, k in enumerate(counts) for r in self.take(d, int(k))]
        perm = torch.randperm(len(rows), generator=seeded_generator(self.seed, "mix-order", seed_tag)).tolist()
        return [rows[p] for p in perm]

    def draw_blocks(self, domains: Sequence[int], block: int) -> list[int]:
        """One block of ``block`` rows per entry of ``domains``, each from that domain, in that order."""
        return [r for d in domains for r in self.take(int(d), block)]

    def state_dict(self) -> dict[str, Any]:
        return {"epoch": list(self.epoch), "position": list(self.position), "domains": self.names}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state.get("domains") != self.names:
            raise ValueError(f"sampler state is for domains {state.get('domains')}, this run has {self.names}")
        self.epoch = [int(e) for e in state["epoch"]]
        self.position = [int(p) for p in state["position"]]
        self._perm = {}
