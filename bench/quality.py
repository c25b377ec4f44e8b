"""Benchmark: does a method beat random at equal steps, and at equal compute? Exact-match accuracy, seeds, CIs.

    python bench/quality.py                 # the full benchmark (the earlier harness: ~46 minutes, 2 runs at a time)
    python bench/quality.py --quick         # fewer seeds, methods and steps: ~14 minutes at one thread
    python bench/quality.py --only random less --seeds 1   # a subset

The set-up (CPU, offline, deterministic; everything is generated here):

* **Tasks with checkable answers**: ``upper`` (capitalise words), ``sort`` (sort digits),
  ``lookup`` (a name's code from a fixed table), ``date`` (YYYY-MM-DD to DD/MM/YYYY) and the
  target task ``date_us`` (YYYY-MM-DD to MM.DD.YYYY: a new format close to a known one, which a
  LoRA learns in ~100 steps of target rows). ``reverse`` (letters) and ``swap`` (word order) are
  generated too but are not used: the small base does not learn them in a few hundred steps.
* **A base model that knows the format**: a small Qwen2 (digits are single tokens) pretrained
  from scratch for a few CPU minutes on the other four tasks in LLaMA-Factory's ``default``
  template. It has never seen the target task. Built once and cached under ``<out>/base-<hash>``;
  the hash covers every setting that changes it.
* **The SFT pool**: the target task is a minority (``--target-share``, 10 %), a share of rows
  (``--noise-share``) carry a wrong answer of the right form (another prompt's answer), and some rows
  are near-duplicates of others (the same prompt and answer, reworded instruction).
* **Runs**: one ``dataflex-cli compare`` (its Python API: :func:`dataflex.compare.plan.prepare` per
  mode, :func:`~dataflex.compare.plan.combine`, :func:`~dataflex.compare.runner.execute`): every
  method x seed trains through ``dataflex-cli train`` with the same LoRA, batch, constant learning
  rate and optimizer steps, against ``random`` at *equal steps* and at *equal compute* (random also
  trains twice as long; its metric is read at the seconds the method used, decisions included).
  Rerunning into the same ``--out`` skips the finished runs (compare's resume): a rerun whose
  ``--only`` lists the earlier methods and more trains only the new ones.
* **Metrics** (compare's, at every checkpoint and for the untrained base): greedy exact match on
  held-out target prompts (``--test-dataset``), on held-out prompts of the other tasks
  (``--eval-extra other=...``; ``lookup`` is left out: its 40 names all occur in the pool, so no prompt
  of it is held out) and the target eval loss. Per run (compare's ``after_run`` hook): the share of
  target / noisy / duplicate rows trained on after the warm-up (the decision trace), the AUC of the
  loss score for finding noisy rows (``loss`` and ``delta_loss``); seconds from compare.
* **Report**: per method the mean and 95 % interval over seeds, the difference to random paired by
  seed and compare's verdict, as a Markdown table (``results.md``), JSON (``results.json``, with the
  whole ``compare.json``) and plots (``accuracy_vs_step.png``, ``accuracy_vs_compute.png``,
  ``random_share.png``) in ``--out`` (default ``bench/out/quality``).
* **Transfer**: select with the small model, export the selection with ``dataflex-cli report
  --export-dataset``: a smaller proxy base (same data, same pretraining) selects with ``less``, its
  selection is exported, and the benchmark's base (the larger model) trains statically on it with plain
  ``llamafactory-cli train``, against the same model trained on a random draw of the same size.

Nothing here asserts who wins: that is what the table is for.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import random
import shutil
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import yaml

from dataflex.compare import analysis
from dataflex.compare.evaluate import Evaluators
from dataflex.compare.plan import combine, prepare
from dataflex.compare.runner import execute
from dataflex.compare.stats import interval
from dataflex.report import read_run, read_trace

ROOT = Path(__file__).resolve().parents[1]
TARGET = "date_us"
LETTERS = "abcdefghijklmnopqrstuvwxyz"
WORDS = ("apple river planet garden silver window market forest candle rocket pencil orange castle dragon "
         "basket meadow violet thunder harbor lantern marble pepper saddle timber velvet walnut zebra anchor").split()
INSTRUCTIONS = {
    "upper": "Rewrite the words in capital letters.",
    "sort": "Sort the digits from smallest to largest.",
    "lookup": "Give the code of the name.",
    "date": "Write the date as day/month/year.",
    "reverse": "Reverse the list of letters.",
    "swap": "Write the words in reverse order.",
    "date_us": "Write the date as month.day.year.",
}
REWORDED = {  # near-duplicates keep prompt and answer and change the instruction's wording
    "upper": "Write these words in capitals.",
    "sort": "Put the digits in increasing order.",
    "lookup": "What is the code of this name?",
    "date": "Convert the date to day/month/year.",
    "reverse": "Write the letters in reverse order.",
    "swap": "Reverse the order of the words.",
    "date_us": "Convert the date to month.day.year.",
}
_TABLE_RNG = random.Random(7)
NAMES = sorted({"".join(_TABLE_RNG.choice(LETTERS) for _ in range(5)).capitalize() for _ in range(40)})
CODES = {name: str(_TABLE_RNG.randint(100, 999)) for name in NAMES}


def make(task: str, rng: random.Random) -> tuple[str, str]:
    """One (input, answer) pair of ``task``."""
    if task == "upper":
        text = " ".join(rng.sample(WORDS, rng.randint(2, 3)))
        return text, text.upper()
    if task == "sort":
        digits = [str(rng.randint(0, 9)) for _ in range(rng.randint(4, 6))]
        return " ".join(digits), " ".join(sorted(digits))
    if task == "lookup":
        name = rng.choice(NAMES)
        return name, CODES[name]
    if task == "date":
        y, m, d = rng.randint(1950, 2049), rng.randint(1, 12), rng.randint(1, 28)
        return f"{y}-{m:02d}-{d:02d}", f"{d:02d}/{m:02d}/{y}"
    if task == "reverse":
        letters = [rng.choice(LETTERS) for _ in range(rng.randint(3, 5))]
        return " ".join(letters), " ".join(reversed(letters))
    if task == "swap":
        words = rng.sample(WORDS, rng.randint(2, 3))
        return " ".join(words), " ".join(reversed(words))
    if task == "date_us":
        y, m, d = rng.randint(1950, 2049), rng.randint(1, 12), rng.randint(1, 28)
        return f"{y}-{m:02d}-{d:02d}", f"{m:02d}.{d:02d}.{y}"
    raise ValueError(task)


OTHER_TASKS = ["upper", "sort", "lookup", "date"]  # what the base is pretrained on, and the pool's other tasks
HELD_OUT_OTHER = ["upper", "sort", "date"]  # other tasks with prompts outside the pool (lookup's 40 names are all in it)



# ================================================================================================ settings
@dataclass
class Settings:
    out: Path
    pool: int = 1200
    target_share: float = 0.10
    noise_share: float = 0.10
    dup_share: float = 0.05
    eval_target: int = 100
    eval_other: int = 25  # per held-out other task
    less_eval: int = 32  # target rows the eval-driven selectors (less, zeroth, near, ...) see
    hidden: int = 128
    layers: int = 4
    pretrain_steps: int = 600
    pretrain_batch: int = 32
    proxy_hidden: int = 64  # the small model that selects for the transfer read-out
    proxy_layers: int = 4
    warmup: int = 20
    update_step: int = 40
    update_times: int = 4
    batch: int = 8
    lr: float = 2e-3
    lora_rank: int = 16
    checkpoints: int = 4  # per run of the base length; random runs twice as long with the same spacing
    seeds: int = 3
    shares: list[float] = field(default_factory=lambda: [0.25, 0.5])
    knob_selectors: list[str] = field(default_factory=lambda: ["less", "tsds"])  # run with each share
    only: list[str] | None = None
    transfer: bool = True
    scoring_pool: float | None = None

    @property
    def steps(self) -> int:
        return self.warmup + self.update_step * self.update_times

    @property
    def save_every(self) -> int | None:
        """Steps between checkpoints; None: compare's default (the run's steps have no such divisor)."""
        every = max(1, self.steps // self.checkpoints)
        return every if self.steps % every == 0 else None


# parts of the comparison: one config (mode, data, schedule keys) each, its label prefix and components section
PARTS = {"select": ("dynamic_select", "", "selectors"), "weight": ("dynamic_weight", "weight ", "weighters"),
         "order_static": ("dynamic_reorder", "order ", "reorderers"),
         "order_dynamic": ("dynamic_reorder", "order ", "reorderers"), "mix": ("dynamic_mix", "mix ", "mixers"),
         "pipeline": ("dynamic_lego", "pipeline ", "pipelines")}
# the presets a pipeline's stages name (written beside the methods' own entries)
STAGE_PRESETS = {"selectors": {"loss_filter": {"name": "loss", "params": {"focus": "medium"}}},
                 "reorderers": {"saw_stage": {"name": "dynamic_saw", "params": {}}}}
AGAINST_PLAIN = ("order ", "pipeline ")  # rows also compared with plain training (#35), when plain ran


def methods(s: Settings) -> list[dict]:
    """Every method: its label, part, component key, registered name and params, and compare's method string."""
    pool = {"candidate_pool": s.scoring_pool} if s.scoring_pool else {}
    sel = {
        "loss": ("loss", {"focus": "medium", "record_scores": True, **pool}),  # the original's components.yaml
        "delta_loss": ("delta_loss", {"record_scores": True, **pool}),
        "less": ("less", {"proj_dim": 1024, **pool}),
        # 2K = 32 forwards per scored row: a 30 % candidate pool (still more rows than a selection takes)
        "zeroth": ("zeroth", {"num_directions": 16, "candidate_pool": s.scoring_pool or 0.3}),
        "cluster_less": ("cluster_less", {"proj_dim": 1024, "cluster_size": 16, "samples_per_cluster": 4}),
        "near": ("near", {}),
        "tsds": ("tsds", {"kde_K": 50, "max_K": 200}),
    }
    out = [{"part": "select", "key": "random", "name": "random", "params": {}},
           {"part": "select", "key": "plain", "name": None, "params": {}}]  # LLaMA-Factory's own sampler and loss
    out += [{"part": "select", "key": key, "name": name, "params": params} for key, (name, params) in sel.items()]
    out += [{"part": "select", "key": key, "name": sel[key][0], "params": sel[key][1], "method": f"{key}:random_share={share}"}
            for key in s.knob_selectors for share in s.shares]
    out += [{"part": "weight", "key": "loss", "name": "loss", "params": {}},
            {"part": "weight", "key": "adapt", "name": "adapt", "params": {"refresh_interval": 20, "anchor_batch_size": 8}},
            {"part": "weight", "key": "joint_update_aware", "name": "joint_update_aware",
             "params": {"beta": 1.0, "tau": 0.1, "target_update_step": 20}}]
    # curricula: every row once per epoch (1440 row-steps over a pool of 1200), only the order changes
    out += [{"part": "order_static", "key": "static_length", "name": "static", "params": {"score": "length", "order": "ascending"}},
            {"part": "order_static", "key": "static_loss", "name": "static", "params": {"score": "loss", "order": "ascending"}},
            {"part": "order_dynamic", "key": "dynamic_loss", "name": "dynamic", "params": {"order": "ascending"}},
            # the `reorders:` preset: SAW over the rows left, re-scored by the current loss (easy to hard)
            {"part": "order_dynamic", "key": "dynamic_saw", "name": "dynamic_saw", "params": {}}]
    out += [{"part": "mix", "key": "odm", "name": "odm", "params": {"warmup_steps": s.warmup, "initial_proportions": None}},
            {"part": "mix", "key": "random", "name": "random", "params": {}}]
    # the original's select_then_reorder at this schedule: a loss filter keeps half the pool at every update, a
    # uniform draw takes the update's rows from it, and SAW orders them (#35)
    out += [{"part": "pipeline", "key": "filter_saw", "name": "filter_saw", "params": {"stages": [
        {"family": "selector", "component": "loss_filter", "mode": "filter", "keep_ratio": 0.5},
        {"family": "reorder", "component": "saw_stage"}]}}]
    for m in out:
        m.setdefault("method", m["key"])
        m["label"] = PARTS[m["part"]][1] + m["method"]
    if s.only:
        unknown = set(s.only) - {m["label"] for m in out}
        if unknown:
            raise SystemExit(f"--only: unknown method(s) {sorted(unknown)}; allowed: {[m['label'] for m in out]}")
        out = [m for m in out if m["label"] in s.only]
    return out


