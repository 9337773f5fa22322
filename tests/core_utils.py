"""Small shared builders for the tests: the repository's paths, a tiny real MMDiT, a batch of
synthetic data, a step's fp64 reference, the recipe of the packed test dataset, and a command's
main() run in-process."""
from __future__ import annotations

import contextlib
import copy
import io
import json
from pathlib import Path

import torch
from torch.utils.data import default_collate

from lgdlm_ds.config import load_config
from lgdlm_ds.data import build_dataset
from lgdlm_ds.model import build_model
from lgdlm_ds.objectives import TrainStep
from lgdlm_ds.tools.compare import param_grads
from precision import fp64_throughout

ROOT = Path(__file__).resolve().parents[1]
SMOKE = ROOT / "recipes" / "00_smoke" / "recipe.yaml"
TINY = ["model.vocab_size=300", "model.hidden_size=32", "model.cond_dim=32", "model.n_blocks=2",
        "model.max_seq_len=12", "model.latent_dim=8", "model.attn_heads=2", "model.attn_dim_head=16",
        "loss.cycle_text_ramp_steps=0", "loss.cycle_latent_ramp_steps=0",
        # synthetic data instead of the recipe's prepared corpus
        "data.kind=synthetic", "data.path=", "data.corpus=", "data.standardize_latents=false"]
# What a cycle_vae step logs beside the loss.
CYCLE_VAE_METRICS = ("base_l2t_text_loss", "base_t2l_latent_loss", "cycle_text_loss", "cycle_latent_loss",
                     "cycle_text_weight", "cycle_latent_weight", "t_lat_mean", "latent_pred_norm", "x0_pred_norm")


def tiny_config(*overrides: str):
    return load_config(SMOKE, [*TINY, *overrides])


def tiny_batch(cfg, n: int = 4, dtype=torch.float32) -> dict[str, torch.Tensor]:
    ds = build_dataset(cfg, "train")
    batch = default_collate([ds[i] for i in range(n)])
    batch["latent"] = batch["latent"].to(dtype)
    return batch


def tiny_step(cfg, seed: int = 0, dtype=torch.float32, perturb: float = 0.0, fuse: bool = True) -> TrainStep:
    """A TrainStep on a freshly built tiny model. ``perturb`` adds noise to every weight so the
    zero-initialised adaLN gates do not hide gradient paths."""
    torch.manual_seed(seed)
    model = build_model(cfg.model).to(dtype)
    if perturb:
        with torch.no_grad():
            for p in model.parameters():
                p.add_(torch.randn_like(p) * perturb)
    return TrainStep(model, cfg, fuse=fuse)


def loss_and_grads(step: TrainStep, batch, at_step: int, seed: int = 1):
    step.zero_grad(set_to_none=True)
    torch.manual_seed(seed)
    loss, metrics = step(batch, at_step)
    loss.backward()
    return loss.detach(), metrics, param_grads(step)


def fp64_reference(step: TrainStep, batch, at_step: int, seed: int = 1):
    """``loss_and_grads`` of ``step`` in fp64: the same weights widened, the same noise."""
    batch = {k: v.double() if v.is_floating_point() else v for k, v in batch.items()}
    with fp64_throughout():
        return loss_and_grads(copy.deepcopy(step).double(), batch, at_step, seed)


# The packed dataset of the data and preparation tests (conftest.py's ``prepared``): sentences of
# the Lee corpus at sequence length 48 with all-MiniLM-L6-v2 latents.
SEQ_LEN, DIM = 48, 384


def packed_config(path, *overrides):
    return load_config(None, [f"model.max_seq_len={SEQ_LEN}", f"model.latent_dim={DIM}", "data.kind=packed",
                              f"data.path={path}", "data.val_fraction=0.1", *overrides])


def run_cli(main, *argv: str) -> tuple[int, list[dict], str]:
    """A command's main() in-process: (exit status, its stdout's JSON lines, its stderr)."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        rc = main([str(a) for a in argv])
    return rc, [json.loads(line) for line in out.getvalue().splitlines() if line.startswith("{")], err.getvalue()
