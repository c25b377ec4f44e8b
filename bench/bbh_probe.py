"""Which BBH tasks can SmolLM2-135M learn at a CPU budget? The ceiling probe before any verdict.

    python bench/bbh_probe.py                    # every multiple-choice BBH task, cheapest first
    python bench/bbh_probe.py --tasks navigate,sports_understanding --epochs 4 --lr 2e-4 --out /tmp/probe-lr2e-4
    python bench/bbh_probe.py --quick            # two short tasks, a few steps (a smoke run)

Per task (the BBH files of ``bench/mc_tasks.py``: ``$DATAFLEX_BBH_DIR``, ``../shared/data/bbh``, or a
checked download), a seeded split gives ``--train`` training and ``--test`` held-out questions. The
**floor** is the untrained model on the held-out questions; the **ceiling** trains a LoRA adapter on the
task's own training rows through ``dataflex-cli train`` (plain LLaMA-Factory SFT: loss on the answer
tokens only) and is scored after every epoch. Scoring is multiple choice over the task's answer set
(one forward per question, the product's ``ChoiceScorer`` through ``mc_tasks.scorer_for``) plus two
continuous metrics: the mean log-likelihood of the correct answer, and its log-probability *within the
answer set* (which a model cannot raise by only learning the answer format). The answer balance of both
splits is reported: a model that only learned the training answers' prior scores about the test set's
``majority`` share.

A task is **learnable** at this budget when the best epoch's 95 % interval lies above the floor's.

Resumable: every finished piece (data, floor, training run, checkpoint score) is kept under ``--out``
with the settings it was made with (``settings.json``), and a rerun with the same settings skips it (other
settings are refused, one line naming the option, rather than reported under the new values). The small
per-task JSON files are enough to resume: they are tracked in git, the training runs are not.
``probe.json`` / ``probe.md`` are rewritten after every task. Compute is counted in work, not wall time:
``train_tokens`` is the token passes (forward + backward) of training, ``eval_tokens`` those of scoring, so
the table means the same on a loaded machine.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("DISABLE_VERSION_CHECK", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import mc_tasks as mt  # noqa: E402
from _common import ROOT  # noqa: E402

DEFAULT_OUT = ROOT / "bench" / "out" / "bbh-probe"


def split(questions: list, n_train: int, n_test: int, seed: int) -> tuple[list, list]:
    """Disjoint seeded training and held-out questions (the held-out ones first, so ``--train`` can
    change without changing the test set)."""
    import random

    order = list(questions)
    random.Random(seed).shuffle(order)
    return order[n_test:n_test + n_train], order[:n_test]


def write_data(folder: Path, task: str, path: Path, args) -> dict:
    """The task's training and held-out rows as LLaMA-Factory data; returns their summary."""
    qs, dropped = mt.load_bbh(task, path)
    train, test = split(qs, args.train, args.test, args.seed)
    folder.mkdir(parents=True, exist_ok=True)
    for name, rows in (("train", train), ("test", test)):
        (folder / f"{name}.json").write_text(json.dumps([mt.bbh_row(q) for q in rows], indent=0))
    (folder / "dataset_info.json").write_text(json.dumps({"probe_train": {"file_name": "train.json"}}, indent=1))
    test_balance = mt.answer_balance(test)
    top = mt.answer_balance(train)["majority_answer"]
    test_balance["majority_by_train"] = sum(q.target == top for q in test) / len(test)
    return {"task": task, "answers": len(qs[0].answers), "dropped": dropped, "train": mt.answer_balance(train),
            "test": test_balance}


def train_cfg(model: Path, data: Path, out: Path, args, steps_per_epoch: int) -> dict:
    from dataflex.assets import ASSETS

    return {"model_name_or_path": str(model), "stage": "sft", "do_train": True, "finetuning_type": "lora",
            "lora_target": "all", "lora_rank": args.rank, "lora_alpha": 2 * args.rank, "dataset": "probe_train",
            "dataset_dir": str(data), "template": ASSETS["smollm2"].template, "cutoff_len": args.cutoff,
            "preprocessing_num_workers": 1, "overwrite_cache": True, "output_dir": str(out),
            "overwrite_output_dir": True, "report_to": "none", "bf16": False, "seed": 42 + args.seed,
            "per_device_train_batch_size": args.batch, "gradient_accumulation_steps": 1,
            "learning_rate": args.lr, "lr_scheduler_type": "constant", "num_train_epochs": float(args.epochs),
            "save_steps": steps_per_epoch, "save_only_model": True, "logging_steps": steps_per_epoch,
            "plot_loss": False, "dataloader_num_workers": 0, "disable_gradient_checkpointing": True}


