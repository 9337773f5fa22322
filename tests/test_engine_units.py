"""Trainer pieces that need no DeepSpeed engine: config keys, the JSON checks, the schedule, the
decay groups, the data order, seeds, the skip policy, the log lines, checkpoint pointers, and the
command line's refusals."""
from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from lgdlm_ds import checkpoint, train
from lgdlm_ds.batching import DataPosition, StepBatches, eval_batches
from lgdlm_ds.config import ConfigError, load_config
from lgdlm_ds.ds_config import load_ds_config
from lgdlm_ds.metrics import LINE_KEYS, LOG_NAME, MetricsLogger, wandb_mode
from lgdlm_ds.model import build_model
from lgdlm_ds.optim import DECAY, NO_DECAY, WarmupCosine, lr_factor, param_groups
from lgdlm_ds.seeding import derive_seed
from lgdlm_ds.skip_policy import SkipPolicy, StepGate

ROOT = Path(__file__).resolve().parent.parent
SMOKE = ROOT / "recipes/00_smoke/recipe.yaml"


# ---- config


def test_smoke_recipe_has_the_contract_keys():
    cfg = load_config(SMOKE)
    tr, lg = cfg.training, cfg.logging
    assert (tr.ds_config, tr.resume, tr.max_consecutive_skips) == ("ds_configs/zero0.json", "auto", 20)
    assert tr.num_train_steps > 0 and tr.micro_batch_size > 0 and tr.gradient_accumulation_steps == 1
    assert (lg.run_dir, lg.wandb) == ("", False) and lg.log_every > 0 and lg.save_every > 0  # run_dir: runs/00_smoke


@pytest.mark.parametrize("override, key", [
    ("training.num_train_steps=0", "training.num_train_steps"),
    ("training.gradient_accumulation_steps=0", "training.gradient_accumulation_steps"),
    ("training.max_consecutive_skips=-1", "training.max_consecutive_skips"),
    ("training.min_lr_ratio=1.5", "training.min_lr_ratio"),
    ("training.betas=[0.9]", "training.betas"),
    ("training.keep_last=0", "training.keep_last"),
    ("logging.log_every=0", "logging.log_every"),
    ("logging.save_every=-1", "logging.save_every"),
    ("logging.wandb=maybe", "logging.wandb"),
    ("logging.run_dri=x", "logging.run_dir"),  # the suggestion names the real key
])
def test_bad_engine_keys_name_the_key(override, key):
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        load_config(SMOKE, [override])


def test_exponent_floats_are_numbers():
    # PyYAML reads 3e-4 as a string (YAML 1.1); a float field takes it as the number it means.
    assert load_config(SMOKE, ["training.lr=3e-4"]).training.lr == 3e-4


# ---- DeepSpeed JSON


def _with_json(tmp_path, ds: dict, *overrides):
    path = tmp_path / "ds.json"
    path.write_text(json.dumps(ds))
    return load_config(SMOKE, [f"training.ds_config={path}", *overrides])


def test_shipped_jsons_pass_and_get_the_batch_injected():
    for name in ("zero0", "zero2_bf16", "zero3_bf16", "zero3_offload_bf16"):
        cfg = load_config(SMOKE, [f"training.ds_config=ds_configs/{name}.json", "training.micro_batch_size=3",
                                  "training.gradient_accumulation_steps=5"])
        ds = load_ds_config(cfg)
        assert (ds["train_micro_batch_size_per_gpu"], ds["gradient_accumulation_steps"]) == (3, 5)
        assert "train_batch_size" not in ds
        assert ds["bf16"]["check_grad_overflow"] is True


def test_stagewise_cycle_vae_doubles_deepspeeds_accumulation():
    cfg = load_config(SMOKE, ["loss.cycle_stagewise=true", "training.gradient_accumulation_steps=3"])
    assert load_ds_config(cfg)["gradient_accumulation_steps"] == 6


@pytest.mark.parametrize("change, message", [
    ({"train_batch_size": 32}, "remove 'train_batch_size'"),
    ({"gradient_accumulation_steps": 2}, "training.gradient_accumulation_steps"),
    ({"optimizer": {"type": "AdamW"}}, "remove 'optimizer'"),
    ({"zero_optimization": {"stage": 2, "reduce_bucket_size": "auto"}}, "zero_optimization.reduce_bucket_size"),
    ({"bf16": {"enabled": True}}, "check_grad_overflow"),
    ({"fp16": {"enabled": True}}, "fp16 is not supported"),
])
def test_bad_jsons_are_refused(tmp_path, change, message):
    ds = json.loads((ROOT / "ds_configs/zero0.json").read_text()) | change
    with pytest.raises(ConfigError, match=message):
        load_ds_config(_with_json(tmp_path, ds))


