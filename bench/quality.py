"""Benchmark: does a method beat random at equal steps, and at equal compute? Exact-match accuracy, seeds, CIs.

    python bench/quality.py                 # the full benchmark, ~40 minutes on 2 CPU cores
    python bench/quality.py --quick         # fewer seeds, methods and steps: a few minutes
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
* **Runs**: every method trains through the real ``dataflex-cli train`` with the same LoRA, batch,
  learning rate (constant, so a prefix of a longer run equals a shorter run) and number of optimizer
  steps. ``random`` runs twice as many steps with the same checkpoints, which gives its accuracy at
  *equal compute*: at the step where random has spent as many seconds as the method did (its
  selection time converted into random's training steps).
* **Metrics** at every checkpoint: exact match (greedy generation) on held-out target prompts and on
  held-out prompts of the other tasks, target eval loss (mean token NLL of the answers). Per run:
  the share of target / noisy / duplicate rows trained on after the warm-up, the AUC of the loss
  score for finding noisy rows (``loss`` and ``delta_loss``), selection seconds and total seconds.
* **Report**: mean and 95 % confidence interval (Student t over seeds) per method, as a Markdown
  table (``results.md``), JSON (``results.json``) and plots (``accuracy_vs_step.png``,
  ``accuracy_vs_compute.png``, ``random_share.png``) in ``--out`` (default ``bench/out/quality``).
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
import math
import os
import random
import shutil
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path

import yaml
from _common import at_step

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


# ================================================================================================ settings
@dataclass
class Settings:
    out: Path
    pool: int = 1200
    target_share: float = 0.10
    noise_share: float = 0.10
    dup_share: float = 0.05
    eval_target: int = 100
    eval_other: int = 25  # per other task
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
    seeds_random: int = 5
    seeds: int = 3
    jobs: int = 2
    shares: list[float] = field(default_factory=lambda: [0.25, 0.5])
    knob_selectors: list[str] = field(default_factory=lambda: ["less", "tsds"])  # run with each share
    only: list[str] | None = None
    transfer: bool = True
    scoring_pool: float | None = None

    @property
    def steps(self) -> int:
        return self.warmup + self.update_step * self.update_times

    @property
    def save_every(self) -> int:
        return max(1, self.steps // self.checkpoints)


def methods(s: Settings) -> list[dict]:
    """Every run to make: method label, train_type, component name and params, seeds."""
    pool = {"candidate_pool": s.scoring_pool} if s.scoring_pool else {}
    sel = [
        ("loss", "loss", {"focus": "medium", "record_scores": True, **pool}),  # the original's components.yaml
        ("delta_loss", "delta_loss", {"record_scores": True, **pool}),
        ("less", "less", {"proj_dim": 1024, **pool}),
        # 2K = 32 forwards per scored row: a 30 % candidate pool (still more rows than a selection takes)
        ("zeroth", "zeroth", {"num_directions": 16, "candidate_pool": s.scoring_pool or 0.3}),
        ("cluster_less", "cluster_less", {"proj_dim": 1024, "cluster_size": 16, "samples_per_cluster": 4}),
        ("near", "near", {}),
        ("tsds", "tsds", {"kde_K": 50, "max_K": 200}),
    ]
    out = [{"label": "random", "train_type": "dynamic_select", "name": "random", "params": {},
            "seeds": list(range(1, s.seeds_random + 1)), "steps": 2 * s.steps}]
    for label, name, params in sel:
        out.append({"label": label, "train_type": "dynamic_select", "name": name, "params": params})
    for name in s.knob_selectors:
        params = next(p for label, n, p in sel if n == name)
        for share in s.shares:
            out.append({"label": f"{name} random_share={share}", "train_type": "dynamic_select", "name": name,
                        "params": {**params, "random_share": share}, "knob": share})
    out.append({"label": "weight loss", "train_type": "dynamic_weight", "name": "loss", "params": {}})
    out.append({"label": "weight adapt", "train_type": "dynamic_weight", "name": "adapt",
                "params": {"refresh_interval": 20, "anchor_batch_size": 8}})
    out.append({"label": "weight joint_update_aware", "train_type": "dynamic_weight", "name": "joint_update_aware",
                "params": {"beta": 1.0, "tau": 0.1, "target_update_step": 20}})
    # LLaMA-Factory's own sampler and loss, bit for bit (the uniform `custom` weighter): the weighters' baseline
    out.append({"label": "plain", "train_type": "dynamic_weight", "name": "custom", "params": {}})
    # curricula: every row once per epoch (1440 row-steps over a pool of 1200), only the order changes
    out.append({"label": "order static length", "train_type": "dynamic_reorder", "name": "static",
                "params": {"score": "length", "order": "ascending"}})
    out.append({"label": "order static loss", "train_type": "dynamic_reorder", "name": "static",
                "params": {"score": "loss", "order": "ascending"}})
    out.append({"label": "order dynamic loss", "train_type": "dynamic_reorder", "name": "dynamic",
                "params": {"order": "ascending"}})
    out.append({"label": "mix odm", "train_type": "dynamic_mix", "name": "odm",
                "params": {"warmup_steps": s.warmup, "initial_proportions": None}})
    out.append({"label": "mix random", "train_type": "dynamic_mix", "name": "random", "params": {}})
    for m in out:
        m.setdefault("seeds", list(range(1, s.seeds + 1)))
        m.setdefault("steps", s.steps)
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
    eval_other = [r for t in OTHER_TASKS for r in held_out(t, s.eval_other)]
    less_eval = held_out(TARGET, s.less_eval)  # what eval-driven selectors aim at: not the test prompts

    def dump(name: str, records: list[dict]) -> None:
        (folder / name).write_text(json.dumps([{k: r[k] for k in ("instruction", "input", "output")}
                                               for r in records], indent=0))

    info = {"q_pool": {"file_name": "pool.json"}, "q_target_dev": {"file_name": "target_dev.json"}}
    dump("pool.json", rows)
    dump("target_dev.json", less_eval)
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


# ================================================================================================ evaluation
def evaluate(model, tokenizer, items: list[dict], batch: int = 50) -> tuple[list[bool], float]:
    """Greedy exact match per item, and the mean token NLL of the reference answers."""
    import torch

    pad = tokenizer.pad_token_id
    em: list[bool] = []
    nll_sum, nll_n = 0.0, 0
    model.eval()
    with torch.no_grad():
        for start in range(0, len(items), batch):
            chunk = items[start:start + batch]
            enc = [_encode(tokenizer, f"{r['instruction']}\n{r['input']}", r["output"]) for r in chunk]
            width = max(len(p) for p, _ in enc)
            ids = torch.full((len(chunk), width), pad)
            mask = torch.zeros_like(ids)
            for i, (p, _) in enumerate(enc):  # left padding for generation
                ids[i, width - len(p):], mask[i, width - len(p):] = torch.tensor(p), 1
            new = max(len(a) for _, a in enc) + 2
            gen = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=new, do_sample=False,
                                 pad_token_id=pad, eos_token_id=tokenizer.eos_token_id)
            for i, r in enumerate(chunk):
                text = tokenizer.decode(gen[i, width:], skip_special_tokens=True)
                em.append(text.strip() == r["output"])
            # teacher-forced answer loss (right padding)
            full = [p + a for p, a in enc]
            w2 = max(map(len, full))
            ids2 = torch.full((len(chunk), w2), pad)
            mask2 = torch.zeros_like(ids2)
            labels = torch.full_like(ids2, -100)
            for i, ((p, a), f) in enumerate(zip(enc, full)):
                ids2[i, :len(f)], mask2[i, :len(f)] = torch.tensor(f), 1
                labels[i, len(p):len(f)] = torch.tensor(a)
            logits = model(input_ids=ids2, attention_mask=mask2).logits[:, :-1].float()
            tgt = labels[:, 1:]
            lp = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), tgt.reshape(-1),
                                                   ignore_index=-100, reduction="sum")
            nll_sum += float(lp)
            nll_n += int((tgt != -100).sum())
    return em, nll_sum / max(nll_n, 1)


def evaluate_run(run_dir: Path, base: Path, meta: dict) -> list[dict]:
    """Accuracy and loss at step 0 (the base) and at every checkpoint of ``run_dir``."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.set_num_threads(1)
    tok = AutoTokenizer.from_pretrained(base)
    import copy

    ckpts = sorted(run_dir.glob("checkpoint-*"), key=lambda p: int(p.name.split("-")[1]))
    out = []
    base_model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    for step, path in [(0, None)] + [(int(p.name.split("-")[1]), p) for p in ckpts]:
        model = base_model if path is None else PeftModel.from_pretrained(copy.deepcopy(base_model), path)
        em_t, loss_t = evaluate(model, tok, meta["eval_target"])
        em_o, _ = evaluate(model, tok, meta["eval_other"])
        per_task = {}
        for r, ok in zip(meta["eval_other"], em_o):
            per_task.setdefault(r["task"], []).append(ok)
        out.append({"step": step, "target_em": sum(em_t) / len(em_t), "other_em": sum(em_o) / len(em_o),
                    "target_loss": loss_t, "per_task_em": {k: sum(v) / len(v) for k, v in per_task.items()}})
    return out


