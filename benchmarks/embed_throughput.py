"""Corpus-embedding throughput: ours vs Hugging Face's RealmEmbedder (bench_hf_realm.py --parts a), one run.

    .venv/bin/python benchmarks/embed_throughput.py [--num-docs 2048] [--hf-python PATH]

1. synthetic reference configuration (hidden 256, 4 layers, 4 heads, FFN 1024, random weights, 288-token
   blocks, 2 threads): the reference, then ours on the same work, sequentially, with the ratio;
2. the same model over the real corpus store (blocks of real length; we pay for no padding), vs the reference;
3. the real model (all-MiniLM-L6-v2 + projection) over the whole real corpus: what `realm index build` costs.
All of the above in fp32, the reference's precision; on a CPU that multiplies bf16 in silicon (AMX or AVX512-BF16),
ours again under bf16 autocast (what runtime.precision = "auto" runs there), reported apart.
MFU uses the fp32 matmul peak measured by cpu_peak.py in the same run and the FLOP formula of
../shared/bench/hf_realm/README.md (F_emb(L) per block, at each block's real length).
Writes benchmarks/results/NAME.json (--name, default embed_throughput).
"""

import argparse
import sys
import time

import numpy as np
import torch
from transformers import BertConfig, BertModel

from realm_lm.config import IndexConfig, load_config
from realm_lm.corpus.store import CorpusStore
from realm_lm.index.build import embed_rows
from realm_lm.models.cpu_dropout import ATTENTION
from realm_lm.models.embedder import Embedder, build_retriever
from realm_lm.report import markdown_table, write_results
from realm_lm.runtime import autocast, cpu_bf16_instructions

from hf_reference import HF_BENCH, HF_PYTHON, cpu_peak_gflops, run_json


def f_emb(L: np.ndarray, H: int, I: int, N: int, P: int) -> np.ndarray:
    """Forward FLOPs of one embedder pass over a block of length L (the reference README's formula)."""
    L = L.astype(np.float64)
    return N * (L * 2 * (4 * H * H + 2 * H * I) + 4 * L * L * H) + 2 * H * H + 2 * H * P


