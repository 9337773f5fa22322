"""The datasets: synthetic, the older per-sample layout (listing, splits, index, errors) and the
packed reader (beside the per-sample one, standardised latents, a recipe that does not fit); every
bad input of bad_data.py with its exact message, data.on_bad_sample: skip, and a NaN latent in a
training run."""
import json
import os

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

from lgdlm_ds import data
from lgdlm_ds.data import (BadSample, DataError, PackedDataset, PerSampleDataset, SyntheticDataset, build_dataset,
                           sample_name)
from lgdlm_ds.metrics import LOG_NAME
import bad_data
from core_utils import DIM, SEQ_LEN, packed_config, tiny_config


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


def test_index_is_written_once_reused_and_rebuilt_when_a_file_is_added(tmp_path, run_dir, monkeypatch):
    for i in range(6):
        _write(tmp_path, f"s{i}", *_sample(i, 12, 8))
    np.save(tmp_path / "latents" / "orphan.npy", np.zeros(8, np.float32))
    cfg = tiny_config("data.kind=per_sample", f"data.path={tmp_path}", "data.val_fraction=0.3",
                      f"logging.run_dir={run_dir}")
    lists = []
    real_list = data.list_per_sample
    monkeypatch.setattr(data, "list_per_sample", lambda *a: lists.append(1) or real_list(*a))
    n_train, n_val = len(build_dataset(cfg, "train")), len(build_dataset(cfg, "validation"))
    assert n_train + n_val == 6 and n_val > 0 and len(lists) == 1  # listed once, for both splits
    [index] = (run_dir / "data_index").iterdir()
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
    assert len(lists) == 3 and len(list((run_dir / "data_index").iterdir())) == 1


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


def test_both_layouts_give_identical_batches(prepared, tmp_path):
    out, _ = prepared
    packed = build_dataset(packed_config(out), "train")
    assert isinstance(packed, PackedDataset)
    for i in range(len(packed)):  # the same samples written in the older one-file-per-sample layout
        s = packed[i]
        (tmp_path / "tokens").mkdir(exist_ok=True)
        (tmp_path / "latents").mkdir(exist_ok=True)
        np.savez(tmp_path / "tokens" / f"{i:05d}.npz", input_ids=s["input_ids"].numpy(),
                 attention_mask=s["attention_mask"].numpy())
        np.save(tmp_path / "latents" / f"{i:05d}.npy", s["latent"].numpy())
    older = PerSampleDataset(tmp_path / "tokens", tmp_path / "latents", "train", 0.0, SEQ_LEN, DIM, 30522)
    batches = [list(DataLoader(ds, batch_size=16)) for ds in (packed, older)]
    assert len(batches[0]) == len(batches[1]) == -(-len(packed) // 16)
    for a, b in zip(*batches):
        assert a.keys() == b.keys() == {"input_ids", "attention_mask", "latent", "bad_samples"}
        assert all(a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]) for k in a)


def test_standardized_latents_use_the_recorded_statistics(prepared):
    out, meta = prepared
    raw = build_dataset(packed_config(out), "train")
    std = build_dataset(packed_config(out, "data.standardize_latents=true"), "train")
    z = torch.stack([std[i]["latent"] for i in range(len(std))])
    x = torch.stack([raw[i]["latent"] for i in range(len(raw))])
    mean, scale = torch.tensor(meta["latent_mean"]), torch.tensor(meta["latent_std"]).clamp_min(1e-6)
    assert torch.allclose(z, (x - mean) / scale, atol=1e-5)
    live = torch.tensor(meta["latent_std"]) > 1e-3  # all-MiniLM-L6-v2 leaves a few dimensions constant
    z = z[:, live].double()  # statistics summed in fp64: only the standardisation's own rounding is left
    assert z.mean(0).abs().max() < 1e-4
    assert torch.allclose(z.std(0, unbiased=False), torch.ones(1, dtype=torch.float64), atol=1e-3)


