"""Rewards of (prompt, response) pairs for NICE, from four kinds of backend.

* ``hf`` - a sequence-classification model (``reward_model_path``): the score is its single logit,
  or the probability of its last class when it has several.
* ``callable`` - ``reward_function: module:function`` or ``path/to/file.py:function``, called as
  ``function(prompt, response) -> float``.
* ``api`` - an OpenAI-compatible chat-completions endpoint (``reward_backend_params.api``:
  ``api_url``, ``api_key``, ``model_name``, ``temperature``, ``timeout``, ``max_retries``) asked for a
  score between 0 and 1; the first number in the answer is the reward. ``api_key`` names the
  environment variable that holds the key (the original's value is ``DF_API_KEY``): the key is read
  from the environment when a request is made and never written anywhere - not in logs, records,
  the run manifest or errors.
* ``local_vllm`` - a local vLLM model asked the same question; needs vllm installed.
"""

from __future__ import annotations

import json
import logging
import math
import os
import re
import time
import urllib.error
import urllib.request
from typing import Any, Callable, Sequence

import torch

logger = logging.getLogger("dataflex")

SYSTEM_PROMPT = ("You are a reward model. Rate how good the response is as an answer to the prompt. "
                 "Reply with one number between 0 and 1 and nothing else.")
ENV_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
NUMBER = re.compile(r"[-+]?\d*\.?\d+(?:[eE][-+]?\d+)?")


def judge_message(prompt: str, response: str) -> str:
    return f"Prompt:\n{prompt}\n\nResponse:\n{response}\n\nScore (0 to 1):"


def parse_score(text: str) -> float:
    """The first number in ``text``, clamped to [0, 1]; 0 when there is none."""
    match = NUMBER.search(text or "")
    if match is None:
        return 0.0
    value = float(match.group())
    return min(max(value, 0.0), 1.0) if math.isfinite(value) else 0.0


def load_function(spec: str) -> Callable[[str, str], float]:
    """``module:function`` or ``path/to/file.py:function``."""
    where, _, name = spec.rpartition(":")
    if not where or not name:
        raise ValueError(f"'{spec}' is not module:function or file.py:function")
    import importlib
    import importlib.util

    if where.endswith(".py") or "/" in where:
        loader = importlib.util.spec_from_file_location(f"dataflex_reward_{abs(hash(where))}", where)
        if loader is None or not os.path.isfile(where):
            raise ValueError(f"file '{where}' not found")
        module = importlib.util.module_from_spec(loader)
        loader.loader.exec_module(module)
    else:
        module = importlib.import_module(where)
    fn = getattr(module, name, None)
    if not callable(fn):
        raise ValueError(f"'{where}' has no function '{name}'")
    return fn


class Reward:
    """``score(prompts, responses) -> [float]`` for one backend."""

    def __init__(self, backend: str, model_path: str | None = None, function: str | None = None,
                 params: dict[str, Any] | None = None, device: Any = "cpu"):
        self.backend = backend
        self.params = dict(params or {})
        self.device = device
        if backend == "hf":
            from transformers import AutoModelForSequenceClassification, AutoTokenizer

            self.tokenizer = AutoTokenizer.from_pretrained(model_path)
            if self.tokenizer.pad_token is None:
                self.tokenizer.pad_token = self.tokenizer.eos_token
            self.model = AutoModelForSequenceClassification.from_pretrained(model_path).to(device).eval()
            # the score is read at the last token that is not padding: the model must know the id the tokenizer
            # pads with (a reward model shipped with another pad id, or none, would read a padding position)
            self.model.config.pad_token_id = self.tokenizer.pad_token_id
        elif backend == "callable":
            self.fn = load_function(function)
        elif backend == "local_vllm":
            from vllm import LLM, SamplingParams  # noqa: F401 - checked at start

            self.llm = LLM(model=self.params["hf_model_name_or_path"],
                           tensor_parallel_size=int(self.params.get("vllm_tensor_parallel_size", 1)),
                           gpu_memory_utilization=float(self.params.get("vllm_gpu_memory_utilization", 0.9)),
                           max_model_len=self.params.get("vllm_max_model_len"))
        elif backend != "api":
            raise ValueError(f"unknown reward backend '{backend}'")

    def score(self, prompts: Sequence[str], responses: Sequence[str]) -> list[float]:
        if self.backend == "hf":
            return self._hf(prompts, responses)
        if self.backend == "callable":
            return [float(self.fn(p, r)) for p, r in zip(prompts, responses)]
        if self.backend == "api":
            return [self._api(p, r) for p, r in zip(prompts, responses)]
        return self._vllm(prompts, responses)

    @torch.no_grad()
    def _hf(self, prompts, responses) -> list[float]:
        batch = self.tokenizer([p + r for p, r in zip(prompts, responses)], padding=True, truncation=True,
                               max_length=int(self.params.get("max_length", 1024)), return_tensors="pt").to(self.device)
        logits = self.model(**batch).logits.float()
        if logits.shape[-1] == 1:
            return logits[:, 0].cpu().tolist()
        return torch.softmax(logits, dim=-1)[:, -1].cpu().tolist()

    def _api(self, prompt: str, response: str) -> float:
        p = self.params
        key_name = p.get("api_key") or "DF_API_KEY"
        key = os.environ.get(key_name)
        if not key:
            raise ValueError(f"reward api: the environment variable {key_name} (named by api_key) is not set")
        body = json.dumps({
            "model": p.get("model_name", "gpt-4o"),
            "temperature": float(p.get("temperature", 0.0)),
            "messages": [{"role": "system", "content": SYSTEM_PROMPT},
                         {"role": "user", "content": judge_message(prompt, response)}],
        }).encode("utf-8")
        request = urllib.request.Request(p["api_url"], data=body, method="POST", headers={
            "Content-Type": "application/json", "Authorization": f"Bearer {key}"})
        retries = int(p.get("max_retries", 3))
        for attempt in range(retries + 1):
            try:
                with urllib.request.urlopen(request, timeout=float(p.get("timeout", 60))) as reply:
                    data = json.loads(reply.read().decode("utf-8"))
                return parse_score(data["choices"][0]["message"]["content"])
            except (urllib.error.URLError, TimeoutError, KeyError, IndexError, ValueError) as err:
                if attempt == retries:
                    # the request carries the key: say what failed without any of it
                    raise ValueError(f"reward api: {p['api_url']} failed after {retries + 1} attempt(s): "
                                     f"{type(err).__name__}") from None
                time.sleep(min(2 ** attempt * 0.5, 8))
        return 0.0  # pragma: no cover

    def _vllm(self, prompts, responses) -> list[float]:
        from vllm import SamplingParams

        p = self.params
        sampling = SamplingParams(temperature=float(p.get("vllm_temperature", 0.0)), top_p=float(p.get("vllm_top_p", 1.0)),
                                  max_tokens=int(p.get("vllm_max_tokens", 16)), seed=p.get("vllm_seed"))
        texts = [f"{SYSTEM_PROMPT}\n\n{judge_message(q, r)}" for q, r in zip(prompts, responses)]
        return [parse_score(out.outputs[0].text) for out in self.llm.generate(texts, sampling)]
