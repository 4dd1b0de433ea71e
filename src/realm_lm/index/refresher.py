"""Asynchronous index refresh (REALM §3.4): a separate builder process re-embeds the corpus with a snapshot
of the document tower and publishes a new index version, while the trainer keeps training on the old one.

The first index is built in the trainer's process before training starts (it waits for that one anyway). After
that, the trainer makes ONE call per step, :meth:`IndexRefresher.maybe_swap`, which (1) swaps in a newer published
version if there is one, between steps, without waiting, and (2) when the schedule says so and no builder is
running, writes a weight snapshot and starts a builder. ``sync`` mode runs the same builder and waits for it
(for comparison); ``never`` keeps the first index (the "stale index" ablation). With ``refresh.swap_after = N``
an async version goes in exactly N steps after its builder started (the trainer waits for a late one), so which
index each step trains on no longer depends on timing: the run is repeatable, and a checkpoint taken while a
builder runs records it, for ``--resume`` to start it again from the same snapshot.

Under torchrun every rank launches a builder at the same step, each on its rank's device, and each embeds a share of
the blocks (index.build.build_index_in_shares); rank 0's builder publishes the version, and every rank swaps it in at
the same step. Each builder thus embeds 1/N of the corpus, and the index stays fresher as ranks are added.

Run as a module, this file is the builder:
``python -m realm_lm.index.refresher CONFIG_JSON SNAPSHOT STEP TRAINER_PID SHARD SHARDS``.
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
from realm_lm.index.build import (build_index, build_index_in_shares, build_index_on_ranks, index_is_current,
                                  tower_key)
from realm_lm.index.versioned import kept_versions, latest_version, load_index, rewind
from realm_lm.models.embedder import Embedder, build_retriever
from realm_lm.runtime import resolve_device
from realm_lm.train import distributed


class IndexBuilderError(RealmError, RuntimeError):
    """Builder processes failed ``refresh.max_failures`` times in a row, or the first index could not be built."""


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
    last_exit: int | None = None  # the exit code of the last builder that failed
    durations_s: list[float] = field(default_factory=list)  # builder wall time of each published refresh


class IndexRefresher:
    def __init__(self, cfg: RunConfig, run_dir: str | Path, store: CorpusStore):
        self.run_dir = Path(run_dir)
        self.cfg = replace(cfg, index=replace(cfg.index, dir=str(self.run_dir / "index")))
        self.store = store
        self.shard, self.shards = distributed.rank(), distributed.world_size()  # this rank's builders' share
        # snapshots, builder config and log: RUN/refresh (rank 0, or one process), RUN/refresh/rankR (the others)
        self.refresh_dir = self.run_dir / "refresh" / (f"rank{self.shard}" if self.shard else "")
        self.schedule = RefreshSchedule(cfg.refresh.every, cfg.refresh.mode)
        self.stats = RefreshStats()
        self.builder: subprocess.Popen | None = None
        self.builder_started = 0.0
        self.pending: int | None = None  # the step of the refresh whose version has not been swapped in yet
        self.retained: str | None = None  # a snapshot the latest checkpoint needs (its refresh under way)
        self.index: Index | None = None
        self.manifest: dict[str, Any] = {}
        self.refresh_dir.mkdir(parents=True, exist_ok=True)

    # -- the trainer's view -------------------------------------------------------------------------------
    @property
    def version(self) -> str:
        return self.manifest.get("version", "")

    @property
    def deferred(self) -> bool:
        """Whether versions go in at fixed steps (``refresh.swap_after``) rather than as soon as published."""
        return self.cfg.refresh.mode == "async" and self.cfg.refresh.swap_after > 0

    def pending_refresh(self) -> int | None:
        """For a checkpoint to record: the step of the refresh under way whose version a deferred run will swap in
        at a fixed later step (a resumed run starts that build again from the same snapshot)."""
        return self.pending if self.deferred else None

    def retain(self, step: int | None) -> None:
        """Keep the snapshot of the refresh started at ``step`` (the latest checkpoint's pending one) on disk."""
        self.retained = None if step is None else snapshot_name(step)

    def staleness(self, step: int) -> int:
        """Training steps between the weights that embedded the index in use and the current weights (0 without
        an index: nothing is stale)."""
        return step - int(self.manifest.get("embedder_step") or 0) if self.manifest else 0

    def start(self, doc: Embedder, step: int, checkpoint_version: str | None = None,
              pending_refresh: int | None = None) -> None:
        """Load the newest published version, or build the first one now (the trainer waits for this one). A fresh
        run (step 0) in a folder that holds an earlier run's versions builds its own too: those were embedded by other
        weights. A run resumed from a checkpoint goes back to the version it used then (``checkpoint_version``; if
        that one is no longer kept, the newest embedded at or before the checkpoint's step, else a new one built from
        the checkpoint's weights): versions published after it came from weights past the checkpoint; and starts
        again the refresh that was under way then (``pending_refresh``, deferred mode), from its snapshot. The first
        index is built here, in the trainer's process, with its cores or device (no builder process to start: the
        trainer waits for this one anyway). Under torchrun every rank embeds its share, and every rank waits for the
        version rank 0 publishes."""
        # before the ranks' first collective: every rank then reads LATEST
        all_later = step > 0 and self.shard == 0 and not self._rewind_to_checkpoint(step, checkpoint_version)
        key = tower_key(self.cfg, doc, self.store)
        fresh = step == 0 or latest_version(self.cfg.index.dir) is None or all_later
        if distributed.any_rank(fresh and not index_is_current(self.cfg.index.dir, key)):  # every rank, or none
            t0 = time.perf_counter()
            self._build_first(doc, step)
            self.stats.initial_build_s += time.perf_counter() - t0
        self._swap_if_newer()
        built_at = self.manifest.get("embedder_step")
        self.schedule.last_started = step if built_at is None else int(built_at)
        if pending_refresh is not None and self.deferred:
            self._relaunch(pending_refresh)

    def maybe_swap(self, step: int, doc: Embedder) -> bool:
        """The one call per training step. Returns True when a new index version was swapped in."""
        self._reap()
        swapped = self._swap_when_due(step) if self.deferred else False
        # under torchrun the ranks agree (one small all-reduce): they swap in a new version at the same step, once
        # every rank sees it published; they launch their shares at the same step, once no rank's builder is running;
        # and they stop together when one rank's builders keep failing
        published = not self.deferred and latest_version(self.cfg.index.dir) not in (None, self.version)
        running, failing, unseen = distributed.any_rank_each([self.builder is not None, self._failing(), not published])
        if published and not unseen:
            swapped = self._swap_if_newer()
        self._stop_if(failing)
        if self.schedule.due(step, running):
            self._launch(doc, step)
            if self.schedule.mode == "sync":
                swapped = self._wait_and_swap() or swapped
        return swapped

    def _rewind_to_checkpoint(self, step: int, checkpoint_version: str | None) -> bool:
        """Point LATEST back at the checkpoint's version, or the newest embedded at or before ``step``; False when
        every kept version came from weights past the checkpoint (the caller then builds one from its weights)."""
        kept = {path.name: manifest for path, manifest in kept_versions(self.cfg.index.dir)}  # newest first
        target = checkpoint_version if checkpoint_version in kept else next(
            (name for name, m in kept.items() if (m.get("embedder_step") or 0) <= step), None)
        if target is None and not kept:
            return True  # an empty folder: the caller builds the first index as for a fresh run
        if target is None:
            print(f"no kept index version is as old as the checkpoint (step {step}): building one from its weights",
                  file=sys.stderr)
            return False
        if target != latest_version(self.cfg.index.dir):
            dropped = rewind(self.cfg.index.dir, target)
            which = ("the version the checkpoint was trained on" if target == checkpoint_version else
                     f"the newest kept version embedded at or before step {step}")
            print(f"index back to {target}, {which}; deleted {', '.join(dropped)}, published after the checkpoint",
                  file=sys.stderr)
        return True

    def close(self) -> None:
        """Stop a running builder (its staging folder is discarded; published versions stay)."""
        if self.builder is not None and self.builder.poll() is None:
            self.builder.terminate()
            self.builder.wait(timeout=30)
        self.builder = None

    # -- internals ---------------------------------------------------------------------------------------
    def _build_first(self, doc: Embedder, step: int) -> None:
        """The first index, embedded in this process, as `realm index build` does (under torchrun each rank embeds a
        share, and rank 0 publishes while the others wait). Its blocks are saved as it goes: a fresh run started again
        has the same first weights, and goes on from them. A failure ends this rank, and torchrun stops the others."""
        was_training = doc.training
        try:
            build_index_on_ranks(self.cfg, distributed.is_main(), doc, self.store, embedder_step=step)
        except RealmError:
            raise
        except Exception as e:  # a full disk, a device out of memory: said in one line, like the builder's failures
            raise IndexBuilderError(f"the first index could not be built ({type(e).__name__}: {e})") from e
        finally:
            doc.train(was_training)

    def _launch(self, doc: Embedder, step: int) -> None:
        snapshot = self.refresh_dir / snapshot_name(step)
        tmp = snapshot.with_name(f".{snapshot.name}.tmp")
        save_model(doc, str(tmp))
        os.replace(tmp, snapshot)
        self._start_builder(snapshot, step)

    def _relaunch(self, step: int) -> None:
        """Start again, from its snapshot, the refresh a resumed checkpoint had under way (every rank reads rank 0's
        snapshot: the weights are the same on every rank)."""
        snapshot = self.run_dir / "refresh" / snapshot_name(step)
        self.schedule.last_started = step
        if not snapshot.exists():
            print(f"the snapshot of the refresh under way at the checkpoint (step {step}) is gone: its index version "
                  f"is skipped, so this resumed run does not repeat the lost steps exactly", file=sys.stderr)
            return
        self.retain(step)  # until the next checkpoint: a second kill may come first
        self._start_builder(snapshot, step)

    def _start_builder(self, snapshot: Path, step: int) -> None:
        cfg_path = self.refresh_dir / "config.json"
        cfg_path.write_text(json.dumps(config_to_dict(self.cfg)))
        env = {**os.environ, "OMP_NUM_THREADS": str(self.cfg.refresh.threads)}
        with open(self.refresh_dir / "builder.log", "a") as log:  # the child keeps its own copy of the fd
            self.builder = subprocess.Popen(
                [sys.executable, "-m", "realm_lm.index.refresher", str(cfg_path), str(snapshot), str(step),
                 str(os.getpid()), str(self.shard), str(self.shards)],
                stdout=log, stderr=subprocess.STDOUT, env=env,
                # a process group of its own: a Ctrl-C in the terminal is the trainer's to handle (it stops the
                # builder); the same session, so the kernel shares the CPU between them as before (autogroups)
                process_group=0)
        self.builder_started = time.perf_counter()
        self.schedule.last_started = step
        self.pending = step
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
        for old in sorted(self.refresh_dir.glob("doc_tower_step*.safetensors"))[:-1]:
            if old.name != self.retained:
                old.unlink(missing_ok=True)
        if code == 0:
            self.stats.durations_s.append(time.perf_counter() - self.builder_started)
            self.stats.failures_in_row = 0
            return
        self.stats.failures += 1
        self.stats.failures_in_row += 1
        self.stats.last_exit = code
        if not self._failing():
            print(f"index builder failed (exit {code}); see {self.refresh_dir / 'builder.log'}; "
                  f"training goes on with index {self.version}", file=sys.stderr)

    def _failing(self) -> bool:
        """Whether this rank's builders failed too often: training on would silently turn the run into the
        never-refreshed ablation."""
        return self.stats.failures_in_row >= self.cfg.refresh.max_failures

    def _stop_if(self, failing_on_any_rank: bool) -> None:
        if not failing_on_any_rank:
            return
        if self._failing():
            raise IndexBuilderError(f"the index builder failed {self.stats.failures_in_row} times in a row (last exit "
                                    f"{self.stats.last_exit}); training stops at index {self.version}. The builder's "
                                    f"log ends:\n{self._log_tail()}")
        raise IndexBuilderError(f"the index builder of another rank failed {self.cfg.refresh.max_failures} times in a "
                                f"row (its log: {self.run_dir / 'refresh'}/rank*/builder.log); training stops at index "
                                f"{self.version}")

    def _log_tail(self, lines: int = 8) -> str:
        log = self.refresh_dir / "builder.log"
        return "\n".join(log.read_text(errors="replace").splitlines()[-lines:]) if log.exists() else "(no builder log)"

    def _swap_if_newer(self) -> bool:
        newest = latest_version(self.cfg.index.dir)
        if newest is None or newest == self.version:
            return False
        self.index, self.manifest = load_index(self.cfg.index.dir, self.store, cfg=self.cfg.index)
        self.stats.swaps += 1
        self.pending = None
        return True

    def _swap_when_due(self, step: int) -> bool:
        """Deferred mode: the version of the refresh started at step s goes in before step s + swap_after, whenever
        its builder finished; a late builder is waited for. One that failed leaves the old version in use."""
        if self.pending is None or step < self.pending + self.cfg.refresh.swap_after:
            return False
        return self._wait_and_swap()

    def _wait_and_swap(self) -> bool:
        """Wait for the refresh under way (sync mode, or a deferred swap that is due) and swap its version in."""
        t0 = time.perf_counter()
        self._wait()
        # every rank waits (one all-reduce) until every builder is done, so rank 0's has published or failed
        self._stop_if(distributed.any_rank(self._failing()))
        self.stats.waited_s += time.perf_counter() - t0
        self.pending = None
        return self._swap_if_newer()


def snapshot_name(step: int) -> str:
    return f"doc_tower_step{step:07d}.safetensors"


def build_from_snapshot(cfg: RunConfig, snapshot: Path, step: int, shard: int = 0, shards: int = 1) -> str | None:
    """The builder's job: document tower from the snapshot -> embeddings of every block (or of this builder's share,
    one of ``shards``) -> a published version (by builder 0; the others return None)."""
    torch.set_num_threads(cfg.refresh.threads)
    distributed.use_local_gpu()  # a builder of rank r embeds on rank r's GPU
    doc = build_retriever(replace(cfg.embedder, checkpoint="")).doc
    load_model(doc, str(snapshot))
    doc.to(resolve_device(cfg.runtime))
    if shards == 1:
        return build_index(cfg, embedder_step=step, progress=False, doc_embedder=doc, save_parts=False)
    return build_index_in_shares(cfg, shard, shards, step, doc)


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
    config_json, snapshot_path, step_text, trainer_pid, shard_text, shards_text = sys.argv[1:7]
    exit_with_trainer(int(trainer_pid))
    from realm_lm.runtime import setup_runtime

    run_cfg = config_from_dict(json.loads(Path(config_json).read_text()))
    setup_runtime(run_cfg)
    t0 = time.perf_counter()
    name = build_from_snapshot(run_cfg, Path(snapshot_path), int(step_text), int(shard_text), int(shards_text))
    done = f"published {name}" if name else f"saved share {shard_text} of {shards_text}"
    print(f"{done} (embedder step {step_text}) in {time.perf_counter() - t0:.1f}s", flush=True)
