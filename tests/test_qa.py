"""Open-domain QA: spans stay in the block, gold spans, losses against loops, answer matching, fine-tune + eval +
ask end to end on the tiny corpus, corpus swap, and bad input."""

import io
import json
import math
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file
from transformers import BertModel

from realm_lm.answer import Answerer
from realm_lm.config import load_config
from realm_lm.corpus.questions import QaFileError, Question, read_qa_file
from realm_lm.corpus.store import CorpusStore, build_corpus
from realm_lm.models.pretrained import SpecialIds, load_tokenizer
from realm_lm.retrieval import BadQuestionError
from realm_lm.train.data import (answer_pieces, blocks_to_read, gold_span_mask, question_ids, reader_batch,
                                 regex_answer_pieces)
from realm_lm.train.checkpoint import latest_checkpoint
from realm_lm.train.finetune import FinetuneRecipe, QaModel
from realm_lm.train.loop import clip_each_group

from realm_lm.eval.metrics import exact_match, f1_score
from realm_lm.eval.qa import evaluate_qa
from realm_lm.losses import reader_marginal_nll, retriever_marginal_nll
from realm_lm.models.embedder import Embedder, Retriever, tiny_bert_config
from realm_lm.models.reader import Reader, enumerate_spans

from conftest import FIXTURES, ROOT, tiny_overrides


def test_spans_stay_inside_the_block_and_respect_the_width():
    torch.manual_seed(0)
    reader = Reader(BertModel(tiny_bert_config(108), add_pooling_layer=False), span_hidden=16, max_width=3)
    ids = torch.randint(5, 108, (2, 12))
    block = torch.zeros(2, 12, dtype=torch.bool)
    block[0, 5:11] = True  # [CLS] q q q [SEP] b b b b b b [SEP]
    block[1, 3:6] = True
    out = reader(ids, torch.ones_like(ids), torch.zeros_like(ids), block, block)
    for row in range(2):
        for s, (a, b) in enumerate(zip(out.starts.tolist(), out.ends.tolist())):
            assert b - a < 3
            inside = bool(block[row, a]) and bool(block[row, b])
            assert bool(out.allowed[row, s]) == inside
            assert math.isfinite(float(out.logits[row, s].detach())) == inside
    assert int(out.allowed[1].sum()) == 3 + 2 + 1  # a 3-wordpiece block has 6 spans of width <= 3


def test_span_scores_do_not_depend_on_the_chunk_size(monkeypatch):
    import realm_lm.models.reader as reader_module

    torch.manual_seed(0)
    reader = Reader(BertModel(tiny_bert_config(108), add_pooling_layer=False), span_hidden=16, max_width=4).eval()
    ids = torch.randint(5, 108, (3, 20))
    ok = torch.zeros(3, 20, dtype=torch.bool)
    ok[:, 6:19] = True
    whole = reader(ids, torch.ones_like(ids), torch.zeros_like(ids), ok, ok).logits
    monkeypatch.setattr(reader_module, "SPAN_CHUNK", 7)  # 138 allowed spans: 20 chunks, the last one short
    chunked = reader(ids, torch.ones_like(ids), torch.zeros_like(ids), ok, ok).logits
    assert torch.equal(whole.isfinite(), chunked.isfinite())
    torch.testing.assert_close(chunked[whole.isfinite()], whole[whole.isfinite()])


def test_the_int8_reader_quantises_each_linear_layer_per_output_channel():
    from realm_lm.answer import quantize_int8

    torch.manual_seed(0)
    reader = Reader(BertModel(tiny_bert_config(108), add_pooling_layer=False), span_hidden=16, max_width=4).eval()
    ids = torch.randint(5, 108, (3, 20))
    ok = torch.zeros(3, 20, dtype=torch.bool)
    ok[:, 6:19] = True
    full = reader(ids, torch.ones_like(ids), torch.zeros_like(ids), ok, ok).logits  # [3, spans]
    n_linear = sum(isinstance(m, torch.nn.Linear) for m in reader.modules())
    quantised = quantize_int8(reader)
    dynamic = [m for m in quantised.modules() if isinstance(m, torch.ao.nn.quantized.dynamic.Linear)]
    assert len(dynamic) == n_linear and not any(isinstance(m, torch.nn.Linear) for m in quantised.modules())
    # one scale per output channel: one per tensor cost 3.5 EM on Open-SQuAD (benchmarks/README.md)
    assert {m.weight().qscheme() for m in dynamic} == {torch.per_channel_affine}
    int8 = quantised(ids, torch.ones_like(ids), torch.zeros_like(ids), ok, ok).logits
    real = full.isfinite()
    assert torch.equal(int8.isfinite(), real)  # the same spans allowed
    assert (int8[real] - full[real]).abs().mean() < 0.1 * full[real].std()  # ~0.02 here; unrelated scores: ~1.1


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


