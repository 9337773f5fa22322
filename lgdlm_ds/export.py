"""Model weights out of a run and back in.

``python -m lgdlm_ds.export RUN_DIR --out DIR [--tag TAG] [--upstream-layout]`` writes a directory
that rebuilds the model without DeepSpeed, the run directory or the dataset:

- ``model.safetensors``: fp32 weights under the model's own parameter names;
- ``config.yaml``: the run's resolved config (model shape, diffusion, tokenizer and encoder names);
- ``export.json``: the step and checkpoint it came from, the tokenizer's mask/pad ids, and the
  per-dimension latent mean/std when the model works in standardised latent space
  (``data.standardize_latents``), so latents can be converted to and from the encoder's space;
- ``checkpoint.pt`` with ``--upstream-layout``: ``{"model_state_dict": ...}`` in the older trainer's
  layout ("model." prefix, 0-dim hyper-connection scalars; see ``model.upstream_state_dict``).

Where the fp32 weights of a checkpoint live depends on the ZeRO stage. ZeRO-1/2/3 partition the fp32
master weights over the ranks' optimizer files (DeepSpeed's zero_to_fp32 assembles them); bf16
ZeRO-0 keeps them in its optimizer state, in optimizer order; fp32 ZeRO-0 saves the module itself.
zero_to_fp32 assembles whatever the checkpoint names and the usual load is non-strict, so every
weight is checked here against the configured model: a missing, unexpected or misshapen key is an
error, never a silently random-initialised weight.

``load(path)`` gives the model (and what goes with it) from a run directory or an exported one.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from .checkpoint import MARKER, CheckpointError, complete_tags, read_pointer
from .config import Config, ConfigError, load_config, save_config
from .data import DataError, PackedDataset
from .model import LGDLM, build_model, upstream_state_dict

CONFIG_FILE, EXPORT_FILE = "config.yaml", "export.json"
WEIGHTS_FILE, UPSTREAM_FILE = "model.safetensors", "checkpoint.pt"
EXPORT_FORMAT = "lgdlm-export-1"
# TrainStep, the module DeepSpeed wraps, holds the model as ``.model``: checkpoint keys carry this prefix.
TRAIN_STEP_PREFIX = "model."


class ExportError(ValueError):
    """A run, checkpoint or export directory that cannot give the model; the message says why and what to do."""


# ---------------------------------------------------------------- latent space

@dataclass
class LatentSpace:
    """The map between the encoder's latents and the model's. With ``data.standardize_latents`` the
    model was trained on (z - mean) / std per dimension; otherwise both spaces are the same."""
    mean: np.ndarray | None = None
    std: np.ndarray | None = None

    @classmethod
    def from_config(cls, cfg: Config) -> "LatentSpace":
        if not cfg.data.standardize_latents:
            return cls()
        # The training split's dataset holds exactly the mean/std (with its floor) training used.
        ds = PackedDataset(cfg.data.path, "train", standardize_latents=True)
        return cls(ds.mean, ds.std)

    @classmethod
    def from_dict(cls, d: dict | None) -> "LatentSpace":
        if not d:
            return cls()
        return cls(np.asarray(d["mean"], dtype=np.float32), np.asarray(d["std"], dtype=np.float32))

    def to_dict(self) -> dict | None:
        return None if self.mean is None else {"mean": self.mean.tolist(), "std": self.std.tolist()}

    def to_model(self, z: Tensor) -> Tensor:
        if self.mean is None:
            return z
        return (z - z.new_tensor(self.mean)) / z.new_tensor(self.std)

    def to_data(self, z: Tensor) -> Tensor:
        if self.mean is None:
            return z
        return z * z.new_tensor(self.std) + z.new_tensor(self.mean)


# ---------------------------------------------------------------- checkpoints -> fp32 state dict

def run_config(run_dir: Path, overrides: list[str] = ()) -> Config:
    path = run_dir / CONFIG_FILE
    if not path.is_file():
        raise ExportError(f"{path} does not exist: {run_dir} is no run directory (training writes config.yaml "
                          "there when it starts) and no exported directory.")
    try:
        return load_config(path, overrides)
    except ConfigError as e:
        raise ExportError(f"{path}: {e}") from e


def find_checkpoint(run_dir: Path, tag: str | None = None) -> tuple[Path, int]:
    """(checkpoint folder, its step): ``tag``, or the newest complete checkpoint."""
    ckpt_dir = run_dir / "checkpoints"
    tags = complete_tags(ckpt_dir) if ckpt_dir.is_dir() else []
    if tag is None:
        try:
            tag = read_pointer(ckpt_dir)
        except CheckpointError as e:
            raise ExportError(str(e)) from e
        if tag is None:
            raise ExportError(f"{ckpt_dir} holds no complete checkpoint (training saves one every "
                              "logging.save_every steps and at the end); train longer or pass another run.")
    elif tag not in tags:
        raise ExportError(f"{ckpt_dir / tag} is not a complete checkpoint; complete ones: "
                          f"{', '.join(tags) or 'none'} (pass one with --tag, or leave --tag out for the newest).")
    folder = ckpt_dir / tag
    return folder, json.loads((folder / MARKER).read_text())["step"]


def _zero_to_fp32(folder: Path) -> dict[str, Tensor]:
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint
    with contextlib.redirect_stdout(sys.stderr):  # it prints progress; stdout is for results
        return get_fp32_state_dict_from_zero_checkpoint(str(folder.parent), tag=folder.name)


def _zero0_master_weights(states: dict, cfg: Config) -> dict[str, Tensor]:
    """bf16 ZeRO-0 keeps fp32 masters as ``optimizer.fp32_groups``: one list per optimizer param
    group, in that group's order, without names. The order is rebuilt from the same grouping the
    engine used, and verified: every master must round to the saved 16-bit module weight exactly."""
    from .objectives import TrainStep
    from .optim import param_groups
    step = TrainStep(build_model(cfg.model, device="meta"), cfg)
    names = {id(p): n for n, p in step.named_parameters()}
    groups = [[names[id(p)] for p in g["params"]] for g in param_groups(step, cfg.training.weight_decay)]
    masters, module = states["optimizer"]["fp32_groups"], states["module"]
    if [len(g) for g in groups] != [len(g) for g in masters]:
        raise ExportError(f"the checkpoint's optimizer holds {[len(g) for g in masters]} fp32 weights per group, "
                          f"the configured model {[len(g) for g in groups]}: config.yaml does not describe the "
                          "model that was trained.")
    out = {}
    for group_names, group_masters in zip(groups, masters):
        for name, master in zip(group_names, group_masters):
            saved = module.get(name)
            if saved is None or saved.shape != master.shape or not torch.equal(master.to(saved.dtype), saved):
                raise ExportError(f"the fp32 master weight taken for '{name}' does not match that weight in the "
                                  "module file; the checkpoint's optimizer order differs from this version's.")
            out[name] = master.float()
    return out


def checkpoint_state_dict(folder: Path, cfg: Config) -> dict[str, Tensor]:
    """The fp32 weights saved in one DeepSpeed checkpoint folder, under DeepSpeed's names."""
    if any(folder.glob("*_optim_states.pt")):  # ZeRO-1/2/3: partitioned fp32 masters
        return _zero_to_fp32(folder)
    module_file = folder / "mp_rank_00_model_states.pt"
    if not module_file.is_file():
        raise ExportError(f"{folder} has neither optimizer shards (*_optim_states.pt) nor {module_file.name}: "
                          "not a DeepSpeed checkpoint, or a damaged one.")
    # The file holds DeepSpeed's pickled client state besides tensors, so weights_only cannot read it.
    states = torch.load(module_file, map_location="cpu", weights_only=False)
    if "fp32_groups" in (states.get("optimizer") or {}):
        return _zero0_master_weights(states, cfg)
    module = states["module"]
    low = sorted(k for k, v in module.items() if v.is_floating_point() and v.dtype != torch.float32)
    if low:
        raise ExportError(f"{module_file} holds 16-bit weights ({low[0]}, ...) and no fp32 master copy; "
                          "exporting them would not give the fp32 weights the run trained.")
    return dict(module)


