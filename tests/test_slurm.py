"""The SLURM templates under a real SLURM (tests/slurm_cluster.py: two emulated nodes on this
machine): launch/slurm_multinode.sbatch and launch/slurm_srun.sbatch each train the smoke recipe for
a few steps on one node and on two nodes, one CPU rank per node, submitted the way their comments
tell a CPU-only cluster to. Each job spends about a minute starting up, so the four jobs run
together, once, for all the tests here. Skipped, saying how to run them, without root or SLURM."""
from __future__ import annotations

import contextlib
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest

from lgdlm_ds.slurm_env import expand_hostlist
from slurm_cluster import Cluster, why_unavailable

ROOT = Path(__file__).resolve().parent.parent
RECIPE = "recipes/00_smoke/recipe.yaml"
STEPS = 4
TEMPLATES = ("slurm_multinode", "slurm_srun")
RANK_VARIABLES = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_SIZE", "MASTER_ADDR", "MASTER_PORT")


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    reason = why_unavailable()
    if reason:
        pytest.skip(f"the SLURM launcher tests need a SLURM of their own: {reason}")
    c = Cluster(tmp_path_factory.mktemp("slurm"))
    try:
        c.start()
        yield c
    finally:
        c.stop()


def _job_env() -> dict[str, str]:
    """The test's interpreter is the environment (LGDLM_NO_VENV, its deepspeed on PATH). Rank and
    SLURM variables of this process (set by in-process engine tests, or an outer SLURM job) stay out."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_") and k not in RANK_VARIABLES}
    return {**env, "LGDLM_NO_VENV": "1", "PATH": f"{Path(sys.executable).parent}:{env['PATH']}",
            "OMP_NUM_THREADS": "1"}


def _prepare_smoke_data() -> None:
    """The recipe's data/ folder, prepared once (about a minute) and shared by every job."""
    code = ("import sys; from lgdlm_ds.config import load_config; from lgdlm_ds.data import build_dataset; "
            "build_dataset(load_config(sys.argv[1]), 'train')")
    proc = subprocess.run([sys.executable, "-c", code, RECIPE], cwd=ROOT, env=_job_env(), capture_output=True,
                          text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]


@pytest.fixture(scope="module")
def jobs(cluster, tmp_path_factory):
    """(template, nodes) -> (scontrol record, run directory, job log, seconds from start to end)."""
    _prepare_smoke_data()
    (ROOT / "logs").mkdir(exist_ok=True)
    runs = tmp_path_factory.mktemp("runs")
    submitted = {}
    for template in TEMPLATES:
        for nodes in (1, 2):
            run_dir = runs / f"{template}_{nodes}n"
            # The CPU-only submission of the templates' comments: no GPU request, one rank per node.
            args = [f"--job-name=lgdlm-test-{template}-{nodes}n", f"--partition={'one' if nodes == 1 else 'both'}",
                    f"--nodes={nodes}", "--gpus-per-node=0", "--ntasks-per-node=1", "--cpus-per-task=1",
                    f"launch/{template}.sbatch", RECIPE, f"training.num_train_steps={STEPS}",
                    f"logging.run_dir={run_dir}", "training.eval_every=0", "logging.log_every=2",
                    "logging.save_every=0", "logging.progress_bar=false"]
            submitted[template, nodes] = cluster.submit(*args, env=_job_env(), cwd=ROOT), run_dir
    results = {}
    try:
        for key, (job_id, run_dir) in submitted.items():
            info = cluster.wait(job_id, timeout=1200)
            log = Path(info["StdOut"])
            seconds = _seconds(info["EndTime"]) - _seconds(info["StartTime"])
            results[key] = info, run_dir, log.read_text() if log.exists() else "(no log)", seconds
        yield results
    finally:
        for job_id, _ in submitted.values():
            cluster.run("scancel", job_id)
            for f in (ROOT / "logs").glob(f"*-{job_id}.*"):
                f.unlink()
        with contextlib.suppress(OSError):  # only when empty: other jobs' logs stay
            (ROOT / "logs").rmdir()


def _seconds(stamp: str) -> float:
    return time.mktime(time.strptime(stamp, "%Y-%m-%dT%H:%M:%S"))


@pytest.mark.parametrize("nodes", (1, 2))
@pytest.mark.parametrize("template", TEMPLATES)
def test_template_trains_the_smoke_recipe(jobs, cluster, template, nodes):
    info, run_dir, log, seconds = jobs[template, nodes]
    context = f"{template} on {nodes} node(s), job {info['JobId']}, {seconds:.0f} s:\n{log[-5000:]}"
    assert (info["JobState"], info["ExitCode"]) == ("COMPLETED", "0:0"), context
    print(f"{template} on {nodes} node(s): {info['JobState']} {info['ExitCode']} in {seconds:.0f} s")
    assert expand_hostlist(info["NodeList"]) == cluster.nodes[:nodes], context

    lines = [json.loads(x) for x in (run_dir / "training_log.jsonl").read_text().splitlines()]
    assert [line["step"] for line in lines] == [2, 4], context
    assert all(line["loss"] > 0 and line["lr"] > 0 and line["skipped_steps"] == 0 for line in lines), context
    env = (run_dir / "env.txt").read_text()
    assert f"world_size: {nodes}\n" in env and "local_size: 1\n" in env, env

    # What the template prints and keeps for every attempt.
    job_id = info["JobId"]
    assert f"== job {job_id} attempt 0" in log and "pip freeze:" in log and "[job] srun exit status 0" in log, context
    assert f"nodes ({nodes}): {' '.join(cluster.nodes[:nodes])}" in log, context
    assert f"ranks per node: 1; master: {cluster.host}:" in log, context
    copy = ROOT / "logs" / f"lgdlm-test-{template}-{nodes}n-{job_id}.0.recipe.yaml"
    assert copy.read_text().endswith((ROOT / RECIPE).read_text()), copy
    assert re.search(rf"with overrides: .*logging.run_dir={re.escape(str(run_dir))}", copy.read_text())
    if template == "slurm_multinode":
        hostfile = ROOT / "logs" / f"lgdlm-test-{template}-{nodes}n-{job_id}.hostfile"
        assert hostfile.read_text().splitlines() == [f"{n} slots=1" for n in cluster.nodes[:nodes]]
