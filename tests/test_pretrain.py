"""REALM pre-training on the tiny corpus: null block, trivial-retrieval exclusion, gradients, refresh, resume."""

import dataclasses
import json
import os
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch
from transformers.models.bert.modeling_bert import BertSelfAttention

from realm_lm.config import load_config
from realm_lm.corpus.store import build_corpus
from realm_lm.index import refresher as refresher_module
from realm_lm.index.refresher import IndexBuilderError
from realm_lm.index.versioned import latest_version, load_index
from realm_lm.train.checkpoint import latest_checkpoint
from realm_lm.train.data import body_of, contains_run, title_and_body
from realm_lm.train.pretrain import PretrainRecipe

from conftest import ROOT, tiny_overrides


def recipe_for(tmp_path, *extra):
    cfg = load_config(ROOT / "configs" / "tiny.toml", tiny_overrides(tmp_path, *extra))
    build_corpus(cfg)
    recipe = PretrainRecipe(cfg)
    return recipe


def test_candidates_exclude_the_source_block_and_end_with_the_null_block(tmp_path):
    recipe = recipe_for(tmp_path)
    recipe.setup()
    try:
        rng = np.random.default_rng(0)
        for _ in range(5):
            batch = recipe.make_batch(rng.choice(recipe.train_sentences, 2, replace=False), rng)
            q = recipe.model.retriever.query(batch.query_ids, batch.query_mask)
            cands = recipe.candidates(q, batch.source_rows)
            for c, src in zip(cands, batch.source_rows):
                assert src not in c and len(c) == recipe.cfg.pretrain.top_k - 1
        # the forward adds the null block as the last candidate: with k-1 retrieved, logits have k columns
        out = recipe.forward(batch)
        assert torch.isfinite(out["loss"]) and 0 <= float(out["p_null"]) <= 1
    finally:
        recipe.close()


def test_the_encoder_reads_each_candidate_body_after_the_query(tmp_path, monkeypatch):
    recipe = recipe_for(tmp_path)
    recipe.setup()
    try:
        seen = {}
        encode = recipe.model.encoder.forward

        def spy(ids, mask, types, positions):
            seen["ids"], seen["types"] = ids, types
            return encode(ids, mask, types, positions)
        monkeypatch.setattr(recipe.model.encoder, "forward", spy)
        rng = np.random.default_rng(0)
        batch = recipe.make_batch(rng.choice(recipe.train_sentences, 2, replace=False), rng)
        q = recipe.model.retriever.query(batch.query_ids, batch.query_mask)
        cands = recipe.candidates(q, batch.source_rows)
        recipe.forward(batch)
        sep, n_query = recipe.special.sep, int(batch.query_mask[0].sum())
        row = seen["ids"][0][seen["types"][0] == 1].tolist()  # the first query's first candidate, after the query
        body = title_and_body(recipe.store, cands[0][0], sep)[1].tolist()  # the title dropped, as in REALM's code
        room = recipe.cfg.encoder.max_joint_len - n_query - 1
        assert seen["ids"][0][:n_query].tolist() == batch.query_ids[0][:n_query].tolist()
        assert row == body[:room] + [sep]
    finally:
        recipe.close()


def test_contains_run():
    tokens = np.array([5, 6, 7, 5, 6])
    assert contains_run(tokens, np.array([7, 5])) and contains_run(tokens, np.array([5, 6, 7, 5, 6]))
    assert not contains_run(tokens, np.array([6, 5])) and not contains_run(tokens, np.array([5, 6, 7, 5, 6, 7]))
    assert not contains_run(tokens, np.array([], dtype=int))


