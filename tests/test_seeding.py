"""Seeds derived from the run's seed."""
import torch

from lgdlm_ds.seeding import derive_seed


def test_derived_seeds_are_stable_distinct_and_fit_a_generator():
    assert derive_seed(7, "train", 3, 1) == derive_seed(7, "train", 3, 1)
    seeds = {derive_seed(s, use, i) for s in (0, 1) for use in ("epoch", "eval") for i in range(50)}
    assert len(seeds) == 200 and all(0 <= x < 2**63 for x in seeds)
    torch.Generator().manual_seed(max(seeds))
