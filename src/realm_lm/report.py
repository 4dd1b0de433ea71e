"""Markdown tables and flat JSON for benchmark and evaluation reports."""

from __future__ import annotations

import os
import platform
import sys
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
    from realm_lm.artifacts import write_json_atomic

    path = Path(folder) / f"{name}.json"
    write_json_atomic(path, {**figures, **machine_figures()})
    return path


def machine_figures() -> dict[str, Any]:
    """What a figure was measured on: CPU, bf16 silicon, platform, torch, threads, GPU."""
    import torch

    from realm_lm.runtime import cpu_bf16_instructions

    return {"machine.cpu": cpu_model(), "machine.cpu_count": os.cpu_count(),
            "machine.bf16_instructions": cpu_bf16_instructions() or "none", "machine.platform": platform.platform(),
            "machine.torch": torch.__version__, "machine.threads": torch.get_num_threads(),
            "machine.gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else "none"}


def cpu_model() -> str:
    """The CPU's model name (this project's shared machines are not all the same CPU)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def print_hits(question: str, hits: list, width: int = 100) -> None:
    print(f"\nQ: {question}")
    for h in hits:
        snippet = textwrap.shorten(h.text, width=240, placeholder=" ...")
        print(f"  {h.rank:>2}. {h.score:8.3f}  {h.block_id}  [{h.title}]")
        print(textwrap.indent(textwrap.fill(snippet, width=width), " " * 8))


def highlight(text: str, start: int, end: int, context: int = 160) -> str:
    """A window of ``text`` around [start, end) with the span marked: bold yellow on a terminal, >>...<< elsewhere."""
    if start < 0:
        return textwrap.shorten(text, width=2 * context, placeholder=" ...")
    lo, hi = max(0, start - context), min(len(text), end + context)
    on, off = ("\033[1;33m", "\033[0m") if sys.stdout.isatty() else (">>", "<<")
    return (("... " if lo > 0 else "") + text[lo:start] + on + text[start:end] + off + text[end:hi]
            + (" ..." if hi < len(text) else ""))


def print_answers(response, width: int = 100) -> None:
    """A `realm ask` response: each answer with its probability, evidence block and the span highlighted."""
    print(f"\nQ: {response.question}")
    if not response.answers:
        print("  (no answer: no span could be read in the retrieved blocks)")
    for i, a in enumerate(response.answers, 1):
        print(f"  {i}. {a.text!r}  p={a.probability:.3f}   [{a.title}]  block {a.block_id} "
              f"(retrieved #{a.block_rank}, p(block)={a.retrieval_probability:.2f})")
        if i == 1 or a.block_rank != response.answers[0].block_rank:
            print(textwrap.indent(textwrap.fill(highlight(a.block_text, a.char_start, a.char_end), width=width),
                                  " " * 6))
