"""Greedy block cutting: every block is ``[CLS] title [SEP] body [SEP]`` of at most ``block_len`` wordpieces.

Blocks end at a sentence boundary when one fits, else at a word boundary, else mid-word; their bodies are
contiguous character spans of the document, so concatenating a document's block bodies gives back its text.
"""

from __future__ import annotations

import bisect
import hashlib
import re
from dataclasses import dataclass

from tokenizers import Encoding, Tokenizer

from realm_lm.corpus.readers import Document
from realm_lm.models.pretrained import SpecialIds

# A sentence starts after . ! or ? (and closing quotes/brackets) followed by whitespace.
_SENTENCE_BREAK = re.compile(r"[.!?][\"'\u201d\u2019)\]]*\s+")


@dataclass(frozen=True)
class Block:
    block_id: str
    doc_id: str
    title: str
    text: str  # the body: document text [char_start, char_end)
    char_start: int
    char_end: int
    token_ids: list[int]  # [CLS] title [SEP] body [SEP]
    source: str


def block_id_of(title: str, body: str) -> str:
    """Stable id: the same title and body give the same id in every run (REALM matches trivial retrievals this way)."""
    return hashlib.sha1(f"{title}\x1f{body.strip()}".encode("utf-8")).hexdigest()[:16]


def _cut_points(enc: Encoding, text: str, budget: int) -> list[int]:
    """Token indices where each block starts (first is 0)."""
    tokens, offsets = enc.tokens, enc.offsets  # each property access builds a new list: read them once
    n = len(tokens)
    sentence_chars = {m.end() for m in _SENTENCE_BREAK.finditer(text)}
    sentence_starts = [i for i in range(1, n) if offsets[i][0] in sentence_chars]
    word_starts = [i for i in range(1, n) if not tokens[i].startswith("##")]
    cuts = [0]
    while n - cuts[-1] > budget:
        start, limit = cuts[-1], cuts[-1] + budget
        end = limit
        for candidates in (sentence_starts, word_starts):
            j = bisect.bisect_right(candidates, limit) - 1
            if j >= 0 and candidates[j] > start:
                end = candidates[j]
                break
        cuts.append(end)
    return cuts


def cut_document(doc: Document, title_ids: list[int], enc: Encoding, special: SpecialIds, block_len: int) -> list[Block]:
    budget = block_len - 3 - len(title_ids)  # room for the body after [CLS] title [SEP] ... [SEP]
    if budget < 8:
        raise ValueError(f"block_len {block_len} leaves no room for a body after a {len(title_ids)}-token title")
    ids, offsets = enc.ids, enc.offsets
    n = len(ids)
    if n == 0:
        return []
    cuts = _cut_points(enc, doc.text, budget)
    char_starts = [0] + [offsets[c][0] for c in cuts[1:]]
    blocks = []
    for j, tok_start in enumerate(cuts):
        tok_end = cuts[j + 1] if j + 1 < len(cuts) else n
        c0 = char_starts[j]
        c1 = char_starts[j + 1] if j + 1 < len(cuts) else len(doc.text)
        body = doc.text[c0:c1]
        block_ids = [special.cls, *title_ids, special.sep, *ids[tok_start:tok_end], special.sep]
        blocks.append(Block(block_id_of(doc.title, body), doc.doc_id, doc.title, body, c0, c1, block_ids, doc.source))
    return blocks


def cut_documents(docs: list[Document], tok: Tokenizer, special: SpecialIds, block_len: int,
                  max_title_len: int) -> list[list[Block]]:
    """Blocks of every document, in document order (tokenised in batches by the Rust tokenizer)."""
    bodies = tok.encode_batch([d.text for d in docs], add_special_tokens=False)
    titles = tok.encode_batch([d.title for d in docs], add_special_tokens=False)
    return [cut_document(d, t.ids[:max_title_len], e, special, block_len) for d, t, e in zip(docs, titles, bodies)]
