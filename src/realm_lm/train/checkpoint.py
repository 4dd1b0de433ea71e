"""Training checkpoints: weights and optimizer state in safetensors, step + RNG state + config in JSON,
published atomically (staging folder, then rename) under ``run_dir/checkpoints/step_NNNNNNN`` with a LATEST pointer.

A kill at any moment leaves the previous checkpoint intact; ``--resume`` loads the newest complete one.
"""

from __future__ import annotations

import json
import random
import shutil
import sys
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, load_model, save_file, save_model
from torch import nn

from realm_lm.artifacts import staged_dir, write_text_atomic
from realm_lm.errors import RealmError


class CheckpointError(RealmError, RuntimeError):
    pass


def rng_state() -> dict[str, Any]:
    return {"python": repr(random.getstate()), "numpy": np.random.get_state()[1].tolist()[:4],
            "torch": torch.random.get_rng_state().tolist()}


def set_rng_state(state: dict[str, Any]) -> None:
    torch.random.set_rng_state(torch.tensor(state["torch"], dtype=torch.uint8))


def _optimizer_tensors(opt: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    tensors, scalars = {}, {}
    for idx, state in opt.state_dict()["state"].items():
        for name, value in state.items():
            if torch.is_tensor(value) and value.dim() > 0:
                tensors[f"{idx}.{name}"] = value.contiguous()
            else:
                scalars[f"{idx}.{name}"] = float(value)
    return tensors, scalars


def save_checkpoint(run_dir: str | Path, step: int, model: nn.Module, opt: torch.optim.Optimizer | None,
                    extra: dict[str, Any], keep: int = 2) -> Path:
    folder = Path(run_dir) / "checkpoints"
    final = folder / f"step_{step:07d}"
    with staged_dir(final) as staging:
        save_model(model, str(staging / "model.safetensors"))  # handles tied weights (MLM decoder = embeddings)
        state: dict[str, Any] = {"step": step, "rng": rng_state(), **extra}
        if opt is not None:
            tensors, scalars = _optimizer_tensors(opt)
            save_file(tensors, str(staging / "optim.safetensors"))
            state["optimizer"] = {"scalars": scalars, "param_groups": opt.state_dict()["param_groups"]}
        (staging / "state.json").write_text(json.dumps(state, indent=1))
    write_text_atomic(folder / "LATEST", final.name)
    saved = sorted(p for p in folder.glob("step_*") if p.is_dir())
    # the last `keep` up to this step; any later one is of a run this one replaced (a fresh start in its folder), and
    # keeping it instead would rotate this run's own checkpoints out, LATEST with them
    for old in [p for p in saved if p.name > final.name] + [p for p in saved if p.name <= final.name][:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def latest_checkpoint(run_dir: str | Path) -> Path | None:
    pointer = Path(run_dir) / "checkpoints" / "LATEST"
    if not pointer.is_file():
        return None
    path = pointer.parent / pointer.read_text().strip()
    return path if path.is_dir() else None


class RunFolderTakenError(RealmError, RuntimeError):
    """A fresh run was started in a folder that holds another run's checkpoints."""


def check_fresh_start(run_dir: str | Path, verb: str) -> None:
    """A fresh run replaces the checkpoints and the metrics log of a run already in its folder: `realm ict`,
    `pretrain` and `finetune` refuse it unless told (a rerun without --resume would silently undo hours of work).
    Told, the old run's checkpoints stay until the new run saves its first (see save_checkpoint), so a new run that
    fails on its input loses nothing."""
    ckpt = latest_checkpoint(run_dir)
    if ckpt is not None:
        raise RunFolderTakenError(f"{run_dir} already holds a run (checkpoint {ckpt.name}): `realm {verb} --resume` "
                                  f"continues it, --overwrite starts a new one in its place (its checkpoints and "
                                  f"metrics log are replaced), or name another folder with --set {verb}.run_dir=...")


def resume_point(run_dir: str | Path, resume: bool) -> Path | None:
    """The checkpoint ``--resume`` continues from: the run's latest. None without ``--resume``, and also, said on
    stderr, when the run has none yet (a job script that always passes ``--resume`` starts at step 0)."""
    if not resume:
        return None
    ckpt = latest_checkpoint(run_dir)
    if ckpt is None:
        print(f"--resume: no checkpoint in {run_dir} yet, starting at step 0", file=sys.stderr)
    return ckpt


def tensor_names(checkpoint: Path) -> set[str]:
    """The names of the weights in a checkpoint folder (read from the safetensors header, no tensor data)."""
    try:
        with safe_open(str(checkpoint / "model.safetensors"), "pt") as f:
            return set(f.keys())
    except (OSError, SafetensorError) as err:
        raise CheckpointError(f"checkpoint {checkpoint} is unreadable: {err}") from err


def is_finetuned(run_dir: str | Path) -> bool:
    """Whether a run folder is a `realm finetune` run: its latest checkpoint holds a reader."""
    ckpt = latest_checkpoint(run_dir)
    return ckpt is not None and any(name.startswith("reader.") for name in tensor_names(ckpt))


def read_weights(checkpoint: Path, prefix: str = "") -> dict[str, torch.Tensor]:
    """The weights of a checkpoint folder whose names start with ``prefix``, named without it."""
    try:
        tensors = load_file(str(checkpoint / "model.safetensors"))
    except (OSError, SafetensorError) as err:
        raise CheckpointError(f"checkpoint {checkpoint} is unreadable: {err}") from err
    return {k.removeprefix(prefix): v for k, v in tensors.items() if k.startswith(prefix)}


def load_checkpoint(path: Path, model: nn.Module, opt: torch.optim.Optimizer | None = None,
                    strict: bool = True) -> dict[str, Any]:
    """Load weights (and optimizer state) into ``model`` / ``opt``; return state.json."""
    try:
        state = json.loads((path / "state.json").read_text())
        missing, unexpected = load_model(model, str(path / "model.safetensors"), strict=strict)
    except (OSError, json.JSONDecodeError, RuntimeError, SafetensorError) as err:
        raise CheckpointError(f"checkpoint {path} is unreadable or does not fit this model: {err}") from err
    # strict=False loads what fits; nothing used means the wrong run. (``missing`` cannot tell: safetensors drops
    # tied aliases from it, and a model with tied weights never counts as missing all of them.)
    if not tensor_names(path) - set(unexpected):
        raise CheckpointError(f"checkpoint {path} holds none of this model's weights "
                              f"({len(unexpected)} tensors of another model): is it the right run folder?")
    if opt is not None and (path / "optim.safetensors").is_file():
        try:
            tensors = load_file(str(path / "optim.safetensors"))
        except (OSError, SafetensorError) as err:
            raise CheckpointError(f"checkpoint {path}: the optimizer state is unreadable: {err}") from err
        per_param: dict[int, dict[str, Any]] = {}
        for key, value in tensors.items():
            idx, name = key.split(".", 1)
            per_param.setdefault(int(idx), {})[name] = value
        for key, value in state["optimizer"]["scalars"].items():
            idx, name = key.split(".", 1)
            per_param.setdefault(int(idx), {})[name] = torch.tensor(value)
        opt.load_state_dict({"state": per_param, "param_groups": state["optimizer"]["param_groups"]})
    return state


class MetricsLogError(RealmError, ValueError):
    """A run's metrics.jsonl has a line that is not a step's metrics."""


def read_metrics_log(run_dir: str | Path) -> list[dict[str, Any]]:
    """The metrics of each logged step of a run ([] when it has no log). A last line cut short, as a process killed
    mid-write can leave it, is dropped: the step it logged is redone on resume."""
    log = Path(run_dir) / "metrics.jsonl"
    if not log.exists():
        return []
    text = log.read_text()
    lines = text.splitlines()
    rows = []
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as err:
            if number == len(lines) and not text.endswith("\n"):
                break
            raise MetricsLogError(f"{log}:{number}: not JSON ({err})") from None
        if not isinstance(row, dict) or not isinstance(row.get("step"), int):
            raise MetricsLogError(f"{log}:{number}: expected an object with an integer \"step\"")
        rows.append(row)
    return rows


def truncate_metrics_log(run_dir: str | Path, step: int) -> None:
    """A run that starts at ``step`` keeps only the metrics lines of the steps before it, atomically: after a
    resume the steps since the checkpoint are redone; a fresh run (step 0) does not append to an old run's log."""
    log = Path(run_dir) / "metrics.jsonl"
    if not log.exists():
        return
    kept = [row for row in read_metrics_log(run_dir) if row["step"] <= step]
    if not kept:
        log.unlink()
        return
    tmp = log.with_name(".metrics.jsonl.tmp")
    tmp.write_text("".join(json.dumps(row) + "\n" for row in kept))
    tmp.replace(log)
