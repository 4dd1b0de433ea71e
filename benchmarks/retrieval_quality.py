"""Recall@1/5/20 on the Open-SQuAD dev and test questions for BM25, MiniLM mean pooling, and REALM's retriever.

    .venv/bin/python benchmarks/retrieval_quality.py [--config configs/open_squad.toml] [--set ...]

Builds the corpus store and both dense indexes if needed (embeddings are reused when the corpus and weights
are unchanged), then writes benchmarks/results/retrieval_quality.json and prints a Markdown table.
"""

import argparse
import time

from realm_lm.config import load_config
from realm_lm.corpus.fetch import fetch_data
from realm_lm.corpus.store import CorpusStore, CorpusStoreError, build_corpus
from realm_lm.eval.retrieval import compare_retrievers, recall_table_headers
from realm_lm.index.build import ensure_indexes
from realm_lm.report import markdown_table, write_results
from realm_lm.retrieval import make_searcher, minilm_mean_config
from realm_lm.runtime import setup_runtime


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="configs/open_squad.toml")
    parser.add_argument("--set", action="append", default=[])
    parser.add_argument("--name", default="retrieval_quality")
    args = parser.parse_args()
    cfg = load_config(args.config, args.set)
    setup_runtime(cfg)
    t0 = time.perf_counter()
    fetch_data(cfg.data.dir)
    try:
        store = CorpusStore(cfg.corpus.store)
    except CorpusStoreError:
        build_corpus(cfg)
        store = CorpusStore(cfg.corpus.store)
    ensure_indexes([cfg, minilm_mean_config(cfg)], store)  # kept when current; else one pass of MiniLM for both
    searchers = {kind: make_searcher(cfg, kind, store) for kind in ("bm25", "minilm-mean", "realm")}
    rows, figures = compare_retrievers(cfg, searchers)
    figures.update({"corpus.blocks": len(store), "corpus.hash": store.corpus_hash[:12],
                    "wall_s": round(time.perf_counter() - t0, 1)})
    path = write_results(args.name, figures)
    print(markdown_table(recall_table_headers(cfg), rows))
    print(f"\n{len(store)} blocks; wrote {path}")


if __name__ == "__main__":
    main()
