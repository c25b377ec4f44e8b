"""Benchmark: the zeroth-order score against the exact gradient alignment, in one run, on the tiny model.

    python bench/zeroth.py [--train 600] [--ks 1 4 16 64] [--warmup-steps 100] [--epsilon 1e-3]
    python bench/zeroth.py --epsilon-sweep      # error of one finite difference vs autograd, per step size
    python bench/zeroth.py --speed [--model 50m] [--speed-ks 1 4 16]   # seconds per sample vs the floor

Set-up: the tiny demo model with LoRA (rank 8, all linear layers) through LLaMA-Factory, the
first ``--train`` rows of ``demo_mix`` (five tasks + noisy rows, cutoff 64) as the training set and
``demo_add_eval`` (40 "add" samples) as the eval set. The LoRA weights first take
``--warmup-steps`` seeded Adam steps (batch 8) so the model is in a mid-training state, as it is at
a selection after warm-up.

Reference: exact g(z)·ḡ_eval, with g(z) the autograd gradient of sample z's mean token loss
(batch-1 loop) and ḡ_eval the mean eval-sample gradient. For every K: the zeroth score
d(z)·mean d(z') / K from one run with K fresh directions (Spearman correlation with the
reference, overlap of the top-k sets, share of "add" samples among the top-k, forward passes and
seconds), and the spread of Spearman over disjoint groups of K among ``--spread-directions``
further directions (independent estimates). Last, the eval_gradient direction (one backward over the eval
set, then 2 forwards per training sample). Timings on a shared CPU are noisy: compare within a run.
"""

from __future__ import annotations

import argparse
import json
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

import torch  # noqa: E402


def spearman(a: torch.Tensor, b: torch.Tensor) -> float:
    from scipy.stats import spearmanr

    return float(spearmanr(a.numpy(), b.numpy()).statistic)


def topk(scores: torch.Tensor, k: int) -> set[int]:
    return set(torch.argsort(-scores, stable=True)[:k].tolist())


def warm_up(model, collator, dataset, steps: int, lr: float = 3e-3, seed: int = 0) -> float:
    """Seeded Adam steps on the trainable weights (batch 8); returns the last training loss."""
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.Adam(params, lr=lr)
    gen = torch.Generator().manual_seed(seed)
    model.train()
    loss = torch.tensor(float("nan"))
    for _ in range(steps):
        ids = torch.randint(len(dataset), (8,), generator=gen).tolist()
        loss = model(**collator([dataset[i] for i in ids])).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    model.eval()
    return float(loss)


def exact_gradients(model, collator, dataset, ids) -> torch.Tensor:
    """Per-sample gradients (flattened trainable parameters, float64), batch-1 autograd."""
    from dataflex.scoring.zeroth import trainable_parameters

    params = [p for _, p in trainable_parameters(model)]
    model.eval()
    rows = []
    for i in ids:
        grads = torch.autograd.grad(model(**collator([dataset[int(i)]])).loss, params)
        rows.append(torch.cat([g.reshape(-1).double() for g in grads]))
    return torch.stack(rows)


def load(tmp: str, n_train: int, cutoff: int, hidden: int = 64, rank: int = 8):
    from dataflex.demo import build_tiny_model
    from dataflex.diagnostics import load_pipeline

    model_dir = build_tiny_model(Path(tmp) / f"tiny{hidden}", ROOT / "data", hidden_size=hidden)
    return load_pipeline({
        "model_name_or_path": str(model_dir), "stage": "sft", "do_train": True, "finetuning_type": "lora",
        "lora_target": "all", "lora_rank": rank, "dataset": "demo_mix", "eval_dataset": "demo_add_eval",
        "dataset_dir": str(ROOT / "data"), "template": "default", "cutoff_len": cutoff, "max_samples": n_train,
        "preprocessing_num_workers": 1, "output_dir": str(Path(tmp) / "out"), "overwrite_output_dir": True,
        "report_to": "none", "bf16": False,
    })


