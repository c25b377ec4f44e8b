"""Offline demo assets: synthetic instruction data and a tiny causal LM.

Everything here is deterministic and needs no network, so the quick start, the tests and the
benchmarks run on a laptop CPU. Two entry points:

    python -m dataflex.demo data  [OUT_DIR]    # regenerate data/*.json (already committed)
    python -m dataflex.demo model OUT_DIR      # build a ~100k-parameter Qwen2 model + BPE tokenizer

The data are several small tasks with checkable answers. Every record carries a ``task`` field
(ignored by LLaMA-Factory, which keeps only mapped columns) so benchmarks can tell which tasks a
selector picked; the row order of each file is the dataset index LLaMA-Factory assigns.
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
    }


DATASET_INFO = {
    "demo_mix": {"file_name": "demo_mix_train.json"},
    "demo_add_eval": {"file_name": "demo_add_eval.json"},
    "demo_chat": {
        "file_name": "demo_chat_sharegpt.json",
        "formatting": "sharegpt",
        "columns": {"messages": "conversations"},
    },
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


def _default_data_dir() -> Path:
    return Path.cwd() / "data"


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] not in ("data", "model"):
        print("usage: python -m dataflex.demo data [OUT_DIR] | model OUT_DIR [DATA_DIR]", file=sys.stderr)
        return 2
    if argv[0] == "data":
        out = write_demo_data(argv[1] if len(argv) > 1 else "data")
        print(f"demo data written to {out}")
    else:
        if len(argv) < 2:
            print("usage: python -m dataflex.demo model OUT_DIR [DATA_DIR]", file=sys.stderr)
            return 2
        out = build_tiny_model(argv[1], argv[2] if len(argv) > 2 else None)
        print(f"tiny model written to {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
