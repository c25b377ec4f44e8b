"""Benchmark: LESS features from batched per-sample gradients vs a batch-size-1 backward loop.

    python bench/less.py [--samples 600] [--batch-size 16] [--cutoff 256] [--proj-dim 8192]
                         [--baseline-samples 150] [--repeats 3] [--threads 1] [--torch-func]

Builds the tiny demo model with LLaMA-Factory (LoRA on all linear layers), takes a few AdamW
steps so the LoRA B matrices are non-zero and the optimizer has moments, then computes the
Adam-preconditioned, projected, L2-normalised feature of every sample two ways in the same run:

* batched: :class:`dataflex.scoring.gradients.GradientFeaturizer` through the scoring engine
  (one forward + backward per length-grouped batch, per-sample gradients from the linear-layer
  identity);
* batch-1 loop: the reference way - for each sample alone ``loss.backward()``, read ``.grad``,
  precondition with the same Adam moments and project with the same count sketch.

It prints samples/s of both (interleaved ``--repeats`` times; the median ratio is reported), the
lowest cosine between the two methods' features of the same sample (must be >= 0.999), and the
peak resident memory each method added (the kernel's high-water mark, reset before each phase
through /proc/self/clear_refs). ``--torch-func`` also times ``torch.func.vmap(grad(...))``.
On a shared machine timings are noisy: read the ratios, not the seconds.
"""

from __future__ import annotations

import argparse
import os
import statistics
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


# ----------------------------------------------------------------------------- memory
def _rss_kib(field: str) -> int | None:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1])
    except OSError:
        return None
    return None


def _reset_peak() -> bool:
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


class PeakMemory:
    """Peak RSS added by a block (MiB), from VmHWM after resetting it; None where unsupported."""

    def __enter__(self):
        self.ok = _reset_peak()
        self.start = _rss_kib("VmRSS")
        return self

    def __exit__(self, *exc):
        peak = _rss_kib("VmHWM")
        self.mib = (peak - self.start) / 1024 if self.ok and peak is not None and self.start is not None else None
        return False


# ----------------------------------------------------------------------------- the two methods
def batch1_features(model, collator, dataset, ids, projector, moments, names):
    """The reference loop: one sample, one backward, flatten .grad, Adam, project."""
    import torch

    from dataflex.scoring.engine import eval_mode
    from dataflex.scoring.gradients import adam_direction

    params = dict(model.named_parameters())
    device = next(iter(params.values())).device
    rows = []
    with eval_mode(model):
        for i in ids:
            batch = {k: v.to(device) if torch.is_tensor(v) else v for k, v in collator([dataset[int(i)]]).items()}
            model.zero_grad(set_to_none=True)
            model(**batch).loss.backward()
            out = torch.zeros(1, projector.proj_dim, device=device)
            for name in names:
                g = params[name].grad.reshape(1, -1)
                if moments is not None:
                    g = adam_direction(g, moments[name])
                projector.project_into(out, name, g)
            rows.append(out[0] / out[0].norm())
    model.zero_grad(set_to_none=True)
    return torch.stack(rows)


def torch_func_rate(model, collator, dataset, batches) -> float:
    """Samples/s of vmap(grad) per-sample gradients of the LoRA weights (no projection)."""
    import torch
    from torch.func import functional_call, grad, vmap

    params = {n: p.detach() for n, p in model.named_parameters() if p.requires_grad}

    def loss_of(p, ids, labels):
        # no attention mask inside vmap (the mask helpers branch on data): exact with right padding
        logits = functional_call(model, p, args=(), kwargs={"input_ids": ids[None], "use_cache": False}).logits[0, :-1]
        target = labels[1:]
        mask = target != -100
        tok = torch.nn.functional.cross_entropy(logits.float(), target.clamp(min=0), reduction="none")
        return (tok * mask).sum() / mask.sum().clamp(min=1)

    per_sample = vmap(grad(loss_of), in_dims=(None, 0, 0))
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    try:
        base.disable_input_require_grads()  # its hook calls requires_grad_, which vmap rejects
    except Exception:  # noqa: BLE001 - not enabled
        pass
    model.eval()
    n, t0 = 0, time.perf_counter()
    for ids in batches:
        b = collator([dataset[i] for i in ids])
        per_sample(params, b["input_ids"], b["labels"])
        n += len(ids)
    return n / (time.perf_counter() - t0)


