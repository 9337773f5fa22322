import json
import os

import numpy as np
import pytest
import torch

from lgdlm_ds import data
from lgdlm_ds.config import ConfigError, load_config
from lgdlm_ds.data import DataError, PerSampleDataset, SyntheticDataset, build_dataset, sample_name
from core_utils import tiny_config


def _write(root, name, ids, mask, latent, tokens="tokens", latents="latents", suffix=""):
    """One sample of the older layout: root/<tokens>/<name><suffix>.npz beside root/<latents>/<name>.npy."""
    (root / tokens).mkdir(parents=True, exist_ok=True)
    (root / latents).mkdir(parents=True, exist_ok=True)
    np.savez(root / tokens / f"{name}{suffix}.npz", input_ids=np.asarray(ids), attention_mask=np.asarray(mask))
    np.save(root / latents / f"{name}.npy", np.asarray(latent, dtype=np.float32))


def _sample(i, seq_len=4, dim=3):
    return [i % 7 + 1] * seq_len, [True] * (seq_len - 1) + [False], [float(i)] * dim


def _names(ds: PerSampleDataset) -> list[str]:
    return [sample_name(os.fsdecode(f)) for f in ds.files]


def _per_sample(root, split, val_fraction=0.0):
    return PerSampleDataset(root / "tokens", root / "latents", split, val_fraction, seq_len=4, latent_dim=3,
                            vocab_size=10)


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
    train, val = _per_sample(tmp_path, "train", 0.1), _per_sample(tmp_path, "validation", 0.1)
    assert len(train) + len(val) == n and not set(_names(train)) & set(_names(val))
    assert abs(len(val) / n - 0.1) < 0.02
    s = train[0]
    i = int(_names(train)[0][1:])
    assert s["input_ids"].dtype == torch.long and s["attention_mask"].tolist() == [True, True, True, False]
    assert torch.equal(s["latent"], torch.full((3,), float(i)))


def test_per_sample_naming_styles_latent_shapes_and_orphan_latents(tmp_path, capsys):
    latents = {"a": [1.0, 2.0, 3.0], "b": [[4.0, 5.0, 6.0]], "c": [[7.0, 8.0, 9.0], [0.0, 0.0, 0.0]]}
    for k, (name, latent) in enumerate(latents.items()):  # [D], [1, D], [N, D]: the first row counts
        _write(tmp_path, name, [k + 1] * 4, [True] * 4, latent, suffix="_tokens" if name == "b" else "")
    for name in ("x", "y"):  # latents without a token file: the older data has millions, unused
        np.save(tmp_path / "latents" / f"{name}.npy", np.zeros(3, np.float32))
    ds = _per_sample(tmp_path, "train")
    assert _names(ds) == ["a", "b", "c"] and os.fsdecode(ds.files[1]) == "b_tokens.npz"
    for k, want in enumerate(([1.0, 2.0, 3.0], [4.0, 5.0, 6.0], [7.0, 8.0, 9.0])):
        assert ds[k]["latent"].tolist() == want and ds[k]["input_ids"].tolist() == [k + 1] * 4
    err = capsys.readouterr().err
    assert err.count("2 of the 5 latent files") == 1 and "have no token file and are not used" in err


@pytest.mark.parametrize("how", ["data.path", "token_dir+latent_dir"])
def test_split_folders_are_the_split(tmp_path, how):
    for split, names in (("train", ["t0", "t1", "t2"]), ("validation", ["v0"])):
        for i, name in enumerate(names):
            _write(tmp_path, name, *_sample(i, 12, 8), tokens=f"tokens/{split}", latents=f"latents/{split}",
                   suffix="_tokens" if i == 1 else "")
    if how == "data.path":
        where = [f"data.path={tmp_path}"]
    else:  # folders of any name, as the older configs pointed at them
        (tmp_path / "tokens").rename(tmp_path / "tok")
        (tmp_path / "latents").rename(tmp_path / "lat")
        where = [f"data.token_dir={tmp_path / 'tok'}", f"data.latent_dir={tmp_path / 'lat'}"]
    cfg = tiny_config("data.kind=per_sample", "data.val_fraction=0.5", *where)
    train, val = build_dataset(cfg, "train"), build_dataset(cfg, "validation")
    assert _names(train) == ["t0", "t1", "t2"] and _names(val) == ["v0"]  # val_fraction plays no part
    assert val[0]["latent"].tolist() == [0.0] * 8


def test_missing_split_folder_and_latent_folder_are_named(tmp_path):
    _write(tmp_path, "t0", *_sample(0), tokens="tokens/train", latents="latents/train")
    assert len(_per_sample(tmp_path, "train")) == 1
    with pytest.raises(DataError, match=r"tokens/validation does not exist: .* split by its .*tokens/train folder"):
        _per_sample(tmp_path, "validation")
    (tmp_path / "tokens" / "validation").mkdir()
    with pytest.raises(DataError, match=r"latents/validation is missing: .*tokens/validation holds the validation"):
        _per_sample(tmp_path, "train")


