"""kill -9 loses nothing: real runs (``python -m lgdlm_ds.train`` under DeepSpeed's launcher, 2 CPU
ranks, ZeRO-2 in fp32, so that each rank writes its own optimizer shard) killed during a checkpoint
save and between checkpoints, then launched again with the same command.

Each kill comes from LGDLM_CRASH_AT (lgdlm_ds/crash_points.py): the named rank leaves with
``os._exit(137)`` at a named moment, the same whatever the machine's speed. A checkpoint every 2
steps and ``keep_last: 1``, so every save also rotates the previous checkpoint away. After each
kill: where ``latest`` points and what the folders hold; after each launch: what it reported and
removed, the step it resumed from (the first step it logged, and ``resumed_from`` on the replayed
ones), and that the log still holds every line written before. At the end, the log read as every
reader reads it (the last line per step) equals an uninterrupted run's, bitwise but for timings.

ZeRO-3 is not run: its save is the same ``save_checkpoint`` with the same points around it and
more files per rank (a model-states shard each), and recovery looks only at ``complete.json`` and
``latest``, never at which shard files a folder holds.
"""
from __future__ import annotations

import base64
import json
import os
import random
import subprocess
import sys
from pathlib import Path

import pytest

from core_utils import ROOT, SMOKE
from engine_utils import RUN, SYNTHETIC, TIMING_KEYS, WORLD_KEYS, free_port
from lgdlm_ds import checkpoint
from lgdlm_ds.config import ConfigError
from lgdlm_ds.crash_points import EXIT_STATUS, HOOK, announcement, parse, target
from lgdlm_ds.metrics import LOG_NAME, read_log
from lgdlm_ds.preemption import HOOK as SIGNAL_HOOK

STEPS, SAVE_EVERY = 12, 2
CRASH_RUN = [*RUN, *SYNTHETIC, "data.path=", "data.standardize_latents=false", "data.num_samples=9",
             "data.val_fraction=0.5", "training.micro_batch_size=2", f"training.num_train_steps={STEPS}",
             "training.lr=3e-3", "training.eval_every=0", f"logging.save_every={SAVE_EVERY}", "training.keep_last=1"]
WORLD_INFO = base64.urlsafe_b64encode(json.dumps({"localhost": [0, 1]}).encode()).decode()
SHARDS = ("mp_rank_00_model_states.pt", "zero_pp_rank_0_mp_rank_00_optim_states.pt",
          "zero_pp_rank_1_mp_rank_00_optim_states.pt")


