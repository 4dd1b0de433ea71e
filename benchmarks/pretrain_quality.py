"""The paper's ablation (Table 2) in miniature: what ICT and REALM pre-training do to retrieval, on this CPU.

    .venv/bin/python benchmarks/pretrain_quality.py [--steps 100] [--ict-steps 100]

All variants start from all-MiniLM-L6-v2 with the same budget (configs/pretrain_cpu.toml):
  (a) MiniLM as is (the preset's pooling + a random projection; mean pooling shown too)
  (a') the projection fitted to the blocks' principal directions (ICT's starting point)    (b) after ICT
  (c) ICT + REALM pre-training, salient spans, async refresh                      (d) the same, random-uniform masks
  (e) the same as (c), index never refreshed
Reported per variant: zero-shot retrieval recall@5 on the Open-SQuAD dev questions over the FULL corpus
(configs/open_squad.toml, no QA fine-tuning), masked-token accuracy on salient spans of held-out blocks (never
trained on), and the wall time. Also the trainer's index-waiting time in (c) beside the same run in `sync` mode.
Writes benchmarks/results/pretrain_quality.json (``--name``). ``--variants c --steps 800`` runs or, with
``--reuse``, re-evaluates a longer (c) alone (the ICT run it starts from is trained if missing); ``--init-from RUN``
starts it from another run instead, a second phase of training.
"""

import argparse
import json
import shutil
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import replace
from pathlib import Path

from realm_lm.config import load_config
from realm_lm.corpus.fetch import fetch_data
from realm_lm.corpus.questions import load_questions
from realm_lm.corpus.store import CorpusStore, CorpusStoreError, build_corpus
from realm_lm.eval.retrieval import evaluate_retrieval
from realm_lm.index.build import build_index
from realm_lm.report import markdown_table, write_results
from realm_lm.retrieval import make_searcher, minilm_mean_config, trained_config
from realm_lm.runtime import setup_runtime
from realm_lm.train.checkpoint import read_metrics_log
from realm_lm.train.ict import IctRecipe, main as ict_main
from realm_lm.train.pretrain import PretrainRecipe

TABLE_HEADER = ["variant", "dev R@5", "dev R@20", "held-out mask acc", "RU(top)", "train s", "notes"]


def ensure_store(cfg) -> CorpusStore:
    try:
        return CorpusStore(cfg.corpus.store)
    except CorpusStoreError:
        build_corpus(cfg)
        return CorpusStore(cfg.corpus.store)


def dev_recall(eval_cfg, run_dir: str | None, store: CorpusStore, kind: str = "realm") -> dict:
    cfg = trained_config(eval_cfg, run_dir) if run_dir else eval_cfg
    return evaluate_retrieval(cfg, make_searcher(cfg, kind, store), load_questions(cfg.eval.squad, "dev"), progress=False)


@contextmanager
def recipe_at(cfg, init_from: str, out_dir: Path) -> Iterator[PretrainRecipe]:
    """A REALM pre-training recipe set up with the weights of ``init_from`` (an ICT or REALM run), salient masks (every
    span: no ``require_evidence``) and an index its document tower built in ``out_dir`` (emptied first), never
    refreshed: for measurements, no steps."""
    shutil.rmtree(out_dir, ignore_errors=True)
    ecfg = replace(cfg, pretrain=replace(cfg.pretrain, run_dir=str(out_dir), init_from=init_from, masking="salient",
                                         require_evidence=False),
                   refresh=replace(cfg.refresh, mode="never"))
    recipe = PretrainRecipe(ecfg)
    recipe.setup()
    try:
        yield recipe
    finally:
        recipe.close()


def heldout_accuracy(cfg, init_from: str, out_dir: Path, n_queries: int) -> dict:
    """Salient-span accuracy on held-out blocks with the weights of ``init_from`` (same code for every variant)."""
    with recipe_at(cfg, init_from, out_dir) as recipe:
        return recipe.evaluate(n_queries)


def finished_history(run_dir: str, steps: int) -> list[dict] | None:
    """The metrics log of a run that already reached ``steps`` (``--reuse``), else None."""
    history = read_metrics_log(run_dir)
    steps_logged = [h["step"] for h in history]
    return history if steps_logged == list(range(1, steps + 1)) else None  # complete and from one uninterrupted run


