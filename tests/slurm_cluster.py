"""A real SLURM on this one machine for the launcher tests: two emulated nodes (two ``slurmd -N``
daemons on 127.0.0.1, different ports) under one ``slurmctld``, all in the foreground and torn down
afterwards. Partition ``one`` holds the first node, ``both`` holds both.

Needs root (the daemons run as SlurmUser=root) and Debian's packages, which .ci/run installs:

    apt-get install -y --no-install-recommends slurmctld slurmd slurm-client munge

munged is started when it is not running (and stopped again). The configuration, state, spool and
logs live in a temporary folder; clients find it through SLURM_CONF, which jobs inherit.
"""
from __future__ import annotations

import os
import random
import shutil
import socket
import subprocess
import time
from pathlib import Path

PACKAGES = "slurmctld slurmd slurm-client munge"
HOW_TO_RUN = (f"run them as root with Debian's SLURM installed: `apt-get install -y --no-install-recommends "
              f"{PACKAGES}` (.ci/run does both)")
PROGRAMS = ("/usr/sbin/slurmctld", "/usr/sbin/slurmd", "/usr/sbin/munged", "/usr/bin/munge", "/usr/bin/unmunge",
            "/usr/bin/sbatch", "/usr/bin/srun", "/usr/bin/scontrol", "/usr/bin/sinfo")
FINAL_STATES = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "BOOT_FAIL",
                "DEADLINE", "PREEMPTED"}


def why_unavailable() -> str | None:
    """None when a cluster can be started here, else the reason and how to run the tests."""
    if os.geteuid() != 0:
        return f"a SLURM of its own needs root; {HOW_TO_RUN}"
    missing = [p for p in PROGRAMS if not os.access(p, os.X_OK)]
    if missing:
        return f"{', '.join(missing)} not installed; {HOW_TO_RUN}"
    return None


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _munge_works() -> bool:
    cred = subprocess.run(["munge", "-n"], capture_output=True)
    return cred.returncode == 0 and subprocess.run(["unmunge"], input=cred.stdout, capture_output=True).returncode == 0