def test_require_evidence_trains_only_on_spans_a_candidate_holds_chosen_at_the_start_of_a_run(tmp_path):
    plain = recipe_for(tmp_path / "plain", "pretrain.masking=salient")
    plain.setup()
    plain.close()
    # the tiny corpus's 36 blocks are all candidates: a span is kept where another block holds it
    recipe = recipe_for(tmp_path / "kept", "pretrain.masking=salient", "pretrain.require_evidence=true",
                        "pretrain.top_k=36")
    recipe.setup()
    try:
        kept = recipe.train_sentences
        assert 2 <= len(kept) < len(plain.train_sentences) and np.isin(kept, plain.train_sentences).all()
        for s in plain.heldout_sentences:  # held-out evaluation keeps every span
            assert (recipe.spans.of(s) == plain.spans.of(s)).all()
        # at step 0, every query masked from the kept spans finds its masked wordpieces in one of its candidates
        rng = np.random.default_rng(1)
        for _ in range(5):
            batch = recipe.make_batch(rng.choice(kept, 2, replace=False), rng)
            q = recipe.model.retriever.query(batch.query_ids, batch.query_mask)
            for query, rows in zip(batch.queries, recipe.candidates(q, batch.source_rows)):
                assert any(contains_run(body_of(recipe.store, r, recipe.special.sep), query.labels) for r in rows)
        recipe.train(stop_after=2)
    finally:
        recipe.close()
    saved = recipe.run_dir / "evidence_spans.json"
    choice = json.loads(saved.read_text())
    choice["without_evidence"] = list(range(choice["spans"]))  # what a resume must reuse and a fresh run must not
    saved.write_text(json.dumps(choice))
    resumed = PretrainRecipe(recipe.cfg)
    with pytest.raises(ValueError, match="leaves 0 training sentences"):
        resumed.setup(resume=True)
    resumed.close()
    fresh = PretrainRecipe(recipe.cfg)
    fresh.setup()
    fresh.close()
    assert (fresh.train_sentences == kept).all()


def test_attention_dropout_setting_reaches_every_bert(tmp_path):
    recipe = recipe_for(tmp_path, "pretrain.attention_dropout=0.0")
    recipe.setup()
    try:
        probs = [m.dropout.p for m in recipe.model.modules() if isinstance(m, BertSelfAttention)]
        assert probs and all(p == 0.0 for p in probs)
    finally:
        recipe.close()


def test_gradients_reach_both_towers_and_the_encoder(tmp_path):
    recipe = recipe_for(tmp_path, "embedder.share_towers=false")
    recipe.setup()
    try:
        rng = np.random.default_rng(1)
        batch = recipe.make_batch(rng.choice(recipe.train_sentences, 2, replace=False), rng)
        recipe.forward(batch)["loss"].backward()
        m = recipe.model
        for name, module in [("query", m.retriever.query), ("doc", m.retriever.doc), ("encoder", m.encoder.bert),
                             ("mlm head", m.encoder.head.dense), ("retrieval scale", m.retrieval_scale)]:
            grads = [p.grad for p in module.parameters() if p.grad is not None]
            assert grads and any(g.abs().sum() > 0 for g in grads), f"no gradient reaches the {name}"
    finally:
        recipe.close()


def test_top_k_1_trains_the_encoder_on_the_null_block_alone(tmp_path):
    recipe = recipe_for(tmp_path, "pretrain.top_k=1")  # refresh.mode as the preset has it: async
    recipe.setup()
    try:
        assert recipe.refresher.index is None and recipe.refresher.stats.initial_build_s == 0  # no first index
        batch = recipe.make_batch(recipe.train_sentences[:2], np.random.default_rng(0))
        recipe.model.train()
        out = recipe.forward(batch)
        out["loss"].backward()
        assert float(out["p_null"]) == 1 and float(out["ru_top"]) == 0  # one candidate: the null block
        assert all(p.grad is None or not p.grad.any() for p in recipe.model.retriever.parameters())
        assert any(p.grad is not None and p.grad.any() for p in recipe.model.encoder.parameters())
        history = recipe.train()
        assert len(history) == 3 and all(np.isfinite(h["loss"]) for h in history)
        assert recipe.refresher.stats.refreshes_started == 0 and recipe.refresher.builder is None  # nor refreshes
        assert all(h["staleness"] == 0 and h["index_version"] == "" for h in history)
        assert latest_version(recipe.refresher.cfg.index.dir) is None
    finally:
        recipe.close()


