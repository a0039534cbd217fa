#!/usr/bin/env bash
# Everything that needs a GPU, in one call of about 8 minutes (give it a 540 s limit):
#   1. benchmarks/gpu.py: CUDA correctness, ResNet-50 / ResNet-18 throughput with the step's
#      phases, resume, every command on the device, folder input, torch.compile;
#   2. benchmarks/run.py --device cuda: our loop and augmentation against the reference, side by
#      side, for the keys the first H100 run did not reach.
# Logs and JSON go to $OUT (or gpu_out/ in the repository when OUT is unset); run.py's JSON holds
# the raw measurements so far if the time limit cuts it short.
set -o pipefail
export PYTHONUNBUFFERED=1
cd "$(dirname "$0")/.."
export OUT="$(realpath -m "${OUT:-gpu_out}")"
mkdir -p "$OUT"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$OUT/gpu_name.txt"
python3 benchmarks/gpu.py --budget 270 2>&1 | tee "$OUT/gpu_log.txt"
timeout 230 python3 benchmarks/run.py --device cuda --repeats 1 --no-ablation \
    --only e2e_resnet18 e2e_embedded augment_32 --json "$OUT/run_cuda.json" 2>&1 | tee "$OUT/run_cuda_log.txt"
