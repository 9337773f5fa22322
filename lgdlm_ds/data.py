"""Datasets. Every sample is a dict: ``input_ids`` [S] long, ``attention_mask`` [S] bool,
``latent`` [D] float32; batches stack them to [B, S] / [B, D].

- ``SyntheticDataset``: random sentences of real shape whose latent is a fixed function of their
  tokens (so L2T and T2L have something to learn); deterministic by (seed, split, index).
- ``PerSampleDataset``: the older layout, ``tokens/<name>.npz`` (input_ids, attention_mask) +
  ``latents/<name>.npy`` (float32 [D]). Every file is listed (no scan limit), train and validation
  are split by a hash of the name (disjoint, stable when files are added), and a bad sample is an
  error naming its file, never a silent zero sample.
- ``PackedDataset``: shards written by ``python -m lgdlm_ds.prepare``, memory-mapped, for millions
  of samples. ``<root>/metadata.json`` records how the data was made (tokenizer, encoder, sequence
  length, latent size, special ids, per-dimension latent mean/std) and lists the shards of each
  split; each shard directory ``<split>-NNNNN/`` holds ``input_ids.npy`` [N, S] (padded),
  ``lengths.npy`` [N] (real tokens per row), ``latents.npy`` [N, D] float32, ``sentences.txt`` (the
  source sentences, one per line) and ``shard.json``. A shard directory appears by an atomic rename
  once complete and is never rewritten; metadata.json is written last.
"""
from __future__ import annotations

import json
import zlib
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset

from .config import Config

SPLITS = ("train", "validation")
PACKED_FORMAT = "lgdlm-packed-1"
METADATA_FILE = "metadata.json"
TOKENS_FILE, LENGTHS_FILE, LATENTS_FILE = "input_ids.npy", "lengths.npy", "latents.npy"
SENTENCES_FILE, SHARD_FILE = "sentences.txt", "shard.json"


class DataError(ValueError):
    """A dataset that cannot be read as configured; the message names the file and the fix."""


def is_validation(name: str, val_fraction: float) -> bool:
    return zlib.crc32(name.encode()) % 1_000_000 < val_fraction * 1_000_000


