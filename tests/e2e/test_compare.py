"""`dataflex-cli compare`: the refusals and end to end on the tiny
model (two methods x two seeds under both budgets, resumed after a killed first attempt, the HTML page).
"""

from __future__ import annotations

import json
import math
import os
import re
import shutil
import signal
import subprocess
import time
from pathlib import Path

import pytest
from support.helpers import cli_command, write_yaml


# Student t 0.975 quantiles from the printed tables (df = 1, 2, 3, 4, 10, 30)
T975 = {1: 12.706204736, 2: 4.302652730, 3: 3.182446305, 4: 2.776445105, 10: 2.228138852, 30: 2.042272456}


@pytest.fixture()
def config_with(tmp_path, train_config):
    """``config_with(**keys)`` -> a YAML path whose model does not exist: a refusal must come before loading it."""
    def make(**keys):
        cfg = train_config(tmp_path / "no-model-here", tmp_path / "ignored")
        cfg.update({"eval_dataset": "demo_add_eval", "max_steps": 4})
        for k, v in keys.items():
            if v is None:
                cfg.pop(k, None)
            else:
                cfg[k] = v
        return write_yaml(tmp_path / "cfg.yaml", cfg)
    return make


@pytest.mark.parametrize("args, keys, message", [
    (["--methods", "random,nope"], {}, "--methods: unknown method 'nope'; allowed: plain, "),
    (["--methods", "random,doremi"], {}, "--methods: 'doremi' is a mixer (train_type: dynamic_mix); this config is "
                                         "train_type: dynamic_select; allowed: plain, "),
    (["--methods", "random,loss"], {"eval_dataset": None}, "eval_dataset: compare needs a held-out eval set"),
    (["--methods", "random,loss"], {"eval_dataset": "demo_mix"}, "eval_dataset: row 0 of 'demo_mix' is also a training "
                                                                 "row of 'demo_mix'"),
    (["--methods", "random,loss", "--seeds", "0"], {}, "--seeds: 0 is invalid; allowed: an integer >= 1"),
    (["--methods", "random,loss", "--metric", "choice"], {}, "--metric choice: row 0 of eval dataset 'demo_add_eval' "
                                                             "has no options column 'options'"),
    (["--methods", "random,loss:focus=extreme"], {}, "--methods: 'loss:focus=extreme': "),
    (["--methods", "loss"], {}, "--methods: no baseline to compare with"),
    (["--methods", "random,loss", "--test-dataset", "demo_mix"], {}, "--test-dataset: row 0 of 'demo_mix' is also a "
                                                                     "training row of 'demo_mix'"),
    (["--methods", "random,loss", "--eval-extra", "code=demo_code", "--eval-extra", "x=nope"], {},
     "--eval-extra: 'nope' is not registered in "),
    # the measured set apart from what the methods aim at
    (["--methods", "random,loss", "--test-dataset", "demo_add_eval"], {},
     "--test-dataset: row 0 of 'demo_add_eval' is also a row of the methods' eval set 'demo_add_eval'"),
    (["--methods", "random,loss", "--test-dataset", "nope"], {}, "--test-dataset: 'nope' is not registered in "),
    (["--methods", "random,loss", "--reuse", "nope"], {}, "--reuse: 'nope' is not a folder; allowed: the --out "
                                                          "folder of another comparison"),
])
def test_bad_input_is_one_line_and_exit_2_before_anything_is_written(tmp_path, run_cli, config_with, args, keys,
                                                                     message):
    res = run_cli(["compare", config_with(**keys), *args, "--out", tmp_path / "out"], cwd=tmp_path)
    assert res.returncode == 2, res.stderr
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("dataflex-cli: error: " + message), lines
    assert not (tmp_path / "out").exists()


def test_a_folder_another_comparison_writes_is_refused_in_one_line(tmp_path, run_cli, config_with):
    """Two comparisons on one --out would train the same runs into the same folders: the second one ends with
    exit 2 and one line naming the holder, and touches nothing there."""
    import socket
    import sys

    out = tmp_path / "out"
    out.mkdir()
    with subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"]) as other:
        try:
            (out / "compare.lock").write_text(f"{socket.gethostname()} {other.pid}")
            res = run_cli(["compare", config_with(), "--methods", "random,loss", "--out", out], cwd=tmp_path)
        finally:
            other.kill()
    assert res.returncode == 2, res.stderr
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(
        f"dataflex-cli: error: --out: {out} is being written by another comparison (pid {other.pid} on "), lines
    assert [p.name for p in out.iterdir()] == ["compare.lock"]


