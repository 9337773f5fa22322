"""Resuming on another number of ranks: the checkpoint is converted to a universal one, once, and loaded.

ZeRO-2 and ZeRO-3 checkpoints hold one optimizer shard per data-parallel rank
(``[bf16_]zero_pp_rank_{dp}_mp_rank_{mp}_optim_states.pt``) and load only on the number of ranks
that wrote them. DeepSpeed's ``ds_to_universal`` rewrites them as one file per parameter and
state (``zero/<name>/{fp32,exp_avg,exp_avg_sq}.pt``), which any number of ranks loads when
DeepSpeed's config says ``checkpoint.load_universal: true`` before ``deepspeed.initialize``. So the
decision is made before the engine exists (``resume_source``): the ranks that wrote the checkpoint
are read from its shard file names (no unpickling, no guessing), compared with the ranks now, and
on a difference rank 0 converts while the others wait at a barrier.

Where: ``checkpoints/global_stepN/universal/``, inside the checkpoint it was made from. It is a
second form of that checkpoint, not a new one: the ``latest`` pointer still names global_stepN,
rotation removes both together, and no other code that lists checkpoints (``global_step*``) sees
an extra entry.

Atomically, once: ``ds_to_universal`` writes into ``global_stepN/.tmp-universal-<pid>/universal``
(it also drops a ``latest_universal`` file beside its output, which stays in that temporary
folder); our ``complete.json`` is written inside it last, then the folder is renamed into place
with ``os.replace``. A conversion killed on the way leaves only the temporary folder, which never
loads and is removed by the next conversion; a later launch on the same number of ranks finds
``universal/complete.json`` and loads it without converting again.

In-process and serial (one worker): ``ds_to_universal`` would otherwise fork worker processes from
a rank that already holds the process group (and, on GPUs, a CUDA context), which is unsafe. The
conversion reads every shard with DeepSpeed's full unpickler: it is for the run's own checkpoints
(docs/trust.md).

Loading one under ZeRO-3 (DeepSpeed 0.19.8) needs two repairs, made in checkpoint.Checkpointer.resume:
the loader gives every parameter group the first group's hyperparameters, and one shared AdamW
step counter that AdamW then advances once per group. Without them a resumed ZeRO-3 run left the
uninterrupted one from its second step on (tests/test_universal.py).
"""
from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import re
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from .checkpoint import MARKER, CheckpointError, find_resume
from .fileio import TMP_PATTERN, tmp_sibling, write_atomic

UNIVERSAL = "universal"
"""The universal form of checkpoints/global_stepN: checkpoints/global_stepN/universal/."""

# One ZeRO optimizer shard per data-parallel rank (DeepSpeed's engine._get_rank_zero_ckpt_name).
_SHARD = re.compile(r"^(?:bf16_)?zero_pp_rank_(\d+)_mp_rank_\d+_optim_states\.pt$")


def saved_ranks(checkpoint: Path) -> int | None:
    """How many data-parallel ranks wrote ``checkpoint``, from its ZeRO optimizer shard files; None
    when it has none (ZeRO-0 keeps the whole optimizer in one file, a universal checkpoint one file
    per parameter: any number of ranks loads those)."""
    ranks = {int(m.group(1)) for f in checkpoint.iterdir() if (m := _SHARD.match(f.name))}
    if ranks and ranks != set(range(len(ranks))):
        raise CheckpointError(f"{checkpoint}: ZeRO optimizer shards of ranks {sorted(ranks)}, not 0..{max(ranks)}: "
                              "some are missing. Resume from an earlier checkpoint.")
    return len(ranks) or None


def is_universal(checkpoint: Path) -> bool:
    """Whether ``checkpoint`` is a universal checkpoint (ds_to_universal's output layout)."""
    return (checkpoint / "zero" / "optimizer_state.pt").is_file()


