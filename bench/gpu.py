"""One command for a CUDA machine: everything a GPU can tell us, in under 10 minutes, as one table + JSON.

    python bench/gpu.py                 # on a machine with a CUDA GPU
    python bench/gpu.py --dry-run       # the same plan at the demo shape on the CPU, in tiny sizes (CI-checkable)

The plan (each step under its own time limit, and all of them within ``--budget`` seconds, 570 by
default: a step gets at most what is left; a failed or timed-out step is reported, the others run):

1. ``bench/scoring.py`` at the SmolLM2-135M, Qwen2.5-0.5B and Qwen2.5-1.5B shapes in bf16: loss scoring samples/s
   vs batch-1 and vs the floor (a bare batched forward of the same batches), peak GPU memory.
   The same 0.5B scoring in fp32, so bf16's gain is measured in the same session.
2. ``bench/less.py`` at the SmolLM2-135M and 0.5B shapes (bf16 frozen weights, fp32 LoRA): LESS features vs a training
   step's forward + backward and vs batch-1, peak GPU memory, and the LESS pass's peak against a training
   step's (gradient checkpointing on) at micro-batches 4 and 16; ``bench/projection.py`` at 0.5B: count
   sketch vs dense (all 24 layers, nothing extrapolated) vs factored projection on the GPU.
   ``bench/weighting.py`` at the SmolLM2-135M and 0.5B shapes: seconds per step of ``loss`` weighting
   (``scope: global_batch`` and ``micro_batch``) against plain LLaMA-Factory. The real SmolLM2 weights
   cannot be carried to a GPU machine, so its shape (random weights) stands in: speed and memory do not
   depend on the weights' values.
3. ``bench/zeroth.py --speed`` at the 0.5B shape: seconds per sample for K = 1, 4, 16 vs 2K forwards.
4. ``tests/e2e/test_deepspeed.py`` on the GPU (the ``gpu`` marker: ZeRO-2/3 selections equal the run without).
5. ``bench/real.py --full``: selection precision (level 1, every selector, 6 targets x 3 draws, plain and
   form-hard pools) and training quality (level 2: ``dataflex-cli compare`` cells for the four mode families
   on boolean_expressions and geometric_shapes, 3 seeds, 48 steps, equal steps and equal counted work) on the real
   SmolLM2-135M-Instruct with BBH tasks; it needs the asset and the BBH task files (``$DATAFLEX_BBH_DIR``
   or ``../shared/data/bbh`` on a machine without network), and on one GPU it takes longer than this plan's budget: run it on its own
   where it matters (``python bench/real.py --full``). The dry run prints and checks its grid.
6. An end-to-end ``dataflex-cli train`` of the seed's ``less.yaml`` shape (LoRA r16 on all linears,
   bf16, the Qwen2.5-0.5B shape with random weights, ZeRO-3 when 2+ GPUs): the selection's share of
   the wall time, from the run's own ``dataflex_seconds`` and ``train_runtime``.

Models are built from a config with random weights (no download). The table is printed and written
to ``<out>/gpu.json`` (default ``bench/out``), with the machine and versions.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import machine_info  # noqa: E402


def plan(dry: bool, out: Path) -> list[dict]:
    """The steps: a name, the command, its time limit and the JSON it leaves (if any)."""
    py = sys.executable
    if dry:  # the demo shape on the CPU, tiny sizes: checks the plumbing, measures nothing
        scoring = [("scoring demo (cpu)", [py, "bench/scoring.py", "--model", "demo", "--samples", "64",
                                           "--baseline-samples", "8", "--batch-sizes", "16", "--out", str(out)],
                    180, out / "scoring-demo-cpu.json")]
        zeroth = [("zeroth speed demo (cpu)", [py, "bench/zeroth.py", "--speed", "--model", "demo", "--train", "48",
                                               "--speed-ks", "1", "4", "--out", str(out)], 180,
                   out / "zeroth-speed-demo.json")]
        feats = [("less demo (cpu)", [py, "bench/less.py", "--model", "demo", "--samples", "48", "--baseline-samples",
                                      "8", "--repeats", "1", "--memory", "micro-batch", "--micro-batches", "2",
                                      "--out", str(out)], 180,
                  out / "less-demo.json"),
                 ("projection demo (cpu)", [py, "bench/projection.py", "--model", "demo", "--seeds", "1", "--out",
                                            str(out)], 180, out / "projection-demo-cpu.json")]
        weighting = [("weighting demo (cpu)", [py, "bench/weighting.py", "--model", "demo", "--steps", "2", "--modes",
                                               "plain", "loss_global", "--out", str(out)], 300,
                      out / "weighting-demo.json")]
        deepspeed = [("tests/e2e/test_deepspeed.py (collect only)",
                      [py, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-n", "0", "--collect-only",
                       "tests/e2e/test_deepspeed.py"], 120, None)]
        e2e_model, e2e_rows, e2e_extra = "demo", 24, {}
    else:
        scoring = [(f"scoring {m} bf16", [py, "bench/scoring.py", "--model", m, "--device", "cuda", "--dtype",
                                          "bfloat16", "--samples", "2000", "--baseline-samples", "200",
                                          "--batch-sizes", "16", "32", "64", "--out", str(out)], 150,
                    out / f"scoring-{m}-cuda.json") for m in ("smollm2-shape", "qwen2.5-0.5b", "qwen2.5-1.5b")]
        # the same 0.5B scoring in fp32: bf16's gain, measured in the same session (written under out/fp32)
        scoring.append(("scoring qwen2.5-0.5b fp32", [py, "bench/scoring.py", "--model", "qwen2.5-0.5b", "--device",
                                                      "cuda", "--samples", "1000", "--baseline-samples", "100",
                                                      "--batch-sizes", "32", "--out", str(out / "fp32")], 90,
                        out / "fp32" / "scoring-qwen2.5-0.5b-cuda.json"))
        # LESS also compares its pass's peak memory with a training step's at micro-batches 4 and 16
        # (each in a process of its own); the real SmolLM2 asset is not on the GPU machine, so its shape
        feats = [("less smollm2-shape bf16", [py, "bench/less.py", "--model", "smollm2-shape", "--device", "cuda",
                                              "--dtype", "bfloat16", "--samples", "600", "--baseline-samples", "60",
                                              "--repeats", "1", "--micro-batches", "4", "16", "--out", str(out)], 150,
                  out / "less-smollm2-shape-cuda.json"),
                 ("less qwen2.5-0.5b bf16", [py, "bench/less.py", "--model", "qwen2.5-0.5b", "--device", "cuda",
                                             "--dtype", "bfloat16", "--samples", "600", "--baseline-samples", "60",
                                             "--repeats", "1", "--micro-batches", "4", "16", "--out", str(out)], 180,
                  out / "less-qwen2.5-0.5b-cuda.json"),
                 ("projection qwen2.5-0.5b", [py, "bench/projection.py", "--model", "qwen2.5-0.5b", "--device", "cuda",
                                              "--batch", "16", "--tokens", "512", "--dense-layers", "24", "--out",
                                              str(out)], 90, out / "projection-qwen2.5-0.5b-cuda.json")]
        zeroth = [("zeroth speed qwen2.5-0.5b", [py, "bench/zeroth.py", "--speed", "--model", "qwen2.5-0.5b",
                                                 "--train", "200", "--out", str(out)], 90,
                   out / "zeroth-speed-qwen2.5-0.5b.json")]
        weighting = [(f"weighting {m}", [py, "bench/weighting.py", "--model", m, "--steps", "30", "--modes", "plain",
                                         "loss_global", "loss_micro", "--out", str(out)], 150,
                      out / f"weighting-{m}.json") for m in ("smollm2-shape", "qwen2.5-0.5b")]
        deepspeed = [("tests/e2e/test_deepspeed.py -m gpu", [py, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-n", "0",
                                                         "-m", "gpu", "tests/e2e/test_deepspeed.py"], 150, None)]
        e2e_model, e2e_rows = "qwen2.5-0.5b", 400
        e2e_extra = {"bf16": True}
    # selection quality on the real model (bench/real.py): the full grid needs the SmolLM2 asset and the
    # BBH task files ($DATAFLEX_BBH_DIR or ../shared/data/bbh); the dry run checks the plan
    real = [("real-model quality plan (SmolLM2 + BBH)", [py, "bench/real.py", "--full", "--plan-only"], 60,
             None)] if dry else [
        ("real-model quality (SmolLM2 + BBH, full grid)",
         [py, "bench/real.py", "--full", "--levels", "zeroth,1,2", "--out", str(out / "real-full")], 600,
         out / "real-full" / "level1.json")]
    steps = [{"name": n, "cmd": c, "limit": t, "json": j}
             for n, c, t, j in scoring + feats + weighting + zeroth + deepspeed + real]
    steps.append({"name": f"e2e less train ({e2e_model})", "e2e": (e2e_model, e2e_rows, e2e_extra),
                  "limit": 120 if dry else 150, "json": None})
    return steps


def e2e_less(model_shape: str, rows: int, extra: dict, limit: float, work: Path) -> dict:
    """``dataflex-cli train`` with the seed's less.yaml settings at ``model_shape``; selection share."""
    import yaml

    from _common import build_model, mixed_length_data

    model = build_model(work, model_shape)
    data = work / "data"
    data.mkdir(parents=True, exist_ok=True)
    (data / "train.json").write_text(json.dumps(mixed_length_data(rows)))
    (data / "eval.json").write_text(json.dumps(mixed_length_data(16, seed=1)))
    (data / "dataset_info.json").write_text(json.dumps({"t": {"file_name": "train.json"},
                                                        "e": {"file_name": "eval.json"}}))
    comps = work / "components.yaml"
    comps.write_text(yaml.safe_dump({"selectors": {"less": {"name": "less", "params": {
        "gradient_type": "adam", "proj_dim": 4096, "seed": 123}}}}))
    import torch

    gpus = torch.cuda.device_count()
    cfg = {"model_name_or_path": str(model), "stage": "sft", "do_train": True, "finetuning_type": "lora",
           "lora_target": "all", "lora_rank": 16, "lora_alpha": 8, "dataset": "t", "eval_dataset": "e",
           "dataset_dir": str(data), "template": "default", "cutoff_len": 512, "overwrite_cache": True,
           "preprocessing_num_workers": 1, "seed": 42, "output_dir": str(work / "out"), "overwrite_output_dir": True,
           "logging_steps": 10, "save_strategy": "no", "report_to": "none", "per_device_train_batch_size": 1,
           "gradient_accumulation_steps": 1, "learning_rate": 1e-4, "lr_scheduler_type": "cosine",
           "warmup_ratio": 0.1, "bf16": False, "train_type": "dynamic_select", "components_cfg_file": str(comps),
           "component_name": "less", "warmup_step": 10, "update_step": 10, "update_times": 2, **extra}
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", DISABLE_VERSION_CHECK="1",
               HF_HOME=str(work / "hf"))
    if gpus >= 2:
        cfg["deepspeed"] = str(ROOT / "examples" / "deepspeed" / "ds_z3_config.json")
        env.update(FORCE_TORCHRUN="1", NPROC_PER_NODE=str(gpus))
    (work / "less.yaml").write_text(yaml.safe_dump(cfg, sort_keys=False))
    proc = subprocess.run(["dataflex-cli", "train", str(work / "less.yaml")], env=env, cwd=ROOT, capture_output=True,
                          text=True, timeout=limit)
    if proc.returncode != 0:
        raise RuntimeError("\n".join(proc.stderr.strip().splitlines()[-8:]))
    res = json.loads((work / "out" / "train_results.json").read_text())
    sel, total = res.get("dataflex_seconds", 0.0), res.get("train_runtime", 0.0)
    return {"model": model_shape, "gpus": gpus, "deepspeed": "zero3" if gpus >= 2 else None,
            "selection_s": sel, "train_runtime_s": total, "selection_share": sel / total if total else None,
            "steps": 30, "rows": rows}


