"""End to end on real LLaMA-Factory 0.9.5 with the tiny model: `random` on 1 and 2 processes,
export of the adapter, and a plain YAML that must train exactly like `llamafactory-cli train`.

Each LLaMA-Factory run costs 10-30 s here, so every run is a module-scoped fixture shared by
several tests. DATAFLEX_TRACE_DIR makes every rank log the sample ids of each micro-batch it
trains on, in order; the tests rebuild from the schedule what each (step, micro, rank) must get.
"""

from __future__ import annotations

import json
import math
import re
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from support.helpers import llamafactory_cli, records, run_command, traces, write_yaml

from dataflex.args import DATAFLEX_KEYS
from dataflex.schedule import Schedule, rank_micro_batch, total_steps
from dataflex.selectors.base import uniform_draw
from dataflex.seeding import seeded_generator

pytestmark = pytest.mark.e2e

SEED = 42
TRAIN_SIZE = 200  # max_samples
PER_DEVICE, GA = 2, 2
WARMUP, UPDATE, TIMES = 2, 2, 2


@dataclass
class Run:
    out: Path
    world: int
    log: str
    trace: dict[int, list[dict]]  # rank -> trace lines in file order
    records: dict[int, dict]  # start step -> record

    @property
    def global_batch(self) -> int:
        return PER_DEVICE * GA * self.world

    @property
    def schedule(self) -> Schedule:
        return Schedule.build(WARMUP, UPDATE, TIMES, self.global_batch, total_steps(WARMUP, UPDATE, TIMES, self.global_batch))

    def state(self) -> dict:
        return json.loads((self.out / "trainer_state.json").read_text())

    def micro_batches(self, step: int, rank: int) -> list[list[int]]:
        return [line["indices"] for line in self.trace[rank] if line["step"] == step]


def _train(folder: Path, make_train_yaml, run_cli, world: int, timeout: float) -> Run:
    config = make_train_yaml(folder, component_name="random", seed=SEED, max_samples=TRAIN_SIZE, per_device_train_batch_size=PER_DEVICE,
                             gradient_accumulation_steps=GA, warmup_step=WARMUP, update_step=UPDATE,
                             update_times=TIMES, num_train_epochs=1.0)
    env = {"DATAFLEX_TRACE_DIR": str(folder / "trace")}
    if world > 1:
        env.update({"FORCE_TORCHRUN": "1", "NPROC_PER_NODE": str(world)})
    result = run_cli(["train", config], env=env, cwd=folder, timeout=timeout)
    log = result.stdout + result.stderr
    assert result.returncode == 0, log[-5000:]
    out = folder / "out"
    return Run(out, world, log, traces(folder / "trace"), records(out))


@pytest.fixture(scope="module")
def run1(tmp_path_factory, make_train_yaml, run_cli) -> Run:
    """One process, G = 2 x 2 x 1 = 4: 2 warm-up steps, selections at steps 2 and 4."""
    return _train(tmp_path_factory.mktemp("random1"), make_train_yaml, run_cli, world=1, timeout=300)


@pytest.fixture(scope="module")
def run2(tmp_path_factory, make_train_yaml, run_cli) -> Run:
    """FORCE_TORCHRUN=1 NPROC_PER_NODE=2, same YAML: G = 2 x 2 x 2 = 8."""
    return _train(tmp_path_factory.mktemp("random2"), make_train_yaml, run_cli, world=2, timeout=300)


def expected_random_record(n: int, selection: int) -> list[int]:
    """What `random` draws for a selection, in the consumption order (the seeded shuffle)."""
    drawn, _ = uniform_draw(TRAIN_SIZE, n, seeded_generator(SEED, "select", selection))
    perm = torch.randperm(n, generator=seeded_generator(SEED, "order", selection)).tolist()
    return [drawn[p] for p in perm]


# --------------------------------------------------------------------------- checks shared by 1 and 2 processes
def check_step_count(run: Run) -> None:
    sched = run.schedule
    assert sched.total_steps == 6
    state = run.state()
    assert state["global_step"] == sched.total_steps
    assert state["max_steps"] == sched.total_steps
    results = json.loads((run.out / "all_results.json").read_text())
    assert results["dataflex_selections"] == 2


