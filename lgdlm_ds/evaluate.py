"""Held-out evaluation: what the model learned in each direction.

    python -m lgdlm_ds.evaluate PATH [--tag TAG] [--batches N] [--untrained] [section.key=value ...]

PATH is a run directory (newest complete checkpoint, or --tag) or a directory written by
lgdlm_ds.export; the samples are the validation split of the run's data, in order, in batches of
training.micro_batch_size (incomplete batches are left out: retrieval is among a batch). The last
line printed is one JSON object with the metrics, the checkpoint's ``step`` and the settings.
``evaluate()`` is the same computation for the engine: on every rank, metrics averaged over all
ranks' samples.

Metrics (token metrics average over real tokens, the others over samples):
- ``l2t_token_accuracy``, ``l2t_text_loss``: every real token [MASK] at text t = 1, the clean
  latent at latent t = 0 (the L2T training pass): argmax accuracy and cross-entropy.
- ``l2t_decode_token_accuracy`` (with decode steps > 0): the text decoded by confidence-ordered
  unmasking (lgdlm_ds.sample.decode_text) at the true length, position by position; with one
  step (the default for runs that never trained partly masked text) it equals l2t_token_accuracy.
- ``t2l_latent_cosine``: cosine between the T2L latent and the true one, in the encoder's space
  (standardised latents are mapped back). The T2L latent is the DDIM estimate of
  lgdlm_ds.sample.ddim_latent from clean text (one step, the x0 prediction at t = 1, for runs
  that trained T2L only at t = 1); ``t2l_steps`` and ``t2l_start`` say which.
- ``t2l_retrieval_accuracy``: share of samples whose T2L latent is, by cosine, closest to their own
  true latent among the batch's (``t2l_retrieval_chance`` = 1 / batch size); ``t2l_latent_mse``:
  mean squared error in the model's latent space.
- ``cycle_text_token_accuracy``, ``cycle_text_loss``: the L2T pass from the T2L latent instead of
  the true one (text -> latent -> text).
- ``text_loss_without_latent``, ``text_accuracy_without_latent``: the L2T pass with the latent
  replaced by pure Gaussian noise at latent t = 1, the diffusion's own state of knowing nothing
  about the latent; ``latent_information`` = text_loss_without_latent - l2t_text_loss, nats per
  token that the latent tells the model.
"""
from __future__ import annotations

import argparse
import json
import sys
from typing import Iterable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from . import cli
from .config import Config
from .data import DataError
from .diffusion import LatentDiffusion
from .loading import LatentSpace, load
from .model import LGDLM, build_model
from .objectives import Pass, l2t_pass
from .plan import ObjectivePlan
from .sample import decode_text, ddim_latent
from .seeding import derive_seed, seed_everything

# Sums reduced over batches and ranks; every metric is a ratio of two of them.
_SUMS = ("tokens", "samples", "l2t_correct", "l2t_ce", "decode_correct", "cosine", "retrieved", "chance", "mse",
         "cycle_correct", "cycle_ce", "nolat_correct", "nolat_ce")


def _unwrap(model: nn.Module) -> LGDLM:
    """The LGDLM inside a DeepSpeed engine and/or a TrainStep."""
    for _ in range(2):
        if isinstance(model, LGDLM):
            return model
        model = getattr(model, "module", None) or getattr(model, "model", None)
    if not isinstance(model, LGDLM):
        raise TypeError("evaluate needs an LGDLM, a TrainStep or a DeepSpeed engine around one, "
                        f"got {type(model).__name__}.")
    return model


def _l2t(model: LGDLM, p: Pass) -> tuple[Tensor, Tensor]:
    """(correct tokens, summed CE) of an L2T pass over its supervised positions."""
    hidden, _ = model.trunk(p.tokens, p.latents, p.text_t, p.latent_t, p.attention_mask)
    targets = p.text_targets[p.text_loss_mask]
    _, ce, argmax, _ = model.text_head(hidden[p.text_loss_mask], targets)
    return (argmax == targets).sum(), ce.float().sum()


