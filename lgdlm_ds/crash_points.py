"""Crashes on purpose, for tests: ``LGDLM_CRASH_AT=POINT:STEP[:RANK]`` makes that rank (default 0)
leave with ``os._exit(137)`` when it reaches POINT at STEP (1-based, as logged; for the save
points, the step of the checkpoint being saved): no handler, no ``finally``, no flush, as after
``kill -9``, but for one line on stderr that names the point (``announcement``): the other ranks
fail at their next collective or their launcher ends them first, so the launcher's exit status is
whichever rank it sees dead first, and that line is what says where the run died. Unset, every
point is a no-op.

The points (``POINTS``) are the moments at which a crash leaves a different state on disk. Those
in a save are the same for ZeRO-2 and ZeRO-3: both write through one ``save_checkpoint`` in which
every rank writes its own files (ZeRO-3 a model-states file per rank as well), and recovery looks
only at ``complete.json`` and the ``latest`` pointer, never at which shard files a folder holds.
"""
from __future__ import annotations

import contextlib
import functools
import os
import re
from typing import Iterator

from .config import ConfigError

HOOK = "LGDLM_CRASH_AT"
EXIT_STATUS = 137  # what a shell reports for a process killed by SIGKILL

POINTS = {
    "save_start": "a save has begun: its folder exists, no rank has written a file",
    "between_shards": "in a save: the named rank has written its files, every other rank none",
    "before_marker": "every rank has written its files; complete.json and the pointer not yet",
    "before_pointer": "complete.json is written; latest still names the previous checkpoint",
    "rotation": "latest names the new checkpoint; an older one is being removed",
    "after_backward": "mid-step: every micro-batch's backward is done, the optimizer step is not",
    "after_log": "the step's log line is written; its checkpoint, when one is due, is not",
}
RANK0_POINTS = ("before_marker", "before_pointer", "rotation")
"""Only rank 0 passes these: it writes the marker and the pointer and rotates."""


@functools.lru_cache(maxsize=None)
def parse(value: str) -> tuple[str, int, int] | None:
    if not value:
        return None
    m = re.fullmatch(r"([a-z_]+):(\d+)(?::(\d+))?", value)
    if not m:
        raise ConfigError(f"{HOOK}={value!r}: expected POINT:STEP or POINT:STEP:RANK (e.g. before_marker:4 or "
                          "between_shards:4:1), or unset it.")
    point, step, rank = m.group(1), int(m.group(2)), int(m.group(3) or 0)
    if point not in POINTS:
        raise ConfigError(f"{HOOK}={value!r}: unknown point '{point}'; points: {', '.join(POINTS)}.")
    if point in RANK0_POINTS and rank != 0:
        raise ConfigError(f"{HOOK}={value!r}: only rank 0 reaches '{point}'; name rank 0 or no rank.")
    return point, step, rank


def target() -> tuple[str, int, int] | None:
    """(point, step, rank) that ``LGDLM_CRASH_AT`` names, None when unset; ConfigError when malformed."""
    return parse(os.environ.get(HOOK, ""))


def _rank() -> int:
    return int(os.environ.get("RANK", "0"))


def announcement(point: str, step: int, rank: int) -> str:
    return f"[lgdlm] {HOOK}: rank {rank} leaves at {point} of step {step}"


def _leave(point: str, step: int) -> None:
    os.write(2, (announcement(point, step, _rank()) + "\n").encode())
    os._exit(EXIT_STATUS)


def reached(point: str, step: int) -> None:
    """This rank is at ``point`` of ``step``: leave now if the hook names them and this rank."""
    if target() == (point, step, _rank()):
        _leave(point, step)


@contextlib.contextmanager
def shard_writes(engine, step: int) -> Iterator[None]:
    """Around DeepSpeed's ``save_checkpoint`` of ``step``: at ``between_shards``, the named rank
    leaves right after writing its optimizer shard (every rank writes it last), and every other
    rank before writing its first file, so one rank's files are on disk and nobody else's,
    whichever rank gets there first. It relies on the ranks passing no collective between their
    first and last write, so that none waits for one that has left: true of ZeRO-2 in DeepSpeed
    0.19.8 (tests/test_crash.py), whose writes all follow the save's last collective."""
    hook = target()
    if hook is None or hook[:2] != ("between_shards", step):
        yield
        return
    if not engine.zero_optimization():
        raise ConfigError(f"{HOOK}: 'between_shards' needs ZeRO stage 1, 2 or 3 (one optimizer shard per rank); "
                          "under ZeRO-0 rank 0 writes the only file.")
    writer = engine.checkpoint_engine
    write = writer.save

    def save(state_dict, path: str) -> None:
        if _rank() != hook[2]:
            _leave("between_shards", step)
        write(state_dict, path)
        if path.endswith("optim_states.pt"):
            _leave("between_shards", step)
    writer.save = save
    try:
        yield
    finally:
        del writer.save  # the class's method again