def check_records(run: Run) -> None:
    sched = run.schedule
    assert sorted(run.records) == [s.start_step for s in sched.updates] == [2, 4]
    folder = Path(json.loads((run.out / "dataflex" / "run.json").read_text())["records"])
    assert folder.parent == run.out / "dataflex"  # <cache_dir>/<run id>/
    names = sorted(p.name for p in folder.iterdir())
    assert names == ["step_2.json", "step_4.json"], names  # no temp files left
    run_ids = set()
    for stretch in sched.updates:
        rec = run.records[stretch.start_step]
        n = sched.samples_for(stretch)
        assert n == run.global_batch * UPDATE
        assert len(rec["indices"]) == n
        assert all(isinstance(i, int) and 0 <= i < TRAIN_SIZE for i in rec["indices"])
        assert rec["selector"] == "random" and rec["component"] == "random"
        assert rec["step"] == stretch.start_step and rec["selection"] == stretch.number
        assert rec["num_steps"] == stretch.num_steps
        assert re.fullmatch(r"\d{8}-\d{6}-[0-9a-f]{6}", rec["run_id"]) and rec["run_id"] == folder.name
        assert rec["per_sample"] == {} and rec["summary"] == {"replacement": False}
        # exactly the seeded draw + seeded consumption order, on any number of processes
        assert rec["indices"] == expected_random_record(n, stretch.number)
        run_ids.add(rec["run_id"])
    assert len(run_ids) == 1


def check_trace(run: Run) -> None:
    sched, g = run.schedule, run.global_batch
    assert sorted(run.trace) == list(range(run.world)), "one trace file per rank"
    for rank, lines in run.trace.items():
        steps = [line["step"] for line in lines]
        assert steps == sorted(steps) and len(lines) == sched.total_steps * GA, f"rank {rank}"

    warmups = [s for s in sched.stretches if not s.is_update]
    for stretch in sched.stretches:
        if stretch.is_update:
            indices = run.records[stretch.start_step]["indices"]
        else:
            n = sched.samples_for(stretch)
            indices, _ = uniform_draw(TRAIN_SIZE, n, seeded_generator(SEED, "warmup", stretch.cycle))
        consumed = Counter()
        for step in range(stretch.start_step, stretch.end_step):
            j = step - stretch.start_step
            step_indices = indices[j * g:(j + 1) * g]
            assert len(step_indices) == g
            for rank in range(run.world):
                got = run.micro_batches(step, rank)
                want = [rank_micro_batch(step_indices, m, rank, PER_DEVICE, run.world) for m in range(GA)]
                assert got == want, f"step {step} rank {rank}"
                consumed.update(i for micro in got for i in micro)
        # the multiset trained on in the stretch is the draw / the selector's output
        assert consumed == Counter(indices), f"stretch at step {stretch.start_step}"

    assert len(warmups) == 1
    warm = [i for step in range(WARMUP) for r in range(run.world) for mb in run.micro_batches(step, r) for i in mb]
    assert len(warm) == len(set(warm)) == WARMUP * g  # warm-up draws without replacement


# --------------------------------------------------------------------------- (a) one process
def test_one_process_step_count(run1):
    assert run1.global_batch == 4
    check_step_count(run1)


def test_one_process_records(run1):
    check_records(run1)
    assert all(len(r["indices"]) == 8 for r in run1.records.values())


def test_one_process_trace_matches_schedule(run1):
    check_trace(run1)


def test_one_process_warmup_is_eight_distinct(run1):
    warm = [i for step in (0, 1) for mb in run1.micro_batches(step, 0) for i in mb]
    assert len(warm) == 8 and len(set(warm)) == 8


def test_one_process_outputs_and_logs(run1):
    for name in ("adapter_model.safetensors", "adapter_config.json", "trainer_state.json"):
        assert (run1.out / name).is_file(), name
    assert "selection 1/2 at step 2 by 'random'" in run1.log
    assert "selection 2/2 at step 4 by 'random'" in run1.log
    losses = [h["loss"] for h in run1.state()["log_history"] if "loss" in h]
    assert len(losses) == 6 and all(math.isfinite(x) for x in losses)


# --------------------------------------------------------------------------- (b) two processes
def test_two_processes_step_count(run2):
    assert run2.global_batch == 8
    assert "torch.distributed.run" in run2.log and "--nproc_per_node 2" in run2.log
    check_step_count(run2)


def test_two_processes_records_written_once(run2):
    check_records(run2)
    assert all(len(r["indices"]) == 16 for r in run2.records.values())
    for k, step in enumerate((2, 4), start=1):
        assert run2.log.count(f"selection {k}/2 at step {step} by 'random'") == 1


def test_two_processes_traces_reproduce_each_step(run2):
    check_trace(run2)
    for step in range(6):  # each rank trains on its own half of every step: 2 micro-batches x 2 samples
        for rank in (0, 1):
            assert [len(mb) for mb in run2.micro_batches(step, rank)] == [PER_DEVICE] * GA
    for step in range(WARMUP):  # the warm-up draw is without replacement: the halves are disjoint
        r0 = {i for mb in run2.micro_batches(step, 0) for i in mb}
        r1 = {i for mb in run2.micro_batches(step, 1) for i in mb}
        assert r0.isdisjoint(r1)


