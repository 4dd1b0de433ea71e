"""Exact vs FAISS MIPS backends on random 128-d vectors, and a build-and-answer run at REALM's index size.

    .venv/bin/python benchmarks/mips.py                      # 1M vectors, every backend (~15 min)
    .venv/bin/python benchmarks/mips.py --big 13353718       # + the 13,353,718 x 128 run (fp16 exact, IVF-PQ)

Data: i.i.d. Gaussian database vectors, queries = database vectors + noise (a query near some block, as in
retrieval). Latency is the median over repetitions at batch 1 and batch 32; recall@10 of each approximate
backend is measured against the exact top-10. Writes benchmarks/results/mips.json.
"""

import argparse
import gc
import resource
import time

import numpy as np
import torch

from realm_lm.config import IndexConfig
from realm_lm.index.backends import make_index
from realm_lm.report import markdown_table, write_results


def rss_mb() -> float:
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith("VmRSS"):
                return int(line.split()[1]) / 1024
    return 0.0


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def random_vectors(n: int, d: int, seed: int, dtype=np.float32, chunk: int = 1_000_000) -> np.ndarray:
    """[n, d] Gaussian, generated in chunks straight into ``dtype`` (bounded temporary memory)."""
    out = np.empty((n, d), dtype=dtype)
    rng = np.random.default_rng(seed)
    for start in range(0, n, chunk):
        out[start:start + chunk] = rng.standard_normal((min(chunk, n - start), d), dtype=np.float32)
    return out


def clustered_vectors(n: int, d: int, seed: int, clusters: int = 4096, spread: float = 0.35) -> np.ndarray:
    """[n, d] from a mixture of Gaussians (unit-norm centres), closer to real embeddings than i.i.d. noise."""
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((clusters, d), dtype=np.float32)
    centres /= np.linalg.norm(centres, axis=1, keepdims=True)
    out = np.empty((n, d), dtype=np.float32)
    for start in range(0, n, 1_000_000):
        m = min(1_000_000, n - start)
        out[start:start + m] = centres[rng.integers(0, clusters, m)] + rng.standard_normal((m, d), dtype=np.float32) * spread / np.sqrt(d)
    return out