def train(cfg: dict, folder: Path, threads: int) -> float:
    """Train through ``dataflex-cli train`` (one process, ``threads`` torch threads); its seconds."""
    import yaml

    path = folder / "train.yaml"
    path.write_text(yaml.safe_dump(cfg))
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, "-c", "from dataflex.cli import main; main()", "train", str(path)],
                          capture_output=True, text=True, env=env)
    if proc.returncode != 0:
        tail = "\n".join((proc.stdout + proc.stderr).splitlines()[-30:])
        raise SystemExit(f"bench/bbh_probe.py: dataflex-cli train {path} failed:\n{tail}")
    return time.perf_counter() - t0


def token_counts(scorer, rows: list[dict], cutoff: int) -> tuple[int, int]:
    """(tokens of one training pass over ``rows``, tokens of scoring them): prompt + answer, cut at
    ``cutoff``; scoring runs each prompt once and every answer of the set."""
    train = score = 0
    for r in rows:
        prompt, resp = scorer.encode(r["instruction"], r["output"])
        train += min(len(prompt) + len(resp), cutoff)
        score += len(prompt) + sum(len(scorer.encode(r["instruction"], a)[1]) for a in r["options"])
    return train, score


def score(model, tok, rows: list[dict]) -> dict:
    return mt.choice_eval(mt.scorer_for(model, tok), rows)


def load_model(model_path: Path, adapter: Path | None = None):
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.float32)
    if adapter is not None:
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, adapter).merge_and_unload()
    return model.eval()


# what a task's pieces (split, floor, run, scores) depend on: recorded beside them in settings.json
PIECE_KEYS = ("train", "test", "seed", "epochs", "lr", "batch", "rank", "cutoff")


def check_settings(cell: Path, task: str, args) -> None:
    """Refuse to reuse a task's pieces made with other settings (they would be reported under these), and
    record the settings of a task begun now. One line naming the option that differs."""
    want = {k: getattr(args, k) for k in PIECE_KEYS}
    path = cell / "settings.json"
    if path.exists():
        have = json.loads(path.read_text())
        diff = [k for k in PIECE_KEYS if have.get(k) != want[k]]
        if diff:
            raise SystemExit(f"bench/bbh_probe.py: {task} under {cell.parent.parent} was probed with "
                             + ", ".join(f"--{k} {have.get(k)}" for k in diff) + " (this run: "
                             + ", ".join(f"--{k} {want[k]}" for k in diff) + "); rerun with those values, or "
                             "give another --out")
        return
    made = sorted(p.name for p in cell.glob("*.json"))
    if made:
        raise SystemExit(f"bench/bbh_probe.py: {cell} holds {', '.join(made)} but no settings.json: what they were "
                         "made with is unknown; delete the folder, or give another --out")
    if not args.table_only:
        cell.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(want, indent=1) + "\n")


