"""Entry point of every training process: ``python -m dataflex.launcher CONFIG [key=value ...]``.

``dataflex-cli train`` runs :func:`prepare` + :func:`dataflex.integration.run_train` in its own
process, or - for multi-process training - starts ``torchrun -m dataflex.launcher ...`` so each
child installs the LLaMA-Factory patches itself before parsing its arguments.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Any

from .args import read_config, validate_config
from .errors import ConfigError
from .log import setup_logging


def prepare(config: str | os.PathLike, overrides: list[str] | None = None) -> dict[str, Any]:
    """Read, check and resolve a training config. Raises ConfigError with a one-line message."""
    from . import integration

    cfg = read_config(config, overrides)
    # DataFlex's own checks first: they need no LLaMA-Factory import, so most mistakes fail at once
    cfg = validate_config(cfg, yaml_dir=Path(config).resolve().parent)
    if os.environ.get("ALLOW_EXTRA_ARGS", "0").lower() not in ("1", "true", "y"):
        known = integration.known_train_keys()
        unknown = sorted(k for k in cfg if k not in known)
        if unknown:
            import difflib

            close = difflib.get_close_matches(unknown[0], known, n=1)
            hint = f"; did you mean '{close[0]}'?" if close else ""
            raise ConfigError(f"unknown key '{unknown[0]}' in {config}: not a LLaMA-Factory or DataFlex argument{hint}")
    if cfg.get("train_type") is not None:
        _check_datasets(cfg)
    return cfg


def _check_datasets(cfg: dict[str, Any]) -> None:
    from .integration import registered_datasets

    dataset_dir = cfg.get("dataset_dir", "data")
    known = registered_datasets(dataset_dir)
    if known is None:
        return  # ONLINE / remote dataset_dir, or no local registry: LLaMA-Factory decides
    for key in ("dataset", "eval_dataset"):
        value = cfg.get(key)
        if not value:
            continue
        names = value if isinstance(value, list) else [n.strip() for n in str(value).split(",")]
        for name in names:
            if name not in known:
                raise ConfigError(
                    f"{key}: '{name}' is not registered in {os.path.join(dataset_dir, 'dataset_info.json')}; "
                    f"registered: {', '.join(sorted(known))}"
                )
            attrs = known[name] if isinstance(known, dict) else {}
            remote = any(k in attrs for k in ("hf_hub_url", "ms_hub_url", "om_hub_url", "script_url", "cloud_file_name"))
            file_name = attrs.get("file_name")
            if file_name and not remote and not os.path.exists(os.path.join(dataset_dir, file_name)):
                raise ConfigError(
                    f"{key}: dataset '{name}' is registered as {os.path.join(dataset_dir, file_name)}, which does not "
                    f"exist; add the file (LLaMA-Factory's demo files live in its data/ folder) or use a "
                    f"hub-registered dataset"
                )


def main(argv: list[str] | None = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv:
        raise SystemExit("usage: python -m dataflex.launcher CONFIG.yaml [key=value ...]")
    setup_logging()
    from .errors import DataFlexError
    from .integration import run_train

    try:
        run_train(prepare(argv[0], argv[1:]))
    except DataFlexError as err:
        # one line per process; the failing rank has already logged the full traceback
        rank = os.environ.get("RANK")
        prefix = f"[rank {rank}] " if rank is not None else ""
        print(f"{prefix}dataflex-cli: error: {err}", file=sys.stderr, flush=True)
        raise SystemExit(1) from None


if __name__ == "__main__":
    main()
