"""The engine under the real DeepSpeed launcher with real gloo collectives on the CPU: ZeRO-0/2/3
parity across 1 and 2 ranks, exact resume, the skip policy, bf16 and the ZeRO-3 trace (resuming on
another number of ranks: tests/test_universal.py). Two launched jobs (tests/engine_job.py) run every
scenario; each test asserts on their results. Then stopping on a signal (lgdlm_ds/preemption.py),
with ``python -m lgdlm_ds.train`` as a process of its own.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from core_utils import ROOT
from engine_utils import RUN, SYNTHETIC, TIMING_KEYS, WORLD_KEYS, free_port, launch
from lgdlm_ds.metrics import LOG_NAME
from lgdlm_ds.preemption import HOOK

STEPS = 6


def _launch(ranks: int, which: str, out: Path) -> str:
    proc = launch(ranks, ROOT / "tests/engine_job.py", which, str(out))
    output = proc.stdout + proc.stderr
    assert proc.returncode == 0, f"{which} job failed:\n{output[-6000:]}"
    return output


@pytest.fixture(scope="module")
def job(tmp_path_factory):
    """Results of both jobs: job(scenario, world, rank) -> that rank's JSON."""
    out = tmp_path_factory.mktemp("engine_job")
    _launch(2, "two_ranks", out)
    _launch(1, "one_rank", out)

    def result(scenario: str, world: int = 2, rank: int = 0) -> dict:
        data = json.loads((out / f"{scenario}_w{world}_rank{rank}.json").read_text())
        assert "exception" not in data, data.get("exception")
        return data
    return result


def _losses(lines: list[dict]) -> list[float]:
    return [line["loss"] for line in lines]


def test_zero_stages_and_rank_counts_give_the_same_losses(job):
    """Same seed, global batch 4 and fp32: ZeRO-0/2/3 x (2 ranks x 1 micro-step, 1 rank x 2).

    Tolerance 1e-6 relative. Every rank and micro-step computes the same micro-batch with the same
    noise in every setting (batching.py, trainer.py), so the forward and backward of each slot are
    the same operations on the same numbers. What can differ is reduction order: the mean of two
    slot gradients is exact in any order (a + b commutes; halving is exact in binary floating point),
    but the clipping norm is summed over whole gradients (ZeRO-0) or over partitions (ZeRO-2/3),
    which moves it by ~1e-7 relative (the grad_norm values below differ in the 7th digit). The
    clip factor scales the gradient, and AdamW's update is scale-invariant up to eps, so the loss
    moves far less than 1e-7; 1e-6 leaves room and is still 10^4 below the loss changes between
    steps. Measured here: all 36 losses bitwise equal."""
    reference = _losses(job("parity")["zero0"])
    assert len(reference) == STEPS and len(set(reference)) == STEPS
    for world in (2, 1):
        runs = job("parity", world)
        for stage in ("zero0", "zero2", "zero3"):
            losses = _losses(runs[stage])
            assert [line["step"] for line in runs[stage]] == list(range(1, STEPS + 1))
            assert losses == pytest.approx(reference, rel=1e-6, abs=0), (world, stage, losses, reference)
            norms = [line["grad_norm"] for line in runs[stage]]
            assert norms == pytest.approx([line["grad_norm"] for line in job("parity")["zero0"]], rel=1e-6)


def test_the_ranks_leave_no_shared_memory_of_deepspeed_behind(job):
    """DeepSpeed's CPU all-reduce gives each rank a 69 MB file in /dev/shm and never removes it
    (lgdlm_ds/shm_names.py): once the trainers are built, no rank's file of the job is left, on 2
    ranks and on 1, and the runs above trained through the mapped buffers all the same."""
    for world in (2, 1):
        for rank in range(world):
            assert job("parity", world, rank)["shm_names_left"] == []


