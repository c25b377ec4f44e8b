"""near, tsds, cluster_less and nice: their maths against hand-computed values and independent oracles.

The TSDS plan is checked against a general LP solver (scipy's HiGHS) on the same problem, the
neighbour search against a brute-force sort, k-means against planted clusters; the reward API
against a stub server on 127.0.0.1 that records what it was sent.
"""

from __future__ import annotations

import http.server
import json
import logging
import threading

import numpy as np
import pytest
import torch

from dataflex.errors import ConfigError
from dataflex.scoring.neighbours import top_k
from dataflex.scoring.rewards import Reward, parse_score
from dataflex.selectors.cluster_less import kmeans, representatives
from dataflex.selectors.near import NearParams, NearSelector, round_robin
from dataflex.selectors.tsds import TsdsParams, TsdsSelector, densities, tsds_probabilities


def unit(x: torch.Tensor) -> torch.Tensor:
    return x / x.norm(dim=1, keepdim=True)


# ---- near ----------------------------------------------------------------------------------------

def test_round_robin_goes_column_by_column_and_skips_taken_rows():
    ids = torch.tensor([[3, 1, 2], [1, 4, 0]])
    # column 0: 3, 1; column 1: 1 (taken), 4; column 2: 2, 0
    assert round_robin(ids, 4) == ([3, 1, 4, 2], [0, 0, 1, 2], False)
    picks, ranks, repeated = round_robin(ids, 7)
    assert picks == [3, 1, 4, 2, 0, 3, 1] and repeated
    assert round_robin(torch.tensor([[-1, 5]]), 1) == ([5], [1], False)  # ids < 0 are padding


def test_top_k_matches_a_brute_force_sort_and_never_returns_empty_rows():
    gen = torch.Generator().manual_seed(0)
    keys = unit(torch.randn(50, 8, generator=gen))
    keys[7] = float("nan")  # a sample without tokens
    queries = unit(torch.randn(5, 8, generator=gen))
    sims, idx = top_k(queries, keys, 10, chunk=2)
    for q in range(5):
        s = [(float(queries[q] @ keys[j]), j) for j in range(50) if j != 7]
        best = sorted(s, key=lambda t: -t[0])[:10]
        assert idx[q].tolist() == [j for _, j in best]
        assert sims[q].tolist() == pytest.approx([v for v, _ in best], abs=1e-6)


@pytest.mark.parametrize("backend", ["torch", "faiss"])
def test_k_beyond_the_rows_with_tokens_returns_only_those_rows(backend):
    """k >= the number of valid keys: the NaN row (a sample without tokens) used to come back as the
    last neighbour, and near's round-robin then picked it."""
    if backend == "faiss":
        pytest.importorskip("faiss")
    keys = torch.tensor([[1.0, 0.0], [0.0, 1.0], [float("nan"), float("nan")], [0.6, 0.8]])
    sims, ids = top_k(torch.tensor([[1.0, 0.0]]), keys, 10, backend=backend)
    assert ids.tolist() == [[0, 3, 1]]
    assert sims.tolist() == [pytest.approx([1.0, 0.6, 0.0])]
    picks, _, repeated = round_robin(ids, 4)  # what near does with them
    assert picks == [0, 3, 1, 0] and repeated


def test_faiss_backend_finds_the_same_neighbours_as_torch():
    pytest.importorskip("faiss")  # in the test extra; skipped only where it was left out on purpose
    gen = torch.Generator().manual_seed(3)
    keys = unit(torch.randn(500, 32, generator=gen))
    keys[[4, 250]] = float("nan")
    queries = unit(torch.randn(20, 32, generator=gen))
    sims_t, idx_t = top_k(queries, keys, 25)
    sims_f, idx_f = top_k(queries, keys, 25, backend="faiss")
    assert idx_f.tolist() == idx_t.tolist() and not ({4, 250} & set(idx_f.flatten().tolist()))
    assert torch.allclose(sims_f, sims_t, atol=1e-5)


def test_near_precision_on_planted_neighbours():
    gen = torch.Generator().manual_seed(1)
    queries = unit(torch.randn(4, 16, generator=gen))
    pool = unit(torch.randn(60, 16, generator=gen))
    planted = [5, 17, 33, 48]
    for q, row in enumerate(planted):  # one pool row sits right next to each query
        pool[row] = unit(queries[q:q + 1] + 0.01 * torch.randn(1, 16, generator=gen))[0]
    _, ids = top_k(queries, pool, 3)
    picks, ranks, _ = round_robin(ids, 4)
    assert picks == planted and ranks == [0, 0, 0, 0]


