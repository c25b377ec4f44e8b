"""The seven data orderings of Dai et al., "Demystifying Data Organization for Enhanced LLM Training"
(ACL 2026, arXiv:2605.30334), which extends the Folding Ordering of DELT (Dai et al. 2025,
arXiv:2506.21545). Pure functions: a list of keys in, a permutation of their positions out.

Every pattern works on the *axis*: the positions sorted by key, lowest first with ``ascending``
(highest first without), ties in input order. With ``n`` rows, ``L`` layers:

    shuffle   a seeded random permutation (the keys are not read)
    sorting   the axis itself (curriculum learning, CL)
    folding   FO: the axis cut into L strided layers, axis[l::L] for l = 0..L-1, one after another;
              each layer is a full low-to-high sweep, so the run reviews the whole range L times
    zigzag    ZIG: folding with every odd layer reversed, so consecutive layers meet at the same
              end (a triangle wave instead of a saw wave: no jump from the top back to the bottom)
    segment   SEG: the first floor(n x_pct / 100) rows are drawn from the low (or high) end of the
              keys, the last floor(n y_pct / 100) from the low (or high) end of what is left, each of
              the three segments in a seeded random order (boundary sharpening)
    stair     STR: the axis, except around each of the num_sections - 1 section boundaries
              b_s = round(n s / num_sections): there the rows in [b_s - r, b_s + r), with
              r = round(n folding_ratio), are folded into L layers
    saw       SAW: stair with the transition zones zigzagged instead of folded

and ``window_size`` > 1 (JIT, jittering) shuffles each consecutive window of that many rows of the
result, so the global trend stays and a batch mixes neighbouring scores. ``round`` is half-up here.
"""

from __future__ import annotations

import math
from typing import Sequence

import torch

PATTERNS = ("shuffle", "sorting", "folding", "zigzag", "segment", "stair", "saw")


def half_up(x: float) -> int:
    return int(math.floor(x + 0.5))


def axis(keys: Sequence[float], ascending: bool = True) -> list[int]:
    """Positions sorted by key (stable: ties keep their input order)."""
    return sorted(range(len(keys)), key=lambda p: keys[p] if ascending else -keys[p])


def fold(seq: Sequence[int], layers: int) -> list[int]:
    """``seq[0::L] + seq[1::L] + ... + seq[L-1::L]``."""
    out: list[int] = []
    for layer in range(layers):
        out += list(seq[layer::layers])
    return out


def zigzag(seq: Sequence[int], layers: int) -> list[int]:
    """:func:`fold` with the odd layers reversed."""
    out: list[int] = []
    for layer in range(layers):
        part = list(seq[layer::layers])
        out += part[::-1] if layer % 2 else part
    return out


def transitions(seq: Sequence[int], num_sections: int, ratio: float, layers: int, zig: bool) -> list[int]:
    """``seq`` with the zone of radius ``round(n ratio)`` around each section boundary folded (or zigzagged)."""
    n = len(seq)
    radius = half_up(n * ratio)
    if n == 0 or num_sections <= 1 or radius == 0:
        return list(seq)
    arrange = zigzag if zig else fold
    out: list[int] = []
    cursor = 0
    for s in range(1, num_sections):
        boundary = half_up(n * s / num_sections)
        start, end = max(cursor, boundary - radius), min(n, boundary + radius)
        if start >= end:
            continue
        out += list(seq[cursor:start])
        out += arrange(seq[start:end], layers)
        cursor = end
    return out + list(seq[cursor:])


def segment_counts(n: int, x_pct: float, y_pct: float) -> tuple[int, int]:
    return int(math.floor(n * x_pct / 100.0 + 1e-9)), int(math.floor(n * y_pct / 100.0 + 1e-9))


def _shuffled(items: list[int], generator: torch.Generator) -> list[int]:
    if len(items) < 2:
        return list(items)
    return [items[p] for p in torch.randperm(len(items), generator=generator).tolist()]


def segment(keys: Sequence[float], x_pct: float, y_pct: float, front_is_high: bool, back_is_high: bool,
            generator: torch.Generator) -> list[int]:
    """Front segment from one end of the keys, back segment from one end of the rest, middle between."""
    low_first = axis(keys, True)
    n_front, n_back = segment_counts(len(keys), x_pct, y_pct)

    def take(pool: list[int], k: int, high: bool) -> tuple[list[int], list[int]]:
        if k <= 0:
            return [], pool
        return (pool[len(pool) - k:], pool[: len(pool) - k]) if high else (pool[:k], pool[k:])

    if front_is_high == back_is_high:  # both from the same end: one pool of the extremes, split at random
        both, middle = take(low_first, n_front + n_back, front_is_high)
        both = _shuffled(both, generator)
        front, back = both[:n_front], both[n_front:]
    else:
        front, rest = take(low_first, n_front, front_is_high)
        back, middle = take(rest, n_back, back_is_high)
    return _shuffled(front, generator) + _shuffled(middle, generator) + _shuffled(back, generator)


def jitter(seq: Sequence[int], window: int, generator: torch.Generator) -> list[int]:
    """Each consecutive window of ``window`` items in a seeded random order (no-op for window <= 1)."""
    if window <= 1:
        return list(seq)
    out: list[int] = []
    for start in range(0, len(seq), window):
        out += _shuffled(list(seq[start:start + window]), generator)
    return out


def arrange(pattern: str, keys: Sequence[float], generator: torch.Generator, *, ascending: bool = True,
            window_size: int = 0, layers: int = 3, num_sections: int = 2, folding_ratio: float = 0.1,
            x_pct: float = 10.0, y_pct: float = 10.0, front_is_high: bool = False,
            back_is_high: bool = True) -> list[int]:
    """The positions ``0..len(keys)-1`` in the order ``pattern`` consumes them (a permutation)."""
    if pattern == "shuffle":
        out = torch.randperm(len(keys), generator=generator).tolist()
    elif pattern == "segment":
        out = segment(keys, x_pct, y_pct, front_is_high, back_is_high, generator)
    else:
        line = axis(keys, ascending)
        if pattern == "sorting":
            out = line
        elif pattern == "folding":
            out = fold(line, layers)
        elif pattern == "zigzag":
            out = zigzag(line, layers)
        elif pattern in ("stair", "saw"):
            out = transitions(line, num_sections, folding_ratio, layers, zig=pattern == "saw")
        else:
            raise ValueError(f"unknown pattern '{pattern}'; allowed: {', '.join(PATTERNS)}")
    return jitter(out, window_size, generator)
