"""bench/mc_tasks.py: BIG-bench tasks as alpaca rows (disjoint seeded splits, planted wrong answers)
and the multiple-choice evaluator (option log-likelihoods against a direct computation)."""

from __future__ import annotations

import json
import sys

import pytest

from support.helpers import REPO_ROOT

sys.path.insert(0, str(REPO_ROOT / "bench"))
import mc_tasks as bigbench  # noqa: E402


def _task(path, name, n, options=("yes", "no"), prefix=""):
    examples = [{"input": f"{name} question {i}?", "target_scores": {o: int(j == i % len(options))
                                                                     for j, o in enumerate(options)}}
                for i in range(n)]
    examples.append({"input": "two right answers", "target_scores": {o: 1 for o in options}})  # skipped
    examples.append({"input": "free text", "target": "x"})  # not multiple choice: skipped
    path.write_text(json.dumps({"name": name, "task_prefix": prefix, "examples": examples}))
    return path


def test_questions_keep_one_correct_option_and_the_prefix_unless_stripped(tmp_path):
    path = _task(tmp_path / "t.json", "t", 5, options=("a", "b", "c"), prefix="Answer carefully.")
    qs = bigbench.load_questions("t", path)
    assert len(qs) == 5 and [q.answer for q in qs] == [0, 1, 2, 0, 1]
    assert qs[0].text == "Answer carefully.\n\nt question 0?"
    assert bigbench.load_questions("t", path, strip_prefix=True)[0].text == "t question 0?"
    assert bigbench.prompt_of(qs[1]).splitlines()[-5:] == ["(A) a", "(B) b", "(C) c", "",
                                                          "Answer with the text of the correct option."]


def test_pool_splits_are_disjoint_and_wrong_answers_planted_exactly(tmp_path):
    paths = {"tgt": _task(tmp_path / "tgt.json", "tgt", 60), "o1": _task(tmp_path / "o1.json", "o1", 50),
             "o2": _task(tmp_path / "o2.json", "o2", 50)}
    out = tmp_path / "data"
    summary = bigbench.write_pool(out, "tgt", ["o1", "o2"], paths, seed=3, target_train=10, other_train=20,
                                  n_eval=8, n_test=30, wrong_share=0.2)
    assert summary == {"train": 50, "target_rows": 10, "wrong_rows": 10, "eval": 8,
                       "tests": {"tgt": 30, "o1": 30, "o2": 30}}
    train = json.loads((out / "bb_train.json").read_text())
    evals = json.loads((out / "bb_eval.json").read_text())
    test = json.loads((out / "bb_test_tgt.json").read_text())
    key = lambda r: r["instruction"]  # noqa: E731
    tgt_train = {key(r) for r in train if r["task"] == "tgt"}
    assert not (tgt_train & {key(r) for r in evals}) and not (tgt_train & {key(r) for r in test})
    assert not ({key(r) for r in evals} & {key(r) for r in test})
    for r in train:
        assert (r["output"] != r["answer"]) == r["wrong"] and r["output"] in r["options"]
    info = json.loads((out / "dataset_info.json").read_text())
    assert sorted(info) == ["bb_eval", "bb_test_o1", "bb_test_o2", "bb_test_tgt", "bb_train"]
    again = tmp_path / "again"
    bigbench.write_pool(again, "tgt", ["o1", "o2"], paths, seed=3, target_train=10, other_train=20, n_eval=8,
                        n_test=30, wrong_share=0.2)
    assert (again / "bb_train.json").read_text() == (out / "bb_train.json").read_text()  # seeded


def test_wilson_interval_hand_computed():
    lo, hi = bigbench.wilson(8, 10)
    assert (round(lo, 4), round(hi, 4)) == (0.4902, 0.9433)
    assert bigbench.wilson(0, 0) == (0.0, 1.0)


