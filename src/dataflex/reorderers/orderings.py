"""The paper's data orderings as reorderers: ``shuffle``, ``sorting``, ``folding``, ``zigzag``,
``segment``, ``stair``, ``saw`` (ordered once: ``kind: static``) and the presets ``dynamic_saw``,
``dynamic_folding``, ``reuse_selector_scores`` (the rows left in the epoch re-ordered every
``update_step``: ``kind: dynamic``). They take the original DataFlex's ``reorders:`` presets as they
are: ``name`` only sets the defaults of ``kind``, ``pattern`` and ``score_source``.

A score comes from ``score_source``:

    precomputed       a numeric field of the training rows (``score_params.score_field``, read like
                      the ``static`` reorderer's column), or a file with one score per row
                      (``score_params.score_path``: .npy, .json list, .jsonl rows holding score_field)
    cached_selection  the per-sample metric of a selection record (``score_params.cache_path``,
                      ``metric_key``): this project's ``step_N.json`` (``per_sample``) or the original's
                      (``metric``); rows the record does not hold get ``fill_value``
    model_loss        each row's mean token loss under the current model (``batch_size``;
                      ``max_samples``: score a seeded random subset, the others are ordered at the
                      median of the scored ones)

``polarity`` says which end of the raw score belongs late in training (``higher_later``, alias
``higher_is_better``; ``higher_earlier``, alias ``lower_is_better``): the patterns of
:mod:`dataflex.reorderers.patterns` run on the key ``score`` or ``-score``; ``ascending: false``
walks that axis backwards.
"""

from __future__ import annotations

import json
import logging
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal


from ..component import register
from ..core.sampling import pool_positions
from ..errors import ConfigError
from ..params import Params
from ..seeding import seeded_generator
from .base import OrderResult, ReorderContext, Reorderer
from .patterns import PATTERNS, arrange, segment_counts

logger = logging.getLogger("dataflex")

POLARITY = {"higher_later": "higher_later", "higher_is_better": "higher_later",
            "higher_earlier": "higher_earlier", "lower_is_better": "higher_earlier"}
SOURCES = ("precomputed", "cached_selection", "model_loss")
# pattern_params: key -> (type, default, the patterns it shapes)
PATTERN_KEYS: dict[str, tuple[type, Any, tuple[str, ...]]] = {
    "layers": (int, 3, ("folding", "zigzag", "stair", "saw")),
    "num_sections": (int, 2, ("stair", "saw")),
    "folding_ratio": (float, 0.1, ("stair", "saw")),
    "x_pct": (float, 10.0, ("segment",)),
    "y_pct": (float, 10.0, ("segment",)),
    "front_is_high": (bool, False, ("segment",)),
    "back_is_high": (bool, True, ("segment",)),
}
LAYER_ALIASES = ("folding_layer", "zigzag_layer")  # the paper's code names layers so
# score_params per source: key -> (type, default)
SCORE_KEYS: dict[str, dict[str, tuple[tuple[type, ...], Any]]] = {
    "precomputed": {"score_field": ((str,), "score"), "score_path": ((str, type(None)), None)},
    "cached_selection": {"cache_path": ((str,), None), "metric_key": ((str,), "loss"),
                         "fill_value": ((int, float), 0.0)},
    "model_loss": {"batch_size": ((int,), 8), "num_workers": ((int,), 0), "max_samples": ((int, type(None)), None),
                   "seed": ((int, type(None)), None)},
}


def _typed(value: Any, types: tuple[type, ...]) -> bool:
    if isinstance(value, bool) and bool not in types:
        return False
    return isinstance(value, types)


