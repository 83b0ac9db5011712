#!/usr/bin/env bash
# Builds the extension with its CUDA kernels in place and runs the CUDA benchmark, on any machine
# with an NVIDIA GPU, a CUDA toolkit and PyTorch. Extra arguments go to bench.py, e.g.
#   bash benchmarks/run_cuda.sh --shapes typical --kernels 5 9
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"  # the in-place build
TORCH_SPATIALNORM_CUDA=1 "$PYTHON" setup.py build_ext --inplace
"$PYTHON" benchmarks/bench.py --device cuda "$@"
