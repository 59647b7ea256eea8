"""Resumable training checkpoints and best-epoch selection, shared by every stage (0, 1 and 2).

A checkpoint (:func:`save_checkpoint`, :func:`load_checkpoint`) is a directory with the trainable tensors
(``params.safetensors``), the optimiser's moments (``optimizer.safetensors``) and scalars plus the stage's
:class:`StagePosition` (``state.json``), and the best epoch's tensors so far (``best.safetensors``); it is
written to a temporary directory beside the target and swapped in by renames. After each scored epoch
:func:`update_best` keeps a copy of the best tensors; :func:`keep_best` loads them back at the end.
"""
from __future__ import annotations

import json
import shutil
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from engine.errors import UserInputError


@dataclass
class StagePosition:
    """Where a stage is: the next epoch/step to run, and the best val score so far."""

    epoch: int = 0
    step_in_epoch: int = 0
    global_step: int = 0
    best_score: float = -1.0
    best_epoch: int = -1
    done: bool = False
    history: list[dict[str, Any]] = field(default_factory=list)
    seconds: float = 0.0
    samples: int = 0


def _atomic_dir(target: Path) -> Path:
    tmp = target.with_name(f".{target.name}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    return tmp


def _swap_in(tmp: Path, target: Path) -> None:
    old = target.with_name(f".{target.name}.old")
    shutil.rmtree(old, ignore_errors=True)
    if target.exists():
        target.rename(old)
    tmp.rename(target)
    shutil.rmtree(old, ignore_errors=True)


def save_checkpoint(path: Path, params: dict[str, nn.Parameter], optimizer: torch.optim.Optimizer,
                    position: StagePosition, best: dict[str, torch.Tensor] | None) -> None:
    """Trainable tensors, optimiser moments and position: safetensors + JSON, swapped in atomically."""
    from safetensors.torch import save_file

    tmp = _atomic_dir(path)
    save_file({k: v.detach().cpu().contiguous() for k, v in params.items()}, str(tmp / "params.safetensors"))
    if best is not None:
        save_file(best, str(tmp / "best.safetensors"))
    opt_state = optimizer.state_dict()
    names = list(params)
    tensors, scalars = {}, {}
    for idx, state in opt_state["state"].items():
        for key, value in state.items():
            if torch.is_tensor(value):
                tensors[f"{names[idx]}::{key}"] = value.detach().cpu().contiguous()
            else:
                scalars[f"{names[idx]}::{key}"] = value
    save_file(tensors, str(tmp / "optimizer.safetensors"))
    meta = {"position": position.__dict__, "optimizer_scalars": scalars, "param_groups": opt_state["param_groups"]}
    (tmp / "state.json").write_text(json.dumps(meta, indent=1))
    _swap_in(tmp, path)


def load_checkpoint(path: Path, params: dict[str, nn.Parameter], optimizer: torch.optim.Optimizer
                    ) -> tuple[StagePosition, dict[str, torch.Tensor] | None]:
    from engine.base_models import load_safetensors_checked

    meta = json.loads((path / "state.json").read_text())
    saved = load_safetensors_checked(path / "params.safetensors")
    if set(saved) != set(params):
        raise UserInputError(f"checkpoint {path} does not match this configuration; delete it to start over")
    with torch.no_grad():
        for name, p in params.items():
            p.copy_(saved[name])
    moments = load_safetensors_checked(path / "optimizer.safetensors")
    names = list(params)
    state: dict[int, dict[str, Any]] = defaultdict(dict)
    for key, value in moments.items():
        name, _, field_name = key.partition("::")
        state[names.index(name)][field_name] = value
    for key, value in meta["optimizer_scalars"].items():
        name, _, field_name = key.partition("::")
        state[names.index(name)][field_name] = value
    optimizer.load_state_dict({"state": dict(state), "param_groups": meta["param_groups"]})
    best_path = path / "best.safetensors"
    best = load_safetensors_checked(best_path) if best_path.exists() else None
    return StagePosition(**meta["position"]), best


def update_best(position: StagePosition, score: float, params: dict[str, nn.Parameter],
                best: dict[str, torch.Tensor] | None) -> dict[str, torch.Tensor] | None:
    """After an epoch scored ``score`` (higher is better): a copy of ``params`` if it is the best so far."""
    if score > position.best_score:
        position.best_score, position.best_epoch = score, position.epoch + 1
        return {k: v.detach().cpu().clone() for k, v in params.items()}
    return best


def keep_best(params: dict[str, nn.Parameter], best: dict[str, torch.Tensor] | None) -> None:
    """Load the best epoch's tensors (when an epoch was scored) into ``params`` and freeze them."""
    if best is not None:
        with torch.no_grad():
            for k, p in params.items():
                p.copy_(best[k])
    for p in params.values():
        p.requires_grad_(False)
