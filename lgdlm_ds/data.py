"""Datasets. Every sample is a dict: ``input_ids`` [S] long, ``attention_mask`` [S] bool,
``latent`` [D] float32; batches stack them to [B, S] / [B, D].

- ``SyntheticDataset``: random sentences of real shape whose latent is a fixed function of their
  tokens (so L2T and T2L have something to learn); deterministic by (seed, split, index).
- ``PerSampleDataset``: the older layout, ``tokens/<name>.npz`` (input_ids, attention_mask) +
  ``latents/<name>.npy`` (float32 [D]). Every file is listed (no scan limit), train and validation
  are split by a hash of the name (disjoint, stable when files are added), and a bad sample is an
  error naming its file, never a silent zero sample.
"""
from __future__ import annotations

import zlib
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset

from .config import Config

SPLITS = ("train", "validation")


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


def build_dataset(cfg: Config, split: str) -> Dataset:
    if cfg.data.kind == "synthetic":
        return SyntheticDataset(cfg, split)
    m = cfg.model
    return PerSampleDataset(cfg.data.path, split, cfg.data.val_fraction, m.max_seq_len, m.latent_dim, m.vocab_size)
