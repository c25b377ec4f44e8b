"""Every mode on a real pretrained model: SmolLM2-135M-Instruct (Llama architecture, grouped-query
attention, tied input/output embeddings, a 49k vocabulary, a chat template with a system prompt).

One LESS run is in the default suite (it also merges the adapter and checks the merged model); the
other modes, and LESS on two processes, are in the slow set (``-m slow``), each a few steps on CPU.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import yaml

from conftest import DATA_DIR, failure_report, llamafactory_cli, records, run_command, write_yaml

pytestmark = pytest.mark.e2e


def smollm2_config(model: Path, out: Path, **overrides) -> dict:
    """A few CPU steps of LoRA SFT on the demo data with the model's own template."""
    cfg = {
        "model_name_or_path": str(model), "stage": "sft", "do_train": True, "finetuning_type": "lora",
        "lora_target": "all", "lora_rank": 8, "lora_alpha": 16, "dataset": "demo_mix", "eval_dataset": "demo_add_eval",
        "dataset_dir": str(DATA_DIR), "template": "smollm2", "cutoff_len": 64, "max_samples": 16,
        "overwrite_cache": True, "preprocessing_num_workers": 1, "dataloader_num_workers": 0, "seed": 42,
        "output_dir": str(out), "logging_steps": 1, "save_steps": 1000, "plot_loss": False,
        "overwrite_output_dir": True, "report_to": "none", "per_device_train_batch_size": 2,
        "gradient_accumulation_steps": 2, "learning_rate": 2e-4, "num_train_epochs": 1.0, "bf16": False,
        "train_type": "dynamic_select", "component_name": "less", "warmup_step": 1, "update_step": 2,
        "update_times": 1,
    }
    for key, value in overrides.items():
        if value is None:
            cfg.pop(key, None)
        else:
            cfg[key] = value
    return cfg


def _train(run_cli, folder: Path, cfg: dict, env=None, timeout: float = 600) -> Path:
    path = write_yaml(folder / "train.yaml", cfg)
    res = run_cli(["train", path], env=env, timeout=timeout)
    assert res.returncode == 0, failure_report(res)
    out = Path(cfg["output_dir"])
    assert (out / "adapter_model.safetensors").exists()
    return out


def _finite_losses(out: Path) -> list[float]:
    lines = [json.loads(x) for x in (out / "trainer_log.jsonl").read_text().splitlines()]
    losses = [x["loss"] for x in lines if "loss" in x]
    assert losses and all(math.isfinite(v) for v in losses), losses
    return losses


def test_the_chat_template_masks_the_system_prompt_and_the_question(smollm2, tmp_path):
    """LLaMA-Factory's smollm2 template adds a default system prompt: only the answer and its
    <|im_end|> are supervised, which is what every scoring pass reads."""
    from conftest import load_lf_pipeline

    pipe = load_lf_pipeline(smollm2, tmp_path / "out", template="smollm2", dataset="demo_mix", eval_dataset=None,
                            max_samples=4, cutoff_len=128, lora_rank=4)
    tok, rows = pipe["tokenizer"], json.loads((DATA_DIR / "demo_mix_train.json").read_text())[:4]
    for i, row in enumerate(rows):
        ex = pipe["train_dataset"][i]
        text = tok.decode(ex["input_ids"])
        assert text.startswith("<|im_start|>system\nYou are a helpful AI assistant named SmolLM")
        supervised = [t for t, lab in zip(ex["input_ids"], ex["labels"]) if lab != -100]
        assert supervised == ex["labels"][len(ex["labels"]) - len(supervised):]  # one block at the end
        assert tok.decode(supervised) == row["output"] + "<|im_end|>\n"


