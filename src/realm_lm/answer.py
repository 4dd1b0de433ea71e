"""The one question -> answers-with-evidence path (`realm ask`, `realm eval qa`, the benchmarks): retrieve the top-k
blocks, read every (block, span) pair, and rank answer strings with the block, title and character span that
support them.

p(block, span | question) = softmax over all pairs of (retrieval logit + span logit) (ORQA / REALM); an answer's
probability sums the pairs whose text normalises to the same string.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
from tqdm import tqdm

from realm_lm.config import ReaderConfig, RunConfig, run_config
from realm_lm.corpus.store import CorpusStore
from realm_lm.eval.metrics import normalize_answer
from realm_lm.models.embedder import load_bert
from realm_lm.models.pretrained import SpecialIds, load_tokenizer, resolve_model_dir
from realm_lm.models.reader import Reader
from realm_lm.runtime import autocast, resolve_device
from realm_lm.retrieval import Hit, Searcher, check_question, hits_of, make_searcher, trained_config
from realm_lm.train.checkpoint import CheckpointError, latest_checkpoint, read_weights
from realm_lm.train.data import ReaderBatch, question_ids, reader_batch, title_and_body

CANDIDATE_PAIRS = 50  # best (block, span) pairs per question that are turned into answer strings


@dataclass(frozen=True)
class Answer:
    text: str
    probability: float  # p(answer | question): the pairs whose text normalises alike, summed
    block_id: str  # the evidence: the block of the most probable pair with this text
    title: str
    row: int
    block_rank: int  # 1-based rank of the evidence block among the retrieved ones
    retrieval_probability: float  # p(block | question) over the retrieved blocks
    char_start: int  # the span in the evidence block's text: block_text[char_start:char_end] == text
    char_end: int
    block_text: str


@dataclass(frozen=True)
class Response:
    question: str
    answers: list[Answer]  # most probable first
    hits: list[Hit]  # the retrieved blocks, in rank order

    def to_json(self) -> dict[str, Any]:
        """What `realm serve` answers and `realm ask --json` prints: answers with their evidence, and the hits."""
        return {"question": self.question,
                "answers": [{"answer": a.text, "probability": a.probability, "block_id": a.block_id, "title": a.title,
                             "block_rank": a.block_rank, "retrieval_probability": a.retrieval_probability,
                             "char_start": a.char_start, "char_end": a.char_end, "evidence": a.block_text}
                            for a in self.answers],
                "retrieved": [{"rank": h.rank, "block_id": h.block_id, "title": h.title, "score": h.score}
                              for h in self.hits]}


def load_reader(run_dir: str | Path) -> tuple[Reader, float, RunConfig, Path]:
    """The fine-tuned reader of a `realm finetune` run (its latest checkpoint), the retrieval scale it learned with
    (1.0 for runs that had none: BM25, or before the scale was learned), the run's config and the checkpoint read."""
    from realm_lm.train.finetune import RETRIEVAL_SCALE_KEY

    run_cfg = run_config(run_dir)
    ckpt = latest_checkpoint(run_dir)
    if ckpt is None:
        raise CheckpointError(f"no checkpoint in {run_dir}")
    saved = read_weights(ckpt)
    scale = float(saved[RETRIEVAL_SCALE_KEY].exp()) if RETRIEVAL_SCALE_KEY in saved else 1.0
    tensors = {k.removeprefix("reader."): v for k, v in saved.items() if k.startswith("reader.")}
    if not tensors:
        raise CheckpointError(f"{ckpt} has no reader: answer with a `realm finetune` run (this one is not)")
    r = run_cfg.reader
    reader = Reader(load_bert(resolve_model_dir(run_cfg.encoder.model)), r.span_hidden, r.max_span_len)
    try:
        reader.load_state_dict(tensors)
    except RuntimeError as err:
        raise CheckpointError(f"{ckpt}: the reader's weights do not fit its config: {err}") from err
    return reader.eval(), scale, run_cfg, ckpt


def quantize_int8(reader: Reader) -> Reader:
    """Dynamic int8 for every linear layer: weights int8 with one scale per output channel, activations quantised
    on the fly. On Open-SQuAD one scale per weight tensor cost 3.5 EM against fp32; one per channel costs 0.9-2.0,
    about as fast (benchmarks/README.md)."""
    import warnings

    quantization = torch.ao.quantization
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch marks torch.ao quantization deprecated (torchao); it works in 2.13
        return quantization.quantize_dynamic(reader, {torch.nn.Linear: quantization.per_channel_dynamic_qconfig})


