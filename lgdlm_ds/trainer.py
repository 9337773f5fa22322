"""The trainer: DeepSpeed around ``TrainStep`` and the step loop. ``Trainer(cfg, preflight(cfg)).train()``;
train.py is the command line.

Each step follows the data path: this rank's micro-batches -> forward and backward of each ->
the skip decision and DeepSpeed's step (skip_policy.py) -> the log (metrics.py) -> validation when
due (validate.py) -> a checkpoint when due (checkpoint.Checkpointer), or when a signal asked the run
to stop (preemption.py), which then ends after that step.

One optimizer step = ``gradient_accumulation_steps`` micro-batches per rank. Each micro-batch is
one DeepSpeed micro-step: ``engine(batch, step)``, one ``engine.backward(loss)``, ``engine.step()``
(DeepSpeed applies the update on the last). With ``loss.cycle_stagewise`` it is two: stage 1 and
stage 2 of cycle_vae, each with its own backward and ``engine.step()``, and DeepSpeed counts twice
the accumulation steps. Never two backwards without an ``engine.step()`` between them: DeepSpeed
0.19.8 ZeRO-2 then silently keeps only the last one's gradients.

Noise: before every micro-step the torch generator is seeded from (seed, step, slot) (slots: see
batching.py). A step's noise then depends neither on the number of ranks nor on what ran before, so
a resumed run draws exactly what the uninterrupted one drew.
"""
from __future__ import annotations

import os
import sys
import time
from pathlib import Path
from typing import Callable, Iterator

import torch
from torch.utils.data import DataLoader

from . import checkpoint, crash_points, shm_names, token_init, universal, warm_start
from .batching import StepBatches, check_global_batch, global_slots, to_device
from .config import Config, ConfigError
from .data import METADATA_FILE, build_dataset, check_metadata, read_metadata
from .ds_config import load_ds_config, offloads_optimizer
from .fileio import write_atomic
from .flops import StepFlops, peak_tflops
from .metrics import MetricsLogger
from .model import LGDLM, build_model
from .objectives import TrainStep
from .optim import WarmupCosine, build_optimizer
from .preemption import StopSignal
from .run_directory import check_run_directory
from .run_files import write_run_files
from .seeding import derive_seed, seed_everything
from .skip_policy import SkipPolicy
from .validate import Validator


class TrainingError(RuntimeError):
    """Training cannot go on; the message names the step and the checkpoint to go back to."""


def preflight(cfg: Config) -> dict:
    """Everything checkable before DeepSpeed starts, reading only: the JSON, a prepared dataset's
    metadata against the recipe, the run directory, the resume target, the warm-start source.
    Returns the DeepSpeed config to use. Raises ConfigError, DataError or checkpoint.CheckpointError."""
    ds = load_ds_config(cfg)
    if not cfg.logging.run_dir:
        raise ConfigError("config key 'logging.run_dir': must name the run directory.")
    _check_data(cfg)
    run_dir = Path(cfg.logging.run_dir)
    resume = checkpoint.find_resume(cfg.training.resume, run_dir / "checkpoints")
    if resume is None and cfg.model.token_embedding_init:
        token_init.check(cfg.model.token_embedding_init, cfg.model.vocab_size, cfg.model.hidden_size)
    check_run_directory(cfg, resuming=resume is not None)
    crash_points.target()  # a malformed test hook fails here too
    if resume is None and cfg.model.init_from and not Path(cfg.model.init_from).exists():
        raise ConfigError(f"config key 'model.init_from': '{cfg.model.init_from}' does not exist. Set it to a "
                          "weights file, a directory written by lgdlm_ds.export or a run directory, or leave it "
                          "empty to start from random weights.")
    return ds


def _check_data(cfg: Config) -> None:
    """What can be checked of the data without building it: a prepared dataset's metadata against
    the recipe, and a training split of at least one global batch on the ranks known now
    (WORLD_SIZE under a launcher, else one; the trainer checks again on every rank)."""
    data, tr = cfg.data, cfg.training
    size = data.num_samples if data.kind == "synthetic" else None
    if data.kind == "packed" and (Path(data.path).expanduser() / METADATA_FILE).is_file():
        meta = read_metadata(data.path)
        check_metadata(meta, cfg, data.path)
        size = meta["splits"]["train"]["num_samples"]
    if size is not None:
        check_global_batch(size, int(os.environ.get("WORLD_SIZE", "1")), tr.gradient_accumulation_steps,
                           tr.micro_batch_size)