def timed_embed(embedder: Embedder, tokens: np.ndarray, lengths: np.ndarray, batch_tokens: int, desc: str,
                precision: str = "fp32") -> float:
    """Blocks per second over all rows, after one warm-up batch, in ``precision`` (fp32, or bf16 autocast)."""
    with autocast(torch.device("cpu"), precision):
        embed_rows(embedder, tokens[:64], lengths[:64], batch_tokens, progress=False)
        t0 = time.perf_counter()
        embed_rows(embedder, tokens, lengths, batch_tokens, desc=f"{desc}, {precision}")
        return len(lengths) / (time.perf_counter() - t0)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--num-docs", type=int, default=2048)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--batch-tokens", type=int, default=IndexConfig().embed_batch_tokens)
    parser.add_argument("--hf-python", default=str(HF_PYTHON), help="python of the reference venv (its setup.sh)")
    parser.add_argument("--config", default="configs/open_squad.toml")
    parser.add_argument("--skip-minilm", action="store_true")
    parser.add_argument("--name", default="embed_throughput", help="results file: benchmarks/results/NAME.json")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    from transformers.utils import logging
    logging.set_verbosity_error()  # MiniLM's unused pooler weights are expected
    H, I, N, P, V, L = 256, 1024, 4, 128, 30522, 288

    peak_gflops = cpu_peak_gflops(sys.executable, args.threads)
    print(f"fp32 matmul peak, {args.threads} threads: {peak_gflops:.1f} GFLOP/s", flush=True)

    ref = run_json([args.hf_python, str(HF_BENCH / "bench_hf_realm.py"), "--parts", "a", "--num-docs",
                    str(args.num_docs), "--threads", str(args.threads), "--quiet"])["embed"]
    ref_dps = ref["docs_per_s_median"]
    print(f"reference (HF RealmEmbedder, batch {ref['batch_size']}): {ref_dps:.1f} docs/s", flush=True)

    torch.manual_seed(0)
    bert = BertModel(BertConfig(vocab_size=V, hidden_size=H, num_hidden_layers=N, num_attention_heads=H // 64,
                                intermediate_size=I, max_position_embeddings=512, attn_implementation=ATTENTION),
                     add_pooling_layer=False)
    synthetic = Embedder(bert, "cls-proj", P).eval()
    gen = torch.Generator().manual_seed(0)
    docs = torch.randint(5, V, (args.num_docs, L), generator=gen, dtype=torch.int32).numpy()
    docs[:, 0], docs[:, -1] = 101, 102
    ours_syn = timed_embed(synthetic, docs, np.full(args.num_docs, L), args.batch_tokens, "synthetic 288-token")

    cfg = load_config(args.config)
    store = CorpusStore(cfg.corpus.store)
    lengths = store.lengths
    ours_real = timed_embed(synthetic, store.tokens, lengths, args.batch_tokens, "real corpus, ref. config")
    flop_real = float(f_emb(lengths, H, I, N, P).mean())
    flop_288 = float(f_emb(np.array([L]), H, I, N, P)[0])

    rows = [
        ["reference, synthetic 288-token", f"{ref_dps:.1f}", "1.00", f"{ref_dps * flop_288 / 1e9:.1f}", f"{ref_dps * flop_288 / 1e9 / peak_gflops:.1%}"],
        ["ours, synthetic 288-token", f"{ours_syn:.1f}", f"{ours_syn / ref_dps:.2f}", f"{ours_syn * flop_288 / 1e9:.1f}", f"{ours_syn * flop_288 / 1e9 / peak_gflops:.1%}"],
        [f"ours, real corpus ({len(store)} blocks, mean {lengths.mean():.0f} tok)", f"{ours_real:.1f}", f"{ours_real / ref_dps:.2f}",
         f"{ours_real * flop_real / 1e9:.1f}", f"{ours_real * flop_real / 1e9 / peak_gflops:.1%}"],
    ]
    figures = {
        "peak_gflops": round(peak_gflops, 1), "num_docs": args.num_docs, "batch_tokens": args.batch_tokens,
        "reference.docs_per_s": round(ref_dps, 2), "reference.batch_size": ref["batch_size"],
        "synthetic.docs_per_s": round(ours_syn, 2), "synthetic.ratio": round(ours_syn / ref_dps, 3),
        "synthetic.mfu": round(ours_syn * flop_288 / 1e9 / peak_gflops, 4),
        "real_refconfig.blocks_per_s": round(ours_real, 2), "real_refconfig.ratio": round(ours_real / ref_dps, 3),
        "real_refconfig.mfu": round(ours_real * flop_real / 1e9 / peak_gflops, 4),
        "corpus.blocks": len(store), "corpus.mean_len": round(float(lengths.mean()), 1),
    }
    if not args.skip_minilm:
        minilm = build_retriever(cfg.embedder).doc
        mcfg = minilm.bert.config
        ours_minilm = timed_embed(minilm, store.tokens, lengths, args.batch_tokens, "real corpus, MiniLM")
        flop_m = float(f_emb(lengths, mcfg.hidden_size, mcfg.intermediate_size, mcfg.num_hidden_layers, P).mean())
        rows.append(["ours, real corpus, all-MiniLM-L6-v2 (384 x 6)", f"{ours_minilm:.1f}", "",
                     f"{ours_minilm * flop_m / 1e9:.1f}", f"{ours_minilm * flop_m / 1e9 / peak_gflops:.1%}"])
        figures.update({"real_minilm.blocks_per_s": round(ours_minilm, 2),
                        "real_minilm.mfu": round(ours_minilm * flop_m / 1e9 / peak_gflops, 4),
                        "real_minilm.corpus_s": round(len(store) / ours_minilm, 1)})
    if bf16_silicon := cpu_bf16_instructions():  # what runtime.precision = "auto" runs on this CPU
        works = [("synthetic", synthetic, docs, np.full(args.num_docs, L), ref_dps, "synthetic 288-token"),
                 ("real_refconfig", synthetic, store.tokens, lengths, ref_dps, "real corpus, ref. config")]
        if not args.skip_minilm:
            works.append(("real_minilm", minilm, store.tokens, lengths, None, "real corpus, MiniLM"))
        for key, embedder, tokens, lens, ref_rate, desc in works:
            rate = timed_embed(embedder, tokens, lens, args.batch_tokens, desc, "bf16")
            ratio = f"{rate / ref_rate:.2f}" if ref_rate else ""
            rows.append([f"ours, {desc}, bf16 autocast ({bf16_silicon})", f"{rate:.1f}", ratio, "", ""])
            figures[f"{key}_bf16.blocks_per_s"] = round(rate, 2)
            figures[f"{key}_bf16.seconds"] = round(len(lens) / rate, 1)
            if ref_rate:
                figures[f"{key}_bf16.ratio"] = round(rate / ref_rate, 3)
    print(markdown_table(["run", "blocks/s", "vs reference", "GFLOP/s", "MFU"], rows))
    print(f"\nwrote {write_results(args.name, figures)}")


if __name__ == "__main__":
    main()