def run_stats(history: list[dict], wall: float, started: int, durations: list[float]) -> dict:
    return {"wall_s": round(wall, 1), "train_wall_s": history[-1]["wall_s"], "index_wait_s": history[-1]["index_wait_s"],
            "index_versions": history[-1]["refreshes"], "refreshes_started": started,
            "refresh_s_median": round(sorted(durations)[len(durations) // 2], 1) if durations else None,
            "loss_first10": round(sum(h["loss"] for h in history[:10]) / len(history[:10]), 3),
            "loss_last10": round(sum(h["loss"] for h in history[-10:]) / len(history[-10:]), 3),
            "max_staleness": max(h["staleness"] for h in history)}


def pretrain(cfg, run_dir: str, reuse: bool = False, **overrides) -> dict:
    steps = overrides.get("steps", cfg.pretrain.steps)
    if reuse and (history := finished_history(run_dir, steps)):
        durations = sorted({h["last_refresh_s"] for h in history if h["last_refresh_s"] is not None})
        print(f"reusing {run_dir} ({steps} steps already trained)", flush=True)
        return run_stats(history, history[-1]["wall_s"], history[-1]["refreshes"], durations) | {"reused": True}
    shutil.rmtree(run_dir, ignore_errors=True)
    refresh_mode = overrides.pop("refresh_mode", cfg.refresh.mode)
    rcfg = replace(cfg, pretrain=replace(cfg.pretrain, run_dir=run_dir, **overrides),
                   refresh=replace(cfg.refresh, mode=refresh_mode))
    recipe = PretrainRecipe(rcfg)
    t0 = time.perf_counter()
    recipe.setup()
    try:
        history = recipe.train()
    finally:
        recipe.close()
    stats = recipe.refresher.stats
    return run_stats(history, time.perf_counter() - t0, stats.refreshes_started, stats.durations_s) | {
        "initial_index_s": round(stats.initial_build_s, 1)}  # the first index, built before step 1 (in wall_s)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="configs/pretrain_cpu.toml")
    parser.add_argument("--eval-config", default="configs/open_squad.toml")
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--ict-steps", type=int, default=100)
    parser.add_argument("--sync-steps", type=int, default=40)
    parser.add_argument("--heldout-queries", type=int, default=200)
    parser.add_argument("--runs", default="runs/cpu")
    parser.add_argument("--reuse", action="store_true",
                        help="keep runs under --runs that already finished this budget (evaluation is redone)")
    parser.add_argument("--init-from", help="start (c)-(e) from this run's latest checkpoint (ICT or REALM "
                        "pre-training) instead of RUNS/ict, which is then trained only for row b")
    parser.add_argument("--variants", default="a,b,c,d,e,sync", help="rows to run: a (with a'), b, c, d, e, sync")
    parser.add_argument("--name", default="pretrain_quality", help="results file: benchmarks/results/NAME.json")
    parser.add_argument("--set", action="append", default=[], help="override of the pre-training preset")
    parser.add_argument("--eval-set", action="append", default=[], help="override of the evaluation preset")
    args = parser.parse_args()
    wanted = set(args.variants.split(","))
    init_from = args.init_from or f"{args.runs}/ict"
    cfg = load_config(args.config, [*args.set, f"pretrain.steps={args.steps}", f"ict.steps={args.ict_steps}",
                                    f"ict.run_dir={args.runs}/ict", f"pretrain.init_from={init_from}"])
    eval_cfg = load_config(args.eval_config, args.eval_set)
    setup_runtime(cfg)
    fetch_data(cfg.data.dir)
    ensure_store(cfg)
    eval_store = ensure_store(eval_cfg)
    runs = Path(args.runs)
    figures: dict = {"steps": args.steps, "ict_steps": args.ict_steps, "batch_size": cfg.pretrain.batch_size,
                     "top_k": cfg.pretrain.top_k, "block_len_pretrain": cfg.corpus.block_len,
                     "overrides": " ".join(args.set), "init_from": cfg.pretrain.init_from}
    rows = []

    def record(label: str, key: str, run_dir: str | None, wall: float, extra: str = "", mlm_head: bool = False) -> None:
        """One row. Weights without a trained MLM head (MiniLM, ICT: ``mlm_head`` False) get no masked-token figures,
        which would only measure a newly initialised head: "–" in the table, left out of the JSON."""
        t0 = time.perf_counter()
        recall = dev_recall(eval_cfg, run_dir, eval_store)
        figures.update({f"{key}.dev.recall@5": recall["recall@5"], f"{key}.dev.recall@20": recall["recall@20"],
                        f"{key}.wall_s": round(wall, 1)})
        acc_cell = ru_cell = "–"
        if mlm_head:
            acc = heldout_accuracy(cfg, run_dir, runs / f"heldout-{key}", args.heldout_queries)
            figures.update({f"{key}.heldout_mask_acc": round(acc["heldout_mask_acc"], 4),
                            f"{key}.heldout_ru_top": round(acc["heldout_ru_top"], 4)})
            acc_cell, ru_cell = f"{acc['heldout_mask_acc']:.3f}", f"{acc['heldout_ru_top']:+.2f}"
        figures[f"{key}.eval_wall_s"] = round(time.perf_counter() - t0, 1)
        rows.append([label, f"{recall['recall@5']:.3f}", f"{recall['recall@20']:.3f}", acc_cell, ru_cell,
                     f"{wall:.0f}", extra])
        # one line per variant as it finishes; the table comes at the end
        print("  ".join(f"{h}: {v}" for h, v in zip(TABLE_HEADER, rows[-1]) if v), flush=True)

    if "a" in wanted:
        for base in (eval_cfg, minilm_mean_config(eval_cfg)):
            build_index(base, store=eval_store)  # reuses the retrieval benchmark's embeddings when they match
        mean_recall = dev_recall(eval_cfg, None, eval_store, "minilm-mean")
        figures["a_mean.dev.recall@5"] = mean_recall["recall@5"]
        record(f"(a) MiniLM as is, {cfg.embedder.pooling} (random projection)", "a", None, 0.0,
               f"mean pooling: R@5 {mean_recall['recall@5']:.3f}")

    if "a" in wanted and cfg.ict.pca_blocks and cfg.embedder.pooling != "mean":  # what ICT starts from: the projection fitted, step 0
        t0 = time.perf_counter()
        fitted = IctRecipe(replace(cfg, ict=replace(cfg.ict, run_dir=str(runs / "ict-step0"))))
        fitted.setup()
        fitted.save()
        record("(a') the same, projection fitted to the blocks (ICT's step 0)", "a_fit", str(runs / "ict-step0"),
               time.perf_counter() - t0, f"{cfg.ict.pca_blocks} blocks")

    if "b" in wanted or not args.init_from:  # the ICT run: row b, and where (c)-(e) start by default
        t0 = time.perf_counter()
        ict_eval = Path(cfg.ict.run_dir) / "ict_eval.json"
        if args.reuse and ict_eval.exists() and (ict_history := finished_history(cfg.ict.run_dir, args.ict_steps)):
            print(f"reusing {cfg.ict.run_dir} ({args.ict_steps} ICT steps already trained)", flush=True)
            ict, ict_wall = json.loads(ict_eval.read_text()), ict_history[-1]["wall_s"]
        else:
            shutil.rmtree(cfg.ict.run_dir, ignore_errors=True)
            ict = ict_main(cfg)
            ict_wall = time.perf_counter() - t0
        figures.update({f"b.{k}": round(v, 4) for k, v in ict.items()})
    if "b" in wanted:
        record("(b) ICT", "b", cfg.ict.run_dir, ict_wall,
               f"ICT held-out R@5 {ict['before.ict_recall@5']:.2f} -> {ict['after.ict_recall@5']:.2f}")

    variants = [("(c) ICT + REALM, salient spans", "c", {}),
                ("(d) ICT + REALM, random-uniform masks", "d", {"masking": "random-uniform"}),
                ("(e) ICT + REALM, index never refreshed", "e", {"refresh_mode": "never"})]
    stats_of = {}
    for label, key, overrides in [v for v in variants if v[1] in wanted]:
        run_dir = str(runs / f"realm-{key}")
        stats = stats_of[key] = pretrain(cfg, run_dir, args.reuse, **overrides)
        figures.update({f"{key}.run.{k}": v for k, v in stats.items() if v is not None})
        record(label, key, run_dir, stats["wall_s"],
               f"loss {stats['loss_first10']:.2f} -> {stats['loss_last10']:.2f}; {stats['index_versions']} index versions"
               + (f"; from {args.init_from}" if args.init_from else ""), mlm_head=True)

    wait_rows = []
    if {"c", "sync"} <= wanted:
        sync = pretrain(cfg, str(runs / "realm-c-sync"), args.reuse, steps=args.sync_steps, refresh_mode="sync")
        for mode, stats, steps in (("async", stats_of["c"], args.steps), ("sync", sync, args.sync_steps)):
            share = stats["index_wait_s"] / stats["train_wall_s"]
            figures.update({f"wait.{mode}.{k}": v for k, v in stats.items() if v is not None})
            figures[f"wait.{mode}.share"] = round(share, 4)
            figures[f"wait.{mode}.s_per_step"] = round(stats["train_wall_s"] / steps, 3)
            wait_rows.append([mode, steps, stats["refreshes_started"], stats["index_versions"], stats["refresh_s_median"],
                              stats["index_wait_s"], stats["train_wall_s"], f"{stats['train_wall_s'] / steps:.2f}",
                              f"{share:.1%}"])

    print("\n" + markdown_table(TABLE_HEADER, rows))
    if wait_rows:
        print("\n" + markdown_table(["refresh", "steps", "refreshes started", "index versions used", "refresh s (median)",
                                     "trainer waited s", "training wall s", "s / step", "waiting share"], wait_rows))
    print(f"\nwrote {write_results(args.name, figures)}")


if __name__ == "__main__":
    main()
