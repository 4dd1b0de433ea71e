"""Asynchronous index refresh (REALM §3.4): a separate builder process re-embeds the corpus with a snapshot
of the document tower and publishes a new index version, while the trainer keeps training on the old one.

The trainer makes ONE call per step, :meth:`IndexRefresher.maybe_swap`, which (1) swaps in a newer published
version if there is one, between steps, without waiting, and (2) when the schedule says so and no builder is
running, writes a weight snapshot and starts a builder. ``sync`` mode runs the same builder and waits for it
(for comparison); ``never`` keeps the first index (the "stale index" ablation).

Run as a module, this file is the builder:
``python -m realm_lm.index.refresher CONFIG_JSON SNAPSHOT STEP TRAINER_PID``.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_model, save_model

from realm_lm.config import RunConfig, config_from_dict, config_to_dict
from realm_lm.corpus.store import CorpusStore
from realm_lm.errors import RealmError
from realm_lm.index.backends import Index
from realm_lm.index.build import index_is_current, tower_key
from realm_lm.index.versioned import latest_version, load_index
from realm_lm.models.embedder import Embedder, build_retriever
from realm_lm.runtime import resolve_device


class IndexBuilderError(RealmError, RuntimeError):
    """The builder process failed ``refresh.max_failures`` times in a row, or could not build the first index."""


@dataclass
class RefreshSchedule:
    """When to start a refresh: every ``every`` steps, never two at once, never in ``never`` mode."""

    every: int
    mode: str
    last_started: int = 0

    def due(self, step: int, builder_running: bool) -> bool:
        return self.mode != "never" and not builder_running and step - self.last_started >= self.every


@dataclass
class RefreshStats:
    waited_s: float = 0.0  # training time spent waiting for an index (sync mode)
    initial_build_s: float = 0.0  # the first index, built during setup before training starts
    refreshes_started: int = 0
    swaps: int = 0
    failures: int = 0
    failures_in_row: int = 0
    durations_s: list[float] = field(default_factory=list)  # builder wall time of each published refresh


class IndexRefresher:
    def __init__(self, cfg: RunConfig, run_dir: str | Path, store: CorpusStore, launches: bool = True):
        self.run_dir = Path(run_dir)
        self.cfg = replace(cfg, index=replace(cfg.index, dir=str(self.run_dir / "index")))
        self.store = store
        # with several ranks only one launches builders; the others just swap in what it publishes
        self.launches = launches
        self.schedule = RefreshSchedule(cfg.refresh.every, cfg.refresh.mode if launches else "never")
        self.stats = RefreshStats()
        self.builder: subprocess.Popen | None = None
        self.builder_started = 0.0
        self.index: Index | None = None
        self.manifest: dict[str, Any] = {}
        (self.run_dir / "refresh").mkdir(parents=True, exist_ok=True)

    # -- the trainer's view -------------------------------------------------------------------------------
    @property
    def version(self) -> str:
        return self.manifest.get("version", "")

    def staleness(self, step: int) -> int:
        """Training steps between the weights that embedded the index in use and the current weights."""
        return step - int(self.manifest.get("embedder_step") or 0)

    def start(self, doc: Embedder, step: int) -> None:
        """Load the newest published version, or build the first one now (the trainer waits for this one). A fresh
        run (step 0) in a folder that holds an earlier run's versions builds its own too: those were embedded by other
        weights. A resumed run takes the newest version, as the run it continues did. A rank that launches no
        builders takes what the one that does published before the barrier."""
        if self.launches and (step == 0 or latest_version(self.cfg.index.dir) is None):
            key = tower_key(self.cfg, doc, self.store)
            if not index_is_current(self.cfg.index.dir, key):
                t0 = time.perf_counter()
                self._launch(doc, step)
                self._wait()
                self.stats.initial_build_s += time.perf_counter() - t0
                if not index_is_current(self.cfg.index.dir, key):  # nothing published, or only an earlier run's
                    raise IndexBuilderError(f"the first index could not be built:\n{self._log_tail()}")
        self._swap_if_newer()
        built_at = self.manifest.get("embedder_step")
        self.schedule.last_started = step if built_at is None else int(built_at)

    def maybe_swap(self, step: int, doc: Embedder) -> bool:
        """The one call per training step. Returns True when a new index version was swapped in."""
        self._reap()
        swapped = self._swap_if_newer()
        if self.schedule.due(step, self.builder is not None):
            self._launch(doc, step)
            if self.schedule.mode == "sync":
                t0 = time.perf_counter()
                self._wait()
                self.stats.waited_s += time.perf_counter() - t0
                swapped = self._swap_if_newer() or swapped
        return swapped

    def close(self) -> None:
        """Stop a running builder (its staging folder is discarded; published versions stay)."""
        if self.builder is not None and self.builder.poll() is None:
            self.builder.terminate()
            self.builder.wait(timeout=30)
        self.builder = None

    # -- internals ---------------------------------------------------------------------------------------
    def _launch(self, doc: Embedder, step: int) -> None:
        snapshot = self.run_dir / "refresh" / f"doc_tower_step{step:07d}.safetensors"
        tmp = snapshot.with_name(f".{snapshot.name}.tmp")
        save_model(doc, str(tmp))
        os.replace(tmp, snapshot)
        cfg_path = self.run_dir / "refresh" / "config.json"
        cfg_path.write_text(json.dumps(config_to_dict(self.cfg)))
        env = {**os.environ, "OMP_NUM_THREADS": str(self.cfg.refresh.threads)}
        with open(self.run_dir / "refresh" / "builder.log", "a") as log:  # the child keeps its own copy of the fd
            self.builder = subprocess.Popen(
                [sys.executable, "-m", "realm_lm.index.refresher", str(cfg_path), str(snapshot), str(step),
                 str(os.getpid())],
                stdout=log, stderr=subprocess.STDOUT, env=env,
                # a process group of its own: a Ctrl-C in the terminal is the trainer's to handle (it stops the
                # builder); the same session, so the kernel shares the CPU between them as before (autogroups)
                process_group=0)
        self.builder_started = time.perf_counter()
        self.schedule.last_started = step
        self.stats.refreshes_started += 1

    def _wait(self) -> None:
        if self.builder is not None:
            self.builder.wait()
            self._reap()

    def _reap(self) -> None:
        if self.builder is None or self.builder.poll() is None:
            return
        code = self.builder.returncode
        self.builder = None
        for old in sorted((self.run_dir / "refresh").glob("doc_tower_step*.safetensors"))[:-1]:
            old.unlink(missing_ok=True)
        if code == 0:
            self.stats.durations_s.append(time.perf_counter() - self.builder_started)
            self.stats.failures_in_row = 0
            return
        self.stats.failures += 1
        self.stats.failures_in_row += 1
        if self.stats.failures_in_row >= self.cfg.refresh.max_failures:
            # training on would silently turn the run into the never-refreshed ablation
            raise IndexBuilderError(f"the index builder failed {self.stats.failures_in_row} times in a row (last exit "
                                    f"{code}); training stops at index {self.version}. The builder's log ends:\n"
                                    f"{self._log_tail()}")
        print(f"index builder failed (exit {code}); see {self.run_dir / 'refresh' / 'builder.log'}; "
              f"training goes on with index {self.version}", file=sys.stderr)

    def _log_tail(self, lines: int = 8) -> str:
        log = self.run_dir / "refresh" / "builder.log"
        return "\n".join(log.read_text(errors="replace").splitlines()[-lines:]) if log.exists() else "(no builder log)"

    def _swap_if_newer(self) -> bool:
        newest = latest_version(self.cfg.index.dir)
        if newest is None or newest == self.version:
            return False
        self.index, self.manifest = load_index(self.cfg.index.dir, self.store, cfg=self.cfg.index)
        self.stats.swaps += 1
        return True


def build_from_snapshot(cfg: RunConfig, snapshot: Path, step: int) -> str:
    """The builder's job: document tower from the snapshot -> embeddings of every block -> a published version."""
    from realm_lm.index.build import build_index

    torch.set_num_threads(cfg.refresh.threads)
    doc = build_retriever(replace(cfg.embedder, checkpoint="")).doc
    load_model(doc, str(snapshot))
    doc.to(resolve_device(cfg.runtime))
    return build_index(cfg, embedder_step=step, progress=False, doc_embedder=doc, resumable=False)


