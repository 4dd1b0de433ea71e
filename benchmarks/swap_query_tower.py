"""A fine-tuned run's reader with another run's query tower: which of the two a difference in exact match comes from.

    .venv/bin/python benchmarks/swap_query_tower.py READER_RUN QUERY_RUN OUT_RUN
    .venv/bin/realm eval qa --config configs/openqa_cpu.toml --from OUT_RUN --split test [--limit 600] ...

OUT_RUN gets READER_RUN's config and latest checkpoint with every `retriever.query.*` tensor taken from QUERY_RUN's
latest checkpoint. Both runs must share the document tower (fine-tuning keeps it frozen), so READER_RUN's index of
it is copied too and nothing is re-embedded. No optimizer state: the result is for answering, not for resuming.
"""

import argparse
import shutil
from pathlib import Path

import torch
from safetensors.torch import save_file

from realm_lm.artifacts import staged_dir, write_text_atomic
from realm_lm.train.checkpoint import latest_checkpoint, read_weights

QUERY_PREFIX = "retriever.query."


def swapped_weights(reader_ckpt: Path, query_ckpt: Path) -> dict[str, torch.Tensor]:
    weights, other = read_weights(reader_ckpt), read_weights(query_ckpt)  # each checkpoint read once

    def tower(w: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
        return {k: v for k, v in w.items() if k.startswith(prefix)}

    doc_here, doc_there = tower(weights, "retriever.doc."), tower(other, "retriever.doc.")
    if doc_here.keys() != doc_there.keys() or not all(torch.equal(v, doc_there[k]) for k, v in doc_here.items()):
        raise SystemExit(f"{reader_ckpt} and {query_ckpt} have different document towers: their indexes differ")
    query = tower(other, QUERY_PREFIX)
    mismatched = tower(weights, QUERY_PREFIX).keys() ^ query.keys()
    if mismatched:
        raise SystemExit(f"the two query towers have different tensors: {sorted(mismatched)[:5]}")
    return weights | query


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("reader_run", type=Path)
    parser.add_argument("query_run", type=Path)
    parser.add_argument("out_run", type=Path)
    args = parser.parse_args()
    reader_ckpt, query_ckpt = latest_checkpoint(args.reader_run), latest_checkpoint(args.query_run)
    if reader_ckpt is None or query_ckpt is None:
        raise SystemExit(f"no checkpoint in {args.reader_run if reader_ckpt is None else args.query_run}")
    weights = swapped_weights(reader_ckpt, query_ckpt)
    with staged_dir(args.out_run / "checkpoints" / reader_ckpt.name) as staging:  # never a half-written checkpoint
        save_file(weights, str(staging / "model.safetensors"), metadata={"format": "pt"})
        shutil.copy(reader_ckpt / "state.json", staging / "state.json")
    write_text_atomic(args.out_run / "checkpoints" / "LATEST", reader_ckpt.name)
    shutil.copy(args.reader_run / "config.json", args.out_run / "config.json")
    for index in args.reader_run.glob("eval-index-*"):  # keyed by the document tower, which both runs share
        shutil.copytree(index, args.out_run / index.name, dirs_exist_ok=True)
    print(f"{args.out_run}: the reader of {reader_ckpt}, the query tower of {query_ckpt}")


if __name__ == "__main__":
    main()
