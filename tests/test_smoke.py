"""The README's first command: the smoke recipe end to end through launch/smoke.sh (the DeepSpeed
launcher, one rank on the CPU here), a few steps via overrides, then a second launch that resumes
(with W&B in offline mode)."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import yaml

from lgdlm_ds.metrics import LINE_KEYS, LOG_NAME
from core_utils import CYCLE_VAE_METRICS, ROOT


def _smoke(*overrides: str, **env_vars: str) -> subprocess.CompletedProcess:
    # The test's interpreter is the environment (LGDLM_NO_VENV); its deepspeed goes on PATH.
    env = {**os.environ, "LGDLM_NO_VENV": "1", "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}",
           **env_vars}
    proc = subprocess.run(["bash", "launch/smoke.sh", *overrides], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=600)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-6000:]
    return proc


def test_smoke_run_end_to_end_and_resume(tmp_path):
    run = tmp_path / "smoke"
    common = (f"logging.run_dir={run}", "logging.log_every=2", "logging.save_every=3", "training.eval_every=3",
              "training.eval_batches=1")
    _smoke("training.num_train_steps=6", *common)

    lines = [json.loads(x) for x in (run / LOG_NAME).read_text().splitlines()]
    assert [line["step"] for line in lines] == [2, 3, 4, 6]  # every 2 steps, and at the evaluations
    for line in lines:
        assert set(LINE_KEYS + CYCLE_VAE_METRICS) <= set(line), sorted(set(LINE_KEYS + CYCLE_VAE_METRICS) - set(line))
        assert all(isinstance(line[k], (int, float)) and line[k] == line[k] for k in LINE_KEYS + CYCLE_VAE_METRICS)
        assert line["skipped_steps"] == 0 and line["samples_per_sec"] > 0 and line["tokens_per_sec"] > 0
    assert [line.get("eval_loss") is not None for line in lines] == [False, True, False, True]
    assert 0 < lines[0]["lr"] < lines[-1]["lr"]  # warming up

    cfg = yaml.safe_load((run / "config.yaml").read_text())
    assert cfg["training"]["num_train_steps"] == 6 and cfg["logging"]["run_dir"] == str(run)
    ds = json.loads((run / "ds_config.json").read_text())
    assert ds["zero_optimization"]["stage"] == 0 and ds["train_micro_batch_size_per_gpu"] == 8
    env = (run / "env.txt").read_text()
    assert "deepspeed: 0.19.8" in env and "world_size: 1" in env and "accelerator: " in env
    ckpt = run / "checkpoints"
    assert (ckpt / "latest").read_text() == "global_step6"
    assert sorted(p.name for p in ckpt.glob("global_step*")) == ["global_step3", "global_step6"]
    assert (ckpt / "global_step6" / "complete.json").is_file()

    # Same run directory: resumes at step 6; this time with W&B too (offline: no network here).
    _smoke("training.num_train_steps=8", "logging.wandb=true", *common, WANDB_MODE="offline")
    again = [json.loads(x) for x in (run / LOG_NAME).read_text().splitlines()]
    assert again[:4] == lines and [line["step"] for line in again[4:]] == [8]
    assert (ckpt / "latest").read_text() == "global_step8"
    assert (run / "env.txt").read_text().count("== start") == 2
    wandb_id = (run / "wandb_id.txt").read_text()
    assert [p.name.endswith(wandb_id) for p in (run / "wandb").glob("offline-run-*")] == [True]
