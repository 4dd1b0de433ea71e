"""The main job behind `make demo`: data, corpus store, index, retrieval evaluation, example questions."""

from __future__ import annotations

import time
from dataclasses import replace
from pathlib import Path

from realm_lm.config import RunConfig
from realm_lm.corpus.fetch import fetch_data
from realm_lm.corpus.questions import load_questions
from realm_lm.corpus.store import CorpusStore, build_corpus
from realm_lm.eval.retrieval import compare_retrievers, recall_table_headers
from realm_lm.index.build import ensure_indexes
from realm_lm.index.versioned import latest_version
from realm_lm.report import markdown_table, print_hits
from realm_lm.retrieval import hits_of, make_searcher, minilm_mean_config

EXAMPLE_QUESTIONS = 3
QA_EVAL_QUESTIONS = 200  # dev questions the demo's QA stage is evaluated on (every 10th)


def stage(title: str) -> None:
    print(f"\n=== {title} ===", flush=True)


def run_demo(cfg: RunConfig, pretrain_cfg: RunConfig | None = None,
             finetune_cfg: RunConfig | None = None) -> dict[str, float]:
    timings: dict[str, float] = {}

    def timed(name: str, fn, *args):
        t0 = time.perf_counter()
        out = fn(*args)
        timings[name] = time.perf_counter() - t0
        return out

    stage("1. data")
    for path in timed("data", fetch_data, cfg.data.dir):
        print(f"ok  {path}")

    stage("2. corpus store")
    timed("corpus", build_corpus, cfg)
    store = CorpusStore(cfg.corpus.store)
    print(f"{len(store)} blocks of <= {store.block_len} wordpieces from {store.manifest['n_documents']} documents")

    stage("3. indexes (REALM's tower as initialised: a random projection to 128-d; MiniLM mean pooling baseline)")
    towers = {"realm": cfg, "minilm-mean": minilm_mean_config(cfg)}
    # one pass of MiniLM over the corpus for both: REALM's default tower is its mean pooling and a projection
    versions = timed("indexes", ensure_indexes, list(towers.values()), store)
    for (name, run_cfg), version in zip(towers.items(), versions):
        if version is None:
            version = f"{latest_version(run_cfg.index.dir)} (kept: the same tower's embeddings of this corpus)"
        print(f"{name}: {run_cfg.index.dir} {version}")

    stage("4. retrieval on the Open-SQuAD questions (answer string in a top-k block)")
    searchers = {kind: make_searcher(cfg, kind, store) for kind in ("bm25", "minilm-mean", "realm")}
    t0 = time.perf_counter()
    rows, results = compare_retrievers(cfg, searchers)
    timings["eval"] = time.perf_counter() - t0
    print(markdown_table(recall_table_headers(cfg), rows))
    print("REALM's retriever is untrained here (a random projection to 128-d): ICT fits it, pre-training tunes it.")

    stage("5. example questions (test split), top 3 blocks from each retriever")
    for q in load_questions(cfg.eval.squad, "test")[:: 997][:EXAMPLE_QUESTIONS]:
        print(f"\n--- gold answers: {' | '.join(q.answers)}")
        for kind in ("bm25", "realm"):
            scores, found = searchers[kind].search([q.question], 3)
            print(f"[{kind}]", end="")
            print_hits(q.question, hits_of(store, scores[0], found[0]))

    if pretrain_cfg is not None:
        results.update(run_pretraining_stage(pretrain_cfg, timed))
    if finetune_cfg is not None:
        qa_cfg = replace(cfg, reader=finetune_cfg.reader, finetune=finetune_cfg.finetune)
        results.update(run_qa_stage(qa_cfg, store, timed))

    stage("timings (s)")
    print(markdown_table(["stage", "seconds"], [[k, f"{v:.1f}"] for k, v in timings.items()]))
    return results