def probe_task(task: str, path: Path, model_path: Path, tok, out: Path, args) -> dict | None:
    """One task's floor, training run and per-epoch scores, each made only when not on disk already (and
    only with the settings they were made with). With ``--table-only`` nothing is made: a task with a missing
    piece gives None."""
    cell = out / "tasks" / task
    check_settings(cell, task, args)
    if args.table_only and not all((cell / f"{name}.json").exists()
                                   for name in ["data", "floor", *(f"epoch-{e}" for e in range(1, args.epochs + 1))]):
        return None
    data = cell / "data"
    summary_path = cell / "data.json"
    if not summary_path.exists() or not (data / "train.json").exists():  # the split is seeded: written again alike
        summary_path.parent.mkdir(parents=True, exist_ok=True)
        summary = write_data(data, task, path, args)
        summary_path.write_text(json.dumps(summary, indent=1))
    summary = json.loads(summary_path.read_text())
    train_rows = json.loads((data / "train.json").read_text())
    test_rows = json.loads((data / "test.json").read_text())
    steps_per_epoch = math.ceil(len(train_rows) / args.batch)

    def scored(name: str, adapter: Path | None) -> dict:
        target = cell / f"{name}.json"
        if not target.exists():
            t0 = time.perf_counter()
            res = score(load_model(model_path, adapter), tok, test_rows)
            res["seconds"] = time.perf_counter() - t0
            target.write_text(json.dumps(res, indent=1))
        return json.loads(target.read_text())

    floor = scored("floor", None)
    run = cell / "run"
    scores_kept = all((cell / f"epoch-{e}.json").exists() for e in range(1, args.epochs + 1))
    if not scores_kept and not (run / "train_results.json").exists():
        seconds = train(train_cfg(model_path, data, run, args, steps_per_epoch), cell, args.threads)
        (cell / "train_seconds.json").write_text(json.dumps({"seconds": seconds}))
    epochs = []
    for e in range(1, args.epochs + 1):
        ckpt = run / f"checkpoint-{e * steps_per_epoch}"
        if not (cell / f"epoch-{e}.json").exists() and not ckpt.is_dir():
            raise SystemExit(f"bench/bbh_probe.py: {ckpt} is missing; delete {run} to train again")
        epochs.append({"epoch": e, "step": e * steps_per_epoch, **scored(f"epoch-{e}", ckpt)})
    scorer = mt.scorer_for(None, tok)  # counting needs the template, not a model
    train_tok, _ = token_counts(scorer, train_rows, args.cutoff)
    _, eval_tok = token_counts(scorer, test_rows, args.cutoff)
    best = max(epochs, key=lambda r: r["acc_sum"])
    majority = summary["test"]["majority_by_train"]
    learnable = best["ci_sum"][0] > floor["ci_sum"][1]
    return {**summary, "floor": _brief(floor), "epochs": [_brief(r) | {"epoch": r["epoch"]} for r in epochs],
            "best_epoch": best["epoch"], "learnable": learnable,
            # learnable, and above what answering the training set's most common answer every time scores
            "beats_prior": learnable and best["ci_sum"][0] > majority,
            "train_seconds": json.loads((cell / "train_seconds.json").read_text())["seconds"]
            if (cell / "train_seconds.json").exists() else None,
            "train_tokens": train_tok * args.epochs, "eval_tokens": eval_tok * (1 + args.epochs)}


def _brief(res: dict) -> dict:
    return {k: res[k] for k in ("n", "acc_sum", "ci_sum", "acc_mean", "loglik", "set_logprob", "seconds") if k in res}


