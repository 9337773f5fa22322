"""The run directory a run may write into: what is the same run (its refusals, with their messages,
are rows of docs/errors.md driven by tests/test_docs_errors.py)."""
from bad_config import earlier_start, train_args
from core_utils import SMOKE
from lgdlm_ds.config import load_config
from lgdlm_ds.run_directory import check_run_directory


def test_the_same_model_with_other_settings_is_the_same_run(tmp_path):
    earlier_start(tmp_path)
    # Nothing here changes a parameter's shape: a restart may change all of it.
    cfg = load_config(SMOKE, train_args(tmp_path, "training.lr=3e-3", "training.micro_batch_size=2",
                                        "model.dropout=0.1", "model.activation_checkpointing=true",
                                        "model.fused_hyper_connections=false")[1:])
    for resuming in (False, True):
        check_run_directory(cfg, resuming)


def test_a_new_run_directory_below_a_writable_folder_is_not_made_by_the_check(tmp_path):
    cfg = load_config(SMOKE, [f"logging.run_dir={tmp_path / 'a' / 'b' / 'run'}"])
    check_run_directory(cfg, resuming=False)
    assert list(tmp_path.iterdir()) == []
