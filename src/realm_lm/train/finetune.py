"""`realm finetune`: open-domain QA fine-tuning (ORQA / REALM). The block index stays fixed (the document tower
is frozen); the query tower and an extractive span reader are trained on
-log sum_{(z, span) matching a gold answer} p(z|x) p(span|z,x)  +  -log sum_{z containing an answer} p(z|x),
each term dropped for a question whose retrieved blocks hold no answer. The reader reads only the questions with
an answer among their blocks and, with ``finetune.reader_blocks``, only some of their blocks. Under torchrun each
process reads its own ``finetune.batch_size`` questions of the step and gradients are averaged."""

from __future__ import annotations

import copy
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from realm_lm.artifacts import write_json_atomic
from realm_lm.config import RunConfig, config_to_dict
from realm_lm.corpus.questions import Question, check_answer_patterns, load_questions, read_qa_file
from realm_lm.corpus.store import CorpusStore
from realm_lm.index.build import build_index_on_ranks, index_is_current, tower_key
from realm_lm.index.versioned import load_index
from realm_lm.losses import reader_marginal_nll, retriever_marginal_nll
from realm_lm.models.embedder import RetrievalScale, Retriever, build_retriever, configure_dropout, load_bert
from realm_lm.models.pretrained import SpecialIds, load_tokenizer, resolve_model_dir
from realm_lm.models.reader import Reader, enumerate_spans
from realm_lm.retrieval import Bm25Searcher, encode_queries, trained_config
from realm_lm.runtime import autocast, resolve_device
from realm_lm.train import distributed
from realm_lm.train.checkpoint import (latest_checkpoint, load_checkpoint, read_weights, resume_point,
                                       save_checkpoint, set_rng_state, tensor_names, truncate_metrics_log)
from realm_lm.train.data import (answer_pieces, blocks_to_read, gold_span_mask, question_ids, reader_batch,
                                 regex_answer_pieces)
from realm_lm.train.loop import clip_each_group, run_steps
from realm_lm.train.pretrain import linear_schedule

RETRIEVAL_SCALE_KEY = "retrieval_scale.log_scale"  # its name in a fine-tuning checkpoint


class QaModel(nn.Module):
    """What fine-tuning trains (``reader.*``, the retrieval scale) and what it keeps (``retriever.query`` trained,
    ``retriever.doc`` frozen: the index was made with it). BM25 runs have no retriever and no scale."""

    def __init__(self, retriever: Retriever | None, reader: Reader, retrieval_scale: float = 1.0):
        super().__init__()
        self.retriever = retriever
        self.reader = reader
        self.retrieval_scale = RetrievalScale(retrieval_scale) if retriever is not None else None

    def retrieval_logits(self, q: torch.Tensor, blocks: torch.Tensor) -> torch.Tensor:
        """q: [B, D] queries; blocks: [B, k, D] their retrieved blocks -> f(x, z): [B, k], in fp32."""
        with torch.autocast(q.device.type, enabled=False):
            return self.retrieval_scale(torch.einsum("bd,bkd->bk", q, blocks))


def checkpoint_keys(run_dir: str | Path) -> set[str]:
    ckpt = latest_checkpoint(run_dir)
    if ckpt is None:
        raise FileNotFoundError(f"finetune.init_from: no checkpoint in {run_dir}")
    return tensor_names(ckpt)


def training_questions(cfg: RunConfig) -> list[Question]:
    f = cfg.finetune
    questions = read_qa_file(f.questions) if f.questions else load_questions(cfg.eval.squad, "train")
    return questions[:f.max_questions] if f.max_questions else questions


