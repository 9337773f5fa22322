"""Bad inputs of the datasets, each with the exact error it must raise: a tiny good dataset (the
per-sample layout: 6 samples s0..s5, S=4, D=3, vocabulary 10; or the packed dataset converted from
it, shards of 4), broken one way. ``CASES`` maps a case of docs/errors.md to
``Case(provoke, error, message)``: ``provoke(tmp)`` builds the input under ``tmp`` and reads it as
training would, ``message(tmp)`` is the message it must raise."""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np

from lgdlm_ds.config import ConfigError, load_config
from lgdlm_ds.data import BadSample, DataError, build_dataset

SEQ_LEN, DIM, VOCAB = 4, 3, 10
SHAPE = [f"model.max_seq_len={SEQ_LEN}", f"model.latent_dim={DIM}", f"model.vocab_size={VOCAB}",
         "data.mask_token_id=3", "data.pad_token_id=0", "data.val_fraction=0.0"]
SKIP_HINT = " Set data.on_bad_sample: skip to train on the next good sample instead."
DAMAGED = "the shard is damaged: prepare the data again into an empty data.path."


def write_sample(root: Path, name: str, ids, mask, latent, suffix: str = "", latent_dtype=np.float32) -> None:
    """One sample of the per-sample layout: root/tokens/<name><suffix>.npz beside root/latents/<name>.npy."""
    (root / "tokens").mkdir(parents=True, exist_ok=True)
    (root / "latents").mkdir(parents=True, exist_ok=True)
    np.savez(root / "tokens" / f"{name}{suffix}.npz", input_ids=np.asarray(ids), attention_mask=np.asarray(mask))
    np.save(root / "latents" / f"{name}.npy", np.asarray(latent, dtype=latent_dtype))


def good_sample(i: int) -> tuple[list, list, list]:
    """input_ids, attention_mask and latent of sample s<i>: its latent is [i, i, i]."""
    return [i % 7 + 1] * SEQ_LEN, [True] * (SEQ_LEN - 1) + [False], [float(i)] * DIM


def per_sample(root: Path, n: int = 6) -> Path:
    for i in range(n):
        write_sample(root, f"s{i}", *good_sample(i))
    return root


def per_sample_config(root: Path, *overrides: str):
    return load_config(None, [*SHAPE, "data.kind=per_sample", f"data.path={root}", *overrides])


def packed(root: Path, n: int = 6) -> Path:
    """The per-sample samples s0..s(n-1), converted into the packed dataset root/packed (train only)."""
    from lgdlm_ds import prepare as prep  # the tokenizer and encoder stack: imported only here
    older = per_sample(root / "older", n)
    settings = prep.PerSampleSettings(str(older / "tokens"), str(older / "latents"), val_fraction=0.0, shard_size=4,
                                      vocab_size=VOCAB, mask_token_id=3, pad_token_id=0)
    prep.prepare_per_sample(root / "packed", settings, workers=1)
    return root / "packed"


def packed_config(path: Path, *overrides: str):
    return load_config(None, [*SHAPE, "data.kind=packed", f"data.path={path}", *overrides])


def shard_file(path: Path, name: str) -> Path:
    """``name`` in the first training shard of the packed dataset at ``path``."""
    meta = json.loads((path / "metadata.json").read_text())
    return path / meta["splits"]["train"]["shards"][0]["name"] / name


def read_all(cfg, split: str = "train") -> list[dict]:
    ds = build_dataset(cfg, split)
    return [ds[i] for i in range(len(ds))]


@dataclass(frozen=True)
class Case:
    provoke: Callable[[Path], object]
    error: type[Exception]
    message: Callable[[Path], str]


def _broken_sample(break_it: Callable[[Path], object]) -> Callable[[Path], object]:
    """Six good samples with s3 broken by ``break_it(root)``, every sample read."""
    def provoke(tmp: Path):
        break_it(per_sample(tmp))
        return read_all(per_sample_config(tmp))
    return provoke


def _broken_packed(break_it: Callable[[Path], object], *overrides: str, split: str = "train"):
    """The packed dataset with ``break_it(path)`` applied, every sample of ``split`` read."""
    def provoke(tmp: Path):
        path = packed(tmp)
        break_it(path)
        return read_all(packed_config(path, *overrides), split)
    return provoke