def run_pretraining_stage(cfg: RunConfig, timed) -> dict[str, float]:
    """ICT warm start, then REALM pre-training with asynchronous index refresh, on a small corpus."""
    from realm_lm.plot import plot_run
    from realm_lm.train.ict import main as ict_main
    from realm_lm.train.pretrain import main as pretrain_main

    stage(f"6. ICT warm start ({cfg.ict.steps} steps) on {cfg.corpus.store}")
    timed("pretrain.corpus", build_corpus, cfg)
    ict = timed("ict", ict_main, cfg)
    print(markdown_table(["ICT pseudo-queries, held-out blocks", "recall@1", "recall@5"],
                         [[w, f"{ict[f'{w}.ict_recall@1']:.3f}", f"{ict[f'{w}.ict_recall@5']:.3f}"] for w in ("before", "after")]))

    stage(f"7. REALM pre-training ({cfg.pretrain.steps} steps, {cfg.pretrain.masking} masking, "
          f"index refresh {cfg.refresh.mode} every {cfg.refresh.every} steps"
          + (f", each version in use {cfg.refresh.swap_after} steps after its refresh starts"
             if cfg.refresh.mode == "async" and cfg.refresh.swap_after else "") + ")")
    history = timed("pretrain", pretrain_main, cfg)
    first, last = history[:5], history[-5:]
    mean = lambda rows, key: sum(r[key] for r in rows) / len(rows)  # noqa: E731
    print(f"loss {mean(first, 'loss'):.3f} -> {mean(last, 'loss'):.3f} (mean of first / last 5 steps); "
          f"masked-token accuracy {mean(first, 'mask_acc'):.2f} -> {mean(last, 'mask_acc'):.2f}")
    print(f"index versions used: {history[-1]['refreshes']} (last {history[-1]['index_version']}); "
          f"trainer waited {history[-1]['index_wait_s']:.1f}s of {history[-1]['wall_s']:.0f}s for the index")
    print(f"plot: {plot_run(cfg.pretrain.run_dir)}")
    return {"pretrain.refreshes": history[-1]["refreshes"], "pretrain.final_loss": mean(last, "loss")}


def run_qa_stage(cfg: RunConfig, store: CorpusStore, timed) -> dict[str, float]:
    """Open-domain QA: fine-tune the query tower and a reader, evaluate, answer three questions with evidence."""
    from realm_lm.answer import Answerer
    from realm_lm.eval.qa import evaluate_qa
    from realm_lm.plot import plot_run
    from realm_lm.report import print_answers
    from realm_lm.train.finetune import main as finetune_main

    f = cfg.finetune
    stage(f"8. open-domain QA fine-tuning from {f.init_from or 'MiniLM'} ({f.steps} steps x {f.batch_size} train "
          f"questions, top-{cfg.reader.top_k} blocks of the fixed index)")
    history = timed("finetune", finetune_main, cfg)
    mean = lambda rows, key: sum(r[key] for r in rows) / len(rows)  # noqa: E731
    print(f"loss {mean(history[:5], 'loss'):.3f} -> {mean(history[-5:], 'loss'):.3f} (mean of first / last 5 steps); "
          f"plot: {plot_run(f.run_dir)}")

    dev = load_questions(cfg.eval.squad, "dev")[::10][:QA_EVAL_QUESTIONS]
    stage(f"9. QA evaluation on {len(dev)} dev questions")
    answerer = Answerer.from_run(f.run_dir, cfg, store)
    predictions = Path(f.run_dir) / "predictions-dev.jsonl"
    result = timed("qa_eval", evaluate_qa, answerer, dev, predictions)
    print(markdown_table(["questions", "EM", "F1", f"recall@{cfg.reader.top_k}", "questions/s"],
                         [[result["n_questions"], f"{result['em']:.1f}", f"{result['f1']:.1f}",
                           f"{result[f'recall@{cfg.reader.top_k}']:.3f}", f"{result['questions_per_s']:.1f}"]]))
    print(f"predictions with their evidence: {predictions}")

    stage("10. three test questions answered, with their evidence")
    examples = load_questions(cfg.eval.squad, "test")[::997][:EXAMPLE_QUESTIONS]
    for q, response in zip(examples, answerer.answer([q.question for q in examples], top_n=2)):
        print(f"\n--- gold answers: {' | '.join(q.answers)}")
        print_answers(response)
    return {"qa.dev_em": result["em"], "qa.dev_f1": result["f1"]}
