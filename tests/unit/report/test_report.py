"""``dataflex-cli report`` without a training stack: the mode table's report side is complete, the
report imports no torch, a moved or copied run reports as in place, and damaged records are named."""

from __future__ import annotations

import inspect
import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from support.helpers import REPO_ROOT, failure_report

from dataflex.modes import TABLE
from dataflex.report.modes import REQUIRED

KIT = REPO_ROOT / "src" / "dataflex" / "report"


# --------------------------------------------------------------------------- the mode table
@pytest.mark.parametrize("mode", TABLE, ids=[m.name for m in TABLE])
def test_every_mode_in_the_table_has_everything_it_needs(mode):
    from dataflex.component import Component
    from dataflex.components_file import available
    from dataflex.modes.base import Mode, ModeChecks

    kit = mode.report_module()
    assert kit.__name__ == f"dataflex.report.modes.{mode.name}"
    missing = [name for name in REQUIRED if not hasattr(kit, name)]
    assert not missing, f"{kit.__name__} lacks {missing}"
    arity = {"summary": 4, "sections": 5, "decision_steps": 2, "plot": 3, "export_refusal": 1}
    for name, count in arity.items():
        assert len(inspect.signature(getattr(kit, name)).parameters) == count, name
    assert isinstance(kit.ROW_TEXT, bool) and isinstance(kit.GROUP_BY, bool)
    assert mode.plot_file.endswith(".png")
    cls = mode.mode_class()  # the Mode protocol, method by method, and the class-level checks
    protocol = [name for name in vars(Mode) if not name.startswith("_") and callable(vars(Mode)[name])]
    assert protocol and not [name for name in protocol if not callable(getattr(cls, name, None))]
    assert issubclass(cls, ModeChecks)
    assert issubclass(mode.base_class(), Component)
    assert mode.package().__name__ == f"dataflex.{mode.section}"
    assert available(mode.section), f"no built-in {mode.singular}"
    assert (REPO_ROOT / "docs" / mode.section).is_dir()
    assert not hasattr(mode.module, "plot"), "the plot belongs to the mode's report module"


def test_the_table_names_each_file_and_report_module_once():
    for field in ("name", "train_type", "section", "plot_file", "report"):
        values = [getattr(m, field) for m in TABLE]
        assert len(set(values)) == len(values), field


def test_the_report_kit_names_no_mode():
    names = {m.name for m in TABLE} | {m.train_type for m in TABLE}
    for path in sorted(KIT.glob("*.py")):
        found = set(re.findall(r"""["']([a-z_]+)["']""", path.read_text())) & names
        assert not found, f"{path.relative_to(REPO_ROOT)} names {sorted(found)}"


def test_each_report_module_draws_its_plot_from_an_empty_run():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    run = {"name": "toy", "train_size": 4, "schedule": {"total_steps": 4, "updates": [], "warmup_step": 1}}
    for mode in TABLE:
        fig = mode.report_module().plot(plt, run, [])
        assert fig.axes, mode.name
        plt.close(fig)


