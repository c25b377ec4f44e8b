"""Benchmark: three ways to project per-sample LoRA gradients, at a realistic LoRA shape.

    python bench/projection.py [--model qwen2.5-0.5b] [--lora-rank 16] [--proj-dim 4096]
                               [--batch 8] [--tokens 128] [--device cpu] [--dense-layers 1]

One real forward + backward of the model (random weights, LoRA on every linear layer, as the
seed's less.yaml) over ``--batch`` samples of ``--tokens`` supervised tokens gives, through
:func:`dataflex.scoring.gradients.per_sample_gradients`, every LoRA layer's input activations and
output gradients. The same captured tensors are then projected to ``--proj-dim`` numbers per
sample in three ways, and each is timed and compared with the exact inner products of the
per-sample gradients:

``count sketch`` (what LESS uses)
    form each layer's per-sample gradients (one bmm), then one ``index_add_`` per layer
    (:class:`dataflex.scoring.projection.CountSketchProjector`).
``dense Gaussian`` / ``dense Rademacher`` (TRAK-style)
    form the per-sample gradients, then multiply by a ``numel x proj_dim`` random matrix
    regenerated block by block from a seeded generator (it cannot be stored: the size is printed).
    At 0.5B shapes this is slow, so it runs on the first ``--dense-layers`` decoder layers and
    its time is scaled by the coordinates (stated as ``extrapolated``); its error is measured on
    that subset, next to the count sketch on the same subset.
``factored`` (LoGra-style)
    never forms a per-sample gradient: a layer's inputs ``x`` and output gradients ``dy`` are
    projected separately by small seeded Gaussian matrices (``k_in x in`` and ``k_out x out``;
    a side of size <= k is kept as it is), their per-sample outer product summed over tokens
    gives a ``k_out x k_in`` block, and the blocks are count-sketched into ``proj_dim``.
    It applies to raw (SGD) gradients only: Adam preconditioning divides each coordinate of the
    gradient by its own moment, which has no factored form.

Error: for every pair of samples, the cosine of the projected vectors minus the cosine of the
exact gradients (RMS and max over pairs, over ``--seeds`` projection seeds), and the relative
error of the squared norms. Memory: the state each method keeps (hash tables, small matrices)
and its transient buffers as computed from the shapes; on CUDA also the peak each allocates
(on the CPU the allocator reuses the freed forward/backward memory, so RSS cannot show it).
Figures go to
``bench/out/projection-<model>-<device>.json``.
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("DISABLE_VERSION_CHECK", "1")

from _common import SHAPES, build_model, write_json  # noqa: E402


# ----------------------------------------------------------------------------- the projections
def _generator(device, seed: int, key: str):
    import torch

    from dataflex.seeding import derive_seed

    return torch.Generator(device=device).manual_seed(derive_seed(seed, key))


def count_sketch(grads, projector, batch, device):
    """Form each layer's per-sample gradients (``BatchGradients`` iteration: one bmm), then sketch them."""
    import torch

    out = torch.zeros(batch, projector.proj_dim, device=device)
    for name, g in grads:
        projector.project_into(out, name, g)
    return out


def dense(grads, proj_dim, seed, batch, device, kind: str, chunk: int = 8192):
    """Gradients times a ``numel x proj_dim`` random matrix made ``chunk`` rows at a time."""
    import torch

    out = torch.zeros(batch, proj_dim, device=device)
    scale = 1.0 / math.sqrt(proj_dim)
    for name, g in grads:
        gen = _generator(device, seed, f"dense:{name}")
        for start in range(0, g.shape[1], chunk):
            rows = min(chunk, g.shape[1] - start)
            if kind == "gaussian":
                r = torch.randn(rows, proj_dim, generator=gen, device=device)
            else:
                r = torch.randint(0, 2, (rows, proj_dim), generator=gen, device=device, dtype=torch.int8)
                r = r.float().mul_(2).sub_(1)
            out.addmm_(g[:, start:start + rows], r, alpha=scale)
    return out