def summary_of(step: dict, data: dict | None) -> str:
    if data is None:
        return ""
    if data.get("benchmark") == "scoring":
        best = max(data["rows"], key=lambda r: r["engine_samples_s"])
        mem = f", peak {data['peak_gpu_mib']:.0f} MiB" if data.get("peak_gpu_mib") else ""
        return (f"{best['engine_samples_s']:.0f} samples/s at bs {best['batch_size']}: x{best['engine_vs_batch1']:.1f} "
                f"batch-1, {best['engine_vs_floor']:.2f} of floor{mem}")
    if data.get("benchmark") == "less":
        mem = f", peak {data['peak_gpu_mib_batched']:.0f} MiB" if data.get("peak_gpu_mib_batched") else ""
        mem += "".join(f"; micro-batch {r['rows']}: x{r['less_vs_train']:.2f} a training step's peak"
                       for r in data.get("micro_batch_memory", []))
        return (f"{data['batched_samples_s']:.0f} samples/s: x{data['vs_batch1']:.1f} batch-1, "
                f"x{data['seconds_vs_floor']:.2f} of a training step's fwd+bwd{mem}")
    if data.get("benchmark") == "weighting overhead per step":
        return ", ".join(f"{name} x{row['ratio_to_plain']:.2f}" for name, row in data["modes"].items()
                         if name != "plain") + " of plain per step"
    if data.get("benchmark") == "projection":
        return "; ".join(f"{r['method'].split(' (')[0]} {r['seconds_per_batch']:.3f}s, cos err {r['cos_err_rms']:.3f}"
                         for r in data["rows"])
    if data.get("benchmark") == "zeroth-speed":
        return ", ".join(f"K={r['K']}: x{r['vs_floor']:.2f} floor" for r in data["rows"])
    if "selection_share" in data:
        share = data["selection_share"]
        return (f"selection {data['selection_s']:.1f}s of {data['train_runtime_s']:.1f}s "
                f"({100 * share:.0f} %)" if share is not None else "no timing")
    return ""


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--dry-run", action="store_true", help="the plan at the demo shape on the CPU, tiny sizes")
    ap.add_argument("--out", type=Path, default=ROOT / "bench" / "out")
    ap.add_argument("--budget", type=float, default=570.0,
                    help="seconds for the whole plan: a step gets at most what is left, and is skipped under 20 s")
    args = ap.parse_args(argv)
    import torch

    if not args.dry_run and not torch.cuda.is_available():
        print("bench/gpu.py: no CUDA device here; run it on a GPU machine, or use --dry-run to check the plan",
              file=sys.stderr)
        return 2
    args.out.mkdir(parents=True, exist_ok=True)
    results = []
    t_all = time.perf_counter()
    for step in plan(args.dry_run, args.out):
        t0 = time.perf_counter()
        status, detail, data = "ok", "", None
        left = args.budget - (t0 - t_all)
        if not args.dry_run and left < 20:
            results.append({"step": step["name"], "status": "skipped", "seconds": 0.0,
                            "summary": f"the {args.budget:.0f} s budget is spent", "data": None})
            print(f"[gpu] {step['name']}: skipped (budget spent)", flush=True)
            continue
        if not args.dry_run:
            step["limit"] = min(step["limit"], left)
        try:
            if "e2e" in step:
                with tempfile.TemporaryDirectory(prefix="dataflex-gpu-") as work:
                    data = e2e_less(*step["e2e"], step["limit"], Path(work))
            else:
                proc = subprocess.run(step["cmd"], cwd=ROOT, capture_output=True, text=True, timeout=step["limit"],
                                      env=dict(os.environ, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1"))
                if proc.returncode != 0:
                    status = "failed"
                    detail = "\n".join((proc.stdout + proc.stderr).strip().splitlines()[-5:])
                elif step["json"] is not None:
                    data = json.loads(Path(step["json"]).read_text())
                else:
                    detail = (proc.stdout.strip().splitlines() or [""])[-1]
        except subprocess.TimeoutExpired:
            status, detail = "timed out", f"over {step['limit']} s"
        except Exception as err:  # noqa: BLE001 - one failed step must not hide the others
            status, detail = "failed", f"{type(err).__name__}: {err}"
        seconds = time.perf_counter() - t0
        results.append({"step": step["name"], "status": status, "seconds": round(seconds, 1),
                        "summary": summary_of(step, data) or detail, "data": data})
        print(f"[gpu] {step['name']}: {status} in {seconds:.0f}s {results[-1]['summary']}", flush=True)
    lines = ["| step | status | seconds | result |", "|---|---|---|---|"]
    lines += [f"| {r['step']} | {r['status']} | {r['seconds']:.0f} | {r['summary'].replace('|', '/')} |"
              for r in results]
    table = "\n".join(lines)
    print(table)
    path = args.out / "gpu.json"
    path.write_text(json.dumps({"dry_run": args.dry_run, "machine": machine_info(), "steps": results,
                                "seconds": round(time.perf_counter() - t_all, 1), "table": table}, indent=1))
    print(f"written: {path}")
    return 0 if all(r["status"] == "ok" for r in results) else 1


if __name__ == "__main__":
    raise SystemExit(main())
