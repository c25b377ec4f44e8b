"""``custom``: the template for your own weighter - here, every weight is 1.

With ``strategy: uniform`` the run trains exactly as plain LLaMA-Factory would (bit for bit:
``tests/unit/weighters/test_weighters.py`` compares the loss curves), which makes it the control of a weighting
experiment. To write your own, copy this file (docs/weighters/custom.md), give the class another
``name`` (or reference it as ``name: path/to/my_weighter.py:MyWeighter`` in your components
file), declare the signals it needs and return one weight per sample.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

import torch

from ..component import register
from .base import Weighter, WeightParams, WeightSignals


@dataclass
class CustomWeightParams(WeightParams):
    strategy: Literal["uniform"] = field(default="uniform", metadata={"help": "uniform: every weight is 1."})


@register
class CustomWeighter(Weighter):
    name = "custom"
    Params = CustomWeightParams
    needs = frozenset()  # add "losses" and/or "embeddings" to receive them in `signals`
    summary = "template: uniform weights (reproduces plain training exactly)"

    def weights(self, signals: WeightSignals) -> tuple[torch.Tensor, dict[str, Any]]:
        return torch.ones(len(signals.indices), dtype=torch.float64), {}