# -- reader inputs from the corpus store ---------------------------------------------------------------------------
@pytest.fixture
def tiny_store(tiny_cfg):
    build_corpus(tiny_cfg)
    return CorpusStore(tiny_cfg.corpus.store)


def test_reader_rows_and_span_masks(tiny_store):
    tok = load_tokenizer(FIXTURES / "tiny-bert")
    special = SpecialIds(tok)
    q = question_ids(tok, ["who built the tower", "x " * 100], special, max_len=16)
    assert len(q[1]) == 16 and q[1][0] == special.cls and q[1][-1] == special.sep
    rows = np.array([[0, 1, 2], [3, 4, 5]])
    batch = reader_batch(tiny_store, q, rows, tok, special, max_len=40)
    assert batch.input_ids.shape[0] == 6 and batch.input_ids.shape[1] <= 40
    for n in range(6):
        length = int(batch.attention_mask[n].sum())
        ids = batch.input_ids[n, :length].tolist()
        body = torch.nonzero(batch.block_mask[n]).flatten().tolist()
        assert ids[0] == special.cls and ids[-1] == special.sep
        assert body == list(range(batch.body_start[n], body[-1] + 1))  # contiguous
        assert ids[batch.body_start[n] - 1] == special.sep and body[-1] == length - 2  # between the [SEP]s
        assert special.sep not in [ids[i] for i in body]
        assert not (batch.start_ok[n] & ~batch.block_mask[n]).any() and not (batch.end_ok[n] & ~batch.block_mask[n]).any()
        pieces = [tok.id_to_token(i) for i in ids]
        assert not any(pieces[i].startswith("##") for i in torch.nonzero(batch.start_ok[n]).flatten().tolist())
        assert not any(i + 1 < length and pieces[i + 1].startswith("##")
                       for i in torch.nonzero(batch.end_ok[n]).flatten().tolist())


def test_gold_spans_are_found_where_the_answer_is(tiny_store):
    tok = load_tokenizer(FIXTURES / "tiny-bert")
    special = SpecialIds(tok)
    row = next(r for r, t in enumerate(tiny_store.texts) if "1170" in t)
    q = question_ids(tok, ["when was orin born"], special, 16)
    batch = reader_batch(tiny_store, q, np.array([[row, (row + 1) % len(tiny_store)]]), tok, special, max_len=64)
    starts, ends = enumerate_spans(batch.input_ids.shape[1], 4)
    gold = gold_span_mask(batch, [answer_pieces(tok, ["1170"])], k=2, max_width=4, starts=starts, ends=ends)
    assert gold.shape == (1, 2, len(starts)) and gold[0, 0].any()
    for s in torch.nonzero(gold[0, 0]).flatten().tolist():
        span = batch.input_ids[0, starts[s]:ends[s] + 1].tolist()
        assert tok.decode(span).replace(" ", "") == "1170"
        assert batch.block_mask[0, starts[s]] and batch.block_mask[0, ends[s]]


def test_gold_spans_lie_on_word_boundaries(tiny_store):
    tok = load_tokenizer(FIXTURES / "tiny-bert")
    special = SpecialIds(tok)
    for row in range(len(tiny_store)):  # the first block with a split word
        batch = reader_batch(tiny_store, question_ids(tok, ["who"], special, 8), np.array([[row]]), tok, special,
                             max_len=64)
        body = batch.input_ids[0][batch.block_mask[0]].tolist()
        cut = next((i for i in range(1, len(body)) if tok.id_to_token(body[i]).startswith("##")), None)
        if cut is not None:
            break
    assert cut is not None, "the tiny corpus has no split word"
    starts, ends = enumerate_spans(batch.input_ids.shape[1], 4)
    inside_word = [np.asarray(body[cut - 1:cut], dtype=np.int64)]  # the head of a split word, alone: not an answer
    assert not gold_span_mask(batch, [inside_word], 1, 4, starts, ends).any()


def test_blocks_to_read_keeps_the_best_answer_block_and_the_top_others():
    has_answer = np.array([[False, False, False, True, True],
                           [False, False, False, False, False],
                           [True, False, False, False, False]])
    questions, ranks = blocks_to_read(has_answer, 2)
    assert questions.tolist() == [0, 2]  # the question without an answer is not read
    assert ranks.tolist() == [[0, 3], [0, 1]]
    questions, ranks = blocks_to_read(has_answer, 0)
    assert questions.tolist() == [0, 2] and ranks.tolist() == [[0, 1, 2, 3, 4]] * 2
    for n in range(1, 6):
        _, ranks = blocks_to_read(has_answer, n)
        assert all(has_answer[q, r].any() for q, r in zip([0, 2], ranks))  # every question reads an answer


