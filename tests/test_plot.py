"""``lgdlm_ds.plot`` on a run trained by the real engine (conftest.py's ``packed_run``)."""
import json
from pathlib import Path

import pytest

from lgdlm_ds.metrics import LOG_NAME, LogError
from lgdlm_ds.tools import plot as plot_cli
from core_utils import run_cli


def test_plot_writes_the_figures(packed_run, tmp_path):
    run = packed_run.run_dir
    rc, (result,), err = run_cli(plot_cli.main, run, "--out", tmp_path)
    assert rc == 0, err
    names = {Path(p).name for p in result["written"]}
    assert names == {"losses.png", "cycle_weights.png", "optimization.png", "throughput.png", "eval.png",
                     "metrics.png"}
    for p in result["written"]:
        assert Path(p).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and Path(p).stat().st_size > 10_000


def test_plot_keeps_the_last_line_of_a_repeated_step(packed_run, tmp_path):
    lines = (packed_run.run_dir / LOG_NAME).read_text().splitlines()
    replayed = json.loads(lines[0])
    replayed["loss"] = 123.0  # a resumed run logs the step again; its line is the one that counts
    (tmp_path / LOG_NAME).write_text("\n".join(lines + [json.dumps(replayed)]) + "\n")
    records = plot_cli.read_log(tmp_path)
    assert [r["step"] for r in records] == [1, 2, 3]
    assert records[0]["loss"] == 123.0
    with pytest.raises(LogError, match="does not exist"):
        plot_cli.read_log(tmp_path / "nowhere")
