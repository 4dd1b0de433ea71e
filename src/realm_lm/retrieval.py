"""Question -> top-k blocks, for the three retrievers we compare: REALM's dense index, MiniLM mean pooling, BM25.

Every retriever answers ``search(questions, k) -> (scores [Q, k], rows [Q, k])`` over the rows of one
corpus store; :func:`make_searcher` builds any of them from a run config.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path
from typing import Protocol, Sequence

import numpy as np
import torch
from tqdm import tqdm

from realm_lm.config import RunConfig, run_config
from realm_lm.corpus.store import CorpusStore
from realm_lm.errors import RealmError
from realm_lm.index.build import ensure_index, tower_key
from realm_lm.index.versioned import IndexMismatchError, load_index
from realm_lm.models.embedder import Embedder, Retriever, build_retriever
from realm_lm.models.pretrained import SpecialIds, load_tokenizer, resolve_model_dir
from realm_lm.runtime import autocast, resolve_device

RETRIEVERS = ("realm", "minilm-mean", "bm25")
MAX_QUESTION_CHARS = 2000


class BadQuestionError(RealmError, ValueError):
    pass


@dataclass(frozen=True)
class Hit:
    rank: int
    score: float
    row: int
    block_id: str
    title: str
    text: str


class Searcher(Protocol):
    store: CorpusStore

    def search(self, questions: Sequence[str], k: int) -> tuple[np.ndarray, np.ndarray]: ...


def check_question(question: str) -> str:
    question = question.strip()
    if not question:
        raise BadQuestionError("the question is empty")
    if len(question) > MAX_QUESTION_CHARS:
        raise BadQuestionError(f"the question has {len(question)} characters; at most {MAX_QUESTION_CHARS} are accepted")
    return question


def tokenize_queries(questions: Sequence[str], model_dir: Path, max_len: int) -> list[list[int]]:
    """``[CLS] question [SEP]`` ids of each question, cut to ``max_len``."""
    tok = load_tokenizer(model_dir)
    special = SpecialIds(tok)
    return [[special.cls, *e.ids[:max_len - 2], special.sep]
            for e in tok.encode_batch(list(questions), add_special_tokens=False)]


def pad_queries(rows: Sequence[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Token rows as ids and mask, [Q, L] with L = the longest row."""
    width = max(len(row) for row in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)  # [Q, L]
    mask = torch.zeros((len(rows), width), dtype=torch.long)  # [Q, L]
    for i, row in enumerate(rows):
        ids[i, :len(row)] = torch.tensor(row)
        mask[i, :len(row)] = 1
    return ids, mask


