"""Datasets. Every sample is a dict: ``input_ids`` [S] long, ``attention_mask`` [S] bool,
``latent`` [D] float32, ``bad_samples`` [] long (see Checks); batches stack them to [B, S] / [B, D] / [B].

- ``SyntheticDataset``: random sentences of real shape whose latent is a fixed function of their
  tokens (so L2T and T2L have something to learn); deterministic by (seed, split, index).
- ``PerSampleDataset``: the older layout, a token folder of ``<name>.npz`` or ``<name>_tokens.npz``
  (input_ids, attention_mask) beside a latent folder of ``<name>.npy`` (float32 [D], [1, D] or
  [N, D]: the first row, as the older reader took it), either holding the files directly or in
  ``train/`` and ``validation/`` subfolders. Every token file with a latent is used (no scan limit);
  latents without a token file are counted and left out (the older data has many); a token file
  without its latent, or a bad sample, is an error naming the file, never a silent zero sample.
  Split folders are the split; without them train and validation are split by a hash of the sample
  name (disjoint, stable when files are added). Listing millions of files takes minutes, so a run
  keeps the listing in ``<run_dir>/data_index/`` and lists again only when a folder changed.
- ``PackedDataset``: shards written by ``python -m lgdlm_ds.prepare``, memory-mapped, for millions
  of samples. ``<root>/metadata.json`` records how the data was made (tokenizer, encoder, sequence
  length, latent size, special ids, per-dimension latent mean/std) and lists the shards of each
  split; each shard directory ``<split>-NNNNN/`` holds ``input_ids.npy`` [N, S] (padded),
  ``lengths.npy`` [N] (real tokens per row), ``latents.npy`` [N, D] float32, the source of each row
  (``sentences.txt``: its sentence, one per line; converted from the per-sample layout,
  ``samples.txt``: its token file) and ``shard.json``. A shard directory appears by an atomic rename
  once complete and is never rewritten; metadata.json is written last.

Checks. What is cheap is checked when a dataset is built, before training: folders, token files
with their latents, metadata.json, the header of every shard file (present, not truncated, dtype
and rows as metadata.json says) and the shards' lengths. What needs every sample read is checked as
it is read: an unreadable sample file, a per-sample file's shape and dtype, token ids outside the
vocabulary, a NaN or Inf latent. Such a bad sample (``BadSample``) stops the run naming the file
(``data.on_bad_sample: error``), or (``skip``) is replaced by the next good sample of the split,
the same one on every rank and after a resume, with a warning on stderr. A sample's
``bad_samples`` counts the bad ones passed over to reach it; batches carry it out of the DataLoader
workers, and the training log sums it.
"""
from __future__ import annotations

import hashlib
import json
import math
import os
import sys
import time
import zipfile
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset

from .config import Config, DataConfig
from .fileio import write_atomic
from .seeding import derive_seed

SPLITS = ("train", "validation")
PACKED_FORMAT = "lgdlm-packed-1"
METADATA_FILE = "metadata.json"
TOKENS_FILE, LENGTHS_FILE, LATENTS_FILE = "input_ids.npy", "lengths.npy", "latents.npy"
SENTENCES_FILE, SAMPLES_FILE, SHARD_FILE = "sentences.txt", "samples.txt", "shard.json"


class DataError(ValueError):
    """A dataset that cannot be read as configured; the message names the file and the fix."""


class BadSample(DataError):
    """One sample that fails the checks made as it is read; ``data.on_bad_sample`` decides whether
    it stops the run."""


def is_validation(name: str, val_fraction: float) -> bool:
    return zlib.crc32(name.encode()) % 1_000_000 < val_fraction * 1_000_000


