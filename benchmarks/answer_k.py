"""How many retrieved blocks the reader should read at answer time, chosen on `dev`, scored on `test`.

    .venv/bin/python benchmarks/answer_k.py RUN_DIR [RUN_DIR ...] [--ks 2,5,8] [--dev-every 2] [--compare-k 5]
        [--name answer_k]

Fine-tuning fixes the retriever and the reader, not how many blocks are read when answering (`reader.top_k`; the
paper reads 5). A reader that weighs blocks by a learned retrieval logit can gain from more blocks, one that
cannot (BM25's logits are zeros: every block counts the same) loses to the extra distractors. For each fine-tuned
run: EM on every `--dev-every`th dev question at each k, the k with the best dev EM (ties: the smaller k), then EM
and F1 on the whole test split at that k and at `--compare-k` (the paper's 5; 0: none). Writes
benchmarks/results/NAME.json after each run, so a stopped benchmark keeps what it measured.
"""

import argparse
import time
from pathlib import Path

from realm_lm.answer import Answerer
from realm_lm.config import load_config
from realm_lm.corpus.questions import load_questions
from realm_lm.corpus.store import CorpusStore
from realm_lm.eval.qa import evaluate_qa
from realm_lm.report import markdown_table, write_results
from realm_lm.runtime import setup_runtime


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("runs", nargs="+", help="fine-tuned run folders (benchmarks/openqa_quality.py's qa-*)")
    parser.add_argument("--config", default="configs/openqa_cpu.toml")
    parser.add_argument("--ks", default="2,5,8", help="blocks read per question, the candidates")
    parser.add_argument("--dev-every", type=int, default=2, help="every Nth dev question chooses k (2: 1,008 of 2,015)")
    parser.add_argument("--compare-k", type=int, default=5, help="test also at this k (0: only the chosen k)")
    parser.add_argument("--set", action="append", default=[], help="override of the preset")
    parser.add_argument("--name", default="answer_k", help="results file: benchmarks/results/NAME.json")
    args = parser.parse_args()
    ks = sorted(int(k) for k in args.ks.split(","))
    cfg = load_config(args.config, args.set)
    setup_runtime(cfg)
    store = CorpusStore(cfg.corpus.store)
    dev = load_questions(cfg.eval.squad, "dev")[::args.dev_every]
    test = load_questions(cfg.eval.squad, "test")
    figures: dict = {"name": args.name, "ks": args.ks, "dev_questions": len(dev), "test_questions": len(test)}
    rows = []
    for run in args.runs:
        t0 = time.perf_counter()
        answerer = Answerer.from_run(run, cfg, store)
        key = Path(run).parent.name + "/" + Path(run).name
        dev_em = {}
        for k in ks:
            answerer.top_k = k
            dev_em[k] = evaluate_qa(answerer, dev, progress=False)["em"]
            figures[f"{key}.dev.k{k}.em"] = dev_em[k]
            print(f"{key}: dev EM at k = {k}: {dev_em[k]:.1f}", flush=True)
        chosen = max(ks, key=lambda k: (dev_em[k], -k))
        test_at = {}
        for k in sorted({chosen, args.compare_k} - {0}):
            answerer.top_k = k
            test_at[k] = evaluate_qa(answerer, test, progress=False)
            figures |= {f"{key}.test.k{k}.{m}": test_at[k][m] for m in ("em", "f1", f"recall@{k}")}
            print(f"{key}: test EM at k = {k}: {test_at[k]['em']:.1f}", flush=True)
        figures[f"{key}.chosen_k"] = chosen
        figures[f"{key}.seconds"] = round(time.perf_counter() - t0, 1)
        compared = [f"{test_at[args.compare_k]['em']:.1f}"] if args.compare_k else []
        rows.append([key, *[f"{dev_em[k]:.1f}" for k in ks], str(chosen), *compared,
                     f"{test_at[chosen]['em']:.1f}", f"{test_at[chosen]['f1']:.1f}"])
        write_results(args.name, figures)
    print()
    compared = [f"test EM, k = {args.compare_k}"] if args.compare_k else []
    print(markdown_table(["run", *[f"dev EM, k = {k}" for k in ks], "k chosen on dev", *compared,
                          "test EM, chosen k", "test F1, chosen k"], rows))


if __name__ == "__main__":
    main()