# --------------------------------------------------------------------------- end to end
E2E_METHODS = "random,loss"


@pytest.fixture(scope="module")
def compared(tmp_path_factory, make_train_yaml, run_cli):
    """random vs loss, 2 seeds, both budgets (6 runs of 6 steps; the baseline's long runs 12): a first attempt
    is killed while its second run trains, then the same command finishes the rest."""
    folder = tmp_path_factory.mktemp("compare")
    config = make_train_yaml(folder, max_samples=64, eval_dataset="demo_add_eval", lr_scheduler_type="constant",
                             warmup_ratio=0.0)
    out = folder / "out"
    args = ["compare", config, "--methods", E2E_METHODS, "--seeds", "2", "--budget", "both", "--eval-every", "3",
            "--out", out, "--html", folder / "page.html"]
    first = out / "random" / "seed-0"
    with (folder / "first.stderr").open("w") as err:
        proc = subprocess.Popen(cli_command(args), cwd=folder, stdout=subprocess.DEVNULL, stderr=err,
                                start_new_session=True)
        try:
            deadline = time.time() + 240
            while not ((first / "compare_run.json").exists() and (out / "loss" / "seed-0" / "train.log").exists()):
                assert proc.poll() is None, (folder / "first.stderr").read_text()[-3000:]
                assert time.time() < deadline, "the first attempt never reached its second run"
                time.sleep(0.2)
        finally:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=30)
    # the killed comparison's training child went with it (the kernel ends it with its parent)
    deadline = time.time() + 20
    while _processes_naming(out / "loss" / "seed-0") and time.time() < deadline:
        time.sleep(0.2)
    assert _processes_naming(out / "loss" / "seed-0") == []
    after_kill = json.loads((out / "compare.json").read_text())  # rewritten after each finished run
    kept = {p.relative_to(first): (p.read_bytes(), p.stat().st_mtime_ns) for p in first.rglob("*") if p.is_file()}
    res = run_cli(args, cwd=folder, timeout=600)
    assert res.returncode == 0, res.stderr[-4000:]
    data = json.loads((out / "compare.json").read_text())
    return {"folder": folder, "out": out, "res": res, "data": data, "kept": kept, "first": first,
            "after_kill": after_kill}


def _processes_naming(path: Path) -> list[int]:
    found = []
    for proc in Path("/proc").glob("[0-9]*"):
        try:
            if str(path) in (proc / "cmdline").read_bytes().decode(errors="replace"):
                found.append(int(proc.name))
        except OSError:
            continue
    return found


def _values(data, method, role, step):
    runs = sorted((r for r in data["runs"] if r["method"] == method and r["role"] == role), key=lambda r: r["seed_index"])
    return [next(p for p in r["curve"] if p["step"] == step)["values"]["loss"] for r in runs], runs


@pytest.mark.e2e
def test_resume_skips_the_finished_run_and_leaves_it_byte_for_byte(compared):
    assert "[compare] random seed 0: finished earlier" in compared["res"].stderr
    now = {p.relative_to(compared["first"]): (p.read_bytes(), p.stat().st_mtime_ns)
           for p in compared["first"].rglob("*") if p.is_file()}
    assert now == compared["kept"]
    assert len(compared["data"]["runs"]) == 6 and compared["data"]["missing"] == []
    # what the killed attempt left: its one finished run, and the five missing ones named in its tables
    killed = compared["after_kill"]
    assert [(r["method"], r["seed_index"], r["role"]) for r in killed["runs"]] == [("random", 0, "main")]
    assert [m.rsplit(" (", 1)[0] for m in killed["missing"]] == [
        "random seed 1", "random seed 0 (long)", "random seed 1 (long)", "loss seed 0", "loss seed 1"]
    assert "loss: missing seed 0, 1 (not finished)" in killed["tables"][0]["notes"]
    # progress lines: one per run started, with the step count and an ETA once steps are timed
    assert len(re.findall(r"\[compare\] run \d/5 .*: training", compared["res"].stderr)) == 5
    assert re.search(r"step 6/6, [\d.]+ s/step, ETA run 0s", compared["res"].stderr)


