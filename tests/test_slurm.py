"""The SLURM templates under a real SLURM (tests/slurm_cluster.py: two emulated nodes on this
machine): launch/slurm_multinode.sbatch and launch/slurm_srun.sbatch each train the smoke recipe for
a few steps on one node and on two nodes, one CPU rank per node, submitted the way their comments
tell a CPU-only cluster to. Each job spends about a minute starting up, so the four jobs run
together, once, for all the tests here. Then one more job of the srun template, stopped by SIGUSR1,
requeued and resumed. Skipped, saying how to run them, without root or SLURM."""
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

from engine_utils import RUN, SYNTHETIC, free_port
from lgdlm_ds.metrics import LOG_NAME
from lgdlm_ds.slurm_env import expand_hostlist
from slurm_cluster import FINAL_STATES, Cluster, why_unavailable

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


PREEMPT_STEPS = 100
PREEMPT_RUN = [*RUN, *SYNTHETIC, "data.path=", "data.standardize_latents=false", "data.num_samples=9",
               "data.val_fraction=0.5", "training.micro_batch_size=2", f"training.num_train_steps={PREEMPT_STEPS}",
               "training.eval_every=0", "logging.save_every=0"]


def _follow_stopped_job(cluster: Cluster, job_id: str, log_file: Path, timeout: float) -> tuple[dict, list[str]]:
    """Sends SIGUSR1 to the job's batch shell once its ranks logged step 2, releases the requeued job
    from SLURM's requeue hold (about 2 minutes) and waits for its end. Returns its final record and
    the states it went through. The release waits 3 s: slurmd refuses to start a job again within
    the second its previous run's credential was revoked ("Job credential revoked": FAILED)."""
    states, signalled, pending_since = [], False, None
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        info = cluster.job(job_id)
        if not states or states[-1] != info["JobState"]:
            states.append(info["JobState"])
        if info["JobState"] in FINAL_STATES:
            return info, states
        if not signalled and log_file.exists() and log_file.read_text().count("\n") >= 2:
            proc = cluster.run("scancel", "--batch", "--signal=USR1", job_id)
            assert proc.returncode == 0, proc.stderr
            signalled = True
        if signalled and info["JobState"] == "PENDING":
            pending_since = pending_since or time.monotonic()
            if time.monotonic() - pending_since > 3:
                cluster.run("scontrol", "update", f"jobid={job_id}", "StartTime=now")
        time.sleep(0.5)
    raise TimeoutError(f"job {job_id} still {states[-1]} after {timeout:.0f} s (states: {states})")


def test_srun_job_stopped_by_usr1_requeues_itself_and_resumes_exactly(cluster, tmp_path):
    """A two-node job of launch/slurm_srun.sbatch, one rank per node, gets SIGUSR1 in its batch shell
    once the ranks logged step 2 (`scancel --batch --signal=USR1`: what --signal=B:USR1@N sends
    before the time limit). The template passes it on to both ranks, which save after the same step
    and exit 3; the job requeues itself, resumes and completes. Its loss per step (the log's last
    line per step) equals that of an uninterrupted run of the same recipe and world size under the
    DeepSpeed launcher, run here meanwhile."""
    run_dir, reference_dir = tmp_path / "job", tmp_path / "reference"
    (ROOT / "logs").mkdir(exist_ok=True)
    job_id = cluster.submit("--job-name=lgdlm-test-preempt", "--partition=both", "--nodes=2", "--gpus-per-node=0",
                            "--ntasks-per-node=1", "--cpus-per-task=1", "launch/slurm_srun.sbatch", RECIPE,
                            *PREEMPT_RUN, f"logging.run_dir={run_dir}", env=_job_env(), cwd=ROOT)
    reference = subprocess.Popen(
        [sys.executable, "-m", "deepspeed.launcher.runner", "--num_gpus", "2", "--master_port", str(free_port()),
         "--module", "lgdlm_ds.train", RECIPE, *PREEMPT_RUN, f"logging.run_dir={reference_dir}"],
        cwd=ROOT, env=_job_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        info, states = _follow_stopped_job(cluster, job_id, run_dir / LOG_NAME, timeout=1200)
        log = Path(info["StdOut"]).read_text()
        reference_output = reference.communicate(timeout=600)[0]
    finally:
        cluster.run("scancel", job_id)
        reference.kill()
        for f in (ROOT / "logs").glob(f"*-{job_id}.*"):
            f.unlink()
        with contextlib.suppress(OSError):
            (ROOT / "logs").rmdir()
    print(f"job {job_id}: states {' -> '.join(states)}")
    context = f"states {states}:\n{log[-6000:]}"
    assert (info["JobState"], info["ExitCode"], info["Restarts"]) == ("COMPLETED", "0:0", "1"), context
    assert states.count("RUNNING") == 2, context
    assert reference.returncode == 0, reference_output[-6000:]

    stopped = re.search(r"stopped on a signal after step (\d+); (\S+) is complete", log)
    assert stopped, f"no stop (did the run end before the signal came? then raise PREEMPT_STEPS): {context}"
    stop_step = int(stopped.group(1))
    assert 2 <= stop_step < PREEMPT_STEPS and log.count("stopped on a signal") == 1, context
    assert stopped.group(2) == str(run_dir / "checkpoints" / f"global_step{stop_step}")
    for line in (f"== job {job_id} attempt 0", "[job] SIGUSR1: asking the ranks to save and stop",
                 f"[job] training stopped after saving: requeueing job {job_id}", f"== job {job_id} attempt 1",
                 "[job] srun exit status 0"):
        assert line in log, (line, context)

    lines = [json.loads(x) for x in (run_dir / LOG_NAME).read_text().splitlines()]
    # attempt 0 logged up to the step it saved after, attempt 1 went on from the next one
    assert [line["step"] for line in lines] == list(range(1, PREEMPT_STEPS + 1)), context
    reference_lines = [json.loads(x) for x in (reference_dir / LOG_NAME).read_text().splitlines()]
    assert [line["step"] for line in reference_lines] == list(range(1, PREEMPT_STEPS + 1))
    print(f"stopped after step {stop_step}; loss at steps {stop_step}, {stop_step + 1}, {PREEMPT_STEPS}: "
          f"{[lines[i - 1]['loss'] for i in (stop_step, stop_step + 1, PREEMPT_STEPS)]} (job), "
          f"{[reference_lines[i - 1]['loss'] for i in (stop_step, stop_step + 1, PREEMPT_STEPS)]} (reference)")
    for key in ("loss", "lr", "grad_norm", "epoch"):
        assert [line[key] for line in lines] == [line[key] for line in reference_lines], key
    assert (run_dir / "checkpoints" / "latest").read_text() == f"global_step{PREEMPT_STEPS}"
