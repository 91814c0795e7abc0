"""Time and peak memory of exact kNN classification (DINO protocol: cosine, k neighbours weighted
exp(sim / T)): sslfg's faiss and torch backends against scikit-learn's brute-force
KNeighborsClassifier with the same weights, and a bare chunked `queries @ bank.T` + `topk` on
pre-normalised features as the floor. Optionally (--ivf) an approximate faiss IVF index against
the exact search.

Each variant runs alone in a fresh subprocess on the same synthetic data (same seed): C class
centres on the unit sphere, each feature its class centre plus Gaussian noise of norm ~ --noise
(in a random --intrinsic-dimensional subspace, or all of --dim), so kNN accuracy is not trivial.

Peak memory is the rise of the process's resident set during the call: the peak (VmHWM, the
number ru_maxrss reports) is reset to the current RSS through /proc/self/clear_refs just before the
call, so the data, the imports and the warm-up do not count. It covers numpy, torch and faiss
allocations alike (tracemalloc would see only Python/numpy ones). A timed call includes everything
the variant needs from raw features (normalising, index build, search, voting) and follows an
untimed warm-up on a small slice of the data. With --rounds R every variant runs R times in
alternating order (ABC CBA ...); tables give the median (min–max) over rounds, ratios are medians
of per-round ratios.

    python bench/knn.py                                        # 100k x 384 bank, 10k queries, k = 200
    python bench/knn.py --bank 20000 --queries 2000 --rounds 3
    python bench/knn.py --variants faiss --ivf --bank 500000 --queries 10000 --nprobe 8 16 32

Agreement is the fraction of queries whose predicted label equals the exact faiss prediction;
accuracy is against the synthetic labels. scikit-learn is optional (`pip install scikit-learn`);
without it pass `--variants matmul faiss torch`.
"""

from __future__ import annotations

import argparse
import json
import math
import re
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import faiss
import numpy as np
import torch
import torch.nn.functional as F
from common import markdown_table, median_spread, paired_ratios

from sslfg.evaluation.knn import CHUNK_SIZE, knn_classify, weighted_votes

EXACT = ("matmul", "faiss", "torch", "sklearn")
CPU = torch.device("cpu")
NAMES = {"matmul": "bare matmul + topk (floor)", "faiss": "sslfg faiss (IndexFlatIP)", "torch": "sslfg torch",
         "sklearn": "scikit-learn brute (cosine)"}


def synthetic(args: argparse.Namespace) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """bank (N, D), bank labels (N,), queries (Q, D), query labels (Q,): each feature is its class
    centre (unit norm) plus Gaussian noise of norm ~ args.noise in a random args.intrinsic-dimensional
    subspace shared by all classes (all D dimensions when 0). Written block by block so that making
    them needs no more memory than they take."""
    g = torch.Generator().manual_seed(args.seed)
    centres = F.normalize(torch.randn(args.classes, args.dim, generator=g), dim=1)
    rank = args.intrinsic or args.dim
    basis = torch.linalg.qr(torch.randn(args.dim, rank, generator=g)).Q.T * (args.noise / math.sqrt(rank))  # (r, D)

    def draw(n: int) -> tuple[torch.Tensor, torch.Tensor]:
        labels = torch.randint(0, args.classes, (n,), generator=g)
        x = torch.empty(n, args.dim)
        for s in range(0, n, 65536):
            y = labels[s : s + 65536]
            x[s : s + 65536] = centres[y] + torch.randn(len(y), rank, generator=g) @ basis
        return x, labels

    return *draw(args.bank), *draw(args.queries)


def rss_kib(field: str) -> int:
    return int(re.search(rf"{field}:\s+(\d+) kB", Path("/proc/self/status").read_text()).group(1))


