"""kNN classifier and retrieval metrics against plain-Python loop references on tiny data."""

from __future__ import annotations

import math

import pytest
import torch

import sslfg.evaluation.knn
from sslfg.evaluation.knn import (
    knn_classify,
    knn_evaluate,
    knn_scores,
    knn_search,
    order_keys,
    resolve_backend,
    retrieval_metrics,
    usable_ks,
)

BACKENDS = ["faiss", "torch"]  # "auto" is one of them, by resolve_backend
T = 0.07


def rows(x: torch.Tensor) -> list[list[float]]:
    """L2-normalised rows as float64 Python lists."""
    out = []
    for row in x.double().tolist():
        norm = math.sqrt(sum(v * v for v in row))
        out.append([v / norm for v in row])
    return out


def dot(a: list[float], b: list[float]) -> float:
    return sum(x * y for x, y in zip(a, b, strict=True))


def ref_knn(bank: torch.Tensor, bank_labels: torch.Tensor, queries: torch.Tensor, k: int) -> list[list[int]]:
    """For each query the classes that got a vote, ranked by votes (sum of exp(sim/T)) then lower id."""
    b, labels = rows(bank), bank_labels.tolist()
    ranked = []
    for q in rows(queries):
        sims = [dot(q, v) for v in b]
        nearest = sorted(range(len(b)), key=lambda j: -sims[j])[:k]
        votes: dict[int, float] = {}
        for j in nearest:
            votes[labels[j]] = votes.get(labels[j], 0.0) + math.exp(sims[j] / T)
        ranked.append(sorted(votes, key=lambda c: (-votes[c], c)))
    return ranked


def ref_dino(bank: torch.Tensor, bank_labels: torch.Tensor, queries: torch.Tensor, query_labels: torch.Tensor,
             k: int, classes: list[int]) -> tuple[float, float]:
    """(top-1, top-5) as DINO's eval_knn.py knn_classifier counts them, one query at a time: votes
    exp(sim/T) of the k nearest over every class (zero for classes without a neighbour), classes
    sorted by votes, a hit when the label is first (top-1) or among the first min(5, k) (top-5).
    DINO's torch.sort leaves the order of tied classes unspecified; here ties go to the lower id."""
    b, labels = rows(bank), bank_labels.tolist()
    top1 = top5 = 0
    for q, label in zip(rows(queries), query_labels.tolist(), strict=True):
        sims = [dot(q, v) for v in b]
        nearest = sorted(range(len(b)), key=lambda j: -sims[j])[:k]
        votes = dict.fromkeys(classes, 0.0)
        for j in nearest:
            votes[labels[j]] += math.exp(sims[j] / T)
        predictions = sorted(classes, key=lambda c: (-votes[c], c))
        top1 += predictions[0] == label
        top5 += label in predictions[: min(5, k)]
    return top1 / len(queries), top5 / len(queries)


def ref_retrieval(features: torch.Tensor, labels: torch.Tensor) -> dict[str, float]:
    x, y = rows(features), labels.tolist()
    top1 = top5 = 0
    aps = []
    for i, q in enumerate(x):
        others = sorted((j for j in range(len(x)) if j != i), key=lambda j: (-dot(q, x[j]), j))
        rel = [y[j] == y[i] for j in others]
        top1 += rel[0]
        top5 += any(rel[:5])
        found, precisions = 0, []
        for r, hit in enumerate(rel, start=1):
            if hit:
                found += 1
                precisions.append(found / r)
        if precisions:
            aps.append(sum(precisions) / len(precisions))
    return {"top1": top1 / len(x), "top5": top5 / len(x), "mAP": sum(aps) / len(aps)}


def accuracy(hits: torch.Tensor) -> float:
    return hits.sum().item() / len(hits)


def data(n_bank: int, n_queries: int, dim: int, classes: int, seed: int = 0) -> tuple[torch.Tensor, ...]:
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(n_bank, dim, generator=g), torch.randint(0, classes, (n_bank,), generator=g),
            torch.randn(n_queries, dim, generator=g), torch.randint(0, classes, (n_queries,), generator=g))


