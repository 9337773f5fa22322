"""The model, and what goes with it, from what training or export left behind.

``load(path)`` takes a run directory (its checkpoint ``tag``, default the newest complete one) or a
directory written by lgdlm_ds.export and gives a ``Loaded``: the model in eval mode, its config, step
and ``LatentSpace``. ``read_weights(path, cfg)`` gives only the fp32 weights of the bare model, from
either of those, from a DeepSpeed checkpoints folder or checkpoint folder, or from a file holding a
state dict (the model's own names, or the "model." layout of TrainStep and of the older trainer,
whose ``checkpoint.pt`` keeps it under ``model_state_dict``).

Where the fp32 weights of a DeepSpeed checkpoint live depends on the ZeRO stage. ZeRO-1/2/3
partition the fp32 master weights over the ranks' optimizer files (DeepSpeed's zero_to_fp32
assembles them); bf16 ZeRO-0 keeps them in its optimizer state, in optimizer order; fp32 ZeRO-0
saves the module itself. zero_to_fp32 assembles whatever the checkpoint names and the usual load is
non-strict, so every weight is checked here against the configured model: a missing, unexpected or
misshapen key is an error, never a silently random-initialised weight.
"""
from __future__ import annotations

import contextlib
import json
import pickle
import sys
import types
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from .checkpoint import MARKER, CheckpointError, find_checkpoint
from .config import Config, ConfigError, ModelConfig, load_config
from .data import DataError, PackedDataset
from .model import LGDLM, TRAINER_PREFIX, build_model, scalars_to_1d, unwrap_state_dict

# The exported directory (lgdlm_ds.export writes it).
CONFIG_FILE, EXPORT_FILE, WEIGHTS_FILE = "config.yaml", "export.json", "model.safetensors"


class LoadError(ValueError):
    """A run, checkpoint, export or weights file that cannot give the model; the message says why and what to do."""


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


# ---------------------------------------------------------------- DeepSpeed checkpoints -> fp32 state dict

def run_config(run_dir: Path, overrides: list[str] = ()) -> Config:
    path = run_dir / CONFIG_FILE
    if not path.is_file():
        raise LoadError(f"{path} does not exist: {run_dir} is no run directory (training writes config.yaml "
                        "there when it starts) and no exported directory.")
    try:
        return load_config(path, overrides)
    except ConfigError as e:
        raise LoadError(f"{path}: {e}") from e


def run_checkpoint(run_dir: Path, tag: str | None = None) -> tuple[Path, int]:
    """(checkpoint folder, its step) of a run directory: ``tag``, or the newest complete checkpoint."""
    ckpt_dir = run_dir / "checkpoints"
    try:
        found = find_checkpoint(ckpt_dir, tag)
    except CheckpointError as e:
        hint = " Pass one of them with --tag, or leave --tag out for the newest." if tag is not None else ""
        raise LoadError(f"{e}{hint}") from e
    if found is None:
        raise LoadError(f"{ckpt_dir} holds no complete checkpoint (training saves one every "
                        "logging.save_every steps and at the end); train longer or pass another run.")
    folder = ckpt_dir / found[1]
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
        raise LoadError(f"the checkpoint's optimizer holds {[len(g) for g in masters]} fp32 weights per group, "
                        f"the configured model {[len(g) for g in groups]}: config.yaml does not describe the "
                        "model that was trained.")
    out = {}
    for group_names, group_masters in zip(groups, masters):
        for name, master in zip(group_names, group_masters):
            saved = module.get(name)
            if saved is None or saved.shape != master.shape or not torch.equal(master.to(saved.dtype), saved):
                raise LoadError(f"the fp32 master weight taken for '{name}' does not match that weight in the "
                                "module file; the checkpoint's optimizer order differs from this version's.")
            out[name] = master.float()
    return out


