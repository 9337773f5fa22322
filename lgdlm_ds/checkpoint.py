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
import random
import re
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from .batching import DataPosition
from .config import Config
from .fileio import write_atomic
from .optim import apply_hyperparameters

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


def find_checkpoint(path: Path, tag: str | None = None) -> tuple[Path, str] | None:
    """Which checkpoint ``path`` means, as (checkpoints folder, tag), the arguments of DeepSpeed's
    ``load_checkpoint``. ``path`` is a checkpoints folder, where ``tag`` must name a complete
    checkpoint and no tag means the one ``latest`` names (None when there is no pointer: nothing was
    saved), or one checkpoint folder (global_stepN holding *model_states.pt), taken as it is."""
    if tag is not None:
        complete = complete_tags(path)
        if tag not in complete:
            raise CheckpointError(f"{path / tag} is not a complete checkpoint; complete ones: "
                                  f"{', '.join(complete) or 'none'}.")
        return path, tag
    if (path / POINTER).is_file():
        return path, read_pointer(path)
    if path.is_dir() and any(path.glob("*model_states.pt")):
        return path.parent, path.name
    return None


def save(engine, ckpt_dir: Path, step: int, client_state: dict, keep_last: int, is_rank0: bool,
         barrier: Callable[[], None]) -> Path:
    """Collective: call on every rank. Returns the checkpoint folder."""
    tag = tag_for(step)
    # A run resumed from an older step saves over a tag it left behind: that folder must stop
    # counting as complete before any rank rewrites it.
    if is_rank0:
        (ckpt_dir / tag / MARKER).unlink(missing_ok=True)
    barrier()
    engine.save_checkpoint(str(ckpt_dir), tag=tag, client_state=client_state, save_latest=False)
    barrier()
    if is_rank0:
        write_atomic(ckpt_dir / tag / MARKER, json.dumps({"step": step}))
        write_atomic(ckpt_dir / POINTER, tag)
        rotate(ckpt_dir, keep_last, tag)
    barrier()  # nobody reads the pointer before it is written
    return ckpt_dir / tag


def rotate(ckpt_dir: Path, keep_last: int, saved: str) -> None:
    """Keep the newest ``keep_last`` complete checkpoints and ``saved``, the one just written (a run
    resumed from an older step saves below the newest); remove the others and partial folders."""
    keep = set(complete_tags(ckpt_dir)[-keep_last:]) | {saved}
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
        return find_checkpoint(ckpt_dir)
    target = find_checkpoint(Path(resume))
    if target is not None:
        return target
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


# Our part of DeepSpeed's client_state, under one key: DeepSpeed's own keys (skipped_steps,
# global_steps, ...) live in the same dictionary and would silently overwrite or be overwritten.
CLIENT_KEY = "lgdlm"


@dataclass(frozen=True)
class Progress:
    """Where a run stands; with DeepSpeed's state and the RNG states, what a checkpoint restores."""
    step: int = 0
    """Optimizer steps done, skipped ones included."""
    skipped_steps: int = 0
    consumed_samples: int = 0
    data_position: DataPosition = DataPosition()

    def after_step(self, global_batch: int, dataset_len: int, skipped: bool) -> "Progress":
        return Progress(self.step + 1, self.skipped_steps + skipped, self.consumed_samples + global_batch,
                        self.data_position.advance(global_batch, dataset_len))


class Checkpointer:
    """Saves every ``logging.save_every`` steps and at the last step of a ``train()`` call; resumes
    from what ``training.resume`` names. Collective: every rank calls ``save`` and ``resume``."""

    def __init__(self, engine, cfg: Config, dist):
        self.engine, self.cfg, self.dist = engine, cfg, dist
        self.ckpt_dir = Path(cfg.logging.run_dir) / "checkpoints"
        self.ckpt_dir.mkdir(parents=True, exist_ok=True)
        self.last: Path | None = None
        """The newest complete checkpoint of this run: saved or resumed from."""

    def due(self, step: int, end: int) -> bool:
        every = self.cfg.logging.save_every
        return bool(every and step % every == 0) or step == end

    def save(self, progress: Progress) -> Path:
        from deepspeed.checkpoint.constants import UNIVERSAL_CHECKPOINT_VERSION_KEY, UNIVERSAL_CHECKPOINT_VERSION_VALUE
        state = {CLIENT_KEY: {**asdict(progress), "rng": rng_state()},
                 # what ds_to_universal needs from a client that is not Megatron
                 "iteration": progress.step,
                 "universal_checkpoint_info": {UNIVERSAL_CHECKPOINT_VERSION_KEY: UNIVERSAL_CHECKPOINT_VERSION_VALUE}}
        self.last = save(self.engine, self.ckpt_dir, progress.step, state, self.cfg.training.keep_last,
                         self.dist.get_rank() == 0, self.dist.barrier)
        return self.last

    def resume(self) -> Progress:
        """Load the checkpoint that training.resume names into the engine and return its progress;
        a fresh Progress when there is none. The learning-rate schedule and the optimizer's
        hyperparameters follow the recipe, not the checkpoint."""
        target = find_resume(self.cfg.training.resume, self.ckpt_dir)
        if target is None:
            return Progress()
        folder, tag = target
        from deepspeed.runtime.zero.utils import ZeRORuntimeException
        try:
            path, state = self.engine.load_checkpoint(str(folder), tag=tag, load_lr_scheduler_states=False)
        except ZeRORuntimeException as e:  # ZeRO shards fit only the world size that wrote them
            raise CheckpointError(f"{folder / tag}: {e} Convert it to a universal checkpoint "
                                  "(ds_configs/README.md, 'Resuming on a different number of GPUs').") from e
        if path is None:
            raise CheckpointError(f"DeepSpeed could not load {folder / tag}.")
        ours = dict(state[CLIENT_KEY])
        set_rng_state(ours.pop("rng"))
        progress = Progress(**{**ours, "data_position": DataPosition(**ours["data_position"])})
        self.engine.lr_scheduler.seek(progress.step - progress.skipped_steps)
        apply_hyperparameters(self.engine.basic_optimizer, self.cfg.training)
        self.last = folder / tag
        return progress
