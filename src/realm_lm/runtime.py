"""Process-wide settings made once at start-up: thread count and quiet library logging."""

from __future__ import annotations

import os

import torch

from realm_lm.config import RunConfig


def setup_runtime(cfg: RunConfig) -> None:
    torch.set_num_threads(cfg.runtime.threads or os.cpu_count() or 1)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")  # we fork index builders; keep tokenizers quiet
    from transformers.utils import logging

    logging.set_verbosity_error()  # "weights not used: pooler.*" is expected: REALM projects [CLS] itself
