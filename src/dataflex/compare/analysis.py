"""From the runs' curves to the tables: per budget and metric, each method's mean with its interval,
its paired difference to the baseline and a verdict. Pure Python, no torch.

A run's entry (in ``compare.json``) holds its curve: one point per checkpoint with ``step``,
``seconds``, ``tokens`` and, per metric, the per-question ``(numerator, denominator)`` pairs.
"""

from __future__ import annotations

from typing import Any, Sequence

from .stats import Interval, interval, paired_difference, verdict

HIGHER_IS_BETTER = {"loss": False, "choice": True, "choice_norm": True, "exact": True}


def higher_is_better(metric: str) -> bool:
    """``loss`` lower, the accuracies higher; ``NAME:metric`` (an ``--eval-extra`` set) as its metric."""
    return HIGHER_IS_BETTER[metric.rpartition(":")[2]]


def value(pairs: Sequence[Sequence[float]]) -> float:
    return sum(p[0] for p in pairs) / sum(p[1] for p in pairs)


def point_at_step(curve: list[dict[str, Any]], step: int) -> dict[str, Any] | None:
    return next((p for p in curve if p["step"] == step), None)


def point_at_compute(curve: list[dict[str, Any]], amount: float, unit: str, metric: str) -> tuple[list, str]:
    """The baseline's per-question pairs at ``amount`` of compute (linear between its two checkpoints around
    it), and where that is: ``inside``, ``before`` its first checkpoint (the first is used) or ``past`` its
    last one (the last is used)."""
    pts = [p for p in curve if p.get(unit) is not None]
    if not pts:
        raise ValueError(f"the baseline's curve has no {unit}")
    if amount <= pts[0][unit]:
        return pts[0]["metrics"][metric], "inside" if amount == pts[0][unit] else "before"
    if amount > pts[-1][unit]:
        return pts[-1]["metrics"][metric], "past"
    for a, b in zip(pts, pts[1:]):
        if a[unit] <= amount <= b[unit]:
            f = 0.0 if b[unit] == a[unit] else (amount - a[unit]) / (b[unit] - a[unit])
            return [[xa + f * (xb - xa), wa + f * (wb - wa)]
                    for (xa, wa), (xb, wb) in zip(a["metrics"][metric], b["metrics"][metric])], "inside"
    raise AssertionError("unreachable")


def _seed_sample(per_seed: list[list]) -> list[tuple[float, float]]:
    return [(value(p), 1.0) for p in per_seed]


def row(method: str, per_seed: list[list], base_per_seed: list[list] | None, metric: str) -> dict[str, Any]:
    """One table row from per-seed per-question pairs (seeds paired by position with the baseline's).

    With two seeds or more, intervals are over seeds; with one, over the questions of that seed."""
    higher = higher_is_better(metric)
    if len(per_seed) >= 2:
        est = interval(_seed_sample(per_seed))
        diff = paired_difference(_seed_sample(per_seed), _seed_sample(base_per_seed)) if base_per_seed else None
        over = "seeds"
    else:
        est = interval([tuple(p) for p in per_seed[0]])
        diff = paired_difference([tuple(p) for p in per_seed[0]], [tuple(p) for p in base_per_seed[0]]) \
            if base_per_seed else None
        over = "questions"
    return {"method": method, "metric": metric, "seeds": len(per_seed), "over": over, **_iv("", est),
            **(_iv("diff_", diff) if diff else {}), "verdict": verdict(diff, higher) if diff else None,
            "per_seed": [value(p) for p in per_seed]}


def _iv(prefix: str, iv: Interval) -> dict[str, Any]:
    return {f"{prefix}mean": iv.mean, f"{prefix}lo": iv.lo, f"{prefix}hi": iv.hi}


