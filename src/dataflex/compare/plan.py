"""What a comparison will run, checked before any model is loaded: torch-free.

:func:`prepare` turns ``CONFIG.yaml`` + ``--methods`` + the options into a :class:`Setup`: one
:class:`RunSpec` per method x seed, each with the full training config ``dataflex-cli train`` gets,
its output folder ``OUT/<method>/seed-<k>/`` and its key (a hash of that config, without the folder,
so a rerun of the same command finds its finished runs). Every bad input raises :class:`ConfigError`
with one line.
"""

from __future__ import annotations

import functools
import hashlib
import json
import math
import os
import re
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import yaml

from ..args import DATAFLEX_KEYS, read_config
from ..components_file import ComponentSpec, build_component, load_components, resolve_components_path
from ..errors import ConfigError
from ..modes import BY_SECTION, BY_TRAIN_TYPE
from ..values import names

PLAIN = "plain"
BUDGETS = ("steps", "compute", "both")
METRICS = ("loss", "choice", "exact")
COMPUTE_UNITS = ("seconds", "work")
BASELINES = ("random", PLAIN)
# keys compare sets on every run; a user's value would be overwritten silently, so they are refused instead
OWNED_KEYS = ("output_dir", "max_steps", "train_step", "save_steps", "save_strategy", "save_total_limit",
              "save_only_model", "overwrite_output_dir", "resume_from_checkpoint", "include_num_input_tokens_seen")


@dataclass(frozen=True)
class Method:
    label: str  # as given: "less:candidate_pool=0.1"
    name: str  # "plain" or a component key of the mode's section
    params: dict[str, Any] = field(default_factory=dict, hash=False)

    @property
    def folder(self) -> str:
        return re.sub(r"[^A-Za-z0-9_.=-]+", "_", self.label.replace(":", "__"))


def parse_value(text: str) -> Any:
    """A ``key=value`` override value read like YAML (``0.1`` a number, ``true`` a bool, ``[1,2]`` a list)."""
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError:
        return text


def parse_methods(text: str) -> list[Method]:
    """``plain,random,less:candidate_pool=0.1:proj_dim=256`` -> methods (``:`` separates a method's overrides)."""
    methods: list[Method] = []
    for raw in (p.strip() for p in (text or "").split(",")):
        if not raw:
            continue
        name, *overrides = raw.split(":")
        params: dict[str, Any] = {}
        for item in overrides:
            key, eq, value = item.partition("=")
            if not eq or not key.strip():
                raise ConfigError(f"--methods: '{raw}': override '{item}' is not key=value "
                                  "(e.g. less:candidate_pool=0.1)")
            params[key.strip()] = parse_value(value.strip())
        if name.strip() == PLAIN and params:
            raise ConfigError(f"--methods: '{raw}': plain takes no overrides (it is LLaMA-Factory's own training)")
        methods.append(Method(raw, name.strip(), params))
    if not methods:
        raise ConfigError("--methods: no method given; e.g. --methods plain,random,less")
    labels = [m.label for m in methods]
    dup = next((x for x in labels if labels.count(x) > 1), None)
    if dup:
        raise ConfigError(f"--methods: '{dup}' is listed twice")
    return methods


@dataclass
class RunSpec:
    method: Method
    index: int  # seed-<index>
    seed: int
    role: str  # "main", or "long": the baseline trained past the common step count (compute budget)
    steps: int  # max_steps of this run
    cfg: dict[str, Any]  # the full training config
    components: dict[str, Any] | None  # the components file written beside the config (a method with overrides)
    out: Path

    @property
    def name(self) -> str:
        return f"{self.method.label} seed {self.index}" + (" (long)" if self.role == "long" else "")

    @property
    def key(self) -> str:
        return run_key(self.cfg, self.components)

    @property
    def keys(self) -> tuple[str, str]:
        """The key, and the key of an earlier version (the data folder's path instead of its content),
        under which a run it finished still counts."""
        return self.key, path_run_key(self.cfg, self.components)

    @property
    def config_path(self) -> Path:
        return self.out / "compare_train.yaml"

    @property
    def components_path(self) -> Path:
        return self.out / "compare_components.yaml"

    @property
    def done_path(self) -> Path:
        return self.out / "compare_run.json"


# where a run writes, not what it trains or measures: left out of every key, so moving an output folder keeps it
WRITE_KEYS = ("output_dir", "components_cfg_file")