@pytest.mark.parametrize("override, message", [
    ("model.vocab_size=30000", "vocabulary size 30522, but model.vocab_size is 30000. Set model.vocab_size: 30522"),
    ("model.max_seq_len=64", "sequence length 48, but model.max_seq_len is 64. Set model.max_seq_len: 48"),
    ("model.latent_dim=32", "latent size 384, but model.latent_dim is 32. Set model.latent_dim: 384"),
    ("data.mask_token_id=4", "mask id 103, but data.mask_token_id is 4. Set data.mask_token_id: 103"),
    ("data.pad_token_id=1", "pad id 0, but data.pad_token_id is 1. Set data.pad_token_id: 0"),
    ("data.val_fraction=0.05", "validation fraction 0.1, but data.val_fraction is 0.05. Set data.val_fraction: 0.1"),
    ("data.corpus=lee_background", "the corpus '.*lee20.txt', but data.corpus is 'lee_background'"),
])
def test_recipe_that_does_not_fit_the_data_is_refused(prepared, override, message):
    out, _ = prepared
    with pytest.raises(DataError, match=message):
        build_dataset(packed_config(out, override), "train")


def test_packed_reader_errors(prepared, tmp_path):
    with pytest.raises(DataError, match="holds no prepared dataset. Prepare one with `python -m lgdlm_ds.prepare"):
        build_dataset(packed_config(tmp_path), "train")
    out, meta = prepared
    broken = tmp_path / "broken"
    os.makedirs(broken)
    for p in out.iterdir():
        (broken / p.name).symlink_to(p)
    (broken / "validation-00000").unlink()
    (broken / "validation-00000").mkdir()
    np.save(broken / "validation-00000" / "input_ids.npy", np.zeros((3, SEQ_LEN), np.uint16))
    with pytest.raises(DataError, match=r"validation-00000/input_ids.npy: uint16 \(3, 48\), metadata.json says uint16"):
        PackedDataset(broken, "validation")


# ---- bad inputs: each stops with its message; data.on_bad_sample: skip


@pytest.mark.parametrize("case", list(bad_data.CASES))
def test_each_bad_input_stops_with_its_exact_message(case, tmp_path):
    c = bad_data.CASES[case]
    with pytest.raises(c.error) as raised:
        c.provoke(tmp_path)
    assert str(raised.value) == c.message(tmp_path)


def test_skip_trains_on_the_next_good_sample_the_same_in_every_process(tmp_path, capsys):
    root = bad_data.per_sample(tmp_path)
    bad_data.write_sample(root, "s2", *bad_data.good_sample(2)[:2], [np.nan] * bad_data.DIM)
    (root / "tokens" / "s4.npz").write_bytes(b"PK\x03\x04 truncated")
    bad_data.write_sample(root, "s5", [1] * 5, [True] * 5, [0.0] * bad_data.DIM)
    ds = build_dataset(bad_data.per_sample_config(root, "data.on_bad_sample=skip"), "train")
    samples = [ds[i] for i in range(len(ds))]
    # s2 -> s3; s4 and s5 -> past the end, round to s0
    assert [s["latent"][0].item() for s in samples] == [0.0, 1.0, 3.0, 3.0, 0.0, 0.0]
    assert [s["bad_samples"].item() for s in samples] == [0, 0, 1, 0, 2, 1]
    assert all(torch.isfinite(s["latent"]).all() for s in samples)
    skipping = "data: skipping sample {} of the train split (data.on_bad_sample: skip): "
    warnings = capsys.readouterr().err.splitlines()
    assert warnings.count(skipping.format(2) + f"{root / 'latents' / 's2.npy'}: latent holds NaN or Inf (3 of its "
                          "3 values).") == 1
    assert warnings.count(skipping.format(4) + f"cannot read sample {root / 'tokens' / 's4.npz'} + "
                          f"{root / 'latents' / 's4.npy'}: File is not a zip file.") == 1
    assert warnings.count(skipping.format(5) + f"{root / 'tokens' / 's5.npz'}: input_ids (5,) / attention_mask (5,), "
                          "expected (4,) from model.max_seq_len: every sample must have this length.") == 2

    # Two worker processes: the same samples, and the counts reach this process with the batches.
    batches = list(DataLoader(ds, batch_size=3, num_workers=2))
    assert torch.equal(torch.cat([b["latent"] for b in batches]), torch.stack([s["latent"] for s in samples]))
    assert sum(int(b["bad_samples"].sum()) for b in batches) == 4

    strict = build_dataset(bad_data.per_sample_config(root), "train")  # error: a worker's error reaches here
    with pytest.raises(BadSample) as raised:
        list(DataLoader(strict, batch_size=3, num_workers=1))
    message = str(raised.value).rstrip()
    assert message.startswith("Caught BadSample in DataLoader worker process 0")
    assert message.endswith(f"{root / 'latents' / 's2.npy'}: latent holds NaN or Inf (3 of its 3 values)."
                            + bad_data.SKIP_HINT)


