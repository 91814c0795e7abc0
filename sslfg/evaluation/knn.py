"""kNN classifier (DINO protocol) and leave-one-out retrieval (LoDisc protocol) on frozen features.

Every function L2-normalises the features it is given (in float32), so the similarity is always
cosine whether or not the caller normalised them; normalising twice changes nothing that matters.
Search is exact in both backends and runs on `device` (default: the bank's device; the evaluation
commands pass the accelerator's):

- "faiss": `faiss.IndexFlatIP` on float32; on a CUDA device, when faiss is a GPU build, the index is
  copied to that one device (this process's GPU, never every visible one). faiss is imported on
  first use: without it, "faiss" falls back to "torch" with a warning.
- "torch": `queries @ bank.T` + `topk` on the device.
- "auto" (the default): faiss where it can search on the device (faiss-cpu on the CPU, a faiss GPU
  build on CUDA), else torch. No faiss GPU wheel matches torch's CUDA 13 build, so on a GPU this
  is torch on the GPU unless a faiss GPU build was installed in place of faiss-cpu.

`float16=True` stores the normalised bank in float16 (half the memory of a big bank; similarities
to about 1e-3): faiss as a flat fp16 scalar-quantizer index (`GpuClonerOptions.useFloat16` on a
GPU), torch as a half tensor. Results come back on the queries' device.

Queries go through the search `chunk_size` at a time, so the memory a search adds beyond the
features is bounded: one normalised float32 copy of the bank (faiss: plus the index's own copy while
it is built, then only the index), plus for "torch" a chunk_size x N float32 similarity block
(512 x 500k bank = 1.0 GB) and for "faiss" its internal 4096 x 1024 blocks; the results are
Q x k similarities and indices. A 500k x 384 bank (768 MB) therefore searches in well under 4 GB
(measured peak above the caller's tensors: 1.5 GB faiss, 1.7 GB torch; bench/knn.py).

Class ids may be any non-negative integers, with gaps or classes missing from a split
({3, 17, 42}): they are mapped to contiguous indices in sorted order internally and predictions
are returned as the original ids. Ties in the vote go to the lowest class id on both backends.
"""

from __future__ import annotations

import importlib
import logging
from collections.abc import Sequence
from types import ModuleType
from typing import Any, Literal

import numpy as np
import torch
import torch.nn.functional as F

log = logging.getLogger(__name__)

Backend = Literal["auto", "faiss", "torch"]
Device = torch.device | str | None
Neighbours = tuple[torch.Tensor, torch.Tensor]  # similarities (Q, k) float32, bank indices (Q, k) int64
BACKENDS: tuple[str, ...] = ("auto", "faiss", "torch")
CHUNK_SIZE = 512  # queries per search block: 512 x 500k similarities = 1.0 GB for the torch backend
RETRIEVAL_CHUNK_SIZE = 256  # queries per full-ranking block: ~50 bytes x 256 x N (320 MB at N = 25k)


def _check_features(x: torch.Tensor, name: str, finite: bool = True) -> None:
    if x.ndim != 2 or not x.is_floating_point():
        raise ValueError(f"{name} must be a float (N, D) tensor of features, got {x.dtype} of shape {tuple(x.shape)}")
    if finite and not bool(torch.isfinite(x).all()):
        raise ValueError(f"{name} contains NaN or inf; check the feature extraction (e.g. fp16 overflow)")


def _check_labels(labels: torch.Tensor, n: int, name: str) -> None:
    if labels.ndim != 1 or len(labels) != n:
        raise ValueError(f"{name} must be a 1-D tensor with one label per feature row ({n}), got shape "
                         f"{tuple(labels.shape)}")
    if labels.is_floating_point() or labels.is_complex() or labels.dtype == torch.bool:
        raise ValueError(f"{name} must hold integer class ids, got {labels.dtype}")
    if n and int(labels.min()) < 0:
        raise ValueError(f"{name} holds a negative class id ({int(labels.min())}); class ids must be >= 0")


