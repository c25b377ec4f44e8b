"""BIG-bench multiple-choice tasks as LLaMA-Factory data, and a multiple-choice evaluator.

    python bench/bigbench.py fetch date_understanding navigate ...   # extract and cache task files
    python bench/bigbench.py write OUT --target date_understanding --others navigate,... [--wrong 0.1]

Task files come from the ``bigbench`` 1.0.0 sdist on the package index (``pip download``, so pip's
index settings apply). The sdist's SHA-256 is checked, only the task files asked for are extracted,
and each is cached with its own SHA-256 in a manifest; a cached file whose hash differs is fetched
again. The package index stopped serving 1.0.0 in December 2026: ``$DATAFLEX_BIGBENCH_SDIST`` takes a copy
of the sdist (same hash check), ``$DATAFLEX_BIGBENCH_DIR`` a checkout of the BIG-bench repository
(unpinned). Rows are alpaca-format: the question with its lettered options -> the correct option's text.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import random
import subprocess
import sys
import tarfile
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Sequence

SDIST = "bigbench==1.0.0"
SDIST_SHA256 = "1bb398a5512c6d798cdebe0dfa0ac03f67f6033fa6b39c6ef71df978c7cbc5c2"
TASKS_IN_SDIST = "bigbench-1.0.0/bigbench/benchmark_tasks"
LETTERS = "ABCDEFGHIJKLMNOPQRSTUVWXYZ"


def default_cache() -> Path:
    """Beside the models that ``dataflex-cli assets`` fetches (``$DATAFLEX_ASSETS``)."""
    from dataflex.assets import default_dir

    return default_dir("bigbench")


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 22):
            h.update(chunk)
    return h.hexdigest()


def _download_sdist(tmp: Path, n_missing: int, pip_args: Sequence[str]) -> Path:
    print(f"[bigbench] downloading {SDIST} (358 MB sdist) through pip for {n_missing} task file(s)",
          file=sys.stderr, flush=True)
    proc = subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:",
                           "-d", str(tmp), SDIST, *pip_args],
                          stdout=sys.stderr, stderr=subprocess.PIPE, text=True)
    if proc.returncode != 0:
        last = [ln for ln in proc.stderr.splitlines() if ln.strip() and "Location" not in ln][-1:]
        # In December 2026 the index stopped serving 1.0.0 (it lists only 0.0.1, which has no task files):
        # say where else the same file can come from rather than only what pip said.
        raise SystemExit(f"bench/bigbench.py: could not download {SDIST} ({' '.join(last)}); if the package index "
                         f"no longer has it, point DATAFLEX_BIGBENCH_SDIST at a copy of bigbench-1.0.0.tar.gz "
                         f"(sha256 {SDIST_SHA256[:12]}...) or DATAFLEX_BIGBENCH_DIR at a BIG-bench checkout")
    return next(Path(tmp).glob("bigbench-*.tar.gz"))


def _store(cache: Path, manifest: dict, task: str, data: bytes) -> None:
    """Put one task file into the cache (never half-written) and its hash into the manifest."""
    part = cache / f".{task}.json.part"
    part.write_bytes(data)
    os.replace(part, cache / f"{task}.json")
    manifest[task] = _sha256(cache / f"{task}.json")


def _in_checkout(source: Path, task: str) -> Path | None:
    for rel in (f"bigbench/benchmark_tasks/{task}", f"benchmark_tasks/{task}", task):
        if (source / rel / "task.json").is_file():
            return source / rel / "task.json"
    return None


def fetch_tasks(tasks: Sequence[str], cache: Path | None = None, pip_args: Sequence[str] = (),
                sdist: Path | None = None, source_dir: Path | None = None) -> dict[str, Path]:
    """``{task: path of its task.json}``, extracting from the sdist only what the cache lacks.

    ``sdist`` (or ``$DATAFLEX_BIGBENCH_SDIST``) names an sdist already on disk, so adding tasks to the
    cache does not download 358 MB again; its SHA-256 is checked like a downloaded one.
    ``source_dir`` (or ``$DATAFLEX_BIGBENCH_DIR``) is a folder of task files instead - a checkout of
    the BIG-bench repository (``<dir>/bigbench/benchmark_tasks/<task>/task.json``) or any folder with
    ``<task>/task.json``; its files are not the pinned sdist's, so the run says so, and each is cached
    with its own hash like an extracted one."""
    sdist = sdist or (Path(os.environ["DATAFLEX_BIGBENCH_SDIST"]) if os.environ.get("DATAFLEX_BIGBENCH_SDIST") else None)
    if source_dir is None and os.environ.get("DATAFLEX_BIGBENCH_DIR"):
        source_dir = Path(os.environ["DATAFLEX_BIGBENCH_DIR"])
    cache = cache or default_cache()
    cache.mkdir(parents=True, exist_ok=True)
    manifest_path = cache / "manifest.json"
    manifest = json.loads(manifest_path.read_text()) if manifest_path.exists() else {}
    have = {t for t in tasks if (cache / f"{t}.json").exists() and manifest.get(t) == _sha256(cache / f"{t}.json")}
    missing = [t for t in tasks if t not in have]
    if missing and sdist is None and source_dir is not None:
        found = {t: _in_checkout(Path(source_dir), t) for t in missing}
        absent = [t for t, path in found.items() if path is None]
        if absent:  # before copying anything
            raise SystemExit(f"bench/bigbench.py: DATAFLEX_BIGBENCH_DIR={source_dir} has no task.json for "
                             f"{', '.join(absent)} (looked in <dir>/bigbench/benchmark_tasks/<task>/, "
                             "<dir>/benchmark_tasks/<task>/ and <dir>/<task>/)")
        print(f"[bigbench] taking {len(found)} task file(s) from {source_dir} (not checked against the "
              f"{SDIST} sdist's hash)", file=sys.stderr, flush=True)
        for task, path in found.items():
            _store(cache, manifest, task, path.read_bytes())
        manifest_path.write_text(json.dumps(manifest, indent=1, sort_keys=True) + "\n")
        missing = []
    if missing:
        with tempfile.TemporaryDirectory(prefix="bigbench-", dir=cache) as tmp:
            if sdist is None:
                sdist = _download_sdist(Path(tmp), len(missing), pip_args)
            got = _sha256(sdist)
            if got != SDIST_SHA256:
                raise SystemExit(f"bench/bigbench.py: {sdist.name} has sha256 {got}, expected {SDIST_SHA256}")
            wanted = {f"{TASKS_IN_SDIST}/{t}/task.json": t for t in missing}
            with tarfile.open(sdist) as tar:
                for member in tar:
                    task = wanted.pop(member.name, None)
                    if task is None:
                        continue
                    _store(cache, manifest, task, tar.extractfile(member).read())
                    if not wanted:
                        break
            if wanted:
                raise SystemExit(f"bench/bigbench.py: no such task(s) in {SDIST}: {', '.join(sorted(wanted.values()))}")
        manifest_path.write_text(json.dumps(manifest, indent=1, sort_keys=True) + "\n")
    return {t: cache / f"{t}.json" for t in tasks}


@dataclass
class Question:
    task: str
    text: str  # the input, with the task prefix unless stripped
    options: list[str]
    answer: int  # index of the correct option


def load_questions(task: str, path: Path, strip_prefix: bool = False) -> list[Question]:
    """The task's multiple-choice examples with exactly one option scored 1 (others are skipped)."""
    data = json.loads(Path(path).read_text())
    prefix = "" if strip_prefix else (data.get("task_prefix") or "").strip()
    out = []
    for ex in data["examples"]:
        scores = ex.get("target_scores")
        if not scores:
            continue
        options = list(scores)
        best = [i for i, o in enumerate(options) if scores[o] == 1]
        if len(best) != 1 or len(options) > len(LETTERS):
            continue
        text = ex["input"].strip()
        out.append(Question(task, f"{prefix}\n\n{text}" if prefix else text, options, best[0]))
    return out