def model_state_dict(saved: dict[str, Tensor], model: LGDLM, where: str) -> dict[str, Tensor]:
    """``saved`` (TrainStep names) mapped onto ``model``'s names; every key must match in name and shape."""
    own = model.state_dict()
    scalars = set(model.scalar_param_names)
    state, unexpected = {}, []
    for key, value in saved.items():
        name = key[len(TRAIN_STEP_PREFIX):] if key.startswith(TRAIN_STEP_PREFIX) else None
        if name not in own:
            unexpected.append(key)
            continue
        # Hyper-connection scalars: shape () in older files, (1,) in this model (see model.py).
        state[name] = value.reshape(1) if name in scalars and value.dim() == 0 else value
    missing = sorted(set(own) - set(state))
    shapes = [f"{n} {tuple(v.shape)} (model {tuple(own[n].shape)})" for n, v in state.items()
              if v.shape != own[n].shape]
    problems = [f"{len(missing)} missing: {', '.join(missing)}"] if missing else []
    problems += [f"{len(unexpected)} unexpected: {', '.join(unexpected)}"] if unexpected else []
    problems += [f"wrong shape: {', '.join(shapes)}"] if shapes else []
    if problems:
        raise ExportError(f"{where} does not match the model its config.yaml describes ({'; '.join(problems)}). "
                          "Check model.* in config.yaml against the run that wrote the checkpoint.")
    return state


