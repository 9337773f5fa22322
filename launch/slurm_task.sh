#!/usr/bin/env bash
# One srun task of launch/slurm_*.sbatch: runs its arguments as a command.
#   bash launch/slurm_task.sh COMMAND [ARG ...]
# SIGUSR1 and SIGTERM are ignored here (this shell's death would make srun's --kill-on-bad-exit kill
# the training at once) and, inherited, SIGUSR1 by the launchers below (DeepSpeed's would die of it):
# they reach the training processes, whose handlers finish the step and save
# (lgdlm_ds/preemption.py). A training that stopped after saving (exit status STOPPED_AFTER_SAVE)
# leaves STOPPED_MARKER and exits 0, so that --kill-on-bad-exit does not cut the other ranks short;
# launch/slurm_job.sh then requeues the job.
set -uo pipefail
trap '' USR1 TERM
"$@"
status=$?
if [ "$status" -eq "$STOPPED_AFTER_SAVE" ]; then
  touch "$STOPPED_MARKER"
  exit 0
fi
exit "$status"
