"""The MMDiT text+latent model: the older shape and checkpoint layout, heads, qk-norm, attention,
activation checkpointing, and ``python -m lgdlm_ds.model``."""
import copy
import json
import subprocess
import sys

import pytest
import torch

from lgdlm_ds.config import ModelConfig
from lgdlm_ds.model import build_model, load_upstream_state_dict, parameter_counts, upstream_state_dict
from lgdlm_ds.tools.compare import max_rel_diff
from core_utils import SMOKE, loss_and_grads, tiny_batch, tiny_config, tiny_step
from precision import assert_fp32_agree, fp64_throughout

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
