"""The model, and what goes with it, from what training or export left behind.

``load(path)`` takes a run directory (its checkpoint ``tag``, default the newest complete one) or a
directory written by lgdlm_ds.export and gives a ``Loaded``: the model in eval mode, its config, step
and ``LatentSpace``. ``read_weights(path, cfg)`` gives only the fp32 weights of the bare model, from
either of those, from a DeepSpeed checkpoints folder or checkpoint folder, or from a file holding a
state dict (the model's own names, or the "model." layout of TrainStep and of the older trainer,
whose ``checkpoint.pt`` keeps it under ``model_state_dict``). ``read_saved`` gives them unchecked,
with what kind of source it was and what it held besides (for ``model.init_from``, warm_start.py).

Where the fp32 weights of a DeepSpeed checkpoint live depends on the ZeRO stage. ZeRO-1/2/3
partition the fp32 master weights over the ranks' optimizer files (DeepSpeed's zero_to_fp32
assembles them; bf16 ZeRO-1 runs another optimizer, read here); bf16 ZeRO-0 keeps them in its
optimizer state, in optimizer order; fp32 ZeRO-0 saves the module itself. zero_to_fp32 assembles
whatever the checkpoint names and the usual load is non-strict, so every weight is checked here
against the configured model (weights_report.py): a missing, unexpected or misshapen key is an
error, never a silently random-initialised weight.

Every torch file is unpickled by safe_pickle.py: a checkpoint from elsewhere cannot run code here.
"""
from __future__ import annotations

import contextlib
import json
import pickle
import re
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from . import safe_pickle
from .checkpoint import MARKER, CheckpointError, find_checkpoint
from .config import Config, ConfigError, ModelConfig, load_config
from .data import DataError, PackedDataset
from .model import LGDLM, TRAINER_PREFIX, build_model
from .weights_report import SavedWeights, loaded_state, match

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


def _torch_file(path: Path) -> safe_pickle.Loaded:
    """A torch file, unpickled without running code it may carry (safe_pickle.py)."""
    try:
        return safe_pickle.load(path)
    except safe_pickle.UnsafePickleError as e:
        raise LoadError(f"{path} was refused: {e}") from e
    except (RuntimeError, OSError, EOFError, pickle.UnpicklingError) as e:
        raise LoadError(f"{path} cannot be read as a torch file: {e}") from e


def _zero_to_fp32(folder: Path) -> dict[str, Tensor]:
    from deepspeed.utils import zero_to_fp32
    try:
        # It prints progress (stdout is for results) and reads the shards with torch.load itself.
        with contextlib.redirect_stdout(sys.stderr), safe_pickle.restricted_loads_in(zero_to_fp32):
            return zero_to_fp32.get_fp32_state_dict_from_zero_checkpoint(str(folder.parent), tag=folder.name)
    except safe_pickle.UnsafePickleError as e:
        raise LoadError(f"{folder} was refused: {e}") from e


def _rank(shard: Path) -> int:
    return int(re.search(r"pp_rank_(\d+)_", shard.name).group(1))


def _bf16_partitions(folder: Path, shards: list[Path], module_states: dict) -> dict[str, Tensor]:
    """bf16 ZeRO-1 runs DeepSpeed's BF16_Optimizer, whose shards zero_to_fp32 does not read: each
    rank keeps its slice of the flat fp32 masters and where each weight's fragment lies in it
    (``param_slice_mappings``). A weight is its fragments in rank order."""
    fragments: dict[str, list[Tensor]] = {}
    shards = sorted(shards, key=_rank)
    for shard in shards:
        optim = _torch_file(shard).obj["optimizer_state_dict"]
        if max(optim["partition_count"]) != len(shards):
            raise LoadError(f"{folder} holds {len(shards)} optimizer shards of the {max(optim['partition_count'])} "
                            "ranks that wrote it; a rank's save is missing.")
        for flat, where in zip(optim["single_partition_of_fp32_groups"], optim["param_slice_mappings"]):
            for name, address in where.items():
                fragments.setdefault(name, []).append(flat.narrow(0, address.start, address.numel))
    out = {}
    for shapes in module_states["param_shapes"]:
        for name, shape in shapes.items():
            flat = torch.cat(fragments.get(name, [torch.empty(0)]))
            if flat.numel() != shape.numel():
                raise LoadError(f"{folder}: the fp32 fragments of '{name}' hold {flat.numel()} values, the weight "
                                f"{tuple(shape)}; the checkpoint is damaged.")
            out[name] = flat.view(shape).float()
    return out