def queries_near(x: np.ndarray, count: int, seed: int, noise: float = 1.0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    rows = rng.choice(len(x), count, replace=False)
    return (x[rows].astype(np.float32) + noise * rng.standard_normal((count, x.shape[1]), dtype=np.float32))


def median_ms(fn, reps: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1000)
    return float(np.median(times))


def recall_at(found: np.ndarray, truth: np.ndarray) -> float:
    return float(np.mean([len(set(f) & set(t)) / len(t) for f, t in zip(found.tolist(), truth.tolist())]))


def measure(name: str, cfg: IndexConfig, x: np.ndarray, q: np.ndarray, truth: np.ndarray | None, reps: int,
            figures: dict, rows: list, prefix: str, sweep: tuple[str, list[int]] | None = None) -> None:
    gc.collect()
    before = rss_mb()
    t0 = time.perf_counter()
    index = make_index(cfg)
    index.build(x)
    build_s = time.perf_counter() - t0
    mem = rss_mb() - before
    settings = [(None, cfg)] if sweep is None else [(v, IndexConfig(**{**cfg.__dict__, sweep[0]: v})) for v in sweep[1]]
    for value, scfg in settings:
        if value is not None:
            index.retune(scfg)
        label = name if value is None else f"{name} {sweep[0]}={value}"
        b1 = median_ms(lambda: index.search(q[:1], 10), reps)
        b32 = median_ms(lambda: index.search(q[:32], 10), max(3, reps // 5))
        _, ids = index.search(q, 10)
        rec = recall_at(ids, truth) if truth is not None else 1.0
        key = f"{prefix}.{label.replace(' ', '.')}"
        figures.update({f"{key}.b1_ms": round(b1, 3), f"{key}.b32_ms": round(b32, 3),
                        f"{key}.recall@10": round(rec, 4), f"{key}.build_s": round(build_s, 2),
                        f"{key}.index_mb": round(mem, 1)})
        rows.append([label, f"{b1:.2f}", f"{b32:.2f}", f"{rec:.3f}", f"{build_s:.1f}", f"{mem:.0f}"])
        print(rows[-1], flush=True)
        figures["peak_rss_mb"] = round(peak_rss_mb(), 0)
        write_results(figures["name"], figures)  # after every measurement: a long run that is stopped keeps its figures


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=1_000_000)
    parser.add_argument("--dim", type=int, default=128)
    parser.add_argument("--queries", type=int, default=200)
    parser.add_argument("--reps", type=int, default=30)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--big", type=int, default=0, help="also build and query an index of this many vectors")
    parser.add_argument("--name", default="mips")
    parser.add_argument("--data", choices=["gaussian", "clustered"], default="gaussian")
    parser.add_argument("--noise", type=float, default=1.0, help="query = a database vector + noise * N(0, 1) per dim")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    figures: dict = {"name": args.name, "n": args.n, "dim": args.dim, "queries": args.queries, "threads": args.threads,
                     "data": args.data, "noise": args.noise}
    headers = ["backend", "b1 ms", "b32 ms", "recall@10", "build s", "mem MB"]

    x = random_vectors(args.n, args.dim, seed=0) if args.data == "gaussian" else clustered_vectors(args.n, args.dim, seed=0)
    q = queries_near(x, args.queries, seed=1, noise=args.noise)
    exact = make_index(IndexConfig())
    exact.build(x)
    _, truth = exact.search(q, 10)
    del exact
    rows: list = []
    measure("exact", IndexConfig(), x, q, truth, args.reps, figures, rows, "1M")
    measure("exact-fp16", IndexConfig(dtype="float16"), x, q, truth, args.reps, figures, rows, "1M")
    measure("faiss-flat", IndexConfig(backend="faiss-flat"), x, q, truth, args.reps, figures, rows, "1M")
    measure("faiss-hnsw", IndexConfig(backend="faiss-hnsw"), x, q, truth, args.reps, figures, rows, "1M",
            sweep=("hnsw_ef_search", [64, 128, 256, 512, 1024]))
    measure("faiss-ivf-pq", IndexConfig(backend="faiss-ivf-pq"), x, q, truth, args.reps, figures, rows, "1M",
            sweep=("ivf_nprobe", [16, 32, 64, 128]))
    print(f"\n## {args.n:,} x {args.dim} {args.data} vectors (queries: + {args.noise} x noise), top-10, {args.threads} threads\n")
    print(markdown_table(headers, rows))
    exact_b1 = figures["1M.exact.b1_ms"]
    figures["1M.exact_over_faiss_flat.b1"] = round(exact_b1 / figures["1M.faiss-flat.b1_ms"], 3)
    figures["1M.exact_over_faiss_flat.b32"] = round(figures["1M.exact.b32_ms"] / figures["1M.faiss-flat.b32_ms"], 3)
    del x
    gc.collect()

    if args.big:
        big_rows: list = []
        xb = random_vectors(args.big, args.dim, seed=2, dtype=np.float16)  # 3.4 GB at 13.35M x 128; always i.i.d. Gaussian
        qb = queries_near(xb, 32, seed=3)
        figures["big.n"] = args.big
        measure("exact-fp16", IndexConfig(dtype="float16"), xb, qb, None, 3, figures, big_rows, "big")
        exact = make_index(IndexConfig(dtype="float16"))
        exact.build(xb)
        _, truth_b = exact.search(qb, 10)
        del exact
        gc.collect()
        measure("faiss-ivf-pq", IndexConfig(backend="faiss-ivf-pq", ivf_nlist=4096, ivf_nprobe=64),
                xb, qb, truth_b, 5, figures, big_rows, "big")
        figures["big.peak_rss_mb"] = round(peak_rss_mb(), 0)
        print(f"\n## {args.big:,} x {args.dim} (REALM's Wikipedia index size); peak RSS {peak_rss_mb():.0f} MB\n")
        print(markdown_table(headers, big_rows))
    figures["peak_rss_mb"] = round(peak_rss_mb(), 0)
    print(f"\nwrote {write_results(args.name, figures)}")


if __name__ == "__main__":
    main()