def test_micro_batches_give_the_whole_batch_gradient_and_metrics(tmp_path):
    recipe = recipe_for(tmp_path, "pretrain.batch_size=4", "runtime.precision=fp32")  # bf16 sums differ by shape
    recipe.setup()
    try:
        sentences = np.random.default_rng(3).choice(recipe.train_sentences, 4, replace=False)
        recipe.model.eval()  # no dropout: every split must compute the same function
        results = []
        for micro in (0, 1, 3):  # one pass; four of one query; 3 + 1 (unequal shares)
            recipe.cfg = dataclasses.replace(recipe.cfg, pretrain=dataclasses.replace(recipe.cfg.pretrain,
                                                                                       micro_batch_size=micro))
            batches = recipe.micro_batches(sentences, np.random.default_rng(7))
            assert len(batches) == {0: 1, 1: 4, 3: 2}[micro]
            recipe.model.zero_grad(set_to_none=True)
            metrics = recipe.accumulate_gradients(batches)
            grads = {n: p.grad.clone() for n, p in recipe.model.named_parameters() if p.grad is not None}
            results.append((metrics, grads))
        (whole, whole_grads), *splits = results
        assert whole_grads
        for metrics, grads in splits:
            assert grads.keys() == whole_grads.keys()
            for name, g in grads.items():
                torch.testing.assert_close(g, whole_grads[name], rtol=1e-4, atol=1e-6, msg=name)
            for name in ("loss", "mask_acc", "ru_top", "p_null", "masks"):
                assert metrics[name] == pytest.approx(whole[name], rel=1e-5, abs=1e-6), name
        history = recipe.train(stop_after=1)  # a training step in micro-batches
        assert np.isfinite(history[0]["loss"])
    finally:
        recipe.close()


def test_three_steps_refresh_and_resume_reproduce_the_losses(tmp_path):
    full = recipe_for(tmp_path / "a")
    full.setup()
    history = full.train()
    full.close()
    losses = [h["loss"] for h in history]
    assert len(losses) == 3 and all(np.isfinite(losses))
    scale_group = next(g for g in full.opt.param_groups if g["params"] == [full.model.retrieval_scale.log_scale])
    assert scale_group["weight_decay"] == 0  # a temperature, learned and never decayed towards 1
    assert history[0]["retrieval_scale"] != full.cfg.pretrain.retrieval_scale
    # sync refresh every 2 steps: the initial index (step 0) and one refresh at step 2
    assert history[-1]["index_version"] == "v000002" and history[-1]["refreshes"] == 2
    assert history[1]["staleness"] == 2 and history[2]["staleness"] == 1
    manifest = load_index(full.refresher.cfg.index.dir, full.store)[1]
    assert manifest["embedder_step"] == 2

    # interrupted after 2 steps (the checkpoint at step 2), resumed: the same third loss
    part = recipe_for(tmp_path / "b")
    part.setup()
    part.train(stop_after=2)
    part.close()
    resumed = PretrainRecipe(part.cfg)
    resumed.setup(resume=True)
    assert resumed.step == 2
    rest = resumed.train()
    resumed.close()
    assert [h["step"] for h in rest] == [3]
    assert rest[0]["loss"] == pytest.approx(losses[2], rel=1e-5)
    logged = [json.loads(l)["step"] for l in (part.run_dir / "metrics.jsonl").read_text().splitlines()]
    assert logged == [1, 2, 3]


