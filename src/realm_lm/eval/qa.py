"""`realm eval qa`: exact match, F1 and retrieval recall@k of a fine-tuned run, with a predictions JSONL that gives,
per question, the answer, its probability and its evidence (block id, title, character span)."""

from __future__ import annotations

import hashlib
import json
import os
import sys
import time
from pathlib import Path
from typing import Any, Sequence

from tqdm import tqdm

from realm_lm.answer import Answerer, Response
from realm_lm.artifacts import write_text_atomic
from realm_lm.corpus.questions import Question, check_answer_patterns
from realm_lm.eval.metrics import exact_match, f1_score, first_answer_rank, recall_from_ranks

ANSWER_CHUNK = 256  # questions answered between two saves of an evaluation's progress (~40 s on a 2-core CPU)


def evaluate_qa(answerer: Answerer, questions: Sequence[Question], predictions: str | Path | None = None,
                regex: bool = False, progress: bool = True) -> dict[str, Any]:
    """``{"em", "f1", "recall@1", "recall@<k>", "n_questions", "resumed", "seconds", "questions_per_s"}``; EM and F1
    in %. With ``regex`` the gold answers are patterns (CuratedTrec): exact match is a full match of the
    prediction, recall a match anywhere in a block, and F1 is not defined (0).

    With ``predictions``, the records are also appended to PREDICTIONS.partial as questions are answered, so an
    evaluation stopped part-way (Ctrl-C, a kill) goes on from there when run again with the same model, settings
    and questions (``resumed`` counts those); the partial file is deleted once the predictions are written."""
    if regex:
        check_answer_patterns(questions)
    partial = Path(f"{predictions}.partial") if predictions else None
    key = _evaluation_key(answerer, questions, regex) if partial else None
    records = _answered_before(partial, key, questions) if key else []
    resumed = len(records)
    if resumed and progress:
        print(f"going on from {partial}: {resumed} of {len(questions)} questions were answered before",
              file=sys.stderr)
    t0 = time.perf_counter()
    log = _open_partial(partial, key, records) if key else None
    try:
        with tqdm(total=len(questions), initial=resumed, desc="answering", unit="question", disable=not progress,
                  smoothing=0.1) as bar:
            for start in range(resumed, len(questions), ANSWER_CHUNK):
                chunk = questions[start:start + ANSWER_CHUNK]
                answered = [_record(q, response, answerer, regex)
                            for q, response in zip(chunk, answerer.answer([q.question for q in chunk], top_n=1))]
                records.extend(answered)
                if log is not None:
                    log.write(_jsonl(answered))
                    log.flush()
                    os.fsync(log.fileno())
                bar.update(len(chunk))
    except BaseException:
        if log is not None and records and progress:
            print(f"the {len(records)} questions answered so far are kept in {partial}: the same evaluation goes on "
                  f"from them", file=sys.stderr)
        raise
    finally:
        if log is not None:
            log.close()
    seconds = time.perf_counter() - t0
    n = max(len(questions), 1)
    k = answerer.top_k
    recalls = recall_from_ranks([r["answer_rank"] for r in records], sorted({1, k}))
    if predictions:
        write_text_atomic(predictions, _jsonl(records))
        partial.unlink(missing_ok=True)
    answered_now = len(questions) - resumed
    return {"em": round(100 * sum(r["exact_match"] for r in records) / n, 2),
            "f1": round(100 * sum(r["f1"] for r in records) / n, 2),
            **{f"recall@{kk}": round(v, 4) for kk, v in recalls.items()},
            "n_questions": len(questions), "resumed": resumed, "seconds": round(seconds, 1),
            "questions_per_s": round(answered_now / max(seconds, 1e-9), 2)}


def _record(q: Question, response: Response, answerer: Answerer, regex: bool) -> dict[str, Any]:
    """One line of the predictions: the answer with its evidence, scored against the gold answers."""
    best = response.answers[0] if response.answers else None
    prediction = best.text if best else ""
    return {"id": q.qid, "question": q.question, "gold": list(q.answers), "answer": prediction,
            "probability": round(best.probability, 5) if best else 0.0,
            "block_id": best.block_id if best else None, "title": best.title if best else None,
            "block_rank": best.block_rank if best else None,
            "char_start": best.char_start if best else None, "char_end": best.char_end if best else None,
            "exact_match": bool(exact_match(prediction, q.answers, regex=regex)),
            "f1": 0.0 if regex else round(f1_score(prediction, q.answers), 4),
            "retrieved": [h.block_id for h in response.hits],
            "answer_rank": first_answer_rank([h.row for h in response.hits], q.answers, answerer.store.texts, regex)}


def _evaluation_key(answerer: Answerer, questions: Sequence[Question], regex: bool) -> str | None:
    """What an evaluation's records depend on: the answering (model, settings, corpus, index) and the questions.
    None when the answerer cannot say what its weights are (nothing is then saved or resumed)."""
    answering = answerer.answering_key()
    if answering is None:
        return None
    digest = hashlib.sha256(f"{answering}|{regex}".encode())
    for q in questions:
        digest.update(json.dumps([q.qid, q.question, list(q.answers)]).encode())
    return digest.hexdigest()


def _answered_before(partial: Path, key: str, questions: Sequence[Question]) -> list[dict[str, Any]]:
    """The records of a stopped evaluation with the same key: those of the first questions, in order (a line torn
    by a kill ends them). Another key's partial file is left to be replaced."""
    try:
        lines = partial.read_text(encoding="utf-8").splitlines()
        if not lines or json.loads(lines[0]).get("evaluation_key") != key:
            return []
    except (OSError, ValueError, AttributeError):
        return []
    records = []
    for line, q in zip(lines[1:], questions):
        try:
            record = json.loads(line)
        except ValueError:
            break
        if not isinstance(record, dict) or record.get("id") != q.qid or "answer_rank" not in record:
            break
        records.append(record)
    return records


def _open_partial(partial: Path, key: str, records: list[dict[str, Any]]):
    """PREDICTIONS.partial, written afresh with its key and the records kept (dropping a torn line), open to append."""
    write_text_atomic(partial, _jsonl([{"evaluation_key": key}, *records]))
    return open(partial, "a", encoding="utf-8")


def _jsonl(records: Sequence[dict[str, Any]]) -> str:
    return "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records)
