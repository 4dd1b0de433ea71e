"""Embed every block of a corpus store with the document tower and publish an index version."""

from __future__ import annotations

import hashlib
import time
from pathlib import Path
from typing import Iterator

import numpy as np
import torch
from tqdm import tqdm

from realm_lm.config import RunConfig, config_to_dict
from realm_lm.corpus.store import CorpusStore
from realm_lm.index.backends import make_index
from realm_lm.index.versioned import block_ids_hash, find_embeddings, latest_version, publish, read_manifest
from realm_lm.models.embedder import Embedder, build_retriever, weights_hash
from realm_lm.runtime import autocast, resolve_device


def length_batches(lengths: np.ndarray, max_tokens: int) -> Iterator[np.ndarray]:
    """Row numbers grouped by similar length, each group's padded size (rows x longest) <= max_tokens.

    Real blocks vary in length (median ~110 of 288 wordpieces here), so sorting first means almost no
    compute is spent on padding.
    """
    order = np.argsort(lengths, kind="stable")[::-1]  # longest first: the biggest batch shows memory early
    start = 0
    while start < len(order):
        longest = int(lengths[order[start]])
        rows = max(1, max_tokens // max(longest, 1))
        yield order[start:start + rows]
        start += rows


@torch.inference_mode()
def embed_rows(embedder: Embedder, tokens: np.ndarray, lengths: np.ndarray, max_tokens: int,
               desc: str = "embedding blocks", progress: bool = True, pooled: bool = False) -> np.ndarray:
    """Embeddings [N, D] float32 of token rows ``tokens`` [N, L] with true lengths ``lengths`` [N]; with ``pooled``,
    the tower's pooled outputs before its projection, [N, H]."""
    embedder.eval()
    encode = embedder.pool if pooled else embedder
    out = np.empty((len(lengths), embedder.hidden if pooled else embedder.dim), dtype=np.float32)
    with tqdm(total=len(lengths), desc=desc, unit="block", disable=not progress, smoothing=0.05) as bar:
        for rows in length_batches(lengths, max_tokens):
            rows = np.sort(rows)  # ascending rows read the memory-mapped matrix in order
            width = int(lengths[rows].max())
            ids = torch.from_numpy(np.ascontiguousarray(tokens[rows, :width])).long()  # [B, W]
            mask = (torch.arange(width)[None, :] < torch.from_numpy(lengths[rows])[:, None]).long()  # [B, W]
            out[rows] = encode(ids, mask).float().cpu().numpy()
            bar.update(len(rows))
    return out


def embedding_key(corpus_hash: str, doc_weights_hash: str, cfg: RunConfig) -> str:
    """What the embeddings depend on: corpus, document-tower weights, pooling. Keys the embedding cache."""
    parts = [corpus_hash, doc_weights_hash, cfg.embedder.pooling, str(cfg.embedder.proj_dim)]
    return hashlib.sha256("|".join(parts).encode()).hexdigest()


def tower_key(cfg: RunConfig, doc_embedder: Embedder, store: CorpusStore) -> str:
    """The :func:`embedding_key` of ``store`` embedded by this document tower now (hashes its weights: ~0.1 s)."""
    return embedding_key(store.corpus_hash, weights_hash(doc_embedder), cfg)


def index_is_current(index_dir: str | Path, key: str) -> bool:
    """Whether ``index_dir``'s latest version holds the embeddings of ``key`` (:func:`tower_key`). The test for a
    run's own index, rebuilt when not: a version merely existing says nothing once training has moved the weights on."""
    return latest_version(index_dir) is not None and read_manifest(index_dir).get("embedding_key") == key


def build_index(cfg: RunConfig, embedder_step: int | None = None, progress: bool = True,
                doc_embedder: Embedder | None = None, store: CorpusStore | None = None,
                reuse_from: tuple[str | Path, ...] = ()) -> str:
    """Embed the corpus store with the document tower (default: the one ``cfg.embedder`` describes) and publish a
    new version to ``cfg.index.dir``. A given tower embeds where it lies; the default one on ``cfg.runtime``'s
    device. Embeddings of the same corpus, weights and pooling are reused from that
    folder or from the ``reuse_from`` index folders (a fine-tuning run reuses its starting run's index)."""
    store = store or CorpusStore(cfg.corpus.store)
    doc_embedder = doc_embedder or build_retriever(cfg.embedder).doc.to(resolve_device(cfg.runtime))
    doc_hash = weights_hash(doc_embedder)
    key = embedding_key(store.corpus_hash, doc_hash, cfg)
    t0 = time.perf_counter()
    embeddings = None
    for folder in (cfg.index.dir, *reuse_from):
        if embeddings is None:
            embeddings = find_embeddings(folder, key)
    reused = embeddings is not None
    if embeddings is None:
        with autocast(doc_embedder.device, cfg.runtime.precision):
            embeddings = embed_rows(doc_embedder, store.tokens, store.lengths, cfg.index.embed_batch_tokens,
                                    progress=progress)
    embed_s = time.perf_counter() - t0
    t1 = time.perf_counter()
    index = make_index(cfg.index)
    index.build(embeddings)
    build_s = time.perf_counter() - t1
    manifest = {
        "backend": cfg.index.backend,
        "n_rows": len(store),
        "dim": int(embeddings.shape[1]),
        "corpus_hash": store.corpus_hash,
        "corpus_store": str(store.folder),
        "block_ids_sha256": block_ids_hash(store.block_ids),
        "embedder_weights_sha256": doc_hash,
        "embedder_step": embedder_step,
        "embedding_key": key,
        "embeddings_reused": reused,
        "embed_seconds": round(embed_s, 3),
        "index_build_seconds": round(build_s, 3),
        "config": config_to_dict(cfg),
    }
    return publish(cfg.index.dir, embeddings, index, manifest, keep=cfg.refresh.keep)