# ================================================================================================ data
def build_data(s: Settings, folder: Path) -> dict:
    """Pool, per-task domains, eval sets and ``dataset_info.json`` under ``folder``; returns row metadata."""
    rng = random.Random(1234)
    folder.mkdir(parents=True, exist_ok=True)
    n_target = round(s.target_share * s.pool)
    n_dup = round(s.dup_share * s.pool)
    n_base = s.pool - n_dup
    counts = {TARGET: n_target}
    rest = n_base - n_target
    for k, t in enumerate(OTHER_TASKS):
        counts[t] = rest // len(OTHER_TASKS) + (k < rest % len(OTHER_TASKS))
    rows = []
    for task, n in counts.items():
        for _ in range(n):
            inp, ans = make(task, rng)
            rows.append({"instruction": INSTRUCTIONS[task], "input": inp, "output": ans, "task": task,
                         "noisy": False, "dup": False})
    n_target_base = counts[TARGET]
    n_noisy = round(s.noise_share * len(rows))
    for i in rng.sample(range(len(rows)), n_noisy):  # a wrong answer of the right form
        r = rows[i]
        while True:
            _, wrong = make(r["task"], rng)
            if wrong != r["output"]:
                break
        r["output"], r["noisy"] = wrong, True
    for i in rng.sample(range(len(rows)), n_dup):
        r = dict(rows[i])
        r["instruction"], r["dup"] = REWORDED[r["task"]], True
        rows.append(r)
    rng.shuffle(rows)
    seen = {(r["task"], r["input"]) for r in rows}

    def held_out(task: str, n: int) -> list[dict]:
        out = []
        tries = 0
        while len(out) < n:
            inp, ans = make(task, rng)
            tries += 1
            if (task, inp) in seen and tries < 100 * n:  # lookup has 40 names: those repeat by design
                continue
            seen.add((task, inp))
            out.append({"instruction": INSTRUCTIONS[task], "input": inp, "output": ans, "task": task})
        return out

    eval_target = held_out(TARGET, s.eval_target)
    eval_other = [r for t in HELD_OUT_OTHER for r in held_out(t, s.eval_other)]
    less_eval = held_out(TARGET, s.less_eval)  # what eval-driven selectors aim at: not the test prompts

    def dump(name: str, records: list[dict]) -> None:
        (folder / name).write_text(json.dumps([{k: r[k] for k in ("instruction", "input", "output")}
                                               for r in records], indent=0))

    info = {"q_pool": {"file_name": "pool.json"}, "q_target_dev": {"file_name": "target_dev.json"},
            "q_target_test": {"file_name": "target_test.json"}, "q_other_test": {"file_name": "other_test.json"}}
    dump("pool.json", rows)
    dump("target_dev.json", less_eval)
    dump("target_test.json", eval_target)
    dump("other_test.json", eval_other)
    # per-task domains for the mixers: the same rows, split by task, in the order of TASK_ORDER
    order = [TARGET] + OTHER_TASKS
    domain_rows: list[dict] = []
    for t in order:
        part = [r for r in rows if r["task"] == t]
        dump(f"domain_{t}.json", part)
        info[f"q_{t}"] = {"file_name": f"domain_{t}.json"}
        domain_rows += part
    (folder / "dataset_info.json").write_text(json.dumps(info, indent=1))
    meta = {"pool": [{k: r[k] for k in ("task", "noisy", "dup")} for r in rows],
            "domains": [{k: r[k] for k in ("task", "noisy", "dup")} for r in domain_rows],
            "domain_order": order, "domain_sizes": [sum(r["task"] == t for r in rows) for t in order],
            "eval_target": eval_target, "eval_other": eval_other, "n_target_base": n_target_base}
    (folder / "meta.json").write_text(json.dumps(meta))
    return meta


