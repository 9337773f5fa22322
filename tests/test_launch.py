"""The launch scripts without a cluster: shell syntax and shellcheck, launch/train.sh's resolved
command, and the SLURM -> rank mapping of lgdlm_ds.slurm_env (tests/test_slurm.py runs the
templates under a real SLURM)."""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from lgdlm_ds.slurm_env import expand_counts, expand_hostlist, export_ranks

ROOT = Path(__file__).resolve().parent.parent
SCRIPTS = sorted([*ROOT.glob("launch/*.sh"), *ROOT.glob("launch/*.sbatch"), ROOT / ".ci" / "run"])


@pytest.mark.parametrize("script", SCRIPTS, ids=lambda p: str(p.relative_to(ROOT)))
def test_shell_syntax(script):
    proc = subprocess.run(["bash", "-n", str(script)], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr


def test_shellcheck():
    if shutil.which("shellcheck") is None:
        pytest.skip("shellcheck is not installed: `apt-get install -y shellcheck` (.ci/run installs it)")
    proc = subprocess.run(["shellcheck", "-S", "warning", *map(str, SCRIPTS)], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def _train_sh(*args: str, **env_vars: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "LGDLM_NO_VENV": "1", "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}",
           **env_vars}
    return subprocess.run(["bash", str(ROOT / "launch" / "train.sh"), *args], cwd="/", env=env,
                          capture_output=True, text=True, timeout=120)


def test_train_sh_dry_run_prints_the_command():
    proc = _train_sh("recipes/00_smoke/recipe.yaml", "training.lr=3e-4", "logging.run_dir=runs/a b",
                     DRY_RUN="1", NUM_GPUS="2", MASTER_PORT="29555", OMP_NUM_THREADS="3")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.split("\n")[0].split(" deepspeed ")[1].strip() == (
        "--num_gpus 2 --master_port 29555 --module lgdlm_ds.train recipes/00_smoke/recipe.yaml "
        r"training.lr=3e-4 logging.run_dir=runs/a\ b")
    assert "DEEPSPEED_TIMEOUT=30 " in proc.stdout


def test_train_sh_refuses_bad_arguments():
    assert _train_sh().returncode == 2
    proc = _train_sh("recipes/nope/recipe.yaml")
    assert proc.returncode == 2 and "recipes/nope/recipe.yaml not found" in proc.stderr


@pytest.mark.parametrize("hostlist, hosts", [
    ("vm", ["vm"]),
    ("vm,vm-2", ["vm", "vm-2"]),
    ("gpu[01-03,7],login1", ["gpu01", "gpu02", "gpu03", "gpu7", "login1"]),
    ("node[8-11]", ["node8", "node9", "node10", "node11"]),
    ("r[1-2]n[0-1]", ["r1n0", "r1n1", "r2n0", "r2n1"]),
    ("a[1],b[02-03]-ib", ["a1", "b02-ib", "b03-ib"]),
])
def test_expand_hostlist(hostlist, hosts):
    assert expand_hostlist(hostlist) == hosts


@pytest.mark.parametrize("hostlist", ["gpu[1-", "gpu[3-1]", "gpu[a]", ""])
def test_expand_hostlist_refuses_malformed_lists(hostlist):
    with pytest.raises(ValueError, match="host list"):
        expand_hostlist(hostlist)


def test_expand_counts():
    assert expand_counts("4(x2),2") == [4, 4, 2] and expand_counts("1") == [1]
    with pytest.raises(ValueError, match="tasks per node"):
        expand_counts("4(2)")


SRUN_TASK = {"SLURM_STEP_ID": "0", "SLURM_PROCID": "5", "SLURM_LOCALID": "1", "SLURM_NODEID": "2",
             "SLURM_NTASKS": "7", "SLURM_NNODES": "3", "SLURM_STEP_TASKS_PER_NODE": "3(x2),1",
             "SLURM_STEP_NODELIST": "gpu[07-09]", "SLURM_JOB_NODELIST": "gpu[07-09]", "SLURM_JOB_ID": "123456"}


def test_export_ranks_maps_an_srun_task():
    env = dict(SRUN_TASK)
    assert export_ranks(env)
    assert {k: env[k] for k in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_SIZE", "MASTER_ADDR", "MASTER_PORT")} == {
        "RANK": "5", "LOCAL_RANK": "1", "WORLD_SIZE": "7", "LOCAL_SIZE": "1", "MASTER_ADDR": "gpu07",
        "MASTER_PORT": str(20000 + 123456 % 20000)}
    env = {**SRUN_TASK, "SLURM_NODEID": "0", "MASTER_ADDR": "10.0.0.1", "MASTER_PORT": "29500"}
    assert export_ranks(env)  # node 0 runs 3 tasks; the batch script's MASTER_* stay
    assert (env["LOCAL_SIZE"], env["MASTER_ADDR"], env["MASTER_PORT"]) == ("3", "10.0.0.1", "29500")


def test_export_ranks_leaves_launchers_and_batch_scripts_alone():
    launched = {**SRUN_TASK, "RANK": "0"}  # a launcher (deepspeed under srun) set the ranks
    assert not export_ranks(launched) and "WORLD_SIZE" not in launched
    batch = {k: v for k, v in SRUN_TASK.items() if k != "SLURM_STEP_ID"}  # the batch script, no srun
    assert not export_ranks(batch) and "RANK" not in batch
