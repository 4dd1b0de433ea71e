"""`realm <verb>`: thin entry points that resolve a config and call the library."""

from __future__ import annotations

import argparse
import json
import sys
import threading
import time
from dataclasses import replace
from pathlib import Path

from realm_lm.artifacts import write_json_atomic
from realm_lm.config import (FINETUNE_RETRIEVERS, MAX_ANSWERS, MAX_BLOCKS_READ, RunConfig, load_config,
                             run_config)
from realm_lm.errors import RealmError
from realm_lm.report import machine_figures, markdown_table, print_hits

DEFAULT_CONFIG = "configs/open_squad.toml"


def int_in(low: int, high: int | None = None):
    """An argparse type: an integer from ``low`` to ``high`` (no upper bound when None)."""
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
        if value < low or (high is not None and value > high):
            raise argparse.ArgumentTypeError(f"must be {'>= ' + str(low) if high is None else f'from {low} to {high}'}"
                                             f", not {value}")
        return value
    return parse


def _config(args: argparse.Namespace) -> RunConfig:
    path = args.config
    if path is None and Path(DEFAULT_CONFIG).is_file():
        path = DEFAULT_CONFIG
    overrides = list(args.set or ())
    if getattr(args, "corpus", None):
        overrides.append(f"corpus.store={json.dumps(args.corpus)}")
    cfg = load_config(path, overrides)
    from realm_lm.runtime import setup_runtime
    setup_runtime(cfg, announce=True)
    return cfg


def _answering_config(args: argparse.Namespace) -> RunConfig:
    """`ask`, `serve`, `eval qa`: the config, answering from the corpus of the fine-tuned run (:func:`_run_corpus`)."""
    return _run_corpus(args, _config(args))


def _run_corpus(args: argparse.Namespace, cfg: RunConfig) -> RunConfig:
    """A fine-tuned run answers and retrieves from the corpus it was fine-tuned on (its index is of that corpus)
    unless ``--corpus`` or ``--set corpus.store=`` names another; a preset's corpus is not such a choice."""
    from realm_lm.corpus.store import CorpusStoreError

    if args.corpus or any(o.split("=", 1)[0].strip() == "corpus.store" for o in args.set or ()):
        return cfg
    corpus = run_config(args.from_run).corpus
    if not (Path(corpus.store) / "manifest.json").is_file():
        raise CorpusStoreError(f"no corpus store at {corpus.store}, the corpus {args.from_run} was fine-tuned on (a "
                               "path relative to where it was trained); name one with --corpus STORE")
    return replace(cfg, corpus=corpus)


def _retriever_config(args: argparse.Namespace) -> RunConfig:
    """`index build`, `retrieve`: with ``--from`` a run's towers and its own index; a fine-tuned run's on the corpus
    it was fine-tuned on (an ICT or pre-training run's training corpus is not the one to retrieve from)."""
    from realm_lm.retrieval import trained_config
    from realm_lm.train.checkpoint import is_finetuned

    cfg = _config(args)
    if not args.from_run:
        return cfg
    return trained_config(_run_corpus(args, cfg) if is_finetuned(args.from_run) else cfg, args.from_run)


def cmd_data_fetch(args: argparse.Namespace) -> None:
    from realm_lm.corpus.fetch import fetch_data
    cfg = _config(args)
    for path in fetch_data(args.dest or cfg.data.dir):
        print(f"ok  {path}")


def cmd_corpus_build(args: argparse.Namespace) -> None:
    from realm_lm.corpus.store import CorpusStore, build_corpus
    cfg = _config(args)
    out = build_corpus(cfg)
    store = CorpusStore(out)
    m = store.manifest
    print(f"corpus store {out}: {m['n_blocks']} blocks from {m['n_documents']} documents "
          f"(block_len {m['block_len']}, {m['duplicate_blocks_dropped']} duplicate blocks dropped, "
          f"{len(m['skipped_input_problems'])} malformed records skipped), corpus hash {m['corpus_hash'][:12]}")


