"""Entry point of every training process: ``python -m dataflex.launcher CONFIG [key=value ...]``.

``dataflex-cli train`` builds the run plan (:func:`make_plan`) and runs it with
:func:`dataflex.integration.run_train` in its own process, or - for multi-process training - starts
``torchrun -m dataflex.launcher ...``: each child builds its plan once from the same YAML and
overrides, and patches LLaMA-Factory itself before its arguments are parsed.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Any

from .errors import ConfigError
from .log import setup_logging
from .values import names


def make_plan(config: str | os.PathLike, overrides: list[str] | None = None) -> Any:
    """Read, check and resolve a training config into its run plan. Raises ConfigError with a one-line message."""
    from . import integration
    from .plan import plan_from_file

    # DataFlex's own checks first: they need no LLaMA-Factory import, so most mistakes fail at once
    plan = plan_from_file(config, overrides)
    cfg = plan.cfg
    if os.environ.get("ALLOW_EXTRA_ARGS", "0").lower() not in ("1", "true", "y"):
        known = integration.known_train_keys()
        unknown = sorted(k for k in cfg if k not in known)
        if unknown:
            import difflib

            close = difflib.get_close_matches(unknown[0], known, n=1)
            hint = f"; did you mean '{close[0]}'?" if close else ""
            raise ConfigError(f"unknown key '{unknown[0]}' in {config}: not a LLaMA-Factory or DataFlex argument{hint}")
    if plan.mode is not None:
        check_datasets(cfg)
        check_models(plan)
        check_outputs(plan)
    return plan


def check_datasets(cfg: dict[str, Any]) -> None:
    """Every dataset name is registered and every local file exists (LLaMA-Factory's own registry parser)."""
    from .integration import dataset_entry, dataset_registry

    dataset_dir = cfg.get("dataset_dir", "data")
    if dataset_dir == "ONLINE" or str(dataset_dir).startswith("REMOTE:"):
        return  # the hub decides; nothing local to check
    registry = dataset_registry(dataset_dir)
    if registry is None:
        raise ConfigError(f"dataset_dir: '{dataset_dir}' has no dataset_info.json (run from the folder your YAML's "
                          "paths are relative to, or set dataset_dir)")
    for key in ("dataset", "eval_dataset", "mixer_eval_dataset"):
        for name in names(cfg.get(key)):
            if name not in registry:
                raise ConfigError(f"{key}: '{name}' is not registered in {os.path.join(dataset_dir, 'dataset_info.json')}; "
                                  f"registered: {', '.join(sorted(registry))}")
            try:
                attr = dataset_entry(name, dataset_dir)
            except (ValueError, KeyError) as err:
                raise ConfigError(f"{key}: dataset '{name}' is not usable: {err}") from None
            if attr.load_from == "file":
                path = os.path.join(dataset_dir, attr.dataset_name)
                if not os.path.exists(path):
                    raise ConfigError(f"{key}: dataset '{name}' is registered as {path}, which does not exist; add the "
                                      "file (LLaMA-Factory's demo files live in its data/ folder) or use a "
                                      "hub-registered dataset")


def check_models(plan: Any) -> None:
    """What the component says it needs of the model, checked on configs and tokenizers before anything is loaded."""
    cfg, spec, component = plan.cfg, plan.spec, plan.component
    needs = component.needs
    model_path = cfg.get("model_name_or_path")
    if ("router" in needs or cfg.get("freeze_gate")) and model_path:
        from .scoring.reference import num_experts

        config = _auto_config(model_path, cfg)
        if config is not None and num_experts(config) is None:
            what = f"mixer '{component.name}'" if "router" in needs else "freeze_gate: true"
            raise ConfigError(f"model_name_or_path: {what} needs a mixture-of-experts model that reports router "
                              f"logits (Qwen2-MoE, Mixtral, ...); '{model_path}' ({config.model_type}) has no experts")
    ref = component.reference_model_path
    if ref and model_path:
        ours, theirs = _auto_config(model_path, cfg), _auto_config(ref, cfg)
        if ours is not None and theirs is not None and getattr(ours, "vocab_size", None) != getattr(theirs, "vocab_size", None):
            raise ConfigError(f"component '{spec.key}': param 'reference_model_path' = '{ref}' has a vocabulary of "
                              f"{theirs.vocab_size} tokens, the model {ours.vocab_size}; allowed: a reference trained "
                              "with the same tokenizer (DoReMi step 1)")
        _check_same_tokenizer(model_path, ref, spec.key)


def _auto_config(path: str, cfg: dict[str, Any]):
    try:
        from transformers import AutoConfig

        return AutoConfig.from_pretrained(path, trust_remote_code=bool(cfg.get("trust_remote_code", False)))
    except Exception:  # noqa: BLE001 - unreachable hub model etc.: LLaMA-Factory reports it when loading
        return None


def _check_same_tokenizer(model_path: str, ref_path: str, component: str) -> None:
    if not any((Path(ref_path) / f).is_file() for f in ("tokenizer.json", "tokenizer_config.json", "vocab.json")):
        return  # no tokenizer saved with the reference: the vocabulary size check above is all there is
    try:
        from transformers import AutoTokenizer

        ours = AutoTokenizer.from_pretrained(model_path).get_vocab()
        theirs = AutoTokenizer.from_pretrained(ref_path).get_vocab()
    except Exception:  # noqa: BLE001 - a tokenizer that cannot be loaded here: LLaMA-Factory will say so
        return
    if ours != theirs:
        differ = len(set(ours.items()) ^ set(theirs.items()))
        raise ConfigError(f"component '{component}': param 'reference_model_path' = '{ref_path}' was trained with "
                          f"another tokenizer ({differ} vocabulary entries differ); allowed: the reference of DoReMi "
                          "step 1, trained with this model's tokenizer")


def check_outputs(plan: Any) -> None:
    """The folders a run writes into can be written (before any model is loaded); nothing is left behind
    when one of them cannot."""
    import shutil

    from .core.records import check_writable

    cfg, spec = plan.cfg, plan.spec
    output_dir = cfg.get("output_dir")
    if not output_dir:
        raise ConfigError("output_dir: required")
    cache_dir = plan.component.params.cache_dir
    created = [p for p in (Path(output_dir), Path(cache_dir) if cache_dir else None) if p is not None and not p.exists()]
    try:
        check_writable(output_dir, "output_dir")
        if cache_dir:
            check_writable(cache_dir, f"component '{spec.key}': param 'cache_dir'")
    except ConfigError:
        for path in created:
            shutil.rmtree(path, ignore_errors=True)
        raise


def main(argv: list[str] | None = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv:
        raise SystemExit("usage: python -m dataflex.launcher CONFIG.yaml [key=value ...]")
    setup_logging()
    from .errors import DataFlexError
    from .integration import Run, run_train

    try:
        run_train(Run(make_plan(argv[0], argv[1:])))
    except DataFlexError as err:
        # one line per process; the failing rank has already logged the full traceback
        rank = os.environ.get("RANK")
        prefix = f"[rank {rank}] " if rank is not None else ""
        print(f"{prefix}dataflex-cli: error: {err}", file=sys.stderr, flush=True)
        raise SystemExit(1) from None
    exit_without_teardown()


def exit_without_teardown(code: int = 0) -> None:
    """End a finished torchrun worker without the interpreter's shutdown.

    After a distributed run, native threads of the process group are still alive when the
    interpreter shuts down: ``destroy_process_group`` does not stop gloo's transport threads once
    DDP has wrapped a model (its C++ reducer keeps the group's devices), so they run while Python
    tears itself down - the state in which a rank that finishes first can abort with ``terminate
    called without an active exception`` (SIGABRT), and torchrun then kills the others before the
    final model is written. All ranks have passed a barrier after the last file was written
    (:mod:`dataflex.integration`), so nothing is lost by ending here: the ``atexit`` handlers run
    (logging, trackers such as wandb), the streams are flushed, then the process exits at once.
    """
    import atexit
    import logging

    if os.environ.get("RANK") is None:  # not a torchrun worker: the normal exit
        raise SystemExit(code)
    try:
        atexit._run_exitfuncs()
        logging.shutdown()
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)


if __name__ == "__main__":
    main()
