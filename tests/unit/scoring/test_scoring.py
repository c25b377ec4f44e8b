"""The scoring engine: batched per-sample losses equal batch-size-1 losses, sharding over ranks, failures."""

from __future__ import annotations

import json
import os
import socket

import pytest
import torch

from dataflex.dist.agreement import Agreement
from dataflex.scoring.engine import ScoringEngine, dataset_lengths, length_batches, public_dataset_lengths
from dataflex.scoring.losses import sample_loss_sums, token_loss_sums, token_losses


@pytest.fixture(scope="module")
def lf_pipeline(tiny_model, data_dir, tmp_path_factory):
    """Tiny LoRA model, demo data tokenized and collated by LLaMA-Factory itself (no training)."""
    from support.helpers import load_lf_pipeline

    return load_lf_pipeline(tiny_model, tmp_path_factory.mktemp("pipeline"))


def _rows_with_masked(dataset, n_masked=3):
    rows = [dataset[i] for i in range(len(dataset))]
    for r in rows[:n_masked]:  # copies whose every label is masked (e.g. response cut by cutoff_len)
        rows.append({**r, "labels": [-100] * len(r["labels"])})
    return rows


def _batch1_losses(model, collator, rows):
    model.eval()
    out = []
    with torch.no_grad():
        for r in rows:
            if all(l == -100 for l in r["labels"]):
                out.append(float("nan"))
                continue
            batch = collator([r])
            out.append(model(**batch).loss.item())
    return torch.tensor(out, dtype=torch.float64)


def test_batched_losses_equal_batch1(lf_pipeline):
    model, collator = lf_pipeline["model"], lf_pipeline["collator"]
    rows = _rows_with_masked(lf_pipeline["train_dataset"])
    lengths = [len(r["input_ids"]) for r in rows]
    assert len(set(lengths)) > 5  # real padding happens inside batches
    model.train()
    engine = ScoringEngine(model, collator, "cpu", show_progress=False)
    batched = engine.losses(rows, range(len(rows)), batch_size=7)
    assert model.training  # training mode restored
    reference = _batch1_losses(model, collator, rows)
    assert torch.equal(torch.isnan(batched), torch.isnan(reference))
    assert int(torch.isnan(batched).sum()) == 3
    valid = ~torch.isnan(reference)
    assert torch.allclose(batched[valid], reference[valid], atol=1e-5, rtol=0)
    # a subset in another order comes back aligned with the indices asked for
    subset = [5, 0, len(rows) - 1, 17]
    again = engine.losses(rows, subset, batch_size=3)
    assert torch.allclose(again, batched[subset], atol=1e-6, equal_nan=True)
    # the decision work: every row of each map forwarded once, with its non-padding length (masked rows too)
    assert engine.work.as_dict() == {"forward_tokens": sum(lengths) + sum(lengths[i] for i in subset),
                                     "backward_tokens": 0}


def test_scoring_is_deterministic_and_dropout_free(lf_pipeline):
    model, collator = lf_pipeline["model"], lf_pipeline["collator"]
    ds = lf_pipeline["train_dataset"]
    model.train()  # LoRA dropout 0.1 active in training mode: scoring must switch it off
    engine = ScoringEngine(model, collator, "cpu", show_progress=False)
    a = engine.losses(ds, range(20), 4)
    b = engine.losses(ds, range(20), 16)
    assert torch.allclose(a, b, atol=1e-6)


def test_length_batches_groups_by_length():
    lengths = [5, 50, 7, 49, 6, 51]
    batches = length_batches(lengths, range(6), 2)
    assert batches == [[5, 1], [3, 2], [4, 0]]
    with pytest.raises(ValueError):
        length_batches(lengths, range(6), 0)


def test_token_loss_sums_hand_computed():
    # two rows, vocab 2; uniform logits -> every supervised token costs ln 2
    logits = torch.zeros(2, 4, 2)
    labels = torch.tensor([[-100, 1, 0, -100], [-100, -100, -100, -100]])
    sums, counts = token_loss_sums(logits[:, :-1], labels[:, 1:])  # causal shift
    assert counts.tolist() == [2, 0]
    assert sums[0].item() == pytest.approx(2 * torch.log(torch.tensor(2.0)).item())
    assert sums[1].item() == 0.0


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _sharded_worker(rank, world, port, model_dir, rows_path, out_path, fault):
    import torch.distributed as dist
    from transformers import AutoModelForCausalLM, AutoTokenizer, DataCollatorForSeq2Seq

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        torch.manual_seed(0)
        model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
        tok = AutoTokenizer.from_pretrained(model_dir)
        collator = DataCollatorForSeq2Seq(tok, label_pad_token_id=-100)
        rows = json.loads(open(rows_path).read())
        engine = ScoringEngine(model, collator, "cpu", agreement=Agreement(rank, world), show_progress=False)
        if fault is not None:  # (where, rank): fail this rank's first batch, in collation or inside the forward
            where, bad = fault
            if rank == bad and where == "collate":
                def prepare(*a, **k):
                    raise RuntimeError(f"injected collate fault on rank {rank}")
                engine.prepare = prepare
            if rank == bad and where == "forward":
                def hook(module, args):
                    raise RuntimeError(f"injected forward fault on rank {rank}")
                model.model.layers[1].register_forward_pre_hook(hook)
        try:
            losses = engine.losses(rows, range(len(rows)), batch_size=4)
            result = {"losses": [None if v != v else v for v in losses.tolist()], "forwards": engine.forward_passes,
                      "work": engine.work.as_dict()}
        except Exception as err:  # noqa: BLE001
            result = {"error": str(err), "forwards": engine.forward_passes}
        with open(f"{out_path}.{rank}", "w") as fh:
            json.dump(result, fh)
    finally:
        dist.destroy_process_group()


