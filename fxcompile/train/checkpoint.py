"""Checkpoints of a training run: enough to continue it as if it had never stopped.

A checkpoint holds the graph's state (parameters and buffers), the optimizer's and schedule's
state, the step, where in the data the run was, the history and the random number generator's
state. Only rank 0 writes (atomically: a crash mid-write leaves the previous checkpoint); every
rank reads.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any

import torch

from fxcompile.errors import InputError

from .distributed import barrier, is_main


@dataclass
class RunState:
    """Where a run is: optimizer steps taken, the epoch and the batches of it already used."""

    step: int = 0
    epoch: int = 0
    batch: int = 0
    history: list[dict] = field(default_factory=list)
    scales: list[float] | None = None  # the feature losses' normalisers (see distill)


def save_checkpoint(path: str, module: torch.nn.Module, optimizer, schedule, run: RunState) -> None:
    if is_main():
        state = {"module": module.state_dict(), "optimizer": optimizer.state_dict(),
                 "schedule": schedule.state_dict() if schedule is not None else None,
                 "run": vars(run), "rng": torch.get_rng_state()}
        tmp = f"{path}.tmp"
        torch.save(state, tmp)
        os.replace(tmp, path)
    barrier()  # no rank reads a checkpoint rank 0 is still writing


def load_checkpoint(path: str, module: torch.nn.Module, optimizer, schedule) -> RunState:
    """Restore ``module``, ``optimizer`` and ``schedule`` from ``path``; the run state to continue from."""
    if not os.path.exists(path):
        raise InputError(f"distill: resume=True but the checkpoint {path!r} does not exist; run without "
                         "resume to start one")
    state: dict[str, Any] = torch.load(path, map_location="cpu", weights_only=False)
    try:
        module.load_state_dict(state["module"])
    except RuntimeError as e:
        raise InputError(f"distill: the checkpoint {path!r} is of another model or pruning: {e}") from None
    optimizer.load_state_dict(state["optimizer"])
    if schedule is not None and state["schedule"] is not None:
        schedule.load_state_dict(state["schedule"])
    torch.set_rng_state(state["rng"])
    return RunState(**state["run"])
