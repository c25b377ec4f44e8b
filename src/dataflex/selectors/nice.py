"""``nice``: LESS whose validation side is a policy gradient of a reward, not a loss gradient.

NICE (Wang et al., "NICE: Non-differentiable evaluation metric-based data selection for
instruction tuning", ICML 2025). The training side is exactly :mod:`~dataflex.selectors.less`'s
(Adam-preconditioned projected per-sample LoRA gradients, the cumulative score over selections).
The validation side asks what would raise a reward that cannot be differentiated (a judge, a
metric): for every eval prompt x, ``mc_samples`` responses y_1..y_m are sampled from the current
model (``generation_temperature``, ``max_new_tokens``), each is rewarded r_i, and the prompt's
eval feature is the projection of

    g(x) = Σ_i r_i ∇ NLL(y_i | x)          (NLL summed over y_i's tokens: ∇ of −r_i log π(y_i | x))

the gradient whose descent raises the expected reward (REINFORCE without a baseline, as the
paper's code). Each prompt's feature is normalised to unit length and the target is their mean,
so a training sample scores high when its update moves the model towards rewarded answers.

The prompts are the eval rows' own prompt tokens (everything before the first supervised
token, the chat template included) - the original passed already-tokenized rows to a text
template, so every prompt was the same empty template. Generation runs on every rank for its
share of the prompts (in step under DeepSpeed ZeRO-3), the rewards on the rank that generated.
Rewards come from :mod:`dataflex.scoring.rewards`: an HF sequence-classification model, a Python
function, an OpenAI-compatible API (``api_key`` names an environment variable; the key is never
written anywhere), or local vLLM.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Literal

import torch

from ..component import register
from ..errors import ConfigError
from ..scoring.engine import eval_mode
from ..scoring.gradients import GradientFeaturizer, sharded_features
from ..scoring.rewards import ENV_NAME, Reward, load_function
from ..seeding import derive_seed
from .base import SelectionContext, logger
from .less import LessParams, LessSelector, eval_targets


@dataclass
class NiceParams(LessParams):
    mc_samples: int = field(default=4, metadata={"help": "Responses sampled per eval prompt (>= 1)."})
    max_new_tokens: int = field(default=512, metadata={"help": "Tokens generated per response at most (>= 1)."})
    generation_temperature: float = field(default=0.7, metadata={"help": "Sampling temperature (> 0)."})
    max_prompt_length: int = field(default=4096, metadata={"help": "Prompt tokens kept (the last ones) (>= 1)."})
    eval_prompts: int | None = field(default=None, metadata={"help": "Use only the first N eval prompts (null: all)."})
    reward_model_backend: Literal["hf", "callable", "api", "local_vllm"] = field(
        default="hf", metadata={"help": "hf | callable | api | local_vllm (see docs/selectors/nice.md)."})
    reward_model_path: str | None = field(
        default=None, metadata={"help": "hf: a sequence-classification reward model (folder or hub id)."})
    reward_function: str | None = field(
        default=None, metadata={"help": "callable: module:function or path/to/file.py:function (prompt, response) -> float."})
    reward_backend_params: dict[str, Any] = field(
        default_factory=dict, metadata={"help": "Per backend: api {api_url, api_key (env var name), model_name, "
                                                "temperature, timeout, max_retries}; local_vllm {hf_model_name_or_path, ...}."})

    def check(self) -> None:
        super().check()
        for key in ("mc_samples", "max_new_tokens", "max_prompt_length"):
            if getattr(self, key) < 1:
                self.fail(key, "an integer >= 1")
        if not (math.isfinite(self.generation_temperature) and self.generation_temperature > 0):
            self.fail("generation_temperature", "a number > 0")
        if self.eval_prompts is not None and self.eval_prompts < 1:
            self.fail("eval_prompts", "an integer >= 1, or null")
        backend, comp = self.reward_model_backend, self._component()
        if backend == "hf" and not self.reward_model_path:
            self.fail("reward_model_path", "a sequence-classification model (required with reward_model_backend: hf)")
        if backend == "callable":
            if not self.reward_function:
                self.fail("reward_function", "module:function or file.py:function (required with reward_model_backend: "
                                             "callable)")
            try:
                load_function(self.reward_function)
            except Exception as err:  # noqa: BLE001 - the user's code
                raise ConfigError(f"component '{comp}': param 'reward_function' = '{self.reward_function}' cannot be "
                                  f"loaded: {type(err).__name__}: {err}") from None
        if backend == "api":
            api = self.backend_params()
            if not api.get("api_url"):
                raise ConfigError(f"component '{comp}': param 'reward_backend_params.api.api_url' is required with "
                                  "reward_model_backend: api")
            name = api.get("api_key") or "DF_API_KEY"
            if not ENV_NAME.match(str(name)) or str(name).lower().startswith("sk-"):
                # never echo the value: it may be the key itself
                raise ConfigError(f"component '{comp}': param 'reward_backend_params.api.api_key' must name the "
                                  "environment variable that holds the key (e.g. DF_API_KEY), not the key itself")
        if backend == "local_vllm":
            try:
                import vllm  # noqa: F401
            except ImportError:
                raise ConfigError(f"component '{comp}': param 'reward_model_backend' = 'local_vllm' needs vllm, which is "
                                  "not installed (pip install vllm); allowed here: hf, callable, api") from None
            if not self.backend_params().get("hf_model_name_or_path"):
                raise ConfigError(f"component '{comp}': param 'reward_backend_params.local_vllm.hf_model_name_or_path' "
                                  "is required with reward_model_backend: local_vllm")

    def backend_params(self) -> dict[str, Any]:
        """The block of ``reward_backend_params`` for the chosen backend (or the whole dict when flat)."""
        params = self.reward_backend_params or {}
        block = params.get(self.reward_model_backend)
        return dict(block) if isinstance(block, dict) else {k: v for k, v in params.items() if not isinstance(v, dict)}


def prompt_of(row: dict[str, Any], max_length: int) -> list[int]:
    """The prompt tokens of a tokenized eval row: everything before its first supervised token."""
    ids, labels = list(row["input_ids"]), list(row.get("labels") or [])
    first = next((i for i, label in enumerate(labels) if label != -100), len(ids))
    return ids[:first][-max_length:]


@register
class NiceSelector(LessSelector):
    name = "nice"
    Params = NiceParams
    summary = "NICE: LESS with a policy-gradient (reward) validation side"

    def __init__(self, params: NiceParams):
        super().__init__(params)
        self.reward: Reward | None = None
        self.last_rewards: list[float] = []

    def eval_target(self, ctx: SelectionContext, plain: GradientFeaturizer) -> tuple[torch.Tensor, int]:
        p = self.params
        engine, tok = ctx.scorer, ctx.tokenizer
        if tok is None:
            raise ValueError("selector 'nice' needs the training tokenizer")
        rows = range(len(ctx.eval_dataset) if p.eval_prompts is None else min(p.eval_prompts, len(ctx.eval_dataset)))
        prompts = [prompt_of(ctx.eval_dataset[i], p.max_prompt_length) for i in rows]
        if self.reward is None:
            self.reward = Reward(p.reward_model_backend, p.reward_model_path, p.reward_function, p.backend_params(),
                                 engine.device)
        world, rank = ctx.world_size, ctx.rank
        mine = list(range(rank, len(prompts), world))
        per_rank = -(-len(prompts) // world)
        generated: list[tuple[int, list[int], list[int], float]] = []  # (prompt, prompt ids, response ids, reward)
        with ctx.agreement.section("nice: sampling and rewarding responses"):
            for k in range(per_rank):  # equal counts on every rank: generation runs forwards (ZeRO-3)
                j = mine[k] if k < len(mine) else mine[0] if mine else 0
                responses = self._sample(engine, prompts[j], ctx.selection, j)
                if k >= len(mine):
                    continue
                texts_p = [tok.decode(prompts[j], skip_special_tokens=True)] * len(responses)
                texts_r = [tok.decode(r, skip_special_tokens=True) for r in responses]
                for r_ids, reward in zip(responses, self.reward.score(texts_p, texts_r)):
                    generated.append((j, prompts[j], r_ids, float(reward)))
        everything = [g for part in ctx.agreement.gather("nice: the responses", generated) for g in part]
        everything.sort(key=lambda g: g[0])
        self.last_rewards = [g[3] for g in everything]
        rows_ds = []
        for _, ids, resp, _ in everything:
            full = ids + resp
            rows_ds.append({"input_ids": full, "attention_mask": [1] * len(full),
                            "labels": [-100] * len(ids) + resp})
        # the projected gradient of each response's mean token loss, at its own length (weighted below)
        feats = sharded_features(engine, rows_ds, range(len(rows_ds)), p.scoring_batch_size, plain,
                                 desc="nice response gradients", normalise=False).double()
        # one unit vector per eval prompt (NaN: no response or a zero gradient), aggregated as LESS does
        units = torch.full((len(ctx.eval_dataset), self.projector.proj_dim), float("nan"), dtype=torch.float64)
        for j in sorted({g[0] for g in everything}):
            members = [i for i, g in enumerate(everything) if g[0] == j and len(g[2]) > 0]
            if not members:
                continue
            g = sum(everything[i][3] * len(everything[i][2]) * feats[i] for i in members)
            norm = float(g.norm())
            if norm > 0:
                units[j] = g / norm
        target, used = eval_targets(units, ctx.eval_groups, p.eval_aggregate, self.name)
        if ctx.rank == 0:
            r = torch.tensor(self.last_rewards, dtype=torch.float64)
            logger.info("[DataFlex] nice: %d prompts x %d responses, rewards mean %.4f (min %.4f, max %.4f), "
                        "backend %s", used, p.mc_samples, float(r.mean()), float(r.min()), float(r.max()),
                        p.reward_model_backend)
        return target.float(), used

    def _sample(self, engine: Any, prompt: list[int], selection: int, j: int) -> list[list[int]]:
        p = self.params
        model = engine.model
        ids = torch.tensor([prompt], device=engine.device)
        devices = [torch.cuda.current_device()] if torch.cuda.is_available() and engine.device.type == "cuda" else []
        with torch.random.fork_rng(devices=devices), eval_mode(model), torch.no_grad():
            torch.manual_seed(derive_seed(p.seed, "nice", selection, j) % (2**63))
            out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), do_sample=True,
                                 temperature=p.generation_temperature, max_new_tokens=p.max_new_tokens,
                                 num_return_sequences=p.mc_samples, synced_gpus=engine.partitioned,
                                 pad_token_id=getattr(model.config, "pad_token_id", None) or 0)
        eos = getattr(model.config, "eos_token_id", None)
        eos = set(eos if isinstance(eos, list) else [eos]) if eos is not None else set()
        responses = []
        for seq in out[:, ids.shape[1]:].tolist():
            cut = next((i + 1 for i, t in enumerate(seq) if t in eos), len(seq))
            responses.append(seq[:cut] or seq[:1])
        return responses

    def summary_extra(self) -> dict[str, Any]:
        if not self.last_rewards:
            return {}
        return {"reward_mean": sum(self.last_rewards) / len(self.last_rewards), "responses": len(self.last_rewards)}

