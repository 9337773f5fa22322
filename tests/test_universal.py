"""Resuming on another number of ranks (lgdlm_ds/universal.py): a ZeRO-2 or ZeRO-3 checkpoint saved
by 2 ranks resumes on 1 and one saved by 1 resumes on 2, converted to a universal checkpoint once,
by the run itself. Three launched jobs (tests/universal_job.py) do the runs; the tests assert on
what they wrote. Then the parts that need no engine: reading the saved rank count from the shard
names, and the DeepSpeed JSON key the engine now owns.
"""
from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from core_utils import ROOT, SMOKE
from engine_utils import launch
from lgdlm_ds.checkpoint import MARKER, CheckpointError
from lgdlm_ds.config import ConfigError, load_config
from lgdlm_ds.ds_config import load_ds_config
from lgdlm_ds.universal import UNIVERSAL, ResumeSource, resume_source, saved_ranks

SAVED_AT, STEPS = 3, 6
# (saved by, resumed on) -> (job that resumed, its key, job whose uninterrupted runs are the reference)
DIRECTIONS = {(2, 1): ("resume_one", "from_two", "two"), (1, 2): ("two", "from_one", "save_one")}
CONVERTING = re.compile(r"\[lgdlm\] global_step3 was saved by \d ranks?, this run has \d: converting it to a "
                        r"universal checkpoint in \S+/(saved_w\d_zero\d)/checkpoints/global_step3/universal")


@pytest.fixture(scope="module")
def jobs(tmp_path_factory):
    """jobs(name, rank=0) -> that rank's results; jobs.output[name]: the job's console output."""
    out = tmp_path_factory.mktemp("universal_job")
    outputs = {}
    for ranks, name in ((1, "save_one"), (2, "two"), (1, "resume_one")):
        proc = launch(ranks, ROOT / "tests/universal_job.py", name, str(out))
        outputs[name] = proc.stdout + proc.stderr
        assert proc.returncode == 0, f"{name} job failed:\n{outputs[name][-6000:]}"

    def result(name: str, rank: int = 0) -> dict:
        data = json.loads((out / f"{name}_rank{rank}.json").read_text())
        assert "exception" not in data, data["exception"]
        return data
    result.output = outputs
    return result


def _by_step(lines: list[dict]) -> dict[int, dict]:
    """The log's last line per step: a resumed run writes the steps after its checkpoint again."""
    return {line["step"]: line for line in lines}


@pytest.mark.parametrize("stage", [2, 3])
@pytest.mark.parametrize("saved_by,resumed_on", list(DIRECTIONS))
def test_a_run_resumed_on_another_rank_count_continues_the_uninterrupted_one(jobs, stage, saved_by, resumed_on):
    """Steps 1-3 on ``saved_by`` ranks, a checkpoint, steps 4-6 on ``resumed_on`` ranks, against the
    uninterrupted ``saved_by``-rank run. Global batch 4 in both (2 ranks x 1 micro-step, 1 x 2).

    Exact, so compared bitwise: the step, the data position and the learning-rate position
    (integers); the fp32 master weights, AdamW moments and step count, which the universal
    checkpoint holds as copies; the samples and noise of every later step, which depend only on the
    global batch and the step (batching.py, trainer.py). So step 4's forward runs on the same
    numbers and its loss is bitwise the uninterrupted one's (the logged loss is the mean of the
    same two slot losses, (a + b) / 2 on one rank or two).

    Not exact: each update after that. The two slot gradients meet in a different place (an
    all-reduce or one rank's accumulation), which is still exact (a + b commutes, halving is exact
    in binary), but the clipping norm sums squares per ZeRO partition, then across ranks: a
    different order, a few fp32 ulps (~1e-7 relative). Where the norm is above gradient_clipping
    that scales the gradient by as much, and AdamW's update is scale-invariant up to eps, so the
    weights move by far less. Steps 5-6 get 1e-6 relative, which is still far below the loss's
    change from one step to the next (asserted), so a resume that lost state or data order fails.
    Measured here: all equal bitwise."""
    job, key, reference_job = DIRECTIONS[(saved_by, resumed_on)]
    r = jobs(job)[key][f"zero{stage}"]
    reference = jobs(reference_job)["runs"][f"zero{stage}"]
    straight, resumed = _by_step(reference["straight"]), _by_step(r["lines"])
    assert r["resumed_at"] == SAVED_AT and r["position"] == reference["saved_position"]
    assert Path(r["last"]).name == f"global_step{SAVED_AT}"
    assert sorted(resumed) == sorted(straight) == list(range(1, STEPS + 1))
    first = SAVED_AT + 1
    for name in ("loss", "lr", "epoch"):
        assert resumed[first][name] == straight[first][name], name
    later = [resumed[s]["loss"] for s in range(first + 1, STEPS + 1)]
    expected = [straight[s]["loss"] for s in range(first + 1, STEPS + 1)]
    assert later == pytest.approx(expected, rel=1e-6, abs=0)
    changes = [abs(straight[s + 1]["loss"] - straight[s]["loss"]) / straight[s]["loss"] for s in range(1, STEPS)]
    assert min(changes) > 100 * 1e-6