@pytest.mark.parametrize("backend", BACKENDS)
def test_classify_and_evaluate_match_loop_reference(backend: str) -> None:
    bank, bank_labels, queries, query_labels = data(30, 10, 8, 8)
    assert set(bank_labels.tolist()) == set(range(8))  # DINO's classes 0..7 all take part
    ks = (1, 3, 7, 30)
    metrics = knn_evaluate(bank, bank_labels, queries, query_labels, ks=ks, backend=backend)
    assert set(metrics) == {f"knn.k{k}.top{t}" for k in ks for t in (1, 5)} | {"knn.k1.top1"}
    for k in ks:
        ranked = ref_knn(bank, bank_labels, queries, k)
        preds = knn_classify(bank, bank_labels, queries, k, backend=backend)
        assert preds.dtype == torch.int64
        assert preds.tolist() == [r[0] for r in ranked]
        truth = query_labels.tolist()
        assert metrics[f"knn.k{k}.top1"] == sum(r[0] == t for r, t in zip(ranked, truth, strict=True)) / 10
        dino = ref_dino(bank, bank_labels, queries, query_labels, k, list(range(8)))
        assert (metrics[f"knn.k{k}.top1"], metrics[f"knn.k{k}.top5"]) == pytest.approx(dino)
        assert metrics[f"knn.k{k}.top1"] == accuracy(preds == query_labels)
    nearest = knn_search(bank, queries, 1, backend)[1][:, 0]
    assert metrics["knn.k1.top1"] == accuracy(bank_labels[nearest] == query_labels)
    assert 0 < metrics["knn.k30.top5"] < 1  # the top-5 rule is exercised, not trivially met


@pytest.mark.parametrize("backend", BACKENDS)
def test_exact_ties_go_to_the_lower_class_id(backend: str) -> None:
    # Six bank items e0 + e_i, all at exactly the same cosine to the query e0; higher ids come first.
    bank = torch.zeros(6, 7)
    bank[:, 0] = 1
    bank[torch.arange(6), torch.arange(1, 7)] = 1
    bank_labels = torch.tensor([60, 50, 40, 30, 20, 10])
    query = torch.zeros(1, 7)
    query[0, 0] = 1
    votes, classes = knn_scores(bank, bank_labels, query, 6, backend=backend)
    assert classes.tolist() == [10, 20, 30, 40, 50, 60]
    assert torch.all(votes == votes[0, 0])
    assert knn_classify(bank, bank_labels, query, 6, backend=backend).tolist() == [10]
    assert knn_classify(bank, bank_labels, query, 6, num_classes=61, backend=backend).tolist() == [10]
    for label, top1, top5 in ((10, 1.0, 1.0), (50, 0.0, 1.0), (60, 0.0, 0.0)):
        m = knn_evaluate(bank, bank_labels, query, torch.tensor([label]), ks=(6,), backend=backend)
        assert (m["knn.k6.top1"], m["knn.k6.top5"]) == (top1, top5)


@pytest.mark.parametrize("backend", BACKENDS)
def test_non_contiguous_and_missing_class_ids(backend: str) -> None:
    bank, bank_idx, queries, query_idx = data(30, 10, 8, 3, seed=1)
    ids = torch.tensor([3, 17, 42])
    bank_labels, query_labels = ids[bank_idx], ids[query_idx].int()  # mixed int dtypes are fine
    query_labels[:3] = 99  # a class the bank lacks: always a miss
    ranked = ref_knn(bank, bank_labels, queries, 5)
    preds = knn_classify(bank, bank_labels, queries, 5, backend=backend)
    assert preds.tolist() == [r[0] for r in ranked]
    assert torch.equal(knn_classify(bank, bank_labels, queries, 5, num_classes=43, backend=backend), preds)
    assert knn_scores(bank, bank_labels, queries, 5, backend=backend)[1].tolist() == [3, 17, 42]
    m = knn_evaluate(bank, bank_labels, queries, query_labels, ks=(5,), backend=backend)
    assert m["knn.k5.top1"] == accuracy(preds == query_labels)
    # The classes are the ids seen in either split: 99 takes part without votes, after the voted ones.
    top1, top5 = ref_dino(bank, bank_labels, queries, query_labels, 5, [3, 17, 42, 99])
    assert (m["knn.k5.top1"], m["knn.k5.top5"]) == pytest.approx((top1, top5))


