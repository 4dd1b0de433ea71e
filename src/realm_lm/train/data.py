"""Batches for ICT and REALM pre-training, built from the corpus store and its sentence table (no re-tokenising)."""

from __future__ import annotations

import hashlib
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
