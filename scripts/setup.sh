#!/usr/bin/env bash
# Install simclrv2 and the embedded dataset on a fresh Debian/Ubuntu machine (idempotent).
#   bash scripts/setup.sh          # the package
#   bash scripts/setup.sh --test   # plus what the test suite needs (pytest, onnxruntime, TensorFlow)
set -euo pipefail
cd "$(dirname "$0")/.."

extras=""
[[ "${1:-}" == "--test" ]] && extras="[test,tf]"

if [[ ! -f /usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz ]]; then
  sudo_cmd=""
  [[ "$(id -u)" != "0" ]] && sudo_cmd="sudo"
  $sudo_cmd apt-get update -qq
  $sudo_cmd apt-get install -y -qq dataset-fashion-mnist >/dev/null
fi

python3 -m pip install -q -e ".${extras}"
