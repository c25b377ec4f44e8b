"""Small helpers over torch.distributed that also work in a single process.

Collectives that take part in a decision go through :class:`dataflex.core.agreement.Agreement`;
this module only answers "am I distributed, which rank, which device for object tensors".
"""

from __future__ import annotations

import torch
import torch.distributed as dist


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized()


def get_rank() -> int:
    return dist.get_rank() if is_distributed() else 0


def get_world_size() -> int:
    return dist.get_world_size() if is_distributed() else 1


def object_device() -> torch.device | None:
    """Where tensors of a collective must live: this rank's GPU under NCCL, the CPU (None) under gloo."""
    if is_distributed() and dist.get_backend() == "nccl" and torch.cuda.is_available():
        return torch.device("cuda", torch.cuda.current_device())
    return None