def checkpoint_state_dict(folder: Path, cfg: Config) -> dict[str, Tensor]:
    """The fp32 weights saved in one DeepSpeed checkpoint folder, under DeepSpeed's (TrainStep's) names."""
    if any(folder.glob("*_optim_states.pt")):  # ZeRO-1/2/3: partitioned fp32 masters
        return _zero_to_fp32(folder)
    module_file = folder / "mp_rank_00_model_states.pt"
    if not module_file.is_file():
        raise LoadError(f"{folder} has neither optimizer shards (*_optim_states.pt) nor {module_file.name}: "
                        "not a DeepSpeed checkpoint, or a damaged one.")
    # The file holds DeepSpeed's pickled client state besides tensors, so weights_only cannot read it.
    states = torch.load(module_file, map_location="cpu", weights_only=False)
    if "fp32_groups" in (states.get("optimizer") or {}):
        return _zero0_master_weights(states, cfg)
    module = states["module"]
    low = sorted(k for k, v in module.items() if v.is_floating_point() and v.dtype != torch.float32)
    if low:
        raise LoadError(f"{module_file} holds 16-bit weights ({low[0]}, ...) and no fp32 master copy; "
                        "they are not the fp32 weights the run trained.")
    return dict(module)


# ---------------------------------------------------------------- any saved weights -> checked state dict

def model_state_dict(saved: dict[str, Tensor], model_cfg: ModelConfig, where: str,
                     config: str = "the config") -> dict[str, Tensor]:
    """The bare model's weights in ``saved`` (under the model's own names, or all under the training
    wrappers' "model." prefix), checked against the model ``model_cfg`` describes: every weight
    present with its shape, and no other key. ``config`` names that config in the error."""
    probe = build_model(model_cfg, device="meta")
    own = probe.state_dict()
    if any(k.startswith(TRAINER_PREFIX) for k in saved):
        state, unexpected = unwrap_state_dict(saved)
    else:
        state, unexpected = dict(saved), []
    state = scalars_to_1d(state, probe.scalar_param_names)
    unexpected += [n for n in state if n not in own]
    missing = sorted(set(own) - set(state))
    shapes = [f"{n} {tuple(v.shape)} (model {tuple(own[n].shape)})" for n, v in state.items()
              if n in own and v.shape != own[n].shape]
    problems = [f"{len(missing)} missing: {', '.join(missing)}"] if missing else []
    problems += [f"{len(unexpected)} unexpected: {', '.join(unexpected)}"] if unexpected else []
    problems += [f"wrong shape: {', '.join(shapes)}"] if shapes else []
    if problems:
        raise LoadError(f"{where} does not match the model {config} describes ({'; '.join(problems)}). "
                        f"Check model.* in {config} against the run that wrote {where}.")
    return state


def _exported_weights(path: Path) -> dict[str, Tensor]:
    from safetensors.torch import load_file
    weights = path / WEIGHTS_FILE
    if not weights.is_file():
        raise LoadError(f"{weights} does not exist; export the run again.")
    return load_file(weights)


class _Absent:
    """Stands in for a class that a file was pickled with and that cannot be imported here (the
    older trainer's pickled training state); the weights beside it are all that is read."""

    def __init__(self, *args, **kwargs):
        pass

    def __setstate__(self, state):
        pass


class _Unpickler(pickle.Unpickler):
    def find_class(self, module, name):
        try:
            return super().find_class(module, name)
        except (ImportError, AttributeError):
            return _Absent


def _file_weights(path: Path) -> dict[str, Tensor]:
    """The state dict in a safetensors or torch file; a torch file may be the older trainer's checkpoint.pt."""
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file
        return load_file(path)
    try:
        saved = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError:  # pickled objects besides tensors, as in the older trainer's checkpoint.pt
        tolerant = types.SimpleNamespace(__name__="tolerant_pickle", Unpickler=_Unpickler, load=pickle.load)
        try:
            saved = torch.load(path, map_location="cpu", weights_only=False, pickle_module=tolerant)
        except Exception as e:
            raise LoadError(f"{path} cannot be read as a torch file: {e}") from e
    if isinstance(saved, dict) and isinstance(saved.get("model_state_dict"), dict):
        saved = saved["model_state_dict"]
    if not isinstance(saved, dict) or not saved or not all(isinstance(v, Tensor) for v in saved.values()):
        raise LoadError(f"{path} holds no state dict (names -> tensors), neither bare nor under "
                        "'model_state_dict' as in the older trainer's checkpoint.pt.")
    return {k: v.float() if v.is_floating_point() else v for k, v in saved.items()}