# ---------------------------------------------------------------- loading

@dataclass
class Loaded:
    """A model ready for inference and what goes with it."""
    model: LGDLM
    cfg: Config
    step: int
    source: str
    latent_space: LatentSpace


def _build(cfg: Config, state: dict[str, Tensor], device) -> LGDLM:
    model = build_model(cfg.model)
    model.load_state_dict(state, strict=True)
    return model.to(device).eval()


def load(path: str | Path, tag: str | None = None, device: str | torch.device = "cpu",
         overrides: list[str] = ()) -> Loaded:
    """The model from an exported directory or from a run directory (checkpoint ``tag``, default the
    newest complete one). ``overrides`` (``section.key=value``) adjust the stored config, e.g. a
    moved ``data.path``."""
    path = Path(path)
    if not path.is_dir():
        raise ExportError(f"{path} does not exist or is not a directory: pass a run directory "
                          "(logging.run_dir of a training run) or a directory written by lgdlm_ds.export.")
    cfg = run_config(path, list(overrides))
    if (path / EXPORT_FILE).is_file():
        if tag is not None:
            raise ExportError(f"{path} is an exported directory (one checkpoint): --tag applies to run directories.")
        info = json.loads((path / EXPORT_FILE).read_text())
        model = _build(cfg, _read_exported_weights(path, cfg), device)
        return Loaded(model, cfg, info["step"], str(path), LatentSpace.from_dict(info.get("latent_space")))
    folder, step = find_checkpoint(path, tag)
    model = build_model(cfg.model)
    state = model_state_dict(checkpoint_state_dict(folder, cfg), model, str(folder))
    model.load_state_dict(state, strict=True)
    try:
        space = LatentSpace.from_config(cfg)
    except DataError as e:
        raise ExportError(f"the run standardises latents with its dataset's mean/std, which cannot be read: {e} "
                          "If the dataset moved, give its new data.path as a config override.") from e
    return Loaded(model.to(device).eval(), cfg, step, str(folder), space)


def _read_exported_weights(path: Path, cfg: Config) -> dict[str, Tensor]:
    from safetensors.torch import load_file
    weights = path / WEIGHTS_FILE
    if not weights.is_file():
        raise ExportError(f"{weights} does not exist; export the run again.")
    probe = build_model(cfg.model, device="meta")
    return model_state_dict({TRAIN_STEP_PREFIX + k: v for k, v in load_file(weights).items()}, probe, str(weights))


def load_exported(path: str | Path, device: str | torch.device = "cpu") -> LGDLM:
    """The model of an exported directory, in eval mode. Any missing or unexpected weight is an error."""
    if not (Path(path) / EXPORT_FILE).is_file():
        raise ExportError(f"{Path(path) / EXPORT_FILE} does not exist: {path} was not written by lgdlm_ds.export.")
    return load(path, device=device).model


# ---------------------------------------------------------------- export

def export(run_dir: str | Path, out: str | Path, tag: str | None = None, upstream_layout: bool = False,
           overrides: list[str] = ()) -> dict:
    """Write the exported directory of ``run_dir``'s checkpoint ``tag`` (default the newest) into ``out``."""
    from safetensors.torch import save_file
    run_dir, out = Path(run_dir), Path(out)
    if (run_dir / EXPORT_FILE).is_file():
        raise ExportError(f"{run_dir} is already an exported directory; export reads a run directory.")
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
    (out / EXPORT_FILE).write_text(json.dumps(info, indent=1) + "\n")
    return {"out": str(out), "step": loaded.step, "source": loaded.source, "files": files,
            "num_parameters": info["num_parameters"]}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m lgdlm_ds.export", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run_dir", help="run directory (logging.run_dir of a training run)")
    parser.add_argument("--out", required=True, help="directory to write")
    parser.add_argument("--tag", default=None,
                        help="checkpoint tag, e.g. global_step300 (default: the newest complete one)")
    parser.add_argument("--upstream-layout", action="store_true",
                        help="also write checkpoint.pt in the older trainer's layout")
    parser.add_argument("overrides", nargs="*",
                        help="section.key=value changes to the run's config, e.g. data.path=...")
    args = parser.parse_intermixed_args(argv)
    try:
        summary = export(args.run_dir, args.out, args.tag, args.upstream_layout, args.overrides)
    except ExportError as e:
        print(f"export: error: {e}", file=sys.stderr)
        return 2
    print(json.dumps(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
