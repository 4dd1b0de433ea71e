"""MIPS backends behind one small contract: ``build``, ``search(queries, k) -> (scores, ids)``, ``save``, ``load``.

``exact`` is a chunked matmul + top-k in torch (memory bounded by ``chunk_rows``; fp32 or fp16 storage);
``faiss-flat``, ``faiss-hnsw`` and ``faiss-ivf-pq`` wrap faiss-cpu. Ids are row numbers of the corpus store.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Protocol

import numpy as np
import torch

from realm_lm.config import INDEX_BACKENDS, IndexConfig

FP16_PIECE_ROWS = 8192  # 8192 x 128 fp32 = 4 MiB: converted rows stay in cache for the matmul


class Index(Protocol):
    def build(self, embeddings: np.ndarray) -> None: ...
    def search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]: ...  # float32 [Q, k], int64 [Q, k]
    def save(self, folder: Path) -> None: ...
    def load(self, folder: Path) -> None: ...
    def __len__(self) -> int: ...


class ExactIndex:
    """Brute-force inner product over all rows, ``chunk_rows`` at a time, merging running top-k lists."""

    def __init__(self, cfg: IndexConfig):
        self.dtype = torch.float16 if cfg.dtype == "float16" else torch.float32
        self.chunk_rows = cfg.chunk_rows
        self.emb = torch.empty(0, 0, dtype=self.dtype)  # [N, D]

    def __len__(self) -> int:
        return self.emb.shape[0]

    def build(self, embeddings: np.ndarray) -> None:
        self.emb = torch.from_numpy(np.ascontiguousarray(embeddings)).to(self.dtype)

    @torch.inference_mode()
    def search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        q = torch.as_tensor(np.ascontiguousarray(queries), dtype=torch.float32)  # [Q, D]
        n = len(self)
        k = min(k, n)
        best_scores = torch.empty(q.shape[0], 0)
        best_ids = torch.empty(q.shape[0], 0, dtype=torch.int64)
        for start in range(0, n, self.chunk_rows):
            chunk = self.emb[start:start + self.chunk_rows]  # [C, D]
            if chunk.dtype == torch.float32:
                scores = q @ chunk.T  # [Q, C]
            else:  # fp16 storage halves memory; CPU matmuls run in fp32, converted a cache-sized piece at a time
                scores = torch.empty(q.shape[0], chunk.shape[0])  # [Q, C]
                for s in range(0, chunk.shape[0], FP16_PIECE_ROWS):
                    scores[:, s:s + FP16_PIECE_ROWS] = q @ chunk[s:s + FP16_PIECE_ROWS].float().T
            top_s, top_i = scores.topk(min(k, chunk.shape[0]), dim=1)  # [Q, k']
            best_scores = torch.cat([best_scores, top_s], dim=1)
            best_ids = torch.cat([best_ids, top_i + start], dim=1)
            best_scores, pos = best_scores.topk(min(k, best_scores.shape[1]), dim=1)  # keep a sorted top-k
            best_ids = best_ids.gather(1, pos)
        return best_scores.numpy(), best_ids.numpy()

    def save(self, folder: Path) -> None:
        pass  # the embeddings saved beside every index are all this backend needs

    def load(self, folder: Path) -> None:
        self.build(np.load(folder / "embeddings.npy"))


class FaissIndex:
    """faiss IndexFlatIP, IndexHNSWFlat (inner product), or IndexIVFPQ re-ranked by fp16 exact scores."""

    def __init__(self, backend: str, cfg: IndexConfig):
        import faiss  # imported here: the exact backend works without it

        self.faiss = faiss
        self.backend = backend
        self.cfg = cfg
        self.index = None
        faiss.omp_set_num_threads(torch.get_num_threads())

    def __len__(self) -> int:
        return 0 if self.index is None else self.index.ntotal

    def _make(self, n: int, d: int):
        faiss, cfg = self.faiss, self.cfg
        if self.backend == "faiss-flat":
            return faiss.IndexFlatIP(d)
        if self.backend == "faiss-hnsw":
            index = faiss.IndexHNSWFlat(d, cfg.hnsw_m, faiss.METRIC_INNER_PRODUCT)
            index.hnsw.efConstruction = cfg.hnsw_ef_construction
            return index
        # IVF-PQ: k-means needs ~39 points per list and 2**nbits points per PQ codebook, so small corpora shrink both
        nlist = max(1, min(cfg.ivf_nlist, n // 39))
        nbits = 8 if n >= 256 * 4 else max(1, int(math.log2(max(n // 4, 2))))
        m = cfg.ivf_pq_m if d % cfg.ivf_pq_m == 0 else 1
        quantizer = faiss.IndexFlatIP(d)
        ivfpq = faiss.IndexIVFPQ(quantizer, d, nlist, m, nbits, faiss.METRIC_INNER_PRODUCT)
        if cfg.ivf_refine <= 0:
            return ivfpq
        refine = faiss.IndexRefine(ivfpq, faiss.IndexScalarQuantizer(d, faiss.ScalarQuantizer.QT_fp16,
                                                                      faiss.METRIC_INNER_PRODUCT))
        refine.k_factor = cfg.ivf_refine
        return refine

    def retune(self, cfg: IndexConfig) -> None:
        """Take cfg's search-time settings (hnsw_ef_search, ivf_nprobe, ivf_refine) without rebuilding."""
        self.cfg = cfg
        self._set_search_params()

    def _set_search_params(self) -> None:
        faiss, index = self.faiss, self.index
        if self.backend == "faiss-hnsw":
            faiss.downcast_index(index).hnsw.efSearch = self.cfg.hnsw_ef_search
        elif self.backend == "faiss-ivf-pq":
            base = faiss.downcast_index(index)
            if isinstance(base, faiss.IndexRefine):
                base.k_factor = self.cfg.ivf_refine
                base = faiss.downcast_index(base.base_index)
            base.nprobe = min(self.cfg.ivf_nprobe, base.nlist)

    def build(self, embeddings: np.ndarray) -> None:
        x = np.ascontiguousarray(embeddings, dtype=np.float32)  # [N, D]
        n, d = x.shape
        self.index = self._make(n, d)
        if not self.index.is_trained:
            rng = np.random.default_rng(0)
            sample = x if n <= 262_144 else x[np.sort(rng.choice(n, 262_144, replace=False))]
            self.index.train(sample)
        for start in range(0, n, 1_000_000):  # bounded temporary memory while adding
            self.index.add(x[start:start + 1_000_000])
        self._set_search_params()

    def search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        q = np.ascontiguousarray(queries, dtype=np.float32)
        scores, ids = self.index.search(q, min(k, len(self)))
        return scores, ids.astype(np.int64)

    def save(self, folder: Path) -> None:
        self.faiss.write_index(self.index, str(folder / "faiss.index"))

    def load(self, folder: Path) -> None:
        self.index = self.faiss.read_index(str(folder / "faiss.index"))
        self._set_search_params()


def make_index(cfg: IndexConfig) -> Index:
    if cfg.backend == "exact":
        return ExactIndex(cfg)
    if cfg.backend in INDEX_BACKENDS:
        return FaissIndex(cfg.backend, cfg)
    raise ValueError(f"unknown index.backend {cfg.backend!r}; choose one of {', '.join(INDEX_BACKENDS)}")