def _set_row(path: Path, name: str, row: int, value) -> None:
    arr = np.load(shard_file(path, name), mmap_mode="r+")
    arr[row] = value
    arr.flush()


def _truncate(file: Path, by: int) -> None:
    file.write_bytes(file.read_bytes()[:-by])


def _edit_metadata(path: Path, **fields) -> None:
    meta = json.loads((path / "metadata.json").read_text())
    (path / "metadata.json").write_text(json.dumps({**meta, **fields}))


def _mkdirs(root: Path, *names: str) -> None:
    for name in names:
        (root / name).mkdir(parents=True)


def _split_folders(tmp: Path, token_splits: tuple[str, ...], latent_splits: tuple[str, ...]) -> None:
    """tokens/<split>/ and latents/<split>/ folders, each holding a sample of its split."""
    _mkdirs(tmp, *(f"tokens/{s}" for s in token_splits), *(f"latents/{s}" for s in latent_splits))
    for split in token_splits:
        np.savez(tmp / "tokens" / split / f"{split}0.npz", input_ids=np.ones(SEQ_LEN, np.int64),
                 attention_mask=np.ones(SEQ_LEN, bool))
    for split in latent_splits:
        np.save(tmp / "latents" / split / f"{split}0.npy", np.zeros(DIM, np.float32))


def _tok(tmp: Path, name: str = "s3") -> Path:
    return tmp / "tokens" / f"{name}.npz"


def _lat(tmp: Path, name: str = "s3") -> Path:
    return tmp / "latents" / f"{name}.npy"


def _shard(tmp: Path, name: str) -> Path:
    return shard_file(tmp / "packed", name)


