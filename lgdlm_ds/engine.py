"""The training engine: DeepSpeed around ``TrainStep``, the step loop, the skip policy, evaluation,
checkpoints and logging. ``Trainer(cfg, preflight(cfg)).train()``; train.py is the command line.

One optimizer step = ``gradient_accumulation_steps`` micro-batches per rank. Each micro-batch is
one DeepSpeed micro-step: ``engine(batch, step)``, one ``engine.backward(loss)``, ``engine.step()``
(DeepSpeed applies the update on the last). With ``loss.cycle_stagewise`` it is two: stage 1 and
stage 2 of cycle_vae, each with its own backward and ``engine.step()``, and DeepSpeed counts twice
the accumulation steps. Never two backwards without an ``engine.step()`` between them: DeepSpeed
0.19.8 ZeRO-2 then silently keeps only the last one's gradients.

Noise: before every micro-step the torch generator is seeded from (seed, step, slot) (slots: see
batching.py). A step's noise then depends neither on the number of ranks nor on what ran before, so
a resumed run draws exactly what the uninterrupted one drew.

Skip policy (a step that would corrupt the weights is dropped by every rank together):
- the loss is non-finite on any rank: the ranks all-reduce a flag before the update;
- the gradient norm is non-finite: with ZeRO or bf16, DeepSpeed computes the global norm and refuses
  the step itself (bf16 JSONs must say ``check_grad_overflow: true``); with plain fp32 ZeRO-0 the
  engine computes the norm of the already all-reduced gradients, identical on every rank.
A skipped step consumes its data and its step number, leaves parameters, optimizer state and the
learning-rate schedule untouched, is logged on its own line with ``skip_reason``, and counts in
``skipped_steps``; more than ``training.max_consecutive_skips`` in a row raise ``TrainingError``.
"""
from __future__ import annotations

import hashlib
import random
import time
from pathlib import Path
from typing import Callable, Iterator

import numpy as np
import torch
from torch.utils.data import DataLoader, default_collate

from . import checkpoint
from .batching import DataPosition, StepBatches, eval_batches
from .config import Config, ConfigError
from .data import build_dataset
from .ds_config import load_ds_config, offloads_optimizer, stages_per_batch
from .model import build_model
from .objectives import TrainStep
from .optim import StepGate, WarmupCosine, apply_hyperparameters, build_optimizer
from .run_log import RunLog, write_run_files


# Our part of DeepSpeed's client_state, under one key: DeepSpeed's own keys (skipped_steps,
# global_steps, ...) live in the same dictionary and would silently overwrite or be overwritten.
CLIENT_KEY = "lgdlm"


class TrainingError(RuntimeError):
    """Training cannot go on; the message names the step and the checkpoint to go back to."""