def test_each_group_is_clipped_on_its_own():
    small, large = torch.nn.Parameter(torch.zeros(3)), torch.nn.Parameter(torch.zeros(4))
    opt = torch.optim.AdamW([{"params": [small]}, {"params": [large]}], lr=1e-3)
    small.grad = torch.tensor([0.3, 0.0, 0.4])  # norm 0.5: under the limit, left alone
    large.grad = torch.full((4,), 50.0)  # norm 100: scaled to 1 without touching the other group
    clip_each_group(opt, 1.0)
    assert torch.allclose(small.grad, torch.tensor([0.3, 0.0, 0.4]))
    assert torch.allclose(large.grad.norm(), torch.tensor(1.0))


# -- question files -----------------------------------------------------------------------------------------------
def test_qa_file_errors_name_the_line(tmp_path):
    good = tmp_path / "qa.jsonl"
    good.write_text('{"question": "Who?", "answers": ["Orin"]}\n\n{"question": "When?", "answers": ["1170", "1170"]}\n')
    assert [q.answers for q in read_qa_file(good)] == [("Orin",), ("1170",)]
    for body, message in [('{"answers": ["x"]}', "missing or empty \"question\""),
                          ('{"question": "Who?"}', "\"answers\" must be"),
                          ('{"question": "Who?", "answers": []}', "\"answers\" must be"),
                          ('{"question": "  ", "answers": ["x"]}', "missing or empty"),
                          ("not json", "not valid JSON")]:
        bad = tmp_path / "bad.jsonl"
        bad.write_text('{"question": "Who?", "answers": ["Orin"]}\n' + body + "\n")
        with pytest.raises(QaFileError, match=message) as err:
            read_qa_file(bad)
        assert "bad.jsonl:2" in str(err.value)


def test_squad_json_with_a_missing_field_names_where(tmp_path):
    qa = {"id": "q1", "question": "Who?", "answers": [{"text": "Orin", "answer_start": 0}]}
    squad = {"data": [{"title": "T", "paragraphs": [{"context": "Orin.", "qas": [qa]}]}]}
    good = tmp_path / "good.json"
    good.write_text(json.dumps(squad))
    assert [q.answers for q in read_qa_file(good)] == [("Orin",)]
    del qa["question"]
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps(squad))
    with pytest.raises(QaFileError, match="article 0, paragraph 0, question 0: missing field 'question'"):
        read_qa_file(bad)


def test_squad_2_unanswerable_questions_are_skipped_and_said_so(tmp_path, capsys):
    answerable = {"id": "q1", "question": "Who?", "answers": [{"text": "Orin", "answer_start": 0}]}
    unanswerable = {"id": "q2", "question": "Why?", "answers": [], "is_impossible": True,
                    "plausible_answers": [{"text": "Orin", "answer_start": 0}]}
    squad = {"version": "v2.0", "data": [{"title": "T", "paragraphs": [{"context": "Orin.",
                                                                        "qas": [answerable, unanswerable]}]}]}
    path = tmp_path / "squad2.json"
    path.write_text(json.dumps(squad))
    assert [q.qid for q in read_qa_file(path)] == ["q1"]  # an open-domain miss on q2 would count as a wrong answer
    assert "skipped 1 question(s) without an answer" in capsys.readouterr().err
    squad["data"][0]["paragraphs"][0]["qas"] = [unanswerable]
    path.write_text(json.dumps(squad))
    with pytest.raises(QaFileError, match="no questions"):
        read_qa_file(path)


def test_a_bad_answer_pattern_fails_before_any_question_is_answered():
    questions = [Question("q1", "Who?", (r"(George )?Washington",)), Question("q2", "When?", (r"19(37",))]
    with pytest.raises(QaFileError, match=r"question 'q2': answer '19\(37' is not a valid regular expression"):
        evaluate_qa(None, questions, regex=True)  # no answerer needed: the check comes first


# -- fine-tuning, evaluation, answering ---------------------------------------------------------------------------
def finetune_cfg(tmp_path, *extra):
    return load_config(ROOT / "configs" / "tiny.toml", tiny_overrides(tmp_path, "reader.top_k=16", *extra))


