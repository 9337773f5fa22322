import numpy as np
import pytest
import torch

from lgdlm_ds.data import DataError, PerSampleDataset, SyntheticDataset, build_dataset
from core_utils import tiny_config


def _write(root, name, ids, mask, latent):
    (root / "tokens").mkdir(parents=True, exist_ok=True)
    (root / "latents").mkdir(parents=True, exist_ok=True)
    np.savez(root / "tokens" / f"{name}.npz", input_ids=np.asarray(ids), attention_mask=np.asarray(mask))
    np.save(root / "latents" / f"{name}.npy", np.asarray(latent, dtype=np.float32))


def _sample(i, seq_len=4, dim=3):
    return [i % 7 + 1] * seq_len, [True] * (seq_len - 1) + [False], [float(i)] * dim


def test_synthetic_is_deterministic_disjoint_and_well_formed():
    cfg = tiny_config("data.num_samples=200", "data.val_fraction=0.1")
    train, val = SyntheticDataset(cfg, "train"), SyntheticDataset(cfg, "validation")
    assert len(train) == 200 and len(val) == 20
    a, b = train[5], SyntheticDataset(cfg, "train")[5]
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert a["input_ids"].shape == (12,) and a["attention_mask"].dtype == torch.bool and a["latent"].shape == (8,)
    real = a["input_ids"][a["attention_mask"]]
    assert not torch.isin(real, torch.tensor([0, 103])).any() and (a["input_ids"][~a["attention_mask"]] == 0).all()
    train_ids = {tuple(train[i]["input_ids"].tolist()) for i in range(200)}
    assert not train_ids & {tuple(val[i]["input_ids"].tolist()) for i in range(20)}
    other = SyntheticDataset(tiny_config("training.seed=1"), "train")[5]
    assert not torch.equal(other["input_ids"], a["input_ids"])


def test_per_sample_lists_every_file_and_splits_disjointly(tmp_path):
    n = 10_050  # the older reader stopped after the first 10,000 files
    for i in range(n):
        _write(tmp_path, f"s{i:05d}", *_sample(i))
    train = PerSampleDataset(tmp_path, "train", 0.1, seq_len=4, latent_dim=3, vocab_size=10)
    val = PerSampleDataset(tmp_path, "validation", 0.1, seq_len=4, latent_dim=3, vocab_size=10)
    assert len(train) + len(val) == n and not set(train.names) & set(val.names)
    assert abs(len(val) / n - 0.1) < 0.02
    s = train[0]
    i = int(train.names[0][1:])
    assert s["input_ids"].dtype == torch.long and s["attention_mask"].tolist() == [True, True, True, False]
    assert torch.equal(s["latent"], torch.full((3,), float(i)))


@pytest.mark.parametrize("break_it, message", [
    (lambda r: (r / "latents" / "s00003.npy").unlink(), "tokens/s00003.npz has no partner: .*latents/s00003.npy"),
    (lambda r: _write(r, "s00004", [1] * 5, [True] * 5, [0.0] * 3), r"tokens/s00004.npz: input_ids \(5,\)"),
    (lambda r: _write(r, "s00004", [1] * 4, [True] * 4, [0.0] * 5), r"latents/s00004.npy: latent shape \(5,\)"),
    (lambda r: _write(r, "s00004", [1, 2, 10, 0], [True] * 4, [0.0] * 3), "tokens/s00004.npz: token id 10 outside"),
])
def test_per_sample_errors_name_the_file(tmp_path, break_it, message):
    for i in range(8):
        _write(tmp_path, f"s{i:05d}", *_sample(i))
    break_it(tmp_path)
    with pytest.raises(DataError, match=message):
        ds = PerSampleDataset(tmp_path, "train", 0.0, seq_len=4, latent_dim=3, vocab_size=10)
        for i in range(len(ds)):
            ds[i]


def test_per_sample_missing_root_or_empty_split(tmp_path):
    with pytest.raises(DataError, match="tokens is missing"):
        PerSampleDataset(tmp_path, "train", 0.1, 4, 3, 10)
    _write(tmp_path, "only", *_sample(0))
    with pytest.raises(DataError, match="the validation split .* is empty"):
        PerSampleDataset(tmp_path, "validation", 0.0, 4, 3, 10)


def test_build_dataset_reads_the_configured_layout(tmp_path):
    for i in range(20):
        _write(tmp_path, f"s{i}", [1] * 12, [True] * 12, [0.5] * 8)
    cfg = tiny_config("data.kind=per_sample", f"data.path={tmp_path}", "data.val_fraction=0.2")
    assert isinstance(build_dataset(cfg, "train"), PerSampleDataset)