def prompt_of(q: Question) -> str:
    """One layout for every task: the question, then its options lettered, then what to answer."""
    lines = [q.text, "", "Options:"] + [f"({LETTERS[i]}) {o}" for i, o in enumerate(q.options)]
    return "\n".join(lines + ["", "Answer with the text of the correct option."])


def row_of(q: Question, wrong: bool = False, rng: random.Random | None = None) -> dict:
    answer = q.answer
    if wrong:
        answer = (rng or random).choice([i for i in range(len(q.options)) if i != q.answer])
    return {"instruction": prompt_of(q), "input": "", "output": q.options[answer], "task": q.task,
            "wrong": bool(wrong), "answer": q.options[q.answer], "options": q.options}


def split_rows(questions: Sequence[Question], sizes: Sequence[int], seed: int) -> list[list[Question]]:
    """Disjoint seeded splits of the given sizes (in order), or fewer rows when the task is short."""
    order = list(questions)
    random.Random(seed).shuffle(order)
    out, start = [], 0
    for n in sizes:
        out.append(order[start:start + n])
        start += n
    return out


def write_pool(out: Path, target: str, others: Sequence[str], paths: dict[str, Path], *, seed: int = 0,
               target_train: int = 20, other_train: int = 20, n_eval: int = 16, n_test: int = 100,
               wrong_share: float = 0.1, strip_prefix: bool = False) -> dict:
    """Train pool (target + others, a share of wrong answers planted), the target's eval (few-shot
    validation) and test sets, the others' test sets; with ``dataset_info.json``. Returns a summary."""
    out.mkdir(parents=True, exist_ok=True)
    rng = random.Random(seed)
    pool, tests = [], {}
    tq = load_questions(target, paths[target], strip_prefix)
    t_train, t_eval, t_test = split_rows(tq, [target_train, n_eval, n_test], seed)
    pool += t_train
    evals = [row_of(q) for q in t_eval]
    tests[target] = [row_of(q) for q in t_test]
    for task in others:
        oq = load_questions(task, paths[task], strip_prefix)
        o_train, o_test = split_rows(oq, [other_train, n_test], seed + 1)
        pool += o_train
        tests[task] = [row_of(q) for q in o_test]
    rng.shuffle(pool)
    wrong = set(rng.sample(range(len(pool)), round(wrong_share * len(pool))))
    train = [row_of(q, i in wrong, rng) for i, q in enumerate(pool)]
    files = {"bb_train": train, "bb_eval": evals, **{f"bb_test_{t}": rows for t, rows in tests.items()}}
    info = {}
    for name, rows in files.items():
        (out / f"{name}.json").write_text(json.dumps(rows, ensure_ascii=False, indent=0))
        info[name] = {"file_name": f"{name}.json"}
    (out / "dataset_info.json").write_text(json.dumps(info, indent=1))
    return {"train": len(train), "target_rows": sum(r["task"] == target for r in train),
            "wrong_rows": sum(r["wrong"] for r in train), "eval": len(evals),
            "tests": {t: len(r) for t, r in tests.items()}}