# ================================================================================================ runs
def run_yaml(s: Settings, m: dict, seed: int, base: Path, data: Path, run_dir: Path, comp_path: Path,
             meta: dict) -> dict:
    cfg = {
        "model_name_or_path": str(base), "stage": "sft", "do_train": True, "finetuning_type": "lora",
        "lora_target": "all", "lora_rank": s.lora_rank, "lora_alpha": 2 * s.lora_rank,
        "dataset": "q_pool", "dataset_dir": str(data), "template": "default", "cutoff_len": 64,
        "overwrite_cache": True, "preprocessing_num_workers": 1, "dataloader_num_workers": 0, "seed": seed,
        "output_dir": str(run_dir), "overwrite_output_dir": True, "report_to": "none", "logging_steps": 10,
        "save_strategy": "steps", "save_steps": s.save_every, "save_only_model": True, "plot_loss": False,
        "per_device_train_batch_size": s.batch, "gradient_accumulation_steps": 1, "learning_rate": s.lr,
        "lr_scheduler_type": "constant", "max_steps": m["steps"], "bf16": False,
        "include_num_input_tokens_seen": True,
        "train_type": m["train_type"], "components_cfg_file": str(comp_path), "component_name": m["key"],
        "warmup_step": s.warmup, "update_step": s.update_step, "update_times": -1,
    }
    cfg["eval_dataset"] = "q_target_dev"  # the target-task rows eval-driven components aim at (never the test set)
    if m["train_type"] == "dynamic_mix":
        cfg["dataset"] = ",".join(f"q_{t}" for t in meta["domain_order"])
    if m["train_type"] == "dynamic_weight" or (m["train_type"] == "dynamic_reorder" and m["name"] == "static"):
        cfg.pop("update_step")
        cfg.pop("update_times")
    return cfg


