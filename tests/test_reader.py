"""The span reader and the QA losses (issue 4's first pieces): spans stay in the block, losses match loops."""

import math

import pytest
import torch
from transformers import BertModel

from realm_lm.eval.metrics import exact_match, f1_score
from realm_lm.losses import reader_marginal_nll, retriever_marginal_nll
from realm_lm.models.embedder import tiny_bert_config
from realm_lm.models.reader import Reader, enumerate_spans


def test_spans_stay_inside_the_block_and_respect_the_width():
    torch.manual_seed(0)
    reader = Reader(BertModel(tiny_bert_config(108), add_pooling_layer=False), span_hidden=16, max_width=3)
    ids = torch.randint(5, 108, (2, 12))
    block = torch.zeros(2, 12, dtype=torch.bool)
    block[0, 5:11] = True  # [CLS] q q q [SEP] b b b b b b [SEP]
    block[1, 3:6] = True
    out = reader(ids, torch.ones_like(ids), torch.zeros_like(ids), block)
    for row in range(2):
        for s, (a, b) in enumerate(zip(out.starts.tolist(), out.ends.tolist())):
            assert b - a < 3
            inside = bool(block[row, a]) and bool(block[row, b])
            assert bool(out.allowed[row, s]) == inside
            assert math.isfinite(float(out.logits[row, s].detach())) == inside
    assert int(out.allowed[1].sum()) == 3 + 2 + 1  # a 3-wordpiece block has 6 spans of width <= 3


def test_enumerate_spans():
    starts, ends = enumerate_spans(4, 2)
    assert list(zip(starts.tolist(), ends.tolist())) == [(0, 0), (0, 1), (1, 1), (1, 2), (2, 2), (2, 3), (3, 3)]


def naive_reader_loss(span_logits, retrieval_logits, gold):
    total, count = 0.0, 0
    for b in range(span_logits.shape[0]):
        pairs = [(z, s) for z in range(span_logits.shape[1]) for s in range(span_logits.shape[2])]
        weight = lambda z, s: math.exp(float(span_logits[b, z, s]) + float(retrieval_logits[b, z]))  # noqa: E731
        good = sum(weight(z, s) for z, s in pairs if gold[b, z, s])
        if good == 0:
            continue
        total += -math.log(good / sum(weight(z, s) for z, s in pairs))
        count += 1
    return total / count


def test_reader_loss_matches_a_naive_loop_and_skips_questions_without_answers():
    g = torch.Generator().manual_seed(0)
    span_logits = torch.randn(3, 4, 6, generator=g, dtype=torch.float64)
    retrieval = torch.randn(3, 4, generator=g, dtype=torch.float64)
    gold = torch.zeros(3, 4, 6, dtype=torch.bool)
    gold[0, 1, 2] = gold[0, 3, 5] = gold[2, 0, 0] = True  # question 1 has no matching span
    got = reader_marginal_nll(span_logits, retrieval, gold).item()
    assert got == pytest.approx(naive_reader_loss(span_logits, retrieval, gold))
    assert reader_marginal_nll(span_logits, retrieval, torch.zeros_like(gold)).item() == 0.0


def test_retriever_loss_matches_a_naive_loop():
    logits = torch.tensor([[1.0, 2.0, 0.5], [0.0, 0.0, 0.0]], dtype=torch.float64)
    has = torch.tensor([[True, False, True], [False, False, False]])
    p = [math.exp(x) for x in (1.0, 2.0, 0.5)]
    expected = -math.log((p[0] + p[2]) / sum(p))
    assert retriever_marginal_nll(logits, has).item() == pytest.approx(expected)


@pytest.mark.parametrize("prediction, answers, regex, em", [
    ("The Denver Broncos", ["Denver Broncos"], False, True),
    ("denver broncos.", ["Denver Broncos"], False, True),
    ("Broncos", ["Denver Broncos"], False, False),
    ("Café", ["cafe"], False, False),  # accents are kept, as in SQuAD's script
    ("1,000", ["1000"], False, True),
    ("George Washington", [r"(George )?Washington"], True, True),
    ("Washington D.C.", [r"(George )?Washington"], True, False),
])
def test_exact_match(prediction, answers, regex, em):
    assert exact_match(prediction, answers, regex) is em


def test_f1():
    assert f1_score("the Denver Broncos won", ["Denver Broncos"]) == pytest.approx(0.8)
    assert f1_score("nothing", ["Denver Broncos"]) == 0.0