def encode_queries(questions: Sequence[str], model_dir: Path, max_len: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``[CLS] question [SEP]`` ids and mask, [Q, L] with L = the longest (<= max_len)."""
    pad_id = SpecialIds(load_tokenizer(model_dir)).pad
    return pad_queries(tokenize_queries(questions, model_dir, max_len), pad_id)


@torch.inference_mode()
def embed_questions(embedder: Embedder, questions: Sequence[str], model_dir: Path, max_len: int,
                    batch: int = 128, progress: bool = False) -> np.ndarray:
    """Query embeddings [Q, D] in the order given. Batches hold questions of similar length (padding the
    unsorted questions to each batch's longest nearly doubled the tokens on Open-SQuAD's questions)."""
    embedder.eval()
    rows = tokenize_queries(questions, model_dir, max_len)
    pad_id = SpecialIds(load_tokenizer(model_dir)).pad
    by_length = sorted(range(len(rows)), key=lambda i: len(rows[i]))
    out = np.zeros((len(rows), embedder.dim), np.float32)  # [Q, D]
    for start in tqdm(range(0, len(rows), batch), desc="embedding questions", disable=not progress):
        chosen = by_length[start:start + batch]
        ids, mask = pad_queries([rows[i] for i in chosen], pad_id)
        out[chosen] = embedder(ids, mask).float().cpu().numpy()
    return out


class DenseSearcher:
    """Query tower + a published index version over ``store``."""

    def __init__(self, cfg: RunConfig, store: CorpusStore | None = None, retriever: Retriever | None = None,
                 key: str | None = None):
        """``retriever`` and its :func:`tower_key`, when the caller has them already."""
        self.cfg = cfg
        self.store = store or CorpusStore(cfg.corpus.store)
        self.index, self.manifest = load_index(cfg.index.dir, self.store, cfg=cfg.index)
        retriever = retriever or build_retriever(cfg.embedder)
        key = key or tower_key(cfg, retriever.doc, self.store)
        if self.manifest.get("embedding_key") != key:  # queries and blocks from other towers
            raise IndexMismatchError(
                f"index {cfg.index.dir} version {self.manifest['version']} was embedded by other document-tower "
                f"weights or pooling than embedder.* give ({cfg.embedder.checkpoint or 'as initialised'}); rebuild it "
                f"with `realm index build`")
        self.model_dir = resolve_model_dir(cfg.embedder.model)
        self.embedder = retriever.query.to(resolve_device(cfg.runtime))

    def search(self, questions: Sequence[str], k: int, progress: bool = False) -> tuple[np.ndarray, np.ndarray]:
        with autocast(self.embedder.device, self.cfg.runtime.precision):
            q = embed_questions(self.embedder, [check_question(x) for x in questions], self.model_dir,
                                self.cfg.embedder.max_query_len, progress=progress)
        return self.index.search(q, k)


class Bm25Searcher:
    """BM25 (bm25s, English stop words) over title + body of every block."""

    def __init__(self, store: CorpusStore):
        import bm25s

        self.bm25s = bm25s
        self.store = store
        corpus = [f"{t}. {x}" for t, x in zip(store.titles, store.texts)]
        self.model = bm25s.BM25()
        self.model.index(bm25s.tokenize(corpus, stopwords="en", show_progress=False), show_progress=False)

    def search(self, questions: Sequence[str], k: int, progress: bool = False) -> tuple[np.ndarray, np.ndarray]:
        questions = [check_question(x) for x in questions]
        tokens = self.bm25s.tokenize(questions, stopwords="en", show_progress=False)
        for question, terms in zip(questions, tokens.ids):
            if not terms:  # BM25 would score every block 0 and return arbitrary ones
                raise BadQuestionError(f"the question {question[:80]!r} has no word BM25 can search for (only stop "
                                       f"words, punctuation or symbols)")
        rows, scores = self.model.retrieve(tokens, k=min(k, len(self.store)), show_progress=progress, n_threads=1)
        return scores.astype(np.float32), rows.astype(np.int64)


def minilm_mean_config(cfg: RunConfig) -> RunConfig:
    """The MiniLM baseline: mean pooling, no projection, its own index folder beside REALM's."""
    return replace(cfg, embedder=replace(cfg.embedder, pooling="mean", checkpoint=""),
                   index=replace(cfg.index, dir=str(Path(cfg.index.dir).with_name(Path(cfg.index.dir).name + "-minilm-mean"))))


def trained_config(cfg: RunConfig, run_dir: str | Path) -> RunConfig:
    """Retrieve with the towers of a training run, from its own index of ``cfg.corpus.store``, kept in
    RUN_DIR/eval-index-<corpus hash> (one per corpus: swapping corpora needs a re-embedding, not retraining)."""
    corpus_hash = CorpusStore(cfg.corpus.store).corpus_hash
    embedder = cfg.embedder
    if (Path(run_dir) / "config.json").is_file():  # the run's own towers: pooling, sharing, query length
        embedder = run_config(run_dir).embedder
    return replace(cfg, embedder=replace(embedder, checkpoint=str(run_dir)),
                   index=replace(cfg.index, dir=str(Path(run_dir) / f"eval-index-{corpus_hash[:12]}")))


def make_searcher(cfg: RunConfig, kind: str, store: CorpusStore | None = None) -> Searcher:
    if kind == "realm":
        store = store or CorpusStore(cfg.corpus.store)
        retriever = build_retriever(cfg.embedder)
        key = tower_key(cfg, retriever.doc, store)
        # a trained retriever's own index: built on first use, and again once training has moved its weights on
        if cfg.embedder.checkpoint:
            ensure_index(cfg, store, retriever.doc.to(resolve_device(cfg.runtime)), key)
        return DenseSearcher(cfg, store, retriever, key)
    if kind == "minilm-mean":
        return DenseSearcher(minilm_mean_config(cfg), store)
    if kind == "bm25":
        return Bm25Searcher(store or CorpusStore(cfg.corpus.store))
    raise ValueError(f"unknown retriever {kind!r}; choose one of {', '.join(RETRIEVERS)}")


def hits_of(store: CorpusStore, scores: np.ndarray, rows: np.ndarray) -> list[Hit]:
    """One question's (scores [k], rows [k]) as Hits with the block's id, title and text."""
    return [Hit(r + 1, float(s), int(row), store.block_ids[row], store.titles[row], store.texts[row].strip())
            for r, (s, row) in enumerate(zip(scores, rows)) if row >= 0]