@torch.no_grad()
def evaluate(model: nn.Module, cfg: Config, batches: Iterable[dict[str, Tensor]], *,
             latent_space: LatentSpace | None = None, seed: int = 0, t2l_steps: int | None = None,
             decode_steps: int = 0) -> dict[str, float]:
    """Metrics of the module doc over ``batches`` (dicts with input_ids, attention_mask and latent in
    the model's space, as the datasets give them), summed over all ranks when torch.distributed is
    initialised. Collective then: every rank must pass the same number of batches (ZeRO-3 gathers
    weights in every model call).

    ``model``: an LGDLM, a TrainStep, or the DeepSpeed engine around one. ``latent_space``: the map
    to the encoder's space for the cosines (default: read from ``cfg``). ``seed``: the noise of the
    T2L sampler and of the no-latent pass (per rank). ``t2l_steps``: DDIM steps (default: see
    lgdlm_ds.plan.ObjectivePlan.t2l_steps). ``decode_steps``: unmasking steps of the decoding metric
    (0: not computed). Returns floats; the model's train/eval mode is restored."""
    lgdlm = _unwrap(model)
    space = latent_space if latent_space is not None else LatentSpace.from_config(cfg)
    diffusion = LatentDiffusion.from_config(cfg.diffusion)
    plan = ObjectivePlan.from_config(cfg)
    t_start, t2l_steps = plan.t2l_start, t2l_steps or plan.t2l_steps
    mask_id, pad_id = cfg.data.mask_token_id, cfg.data.pad_token_id
    device = next(lgdlm.parameters()).device
    distributed = torch.distributed.is_available() and torch.distributed.is_initialized()
    rank = torch.distributed.get_rank() if distributed else 0
    g = torch.Generator(device=device).manual_seed(derive_seed(seed, "evaluate", rank))
    sums = dict.fromkeys(_SUMS, torch.zeros((), dtype=torch.float64, device=device))

    def add(name: str, value) -> None:
        sums[name] = sums[name] + value

    was_training = lgdlm.training
    lgdlm.eval()
    try:
        for batch in batches:
            ids = batch["input_ids"].to(device)
            real = batch["attention_mask"].to(device).bool()
            x0 = batch["latent"].to(device).float()
            B = ids.shape[0]
            add("tokens", real.sum())
            add("samples", B)

            correct, ce = _l2t(lgdlm, l2t_pass(ids, real, x0, mask_id))
            add("l2t_correct", correct)
            add("l2t_ce", ce)

            x0_hat = ddim_latent(lgdlm, diffusion, ids, real, cfg.model.latent_dim, t_start, t2l_steps, g)
            pred, true = space.to_data(x0_hat), space.to_data(x0)
            add("cosine", F.cosine_similarity(pred, true).sum())
            similarity = F.normalize(pred, dim=-1) @ F.normalize(true, dim=-1).T
            add("retrieved", (similarity.argmax(1) == torch.arange(B, device=device)).sum())
            add("chance", 1.0)  # B samples x 1/B
            add("mse", (x0_hat - x0).pow(2).mean(1).sum())

            correct, ce = _l2t(lgdlm, l2t_pass(ids, real, x0_hat, mask_id))
            add("cycle_correct", correct)
            add("cycle_ce", ce)

            noise = torch.randn(x0.shape, generator=g, device=device)
            correct, ce = _l2t(lgdlm, l2t_pass(ids, real, noise, mask_id, latent_t=torch.ones(B, device=device)))
            add("nolat_correct", correct)
            add("nolat_ce", ce)

            if decode_steps:
                decoded = decode_text(lgdlm, x0, real.sum(1), ids.shape[1], mask_id, pad_id, decode_steps)
                add("decode_correct", ((decoded == ids) & real).sum())
    finally:
        lgdlm.train(was_training)

    vec = torch.stack([sums[k] for k in _SUMS])
    if distributed:
        torch.distributed.all_reduce(vec)
    s = dict(zip(_SUMS, vec.tolist()))
    if not s["samples"]:
        raise DataError("evaluate got no batch: the validation split has fewer samples than one batch.")
    tokens, samples = max(s["tokens"], 1.0), s["samples"]
    out = {"l2t_token_accuracy": s["l2t_correct"] / tokens, "l2t_text_loss": s["l2t_ce"] / tokens,
           "t2l_latent_cosine": s["cosine"] / samples, "t2l_retrieval_accuracy": s["retrieved"] / samples,
           "t2l_retrieval_chance": s["chance"] / samples, "t2l_latent_mse": s["mse"] / samples,
           "cycle_text_token_accuracy": s["cycle_correct"] / tokens, "cycle_text_loss": s["cycle_ce"] / tokens,
           "text_loss_without_latent": s["nolat_ce"] / tokens,
           "text_accuracy_without_latent": s["nolat_correct"] / tokens}
    out["latent_information"] = out["text_loss_without_latent"] - out["l2t_text_loss"]
    if decode_steps:
        out["l2t_decode_token_accuracy"] = s["decode_correct"] / tokens
    out.update(num_samples=int(samples), t2l_steps=t2l_steps, t2l_start=t_start, decode_steps=decode_steps)
    return out