def test_a_resumed_run_goes_back_to_the_index_its_checkpoint_used(tmp_path, capsys):
    """Killed after refreshes that followed its last checkpoint, a run resumes on the index version it used at that
    checkpoint (the later ones are deleted: their weights are past it), and so repeats the steps it lost exactly.
    That version outlives refresh.keep later refreshes: the checkpoint pins it."""
    run = recipe_for(tmp_path, "refresh.every=1", "refresh.keep=1", "pretrain.steps=4", "pretrain.save_every=2")
    run.setup()
    losses = [h["loss"] for h in run.train()]
    run.close()
    assert latest_version(run.run_dir / "index") == "v000004"  # embedded at step 3, past the checkpoint at step 2
    kept = sorted(p.name for p in (run.run_dir / "index" / "versions").iterdir())
    assert kept == ["v000002", "v000004"]  # keep=1 pruned v000001 and v000003, but not the checkpoint's
    checkpoints = run.run_dir / "checkpoints"  # killed before the step 4 checkpoint was written:
    shutil.rmtree(checkpoints / "step_0000004")
    (checkpoints / "LATEST").write_text("step_0000002")

    resumed = PretrainRecipe(run.cfg)
    resumed.setup(resume=True)
    assert ("index back to v000002, the version the checkpoint was trained on; deleted v000004"
            in capsys.readouterr().err)
    assert resumed.refresher.version == "v000002"
    rest = resumed.train()
    resumed.close()
    assert [h["step"] for h in rest] == [3, 4]
    assert [h["loss"] for h in rest] == pytest.approx(losses[2:], rel=1e-6)

    # killed again, and the versions embedded at or before step 2 deleted by hand: every kept one is from weights
    # past the checkpoint, so the resumed run builds its index from the checkpoint's weights rather than use one
    shutil.rmtree(checkpoints / "step_0000004")
    (checkpoints / "LATEST").write_text("step_0000002")
    versions = sorted((run.run_dir / "index" / "versions").iterdir())
    for version in versions:
        if json.loads((version / "manifest.json").read_text())["embedder_step"] <= 2:
            shutil.rmtree(version)
    assert any(v.exists() for v in versions)
    again = PretrainRecipe(run.cfg)
    again.setup(resume=True)
    again.close()
    assert "no kept index version is as old as the checkpoint (step 2): building one" in capsys.readouterr().err
    assert again.refresher.manifest["embedder_step"] == 2 and again.refresher.version > versions[-1].name


def test_a_deferred_async_refresh_swaps_at_fixed_steps_and_resumes_exactly(tmp_path, capsys):
    """refresh.swap_after = 2: each version goes in exactly 2 steps after its builder started, however fast that
    builder was, so which index a step trains on does not depend on timing; and a run killed while a builder was
    running resumes that builder from its snapshot and repeats the lost steps exactly."""
    run = recipe_for(tmp_path, "refresh.mode=async", "refresh.every=2", "refresh.swap_after=2", "pretrain.steps=8",
                     "pretrain.save_every=3")
    run.setup()
    first = run.train(stop_after=5)  # the checkpoint at step 3 has the builder started after step 2 under way
    run.refresher._wait()  # the builder started after step 4 finishes, as it could before a kill
    run.close()
    # builders start before steps 3 and 5 (after 2 and 4 steps); the first one's version goes in before step 5
    assert [h["step"] for h in first if h["swapped"]] == [5]
    assert [h["staleness"] for h in first] == [1, 2, 3, 4, 3]
    snapshot = run.run_dir / "refresh" / "doc_tower_step0000002.safetensors"
    assert snapshot.exists()  # kept for the checkpoint, though a later builder has finished

    # without that snapshot, a resumed run says it cannot repeat the lost steps exactly
    hidden = snapshot.rename(snapshot.with_suffix(".hidden"))
    blind = PretrainRecipe(run.cfg)
    blind.setup(resume=True)
    blind.close()
    assert "the snapshot of the refresh under way at the checkpoint (step 2) is gone" in capsys.readouterr().err
    assert blind.refresher.builder is None and blind.refresher.schedule.last_started == 2
    hidden.rename(snapshot)

    resumed = PretrainRecipe(run.cfg)
    resumed.setup(resume=True)
    assert resumed.refresher.pending == 2 and resumed.refresher.builder is not None
    rest = resumed.train()
    resumed.close()
    assert [h["step"] for h in rest if h["swapped"]] == [5, 7]
    assert [h["staleness"] for h in rest] == [4, 3, 4, 3, 4]
    assert [h["loss"] for h in rest[:2]] == pytest.approx([h["loss"] for h in first[3:]], rel=1e-6)


def test_a_fresh_run_in_an_old_run_folder_starts_from_an_index_of_its_own_weights(tmp_path, monkeypatch):
    """The folder still holds the old run's index versions (embedded at its step 2). A fresh run must not retrieve
    from them until its first refresh: it builds its own first index, as it would in an empty folder, and if that
    build fails it stops rather than fall back on the old run's."""
    from realm_lm.models.embedder import weights_hash

    old = recipe_for(tmp_path)
    old.setup()
    old.train()
    old.close()
    fresh = PretrainRecipe(old.cfg)
    fresh.setup()
    try:
        assert fresh.refresher.manifest["embedder_step"] == 0 and fresh.refresher.staleness(0) == 0
        assert fresh.refresher.manifest["embedder_weights_sha256"] == weights_hash(fresh.model.retriever.doc)
        fresh.train()  # the newest version is again one of later weights
    finally:
        fresh.close()
    monkeypatch.setattr(refresher_module, "build_index_on_ranks", _disk_full)
    with pytest.raises(IndexBuilderError, match="first index"):
        PretrainRecipe(old.cfg).setup()