@pytest.mark.parametrize("backend", BACKENDS)
def test_small_temperature_does_not_overflow(backend: str) -> None:
    bank, bank_labels, queries, _ = data(30, 10, 8, 4)
    nearest = knn_search(bank, queries, 1, backend)[1][:, 0]
    preds = knn_classify(bank, bank_labels, queries, 10, temperature=1e-4, backend=backend)
    assert torch.equal(preds, bank_labels[nearest])  # exp(1/T) alone would be inf


def test_faiss_and_torch_agree_on_random_data() -> None:
    bank, bank_labels, queries, query_labels = data(2000, 500, 32, 20, seed=2)
    ks = (5, 20, 100, 200)
    faiss_m = knn_evaluate(bank, bank_labels, queries, query_labels, ks=ks, backend="faiss")
    torch_m = knn_evaluate(bank, bank_labels, queries, query_labels, ks=ks, backend="torch")
    assert faiss_m == torch_m
    for k in (1, 20):
        assert torch.equal(knn_classify(bank, bank_labels, queries, k, backend="faiss"),
                           knn_classify(bank, bank_labels, queries, k, backend="torch"))


@pytest.mark.parametrize("backend", BACKENDS)
def test_chunking_changes_nothing(backend: str) -> None:
    bank, bank_labels, queries, query_labels = data(40, 25, 8, 5, seed=3)
    assert torch.equal(knn_classify(bank, bank_labels, queries, 10, backend=backend, chunk_size=4),
                       knn_classify(bank, bank_labels, queries, 10, backend=backend))
    assert (knn_evaluate(bank, bank_labels, queries, query_labels, ks=(3, 10), backend=backend, chunk_size=7)
            == knn_evaluate(bank, bank_labels, queries, query_labels, ks=(3, 10), backend=backend))


def test_retrieval_matches_loop_reference() -> None:
    features, labels, _, _ = data(24, 0, 8, 4, seed=4)
    labels[5] = 7  # a singleton class: no AP, a miss in top1/top5
    features[1] = features[0]  # an exact duplicate of the same class: dropped by index, stays the other's top-1
    labels[1] = labels[0]
    ref = ref_retrieval(features, labels)
    for chunk_size in (5, 256):
        got = retrieval_metrics(features, labels, chunk_size=chunk_size)
        assert got.keys() == ref.keys()
        for key in ref:
            assert got[key] == pytest.approx(ref[key], abs=1e-6)
    assert retrieval_metrics(features[:2], labels[:2])["top1"] == 1.0  # the duplicate pair finds each other


def test_retrieval_with_exact_ties_matches_the_stable_sort_reference() -> None:
    # rows of +-1 (all of norm 2): every similarity is a multiple of 1/4, exact in float32, so many items tie
    # and the ranking depends on the tie order (lower index first); class sizes 1 to ~30
    g = torch.Generator().manual_seed(3)
    for n, classes in ((40, 2), (33, 9), (12, 12)):
        features = torch.randint(0, 2, (n, 4), generator=g).float() * 2 - 1
        labels = torch.randint(0, classes, (n,), generator=g) * 5  # ids with gaps
        ref = ref_retrieval(features, labels)
        for chunk_size in (1, 7, 256):
            got = retrieval_metrics(features, labels, chunk_size=chunk_size, device="cpu")
            assert got == pytest.approx(ref, abs=1e-12)


def test_order_keys_order_like_a_stable_descending_sort() -> None:
    sims = torch.tensor([[0.5, -0.0, 0.0, -1.0, 0.5, 1e-30, -1e-30, -torch.inf, 0.25]])
    expected = sims.sort(dim=1, descending=True, stable=True).indices
    assert torch.equal(order_keys(sims).argsort(dim=1, descending=True), expected)


