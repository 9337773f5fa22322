"""Training metrics: the window of steps that one log line averages, the reduction over ranks, when a
line is written, and where it goes (``training_log.jsonl``, W&B, the rank-0 progress bar).

A line is written every ``logging.log_every`` steps, at the last step of a ``train()`` call and at
every evaluation (its ``eval_*`` values join that line). A skipped step gets a line of its own,
with ``skip_reason``, after a line for the steps before it: its non-finite values never mix into
the others' means.

Every line holds LINE_KEYS, then the objective's metrics averaged over steps and ranks. Two say where
time and memory go: ``peak_memory_gib``, the most memory any rank held since the previous line
(allocated device memory on CUDA; on the CPU the process's peak resident size, which only grows),
and ``data_loading_share``, the largest share of the window's wall time that a rank spent waiting
for the DataLoader's next batch (the other ranks wait for that one at the next collective).
``bad_samples`` is the number of bad samples the datasets passed over (``data.on_bad_sample: skip``)
to make the window's batches, summed over ranks.

Throughput counts real (non-padding) tokens only: ``tokens_per_sec`` over all ranks, and
``tflops``, the model FLOPs of every pass the objective ran (lgdlm_ds/flops.py) per second and per
device. ``mfu`` is that over the device's peak (``training.peak_tflops``, or the known peak of the
device and dtype); a line has no ``mfu`` where no peak is known (the CPU).

Only rank 0 writes, one ``write(2)`` per whole line to a file opened for appending, so a killed
run leaves whole lines (a line cut short anyway, by a machine going down mid-write, is cut off and
reported when the log is next opened). A resumed run adds to the log and never truncates it: the
steps after the checkpoint it resumed from, logged before the interruption, are logged again,
marked ``resumed_from`` (that checkpoint's step), and the later line for a step is the one the run
continued from. ``read_log`` gives the log as every reader should see it: the last line per step.
"""
from __future__ import annotations

import json
import math
import netrc
import os
import resource
import sys
import time
import uuid
from pathlib import Path
from typing import Iterator
from urllib.parse import urlparse

import torch
from tqdm import tqdm

from .config import Config, config_to_dict
from .fileio import write_atomic
from .flops import utilisation

LOG_NAME = "training_log.jsonl"
LINE_KEYS = ("step", "epoch", "loss", "lr", "grad_norm", "skipped_steps", "samples_per_sec", "tokens_per_sec",
             "tflops", "peak_memory_gib", "data_loading_share", "bad_samples")
"""Keys of every line; the objective's metrics (and eval_* at evaluation steps) come after them."""
_BAR_KEYS = {"loss": "loss", "base_l2t_text_loss": "l2t", "base_t2l_latent_loss": "t2l", "text_loss": "text",
             "latent_loss": "latent", "skipped_steps": "skipped"}


class LogError(ValueError):
    """A training log that cannot be read; the message names the file and the fix."""


def read_log(run_dir: Path) -> list[dict]:
    """The log's lines in step order, one per step: the last written for it, the line the run went
    on from (a resumed run logs its replayed steps again). Every summary of a run reads this."""
    path = run_dir / LOG_NAME
    if not path.is_file():
        raise LogError(f"{path} does not exist: {run_dir} is no run directory, or the run has not logged a step "
                       "yet (one line every logging.log_every steps).")
    by_step: dict[int, dict] = {}
    for n, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
            by_step[int(record["step"])] = record
        except (ValueError, KeyError, TypeError) as e:
            raise LogError(f"{path} line {n} is not a log record ({e}); remove or repair that line.") from e
    if not by_step:
        raise LogError(f"{path} is empty: the run has not logged a step yet.")
    return [by_step[s] for s in sorted(by_step)]


def _open_log(run_dir: Path) -> tuple[int, int]:
    """The log opened for appending, and the last step it holds (0: none). A last line without its
    newline was cut short mid-write: it is cut off, and reported, so that the next line starts on a
    line of its own (its step is after the last checkpoint, so the resumed run logs it again)."""
    path = run_dir / LOG_NAME
    fd = os.open(path, os.O_RDWR | os.O_APPEND | os.O_CREAT, 0o644)
    size = os.fstat(fd).st_size
    if not size:
        return fd, 0
    with open(path, "rb") as f:
        f.seek(max(0, size - (1 << 16)))
        tail = f.read()
    if not tail.endswith(b"\n"):
        keep = size - len(tail) + tail.rfind(b"\n") + 1
        print(f"[lgdlm] {path}: removing an incomplete last line ({size - keep} bytes) that an interrupted write "
              "left", file=sys.stderr, flush=True)
        os.ftruncate(fd, keep)
    return fd, read_log(run_dir)[-1]["step"] if os.fstat(fd).st_size else 0