def measured(fn: Callable[[], object], device: torch.device = CPU) -> tuple[object, float, float]:
    """(result, seconds, peak memory rise during the call in MiB: RSS on the CPU, torch's allocator on CUDA,
    which does not see a faiss GPU index's own allocations)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
    else:
        Path("/proc/self/clear_refs").write_text("5")  # VmHWM := current RSS
        base = rss_kib("VmRSS") * 1024
    tic = time.perf_counter()
    out = fn()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    seconds = time.perf_counter() - tic
    peak = torch.cuda.max_memory_allocated(device) if device.type == "cuda" else rss_kib("VmHWM") * 1024
    return out, seconds, (peak - base) / 2**20


def floor(bank: torch.Tensor, queries: torch.Tensor, k: int) -> torch.Tensor:
    """Top-k indices by chunked matmul on features already normalised: no checks, no votes."""
    return torch.cat([(queries[s : s + CHUNK_SIZE] @ bank.T).topk(k, dim=1).indices
                      for s in range(0, len(queries), CHUNK_SIZE)])


def sklearn_predict(bank: torch.Tensor, labels: torch.Tensor, queries: torch.Tensor, k: int, t: float) -> np.ndarray:
    from sklearn.neighbors import KNeighborsClassifier  # optional: only this variant needs it

    # cosine distance d = 1 - sim, so the weight exp(sim / T) is exp((1 - d) / T); ties go to the lowest label
    clf = KNeighborsClassifier(k, weights=lambda d: np.exp((1 - d) / t), algorithm="brute", metric="cosine")
    return clf.fit(bank.numpy(), labels.numpy()).predict(queries.numpy())


def ivf(bank: torch.Tensor, labels: torch.Tensor, queries: torch.Tensor, args: argparse.Namespace) -> dict:
    """Build an IndexIVFFlat (inner product, nlist ~ 4 sqrt(N)) once, then search at each nprobe."""
    nlist = args.nlist or round(4 * math.sqrt(len(bank)))
    bank_n, queries_n = F.normalize(bank, dim=1).numpy(), F.normalize(queries, dim=1).numpy()

    def build() -> faiss.Index:
        index = faiss.IndexIVFFlat(faiss.IndexFlatIP(args.dim), args.dim, nlist, faiss.METRIC_INNER_PRODUCT)
        index.cp.niter = 10
        sample = np.random.default_rng(args.seed).choice(len(bank_n), min(len(bank_n), 40 * nlist), replace=False)
        index.train(bank_n[np.sort(sample)])  # 40 points per centroid: the k-means is the bulk of the build
        index.add(bank_n)
        return index

    def predict(q: np.ndarray) -> torch.Tensor:
        sims, idx = (torch.from_numpy(a) for a in index.search(q, args.k))
        sims[idx < 0] = -torch.inf  # fewer than k found in the probed lists: those slots get no vote
        return weighted_votes(sims, labels[idx.clamp(min=0)], args.classes, args.temperature).argmax(dim=1)

    index, build_s, build_mib = measured(build)
    rows = []
    for nprobe in args.nprobe:
        index.nprobe = nprobe
        predict(queries_n[:64])  # warm-up
        preds, seconds, mib = measured(lambda: predict(queries_n))  # noqa: B023 (called at once)
        rows.append({"nprobe": nprobe, "seconds": seconds, "mib": max(mib, build_mib), "preds": preds.tolist()})
    return {"nlist": nlist, "build_s": build_s, "rows": rows}


def worker(args: argparse.Namespace) -> dict:
    """Run one variant: an untimed warm-up on a small slice (thread pools, lazy imports), then the timed call."""
    bank, bank_labels, queries, query_labels = synthetic(args)
    k, t = args.k, args.temperature
    if args.worker == "ivf":
        return ivf(bank, bank_labels, queries, args) | {"labels": query_labels.tolist()}
    device = torch.device(args.device)
    if args.worker == "matmul":
        bank, queries = F.normalize(bank, dim=1), F.normalize(queries, dim=1)
    if args.worker != "sklearn":  # the features where an evaluation has them: on the search device
        bank, bank_labels, queries = bank.to(device), bank_labels.to(device), queries.to(device)
    fn: Callable[[torch.Tensor, torch.Tensor, torch.Tensor], object] = {
        "matmul": lambda b, y, q: floor(b, q, k),
        "faiss": lambda b, y, q: knn_classify(b, y, q, k, t, backend="faiss", float16=args.float16),
        "torch": lambda b, y, q: knn_classify(b, y, q, k, t, backend="torch", float16=args.float16),
        "sklearn": lambda b, y, q: sklearn_predict(b, y, q, k, t),
    }[args.worker]
    fn(bank[:1000], bank_labels[:1000], queries[:64])  # small, so that it leaves no freed heap to reuse
    out, seconds, mib = measured(lambda: fn(bank, bank_labels, queries), device)
    preds = None if args.worker == "matmul" else torch.as_tensor(np.asarray(out) if args.worker == "sklearn"
                                                                  else out).cpu().tolist()
    return {"seconds": seconds, "mib": mib, "preds": preds, "labels": query_labels.tolist()}


def spawn(name: str, argv: list[str]) -> dict:
    cmd = [sys.executable, __file__, *argv, "--worker", name]
    done = subprocess.run(cmd, capture_output=True, text=True)
    if done.returncode:
        raise RuntimeError(f"variant {name} failed:\n{done.stderr}")
    return json.loads(done.stdout.splitlines()[-1])


def agreement(a: list[int], b: list[int]) -> float:
    return sum(x == y for x, y in zip(a, b, strict=True)) / len(a)


def main(argv: list[str]) -> None:
    args = parse(argv)
    if args.worker:
        print(json.dumps(worker(args)))
        return
    base_argv = [a for a in argv if a != "--ivf"]
    print(f"bank {args.bank} x {args.dim}, {args.queries} queries, {args.classes} classes, k = {args.k}, "
          f"T = {args.temperature}, noise {args.noise} in {args.intrinsic or args.dim} dims, chunk {CHUNK_SIZE}; "
          f"torch {torch.__version__} "
          f"({torch.get_num_threads()} threads), faiss {faiss.__version__} ({faiss.omp_get_max_threads()} threads), "
          f"{args.rounds} round(s); device {args.device}, float16 bank {args.float16}, "
          f"faiss GPUs {faiss.get_num_gpus() if hasattr(faiss, 'StandardGpuResources') else 0}")
    names = [*dict.fromkeys([*args.variants, "faiss"]), *(["ivf"] if args.ivf else [])]  # faiss: the reference
    runs: dict[str, list[dict]] = {name: [] for name in names}
    for r in range(args.rounds):  # one fresh process per variant and round, order ABC CBA ...
        for name in names if r % 2 == 0 else reversed(names):
            runs[name].append(spawn(name, base_argv))
    exact, labels = runs["faiss"][0]["preds"], runs["faiss"][0]["labels"]
    times = {name: [run["seconds"] for run in runs[name]] for name in runs if name != "ivf"}
    rows = []
    for name in [v for v in EXACT if v in runs]:
        preds = runs[name][0]["preds"]
        rows.append([NAMES[name], median_spread(times[name]),
                     median_spread(paired_ratios(times, name, "matmul")) if "matmul" in times else "–",
                     median_spread(paired_ratios(times, name, "faiss")),
                     "–" if preds is None else f"{agreement(preds, exact):.4f}",
                     "–" if preds is None else f"{agreement(preds, labels):.3f}",
                     f"{max(run['mib'] for run in runs[name]):.0f}"])
    print(markdown_table(["variant", "seconds", "/ matmul floor", "/ faiss", "agreement with faiss", "accuracy",
                          "peak MiB"], rows))
    if args.ivf:
        times["build"] = [run["build_s"] for run in runs["ivf"]]
        print(f"\nIndexIVFFlat, nlist {runs['ivf'][0]['nlist']}: build (k-means + add) "
              f"{median_spread(times['build'])} s; exact faiss {median_spread(times['faiss'])} s")
        rows = []
        for i, nprobe in enumerate(args.nprobe):
            times["search"] = [run["rows"][i]["seconds"] for run in runs["ivf"]]
            times["total"] = [b + s for b, s in zip(times["build"], times["search"], strict=True)]
            preds = runs["ivf"][0]["rows"][i]["preds"]
            rows.append([nprobe, median_spread(times["search"]), median_spread(paired_ratios(times, "faiss", "search")),
                         median_spread(paired_ratios(times, "faiss", "total")), f"{agreement(preds, exact):.4f}",
                         f"{agreement(preds, labels):.3f}", f"{max(run['rows'][i]['mib'] for run in runs['ivf']):.0f}"])
        print(markdown_table(["nprobe", "search s", "speed-up (search)", "speed-up (build + search)",
                              "agreement with exact", "accuracy", "peak MiB"], rows))


def parse(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--bank", type=int, default=100_000)
    p.add_argument("--queries", type=int, default=10_000)
    p.add_argument("--dim", type=int, default=384)
    p.add_argument("--classes", type=int, default=200)
    p.add_argument("--k", type=int, default=200)
    p.add_argument("--temperature", type=float, default=0.07)
    p.add_argument("--noise", type=float, default=4.0, help="noise norm around each class centre (norm 1)")
    p.add_argument("--intrinsic", type=int, default=0, help="dimension of the noise subspace; 0: all of --dim")
    p.add_argument("--rounds", type=int, default=1, help="fresh processes per variant, interleaved")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--variants", nargs="+", choices=EXACT, default=list(EXACT), help="exact faiss always runs")
    p.add_argument("--ivf", action="store_true", help="also time an approximate IndexIVFFlat")
    p.add_argument("--nlist", type=int, default=0, help="IVF lists; 0: round(4 sqrt(bank))")
    p.add_argument("--nprobe", type=int, nargs="+", default=[8, 16, 32])
    p.add_argument("--device", default="cpu", help="search device: cpu, cuda, cuda:1 ... (faiss on a GPU needs a "
                   "faiss GPU build; otherwise faiss searches on the CPU)")
    p.add_argument("--float16", action="store_true", help="store the bank in float16 (faiss and torch variants)")
    p.add_argument("--worker", default="", help=argparse.SUPPRESS)
    return p.parse_args(argv)


if __name__ == "__main__":
    main(sys.argv[1:])
