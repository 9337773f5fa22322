"""The shared-memory files of DeepSpeed's CPU all-reduce: unlinked once every rank has mapped them.

With the CPU accelerator and every rank on one machine, DeepSpeed 0.19.8 gives each rank a 69 MB
POSIX shared-memory file, ``/dev/shm/deepspeed_allreduce_buffer_<uid>_<MASTER_ADDR>_<MASTER_PORT>_<rank>``
(deepspeed/ops/csrc/cpu/comm/shm.cpp), which every rank maps while ``init_distributed`` runs, and
never unlinks it: every run, and every run killed, leaves one per rank in memory, until /dev/shm
is full and the ranks of a later run spin forever on their shared flags. Once every rank has
mapped every buffer the names serve nothing: each rank unlinks its own, and the memory goes when
the last rank exits, however it exits. Without such a file (GPUs, ranks on several machines)
nothing happens.
"""
from __future__ import annotations

import os
from pathlib import Path

SHM_DIR = Path("/dev/shm")


def buffer_name(rank: int) -> str:
    """The file DeepSpeed's CPU all-reduce creates for ``rank`` of the job this process belongs to."""
    return (f"deepspeed_allreduce_buffer_{os.getuid()}_{os.environ.get('MASTER_ADDR', '')}_"
            f"{os.environ.get('MASTER_PORT', '')}_{rank}")


def release(dist) -> None:
    """Collective; right after ``deepspeed.init_distributed()``, which returns on a rank only once it
    has mapped every rank's buffer: after the barrier, no rank opens a buffer by its name again."""
    dist.barrier()
    (SHM_DIR / buffer_name(dist.get_rank())).unlink(missing_ok=True)
