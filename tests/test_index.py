import json
from pathlib import Path

import numpy as np
import pytest

from realm_lm.config import INDEX_BACKENDS, IndexConfig, load_config
from realm_lm.corpus.store import CorpusStore, build_corpus
from realm_lm.index.backends import make_index
from realm_lm.index.build import build_index, length_batches
from realm_lm.index.versioned import (IndexMismatchError, IndexNotFoundError, latest_version, load_index, pin,
                                      publish, read_manifest)

from conftest import FIXTURES, ROOT, tiny_overrides


def brute_force(x: np.ndarray, q: np.ndarray, k: int) -> np.ndarray:
    return np.sort(q @ x.T, axis=1)[:, ::-1][:, :k]  # the true top-k scores [Q, k]


def check_against_brute_force(x, q, scores, ids, k, atol):
    """Scores equal the true top-k scores, and every returned id really has its returned score.
    Ids are not compared directly: with ties, any of the tied rows is a correct answer."""
    assert scores.shape == ids.shape == (q.shape[0], k)
    np.testing.assert_allclose(scores, brute_force(x, q, k), atol=atol)
    np.testing.assert_allclose(np.take_along_axis(q @ x.T, ids, axis=1), scores, atol=atol)
    assert all(len(set(row)) == k for row in ids.tolist())


def tied_data(n=500, d=16, seed=0):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((n, d)).astype(np.float32)
    x[100:140] = x[7]  # 41 identical rows: a tie at the top for queries near row 7
    q = np.concatenate([x[7:8] + 0.01, rng.standard_normal((9, d)).astype(np.float32)])
    return x, q


@pytest.mark.parametrize("backend", INDEX_BACKENDS)
def test_backends_match_brute_force_with_ties(backend):
    x, q = tied_data()
    cfg = IndexConfig(backend=backend, chunk_rows=64, hnsw_ef_search=500, ivf_nprobe=10_000, ivf_refine=50)
    index = make_index(cfg)
    index.build(x)
    assert len(index) == len(x)
    scores, ids = index.search(q, 10)
    # fp16 re-ranking in IVF-PQ rounds scores; everything else is exact up to float error
    check_against_brute_force(x, q, scores, ids, 10, atol=0.05 if backend == "faiss-ivf-pq" else 1e-4)


def test_retune_changes_search_settings_without_rebuilding():
    pytest.importorskip("faiss")
    x, q = tied_data()
    index = make_index(IndexConfig(backend="faiss-ivf-pq", ivf_nprobe=1, ivf_refine=50))
    index.build(x)
    built = index.index
    index.retune(IndexConfig(backend="faiss-ivf-pq", ivf_nprobe=10_000, ivf_refine=50))
    assert index.index is built  # same trained index, only its search settings moved
    scores, ids = index.search(q, 10)
    check_against_brute_force(x, q, scores, ids, 10, atol=0.05)  # every list probed: the true top 10


def test_exact_fp16_and_k_larger_than_index():
    x, q = tied_data(n=30)
    index = make_index(IndexConfig(dtype="float16", chunk_rows=7))
    index.build(x)
    scores, ids = index.search(q, 50)
    assert scores.shape == (len(q), 30)
    check_against_brute_force(x.astype(np.float16).astype(np.float32), q, scores, ids, 30, atol=1e-3)


def test_length_batches_cover_every_row_once_within_budget():
    lengths = np.random.default_rng(0).integers(3, 288, size=1000)
    seen = []
    for rows in length_batches(lengths, 4096):
        assert len(rows) * lengths[rows].max() <= 4096
        seen.extend(rows.tolist())
    assert sorted(seen) == list(range(1000))


@pytest.fixture
def built(tiny_cfg):
    build_corpus(tiny_cfg)
    build_index(tiny_cfg, progress=False)
    return tiny_cfg


@pytest.mark.parametrize("backend", INDEX_BACKENDS)
def test_publish_and_load_round_trip(built, tmp_path, backend):
    store = CorpusStore(built.corpus.store)
    emb = np.random.default_rng(1).standard_normal((len(store), 16)).astype(np.float32)
    cfg = IndexConfig(backend=backend, dir=str(tmp_path / "idx"))
    index = make_index(cfg)
    index.build(emb)
    from realm_lm.index.versioned import block_ids_hash
    name = publish(cfg.dir, emb, index, {"n_rows": len(store), "corpus_hash": store.corpus_hash,
                                         "block_ids_sha256": block_ids_hash(store.block_ids),
                                         "config": {"index": {"backend": backend, "dtype": "float32"}}})
    loaded, manifest = load_index(cfg.dir, store)
    assert manifest["version"] == name == latest_version(cfg.dir)
    q = emb[:3] + 0.1
    np.testing.assert_array_equal(loaded.search(q, 5)[1], index.search(q, 5)[1])