def components(s: Settings, ms: list[dict], meta: dict, path: Path) -> None:
    kinds = {"dynamic_select": "selectors", "dynamic_weight": "weighters", "dynamic_mix": "mixers",
             "dynamic_reorder": "reorderers"}
    comps: dict = {"selectors": {}, "weighters": {}, "mixers": {}, "reorderers": {}}
    for k, m in enumerate(ms):
        m["key"] = f"m{k}_{m['name']}"
        params = dict(m["params"])
        if "initial_proportions" in params:
            sizes = meta["domain_sizes"]
            params["initial_proportions"] = [n / sum(sizes) for n in sizes]
        comps[kinds[m["train_type"]]][m["key"]] = {"name": m["name"], "params": params}
    path.write_text(yaml.safe_dump({k: v for k, v in comps.items() if v}, sort_keys=False))


def env_for(out: Path, trace: Path | None = None) -> dict:
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", DISABLE_VERSION_CHECK="1",
               HF_HOME=str(out / "hf-home"), OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false")
    env.pop("FORCE_TORCHRUN", None)
    if trace is not None:
        env["DATAFLEX_PLUGINS"] = "dataflex.diagnostics"  # the decision trace: the rows each step trained on
        env["DATAFLEX_TRACE_DIR"] = str(trace)
    return env


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


