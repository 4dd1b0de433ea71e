"""The corpus swap (paper, Appendix C): facts that exist only in a new corpus are answered after re-embedding,
without retraining.

    .venv/bin/python benchmarks/corpus_swap.py [--run runs/cpu/qa-d]

A fine-tuned run (default: variant (d) of benchmarks/openqa_quality.py) answers the twenty questions of
examples/swap_corpus/questions.jsonl (about ten invented encyclopedia entries) over the default corpus, then over
a new corpus store = the default documents + the ten entries, after `realm corpus build` and
`realm index build --from RUN --corpus STORE` only. The run's weights are checked unchanged (sha256 of its
checkpoint). The new corpus's index is embedded from scratch each run (an index of it left by an earlier run is
deleted first); only blocks the run's index of the default corpus already holds are taken from it. Writes
benchmarks/results/corpus_swap.json (or --name).
"""

import argparse
import shutil
import time
from dataclasses import replace
from pathlib import Path

from realm_lm.answer import Answerer
from realm_lm.artifacts import sha256_file
from realm_lm.config import load_config
from realm_lm.corpus.questions import read_qa_file
from realm_lm.corpus.store import CorpusStore, build_corpus
from realm_lm.eval.qa import evaluate_qa
from realm_lm.index.build import build_index
from realm_lm.index.versioned import read_manifest
from realm_lm.report import markdown_table, print_answers, write_results
from realm_lm.retrieval import trained_config
from realm_lm.runtime import setup_runtime
from realm_lm.train.checkpoint import latest_checkpoint


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="configs/openqa_cpu.toml")
    parser.add_argument("--run", default="runs/cpu/qa-d", help="a `realm finetune` run")
    parser.add_argument("--entries", default="examples/swap_corpus/new_entries.jsonl")
    parser.add_argument("--questions", default="examples/swap_corpus/questions.jsonl")
    parser.add_argument("--store", default="artifacts/open_squad_swap/corpus")
    parser.add_argument("--name", default="corpus_swap", help="results file name (benchmarks/results/NAME.json)")
    args = parser.parse_args()
    cfg = load_config(args.config)
    setup_runtime(cfg)
    questions = read_qa_file(args.questions)
    weights = latest_checkpoint(args.run) / "model.safetensors"
    weights_before = sha256_file(weights)
    figures: dict = {"run": args.run, "questions": len(questions)}

    before = evaluate_qa(Answerer.from_run(args.run, cfg), questions, Path(args.run) / "predictions-swap-before.jsonl",
                         progress=False)
    swapped = replace(cfg, corpus=replace(cfg.corpus, inputs=(*cfg.corpus.inputs, args.entries), store=args.store))
    t0 = time.perf_counter()
    build_corpus(swapped)
    figures["corpus_build_s"] = round(time.perf_counter() - t0, 1)
    index_cfg = trained_config(swapped, args.run)  # the run's own document tower, the new corpus
    shutil.rmtree(index_cfg.index.dir, ignore_errors=True)
    t0 = time.perf_counter()
    version = build_index(index_cfg)
    figures["index_build_s"] = round(time.perf_counter() - t0, 1)
    figures["index_rows_embedded"] = read_manifest(index_cfg.index.dir, version)["rows_embedded"]
    answerer = Answerer.from_run(args.run, swapped)
    after = evaluate_qa(answerer, questions, Path(args.run) / "predictions-swap-after.jsonl", progress=False)
    figures["weights_unchanged"] = sha256_file(weights) == weights_before
    figures["blocks_before"] = len(CorpusStore(cfg.corpus.store))
    figures["blocks_after"] = len(CorpusStore(args.store))
    figures |= {f"before.{k}": v for k, v in before.items()} | {f"after.{k}": v for k, v in after.items()}
    for response in answerer.answer([q.question for q in questions[::7]], top_n=1):
        print_answers(response)
    print("\n" + markdown_table(["corpus", "blocks", "EM", "F1", "recall@5"], [
        ["default (before the swap)", figures["blocks_before"], f"{before['em']:.0f}", f"{before['f1']:.0f}",
         f"{before['recall@5']:.2f}"],
        ["default + 10 new entries (re-embedded only)", figures["blocks_after"], f"{after['em']:.0f}",
         f"{after['f1']:.0f}", f"{after['recall@5']:.2f}"]]))
    print(f"new corpus store {figures['corpus_build_s']:.0f}s, its index {figures['index_build_s']:.1f}s "
          f"({figures['index_rows_embedded']} blocks embedded, the others reused); "
          f"weights unchanged: {figures['weights_unchanged']}")
    print(f"\nwrote {write_results(args.name, figures)}")


if __name__ == "__main__":
    main()