def test_version_dependent_defaults_must_be_written_out(tmp_path):
    ds = json.loads((ROOT / "ds_configs/zero0.json").read_text())
    del ds["gradient_clipping"]
    with pytest.raises(ConfigError, match="set gradient_clipping explicitly"):
        load_ds_config(_with_json(tmp_path, ds))


# ---- optimiser and schedule


def test_lr_warmup_cosine_and_floor():
    warmup, total, floor = 10, 110, 0.1
    assert lr_factor(0, warmup, total, floor) == pytest.approx(0.1)
    assert lr_factor(9, warmup, total, floor) == 1.0
    assert lr_factor(10, warmup, total, floor) == 1.0
    assert lr_factor(60, warmup, total, floor) == pytest.approx(floor + (1 - floor) * 0.5)
    assert lr_factor(110, warmup, total, floor) == pytest.approx(floor)
    assert lr_factor(500, warmup, total, floor) == pytest.approx(floor)
    assert lr_factor(0, 0, total, floor) == 1.0


def test_scheduler_holds_on_skipped_steps_and_seeks():
    opt = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(2))], lr=1.0)
    sched = WarmupCosine(opt, warmup=4, total=20, floor=0.0)
    assert opt.param_groups[0]["lr"] == 0.25
    opt.step()
    sched.step(skip=True)
    assert opt.param_groups[0]["lr"] == 0.25
    sched.step()
    assert opt.param_groups[0]["lr"] == 0.5
    sched.seek(12)
    assert opt.param_groups[0]["lr"] == pytest.approx(0.5 * (1 + math.cos(math.pi * 8 / 16)))


def test_gate_blocks_the_optimizer_step():
    p = torch.nn.Parameter(torch.ones(3))
    opt = torch.optim.AdamW([p], lr=0.1)
    gate = StepGate()
    gate.attach(opt)
    WarmupCosine(opt, 0, 10, 0.0)  # torch's scheduler re-wraps step(); the gate must survive it
    p.grad = torch.ones(3)
    gate.open = False
    opt.step()
    assert torch.equal(p, torch.ones(3)) and not opt.state
    gate.open = True
    opt.step()
    assert (p < 1).all()


def test_no_decay_on_norms_biases_embeddings_and_mixing_parameters():
    cfg = load_config(SMOKE, ["model.vocab_size=128", "model.max_seq_len=8"])
    model = build_model(cfg.model)
    names = {id(p): n for n, p in model.named_parameters()}
    groups = {g["name"]: {names[id(p)] for p in g["params"]} for g in param_groups(model, 0.1)}
    assert len(groups[DECAY]) + len(groups[NO_DECAY]) == len(names)
    assert "text_head.weight" in groups[DECAY] and "latent_head.0.weight" in groups[DECAY]
    assert any(n.startswith("mmdit.blocks.0.") and n.endswith("weight") for n in groups[DECAY])
    norm_owners = {n for n, m in model.named_modules() if "Norm" in type(m).__name__}
    for n in groups[DECAY]:
        assert n.endswith(".weight") and n.rpartition(".")[0] not in norm_owners and "embed" not in n
    for n in ("text_encoder.token_embed.weight", "text_encoder.position_embed", "text_head.bias",
              "latent_encoder.projection.1.weight"):
        assert n in groups[NO_DECAY]
    assert any("static_alpha" in n for n in groups[NO_DECAY])


# ---- data order


def _step_batches(world, accumulation, start=DataPosition(), steps=5, n=23, micro=2):
    """Micro-batches per (step, slot) for every rank."""
    out = {}
    for rank in range(world):
        it = iter(StepBatches(n, 7, world, rank, accumulation, micro, start))
        for k in range(steps):
            for m in range(accumulation):
                out[(k, m * world + rank)] = next(it)
    return out


def test_data_order_depends_only_on_the_global_batch():
    one = _step_batches(world=1, accumulation=4)
    assert one == _step_batches(world=2, accumulation=2) == _step_batches(world=4, accumulation=1)
    # 23 samples, global batch 8: two steps per epoch, each epoch a permutation without repeats
    epoch0 = sum((one[(k, s)] for k in (0, 1) for s in range(4)), [])
    assert len(set(epoch0)) == 16 and one[(2, 0)] != one[(0, 0)]


def test_data_position_resumes_mid_epoch():
    straight = _step_batches(world=2, accumulation=1, steps=7, n=11)
    pos = DataPosition()
    for _ in range(3):
        pos = pos.advance(4, 11)
    assert pos == DataPosition(epoch=1, epoch_samples=4)
    resumed = _step_batches(world=2, accumulation=1, start=pos, steps=4, n=11)
    assert all(resumed[(k, s)] == straight[(k + 3, s)] for k in range(4) for s in range(2))


