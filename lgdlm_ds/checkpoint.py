"""Checkpoints that are complete or invisible.

Every rank writes its part of ``checkpoints/global_stepN/`` (DeepSpeed hangs if only rank 0
saves); after a barrier, rank 0 writes ``complete.json`` into the folder and atomically replaces
the ``latest`` pointer (temporary file + ``os.replace``). DeepSpeed's own ``save_latest`` writes
the pointer before the other ranks finish, so a job killed mid-save would point at a partial
folder; here a killed save leaves the previous pointer in place. ``latest`` is the file DeepSpeed's
tools read too (``zero_to_fp32.py``, ``load_checkpoint(tag=None)``).

What a crash (kill -9, a node lost) leaves, at any moment: ``latest`` names the checkpoint of the
last save that ran to its end (a save cut short between its marker and the pointer leaves a
complete folder that ``latest`` does not name; the resumed run saves it again); at most one folder
lacks ``complete.json`` (the save that was cut short); and an older checkpoint being rotated away
has been renamed out of the listing first (``.tmp-global_stepN-PID``), so a half-removed folder
never looks complete. The next launch's rank
0 reports and removes both kinds (``remove_partial``) before any rank looks for a checkpoint to
load. lgdlm_ds/crash_points.py kills a rank at each of these moments in the tests.
"""
from __future__ import annotations

import json
import random
import re
import shutil
import sys
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Callable

import numpy as np
import torch

from . import crash_points
from .batching import DataPosition
from .config import Config
from .fileio import TMP_PATTERN, tmp_sibling, write_atomic

