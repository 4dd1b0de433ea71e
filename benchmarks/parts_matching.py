"""How long a resumed index build takes to find the blocks its stopped predecessors embedded, at the paper's scale.

A build saves what it has embedded as a part of ``INDEX/unfinished/`` every minute, so a build of 13M blocks that
was stopped after hours leaves hundreds of parts. The next build matches the corpus's block digests against them
(``index.build.reuse_identical_blocks``). This times that matching on synthetic digests (no model), two ways in one
run: every part in one pass (what the build does) and one part after the other (the build before session 36),
each on the rows not yet found.

    .venv/bin/python benchmarks/parts_matching.py --blocks 13000000 --parts 200
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import numpy as np

from realm_lm.index.build import UNFINISHED, reuse_identical_blocks, save_unfinished_part

RESULTS = Path(__file__).parent / "results"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--blocks", type=int, default=13_000_000, help="blocks in the corpus (the paper's: 13M)")
    parser.add_argument("--parts", type=int, default=200, help="parts left by the stopped builds")
    parser.add_argument("--saved", type=float, default=1.0, help="fraction of the blocks the parts hold")
    parser.add_argument("--name", default="parts_matching")
    args = parser.parse_args()

    rng = np.random.default_rng(0)
    digests = rng.integers(0, 256, size=(args.blocks, 16), dtype=np.uint8)  # [N, 16]
    dim, tower = 8, ("weights", "mean", 8)  # narrow embeddings: the matching, not the copying, is measured
    saved = rng.permutation(args.blocks)[:int(args.blocks * args.saved)]
    with tempfile.TemporaryDirectory() as tmp:
        for rows in np.array_split(saved, args.parts):
            save_unfinished_part(tmp, np.zeros((len(rows), dim), np.float32), digests[rows], tower)
        sources = [(path, json.loads((path / "manifest.json").read_text()))
                   for path in sorted((Path(tmp) / UNFINISHED).glob("part-*"))]

        t0 = time.perf_counter()
        _, filled, _ = reuse_identical_blocks(digests, tower, dim, sources)
        one_pass_s = time.perf_counter() - t0
        assert filled.sum() == len(saved)

        t0 = time.perf_counter()
        filled = np.zeros(args.blocks, dtype=bool)
        for source in sources:
            rows = np.flatnonzero(~filled)
            _, found, _ = reuse_identical_blocks(digests[rows], tower, dim, [source])
            filled[rows[found]] = True
        part_by_part_s = time.perf_counter() - t0
        assert filled.sum() == len(saved)

    result = {"blocks": args.blocks, "parts": args.parts, "blocks_saved": len(saved),
              "one_pass_s": round(one_pass_s, 1), "part_by_part_s": round(part_by_part_s, 1)}
    print(f"{args.blocks:,} blocks, {len(saved):,} of them in {args.parts} parts: all parts in one pass "
          f"{one_pass_s:.1f}s, part by part {part_by_part_s:.1f}s")
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / f"{args.name}.json").write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