@pytest.mark.e2e
def test_a_finished_run_measured_otherwise_is_measured_again_not_trained_again(compared, tmp_path, run_cli):
    """Another metric (or test set) over the same trained runs: every run is measured again from its
    checkpoints, none trains, and the new entries carry the new measurement key."""
    out = tmp_path / "out"
    shutil.copytree(compared["out"], out)
    weights = {p: p.stat().st_mtime_ns for p in out.rglob("adapter_model.safetensors")}
    args = ["compare", compared["folder"] / "train.yaml", "--methods", E2E_METHODS, "--seeds", "2", "--budget",
            "both", "--eval-every", "3", "--out", out, "--metric", "exact"]
    res = run_cli(args, cwd=compared["folder"], timeout=600)
    assert res.returncode == 0, res.stderr[-4000:]
    assert res.stderr.count("measured again for this metric / test set") == 6 and "training" not in res.stderr
    assert {p: p.stat().st_mtime_ns for p in out.rglob("adapter_model.safetensors")} == weights
    data = json.loads((out / "compare.json").read_text())
    assert all("exact" in point["values"] for r in data["runs"] for point in r["curve"])
    assert {r["measure_key"] for r in data["runs"]} == {data["measure_key"]}
    assert data["measure_key"] != compared["data"]["measure_key"]


@pytest.mark.e2e
def test_reuse_takes_another_comparisons_finished_runs_instead_of_training_them(compared, tmp_path, run_cli):
    """The same comparison into a new folder with --reuse of the finished one: every run is taken (same key), none
    trains or is measured again, the tables are the same, and the original's files are left as they were."""
    before = {p: (p.read_bytes(), p.stat().st_mtime_ns) for p in compared["out"].rglob("*") if p.is_file()}
    out = tmp_path / "again"
    args = ["compare", compared["folder"] / "train.yaml", "--methods", E2E_METHODS, "--seeds", "2", "--budget",
            "both", "--eval-every", "3", "--out", out, "--reuse", compared["out"]]
    res = run_cli(args, cwd=compared["folder"], timeout=600)
    assert res.returncode == 0, res.stderr[-4000:]
    assert res.stderr.count("taken, not trained") == 6, res.stderr[-3000:]
    assert "training" not in res.stderr and "measured again" not in res.stderr
    data = json.loads((out / "compare.json").read_text())
    strip = [{k: v for k, v in t.items() if k != "notes"} for t in data["tables"]]
    assert strip == [{k: v for k, v in t.items() if k != "notes"} for t in compared["data"]["tables"]]
    assert {r["out"] for r in data["runs"]} == {str(out / p.relative_to(compared["out"]))
                                                for p in map(Path, (r["out"] for r in compared["data"]["runs"]))}
    assert all(Path(r["taken_from"]).parent.parent == compared["out"] for r in data["runs"])
    assert {p: (p.read_bytes(), p.stat().st_mtime_ns) for p in compared["out"].rglob("*") if p.is_file()} == before
    # the taken runs are this comparison's own now: a rerun without --reuse finds them finished
    res = run_cli(args[:-2], cwd=compared["folder"], timeout=600)
    assert res.returncode == 0 and res.stderr.count("finished earlier") == 6, res.stderr[-3000:]


@pytest.mark.e2e
def test_tables_and_verdicts_match_the_hand_computed_intervals(compared):
    data = compared["data"]
    steps_tab, compute_tab = data["tables"]
    assert (steps_tab["budget"], compute_tab["budget"]) == ("steps", "compute")
    base, _ = _values(data, "random", "main", 6)
    meth, meth_runs = _values(data, "loss", "main", 6)
    diffs = [m - b for m, b in zip(meth, base)]
    mean = sum(diffs) / 2
    half = T975[1] * abs(diffs[0] - diffs[1]) / math.sqrt(2) / math.sqrt(2)
    row = steps_tab["rows"][1]
    assert row["diff_mean"] == pytest.approx(mean, abs=1e-12)
    assert row["diff_hi"] - row["diff_mean"] == pytest.approx(half, rel=1e-9)
    want = "better" if mean + half < 0 else "worse" if mean - half > 0 else "tie"
    assert row["verdict"] == want
    assert f"{row['diff_mean']:+.4f} ± {half:.4f}" in compared["res"].stdout
    # compute: each loss run at its own seconds against the baseline's long run interpolated there
    _, long_runs = _values(data, "random", "long", 6)
    hand = []
    for m_run, b_run, m_val in zip(meth_runs, long_runs, meth):
        at = next(p for p in m_run["curve"] if p["step"] == 6)["seconds"]
        pts = [(p["seconds"], p["values"]["loss"]) for p in b_run["curve"]]
        if at >= pts[-1][0]:
            b = pts[-1][1]
        elif at <= pts[0][0]:
            b = pts[0][1]
        else:
            (x0, y0), (x1, y1) = next((a, c) for a, c in zip(pts, pts[1:]) if a[0] <= at <= c[0])
            b = y0 + (at - x0) / (x1 - x0) * (y1 - y0)
        hand.append(m_val - b)
    assert compute_tab["rows"][1]["diff_mean"] == pytest.approx(sum(hand) / 2, abs=1e-9)
    # every run's own outputs are where they belong, with checkpoints every 3 steps
    for r in data["runs"]:
        assert [p["step"] for p in r["curve"]] == ([3, 6, 9, 12] if r["role"] == "long" else [3, 6])
        assert Path(r["out"]).name == f"seed-{r['seed_index']}" + ("-long" if r["role"] == "long" else "")
        assert r["seconds"]["train"] > 0 and r["curve"][-1]["tokens"] > r["curve"][0]["tokens"] > 0


