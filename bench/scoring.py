"""Benchmark: batched per-sample losses vs a batch-size-1 loop, in one run, on the tiny model.

    python bench/scoring.py [--samples 3000] [--batch-sizes 8 16 32 64] [--cutoff 256]

Builds the tiny demo model (seconds), tokenizes a few thousand demo samples of mixed lengths with
LLaMA-Factory's own template + collator, scores them both ways, and prints samples/s, the speed-up
ratio of each batch size over the batch-1 loop measured in the same run, and the max abs
difference of the losses. Timings on a shared machine are noisy: read the ratios, not the seconds.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).resolve().parent))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("DISABLE_VERSION_CHECK", "1")

from _common import pipeline  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--samples", type=int, default=3000)
    ap.add_argument("--batch-sizes", type=int, nargs="+", default=[8, 16, 32, 64])
    ap.add_argument("--cutoff", type=int, default=256)
    ap.add_argument("--threads", type=int, default=1,
                    help="torch threads (1 keeps a shared 2-core machine from distorting small ops)")
    ap.add_argument("--baseline-samples", type=int, default=600,
                    help="samples timed in the batch-1 loop (its rate is per sample, so a subset suffices)")
    args = ap.parse_args()

    import torch

    from dataflex.scoring.engine import ScoringEngine

    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as tmp:
        parts = pipeline(tmp, args.samples, args.cutoff)
        model, dataset, collator = parts["model"], parts["train_dataset"], parts["collator"]
        engine = ScoringEngine(model, collator, "cpu", show_progress=False)
        n = len(dataset)
        lengths = engine.lengths(dataset)
        print(f"samples: {n}, tokens per sample: min {min(lengths)}, mean {sum(lengths) / n:.0f}, max {max(lengths)}")
        engine.losses(dataset, range(min(64, n)), 16)  # warm-up (first-call overheads)

        base_ids = list(range(min(args.baseline_samples, n)))
        t0 = time.perf_counter()
        base = engine.losses(dataset, base_ids, batch_size=1)
        base_rate = len(base_ids) / (time.perf_counter() - t0)
        print(f"batch-1 loop: {base_rate:8.1f} samples/s  (on {len(base_ids)} samples)")

        for bs in args.batch_sizes:
            t0 = time.perf_counter()
            out = engine.losses(dataset, range(n), batch_size=bs)
            rate = n / (time.perf_counter() - t0)
            valid = ~torch.isnan(base)
            diff = (out[: len(base_ids)][valid] - base[valid]).abs().max().item()
            print(f"batched bs={bs:<3}: {rate:8.1f} samples/s  speed-up x{rate / base_rate:5.1f}  "
                  f"max |loss diff| {diff:.2e}")


if __name__ == "__main__":
    main()