def without_outputs(cfg: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in cfg.items() if k not in WRITE_KEYS}


def run_key(cfg: dict[str, Any], components: dict[str, Any] | None) -> str:
    """A stable hash of what a run trains: its config (without the folders it writes to, and with the data it
    reads in place of the data folder's path: :func:`keyed`) and its component."""
    return key_hash({"cfg": keyed(cfg), "components": components})


def path_run_key(cfg: dict[str, Any], components: dict[str, Any] | None) -> str:
    """:func:`run_key` as compare computed it before it keyed the data by content (``dataset_dir`` as a path)."""
    return key_hash({"cfg": without_outputs(cfg), "components": components})


def key_hash(value: Any) -> str:
    return hashlib.sha256(json.dumps(value, sort_keys=True, default=str).encode("utf-8")).hexdigest()[:16]


def keyed(cfg: dict[str, Any], extra: tuple[str, ...] = (), train: bool = True) -> dict[str, Any]:
    """``cfg`` as the keys see it: without its output folders, and ``dataset_dir`` replaced by what the
    datasets it names hold (``eval_dataset`` and ``extra``, and with ``train`` its ``dataset``): a comparison
    copied with its data to another folder or checkout keeps its runs, and a data file edited in place trains
    (or measures) them again."""
    out = without_outputs(cfg)
    read = (names(cfg.get("dataset")) if train else []) + names(cfg.get("eval_dataset")) + list(extra)
    out["dataset_dir"] = data_identity(str(cfg.get("dataset_dir", "data")), tuple(read))
    return out


def data_identity(dataset_dir: str, datasets: tuple[str, ...]) -> Any:
    """``{name: [registry entry, SHA-256 of its local file or folder (None for a hub dataset)]}``; the
    folder's path itself when it has no ``dataset_info.json`` (LLaMA-Factory then reads the hub)."""
    from ..integration import dataset_registry

    registry = dataset_registry(dataset_dir)
    if registry is None:
        return dataset_dir
    out = {}
    for name in sorted(set(datasets)):
        entry = registry.get(name)
        path = local_path(entry, dataset_dir)
        out[name] = [entry, _content_digest(str(path)) if path is not None else None]
    return out


def local_path(entry: dict[str, Any] | None, dataset_dir: str) -> Path | None:
    """Where a registered dataset's local file (or folder) is; None for a hub dataset or no entry."""
    file_name = (entry or {}).get("file_name")
    if not file_name or any(entry.get(k) for k in ("hf_hub_url", "ms_hub_url", "om_hub_url", "script_url")):
        return None
    return Path(dataset_dir) / file_name


def _content_digest(path: str) -> str | None:
    """SHA-256 of a file's bytes, or of a folder's files (relative names and bytes, in name order)."""
    if os.path.isfile(path):
        return _file_digest(path, *_stamp(path))
    if not os.path.isdir(path):
        return None
    h = hashlib.sha256()
    for root, dirs, files in os.walk(path):
        dirs.sort()
        for f in sorted(files):
            full = os.path.join(root, f)
            h.update(os.path.relpath(full, path).encode("utf-8") + b"\0")
            h.update(_file_digest(full, *_stamp(full)).encode("ascii"))
    return h.hexdigest()


def _stamp(path: str) -> tuple[int, int]:
    st = os.stat(path)
    return st.st_size, st.st_mtime_ns


@functools.lru_cache(maxsize=256)
def _file_digest(path: str, size: int, mtime_ns: int) -> str:
    """(size and mtime make the cache forget a file changed in place)"""
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


@dataclass
class Setup:
    config: Path
    cfg: dict[str, Any]  # the user's config with overrides
    methods: list[Method]
    baseline: Method
    seeds: int
    budgets: list[str]  # "steps", "compute"
    metric: str
    compute_unit: str
    steps: int  # the common step count
    baseline_steps: int  # the baseline's steps (longer under the compute budget)
    eval_every: int
    options_column: str | None
    out: Path
    runs: list[RunSpec]
    eval_rows: int
    measure_cfg: dict[str, Any] = field(default_factory=dict)  # cfg whose eval_dataset is the set measured
    extra_sets: dict[str, str] = field(default_factory=dict)  # --eval-extra: name -> dataset
    eval_cap: int | None = None  # --quick: rows measured per eval set, at most
    quick: bool = False
    reuse: list[Path] = field(default_factory=list)  # --reuse: other comparisons' folders with runs to take

    def runs_of(self, method: Method, role: str = "main") -> list[RunSpec]:
        """The method's runs in seed order; the baseline's ``long`` runs are its main ones under the compute budget alone."""
        mine = [r for r in self.runs if r.method == method]
        return [r for r in mine if r.role == role] or ([r for r in mine if r.role == "long"] if role == "main" else [])


