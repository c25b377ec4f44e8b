"""The report of a pipeline run (``dynamic_lego``): its updates, then every stage in its own mode's terms.

A pipeline run keeps one ``step_N.json`` per update (every stage's rows in and out, the update's rows)
and each stage's own records in ``stage-<i>-<family>/`` (:func:`read_parts` reads them). A selector,
mixer or weighter stage is shown by its own mode's report module on its own records; a reorder
stage by its orderings' scores.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from ...core.records import read_lines, read_records
from ..page import decided_at, section, table
from ..reader import Damage
from ..rows import Rows
from ..svg import esc, fmt
from . import mix as mix_report
from . import select as select_report
from . import weight as weight_report

ROW_TEXT = True
GROUP_BY = False
OWN = {"selector": select_report, "mixer": mix_report, "weighter": weight_report}


def read_parts(where: Path, damaged: list[tuple[str, str]]) -> dict[str, list[dict[str, Any]]]:
    """``{stage folder: its records}``: step files, or the weighter's ``weights.jsonl`` lines."""
    out: dict[str, list[dict[str, Any]]] = {}
    for folder in sorted(Path(where).glob("stage-*")):
        if not folder.is_dir():
            continue
        bad: list[tuple[str, str]] = []
        if (folder / "weights.jsonl").exists():
            out[folder.name] = read_lines(folder / "weights.jsonl", bad)
        else:
            out[folder.name] = read_records(folder, None, bad)
        damaged += [(f"{folder.name}/{name}", why) for name, why in bad]
    return out


def _stages(run: dict[str, Any]) -> list[dict[str, Any]]:
    return (run.get("schedule") or {}).get("stages") or []


def _records_of(run: dict[str, Any], stage: dict[str, Any]) -> list[dict[str, Any]]:
    return (run.get("stage_records") or {}).get(stage.get("folder") or "", [])


def stage_run(run: dict[str, Any], stage: dict[str, Any], records: list[dict[str, Any]]) -> dict[str, Any]:
    """The run as a stage's own mode's report reads it: its component, and its own decision steps."""
    sched = dict(run.get("schedule") or {})
    sched["updates"] = [r["step"] for r in records if "step" in r]
    if stage["family"] == "weighter":
        sched["warmup_step"] = stage["warmup_step"]
    return {**run, "component": stage["component"], "name": stage["name"], "params": stage.get("params") or {},
            "schedule": sched}


def _describe(stage: dict[str, Any]) -> str:
    bits = [stage["label"]]
    if stage["family"] == "selector":
        bits.append(f"mode {stage['mode']}" + (f", keep {stage['keep_ratio']:g}" if stage.get("keep_ratio") else ""))
    if stage.get("budget"):
        bits.append("takes the update's rows")
    if stage["family"] == "mixer" and stage.get("space") == "loss":
        bits.append("weighs the domains' losses")
    if stage["warmup_step"]:
        bits.append(f"from step {stage['warmup_step']}")
    if stage["every"] > 1:
        bits.append(f"every {stage['every']} steps")
    return ", ".join(bits)


def summary(run: dict[str, Any], records: list[dict[str, Any]], top: int, damaged: Sequence[Damage] = ()) -> list[str]:
    """The schedule, the stages, one line per update, then each stage's own summary."""
    sched = run["schedule"]
    lines = [f"  schedule: {sched['total_steps']} steps x {sched['global_batch']} rows, warm-up {sched['warmup_step']}, "
             f"{sched['update_times']} x {sched['update_step']} steps per cycle, updates at steps {sched['updates']}"]
    stages = _stages(run)
    lines.append(f"\nStages ({len(stages)}, in the order they run):")
    for st in stages:
        lines.append(f"  {st['stage']}. {_describe(st)}")
    updates = [r for r in records if r.get("kind") == "update"]
    read = {r["step"] for r in records} | {d.step for d in damaged}
    missing = [s for s in sched["updates"] if s not in read]
    lines.append(f"\nUpdates ({len(updates)} recorded" + (f", missing steps {missing}" if missing else "") + "):")
    for r in updates:
        acts = "; ".join(f"{t['label']} {t['action']}" + (f" {t['rows_in']}->{t['rows_out']}"
                                                           if t["action"] == "decided" else "") for t in r["stages"])
        fitted = f" ({r['fitted']} to fit)" if r.get("fitted") else ""
        lines.append(f"  step {r['step']:>5}: {acts} -> {len(r['indices'])} rows{fitted}")
    for st in stages:
        if not st.get("folder"):
            continue
        recs = _records_of(run, st)
        lines.append(f"\nStage {st['stage']}: {st['label']} ({st['name']}), {len(recs)} record(s)")
        own = OWN.get(st["family"])
        if st.get("space") == "loss" and st["family"] == "mixer":
            lines += _reweights(recs)
        elif own is not None:
            lines += own.summary(stage_run(run, st, recs), recs, top)
        else:
            for r in recs:
                scored = [s for s in r.get("scores") or [] if s is not None]
                stat = f"score {min(scored):.4g} .. {max(scored):.4g}" if scored else "no score"
                lines.append(f"  ordering {r.get('ordering', 0) + 1} at step {r['step']}: {len(r.get('rows') or [])} "
                             f"rows, {stat}, {r.get('seconds', 0):.2f}s")
    return lines