class Trainer:
    """One training run. ``stop``: the signals that stop it after a step with a checkpoint (none
    unless given; lgdlm_ds.train gives SIGUSR1 and SIGTERM). ``poison(step, rank) -> bool`` is a
    fault-injection hook for tests: when it returns True, that rank's loss of that (0-based) step is
    multiplied by NaN."""

    def __init__(self, cfg: Config, ds_config: dict, *, stop: StopSignal | None = None,
                 poison: Callable[[int, int], bool] | None = None):
        import deepspeed
        from deepspeed import comm as dist
        from deepspeed.accelerator import get_accelerator
        self.dist, self.poison = dist, poison
        self.stop = stop or StopSignal(())
        self.cfg, tr = cfg, cfg.training
        deepspeed.init_distributed()
        shm_names.release(dist)
        self.rank, self.world = dist.get_rank(), dist.get_world_size()
        self.run_dir = Path(cfg.logging.run_dir)

        seed_everything(tr.seed)  # the same initial model on every rank
        # Before the datasets: a per-sample dataset keeps its file index in the run directory.
        self.run_dir.mkdir(parents=True, exist_ok=True)
        # Rank 0 first: a packed dataset is prepared on first use, and only once; and what a crash
        # left in the checkpoints folder is removed before any rank looks there for one to resume.
        if self.rank != 0:
            dist.barrier()
        else:
            checkpoint.remove_partial(self.run_dir / "checkpoints")
        self.train_set = build_dataset(cfg, "train")
        val_set = build_dataset(cfg, "validation") if tr.eval_every else None
        if self.rank == 0:
            dist.barrier()
        self.global_batch = self.world * tr.gradient_accumulation_steps * tr.micro_batch_size
        check_global_batch(len(self.train_set), self.world, tr.gradient_accumulation_steps, tr.micro_batch_size)
        self.validator = Validator(cfg, val_set, dist)
        step_module = TrainStep(self._initial_model(ds_config), cfg)
        optimizer = build_optimizer(step_module, tr, offloads_optimizer(ds_config))
        # The skip policy gates the optimizer itself: DeepSpeed's wrappers call its step.
        self.skips = SkipPolicy(optimizer, tr.max_consecutive_skips, dist)
        # Before the engine: a checkpoint saved by another number of ranks loads only as a universal
        # one, and only when the config says so at initialisation (universal.py).
        resume_from = universal.resume_source(tr.resume, self.run_dir / "checkpoints", self.world, self.rank,
                                              dist.barrier)
        ds_config = resume_from.ds_config(ds_config) if resume_from else ds_config
        self.engine, *_ = deepspeed.initialize(
            model=step_module, optimizer=optimizer, config=ds_config,
            lr_scheduler=lambda opt: WarmupCosine(opt, tr.warmup_steps, tr.num_train_steps, tr.min_lr_ratio))
        self.stages = step_module.plan.micro_step_stages
        self.step_flops = StepFlops(cfg)
        self.device = self.engine.device
        self.checkpointer = checkpoint.Checkpointer(self.engine, cfg, dist)
        self.progress = self.checkpointer.resume(resume_from)
        self.started_at = self.progress.step  # where the log's replayed steps resumed from
        if self.rank == 0:
            write_run_files(cfg, ds_config, self.run_dir, self.world, get_accelerator().device_name())

    def _initial_model(self, ds_config: dict) -> LGDLM:
        """The model before DeepSpeed takes it. A fresh run starts from model.init_from's weights
        when it is set (the report goes to the log and to init_report.json); a resumed run loads its
        checkpoint's weights next and never applies model.init_from again. Under ZeRO-3 it is built,
        and warm-started, partitioned over the ranks (partitioned.py): no rank holds the whole model,
        and the weights are those of a whole build. model.token_embedding_init likewise applies to a
        fresh run only (token_init.py)."""
        model_cfg = self.cfg.model
        model = build_model(model_cfg, warm_start=False, ds_config=ds_config)
        if not (model_cfg.init_from or model_cfg.token_embedding_init):
            return model
        target = checkpoint.find_resume(self.cfg.training.resume, self.run_dir / "checkpoints")
        if target is not None:
            if self.rank == 0 and model_cfg.init_from:
                warm_start.log(f"not applied: resuming from {target[0] / target[1]}, whose weights the run continues.")
            return model
        if model_cfg.token_embedding_init:
            token_init.apply_token_init(model, model_cfg.token_embedding_init)
            if self.rank == 0:
                print(f"[lgdlm] fresh start: token embedding and text head from the word embeddings of "
                      f"{model_cfg.token_embedding_init} (model.token_embedding_init)", file=sys.stderr, flush=True)
            return model
        report = warm_start.apply_init_from(model, model_cfg)  # every rank: the same weights everywhere
        if self.rank == 0:
            write_atomic(self.run_dir / warm_start.REPORT_FILE, report.to_json())
            warm_start.log(f"fresh start: {report.summary()} Report: {self.run_dir / warm_start.REPORT_FILE}")
        return model

    def train(self, until_step: int | None = None) -> dict:
        """Train to training.num_train_steps (or stop after ``until_step``, saving a checkpoint, as a
        job that reaches its time limit would). Returns a summary; ``stopped_on_signal``: a stop
        signal ended it early, after saving."""
        total = self.cfg.training.num_train_steps
        end = total if until_step is None else min(until_step, total)
        peak = peak_tflops(self.cfg.training.peak_tflops, self.device,
                           torch.bfloat16 if self.engine.bfloat16_enabled() else torch.float32)
        log = MetricsLogger(self.cfg, self.run_dir, self.dist, self.device, self.global_batch, self.progress.step, end,
                            resumed_from=self.started_at, peak_tflops=peak)
        batches = log.timed(iter(self._loader()))
        self.engine.train()
        stop = False
        try:
            while self.progress.step < end and not stop:
                k, epoch, start = self.progress.step, self.progress.data_position.epoch, time.perf_counter()
                metrics, tokens, flops, bad_loss = self._micro_steps(batches, k)
                crash_points.reached("after_backward", k + 1)
                lr = self.engine.lr_scheduler.get_last_lr()[0]
                reason, grad_norm, stop = self.skips.step(self.engine, bad_loss, self.stop.requested(k + 1))
                seconds = time.perf_counter() - start
                self.progress = self.progress.after_step(self.global_batch, len(self.train_set),
                                                         skipped=reason is not None)
                step = self.progress.step
                evaluation = self.validator.run(self.engine, k) if self.validator.due(step, end) else {}
                log.step(step=step, epoch=epoch, lr=lr, metrics=metrics, tokens=tokens, flops=flops,
                         seconds=seconds, grad_norm=grad_norm, skipped_steps=self.progress.skipped_steps,
                         skip_reason=reason, evaluation=evaluation)
                crash_points.reached("after_log", step)
                if (error := self.skips.streak_error(step, self.checkpointer.last)) is not None:
                    raise TrainingError(error)
                if self.checkpointer.due(step, end) or stop:
                    self.checkpointer.save(self.progress)
        finally:
            log.close()
        return {"step": self.progress.step, "skipped_steps": self.progress.skipped_steps,
                "last_checkpoint": self.checkpointer.last, "stopped_on_signal": stop and self.progress.step < end}

    def _loader(self) -> DataLoader:
        """This rank's micro-batches from the current data position on."""
        tr, buckets = self.cfg.training, self.cfg.data.length_buckets
        sampler = StepBatches(len(self.train_set), tr.seed, self.world, self.rank, tr.gradient_accumulation_steps,
                              tr.micro_batch_size, self.progress.data_position,
                              self.train_set.sample_lengths() if buckets else None, buckets)
        return DataLoader(self.train_set, batch_sampler=sampler, num_workers=tr.num_workers,
                          pin_memory=torch.cuda.is_available())

    def _micro_steps(self, batches: Iterator[dict], k: int):
        """Forward + backward of every micro-batch of step k; DeepSpeed's step on all but the last.
        Returns (metrics averaged over micro-batches, real tokens, model FLOPs, non-finite-loss flag)."""
        seed, accumulation = self.cfg.training.seed, self.cfg.training.gradient_accumulation_steps
        sums: dict[str, torch.Tensor] = {}
        tokens = torch.zeros((), dtype=torch.long, device=self.device)
        flops = torch.zeros((), dtype=torch.float64, device=self.device)
        bad_loss = torch.zeros((), dtype=torch.bool, device=self.device)
        for m in range(accumulation):
            batch = to_device(next(batches), self.device)
            slot = m * self.world + self.rank
            torch.manual_seed(derive_seed(seed, "train", k, slot))
            batch.update(global_slots(slot, len(batch["input_ids"]), self.global_batch, self.device))
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
            flops += self.step_flops(batch["attention_mask"], k)
        return {n: v / accumulation for n, v in sums.items()}, tokens, flops, bad_loss