def common_steps(cfg: dict[str, Any]) -> int:
    """The optimizer steps the config trains for (``max_steps``, ``train_step``, or a select/mix schedule's cycle)."""
    max_steps = cfg.get("max_steps")
    if isinstance(max_steps, int) and not isinstance(max_steps, bool) and max_steps > 0:
        return max_steps
    train_step = cfg.get("train_step")
    if isinstance(train_step, int) and not isinstance(train_step, bool) and train_step > 0:
        return train_step
    if cfg.get("train_type") in ("dynamic_select", "dynamic_mix"):
        warm, upd, times = cfg.get("warmup_step", 0) or 0, cfg.get("update_step") or 0, cfg.get("update_times")
        if isinstance(times, int) and times >= 0 and warm + upd * times > 0:
            epochs = float(cfg.get("num_train_epochs", 1.0) or 1.0)
            return max(1, math.ceil(epochs * (warm + upd * times) - 1e-9))
    raise ConfigError("max_steps: compare needs a fixed number of optimizer steps, the same for every method; "
                      "set max_steps (or train_step) in the config or as max_steps=N")


def _rows(path: Path) -> list[dict[str, Any]] | None:
    """The rows of a local JSON / JSON-lines dataset file (None: another format, not read here)."""
    if path.suffix == ".json":
        data = json.loads(path.read_text(encoding="utf-8"))
        return data if isinstance(data, list) else None
    if path.suffix == ".jsonl":
        return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    return None


def dataset_rows(cfg: dict[str, Any], key: str, what_of: dict[str, str] | None = None
                 ) -> dict[str, tuple[dict[str, Any], list[dict[str, Any]] | None]]:
    """``{name: (registry entry, rows or None)}`` for the datasets named by ``cfg[key]`` (local files only);
    ``what_of`` names the option behind a key in the messages."""
    what_of = what_of or {}
    from ..integration import dataset_registry

    dataset_dir = str(cfg.get("dataset_dir", "data"))
    registry = dataset_registry(dataset_dir) or {}
    out = {}
    for name in names(cfg.get(key)):
        entry = registry.get(name)
        if entry is None:
            raise ConfigError(f"{what_of.get(key, key)}: '{name}' is not registered in "
                              f"{os.path.join(dataset_dir, 'dataset_info.json')}")
        path = local_path(entry, dataset_dir)
        out[name] = (entry, _rows(path) if path is not None and path.is_file() else None)
    return out


def _content(row: dict[str, Any]) -> str:
    return json.dumps(row, sort_keys=True, ensure_ascii=False)


def check_eval_set(cfg: dict[str, Any], metric: str, options_column: str | None, what: str = "eval_dataset") -> int:
    """The eval set (``cfg["eval_dataset"]``) is there, held out (no row of it is a training row, by content)
    and can give the metric. Returns its number of rows (0 when it is not a local file). ``what``: the
    key or option that named the set, for the messages."""
    if not names(cfg.get("eval_dataset")):
        raise ConfigError("eval_dataset: compare needs a held-out eval set to measure the methods on; "
                          "add eval_dataset: NAME to the config (a dataset registered in dataset_info.json)")
    evals = dataset_rows(cfg, "eval_dataset", {"eval_dataset": what})
    trains = dataset_rows(cfg, "dataset")
    train_rows = {_content(r): name for name, (_, rows) in trains.items() for r in rows or [] if isinstance(r, dict)}
    count = 0
    for name, (entry, rows) in evals.items():
        for i, row in enumerate(rows or []):
            if isinstance(row, dict) and _content(row) in train_rows:
                raise ConfigError(f"{what}: row {i} of '{name}' is also a training row of "
                                  f"'{train_rows[_content(row)]}'; allowed: an eval set held out from the training data")
        count += len(rows or [])
        if metric in ("choice", "exact"):
            if entry.get("formatting", "alpaca") != "alpaca":
                raise ConfigError(f"--metric {metric}: eval dataset '{name}' is in {entry.get('formatting')} format; "
                                  "allowed: alpaca-format rows (a prompt and a reference answer)")
            if rows is None:
                raise ConfigError(f"--metric {metric}: eval dataset '{name}' is not a local JSON file; "
                                  "allowed: --metric loss")
        if metric == "choice":
            response = (entry.get("columns") or {}).get("response", "output")
            for i, row in enumerate(rows):
                options = row.get(options_column) if isinstance(row, dict) else None
                if not isinstance(options, list) or len(options) < 2:
                    raise ConfigError(f"--metric choice: row {i} of eval dataset '{name}' has no options column "
                                      f"'{options_column}' (a list of at least 2 answers); name it with --options "
                                      "COLUMN, or use --metric loss or exact")
                if row.get(response) not in options:
                    raise ConfigError(f"--metric choice: row {i} of eval dataset '{name}': its answer "
                                      f"({response}: {row.get(response)!r}) is not among its options")
    return count


