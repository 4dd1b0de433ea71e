"""Data-parallel training through torchrun / torch.distributed (gloo on CPU, nccl on GPU).

Each rank draws its own batch (seeded by step and rank), gradients are averaged with all-reduce, every rank embeds a
share of an index (index.build.build_index_on_ranks; the refresh's builders: index.refresher) and rank 0 alone publishes it,
writes checkpoints and the metrics log; every rank reads the index versions
from the shared run folder. ICT's in-batch negatives come from every rank (``gather_rows``). With one process
(no torchrun) every helper is a no-op.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager

import torch
import torch.distributed as dist
from torch import nn


def init() -> None:
    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and not dist.is_initialized():
        use_local_gpu()
        # on GPUs, CUDA tensors go over nccl and the CPU ones (metrics, the stop flag) over gloo: nccl has no CPU path
        dist.init_process_group("cpu:gloo,cuda:nccl" if torch.cuda.is_available() else "gloo")


def use_local_gpu() -> None:
    """One GPU per rank: "cuda" then means this rank's own (torchrun's LOCAL_RANK; also in the index builders a
    rank launches, which inherit its environment)."""
    if torch.cuda.is_available() and "LOCAL_RANK" in os.environ:
        torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))


@contextmanager
def process_group() -> Iterator[bool]:
    """The process group of one command under torchrun. The ranks leave together and the group is destroyed:
    a rank that exits while a peer still has gloo connections open can abort the peer ("terminate called
    without an active exception"). After an error, no barrier (the peer may never reach it). Yields whether
    this is rank 0."""
    init()
    try:
        yield is_main()
        barrier()
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def rank() -> int:
    """This process's rank; before the process group exists (or after it is gone), the one torchrun gave it."""
    return dist.get_rank() if dist.is_initialized() else int(os.environ.get("RANK", "0"))


def world_size() -> int:
    return dist.get_world_size() if dist.is_initialized() else 1


def is_main() -> bool:
    return rank() == 0


def barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def any_rank(flag: bool) -> bool:
    """Whether ``flag`` is true on any rank; every rank gets the same answer (one small message)."""
    return any_rank_each([flag])[0]


def any_rank_each(flags: list[bool]) -> list[bool]:
    """For each of ``flags``, whether it is true on any rank, in one small message."""
    if not dist.is_initialized():
        return list(flags)
    t = torch.tensor([int(f) for f in flags])
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return [bool(v) for v in t.tolist()]


def broadcast_parameters(model: nn.Module) -> None:
    """Every rank takes rank 0's weights (after an initialisation computed on each rank)."""
    if not dist.is_initialized():
        return
    for p in model.parameters():
        dist.broadcast(p.data, src=0)


def average_gradients(model: nn.Module) -> None:
    """All-reduce every gradient into its mean over ranks (one flat buffer: one message per step). A trainable
    parameter without a gradient on this rank (e.g. no question of its batch found an answer) counts as zero,
    so that every rank sends the same buffer and ends with the same weights."""
    if not dist.is_initialized():
        return
    params = [p for p in model.parameters() if p.requires_grad]
    for p in params:
        if p.grad is None:
            p.grad = torch.zeros_like(p)
    grads = [p.grad for p in params]
    flat = torch.cat([g.reshape(-1) for g in grads])
    dist.all_reduce(flat)
    flat /= world_size()
    offset = 0
    for g in grads:
        g.copy_(flat[offset:offset + g.numel()].view_as(g))
        offset += g.numel()


def mean_scalars(values: dict[str, float]) -> dict[str, float]:
    """Each value averaged over ranks, in one message."""
    if not dist.is_initialized():
        return values
    t = torch.tensor(list(values.values()), dtype=torch.float64)
    dist.all_reduce(t)
    return dict(zip(values, (t / world_size()).tolist()))


def gather_rows(x: torch.Tensor) -> torch.Tensor:
    """[B_r, D] on each rank -> [sum_r B_r, D], every rank's rows in rank order; only this rank's own rows keep
    their gradient. A loss computed alike on every rank over gathered rows thus gives each rank the exact
    gradient through its own rows; summed over ranks (average_gradients x world size) it is the whole gradient."""
    if not dist.is_initialized():
        return x
    sizes = [torch.zeros(1, dtype=torch.long, device=x.device) for _ in range(world_size())]
    dist.all_gather(sizes, torch.tensor([len(x)], device=x.device))
    sizes = [int(n) for n in sizes]
    padded = torch.zeros(max(sizes), *x.shape[1:], dtype=x.dtype, device=x.device)  # all_gather needs equal shapes
    padded[:len(x)] = x.detach()
    parts = [torch.empty_like(padded) for _ in sizes]
    dist.all_gather(parts, padded)
    parts = [part[:n] for part, n in zip(parts, sizes)]
    parts[rank()] = x
    return torch.cat(parts)
