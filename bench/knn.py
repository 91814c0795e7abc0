"""Time and peak memory of exact kNN classification (DINO protocol: cosine, k neighbours weighted
exp(sim / T)): sslfg's faiss and torch backends against scikit-learn's brute-force
KNeighborsClassifier with the same weights, and a bare chunked `queries @ bank.T` + `topk` on
pre-normalised features as the floor. Optionally (--ivf) an approximate faiss IVF index against
the exact search.

Each variant runs alone in a fresh subprocess on the same synthetic data (same seed): C class
centres on the unit sphere, each feature its class centre plus Gaussian noise of norm ~ --noise,
so kNN accuracy is far from trivial. Peak memory is the rise of the process's resident set during
the call: the peak (VmHWM, the same number as ru_maxrss) is reset to the current RSS through
/proc/self/clear_refs just before the call, so the data, the imports and what other variants
allocated do not count. It covers numpy, torch and faiss allocations alike (tracemalloc sees only
Python/numpy ones). Seconds are the median over --repeats calls; each call includes everything the
variant needs from raw features (normalising, index build, search, voting).

    python bench/knn.py                                        # 100k x 384 bank, 10k queries, k = 200
    python bench/knn.py --bank 20000 --queries 2000 --repeats 3
    python bench/knn.py --variants faiss --ivf --bank 500000 --queries 10000 --nprobe 8 16 32

Agreement is the fraction of queries whose predicted label equals the exact faiss prediction.
"""

from __future__ import annotations

import argparse
import json
import math
import re
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import faiss
import numpy as np
import torch
import torch.nn.functional as F
from common import markdown_table

from sslfg.knn import CHUNK_SIZE, knn_classify, weighted_votes

EXACT = ("matmul", "faiss", "torch", "sklearn")
NAMES = {"matmul": "bare matmul + topk (floor)", "faiss": "sslfg faiss (IndexFlatIP)", "torch": "sslfg torch",
         "sklearn": "scikit-learn brute (cosine)"}


def synthetic(args: argparse.Namespace) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """bank (N, D), bank labels (N,), queries (Q, D), query labels (Q,); written block by block so
    that making them needs no more memory than they take."""
    g = torch.Generator().manual_seed(args.seed)
    centres = F.normalize(torch.randn(args.classes, args.dim, generator=g), dim=1)

    def draw(n: int) -> tuple[torch.Tensor, torch.Tensor]:
        labels = torch.randint(0, args.classes, (n,), generator=g)
        x = torch.empty(n, args.dim)
        for s in range(0, n, 65536):
            noise = torch.randn(len(x[s : s + 65536]), args.dim, generator=g)
            x[s : s + 65536] = centres[labels[s : s + 65536]] + noise * (args.noise / math.sqrt(args.dim))
        return x, labels

    return *draw(args.bank), *draw(args.queries)


def rss_kib(field: str) -> int:
    return int(re.search(rf"{field}:\s+(\d+) kB", Path("/proc/self/status").read_text()).group(1))


def measured(fn: Callable[[], object], repeats: int) -> tuple[object, list[float], float]:
    """(last result, seconds per call, peak RSS rise in MiB over all calls)."""
    Path("/proc/self/clear_refs").write_text("5")  # VmHWM := current RSS
    base, seconds = rss_kib("VmRSS"), []
    for _ in range(repeats):
        tic = time.perf_counter()
        out = fn()
        seconds.append(time.perf_counter() - tic)
    return out, seconds, (rss_kib("VmHWM") - base) / 1024


def floor(bank: torch.Tensor, queries: torch.Tensor, k: int) -> torch.Tensor:
    """Top-k indices by chunked matmul on features already normalised: no checks, no votes."""
    return torch.cat([(queries[s : s + CHUNK_SIZE] @ bank.T).topk(k, dim=1).indices
                      for s in range(0, len(queries), CHUNK_SIZE)])


def sklearn_predict(bank: torch.Tensor, labels: torch.Tensor, queries: torch.Tensor, k: int, t: float) -> np.ndarray:
    from sklearn.neighbors import KNeighborsClassifier  # optional: only this variant needs it

    # cosine distance d = 1 - sim, so the weight exp(sim / T) is exp((1 - d) / T); ties go to the lowest label
    clf = KNeighborsClassifier(k, weights=lambda d: np.exp((1 - d) / t), algorithm="brute", metric="cosine")
    return clf.fit(bank.numpy(), labels.numpy()).predict(queries.numpy())


def ivf(bank: torch.Tensor, labels: torch.Tensor, queries: torch.Tensor, args: argparse.Namespace) -> list[dict]:
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

    index, build_s, build_mib = measured(build, 1)
    rows = []
    for nprobe in args.nprobe:
        index.nprobe = nprobe

        def predict() -> torch.Tensor:
            sims, idx = (torch.from_numpy(a) for a in index.search(queries_n, args.k))
            sims[idx < 0] = -torch.inf  # fewer than k found in the probed lists: those slots get no vote
            votes = weighted_votes(sims, labels[idx.clamp(min=0)], args.classes, args.temperature)
            return votes.argmax(dim=1)

        preds, seconds, mib = measured(predict, args.repeats)
        rows.append({"nlist": nlist, "nprobe": nprobe, "build_s": build_s[0], "build_mib": build_mib,
                     "seconds": seconds, "mib": mib, "preds": preds.tolist()})
    return rows


