"""Offline demo assets: synthetic instruction data and a tiny causal LM.

Everything here is deterministic and needs no network, so the quick start, the tests and the
benchmarks run on a laptop CPU. Two entry points:

    python -m dataflex.demo data  [OUT_DIR]    # regenerate data/*.json (already committed)
    python -m dataflex.demo model OUT_DIR      # build a ~100k-parameter Qwen2 model + BPE tokenizer
    python -m dataflex.demo moe OUT_DIR        # the same tokenizer with a tiny Qwen2-MoE (4 experts)

The instruction data are several small tasks with checkable answers. Every record carries a
``task`` field (ignored by LLaMA-Factory, which keeps only mapped columns) so benchmarks can tell
which tasks a selector picked; the row order of each file is the dataset index LLaMA-Factory
assigns. The text data (``stage: pt``) are four domains that differ clearly: encyclopedia-like
prose, web-like text, Python functions and arithmetic.
"""

from __future__ import annotations

import json
import os
import random
import sys
from pathlib import Path
from typing import Callable

WORDS = (
    "apple river planet garden silver window market forest candle rocket pencil orange "
    "castle dragon basket meadow violet thunder harbor lantern marble pepper saddle timber "
    "velvet walnut zebra anchor bridge cactus dolphin engine falcon glacier hammer island "
    "jungle kettle lemon magnet needle oyster parrot quartz rabbit spider tomato umbrella"
).split()

TASK_INSTRUCTIONS = {
    "add": "Add the two numbers.",
    "reverse": "Reverse the letters of the word.",
    "upper": "Rewrite the text in capital letters.",
    "sort": "Sort the numbers from smallest to largest.",
    "vowels": "Count the vowels in the word.",
}


def _make_add(rng: random.Random) -> tuple[str, str]:
    a, b = rng.randint(10, 99), rng.randint(10, 99)
    return f"{a} + {b}", str(a + b)


def _make_reverse(rng: random.Random) -> tuple[str, str]:
    w = rng.choice(WORDS)
    return w, w[::-1]


def _make_upper(rng: random.Random) -> tuple[str, str]:
    text = " ".join(rng.sample(WORDS, rng.randint(2, 4)))
    return text, text.upper()


def _make_sort(rng: random.Random) -> tuple[str, str]:
    nums = [rng.randint(0, 99) for _ in range(rng.randint(3, 7))]
    return " ".join(map(str, nums)), " ".join(map(str, sorted(nums)))


def _make_vowels(rng: random.Random) -> tuple[str, str]:
    w = rng.choice(WORDS)
    return w, str(sum(c in "aeiou" for c in w))


MAKERS: dict[str, Callable[[random.Random], tuple[str, str]]] = {
    "add": _make_add,
    "reverse": _make_reverse,
    "upper": _make_upper,
    "sort": _make_sort,
    "vowels": _make_vowels,
}


def _alpaca(task: str, inp: str, out: str) -> dict:
    return {"instruction": TASK_INSTRUCTIONS[task], "input": inp, "output": out, "task": task}


def _noisy(rng: random.Random) -> dict:
    """A corrupted sample: a real instruction with an answer that has nothing to do with it."""
    task = rng.choice(sorted(MAKERS))
    inp, _ = MAKERS[task](rng)
    junk = " ".join(rng.choice(WORDS)[::-1] for _ in range(rng.randint(3, 8)))
    return {"instruction": TASK_INSTRUCTIONS[task], "input": inp, "output": junk, "task": "noisy"}


# Train mixture: the eval task ("add") is a minority, plus a few corrupted samples.
MIX_COUNTS = {"add": 90, "reverse": 120, "upper": 120, "sort": 120, "vowels": 120, "noisy": 30}
EVAL_TASK = "add"
EVAL_SIZE = 40
CHAT_SIZE = 80


