"""The LGDLM model: text tokens + one latent token through a two-modality MMDiT.

Parameter names are those of the older checkpoints (text_encoder, latent_encoder, conditioning,
mmdit, text_head, latent_head), so their weights load unchanged. What differs from the older
model: heads and head size are really passed to the attention, ``qk_norm`` really reaches it,
attention runs through scaled-dot-product attention, latent_pred is [B, D], the trunk and each head
can be called on their own (so a head runs only on the rows that need it), and each MMDiT block
can be checkpointed.

``python -m lgdlm_ds.model RECIPE.yaml [section.key=value ...]`` prints the parameter count (meta device).
"""
from __future__ import annotations

import argparse
import contextlib
import json
import math
import random
import sys
from typing import Iterable

import torch
import torch.nn.functional as F
from mmdit.mmdit_generalized_pytorch import MMDiT, MMDiTBlock
from mmdit.mmdit_pytorch import MultiHeadRMSNorm
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from . import cli
from .config import ModelConfig, load_config
from .hyper_mix import fuse_hyper_connections
from .partitioned import construction, partitions_parameters
from .text_head import TextHead


# Sinusoidal frequencies a timestep is embedded with before its MLP.
TIMESTEP_FREQUENCIES = 256


def timestep_embedding(t: Tensor, dim: int = TIMESTEP_FREQUENCIES, max_period: float = 1e4,
                       time_scale: float = 1.0) -> Tensor:
    """Sinusoidal embedding of t * ``time_scale`` (model.time_scale). Its periods run from 2π to
    2π·max_period, so raw t in [0, 1] (scale 1, what the older model did) turns each cos/sin pair by
    at most one radian; a scale of 1000 (t in [0, 1000], as DiT-style models use) turns the fast
    pairs through many periods, so nearby times get distinct embeddings.
    Multiplying by 1.0 is exact: scale 1 gives the older embedding bit for bit."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, device=t.device, dtype=torch.float32) / half)
    args = (t.float() * time_scale)[:, None] * freqs[None]
    return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)


class TimestepEmbedder(nn.Module):
    def __init__(self, dim: int, frequency_size: int = TIMESTEP_FREQUENCIES, time_scale: float = 1.0):
        super().__init__()
        self.frequency_size = frequency_size
        self.time_scale = time_scale
        self.mlp = nn.Sequential(nn.Linear(frequency_size, dim), nn.SiLU(), nn.Linear(dim, dim))

    def forward(self, t: Tensor) -> Tensor:
        emb = timestep_embedding(t, self.frequency_size, time_scale=self.time_scale)
        return self.mlp(emb.to(self.mlp[0].weight.dtype))


class Conditioning(nn.Module):
    """One conditioning vector from the text and latent times, shared by every block; both times
    are embedded at the same ``time_scale``."""

    def __init__(self, cond_dim: int, time_scale: float = 1.0):
        super().__init__()
        self.text_sigma_map = TimestepEmbedder(cond_dim, time_scale=time_scale)
        self.latent_sigma_map = TimestepEmbedder(cond_dim, time_scale=time_scale)
        self.combine = nn.Sequential(nn.Linear(2 * cond_dim, 4 * cond_dim), nn.SiLU(),
                                     nn.Linear(4 * cond_dim, cond_dim))

    def forward(self, text_t: Tensor, latent_t: Tensor) -> Tensor:
        both = torch.cat([F.silu(self.text_sigma_map(text_t)), F.silu(self.latent_sigma_map(latent_t))], dim=-1)
        return self.combine(both)


class TextEncoder(nn.Module):
    def __init__(self, vocab_size: int, hidden: int, max_seq_len: int):
        super().__init__()
        self.token_embed = nn.Embedding(vocab_size, hidden)
        self.position_embed = nn.Parameter(torch.randn(1, max_seq_len, hidden) * 0.02)

    def forward(self, tokens: Tensor, soft_tokens: tuple[Tensor, Tensor] | None = None) -> Tensor:
        """Token + position embeddings [B, S, H]. ``soft_tokens`` (mask [B, S] bool, embeddings
        [mask.sum(), H]) replaces the token embedding at the masked positions, in row-major order:
        the inputs of a pass that reads soft tokens (lgdlm_ds.text_head)."""
        emb = self.token_embed(tokens)
        if soft_tokens is not None:
            mask, values = soft_tokens
            emb = emb.masked_scatter(mask[..., None], values.to(emb.dtype))
        return emb + self.position_embed[:, : tokens.shape[1]]


class LatentEncoder(nn.Module):
    def __init__(self, latent_dim: int, hidden: int):
        super().__init__()
        self.projection = nn.Sequential(nn.Linear(latent_dim, 2 * hidden), nn.LayerNorm(2 * hidden), nn.GELU(),
                                        nn.Linear(2 * hidden, hidden))
        self.position_embed = nn.Parameter(torch.randn(1, 1, hidden) * 0.02)

    def forward(self, latents: Tensor) -> Tensor:
        return self.projection(latents)[:, None] + self.position_embed


@contextlib.contextmanager
def _scalar_params_as_1d():
    """Within it, every 0-dim parameter a module registers is registered with shape (1,) instead;
    yields the list of (module, name) it did that to. DeepSpeed's initial parameter broadcast (and
    ZeRO-3's, when a module is partitioned as it is built) views every parameter as bytes, which
    fails on 0-dim tensors; the hyper-connections hold some (h_post_scale). Broadcasting makes (1,)
    compute exactly what () did. At registration, so before any partitioning."""
    reshaped = []

    def to_1d(module: nn.Module, name: str, param: nn.Parameter | None) -> nn.Parameter | None:
        if param is None or param.dim() != 0:
            return None
        reshaped.append((module, name))
        return nn.Parameter(param.detach().reshape(1), requires_grad=param.requires_grad)

    handle = nn.modules.module.register_module_parameter_registration_hook(to_1d)
    try:
        yield reshaped
    finally:
        handle.remove()


def scalars_to_1d(state: dict[str, Tensor], names: Iterable[str]) -> dict[str, Tensor]:
    """``state`` with the hyper-connection scalars ``names`` in this model's shape (1,); the older
    model's files hold them with shape ()."""
    names = set(names)
    return {k: v.reshape(1) if k in names and v.dim() == 0 else v for k, v in state.items()}