def test_option_logprobs_equal_one_forward_per_option(tiny_model):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_model)
    model = AutoModelForCausalLM.from_pretrained(tiny_model).eval()
    prompt = tok("Add the two numbers. 3 + 4 =", add_special_tokens=False)["input_ids"]
    options = ["7", "12", "seven hundred"]
    got = bigbench.option_logprobs(model, tok, prompt, options)
    for (total, n), option in zip(got, options):
        ids = prompt + tok(option, add_special_tokens=False)["input_ids"]
        with torch.no_grad():
            logp = torch.log_softmax(model(torch.tensor([ids])).logits[0].float(), dim=-1)
        want = sum(float(logp[p - 1, ids[p]]) for p in range(len(prompt), len(ids)))
        assert n == len(ids) - len(prompt)
        assert total == pytest.approx(want, abs=1e-4)


# --------------------------------------------------------------------------- fetching task files
def _sdist(tmp_path, tasks):
    """A stand-in sdist laid out like bigbench-1.0.0.tar.gz, holding the given tasks' task.json."""
    import tarfile

    src = tmp_path / "src"
    for name in tasks:
        folder = src / bigbench.TASKS_IN_SDIST / name
        folder.mkdir(parents=True)
        _task(folder / "task.json", name, 4)
    path = tmp_path / "bigbench-1.0.0.tar.gz"
    with tarfile.open(path, "w:gz") as tar:
        tar.add(src / bigbench.TASKS_IN_SDIST.split("/")[0], arcname=bigbench.TASKS_IN_SDIST.split("/")[0])
    return path


def test_fetch_extracts_only_the_asked_tasks_and_checks_the_sdist(tmp_path, monkeypatch):
    sdist = _sdist(tmp_path, ["navigate", "strategyqa", "hyperbaton"])
    cache = tmp_path / "cache"
    with pytest.raises(SystemExit, match=f"expected {bigbench.SDIST_SHA256}"):  # not the pinned file
        bigbench.fetch_tasks(["navigate"], cache=cache, sdist=sdist)
    assert not list(cache.glob("*.json"))  # nothing half-written
    monkeypatch.setattr(bigbench, "SDIST_SHA256", bigbench._sha256(sdist))
    got = bigbench.fetch_tasks(["navigate", "strategyqa"], cache=cache, sdist=sdist)
    assert sorted(p.name for p in cache.glob("*.json")) == ["manifest.json", "navigate.json", "strategyqa.json"]
    assert json.loads(got["navigate"].read_text())["name"] == "navigate"
    manifest = json.loads((cache / "manifest.json").read_text())
    assert manifest == {t: bigbench._sha256(cache / f"{t}.json") for t in ("navigate", "strategyqa")}
    with pytest.raises(SystemExit, match="no such task.*nonexistent"):
        bigbench.fetch_tasks(["nonexistent"], cache=cache, sdist=sdist)


def test_fetch_uses_the_cache_and_says_where_else_the_sdist_can_come_from(tmp_path, monkeypatch):
    sdist = _sdist(tmp_path, ["navigate"])
    cache = tmp_path / "cache"
    monkeypatch.setattr(bigbench, "SDIST_SHA256", bigbench._sha256(sdist))
    bigbench.fetch_tasks(["navigate"], cache=cache, sdist=sdist)
    monkeypatch.delenv("DATAFLEX_BIGBENCH_SDIST", raising=False)
    monkeypatch.delenv("DATAFLEX_BIGBENCH_DIR", raising=False)
    offline = ["--no-index", "--find-links", str(tmp_path / "empty")]
    (tmp_path / "empty").mkdir()
    # cached with a matching hash: no download is tried (pip would fail offline)
    assert bigbench.fetch_tasks(["navigate"], cache=cache, pip_args=offline)["navigate"].exists()
    # a cached file whose hash changed is fetched again: here pip finds no release and the error says what to do
    (cache / "navigate.json").write_text("{}")
    with pytest.raises(SystemExit) as err:
        bigbench.fetch_tasks(["navigate"], cache=cache, pip_args=offline)
    message = str(err.value)
    assert "\n" not in message and "could not download bigbench==1.0.0" in message
    assert "DATAFLEX_BIGBENCH_SDIST" in message and bigbench.SDIST_SHA256[:12] in message