def exit_with_trainer(trainer_pid: int, poll_s: float = 0.2) -> None:
    """Stop this builder as soon as the trainer that launched it is gone. A trainer killed with SIGKILL cannot stop
    its builder, which would otherwise publish into the run folder, where a fresh run started meanwhile would swap
    in a version embedded by the dead run's weights. Its staging folder is cleared by the next publish."""
    def watch() -> None:
        while os.getppid() == trainer_pid:  # once the trainer dies, this process is handed to another parent
            time.sleep(poll_s)
        print(f"the trainer (pid {trainer_pid}) is gone: the builder stops without publishing", flush=True)
        os._exit(3)

    threading.Thread(target=watch, name="trainer-watch", daemon=True).start()


if __name__ == "__main__":
    config_json, snapshot_path, step_text, trainer_pid = sys.argv[1:5]
    exit_with_trainer(int(trainer_pid))
    from realm_lm.runtime import setup_runtime

    run_cfg = config_from_dict(json.loads(Path(config_json).read_text()))
    setup_runtime(run_cfg)
    t0 = time.perf_counter()
    name = build_from_snapshot(run_cfg, Path(snapshot_path), int(step_text))
    print(f"published {name} (embedder step {step_text}) in {time.perf_counter() - t0:.1f}s", flush=True)
