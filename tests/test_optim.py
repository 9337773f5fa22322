"""The learning-rate schedule and the weight-decay groups."""
import math

import pytest
import torch

from lgdlm_ds.config import load_config
from lgdlm_ds.model import build_model
from lgdlm_ds.optim import DECAY, NO_DECAY, WarmupCosine, lr_factor, param_groups
from core_utils import SMOKE


def test_lr_warmup_cosine_and_floor():
    warmup, total, floor = 10, 110, 0.1
    assert lr_factor(0, warmup, total, floor) == pytest.approx(0.1)
    assert lr_factor(9, warmup, total, floor) == 1.0
    assert lr_factor(10, warmup, total, floor) == 1.0
    assert lr_factor(60, warmup, total, floor) == pytest.approx(floor + (1 - floor) * 0.5)
    assert lr_factor(110, warmup, total, floor) == pytest.approx(floor)
    assert lr_factor(500, warmup, total, floor) == pytest.approx(floor)
    assert lr_factor(0, 0, total, floor) == 1.0


def test_scheduler_holds_on_skipped_steps_and_seeks():
    opt = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(2))], lr=1.0)
    sched = WarmupCosine(opt, warmup=4, total=20, floor=0.0)
    assert opt.param_groups[0]["lr"] == 0.25
    opt.step()
    sched.step(skip=True)
    assert opt.param_groups[0]["lr"] == 0.25
    sched.step()
    assert opt.param_groups[0]["lr"] == 0.5
    sched.seek(12)
    assert opt.param_groups[0]["lr"] == pytest.approx(0.5 * (1 + math.cos(math.pi * 8 / 16)))


def test_no_decay_on_norms_biases_embeddings_and_mixing_parameters():
    cfg = load_config(SMOKE, ["model.vocab_size=128", "model.max_seq_len=8"])
    model = build_model(cfg.model)
    names = {id(p): n for n, p in model.named_parameters()}
    groups = {g["name"]: {names[id(p)] for p in g["params"]} for g in param_groups(model, 0.1)}
    assert len(groups[DECAY]) + len(groups[NO_DECAY]) == len(names)
    assert "text_head.weight" in groups[DECAY] and "latent_head.0.weight" in groups[DECAY]
    assert any(n.startswith("mmdit.blocks.0.") and n.endswith("weight") for n in groups[DECAY])
    norm_owners = {n for n, m in model.named_modules() if "Norm" in type(m).__name__}
    for n in groups[DECAY]:
        assert n.endswith(".weight") and n.rpartition(".")[0] not in norm_owners and "embed" not in n
    for n in ("text_encoder.token_embed.weight", "text_encoder.position_embed", "text_head.bias",
              "latent_encoder.projection.1.weight"):
        assert n in groups[NO_DECAY]
    assert any("static_alpha" in n for n in groups[NO_DECAY])
