"""Level 2 on BBH through ``dataflex-cli compare``: does a method beat its mode's baseline on a BBH task
SmolLM2 can learn, at equal steps and at equal counted work, over seeds? One cell is a target and a family:

    python bench/bbh_level2.py --target boolean_expressions --family weight     # plain vs loss / adapt / jua
    python bench/bbh_level2.py --target geometric_shapes --family reorder       # plain vs static / dynamic orders
    python bench/bbh_level2.py --target geometric_shapes --family select        # random vs less / near / loss
    python bench/bbh_level2.py --target geometric_shapes --family mix           # static vs odm / random
    python bench/bbh_level2.py --target boolean_expressions --family doremi     # static vs DoReMi's chain
    python bench/bbh_level2.py --verdicts                                       # verdict table + curves of every cell

* ``weight`` / ``reorder``: the training rows are the target's own (``--train``), split as the ceiling probe
  splits them (``bench/bbh_probe.py``: the same seeded held-out questions); the baseline is ``plain``
  (LLaMA-Factory's own sampler and loss). These methods do no decision work beyond the step's forward, so
  equal steps is equal compute.
* ``select``: a pool of the target and three other BBH tasks (half of ``--train`` rows each); less and loss
  score ``--candidate-pool`` rows of it per decision (near embeds all of it); the selectors see a few-shot
  eval set of the target (``--n-eval`` rows) and are measured on the target's held-out questions, with the
  other tasks' held-out questions as forgetting; baseline ``random``. Equal steps, and equal counted work
  (3 x trained tokens plus the selectors' own forward / backward token passes, so the verdict holds on a loaded
  machine): each selector's earliest checkpoint that did at least random's whole run's work against random's
  end (``equal_work.json``); ``--budget both`` also trains random on to twice the steps (compare's own way).
* ``mix``: the same four tasks as domains (one dataset each); baseline ``static`` (uniform); measured on
  all domains' held-out questions, with the per-domain accuracy and the worst domain beside the mean. The
  mixers score nothing of their own (odm is rewarded by the step's own loss), so equal steps is equal work.
  ``dynamic_moe`` needs a mixture-of-experts model (SmolLM2 is dense): not in this family.
* ``doremi``: the mix cell's domains and baseline, and DoReMi's three-step chain: its reference is the static
  baseline's seed-0 run (merged into the base model), ``doremi`` its proxies (step 2, one per seed),
  ``doremi_final`` training on the proxies' averaged domain weights (step 3). Compared at equal steps; the
  chain's own cost (the proxies, with the reference model's forwards) comes on top of the final run's.

Every run trains through the ordinary ``dataflex-cli train`` path that ``dataflex.compare`` drives (LoRA r16
on all linears, lr 5e-4 constant, batch 8, ``--steps`` steps), scored by multiple-choice accuracy over the
task's answer set (one forward per question). Resumable (compare skips finished runs), and a cell whose
tracked result was made with the same settings (``cell.json``) is skipped whole, so a fresh checkout does not
train it again (``--rerun`` runs it). Output: ``bench/out/bbh-level2/<target>-<family>/`` with
``compare.json``, ``cell.json`` and ``table.md`` (tracked) and the runs (not tracked);
``bench/out/bbh-level2/verdicts.md`` gathers every finished cell, ``curves.png`` plots their accuracy against
steps (and against counted work where a cell compares at equal work), mean and 95 % band.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections import Counter
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
    # train_type, the component the config names, the baseline, the methods compared with it
    "weight": ("dynamic_weight", "loss", "plain", ["loss", "adapt", "joint_update_aware"]),
    # static by length and by loss, each walked in order and paced (root competence: a step draws from the
    # easiest share of the rows, which grows to all of them over half the run)
    "reorder": ("dynamic_reorder", "static", "plain", ["static:score=length:order=ascending",
                                                       "static:score=loss:order=ascending",
                                                       "static:score=length:order=ascending:pacing=root",
                                                       "static:score=loss:order=ascending:pacing=root", "dynamic"]),
    "select": ("dynamic_select", "random", "random", ["less", "less:random_share=0.25", "near", "loss"]),
    # dynamic_moe routes by a mixture-of-experts model's router logits: SmolLM2 is dense, so it refuses
    # (one line, before training)
    "mix": ("dynamic_mix", "static", "static", ["odm", "random"]),
    # the mix cell's material, DoReMi's chain: doremi is its step 2 (the proxy), doremi_final its step 3 (DOREMI)
    "doremi": ("dynamic_mix", "static", "static", ["doremi", "doremi_final"]),
}
MIXING = ("mix", "doremi")  # families whose training sets are the tasks as domains
# DoReMi's three steps in the doremi cell: step 1, the reference model, is the static baseline's seed-0 run (uniform
# proportions, the paper's reference), its LoRA adapter merged into the base model; step 2 (`doremi`) trains a proxy
# per seed against it; step 3 (`doremi_final`) trains on fixed proportions, the proxies' averaged domain weights
# (their mean over seeds), from step 0. Both are measured like every other method.
DOREMI = ("doremi", "doremi_final")
# select: the target's rows are a quarter of a pool with three other BBH tasks (short prompts);
# mix: the same four tasks are the domains
# (formal_fallacies, at ~160 tokens a row, made a step of the pool ~2x as costly as navigate's ~85 tokens)
POOL_OTHERS = ["boolean_expressions", "sports_understanding", "navigate", "disambiguation_qa"]
# the components the select and mix families compare (written beside the config; the packaged file serves
# weight and reorder, whose runs must keep their keys)
COMPONENTS = {
    "selectors": {"random": {"name": "random", "params": {}},
                  "less": {"name": "less", "params": {"proj_dim": 8192, "seed": 7}},
                  "near": {"name": "near", "params": {"neighbours": 64}},
                  "loss": {"name": "loss", "params": {"focus": "high"}}},
    "mixers": {"static": {"name": "static", "params": {}},
               "odm": {"name": "odm", "params": {"alpha": 0.9, "reward_scale": 1.0, "warmup_steps": 0}},
               "random": {"name": "random", "params": {"seed": 42}}},
}


def others_of(target: str) -> list[str]:
    return [t for t in POOL_OTHERS if t != target][:3]


def split_task(task: str, paths: dict, n_train: int, n_test: int, n_eval: int, seed: int) -> dict[str, list]:
    """A task's held-out, few-shot eval and training questions; the held-out ones are the probe's (the same
    seeded order, test first), so a task's level-2 accuracy reads against its probe row."""
    qs, _ = mt.load_bbh(task, paths[task])
    train, test = bbh_probe.split(qs, n_train + n_eval, n_test, seed)
    if len(train) < n_train + n_eval:
        raise mt.TaskFileError(f"BBH task {task} has {len(qs)} questions: too few for {n_test} held-out + "
                               f"{n_eval} eval + {n_train} training rows")
    return {"train": train[:n_train], "eval": train[n_train:], "test": test}