def table(runs: dict[str, dict[str, Any]], methods: list[str], baseline: str, budget: str, metric: str,
          steps: int, unit: str = "seconds") -> dict[str, Any]:
    """The table of one budget and metric. ``runs[method]`` holds ``main`` and (baseline) ``long``: lists of run
    entries by seed, None where a run is missing. Seeds missing in a method or its baseline are left out of
    both (the pairing stays by seed) and named."""
    rows, notes = [], []
    base_key = "long" if budget == "compute" else "main"
    base_runs = runs[baseline].get(base_key) or runs[baseline].get("main") or []
    for method in methods:
        own = base_runs if method == baseline else runs[method].get("main") or runs[method].get("long") or []
        seeds = range(max(len(own), len(base_runs)))
        missing = [k for k in seeds if k >= len(own) or own[k] is None]
        base_missing = [k for k in seeds if k >= len(base_runs) or base_runs[k] is None]
        if missing:
            notes.append(f"{method}: missing seed {', '.join(map(str, missing))} (not finished)")
        use = [k for k in seeds if k not in missing and (method == baseline or k not in base_missing)]
        if not use:
            rows.append({"method": method, "metric": metric, "seeds": 0, "verdict": None, "missing": missing})
            continue
        mine, theirs, where = [], [], []
        for k in use:
            if budget == "steps" or method == baseline:
                mine.append(point_at_step(own[k]["curve"], steps)["metrics"][metric])
                if method != baseline:
                    theirs.append(point_at_step(base_runs[k]["curve"], steps)["metrics"][metric])
            else:
                end = point_at_step(own[k]["curve"], steps)
                mine.append(end["metrics"][metric])
                pairs, place = point_at_compute(base_runs[k]["curve"], end[unit], unit, metric)
                theirs.append(pairs)
                where.append(place)
        r = row(method, mine, None if method == baseline else theirs, metric)
        r["missing"] = missing
        if budget == "compute" and method != baseline:
            r["compute"] = [point_at_step(own[k]["curve"], steps)[unit] for k in use]
            past = [k for k, w in zip(use, where) if w == "past"]
            if past:
                notes.append(f"{method}: its {unit} run past the baseline's last checkpoint for seed "
                             f"{', '.join(map(str, past))} (compared with that checkpoint; raise --baseline-factor)")
        rows.append(r)
    return {"budget": budget, "metric": metric, "unit": unit if budget == "compute" else "steps",
            "baseline": baseline, "rows": rows, "notes": notes}


def _fmt(x: float | None, digits: int = 4) -> str:
    return "-" if x is None else f"{x:.{digits}f}"


def _pm(mean: float, lo: float | None, hi: float | None, signed: bool = False) -> str:
    head = f"{mean:+.4f}" if signed else f"{mean:.4f}"
    return head if lo is None else f"{head} ± {(hi - lo) / 2:.4f}"


def render(tab: dict[str, Any]) -> str:
    """A table as text: method, mean ± 95 % CI, difference to the baseline ± its CI, verdict."""
    what = "same optimizer steps" if tab["budget"] == "steps" else f"same compute ({tab['unit']})"
    direction = "lower is better" if not higher_is_better(tab["metric"]) else "higher is better"
    lines = [f"budget {tab['budget']} ({what}); metric {tab['metric']} ({direction}); baseline {tab['baseline']}"]
    width = max([len(r["method"]) for r in tab["rows"]] + [6])
    lines.append(f"  {'method':<{width}}  {'seeds':>5}  {'mean ± 95% CI':<22}  {'diff to baseline ± 95% CI':<26}  verdict")
    for r in tab["rows"]:
        if not r.get("seeds"):
            lines.append(f"  {r['method']:<{width}}  {0:>5}  {'(no finished run)':<22}")
            continue
        est = _pm(r["mean"], r["lo"], r["hi"])
        diff = _pm(r["diff_mean"], r["diff_lo"], r["diff_hi"], signed=True) if "diff_mean" in r else "(baseline)"
        verdict_word = r["verdict"] or ("-" if "diff_mean" in r else "")
        lines.append(f"  {r['method']:<{width}}  {r['seeds']:>5}  {est:<22}  {diff:<26}  {verdict_word}")
    over = {r.get("over") for r in tab["rows"] if r.get("seeds")}
    if "questions" in over:
        lines.append("  (one seed: intervals over the eval questions, not over training randomness)")
    lines += [f"  note: {n}" for n in tab["notes"]]
    return "\n".join(lines)