def test_loss_goes_down_on_average(tmp_path):
    recipe = recipe_for(tmp_path, "pretrain.steps=24", "refresh.mode=never", "pretrain.lr=3e-3",
                        "pretrain.save_every=100")
    recipe.setup()
    losses = [h["loss"] for h in recipe.train()]
    recipe.close()
    assert np.mean(losses[-8:]) < np.mean(losses[:8])


def test_async_refresh_publishes_while_training_goes_on(tmp_path):
    recipe = recipe_for(tmp_path, "refresh.mode=async", "refresh.every=1", "pretrain.steps=4")
    recipe.setup()
    recipe.train()
    recipe.refresher._wait()  # let the last builder finish so the test leaves no process behind
    recipe.close()
    stats = recipe.refresher.stats
    assert stats.refreshes_started >= 1 and stats.waited_s == 0  # the first index is built in-process, not counted
    assert int(latest_version(recipe.refresher.cfg.index.dir)[1:]) >= 2


def test_ranks_swap_in_a_new_version_at_the_same_step_once_every_rank_sees_it(tmp_path, monkeypatch):
    """Under torchrun each rank reads the index folder at its own moment: a rank that sees a new version published
    waits (one all-reduce) until every rank sees it, so no step trains on two versions across the ranks."""
    from realm_lm.train import distributed

    recipe = recipe_for(tmp_path, "refresh.mode=async", "refresh.every=1")
    recipe.setup()
    try:
        refresher, doc = recipe.refresher, recipe.model.retriever.doc
        refresher._launch(doc, 1)
        refresher._wait()
        assert latest_version(refresher.cfg.index.dir) == "v000002" and refresher.version == "v000001"
        agree = distributed.any_rank_each
        monkeypatch.setattr(distributed, "any_rank_each", lambda flags: [*agree(flags)[:2], True])  # a rank lags
        assert not refresher.maybe_swap(1, doc) and refresher.version == "v000001"
        monkeypatch.setattr(distributed, "any_rank_each", agree)
        assert refresher.maybe_swap(1, doc) and refresher.version == "v000002"
    finally:
        recipe.close()


def test_killed_builder_leaves_the_old_index_loadable(tmp_path):
    recipe = recipe_for(tmp_path, "refresh.mode=async", "refresh.every=1")
    recipe.setup()
    before = latest_version(recipe.refresher.cfg.index.dir)
    recipe.refresher._launch(recipe.model.retriever.doc, 1)
    recipe.refresher.builder.kill()  # kill -9, at whatever point it had reached
    recipe.refresher.builder.wait()
    recipe.refresher.builder = None
    index, manifest = load_index(recipe.refresher.cfg.index.dir, recipe.store)
    assert manifest["version"] == before and len(index) == len(recipe.store)
    recipe.close()


def _running(pid: int) -> bool:
    """Alive and not a zombie (an orphan's new parent may be slow to reap it, or not reap at all in a container)."""
    try:
        return open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


