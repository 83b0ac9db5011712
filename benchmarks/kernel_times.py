"""The forward and gradient kernels alone (the `spatialnorm` ops, no autograd), each the best time
of a call over a few repeats: on a GPU by CUDA events around calls queued back to back, on the CPU
by the wall clock around each call. For comparing a change with what it replaces:

    python benchmarks/kernel_times.py --device cuda --dtypes float32 bfloat16 --kernels 3 5 9
    python benchmarks/kernel_times.py --device cpu --threads 1 --builds ../before .

With --builds, each build (a checkout whose extension is built in place) runs in processes of its
own, first on the import path, the builds taking turns --rounds times; each column is a build's
best. On a shared machine, turns and minima compare more fairly than one build's run after the
other's: both see the same quiet moments and the same busy ones.
"""

import argparse
import json
import os
import subprocess
import sys
import time

import torch

PASSES = ("forward", "gradient")


def parse(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    dtypes = ["float32", "bfloat16", "float16", "float64"]
    parser.add_argument("--dtypes", nargs="+", default=["float32"], choices=dtypes)
    parser.add_argument("--kernels", nargs="+", type=int, default=[3, 5, 9, 17, 31])
    parser.add_argument("--passes", nargs="+", default=list(PASSES), choices=PASSES)
    parser.add_argument("--shape", nargs=4, type=int, help="N C H W (default: bench.py's typical shape for the device)")
    parser.add_argument("--alpha", type=float, default=1e-2)
    parser.add_argument("--beta", type=float, default=0.75)
    parser.add_argument("--delta", type=float, default=1.0)
    parser.add_argument("--repeats", type=int, default=5, help="timed repeats per case (the best is kept)")
    parser.add_argument("--calls", type=int, default=40, help="calls per repeat")
    parser.add_argument("--threads", type=int, help="CPU threads (default: torch's)")
    parser.add_argument("--builds", nargs="+", help="directories of builds to compare, each in its own processes")
    parser.add_argument("--rounds", type=int, default=2, help="turns each build takes (with --builds)")
    parser.add_argument("--json", action="store_true", help="print the times as JSON (what --builds reads)")
    return parser.parse_args(argv)


def best_call_us(fn, device, repeats, calls):
    """A call's time in microseconds: on a GPU the best of `repeats` means of `calls` calls queued
    back to back, on the CPU the best of repeats x calls calls, each timed alone."""
    for _ in range(3):
        fn()
    best = float("inf")
    for _ in range(repeats):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            torch.cuda.synchronize()
            start.record()
            for _ in range(calls):
                fn()
            end.record()
            torch.cuda.synchronize()
            best = min(best, start.elapsed_time(end) * 1e3 / calls)
        else:
            for _ in range(calls):
                begin = time.perf_counter()
                fn()
                best = min(best, (time.perf_counter() - begin) * 1e6)
    return best


def measure(args):
    """{"dtype pass k": microseconds} for every case, with the build that torch_spatialnorm imports."""
    import torch_spatialnorm  # noqa: F401  (registers the ops)

    device = torch.device(args.device)
    if args.threads:
        torch.set_num_threads(args.threads)
    shape = args.shape or ([32, 64, 112, 112] if device.type == "cuda" else [8, 64, 56, 56])
    ops = torch.ops.spatialnorm
    times = {}
    for name in args.dtypes:
        generator = torch.Generator().manual_seed(0)
        x = torch.randn(shape, generator=generator).to(device=device, dtype=getattr(torch, name))
        dy = torch.randn(shape, generator=generator).to(device=device, dtype=x.dtype)
        for k in args.kernels:
            settings = (k, k, args.alpha, args.beta, args.delta)
            calls = {
                "forward": lambda: ops.forward(x, *settings),
                "gradient": lambda: ops.backward(dy, x, *settings),
            }
            for pass_name in args.passes:
                times[f"{name} {pass_name} {k}"] = best_call_us(calls[pass_name], device, args.repeats, args.calls)
    return times


def child_arguments(args):
    """The command line of a build's process: the same cases, the times printed as JSON."""
    argv = ["--device", args.device, "--dtypes", *args.dtypes, "--kernels", *map(str, args.kernels)]
    argv += ["--passes", *args.passes, "--alpha", repr(args.alpha), "--beta", repr(args.beta)]
    argv += ["--delta", repr(args.delta), "--repeats", str(args.repeats), "--calls", str(args.calls), "--json"]
    if args.shape:
        argv += ["--shape", *map(str, args.shape)]
    if args.threads:
        argv += ["--threads", str(args.threads)]
    return argv


def compare(args):
    """[(build, {case: its best time})], the builds taking turns in processes of their own (a build
    named twice runs twice as often: a measure of the noise)."""
    best = [(build, {}) for build in args.builds]
    for _ in range(args.rounds):
        for build, times in best:
            path = os.path.abspath(build)
            env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [path, os.environ.get("PYTHONPATH")])))
            command = [sys.executable, os.path.abspath(__file__), *child_arguments(args)]
            result = subprocess.run(command, env=env, capture_output=True, text=True)
            if result.returncode != 0:
                sys.exit(f"the build in {build} failed:\n{result.stderr[-2000:]}")
            for case, us in json.loads(result.stdout.strip().splitlines()[-1]).items():
                times[case] = min(us, times.get(case, float("inf")))
    return best


def table(columns):
    """A markdown table of [(name, {case: microseconds})]: a row per case, a column per name."""
    lines = ["| case | " + " | ".join(name for name, _ in columns) + " |", "|---|" + "---|" * len(columns)]
    for case in columns[0][1]:
        lines.append(f"| {case} | " + " | ".join(f"{times[case]:.1f}" for _, times in columns) + " |")
    return "\n".join(lines)


def main(argv=None):
    args = parse(argv)
    if args.builds:
        columns = compare(args)
    else:
        times = measure(args)
        if args.json:
            print(json.dumps(times))
            return
        columns = [("µs", times)]
    print(table(columns))


if __name__ == "__main__":
    main()
