"""The data order: a function of the global batch only, resumable mid-epoch, with or without
length buckets; validation batches split over ranks."""
import json

import pytest
import torch

from lgdlm_ds.batching import DataPosition, StepBatches, epoch_order, eval_batches
from lgdlm_ds.config import ConfigError
from lgdlm_ds.data import PackedDataset, SyntheticDataset
from lgdlm_ds.tools import padding
from lgdlm_ds.tools.padding import padding_share
from core_utils import TINY, packed_config, tiny_config

# Mixed lengths: 1..64 real tokens, drawn once.
MIXED = torch.randint(1, 65, (1000,), generator=torch.Generator().manual_seed(3))


def _step_batches(world, accumulation, start=DataPosition(), steps=5, n=23, micro=2, seed=7, lengths=None,
                  buckets=0):
    """Micro-batches per (step, slot) for every rank."""
    out = {}
    for rank in range(world):
        it = iter(StepBatches(n, seed, world, rank, accumulation, micro, start, lengths, buckets))
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


def test_length_buckets_depend_only_on_the_global_batch_and_the_seed():
    kw = dict(steps=40, n=len(MIXED), micro=4, lengths=MIXED, buckets=8)
    one = _step_batches(world=1, accumulation=2, **kw)
    assert one == _step_batches(world=2, accumulation=1, **kw)
    assert one == _step_batches(world=1, accumulation=2, **kw)  # rebuilt from the seed alone
    assert one != _step_batches(world=1, accumulation=2, **kw | dict(seed=8))
    assert one != _step_batches(world=1, accumulation=2, **kw | dict(buckets=0))


def test_length_buckets_reorder_the_epoch_samples_into_sorted_global_batches():
    n, g, k = len(MIXED), 24, 5  # 41 global batches, the last 16 samples dropped; runs of 5 batches
    plain, bucketed = epoch_order(n, 7, 2, g), epoch_order(n, 7, 2, g, MIXED, k)
    used = n // g * g
    assert sorted(bucketed[:used].tolist()) == sorted(plain[:used].tolist())  # each kept sample once
    assert torch.equal(bucketed[used:], plain[used:])  # and the same tail dropped
    batches = MIXED[bucketed[:used]].view(-1, g)
    assert (batches.diff(dim=1) >= 0).all()  # a global batch is a stretch of one sorted run
    # Each global batch is one of the k length buckets of its run of the permutation ...
    runs = [sorted(MIXED[plain[r:min(r + k * g, used)]].tolist()) for r in range(0, used, k * g)]
    buckets = {tuple(run[b:b + g]) for run in runs for b in range(0, len(run), g)}
    assert {tuple(b) for b in batches.tolist()} == buckets
    # ... and the steps are shuffled, not ordered by length or by run.
    means = batches.float().mean(1)
    assert not (means.diff() >= 0).all() and not (means.diff() <= 0).all()


def test_length_buckets_resume_mid_epoch():
    kw = dict(n=100, micro=3, lengths=MIXED[:100], buckets=4)
    straight = _step_batches(world=2, accumulation=1, steps=40, **kw)
    pos = DataPosition()
    for _ in range(19):
        pos = pos.advance(6, 100)
    assert pos == DataPosition(epoch=1, epoch_samples=6 * 3)  # 16 steps per epoch
    resumed = _step_batches(world=1, accumulation=2, start=pos, steps=21, **kw)
    assert all(resumed[(k, s)] == straight[(k + 19, s)] for k in range(21) for s in range(2))


def test_length_buckets_cut_the_padding_of_mixed_lengths():
    """Uniform lengths in [1, 64], micro-batches of 8: the longest of 8 rows averages 57.4 against a
    mean of 32.5, about 43% padding. Sorted in runs of 16 micro-batches (128 samples over 64 lengths),
    a micro-batch spans about 4 lengths, so a row is about 2 tokens short of its longest: some 6%."""
    def share(buckets):
        return padding_share(MIXED, list(_step_batches(1, 1, steps=125, n=1000, micro=8, lengths=MIXED,
                                                       buckets=buckets).values()))
    assert 0.35 < share(0) < 0.5
    assert share(16) < 0.1


def test_datasets_give_their_lengths_without_reading_the_samples(prepared):
    synthetic = SyntheticDataset(tiny_config("data.num_samples=20", "model.max_seq_len=12"), "train")
    packed = PackedDataset(prepared[0], "train")  # several shards
    for ds in (synthetic, packed):
        lengths = ds.sample_lengths()
        assert lengths.dtype == torch.long and len(set(lengths.tolist())) > 2
        assert lengths.tolist() == [int(ds[i]["attention_mask"].sum()) for i in range(len(ds))]


def test_length_buckets_are_refused_where_lengths_are_not_cheap():
    with pytest.raises(ConfigError, match=r"'data.length_buckets': needs every sample's length .* --from-per-sample"):
        packed_config("x", "data.kind=per_sample", "data.length_buckets=8")
    with pytest.raises(ConfigError, match=r"'data.length_buckets': must be 0 \(off\)"):
        packed_config("x", "data.length_buckets=-1")


def test_padding_command_prints_shares_and_ratios_as_its_last_line(capsys):
    assert padding.main(["--steps", "2", "--buckets", "4,16", *TINY, "data.num_samples=256",
                         "training.micro_batch_size=4"]) == 0
    out = json.loads(capsys.readouterr().out.splitlines()[-1])
    shares = {k: v["padding_share"] for k, v in out["variants"].items()}
    assert out["steps"] == 2 and shares["16"] < shares["4"] < shares["0"]
    assert all(v["tokens_per_s"] > 0 and v["padding_ratio"] == v["padding_share"] / shares["0"]
               for v in out["variants"].values())