def cmd_index_build(args: argparse.Namespace) -> None:
    import torch

    from realm_lm.index.build import build_index_on_ranks
    from realm_lm.index.versioned import read_manifest
    from realm_lm.retrieval import minilm_mean_config
    from realm_lm.train import distributed
    cfg = _retriever_config(args)
    if not args.from_run and args.retriever == "minilm-mean":
        cfg = minilm_mean_config(cfg)
    t0 = time.perf_counter()
    shares = []  # blocks each rank embedded, under torchrun
    with distributed.process_group() as main_rank:
        version, n = build_index_on_ranks(cfg)  # under torchrun, every rank embeds its share and rank 0 publishes
        if distributed.world_size() > 1:
            shares = distributed.gather_rows(torch.tensor([[n]])).flatten().tolist()
        seconds = time.perf_counter() - t0
    if not main_rank:
        return
    m = read_manifest(cfg.index.dir, version)
    embedded = m["rows_embedded"] + sum(shares)
    reused, stopped = m["n_rows"] - embedded, m["rows_from_parts"] - sum(shares)
    by = f" by {len(shares)} processes ({' + '.join(map(str, shares))})" if shares else ""
    reuse = (f" ({reused} reused: the same blocks embedded by the same weights before"
             f"{f', {stopped} of them by a build that stopped' if stopped else ''})" if reused else "")
    print(f"index {cfg.index.dir} version {version}: {m['n_rows']} x {m['dim']} ({m['backend']}), {embedded} blocks "
          f"embedded{by} in {seconds - m['index_build_seconds'] if shares else m['embed_seconds']:.1f}s{reuse}, "
          f"built in {m['index_build_seconds']:.1f}s")


def cmd_retrieve(args: argparse.Namespace) -> None:
    from realm_lm.retrieval import hits_of, make_searcher
    cfg = _retriever_config(args)
    searcher = make_searcher(cfg, args.retriever)
    scores, rows = searcher.search([args.question], args.k)
    print_hits(args.question, hits_of(searcher.store, scores[0], rows[0]))


def cmd_eval_retrieval(args: argparse.Namespace) -> None:
    from realm_lm.eval.retrieval import evaluate_retrieval
    from realm_lm.retrieval import make_searcher, trained_config
    cfg = _config(args)
    if args.from_run:
        cfg = trained_config(cfg, args.from_run)
    questions = _questions(cfg, args)
    searcher = make_searcher(cfg, args.retriever)
    result = evaluate_retrieval(cfg, searcher, questions, regex=args.regex or cfg.eval.regex_answers)
    keys = [f"recall@{k}" for k in cfg.eval.ks]
    name = Path(args.questions).stem if args.questions else args.split
    print(markdown_table(["questions", "retriever", *keys, "n"],
                         [[name, args.retriever, *[f"{result[k]:.3f}" for k in keys], result["n_questions"]]]))
    if args.json:
        write_json_atomic(args.json, {f"{name}.{args.retriever}.{k}": v for k, v in result.items()})


def _check_run_folder(args: argparse.Namespace, run_dir: str) -> None:
    """`ict`, `pretrain`, `finetune`: a fresh run into a folder holding a run is refused without --overwrite."""
    from realm_lm.train.checkpoint import check_fresh_start
    if not (args.resume or args.overwrite):
        check_fresh_start(run_dir, args.verb)


def cmd_ict(args: argparse.Namespace) -> None:
    from realm_lm.train import distributed
    from realm_lm.train.ict import main as ict_main
    cfg = _config(args)
    _check_run_folder(args, cfg.ict.run_dir)
    with distributed.process_group() as main_rank:
        result = ict_main(cfg, resume=args.resume)
    if not main_rank:  # rank 0 reports
        return
    print(markdown_table(["pseudo-queries on held-out blocks", *[k.removeprefix("before.") for k in result if k.startswith("before.")]],
                         [[when, *[f"{v:.3f}" if isinstance(v, float) else v for k, v in result.items() if k.startswith(when)]]
                          for when in ("before", "after")]))


def cmd_pretrain(args: argparse.Namespace) -> None:
    from realm_lm.plot import plot_run
    from realm_lm.train import distributed
    from realm_lm.train.pretrain import main as pretrain_main
    cfg = _config(args)
    _check_run_folder(args, cfg.pretrain.run_dir)
    with distributed.process_group() as main_rank:
        history = pretrain_main(cfg, resume=args.resume)
    if not main_rank:  # rank 0 reports and plots
        return
    if history:
        last = history[-1]
        index = (f"index {last['index_version']} ({last['refreshes']} versions used), trainer waited "
                 f"{last['index_wait_s']:.1f}s for the index" if last["index_version"]
                 else "no index (pretrain.top_k = 1: the null block alone)")
        print(f"step {last['step']}: loss {last['loss']:.3f}, {index}")
    print(f"metrics: {Path(cfg.pretrain.run_dir) / 'metrics.jsonl'}; plot: {plot_run(cfg.pretrain.run_dir)}")