def pretrain_texts(rng: random.Random, n: int) -> list[tuple[str, str, str]]:
    out = []
    for _ in range(n):
        task = rng.choice(OTHER_TASKS)
        inp, ans = make(task, rng)
        out.append((task, f"{INSTRUCTIONS[task]}\n{inp}", ans))
    return out


# ================================================================================================ base model
def _encode(tokenizer, prompt: str, answer: str) -> tuple[list[int], list[int]]:
    """The ``default`` template's prompt and answer ids, exactly as LLaMA-Factory builds them for SFT."""
    from llamafactory.data.template import TEMPLATES

    return TEMPLATES["default"].encode_oneturn(
        tokenizer, [{"role": "user", "content": prompt}, {"role": "assistant", "content": answer}])


def build_base(folder: Path, hidden: int, layers: int, steps: int, batch: int, seed: int = 0) -> Path:
    """Tokenizer + a Qwen2 of the given shape pretrained on the non-target tasks. Cached by its settings."""
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast, Qwen2Config, Qwen2ForCausalLM

    key = hashlib.sha256(json.dumps([hidden, layers, steps, batch, seed, NAMES, sorted(INSTRUCTIONS.items()),
                                     sorted(REWORDED.items()), TARGET, 3]).encode()).hexdigest()[:10]
    out = folder / f"base-h{hidden}-l{layers}-{key}"
    if (out / "pretrain.json").is_file():
        print(f"[quality] base model cached: {out}", flush=True)
        return out
    tmp = out.with_name(out.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    rng = random.Random(seed)
    corpus = [f"{INSTRUCTIONS[t]}\n{make(t, rng)[0]}\n{make(t, rng)[1]}" for t in INSTRUCTIONS for _ in range(200)]
    corpus += ["Human: ", "\nAssistant:"] + list(REWORDED.values())
    eos = "<|endoftext|>"
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True),
                                                 pre_tokenizers.ByteLevel(add_prefix_space=False)])
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(corpus, trainer=trainers.BpeTrainer(
        vocab_size=384, special_tokens=[eos], initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False))
    hf_tok = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=eos, pad_token=eos)
    tmp.mkdir(parents=True)
    hf_tok.save_pretrained(tmp)
    torch.manual_seed(seed)
    config = Qwen2Config(vocab_size=len(hf_tok), hidden_size=hidden, intermediate_size=hidden * 3,
                         num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2,
                         max_position_embeddings=256, tie_word_embeddings=True, eos_token_id=hf_tok.eos_token_id,
                         pad_token_id=hf_tok.pad_token_id, bos_token_id=hf_tok.eos_token_id)
    model = Qwen2ForCausalLM(config)
    n_params = sum(p.numel() for p in model.parameters())
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.01)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=3e-3, total_steps=steps, pct_start=0.05)
    pad = hf_tok.pad_token_id
    t0 = time.perf_counter()
    model.train()
    for step in range(steps):
        seqs = []
        for _, prompt, answer in pretrain_texts(rng, batch):
            p, a = _encode(hf_tok, prompt, answer)
            seqs.append(p + a)
        width = max(map(len, seqs))
        ids = torch.full((batch, width), pad)
        mask = torch.zeros((batch, width), dtype=torch.long)
        for i, sq in enumerate(seqs):
            ids[i, :len(sq)], mask[i, :len(sq)] = torch.tensor(sq), 1
        labels = ids.masked_fill(mask == 0, -100)
        loss = model(input_ids=ids, attention_mask=mask, labels=labels).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        if step % 100 == 0 or step == steps - 1:
            print(f"[quality] pretrain h{hidden} l{layers}: step {step + 1}/{steps} loss {loss.item():.3f} "
                  f"({time.perf_counter() - t0:.0f}s)", flush=True)
    model.save_pretrained(tmp)
    (tmp / "pretrain.json").write_text(json.dumps({
        "params": n_params, "hidden": hidden, "layers": layers, "steps": steps, "batch": batch,
        "seconds": round(time.perf_counter() - t0, 1), "final_loss": round(loss.item(), 4), "fingerprint": key,
        "tasks": OTHER_TASKS, "never_seen": TARGET}, indent=1))
    shutil.rmtree(out, ignore_errors=True)
    tmp.rename(out)
    return out