def worker(args: argparse.Namespace) -> None:
    """Run one variant and print its result as JSON."""
    bank, bank_labels, queries, query_labels = synthetic(args)
    k, t = args.k, args.temperature
    if args.worker == "ivf":
        print(json.dumps({"ivf": ivf(bank, bank_labels, queries, args), "labels": query_labels.tolist()}))
        return
    if args.worker == "matmul":
        bank, queries = F.normalize(bank, dim=1), F.normalize(queries, dim=1)
    fns: dict[str, Callable[[], object]] = {
        "matmul": lambda: floor(bank, queries, k),
        "faiss": lambda: knn_classify(bank, bank_labels, queries, k, t, backend="faiss"),
        "torch": lambda: knn_classify(bank, bank_labels, queries, k, t, backend="torch"),
        "sklearn": lambda: sklearn_predict(bank, bank_labels, queries, k, t),
    }
    out, seconds, mib = measured(fns[args.worker], args.repeats)
    preds = None if args.worker == "matmul" else np.asarray(out).tolist()
    print(json.dumps({"seconds": seconds, "mib": mib, "preds": preds, "labels": query_labels.tolist()}))


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
        worker(args)
        return
    base_argv = [a for a in argv if a != "--ivf"]
    print(f"bank {args.bank} x {args.dim}, {args.queries} queries, {args.classes} classes, k = {args.k}, "
          f"T = {args.temperature}, noise {args.noise}, chunk {CHUNK_SIZE}; torch {torch.__version__} "
          f"({torch.get_num_threads()} threads), faiss {faiss.__version__} ({faiss.omp_get_max_threads()} threads), "
          f"median of {args.repeats}")
    results = {name: spawn(name, base_argv) for name in dict.fromkeys([*args.variants, "faiss"])}  # faiss: reference
    exact = results["faiss"]
    labels = exact["labels"]
    median = {name: statistics.median(r["seconds"]) for name, r in results.items()}
    rows = []
    for name in [v for v in EXACT if v in results]:
        r = results[name]
        rows.append([NAMES[name], f"{median[name]:.2f}",
                     f"{median[name] / median['matmul']:.2f}" if "matmul" in median else "–",
                     f"{median[name] / median['faiss']:.2f}",
                     "–" if r["preds"] is None else f"{agreement(r['preds'], exact['preds']):.4f}",
                     "–" if r["preds"] is None else f"{agreement(r['preds'], labels):.3f}", f"{r['mib']:.0f}"])
    print(markdown_table(["variant", "seconds", "/ matmul floor", "/ faiss", "agreement with faiss", "accuracy",
                          "peak MiB"], rows))
    if args.ivf:
        rows = []
        for r in spawn("ivf", base_argv)["ivf"]:
            search = statistics.median(r["seconds"])
            rows.append([r["nlist"], r["nprobe"], f"{r['build_s']:.2f}", f"{search:.2f}",
                         f"{median['faiss'] / search:.1f}", f"{median['faiss'] / (r['build_s'] + search):.2f}",
                         f"{agreement(r['preds'], exact['preds']):.4f}", f"{agreement(r['preds'], labels):.3f}",
                         f"{max(r['build_mib'], r['mib']):.0f}"])
        print(f"\nexact faiss: {median['faiss']:.2f} s")
        print(markdown_table(["nlist", "nprobe", "build s", "search s", "speed-up (search)",
                              "speed-up (build + search)", "agreement with exact", "accuracy", "peak MiB"], rows))


def parse(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--bank", type=int, default=100_000)
    p.add_argument("--queries", type=int, default=10_000)
    p.add_argument("--dim", type=int, default=384)
    p.add_argument("--classes", type=int, default=200)
    p.add_argument("--k", type=int, default=200)
    p.add_argument("--temperature", type=float, default=0.07)
    p.add_argument("--noise", type=float, default=4.0, help="noise norm around each class centre (norm 1)")
    p.add_argument("--repeats", type=int, default=1)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--variants", nargs="+", choices=EXACT, default=list(EXACT), help="exact faiss always runs")
    p.add_argument("--ivf", action="store_true", help="also time an approximate IndexIVFFlat")
    p.add_argument("--nlist", type=int, default=0, help="IVF lists; 0: round(4 sqrt(bank))")
    p.add_argument("--nprobe", type=int, nargs="+", default=[8, 16, 32])
    p.add_argument("--worker", default="", help=argparse.SUPPRESS)
    return p.parse_args(argv)


if __name__ == "__main__":
    main(sys.argv[1:])
