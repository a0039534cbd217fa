#!/usr/bin/env bash
# SimCLRv2 pretraining on a SLURM cluster: one torchrun per node, one process per GPU.
#
#   sbatch scripts/slurm_example.sh                       # the defaults below
#   RUN_DIR=/shared/runs/r50 sbatch scripts/slurm_example.sh --train-epochs 100   # extra flags appended
#
# RUN_DIR must be on a filesystem every node can read: rank 0 writes checkpoints there and every
# rank reads them when the run resumes. The job requeues itself until the run is done:
#  1. five minutes before the time limit SLURM sends SIGUSR1 to this script (--signal=B:USR1@300),
#     which passes SIGTERM on to every process (srun -> torchrun -> training processes);
#  2. the training loop saves a checkpoint at the next step boundary, writes
#     $RUN_DIR/interrupted.json and stops (torchrun waits 30 s for that, then kills them);
#  3. seeing that marker, this script requeues the job, and the next start resumes the run.
# A crash or a finished run leaves no marker, so the job then ends with the run's exit status.
# See docs/distributed.md.
#SBATCH --job-name=simclrv2-pretrain
#SBATCH --nodes=4
#SBATCH --ntasks-per-node=1
#SBATCH --gpus-per-node=8
#SBATCH --cpus-per-task=64
#SBATCH --time=48:00:00
#SBATCH --signal=B:USR1@300
#SBATCH --requeue
#SBATCH --open-mode=append
#SBATCH --output=%x-%j.out

set -uo pipefail  # no -e: the launcher's exit status is examined below

RUN_DIR=${RUN_DIR:-$PWD/runs/pretrain-r50-2x-sk1}
DATA_DIR=${DATA_DIR:-/datasets/imagenet}   # a folder with train/ and val/ class sub-folders
GPUS_PER_NODE=${SLURM_GPUS_ON_NODE:-8}
HEAD_NODE=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)
PORT=${PORT:-29500}
MARKER="$RUN_DIR/interrupted.json"  # written by the run when it stopped on a signal after saving

srun --kill-on-bad-exit=1 torchrun \
    --nnodes="$SLURM_JOB_NUM_NODES" \
    --nproc_per_node="$GPUS_PER_NODE" \
    --rdzv_id="$SLURM_JOB_ID" \
    --rdzv_backend=c10d \
    --rdzv_endpoint="$HEAD_NODE:$PORT" \
    -m simclrv2 pretrain \
        --dataset folder --data-dir "$DATA_DIR" \
        --resnet-depth 50 --width-multiplier 2 --sk-ratio 0.0625 \
        --train-batch-size 4096 --train-epochs 800 \
        --learning-rate 0.075 --learning-rate-scaling sqrt \
        --precision auto --global-bn true \
        --progress false \
        --run-dir "$RUN_DIR" \
        "$@" &
launcher=$!
# SLURM signals only this script (B:); a pre-empting SLURM sends SIGTERM. Either way: stop the run.
trap 'echo "$(date): signal received, asking the run to save and stop"; kill -TERM "$launcher" 2>/dev/null' USR1 TERM
while true; do
    wait "$launcher"
    status=$?
    kill -0 "$launcher" 2>/dev/null || break  # ended, not just a signal interrupting the wait
done

if [ -e "$MARKER" ]; then
    echo "$(date): the run saved a checkpoint and stopped ($(cat "$MARKER")); requeueing job $SLURM_JOB_ID to resume"
    scontrol requeue "$SLURM_JOB_ID"
    exit 0
fi
exit "$status"
