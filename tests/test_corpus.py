import json
from pathlib import Path

import numpy as np
import pytest

from realm_lm.config import load_config
from realm_lm.corpus.blocks import block_id_of, cut_documents
from realm_lm.corpus.readers import CorpusInputError, Document
from realm_lm.corpus.store import CorpusStore, build_corpus
from realm_lm.models.pretrained import SpecialIds, load_tokenizer, resolve_model_dir

from conftest import FIXTURES, ROOT, tiny_overrides

TEXTS = [
    "Short one.",
    "The first sentence is here. And a second, longer sentence follows it! Does a third ask something? "
    "Yes: and the fourth one is much longer than the others, with many words that go on and on and on "
    "until the block limit has to cut it somewhere in the middle of the sentence itself.",
    "supercalifragilisticexpialidocious " * 12,  # long words: cuts must still respect the limit
    "Ünïcödé text — with dashes, “quotes” and 1,234.56 numbers. Second sentence.",
]


@pytest.fixture(scope="module")
def tok():
    return load_tokenizer(resolve_model_dir(str(FIXTURES / "tiny-bert")))


@pytest.mark.parametrize("block_len", [16, 24, 40, 288])
def test_block_cutting_properties(tok, block_len):
    special = SpecialIds(tok)
    docs = [Document(f"d{i}", f"Title {i}", t, "mem") for i, t in enumerate(TEXTS)]
    for doc, blocks in zip(docs, cut_documents(docs, tok, special, block_len, max_title_len=4)):
        assert blocks, "every non-empty document gives blocks"
        assert "".join(b.text for b in blocks) == doc.text  # nothing lost, nothing duplicated
        title_ids = tok.encode(doc.title, add_special_tokens=False).ids[:4]
        bodies = [b.token_ids[len(title_ids) + 2:-1] for b in blocks]
        assert sum(bodies, []) == tok.encode(doc.text, add_special_tokens=False).ids  # the wordpieces, too
        for b, body in zip(blocks, bodies):  # each block's wordpieces are those of its own text (a word too
            # long for one block is cut inside, so its second half starts with a ##piece)
            own = tok.decode(tok.encode(b.text, add_special_tokens=False).ids)
            assert tok.decode(body).removeprefix("##") == own
        for b in blocks:
            assert len(b.token_ids) <= block_len
            assert b.token_ids[:len(title_ids) + 2] == [special.cls, *title_ids, special.sep]  # title kept
            assert b.token_ids[-1] == special.sep
            assert b.title == doc.title and b.block_id == block_id_of(doc.title, b.text)


def test_blocks_prefer_sentence_boundaries(tok):
    special = SpecialIds(tok)
    doc = Document("d", "T", "The river is long. The city is old. The king was tall.", "mem")
    [blocks] = cut_documents([doc], tok, special, block_len=24, max_title_len=4)
    assert len(blocks) > 1
    assert all(b.text.rstrip().endswith(".") for b in blocks)


def test_store_round_trip_and_stable_ids(tiny_cfg, tmp_path):
    build_corpus(tiny_cfg)
    first = CorpusStore(tiny_cfg.corpus.store)
    assert len(first) > 10
    assert first.tokens.shape == (len(first), tiny_cfg.corpus.block_len)
    assert isinstance(first.tokens, np.memmap)
    again = build_corpus(tiny_cfg, out=tmp_path / "again")
    second = CorpusStore(again)
    assert first.block_ids == second.block_ids and first.corpus_hash == second.corpus_hash
    assert first.manifest["config"]["corpus"]["block_len"] == tiny_cfg.corpus.block_len
    # every document comes back whole from its blocks, in order
    docs = {json.loads(l)["id"]: json.loads(l)["text"] for l in (FIXTURES / "tiny_docs.jsonl").read_text().splitlines()}
    for doc_id, text in docs.items():
        assert "".join(t for d, t in zip(first.doc_ids, first.texts) if d == doc_id) == text


def test_the_store_keeps_its_block_digests_and_an_older_store_computes_them(tiny_cfg):
    """Index builds match blocks by these digests; written with the store, they cost a build no hashing."""
    import hashlib

    folder = build_corpus(tiny_cfg)
    store = CorpusStore(folder)
    kept = np.load(folder / "block_digests.npy")
    row = 3
    assert kept[row].tobytes() == hashlib.blake2b(store.tokens[row, :store.lengths[row]].tobytes(),
                                                  digest_size=16).digest()
    assert len(np.unique(kept, axis=0)) == len(store)  # the tiny corpus has no two blocks alike
    (folder / "block_digests.npy").unlink()  # a store written before they were kept
    np.testing.assert_array_equal(CorpusStore(folder).block_digests, kept)
    np.testing.assert_array_equal(store.block_digests, kept)


def _cfg_with_input(tmp_path, content: str, name: str = "docs.jsonl", *extra: str):
    path = tmp_path / name
    path.write_text(content)
    return load_config(ROOT / "configs" / "tiny.toml",
                       tiny_overrides(tmp_path, f"corpus.inputs=[\"{path}\"]", *extra))


def test_malformed_jsonl_line_is_reported_and_nothing_is_written(tmp_path):
    good = json.dumps({"id": "a", "title": "T", "text": "the river is long."})
    cfg = _cfg_with_input(tmp_path, f"{good}\n{{not json\n{json.dumps({'id': 'b', 'title': 'T'})}\n")
    with pytest.raises(CorpusInputError) as err:
        build_corpus(cfg)
    message = str(err.value)
    assert "docs.jsonl:2: not valid JSON" in message
    assert "docs.jsonl:3: missing or non-string field(s): text" in message
    assert not Path(cfg.corpus.store).exists()
    assert not list(tmp_path.glob(".corpus.staging-*"))


def test_skip_malformed_keeps_the_record_of_what_was_skipped(tmp_path):
    good = json.dumps({"id": "a", "title": "T", "text": "the river is long."})
    cfg = _cfg_with_input(tmp_path, f"{good}\n{{not json\n", "docs.jsonl", "corpus.skip_malformed=true")
    build_corpus(cfg)
    store = CorpusStore(cfg.corpus.store)
    assert len(store) == 1
    assert store.manifest["skipped_input_problems"] == [f"{tmp_path / 'docs.jsonl'}:2: not valid JSON (Expecting property name enclosed in double quotes)"]


def test_empty_file_is_an_error(tmp_path):
    with pytest.raises(CorpusInputError, match="empty file"):
        build_corpus(_cfg_with_input(tmp_path, ""))


def test_readers_for_every_format(tmp_path):
    squad = {"data": [{"title": "Some_Article", "paragraphs": [{"context": "The tower is tall.", "qas": []}]}]}
    vital = {"River": {"title": "River", "extract": "A river flows.", "description": "", "topic": ""}}
    (tmp_path / "squad.json").write_text(json.dumps(squad))
    (tmp_path / "vital.json").write_text(json.dumps(vital))
    (tmp_path / "Plain_Doc.txt").write_text("Plain text here.\n")
    paths = ",".join(f'"{tmp_path / n}"' for n in ("squad.json", "vital.json", "Plain_Doc.txt"))
    cfg = load_config(ROOT / "configs" / "tiny.toml", tiny_overrides(tmp_path, f"corpus.inputs=[{paths}]"))
    build_corpus(cfg)
    store = CorpusStore(cfg.corpus.store)
    assert sorted(store.titles) == ["Plain Doc", "River", "Some Article"]
    assert sorted(t.strip() for t in store.texts) == ["A river flows.", "Plain text here.", "The tower is tall."]