@pytest.mark.parametrize("reader_blocks", [0, 2])
def test_finetune_trains_query_tower_and_reader_not_the_doc_tower(tmp_path, reader_blocks):
    cfg = finetune_cfg(tmp_path, f"finetune.reader_blocks={reader_blocks}", "finetune.query_lr_scale=0.25")
    build_corpus(cfg)
    recipe = FinetuneRecipe(cfg)
    recipe.setup(progress=False)
    group_lr = {id(p): g["initial_lr"] for g in recipe.opt.param_groups for p in g["params"]}
    f = cfg.finetune
    assert group_lr[id(next(recipe.model.retriever.query.parameters()))] == pytest.approx(f.lr * 0.25)
    assert group_lr[id(recipe.model.reader.score.weight)] == pytest.approx(f.lr * f.head_lr_scale)
    assert group_lr[id(next(recipe.model.reader.bert.parameters()))] == pytest.approx(f.lr)
    assert not any(id(p) in group_lr for p in recipe.model.retriever.doc.parameters())
    log_scale = recipe.model.retrieval_scale.log_scale
    scale_group = next(g for g in recipe.opt.param_groups if any(p is log_scale for p in g["params"]))
    assert scale_group["initial_lr"] == pytest.approx(f.lr * f.head_lr_scale) and scale_group["weight_decay"] == 0
    assert log_scale.exp().item() == pytest.approx(f.retrieval_scale)
    scale_before = log_scale.item()
    doc_before = {k: v.clone() for k, v in recipe.model.retriever.doc.state_dict().items()}
    query_before = {k: v.clone() for k, v in recipe.model.retriever.query.state_dict().items()}
    reader_before = {k: v.clone() for k, v in recipe.model.reader.state_dict().items()}
    out = recipe.forward(np.arange(len(recipe.questions)))  # every question: some find their answer
    assert float(out["answer_in_topk"]) > 0 and torch.isfinite(out["loss"])
    recipe.step = 0
    history = recipe.train(progress=False)
    assert len(history) == cfg.finetune.steps and all(math.isfinite(h["loss"]) for h in history)
    changed = lambda before, module: any(not torch.equal(before[k], v) for k, v in module.state_dict().items())  # noqa: E731
    assert not changed(doc_before, recipe.model.retriever.doc)
    assert changed(query_before, recipe.model.retriever.query) and changed(reader_before, recipe.model.reader)
    assert log_scale.item() != scale_before  # the losses calibrate the retrieval scale


@pytest.mark.parametrize("mode", ["joint", "detached", "initial"])
def test_what_the_reader_trains_on_and_whether_its_loss_trains_the_query_tower(tmp_path, mode):
    """finetune.reader_retrieval. joint (ORQA / REALM): the reader's loss reaches the query tower through p(z|x);
    detached: the tower's gradient is the retriever loss's alone; initial: that too, and the reader trains on the
    blocks and logits of the tower as it started, so moving the trained tower leaves the reader's loss as it was.
    In every mode the retrieval scale learns from the reader's loss."""
    build_corpus(finetune_cfg(tmp_path))
    recipe = FinetuneRecipe(finetune_cfg(tmp_path, f"finetune.run_dir={tmp_path / mode}", "finetune.reader_blocks=2",
                                         f"finetune.reader_retrieval={mode}"))
    recipe.setup(progress=False)
    recipe.model.eval()  # no dropout: both gradients below come from one forward pass
    every = np.arange(len(recipe.questions))
    out = recipe.forward(every)
    assert out["reader_loss"].item() > 0
    query = [*recipe.model.retriever.query.parameters()]
    weight = recipe.cfg.finetune.retriever_loss_weight
    from_retriever = torch.autograd.grad(weight * out["retriever_loss"], query, retain_graph=True)
    from_both = torch.autograd.grad(out["loss"], query, retain_graph=True)
    same = all(torch.allclose(a, b, rtol=1e-5, atol=1e-8) for a, b in zip(from_retriever, from_both))
    assert same == (mode != "joint")
    assert torch.autograd.grad(out["reader_loss"], recipe.model.retrieval_scale.log_scale)[0].abs() > 0

    with torch.no_grad():  # a trained tower that now retrieves otherwise
        for p in query:
            p.add_(torch.randn_like(p))
        moved = recipe.forward(every)
    assert moved["retriever_loss"].item() != out["retriever_loss"].item()
    assert (moved["reader_loss"].item() == out["reader_loss"].item()) == (mode == "initial")


def test_finetuning_on_regex_answers_takes_as_gold_what_the_patterns_match_in_the_blocks(tmp_path):
    """CuratedTrec's answers are patterns: the gold spans are the strings they match in the retrieved blocks. Escaped
    literal answers must train exactly as the literal answers do; a pattern's every match is gold."""
    import re

    tok = load_tokenizer(FIXTURES / "tiny-bert")
    found = regex_answer_pieces(tok, (r"\d+ km",), ["The river is 400 km long", "and 12 KM wide.", "no length"])
    assert sorted(tok.decode(p.tolist()) for p in found) == ["12 km", "400 km"]

    literal = read_qa_file(FIXTURES / "tiny_qa.jsonl")
    patterns = tmp_path / "regex_qa.jsonl"
    patterns.write_text("".join(json.dumps({"question": q.question, "answers": [re.escape(a) for a in q.answers]}) + "\n"
                                for q in literal))
    losses = []
    for name, extra in (("literal", ()), ("regex", (f"finetune.questions={patterns}", "eval.regex_answers=true"))):
        recipe = FinetuneRecipe(finetune_cfg(tmp_path, f"finetune.run_dir={tmp_path / name}", *extra))
        if name == "literal":
            build_corpus(recipe.cfg)
        recipe.setup(progress=False)
        out = recipe.forward(np.arange(len(recipe.questions)))
        assert float(out["answer_in_topk"]) > 0
        losses.append(tuple(float(out[key].detach()) for key in ("reader_loss", "retriever_loss", "answer_in_topk")))
    assert losses[1] == pytest.approx(losses[0], rel=1e-5)

    bad = tmp_path / "bad_regex_qa.jsonl"
    bad.write_text(json.dumps({"id": "q9", "question": "When?", "answers": ["19(37"]}) + "\n")
    recipe = FinetuneRecipe(finetune_cfg(tmp_path, f"finetune.questions={bad}", "eval.regex_answers=true"))
    with pytest.raises(QaFileError, match=r"question 'q9': answer '19\(37' is not a valid regular expression"):
        recipe.setup(progress=False)

