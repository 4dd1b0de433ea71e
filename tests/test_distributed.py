"""Data-parallel training through torchrun / torch.distributed (gloo, CPU) on the tiny corpus."""

import json
import os
import subprocess
import sys

import torch

from realm_lm.config import load_config
from realm_lm.corpus.store import build_corpus

from conftest import ROOT, tiny_overrides


def test_torchrun_two_ranks(tmp_path):
    """Pre-training under torchrun; every index version is embedded in two shares and published by rank 0: the first
    one by the trainers themselves, each refresh (one after each step) by two builders, one launched by each rank."""
    overrides = tiny_overrides(tmp_path, "pretrain.steps=3", "refresh.mode=sync", "refresh.every=1")
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
    versions = sorted((tmp_path / "pretrain" / "index" / "versions").glob("v*"))
    assert [v.name for v in versions] == ["v000001", "v000002", "v000003"]  # step 0, then the refreshes at 1 and 2
    for version in versions:
        manifest = json.loads((version / "manifest.json").read_text())
        # each builder saved its share as a part; rank 0's took both (it embeds no block itself in the end)
        assert manifest["rows_from_parts"] == manifest["n_rows"] == 36 and manifest["rows_embedded"] == 0
    assert [json.loads((v / "manifest.json").read_text())["embedder_step"] for v in versions] == [0, 1, 2]
    assert not (tmp_path / "pretrain" / "index" / "unfinished").exists()
    rank0_log = (tmp_path / "pretrain" / "refresh" / "builder.log").read_text()
    rank1_log = (tmp_path / "pretrain" / "refresh" / "rank1" / "builder.log").read_text()
    assert rank0_log.count("published v0") == 2 and rank1_log.count("saved share 1 of 2") == 2


def test_torchrun_two_ranks_ict_and_finetune(tmp_path):
    """ICT (negatives from both ranks) and QA fine-tuning (rank 0 builds the index) under torchrun."""
    overrides = tiny_overrides(tmp_path, "reader.top_k=16")
    build_corpus(load_config(ROOT / "configs" / "tiny.toml", overrides))
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    late_rank_1 = tmp_path / "late_rank_1.py"  # `realm` whose rank 1 saves its share of an index late
    late_rank_1.write_text("import os, sys, time\n"
                           "from realm_lm import cli\n"
                           "from realm_lm.index import build\n"
                           "save = build.save_unfinished_part\n"
                           "def late(*args):\n"
                           "    time.sleep(3 if os.environ['RANK'] == '1' else 0)\n"
                           "    save(*args)\n"
                           "build.save_unfinished_part = late\n"
                           "sys.exit(cli.main())\n")
    for verb in ("ict", "finetune"):
        cli = ["-m", "realm_lm.cli"] if verb == "ict" else [str(late_rank_1)]
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
               *cli, verb, "--config", str(ROOT / "configs" / "tiny.toml"),
               *[x for o in overrides for x in ("--set", o)]]
        result = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300, cwd=tmp_path)
        assert result.returncode == 0, result.stderr[-3000:]
        lines = [json.loads(l) for l in (tmp_path / verb / "metrics.jsonl").read_text().splitlines()]
        assert [l["step"] for l in lines] == [1, 2, 3]  # one log, written by rank 0
        assert (tmp_path / verb / "checkpoints" / "LATEST").read_text() == "step_0000003"
    assert "after.ict_recall@1" in json.loads((tmp_path / "ict" / "ict_eval.json").read_text())
    # the fine-tuning run's own index: both ranks embedded a share (rank 0 alone would show 18 rows embedded), and
    # rank 0 waited for rank 1's
    from realm_lm.index.versioned import read_manifest
    [index_dir] = (tmp_path / "finetune").glob("eval-index-*")
    m = read_manifest(index_dir)
    assert m["rows_from_parts"] == m["n_rows"] and m["rows_embedded"] == 0


def test_sigterm_under_torchrun_stops_every_rank_after_the_same_step_with_a_checkpoint(tmp_path):
    """A scheduler's SIGTERM (or a Ctrl-C) reaches torchrun, which passes it on to each rank at its own moment: the
    ranks agree to stop after the same step, rank 0 saves it, and all leave before torchrun's 30 s grace ends."""
    import signal
    import time

    from realm_lm.train.checkpoint import latest_checkpoint

    overrides = tiny_overrides(tmp_path, "ict.steps=400", "ict.save_every=1000")
    build_corpus(load_config(ROOT / "configs" / "tiny.toml", overrides))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           "-m", "realm_lm.cli", "ict", "--config", str(ROOT / "configs" / "tiny.toml"),
           *[x for o in overrides for x in ("--set", o)]]
    launcher = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=tmp_path,
                                env={**os.environ, "OMP_NUM_THREADS": "1"})
    log = tmp_path / "ict" / "metrics.jsonl"
    deadline = time.time() + 180
    while time.time() < deadline and not (log.exists() and log.read_text().count("\n") >= 3):
        time.sleep(0.1)
    launcher.send_signal(signal.SIGTERM)
    sent = time.time()
    _, err = launcher.communicate(timeout=120)
    steps = [json.loads(x)["step"] for x in log.read_text().splitlines()]
    assert 3 <= steps[-1] < 400, err[-3000:]
    assert latest_checkpoint(tmp_path / "ict").name == f"step_{steps[-1]:07d}", err[-3000:]
    assert f"stopped at step {steps[-1]} with checkpoint" in err
    assert "forcefully exiting" not in err and time.time() - sent < 30  # no rank waited for torchrun's SIGKILL


