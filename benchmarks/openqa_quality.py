"""Open-domain QA on Open-SQuAD: what the retriever and the pre-training give the reader, on this CPU.

    .venv/bin/python benchmarks/openqa_quality.py [--variants a,b,c,d] [--seeds 0,1,2] [--reuse] [--test-every 3]

Every variant fine-tunes on `train` questions with the same reader recipe and budget (configs/openqa_cpu.toml),
then answers `dev` and `test` questions open-domain over the whole corpus (k = 5 blocks read):
  (a) BM25 retriever (fixed) + MiniLM reader
  (b) ICT retriever (runs/cpu/ict, fixed) + MiniLM reader                          ORQA's retriever, frozen
  (c) REALM pre-trained retriever (runs/cpu/realm-c, fixed) + reader from REALM's knowledge-augmented encoder
  (d) the same as (c), the query tower fine-tuned jointly with the reader         the full REALM/ORQA recipe
The starting runs come from benchmarks/pretrain_quality.py. Reported: EM and F1 on test (and dev), recall@5 of
the retriever before and after fine-tuning, the wall time of every stage. A strided subset of each split keeps
the CPU time bounded (every 6th test question: 435 of 2,607, every 20th dev question: 101; `--test-every 1` for
all). `--seeds 0,1,2` fine-tunes every variant once per seed (the reader's span head, the order of the
questions, dropout) and reports the mean and each seed's EM: on a few hundred questions one seed's EM moves by
several points. Each run's figures are kept in its folder (qa-a, qa-a-seed1, ...), so `--reuse` resumes an
interrupted benchmark. Writes benchmarks/results/openqa_quality.json.
"""

import argparse
import json
import shutil
import time
from dataclasses import replace
from pathlib import Path

from realm_lm.answer import Answerer
from realm_lm.config import load_config, run_config
from realm_lm.corpus.questions import load_questions
from realm_lm.corpus.store import CorpusStore
from realm_lm.eval.metrics import recall_at_k
from realm_lm.eval.qa import evaluate_qa
from realm_lm.report import markdown_table, write_results
from realm_lm.retrieval import make_searcher, trained_config
from realm_lm.runtime import resolve_device, resolve_precision, setup_runtime
from realm_lm.train.finetune import main as finetune_main

VARIANTS = {  # key: (label, retriever, init_from, train_query_tower)
    "a": ("(a) BM25 + reader", "bm25", "", False),
    "b": ("(b) ICT retriever + reader", "realm", "{runs}/ict", False),
    "c": ("(c) REALM retriever + REALM encoder as reader", "realm", "{runs}/realm-c", False),
    "d": ("(d) (c) with the query tower fine-tuned jointly", "realm", "{runs}/realm-c", True),
}


def start_recall(cfg, kind: str, init_from: str, store: CorpusStore, questions: list) -> float:
    """recall@5 of the retriever a variant starts from, on the same questions."""
    search_cfg = trained_config(cfg, init_from) if kind == "realm" else cfg
    _, rows = make_searcher(search_cfg, kind, store).search([q.question for q in questions], 5)
    return recall_at_k(rows.tolist(), [q.answers for q in questions], store.texts, [5])[5]


def precision(cfg) -> str:
    """Of fine-tuning and answering: runtime.precision as resolved on this machine ("auto": bf16 on CPUs with AMX or AVX512-BF16)."""
    return resolve_precision(resolve_device(cfg.runtime), cfg.runtime.precision)


def same_recipe(cfg, run_dir: Path) -> bool:
    """Whether the run in run_dir was fine-tuned and reads with cfg's [finetune] and [reader] sections."""
    saved = run_config(run_dir)
    got, want = saved.finetune, cfg.finetune
    if not want.train_query_tower:  # the query tower's rate means nothing when it does not train
        got = replace(got, query_lr_scale=want.query_lr_scale)
    return got == want and saved.reader == cfg.reader


