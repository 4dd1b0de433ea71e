"""Embed every block of a corpus store with the document tower and publish an index version."""

from __future__ import annotations

import hashlib
import itertools
import json
import os
import shutil
import sys
import time
from pathlib import Path
from typing import Callable, Iterable, Iterator, Sequence

import numpy as np
import torch
from tqdm import tqdm

from realm_lm.artifacts import staged_dir
from realm_lm.config import RunConfig, config_to_dict
from realm_lm.corpus.store import CorpusStore, CorpusStoreError
from realm_lm.index.backends import make_index
from realm_lm.index.versioned import block_ids_hash, kept_versions, latest_version, publish, read_manifest
from realm_lm.models.embedder import Embedder, build_retriever, weights_hash
from realm_lm.runtime import autocast, resolve_device

UNFINISHED = "unfinished"  # INDEX_DIR/unfinished/part-*: blocks embedded by a build that stopped before it published
SAVE_UNFINISHED_EVERY_S = 60.0  # so a build that is killed loses at most this much embedding
SHARE_WAIT_MIN_S = 60.0  # how long refresh builder 0 waits at least for the other builders' shares


def length_batches(lengths: np.ndarray, max_tokens: int) -> Iterator[np.ndarray]:
    """Row numbers grouped by similar length, each group's padded size (rows x longest) <= max_tokens.

    Real blocks vary in length (median ~110 of 288 wordpieces here), so sorting first means almost no
    compute is spent on padding.
    """
    order = np.argsort(lengths, kind="stable")[::-1]  # longest first: the biggest batch shows memory early
    start = 0
    while start < len(order):
        longest = int(lengths[order[start]])
        rows = max(1, max_tokens // max(longest, 1))
        yield order[start:start + rows]
        start += rows


def embed_batches(encode: Callable[[torch.Tensor, torch.Tensor], torch.Tensor], tokens: np.ndarray,
                  lengths: np.ndarray, max_tokens: int, rows: np.ndarray) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """(positions in ``rows`` [B], their embeddings [B, D] float32), batch after batch of similar lengths, until
    every one of ``rows`` (rows of ``tokens`` [N, L] with true lengths ``lengths`` [N]) is embedded once by
    ``encode`` (ids [B, W], mask [B, W] -> [B, D]: a tower in eval mode, its ``pool``, or :func:`shared_body`)."""
    for batch in length_batches(lengths[rows], max_tokens):
        batch = np.sort(batch)  # ascending rows read the memory-mapped matrix in order
        picked = rows[batch]
        width = int(lengths[picked].max())
        ids = torch.from_numpy(np.ascontiguousarray(tokens[picked, :width])).long()  # [B, W]
        mask = (torch.arange(width)[None, :] < torch.from_numpy(lengths[picked])[:, None]).long()  # [B, W]
        with torch.inference_mode():
            embedded = encode(ids, mask).float().cpu().numpy()
        yield batch, embedded


def embed_rows(embedder: Embedder, tokens: np.ndarray, lengths: np.ndarray, max_tokens: int,
               desc: str = "embedding blocks", progress: bool = True, pooled: bool = False,
               rows: np.ndarray | None = None) -> np.ndarray:
    """Embeddings [N, D] float32 of token rows ``tokens`` [N, L] with true lengths ``lengths`` [N] (only ``rows``,
    ascending, when given: [len(rows), D]); with ``pooled``, the tower's pooled outputs before its projection."""
    rows = np.arange(len(lengths)) if rows is None else np.asarray(rows)
    out = np.empty((len(rows), embedder.hidden if pooled else embedder.dim), dtype=np.float32)
    embedder.eval()
    encode = embedder.pool if pooled else embedder
    with tqdm(total=len(rows), desc=desc, unit="block", disable=not progress, smoothing=0.05) as bar:
        for batch, embedded in embed_batches(encode, tokens, lengths, max_tokens, rows):
            out[batch] = embedded
            bar.update(len(batch))
    return out


def shared_body(towers: Sequence[Embedder]) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    """ids, mask -> every tower's output side by side [B, sum of D], BERT run once: for towers that differ only in
    their heads (:func:`body_key`), such as the demo's REALM tower as initialised and the MiniLM baseline."""
    for tower in towers:
        tower.eval()
    if len(towers) == 1:
        return towers[0]

    def encode(ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        pooled = towers[0].pool(ids, mask)  # [B, H], the same for every tower
        return torch.cat([tower.head(pooled) for tower in towers], dim=-1)  # [B, sum of D]

    return encode


def body_key(tower: Embedder) -> tuple[str, str]:
    """What a tower's pooled outputs depend on: its BERT's weights and how it pools them."""
    return weights_hash(tower.bert), tower.body_pooling


def embedding_key(corpus_hash: str, doc_weights_hash: str, cfg: RunConfig) -> str:
    """What the embeddings depend on: corpus, document-tower weights, pooling. Says whether an index is current."""
    parts = [corpus_hash, doc_weights_hash, cfg.embedder.pooling, str(cfg.embedder.proj_dim)]
    return hashlib.sha256("|".join(parts).encode()).hexdigest()


def tower_key(cfg: RunConfig, doc_embedder: Embedder, store: CorpusStore) -> str:
    """The :func:`embedding_key` of ``store`` embedded by this document tower now (hashes its weights: ~0.1 s)."""
    return embedding_key(store.corpus_hash, weights_hash(doc_embedder), cfg)


def _donor_digests(path: Path, manifest: dict, rows: int) -> np.ndarray | None:
    """The block digests of a version's rows: kept beside its embeddings, or (versions from before they were kept)
    computed from its corpus store if that is still the store it was built from."""
    try:
        digests = np.load(path / "block_digests.npy")
    except (OSError, ValueError):
        try:
            donor = CorpusStore(manifest["corpus_store"])  # relative to where it was built: skipped if not here
        except (CorpusStoreError, KeyError):
            return None
        if donor.corpus_hash != manifest.get("corpus_hash"):
            return None  # rebuilt since: its rows are not that version's rows
        digests = donor.block_digests
    return digests if digests.shape == (rows, 16) else None


def _tower_of(manifest: dict) -> tuple:
    """What a version's embeddings depend on besides the blocks: the document tower's weights and pooling."""
    embedder = manifest.get("config", {}).get("embedder", {})
    return manifest.get("embedder_weights_sha256"), embedder.get("pooling"), embedder.get("proj_dim")


def _donor_folders(index_dir: str | Path, reuse_from: tuple[str | Path, ...]) -> list[Path]:
    """Index folders whose versions may hold blocks of this corpus: the folder itself, ``reuse_from``, and its sibling
    folders (a run's indexes of other corpora, RUN/eval-index-*, sit side by side)."""
    index_dir = Path(index_dir)
    siblings = sorted(p for p in index_dir.parent.glob("*") if p != index_dir and (p / "versions").is_dir())
    seen, folders = set(), []
    for folder in (index_dir, *map(Path, reuse_from), *siblings):
        if folder.resolve() not in seen:
            seen.add(folder.resolve())
            folders.append(folder)
    return folders


def match_digests(wanted: np.ndarray, donor: np.ndarray) -> np.ndarray:
    """For each digest of ``wanted`` [N, 16], a row of ``donor`` [M, 16] with the same digest, or -1 [N]. Sorted
    arrays, not a dict: at the paper's 13M blocks a dict of digests takes 4 GB. Rows are looked up by their first 8
    bytes and then compared in full (two digests sharing 8 bytes but not 16 only cost a re-embedding)."""
    if len(donor) == 0:
        return np.full(len(wanted), -1)
    wanted, donor = np.ascontiguousarray(wanted).view(np.uint64), np.ascontiguousarray(donor).view(np.uint64)  # [., 2]
    donor_order = np.argsort(donor[:, 0], kind="stable")  # [M]
    wanted_order = np.argsort(wanted[:, 0], kind="stable")  # [N] sorted queries: a search 20x faster than unsorted
    at = np.searchsorted(donor[donor_order, 0], wanted[wanted_order, 0]).clip(max=len(donor) - 1)
    candidate = np.empty(len(wanted), dtype=np.int64)
    candidate[wanted_order] = donor_order[at]  # [N] the donor row whose key is the first >= ours
    same = (donor[candidate] == wanted).all(axis=1)  # [N] the whole digest
    return np.where(same, candidate, -1)


def _readable_source(path: Path, manifest: dict, tower: tuple, dim: int) -> tuple[np.ndarray, np.ndarray] | None:
    """A version's or part's embeddings [M, D] (memory-mapped) and block digests [M, 16], if ``tower`` made them and
    they can be read; else None."""
    if _tower_of(manifest) != tower or manifest.get("dim") != dim:
        return None
    try:
        embeddings = np.load(path / "embeddings.npy", mmap_mode="r")  # [M, D]
    except (OSError, ValueError):
        return None
    if embeddings.ndim != 2 or embeddings.shape[1] != dim:
        return None
    digests = _donor_digests(path, manifest, len(embeddings))  # [M, 16]
    return None if digests is None else (embeddings, digests)


def _is_part(path: str | Path) -> bool:
    """Whether a source of reused blocks is a part of an unfinished build (else a kept version)."""
    return Path(path).parent.name == UNFINISHED


def _source_groups(sources: Iterable[tuple[Path, dict]]) -> Iterator[list[tuple[Path, dict]]]:
    """Each kept version alone, in order, then every unfinished part together: matching costs seconds at 13M blocks
    whatever the donor's size, and a build resumed at that scale has hundreds of parts."""
    parts = []
    for path, manifest in sources:
        if _is_part(path):
            parts.append((path, manifest))
        else:
            yield [(path, manifest)]
    if parts:
        yield parts


def reuse_identical_blocks(digests: np.ndarray, tower: tuple, dim: int, sources: Iterable[tuple[Path, dict]]
                           ) -> tuple[np.ndarray, np.ndarray, dict[str, int]]:
    """Embeddings [N, D] of the blocks with ``digests`` [N, 16] (``CorpusStore.block_digests``) that one of ``sources``
    (kept versions, or the parts of an unfinished build: folder and manifest) already holds, embedded by the same
    tower from the same wordpieces (a corpus with documents added or changed: only those are embedded again); the
    mask [N] of rows filled, and how many rows each source gave."""
    embeddings = np.zeros((len(digests), dim), dtype=np.float32)
    filled = np.zeros(len(digests), dtype=bool)
    taken: dict[str, int] = {}
    for group in _source_groups(sources):
        readable = [(path, *found) for path, manifest in group
                    if (found := _readable_source(path, manifest, tower, dim)) is not None]
        if not readable:
            continue
        sizes = [len(donor_digests) for _, _, donor_digests in readable]
        starts = np.cumsum([0, *sizes])  # source i holds the group's rows starts[i]:starts[i + 1]
        rows = np.flatnonzero(~filled)  # each block is taken from the first group that holds it
        group_rows = match_digests(digests[rows], np.concatenate([d for _, _, d in readable]))  # [len(rows)]
        found = group_rows >= 0
        order = np.argsort(group_rows[found])  # by source, and ascending within one: reads each memmap in order
        rows, group_rows = rows[found][order], group_rows[found][order]
        bounds = np.searchsorted(group_rows, starts)  # each source's stretch of the matches
        for i, (path, donor_embeddings, _) in enumerate(readable):
            lo, hi = bounds[i], bounds[i + 1]
            if hi > lo:
                embeddings[rows[lo:hi]] = donor_embeddings[group_rows[lo:hi] - starts[i]]
                taken[str(path)] = int(hi - lo)
        filled[rows] = True
        if filled.all():
            break
    return embeddings, filled, taken


def unfinished_parts(index_dir: str | Path) -> Iterator[tuple[Path, dict]]:
    """Folder and manifest of each part that a build of ``index_dir`` saved before it was stopped (laid out like a
    version: embeddings.npy, block_digests.npy, manifest.json), so the next build takes its blocks like a kept
    version's. A part whose manifest is unreadable is skipped."""
    folder = Path(index_dir) / UNFINISHED
    for path in sorted(folder.glob("part-*")) if folder.is_dir() else []:
        try:
            yield path, json.loads((path / "manifest.json").read_text())
        except (OSError, json.JSONDecodeError):
            continue


def save_unfinished_part(index_dir: str | Path, embeddings: np.ndarray, digests: np.ndarray, tower: tuple) -> None:
    """Save ``embeddings`` [n, D] of the blocks with ``digests`` [n, 16] as a part of ``index_dir``'s unfinished
    build, atomically. Best effort: a part that cannot be written costs a later build only its re-embedding."""
    weights_sha256, pooling, proj_dim = tower
    final = Path(index_dir) / UNFINISHED / f"part-{time.time_ns()}-{os.getpid()}"
    manifest = {"embedder_weights_sha256": weights_sha256, "config": {"embedder": {"pooling": pooling,
                                                                                   "proj_dim": proj_dim}},
                "dim": int(embeddings.shape[1]), "n_rows": len(embeddings)}
    try:
        with staged_dir(final) as staging:
            np.save(staging / "embeddings.npy", embeddings)
            np.save(staging / "block_digests.npy", digests)
            (staging / "manifest.json").write_text(json.dumps(manifest, indent=2, sort_keys=True))
    except OSError as err:  # disk full, or the folder cleared by a builder that published meanwhile
        print(f"warning: could not save the blocks embedded so far in {final.parent}: {err}", file=sys.stderr)


def embed_saving_parts(towers: Sequence[Embedder], store: CorpusStore, rows: np.ndarray, digests: np.ndarray,
                       max_tokens: int, made_by: Sequence[tuple], save_to: Sequence[str | Path] | None,
                       progress: bool, save_at_end: bool = False) -> list[np.ndarray]:
    """Each tower's embeddings [len(rows), D] of the blocks ``rows`` (ascending); towers that share a body
    (:func:`body_key`) run BERT once. With ``save_to`` (each tower's index folder; ``made_by``: each one's weights
    hash, pooling and projection width, as its parts record them), what is embedded is saved there as a part of an
    unfinished build every SAVE_UNFINISHED_EVERY_S seconds and when the build stops on an error or Ctrl-C (and at
    the end with ``save_at_end``): the next build takes those blocks instead of embedding them again."""
    widths = np.cumsum([0, *(t.dim for t in towers)])  # tower i's columns of the side-by-side output
    out = np.empty((len(rows), widths[-1]), dtype=np.float32)
    unsaved: list[np.ndarray] = []  # positions in rows embedded since the last part
    last_save = time.monotonic()

    def save() -> None:
        nonlocal last_save
        if save_to is not None and unsaved:
            done = np.sort(np.concatenate(unsaved))
            for i, (folder, tower) in enumerate(zip(save_to, made_by)):
                save_unfinished_part(folder, out[done, widths[i]:widths[i + 1]], digests[rows[done]], tower)
        unsaved.clear()
        last_save = time.monotonic()

    try:
        with tqdm(total=len(rows), desc="embedding blocks", unit="block", disable=not progress,
                  smoothing=0.05) as bar:
            for batch, embedded in embed_batches(shared_body(towers), store.tokens, store.lengths, max_tokens, rows):
                out[batch] = embedded
                unsaved.append(batch)
                bar.update(len(batch))
                if time.monotonic() - last_save >= SAVE_UNFINISHED_EVERY_S:
                    save()
        if save_at_end:
            save()
    except BaseException:
        save()
        # the blocks of this build and of the stopped ones it went on from
        if progress and save_to is not None and (kept := rows_in_parts(save_to[0], made_by[0])):
            print(f"the {kept} blocks embedded so far are kept in {Path(save_to[0]) / UNFINISHED}"
                  f"{' (and beside it, for the other towers)' if len(towers) > 1 else ''}: the next build goes on "
                  f"from them", file=sys.stderr)
        raise
    return [out[:, widths[i]:widths[i + 1]] for i in range(len(towers))]


def index_is_current(index_dir: str | Path, key: str) -> bool:
    """Whether ``index_dir``'s latest version holds the embeddings of ``key`` (:func:`tower_key`). The test for a
    run's own index, rebuilt when not: a version merely existing says nothing once training has moved the weights on."""
    return latest_version(index_dir) is not None and read_manifest(index_dir).get("embedding_key") == key


def ensure_index(cfg: RunConfig, store: CorpusStore | None = None, doc_embedder: Embedder | None = None,
                 key: str | None = None) -> str | None:
    """Build a version of ``cfg.index.dir`` (:func:`build_index`) unless its latest one already holds this document
    tower's embeddings of the store, searched by ``cfg.index``'s backend and dtype: the new version, or None when
    the latest is kept (the demo run again; a run's own index searched again after no training). ``key``: the
    tower's :func:`tower_key`, where the caller has hashed it already."""
    store = store or CorpusStore(cfg.corpus.store)
    doc_embedder = doc_embedder or build_retriever(cfg.embedder).doc.to(resolve_device(cfg.runtime))
    if _is_current(cfg, key or tower_key(cfg, doc_embedder, store)):
        return None
    return build_index(cfg, doc_embedder=doc_embedder, store=store)


def ensure_indexes(cfgs: Sequence[RunConfig], store: CorpusStore | None = None) -> list[str | None]:
    """:func:`ensure_index` for several configs' default towers over one store, those that share a body
    (:func:`body_key`: the demo's REALM tower as initialised and the MiniLM baseline) built in one pass of BERT."""
    store = store or CorpusStore(cfgs[0].corpus.store)
    towers = [build_retriever(c.embedder).doc.to(resolve_device(c.runtime)) for c in cfgs]
    to_build: dict[tuple, list[int]] = {}  # what one pass can embed: body, device, precision, batch size
    for i, (cfg, tower) in enumerate(zip(cfgs, towers)):
        if not _is_current(cfg, tower_key(cfg, tower, store)):
            group = (*body_key(tower), cfg.runtime.device, cfg.runtime.precision, cfg.index.embed_batch_tokens)
            to_build.setdefault(group, []).append(i)
    versions: list[str | None] = [None] * len(cfgs)
    for members in to_build.values():
        built = build_indexes([cfgs[i] for i in members], doc_embedders=[towers[i] for i in members], store=store)
        for i, version in zip(members, built):
            versions[i] = version
    return versions


def _is_current(cfg: RunConfig, key: str) -> bool:
    """Whether ``cfg.index.dir``'s latest version holds ``key``'s embeddings in ``cfg.index``'s backend and dtype."""
    if not index_is_current(cfg.index.dir, key):
        return False
    built = read_manifest(cfg.index.dir)["config"]["index"]
    return (built["backend"], built["dtype"]) == (cfg.index.backend, cfg.index.dtype)


def _reuse_what_is_embedded(cfg: RunConfig, store: CorpusStore, doc_embedder: Embedder,
                            reuse_from: tuple[str | Path, ...] = (), with_parts: bool = True
                            ) -> tuple[np.ndarray, tuple, np.ndarray, np.ndarray, dict[str, int]]:
    """The block digests [N, 16], the tower, and what :func:`reuse_identical_blocks` finds for them in kept versions
    (and ``with_parts``, in the folder's unfinished parts): embeddings [N, D], filled [N], rows taken per source."""
    digests = store.block_digests  # [N, 16]
    tower = (weights_hash(doc_embedder), cfg.embedder.pooling, cfg.embedder.proj_dim)
    folders = _donor_folders(cfg.index.dir, reuse_from)
    sources = itertools.chain(itertools.chain.from_iterable(kept_versions(f) for f in folders),
                              unfinished_parts(cfg.index.dir) if with_parts else ())
    return digests, tower, *reuse_identical_blocks(digests, tower, doc_embedder.dim, sources)


def _embed_and_save(cfg: RunConfig, store: CorpusStore, doc_embedder: Embedder, rows: np.ndarray,
                    digests: np.ndarray, tower: tuple, progress: bool) -> None:
    """Embed the blocks ``rows`` and save them as parts of ``cfg.index.dir``'s unfinished build."""
    if len(rows):
        with autocast(doc_embedder.device, cfg.runtime.precision):
            embed_saving_parts([doc_embedder], store, rows, digests, cfg.index.embed_batch_tokens, [tower],
                               [cfg.index.dir], progress, save_at_end=True)


def build_index_on_ranks(cfg: RunConfig, progress: bool = True, doc_embedder: Embedder | None = None,
                         store: CorpusStore | None = None, reuse_from: tuple[str | Path, ...] = (),
                         embedder_step: int | None = None) -> tuple[str | None, int]:
    """:func:`build_index` under torchrun, called on every rank: each embeds every world-size-th block (from its
    rank) of those no kept version or unfinished part holds yet, on its device, and saves them as parts of the
    unfinished build of ``cfg.index.dir`` (a folder every rank shares); rank 0's build_index then takes them all and
    publishes, while the others wait for that version. With one process, build_index. Returns the version (None on
    ranks other than 0) and how many blocks this rank embedded as its share."""
    from realm_lm.train import distributed

    if distributed.world_size() == 1:
        return build_index(cfg, embedder_step, progress, doc_embedder, store, reuse_from), 0
    store = store or CorpusStore(cfg.corpus.store)
    doc_embedder = doc_embedder or build_retriever(cfg.embedder).doc.to(resolve_device(cfg.runtime))
    main_rank = distributed.is_main()
    digests, tower, _, filled, _ = _reuse_what_is_embedded(cfg, store, doc_embedder, reuse_from)
    share = np.flatnonzero(~filled)[distributed.rank()::distributed.world_size()]  # strided: blocks of every length
    distributed.barrier()  # every rank has read the folder before any rank adds its parts: the shares are disjoint
    _embed_and_save(cfg, store, doc_embedder, share, digests, tower, progress and main_rank)
    distributed.barrier()  # every share is saved before rank 0 takes them
    if main_rank:
        return build_index(cfg, embedder_step, progress, doc_embedder, store, reuse_from), len(share)
    wait_until_current(cfg.index.dir, embedding_key(store.corpus_hash, tower[0], cfg))  # the tower, hashed above
    return None, len(share)


def rows_in_parts(index_dir: str | Path, tower: tuple) -> int:
    """How many block embeddings by ``tower`` the unfinished parts of ``index_dir`` hold."""
    return sum(manifest.get("n_rows", 0) for _, manifest in unfinished_parts(index_dir) if _tower_of(manifest) == tower)


def build_index_in_shares(cfg: RunConfig, shard: int, shards: int, embedder_step: int | None,
                          doc_embedder: Embedder, store: CorpusStore | None = None, poll_s: float = 0.5) -> str | None:
    """One of ``shards`` builder processes that re-embed the corpus together: the pre-training refresh under
    torchrun, one builder per rank on its rank's device, with nothing to synchronise them but the index folder
    they share. Each embeds every shards-th block (from its number) of those not yet embedded by this tower and
    saves them as a part of the unfinished build. Builder 0 then waits for the others' parts, for at most twice its
    own share's time (at least SHARE_WAIT_MIN_S), and publishes the version with :func:`build_index`, which embeds
    whatever a builder failed to save in time. Returns the version published by builder 0, None for the others."""
    store = store or CorpusStore(cfg.corpus.store)
    t0 = time.perf_counter()
    # planned without the parts, which builders that started earlier may be adding: the shares are disjoint
    digests, tower, _, filled, _ = _reuse_what_is_embedded(cfg, store, doc_embedder, with_parts=False)
    missing = np.flatnonzero(~filled)
    _embed_and_save(cfg, store, doc_embedder, missing[shard::shards], digests, tower, progress=False)
    if shard != 0:
        return None
    deadline = time.monotonic() + max(SHARE_WAIT_MIN_S, 2 * (time.perf_counter() - t0))
    while rows_in_parts(cfg.index.dir, tower) < len(missing) and time.monotonic() < deadline:
        time.sleep(poll_s)
    return build_index(cfg, embedder_step, progress=False, doc_embedder=doc_embedder, store=store, save_parts=False)


def wait_until_current(index_dir: str | Path, key: str, poll_s: float = 1.0) -> None:
    """Wait until ``index_dir``'s latest version holds ``key``'s embeddings: how ranks other than 0 wait for the
    version rank 0 builds, without a collective (whose timeout, 30 minutes by default, an HNSW build over millions of
    blocks can outlast). Should rank 0 fail instead, torchrun stops every rank."""
    while not index_is_current(index_dir, key):
        time.sleep(poll_s)


def build_index(cfg: RunConfig, embedder_step: int | None = None, progress: bool = True,
                doc_embedder: Embedder | None = None, store: CorpusStore | None = None,
                reuse_from: tuple[str | Path, ...] = (), save_parts: bool = True) -> str:
    """Embed the corpus store with the document tower (default: the one ``cfg.embedder`` describes) and publish a
    new version to ``cfg.index.dir``. A given tower embeds where it lies; the default one on ``cfg.runtime``'s
    device. Blocks that a kept version of the same tower already embedded (this corpus or another sharing them,
    in that folder, beside it or in the ``reuse_from`` folders: a fine-tuning run's starting index), or that the
    folder's unfinished parts hold (a build that was stopped, or torchrun's shares), are taken, not embedded.
    ``save_parts``: save the blocks embedded so far as the build goes, so that a build killed or interrupted is
    resumed (not for the refresher's builds: no later build shares their weights)."""
    towers = None if doc_embedder is None else [doc_embedder]
    return build_indexes([cfg], embedder_step, progress, towers, store, reuse_from, save_parts)[0]


def build_indexes(cfgs: Sequence[RunConfig], embedder_step: int | None = None, progress: bool = True,
                  doc_embedders: Sequence[Embedder] | None = None, store: CorpusStore | None = None,
                  reuse_from: tuple[str | Path, ...] = (), save_parts: bool = True) -> list[str]:
    """:func:`build_index` for several towers that share a body (:func:`body_key`) and differ in their heads, each
    into its own ``cfg.index.dir``: BERT runs once over the blocks that any of them lacks (embedding runs on the
    first config's runtime and batch size). The versions, in order."""
    store = store or CorpusStore(cfgs[0].corpus.store)
    towers = doc_embedders or [build_retriever(c.embedder).doc.to(resolve_device(c.runtime)) for c in cfgs]
    if len(towers) > 1 and len({body_key(t) for t in towers}) > 1:  # (one tower: no BERT to hash)
        raise ValueError("build_indexes: the towers do not share their BERT weights and pooling")
    t0 = time.perf_counter()
    found = [_reuse_what_is_embedded(c, store, t, reuse_from) for c, t in zip(cfgs, towers)]
    digests = found[0][0]
    for cfg, (*_, taken) in zip(cfgs, found):
        if progress and (from_parts := sum(n for path, n in taken.items() if _is_part(path))):
            print(f"{from_parts} of {len(store)} blocks were embedded before, by a build that stopped or by "
                  f"torchrun's ranks ({Path(cfg.index.dir) / UNFINISHED})", file=sys.stderr)
    missing = np.flatnonzero(~np.logical_and.reduce([filled for *_, filled, _ in found]))  # lacked by any tower
    if len(missing):
        cfg = cfgs[0]
        with autocast(towers[0].device, cfg.runtime.precision):
            embedded = embed_saving_parts(towers, store, missing, digests, cfg.index.embed_batch_tokens,
                                          [tower for _, tower, *_ in found],
                                          [c.index.dir for c in cfgs] if save_parts else None, progress)
        for (_, _, embeddings, filled, _), new in zip(found, embedded):
            lacked = ~filled[missing]  # rows a kept version or part did not give this tower
            embeddings[missing[lacked]] = new[lacked]
    embed_s = time.perf_counter() - t0
    return [_publish(cfg, store, embeddings, digests, tower, taken, int((~filled).sum()), embed_s, embedder_step)
            for cfg, (_, tower, embeddings, filled, taken) in zip(cfgs, found)]


def _publish(cfg: RunConfig, store: CorpusStore, embeddings: np.ndarray, digests: np.ndarray, tower: tuple,
             taken: dict[str, int], rows_embedded: int, embed_s: float, embedder_step: int | None) -> str:
    """Search index over ``embeddings`` [N, D] published as a new version of ``cfg.index.dir``, with its manifest
    (``taken``: rows each kept version or unfinished part gave)."""
    doc_hash = tower[0]
    from_parts = sum(n for path, n in taken.items() if _is_part(path))
    t1 = time.perf_counter()
    index = make_index(cfg.index)
    index.build(embeddings)
    build_s = time.perf_counter() - t1
    manifest = {
        "backend": cfg.index.backend,
        "n_rows": len(store),
        "dim": int(embeddings.shape[1]),
        "corpus_hash": store.corpus_hash,
        "corpus_store": str(store.folder),
        "block_ids_sha256": block_ids_hash(store.block_ids),
        "embedder_weights_sha256": doc_hash,
        "embedder_step": embedder_step,
        "embedding_key": embedding_key(store.corpus_hash, doc_hash, cfg),
        "embeddings_reused": rows_embedded == 0,  # every row taken from an earlier version, none embedded
        "rows_embedded": rows_embedded,
        "rows_from_parts": from_parts,  # from INDEX/unfinished/: a build that stopped, or torchrun's ranks' shares
        "reused_from": [path for path in taken if not _is_part(path)],  # versions that gave theirs
        "embed_seconds": round(embed_s, 3),
        "index_build_seconds": round(build_s, 3),
        "config": config_to_dict(cfg),
    }
    version = publish(cfg.index.dir, embeddings, index, manifest, keep=cfg.refresh.keep, block_digests=digests)
    shutil.rmtree(Path(cfg.index.dir) / UNFINISHED, ignore_errors=True)  # every part is in the version now
    return version
