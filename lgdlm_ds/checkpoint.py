"""Checkpoints that are complete or invisible.

Every rank writes its part of ``checkpoints/global_stepN/`` (DeepSpeed hangs if only rank 0
saves); after a barrier, rank 0 writes ``complete.json`` into the folder and atomically replaces
the ``latest`` pointer (temporary file + ``os.replace``). DeepSpeed's own ``save_latest`` writes
the pointer before the other ranks finish, so a job killed mid-save would point at a partial
folder; here a killed save leaves the previous pointer in place and its folder is removed by the
next rotation. ``latest`` is the file DeepSpeed's tools read too (``zero_to_fp32.py``,
``load_checkpoint(tag=None)``).
"""
from __future__ import annotations

import json
import os
import random
import re
import shutil
from pathlib import Path
from typing import Callable

import numpy as np
import torch

POINTER = "latest"
MARKER = "complete.json"
_TAG = re.compile(r"^global_step(\d+)$")


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be resumed as asked; the message names the path and the fix."""


def tag_for(step: int) -> str:
    return f"global_step{step}"


def complete_tags(ckpt_dir: Path) -> list[str]:
    """Tags whose save finished on every rank, oldest first."""
    found = []
    for d in ckpt_dir.glob("global_step*"):
        m = _TAG.match(d.name)
        if m and (d / MARKER).is_file():
            found.append((int(m.group(1)), d.name))
    return [tag for _, tag in sorted(found)]


def read_pointer(ckpt_dir: Path) -> str | None:
    pointer = ckpt_dir / POINTER
    if not pointer.is_file():
        return None
    tag = pointer.read_text().strip()
    if not (ckpt_dir / tag / MARKER).is_file():
        raise CheckpointError(f"{pointer} names '{tag}', which is not a complete checkpoint; point it at one "
                              f"of {complete_tags(ckpt_dir) or 'none'} or remove it.")
    return tag


def _write_atomically(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def save(engine, ckpt_dir: Path, step: int, client_state: dict, keep_last: int, is_rank0: bool,
         barrier: Callable[[], None]) -> Path:
    """Collective: call on every rank. Returns the checkpoint folder."""
    tag = tag_for(step)
    engine.save_checkpoint(str(ckpt_dir), tag=tag, client_state=client_state, save_latest=False)
    barrier()
    if is_rank0:
        _write_atomically(ckpt_dir / tag / MARKER, json.dumps({"step": step}))
        _write_atomically(ckpt_dir / POINTER, tag)
        rotate(ckpt_dir, keep_last)
    barrier()  # nobody reads the pointer before it is written
    return ckpt_dir / tag


def rotate(ckpt_dir: Path, keep_last: int) -> None:
    """Keep the newest ``keep_last`` complete checkpoints; remove older ones and partial folders."""
    keep = set(complete_tags(ckpt_dir)[-keep_last:])
    for d in ckpt_dir.glob("global_step*"):
        if d.is_dir() and d.name not in keep:
            shutil.rmtree(d)


def find_resume(resume: str, ckpt_dir: Path) -> tuple[Path, str] | None:
    """(folder holding the tag, tag) to load, or None to start fresh. See training.resume."""
    if resume == "none":
        if read_pointer(ckpt_dir):
            raise CheckpointError(f"training.resume is none but {ckpt_dir} already holds checkpoints; use "
                                  "training.resume=auto to continue that run, or another logging.run_dir.")
        return None
    if resume == "auto":
        tag = read_pointer(ckpt_dir)
        return (ckpt_dir, tag) if tag else None
    path = Path(resume)
    if (path / POINTER).is_file():
        return path, read_pointer(path)
    if path.is_dir() and any(path.glob("*model_states.pt")):
        return path.parent, path.name
    raise CheckpointError(f"training.resume '{resume}' is neither a checkpoints folder with a '{POINTER}' file "
                          "nor a checkpoint folder (global_stepN with *model_states.pt).")


def rng_state() -> dict:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])