def test_fetch_from_a_checkout_copies_what_the_cache_lacks_or_nothing(tmp_path, monkeypatch):
    checkout = tmp_path / "BIG-bench"
    for name in ("navigate", "strategyqa"):
        (checkout / "bigbench" / "benchmark_tasks" / name).mkdir(parents=True)
        _task(checkout / "bigbench" / "benchmark_tasks" / name / "task.json", name, 4)
    cache = tmp_path / "cache"
    with pytest.raises(SystemExit, match=r"DATAFLEX_BIGBENCH_DIR=.*no task.json for hyperbaton"):
        bigbench.fetch_tasks(["navigate", "hyperbaton"], cache=cache, source_dir=checkout)
    assert not list(cache.glob("*.json"))  # nothing copied when one is missing
    monkeypatch.setenv("DATAFLEX_BIGBENCH_DIR", str(checkout))
    monkeypatch.delenv("DATAFLEX_BIGBENCH_SDIST", raising=False)
    got = bigbench.fetch_tasks(["navigate", "strategyqa"], cache=cache)
    assert got["strategyqa"].read_bytes() == (checkout / "bigbench/benchmark_tasks/strategyqa/task.json").read_bytes()
    assert json.loads((cache / "manifest.json").read_text()) == {
        t: bigbench._sha256(cache / f"{t}.json") for t in ("navigate", "strategyqa")}
    assert len(bigbench.load_questions("navigate", got["navigate"])) == 4


def test_demo_pools_for_level_1_plant_exactly_and_keep_eval_questions_apart(tmp_path):
    """bench/real.py --data demo: the level-1 pool from the repo's generated tasks (BIG-bench's stand-in)."""
    from collections import Counter

    import real
    from dataflex.demo import TASK_INSTRUCTIONS

    for kind in ("plain", "hard"):
        folder = tmp_path / kind
        folder.mkdir()
        info = real.write_demo_pool(folder, "reverse", kind, 0, per_task=7, n_eval=5, wrong=0.1)
        train = json.loads((folder / "bb_train.json").read_text())
        evals = json.loads((folder / "bb_eval.json").read_text())
        sibling = json.loads((folder / "bb_eval_sibling.json").read_text())
        # 70 rows: 7 target, 63 over the other four tasks (16, 16, 16, 15), 7 wrong
        assert Counter(r["task"] for r in train) == {"reverse": 7, "add": 16, "sort": 16, "upper": 16, "vowels": 15}
        assert info["target_rows"] == 7 and sum(r["wrong"] for r in train) == info["wrong_rows"] == 7
        for r in train:
            # a wrong row answers with a value of the right form that is not the right one; the others are right
            assert (r["output"] != r["answer"]) == r["wrong"]
        assert [r["task"] for r in evals] == ["reverse"] * 5 and [r["task"] for r in sibling] == ["vowels"] * 5
        questions = [(r["task"], r["input"]) for r in train + evals + sibling]
        assert len(set(questions)) == len(questions)  # no eval question is also a training row
        instructions = {r["instruction"] for r in train + evals}
        if kind == "hard":
            assert instructions == {real.HARD_INSTRUCTION}
        else:
            assert instructions == set(TASK_INSTRUCTIONS.values())
        rev = [r for r in train if r["task"] == "reverse" and not r["wrong"]]
        assert all(r["output"] == r["input"][::-1] for r in rev)
    again = tmp_path / "again"
    again.mkdir()
    real.write_demo_pool(again, "reverse", "hard", 0, per_task=7, n_eval=5, wrong=0.1)
    assert (again / "bb_train.json").read_text() == (tmp_path / "hard" / "bb_train.json").read_text()  # seeded


def test_demo_data_refuses_level_2_and_names_its_targets():
    import real

    with pytest.raises(SystemExit, match="--data demo: level 2 runs on BBH only"):
        real.main(["--plan-only", "--data", "demo", "--levels", "1,2"])
    with pytest.raises(SystemExit, match="--data bigbench: level 2 runs on BBH only"):
        real.main(["--plan-only", "--data", "bigbench", "--levels", "2"])
    with pytest.raises(SystemExit, match="--l2-families: unknown 'curriculum'; allowed: weight, reorder, select, mix, doremi"):
        real.main(["--plan-only", "--l2-families", "weight,curriculum"])
    with pytest.raises(SystemExit, match="--targets: unknown 'strategyqa'; allowed: add, sort, reverse, vowels"):
        real.main(["--plan-only", "--data", "demo", "--targets", "strategyqa"])