# ================================================================================================ runs
def base_config(s: Settings, part: str, base: Path, data: Path, comp_path: Path, meta: dict, key: str) -> dict:
    """The training config of one part of the comparison (compare sets the folders, steps and checkpoints)."""
    cfg = {
        "model_name_or_path": str(base), "stage": "sft", "do_train": True, "finetuning_type": "lora",
        "lora_target": "all", "lora_rank": s.lora_rank, "lora_alpha": 2 * s.lora_rank,
        "dataset": "q_pool", "dataset_dir": str(data), "template": "default", "cutoff_len": 64,
        "overwrite_cache": True, "preprocessing_num_workers": 1, "dataloader_num_workers": 0, "seed": 1,
        "report_to": "none", "logging_steps": 10, "plot_loss": False,
        "per_device_train_batch_size": s.batch, "gradient_accumulation_steps": 1, "learning_rate": s.lr,
        "lr_scheduler_type": "constant", "max_steps": s.steps, "bf16": False,
        "train_type": PARTS[part][0], "components_cfg_file": str(comp_path), "component_name": key,
        "warmup_step": s.warmup, "update_step": s.update_step, "update_times": -1,
        "eval_dataset": "q_target_dev",  # the target-task rows eval-driven components aim at (never the test set)
    }
    if part == "mix":
        cfg["dataset"] = ",".join(f"q_{t}" for t in meta["domain_order"])
    if part in ("weight", "order_static"):
        cfg.pop("update_step")
        cfg.pop("update_times")
    return cfg


def components(ms: list[dict], meta: dict, path: Path) -> None:
    comps: dict = {}
    for m in ms:
        if m["name"] is None:
            continue
        params = dict(m["params"])
        if "initial_proportions" in params:
            sizes = meta["domain_sizes"]
            params["initial_proportions"] = [n / sum(sizes) for n in sizes]
        comps.setdefault(PARTS[m["part"]][2], {})[m["key"]] = {"name": m["name"], "params": params}
        if m["part"] == "pipeline":
            for section, entries in STAGE_PRESETS.items():
                comps.setdefault(section, {}).update(entries)
    path.write_text(yaml.safe_dump(comps, sort_keys=False))


def env_for(out: Path, trace: Path | None = None) -> dict:
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", DISABLE_VERSION_CHECK="1",
               HF_HOME=str(out / "hf-home"), OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false")
    env.pop("FORCE_TORCHRUN", None)
    if trace is not None:
        env["DATAFLEX_PLUGINS"] = "dataflex.diagnostics"  # the decision trace: the rows each step trained on
        env["DATAFLEX_TRACE_DIR"] = str(trace)
    return env


def comparison(s: Settings, ms: list[dict], base: Path, data: Path, comp_path: Path, meta: dict):
    """compare's setup: one prepared part per mode / schedule, combined against random (the select part's)."""
    parts = []
    for part, (_, prefix, _) in PARTS.items():
        mine = [m for m in ms if m["part"] == part]
        if not mine:
            continue
        cfg_path = s.out / f"compare_{part}.yaml"
        cfg = base_config(s, part, base, data, comp_path, meta, next((m["key"] for m in mine if m["name"]), "random"))
        cfg_path.write_text(yaml.safe_dump(cfg, sort_keys=False))
        main = part == "select"
        parts.append((prepare(cfg_path, ",".join(m["method"] for m in mine), seeds=s.seeds,
                              budget="both" if main else "steps", metric="exact", out=s.out / "runs" / part,
                              eval_every=s.save_every, baseline="random" if main else mine[0]["method"],
                              test_dataset="q_target_test", eval_extra=["other=q_other_test"]), prefix))
    return combine(parts[0][0], parts[1:])


def run_extra(s: Settings, meta: dict):
    """compare's after_run hook: the shares of target / noisy / duplicate rows trained on after the warm-up,
    and the noisy rows' AUC of the selector's recorded pool scores."""

    def extra(spec) -> dict:
        entries = [e for kind in (spec.components or {}).values() for e in kind.values()]
        name = entries[0]["name"] if entries else None
        rows_meta = meta["domains"] if spec.cfg.get("train_type") == "dynamic_mix" else meta["pool"]
        consumed = []
        trace = spec.out / "trace"
        if trace.is_dir():
            for lines in read_trace(trace).values():
                consumed += [i for rec in lines if rec["step"] >= s.warmup for i in rec["indices"]]
        share = {k: (sum(bool(rows_meta[i][k]) for i in consumed) / len(consumed) if consumed else None)
                 for k in ("noisy", "dup")}
        share["target"] = sum(rows_meta[i]["task"] == TARGET for i in consumed) / len(consumed) if consumed else None
        aucs = []
        if (spec.out / "dataflex" / "run.json").is_file():
            for rec in read_run(spec.out).step_records():
                ps = (rec.get("summary") or {}).get("pool_scores")
                if ps:
                    pairs = [(v if name == "loss" else -v, rows_meta[i]["noisy"])
                             for i, v in zip(ps["indices"], ps["values"]) if v is not None]
                    a = auc([v for v, _ in pairs], [n for _, n in pairs])
                    if a is not None:
                        aucs.append(a)
        shutil.rmtree(trace, ignore_errors=True)
        return {"shares": share, "noisy_auc": sum(aucs) / len(aucs) if aucs else None}

    return extra