# --------------------------------------------------------------------------- main comparison
def compare(args) -> None:
    from dataflex.scoring.engine import ScoringEngine
    from dataflex.scoring.zeroth import ZerothOrderProbe, gaussian_direction, global_norm, tensor_direction

    tasks = [r["task"] for r in json.loads((ROOT / "data" / "demo_mix_train.json").read_text())]
    with tempfile.TemporaryDirectory() as tmp:
        parts = load(tmp, args.train, args.cutoff)
        model, collator = parts["model"], parts["collator"]
        train, evals = parts["train_dataset"], parts["eval_dataset"]
        N, M = len(train), len(evals)
        last = warm_up(model, collator, train, args.warmup_steps)
        engine = ScoringEngine(model, collator, "cpu", show_progress=False)
        n_params = sum(p.numel() for p in model.parameters() if p.requires_grad)
        k_top = max(1, round(args.topk * N))

        def add_share(picks) -> float:
            return sum(tasks[i] == "add" for i in picks) / len(picks)

        print(f"train {N} (demo_mix, cutoff {args.cutoff}), eval {M} (demo_add_eval), LoRA params {n_params}, "
              f"warm-up {args.warmup_steps} Adam steps (last loss {last:.3f}), top-k = {k_top}, "
              f"epsilon {args.epsilon} (relative), scoring batch {args.batch_size}, threads {torch.get_num_threads()}")
        print(f"'add' share of the training set: {add_share(range(N)):.2f}")

        t0 = time.perf_counter()
        g_train = exact_gradients(model, collator, train, range(N))
        g_eval = exact_gradients(model, collator, evals, range(M)).mean(dim=0)
        t_exact = time.perf_counter() - t0
        exact = g_train @ g_eval
        exact_top = topk(exact, k_top)

        rows = []
        forward_vs_central: dict[int, float] = {}
        rows.append(("exact (autograd, batch-1 loop)", "-", f"{N + M} fwd+bwd", t_exact, 1.0, 1.0,
                     add_share(exact_top)))
        for run, K in enumerate(args.ks):
            probe = ZerothOrderProbe(engine, args.epsilon)
            dirs = [gaussian_direction(args.seed, run, k) for k in range(K)]
            t0 = time.perf_counter()
            d_train, d_eval = probe.differences([(train, range(N)), (evals, range(M))], dirs, args.batch_size)
            seconds = time.perf_counter() - t0
            score = d_train @ d_eval.mean(dim=0) / K
            picks = topk(score, k_top)
            rows.append((f"zeroth random, K={K}", str(K), f"{probe.cost.sample_forwards} fwd", seconds,
                         spearman(score, exact), len(picks & exact_top) / k_top, add_share(picks)))
            if args.no_forward:
                continue
            # difference: forward, the same K directions (only the difference scheme changes), then
            # K' = 2K - 1 other directions: the same number of forwards as central at K
            variants = [(f"K={K}, same directions", K, dirs)]
            if K > 1:  # at K = 1 both schemes take 2 forwards per row
                variants.append((f"K={2 * K - 1}, equal forwards", 2 * K - 1,
                                 [gaussian_direction(args.seed, 500 + run, k) for k in range(2 * K - 1)]))
            for label, kk, dd in variants:
                probe = ZerothOrderProbe(engine, args.epsilon)
                t0 = time.perf_counter()
                f_train, f_eval = probe.differences([(train, range(N)), (evals, range(M))], dd, args.batch_size,
                                                    scheme="forward")
                seconds = time.perf_counter() - t0
                f_score = f_train @ f_eval.mean(dim=0) / kk
                picks = topk(f_score, k_top)
                rows.append((f"zeroth random forward, {label}", str(kk), f"{probe.cost.sample_forwards} fwd", seconds,
                             spearman(f_score, exact), len(picks & exact_top) / k_top, add_share(picks)))
                if dd is dirs:
                    forward_vs_central[K] = spearman(f_score, score)

        # spread: disjoint groups of K among many more directions (independent estimates)
        spreads: dict[int, list[float]] = {}
        if args.spread_directions:
            probe = ZerothOrderProbe(engine, args.epsilon)
            dirs = [gaussian_direction(args.seed, 1000, k) for k in range(args.spread_directions)]
            d_train, d_eval = probe.differences([(train, range(N)), (evals, range(M))], dirs, args.batch_size)
            for K in args.ks:
                spreads[K] = [spearman(d_train[:, a:a + K] @ d_eval[:, a:a + K].mean(dim=0) / K, exact)
                              for a in range(0, args.spread_directions - K + 1, K)]

        probe = ZerothOrderProbe(engine, args.epsilon)
        t0 = time.perf_counter()
        grad, _ = probe.eval_gradient(evals, range(M), args.batch_size)
        norm, root_n = global_norm(grad), n_params ** 0.5
        (d,) = probe.differences([(train, range(N))], [tensor_direction(grad, root_n / norm)], args.batch_size)
        seconds = time.perf_counter() - t0
        score = d[:, 0] * norm / root_n
        picks = topk(score, k_top)
        rows.append(("zeroth eval_gradient", "1", f"{M} fwd+bwd + {probe.cost.sample_forwards - M} fwd", seconds,
                     spearman(score, exact), len(picks & exact_top) / k_top, add_share(picks)))

        print()
        print(f"| method | K | cost (sample passes) | seconds | Spearman vs exact | Spearman, "
              f"{args.spread_directions} other directions in groups of K (mean ± sd, groups) | "
              f"top-{k_top} overlap | 'add' share of top-{k_top} |")
        print("|---|---|---|---|---|---|---|---|")
        for name, K, cost, secs, rho, overlap, share in rows:
            spread = "-"
            if K != "-" and name.startswith("zeroth random,") and int(K) in spreads:
                r = torch.tensor(spreads[int(K)])
                sd = float(r.std()) if len(r) > 1 else 0.0
                spread = f"{float(r.mean()):.3f} ± {sd:.3f} ({len(r)})"
            print(f"| {name} | {K} | {cost} | {secs:.1f} | {rho:.3f} | {spread} | {overlap:.2f} | {share:.2f} |")
        if forward_vs_central:
            print("\nSpearman of forward vs central differences along the same directions: " + ", ".join(
                f"K={k}: {r:.4f}" for k, r in forward_vs_central.items()))
        print(f"\nrandom top-{k_top} overlap by chance: {k_top / N:.2f}; equal cost: eval_gradient = {M} fwd+bwd "
              f"(~{3 * M} forward equivalents) + {2 * N} fwd = ~{3 * M + 2 * N}, random K=1 = {2 * (N + M)} fwd")