# --------------------------------------------------------------------------- BBH
def _bbh_folder(tmp_path, tasks=("navigate", "date_understanding")):
    """A folder of BBH-format files whose hashes are pinned in place of the real ones."""
    folder = tmp_path / "bbh"
    folder.mkdir()
    for t in tasks:
        examples = [{"input": f"{t} q{i}", "target": ("Yes", "No")[i % 2] if t == "navigate" else f"({'ABC'[i % 3]})"}
                    for i in range(9)]
        if t == "date_understanding":
            examples.append({"input": "odd one", "target": "Monsters, Inc"})  # not of the task's form
        (folder / f"{t}.json").write_text(json.dumps({"canary": "x", "examples": examples}))
    return folder


def _pin(monkeypatch, folder):
    pins = dict(bigbench.BBH_SHA256)
    for path in folder.glob("*.json"):
        pins[path.stem] = bigbench._sha256(path)
    monkeypatch.setattr(bigbench, "BBH_SHA256", pins)


def test_bbh_pins_every_shared_file_and_the_shared_copy_is_the_default(monkeypatch):
    from support.helpers import REPO_ROOT

    shared = REPO_ROOT.parent / "shared" / "data" / "bbh"
    if not shared.is_dir():
        pytest.skip("no ../shared/data/bbh on this machine")
    monkeypatch.delenv(bigbench.BBH_ENV, raising=False)
    assert bigbench.bbh_source() == shared
    sums = dict(line.split()[::-1] for line in (shared / "SHA256SUMS").read_text().splitlines() if line.strip())
    assert {f"{t}.json": h for t, h in bigbench.BBH_SHA256.items()} == sums
    got = bigbench.fetch_bbh(list(bigbench.BBH_SHA256))
    assert len(got) == 21 and all(p.parent == shared for p in got.values())
    assert len(bigbench.BBH_MC) == 17 and "word_sorting" not in bigbench.BBH_MC


def test_bbh_refuses_a_changed_missing_or_unknown_file_naming_it(tmp_path, monkeypatch):
    folder = _bbh_folder(tmp_path)
    _pin(monkeypatch, folder)
    monkeypatch.setenv(bigbench.BBH_ENV, str(folder))
    assert set(bigbench.fetch_bbh(["navigate", "date_understanding"])) == {"navigate", "date_understanding"}
    (folder / "navigate.json").write_text("{}")
    with pytest.raises(bigbench.TaskFileError, match=r"navigate.json has sha256 [0-9a-f]{16}\.\.\., expected"):
        bigbench.fetch_bbh(["navigate"])
    with pytest.raises(bigbench.TaskFileError, match=r"bbh/sports_understanding.json is missing"):
        bigbench.fetch_bbh(["sports_understanding"])
    with pytest.raises(bigbench.TaskFileError, match="unknown BBH task.*nosuch; known: boolean_expressions"):
        bigbench.fetch_bbh(["nosuch"])


def test_bbh_download_keeps_only_checked_files_and_reuses_them(tmp_path, monkeypatch):
    folder = _bbh_folder(tmp_path)
    _pin(monkeypatch, folder)
    cache = tmp_path / "cache"
    calls = []

    def fake_download(task, dest):
        calls.append(task)
        dest.write_bytes((folder / f"{task}.json").read_bytes() + (b" " if task == "date_understanding" else b""))

    monkeypatch.setattr(bigbench, "_download_bbh", fake_download)
    with pytest.raises(bigbench.TaskFileError, match="downloaded BBH task date_understanding has sha256"):
        _fetch_no_source(["navigate", "date_understanding"], cache, monkeypatch)
    assert sorted(p.name for p in cache.iterdir()) == ["navigate.json"]  # the foreign file was not kept
    assert calls == ["navigate", "date_understanding"]
    assert _fetch_no_source(["navigate"], cache, monkeypatch)["navigate"] == cache / "navigate.json"
    assert calls == ["navigate", "date_understanding"]  # cached and checked: not downloaded again


