"""cluster_less against full LESS, and the exact neighbour search of near / tsds.

(Named so, not selectors.py: a script folder on sys.path would shadow the standard library's
``selectors`` module.)

1. On the tiny model after a few AdamW steps, ``less`` and ``cluster_less`` each rank the whole
   pool once (``num_samples`` = pool size, so the selection is the full ranking). Reported: the
   overlap of their top-k sets (k = 5, 10, 25 % of the pool; chance is k / N), the Spearman
   correlation of the two rankings, the training gradients each computed and the time ratio.
2. ``top_k`` on random unit vectors with the chunked torch search and, when installed, faiss:
   seconds and whether the neighbour lists agree.

Writes ``bench/out/selectors.json`` and prints a markdown table. One torch thread by default
(see docs/benchmarks.md for why).

    python bench/selector_agreement.py                 # ~1-2 min on one CPU thread
    python bench/selector_agreement.py --samples 120 --quick
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import ROOT, pipeline  # noqa: E402


def spearman(a: list[int], b: list[int]) -> float:
    """Spearman's rho of two rankings (lists of the same ids, best first)."""
    n = len(a)
    pos_b = {v: i for i, v in enumerate(b)}
    d2 = sum((i - pos_b[v]) ** 2 for i, v in enumerate(a))
    return 1 - 6 * d2 / (n * (n * n - 1))


def ranking_agreement(args) -> dict:
    import torch

    from dataflex.scoring.engine import ScoringEngine
    from dataflex.selectors.base import SelectionContext
    from dataflex.selectors.cluster_less import ClusterLessParams, ClusterLessSelector
    from dataflex.selectors.less import LessParams, LessSelector

    tmp = tempfile.mkdtemp(prefix="dataflex-bench-selectors-")
    parts = pipeline(tmp, args.samples, args.cutoff, eval_file=str(ROOT / "data" / "demo_add_eval.json"))
    model, train, evals, collator = parts["model"], parts["train_dataset"], parts["eval_dataset"], parts["collator"]
    n = len(train)
    trainable = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(trainable, lr=1e-3)
    gen = torch.Generator().manual_seed(0)
    model.train()
    for _ in range(5):  # real Adam moments to precondition with
        ids = torch.randperm(n, generator=gen)[:8].tolist()
        opt.zero_grad()
        model(**collator([train[i] for i in ids])).loss.backward()
        opt.step()
    opt.zero_grad(set_to_none=True)
    engine = ScoringEngine(model, collator, "cpu", show_progress=False)

    def ctx():
        return SelectionContext(step=5, selection=0, num_selections=1, num_samples=n, train_dataset=train,
                                scorer=engine, generator=torch.Generator().manual_seed(1), eval_dataset=evals,
                                optimizer=opt, learning_rate=1e-3, cache_dir=tmp)  # not ./embeddings

    less = LessSelector(LessParams.from_dict("less", {"proj_dim": args.proj_dim, "seed": 7}))
    start = time.perf_counter()
    full = less.select(ctx()).indices
    less_s = time.perf_counter() - start
    rows = []
    for per_cluster in args.samples_per_cluster:
        cl = ClusterLessSelector(ClusterLessParams.from_dict("cluster_less", {
            "proj_dim": args.proj_dim, "seed": 7, "cluster_size": args.cluster_size,
            "samples_per_cluster": per_cluster}))
        cl.clustering(ctx())  # embedding and k-means once, as in training (not part of a selection's cost)
        start = time.perf_counter()
        res = cl.select(ctx())
        seconds = time.perf_counter() - start
        ranked = res.indices
        row = {"samples_per_cluster": per_cluster, "clusters": res.summary["clusters"],
               "gradients": res.summary["representatives"], "seconds": round(seconds, 3),
               "time_ratio": round(seconds / less_s, 3), "spearman": round(spearman(full, ranked), 4)}
        for frac in (0.05, 0.10, 0.25):
            k = max(1, int(frac * n))
            row[f"overlap@{int(frac * 100)}%"] = round(len(set(full[:k]) & set(ranked[:k])) / k, 3)
        rows.append(row)
    return {"pool": n, "eval": len(evals), "less": {"gradients": n, "seconds": round(less_s, 3)}, "cluster_less": rows}


def search_speed(args) -> dict:
    import torch

    from dataflex.scoring.neighbours import top_k

    gen = torch.Generator().manual_seed(0)
    keys = torch.nn.functional.normalize(torch.randn(args.keys, args.dim, generator=gen), dim=1)
    queries = torch.nn.functional.normalize(torch.randn(args.queries, args.dim, generator=gen), dim=1)
    out = {"keys": args.keys, "queries": args.queries, "dim": args.dim, "k": args.k}
    start = time.perf_counter()
    _, ids_t = top_k(queries, keys, args.k)
    out["torch_s"] = round(time.perf_counter() - start, 4)
    try:
        import faiss  # noqa: F401
    except ImportError:
        out["faiss_s"] = None
        out["note"] = "faiss not installed (pip install faiss-cpu)"
        return out
    start = time.perf_counter()
    _, ids_f = top_k(queries, keys, args.k, backend="faiss")
    out["faiss_s"] = round(time.perf_counter() - start, 4)
    out["same_neighbours"] = float((ids_t == ids_f).float().mean())
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--samples", type=int, default=400)
    ap.add_argument("--cutoff", type=int, default=128)
    ap.add_argument("--proj-dim", type=int, default=1024)
    ap.add_argument("--cluster-size", type=int, default=32)
    ap.add_argument("--samples-per-cluster", type=int, nargs="+", default=[2, 4, 8])
    ap.add_argument("--keys", type=int, default=50000)
    ap.add_argument("--queries", type=int, default=500)
    ap.add_argument("--dim", type=int, default=512)
    ap.add_argument("--k", type=int, default=100)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--quick", action="store_true", help="small sizes: a smoke run")
    ap.add_argument("--out", type=Path, default=ROOT / "bench" / "out")
    args = ap.parse_args(argv)
    if args.quick:
        args.samples, args.keys, args.queries, args.samples_per_cluster = min(args.samples, 120), 2000, 50, [2]
    import torch

    torch.set_num_threads(args.threads)
    result = {"ranking": ranking_agreement(args), "search": search_speed(args)}
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "selectors.json").write_text(json.dumps(result, indent=2))
    r = result["ranking"]
    print(f"pool {r['pool']} samples, eval {r['eval']}; less: {r['less']['gradients']} gradients in "
          f"{r['less']['seconds']}s")
    cols = ["samples_per_cluster", "clusters", "gradients", "time_ratio", "spearman", "overlap@5%", "overlap@10%",
            "overlap@25%"]
    print("| " + " | ".join(cols) + " |\n|" + " --- |" * len(cols))
    for row in r["cluster_less"]:
        print("| " + " | ".join(str(row[c]) for c in cols) + " |")
    s = result["search"]
    print(f"search {s['queries']} x {s['keys']} (dim {s['dim']}, k {s['k']}): torch {s['torch_s']}s, "
          f"faiss {s['faiss_s']}s {s.get('note', '')}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
