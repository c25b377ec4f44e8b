"""Level 2 on BBH through ``dataflex-cli compare``: does a weighter or an ordering beat plain training
on a BBH task SmolLM2 can learn, at equal steps, over seeds?

    python bench/bbh_level2.py --target boolean_expressions --family weight
    python bench/bbh_level2.py --target boolean_expressions --family reorder --seeds 3

The target's questions are split as the ceiling probe splits them (``bench/bbh_probe.py``: the same
seeded held-out questions, ``--train`` training rows); the training rows are the task's own, the eval
set its held-out questions. Every method trains through the ordinary ``dataflex-cli train`` path that
``dataflex.compare`` drives (LoRA r16 on all linears, lr 5e-4 constant, batch 8, ``--steps`` steps), and
is scored by multiple-choice accuracy over the task's answer set (one forward per question) against
``plain`` (LLaMA-Factory's own sampler and loss), with intervals over seeds and a verdict per method.
Weighters and orderings spend no compute of their own beyond the step's forward (the ``loss``
weighters reuse it; a ``static`` length order is computed once), so equal steps is equal compute here.

Resumable (compare skips finished runs). Output: ``bench/out/bbh-level2/<target>-<family>/`` with
``compare.json``, ``table.md`` and the runs.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("DISABLE_VERSION_CHECK", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import bbh_probe  # noqa: E402
import mc_tasks as mt  # noqa: E402
from _common import ROOT  # noqa: E402

FAMILIES = {
    # train_type, the component the config names, the methods compared with plain
    "weight": ("dynamic_weight", "loss", ["loss", "adapt", "joint_update_aware"]),
    "reorder": ("dynamic_reorder", "static", ["static:score=length:order=ascending", "dynamic"]),
}


def write_config(folder: Path, model: Path, target: str, args) -> Path:
    import yaml

    from dataflex.assets import ASSETS

    data = folder / "data"
    summary = bbh_probe.write_data(data, target, mt.fetch_bbh([target])[target], args)
    info = {"bbh_train": {"file_name": "train.json"}, "bbh_test": {"file_name": "test.json"}}
    (data / "dataset_info.json").write_text(json.dumps(info, indent=1))
    train_type, component, _ = FAMILIES[args.family]
    cfg = {"model_name_or_path": str(model), "stage": "sft", "do_train": True, "finetuning_type": "lora",
           "lora_target": "all", "lora_rank": 16, "lora_alpha": 32, "dataset": "bbh_train",
           "eval_dataset": "bbh_test", "dataset_dir": str(data), "template": ASSETS["smollm2"].template,
           "cutoff_len": 512, "preprocessing_num_workers": 1, "overwrite_cache": True,
           "output_dir": str(folder / "unused"), "report_to": "none", "bf16": False,
           "per_device_train_batch_size": 8, "gradient_accumulation_steps": 1, "learning_rate": args.lr,
           "lr_scheduler_type": "constant", "max_steps": args.steps, "logging_steps": 1,
           "dataloader_num_workers": 0, "disable_gradient_checkpointing": True, "plot_loss": False,
           "train_type": train_type, "component_name": component,
           "components_cfg_file": str(ROOT / "src" / "dataflex" / "configs" / "components.yaml"),
           "warmup_step": 0}
    path = folder / "config.yaml"
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    (folder / "data.json").write_text(json.dumps(summary, indent=1))
    return path


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--target", default="boolean_expressions", help=f"one of {', '.join(mt.BBH_MC)}")
    ap.add_argument("--family", choices=sorted(FAMILIES), default="weight")
    ap.add_argument("--methods", default=None, help="comma-separated, compared with plain (default: the family's)")
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--steps", type=int, default=24)
    ap.add_argument("--train", type=int, default=96)
    ap.add_argument("--test", type=int, default=100)
    ap.add_argument("--seed", type=int, default=0, help="the split's seed (the probe's)")
    ap.add_argument("--lr", type=float, default=5e-4)
    ap.add_argument("--eval-every", type=int, default=None)
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args(argv)
    if args.target not in mt.BBH_MC:
        ap.error(f"--target: {args.target} is not a multiple-choice BBH task; choose from {', '.join(mt.BBH_MC)}")
    from dataflex.assets import fetch_locked
    from dataflex.compare import run

    out = args.out or ROOT / "bench" / "out" / "bbh-level2" / f"{args.target}-{args.family}"
    out.mkdir(parents=True, exist_ok=True)
    config = write_config(out, fetch_locked("smollm2"), args.target, args)
    methods = ["plain", *(args.methods.split(",") if args.methods else FAMILIES[args.family][2])]
    options = {"eval_every": args.eval_every} if args.eval_every else {}
    data = run(str(config), ",".join(methods), seeds=args.seeds, budget="steps", metric="choice",
               out=str(out / "compare"), **options)
    from dataflex.compare.runner import text_report

    text = text_report(data)
    # the comparison's record beside its table (the runs themselves stay untracked under compare/)
    (out / "compare.json").write_text((out / "compare" / "compare.json").read_text())
    (out / "table.md").write_text(f"`python bench/bbh_level2.py --target {args.target} --family {args.family} "
                                  f"--seeds {args.seeds} --steps {args.steps}`\n\n```text\n{text}\n```\n")
    print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