class Factored:
    """LoGra-style: project a layer's inputs and output gradients separately, then count-sketch the blocks."""

    def __init__(self, k: int, projector, seed: int, device):
        self.k, self.projector, self.seed, self.device = k, projector, seed, device
        self._mats: dict = {}

    def _matrix(self, key: str, dim: int):
        import torch

        if dim <= self.k:
            return None  # a side no larger than k is kept exact
        if (key, dim) not in self._mats:
            gen = _generator(self.device, self.seed, f"factored:{key}")
            self._mats[(key, dim)] = torch.randn(dim, self.k, generator=gen, device=self.device) / math.sqrt(self.k)
        return self._mats[(key, dim)]

    def state_bytes(self) -> int:
        return sum(m.numel() * m.element_size() for m in self._mats.values())

    def __call__(self, grads, batch):
        import torch

        out = torch.zeros(batch, self.projector.proj_dim, device=self.device)
        for target, calls in grads.layer_calls():
            block = None
            for x, gy in calls:
                p_in = self._matrix(f"{target.weight_name}:in", x.shape[-1])
                p_out = self._matrix(f"{target.weight_name}:out", gy.shape[-1])
                xp = x @ p_in if p_in is not None else x
                gp = gy @ p_out if p_out is not None else gy
                blk = torch.bmm(gp.transpose(1, 2), xp)
                block = blk if block is None else block + blk
            self.projector.project_into(out, f"factored:{target.weight_name}", block.reshape(batch, -1))
        return out


# ----------------------------------------------------------------------------- error against exact
def exact_gram(grads):
    gram = None
    for _, g in grads:
        g = g.double()
        gram = g @ g.T if gram is None else gram + g @ g.T
    return gram


def errors(approx, gram) -> dict:
    """Cosine errors over sample pairs and squared-norm errors, projected vs exact."""
    import torch

    a = approx.double() @ approx.double().T
    g = gram.to(a.device)

    def cos(m):
        d = m.diagonal().clamp(min=1e-300).sqrt()
        return m / d[:, None] / d[None, :]

    iu = torch.triu_indices(g.shape[0], g.shape[0], 1)
    diff = (cos(a) - cos(g))[iu[0], iu[1]]
    norm = a.diagonal() / g.diagonal() - 1
    exact_cos = cos(g)[iu[0], iu[1]]
    return {"cos_err_rms": diff.pow(2).mean().sqrt().item(), "cos_err_max": diff.abs().max().item(),
            "sq_norm_err_rms": norm.pow(2).mean().sqrt().item(), "pairs": int(diff.numel()),
            "exact_cos_mean_abs": exact_cos.abs().mean().item()}


def pooled(errs: list[dict]) -> dict:
    n = sum(e["pairs"] for e in errs)
    return {"cos_err_rms": math.sqrt(sum(e["cos_err_rms"] ** 2 * e["pairs"] for e in errs) / n),
            "cos_err_max": max(e["cos_err_max"] for e in errs),
            "sq_norm_err_rms": math.sqrt(sum(e["sq_norm_err_rms"] ** 2 for e in errs) / len(errs)),
            "pairs": n, "exact_cos_mean_abs": errs[0]["exact_cos_mean_abs"]}