class BlockOffsets:
    """Character offsets of a block's body wordpieces, so that a span of wordpieces becomes a span of its text.
    The stored ids are checked against a fresh encoding of the stored text; if they ever differ, the span's text
    is decoded from the wordpieces instead (lower-cased) and its offsets are -1."""

    def __init__(self, store: CorpusStore, tok, special: SpecialIds):
        self.store, self.tok, self.special = store, tok, special
        self.cache: dict[int, list[tuple[int, int]] | None] = {}

    def span(self, row: int, body_ids: np.ndarray, first: int, last: int) -> tuple[str, int, int]:
        """Text and [start, end) characters of body wordpieces first..last (inclusive) of block ``row``."""
        if row not in self.cache:
            enc = self.tok.encode(self.store.texts[row], add_special_tokens=False)
            _, body = title_and_body(self.store, row, self.special.sep)
            self.cache[row] = enc.offsets if enc.ids[:len(body)] == body.tolist() else None
        offsets = self.cache[row]
        if offsets is None or last >= len(offsets):
            return self.tok.decode(body_ids[first:last + 1].tolist()), -1, -1
        start, end = offsets[first][0], offsets[last][1]
        return self.store.texts[row][start:end], start, end


class Answerer:
    """A retriever (any :class:`~realm_lm.retrieval.Searcher` over ``store``) and a span reader."""

    def __init__(self, searcher: Searcher, reader: Reader, reader_cfg: ReaderConfig, tok, dense: bool,
                 top_k: int | None = None, precision: str = "fp32", retrieval_scale: float = 1.0,
                 weights: str | None = None):
        """``weights``: what the reader's weights were read from (a checkpoint, with its time), so that an
        interrupted evaluation can tell whether its answers came from the same model (:meth:`answering_key`)."""
        self.searcher, self.reader, self.reader_cfg = searcher, reader.eval(), reader_cfg
        self.weights = weights
        self.precision = precision  # of the reader's forward pass (runtime.precision)
        self.store = searcher.store
        self.dense = dense  # dense scores x the learned scale are retrieval logits; BM25's are not on the reader's scale
        self.retrieval_scale = retrieval_scale
        self.top_k = top_k or reader_cfg.top_k
        self.tok = tok
        self.special = SpecialIds(tok)
        self.offsets = BlockOffsets(self.store, tok, self.special)
        self.compiled = False  # the reader's encoder runs under torch.compile (see compile)

    @classmethod
    def from_run(cls, run_dir: str | Path, cfg: RunConfig | None = None,
                 store: CorpusStore | None = None) -> "Answerer":
        """A fine-tuned run's retriever (its index of ``cfg.corpus.store``, built on first use) and reader;
        top-k, batching and runtime from ``cfg`` (default: the run's own config, so its corpus too), everything
        the weights depend on from the run's own config."""
        reader, scale, run_cfg, ckpt = load_reader(run_dir)
        cfg = cfg or run_cfg
        store = store or CorpusStore(cfg.corpus.store)
        kind = run_cfg.finetune.retriever
        searcher = make_searcher(trained_config(cfg, run_dir) if kind == "realm" else cfg, kind, store)
        reader_cfg = replace(run_cfg.reader, top_k=cfg.reader.top_k, batch_questions=cfg.reader.batch_questions,
                             int8=cfg.reader.int8, compile=cfg.reader.compile)
        device = resolve_device(cfg.runtime)
        precision = cfg.runtime.precision
        if reader_cfg.int8:
            if device.type != "cpu":
                raise ValueError("reader.int8 is a CPU path (dynamic int8 linear layers): set runtime.device = \"cpu\"")
            if precision == "bf16":
                raise ValueError("reader.int8 takes fp32 inputs: set runtime.precision = \"auto\" or \"fp32\"")
            reader, precision = quantize_int8(reader), "fp32"
        tok = load_tokenizer(resolve_model_dir(run_cfg.encoder.model))
        weights = f"{ckpt.resolve()}@{(ckpt / 'model.safetensors').stat().st_mtime_ns}"
        return cls(searcher, reader.to(device), reader_cfg, tok, dense=kind == "realm", precision=precision,
                   retrieval_scale=scale, weights=weights)

    def answering_key(self) -> str | None:
        """A hash of everything the answers depend on: the weights, the reader's settings and precision, the corpus
        and the index. None when the weights' origin is unknown."""
        if self.weights is None:
            return None
        r = self.reader_cfg
        index = getattr(self.searcher, "manifest", {}).get("embedding_key")  # dense: the index version's embeddings
        what = [self.weights, self.top_k, r.max_len, r.question_len, r.int8, self.precision, self.dense,
                self.retrieval_scale, self.store.corpus_hash, index]
        return hashlib.sha256(json.dumps(what).encode()).hexdigest()

    def compile(self) -> str | None:
        """Compile the reader's encoder with torch.compile, shapes dynamic (one compilation serves every block length
        and batch), and run one question through it now, so that the first real one does not wait. It took 6-12 s
        on a 2-core CPU; the reader then read the reference's 320-wordpiece inputs 1.13-1.32x faster and the real
        corpus's shorter blocks about as fast (answer_throughput). None when compiled, else why not; the reader
        then stays as it was."""
        if not isinstance(self.reader.start_proj, torch.nn.Linear):  # torch.ao's dynamic int8 Linear is not one
            return "the int8 reader is not compiled"
        bert = self.reader.bert
        bert.forward = torch.compile(bert.forward, dynamic=True)  # an instance attribute: deleting it undoes this
        self.compiled = True
        try:
            self.answer(["which question warms the compiled reader up?"], top_n=1)
        except Exception as err:  # no C++ compiler, an op the compiler lacks, ...: answering must still work
            del bert.forward
            self.compiled = False
            return f"{type(err).__name__}: {(str(err).splitlines() or [''])[0]}"
        return None

    def retrieve(self, questions: Sequence[str], k: int,
                 progress: bool = False) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """The searcher's scores [Q, k], retrieval logits [Q, k] (the scaled scores; zeros for BM25: its scores are
        not on the reader's scale) and rows [Q, k]."""
        scores, rows = self.searcher.search(questions, k, progress=progress)
        logits = scores * self.retrieval_scale if self.dense else np.zeros_like(scores)
        return scores, logits.astype(np.float32), rows

    @torch.inference_mode()
    def answer(self, questions: Sequence[str], k: int | None = None, top_n: int = 5,
               progress: bool = False) -> list[Response]:
        questions = [check_question(q) for q in questions]
        if (k is not None and k < 1) or top_n < 1:
            raise ValueError(f"k and top_n must be >= 1, not {k} and {top_n}")
        k = min(k or self.top_k, len(self.store))  # a corpus smaller than k: read every block
        scores, logits, rows = self.retrieve(questions, k, progress=progress)
        r = self.reader_cfg
        out = []
        for start in tqdm(range(0, len(questions), r.batch_questions), desc="reading", unit="batch",
                          disable=not progress):
            chunk = questions[start:start + r.batch_questions]
            batch, span_logits, starts, ends = self.read(chunk, rows[start:start + len(chunk)])
            for i, question in enumerate(chunk):
                qi = start + i
                answers = self.decode(batch, i, k, span_logits[i], torch.from_numpy(logits[qi]), starts, ends,
                                      top_n)
                out.append(Response(question, answers, hits_of(self.store, scores[qi], rows[qi])))
        return out

    @torch.inference_mode()
    def read(self, questions: Sequence[str], rows: np.ndarray) -> tuple[ReaderBatch, torch.Tensor, torch.Tensor,
                                                                         torch.Tensor]:
        """The reader over each question's retrieved ``rows`` [Q, K]: its batch, span logits [Q, K, S] and the spans'
        start and end positions [S], on the CPU."""
        r, k = self.reader_cfg, rows.shape[1]
        q_ids = question_ids(self.tok, questions, self.special, r.question_len)
        batch = reader_batch(self.store, q_ids, rows, self.tok, self.special, r.max_len)
        inputs = (batch.input_ids, batch.attention_mask, batch.token_type_ids, batch.start_ok, batch.end_ok)
        if self.compiled and len(batch.input_ids) == 1:  # one question, k = 1
            # compiled code is specialised to a batch of 1 (torch's 0/1 rule): reading the block twice costs
            # milliseconds, compiling again took 6-16 s in the middle of a request
            inputs = tuple(t.repeat(2, 1) for t in inputs)  # [2, L] each
        with autocast(self.reader.device, self.precision):
            spans = self.reader(*inputs)
        span_logits = spans.logits[:len(questions) * k].view(len(questions), k, -1).cpu()  # [Q, K, S]
        return batch, span_logits, spans.starts.cpu(), spans.ends.cpu()

    def decode(self, batch: ReaderBatch, i: int, k: int, span_logits: torch.Tensor, retrieval_logits: torch.Tensor,
               starts: torch.Tensor, ends: torch.Tensor, top_n: int) -> list[Answer]:
        """Question i of the batch: span_logits [K, S], retrieval_logits [K] -> its top answer strings."""
        joint = (span_logits + retrieval_logits[:, None]).flatten().log_softmax(-1)  # [K*S]
        finite = int(torch.isfinite(joint).sum())
        best = joint.topk(min(CANDIDATE_PAIRS, finite))
        p_block = retrieval_logits.softmax(-1)  # [K]
        S = span_logits.shape[1]
        grouped: dict[str, list] = {}
        for logp, flat in zip(best.values.tolist(), best.indices.tolist()):
            z, s = divmod(flat, S)
            n = i * k + z  # row of the batch
            row = int(batch.rows[n])
            body_ids = batch.input_ids[n, batch.body_start[n]:].numpy()
            first, last = int(starts[s]) - batch.body_start[n], int(ends[s]) - batch.body_start[n]
            text, c0, c1 = self.offsets.span(row, body_ids, first, last)
            key = normalize_answer(text) or text
            if key in grouped:
                grouped[key][0] += float(np.exp(logp))
                continue
            grouped[key] = [float(np.exp(logp)), Answer(
                text, 0.0, self.store.block_ids[row], self.store.titles[row], row, z + 1, float(p_block[z]), c0, c1,
                self.store.texts[row])]
        ranked = sorted(grouped.values(), key=lambda g: -g[0])[:top_n]
        return [replace(answer, probability=p) for p, answer in ranked]