def test_retrieval_without_same_class_pairs_has_nan_map() -> None:
    m = retrieval_metrics(torch.randn(4, 3), torch.arange(4))
    assert m["top1"] == m["top5"] == 0.0 and math.isnan(m["mAP"])


@pytest.mark.parametrize("backend", BACKENDS)
def test_k_larger_than_bank_is_clamped(backend: str) -> None:
    bank, bank_labels, queries, query_labels = data(12, 5, 8, 3)
    sims, idx = knn_search(bank, queries, 50, backend)
    assert sims.shape == idx.shape == (5, 12)
    assert torch.equal(knn_classify(bank, bank_labels, queries, 50, backend=backend),
                       knn_classify(bank, bank_labels, queries, 12, backend=backend))
    assert knn_classify(bank, bank_labels, queries[:0], 5, backend=backend).shape == (0,)


@pytest.mark.parametrize("backend", BACKENDS)
def test_ks_larger_than_the_bank_are_dropped_with_a_warning(backend: str, caplog: pytest.LogCaptureFixture) -> None:
    bank, bank_labels, queries, query_labels = data(12, 5, 8, 3)
    with caplog.at_level("WARNING", logger="sslfg.evaluation.knn"):
        m = knn_evaluate(bank, bank_labels, queries, query_labels, ks=(12, 20, 200), backend=backend)
    assert set(m) == {"knn.k12.top1", "knn.k12.top5", "knn.k1.top1"}  # no k reported under a clamped name
    assert m == knn_evaluate(bank, bank_labels, queries, query_labels, ks=(12,), backend=backend)
    warnings = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert len(warnings) == 1 and "k 20, 200 dropped" in warnings[0] and "bank of 12 items" in warnings[0]
    assert usable_ks((10, 20, 100, 200), 20) == [10, 20] and usable_ks((20,), 19) == []
    only_1nn = knn_evaluate(bank, bank_labels, queries, query_labels, ks=(20,), backend=backend)
    assert set(only_1nn) == {"knn.k1.top1"}


@pytest.mark.parametrize("backend", BACKENDS)
def test_top5_counts_the_first_min_5_k_classes_as_dino(backend: str) -> None:
    # The 3 nearest of the query are all class 2; DINO ranks [2, then the vote-less 0, 1, 3, 4, ...] and
    # counts the first min(5, 3) = 3 of them: labels 2, 0 and 1 are top-5 hits, 3 is not.
    bank = torch.tensor([[1.0, 0.1], [1.0, 0.2], [1.0, 0.3], [-1.0, 0.0], [-1.0, 0.5], [-1.0, 1.0], [0.0, -1.0]])
    bank_labels = torch.tensor([2, 2, 2, 0, 1, 3, 4])
    queries = torch.tensor([[1.0, 0.0]] * 4)
    query_labels = torch.tensor([2, 0, 1, 3])
    m = knn_evaluate(bank, bank_labels, queries, query_labels, ks=(3, 7), backend=backend)
    assert (m["knn.k3.top1"], m["knn.k3.top5"]) == (0.25, 0.75)
    assert (m["knn.k7.top1"], m["knn.k7.top5"]) == pytest.approx(ref_dino(bank, bank_labels, queries, query_labels,
                                                                          7, [0, 1, 2, 3, 4]))


BANK, LABELS, QUERIES = torch.randn(6, 4), torch.tensor([0, 1, 2, 0, 1, 2]), torch.randn(3, 4)
NAN_BANK = BANK.clone()
NAN_BANK[2, 1] = math.nan


