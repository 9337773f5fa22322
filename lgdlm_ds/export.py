"""Model weights out of a run, for use without DeepSpeed.

``python -m lgdlm_ds.export RUN_DIR --out DIR [--tag TAG] [--upstream-layout]`` writes a directory
that rebuilds the model without DeepSpeed, the run directory or the dataset
(``lgdlm_ds.loading.load_exported``):

- ``model.safetensors``: fp32 weights under the model's own parameter names;
- ``config.yaml``: the run's resolved config (model shape, diffusion, tokenizer and encoder names);
- ``export.json``: the step and checkpoint it came from, the tokenizer's mask/pad ids, and the
  per-dimension latent mean/std when the model works in standardised latent space
  (``data.standardize_latents``), so latents can be converted to and from the encoder's space;
- ``checkpoint.pt`` with ``--upstream-layout``: ``{"model_state_dict": ...}`` in the older trainer's
  layout ("model." prefix, 0-dim hyper-connection scalars; see ``model.upstream_state_dict``).

The weights are those of ``lgdlm_ds.loading.load``: fp32 from any ZeRO stage, every key checked
against the run's config.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

from . import cli
from .config import save_config
from .fileio import write_atomic
from .loading import CONFIG_FILE, EXPORT_FILE, WEIGHTS_FILE, LoadError, load
from .model import upstream_state_dict

UPSTREAM_FILE = "checkpoint.pt"
EXPORT_FORMAT = "lgdlm-export-1"


def export(run_dir: str | Path, out: str | Path, tag: str | None = None, upstream_layout: bool = False,
           overrides: list[str] = ()) -> dict:
    """Write the exported directory of ``run_dir``'s checkpoint ``tag`` (default the newest) into ``out``."""
    from safetensors.torch import save_file
    run_dir, out = Path(run_dir), Path(out)
    if (run_dir / EXPORT_FILE).is_file():
        raise LoadError(f"{run_dir} is already an exported directory; export reads a run directory.")
    loaded = load(run_dir, tag, overrides=overrides)
    out.mkdir(parents=True, exist_ok=True)
    model = loaded.model
    save_file({k: v.detach().float().contiguous() for k, v in model.state_dict().items()}, str(out / WEIGHTS_FILE))
    save_config(loaded.cfg, out / CONFIG_FILE)
    d = loaded.cfg.data
    info = {"format": EXPORT_FORMAT, "step": loaded.step, "source": loaded.source,
            "vocab_size": loaded.cfg.model.vocab_size, "mask_token_id": d.mask_token_id,
            "pad_token_id": d.pad_token_id, "tokenizer": d.tokenizer, "encoder": d.encoder,
            "latent_space": loaded.latent_space.to_dict(),
            "num_parameters": sum(p.numel() for p in model.parameters())}
    files = [WEIGHTS_FILE, CONFIG_FILE, EXPORT_FILE]
    if upstream_layout:
        torch.save({"model_state_dict": upstream_state_dict(model)}, out / UPSTREAM_FILE)
        files.append(UPSTREAM_FILE)
    # Written last: a directory with export.json is a complete export.
    write_atomic(out / EXPORT_FILE, json.dumps(info, indent=1) + "\n")
    return {"out": str(out), "step": loaded.step, "source": loaded.source, "files": files,
            "num_parameters": info["num_parameters"]}


def main(argv: list[str] | None = None) -> int:
    parser = cli.parser("export", __doc__)
    parser.add_argument("run_dir", help="run directory (logging.run_dir of a training run)")
    cli.add_overrides(parser, "the run, e.g. a moved data.path")
    parser.add_argument("--out", required=True, help="directory to write")
    parser.add_argument("--tag", default=None,
                        help="checkpoint tag, e.g. global_step300 (default: the newest complete one)")
    parser.add_argument("--upstream-layout", action="store_true",
                        help="also write checkpoint.pt in the older trainer's layout")
    return cli.run(_export, parser.parse_intermixed_args(argv))


def _export(args: argparse.Namespace) -> None:
    print(json.dumps(export(args.run_dir, args.out, args.tag, args.upstream_layout, args.overrides)))


if __name__ == "__main__":
    sys.exit(main())