def setup(args):
    """The model + data through LLaMA-Factory, a few AdamW steps, the featurizer with Adam moments."""
    import torch

    from dataflex.scoring.engine import ScoringEngine
    from dataflex.scoring.gradients import GradientFeaturizer
    from dataflex.scoring.optimizer_state import adam_moments
    from dataflex.scoring.projection import CountSketchProjector

    torch.set_num_threads(args.threads)
    tmp = tempfile.mkdtemp(prefix="dataflex-bench-less-")
    parts = pipeline(tmp, args.samples, args.cutoff, model=args.model)
    model, dataset, collator = parts["model"], parts["train_dataset"], parts["collator"]
    n = len(dataset)
    device = torch.device(args.device)
    dtype = getattr(torch, args.dtype)
    for p in model.parameters():  # frozen weights in --dtype, LoRA in fp32 (as LLaMA-Factory trains in bf16)
        p.data = p.data.to(device, dtype=torch.float32 if p.requires_grad else dtype)

    # a few real AdamW steps: non-zero LoRA B matrices, and Adam moments to precondition with
    trainable = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(trainable, lr=1e-3)
    gen = torch.Generator().manual_seed(0)
    model.train()
    for _ in range(args.adam_steps):
        ids = torch.randperm(n, generator=gen)[:8].tolist()
        opt.zero_grad()
        batch = {k: v.to(device) if torch.is_tensor(v) else v for k, v in collator([dataset[i] for i in ids]).items()}
        model(**batch).loss.backward()
        opt.step()
    opt.zero_grad(set_to_none=True)

    engine = ScoringEngine(model, collator, device, show_progress=False)
    lengths = engine.lengths(dataset)
    projector = CountSketchProjector(args.proj_dim, seed=123)
    featurizer = GradientFeaturizer(model, projector)
    moments, reason = adam_moments(opt, model, featurizer.param_names)
    if moments is None:
        raise SystemExit(f"no Adam moments: {reason}")
    featurizer.moments = moments
    by_length = sorted(range(n), key=lambda i: lengths[i])
    step = max(1, n // args.baseline_samples)
    base_ids = by_length[::step][: args.baseline_samples]
    return {"model": model, "dataset": dataset, "collator": collator, "engine": engine, "lengths": lengths,
            "projector": projector, "featurizer": featurizer, "moments": moments, "base_ids": base_ids,
            "trainable": trainable, "tmp": tmp}


def train_step_rate(st, args) -> float:
    """The floor: samples/s of one training step's forward + backward (mean loss) over the same
    length-grouped batches - what computing these gradients at all costs, without per-sample work."""
    from dataflex.scoring.engine import eval_mode, length_batches

    model, dataset = st["model"], st["dataset"]
    batches = length_batches(st["lengths"], range(len(dataset)), args.batch_size)
    n, t0 = 0, time.perf_counter()
    with eval_mode(model):
        for ids in batches:
            data = st["engine"].collate(dataset, ids)
            model(**data, use_cache=False).loss.backward()
            n += len(ids)
    _sync()
    model.zero_grad(set_to_none=True)
    return n / (time.perf_counter() - t0)


def checkpointed_step_rate(st, args) -> float:
    """Samples/s of a training step's forward + backward as LLaMA-Factory runs it (train mode, its
    gradient checkpointing), over the same batches."""
    from dataflex.scoring.engine import length_batches

    model, dataset = st["model"], st["dataset"]
    was_training = model.training
    model.train()
    n, t0 = 0, time.perf_counter()
    for ids in length_batches(st["lengths"], range(len(dataset)), args.batch_size):
        model(**st["engine"].collate(dataset, ids), use_cache=False).loss.backward()
        n += len(ids)
    _sync()
    model.zero_grad(set_to_none=True)
    model.train(was_training)
    return n / (time.perf_counter() - t0)


def run_batched(st, args, ids):
    from dataflex.scoring.gradients import sharded_features

    return sharded_features(st["engine"], st["dataset"], ids, args.batch_size, st["featurizer"])


def run_loop(st, args, ids):
    return batch1_features(st["model"], st["collator"], st["dataset"], ids, st["projector"], st["moments"],
                           st["featurizer"].param_names)


def memory_child(args) -> None:
    """Peak RSS one method adds over the same samples, in a process of its own (prints JSON)."""
    import json

    st = setup(args)
    method = run_batched if args.memory_child == "batched" else run_loop
    method(st, args, st["base_ids"][:4])  # warm-up: first-call allocations are not the method's
    with PeakMemory() as mem:
        method(st, args, st["base_ids"])
    print(json.dumps({"method": args.memory_child, "peak_mib": mem.mib}))


class DevicePeak:
    """Peak memory a block adds (MiB): the CUDA allocator's on a GPU, the RSS high-water mark on the CPU."""

    def __init__(self, device):
        self.cuda = str(device).startswith("cuda")

    def __enter__(self):
        import torch

        if not self.cuda:
            self.rss = PeakMemory().__enter__()
            return self
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        self.start = torch.cuda.memory_allocated()
        return self

    def __exit__(self, *exc):
        import torch

        if not self.cuda:
            self.rss.__exit__(*exc)
            self.mib, self.resident_mib = self.rss.mib, self.rss.start / 1024 if self.rss.start else None
            return False
        torch.cuda.synchronize()
        self.mib = (torch.cuda.max_memory_allocated() - self.start) / 2**20
        self.resident_mib = self.start / 2**20
        return False


def micro_batch_child(args) -> None:
    """Peak memory of one micro-batch of ``--peak-batch`` rows of the longest length, in a process of
    its own (prints JSON): ``train`` is a training step's forward + backward as LLaMA-Factory runs it
    (train mode, its gradient checkpointing as it enabled it), ``less`` the LESS feature pass."""
    import json

    import torch

    from dataflex.scoring.engine import ScoringEngine
    from dataflex.scoring.gradients import GradientFeaturizer, sharded_features
    from dataflex.scoring.projection import CountSketchProjector

    torch.set_num_threads(args.threads)
    rows = args.peak_batch
    tmp = tempfile.mkdtemp(prefix="dataflex-bench-peak-")
    parts = pipeline(tmp, max(64, 4 * rows), args.cutoff, model=args.model)
    model, dataset, collator = parts["model"], parts["train_dataset"], parts["collator"]
    device = torch.device(args.device)
    for p in model.parameters():
        p.data = p.data.to(device, dtype=torch.float32 if p.requires_grad else getattr(torch, args.dtype))
    engine = ScoringEngine(model, collator, device, show_progress=False)
    lengths = engine.lengths(dataset)
    ids = sorted(range(len(dataset)), key=lambda i: (-lengths[i], i))[:rows]
    checkpointing = bool(getattr(model, "is_gradient_checkpointing", False))
    if args.peak_child == "train":
        def run(batch_ids):
            model.train()
            model(**engine.collate(dataset, batch_ids)).loss.backward()
            model.zero_grad(set_to_none=True)
    else:
        featurizer = GradientFeaturizer(model, CountSketchProjector(args.proj_dim, seed=123))

        def run(batch_ids):
            sharded_features(engine, dataset, batch_ids, len(batch_ids), featurizer)
    run(ids[-1:])  # warm-up on one row: first-call allocations are not the micro-batch's
    with DevicePeak(device) as mem:
        run(ids)
    print(json.dumps({"kind": args.peak_child, "rows": rows, "tokens": max(lengths[i] for i in ids),
                      "peak_mib": mem.mib, "resident_mib": mem.resident_mib, "checkpointing": checkpointing}))


def child_json(extra: list[str], env: dict | None = None) -> dict | None:
    """Run this script again with ``extra`` arguments and read the JSON line it prints last."""
    import json
    import subprocess

    argv = [a for a in sys.argv[1:] if a != "--torch-func"]
    res = subprocess.run([sys.executable, __file__, *argv, *extra], capture_output=True, text=True, check=False,
                         env=dict(os.environ, **(env or {})))
    for line in reversed(res.stdout.splitlines()):
        if line.startswith("{"):
            return json.loads(line)
    print(res.stderr[-2000:], file=sys.stderr)
    return None


def micro_batch_memory(args) -> list[dict]:
    """Per micro-batch size: the LESS pass's peak against a training step's, each in its own process.
    On the CPU glibc's allocator is told to return large blocks at once, so the RSS high-water mark
    follows the tensors' lifetimes."""
    env = {"MALLOC_MMAP_THRESHOLD_": "65536"}
    out = []
    for rows in args.micro_batches:
        got = {kind: child_json(["--peak-child", kind, "--peak-batch", str(rows)], env) for kind in ("train", "less")}
        if None in got.values() or None in (got["train"]["peak_mib"], got["less"]["peak_mib"]):
            print(f"micro-batch {rows}: peak memory not measurable here")
            continue
        train, less = got["train"], got["less"]
        row = {"rows": rows, "tokens": train["tokens"], "train_peak_mib": train["peak_mib"],
               "less_peak_mib": less["peak_mib"], "less_vs_train": less["peak_mib"] / max(train["peak_mib"], 1e-3),
               "resident_mib": train["resident_mib"], "train_checkpointing": train["checkpointing"]}
        total = (less["peak_mib"] + row["resident_mib"]) / (train["peak_mib"] + row["resident_mib"])
        row["less_vs_train_with_resident"] = total
        out.append(row)
        print(f"micro-batch {rows} x {row['tokens']} tokens: a training step adds {row['train_peak_mib']:.0f} MiB "
              f"(gradient checkpointing {'on' if row['train_checkpointing'] else 'off'}), the LESS pass "
              f"{row['less_peak_mib']:.0f} MiB -> x{row['less_vs_train']:.2f} (goal <= 1.3); with the "
              f"{row['resident_mib']:.0f} MiB already resident x{total:.2f}", flush=True)
    return out


def child_memory(method: str) -> float | None:
    got = child_json(["--memory-child", method])
    return None if got is None else got["peak_mib"]


def _sync() -> None:
    """Wait for queued CUDA work, so a timer reads the work's own time (nothing on the CPU)."""
    import torch

    if torch.cuda.is_available():
        torch.cuda.synchronize()


def torch_device_type(device: str) -> str:
    return device.split(":")[0]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", choices=list(SHAPES), default="demo")
    ap.add_argument("--samples", type=int, default=600)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--cutoff", type=int, default=256)
    ap.add_argument("--proj-dim", type=int, default=8192)
    ap.add_argument("--baseline-samples", type=int, default=150,
                    help="samples timed in the batch-1 loop (spread over all lengths)")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--adam-steps", type=int, default=5,
                    help="AdamW steps (batch 8) before measuring: non-zero LoRA B matrices and Adam moments")
    ap.add_argument("--threads", type=int, default=1, help="torch threads (1: least noisy on a shared CPU)")
    ap.add_argument("--device", default="cpu", help="cpu or cuda (CUDA: peak memory from the allocator)")
    ap.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32", help="frozen weights' dtype")
    ap.add_argument("--torch-func", action="store_true", help="also time torch.func.vmap(grad)")
    ap.add_argument("--memory", choices=["all", "micro-batch", "none"], default="all",
                    help="peak memory: batched vs batch-1 and the micro-batch comparison, only the latter, or none")
    ap.add_argument("--no-memory", action="store_const", const="none", dest="memory", help="the same as --memory none")
    ap.add_argument("--micro-batches", type=int, nargs="*", default=[4, 16],
                    help="micro-batch sizes (rows of the longest length) whose peak memory is compared: the LESS "
                         "pass vs a LLaMA-Factory training step")
    ap.add_argument("--memory-child", choices=["batched", "loop"], help=argparse.SUPPRESS)
    ap.add_argument("--peak-child", choices=["train", "less"], help=argparse.SUPPRESS)
    ap.add_argument("--peak-batch", type=int, help=argparse.SUPPRESS)
    ap.add_argument("--out", default=None, help="folder for the JSON (default bench/out)")
    args = ap.parse_args()
    if args.memory_child:
        memory_child(args)
        return
    if args.peak_child:
        micro_batch_child(args)
        return

    import shutil

    from dataflex.scoring.engine import length_batches

    st = setup(args)
    try:
        n, lengths, trainable = len(st["dataset"]), st["lengths"], st["trainable"]
        base_ids = st["base_ids"]
        names = st["featurizer"].param_names
        largest = max(p.numel() for p in trainable)
        print(f"samples: {n}, tokens per sample: min {min(lengths)}, mean {sum(lengths) / n:.0f}, max {max(lengths)}; "
              f"LoRA parameters: {sum(p.numel() for p in trainable)} in {len(names)} matrices (largest {largest}); "
              f"proj_dim {args.proj_dim}; batch {args.batch_size}; threads {args.threads}")

        run_batched(st, args, range(min(32, n)))  # warm-up
        run_loop(st, args, base_ids[:4])
        batched_rates, loop_rates, floor_rates, ckpt_rates = [], [], [], []
        for _ in range(args.repeats):
            floor_rates.append(train_step_rate(st, args))
            ckpt_rates.append(checkpointed_step_rate(st, args))
            t0 = time.perf_counter()
            feats = run_batched(st, args, range(n))
            _sync()
            batched_rates.append(n / (time.perf_counter() - t0))
            t0 = time.perf_counter()
            ref = run_loop(st, args, base_ids)
            _sync()
            loop_rates.append(len(base_ids) / (time.perf_counter() - t0))
        cos = (feats[base_ids].to(ref.device) * ref).sum(dim=1)
        assert all(p.grad is None for p in trainable)

        ratios = [b / l for b, l in zip(batched_rates, loop_rates)]
        print(f"batch-1 loop : {statistics.median(loop_rates):8.1f} samples/s  (on {len(base_ids)} samples; "
              f"runs {', '.join(f'{r:.1f}' for r in loop_rates)})")
        print(f"batched bs={args.batch_size:<3}: {statistics.median(batched_rates):8.1f} samples/s  "
              f"(runs {', '.join(f'{r:.1f}' for r in batched_rates)})")
        print(f"speed-up     : x{statistics.median(ratios):.1f} (median of {len(ratios)} interleaved runs; "
              f"min x{min(ratios):.1f}, max x{max(ratios):.1f})")
        print(f"cosine batched vs batch-1 (same projection): min {cos.min().item():.6f}, mean {cos.mean().item():.6f}")
        floor = statistics.median(floor_rates)
        per_floor = floor / statistics.median(batched_rates)
        print(f"floor (a training step's forward + backward over the same batches): {floor:.1f} samples/s -> "
              f"LESS features cost x{per_floor:.2f} of it per sample (goal <= 1.3)")
        ckpt = statistics.median(ckpt_rates)
        per_ckpt = ckpt / statistics.median(batched_rates)
        print(f"a training step as LLaMA-Factory runs it (gradient checkpointing on): {ckpt:.1f} samples/s -> "
              f"LESS features cost x{per_ckpt:.2f} of it")
        result = {"benchmark": "less", "model": args.model, "shape": shape_info(st["model"]), "samples": n,
                  "mean_tokens": sum(lengths) / n, "batch_size": args.batch_size, "proj_dim": args.proj_dim,
                  "threads": args.threads, "batched_samples_s": statistics.median(batched_rates),
                  "batch1_samples_s": statistics.median(loop_rates), "floor_samples_s": floor,
                  "vs_batch1": statistics.median(ratios), "seconds_vs_floor": per_floor,
                  "checkpointed_step_samples_s": ckpt, "seconds_vs_checkpointed_step": per_ckpt,
                  "min_cosine_vs_batch1": cos.min().item()}

        if args.memory == "all" and args.device != "cpu":
            import torch

            peaks = {}
            for name, method in (("batched", run_batched), ("loop", run_loop)):
                torch.cuda.synchronize()
                torch.cuda.reset_peak_memory_stats()
                base = torch.cuda.memory_allocated()
                method(st, args, base_ids)
                torch.cuda.synchronize()
                peaks[name] = (torch.cuda.max_memory_allocated() - base) / 2**20
            print(f"peak GPU memory added over the {len(base_ids)} samples: batched {peaks['batched']:.0f} MiB, "
                  f"batch-1 loop {peaks['loop']:.0f} MiB")
            result.update(peak_gpu_mib_batched=peaks["batched"], peak_gpu_mib_batch1=peaks["loop"])
        elif args.memory == "all":
            mb, ml = child_memory("batched"), child_memory("loop")
            if mb is not None and ml is not None:
                features = args.batch_size * (args.proj_dim + largest) * 4 / 2**20
                print(f"peak RSS added over the {len(base_ids)} samples (own process each): batched {mb:.1f} MiB, "
                      f"batch-1 loop {ml:.1f} MiB (ratio x{mb / max(ml, 1e-3):.2f}); per batch, features + largest "
                      f"layer's per-sample gradients: {features:.2f} MiB; "
                      f"count-sketch hashes: {st['projector'].memory_bytes() / 2**20:.2f} MiB")
                result.update(peak_mib_batched=mb, peak_mib_batch1=ml, bound_mib_per_batch=features)
            else:
                print("peak RSS: not measurable here (/proc/self/clear_refs or the child failed)")
        if args.memory != "none" and args.micro_batches:
            result["micro_batch_memory"] = micro_batch_memory(args)
        result.update(device=args.device, dtype=args.dtype)
        suffix = "" if args.device == "cpu" else f"-{torch_device_type(args.device)}"
        path = write_json(f"less-{args.model}{suffix}", result, args.out)
        print(f"written: {path}")

        if args.torch_func:
            from dataflex.scoring.engine import eval_mode
            from dataflex.scoring.gradients import per_sample_gradients

            batches = length_batches(lengths, range(n), args.batch_size)
            engine, model = st["engine"], st["model"]
            targets = st["featurizer"].targets
            t0 = time.perf_counter()
            with eval_mode(model):
                for ids in batches:
                    data = engine.collate(st["dataset"], ids)
                    per_sample_gradients(model, engine.model_inputs(data), data["labels"], targets).as_dict()
            hooks = n / (time.perf_counter() - t0)
            rate = torch_func_rate(model, st["collator"], st["dataset"], batches)
            print(f"per-sample gradients only (no Adam, no projection): linear-layer identity {hooks:.1f} samples/s, "
                  f"torch.func vmap(grad) {rate:.1f} samples/s (identity x{hooks / rate:.2f})")
    finally:
        shutil.rmtree(st["tmp"], ignore_errors=True)


if __name__ == "__main__":
    main()
