"""Shared set-up for the benchmarks: the tiny demo model and demo data through LLaMA-Factory."""

from __future__ import annotations

import json
import random
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def mixed_length_data(n: int, seed: int = 0) -> list[dict]:
    """``n`` demo samples whose lengths vary a lot (1 to 12 demo tasks per sample)."""
    from dataflex.demo import generate_demo_data

    pool = []
    s = seed
    while len(pool) < n * 2:
        pool += [r for r in generate_demo_data(seed=s)["demo_mix_train.json"] if r["task"] != "noisy"]
        s += 1
    rng = random.Random(seed)
    out = []
    for i in range(n):
        k = rng.choice([1, 1, 1, 2, 3, 6, 12])
        parts = rng.sample(pool, k)
        out.append({
            "instruction": parts[0]["instruction"],
            "input": "\n".join(p["input"] for p in parts),
            "output": "\n".join(p["output"] for p in parts),
        })
    return out


def pipeline(tmp: str, n_train: int, cutoff: int = 256, eval_file: str | None = None, **overrides):
    """Build the tiny model and tokenize ``n_train`` mixed-length samples with LLaMA-Factory."""
    from dataflex.demo import build_tiny_model
    from dataflex.integration import load_pipeline

    tmp_path = Path(tmp)
    model_dir = build_tiny_model(tmp_path / "tiny", ROOT / "data")
    data_dir = tmp_path / "data"
    data_dir.mkdir(exist_ok=True)
    (data_dir / "bench_train.json").write_text(json.dumps(mixed_length_data(n_train)))
    info = {"bench_train": {"file_name": "bench_train.json"}}
    if eval_file:
        info["bench_eval"] = {"file_name": str(Path(eval_file).resolve())}
    (data_dir / "dataset_info.json").write_text(json.dumps(info))
    cfg = {
        "model_name_or_path": str(model_dir),
        "stage": "sft",
        "do_train": True,
        "finetuning_type": "lora",
        "lora_target": "all",
        "lora_rank": 8,
        "dataset": "bench_train",
        "dataset_dir": str(data_dir),
        "template": "default",
        "cutoff_len": cutoff,
        "preprocessing_num_workers": 1,
        "output_dir": str(tmp_path / "out"),
        "overwrite_output_dir": True,
        "report_to": "none",
        "bf16": False,
    }
    if eval_file:
        cfg["eval_dataset"] = "bench_eval"
    cfg.update(overrides)
    return load_pipeline(cfg)