def test_near_indices_path_is_checked_before_training(tmp_path):
    flat = tmp_path / "flat.npy"
    np.save(flat, np.arange(5))
    with pytest.raises(ConfigError, match=r"param 'indices_path' = .* holds a 1-D int64 array; allowed: a 2-D integer"):
        NearParams.from_dict("near", {"indices_path": str(flat)})
    with pytest.raises(ConfigError, match=r"param 'indices_path' = '.*missing.npy' cannot be read"):
        NearParams.from_dict("near", {"indices_path": str(tmp_path / "missing.npy")})
    good = tmp_path / "ids.npy"
    np.save(good, np.array([[0, 3], [9, 1]]))
    sel = NearSelector(NearParams.from_dict("near", {"indices_path": str(good)}))
    sel.check_data(10, 2)
    with pytest.raises(ConfigError, match=r"names row 9, outside the training set \[0, 8\)"):
        sel.check_data(8, 2)


# ---- tsds ----------------------------------------------------------------------------------------

def lp_plan(dist: np.ndarray, rho: np.ndarray, alpha: float, C: float) -> np.ndarray:
    """The TSDS problem solved by a general LP solver: variables γ [M, K] and the cap t."""
    from scipy.optimize import linprog

    M, K = dist.shape
    c = np.concatenate([alpha / C * dist.reshape(-1), [(1 - alpha) * M]])
    a_eq = np.zeros((M, M * K + 1))
    for i in range(M):
        a_eq[i, i * K:(i + 1) * K] = 1
    a_ub = np.zeros((M * K, M * K + 1))
    for r in range(M * K):  # ρ_ij γ_ij − t <= 0
        a_ub[r, r] = rho.reshape(-1)[r]
        a_ub[r, -1] = -1
    res = linprog(c, A_ub=a_ub, b_ub=np.zeros(M * K), A_eq=a_eq, b_eq=np.full(M, 1 / M), bounds=(0, None),
                  method="highs")
    assert res.status == 0
    return res.x[:-1].reshape(M, K)


@pytest.mark.parametrize("alpha", [0.2, 0.6, 0.95])
def test_tsds_probabilities_equal_the_lp_optimum(alpha):
    pytest.importorskip("scipy")
    rng = np.random.default_rng(3)
    M, K, n = 4, 6, 15
    dist = np.sort(rng.uniform(0.1, 2.0, size=(M, K)), axis=1)
    ids = np.stack([rng.permutation(n)[:K] for _ in range(M)])
    rho_of = rng.uniform(1.0, 3.0, size=n)
    rho = rho_of[ids]
    gamma = lp_plan(dist, rho, alpha, C=1.0)
    expected = np.zeros(n)
    np.add.at(expected, ids.reshape(-1), gamma.reshape(-1))
    p, _ = tsds_probabilities(torch.tensor(dist), torch.tensor(rho), torch.tensor(ids), n, alpha, 1.0)
    assert p.sum().item() == pytest.approx(1.0)
    np.testing.assert_allclose(p.numpy(), expected, atol=1e-7)


def test_tsds_hand_computed_extremes():
    dist = torch.tensor([[0.1, 0.5, 0.9]])
    ids = torch.tensor([[2, 0, 1]])
    ones = torch.ones(1, 3)
    # alignment only: everything on the nearest candidate
    p, _ = tsds_probabilities(dist, ones, ids, 3, alpha=1.0, C=1.0)
    assert p.tolist() == pytest.approx([0, 0, 1])
    # diversity only: the cap is as low as it goes, so the mass is spread evenly over the K
    p, _ = tsds_probabilities(dist, ones, ids, 3, alpha=0.0, C=1.0)
    assert p.tolist() == pytest.approx([1 / 3] * 3)
    # a candidate with density 2 gets half of what its neighbours get at the same cap
    p, _ = tsds_probabilities(dist, torch.tensor([[2.0, 1.0, 1.0]]), ids, 3, alpha=0.0, C=1.0)
    assert p.tolist() == pytest.approx([0.4, 0.4, 0.2])


def test_tsds_density_counts_near_duplicates():
    base = unit(torch.eye(4))
    points = torch.cat([base, base[:1]])  # row 4 duplicates row 0
    rho = densities(points, kde_k=3, sigma=0.5)
    assert rho.tolist() == pytest.approx([2, 1, 1, 1, 2])
    assert densities(points, 3, 0.0).tolist() == [1] * 5