def _append(fd: int, line: str) -> None:
    """One whole line: a single write(2), unless the kernel takes less (then the rest follows)."""
    data = (line + "\n").encode()
    while data:
        data = data[os.write(fd, data):]


def _json_value(v):
    """Non-finite numbers become null: NaN is not JSON, and a skipped step's loss often is NaN."""
    if isinstance(v, float) and not math.isfinite(v):
        return None
    return v


def wandb_mode() -> str:
    """WANDB_MODE if set; online when an API key or a netrc login for the W&B host exists; else offline."""
    if os.environ.get("WANDB_MODE"):
        return os.environ["WANDB_MODE"]
    if os.environ.get("WANDB_API_KEY"):
        return "online"
    host = urlparse(os.environ.get("WANDB_BASE_URL", "https://api.wandb.ai")).hostname
    try:
        return "online" if netrc.netrc(os.environ.get("NETRC")).authenticators(host) else "offline"
    except (FileNotFoundError, netrc.NetrcParseError):
        return "offline"


def peak_memory_gib(device: torch.device) -> float:
    """Peak memory since the previous call on CUDA (the counter is reset); the process's peak
    resident size elsewhere."""
    if device.type == "cuda":
        peak = torch.cuda.max_memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        return peak / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # Linux reports KiB


def mean_over_ranks(dist, sums: dict[str, torch.Tensor], counts: dict[str, int],
                    extra: torch.Tensor) -> tuple[dict[str, float], list[float]]:
    """Means of metric sums over ``counts[name]`` values per rank, and the totals of ``extra``'s
    entries, in one all-reduce. Collective: every rank passes the same keys."""
    names = sorted(sums)
    vec = torch.cat([torch.stack([sums[n].float() for n in names]), extra.float().reshape(-1)])
    dist.all_reduce(vec)
    values = vec.tolist()
    world = dist.get_world_size()
    return {n: v / (counts[n] * world) for n, v in zip(names, values)}, values[len(names):]


class _Window:
    """Sums of per-step metrics (tensors, no device sync) for one log line; the line is stamped with
    the step, epoch, learning rate and skip count of its last step."""

    def __init__(self) -> None:
        self.sums: dict[str, torch.Tensor] = {}
        self.counts: dict[str, int] = {}
        self.steps, self.seconds, self.data_seconds, self.tokens, self.grad_norms = 0, 0.0, 0.0, 0, []
        self.flops = 0
        self.bad_samples = 0
        self.step, self.epoch, self.lr, self.skipped_steps = 0, 0, 0.0, 0

    def add(self, step: int, epoch: int, lr: float, metrics: dict[str, torch.Tensor], tokens: torch.Tensor,
            flops: torch.Tensor, seconds: float, data_seconds: float, bad_samples: int, grad_norm: float | None,
            skipped_steps: int) -> None:
        for k, v in metrics.items():
            self.sums[k] = self.sums[k] + v if k in self.sums else v.clone()
            self.counts[k] = self.counts.get(k, 0) + 1
        self.tokens = self.tokens + tokens
        self.flops = self.flops + flops
        self.steps += 1
        self.seconds += seconds
        self.data_seconds += data_seconds
        self.bad_samples += bad_samples
        if grad_norm is not None:
            self.grad_norms.append(grad_norm)
        self.step, self.epoch, self.lr, self.skipped_steps = step, epoch, lr, skipped_steps