@dataclass
class OrderingParams(Params):
    kind: Literal["static", "dynamic"] = field(
        default="static", metadata={"help": "static: order once (each epoch in the stored order); dynamic: every "
                                            "update_step, re-score and re-order the rows left in the epoch."})
    pattern: Literal["shuffle", "sorting", "folding", "zigzag", "segment", "stair", "saw"] = field(
        default="sorting", metadata={"help": "The ordering (docs/reorderers/orderings.md draws each)."})
    polarity: Literal["higher_later", "higher_earlier", "higher_is_better", "lower_is_better"] = field(
        default="higher_later", metadata={"help": "Which end of the raw score comes late: higher_later (alias "
                                                  "higher_is_better) or higher_earlier (alias lower_is_better)."})
    ascending: bool = field(default=True, metadata={"help": "false: walk the score axis backwards (not read by "
                                                            "shuffle and segment)."})
    window_size: int = field(default=0, metadata={"help": "JIT: shuffle each consecutive window of this many rows "
                                                          "of the result (0 or 1: off)."})
    seed: int | None = field(default=None, metadata={"help": "Seed of the random parts (shuffle, segment, JIT, "
                                                             "ties); unset: the run's seed."})
    pattern_params: dict[str, Any] = field(
        default_factory=dict,
        metadata={"help": "layers (alias folding_layer / zigzag_layer), num_sections, folding_ratio (< 1 / (2 "
                          "num_sections)), x_pct, y_pct, front_is_high, back_is_high."})
    score_source: Literal["precomputed", "cached_selection", "model_loss"] = field(
        default="precomputed", metadata={"help": "precomputed (a row field or a score file), cached_selection (a "
                                                 "selection record's per-sample metric) or model_loss."})
    score_params: dict[str, Any] = field(
        default_factory=dict,
        metadata={"help": "precomputed: score_field, score_path; cached_selection: cache_path, metric_key, "
                          "fill_value; model_loss: batch_size, max_samples, seed (num_workers: no effect)."})
    apply_at: Literal["raw", "index"] | None = field(
        default=None, metadata={"help": "raw: the score belongs to the dataset rows as read (precomputed, static); "
                                        "index: to the training rows. Unset: raw for a static precomputed score, "
                                        "else index."})
    reorder_every: int = field(default=1, metadata={"help": "dynamic: re-score at every k-th update only (the "
                                                            "others keep the current order)."})
    consume_once: bool = field(default=True, metadata={"help": "dynamic: rows consumed in an epoch stay consumed "
                                                               "(only true is supported)."})

    def _bad(self, key: str, value: Any, allowed: str) -> ConfigError:
        return ConfigError(f"component '{self._component()}': param '{key}' = {value!r} is invalid; allowed: {allowed}")

    def check(self) -> None:
        if self.window_size < 0:
            self.fail("window_size", "an integer >= 0 (0 or 1: no jittering)")
        if self.reorder_every < 1:
            self.fail("reorder_every", "an integer >= 1")
        if not self.consume_once:
            self.fail("consume_once", "true (an epoch consumes every row once; rows served since the last ordering "
                                      "are never handed out again in the same epoch)")
        self.shape = self._pattern_values()  # pattern_params with their defaults filled in
        self.scoring = self._score_values()  # score_params likewise
        if self.apply_at is None:
            self.apply_at = "raw" if self.kind == "static" and self.score_source == "precomputed" else "index"
        if self.apply_at == "raw" and (self.kind != "static" or self.score_source != "precomputed"):
            self.fail("apply_at", "index with kind: dynamic or a score the model or a record gives (raw orders the "
                                  "rows by a score read with them: kind: static, score_source: precomputed)")

    def _pattern_values(self) -> dict[str, Any]:
        raw = dict(self.pattern_params)
        aliases = {k: raw.pop(k) for k in LAYER_ALIASES if k in raw}
        for key, value in aliases.items():
            if "layers" in raw and raw["layers"] != value:
                raise self._bad(f"pattern_params.{key}", value, f"the same value as layers ({raw['layers']!r}), or "
                                                                "only one of them")
            raw["layers"] = value
        unknown = sorted(set(raw) - set(PATTERN_KEYS))
        if unknown:
            raise self._bad(f"pattern_params.{unknown[0]}", raw[unknown[0]],
                            f"only the keys {', '.join([*PATTERN_KEYS, *LAYER_ALIASES])}")
        out = {k: spec[1] for k, spec in PATTERN_KEYS.items()}
        for key, value in raw.items():
            tp = PATTERN_KEYS[key][0]
            ok = _typed(value, (int, float) if tp is float else (tp,))
            if not ok:
                raise self._bad(f"pattern_params.{key}", value, f"a {tp.__name__}")
            out[key] = float(value) if tp is float else value
            if self.pattern not in PATTERN_KEYS[key][2]:
                logger.warning("[DataFlex] component '%s': pattern_params.%s has no effect with pattern '%s' (it "
                               "shapes %s)", self._component(), key, self.pattern, ", ".join(PATTERN_KEYS[key][2]))
        if out["layers"] < 1:
            raise self._bad("pattern_params.layers", out["layers"], "an integer >= 1")
        if out["num_sections"] < 1:
            raise self._bad("pattern_params.num_sections", out["num_sections"], "an integer >= 1")
        ratio, sections = out["folding_ratio"], out["num_sections"]
        if not (math.isfinite(ratio) and ratio >= 0 and (sections == 1 or 2 * ratio * sections < 1)):
            raise self._bad("pattern_params.folding_ratio", ratio,
                            f"a number >= 0 below 1 / (2 num_sections) = {1 / (2 * sections):.4g} (transition zones "
                            "must not overlap)")
        for key in ("x_pct", "y_pct"):
            if not (math.isfinite(out[key]) and 0 <= out[key] <= 100):
                raise self._bad(f"pattern_params.{key}", out[key], "a percentage in [0, 100]")
        if out["x_pct"] + out["y_pct"] > 100:
            raise self._bad("pattern_params.y_pct", out["y_pct"],
                            f"at most {100 - out['x_pct']:g} (x_pct + y_pct <= 100: the two segments share the rows)")
        return out

    def _score_values(self) -> dict[str, Any]:
        allowed = SCORE_KEYS[self.score_source]
        raw = dict(self.score_params)
        unknown = sorted(set(raw) - set(allowed))
        if unknown:
            raise self._bad(f"score_params.{unknown[0]}", raw[unknown[0]],
                            f"with score_source: {self.score_source} only the keys {', '.join(allowed)}")
        out = {k: spec[1] for k, spec in allowed.items()}
        for key, value in raw.items():
            types = allowed[key][0]
            if not _typed(value, types):
                names = " or ".join("null" if t is type(None) else t.__name__ for t in types)
                raise self._bad(f"score_params.{key}", value, f"a {names}")
            out[key] = value
        if self.score_source == "cached_selection" and not out["cache_path"]:
            raise self._bad("score_params.cache_path", out["cache_path"],
                            "the path of a selection record (a step_N.json of a selector's run)")
        if self.score_source == "model_loss":
            if out["batch_size"] < 1:
                raise self._bad("score_params.batch_size", out["batch_size"], "an integer >= 1")
            if out["max_samples"] is not None and out["max_samples"] < 1:
                raise self._bad("score_params.max_samples", out["max_samples"], "an integer >= 1, or null")
            if "num_workers" in raw:
                logger.warning("[DataFlex] component '%s': score_params.num_workers has no effect here (scoring "
                               "batches are built in the training process)", self._component())
        return out

    @property
    def direction(self) -> str:
        return POLARITY[self.polarity]


