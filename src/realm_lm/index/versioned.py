"""An index folder holds numbered versions, each published atomically, and a LATEST pointer.

::

    index_dir/LATEST               "v000003" (replaced atomically after the version folder is in place)
    index_dir/PINNED               versions publish never prunes, one a line (the index a run's checkpoint used)
    index_dir/versions/v000003/    embeddings.npy [N, D], faiss.index (faiss backends), manifest.json,
                                   block_digests.npy [N, 16] (what each row embedded)
    index_dir/unfinished/part-*/   the same files for the blocks a build embedded before it stopped (index.build)

A manifest records the corpus hash and a hash of the block-id map, the hash of the embedder weights that
made the embeddings (and the training step they came from), the resolved config and the creation time.
Loading checks the id map against the corpus store the caller will resolve ids with.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import fcntl
import hashlib
import json
import os
import shutil
import time
from dataclasses import replace
from pathlib import Path
from typing import Any, Iterator

import numpy as np

from realm_lm.artifacts import staged_dir, write_text_atomic
from realm_lm.config import IndexConfig
from realm_lm.corpus.store import CorpusStore
from realm_lm.errors import RealmError
from realm_lm.index.backends import Index, make_index

UNPUBLISHED = ".unpublished"  # a version being written, named by its builder's pid (see publish)


class IndexNotFoundError(RealmError, FileNotFoundError):
    pass


class IndexMismatchError(RealmError, RuntimeError):
    pass


class IndexCorruptError(RealmError, RuntimeError):
    """A published version whose files cannot be read (damaged after it was written: writes are atomic)."""


def _corrupt(index_dir: Path, version: str, err: Exception) -> IndexCorruptError:
    return IndexCorruptError(f"index {index_dir} version {version} is unreadable ({err}); rebuild it with "
                             f"`realm index build` (a run's own index: delete the folder, it is rebuilt on first use)")


def block_ids_hash(block_ids: list[str]) -> str:
    return hashlib.sha256("\n".join(block_ids).encode()).hexdigest()


def _versions(index_dir: Path) -> list[str]:
    folder = index_dir / "versions"
    return sorted(p.name for p in folder.iterdir() if p.name.startswith("v")) if folder.is_dir() else []


def latest_version(index_dir: str | Path) -> str | None:
    pointer = Path(index_dir) / "LATEST"
    return pointer.read_text().strip() if pointer.is_file() else None


def _process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process
        return True
    return True


def _clear_abandoned(versions: Path) -> None:
    """Delete what builders killed mid-write left (their process is gone); a live builder's files stay."""
    for path in versions.glob(f"*{UNPUBLISHED}-*"):
        pid = path.name.split(f"{UNPUBLISHED}-", 1)[1].split("-", 1)[0]
        if pid.isdigit() and not _process_alive(int(pid)):
            shutil.rmtree(path, ignore_errors=True)


