"""Held-out evaluation: what the model learned in each direction.

    python -m lgdlm_ds.evaluate PATH [--tag TAG] [--batches N] [--untrained] [--guidance W] [--no-baselines]
                               [section.key=value ...]

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
  (standardised latents are mapped back). The T2L latent is the DDIM sample of
  lgdlm_ds.sample.ddim_latent from clean text: ``t2l_steps`` steps from noise at latent time
  ``t2l_start`` (one step, the x0 prediction at t = 1, for runs that trained T2L only at t = 1).
- ``t2l_retrieval_accuracy``: share of samples whose T2L latent is, by cosine, closest to their own
  true latent among the batch's (``t2l_retrieval_chance`` = 1 / batch size); ``t2l_latent_mse``:
  mean squared error in the model's latent space.
- ``t2l_retrieval_accuracy_at_64`` and ``t2l_retrieval_accuracy_at_N``: retrieval over pools of 64
  samples and over all N samples evaluated (at most 4096: the first ones, rank by rank, when
  there are more), whatever the batch size: the probability that the own latent is the closest
  among a pool of the sample and 63 others drawn at random, exact (lgdlm_ds.baselines.retrieval_at;
  chance 1 / 64). The ``_at_64`` key is left out with fewer than 64 samples.
- ``t2l_x0_*`` (``t2l_x0_latent_cosine``, ``t2l_x0_retrieval_accuracy``, ``t2l_x0_latent_mse``,
  ``t2l_x0_retrieval_accuracy_at_64``, ...): the same metrics of the model's one-step x0
  prediction from the same noise at ``t2l_start``, beside the DDIM sample's ``t2l_*``: an
  underfit model trained at random latent times can do worse after more steps than its own
  first prediction. With ``t2l_steps`` 1 both are the same latent.
- ``cycle_text_token_accuracy``, ``cycle_text_loss``: the L2T pass from the T2L latent instead of
  the true one (text -> latent -> text).
- ``text_loss_without_latent``, ``text_accuracy_without_latent``: the L2T pass with the latent
  replaced by pure Gaussian noise at latent t = 1, the diffusion's own state of knowing nothing
  about the latent; ``latent_information`` = text_loss_without_latent - l2t_text_loss, nats per
  token that the latent tells the model.
- ``text_nelbo`` (with elbo samples > 0): the text diffusion's bound on -log p(text | latent) per
  real token (MDLM: 1/t x CE summed over the tokens masked at text time t, diffusion.elbo_weight),
  the clean latent as input at latent t = 0; ``text_nelbo_without_latent``: the same masks with the
  latent as noise at latent t = 1, a bound on -log p(text); ``latent_nats_per_token``: their
  difference, what the latent is worth to the text model. Each sample draws ``elbo_samples`` text
  times, stratified over the batch (diffusion.antithetic_times). Meaningful for models that trained
  on partly masked text (unconditional passes); the default runs it for them only.
- ``t2l_guidance``: the classifier-free guidance weight of the T2L sampler (lgdlm_ds.sample).

Baselines (lgdlm_ds.baselines; off with ``--no-baselines``), fit on the first ``--baseline-samples``
(4096) samples of the run's training split and evaluated on the same samples as the model. Each
key is ``baseline_<predictor>_`` followed by the model key it stands beside:
- ``baseline_mean_latent_t2l_*`` (the training mean latent for every text) and
  ``baseline_ridge_tfidf_t2l_*`` (ridge regression from the TF-IDF of the token ids; its penalty,
  chosen by 5-fold cross-validation on the training split, is ``baseline_ridge_tfidf_lambda``): every
  T2L metric above, e.g. ``baseline_ridge_tfidf_t2l_latent_cosine``,
  ``baseline_ridge_tfidf_t2l_retrieval_accuracy_at_64``.
- ``baseline_unigram_l2t_text_loss``, ``baseline_unigram_l2t_token_accuracy``: the training split's
  token frequencies, no context and no latent (compare text_loss_without_latent).
- ``baseline_nearest_neighbour_l2t_token_accuracy``: the training sentence with the nearest latent,
  position by position (on the training split itself it is exact).
- ``baseline_train_samples``: the training samples they were fit on; ``baseline_fit_seconds`` (the
  command only): what fitting them cost, a few seconds per thousand training samples on a CPU.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from typing import Iterable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from . import cli
from .config import Config
from .data import DataError
from .diffusion import LatentDiffusion, antithetic_times, elbo_weight, mask_probability
from .baselines import FOLDS, MAX_SAMPLES, Baselines, retrieval_at
from .loading import LatentSpace, load
from .model import LGDLM, build_model
from .objectives import Pass, l2t_pass
from .plan import ObjectivePlan
from .sample import decode_text, ddim_latent
from .seeding import derive_seed, seed_everything

# Sums reduced over batches and ranks; every metric is a ratio of two of them.
_SUMS = ("tokens", "samples", "l2t_correct", "l2t_ce", "decode_correct", "chance", "cycle_correct", "cycle_ce",
         "nolat_correct", "nolat_ce", "elbo_tokens", "nelbo", "nelbo_nolat")
# Per T2L predictor (key prefix): summed cosine, in-batch retrievals, squared error.
_T2L_SUMS = ("cosine", "retrieved", "mse")
_BASELINE_SUMS = ("unigram_correct", "unigram_ce", "nn_correct")
POOL = 64             # retrieval pool of the _at_64 metrics
POOL_SAMPLES = 4096   # samples of the pool metrics at most: their similarity matrix is n x n


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
    """(correct tokens, summed CE, weighted by text_weights when set) of a pass over its
    supervised positions."""
    hidden, _ = model.trunk(p.tokens, p.latents, p.text_t, p.latent_t, p.attention_mask)
    targets = p.text_targets[p.text_loss_mask]
    _, ce, argmax, _ = model.text_head(hidden[p.text_loss_mask], targets)
    weights = 1.0 if p.text_weights is None else p.text_weights[p.text_loss_mask]
    return (argmax == targets).sum(), (ce.double() * weights).sum()


def _bound_passes(ids: Tensor, real: Tensor, x0: Tensor, mask_token_id: int, g: torch.Generator) -> tuple[Pass, Pass]:
    """The text bound's passes at one draw of text times (stratified over the batch) and masks: the
    clean latent at latent t = 0, and noise at latent t = 1; CE weighted by 1/t at the masked tokens."""
    B, device = ids.shape[0], ids.device
    t = antithetic_times(torch.rand(B, generator=g, device=device), torch.arange(B, device=device), B)
    masked = (torch.rand(ids.shape, generator=g, device=device) < mask_probability(t)[:, None]) & real
    tokens = torch.where(masked, torch.full_like(ids, mask_token_id), ids)
    weights = elbo_weight(t)[:, None].expand_as(ids)
    noise = torch.randn(x0.shape, generator=g, device=device)
    return tuple(Pass(tokens, t, latents, torch.full_like(t, latent_t), real, text_targets=ids,
                      text_loss_mask=masked, text_weights=weights)
                 for latents, latent_t in ((x0, 0.0), (noise, 1.0)))


def _gather_rows(x: Tensor, distributed: bool) -> Tensor:
    """Every rank's rows of ``x`` [n_rank, ...], rank by rank (ranks may hold different counts)."""
    if not distributed:
        return x
    world = torch.distributed.get_world_size()
    counts = [torch.zeros(1, dtype=torch.long, device=x.device) for _ in range(world)]
    torch.distributed.all_gather(counts, torch.tensor([x.shape[0]], device=x.device))
    counts = [int(c) for c in counts]
    padded = x.new_zeros(max(counts), *x.shape[1:])
    padded[:x.shape[0]] = x
    parts = [torch.empty_like(padded) for _ in range(world)]
    torch.distributed.all_gather(parts, padded)
    return torch.cat([p[:c] for p, c in zip(parts, counts)])


