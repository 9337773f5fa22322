"""The data order: a function of the global batch only, resumable mid-epoch; validation batches
split over ranks."""
import pytest

from lgdlm_ds.batching import DataPosition, StepBatches, eval_batches


def _step_batches(world, accumulation, start=DataPosition(), steps=5, n=23, micro=2):
    """Micro-batches per (step, slot) for every rank."""
    out = {}
    for rank in range(world):
        it = iter(StepBatches(n, 7, world, rank, accumulation, micro, start))
        for k in range(steps):
            for m in range(accumulation):
                out[(k, m * world + rank)] = next(it)
    return out


def test_data_order_depends_only_on_the_global_batch():
    one = _step_batches(world=1, accumulation=4)
    assert one == _step_batches(world=2, accumulation=2) == _step_batches(world=4, accumulation=1)
    # 23 samples, global batch 8: two steps per epoch, each epoch a permutation without repeats
    epoch0 = sum((one[(k, s)] for k in (0, 1) for s in range(4)), [])
    assert len(set(epoch0)) == 16 and one[(2, 0)] != one[(0, 0)]


def test_data_position_resumes_mid_epoch():
    straight = _step_batches(world=2, accumulation=1, steps=7, n=11)
    pos = DataPosition()
    for _ in range(3):
        pos = pos.advance(4, 11)
    assert pos == DataPosition(epoch=1, epoch_samples=4)
    resumed = _step_batches(world=2, accumulation=1, start=pos, steps=4, n=11)
    assert all(resumed[(k, s)] == straight[(k + 3, s)] for k in range(4) for s in range(2))


def test_eval_batches_split_the_validation_set_over_ranks():
    assert eval_batches(10, 2, 1, 2, 8) == [[2, 3], [6, 7]]
    with pytest.raises(ValueError, match="validation split has 3 samples"):
        eval_batches(3, 2, 0, 2, 1)