@pytest.mark.parametrize("saved_by,resumed_on", list(DIRECTIONS))
def test_the_checkpoint_is_converted_once_beside_itself(jobs, saved_by, resumed_on):
    """The first launch converts (one message per checkpoint), the second loads the same universal
    folder without writing it again; afterwards one universal folder sits inside global_step3 and
    nothing temporary is left. Both launches loaded the same state."""
    job, key, _ = DIRECTIONS[(saved_by, resumed_on)]
    converted = CONVERTING.findall(jobs.output[job])
    for stage in (2, 3):
        run = f"saved_w{saved_by}_zero{stage}"
        r = jobs(job)[key][f"zero{stage}"]
        assert converted.count(run) == 1, jobs.output[job][-4000:]
        assert r["universal_folders"] == [f"{run}/checkpoints/global_step{SAVED_AT}/{UNIVERSAL}"]
        assert r["leftovers"] == []
        assert r["marker_kept"] and r["same_state"]


def test_a_conversion_killed_midway_leaves_nothing_that_loads(jobs):
    """SIGKILL after the converter wrote every parameter's fragments: no universal folder, only the
    temporary one holding the fragments; the next launch (the 2 -> 1 ZeRO-2 resume, tested above)
    converted again and left nothing temporary."""
    killed = jobs("resume_one")["killed"]
    assert killed["returncode"] == -9
    assert not killed["universal_exists"]
    assert len(killed["leftovers"]) == 1 and killed["leftovers"][0].startswith(".tmp-universal-")
    assert killed["leftover_fragments"] > 0
    assert CONVERTING.findall(jobs.output["resume_one"]).count("saved_w2_zero2") == 1
    assert jobs("resume_one")["from_two"]["zero2"]["leftovers"] == []


# ---------------------------------------------------------------- without an engine


def _shards(folder: Path, *names: str) -> Path:
    folder.mkdir()
    for name in names:
        (folder / name).touch()
    return folder


def test_saved_ranks_come_from_the_shard_names(tmp_path):
    zero2 = _shards(tmp_path / "a", "mp_rank_00_model_states.pt", "zero_pp_rank_0_mp_rank_00_optim_states.pt",
                    "zero_pp_rank_1_mp_rank_00_optim_states.pt")
    bf16 = _shards(tmp_path / "b", *(f"bf16_zero_pp_rank_{r}_mp_rank_00_optim_states.pt" for r in range(4)))
    zero0 = _shards(tmp_path / "c", "mp_rank_00_model_states.pt")
    assert (saved_ranks(zero2), saved_ranks(bf16), saved_ranks(zero0)) == (2, 4, None)
    gap = _shards(tmp_path / "d", "zero_pp_rank_0_mp_rank_00_optim_states.pt",
                  "zero_pp_rank_2_mp_rank_00_optim_states.pt")
    with pytest.raises(CheckpointError, match=r"shards of ranks \[0, 2\], not 0..2: some are missing"):
        saved_ranks(gap)


def test_what_each_checkpoint_is_resumed_as(tmp_path):
    """Same rank count: the plain checkpoint. A folder converted by hand: loaded as universal, not
    converted again. Another rank count on a rank that does not see rank 0's conversion (a
    checkpoints folder not shared between nodes): an error saying so, not a plain load that fails."""
    ckpt_dir = tmp_path / "run" / "checkpoints"
    ckpt_dir.mkdir(parents=True)
    _shards(ckpt_dir / "global_step3", MARKER, "mp_rank_00_model_states.pt",
            *(f"zero_pp_rank_{r}_mp_rank_00_optim_states.pt" for r in range(2)))
    (ckpt_dir / "latest").write_text("global_step3")
    same = resume_source("auto", ckpt_dir, world=2, rank=0, barrier=lambda: None)
    assert same == ResumeSource(ckpt_dir / "global_step3", ckpt_dir, "global_step3", universal=False)
    by_hand = _shards(tmp_path / "global_step5", "mp_rank_00_model_states.pt")
    (by_hand / "zero").mkdir()
    (by_hand / "zero" / "optimizer_state.pt").touch()
    assert resume_source(str(by_hand), ckpt_dir, world=3, rank=0, barrier=lambda: None) == ResumeSource(
        by_hand, tmp_path, "global_step5", universal=True)
    with pytest.raises(CheckpointError, match="rank 1 does not see .*universal/complete.json, which rank 0 "
                                              "wrote: the checkpoints folder must be on a filesystem that every"):
        resume_source("auto", ckpt_dir, world=1, rank=1, barrier=lambda: None)


def test_universal_loading_is_switched_on_for_a_universal_source_and_a_zero_engine_only(tmp_path):
    ds = {"zero_optimization": {"stage": 2}}
    plain = ResumeSource(tmp_path, tmp_path.parent, tmp_path.name, universal=False)
    converted = ResumeSource(tmp_path, tmp_path, UNIVERSAL, universal=True)
    assert plain.ds_config(ds) == ds
    assert converted.ds_config(ds) == {**ds, "checkpoint": {"load_universal": True}}
    with pytest.raises(CheckpointError, match="load only into a ZeRO-1/2/3 engine: resume with the "
                                              "training.ds_config it was saved with"):
        converted.ds_config({"zero_optimization": {"stage": 0}})


def test_the_json_may_not_set_universal_loading(tmp_path):
    ds = json.loads((ROOT / "ds_configs" / "zero2_bf16.json").read_text())
    ds["checkpoint"] = {"load_universal": True}
    (tmp_path / "ds.json").write_text(json.dumps(ds))
    cfg = load_config(SMOKE, [f"training.ds_config={tmp_path / 'ds.json'}"])
    with pytest.raises(ConfigError, match="remove 'checkpoint.load_universal': the engine sets it itself"):
        load_ds_config(cfg)
