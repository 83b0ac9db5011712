#!/usr/bin/env bash
# Data-parallel training of the demo's digits CNN on GPUs through NCCL, with the CUDA kernels:
# first on one GPU, then on N GPUs under torchrun (one process per GPU). Checks that every rank
# ends with the same weights and that the N-GPU accuracy matches the one-GPU run within noise,
# and prints the time per epoch of each run. Needs the package built with CUDA
# (TORCH_SPATIALNORM_CUDA=1 python setup.py build_ext --inplace) and scikit-learn.
#
#   bash benchmarks/multi_gpu.sh [gpus=2] [epochs=10]
set -euo pipefail
gpus=${1:-2}
epochs=${2:-10}
# NVLink multicast (NVLS) stays off: an all-reduce of this size gains nothing from it, and on
# shared hosts a program using it can take the GPUs out of service.
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
python=${PYTHON:-python3}
out=$(mktemp -d)
for n in 1 "$gpus"; do
  echo "== $n GPU(s)"
  "$python" -m torch.distributed.run --standalone --nproc_per_node="$n" -m torch_spatialnorm.demo --device cuda \
    --epochs "$epochs" --skip-picture --skip-gradcheck --out "$out/gpus$n" | tee "$out/gpus$n.log"
done
"$python" - "$out" "$gpus" "$epochs" <<'PY'
import re
import sys
from pathlib import Path

import torch

out, gpus, epochs = Path(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3])
results = {}
for n in (1, gpus):
    for kind in ("normalized", "plain"):
        weights = [torch.load(out / f"gpus{n}" / f"weights_{kind}_rank{r}.pt") for r in range(n)]
        for rank, state in enumerate(weights[1:], start=1):
            assert all(torch.equal(state[k], weights[0][k]) for k in state), f"{n} GPUs, {kind}: rank {rank} differs"
    log = (out / f"gpus{n}.log").read_text()
    found = re.findall(r"(with SpatialNormalization|without \(baseline\)): test accuracy ([\d.]+)% in ([\d.]+) s", log)
    results[n] = {label: (float(accuracy), float(seconds) / epochs) for label, accuracy, seconds in found}
print(f"| model | 1 GPU: accuracy, s/epoch | {gpus} GPUs: accuracy, s/epoch |")
print("|---|---|---|")
for label in results[1]:
    (a1, t1), (an, tn) = results[1][label], results[gpus][label]
    print(f"| {label} | {a1:.1f}%, {t1:.2f} | {an:.1f}%, {tn:.2f} |")
    # The test set has 360 digits: a few of them either way is noise.
    assert abs(a1 - an) <= 3.0, f"{label}: {gpus}-GPU accuracy {an}% is not within 3 points of {a1}%"
print(f"every rank ended with the same weights; accuracies within 3 points of the 1-GPU run")
PY