def one_run(s: Settings, m: dict, seed: int, base: Path, data: Path, comp_path: Path, meta: dict) -> dict:
    run_dir = s.out / "runs" / f"{m['key']}-s{seed}"
    shutil.rmtree(run_dir, ignore_errors=True)
    trace = run_dir.with_name(run_dir.name + "-trace")
    shutil.rmtree(trace, ignore_errors=True)
    cfg = run_yaml(s, m, seed, base, data, run_dir, comp_path, meta)
    cfg_path = s.out / "runs" / f"{m['key']}-s{seed}.yaml"
    cfg_path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    t0 = time.perf_counter()
    proc = subprocess.run(["dataflex-cli", "train", str(cfg_path)], env=env_for(s.out, trace), cwd=s.out,
                          capture_output=True, text=True, timeout=3600)
    wall = time.perf_counter() - t0
    (s.out / "runs" / f"{m['key']}-s{seed}.log").write_text(proc.stdout + proc.stderr)
    if proc.returncode != 0:
        tail = "\n".join(proc.stderr.strip().splitlines()[-15:])
        raise SystemExit(f"[quality] {m['label']} seed {seed} failed (exit {proc.returncode}):\n{tail}")
    t1 = time.perf_counter()
    curve = evaluate_run(run_dir, base, meta)
    eval_s = time.perf_counter() - t1
    train = json.loads((run_dir / "train_results.json").read_text())
    rows_meta = meta["domains"] if m["train_type"] == "dynamic_mix" else meta["pool"]
    consumed: list[int] = []
    for lines in read_trace(trace).values():
        consumed += [i for rec in lines if rec["step"] >= s.warmup for i in rec["indices"]]
    share = {k: (sum(bool(rows_meta[i][k]) for i in consumed) / len(consumed) if consumed else None)
             for k in ("noisy", "dup")}
    share["target"] = sum(rows_meta[i]["task"] == TARGET for i in consumed) / len(consumed) if consumed else None
    aucs = []
    if (run_dir / "dataflex" / "run.json").is_file():
        for rec in read_run(run_dir).step_records():
            ps = (rec.get("summary") or {}).get("pool_scores")
            if ps:
                pairs = [(v if m["name"] == "loss" else -v, rows_meta[i]["noisy"])
                         for i, v in zip(ps["indices"], ps["values"]) if v is not None]
                a = auc([v for v, _ in pairs], [n for _, n in pairs])
                if a is not None:
                    aucs.append(a)
    steps = m["steps"]
    result = {
        "label": m["label"], "name": m["name"], "train_type": m["train_type"], "seed": seed, "steps": steps,
        "knob": m.get("knob"), "curve": curve, "wall_s": round(wall, 2), "eval_s": round(eval_s, 2),
        "train_runtime_s": train.get("train_runtime"), "dataflex_s": train.get("dataflex_seconds", 0.0),
        "tokens": train.get("num_input_tokens_seen"), "shares": share,
        "noisy_auc": sum(aucs) / len(aucs) if aucs else None,
    }
    (run_dir.parent / f"{m['key']}-s{seed}.json").write_text(json.dumps(result, indent=1))
    shutil.rmtree(run_dir, ignore_errors=True)  # checkpoints are evaluated: keep the record only
    shutil.rmtree(trace, ignore_errors=True)
    print(f"[quality] {m['label']} seed {seed}: target EM {curve[-1]['target_em']:.2f}, other EM "
          f"{curve[-1]['other_em']:.2f}, selection {result['dataflex_s']:.1f}s, run {wall:.0f}s", flush=True)
    return result


# ================================================================================================ statistics
T975 = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 7: 2.365, 8: 2.306, 9: 2.262, 10: 2.228}


def mean_ci(values: list[float]) -> tuple[float, float]:
    """Mean and the half-width of its 95 % Student-t interval (0 for one value)."""
    vals = [v for v in values if v is not None]
    if not vals:
        return float("nan"), float("nan")
    mu = sum(vals) / len(vals)
    if len(vals) < 2:
        return mu, 0.0
    sd = math.sqrt(sum((v - mu) ** 2 for v in vals) / (len(vals) - 1))
    return mu, T975.get(len(vals) - 1, 1.96) * sd / math.sqrt(len(vals))