@pytest.mark.e2e
def test_counted_work_adds_the_selectors_scoring_passes_exactly(compared, tiny_model, tmp_path):
    """loss scores the whole training set (64 rows) at each of its selections (steps 2 and 4), one forward
    per row: its decision work is that many tokens, checkpoint by checkpoint; random scores nothing."""
    data = compared["data"]
    train_tokens = _train_tokens(compared["out"] / "loss" / "seed-0" / "compare_train.yaml", tiny_model, tmp_path)
    for r in data["runs"]:
        scored = {3: 1, 6: 2} if r["method"] == "loss" else {}
        for p in r["curve"]:
            fwd = scored.get(p["step"], 0) * train_tokens
            assert (p["decision_forward"], p["decision_backward"]) == (fwd, 0), (r["method"], p)
            assert p["work"] == 3 * p["tokens"] + fwd  # forward + backward of every trained token, + the scoring
        assert r["decision_tokens"] == {"forward": scored.get(6, 0) * train_tokens, "backward": 0}


def _train_tokens(config: Path, model: Path, tmp_path: Path) -> int:
    """The non-padding tokens of a run's training set, tokenized as its training tokenized it."""
    import yaml
    from support.helpers import load_lf_pipeline

    from dataflex.scoring.engine import dataset_lengths

    cfg = yaml.safe_load(config.read_text())
    pipe = load_lf_pipeline(model, tmp_path / "pipe", **{k: cfg[k] for k in ("dataset", "dataset_dir", "template",
                                                                           "cutoff_len", "max_samples")})
    assert len(pipe["train_dataset"]) == 64
    return sum(dataset_lengths(pipe["train_dataset"]))


def _chromium():
    return shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")


