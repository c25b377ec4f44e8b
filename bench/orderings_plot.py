"""Draw each data ordering's score trajectory: the score of the row at each position of one epoch.

    python bench/orderings_plot.py [--out docs/img] [--rows 600]

Writes ``ordering_<pattern>.png`` for the seven patterns of ``dataflex.reorderers.patterns`` with the
parameters of the original DataFlex's presets (``saw``: 3 sections, folding_ratio 0.075, 2 layers;
``stair``: 2 sections, 0.225, 3 layers; ``folding`` / ``zigzag``: 3 layers; ``segment``: 10 % low
front, 10 % high back), and ``ordering_saw_jit.png`` (SAW with a JIT window of rows / 20). The
scores are a seeded normal sample: only the shape matters.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

PRESETS = {
    "shuffle": {},
    "sorting": {},
    "folding": {"layers": 3},
    "zigzag": {"layers": 3},
    "segment": {"x_pct": 10, "y_pct": 10, "front_is_high": False, "back_is_high": True},
    "stair": {"num_sections": 2, "folding_ratio": 0.225, "layers": 3},
    "saw": {"num_sections": 3, "folding_ratio": 0.075, "layers": 2},
}


def trajectories(rows: int, seed: int = 0) -> dict[str, list[float]]:
    """``{figure name: scores in consumption order}``."""
    import torch

    from dataflex.reorderers.patterns import arrange

    scores = (torch.randn(rows, generator=torch.Generator().manual_seed(seed)) * 1.0 + 3.0).tolist()
    out = {}
    for pattern, params in PRESETS.items():
        order = arrange(pattern, scores, torch.Generator().manual_seed(seed), **params)
        out[pattern] = [scores[i] for i in order]
    order = arrange("saw", scores, torch.Generator().manual_seed(seed), window_size=max(2, rows // 20),
                    **PRESETS["saw"])
    out["saw_jit"] = [scores[i] for i in order]
    return out


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=ROOT / "docs" / "img")
    ap.add_argument("--rows", type=int, default=600)
    args = ap.parse_args(argv)

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    args.out.mkdir(parents=True, exist_ok=True)
    for name, ys in trajectories(args.rows).items():
        fig, ax = plt.subplots(figsize=(4.0, 1.8), dpi=80)
        ax.scatter(range(len(ys)), ys, s=1.5, color="#1f3b73", linewidths=0)
        ax.set_title(name.replace("_jit", " + JIT"), fontsize=9)
        ax.set_xlabel("position in the epoch", fontsize=7)
        ax.set_ylabel("score", fontsize=7)
        ax.tick_params(labelsize=6)
        fig.tight_layout()
        path = args.out / f"ordering_{name}.png"
        fig.savefig(path)
        plt.close(fig)
        print(path)


if __name__ == "__main__":
    main()
