"""The cross-rank protocol: every decision is made once and shared, and a failure anywhere ends every rank.

Why a protocol at all
---------------------
Ranks that take part in a decision run collectives (to split scoring work, gather results,
broadcast the decision). When one rank fails, it must not leave its peers waiting in a
collective it will never join, and it must not join a *different* collective than the one its
peers are in (two unrelated collectives can pair up: garbled data, or a hang). So every
collective DataFlex issues goes through this class, and three rules hold:

1. **Fences.** Every protocol point starts with a *fence*: a one-integer all-reduce of "has this
   rank failed?". All fences are the same collective, so a failed rank reporting at *its* next
   fence always pairs with whatever fence its peers reach next. When the flag is set, every
   rank exchanges ``(rank, where, message)`` and raises :class:`AgreedFailure` with the first
   failure's original message. An ``AgreedFailure`` is known to every rank: it is re-raised as
   it is and never fenced again.
2. **Local failures are reported at the next fence.** Code between fences that runs no
   collective is *local*; an exception there is caught (:meth:`Agreement.attempt`), logged with
   its traceback on the rank where it happened, and carried to the next fence.
3. **Sections.** Code that runs collectives the protocol does not own - a model forward under
   DeepSpeed ZeRO-3 gathers every layer's weights, DeepSpeed's optimizer-state gathers - is
   wrapped in :meth:`Agreement.section`: it is entered through a fence (so nobody enters it
   with a pending failure), and an exception *inside* it ends the process at once with exit
   code 1 and the original message: its peers may be inside one of those collectives, where no
   message can reach them, and torchrun then stops them. A hang is never the outcome.

In a single process every operation is local and an error is raised as it is.
"""

from __future__ import annotations

import logging
import os
import sys
import traceback
from contextlib import contextmanager
from typing import Any, Callable, Iterator, TypeVar

import torch

from ..errors import SelectionError
from .group import is_distributed, object_device

logger = logging.getLogger("dataflex")
T = TypeVar("T")


class AgreedFailure(SelectionError):
    """A failure every rank has learnt of; carries the failing rank, where it failed and its message."""

    def __init__(self, rank: int, where: str, message: str):
        self.rank, self.where, self.message = rank, where, message
        super().__init__(f"failed on rank {rank} ({where}): {message}")


def describe(err: BaseException) -> str:
    return f"{type(err).__name__}: {err}"


def hard_exit(rank: int, message: str) -> None:
    """Print the one-line error and end this process now (no interpreter shutdown, no collective)."""
    try:
        logging.shutdown()
    finally:
        print(f"[rank {rank}] dataflex-cli: error: {message}", file=sys.stderr, flush=True)
        sys.stdout.flush()
        os._exit(1)


class Agreement:
    """The protocol for ``world_size`` ranks; this process is ``rank``."""

    def __init__(self, rank: int = 0, world_size: int = 1):
        self.rank = rank
        self.world_size = world_size
        self.distributed = world_size > 1 and is_distributed()

    # ------------------------------------------------------------------ local work
    def attempt(self, fn: Callable[[], T], where: str) -> tuple[T | None, str | None]:
        """Run local code; ``(result, None)`` or ``(None, message)`` (traceback logged here)."""
        try:
            return fn(), None
        except AgreedFailure:
            raise
        except Exception as err:  # noqa: BLE001 - carried to the next fence
            logger.error("[DataFlex] %s failed on rank %d:\n%s", where, self.rank, traceback.format_exc())
            return None, describe(err)

    # ------------------------------------------------------------------ protocol points
    def fence(self, where: str, error: str | None = None) -> None:
        """All ranks meet; if any carries an error, every rank raises :class:`AgreedFailure`."""
        if not self.distributed:
            if error is not None:
                raise AgreedFailure(self.rank, where, error)
            return
        import torch.distributed as dist

        flag = torch.tensor([1 if error is not None else 0], dtype=torch.int32, device=object_device())
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        if int(flag.item()) == 0:
            return
        reports: list[Any] = [None] * self.world_size
        dist.all_gather_object(reports, (self.rank, where, error))
        failed = [r for r in reports if r[2] is not None]
        rank, at, message = failed[0]
        raise AgreedFailure(rank, at, message)

    def run(self, where: str, fn: Callable[[], T]) -> T:
        """``fn`` on every rank (local code), then a fence: its result, or an agreed failure."""
        result, error = self.attempt(fn, where)
        self.fence(where, error)
        return result  # type: ignore[return-value]

    def gather(self, where: str, value: Any, error: str | None = None) -> list[Any]:
        """Every rank's ``value``, in rank order, on every rank (after a fence carrying ``error``)."""
        self.fence(where, error)
        if not self.distributed:
            return [value]
        import torch.distributed as dist

        out: list[Any] = [None] * self.world_size
        dist.all_gather_object(out, value)
        return out

    def share(self, where: str, decide: Callable[[], T]) -> T:
        """Rank 0 runs ``decide``; every rank gets its result (or its failure)."""
        self.fence(where)
        if not self.distributed:
            return decide()
        import torch.distributed as dist

        payload: Any = None
        if self.rank == 0:
            value, error = self.attempt(decide, where)
            payload = (error, value)
        box = [payload]
        dist.broadcast_object_list(box, src=0, device=object_device())
        error, value = box[0]
        if error is not None:
            raise AgreedFailure(0, where, error)
        return value

    def all_reduce(self, where: str, tensor: torch.Tensor) -> torch.Tensor:
        """Sum of ``tensor`` over ranks (float64 on the protocol's device), returned on CPU."""
        self.fence(where)
        if not self.distributed:
            return tensor.detach().double().cpu()
        import torch.distributed as dist

        buf = tensor.detach().to(object_device() or "cpu", torch.float64).clone()
        dist.all_reduce(buf)
        return buf.cpu()

    @contextmanager
    def section(self, where: str, fenced: bool = False) -> Iterator[None]:
        """Code that runs collectives outside the protocol (see the module docstring, rule 3)."""
        if not fenced:
            self.fence(where)
        try:
            yield
        except AgreedFailure:
            raise
        except Exception as err:
            if not self.distributed:
                raise
            logger.error("[DataFlex] %s failed on rank %d inside collective work; ending this process so "
                         "torchrun stops the others:\n%s", where, self.rank, traceback.format_exc())
            hard_exit(self.rank, f"{where} failed on rank {self.rank}: {describe(err)}")
