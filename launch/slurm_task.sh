#!/usr/bin/env bash
# One srun task of launch/slurm_*.sbatch: runs its arguments as a command.
#   bash launch/slurm_task.sh COMMAND [ARG ...]
# SIGUSR1 is ignored here and, inherited, by the launchers below (DeepSpeed's would die of it); a
# training process that handles it installs its own handler. A training that stopped after saving
# (exit status STOPPED_AFTER_SAVE) leaves STOPPED_MARKER and exits 0, so that srun's
# --kill-on-bad-exit does not cut the other ranks short; launch/slurm_job.sh then requeues the job.
set -uo pipefail
trap '' USR1
"$@"
status=$?
if [ "$status" -eq "$STOPPED_AFTER_SAVE" ]; then
  touch "$STOPPED_MARKER"
  exit 0
fi
exit "$status"