def test_antithetic_text_times_do_not_depend_on_the_rank_count(job):
    """Each sample's text time comes from its slot position in the global batch and its slot's
    noise, so 2 ranks x 1 micro-step and 1 rank x 2 train on the same times: the same losses (and
    text_nelbo, the bound they average) within the reduction-order rounding of the parity test."""
    two, one = job("antithetic", 2)["lines"], job("antithetic", 1)["lines"]
    assert len(two) == STEPS and len(set(_losses(two))) == STEPS
    for key in ("loss", "text_nelbo"):
        assert [line[key] for line in one] == pytest.approx([line[key] for line in two], rel=1e-6, abs=0), key


def test_stagewise_cycle_vae_trains_like_the_plain_mode(job):
    """loss.cycle_stagewise: two DeepSpeed micro-steps per micro-batch (stage 1's backward before
    stage 2) give the plain mode's losses (same tolerance and reason as above: only the gradient
    summation order differs), and ZeRO-3's prefetch trace survives the alternating stages."""
    reference = _losses(job("parity")["zero0"])
    runs = job("stagewise")
    for stage in ("zero0", "zero2", "zero3"):
        assert _losses(runs[stage]["lines"]) == pytest.approx(reference, rel=1e-6, abs=0), stage
        assert "cycle_text_loss" in runs[stage]["lines"][0]  # stage 2 runs even at ramp weight 0
    assert runs["zero3"]["trace_warnings"] == 0


@pytest.mark.parametrize("stage", ["zero2", "zero3"])
def test_resume_is_bitwise_exact(job, stage):
    """6 steps straight vs 3 steps, a new engine resuming from the checkpoint, 3 more (2 ranks).
    The cycle weights ramp through the resume point, data crosses two epoch boundaries (2 steps per
    epoch), and an evaluation runs at steps 3 and 6."""
    r = job("resume")[stage]
    straight, resumed = r["straight"], r["resumed"]
    assert r["resumed_at"] == 3
    # the resumed run's log holds the first half too: appended, never truncated
    assert [line["step"] for line in resumed] == [line["step"] for line in straight] == list(range(1, 7))
    for key in ("loss", "epoch", "lr", "cycle_text_weight", "cycle_latent_weight", "base_l2t_text_loss",
                "base_t2l_latent_loss", "t_lat_mean", "grad_norm", "eval_loss"):
        assert [line.get(key) for line in resumed] == [line.get(key) for line in straight], key
    assert [line["epoch"] for line in straight] == [0, 0, 1, 1, 2, 2]
    assert len({line["cycle_text_weight"] for line in straight}) >= 4  # ramping across the resume
    assert "cycle_latent_loss" not in straight[1] and "cycle_latent_loss" in straight[3]
    assert [line.get("eval_loss") is not None for line in straight] == [False, False, True, False, False, True]
    assert r["checkpoints"] == ["global_step3", "global_step6", "latest", "zero_to_fp32.py", "zero_to_torch.py"]


@pytest.mark.parametrize("stage", ["zero0", "zero2", "zero3"])
def test_nan_on_one_rank_skips_the_step_everywhere(job, stage):
    """Rank 1's loss is NaN at step 3 only: both ranks leave weights and AdamW state untouched,
    the log says so, and the next step trains again."""
    for rank in (0, 1):
        r = job("nan_once", rank=rank)[stage]
        assert r["unchanged_by_skip"] and r["changed_by_next"], (rank, r)
    lines = job("nan_once")[stage]["lines"]
    assert [line["step"] for line in lines] == [1, 2, 3, 4]
    assert [line["skipped_steps"] for line in lines] == [0, 0, 1, 1]
    assert [line.get("skip_reason") for line in lines] == [None, None, "loss", None]
    assert lines[2]["loss"] is None  # NaN is written as null
    assert lines[3]["lr"] == lines[2]["lr"]  # the schedule did not advance on the skipped step
    assert all(isinstance(line["loss"], float) for line in (lines[0], lines[1], lines[3]))


