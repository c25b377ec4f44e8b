"""Selection quality on a real model and real tasks: SmolLM2-135M-Instruct + BBH (BIG-Bench Hard).

    python bench/real.py --quick            # level 1 on one hard pool + one small level-2 cell
    python bench/real.py                    # the CPU grid (level 1: 6 BBH targets x 3 draws; level 2: 4 families)
    python bench/real.py --full             # the full grid (bench/gpu.py runs it on a GPU machine)
    python bench/real.py --plan-only        # print the grid, check the arguments, load nothing
    python bench/real.py --data bigbench    # the BIG-bench tasks (needs the bigbench 1.0.0 sdist or a checkout)
    python bench/bbh_probe.py               # first: which BBH tasks SmolLM2 can learn at all (the ceiling probe)

Tasks come from ``bench/mc_tasks.py``: BBH by default (``$DATAFLEX_BBH_DIR``, ``../shared/data/bbh``,
or a download at the pinned commit; every file checked against its SHA-256), BIG-bench with
``--data bigbench``, the repo's generated demo tasks with ``--data demo`` (level 1 only).

Level 1 - selection precision. A pool of BIG-bench multiple-choice tasks (``--per-task`` rows
each, so the target is 1/10 of the pool) in which ``--wrong`` of the rows carry a planted wrong
answer, and a few-shot eval set of the target. Two kinds of pool:

* ``plain``: the target and nine other tasks, task prefixes kept;
* ``hard``: the target next to a *sibling* task with the same answer options (BBH:
  logical_deduction_three_objects and tracking_shuffled_objects_three_objects, both (A)-(C);
  BIG-bench: strategyqa and anachronisms, both Yes / No; BIG-bench's task prefixes are stripped too),
  so the answers alone do not give the target away.

Per pool the model is loaded once (LoRA r8 on all linears, as training would), the delta_loss
baseline is scored, one warm-up AdamW step is taken on a random batch, and every selector picks as
many rows as the pool has target rows, in-process with the same engine. Per selector: the share
of target rows and of wrong-answer rows among the picks, and the selection's seconds. With two
eval groups (target + sibling) ``less`` is also run with ``eval_aggregate: task_max``.

Level 2 - does it train better, at equal steps and equal counted work. One ``dataflex-cli compare``
cell per target and mode family (``bench/bbh_level2.py``; BBH only): ``weight`` (plain vs loss / adapt /
joint_update_aware), ``reorder`` (plain vs a static length order / dynamic loss order), ``select`` (random vs
less / less with random_share / near / loss on a four-task pool, forgetting on the other three) and ``mix``
(static uniform vs odm / random proportions, the four tasks as domains, worst domain beside the mean), each with
seeds, Student-t intervals, paired differences and a verdict. Targets are tasks the ceiling probe
(``bench/bbh_probe.py``) found learnable; their floor and ceiling are the probe's rows.

Zeroth check (``--levels zeroth``): ``zeroth`` (direction: eval_gradient) against autograd on the real
model - its finite difference vs the exact ∇f(z)·ḡ_eval, the rows' gradient norms, the exact cosines
that LESS ranks by, LESS's own scores, and ``normalize: true`` with 8 and 32 norm directions. On a
BIG-bench hard pool (``--zeroth-data bigbench``) or on the repo's demo_mix against demo_add_eval
(``--zeroth-data demo``: needs only the model).

Outputs: ``bench/out/bbh`` (``--quick``: ``bench/out/bbh-quick``, ``--full``: ``bench/out/bbh-full``; ``real``
instead of ``bbh`` with ``--data bigbench``): ``level1.json``/``.md``, ``level2.json`` (the cells' tables; the CPU
grid's cells themselves under ``bench/out/bbh-level2/<target>-<family>/``, the other sizes' and any ``--out``'s
under ``<out>/level2/``), ``zeroth_check[_demo].json``, ``precision.png``. Assets (the model, the task
files) are fetched on first use and cached (``dataflex.assets``, ``bench/mc_tasks.py``).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("DISABLE_VERSION_CHECK", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import mc_tasks as bb  # noqa: E402
from _common import ROOT, machine_info  # noqa: E402

# target -> its sibling of the same form (identical answer options), used in the hard pools
SIBLINGS = {
    "strategyqa": "anachronisms",  # Yes / No
    "navigate": "metaphor_boolean",  # True / False
    "implicatures": "entailed_polarity",  # yes / no
    "anachronisms": "strategyqa",  # No / Yes
}
# other tasks of the pools: short questions, varied forms
FILLERS = ["sports_understanding", "date_understanding", "misconceptions", "hyperbaton", "social_iqa",
           "ruin_names", "movie_recommendation", "winowhy", "irony_identification", "dark_humor_detection"]
ALL_TASKS = sorted(set(SIBLINGS) | set(SIBLINGS.values()) | set(FILLERS))
# BBH (the default source, ../shared/data/bbh): target -> a sibling whose answers have the same form, so
# the answer alone does not tell the two apart
BBH_SIBLINGS = {
    "logical_deduction_three_objects": "tracking_shuffled_objects_three_objects",  # (A)-(C)
    "tracking_shuffled_objects_three_objects": "logical_deduction_three_objects",
    "navigate": "sports_understanding",  # Yes / No and yes / no
    "sports_understanding": "navigate",
    "date_understanding": "movie_recommendation",  # lettered, five or six options
    "geometric_shapes": "reasoning_about_colored_objects",  # lettered, many options
}
# the other tasks of a BBH pool, shortest prompts first (a pool's cost is its tokens)
BBH_FILLERS = ["boolean_expressions", "movie_recommendation", "disambiguation_qa", "formal_fallacies",
               "reasoning_about_colored_objects", "logical_deduction_five_objects",
               "tracking_shuffled_objects_five_objects", "temporal_sequences", "logical_deduction_seven_objects",
               "tracking_shuffled_objects_seven_objects", "salient_translation_error_detection"]

SELECTORS: dict[str, dict] = {
    "random": {},
    "loss": {"focus": "high"},
    "delta_loss": {},
    "less": {"proj_dim": 8192, "seed": 7},
    "zeroth": {"direction": "eval_gradient", "seed": 7},
    "zeroth_norm": {"direction": "eval_gradient", "seed": 7, "normalize": True, "norm_directions": 8},
    "near": {"neighbours": 64},
    "tsds": {},
    "cluster_less": {"proj_dim": 8192, "seed": 7, "cluster_size": 16, "samples_per_cluster": 4},
}
# zeroth_norm costs 2 + 2 x norm_directions forwards per row: too slow for the CPU grid (see docs)
CPU_SELECTORS = [s for s in SELECTORS if s != "zeroth_norm"] + ["less_taskmax"]
# the two costliest CPU selectors (~85 and ~110 s of a ~450 s BBH pool): the CPU size runs them on each target's
# first draw only (--costly-draws), so the table's `pools` column says on how many pools each selector ran
COSTLY = ("cluster_less", "less_taskmax", "zeroth_norm")
EMBEDDING = ("near", "tsds", "cluster_less")
LOSS_BASED = ("loss", "delta_loss")
T975 = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 7: 2.365, 8: 2.306, 9: 2.262, 10: 2.228,
        11: 2.201, 12: 2.179, 13: 2.160, 14: 2.145, 15: 2.131, 16: 2.120, 17: 2.110, 18: 2.101, 19: 2.093,
        20: 2.086, 23: 2.069, 24: 2.064, 29: 2.045, 35: 2.030, 47: 2.012}


def t975(df: int) -> float:
    """Two-sided 95 % Student t quantile (table; the nearest smaller tabulated df, 1.96 beyond 60)."""
    if df <= 0:
        return float("nan")
    if df > 60:
        return 1.96
    return T975[max(k for k in T975 if k <= df)]


def mean_ci(values: list[float]) -> dict:
    """Mean and 95 % Student-t half-width over independent draws."""
    n = len(values)
    if n == 0:
        return {"n": 0, "mean": float("nan"), "ci": float("nan")}
    m = statistics.fmean(values)
    half = t975(n - 1) * statistics.stdev(values) / math.sqrt(n) if n > 1 else float("nan")
    return {"n": n, "mean": m, "ci": half}


def fmt(stat: dict, pct: bool = True) -> str:
    k = 100 if pct else 1
    if stat["n"] == 0:
        return "-"
    if math.isnan(stat["ci"]):
        return f"{k * stat['mean']:.1f}"
    return f"{k * stat['mean']:.1f} ± {k * stat['ci']:.1f}"


# --------------------------------------------------------------------------- pools
def pool_tasks(target: str, kind: str, data: str = "bigbench") -> list[str]:
    """The nine other tasks of a pool: fillers (plain), or the sibling and eight fillers (hard)."""
    sibling = sibling_of(target, data)
    fillers = [t for t in (BBH_FILLERS if data == "bbh" else FILLERS) if t not in (target, sibling)]
    return fillers[:9] if kind == "plain" else [sibling] + fillers[:8]


def write_level1_pool(folder: Path, target: str, kind: str, draw: int, paths: dict, per_task: int, n_eval: int,
                      wrong: float, data: str = "bigbench") -> dict:
    """A pool as LLaMA-Factory data, plus a second eval set of the sibling (``bb_eval_sibling``)."""
    others = pool_tasks(target, kind, data)
    if data == "bbh":  # BBH has no task prefixes: a hard pool is the one with the sibling in it
        seed = 1000 * draw + bb.BBH_MC.index(target)
        summary = bb.write_bbh_pool(folder, target, others, paths, seed=seed, per_task=per_task, n_eval=n_eval,
                                    n_test=0, wrong_share=wrong, sibling=others[0] if kind == "hard" else None)
        return {**summary, "others": others, "seed": seed}
    strip = kind == "hard"
    seed = 1000 * draw + ALL_TASKS.index(target)
    summary = bb.write_pool(folder, target, others, paths, seed=seed, target_train=per_task, other_train=per_task,
                            n_eval=n_eval, n_test=0, wrong_share=wrong, strip_prefix=strip)
    sibling = SIBLINGS[target]
    sq = bb.load_questions(sibling, paths[sibling], strip)
    # write_pool splits every other task with seed + 1 into [train, test]; the rows after those are unused
    _, _, sib_eval = bb.split_rows(sq, [per_task, 0, n_eval], seed + 1)
    (folder / "bb_eval_sibling.json").write_text(json.dumps([bb.row_of(q) for q in sib_eval], indent=0))
    info = json.loads((folder / "dataset_info.json").read_text())
    info["bb_eval_sibling"] = {"file_name": "bb_eval_sibling.json"}
    (folder / "dataset_info.json").write_text(json.dumps(info, indent=1))
    return {**summary, "others": others, "seed": seed}


# --data demo: the repo's generated tasks (dataflex.demo) instead of BIG-bench, so level 1 runs where the
# task files cannot be fetched. Siblings share the input's form: a word (reverse / vowels), numbers (add / sort).
DEMO_SIBLINGS = {"add": "sort", "sort": "add", "reverse": "vowels", "vowels": "reverse"}
HARD_INSTRUCTION = "Give the answer."


def sibling_of(target: str, data: str = "bigbench") -> str:
    return {"bbh": BBH_SIBLINGS, "demo": DEMO_SIBLINGS}.get(data, SIBLINGS)[target]


def write_demo_pool(folder: Path, target: str, kind: str, draw: int, per_task: int, n_eval: int,
                    wrong: float) -> dict:
    """A level-1 pool from the demo tasks, in the files and columns ``write_level1_pool`` writes: ``10 x per_task``
    rows of which ``per_task`` are the target's and the rest spread evenly over the other four tasks; ``wrong`` of
    all rows answer with another question's answer of the same task (right form, wrong value); eval sets of the
    target and of its sibling. ``hard`` pools give every row the same instruction, so only the inputs and answers
    tell the tasks apart (and a sibling has inputs of the same form)."""
    from dataflex.demo import MAKERS, TASK_INSTRUCTIONS

    tasks = sorted(MAKERS)
    seed = 1000 * draw + tasks.index(target) + (500 if kind == "hard" else 0)
    rng = random.Random(seed)
    seen: set[tuple[str, str]] = set()

    def fresh(task: str) -> tuple[str, str]:
        for _ in range(10000):
            inp, out = MAKERS[task](rng)
            if (task, inp) not in seen:
                seen.add((task, inp))
                return inp, out
        raise SystemExit(f"bench/real.py: the demo task {task!r} has too few distinct questions for this pool")

    def row(task: str, inp: str, out: str, is_wrong: bool = False, answer: str | None = None) -> dict:
        instruction = HARD_INSTRUCTION if kind == "hard" else TASK_INSTRUCTIONS[task]
        return {"instruction": instruction, "input": inp, "output": out, "task": task, "wrong": is_wrong,
                "answer": out if answer is None else answer}

    others = [t for t in tasks if t != target]
    n_pool = 10 * per_task
    counts = {target: per_task, **{t: (n_pool - per_task) // len(others) for t in others}}
    for t in others[:(n_pool - per_task) % len(others)]:
        counts[t] += 1
    pool = [(t, *fresh(t)) for t, n in counts.items() for _ in range(n)]
    rng.shuffle(pool)
    wrong_ids = set(rng.sample(range(len(pool)), round(wrong * len(pool))))
    train = []
    for i, (t, inp, out) in enumerate(pool):
        if i in wrong_ids:
            for _ in range(1000):  # another question's answer of the same task, different from the right one
                bad = MAKERS[t](rng)[1]
                if bad != out:
                    break
            train.append(row(t, inp, bad, True, out))
        else:
            train.append(row(t, inp, out))
    files = {"bb_train": train, "bb_eval": [row(target, *fresh(target)) for _ in range(n_eval)],
             "bb_eval_sibling": [row(sibling_of(target, "demo"), *fresh(sibling_of(target, "demo")))
                                 for _ in range(n_eval)]}
    for name, rows in files.items():
        (folder / f"{name}.json").write_text(json.dumps(rows, indent=0))
    (folder / "dataset_info.json").write_text(json.dumps({n: {"file_name": f"{n}.json"} for n in files}, indent=1))
    return {"train": len(train), "target_rows": per_task, "wrong_rows": len(wrong_ids), "eval": n_eval,
            "others": others, "seed": seed}


def pipeline_cfg(model: Path, data: Path, out: Path, cutoff: int, eval_dataset: str = "bb_eval", **extra) -> dict:
    from dataflex.assets import ASSETS

    return {"model_name_or_path": str(model), "stage": "sft", "do_train": True, "finetuning_type": "lora",
            "lora_target": "all", "lora_rank": 8, "lora_alpha": 16, "dataset": "bb_train",
            "eval_dataset": eval_dataset, "dataset_dir": str(data), "template": ASSETS["smollm2"].template,
            "cutoff_len": cutoff, "preprocessing_num_workers": 1, "overwrite_cache": True,
            "output_dir": str(out), "overwrite_output_dir": True, "report_to": "none", "bf16": False, "seed": 42,
            # rows of ~100 tokens: recomputing activations only slows the CPU down
            "disable_gradient_checkpointing": True, **extra}


class MemoEngine:
    """A ScoringEngine that, while ``memo_on``, remembers per-sample losses until ``bump`` (the model
    changed), so loss and delta_loss share one scoring pass at the same parameters. Off by default:
    zeroth perturbs the parameters in place and must see fresh losses."""

    def __new__(cls, model, collator, device):
        from dataflex.scoring.engine import ScoringEngine

        class _Memo(ScoringEngine):
            memo_on = False

            def losses(self, dataset, indices, batch_size=16, desc="scoring losses"):
                if not self.memo_on:
                    return super().losses(dataset, indices, batch_size, desc)
                key = (id(dataset), tuple(indices))
                if key not in self.memo:
                    self.memo[key] = super().losses(dataset, indices, batch_size, desc)
                return self.memo[key].clone()

            def bump(self):
                self.memo = {}

        engine = _Memo(model, collator, device, show_progress=False)
        engine.bump()
        return engine


def warmup_step(model, dataset, collator, lr: float, rows: int, seed: int):
    import torch

    trainable = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(trainable, lr=lr)
    ids = random.Random(seed).sample(range(len(dataset)), rows)
    model.train()
    opt.zero_grad()
    model(**collator([dataset[i] for i in ids])).loss.backward()
    opt.step()
    opt.zero_grad(set_to_none=True)
    model.eval()
    return opt


def make_selector(name: str, params: dict):
    import dataflex.selectors  # noqa: F401 - registers the built-in selectors
    from dataflex.component import REGISTRY

    cls = REGISTRY["selectors"][name]
    return cls(cls.Params.from_dict(name, dict(params)))


def selector_spec(label: str) -> tuple[str, dict]:
    """A bench label (``zeroth_norm``, ``less_taskmax``) -> the registered selector and its params."""
    params = dict(SELECTORS[label]) if label in SELECTORS else {}
    if label == "less_taskmax":
        return "less", {**SELECTORS["less"], "eval_aggregate": "task_max"}
    return label.split("_norm")[0], params


def run_level1_pool(model_path: Path, folder: Path, target: str, labels: list[str], args, draw: int,
                    two_target: bool) -> list[dict]:
    """Every selector on one pool, in-process with one model load. One result row per selector."""
    import torch

    from dataflex.diagnostics import load_pipeline
    from dataflex.selectors.base import SelectionContext

    rows = json.loads((folder / "bb_train.json").read_text())
    eval_sets = "bb_eval,bb_eval_sibling" if two_target else "bb_eval"
    t0 = time.perf_counter()
    pipe = load_pipeline(pipeline_cfg(model_path, folder, folder / "out", args.cutoff, eval_sets))
    load_s = time.perf_counter() - t0
    model, train, evals, collator = pipe["model"], pipe["train_dataset"], pipe["eval_dataset"], pipe["collator"]
    if len(train) != len(rows):
        raise SystemExit(f"bench/real.py: {len(train)} tokenized rows for {len(rows)} in {folder}")
    n_target_eval = len(json.loads((folder / "bb_eval.json").read_text()))
    groups = ([("target", 0, n_target_eval), ("sibling", n_target_eval, len(evals))] if two_target else None)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    model.to(device)
    engine = MemoEngine(model, collator, device)
    k = sum(r["task"] == target for r in rows)
    cache = Path(tempfile.mkdtemp(prefix="real-cache-", dir=folder))

    def ctx(selection: int, opt, lr: float, eval_groups=None) -> SelectionContext:
        return SelectionContext(step=selection, selection=selection, num_selections=2, num_samples=k,
                                train_dataset=train, scorer=engine,
                                generator=torch.Generator().manual_seed(1000 * draw + selection),
                                records_dir=str(cache), eval_dataset=evals, optimizer=opt, learning_rate=lr,
                                tokenizer=pipe["tokenizer"], cache_dir=str(cache), eval_groups=eval_groups)

    # task_max needs two eval groups: only the hard pools' two-target eval set has them
    instances = {label: make_selector(*selector_spec(label)) for label in labels
                 if two_target or label != "less_taskmax"}
    base_s = {}
    if "delta_loss" in instances:  # its baseline: the losses before training (its first selection)
        t0 = time.perf_counter()
        instances["delta_loss"].select(ctx(0, None, 0.0))
        base_s["delta_loss"] = time.perf_counter() - t0
    opt = warmup_step(model, train, collator, args.warmup_lr, args.warmup_rows, seed=draw)
    engine.bump()
    out = []
    for label, sel in instances.items():
        needs_groups = label == "less_taskmax"
        engine.memo_on = label in LOSS_BASED
        t0 = time.perf_counter()
        res = sel.select(ctx(1, opt, args.warmup_lr, groups if needs_groups else None))
        seconds = time.perf_counter() - t0 + base_s.get(label, 0.0)
        engine.memo_on = False
        picks = res.indices
        tasks = [rows[i]["task"] for i in picks]
        out.append({"selector": label, "k": k, "seconds": round(seconds, 2), "picks": picks,
                    "target_share": sum(t == target for t in tasks) / k,
                    "sibling_share": sum(t == sibling_of(target, args.data) for t in tasks) / k,
                    "wrong_share": sum(rows[i]["wrong"] for i in picks) / k,
                    "good_target_share": sum(rows[i]["task"] == target and not rows[i]["wrong"] for i in picks) / k})
        print(f"[real] {folder.name} {label:13s} target {out[-1]['target_share']:.2f} wrong "
              f"{out[-1]['wrong_share']:.2f} {seconds:6.1f}s", file=sys.stderr, flush=True)
    for r in out:
        r["load_s"] = round(load_s, 1)
    shutil.rmtree(cache, ignore_errors=True)
    return out


# what makes level-1 results comparable: a rerun with the same values resumes, other values start afresh
LEVEL1_KEYS = ("data", "per_task", "n_eval", "wrong", "cutoff", "warmup_lr", "warmup_rows")


def finished_level1(path: Path, args) -> list[dict]:
    """The pool results a previous run with the same pool settings left in ``level1.json``."""
    if not path.exists():
        return []
    old = json.loads(path.read_text())
    same = all(old.get("args", {}).get(k) == vars_of(args).get(k) for k in LEVEL1_KEYS)
    if not same:
        print(f"[real] {path} was made with other pool settings: level 1 starts afresh", file=sys.stderr)
    return old.get("results", []) if same else []


def level1(args, model_path: Path, paths: dict, out: Path) -> dict:
    results = finished_level1(out / "level1.json", args)
    labels = list(args.selectors)
    cells = [(kind, target, draw) for kind in args.kinds for target in args.targets for draw in range(args.draws)]
    for n, (kind, target, draw) in enumerate(cells, 1):
        done = {r["selector"] for r in results if (r["kind"], r["target"], r["draw"]) == (kind, target, draw)}
        todo = [label for label in labels if label not in done and (label not in COSTLY or draw < args.costly_draws)]
        print(f"[real] level 1 pool {n}/{len(cells)} {kind} {target} draw {draw}: "
              + (f"{len(todo)} selector(s) to run" if todo else "done before, skipped"), file=sys.stderr, flush=True)
        if not todo:
            continue
        folder = Path(tempfile.mkdtemp(prefix=f"real-{kind}-{target}-{draw}-"))
        try:
            if args.data == "demo":
                info = write_demo_pool(folder, target, kind, draw, args.per_task, args.n_eval, args.wrong)
            else:
                info = write_level1_pool(folder, target, kind, draw, paths, args.per_task, args.n_eval,
                                         args.wrong, args.data)
            two = kind == "hard" and "less_taskmax" in todo
            for r in run_level1_pool(model_path, folder, target, todo, args, draw, two):
                results.append({"kind": kind, "target": target, "draw": draw, "pool": info["train"],
                                "pool_wrong": info["wrong_rows"], **r})
        finally:
            shutil.rmtree(folder, ignore_errors=True)
        # after every pool: an interrupted run resumes from here
        (out / "level1.json").write_text(json.dumps({"results": results, "args": vars_of(args)}, indent=1))
    return summarise_level1(results, labels, args)


def summarise_level1(results: list[dict], labels: list[str], args) -> dict:
    table = []
    for kind in dict.fromkeys(r["kind"] for r in results):
        for label in labels:
            rs = [r for r in results if r["kind"] == kind and r["selector"] == label]
            if not rs:
                continue
            table.append({"kind": kind, "selector": label, "pools": len(rs),
                          **{m: mean_ci([r[m] for r in rs]) for m in
                             ("target_share", "wrong_share", "good_target_share", "sibling_share", "seconds")}})
    return {"table": table, "results": results}


def level1_markdown(summary: dict, args) -> str:
    made = (f"the target x {args.per_task}, the other four demo tasks the rest" if args.data == "demo"
            else f"10 tasks x {args.per_task}")
    lines = [f"Pools of {10 * args.per_task} rows ({made}; target share 10 %, planted wrong "
             f"answers {100 * args.wrong:.0f} %), eval {args.n_eval} target rows, one warm-up step; picks = target "
             "rows of the pool. Mean ± 95 % CI (Student t) over targets x draws"
             + (f" ({', '.join(c for c in COSTLY if c in args.selectors)}: the first {args.costly_draws} draw(s) of "
                "each target only)" if args.costly_draws < args.draws and set(COSTLY) & set(args.selectors) else "")
             + ".", "",
             "| pool | selector | pools | target share % | wrong-answer share % | correct target rows % "
             "| sibling share % | seconds |", "|---|---|---|---|---|---|---|---|"]
    for row in summary["table"]:
        lines.append(f"| {row['kind']} | {row['selector']} | {row['pools']} | {fmt(row['target_share'])} | "
                     f"{fmt(row['wrong_share'])} | {fmt(row['good_target_share'])} | "
                     f"{fmt(row['sibling_share']) if row['kind'] == 'hard' else '-'} | "
                     f"{fmt(row['seconds'], pct=False)} |")
    return "\n".join(lines) + "\n"


def taskmax_effect(results: list[dict]) -> list[dict]:
    """Per hard pool: how ``less`` with eval_aggregate task_max changed the picks of plain ``less``."""
    out = []
    by_pool: dict[tuple, dict] = {}
    for r in results:
        by_pool.setdefault((r["kind"], r["target"], r["draw"]), {})[r["selector"]] = r
    for (kind, target, draw), sels in by_pool.items():
        if "less" in sels and "less_taskmax" in sels:
            a, b = sels["less"], sels["less_taskmax"]
            out.append({"target": target, "draw": draw, "overlap": len(set(a["picks"]) & set(b["picks"])) / a["k"],
                        "less_target": a["target_share"], "less_sibling": a["sibling_share"],
                        "taskmax_target": b["target_share"], "taskmax_sibling": b["sibling_share"]})
    return out


def plot_level1(summary: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    kinds = list(dict.fromkeys(r["kind"] for r in summary["table"]))
    fig, axes = plt.subplots(1, len(kinds), figsize=(6 * len(kinds), 4), squeeze=False)
    for ax, kind in zip(axes[0], kinds):
        rows = [r for r in summary["table"] if r["kind"] == kind]
        xs = range(len(rows))
        for off, metric, colour in ((-0.2, "target_share", "tab:blue"), (0.2, "wrong_share", "tab:red")):
            ax.bar([x + off for x in xs], [100 * r[metric]["mean"] for r in rows], width=0.4, color=colour,
                   yerr=[0 if math.isnan(r[metric]["ci"]) else 100 * r[metric]["ci"] for r in rows], capsize=3,
                   label=metric.replace("_", " ") + " %")
        ax.axhline(10, color="grey", linestyle="--", linewidth=1, label="base rate (10 %)")
        ax.set_xticks(list(xs), [r["selector"] for r in rows], rotation=45, ha="right")
        ax.set_title(f"{kind} pools")
        ax.set_ylim(0, 105)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def vars_of(args) -> dict:
    return {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()}


# --------------------------------------------------------------------------- zeroth vs exact
def spearman(a: list[float], b: list[float]) -> float:
    """Spearman's rank correlation (no ties expected: continuous scores)."""
    ra = {i: r for r, i in enumerate(sorted(range(len(a)), key=lambda i: a[i]))}
    rb = {i: r for r, i in enumerate(sorted(range(len(b)), key=lambda i: b[i]))}
    n = len(a)
    return 1 - 6 * sum((ra[i] - rb[i]) ** 2 for i in range(n)) / (n * (n * n - 1))


