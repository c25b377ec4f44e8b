"""BIG-bench and BBH multiple-choice tasks as LLaMA-Factory data, and a multiple-choice evaluator.

    python bench/mc_tasks.py fetch date_understanding navigate ...   # extract and cache task files
    python bench/mc_tasks.py write OUT --target date_understanding --others navigate,... [--wrong 0.1]

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
import statistics
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
        raise SystemExit(f"bench/mc_tasks.py: could not download {SDIST} ({' '.join(last)}); if the package index "
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
            raise SystemExit(f"bench/mc_tasks.py: DATAFLEX_BIGBENCH_DIR={source_dir} has no task.json for "
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
                raise SystemExit(f"bench/mc_tasks.py: {sdist.name} has sha256 {got}, expected {SDIST_SHA256}")
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
                raise SystemExit(f"bench/mc_tasks.py: no such task(s) in {SDIST}: {', '.join(sorted(wanted.values()))}")
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


# --------------------------------------------------------------------------- BBH (BIG-Bench Hard)
# The task files of BBH (Suzgun et al., 2022) as published in its repository at one commit; every file
# is checked against these hashes, wherever it comes from.
BBH_REPO = "suzgunmirac/BIG-Bench-Hard"
BBH_COMMIT = "9ee07bd481feebf959a6b59d61ea57bdcf30964d"
BBH_URL = "https://raw.githubusercontent.com/{repo}/{commit}/bbh/{task}.json"
BBH_SHA256 = {
    "boolean_expressions": "ea6c754ec005e2d3f2d085d349a740f593b5764f32ea4638ffed4cfc0061b12a",
    "date_understanding": "0148d4ac5fca05b2f82373e5fef7208e15363b9c6079493034d77b3dab496bf5",
    "disambiguation_qa": "cf06df9ebf911b883671cb1b35d3fbd1a1c306b19b9e9a012407e596c85fe8c6",
    "dyck_languages": "3f9badedf15c2be1ce53d94fdf016299bb30ba231ef087ab9f51a7ed6d0bdc25",
    "formal_fallacies": "4c1adb664821157faade1d4153685403afcc02648f3c180a608a18f17f589629",
    "geometric_shapes": "07be68a124420caa2ebc0b2c858ad79fc55c5c8806170e496e1e17ebfb11f31c",
    "logical_deduction_five_objects": "d2df31394b903b7f0e085d42a69572a092987856eac076799017d70ef266fa8f",
    "logical_deduction_seven_objects": "2896c7e3482eea318dd37bcc370d24ec3cc91e8374c1784287b5dbd38a529e33",
    "logical_deduction_three_objects": "e590fae72e3a6041fbd23bd8ff6b74baf44ca563f6ba40a041c55e7b867c1681",
    "movie_recommendation": "a8b53a87ee21a865b7248e694f388a9b8f7cf6b839b11d44796a2dd3fc088983",
    "multistep_arithmetic_two": "c9d5a6433c9b78256422a15c78463949c8bec8d85607aa28b52d7234ad4a8595",
    "navigate": "b7944dfd3c81da5c4815bd75b00d6fa3c64140823498e78ed496f4c3d36f7f0d",
    "object_counting": "8acef14dbbdd40d2326ef7755750b6b5fe919fef06276af1bab3f1c297f022ff",
    "reasoning_about_colored_objects": "0a8850cf95166020fce7a78244026ceedd7ea839302471512b4f8744e85a6a49",
    "salient_translation_error_detection": "becf3eb8dd53c821a555ecd5c1334ecd93eb25f980e63be963c518e7138de5da",
    "sports_understanding": "63ca262858f6176864515cd8cf53cdaa40839ebecc155b726d77930855d167bf",
    "temporal_sequences": "92a1189faaa84aacc4c405aaa13f13f48c2992eb884772eedb622505252baef5",
    "tracking_shuffled_objects_five_objects": "2063a46a4fb484236ed4310523606543a3e1dd4a4dc34eda65d407910ece25a5",
    "tracking_shuffled_objects_seven_objects": "b59fd05b850c37cf57cb514ae1e6975c00b1638ade2291722056b2af3c54084d",
    "tracking_shuffled_objects_three_objects": "546cc7bf10c6a01a6a4c17ae28a4966485f21f29fd5d111f37858ec78e354f6b",
    "word_sorting": "2a6132d2c99f00d0d2eb1113ac6b4a918bd969d863c48749210d969713db8d43",
}
# answers that are free text, not one of a small set: left out of multiple-choice scoring
BBH_FREE_FORM = ("dyck_languages", "multistep_arithmetic_two", "object_counting", "word_sorting")
BBH_MC = tuple(t for t in BBH_SHA256 if t not in BBH_FREE_FORM)
BBH_ENV = "DATAFLEX_BBH_DIR"


class TaskFileError(Exception):
    """A task file is missing, unknown or not the pinned one: the message is one line naming it."""


def bbh_source() -> Path | None:
    """Where BBH task files are read from: ``$DATAFLEX_BBH_DIR``, else the project's shared copy
    (``../shared/data/bbh`` beside the repository) when it exists, else None (download)."""
    if os.environ.get(BBH_ENV):
        return Path(os.environ[BBH_ENV])
    shared = Path(__file__).resolve().parents[2] / "shared" / "data" / "bbh"
    return shared if shared.is_dir() else None


def _download_bbh(task: str, dest: Path) -> None:
    import urllib.request

    url = BBH_URL.format(repo=BBH_REPO, commit=BBH_COMMIT, task=task)
    try:
        with urllib.request.urlopen(url, timeout=60) as resp:
            dest.write_bytes(resp.read())
    except OSError as exc:
        raise TaskFileError(f"could not download BBH task {task} from {url} ({exc}); set {BBH_ENV} to a "
                            "folder with the task files") from None


def fetch_bbh(tasks: Sequence[str], source: Path | None = None, cache: Path | None = None) -> dict[str, Path]:
    """``{task: path}`` of BBH task files, each checked against its pinned SHA-256.

    From ``source`` (default :func:`bbh_source`) when there is one: the files are read in place, and a
    missing one or one with another hash is an error naming the file. Otherwise each missing file is
    downloaded at the pinned commit into ``cache`` (a temporary name, renamed only when its hash matches,
    so the cache never holds a half-written or foreign file)."""
    unknown = [t for t in tasks if t not in BBH_SHA256]
    if unknown:
        raise TaskFileError(f"unknown BBH task(s) {', '.join(unknown)}; known: {', '.join(BBH_SHA256)}")
    source = source if source is not None else bbh_source()
    out: dict[str, Path] = {}
    if source is not None:
        for task in tasks:
            path = Path(source) / f"{task}.json"
            if not path.is_file():
                raise TaskFileError(f"BBH task file {path} is missing")
            got = _sha256(path)
            if got != BBH_SHA256[task]:
                raise TaskFileError(f"BBH task file {path} has sha256 {got[:16]}..., expected "
                                    f"{BBH_SHA256[task][:16]}... (commit {BBH_COMMIT[:12]})")
            out[task] = path
        return out
    cache = cache or default_cache().parent / "bbh"
    cache.mkdir(parents=True, exist_ok=True)
    for task in tasks:
        path = cache / f"{task}.json"
        if not (path.is_file() and _sha256(path) == BBH_SHA256[task]):
            part = cache / f".{task}.json.part"
            try:
                _download_bbh(task, part)
                got = _sha256(part)
                if got != BBH_SHA256[task]:
                    raise TaskFileError(f"downloaded BBH task {task} has sha256 {got[:16]}..., expected "
                                        f"{BBH_SHA256[task][:16]}...")
                os.replace(part, path)
            finally:
                part.unlink(missing_ok=True)
        out[task] = path
    return out


@dataclass
class BBHQuestion:
    task: str
    input: str  # the question as BBH gives it, options included
    target: str  # the correct answer, one of ``answers``
    answers: tuple[str, ...]  # the task's answer set


def _answer_form(target: str) -> str:
    if len(target) == 3 and target[0] == "(" and target[2] == ")":
        return "letter"
    return "word"


def load_bbh(task: str, path: Path) -> tuple[list[BBHQuestion], int]:
    """A multiple-choice BBH task's questions and how many were dropped.

    The answer set is the task's distinct targets of its usual form: movie_recommendation has one
    question answered with a title instead of a letter; such questions are dropped (and counted)."""
    if task in BBH_FREE_FORM:
        raise TaskFileError(f"BBH task {task} has free-form answers (not scored as multiple choice)")
    examples = json.loads(Path(path).read_text())["examples"]
    forms = [_answer_form(e["target"]) for e in examples]
    usual = max(set(forms), key=forms.count)
    kept = [e for e, f in zip(examples, forms) if f == usual]
    answers = tuple(sorted({e["target"] for e in kept}))
    return [BBHQuestion(task, e["input"], e["target"], answers) for e in kept], len(examples) - len(kept)


def bbh_row(q: BBHQuestion, wrong: bool = False, rng: random.Random | None = None) -> dict:
    """An alpaca row: the question as BBH gives it -> its answer (a planted wrong one when asked)."""
    output = q.target
    if wrong:
        output = (rng or random).choice([a for a in q.answers if a != q.target])
    return {"instruction": q.input, "input": "", "output": output, "task": q.task, "wrong": bool(wrong),
            "answer": q.target, "options": list(q.answers)}


def answer_balance(questions: Sequence[BBHQuestion]) -> dict:
    """Share of the most common answer (the accuracy of always answering it) and chance (1 / answers)."""
    if not questions:
        return {"n": 0, "majority": float("nan"), "chance": float("nan")}
    counts: dict[str, int] = {}
    for q in questions:
        counts[q.target] = counts.get(q.target, 0) + 1
    top = max(counts, key=counts.get)
    return {"n": len(questions), "majority": counts[top] / len(questions), "majority_answer": top,
            "chance": 1 / len(questions[0].answers)}


def write_bbh_pool(out: Path, target: str, others: Sequence[str], paths: dict[str, Path], *, seed: int = 0,
                   per_task: int = 20, n_eval: int = 16, n_test: int = 100, wrong_share: float = 0.1,
                   sibling: str | None = None) -> dict:
    """A training pool of BBH tasks as LLaMA-Factory data, in the files :func:`write_pool` writes.

    Each task's questions are shuffled with ``seed`` (and the task's name) and cut in order into held-out
    test (``n_test``, ``bb_test_<task>``), eval (``n_eval``: the target's ``bb_eval``, the sibling's
    ``bb_eval_sibling``) and training rows (``per_task`` per task, ``bb_train``; the target's alone also in
    ``bb_target``): test questions come first, so they do not move when the pool's size changes, and no
    question is in two splits. ``wrong_share`` of the pool's rows answer with another answer of the set."""
    out.mkdir(parents=True, exist_ok=True)
    rng = random.Random(seed)
    pool, files = [], {}
    for task in [target, *others]:
        qs, _ = load_bbh(task, paths[task])
        order = list(qs)
        random.Random(f"{seed}:{task}").shuffle(order)
        test, rest = order[:n_test], order[n_test:]
        evals, train = rest[:n_eval], rest[n_eval:n_eval + per_task]
        if len(train) < per_task:
            raise TaskFileError(f"BBH task {task} has {len(qs)} questions: too few for {n_test} test + {n_eval} "
                                f"eval + {per_task} training rows")
        pool += train
        files[f"bb_test_{task}"] = [bbh_row(q) for q in test]
        if task == target:
            files["bb_eval"] = [bbh_row(q) for q in evals]
        if task == sibling:
            files["bb_eval_sibling"] = [bbh_row(q) for q in evals]
    rng.shuffle(pool)
    wrong = set(rng.sample(range(len(pool)), round(wrong_share * len(pool))))
    files["bb_train"] = [bbh_row(q, i in wrong, rng) for i, q in enumerate(pool)]
    files["bb_target"] = [r for r in files["bb_train"] if r["task"] == target]
    for name, rows in files.items():
        (out / f"{name}.json").write_text(json.dumps(rows, ensure_ascii=False, indent=0))
    (out / "dataset_info.json").write_text(json.dumps({n: {"file_name": f"{n}.json"} for n in files}, indent=1))
    train = files["bb_train"]
    return {"train": len(train), "target_rows": sum(r["task"] == target for r in train),
            "wrong_rows": sum(r["wrong"] for r in train), "eval": len(files["bb_eval"]),
            "tests": {t: len(files[f"bb_test_{t}"]) for t in [target, *others]}}