def test_tsds_probs_path_is_checked(tmp_path):
    bad = tmp_path / "neg.npy"
    np.save(bad, np.array([0.5, -0.1]))
    with pytest.raises(ConfigError, match=r"param 'probs_path' = .* must hold one probability >= 0 per training row"):
        TsdsParams.from_dict("tsds", {"probs_path": str(bad)})
    good = tmp_path / "p.npy"
    np.save(good, np.array([0.0, 1.0, 3.0]))
    sel = TsdsSelector(TsdsParams.from_dict("tsds", {"probs_path": str(good)}))
    sel.check_data(3, 1)
    with pytest.raises(ConfigError, match=r"has 3 probabilities for a training set of 4 rows"):
        sel.check_data(4, 1)
    probs, info = sel.probabilities(None)
    assert probs.tolist() == [0, 0.25, 0.75] and info == {"source": "probs_path"}
    with pytest.raises(ConfigError, match=r"param 'alpha' = 1.5 is invalid; allowed: a number in \[0, 1\]"):
        TsdsParams.from_dict("tsds", {"alpha": 1.5})



@pytest.mark.parametrize("name,cls", [("near", NearParams), ("tsds", TsdsParams)])
def test_embedding_selectors_refuse_a_candidate_pool_they_would_ignore(name, cls):
    """near and tsds embed and search the whole training set; candidate_pool (a ScoringParams key) used to be
    accepted and ignored - a bench cell's "64-row candidate pool" near embedded all 192 rows at every decision."""
    with pytest.raises(ConfigError, match=rf"component '{name}': param 'candidate_pool' = 64 is invalid; allowed: "
                                          r"unset \(this selector embeds and searches the whole training set"):
        cls.from_dict(name, {"candidate_pool": 64})
    assert cls.from_dict(name, {}).candidate_pool is None

# ---- cluster_less --------------------------------------------------------------------------------

def test_kmeans_finds_planted_clusters():
    gen = torch.Generator().manual_seed(0)
    centres = torch.tensor([[10.0, 0, 0], [0, 10.0, 0], [0, 0, 10.0]])
    truth = torch.arange(30) % 3
    points = centres[truth] + 0.3 * torch.randn(30, 3, generator=gen)
    assign, cents = kmeans(points, 3, iters=10, seed=7)
    # the same partition up to a renaming of the clusters
    mapping = {int(t): int(a) for t, a in zip(truth, assign)}
    assert len(set(mapping.values())) == 3
    assert all(mapping[int(t)] == int(a) for t, a in zip(truth, assign))
    assert torch.equal(kmeans(points, 3, 10, seed=7)[0], assign)  # seeded: the same every time


def test_representatives_by_strategy():
    points = torch.tensor([[0.0], [1.0], [3.0], [6.0], [10.0]])
    assign = torch.zeros(5, dtype=torch.long)
    centroid = torch.tensor([[0.0]])
    gen = torch.Generator().manual_seed(0)
    assert representatives(assign, points, centroid, 2, "nearest", gen) == [0, 1]
    assert representatives(assign, points, centroid, 2, "farthest", gen) == [4, 3]
    assert representatives(assign, points, centroid, 3, "mixed", gen) == [0, 4, 1]
    drawn = representatives(assign, points, centroid, 3, "random", gen)
    assert len(set(drawn)) == 3 and set(drawn) <= set(range(5))


# ---- nice's rewards ------------------------------------------------------------------------------

def test_parse_score():
    assert parse_score("Score: 0.75 because") == 0.75
    assert parse_score("7") == 1.0 and parse_score("-3") == 0.0 and parse_score("none") == 0.0


def test_callable_reward_from_a_file(tmp_path):
    f = tmp_path / "judge.py"
    f.write_text("def reward(prompt, response):\n    return float(len(response))\n")
    assert Reward("callable", function=f"{f}:reward").score(["a", "b"], ["xyz", ""]) == [3.0, 0.0]


class _Judge(http.server.BaseHTTPRequestHandler):
    seen: list = []

    def do_POST(self):  # noqa: N802 - http.server's name
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        _Judge.seen.append((self.headers.get("Authorization"), body))
        judged = body["messages"][-1]["content"]
        reply = json.dumps({"choices": [{"message": {"content": "0.5" if "good answer" in judged else "0.1"}}]})
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.end_headers()
        self.wfile.write(reply.encode())

    def log_message(self, *args):
        pass