class Cluster:
    def __init__(self, root: Path):
        self.root = root
        self.host = socket.gethostname()  # the first node carries it, so MASTER_ADDR resolves
        self.nodes = [self.host, f"{self.host}-2"]
        self.conf = root / "slurm.conf"
        # An outer SLURM job's variables (pytest run inside one) would point the clients at it.
        self.env = {**{k: v for k, v in os.environ.items() if not k.startswith("SLURM_")}, "SLURM_CONF": str(self.conf)}
        self.daemons: list[subprocess.Popen] = []
        self.started_munged = False

    def start(self) -> None:
        self._start_munged()
        for d in ("state", *(f"spool-{n}" for n in self.nodes)):
            (self.root / d).mkdir(parents=True, exist_ok=True)
        self.conf.write_text(self._config())
        self._spawn("slurmctld", ["-D", "-i"], "slurmctld")
        for node in self.nodes:
            self._spawn("slurmd", ["-D", "-N", node], f"slurmd-{node}")
        self._wait_for_idle_nodes(timeout=60)

    def stop(self) -> None:
        for p in reversed(self.daemons):
            p.terminate()
        for p in self.daemons:
            try:
                p.wait(timeout=20)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()
        if self.started_munged:
            subprocess.run(["/usr/sbin/munged", "--stop"], capture_output=True)

    def _start_munged(self) -> None:
        if _munge_works():
            return
        Path("/run/munge").mkdir(parents=True, exist_ok=True)
        shutil.chown("/run/munge", "munge", "munge")
        subprocess.run(["runuser", "-u", "munge", "--", "/usr/sbin/munged"], check=True)  # forks into the background
        self.started_munged = True
        if not _munge_works():
            raise RuntimeError("munged started but `munge -n | unmunge` fails: see /var/log/munge/munged.log")

    def _config(self) -> str:
        r = self.root
        lines = [
            "ClusterName=lgdlmtest",
            f"SlurmctldHost={self.host}(127.0.0.1)",
            f"SlurmctldPort={_free_port()}",
            "SlurmUser=root", "SlurmdUser=root",
            "AuthType=auth/munge", "CredType=cred/munge",
            # No systemd or cgroups here: track processes by parentage.
            "ProctrackType=proctrack/linuxproc", "TaskPlugin=task/affinity",
            "SelectType=select/cons_tres", "SelectTypeParameters=CR_Core",
            "AccountingStorageType=accounting_storage/none", "JobAcctGatherType=jobacct_gather/none",
            "JobCompType=jobcomp/filetxt", f"JobCompLoc={r}/jobcomp.txt",
            "MpiDefault=none", "ReturnToService=2",
            "MinJobAge=3600",  # finished jobs stay visible to `scontrol show job` (sacct needs a database)
            # Job ids that differ from run to run: the templates name their logs after them.
            f"FirstJobId={random.randrange(1_000_000, 60_000_000)}",
            f"StateSaveLocation={r}/state", f"SlurmdSpoolDir={r}/spool-%n",
            f"SlurmctldPidFile={r}/slurmctld.pid", f"SlurmdPidFile={r}/slurmd-%n.pid",
            f"SlurmctldLogFile={r}/slurmctld.log", f"SlurmdLogFile={r}/slurmd-%n.log",
        ]
        cpus = os.cpu_count() or 1
        lines += [f"NodeName={n} NodeHostname={self.host} NodeAddr=127.0.0.1 Port={_free_port()} CPUs={cpus} "
                  "State=UNKNOWN" for n in self.nodes]
        lines += [f"PartitionName=one Nodes={self.nodes[0]} Default=YES MaxTime=INFINITE State=UP",
                  f"PartitionName=both Nodes={','.join(self.nodes)} MaxTime=INFINITE State=UP"]
        return "\n".join(lines) + "\n"

    def _spawn(self, program: str, args: list[str], name: str) -> None:
        """A daemon in the foreground; what it prints before its log file opens goes to NAME.stdout."""
        with open(self.root / f"{name}.stdout", "w") as out:
            self.daemons.append(subprocess.Popen([f"/usr/sbin/{program}", *args], env=self.env, stdout=out,
                                                 stderr=subprocess.STDOUT, start_new_session=True))

    def logs(self) -> str:
        """The daemons' log tails, for a failure message."""
        out = []
        for p in sorted(self.root.glob("*.log")) + sorted(self.root.glob("*.stdout")):
            out.append(f"--- {p.name}\n" + "\n".join(p.read_text(errors="replace").splitlines()[-15:]))
        return "\n".join(out)

    def _wait_for_idle_nodes(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        states = ""
        while time.monotonic() < deadline:
            if any(p.poll() is not None for p in self.daemons):
                break
            proc = subprocess.run(["sinfo", "-h", "-N", "-o", "%N %t"], env=self.env, capture_output=True, text=True)
            states = proc.stdout + proc.stderr
            idle = {line.split()[0] for line in proc.stdout.splitlines() if line.split()[1:] == ["idle"]}
            if idle >= set(self.nodes):
                return
            time.sleep(0.5)
        raise RuntimeError(f"the SLURM nodes did not come up (sinfo: {states.strip()!r})\n{self.logs()}")

    def run(self, *args: str, **kw) -> subprocess.CompletedProcess:
        """A SLURM client command against this cluster."""
        return subprocess.run(list(args), env={**self.env, **kw.pop("env", {})}, capture_output=True, text=True,
                              **kw)

    def submit(self, *args: str, env: dict[str, str], cwd: Path) -> str:
        proc = self.run("sbatch", "--parsable", *args, env=env, cwd=cwd)
        if proc.returncode != 0:
            raise RuntimeError(f"sbatch {' '.join(args)} failed: {proc.stderr.strip()}")
        return proc.stdout.strip().split(";")[0]

    def job(self, job_id: str) -> dict[str, str]:
        """`scontrol show job` as a dict (JobState, ExitCode, NodeList, StdOut, ...)."""
        proc = self.run("scontrol", "show", "job", "-o", job_id)
        if proc.returncode != 0:
            raise RuntimeError(f"scontrol show job {job_id}: {proc.stderr.strip()}")
        return dict(field.split("=", 1) for field in proc.stdout.split() if "=" in field)

    def wait(self, job_id: str, timeout: float) -> dict[str, str]:
        """The job's record once it reached a final state; cancels it after ``timeout`` seconds."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            info = self.job(job_id)
            if info["JobState"] in FINAL_STATES:
                return info
            time.sleep(1)
        self.run("scancel", job_id)
        raise TimeoutError(f"job {job_id} still {info['JobState']} after {timeout:.0f} s (cancelled)")
