"""Sample embeddings: the mean-pooled hidden state of one layer of a model, L2-normalised.

``phi(x) = normalise(sum_t m_t h_t / sum_t m_t)`` over the sample's tokens (``m`` the attention
mask, prompt and response alike) at layer ``layer`` of ``hidden_states`` (``-1``: the last
layer). With the training model this is the "RDS+" representation that recent comparisons of
selection methods found strongest for its cost; ADAPT's weights use the same representation.
Batches go through the engine's sharded loop; only the embeddings travel between ranks.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Sequence

import torch

from .engine import Batch, eval_mode
from .neighbours import EmbeddingCache, cache_key, model_digest, rows_digest

logger = logging.getLogger("dataflex")


def pool(hidden: torch.Tensor, attention_mask: torch.Tensor | None) -> torch.Tensor:
    """Masked mean over tokens of ``hidden`` [B, T, H], L2-normalised, float32 [B, H]; NaN rows for empty samples."""
    hidden = hidden.float()
    if attention_mask is None or attention_mask.dim() != 2:
        mask = torch.ones(hidden.shape[:2], dtype=torch.float32, device=hidden.device)
    else:
        mask = (attention_mask != 0).to(torch.float32).to(hidden.device)
    counts = mask.sum(dim=1, keepdim=True)
    mean = (hidden * mask.unsqueeze(-1)).sum(dim=1) / counts.clamp(min=1)
    norms = mean.norm(dim=1, keepdim=True)
    out = mean / norms.clamp(min=1e-30)
    out[(counts.squeeze(1) == 0) | (norms.squeeze(1) == 0)] = float("nan")
    return out


def pool_last(hidden: torch.Tensor, attention_mask: torch.Tensor | None) -> torch.Tensor:
    """The hidden state of each row's last attended token, L2-normalised, float32 [B, H]; NaN rows for empty samples."""
    hidden = hidden.float()
    if attention_mask is None or attention_mask.dim() != 2:
        mask = torch.ones(hidden.shape[:2], dtype=torch.long, device=hidden.device)
    else:
        mask = (attention_mask != 0).long().to(hidden.device)
    positions = torch.arange(mask.shape[1], device=hidden.device).expand_as(mask)
    last = torch.where(mask > 0, positions, torch.full_like(positions, -1)).max(dim=1).values
    out = hidden[torch.arange(hidden.shape[0], device=hidden.device), last.clamp(min=0)]
    norms = out.norm(dim=1, keepdim=True)
    out = out / norms.clamp(min=1e-30)
    out[(last < 0) | (norms.squeeze(1) == 0)] = float("nan")
    return out


POOLING = {"mean": pool, "last": pool_last}


def pool_states(states: Sequence[torch.Tensor], attention_mask: torch.Tensor | None, layer: int = -1,
                pooling: str = "mean") -> torch.Tensor:
    """``POOLING[pooling]`` of ``states[layer]`` (the ``hidden_states`` of one forward)."""
    if not -len(states) <= layer < len(states):
        raise ValueError(f"embedding layer {layer} does not exist: the model has {len(states)} hidden states "
                         f"(embeddings + {len(states) - 1} layers)")
    return POOLING[pooling](states[layer], attention_mask)


def hidden_states_of(model: torch.nn.Module, inputs: dict[str, Any], layer: int) -> torch.Tensor:
    """``hidden_states[layer]`` of one forward (no logits are computed beyond one position)."""
    try:
        out = model(**inputs, output_hidden_states=True, logits_to_keep=1)
    except TypeError as err:  # a model without logits_to_keep: full logits
        if "logits_to_keep" not in str(err):
            raise
        out = model(**inputs, output_hidden_states=True)
    states = out.hidden_states
    if states is None:
        raise ValueError("the model returned no hidden states (output_hidden_states is not supported)")
    if not -len(states) <= layer < len(states):
        raise ValueError(f"embedding layer {layer} does not exist: the model has {len(states)} hidden states "
                         f"(embeddings + {len(states) - 1} layers)")
    return states[layer]


def embed(engine: Any, dataset: Any, indices: Sequence[int], batch_size: int, layer: int = -1,
          desc: str = "embeddings") -> torch.Tensor:
    """``[len(indices), hidden]`` float32 embeddings of ``dataset[indices]`` with ``engine.model``."""
    return embed_with(engine, dataset, indices, batch_size, layer, "mean", desc)


def embed_with(engine: Any, dataset: Any, indices: Sequence[int], batch_size: int, layer: int = -1,
               pooling: str = "mean", desc: str = "embeddings") -> torch.Tensor:
    """:func:`embed` with a choice of pooling (``mean`` or ``last``)."""
    model = engine.model

    def run(batch: Batch) -> torch.Tensor:
        return POOLING[pooling](hidden_states_of(model, batch.inputs, layer), batch.inputs.get("attention_mask"))

    with eval_mode(model), torch.no_grad():
        values = engine.map(dataset, indices, batch_size, run, desc)
    if not values:
        return torch.empty(0, 0)
    return torch.stack(values)


