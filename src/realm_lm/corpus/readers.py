"""Document readers: plain text, JSONL, SQuAD JSON and the vital-article extracts JSON.

Every reader yields :class:`Document`s and reports malformed records as :class:`InputProblem`s with
file and line number instead of dropping them or crashing.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

from realm_lm.errors import RealmError


@dataclass(frozen=True)
class Document:
    doc_id: str
    title: str
    text: str
    source: str  # file it came from


@dataclass(frozen=True)
class InputProblem:
    path: str
    line: int  # 1-based; 0 when the problem is the whole file
    message: str

    def __str__(self) -> str:
        return f"{self.path}:{self.line}: {self.message}" if self.line else f"{self.path}: {self.message}"


class CorpusInputError(RealmError, ValueError):
    def __init__(self, problems: list[InputProblem]):
        self.problems = problems
        shown = "\n  ".join(str(p) for p in problems[:20])
        more = f"\n  ... and {len(problems) - 20} more" if len(problems) > 20 else ""
        super().__init__(f"{len(problems)} malformed input record(s):\n  {shown}{more}\n"
                         f"fix them, or pass --set corpus.skip_malformed=true to skip them (they are listed in the store's manifest)")


def _read_text(path: Path, problems: list[InputProblem]) -> Iterator[Document]:
    """A plain text file is one document; its title is the file name without extension."""
    text = path.read_text(encoding="utf-8", errors="strict")
    if not text.strip():
        problems.append(InputProblem(str(path), 0, "empty file"))
        return
    yield Document(doc_id=f"{path.name}", title=path.stem.replace("_", " "), text=text.strip(), source=str(path))


def _read_jsonl(path: Path, problems: list[InputProblem]) -> Iterator[Document]:
    """One ``{"id", "title", "text"}`` object per line."""
    seen_any = False
    with open(path, encoding="utf-8") as fh:
        for lineno, line in enumerate(fh, start=1):
            if not line.strip():
                continue
            seen_any = True
            try:
                rec = json.loads(line)
            except json.JSONDecodeError as err:
                problems.append(InputProblem(str(path), lineno, f"not valid JSON ({err.msg})"))
                continue
            if not isinstance(rec, dict):
                problems.append(InputProblem(str(path), lineno, "expected a JSON object"))
                continue
            missing = [k for k in ("id", "title", "text") if not isinstance(rec.get(k), (str, int))]
            if missing:
                problems.append(InputProblem(str(path), lineno, f"missing or non-string field(s): {', '.join(missing)}"))
                continue
            if not str(rec["text"]).strip():
                problems.append(InputProblem(str(path), lineno, "empty text"))
                continue
            yield Document(str(rec["id"]), str(rec["title"]), str(rec["text"]).strip(), str(path))
    if not seen_any:
        problems.append(InputProblem(str(path), 0, "empty file"))


def _line_of(raw: str, needle: str) -> int:
    pos = raw.find(needle)
    return raw.count("\n", 0, pos) + 1 if pos >= 0 else 0


def _read_squad(path: Path, data: dict, problems: list[InputProblem]) -> Iterator[Document]:
    """Every SQuAD paragraph is a document titled by its article."""
    for a_idx, article in enumerate(data["data"]):
        title = str(article.get("title", "")).replace("_", " ")
        for p_idx, para in enumerate(article.get("paragraphs", [])):
            context = para.get("context") if isinstance(para, dict) else None
            if not isinstance(context, str) or not context.strip():
                problems.append(InputProblem(str(path), 0, f"article {a_idx} paragraph {p_idx}: no context"))
                continue
            yield Document(f"squad:{a_idx}:{p_idx}", title, context.strip(), str(path))


def _read_vital(path: Path, data: dict, problems: list[InputProblem], raw: str) -> Iterator[Document]:
    """``{title: {title, extract, ...}}``: every extract is a document."""
    for key, rec in data.items():
        extract = rec.get("extract") if isinstance(rec, dict) else None
        if not isinstance(extract, str) or not extract.strip():
            problems.append(InputProblem(str(path), _line_of(raw, json.dumps(key)), f"entry {key!r}: no extract"))
            continue
        yield Document(f"vital:{key}", str(rec.get("title") or key), extract.strip(), str(path))


def read_documents(path: str | Path, problems: list[InputProblem]) -> Iterator[Document]:
    """Dispatch on the file's format (by extension, then by the JSON's shape)."""
    path = Path(path)
    if not path.is_file():
        problems.append(InputProblem(str(path), 0, "file not found"))
        return
    if path.suffix == ".jsonl":
        yield from _read_jsonl(path, problems)
    elif path.suffix == ".json":
        raw = path.read_text(encoding="utf-8")
        if not raw.strip():
            problems.append(InputProblem(str(path), 0, "empty file"))
            return
        try:
            data = json.loads(raw)
        except json.JSONDecodeError as err:
            problems.append(InputProblem(str(path), err.lineno, f"not valid JSON ({err.msg})"))
            return
        if isinstance(data, dict) and isinstance(data.get("data"), list):
            yield from _read_squad(path, data, problems)
        elif isinstance(data, dict) and all(isinstance(v, dict) and "extract" in v for v in list(data.values())[:50]):
            yield from _read_vital(path, data, problems, raw)
        else:
            problems.append(InputProblem(str(path), 0, "JSON is neither SQuAD ({'data': [...]}) nor vital extracts ({title: {extract}})"))
    else:
        yield from _read_text(path, problems)