def summarise(s: Settings, results: list[dict]) -> dict:
    by: dict[str, list[dict]] = {}
    for r in results:
        by.setdefault(r["label"], []).append(r)
    rand = by.get("random", [])
    # random's seconds per training step: its training time without DataFlex's own, per step
    step_s = (sum((r["train_runtime_s"] - r["dataflex_s"]) / r["steps"] for r in rand) / len(rand)) if rand else None
    rows = []
    for label, rs in by.items():
        steps = s.steps
        final = [at_step(r["curve"], steps, "target_em") for r in rs]
        row = {"label": label, "seeds": len(rs), "knob": rs[0]["knob"], "train_type": rs[0]["train_type"]}
        for key in ("target_em", "other_em", "target_loss"):
            row[key] = mean_ci([at_step(r["curve"], steps, key) for r in rs])
        row["target_em_each"] = final
        for key in ("target", "noisy", "dup"):
            row[f"{key}_share"] = mean_ci([r["shares"][key] for r in rs])
        row["noisy_auc"] = mean_ci([r["noisy_auc"] for r in rs]) if rs[0]["noisy_auc"] is not None else None
        row["selection_s"] = mean_ci([r["dataflex_s"] for r in rs])
        row["total_s"] = mean_ci([r["wall_s"] for r in rs])
        row["tokens"] = mean_ci([r["tokens"] * steps / r["steps"] if r["tokens"] else None for r in rs])
        if rand and step_s and label != "random":
            extra = row["selection_s"][0] / step_s
            row["equal_compute_steps"] = steps + extra
            row["random_at_equal_compute"] = mean_ci([at_step(r["curve"], steps + extra, "target_em") for r in rand])
            row["random_other_at_equal_compute"] = mean_ci([at_step(r["curve"], steps + extra, "other_em")
                                                            for r in rand])
            row["beyond_random_curve"] = steps + extra > rand[0]["steps"]
        rows.append(row)
    return {"step_seconds_random": step_s, "rows": rows}


def compare(a: tuple[float, float], b: tuple[float, float]) -> int:
    """1 when interval a lies above interval b (mean ± half-width), -1 below, 0 when they overlap."""
    if a[0] - a[1] > b[0] + b[1]:
        return 1
    return -1 if a[0] + a[1] < b[0] - b[1] else 0


def verdict(row: dict, rand: dict | None) -> str:
    if rand is None or row["label"] == "random":
        return ""
    equal_steps = {1: "beats random at equal steps", -1: "worse than random at equal steps",
                   0: "not distinguishable from random at equal steps"}[compare(row["target_em"], rand["target_em"])]
    if "random_at_equal_compute" not in row:
        return equal_steps
    compute = {1: "beats it at equal compute", -1: "loses at equal compute",
               0: "a tie at equal compute"}[compare(row["target_em"], row["random_at_equal_compute"])]
    if row.get("beyond_random_curve"):
        compute += " (random's curve ends earlier: its last point)"
    return f"{equal_steps}; {compute}"


def fmt(mc, digits=2) -> str:
    if mc is None:
        return "–"
    mu, ci = mc
    if mu != mu:
        return "–"
    return f"{mu:.{digits}f} ± {ci:.{digits}f}"


