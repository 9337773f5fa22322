#!/usr/bin/env bash
# The smoke run: recipes/00_smoke (a tiny cycle_vae model, every term on, ZeRO-0, fp32) through the
# DeepSpeed launcher on one GPU, or on the CPU when there is none. Creates the virtual environment
# on first use (launch/env.sh). Extra arguments are recipe overrides, e.g.
#   bash launch/smoke.sh training.num_train_steps=20 logging.run_dir=runs/smoke_try
# A second launch with the same run directory resumes it (training.resume: auto). Signals: as
# launch/train.sh.
source "$(dirname "${BASH_SOURCE[0]}")/env.sh"
export DEEPSPEED_TIMEOUT="${DEEPSPEED_TIMEOUT:-30}"  # minutes; DeepSpeed >= 0.19.5 defaults to 10
port="${MASTER_PORT:-$(python -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')}"
trap '' USR1 TERM  # for the ranks only (launch/train.sh says why)
exec deepspeed --num_gpus 1 --master_port "$port" --module lgdlm_ds.train recipes/00_smoke/recipe.yaml "$@"
