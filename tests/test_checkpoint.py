"""Checkpoint rotation and what a resume setting points at (the engine's checkpoints are tested in
test_trainer.py)."""
from pathlib import Path

import pytest

from lgdlm_ds import checkpoint


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
    checkpoint.rotate(tmp_path, keep_last=2, saved="global_step30")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["global_step20", "global_step30"]


def test_rotation_keeps_the_checkpoint_just_saved_below_the_newest(tmp_path):
    """A run resumed from step 10 saves step 11 while steps 20 and 30 remain from before."""
    for step in (10, 11, 20, 30):
        _fake_tag(tmp_path, step)
    checkpoint.rotate(tmp_path, keep_last=1, saved="global_step11")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["global_step11", "global_step30"]


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