def auc(scores: list[float], positive: list[bool]) -> float | None:
    """P(score of a random positive > score of a random negative), ties half (Mann-Whitney)."""
    pos = [v for v, p in zip(scores, positive) if p]
    neg = [v for v, p in zip(scores, positive) if not p]
    if not pos or not neg:
        return None
    ranked = sorted((v, i) for i, v in enumerate(pos + neg))
    ranks = [0.0] * len(ranked)
    i = 0
    while i < len(ranked):
        j = i
        while j + 1 < len(ranked) and ranked[j + 1][0] == ranked[i][0]:
            j += 1
        for k in range(i, j + 1):
            ranks[ranked[k][1]] = (i + j) / 2 + 1
        i = j + 1
    r_pos = sum(ranks[:len(pos)])
    return (r_pos - len(pos) * (len(pos) + 1) / 2) / (len(pos) * len(neg))




# ================================================================================================ read-out
def mean_ci(values: list[float | None]) -> tuple[float, float]:
    """Mean and the half-width of its 95 % Student-t interval (0 for one value; nan for none)."""
    vals = [v for v in values if v is not None]
    if not vals:
        return float("nan"), float("nan")
    iv = interval([(v, 1.0) for v in vals])
    return iv.mean, iv.half or 0.0


def _pm(row: dict | None, key: str = "") -> tuple[float, float] | None:
    if not row or not row.get("seeds") or f"{key}mean" not in row:
        return None
    lo, hi = row[f"{key}lo"], row[f"{key}hi"]
    return row[f"{key}mean"], 0.0 if lo is None else (hi - lo) / 2


def summarise(s: Settings, data: dict) -> dict:
    """Per method: compare's rows (means, differences to random, verdicts) and the benchmark's own columns."""
    tables = {(t["budget"], t["metric"]): t for t in data["tables"]}
    rows = []
    for label in data["methods"]:
        runs = [r for r in data["runs"] if r["method"] == label and r["role"] == "main"] or \
               [r for r in data["runs"] if r["method"] == label]
        if not runs:
            continue
        get = {key: next((r for r in t["rows"] if r["method"] == label), None) for key, t in tables.items()}
        row = {"label": label, "seeds": len(runs), "train_type": runs[0]["config"].get("train_type") or "plain",
               "knob": float(label.split(":random_share=")[1]) if ":random_share=" in label else None}
        for key, metric in (("target_em", "exact"), ("other_em", "other:exact"), ("target_loss", "loss")):
            row[key] = _pm(get.get(("steps", metric)))
            row[f"{key}_diff"] = _pm(get.get(("steps", metric)), "diff_")
            row[f"{key}_verdict"] = (get.get(("steps", metric)) or {}).get("verdict")
        compute = get.get(("compute", "exact"))
        row["compute_diff"] = _pm(compute, "diff_")
        row["compute_verdict"] = (compute or {}).get("verdict")
        row["compute_past"] = any(n.startswith(f"{label}: its") for n in tables.get(("compute", "exact"), {}).get("notes", []))
        for key in ("target", "noisy", "dup"):
            row[f"{key}_share"] = mean_ci([(r["extra"] or {}).get("shares", {}).get(key) for r in runs])
        aucs = [(r["extra"] or {}).get("noisy_auc") for r in runs]
        row["noisy_auc"] = mean_ci(aucs) if any(a is not None for a in aucs) else None
        row["selection_s"] = mean_ci([r["seconds"]["decisions"] for r in runs])
        row["train_s"] = mean_ci([r["seconds"]["train"] for r in runs])
        rows.append(row)
    return {"rows": rows, "start": data.get("start"), "notes": [n for t in data["tables"] for n in t["notes"]],
            "against_plain": against_plain(data)}


AGAINST_PLAIN_METRICS = {"exact": "target EM", "loss": "target loss", "other:exact": "other-task EM"}


def against_plain(data: dict) -> dict | None:
    """The orderings (and a pipeline) against plain training at equal steps (#35): one compare table per metric
    of AGAINST_PLAIN_METRICS (target exact match, the target's answer loss, other-task exact match)."""
    labels = [m for m in data["methods"] if m.startswith(AGAINST_PLAIN)]
    if "plain" not in data["methods"] or not labels:
        return None
    runs: dict[str, dict[str, list]] = {}
    for r in data["runs"]:
        if r["method"] in labels or r["method"] == "plain":
            runs.setdefault(r["method"], {}).setdefault("main", [None] * data["seeds"])[r["seed_index"]] = r
    return {metric: analysis.table(runs, ["plain", *labels], "plain", "steps", metric, data["steps"])
            for metric in AGAINST_PLAIN_METRICS if metric == "exact" or metric in _metrics_of(data)}


def _metrics_of(data: dict) -> set[str]:
    return {k for r in data["runs"] for p in r.get("curve", []) for k in p.get("values", {})}


def fmt(mc, digits=2, signed=False) -> str:
    if mc is None or mc[0] != mc[0]:
        return "–"
    return f"{mc[0]:{'+' if signed else ''}.{digits}f} ± {mc[1]:.{digits}f}"


def reading(row: dict) -> str:
    if row["label"] == "random":
        return "(baseline)"
    word = row["target_em_verdict"] or "-"
    text = f"{word} at equal steps"
    if row["compute_verdict"] is not None or row["compute_diff"] is not None:
        text += f"; {row['compute_verdict'] or '-'} at equal compute"
        if row["compute_past"]:
            text += " (past random's last checkpoint)"
    return text


