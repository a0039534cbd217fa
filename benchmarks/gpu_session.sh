#!/usr/bin/env bash
# Everything that needs a GPU, in one call of about 9 minutes (give it a 570 s limit), logs and
# JSON in $OUT (default gpu_out/): the CUDA checks (pytest -m gpu), then the GPU figures, the most
# important first (gpu.py: ResNet-50 224 px, ResNet-18 CIFAR, folder input, fp16, kernel profile,
# torch.compile), then run.py --device cuda side by side with the reference. The JSON files have the
# format of benchmarks/results/; commit their keys into results/<machine kind>.json.
set -o pipefail
export PYTHONUNBUFFERED=1
cd "$(dirname "$0")/.."
export OUT="$(realpath -m "${OUT:-gpu_out}")"
mkdir -p "$OUT"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$OUT/gpu_name.txt"
timeout 150 python3 -m pytest -m gpu -q -p no:cacheprovider tests/test_gpu.py --junitxml "$OUT/pytest_gpu.xml" 2>&1 \
    | tee "$OUT/pytest_gpu.txt"
python3 benchmarks/gpu.py --budget 270 --json "$OUT/gpu.json" 2>&1 | tee "$OUT/gpu_log.txt"
timeout 120 python3 benchmarks/run.py --device cuda --quick --only e2e_resnet18 e2e_embedded augment_32 \
    --json "$OUT/run_cuda.json" 2>&1 | tee "$OUT/run_cuda_log.txt"
