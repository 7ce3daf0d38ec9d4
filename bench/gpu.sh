#!/usr/bin/env bash
# The GPU benchmarks in one device-tool call (see bench/BENCHMARKS.md and the device tool's
# README). Two steps:
#
#   1. here, once:  bench/gpu.sh --fetch-wheels
#      downloads the packages the device image lacks (bcos, opacus; monai, pydicom and
#      pydantic for the learning benchmark) as Python 3.12 wheels into .whl/ (git-ignored),
#      since the device machine reaches no registry;
#   2. device tool: run(command="bash bench/gpu.sh", carry=[".whl"], timeout_s=600)
#      installs them into /tmp/site, runs `python -m bench --device cuda` (training, DP and
#      explanation throughput at 128 px) and writes $OUT/gpu.json; copy it to
#      bench/results/gpu.json and commit it.
#
# The learning benchmark on the GPU (the rows a CPU takes hours for), one preset at a time:
#   run(command="bash bench/gpu.sh --learning --sizes 128 --regimes pooled", carry=[".whl"])
# passes its options to `python -m bench --only learning --device cuda --presets P` for P in
# easy, default, hard; each preset merges into the committed learning.json as it finishes and
# the file is copied to $OUT/learning.json, so a call stopped at its limit keeps the presets
# that finished. Copy it to bench/results/learning.json and commit it.
set -euo pipefail
cd "$(dirname "$0")/.."

if [[ "${1:-}" == "--fetch-wheels" ]]; then
  python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 \
    --implementation cp --platform manylinux_2_28_x86_64 --platform manylinux2014_x86_64 \
    --platform any -d .whl bcos==0.1.3 opacus==1.6.0 \
    monai==1.6.1 pydicom==3.0.2 pydantic==2.14.4 pydantic-core==2.50.5 annotated-types==0.8.0 \
    typing-inspection==0.4.5 typing-extensions==4.16.0
  exit 0
fi

python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
  --target /tmp/site .whl/*.whl
export PYTHONPATH="/tmp/site:$PWD" PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv
out="${OUT:-bench/results}"
mkdir -p "$out"
if [[ "${1:-}" == "--learning" ]]; then
  shift
  for preset in easy default hard; do
    python3 -m bench --device cuda --only learning --presets "$preset" "$@" \
      --out bench/results/learning.json
    if [[ "$out" != bench/results ]]; then cp bench/results/learning.json "$out/"; fi
  done
  exit 0
fi
python3 -m bench --device cuda --only training --only dp --only explain --out "$out/gpu.json"
