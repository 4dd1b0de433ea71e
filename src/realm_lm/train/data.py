"""Batches for ICT, REALM pre-training and the reader, built from the corpus store's token matrix (a block is never
re-tokenised per question)."""

from __future__ import annotations

import hashlib
import re
from functools import lru_cache
from dataclasses import dataclass

import numpy as np
import torch

from realm_lm.corpus.store import CorpusStore
from realm_lm.masking import MaskedQuery
from realm_lm.models.pretrained import SpecialIds


def heldout_mask(store: CorpusStore, every: int) -> np.ndarray:
    """bool [N]: blocks held out of training (a stable function of the block id, so runs agree)."""
    return np.array([int(hashlib.sha1(b.encode()).hexdigest()[:8], 16) % every == 0 for b in store.block_ids])


def pad_rows(rows: list[np.ndarray], pad: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-padded ids [R, W] and attention mask [R, W] of ragged rows."""
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, :len(r)] = torch.from_numpy(np.asarray(r, dtype=np.int64))
        mask[i, :len(r)] = 1
    return ids, mask


def block_rows(store: CorpusStore, rows: np.ndarray) -> list[np.ndarray]:
    """The stored ``[CLS] title [SEP] body [SEP]`` of each row, without padding."""
    return [np.asarray(store.tokens[r, :store.lengths[r]]) for r in rows]


def title_and_body(store: CorpusStore, row: int, sep: int) -> tuple[np.ndarray, np.ndarray]:
    """The title and body wordpieces of a stored ``[CLS] title [SEP] body [SEP]`` block."""
    tokens = np.asarray(store.tokens[row, :store.lengths[row]])
    first_sep = int(np.argmax(tokens == sep))
    return tokens[1:first_sep], tokens[first_sep + 1:-1]


def body_of(store: CorpusStore, row: int, sep: int) -> np.ndarray:
    return title_and_body(store, row, sep)[1]


def contains_run(tokens: np.ndarray, run: np.ndarray) -> bool:
    """Whether ``run`` occurs in ``tokens`` as a contiguous subsequence."""
    if len(run) == 0 or len(run) > len(tokens):
        return False
    windows = np.lib.stride_tricks.sliding_window_view(tokens, len(run))  # [len(tokens) - len(run) + 1, len(run)]
    return bool((windows == run).all(-1).any())


@dataclass
class PretrainBatch:
    query_ids: torch.Tensor  # [B, Lq]
    query_mask: torch.Tensor  # [B, Lq]
    mask_positions: torch.Tensor  # [B, M] (padding slots: position 0)
    labels: torch.Tensor  # [B, M] (padding slots: 0)
    label_mask: torch.Tensor  # [B, M] 1 for real masks
    source_rows: np.ndarray  # [B] the block each query was cut from (never a candidate)
    queries: list[MaskedQuery]


def collate_queries(queries: list[MaskedQuery], source_rows: np.ndarray, special: SpecialIds) -> PretrainBatch:
    ids, mask = pad_rows([q.input_ids for q in queries], special.pad)
    m = max(len(q.mask_positions) for q in queries)
    positions = torch.zeros((len(queries), m), dtype=torch.long)
    labels = torch.zeros((len(queries), m), dtype=torch.long)
    label_mask = torch.zeros((len(queries), m), dtype=torch.long)
    for i, q in enumerate(queries):
        n = len(q.mask_positions)
        positions[i, :n] = torch.from_numpy(q.mask_positions)
        labels[i, :n] = torch.from_numpy(q.labels)
        label_mask[i, :n] = 1
    return PretrainBatch(ids, mask, positions, labels, label_mask, np.asarray(source_rows), queries)


def joint_inputs(queries: list[MaskedQuery], bodies: list[list[np.ndarray]], special: SpecialIds,
                 max_len: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``[CLS] query [SEP] body [SEP]`` for every (query, candidate) pair: ids, mask, token types, each [B*K, W]."""
    rows, types = [], []
    for q, candidates in zip(queries, bodies):
        for body in candidates:
            room = max(0, max_len - len(q.input_ids) - 1)
            row = np.concatenate([q.input_ids, body[:room], [special.sep]])
            rows.append(row)
            types.append(np.concatenate([np.zeros(len(q.input_ids)), np.ones(len(row) - len(q.input_ids))]))
    ids, mask = pad_rows(rows, special.pad)
    token_types, _ = pad_rows(types, 0)
    return ids, mask, token_types


@dataclass
class ReaderBatch:
    """``[CLS] question [SEP] title [SEP] body [SEP]`` for Q questions x K blocks, flattened to N = Q*K rows."""
    input_ids: torch.Tensor  # [N, L]
    attention_mask: torch.Tensor  # [N, L]
    token_type_ids: torch.Tensor  # [N, L] 0 on the question, 1 on the block
    block_mask: torch.Tensor  # [N, L] True on the body's wordpieces (where answer spans may lie)
    start_ok: torch.Tensor  # [N, L] body wordpieces that begin a word
    end_ok: torch.Tensor  # [N, L] body wordpieces that end a word
    body_start: np.ndarray  # [N] position of the body's first wordpiece in the row
    rows: np.ndarray  # [N] corpus store row of each block


def question_ids(tok, questions: list[str], special: SpecialIds, max_len: int) -> list[np.ndarray]:
    """``[CLS] question [SEP]`` wordpieces of each question, the question cut to ``max_len - 2``."""
    encoded = tok.encode_batch(list(questions), add_special_tokens=False)
    return [np.array([special.cls, *e.ids[:max_len - 2], special.sep], dtype=np.int64) for e in encoded]


@lru_cache(maxsize=4)
def continuation_pieces(tok) -> np.ndarray:
    """bool [V]: wordpieces that continue a word (``##...``); answer spans neither start at one nor stop before one."""
    vocab = tok.get_vocab()
    table = np.zeros(max(vocab.values()) + 1, dtype=bool)
    table[[i for t, i in vocab.items() if t.startswith("##")]] = True
    return table


def reader_batch(store: CorpusStore, questions: list[np.ndarray], rows: np.ndarray, tok, special: SpecialIds,
                 max_len: int) -> ReaderBatch:
    """questions: Q ``[CLS] q [SEP]`` id arrays; rows: [Q, K] store rows. The block's stored ``[CLS]`` is dropped
    and its body cut so that every row fits ``max_len`` with its final ``[SEP]``."""
    seqs, types, body_starts, body_ends = [], [], [], []
    for q, rows_of_q in zip(questions, rows):
        for row in rows_of_q:
            title, body = title_and_body(store, int(row), special.sep)
            room = max(0, max_len - len(q) - len(title) - 2)  # [SEP] after the title, [SEP] at the end
            seqs.append(np.concatenate([q, title, [special.sep], body[:room], [special.sep]]))
            body_starts.append(len(q) + len(title) + 1)
            body_ends.append(body_starts[-1] + min(len(body), room))
            types.append(np.concatenate([np.zeros(len(q)), np.ones(len(seqs[-1]) - len(q))]))
    ids, mask = pad_rows(seqs, special.pad)
    token_types, _ = pad_rows(types, 0)
    positions = torch.arange(ids.shape[1])  # [L]
    starts, ends = torch.tensor(body_starts), torch.tensor(body_ends)  # [N]
    block_mask = (positions[None] >= starts[:, None]) & (positions[None] < ends[:, None])  # [N, L]
    continues = torch.from_numpy(continuation_pieces(tok)[ids.numpy()])  # [N, L]
    next_continues = torch.nn.functional.pad(continues[:, 1:], (0, 1))  # [N, L]
    return ReaderBatch(ids, mask, token_types, block_mask, block_mask & ~continues, block_mask & ~next_continues,
                       np.asarray(body_starts), np.asarray(rows).reshape(-1))


def answer_pieces(tok, answers: list[str] | tuple[str, ...]) -> list[np.ndarray]:
    """Wordpiece sequences that count as a gold answer: each answer as written and SQuAD-normalised
    (so that "the Broncos" also matches "Broncos" in a block, as exact match would)."""
    from realm_lm.eval.metrics import normalize_answer

    texts = [t for t in dict.fromkeys([*answers, *map(normalize_answer, answers)]) if t.strip()]
    unique = dict.fromkeys(tuple(e.ids) for e in tok.encode_batch(texts, add_special_tokens=False) if e.ids)
    return [np.asarray(ids, dtype=np.int64) for ids in unique]  # an uncased vocabulary folds "Broncos" and "broncos"


def regex_answer_pieces(tok, patterns: tuple[str, ...], block_texts: list[str]) -> list[np.ndarray]:
    """For answers given as regular expressions (CuratedTrec): the strings the patterns match in a question's
    retrieved blocks, case-insensitively, as :func:`answer_pieces`. Each is a gold answer wherever it occurs among
    those blocks, since it matches a pattern there too."""
    found = {m.group(0) for text in block_texts for pattern in patterns
             for m in re.finditer(pattern, text, flags=re.IGNORECASE)}
    return answer_pieces(tok, sorted(found))


def gold_span_mask(batch: ReaderBatch, pieces: list[list[np.ndarray]], k: int, max_width: int,
                   starts: torch.Tensor, ends: torch.Tensor) -> torch.Tensor:
    """[Q, K, S] True for the enumerated spans (``starts``, ``ends``: [S]) whose wordpieces equal a gold answer's,
    inside the body, on word boundaries and at most ``max_width`` long (an answer cut inside a word is no answer).
    ``pieces``: per question, its answers' wordpiece sequences."""
    ids = batch.input_ids.numpy()
    block = batch.block_mask.numpy()
    n, width = ids.shape
    gold = np.zeros((n, width, max_width), dtype=bool)  # [N, start, length - 1]
    for i in range(n):
        body = np.nonzero(block[i])[0]
        if len(body) == 0:
            continue
        lo, hi = body[0], body[-1] + 1
        for seq in pieces[i // k]:
            m = len(seq)
            if m > max_width or m > hi - lo:
                continue
            windows = np.lib.stride_tricks.sliding_window_view(ids[i, lo:hi], m)  # [hi - lo - m + 1, m]
            gold[i, lo + np.nonzero((windows == seq).all(-1))[0], m - 1] = True
    on_words = batch.start_ok[:, starts] & batch.end_ok[:, ends]  # [N, S]
    return (torch.from_numpy(gold)[:, starts, ends - starts] & on_words).view(n // k, k, -1)  # [Q, K, S]


def blocks_to_read(has_answer: np.ndarray, n: int) -> tuple[np.ndarray, np.ndarray]:
    """Which retrieved blocks the reader reads while training. has_answer: [Q, K] bool. Only questions with an
    answer among their blocks are read (the loss drops the others anyway); each reads its best-ranked block
    holding an answer and the highest-ranked others, ``n`` blocks in all (0: all K).
    Returns the questions read [Q'] and, for each, its blocks' ranks in rank order [Q', n]."""
    questions = np.nonzero(has_answer.any(-1))[0]  # [Q']
    k = has_answer.shape[1]
    if n <= 0 or n >= k:
        return questions, np.tile(np.arange(k), (len(questions), 1))
    ranks = np.empty((len(questions), n), dtype=np.int64)
    for i, q in enumerate(questions):
        first = int(np.argmax(has_answer[q]))  # best-ranked block with an answer
        others = [j for j in range(k) if j != first][:n - 1]
        ranks[i] = sorted([first, *others])
    return questions, ranks
