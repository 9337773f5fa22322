"""The MMDiT text+latent model: the older shape and checkpoint layout, heads, qk-norm, attention,
activation checkpointing, the time embedding's scale, and ``python -m lgdlm_ds.model``."""
import copy
import json
import math
import subprocess
import sys

import pytest
import torch
import yaml

from lgdlm_ds import export as export_cli
from lgdlm_ds.config import ModelConfig
from lgdlm_ds.evaluate import load_batches
from lgdlm_ds.loading import load
from lgdlm_ds.model import (TIMESTEP_FREQUENCIES, build_model, load_upstream_state_dict, parameter_counts,
                            timestep_embedding, upstream_state_dict)
from lgdlm_ds.tools.compare import max_rel_diff
from core_utils import SMOKE, loss_and_grads, run_cli, tiny_batch, tiny_config, tiny_step
from engine_utils import SYNTHETIC, train_run
from precision import FP32_EPS, assert_fp32_agree, fp64_throughout

OLDER_SHAPE = ModelConfig(vocab_size=30522, hidden_size=1024, cond_dim=1024, n_blocks=24, max_seq_len=2048,
                          latent_dim=32, num_residual_streams=2, attn_heads=8, attn_dim_head=64)


def test_older_shape_parameter_count_and_checkpoint_layout():
    model = build_model(OLDER_SHAPE, device="meta")
    counts = parameter_counts(model)
    assert counts["total_params"] == 890_527_610 and counts["mmdit_params"] == 806_341_664
    saved = upstream_state_dict(model)
    assert all(k.startswith("model.") for k in saved)
    assert saved["model.mmdit.blocks.0.attn_residual_fns.0.h_post_scale"].shape == ()  # as the older code wrote it
    saved["text_noise_schedule.log_prior"] = torch.zeros(1)  # the older trainer's buffers ride along
    load_upstream_state_dict(build_model(OLDER_SHAPE, device="meta"), saved)
    del saved["model.text_head.bias"]
    saved["model.extra.weight"] = torch.zeros(1)
    with pytest.raises(KeyError, match="missing: text_head.bias; unexpected: extra.weight"):
        load_upstream_state_dict(build_model(OLDER_SHAPE, device="meta"), saved)


def test_upstream_weights_load_unchanged():
    cfg = tiny_config()
    torch.manual_seed(0)
    a = build_model(cfg.model)
    b = build_model(cfg.model)
    load_upstream_state_dict(b, upstream_state_dict(a))
    for (k, va), vb in zip(a.state_dict().items(), b.state_dict().values()):
        assert torch.equal(va, vb), k


def test_model_cli_prints_counts_on_meta():
    out = subprocess.run([sys.executable, "-m", "lgdlm_ds.model", str(SMOKE), "model.n_blocks=3"],
                         capture_output=True, text=True, check=True).stdout
    counts = json.loads(out.strip().splitlines()[-1])
    assert counts["total_params"] == sum(counts["by_module"].values()) and counts["mmdit_params"] > 0
    bad = subprocess.run([sys.executable, "-m", "lgdlm_ds.model", str(SMOKE), "model.n_heads=3"],
                         capture_output=True, text=True)
    assert bad.returncode != 0 and "model.attn_heads" in bad.stderr and "Traceback" not in bad.stderr


def test_same_torch_seed_same_model():
    cfg = tiny_config("model.n_blocks=4", "model.num_residual_streams=4")
    states = []
    for _ in range(2):
        torch.manual_seed(3)
        states.append(build_model(cfg.model).state_dict())
    assert all(torch.equal(states[0][k], states[1][k]) for k in states[0])


def test_heads_and_head_size_are_used():
    model = build_model(tiny_config("model.attn_heads=3", "model.attn_dim_head=8").model)
    attn = model.mmdit.blocks[0].joint_attn
    assert attn.to_qkv[0].weight.shape == (3 * 3 * 8, 32)
    assert attn.split_heads.axes_lengths["h"] == 3


