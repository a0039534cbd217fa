#!/usr/bin/env bash
# Install simclrv2 and the embedded dataset on a fresh Debian/Ubuntu machine (idempotent).
#   bash scripts/setup.sh          # the package with its fused CPU augmentation kernel (the fast extra: numba)
#   bash scripts/setup.sh --test   # plus what the test suite needs (pytest, the export and hub extras, TensorFlow)
set -euo pipefail
cd "$(dirname "$0")/.."

extras="[fast]"
[[ "${1:-}" == "--test" ]] && extras="[test,tf]"  # test includes fast, export (onnx) and hub (huggingface_hub)

if [[ ! -f /usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz ]]; then
  sudo_cmd=""
  [[ "$(id -u)" != "0" ]] && sudo_cmd="sudo"
  $sudo_cmd apt-get update -qq
  $sudo_cmd apt-get install -y -qq dataset-fashion-mnist >/dev/null
fi

python3 -m pip install -q -e ".${extras}"
