"""The fixed Open-SQuAD split of ../shared/data/README.md: article i of SQuAD dev is test if i % 6 == 0, dev if
i % 6 == 3, train otherwise. Questions are answered open-domain, from the whole corpus."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

SPLITS = ("train", "dev", "test")


@dataclass(frozen=True)
class Question:
    qid: str
    question: str
    answers: tuple[str, ...]
    title: str  # the article it was written on (never given to the model)


def split_of(article_index: int) -> str:
    if article_index % 6 == 0:
        return "test"
    if article_index % 6 == 3:
        return "dev"
    return "train"


def load_questions(squad_json: str | Path, split: str) -> list[Question]:
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, not {split!r}")
    path = Path(squad_json)
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found (run `realm data fetch`)")
    data = json.loads(path.read_text(encoding="utf-8"))["data"]
    out = []
    for i, article in enumerate(data):
        if split_of(i) != split:
            continue
        for para in article["paragraphs"]:
            for qa in para["qas"]:
                answers = tuple(dict.fromkeys(a["text"] for a in qa["answers"]))  # unique, in order
                out.append(Question(qa["id"], qa["question"], answers, article["title"]))
    return out