# ----------------------------------------------------------------------------- main
def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", choices=list(SHAPES), default="qwen2.5-0.5b")
    ap.add_argument("--lora-rank", type=int, default=16)
    ap.add_argument("--proj-dim", type=int, default=4096)
    ap.add_argument("--factored-k", type=int, default=16, help="side of the factored projection per layer")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--tokens", type=int, default=128)
    ap.add_argument("--seeds", type=int, default=3, help="projection seeds the errors are pooled over")
    ap.add_argument("--dense-layers", type=int, default=1, help="decoder layers the dense projections run on")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", default=None, help="folder for the JSON (default bench/out)")
    args = ap.parse_args(argv)

    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from dataflex.scoring.gradients import per_sample_gradients, trainable_linears
    from dataflex.scoring.projection import CountSketchProjector

    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    cuda = device.type == "cuda"
    dtype = getattr(torch, args.dtype)

    def sync():
        if cuda:
            torch.cuda.synchronize()

    class Peak:  # peak memory one block adds: CUDA allocator, or RSS on the CPU
        def __enter__(self):
            if cuda:
                sync()
                torch.cuda.reset_peak_memory_stats()
                self.base = torch.cuda.memory_allocated()
            return self

        def __exit__(self, *exc):
            if cuda:
                sync()
                self.mib = (torch.cuda.max_memory_allocated() - self.base) / 2**20
            else:  # RSS cannot show it: the freed forward/backward memory is reused
                self.mib = None
            return False

    def timed(fn, repeats=2):
        fn()  # warm-up (hash tables, kernels)
        best = math.inf
        for _ in range(repeats):
            sync()
            t0 = time.perf_counter()
            res = fn()
            sync()
            best = min(best, time.perf_counter() - t0)
        with Peak() as peak:
            fn()
        return res, best, peak.mib

    with tempfile.TemporaryDirectory() as tmp:
        model_dir = build_model(Path(tmp), args.model)
        model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype).to(device)
    names = sorted({n.rsplit(".", 1)[-1] for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)}
                   - {"lm_head"})
    model = get_peft_model(model, LoraConfig(r=args.lora_rank, lora_alpha=8, target_modules=names, lora_dropout=0.0))
    # B starts at 0 in PEFT, which makes every gradient of A zero; give B a trained-like scale
    gen = torch.Generator().manual_seed(0)
    for n, p in model.named_parameters():
        if "lora_B" in n:
            p.data.copy_((torch.randn(p.shape, generator=gen) * 0.02).to(p.dtype))
    targets = trainable_linears(model)
    n_trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)

    vocab = model.config.vocab_size
    ids = torch.randint(3, vocab, (args.batch, args.tokens), generator=gen).to(device)
    inputs = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    labels = ids.clone()
    labels[:, : args.tokens // 4] = -100  # a prompt part without loss, as in SFT

    sync()
    t0 = time.perf_counter()
    grads = per_sample_gradients(model, inputs, labels, targets)
    sync()
    fwd_bwd_s = time.perf_counter() - t0
    batch = args.batch
    del model  # only the captured activations are needed from here on
    print(f"{args.model} + LoRA r{args.lora_rank}: {n_trainable / 1e6:.2f}M trainable, forward + backward "
          f"of {batch} x {args.tokens} tokens: {fwd_bwd_s:.1f} s", flush=True)

    gram = exact_gram(grads)
    sub_layers = {f"layers.{i}." for i in range(args.dense_layers)}
    subset = grads.subset(lambda t: any(s in t.weight_name for s in sub_layers))
    sub_numel = sum(t.module.weight.numel() for t in subset.targets)
    sub_gram = exact_gram(subset)
    scale_up = n_trainable / sub_numel

    rows = []

    def add(method, seconds, mib, err, state_bytes, transient_bytes, note=""):
        rows.append({"method": method, "seconds_per_batch": seconds, "seconds_per_sample": seconds / batch,
                     "vs_forward_backward": seconds / fwd_bwd_s, "peak_added_mib": mib,
                     "transient_mib_computed": transient_bytes / 2**20,
                     "state_mib": state_bytes / 2**20, **err, "note": note})
        print(f"  {method:34s} {seconds:8.3f} s/batch ({seconds / fwd_bwd_s:6.2f}x fwd+bwd)  "
              f"cos err rms {err['cos_err_rms']:.4f} max {err['cos_err_max']:.4f}  {note}", flush=True)

    # forming the per-sample gradients alone (the part both dense methods share with the sketch)
    def form():
        total = 0.0
        for _, g in grads:
            total += float(g[0, 0])
        return total

    _, form_s, form_mib = timed(form)
    print(f"  forming per-sample gradients: {form_s:.3f} s/batch", flush=True)

    # count sketch, full and on the dense subset
    errs, sketch_s, sketch_mib, proj = [], None, None, None
    for s in range(args.seeds):
        proj = CountSketchProjector(args.proj_dim, seed=100 + s)
        out, sec, mib = timed(lambda p=proj: count_sketch(grads, p, batch, device))
        errs.append(errors(out, gram))
        if s == 0:
            sketch_s, sketch_mib, state = sec, mib, proj.memory_bytes()
    largest = max(t.module.weight.numel() for t in grads.targets)
    add("count sketch", sketch_s, sketch_mib, pooled(errs), state, 2 * batch * largest * 4)
    sub_errs = []
    for s in range(args.seeds):
        proj_s = CountSketchProjector(args.proj_dim, seed=100 + s)
        sub_errs.append(errors(count_sketch(subset, proj_s, batch, device), sub_gram))
    sketch_sub = pooled(sub_errs)

    # factored (LoGra-style)
    errs = []
    for s in range(args.seeds):
        fac = Factored(args.factored_k, CountSketchProjector(args.proj_dim, seed=200 + s), 300 + s, device)
        out, sec, mib = timed(lambda f=fac: f(grads, batch))
        errs.append(errors(out, gram))
        if s == 0:
            fac_s, fac_mib, fac_state = sec, mib, fac.state_bytes() + fac.projector.memory_bytes()
    add(f"factored (k={args.factored_k}) + sketch", fac_s, fac_mib, pooled(errs), fac_state,
        2 * batch * args.tokens * args.factored_k * 4 + batch * args.factored_k ** 2 * 4, "SGD gradients only")

    # dense, on the subset, extrapolated
    dense_rows = {}
    for kind in ("gaussian", "rademacher"):
        out, sec, mib = timed(lambda k=kind: dense(subset, args.proj_dim, 7, batch, device, k),
                                repeats=1)
        err = errors(out, sub_gram)
        dense_rows[kind] = err
        add(f"dense {kind} (extrapolated)", sec * scale_up, mib, err, 0,
            8192 * args.proj_dim * 5 + 2 * batch * largest * 4, f"{args.dense_layers} layer(s) x{scale_up:.0f}; errors on that subset")
    stored_gib = n_trainable * args.proj_dim * 4 / 2**30
    print(f"  (a stored dense matrix would take {stored_gib:.0f} GiB; count sketch on the same subset: "
          f"cos err rms {sketch_sub['cos_err_rms']:.4f})")

    result = {"benchmark": "projection", "model": args.model, "shape": shape_info_from(n_trainable, args),
              "device": str(device), "dtype": args.dtype, "threads": args.threads, "batch": batch,
              "tokens": args.tokens, "proj_dim": args.proj_dim, "lora_rank": args.lora_rank,
              "lora_layers": len(targets), "forward_backward_s": fwd_bwd_s, "form_per_sample_grads_s": form_s,
              "form_peak_added_mib": form_mib, "rows": rows,
              "dense_subset": {"layers": args.dense_layers, "coordinates": sub_numel,
                               "count_sketch_same_subset": sketch_sub},
              "stored_dense_matrix_gib": stored_gib,
              "sketch_error_bound_sqrt_2_over_k": math.sqrt(2 / args.proj_dim)}
    path = write_json(f"projection-{args.model}-{device.type}", result, args.out)
    print(f"wrote {path}")
    return result


def shape_info_from(n_trainable: int, args) -> dict:
    spec = SHAPES[args.model]
    info = dict(spec) if isinstance(spec, dict) else {"model": args.model}
    info["lora_trainable"] = n_trainable
    return info


if __name__ == "__main__":
    main()