def test_eval_batches_split_the_validation_set_over_ranks():
    assert eval_batches(10, 2, 1, 2, 8) == [[2, 3], [6, 7]]
    with pytest.raises(ValueError, match="validation split has 3 samples"):
        eval_batches(3, 2, 0, 2, 1)


def test_derived_seeds_are_stable_distinct_and_fit_a_generator():
    assert derive_seed(7, "train", 3, 1) == derive_seed(7, "train", 3, 1)
    seeds = {derive_seed(s, use, i) for s in (0, 1) for use in ("epoch", "eval") for i in range(50)}
    assert len(seeds) == 200 and all(0 <= x < 2**63 for x in seeds)
    torch.Generator().manual_seed(max(seeds))


# ---- skip policy and log lines, with one rank's collectives


class _OneRank:
    """deepspeed.comm as a world of one sees it."""
    class ReduceOp:
        MAX = "max"

    @staticmethod
    def all_reduce(tensor, op=None):
        pass

    @staticmethod
    def get_rank():
        return 0

    @staticmethod
    def get_world_size():
        return 1


class _Engine:
    """What the skip policy asks of a DeepSpeed engine. ``wrapped``: DeepSpeed put its own
    optimizer around ours (ZeRO, bf16) and checks the norm itself; ``refuses``: it found it non-finite."""

    def __init__(self, optimizer, module, wrapped=False, refuses=False):
        self.optimizer = object() if wrapped else optimizer
        self.inner, self.module, self.refuses = optimizer, module, refuses

    def step(self, lr_kwargs):
        if not self.refuses:
            self.inner.step()
        self.schedule_skip = lr_kwargs["skip"]

    def was_step_applied(self):
        return not self.refuses

    def get_global_grad_norm(self):
        return float("nan") if self.refuses else 2.0


def _policy(grad, max_consecutive=1, **engine):
    layer = torch.nn.Linear(2, 1)
    opt = torch.optim.SGD(layer.parameters(), lr=0.1)
    policy = SkipPolicy(opt, max_consecutive, _OneRank)
    for p in layer.parameters():
        p.grad = torch.full_like(p, grad)
    return policy, _Engine(opt, layer, **engine), layer


@pytest.mark.parametrize("grad, bad_loss, engine, reason", [
    (1.0, False, {}, None),
    (1.0, True, {}, "loss"),
    (float("nan"), False, {}, "grad_norm"),  # plain fp32 ZeRO-0: the policy's own norm
    (1.0, False, {"wrapped": True, "refuses": True}, "grad_norm"),  # DeepSpeed's norm
])
def test_skip_policy_decides_and_gates_the_update(grad, bad_loss, engine, reason):
    policy, eng, layer = _policy(grad, **engine)
    before = [p.detach().clone() for p in layer.parameters()]
    assert policy.step(eng, torch.tensor(bad_loss))[0] == reason
    unchanged = all(torch.equal(a, b) for a, b in zip(before, layer.parameters()))
    assert unchanged == (reason is not None) and policy.gate.open
    assert eng.schedule_skip == (reason is not None and not eng.refuses)  # DeepSpeed holds it when it refuses


def test_skip_streak_stops_the_run_naming_step_and_checkpoint():
    policy, eng, _ = _policy(1.0, max_consecutive=1)
    for bad in (True, False, True):  # a good step ends a streak
        policy.step(eng, torch.tensor(bad))
    assert policy.streak_error(3, None) is None
    policy.step(eng, torch.tensor(True))
    error = policy.streak_error(4, Path("run/checkpoints/global_step2"))
    assert error.startswith("step 4: 2 consecutive steps skipped (last reason: non-finite loss), more than "
                            "training.max_consecutive_skips=1; the parameters are those after step 2; "
                            "the last good checkpoint is run/checkpoints/global_step2")
    assert "no checkpoint was saved yet" in policy.streak_error(4, None)