def test_index_is_written_once_reused_and_rebuilt_when_a_file_is_added(tmp_path, monkeypatch):
    for i in range(6):
        _write(tmp_path, f"s{i}", *_sample(i, 12, 8))
    np.save(tmp_path / "latents" / "orphan.npy", np.zeros(8, np.float32))
    run = tmp_path / "run"
    run.mkdir()
    cfg = tiny_config("data.kind=per_sample", f"data.path={tmp_path}", "data.val_fraction=0.3",
                      f"logging.run_dir={run}")
    lists = []
    real_list = data.list_per_sample
    monkeypatch.setattr(data, "list_per_sample", lambda *a: lists.append(1) or real_list(*a))
    n_train, n_val = len(build_dataset(cfg, "train")), len(build_dataset(cfg, "validation"))
    assert n_train + n_val == 6 and n_val > 0 and len(lists) == 1  # listed once, for both splits
    [index] = (run / "data_index").iterdir()
    saved = json.loads(index.read_text())
    assert saved["orphan_latents"] == 1 and saved["samples"] == {"": 6} and len(saved["groups"][""]) == 6
    assert [p[0] for p in saved["signature"]] == [str(tmp_path / "latents"), str(tmp_path / "tokens")]
    before = index.stat().st_mtime_ns
    assert len(build_dataset(cfg, "train")) == n_train and len(lists) == 1  # a new launch reuses it
    assert index.stat().st_mtime_ns == before

    _write(tmp_path, "s6", *_sample(6, 12, 8))
    monkeypatch.setattr(data, "_rank", lambda: 1)  # the other ranks take the index as rank 0 left it
    assert len(build_dataset(cfg, "train")) == n_train and len(lists) == 1
    monkeypatch.setattr(data, "_rank", lambda: 0)
    total = len(build_dataset(cfg, "train")) + len(build_dataset(cfg, "validation"))
    assert total == 7 and len(lists) == 2  # rank 0 saw the folders change and listed once more
    assert json.loads(index.read_text())["samples"] == {"": 7}

    no_run = tiny_config("data.kind=per_sample", f"data.path={tmp_path}", "data.val_fraction=0.3")
    build_dataset(no_run, "train")  # no run directory (tests, evaluate of a moved run): in memory
    assert len(lists) == 3 and len(list((run / "data_index").iterdir())) == 1


@pytest.mark.parametrize("break_it, message", [
    (lambda r: (r / "latents" / "s00003.npy").unlink(),
     r"tokens/s00003.npz has no latent: .*latents/s00003.npy does not exist. Add the latents"),
    (lambda r: _write(r, "s00003", *_sample(3), suffix="_tokens"),
     r"tokens/s00003.npz and .*tokens/s00003_tokens.npz are both token files of sample 's00003'"),
    (lambda r: _write(r, "s00004", [1] * 5, [True] * 5, [0.0] * 3), r"tokens/s00004.npz: input_ids \(5,\)"),
    (lambda r: _write(r, "s00004", [1] * 4, [True] * 4, [0.0] * 5), r"latents/s00004.npy: latent shape \(5,\)"),
    (lambda r: _write(r, "s00004", [1] * 4, [True] * 4, np.zeros((1, 1, 3))),
     r"latents/s00004.npy: latent shape \(1, 1, 3\)"),
    (lambda r: _write(r, "s00004", [1, 2, 10, 0], [True] * 4, [0.0] * 3), "tokens/s00004.npz: token id 10 outside"),
    (lambda r: (r / "tokens" / "s00004.npz").write_bytes(b"PK\x03\x04 truncated"),
     r"cannot read sample .*tokens/s00004.npz \+ .*latents/s00004.npy"),
])
def test_per_sample_errors_name_the_file(tmp_path, break_it, message):
    for i in range(8):
        _write(tmp_path, f"s{i:05d}", *_sample(i))
    break_it(tmp_path)
    with pytest.raises(DataError, match=message):
        ds = _per_sample(tmp_path, "train")
        for i in range(len(ds)):
            ds[i]


def test_per_sample_missing_root_or_empty_split(tmp_path):
    with pytest.raises(DataError, match="tokens is missing"):
        _per_sample(tmp_path, "train", 0.1)
    (tmp_path / "tokens").mkdir()
    (tmp_path / "latents").mkdir()
    with pytest.raises(DataError, match="tokens holds no token files"):
        _per_sample(tmp_path, "train", 0.1)
    _write(tmp_path, "only", *_sample(0))
    with pytest.raises(DataError, match="the validation split .* is empty"):
        _per_sample(tmp_path, "validation", 0.0)


def test_build_dataset_reads_the_configured_layout(tmp_path):
    for i in range(20):
        _write(tmp_path, f"s{i}", [1] * 12, [True] * 12, [0.5] * 8)
    cfg = tiny_config("data.kind=per_sample", f"data.path={tmp_path}", "data.val_fraction=0.2")
    assert isinstance(build_dataset(cfg, "train"), PerSampleDataset)


@pytest.mark.parametrize("overrides, message", [
    (["data.kind=per_sample"], "'data.path': data.kind per_sample needs the dataset root .* or data.token_dir"),
    (["data.kind=per_sample", "data.token_dir=t"], "'data.latent_dir': data.token_dir and data.latent_dir go together"),
    (["data.kind=per_sample", "data.path=r", "data.token_dir=t", "data.latent_dir=l"],
     "'data.token_dir': set either data.path .* not both"),
    (["data.token_dir=t", "data.latent_dir=l"], "'data.token_dir': is read only by data.kind per_sample"),
])
def test_per_sample_config_validation(overrides, message):
    with pytest.raises(ConfigError, match=message):
        load_config(None, overrides)
