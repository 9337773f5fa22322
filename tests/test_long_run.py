"""A long run through every interruption at once (marked slow: deselected by default; README,
Testing, gives the command): the smoke recipe for 1,000 steps at micro-batch 4, ZeRO-2 in fp32 (so
that a change of the number of ranks needs a universal checkpoint) without gradient clipping (see
the test), launched four times into one run directory:

1. 1 rank (2 micro-steps per step), stopped by a preemption signal during step 250 (exit 3);
2. the same command, killed (``os._exit(137)``, as kill -9) mid-step 420, between checkpoints;
3. 2 ranks (1 micro-step each: the same global batch), which converts the 1-rank checkpoint of
   step 400 to a universal one, stopped by a signal to rank 1 during step 700 (exit 3);
4. 2 ranks, to the end.

An uninterrupted 1-rank run is the reference. Every launch keeps every log line written before it;
read as every reader reads it (the last line per step), the interrupted run's log must be the
reference's, and so must the held-out metrics of both final checkpoints (``lgdlm_ds.evaluate``).
The signals come from LGDLM_SIGNAL_AT
(lgdlm_ds/preemption.py), the kill from LGDLM_CRASH_AT (lgdlm_ds/crash_points.py): the same
interruptions however fast the machine.
"""
from __future__ import annotations

import base64
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from core_utils import ROOT, SMOKE
from engine_utils import TIMING_KEYS, WORLD_KEYS, free_port
from lgdlm_ds.crash_points import EXIT_STATUS, HOOK as CRASH_HOOK
from lgdlm_ds.metrics import LOG_NAME, read_log
from lgdlm_ds.preemption import HOOK as SIGNAL_HOOK

pytestmark = pytest.mark.slow

STEPS, CHANGED_AT = 1000, 400
LONG_RUN = [f"training.num_train_steps={STEPS}", "training.micro_batch_size=4", "logging.save_every=100",
            "logging.log_every=1", "training.eval_every=0", "training.keep_last=2"]
STOPPED = 3  # cli.STOPPED_AFTER_SAVE


def _start(run_dir: Path, ranks: int, hook: tuple[str, str] | None = None) -> subprocess.Popen:
    """The smoke recipe's command under DeepSpeed's per-node launcher on ``ranks`` CPU ranks, global
    batch 8 (4 x 2 micro-steps on 1 rank, 4 x 1 on 2), with ``hook`` (variable, value) set."""
    ds = json.loads((ROOT / "ds_configs" / "zero2_bf16.json").read_text())
    ds["bf16"]["enabled"], ds["gradient_clipping"] = False, 0.0
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir.parent / "zero2.json").write_text(json.dumps(ds))
    env = {k: v for k, v in os.environ.items() if k not in (*WORLD_KEYS, CRASH_HOOK, SIGNAL_HOOK)}
    env.update(PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1", DEEPSPEED_TIMEOUT="10", **dict([hook] if hook else []))
    world = base64.urlsafe_b64encode(json.dumps({"localhost": list(range(ranks))}).encode()).decode()
    cmd = [sys.executable, "-u", "-m", "deepspeed.launcher.launch", f"--world_info={world}",
           "--master_addr=127.0.0.1", f"--master_port={free_port()}", "--module", "lgdlm_ds.train", str(SMOKE),
           *LONG_RUN, f"training.gradient_accumulation_steps={2 // ranks}",
           f"training.ds_config={run_dir.parent / 'zero2.json'}", f"logging.run_dir={run_dir}"]
    # Into a file: a pipe nobody reads during the run would fill up and stop it.
    output = open(run_dir.parent / f"launch{len(list(run_dir.parent.glob('launch*.txt')))}.txt", "w+")
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=output, stderr=subprocess.STDOUT, text=True)
    proc.output = output
    return proc


def _finish(proc: subprocess.Popen, status: int) -> str:
    proc.wait(timeout=3 * 3600)
    proc.output.seek(0)
    out = proc.output.read()
    proc.output.close()
    assert proc.returncode == status, out[-6000:]
    return out


def _trajectory(run_dir: Path) -> dict[int, dict]:
    """The log as its readers see it (the last line per step), without timings and replay marks."""
    return {line["step"]: {k: v for k, v in line.items() if k not in TIMING_KEYS | {"resumed_from"}}
            for line in read_log(run_dir)}


def _held_out(run_dir: Path) -> dict:
    """``lgdlm_ds.evaluate`` of the run's final checkpoint: the metrics of its last line."""
    env = {k: v for k, v in os.environ.items() if k not in WORLD_KEYS}
    proc = subprocess.run([sys.executable, "-m", "lgdlm_ds.evaluate", str(run_dir), "--batches", "8"], cwd=ROOT,
                          env={**env, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True, timeout=1800)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-6000:]
    return {k: v for k, v in json.loads(proc.stdout.strip().splitlines()[-1]).items() if isinstance(v, float)}


def test_a_long_run_preempted_twice_killed_once_and_moved_to_two_ranks_ends_as_the_uninterrupted_one(tmp_path):
    """What is exact: up to step 400 the two runs are the same process on the same numbers. From step
    401 the global batch of 8 is split 2 ranks x 1 micro-step instead of 1 x 2, which trains on the
    same micro-batches with the same noise (batching.py); the two micro-batch gradients meet in an
    all-reduce instead of one rank's accumulation, which is exact (a + b commutes, halving is exact
    in binary); the universal checkpoint copies weights and AdamW state. One thing is summed in
    another order: the gradient norm, over ZeRO partitions, then ranks (a few fp32 ulps, ~1e-7
    relative; compared at 1e-6). With clipping on, that norm would scale every update by a factor
    off by as much, and a 1-ulp difference grows over hundreds of steps; with clipping off the norm
    is only logged (and checked for being finite), so everything else must be bitwise equal."""
    reference = _start(tmp_path / "reference" / "run", ranks=1)  # alongside the interrupted launches
    run = tmp_path / "interrupted" / "run"
    log, written = run / LOG_NAME, ""
    for ranks, hook, status, last in ((1, (SIGNAL_HOOK, "250"), STOPPED, 250),
                                      (1, (CRASH_HOOK, "after_backward:420"), EXIT_STATUS, 419),
                                      (2, (SIGNAL_HOOK, "700:1"), STOPPED, 700),
                                      (2, None, 0, STEPS)):
        out = _finish(_start(run, ranks, hook), status)
        text = log.read_text()
        assert text.startswith(written), f"a launch lost log lines: {hook}"
        written = text
        assert max(_trajectory(run)) == last, hook
        if ranks == 2 and hook:  # the first launch on 2 ranks resumed the 1-rank checkpoint of step 400
            assert (f"global_step{CHANGED_AT} was saved by 1 rank, this run has 2: converting it to a universal "
                    "checkpoint") in out, out[-6000:]
    _finish(reference, 0)
    interrupted, straight = _trajectory(run), _trajectory(tmp_path / "reference" / "run")
    assert sorted(interrupted) == sorted(straight) == list(range(1, STEPS + 1))
    for step in range(1, STEPS + 1):
        a, b = dict(interrupted[step]), dict(straight[step])
        if step > CHANGED_AT:
            assert a.pop("grad_norm") == pytest.approx(b.pop("grad_norm"), rel=1e-6), step
        assert a == b, step
    assert _held_out(run) == _held_out(tmp_path / "reference" / "run")
