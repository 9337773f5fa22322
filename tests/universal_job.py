"""Resuming on another number of ranks (lgdlm_ds/universal.py) under the real launcher, three jobs
in this order, each writing OUT_DIR/<job>_rank<r>.json for test_universal.py:

    deepspeed --num_gpus 1 tests/universal_job.py save_one OUT_DIR     ZeRO-2/3 on 1 rank: 6 steps
                                                                       straight, and 3 steps saved
    deepspeed --num_gpus 2 tests/universal_job.py two OUT_DIR          the same on 2 ranks; then the
                                                                       1-rank checkpoints resumed here
    deepspeed --num_gpus 1 tests/universal_job.py resume_one OUT_DIR   a conversion killed midway; the
                                                                       2-rank checkpoints resumed here

(with the repository on PYTHONPATH). A resume builds two trainers on the run directory, as two
launches would: the first converts, the second must find the conversion done; the second trains to
the end. Runs are engine_job.py's tiny fp32 model with global batch 4 (2 ranks x 1 micro-step or
1 rank x 2), so a step trains on the same samples and noise whatever the number of ranks.
"""
from __future__ import annotations

import os
import subprocess
import sys
from dataclasses import asdict
from pathlib import Path

from engine_job import STEPS, local_state, log_lines, make, same_state
from engine_utils import ds_json, record
from lgdlm_ds.checkpoint import MARKER, tag_for
from lgdlm_ds.fileio import TMP_PATTERN
from lgdlm_ds.universal import UNIVERSAL

SAVED_AT = STEPS // 2
STAGES = (2, 3)

# A conversion killed (SIGKILL, no cleanup) after ds_to_universal wrote every parameter's fragments,
# just before its last file: the half-written universal checkpoint of the worst moment.
KILLED_CONVERSION = """
import os, signal, sys
from pathlib import Path
from deepspeed.checkpoint import ds_to_universal
from lgdlm_ds.universal import convert_once
def die(*args):
    os.kill(os.getpid(), signal.SIGKILL)
ds_to_universal._save_optimizer_state = ds_to_universal._save_optimizer_state_stage3 = die
convert_once(Path(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]))
"""


def run_name(stage: int, world: int, kind: str) -> str:
    return f"{kind}_w{world}_zero{stage}"


def last_per_step(lines: list[dict]) -> dict[int, dict]:
    return {line["step"]: line for line in lines}


def straight_and_saved(out: Path, world: int) -> dict:
    """Per stage: the uninterrupted run's log, and a run stopped after SAVED_AT steps with its checkpoint."""
    result = {}
    for stage in STAGES:
        ds = ds_json(out, stage)
        straight = make(out, run_name(stage, world, "straight"), ds, world=world)
        straight.train()
        saved = make(out, run_name(stage, world, "saved"), ds, world=world)
        saved.train(until_step=SAVED_AT)
        result[f"zero{stage}"] = {"straight": log_lines(straight),
                                  "saved_position": asdict(saved.progress.data_position)}
    return result


def resume_elsewhere(out: Path, world: int, saved_world: int) -> dict:
    """Per stage: the checkpoint saved by ``saved_world`` ranks, resumed on ``world`` by a first
    trainer (which converts it) and a second (which must load that conversion), which trains on."""
    result = {}
    for stage in STAGES:
        name = run_name(stage, saved_world, "saved")
        checkpoint = out / name / "checkpoints" / tag_for(SAVED_AT)
        first = make(out, name, ds_json(out, stage), world=world)
        marker = (checkpoint / UNIVERSAL / MARKER).stat()
        second = make(out, name, ds_json(out, stage), world=world)
        again = (checkpoint / UNIVERSAL / MARKER).stat()
        entry = {"resumed_at": second.progress.step, "position": asdict(second.progress.data_position),
                 "marker_kept": (marker.st_ino, marker.st_mtime_ns) == (again.st_ino, again.st_mtime_ns),
                 "same_state": same_state(local_state(first), local_state(second)),
                 "last": str(second.checkpointer.last)}
        second.train()
        entry["lines"] = log_lines(second)
        entry["universal_folders"] = sorted(str(p.relative_to(out)) for p in (out / name).rglob(UNIVERSAL))
        entry["leftovers"] = sorted(str(p.relative_to(out)) for p in (out / name).rglob(TMP_PATTERN))
        result[f"zero{stage}"] = entry
    return result


def killed_conversion(out: Path) -> dict:
    """The 2-rank ZeRO-2 checkpoint's conversion killed midway: what it leaves behind."""
    checkpoint = out / run_name(2, 2, "saved") / "checkpoints" / tag_for(SAVED_AT)
    proc = subprocess.run([sys.executable, "-c", KILLED_CONVERSION, str(checkpoint), "2", "1"],
                          capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    leftovers = list(checkpoint.glob(TMP_PATTERN))
    return {"returncode": proc.returncode, "universal_exists": (checkpoint / UNIVERSAL).exists(),
            "leftovers": [str(p.relative_to(checkpoint)) for p in leftovers],
            "leftover_fragments": sum(1 for p in leftovers for _ in p.rglob("fp32.pt"))}


def save_one(out: Path) -> dict:
    return {"runs": straight_and_saved(out, 1)}


def two(out: Path) -> dict:
    return {"runs": straight_and_saved(out, 2), "from_one": resume_elsewhere(out, 2, saved_world=1)}


def resume_one(out: Path) -> dict:
    return {"killed": killed_conversion(out), "from_two": resume_elsewhere(out, 1, saved_world=2)}


JOBS = {"save_one": save_one, "two": two, "resume_one": resume_one}


def main() -> None:
    job, out = [a for a in sys.argv[1:] if not a.startswith("--local_rank")]
    out = Path(out)
    record(out / f"{job}_rank{os.environ['RANK']}.json", lambda: JOBS[job](out))


if __name__ == "__main__":
    main()