def test_a_finetune_over_an_old_run_folder_searches_an_index_of_its_own_doc_tower(tmp_path):
    """Fine-tuning retrieves from an index in its run folder. A new run written where an older one was (or started
    from a run trained further since) must not search the old weights' vectors, which a "version exists" test kept."""
    from realm_lm.index.versioned import read_manifest
    from realm_lm.models.embedder import weights_hash
    from realm_lm.train.ict import main as ict_main

    cfg = finetune_cfg(tmp_path, f"finetune.init_from={tmp_path / 'ict'}")
    build_corpus(cfg)
    ict_main(cfg)

    def index_hash_and_doc_hash():
        recipe = FinetuneRecipe(cfg)
        recipe.setup(progress=False)
        (index_dir,) = (tmp_path / "finetune").glob("eval-index-*")
        return read_manifest(index_dir)["embedder_weights_sha256"], weights_hash(recipe.model.retriever.doc)

    first_index, first_doc = index_hash_and_doc_hash()
    assert first_index == first_doc
    ict_main(replace(cfg, ict=replace(cfg.ict, steps=cfg.ict.steps + 2)), resume=True)  # the starting run moves on
    index, doc = index_hash_and_doc_hash()
    assert doc != first_doc and index == doc


def test_retrieval_logits_are_the_scaled_inner_products():
    bert = BertModel(tiny_bert_config(30))
    model = QaModel(Retriever(*(Embedder(bert, "mean-proj", 4),) * 2), Reader(bert), retrieval_scale=0.25)
    q, blocks = torch.randn(2, 4), torch.randn(2, 3, 4)  # [B, D], [B, k, D]
    want = torch.stack([blocks[b] @ q[b] for b in range(2)]) * 0.25  # [B, k]
    assert torch.allclose(model.retrieval_logits(q, blocks), want, atol=1e-6)
    assert QaModel(None, Reader(bert)).retrieval_scale is None  # BM25: no scale


def test_finetune_resume_reproduces_the_losses(tmp_path):
    def run(folder, stop_after=None, resume=False):
        cfg = finetune_cfg(tmp_path, f"finetune.run_dir={tmp_path / folder}", "finetune.steps=4",
                           "finetune.save_every=2", f"corpus.store={tmp_path / 'corpus'}")
        if not (tmp_path / "corpus").exists():
            build_corpus(cfg)
        recipe = FinetuneRecipe(cfg)
        recipe.setup(resume=resume, progress=False)
        if stop_after:
            recipe.cfg = cfg
            while recipe.step < stop_after:
                recipe.train_step()
                recipe.step += 1
            recipe.save()
            return None
        recipe.train(progress=False)
        return [json.loads(x)["loss"] for x in (tmp_path / folder / "metrics.jsonl").read_text().splitlines()]

    full = run("full")
    run("cut", stop_after=2)
    resumed = run("cut", resume=True)
    assert resumed[-2:] == pytest.approx(full[-2:], abs=1e-5)