CASES: dict[str, Case] = {
    # ---- the per-sample layout, when the dataset is built
    "data.per_sample_folder_missing": Case(
        lambda tmp: build_dataset(per_sample_config(tmp), "train"), DataError,
        lambda tmp: f"{tmp / 'tokens'} is missing: a per_sample dataset is a token folder of <name>.npz (or "
                    "<name>_tokens.npz) files beside a latent folder of <name>.npy files, optionally in train/ and "
                    "validation/ subfolders. Set data.path to the root holding tokens/ and latents/, or "
                    "data.token_dir and data.latent_dir to the two folders."),
    "data.per_sample_no_token_files": Case(
        lambda tmp: (_mkdirs(tmp, "tokens", "latents"), build_dataset(per_sample_config(tmp), "train")), DataError,
        lambda tmp: f"{tmp / 'tokens'} holds no token files (<name>.npz or <name>_tokens.npz); point data.path or "
                    "data.token_dir at the folder of the older data's token files."),
    "data.per_sample_latent_missing": Case(
        lambda tmp: (_lat(per_sample(tmp)).unlink(), build_dataset(per_sample_config(tmp), "train")), DataError,
        lambda tmp: f"{_tok(tmp)} has no latent: {_lat(tmp)} does not exist. Add the latents, or remove the token "
                    "files."),
    "data.per_sample_two_token_files": Case(
        lambda tmp: (write_sample(per_sample(tmp), "s3", *good_sample(3), suffix="_tokens"),
                     build_dataset(per_sample_config(tmp), "train")), DataError,
        lambda tmp: f"{_tok(tmp)} and {_tok(tmp, 's3_tokens')} are both token files of sample 's3'; remove one."),
    "data.per_sample_split_folder_missing": Case(
        lambda tmp: (_split_folders(tmp, ("train",), ("train",)),
                     build_dataset(per_sample_config(tmp), "validation")), DataError,
        lambda tmp: f"{tmp / 'tokens' / 'validation'} does not exist: the per-sample data is split by its "
                    f"{tmp / 'tokens' / 'train'} folder, so the validation split needs validation/ in the token and "
                    "the latent folder. Add them, or set training.eval_every: 0."),
    "data.per_sample_latent_split_missing": Case(
        lambda tmp: (_split_folders(tmp, ("train", "validation"), ("train",)),
                     build_dataset(per_sample_config(tmp), "train")), DataError,
        lambda tmp: f"{tmp / 'latents' / 'validation'} is missing: {tmp / 'tokens' / 'validation'} holds the "
                    f"validation token files, and their latents belong in {tmp / 'latents' / 'validation'}/"
                    "<name>.npy."),
    "data.per_sample_split_empty": Case(
        lambda tmp: build_dataset(per_sample_config(per_sample(tmp)), "validation"), DataError,
        lambda tmp: f"the validation split of {tmp / 'tokens'} is empty (6 samples in all, data.val_fraction=0.0); "
                    "add samples or change data.val_fraction."),
    # ---- the per-sample layout, as each sample is read
    "data.sample_unreadable": Case(
        _broken_sample(lambda r: _tok(r).write_bytes(b"PK\x03\x04 truncated")), BadSample,
        lambda tmp: f"cannot read sample {_tok(tmp)} + {_lat(tmp)}: File is not a zip file." + SKIP_HINT),
    "data.sample_length": Case(
        _broken_sample(lambda r: write_sample(r, "s3", [1] * 5, [True] * 5, [0.0] * DIM)), BadSample,
        lambda tmp: f"{_tok(tmp)}: input_ids (5,) / attention_mask (5,), expected (4,) from model.max_seq_len: "
                    "every sample must have this length." + SKIP_HINT),
    "data.sample_token_dtype": Case(
        _broken_sample(lambda r: write_sample(r, "s3", [1.0] * SEQ_LEN, [True] * SEQ_LEN, [0.0] * DIM)), BadSample,
        lambda tmp: f"{_tok(tmp)}: input_ids are float64, expected integer token ids." + SKIP_HINT),
    "data.sample_token_id": Case(
        _broken_sample(lambda r: write_sample(r, "s3", [1, 2, 10, 0], [True] * SEQ_LEN, [0.0] * DIM)), BadSample,
        lambda tmp: f"{_tok(tmp)}: token id 10 outside the vocabulary [0, 10) of model.vocab_size; the data was "
                    "tokenized with another tokenizer." + SKIP_HINT),
    "data.sample_latent_shape": Case(
        _broken_sample(lambda r: write_sample(r, "s3", *good_sample(3)[:2], [0.0] * 5)), BadSample,
        lambda tmp: f"{_lat(tmp)}: latent shape (5,), expected (3,), (1, 3) or (N, 3) from model.latent_dim."
                    + SKIP_HINT),
    "data.sample_latent_dtype": Case(
        _broken_sample(lambda r: write_sample(r, "s3", *good_sample(3), latent_dtype=np.int64)), BadSample,
        lambda tmp: f"{_lat(tmp)}: latent is int64, expected floating-point values." + SKIP_HINT),
    "data.sample_latent_nonfinite": Case(
        _broken_sample(lambda r: write_sample(r, "s3", *good_sample(3)[:2], [np.nan, 1.0, np.inf])), BadSample,
        lambda tmp: f"{_lat(tmp)}: latent holds NaN or Inf (2 of its 3 values)." + SKIP_HINT),
    # ---- the packed dataset, when it is built
    "data.packed_no_metadata": Case(
        lambda tmp: build_dataset(packed_config(tmp), "train"), DataError,
        lambda tmp: f"{tmp / 'metadata.json'} does not exist: {tmp} holds no prepared dataset. Prepare one with "
                    f"`python -m lgdlm_ds.prepare --out {tmp}`, or set data.corpus to prepare it on first use."),
    "data.packed_metadata_unreadable": Case(
        _broken_packed(lambda p: (p / "metadata.json").write_text("{")), DataError,
        lambda tmp: f"cannot read {tmp / 'packed' / 'metadata.json'} (Expecting property name enclosed in double "
                    "quotes: line 1 column 2 (char 1)); prepare the data again into an empty data.path."),
    "data.packed_format": Case(
        _broken_packed(lambda p: _edit_metadata(p, format="lgdlm-packed-0")), DataError,
        lambda tmp: f"{tmp / 'packed' / 'metadata.json'} is format 'lgdlm-packed-0', expected 'lgdlm-packed-1'; "
                    "prepare the data again with this version."),
    "data.packed_recipe_mismatch": Case(
        _broken_packed(lambda p: None, "model.latent_dim=4"), DataError,
        lambda tmp: f"the dataset at {tmp / 'packed'} was prepared with the encoder's latent size 3, but "
                    "model.latent_dim is 4. Set model.latent_dim: 3 in the recipe, or prepare the data again into "
                    "another data.path for 4."),
    "data.packed_split_empty": Case(
        _broken_packed(lambda p: None, split="validation"), DataError,
        lambda tmp: f"the validation split of {tmp / 'packed'} is empty (6 samples in all, val_fraction 0.0); "
                    "prepare it from a larger corpus or with another data.val_fraction."),
    "data.packed_shard_file_missing": Case(
        _broken_packed(lambda p: shard_file(p, "latents.npy").unlink()), DataError,
        lambda tmp: f"{_shard(tmp, 'latents.npy')} is missing, but metadata.json lists its shard; {DAMAGED}"),
    "data.packed_shard_not_npy": Case(
        _broken_packed(lambda p: shard_file(p, "latents.npy").write_bytes(b"plain text, not an array")), DataError,
        lambda tmp: f"{_shard(tmp, 'latents.npy')} is not a readable .npy file (the magic string is not correct; "
                    f"expected b'\\x93NUMPY', got b'plain '); {DAMAGED}"),
    "data.packed_shard_truncated": Case(
        _broken_packed(lambda p: _truncate(shard_file(p, "latents.npy"), 4)), DataError,
        lambda tmp: f"{_shard(tmp, 'latents.npy')} is truncated: its header says float32 (4, 3), 176 bytes, but "
                    f"the file holds 172; {DAMAGED}"),
    "data.packed_shard_rows": Case(
        _broken_packed(lambda p: np.save(shard_file(p, "latents.npy"), np.zeros((3, DIM), np.float32))), DataError,
        lambda tmp: f"{_shard(tmp, 'latents.npy')}: float32 (3, 3), metadata.json says float32 (4, 3); {DAMAGED}"),
    "data.packed_shard_dtype": Case(
        _broken_packed(lambda p: np.save(shard_file(p, "latents.npy"), np.zeros((4, DIM)))), DataError,
        lambda tmp: f"{_shard(tmp, 'latents.npy')}: float64 (4, 3), metadata.json says float32 (4, 3); {DAMAGED}"),
    "data.packed_length": Case(
        _broken_packed(lambda p: _set_row(p, "lengths.npy", 1, 9)), DataError,
        lambda tmp: f"{_shard(tmp, 'lengths.npy')}: row 1 has length 9, outside [0, 4] (seq_len in metadata.json); "
                    f"{DAMAGED}"),
    "data.packed_latent_stats_nonfinite": Case(
        _broken_packed(lambda p: _edit_metadata(p, latent_mean=[float("nan"), 0.0, 0.0]),
                       "data.standardize_latents=true"), DataError,
        lambda tmp: f"{tmp / 'packed' / 'metadata.json'}: latent_mean or latent_std holds NaN or Inf (a latent was "
                    "when the data was prepared), so data.standardize_latents would make every latent NaN. Prepare "
                    "the data again from finite latents, or set data.standardize_latents: false (the bad samples are "
                    "then found as they are read)."),
    # ---- the packed dataset, as each sample is read
    "data.packed_token_id": Case(
        _broken_packed(lambda p: _set_row(p, "input_ids.npy", 1, [1, 12, 0, 0])), BadSample,
        lambda tmp: f"{_shard(tmp, 'input_ids.npy')}: row 1 has token id 12, outside the vocabulary [0, 10) of "
                    "metadata.json." + SKIP_HINT),
    "data.packed_latent_nonfinite": Case(
        _broken_packed(lambda p: _set_row(p, "latents.npy", 1, [np.nan, 0.0, 0.0])), BadSample,
        lambda tmp: f"{_shard(tmp, 'latents.npy')}: row 1 holds NaN or Inf (1 of its 3 values)." + SKIP_HINT),
    # ---- any dataset
    "data.index_outside": Case(
        lambda tmp: build_dataset(per_sample_config(per_sample(tmp)), "train")[6], IndexError,
        lambda tmp: f"sample 6 is outside the train split of {tmp / 'tokens'} (6 samples)."),
    "data.every_sample_bad": Case(
        lambda tmp: (write_sample(tmp, "s0", *good_sample(0)[:2], [np.nan] * DIM),
                     build_dataset(per_sample_config(tmp, "data.on_bad_sample=skip"), "train")), DataError,
        lambda tmp: f"every sample of the train split of {tmp / 'tokens'} is bad, so data.on_bad_sample: skip has "
                    "none to train on; see the warnings above."),
    "data.on_bad_sample_value": Case(
        lambda tmp: load_config(None, ["data.on_bad_sample=ignore"]), ConfigError,
        lambda tmp: "config key 'data.on_bad_sample': 'ignore' is not one of error, skip."),
}