def _check_search(bank: torch.Tensor, queries: torch.Tensor, k: int, backend: str, chunk_size: int) -> None:
    _check_features(bank, "bank")
    _check_features(queries, "queries")
    if len(bank) == 0:
        raise ValueError("the bank is empty: the kNN classifier needs at least one training feature")
    if bank.shape[1] != queries.shape[1]:
        raise ValueError(f"bank features have dimension {bank.shape[1]} but queries have {queries.shape[1]}; "
                         "extract both with the same backbone and feature kind")
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    if backend not in BACKENDS:
        raise ValueError(f"unknown kNN backend {backend!r}; choose one of {', '.join(BACKENDS)}")


def _faiss() -> ModuleType | None:
    """The faiss module, or None when it is not installed (imported here, on first use)."""
    try:
        return importlib.import_module("faiss")
    except ImportError:
        return None


def _faiss_gpus(faiss: ModuleType | None) -> int:
    return faiss.get_num_gpus() if faiss is not None and hasattr(faiss, "StandardGpuResources") else 0


def resolve_backend(backend: str, device: Device) -> tuple[str, str]:
    """(the backend that runs on `device`, why): "auto" picks faiss where faiss can search on the
    device, else torch; "faiss" without faiss installed falls back to torch."""
    device = torch.device(device or "cpu")
    faiss = _faiss()
    if backend == "torch":
        return "torch", "knn.backend=torch"
    if faiss is None:
        return "torch", "faiss is not installed"
    if backend == "faiss":
        return "faiss", "knn.backend=faiss"
    if device.type == "cuda" and not _faiss_gpus(faiss):
        return "torch", "auto: this faiss has no GPU support (faiss-cpu); torch searches on the GPU"
    return "faiss", f"auto: faiss {'on the GPU' if device.type == 'cuda' else 'on the CPU'}"


def _search_torch(bank: torch.Tensor, queries: torch.Tensor, k: int, chunk_size: int, device: torch.device,
                  float16: bool) -> Neighbours:
    dtype = torch.float16 if float16 else torch.float32
    bank_n = F.normalize(bank.to(device).float(), dim=1).to(dtype)
    sims, idx = [], []
    for start in range(0, len(queries), chunk_size):
        q = F.normalize(queries[start : start + chunk_size].to(device).float(), dim=1).to(dtype)
        s, i = (q @ bank_n.T).float().topk(k, dim=1)  # sorted, most similar first
        sims.append(s)
        idx.append(i)
    return torch.cat(sims), torch.cat(idx)


def _search_faiss(bank: torch.Tensor, queries: torch.Tensor, k: int, chunk_size: int, device: torch.device,
                  float16: bool) -> Neighbours:
    faiss = _faiss()
    dim = bank.shape[1]
    on_gpu = device.type == "cuda" and _faiss_gpus(faiss) > 0
    if float16 and not on_gpu:  # a flat (exhaustive) index over fp16-stored vectors
        index = faiss.IndexScalarQuantizer(dim, faiss.ScalarQuantizer.QT_fp16, faiss.METRIC_INNER_PRODUCT)
    else:
        index = faiss.IndexFlatIP(dim)
    index.add(F.normalize(bank.float(), dim=1).cpu().numpy())  # the index keeps its own copy; ours is freed here
    if on_gpu:  # this process's GPU only; `resources` must outlive the searches
        resources = faiss.StandardGpuResources()
        options = faiss.GpuClonerOptions()
        options.useFloat16 = float16
        gpu = device.index if device.index is not None else torch.cuda.current_device()
        index = faiss.index_cpu_to_gpu(resources, gpu, index, options)
    sims, idx = [], []
    for start in range(0, len(queries), chunk_size):
        q = F.normalize(queries[start : start + chunk_size].float(), dim=1).cpu().numpy()
        s, i = index.search(q, k)  # sorted, most similar first
        sims.append(s)
        idx.append(i)
    return torch.from_numpy(np.concatenate(sims)), torch.from_numpy(np.concatenate(idx))