class FinetuneRecipe:
    def __init__(self, cfg: RunConfig):
        f = cfg.finetune
        self.cfg = cfg
        self.run_dir = Path(f.run_dir)
        self.step = 0
        self.dense = f.retriever == "realm"
        self.device = resolve_device(cfg.runtime)

    # -- setup ---------------------------------------------------------------------------------------------
    def setup(self, resume: bool = False, progress: bool = True) -> None:
        cfg, f, r = self.cfg, self.cfg.finetune, self.cfg.reader
        distributed.init()
        self.store = CorpusStore(cfg.corpus.store)
        self.model_dir = resolve_model_dir(cfg.embedder.model)
        self.tok = load_tokenizer(self.model_dir)
        self.special = SpecialIds(self.tok)
        self.questions = training_questions(cfg)
        self.regex = cfg.eval.regex_answers  # answers are patterns: gold spans are what they match in the blocks read
        if self.regex:
            check_answer_patterns(self.questions)
        # literal answers' wordpieces, once (patterns: per step, from the blocks retrieved; see gold_pieces)
        self.pieces = [] if self.regex else [answer_pieces(self.tok, q.answers) for q in self.questions]
        init_keys = checkpoint_keys(f.init_from) if f.init_from else set()
        torch.manual_seed(f.seed)

        retriever = self.setup_retriever(init_keys, progress) if self.dense else None
        reader = Reader(load_bert(resolve_model_dir(cfg.encoder.model)), r.span_hidden, r.max_span_len)
        self.model = QaModel(retriever, reader, f.retrieval_scale)
        if any(k.startswith("encoder.bert.") for k in init_keys):  # REALM pre-training: the reader reads with its encoder
            reader.bert.load_state_dict(read_weights(latest_checkpoint(f.init_from), "encoder.bert."))
        if any(k.startswith("reader.") for k in init_keys):  # continue from a fine-tuned run
            load_checkpoint(latest_checkpoint(f.init_from), self.model, strict=False)
        if not self.dense:
            self.bm25_rows = Bm25Searcher(self.store).search([q.question for q in self.questions], r.top_k)[1]
        configure_dropout(self.model, f.attention_dropout)
        self.model.to(self.device)

        head = [*reader.start_proj.parameters(), *reader.end_proj.parameters(), *reader.norm.parameters(),
                *reader.score.parameters()]
        groups = [{"params": [*reader.bert.parameters()]}, {"params": head, "lr": f.lr * f.head_lr_scale}]
        if self.dense:
            groups.append(self.model.retrieval_scale.param_group(f.lr * f.head_lr_scale))
        if self.dense and f.train_query_tower:
            groups.append({"params": [*self.model.retriever.query.parameters()], "lr": f.lr * f.query_lr_scale})
        self.opt = torch.optim.AdamW(groups, lr=f.lr, weight_decay=f.weight_decay)
        warmup = f.warmup_steps if f.warmup_steps >= 0 else max(1, f.steps // 10)
        self.sched = linear_schedule(self.opt, warmup, f.steps)

        self.run_dir.mkdir(parents=True, exist_ok=True)
        main_rank = distributed.is_main()
        if main_rank:
            write_json_atomic(self.run_dir / "config.json", config_to_dict(self.run_config()))
        if (ckpt := resume_point(self.run_dir, resume)) is not None:
            state = load_checkpoint(ckpt, self.model, self.opt)
            self.step = state["step"]
            self.sched = linear_schedule(self.opt, warmup, f.steps, done=self.step)
            set_rng_state(state["rng"])
            print(f"resumed from {ckpt} at step {self.step}")
        if main_rank:
            truncate_metrics_log(self.run_dir, self.step)

    def setup_retriever(self, init_keys: set[str], progress: bool) -> Retriever:
        """Separate towers: the query tower trains, the document tower stays the one that made the index. The index
        lives in this run's folder, built unless it already holds this tower's embeddings (taken from the starting
        run's index where that one holds them)."""
        cfg, f = self.cfg, self.cfg.finetune
        has_retriever = any(k.startswith("retriever.") for k in init_keys)
        base = trained_config(cfg, f.init_from) if has_retriever else cfg
        start = build_retriever(base.embedder).to(self.device)
        doc = start.doc
        query = copy.deepcopy(start.query) if start.shared else start.query
        for p in doc.parameters():
            p.requires_grad_(False)
        if not f.train_query_tower:
            for p in query.parameters():
                p.requires_grad_(False)
        own = trained_config(replace(cfg, embedder=self.run_config().embedder), self.run_dir)
        # a run folder written before may hold the old weights' index; under torchrun every rank embeds a share of
        # the blocks, then rank 0 publishes, and every rank reads
        if not index_is_current(own.index.dir, tower_key(own, doc, self.store)):
            build_index_on_ranks(own, progress, doc_embedder=doc, store=self.store, reuse_from=(base.index.dir,))
        self.index, manifest = load_index(own.index.dir, self.store, cfg=own.index)
        self.block_emb = np.load(Path(own.index.dir) / "versions" / manifest["version"] / "embeddings.npy",
                                 mmap_mode="r")  # [N, D], the fixed document embeddings
        self.query_len = base.embedder.max_query_len
        # finetune.reader_retrieval = "initial": the tower as it started picks and scores the blocks the reader
        # trains on (taken before any checkpoint is loaded, so a resumed run has the same one)
        self.initial_query = (copy.deepcopy(query).eval().requires_grad_(False)
                              if f.reader_retrieval == "initial" else None)
        return Retriever(query, doc)

    def run_config(self) -> RunConfig:
        """The config saved with the run: its towers are separate and its own checkpoints hold them."""
        cfg = self.cfg
        return replace(cfg, embedder=replace(cfg.embedder, share_towers=False, checkpoint=""))

    # -- one step -----------------------------------------------------------------------------------------
    def forward(self, idx: np.ndarray) -> dict[str, torch.Tensor]:
        r, f, model = self.cfg.reader, self.cfg.finetune, self.model
        questions = [self.questions[i].question for i in idx]
        k = r.top_k
        if self.dense:
            q_ids, q_mask = encode_queries(questions, self.model_dir, self.query_len)
            q = model.retriever.query(q_ids, q_mask)  # [B, D]
            rows, blocks = self.retrieve(q)  # [B, k], [B, k, D]
            retrieval_logits = model.retrieval_logits(q, blocks)  # [B, k]
        else:
            rows = self.bm25_rows[idx]
            retrieval_logits = torch.zeros(len(idx), k, device=self.device)  # BM25 scores are not on the reader's scale
        asked = question_ids(self.tok, questions, self.special, r.question_len)
        pieces = self.gold_pieces(idx, rows)
        has_answer = self.answer_mask(asked, rows, pieces)  # [B, k]
        retriever_loss = retriever_marginal_nll(retrieval_logits, has_answer.to(self.device))

        # what the reader trains on (finetune.reader_retrieval): these blocks and logits (joint), the same taken as
        # given (detached: the scale still learns from the reader's loss), or the starting tower's (initial)
        read_rows, read_pieces, read_has_answer, read_logits_all = rows, pieces, has_answer, retrieval_logits
        if self.dense and f.reader_retrieval == "detached":
            read_logits_all = model.retrieval_logits(q.detach(), blocks)  # [B, k]
        elif self.dense and f.reader_retrieval == "initial":
            with torch.no_grad():
                q_start = self.initial_query(q_ids, q_mask)  # [B, D]
            read_rows, start_blocks = self.retrieve(q_start)  # [B, k], [B, k, D]
            read_logits_all = model.retrieval_logits(q_start, start_blocks)  # [B, k]
            read_pieces = self.gold_pieces(idx, read_rows)
            read_has_answer = self.answer_mask(asked, read_rows, read_pieces)  # [B, k]
        # where the answers are is known from the wordpieces alone: only then is the reader run, on what it must read
        read_q, read_ranks = blocks_to_read(read_has_answer.numpy(), f.reader_blocks)  # [B'], [B', n]
        reader_loss, top_correct = retrieval_logits.new_zeros(()), torch.zeros(())
        if len(read_q):
            n = read_ranks.shape[1]
            batch = reader_batch(self.store, [asked[i] for i in read_q], read_rows[read_q[:, None], read_ranks],
                                 self.tok, self.special, r.max_len)
            spans = model.reader(batch.input_ids, batch.attention_mask, batch.token_type_ids, batch.start_ok,
                                 batch.end_ok)
            span_logits = spans.logits.view(len(read_q), n, -1)  # [B', n, S]
            starts, ends = enumerate_spans(batch.input_ids.shape[1], r.max_span_len)  # the reader's spans, on the CPU
            gold = gold_span_mask(batch, [read_pieces[i] for i in read_q], n, r.max_span_len, starts,
                                  ends).to(self.device)  # [B', n, S]
            read_logits = read_logits_all[torch.from_numpy(read_q).to(self.device)[:, None],
                                          torch.from_numpy(read_ranks).to(self.device)]  # [B', n]
            reader_loss = reader_marginal_nll(span_logits, read_logits, gold)
            with torch.no_grad():
                joint = (span_logits + read_logits[:, :, None]).flatten(1)  # [B', n*S]
                top_correct = gold.flatten(1).gather(1, joint.argmax(-1, keepdim=True)).float().mean()
        loss = reader_loss + f.retriever_loss_weight * retriever_loss if self.dense else reader_loss
        return {"loss": loss, "reader_loss": reader_loss, "retriever_loss": retriever_loss,
                "answer_in_topk": has_answer.any(-1).float().mean(), "top_span_correct": top_correct}

    def retrieve(self, q: torch.Tensor) -> tuple[np.ndarray, torch.Tensor]:
        """q: [B, D] queries -> the rows of their top-k blocks in the fixed index [B, k] and those blocks' embeddings
        [B, k, D]."""
        _, rows = self.index.search(q.detach().float().cpu().numpy(), self.cfg.reader.top_k)  # [B, k]
        blocks = torch.from_numpy(np.asarray(self.block_emb[rows.reshape(-1)], np.float32))
        return rows, blocks.view(*rows.shape, -1).to(self.device)  # [B, k, D]

    def answer_mask(self, asked: list[np.ndarray], rows: np.ndarray, pieces: list[list[np.ndarray]]) -> torch.Tensor:
        """Which of each question's blocks ``rows`` [B, k] hold a gold answer as a span the reader could pick: [B, k]
        bool, from the wordpieces alone (the reader does not run)."""
        r = self.cfg.reader
        everything = reader_batch(self.store, asked, rows, self.tok, self.special, r.max_len)
        starts, ends = enumerate_spans(everything.input_ids.shape[1], r.max_span_len)
        return gold_span_mask(everything, pieces, rows.shape[1], r.max_span_len, starts, ends).any(-1)

    def gold_pieces(self, idx: np.ndarray, rows: np.ndarray) -> list[list[np.ndarray]]:
        """Per question ``idx`` [B], the wordpiece sequences that count as its answer in its retrieved ``rows`` [B, k]."""
        if not self.regex:
            return [self.pieces[i] for i in idx]
        texts = self.store.texts
        return [regex_answer_pieces(self.tok, self.questions[i].answers, [texts[row] for row in hits if row >= 0])
                for i, hits in zip(idx, rows)]

    def batch_indices(self) -> np.ndarray:
        """This rank's questions of this step: epochs of a seeded permutation, cut into steps of batch_size x world
        size questions (a function of the step, so resume is exact)."""
        f, n = self.cfg.finetune, len(self.questions)
        per_step = f.batch_size * distributed.world_size()
        per_epoch = max(1, n // per_step)
        epoch, pos = divmod(self.step, per_epoch)
        order = np.random.default_rng([f.seed, epoch]).permutation(n)
        start = pos * per_step + distributed.rank() * f.batch_size
        return order[start:start + f.batch_size]

    def train_step(self) -> dict[str, Any]:
        f = self.cfg.finetune
        torch.manual_seed(f.seed * 1_000_003 + self.step + distributed.rank() * 1_000_000_007)  # dropout
        self.model.train()
        if self.dense:
            self.model.retriever.doc.eval()
        t0 = time.perf_counter()
        with autocast(self.device, self.cfg.runtime.precision):
            out = self.forward(self.batch_indices())
        self.opt.zero_grad(set_to_none=True)
        if out["loss"].requires_grad:  # else no question of the batch found an answer: no gradient (from this rank)
            out["loss"].backward()
        distributed.average_gradients(self.model)
        clip_each_group(self.opt, 1.0)
        self.opt.step()
        self.sched.step()
        metrics = distributed.mean_scalars({k: float(v.detach()) for k, v in out.items()})
        if self.dense:
            metrics["retrieval_scale"] = self.model.retrieval_scale.value
        return metrics | {"step_s": time.perf_counter() - t0, "lr": self.sched.get_last_lr()[0]}

    # -- loop -----------------------------------------------------------------------------------------------
    def train(self, progress: bool = True) -> list[dict[str, Any]]:
        f = self.cfg.finetune
        return run_steps(self, f.steps, f.save_every, "fine-tuning",
                         lambda m: {"loss": f"{m['loss']:.3f}", "found": f"{m['answer_in_topk']:.2f}"},
                         progress=progress)

    def save(self) -> Path:
        return save_checkpoint(self.run_dir, self.step, self.model, self.opt,
                               {"config": config_to_dict(self.run_config()), "kind": "finetune"})


def main(cfg: RunConfig, resume: bool = False, progress: bool = True) -> list[dict[str, Any]]:
    recipe = FinetuneRecipe(cfg)
    recipe.setup(resume=resume, progress=progress)
    return recipe.train(progress=progress)