@pytest.mark.parametrize(
    "call, message",
    [
        (lambda: knn_classify(BANK, LABELS, torch.randn(3, 5), 2), "dimension 4 but queries have 5"),
        (lambda: knn_classify(BANK[:0], LABELS[:0], QUERIES, 2), "bank is empty"),
        (lambda: knn_classify(BANK, LABELS, QUERIES, 0), "k must be >= 1"),
        (lambda: knn_classify(BANK, LABELS, QUERIES, 2, backend="annoy"), "unknown kNN backend"),
        (lambda: knn_classify(BANK, LABELS[:5], QUERIES, 2), "one label per feature row"),
        (lambda: knn_classify(BANK, LABELS.float(), QUERIES, 2), "integer class ids"),
        (lambda: knn_classify(BANK, LABELS - 1, QUERIES, 2), "negative class id"),
        (lambda: knn_classify(NAN_BANK, LABELS, QUERIES, 2), "NaN or inf"),
        (lambda: knn_classify(BANK, LABELS, QUERIES, 2, num_classes=2), "num_classes is 2"),
        (lambda: knn_classify(BANK, LABELS, QUERIES, 2, temperature=0), "temperature must be > 0"),
        (lambda: knn_classify(BANK[0], LABELS, QUERIES, 2), r"\(N, D\)"),
        (lambda: knn_evaluate(BANK, LABELS, QUERIES[:0], LABELS[:0]), "no queries"),
        (lambda: knn_evaluate(BANK, LABELS, QUERIES, LABELS[:3], ks=(0,)), "every k must be >= 1"),
        (lambda: retrieval_metrics(BANK[:1], LABELS[:1]), "at least 2 items"),
    ],
)
def test_bad_inputs_raise_clear_errors(call, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        call()


def test_auto_backend_and_lazy_faiss_fallback(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    assert resolve_backend("auto", "cpu")[0] == "faiss"  # faiss-cpu is installed here
    assert resolve_backend("auto", "cuda:0")[0] == "torch"  # faiss-cpu cannot search on a GPU: torch does
    assert resolve_backend("torch", "cpu")[0] == "torch"
    bank, bank_labels, queries, query_labels = data(60, 20, 8, 4)
    expected = knn_evaluate(bank, bank_labels, queries, query_labels, ks=(5,), backend="torch")
    monkeypatch.setattr(sslfg.evaluation.knn, "_faiss", lambda: None)  # as if faiss were not installed
    assert resolve_backend("auto", "cpu") == ("torch", "faiss is not installed")
    with caplog.at_level("WARNING", logger="sslfg.evaluation.knn"):
        assert knn_evaluate(bank, bank_labels, queries, query_labels, ks=(5,), backend="faiss") == expected
    assert "knn.backend=faiss but faiss is not installed; searching with torch" in caplog.text


@pytest.mark.parametrize("backend", BACKENDS)
def test_float16_bank_finds_the_float32_neighbours(backend: str) -> None:
    bank, _, queries, _ = data(300, 40, 16, 4, seed=5)
    sims, idx = knn_search(bank, queries, 10, backend)
    sims16, idx16 = knn_search(bank, queries, 10, backend, float16=True)
    assert sims16.dtype == torch.float32
    torch.testing.assert_close(sims16, sims, rtol=0, atol=2e-3)  # fp16 holds [-1, 1] to 2^-11
    assert (idx16 == idx).float().mean() > 0.9  # near-ties may swap


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
def test_search_on_the_gpu_device_matches_cpu() -> None:
    bank, bank_labels, queries, query_labels = data(500, 100, 16, 10)
    cpu = knn_evaluate(bank, bank_labels, queries, query_labels, ks=(10, 50), backend="torch")
    for backend in BACKENDS:  # inputs on the CPU, search on the GPU (faiss: a GPU build, else its CPU index)
        assert knn_evaluate(bank, bank_labels, queries, query_labels, ks=(10, 50), backend=backend,
                            device="cuda") == cpu
    assert retrieval_metrics(queries, query_labels, device="cuda") == pytest.approx(
        retrieval_metrics(queries, query_labels), abs=1e-12)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
def test_torch_backend_on_gpu_matches_cpu() -> None:
    bank, bank_labels, queries, query_labels = data(500, 100, 16, 10)
    cpu = knn_evaluate(bank, bank_labels, queries, query_labels, ks=(10, 50), backend="torch")
    on_gpu = [x.cuda() for x in (bank, bank_labels, queries, query_labels)]
    assert knn_evaluate(*on_gpu, ks=(10, 50), backend="torch") == cpu
    assert retrieval_metrics(*on_gpu[2:]) == pytest.approx(retrieval_metrics(queries, query_labels))