def test_api_reward_sends_the_key_from_the_environment_and_never_logs_it(monkeypatch, caplog):
    server = http.server.HTTPServer(("127.0.0.1", 0), _Judge)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    url = f"http://127.0.0.1:{server.server_port}/v1/chat/completions"
    secret = "sk-test-5ecret-value"
    monkeypatch.setenv("MY_JUDGE_KEY", secret)
    try:
        reward = Reward("api", params={"api_url": url, "api_key": "MY_JUDGE_KEY", "model_name": "judge",
                                       "max_retries": 0, "timeout": 10})
        with caplog.at_level(logging.DEBUG):
            assert reward.score(["q", "q"], ["good answer", "bad"]) == [0.5, 0.1]
        assert [auth for auth, _ in _Judge.seen] == [f"Bearer {secret}"] * 2
        assert _Judge.seen[0][1]["model"] == "judge"
        assert secret not in caplog.text
        # a failing endpoint: the error names the URL, never the key
        broken = Reward("api", params={"api_url": f"http://127.0.0.1:{server.server_port}/nowhere/x",
                                       "api_key": "MY_JUDGE_KEY", "max_retries": 0, "timeout": 2})
        server.shutdown()
        with pytest.raises(ValueError) as err:
            broken.score(["q"], ["r"])
        assert "failed after 1 attempt(s)" in str(err.value) and secret not in str(err.value)
    finally:
        server.server_close()
    monkeypatch.delenv("MY_JUDGE_KEY")
    with pytest.raises(ValueError, match="the environment variable MY_JUDGE_KEY .* is not set"):
        reward.score(["q"], ["r"])


# ---- user selectors from a file --------------------------------------------------------------------

USER_SELECTOR = '''
from dataclasses import dataclass, field

from dataflex.params import Params
from dataflex.selectors.base import SelectionResult, Selector


@dataclass
class EveryKParams(Params):
    k: int = field(default=2, metadata={"help": ">= 1"})

    def check(self):
        if self.k < 1:
            self.fail("k", "an integer >= 1")


class EveryK(Selector):
    name = "every_k"
    Params = EveryKParams

    def select(self, ctx):
        rows = list(range(0, ctx.train_size, self.params.k))
        return SelectionResult([rows[i % len(rows)] for i in range(ctx.num_samples)])
'''


def test_a_users_selector_loads_from_a_file_named_in_the_components_file(tmp_path, caplog):
    from dataflex.components_file import build_component, get_component
    from dataflex.selectors.base import SelectionContext

    (tmp_path / "my_selector.py").write_text(USER_SELECTOR)
    comps = tmp_path / "components.yaml"
    comps.write_text("selectors:\n  mine: {name: my_selector.py:EveryK, params: {k: 3}}\n"
                     "  bad_k: {name: my_selector.py:EveryK, params: {k: 0}}\n"
                     "  typo: {name: my_selector.py:EveryKK}\n  broken: {name: broken.py:X}\n")
    sel = build_component(get_component(comps, "mine"))  # relative to the components file
    ctx = SelectionContext(step=0, selection=0, num_selections=1, num_samples=5, train_dataset=list(range(10)),
                           scorer=None, generator=torch.Generator())
    assert sel.select(ctx).indices == [0, 3, 6, 9, 0]
    with pytest.raises(ConfigError, match=r"component 'bad_k': param 'k' = 0 is invalid; allowed: an integer >= 1"):
        build_component(get_component(comps, "bad_k"))
    with pytest.raises(ConfigError, match=r"'my_selector.py' has no class 'EveryKK'"):
        build_component(get_component(comps, "typo"))
    (tmp_path / "broken.py").write_text("import nowhere_to_be_found\n")
    with caplog.at_level(logging.ERROR, logger="dataflex"):
        with pytest.raises(ConfigError, match=r"component 'broken': loading 'broken.py' failed: ModuleNotFoundError"):
            build_component(get_component(comps, "broken"))
    tracebacks = [r for r in caplog.records if "Traceback" in r.getMessage()]
    assert len(tracebacks) == 1 and "nowhere_to_be_found" in tracebacks[0].getMessage()


# ---- nice's hf reward backend on a tiny locally built reward model ----------------------------------

def test_hf_reward_backend_scores_with_a_sequence_classification_model(tiny_model, tmp_path):
    from transformers import AutoConfig, AutoModelForSequenceClassification, AutoTokenizer

    config = AutoConfig.from_pretrained(tiny_model, num_labels=1)
    torch.manual_seed(0)
    rm = AutoModelForSequenceClassification.from_config(config)
    rm.config.pad_token_id = 5  # not the id the tokenizer pads with: the backend must not trust it
    rm.save_pretrained(tmp_path / "rm")
    AutoTokenizer.from_pretrained(tiny_model).save_pretrained(tmp_path / "rm")
    reward = Reward("hf", model_path=str(tmp_path / "rm"))
    got = reward.score(["1+1=", "2+2="], ["2", "4 and more"])
    # the oracle: the same model, one unpadded sequence at a time
    tok = AutoTokenizer.from_pretrained(tmp_path / "rm")
    model = AutoModelForSequenceClassification.from_pretrained(tmp_path / "rm").eval()
    with torch.no_grad():
        expected = [float(model(**tok([t], return_tensors="pt")).logits[0, 0]) for t in ["1+1=2", "2+2=4 and more"]]
    assert got == pytest.approx(expected, abs=1e-5)
