"""Which samples each rank trains on, in an order that survives restarts and GPU-count changes.

Every epoch is one permutation of the training split, seeded by (seed, epoch). Optimizer step k
takes the next G = ranks x accumulation x micro_batch samples of it, cut into ranks x accumulation
*slots* of micro_batch samples; micro-step m on rank r takes slot m x ranks + r. Sample order,
micro-batch grouping and slot ids (which also seed the step's noise, see trainer.py) depend only on
G, not on how it is split over ranks and accumulation: 2 ranks x 1 micro-step and 1 rank x 2
micro-steps train on the same micro-batches. An epoch's tail shorter than G is dropped.

With ``data.length_buckets`` K > 0 the epoch keeps the same samples (and drops the same tail) but
reorders them so that a micro-batch holds sentences of similar length: a batch is trimmed only to
its longest row, so in a mixed batch most positions are padding that every model pass pays for.
The kept part of the permutation is cut into runs of K global batches, each run is sorted by
length (stable: ties keep the permutation's order) and cut back into K global batches, one length
bucket each, and the epoch's global batches are then shuffled (seeded by (seed, epoch) too), so
the length of the next step stays random while the samples of one step, and so the ranks of one
step, have similar lengths. Still a function of G alone.

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


def epoch_order(dataset_len: int, seed: int, epoch: int, global_batch: int,
                lengths: torch.Tensor | None = None, length_buckets: int = 0) -> torch.Tensor:
    """The epoch's samples in training order: its permutation, or with ``length_buckets`` K > 0 and
    ``lengths`` (real tokens per sample) the length-bucketed order of the module docstring. The
    tail of fewer than ``global_batch`` samples stays last, in permutation order."""
    perm = epoch_permutation(dataset_len, seed, epoch)
    if not length_buckets:
        return perm
    used = dataset_len // global_batch * global_batch
    kept = perm[:used]
    run = torch.arange(used) // (length_buckets * global_batch)
    # One stable sort orders by run first, then by length within the run.
    by_length = kept[torch.sort(run * (int(lengths.max()) + 1) + lengths[kept], stable=True).indices]
    batches = by_length.view(-1, global_batch)
    shuffle = torch.randperm(len(batches), generator=torch.Generator().manual_seed(
        derive_seed(seed, "length_buckets", epoch)))
    return torch.cat([batches[shuffle].flatten(), perm[used:]])


def check_global_batch(dataset_len: int, world: int, accumulation: int, micro_batch: int) -> None:
    """Refuse a training split smaller than one global batch: no step could be filled."""
    if world * accumulation * micro_batch > dataset_len:
        raise DataError(f"the training split has {dataset_len} samples, fewer than one global batch of "
                        f"{world * accumulation * micro_batch} (training.micro_batch_size {micro_batch} x "
                        f"training.gradient_accumulation_steps {accumulation} x world size {world}). Lower those "
                        "keys, or train on more samples.")


class StepBatches(Sampler[list[int]]):
    """This rank's micro-batches (lists of dataset indices), endlessly, from ``start`` on. With
    ``length_buckets`` > 0, ``lengths`` gives the real tokens of every sample."""

    def __init__(self, dataset_len: int, seed: int, world: int, rank: int, accumulation: int,
                 micro_batch: int, start: DataPosition, lengths: torch.Tensor | None = None,
                 length_buckets: int = 0):
        self.n, self.seed = dataset_len, seed
        self.world, self.rank, self.accumulation, self.micro = world, rank, accumulation, micro_batch
        self.global_batch = world * accumulation * micro_batch
        check_global_batch(dataset_len, world, accumulation, micro_batch)
        self.lengths, self.length_buckets = lengths, length_buckets
        self.start = start.normalized(self.global_batch, dataset_len)

    def _order(self, epoch: int) -> torch.Tensor:
        return epoch_order(self.n, self.seed, epoch, self.global_batch, self.lengths, self.length_buckets)

    def __iter__(self) -> Iterator[list[int]]:
        pos = self.start
        order = self._order(pos.epoch)
        while True:
            for m in range(self.accumulation):
                first = pos.epoch_samples + (m * self.world + self.rank) * self.micro
                yield order[first:first + self.micro].tolist()
            nxt = pos.advance(self.global_batch, self.n)
            if nxt.epoch != pos.epoch:
                order = self._order(nxt.epoch)
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


def global_slots(slot: int, micro_batch: int, global_batch: int, device: torch.device) -> dict[str, torch.Tensor]:
    """Where slot ``slot``'s samples sit in their step's global batch: ``global_index`` [micro_batch]
    and ``global_batch_size``, added to its batch so that per-sample draws stratified over the
    global batch (loss.text_time_antithetic) depend on G alone, like the slots."""
    first = slot * micro_batch
    return {"global_index": torch.arange(first, first + micro_batch, device=device),
            "global_batch_size": torch.tensor(global_batch, device=device)}


def to_device(batch: dict[str, torch.Tensor], device: torch.device) -> dict[str, torch.Tensor]:
    return {k: v.to(device, non_blocking=True) for k, v in batch.items()}
