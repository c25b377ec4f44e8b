"""Shared set-up for the benchmarks: the tiny demo model and demo data through LLaMA-Factory."""

from __future__ import annotations

import json
import os
import random
import time
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


# Model shapes for timing. Timing needs no trained weights, so every shape but the demo and the real
# asset is a Qwen2 (or Llama) built from its config with random weights (nothing is downloaded). The
# demo tokenizer is used with them: its ids are valid for every vocabulary below, and the real
# vocabulary size keeps the output layer's cost.
SHAPES = {
    "demo": None,  # the ~100k-parameter demo model (dataflex.demo.build_tiny_model)
    # the real SmolLM2-135M-Instruct (dataflex.assets) with its own tokenizer and template: not a
    # shape but the converted weights, for machines that hold the asset
    "smollm2": "asset",
    "50m": dict(hidden_size=512, intermediate_size=1408, num_hidden_layers=12, num_attention_heads=8,
                num_key_value_heads=2, vocab_size=32000, tie_word_embeddings=True),
    "qwen2.5-0.5b": dict(hidden_size=896, intermediate_size=4864, num_hidden_layers=24, num_attention_heads=14,
                         num_key_value_heads=2, vocab_size=151936, tie_word_embeddings=True, rope_theta=1e6),
    "qwen2.5-1.5b": dict(hidden_size=1536, intermediate_size=8960, num_hidden_layers=28, num_attention_heads=12,
                         num_key_value_heads=2, vocab_size=151936, tie_word_embeddings=True, rope_theta=1e6),
    # SmolLM2-135M's architecture (Llama, grouped-query attention, tied embeddings) with random weights:
    # for machines that cannot hold the real asset (the GPU machine); speed and memory do not depend on
    # the weights' values.
    "smollm2-shape": dict(architecture="llama", hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
                          num_attention_heads=9, num_key_value_heads=3, vocab_size=49152, tie_word_embeddings=True,
                          rope_theta=1e5),
}


def template_for(shape: str) -> str:
    """The LLaMA-Factory template a model of ``shape`` is trained with."""
    if SHAPES.get(shape) == "asset":
        from dataflex.assets import ASSETS

        return ASSETS[shape].template
    return "default"


def build_model(folder: Path, shape: str = "demo") -> Path:
    """The demo tokenizer with a model of ``shape`` (see SHAPES), saved under ``folder``; for the
    real asset, its cached folder (fetched once per machine)."""
    from dataflex.demo import build_tiny_model

    if shape not in SHAPES:
        raise SystemExit(f"--model: unknown shape {shape!r}; allowed: {', '.join(SHAPES)}")
    if SHAPES[shape] == "asset":
        from dataflex.assets import fetch_locked

        return fetch_locked(shape)
    model_dir = build_tiny_model(folder / "tiny", ROOT / "data")
    if SHAPES[shape] is None:
        return model_dir
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

    tok = AutoTokenizer.from_pretrained(model_dir)
    out = folder / shape
    tok.save_pretrained(out)
    torch.manual_seed(0)
    spec = dict(SHAPES[shape])
    config_cls, model_cls = ((LlamaConfig, LlamaForCausalLM) if spec.pop("architecture", "qwen2") == "llama"
                             else (Qwen2Config, Qwen2ForCausalLM))
    config = config_cls(max_position_embeddings=4096, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
                        bos_token_id=tok.eos_token_id, **spec)
    with torch.device("meta"):
        model_cls(config)  # fail fast on a bad config before allocating
    model_cls(config).save_pretrained(out)
    return out


def shape_info(model) -> dict:
    """Parameters and layout of a loaded model, for the JSON records."""
    cfg = model.config
    return {"parameters": sum(p.numel() for p in model.parameters()),
            "trainable": sum(p.numel() for p in model.parameters() if p.requires_grad),
            "hidden_size": cfg.hidden_size, "layers": cfg.num_hidden_layers, "vocab_size": cfg.vocab_size}


def machine_info() -> dict:
    """Machine and versions, so figures from different runs can be told apart."""
    import platform

    import torch

    info = {"platform": platform.platform(), "python": platform.python_version(), "cpus": os.cpu_count(),
            "torch": torch.__version__, "threads": torch.get_num_threads(),
            "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None}
    from dataflex.versions import versions

    info.update({pkg: v for pkg, v in versions().items() if pkg not in info})
    return info


def write_json(name: str, result: dict, out: str | os.PathLike | None = None) -> Path:
    """``bench/out/<name>.json`` (or under ``out``) with the machine and versions added."""
    folder = Path(out) if out else ROOT / "bench" / "out"
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{name}.json"
    path.write_text(json.dumps({**result, "machine": machine_info(), "written": time.strftime("%Y-%m-%d %H:%M")},
                               indent=1) + "\n")
    return path


def pipeline(tmp: str, n_train: int, cutoff: int = 256, eval_file: str | None = None, model: str = "demo",
             **overrides):
    """Build a model of shape ``model`` and tokenize ``n_train`` mixed-length samples with LLaMA-Factory."""
    from dataflex.diagnostics import load_pipeline

    tmp_path = Path(tmp)
    model_dir = build_model(tmp_path, model)
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
        "template": template_for(model),
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


def at_step(curve: list[dict], step: float, key: str) -> float:
    """``key`` at ``step`` by linear interpolation between checkpoints (clamped to the last one)."""
    pts = [(c["step"], c[key]) for c in curve]
    if step >= pts[-1][0]:
        return pts[-1][1]
    for (s0, v0), (s1, v1) in zip(pts, pts[1:]):
        if s0 <= step <= s1:
            return v0 + (v1 - v0) * (step - s0) / (s1 - s0)
    return pts[0][1]
