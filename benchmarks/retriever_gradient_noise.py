"""How many masked queries a REALM step needs before its gradient is more signal than noise, at fixed weights.

    .venv/bin/python benchmarks/retriever_gradient_noise.py RUN [RUN ...] [--queries 256] [--name NAME]

RUN is an ICT run (where REALM pre-training starts) or a REALM pre-training run; its latest checkpoint is loaded
into the REALM model of configs/pretrain_cpu.toml (``--config``), with an index of the pre-training corpus built
by its document tower. Then the gradient of REALM's loss (salient masks, k candidates + the null block, training
mode as in `realm pretrain`, no clipping, no step taken) is taken one training query at a time, for ``--queries``
queries drawn at random. Per parameter group (the retriever's towers; the knowledge-augmented encoder with its
MLM head), from the per-query gradients g_i:

    tr(S)  = sum over parameters of the per-query variance of g_i
    |G|^2  = the squared norm of the expected gradient, estimated without bias as the mean dot product of the
             mean gradients of disjoint groups of queries (and its standard error over the group pairs)
    B      = tr(S) / |G|^2, the gradient noise scale (McCandlish et al. 2018, "An Empirical Model of Large-Batch
             Training"): at a batch of B queries the noise in a step's gradient is as large as the gradient.

A batch much smaller than B steps mostly on noise; the expected cosine between a batch-b gradient and G is about
1 / sqrt(1 + B / b). Writes benchmarks/results/NAME.json (default retriever_gradient_noise).
"""

import argparse
import itertools
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from realm_lm.config import load_config
from realm_lm.report import markdown_table, write_results
from realm_lm.runtime import setup_runtime

from pretrain_quality import recipe_at

GROUPS = 8  # disjoint query groups for the unbiased |G|^2


class GradientMoments:
    """Running sums of one parameter group's per-query gradients: GROUPS group sums and the squared norms."""

    def __init__(self, params: list[torch.nn.Parameter]):
        self.params = params
        n = sum(p.numel() for p in params)
        self.group_sums = torch.zeros(GROUPS, n, dtype=torch.float64)  # [GROUPS, P]
        self.group_counts = np.zeros(GROUPS, int)
        self.sq_norms: list[float] = []

    def add(self, query: int) -> None:
        g = torch.cat([(p.grad if p.grad is not None else torch.zeros_like(p)).reshape(-1) for p in self.params])
        g = g.double()  # [P]
        self.group_sums[query % GROUPS] += g
        self.group_counts[query % GROUPS] += 1
        self.sq_norms.append(float(g @ g))

    def summary(self) -> dict:
        n = len(self.sq_norms)
        mean = self.group_sums.sum(0) / n  # [P]
        trace = (sum(self.sq_norms) - n * float(mean @ mean)) / (n - 1)  # tr(S), per query
        means = self.group_sums / torch.from_numpy(self.group_counts)[:, None]  # [GROUPS, P]
        dots = [float(means[a] @ means[b]) for a, b in itertools.combinations(range(GROUPS), 2)]
        g2 = float(np.mean(dots))
        g2_se = float(np.std(dots, ddof=1) / np.sqrt(GROUPS / 2))  # GROUPS/2 independent pairs' worth
        half = GROUPS // 2
        a, b = means[:half].mean(0), means[half:].mean(0)
        cosine = float(a @ b / (a.norm() * b.norm()))
        return {"queries": n, "params": mean.numel(), "trace_var": trace, "g2": g2, "g2_se": g2_se,
                "noise_scale": trace / g2 if g2 > 0 else float("inf"), "mean_sq_norm": float(np.mean(self.sq_norms)),
                "half_cosine": cosine}


def measure(cfg, run: str, n_queries: int, seed: int, work: Path) -> dict:
    """Per-group gradient moments of REALM's loss at ``run``'s weights, over ``n_queries`` training queries."""
    with recipe_at(cfg, run, work / "run") as recipe:
        model = recipe.model
        groups = {"retriever": GradientMoments(list(model.retriever.parameters())),
                  "encoder": GradientMoments(list(model.encoder.parameters()))}
        rng = np.random.default_rng(seed)
        chosen = rng.choice(recipe.train_sentences, size=n_queries, replace=False)
        model.train()
        losses, t0 = [], time.perf_counter()
        for i, sentence in enumerate(tqdm(chosen, desc=f"gradients {run}", unit="query")):
            torch.manual_seed(seed * 1_000_003 + i)  # dropout
            batch = recipe.make_batch(np.array([sentence]), rng)
            if batch is None:  # nothing in it could be masked
                continue
            model.zero_grad(set_to_none=True)
            out = recipe.forward(batch)
            out["loss"].backward()
            for g in groups.values():
                g.add(i)
            losses.append(float(out["loss"].detach()))
        return {"run": run, "loss": float(np.mean(losses)), "seconds": round(time.perf_counter() - t0, 1),
                **{name: g.summary() for name, g in groups.items()}}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("runs", nargs="+", help="ICT or REALM pre-training run folders")
    parser.add_argument("--config", default="configs/pretrain_cpu.toml")
    parser.add_argument("--queries", type=int, default=256)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--set", action="append", default=[], help="override of the preset")
    parser.add_argument("--name", default="retriever_gradient_noise")
    args = parser.parse_args()
    cfg = load_config(args.config, args.set)
    setup_runtime(cfg)
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        for run in args.runs:
            results.append(measure(cfg, run, args.queries, args.seed, Path(tmp)))
    rows = []
    for r in results:
        for name in ("retriever", "encoder"):
            m = r[name]
            rows.append([r["run"], name, f"{r['loss']:.2f}", f"{m['trace_var']:.3g}",
                         f"{m['g2']:.3g} ± {m['g2_se']:.2g}", f"{m['noise_scale']:,.0f}", f"{m['half_cosine']:+.3f}"])
    print(f"\n{args.queries} training queries one at a time, k = {cfg.pretrain.top_k}, salient masks, "
          f"precision {cfg.runtime.precision}")
    print(markdown_table(["run", "parameters", "loss", "tr(S) per query", "G squared (± s.e.)", "noise scale B (queries)",
                          "cos(half, half)"], rows))
    figures = {"config": args.config, "overrides": args.set, "queries": args.queries, "seed": args.seed,
               "top_k": cfg.pretrain.top_k, "precision": cfg.runtime.precision, "runs": [r["run"] for r in results]}
    for r in results:  # flat keys: RUN.loss, RUN.retriever.noise_scale, ...
        figures |= {f"{r['run']}.{k}": v for k, v in r.items() if k not in ("run", "retriever", "encoder")}
        figures |= {f"{r['run']}.{name}.{k}": v for name in ("retriever", "encoder") for k, v in r[name].items()}
    print(f"\nwrote {write_results(args.name, figures)}")


if __name__ == "__main__":
    main()