def _start(run_dir: Path, crash: str | None = None) -> subprocess.Popen:
    """The run's command under DeepSpeed's launcher, 2 ranks, killed where ``crash`` says."""
    ds = json.loads((ROOT / "ds_configs" / "zero2_bf16.json").read_text())
    ds["bf16"]["enabled"] = False
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir.parent / "zero2.json").write_text(json.dumps(ds))
    env = {k: v for k, v in os.environ.items() if k not in (*WORLD_KEYS, HOOK, SIGNAL_HOOK)}
    env.update(PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1", DEEPSPEED_TIMEOUT="5", **({HOOK: crash} if crash else {}))
    # DeepSpeed's per-node launcher, which its runner starts on each node: it starts the ranks and
    # ends them all when one fails.
    cmd = [sys.executable, "-u", "-m", "deepspeed.launcher.launch", f"--world_info={WORLD_INFO}",
           "--master_addr=127.0.0.1", f"--master_port={free_port()}", "--module", "lgdlm_ds.train", str(SMOKE),
           *CRASH_RUN, f"training.ds_config={run_dir.parent / 'zero2.json'}", f"logging.run_dir={run_dir}"]
    return subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _finish(proc: subprocess.Popen, crash: str | None) -> str:
    """Wait for the launch; it ends cleanly, or, killed at ``crash``, the named rank announced it left
    there. The launcher exits with the status of the rank it sees dead first: the one killed
    (EXIT_STATUS), or another whose collective failed when it left (1)."""
    out, err = proc.communicate(timeout=600)
    if crash is None:
        assert proc.returncode == 0, (out + err)[-6000:]
        return err
    point, step, rank = parse(crash)
    assert proc.returncode in (EXIT_STATUS, 1) and announcement(point, step, rank) in err, (out + err)[-6000:]
    return err


def _trajectory(run_dir: Path) -> list[dict]:
    """The log as its readers see it (the last line per step), without timings and replay marks."""
    return [{k: v for k, v in line.items() if k not in TIMING_KEYS | {"resumed_from"}} for line in read_log(run_dir)]


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    """The run without a kill, started at once and waited for when first asked."""
    run = tmp_path_factory.mktemp("uninterrupted") / "run"
    proc = _start(run)

    def trajectory() -> list[dict]:
        if proc.returncode is None:
            _finish(proc, None)
        return _trajectory(run)
    yield trajectory
    if proc.poll() is None:
        proc.kill()


class CrashedRun:
    """One run directory, launched again and again; remembers the log between launches."""

    def __init__(self, run_dir: Path):
        self.dir, self.ckpt, self.log = run_dir, run_dir / "checkpoints", run_dir / LOG_NAME
        self.text = ""

    def launch(self, crash: str | None) -> tuple[str, list[dict]]:
        """Launch, killed at ``crash`` (None: to the end); the stderr and the lines this launch logged,
        after checking that every line logged before is still there."""
        err = _finish(_start(self.dir, crash), crash)
        text = self.log.read_text()
        assert text.startswith(self.text), crash
        new = [json.loads(line) for line in text[len(self.text):].splitlines()]
        self.text = text
        return err, new

    def pointer(self) -> str | None:
        return checkpoint.read_pointer(self.ckpt)

    def folders(self) -> dict[str, set[str]]:
        return {d.name: {f.name for f in d.iterdir()} for d in self.ckpt.iterdir() if d.is_dir()}

    def logged(self) -> int:
        return read_log(self.dir)[-1]["step"] if self.text else 0


def _resumed(new: list[dict], previously_logged: int, resumed_from: int, last: int) -> None:
    """The launch resumed from ``resumed_from`` and logged every step from there to ``last``; the
    lines of steps the log already held carry resumed_from."""
    assert [line["step"] for line in new] == list(range(resumed_from + 1, last + 1))
    assert [line.get("resumed_from") for line in new] == [
        resumed_from if line["step"] <= previously_logged else None for line in new]


def _removed(err: str, *paths: Path) -> None:
    reports = [line for line in err.splitlines() if line.startswith("[lgdlm] removing")]
    assert len(reports) == len(paths), reports
    for report, path in zip(reports, paths):
        assert report.startswith(f"[lgdlm] removing {path} ("), report


def test_kills_during_saves_and_between_checkpoints_lose_nothing(tmp_path, uninterrupted):
    """One run killed eight times, one launch per kill (a launch costs far more than its steps):
    at each point of a save, then three times at seeded-random steps between checkpoints."""
    run = CrashedRun(tmp_path / "run")
    marker = checkpoint.MARKER

    # Rank 1 wrote its optimizer shard of step 4, rank 0 nothing (neither its shard nor the model).
    err, new = run.launch("between_shards:4:1")
    assert [line["step"] for line in new] == [1, 2, 3, 4]
    assert run.pointer() == "global_step2"
    assert run.folders() == {"global_step2": {marker, *SHARDS}, "global_step4": {SHARDS[2]}}

    # Every shard written, no marker: removed at the next start, which resumes from step 2.
    err, new = run.launch("before_marker:4")
    _removed(err, run.ckpt / "global_step4")
    _resumed(new, 4, 2, 4)
    assert run.pointer() == "global_step2"
    assert run.folders() == {"global_step2": {marker, *SHARDS}, "global_step4": set(SHARDS)}

    # The marker written, the pointer not moved: step 4 is complete but latest names step 2, which
    # the next start resumes from (it saves step 4 again).
    err, new = run.launch("before_pointer:4")
    _removed(err, run.ckpt / "global_step4")
    _resumed(new, 4, 2, 4)
    assert run.pointer() == "global_step2"
    assert run.folders() == {"global_step2": {marker, *SHARDS}, "global_step4": {marker, *SHARDS}}

    # The pointer moved to step 4; step 2 was renamed away for removal and not yet removed.
    err, new = run.launch("rotation:4")
    _removed(err)
    _resumed(new, 4, 2, 4)
    assert run.pointer() == "global_step4"
    (half_removed,) = [name for name in run.folders() if name != "global_step4"]
    assert half_removed.startswith(".tmp-global_step2-"), run.folders()
    assert run.folders()["global_step4"] == {marker, *SHARDS}

    # Before any file of step 6: an empty folder.
    err, new = run.launch("save_start:6")
    _removed(err, run.ckpt / half_removed)
    _resumed(new, 4, 4, 6)
    assert run.pointer() == "global_step4"
    assert run.folders() == {"global_step4": {marker, *SHARDS}, "global_step6": set()}
    resumed_from, gone = 4, [run.ckpt / "global_step6"]

    # Mid-step (after the backward, before the optimizer step) or right after a step's log line, on
    # either rank: the launch resumes from the last checkpoint before the kill and logs the lost
    # steps again.
    rng = random.Random(14)
    for _ in range(3):
        point, step, rank = rng.choice(("after_backward", "after_log")), rng.randint(resumed_from + 1, STEPS), \
            rng.randint(0, 1)
        logged = run.logged()
        err, new = run.launch(f"{point}:{step}:{rank}")
        _removed(err, *gone)
        _resumed(new, logged, resumed_from, step if point == "after_log" else step - 1)
        resumed_from, gone = (step - 1) // SAVE_EVERY * SAVE_EVERY, []  # the step's own checkpoint: not saved
        assert run.pointer() == checkpoint.tag_for(resumed_from)

    logged = run.logged()
    err, new = run.launch(None)
    _removed(err)
    _resumed(new, logged, resumed_from, STEPS)
    assert run.pointer() == f"global_step{STEPS}"
    assert run.folders() == {f"global_step{STEPS}": {marker, *SHARDS}}
    assert _trajectory(run.dir) == uninterrupted()


@pytest.mark.parametrize("value, message", [
    ("rotation", "expected POINT:STEP or POINT:STEP:RANK"),
    ("rotate:4", "unknown point 'rotate'; points: save_start, between_shards"),
    ("rotation:4:1", "only rank 0 reaches 'rotation'"),
])
def test_a_bad_crash_hook_is_refused(monkeypatch, value, message):
    monkeypatch.setenv(HOOK, value)
    with pytest.raises(ConfigError, match=f"{HOOK}='{value}': {message}"):
        target()
    monkeypatch.setenv(HOOK, "between_shards:4:1")
    assert target() == ("between_shards", 4, 1)
