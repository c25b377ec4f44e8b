"""Benchmark: what share of a run's wall time selection takes, per selector, at a realistic shape.

    python bench/selection_cost.py [--model 50m] [--pool 10000] [--global-batch 64] [--update-step 50]
                                   [--candidate-pools 1.0 0.5 0.25 0.1] [--samples 96]

Measures, on the chosen shape and on the same mixed-length rows, the seconds per sample of each
per-sample computation a selection runs (through the real engine and featurizer) and the seconds
of one training step of ``--global-batch`` rows (forward + backward + AdamW), then works out a
schedule a user would run: every ``--update-step`` steps a selection over ``--pool`` rows (or a
``candidate_pool`` share of it), and prints the selection's share of the wall time of one cycle

    share = selection / (selection + update_step x step)

for loss / delta_loss (one scoring pass), less (one gradient-feature pass + the eval set's),
zeroth (2K forwards per row, K = 16; K + 1 with ``difference: forward``; and ``direction:
eval_gradient``, one backward over the eval set then 2 forwards per row) and random (nothing). The per-sample rates are measured on
``--samples`` rows; the shares are computed from them (stated as such in the output and the JSON,
``bench/out/selection_cost-<model>.json``).
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("DISABLE_VERSION_CHECK", "1")

from _common import SHAPES, pipeline, shape_info, write_json  # noqa: E402


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", choices=list(SHAPES), default="50m")
    ap.add_argument("--samples", type=int, default=96, help="rows the per-sample rates are measured on")
    ap.add_argument("--pool", type=int, default=10000)
    ap.add_argument("--eval-rows", type=int, default=100, help="eval-set rows less and zeroth also score")
    ap.add_argument("--global-batch", type=int, default=64)
    ap.add_argument("--micro-batch", type=int, default=8)
    ap.add_argument("--update-step", type=int, default=50)
    ap.add_argument("--candidate-pools", type=float, nargs="+", default=[1.0, 0.5, 0.25, 0.1])
    ap.add_argument("--batch-size", type=int, default=16, help="scoring_batch_size")
    ap.add_argument("--cutoff", type=int, default=256)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)

    import torch

    from dataflex.scoring.engine import ScoringEngine
    from dataflex.scoring.gradients import GradientFeaturizer, sharded_features
    from dataflex.scoring.optimizer_state import adam_moments
    from dataflex.scoring.projection import CountSketchProjector
    from dataflex.scoring.zeroth import ZerothOrderProbe, gaussian_direction

    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as tmp:
        parts = pipeline(tmp, args.samples, args.cutoff, model=args.model)
        model, dataset, collator = parts["model"], parts["train_dataset"], parts["collator"]
        n = len(dataset)
        engine = ScoringEngine(model, collator, "cpu", show_progress=False)
        lengths = engine.lengths(dataset)
        trainable = [p for p in model.parameters() if p.requires_grad]
        opt = torch.optim.AdamW(trainable, lr=1e-4)

        # one training step of G rows: micro-batches of the same rows, forward + backward, one AdamW step
        gen = torch.Generator().manual_seed(0)
        rows = torch.randint(n, (args.global_batch,), generator=gen).tolist()

        def train_step() -> float:
            model.train()
            t0 = time.perf_counter()
            for k in range(0, len(rows), args.micro_batch):
                batch = collator([dataset[i] for i in rows[k:k + args.micro_batch]])
                (model(**batch).loss * args.micro_batch / len(rows)).backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            return time.perf_counter() - t0

        train_step()  # warm-up, and Adam moments for LESS
        step_s = min(train_step() for _ in range(2))

        t0 = time.perf_counter()
        engine.losses(dataset, range(n), args.batch_size)
        loss_s = (time.perf_counter() - t0) / n

        featurizer = GradientFeaturizer(model, CountSketchProjector(4096, seed=123))
        featurizer.moments, _ = adam_moments(opt, model, featurizer.param_names)
        t0 = time.perf_counter()
        sharded_features(engine, dataset, range(n), args.batch_size, featurizer)
        less_s = (time.perf_counter() - t0) / n

        probe = ZerothOrderProbe(engine, 1e-3)
        t0 = time.perf_counter()
        probe.differences([(dataset, range(n))], [gaussian_direction(0, 0, k) for k in range(2)], args.batch_size)
        zeroth_per_direction = (time.perf_counter() - t0) / n / 2

        # zeroth with direction: eval_gradient is one direction (2 forwards per row) after one backward over
        # the eval set; that backward is taken at LESS's per-row cost (a forward + backward per row)
        per_sample = {"loss": loss_s, "delta_loss": loss_s, "less": less_s, "zeroth (K=16)": 16 * zeroth_per_direction,
                      "zeroth (K=16, difference: forward)": 17 / 2 * zeroth_per_direction,
                      "zeroth (eval_gradient)": zeroth_per_direction, "random": 0.0}
        # difference: forward is K + 1 forwards per row instead of 2K: 17 at K = 16, i.e. 8.5 directions' worth
        extra_eval = {"less": less_s * args.eval_rows, "zeroth (K=16)": 16 * zeroth_per_direction * args.eval_rows,
                      "zeroth (K=16, difference: forward)": 17 / 2 * zeroth_per_direction * args.eval_rows,
                      "zeroth (eval_gradient)": (less_s + zeroth_per_direction) * args.eval_rows}
        info = shape_info(model)
        print(f"model {args.model}: {info['parameters'] / 1e6:.1f}M parameters; rows: mean {sum(lengths) / n:.0f} "
              f"tokens; one training step of {args.global_batch} rows: {step_s:.2f}s; per sample: loss "
              f"{loss_s * 1e3:.1f} ms, less {less_s * 1e3:.1f} ms, zeroth {zeroth_per_direction * 1e3:.1f} ms per "
              f"direction (measured on {n} rows, {args.threads} thread(s))")
        cycle_train = args.update_step * step_s
        print(f"\nschedule: pool {args.pool}, G {args.global_batch}, a selection every {args.update_step} steps "
              f"({cycle_train:.0f}s of training); selection share of wall time (computed from the rates above):")
        print("| selector | " + " | ".join(f"candidate_pool {c:g}" for c in args.candidate_pools) + " |")
        print("|---|" + "---|" * len(args.candidate_pools))
        table = {}
        for name, sec in per_sample.items():
            shares = []
            for c in args.candidate_pools:
                sel = sec * args.pool * c + extra_eval.get(name, 0.0)
                shares.append(sel / (sel + cycle_train))
            table[name] = dict(zip([str(c) for c in args.candidate_pools], shares))
            print(f"| {name} | " + " | ".join(f"{100 * s:.0f} %" for s in shares) + " |")
        result = {"benchmark": "selection_cost", "model": args.model, "shape": info, "threads": args.threads,
                  "mean_tokens": sum(lengths) / n, "measured_rows": n, "train_step_s": step_s,
                  "per_sample_s": per_sample, "schedule": {"pool": args.pool, "global_batch": args.global_batch,
                                                            "update_step": args.update_step,
                                                            "eval_rows": args.eval_rows},
                  "selection_share": table, "note": "shares computed from the measured per-sample rates"}
        path = write_json(f"selection_cost-{args.model}", result, args.out)
        print(f"written: {path}")
        return result


if __name__ == "__main__":
    main()
