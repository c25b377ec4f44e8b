"""Benchmark: where DoReMi and ODM move the mixture on the demo text domains (stage: pt), in one run.

    python bench/mixing.py [--steps 60] [--out bench/out]

Three domains that differ clearly: encyclopedia-like prose (``wiki_demo``), Python functions
(``demo_code``) and arithmetic (``demo_arith``). Trains, through the real ``dataflex-cli train``:
DoReMi step 1 (a reference on uniform proportions), DoReMi step 2 (the proxy, domain weights
updated every 5 steps), and ODM (proportions updated every step), all from the same tiny model,
and records how the weights move and each domain's training loss. Writes
``<out>/mixing.json``, ``<out>/mixing.md`` and ``<out>/mixing.png``. Not a test: which domain wins
depends on the data and the model, and this is what it shows here.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
DOMAINS = ["wiki_demo", "demo_code", "demo_arith"]


def _records(out: Path) -> list[dict]:
    from dataflex.report import read_run

    return sorted(read_run(out).step_records(), key=lambda r: r["step"])


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--steps", type=int, default=60)
    ap.add_argument("--out", type=Path, default=ROOT / "bench" / "out")
    args = ap.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    from dataflex.demo import build_tiny_model

    with tempfile.TemporaryDirectory(prefix="dataflex-mixing-") as tmp:
        tmp = Path(tmp)
        model = build_tiny_model(tmp / "model", ROOT / "data", hidden_size=96, num_layers=2)
        env = dict(os.environ, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", DISABLE_VERSION_CHECK="1",
                   HF_HOME=str(tmp / "hf"), OMP_NUM_THREADS="1")
        base = {"model_name_or_path": str(model), "stage": "pt", "do_train": True, "finetuning_type": "full",
                "dataset": ",".join(DOMAINS), "dataset_dir": str(ROOT / "data"), "template": "default",
                "cutoff_len": 64, "preprocessing_num_workers": 1, "overwrite_cache": True, "report_to": "none",
                "per_device_train_batch_size": 4, "gradient_accumulation_steps": 2, "learning_rate": 2e-3,
                "max_steps": args.steps, "logging_steps": 5, "save_steps": 100000, "bf16": False, "seed": 0,
                "train_type": "dynamic_mix", "warmup_step": 5, "update_step": 5, "update_times": -1}
        comps = tmp / "components.yaml"

        def train(name: str, **extra) -> Path:
            cfg = {**base, **extra, "output_dir": str(tmp / name), "components_cfg_file": str(comps)}
            path = tmp / f"{name}.yaml"
            path.write_text(yaml.safe_dump(cfg))
            res = subprocess.run([sys.executable, "-m", "dataflex.cli", "train", str(path)], env=env,
                                 capture_output=True, text=True, timeout=1800)
            if res.returncode != 0:
                raise SystemExit(res.stderr[-3000:])
            print(f"trained {name}", flush=True)
            return tmp / name

        comps.write_text(yaml.safe_dump({"mixers": {"static": {"name": "static"}}}))
        reference = train("reference", component_name="static", static_mix=True)
        comps.write_text(yaml.safe_dump({"mixers": {
            "static": {"name": "static"},
            "doremi": {"name": "doremi", "params": {"reference_model_path": str(reference), "reweight_eta": 1.0,
                                                     "reweight_eps": 1e-3}},
            "odm": {"name": "odm", "params": {"alpha": 0.9}}}}))
        doremi = train("doremi", component_name="doremi")
        odm = train("odm", component_name="odm")
        weights = json.loads((doremi / "doremi_domain_weights.json").read_text())
        result = {"domains": DOMAINS, "steps": args.steps, "global_batch": 8,
                  "doremi": {"average_domain_weights": weights["weights"],
                             "updates": [{"step": r["step"], "alpha": r["loss_weights"],
                                          "excess_loss": r["summary"]["excess_loss"]}
                                         for r in _records(doremi) if r["kind"] == "update"]},
                  "odm": {"updates": [{"step": r["step"], "proportions": r["proportions"],
                                       "domain_loss": r["summary"].get("domain_loss")}
                                      for r in _records(odm) if r["kind"] == "update"]}}
    (args.out / "mixing.json").write_text(json.dumps(result, indent=2))
    last_odm = result["odm"]["updates"][-1]["proportions"]
    lines = ["| domain | DoReMi ᾱ (step 2 output) | DoReMi final α | ODM final proportions |", "|---|---|---|---|"]
    final_alpha = result["doremi"]["updates"][-1]["alpha"]
    for d, name in enumerate(DOMAINS):
        lines.append(f"| {name} | {weights['weights'][d]:.3f} | {final_alpha[d]:.3f} | {last_odm[d]:.3f} |")
    (args.out / "mixing.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, (a, b) = plt.subplots(1, 2, figsize=(11, 4), sharey=True)
        for d, name in enumerate(DOMAINS):
            a.plot([u["step"] for u in result["doremi"]["updates"]], [u["alpha"][d] for u in result["doremi"]["updates"]],
                   label=name)
            b.plot([u["step"] for u in result["odm"]["updates"]], [u["proportions"][d] for u in result["odm"]["updates"]],
                   label=name)
        a.set_title("DoReMi step 2: domain weights α")
        b.set_title("ODM: sampling proportions")
        for ax in (a, b):
            ax.set_xlabel("optimizer step")
            ax.legend()
        a.set_ylabel("weight")
        fig.tight_layout()
        fig.savefig(args.out / "mixing.png", dpi=100)
    except ImportError:
        pass
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