def scorer_for(model, tokenizer, template: str = "smollm2", system: str | None = None):
    """The product's one-forward answer scorer (``dataflex.compare.evaluate.ChoiceScorer``) with LLaMA-Factory's
    template ``template``: the prompt as training builds it runs once, the answers score from its cache."""
    from dataflex.compare.evaluate import ChoiceScorer
    from dataflex.integration import chat_template

    return ChoiceScorer(model, tokenizer, chat_template(tokenizer, template), system)


def set_logprob(scored: Sequence[tuple[float, int]], right: int) -> float:
    """log P(correct answer | the answer set): the summed log-likelihoods normalised over the set. Unlike
    the plain log-likelihood, learning the answers' format alone cannot raise it."""
    top = max(s for s, _ in scored)
    return scored[right][0] - (top + math.log(sum(math.exp(s - top) for s, _ in scored)))


def choice_eval(scorer, rows: Iterable[dict]) -> dict:
    """Multiple-choice accuracy (answer with the highest summed / length-normalised log-likelihood), with
    Wilson intervals; and two continuous metrics: the mean log-likelihood of the correct answer, and its
    mean log-probability within the answer set."""
    hits = {"sum": 0, "mean": 0}
    loglik: list[float] = []
    inset: list[float] = []
    per_question: list[int] = []
    for r in rows:
        answers = tuple(r["options"])
        scored = scorer.score(r["instruction"], answers)
        right = answers.index(r["answer"])
        by_sum = max(range(len(scored)), key=lambda i: scored[i][0])
        hits["sum"] += by_sum == right
        hits["mean"] += max(range(len(scored)), key=lambda i: scored[i][0] / max(scored[i][1], 1)) == right
        per_question.append(int(by_sum == right))
        loglik.append(scored[right][0])
        inset.append(set_logprob(scored, right))
    n = len(loglik)
    return {"n": n, **{f"acc_{k}": v / n if n else float("nan") for k, v in hits.items()},
            **{f"ci_{k}": wilson(v, n) for k, v in hits.items()},
            "loglik": statistics.fmean(loglik) if n else float("nan"),
            "loglik_sd": statistics.stdev(loglik) if n > 1 else 0.0,
            "set_logprob": statistics.fmean(inset) if n else float("nan"), "correct": per_question}


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