def test_skip_in_packed_data(tmp_path):
    path = bad_data.packed(tmp_path)
    latents = np.load(bad_data.shard_file(path, "latents.npy"), mmap_mode="r+")
    latents[1] = np.inf
    latents.flush()
    ds = build_dataset(bad_data.packed_config(path, "data.on_bad_sample=skip"), "train")
    samples = [ds[i] for i in range(len(ds))]
    assert [s["latent"][0].item() for s in samples] == [0.0, 2.0, 2.0, 3.0, 4.0, 5.0]
    assert [s["bad_samples"].item() for s in samples] == [0, 1, 0, 0, 0, 0]


def _run_with_a_nan_latent(tmp_path, *overrides: str):
    """A tiny in-process run (a world of one, ZeRO-0, fp32) of 4 steps of 2 samples: one epoch of
    s0..s7, whose s3 has a NaN latent. Returns its Trainer and the list that receives the first
    latent value of every sample that reaches the model."""
    from engine_utils import RUN, ds_json, world_of_one
    from lgdlm_ds.ds_config import load_ds_config
    from lgdlm_ds.trainer import Trainer
    root = bad_data.per_sample(tmp_path / "data", 8)
    bad_data.write_sample(root, "s3", *bad_data.good_sample(3)[:2], [np.nan] * bad_data.DIM)
    with world_of_one():
        cfg = bad_data.per_sample_config(root, *RUN, "training.micro_batch_size=2", "training.num_train_steps=4",
                                         f"training.ds_config={ds_json(tmp_path, 0)}",
                                         f"logging.run_dir={tmp_path / 'run'}", *overrides)
        trainer = Trainer(cfg, load_ds_config(cfg))
    seen: list[float] = []
    trainer.engine.module.register_forward_pre_hook(lambda _, args: seen.extend(args[0]["latent"][:, 0].tolist()))
    return trainer, seen


def test_a_nan_latent_never_reaches_the_model_under_skip(tmp_path):
    trainer, seen = _run_with_a_nan_latent(tmp_path, "data.on_bad_sample=skip", "training.num_workers=1")
    trainer.train()
    assert sorted(seen) == [0.0, 1.0, 2.0, 4.0, 4.0, 5.0, 6.0, 7.0]  # s3's place taken by s4
    lines = [json.loads(x) for x in (trainer.run_dir / LOG_NAME).read_text().splitlines()]
    assert [x["step"] for x in lines] == [1, 2, 3, 4] and sum(x["bad_samples"] for x in lines) == 1
    assert all(x["skipped_steps"] == 0 for x in lines)


def test_a_nan_latent_stops_the_run_naming_its_file(tmp_path):
    trainer, seen = _run_with_a_nan_latent(tmp_path, "training.num_workers=0")
    with pytest.raises(BadSample) as raised:
        trainer.train()
    assert str(raised.value) == (f"{tmp_path / 'data' / 'latents' / 's3.npy'}: latent holds NaN or Inf (3 of its 3 "
                                 "values)." + bad_data.SKIP_HINT)
    assert 3.0 not in seen and all(np.isfinite(seen))
