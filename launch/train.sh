#!/usr/bin/env bash
# Train a recipe on this node: bash launch/train.sh RECIPE.yaml [section.key=value ...]
#   NUM_GPUS     ranks to start (default: every visible GPU; 1 on a machine without one)
#   MASTER_PORT  rendezvous port (default: a free one)
#   DRY_RUN=1    print the command and exit
# Prints the command it runs (environment it sets included) first. Rerunning the same command
# resumes from the run directory's newest complete checkpoint. SIGUSR1 to its process group
# (`kill -USR1 -- -PGID`) stops the run after the current step with a complete checkpoint: exit
# status 3. Several nodes under SLURM: launch/slurm_multinode.sbatch or launch/slurm_srun.sbatch.
set -euo pipefail
if [ $# -lt 1 ] || [ "$1" = "-h" ] || [ "$1" = "--help" ]; then
  echo "usage: bash launch/train.sh RECIPE.yaml [section.key=value ...]" >&2
  exit 2
fi
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
if ! (cd "$root" && [ -f "$1" ]); then  # the run starts in the repository root (env.sh)
  echo "error: recipe $1 not found in $root: give its path from the repository root" >&2
  exit 2
fi
source "$root/launch/env.sh"
export DEEPSPEED_TIMEOUT="${DEEPSPEED_TIMEOUT:-30}"  # minutes; DeepSpeed >= 0.19.5 defaults to 10
gpus="${NUM_GPUS:-$(python -c 'import torch; print(max(1, torch.cuda.device_count()))')}"
port="${MASTER_PORT:-$(python -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')}"
set_env=(DEEPSPEED_TIMEOUT="$DEEPSPEED_TIMEOUT")
if ! python -c 'import sys, torch; sys.exit(not torch.cuda.is_available())'; then
  # CPU ranks share the cores; more threads than cores per rank only thrash.
  export OMP_NUM_THREADS="${OMP_NUM_THREADS:-$(( $(nproc) / gpus > 0 ? $(nproc) / gpus : 1 ))}"
  set_env+=(OMP_NUM_THREADS="$OMP_NUM_THREADS")
fi
cmd=(deepspeed --num_gpus "$gpus" --master_port "$port" --module lgdlm_ds.train "$@")
printf '%q ' "${set_env[@]}" "${cmd[@]}"
echo
if [ "${DRY_RUN:-0}" = "1" ]; then
  exit 0
fi
# DeepSpeed's launcher processes inherit these. SIGUSR1 would kill them and leave the ranks without
# a parent; ignored, it reaches only the ranks, which finish the step, save and exit 3
# (lgdlm_ds/preemption.py), and the launcher passes the 3 on. SIGTERM makes the ranks save too, but
# DeepSpeed's inner launcher handles it itself: it kills the ranks still running 30 s later and
# exits 1. Ignored here, the outer one waits for that instead of exiting at once.
trap '' USR1 TERM
exec "${cmd[@]}"
