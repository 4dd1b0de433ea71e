"""Two-process data-parallel pre-training through torchrun (gloo, CPU) on the tiny corpus."""

import json
import os
import subprocess
import sys

from realm_lm.config import load_config
from realm_lm.corpus.store import build_corpus

from conftest import ROOT, tiny_overrides


def test_torchrun_two_ranks(tmp_path):
    overrides = tiny_overrides(tmp_path, "pretrain.steps=3")
    build_corpus(load_config(ROOT / "configs" / "tiny.toml", overrides))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           "-m", "realm_lm.cli", "pretrain", "--config", str(ROOT / "configs" / "tiny.toml"),
           *[x for o in overrides for x in ("--set", o)]]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    result = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300, cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    lines = [json.loads(l) for l in (tmp_path / "pretrain" / "metrics.jsonl").read_text().splitlines()]
    assert [l["step"] for l in lines] == [1, 2, 3]  # one log, written by rank 0
    assert (tmp_path / "pretrain" / "checkpoints" / "LATEST").read_text() == "step_0000003"
