"""The step loop that ICT, pre-training and fine-tuning share: progress bar, metrics log, checkpoints."""

from __future__ import annotations

import contextlib
import json
import signal
import sys
import threading
import time
from typing import Any, Callable, Iterator, Protocol

import torch
from tqdm import tqdm

from realm_lm.train import distributed


class Recipe(Protocol):
    run_dir: Any
    step: int

    def train_step(self) -> dict[str, Any]: ...  # one optimizer step; metrics already averaged over ranks

    def save(self) -> Any: ...  # returns the checkpoint folder


@contextlib.contextmanager
def stop_between_steps() -> Iterator[Callable[[], bool]]:
    """The first Ctrl-C (SIGINT) or SIGTERM lets the step under way finish and then stops the loop, so the
    checkpoint saved holds whole weights and optimizer state; a second one stops at once. Under torchrun the
    launcher passes either signal on to every rank, each at its own moment, so the ranks agree after every step
    (one all-reduce of a flag) and all stop after the same one. Yields the function that every rank calls once a
    step: whether to stop now."""
    requested: list[int] = []
    if threading.current_thread() is not threading.main_thread():  # Python runs signal handlers in the main thread
        yield lambda: distributed.any_rank(False)
        return
    previous = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM)}

    def ask_to_stop(signum, frame) -> None:
        requested.append(signum)
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        if distributed.is_main():
            name = "Ctrl-C" if signum == signal.SIGINT else signal.Signals(signum).name
            print(f"\n{name}: stopping after this step, with a checkpoint (again: stop at once)", file=sys.stderr)

    for sig in previous:
        signal.signal(sig, ask_to_stop)
    try:
        yield lambda: distributed.any_rank(bool(requested))
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def run_steps(recipe: Recipe, total: int, save_every: int, desc: str,
              postfix: Callable[[dict[str, Any]], dict[str, str]], end: int | None = None,
              progress: bool = True) -> list[dict[str, Any]]:
    """Step ``recipe`` from its ``step`` to ``end`` (default ``total``). Rank 0 appends every step's metrics to
    RUN_DIR/metrics.jsonl as it goes (a kill loses nothing logged) and saves a checkpoint every ``save_every``
    steps and at ``total``. Ctrl-C or SIGTERM saves one after the step under way and raises KeyboardInterrupt.
    Returns the metrics of the steps run."""
    history = []
    t_start = time.perf_counter()
    main_rank = distributed.is_main()
    end = total if end is None else min(end, total)
    log = open(recipe.run_dir / "metrics.jsonl", "a") if main_rank else None
    try:
        with tqdm(total=total, initial=recipe.step, desc=desc, unit="step",
                  disable=not (progress and main_rank)) as bar, stop_between_steps() as should_stop:
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
                stopping = should_stop()  # every rank, every step: they must stop after the same one
                saved = None
                if main_rank and (recipe.step % save_every == 0 or recipe.step == total or stopping):
                    saved = recipe.save()
                if stopping:
                    bar.close()
                    distributed.barrier()  # the ranks leave together, once rank 0 has saved
                    if main_rank:
                        print(f"stopped at step {recipe.step} with checkpoint {saved}: --resume continues",
                              file=sys.stderr)
                    raise KeyboardInterrupt
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