def test_qk_norm_reaches_the_attention():
    cfg = tiny_config()
    torch.manual_seed(0)
    plain = build_model(cfg.model)
    torch.manual_seed(0)
    normed = build_model(tiny_config("model.qk_norm=true").model)
    extra = normed.load_state_dict(plain.state_dict(), strict=False).missing_keys
    assert extra and all("q_rmsnorms" in k or "k_rmsnorms" in k for k in extra)
    calls = []
    normed.mmdit.blocks[0].joint_attn.q_rmsnorms[0].register_forward_hook(lambda *a: calls.append(1))
    batch = tiny_batch(cfg)
    args = (batch["input_ids"], batch["latent"], None, None, batch["attention_mask"])
    with torch.no_grad():
        assert not torch.allclose(plain(*args)[0], normed(*args)[0], atol=1e-4)
    assert calls


def test_outputs_and_shapes():
    cfg = tiny_config()
    model = build_model(cfg.model).eval()
    b = tiny_batch(cfg)
    ids, z, mask = b["input_ids"], b["latent"], b["attention_mask"]
    with torch.no_grad():
        logits, latent = model(ids, z, torch.rand(4), torch.rand(4), mask)
        assert logits.shape == (4, 12, 300) and latent.shape == (4, 8)
        assert torch.equal(model(ids, z[:, None], attention_mask=mask)[1], model(ids, z, attention_mask=mask)[1])
    with pytest.raises(ValueError, match=r"latents must be \[4, 8\]"):
        model(ids, z[:, :5])


def _real_outputs(model, tokens, latents, mask) -> dict[str, torch.Tensor]:
    """The outputs at the real text positions, and the latent's."""
    text, latent = model(tokens, latents, attention_mask=mask)
    return {"text": text[mask], "latent": latent}


def test_attention_is_sdpa_and_honours_padding():
    cfg = tiny_config()
    model = build_model(cfg.model).eval()
    assert all(block.joint_attn.attend.flash for block in model.mmdit.blocks)
    b = tiny_batch(cfg)
    ids, z = b["input_ids"], b["latent"]
    mask = torch.ones_like(ids, dtype=torch.bool)
    mask[:, 7:] = False
    other = ids.clone()
    other[:, 7:] = 42  # change only padded positions
    with torch.no_grad():
        sdpa = _real_outputs(model, ids, z, mask)
        # Padded keys get exactly zero attention weight: the real positions keep their bits.
        assert all(torch.equal(v, sdpa[k]) for k, v in _real_outputs(model, other, z, mask).items())
        with fp64_throughout():
            ref = _real_outputs(copy.deepcopy(model).double(), ids, z.double(), mask)
        for block in model.mmdit.blocks:  # the package's einsum attention gives the same result
            block.joint_attn.attend.flash = False
        assert_fp32_agree(sdpa, _real_outputs(model, ids, z, mask), ref)


def test_activation_checkpointing_is_exact():
    batch = tiny_batch(tiny_config())
    results = []
    for ac in ("false", "true"):
        step = tiny_step(tiny_config(f"model.activation_checkpointing={ac}", "model.dropout=0.1"), perturb=0.02)
        results.append(loss_and_grads(step, batch, at_step=3))
    assert torch.equal(results[0][0], results[1][0])
    assert max_rel_diff(results[0][2], results[1][2]) == 0.0


def _embedding_distance(a: float, b: float, time_scale: float) -> float:
    """|e(a) - e(b)| in closed form (fp64): each cos/sin pair at frequency f lies on the unit circle,
    so the pair moves by the chord 2 sin(time_scale (a - b) f / 2)."""
    half = TIMESTEP_FREQUENCIES // 2
    freqs = [math.exp(-math.log(1e4) * i / half) for i in range(half)]
    return 2 * math.sqrt(sum(math.sin(time_scale * (a - b) * f / 2) ** 2 for f in freqs))