# --------------------------------------------------------------------------- text domains (stage: pt)
PLACES = "Avalon Brisk Corvel Dunmere Elstow Farrow Glenhaven Hollis Ivel Jarrow Kestrel Lorne".split()
ADJECTIVES = "old quiet bright narrow ancient busy green coastal northern southern hidden famous".split()
NOUNS = "bridge market river harbor castle meadow forest lantern garden tower valley island".split()


def _prose(rng: random.Random) -> str:
    """An encyclopedia-like paragraph (the ``wiki_demo`` domain)."""
    place = rng.choice(PLACES)
    sentences = []
    for _ in range(rng.randint(3, 6)):
        a, n = rng.choice(ADJECTIVES), rng.choice(NOUNS)
        year = rng.randint(1200, 1990)
        sentences.append(rng.choice([
            f"The {a} {n} of {place} was built in {year}.",
            f"{place} is known for its {a} {n} and its {rng.choice(NOUNS)}.",
            f"In {year} the people of {place} moved the {n} to the {rng.choice(ADJECTIVES)} side of the valley.",
            f"Visitors to {place} often describe the {n} as {a}.",
        ]))
    return " ".join(sentences)


def _web(rng: random.Random) -> str:
    """Web-like text: reviews, recipes and notices (the ``c4_demo`` domain)."""
    item = rng.choice(WORDS)
    kind = rng.randrange(3)
    if kind == 0:
        stars = rng.randint(1, 5)
        return (f"Review: I bought the {item} last week. {stars} out of 5 stars. "
                f"{'Would buy again!' if stars > 3 else 'Not worth the price.'} Shipping took {rng.randint(2, 9)} days.")
    if kind == 1:
        steps = rng.sample(WORDS, 3)
        return (f"Recipe for {item} soup: chop the {steps[0]}, add the {steps[1]}, simmer for "
                f"{rng.randint(10, 60)} minutes and serve with {steps[2]}.")
    return (f"Notice: the {item} club meets every {rng.choice(['Monday', 'Friday', 'Sunday'])} at "
            f"{rng.randint(1, 12)} pm. New members welcome, bring a {rng.choice(WORDS)}.")


def _code(rng: random.Random) -> str:
    """A small Python function (the ``demo_code`` domain)."""
    name, arg = rng.choice(WORDS), rng.choice(["x", "items", "n", "value"])
    body = rng.choice([
        f"    return {arg} * {rng.randint(2, 9)}",
        f"    total = 0\n    for i in range({arg}):\n        total += i\n    return total",
        f"    if {arg} > {rng.randint(0, 50)}:\n        return True\n    return False",
        f"    return [v + {rng.randint(1, 5)} for v in {arg}]",
    ])
    return f"def {name}_{rng.randint(1, 99)}({arg}):\n{body}\n"


def _arith(rng: random.Random) -> str:
    """Lines of arithmetic with their results (the ``demo_arith`` domain)."""
    lines = []
    for _ in range(rng.randint(4, 8)):
        a, b = rng.randint(1, 99), rng.randint(1, 99)
        op = rng.choice("+-*")
        value = a + b if op == "+" else a - b if op == "-" else a * b
        lines.append(f"{a} {op} {b} = {value}")
    return "\n".join(lines)


TEXT_DOMAINS = {"wiki_demo.json": _prose, "c4_demo.json": _web, "demo_code.json": _code, "demo_arith.json": _arith}
TEXT_ROWS = 160


def generate_text_data(seed: int = 4321) -> dict[str, list[dict]]:
    """Four small text domains that differ clearly, ``{"text": ...}`` rows (deterministic)."""
    rng = random.Random(seed)
    return {name: [{"text": make(rng)} for _ in range(TEXT_ROWS)] for name, make in TEXT_DOMAINS.items()}


