from pathlib import Path

import pytest

from realm_lm.config import ConfigError, RunConfig, config_from_dict, config_to_dict, load_config

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("preset", sorted((ROOT / "configs").glob("*.toml")), ids=lambda p: p.name)
def test_every_shipped_preset_loads(preset):
    cfg = load_config(preset)
    assert isinstance(cfg, RunConfig)
    assert config_to_dict(cfg)["corpus"]["block_len"] == cfg.corpus.block_len


def test_overrides_are_typed():
    cfg = load_config(None, ["index.backend=faiss-hnsw", "corpus.block_len=128", "embedder.share_towers=false",
                             "eval.ks=[1, 10]", "index.dir=some/where"])
    assert cfg.index.backend == "faiss-hnsw"
    assert cfg.corpus.block_len == 128
    assert cfg.embedder.share_towers is False
    assert cfg.eval.ks == (1, 10)
    assert cfg.index.dir == "some/where"


@pytest.mark.parametrize("bad, message", [
    ("index.bakend=exact", "unknown key"),
    ("nosuchsection.x=1", "unknown key"),
    ("corpus.block_len=big", "expected int"),
    ("corpus.block_len=1.5", "expected int"),
    ("embedder.share_towers=1", "expected bool"),
    ("eval.ks=5", "expected a list"),
    ("index", "must look like"),
    # values out of range fail when the config is loaded, not minutes into a run (each crashed or misbehaved once)
    ("reader.top_k=0", r"reader.top_k must be >= 1, not 0"),
    ("pretrain.top_k=0", r"pretrain.top_k must be >= 1"),  # the null block is one of the k
    ("pretrain.heldout_every=0", r"heldout_every must be >= 2"),
    ("finetune.lr=0", r"finetune.lr must be > 0"),
    ("ict.remove_prob=1.5", r"ict.remove_prob must lie in \[0, 1\]"),
    ("eval.ks=[]", "non-empty list"),
    ("eval.ks=[0, 5]", "non-empty list"),
    ("index.backend=annoy", "index.backend must be one of exact, faiss-flat"),
    ("refresh.mode=sometimes", "refresh.mode must be one of async, sync, never"),
    ("refresh.swap_after=51", r"refresh.swap_after \(51\) must not exceed refresh.every \(50\)"),
    ("pretrain.masking=whole-word", "pretrain.masking must be one of"),
    ("runtime.precision=fp8", "runtime.precision must be one of"),
])
def test_bad_overrides_are_rejected(bad, message):
    with pytest.raises(ConfigError, match=message):
        load_config(None, [bad])


def test_require_evidence_needs_salient_spans():
    with pytest.raises(ConfigError, match="pretrain.require_evidence needs pretrain.masking"):
        load_config(None, ["pretrain.masking=random-span", "pretrain.require_evidence=true"])
    assert load_config(None, ["pretrain.require_evidence=true"]).pretrain.require_evidence
    with pytest.raises(ConfigError, match="pretrain.top_k >= 2"):  # top_k = 1 retrieves nothing
        load_config(None, ["pretrain.top_k=1", "pretrain.require_evidence=true"])


def test_a_run_saved_with_a_retired_key_still_loads_but_a_preset_may_not_set_it():
    stored = config_to_dict(RunConfig())
    stored["pretrain"]["log_every"] = 1  # what run folders saved before the field was removed hold
    assert config_from_dict(stored) == RunConfig()
    stored["pretrain"]["log_evry"] = 1  # anything else unknown is still refused
    with pytest.raises(ConfigError, match="unknown key"):
        config_from_dict(stored)
    with pytest.raises(ConfigError, match="unknown key"):
        load_config(None, ["pretrain.log_every=1"])


def test_a_run_saved_with_reader_loss_to_query_loads_with_its_reader_retrieval():
    """finetune.reader_loss_to_query (session 63) became finetune.reader_retrieval; its run folders still load."""
    for to_query, mode in ((True, "joint"), (False, "detached")):
        stored = config_to_dict(RunConfig())
        del stored["finetune"]["reader_retrieval"]
        stored["finetune"]["reader_loss_to_query"] = to_query
        assert config_from_dict(stored).finetune.reader_retrieval == mode
    with pytest.raises(ConfigError, match="unknown key"):
        load_config(None, ["finetune.reader_loss_to_query=false"])


def test_a_config_built_in_code_is_checked_too():
    from dataclasses import replace
    with pytest.raises(ConfigError, match="finetune.retriever must be one of realm, bm25"):
        replace(RunConfig().finetune, retriever="tfidf")


def test_bad_preset_file(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "missing.toml")
    broken = tmp_path / "broken.toml"
    broken.write_text("[corpus\nblock_len = 3")
    with pytest.raises(ConfigError, match="not valid TOML"):
        load_config(broken)


def test_precision_auto_is_bf16_only_where_the_hardware_multiplies_bf16(monkeypatch):
    import torch

    from realm_lm.runtime import autocast, cpu_bf16_instructions, resolve_precision

    cpu = torch.device("cpu")
    assert resolve_precision(cpu, "fp32") == "fp32" and resolve_precision(cpu, "bf16") == "bf16"
    machines = (({"amx_bf16": True, "avx512_bf16": True}, "amx_bf16", "bf16"),  # Sapphire Rapids
                ({"amx_bf16": False, "avx512_bf16": True}, "avx512_bf16", "bf16"),  # Zen 4
                ({"amx_bf16": False, "avx512_bf16": False, "avx512_f": True}, None, "fp32"),  # Ice Lake: emulated
                ({}, None, "fp32"))
    for capabilities, instructions, expected in machines:
        monkeypatch.setattr(torch.cpu, "get_capabilities", lambda capabilities=capabilities: capabilities)
        cpu_bf16_instructions.cache_clear()
        assert cpu_bf16_instructions() == instructions
        assert resolve_precision(cpu, "auto") == expected
        with autocast(cpu, "auto"):
            assert torch.is_autocast_enabled("cpu") is (expected == "bf16")
    cpu_bf16_instructions.cache_clear()  # the real machine's answer again for the tests after this one
    with pytest.raises(ValueError, match="runtime.precision"):
        resolve_precision(cpu, "fp16")
    with pytest.raises(ValueError, match="runtime.precision"):
        autocast(cpu, "half")