def run_variant(cfg, key: str, runs: str, splits: dict, store: CorpusStore, reuse: bool, int8: bool,
                seed: int, fp32_check: bool) -> dict:
    label, kind, init_from, train_query = VARIANTS[key]
    init_from = init_from.format(runs=runs)
    # seed 0 keeps the plain name: corpus_swap.py and serve_latency.py read runs/cpu/qa-d
    run_dir = Path(runs) / (f"qa-{key}" if seed == 0 else f"qa-{key}-seed{seed}")
    done = run_dir / "openqa_figures.json"
    vcfg = replace(cfg, finetune=replace(cfg.finetune, run_dir=str(run_dir), retriever=kind, init_from=init_from,
                                         train_query_tower=train_query, seed=seed))
    if reuse and done.exists():
        figures = json.loads(done.read_text())
        if (figures.get("splits") == {s: len(q) for s, q in splits.items()} and same_recipe(vcfg, run_dir)
                and figures.get("precision", "fp32") == precision(cfg)):
            print(f"reusing {run_dir}", flush=True)
            return figures | {"seed": seed}
        print(f"not reusing {run_dir}: other questions, another fine-tuning recipe or precision", flush=True)
    figures = {"label": label, "seed": seed, "steps": cfg.finetune.steps,
               "splits": {s: len(q) for s, q in splits.items()}, "precision": precision(cfg)}
    t0 = time.perf_counter()
    figures["recall@5_before"] = round(start_recall(cfg, kind, init_from, store, splits["test"]), 4)
    figures["recall_before_s"] = round(time.perf_counter() - t0, 1)
    if run_dir.is_symlink():  # a run linked in from another folder is replaced here, never written through
        run_dir.unlink()
    shutil.rmtree(run_dir, ignore_errors=True)
    t0 = time.perf_counter()
    history = finetune_main(vcfg)
    figures["finetune_s"] = round(time.perf_counter() - t0, 1)
    figures["train_answer_in_top5"] = round(sum(h["answer_in_topk"] for h in history) / len(history), 4)
    figures["loss_first10"] = round(sum(h["loss"] for h in history[:10]) / 10, 3)
    figures["loss_last10"] = round(sum(h["loss"] for h in history[-10:]) / 10, 3)
    answerer = Answerer.from_run(run_dir, cfg, store)
    for split, questions in splits.items():
        result = evaluate_qa(answerer, questions, run_dir / f"predictions-{split}.jsonl")
        figures |= {f"{split}.{k}": v for k, v in result.items()}
    if int8:  # the same run answering with its reader in dynamic int8: the effect on exact match
        answerer = Answerer.from_run(run_dir, replace(cfg, reader=replace(cfg.reader, int8=True)), store)
        result = evaluate_qa(answerer, splits["test"], run_dir / "predictions-test-int8.jsonl")
        figures |= {f"test_int8.{k}": v for k, v in result.items()}
    if fp32_check and figures["precision"] != "fp32":  # the same run answering in fp32: what bf16 answering costs
        answerer = Answerer.from_run(run_dir, replace(cfg, runtime=replace(cfg.runtime, precision="fp32")), store)
        result = evaluate_qa(answerer, splits["test"], run_dir / "predictions-test-fp32.jsonl")
        figures |= {f"test_fp32.{k}": v for k, v in result.items()}
    done.write_text(json.dumps(figures, indent=1))
    print(json.dumps(figures), flush=True)
    return figures


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="configs/openqa_cpu.toml")
    parser.add_argument("--variants", default="a,b,c,d")
    parser.add_argument("--seeds", default="0", help="fine-tuning seeds; the table reports the mean and each seed")
    parser.add_argument("--runs", default="runs/cpu", help="where the ICT / REALM runs are, and the QA runs go")
    parser.add_argument("--test-every", type=int, default=6)
    parser.add_argument("--dev-every", type=int, default=20)
    parser.add_argument("--int8", default="d", help="variants also evaluated on test with the reader in dynamic int8")
    parser.add_argument("--fp32-check", default="d",
                        help="variants also evaluated on test in fp32 where runs use bf16 (runtime.precision)")
    parser.add_argument("--reuse", action="store_true", help="keep variants whose figures are already in their run folder")
    parser.add_argument("--set", action="append", default=[], help="override of the preset")
    parser.add_argument("--name", default="openqa_quality", help="results file: benchmarks/results/NAME.json")
    args = parser.parse_args()
    cfg = load_config(args.config, args.set)
    setup_runtime(cfg)
    store = CorpusStore(cfg.corpus.store)
    splits = {"dev": load_questions(cfg.eval.squad, "dev")[::args.dev_every],
              "test": load_questions(cfg.eval.squad, "test")[::args.test_every]}
    seeds = [int(s) for s in args.seeds.split(",")]
    runs = {key: [run_variant(cfg, key, args.runs, splits, store, args.reuse,
                              key in args.int8.split(",") and seed == seeds[0], seed,
                              key in args.fp32_check.split(",") and seed == seeds[0]) for seed in seeds]
            for key in args.variants.split(",")}  # key -> one figures dict per seed

    def mean(per_seed: list[dict], name: str) -> float:
        return sum(f[name] for f in per_seed) / len(per_seed)

    rows = [[per_seed[0]["label"], f"{mean(per_seed, 'test.em'):.1f}",
             " / ".join(f"{f['test.em']:.1f}" for f in per_seed), f"{mean(per_seed, 'test.f1'):.1f}",
             f"{mean(per_seed, 'dev.em'):.1f}", f"{mean(per_seed, 'recall@5_before'):.3f}",
             f"{mean(per_seed, 'test.recall@5'):.3f}", f"{mean(per_seed, 'finetune_s'):.0f}",
             f"{mean(per_seed, 'test.seconds'):.0f}"] for per_seed in runs.values()]
    print(f"\n{cfg.finetune.steps} steps x {cfg.finetune.batch_size} train questions; test: {len(splits['test'])} "
          f"questions (every {args.test_every}th), dev: {len(splits['dev'])} (every {args.dev_every}th); "
          f"mean over seeds {args.seeds}; fine-tuning and answering in {precision(cfg)}")
    print(markdown_table(["variant", "test EM", "test EM per seed", "test F1", "dev EM", "test R@5 before",
                          "test R@5 after", "fine-tune s", "test answer s"], rows))
    for per_seed in runs.values():
        f = per_seed[0]
        if "test_int8.em" in f:
            print(f"{f['label']}, seed {f['seed']}: reader in dynamic int8: test EM {f['test_int8.em']:.1f} "
                  f"({f.get('precision', 'fp32')} {f['test.em']:.1f}), {f['test_int8.questions_per_s']:.2f} vs "
                  f"{f['test.questions_per_s']:.2f} questions/s")
        if "test_fp32.em" in f:
            print(f"{f['label']}, seed {f['seed']}: answering in fp32: test EM {f['test_fp32.em']:.1f} "
                  f"({f.get('precision', 'fp32')} {f['test.em']:.1f}), {f['test_fp32.questions_per_s']:.2f} vs "
                  f"{f['test.questions_per_s']:.2f} questions/s")
    # key.NAME: the mean over seeds; key.seedN.NAME: each seed's figures
    flat = {f"{key}.{k}": round(mean(per_seed, k), 4) for key, per_seed in runs.items() for k, v in per_seed[0].items()
            if isinstance(v, (int, float)) and k != "seed" and all(k in f for f in per_seed)}
    flat |= {f"{key}.seed{f['seed']}.{k}": v for key, per_seed in runs.items() for f in per_seed
             for k, v in f.items() if not isinstance(v, dict)}
    print(f"\nwrote {write_results(args.name, flat)}")


if __name__ == "__main__":
    main()