# --------------------------------------------------------------------------- step size
def rescale_lora(model, c: float) -> None:
    """Multiply every lora_A and lora_B by ``c`` and divide the LoRA scaling by c²: same outputs."""
    with torch.no_grad():
        for module in model.modules():
            if hasattr(module, "lora_A") and hasattr(module, "scaling") and isinstance(module.scaling, dict):
                for key in module.scaling:
                    module.lora_A[key].weight.mul_(c)
                    module.lora_B[key].weight.mul_(c)
                    module.scaling[key] /= c * c


def epsilon_sweep(args) -> None:
    """Relative error of one difference d = (f(θ+hξ) − f(θ−hξ))/2h against autograd ∇f·ξ, for
    an absolute step h = eps and a relative one h = eps x rms(θ), on several model variants."""
    from dataflex.scoring.engine import ScoringEngine
    from dataflex.scoring.zeroth import ZerothOrderProbe, gaussian_direction, parameter_rms, trainable_parameters

    eps_values = [1e-5, 1e-4, 1e-3, 1e-2, 1e-1]
    steps = args.warmup_steps
    variants = [  # (label, hidden, lora rank, warm-up steps, dtype of the frozen weights, LoRA rescale)
        ("h64 r8, LoRA at init", 64, 8, 0, torch.float32, 1.0),
        ("h64 r8, warmed up", 64, 8, steps, torch.float32, 1.0),
        ("h64 r8, warmed up, same function with A, B x10", 64, 8, steps, torch.float32, 10.0),
        ("h64 r8, warmed up, same function with A, B x0.1", 64, 8, steps, torch.float32, 0.1),
        ("h64 r64, warmed up", 64, 64, steps, torch.float32, 1.0),
        ("h512 r8, warmed up", 512, 8, steps, torch.float32, 1.0),
        ("h64 r8, warmed up, fp16 frozen weights", 64, 8, steps, torch.float16, 1.0),
        ("h64 r8, warmed up, bf16 frozen weights", 64, 8, steps, torch.bfloat16, 1.0),
    ]
    header = " | ".join(f"{e:g}" for e in eps_values)
    print(f"| model | n | rms(θ) | step | {header} |")
    print("|---|---|---|---|" + "---|" * len(eps_values))
    ids = list(range(32))
    for label, hidden, rank, steps, dtype, rescale in variants:
        with tempfile.TemporaryDirectory() as tmp:
            parts = load(tmp, 64, args.cutoff, hidden, rank)
            model, collator, data = parts["model"], parts["collator"], parts["train_dataset"]
            warm_up(model, collator, data, steps)
            if rescale != 1.0:  # A -> cA, B -> cB, LoRA scaling / c^2: the same function, other parameter scale
                rescale_lora(model, rescale)
            if dtype != torch.float32:  # LoRA stays float32, as LLaMA-Factory upcasts it
                for p in model.parameters():
                    if not p.requires_grad:
                        p.data = p.data.to(dtype)
            params = trainable_parameters(model)
            direction = gaussian_direction(1, 0, 0)
            xi = torch.cat([direction(i, n, p).reshape(-1).double() for i, (n, p) in enumerate(params)])
            exact = exact_gradients(model, collator, data, ids) @ xi
            probe = ZerothOrderProbe(ScoringEngine(model, collator, "cpu", show_progress=False), 1.0)
            rms = parameter_rms(params)
            for mode in ("absolute", "relative"):
                errs = []
                for eps in eps_values:
                    h = eps if mode == "absolute" else eps * rms
                    (d,) = probe.differences([(data, ids)], [direction], args.batch_size, h=h)
                    errs.append(float((d[:, 0] - exact).norm() / exact.norm()))
                cells = " | ".join(f"{e:.1e}" for e in errs)
                print(f"| {label} | {probe.num_params} | {rms:.3f} | {mode} | {cells} |", flush=True)