def report(s: Settings, summary: dict, meta: dict, command: str, transfer: dict | None, pretrain: dict) -> str:
    start = (summary.get("start") or {}).get("values", {})
    n_target = sum(r["task"] == TARGET for r in meta["pool"])
    lines = [
        f"`{command}`", "",
        f"Base: a {pretrain['params'] / 1e6:.2f}M-parameter Qwen2 (hidden {pretrain['hidden']}, {pretrain['layers']} "
        f"layers) pretrained for {pretrain['steps']} steps ({pretrain['seconds']:.0f} s) on {', '.join(OTHER_TASKS)}; "
        f"it has never seen `{TARGET}`. At step 0 it scores target EM {start.get('exact', 0):.2f}, other-task "
        f"EM {start.get('other:exact', 0):.2f}.",
        f"Pool: {len(meta['pool'])} rows, `{TARGET}` {100 * n_target / len(meta['pool']):.0f} %, wrong answers "
        f"{100 * sum(r['noisy'] for r in meta['pool']) / len(meta['pool']):.0f} %, near-duplicates "
        f"{100 * sum(r['dup'] for r in meta['pool']) / len(meta['pool']):.0f} %. Every method: {s.steps} optimizer "
        f"steps x {s.batch} rows (LoRA r={s.lora_rank}, constant lr {s.lr}), warm-up {s.warmup} random steps, then a "
        f"decision every {s.update_step} steps. Test: {len(meta['eval_target'])} held-out `{TARGET}` prompts and "
        f"{len(meta['eval_other'])} of {', '.join(HELD_OUT_OTHER)}, greedy exact match. Through `dataflex-cli compare`: "
        "mean ± 95 % CI over seeds (one seed: over the test prompts), differences to random paired by seed; "
        "equal compute = random read at the seconds the method used (training + decisions).",
        "",
        "| method | seeds | target EM | other-task EM | target loss | target share | noisy share | noisy AUC | "
        "selection s | train s | target EM - random, equal steps | target EM - random, equal compute | reading |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in summary["rows"]:
        lines.append(
            f"| {r['label']} | {r['seeds']} | {fmt(r['target_em'])} | {fmt(r['other_em'])} | {fmt(r['target_loss'])} | "
            f"{fmt(r['target_share'])} | {fmt(r['noisy_share'])} | {fmt(r['noisy_auc'])} | {fmt(r['selection_s'], 1)} | "
            f"{fmt(r['train_s'], 0)} | {fmt(r['target_em_diff'], signed=True)} | {fmt(r['compute_diff'], signed=True)} | "
            f"{reading(r)} |")
    plain = summary.get("against_plain")
    if plain and "rows" in plain:  # a results.json written before the per-metric tables
        plain = {"exact": plain}
    if plain:
        names = [AGAINST_PLAIN_METRICS[m] for m in plain]
        lines += ["", f"Orderings and the pipeline against plain training (LLaMA-Factory's own sampler) at {s.steps} "
                      "steps, each difference paired by seed (`verdict`: read off its interval; loss: lower is better):",
                  "", "| method | seeds | " + " | ".join(f"{n} | - plain | verdict" for n in names) + " |",
                  "|---|---|" + "---|---|---|" * len(names)]
        by_method = {m: {r["method"]: r for r in t["rows"]} for m, t in plain.items()}
        for label in [r["method"] for r in next(iter(plain.values()))["rows"] if r.get("seeds")]:
            cells = []
            for m in plain:
                r = by_method[m][label]
                cells.append(f"{fmt(_pm(r))} | {fmt(_pm(r, 'diff_'), signed=True)} | "
                             f"{r['verdict'] or ('(baseline)' if label == 'plain' else '-')}")
            lines.append(f"| {label} | {by_method['exact'][label]['seeds']} | " + " | ".join(cells) + " |")
    if transfer:
        lines += ["", f"Transfer: `less` run on a {transfer['proxy_params'] / 1e6:.2f}M-parameter proxy (seed 1); its "
                      f"selection ({transfer['rows']} rows, once per time chosen) exported with `dataflex-cli report "
                      f"OUTPUT_DIR --export-dataset DIR --repeats`; the {transfer['params'] / 1e6:.2f}M-parameter base above trained "
                      f"statically on it with `llamafactory-cli train` ({transfer['steps']} steps), against the same "
                      f"model on a random draw of the same size:", "",
                  "| data | seeds | target EM | other-task EM |", "|---|---|---|---|"]
        for name, v in transfer["rows_by_data"].items():
            lines.append(f"| {name} | {v['seeds']} | {fmt(v['target_em'])} | {fmt(v['other_em'])} |")
    return "\n".join(lines) + "\n"


def _curve(run: dict, start: dict | None) -> list[dict]:
    """A run's points with the untrained base as step 0."""
    return ([{"step": 0, "seconds": 0.0, "values": start["values"]}] if start else []) + run["curve"]


def plots(s: Settings, summary: dict, data: dict, out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    start = data.get("start")
    by: dict[str, list[dict]] = {}
    for r in data["runs"]:
        if r["method"] == "random" and r["role"] == "main" and any(x["role"] == "long" for x in data["runs"]):
            continue  # random's long runs carry its whole curve
        by.setdefault(r["method"], []).append(r)
    knobs = {r["label"] for r in summary["rows"] if r["knob"] is not None}
    fig, axes = plt.subplots(1, 2, figsize=(13, 5), sharex=True)
    for label, rs in by.items():
        if label in knobs:
            continue
        steps = sorted({p["step"] for p in _curve(rs[0], start)})
        for ax, key in zip(axes, ("exact", "other:exact")):
            stats = [mean_ci([next((p["values"][key] for p in _curve(r, start) if p["step"] == st), None) for r in rs])
                     for st in steps]
            mu = [m for m, _ in stats]
            style = {"color": "black", "linestyle": "--", "linewidth": 2} if label == "random" else {}
            line, = ax.plot(steps, mu, marker="o", markersize=3, label=label, **style)
            ax.fill_between(steps, [max(0.0, m - c) for m, c in stats], [min(1.0, m + c) for m, c in stats],
                            alpha=0.12, color=line.get_color())  # accuracies: the band is clipped to [0, 1]
    axes[0].set_ylabel(f"exact match, target task `{TARGET}`")
    axes[1].set_ylabel("exact match, the other tasks")
    for ax in axes:
        ax.set_xlabel("optimizer step")
        ax.axvline(s.steps, color="grey", linewidth=0.8)
        ax.grid(alpha=0.3)
    axes[1].legend(fontsize=7, loc="lower left")
    fig.suptitle("Accuracy vs step (mean, band = 95 % CI over seeds; random runs on to 2x the steps)")
    fig.tight_layout()
    fig.savefig(out / "accuracy_vs_step.png", dpi=100)
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(8, 5))
    if "random" in by:
        rs = by["random"]
        pts = [[(p["seconds"], p["values"]["exact"]) for p in _curve(r, start)] for r in rs]
        ax.plot([sum(p[i][0] for p in pts) / len(pts) for i in range(len(pts[0]))],
                [sum(p[i][1] for p in pts) / len(pts) for i in range(len(pts[0]))], "k--", label="random")
    for row in summary["rows"]:
        if row["label"] == "random" or row["knob"] is not None or row["label"] not in by:
            continue
        ends = [r["curve"][-1] for r in by[row["label"]]]
        ax.errorbar([sum(e["seconds"] for e in ends) / len(ends)], [row["target_em"][0]], yerr=[row["target_em"][1]],
                    fmt="o", capsize=3, label=row["label"])
    ax.set_xlabel("compute: seconds of the training loop, decisions included (1 thread)")
    ax.set_ylabel(f"exact match, `{TARGET}`")
    ax.set_title("Accuracy vs compute")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out / "accuracy_vs_compute.png", dpi=100)
    plt.close(fig)

    curves: dict[str, list[tuple[float, dict]]] = {}
    for row in summary["rows"]:
        if row["knob"] is not None:  # label "<selector>:random_share=<x>"; share 0 is the selector's own row
            curves.setdefault(row["label"].split(":random_share=")[0], []).append((row["knob"], row))
    for name in list(curves):
        own = next((r for r in summary["rows"] if r["label"] == name), None)
        if own is not None:
            curves[name].append((0.0, own))
        curves[name].sort(key=lambda kr: kr[0])
    if curves:
        rand = next((r for r in summary["rows"] if r["label"] == "random"), None)
        fig, axes = plt.subplots(1, 2, figsize=(12, 4.5), sharey=True)
        for ax, key, what in ((axes[0], "target_em", f"target `{TARGET}`"), (axes[1], "other_em", "other tasks")):
            for name, pts in curves.items():
                ax.errorbar([k for k, _ in pts], [r[key][0] for _, r in pts], yerr=[r[key][1] for _, r in pts],
                            marker="o", capsize=3, label=name)
            if rand:
                ax.axhline(rand[key][0], linestyle="--", linewidth=1, color="grey", label="random (equal steps)")
            ax.set_xlabel("random_share (share of every selection drawn at random)")
            ax.set_title(f"exact match, {what}")
            ax.grid(alpha=0.3)
        axes[0].set_ylabel("exact match")
        axes[1].legend(fontsize=8)
        fig.suptitle("A random share of every selection (mean, 95 % CI over seeds)")
        fig.tight_layout()
        fig.savefig(out / "random_share.png", dpi=100)
        plt.close(fig)


