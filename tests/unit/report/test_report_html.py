"""``dataflex-cli report --html``: the page builder on hand-made runs, and real runs rendered in Chromium."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pytest
from support.helpers import REPO_ROOT, failure_report

from dataflex.report import svg
from dataflex.report.page import build_page, overlap
from dataflex.report.svg import downsample

EVIL = "<script>alert('x')</script> and </table><b>bold</b>"


# --------------------------------------------------------------------------- hand-made runs
def fake_run(folder: Path, mode: str = "select", records: Sequence[dict[str, Any]] = (),
             weights: Sequence[dict[str, Any]] = (), rows: Sequence[dict[str, Any]] | None = None,
             losses: Sequence[float] = (1.0, 0.9, 0.8, 0.7), finished: bool = True, dataset_dir: Path | None = None,
             schedule: dict[str, Any] | None = None, parts: list | None = None, **extra: Any) -> Path:
    """An output_dir holding what a run writes: manifest, records, trainer_log.jsonl, train_results.json."""
    out = folder / "out"
    rec_dir = out / "dataflex" / "run-1"
    rec_dir.mkdir(parents=True)
    if rows is None:
        rows = [{"instruction": f"question {i}", "input": "", "output": f"answer {i}", "task": "ab"[i % 2]}
                for i in range(10)]
    if dataset_dir is None:
        dataset_dir = folder / "data"
        dataset_dir.mkdir()
        (dataset_dir / "rows.json").write_text(json.dumps(list(rows)))
        (dataset_dir / "dataset_info.json").write_text(json.dumps({"toy": {"file_name": "rows.json"}}))
    manifest = {
        "run_id": "run-1", "records": str(rec_dir), "train_type": f"dynamic_{mode}", "mode": mode,
        "component": "toy", "name": "toy", "params": {"alpha": 1}, "train_size": len(rows),
        "output_dir": str(out), "global_batch": 4, "setup": {"train_data": "same"},
        "data_sources": {"dataset_dir": str(dataset_dir), "parts": parts or [["toy", 0, len(rows)]]},
        "schedule": schedule or {"warmup_step": 1, "update_step": 1, "update_times": 1, "global_batch": 4,
                                 "total_steps": len(losses), "updates": [r["step"] for r in records]},
        **extra,
    }
    (out / "dataflex" / "run.json").write_text(json.dumps(manifest))
    for rec in records:
        (rec_dir / f"step_{rec['step']}.json").write_text(json.dumps({"run_id": "run-1", **rec}))
    if weights:
        (rec_dir / "weights.jsonl").write_text("".join(json.dumps(w) + "\n" for w in weights))
    (out / "trainer_log.jsonl").write_text("".join(
        json.dumps({"current_steps": s + 1, "loss": v}) + "\n" for s, v in enumerate(losses)))
    if finished:
        (out / "train_results.json").write_text(json.dumps({"train_runtime": 10.0, "dataflex_seconds": 2.5}))
    return out


def selection(step: int, indices: list[int], scores: list[float] | None = None, k: int = 0, **summary) -> dict:
    return {"kind": "selection", "step": step, "selection": k, "indices": indices, "seconds": 0.1,
            "per_sample": {"loss": scores} if scores else {}, "summary": summary}


def charts(page: str) -> dict[str, int]:
    return {m.group(1): int(m.group(2)) for m in re.finditer(r'data-chart="([^"]+)" data-points="(\d+)"', page)}


def test_dataset_text_is_escaped(tmp_path):
    rows = [{"instruction": EVIL, "input": "", "output": "</td></tr></table><script>x()</script>"}] * 3
    out = fake_run(tmp_path, records=[selection(1, [0, 1, 2], [0.5, 0.4, 0.3])], rows=rows)
    page = build_page(out)
    assert "<script>alert" not in page and "<b>bold" not in page
    assert page.count("<script>") == 1  # only the page's own
    assert page.count("<table") == page.count("</table>")
    assert "&lt;script&gt;alert(&#x27;x&#x27;)&lt;/script&gt; and &lt;/table&gt;&lt;b&gt;bold&lt;/b&gt;" in page
    assert "&lt;/td&gt;&lt;/tr&gt;&lt;/table&gt;&lt;script&gt;x()&lt;/script&gt;" in page


def test_select_page_sections_and_numbers(tmp_path):
    recs = [selection(1, [0, 1, 1, 2], [0.9, 0.8, 0.8, 0.1], k=0,
                      pool_scores={"indices": list(range(10)), "values": [0.1 * i for i in range(10)]}),
            selection(2, [1, 3, 4, 5], [0.7, 0.6, 0.5, 0.2], k=1)]
    out = fake_run(tmp_path, records=recs, resumed_from="/runs/x/checkpoint-1", resumed_at=1,
                   versions={"dataflex": "9.9", "torch": None})
    page = build_page(out, group_by="task", top=3)
    assert "/runs/x/checkpoint-1 (step 1)" in page and "dataflex 9.9, torch -" in page
    for sid in ("header", "loss", "selections", "scores", "composition", "picks"):
        assert f'<section id="{sid}">' in page
    c = charts(page)
    assert c["loss"] == 4 and c["scores"] == 3  # pool + picks at step 1, picks at step 2
    assert c["composition-dataset"] == 2 and c["composition-group"] == 2
    # selection 1: 4 rows, 3 unique, 1 repeat
    assert "<td>1</td><td>1</td><td>4</td><td>3</td><td>1</td>" in page
    # top 3 / bottom 3 by mean score: row 0 (0.9), row 1 ((0.8+0.8+0.7)/3), row 3 (0.6); bottom: 2, 5, 4
    picks = page.split('<section id="picks">')[1]
    top, bottom = picks.split("<h3>bottom")
    assert re.findall(r"<tr><td>(\d+)</td>", top) == ["0", "1", "3"]
    assert re.findall(r"<tr><td>(\d+)</td>", bottom) == ["2", "5", "4"]
    assert "question 3" in top and "answer 3" in top
    assert "decisions 2.50 s (25.0% of the run)" in page


def test_tables_and_series_are_capped(tmp_path):
    recs = [selection(s, [s % 50, (s * 7) % 50], [float(s), float(s) / 2], k=s) for s in range(1, 301)]
    rows = [{"instruction": f"q{i}", "output": "a"} for i in range(50)]
    out = fake_run(tmp_path, records=recs, rows=rows, losses=[1 / (s + 1) for s in range(5000)])
    page = build_page(out, top=4)
    c = charts(page)
    assert c["loss"] == svg.MAX_POINTS
    assert c["composition-dataset"] == svg.MAX_BARS
    assert c["scores"] <= svg.MAX_BARS
    picks = page.split('<section id="picks">')[1]
    assert len(re.findall(r"<tr><td>\d+</td>", picks)) == 8
    selections = page.split('<section id="selections">')[1].split("</section>")[0]
    assert selections.count("<tr>") == 1 + 8  # header + 2 * top, evenly spaced
    assert len(page) < 300_000


def test_downsample_keeps_ends_and_spacing():
    assert downsample(list(range(10)), 20) == list(range(10))
    got = downsample(list(range(1001)), 11)
    assert got == list(range(0, 1001, 100))


def test_compare_overlap_and_composition(tmp_path):
    a = fake_run(tmp_path / "a", records=[selection(1, [1, 2, 3, 3]), selection(2, [2, 7])])
    b = fake_run(tmp_path / "b", records=[selection(1, [3, 4]), selection(2, [4, 8, 9])])
    assert overlap({1: 1, 2: 2, 3: 2, 7: 1}, {3: 1, 4: 2, 8: 1, 9: 1}) == {
        "both": 1, "only_a": 3, "only_b": 3, "jaccard": 1 / 7}
    page = build_page(a, compare=b)
    assert 'data-both="1" data-only-a="3" data-only-b="3"' in page
    c = charts(page)
    assert c["compare-loss"] == 8 and c["compare-composition"] == 2


def test_unreadable_dataset_shows_indices_and_why(tmp_path):
    out = fake_run(tmp_path, records=[selection(1, [4, 5])], dataset_dir=tmp_path / "gone")
    page = build_page(out)
    assert "row text not shown" in page and "dataset_info.json is not readable" in page
    assert re.findall(r"<tr><td>(\d+)</td>", page.split('<section id="picks">')[1])[:2] == ["4", "5"]


def test_mix_page_doremi_and_odm(tmp_path):
    def mix(step, props, **summary):
        return {"kind": "update", "step": step, "num_steps": 2, "domains": ["a", "b"], "proportions": props,
                "counts": [3, 1], "loss_weights": [0.6, 0.4], "indices": [], "summary": summary,
                "statistics": {"loss_sum": [6.0, 2.0], "tokens": [3.0, 0.0], "excess_sum": [0, 0], "samples": [3, 0]}}

    recs = [mix(0, [0.5, 0.5]), mix(2, [0.7, 0.3], excess_loss=[0.2, 0.1], average_domain_weights=[0.6, 0.4],
                                    rewards=[1.0, 2.0])]
    out = fake_run(tmp_path, mode="mix", records=recs, parts=[["a", 0, 5], ["b", 5, 10]],
                   schedule={"warmup_step": 0, "update_step": 2, "total_steps": 4, "updates": [2]})
    page = build_page(out)
    c = charts(page)
    assert c["proportions"] == 2
    assert c["domain-loss"] == 2  # domain b saw no tokens: no point
    assert c["loss-weights"] == 4 and c["excess-loss"] == 2 and c["average-weights"] == 2 and c["rewards"] == 2
    assert "a 6 (75.0%), b 2 (25.0%)" in page


def test_weight_page_quantiles_and_extremes(tmp_path):
    weights = [{"step": 1, "indices": [0, 1, 2, 3, 4], "weights": [0.5, 1.0, 1.0, 1.0, 1.5]},
               {"step": 2, "indices": [5, 6, 7, 8, 9], "weights": [0.2, 0.9, 1.0, 1.1, 1.8]}]
    out = fake_run(tmp_path, mode="weight", weights=weights, schedule={"warmup_step": 1, "global_batch": 5})
    page = build_page(out, top=2)
    assert charts(page)["weights"] == 2
    heavy = page.split('<section id="heavy">')[1]
    top, bottom = heavy.split("<h3>lightest")
    assert re.findall(r"<tr><td>(\d+)</td>", top) == ["9", "4"]
    assert re.findall(r"<tr><td>(\d+)</td>", bottom) == ["5", "0"]


def test_reorder_page_groups_the_rows_consumed_by_a_column_per_block_of_steps(tmp_path):
    """Rows alternate task a / b; an order that took only a rows for steps 1-2 and only b rows for steps 3-4 (a loss
    order on a labelled set does this) shows as all-a then all-b bars, one per step here; a longer run's steps are
    cut into at most BLOCKS blocks of consecutive steps."""
    from dataflex.report.modes import reorder

    order = [(1, [0, 2]), (2, [4, 6]), (3, [1, 3]), (4, [5, 7]), (5, [8, 9])]
    lines = [{"step": st, "epoch": 0, "position": 0, "indices": ix, "scores": [0.1] * len(ix)} for st, ix in order]
    out = fake_run(tmp_path, mode="reorder", schedule={"warmup_step": 0, "total_steps": 5, "updates": [1]})
    (out / "dataflex" / "run-1" / "order.jsonl").write_text("".join(json.dumps(ln) + "\n" for ln in lines[::-1]))
    page = build_page(out, group_by="task")
    assert '<section id="composition"><h2>Rows consumed by task</h2>' in page
    assert charts(page)["composition-group"] == 5
    bars = re.findall(r"<title>(\d+): (\w) (\d+) \(([\d.]+)%\)</title>", page)
    assert bars == [("1", "a", "2", "100.0"), ("2", "a", "2", "100.0"), ("3", "b", "2", "100.0"),
                    ("4", "b", "2", "100.0"), ("5", "a", "1", "50.0"), ("5", "b", "1", "50.0")]
    assert [[ln["step"] for ln in b] for b in reorder.blocks(lines[::-1], most=2)] == [[1, 2, 3], [4, 5]]
    assert [[ln["step"] for ln in b] for b in reorder.blocks(lines, most=3)] == [[1, 2], [3, 4], [5]]
    assert '<section id="composition">' not in build_page(out)


# --------------------------------------------------------------------------- CLI errors
def test_cli_errors_name_the_flag_and_write_nothing(tmp_path, run_cli):
    out = fake_run(tmp_path / "a", records=[selection(1, [0, 1])])
    page = tmp_path / "page.html"
    res = run_cli(["report", out, "--html", page, "--group-by", "nope"])
    assert res.returncode == 2 and res.stderr.startswith("dataflex-cli: error: --group-by: no column 'nope'")
    assert len(res.stderr.strip().splitlines()) == 1
    res = run_cli(["report", out, "--html", page, "--compare", tmp_path / "missing"])
    assert res.returncode == 2 and res.stderr.startswith("dataflex-cli: error: --compare: no DataFlex run found")
    unfinished = fake_run(tmp_path / "b", records=[selection(1, [0])], finished=False)
    res = run_cli(["report", out, "--html", page, "--compare", unfinished])
    assert res.returncode == 2 and "--compare:" in res.stderr and "has not finished" in res.stderr
    assert not page.exists() and not list(tmp_path.glob(".page.html.*"))
    res = run_cli(["report", out, "--html", tmp_path / "no" / "page.html"])
    assert res.returncode == 2 and "--html: folder" in res.stderr
    res = run_cli(["report", out, "--group-by", "task"])
    assert res.returncode == 2 and "--group-by: only used with --html" in res.stderr
    res = run_cli(["report", out, "--html", page, "--group-by", "task"])
    assert res.returncode == 0, res.stderr
    assert page.is_file() and f"HTML report written to {page}" in res.stdout


# --------------------------------------------------------------------------- the browser
def chromium() -> str | None:
    return shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")


needs_chromium = pytest.mark.skipif(
    chromium() is None, reason="headless Chromium not found: install Debian's `chromium` package "
                               "(apt-get install -y chromium; .ci/run does it where apt-get is available)")


def render(page: Path, screenshot: Path | None = None, height: int = 2400) -> tuple[str, list[str]]:
    """``(DOM after the page's scripts ran, console messages)`` of a page opened in headless Chromium."""
    base = [chromium(), "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars", "--no-first-run",
            f"--user-data-dir={page.parent / '.chromium-profile'}"]
    res = subprocess.run([*base, "--enable-logging=stderr", "--v=0", "--dump-dom", page.resolve().as_uri()],
                         check=False, capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr[-2000:]
    console = [line for line in res.stderr.splitlines() if "CONSOLE" in line or "Uncaught" in line]
    if screenshot is not None:
        shot = subprocess.run([*base, f"--screenshot={screenshot}", f"--window-size=1000,{height}",
                               page.resolve().as_uri()], check=False, capture_output=True, text=True, timeout=120)
        assert shot.returncode == 0 and screenshot.stat().st_size > 10_000, shot.stderr[-2000:]
    return res.stdout, console


def check_in_browser(page: Path, sections: Sequence[str], screenshot: Path | None = None, height: int = 2400) -> str:
    dom, console = render(page, screenshot, height)
    assert console == [], console  # the page logs nothing: any console message is a failure
    assert 'data-ready="1"' in dom  # the page's script ran to its end
    for sid in sections:
        assert f'<section id="{sid}">' in dom, sid
    drawn = re.findall(r'<svg class="chart" data-chart="([^"]+)" data-points="(\d+)"[^>]*data-rendered="(\d+)x(\d+)"',
                       dom)
    assert len(drawn) == dom.count('<svg class="chart"') > 0
    for name, points, width, height_px in drawn:
        assert int(points) > 0 and int(width) > 300 and int(height_px) > 100, (name, points, width, height_px)
    return dom


@needs_chromium
def test_browser_shows_hostile_text_as_text_and_catches_console_errors(tmp_path):
    rows = [{"instruction": EVIL, "output": "fine"}] * 2
    out = fake_run(tmp_path, records=[selection(1, [0, 1], [0.2, 0.1])], rows=rows)
    page = tmp_path / "page.html"
    page.write_text(build_page(out))
    dom = check_in_browser(page, ["header", "loss", "selections", "scores", "composition", "picks"])
    assert "alert(" not in re.sub(r"&lt;script&gt;alert\(.x.\)&lt;/script&gt;", "", dom.replace("&#x27;", "'"))
    assert "<b>bold</b>" not in dom
    bad = tmp_path / "bad.html"
    bad.write_text("<html><body><script>nothing_here();</script></body></html>")
    assert any("nothing_here" in line for line in render(bad)[1])  # the check above would have failed


# --------------------------------------------------------------------------- real runs
SCREENSHOTS = os.environ.get("DATAFLEX_REPORT_SCREENSHOTS")  # e.g. docs/img: keep the screenshots there


@pytest.fixture(scope="module")
def real_runs(make_train_yaml, run_cli, tmp_path_factory):
    """One short finished run per mode (and a random selection as a baseline), trained once for this module."""
    tmp = tmp_path_factory.mktemp("html-runs")
    common = {"dataset": "demo_mix,demo_chat", "max_samples": 100}
    configs = {
        "select": dict(component_name="loss", eval_dataset="demo_add_eval", warmup_step=3, update_step=3,
                       update_times=5, components_cfg_file=None, **common),
        "random": dict(component_name="random", warmup_step=3, update_step=3, update_times=5, **common),
        "mix": dict(train_type="dynamic_mix", component_name="odm", max_steps=24, warmup_step=2, update_step=2,
                    update_times=None, **common),
        "weight": dict(train_type="dynamic_weight", component_name="loss", warmup_step=2, train_step=24,
                       update_step=None, update_times=None, **common),
    }
    comps = tmp / "components.yaml"
    comps.write_text("selectors:\n  loss: {name: loss, params: {record_scores: true}}\n")
    configs["select"]["components_cfg_file"] = str(comps)
    outs = {}
    for name, cfg in configs.items():
        path = make_train_yaml(tmp / name, **cfg)
        res = run_cli(["train", path], timeout=400)
        assert res.returncode == 0, failure_report(res)
        outs[name] = tmp / name / "out"
    return outs


def _shot(tmp: Path, name: str) -> Path:
    if SCREENSHOTS:
        folder = Path(SCREENSHOTS)
        folder = folder if folder.is_absolute() else REPO_ROOT / folder
        return folder / f"report_{name}.png"
    return tmp / f"report_{name}.png"


@pytest.mark.e2e
@needs_chromium
def test_select_run_in_the_browser(real_runs, run_cli, tmp_path):
    page = tmp_path / "select.html"
    res = run_cli(["report", real_runs["select"], "--html", page, "--group-by", "task",
                   "--compare", real_runs["random"], "--top", "8"])
    assert res.returncode == 0, res.stderr
    dom = check_in_browser(page, ["header", "loss", "selections", "scores", "composition", "picks", "compare"],
                           _shot(tmp_path, "select"), height=4400)
    assert "scored pool" in dom  # record_scores: true
    assert 'data-chart="composition-group"' in dom and "dataflex " in dom  # versions recorded
    assert page.stat().st_size < 2_000_000


@pytest.mark.e2e
@needs_chromium
@pytest.mark.parametrize("mode, sections", [("mix", ["proportions", "domain-loss", "rewards"]),
                                            ("weight", ["weights", "heavy"])])
def test_mix_and_weight_runs_in_the_browser(real_runs, run_cli, tmp_path, mode, sections):
    page = tmp_path / f"{mode}.html"
    res = run_cli(["report", real_runs[mode], "--html", page])
    assert res.returncode == 0, res.stderr
    check_in_browser(page, ["header", "loss", *sections], _shot(tmp_path, mode))
