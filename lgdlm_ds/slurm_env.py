"""Rank variables for a process that ``srun`` started as one task per GPU (launch/slurm_srun.sbatch).

torch.distributed and DeepSpeed read RANK, LOCAL_RANK, WORLD_SIZE, LOCAL_SIZE, MASTER_ADDR and
MASTER_PORT; srun sets only SLURM_* variables, and DeepSpeed does not read those. ``export_ranks``
fills the first from the second when RANK is not set already (a launcher such as ``deepspeed`` sets
it) and the process is a task of a job step (SLURM_STEP_ID: a batch script, which also carries
SLURM_PROCID=0 and the allocation's SLURM_NTASKS, is not).

Rank 0 runs on the step's first node, so that node is MASTER_ADDR; MASTER_PORT defaults to
``20000 + job id % 20000``, the same for every task of the job and unlikely to collide with another
job's on a shared node. Variables already set (the batch script exports MASTER_ADDR and MASTER_PORT)
are kept.
"""
from __future__ import annotations

import os
import re
from typing import MutableMapping

_RANGE = re.compile(r"(\d+)(?:-(\d+))?$")
_COUNT = re.compile(r"(\d+)(?:\(x(\d+)\))?$")


def expand_hostlist(hostlist: str) -> list[str]:
    """SLURM's compressed host list ("gpu[01-03,7],login1") -> ["gpu01", "gpu02", "gpu03", "gpu7",
    "login1"]. Zero padding follows the range's first number; several bracket groups multiply."""
    hosts: list[str] = []
    for item in _split_top_level(hostlist):
        names = [""]
        rest = item
        while rest:
            if "[" not in rest:
                names = [n + rest for n in names]
                break
            head, _, tail = rest.partition("[")
            body, found, rest = tail.partition("]")
            if not found:
                raise ValueError(f"host list {hostlist!r}: '[' without ']'")
            names = [n + head + suffix for n in names for suffix in _expand_ranges(body, hostlist)]
        hosts += names
    if not hosts:
        raise ValueError(f"host list {hostlist!r} names no host")
    return hosts


def _split_top_level(hostlist: str) -> list[str]:
    """Split at the commas outside brackets."""
    items, depth, start = [], 0, 0
    for i, c in enumerate(hostlist):
        depth += (c == "[") - (c == "]")
        if c == "," and depth == 0:
            items.append(hostlist[start:i])
            start = i + 1
    items.append(hostlist[start:])
    return [item for item in items if item]


def _expand_ranges(body: str, hostlist: str) -> list[str]:
    out = []
    for part in body.split(","):
        m = _RANGE.match(part)
        if not m or (m.group(2) is not None and int(m.group(2)) < int(m.group(1))):
            raise ValueError(f"host list {hostlist!r}: bad range {part!r} (expected N or N-M with N <= M)")
        lo, hi = m.group(1), m.group(2) or m.group(1)
        out += [str(i).zfill(len(lo)) for i in range(int(lo), int(hi) + 1)]
    return out


def expand_counts(tasks_per_node: str) -> list[int]:
    """SLURM's compressed per-node counts ("4(x2),2") -> [4, 4, 2]."""
    counts = []
    for part in tasks_per_node.split(","):
        m = _COUNT.match(part)
        if not m:
            raise ValueError(f"tasks per node {tasks_per_node!r}: bad item {part!r} (expected N or N(xM))")
        counts += [int(m.group(1))] * int(m.group(2) or 1)
    return counts


def export_ranks(environ: MutableMapping[str, str] = os.environ) -> bool:
    """Set the rank variables of an srun task from SLURM_*; False (nothing changed) when RANK is set
    already or this is not an srun task."""
    if "RANK" in environ or "SLURM_STEP_ID" not in environ:
        return False
    node = int(environ.get("SLURM_NODEID", "0"))
    per_node = environ.get("SLURM_STEP_TASKS_PER_NODE") or environ.get("SLURM_TASKS_PER_NODE")
    if per_node:
        local_size = expand_counts(per_node)[node]
    else:
        local_size = int(environ["SLURM_NTASKS"]) // int(environ.get("SLURM_NNODES", "1"))
    nodelist = environ.get("SLURM_STEP_NODELIST") or environ["SLURM_JOB_NODELIST"]
    environ.update(RANK=environ["SLURM_PROCID"], LOCAL_RANK=environ["SLURM_LOCALID"],
                   WORLD_SIZE=environ["SLURM_NTASKS"], LOCAL_SIZE=str(local_size))
    environ.setdefault("MASTER_ADDR", expand_hostlist(nodelist)[0])
    environ.setdefault("MASTER_PORT", str(20000 + int(environ["SLURM_JOB_ID"]) % 20000))
    return True
