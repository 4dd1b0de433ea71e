"""Data-parallel training through torchrun / torch.distributed (gloo on CPU, nccl on GPU).

Each rank draws its own batch (seeded by step and rank), gradients are averaged with all-reduce, rank 0 alone
launches index builders, writes checkpoints and the metrics log; every rank swaps in new index versions from
the shared run folder. With one process (no torchrun) every helper is a no-op.
"""

from __future__ import annotations

import os

import torch
import torch.distributed as dist
from torch import nn


def init() -> None:
    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and not dist.is_initialized():
        if torch.cuda.is_available():  # one GPU per rank: "cuda" then means this rank's own
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")


def rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def world_size() -> int:
    return dist.get_world_size() if dist.is_initialized() else 1


def is_main() -> bool:
    return rank() == 0


def barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def average_gradients(model: nn.Module) -> None:
    """All-reduce every gradient into its mean over ranks (one flat buffer: one message per step)."""
    if not dist.is_initialized():
        return
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    flat = torch.cat([g.reshape(-1) for g in grads])
    dist.all_reduce(flat)
    flat /= world_size()
    offset = 0
    for g in grads:
        g.copy_(flat[offset:offset + g.numel()].view_as(g))
        offset += g.numel()


def mean_scalar(value: float) -> float:
    if not dist.is_initialized():
        return value
    t = torch.tensor([value], dtype=torch.float64)
    dist.all_reduce(t)
    return float(t) / world_size()
