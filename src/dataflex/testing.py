"""A test plugin: tracing, pauses and injected faults, installed only when its variables are set.

The launcher installs it when ``DATAFLEX_TEST_PLUGIN=1`` (the tests set it); production classes
carry none of this. Everything is driven by environment variables, so torchrun children get it:

* ``DATAFLEX_TRACE_DIR``: every rank appends, per training micro-batch, ``{"step", "indices"}``
  (plus ``"weights"`` / ``"domains"`` when the batch has them) to ``trace_rank{R}.jsonl``.
* ``DATAFLEX_TEST_PAUSE_AT_STEP`` (+ ``DATAFLEX_TEST_PAUSE_FILE``): when that optimizer step is
  about to start, rank 0 writes its pid to the file and every rank sleeps (a test kills it).
* ``DATAFLEX_TEST_FAULT=WHERE:RANK[:N]``: raise ``RuntimeError("injected ... fault")`` on rank RANK -
  ``selection``: at the start of selection N (1-based; before any scoring collective);
  ``collate``: when the scoring engine collates its N-th batch (between two forwards);
  ``forward``: inside the N-th scoring forward, after the model's first layer ran;
  ``weights``: when the weights of step N are being computed, before any collective.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any

TRACE_ENV = "DATAFLEX_TRACE_DIR"
PAUSE_ENV = "DATAFLEX_TEST_PAUSE_AT_STEP"
PAUSE_FILE_ENV = "DATAFLEX_TEST_PAUSE_FILE"
FAULT_ENV = "DATAFLEX_TEST_FAULT"

_INSTALLED = False


def _fault() -> tuple[str, int, int] | None:
    value = os.environ.get(FAULT_ENV)
    if not value:
        return None
    where, rank, *rest = value.split(":")
    return where, int(rank), int(rest[0]) if rest else 1


def install() -> None:
    global _INSTALLED
    if _INSTALLED:
        return
    _INSTALLED = True
    from .modes.base import DOMAIN_KEY, INDEX_KEY, WEIGHT_KEY
    from .trainer import DataFlexTrainerMixin

    fault = _fault()

    # ------------------------------------------------------------------ trace and pause
    original_compute_loss = DataFlexTrainerMixin.compute_loss
    original_batches = DataFlexTrainerMixin.get_batch_samples
    trace_dir = os.environ.get(TRACE_ENV)

    def compute_loss(self, model, inputs, *args: Any, **kwargs: Any):
        if trace_dir and INDEX_KEY in inputs and model.training:
            line: dict[str, Any] = {"step": self.state.global_step, "indices": inputs[INDEX_KEY].tolist()}
            if inputs.get(WEIGHT_KEY) is not None:
                line["weights"] = [float(w) for w in inputs[WEIGHT_KEY]]
            if inputs.get(DOMAIN_KEY) is not None:
                line["domains"] = inputs[DOMAIN_KEY].tolist()
            if inputs.get("labels") is not None:  # supervised tokens per row, as the loss counts them
                line["tokens"] = (inputs["labels"][:, 1:] != -100).sum(dim=1).tolist()
            path = Path(trace_dir) / f"trace_rank{self.df_rank}.jsonl"
            path.parent.mkdir(parents=True, exist_ok=True)
            with path.open("a", encoding="utf-8") as fh:
                fh.write(json.dumps(line) + "\n")
        return original_compute_loss(self, model, inputs, *args, **kwargs)

    def get_batch_samples(self, epoch_iterator, num_batches, device):
        if os.environ.get(PAUSE_ENV) == str(self.state.global_step):
            marker = os.environ.get(PAUSE_FILE_ENV)
            if marker and self.df_rank == 0:
                Path(marker).write_text(str(os.getpid()))
            while True:  # the test kills the process here (SIGKILL)
                time.sleep(1)
        if fault and fault[0] == "weights" and fault[1] == self.df_rank and self.state.global_step == fault[2]:
            raise RuntimeError(f"injected weights fault on rank {self.df_rank}")
        return original_batches(self, epoch_iterator, num_batches, device)

    DataFlexTrainerMixin.compute_loss = compute_loss
    DataFlexTrainerMixin.get_batch_samples = get_batch_samples
    if fault is None:
        return
    where, rank, n = fault

    # ------------------------------------------------------------------ faults
    if where == "selection":
        from .modes.select import SelectRound

        original_select = SelectRound._select

        def _select(self, stretch, count):
            if stretch.number + 1 == n and self.rank == rank:
                context = self.context

                def failing(*a: Any, **k: Any):
                    raise RuntimeError(f"injected selection fault on rank {rank}")

                self.context = failing
                try:
                    return original_select(self, stretch, count)
                finally:
                    self.context = context
            return original_select(self, stretch, count)

        SelectRound._select = _select
    elif where in ("collate", "forward"):
        from .scoring.engine import ScoringEngine

        original_prepare = ScoringEngine.prepare
        calls = {"n": 0}

        def prepare(self, *a: Any, **k: Any):
            calls["n"] += 1
            if self.rank == rank and calls["n"] == n:
                if where == "collate":
                    raise RuntimeError(f"injected collate fault on rank {rank}")
                self._dataflex_fail_next_forward = True
            return original_prepare(self, *a, **k)

        ScoringEngine.prepare = prepare
        if where == "forward":
            original_map = ScoringEngine.map

            def map_(self, dataset, indices, batch_size, fn, desc):
                layer = _first_layer(self.model)

                def hook(module, args):
                    if getattr(self, "_dataflex_fail_next_forward", False):
                        self._dataflex_fail_next_forward = False
                        raise RuntimeError(f"injected forward fault on rank {rank}")

                handle = layer.register_forward_pre_hook(hook) if layer is not None else None
                try:
                    return original_map(self, dataset, indices, batch_size, fn, desc)
                finally:
                    if handle is not None:
                        handle.remove()

            ScoringEngine.map = map_


def _first_layer(model: Any):
    """The second decoder layer (so the first one has run, with its collectives, when the fault strikes)."""
    import torch

    for name, module in model.named_modules():
        if isinstance(module, torch.nn.ModuleList) and len(module) > 1 and name.endswith("layers"):
            return module[1]
    return None
