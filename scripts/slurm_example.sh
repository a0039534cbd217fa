#!/usr/bin/env bash
# SimCLRv2 pretraining on a SLURM cluster: one torchrun per node, one process per GPU.
#
#   sbatch scripts/slurm_example.sh                       # the defaults below
#   RUN_DIR=/shared/runs/r50 sbatch scripts/slurm_example.sh --train-epochs 100   # extra flags appended
#
# RUN_DIR must be on a filesystem every node can read: rank 0 writes checkpoints there and every
# rank reads them when the run resumes. Resubmitting the same command resumes from the newest
# checkpoint. Shortly before the time limit SLURM sends SIGTERM (--signal below); the training loop
# then saves a checkpoint at the next step boundary and stops, so nothing is lost.
# See docs/distributed.md.
#SBATCH --job-name=simclrv2-pretrain
#SBATCH --nodes=4
#SBATCH --ntasks-per-node=1
#SBATCH --gpus-per-node=8
#SBATCH --cpus-per-task=64
#SBATCH --time=48:00:00
#SBATCH --signal=TERM@180
#SBATCH --output=%x-%j.out

set -euo pipefail

RUN_DIR=${RUN_DIR:-$PWD/runs/pretrain-r50-2x-sk1}
DATA_DIR=${DATA_DIR:-/datasets/imagenet}   # a folder with train/ and val/ class sub-folders
GPUS_PER_NODE=${SLURM_GPUS_ON_NODE:-8}
HEAD_NODE=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)
PORT=${PORT:-29500}

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
        "$@"