class EmbeddingSource:
    """Where a selector's embeddings come from: the training model (default) or a frozen model of its own.

    ``embed(ctx, dataset, name, fresh)`` returns ``[len(dataset), hidden]`` unit rows (NaN rows for
    samples without tokens), sharded over ranks through the engine. Embeddings that do not change
    - a frozen embedding model's, or the training model's when ``fresh`` is false - are computed
    once and cached by content (:class:`~dataflex.scoring.neighbours.EmbeddingCache`).
    """

    def __init__(self, model_path: str | None, layer: int = -1, dtype: str = "auto", batch_size: int = 16,
                 cache_dir: str | None = None):
        self.model_path = model_path
        self.layer = layer
        self.dtype = dtype
        self.batch_size = batch_size
        self.cache = EmbeddingCache(cache_dir)
        self.external = None
        self.keys: dict[str, str] = {}  # name -> content key of embeddings that do not change (state)

    def describe(self) -> str:
        return f"'{self.model_path}'" if self.model_path else f"the training model (hidden state {self.layer})"

    def embed(self, ctx: Any, dataset: Any, name: str, fresh: bool) -> torch.Tensor:
        engine = ctx.scorer
        if self.cache.folder is None and ctx.cache_dir:  # <cache_dir>/embeddings, shared by runs (keyed by content)
            self.cache = EmbeddingCache(ctx.cache_dir)
        indices = range(len(dataset))
        if self.model_path:
            if self.external is None:
                self.external = ExternalEmbedder(self.model_path, engine.device, self.dtype)
            tokenizer = ctx.tokenizer
            if tokenizer is None:
                raise ValueError("embedding_model_name_or_path needs the training tokenizer to decode the rows")
            ext = self.external

            def run(batch):
                texts = tokenizer.batch_decode(batch.inputs["input_ids"], skip_special_tokens=True)
                return ext.embed_texts(texts, self.batch_size)

            key = self.keys.get(name) or cache_key("external", ext.digest, rows_digest(dataset))
            compute = lambda: torch.stack(engine.map(dataset, indices, self.batch_size, run,  # noqa: E731
                                                      f"embedding {name} ({self.model_path})"))
        else:
            compute = lambda: embed(engine, dataset, indices, self.batch_size, self.layer,  # noqa: E731
                                    desc=f"embedding {name}")
            if fresh:
                return compute()
            # pinned by a checkpoint (resume): the embeddings of the model as it was when they were first made
            key = self.keys.get(name) or cache_key("training-model", model_digest(engine.model), self.layer,
                                                   rows_digest(dataset))
        if name in self.keys and self.keys[name] == key:  # pinned by a checkpoint: the cache must still hold it
            inner, folder = compute, self.cache.folder

            def compute() -> torch.Tensor:
                if ctx.rank == 0:
                    logger.warning("[DataFlex] the embeddings of %s pinned by the checkpoint (%s) are not in %s: "
                                   "embedding with the current model instead, so this selection can differ from an "
                                   "uninterrupted run (keep cache_dir with the checkpoints to resume exactly)",
                                   name, key, folder)
                return inner()
        self.keys[name] = key
        return self.cache.get(key, compute, ctx.agreement)

    def pool_and_queries(self, ctx: Any, selector: str, refresh: bool) -> tuple[torch.Tensor, torch.Tensor]:
        """``(training pool [N, D], eval queries [M, D])`` for a selector that searches the pool with the
        eval set; queries without a token to embed are dropped, pool rows stay (NaN, never a neighbour)."""
        if ctx.eval_dataset is None or len(ctx.eval_dataset) == 0:
            raise ValueError(f"selector '{selector}' needs a non-empty eval_dataset (the queries)")
        fresh = refresh and not self.model_path  # a frozen embedding model embeds the same rows the same way
        train = self.embed(ctx, ctx.train_dataset, "the training pool", fresh)
        queries = self.embed(ctx, ctx.eval_dataset, "the eval set", fresh)
        return train, queries[~torch.isnan(queries).any(dim=1)]

    def state_dict(self) -> dict[str, Any]:
        return {"embedding_keys": dict(self.keys)} if self.keys else {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.keys = dict(state.get("embedding_keys") or {})


class ExternalEmbedder:
    """A frozen HF model of its own (``embedding_model_name_or_path``), loaded once.

    The training rows are decoded with the training tokenizer and re-tokenized with the model's
    own; sentence-transformers is used when it is installed and the folder is one of its models,
    else the masked mean of the last hidden state of ``AutoModel``.
    """

    def __init__(self, path: str, device: Any, dtype: str = "auto"):
        self.path = path
        self.device = device
        self.st = None
        try:
            from sentence_transformers import SentenceTransformer

            if (Path(path) / "modules.json").is_file():
                self.st = SentenceTransformer(path, device=str(device))
        except ImportError:
            pass
        if self.st is None:
            from transformers import AutoModel, AutoTokenizer

            torch_dtype = None if dtype == "auto" else getattr(torch, dtype)
            self.tokenizer = AutoTokenizer.from_pretrained(path)
            self.model = AutoModel.from_pretrained(path, dtype=torch_dtype).to(device).eval()
            for p in self.model.parameters():
                p.requires_grad_(False)
        self.digest = self._digest()

    def _digest(self) -> str:
        if self.st is not None:
            return model_digest(self.st)
        return model_digest(self.model)

    @torch.no_grad()
    def embed_texts(self, texts: Sequence[str], batch_size: int = 16) -> torch.Tensor:
        if self.st is not None:
            out = self.st.encode(list(texts), batch_size=batch_size, convert_to_tensor=True, normalize_embeddings=True)
            return out.float().cpu()
        parts = []
        for start in range(0, len(texts), batch_size):
            batch = self.tokenizer(list(texts[start:start + batch_size]), padding=True, truncation=True,
                                   max_length=512, return_tensors="pt").to(self.device)
            hidden = self.model(**batch).last_hidden_state
            parts.append(pool(hidden, batch["attention_mask"]).cpu())
        return torch.cat(parts) if parts else torch.empty(0, 0)