def read_weights(path: str | Path, cfg: Config) -> dict[str, Tensor]:
    """The fp32 weights of the bare model ``cfg.model`` describes, under its own names, checked
    (see ``model_state_dict``), from ``path``:
    - a directory written by lgdlm_ds.export;
    - a run directory: its newest complete checkpoint, read with the run's own config.yaml (which
      orders bf16 ZeRO-0 masters);
    - a DeepSpeed checkpoints folder (the checkpoint ``latest`` names) or one checkpoint folder
      (global_stepN), read with ``cfg``;
    - a .safetensors or torch file holding a state dict, bare or as the older trainer's checkpoint.pt."""
    path = Path(path)
    if not path.exists():
        raise LoadError(f"{path} does not exist.")
    if path.is_file():
        return model_state_dict(_file_weights(path), cfg.model, str(path))
    if (path / EXPORT_FILE).is_file():
        return model_state_dict(_exported_weights(path), cfg.model, str(path / WEIGHTS_FILE))
    if (path / CONFIG_FILE).is_file():
        folder, _ = run_checkpoint(path)
        return model_state_dict(checkpoint_state_dict(folder, run_config(path)), cfg.model, str(folder))
    try:
        found = find_checkpoint(path)
    except CheckpointError as e:
        raise LoadError(str(e)) from e
    if found is None:
        raise LoadError(f"{path} is none of: a weights file, a directory written by lgdlm_ds.export, a run "
                        "directory (with config.yaml), a checkpoints folder with a 'latest' file, a checkpoint "
                        "folder (global_stepN with *model_states.pt).")
    folder = found[0] / found[1]
    return model_state_dict(checkpoint_state_dict(folder, cfg), cfg.model, str(folder))


# ---------------------------------------------------------------- loading

@dataclass
class Loaded:
    """A model ready for inference and what goes with it."""
    model: LGDLM
    cfg: Config
    step: int
    source: str
    latent_space: LatentSpace


def load(path: str | Path, tag: str | None = None, device: str | torch.device = "cpu",
         overrides: list[str] = ()) -> Loaded:
    """The model from an exported directory or from a run directory (checkpoint ``tag``, default the
    newest complete one). ``overrides`` (``section.key=value``) adjust the stored config, e.g. a
    moved ``data.path``."""
    path = Path(path)
    if not path.is_dir():
        raise LoadError(f"{path} does not exist or is not a directory: pass a run directory "
                        "(logging.run_dir of a training run) or a directory written by lgdlm_ds.export.")
    cfg = run_config(path, list(overrides))
    config = str(path / CONFIG_FILE)
    if (path / EXPORT_FILE).is_file():
        if tag is not None:
            raise LoadError(f"{path} is an exported directory (one checkpoint): --tag applies to run directories.")
        info = json.loads((path / EXPORT_FILE).read_text())
        state = model_state_dict(_exported_weights(path), cfg.model, str(path / WEIGHTS_FILE), config)
        step, source, space = info["step"], str(path), LatentSpace.from_dict(info.get("latent_space"))
    else:
        folder, step = run_checkpoint(path, tag)
        state = model_state_dict(checkpoint_state_dict(folder, cfg), cfg.model, str(folder), config)
        try:
            space = LatentSpace.from_config(cfg)
        except DataError as e:
            raise LoadError(f"the run standardises latents with its dataset's mean/std, which cannot be read: {e} "
                            "If the dataset moved, give its new data.path as a config override.") from e
        source = str(folder)
    model = build_model(cfg.model)
    model.load_state_dict(state, strict=True)
    return Loaded(model.to(device).eval(), cfg, step, source, space)


def load_exported(path: str | Path, device: str | torch.device = "cpu") -> LGDLM:
    """The model of an exported directory, in eval mode. Any missing or unexpected weight is an error."""
    if not (Path(path) / EXPORT_FILE).is_file():
        raise LoadError(f"{Path(path) / EXPORT_FILE} does not exist: {path} was not written by lgdlm_ds.export.")
    return load(path, device=device).model
