"""How much of a fine-tuned run's exact match is its reader's and how much its retrieval's.

    .venv/bin/python benchmarks/reader_alone.py RUN [RUN ...] [--split test] [--limit 600] [-k 24] [--name NAME]

An answer's score is its span's logit plus its block's retrieval logit (ORQA / REALM). Each run answers the same
questions with the retrieval logits scaled by each alpha: 0 leaves the reader alone to rank the k blocks' spans, 1 is
how the run answers. It also answers from the top block alone (k = 1), where only reading counts. Each question is read
once, at batch 1 (`realm eval qa` reads several at once, so bf16 rounding can move a few answers), and decoded at
every alpha. Prints a table and writes benchmarks/results/NAME.json.
"""

import argparse
from dataclasses import replace

import torch
from tqdm import tqdm

from realm_lm.answer import Answerer
from realm_lm.config import load_config
from realm_lm.corpus.questions import load_questions
from realm_lm.eval.metrics import exact_match
from realm_lm.report import markdown_table, write_results

ALPHAS = (0.0, 0.5, 1.0, 1.5, 2.0)


@torch.inference_mode()
def exact_match_by_alpha(answerer: Answerer, questions, k: int, alphas) -> dict[float, float]:
    """EM (in %) of ``questions`` read at ``k`` blocks, with the retrieval logits times each alpha."""
    _, logits, rows = answerer.retrieve([q.question for q in questions], k)  # [Q, k], [Q, k]
    right = {alpha: 0 for alpha in alphas}
    for i, q in enumerate(tqdm(questions, desc=f"reading at k = {k}", unit="question")):
        batch, span_logits, starts, ends = answerer.read([q.question], rows[i:i + 1])  # span_logits: [1, k, S]
        for alpha in alphas:
            best = answerer.decode(batch, 0, k, span_logits[0], torch.from_numpy(logits[i]) * alpha, starts, ends, 1)
            right[alpha] += bool(best) and exact_match(best[0].text, q.answers)
    return {alpha: 100 * n / len(questions) for alpha, n in right.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("runs", nargs="+", help="fine-tuned dense runs (their retrieval logits are not zeros)")
    parser.add_argument("--config", default="configs/openqa_cpu.toml", help="corpus, questions and runtime")
    parser.add_argument("--split", choices=["dev", "test"], default="test")
    parser.add_argument("--limit", type=int, default=600, help="the first N questions of the split (0: all)")
    parser.add_argument("-k", type=int, default=24, help="blocks read")
    parser.add_argument("--name", default="reader_alone")
    args = parser.parse_args()
    cfg = load_config(args.config)
    questions = load_questions(cfg.eval.squad, args.split)
    questions = questions[:args.limit] if args.limit else questions
    figures, rows = {"split": args.split, "n_questions": len(questions), "k": args.k}, []
    for run in args.runs:
        answerer = Answerer.from_run(run, replace(cfg, reader=replace(cfg.reader, top_k=args.k)))
        if not answerer.dense:
            raise SystemExit(f"{run} answers with BM25: its retrieval logits are zeros, there is nothing to scale")
        em = exact_match_by_alpha(answerer, questions, args.k, ALPHAS)
        em_top1 = exact_match_by_alpha(answerer, questions, 1, (1.0,))[1.0]
        figures |= {f"{run}.em_alpha{alpha}": round(v, 2) for alpha, v in em.items()}
        figures |= {f"{run}.em_top_block": round(em_top1, 2), f"{run}.retrieval_scale": answerer.retrieval_scale}
        rows.append([run, *(f"{em[alpha]:.1f}" for alpha in ALPHAS), f"{em_top1:.1f}"])
    print(f"EM on the first {len(questions)} {args.split} questions, k = {args.k}, retrieval logits x alpha:")
    print(markdown_table(["run", *(f"alpha {alpha:g}" for alpha in ALPHAS), "top block only"], rows))
    print(write_results(args.name, figures))


if __name__ == "__main__":
    main()
