"""Small helpers over torch.distributed that also work in a single process.

Collectives that take part in a decision go through :class:`dataflex.dist.agreement.Agreement`;
this module only answers "is a process group up, and on which device do its object tensors live".
"""

from __future__ import annotations

import torch
import torch.distributed as dist


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized()


def object_device() -> torch.device | None:
    """Where tensors of a collective must live: this rank's GPU under NCCL, the CPU (None) under gloo."""
    if is_distributed() and dist.get_backend() == "nccl" and torch.cuda.is_available():
        return torch.device("cuda", torch.cuda.current_device())
    return None
