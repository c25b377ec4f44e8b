"""Benchmark: the cost of sample weighting per optimizer step, against plain training, in one run.

    python bench/weighting.py [--steps 24] [--hidden 256] [--layers 4] [--out bench/out]
    python bench/weighting.py --model smollm2 --steps 8 [--modes plain loss_global loss_micro]

Trains the same config four times through the real ``dataflex-cli train`` - plain LLaMA-Factory
(no train_type), ``custom`` (uniform weights: the weighted-loss correction only), ``loss`` with
``scope: global_batch`` (one extra no-grad forward of the step's samples) and ``loss`` with
``scope: micro_batch`` (signals from the training forward) - on a config-built Qwen2 with random
weights (timing needs no trained weights), one torch thread, and reports seconds per step and
each mode's ratio to plain training, measured in the same run. ``--model`` takes a bench shape
or ``smollm2`` (the real SmolLM2-135M-Instruct with its template) instead of the config-built
model. Results go to ``<out>/weighting.json`` (``weighting-<model>.json`` with ``--model``).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import SHAPES  # noqa: E402

MODES = ("plain", "custom", "loss_global", "loss_micro")


def _children_cpu() -> float:
    """User + system CPU seconds of this process's finished children."""
    import resource

    use = resource.getrusage(resource.RUSAGE_CHILDREN)
    return use.ru_utime + use.ru_stime


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--steps", type=int, default=24)
    ap.add_argument("--hidden", type=int, default=256)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--samples", type=int, default=400)
    ap.add_argument("--model", choices=list(SHAPES), default=None,
                    help="a bench shape or smollm2 (default: the config-built model of --hidden / --layers)")
    ap.add_argument("--modes", nargs="+", choices=list(MODES), default=list(MODES))
    ap.add_argument("--cutoff", type=int, default=256)
    ap.add_argument("--out", type=Path, default=ROOT / "bench" / "out")
    args = ap.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    from _common import build_model, mixed_length_data, template_for

    from dataflex.demo import build_tiny_model

    with tempfile.TemporaryDirectory(prefix="dataflex-weighting-") as tmp:
        tmp = Path(tmp)
        if args.model is None:
            model = build_tiny_model(tmp / "model", ROOT / "data", hidden_size=args.hidden, num_layers=args.layers)
        else:
            model = build_model(tmp, args.model)
        data = tmp / "data"
        data.mkdir()
        (data / "train.json").write_text(json.dumps(mixed_length_data(args.samples)))
        (data / "dataset_info.json").write_text(json.dumps({"bench": {"file_name": "train.json"}}))
        (tmp / "components.yaml").write_text(yaml.safe_dump({"weighters": {
            "custom": {"name": "custom"},
            "loss_global": {"name": "loss", "params": {"scope": "global_batch"}},
            "loss_micro": {"name": "loss", "params": {"scope": "micro_batch"}}}}))
        base = {"model_name_or_path": str(model), "stage": "sft", "do_train": True, "finetuning_type": "lora",
                "lora_target": "all", "lora_rank": 8, "dataset": "bench", "dataset_dir": str(data),
                "template": template_for(args.model or "demo"), "cutoff_len": args.cutoff, "preprocessing_num_workers": 1, "overwrite_cache": True,
                "report_to": "none", "per_device_train_batch_size": 4, "gradient_accumulation_steps": 2,
                "learning_rate": 1e-4, "max_steps": args.steps, "logging_steps": 1000, "save_steps": 100000,
                "bf16": False, "seed": 0}
        env = dict(os.environ, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", DISABLE_VERSION_CHECK="1",
                   HF_HOME=str(tmp / "hf"), OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
        modes = {"plain": {}} if "plain" in args.modes else {}
        for name in [m for m in args.modes if m != "plain"]:
            modes[name] = {"train_type": "dynamic_weight", "components_cfg_file": str(tmp / "components.yaml"),
                           "component_name": name, "warmup_step": 0}
        rows = {}
        for name, extra in modes.items():
            cfg = {**base, **extra, "output_dir": str(tmp / name)}
            path = tmp / f"{name}.yaml"
            path.write_text(yaml.safe_dump(cfg))
            cpu0 = _children_cpu()
            res = subprocess.run([sys.executable, "-m", "dataflex.cli", "train", str(path)], env=env,
                                 capture_output=True, text=True, timeout=1800)
            if res.returncode != 0:
                print(res.stderr[-3000:], file=sys.stderr)
                return 1
            metrics = json.loads((tmp / name / "all_results.json").read_text())
            rows[name] = {"seconds_per_step": metrics["train_runtime"] / args.steps,
                          "process_cpu_seconds": round(_children_cpu() - cpu0, 2),
                          "dataflex_seconds": metrics.get("dataflex_seconds", 0.0)}
            print(f"{name:<12} {rows[name]['seconds_per_step']:.3f} s/step", flush=True)
    plain = rows["plain"]["seconds_per_step"] if "plain" in rows else float("nan")
    for row in rows.values():
        row["ratio_to_plain"] = round(row["seconds_per_step"] / plain, 3)
        row["seconds_per_step"] = round(row["seconds_per_step"], 4)
        if "plain" in rows:  # CPU time barely moves with other jobs' load, wall time does; start-up included
            row["process_cpu_ratio_to_plain"] = round(row["process_cpu_seconds"] / rows["plain"]["process_cpu_seconds"], 3)
    import torch

    n_params = args.hidden * args.hidden * 12 * args.layers
    described = (f"Qwen2, hidden {args.hidden}, {args.layers} layers (~{n_params / 1e6:.1f}M layer parameters), "
                 "LoRA rank 8") if args.model is None else f"{args.model}, LoRA rank 8 on all linears"
    result = {"benchmark": "weighting overhead per step", "machine": platform.processor() or platform.machine(),
              "torch": torch.__version__, "threads": 1, "model": described, "global_batch": 8, "micro_batch": 4,
              "cutoff": args.cutoff, "steps": args.steps, "gradient_checkpointing": "LLaMA-Factory's default (on)",
              "goals": {"loss_global": 1.35, "loss_micro": 1.05}, "modes": rows}
    name = "weighting.json" if args.model is None else f"weighting-{args.model}.json"
    (args.out / name).write_text(json.dumps(result, indent=2))
    print(json.dumps(rows, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