def test_index_manifest_describes_itself_and_embeddings_are_reused(built):
    m1 = read_manifest(built.index.dir)
    assert m1["embedder_weights_sha256"] and m1["corpus_hash"] == CorpusStore(built.corpus.store).corpus_hash
    assert m1["config"]["embedder"]["proj_dim"] == 16 and not m1["embeddings_reused"]
    version = build_index(built, progress=False)  # same corpus, same weights: embeddings come from the cache
    m2 = read_manifest(built.index.dir, version)
    assert version == "v000002" and m2["embeddings_reused"] and m2["embedding_key"] == m1["embedding_key"]


def test_a_corpus_with_a_new_document_embeds_only_its_blocks(built, tmp_path):
    from dataclasses import replace

    extra = tmp_path / "extra.jsonl"
    extra.write_text('{"id": "n1", "title": "Zorvath", "text": "Zorvath is a moon of the planet Quel. It was found '
                     'by the astronomer Pell Avi in 2091, and its seas are of frozen methane."}\n')
    grown = replace(built, corpus=replace(built.corpus, inputs=(*built.corpus.inputs, str(extra)),
                                          store=str(tmp_path / "grown")),
                    index=replace(built.index, dir=str(tmp_path / "grown-index")))  # a sibling of the first index
    build_corpus(grown)
    old, new = CorpusStore(built.corpus.store), CorpusStore(grown.corpus.store)
    added = [row for row, block in enumerate(new.block_ids) if block not in set(old.block_ids)]
    assert 0 < len(added) < len(new) and new.corpus_hash != old.corpus_hash
    m = read_manifest(grown.index.dir, build_index(grown, progress=False))
    assert m["rows_embedded"] == len(added) and not m["embeddings_reused"]
    assert m["reused_from"] == [str(Path(built.index.dir) / "versions" / "v000001")]
    alone = replace(grown, index=replace(grown.index, dir=str(tmp_path / "alone" / "index")))  # nothing beside it
    fresh = read_manifest(alone.index.dir, build_index(alone, progress=False))
    assert fresh["rows_embedded"] == len(new)
    reused = np.load(Path(grown.index.dir) / "versions" / m["version"] / "embeddings.npy")
    embedded = np.load(Path(alone.index.dir) / "versions" / fresh["version"] / "embeddings.npy")
    np.testing.assert_allclose(reused, embedded, atol=1e-5)  # [N, D]: the same index as embedding every block


def test_a_store_rebuilt_in_place_with_a_changed_document_embeds_only_that(built, tmp_path):
    from dataclasses import replace

    old_rows = len(CorpusStore(built.corpus.store))
    docs = (FIXTURES / "tiny_docs.jsonl").read_text().splitlines()
    changed = tmp_path / "changed.jsonl"  # the first document rewritten, the others as they were
    changed.write_text("\n".join([json.dumps({**json.loads(docs[0]), "text": "Aldermoor is a city of wool."}),
                                  *docs[1:]]) + "\n")
    edited = replace(built, corpus=replace(built.corpus, inputs=(str(changed),)))  # the same store path and index
    build_corpus(edited)  # the store the first version was built from is gone
    store = CorpusStore(edited.corpus.store)
    m = read_manifest(edited.index.dir, build_index(edited, progress=False))
    assert 0 < m["rows_embedded"] < len(store) and len(store) < old_rows  # only the rewritten document's block
    assert m["reused_from"] == [str(Path(built.index.dir) / "versions" / "v000001")]


def test_ensure_index_keeps_a_current_version_and_builds_for_other_weights_or_another_backend(built):
    """Run again with nothing changed (the demo), the latest version is kept, not published again."""
    from dataclasses import replace

    from realm_lm.index.build import ensure_index

    first = latest_version(built.index.dir)
    assert ensure_index(built) is None and latest_version(built.index.dir) == first
    hnsw = replace(built, index=replace(built.index, backend="faiss-hnsw"))  # the same embeddings, searched otherwise
    version = ensure_index(hnsw)
    assert version != first and read_manifest(built.index.dir, version)["embeddings_reused"]
    assert ensure_index(hnsw) is None  # now current in that backend
    other = replace(hnsw, embedder=replace(hnsw.embedder, seed=hnsw.embedder.seed + 1))  # other weights
    m = read_manifest(built.index.dir, ensure_index(other))
    assert m["rows_embedded"] == len(CorpusStore(built.corpus.store))