def write_family_data(data: Path, family: str, target: str, args) -> tuple[dict, dict]:
    """The select family's pool or the mix family's domains; returns (config keys, summary). Every file keeps
    a ``task`` column, so per-task accuracy is read off compare's per-question scores."""
    import random

    tasks = [target, *others_of(target)]
    paths = mt.fetch_bbh(tasks)
    per_task = args.train // 2  # four tasks: a pool (or a mixture) twice the target's own rows
    if family in MIXING:  # every domain is measured alike
        n_test = {t: args.test // 2 for t in tasks}
    else:  # the target, and the other tasks for forgetting
        n_test = {t: args.test if t == target else args.other_test for t in tasks}
    splits = {t: split_task(t, paths, per_task, n_test[t], args.n_eval, args.seed) for t in tasks}
    files = {}
    for t in tasks:
        files[f"bb_test_{t}"] = [mt.bbh_row(q) for q in splits[t]["test"]]
        files[f"bb_eval_{t}"] = [mt.bbh_row(q) for q in splits[t]["eval"]]
        files[f"bb_train_{t}"] = [mt.bbh_row(q) for q in splits[t]["train"]]
    data.mkdir(parents=True, exist_ok=True)
    if family == "select":
        pool = [r for t in tasks for r in files[f"bb_train_{t}"]]
        random.Random(args.seed).shuffle(pool)
        files["bb_pool"] = pool
        keys = {"dataset": "bb_pool", "eval_dataset": f"bb_eval_{target}", "test_dataset": f"bb_test_{target}",
                "extra": [f"bb_test_{t}" for t in tasks[1:]]}
    else:
        files["bb_test_all"] = [r for t in tasks for r in files[f"bb_test_{t}"]]
        keys = {"dataset": ",".join(f"bb_train_{t}" for t in tasks), "eval_dataset": "bb_test_all"}
    for name, rows in files.items():
        (data / f"{name}.json").write_text(json.dumps(rows, ensure_ascii=False, indent=0))
    (data / "dataset_info.json").write_text(json.dumps({n: {"file_name": f"{n}.json"} for n in files}, indent=1))
    summary = {"family": family, "target": target, "tasks": tasks, "train_per_task": per_task,
               "test": {t: len(files[f"bb_test_{t}"]) for t in tasks}, "eval_per_task": args.n_eval}
    return keys, summary


def write_config(folder: Path, model: Path, target: str, args) -> Path:
    import yaml

    from dataflex.assets import ASSETS

    data = folder / "data"
    train_type, component, _, _ = FAMILIES[args.family]
    if args.family in ("weight", "reorder"):
        # the target's own rows, split as the probe splits them (these keys are the runs' keys: unchanged)
        summary = bbh_probe.write_data(data, target, mt.fetch_bbh([target])[target], args)
        info = {"bbh_train": {"file_name": "train.json"}, "bbh_test": {"file_name": "test.json"}}
        (data / "dataset_info.json").write_text(json.dumps(info, indent=1))
        keys = {"dataset": "bbh_train", "eval_dataset": "bbh_test"}
    else:
        keys, summary = write_family_data(data, args.family, target, args)
    cfg = {"model_name_or_path": str(model), "stage": "sft", "do_train": True, "finetuning_type": "lora",
           "lora_target": "all", "lora_rank": 16, "lora_alpha": 32, "dataset": keys["dataset"],
           "eval_dataset": keys["eval_dataset"], "dataset_dir": str(data), "template": ASSETS["smollm2"].template,
           "cutoff_len": 512, "preprocessing_num_workers": 1, "overwrite_cache": True,
           "output_dir": str(folder / "unused"), "report_to": "none", "bf16": False,
           "per_device_train_batch_size": 8, "gradient_accumulation_steps": 1, "learning_rate": args.lr,
           "lr_scheduler_type": "constant", "max_steps": args.steps, "logging_steps": 1,
           "dataloader_num_workers": 0, "disable_gradient_checkpointing": True, "plot_loss": False,
           "train_type": train_type, "component_name": component,
           "components_cfg_file": str(ROOT / "src" / "dataflex" / "configs" / "components.yaml"),
           "warmup_step": 0}
    if args.family == "reorder":
        # the dynamic reorderer re-orders the rows left every update_step steps (a static one orders once and
        # ignores these keys, with a warning; plain training drops every DataFlex key)
        cfg.update(update_step=max(1, args.steps // 4), update_times=-1)
    if args.family in ("select", *MIXING):
        comp = folder / "components.yaml"
        components = json.loads(json.dumps(COMPONENTS))
        if args.candidate_pool:  # less and loss score a fresh random part of the pool per decision (near embeds
            for spec in components["selectors"].values():  # and searches the whole pool: it refuses the key)
                if spec["name"] in ("less", "loss"):
                    spec["params"]["candidate_pool"] = args.candidate_pool
        comp.write_text(yaml.safe_dump(components, sort_keys=False))
        # a random warm-up block, then a decision every block of the run (and of the baseline's longer run)
        block = max(1, args.steps // 6)
        cfg.update(components_cfg_file=str(comp), warmup_step=block, update_step=block, update_times=-1)
        if args.family in MIXING:
            cfg["mixture_sample_rule"] = "mixture"
    path = folder / "config.yaml"
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    (folder / "data.json").write_text(json.dumps({**summary, **{k: v for k, v in keys.items() if k != "dataset"}},
                                                 indent=1))
    return path


def last_adapter(run: Path) -> Path:
    """The folder of a run's final LoRA adapter: the run's own folder (saved at the end), else its last checkpoint."""
    from dataflex.compare.evaluate import checkpoints

    if (run / "adapter_model.safetensors").is_file():
        return run
    found = checkpoints(run)
    if not found:
        raise FileNotFoundError(f"{run}: no adapter_model.safetensors and no checkpoint-N folder")
    return found[-1][1]


def merge_reference(adapter: Path, base: Path, into: Path) -> Path:
    """DoReMi's reference as a model folder (what ``reference_model_path`` takes): the LoRA adapter merged
    into the base model, with the base tokenizer. Written to a side folder and renamed, so an interrupted merge
    leaves nothing that looks finished."""
    import shutil

    if (into / "config.json").is_file():
        return into
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    partial = into.with_name(into.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    model = AutoModelForCausalLM.from_pretrained(str(base), dtype=torch.float32)
    model = PeftModel.from_pretrained(model, str(adapter)).merge_and_unload()
    model.save_pretrained(str(partial))
    AutoTokenizer.from_pretrained(str(base)).save_pretrained(str(partial))
    partial.rename(into)
    return into


def mean_weights(files: list[Path]) -> tuple[list[str], list[float], list[list[float]]]:
    """The domains, the mean of the proxies' averaged DoReMi weights (``doremi_domain_weights.json``), rounded
    to 6 decimals with the last one making the sum exactly 1 (the static mixer checks the sum), and each proxy's
    weights."""
    records = [json.loads(f.read_text()) for f in files]
    domains = records[0]["domains"]
    if any(r["domains"] != domains for r in records):
        raise ValueError(f"the DoReMi proxies weighted different domains: {[r['domains'] for r in records]}")
    mean = [round(sum(r["weights"][i] for r in records) / len(records), 6) for i in range(len(domains))]
    mean[-1] = round(1.0 - sum(mean[:-1]), 6)
    return domains, mean, [r["weights"] for r in records]


def doremi_chain(config: Path, out: Path, seeds: int, run, options: dict) -> dict:
    """DoReMi's steps 1 and 2 for the doremi cell, then step 3's proportions in its components file (see DOREMI);
    returns what the chain used. Every step is a compare run, so a rerun skips what is finished."""
    import yaml

    cfg = yaml.safe_load(config.read_text())
    comp = Path(cfg["components_cfg_file"])
    runs = out / "compare"
    common = {"budget": "steps", "metric": "choice", "out": str(runs), "baseline": "static", **options}
    # step 1: the static baseline's seed-0 run (uniform proportions), merged
    print("[bbh_level2] doremi step 1: the reference (static, seed 0)", file=sys.stderr, flush=True)
    run(str(config), "static", seeds=1, **common)
    reference = merge_reference(last_adapter(runs / "static" / "seed-0"), Path(cfg["model_name_or_path"]),
                                out / "doremi-reference")
    components = yaml.safe_load(comp.read_text())
    components["mixers"]["doremi"] = {"name": "doremi", "params": {"reference_model_path": str(reference)}}
    comp.write_text(yaml.safe_dump(components, sort_keys=False))
    # step 2: a proxy per seed, trained with Group DRO against the reference; each writes its averaged weights
    print("[bbh_level2] doremi step 2: the proxies", file=sys.stderr, flush=True)
    run(str(config), "static,doremi", seeds=seeds, **common)
    files = [runs / "doremi" / f"seed-{k}" / "doremi_domain_weights.json" for k in range(seeds)]
    domains, weights, per_proxy = mean_weights(files)
    # step 3's proportions: a static mixer that starts (and stays) on them
    components["mixers"]["doremi_final"] = {"name": "static", "params": {"proportions": weights}}
    comp.write_text(yaml.safe_dump(components, sort_keys=False))
    print(f"[bbh_level2] doremi step 3: proportions {dict(zip(domains, weights))}", file=sys.stderr, flush=True)
    return {"domains": domains, "proportions": weights, "per_proxy": per_proxy}


def per_domain(data: dict, folder: Path) -> dict | None:
    """The mix family's per-domain accuracy at the end of every run (compare scores each question; the
    eval file's ``task`` column says whose it is): {method: {task: [acc per seed]}} and the worst domain."""
    rows_path = folder / "data" / "bb_test_all.json"
    if not rows_path.exists():
        return None
    tasks = [r["task"] for r in json.loads(rows_path.read_text())]
    out: dict = {}
    for run in data["runs"]:
        if run.get("role") != "main" or not run.get("curve"):
            continue
        last = run["curve"][-1]["metrics"].get("choice")
        if not last or len(last) != len(tasks):
            continue
        acc: dict[str, list[float]] = {}
        for t, (v, _w) in zip(tasks, last):
            acc.setdefault(t, []).append(v)
        means = {t: sum(v) / len(v) for t, v in acc.items()}
        entry = out.setdefault(run["method"], {"per_seed": []})
        entry["per_seed"].append({**means, "worst": min(means.values())})
    return out


def equal_work_table(data: dict, metric: str = "choice") -> dict | None:
    """Equal counted work without a longer baseline: every method's earliest measured checkpoint whose work is at
    least what the baseline's whole run did (3 x its trained tokens), against the baseline's end, paired by seed.
    The method gets at least the baseline's compute there, so a method that does not beat the baseline at this
    point does not beat it at equal compute. None without counted work (runs made before it was counted)."""
    from dataflex.compare import analysis

    baseline, steps = data["baseline"], data["steps"]
    runs: dict[str, dict[int, dict]] = {}
    for run in data["runs"]:
        if run.get("role") == "main" and run.get("curve"):
            runs.setdefault(run["method"], {})[run["seed_index"]] = run
    base = runs.get(baseline, {})
    ends = {k: analysis.point_at_step(r["curve"], steps) for k, r in base.items()}
    if not ends or any(e is None or e.get("work") is None for e in ends.values()):
        return None
    rows, notes = [], []
    for method in data["methods"]:
        if method == baseline or method not in runs:
            continue
        mine, theirs, at = [], [], []
        for k, end in sorted(ends.items()):
            run = runs[method].get(k)
            if run is None:
                continue
            pts = [q for q in run["curve"] if q.get("work") is not None]
            point = next((q for q in pts if q["work"] >= end["work"]), None)
            if point is None:  # the method's whole run did less work than the baseline's: compared at its end
                point = pts[-1]
                notes.append(f"{method} seed {k}: its whole run did less work than the baseline's")
            mine.append(point["metrics"][metric])
            theirs.append(end["metrics"][metric])
            at.append((point["step"], point["work"] / end["work"]))
        if mine:
            r = analysis.row(method, mine, theirs, metric)
            r["at"] = at
            rows.append(r)
            notes.append(f"{method}: its checkpoint at step {', '.join(str(a) for a, _ in at)} (work x "
                         f"{', '.join(f'{w:.2f}' for _, w in at)} the baseline's {steps}-step run)")
    base_row = analysis.row(baseline, [e["metrics"][metric] for _, e in sorted(ends.items())], None, metric)
    return {"budget": "work", "metric": metric,
            "unit": "counted work; each method's first checkpoint with at least the baseline's",
            "baseline": baseline, "rows": [base_row, *rows], "notes": notes}


def seed_runs(folder: Path):
    """``(method folder name, seed folder)`` of every run of a cell's comparison, in name order; a baseline's
    longer runs (``seed-<k>-long``) are left out."""
    for method_dir in sorted((folder / "compare").iterdir()):
        for seed in sorted(d for d in method_dir.glob("seed-*") if d.name[5:].isdigit()):
            yield method_dir.name, seed


def pick_shares(folder: Path) -> dict:
    """The select cell's picks by task: {method: [{task: share of its picks} per seed]}, read from each run's
    selection records (``compare/<method>/seed-<k>/dataflex/<run>/step_*.json``, ``kind: selection``) and the
    pool's ``task`` column. Random's warm-up block is not a selection and is not counted."""
    pool = json.loads((folder / "data" / "bb_pool.json").read_text())
    out: dict[str, list[dict[str, float]]] = {}
    for method, seed in seed_runs(folder):
        counts: dict[str, int] = {}
        for record in seed.glob("dataflex/*/step_*.json"):
            entry = json.loads(record.read_text())
            if entry.get("kind") == "selection":
                for i in entry["indices"]:
                    counts[pool[i]["task"]] = counts.get(pool[i]["task"], 0) + 1
        total = sum(counts.values())
        if total:
            out.setdefault(method, []).append({t: n / total for t, n in sorted(counts.items())})
    return out


def order_answers(folder: Path, parts: int = 4) -> dict:
    """What each ordering put where: {method: [[{answer: rows} per part of the run] per seed]}, the rows every
    step trained (``compare/<method>/seed-<k>/dataflex/<run>/order.jsonl``, in step order) cut into ``parts``
    equal parts and counted by their answer (the training file's ``output``). A run without order records
    (plain) is left out."""
    info = json.loads((folder / "data" / "dataset_info.json").read_text())
    rows = json.loads((folder / "data" / info["bbh_train"]["file_name"]).read_text())
    out: dict[str, list[list[dict[str, int]]]] = {}
    for method, seed in seed_runs(folder):
        steps = sorted((json.loads(line) for f in seed.glob("dataflex/*/order.jsonl")
                        for line in f.read_text().splitlines() if line.strip()), key=lambda r: r["step"])
        trained = [i for r in steps for i in r["indices"]]
        if not trained:
            continue
        size = -(-len(trained) // parts)
        out.setdefault(method, []).append([
            dict(sorted(Counter(rows[i]["output"] for i in trained[k:k + size]).items()))
            for k in range(0, len(trained), size)])
    return out


def worst_domain_text(domains: dict, baseline: str) -> str:
    """The worst domain's accuracy per method, mean ± 95 % Student-t interval over seeds, and its difference to
    the baseline's worst domain paired by seed (the worst domain may differ between seeds and methods): compare's
    own table, with each seed's worst domain as that seed's value."""
    from dataflex.compare import analysis

    def per_seed(method: str) -> list[list]:
        return [[[s["worst"], 1.0]] for s in domains[method]["per_seed"]]

    base = per_seed(baseline) if baseline in domains else None
    rows = [analysis.row(m, per_seed(m), None if m == baseline or base is None else base, "choice")
            for m in domains]
    tab = {"budget": "steps", "metric": "choice", "baseline": baseline, "rows": rows, "notes": []}
    return "worst domain (its accuracy per seed; difference to the baseline paired by seed):\n" + analysis.render(tab)


VERDICT_HEAD = ("| target | family | method | baseline | budget | seeds | accuracy ± 95 % CI | difference ± 95 % CI "
                "| verdict | answer loss: difference ± 95 % CI | verdict |\n"
                "|---|---|---|---|---|---|---|---|---|---|---|\n")


def verdict_rows(folder: Path) -> list[str]:
    """One line per (method, budget) of every finished cell under ``folder`` (``<target>-<family>/compare.json``)."""
    lines = []
    for path in sorted(folder.glob("*-*/compare.json")):
        target, _, family = path.parent.name.rpartition("-")
        tables = json.loads(path.read_text())["tables"]
        if (path.parent / "equal_work.json").exists():
            tables += json.loads((path.parent / "equal_work.json").read_text())["tables"]
        # the answer's loss (lower is better) beside the accuracy, from the same budget's loss table
        loss = {(t["budget"], r["method"]): r for t in tables if t["metric"] == "loss" for r in t["rows"]}
        for table in tables:
            if table["metric"] != "choice":
                continue
            for row in table["rows"]:
                if row.get("verdict") is None:
                    continue
                other = loss.get((table["budget"], row["method"]))
                answer = (f"{other['diff_mean']:+.3f} [{other['diff_lo']:+.3f}, {other['diff_hi']:+.3f}] | "
                          f"{other['verdict']}" if other is not None and other.get("verdict") is not None
                          else "- | -")
                lines.append(f"| {target} | {family} | {row['method']} | {table['baseline']} | {table['budget']} | "
                             f"{row['seeds']} | {row['mean']:.3f} [{row['lo']:.3f}, {row['hi']:.3f}] | "
                             f"{row['diff_mean']:+.3f} [{row['diff_lo']:+.3f}, {row['diff_hi']:+.3f}] | "
                             f"{row['verdict']} | {answer} |")
    return lines


def curves_of(data: dict, x: str) -> dict[str, list[tuple[float, float, float]]]:
    """{method (its longer baseline runs as "<method> (longer)"): [(x, mean accuracy, 95 % half-width)]}, the
    untrained model at x = 0 when compare measured it; points are averaged over the seeds that reached them."""
    from real import mean_ci

    start = (data.get("start") or {}).get("values", {}).get("choice")
    by: dict[str, dict[int, list[tuple[float, float]]]] = {}
    for run in data["runs"]:
        name = run["method"] + (" (longer)" if run.get("role") == "long" else "")
        for k, point in enumerate(run.get("curve") or []):
            if point.get(x) is not None and "choice" in point.get("values", {}):
                by.setdefault(name, {}).setdefault(k, []).append((point[x], point["values"]["choice"]))
    out = {}
    for name, points in by.items():
        line = [(0.0, start, float("nan"))] if start is not None else []
        for _, pts in sorted(points.items()):
            stat = mean_ci([v for _, v in pts])
            line.append((sum(p for p, _ in pts) / len(pts), stat["mean"], stat["ci"]))
        out[name] = line
    return out


def plot_cells(folder: Path, path: Path) -> bool:
    """Accuracy on the target's held-out questions against optimizer steps for every finished cell, and
    against counted work (token passes) for the cells compared at equal work; returns whether it drew."""
    cells = sorted(folder.glob("*-*/compare.json"))
    if not cells:
        return False
    import math

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = []
    for cell in cells:
        data = json.loads(cell.read_text())
        panels.append((cell.parent.name, "step", curves_of(data, "step")))
        if any(q.get("decision_forward") for r in data["runs"] for q in r.get("curve") or []):  # scoring work
            panels.append((cell.parent.name, "work", curves_of(data, "work")))
    cols = min(3, len(panels))
    rows = math.ceil(len(panels) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(5.2 * cols, 3.8 * rows), squeeze=False)
    for ax in axes.flat[len(panels):]:
        ax.axis("off")
    for ax, (name, x, curves) in zip(axes.flat, panels):
        for method, line in curves.items():
            xs = [p[0] / (1e6 if x == "work" else 1) for p in line]
            ys = [p[1] for p in line]
            lo = [y - (0 if math.isnan(c) else c) for _, y, c in line]
            hi = [y + (0 if math.isnan(c) else c) for _, y, c in line]
            style = "--" if method.endswith("(longer)") else "-"
            shown = ax.plot(xs, ys, style, marker="o", markersize=3, label=method)
            ax.fill_between(xs, lo, hi, alpha=0.12, color=shown[0].get_color())
        ax.set_title(name, fontsize=10)
        ax.set_xlabel("optimizer steps" if x == "step" else "counted work (million token passes)")
        ax.set_ylabel("accuracy (held-out)")
        ax.legend(fontsize=6.5)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return True


def write_verdicts(folder: Path) -> str:
    lines = verdict_rows(folder)
    text = ("Level 2 on BBH (SmolLM2-135M-Instruct, LoRA r16): multiple-choice accuracy on held-out questions, "
            "mean ± Student-t 95 % interval over seeds; the difference to the baseline is paired by seed, and the "
            "verdict is read off its interval alone (`tie`: it contains 0); beside it the same for the mean loss "
            "of the correct answer (lower is better; `-` where the cell has no loss table for that budget). Made by "
            "`python bench/bbh_level2.py "
            "--verdicts` from the cells' `compare.json`.\n\n" + VERDICT_HEAD + "\n".join(lines) + "\n")
    (folder / "verdicts.md").write_text(text)
    plot_cells(folder, folder / "curves.png")
    return text


# what a cell's result depends on: every option but where it is written and what this call does
NOT_SETTINGS = ("out", "verdicts", "rerun")


def cell_settings(args: argparse.Namespace) -> dict:
    """The cell's options, with ``methods`` resolved to what is compared (a family's default methods can grow)."""
    settings = {k: v for k, v in sorted(vars(args).items()) if k not in NOT_SETTINGS}
    settings["methods"] = ",".join(methods_of(args))
    return settings


def methods_of(args: argparse.Namespace) -> list[str]:
    """The methods compared with the family's baseline: ``--methods``, else the family's."""
    return args.methods.split(",") if args.methods else list(FAMILIES[args.family][3])


def finished_cell(out: Path, args: argparse.Namespace) -> bool:
    """Whether ``out`` holds a cell's tracked result (compare.json, written last but for cell.json) made with
    the same settings: a fresh checkout has the tracked results but not the (untracked) runs, and must not train
    them all again to reach the same table."""
    try:
        record = json.loads((out / "cell.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    return (out / "compare.json").is_file() and record.get("settings") == cell_settings(args)


def parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--target", default="boolean_expressions", help=f"one of {', '.join(mt.BBH_MC)}")
    ap.add_argument("--family", choices=sorted(FAMILIES), default="weight")
    ap.add_argument("--methods", default=None, help="comma-separated, compared with the family's baseline "
                                                   "(default: the family's)")
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--steps", type=int, default=24)
    ap.add_argument("--train", type=int, default=96, help="the target's training rows (select: per task of the "
                                                         "pool, half of this; mix: per domain, half of this)")
    ap.add_argument("--test", type=int, default=100, help="held-out target questions (mix: per domain, half)")
    ap.add_argument("--other-test", type=int, default=30, help="select: held-out questions per other task (forgetting)")
    ap.add_argument("--n-eval", type=int, default=16, help="select / mix: the few-shot eval rows per task that "
                                                         "the selectors and the router mixer see (never scored)")
    ap.add_argument("--candidate-pool", type=int, default=64,
                    help="select: rows less and loss score per decision (a fresh random part of the pool; 0: all "
                         "of it; near always embeds the whole pool)")
    ap.add_argument("--seed", type=int, default=0, help="the split's seed (the probe's)")
    ap.add_argument("--lr", type=float, default=5e-4)
    ap.add_argument("--budget", choices=("steps", "compute", "both"), default=None,
                    help="default: steps (the select cell adds an equal-work table from the selectors' earlier "
                         "checkpoints; both: the baseline also trains on to twice the steps)")
    ap.add_argument("--eval-every", type=int, default=None)
    ap.add_argument("--out", type=Path, default=None,
                    help="the cell's own folder (default: bench/out/bbh-level2/<target>-<family>); with --verdicts, "
                         "the folder that holds the cells")
    ap.add_argument("--verdicts", action="store_true", help="only rewrite verdicts.md from the finished cells")
    ap.add_argument("--rerun", action="store_true",
                    help="run the cell even when its tracked result was made with these settings (cell.json); "
                         "compare still skips the runs it finds finished under compare/")
    return ap


def main(argv: list[str] | None = None) -> int:
    ap = parser()
    args = ap.parse_args(argv)
    root = ROOT / "bench" / "out" / "bbh-level2"
    if args.verdicts:
        folder = args.out or root
        if not any(folder.glob("*-*/compare.json")):
            print(f"bench/bbh_level2.py: error: no finished cell (<target>-<family>/compare.json) under {folder}",
                  file=sys.stderr)
            return 2
        print(write_verdicts(folder))
        return 0
    if args.target not in mt.BBH_MC:
        ap.error(f"--target: {args.target} is not a multiple-choice BBH task; choose from {', '.join(mt.BBH_MC)}")
    if args.candidate_pool < 0:
        ap.error("--candidate-pool must be 0 (the whole pool) or more")
    for name in ("seeds", "steps", "train", "test", "other_test", "n_eval"):
        if getattr(args, name) < 1:
            ap.error(f"--{name.replace('_', '-')} must be at least 1")
    if args.family != "doremi" and any(m in DOREMI for m in methods_of(args)):  # before the cell writes anything
        ap.error(f"--methods: {', '.join(DOREMI)} are DoReMi's steps 2 and 3: use --family doremi")
    from dataflex.assets import fetch_locked
    from dataflex.compare import run

    baseline = FAMILIES[args.family][2]
    # absolute: the runs' configs name their data folder, and compare's run keys hash them (a relative --out would
    # make every finished run unknown to a call that spells the same folder absolutely)
    out = args.out.resolve() if args.out else root / f"{args.target}-{args.family}"
    if any(out.glob("*-*/compare.json")):  # a folder of cells, not a cell: the runs would land beside the cells
        ap.error(f"--out: {out} holds finished cells (<target>-<family>/compare.json); --out names one cell's "
                 f"folder, e.g. {out / f'{args.target}-{args.family}'}")
    if not args.rerun and finished_cell(out, args):
        print(f"[bbh_level2] {out.name}: finished earlier with these settings ({out / 'cell.json'}); "
              "--rerun runs it again", file=sys.stderr, flush=True)
        return 0
    out.mkdir(parents=True, exist_ok=True)
    try:
        config = write_config(out, fetch_locked("smollm2"), args.target, args)
    except mt.TaskFileError as exc:
        print(f"bench/bbh_level2.py: error: {exc}", file=sys.stderr)
        return 2
    methods = [baseline, *methods_of(args)]
    # weighters, orderings and mixers do no scoring passes of their own (odm's reward is the step's own loss), so
    # equal steps is equal work. The scoring selectors' passes are counted: the select cell reads equal work off
    # the selectors' earlier checkpoints (equal_work_table); --budget both also trains the baseline on to match
    budget = args.budget or "steps"
    # select / mix measure many sets (the forgetting sets, every domain): a checkpoint every half run
    every = args.eval_every or (None if args.family in ("weight", "reorder") else max(1, args.steps // 2))
    options = {"eval_every": every} if every else {}
    if budget != "steps":
        options["compute"] = "work"  # counted work: the verdict does not depend on how loaded the machine is
    # the same target's other cells: a run with the same key there (the plain runs of the weight and reorder
    # cells, the static runs of the mix and doremi cells) is taken, not trained again
    siblings = [c / "compare" for c in sorted(out.parent.glob(f"{args.target}-*"))
                if c != out and (c / "compare").is_dir()]
    if siblings:
        options["reuse"] = siblings
    info = json.loads((out / "data.json").read_text())
    if "test_dataset" in info:
        options["test_dataset"] = info["test_dataset"]  # the selectors see bb_eval_<target>, never these
        # forgetting: the pool's other tasks, each its own held-out set and metric (<task>:choice)
        options["eval_extra"] = [f"{name.removeprefix('bb_test_')}={name}" for name in info["extra"]]
    if any(m in DOREMI for m in methods):
        chain = doremi_chain(config, out, args.seeds, run, options)
        (out / "doremi.json").write_text(json.dumps(chain, indent=1))
    data = run(str(config), ",".join(methods), seeds=args.seeds, budget=budget, metric="choice",
               out=str(out / "compare"), baseline=baseline, **options)
    from dataflex.compare.runner import text_report

    text = text_report(data)
    work = equal_work_table(data) if args.family == "select" else None
    if work:
        from dataflex.compare import analysis

        text += "\n\n" + analysis.render(work)
        (out / "equal_work.json").write_text(json.dumps({"tables": [work]}, indent=1))
    if args.family == "select" and (out / "compare").is_dir():
        shares = pick_shares(out)
        (out / "picks.json").write_text(json.dumps(shares, indent=1))
        tasks = sorted({t for v in shares.values() for seed in v for t in seed})
        text += "\n\nthe selections' picks by task (mean over seeds; the pool is a quarter each):\n" + "\n".join(
            f"  {m:24s} " + "  ".join(f"{t} {sum(s.get(t, 0.0) for s in v) / len(v):.2f}" for t in tasks)
            for m, v in shares.items())
    if args.family == "reorder" and (out / "compare").is_dir():
        answers = order_answers(out)
        (out / "order_answers.json").write_text(json.dumps(answers, indent=1))
        text += "\n\nthe rows each order trained, by answer, per quarter of the run (seed 0):\n"
        text += "\n".join(f"  {m:44s} " + " | ".join(" ".join(f"{a}{n}" for a, n in q.items()) for q in v[0])
                           for m, v in answers.items())
    domains = per_domain(data, out)
    if domains:
        text += "\n\nper domain at the end (mean over seeds):\n" + "\n".join(
            f"  {m:14s} " + "  ".join(f"{k} {sum(s[k] for s in v['per_seed']) / len(v['per_seed']):.3f}"
                                     for k in v["per_seed"][0]) for m, v in domains.items())
        text += "\n" + worst_domain_text(domains, baseline)
        (out / "per_domain.json").write_text(json.dumps(domains, indent=1))
    # the comparison's record beside its table (the runs themselves stay untracked under compare/)
    (out / "compare.json").write_text((out / "compare" / "compare.json").read_text())
    command = " ".join(["python bench/bbh_level2.py", *(argv if argv is not None else sys.argv[1:])])
    command = command.replace(f"{ROOT}/", "")  # the repository's own paths, relative
    (out / "table.md").write_text(f"`{command}`\n\n```text\n{text}\n```\n")
    (out / "cell.json").write_text(json.dumps({"settings": cell_settings(args)}, indent=1, sort_keys=True) + "\n")
    write_verdicts(root if args.out is None else out.parent)
    print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
