import json
import shutil
from dataclasses import replace

import numpy as np
import pytest
import torch

from realm_lm.config import load_config
from realm_lm.corpus.store import build_corpus
from realm_lm.models.embedder import build_retriever, weights_hash
from realm_lm.train.ict import IctRecipe, main as ict_main
from realm_lm.train.pretrain import PretrainRecipe

from conftest import ROOT, tiny_overrides


def test_ict_pairs_remove_the_sentence_and_keep_the_title(tiny_cfg):
    build_corpus(tiny_cfg)
    recipe = IctRecipe(tiny_cfg)
    recipe.setup()
    s = int(recipe.train_sentences[0])
    t = recipe.sentences
    sentence = t.body(t.block[s])[t.tok_start[s]:t.tok_end[s]]
    query, kept = recipe.pair(s, remove=False)
    _, removed = recipe.pair(s, remove=True)
    assert list(query[1:-1]) == list(sentence[:tiny_cfg.ict.query_len - 2])
    title = recipe.title_ids(t.block[s])
    assert list(removed[1:1 + len(title)]) == list(title)
    assert len(removed) == len(kept) - len(sentence) or len(kept) == tiny_cfg.corpus.block_len
    q_ids, _, d_ids, _ = recipe.batch(recipe.train_sentences, 4, np.random.default_rng(0), 0.9)
    assert q_ids.shape[0] == d_ids.shape[0] <= 4


def test_ict_starts_from_a_projection_fitted_to_the_blocks(tiny_cfg):
    """pca_blocks > 0: the projection is no longer the seeded random one before step 1; 0 keeps it."""
    build_corpus(tiny_cfg)
    random_init = build_retriever(tiny_cfg.embedder).query.proj.weight
    fitted = IctRecipe(tiny_cfg)
    fitted.setup()
    w = fitted.model.retriever.query.proj.weight.detach()  # [D, H], orthonormal rows
    assert not torch.allclose(w, random_init)
    torch.testing.assert_close(w @ w.T, torch.eye(len(w)), atol=1e-4, rtol=0)
    kept = IctRecipe(replace(tiny_cfg, ict=replace(tiny_cfg.ict, pca_blocks=0)))
    kept.setup()
    torch.testing.assert_close(kept.model.retriever.query.proj.weight.detach(), random_init)


def test_ict_trains_saves_and_warm_starts_pretraining(tiny_cfg):
    build_corpus(tiny_cfg)
    result = ict_main(tiny_cfg)
    assert 0.0 <= result["after.ict_recall@1"] <= 1.0 and result["after.ict_eval_blocks"] > 1
    trained = build_retriever(tiny_cfg.embedder.__class__(**{**tiny_cfg.embedder.__dict__, "checkpoint": tiny_cfg.ict.run_dir}))
    assert weights_hash(trained.doc) != weights_hash(build_retriever(tiny_cfg.embedder).doc)
    cfg = load_config(ROOT / "configs" / "tiny.toml",
                      tiny_overrides(__import__("pathlib").Path(tiny_cfg.corpus.store).parent, f"pretrain.init_from={tiny_cfg.ict.run_dir}"))
    recipe = PretrainRecipe(cfg)
    recipe.setup()
    recipe.close()
    for a, b in zip(recipe.model.retriever.doc.state_dict().values(), trained.doc.state_dict().values()):
        assert torch.equal(a, b)


def test_ict_resume_after_a_lost_checkpoint_redoes_the_steps_once(tiny_cfg):
    """A kill after step 3 was logged but before its checkpoint landed: resume redoes step 3 from step 2's
    checkpoint, with the same loss, and the metrics log holds each step once."""
    build_corpus(tiny_cfg)
    recipe = IctRecipe(tiny_cfg)
    recipe.setup()
    recipe.train()  # 3 steps, checkpoints at 2 and 3
    log = recipe.run_dir / "metrics.jsonl"
    full = [json.loads(x)["loss"] for x in log.read_text().splitlines()]
    shutil.rmtree(recipe.run_dir / "checkpoints" / "step_0000003")
    (recipe.run_dir / "checkpoints" / "LATEST").write_text("step_0000002")
    log.write_text(log.read_text() + '{"step": 4, "lo')  # and a line cut short by the kill
    resumed = IctRecipe(tiny_cfg)
    resumed.setup(resume=True)
    assert resumed.step == 2
    resumed.train()
    lines = [json.loads(x) for x in log.read_text().splitlines()]
    assert [m["step"] for m in lines] == [1, 2, 3]
    assert [m["loss"] for m in lines] == pytest.approx(full, abs=1e-5)
    IctRecipe(tiny_cfg).setup()  # a fresh run starts a fresh log
    assert not log.exists()


def test_true_block_ranks_count_ties_against_the_true_block_and_never_the_block_itself():
    from realm_lm.train.ict import true_block_ranks

    torch.manual_seed(0)
    d = torch.nn.functional.normalize(torch.randn(64, 128), dim=-1)  # [64, 128]
    assert true_block_ranks(d.clone(), d).tolist() == [0] * 64  # q = d: each block is its own query's best
    d[1] = d[0]  # two identical blocks (a title and nothing else, twice)
    ranks = true_block_ranks(d.clone(), d)
    assert ranks[:2].tolist() == [1, 1] and ranks[2:].eq(0).all()