# ================================================================================================ transfer
def transfer(s: Settings, small_base: Path, large_base: Path, data: Path, comp_path: Path, meta: dict,
             evaluators: Evaluators) -> dict:
    """Select with the small model, export (every row once per time it was chosen), train the large one
    statically for the benchmark's number of steps; against a random draw of the same size."""
    work = s.out / "transfer"
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    env = env_for(s.out)
    run_dir = work / "select"
    cfg = {**base_config(s, "select", small_base, data, comp_path, meta, "less"), "output_dir": str(run_dir),
           "overwrite_output_dir": True, "save_strategy": "no"}
    (work / "select.yaml").write_text(yaml.safe_dump(cfg, sort_keys=False))
    subprocess.run(["dataflex-cli", "train", str(work / "select.yaml")], env=env, cwd=s.out, check=True,
                   capture_output=True, timeout=3600)
    exported = work / "exported"
    subprocess.run(["dataflex-cli", "report", str(run_dir), "--export-dataset", str(exported), "--repeats"], env=env, cwd=s.out,
                   check=True, capture_output=True, timeout=600)
    info = json.loads((exported / "dataset_info.json").read_text())
    name = next(iter(info))
    n_rows = len(json.loads((exported / info[name]["file_name"]).read_text()))
    pool = json.loads((data / "pool.json").read_text())
    rng = random.Random(99)
    (exported / "random_draw.json").write_text(json.dumps([pool[i] for i in rng.sample(range(len(pool)), min(n_rows, len(pool)))]))
    info["q_random_draw"] = {"file_name": "random_draw.json"}
    (exported / "dataset_info.json").write_text(json.dumps(info, indent=1))
    steps = s.steps  # equal steps with the dynamic runs (the exported rows, once per time chosen, are cycled)
    by_data: dict[str, dict] = {}
    for label, dataset in (("less selection (exported)", name), ("random draw, same size", "q_random_draw")):
        finals = []
        for seed in range(1, s.seeds + 1):
            out_dir = work / f"{dataset}-s{seed}"
            lf = {**base_config(s, "select", large_base, exported, comp_path, meta, "less"), "dataset": dataset,
                  "seed": seed, "output_dir": str(out_dir), "overwrite_output_dir": True, "save_strategy": "no",
                  "max_steps": steps}
            for key in ("train_type", "components_cfg_file", "component_name", "warmup_step", "update_step",
                        "update_times", "eval_dataset"):
                lf.pop(key, None)
            (work / f"{dataset}-s{seed}.yaml").write_text(yaml.safe_dump(lf, sort_keys=False))
            subprocess.run(["llamafactory-cli", "train", str(work / f"{dataset}-s{seed}.yaml")], env=env, cwd=s.out,
                           check=True, capture_output=True, timeout=3600)
            metrics = evaluators.measure(out_dir, work / "eval")
            finals.append({k: sum(p[0] for p in metrics[m]) / sum(p[1] for p in metrics[m])
                           for k, m in (("target_em", "exact"), ("other_em", "other:exact"))})
            shutil.rmtree(out_dir, ignore_errors=True)
        ems = {key: [f[key] for f in finals] for key in ("target_em", "other_em")}
        by_data[label] = {"seeds": s.seeds, "target_em": mean_ci(ems["target_em"]), "other_em": mean_ci(ems["other_em"]),
                          "each": ems}
        print(f"[quality] transfer, {label}: target EM {by_data[label]['target_em'][0]:.2f}", flush=True)
    params = json.loads((large_base / "pretrain.json").read_text())["params"]
    proxy_params = json.loads((small_base / "pretrain.json").read_text())["params"]
    return {"rows": n_rows, "steps": steps, "params": params, "proxy_params": proxy_params, "rows_by_data": by_data}