def test_tiny_finetune_eval_ask_and_corpus_swap(tmp_path, capsys, monkeypatch):
    from realm_lm.cli import main

    def realm(*argv, extra=()):
        sets = [x for o in tiny_overrides(tmp_path, "reader.top_k=16", *extra) for x in ("--set", o)]
        return main([*argv, "--config", str(ROOT / "configs" / "tiny.toml"), *sets])

    assert realm("corpus", "build") == 0
    assert realm("finetune") == 0
    run = str(tmp_path / "finetune")
    assert realm("eval", "qa", "--from", run, "--questions", str(FIXTURES / "tiny_qa.jsonl")) == 0
    out = capsys.readouterr().out
    assert "EM" in out and "recall@16" in out
    records = [json.loads(x) for x in (tmp_path / "finetune" / "predictions-tiny_qa.jsonl").read_text().splitlines()]
    store = CorpusStore(tmp_path / "corpus")
    assert len(records) == 8
    for r in records:
        assert {"answer", "probability", "block_id", "title", "char_start", "char_end", "gold"} <= set(r)
        assert 0 < r["probability"] <= 1 and len(r["retrieved"]) == 16
        row = store.block_ids.index(r["block_id"])
        assert store.titles[row] == r["title"]
        if r["char_start"] >= 0:
            assert store.texts[row][r["char_start"]:r["char_end"]] == r["answer"]
    # the figures land beside the predictions, agreeing with them and saying what they were measured on
    metrics = json.loads((tmp_path / "finetune" / "metrics-tiny_qa.json").read_text())
    assert metrics["n_questions"] == 8 and metrics["top_k"] == 16 and metrics["retriever"] == "realm"
    assert metrics["em"] == pytest.approx(100 * sum(r["exact_match"] for r in records) / 8, abs=0.01)
    assert metrics["f1"] == pytest.approx(100 * sum(r["f1"] for r in records) / 8, abs=0.01)
    assert metrics["predictions"].endswith("predictions-tiny_qa.jsonl") and metrics["precision"] in ("fp32", "bf16")
    assert all(r["answer_rank"] is None or 1 <= r["answer_rank"] <= 16 for r in records)
    assert metrics["recall@16"] == sum(r["answer_rank"] is not None for r in records) / 8
    # predictions written elsewhere get figures of their own beside them, the default ones left as they were
    other = tmp_path / "finetune" / "first4.jsonl"
    assert realm("eval", "qa", "--from", run, "--questions", str(FIXTURES / "tiny_qa.jsonl"), "--limit", "4",
                 "--predictions", str(other)) == 0
    assert json.loads((tmp_path / "finetune" / "first4.metrics.json").read_text())["n_questions"] == 4
    assert json.loads((tmp_path / "finetune" / "metrics-tiny_qa.json").read_text())["n_questions"] == 8
    # the learned scale is what answering uses: p(block) = softmax(scale * q.d), the hits keep the raw q.d
    cfg = finetune_cfg(tmp_path)
    answerer = Answerer.from_run(run, cfg)
    # an evaluation stopped part-way goes on from where it stopped, with the same records as one that was not
    from realm_lm.eval import qa as qa_eval
    questions, out = read_qa_file(FIXTURES / "tiny_qa.jsonl"), tmp_path / "stopped" / "predictions.jsonl"
    monkeypatch.setattr(qa_eval, "ANSWER_CHUNK", 3)
    asked, answer = [], answerer.answer

    def stopped_at_the_third_chunk(texts, **kwargs):
        if len(asked) == 6:
            raise KeyboardInterrupt
        asked.extend(texts)
        return answer(texts, **kwargs)

    monkeypatch.setattr(answerer, "answer", stopped_at_the_third_chunk)
    with pytest.raises(KeyboardInterrupt):
        evaluate_qa(answerer, questions, out, progress=False)
    assert not out.exists() and len(Path(f"{out}.partial").read_text().splitlines()) == 1 + 6  # its key, 6 records
    with open(f"{out}.partial", "a") as torn:
        torn.write('{"id": "torn by a ki')  # a kill in the middle of a line
    asked.clear()
    monkeypatch.setattr(qa_eval, "ANSWER_CHUNK", 100)
    again = evaluate_qa(answerer, questions, out, progress=False)
    assert again["resumed"] == 6 and asked == [q.question for q in questions[6:]]
    assert not Path(f"{out}.partial").exists()
    assert out.read_text() == (tmp_path / "finetune" / "predictions-tiny_qa.jsonl").read_text()
    assert {k: again[k] for k in ("em", "f1", "recall@16")} == {k: metrics[k] for k in ("em", "f1", "recall@16")}
    unsaved = evaluate_qa(answerer, questions, progress=False)  # no predictions file (the benchmarks): nothing kept
    assert {k: unsaved[k] for k in ("em", "f1", "recall@16")} == {k: metrics[k] for k in ("em", "f1", "recall@16")}
    # another model or setting starts afresh
    asked.clear()
    with pytest.raises(KeyboardInterrupt):
        monkeypatch.setattr(qa_eval, "ANSWER_CHUNK", 3)
        evaluate_qa(answerer, questions, out, progress=False)
    answerer.top_k = 4
    asked.clear()
    monkeypatch.setattr(qa_eval, "ANSWER_CHUNK", 100)
    assert evaluate_qa(answerer, questions, out, progress=False)["resumed"] == 0 and len(asked) == 8
    answerer.top_k = cfg.reader.top_k
    monkeypatch.undo()
    saved = load_file(str(latest_checkpoint(run) / "model.safetensors"))["retrieval_scale.log_scale"]
    assert answerer.retrieval_scale == pytest.approx(float(saved.exp())) != cfg.finetune.retrieval_scale
    response = answerer.answer(["Who built Aldermoor?"])[0]
    raw = torch.tensor([h.score for h in response.hits])  # [k]
    p_block = (raw * answerer.retrieval_scale).softmax(-1)  # [k]
    best = response.answers[0]
    assert best.retrieval_probability == pytest.approx(float(p_block[best.block_rank - 1]), rel=1e-4)
    # from Python with the run folder alone: the run's own config, corpus and settings
    own = Answerer.from_run(run)
    assert own.store.folder == tmp_path / "corpus" and own.top_k == cfg.reader.top_k
    assert own.answer(["Who built Aldermoor?"], top_n=1)[0].answers[0].text == response.answers[0].text
    # compiled (reader.compile: `realm serve`, large evaluations), in fp32: the same answers and probabilities
    fp32 = Answerer.from_run(run, replace(cfg, runtime=replace(cfg.runtime, precision="fp32")))
    questions = ["Who built Aldermoor?", "Where is Vessa?", "When was the harbour of Vessa rebuilt?"]
    plain = fp32.answer(questions, top_n=3)
    alone = fp32.answer(questions[:1], k=1, top_n=2)[0]  # one block: a batch of 1
    assert fp32.compile() is None
    for a, b in zip(plain, fp32.answer(questions, top_n=3)):
        assert [x.text for x in a.answers] == [x.text for x in b.answers]
        assert [x.probability for x in a.answers] == pytest.approx([x.probability for x in b.answers], rel=1e-4)
    # one question reading one block (a batch of 1) is answered alike, and compiles nothing again
    from torch._dynamo.utils import counters
    compiled_graphs = counters["stats"]["unique_graphs"]
    twice = fp32.answer(questions[:1], k=1, top_n=2)[0]
    assert counters["stats"]["unique_graphs"] == compiled_graphs
    assert [x.text for x in twice.answers] == [x.text for x in alone.answers] and len(twice.hits) == 1
    assert [x.probability for x in twice.answers] == pytest.approx([x.probability for x in alone.answers], rel=1e-4)
    # where compiling fails (no C++ compiler, ...) the reader stays as it was and says why
    def broken(fn, **kwargs):
        def call(*args, **kw):
            raise RuntimeError("no working C++ compiler found\nmore lines")
        return call
    monkeypatch.setattr(torch, "compile", broken)
    own = Answerer.from_run(run)
    assert own.compile() == "RuntimeError: no working C++ compiler found"
    assert own.answer(["Who built Aldermoor?"], top_n=1)[0].answers[0].text == response.answers[0].text
    monkeypatch.undo()
    assert realm("ask", "Who built Aldermoor?", "--from", run, "-n", "2") == 0
    out = capsys.readouterr().out
    assert "Q: Who built Aldermoor?" in out and "p=" in out and ">>" in out
    assert realm("ask", "Who built Aldermoor?", "--from", run, extra=["reader.int8=true"]) == 0  # int8 reader
    assert "p=" in capsys.readouterr().out
    assert realm("ask", "Who built Aldermoor?", "Where is Vessa?", "--from", run, "-n", "2", "--json") == 0
    lines = [json.loads(x) for x in capsys.readouterr().out.splitlines()]  # one object a question
    assert [x["question"] for x in lines] == ["Who built Aldermoor?", "Where is Vessa?"]
    for a in (a for x in lines for a in x["answers"]):
        assert a["char_start"] < 0 or a["evidence"][a["char_start"]:a["char_end"]] == a["answer"]
    assert len(lines[0]["answers"]) == 2 and len(lines[0]["retrieved"]) == 16
    # no question given: one a line from stdin; a bad line is reported with its number, the others answered
    monkeypatch.setattr("sys.stdin", io.StringIO("Who built Aldermoor?\n\n" + "x" * 5000 + "\nWhere is Vessa?\n"))
    assert realm("ask", "--from", run, "-n", "1") == 2
    captured = capsys.readouterr()
    assert captured.out.count("Q: ") == 2 and "Q: Where is Vessa?" in captured.out
    assert "line 3: the question has 5000 characters" in captured.err and "1 question(s) refused" in captured.err

    # corpus swap: a new store, the same model, its own index; nothing retrained
    other = tmp_path / "other.jsonl"
    other.write_text(json.dumps({"id": "n1", "title": "Zorvath", "text": "Zorvath is a moon of the planet Quel. "
                                 "It was found by the astronomer Pell Avi in 2091."}) + "\n")
    assert realm("corpus", "build", extra=[f'corpus.inputs=["{other}"]', f"corpus.store={tmp_path / 'other'}"]) == 0
    assert realm("index", "build", "--from", run, "--corpus", str(tmp_path / "other")) == 0
    assert realm("ask", "Who found Zorvath?", "--from", run, "--corpus", str(tmp_path / "other"), "-k", "1") == 0
    out = capsys.readouterr().out
    assert "[Zorvath]" in out
    # without --corpus the run answers from the corpus it was fine-tuned on, whatever corpus the preset names
    preset = tmp_path / "other.toml"
    preset.write_text((ROOT / "configs" / "tiny.toml").read_text().replace(
        'store = "artifacts/tiny/corpus"', f'store = "{tmp_path / "other"}"'))
    sets = [x for o in tiny_overrides(tmp_path) if not o.startswith("corpus.store=") for x in ("--set", o)]
    assert main(["ask", "Who built Aldermoor?", "--from", run, "-k", "1", "--config", str(preset), *sets]) == 0
    out = capsys.readouterr().out
    assert "[Zorvath]" not in out and "Aldermoor" in out.split("Q: ", 1)[1].split("\n", 2)[1]
    assert main(["eval", "qa", "--from", run, "--questions", str(FIXTURES / "tiny_qa.jsonl"), "--config", str(preset),
                 *sets]) == 0
    assert json.loads((tmp_path / "finetune" / "metrics-tiny_qa.json").read_text())["corpus"] == str(tmp_path / "corpus")
    # and so does `realm retrieve --from` a fine-tuned run (the preset's corpus holds only Zorvath)
    assert main(["retrieve", "Who built Aldermoor?", "--from", run, "-k", "1", "--config", str(preset), *sets]) == 0
    assert "[Zorvath]" not in capsys.readouterr().out