def test_a_builder_whose_trainer_was_killed_stops_without_publishing(tmp_path):
    """kill -9 of the trainer cannot stop its builder; the builder notices its trainer is gone and publishes nothing
    (else a fresh run started in the folder meanwhile would swap in a version of the dead run's weights)."""
    overrides = tiny_overrides(tmp_path, "refresh.mode=async", "refresh.every=1")
    build_corpus(load_config(ROOT / "configs" / "tiny.toml", overrides))
    trainer = (f"import os, signal\n"
               f"from realm_lm.config import load_config\n"
               f"from realm_lm.train.pretrain import PretrainRecipe\n"
               f"recipe = PretrainRecipe(load_config({str(ROOT / 'configs' / 'tiny.toml')!r}, {overrides!r}))\n"
               f"recipe.setup()\n"
               f"recipe.refresher._launch(recipe.model.retriever.doc, 1)\n"
               f"print(recipe.refresher.builder.pid, flush=True)\n"
               f"os.kill(os.getpid(), signal.SIGKILL)\n")
    proc = subprocess.run([sys.executable, "-c", trainer], capture_output=True, text=True, cwd=tmp_path, timeout=120)
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-2000:]
    builder_pid = int(proc.stdout.split()[-1])
    deadline = time.time() + 60
    while _running(builder_pid) and time.time() < deadline:
        time.sleep(0.1)
    assert not _running(builder_pid)
    index_dir = tmp_path / "pretrain" / "index"
    assert latest_version(index_dir) == "v000001"  # the first index, built while the trainer waited
    assert sorted(p.name for p in (index_dir / "versions").iterdir() if p.name.startswith("v")) == ["v000001"]
    assert "the builder stops without publishing" in (tmp_path / "pretrain" / "refresh" / "builder.log").read_text()


def test_corrupt_checkpoint_is_a_clear_error(tmp_path):
    from realm_lm.train.checkpoint import CheckpointError
    recipe = recipe_for(tmp_path, "pretrain.steps=2")
    recipe.setup()
    recipe.train()
    recipe.close()
    ckpt = recipe.run_dir / "checkpoints" / "step_0000002" / "model.safetensors"
    ckpt.write_bytes(b"garbage")
    again = PretrainRecipe(recipe.cfg)
    with pytest.raises(CheckpointError, match="unreadable"):
        again.setup(resume=True)


def test_a_checkpoint_of_another_model_is_refused_even_when_loading_loosely(tmp_path):
    from torch import nn

    from realm_lm.train.checkpoint import CheckpointError, load_checkpoint, save_checkpoint
    retriever_only = nn.ModuleDict({"retriever": nn.Linear(4, 3)})
    with_encoder = nn.ModuleDict({"retriever": nn.Linear(4, 3), "encoder": nn.Linear(3, 2)})
    unrelated = nn.ModuleDict({"classifier": nn.Linear(4, 3)})
    ckpt = save_checkpoint(tmp_path / "ict", 1, retriever_only, None, {})
    load_checkpoint(ckpt, with_encoder, strict=False)  # an ICT run carries the retriever only: fine
    assert torch.equal(with_encoder["retriever"].weight, retriever_only["retriever"].weight)
    with pytest.raises(CheckpointError, match="none of this model's weights"):
        load_checkpoint(ckpt, unrelated, strict=False)
    tied = nn.ModuleDict({"embeddings": nn.Embedding(5, 4), "decoder": nn.Linear(4, 5, bias=False)})
    tied["decoder"].weight = tied["embeddings"].weight  # as REALM's MLM decoder is tied to the word embeddings
    with pytest.raises(CheckpointError, match="none of this model's weights"):
        load_checkpoint(ckpt, tied, strict=False)


def test_a_fresh_run_saving_over_a_longer_run_keeps_its_own_checkpoints(tmp_path):
    """Rotation keeps the last checkpoints up to the step saved: a longer run's later ones, left in the folder by a
    fresh start, used to outrank the new run's and rotate them out, LATEST included."""
    from torch import nn

    from realm_lm.train.checkpoint import save_checkpoint
    model = nn.Linear(2, 2)
    for step in (3, 4):  # the run that was there
        save_checkpoint(tmp_path, step, model, None, {})
    save_checkpoint(tmp_path, 1, model, None, {})  # a fresh run in the same folder
    assert latest_checkpoint(tmp_path).name == "step_0000001"
    save_checkpoint(tmp_path, 2, model, None, {})
    assert sorted(p.name for p in (tmp_path / "checkpoints").glob("step_*")) == ["step_0000001", "step_0000002"]
    assert latest_checkpoint(tmp_path).name == "step_0000002"