@pytest.mark.parametrize("stage", ["zero0", "zero2", "zero3", "zero2_bf16"])
def test_nan_gradient_with_finite_loss_skips_the_step_everywhere(job, stage):
    """A NaN gradient on rank 1 at step 3 while every loss is finite: with plain fp32 ZeRO-0 the
    engine's own norm check refuses the step, otherwise DeepSpeed's; either way both ranks keep
    their state and the log names the gradient norm."""
    for rank in (0, 1):
        r = job("nan_grad", rank=rank)[stage]
        assert r["unchanged_by_skip"] and r["changed_by_next"], (rank, r)
    lines = job("nan_grad")[stage]["lines"]
    assert [line.get("skip_reason") for line in lines] == [None, None, "grad_norm", None]
    assert [line["skipped_steps"] for line in lines] == [0, 0, 1, 1]
    assert isinstance(lines[2]["loss"], float) and lines[2]["grad_norm"] is None
    assert lines[3]["lr"] == lines[2]["lr"]


def test_consecutive_skips_stop_the_run_naming_step_and_checkpoint(job):
    """max_consecutive_skips=2; NaN on rank 0 at steps 2, 3, 4: the third skip in a row stops it."""
    r = job("nan_streak")
    assert r["step"] == 4
    assert r["error"].startswith("step 4: 3 consecutive steps skipped (last reason: non-finite loss), more than "
                                 "training.max_consecutive_skips=2; the parameters are those after step 1; "
                                 "the last good checkpoint is ")
    assert r["error"].split("the last good checkpoint is ")[1].split(" ")[0].endswith("nan_streak/checkpoints/global_step1")
    assert [line.get("skip_reason") for line in r["lines"]] == [None, "loss", "loss", "loss"]
    assert [line["skipped_steps"] for line in r["lines"]] == [0, 1, 2, 3]


def test_bf16_zero2_trains_with_fp32_master_weights(job):
    r = job("bf16")
    assert r["module_dtypes"] == ["torch.bfloat16"] and r["master_dtypes"] == ["torch.float32"]
    losses = _losses(r["lines"])
    assert len(losses) == STEPS and all(isinstance(x, float) for x in losses)
    assert [line["skipped_steps"] for line in r["lines"]] == [0] * STEPS
    # bf16 compute tracks the fp32 trajectory to bf16 precision (8 bits of mantissa: ~0.4%)
    assert losses == pytest.approx(_losses(job("parity")["zero2"]), rel=1e-2)


def test_zero3_trace_cache_stays_valid(job):
    r = job("zero3_trace")
    assert len(r["lines"]) == 4 and all(line.get("eval_loss") for line in (r["lines"][1], r["lines"][3]))
    assert r["warnings"] == []


# ---------------------------------------------------------------- stopping on a signal
# A stopped run saves a complete checkpoint, exits with status 3 and resumes exactly; two ranks stop
# after the same step when only one got the signal. The signal comes from LGDLM_SIGNAL_AT, which
# makes a rank send itself SIGUSR1 during a given step: the same stop however fast the machine.
# tests/test_preemption.py tests the handlers and that hook; tests/test_slurm.py stops a job of the
# srun template with a real SIGUSR1 sent through SLURM.

STOP_AT = 3
SIGNAL_RUN = [*RUN, *SYNTHETIC, "data.path=", "data.standardize_latents=false", "data.num_samples=9",
              "data.val_fraction=0.5", "training.micro_batch_size=2", f"training.num_train_steps={STEPS}",
              "training.lr=3e-3", "training.eval_every=0", "logging.save_every=0"]


def _train(run_dir: Path, *overrides: str, signal_at: str | None = None, ranks: int = 0) -> subprocess.Popen:
    """``python -m lgdlm_ds.train`` of SIGNAL_RUN, started: a plain process, or ``ranks`` ranks through
    launch/train.sh (the DeepSpeed launcher, in this environment). The in-process engine tests' rank
    variables stay out."""
    env = {k: v for k, v in os.environ.items() if k not in WORLD_KEYS and k != HOOK}
    env.update(OMP_NUM_THREADS="1", DEEPSPEED_TIMEOUT="5", **({HOOK: signal_at} if signal_at else {}))
    if ranks:
        env.update(NUM_GPUS=str(ranks), MASTER_PORT=str(free_port()), LGDLM_NO_VENV="1",
                   PATH=f"{Path(sys.executable).parent}:{env['PATH']}")
    launcher = ["bash", "launch/train.sh"] if ranks else [sys.executable, "-m", "lgdlm_ds.train"]
    cmd = [*launcher, "recipes/00_smoke/recipe.yaml", *SIGNAL_RUN, f"logging.run_dir={run_dir}", *overrides]
    return subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _finish(proc: subprocess.Popen) -> tuple[int, str]:
    out, err = proc.communicate(timeout=600)
    return proc.returncode, out + err


