"""`realm pretrain`: REALM pre-training with salient-span masking, latent retrieval over a stale index that an
asynchronous builder refreshes, and the marginal likelihood over the top-k candidates (null block included)."""

from __future__ import annotations

import json
import sys
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from tqdm import tqdm

from realm_lm.artifacts import write_json_atomic
from realm_lm.config import RunConfig, config_to_dict
from realm_lm.corpus.store import CorpusStore
from realm_lm.index.refresher import IndexBuilderError, IndexRefresher
from realm_lm.index.versioned import pin
from realm_lm.losses import marginal_nll, retrieval_utility
from realm_lm.masking import build_sentence_table, keep_spans, mask_query, salient_spans, spans_per_sentence
from realm_lm.models.embedder import RetrievalScale, Retriever, build_retriever, configure_dropout, load_bert
from realm_lm.models.knowledge_encoder import KnowledgeEncoder
from realm_lm.models.pretrained import SpecialIds, load_tokenizer, resolve_model_dir
from realm_lm.runtime import autocast, resolve_device
from realm_lm.train import distributed
from realm_lm.train.checkpoint import (latest_checkpoint, load_checkpoint, resume_point, save_checkpoint,
                                       set_rng_state, truncate_metrics_log)
from realm_lm.train.data import (PretrainBatch, block_rows, body_of, collate_queries, contains_run, heldout_mask,
                                 joint_inputs, pad_rows)
from realm_lm.train.loop import clip_each_group, run_steps


class RealmModel(nn.Module):
    """Everything REALM pre-training trains: the retriever's towers, the scale of its scores and the
    knowledge-augmented encoder."""

    def __init__(self, retriever: Retriever, encoder: KnowledgeEncoder, retrieval_scale: float = 1.0):
        super().__init__()
        self.retriever = retriever
        self.encoder = encoder
        self.retrieval_scale = RetrievalScale(retrieval_scale)