def check_test_set(cfg: dict[str, Any], test_dataset: str) -> None:
    """``--test-dataset``: registered, and none of its rows is a row of the methods' eval set (a selector
    aimed at the rows it is measured on would be measured on its own target)."""
    if not names(test_dataset):
        raise ConfigError("--test-dataset: empty; allowed: the name of a dataset registered in dataset_info.json")
    tests = dataset_rows({**cfg, "eval_dataset": test_dataset}, "eval_dataset", {"eval_dataset": "--test-dataset"})
    seen = {_content(r): name for name, (_, rows) in dataset_rows(cfg, "eval_dataset").items()
            for r in rows or [] if isinstance(r, dict)} if names(cfg.get("eval_dataset")) else {}
    for name, (_, rows) in tests.items():
        for i, row in enumerate(rows or []):
            if isinstance(row, dict) and _content(row) in seen:
                raise ConfigError(f"--test-dataset: row {i} of '{name}' is also a row of the methods' eval set "
                                  f"'{seen[_content(row)]}'; allowed: a test set held out from eval_dataset")


def _method_spec(method: Method, path: Path, mode_section: str) -> ComponentSpec:
    specs = load_components(path)
    if method.name in specs[mode_section]:
        spec = specs[mode_section][method.name]
        if spec.error:
            raise ConfigError(spec.error)
        return spec
    others = [kind for kind, entries in specs.items() if method.name in entries]
    mode = BY_SECTION[mode_section]
    known = ", ".join([PLAIN, *sorted(specs[mode_section])])
    if others:
        other = BY_SECTION[others[0]]
        raise ConfigError(f"--methods: '{method.name}' is a {other.singular} (train_type: {other.train_type}); this "
                          f"config is train_type: {mode.train_type}; allowed: {known}")
    raise ConfigError(f"--methods: unknown method '{method.name}'; allowed: {known}")


QUICK_SEEDS, QUICK_STEPS, QUICK_EVAL_ROWS = 2, 20, 50