def generate_demo_data(seed: int = 1234) -> dict[str, list[dict]]:
    """Return ``{file_name: records}`` for every demo dataset (deterministic for a seed)."""
    rng = random.Random(seed)
    mix: list[dict] = []
    seen_add: set[str] = set()
    for task, count in MIX_COUNTS.items():
        for _ in range(count):
            if task == "noisy":
                mix.append(_noisy(rng))
                continue
            inp, out = MAKERS[task](rng)
            if task == EVAL_TASK:
                seen_add.add(inp)
            mix.append(_alpaca(task, inp, out))
    rng.shuffle(mix)

    evals: list[dict] = []
    while len(evals) < EVAL_SIZE:  # held-out questions of the target task only
        inp, out = MAKERS[EVAL_TASK](rng)
        if inp not in seen_add:
            seen_add.add(inp)
            evals.append(_alpaca(EVAL_TASK, inp, out))

    chat: list[dict] = []
    for _ in range(CHAT_SIZE):
        turns = []
        for task in rng.sample(sorted(MAKERS), 2):
            inp, out = MAKERS[task](rng)
            turns.append({"from": "human", "value": f"{TASK_INSTRUCTIONS[task]}\n{inp}"})
            turns.append({"from": "gpt", "value": out})
        chat.append({"conversations": turns, "task": "chat"})

    return {
        "demo_mix_train.json": mix,
        "demo_add_eval.json": evals,
        "demo_chat_sharegpt.json": chat,
        **generate_text_data(),
    }


DATASET_INFO = {
    "demo_mix": {"file_name": "demo_mix_train.json"},
    "demo_add_eval": {"file_name": "demo_add_eval.json"},
    "demo_chat": {
        "file_name": "demo_chat_sharegpt.json",
        "formatting": "sharegpt",
        "columns": {"messages": "conversations"},
    },
    # text domains for stage: pt (wiki_demo / c4_demo are the names of LLaMA-Factory's text demo
    # sets, which the original DataFlex's mixer examples use; these are DataFlex's own texts)
    "wiki_demo": {"file_name": "wiki_demo.json", "columns": {"prompt": "text"}},
    "c4_demo": {"file_name": "c4_demo.json", "columns": {"prompt": "text"}},
    "demo_code": {"file_name": "demo_code.json", "columns": {"prompt": "text"}},
    "demo_arith": {"file_name": "demo_arith.json", "columns": {"prompt": "text"}},
    # LLaMA-Factory's demo sets under the names its users know. The files are not shipped here:
    # copy them from LLaMA-Factory's data/ folder, or use `alpaca_en` / `alpaca_zh` (hub access).
    "alpaca_en_demo": {"file_name": "alpaca_en_demo.json"},
    "alpaca_zh_demo": {"file_name": "alpaca_zh_demo.json"},
    "alpaca_en": {"hf_hub_url": "llamafactory/alpaca_en", "ms_hub_url": "llamafactory/alpaca_en"},
    "alpaca_zh": {"hf_hub_url": "llamafactory/alpaca_zh", "ms_hub_url": "llamafactory/alpaca_zh"},
}


def _dump(obj, path: Path) -> None:
    path.write_text(json.dumps(obj, ensure_ascii=False, indent=1) + "\n", encoding="utf-8")


def write_demo_data(out_dir: str | os.PathLike, seed: int = 1234) -> Path:
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    for name, records in generate_demo_data(seed).items():
        _dump(records, out / name)
    _dump(DATASET_INFO, out / "dataset_info.json")
    return out


def _corpus(data_dir: Path) -> list[str]:
    texts = ["Human: ", "\nAssistant:", "System: "]
    for name in ("demo_mix_train.json", "demo_add_eval.json"):
        for r in json.loads((data_dir / name).read_text(encoding="utf-8")):
            texts.append(f"{r['instruction']}\n{r['input']}\n{r['output']}")
    return texts