@pytest.mark.e2e
@pytest.mark.skipif(_chromium() is None, reason="headless Chromium not found (apt-get install -y chromium)")
def test_html_page_in_headless_chromium(compared):
    page = compared["folder"] / "page.html"
    res = subprocess.run([_chromium(), "--headless", "--no-sandbox", "--disable-gpu", "--no-first-run",
                          f"--user-data-dir={compared['folder'] / '.chromium'}", "--enable-logging=stderr", "--v=0",
                          "--dump-dom", page.resolve().as_uri()], capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr[-2000:]
    assert [line for line in res.stderr.splitlines() if "CONSOLE" in line or "Uncaught" in line] == []
    dom = res.stdout
    for method in E2E_METHODS.split(","):
        assert f"<td>{method}</td>" in dom
    assert dom.count("<svg") == 2 and dom.count("<polyline") == 2 * 3  # random, loss, random (long) per chart
    links = re.findall(r'<a href="([^"]+)">', dom)
    assert len(links) == 6 and all(link.startswith("page_runs/") and link.endswith(".html") for link in links)
    for link in links:  # each run's own report page, beside this one
        assert "DataFlex" in (page.parent / link).read_text()
    assert "src=" not in dom and "http" not in dom.replace("http://www.w3.org/2000/svg", "")  # self-contained


@pytest.mark.slow
def test_two_process_compare(tmp_path, make_train_yaml, run_cli, tiny_model):
    config = make_train_yaml(tmp_path, max_samples=64, eval_dataset="demo_add_eval")
    res = run_cli(["compare", config, "--methods", "random,loss", "--seeds", "1", "--out", tmp_path / "out"],
                  env={"FORCE_TORCHRUN": "1", "NPROC_PER_NODE": "2"}, cwd=tmp_path, timeout=900, real=True)
    assert res.returncode == 0, res.stderr[-4000:]
    data = json.loads((tmp_path / "out" / "compare.json").read_text())
    assert len(data["runs"]) == 2
    manifest = json.loads((tmp_path / "out" / "loss" / "seed-0" / "dataflex" / "run.json").read_text())
    assert manifest["global_batch"] == 2 * 2 * 2  # two processes trained it
    assert data["tables"][0]["rows"][1]["over"] == "questions"
    # the scoring work is the whole run's, as one process counts it: 2 selections x every training token
    loss = next(r for r in data["runs"] if r["method"] == "loss")
    tokens = _train_tokens(tmp_path / "out" / "loss" / "seed-0" / "compare_train.yaml", tiny_model, tmp_path)
    assert loss["decision_tokens"] == {"forward": 2 * tokens, "backward": 0}


@pytest.mark.e2e
def test_one_forward_choice_scores_equal_full_forwards(tiny_model, tmp_path):
    """The cached-prompt scorer gives each option the log-likelihood a full forward of prompt + option gives."""
    import torch
    from support.helpers import load_lf_pipeline
    from llamafactory.data import get_template_and_fix_tokenizer
    from llamafactory.hparams import DataArguments

    from dataflex.compare.evaluate import ChoiceScorer

    pipe = load_lf_pipeline(tiny_model, tmp_path, max_samples=4)
    model, tok = pipe["model"], pipe["tokenizer"]
    model.eval()
    template = get_template_and_fix_tokenizer(tok, DataArguments(template="default"))
    scorer = ChoiceScorer(model, tok, template)
    options = ["120", "12", "one hundred and twenty"]
    scored = scorer.score("Add the two numbers.\n59 + 61", options)
    for option, (total, count) in zip(options, scored):
        prompt, answer = scorer.encode("Add the two numbers.\n59 + 61", option)
        answer = answer[:answer.index(tok.eos_token_id) + 1]
        with torch.no_grad():
            logp = torch.log_softmax(model(input_ids=torch.tensor([prompt + answer])).logits[0].float(), dim=-1)
        want = sum(float(logp[len(prompt) + i - 1, t]) for i, t in enumerate(answer))
        assert count == len(answer) and total == pytest.approx(want, abs=1e-4)


@pytest.mark.slow
def test_real_model_on_bbh_choice(smollm2, tmp_path, run_cli):
    """SmolLM2-135M-Instruct on a BBH pool (../shared/data/bbh): random vs loss, 2 seeds, scored by choice."""
    import sys

    from support.helpers import REPO_ROOT

    sys.path.insert(0, str(REPO_ROOT / "bench"))
    import mc_tasks

    if mc_tasks.bbh_source() is None:
        pytest.skip("no BBH task files (../shared/data/bbh or $DATAFLEX_BBH_DIR)")
    target, other = "logical_deduction_three_objects", "navigate"
    paths = mc_tasks.fetch_bbh([target, other])
    mc_tasks.write_bbh_pool(tmp_path / "data", target, [other], paths, per_task=24, n_eval=16, n_test=0)
    cfg = {
        "model_name_or_path": str(smollm2), "stage": "sft", "do_train": True, "finetuning_type": "lora",
        "lora_target": "all", "lora_rank": 8, "lora_alpha": 16, "dataset": "bb_train", "eval_dataset": "bb_eval",
        "dataset_dir": str(tmp_path / "data"), "template": "smollm2", "cutoff_len": 384, "overwrite_cache": True,
        "preprocessing_num_workers": 1, "dataloader_num_workers": 0, "seed": 42, "output_dir": str(tmp_path / "x"),
        "logging_steps": 1, "plot_loss": False, "report_to": "none", "per_device_train_batch_size": 2,
        "gradient_accumulation_steps": 2, "learning_rate": 2e-4, "bf16": False,
        "train_type": "dynamic_select", "component_name": "random", "warmup_step": 2, "update_step": 2,
        "update_times": 2,
    }
    config = write_yaml(tmp_path / "bbh.yaml", cfg)
    res = run_cli(["compare", config, "--methods", "random,loss", "--seeds", "2", "--metric", "choice",
                   "--eval-every", "3", "--out", tmp_path / "out"], cwd=tmp_path, timeout=1500)
    assert res.returncode == 0, res.stderr[-4000:]
    data = json.loads((tmp_path / "out" / "compare.json").read_text())
    assert [t["metric"] for t in data["tables"]] == ["loss", "choice", "choice_norm"]
    for run in data["runs"]:
        for point in run["curve"]:
            assert len(point["metrics"]["choice"]) == 16  # one verdict per eval question
            assert point["values"]["choice"] * 16 == pytest.approx(round(point["values"]["choice"] * 16))
    base = next(r for r in data["runs"] if r["method"] == "random" and r["seed_index"] == 0)
    assert base["curve"][-1]["values"]["loss"] < base["curve"][0]["values"]["loss"]  # it learns the task's format
