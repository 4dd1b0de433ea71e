"""Question/answer sets: the fixed Open-SQuAD split of ../shared/data/README.md (article i of SQuAD dev is test if
i % 6 == 0, dev if i % 6 == 3, train otherwise), any SQuAD JSON file, or JSONL lines ``{"question", "answers"}``.
Questions are answered open-domain, from the whole corpus."""

from __future__ import annotations

import json
import re
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

from realm_lm.errors import RealmError

SPLITS = ("train", "dev", "test")


class QaFileError(RealmError, ValueError):
    """A question file that cannot be read: the message names the file and line."""


@dataclass(frozen=True)
class Question:
    qid: str
    question: str
    answers: tuple[str, ...]
    title: str = ""  # the article it was written on, when known (never given to the model)


def split_of(article_index: int) -> str:
    if article_index % 6 == 0:
        return "test"
    if article_index % 6 == 3:
        return "dev"
    return "train"


def load_questions(squad_json: str | Path, split: str) -> list[Question]:
    """The Open-SQuAD questions of ``split``."""
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, not {split!r}")
    return _load_squad(squad_json, split)


def _load_squad(path: str | Path, split: str | None) -> list[Question]:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found (run `realm data fetch`)")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))["data"]
    except (json.JSONDecodeError, KeyError, TypeError) as err:
        raise QaFileError(f"{path}: not a SQuAD JSON file ({err})") from err
    out, unanswerable = [], 0
    for i, article in enumerate(data):
        if split is not None and split_of(i) != split:
            continue
        where = f"{path}: article {i}"
        try:
            for p, para in enumerate(article["paragraphs"]):
                for n, qa in enumerate(para["qas"]):
                    where = f"{path}: article {i}, paragraph {p}, question {n}"
                    answers = tuple(dict.fromkeys(a["text"] for a in qa["answers"]))  # unique, in order
                    if not answers:  # SQuAD 2.0's unanswerable questions: open-domain QA scores every miss as wrong
                        unanswerable += 1
                        continue
                    out.append(Question(qa["id"], qa["question"], answers, article["title"]))
        except KeyError as err:
            raise QaFileError(f"{where}: missing field {err}") from None
        except TypeError as err:
            raise QaFileError(f"{where}: not laid out as SQuAD JSON ({err})") from None
    if unanswerable:
        print(f"{path}: skipped {unanswerable} question(s) without an answer (SQuAD 2.0's unanswerable ones); "
              f"{len(out)} kept", file=sys.stderr)
    return out


def _load_jsonl(path: Path) -> list[Question]:
    out = []
    with path.open(encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            where = f"{path}:{n}"
            try:
                record = json.loads(line)
            except json.JSONDecodeError as err:
                raise QaFileError(f"{where}: not valid JSON ({err.msg})") from err
            if not isinstance(record, dict):
                raise QaFileError(f"{where}: expected an object with \"question\" and \"answers\"")
            question, answers = record.get("question"), record.get("answers")
            if not isinstance(question, str) or not question.strip():
                raise QaFileError(f"{where}: missing or empty \"question\"")
            if (not isinstance(answers, list) or not answers
                    or not all(isinstance(a, str) and a.strip() for a in answers)):
                raise QaFileError(f"{where}: \"answers\" must be a non-empty list of non-empty strings")
            out.append(Question(str(record.get("id", f"{path.stem}-{n}")), question.strip(),
                                tuple(dict.fromkeys(answers)), str(record.get("title", ""))))
    return out


def read_qa_file(path: str | Path) -> list[Question]:
    """Every question of a SQuAD JSON file (``.json``) or a JSONL file (``.jsonl``)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"question file {path} not found")
    questions = _load_jsonl(path) if path.suffix == ".jsonl" else _load_squad(path, None)
    if not questions:
        raise QaFileError(f"{path}: no questions")
    return questions


def check_answer_patterns(questions: Sequence[Question]) -> None:
    """For answers given as regular expressions (CuratedTrec): a bad pattern is an error naming its question, raised
    before any work rather than after every question has been answered or trained on."""
    for q in questions:
        for pattern in q.answers:
            try:
                re.compile(pattern)
            except re.error as err:
                raise QaFileError(f"question {q.qid!r}: answer {pattern!r} is not a valid regular expression "
                                  f"({err})") from None