def warmup_steps(cfg: RunConfig) -> int:
    p = cfg.pretrain
    return p.warmup_steps if p.warmup_steps >= 0 else min(10_000, max(100, p.steps // 10))


def linear_schedule(opt: torch.optim.Optimizer, warmup: int, total: int, done: int = 0) -> torch.optim.lr_scheduler.LambdaLR:
    """BERT's schedule: linear warm-up, then linear decay to 0 at ``total``; ``done`` steps already taken."""
    return torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min((s + 1) / max(1, warmup), max(0.0, (total - s) / max(1, total - warmup))),
        last_epoch=done - 1)


class PretrainRecipe:
    def __init__(self, cfg: RunConfig):
        p = cfg.pretrain
        self.cfg = cfg
        self.run_dir = Path(p.run_dir)
        self.step = 0
        self.checkpoint_index_version: str | None = None  # the index version the latest checkpoint was trained on
        self.checkpoint_pending_refresh: int | None = None  # the refresh it had under way (refresh.swap_after > 0)

    # -- setup ---------------------------------------------------------------------------------------------
    def setup(self, resume: bool = False) -> None:
        cfg, p = self.cfg, self.cfg.pretrain
        distributed.init()
        self.store = CorpusStore(cfg.corpus.store)
        self.model_dir = resolve_model_dir(cfg.embedder.model)
        self.special = SpecialIds(load_tokenizer(self.model_dir))
        self.sentences = build_sentence_table(self.store, self.model_dir)
        if p.masking == "salient":
            rows, chars = salient_spans(self.store)
        else:
            rows, chars = np.zeros(0, np.int64), np.zeros((0, 2), np.int64)
        self.spans = spans_per_sentence(self.sentences, rows, chars, p.max_masks)
        held = heldout_mask(self.store, p.heldout_every)[self.sentences.block]
        usable = np.diff(self.spans.start) > 0 if p.masking == "salient" else np.ones(len(self.sentences), bool)
        self.train_sentences = np.nonzero(usable & ~held)[0]
        self.heldout_sentences = np.nonzero(usable & held)[0]
        if len(self.train_sentences) == 0:
            raise ValueError("no training sentences with a maskable span in this corpus")

        torch.manual_seed(p.seed)
        retriever = build_retriever(cfg.embedder)
        encoder = KnowledgeEncoder(load_bert(resolve_model_dir(cfg.encoder.model)))
        self.model = RealmModel(retriever, encoder, p.retrieval_scale)
        if p.init_from:
            ckpt = latest_checkpoint(p.init_from)
            if ckpt is None:
                raise FileNotFoundError(f"pretrain.init_from: no checkpoint in {p.init_from}")
            load_checkpoint(ckpt, self.model, strict=False)  # an ICT run carries the retriever only
        configure_dropout(self.model, p.attention_dropout)
        self.device = resolve_device(cfg.runtime)
        self.model.to(self.device)
        head = self.model.encoder.head
        new_params = [*head.dense.parameters(), *head.norm.parameters(), head.bias]  # not the tied decoder
        new_ids = {id(t) for t in new_params}
        retriever_params = list(self.model.retriever.parameters())
        encoder_params = [t for t in self.model.encoder.parameters() if id(t) not in new_ids]
        self.opt = torch.optim.AdamW([{"params": encoder_params},
                                      {"params": retriever_params, "lr": p.lr * p.retriever_lr_scale},
                                      {"params": new_params, "lr": p.lr * p.head_lr_scale},
                                      self.model.retrieval_scale.param_group(p.lr * p.head_lr_scale)],
                                     lr=p.lr, weight_decay=p.weight_decay)
        self.sched = linear_schedule(self.opt, warmup_steps(cfg), p.steps)

        self.run_dir.mkdir(parents=True, exist_ok=True)
        if distributed.is_main():
            write_json_atomic(self.run_dir / "config.json", config_to_dict(cfg))
        if (ckpt := resume_point(self.run_dir, resume)) is not None:
            self.resume(ckpt)
        if distributed.is_main():
            truncate_metrics_log(self.run_dir, self.step)
        # top_k = 1 reads the null block alone (the no-retrieval control): no index to build, search or refresh
        retrieves = p.top_k > 1
        self.refresher = IndexRefresher(cfg if retrieves else replace(cfg, refresh=replace(cfg.refresh, mode="never")),
                                        self.run_dir, self.store)
        if retrieves:  # every rank, once the first index exists (resumed: the index the checkpoint used)
            self.refresher.start(self.model.retriever.doc, self.step, self.checkpoint_index_version,
                                 self.checkpoint_pending_refresh)
        if p.require_evidence:
            spans_before = np.diff(self.spans.start)[self.train_sentences]  # [training sentences]
            self.spans = keep_spans(self.spans, self.spans_with_evidence(resumed=self.step > 0))
            spans_kept = np.diff(self.spans.start)[self.train_sentences]  # [training sentences]
            print(f"pretrain.require_evidence: {spans_kept.sum():,} of {spans_before.sum():,} training spans found in "
                  f"a candidate block; {(spans_kept > 0).sum():,} of {len(spans_kept):,} training sentences keep one",
                  file=sys.stderr)
            self.train_sentences = self.train_sentences[spans_kept > 0]
            if len(self.train_sentences) < p.batch_size:
                raise ValueError(f"pretrain.require_evidence leaves {len(self.train_sentences)} training sentences, "
                                 f"fewer than a batch of {p.batch_size}")

    def spans_with_evidence(self, resumed: bool, batch_size: int = 64) -> np.ndarray:
        """bool [E']: the training sentences' spans whose wordpieces occur in one of the top_k - 1 candidate blocks
        retrieved for the query that masks them (by the retriever and index the run starts from); held-out
        sentences keep every span. Saved in the run folder: a resumed run trains on the spans its start chose."""
        saved = self.run_dir / "evidence_spans.json"
        keep = np.ones(len(self.spans.tok), dtype=bool)
        if resumed and saved.is_file() and (found := json.loads(saved.read_text()))["spans"] == len(keep):
            keep[found["without_evidence"]] = False
            return keep
        p, t, sp = self.cfg.pretrain, self.sentences, self.special
        spans = [(s, e) for s in self.train_sentences for e in range(self.spans.start[s], self.spans.start[s + 1])]
        rng = np.random.default_rng(0)  # mask_query is given one span: nothing is left to chance
        self.model.eval()
        for lo in tqdm(range(0, len(spans), batch_size), desc="spans with evidence", unit="batch"):
            queries, sources, ids = [], [], []
            for s, e in spans[lo:lo + batch_size]:
                row = t.block[s]
                q = mask_query(t.body(row)[t.tok_start[s]:t.tok_end[s]], sp, "salient", rng, self.spans.tok[e:e + 1],
                               p.query_len, p.max_masks)
                keep[e] = q is not None
                if q is not None:
                    queries.append(q), sources.append(row), ids.append(e)
            if not queries:
                continue
            batch = collate_queries(queries, np.asarray(sources), sp)
            with torch.no_grad(), autocast(self.device, self.cfg.runtime.precision):
                query_emb = self.model.retriever.query(batch.query_ids, batch.query_mask)  # [B, D]
            for e, q, rows in zip(ids, queries, self.candidates(query_emb, batch.source_rows)):
                keep[e] = any(contains_run(body_of(self.store, r, sp.sep), q.labels) for r in rows)
        if distributed.is_main():
            write_json_atomic(saved, {"spans": len(keep), "without_evidence": np.nonzero(~keep)[0].tolist()})
        return keep

    def resume(self, ckpt: Path) -> None:
        state = load_checkpoint(ckpt, self.model, self.opt)
        self.step = state["step"]
        self.checkpoint_index_version = state.get("index_version")
        self.checkpoint_pending_refresh = state.get("pending_refresh")
        self.sched = linear_schedule(self.opt, warmup_steps(self.cfg), self.cfg.pretrain.steps, done=self.step)
        set_rng_state(state["rng"])
        print(f"resumed from {ckpt} at step {self.step}")

    # -- one step -----------------------------------------------------------------------------------------
    def make_batch(self, sentence_ids: np.ndarray, rng: np.random.Generator) -> PretrainBatch | None:
        """The sentences masked as queries (None where none of them can be masked)."""
        p, t = self.cfg.pretrain, self.sentences
        queries, sources = [], []
        for s in sentence_ids:
            row = t.block[s]
            ids = t.body(row)[t.tok_start[s]:t.tok_end[s]]
            q = mask_query(ids, self.special, p.masking, rng, self.spans.of(s), p.query_len, p.max_masks)
            if q is not None:
                queries.append(q)
                sources.append(row)
        return collate_queries(queries, np.asarray(sources), self.special) if queries else None

    def candidates(self, query_emb: torch.Tensor, sources: np.ndarray) -> list[list[int]]:
        """Top (k-1) rows of the stale index per query, the query's own block excluded (trivial retrieval)."""
        k = self.cfg.pretrain.top_k - 1
        if k == 0:  # the null block alone: nothing to search
            return [[] for _ in sources]
        _, found = self.refresher.index.search(query_emb.detach().float().cpu().numpy(), k + 1)
        return [[int(r) for r in row if r >= 0 and r != src][:k] for row, src in zip(found, sources)]

    def forward(self, batch: PretrainBatch) -> dict[str, torch.Tensor]:
        """Loss and diagnostics of one batch; candidates re-scored with the CURRENT towers (gradients reach both)."""
        with autocast(self.device, self.cfg.runtime.precision):
            return self._forward(batch)

    def _forward(self, batch: PretrainBatch) -> dict[str, torch.Tensor]:
        sp, model = self.special, self.model
        q = model.retriever.query(batch.query_ids, batch.query_mask)  # [B, D]
        cands = self.candidates(q, batch.source_rows)
        k = min(len(c) for c in cands)
        cands = [c[:k] for c in cands]
        B = len(cands)
        null_block = np.array([sp.cls, sp.sep, sp.sep])  # empty title, empty body: the null block
        d_ids, d_mask = pad_rows([null_block, *block_rows(self.store, np.asarray(cands).reshape(-1))], sp.pad)
        d = model.retriever.doc(d_ids, d_mask)  # [1 + B*k, D]
        d_cand = d[1:].view(B, k, d.shape[1])  # [B, k, D] (k = 0: the null block alone)
        with torch.autocast(self.device.type, enabled=False):  # scores in fp32 even under bf16 autocast
            scores = torch.cat([torch.einsum("bd,bkd->bk", q, d_cand), q @ d[0][:, None]], dim=1)  # [B, k+1], null last
            logits = model.retrieval_scale(scores)  # [B, k+1]
        bodies = [[body_of(self.store, r, sp.sep) for r in c] + [np.zeros(0, np.int64)] for c in cands]
        ids, mask, types = joint_inputs(batch.queries, bodies, sp, self.cfg.encoder.max_joint_len)  # [B*(k+1), W]
        K = k + 1
        positions = batch.mask_positions.repeat_interleave(K, dim=0)  # [B*K, M]
        logp = model.encoder(ids, mask, types, positions).view(B, K, positions.shape[1], -1)  # [B, K, M, V]
        batch_labels, label_mask = batch.labels.to(self.device), batch.label_mask.to(self.device)  # [B, M] each
        labels = batch_labels[:, None, :, None].expand(-1, K, -1, -1)  # [B, K, M, 1]
        token_logp = logp.gather(-1, labels).squeeze(-1)  # [B, K, M]
        loss = marginal_nll(logits, token_logp, label_mask, self.cfg.pretrain.marginal)
        with torch.no_grad():
            pz = logits.softmax(-1)  # [B, K]
            marginal = torch.einsum("bk,bkmv->bmv", pz, logp.exp())  # [B, M, V]
            real = label_mask.bool()
            correct = (marginal.argmax(-1) == batch_labels)[real].float().mean()
            ru = retrieval_utility(token_logp, label_mask, null_index=K - 1)  # [B, K]
            top = logits[:, :-1].argmax(-1) if k else torch.full((B,), K - 1, device=logits.device)  # best non-null, or null
            ru_top = ru.gather(1, top[:, None]).mean()
        return {"loss": loss, "mask_acc": correct, "ru_top": ru_top, "p_null": pz[:, -1].mean(),
                "masks": batch.label_mask.sum()}

    def micro_batches(self, sentence_ids: np.ndarray, rng: np.random.Generator) -> list[PretrainBatch]:
        """One step's sentences masked in order (the same masks whatever the split), in micro-batches of
        ``pretrain.micro_batch_size`` (0: one batch)."""
        size = self.cfg.pretrain.micro_batch_size or len(sentence_ids)
        chunks = [sentence_ids[i:i + size] for i in range(0, len(sentence_ids), size)]
        batches = [b for b in (self.make_batch(c, rng) for c in chunks) if b is not None]
        if not batches:
            raise ValueError("none of this step's sentences could be masked within pretrain.query_len")
        return batches

    def accumulate_gradients(self, batches: list[PretrainBatch]) -> dict[str, float]:
        """Backward of the batch's mean loss, one micro-batch at a time: each micro-batch's mean is weighted by
        its share of the queries, so the summed gradient is the whole batch's and memory is one micro-batch's.
        Returns the batch's metrics, weighted the same way."""
        n_queries = sum(len(b.queries) for b in batches)
        n_masks = sum(float(b.label_mask.sum()) for b in batches)  # >= 1 a query
        totals = dict.fromkeys(("loss", "mask_acc", "ru_top", "p_null"), 0.0) | {"masks": n_masks}
        for batch in batches:
            out = self.forward(batch)
            share = len(batch.queries) / n_queries
            (out["loss"] * share).backward()
            for name in ("loss", "ru_top", "p_null"):
                totals[name] += float(out[name].detach()) * share
            totals["mask_acc"] += float(out["mask_acc"]) * float(out["masks"]) / n_masks
        return totals

    def train_step(self) -> dict[str, Any]:
        p = self.cfg.pretrain
        swapped = self.refresher.maybe_swap(self.step, self.model.retriever.doc)  # a newer index, between steps
        # the batch is a function of (seed, step, rank): resume-exact, and different on every rank
        rng = np.random.default_rng([p.seed, self.step, distributed.rank()])
        torch.manual_seed(p.seed * 1_000_003 + self.step * 1_009 + distributed.rank())  # dropout too
        batches = self.micro_batches(rng.choice(self.train_sentences, size=p.batch_size, replace=False), rng)
        self.model.train()
        t0 = time.perf_counter()
        self.opt.zero_grad(set_to_none=True)
        metrics = self.accumulate_gradients(batches)
        distributed.average_gradients(self.model)
        clip_each_group(self.opt, 1.0)  # the scale's gradient would otherwise shrink everyone's steps
        self.opt.step()
        self.sched.step()
        metrics |= {"retrieval_scale": self.model.retrieval_scale.value}
        metrics |= distributed.mean_scalars({k: metrics[k] for k in ("loss", "mask_acc", "ru_top", "p_null")})
        stats = self.refresher.stats
        return metrics | {"step_s": time.perf_counter() - t0, "lr": self.sched.get_last_lr()[0],
                          "index_version": self.refresher.version, "staleness": self.refresher.staleness(self.step + 1),
                          "swapped": swapped, "refreshes": stats.swaps, "refresh_failures": stats.failures,
                          "index_wait_s": round(stats.waited_s, 3),
                          "last_refresh_s": round(stats.durations_s[-1], 2) if stats.durations_s else None}

    # -- loop -----------------------------------------------------------------------------------------------
    def train(self, stop_after: int | None = None) -> list[dict[str, Any]]:
        p = self.cfg.pretrain
        try:
            return run_steps(self, p.steps, p.save_every, "pre-training",
                             lambda m: {"loss": f"{m['loss']:.3f}", "acc": f"{m['mask_acc']:.2f}",
                                        "index": m["index_version"], "stale": m["staleness"]},
                             end=None if stop_after is None else self.step + stop_after)
        except IndexBuilderError:  # raised between steps: the weights are whole, keep them for --resume
            if distributed.is_main() and self.step > 0:
                print(f"saved {self.save()} before stopping", file=sys.stderr)
            raise

    def save(self) -> Path:
        version, index_dir = self.refresher.version, self.refresher.cfg.index.dir
        # the index this checkpoint trains on must outlive refresh.keep later refreshes, for --resume to go back to
        # it; the last checkpoint's too, until this one is written
        pin(index_dir, [self.checkpoint_index_version, version])
        pending = self.refresher.pending_refresh()  # its snapshot is kept until the next checkpoint
        saved = save_checkpoint(self.run_dir, self.step, self.model, self.opt,
                                {"config": config_to_dict(self.cfg), "index_version": version,
                                 "pending_refresh": pending, "kind": "pretrain"})
        pin(index_dir, [version])
        self.refresher.retain(pending)
        self.checkpoint_index_version = version
        return saved

    def close(self) -> None:
        self.refresher.close()

    @torch.no_grad()
    def evaluate(self, n_queries: int = 200, batch_size: int = 8) -> dict[str, float]:
        """Masked-token accuracy and retrieval utility on salient spans of HELD-OUT blocks (never trained on)."""
        self.model.eval()
        rng = np.random.default_rng(12345)
        pool = self.heldout_sentences
        chosen = rng.choice(pool, size=min(n_queries, len(pool)), replace=False)
        acc, ru, masks, queries = 0.0, 0.0, 0.0, 0
        for start in range(0, len(chosen), batch_size):
            batch = self.make_batch(chosen[start:start + batch_size], rng)
            if batch is None:
                continue
            out = self.forward(batch)
            n = float(out["masks"])
            acc += float(out["mask_acc"]) * n
            ru += float(out["ru_top"]) * len(batch.queries)
            masks += n
            queries += len(batch.queries)
        return {"heldout_mask_acc": acc / max(masks, 1), "heldout_ru_top": ru / max(queries, 1),
                "heldout_queries": queries}


def main(cfg: RunConfig, resume: bool = False) -> list[dict[str, Any]]:
    recipe = PretrainRecipe(cfg)
    recipe.setup(resume=resume)
    try:
        return recipe.train()
    finally:
        recipe.close()
