import pytest

from lgdlm_ds.config import ConfigError, load_config
from core_utils import SMOKE


def test_defaults_and_typed_overrides():
    cfg = load_config(SMOKE, ["model.hidden_size=128", "loss.cycle_text_weight=1", "training.mode_weights.l2t=3"])
    assert cfg.model.hidden_size == 128
    assert cfg.loss.cycle_text_weight == 1.0 and isinstance(cfg.loss.cycle_text_weight, float)
    assert cfg.training.mode_weights["l2t"] == 3
    assert load_config(None).model.attn_heads == 8 and load_config(None).model.qk_norm is False


@pytest.mark.parametrize("override, message", [
    ("model.hiden_size=3", "unknown config key 'model.hiden_size'. Did you mean 'model.hidden_size'?"),
    ("loss.cycle_text_wieght=3", "Did you mean 'loss.cycle_text_weight'?"),
    ("model.n_heads=16", "ignored `n_heads` and always ran 8 heads x 64. Use model.attn_heads"),
    ("model.qk_rmsnorm=true", "never applied it. Use model.qk_norm"),
    ("model.hidden_size=big", "'model.hidden_size' expects int"),
    ("loss.cycle_latent_t_min=0.99", "'loss.cycle_latent_t_min': need 0 <= cycle_latent_t_min < cycle_latent_t_max"),
    ("loss.cycle_latent_sampling=topk", "'loss.cycle_latent_sampling': 'topk' is not one of argmax, categorical"),
    ("loss.cycle_text_weight=-0.1", "'loss.cycle_text_weight': must be >= 0"),
    ("loss.latent_loss_weight=-1", "'loss.latent_loss_weight': must be >= 0"),
    ("loss.loss_type=vae", "'loss.loss_type': 'vae' is not one of"),
    ("data.mask_token_id=999999", "'data.mask_token_id': 999999 is outside the vocabulary"),
    ("hidden_size", "is not of the form section.key=value"),
])
def test_bad_settings_name_the_key(override, message):
    with pytest.raises(ConfigError) as e:
        load_config(SMOKE, [override])
    assert message in str(e.value)


def test_old_keys_in_a_recipe_file_are_explained(tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text("model:\n  n_heads: 16\n")
    with pytest.raises(ConfigError, match="model.attn_heads"):
        load_config(recipe)


@pytest.mark.parametrize("overrides", [
    ["loss.loss_type=t2l"], ["loss.loss_type=cycle_vae"],
    ["loss.loss_type=random", "training.mode_weights={l2t: 1, t2l: 1}"],
    ["loss.loss_type=sequential", "training.mode_schedule=[{type: t2l, steps: 5}]"],
])
def test_epsilon_target_at_t_one_is_refused(overrides):
    with pytest.raises(ConfigError, match="degenerate: at t=1 the noisy latent IS the noise"):
        load_config(SMOKE, ["diffusion.latent_parameterization=epsilon", "loss.latent_t_mode=full", *overrides])
    # The same target with random t, or without any T2L pass, is fine.
    load_config(SMOKE, ["diffusion.latent_parameterization=epsilon", "loss.latent_t_mode=random", *overrides])
    load_config(SMOKE, ["diffusion.latent_parameterization=epsilon", "loss.latent_t_mode=full", "loss.loss_type=l2t"])


def test_mode_lists_are_validated():
    with pytest.raises(ConfigError, match=r"training.mode_schedule\[0\].type"):
        load_config(SMOKE, ["loss.loss_type=sequential", "training.mode_schedule=[{type: cycle_vae, steps: 1}]"])
    with pytest.raises(ConfigError, match="training.mode_weights.*needs a positive weight"):
        load_config(SMOKE, ["loss.loss_type=random", "training.mode_weights={l2t: 0}"])


def test_missing_recipe_file(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "nope.yaml")