def _pool_retrieval(directions: dict[str, list[Tensor]], truth: list[Tensor], distributed: bool) -> dict[str, float]:
    """``<prefix>_retrieval_accuracy_at_64`` and ``_at_N`` of every T2L predictor over the first
    POOL_SAMPLES samples of all ranks (unit vectors in the encoder's space)."""
    stacked = torch.stack([torch.cat(v) for v in (*directions.values(), truth)])  # [P + 1, n, D]
    stacked = _gather_rows(stacked.transpose(0, 1), distributed).transpose(0, 1)[:, :POOL_SAMPLES]
    n = stacked.shape[1]
    pools = sorted({p for p in (POOL, n) if 1 < p <= n})
    out = {}
    for prefix, pred in zip(directions, stacked[:-1]):
        similarity = pred @ stacked[-1].T
        out.update({f"{prefix}_retrieval_accuracy_at_{p}": retrieval_at(similarity, p) for p in pools})
    return out


@torch.no_grad()
def evaluate(model: nn.Module, cfg: Config, batches: Iterable[dict[str, Tensor]], *,
             latent_space: LatentSpace | None = None, seed: int = 0, t2l_steps: int | None = None,
             decode_steps: int = 0, elbo_samples: int = 0, guidance: float = 0.0,
             baselines: Baselines | None = None) -> dict[str, float]:
    """Metrics of the module doc over ``batches`` (dicts with input_ids, attention_mask and latent in
    the model's space, as the datasets give them), summed over all ranks when torch.distributed is
    initialised. Collective then: every rank must pass the same number of batches (ZeRO-3 gathers
    weights in every model call).

    ``model``: an LGDLM, a TrainStep, or the DeepSpeed engine around one. ``latent_space``: the map
    to the encoder's space for the cosines (default: read from ``cfg``). ``seed``: the noise of the
    T2L sampler and of the no-latent pass (per rank). ``t2l_steps``: DDIM steps (default: see
    lgdlm_ds.plan.ObjectivePlan.t2l_steps). ``decode_steps``: unmasking steps of the decoding metric
    (0: not computed). ``elbo_samples``: text-time draws per sample of the bound metrics (0: not
    computed). ``guidance``: classifier-free guidance weight of the T2L sampler. ``baselines``: the
    fitted baselines to score beside the model (None: none). Returns floats; the model's
    train/eval mode is restored."""
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
    # The T2L predictors by key prefix: the model's DDIM sample and one-step x0 prediction, then the baselines'.
    prefixes = ["t2l", "t2l_x0", *([f"baseline_{name}_t2l" for name in Baselines.T2L] if baselines else [])]
    names = [*_SUMS, *(f"{p}_{k}" for p in prefixes for k in _T2L_SUMS), *(_BASELINE_SUMS if baselines else ())]
    sums = dict.fromkeys(names, torch.zeros((), dtype=torch.float64, device=device))
    directions: dict[str, list[Tensor]] = {p: [] for p in prefixes}  # unit latents (encoder space) for the pools
    truth: list[Tensor] = []
    pooled = 0  # samples kept for the pool metrics on this rank

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

            noise_state = g.get_state()
            x0_hat = ddim_latent(lgdlm, diffusion, ids, real, cfg.model.latent_dim, t_start, t2l_steps, g,
                                 guidance=guidance, mask_token_id=mask_id)
            predicted = {"t2l": x0_hat, "t2l_x0": x0_hat}
            if t2l_steps > 1:  # the first step's prediction: the same noise, one model call
                first = torch.Generator(device=device)
                first.set_state(noise_state)
                predicted["t2l_x0"] = ddim_latent(lgdlm, diffusion, ids, real, cfg.model.latent_dim, t_start, 1,
                                                  first, guidance=guidance, mask_token_id=mask_id)
            if baselines:
                predicted.update((f"baseline_{name}_t2l", z) for name, z in baselines.t2l(ids, real).items())
            true = F.normalize(space.to_data(x0), dim=-1)
            room = POOL_SAMPLES - pooled
            truth.append(true[:room])
            pooled += len(truth[-1])
            add("chance", 1.0)  # B samples x 1/B
            for prefix, z in predicted.items():
                pred = F.normalize(space.to_data(z), dim=-1)
                add(f"{prefix}_cosine", (pred * true).sum(1).sum())
                add(f"{prefix}_retrieved", ((pred @ true.T).argmax(1) == torch.arange(B, device=device)).sum())
                add(f"{prefix}_mse", (z - x0).pow(2).mean(1).sum())
                directions[prefix].append(pred[:room])

            correct, ce = _l2t(lgdlm, l2t_pass(ids, real, x0_hat, mask_id))
            add("cycle_correct", correct)
            add("cycle_ce", ce)

            noise = torch.randn(x0.shape, generator=g, device=device)
            correct, ce = _l2t(lgdlm, l2t_pass(ids, real, noise, mask_id, latent_t=torch.ones(B, device=device)))
            add("nolat_correct", correct)
            add("nolat_ce", ce)

            if baselines:
                correct, ce = baselines.unigram(ids, real)
                add("unigram_correct", correct.to(device))
                add("unigram_ce", ce.to(device))
                add("nn_correct", baselines.nearest_neighbour(ids, real, x0).to(device))

            if decode_steps:
                decoded = decode_text(lgdlm, x0, real.sum(1), ids.shape[1], mask_id, pad_id, decode_steps)
                add("decode_correct", ((decoded == ids) & real).sum())

            for _ in range(elbo_samples):
                with_latent, without = _bound_passes(ids, real, x0, mask_id, g)
                add("elbo_tokens", real.sum())
                add("nelbo", _l2t(lgdlm, with_latent)[1])
                add("nelbo_nolat", _l2t(lgdlm, without)[1])
    finally:
        lgdlm.train(was_training)

    vec = torch.stack([sums[k] for k in names])
    if distributed:
        torch.distributed.all_reduce(vec)
    s = dict(zip(names, vec.tolist()))
    if not s["samples"]:
        raise DataError("evaluate got no batch: the validation split has fewer samples than one batch.")
    tokens, samples = max(s["tokens"], 1.0), s["samples"]
    out = {"l2t_token_accuracy": s["l2t_correct"] / tokens, "l2t_text_loss": s["l2t_ce"] / tokens}
    for prefix in prefixes:
        out.update({f"{prefix}_latent_cosine": s[f"{prefix}_cosine"] / samples,
                    f"{prefix}_retrieval_accuracy": s[f"{prefix}_retrieved"] / samples,
                    f"{prefix}_latent_mse": s[f"{prefix}_mse"] / samples})
        if prefix == "t2l":
            out["t2l_retrieval_chance"] = s["chance"] / samples
    out.update(_pool_retrieval(directions, truth, distributed))
    out.update({"cycle_text_token_accuracy": s["cycle_correct"] / tokens, "cycle_text_loss": s["cycle_ce"] / tokens,
                "text_loss_without_latent": s["nolat_ce"] / tokens,
                "text_accuracy_without_latent": s["nolat_correct"] / tokens})
    out["latent_information"] = out["text_loss_without_latent"] - out["l2t_text_loss"]
    if decode_steps:
        out["l2t_decode_token_accuracy"] = s["decode_correct"] / tokens
    if elbo_samples:
        out["text_nelbo"] = s["nelbo"] / s["elbo_tokens"]
        out["text_nelbo_without_latent"] = s["nelbo_nolat"] / s["elbo_tokens"]
        out["latent_nats_per_token"] = out["text_nelbo_without_latent"] - out["text_nelbo"]
    if baselines:
        out.update(baseline_unigram_l2t_text_loss=s["unigram_ce"] / tokens,
                   baseline_unigram_l2t_token_accuracy=s["unigram_correct"] / tokens,
                   baseline_nearest_neighbour_l2t_token_accuracy=s["nn_correct"] / tokens,
                   baseline_ridge_tfidf_lambda=baselines.ridge_lambda, baseline_train_samples=baselines.num_samples)
    out.update(num_samples=int(samples), t2l_steps=t2l_steps, t2l_start=t_start, t2l_guidance=guidance,
               decode_steps=decode_steps, elbo_samples=elbo_samples)
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
    parser.add_argument("--elbo-samples", type=int, default=None, help="text-time draws per sample of the bound "
                        "metrics text_nelbo* (0: off; default: 1 when the run trained unconditional passes, else 0)")
    parser.add_argument("--guidance", type=float, default=0.0, help="classifier-free guidance weight of the T2L "
                        "sampler (default 0: unguided; see lgdlm_ds.sample)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the T2L, no-latent and bound noise (default 0)")
    parser.add_argument("--device", default="cpu", help="torch device (default cpu)")
    parser.add_argument("--no-baselines", dest="baselines", action="store_false", help="leave the baselines out "
                        "(they read the training split once and fit a ridge regression: seconds per thousand samples)")
    parser.add_argument("--baseline-samples", type=int, default=MAX_SAMPLES, help="training samples the baselines "
                        f"are fit on: the first ones of the split (default {MAX_SAMPLES}; the ridge costs their cube)")
    parser.add_argument("--untrained", action="store_true", help="evaluate the run's initial model (its seed, no "
                        "training) instead of a checkpoint: the baseline the metrics should beat")
    args = parser.parse_intermixed_args(argv)
    for name, least in (("batches", 1), ("batch_size", 1), ("t2l_steps", 1), ("decode_steps", 0), ("elbo_samples", 0),
                        ("guidance", 0), ("baseline_samples", FOLDS)):
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
    baselines, fit_seconds = None, None
    if args.baselines:
        started = time.perf_counter()
        baselines = Baselines.from_split(cfg, "train", loaded.latent_space.to_data, args.baseline_samples)
        fit_seconds = round(time.perf_counter() - started, 2)
    plan = ObjectivePlan.from_config(cfg)
    decode_steps = plan.decode_steps if args.decode_steps is None else args.decode_steps
    elbo_samples = int("unconditional" in plan.trained_modes) if args.elbo_samples is None else args.elbo_samples
    metrics = evaluate(model, cfg, batches, latent_space=loaded.latent_space, seed=args.seed,
                       t2l_steps=args.t2l_steps, decode_steps=decode_steps, elbo_samples=elbo_samples,
                       guidance=args.guidance, baselines=baselines)
    if baselines:
        metrics["baseline_fit_seconds"] = fit_seconds
    print(json.dumps({**metrics, "step": step, "checkpoint": source, "split": args.split, "seed": args.seed}))


if __name__ == "__main__":
    sys.exit(main())