def load_batches(cfg: Config, split: str, batch_size: int, max_batches: int | None = None) -> list[dict[str, Tensor]]:
    """The first ``max_batches`` (default all) complete batches of a split, in order."""
    from torch.utils.data import default_collate

    from .batching import eval_batches
    from .data import build_dataset
    ds = build_dataset(cfg, split)
    index = eval_batches(len(ds), 1, 0, batch_size, max_batches or len(ds))
    return [default_collate([ds[i] for i in idx]) for idx in index]


def main(argv: list[str] | None = None) -> int:
    parser = cli.parser("evaluate", __doc__)
    parser.add_argument("path", help="run directory or exported directory")
    cli.add_overrides(parser, "the run, e.g. a moved data.path")
    parser.add_argument("--tag", default=None,
                        help="checkpoint tag of a run directory (default: the newest complete one)")
    parser.add_argument("--batches", type=int, default=None, help="evaluate at most this many batches (default: all)")
    parser.add_argument("--batch-size", type=int, default=None,
                        help="samples per batch (default: training.micro_batch_size)")
    parser.add_argument("--split", choices=("validation", "train"), default="validation")
    parser.add_argument("--t2l-steps", type=int, default=None, help="DDIM steps of the T2L latent (default: 1 when "
                        "T2L trained only at t=1, else 10)")
    parser.add_argument("--decode-steps", type=int, default=None, help="steps of the decoding metric (0: off; default: "
                        "lgdlm_ds.sample's, 1 when the run never trained partly masked text)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the T2L and no-latent noise (default 0)")
    parser.add_argument("--device", default="cpu", help="torch device (default cpu)")
    parser.add_argument("--untrained", action="store_true", help="evaluate the run's initial model (its seed, no "
                        "training) instead of a checkpoint: the baseline the metrics should beat")
    args = parser.parse_intermixed_args(argv)
    for name, least in (("batches", 1), ("batch_size", 1), ("t2l_steps", 1), ("decode_steps", 0)):
        if getattr(args, name) is not None and getattr(args, name) < least:
            parser.error(f"--{name.replace('_', '-')} must be at least {least}.")
    return cli.run(_evaluate, args)


def _evaluate(args: argparse.Namespace) -> None:
    loaded = load(args.path, args.tag, device=args.device, overrides=args.overrides)
    cfg = loaded.cfg
    model, step, source = loaded.model, loaded.step, loaded.source
    if args.untrained:
        seed_everything(cfg.training.seed)  # as the trainer does before building the model
        model, step, source = build_model(cfg.model).to(args.device), 0, "untrained"
    batches = load_batches(cfg, args.split, args.batch_size or cfg.training.micro_batch_size, args.batches)
    decode_steps = ObjectivePlan.from_config(cfg).decode_steps if args.decode_steps is None else args.decode_steps
    metrics = evaluate(model, cfg, batches, latent_space=loaded.latent_space, seed=args.seed,
                       t2l_steps=args.t2l_steps, decode_steps=decode_steps)
    print(json.dumps({**metrics, "step": step, "checkpoint": source, "split": args.split, "seed": args.seed}))


if __name__ == "__main__":
    sys.exit(main())
