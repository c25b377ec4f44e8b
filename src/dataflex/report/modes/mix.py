"""The report of a mixing run (``dynamic_mix``): the proportions of each domain over training."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

from ..page import decided_at, section
from ..reader import Damage
from ..rows import Rows
from ..svg import line_chart, stacked_area

ROW_TEXT = False
GROUP_BY = False


def summary(run: dict[str, Any], records: list[dict[str, Any]], top: int, damaged: Sequence[Damage] = ()) -> list[str]:
    """The schedule and one line per stretch: the proportions and loss weights it set."""
    sched = run["schedule"]
    domains = records[0]["domains"] if records else [p[0] for p in (run.get("data_sources") or {}).get("parts") or []]
    lines = [f"  schedule: {sched['total_steps']} steps x {sched['global_batch']} rows, warm-up {sched['warmup_step']}, "
             f"updates every {sched['update_step']} steps at {sched['updates'][:12]}"
             + (" ..." if len(sched["updates"]) > 12 else "")]
    lines.append(f"\nStretches ({len(records)} recorded); proportions and rows drawn per domain:")
    width = max([len(d) for d in domains] + [8])
    lines.append(f"  {'step':>6} {'kind':>7}  " + "  ".join(f"{d:>{width}}" for d in domains) + "  loss weights")
    totals = [0] * len(domains)
    for rec in records:
        for d, c in enumerate(rec["counts"]):
            totals[d] += c
        cells = "  ".join(f"{p:>{width}.3f}" for p in rec["proportions"])
        lw = rec.get("loss_weights")
        lines.append(f"  {rec['step']:>6} {rec['kind']:>7}  {cells}  " + (", ".join(f"{w:.3f}" for w in lw) if lw else "-"))
    grand = sum(totals) or 1
    lines.append("\nRows drawn per domain over the run: " + ", ".join(
        f"{d} {n} ({100 * n / grand:.1f}%)" for d, n in zip(domains, totals)))
    return lines


def decision_steps(run: dict[str, Any], records: list[dict[str, Any]]) -> tuple[list[float], str]:
    return decided_at([r["step"] for r in records if r.get("kind") in ("selection", "update") or "selection" in r])


def export_refusal(run: dict[str, Any]) -> str | None:
    return ("cannot export rows of a mixing run as text: with stage pt they are token blocks; "
            "use the proportions it recorded (init_mixture_proportions) instead")


def _per_domain(records: list[dict[str, Any]], domains: list[str], get) -> list[tuple[str, list[tuple[float, float]]]]:
    series = [(d, []) for d in domains]
    for rec in records:
        values = get(rec)
        if not values:
            continue
        for k, v in enumerate(values[:len(domains)]):
            if isinstance(v, (int, float)) and math.isfinite(v):
                series[k][1].append((float(rec["step"]), float(v)))
    return series


def _domain_loss(rec: dict[str, Any]) -> list[float | None] | None:
    stats = rec.get("statistics")
    if not stats:
        return None
    return [s / t if t else None for s, t in zip(stats.get("loss_sum", []), stats.get("tokens", []))]


def sections(run: dict[str, Any], records: list[dict[str, Any]], rows: Rows | None, group_by: str | None,
             top: int) -> list[str]:
    """The proportions over the steps and, where the mixer records them, per-domain curves."""
    out = []
    if not records:
        return [section("proportions", "Mixture proportions", "", "no mixing records")]
    domains = records[0]["domains"]
    end = (run.get("schedule") or {}).get("total_steps") or records[-1]["step"] + records[-1].get("num_steps", 1)
    chart = stacked_area("proportions", [float(r["step"]) for r in records], float(end), domains,
                         [r["proportions"] for r in records], "optimizer step", "proportion",
                         title="sampling proportions over steps")
    totals = [0] * len(domains)
    for rec in records:
        for k, c in enumerate(rec.get("counts") or []):
            totals[k] += c
    grand = sum(totals) or 1
    note = "rows drawn per domain over the run: " + ", ".join(
        f"{d} {n} ({100 * n / grand:.1f}%)" for d, n in zip(domains, totals))
    out.append(section("proportions", "Mixture proportions", chart, note))
    extra = [("domain-loss", "Loss per domain", "token loss", "mean token loss per domain since the previous update",
              _domain_loss),
             ("loss-weights", "Loss weights", "loss weight", "weights of the domain losses in the training loss",
              lambda r: r.get("loss_weights")),
             ("excess-loss", "DoReMi excess loss", "excess loss", "loss above the reference model per domain",
              lambda r: (r.get("summary") or {}).get("excess_loss")),
             ("average-weights", "DoReMi averaged domain weights", "weight",
              "running average of DoReMi's domain weights (what step 3 trains with)",
              lambda r: (r.get("summary") or {}).get("average_domain_weights")),
             ("rewards", "ODM rewards", "reward", "the bandit's reward estimate per domain",
              lambda r: (r.get("summary") or {}).get("rewards"))]
    for sid, title, ylabel, note, get in extra:
        series = _per_domain(records, domains, get)
        if any(pts for _, pts in series):
            out.append(section(sid, title, line_chart(sid, series, "optimizer step", ylabel, title=title), note))
    return out


def plot(plt: Any, run: dict[str, Any], records: list[dict[str, Any]]) -> Any:
    """Each domain's proportion (and DoReMi's loss weight) over training."""
    fig, ax = plt.subplots(figsize=(8, 4))
    if records:
        domains = records[0]["domains"]
        steps = [r["step"] for r in records] + [run["schedule"]["total_steps"]]
        for d, name in enumerate(domains):
            ys = [r["proportions"][d] for r in records]
            ax.step(steps, ys + ys[-1:], where="post", label=name)
        if any(r.get("loss_weights") for r in records):
            for d, name in enumerate(domains):
                ys = [(r.get("loss_weights") or [float("nan")] * len(domains))[d] for r in records]
                ax.step(steps, ys + ys[-1:], where="post", linestyle="--", label=f"{name} (loss weight)")
        ax.legend()
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("proportion")
    ax.set_ylim(0, 1)
    ax.set_title(f"{run['name']}: domain proportions over training")
    return fig
