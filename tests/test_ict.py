import numpy as np
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
