"""``python -m lgdlm_ds.train``: bad input fails in one line, with exit status 2, before DeepSpeed
starts."""
import os
import subprocess
import sys
import time

import pytest

from lgdlm_ds import train
from core_utils import ROOT, SMOKE


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
