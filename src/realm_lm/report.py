"""Markdown tables and flat JSON for benchmark and evaluation reports."""

from __future__ import annotations

import json
import os
import platform
import textwrap
from pathlib import Path
from typing import Any, Sequence


def markdown_table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    cells = [[str(h) for h in headers]] + [[str(c) for c in row] for row in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]
    line = lambda r: "| " + " | ".join(c.ljust(w) for c, w in zip(r, widths)) + " |"  # noqa: E731
    return "\n".join([line(cells[0]), "| " + " | ".join("-" * w for w in widths) + " |", *map(line, cells[1:])])


def write_results(name: str, figures: dict[str, Any], folder: str | Path = "benchmarks/results") -> Path:
    """Flat JSON ``{key: number-or-string}`` of one benchmark run, with the machine it ran on."""
    import torch

    path = Path(folder) / f"{name}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    figures = {**figures, "machine.cpu_count": os.cpu_count(), "machine.platform": platform.platform(),
               "machine.torch": torch.__version__, "machine.threads": torch.get_num_threads()}
    path.write_text(json.dumps(figures, indent=2, sort_keys=True))
    return path


def print_hits(question: str, hits: list, width: int = 100) -> None:
    print(f"\nQ: {question}")
    for h in hits:
        snippet = textwrap.shorten(h.text, width=240, placeholder=" ...")
        print(f"  {h.rank:>2}. {h.score:8.3f}  {h.block_id}  [{h.title}]")
        print(textwrap.indent(textwrap.fill(snippet, width=width), " " * 8))