def zeroth_rows(args, paths: dict, folder: Path) -> tuple[Path, str, str, str, list[dict], list[int]]:
    """(dataset_dir, train set, eval set, target task, the train rows, the checked row ids) of the check.

    ``bigbench``: a hard pool of the first target (its first ``--zeroth-rows`` rows). ``demo``: the repo's
    own demo_mix (six string / arithmetic tasks) against demo_add_eval, ``--zeroth-rows`` rows drawn evenly
    from the tasks: no download beyond the model, so it runs where BIG-bench cannot be fetched."""
    if args.zeroth_data == "demo":
        rows = json.loads((ROOT / "data" / "demo_mix_train.json").read_text())
        by_task: dict[str, list[int]] = {}
        for i, r in enumerate(rows):
            by_task.setdefault(r["task"], []).append(i)
        rng = random.Random(0)
        per = max(1, args.zeroth_rows // len(by_task))
        ids = sorted(i for members in by_task.values() for i in rng.sample(members, min(per, len(members))))
        return ROOT / "data", "demo_mix", "demo_add_eval", "add", rows, ids
    siblings = BBH_SIBLINGS if args.zeroth_data == "bbh" else SIBLINGS
    target = args.targets[0] if args.targets[0] in siblings else next(iter(siblings))
    write_level1_pool(folder, target, "hard", 0, paths, args.per_task, args.n_eval, args.wrong, args.zeroth_data)
    rows = json.loads((folder / "bb_train.json").read_text())
    return folder, "bb_train", "bb_eval", target, rows, list(range(min(args.zeroth_rows, len(rows))))


def zeroth_check(args, model_path: Path, paths: dict, out: Path) -> dict:
    """zeroth (direction: eval_gradient) on the real model against autograd: its finite difference vs the
    exact ∇f(z)·ḡ_eval, what the raw inner product ranks by (gradient norms), the cosines LESS ranks by,
    and ``normalize: true`` (the cosine from a few random directions) against the exact cosine."""
    import torch

    from dataflex.diagnostics import load_pipeline
    from dataflex.scoring.zeroth import ZerothOrderProbe, global_norm, tensor_direction
    from dataflex.selectors.base import SelectionContext

    folder = Path(tempfile.mkdtemp(prefix="real-zeroth-"))
    try:
        data_dir, dataset, eval_name, target, rows, ids = zeroth_rows(args, paths, folder)
        pipe = load_pipeline(pipeline_cfg(model_path, data_dir, folder / "out", args.cutoff, eval_name,
                                          dataset=dataset))
        model, train, evals, collator = pipe["model"], pipe["train_dataset"], pipe["eval_dataset"], pipe["collator"]
        tasks = [rows[i]["task"] for i in ids]
        sub = train.select(ids)  # the checked rows, positions 0..n-1
        n = len(ids)
        engine = MemoEngine(model, collator, "cpu")
        opt = warmup_step(model, train, collator, args.warmup_lr, args.warmup_rows, seed=0)
        engine.bump()
        t0 = time.perf_counter()
        probe = ZerothOrderProbe(engine, 1e-3)
        grad, _ = probe.eval_gradient(evals, list(range(len(evals))), 8)
        norm = global_norm(grad)
        root_n = probe.num_params ** 0.5
        fd = {}
        for eps in (1e-3, 1e-2):
            probe_e = ZerothOrderProbe(engine, eps)
            (d,) = probe_e.differences([(sub, list(range(n)))], [tensor_direction(grad, root_n / norm)], 8,
                                       h=probe_e.step())
            engine.bump()
            fd[eps] = (d[:, 0] * norm / root_n).tolist()
        fd_seconds = time.perf_counter() - t0
        params = [p for _, p in probe.params]
        exact, gnorm = [], []
        model.eval()
        t0 = time.perf_counter()
        for j in range(n):
            loss = model(**collator([sub[j]])).loss
            gs = torch.autograd.grad(loss, params)
            exact.append(sum(float((g.double() * e.double()).sum()) for g, e in zip(gs, grad)))
            gnorm.append(math.sqrt(sum(float(g.double().pow(2).sum()) for g in gs)))
        exact_seconds = time.perf_counter() - t0
        cos = [e / (g * norm) if g > 0 else float("nan") for e, g in zip(exact, gnorm)]

        def ctx(seed: int = 0) -> SelectionContext:
            return SelectionContext(step=1, selection=1, num_selections=2, num_samples=n, train_dataset=sub,
                                    scorer=engine, generator=torch.Generator().manual_seed(seed),
                                    eval_dataset=evals, optimizer=opt, learning_rate=args.warmup_lr,
                                    cache_dir=str(folder))

        def scores_of(name: str, params: dict) -> tuple[list[float], float]:
            t = time.perf_counter()
            res = make_selector(name, params).select(ctx())
            engine.bump()
            got = dict(zip(res.indices, res.per_sample["score"]))
            return [got[j] for j in range(n)], time.perf_counter() - t

        less, less_s = scores_of("less", {**SELECTORS["less"], "cumulative": False})
        less_sgd, _ = scores_of("less", {**SELECTORS["less"], "cumulative": False, "gradient_type": "sgd"})
        norm_scores = {}
        for nd in (8, 32):
            norm_scores[nd] = scores_of("zeroth", {"direction": "eval_gradient", "seed": 7, "normalize": True,
                                                   "norm_directions": nd})
        k = max(1, n // 10)
        top = lambda v: set(sorted(range(n), key=lambda i: -v[i])[:k])  # noqa: E731
        rel = lambda a: max(abs(x - y) / max(abs(y), 1e-12) for x, y in zip(a, exact))  # noqa: E731
        share = lambda v: sum(tasks[i] == target for i in top(v)) / k  # noqa: E731
        result = {
            "data": args.zeroth_data, "target": target, "rows": n, "target_rows": tasks.count(target),
            "trainable_params": probe.num_params, "fd_step_h_eps1e-3": probe.step(), "eval_grad_norm": norm,
            "max_rel_error_fd_eps1e-3": rel(fd[1e-3]), "max_rel_error_fd_eps1e-2": rel(fd[1e-2]),
            "spearman_fd_vs_exact": spearman(fd[1e-3], exact),
            "spearman_exact_dot_vs_grad_norm": spearman(exact, gnorm),
            "spearman_exact_cos_vs_grad_norm": spearman(cos, gnorm),
            "spearman_exact_dot_vs_exact_cos": spearman(exact, cos),
            "spearman_exact_dot_vs_less": spearman(exact, less),
            "spearman_exact_cos_vs_less": spearman(cos, less),
            "spearman_exact_cos_vs_less_sgd": spearman(cos, less_sgd),
            "spearman_normalize8_vs_exact_cos": spearman(norm_scores[8][0], cos),
            "spearman_normalize32_vs_exact_cos": spearman(norm_scores[32][0], cos),
            "spearman_normalize8_vs_less": spearman(norm_scores[8][0], less),
            f"top{k}_overlap_dot_vs_less": len(top(exact) & top(less)) / k,
            f"top{k}_overlap_cos_vs_less": len(top(cos) & top(less)) / k,
            f"top{k}_overlap_normalize8_vs_cos": len(top(norm_scores[8][0]) & top(cos)) / k,
            "grad_norm_top_dot_over_pool_mean": statistics.fmean(gnorm[i] for i in top(exact)) / statistics.fmean(gnorm),
            "target_share_top_dot": share(exact), "target_share_top_cos": share(cos), "target_share_top_less": share(less),
            "target_share_top_normalize8": share(norm_scores[8][0]),
            "target_share_top_normalize32": share(norm_scores[32][0]),
            "seconds": {"fd_two_steps": round(fd_seconds, 1), "exact_autograd": round(exact_seconds, 1),
                        "less": round(less_s, 1), "normalize8": round(norm_scores[8][1], 1),
                        "normalize32": round(norm_scores[32][1], 1)},
            "per_row": [{"row": i, "task": tasks[j], "exact": exact[j], "fd_1e-3": fd[1e-3][j], "fd_1e-2": fd[1e-2][j],
                         "grad_norm": gnorm[j], "cos": cos[j], "less": less[j], "less_sgd": less_sgd[j],
                         "normalize8": norm_scores[8][0][j], "normalize32": norm_scores[32][0][j]}
                        for j, i in enumerate(ids)],
        }
        (out / f"zeroth_check{'_demo' if args.zeroth_data == 'demo' else ''}.json").write_text(
            json.dumps({**result, "machine": machine_info()}, indent=1))
        return result
    finally:
        shutil.rmtree(folder, ignore_errors=True)


# --------------------------------------------------------------------------- main
def cpu_seconds() -> float:
    """User + system CPU seconds of this process and of its finished child processes (compare's training runs)."""
    import resource

    own, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + kids.ru_utime + kids.ru_stime


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="<= 10 minutes on a 2-core CPU")
    ap.add_argument("--full", action="store_true", help="the full grid (for a GPU machine)")
    ap.add_argument("--plan-only", action="store_true", help="print the grid and check the arguments; load nothing")
    ap.add_argument("--levels", default=None, help="comma-separated: 1, 2, zeroth (default 1,2; --data demo: 1)")
    ap.add_argument("--targets", default=None, help=f"comma-separated, of {', '.join(SIBLINGS)}")
    ap.add_argument("--kinds", default=None, help="comma-separated, of plain, hard (--quick: hard only)")
    ap.add_argument("--draws", type=int, default=None)
    ap.add_argument("--per-task", type=int, default=None, help="training rows per task (the target is 1/10)")
    ap.add_argument("--n-eval", type=int, default=16)
    ap.add_argument("--wrong", type=float, default=0.1)
    ap.add_argument("--cutoff", type=int, default=256)
    ap.add_argument("--selectors", default=None)
    ap.add_argument("--costly-draws", type=int, default=None,
                    help=f"run {', '.join(COSTLY)} on the first N draws of each target only (default: every draw; "
                         "the CPU size: 1)")
    ap.add_argument("--warmup-lr", type=float, default=2e-4)
    ap.add_argument("--warmup-rows", type=int, default=8)
    ap.add_argument("--zeroth-rows", type=int, default=40)
    ap.add_argument("--zeroth-data", choices=("bbh", "bigbench", "demo"), default="bbh",
                    help="the zeroth check's rows: a BBH or BIG-bench hard pool, or the repo's demo_mix vs demo_add_eval")
    ap.add_argument("--data", choices=("bbh", "bigbench", "demo"), default="bbh",
                    help="the tasks: BBH (default; ../shared/data/bbh, $DATAFLEX_BBH_DIR or a checked download), "
                         "BIG-bench (the bigbench 1.0.0 sdist), or the repo's generated demo tasks (no download but "
                         "the model; level 1 only)")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", type=Path, default=None)
    # level 2 (bench/bbh_level2.py cells, through dataflex.compare)
    ap.add_argument("--l2-targets", default=None, help=f"comma-separated, of {', '.join(L2_TARGETS)} (any "
                                                       "multiple-choice BBH task is accepted)")
    ap.add_argument("--l2-families", default=None, help=f"comma-separated, of {', '.join(L2_FAMILIES)}")
    ap.add_argument("--l2-seeds", type=int, default=None)
    ap.add_argument("--l2-steps", type=int, default=None)
    ap.add_argument("--l2-train", type=int, default=96, help="the target's training rows (see bench/bbh_level2.py)")
    ap.add_argument("--l2-test", type=int, default=None, help="held-out target questions (default 100; --quick 50)")
    ap.add_argument("--l2-eval-every", type=int, default=None, help="steps between measured checkpoints")
    args = ap.parse_args(argv)
    size = "quick" if args.quick else "full" if args.full else "cpu"
    defaults = {  # per size: targets, draws, per_task, selectors
        "quick": (["strategyqa"], 1, 3, CPU_SELECTORS),
        "cpu": (["strategyqa", "navigate", "implicatures"], 1, 5, CPU_SELECTORS),
        "full": (list(SIBLINGS), 3, 20, list(SELECTORS) + ["less_taskmax"]),
    }[size]
    if args.data == "bbh":
        defaults = {
            "quick": (["navigate"], 1, 3, CPU_SELECTORS),
            "cpu": (list(BBH_SIBLINGS), 3, 5, CPU_SELECTORS),
            "full": (list(BBH_SIBLINGS), 3, 20, defaults[3]),
        }[size]
    # level 2 per size: targets, families, seeds, steps
    l2_defaults = {"quick": (["boolean_expressions"], ["weight"], 1, 6),
                   "cpu": (["boolean_expressions"], list(L2_FAMILIES), 3, 24),
                   "full": (list(L2_TARGETS), list(L2_FAMILIES), 3, 48)}[size]
    args.levels = args.levels or ("1" if args.data != "bbh" else "1,2")
    if args.data != "bbh" and "2" in args.levels.split(","):
        raise SystemExit(f"bench/real.py: --data {args.data}: level 2 runs on BBH only (bench/bbh_level2.py); "
                         "use --levels 1 (or zeroth)")
    if args.data == "demo":
        defaults = (list(DEMO_SIBLINGS), *defaults[1:])
    args.targets = args.targets.split(",") if args.targets else defaults[0]
    args.draws = args.draws or defaults[1]
    if args.costly_draws is None:
        args.costly_draws = 1 if size == "cpu" else args.draws
    if args.costly_draws < 0:
        raise SystemExit("bench/real.py: --costly-draws must be 0 or more")
    args.per_task = args.per_task or defaults[2]
    args.selectors = args.selectors.split(",") if args.selectors else defaults[3]
    args.l2_targets = args.l2_targets.split(",") if args.l2_targets else l2_defaults[0]
    args.l2_families = args.l2_families.split(",") if args.l2_families else l2_defaults[1]
    args.l2_seeds = args.l2_seeds or l2_defaults[2]
    args.l2_steps = args.l2_steps or l2_defaults[3]
    args.l2_test = args.l2_test or (50 if args.quick else 100)
    if args.quick and args.l2_eval_every is None:  # one measurement at the end (a 6-step run measured every step
        args.l2_eval_every = args.l2_steps          # spent most of --quick's 10 minutes in evaluation)
    # the CPU sizes keep the hard pools only (a plain pool is separated by its task prefixes alone, and a pool
    # with every CPU selector costs ~6 minutes on one thread): --quick's both pools took ~9 of its 10 minutes
    args.kinds = args.kinds.split(",") if args.kinds else (["plain", "hard"] if size == "full" else ["hard"])
    levels = args.levels.split(",")
    targets = {"bbh": BBH_SIBLINGS, "demo": DEMO_SIBLINGS}.get(args.data, SIBLINGS)
    for key, values, allowed in (("--targets", args.targets, targets),
                                 ("--l2-targets", args.l2_targets, bb.BBH_MC),
                                 ("--l2-families", args.l2_families, L2_FAMILIES),
                                 ("--kinds", args.kinds, ("plain", "hard")),
                                 ("--selectors", args.selectors, [*SELECTORS, "less_taskmax"]),
                                 ("--levels", levels, ("1", "2", "zeroth"))):
        bad = [v for v in values if v not in allowed]
        if bad:
            raise SystemExit(f"bench/real.py: {key}: unknown {bad[0]!r}; allowed: {', '.join(allowed)}")
    for key in ("l2_seeds", "l2_steps", "l2_train", "l2_test"):
        if getattr(args, key) < 1:
            raise SystemExit(f"bench/real.py: --{key.replace('_', '-')} must be at least 1")
    name = "bbh" if args.data == "bbh" else "real"
    out = args.out or ROOT / "bench" / "out" / ((f"{name}-quick" if args.quick else f"{name}-full" if args.full else name)
                                               + ("-demo" if args.data == "demo" else ""))
    grid = {"size": size, "data": args.data, "levels": levels, "level1_pools": len(args.kinds) * len(args.targets) * args.draws,
            "selectors": args.selectors, "targets": args.targets, "kinds": args.kinds, "draws": args.draws,
            "costly_draws": args.costly_draws,
            "pool_rows": 10 * args.per_task, "level2_cells": [f"{t}/{f}" for t in args.l2_targets for f in args.l2_families],
            "l2_seeds": args.l2_seeds, "l2_steps": args.l2_steps}
    print(json.dumps(grid, indent=1))
    if args.plan_only:
        return 0
    import torch

    torch.set_num_threads(args.threads)
    out.mkdir(parents=True, exist_ok=True)
    from dataflex.assets import fetch_locked

    started, cpu_started = time.perf_counter(), cpu_seconds()
    model_path = fetch_locked("smollm2")
    sources = {args.data} & {"bbh", "bigbench"} if ("1" in levels or "2" in levels) else set()
    if "zeroth" in levels:
        sources |= {args.zeroth_data} & {"bbh", "bigbench"}
    paths = bb.fetch_tasks(ALL_TASKS) if "bigbench" in sources else {}
    if "bbh" in sources:
        try:
            paths.update(bb.fetch_bbh(bb.BBH_MC))
        except bb.TaskFileError as exc:
            print(f"bench/real.py: error: {exc}", file=sys.stderr)
            return 2
    report: dict[str, Any] = {"grid": grid}
    if "zeroth" in levels:
        report["zeroth_check"] = {k: v for k, v in zeroth_check(args, model_path, paths, out).items() if k != "per_row"}
        print(json.dumps(report["zeroth_check"], indent=1))
    if "1" in levels:
        summary = level1(args, model_path, paths, out)
        md = level1_markdown(summary, args)
        effect = taskmax_effect(summary["results"])
        if effect:
            md += ("\n`less` vs `less` with `eval_aggregate: task_max` on the hard pools (eval = target + sibling rows, "
                   "two eval datasets):\n\n| target | draw | overlap of picks | less target / sibling % | "
                   "task_max target / sibling % |\n|---|---|---|---|---|\n")
            for e in effect:
                md += (f"| {e['target']} | {e['draw']} | {100 * e['overlap']:.0f} % | {100 * e['less_target']:.0f} / "
                       f"{100 * e['less_sibling']:.0f} | {100 * e['taskmax_target']:.0f} / "
                       f"{100 * e['taskmax_sibling']:.0f} |\n")
        (out / "level1.md").write_text(md)
        (out / "level1.json").write_text(json.dumps({**summary, "taskmax_effect": effect, "args": vars_of(args),
                                                     "machine": machine_info()}, indent=1))
        plot_level1(summary, out / "precision.png")
        report["level1"] = md
        print(md)
    if "2" in levels:
        cells = level2(args, out)
        report["level2"] = cells
        (out / "level2.json").write_text(json.dumps({"cells": cells, "args": vars_of(args), "machine": machine_info()},
                                                    indent=1))
    report["seconds"] = round(time.perf_counter() - started, 1)
    report["cpu_seconds"] = round(cpu_seconds() - cpu_started, 1)
    print(f"[real] done in {report['seconds']} s wall, {report['cpu_seconds']} s of CPU (this process and the "
          f"training processes it ran: the load-independent cost); tables in {out}", file=sys.stderr)
    return 0


# Level 2 is bench/bbh_level2.py: one dataflex.compare cell per (target, family). The targets are tasks the
# ceiling probe (bench/bbh_probe.py) found learnable: boolean_expressions (short prompts, the CPU grid's) and
# geometric_shapes (the one learnable beyond its answer prior; long prompts, ~7x the CPU cost).
L2_FAMILIES = ("weight", "reorder", "select", "mix", "doremi")
L2_TARGETS = ("boolean_expressions", "geometric_shapes")


def cells_root(args, out: Path) -> Path:
    """Where the level-2 cells go: the CPU grid's are the tracked ones (bench/out/bbh-level2, where
    bench/bbh_level2.py puts them); --quick's and --full's (other sizes, same cell names) and any --out's
    stay under the run's own folder, so a quick run never overwrites a verdict."""
    default_grid = args.out is None and not args.quick and not args.full
    return ROOT / "bench" / "out" / "bbh-level2" if default_grid else out / "level2"


def level2(args, out: Path) -> list[dict]:
    """Run (or resume) every level-2 cell; returns what each wrote (its compare.json tables)."""
    import bbh_level2

    root = cells_root(args, out)
    cells = []
    for target in args.l2_targets:
        for family in args.l2_families:
            print(f"[real] level 2 cell {target} / {family} ...", file=sys.stderr, flush=True)
            argv = ["--target", target, "--family", family, "--seeds", str(args.l2_seeds), "--steps",
                    str(args.l2_steps), "--test", str(args.l2_test), "--train", str(args.l2_train),
                    "--out", str(root / f"{target}-{family}")]
            if args.l2_eval_every:
                argv += ["--eval-every", str(args.l2_eval_every)]
            if args.full and family == "select":  # equal compute the long way too: random trains on to 2x the steps
                argv += ["--budget", "both"]
            code = bbh_level2.main(argv)
            if code:
                raise SystemExit(code)
            cells.append({"target": target, "family": family,
                          "tables": json.loads((root / f"{target}-{family}" / "compare.json").read_text())["tables"]})
    return cells


if __name__ == "__main__":
    raise SystemExit(main())
