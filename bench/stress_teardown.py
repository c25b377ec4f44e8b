"""Stress test of the end of two-process runs: N short runs in a row, every one must exit 0 with its model.

The defect it guards against: a rank that finishes first died with ``terminate called without an
active exception`` (SIGABRT) while its peer was still writing, torchrun stopped the peer, and the
final adapter was lost (seen about once in 40 runs). The fix (dataflex.launcher.exit_without_teardown
and the barrier after the workflow's last step) is checked here by brute force:

    python bench/stress_teardown.py --runs 50            # about 25 minutes on 2 CPU cores
    python bench/stress_teardown.py --runs 3 --out /tmp/s # a quick look

Each run trains the tiny model for 6 steps on 2 gloo processes (random selector, plot_loss on),
so rank 0 has work of its own (plots) at the end while rank 1 is done. The result - runs,
failures, and the exit code and last error line of each failed run - goes to
``<out>/stress_teardown.json``.
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

import yaml

ROOT = Path(__file__).resolve().parents[1]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", type=int, default=50)
    ap.add_argument("--out", type=Path, default=ROOT / "bench" / "out")
    ap.add_argument("--timeout", type=float, default=300, help="seconds one run may take")
    args = ap.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    from dataflex.demo import build_tiny_model

    with tempfile.TemporaryDirectory(prefix="dataflex-stress-") as tmp:
        tmp = Path(tmp)
        model = build_tiny_model(tmp / "tiny", ROOT / "data")
        env = dict(os.environ, FORCE_TORCHRUN="1", NPROC_PER_NODE="2", HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1",
                   DISABLE_VERSION_CHECK="1", HF_HOME=str(tmp / "hf"), OMP_NUM_THREADS="1",
                   PYTHONFAULTHANDLER="1")
        failures, seconds = [], []
        for i in range(args.runs):
            out_dir = tmp / f"run{i}"
            cfg = {"model_name_or_path": str(model), "stage": "sft", "do_train": True, "finetuning_type": "lora",
                   "lora_target": "all", "lora_rank": 4, "dataset": "demo_mix", "dataset_dir": str(ROOT / "data"),
                   "template": "default", "cutoff_len": 64, "max_samples": 64, "overwrite_cache": True,
                   "preprocessing_num_workers": 1, "output_dir": str(out_dir), "overwrite_output_dir": True,
                   "report_to": "none", "per_device_train_batch_size": 2, "gradient_accumulation_steps": 1,
                   "learning_rate": 1e-3, "save_steps": 3, "logging_steps": 1, "bf16": False, "plot_loss": True,
                   "train_type": "dynamic_select", "component_name": "random", "warmup_step": 2,
                   "update_step": 2, "update_times": 2, "num_train_epochs": 1.0}
            path = tmp / f"run{i}.yaml"
            path.write_text(yaml.safe_dump(cfg))
            start = time.perf_counter()
            try:
                res = subprocess.run([sys.executable, "-m", "dataflex.cli", "train", str(path)], env=env,
                                     capture_output=True, text=True, timeout=args.timeout)
                code, text = res.returncode, res.stdout + res.stderr
            except subprocess.TimeoutExpired as err:
                code, text = "timeout", (err.stdout or b"").decode() + (err.stderr or b"").decode()
            seconds.append(round(time.perf_counter() - start, 1))
            ok = code == 0 and (out_dir / "adapter_model.safetensors").is_file()
            if not ok:
                lines = [ln for ln in text.splitlines() if "error" in ln.lower() or "terminate" in ln or "Signal" in ln]
                failures.append({"run": i, "exit": code, "lines": lines[-5:]})
            print(f"run {i + 1}/{args.runs}: {'ok' if ok else 'FAILED'} in {seconds[-1]}s", flush=True)
    result = {"runs": args.runs, "failures": len(failures), "failed": failures,
              "seconds_per_run": round(sum(seconds) / max(len(seconds), 1), 1)}
    (args.out / "stress_teardown.json").write_text(json.dumps(result, indent=2))
    print(json.dumps({k: v for k, v in result.items() if k != "failed"}))
    return 1 if failures else 0


if __name__ == "__main__":
    raise SystemExit(main())