def _gather_worker(rank: int, store: str, out: str) -> None:
    import torch.distributed as dist

    from realm_lm.losses import in_batch_nll
    from realm_lm.train import distributed

    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=2)
    torch.manual_seed(0)
    towers = torch.nn.ModuleDict({"q": torch.nn.Linear(5, 3), "d": torch.nn.Linear(5, 3)})
    x = torch.randn(7, 5)  # 3 pairs on rank 0, 4 on rank 1: gather_rows takes uneven batches
    mine = slice(0, 3) if rank == 0 else slice(3, 7)
    q = distributed.gather_rows(towers["q"](x[mine]))
    d = distributed.gather_rows(towers["d"](x[mine].flip(-1)))
    loss = in_batch_nll(q, d)
    (loss * distributed.world_size()).backward()
    distributed.average_gradients(towers)
    torch.save({"loss": loss.detach(), "grads": [p.grad for p in towers.parameters()]}, f"{out}.{rank}")
    dist.destroy_process_group()


def test_gather_rows_gives_every_rank_the_one_process_gradient(tmp_path):
    from realm_lm.losses import in_batch_nll

    torch.multiprocessing.spawn(_gather_worker, args=(str(tmp_path / "store"), str(tmp_path / "out")), nprocs=2)
    torch.manual_seed(0)
    towers = torch.nn.ModuleDict({"q": torch.nn.Linear(5, 3), "d": torch.nn.Linear(5, 3)})
    x = torch.randn(7, 5)
    loss = in_batch_nll(towers["q"](x), towers["d"](x.flip(-1)))  # the 7 pairs in one process
    loss.backward()
    for rank in (0, 1):
        got = torch.load(tmp_path / f"out.{rank}")
        assert torch.allclose(got["loss"], loss.detach(), atol=1e-6)
        for g, p in zip(got["grads"], towers.parameters()):
            assert torch.allclose(g, p.grad, atol=1e-6)


def test_finetune_ranks_read_disjoint_questions(tiny_cfg, monkeypatch):
    from realm_lm.train import distributed
    from realm_lm.train.finetune import FinetuneRecipe

    recipe = FinetuneRecipe(tiny_cfg)
    recipe.questions = list(range(10))
    monkeypatch.setattr(distributed, "world_size", lambda: 2)
    for step in range(4):
        recipe.step = step
        per_rank = []
        for rank in (0, 1):
            monkeypatch.setattr(distributed, "rank", lambda r=rank: r)
            per_rank.append(set(recipe.batch_indices().tolist()))
        assert len(per_rank[0]) == len(per_rank[1]) == tiny_cfg.finetune.batch_size
        assert not per_rank[0] & per_rank[1]


def test_processes_on_one_machine_share_its_cores(monkeypatch):
    from realm_lm.runtime import default_threads

    monkeypatch.setattr(os, "cpu_count", lambda: 16)
    monkeypatch.delenv("LOCAL_WORLD_SIZE", raising=False)
    assert default_threads() == 16
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "4")  # torchrun --nproc_per_node=4
    assert default_threads() == 4
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "32")
    assert default_threads() == 1


def test_index_build_under_torchrun_shares_the_blocks_and_equals_one_process(tmp_path):
    """`torchrun ... realm index build`: each rank embeds half of the blocks and saves it in the index folder, rank 0
    takes both halves and publishes one version, the same as one process embedding every block."""
    import numpy as np

    from realm_lm.index.build import build_index
    from realm_lm.index.versioned import read_manifest

    overrides = tiny_overrides(tmp_path)
    cfg = load_config(ROOT / "configs" / "tiny.toml", overrides)
    build_corpus(cfg)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           "-m", "realm_lm.cli", "index", "build", "--config", str(ROOT / "configs" / "tiny.toml"),
           *[x for o in overrides for x in ("--set", o)]]
    result = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"},
                            timeout=300, cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    m = read_manifest(cfg.index.dir)
    n = m["n_rows"]
    assert m["version"] == "v000001" and m["rows_embedded"] == 0 and m["rows_from_parts"] == n
    assert f"{n} blocks embedded by 2 processes ({n - n // 2} + {n // 2})" in result.stdout
    assert not (tmp_path / "index" / "unfinished").exists()
    one = build_index(replace_index_dir(cfg, tmp_path / "one" / "index"), progress=False)
    np.testing.assert_allclose(np.load(tmp_path / "index" / "versions" / "v000001" / "embeddings.npy"),
                               np.load(tmp_path / "one" / "index" / "versions" / one / "embeddings.npy"), atol=1e-5)


def replace_index_dir(cfg, folder):
    from dataclasses import replace
    return replace(cfg, index=replace(cfg.index, dir=str(folder)))
