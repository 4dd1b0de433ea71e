"""SQuAD answer normalisation and retrieval recall@k."""

from __future__ import annotations

import re
import string
import unicodedata
from typing import Sequence

_ARTICLES = re.compile(r"\b(a|an|the)\b")
_PUNCT = set(string.punctuation)


def normalize_answer(text: str) -> str:
    """SQuAD's normalisation: lower-case, drop punctuation and articles, collapse whitespace (after NFKC)."""
    text = unicodedata.normalize("NFKC", text).lower()
    text = "".join(ch for ch in text if ch not in _PUNCT and not unicodedata.category(ch).startswith("P"))
    text = _ARTICLES.sub(" ", text)
    return " ".join(text.split())


def has_answer(block_text: str, answers: Sequence[str], regex: bool = False) -> bool:
    """Some gold answer occurs in the block as a whole-token sequence after normalisation; with ``regex`` the
    answers are patterns searched for anywhere in the block, case-insensitively (CuratedTrec, as DrQA and DPR)."""
    if regex:
        return any(re.search(pattern, block_text, flags=re.IGNORECASE) for pattern in answers)
    haystack = f" {normalize_answer(block_text)} "
    return any(norm and f" {norm} " in haystack for norm in map(normalize_answer, answers))


def first_answer_rank(rows: Sequence[int], answers: Sequence[str], texts: Sequence[str],
                      regex: bool = False) -> int | None:
    """1-based rank of the first of the retrieved ``rows`` whose block contains a gold answer; None if none does."""
    return next((r for r, row in enumerate(rows, 1) if row >= 0 and has_answer(texts[row], answers, regex)), None)


def recall_at_k(hit_rows: Sequence[Sequence[int]], answers: Sequence[Sequence[str]], texts: Sequence[str],
                ks: Sequence[int], regex: bool = False) -> dict[int, float]:
    """Fraction of questions for which a block among the first k retrieved contains a gold answer."""
    ranks = [first_answer_rank(rows, golds, texts, regex) for rows, golds in zip(hit_rows, answers)]
    return recall_from_ranks(ranks, ks)


def recall_from_ranks(ranks: Sequence[int | None], ks: Sequence[int]) -> dict[int, float]:
    """recall@k for each k, from each question's :func:`first_answer_rank`."""
    if not ranks:
        return {k: 0.0 for k in ks}
    return {k: sum(r is not None and r <= k for r in ranks) / len(ranks) for k in ks}


def exact_match(prediction: str, answers: Sequence[str], regex: bool = False) -> bool:
    """SQuAD exact match after normalisation; with ``regex`` the answers are patterns (CuratedTrec), matched
    case-insensitively against the whole stripped prediction."""
    if regex:
        return any(re.fullmatch(pattern, prediction.strip(), flags=re.IGNORECASE) for pattern in answers)
    pred = normalize_answer(prediction)
    return any(pred == normalize_answer(a) for a in answers)


def f1_score(prediction: str, answers: Sequence[str]) -> float:
    """Best token-overlap F1 against any gold answer (SQuAD's definition)."""
    pred = normalize_answer(prediction).split()
    best = 0.0
    for answer in answers:
        gold = normalize_answer(answer).split()
        common = sum(min(pred.count(t), gold.count(t)) for t in set(pred))
        if common == 0:
            continue
        precision, recall = common / len(pred), common / len(gold)
        best = max(best, 2 * precision * recall / (precision + recall))
    return best
