#!/usr/bin/env bash
# Train a recipe on this node: bash launch/train.sh RECIPE.yaml [section.key=value ...]
#   NUM_GPUS     ranks to start (default: every visible GPU; 1 on a machine without one)
#   MASTER_PORT  rendezvous port (default: a free one)
# Rerunning the same command resumes from the run directory's newest complete checkpoint.
# Several nodes: launch/slurm_multinode.sbatch.
source "$(dirname "${BASH_SOURCE[0]}")/env.sh"
if [ $# -lt 1 ]; then
  echo "usage: bash launch/train.sh RECIPE.yaml [section.key=value ...]" >&2
  exit 2
fi
export DEEPSPEED_TIMEOUT="${DEEPSPEED_TIMEOUT:-30}"  # minutes; DeepSpeed >= 0.19.5 defaults to 10
gpus="${NUM_GPUS:-$(python -c 'import torch; print(max(1, torch.cuda.device_count()))')}"
port="${MASTER_PORT:-$(python -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')}"
if ! python -c 'import sys, torch; sys.exit(not torch.cuda.is_available())'; then
  # CPU ranks share the cores; more threads than cores per rank only thrash.
  export OMP_NUM_THREADS="${OMP_NUM_THREADS:-$(( $(nproc) / gpus > 0 ? $(nproc) / gpus : 1 ))}"
fi
exec deepspeed --num_gpus "$gpus" --master_port "$port" --module lgdlm_ds.train "$@"
