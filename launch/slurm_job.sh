# shellcheck shell=bash
# Sourced by launch/slurm_*.sbatch (which set TEMPLATE, their own path, for messages) in the
# submit directory, the repository root. What every SLURM job of this project does around its srun:
#   - checks the arguments before anything expensive, enters the project's environment (env.sh);
#   - GPUS_PER_NODE, ranks per node: from the environment when set, else SLURM_GPUS_ON_NODE (what
#     --gpus-per-node gave), else 1: one CPU rank per node on nodes without GPUs;
#   - exports MASTER_ADDR (the first node), MASTER_PORT and DEEPSPEED_TIMEOUT;
#   - prints the environment into the job's log and copies the recipe into logs/, once per attempt;
#   - run_training: runs srun, forwards SIGUSR1 to the ranks, requeues the job when they stopped
#     after saving a checkpoint.
#
# Files per job, all named logs/<job name>-<job id>.*: .out (the log, appended to by every attempt:
# --open-mode=append), .<attempt>.recipe.yaml, .hostfile (slurm_multinode), .stopped (see below).
#
# Preemption and time limits. `#SBATCH --signal=B:USR1@300` sends SIGUSR1 to this batch shell five
# minutes before the end; run_training forwards it to every process of the job step. The wrappers
# and launchers ignore it (launch/slurm_task.sh), so it reaches the training processes, which
# finish the current step, save a checkpoint and exit with STOPPED_AFTER_SAVE
# (lgdlm_ds/preemption.py). The task then leaves the .stopped file and exits 0 (a non-zero exit
# would make --kill-on-bad-exit cut the other ranks short), and this job requeues itself: the next
# attempt resumes from that checkpoint in the same run directory (training.resume: auto). By hand:
# `scancel --batch --signal=USR1 JOBID`. SIGTERM to the job step (`scancel --signal=TERM JOBID`)
# does the same under slurm_srun.sbatch; under slurm_multinode.sbatch DeepSpeed's launcher handles
# SIGTERM itself (it kills the ranks still running 30 s later and exits 1): the ranks save, but the
# job does not requeue.

# Exit status of lgdlm_ds.train when a signal stopped it after a complete checkpoint (lgdlm_ds/cli.py).
export STOPPED_AFTER_SAVE=3

trap '' USR1  # until run_training forwards it: the default action would end this shell

if [ $# -lt 1 ] || [ "$1" = "-h" ] || [ "$1" = "--help" ]; then
  echo "usage: mkdir -p logs && sbatch $TEMPLATE RECIPE.yaml [section.key=value ...]" >&2
  exit 2
fi
if [ ! -f "$1" ]; then
  echo "error: recipe $1 not found in $PWD: give its path from the repository root, where sbatch runs" >&2
  exit 2
fi
RECIPE="$1"

source launch/env.sh
# A submitting shell's rank variables would hide SLURM's from the ranks (sbatch passes the whole
# environment on); MASTER_PORT set there is kept, as a choice.
unset RANK LOCAL_RANK WORLD_SIZE LOCAL_SIZE

GPUS_PER_NODE="${GPUS_PER_NODE:-${SLURM_GPUS_ON_NODE:-1}}"
case "$GPUS_PER_NODE" in
  '' | *[!0-9]* | 0) echo "error: GPUS_PER_NODE=$GPUS_PER_NODE: ranks per node must be a positive integer" >&2
                     exit 2 ;;
esac
MASTER_ADDR="$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)"
# The same port for every node of this job, a different one for the next job on a shared node.
MASTER_PORT="${MASTER_PORT:-$((20000 + SLURM_JOB_ID % 20000))}"
# Collectives wait this many minutes before failing (DeepSpeed >= 0.19.5 defaults to 10, short for
# a checkpoint save of a large model on a slow filesystem).
DEEPSPEED_TIMEOUT="${DEEPSPEED_TIMEOUT:-60}"
export GPUS_PER_NODE MASTER_ADDR MASTER_PORT DEEPSPEED_TIMEOUT

# NCCL settings some clusters need; uncomment in the template what yours does:
#   export NCCL_DEBUG=INFO               # prints the transports and rings chosen: the first thing to
#                                        # read when the first collective hangs or is slow
#   export NCCL_SOCKET_IFNAME=ib0        # the interface for NCCL's bootstrap when the default one
#                                        # (docker0, a management port) cannot reach the other nodes
#   export GLOO_SOCKET_IFNAME=ib0        # the same for gloo (CPU collectives, DeepSpeed's barriers)
#   export NCCL_IB_HCA=mlx5_0,mlx5_1     # only these InfiniBand adapters, when others are down or
#                                        # on another fabric
#   export NCCL_P2P_DISABLE=1            # no GPU peer-to-peer on hosts where it hangs (some virtual
#                                        # machines and PCIe switches); slower, but correct

JOB_FILES="logs/${SLURM_JOB_NAME}-${SLURM_JOB_ID}"
STOPPED_MARKER="$JOB_FILES.stopped"
export STOPPED_MARKER
mkdir -p logs

attempt="${SLURM_RESTART_COUNT:-0}"
{ echo "# $RECIPE as read by job $SLURM_JOB_ID, attempt $attempt, with overrides: ${*:2}"
  cat "$RECIPE"; } > "$JOB_FILES.$attempt.recipe.yaml"

echo "== job $SLURM_JOB_ID attempt $attempt, $(date '+%Y-%m-%d %H:%M:%S %z')"
echo "nodes ($SLURM_JOB_NUM_NODES): $(scontrol show hostnames "$SLURM_JOB_NODELIST" | paste -sd ' ')"
echo "ranks per node: $GPUS_PER_NODE; master: $MASTER_ADDR:$MASTER_PORT; DEEPSPEED_TIMEOUT=$DEEPSPEED_TIMEOUT"
echo "recipe: $RECIPE ${*:2} (copied to $JOB_FILES.$attempt.recipe.yaml)"
echo "git: $(git rev-parse --short HEAD 2>/dev/null || echo 'not a git checkout')"
python -c 'import sys, torch; print("python", sys.version.split()[0], "| torch", torch.__version__,
  "| cuda", torch.version.cuda, "| GPUs visible here:", torch.cuda.device_count())'
if command -v nvidia-smi > /dev/null; then
  nvidia-smi
fi
echo "pip freeze:"
python -m pip freeze 2>&1 || true
echo "=="

# run_training SRUN_COMMAND...: runs it in the background, so that this shell can take SIGUSR1
# and pass it on, and requeues the job when the training stopped after saving.
run_training() {
  rm -f "$STOPPED_MARKER"
  echo "[job] $*"
  "$@" &
  SRUN_PID=$!
  trap 'echo "[job] SIGUSR1: asking the ranks to save and stop"; kill -USR1 "$SRUN_PID"' USR1
  local status=0
  wait "$SRUN_PID" || status=$?
  # A trapped signal ends `wait` early (status > 128) while srun runs on: wait again.
  while [ "$status" -gt 128 ] && kill -0 "$SRUN_PID" 2> /dev/null; do
    status=0
    wait "$SRUN_PID" || status=$?
  done
  if [ -e "$STOPPED_MARKER" ]; then
    echo "[job] training stopped after saving: requeueing job $SLURM_JOB_ID"
    scontrol requeue "$SLURM_JOB_ID"
  fi
  echo "[job] srun exit status $status"
  return "$status"
}