def prepare(config: str | os.PathLike, methods: str, *, seeds: int | None = None, budget: str = "steps",
            metric: str = "loss", out: str | os.PathLike | None = None, overrides: list[str] | None = None,
            options_column: str | None = None, eval_every: int | None = None, compute: str = "seconds",
            baseline: str | None = None, baseline_factor: float = 2.0, quick: bool = False,
            test_dataset: str | None = None, eval_extra: list[str] | None = None,
            reuse: list[str | os.PathLike] | None = None) -> Setup:
    """Check everything and plan every run (nothing is written, nothing is loaded).

    ``quick``: a small comparison - QUICK_SEEDS seeds unless ``seeds`` is given, at most QUICK_STEPS
    optimizer steps unless ``max_steps`` / ``train_step`` is overridden, one checkpoint per run (at its
    end) unless ``eval_every`` is given, and at most QUICK_EVAL_ROWS rows of each eval set measured.
    ``test_dataset``: measure on this registered set instead of the config's ``eval_dataset`` (which the
    methods may aim at). ``eval_extra``: ``NAME=DATASET`` (or ``DATASET``) sets measured as well, reported
    as metrics ``NAME:loss``, ``NAME:<metric>``. ``reuse``: folders of other comparisons whose finished runs
    with a run's key are taken instead of trained."""
    if seeds is None:
        seeds = QUICK_SEEDS if quick else 3
    if budget not in BUDGETS:
        raise ConfigError(f"--budget: '{budget}' is not supported; allowed: {', '.join(BUDGETS)}")
    if metric not in METRICS:
        raise ConfigError(f"--metric: '{metric}' is not supported; allowed: {', '.join(METRICS)}")
    if compute not in COMPUTE_UNITS:
        raise ConfigError(f"--compute: '{compute}' is not supported; allowed: {', '.join(COMPUTE_UNITS)}")
    if not isinstance(seeds, int) or seeds < 1:
        raise ConfigError(f"--seeds: {seeds} is invalid; allowed: an integer >= 1")
    if eval_every is not None and eval_every < 1:
        raise ConfigError(f"--eval-every: {eval_every} is invalid; allowed: an integer >= 1")
    if not baseline_factor >= 1.0:
        raise ConfigError(f"--baseline-factor: {baseline_factor} is invalid; allowed: a number >= 1")
    parsed = parse_methods(methods)
    config = Path(config)
    cfg = read_config(config, overrides)
    owned = [k for k in OWNED_KEYS if k in overrides_keys(overrides) and k not in ("max_steps", "train_step")]
    if owned:
        raise ConfigError(f"{owned[0]}: set by compare for every run; allowed: leave it out")
    train_type = cfg.get("train_type")
    if train_type is not None and train_type not in BY_TRAIN_TYPE:
        raise ConfigError(f"train_type: '{train_type}' is not supported; allowed: {', '.join(BY_TRAIN_TYPE)}")
    if train_type is None and any(m.name != PLAIN for m in parsed):
        other = next(m for m in parsed if m.name != PLAIN)
        raise ConfigError(f"--methods: '{other.name}' needs a DataFlex mode; the config has no train_type "
                          "(allowed there: plain)")
    mode = BY_TRAIN_TYPE.get(train_type)
    comp_path = resolve_components_path(cfg.get("components_cfg_file"), config.resolve().parent) if mode else None
    specs = {m: _method_spec(m, comp_path, mode.section) for m in parsed if m.name != PLAIN}
    for m, spec in specs.items():
        merged = ComponentSpec(spec.key, spec.kind, spec.name, {**spec.params, **m.params}, spec.source)
        try:
            build_component(merged, warn=False)
        except ConfigError as err:
            raise ConfigError(f"--methods: '{m.label}': {err}") from None
    if baseline is None:
        found = [m for name in BASELINES for m in parsed if m.name == name and not m.params]
        if not found:
            raise ConfigError("--methods: no baseline to compare with; add plain or random, or name one with --baseline")
        base = found[0]
    else:
        base = next((m for m in parsed if m.label == baseline), None)
        if base is None:
            raise ConfigError(f"--baseline: '{baseline}' is not among --methods; allowed: "
                              f"{', '.join(m.label for m in parsed)}")
    steps = common_steps(cfg)
    if quick and not overrides_keys(overrides) & {"max_steps", "train_step"}:
        steps = min(steps, QUICK_STEPS)
    if quick and eval_every is None:
        eval_every = steps
    measure_cfg = dict(cfg)
    if test_dataset is not None:
        measure_cfg["eval_dataset"] = test_dataset
        check_test_set(cfg, test_dataset)
    eval_rows = check_eval_set(measure_cfg, metric, options_column or "options",
                               "--test-dataset" if test_dataset is not None else "eval_dataset")
    extra_sets: dict[str, str] = {}
    for item in eval_extra or []:
        name, eq, dataset = item.partition("=")
        name, dataset = (name.strip(), dataset.strip()) if eq else (item.strip(), item.strip())
        if not name or not dataset or ":" in name or name in extra_sets:
            raise ConfigError(f"--eval-extra: '{item}' is invalid; allowed: NAME=DATASET (a registered dataset; "
                              "names unique, without ':')")
        check_eval_set({**cfg, "eval_dataset": dataset}, metric, options_column or "options", "--eval-extra")
        extra_sets[name] = dataset
    budgets = ["steps", "compute"] if budget == "both" else [budget]
    if eval_every is not None and steps % eval_every:
        raise ConfigError(f"--eval-every: {eval_every} does not divide the {steps} steps every method trains; "
                          f"allowed: a divisor of {steps}")
    every = eval_every or max(d for d in range(1, max(1, steps // 4) + 1) if steps % d == 0)
    base_steps = max(steps, math.ceil(steps * baseline_factor / every) * every) if "compute" in budgets else steps
    out = Path(out) if out is not None else Path("compare_out")
    reused = []
    for folder in reuse or []:
        folder = Path(folder)
        if not folder.is_dir():
            raise ConfigError(f"--reuse: '{folder}' is not a folder; allowed: the --out folder of another comparison")
        if folder.resolve() == out.resolve():
            raise ConfigError(f"--reuse: '{folder}' is this comparison's own --out (its finished runs count without "
                              "--reuse); allowed: another comparison's folder")
        reused.append(folder.resolve())
    seed0 = int(cfg.get("seed", 42))
    runs = []
    for m in parsed:
        roles = [("main", steps, "")] if "steps" in budgets or m != base else []
        if m == base and "compute" in budgets:
            roles.append(("long", base_steps, "-long" if "steps" in budgets else ""))
        for role, run_steps, suffix in roles:
            for k in range(seeds):
                folder = out / m.folder / f"seed-{k}{suffix}"
                run_cfg, comps = run_config(cfg, m, specs.get(m), comp_path, seed0 + k, run_steps, every, folder)
                runs.append(RunSpec(m, k, seed0 + k, role, run_steps, run_cfg, comps, folder))
    return Setup(config, cfg, parsed, base, seeds, budgets, metric, compute, steps, base_steps, every,
                 options_column or "options", out, runs, eval_rows, measure_cfg, extra_sets,
                 QUICK_EVAL_ROWS if quick else None, quick, reused)


def overrides_keys(overrides: list[str] | None) -> set[str]:
    return {o.partition("=")[0].strip() for o in overrides or []}


def run_config(cfg: dict[str, Any], method: Method, spec: ComponentSpec | None, comp_path: Path | None, seed: int,
               steps: int, every: int, out: Path) -> tuple[dict[str, Any], dict[str, Any] | None]:
    """The training config of one run, and the components file it needs (None: the config's own file)."""
    run = dict(cfg)
    for key in ("train_step", "resume_from_checkpoint"):
        run.pop(key, None)
    components = None
    if method.name == PLAIN:
        for key in DATAFLEX_KEYS:
            run.pop(key, None)
    else:
        run["component_name"] = method.name
        run["components_cfg_file"] = str(comp_path)
        # the entry itself is part of the key: editing its params in the file makes a new run. A method with
        # overrides trains from a components file of its own, written beside its config.
        name = spec.name
        if ".py:" in name and not os.path.isabs(name):
            name = str((spec.source.parent / name).resolve())
        components = {spec.kind: {spec.key: {"name": name, "params": {**spec.params, **method.params}}}}
    run.update({
        "seed": seed,
        "output_dir": str(out),
        "max_steps": steps,
        "save_strategy": "steps",
        "save_steps": every,
        "save_only_model": True,
        "overwrite_output_dir": True,
        "include_num_input_tokens_seen": "non_padding",
    })
    run.pop("save_total_limit", None)
    return run, components


def combine(main: Setup, others: list[tuple[Setup, str]]) -> Setup:
    """One comparison of ``main``'s methods and those of other setups (other modes, datasets or configs,
    one :func:`prepare` each) against ``main``'s baseline, measured on ``main``'s eval sets.

    Each other setup comes with a label prefix (``"weight "``: its method ``loss`` becomes ``weight loss``)
    and must share main's seeds, steps and checkpoints; prepare it with ``budget="steps"`` and an
    ``out`` folder of its own (its own baseline, needed by :func:`prepare`, is an ordinary method here)."""
    methods, runs = list(main.methods), list(main.runs)
    for setup, prefix in others:
        for key in ("seeds", "steps", "eval_every"):
            if getattr(setup, key) != getattr(main, key):
                raise ConfigError(f"combine: {setup.config} has {key} {getattr(setup, key)}, {main.config} "
                                  f"{getattr(main, key)}; allowed: the same {key} in every part")
        renamed = {m: replace(m, label=prefix + m.label) for m in setup.methods}
        clash = [m.label for m in renamed.values() if m.label in {x.label for x in methods}]
        if clash:
            raise ConfigError(f"combine: method '{clash[0]}' is in two parts; give one a prefix of its own")
        methods += renamed.values()
        runs += [replace(r, method=renamed[r.method]) for r in setup.runs if r.role == "main"]
    if len({str(r.out) for r in runs}) != len(runs):
        raise ConfigError("combine: two parts train into the same folder; allowed: an out folder of its own per part")
    return replace(main, methods=methods, runs=runs)
