"""The log lines: cadence, skipped steps, resources, a resumed run's replayed steps; W&B's mode."""
import json
import math
import time

import torch

from lgdlm_ds.config import load_config
from lgdlm_ds.metrics import LINE_KEYS, LOG_NAME, MetricsLogger, read_log, wandb_mode
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
                 flops=torch.tensor(1e6), seconds=time.perf_counter() - start + 0.02, grad_norm=None if reason else 1.0,
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


def _log_steps(log: MetricsLogger, steps, loss: float) -> None:
    batches = log.timed(iter(lambda: {"bad_samples": torch.tensor([0])}, None))
    for step in steps:
        next(batches)
        log.step(step=step, epoch=0, lr=0.1, metrics={"loss": torch.tensor(loss)}, tokens=torch.tensor(10),
                 flops=torch.tensor(1e6), seconds=0.01, grad_norm=1.0, skipped_steps=0, skip_reason=None, evaluation={})
    log.close()


def test_a_resumed_run_marks_replayed_steps_and_readers_keep_the_last_line(tmp_path, capsys):
    """Steps 1-5 logged, the run killed in the middle of writing line 6, resumed from step 2's
    checkpoint: the cut line is removed (and reported), every whole line stays, steps 3-5 are
    logged again with resumed_from, and read_log sees each step once, the later line."""
    cfg = load_config(SMOKE, ["logging.log_every=1", "logging.progress_bar=false", f"logging.run_dir={tmp_path}"])
    _log_steps(MetricsLogger(cfg, tmp_path, OneRank, torch.device("cpu"), 4, start_step=0, end=5), range(1, 6), 1.0)
    path = tmp_path / LOG_NAME
    whole = path.read_text()
    with open(path, "a") as f:
        f.write('{"step": 6, "epoch": 0, "lo')
    _log_steps(MetricsLogger(cfg, tmp_path, OneRank, torch.device("cpu"), 4, start_step=2, end=7, resumed_from=2),
               range(3, 8), 2.0)
    assert f"{path}: removing an incomplete last line (27 bytes)" in capsys.readouterr().err
    text = path.read_text()
    assert text.startswith(whole) and text.endswith("\n")
    lines = [json.loads(x) for x in text.splitlines()]
    assert [(x["step"], x["loss"], x.get("resumed_from")) for x in lines] == [
        (1, 1.0, None), (2, 1.0, None), (3, 1.0, None), (4, 1.0, None), (5, 1.0, None),
        (3, 2.0, 2), (4, 2.0, 2), (5, 2.0, 2), (6, 2.0, None), (7, 2.0, None)]
    trajectory = [(x["step"], x["loss"]) for x in read_log(tmp_path)]
    assert trajectory == [(1, 1.0), (2, 1.0), *((s, 2.0) for s in range(3, 8))]
