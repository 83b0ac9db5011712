"""The cost of one call on a tiny input, where the time is all overhead (Python, dispatch, autograd).

Times, in one process, a 1x1x8x8 float32 image through
  - forward:           spatial normalization under torch.no_grad() (inference)
  - forward+backward:  spatial normalization, .sum(), .backward()
against torch.relu doing the same, and prints microseconds per call (best of several repeats of
many calls) and the ratios.

    python benchmarks/call_cost.py --device cpu
"""

import argparse
import platform
import time

import torch

import torch_spatialnorm as sn


def per_call_us(fn, calls, repeats=7):
    """Best time per call over ``repeats`` runs of ``calls`` back-to-back calls, in microseconds."""
    for _ in range(calls // 10):
        fn()
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        for _ in range(calls):
            fn()
        best = min(best, (time.perf_counter() - start) / calls)
    return 1e6 * best


def measure(device, calls):
    x = torch.randn(1, 1, 8, 8, device=device).requires_grad_()
    ours = lambda t: sn.spatial_normalization(t, 3)  # noqa: E731

    def inference(f):
        def run():
            with torch.no_grad():
                f(x)

        return run

    def training(f):
        return lambda: f(x).sum().backward()

    rows = []
    for name, step in (("forward (no_grad)", inference), ("forward+backward", training)):
        ours_us, relu_us = per_call_us(step(ours), calls), per_call_us(step(torch.relu), calls)
        rows.append((name, ours_us, relu_us))
    return rows


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda", "mps"])
    parser.add_argument("--calls", type=int, default=5000, help="calls per timed repeat")
    args = parser.parse_args(argv)
    print(f"torch {torch.__version__}, {platform.machine()}, {torch.get_num_threads()} threads, device {args.device}")
    print("| 1x1x8x8 float32 | ours (us) | torch.relu (us) | ratio |")
    print("|---|---|---|---|")
    for name, ours_us, relu_us in measure(torch.device(args.device), args.calls):
        print(f"| {name} | {ours_us:.1f} | {relu_us:.1f} | {ours_us / relu_us:.1f}x |")


if __name__ == "__main__":
    main()
