import numpy as np
import pytest

from realm_lm.corpus.store import CorpusStore, build_corpus
from realm_lm.masking import (DATE_RE, SentenceSpans, build_sentence_table, keep_spans, mask_query, salient_spans,
                              spans_per_sentence)
from realm_lm.models.pretrained import SpecialIds, load_tokenizer, resolve_model_dir

from conftest import FIXTURES


@pytest.fixture(scope="module")
def special():
    return SpecialIds(load_tokenizer(resolve_model_dir(str(FIXTURES / "tiny-bert"))))


@pytest.mark.parametrize("mode", ["salient", "random-span", "random-uniform"])
def test_masks_respect_the_limits_and_never_hit_special_tokens(special, mode):
    rng = np.random.default_rng(0)
    for trial in range(200):
        n = int(rng.integers(3, 80))
        sentence = rng.integers(10, 100, size=n)
        a = int(rng.integers(0, n - 1))
        spans = np.array([[a, min(n, a + int(rng.integers(1, 4)))]])
        q = mask_query(sentence, special, mode, rng, spans, query_len=24, max_masks=4)
        if q is None:
            continue
        assert len(q.input_ids) <= 24
        assert q.input_ids[0] == special.cls and q.input_ids[-1] == special.sep
        assert 1 <= len(q.mask_positions) <= 4
        assert all(0 < p < len(q.input_ids) - 1 for p in q.mask_positions)  # never [CLS], [SEP] (no padding here)
        assert (q.input_ids[q.mask_positions] == special.mask).all()
        assert not np.isin(q.labels, [special.cls, special.sep, special.pad, special.mask]).any()
        if mode == "salient":  # exactly the salient span's wordpieces
            assert list(q.labels) == list(sentence[spans[0, 0]:spans[0, 1]])


def test_salient_mode_needs_a_span(special):
    assert mask_query(np.arange(10, 20), special, "salient", np.random.default_rng(0), np.zeros((0, 2), int), 24, 4) is None


def test_keep_spans_keeps_each_span_under_its_sentence():
    spans = SentenceSpans(np.array([0, 2, 2, 5]), np.array([[0, 1], [3, 4], [1, 2], [5, 7], [8, 9]]))
    kept = keep_spans(spans, np.array([False, True, True, False, True]))
    assert [kept.of(s).tolist() for s in range(3)] == [[[3, 4]], [], [[1, 2], [8, 9]]]
    assert len(keep_spans(spans, np.zeros(5, bool)).tok) == 0


def test_date_regex():
    text = "It opened on February 7, 2016 and closed in March 2017; built in the 1920s, rebuilt 1887."
    assert [m.group() for m in DATE_RE.finditer(text)] == ["February 7, 2016", "March 2017", "1920s", "1887"]


def test_salient_spans_are_found_once_and_cached(tiny_cfg):
    build_corpus(tiny_cfg)
    store = CorpusStore(tiny_cfg.corpus.store)
    rows, chars = salient_spans(store)
    assert len(rows) > 5
    texts = [store.texts[r][a:b] for r, (a, b) in zip(rows, chars)]
    assert "1204" in texts and any("Aldermoor" in t for t in texts)
    cached = list(store.folder.glob("salient_spans-*.parquet"))
    assert len(cached) == 1
    rows2, chars2 = salient_spans(store)
    assert (rows2 == rows).all() and (chars2 == chars).all()
    table = build_sentence_table(store, resolve_model_dir(tiny_cfg.embedder.model), min_tokens=1)
    spans = spans_per_sentence(table, rows, chars, max_masks=10)
    assert spans.start[-1] > 0


def test_missing_ner_model_is_a_clear_error(monkeypatch):
    import spacy

    from realm_lm.masking import NerUnavailableError, tagger_version

    def no_model(*_args, **_kwargs):
        raise OSError("[E050] Can't find model")

    monkeypatch.setattr(spacy, "load", no_model)
    with pytest.raises(NerUnavailableError, match="pretrain.masking=random-span"):
        tagger_version()


def test_without_the_ner_model_the_corpus_cached_spans_are_used(tiny_cfg, monkeypatch):
    import spacy

    from realm_lm.masking import NerUnavailableError

    build_corpus(tiny_cfg)
    store = CorpusStore(tiny_cfg.corpus.store)
    monkeypatch.setattr(spacy, "load", lambda *a, **k: (_ for _ in ()).throw(OSError("[E050] Can't find model")))
    for cache in store.folder.glob("salient_spans-*.parquet"):
        cache.unlink()
    with pytest.raises(NerUnavailableError):  # nothing cached: say so
        salient_spans(store)
    monkeypatch.undo()
    rows, chars = salient_spans(store)  # found with spaCy, cached with the corpus hash
    monkeypatch.setattr(spacy, "load", lambda *a, **k: (_ for _ in ()).throw(OSError("[E050] Can't find model")))
    rows2, chars2 = salient_spans(store)
    assert (rows2 == rows).all() and (chars2 == chars).all()
