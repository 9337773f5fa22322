"""Which samples each rank trains on, in an order that survives restarts and GPU-count changes.

Every epoch is one permutation of the training split, seeded by (seed, epoch). Optimizer step k
takes the next G = ranks x accumulation x micro_batch samples of it, cut into ranks x accumulation
*slots* of micro_batch samples; micro-step m on rank r takes slot m x ranks + r. Sample order,
micro-batch grouping and slot ids (which also seed the step's noise, see trainer.py) depend only on
G, not on how it is split over ranks and accumulation: 2 ranks x 1 micro-step and 1 rank x 2
micro-steps train on the same micro-batches. An epoch's tail shorter than G is dropped.

The data position is (epoch, samples of that epoch consumed by all ranks together), so a resumed
run continues where the interrupted one stopped, also on another number of ranks.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator

import torch
from torch.utils.data import Sampler

from .data import DataError
from .seeding import derive_seed


@dataclass(frozen=True)
class DataPosition:
    epoch: int = 0
    """Epoch of the next step's samples."""
    epoch_samples: int = 0
    """Samples of that epoch's permutation already consumed (all ranks together)."""

    def normalized(self, global_batch: int, dataset_len: int) -> "DataPosition":
        """Move to the next epoch when fewer than one global batch is left in this one."""
        if self.epoch_samples + global_batch > dataset_len:
            return DataPosition(self.epoch + 1, 0)
        return self

    def advance(self, global_batch: int, dataset_len: int) -> "DataPosition":
        """Position after one step consumed ``global_batch`` samples."""
        return DataPosition(self.epoch, self.epoch_samples + global_batch).normalized(global_batch, dataset_len)


def epoch_permutation(dataset_len: int, seed: int, epoch: int) -> torch.Tensor:
    return torch.randperm(dataset_len, generator=torch.Generator().manual_seed(derive_seed(seed, "epoch", epoch)))


class StepBatches(Sampler[list[int]]):
    """This rank's micro-batches (lists of dataset indices), endlessly, from ``start`` on."""

    def __init__(self, dataset_len: int, seed: int, world: int, rank: int, accumulation: int,
                 micro_batch: int, start: DataPosition):
        self.n, self.seed = dataset_len, seed
        self.world, self.rank, self.accumulation, self.micro = world, rank, accumulation, micro_batch
        self.global_batch = world * accumulation * micro_batch
        if self.global_batch > dataset_len:
            raise DataError(f"the training split has {dataset_len} samples, fewer than one global batch "
                             f"({world} ranks x {accumulation} accumulation x {micro_batch} micro-batch).")
        self.start = start.normalized(self.global_batch, dataset_len)

    def __iter__(self) -> Iterator[list[int]]:
        pos = self.start
        perm = epoch_permutation(self.n, self.seed, pos.epoch)
        while True:
            for m in range(self.accumulation):
                first = pos.epoch_samples + (m * self.world + self.rank) * self.micro
                yield perm[first:first + self.micro].tolist()
            nxt = pos.advance(self.global_batch, self.n)
            if nxt.epoch != pos.epoch:
                perm = epoch_permutation(self.n, self.seed, nxt.epoch)
            pos = nxt


def eval_batches(dataset_len: int, world: int, rank: int, micro_batch: int, max_batches: int) -> list[list[int]]:
    """The validation split in order: batch e of rank r is slot e x ranks + r. The same samples
    every evaluation, so evaluations are comparable across a run."""
    available = dataset_len // (world * micro_batch)
    if available == 0:
        raise DataError(f"the validation split has {dataset_len} samples, fewer than one micro-batch per "
                         f"rank ({world} ranks x {micro_batch}); raise data.val_fraction or turn training.eval_every off.")
    return [list(range((e * world + rank) * micro_batch, (e * world + rank + 1) * micro_batch))
            for e in range(min(max_batches, available))]


def to_device(batch: dict[str, torch.Tensor], device: torch.device) -> dict[str, torch.Tensor]:
    return {k: v.to(device, non_blocking=True) for k, v in batch.items()}