def markdown(results: list[dict], args) -> str:
    lines = [f"BBH ceiling probe: SmolLM2-135M-Instruct, LoRA r{args.rank} (all linears), {args.train} training "
             f"rows per task, {args.epochs} epoch(s), lr {args.lr} (constant), batch {args.batch}, "
             f"{args.test} held-out questions, split seed {args.seed}. Accuracy: the answer with the highest "
             "summed log-likelihood among the task's answer set; 95 % Wilson intervals. `majority`: the test "
             "share of the training set's most common answer (what learning the prior alone gives). "
             "`set logp`: mean log-probability of the correct answer within the answer set. `learnable`: the "
             "best epoch's interval lies above the floor's; `beyond prior`: learnable, and the interval also lies "
             "above `majority`, so the gain is more than learning which answer is common.", "",
             "| task | answers | chance | majority | floor | best epoch | ceiling | set logp floor -> best | "
             "learnable | beyond prior | train tokens | train s |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in results:
        f, b = r["floor"], r["epochs"][r["best_epoch"] - 1]
        maj = r["test"].get("majority_by_train", r["test"]["majority"])
        lines.append(f"| {r['task']} | {r['answers']} | {r['test']['chance']:.2f} | {maj:.2f} | "
                     f"{f['acc_sum']:.2f} [{f['ci_sum'][0]:.2f}, {f['ci_sum'][1]:.2f}] | {r['best_epoch']} | "
                     f"{b['acc_sum']:.2f} [{b['ci_sum'][0]:.2f}, {b['ci_sum'][1]:.2f}] | "
                     f"{f['set_logprob']:.2f} -> {b['set_logprob']:.2f} | {'yes' if r['learnable'] else 'no'} | "
                     f"{'yes' if r['beats_prior'] else 'no'} | "
                     f"{r['train_tokens']} | {r['train_seconds'] or 0:.0f} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--tasks", default="all", help=f"comma-separated, of {', '.join(mt.BBH_MC)} (default all)")
    ap.add_argument("--train", type=int, default=96, help="training questions per task")
    ap.add_argument("--test", type=int, default=100, help="held-out questions per task")
    ap.add_argument("--epochs", type=int, default=3)
    ap.add_argument("--lr", type=float, default=5e-4, help="constant learning rate (the published probe's)")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--cutoff", type=int, default=512)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--quick", action="store_true", help="two short tasks, 16 rows, 1 epoch, 40 questions")
    ap.add_argument("--out", type=Path, default=None)
    ap.add_argument("--table-only", action="store_true",
                    help="rewrite probe.json / probe.md from the finished tasks under --out; train and score nothing")
    args = ap.parse_args(argv)
    if args.quick:
        args.tasks = "sports_understanding,navigate" if args.tasks == "all" else args.tasks
        args.train, args.test, args.epochs = 16, 40, 1
    tasks = list(mt.BBH_MC) if args.tasks == "all" else [t for t in args.tasks.split(",") if t]
    bad = [t for t in tasks if t not in mt.BBH_MC]
    if bad:
        ap.error(f"--tasks: {', '.join(bad)} not multiple-choice BBH tasks; choose from {', '.join(mt.BBH_MC)}")
    for name in ("train", "test", "epochs", "batch", "rank", "threads"):
        if getattr(args, name) < 1:
            ap.error(f"--{name} must be at least 1")
    out = args.out or (DEFAULT_OUT.with_name("bbh-probe-quick") if args.quick else DEFAULT_OUT)
    try:
        paths = mt.fetch_bbh(tasks)
    except mt.TaskFileError as exc:
        print(f"bench/bbh_probe.py: error: {exc}", file=sys.stderr)
        return 2
    import torch
    from transformers import AutoTokenizer

    from dataflex.assets import fetch_locked

    torch.set_num_threads(args.threads)
    model_path = fetch_locked("smollm2")
    tok = AutoTokenizer.from_pretrained(model_path)
    # cheapest first: a task's cost is its prompts' length
    tasks.sort(key=lambda t: sum(len(q.input) for q in mt.load_bbh(t, paths[t])[0]))
    out.mkdir(parents=True, exist_ok=True)
    (out / "args.json").write_text(json.dumps({k: str(v) for k, v in vars(args).items()}, indent=1))
    # probe.json names its folder relative to the repository when it lies inside it (a tracked file)
    shown = str(out.resolve().relative_to(ROOT) if out.resolve().is_relative_to(ROOT) else out)
    results = []
    for i, task in enumerate(tasks, 1):
        t0 = time.perf_counter()
        print(f"[probe] {i}/{len(tasks)} {task} ...", file=sys.stderr, flush=True)
        res = probe_task(task, paths[task], model_path, tok, out, args)
        if res is None:
            print(f"[probe] {i}/{len(tasks)} {task}: not finished, left out of the table", file=sys.stderr)
            continue
        results.append(res)
        f, b = res["floor"], res["epochs"][res["best_epoch"] - 1]
        print(f"[probe] {i}/{len(tasks)} {task}: floor {f['acc_sum']:.2f}, best {b['acc_sum']:.2f} (epoch "
              f"{res['best_epoch']}), learnable {res['learnable']} ({time.perf_counter() - t0:.0f} s)",
              file=sys.stderr, flush=True)
        (out / "probe.json").write_text(json.dumps({"args": vars(args) | {"out": shown}, "results": results},
                                                   indent=1, default=str))
        (out / "probe.md").write_text(markdown(results, args))
    print(markdown(results, args))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