def build_tiny_model(out_dir: str | os.PathLike, data_dir: str | os.PathLike | None = None,
                     vocab_size: int = 512, hidden_size: int = 64, num_layers: int = 2, seed: int = 0) -> Path:
    """Train a byte-level BPE tokenizer on the demo data and save a randomly initialised tiny Qwen2.

    Takes a few seconds on a CPU and needs no network. The result loads with
    ``AutoModelForCausalLM.from_pretrained`` / ``AutoTokenizer.from_pretrained`` and works with
    LLaMA-Factory's ``default`` template.
    """
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast, Qwen2Config, Qwen2ForCausalLM

    out = Path(out_dir)
    data = Path(data_dir) if data_dir else _default_data_dir()
    texts = _corpus(data) if (data / "demo_mix_train.json").exists() else [
        f"{r['instruction']}\n{r['input']}\n{r['output']}" for r in generate_demo_data()["demo_mix_train.json"]
    ]

    eos = "<|endoftext|>"
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[eos],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    hf_tok = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=eos, pad_token=eos)
    out.mkdir(parents=True, exist_ok=True)
    hf_tok.save_pretrained(out)

    torch.manual_seed(seed)
    config = Qwen2Config(
        vocab_size=len(hf_tok),
        hidden_size=hidden_size,
        intermediate_size=hidden_size * 2,
        num_hidden_layers=num_layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=1024,
        tie_word_embeddings=True,
        eos_token_id=hf_tok.eos_token_id,
        pad_token_id=hf_tok.pad_token_id,
        bos_token_id=hf_tok.eos_token_id,
    )
    model = Qwen2ForCausalLM(config).to(torch.float32)
    model.save_pretrained(out)
    return out


def build_tiny_moe(out_dir: str | os.PathLike, data_dir: str | os.PathLike | None = None, num_experts: int = 4,
                   hidden_size: int = 64, num_layers: int = 2, seed: int = 0) -> Path:
    """A tiny Qwen2-MoE (``num_experts`` experts, 2 per token) with the demo tokenizer: reports router logits."""
    import torch
    from transformers import AutoTokenizer, Qwen2MoeConfig, Qwen2MoeForCausalLM

    out = Path(out_dir)
    dense = out / "_tokenizer"
    build_tiny_model(dense, data_dir, hidden_size=hidden_size, num_layers=1, seed=seed)
    tok = AutoTokenizer.from_pretrained(dense)
    out.mkdir(parents=True, exist_ok=True)
    tok.save_pretrained(out)
    torch.manual_seed(seed)
    config = Qwen2MoeConfig(
        vocab_size=len(tok), hidden_size=hidden_size, intermediate_size=hidden_size * 2,
        moe_intermediate_size=hidden_size, shared_expert_intermediate_size=hidden_size, num_hidden_layers=num_layers,
        num_attention_heads=4, num_key_value_heads=2, num_experts=num_experts, num_experts_per_tok=2,
        decoder_sparse_step=1, max_position_embeddings=1024, tie_word_embeddings=True,
        eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id, bos_token_id=tok.eos_token_id,
    )
    Qwen2MoeForCausalLM(config).to(torch.float32).save_pretrained(out)
    import shutil

    shutil.rmtree(dense, ignore_errors=True)
    return out


def _default_data_dir() -> Path:
    return Path.cwd() / "data"


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] not in ("data", "model", "moe"):
        print("usage: python -m dataflex.demo data [OUT_DIR] | model OUT_DIR [DATA_DIR] | moe OUT_DIR [DATA_DIR]",
              file=sys.stderr)
        return 2
    if argv[0] == "data":
        out = write_demo_data(argv[1] if len(argv) > 1 else "data")
        print(f"demo data written to {out}")
    else:
        if len(argv) < 2:
            print("usage: python -m dataflex.demo model OUT_DIR [DATA_DIR]", file=sys.stderr)
            return 2
        build = build_tiny_moe if argv[0] == "moe" else build_tiny_model
        out = build(argv[1], argv[2] if len(argv) > 2 else None)
        print(f"tiny {'mixture-of-experts ' if argv[0] == 'moe' else ''}model written to {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
