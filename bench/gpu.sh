#!/usr/bin/env bash
# The GPU benchmarks in one device-tool call (see bench/BENCHMARKS.md and the device tool's
# README). Two steps:
#
#   1. here, once:  bench/gpu.sh --fetch-wheels
#      downloads the packages the device image lacks (bcos, opacus; monai, pydicom and
#      pydantic for the learning benchmark) as Python 3.12 wheels into .whl/ (git-ignored),
#      since the device machine reaches no registry;
#   2. device tool: run(command="bash bench/gpu.sh", carry=[".whl"], timeout_s=600)
#      installs them into /tmp/site, runs the tests marked `gpu` (one site trains with and
#      without DP-SGD, computes support statistics, evaluates and audits on cuda; log in
#      $OUT/gpu-tests.log), then `python -m bench --device cuda` (training, DP and
#      explanation throughput at 128 px; one site's local training, audit and evaluation on
#      the GPU and the cost of a message there: site_train_images_per_s,
#      site_message_overhead_s) and writes $OUT/gpu.json; copy it to bench/results/gpu.json
#      and commit it. The CPU's figures are in bench/results/cpu.json (`python -m bench`).
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
  # The site's ClientApp (gpu tests, site benchmark): Flower and what it needs beyond the
  # device image (which has numpy, grpcio, protobuf, typer, rich, httpx, requests, pyyaml).
  python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 \
    --implementation cp --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 \
    --platform manylinux2014_x86_64 --platform any -d .whl flwr==1.41.0 \
    cryptography==50.0.2 cffi==2.1.1 pycparser==3.12 pycryptodome==3.24.1 iterators==0.0.2 \
    tomli==2.5.0 tomli-w==1.2.0 prompt-toolkit==3.0.53 wcwidth==0.9.5 pathspec==1.1.1 \
    grpcio-health-checking==1.81.1 fastapi==0.138.2 starlette==1.3.1 uvicorn==0.49.0 \
    sqlalchemy==2.1.9 greenlet==3.5.6 alembic==1.20.1 mako==1.4.3
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
# The site on the GPU: the gpu tests (they fail here if CUDA is missing or a step ran
# elsewhere), then the benchmarks with the site's figures.
tests=0
python3 -m pytest -m gpu tests/client/test_device.py -q -p no:cacheprovider 2>&1 \
  | tee "$out/gpu-tests.log" || tests=$?
python3 -m bench --device cuda --only training --only dp --only explain --only site \
  --out "$out/gpu.json"
exit "$tests"
