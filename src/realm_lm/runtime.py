"""Process-wide settings made once at start-up (thread count) and where the tensors live:
the device and the numeric precision of the models' forward passes."""

from __future__ import annotations

import contextlib
import functools
import os
import sys

import torch

from realm_lm.config import PRECISIONS, RunConfig, RuntimeConfig


def setup_runtime(cfg: RunConfig, announce: bool = False) -> None:
    torch.set_num_threads(cfg.runtime.threads or default_threads())
    from realm_lm.train import distributed

    if announce and distributed.is_main():  # one line on stderr (once under torchrun), so a person knows which
        # numeric path their numbers come from
        device = resolve_device(cfg.runtime)
        silicon = f", bf16 silicon: {cpu_bf16_instructions() or 'none'}" if device.type == "cpu" else ""
        print(f"runtime: {device}, {resolve_precision(device, cfg.runtime.precision)} "
              f"(precision = {cfg.runtime.precision}{silicon}), {torch.get_num_threads()} threads", file=sys.stderr)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")  # we fork index builders; keep tokenizers quiet


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


@functools.cache  # asked on every forward pass (autocast); the answer cannot change within a process
def cpu_bf16_instructions() -> str | None:
    """The instructions with which this CPU multiplies bfloat16 matrices in silicon: "amx_bf16" (Intel Sapphire
    Rapids and later), "avx512_bf16" (AMD Zen 4 and later, Intel Cooper Lake), or None. oneDNN uses either; without
    them bf16 is emulated and slower than fp32."""
    capabilities = torch.cpu.get_capabilities()
    return next((name for name in ("amx_bf16", "avx512_bf16") if capabilities.get(name, False)), None)


def resolve_precision(device: torch.device, precision: str) -> str:
    """``runtime.precision`` as "fp32" or "bf16". "auto" is bf16 where the hardware multiplies bfloat16 matrices in
    silicon (a GPU with bf16 support; a CPU with AMX or AVX512-BF16), else fp32."""
    if precision not in PRECISIONS:
        raise ValueError(f"runtime.precision must be one of {PRECISIONS}, not {precision!r}")
    if precision != "auto":
        return precision
    if device.type == "cuda":
        return "bf16" if torch.cuda.is_bf16_supported() else "fp32"
    if device.type == "cpu":
        return "bf16" if cpu_bf16_instructions() else "fp32"
    return "fp32"


def autocast(device: torch.device, precision: str) -> contextlib.AbstractContextManager:
    """The forward passes' precision: fp32 as is, or bf16 autocast (weights and optimizer stay fp32)."""
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=resolve_precision(device, precision) == "bf16")
