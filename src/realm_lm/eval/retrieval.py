"""`realm eval retrieval`: recall@k of a retriever on questions (the Open-SQuAD questions of a split, or a file's)."""

from __future__ import annotations

import time

from realm_lm.config import RunConfig
from realm_lm.corpus.questions import Question, check_answer_patterns, load_questions
from realm_lm.eval.metrics import recall_at_k
from realm_lm.retrieval import Searcher


def evaluate_retrieval(cfg: RunConfig, searcher: Searcher, questions: list[Question], regex: bool = False,
                       progress: bool = True) -> dict[str, float]:
    """``{"recall@1": ..., "recall@5": ..., "n_questions": ..., "seconds": ...}``: the share of ``questions`` with a
    gold answer in one of the first k blocks retrieved. With ``regex`` the answers are patterns (CuratedTrec)."""
    if regex:
        check_answer_patterns(questions)
    t0 = time.perf_counter()
    _scores, rows = searcher.search([q.question for q in questions], max(cfg.eval.ks), progress=progress)
    recalls = recall_at_k(rows.tolist(), [q.answers for q in questions], searcher.store.texts, cfg.eval.ks, regex)
    out: dict[str, float] = {f"recall@{k}": round(v, 4) for k, v in recalls.items()}
    out["n_questions"] = len(questions)
    out["seconds"] = round(time.perf_counter() - t0, 2)
    return out


def compare_retrievers(cfg: RunConfig, searchers: dict[str, Searcher], splits: tuple[str, ...] = ("dev", "test"),
                       ) -> tuple[list[list], dict[str, float]]:
    """Rows of a recall table (split, retriever, recall@k..., questions, seconds) and flat ``split.kind.recall@k`` figures."""
    keys = [f"recall@{k}" for k in cfg.eval.ks]
    rows, flat = [], {}
    for split in splits:
        questions = load_questions(cfg.eval.squad, split)
        for kind, searcher in searchers.items():
            r = evaluate_retrieval(cfg, searcher, questions, progress=False)
            rows.append([split, kind, *[f"{r[k]:.3f}" for k in keys], r["n_questions"], f"{r['seconds']:.1f}"])
            flat.update({f"{split}.{kind}.{k}": r[k] for k in keys})
            flat[f"{split}.{kind}.seconds"] = r["seconds"]
    return rows, flat


def recall_table_headers(cfg: RunConfig) -> list[str]:
    return ["split", "retriever", *[f"recall@{k}" for k in cfg.eval.ks], "questions", "seconds"]
