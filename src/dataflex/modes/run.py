"""What every run writes and says, from its context and its mode's answers.

The trainer calls these: the log lines when the trainer is built (:func:`describe`), what a
checkpoint keeps (:func:`state_dict`, :func:`setup_digest`), ``run.json`` (:func:`manifest`) and
the end of training (:func:`finish`). A mode contributes only its schedule, its round and its own
metrics and files (the :class:`~dataflex.modes.base.Mode` protocol).
"""

from __future__ import annotations

import logging
import os
from typing import Any

from ..core.records import fingerprint
from ..schedule import Schedule
from ..versions import RECORDED, versions
from .base import Mode, dataset_digest

logger = logging.getLogger("dataflex")


def describe(mode: Mode) -> None:
    """Say on rank 0 what runs: the component, its params, the mode's own lines, DeepSpeed."""
    ctx = mode.ctx
    if ctx.rank != 0:
        return
    params = {k: v for k, v in ctx.component.params.to_dict().items() if v is not None}
    logger.info("[DataFlex] %s: component '%s' (%s '%s'), params %s", ctx.fa.train_type, ctx.spec.key,
                ctx.info.singular, ctx.spec.name, params)
    mode.describe()
    stage = ctx.zero_stage()
    if stage is not None:
        logger.info("[DataFlex] DeepSpeed ZeRO-%d: %s", stage, "scoring runs on partitioned parameters"
                    if stage == 3 else "scoring runs on the full parameters each rank holds")


def setup_digest(mode: Mode) -> dict[str, Any]:
    """What a resumed run must share with the checkpoint's run (compared key by key)."""
    ctx = mode.ctx
    params = {k: v for k, v in ctx.component.params.to_dict().items() if k != "cache_dir"}
    digest = {
        "train_type": ctx.fa.train_type,
        "component": [ctx.spec.key, ctx.spec.name, fingerprint(params)],
        "global_batch": ctx.global_batch,
        "seed": ctx.args.seed,
        "train_data": dataset_digest(ctx.train)["sha256"] if ctx.train is not None else None,
        "eval_data": fingerprint(dataset_digest(ctx.eval)),
    }
    schedule = mode.schedule_digest()
    if schedule is not None:
        digest["schedule"] = schedule
    return digest


def state_dict(mode: Mode) -> dict[str, Any]:
    """The checkpoint's ``dataflex_state.json`` (called on every rank)."""
    ctx = mode.ctx
    ctx.work.settle(ctx.agreement)  # the ranks' own passes (a reference model's) join the total first
    return {"run_id": mode.round.log.run_id, "mode": mode.name, "step": ctx.step, "setup": setup_digest(mode),
            "round": mode.round_state(), "work": ctx.work.as_dict()}


def manifest(mode: Mode) -> dict[str, Any]:
    """``run.json``: what the report and a reader need to know about the run."""
    ctx = mode.ctx
    t = ctx.trainer
    info = ctx.data
    return {
        "train_type": ctx.fa.train_type,
        "mode": mode.name,
        "component": ctx.spec.key,
        "name": ctx.spec.name,
        "params": ctx.component.params.to_dict(),
        "train_size": len(ctx.train),
        "eval_size": len(ctx.eval) if ctx.eval is not None else None,
        "model": getattr(getattr(t.model, "config", None), "_name_or_path", None),
        "output_dir": os.path.abspath(t.args.output_dir),
        "seed": t.args.seed,
        "world_size": ctx.world,
        "global_batch": ctx.global_batch,
        "data_sources": {"dataset_dir": info.dataset_dir, "parts": info.parts} if info and info.parts else None,
        "setup": setup_digest(mode),
        # for the report's header: what produced the run, and where a resumed run picked up
        "versions": versions(RECORDED),
        "resumed_from": ctx.resumed_from,
        "resumed_at": ctx.resumed_at,
        "schedule": mode.schedule_manifest(),
    }


def finish(mode: Mode, output: Any, total: float) -> Any:
    """Training ended after ``total`` seconds: the time the decisions took, the mode's files and metrics."""
    ctx, rnd = mode.ctx, mode.round
    seconds = rnd.seconds
    share = seconds / total if total > 0 else 0.0
    files = mode.finish_files()
    if ctx.rank == 0:
        logger.info("[DataFlex] %s took %.2fs of %.2fs training (%.1f%%)", rnd.what + "s", seconds, total, 100 * share)
        for path in files:
            logger.info("[DataFlex] wrote %s", path)
    output.metrics["dataflex_decisions"] = len(rnd.history) or getattr(rnd, "steps", 0)
    output.metrics["dataflex_seconds"] = round(seconds, 3)
    output.metrics["dataflex_share"] = round(share, 4)
    # the scoring passes of the decisions, in tokens (what `dataflex-cli compare --compute work` adds to training's)
    ctx.work.settle(ctx.agreement)
    output.metrics["dataflex_decision_tokens_forward"] = ctx.work.forward_tokens
    output.metrics["dataflex_decision_tokens_backward"] = ctx.work.backward_tokens
    output.metrics.update(mode.metrics())
    return output


# ---------------------------------------------------------------------------------------------- helpers
def stretch_schedule_digest(schedule: Schedule) -> list[Any]:
    """A schedule of stretches (select, mix) as a resumed run must match it."""
    return [schedule.warmup_step, schedule.update_step, schedule.update_times, schedule.total_steps]


def stretch_schedule_manifest(schedule: Schedule) -> dict[str, Any]:
    """A schedule of stretches (select, mix) in ``run.json``."""
    s = schedule
    return {"warmup_step": s.warmup_step, "update_step": s.update_step, "update_times": s.update_times,
            "global_batch": s.global_batch, "total_steps": s.total_steps, "updates": [u.start_step for u in s.updates]}


def describe_schedule(mode: Mode, schedule: Schedule) -> None:
    logger.info("[DataFlex] schedule: %s", schedule.describe(mode.round.what))
