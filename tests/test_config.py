"""The typed config: recipe YAML + key=value overrides, and the validation that names the key and
the fix."""
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


def test_smoke_recipe_has_the_contract_keys():
    cfg = load_config(SMOKE)
    tr, lg = cfg.training, cfg.logging
    assert (tr.ds_config, tr.resume, tr.max_consecutive_skips) == ("ds_configs/zero0.json", "auto", 20)
    assert tr.num_train_steps > 0 and tr.micro_batch_size > 0 and tr.gradient_accumulation_steps == 1
    assert (lg.run_dir, lg.wandb) == ("", False) and lg.log_every > 0 and lg.save_every > 0  # run_dir: runs/00_smoke


@pytest.mark.parametrize("override, key", [
    ("training.num_train_steps=0", "training.num_train_steps"),
    ("training.gradient_accumulation_steps=0", "training.gradient_accumulation_steps"),
    ("training.max_consecutive_skips=-1", "training.max_consecutive_skips"),
    ("training.min_lr_ratio=1.5", "training.min_lr_ratio"),
    ("training.betas=[0.9]", "training.betas"),
    ("training.keep_last=0", "training.keep_last"),
    ("logging.log_every=0", "logging.log_every"),
    ("logging.save_every=-1", "logging.save_every"),
    ("logging.wandb=maybe", "logging.wandb"),
    ("logging.run_dri=x", "logging.run_dir"),  # the suggestion names the real key
])
def test_bad_engine_keys_name_the_key(override, key):
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        load_config(SMOKE, [override])


def test_exponent_floats_are_numbers():
    # PyYAML reads 3e-4 as a string (YAML 1.1); a float field takes it as the number it means.
    assert load_config(SMOKE, ["training.lr=3e-4"]).training.lr == 3e-4


@pytest.mark.parametrize("overrides, message", [
    (["data.kind=per_sample"], "'data.path': data.kind per_sample needs the dataset root .* or data.token_dir"),
    (["data.kind=per_sample", "data.token_dir=t"], "'data.latent_dir': data.token_dir and data.latent_dir go together"),
    (["data.kind=per_sample", "data.path=r", "data.token_dir=t", "data.latent_dir=l"],
     "'data.token_dir': set either data.path .* not both"),
    (["data.token_dir=t", "data.latent_dir=l"], "'data.token_dir': is read only by data.kind per_sample"),
])
def test_per_sample_config_validation(overrides, message):
    with pytest.raises(ConfigError, match=message):
        load_config(None, overrides)


@pytest.mark.parametrize("overrides, message", [
    (["data.kind=packed"], "'data.path': data.kind packed needs the dataset directory"),
    (["data.kind=per_sample", "data.path=x", "data.standardize_latents=true"],
     "'data.standardize_latents': needs data.kind packed"),
    (["data.corpus=lee_background"], "'data.corpus': prepares a packed dataset"),
    (["data.kind=packed", "data.path=x", "data.encoder="], "'data.encoder': must name a model"),
])
def test_data_config_validation(overrides, message):
    with pytest.raises(ConfigError, match=message):
        load_config(None, overrides)
