"""Measuring a run's checkpoints on the eval set (torch and LLaMA-Factory, loaded once per comparison).

Every metric comes back per question, as ``(numerator, denominator)`` pairs (see :mod:`.stats`):

* ``loss``: ``(summed loss of the row's supervised tokens, their number)``: the pairs' ratio is the
  mean per-token loss over the whole eval set, tokenized exactly as training tokenizes it;
* ``choice``: ``(1 if the option with the highest summed log-likelihood is the answer, 1)``, and
  ``choice_norm`` the same with the length-normalised log-likelihood. One forward of the prompt per
  question; its key/value cache is repeated for the options, scored as one batch;
* ``exact``: ``(1 if the greedy answer equals the reference, whitespace normalised, 1)``.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any, Sequence

from ..args import DATAFLEX_KEYS
from ..integration import build_pipeline, chat_template
from ..values import names

Pairs = list[tuple[float, float]]


def _normalise(text: str) -> str:
    return " ".join(text.split())


class ChoiceScorer:
    """Log-likelihood of each option of a question after its prompt, with one forward of the prompt.

    The prompt (the training template's system + user turn) runs once; its cache is repeated for the
    options, which run as one padded batch of their own tokens (each followed by the template's
    end-of-turn token, as a training answer is). Returns ``(summed log-probability, tokens)`` per option.
    """

    def __init__(self, model: Any, tokenizer: Any, template: Any, system: str | None = None):
        self.model, self.tokenizer, self.template, self.system = model, tokenizer, template, system

    def encode(self, question: str, answer: str) -> tuple[list[int], list[int]]:
        messages = [{"role": "user", "content": question}, {"role": "assistant", "content": answer}]
        return self.template.encode_oneturn(self.tokenizer, messages, self.system)

    def score(self, question: str, options: Sequence[str]) -> list[tuple[float, int]]:
        import torch

        prompt = self.encode(question, options[0])[0]
        eos = self.tokenizer.eos_token_id
        seqs = []
        for option in options:
            resp = self.encode(question, option)[1]
            seqs.append(resp[:resp.index(eos) + 1] if eos in resp else resp)
        width = max(len(s) for s in seqs)
        pad = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else 0
        with torch.no_grad():
            # only the prompt's last position predicts an answer token: no output layer over the rest
            out = self.model(input_ids=torch.tensor([prompt]), use_cache=True, logits_to_keep=1)
            first = torch.log_softmax(out.logits[0, -1].float(), dim=-1)
            cache = out.past_key_values
            cache.batch_repeat_interleave(len(seqs))
            ids = torch.tensor([s + [pad] * (width - len(s)) for s in seqs])
            mask = torch.ones(len(seqs), len(prompt) + width, dtype=torch.long)
            logp = torch.log_softmax(self.model(input_ids=ids, attention_mask=mask, past_key_values=cache,
                                                use_cache=False).logits.float(), dim=-1)
        scored = []
        for row, s in enumerate(seqs):
            total = float(first[s[0]]) + sum(float(logp[row, p - 1, s[p]]) for p in range(1, len(s)))
            scored.append((total, len(s)))
        return scored


def question_of(row: dict[str, Any], columns: dict[str, str]) -> str:
    """The user turn LLaMA-Factory builds from an alpaca row: prompt, then the query on its own line."""
    prompt = row.get(columns.get("prompt", "instruction")) or ""
    query = row.get(columns.get("query", "input")) or ""
    return "\n".join(p for p in (prompt, query) if p)


class Evaluator:
    """Loads the model, tokenizer and eval set once (from the comparison's config); measures checkpoints."""

    def __init__(self, cfg: dict[str, Any], metric: str, options_column: str = "options", batch_size: int = 8,
                 cap: int | None = None):
        """``cap``: measure at most this many rows of the eval set (its first ones)."""
        self.cfg, self.metric, self.options_column, self.batch_size = cfg, metric, options_column, batch_size
        self.cap = cap
        self._loaded: dict[str, Any] | None = None
        self._measured_checkpoint = False

    def _load(self, workdir: Path) -> dict[str, Any]:
        if self._loaded is None:
            import os

            # quiet loading: LLaMA-Factory reads its verbosity from the environment when it parses the arguments
            # (here, in this process only; the training children keep their own logs)
            before = os.environ.get("LLAMAFACTORY_VERBOSITY")
            os.environ["LLAMAFACTORY_VERBOSITY"] = "WARN"
            try:
                logging.getLogger("llamafactory").setLevel(logging.WARNING)
                cfg = {k: v for k, v in self.cfg.items() if k not in DATAFLEX_KEYS}
                cfg.update({"dataset": cfg["eval_dataset"], "output_dir": str(workdir), "do_train": True,
                            "overwrite_output_dir": True, "report_to": "none", "max_steps": 1})
                for key in ("deepspeed", "fsdp", "fsdp_config", "resume_from_checkpoint",
                            "include_num_input_tokens_seen"):
                    cfg.pop(key, None)
                import contextlib
                import io

                with contextlib.redirect_stdout(io.StringIO()):  # LLaMA-Factory prints a tokenized example
                    pipe = build_pipeline(cfg)
            finally:
                if before is None:
                    os.environ.pop("LLAMAFACTORY_VERBOSITY", None)
                else:
                    os.environ["LLAMAFACTORY_VERBOSITY"] = before
            pipe["model"].eval()
            pipe["rows"] = self._raw_rows()
            if self.cap is not None:
                pipe["rows"] = pipe["rows"][:self.cap]
                pipe["eval_dataset"] = pipe["eval_dataset"].select(range(min(self.cap, len(pipe["eval_dataset"]))))
            self._loaded = pipe
        return self._loaded

    def _raw_rows(self) -> list[tuple[dict[str, Any], dict[str, Any]]]:
        """``[(row, columns)]`` of the eval files, capped by max_samples per dataset as LLaMA-Factory caps them."""
        from .plan import dataset_rows

        out = []
        cap = self.cfg.get("max_samples")
        for _name, (entry, rows) in dataset_rows(self.cfg, "eval_dataset").items():
            rows = rows or []
            if cap:
                rows = rows[:int(cap)]
            out += [(row, entry.get("columns") or {}) for row in rows]
        return out

    def load_weights(self, checkpoint: Path) -> None:
        """Put the checkpoint's trained weights (a LoRA adapter or the full model) into the loaded model."""
        from safetensors.torch import load_file

        model = self._loaded["model"]
        adapter = checkpoint / "adapter_model.safetensors"
        if adapter.is_file():
            from peft import set_peft_model_state_dict

            set_peft_model_state_dict(model, load_file(str(adapter)))
        else:
            state: dict[str, Any] = {}
            for path in sorted(checkpoint.glob("model*.safetensors")):
                state.update(load_file(str(path)))
            if not state:
                raise FileNotFoundError(f"{checkpoint}: neither adapter_model.safetensors nor model*.safetensors")
            model.load_state_dict(state, strict=False)
        model.eval()

    def measure(self, checkpoint: Path | None, workdir: Path) -> dict[str, Pairs]:
        """The metrics of ``checkpoint``; None: of the model as loaded, before any checkpoint (call it first)."""
        pipe = self._load(workdir)
        if checkpoint is not None:
            self.load_weights(checkpoint)
        elif self._measured_checkpoint:
            raise RuntimeError("the starting model is measured before any checkpoint is loaded")
        self._measured_checkpoint = self._measured_checkpoint or checkpoint is not None
        out = {"loss": self._loss(pipe)}
        if self.metric == "choice":
            out.update(self._choice(pipe))
        elif self.metric == "exact":
            out["exact"] = self._exact(pipe)
        return out

    def _loss(self, pipe: dict[str, Any]) -> Pairs:
        import torch

        model, data, collate = pipe["model"], pipe["eval_dataset"], pipe["collator"]
        keep = ("input_ids", "attention_mask", "labels")
        pairs: Pairs = []
        with torch.no_grad():
            for start in range(0, len(data), self.batch_size):
                feats = [{k: row[k] for k in keep if k in row} for row in data.select(range(start, min(start + self.batch_size, len(data))))]
                batch = collate(feats)
                logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits.float()
                labels = batch["labels"][:, 1:]
                logits = logits[:, :-1]
                mask = labels != -100
                losses = torch.nn.functional.cross_entropy(logits.transpose(1, 2), labels.clamp(min=0),
                                                           reduction="none") * mask
                for total, count in zip(losses.sum(1).tolist(), mask.sum(1).tolist()):
                    pairs.append((float(total), float(count)))
        return pairs

    def _template(self, pipe: dict[str, Any]) -> Any:
        if "template" not in pipe:
            pipe["template"] = chat_template(pipe["tokenizer"], self.cfg.get("template"))
        return pipe["template"]

    def _choice(self, pipe: dict[str, Any]) -> dict[str, Pairs]:
        template = self._template(pipe)
        by_sum: Pairs = []
        by_mean: Pairs = []
        for row, columns in pipe["rows"]:
            system = row.get(columns["system"]) if columns.get("system") else None
            scorer = ChoiceScorer(pipe["model"], pipe["tokenizer"], template, system)
            options = [str(o) for o in row[self.options_column]]
            right = options.index(str(row.get(columns.get("response", "output"))))
            scored = scorer.score(question_of(row, columns), options)
            best_sum = max(range(len(scored)), key=lambda i: scored[i][0])
            best_mean = max(range(len(scored)), key=lambda i: scored[i][0] / max(scored[i][1], 1))
            by_sum.append((float(best_sum == right), 1.0))
            by_mean.append((float(best_mean == right), 1.0))
        return {"choice": by_sum, "choice_norm": by_mean}

    def _exact(self, pipe: dict[str, Any]) -> Pairs:
        import torch

        template, tok, model = self._template(pipe), pipe["tokenizer"], pipe["model"]
        pairs: Pairs = []
        for row, columns in pipe["rows"]:
            system = row.get(columns["system"]) if columns.get("system") else None
            reference = str(row.get(columns.get("response", "output")) or "")
            messages = [{"role": "user", "content": question_of(row, columns)}, {"role": "assistant", "content": reference}]
            prompt, answer = template.encode_oneturn(tok, messages, system)
            with torch.no_grad():
                gen = model.generate(input_ids=torch.tensor([prompt]), attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
                                     max_new_tokens=len(answer) + 8, do_sample=False,
                                     pad_token_id=tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id)
            text = tok.decode(gen[0, len(prompt):].tolist(), skip_special_tokens=True)
            pairs.append((float(_normalise(text) == _normalise(reference)), 1.0))
        return pairs


def checkpoints(out: Path) -> list[tuple[int, Path]]:
    """``[(step, folder)]`` of a run's ``checkpoint-N`` folders, by step."""
    found = []
    for path in out.glob("checkpoint-*"):
        tail = path.name.removeprefix("checkpoint-")
        if path.is_dir() and tail.isdigit():
            found.append((int(tail), path))
    return sorted(found)


BACKWARD_COST = 2  # a backward pass costs about two forwards (it multiplies by the weights and their inputs)


def work_of(tokens: float | None, decision_forward: int, decision_backward: int) -> float | None:
    """Counted work in forward-token units: each trained token goes forward and backward once
    (1 + BACKWARD_COST), plus the decisions' scoring forwards and (x BACKWARD_COST) backwards."""
    if tokens is None:
        return None
    return (1 + BACKWARD_COST) * tokens + decision_forward + BACKWARD_COST * decision_backward


def compute_of(out: Path) -> dict[int, dict[str, float]]:
    """``{step: {"seconds", "tokens", "decision_forward", "decision_backward", "work"}}`` per checkpoint of a
    finished run.

    Seconds: from the start of the training loop (its end, the last checkpoint's write time, minus the
    ``train_runtime`` transformers measured) to the checkpoint's write time, so the method's own decisions
    made on the way are included and model loading is not. Tokens: the non-padding tokens trained on
    (transformers' ``num_input_tokens_seen``, all ranks). Decision tokens: the tokens the method's scoring
    passes forwarded and back-propagated up to the checkpoint (its ``dataflex_state.json``; 0 for plain
    training). Work: :func:`work_of` of those.
    """
    results = json.loads((out / "train_results.json").read_text(encoding="utf-8"))
    points = checkpoints(out)
    if not points:
        return {}
    stamp = {step: (path / "trainer_state.json").stat().st_mtime for step, path in points}
    start = stamp[points[-1][0]] - float(results.get("train_runtime", 0.0))
    out_map = {}
    for step, path in points:
        state = json.loads((path / "trainer_state.json").read_text(encoding="utf-8"))
        tokens = state.get("num_input_tokens_seen") or next((e["num_input_tokens_seen"] for e in reversed(state.get("log_history", []))
                       if "num_input_tokens_seen" in e), None)
        work = {}
        own = path / "dataflex_state.json"
        if own.is_file():
            work = json.loads(own.read_text(encoding="utf-8")).get("work") or {}
        fwd, bwd = int(work.get("forward_tokens", 0)), int(work.get("backward_tokens", 0))
        out_map[step] = {"seconds": max(0.0, stamp[step] - start), "tokens": tokens, "decision_forward": fwd,
                         "decision_backward": bwd, "work": work_of(tokens, fwd, bwd)}
    return out_map


def eval_names(cfg: dict[str, Any]) -> list[str]:
    return names(cfg.get("eval_dataset"))


class Evaluators:
    """The measured set and the ``--eval-extra`` sets: one :class:`Evaluator` each, one dict of metrics
    (an extra set's metrics are named ``NAME:metric``)."""

    def __init__(self, sets: dict[str, dict[str, Any]], metric: str, options_column: str = "options",
                 cap: int | None = None):
        """``sets``: ``{"": cfg of the measured set, NAME: cfg of an extra set}`` (each with its eval_dataset)."""
        self.parts = {name: Evaluator(cfg, metric, options_column, cap=cap) for name, cfg in sets.items()}

    def measure(self, checkpoint: Path | None, workdir: Path) -> dict[str, Pairs]:
        out: dict[str, Pairs] = {}
        for name, part in self.parts.items():
            for key, pairs in part.measure(checkpoint, workdir / (name or "main")).items():
                out[f"{name}:{key}" if name else key] = pairs
        return out
