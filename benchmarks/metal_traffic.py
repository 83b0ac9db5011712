"""Memory traffic of the Metal kernels by the emulator's model (tests/metal_emulator), for the
README: dispatches, device bytes per element against the floor, coalescing, scratch memory.

The model counts every load and store of device memory (no caches) and, for each SIMD-group
instruction, the 64-byte segments its lanes touch. Planes are swept independently with the same
plan once there are enough of them, so 64 planes of each shape give the figures of the whole batch.

    python benchmarks/metal_traffic.py
"""

import argparse
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
from metal_emulator import compile_library  # noqa: E402

from torch_spatialnorm.mps import MetalKernels, metal_source_path  # noqa: E402

SHAPES = [(8, 64, 56, 56), (32, 64, 112, 112)]
KERNEL_SIZES = [3, 5, 9, 31]
DTYPES = [torch.float32, torch.float16]


def measure(kernels, library, shape, kernel_size, dtype):
    """(dispatches, bytes per element, coalescing, scratch bytes per element) of each direction."""
    modelled = (1, 64, *shape[2:])
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(modelled, generator=generator).to(dtype)
    dy = torch.randn(modelled, generator=generator).to(dtype)
    rows = []
    for run in (lambda: kernels.forward(x, kernel_size, kernel_size, 1.0, 0.75, 1.0),
                lambda: kernels.backward(dy, x, kernel_size, kernel_size, 1.0, 0.75, 1.0)):
        with library.recording() as log:
            run()
        moved = sum(d.bytes_read + d.bytes_written for d in log)
        useful = sum(d.useful_bytes for d in log)
        touched = sum(d.segment_bytes for d in log)
        rows.append((len(log), moved / x.numel(), useful / touched))
    return rows


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.parse_args()
    library = compile_library(metal_source_path(), tempfile.mkdtemp(prefix="metal_traffic_"))
    kernels = MetalKernels(library)
    print("| shape | dtype | k | forward: dispatches, B/element (floor), coalesced | "
          "gradient: dispatches, B/element (floor), coalesced |")
    print("|---|---|---|---|---|")
    for shape in SHAPES:
        for dtype in DTYPES:
            size = torch.tensor([], dtype=dtype).element_size()
            for k in KERNEL_SIZES:
                (fd, fb, fc), (gd, gb, gc) = measure(kernels, library, shape, k, dtype)
                print(f"| {'x'.join(map(str, shape))} | {str(dtype).removeprefix('torch.')} | {k} | "
                      f"{fd}, {fb:.2f} ({2 * size}), {fc:.0%} | {gd}, {gb:.2f} ({3 * size}), {gc:.0%} |", flush=True)


if __name__ == "__main__":
    main()