def cmd_finetune(args: argparse.Namespace) -> None:
    from realm_lm.plot import plot_run
    from realm_lm.train import distributed
    from realm_lm.train.finetune import main as finetune_main

    cfg = _config(args)
    if args.from_run is not None:
        cfg = replace(cfg, finetune=replace(cfg.finetune, init_from=args.from_run))
    if args.retriever:
        cfg = replace(cfg, finetune=replace(cfg.finetune, retriever=args.retriever))
    if args.questions:
        cfg = replace(cfg, finetune=replace(cfg.finetune, questions=args.questions))
    if args.regex:
        cfg = replace(cfg, eval=replace(cfg.eval, regex_answers=True))
    _check_run_folder(args, cfg.finetune.run_dir)
    with distributed.process_group() as main_rank:
        history = finetune_main(cfg, resume=args.resume)
    if not main_rank:  # rank 0 reports and plots
        return
    if history:
        last = history[-1]
        print(f"step {last['step']}: loss {last['loss']:.3f} (reader {last['reader_loss']:.3f}, "
              f"retriever {last['retriever_loss']:.3f})")
    print(f"run: {cfg.finetune.run_dir}; metrics: {Path(cfg.finetune.run_dir) / 'metrics.jsonl'}; "
          f"plot: {plot_run(cfg.finetune.run_dir)}")


def _questions(cfg: RunConfig, args: argparse.Namespace) -> list:
    from realm_lm.corpus.questions import load_questions, read_qa_file

    questions = read_qa_file(args.questions) if args.questions else load_questions(cfg.eval.squad, args.split)
    return questions[:args.limit] if args.limit else questions


def cmd_eval_qa(args: argparse.Namespace) -> None:
    from realm_lm.answer import Answerer
    from realm_lm.eval.qa import evaluate_qa
    from realm_lm.runtime import resolve_precision

    cfg = _answering_config(args)
    answerer = Answerer.from_run(args.from_run, cfg)
    questions = _questions(cfg, args)
    compile_s = _compile_reader(answerer, f"{len(questions)} questions")
    name = Path(args.questions).stem if args.questions else args.split
    out = Path(args.predictions or Path(args.from_run) / f"predictions-{name}.jsonl")
    regex = args.regex or cfg.eval.regex_answers
    result = evaluate_qa(answerer, questions, out, regex=regex)
    recall_keys = [k for k in result if k.startswith("recall@")]
    print(markdown_table(["questions", "EM", "F1", *recall_keys, "questions/s"],
                         [[result["n_questions"], f"{result['em']:.1f}", f"{result['f1']:.1f}",
                           *[f"{result[k]:.3f}" for k in recall_keys], f"{result['questions_per_s']:.1f}"]]))
    # the figures with what they were measured on, so that a result can be recorded without re-scoring predictions
    # named after the predictions they score, so that two evaluations written to one folder keep their own figures
    metrics = Path(args.json or out.with_name(f"{out.stem}.metrics.json" if args.predictions
                                              else f"metrics-{name}.json"))
    write_json_atomic(metrics, {
        **result, "run": str(args.from_run), "questions": args.questions or f"open-squad {args.split}",
        "limit": args.limit, "top_k": answerer.top_k, "retriever": "realm" if answerer.dense else "bm25",
        "precision": resolve_precision(answerer.reader.device, answerer.precision), "int8": cfg.reader.int8,
        "compiled": compile_s is not None, "compile_s": compile_s,
        "regex": regex, "corpus": cfg.corpus.store, "predictions": str(out), **machine_figures()})
    print(f"predictions: {out}\nmetrics: {metrics}")


def _compile_reader(answerer, what: str) -> float | None:
    """With reader.compile, the answerer's reader compiled (saying so on stderr) before it answers ``what``; the
    seconds it took, or None when it is not compiled."""
    if not answerer.reader_cfg.compile:
        return None
    print(f"compiling the reader for {what} (reader.compile) ...", file=sys.stderr, flush=True)
    t0 = time.perf_counter()
    why_not = answerer.compile()
    if why_not:
        print(f"the reader is not compiled ({why_not}); it answers as it is", file=sys.stderr)
        return None
    seconds = round(time.perf_counter() - t0, 1)
    print(f"compiled in {seconds:.0f} s", file=sys.stderr)
    return seconds


