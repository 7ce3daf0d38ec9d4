#!/usr/bin/env bash
# The GPU benchmarks in one device-tool call (see bench/BENCHMARKS.md and the device tool's
# README). Two steps:
#
#   1. here, once:  bench/gpu.sh --fetch-wheels
#      downloads the two packages the device image lacks (bcos, opacus) as Python 3.12
#      wheels into .whl/ (git-ignored), since the device machine reaches no registry;
#   2. device tool: run(command="bash bench/gpu.sh", carry=[".whl"], timeout_s=600)
#      installs them into /tmp/site, runs `python -m bench --device cuda` (training, DP and
#      explanation throughput at 128 px) and writes $OUT/gpu.json; copy it to
#      bench/results/gpu.json and commit it.
set -euo pipefail
cd "$(dirname "$0")/.."

if [[ "${1:-}" == "--fetch-wheels" ]]; then
  python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 \
    --implementation cp --platform manylinux_2_28_x86_64 --platform manylinux2014_x86_64 \
    --platform any -d .whl bcos==0.1.3 opacus==1.6.0
  exit 0
fi

python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
  --target /tmp/site .whl/*.whl
export PYTHONPATH="/tmp/site:$PWD" PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv
out="${OUT:-bench/results}"
mkdir -p "$out"
python3 -m bench --device cuda --only training --only dp --only explain --out "$out/gpu.json"
