"""One pre-training index refresh over the real corpus: one builder process, against the builders of N torchrun ranks
embedding a share each (index.refresher), in one run.

Each builder is the process the refresher launches (``python -m realm_lm.index.refresher ...``) with
``refresh.threads`` cores, from the same document-tower snapshot; here they run without trainers beside them, so
the figure is the refresh alone. The wall time runs from the first launch to the publication of the version.

    .venv/bin/python benchmarks/refresh_shards.py --config configs/open_squad.toml --shards 2
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
from safetensors.torch import save_model

from realm_lm.config import config_to_dict, load_config
from realm_lm.index.versioned import read_manifest
from realm_lm.models.embedder import build_retriever
from realm_lm.report import write_results


def refresh(cfg_path: Path, snapshot: Path, shards: int, logs: Path) -> float:
    """Seconds for ``shards`` builders, launched together, until every one has exited."""
    t0 = time.perf_counter()
    builders = []
    for shard in range(shards):
        log = open(logs / f"builder-{shards}-{shard}.log", "w")
        builders.append(subprocess.Popen(
            [sys.executable, "-m", "realm_lm.index.refresher", str(cfg_path), str(snapshot), "1", str(os.getpid()),
             str(shard), str(shards)], stdout=log, stderr=subprocess.STDOUT,
            env={**os.environ, "OMP_NUM_THREADS": str(json.loads(cfg_path.read_text())["refresh"]["threads"])}))
    codes = [b.wait() for b in builders]
    seconds = time.perf_counter() - t0
    if any(codes):
        raise SystemExit(f"a builder failed ({codes}); see {logs}")
    return seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="configs/open_squad.toml")
    parser.add_argument("--shards", type=int, default=2, help="builders of the split refresh (torchrun's ranks)")
    parser.add_argument("--name", default="refresh_shards")
    args = parser.parse_args()

    base = load_config(args.config)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        doc = build_retriever(base.embedder).doc
        snapshot = tmp / "doc_tower.safetensors"
        save_model(doc, str(snapshot))
        results, embeddings = {}, {}
        for shards in (1, args.shards):
            # apart, not side by side: a build takes the blocks a sibling index of the same tower holds
            cfg = replace(base, index=replace(base.index, dir=str(tmp / f"run-{shards}" / "index")))
            cfg_path = tmp / f"config-{shards}.json"
            cfg_path.write_text(json.dumps(config_to_dict(cfg)))
            seconds = refresh(cfg_path, snapshot, shards, tmp)
            manifest = read_manifest(cfg.index.dir)
            embeddings[shards] = np.load(Path(cfg.index.dir) / "versions" / manifest["version"] / "embeddings.npy")
            results |= {f"builders_{shards}_s": round(seconds, 1), f"builders_{shards}_rows": manifest["n_rows"],
                        f"builders_{shards}_rows_from_shares": manifest["rows_from_parts"]}
            print(f"{shards} builder(s), {cfg.refresh.threads} thread(s) each: {seconds:.1f}s "
                  f"({manifest['n_rows']} blocks, {manifest['rows_from_parts']} from the builders' shares)",
                  flush=True)
    if results[f"builders_{args.shards}_rows_from_shares"] != results[f"builders_{args.shards}_rows"]:
        print("warning: the split refresh did not take every block from the builders' shares", file=sys.stderr)
    one, split = embeddings[1], embeddings[args.shards]
    cosine = (one * split).sum(1) / np.linalg.norm(one, axis=1) / np.linalg.norm(split, axis=1)
    results["max_abs_diff"] = float(np.abs(one - split).max())
    results["min_cosine"] = float(cosine.min())
    results["speedup"] = round(results["builders_1_s"] / results[f"builders_{args.shards}_s"], 2)
    print(f"speed-up {results['speedup']}x; the two indexes: max |diff| {results['max_abs_diff']:.4f}, "
          f"min cosine {results['min_cosine']:.6f}")
    write_results(args.name, {"config": args.config, "threads_per_builder": base.refresh.threads, **results})


if __name__ == "__main__":
    main()