@contextlib.contextmanager
def _folder_lock(index_dir: Path) -> Iterator[None]:
    """Exclusive among every process that publishes into ``index_dir`` (released if the holder dies)."""
    with open(index_dir / ".publish.lock", "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def publish(index_dir: str | Path, embeddings: np.ndarray, index: Index, manifest: dict[str, Any],
            keep: int = 3, block_digests: np.ndarray | None = None) -> str:
    """Write a new version and point LATEST at it; returns its name. The files are written under a name of the
    builder's own, so that builders publishing into one folder at once (two commands re-embedding one run's index)
    never touch each other's; the version number and LATEST are then taken under a lock on the folder.
    ``block_digests`` [N, 16]: what each row embedded (CorpusStore.block_digests), for later builds to reuse."""
    index_dir = Path(index_dir)
    versions = index_dir / "versions"
    versions.mkdir(parents=True, exist_ok=True)
    _clear_abandoned(versions)
    unpublished = versions / f"{UNPUBLISHED}-{os.getpid()}-{time.time_ns()}"
    with staged_dir(unpublished) as staging:
        np.save(staging / "embeddings.npy", embeddings)
        if block_digests is not None:
            np.save(staging / "block_digests.npy", block_digests)
        index.save(staging)
        manifest = {**manifest, "created": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")}
        (staging / "manifest.json").write_text(json.dumps(manifest, indent=2, sort_keys=True))
    try:
        with _folder_lock(index_dir):
            existing = _versions(index_dir)
            name = f"v{int(existing[-1][1:]) + 1 if existing else 1:06d}"
            os.rename(unpublished, versions / name)
            write_text_atomic(index_dir / "LATEST", name)
            pinned = _pinned(index_dir)
            for old in _versions(index_dir)[:-keep]:  # readers hold open files, so deleting an old folder is safe
                if old not in pinned:
                    shutil.rmtree(versions / old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(unpublished, ignore_errors=True)
        raise
    return name


def rewind(index_dir: str | Path, version: str) -> list[str]:
    """Point LATEST back at ``version`` and delete the versions published after it; returns their names. For a run
    resumed from a checkpoint taken while it used ``version``: the later ones were embedded by weights the resumed
    run has not reached (or will reach differently)."""
    index_dir = Path(index_dir)
    with _folder_lock(index_dir):
        later = [name for name in _versions(index_dir) if name > version]
        write_text_atomic(index_dir / "LATEST", version)  # first: a reader of LATEST never meets a deleted version
        for name in later:
            shutil.rmtree(index_dir / "versions" / name, ignore_errors=True)
    return later


def pin(index_dir: str | Path, versions: list[str | None]) -> None:
    """Spare ``versions`` from the pruning of later publishes (and unpin the others): a pre-training run pins the
    version its latest checkpoint was trained on, so that --resume can go back to it however many refreshes came
    after (refresh.keep counts the newest versions only)."""
    index_dir = Path(index_dir)
    if not index_dir.is_dir():  # no index was ever built here (pretrain.top_k = 1): no version to spare
        return
    with _folder_lock(index_dir):
        write_text_atomic(index_dir / "PINNED", "".join(f"{v}\n" for v in sorted({v for v in versions if v})))


def _pinned(index_dir: Path) -> set[str]:
    pointer = index_dir / "PINNED"
    # a damaged file pins nothing rather than stop every publish
    return set(pointer.read_text(errors="replace").split()) if pointer.is_file() else set()


def read_manifest(index_dir: str | Path, version: str | None = None) -> dict[str, Any]:
    index_dir = Path(index_dir)
    version = version or latest_version(index_dir)
    path = index_dir / "versions" / str(version) / "manifest.json"
    if version is None or not path.is_file():
        raise IndexNotFoundError(f"no index at {index_dir} (run `realm index build` first)")
    try:
        manifest = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise _corrupt(index_dir, version, err) from err
    return {**manifest, "version": version}  # the folder's name: taken when it was published


def check_against(manifest: dict[str, Any], store: CorpusStore) -> None:
    """The index's rows must be the store's rows, in the same order."""
    if manifest["n_rows"] != len(store) or manifest["block_ids_sha256"] != block_ids_hash(store.block_ids):
        raise IndexMismatchError(
            f"index {manifest['version']} was built over a different corpus ({manifest['n_rows']} rows, "
            f"corpus {manifest['corpus_hash'][:12]}) than the store at {store.folder} ({len(store)} rows, "
            f"corpus {store.corpus_hash[:12]}); rebuild it with `realm index build`")


def load_index(index_dir: str | Path, store: CorpusStore | None = None, version: str | None = None,
               cfg: IndexConfig | None = None) -> tuple[Index, dict[str, Any]]:
    """Load a version (default LATEST). Search-time settings (ef_search, nprobe, chunk_rows) come from ``cfg``."""
    manifest = read_manifest(index_dir, version)
    if store is not None:
        check_against(manifest, store)
    built = IndexConfig(**{k: tuple(v) if isinstance(v, list) else v for k, v in manifest["config"]["index"].items()})
    search_cfg = replace(cfg, backend=built.backend, dtype=built.dtype) if cfg else built
    index = make_index(search_cfg)
    try:
        index.load(Path(index_dir) / "versions" / manifest["version"])
    except (OSError, ValueError, RuntimeError) as err:  # numpy: truncated array; faiss: unreadable file
        raise _corrupt(Path(index_dir), manifest["version"], err) from err
    return index, manifest


def kept_versions(index_dir: str | Path) -> Iterator[tuple[Path, dict[str, Any]]]:
    """Each kept version's folder and manifest, newest first; a version whose manifest is unreadable is skipped."""
    index_dir = Path(index_dir)
    for name in reversed(_versions(index_dir)):
        path = index_dir / "versions" / name
        try:
            yield path, json.loads((path / "manifest.json").read_text())
        except (OSError, json.JSONDecodeError):
            continue