def speed(args) -> None:
    """Seconds per sample of the zeroth score for each K against its floor: 2K plain no-grad forwards
    of the same length-grouped batches (a probe can do no less than two forwards per direction)."""
    from _common import pipeline, shape_info, write_json

    from dataflex.scoring.engine import ScoringEngine, eval_mode, length_batches
    from dataflex.scoring.zeroth import ZerothOrderProbe, gaussian_direction

    with tempfile.TemporaryDirectory() as tmp:
        parts = pipeline(tmp, args.train, args.cutoff, model=args.model)
        model, collator, train = parts["model"], parts["collator"], parts["train_dataset"]
        engine = ScoringEngine(model, collator, "cpu", show_progress=False)
        n = len(train)
        lengths = engine.lengths(train)
        batches = length_batches(lengths, range(n), args.batch_size)

        def forward_pass() -> float:
            t0 = time.perf_counter()
            with eval_mode(model), torch.no_grad():
                for ids in batches:
                    data = engine.collate(train, ids)
                    data.pop("labels")
                    model(**data, use_cache=False)
            return time.perf_counter() - t0

        forward_pass()  # warm-up
        one = min(forward_pass() for _ in range(2))
        rows = []
        info = shape_info(model)
        print(f"model {args.model}: {info['parameters'] / 1e6:.1f}M parameters, {info['trainable']} trainable; "
              f"{n} samples, mean {sum(lengths) / n:.0f} tokens; one plain forward pass over them: {one:.2f}s")
        print("| K | sample forwards | seconds per sample | floor (2K forwards) s/sample | x floor |")
        print("|---|---|---|---|---|")
        for K in args.speed_ks:
            probe = ZerothOrderProbe(engine, args.epsilon)
            dirs = [gaussian_direction(args.seed, 0, k) for k in range(K)]
            t0 = time.perf_counter()
            probe.differences([(train, range(n))], dirs, args.batch_size)
            secs = time.perf_counter() - t0
            floor = 2 * K * one
            rows.append({"K": K, "sample_forwards": probe.cost.sample_forwards, "seconds_per_sample": secs / n,
                         "floor_seconds_per_sample": floor / n, "vs_floor": secs / floor})
            print(f"| {K} | {probe.cost.sample_forwards} | {secs / n:.4f} | {floor / n:.4f} | {secs / floor:.2f} |")
        path = write_json(f"zeroth-speed-{args.model}", {
            "benchmark": "zeroth-speed", "model": args.model, "shape": info, "samples": n,
            "mean_tokens": sum(lengths) / n, "batch_size": args.batch_size, "threads": torch.get_num_threads(),
            "forward_seconds": one, "rows": rows}, args.out)
        print(f"written: {path}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--train", type=int, default=600, help="rows of demo_mix (600 = all)")
    ap.add_argument("--ks", type=int, nargs="+", default=[1, 4, 16, 64])
    ap.add_argument("--warmup-steps", type=int, default=100)
    ap.add_argument("--epsilon", type=float, default=1e-3)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--cutoff", type=int, default=64)
    ap.add_argument("--topk", type=float, default=0.1, help="fraction of the training set compared as top-k")
    ap.add_argument("--seed", type=int, default=42)
    ap.add_argument("--spread-directions", type=int, default=256,
                    help="extra directions split into disjoint groups of K for the spread of Spearman (0: skip)")
    ap.add_argument("--threads", type=int, default=1, help="torch threads (1: no oversubscription on a shared CPU)")
    ap.add_argument("--epsilon-sweep", action="store_true")
    ap.add_argument("--no-forward", action="store_true", help="skip the difference: forward rows")
    ap.add_argument("--speed", action="store_true", help="time the score against its floor (see speed())")
    ap.add_argument("--speed-ks", type=int, nargs="+", default=[1, 4, 16])
    from _common import SHAPES

    ap.add_argument("--model", choices=list(SHAPES), default="demo", help="model shape for --speed")
    ap.add_argument("--out", default=None, help="folder for --speed's JSON (default bench/out)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    if args.speed:
        speed(args)
    else:
        epsilon_sweep(args) if args.epsilon_sweep else compare(args)


if __name__ == "__main__":
    main()