def cmd_ask(args: argparse.Namespace) -> None:
    from realm_lm.answer import Answerer
    from realm_lm.report import print_answers

    cfg = _answering_config(args)
    answerer = Answerer.from_run(args.from_run, cfg)
    show = (lambda r: print(json.dumps(r.to_json(), ensure_ascii=False))) if args.json else print_answers
    if args.question:
        for response in answerer.answer(args.question, k=args.k, top_n=args.n):
            show(response)
        return
    # no question given: one per line from stdin, answered as it comes, so the model loads once for many
    from realm_lm.retrieval import BadQuestionError

    if sys.stdin.isatty():
        print("one question a line; an empty line or Ctrl-D ends", file=sys.stderr)
    refused = []
    for number, line in enumerate(_stdin_lines(sys.stdin.isatty()), 1):
        if not line.strip():
            if sys.stdin.isatty():
                break
            continue
        try:
            [response] = answerer.answer([line.strip()], k=args.k, top_n=args.n)
        except BadQuestionError as err:
            print(f"error: line {number}: {err}", file=sys.stderr)
            refused.append(number)
            continue
        show(response)
        sys.stdout.flush()
    if refused:
        raise BadQuestionError(f"{len(refused)} question(s) refused, on line(s) {', '.join(map(str, refused[:20]))}")


def _stdin_lines(prompt: bool):
    """Lines of stdin without their newline; with a prompt (and line editing) when a person types them."""
    if not prompt:
        yield from (line.rstrip("\n") for line in sys.stdin)
        return
    while True:
        try:
            yield input("question> ")
        except EOFError:
            print(file=sys.stderr)
            return


class PortUnavailableError(RealmError, OSError):
    """`realm serve` cannot listen where it was asked to."""


def cmd_serve(args: argparse.Namespace) -> None:
    import socket

    # the address first: a port in use is said at once, not after the model has loaded, and --port 0 takes a free one
    listener = socket.socket(socket.AF_INET6 if ":" in args.host else socket.AF_INET)
    listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        listener.bind((args.host, args.port))
    except OSError as err:
        listener.close()
        raise PortUnavailableError(f"cannot listen on {args.host}:{args.port} ({err.strerror}); "
                                   "choose another with --port (0: any free one)") from None
    import uvicorn

    from realm_lm.answer import Answerer
    from realm_lm.serve.app import create_app

    cfg = _answering_config(args)
    answerer = Answerer.from_run(args.from_run, cfg)
    _compile_reader(answerer, "serving")
    app = create_app(answerer, {"run": str(args.from_run), "corpus": cfg.corpus.store})
    print(f"answering from {args.from_run} over {cfg.corpus.store} ({len(answerer.store)} blocks) at "
          f"http://{args.host}:{listener.getsockname()[1]}: POST /ask, GET /health, docs at /docs", flush=True)
    uvicorn.Server(uvicorn.Config(app, log_level="info")).run(sockets=[listener])


def cmd_plot(args: argparse.Namespace) -> None:
    from realm_lm.plot import plot_run
    print(plot_run(args.run_dir, args.out))


def cmd_demo(args: argparse.Namespace) -> None:
    from realm_lm.demo import run_demo
    cfg = _config(args)
    pretrain_cfg = load_config(args.pretrain_config) if args.pretrain_config else None
    finetune_cfg = load_config(args.finetune_config) if args.finetune_config else None
    run_demo(cfg, pretrain_cfg, finetune_cfg)


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", help=f"TOML preset (default {DEFAULT_CONFIG} when it exists)")
    p.add_argument("--set", action="append", metavar="SECTION.KEY=VALUE",
                   help="override one config value, e.g. --set index.backend=faiss-hnsw (repeatable)")


def _from(p: argparse.ArgumentParser, corpus: str) -> None:
    p.add_argument("--from", dest="from_run", metavar="RUN_DIR",
                   help=f"use the retriever of a training run; its index of {corpus} lives in "
                        "RUN_DIR/eval-index-<corpus hash>, built on first use and again once the run has trained "
                        "further")