@torch.no_grad()
def knn_search(
    bank: torch.Tensor, queries: torch.Tensor, k: int, backend: Backend = "auto", chunk_size: int = CHUNK_SIZE,
    device: Device = None, float16: bool = False,
) -> Neighbours:
    """Exact cosine top-k of each query in the bank, searched on `device` (None: the bank's).

    bank (N, D) and queries (Q, D) are float features, normalised here. k is clamped to N (k > N
    means "every bank item"). Returns similarities (Q, k') float32 and bank indices (Q, k') int64,
    most similar first, with k' = min(k, N), on the queries' device. Equal similarities may come in
    a different order on the two backends (measure zero on real features; exact duplicates in the
    bank are the case where it shows).
    """
    _check_search(bank, queries, k, backend, chunk_size)
    k = min(k, len(bank))
    if len(queries) == 0:
        return queries.new_zeros(0, k, dtype=torch.float32), queries.new_zeros(0, k, dtype=torch.long)
    device = torch.device(device) if device is not None else bank.device
    runs, why = resolve_backend(backend, device)
    if runs != backend and backend == "faiss":
        log.warning("kNN: knn.backend=faiss but %s; searching with torch (pip install faiss-cpu to use faiss)", why)
    search = _search_faiss if runs == "faiss" else _search_torch
    sims, idx = search(bank, queries, k, chunk_size, device, float16)
    return sims.to(queries.device), idx.to(queries.device)


def weighted_votes(
    sims: torch.Tensor, neighbour_classes: torch.Tensor, num_classes: int, temperature: float
) -> torch.Tensor:
    """Class votes (Q, C): each neighbour adds exp(sim / T) to its class.

    sims (Q, k) float and neighbour_classes (Q, k) int64 in [0, C). Each row is scaled by
    exp(-max_sim / T), a positive per-query constant, so small temperatures cannot overflow; the
    ranking of classes (argmax, top-5) is that of the plain exp(sim / T) votes.
    """
    weights = ((sims - sims.amax(dim=1, keepdim=True)) / temperature).exp()
    votes = torch.zeros(len(sims), num_classes, dtype=weights.dtype, device=weights.device)
    return votes.scatter_add_(1, neighbour_classes, weights)


def _class_index(bank_labels: torch.Tensor, num_classes: int | None) -> tuple[torch.Tensor, torch.Tensor]:
    """(bank labels as contiguous indices (N,), original id of each index (C,), ascending)."""
    if num_classes is None:
        classes, contiguous = torch.unique(bank_labels.long(), sorted=True, return_inverse=True)
        return contiguous, classes
    if int(bank_labels.max()) >= num_classes:
        raise ValueError(f"bank_labels holds class id {int(bank_labels.max())} but num_classes is {num_classes}")
    return bank_labels.long(), torch.arange(num_classes, device=bank_labels.device)


def _check_classify(bank: torch.Tensor, bank_labels: torch.Tensor, temperature: float) -> None:
    _check_features(bank, "bank", finite=False)  # knn_search checks the values
    _check_labels(bank_labels, len(bank), "bank_labels")
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")


