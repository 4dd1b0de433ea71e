"""`realm ict`: the Inverse Cloze Task warm start of the retriever (ORQA).

A sentence is the pseudo-query; its block, with the sentence removed with probability ``remove_prob``, is the
positive; the other blocks of the batch are the negatives (softmax over in-batch inner products). Under torchrun
each process draws ``ict.batch_size`` pairs and the negatives come from every process's batch.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from realm_lm.artifacts import write_json_atomic
from realm_lm.config import RunConfig, config_to_dict
from realm_lm.corpus.store import CorpusStore
from realm_lm.index.build import embed_rows
from realm_lm.losses import in_batch_nll
from realm_lm.masking import build_sentence_table
from realm_lm.models.embedder import Retriever, build_retriever, configure_dropout
from realm_lm.models.pretrained import SpecialIds, load_tokenizer, resolve_model_dir
from realm_lm.runtime import autocast, resolve_device
from realm_lm.train import distributed
from realm_lm.train.checkpoint import load_checkpoint, resume_point, save_checkpoint, set_rng_state, truncate_metrics_log
from realm_lm.train.data import heldout_mask, pad_rows, title_and_body
from realm_lm.train.loop import run_steps


class IctModel(nn.Module):
    """The retriever alone, under the same parameter names as in pre-training (``retriever.*``)."""

    def __init__(self, retriever: Retriever):
        super().__init__()
        self.retriever = retriever


class IctRecipe:
    def __init__(self, cfg: RunConfig):
        self.cfg = cfg
        self.run_dir = Path(cfg.ict.run_dir)
        self.step = 0

    def setup(self, resume: bool = False) -> None:
        cfg = self.cfg
        distributed.init()
        self.store = CorpusStore(cfg.corpus.store)
        model_dir = resolve_model_dir(cfg.embedder.model)
        self.special = SpecialIds(load_tokenizer(model_dir))
        self.sentences = build_sentence_table(self.store, model_dir)
        held_blocks = heldout_mask(self.store, cfg.pretrain.heldout_every)
        held = held_blocks[self.sentences.block]
        self.train_sentences = np.nonzero(~held)[0]
        self.heldout_sentences = np.nonzero(held)[0]
        torch.manual_seed(cfg.ict.seed)
        self.device = resolve_device(cfg.runtime)
        self.model = IctModel(build_retriever(cfg.embedder)).to(self.device)
        configure_dropout(self.model, cfg.ict.attention_dropout)
        self.opt = torch.optim.AdamW(self.model.parameters(), lr=cfg.ict.lr, weight_decay=0.01)
        self.run_dir.mkdir(parents=True, exist_ok=True)
        main_rank = distributed.is_main()
        if main_rank:
            write_json_atomic(self.run_dir / "config.json", config_to_dict(cfg))
        if (ckpt := resume_point(self.run_dir, resume)) is not None:
            state = load_checkpoint(ckpt, self.model, self.opt)
            self.step = state["step"]
            set_rng_state(state["rng"])
            print(f"resumed from {ckpt} at step {self.step}")
        elif cfg.ict.pca_blocks and self.model.retriever.query.projected and not cfg.embedder.checkpoint:
            self.fit_projection(held_blocks)
        if main_rank:
            truncate_metrics_log(self.run_dir, self.step)

    def fit_projection(self, held_blocks: np.ndarray) -> None:
        """The projection starts at the principal directions of the pooled outputs of up to ``ict.pca_blocks``
        training blocks rather than at random (Embedder.fit_projection); every rank takes rank 0's result."""
        rng = np.random.default_rng(self.cfg.ict.seed)
        train_blocks = np.nonzero(~held_blocks)[0]
        rows = np.sort(rng.permutation(train_blocks)[:self.cfg.ict.pca_blocks])
        tower = self.model.retriever.query
        if min(len(rows), tower.hidden) < tower.dim:  # checked before embedding anything (Embedder.fit_projection)
            print(f"ICT keeps the random projection: a {tower.dim}-d fit needs {tower.dim} blocks and hidden size "
                  f">= {tower.dim} (have {len(rows)} and {tower.hidden})")
            return
        with autocast(self.device, self.cfg.runtime.precision):
            pooled = embed_rows(tower, self.store.tokens[rows], self.store.lengths[rows],
                                self.cfg.index.embed_batch_tokens, desc="fitting the projection",
                                progress=distributed.is_main(), pooled=True)  # [N, H]
        for t in {tower, self.model.retriever.doc}:
            t.fit_projection(torch.from_numpy(pooled))
        distributed.broadcast_parameters(self.model)

    def title_ids(self, row: int) -> np.ndarray:
        return title_and_body(self.store, row, self.special.sep)[0]

    def pair(self, s: int, remove: bool) -> tuple[np.ndarray, np.ndarray]:
        """(``[CLS] sentence [SEP]``, ``[CLS] title [SEP] block body (without the sentence) [SEP]``)."""
        t, sp, cfg = self.sentences, self.special, self.cfg
        row = t.block[s]
        body = t.body(row)
        a, b = t.tok_start[s], t.tok_end[s]
        query = np.concatenate([[sp.cls], body[a:b][:cfg.ict.query_len - 2], [sp.sep]])
        context = np.concatenate([body[:a], body[b:]]) if remove else body
        title = self.title_ids(row)
        room = cfg.corpus.block_len - 3 - len(title)
        block = np.concatenate([[sp.cls], title, [sp.sep], context[:room], [sp.sep]])
        return query, block

    def batch(self, sentence_pool: np.ndarray, size: int, rng: np.random.Generator, remove_prob: float):
        """``size`` pairs from distinct blocks (a second sentence of the same block would be a false negative)."""
        picked, blocks = [], set()
        for s in rng.permutation(sentence_pool)[:size * 4]:
            if self.sentences.block[s] not in blocks:
                blocks.add(self.sentences.block[s])
                picked.append(s)
            if len(picked) == size:
                break
        pairs = [self.pair(s, rng.random() < remove_prob) for s in picked]
        q_ids, q_mask = pad_rows([p[0] for p in pairs], self.special.pad)
        d_ids, d_mask = pad_rows([p[1] for p in pairs], self.special.pad)
        return q_ids, q_mask, d_ids, d_mask

    def train_step(self) -> dict[str, Any]:
        ict = self.cfg.ict
        rank = distributed.rank()
        # the batch is a function of (seed, step, rank): resume-exact, and different on every rank
        rng = np.random.default_rng([ict.seed, self.step, rank])
        torch.manual_seed(ict.seed * 1_000_003 + self.step + rank * 1_000_000_007)  # dropout too
        q_ids, q_mask, d_ids, d_mask = self.batch(self.train_sentences, ict.batch_size, rng, ict.remove_prob)
        self.model.train()
        t0 = time.perf_counter()
        with autocast(self.device, self.cfg.runtime.precision):
            q = self.model.retriever.query(q_ids, q_mask)  # [B, D]
            d = self.model.retriever.doc(d_ids, d_mask)  # [B, D]
        q, d = distributed.gather_rows(q), distributed.gather_rows(d)  # [W*B, D]: every rank's pairs
        loss = in_batch_nll(q, d)  # raw q.d: a learned softer scale lowered dev R@5 (0.803 -> 0.793 at 1e-5; results/ict_scale_sweep.log)
        self.opt.zero_grad(set_to_none=True)
        (loss * distributed.world_size()).backward()  # each rank holds the gradient through its own rows only
        distributed.average_gradients(self.model)
        torch.nn.utils.clip_grad_norm_(self.model.parameters(), 1.0)
        self.opt.step()
        with torch.no_grad():
            acc = ((q @ d.T).argmax(-1) == torch.arange(len(q), device=q.device)).float().mean()
        return {"loss": float(loss.detach()), "in_batch_acc": float(acc), "step_s": time.perf_counter() - t0}

    @torch.no_grad()
    def evaluate(self, ks: tuple[int, ...] = (1, 5, 20)) -> dict[str, float]:
        """Recall@k of pseudo-queries among held-out blocks (one sentence each, always removed)."""
        self.model.eval()
        rng = np.random.default_rng(999)
        q_ids, q_mask, d_ids, d_mask = self.batch(self.heldout_sentences, self.cfg.ict.eval_blocks, rng, 1.0)
        with autocast(self.device, self.cfg.runtime.precision):
            q = torch.cat([self.model.retriever.query(q_ids[i:i + 64], q_mask[i:i + 64]) for i in range(0, len(q_ids), 64)])
            d = torch.cat([self.model.retriever.doc(d_ids[i:i + 64], d_mask[i:i + 64]) for i in range(0, len(d_ids), 64)])
        rank = true_block_ranks(q, d)
        return {f"ict_recall@{k}": float((rank < k).float().mean()) for k in ks} | {"ict_eval_blocks": len(q)}

    def train(self) -> list[dict[str, Any]]:
        ict = self.cfg.ict
        return run_steps(self, ict.steps, ict.save_every, "ICT",
                         lambda m: {"loss": f"{m['loss']:.3f}", "acc": f"{m['in_batch_acc']:.2f}"})

    def save(self) -> Path:
        return save_checkpoint(self.run_dir, self.step, self.model, self.opt,
                               {"config": config_to_dict(self.cfg), "kind": "ict"})


def true_block_ranks(q: torch.Tensor, d: torch.Tensor) -> torch.Tensor:
    """0-based rank [Q] of each query's true block (query i's is block i) among ``d`` [Q, D] by inner product.

    A tie counts against the true block: blocks left empty by the removed sentence hold only their document's
    title and tie exactly. The true score is read from the same product as the others' (one computed apart
    rounds differently, and the true block then outranked itself about half the time)."""
    scores = q @ d.T  # [Q, Q]
    return (scores >= scores.diagonal()[:, None]).sum(-1) - 1  # other blocks scored at or above the true one


def main(cfg: RunConfig, resume: bool = False) -> dict[str, float]:
    """Train, and (rank 0) evaluate before and after; the other ranks of a torchrun job return {}."""
    recipe = IctRecipe(cfg)
    recipe.setup(resume=resume)
    main_rank = distributed.is_main()
    before = recipe.evaluate(cfg.eval.ks) if main_rank else {}
    recipe.train()
    if not main_rank:
        return {}
    after = recipe.evaluate(cfg.eval.ks)
    result = {f"before.{k}": v for k, v in before.items()} | {f"after.{k}": v for k, v in after.items()}
    write_json_atomic(recipe.run_dir / "ict_eval.json", result)
    return result