def noise_seed(seed: int, kind: str, index: int, slot: int) -> int:
    digest = hashlib.blake2b(f"{seed}:{kind}:{index}:{slot}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 1


def preflight(cfg: Config) -> dict:
    """Everything checkable before DeepSpeed starts: the JSON, the run directory, the resume target.
    Returns the DeepSpeed config to use. Raises ConfigError or checkpoint.CheckpointError."""
    ds = load_ds_config(cfg)
    if not cfg.logging.run_dir:
        raise ConfigError("config key 'logging.run_dir': must name the run directory.")
    run_dir = Path(cfg.logging.run_dir)
    if run_dir.exists() and not run_dir.is_dir():
        raise ConfigError(f"config key 'logging.run_dir': '{run_dir}' exists and is not a directory.")
    checkpoint.find_resume(cfg.training.resume, run_dir / "checkpoints")
    return ds


class _Window:
    """Sums of per-step metrics (tensors, no device sync) for one log line; the line is stamped with
    the step, epoch and learning rate of its last step."""

    def __init__(self) -> None:
        self.sums: dict[str, torch.Tensor] = {}
        self.counts: dict[str, int] = {}
        self.steps, self.seconds, self.tokens, self.grad_norms = 0, 0.0, 0, []
        self.step, self.epoch, self.lr = 0, 0, 0.0

    def add(self, step: int, epoch: int, lr: float, metrics: dict[str, torch.Tensor], tokens: torch.Tensor,
            seconds: float, grad_norm: float | None) -> None:
        for k, v in metrics.items():
            self.sums[k] = self.sums[k] + v if k in self.sums else v.clone()
            self.counts[k] = self.counts.get(k, 0) + 1
        self.tokens = self.tokens + tokens
        self.steps += 1
        self.seconds += seconds
        if grad_norm is not None:
            self.grad_norms.append(grad_norm)
        self.step, self.epoch, self.lr = step, epoch, lr


class Trainer:
    """One training run. ``poison(step, rank) -> bool`` is a fault-injection hook for tests: when
    it returns True, that rank's loss of that (0-based) step is multiplied by NaN."""

    def __init__(self, cfg: Config, ds_config: dict, *,
                 poison: Callable[[int, int], bool] | None = None):
        import deepspeed
        from deepspeed import comm as dist
        from deepspeed.accelerator import get_accelerator
        from deepspeed.checkpoint.constants import (UNIVERSAL_CHECKPOINT_VERSION_KEY,
                                                    UNIVERSAL_CHECKPOINT_VERSION_VALUE)
        self.dist, self.poison = dist, poison
        self.universal_info = {UNIVERSAL_CHECKPOINT_VERSION_KEY: UNIVERSAL_CHECKPOINT_VERSION_VALUE}
        self.cfg, tr = cfg, cfg.training
        deepspeed.init_distributed()
        self.rank, self.world = dist.get_rank(), dist.get_world_size()
        self.run_dir = Path(cfg.logging.run_dir)
        self.ckpt_dir = self.run_dir / "checkpoints"
        self.ckpt_dir.mkdir(parents=True, exist_ok=True)

        # The same seed on every rank gives the same initial model everywhere.
        torch.manual_seed(tr.seed)
        random.seed(tr.seed)
        np.random.seed(tr.seed)
        # Rank 0 first: a packed dataset is prepared on first use, and only once.
        if self.rank != 0:
            dist.barrier()
        self.train_set = build_dataset(cfg, "train")
        self.val_set = build_dataset(cfg, "validation") if tr.eval_every else None
        if self.rank == 0:
            dist.barrier()
        self.global_batch = self.world * tr.gradient_accumulation_steps * tr.micro_batch_size
        self.eval_index = (eval_batches(len(self.val_set), self.world, self.rank, tr.micro_batch_size,
                                        tr.eval_batches) if self.val_set is not None else [])
        step_module = TrainStep(build_model(cfg.model), cfg)
        optimizer = build_optimizer(step_module, tr, offloads_optimizer(ds_config))
        self.gate = StepGate()
        self.gate.attach(optimizer)
        self.engine, *_ = deepspeed.initialize(
            model=step_module, optimizer=optimizer, config=ds_config,
            lr_scheduler=lambda opt: WarmupCosine(opt, tr.warmup_steps, tr.num_train_steps, tr.min_lr_ratio))
        # Plain fp32 ZeRO-0: DeepSpeed wraps nothing around the optimizer, so nobody else computes
        # or checks the gradient norm.
        self.own_grad_norm = self.engine.optimizer is optimizer
        self.stages = (1, 2) if stages_per_batch(cfg) == 2 else (None,)
        self.device = self.engine.device

        self.step, self.skipped, self.consumed, self.position = 0, 0, 0, DataPosition()
        self.last_checkpoint: Path | None = None
        target = checkpoint.find_resume(tr.resume, self.ckpt_dir)
        if target is not None:
            self._load(*target)
        if self.rank == 0:
            write_run_files(cfg, ds_config, self.run_dir, self.world, get_accelerator().device_name())

    # ---- checkpoints

    def _load(self, folder: Path, tag: str) -> None:
        from deepspeed.runtime.zero.utils import ZeRORuntimeException
        try:
            path, state = self.engine.load_checkpoint(str(folder), tag=tag, load_lr_scheduler_states=False)
        except ZeRORuntimeException as e:  # ZeRO shards fit only the world size that wrote them
            raise checkpoint.CheckpointError(f"{folder / tag}: {e} Convert it to a universal checkpoint "
                                             "(ds_configs/README.md, 'Resuming on a different number of "
                                             "GPUs').") from e
        if path is None:
            raise checkpoint.CheckpointError(f"DeepSpeed could not load {folder / tag}.")
        ours = state[CLIENT_KEY]
        self.step, self.skipped = ours["step"], ours["skipped_steps"]
        self.consumed, self.position = ours["consumed_samples"], DataPosition(**ours["data_position"])
        checkpoint.set_rng_state(ours["rng"])
        self.engine.lr_scheduler.seek(self.step - self.skipped)
        apply_hyperparameters(self.engine.basic_optimizer, self.cfg.training)
        self.last_checkpoint = folder / tag

    def save(self) -> Path:
        ours = {"step": self.step, "skipped_steps": self.skipped, "consumed_samples": self.consumed,
                "data_position": self.position.to_dict(), "rng": checkpoint.rng_state()}
        # iteration and universal_checkpoint_info: what ds_to_universal needs from a non-Megatron client
        state = {CLIENT_KEY: ours, "iteration": self.step, "universal_checkpoint_info": self.universal_info}
        self.last_checkpoint = checkpoint.save(self.engine, self.ckpt_dir, self.step, state,
                                               self.cfg.training.keep_last, self.rank == 0, self.dist.barrier)
        return self.last_checkpoint

    # ---- one step

    def _to_device(self, batch: dict) -> dict:
        return {k: v.to(self.device, non_blocking=True) for k, v in batch.items()}

    def _micro_steps(self, batches: Iterator[dict], k: int):
        """Forward + backward of every micro-batch of step k; DeepSpeed's step on all but the last.
        Returns (metrics averaged over micro-batches, real tokens, non-finite-loss flag)."""
        accumulation = self.cfg.training.gradient_accumulation_steps
        sums: dict[str, torch.Tensor] = {}
        tokens = torch.zeros((), dtype=torch.long, device=self.device)
        bad_loss = torch.zeros((), dtype=torch.bool, device=self.device)
        for m in range(accumulation):
            batch = self._to_device(next(batches))
            torch.manual_seed(noise_seed(self.cfg.training.seed, "train", k, m * self.world + self.rank))
            for i, stage in enumerate(self.stages):
                loss, metrics = self.engine(batch, k) if stage is None else self.engine(batch, k, stage=stage)
                if self.poison is not None and self.poison(k, self.rank):
                    loss = loss * float("nan")
                # DeepSpeed divides every backward by its accumulation count, accumulation x stages;
                # the stages of one micro-batch add up to its loss, so each is scaled back up.
                self.engine.backward(loss * len(self.stages))
                if m < accumulation - 1 or i < len(self.stages) - 1:
                    self.engine.step()
                # Stage metrics are disjoint except the loss and nonfinite_terms, which add up.
                for name, v in {"loss": loss.detach().float(), **metrics}.items():
                    sums[name] = sums[name] + v if name in sums else v
                bad_loss |= ~torch.isfinite(loss.detach())
            tokens += batch["attention_mask"].sum()
        return {n: v / accumulation for n, v in sums.items()}, tokens, bad_loss

    def _skip_reason(self, bad_loss: torch.Tensor) -> tuple[str | None, float | None]:
        """Collective decision before the update; returns (reason or None, own grad norm or None)."""
        norm = None
        bad_norm = torch.zeros((), device=self.device)
        if self.own_grad_norm:
            grads = [p.grad for p in self.engine.module.parameters() if p.grad is not None]
            norm = torch.nn.utils.get_total_norm(grads)
            bad_norm = (~torch.isfinite(norm)).float()
        flags = torch.stack([bad_loss.float(), bad_norm])
        self.dist.all_reduce(flags, op=self.dist.ReduceOp.MAX)
        bad_loss_any, bad_norm_any = flags.tolist()
        reason = "loss" if bad_loss_any else "grad_norm" if bad_norm_any else None
        return reason, None if norm is None else float(norm)

    # ---- reductions and evaluation

    def _mean_over_ranks(self, sums: dict[str, torch.Tensor], counts: dict[str, int], extra: torch.Tensor):
        """All-reduce metric sums (and one extra total) in one call; same keys on every rank."""
        names = sorted(sums)
        vec = torch.stack([sums[n].float() for n in names] + [extra.float()])
        self.dist.all_reduce(vec)
        values = vec.tolist()
        return {n: v / (counts[n] * self.world) for n, v in zip(names, values)}, values[-1]

    @torch.no_grad()
    def evaluate(self, k: int) -> dict[str, float]:
        """The objective at step k on the validation split, averaged over batches and ranks."""
        self.engine.eval()
        sums: dict[str, torch.Tensor] = {}
        for e, idx in enumerate(self.eval_index):
            batch = self._to_device(default_collate([self.val_set[i] for i in idx]))
            torch.manual_seed(noise_seed(self.cfg.training.seed, "eval", e, self.rank))
            loss, metrics = self.engine(batch, k)
            for name, v in {"loss": loss.float(), **metrics}.items():
                sums[name] = sums[name] + v if name in sums else v
        self.engine.train()
        means, _ = self._mean_over_ranks(sums, {n: len(self.eval_index) for n in sums},
                                         torch.zeros((), device=self.device))
        return {f"eval_{n}": v for n, v in means.items()}

    def _record(self, window: _Window, extra: dict) -> dict:
        metrics, tokens = self._mean_over_ranks(window.sums, window.counts, window.tokens)
        seconds = max(window.seconds, 1e-9)
        norms = window.grad_norms
        return {"step": window.step, "epoch": window.epoch, "loss": metrics.pop("loss"), "lr": window.lr,
                "grad_norm": sum(norms) / len(norms) if norms else None, "skipped_steps": self.skipped,
                "samples_per_sec": window.steps * self.global_batch / seconds, "tokens_per_sec": tokens / seconds,
                **metrics, **extra}

    # ---- the loop

    def train(self, until_step: int | None = None) -> dict:
        """Train to training.num_train_steps (or stop after ``until_step``, saving a checkpoint, as a
        job that reaches its time limit would). Returns a summary."""
        tr, lg = self.cfg.training, self.cfg.logging
        end = tr.num_train_steps if until_step is None else min(until_step, tr.num_train_steps)
        sampler = StepBatches(len(self.train_set), tr.seed, self.world, self.rank, tr.gradient_accumulation_steps,
                              tr.micro_batch_size, self.position)
        loader = DataLoader(self.train_set, batch_sampler=sampler, num_workers=tr.num_workers,
                            pin_memory=torch.cuda.is_available())
        batches = iter(loader)
        log = RunLog(self.cfg, self.run_dir, self.rank, tr.num_train_steps, self.step)
        window, consecutive = _Window(), 0
        self.engine.train()
        try:
            while self.step < end:
                t0 = time.perf_counter()
                k, epoch = self.step, self.position.epoch
                metrics, tokens, bad_loss = self._micro_steps(batches, k)
                lr = self.engine.lr_scheduler.get_last_lr()[0]
                reason, grad_norm = self._skip_reason(bad_loss)
                self.gate.open = reason is None
                self.engine.step(lr_kwargs={"skip": reason is not None})
                self.gate.open = True
                if reason is None and not self.engine.was_step_applied():
                    reason = "grad_norm"  # DeepSpeed refused it: its global norm was not finite
                if grad_norm is None and self.engine.get_global_grad_norm() is not None:
                    grad_norm = float(self.engine.get_global_grad_norm())
                seconds = time.perf_counter() - t0
                self.step, self.consumed = k + 1, self.consumed + self.global_batch
                self.position = self.position.advance(self.global_batch, len(self.train_set))
                log.advance()

                evaluation = self.evaluate(k) if tr.eval_every and (
                    self.step % tr.eval_every == 0 or self.step == end) else {}
                if reason is None:
                    consecutive = 0
                    window.add(self.step, epoch, lr, metrics, tokens, seconds, grad_norm)
                    if self.step % lg.log_every == 0 or self.step == end or evaluation:
                        log.write(self._record(window, evaluation))
                        window = _Window()
                else:
                    # A skipped step gets a line of its own, after one for the steps before it.
                    if window.steps:
                        log.write(self._record(window, {}))
                        window = _Window()
                    self.skipped, consecutive = self.skipped + 1, consecutive + 1
                    alone = _Window()
                    alone.add(self.step, epoch, lr, metrics, tokens, seconds, grad_norm)
                    log.write(self._record(alone, {"skip_reason": reason, **evaluation}))
                    if consecutive > tr.max_consecutive_skips:
                        raise TrainingError(self._too_many_skips(consecutive, reason))
                if (lg.save_every and self.step % lg.save_every == 0) or self.step == end:
                    self.save()
        finally:
            log.close()
        return {"step": self.step, "skipped_steps": self.skipped, "last_checkpoint": self.last_checkpoint}

    def _too_many_skips(self, consecutive: int, reason: str) -> str:
        back = (f"the last good checkpoint is {self.last_checkpoint} (resume from it with "
                f"training.resume={self.last_checkpoint}, e.g. with a lower training.lr)"
                if self.last_checkpoint else "no checkpoint was saved yet")
        return (f"step {self.step}: {consecutive} consecutive steps skipped (last reason: non-finite {reason}), more "
                f"than training.max_consecutive_skips={self.cfg.training.max_consecutive_skips}; the parameters "
                f"are those after step {self.step - consecutive}; {back}.")