def test_time_scale_separates_nearby_times():
    t = torch.tensor([0.98, 1.0])
    a = float(t[0])  # 0.98 as fp32 holds it
    measured, predicted = {}, {}
    for scale in (1.0, 1000.0):
        e = timestep_embedding(t, time_scale=scale)
        measured[scale] = float((e[0] - e[1]).norm())
        predicted[scale] = _embedding_distance(a, 1.0, scale)
        # fp32: each argument scale * t * f is off by at most ~3 rounding errors of its size (<= scale),
        # each cos/sin by one more; the difference of two embeddings, 2 x that per component.
        bound = math.sqrt(TIMESTEP_FREQUENCIES) * 2 * (3 * scale + 1) * FP32_EPS
        assert abs(measured[scale] - predicted[scale]) <= bound, (scale, measured[scale], predicted[scale])
    assert predicted[1.0] == pytest.approx(0.0546, abs=1e-4)  # at scale 1 only the slow frequencies move
    ratio = measured[1000.0] / measured[1.0]
    assert ratio == pytest.approx(predicted[1000.0] / predicted[1.0], rel=1e-3) and ratio > 150


def test_time_scale_default_is_the_older_embedding_bitwise():
    t = torch.rand(64, dtype=torch.float64)
    half = TIMESTEP_FREQUENCIES // 2
    freqs = torch.exp(-math.log(1e4) * torch.arange(half, dtype=torch.float32) / half)
    args = t.float()[:, None] * freqs[None]  # the older model's embedding of raw t
    older = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
    assert torch.equal(timestep_embedding(t), older) and torch.equal(timestep_embedding(t, time_scale=1.0), older)
    assert ModelConfig().time_scale == 1.0
    # The scale changes no weight: a checkpoint of either loads into the other, and the same seed
    # builds the same weights; only the conditioning at the same times differs, through both the
    # text and the latent time.
    torch.manual_seed(0)
    plain = build_model(tiny_config("model.time_scale=1").model)
    torch.manual_seed(0)
    scaled = build_model(tiny_config("model.time_scale=1000").model)
    assert all(torch.equal(v, scaled.state_dict()[k]) for k, v in plain.state_dict().items())
    half, zeros = torch.full((4,), 0.5), torch.zeros(4)
    with torch.no_grad():
        for text_t, latent_t in ((half, zeros), (zeros, half)):
            assert torch.equal(plain.conditioning(zeros, zeros), scaled.conditioning(zeros, zeros))
            assert not torch.allclose(plain.conditioning(text_t, latent_t), scaled.conditioning(text_t, latent_t))
    for bad in ("0", "-1", "inf"):
        with pytest.raises(ValueError, match="model.time_scale"):
            tiny_config(f"model.time_scale={bad}")


def test_time_scale_round_trips_through_the_run_and_export(tmp_path):
    """config.yaml carries the key, so loading the run or its export rebuilds the same model."""
    trainer = train_run(tmp_path, 0, SYNTHETIC + ["model.time_scale=1000", "data.num_samples=16", "data.val_fraction=0.25",
                                                  "training.micro_batch_size=4", "training.num_train_steps=1"])
    assert yaml.safe_load((trainer.run_dir / "config.yaml").read_text())["model"]["time_scale"] == 1000.0
    rc, _, err = run_cli(export_cli.main, trainer.run_dir, "--out", tmp_path / "export")
    assert rc == 0, err
    batch = load_batches(trainer.cfg, "validation", 2, 1)[0]
    times = torch.full((2,), 0.98)
    with torch.no_grad():
        engine = trainer.engine.module.model.eval()(batch["input_ids"], batch["latent"], times, times)[1]
        for source in (trainer.run_dir, tmp_path / "export"):
            model = load(source).model
            assert [m.time_scale for m in model.conditioning.children() if hasattr(m, "time_scale")] == [1000.0] * 2
            assert torch.equal(model(batch["input_ids"], batch["latent"], times, times)[1], engine)
