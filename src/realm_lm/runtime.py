"""Process-wide settings made once at start-up (thread count, quiet library logging) and where the tensors live:
the device and the numeric precision of the models' forward passes."""

from __future__ import annotations

import contextlib
import os

import torch

from realm_lm.config import RunConfig, RuntimeConfig

PRECISIONS = ("fp32", "bf16")


def setup_runtime(cfg: RunConfig) -> None:
    torch.set_num_threads(cfg.runtime.threads or default_threads())
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")  # we fork index builders; keep tokenizers quiet
    from transformers.utils import logging

    logging.set_verbosity_error()  # "weights not used: pooler.*" is expected: REALM projects [CLS] itself


def default_threads() -> int:
    """This machine's cores, shared among the processes torchrun started on it (else they would oversubscribe)."""
    return max(1, (os.cpu_count() or 1) // int(os.environ.get("LOCAL_WORLD_SIZE", "1")))


def resolve_device(runtime: RuntimeConfig) -> torch.device:
    """``runtime.device`` as a torch device; "auto" is the first GPU when torch sees one, else the CPU."""
    if runtime.device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(runtime.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise RuntimeError(f"runtime.device = {runtime.device!r} but torch sees no GPU "
                           f"(torch {torch.__version__}); use \"auto\" or \"cpu\"")
    return device


def autocast(device: torch.device, precision: str) -> contextlib.AbstractContextManager:
    """The forward passes' precision: fp32 as is, or bf16 autocast (weights and optimizer stay fp32)."""
    if precision not in PRECISIONS:
        raise ValueError(f"runtime.precision must be one of {PRECISIONS}, not {precision!r}")
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=precision == "bf16")
