"""The core without a trainer: sampling, the cross-rank protocol (1 and 2 real gloo processes), rounds."""

from __future__ import annotations

import os
import socket
import traceback
from collections import Counter

import pytest
import torch
import torch.multiprocessing as mp

from dataflex.dist.agreement import AgreedFailure, Agreement
from dataflex.core.records import RunLog
from dataflex.modes.select import SelectRound
from dataflex.modes.weight import LocalSignals, WeightRound, normalise_weights
from dataflex.core.sampling import DomainSampler, largest_remainder
from dataflex.errors import SelectionError
from dataflex.schedule import Schedule
from dataflex.selectors.base import SelectionResult


# =========================================================================== counts and rows
@pytest.mark.parametrize("props, n, expected", [
    ([0.5, 0.5], 7, [4, 3]),            # tie: the lower domain index gets the leftover row
    ([0.2, 0.3, 0.5], 10, [2, 3, 5]),
    ([0.3333, 0.3333, 0.3334], 10, [3, 3, 4]),
    ([0.1, 0.1, 0.8], 4, [1, 0, 3]),    # exact 0.4 / 0.4 / 3.2: the leftover row goes to the largest fraction, ties to the lower index
    ([1.0, 0.0], 5, [5, 0]),
])
def test_largest_remainder_hand_computed(props, n, expected):
    got = largest_remainder(props, n)
    assert got == expected and sum(got) == n


def test_largest_remainder_is_within_one_of_exact():
    gen = torch.Generator().manual_seed(0)
    for _ in range(200):
        p = torch.rand(5, generator=gen).double()
        p /= p.sum()
        n = int(torch.randint(0, 500, (1,), generator=gen))
        counts = largest_remainder(p.tolist(), n)
        assert sum(counts) == n and all(abs(c - x * n) < 1 for c, x in zip(counts, p.tolist()))


def test_domain_sampler_without_replacement_then_reshuffles():
    s = DomainSampler([("a", 0, 5), ("b", 5, 8)], seed=3)
    first = s.take(0, 5)
    assert sorted(first) == [0, 1, 2, 3, 4] and s.take_reshuffles() == []
    more = s.take(0, 7)  # the domain is used up: a new permutation (a reshuffle) starts
    assert sorted(more[:5]) == [0, 1, 2, 3, 4] and s.take_reshuffles() == [("a", 1), ("a", 2)]
    assert more[:5] != first  # a different permutation
    assert all(5 <= r < 8 for r in s.take(1, 3))
    assert s.domain_of(0) == 0 and s.domain_of(7) == 1
    # resumable: the state reproduces the same continuation
    state = s.state_dict()
    t = DomainSampler([("a", 0, 5), ("b", 5, 8)], seed=3)
    t.load_state_dict(state)
    assert t.take(0, 4) == s.take(0, 4)


def test_domain_sampler_draw_counts_and_order():
    s = DomainSampler([("a", 0, 50), ("b", 50, 60)], seed=1)
    rows = s.draw([7, 3], seed_tag=0)
    assert Counter(s.domain_of(r) for r in rows) == Counter({0: 7, 1: 3}) and len(set(rows)) == 10
    blocks = s.draw_blocks([1, 0, 1], block=2)
    assert [s.domain_of(r) for r in blocks] == [1, 1, 0, 0, 1, 1]


# =========================================================================== the protocol, one process
def test_single_process_fence_raises_the_error_itself():
    a = Agreement()
    a.fence("ok")
    with pytest.raises(AgreedFailure, match=r"failed on rank 0 \(step x\): boom"):
        a.fence("step x", "boom")
    assert a.share("d", lambda: 5) == 5 and a.gather("g", 1) == [1]
    assert torch.equal(a.all_reduce("r", torch.ones(2)), torch.ones(2, dtype=torch.float64))
    with pytest.raises(ZeroDivisionError):  # one process: a section re-raises as it is
        with a.section("s"):
            1 / 0


