"""The tests' plugin: pauses and injected faults, through the product's plugin hook.

``tests/support/environment.py`` (imported by ``tests/conftest.py``) puts ``tests/`` on ``PYTHONPATH`` and sets
``DATAFLEX_PLUGINS=dataflex.diagnostics,plugins.faults``, so every training process - torchrun
workers included, which re-import everything - installs it. It does nothing unless its own
variables are set (the decision trace, ``DATAFLEX_TRACE_DIR``, is the diagnostics plugin's):

* ``DATAFLEX_TEST_PAUSE_AT_STEP`` (+ ``DATAFLEX_TEST_PAUSE_FILE``): when that optimizer step is
  about to start, rank 0 writes its pid to the file and every rank sleeps (a test kills it).
* ``DATAFLEX_TEST_FAULT=WHERE:RANK[:N]``: raise ``RuntimeError("injected ... fault")`` on rank RANK -
  ``selection``: at the start of selection N (1-based; before any scoring collective);
  ``collate``: when the scoring engine collates its N-th batch (between two forwards);
  ``forward``: inside the N-th scoring forward, after the model's first layer ran;
  ``weights``: when the weights of step N are being computed, before any collective.
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any

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
    from dataflex.trainer import DataFlexTrainerMixin

    fault = _fault()

    # ------------------------------------------------------------------ pause
    original_batches = DataFlexTrainerMixin.get_batch_samples

    def get_batch_samples(self, epoch_iterator, num_batches, device):
        if os.environ.get(PAUSE_ENV) == str(self.state.global_step):
            marker = os.environ.get(PAUSE_FILE_ENV)
            if marker and self.args.process_index == 0:
                Path(marker).write_text(str(os.getpid()))
            while True:  # the test kills the process here (SIGKILL)
                time.sleep(1)
        if fault and fault[0] == "weights" and fault[1] == self.args.process_index and self.state.global_step == fault[2]:
            raise RuntimeError(f"injected weights fault on rank {self.args.process_index}")
        return original_batches(self, epoch_iterator, num_batches, device)

    DataFlexTrainerMixin.get_batch_samples = get_batch_samples
    if fault is None:
        return
    where, rank, n = fault

    # ------------------------------------------------------------------ faults
    if where == "selection":
        from dataflex.modes.select import SelectRound

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
        from dataflex.scoring.engine import ScoringEngine

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

            def map_(self, dataset, indices, batch_size, fn, desc, **options):
                layer = _first_layer(self.model)

                def hook(module, args):
                    if getattr(self, "_dataflex_fail_next_forward", False):
                        self._dataflex_fail_next_forward = False
                        raise RuntimeError(f"injected forward fault on rank {rank}")

                handle = layer.register_forward_pre_hook(hook) if layer is not None else None
                try:
                    return original_map(self, dataset, indices, batch_size, fn, desc, **options)
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
