"""Search latency and index build rate against archive size: exact torch search against FAISS, to find the crossover.

Synthetic archives of `--sizes` photos (default 1k, 10k, 100k) with `--dim` dimensions (512, the paper preset's
projection): L2-normalised embeddings clustered as photo embeddings are (one centre per 100 photos, cosine ~0.7 to
it), and queries drawn the same way. Measured in one run, on the same arrays:

- search latency of one query (median over `--queries` queries, one call each) and of a batch of `--queries` queries
  (median over `--rounds` calls), for the two exact searches of `agriclip search` (`search_embeddings`: torch, and
  `--backend faiss`, FAISS's brute-force `faiss.knn` on the rows in place), FAISS's exact `IndexFlatIP` (built
  once; the same kernel) and FAISS's approximate `IndexHNSWFlat` (M 32, efSearch `--ef-search`) with its recall@k
  against the exact ranking;
- build rate (rows/s): writing the agriclip index file (`ImageIndex.to_bytes`, the header with a path per row) and
  reading it back (`read_index`, what every `agriclip search` pays first), FAISS flat `add`, HNSW construction;
- ratios (FAISS / torch) measured in the same run; the crossover: the smallest size from which each FAISS side
  takes under 90 % of torch's time at every larger size too ("none" up to the largest size measured otherwise);
  and for HNSW the number of single queries whose saving repays its construction.

Embedding the photos (the model's forward pass) dominates `agriclip index` on real archives: bench_inference.py
measures it. Other work on a shared machine slows every side; the load average is printed before and after.

    python bench/bench_search.py [--sizes 1000 10000 100000] [--dim 512] [--queries 64] [--top-k 10] [--rounds 5]
"""

import argparse
import os
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from modeling_agriclip.search import ImageIndex, import_faiss, read_index, search_embeddings


# (key, name) of the searches timed, exact torch first: the others are compared with it.
SIDES = (
    ("torch", "torch exact"),
    ("knn", "faiss knn (--backend)"),
    ("flat", "faiss IndexFlatIP"),
    ("hnsw", "faiss HNSW (approx.)"),
)


# A FAISS side counts as faster than torch below this ratio of their times.
MARGIN = 0.9