def _finite(values: list[Any], where: str) -> list[float]:
    out = []
    for i, v in enumerate(values):
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
            raise ValueError(f"{where}: entry {i} is {v!r}; allowed: finite numbers")
        out.append(float(v))
    return out


def read_score_file(path: str | os.PathLike, score_field: str) -> list[float]:
    """One score per row from ``.npy``, ``.json`` (a list, or a mapping holding ``score_field``) or ``.jsonl``."""
    path = Path(path)
    if path.suffix == ".npy":
        import numpy as np

        return _finite(np.load(path, allow_pickle=False).reshape(-1).tolist(), str(path))
    text = path.read_text(encoding="utf-8")
    if path.suffix == ".jsonl":
        values = []
        for n, line in enumerate(text.splitlines(), 1):
            if line.strip():
                row = json.loads(line)
                if not isinstance(row, dict) or score_field not in row:
                    raise ValueError(f"{path}:{n} has no field '{score_field}'")
                values.append(row[score_field])
        return _finite(values, str(path))
    if path.suffix == ".json":
        data = json.loads(text)
        if isinstance(data, dict):
            for holder in (data, data.get("per_sample") or {}, data.get("metric") or {}):
                if isinstance(holder, dict) and score_field in holder:
                    data = holder[score_field]
                    break
            else:
                raise ValueError(f"{path} holds no '{score_field}' (at its top level, under per_sample or metric)")
        if not isinstance(data, list):
            raise ValueError(f"{path}: '{score_field}' is not a list of numbers")
        return _finite(data, str(path))
    raise ValueError(f"{path}: unsupported score file; allowed: .npy, .json, .jsonl")