def report(s: Settings, summary: dict, meta: dict, results: list[dict], command: str, transfer: dict | None,
           pretrain: dict) -> str:
    rows = summary["rows"]
    rand = next((r for r in rows if r["label"] == "random"), None)
    base = results[0]["curve"][0] if results else {}
    n_target = sum(r["task"] == TARGET for r in meta["pool"])
    lines = [
        f"`{command}`", "",
        f"Base: a {pretrain['params'] / 1e6:.2f}M-parameter Qwen2 (hidden {pretrain['hidden']}, {pretrain['layers']} "
        f"layers) pretrained for {pretrain['steps']} steps ({pretrain['seconds']:.0f} s) on {', '.join(OTHER_TASKS)}; "
        f"it has never seen `{TARGET}`. At step 0 it scores target EM {base.get('target_em', 0):.2f}, other-task "
        f"EM {base.get('other_em', 0):.2f}.",
        f"Pool: {len(meta['pool'])} rows, `{TARGET}` {100 * n_target / len(meta['pool']):.0f} %, wrong answers "
        f"{100 * sum(r['noisy'] for r in meta['pool']) / len(meta['pool']):.0f} %, near-duplicates "
        f"{100 * sum(r['dup'] for r in meta['pool']) / len(meta['pool']):.0f} %. Every method: {s.steps} optimizer "
        f"steps x {s.batch} rows (LoRA r={s.lora_rank}, constant lr {s.lr}), warm-up {s.warmup} random steps, then a "
        f"decision every {s.update_step} steps. Test: {len(meta['eval_target'])} held-out `{TARGET}` prompts and "
        f"{len(meta['eval_other'])} of the other tasks, greedy exact match. Mean ± 95 % CI over seeds.",
        "",
        "| method | seeds | target EM | other-task EM | target loss | target share | noisy share | noisy AUC | "
        "selection s | run s | random at equal compute (steps) | reading |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        eq = "–"
        if "random_at_equal_compute" in r:
            eq = f"{fmt(r['random_at_equal_compute'])} ({r['equal_compute_steps']:.0f})"
        lines.append(
            f"| {r['label']} | {r['seeds']} | {fmt(r['target_em'])} | {fmt(r['other_em'])} | {fmt(r['target_loss'])} | "
            f"{fmt(r['target_share'])} | {fmt(r['noisy_share'])} | {fmt(r['noisy_auc'])} | {fmt(r['selection_s'], 1)} | "
            f"{fmt(r['total_s'], 0)} | {eq} | {verdict(r, rand)} |")
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


def plots(s: Settings, summary: dict, results: list[dict], out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    by: dict[str, list[dict]] = {}
    for r in results:
        by.setdefault(r["label"], []).append(r)
    fig, axes = plt.subplots(1, 2, figsize=(13, 5), sharex=True)
    for label, rs in by.items():
        if rs[0]["knob"] is not None:
            continue
        steps = sorted({c["step"] for c in rs[0]["curve"]})
        for ax, key in zip(axes, ("target_em", "other_em")):
            stats = [mean_ci([at_step(r["curve"], st, key) for r in rs]) for st in steps]
            mu = [m for m, _ in stats]
            lo = [max(0.0, m - c) for m, c in stats]  # accuracies: the band is clipped to [0, 1]
            hi = [min(1.0, m + c) for m, c in stats]
            style = {"color": "black", "linestyle": "--", "linewidth": 2} if label == "random" else {}
            line, = ax.plot(steps, mu, marker="o", markersize=3, label=label, **style)
            ax.fill_between(steps, lo, hi, alpha=0.12, color=line.get_color())
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
    step_s = summary["step_seconds_random"]
    if "random" in by and step_s:
        rs = by["random"]
        steps = sorted({c["step"] for c in rs[0]["curve"]})
        mu = [mean_ci([at_step(r["curve"], st, "target_em") for r in rs])[0] for st in steps]
        ax.plot([st * step_s for st in steps], mu, "k--", label="random (training seconds)")
    for row in summary["rows"]:
        if row["label"] == "random" or row["knob"] is not None:
            continue
        x = (s.steps * step_s if step_s else 0) + row["selection_s"][0]
        ax.errorbar([x], [row["target_em"][0]], yerr=[row["target_em"][1]], fmt="o", capsize=3, label=row["label"])
    ax.set_xlabel("compute: training seconds + selection seconds (1 thread)")
    ax.set_ylabel(f"exact match, `{TARGET}`")
    ax.set_title("Accuracy vs compute")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out / "accuracy_vs_compute.png", dpi=100)
    plt.close(fig)

    curves: dict[str, list[tuple[float, dict]]] = {}
    for row in summary["rows"]:
        if row["knob"] is not None:  # label "<selector> random_share=<x>"; share 0 is the selector's own row
            curves.setdefault(row["label"].split(" random_share=")[0], []).append((row["knob"], row))
    for name in list(curves):
        plain = next((r for r in summary["rows"] if r["label"] == name), None)
        if plain is not None:
            curves[name].append((0.0, plain))
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
             less_key: str) -> dict:
    """Select with the small model, export (every row once per time it was chosen), train the large one
    statically for the benchmark's number of steps; against a random draw of the same size."""
    work = s.out / "transfer"
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    env = env_for(s.out)
    sel = {"label": "less", "train_type": "dynamic_select", "name": "less", "key": less_key, "steps": s.steps}
    run_dir = work / "select"
    cfg = run_yaml(s, sel, 1, small_base, data, run_dir, comp_path, meta)
    cfg["save_strategy"] = "no"
    cfg.pop("save_steps")
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
    datasets = (("less selection (exported)", name), ("random draw, same size", "q_random_draw"))

    def static_run(dataset: str, seed: int) -> dict:
        out_dir = work / f"{dataset}-s{seed}"
        lf = {"model_name_or_path": str(large_base), "stage": "sft", "do_train": True, "finetuning_type": "lora",
              "lora_target": "all", "lora_rank": s.lora_rank, "lora_alpha": 2 * s.lora_rank, "dataset": dataset,
              "dataset_dir": str(exported), "template": "default", "cutoff_len": 64, "overwrite_cache": True,
              "preprocessing_num_workers": 1, "seed": seed, "output_dir": str(out_dir),
              "overwrite_output_dir": True, "report_to": "none", "save_strategy": "no",
              "per_device_train_batch_size": s.batch, "learning_rate": s.lr, "lr_scheduler_type": "constant",
              "max_steps": steps, "bf16": False, "logging_steps": 10}
        (work / f"{dataset}-s{seed}.yaml").write_text(yaml.safe_dump(lf, sort_keys=False))
        subprocess.run(["llamafactory-cli", "train", str(work / f"{dataset}-s{seed}.yaml")], env=env, cwd=s.out,
                       check=True, capture_output=True, timeout=3600)
        (out_dir / "checkpoint-final").mkdir(exist_ok=True)
        for f in out_dir.glob("adapter_*"):
            shutil.copy(f, out_dir / "checkpoint-final" / f.name)
        (out_dir / "checkpoint-final").rename(out_dir / f"checkpoint-{steps}")
        last = evaluate_run(out_dir, large_base, meta)[-1]
        shutil.rmtree(out_dir, ignore_errors=True)
        return last

    runs = [(label, dataset, seed) for label, dataset in datasets for seed in range(1, s.seeds + 1)]
    with ThreadPoolExecutor(max_workers=s.jobs) as pool:
        finals = list(pool.map(lambda r: static_run(r[1], r[2]), runs))
    by_data: dict[str, dict] = {}
    for label, _ in datasets:
        ems = {key: [f[key] for (lab, _, _), f in zip(runs, finals) if lab == label] for key in ("target_em", "other_em")}
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
                    help="fewer seeds, methods and steps, no transfer (about 6 minutes, 4 with the base cached)")
    ap.add_argument("--only", nargs="+", default=None, metavar="METHOD", help="methods to run (random is always run)")
    ap.add_argument("--seeds", type=int, default=None, help="seeds per method (random: --seeds-random)")
    ap.add_argument("--seeds-random", type=int, default=None)
    ap.add_argument("--jobs", type=int, default=2, help="runs at a time (each on one thread)")
    ap.add_argument("--pool", type=int, default=None)
    ap.add_argument("--steps-per-selection", type=int, default=None)
    ap.add_argument("--selections", type=int, default=None)
    ap.add_argument("--warmup-steps", type=int, default=None)
    ap.add_argument("--pretrain-steps", type=int, default=None)
    ap.add_argument("--hidden", type=int, default=None)
    ap.add_argument("--shares", type=float, nargs="*", default=None, help="random_share values for the LESS curve")
    ap.add_argument("--no-transfer", action="store_true")
    ap.add_argument("--replot", action="store_true", help="only redraw the plots from <out>/results.json")
    ap.add_argument("--merge", type=Path, default=None, metavar="DIR",
                    help="add the methods of DIR/results.json (same set-up) to <out>'s results, no training")
    ap.add_argument("--tiny", action="store_true",
                    help="toy sizes for the test suite: checks the pipeline, measures nothing")
    args = ap.parse_args(argv)
    s = Settings(out=args.out.resolve())
    if args.quick:
        s.pool, s.seeds_random, s.seeds, s.shares = 600, 2, 1, [0.5]
        s.update_step, s.update_times, s.transfer = 30, 3, False  # the same base as the full run (cached)
        s.only = ["loss", "less", "zeroth", "less random_share=0.5", "weight loss", "mix odm"]
    if args.tiny:
        s.pool, s.eval_target, s.eval_other, s.less_eval = 120, 10, 3, 4
        s.hidden, s.layers, s.proxy_hidden, s.proxy_layers, s.pretrain_steps, s.pretrain_batch = 48, 2, 32, 2, 10, 8
        s.warmup, s.update_step, s.update_times, s.checkpoints, s.seeds_random, s.seeds = 2, 2, 2, 2, 1, 1
    for attr, val in (("pool", args.pool), ("update_step", args.steps_per_selection),
                      ("update_times", args.selections), ("warmup", args.warmup_steps),
                      ("pretrain_steps", args.pretrain_steps), ("seeds", args.seeds),
                      ("seeds_random", args.seeds_random), ("hidden", args.hidden), ("shares", args.shares)):
        if val is not None:
            setattr(s, attr, val)
    if args.only:
        s.only = args.only
    s.jobs = args.jobs
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
    plots(s, saved["summary"], saved["runs"], s.out)
    print(f"[quality] plots written to {s.out}")
    return 0