if TYPE_CHECKING:
    from .universal import ResumeSource

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
    saved), or one checkpoint folder (global_stepN holding *model_states.pt), taken as it is unless
    it sits in a checkpoints folder of this layout (one whose ``latest`` names a complete
    checkpoint): there it must be complete too."""
    if tag is not None:
        complete = complete_tags(path)
        if tag not in complete:
            raise CheckpointError(f"{path / tag} is not a complete checkpoint; complete ones: "
                                  f"{', '.join(complete) or 'none'}.")
        return path, tag
    if (path / POINTER).is_file():
        return path, read_pointer(path)
    if path.is_dir() and any(path.glob("*model_states.pt")):
        if _TAG.match(path.name) and not (path / MARKER).is_file() and _is_ours(path.parent):
            raise CheckpointError(f"{path} is a partial checkpoint (no {MARKER}: its save was interrupted) and is "
                                  f"never loaded; resume from {path.parent}, whose '{POINTER}' names the newest "
                                  "complete one.")
        return path.parent, path.name
    return None


def _is_ours(ckpt_dir: Path) -> bool:
    """Whether ``ckpt_dir`` is a checkpoints folder of this layout: its pointer names a folder with
    the marker (DeepSpeed's own layout has a ``latest`` too, and no markers)."""
    pointer = ckpt_dir / POINTER
    return pointer.is_file() and (ckpt_dir / pointer.read_text().strip() / MARKER).is_file()


def remove_partial(ckpt_dir: Path) -> list[Path]:
    """Rank 0, before any rank looks for a checkpoint to resume: remove what a crash left in
    ``ckpt_dir``, reporting each on stderr: checkpoint folders without the marker (a save cut
    short), and temporary names (a removal or a pointer write cut short). Returns what it removed."""
    partial = [(d, f"partial checkpoint, no {MARKER}: its save was interrupted")
               for d in sorted(ckpt_dir.glob("global_step*"))
               if _TAG.match(d.name) and d.is_dir() and not (d / MARKER).is_file()]
    leftovers = [(p, f"left by an interrupted {'checkpoint removal' if p.is_dir() else 'pointer write'}")
                 for p in sorted(ckpt_dir.glob(TMP_PATTERN))]
    for path, why in partial + leftovers:
        print(f"[lgdlm] removing {path} ({why})", file=sys.stderr, flush=True)
        if path.is_dir():
            shutil.rmtree(path)
        else:
            path.unlink()
    return [path for path, _ in partial + leftovers]


def save(engine, ckpt_dir: Path, step: int, client_state: dict, keep_last: int, is_rank0: bool,
         barrier: Callable[[], None]) -> Path:
    """Collective: call on every rank. Returns the checkpoint folder."""
    tag = tag_for(step)
    # The folder exists, without the marker, from here until the save ends: a save cut short leaves
    # it for remove_partial. A run resumed from an older step saves over a tag it left behind: that
    # folder must stop counting as complete before any rank rewrites it.
    if is_rank0:
        (ckpt_dir / tag).mkdir(exist_ok=True)
        (ckpt_dir / tag / MARKER).unlink(missing_ok=True)
    barrier()
    crash_points.reached("save_start", step)
    with crash_points.shard_writes(engine, step):
        engine.save_checkpoint(str(ckpt_dir), tag=tag, client_state=client_state, save_latest=False)
    barrier()
    if is_rank0:
        crash_points.reached("before_marker", step)
        write_atomic(ckpt_dir / tag / MARKER, json.dumps({"step": step}))
        crash_points.reached("before_pointer", step)
        write_atomic(ckpt_dir / POINTER, tag)
        rotate(ckpt_dir, keep_last, tag)
    barrier()  # nobody reads the pointer before it is written
    return ckpt_dir / tag


def rotate(ckpt_dir: Path, keep_last: int, saved: str) -> None:
    """Keep the newest ``keep_last`` complete checkpoints and ``saved``, the one just written (a run
    resumed from an older step saves below the newest); remove the others and partial folders.
    Each is renamed to a temporary name first (atomic), so that a removal cut short leaves no
    folder that looks like a checkpoint, only a leftover for ``remove_partial``."""
    keep = set(complete_tags(ckpt_dir)[-keep_last:]) | {saved}
    for d in sorted(ckpt_dir.glob("global_step*")):
        if _TAG.match(d.name) and d.is_dir() and d.name not in keep:
            doomed = tmp_sibling(d)
            d.rename(doomed)
            crash_points.reached("rotation", int(_TAG.match(saved).group(1)))
            shutil.rmtree(doomed)


def find_resume(resume: str, ckpt_dir: Path) -> tuple[Path, str] | None:
    """(folder holding the tag, tag) to load, or None to start fresh. See training.resume."""
    if resume == "none":
        if read_pointer(ckpt_dir):
            raise CheckpointError(f"training.resume is none but {ckpt_dir} already holds checkpoints; use "
                                  "training.resume=auto to continue that run, or another logging.run_dir.")
        return None
    if resume == "auto":
        return find_checkpoint(ckpt_dir)
    # DeepSpeed unpickles what it resumes fully (code in the file would run): only the layout a
    # training run writes is taken, never an arbitrary folder that happens to hold its files.
    target = find_checkpoint(Path(resume))
    if target is not None and _TAG.match(target[1]):
        return target
    raise CheckpointError(f"training.resume '{resume}' is neither a checkpoints folder with a '{POINTER}' file "
                          "nor a checkpoint folder (global_stepN with *model_states.pt). A resumed "
                          "checkpoint is unpickled fully, so only a training run's own checkpoints are resumed "
                          "(docs/trust.md); to start from other weights, set model.init_from instead.")


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

    def resume(self, source: ResumeSource | None) -> Progress:
        """Load ``source`` (universal.resume_source: what training.resume names, in the form this
        number of ranks loads) into the engine and return its progress; a fresh Progress when it is
        None. The learning-rate schedule and the optimizer's hyperparameters follow the recipe, not
        the checkpoint."""
        if source is None:
            return Progress()
        # DeepSpeed's loaders restore the saved hyperparameters, and ZeRO-3's universal loader
        # (0.19.8) gives every parameter group the first group's (the no-decay group would decay):
        # those built from the recipe are put back after loading.
        groups = self.engine.basic_optimizer.param_groups
        built = [{k: v for k, v in group.items() if k != "params"} for group in groups]
        path, state = self.engine.load_checkpoint(str(source.load_dir), tag=source.tag, load_lr_scheduler_states=False)
        if path is None:
            raise CheckpointError(f"DeepSpeed could not load {source.load_dir / source.tag}.")
        for group, hyperparameters in zip(groups, built):
            group.update(hyperparameters)
        if source.universal:
            # ZeRO-3's universal loader (0.19.8) puts one ``step`` tensor into every parameter
            # group's state; AdamW increments it in place once per group, so every group after the
            # first would take its bias correction from a step count too high.
            for param_state in self.engine.basic_optimizer.state.values():
                if torch.is_tensor(param_state.get("step")):
                    param_state["step"] = param_state["step"].clone()
        ours = dict(state[CLIENT_KEY])
        set_rng_state(ours.pop("rng"))
        progress = Progress(**{**ours, "data_position": DataPosition(**ours["data_position"])})
        self.engine.lr_scheduler.seek(progress.step - progress.skipped_steps)
        self.last = source.checkpoint
        return progress