def scalars_to_0d(state: dict[str, Tensor], names: Iterable[str]) -> dict[str, Tensor]:
    """``state`` with the hyper-connection scalars ``names`` in the older model's shape ()."""
    names = set(names)
    return {k: v.reshape(()) if k in names else v for k, v in state.items()}


def _enable_qk_norm(mmdit: MMDiT, heads: int, dim_head: int) -> None:
    """The generalized MMDiT block accepts qk_rmsnorm but never hands it to its JointAttention;
    give each attention the per-head RMSNorms it would have built with the flag."""
    for block in mmdit.blocks:
        attn = block.joint_attn
        attn.qk_rmsnorm = True
        attn.q_rmsnorms = nn.ModuleList([MultiHeadRMSNorm(dim_head, heads=heads) for _ in range(attn.num_inputs)])
        attn.k_rmsnorms = nn.ModuleList([MultiHeadRMSNorm(dim_head, heads=heads) for _ in range(attn.num_inputs)])


class LGDLM(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        H, C = cfg.hidden_size, cfg.cond_dim
        self.text_encoder = TextEncoder(cfg.vocab_size, H, cfg.max_seq_len)
        self.latent_encoder = LatentEncoder(cfg.latent_dim, H)
        self.conditioning = Conditioning(C, cfg.time_scale)
        with _scalar_params_as_1d() as reshaped:
            self.mmdit = MMDiT(depth=cfg.n_blocks, dim_modalities=(H, H), dim_cond=C,
                               num_residual_streams=cfg.num_residual_streams,
                               heads=cfg.attn_heads, dim_head=cfg.attn_dim_head, flash_attn=True)
        owners = {id(m): f"mmdit.{name}." if name else "mmdit." for name, m in self.mmdit.named_modules()}
        self.scalar_param_names = [owners[id(m)] + leaf for m, leaf in reshaped]
        if cfg.fused_hyper_connections:
            fuse_hyper_connections(self.mmdit)
        if cfg.qk_norm:
            _enable_qk_norm(self.mmdit, cfg.attn_heads, cfg.attn_dim_head)
        self.text_head = TextHead(H, cfg.vocab_size)
        self.latent_head = nn.Sequential(nn.Linear(H, 2 * H), nn.GELU(), nn.Dropout(cfg.dropout),
                                         nn.Linear(2 * H, cfg.latent_dim))
        self._register_load_state_dict_pre_hook(self._accept_scalar_params)

    def _accept_scalar_params(self, state_dict, prefix, *args, **kwargs):
        state_dict.update(scalars_to_1d(state_dict, [prefix + n for n in self.scalar_param_names]))

    def trunk(self, text_tokens: Tensor, latents: Tensor, text_timesteps: Tensor | None = None,
              latent_timesteps: Tensor | None = None, attention_mask: Tensor | None = None,
              soft_tokens: tuple[Tensor, Tensor] | None = None) -> tuple[Tensor, Tensor]:
        """Run the MMDiT; returns hidden states (text [B,S,H], latent [B,H]) before the heads.
        ``soft_tokens``: input embeddings instead of the tokens' at some positions (TextEncoder)."""
        B, S = text_tokens.shape
        if S > self.cfg.max_seq_len:
            raise ValueError(f"text length {S} exceeds model.max_seq_len {self.cfg.max_seq_len}.")
        if latents.dim() == 3:
            if latents.shape[1] != 1:
                raise ValueError(f"latents must be [B, D] or [B, 1, D], got {tuple(latents.shape)}.")
            latents = latents[:, 0]
        if latents.shape != (B, self.cfg.latent_dim):
            raise ValueError(f"latents must be [{B}, {self.cfg.latent_dim}], got {tuple(latents.shape)}.")
        zeros = torch.zeros(B, device=text_tokens.device)
        text_t = zeros if text_timesteps is None else text_timesteps
        latent_t = zeros if latent_timesteps is None else latent_timesteps
        cond = self.conditioning(text_t, latent_t)
        text = self.text_encoder(text_tokens, soft_tokens)
        latent = self.latent_encoder(latents.to(text.dtype))
        masks = (None if attention_mask is None else attention_mask.bool(), None)

        streams = [self.mmdit.expand_streams(x) for x in (text, latent)]
        for block in self.mmdit.blocks:
            if self.cfg.activation_checkpointing and torch.is_grad_enabled():
                streams = checkpoint(block, modality_tokens=streams, modality_masks=masks, time_cond=cond,
                                     use_reentrant=False)
            else:
                streams = block(modality_tokens=streams, modality_masks=masks, time_cond=cond)
        text, latent = (norm(self.mmdit.reduce_streams(x)) for x, norm in zip(streams, self.mmdit.norms))
        return text, latent[:, 0]

    def forward(self, text_tokens: Tensor, latents: Tensor, text_timesteps: Tensor | None = None,
                latent_timesteps: Tensor | None = None, attention_mask: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """Returns (text_logits [B, S, V], latent_pred [B, D])."""
        text_h, latent_h = self.trunk(text_tokens, latents, text_timesteps, latent_timesteps, attention_mask)
        return self.text_head(text_h), self.latent_head(latent_h)


# Under ZeRO-3 each of these is partitioned as soon as it is built (partitioned.py), the model last
# (whatever no other unit holds). Neither one of them nor the model changes the weights of a unit
# built before; the MMDiT's smaller modules are no units: its blocks initialise their children's
# weights after building them.
PARTITION_UNITS = (TextEncoder, LatentEncoder, Conditioning, MMDiTBlock, MMDiT, TextHead, LGDLM)


def build_model(cfg: ModelConfig, device: torch.device | str | None = None, *, warm_start: bool = True,
                ds_config: dict | None = None) -> LGDLM:
    """Build the model, with the weights of ``model.init_from`` when it is set (warm_start.py; the
    report goes to stderr). ``warm_start=False`` leaves the initial weights, for callers that load
    others next (a checkpoint to resume or evaluate); a model on the meta device holds no values
    and is never warm-started. The hyper-connections pick an initial residual stream with Python's
    ``random``; it is seeded from torch's generator here so one torch seed gives one model.

    Under a ZeRO-3 ``ds_config`` (the run's DeepSpeed JSON) the model is built partitioned over the
    ranks from the start, on DeepSpeed's device (partitioned.py): no rank ever holds all of it, and
    the weights are bitwise those of a whole build from the same seed. ``device`` must then be None."""
    if device is not None and partitions_parameters(ds_config):
        raise ValueError("build_model: a ZeRO-3 ds_config places the model itself; pass no device.")
    state = random.getstate()
    random.seed(int(torch.randint(0, 2**31 - 1, (1,))))
    try:
        with torch.device(device) if device is not None else construction(ds_config, PARTITION_UNITS):
            model = LGDLM(cfg)
    finally:
        random.setstate(state)
    if warm_start and cfg.init_from and (device is None or torch.device(device).type != "meta"):
        from .warm_start import apply_init_from, log  # warm_start reads weights through loading, which builds models
        log(apply_init_from(model, cfg).summary())
    return model


# The training wrappers hold the model as ``.model``, the older trainer and TrainStep (the module
# DeepSpeed wraps) alike, so their state dicts name its weights "model.<name>". The older trainer's
# also holds its text noise schedule buffers, which hold nothing the model needs (the schedule is a
# fixed function here).
TRAINER_PREFIX = "model."
UPSTREAM_EXTRA_PREFIX = "text_noise_schedule."


def unwrap_state_dict(state_dict: dict[str, Tensor]) -> tuple[dict[str, Tensor], list[str]]:
    """(the model's weights under its own names, the keys that are neither those nor the schedule
    buffers) from a training wrapper's state dict."""
    own = {k[len(TRAINER_PREFIX):]: v for k, v in state_dict.items() if k.startswith(TRAINER_PREFIX)}
    unknown = [k for k in state_dict if not k.startswith((TRAINER_PREFIX, UPSTREAM_EXTRA_PREFIX))]
    return own, unknown


def upstream_state_dict(model: LGDLM) -> dict[str, Tensor]:
    """The model's weights in the older trainer's layout ("model." prefix, 0-dim scalars)."""
    return {TRAINER_PREFIX + k: v for k, v in scalars_to_0d(model.state_dict(), model.scalar_param_names).items()}


def load_upstream_state_dict(model: LGDLM, state_dict: dict[str, Tensor]) -> None:
    """Load weights saved in the older trainer's layout. Every model key must be present and no
    unknown key may remain (the schedule buffers are dropped); a mismatch is an error."""
    own, unknown = unwrap_state_dict(state_dict)
    result = model.load_state_dict(own, strict=False)
    problems = [f"missing: {', '.join(result.missing_keys)}"] if result.missing_keys else []
    if result.unexpected_keys or unknown:
        problems.append(f"unexpected: {', '.join(result.unexpected_keys + unknown)}")
    if problems:
        raise KeyError("checkpoint does not match the configured model (check model.* against the run "
                       f"that wrote it; 8 heads x 64 and qk_norm false for the older runs): {'; '.join(problems)}")


def parameter_counts(model: nn.Module) -> dict:
    by_module = {name: sum(p.numel() for p in child.parameters()) for name, child in model.named_children()}
    return {"total_params": sum(by_module.values()), "mmdit_params": by_module.get("mmdit", 0), "by_module": by_module}


def main(argv: list[str] | None = None) -> int:
    parser = cli.parser("model", "The parameter count of a recipe's model, built on the meta device (no memory "
                        "for weights), as one JSON line.")
    parser.add_argument("recipe", help="recipe YAML")
    cli.add_overrides(parser)
    return cli.run(_print_counts, parser.parse_intermixed_args(argv))


def _print_counts(args: argparse.Namespace) -> None:
    cfg = load_config(args.recipe, args.overrides)
    print(json.dumps(parameter_counts(build_model(cfg.model, device="meta"))))


if __name__ == "__main__":
    sys.exit(main())
