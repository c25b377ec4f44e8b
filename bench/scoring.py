"""Benchmark: the loss-scoring engine against the floor (a bare batched forward) and a batch-1 loop.

    python bench/scoring.py [--model demo|50m|qwen2.5-0.5b|qwen2.5-1.5b] [--samples 3000]
                            [--batch-sizes 8 16 32 64] [--cutoff 256] [--device cpu|cuda] [--dtype float32|bfloat16]

Builds a model of the chosen shape (``demo``: the trained-from-nothing demo model; the others:
random weights from a Qwen2 config, which times exactly like the real model), tokenizes mixed-length
demo samples with LLaMA-Factory's template + collator, and measures in one run:

* **engine**: ``ScoringEngine.losses`` (per-sample losses, length-grouped batches);
* **floor**: a bare ``torch.no_grad()`` forward of the same batches (collate included, the same
  length grouping) that computes nothing per sample - what any batched scorer must at least pay;
* **batch-1**: the engine at batch size 1 (the original's loop), on a subset (its rate is per sample).

Prints samples/s, engine/floor (goal >= 0.85) and engine/batch-1 per batch size, and the max abs
difference of the losses vs batch 1; writes ``bench/out/scoring-<model>.json``. Timings on a
shared machine are noisy: read the ratios, which come from the same run.
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

from _common import SHAPES, pipeline, shape_info, write_json  # noqa: E402


def floor_rate(engine, dataset, batches) -> float:
    """Samples/s of collate + a plain no-grad forward over ``batches`` (lists of dataset rows)."""
    import torch

    from dataflex.scoring.engine import eval_mode

    n, t0 = 0, time.perf_counter()
    with eval_mode(engine.model), torch.no_grad():
        for ids in batches:
            data = engine.collate(dataset, ids)
            data.pop("labels")
            engine.model(**data, use_cache=False)
            n += len(ids)
    sync(engine.device)
    return n / (time.perf_counter() - t0)


def sync(device) -> None:
    import torch

    if getattr(device, "type", str(device)) == "cuda":
        torch.cuda.synchronize()


def timed(fn, device) -> float:
    t0 = time.perf_counter()
    fn()
    sync(device)
    return time.perf_counter() - t0


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", choices=list(SHAPES), default="demo")
    ap.add_argument("--samples", type=int, default=None, help="default: 3000 (demo), 400 (others)")
    ap.add_argument("--batch-sizes", type=int, nargs="+", default=[8, 16, 32, 64])
    ap.add_argument("--cutoff", type=int, default=256)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32")
    ap.add_argument("--threads", type=int, default=1,
                    help="torch threads (1 keeps a shared 2-core machine from distorting small ops)")
    ap.add_argument("--baseline-samples", type=int, default=None,
                    help="samples timed in the batch-1 loop (default: 600 demo, 64 others)")
    ap.add_argument("--out", default=None, help="folder for the JSON (default bench/out)")
    args = ap.parse_args(argv)
    samples = args.samples or (3000 if args.model == "demo" else 400)
    baseline = args.baseline_samples or (600 if args.model == "demo" else 64)

    import torch

    from dataflex.scoring.engine import ScoringEngine, length_batches

    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as tmp:
        parts = pipeline(tmp, samples, args.cutoff, model=args.model)
        model, dataset, collator = parts["model"], parts["train_dataset"], parts["collator"]
        device = torch.device(args.device)
        model.to(device=device, dtype=getattr(torch, args.dtype))
        engine = ScoringEngine(model, collator, device, show_progress=False)
        n = len(dataset)
        lengths = engine.lengths(dataset)
        info = shape_info(model)
        print(f"model {args.model}: {info['parameters'] / 1e6:.1f}M parameters ({info['trainable'] / 1e6:.2f}M "
              f"trainable), {args.dtype} on {args.device}; samples: {n}, tokens per sample: min {min(lengths)}, "
              f"mean {sum(lengths) / n:.0f}, max {max(lengths)}")
        engine.losses(dataset, range(min(64, n)), 16)  # warm-up (first-call overheads)

        base_ids = list(range(min(baseline, n)))
        base = None

        def run_base():
            nonlocal base
            base = engine.losses(dataset, base_ids, batch_size=1)

        base_rate = len(base_ids) / timed(run_base, device)
        print(f"batch-1 loop: {base_rate:8.1f} samples/s  (on {len(base_ids)} samples)")
        rows = []
        for bs in args.batch_sizes:
            batches = length_batches(lengths, range(n), bs)
            floor = floor_rate(engine, dataset, batches)
            out = None

            def run_engine():
                nonlocal out
                out = engine.losses(dataset, range(n), batch_size=bs)

            rate = n / timed(run_engine, device)
            valid = ~torch.isnan(base)
            diff = (out[: len(base_ids)][valid] - base[valid]).abs().max().item()
            rows.append({"batch_size": bs, "engine_samples_s": rate, "floor_samples_s": floor,
                         "engine_vs_floor": rate / floor, "engine_vs_batch1": rate / base_rate, "max_abs_diff": diff})
            print(f"bs={bs:<3}: engine {rate:8.1f} samples/s, floor {floor:8.1f} -> engine/floor {rate / floor:5.2f}; "
                  f"vs batch-1 x{rate / base_rate:5.1f}; max |loss diff| {diff:.2e}")
        peak = torch.cuda.max_memory_allocated() / 2**20 if device.type == "cuda" else None
        result = {"peak_gpu_mib": peak, "benchmark": "scoring", "model": args.model, "shape": info, "dtype": args.dtype, "device": args.device,
                  "threads": args.threads, "samples": n, "mean_tokens": sum(lengths) / n,
                  "batch1_samples_s": base_rate, "rows": rows}
        path = write_json(f"scoring-{args.model}-{args.device}", result, args.out)
        print(f"written: {path}")
        return result


if __name__ == "__main__":
    main()
