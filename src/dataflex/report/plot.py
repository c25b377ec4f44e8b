"""The PNG a finished run leaves beside LLaMA-Factory's training_loss.png (``plot_loss: true``):
the mode table names the file, the mode's report module draws it."""

from __future__ import annotations

import os
from pathlib import Path

from .reader import mode_report, read_run


def plot_run(output_dir: str | os.PathLike) -> list[Path]:
    from ..modes import BY_NAME

    found = read_run(output_dir)
    kit = mode_report(found.mode)
    path = Path(output_dir) / BY_NAME[found.mode].plot_file
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig = kit.plot(plt, found.manifest, found.records)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return [path]