def _fetch_no_source(tasks, cache, monkeypatch):
    monkeypatch.setattr(bigbench, "bbh_source", lambda: None)
    return bigbench.fetch_bbh(tasks, cache=cache)


def test_bbh_questions_rows_and_answer_balance(tmp_path, monkeypatch):
    folder = _bbh_folder(tmp_path)
    qs, dropped = bigbench.load_bbh("date_understanding", folder / "date_understanding.json")
    assert dropped == 1 and len(qs) == 9 and qs[0].answers == ("(A)", "(B)", "(C)")
    assert [q.target for q in qs[:4]] == ["(A)", "(B)", "(C)", "(A)"]
    rng = __import__("random").Random(0)
    row = bigbench.bbh_row(qs[1], wrong=True, rng=rng)
    assert row["output"] in ("(A)", "(C)") and row["answer"] == "(B)" and row["wrong"]
    assert row["instruction"] == "date_understanding q1" and row["options"] == ["(A)", "(B)", "(C)"]
    bal = bigbench.answer_balance(qs)
    assert bal == {"n": 9, "majority": 3 / 9, "majority_answer": "(A)", "chance": 1 / 3}
    with pytest.raises(bigbench.TaskFileError, match="free-form"):
        bigbench.load_bbh("word_sorting", folder / "navigate.json")


def test_set_logprob_hand_computed():
    import math

    # log-likelihoods -1, -2, -3: P(second | set) = e^-2 / (e^-1 + e^-2 + e^-3)
    want = -2 - math.log(math.exp(-1) + math.exp(-2) + math.exp(-3))
    assert bigbench.set_logprob([(-1.0, 1), (-2.0, 3), (-3.0, 2)], 1) == pytest.approx(want, abs=1e-12)


def test_choice_scorer_equals_a_full_forward_per_answer(tiny_model):
    """One prompt forward + the answers from its cache give the same log-likelihoods as a separate
    forward of prompt + answer for each (the template's encoding, the answer ending at end-of-turn)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_model)
    model = AutoModelForCausalLM.from_pretrained(tiny_model).eval()
    scorer = bigbench.scorer_for(model, tok, template="default")
    answers = ("(A)", "(B)", "seven hundred")
    got = scorer.score("Add the two numbers. 3 + 4 =", answers)
    for (total, n), answer in zip(got, answers):
        prompt, resp = scorer.encode("Add the two numbers. 3 + 4 =", answer)
        resp = resp[:resp.index(tok.eos_token_id) + 1] if tok.eos_token_id in resp else resp
        ids = prompt + resp
        with torch.no_grad():
            logp = torch.log_softmax(model(torch.tensor([ids])).logits[0].float(), dim=-1)
        want = sum(float(logp[p - 1, ids[p]]) for p in range(len(prompt), len(ids)))
        assert n == len(resp)
        assert total == pytest.approx(want, abs=1e-4)
    rows = [{"instruction": "Add the two numbers. 3 + 4 =", "options": list(answers), "answer": answers[k]}
            for k in range(3)]
    res = bigbench.choice_eval(scorer, rows)
    best = max(range(3), key=lambda i: got[i][0])
    assert res["n"] == 3 and res["correct"] == [int(k == best) for k in range(3)]
    assert res["loglik"] == pytest.approx(sum(g[0] for g in got) / 3, abs=1e-4)


def test_probe_split_keeps_the_test_set_when_the_training_size_changes():
    import bbh_probe

    qs = list(range(50))
    train, test = bbh_probe.split(qs, 10, 20, seed=3)
    assert len(train) == 10 and len(test) == 20 and not set(train) & set(test)
    train2, test2 = bbh_probe.split(qs, 25, 20, seed=3)
    assert test2 == test and train2[:10] == train
    assert bbh_probe.split(qs, 10, 20, seed=4)[1] != test


def test_probe_refuses_an_unknown_or_free_form_task_in_one_line(capsys):
    import bbh_probe

    with pytest.raises(SystemExit) as exc:
        bbh_probe.main(["--tasks", "navigate,word_sorting"])
    assert exc.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert "--tasks: word_sorting not multiple-choice BBH tasks; choose from boolean_expressions" in err
