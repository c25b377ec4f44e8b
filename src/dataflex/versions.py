"""The installed versions of DataFlex and the libraries it drives (the CLI, run.json, benchmarks)."""

from __future__ import annotations

# run.json records these (what decides a run's numbers); `dataflex-cli version` shows all
RECORDED = ("dataflex", "llamafactory", "transformers", "torch")
PACKAGES = RECORDED + ("peft", "accelerate", "deepspeed")


def versions(packages: tuple[str, ...] = PACKAGES) -> dict[str, str | None]:
    """``{package: version}``; None for a package that is not installed."""
    from importlib.metadata import PackageNotFoundError, version

    out: dict[str, str | None] = {}
    for pkg in packages:
        try:
            out[pkg] = version(pkg)
        except PackageNotFoundError:
            out[pkg] = None
    return out