def test_less_trains_smollm2_and_the_merged_model_equals_base_plus_adapter(smollm2, run_cli, tmp_path):
    """LESS (per-sample gradients through tied embeddings and grouped-query attention) selects on the
    real model, LLaMA-Factory's export merges the adapter, and the merged model computes what the base
    model with the adapter computes."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out = _train(run_cli, tmp_path, smollm2_config(smollm2, tmp_path / "out"))
    _finite_losses(out)
    recs = records(out)
    assert sorted(k for k in recs if isinstance(k, int)) == [1]  # one selection, after the warm-up step
    sel = recs[1]
    assert len(sel["indices"]) == 2 * 2 * 2  # G x update_step
    assert all(0 <= i < 16 for i in sel["indices"])
    assert all(math.isfinite(s) for s in sel["per_sample"]["score"])

    merged = tmp_path / "merged"
    merge = write_yaml(tmp_path / "merge.yaml", {
        "model_name_or_path": str(smollm2), "adapter_name_or_path": str(out), "template": "smollm2",
        "export_dir": str(merged), "export_size": 1, "export_device": "cpu", "export_legacy_format": False})
    res = run_command([*llamafactory_cli(), "export", merge], timeout=300)
    assert res.returncode == 0, failure_report(res)

    tok = AutoTokenizer.from_pretrained(merged)
    assert tok.eos_token == "<|im_end|>"
    ids = tok("<|im_start|>user\nAdd the two numbers.\n59 + 61<|im_end|>\n<|im_start|>assistant\n",
              return_tensors="pt")["input_ids"]
    with torch.no_grad():
        got = AutoModelForCausalLM.from_pretrained(merged)(ids).logits
        ref_model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(smollm2), out).eval()
        ref = ref_model(ids).logits
        base = ref_model.get_base_model()
        with ref_model.disable_adapter():
            plain = base(ids).logits
    assert torch.allclose(got, ref, atol=2e-3, rtol=0), (got - ref).abs().max()
    assert (ref - plain).abs().max() > 1e-3  # the adapter changed something


# --------------------------------------------------------------------------- the other modes (slow set)
def _components(folder: Path, section: str, name: str, params: dict) -> str:
    path = folder / "components.yaml"
    path.write_text(yaml.safe_dump({section: {name: {"name": name, "params": params}}}))
    return str(path)


RUNS = {
    "near": lambda f: dict(component_name="near", components_cfg_file=_components(
        f, "selectors", "near", {"neighbours": 4, "scoring_batch_size": 8})),
    "zeroth": lambda f: dict(component_name="zeroth", components_cfg_file=_components(
        f, "selectors", "zeroth", {"seed": 42, "direction": "eval_gradient"})),
    "odm": lambda f: dict(stage="pt", dataset="c4_demo,wiki_demo", eval_dataset="c4_demo",
                          train_type="dynamic_mix", component_name="odm", mixture_sample_rule="mixture",
                          init_mixture_proportions=[0.5, 0.5], update_step=1, update_times=2, max_steps=3),
    "loss_weighter": lambda f: dict(train_type="dynamic_weight", component_name="loss", eval_dataset=None,
                                    update_step=None, update_times=None, max_steps=3),
    "adapt_weighter": lambda f: dict(train_type="dynamic_weight", component_name="adapt", max_steps=3,
                                     update_step=None, update_times=None),
}


@pytest.mark.slow
@pytest.mark.parametrize("run", sorted(RUNS))
def test_every_mode_trains_on_smollm2(run, smollm2, run_cli, tmp_path):
    cfg = smollm2_config(smollm2, tmp_path / "out", **RUNS[run](tmp_path))
    out = _train(run_cli, tmp_path, cfg)
    _finite_losses(out)
    result = json.loads((out / "train_results.json").read_text())
    assert result.get("dataflex_seconds", 0) > 0, result


@pytest.mark.slow
def test_less_on_two_processes_selects_what_one_process_selects(smollm2, run_cli, tmp_path):
    one = _train(run_cli, tmp_path / "one", smollm2_config(smollm2, tmp_path / "one" / "out"))
    two = _train(run_cli, tmp_path / "two", smollm2_config(smollm2, tmp_path / "two" / "out",
                                                           per_device_train_batch_size=1),
                 env={"FORCE_TORCHRUN": "1", "NPROC_PER_NODE": "2"})
    a, b = records(one)[1], records(two)[1]
    assert a["indices"] == b["indices"]
    assert b["per_sample"]["score"] == pytest.approx(a["per_sample"]["score"], rel=1e-3, abs=1e-4)


@pytest.mark.slow
def test_zeroth_on_smollm2_is_the_exact_inner_product_and_normalize_ranks_by_the_cosine(smollm2, tmp_path):
    """On the real model: zeroth (direction: eval_gradient) estimates ∇f(z)·ḡ_eval as autograd computes
    it, and ``normalize: true`` turns it into the cosine that LESS ranks by (bench/real.py --levels zeroth
    found the raw inner product ranking rows by their gradient norm)."""
    import torch

    from dataflex.diagnostics import load_pipeline
    from dataflex.scoring.engine import ScoringEngine
    from dataflex.selectors import zeroth as zeroth_mod
    from dataflex.selectors.base import SelectionContext

    cfg = smollm2_config(smollm2, tmp_path / "out", max_samples=16, cutoff_len=64)
    pipe = load_pipeline(cfg)
    model, train, evals, collator = pipe["model"], pipe["train_dataset"], pipe["eval_dataset"], pipe["collator"]
    params = [p for p in model.parameters() if p.requires_grad]
    torch.manual_seed(0)
    opt = torch.optim.AdamW(params, lr=2e-4)  # one real step: LoRA's B is no longer zero
    model.train()
    model(**collator([train[i] for i in range(8)])).loss.backward()
    opt.step()
    opt.zero_grad(set_to_none=True)
    model.eval()

    def grad_of(row) -> list[torch.Tensor]:
        return [g.double() for g in torch.autograd.grad(model(**collator([row])).loss, params)]

    eval_grads = [grad_of(evals[j]) for j in range(len(evals))]
    g_eval = [sum(gs) / len(eval_grads) for gs in zip(*eval_grads)]  # ∇ of the mean per-row eval loss
    g_norm = math.sqrt(sum(float(t.pow(2).sum()) for t in g_eval))
    dots, cosines = [], []
    for i in range(len(train)):
        g = grad_of(train[i])
        dot = sum(float((a * b).sum()) for a, b in zip(g, g_eval))
        dots.append(dot)
        cosines.append(dot / (math.sqrt(sum(float(a.pow(2).sum()) for a in g)) * g_norm))

    engine = ScoringEngine(model, collator, "cpu", show_progress=False)

    def scores(**params) -> list[float]:
        sel = zeroth_mod.ZerothSelector(zeroth_mod.ZerothParams.from_dict(
            "zeroth", {"direction": "eval_gradient", "seed": 7, **params}))
        res = sel.select(SelectionContext(step=1, selection=1, num_selections=2, num_samples=len(train),
                                          train_dataset=train, scorer=engine, generator=torch.Generator(),
                                          eval_dataset=evals, cache_dir=str(tmp_path)))
        got = dict(zip(res.indices, res.per_sample["score"]))
        return [got[i] for i in range(len(train))]

    def spearman(a, b):
        ra = torch.tensor(a).argsort().argsort().double()
        rb = torch.tensor(b).argsort().argsort().double()
        return float(torch.corrcoef(torch.stack([ra, rb]))[0, 1])

    raw = scores()
    scale = max(abs(d) for d in dots)
    assert max(abs(r - d) for r, d in zip(raw, dots)) < 0.02 * scale, (raw, dots)  # fp32 finite difference
    assert spearman(raw, dots) > 0.99
    # normalize divides by |∇f(z)| estimated from 8 random directions (relative error ~ 1/sqrt(16)): the
    # scores are the cosines up to that error, ranked like them (on 48 rows the raw product ranked 0.82)
    normalised = scores(normalize=True, norm_directions=8)
    rel = sorted(abs(n - c) / abs(c) for n, c in zip(normalised, cosines))
    assert rel[len(rel) // 2] < 0.3, (normalised, cosines)
    assert spearman(normalised, cosines) > 0.9, (normalised, cosines)