def test_bad_input_and_damaged_artifacts_give_clear_errors(tmp_path, capsys):
    from realm_lm.cli import main

    def realm(*argv):
        sets = [x for o in tiny_overrides(tmp_path) for x in ("--set", o)]
        return main([*argv, "--config", str(ROOT / "configs" / "tiny.toml"), *sets])

    assert realm("corpus", "build") == 0
    assert realm("finetune", "--set", "finetune.steps=1") == 0
    run = str(tmp_path / "finetune")
    capsys.readouterr()
    assert realm("ask", "   ", "--from", run) == 2
    assert "question is empty" in capsys.readouterr().err
    assert realm("ask", "w" * 100_000, "--from", run) == 2
    assert "100000 characters" in capsys.readouterr().err
    broken = tmp_path / "broken.jsonl"
    broken.write_text('{"question": "Who?"}\n')
    assert realm("eval", "qa", "--from", run, "--questions", str(broken)) == 2
    assert "broken.jsonl:1" in capsys.readouterr().err
    sets = [x for o in tiny_overrides(tmp_path, f"finetune.questions={broken}") for x in ("--set", o)]
    assert main(["finetune", "--overwrite", "--config", str(ROOT / "configs" / "tiny.toml"), *sets]) == 2
    assert "broken.jsonl:1" in capsys.readouterr().err
    assert realm("ask", "Who?", "--from", str(tmp_path / "nowhere")) == 2
    assert realm("eval", "qa", "--from", str(tmp_path / "corpus")) == 2  # not a run folder

    # files damaged after they were written (a full disk, a bad copy): exit 2 with what to rebuild, no traceback.
    # Each is read before the previous one, so each error is the one just made.
    assert realm("ask", "Who?", "--from", run) == 0  # builds the run's own index
    capsys.readouterr()
    (embeddings,) = (tmp_path / "finetune").glob("eval-index-*/versions/*/embeddings.npy")
    embeddings.write_bytes(embeddings.read_bytes()[:200])
    assert realm("ask", "Who?", "--from", run) == 2
    err = capsys.readouterr().err
    assert "is unreadable" in err and "realm index build" in err
    tokens = tmp_path / "corpus" / "tokens.npy"
    tokens.write_bytes(tokens.read_bytes()[:200])
    assert realm("ask", "Who?", "--from", run) == 2
    err = capsys.readouterr().err
    assert "is damaged" in err and "realm corpus build" in err
    (weights,) = (tmp_path / "finetune" / "checkpoints").glob("step_*/model.safetensors")
    weights.write_bytes(weights.read_bytes()[:1000])
    assert realm("ask", "Who?", "--from", run) == 2
    assert "is unreadable" in capsys.readouterr().err
    (tmp_path / "finetune" / "config.json").write_text('{"corpus": ')
    assert realm("ask", "Who?", "--from", run) == 2
    assert "config.json is not valid JSON" in capsys.readouterr().err


def test_answerer_rejects_runs_without_a_reader(tmp_path):
    cfg = finetune_cfg(tmp_path)
    build_corpus(cfg)
    from realm_lm.train.ict import main as ict_main

    ict_main(cfg)
    from realm_lm.train.checkpoint import CheckpointError

    with pytest.raises(CheckpointError, match="no reader"):
        Answerer.from_run(cfg.ict.run_dir, cfg)
    with pytest.raises(BadQuestionError):
        from realm_lm.retrieval import check_question

        check_question("")