class SyntheticDataset(Dataset):
    def __init__(self, cfg: Config, split: str):
        if split not in SPLITS:
            raise ValueError(f"split must be one of {SPLITS}, got '{split}'.")
        m, d = cfg.model, cfg.data
        self.seq_len, self.vocab = m.max_seq_len, m.vocab_size
        self.specials = sorted({d.pad_token_id, d.mask_token_id})
        self.pad = d.pad_token_id
        self.seed = cfg.training.seed
        n_val = max(1, round(d.num_samples * d.val_fraction))
        # Validation indices follow the training ones: the two splits never share a sample.
        self.offset, self.length = (0, d.num_samples) if split == "train" else (d.num_samples, n_val)
        g = torch.Generator().manual_seed(self.seed)
        self.token_latents = torch.randn(m.vocab_size, m.latent_dim, generator=g)

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        if not 0 <= i < self.length:
            raise IndexError(i)
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + self.offset + i + 1)
        n = int(torch.randint(max(1, self.seq_len // 4), self.seq_len + 1, (1,), generator=g))
        ids = torch.randint(0, self.vocab - len(self.specials), (n,), generator=g)
        for s in self.specials:  # shift past the special ids so none is ever drawn
            ids += (ids >= s).long()
        z = self.token_latents[ids].mean(0)
        input_ids = torch.full((self.seq_len,), self.pad, dtype=torch.long)
        input_ids[:n] = ids
        mask = torch.zeros(self.seq_len, dtype=torch.bool)
        mask[:n] = True
        return {"input_ids": input_ids, "attention_mask": mask,
                "latent": z / z.norm() * z.numel() ** 0.5}  # unit variance per dimension


class PerSampleDataset(Dataset):
    def __init__(self, root: str | Path, split: str, val_fraction: float, seq_len: int, latent_dim: int,
                 vocab_size: int):
        if split not in SPLITS:
            raise ValueError(f"split must be one of {SPLITS}, got '{split}'.")
        self.root = Path(root)
        self.seq_len, self.latent_dim, self.vocab_size = seq_len, latent_dim, vocab_size
        tok_dir, lat_dir = self.root / "tokens", self.root / "latents"
        for d in (tok_dir, lat_dir):
            if not d.is_dir():
                raise DataError(f"{d} is missing: a per_sample dataset holds tokens/<name>.npz and "
                                "latents/<name>.npy (set data.path to its root).")
        tokens = {p.stem for p in tok_dir.glob("*.npz")}
        latents = {p.stem for p in lat_dir.glob("*.npy")}
        for name in sorted(tokens ^ latents):
            have, missing = ((tok_dir / f"{name}.npz", lat_dir / f"{name}.npy") if name in tokens
                             else (lat_dir / f"{name}.npy", tok_dir / f"{name}.npz"))
            raise DataError(f"{have} has no partner: {missing} does not exist. Add it or remove {have}.")
        want_val = split == "validation"
        self.names = sorted(n for n in tokens if is_validation(n, val_fraction) == want_val)
        if not self.names:
            raise DataError(f"the {split} split of {self.root} is empty ({len(tokens)} samples in all, "
                            f"data.val_fraction={val_fraction}); add samples or change data.val_fraction.")
        self[0]  # fail on a malformed dataset now, not hours into training

    def __len__(self) -> int:
        return len(self.names)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        name = self.names[i]
        tok_path, lat_path = self.root / "tokens" / f"{name}.npz", self.root / "latents" / f"{name}.npy"
        try:
            with np.load(tok_path) as f:
                ids, mask = f["input_ids"], f["attention_mask"]
            latent = np.load(lat_path)
        except (OSError, ValueError, KeyError) as e:
            raise DataError(f"cannot read sample '{name}' ({tok_path}, {lat_path}): {e}") from e
        if ids.shape != (self.seq_len,) or mask.shape != (self.seq_len,):
            raise DataError(f"{tok_path}: input_ids {ids.shape} / attention_mask {mask.shape}, expected "
                            f"({self.seq_len},) from model.max_seq_len; set model.max_seq_len to the "
                            "data's length or re-tokenize.")
        if latent.shape != (self.latent_dim,):
            raise DataError(f"{lat_path}: latent shape {latent.shape}, expected ({self.latent_dim},) from "
                            "model.latent_dim.")
        if ids.size and (ids.max() >= self.vocab_size or ids.min() < 0):
            raise DataError(f"{tok_path}: token id {int(ids.max() if ids.max() >= self.vocab_size else ids.min())} "
                            f"outside the vocabulary [0, {self.vocab_size}) of model.vocab_size; the data "
                            "was tokenized with another tokenizer.")
        return {"input_ids": torch.from_numpy(ids.astype(np.int64)),
                "attention_mask": torch.from_numpy(mask.astype(bool)),
                "latent": torch.from_numpy(latent.astype(np.float32))}


def read_metadata(root: str | Path) -> dict:
    """The metadata.json of a packed dataset; an error says how to make one when it is missing."""
    path = Path(root).expanduser() / METADATA_FILE
    if not path.is_file():
        raise DataError(f"{path} does not exist: {root} holds no prepared dataset. Prepare one with "
                        f"`python -m lgdlm_ds.prepare --out {root}`, or set data.corpus to prepare it "
                        "on first use.")
    try:
        meta = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise DataError(f"cannot read {path}: {e}") from e
    if meta.get("format") != PACKED_FORMAT:
        raise DataError(f"{path} is format {meta.get('format')!r}, expected {PACKED_FORMAT!r}; prepare "
                        "the data again with this version.")
    return meta


def check_metadata(meta: dict, cfg: Config, root: str | Path) -> None:
    """Refuse a recipe that does not fit how the data was prepared, naming both values and the key.

    ``meta`` may be the full metadata.json or, during preparation, the header known as soon as the
    tokenizer and encoder are loaded, before any sentence is encoded."""
    m, d = cfg.model, cfg.data
    pairs = [("model.vocab_size", m.vocab_size, "vocab_size", "the tokenizer's vocabulary size"),
             ("model.max_seq_len", m.max_seq_len, "seq_len", "the sequence length"),
             ("model.latent_dim", m.latent_dim, "latent_dim", "the encoder's latent size"),
             ("data.mask_token_id", d.mask_token_id, "mask_token_id", "the tokenizer's mask id"),
             ("data.pad_token_id", d.pad_token_id, "pad_token_id", "the tokenizer's pad id"),
             ("data.val_fraction", d.val_fraction, "val_fraction", "the validation fraction")]
    if d.corpus:  # the recipe says what to prepare from: the data there must come from it
        pairs += [("data.corpus", d.corpus, "corpus", "the corpus"),
                  ("data.tokenizer", d.tokenizer, "tokenizer", "the tokenizer"),
                  ("data.encoder", d.encoder, "encoder", "the encoder")]
    for key, want, field, what in pairs:
        if meta[field] != want:
            raise DataError(f"the dataset at {root} was prepared with {what} {meta[field]!r}, but "
                            f"{key} is {want!r}. Set {key}: {meta[field]!r} in the recipe, or prepare "
                            f"the data again into another data.path for {want!r}.")


class PackedDataset(Dataset):
    """One split of a packed dataset. Shards are memory-mapped on first use in each process, so
    DataLoader workers share the page cache and a pickled dataset carries no array data."""

    def __init__(self, root: str | Path, split: str, standardize_latents: bool = False):
        if split not in SPLITS:
            raise ValueError(f"split must be one of {SPLITS}, got '{split}'.")
        self.root = Path(root).expanduser()
        meta = read_metadata(self.root)
        self.seq_len, self.latent_dim = meta["seq_len"], meta["latent_dim"]
        shards = meta["splits"][split]["shards"]
        self.shard_names = [s["name"] for s in shards]
        self.ends = np.cumsum([s["num_samples"] for s in shards], dtype=np.int64)
        if not len(self):
            total = sum(meta["splits"][s]["num_samples"] for s in SPLITS)
            raise DataError(f"the {split} split of {self.root} is empty ({total} samples in all, "
                            f"val_fraction {meta['val_fraction']}); prepare it from a larger corpus or "
                            "with another data.val_fraction.")
        self.mean = self.std = None
        if standardize_latents:
            self.mean = np.asarray(meta["latent_mean"], dtype=np.float32)
            # A near-constant dimension (all-MiniLM-L6-v2 has three) stays near zero instead of
            # being blown up by a vanishing std.
            self.std = np.maximum(np.asarray(meta["latent_std"], dtype=np.float32), 1e-6)
        self._open: dict[int, tuple[np.ndarray, np.ndarray, np.ndarray]] = {}
        for k, s in enumerate(shards):  # fail on a damaged dataset now, not hours into training
            self._check_shard(k, s["num_samples"], np.dtype(meta["token_dtype"]))
        self._open.clear()

    def _check_shard(self, k: int, n: int, token_dtype: np.dtype) -> None:
        ids, lengths, latents = self._arrays(k)
        for arr, shape, dtype, name in ((ids, (n, self.seq_len), token_dtype, TOKENS_FILE),
                                        (lengths, (n,), np.int32, LENGTHS_FILE),
                                        (latents, (n, self.latent_dim), np.float32, LATENTS_FILE)):
            if arr.shape != shape or arr.dtype != dtype:
                raise DataError(f"{self.root / self.shard_names[k] / name}: {arr.dtype} {arr.shape}, "
                                f"metadata.json says {np.dtype(dtype)} {shape}; the shard is damaged, "
                                "prepare the data again.")

    def _arrays(self, k: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        if k not in self._open:
            d = self.root / self.shard_names[k]
            try:
                self._open[k] = tuple(np.load(d / f, mmap_mode="r")
                                      for f in (TOKENS_FILE, LENGTHS_FILE, LATENTS_FILE))
            except (OSError, ValueError) as e:
                raise DataError(f"cannot read shard {d}: {e}; prepare the data again.") from e
        return self._open[k]

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_open": {}}

    def __len__(self) -> int:
        return int(self.ends[-1]) if len(self.ends) else 0

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        if not 0 <= i < len(self):
            raise IndexError(i)
        k = int(np.searchsorted(self.ends, i, side="right"))
        j = i - (int(self.ends[k - 1]) if k else 0)
        ids, lengths, latents = self._arrays(k)
        latent = np.array(latents[j], dtype=np.float32)
        if self.mean is not None:
            latent = (latent - self.mean) / self.std
        return {"input_ids": torch.from_numpy(ids[j].astype(np.int64)),
                "attention_mask": torch.arange(self.seq_len) < int(lengths[j]),
                "latent": torch.from_numpy(latent)}


def build_dataset(cfg: Config, split: str) -> Dataset:
    d, m = cfg.data, cfg.model
    if d.kind == "synthetic":
        return SyntheticDataset(cfg, split)
    if d.kind == "per_sample":
        return PerSampleDataset(d.path, split, d.val_fraction, m.max_seq_len, m.latent_dim, m.vocab_size)
    if d.corpus and not (Path(d.path).expanduser() / METADATA_FILE).is_file():
        from .prepare import ensure_dataset  # the tokenizer and encoder stack, imported only to prepare
        ensure_dataset(cfg)
    check_metadata(read_metadata(d.path), cfg, d.path)
    return PackedDataset(d.path, split, d.standardize_latents)
