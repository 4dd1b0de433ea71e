"""The corpus store on disk: block text and metadata in Parquet, token ids as a memory-mapped matrix.

Layout of a store folder::

    blocks.parquet   block_id, doc_id, title, text, char_start, char_end, n_tokens, source
    tokens.npy       int32 [N, block_len], [CLS] title [SEP] body [SEP] then [PAD]; opened with mmap
    block_digests.npy  uint8 [N, 16], a digest of each block's wordpieces (what index builds match blocks by)
    manifest.json    corpus hash, counts, tokenizer vocab hash, resolved config, skipped input problems
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
from functools import cached_property
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from tqdm import tqdm

from realm_lm.artifacts import sha256_file, staged_dir, write_json_atomic
from realm_lm.config import RunConfig, config_to_dict
from realm_lm.corpus.blocks import Block, cut_documents
from realm_lm.corpus.readers import CorpusInputError, Document, InputProblem, read_documents
from realm_lm.errors import RealmError
from realm_lm.models.pretrained import SpecialIds, load_tokenizer, resolve_model_dir

STORE_FORMAT = 1


class CorpusStoreError(RealmError, RuntimeError):
    pass


class CorpusStore:
    """Read-only view of a built corpus store; rows are addressed by position 0..N-1."""

    def __init__(self, folder: str | Path):
        self.folder = Path(folder)
        manifest = self.folder / "manifest.json"
        if not manifest.is_file():
            raise CorpusStoreError(f"no corpus store at {self.folder} (run `realm corpus build` first)")
        try:
            self.manifest = json.loads(manifest.read_text())
            if self.manifest.get("format") != STORE_FORMAT:
                raise CorpusStoreError(f"{self.folder}: store format {self.manifest.get('format')} is not {STORE_FORMAT}")
            self.table = pq.read_table(self.folder / "blocks.parquet")
            self.tokens = np.load(self.folder / "tokens.npy", mmap_mode="r")  # int32 [N, block_len]
        except (OSError, ValueError, pa.ArrowException) as err:  # JSONDecodeError is a ValueError; numpy: short file
            raise CorpusStoreError(f"corpus store {self.folder} is damaged ({err}); build it again with "
                                   f"`realm corpus build`") from err
        if self.tokens.shape[0] != self.table.num_rows:
            raise CorpusStoreError(f"{self.folder}: {self.tokens.shape[0]} token rows but {self.table.num_rows} blocks")

    def __len__(self) -> int:
        return self.table.num_rows

    @property
    def corpus_hash(self) -> str:
        return self.manifest["corpus_hash"]

    @property
    def block_len(self) -> int:
        return int(self.tokens.shape[1])

    @cached_property
    def block_ids(self) -> list[str]:
        return self.table.column("block_id").to_pylist()

    @cached_property
    def titles(self) -> list[str]:
        return self.table.column("title").to_pylist()

    @cached_property
    def texts(self) -> list[str]:
        return self.table.column("text").to_pylist()

    @cached_property
    def doc_ids(self) -> list[str]:
        return self.table.column("doc_id").to_pylist()

    @cached_property
    def lengths(self) -> np.ndarray:
        return self.table.column("n_tokens").to_numpy()  # int [N]

    @cached_property
    def block_digests(self) -> np.ndarray:
        """uint8 [N, 16]: :func:`block_digests` of the blocks, as written with the store (computed here for a store
        written before they were: about 40 s at 13M blocks)."""
        try:
            digests = np.load(self.folder / "block_digests.npy")
            if digests.shape == (len(self), 16) and digests.dtype == np.uint8:
                return digests
        except (OSError, ValueError):
            pass
        return block_digests(self.tokens, self.lengths)

    def block(self, row: int) -> dict:
        return {"row": row, "block_id": self.block_ids[row], "doc_id": self.doc_ids[row],
                "title": self.titles[row], "text": self.texts[row]}


def block_digests(tokens: np.ndarray, lengths: np.ndarray) -> np.ndarray:
    """A 16-byte digest of each block's wordpieces (``tokens`` [N, L] up to ``lengths`` [N]) [N, 16]: the document
    tower's whole input, so equal digests mean equal embeddings. Index versions keep them, so that a later build
    can take their rows by digest, even from a store rebuilt since."""
    out = np.empty((len(lengths), 16), dtype=np.uint8)
    for row, length in enumerate(lengths):
        out[row] = np.frombuffer(hashlib.blake2b(tokens[row, :length].tobytes(), digest_size=16).digest(), np.uint8)
    return out


def corpus_hash_of(block_ids: list[str], tokens: np.ndarray, vocab_sha256: str) -> str:
    digest = hashlib.sha256()
    digest.update(vocab_sha256.encode())
    digest.update("\n".join(block_ids).encode())
    digest.update(np.ascontiguousarray(tokens).tobytes())
    return digest.hexdigest()


def build_corpus(cfg: RunConfig, out: str | Path | None = None) -> Path:
    """Read ``cfg.corpus.inputs``, cut blocks, and publish the store atomically at ``out`` (default cfg.corpus.store)."""
    ccfg = cfg.corpus
    out = Path(out or ccfg.store)
    model_dir = resolve_model_dir(cfg.embedder.model)
    tok = load_tokenizer(model_dir)
    special = SpecialIds(tok)

    problems: list[InputProblem] = []
    docs: list[Document] = []
    for path in ccfg.inputs:
        docs.extend(read_documents(path, problems))
    if ccfg.max_documents:
        docs = docs[:ccfg.max_documents]
    if problems and not ccfg.skip_malformed:
        raise CorpusInputError(problems)
    if not docs:
        raise CorpusInputError(problems or [InputProblem(",".join(ccfg.inputs), 0, "no documents")])

    blocks: list[Block] = []
    seen: set[str] = set()
    duplicates = 0
    batch = 512
    with tqdm(total=len(docs), desc="cutting blocks", unit="doc") as bar:
        for i in range(0, len(docs), batch):
            for doc_blocks in cut_documents(docs[i:i + batch], tok, special, ccfg.block_len, ccfg.max_title_len):
                for b in doc_blocks:
                    if b.block_id in seen:  # the same title and body twice: keep one copy
                        duplicates += 1
                        continue
                    seen.add(b.block_id)
                    blocks.append(b)
            bar.update(min(batch, len(docs) - i))

    tokens = np.full((len(blocks), ccfg.block_len), special.pad, dtype=np.int32)  # [N, L]
    for row, b in enumerate(blocks):
        tokens[row, :len(b.token_ids)] = b.token_ids
    columns = {
        "block_id": [b.block_id for b in blocks],
        "doc_id": [b.doc_id for b in blocks],
        "title": [b.title for b in blocks],
        "text": [b.text for b in blocks],
        "char_start": [b.char_start for b in blocks],
        "char_end": [b.char_end for b in blocks],
        "n_tokens": [len(b.token_ids) for b in blocks],
        "source": [b.source for b in blocks],
    }
    extra = {"n_documents": len(docs), "duplicate_blocks_dropped": duplicates,
             "skipped_input_problems": [str(p) for p in problems], "config": config_to_dict(cfg)}
    return write_store(out, columns, tokens, sha256_file(model_dir / "vocab.txt"), extra)


def write_store(out: str | Path, columns: dict[str, list], tokens: np.ndarray, vocab_sha: str,
                extra: dict) -> Path:
    """Publish a store folder atomically from its columns and token matrix [N, block_len]."""
    out = Path(out)
    ints = {"char_start", "char_end", "n_tokens"}
    table = pa.table({k: pa.array(v, pa.int32()) if k in ints else v for k, v in columns.items()})
    manifest = {
        "format": STORE_FORMAT,
        "corpus_hash": corpus_hash_of(columns["block_id"], tokens, vocab_sha),
        "n_blocks": len(tokens),
        "block_len": int(tokens.shape[1]),
        "vocab_sha256": vocab_sha,
        "created": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        **extra,
    }
    with staged_dir(out) as staging:
        pq.write_table(table, staging / "blocks.parquet")
        np.save(staging / "tokens.npy", tokens)
        np.save(staging / "block_digests.npy", block_digests(tokens, np.asarray(columns["n_tokens"])))
        write_json_atomic(staging / "manifest.json", manifest)
    return out