class CheckedDataset(Dataset):
    """A split whose samples come from ``read(i)``, which raises BadSample for a bad one; this
    class applies ``on_bad_sample`` (see Checks in the module docstring). Subclasses set ``split``,
    ``source`` (what the messages call the data) and ``on_bad_sample``."""
    split: str
    source: str
    on_bad_sample: str

    def read(self, i: int) -> dict[str, torch.Tensor]:
        raise NotImplementedError

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        n = len(self)
        if not 0 <= i < n:
            raise IndexError(f"sample {i} is outside the {self.split} split of {self.source} ({n} samples).")
        for skipped in range(n):
            j = (i + skipped) % n  # the next good sample: depends on the data alone, not on rank or time
            try:
                sample = self.read(j)
            except BadSample as e:
                if self.on_bad_sample == "error":
                    raise BadSample(f"{e} Set data.on_bad_sample: skip to train on the next good sample "
                                    "instead.") from e
                _log(f"skipping sample {j} of the {self.split} split (data.on_bad_sample: skip): {e}")
                continue
            return {**sample, "bad_samples": torch.tensor(skipped)}
        raise DataError(f"every sample of the {self.split} split of {self.source} is bad, so "
                        "data.on_bad_sample: skip has none to train on; see the warnings above.")


class SyntheticDataset(CheckedDataset):
    def __init__(self, cfg: Config, split: str):
        if split not in SPLITS:
            raise ValueError(f"split must be one of {SPLITS}, got '{split}'.")
        m, d = cfg.model, cfg.data
        self.split, self.source, self.on_bad_sample = split, "the synthetic data", d.on_bad_sample
        self.seq_len, self.vocab = m.max_seq_len, m.vocab_size
        self.specials = sorted({d.pad_token_id, d.mask_token_id})
        self.pad = d.pad_token_id
        self.seed = cfg.training.seed
        n_val = max(1, round(d.num_samples * d.val_fraction))
        # Validation indices follow the training ones: the two splits never share a sample.
        self.offset, self.length = (0, d.num_samples) if split == "train" else (d.num_samples, n_val)
        g = torch.Generator().manual_seed(derive_seed(self.seed, "synthetic", "token_latents"))
        self.token_latents = torch.randn(m.vocab_size, m.latent_dim, generator=g)

    def __len__(self) -> int:
        return self.length

    def _draw_length(self, i: int) -> tuple[torch.Generator, int]:
        """Sample i's generator and its length, the generator's first draw."""
        g = torch.Generator().manual_seed(derive_seed(self.seed, "synthetic", self.offset + i))
        return g, int(torch.randint(max(1, self.seq_len // 4), self.seq_len + 1, (1,), generator=g))

    def sample_lengths(self) -> torch.Tensor:
        """Real tokens of every sample [N] long, without drawing their tokens."""
        return torch.tensor([self._draw_length(i)[1] for i in range(len(self))])

    def read(self, i: int) -> dict[str, torch.Tensor]:
        g, n = self._draw_length(i)
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


TOKENS_SUFFIX = "_tokens"  # tokens/<name>_tokens.npz is the token file of <name>, as tokens/<name>.npz is
INDEX_DIR, INDEX_FORMAT = "data_index", "lgdlm-per-sample-index-1"
_MODEL_KEYS = ("model.max_seq_len", "model.latent_dim", "model.vocab_size")  # what a sample must fit


def _log(message: str) -> None:
    print(f"data: {message}", file=sys.stderr, flush=True)


def per_sample_dirs(d: DataConfig) -> tuple[Path, Path]:
    """The token and latent folders of a per_sample recipe: data.path's tokens/ and latents/, or
    data.token_dir and data.latent_dir."""
    if d.path:
        root = Path(d.path).expanduser()
        return root / "tokens", root / "latents"
    return Path(d.token_dir).expanduser(), Path(d.latent_dir).expanduser()


def sample_name(token_file: str) -> str:
    return token_file.removesuffix(".npz").removesuffix(TOKENS_SUFFIX)


def load_per_sample(tok_path: Path, lat_path: Path) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """input_ids, attention_mask and latent of one sample, as stored."""
    try:
        with np.load(tok_path) as f:
            ids, mask = f["input_ids"], f["attention_mask"]
        latent = np.load(lat_path)
    except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile) as e:
        raise BadSample(f"cannot read sample {tok_path} + {lat_path}: {str(e).rstrip('.')}.") from e
    return ids, mask, latent


def read_per_sample(tok_path: Path, lat_path: Path, seq_len: int, latent_dim: int, vocab_size: int,
                    sources: tuple[str, str, str] = _MODEL_KEYS) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """One checked sample: input_ids [S] int64, attention_mask [S] bool, latent [D] float32; BadSample
    when it is not. ``sources`` say where the expected sequence length, latent size and vocabulary
    size come from."""
    ids, mask, latent = load_per_sample(tok_path, lat_path)
    if ids.shape != (seq_len,) or mask.shape != (seq_len,):
        raise BadSample(f"{tok_path}: input_ids {ids.shape} / attention_mask {mask.shape}, expected ({seq_len},) "
                        f"from {sources[0]}: every sample must have this length.")
    if not np.issubdtype(ids.dtype, np.integer):
        raise BadSample(f"{tok_path}: input_ids are {ids.dtype}, expected integer token ids.")
    if ids.size and (ids.max() >= vocab_size or ids.min() < 0):
        bad = int(ids.max() if ids.max() >= vocab_size else ids.min())
        raise BadSample(f"{tok_path}: token id {bad} outside the vocabulary [0, {vocab_size}) of {sources[2]}; "
                        "the data was tokenized with another tokenizer.")
    row = latent[0] if latent.ndim == 2 and len(latent) else latent  # [1, D] or [N, D]: the first row
    if row.shape != (latent_dim,):
        raise BadSample(f"{lat_path}: latent shape {latent.shape}, expected ({latent_dim},), (1, {latent_dim}) "
                        f"or (N, {latent_dim}) from {sources[1]}.")
    if not np.issubdtype(row.dtype, np.floating):
        raise BadSample(f"{lat_path}: latent is {row.dtype}, expected floating-point values.")
    row = row.astype(np.float32)  # float64 beyond float32's range becomes Inf here, and is caught
    if not np.isfinite(row).all():
        raise BadSample(f"{lat_path}: latent holds NaN or Inf ({int((~np.isfinite(row)).sum())} of its "
                        f"{latent_dim} values).")
    return ids.astype(np.int64), mask.astype(bool), row


@dataclass
class PerSampleListing:
    """The samples of a per-sample layout. ``groups`` maps each folder level to its token file names
    that have a latent, sorted: "" when the two folders hold the files directly, else "train" and
    "validation" (tokens/<split>/ beside latents/<split>/)."""
    token_dir: Path
    latent_dir: Path
    groups: dict[str, list[str]]
    latent_files: int
    orphan_latents: int
    """Latent files without a token file: not used."""
    orphan_examples: list[str]
    signature: list[list]
    """[folder, st_mtime_ns, st_ino] of every folder listed, taken before listing."""

    def to_json(self) -> dict:
        return {"format": INDEX_FORMAT, "token_dir": str(self.token_dir), "latent_dir": str(self.latent_dir),
                "signature": self.signature, "latent_files": self.latent_files,
                "orphan_latents": self.orphan_latents, "orphan_examples": self.orphan_examples,
                "samples": {g: len(f) for g, f in self.groups.items()}, "groups": self.groups}

    @classmethod
    def from_json(cls, d: dict) -> "PerSampleListing":
        return cls(Path(d["token_dir"]), Path(d["latent_dir"]), d["groups"], d["latent_files"],
                   d["orphan_latents"], d["orphan_examples"], d["signature"])


def per_sample_levels(token_dir: Path, latent_dir: Path) -> list[str]:
    """The folder levels of the layout (see PerSampleListing.groups), checked to exist."""
    for d in (token_dir, latent_dir):
        if not d.is_dir():
            raise DataError(f"{d} is missing: a per_sample dataset is a token folder of <name>.npz (or "
                            "<name>_tokens.npz) files beside a latent folder of <name>.npy files, optionally "
                            "in train/ and validation/ subfolders. Set data.path to the root holding tokens/ "
                            "and latents/, or data.token_dir and data.latent_dir to the two folders.")
    if not (token_dir / "train").is_dir():
        return [""]
    levels = [s for s in SPLITS if (token_dir / s).is_dir()]
    for s in levels:
        if not (latent_dir / s).is_dir():
            raise DataError(f"{latent_dir / s} is missing: {token_dir / s} holds the {s} token files, and "
                            f"their latents belong in {latent_dir / s}/<name>.npy.")
    return levels


def _signature(token_dir: Path, latent_dir: Path, levels: list[str]) -> list[list]:
    # Adding, removing or renaming a file changes its folder's mtime; a folder replaced by another
    # (a copy renamed into place) changes the inode.
    folders = sorted({token_dir, latent_dir, *(token_dir / g for g in levels), *(latent_dir / g for g in levels)})
    return [[str(p), st.st_mtime_ns, st.st_ino] for p in folders for st in [p.stat()]]


def _token_files(folder: Path) -> dict[str, str]:
    files: dict[str, str] = {}
    with os.scandir(folder) as entries:  # no stat per file: millions of entries list in seconds
        for e in entries:
            if e.name.endswith(".npz"):
                name = sample_name(e.name)
                if name in files:
                    first, second = sorted((files[name], e.name))
                    raise DataError(f"{folder / first} and {folder / second} are both token files of "
                                    f"sample '{name}'; remove one.")
                files[name] = e.name
    return files


def list_per_sample(token_dir: Path, latent_dir: Path) -> PerSampleListing:
    """List both folders once. A latent without a token file is counted and reported; a token file
    without its latent is an error naming it."""
    start = time.perf_counter()
    levels = per_sample_levels(token_dir, latent_dir)
    signature = _signature(token_dir, latent_dir, levels)  # before listing: a change meanwhile shows next time
    tokens = {g: _token_files(token_dir / g) for g in levels}
    if not any(tokens.values()):
        where = " or ".join(str(token_dir / g) for g in levels)
        raise DataError(f"{where} holds no token files (<name>.npz or <name>_tokens.npz); point data.path or "
                        "data.token_dir at the folder of the older data's token files.")
    groups, latent_files, orphans, examples = {}, 0, 0, []
    for g in levels:
        unpaired, lat_dir, paired = tokens[g], latent_dir / g, []
        with os.scandir(lat_dir) as entries:
            for e in entries:
                if e.name.endswith(".npy"):
                    latent_files += 1
                    token_file = unpaired.pop(e.name[:-len(".npy")], None)
                    if token_file is not None:
                        paired.append(token_file)
                    else:
                        orphans += 1
                        if len(examples) < 3:
                            examples.append(str(lat_dir / e.name))
        if unpaired:
            first = min(unpaired)
            more = f" ({len(unpaired)} token files in {token_dir / g} lack their latent)" if len(unpaired) > 1 else ""
            raise DataError(f"{token_dir / g / unpaired[first]} has no latent: {lat_dir / first}.npy does not "
                            f"exist{more}. Add the latents, or remove the token files.")
        groups[g] = sorted(paired)
    listing = PerSampleListing(token_dir, latent_dir, groups, latent_files, orphans, examples, signature)
    _log(f"{token_dir}: {sum(map(len, groups.values()))} samples with their latent in {latent_dir}, "
         f"listed in {time.perf_counter() - start:.1f}s")
    if orphans:
        _log(f"{orphans} of the {latent_files} latent files in {latent_dir} have no token file and are not "
             f"used, e.g. {', '.join(examples)}")
    return listing


def _rank() -> int:
    dist = torch.distributed
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def per_sample_listing(token_dir: Path, latent_dir: Path, index_dir: Path | None = None) -> PerSampleListing:
    """The listing of the two folders, kept in ``index_dir`` (JSON, replaced atomically) when one is
    given, else listed in memory. Rank 0 (or a process outside torch.distributed) reuses the index
    while the folders' mtimes and inodes are those it recorded, and lists again otherwise; the
    other ranks take the index as rank 0 left it, so every rank has the same samples (the trainer
    builds its datasets on rank 0 before the others). A rank that finds no index lists itself."""
    token_dir, latent_dir = token_dir.expanduser().absolute(), latent_dir.expanduser().absolute()
    if index_dir is None:
        return list_per_sample(token_dir, latent_dir)
    key = hashlib.sha256(f"{token_dir}\n{latent_dir}".encode()).hexdigest()[:16]
    path = index_dir / f"per_sample-{key}.json"
    try:
        index = json.loads(path.read_text())
        found = PerSampleListing.from_json(index) if index.get("format") == INDEX_FORMAT else None
    except (OSError, ValueError, KeyError):
        found = None
    if found is not None and (found.token_dir, found.latent_dir) == (token_dir, latent_dir):
        levels = per_sample_levels(token_dir, latent_dir)
        if _rank() != 0 or found.signature == _signature(token_dir, latent_dir, levels):
            return found
    listing = list_per_sample(token_dir, latent_dir)
    index_dir.mkdir(parents=True, exist_ok=True)
    write_atomic(path, json.dumps(listing.to_json()) + "\n")
    _log(f"listing kept in {path}, reused while the folders are unchanged")
    return listing


class PerSampleDataset(CheckedDataset):
    """One split of the older per-sample layout (see the module docstring)."""

    def __init__(self, token_dir: str | Path, latent_dir: str | Path, split: str, val_fraction: float,
                 seq_len: int, latent_dim: int, vocab_size: int, index_dir: Path | None = None,
                 on_bad_sample: str = "error"):
        if split not in SPLITS:
            raise ValueError(f"split must be one of {SPLITS}, got '{split}'.")
        self.split, self.on_bad_sample = split, on_bad_sample
        self.seq_len, self.latent_dim, self.vocab_size = seq_len, latent_dim, vocab_size
        listing = per_sample_listing(Path(token_dir), Path(latent_dir), index_dir)
        if "" in listing.groups:
            level, want_val = "", split == "validation"
            files = [f for f in listing.groups[""] if is_validation(sample_name(f), val_fraction) == want_val]
            fix = (f" ({len(listing.groups[''])} samples in all, data.val_fraction={val_fraction}); add samples or "
                   "change data.val_fraction.")
        elif split in listing.groups:
            level, files, fix = split, listing.groups[split], "; add samples to it."
        else:
            raise DataError(f"{listing.token_dir / split} does not exist: the per-sample data is split by its "
                            f"{listing.token_dir / 'train'} folder, so the {split} split needs {split}/ in the "
                            "token and the latent folder. Add them, or set training.eval_every: 0.")
        self.token_folder, self.latent_folder = listing.token_dir / level, listing.latent_dir / level
        self.source = str(self.token_folder)
        if not files:
            raise DataError(f"the {split} split of {self.token_folder} is empty{fix}")
        # Bytes in one array: compact, and nothing for DataLoader workers to copy by touching refcounts.
        self.files = np.array([os.fsencode(f) for f in files])
        self[0]  # fail on a malformed dataset now, not hours into training

    def __len__(self) -> int:
        return len(self.files)

    def read(self, i: int) -> dict[str, torch.Tensor]:
        token_file = os.fsdecode(self.files[i])
        ids, mask, latent = read_per_sample(self.token_folder / token_file,
                                            self.latent_folder / f"{sample_name(token_file)}.npy",
                                            self.seq_len, self.latent_dim, self.vocab_size)
        return {"input_ids": torch.from_numpy(ids), "attention_mask": torch.from_numpy(mask),
                "latent": torch.from_numpy(latent)}


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
        raise DataError(f"cannot read {path} ({e}); prepare the data again into an empty data.path.") from e
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
             ("data.pad_token_id", d.pad_token_id, "pad_token_id", "the tokenizer's pad id")]
    if meta["val_fraction"] is not None:  # None: converted from per-sample split folders
        pairs.append(("data.val_fraction", d.val_fraction, "val_fraction", "the validation fraction"))
    if d.corpus:  # the recipe says what to prepare from: the data there must come from it
        pairs += [("data.corpus", d.corpus, "corpus", "the corpus"),
                  ("data.tokenizer", d.tokenizer, "tokenizer", "the tokenizer"),
                  ("data.encoder", d.encoder, "encoder", "the encoder")]
    for key, want, field, what in pairs:
        if meta[field] != want:
            raise DataError(f"the dataset at {root} was prepared with {what} {meta[field]!r}, but "
                            f"{key} is {want!r}. Set {key}: {meta[field]!r} in the recipe, or prepare "
                            f"the data again into another data.path for {want!r}.")


_DAMAGED = "the shard is damaged: prepare the data again into an empty data.path."


def _npy_header(path: Path) -> tuple[tuple[int, ...], np.dtype]:
    """Shape and dtype of a .npy file from its header alone; DataError when the file is missing, is
    not a .npy file, or is shorter than its header says (a truncated copy)."""
    try:
        with open(path, "rb") as f:
            version = np.lib.format.read_magic(f)
            read_header = np.lib.format.read_array_header_1_0 if version == (1, 0) else \
                np.lib.format.read_array_header_2_0
            shape, _, dtype = read_header(f)
            data_start = f.tell()
    except FileNotFoundError:
        raise DataError(f"{path} is missing, but metadata.json lists its shard; {_DAMAGED}") from None
    except (OSError, ValueError) as e:
        raise DataError(f"{path} is not a readable .npy file ({e}); {_DAMAGED}") from e
    need, have = data_start + math.prod(shape) * dtype.itemsize, path.stat().st_size
    if have < need:
        raise DataError(f"{path} is truncated: its header says {dtype} {shape}, {need} bytes, but the file "
                        f"holds {have}; {_DAMAGED}")
    return shape, dtype


class PackedDataset(CheckedDataset):
    """One split of a packed dataset. Shards are memory-mapped on first use in each process, so
    DataLoader workers share the page cache and a pickled dataset carries no array data."""

    def __init__(self, root: str | Path, split: str, standardize_latents: bool = False,
                 on_bad_sample: str = "error"):
        if split not in SPLITS:
            raise ValueError(f"split must be one of {SPLITS}, got '{split}'.")
        self.root = Path(root).expanduser()
        self.split, self.source, self.on_bad_sample = split, str(self.root), on_bad_sample
        meta = read_metadata(self.root)
        self.seq_len, self.latent_dim, self.vocab_size = meta["seq_len"], meta["latent_dim"], meta["vocab_size"]
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
            if not (np.isfinite(self.mean).all() and np.isfinite(self.std).all()):
                raise DataError(f"{self.root / METADATA_FILE}: latent_mean or latent_std holds NaN or Inf (a "
                                "latent was when the data was prepared), so data.standardize_latents would make "
                                "every latent NaN. Prepare the data again from finite latents, or set "
                                "data.standardize_latents: false (the bad samples are then found as they are read).")
        for k, s in enumerate(shards):  # fail on a damaged dataset now, not hours into training
            self._check_shard(k, s["num_samples"], np.dtype(meta["token_dtype"]))
        self._open: dict[int, tuple[np.ndarray, np.ndarray, np.ndarray]] = {}

    def _check_shard(self, k: int, n: int, token_dtype: np.dtype) -> None:
        """Every file's header against metadata.json, and every length in [0, seq_len]: cheap, unlike
        reading every token and latent."""
        d = self.root / self.shard_names[k]
        for name, shape, dtype in ((TOKENS_FILE, (n, self.seq_len), token_dtype), (LENGTHS_FILE, (n,), np.int32),
                                   (LATENTS_FILE, (n, self.latent_dim), np.float32)):
            found = _npy_header(d / name)
            if found != (shape, dtype):
                raise DataError(f"{d / name}: {found[1]} {found[0]}, metadata.json says {np.dtype(dtype)} {shape}; "
                                f"{_DAMAGED}")
        lengths = np.load(d / LENGTHS_FILE)
        bad = np.flatnonzero((lengths < 0) | (lengths > self.seq_len))
        if len(bad):
            raise DataError(f"{d / LENGTHS_FILE}: row {bad[0]} has length {lengths[bad[0]]}, outside [0, "
                            f"{self.seq_len}] (seq_len in metadata.json); {_DAMAGED}")

    def _arrays(self, k: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        if k not in self._open:
            d = self.root / self.shard_names[k]
            try:
                self._open[k] = tuple(np.load(d / f, mmap_mode="r")
                                      for f in (TOKENS_FILE, LENGTHS_FILE, LATENTS_FILE))
            except (OSError, ValueError) as e:
                raise DataError(f"cannot read shard {d}: {e}; {_DAMAGED}") from e
        return self._open[k]

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_open": {}}

    def __len__(self) -> int:
        return int(self.ends[-1]) if len(self.ends) else 0

    def sample_lengths(self) -> torch.Tensor:
        """Real tokens of every sample [N] long, from the shards' lengths.npy alone. A bad sample
        that data.on_bad_sample: skip replaces keeps its own length here."""
        return torch.from_numpy(np.concatenate([self._arrays(k)[1] for k in range(len(self.shard_names))])
                                .astype(np.int64))

    def read(self, i: int) -> dict[str, torch.Tensor]:
        k = int(np.searchsorted(self.ends, i, side="right"))
        j = i - (int(self.ends[k - 1]) if k else 0)
        ids, lengths, latents = self._arrays(k)
        row = ids[j].astype(np.int64)
        if row.max() >= self.vocab_size or row.min() < 0:
            bad = int(row.max() if row.max() >= self.vocab_size else row.min())
            raise BadSample(f"{self.root / self.shard_names[k] / TOKENS_FILE}: row {j} has token id {bad}, outside "
                            f"the vocabulary [0, {self.vocab_size}) of metadata.json.")
        latent = np.array(latents[j], dtype=np.float32)
        if not np.isfinite(latent).all():
            raise BadSample(f"{self.root / self.shard_names[k] / LATENTS_FILE}: row {j} holds NaN or Inf "
                            f"({int((~np.isfinite(latent)).sum())} of its {self.latent_dim} values).")
        if self.mean is not None:
            latent = (latent - self.mean) / self.std
        return {"input_ids": torch.from_numpy(row), "attention_mask": torch.arange(self.seq_len) < int(lengths[j]),
                "latent": torch.from_numpy(latent)}


def build_dataset(cfg: Config, split: str) -> Dataset:
    d, m = cfg.data, cfg.model
    if d.kind == "synthetic":
        return SyntheticDataset(cfg, split)
    if d.kind == "per_sample":
        # A run keeps its listing in its directory; without one (tests, a moved run) it is made in memory.
        run_dir = Path(cfg.logging.run_dir).expanduser() if cfg.logging.run_dir else None
        index_dir = run_dir / INDEX_DIR if run_dir is not None and run_dir.is_dir() else None
        return PerSampleDataset(*per_sample_dirs(d), split, d.val_fraction, m.max_seq_len, m.latent_dim,
                                m.vocab_size, index_dir=index_dir, on_bad_sample=d.on_bad_sample)
    if d.corpus and not (Path(d.path).expanduser() / METADATA_FILE).is_file():
        from .prepare import ensure_dataset  # the tokenizer and encoder stack, imported only to prepare
        ensure_dataset(cfg)
    check_metadata(read_metadata(d.path), cfg, d.path)
    return PackedDataset(d.path, split, d.standardize_latents, d.on_bad_sample)
