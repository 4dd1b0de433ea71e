"""The step loop that ICT, pre-training and fine-tuning share: progress bar, metrics log, checkpoints."""

from __future__ import annotations

import json
import time
from typing import Any, Callable, Protocol

import torch
from tqdm import tqdm

from realm_lm.train import distributed


class Recipe(Protocol):
    run_dir: Any
    step: int

    def train_step(self) -> dict[str, Any]: ...  # one optimizer step; metrics already averaged over ranks

    def save(self) -> Any: ...


def run_steps(recipe: Recipe, total: int, save_every: int, desc: str,
              postfix: Callable[[dict[str, Any]], dict[str, str]], end: int | None = None,
              progress: bool = True) -> list[dict[str, Any]]:
    """Step ``recipe`` from its ``step`` to ``end`` (default ``total``). Rank 0 appends every step's metrics to
    RUN_DIR/metrics.jsonl as it goes (a kill loses nothing logged) and saves a checkpoint every ``save_every``
    steps and at ``total``. Returns the metrics of the steps run."""
    history = []
    t_start = time.perf_counter()
    main_rank = distributed.is_main()
    end = total if end is None else min(end, total)
    log = open(recipe.run_dir / "metrics.jsonl", "a") if main_rank else None
    try:
        with tqdm(total=total, initial=recipe.step, desc=desc, unit="step",
                  disable=not (progress and main_rank)) as bar:
            while recipe.step < end:
                metrics = recipe.train_step()
                recipe.step += 1
                metrics |= {"step": recipe.step, "wall_s": round(time.perf_counter() - t_start, 2)}
                history.append(metrics)
                if log is not None:
                    log.write(json.dumps(metrics) + "\n")
                    log.flush()
                bar.set_postfix(postfix(metrics))
                bar.update(1)
                if main_rank and (recipe.step % save_every == 0 or recipe.step == total):
                    recipe.save()
    finally:
        if log is not None:
            log.close()
    return history


def clip_each_group(opt: torch.optim.Optimizer, max_norm: float) -> None:
    """Clip each parameter group's gradient norm on its own (pre-training, fine-tuning). With one global norm the
    group with the largest gradient sets the clipping factor for all: in joint QA fine-tuning the query tower's
    (about 5x the reader's) shrank the reader's steps, and (d) read at 4.8 and 10.3 test EM (seeds 0, 1) against
    12.2, 11.5 and 10.3 with this (seeds 0-2, the [CLS] tower; benchmarks/openqa_quality.py)."""
    for group in opt.param_groups:
        torch.nn.utils.clip_grad_norm_(group["params"], max_norm)