# =========================================================================== the protocol, two gloo processes
def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _worker(rank: int, world: int, port: int, scenario: str, queue) -> None:
    import torch.distributed as dist

    os.environ.update({"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)})
    dist.init_process_group("gloo", rank=rank, world_size=world)
    a = Agreement(rank, world)
    try:
        if scenario == "decide":
            value = a.share("d", lambda: {"from": rank})
            parts = a.gather("g", rank * 10)
            total = a.all_reduce("r", torch.tensor([rank + 1.0]))
            queue.put((rank, "ok", (value, parts, float(total))))
        elif scenario == "mismatched":
            # rank 1 fails in local code and reports at *its* next fence, while rank 0 goes on to a
            # different protocol point (the engine's per-batch fence, then a gather): they still pair
            if rank == 1:
                _, err = a.attempt(lambda: 1 / 0, "selector")
                a.fence("selection 1", err)
            else:
                a.fence("scoring losses, batch 1/3")
                a.gather("scoring losses: gathering results", {0: [1.0]})
            queue.put((rank, "no error", None))
        elif scenario == "share_fails_on_rank0":
            a.share("d", lambda: 1 / 0)
            queue.put((rank, "no error", None))
    except AgreedFailure as err:
        queue.put((rank, "agreed", (err.rank, err.where, err.message)))
    except Exception:  # noqa: BLE001
        queue.put((rank, "crash", traceback.format_exc()))
    finally:
        dist.destroy_process_group()


def _run_two(scenario: str, timeout: float = 60) -> dict:
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    port = _free_port()
    procs = [ctx.Process(target=_worker, args=(r, 2, port, scenario, queue)) for r in range(2)]
    for p in procs:
        p.start()
    out = {}
    try:
        for _ in range(2):
            rank, kind, payload = queue.get(timeout=timeout)
            out[rank] = (kind, payload)
    finally:
        for p in procs:
            p.join(timeout=10)
            if p.is_alive():
                p.kill()
    return out


@pytest.mark.timeout(120)
def test_two_processes_share_gather_reduce():
    out = _run_two("decide")
    for rank in (0, 1):
        kind, (value, parts, total) = out[rank]
        assert kind == "ok" and value == {"from": 0} and parts == [0, 10] and total == 3.0


@pytest.mark.timeout(120)
def test_two_processes_failure_at_different_protocol_points_ends_both_with_the_message():
    out = _run_two("mismatched")
    for rank in (0, 1):
        kind, payload = out[rank]
        assert kind == "agreed", out
        assert payload == (1, "selection 1", "ZeroDivisionError: division by zero")


@pytest.mark.timeout(120)
def test_two_processes_failure_in_rank0_decision_reaches_rank1():
    out = _run_two("share_fails_on_rank0")
    assert out[0][0] == out[1][0] == "agreed"
    assert out[1][1] == (0, "d", "ZeroDivisionError: division by zero")


# =========================================================================== rounds without a trainer
class _FixedSelector:
    name = "fixed"

    def __init__(self, picks):
        self.picks = picks

    def select(self, ctx):
        return SelectionResult(list(self.picks[: ctx]), per_sample={"score": [float(i) for i in self.picks[: ctx]]},
                               summary={"pair": [1, 2]})

    def state_dict(self):
        return {}

    def load_state_dict(self, state):
        pass


def test_select_round_warmup_selection_order_and_records(tmp_path):
    schedule = Schedule.build(1, 2, 1, 2, 3)  # warm-up step 0, a selection of 2 steps at step 1
    sel = _FixedSelector(list(range(10, 20)))
    log = RunLog(tmp_path, "r")
    rnd = SelectRound(schedule, sel, lambda stretch, n: n, 20, Agreement(), log, seed=5, component="c")
    warm = rnd.rows(0)
    assert len(warm) == 2 and len(set(warm)) == 2
    step1, step2 = rnd.rows(1), rnd.rows(2)
    assert sorted(step1 + step2) == [10, 11, 12, 13]  # the selector's 4 picks, in the seeded order
    rec = __import__("json").loads((tmp_path / "r" / "step_1.json").read_text())
    assert rec["indices"] == step1 + step2
    # per-sample values travel with their index; the two-element summary is never reordered
    assert rec["per_sample"]["score"] == [float(i) for i in rec["indices"]] and rec["summary"] == {"pair": [1, 2]}
    state = rnd.state_dict()
    other = SelectRound(schedule, sel, lambda *a: (_ for _ in ()).throw(AssertionError("no new selection")), 20,
                        Agreement(), log, seed=5, component="c")
    other.load_state_dict(state)
    assert other.rows(2) == step2  # resumed inside the stretch: the same rows, no selection


def test_select_round_random_share_draws_the_rest_outside_the_picks(tmp_path):
    from types import SimpleNamespace

    from dataflex.errors import ConfigError
    from dataflex.selectors.loss import LossParams

    schedule = Schedule.build(0, 4, 1, 2, 4)  # one selection of 4 steps x 2 rows = 8 rows at step 0
    sel = _FixedSelector(list(range(10, 20)))
    sel.params = SimpleNamespace(random_share=0.25)  # round(0.25 x 8) = 2 random rows
    asked = []
    rows = []
    for _ in range(2):
        rnd = SelectRound(schedule, sel, lambda stretch, n: asked.append(n) or n, 40, Agreement(),
                          RunLog(tmp_path, "r"), seed=3, component="c")
        rows.append([i for step in range(4) for i in rnd.rows(step)])
    assert asked == [6, 6]  # the selector is asked for the other 6
    assert rows[0] == rows[1]  # seeded: the same draw every time (and on every rank)
    rec = __import__("json").loads((tmp_path / "r" / "step_0.json").read_text())
    flags = rec["per_sample"]["random_share"]
    chosen = [i for i, f in zip(rec["indices"], flags) if not f]
    extra = [i for i, f in zip(rec["indices"], flags) if f]
    assert sorted(chosen) == list(range(10, 16)) and len(extra) == 2 and len(set(extra)) == 2
    assert not set(extra) & set(range(10, 16)) and all(0 <= i < 40 for i in extra)
    assert [s for s, f in zip(rec["per_sample"]["score"], flags) if f] == [None, None]
    assert rec["summary"]["random_share"] == {"chosen": 6, "random": 2}
    for bad in (1.0, -0.1):
        with pytest.raises(ConfigError, match="'random_share'"):
            LossParams.from_dict("loss", {"random_share": bad})


def test_select_round_failure_is_one_selection_error():
    schedule = Schedule.build(0, 1, 1, 2, 1)

    class Bad(_FixedSelector):
        def select(self, ctx):
            raise KeyError("exp_avg")

    rnd = SelectRound(schedule, Bad([]), lambda s, n: n, 5, Agreement(), RunLog("/nonexistent", "r", enabled=False),
                      seed=1, component="c")
    with pytest.raises(SelectionError, match=r"selection 1 at step 0 \(selector 'fixed'\) failed on rank 0 "
                                             r"\(selection 1\): KeyError: 'exp_avg'"):
        rnd.rows(0)


def test_weights_are_normalised_to_mean_one_over_supervised_samples():
    w = normalise_weights(torch.tensor([1.0, 3.0, 5.0], dtype=torch.float64), torch.tensor([4, 0, 2]))
    assert w.tolist() == pytest.approx([2 * 1 / 6, 1.0, 2 * 5 / 6], rel=1e-15)
    ones = torch.ones(4, dtype=torch.float64)
    assert normalise_weights(ones, torch.tensor([1, 2, 3, 4])) is not ones  # a copy, exactly ones
    assert normalise_weights(ones, torch.tensor([1, 2, 3, 4])).tolist() == [1.0] * 4
    for bad in ([1.0, -1.0], [float("nan"), 1.0], [0.0, 0.0]):
        with pytest.raises(ValueError):
            normalise_weights(torch.tensor(bad, dtype=torch.float64), torch.tensor([1, 1]))


def test_weight_round_orders_samples_by_micro_batch_then_rank(tmp_path):
    class Echo:
        name = "echo"

        def weights(self, signals):
            self.seen = list(signals.indices)
            return torch.arange(1, len(signals.indices) + 1, dtype=torch.float64), {"k": 1.5}

        def state_dict(self):
            return {}

    echo = Echo()
    rnd = WeightRound(echo, 0, Agreement(), RunLog(tmp_path, "r"), seed=0, component="e")
    local = [LocalSignals([3, 4], torch.tensor([1, 1])), LocalSignals([5], torch.tensor([2]))]
    out = rnd.decide(7, local)
    assert echo.seen == [3, 4, 5]
    assert [t.tolist() for t in out] == [[0.5, 1.0], [1.5]]  # 1, 2, 3 rescaled to mean 1
    line = __import__("json").loads((tmp_path / "r" / "weights.jsonl").read_text())
    assert line["step"] == 7 and line["indices"] == [3, 4, 5] and line["k"] == 1.5 and line["ess"] == pytest.approx(36 / 14 / 1, rel=1e-3)
