"""One forward and one gradient call at the benchmark's CUDA size, for Nsight Compute, after a
copy of the input (the device-copy bandwidth the kernels are measured against):

    ncu --clock-control none --section SpeedOfLight --section MemoryWorkloadAnalysis \\
        python benchmarks/profile_cuda.py --kernel 5 --dtype bfloat16
"""

import argparse

import torch

import torch_spatialnorm as sn

parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
parser.add_argument("--kernel", type=int, default=5)
parser.add_argument("--shape", type=int, nargs=4, default=[32, 64, 112, 112])
parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16", "float64"])
args = parser.parse_args()
x = torch.randn(args.shape, device="cuda", dtype=getattr(torch, args.dtype))
dy = torch.randn_like(x)
x.clone()
sn.spatial_normalization(x, args.kernel, alpha=1e-2, beta=0.75)
sn.spatial_normalization_gradient(dy, x, args.kernel, alpha=1e-2, beta=0.75)
torch.cuda.synchronize()