def _question_choice(p: argparse.ArgumentParser) -> None:
    """`eval retrieval`, `eval qa`: which questions, and how their answers match."""
    p.add_argument("--split", choices=["train", "dev", "test"], default="dev")
    p.add_argument("--questions", help="a SQuAD JSON or JSONL {question, answers} file instead of an Open-SQuAD split")
    p.add_argument("--limit", type=int_in(0), default=0, help="only the first N questions (0: all)")
    p.add_argument("--regex", action="store_true", help="gold answers are regular expressions (CuratedTrec)")


def _corpus(p: argparse.ArgumentParser) -> None:
    p.add_argument("--corpus", metavar="STORE", help="another corpus store (`realm corpus build`): same model, "
                                                      "its own index (a re-embedding, no retraining)")


def _resume_or_overwrite(p: argparse.ArgumentParser) -> None:
    """`ict`, `pretrain`, `finetune`: what to do with a run already in the run folder (see _check_run_folder)."""
    p.add_argument("--resume", action="store_true", help="continue from the run's latest checkpoint")
    p.add_argument("--overwrite", action="store_true",
                   help="start afresh in a run folder that holds a run (its checkpoints and metrics are replaced)")


def _from_finetuned(p: argparse.ArgumentParser) -> None:
    p.add_argument("--from", dest="from_run", metavar="RUN_DIR", required=True, help="a `realm finetune` run")
    p.add_argument("--corpus", metavar="STORE", help="another corpus store (`realm corpus build`): same model, its "
                                                      "own index (a re-embedding, no retraining); default: the corpus "
                                                      "the run was fine-tuned on")


