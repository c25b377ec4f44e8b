"""Nearest neighbours of embeddings, exact and chunked, and embeddings cached by content.

* :func:`top_k` - for every query, the ``k`` most similar keys by cosine (embeddings are unit
  length, so this is also the ``k`` nearest by L2 distance), computed exactly in torch over
  chunks of queries: memory stays O(chunk x keys), whatever the number of queries. No faiss is
  needed for pools up to about a million rows; ``backend="faiss"`` uses an exact faiss index
  (``IndexFlatIP``) when faiss is installed (``bench/selector_agreement.py`` measures both).
* :class:`EmbeddingCache` - embeddings on disk under ``<cache_dir>/embeddings/<key>.pt``, where the
  key hashes what they depend on: the embedding model's weights (a digest of every tensor), the
  layer, and the tokenized rows. Another model, layer or dataset is another key, so a stale
  embedding is never reused (the original keyed its clusters by name only).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from pathlib import Path
from typing import Any, Callable

import torch

logger = logging.getLogger("dataflex")


def top_k(queries: torch.Tensor, keys: torch.Tensor, k: int, chunk: int = 1024,
          backend: str = "torch") -> tuple[torch.Tensor, torch.Tensor]:
    """``(similarity [M, k], index [M, k])`` of the ``k`` keys most similar to each query, best first.

    Among the ``k`` returned, equal similarities are in key order. Rows of NaN (samples without
    tokens) are never returned as neighbours.
    """
    valid_keys = ~torch.isnan(keys).any(dim=1)
    k = min(k, int(valid_keys.sum()))  # never more than the rows with tokens: the rest would be NaN rows
    keys = torch.nan_to_num(keys.float())
    if backend == "faiss":
        return _faiss_top_k(queries, keys, valid_keys, k)
    sims, idx = [], []
    for start in range(0, queries.shape[0], chunk):
        q = queries[start:start + chunk].float()
        s = q @ keys.T
        s[:, ~valid_keys] = -float("inf")
        best = torch.topk(s, k, dim=1)
        # equal similarities in key order: sort the k by index, then stably by similarity
        by_index = torch.sort(best.indices, dim=1)
        values = torch.gather(best.values, 1, by_index.indices)
        order = torch.sort(values, dim=1, descending=True, stable=True)
        sims.append(order.values)
        idx.append(torch.gather(by_index.values, 1, order.indices))
    if not sims:
        return torch.empty(0, k), torch.empty(0, k, dtype=torch.long)
    return torch.cat(sims), torch.cat(idx)


def _faiss_top_k(queries, keys, valid_keys, k):
    try:
        import faiss  # noqa: F401
    except ImportError:
        raise ValueError("search backend 'faiss' needs faiss (pip install faiss-cpu); use backend 'torch'") from None
    import faiss
    import numpy as np

    index = faiss.IndexFlatIP(keys.shape[1])
    kept = valid_keys.nonzero().flatten()
    index.add(np.ascontiguousarray(keys[kept].numpy(), dtype=np.float32))
    s, i = index.search(np.ascontiguousarray(torch.nan_to_num(queries.float()).numpy()), min(k, len(kept)))
    return torch.from_numpy(s), kept[torch.from_numpy(i).long()]


def model_digest(model: torch.nn.Module) -> str:
    """A content hash of a model's weights: name, shape, dtype and two float64 moments of every tensor."""
    h = hashlib.sha256()
    with torch.no_grad():
        for name, p in sorted(model.state_dict().items()):
            if not torch.is_tensor(p):
                continue
            t = p.detach().double()
            h.update(f"{name}:{tuple(p.shape)}:{p.dtype}:{float(t.sum())!r}:{float(t.square().sum())!r}".encode())
    return h.hexdigest()[:16]


def rows_digest(dataset: Any) -> str:
    """A content hash of a tokenized dataset's ``input_ids`` (every row)."""
    h = hashlib.sha256()
    try:
        column = dataset.with_format("arrow")
        for table in column.iter(batch_size=10_000):
            for ids in table["input_ids"].to_pylist():
                h.update(json.dumps(ids).encode())
    except Exception:  # noqa: BLE001 - a plain list of rows
        for i in range(len(dataset)):
            h.update(json.dumps(list(dataset[i]["input_ids"])).encode())
    return h.hexdigest()[:16]


class EmbeddingCache:
    """Embeddings keyed by content, in memory and (when a folder is given) on disk."""

    def __init__(self, folder: str | os.PathLike | None):
        self.folder = Path(folder) / "embeddings" if folder else None
        self.memory: dict[str, torch.Tensor] = {}

    def get(self, key: str, compute: Callable[[], torch.Tensor], agreement: Any = None) -> torch.Tensor:
        """The embeddings of ``key``: from memory, from disk, or computed (on every rank: a collective).

        Rank 0 decides whether the file is there, so every rank takes the same path (the cache
        folder must be one all ranks see, as checkpoints are)."""
        if key in self.memory:
            return self.memory[key]
        rank = agreement.rank if agreement is not None else 0
        path = self.folder / f"{key}.pt" if self.folder is not None else None
        found = path is not None and path.is_file()
        if agreement is not None:
            found = agreement.share("embedding cache lookup", lambda: found)
        if found:
            value = agreement.run("loading cached embeddings", lambda: torch.load(path)) if agreement else torch.load(path)
            if rank == 0:
                logger.info("[DataFlex] embeddings reused from %s (same model weights, layer and rows)", path)
        else:
            value = compute()
            if path is not None and rank == 0:
                path.parent.mkdir(parents=True, exist_ok=True)
                tmp = path.with_suffix(".tmp")
                torch.save(value, tmp)
                os.replace(tmp, path)
        self.memory[key] = value
        return value


def cache_key(*parts: Any) -> str:
    return hashlib.sha256(json.dumps([str(p) for p in parts]).encode()).hexdigest()[:20]