# --------------------------------------------------------------------------- hand-made runs
def make_run(folder: Path, mode: str = "select", steps=(3, 5), weights: int = 0) -> Path:
    """An output_dir as a run leaves it (manifest with absolute paths, records in <out>/dataflex/<run id>)."""
    out = folder / "out"
    rec = out / "dataflex" / "run-1"
    rec.mkdir(parents=True)
    data = folder / "data"
    data.mkdir()
    (data / "rows.json").write_text(json.dumps([{"instruction": f"q{i}", "output": f"a{i}"} for i in range(8)]))
    (data / "dataset_info.json").write_text(json.dumps({"toy": {"file_name": "rows.json"}}))
    manifest = {"run_id": "run-1", "records": str(rec.resolve()), "train_type": f"dynamic_{mode}", "mode": mode,
                "component": "toy", "name": "toy", "params": {}, "train_size": 8, "output_dir": str(out.absolute()),
                "global_batch": 2, "setup": {"train_data": "x"},
                "data_sources": {"dataset_dir": str(data), "parts": [["toy", 0, 8]]},
                "schedule": {"warmup_step": 1, "update_step": 2, "update_times": 1, "global_batch": 2,
                             "total_steps": 6, "updates": list(steps)}}
    (out / "dataflex" / "run.json").write_text(json.dumps(manifest))
    for k, step in enumerate(steps):
        (rec / f"step_{step}.json").write_text(json.dumps(
            {"run_id": "run-1", "step": step, "selection": k, "kind": "selection", "indices": [k, k + 1],
             "per_sample": {"loss": [0.5 + k, 0.25]}}))
    if weights:
        (rec / "weights.jsonl").write_text("".join(json.dumps(
            {"step": s, "indices": [0, 1], "weights": [1.5, 0.5], "ess": 1.6, "std": 0.5, "min": 0.5, "max": 1.5})
            + "\n" for s in range(1, weights + 1)))
    (out / "trainer_log.jsonl").write_text("".join(json.dumps({"current_steps": s, "loss": 1.0 / s}) + "\n"
                                                   for s in range(1, 7)))
    (out / "train_results.json").write_text(json.dumps({"train_runtime": 3.0}))
    return out


def report(run_cli, *args) -> subprocess.CompletedProcess:
    res = run_cli(["report", *args], timeout=60)
    assert res.returncode == 0, failure_report(res)
    return res


def test_the_report_imports_no_torch(tmp_path):
    """`dataflex-cli report` (text, HTML, export) and every mode's report module, in a fresh process."""
    select, weight = make_run(tmp_path / "s"), make_run(tmp_path / "w", mode="weight", steps=(), weights=3)
    code = ("import sys\nfrom dataflex.cli import app\nfrom dataflex.modes import TABLE\n"
            "def cli(*args):\n    try:\n        app(list(args))\n    except SystemExit as e:\n"
            "        assert e.code in (0, None), e.code\n"
            f"cli('report', {str(select)!r}, '--html', {str(tmp_path / 'p.html')!r}, '--export-dataset', "
            f"{str(tmp_path / 'export')!r})\n"
            f"cli('report', {str(weight)!r}, '--html', {str(tmp_path / 'w.html')!r})\n"
            "kits = [m.report_module() for m in TABLE]\n"
            "heavy = sorted(m for m in ('torch', 'transformers', 'llamafactory', 'datasets') if m in sys.modules)\n"
            "assert not heavy, heavy\nprint('ok')\n")
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert res.returncode == 0 and res.stdout.strip().endswith("ok"), res.stdout + res.stderr
    assert (tmp_path / "p.html").stat().st_size > 1000 and (tmp_path / "w.html").stat().st_size > 1000
    assert (tmp_path / "export" / "dataset_info.json").is_file()


def test_a_copied_run_reads_its_own_records_and_a_moved_one_reads_as_in_place(tmp_path, run_cli):
    out = make_run(tmp_path / "trained")
    in_place = report(run_cli, out).stdout
    assert "Selections (2 recorded):" in in_place and f"DataFlex run run-1 in {out.absolute()}\n" in in_place
    # a copy beside the original reads the copy's records, not the original's
    copy = tmp_path / "laptop" / "run"
    shutil.copytree(out, copy)
    (copy / "dataflex" / "run-1" / "step_5.json").unlink()
    text = report(run_cli, copy).stdout
    assert "Selections (1 recorded, missing steps [5]):" in text
    assert f"DataFlex run run-1 in {copy.resolve()} (trained in {out.absolute()})\n" in text
    assert f"records {copy.resolve() / 'dataflex' / 'run-1'}\n" in text
    # the original moved away: the moved folder reports exactly as in place, but for the paths
    moved = tmp_path / "moved"
    out.rename(moved)
    text = report(run_cli, moved).stdout
    assert text.replace(f"{moved.resolve()} (trained in {out.absolute()})", str(out.absolute())).replace(
        str(moved.resolve() / "dataflex"), str(out.absolute() / "dataflex")) == in_place
    # --compare and the folder holding run.json work on moved runs too
    page = tmp_path / "p.html"
    report(run_cli, moved / "dataflex", "--html", page, "--compare", copy)
    html = page.read_text()
    assert 'data-only-a="1"' in html and 'data-only-b="0"' in html and 'data-both="2"' in html