def _reweights(recs: list[dict[str, Any]]) -> list[str]:
    """A mixer weighing the domains' losses: its weights and excess losses per update."""
    if not recs:
        return ["  no update recorded"]
    lines = [f"  domains {', '.join(recs[0]['domains'])}; loss weights and excess losses per update:"]
    for r in recs:
        summ = r.get("summary") or {}
        lw = ", ".join(f"{w:.4f}" for w in r.get("loss_weights") or [])
        ex = ", ".join(f"{x:.4f}" for x in summ.get("excess_loss") or [])
        lines.append(f"  update {r.get('update', 0) + 1} at step {r['step']:>5}: weights {lw}" +
                     (f"; excess loss {ex}" if ex else ""))
    avg = (recs[-1].get("summary") or {}).get("average_domain_weights")
    if avg:
        lines.append("  averaged weights so far: " + ", ".join(f"{w:.4f}" for w in avg))
    return lines


def decision_steps(run: dict[str, Any], records: list[dict[str, Any]]) -> tuple[list[float], str]:
    steps, _ = decided_at([r["step"] for r in records if r.get("kind") == "update"])
    return steps, "vertical lines: pipeline updates (the stages made the rows of the steps after)" if steps else ""


def export_refusal(run: dict[str, Any]) -> str | None:
    return None  # every update's rows are rows of the training set


def sections(run: dict[str, Any], records: list[dict[str, Any]], rows: Rows, group_by: str | None,
             top: int) -> list[str]:
    """The stages and the updates, then every stage's own sections."""
    stages = _stages(run)
    body = table(["#", "stage", "component", "warm-up", "every", "role"],
                 [[esc(st["stage"]), esc(st["label"]), esc(st["name"] or "-"), esc(st["warmup_step"]),
                   esc(st["every"]), esc(_describe(st).partition(", ")[2] or "-")] for st in stages])
    out = [section("pipeline", "Pipeline", body, "index-space stages run select -> mix -> reorder; loss-space stages "
                                                 "(weighters, a mixer weighing the domains) multiply")]
    updates = [r for r in records if r.get("kind") == "update"]
    head = ["step"] + [st["label"] for st in stages if st.get("space", "loss" if st["family"] == "weighter" else
                                                               "index") == "index"] + ["rows", "seconds"]
    body_rows = []
    for r in updates:
        cells = [esc(r["step"])]
        for t in r["stages"]:
            cells.append(esc(f"{t['action']} {t['rows_in']}->{t['rows_out']}" if t["action"] == "decided"
                             else t["action"]))
        cells += [esc(len(r["indices"])), esc(fmt(r.get("seconds", 0.0)))]
        body_rows.append(cells)
    out.append(section("updates", "Updates", table(head, body_rows), f"{len(updates)} updates"))
    for st in stages:
        if not st.get("folder"):
            continue
        recs = _records_of(run, st)
        own = OWN.get(st["family"])
        title = f"Stage {st['stage']}: {st['label']}"
        if own is not None:
            parts = own.sections(stage_run(run, st, recs), recs, rows, None, top)
            if st.get("space") == "loss":  # it draws no rows: its sampling proportions say nothing
                parts = [p for p in parts if not p.startswith('<section id="proportions"')]
            out.append(section(f"stage-{st['stage']}", title, "".join(parts), f"{len(recs)} record(s)"))
        else:
            body = table(["ordering", "step", "rows", "score min", "score max"], [
                [esc(r.get("ordering", 0) + 1), esc(r["step"]), esc(len(r.get("rows") or [])),
                 esc(_bound(r, min)), esc(_bound(r, max))] for r in recs])
            out.append(section(f"stage-{st['stage']}", title, body, f"{len(recs)} ordering(s)"))
    return out


def _bound(rec: dict[str, Any], how: Any) -> str:
    scored = [s for s in rec.get("scores") or [] if s is not None]
    return fmt(how(scored)) if scored else "-"


def plot(plt: Any, run: dict[str, Any], records: list[dict[str, Any]]) -> Any:
    """The rows each index-space stage handed on, per update."""
    fig, ax = plt.subplots(figsize=(8, 4))
    updates = [r for r in records if r.get("kind") == "update"]
    labels = [t["label"] for t in updates[0]["stages"]] if updates else []
    for k, label in enumerate(labels):
        pts = [(r["step"], r["stages"][k]["rows_out"]) for r in updates if k < len(r["stages"])]
        ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=label)
    if labels:
        ax.legend(loc="upper right")
    ax.set_xlabel("optimizer step (update)")
    ax.set_ylabel("rows handed on")
    ax.set_title(f"{run['name']}: rows per stage and update")
    return fig