def _run_sharded(tiny_model, rows, tmp_path, fault=None):
    import torch.multiprocessing as mp

    rows_path = tmp_path / "rows.json"
    rows_path.write_text(json.dumps(rows))
    out = tmp_path / "out"
    mp.start_processes(_sharded_worker, args=(2, _free_port(), str(tiny_model), str(rows_path), str(out), fault),
                       nprocs=2, join=True, start_method="spawn")
    return [json.loads((tmp_path / f"out.{r}").read_text()) for r in range(2)]


def _plain_rows(n=11):
    g = torch.Generator().manual_seed(1)
    rows = []
    for i in range(n):
        length = int(torch.randint(4, 30, (1,), generator=g))
        ids = torch.randint(1, 400, (length,), generator=g).tolist()
        cut = length // 2
        labels = [-100] * length if i == 4 else [-100] * cut + ids[cut:]
        rows.append({"input_ids": ids, "attention_mask": [1] * length, "labels": labels})
    return rows


@pytest.mark.timeout(180)
def test_two_ranks_give_the_one_rank_scores(tiny_model, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer, DataCollatorForSeq2Seq

    rows = _plain_rows()  # 11 rows / batch 4 = 3 batches: rank 1 runs one padding forward
    results = _run_sharded(tiny_model, rows, tmp_path)
    model = AutoModelForCausalLM.from_pretrained(str(tiny_model), dtype=torch.float32)
    collator = DataCollatorForSeq2Seq(AutoTokenizer.from_pretrained(str(tiny_model)), label_pad_token_id=-100)
    single = ScoringEngine(model, collator, "cpu", show_progress=False).losses(rows, range(len(rows)), 4)
    for res in results:
        got = torch.tensor([float("nan") if v is None else v for v in res["losses"]], dtype=torch.float64)
        assert torch.allclose(got, single, atol=1e-6, equal_nan=True)
    assert [r["forwards"] for r in results] == [2, 2]  # equal forward counts on every rank
    # the work is the whole run's, the same on both ranks and equal to one process's: rank 1's repeated
    # batch is not counted
    tokens = sum(len(r["input_ids"]) for r in rows)
    assert [r["work"] for r in results] == [{"forward_tokens": tokens, "backward_tokens": 0}] * 2


@pytest.mark.timeout(180)
@pytest.mark.parametrize("where", ["collate", "forward"])
def test_a_failure_on_one_rank_stops_every_rank_before_the_next_forward(tiny_model, tmp_path, where):
    results = _run_sharded(tiny_model, _plain_rows(), tmp_path, fault=(where, 1))
    for res in results:
        assert res["error"].startswith("failed on rank 1 (scoring losses, batch 1/2")
        assert f"RuntimeError: injected {where} fault on rank 1" in res["error"]
    # every rank meets at a fence before each forward: a failure in collation stops both before their
    # first forward, one inside the first forward stops both before their second (each has two batches)
    expected = 0 if where == "collate" else 1
    assert [r["forwards"] for r in results] == [expected, expected]


def test_dataset_lengths_fast_path_equals_the_public_api(lf_pipeline):
    ds = lf_pipeline["train_dataset"]
    mapped = ds.shuffle(seed=3).select(range(0, len(ds), 2))  # an index mapping over the Arrow table
    for d in (ds, mapped):
        assert dataset_lengths(d) == public_dataset_lengths(d) == [len(d[i]["input_ids"]) for i in range(len(d))]


def test_token_losses_and_sample_sums_agree():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(3, 6, 11, generator=g)
    labels = torch.randint(0, 11, (3, 6), generator=g)
    labels[0, :3] = -100
    labels[2] = -100
    per_token, mask = token_losses(logits, labels)
    sums, counts = sample_loss_sums(logits, labels)
    assert counts.tolist() == [3, 5, 0] == mask.sum(dim=1).tolist()
    assert torch.allclose(per_token.sum(dim=1), sums, atol=1e-6)
    # by hand: row 1, position 0 predicts labels[1, 1]
    expected = -torch.log_softmax(logits[1, 0], dim=-1)[labels[1, 1]]
    assert per_token[1, 0].item() == pytest.approx(expected.item(), rel=1e-6)