def installed_version() -> str:
    """The installed package's version; a source tree run with src/ on PYTHONPATH (a rented GPU, say) has none."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("realm-lm")
    except PackageNotFoundError:
        return "(not installed: run from a source tree)"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="realm", description="REALM: retrieval-augmented language model pre-training")
    parser.add_argument("--version", action="version", version=f"realm-lm {installed_version()}")
    verbs = parser.add_subparsers(dest="verb", required=True)

    data = verbs.add_parser("data", help="obtain the default data").add_subparsers(dest="action", required=True)
    p = data.add_parser("fetch", help="place SQuAD v1.1 dev and the vital-article extracts in the data folder (sha256 checked)")
    _common(p)
    p.add_argument("--dest", help="target folder (default: data.dir of the config)")
    p.set_defaults(func=cmd_data_fetch)

    corpus = verbs.add_parser("corpus", help="corpus store").add_subparsers(dest="action", required=True)
    p = corpus.add_parser("build", help="cut the input documents into blocks and write the corpus store")
    _common(p)
    p.set_defaults(func=cmd_corpus_build)

    index = verbs.add_parser("index", help="MIPS index").add_subparsers(dest="action", required=True)
    p = index.add_parser("build", help="embed every block and publish a new index version")
    _common(p)
    p.add_argument("--retriever", choices=["realm", "minilm-mean"], default="realm")
    _from(p, "the corpus (a fine-tuning run's: the one it was fine-tuned on, unless --corpus)")
    _corpus(p)
    p.set_defaults(func=cmd_index_build)

    p = verbs.add_parser("retrieve", help="print the top-k blocks for a question")
    _common(p)
    p.add_argument("question")
    p.add_argument("-k", type=int_in(1), default=5)
    p.add_argument("--retriever", choices=["realm", "minilm-mean", "bm25"], default="realm")
    _from(p, "the corpus (a fine-tuning run's: the one it was fine-tuned on, unless --corpus)")
    _corpus(p)
    p.set_defaults(func=cmd_retrieve)

    ev = verbs.add_parser("eval", help="evaluation").add_subparsers(dest="action", required=True)
    p = ev.add_parser("retrieval", help="recall@k on the Open-SQuAD questions of a split, or a file's")
    _common(p)
    _question_choice(p)
    p.add_argument("--retriever", choices=["realm", "minilm-mean", "bm25"], default="realm")
    p.add_argument("--json", help="also write the figures as flat JSON to this file")
    _from(p, "the preset's corpus, which the questions are asked of")
    p.set_defaults(func=cmd_eval_retrieval)
    p = ev.add_parser("qa", help="exact match, F1 and recall@k of a fine-tuned run; writes a predictions JSONL")
    _common(p)
    _question_choice(p)
    p.add_argument("--predictions", help="predictions JSONL (default RUN_DIR/predictions-<split>.jsonl)")
    p.add_argument("--json", help="metrics JSON (default: metrics-<split>.json beside the default predictions, "
                   "PRED.metrics.json beside --predictions PRED.jsonl)")
    _from_finetuned(p)
    p.set_defaults(func=cmd_eval_qa)

    p = verbs.add_parser("ict", help="Inverse Cloze Task warm start of the retriever")
    _common(p)
    _resume_or_overwrite(p)
    p.set_defaults(func=cmd_ict)

    p = verbs.add_parser("pretrain", help="REALM pre-training with asynchronous index refresh")
    _common(p)
    _resume_or_overwrite(p)
    p.set_defaults(func=cmd_pretrain)

    p = verbs.add_parser("finetune", help="open-domain QA fine-tuning: query tower + span reader over a fixed index")
    _common(p)
    p.add_argument("--from", dest="from_run", metavar="RUN_DIR",
                   help="start from a pre-training (retriever + encoder), ICT (retriever) or fine-tuning run; "
                        "'' = MiniLM (default: finetune.init_from)")
    p.add_argument("--retriever", choices=FINETUNE_RETRIEVERS, help="default: finetune.retriever")
    p.add_argument("--questions", help="a SQuAD JSON or JSONL {question, answers} file to train on (default: "
                                       "finetune.questions, else the Open-SQuAD train split)")
    p.add_argument("--regex", action="store_true",
                   help="gold answers are regular expressions (CuratedTrec; default: eval.regex_answers)")
    _resume_or_overwrite(p)
    p.set_defaults(func=cmd_finetune)
    p = verbs.add_parser("ask", help="answer questions with a fine-tuned run, showing the evidence")
    _common(p)
    p.add_argument("question", nargs="*", help="none: read questions from stdin, one a line")
    p.add_argument("-k", type=int_in(1, MAX_BLOCKS_READ), default=None,
                   help="blocks read per question (default reader.top_k)")
    p.add_argument("-n", type=int_in(1, MAX_ANSWERS), default=3, help="answers shown per question")
    p.add_argument("--json", action="store_true", help="one JSON object a question (the schema of `realm serve`)")
    _from_finetuned(p)
    p.set_defaults(func=cmd_ask)
    p = verbs.add_parser("serve", help="answer questions with a fine-tuned run over HTTP (POST /ask, GET /health)")
    _common(p)
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (0.0.0.0: every interface)")
    p.add_argument("--port", type=int_in(0, 65535), default=8000, help="0: any free port (the one taken is printed)")
    _from_finetuned(p)
    p.set_defaults(func=cmd_serve)
    p = verbs.add_parser("plot", help="PNG of a run's metrics (loss, accuracy, retrieval utility, staleness)")
    p.add_argument("run_dir")
    p.add_argument("--out", help="PNG path (default RUN_DIR/metrics.png)")
    p.set_defaults(func=cmd_plot)

    p = verbs.add_parser("demo", help="the main job on the default data: fetch, corpus, index, evaluation, examples, "
                                      "ICT and REALM pre-training, QA fine-tuning and answers with evidence")
    _common(p)
    p.add_argument("--pretrain-config", default="configs/demo_pretrain.toml",
                   help="preset of the pre-training stage ('' to skip it)")
    p.add_argument("--finetune-config", default="configs/demo_finetune.toml",
                   help="[reader] and [finetune] of the QA stage, run on the main config's corpus ('' to skip it)")
    p.set_defaults(func=cmd_demo)
    return parser


def _sigterm_is_ctrl_c(signum, frame) -> None:
    raise KeyboardInterrupt  # a scheduler's SIGTERM stops a command the way Ctrl-C does: what is done is kept


def main(argv: list[str] | None = None) -> int:
    import signal

    args = build_parser().parse_args(argv)
    t0 = time.perf_counter()
    in_main_thread = threading.current_thread() is threading.main_thread()  # where Python runs signal handlers
    previous = signal.signal(signal.SIGTERM, _sigterm_is_ctrl_c) if in_main_thread else None
    try:
        args.func(args)
    except (RealmError, FileNotFoundError) as err:  # what the user can act on: the message, no traceback
        print(f"error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        from realm_lm.train import distributed

        if distributed.is_main():  # under torchrun, once (rank 0), not once a rank
            print("interrupted", file=sys.stderr)
        return 130
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)
    if args.verb == "demo":
        print(f"\n(done in {time.perf_counter() - t0:.0f}s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