def test_two_processes_adapter(run2):
    assert (run2.out / "adapter_model.safetensors").is_file()


# --------------------------------------------------------------------------- (c) export
def test_llamafactory_export_merges_adapter(run1, tiny_model, tmp_path):
    from safetensors.torch import load_file

    export_dir = tmp_path / "merged"
    config = write_yaml(tmp_path / "export.yaml", {
        "model_name_or_path": str(tiny_model),
        "adapter_name_or_path": str(run1.out),
        "template": "default",
        "trust_remote_code": True,
        "export_dir": str(export_dir),
        "export_size": 1,
        "export_device": "cpu",
        "export_legacy_format": False,
    })
    result = run_command([*llamafactory_cli(), "export", config], cwd=tmp_path, timeout=300)
    assert result.returncode == 0, (result.stdout + result.stderr)[-5000:]
    assert (export_dir / "config.json").is_file()
    assert (export_dir / "model.safetensors").is_file()
    merged, base = load_file(export_dir / "model.safetensors"), load_file(tiny_model / "model.safetensors")
    assert set(base) <= set(merged)
    assert not any("lora" in k for k in merged)
    changed = [k for k in base if not torch.equal(base[k], merged[k])]
    assert changed, "merging the adapter changed no weight"


# --------------------------------------------------------------------------- (d) no DataFlex keys
PLAIN_SAMPLES, PLAIN_EPOCHS = 90, 2  # 90 / (2 x 2) does not divide: the last step of an epoch is short


@pytest.fixture(scope="module")
def plain_runs(tmp_path_factory, make_train_yaml, run_cli):
    folder = tmp_path_factory.mktemp("plain")
    drop = {key: None for key in DATAFLEX_KEYS}
    config = make_train_yaml(folder, "plain.yaml", seed=SEED, max_samples=PLAIN_SAMPLES,
                             num_train_epochs=float(PLAIN_EPOCHS), **drop)
    text = config.read_text()
    assert not any(f"{key}:" in text for key in DATAFLEX_KEYS)
    ours = run_cli(["train", config, f"output_dir={folder / 'dataflex_out'}"], cwd=folder, timeout=300)
    assert ours.returncode == 0, (ours.stdout + ours.stderr)[-5000:]
    theirs = run_command([*llamafactory_cli(), "train", config, f"output_dir={folder / 'llamafactory_out'}"],
                         cwd=folder, timeout=300)
    assert theirs.returncode == 0, (theirs.stdout + theirs.stderr)[-5000:]
    return folder / "dataflex_out", folder / "llamafactory_out", ours.stdout + ours.stderr


def _state(out: Path) -> dict:
    return json.loads((out / "trainer_state.json").read_text())


def test_plain_yaml_step_count(plain_runs):
    ours, theirs, log = plain_runs
    found = re.findall(r"Num examples = ([\d,]+)", log)
    assert found, "transformers did not log the number of examples"
    n_train = int(found[0].replace(",", ""))
    assert n_train == PLAIN_SAMPLES
    expected = math.ceil(n_train / (PER_DEVICE * GA)) * PLAIN_EPOCHS
    assert _state(ours)["global_step"] == _state(ours)["max_steps"] == expected == 46
    assert _state(theirs)["global_step"] == expected


def test_plain_yaml_has_no_dataflex_traces(plain_runs):
    ours, _, log = plain_runs
    assert not (ours / "dataflex").exists()
    assert "[DataFlex]" not in log
    assert not any(k.startswith("dataflex") for k in json.loads((ours / "all_results.json").read_text()))


def test_plain_yaml_matches_llamafactory_exactly(plain_runs):
    from safetensors.torch import load_file

    ours, theirs, _ = plain_runs
    h1 = [h for h in _state(ours)["log_history"] if "loss" in h]
    h2 = [h for h in _state(theirs)["log_history"] if "loss" in h]
    assert len(h1) == len(h2) == 46
    assert [h["loss"] for h in h1] == [h["loss"] for h in h2]
    assert [h["learning_rate"] for h in h1] == [h["learning_rate"] for h in h2]
    a1, a2 = load_file(ours / "adapter_model.safetensors"), load_file(theirs / "adapter_model.safetensors")
    assert a1.keys() == a2.keys()
    assert all(torch.equal(a1[k], a2[k]) for k in a1)
