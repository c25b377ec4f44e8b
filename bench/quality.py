"""Benchmark: does selection beat random? A planted-relevance task on the tiny model (CPU, minutes).

    python bench/quality.py [--out bench/out/quality] [--steps-per-selection 10] [--selections 4]

Train set: the demo mixture (600 samples; the target task ``add`` is 15 %, plus 5 % corrupted
samples whose answers are junk). Eval set: 40 held-out ``add`` samples. Every selector trains the
same number of optimizer steps from the same tiny model; eval loss is measured on the eval set
along the way. Reported per run: eval loss at the end, precision of target-task samples among the
selected ones (per selection), share of noisy samples selected, and selection time. Writes
``results.md`` (a Markdown table) and ``eval_loss.png`` (eval loss vs step, one line per run) to
the output folder. This is a benchmark: nothing here asserts who wins.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
TARGET, NOISY = "add", "noisy"


def runs_to_make(seeds: list[int]) -> list[tuple[str, str, dict]]:
    from dataflex.selectors import SELECTORS

    runs = [(f"random (seed {s})", "random", {"seed": s}) for s in seeds]
    runs += [(f"loss focus={f}", "loss", {"focus": f}) for f in ("low", "medium", "high")]
    runs.append(("delta_loss", "delta_loss", {}))
    for name in ("less", "zeroth"):
        if name in SELECTORS:
            runs.append((name, name, {}))
    return runs


def components_file(folder: Path, runs) -> Path:
    comps = {}
    for label, selector, params in runs:
        p = {k: v for k, v in params.items() if k != "seed" or selector != "random"}
        if selector == "less":
            p.setdefault("proj_dim", 1024)
        comps[label.replace(" ", "_").replace("=", "_").replace("(", "").replace(")", "")] = {
            "name": selector, "params": p}
    path = folder / "components.yaml"
    path.write_text(yaml.safe_dump({"selectors": comps}, sort_keys=False))
    return path


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default=str(ROOT / "bench" / "out" / "quality"))
    ap.add_argument("--warmup-steps", type=int, default=10)
    ap.add_argument("--steps-per-selection", type=int, default=10)
    ap.add_argument("--selections", type=int, default=4)
    ap.add_argument("--seeds", type=int, nargs="+", default=[1, 2, 3])
    ap.add_argument("--lr", type=float, default=5e-3)
    ap.add_argument("--only", nargs="+", default=None, metavar="SELECTOR",
                    help="run only these selectors (e.g. --only random less)")
    args = ap.parse_args()

    from dataflex.demo import build_tiny_model

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", DISABLE_VERSION_CHECK="1",
               HF_HOME=str(out / "hf-home"))
    model = out / "tiny-qwen2"
    if not (model / "config.json").is_file():
        build_tiny_model(model, ROOT / "data")
    tasks = [r["task"] for r in json.loads((ROOT / "data" / "demo_mix_train.json").read_text())]
    runs = runs_to_make(args.seeds)
    if args.only:
        runs = [r for r in runs if r[1] in args.only]
    comp_path = components_file(out, runs)
    comp_keys = list(yaml.safe_load(comp_path.read_text())["selectors"])
    total = args.warmup_steps + args.steps_per_selection * args.selections

    results = []
    for (label, selector, params), key in zip(runs, comp_keys):
        run_dir = out / "runs" / key
        cfg = yaml.safe_load((ROOT / "examples" / "train_lora" / "quickstart_cpu.yaml").read_text())
        cfg.update({
            "model_name_or_path": str(model), "dataset_dir": str(ROOT / "data"), "output_dir": str(run_dir),
            "components_cfg_file": str(comp_path), "component_name": key,
            "warmup_step": args.warmup_steps, "update_step": args.steps_per_selection,
            "update_times": args.selections, "learning_rate": args.lr, "seed": params.get("seed", 42),
            "per_device_train_batch_size": 4, "gradient_accumulation_steps": 2, "cutoff_len": 96,
            "eval_strategy": "steps", "eval_steps": max(1, total // 5), "per_device_eval_batch_size": 16,
            "save_strategy": "no", "plot_loss": False, "logging_steps": 5,
        })
        cfg.pop("save_steps", None)
        cfg_path = out / f"{key}.yaml"
        cfg_path.write_text(yaml.safe_dump(cfg, sort_keys=False))
        print(f"[quality] {label} ...", flush=True)
        t0 = time.perf_counter()
        proc = subprocess.run([sys.executable, "-m", "dataflex.cli", "train", str(cfg_path)], env=env, cwd=ROOT,
                              capture_output=True, text=True)
        wall = time.perf_counter() - t0
        if proc.returncode != 0:
            print(proc.stderr[-3000:])
            raise SystemExit(f"run {label} failed")
        state = json.loads((run_dir / "trainer_state.json").read_text())
        evals = [(h["step"], h["eval_loss"]) for h in state["log_history"] if "eval_loss" in h]
        train_metrics = json.loads((run_dir / "train_results.json").read_text())
        folder = Path(json.loads((run_dir / "dataflex" / "run.json").read_text())["records"])  # this run's records
        recs = [json.loads(p.read_text()) for p in sorted(folder.glob("step_*.json"),
                                                           key=lambda p: int(p.stem.split("_")[1]))]
        if not recs:
            raise SystemExit(f"run {label}: no selection records in {folder}")
        precision = [sum(tasks[i] == TARGET for i in r["indices"]) / len(r["indices"]) for r in recs]
        noisy = [sum(tasks[i] == NOISY for i in r["indices"]) / len(r["indices"]) for r in recs]
        results.append({
            "label": label, "evals": evals, "final_eval": evals[-1][1] if evals else float("nan"),
            "precision": precision, "noisy": sum(noisy) / max(len(noisy), 1),
            "selection_s": train_metrics.get("dataflex_seconds", 0.0), "wall_s": wall,
        })

    base = sum(tasks[i] == TARGET for i in range(len(tasks))) / len(tasks)
    noisy_base = sum(t == NOISY for t in tasks) / len(tasks)
    lines = [
        f"Planted relevance: target task `{TARGET}` is {100 * base:.0f}% of the {len(tasks)} training samples, "
        f"noisy samples {100 * noisy_base:.0f}%; {total} optimizer steps x 8 samples per run "
        f"({args.warmup_steps} warm-up + {args.selections} x {args.steps_per_selection}).",
        "",
        "| run | eval loss (end) | target precision per selection | noisy share | selection s | run s |",
        "|---|---|---|---|---|---|",
    ]
    for r in results:
        prec = " / ".join(f"{p:.2f}" for p in r["precision"])
        lines.append(f"| {r['label']} | {r['final_eval']:.4f} | {prec} | {r['noisy']:.3f} | "
                     f"{r['selection_s']:.1f} | {r['wall_s']:.0f} |")
    table = "\n".join(lines)
    (out / "results.md").write_text(table + "\n")
    print(table)

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 5))
    for r in results:
        if r["evals"]:
            steps, losses = zip(*r["evals"])
            ax.plot(steps, losses, marker="o", label=r["label"], linestyle="--" if "random" in r["label"] else "-")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel(f"eval loss ({TARGET} task)")
    ax.set_title("Selection vs random on the planted-relevance demo")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out / "eval_loss.png", dpi=100)
    print(f"\nwritten: {out / 'results.md'}, {out / 'eval_loss.png'}")


if __name__ == "__main__":
    main()
