"""Step cost of the cycle options against plain cycle_vae, on one model in one process.

    python -m lgdlm_ds.tools.bench_cycle_options [--recipe recipes/04_cycle_options/recipe.yaml] [--rounds 20]

Variants (the recipe's model and micro-batch, the same initial weights, synthetic data of its shape, its options all off
unless named):
  plain           cycle_vae, a step that runs the cycle terms
  base_only       cycle_every: 2 at a step without them (stage 2 on stand-in rows)
  prior           + the latent prior
  stagewise       loss.cycle_stagewise (the reference of restricted)
  restricted      + loss.cycle_text_params from the recipe: a third micro-step
Each round times one forward+backward of every micro-step of each variant in turn, starting from
another variant each round, so a load that drifts (a shared machine) reaches every variant alike;
the median over rounds is reported. The last line printed is one JSON object: median seconds per variant and each one's ratio to plain.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time

import torch
from torch.utils.data import default_collate

from ..config import load_config
from ..data import SyntheticDataset
from ..model import build_model
from ..objectives import TrainStep

RECIPE = "recipes/04_cycle_options/recipe.yaml"
OFF = ["loss.latent_prior_weight=0", "loss.cycle_every=1", "loss.cycle_probability=1",
       "loss.cycle_text_params=[]", "loss.cycle_stagewise=false"]
# name -> overrides after OFF (RESTRICTED: the recipe's cycle_text_params). Every variant is timed at
# step 1, which runs the cycle terms except under cycle_every: 2.
VARIANTS = {"plain": [], "base_only": ["loss.cycle_every=2"], "prior": ["loss.latent_prior_weight=0.1"],
            "stagewise": ["loss.cycle_stagewise=true"], "restricted": ["loss.cycle_stagewise=true", "RESTRICTED"]}
STEP = 1


def _step(module: TrainStep, batch: dict, step: int) -> None:
    torch.manual_seed(1)
    for stage in module.plan.micro_step_stages:
        loss, _ = module(batch, step) if stage is None else module(batch, step, stage=stage)
        loss.backward()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m lgdlm_ds.tools.bench_cycle_options", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--recipe", default=RECIPE)
    parser.add_argument("--rounds", type=int, default=20)
    args = parser.parse_args(argv)
    recipe = load_config(args.recipe)
    groups = "[" + ", ".join(recipe.loss.cycle_text_params) + "]"
    modules = {}
    for name, overrides in VARIANTS.items():
        overrides = [f"loss.cycle_text_params={groups}" if o == "RESTRICTED" else o for o in overrides]
        cfg = load_config(args.recipe, ["data.kind=synthetic", "data.path=", "data.corpus=",
                                        "data.standardize_latents=false", *OFF, *overrides,
                                        f"data.num_samples={recipe.training.micro_batch_size}"])
        torch.manual_seed(0)  # the same weights in every variant; a model each (restricted hooks its own)
        modules[name] = TrainStep(build_model(cfg.model), cfg)
    data = SyntheticDataset(modules["plain"].cfg, "train")
    batch = default_collate([data[i] for i in range(len(data))])
    times = {name: [] for name in modules}
    names = list(modules)
    for r in range(args.rounds + 1):
        for name in names[r % len(names):] + names[:r % len(names)]:  # each variant first in turn
            module = modules[name]
            start = time.perf_counter()
            _step(module, batch, STEP)
            if r:  # round 0 warms up
                times[name].append(time.perf_counter() - start)
            module.zero_grad(set_to_none=True)
    median = {name: statistics.median(t) for name, t in times.items()}
    for name, t in median.items():
        print(f"{name:>12}: {t * 1e3:8.1f} ms  x{t / median['plain']:.2f}")
    print(json.dumps({"step_time_s": median, "ratio_to_plain": {n: t / median["plain"] for n, t in median.items()},
                      "rounds": args.rounds, "micro_batch": recipe.training.micro_batch_size}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
