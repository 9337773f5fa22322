"""Checkpoint rotation, what a crash leaves and how the next launch clears it, and what a resume
setting points at (the engine's checkpoints are tested in test_trainer.py, crashes of real runs in
test_crash.py)."""
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
    with pytest.raises(checkpoint.CheckpointError, match=f"{ckpt / 'global_step9'} is a partial checkpoint .* never "
                                                         f"loaded; resume from {ckpt}, whose 'latest' names"):
        checkpoint.find_resume(str(ckpt / "global_step9"), ckpt)
    foreign = tmp_path / "elsewhere" / "global_step3"  # another layout (no markers): taken as it is
    foreign.mkdir(parents=True)
    (foreign / "mp_rank_00_model_states.pt").write_bytes(b"")
    (foreign.parent / checkpoint.POINTER).write_text("global_step3")
    assert checkpoint.find_resume(str(foreign), ckpt) == (foreign.parent, "global_step3")
    with pytest.raises(checkpoint.CheckpointError, match="already holds checkpoints"):
        checkpoint.find_resume("none", ckpt)
    with pytest.raises(checkpoint.CheckpointError, match="neither a checkpoints folder"):
        checkpoint.find_resume(str(tmp_path / "nowhere"), ckpt)
    (ckpt / checkpoint.POINTER).write_text("global_step9")
    with pytest.raises(checkpoint.CheckpointError, match="not a complete checkpoint"):
        checkpoint.find_resume("auto", ckpt)


def test_rotation_renames_before_removing(tmp_path, monkeypatch):
    """A removal cut short leaves a temporary name, never a global_stepN folder without its files:
    here rmtree dies after the rename, as a killed rank would."""
    for step in (2, 4):
        _fake_tag(tmp_path, step)

    def killed(path):
        raise KeyboardInterrupt
    monkeypatch.setattr(checkpoint.shutil, "rmtree", killed)
    with pytest.raises(KeyboardInterrupt):
        checkpoint.rotate(tmp_path, keep_last=1, saved="global_step4")
    (leftover,) = tmp_path.glob(".tmp-global_step2-*")
    assert checkpoint.complete_tags(tmp_path) == ["global_step4"]
    assert (leftover / checkpoint.MARKER).is_file()  # intact, but no longer listed


def test_remove_partial_reports_and_removes_what_a_crash_left(tmp_path, capsys):
    for step in (2, 4):
        _fake_tag(tmp_path, step)
    _fake_tag(tmp_path, 6, complete=False)
    (tmp_path / "global_step8").mkdir()  # a save killed before any file
    (tmp_path / checkpoint.POINTER).write_text("global_step4")
    half_removed = tmp_path / ".tmp-global_step0-123"
    half_removed.mkdir()
    (half_removed / "zero_pp_rank_1_mp_rank_00_optim_states.pt").write_bytes(b"")
    (tmp_path / ".tmp-latest-456").write_text("global_step")
    removed = checkpoint.remove_partial(tmp_path)
    assert sorted(p.name for p in removed) == [".tmp-global_step0-123", ".tmp-latest-456", "global_step6",
                                               "global_step8"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["global_step2", "global_step4", "latest"]
    err = capsys.readouterr().err.splitlines()
    assert f"[lgdlm] removing {tmp_path / 'global_step6'} (partial checkpoint, no complete.json: its save was " \
           "interrupted)" in err
    assert f"[lgdlm] removing {half_removed} (left by an interrupted checkpoint removal)" in err
    assert f"[lgdlm] removing {tmp_path / '.tmp-latest-456'} (left by an interrupted pointer write)" in err
    assert len(err) == 4
    assert checkpoint.remove_partial(tmp_path) == []