def _zero0_master_weights(states: dict, model_cfg: ModelConfig) -> dict[str, Tensor]:
    """bf16 ZeRO-0 keeps fp32 masters as ``optimizer.fp32_groups``: one list per optimizer param
    group, in that group's order, without names. The order is rebuilt from the same grouping the
    engine used, and verified: every master must round to the saved 16-bit module weight exactly."""
    from .optim import param_groups
    model = build_model(model_cfg, device="meta")
    names = {id(p): TRAINER_PREFIX + n for n, p in model.named_parameters()}  # TrainStep holds it as .model
    groups = [[names[id(p)] for p in g["params"]] for g in param_groups(model, 0.0)]
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


# What a DeepSpeed checkpoint holds besides the weights.
_DEEPSPEED_STATE = ("optimizer state, learning-rate schedule, RNG state and progress (training.resume "
                    "restores those; weights only are read here)")


def _checkpoint_weights(folder: Path, model_cfg: ModelConfig) -> SavedWeights:
    """The fp32 weights saved in one DeepSpeed checkpoint folder, under the bare model's names.
    ``model_cfg`` (the model that was trained) orders a bf16 ZeRO-0 checkpoint's masters."""
    shards = sorted(folder.glob("*_optim_states.pt"))
    module_file = next(iter(sorted(folder.glob("*model_states.pt"))), None)
    if module_file is None:
        raise LoadError(f"{folder} holds no *model_states.pt: not a DeepSpeed checkpoint, or a damaged one.")
    states = _torch_file(module_file).obj
    if shards:  # ZeRO-1/2/3: partitioned fp32 masters
        optim = _torch_file(shards[0]).obj["optimizer_state_dict"]
        if "zero_stage" in optim:
            state = _zero_to_fp32(folder)
            kind = f"DeepSpeed checkpoint, ZeRO-{int(optim['zero_stage'])} (fp32 weights assembled by zero_to_fp32)"
        else:
            state, kind = _bf16_partitions(folder, shards, states), "DeepSpeed checkpoint, bf16 ZeRO-1 (fp32 masters)"
    elif "fp32_groups" in (states.get("optimizer") or {}):
        state = _zero0_master_weights(states, model_cfg)
        kind = "DeepSpeed checkpoint, bf16 ZeRO-0 (fp32 masters from its optimizer state)"
    else:
        state = states["module"]
        low = sorted(k for k, v in state.items() if v.is_floating_point() and v.dtype != torch.float32)
        if low:
            raise LoadError(f"{module_file} holds 16-bit weights ({low[0]}, ...) and no fp32 master copy; "
                            "they are not the fp32 weights the run trained.")
        kind = "DeepSpeed checkpoint, fp32 ZeRO-0"
    return SavedWeights(_unwrap(dict(state)), str(folder), kind, [_DEEPSPEED_STATE])


def _unwrap(state: dict[str, Tensor]) -> dict[str, Tensor]:
    """The bare model's names: the training wrappers' "model." prefix removed where the keys carry
    it (other keys, as the older trainer's schedule buffers, stay as they are)."""
    if not any(k.startswith(TRAINER_PREFIX) for k in state):
        return state
    return {k.removeprefix(TRAINER_PREFIX): v for k, v in state.items()}


# ---------------------------------------------------------------- any saved weights

def _exported_weights(path: Path) -> SavedWeights:
    from safetensors.torch import load_file
    weights = path / WEIGHTS_FILE
    if not weights.is_file():
        raise LoadError(f"{weights} does not exist; export the run again.")
    return SavedWeights(load_file(weights), str(weights), "directory written by lgdlm_ds.export")


def _described(key: str, value) -> str:
    if isinstance(value, safe_pickle.Unavailable):
        return f"'{key}': an object of {value.pickled_as}, a class not available here (not imported, not run)"
    if key == "optimizer_state_dict":
        return f"'{key}': optimizer state (weights only are read)"
    return f"'{key}': {type(value).__name__}"


def _file_weights(path: Path) -> SavedWeights:
    """The state dict in a safetensors or torch file; a torch file may be the older trainer's
    checkpoint.pt, whose other entries (optimizer state, a pickled training state) are not used."""
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file
        return SavedWeights(load_file(path), str(path), "safetensors file")
    saved = _torch_file(path).obj
    kind, ignored = "state dict file", []
    if isinstance(saved, dict) and isinstance(saved.get("model_state_dict"), dict):
        kind = "checkpoint.pt of the older trainer's layout (model_state_dict)"
        ignored = [_described(k, v) for k, v in saved.items() if k != "model_state_dict"]
        saved = saved["model_state_dict"]
    if not isinstance(saved, dict) or not saved or not all(isinstance(v, Tensor) for v in saved.values()):
        raise LoadError(f"{path} holds no state dict (names -> tensors), neither bare nor under "
                        "'model_state_dict' as in the older trainer's checkpoint.pt.")
    state = {k: v.float() if v.is_floating_point() else v for k, v in saved.items()}
    return SavedWeights(_unwrap(state), str(path), kind, ignored)


