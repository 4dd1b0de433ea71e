import pytest

from realm_lm.corpus.questions import split_of
from realm_lm.eval.metrics import has_answer, normalize_answer, recall_at_k


@pytest.mark.parametrize("raw, norm", [
    ("The Denver Broncos!", "denver broncos"),
    ("  an   apple, a day ", "apple day"),
    ("Théâtre, Français", "théâtre français"),
    ("ＡＢＣ", "abc"),  # full-width letters fold (NFKC)
    ("1,234.5", "12345"),
])
def test_normalize_answer(raw, norm):
    assert normalize_answer(raw) == norm


def test_has_answer_matches_whole_tokens_only():
    block = "The Denver Broncos beat the Carolina Panthers in 2016."
    assert has_answer(block, ["denver broncos"])
    assert has_answer(block, ["nope", "Carolina Panthers."])
    assert not has_answer(block, ["Den"])  # no partial-word matches
    assert not has_answer(block, [""])


def test_recall_at_k():
    texts = ["alpha beta", "gamma", "delta epsilon"]
    rows = [[1, 0, 2], [2, 1, 0], [1, 1, 1]]
    answers = [["beta"], ["epsilon"], ["alpha"]]
    assert recall_at_k(rows, answers, texts, [1, 2, 3]) == {1: 1 / 3, 2: 2 / 3, 3: 2 / 3}


def test_recall_with_regex_answers_searches_the_block_text():
    texts = ["He died in 1937, aged 41.", "Born in 1895 in Ohio."]
    rows = [[1, 0], [0, 1]]
    answers = [[r"19(37|38)"], [r"\bOHIO\b"]]  # found at rank 2, and at rank 2 again (case-insensitive)
    assert recall_at_k(rows, answers, texts, [1, 2], regex=True) == {1: 0.0, 2: 1.0}
    assert recall_at_k(rows, answers, texts, [2]) == {2: 0.0}  # as literal strings they occur nowhere


def test_open_squad_split_rule():
    assert [split_of(i) for i in range(7)] == ["test", "train", "train", "dev", "train", "train", "test"]