def _neighbour_classes(
    bank: torch.Tensor, bank_labels: torch.Tensor, queries: torch.Tensor, k: int, temperature: float,
    num_classes: int | None, backend: Backend, chunk_size: int, float16: bool = False,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Checked search: similarities (Q, k'), the contiguous class index of each neighbour (Q, k'),
    and the original class id of each index (C,)."""
    _check_classify(bank, bank_labels, temperature)
    sims, idx = knn_search(bank, queries, k, backend, chunk_size, float16=float16)
    contiguous, classes = _class_index(bank_labels.to(idx.device), num_classes)
    return sims, contiguous[idx], classes


@torch.no_grad()
def knn_scores(
    bank: torch.Tensor,
    bank_labels: torch.Tensor,
    queries: torch.Tensor,
    k: int,
    temperature: float = 0.07,
    num_classes: int | None = None,
    backend: Backend = "auto",
    chunk_size: int = CHUNK_SIZE,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The vote matrix of the weighted kNN classifier.

    bank (N, D), bank_labels (N,) int, queries (Q, D). Returns votes (Q, C) (see `weighted_votes`)
    and classes (C,) int64, the original class id of each column: the sorted ids present in the
    bank, or 0..num_classes-1 when num_classes is given. Holds Q x C floats: for many queries and
    classes prefer `knn_classify` / `knn_evaluate`, which vote chunk by chunk.
    """
    sims, neighbours, classes = _neighbour_classes(bank, bank_labels, queries, k, temperature, num_classes, backend,
                                                   chunk_size)
    return weighted_votes(sims, neighbours, len(classes), temperature), classes


@torch.no_grad()
def knn_classify(
    bank: torch.Tensor,
    bank_labels: torch.Tensor,
    queries: torch.Tensor,
    k: int,
    temperature: float = 0.07,
    num_classes: int | None = None,
    backend: Backend = "auto",
    chunk_size: int = CHUNK_SIZE,
    float16: bool = False,
) -> torch.Tensor:
    """Predicted class id (Q,) int64 of each query: argmax of the exp(sim / T) votes of its k nearest
    bank items (cosine), ties to the lowest class id. bank (N, D), bank_labels (N,), queries (Q, D);
    k is clamped to N; search on the bank's device, `float16` as in `knn_search`. Returns original
    class ids, on the queries' device."""
    sims, neighbours, classes = _neighbour_classes(bank, bank_labels, queries, k, temperature, num_classes, backend,
                                                   chunk_size, float16)
    preds = [
        weighted_votes(sims[s : s + chunk_size], neighbours[s : s + chunk_size], len(classes), temperature)
        .argmax(dim=1)  # first maximum: the lowest class id among tied votes
        for s in range(0, len(sims), chunk_size)
    ]
    return classes[torch.cat(preds)] if preds else classes.new_zeros(0)


def usable_ks(ks: Sequence[int], bank_size: int) -> list[int]:
    """The ks a bank of `bank_size` items can answer (k <= bank_size), in the given order; a larger k
    would be every bank item, and reporting it under its own name would misstate the protocol."""
    return [k for k in ks if k <= bank_size]


@torch.no_grad()
def knn_hits(
    bank: torch.Tensor,
    bank_labels: torch.Tensor,
    queries: torch.Tensor,
    query_labels: torch.Tensor,
    ks: Sequence[int] = (10, 20, 100, 200),
    temperature: float = 0.07,
    backend: Backend = "auto",
    chunk_size: int = CHUNK_SIZE,
    device: Device = None,
    float16: bool = False,
) -> dict[str, torch.Tensor]:
    """Per query, whether the kNN classifier got it right, DINO protocol (`eval_knn.py`'s knn_classifier):
    the per-image record a paired bootstrap needs; `knn_evaluate` averages it.

    bank (N, D), bank_labels (N,), queries (Q, D), query_labels (Q,); search and votes run on `device`
    (None: where the tensors are), `float16` as in `knn_search`. One search for the largest k
    serves every k (each k uses the first k neighbours) and the 1-NN. A k larger than the bank is
    dropped with one warning naming it and the bank size (`usable_ks` gives the ks kept). Returns a
    flat dict of bool tensors (Q,) on the CPU: "knn.k{k}.top1" and "knn.k{k}.top5" for each kept k, and
    "knn.k1.top1", the nearest neighbour's label.

    Classes are ranked as DINO ranks them: by votes (sum of exp(sim / T) of the neighbours of that
    class), every class taking part, including those without a vote; the classes are the ids found
    in the bank or the queries (DINO's 0..num_classes-1 when the ids are contiguous and each class
    appears). top-1: the query's class ranks first. top-5: it ranks among the first min(5, k), as in
    DINO (so for k < 5 it is "among the first k", and when fewer classes than that got a vote, the
    class-less slots are filled by the lowest ids: DINO fills them in torch.sort's tie order, which is
    unspecified). Ties rank the lower class id first.
    """
    _check_labels(query_labels, len(queries), "query_labels")
    _check_classify(bank, bank_labels, temperature)
    if len(queries) == 0:
        raise ValueError("no queries: accuracy needs at least one query")
    if any(k < 1 for k in ks):
        raise ValueError(f"every k must be >= 1, got ks={list(ks)}")
    kept = usable_ks(ks, len(bank))
    if len(kept) < len(ks):
        dropped = [k for k in ks if k not in kept]
        log.warning("kNN: k %s dropped: larger than the bank of %d items (kept k %s)",
                    ", ".join(map(str, dropped)), len(bank), ", ".join(map(str, kept)) or "1 only")
    if device is not None:
        bank, bank_labels, queries, query_labels = (t.to(device) for t in (bank, bank_labels, queries, query_labels))
    sims, idx = knn_search(bank, queries, max([1, *kept]), backend, chunk_size, float16=float16)
    labels = query_labels.to(idx.device, torch.long)
    classes = torch.unique(torch.cat([bank_labels.to(idx.device, torch.long), labels]), sorted=True)
    neighbours = torch.searchsorted(classes, bank_labels.to(idx.device, torch.long))[idx]
    target = torch.searchsorted(classes, labels)[:, None]
    hits: dict[str, list[torch.Tensor]] = {f"knn.k{k}.{m}": [] for k in kept for m in ("top1", "top5")}
    ids = torch.arange(len(classes), device=idx.device)
    for s in range(0, len(queries), chunk_size):
        t = target[s : s + chunk_size]
        for k in kept:
            votes = weighted_votes(sims[s : s + chunk_size, :k], neighbours[s : s + chunk_size, :k], len(classes),
                                   temperature)
            own = votes.gather(1, t)
            rank = (votes > own).sum(1) + ((votes == own) & (ids < t)).sum(1)
            hits[f"knn.k{k}.top1"].append(rank == 0)
            hits[f"knn.k{k}.top5"].append(rank < min(5, k))
    per_query = {key: torch.cat(chunks).cpu() for key, chunks in hits.items()}
    return per_query | {"knn.k1.top1": (neighbours[:, 0] == target[:, 0]).cpu()}  # also when 1 in ks: the same


def knn_evaluate(*args: Any, **kwargs: Any) -> dict[str, float]:
    """kNN accuracies of the queries against the bank: `knn_hits` (the same arguments) averaged over the queries,
    a flat dict of fractions in [0, 1]."""
    return accuracies(knn_hits(*args, **kwargs))


def accuracies(hits: dict[str, torch.Tensor]) -> dict[str, float]:
    """Per-query hits (Q,) bool → the fraction of queries right, per key."""
    return {key: int(h.sum()) / len(h) for key, h in hits.items()}


def order_keys(sims: torch.Tensor) -> torch.Tensor:
    """int64 keys (Q, N), unique within a row, whose ascending order is the reverse of a stable
    descending sort of the float32 similarities (Q, N): a larger key ranks before, by similarity, then
    by lower index."""
    bits = (sims.float() + 0.0).contiguous().view(torch.int32)  # + 0.0: -0.0 ties with 0.0, as floats do
    ordered = torch.where(bits < 0, bits ^ 0x7FFFFFFF, bits).long()  # IEEE order as integer order
    n = sims.shape[1]
    return ordered * (1 << 32) + (n - 1 - torch.arange(n, device=sims.device))


def _class_blocks(labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(items sorted by label (stable), start and size in that order of each one's class block)."""
    order = labels.argsort(stable=True)
    _, counts = torch.unique_consecutive(labels[order], return_counts=True)
    return order, (counts.cumsum(0) - counts).repeat_interleave(counts), counts.repeat_interleave(counts)


@torch.no_grad()
def retrieval_metrics(
    features: torch.Tensor, labels: torch.Tensor, chunk_size: int = RETRIEVAL_CHUNK_SIZE, device: Device = None
) -> dict[str, float]:
    """Leave-one-out retrieval over one set (LoDisc protocol): every item queries all the others.

    features (N, D) float, normalised here; labels (N,) int; computed on `device` (None: the features').
    Each query's own row is removed by index, so exact duplicates of it stay in its ranking. The
    ranking is by cosine similarity, ties in index order (a stable sort), and it is exact without
    sorting the N similarities: only the ranks of the query's same-label items matter, and the rank of
    each is the number of items above it, counted for all of them at once by placing every item among
    the sorted same-label similarities (`order_keys`, `torch.searchsorted`), O(N log n_class) per
    query. chunk_size queries at a time (about 40 x chunk_size x N bytes), taken class by class.

    Returns fractions in [0, 1]:
    - "top1": the nearest other item has the query's label;
    - "top5": one of the 5 nearest other items has it;
    - "mAP": mean over queries of the average precision of the full ranking of the N - 1 others
      (mean of precision@r over the ranks r of same-label items). Queries whose class has no other
      item have no AP and are left out of the mAP (they still count as misses in top1/top5);
      NaN when no query has a same-label item.
    """
    _check_features(features, "features")
    _check_labels(labels, len(features), "labels")
    n = len(features)
    if n < 2:
        raise ValueError(f"leave-one-out retrieval needs at least 2 items, got {n}")
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    x = F.normalize(features.to(device).float() if device is not None else features.float(), dim=1)
    order, block_start, block_size = _class_blocks(labels.to(x.device))
    top1 = top5 = ap_count = 0
    ap_sum = 0.0
    for start in range(0, n, chunk_size):
        q, first, size = (t[start : start + chunk_size] for t in (order, block_start, block_size))
        slot = torch.arange(int(size.max()), device=x.device)  # positions in the query's class block
        members = order[(first[:, None] + slot).clamp(max=n - 1)]
        relevant = (slot < size[:, None]) & (members != q[:, None])  # the other items of the query's class
        sims = x[q] @ x.T
        sims[torch.arange(len(q), device=x.device), q] = -torch.inf  # self: below every other item
        keys = order_keys(sims)
        targets = torch.where(relevant, keys.gather(1, members), torch.iinfo(torch.int64).max).sort(dim=1).values
        below = torch.searchsorted(targets, keys)  # per item: how many same-label keys are smaller
        counts = torch.zeros(len(q), len(slot) + 1, dtype=torch.long, device=x.device).scatter_add_(
            1, below, torch.ones_like(below))
        above = counts.flip(1).cumsum(1).flip(1)[:, 1:]  # (chunk, slots): items ranked above target p
        n_rel = relevant.sum(1)
        has = n_rel > 0
        best = above.gather(1, (n_rel - 1).clamp(min=0)[:, None])[:, 0]  # items above the best same-label item
        top1 += int((has & (best == 0)).sum())
        top5 += int((has & (best < 5)).sum())
        # target p (ascending) has rank above + 1 and n_rel - p same-label items at or above it
        precision = (n_rel[:, None] - slot).double() / (above + 1) * (slot < n_rel[:, None])
        ap_sum += float((precision.sum(1)[has] / n_rel[has]).sum())
        ap_count += int(has.sum())
    return {"top1": top1 / n, "top5": top5 / n, "mAP": ap_sum / ap_count if ap_count else float("nan")}