def merge(s: Settings, other: Path) -> int:
    """Add the runs of methods that ``<out>/results.json`` lacks from ``other/results.json`` (same set-up:
    pool, base and schedule must match), then rewrite the table, JSON and plots of ``<out>``."""
    mine = json.loads((s.out / "results.json").read_text())
    theirs = json.loads((Path(other) / "results.json").read_text())
    keys = ("pool", "target_share", "noise_share", "hidden", "layers", "pretrain_steps", "warmup", "update_step",
            "batch", "lr", "lora_rank")
    diff = [k for k in keys if mine["settings"].get(k) != theirs["settings"].get(k)]
    if diff or mine["pretrain"]["fingerprint"] != theirs["pretrain"]["fingerprint"]:
        raise SystemExit(f"--merge: {other} was run with another set-up ({', '.join(diff) or 'base model'})")
    for key, value in mine["settings"].items():
        if key != "out" and hasattr(s, key):
            setattr(s, key, value)
    have = {r["label"] for r in mine["runs"]}
    added = [r for r in theirs["runs"] if r["label"] not in have]
    runs = mine["runs"] + added
    meta = json.loads((s.out / "data" / "meta.json").read_text())
    summary = summarise(s, runs)
    command = mine["command"] + f" (+ {theirs['command']}, merged)"
    (s.out / "results.md").write_text(report(s, summary, meta, runs, command, mine["transfer"], mine["pretrain"]))
    mine.update(runs=runs, summary=summary, command=command)
    (s.out / "results.json").write_text(json.dumps(mine, indent=1))
    plots(s, summary, runs, s.out)
    print(f"[quality] merged {len(added)} runs ({sorted({r['label'] for r in added})}) into {s.out}")
    return 0


