"""The log lines: cadence, skipped steps, resources; W&B's mode."""
import json
import math
import time

import torch

from lgdlm_ds.config import load_config
from lgdlm_ds.metrics import LINE_KEYS, LOG_NAME, MetricsLogger, wandb_mode
from core_utils import SMOKE
from engine_utils import OneRank


def test_log_lines_cadence_skip_lines_and_resources(tmp_path):
    cfg = load_config(SMOKE, ["logging.log_every=2", "logging.progress_bar=false", f"logging.run_dir={tmp_path}"])
    log = MetricsLogger(cfg, tmp_path, OneRank, torch.device("cpu"), global_batch=4, start_step=0, end=5)

    def slow_batches():
        while True:
            time.sleep(0.02)
            yield {"bad_samples": torch.tensor([0, 1])}  # one of its two samples replaced a bad one
    batches = log.timed(slow_batches())
    for step, loss, reason in ((1, 1.0, None), (2, 3.0, None), (3, 5.0, None), (4, math.nan, "loss"), (5, 2.0, None)):
        start = time.perf_counter()
        next(batches)
        log.step(step=step, epoch=0, lr=0.1, metrics={"loss": torch.tensor(loss)}, tokens=torch.tensor(10),
                 seconds=time.perf_counter() - start + 0.02, grad_norm=None if reason else 1.0,
                 skipped_steps=int(step >= 4), skip_reason=reason, evaluation={"eval_loss": 0.5} if step == 5 else {})
    log.close()
    lines = [json.loads(x) for x in (tmp_path / LOG_NAME).read_text().splitlines()]
    # every 2 steps; the skip at 4 after a line for step 3 alone; the last step with its evaluation
    assert [(x["step"], x["loss"], x.get("skip_reason"), x["skipped_steps"]) for x in lines] == [
        (2, 2.0, None, 0), (3, 5.0, None, 0), (4, None, "loss", 1), (5, 2.0, None, 1)]
    assert lines[-1]["eval_loss"] == 0.5 and "eval_loss" not in lines[0]
    assert [x["bad_samples"] for x in lines] == [2, 1, 1, 1]  # summed per line, the skipped step's apart
    for x in lines:
        assert set(LINE_KEYS) <= set(x)
        assert x["peak_memory_gib"] > 0 and 0.2 < x["data_loading_share"] < 1


def test_wandb_is_offline_without_a_login(monkeypatch, tmp_path):
    for var in ("WANDB_MODE", "WANDB_API_KEY", "WANDB_BASE_URL"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("NETRC", str(tmp_path / "netrc"))
    assert wandb_mode() == "offline"
    (tmp_path / "netrc").write_text("machine api.wandb.ai login user password secret\n")
    assert wandb_mode() == "online"
    monkeypatch.setenv("WANDB_MODE", "disabled")
    assert wandb_mode() == "disabled"