class MetricsLogger:
    """The log of one ``train()`` call, from ``start_step`` to ``end``. Every rank calls ``step``
    (the lines' reductions are collective); only rank 0 writes. ``resumed_from``: the step the run
    started from in this process (its checkpoint's; 0 for a fresh start), which marks the lines of
    steps the log already holds. ``peak_tflops``: one device's peak, which ``mfu`` is measured
    against (None: the lines have no ``mfu``)."""

    def __init__(self, cfg: Config, run_dir: Path, dist, device: torch.device, global_batch: int,
                 start_step: int, end: int, resumed_from: int = 0, peak_tflops: float | None = None):
        self.dist, self.device, self.global_batch = dist, device, global_batch
        self.peak_tflops = peak_tflops
        self.log_every, self.end = cfg.logging.log_every, end
        self.window, self.data_seconds, self.bad_samples = _Window(), 0.0, 0
        self.active = dist.get_rank() == 0
        if not self.active:
            return
        self.resumed_from = resumed_from
        self.file, self.logged_until = _open_log(run_dir)
        self.bar = tqdm(total=cfg.training.num_train_steps, initial=start_step, desc="train", dynamic_ncols=True,
                        disable=not cfg.logging.progress_bar)
        self.wandb = self._init_wandb(cfg, run_dir) if cfg.logging.wandb else None

    @staticmethod
    def _init_wandb(cfg: Config, run_dir: Path):
        import wandb
        id_file = run_dir / "wandb_id.txt"  # the same W&B run across resumes
        if not id_file.is_file():
            write_atomic(id_file, uuid.uuid4().hex[:12])
        return wandb.init(project=cfg.logging.wandb_project, name=cfg.logging.wandb_run_name or run_dir.name,
                          id=id_file.read_text().strip(), resume="allow", dir=str(run_dir),
                          mode=wandb_mode(), config=config_to_dict(cfg))

    def timed(self, batches: Iterator[dict]) -> Iterator[dict]:
        """``batches``, with the time spent waiting for each counted toward data_loading_share, and
        their bad samples (the count the DataLoader workers send along, taken off the batch) toward
        bad_samples."""
        while True:
            start = time.perf_counter()
            batch = next(batches)
            self.data_seconds += time.perf_counter() - start
            self.bad_samples += int(batch.pop("bad_samples").sum())
            yield batch

    def step(self, *, step: int, epoch: int, lr: float, metrics: dict[str, torch.Tensor], tokens: torch.Tensor,
             flops: torch.Tensor, seconds: float, grad_norm: float | None, skipped_steps: int,
             skip_reason: str | None, evaluation: dict[str, float]) -> None:
        """One optimizer step (``step`` counts from 1, ``seconds`` is its wall time; ``tokens`` and
        ``flops``: this rank's real tokens and model FLOPs); writes the lines it is due."""
        if self.active:
            self.bar.update(1)
        if skip_reason is not None and self.window.steps:
            self._write({})
        self.window.add(step, epoch, lr, metrics, tokens, flops, seconds, self.data_seconds, self.bad_samples,
                        grad_norm, skipped_steps)
        self.data_seconds, self.bad_samples = 0.0, 0
        if skip_reason is not None:
            self._write({"skip_reason": skip_reason, **evaluation})
        elif step % self.log_every == 0 or step == self.end or evaluation:
            self._write(evaluation)

    def _write(self, extra: dict) -> None:
        """Reduce the window over ranks, write it as one line with ``extra``, start a new window."""
        w, self.window = self.window, _Window()
        totals = torch.stack([torch.as_tensor(v, dtype=torch.float64, device=self.device)
                              for v in (w.tokens, w.bad_samples, w.flops)])
        metrics, (tokens, bad_samples, flops) = mean_over_ranks(self.dist, w.sums, w.counts, totals)
        seconds = max(w.seconds, 1e-9)
        tflops, mfu = utilisation(flops, seconds, self.dist.get_world_size(), self.peak_tflops)
        worst = torch.tensor([peak_memory_gib(self.device), w.data_seconds / seconds], dtype=torch.float64,
                             device=self.device)
        self.dist.all_reduce(worst, op=self.dist.ReduceOp.MAX)
        peak, data_share = worst.tolist()
        norms = w.grad_norms
        record = {"step": w.step, "epoch": w.epoch, "loss": metrics.pop("loss"), "lr": w.lr,
                  "grad_norm": sum(norms) / len(norms) if norms else None, "skipped_steps": w.skipped_steps,
                  "samples_per_sec": w.steps * self.global_batch / seconds, "tokens_per_sec": tokens / seconds,
                  "tflops": tflops, **({"mfu": mfu} if mfu is not None else {}), "peak_memory_gib": peak,
                  "data_loading_share": data_share, "bad_samples": int(bad_samples),
                  **metrics, **extra}
        if not self.active:
            return
        if record["step"] <= self.logged_until:
            record["resumed_from"] = self.resumed_from
        _append(self.file, json.dumps({k: _json_value(v) for k, v in record.items()}))
        if self.wandb is not None:
            self.wandb.log({k: v for k, v in record.items() if k != "step"}, step=record["step"])
        self.bar.set_postfix({short: f"{record[k]:.4g}" if isinstance(record[k], float) else record[k]
                              for k, short in _BAR_KEYS.items() if record.get(k) is not None}, refresh=False)

    def close(self) -> None:
        if self.active:
            self.bar.close()
            os.close(self.file)
            if self.wandb is not None:
                self.wandb.finish()