def main(argv: list[str] | None = None) -> int:
    s, command = parse(argv)
    args_list = argv if argv is not None else sys.argv[1:]
    if "--replot" in args_list:
        return replot(s)
    if "--merge" in args_list:
        return merge(s, Path(args_list[args_list.index("--merge") + 1]))
    s.out.mkdir(parents=True, exist_ok=True)
    (s.out / "runs").mkdir(exist_ok=True)
    t_start = time.perf_counter()
    import torch

    torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))
    data = s.out / "data"
    meta = build_data(s, data)
    base = build_base(s.out, s.hidden, s.layers, s.pretrain_steps, s.pretrain_batch)
    pretrain = json.loads((base / "pretrain.json").read_text())
    ms = methods(s)
    comp_path = s.out / "components.yaml"
    components(s, ms, meta, comp_path)
    jobs = [(m, seed) for m in ms for seed in m["seeds"]]
    jobs.sort(key=lambda j: -j[0]["steps"])  # the long random runs first
    print(f"[quality] {len(jobs)} runs of {s.steps} steps ({len(ms)} methods), {s.jobs} at a time", flush=True)
    with ThreadPoolExecutor(max_workers=s.jobs) as pool:
        results = list(pool.map(lambda j: one_run(s, j[0], j[1], base, data, comp_path, meta), jobs))
    results.sort(key=lambda r: ([m["label"] for m in ms].index(r["label"]), r["seed"]))
    trans = None
    if s.transfer:
        less = next((m for m in ms if m["label"] == "less"), None)
        if less is None:
            print("[quality] transfer skipped: needs the less method", flush=True)
        else:
            proxy = build_base(s.out, s.proxy_hidden, s.proxy_layers, s.pretrain_steps, s.pretrain_batch)
            trans = transfer(s, proxy, base, data, comp_path, meta, less["key"])
    summary = summarise(s, results)
    table = report(s, summary, meta, results, command, trans, pretrain)
    (s.out / "results.md").write_text(table)
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from _common import machine_info

    (s.out / "results.json").write_text(json.dumps({
        "command": command, "settings": {k: (str(v) if isinstance(v, Path) else v) for k, v in asdict(s).items()},
        "machine": machine_info(),
        "pretrain": pretrain, "summary": summary, "transfer": trans, "runs": results,
        "seconds": round(time.perf_counter() - t_start, 1)}, indent=1))
    plots(s, summary, results, s.out)
    print(table)
    print(f"[quality] written to {s.out} in {time.perf_counter() - t_start:.0f}s", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