def test_log_lines_cadence_skip_lines_and_resources(tmp_path):
    cfg = load_config(SMOKE, ["logging.log_every=2", "logging.progress_bar=false", f"logging.run_dir={tmp_path}"])
    log = MetricsLogger(cfg, tmp_path, _OneRank, torch.device("cpu"), global_batch=4, start_step=0, end=5)

    def slow_batches():
        while True:
            time.sleep(0.02)
            yield {}
    batches = log.timed(slow_batches())
    for step, loss, reason in ((1, 1.0, None), (2, 3.0, None), (3, 5.0, None), (4, math.nan, "loss"), (5, 2.0, None)):
        start = time.perf_counter()
        next(batches)
        log.step(step=step, epoch=0, lr=0.1, metrics={"loss": torch.tensor(loss)}, tokens=torch.tensor(10),
                 seconds=time.perf_counter() - start + 0.02, grad_norm=None if reason else 1.0,
                 skipped_steps=int(step >= 4), skip_reason=reason, evaluation={"eval_loss": 0.5} if step == 5 else {})
    log.close()
    lines = [json.loads(x) for x in (tmp_path / LOG_NAME).read_text().splitlines()]
    # every 2 steps; the skip at 4 after a line for step 3 alone; the last step with its evaluation
    assert [(x["step"], x["loss"], x.get("skip_reason"), x["skipped_steps"]) for x in lines] == [
        (2, 2.0, None, 0), (3, 5.0, None, 0), (4, None, "loss", 1), (5, 2.0, None, 1)]
    assert lines[-1]["eval_loss"] == 0.5 and "eval_loss" not in lines[0]
    for x in lines:
        assert set(LINE_KEYS) <= set(x)
        assert x["peak_memory_gib"] > 0 and 0.2 < x["data_loading_share"] < 1


# ---- checkpoint pointer


def _fake_tag(ckpt: Path, step: int, complete: bool = True) -> None:
    d = ckpt / checkpoint.tag_for(step)
    d.mkdir(parents=True)
    (d / "mp_rank_00_model_states.pt").write_bytes(b"")
    if complete:
        (d / checkpoint.MARKER).write_text("{}")


def test_rotation_keeps_the_newest_complete_and_drops_partial(tmp_path):
    for step in (10, 20, 30):
        _fake_tag(tmp_path, step)
    _fake_tag(tmp_path, 25, complete=False)
    checkpoint.rotate(tmp_path, keep_last=2)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["global_step20", "global_step30"]


def test_resume_targets(tmp_path):
    ckpt = tmp_path / "checkpoints"
    ckpt.mkdir()
    assert checkpoint.find_resume("auto", ckpt) is None
    assert checkpoint.find_resume("none", ckpt) is None
    _fake_tag(ckpt, 5)
    _fake_tag(ckpt, 9, complete=False)  # a save killed before every rank finished
    (ckpt / checkpoint.POINTER).write_text("global_step5")
    assert checkpoint.find_resume("auto", ckpt) == (ckpt, "global_step5")
    assert checkpoint.find_resume(str(ckpt), ckpt) == (ckpt, "global_step5")
    assert checkpoint.find_resume(str(ckpt / "global_step9"), ckpt) == (ckpt, "global_step9")
    with pytest.raises(checkpoint.CheckpointError, match="already holds checkpoints"):
        checkpoint.find_resume("none", ckpt)
    with pytest.raises(checkpoint.CheckpointError, match="neither a checkpoints folder"):
        checkpoint.find_resume(str(tmp_path / "nowhere"), ckpt)
    (ckpt / checkpoint.POINTER).write_text("global_step9")
    with pytest.raises(checkpoint.CheckpointError, match="not a complete checkpoint"):
        checkpoint.find_resume("auto", ckpt)


# ---- logging


def test_wandb_is_offline_without_a_login(monkeypatch, tmp_path):
    for var in ("WANDB_MODE", "WANDB_API_KEY", "WANDB_BASE_URL"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("NETRC", str(tmp_path / "netrc"))
    assert wandb_mode() == "offline"
    (tmp_path / "netrc").write_text("machine api.wandb.ai login user password secret\n")
    assert wandb_mode() == "online"
    monkeypatch.setenv("WANDB_MODE", "disabled")
    assert wandb_mode() == "disabled"


# ---- command line


@pytest.mark.parametrize("args, message", [
    (["missing.yaml"], "recipe 'missing.yaml' does not exist"),
    ([str(SMOKE), "training.num_train_step=5"], "Did you mean 'training.num_train_steps'"),
    ([str(SMOKE), "training.ds_config=ds_configs/nope.json"], "file not found"),
])
def test_train_refuses_bad_input_in_one_line(capsys, args, message):
    assert train.main(args) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and message in err and err.count("\n") == 1


def test_train_exit_status_on_bad_input_before_deepspeed_starts():
    start = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "lgdlm_ds.train", str(SMOKE), "training.lr=fast"],
                          cwd=ROOT, capture_output=True, text=True, env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert proc.returncode == 2
    assert proc.stderr.strip() == "error: config key 'training.lr' expects float, got 'fast'."
    assert time.perf_counter() - start < 30