def test_kill_9_mid_training_then_resume_finishes_the_run(tmp_path):
    """A real `realm pretrain` process killed with SIGKILL after its first checkpoint; --resume completes the run."""
    overrides = tiny_overrides(tmp_path, "pretrain.steps=40", "pretrain.save_every=2", "refresh.mode=async",
                               "refresh.every=3")
    build_corpus(load_config(ROOT / "configs" / "tiny.toml", overrides))
    cmd = [sys.executable, "-m", "realm_lm.cli", "pretrain", "--config", str(ROOT / "configs" / "tiny.toml"),
           *[x for o in overrides for x in ("--set", o)]]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, cwd=tmp_path)
    latest = tmp_path / "pretrain" / "checkpoints" / "LATEST"
    deadline = time.time() + 120
    while time.time() < deadline and not (latest.exists() and latest.read_text() >= "step_0000004"):
        time.sleep(0.2)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    saved = latest.read_text()
    assert saved >= "step_0000004"
    result = subprocess.run([*cmd, "--resume"], capture_output=True, text=True, cwd=tmp_path, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    assert f"resumed from {tmp_path / 'pretrain' / 'checkpoints' / saved}" in result.stdout
    steps = [json.loads(l)["step"] for l in (tmp_path / "pretrain" / "metrics.jsonl").read_text().splitlines()]
    assert steps == list(range(1, 41))  # the lines of the lost steps were dropped and redone: no gaps, no repeats


def test_a_resume_whose_checkpoint_index_is_gone_goes_back_to_the_newest_embedded_before_it(tiny_cfg, capsys):
    """With refresh.keep versions, the one a checkpoint used may be deleted already: the resumed run takes the newest
    kept one embedded at or before its step instead, and a run with nothing that old is told to build one."""
    from realm_lm.config import IndexConfig
    from realm_lm.index.backends import make_index
    from realm_lm.index.refresher import IndexRefresher
    from realm_lm.index.versioned import publish

    refresher = IndexRefresher(tiny_cfg, tiny_cfg.pretrain.run_dir, store=None)
    index_dir = refresher.cfg.index.dir
    for embedder_step in (10, 20, 30):  # v000001..v000003
        index = make_index(IndexConfig())
        index.build(np.zeros((2, 4), np.float32))
        publish(index_dir, np.zeros((2, 4), np.float32), index, {"embedder_step": embedder_step})
    refresher._rewind_to_checkpoint(25, "v000000")  # trained on a version no longer kept
    assert latest_version(index_dir) == "v000002"
    assert "the newest kept version embedded at or before step 25; deleted v000003" in capsys.readouterr().err
    assert not refresher._rewind_to_checkpoint(5, None)  # every kept version is newer than step 5: build one
    assert latest_version(index_dir) == "v000002"


def test_a_builder_that_keeps_failing_stops_training_with_the_steps_saved(tmp_path, monkeypatch):
    """A builder that exits non-zero is survived once; refresh.max_failures in a row stop the run with a clear
    error (else it would silently become the never-refreshed ablation), after saving the steps done for --resume."""
    extra = ("refresh.mode=sync", "refresh.every=1", "refresh.max_failures=2", "pretrain.steps=4",
             "pretrain.save_every=100")
    recipe = recipe_for(tmp_path, *extra)
    recipe.setup()  # the first index is built in the trainer's process
    monkeypatch.setattr(sys, "executable", "/bin/false")  # every later builder exits 1
    with pytest.raises(IndexBuilderError, match="failed 2 times in a row"):
        recipe.train()
    recipe.close()
    assert recipe.step == 2 and latest_checkpoint(recipe.run_dir).name == "step_0000002"
    lines = [json.loads(x) for x in (recipe.run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [m["refresh_failures"] for m in lines] == [0, 1]

    monkeypatch.undo()  # the builder is mended: the run resumes where it stopped and finishes
    resumed = recipe_for(tmp_path, *extra)
    resumed.setup(resume=True)
    assert resumed.step == 2
    resumed.train()
    resumed.close()
    assert resumed.step == 4 and resumed.refresher.stats.failures == 0


def _disk_full(*args, **kwargs):
    raise OSError(28, "No space left on device")


def test_a_first_index_that_cannot_be_built_is_a_clear_error(tmp_path, monkeypatch):
    recipe = recipe_for(tmp_path, "refresh.mode=async")
    monkeypatch.setattr(refresher_module, "build_index_on_ranks", _disk_full)
    with pytest.raises(IndexBuilderError, match=r"the first index could not be built \(OSError: .*No space left"):
        recipe.setup()
    recipe.close()