def _trajectory(run_dir: Path) -> dict[int, dict]:
    """The log's last line per step: the line the run went on from."""
    return {line["step"]: line for line in map(json.loads, (run_dir / LOG_NAME).read_text().splitlines())}


def _checkpoints(run_dir: Path) -> tuple[str, list[str]]:
    """The ``latest`` pointer and every file of every checkpoint folder."""
    ckpt = run_dir / "checkpoints"
    return (ckpt / "latest").read_text(), sorted(str(p.relative_to(ckpt)) for p in ckpt.glob("global_step*/*"))


def test_a_stopped_run_saves_exits_3_and_resumes_exactly(tmp_path):
    straight, stopped = tmp_path / "straight", tmp_path / "stopped"
    procs = _train(straight), _train(stopped, signal_at=str(STOP_AT))
    (status, output), (stop_status, stop_output) = map(_finish, procs)
    assert status == 0, output[-6000:]
    assert stop_status == 3, stop_output[-6000:]
    assert (f"stopped on a signal after step {STOP_AT}; {stopped}/checkpoints/global_step{STOP_AT} is complete "
            "and the same command resumes from it") in stop_output.splitlines()
    assert _checkpoints(stopped) == (f"global_step{STOP_AT}", [f"global_step{STOP_AT}/complete.json",
                                                               f"global_step{STOP_AT}/mp_rank_00_model_states.pt"])
    assert list(_trajectory(stopped)) == list(range(1, STOP_AT + 1))

    status, output = _finish(_train(stopped))  # the same command
    assert status == 0, output[-6000:]
    resumed, reference = _trajectory(stopped), _trajectory(straight)
    assert list(resumed) == list(reference) == list(range(1, STEPS + 1))
    for step, line in resumed.items():  # every loss term, lr, grad_norm, ...: bitwise
        assert {k: v for k, v in line.items() if k not in TIMING_KEYS} == {
            k: v for k, v in reference[step].items() if k not in TIMING_KEYS}, step


def test_two_ranks_stop_after_the_same_step_when_one_got_the_signal(tmp_path):
    """Only rank 1 sends itself SIGUSR1, during step 3. ZeRO-2, so that each rank writes its own
    optimizer shard: both shards of step 3 and the completion marker (written after every rank's
    save) show that both ranks saved after step 3, and nothing was saved after it."""
    ds = json.loads((ROOT / "ds_configs" / "zero2_bf16.json").read_text())
    ds["bf16"]["enabled"] = False
    (tmp_path / "zero2.json").write_text(json.dumps(ds))
    run = tmp_path / "run"
    status, output = _finish(_train(run, f"training.ds_config={tmp_path / 'zero2.json'}", signal_at=f"{STOP_AT}:1",
                                    ranks=2))
    assert status == 3, output[-6000:]  # the launcher passes the ranks' status on
    assert output.count(f"stopped on a signal after step {STOP_AT};") == 1, output[-6000:]  # rank 0 says it
    assert _checkpoints(run) == (f"global_step{STOP_AT}", [
        f"global_step{STOP_AT}/{name}" for name in ("complete.json", "mp_rank_00_model_states.pt",
                                                    "zero_pp_rank_0_mp_rank_00_optim_states.pt",
                                                    "zero_pp_rank_1_mp_rank_00_optim_states.pt")])
    assert list(_trajectory(run)) == list(range(1, STOP_AT + 1))