def test_a_moved_weight_run_reads_its_lines(tmp_path, run_cli):
    out = make_run(tmp_path / "trained", mode="weight", steps=(), weights=4)
    in_place = report(run_cli, out).stdout
    moved = tmp_path / "moved"
    out.rename(moved)
    text = report(run_cli, moved).stdout
    assert "4 weighted step(s) recorded" in text
    assert text.splitlines()[3:] == in_place.splitlines()[3:]


def test_damaged_records_are_named_not_counted_as_missing(tmp_path, run_cli):
    out = make_run(tmp_path / "a", steps=(3, 5, 7))
    (out / "dataflex" / "run-1" / "step_5.json").write_text('{"run_id": "run-1", "step": 5, "ind')
    (out / "dataflex" / "run-1" / "step_7.json").unlink()
    text = report(run_cli, out).stdout
    assert "Selections (1 recorded, missing steps [7]):" in text
    assert text.endswith("\nDamaged records, not counted (1):\n"
                         "  step_5.json (not valid JSON: Unterminated string starting at: line 1 column 32 (char 31))\n")
    weight = make_run(tmp_path / "b", mode="weight", steps=(), weights=3)
    lines = weight / "dataflex" / "run-1" / "weights.jsonl"
    lines.write_text(lines.read_text()[:-20])  # a crash in the middle of the last line
    text = report(run_cli, weight).stdout
    assert "2 weighted step(s) recorded" in text
    assert "\nDamaged records, not counted (1):\n  weights.jsonl line 3 (not valid JSON: " in text
    page = tmp_path / "p.html"
    report(run_cli, weight, "--html", page)
    assert "<th>damaged records</th><td>weights.jsonl line 3 (not valid JSON: " in page.read_text()


def test_records_outside_a_moved_run_are_reported_as_not_found(tmp_path, run_cli):
    out = make_run(tmp_path / "trained")
    manifest = json.loads((out / "dataflex" / "run.json").read_text())
    cache = tmp_path / "cache" / "run-1"
    shutil.move(out / "dataflex" / "run-1", cache)  # cache_dir outside the output dir
    manifest["records"] = str(cache)
    (out / "dataflex" / "run.json").write_text(json.dumps(manifest))
    assert "Selections (2 recorded):" in report(run_cli, out).stdout
    shutil.rmtree(cache)
    text = report(run_cli, out).stdout
    assert "Selections (0 recorded, missing steps [3, 5]):" in text
    assert text.endswith(f"\nNot found: records folder {cache} not found\n")


def test_a_weight_run_whose_weights_hardly_moved_says_so():
    """The weight report notes a run whose weights all stayed in a band narrower than NEAR_UNIFORM_WEIGHTS
    (it trained almost as plain training); a run with spread weights gets no note."""
    from dataflex.report.modes.weight import summary
    from dataflex.values import NEAR_UNIFORM_WEIGHTS

    run = {"schedule": {"warmup_step": 0}}

    def lines(low, high):
        return [{"step": s, "indices": [0, 1], "weights": [low, high], "min": low, "max": high, "std": (high - low) / 2,
                 "ess": 2.0} for s in range(3)]

    flat = summary(run, lines(0.995, 1.005), top=2)
    assert "  weights ranged from 0.9950 to 1.0050" in flat
    assert sum(line.startswith("  note: the weights hardly moved from 1") for line in flat) == 1
    edge = 1 + NEAR_UNIFORM_WEIGHTS / 2
    assert not any("hardly moved" in line for line in summary(run, lines(2 - edge, edge), top=2))
    assert not any("hardly moved" in line for line in summary(run, lines(0.8, 1.2), top=2))