def clustered(count: int, centres: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """`count` unit vectors near random ones of `centres` (noise of norm ~1, so cosine ~0.7 to the centre)."""
    dim = centres.shape[1]
    picks = torch.randint(len(centres), (count,), generator=generator)
    return F.normalize(centres[picks] + torch.randn(count, dim, generator=generator) / dim**0.5, dim=-1)


def median_seconds(function, calls) -> float:
    """Median wall time of `function(argument)` over `calls` (after one warm-up call)."""
    function(calls[0])
    seconds = []
    for argument in calls:
        start = time.perf_counter()
        function(argument)
        seconds.append(time.perf_counter() - start)
    return statistics.median(seconds)


def timed(function) -> tuple[object, float]:
    start = time.perf_counter()
    result = function()
    return result, time.perf_counter() - start


def measure(size: int, args, generator: torch.Generator) -> dict:
    """Every side on one synthetic archive of `size` rows."""
    faiss = import_faiss()
    centres = F.normalize(torch.randn(max(1, size // 100), args.dim, generator=generator), dim=-1)
    embeddings, queries = clustered(size, centres, generator), clustered(args.queries, centres, generator)
    singles = [queries[row : row + 1] for row in range(len(queries))]
    numpy_queries = np.ascontiguousarray(queries.numpy())
    numpy_singles = [numpy_queries[row : row + 1] for row in range(len(queries))]
    top_k, rounds = args.top_k, [numpy_queries] * args.rounds
    result = {"size": size}

    identity = {"model": "synthetic", "revision": None, "embedding": "aligned", "fusion_weight": None}
    files = [
        {"path": f"field-{row // 1000:03d}/photo-{row:06d}.jpg", "size": 123456, "mtime_ns": 0} for row in range(size)
    ]
    index = ImageIndex(root="/archive/photos", files=files, embeddings=embeddings, identity=identity)
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "photos.safetensors"
        _, result["write_s"] = timed(lambda: path.write_bytes(index.to_bytes()))
        result["file_mb"] = path.stat().st_size / 1e6
        _, result["read_s"] = timed(lambda: read_index(path))

    for backend in ("torch", "faiss"):
        key = "torch" if backend == "torch" else "knn"
        search = lambda q: search_embeddings(embeddings, q, top_k, backend)  # noqa: E731
        result[f"{key}_single_s"] = median_seconds(search, singles)
        result[f"{key}_batch_s"] = median_seconds(search, [queries] * args.rounds)
    _, exact = search_embeddings(embeddings, queries, top_k)
    _, knn = search_embeddings(embeddings, queries, top_k, "faiss")

    def build_flat():
        flat = faiss.IndexFlatIP(args.dim)
        flat.add(np.ascontiguousarray(embeddings.numpy()))
        return flat

    flat, result["flat_build_s"] = timed(build_flat)
    result["flat_single_s"] = median_seconds(lambda q: flat.search(q, top_k), numpy_singles)
    result["flat_batch_s"] = median_seconds(lambda q: flat.search(q, top_k), rounds)
    _, flat_indices = flat.search(numpy_queries, top_k)
    result["exact_agree"] = bool(np.array_equal(flat_indices, exact.numpy()) and torch.equal(knn, exact))

    def build_hnsw():
        hnsw = faiss.IndexHNSWFlat(args.dim, 32, faiss.METRIC_INNER_PRODUCT)
        hnsw.add(np.ascontiguousarray(embeddings.numpy()))
        hnsw.hnsw.efSearch = args.ef_search
        return hnsw

    hnsw, result["hnsw_build_s"] = timed(build_hnsw)
    result["hnsw_single_s"] = median_seconds(lambda q: hnsw.search(q, top_k), numpy_singles)
    result["hnsw_batch_s"] = median_seconds(lambda q: hnsw.search(q, top_k), rounds)
    _, approximate = hnsw.search(numpy_queries, top_k)
    found = [len(set(a) & set(e)) for a, e in zip(approximate.tolist(), exact.tolist())]
    result["hnsw_recall"] = sum(found) / (top_k * len(queries))
    return result


def milliseconds(seconds: float) -> str:
    return f"{seconds * 1e3:9.3f}"


def crossover(results: list[dict], side: str, kind: str) -> str:
    """The smallest size from which `side` answers faster than torch at every larger size too, by `MARGIN` at least
    (a smaller difference is within the noise of a shared machine)."""
    found = None
    for position in reversed(range(len(results))):
        result = results[position]
        if result[f"{side}_{kind}_s"] > MARGIN * result[f"torch_{kind}_s"]:
            break
        found = position
    if found is None:
        return f"none up to {results[-1]['size']:,} photos"
    return f"{results[found]['size']:,} photos" + (" (the smallest measured)" if found == 0 else "")


def report(results: list[dict], args) -> None:
    queries = args.queries
    print("\nsearch latency, ms (one query: median over queries; batch: one call with all queries, median over rounds)")
    print(f"{'photos':>8}  {'side':<22} {'1 query':>9} {f'{queries} queries':>11} {'per query':>9}  ratio to torch")
    for result in results:
        for side, name in SIDES:
            single, batch = result[f"{side}_single_s"], result[f"{side}_batch_s"]
            ratio = (
                ""
                if side == "torch"
                else f"1 query {single / result['torch_single_s']:5.2f}x, batch {batch / result['torch_batch_s']:5.2f}x"
            )
            print(
                f"{result['size']:>8,}  {name:<22} {milliseconds(single)} {milliseconds(batch):>11} "
                f"{milliseconds(batch / queries)}  {ratio}"
            )

    print("\nbuild rate, rows/s (seconds)")
    print(
        f"{'photos':>8}  {'index write':>20} {'index read':>20} {'faiss flat add':>20} {'faiss HNSW build':>20}  file"
    )
    for result in results:
        cells = [
            f"{result['size'] / result[key]:>10,.0f} ({result[key]:7.3f})"
            for key in ("write_s", "read_s", "flat_build_s", "hnsw_build_s")
        ]
        print(f"{result['size']:>8,}  {' '.join(f'{cell:>20}' for cell in cells)}  {result['file_mb']:.1f} MB")

    print(f"\nexact agreement and recall@{args.top_k} (HNSW M 32, efSearch {args.ef_search}, against exact torch)")
    for result in results:
        saving = result["torch_single_s"] - result["hnsw_single_s"]
        repay = f"{result['hnsw_build_s'] / saving:,.0f} queries" if saving > 0 else "never (not faster)"
        print(
            f"{result['size']:>8,}  torch == knn == flat: {result['exact_agree']}   HNSW recall {result['hnsw_recall']:.3f}"
            f"   HNSW build repaid after {repay}"
        )

    print(f"\ncrossover (smallest archive from which FAISS answers in under {MARGIN:.0%} of exact torch's time)")
    for side, name in SIDES[1:]:
        print(f"  {name:<30} 1 query: {crossover(results, side, 'single')}; batch: {crossover(results, side, 'batch')}")


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", type=int, nargs="+", default=[1_000, 10_000, 100_000])
    parser.add_argument("--dim", type=int, default=512, help="Embedding dimensions (default: 512, the paper preset).")
    parser.add_argument("--queries", type=int, default=64, help="Queries timed one by one and as one batch.")
    parser.add_argument("--top-k", type=int, default=10)
    parser.add_argument("--rounds", type=int, default=5, help="Calls of the batch timed per side.")
    parser.add_argument("--ef-search", type=int, default=64, help="HNSW efSearch (default: 64).")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    faiss = import_faiss()
    generator = torch.Generator().manual_seed(args.seed)
    print(
        f"{args.dim} dimensions, top {args.top_k}, {args.queries} queries; torch {torch.__version__} "
        f"({torch.get_num_threads()} threads), faiss {faiss.__version__} ({faiss.omp_get_max_threads()} threads), "
        f"{os.cpu_count()} CPUs"
    )
    print(f"load average before: {' '.join(f'{load:.2f}' for load in os.getloadavg())}")
    results = [measure(size, args, generator) for size in sorted(args.sizes)]
    report(results, args)
    print(f"load average after:  {' '.join(f'{load:.2f}' for load in os.getloadavg())}")


if __name__ == "__main__":
    main()