def _run_folder_config(folder: Path, model_cfg: ModelConfig) -> ModelConfig:
    """The model of the run a checkpoint folder belongs to (its run directory's config.yaml), else ``model_cfg``."""
    run_dir = folder.parent.parent
    return run_config(run_dir).model if (run_dir / CONFIG_FILE).is_file() else model_cfg


def read_saved(path: str | Path, model_cfg: ModelConfig) -> SavedWeights:
    """The fp32 weights in ``path``, under the bare model's names, not yet checked against a model:
    - a directory written by lgdlm_ds.export;
    - a run directory: its newest complete checkpoint;
    - a DeepSpeed checkpoints folder (the checkpoint ``latest`` names) or one checkpoint folder
      (global_stepN), of any ZeRO stage;
    - a .safetensors or torch file holding a state dict, bare or as the older trainer's checkpoint.pt.
    Torch files are unpickled restrictedly (safe_pickle.py). ``model_cfg`` orders the masters of a
    bf16 ZeRO-0 checkpoint that is not inside a run directory (whose config.yaml is used)."""
    path = Path(path)
    if not path.exists():
        raise LoadError(f"{path} does not exist.")
    if path.is_file():
        return _file_weights(path)
    if (path / EXPORT_FILE).is_file():
        return _exported_weights(path)
    if (path / CONFIG_FILE).is_file():
        folder, _ = run_checkpoint(path)
        return _checkpoint_weights(folder, run_config(path).model)
    try:
        found = find_checkpoint(path)
    except CheckpointError as e:
        raise LoadError(str(e)) from e
    if found is None:
        raise LoadError(f"{path} is none of: a weights file, a directory written by lgdlm_ds.export, a run "
                        "directory (with config.yaml), a checkpoints folder with a 'latest' file, a checkpoint "
                        "folder (global_stepN with *model_states.pt).")
    folder = found[0] / found[1]
    return _checkpoint_weights(folder, _run_folder_config(folder, model_cfg))


def checked(saved: SavedWeights, model_cfg: ModelConfig, config: str = "the config") -> dict[str, Tensor]:
    """The weights of ``saved``, checked against the model ``model_cfg`` describes: every weight
    present with its shape, and no other key (but the older trainer's schedule buffers). ``config``
    names that config in the error."""
    probe = build_model(model_cfg, device="meta")
    report = match(saved, probe)
    if problems := report.problems():
        raise LoadError(f"{saved.source} does not match the model {config} describes ({'; '.join(problems)}). "
                        f"Check model.* in {config} against the run that wrote {saved.source}.")
    return loaded_state(saved, report, probe)


def read_weights(path: str | Path, cfg: Config) -> dict[str, Tensor]:
    """The fp32 weights of the bare model ``cfg.model`` describes, under its own names, from ``path``
    (see ``read_saved``), checked (see ``checked``)."""
    return checked(read_saved(path, cfg.model), cfg.model)


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
        state = checked(_exported_weights(path), cfg.model, config)
        step, source, space = info["step"], str(path), LatentSpace.from_dict(info.get("latent_space"))
    else:
        folder, step = run_checkpoint(path, tag)
        state = checked(_checkpoint_weights(folder, cfg.model), cfg.model, config)
        try:
            space = LatentSpace.from_config(cfg)
        except DataError as e:
            raise LoadError(f"the run standardises latents with its dataset's mean/std, which cannot be read: {e} "
                            "If the dataset moved, give its new data.path as a config override.") from e
        source = str(folder)
    model = build_model(cfg.model, warm_start=False)  # its weights are the checkpoint's
    model.load_state_dict(state, strict=True)
    return Loaded(model.to(device).eval(), cfg, step, source, space)


def load_exported(path: str | Path, device: str | torch.device = "cpu") -> LGDLM:
    """The model of an exported directory, in eval mode. Any missing or unexpected weight is an error."""
    if not (Path(path) / EXPORT_FILE).is_file():
        raise LoadError(f"{Path(path) / EXPORT_FILE} does not exist: {path} was not written by lgdlm_ds.export.")
    return load(path, device=device).model
