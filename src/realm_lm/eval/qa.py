"""`realm eval qa`: exact match, F1 and retrieval recall@k of a fine-tuned run, with a predictions JSONL that gives,
per question, the answer, its probability and its evidence (block id, title, character span)."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Sequence

from realm_lm.answer import Answerer
from realm_lm.corpus.questions import QaFileError, Question
from realm_lm.eval.metrics import check_patterns, exact_match, f1_score, recall_at_k


def evaluate_qa(answerer: Answerer, questions: Sequence[Question], predictions: str | Path | None = None,
                regex: bool = False, progress: bool = True) -> dict[str, float]:
    """``{"em", "f1", "recall@1", "recall@<k>", "n_questions", "seconds", "questions_per_s"}``; EM and F1 in %.
    With ``regex`` the gold answers are patterns (CuratedTrec): exact match is a full match of the prediction,
    recall a match anywhere in a block, and F1 is not defined (0)."""
    if regex:  # a bad pattern fails here, not after every question has been answered
        for q in questions:
            try:
                check_patterns(q.answers)
            except ValueError as err:
                raise QaFileError(f"question {q.qid!r}: {err}") from None
    t0 = time.perf_counter()
    responses = answerer.answer([q.question for q in questions], progress=progress, top_n=1)
    seconds = time.perf_counter() - t0
    records, em, f1 = [], 0.0, 0.0
    for q, resp in zip(questions, responses):
        best = resp.answers[0] if resp.answers else None
        prediction = best.text if best else ""
        hit_em = exact_match(prediction, q.answers, regex=regex)
        hit_f1 = 0.0 if regex else f1_score(prediction, q.answers)
        em += hit_em
        f1 += hit_f1
        records.append({"id": q.qid, "question": q.question, "gold": list(q.answers), "answer": prediction,
                        "probability": round(best.probability, 5) if best else 0.0,
                        "block_id": best.block_id if best else None, "title": best.title if best else None,
                        "block_rank": best.block_rank if best else None,
                        "char_start": best.char_start if best else None, "char_end": best.char_end if best else None,
                        "exact_match": bool(hit_em), "f1": round(hit_f1, 4),
                        "retrieved": [h.block_id for h in resp.hits]})
    k = answerer.top_k
    recalls = recall_at_k([[h.row for h in r.hits] for r in responses], [q.answers for q in questions],
                          answerer.store.texts, sorted({1, k}), regex=regex)
    n = max(len(questions), 1)
    if predictions:
        path = Path(predictions)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
        tmp.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records), encoding="utf-8")
        os.replace(tmp, path)
    return {"em": round(100 * em / n, 2), "f1": round(100 * f1 / n, 2),
            **{f"recall@{kk}": round(v, 4) for kk, v in recalls.items()},
            "n_questions": len(questions), "seconds": round(seconds, 1),
            "questions_per_s": round(len(questions) / max(seconds, 1e-9), 2)}