def test_index_over_another_corpus_is_refused(built, tmp_path):
    other = load_config(ROOT / "configs" / "tiny.toml",
                        tiny_overrides(tmp_path / "o", "corpus.block_len=24", f"corpus.store={tmp_path / 'other'}"))
    build_corpus(other)
    with pytest.raises(IndexMismatchError, match="different corpus"):
        load_index(built.index.dir, CorpusStore(other.corpus.store))


def test_missing_index_is_a_clear_error(tmp_path):
    with pytest.raises(IndexNotFoundError, match="realm index build"):
        load_index(tmp_path / "nothing")


def test_two_builders_publishing_into_one_folder_take_different_versions(tmp_path):
    """Two processes embedding one run's index at once (`realm ask` and `realm eval qa` on a run trained further):
    each publishes a whole version of its own; neither deletes the other's half-written one."""
    import threading

    barrier = threading.Barrier(2, timeout=60)

    class SlowIndex:  # holds each builder mid-write until both are
        def save(self, folder):
            barrier.wait()
            (folder / "faiss.index").write_bytes(b"index")

    names, errors = [], []

    def builder():
        try:
            names.append(publish(tmp_path / "idx", np.zeros((3, 4), np.float32), SlowIndex(), {"n_rows": 3}))
        except Exception as err:  # noqa: BLE001 - reported by the assertion below
            errors.append(err)

    threads = [threading.Thread(target=builder) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors and sorted(names) == ["v000001", "v000002"]
    for name in names:
        assert read_manifest(tmp_path / "idx", name)["version"] == name
        assert {p.name for p in (tmp_path / "idx" / "versions" / name).iterdir()} == {"embeddings.npy", "faiss.index",
                                                                                       "manifest.json"}
    assert latest_version(tmp_path / "idx") in names
    assert sorted(p.name for p in (tmp_path / "idx" / "versions").iterdir()) == ["v000001", "v000002"]

    # what a builder killed mid-write left is cleared by the next publish; a live builder's files are not
    import os
    versions = tmp_path / "idx" / "versions"
    dead, live = versions / "..unpublished-999999999-1.staging-999999999-2", versions / f".unpublished-{os.getpid()}-3"
    dead.mkdir(), live.mkdir()
    barrier.reset()
    threads = [threading.Thread(target=builder) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors and not dead.exists() and live.exists()


def test_publish_keeps_the_newest_versions_and_the_pinned_ones(tmp_path):
    """refresh.keep counts the newest versions; a pinned one (a checkpoint's index) outlives them until unpinned,
    and a damaged PINNED file pins nothing rather than stop publishing."""
    index_dir = tmp_path / "idx"

    def publish_one():
        index = make_index(IndexConfig())
        index.build(np.zeros((2, 4), np.float32))
        return publish(index_dir, np.zeros((2, 4), np.float32), index, {"n_rows": 2}, keep=1)

    def kept():
        return sorted(p.name for p in (index_dir / "versions").iterdir())

    publish_one()
    pin(index_dir, ["v000001", None])
    publish_one(), publish_one()
    assert kept() == ["v000001", "v000003"]
    pin(index_dir, ["v000003"])
    publish_one()
    assert kept() == ["v000003", "v000004"]
    (index_dir / "PINNED").write_bytes(b"\xff\xfe\x00garbage")
    publish_one()
    assert kept() == ["v000005"]

def test_digest_matching_agrees_with_a_dict():
    from realm_lm.index.build import match_digests
    rng = np.random.default_rng(0)
    donor = rng.integers(0, 256, (200, 16), dtype=np.uint8)
    donor[50] = donor[10]  # a block twice in the donor
    wanted = np.concatenate([donor[rng.permutation(200)[:120]],  # held there
                             rng.integers(0, 256, (30, 16), dtype=np.uint8),  # new blocks
                             donor[10:11]])
    wanted[121, :8] = donor[3, :8]  # shares a donor's first 8 bytes but not the rest: not a match
    rows = {d.tobytes(): j for j, d in enumerate(donor)}
    expected = np.array([rows.get(d.tobytes(), -1) for d in wanted])
    got = match_digests(wanted, donor)
    assert ((got >= 0) == (expected >= 0)).all()
    assert (donor[got[got >= 0]] == wanted[got >= 0]).all()  # any donor row with the same digest will do
    assert (match_digests(wanted, donor[:0]) == -1).all()


def _embedding_stops_at_batch(doc, batch: int, stop):
    """``doc`` (a document tower) calls ``stop()`` instead of embedding its ``batch``-th batch (1-based); returns the
    list of batch sizes it embedded."""
    embedded, forward = [], doc.forward

    def counting_forward(ids, mask):
        if len(embedded) + 1 == batch:
            stop()
        embedded.append(len(ids))
        return forward(ids, mask)

    doc.forward = counting_forward
    return embedded


def test_a_build_stopped_by_ctrl_c_is_resumed_not_restarted(tiny_cfg, tmp_path, monkeypatch, capsys):
    from dataclasses import replace

    from realm_lm.index import build
    from realm_lm.models.embedder import build_retriever

    build_corpus(tiny_cfg)
    n = len(CorpusStore(tiny_cfg.corpus.store))
    monkeypatch.setattr(build, "SAVE_UNFINISHED_EVERY_S", 1e9)  # only the save on the way out
    doc = build_retriever(tiny_cfg.embedder).doc

    def ctrl_c():
        raise KeyboardInterrupt

    before = _embedding_stops_at_batch(doc, 3, ctrl_c)
    with pytest.raises(KeyboardInterrupt):
        build_index(tiny_cfg, doc_embedder=doc)
    assert latest_version(tiny_cfg.index.dir) is None and len(before) == 2 and sum(before) < n
    assert f"the {sum(before)} blocks embedded so far are kept in" in capsys.readouterr().err
    [(part, manifest)] = build.unfinished_parts(tiny_cfg.index.dir)
    assert manifest["n_rows"] == sum(before)

    del doc.forward
    after = _embedding_stops_at_batch(doc, 0, lambda: None)  # counts only
    m = read_manifest(tiny_cfg.index.dir, build_index(tiny_cfg, progress=False, doc_embedder=doc))
    assert m["rows_from_parts"] == sum(before) and m["rows_embedded"] == sum(after) == n - sum(before)
    assert m["reused_from"] == [] and not (Path(tiny_cfg.index.dir) / build.UNFINISHED).exists()

    whole = replace(tiny_cfg, index=replace(tiny_cfg.index, dir=str(tmp_path / "whole" / "index")))
    fresh = read_manifest(whole.index.dir, build_index(whole, progress=False))
    assert fresh["rows_embedded"] == n and fresh["rows_from_parts"] == 0
    resumed = np.load(Path(tiny_cfg.index.dir) / "versions" / m["version"] / "embeddings.npy")
    np.testing.assert_allclose(resumed, np.load(Path(whole.index.dir) / "versions" / fresh["version"]
                                                / "embeddings.npy"), atol=1e-5)  # [N, D]


def test_a_killed_build_leaves_what_it_saved_and_other_weights_do_not_take_it(tiny_cfg, monkeypatch):
    """SIGKILL: no Python runs on the way out, so only the parts saved as the build went are left."""
    import subprocess
    import sys
    from dataclasses import replace

    from realm_lm.index import build

    build_corpus(tiny_cfg)
    script = f"""
import os, signal, sys
sys.path.insert(0, {str(Path(__file__).parent)!r})
from conftest import ROOT, tiny_overrides
from test_index import _embedding_stops_at_batch
from realm_lm.config import load_config
from realm_lm.index import build
from realm_lm.models.embedder import build_retriever
from pathlib import Path
cfg = load_config(ROOT / "configs" / "tiny.toml", tiny_overrides(Path({str(Path(tiny_cfg.index.dir).parent)!r})))
build.SAVE_UNFINISHED_EVERY_S = 0.0  # a part after every batch
doc = build_retriever(cfg.embedder).doc
_embedding_stops_at_batch(doc, 3, lambda: os.kill(os.getpid(), signal.SIGKILL))
build.build_index(cfg, progress=False, doc_embedder=doc)
"""
    killed = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert killed.returncode == -9, killed.stderr
    parts = list(build.unfinished_parts(tiny_cfg.index.dir))
    assert len(parts) == 2 and latest_version(tiny_cfg.index.dir) is None  # one part a batch, nothing published

    other = replace(tiny_cfg, embedder=replace(tiny_cfg.embedder, seed=tiny_cfg.embedder.seed + 1))  # other weights
    m = read_manifest(other.index.dir, build_index(other, progress=False))
    assert m["rows_from_parts"] == 0 and m["rows_embedded"] == len(CorpusStore(tiny_cfg.corpus.store))
    assert not list(build.unfinished_parts(tiny_cfg.index.dir))  # a build that publishes clears them


def test_refresh_builders_in_shares_publish_one_version_and_builder_0_covers_a_missing_share(tiny_cfg, monkeypatch):
    """The refresh under torchrun: one builder a rank, each embedding a share. Builder 1 only saves its share;
    builder 0 saves its own, takes both and publishes what one builder would have. When a share never comes (its
    builder failed), builder 0 embeds it itself after its wait."""
    from dataclasses import replace

    from realm_lm.index import build
    from realm_lm.models.embedder import build_retriever

    build_corpus(tiny_cfg)
    n = len(CorpusStore(tiny_cfg.corpus.store))
    doc = build_retriever(tiny_cfg.embedder).doc
    elsewhere = Path(tiny_cfg.index.dir).parent / "elsewhere" / "index"  # not beside it: no blocks to take
    one = replace(tiny_cfg, index=replace(tiny_cfg.index, dir=str(elsewhere)))
    reference = np.load(Path(one.index.dir) / "versions" / build_index(one, progress=False, doc_embedder=doc)
                        / "embeddings.npy")

    assert build.build_index_in_shares(tiny_cfg, 1, 2, 7, doc) is None  # builder 1: its share saved, no version
    assert latest_version(tiny_cfg.index.dir) is None
    assert sum(m["n_rows"] for _, m in build.unfinished_parts(tiny_cfg.index.dir)) == n // 2
    matched, match = [], build.match_digests
    monkeypatch.setattr(build, "match_digests", lambda wanted, donor: matched.append(len(donor)) or match(wanted, donor))
    version = build.build_index_in_shares(tiny_cfg, 0, 2, 7, doc)
    m = read_manifest(tiny_cfg.index.dir, version)
    assert (m["rows_from_parts"], m["rows_embedded"], m["embedder_step"]) == (n, 0, 7)
    assert matched == [n]  # the two parts matched in one pass (a resumed build at 13M blocks has hundreds)
    np.testing.assert_allclose(np.load(Path(tiny_cfg.index.dir) / "versions" / version / "embeddings.npy"),
                               reference, atol=1e-5)
    assert not list(build.unfinished_parts(tiny_cfg.index.dir))

    monkeypatch.setattr(build, "SHARE_WAIT_MIN_S", 0.5)
    later = build_retriever(replace(tiny_cfg.embedder, seed=tiny_cfg.embedder.seed + 1)).doc  # new weights
    m = read_manifest(tiny_cfg.index.dir, build.build_index_in_shares(tiny_cfg, 0, 2, 8, later))  # builder 1 failed
    assert (m["rows_from_parts"], m["rows_embedded"], m["embedder_step"]) == (n - n // 2, n // 2, 8)


def test_sigterm_to_realm_index_build_keeps_what_it_embedded(tiny_cfg):
    """A scheduler's SIGTERM stops `realm index build` as Ctrl-C does: the blocks embedded so far are kept."""
    import subprocess
    import sys

    from realm_lm.index import build

    build_corpus(tiny_cfg)
    folder = Path(tiny_cfg.index.dir).parent
    script = f"""
import os, signal, sys
sys.path.insert(0, {str(Path(__file__).parent)!r})
from pathlib import Path
from conftest import ROOT, tiny_overrides
from test_index import _embedding_stops_at_batch
from realm_lm import cli
from realm_lm.index import build
from realm_lm.models import embedder

def stopping_retriever(cfg):
    retriever = embedder.build_retriever(cfg)
    _embedding_stops_at_batch(retriever.doc, 3, lambda: os.kill(os.getpid(), signal.SIGTERM))
    return retriever

build.build_retriever = stopping_retriever
build.SAVE_UNFINISHED_EVERY_S = 1e9  # only the save on the way out
sets = [x for o in tiny_overrides(Path({str(folder)!r})) for x in ("--set", o)]
sys.exit(cli.main(["index", "build", "--config", str(ROOT / "configs" / "tiny.toml"), *sets]))
"""
    stopped = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert stopped.returncode == 130 and "interrupted" in stopped.stderr, stopped.stderr[-2000:]
    [(_, manifest)] = build.unfinished_parts(tiny_cfg.index.dir)
    assert 0 < manifest["n_rows"] < len(CorpusStore(tiny_cfg.corpus.store))
    assert f"the {manifest['n_rows']} blocks embedded so far are kept" in stopped.stderr


def _counting_pools(monkeypatch) -> tuple[list[int], object]:
    """Every Embedder.pool call (one BERT pass over a batch) appends its batch size to the list returned; with
    ``stop_at`` set on the patched function returned, that call raises KeyboardInterrupt instead."""
    from realm_lm.models.embedder import Embedder

    passes, pool = [], Embedder.pool

    def counting_pool(self, ids, mask):
        passes.append(len(ids))
        if len(passes) == getattr(counting_pool, "stop_at", 0):
            raise KeyboardInterrupt
        return pool(self, ids, mask)

    monkeypatch.setattr(Embedder, "pool", counting_pool)
    return passes, counting_pool


def _embeddings(cfg, version) -> np.ndarray:
    return np.load(Path(cfg.index.dir) / "versions" / version / "embeddings.npy")  # [N, D]


def test_towers_sharing_a_body_are_embedded_in_one_pass_as_each_alone(tiny_cfg, tmp_path, monkeypatch):
    from dataclasses import replace

    from realm_lm.index.build import ensure_indexes
    from realm_lm.retrieval import minilm_mean_config

    build_corpus(tiny_cfg)
    n = len(CorpusStore(tiny_cfg.corpus.store))
    cfgs = [tiny_cfg, minilm_mean_config(tiny_cfg)]  # REALM's mean-proj tower and the MiniLM baseline: one BERT
    passes, _ = _counting_pools(monkeypatch)
    versions = ensure_indexes(cfgs)
    assert sum(passes) == n  # every block through BERT once, for both indexes
    assert ensure_indexes(cfgs) == [None, None] and sum(passes) == n  # both current: nothing embedded again
    for cfg, version in zip(cfgs, versions):
        alone = replace(cfg, index=replace(cfg.index, dir=str(tmp_path / "alone" / Path(cfg.index.dir).name)))
        m = read_manifest(cfg.index.dir, version)
        assert m["rows_embedded"] == n and m["embedding_key"] == read_manifest(alone.index.dir, build_index(alone))[
            "embedding_key"]
        np.testing.assert_allclose(_embeddings(cfg, version), _embeddings(alone, latest_version(alone.index.dir)),
                                   atol=1e-5)
    assert _embeddings(cfgs[0], versions[0]).shape == (n, 16) and _embeddings(cfgs[1], versions[1]).shape[0] == n


def test_a_stopped_pass_for_two_towers_keeps_both_shares_and_the_next_goes_on(tiny_cfg, monkeypatch):
    from realm_lm.index import build
    from realm_lm.retrieval import minilm_mean_config

    build_corpus(tiny_cfg)
    n = len(CorpusStore(tiny_cfg.corpus.store))
    cfgs = [tiny_cfg, minilm_mean_config(tiny_cfg)]
    monkeypatch.setattr(build, "SAVE_UNFINISHED_EVERY_S", 1e9)  # only the save on the way out
    passes, counting_pool = _counting_pools(monkeypatch)
    counting_pool.stop_at = 3
    with pytest.raises(KeyboardInterrupt):
        build.ensure_indexes(cfgs)
    embedded = sum(passes[:2])
    for cfg in cfgs:
        assert latest_version(cfg.index.dir) is None
        assert [m["n_rows"] for _, m in build.unfinished_parts(cfg.index.dir)] == [embedded]
    counting_pool.stop_at = 0
    passes.clear()
    versions = build.ensure_indexes(cfgs)
    assert sum(passes) == n - embedded  # the rest only, through BERT once
    for cfg, version in zip(cfgs, versions):
        m = read_manifest(cfg.index.dir, version)
        assert m["rows_from_parts"] == embedded and m["rows_embedded"] == n - embedded


def test_towers_of_other_bodies_are_built_apart(tiny_cfg):
    from dataclasses import replace

    from realm_lm.index.build import build_indexes, ensure_indexes
    from realm_lm.retrieval import minilm_mean_config

    build_corpus(tiny_cfg)
    cls = replace(tiny_cfg, embedder=replace(tiny_cfg.embedder, pooling="cls-proj"))  # pools BERT otherwise
    cfgs = [cls, minilm_mean_config(tiny_cfg)]
    with pytest.raises(ValueError, match="do not share"):
        build_indexes(cfgs)
    versions = ensure_indexes(cfgs)
    assert all(read_manifest(c.index.dir, v)["rows_embedded"] == len(CorpusStore(c.corpus.store))
               for c, v in zip(cfgs, versions))