# ================================================================================================ main
def parse(argv: list[str] | None) -> tuple[Settings, str]:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path, default=ROOT / "bench" / "out" / "quality")
    ap.add_argument("--quick", action="store_true",
                    help="fewer seeds, methods and steps, no transfer (~14 minutes at one thread, 12 with the base cached)")
    ap.add_argument("--only", nargs="+", default=None, metavar="METHOD", help="methods to run (random is always run)")
    ap.add_argument("--seeds", type=int, default=None, help="seeds per method (random too)")
    ap.add_argument("--pool", type=int, default=None)
    ap.add_argument("--steps-per-selection", type=int, default=None)
    ap.add_argument("--selections", type=int, default=None)
    ap.add_argument("--warmup-steps", type=int, default=None)
    ap.add_argument("--pretrain-steps", type=int, default=None)
    ap.add_argument("--hidden", type=int, default=None)
    ap.add_argument("--shares", type=float, nargs="*", default=None, help="random_share values for the LESS curve")
    ap.add_argument("--no-transfer", action="store_true")
    ap.add_argument("--replot", action="store_true", help="only redraw the plots from <out>/results.json")
    ap.add_argument("--tiny", action="store_true",
                    help="toy sizes for the test suite: checks the pipeline, measures nothing")
    args = ap.parse_args(argv)
    s = Settings(out=args.out.resolve())
    if args.quick:
        s.pool, s.seeds, s.shares = 600, 1, [0.5]
        s.update_step, s.update_times, s.transfer = 30, 3, False  # the same base as the full run (cached)
        s.only = ["loss", "less", "zeroth", "less:random_share=0.5", "weight loss", "mix odm"]
    if args.tiny:
        s.pool, s.eval_target, s.eval_other, s.less_eval = 120, 10, 3, 4
        s.hidden, s.layers, s.proxy_hidden, s.proxy_layers, s.pretrain_steps, s.pretrain_batch = 48, 2, 32, 2, 10, 8
        s.warmup, s.update_step, s.update_times, s.checkpoints, s.seeds = 2, 2, 2, 2, 1
    for attr, val in (("pool", args.pool), ("update_step", args.steps_per_selection),
                      ("update_times", args.selections), ("warmup", args.warmup_steps),
                      ("pretrain_steps", args.pretrain_steps), ("seeds", args.seeds), ("hidden", args.hidden),
                      ("shares", args.shares)):
        if val is not None:
            setattr(s, attr, val)
    if args.only:
        s.only = args.only
    if args.no_transfer:
        s.transfer = False
    if s.only is not None and "random" not in s.only:
        s.only = ["random"] + s.only
    return s, "python bench/quality.py " + " ".join(argv if argv is not None else sys.argv[1:])


def replot(s: Settings) -> int:
    """Plots again from ``<out>/results.json`` (no training)."""
    saved = json.loads((s.out / "results.json").read_text())
    for key, value in saved["settings"].items():
        if key != "out" and hasattr(s, key):
            setattr(s, key, value)
    plots(s, saved["summary"], saved["compare"], s.out)
    print(f"[quality] plots written to {s.out}")
    return 0


def main(argv: list[str] | None = None) -> int:
    s, command = parse(argv)
    if "--replot" in (argv if argv is not None else sys.argv[1:]):
        return replot(s)
    s.out.mkdir(parents=True, exist_ok=True)
    t_start = time.perf_counter()
    import torch

    # pretraining and measuring here: OMP_NUM_THREADS when set, else up to 2 threads; every run: one thread
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS") or max(1, min(2, os.cpu_count() or 1))))
    os.environ.update(env_for(s.out))  # offline
    data = s.out / "data"
    meta = build_data(s, data)
    base = build_base(s.out, s.hidden, s.layers, s.pretrain_steps, s.pretrain_batch)
    pretrain = json.loads((base / "pretrain.json").read_text())
    ms = methods(s)
    comp_path = s.out / "components.yaml"
    components(ms, meta, comp_path)
    setup = comparison(s, ms, base, data, comp_path, meta)
    sets = {"": setup.measure_cfg, **{n: {**setup.cfg, "eval_dataset": d} for n, d in setup.extra_sets.items()}}
    evaluators = Evaluators(sets, setup.metric)
    print(f"[quality] {len(setup.runs)} runs of {s.steps} steps ({len(setup.methods)} methods) through compare",
          flush=True)
    result = execute(setup, evaluator=evaluators, after_run=run_extra(s, meta),
                     run_env=lambda spec: env_for(s.out, spec.out / "trace"))
    if result["failures"]:
        raise SystemExit("[quality] failed runs:\n" + "\n".join(result["failures"]))
    trans = None
    if s.transfer:
        if not any(m["label"] == "less" for m in ms):
            print("[quality] transfer skipped: needs the less method", flush=True)
        else:
            proxy = build_base(s.out, s.proxy_hidden, s.proxy_layers, s.pretrain_steps, s.pretrain_batch)
            trans = transfer(s, proxy, base, data, comp_path, meta, evaluators)
    summary = summarise(s, result)
    table = report(s, summary, meta, command, trans, pretrain)
    (s.out / "results.md").write_text(table)
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from _common import machine_info

    (s.out / "results.json").write_text(json.dumps({
        "command": command, "settings": {k: (str(v) if isinstance(v, Path) else v) for k, v in asdict(s).items()},
        "machine": machine_info(), "pretrain": pretrain, "summary": summary, "transfer": trans, "compare": result,
        "seconds": round(time.perf_counter() - t_start, 1)}, indent=1))
    plots(s, summary, result, s.out)
    print(table)
    print(f"[quality] written to {s.out} in {time.perf_counter() - t_start:.0f}s", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