# --------------------------------------------------------------------------- evaluation
def option_logprobs(model, tokenizer, prompt_ids: list[int], options: Sequence[str], end: str = "") -> list[tuple[float, int]]:
    """(sum of log-probabilities, number of tokens) of each option's tokens after ``prompt_ids``."""
    import torch

    seqs = [prompt_ids + tokenizer(o + end, add_special_tokens=False)["input_ids"] for o in options]
    width = max(len(s) for s in seqs)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    ids = torch.tensor([s + [pad] * (width - len(s)) for s in seqs])
    mask = torch.tensor([[1] * len(s) + [0] * (width - len(s)) for s in seqs])
    # only the positions that predict an option token need logits: the output layer and the softmax over
    # the vocabulary then run on a few positions instead of the whole prompt
    keep = width - len(prompt_ids) + 1
    with torch.no_grad():
        logp = torch.log_softmax(model(input_ids=ids, attention_mask=mask, logits_to_keep=keep).logits.float(), dim=-1)
    first = width - keep  # full-sequence position of logp[:, 0]
    out = []
    for row, s in enumerate(seqs):
        positions = range(len(prompt_ids), len(s))
        total = sum(float(logp[row, p - 1 - first, s[p]]) for p in positions)
        out.append((total, len(positions)))
    return out


def wilson(k: int, n: int, z: float = 1.96) -> tuple[float, float]:
    """95 % Wilson interval of a proportion k/n."""
    if n == 0:
        return (0.0, 1.0)
    p = k / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return (max(0.0, centre - half), min(1.0, centre + half))


def mc_accuracy(model, tokenizer, rows: Iterable[dict], system: str | None = None) -> dict:
    """Accuracy of picking the most likely option under the chat template, summed and length-normalised."""
    hits = {"sum": 0, "mean": 0}
    n = 0
    for r in rows:
        messages = ([{"role": "system", "content": system}] if system else []) + [
            {"role": "user", "content": r["instruction"]}]
        prompt = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        prompt_ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
        scored = option_logprobs(model, tokenizer, prompt_ids, r["options"])
        right = r["options"].index(r["answer"])
        hits["sum"] += max(range(len(scored)), key=lambda i: scored[i][0]) == right
        hits["mean"] += max(range(len(scored)), key=lambda i: scored[i][0] / max(scored[i][1], 1)) == right
        n += 1
    return {"n": n, **{f"acc_{k}": v / n if n else float("nan") for k, v in hits.items()},
            **{f"ci_{k}": wilson(v, n) for k, v in hits.items()}}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    f = sub.add_parser("fetch", help="extract and cache task files")
    f.add_argument("tasks", nargs="+")
    w = sub.add_parser("write", help="write a pool as LLaMA-Factory data")
    w.add_argument("out", type=Path)
    w.add_argument("--target", required=True)
    w.add_argument("--others", required=True, help="comma-separated task names")
    w.add_argument("--seed", type=int, default=0)
    w.add_argument("--wrong", type=float, default=0.1, help="share of training rows with a wrong answer")
    w.add_argument("--strip-prefix", action="store_true", help="drop task prefixes (target harder to tell by form)")
    args = ap.parse_args(argv)
    if args.cmd == "fetch":
        for task, path in fetch_tasks(args.tasks).items():
            print(task, path)
        return 0
    others = [t for t in args.others.split(",") if t]
    paths = fetch_tasks([args.target, *others])
    print(json.dumps(write_pool(args.out, args.target, others, paths, seed=args.seed, wrong_share=args.wrong,
                                strip_prefix=args.strip_prefix), indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