def read_selection_metric(path: str | os.PathLike, metric: str) -> dict[int, float]:
    """``{training row: value}`` of a selection record's per-sample ``metric`` (first value of a repeated row)."""
    data = json.loads(Path(path).read_text(encoding="utf-8"))
    if not isinstance(data, dict) or not isinstance(data.get("indices"), list):
        raise ValueError(f"{path} is not a selection record (no 'indices' list)")
    holder = data.get("per_sample") if isinstance(data.get("per_sample"), dict) else data.get("metric") or {}
    values = holder.get(metric)
    if values is None:
        raise ValueError(f"{path} has no per-sample '{metric}'; it has: {', '.join(sorted(holder)) or '(none)'}")
    if len(values) != len(data["indices"]):
        raise ValueError(f"{path}: {len(data['indices'])} indices but {len(values)} '{metric}' values")
    out: dict[int, float] = {}
    for i, v in zip(data["indices"], _finite(values, f"{path} '{metric}'")):
        out.setdefault(int(i), v)
    return out


class OrderingReorderer(Reorderer):
    """One of the paper's orderings over per-row scores; subclasses only set the defaults."""

    Params = OrderingParams

    def __init__(self, params: OrderingParams):
        super().__init__(params)
        self.scores: list[float | None] | None = None  # static / file / record: one per training row
        self.last: dict[int, float | None] = {}  # dynamic: the scores of the last re-scoring
        self.scored_at: int | None = None

    @property
    def dynamic(self) -> bool:  # type: ignore[override]
        return self.params.kind == "dynamic"

    @property
    def column(self) -> str | None:
        s = self.params.scoring
        if self.params.pattern == "shuffle":
            return None  # reads no score
        if self.params.score_source == "precomputed" and not s["score_path"]:
            return s["score_field"]
        return None

    def _path(self, key: str) -> Path:
        return Path(os.path.expanduser(self.params.scoring[key]))

    def check_config(self, cfg: dict[str, Any], spec: Any) -> None:
        super().check_config(cfg, spec)
        p, s = self.params, self.params.scoring
        where = f"component '{spec.key}': param 'score_params.%s' = %r"
        if self.column and cfg.get("stage", "sft") == "pt":
            raise ConfigError(f"component '{spec.key}': param 'score_params.score_field' = '{self.column}' cannot be "
                              "used with stage: pt (pretraining rows are blocks of cutoff_len tokens, not dataset "
                              "rows); allowed: score_path (one score per block), or score_source: model_loss")
        key = {"precomputed": "score_path", "cached_selection": "cache_path"}.get(p.score_source)
        if key and s[key]:
            path = self._path(key)
            try:
                if key == "score_path":
                    self.file_scores = read_score_file(path, s["score_field"])
                else:
                    self.record = read_selection_metric(path, s["metric_key"])
            except FileNotFoundError:
                raise ConfigError((where % (key, s[key])) + f": no such file (from {Path.cwd()})") from None
            except (OSError, ValueError) as err:
                raise ConfigError((where % (key, s[key])) + f": {str(err).splitlines()[0]}") from None

    def check_data(self, train_size: int, eval_size: int | None) -> None:
        name = self.params._component()
        s = self.params.scoring
        try:  # the component may be a fresh one in this process: read what check_config read
            if s.get("score_path") and getattr(self, "file_scores", None) is None:
                self.file_scores = read_score_file(self._path("score_path"), s["score_field"])
            if s.get("cache_path") and getattr(self, "record", None) is None:
                self.record = read_selection_metric(self._path("cache_path"), s["metric_key"])
        except (OSError, ValueError) as err:
            key = "score_path" if s.get("score_path") else "cache_path"
            raise ConfigError(f"component '{name}': param 'score_params.{key}' = '{s[key]}': "
                              f"{str(err).splitlines()[0]}") from None
        if getattr(self, "file_scores", None) is not None and len(self.file_scores) != train_size:
            rows = "dataset rows as read" if self.params.apply_at == "raw" else "training rows"
            raise ConfigError(f"component '{name}': param 'score_params.score_path' = "
                              f"'{self.params.scoring['score_path']}': {len(self.file_scores)} scores for "
                              f"{train_size} {rows}; allowed: exactly one score per row, in row order")
        bad = [i for i in (getattr(self, "record", None) or {}) if not 0 <= i < train_size]
        if bad:
            raise ConfigError(f"component '{name}': param 'score_params.cache_path' = "
                              f"'{self.params.scoring['cache_path']}': row {bad[0]} is not a row of this training "
                              f"set ({train_size} rows; the record belongs to another dataset)")

    # ------------------------------------------------------------------ scores
    def _all_scores(self, ctx: ReorderContext) -> list[float | None]:
        """One score per training row, for the sources that do not change during the run."""
        p, s = self.params, self.params.scoring
        if p.score_source == "precomputed":
            if getattr(self, "file_scores", None) is None and s["score_path"]:
                self.file_scores = read_score_file(self._path("score_path"), s["score_field"])
            if s["score_path"]:
                values = self.file_scores
            else:
                if ctx.column is None:
                    raise ValueError(f"column '{s['score_field']}' was not read with the training data")
                values = ctx.column
            if len(values) != ctx.train_size:
                raise ValueError(f"{len(values)} scores for a training set of {ctx.train_size} rows")
            return [float(v) for v in values]
        if p.score_source == "cached_selection":
            if getattr(self, "record", None) is None:
                self.record = read_selection_metric(self._path("cache_path"), s["metric_key"])
            return [self.record.get(i, float(s["fill_value"])) for i in range(ctx.train_size)]
        return self._losses(ctx, list(range(ctx.train_size)))

    def _losses(self, ctx: ReorderContext, rows: list[int]) -> list[float | None]:
        s = self.params.scoring
        losses = ctx.scorer.losses(ctx.train_dataset, rows, s["batch_size"],
                                   desc=f"reorder {ctx.number + 1}: scoring losses")
        return [None if math.isnan(v) else float(v) for v in losses.tolist()]

    def _model_scores(self, ctx: ReorderContext) -> dict[int, float | None]:
        s = self.params.scoring
        rows = ctx.rows
        if s["max_samples"] is not None and s["max_samples"] < len(rows):
            gen = ctx.generator if s["seed"] is None else seeded_generator(s["seed"], "score-sample", ctx.number)
            rows = [rows[q] for q in pool_positions(len(rows), s["max_samples"], gen)]
        return dict(zip(rows, self._losses(ctx, rows)))

    # ------------------------------------------------------------------ ordering
    def order(self, ctx: ReorderContext) -> OrderResult:
        p = self.params
        if self.dynamic and ctx.number % p.reorder_every:
            return OrderResult(list(ctx.rows), [self.last.get(r) for r in ctx.rows],
                               {"pattern": p.pattern, "rescored": False})
        if p.pattern == "shuffle":
            by_row: dict[int, float | None] = {}
        elif self.dynamic and p.score_source == "model_loss":
            by_row = self._model_scores(ctx)
            self.last = dict(by_row)
        else:
            if self.scores is None:
                self.scores = self._all_scores(ctx)
                self.scored_at = ctx.step
            by_row = {r: self.scores[r] for r in ctx.rows}
            self.last = {}
        values = [by_row.get(r) for r in ctx.rows]
        known = sorted(v for v in values if v is not None)
        fill = (known[(len(known) - 1) // 2] + known[len(known) // 2]) / 2 if known else 0.0  # the median
        sign = 1.0 if p.direction == "higher_later" else -1.0
        keys = [sign * (fill if v is None else v) for v in values]
        gen = ctx.generator if p.seed is None else seeded_generator(p.seed, "ordering", ctx.number)
        shape = p.shape
        positions = arrange(p.pattern, keys, gen, ascending=p.ascending, window_size=p.window_size,
                            layers=shape["layers"], num_sections=shape["num_sections"],
                            folding_ratio=shape["folding_ratio"], x_pct=shape["x_pct"], y_pct=shape["y_pct"],
                            front_is_high=shape["front_is_high"], back_is_high=shape["back_is_high"])
        rows = [ctx.rows[q] for q in positions]
        summary = {"pattern": p.pattern, "score_source": p.score_source, "rescored": True,
                   "scored": len(known), "scored_at": ctx.step if self.dynamic else self.scored_at}
        if p.pattern == "segment":
            summary["segments"] = list(segment_counts(len(rows), shape["x_pct"], shape["y_pct"]))
        return OrderResult(rows, [by_row.get(r) for r in rows], summary)

    def state_dict(self) -> dict[str, Any]:
        return {"scores": self.scores, "scored_at": self.scored_at, "last": [[r, v] for r, v in self.last.items()]}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.scores = state.get("scores")
        self.scored_at = state.get("scored_at")
        self.last = {int(r): v for r, v in state.get("last") or []}


def _preset(name: str, kind: str, pattern: str, source: str, summary: str) -> type[OrderingReorderer]:
    """A registered reorderer ``name`` whose params default to ``kind``, ``pattern`` and ``score_source``."""
    params = dataclass(type(f"{name.title().replace('_', '')}Params", (OrderingParams,), {
        "__module__": __name__,
        "__annotations__": {"kind": OrderingParams.__annotations__["kind"],
                            "pattern": OrderingParams.__annotations__["pattern"],
                            "score_source": OrderingParams.__annotations__["score_source"]},
        "kind": field(default=kind, metadata=OrderingParams.__dataclass_fields__["kind"].metadata),
        "pattern": field(default=pattern, metadata=OrderingParams.__dataclass_fields__["pattern"].metadata),
        "score_source": field(default=source, metadata=OrderingParams.__dataclass_fields__["score_source"].metadata),
    }))
    cls = type(f"{name.title().replace('_', '')}Reorderer", (OrderingReorderer,),
               {"name": name, "Params": params, "summary": summary, "__module__": __name__})
    return register(cls)


STATIC_SUMMARIES = {
    "shuffle": "the paper's random baseline: a seeded random order",
    "sorting": "the paper's CL: rows sorted by a score",
    "folding": "the paper's FO: the sorted rows in `layers` strided sweeps",
    "zigzag": "the paper's ZIG: folding with every odd sweep reversed",
    "segment": "the paper's SEG: front and back segments from chosen ends of the scores",
    "stair": "the paper's STR: sorted, folded around each section boundary",
    "saw": "the paper's SAW: sorted, zigzagged around each section boundary",
}
for _pattern in PATTERNS:
    _preset(_pattern, "static", _pattern, "precomputed", STATIC_SUMMARIES[_pattern])
_preset("dynamic_saw", "dynamic", "saw", "model_loss", "every update_step, SAW over the rows left, by current loss")
_preset("dynamic_folding", "dynamic", "folding", "model_loss",
        "every update_step, FO over the rows left, by current loss")
_preset("reuse_selector_scores", "dynamic", "saw", "cached_selection",
        "SAW by a selection record's per-sample metric (no scoring pass)")
