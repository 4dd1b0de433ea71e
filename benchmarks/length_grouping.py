"""Rows of similar length run together (models/by_length.py) against one call padded to the longest, one run.

    .venv/bin/python benchmarks/length_grouping.py [--questions 96] [--repeats 2] [--precision fp32|bf16|auto]
        [--name NAME]

The real corpus and dev questions of configs/open_squad.toml, each question's BM25 blocks (so no trained run is
needed; the cost does not depend on the weights), the MiniLM reader as loaded, in eval mode, fp32 (or bf16
autocast: --precision), 2 threads: answering's reader, each question's 5 blocks, `reader.batch_questions` = 1 and
8 questions per forward. (Training is not grouped: see models/by_length.py. Session 54's run of this benchmark also
timed a grouped fine-tuning step.) Each is timed grouped and as one padded call (the same Reader,
`encode_by_length` swapped for one BERT call), alternating, ``--repeats`` times; medians. The padding each way is
counted too. Writes benchmarks/results/NAME.json (--name, default length_grouping).
"""

import argparse
import time

import numpy as np
import torch

import realm_lm.models.reader as reader_module
from realm_lm.config import load_config
from realm_lm.corpus.questions import load_questions
from realm_lm.corpus.store import CorpusStore
from realm_lm.models.by_length import MIN_GROUP_ROWS, encode_by_length, length_groups
from realm_lm.models.embedder import load_bert
from realm_lm.models.pretrained import SpecialIds, load_tokenizer, resolve_model_dir
from realm_lm.models.reader import Reader
from realm_lm.report import markdown_table, write_results
from realm_lm.retrieval import Bm25Searcher
from realm_lm.runtime import autocast, resolve_precision
from realm_lm.train.data import question_ids, reader_batch


def one_call(bert, input_ids, attention_mask, token_type_ids):
    return bert(input_ids=input_ids, attention_mask=attention_mask, token_type_ids=token_type_ids).last_hidden_state


def padded_tokens(batches, grouped: bool) -> int:
    total = 0
    for b in batches:
        lengths = b.attention_mask.sum(1).numpy()
        if not grouped or len(lengths) < 2 * MIN_GROUP_ROWS:  # encode_by_length makes one call there
            total += b.attention_mask.numel()
            continue
        total += sum(len(g) * int(lengths[g].max()) for g in length_groups(lengths))
    return total


def time_pass(reader: Reader, batches) -> float:
    t0 = time.perf_counter()
    for b in batches:
        reader(b.input_ids, b.attention_mask, b.token_type_ids, b.start_ok, b.end_ok)
    return time.perf_counter() - t0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--questions", type=int, default=96)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--precision", default="fp32", choices=["fp32", "bf16", "auto"],
                        help="the reader's forward passes: fp32, bf16 autocast, or what runtime.precision=auto picks")
    parser.add_argument("--name", default="length_grouping", help="results file: benchmarks/results/NAME.json")
    args = parser.parse_args()
    torch.set_num_threads(2)
    cfg = load_config("configs/open_squad.toml")
    store = CorpusStore(cfg.corpus.store)
    questions = [q.question for q in load_questions(cfg.eval.squad, "dev")[::10][:args.questions]]
    model_dir = resolve_model_dir(cfg.encoder.model)
    tok = load_tokenizer(model_dir)
    special = SpecialIds(tok)
    _, rows = Bm25Searcher(store).search(questions, 5)  # [Q, 5]
    asked = question_ids(tok, questions, special, cfg.reader.question_len)

    def batches(per: int, blocks: int):
        return [reader_batch(store, asked[s:s + per], rows[s:s + per, :blocks], tok, special, cfg.reader.max_len)
                for s in range(0, len(questions), per)]

    torch.manual_seed(0)
    reader = Reader(load_bert(model_dir), cfg.reader.span_hidden, cfg.reader.max_span_len)
    reader.eval()
    work = {"answer_read1": batches(1, 5), "answer_read8": batches(8, 5)}
    times = {f"{w}.{mode}": [] for w in work for mode in ("grouped", "one_call")}
    for _ in range(args.repeats):
        for w, bs in work.items():
            with torch.no_grad(), autocast(torch.device("cpu"), args.precision):
                for mode, encode in (("one_call", one_call), ("grouped", encode_by_length)):
                    reader_module.encode_by_length = encode
                    times[f"{w}.{mode}"].append(time_pass(reader, bs))
                    print(f"{w} {mode}: {times[f'{w}.{mode}'][-1]:.1f} s", flush=True)
    reader_module.encode_by_length = encode_by_length

    precision = resolve_precision(torch.device("cpu"), args.precision)
    figures, table = {"questions": len(questions), "precision": precision}, []
    for w, bs in work.items():
        real = sum(int(b.attention_mask.sum()) for b in bs)
        per = {mode: float(np.median(times[f"{w}.{mode}"])) for mode in ("one_call", "grouped")}
        pad = {mode: padded_tokens(bs, mode == "grouped") / real for mode in ("one_call", "grouped")}
        figures |= {f"{w}.{mode}.median_s": round(per[mode], 3) for mode in per}
        figures |= {f"{w}.{mode}.padded_over_real": round(pad[mode], 3) for mode in pad}
        figures[f"{w}.speedup"] = round(per["one_call"] / per["grouped"], 3)
        table.append([w, f"{len(questions) / per['one_call']:.2f} questions/s", f"{pad['one_call']:.2f}",
                      f"{len(questions) / per['grouped']:.2f} questions/s",
                      f"{pad['grouped']:.2f}", f"{per['one_call'] / per['grouped']:.2f}"])
    print(markdown_table([f"reader work ({precision})", "one padded call", "padded / real tokens", "grouped by length",
                          "padded / real tokens", "speed-up"], table))
    print(f"\nwrote {write_results(args.name, figures)}")


if __name__ == "__main__":
    main()