@dataclass(frozen=True)
class ResumeSource:
    """The checkpoint a run continues from and how DeepSpeed loads it."""
    checkpoint: Path
    """The checkpoint folder (checkpoints/global_stepN, or the one training.resume named)."""
    load_dir: Path
    tag: str
    """DeepSpeed's ``load_checkpoint(load_dir, tag)``."""
    universal: bool
    """Load as a universal checkpoint (checkpoint.load_universal)."""

    def ds_config(self, ds: dict) -> dict:
        """The DeepSpeed config to initialise the engine with."""
        if not self.universal:
            return ds
        # DeepSpeed restores a universal checkpoint's weights only through a ZeRO optimizer.
        if ds.get("zero_optimization", {}).get("stage", 0) < 1:
            raise CheckpointError(f"{self.checkpoint} holds ZeRO shards for another number of ranks, which load "
                                  "only into a ZeRO-1/2/3 engine: resume with the training.ds_config it was "
                                  "saved with (ds_config.json in the run directory).")
        return {**ds, "checkpoint": {**ds.get("checkpoint", {}), "load_universal": True}}


def resume_source(resume: str, ckpt_dir: Path, world: int, rank: int,
                  barrier: Callable[[], None]) -> ResumeSource | None:
    """Collective: call on every rank before ``deepspeed.initialize``. What ``training.resume``
    (``resume``) names, as a source to load on ``world`` ranks; a checkpoint written by another
    number of ranks is converted first (rank 0; the others wait). None: start fresh."""
    target = find_resume(resume, ckpt_dir)
    if target is None:
        return None
    folder, tag = target
    checkpoint = folder / tag
    if is_universal(checkpoint):  # converted by hand, named by training.resume
        return ResumeSource(checkpoint, folder, tag, universal=True)
    saved = saved_ranks(checkpoint)
    if saved is None or saved == world:
        return ResumeSource(checkpoint, folder, tag, universal=False)
    if rank == 0:
        convert_once(checkpoint, saved, world)
    barrier()
    if not (checkpoint / UNIVERSAL / MARKER).is_file():
        raise CheckpointError(f"rank {rank} does not see {checkpoint / UNIVERSAL / MARKER}, which rank 0 wrote: "
                              "the checkpoints folder must be on a filesystem that every node shares.")
    return ResumeSource(checkpoint, checkpoint, UNIVERSAL, universal=True)


def convert_once(checkpoint: Path, saved: int, world: int) -> Path:
    """``checkpoint``'s universal form, converted now unless a complete one is already there."""
    out = checkpoint / UNIVERSAL
    why = f"[lgdlm] {checkpoint.name} was saved by {_ranks(saved)}, this run has {world}:"
    if (out / MARKER).is_file():
        print(f"{why} loading its universal form {out}", flush=True)
        return out
    print(f"{why} converting it to a universal checkpoint in {out}", flush=True)
    # What an interrupted conversion left; a universal/ without its marker is not trusted either.
    for leftover in [*checkpoint.glob(TMP_PATTERN), out]:
        if leftover.is_dir():
            shutil.rmtree(leftover)
    staging = tmp_sibling(out)
    _ds_to_universal(checkpoint, staging / UNIVERSAL)
    write_atomic(staging / UNIVERSAL / MARKER, json.dumps({"from": checkpoint.name, "saved_ranks": saved}))
    os.replace(staging / UNIVERSAL, out)
    shutil.rmtree(staging)
    return out


def _ranks(n: int) -> str:
    return f"{n} rank" if n == 1 else f"{n} ranks"


def _ds_to_universal(src: Path, dst: Path) -> None:
    """DeepSpeed's converter in this process, one worker; its progress output goes to stderr only
    when it fails (it prints every step)."""
    from deepspeed.checkpoint import ds_to_universal
    args = argparse.Namespace(input_folder=str(src), output_folder=str(dst), num_extract_workers=1,
                              num_merge_workers=1, keep_temp_folder=False, strict=True,
                              # checkpoints saved before the engine stored universal_checkpoint_info
                              inject_missing_state=True)
    chatter = io.StringIO()
    try:
        with contextlib.redirect_stdout(chatter), contextlib.redirect_stderr(chatter):
            ds_to_universal.main(args)
    except Exception as e:
        sys.stderr.write(chatter.getvalue())
        raise CheckpointError(f"converting {src} to a universal checkpoint failed ({type(e).__name__}: {e}); "
                              f"resume it on the number of ranks that saved it.") from e
