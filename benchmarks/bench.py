"""Spatial normalization: torch_spatialnorm against what a PyTorch user writes without it.

Times, in one process, forward and forward+backward of
  - ours:      torch_spatialnorm.spatial_normalization
  - eager:     the composite a user writes today (F.pad + F.avg_pool2d + pow, autograd)
  - compiled:  that composite under torch.compile
  - general:   ours at --beta nudged off the exponents with a fast power (whole numbers of
               quarters), so that it runs the general float32 power (log and exp)
over kernel sizes and shapes (ours and general in alternating runs, so that their ratio holds on a
machine whose speed drifts), and reports medians with their spread, the ratios, the bytes each
implementation saves for backward (saved_tensors_hooks) and, where the device's allocator keeps
statistics, the peak extra memory of forward+backward, and what share of a copy's memory
bandwidth ours reaches (a copy of the input timed the same way). Prints a Markdown table and writes a CSV
and a PNG plot (time against kernel size) to --out.

Then the cost of one call on a tiny 1x1x8x8 image, where the time is all overhead (Python,
dispatch, autograd, threads): microseconds per call, forward under no_grad and forward+backward,
against torch.relu doing the same, on an idle machine and beside a busy background process.

    python benchmarks/bench.py --device cpu --shapes typical
"""

import argparse
import csv
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

import torch_spatialnorm as sn

SHAPES = {
    "cpu": {"small": (2, 16, 32, 32), "typical": (8, 64, 56, 56), "large": (1, 4, 512, 512)},
    "cuda": {"small": (8, 64, 56, 56), "typical": (32, 64, 112, 112), "large": (4, 16, 1024, 1024)},
    "mps": {"small": (2, 16, 32, 32), "typical": (8, 64, 56, 56), "large": (1, 4, 512, 512)},
}
SETTINGS = dict(alpha=1e-2, delta=1.0)  # and --beta (0.75 by default, as LRN's)


def composite(x, kernel_width, kernel_height, alpha, beta, delta):
    """Spatial normalization as a user writes it with PyTorch ops (same math as docs/definition.md)."""
    squares = F.pad(x * x, (kernel_width // 2, (kernel_width - 1) // 2, kernel_height // 2, (kernel_height - 1) // 2))
    mean = F.avg_pool2d(squares, (kernel_height, kernel_width), stride=1)  # sum / (kw * kh)
    return x * (delta + alpha * mean).pow(-beta)


def synchronize(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    elif device.type == "mps":
        torch.mps.synchronize()


def captured(fn):
    """fn captured in a CUDA graph after a warm-up on a side stream (as torch.cuda.graph's docs
    do), or None where it cannot be captured."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(3):
            fn()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    try:
        with torch.cuda.graph(graph):
            fn()
    except RuntimeError:
        return None
    return graph


def measure(fns, device, budget_s, min_runs=5, max_runs=200):
    """For each of fns, the median and spread (min, max) in milliseconds, after warm-up, within
    about budget_s, and the runs.

    The functions' runs alternate, so that a machine that slows down or speeds up while they run
    (a shared one does, by 30% from one second to the next) does so for all of them alike: their
    ratios are what the tables report. On CUDA each run is a replay of the function captured in a
    CUDA graph, timed by events around it, the runs queued back to back with one synchronization
    at the end: the device's time, not the host's. Launched one by one, a forward+backward through
    autograd costs the host more than the device needs for small windows (H200, bfloat16 3x3 at
    32x64x112x112: 0.20-0.34 ms launched against about 0.12 ms of kernels), and the ratios to a
    copy would measure Python. Where a function cannot be captured, its runs are launched and
    timed the same way.
    """
    once = 0.0
    for fn in fns:
        fn()
        synchronize(device)
        start = time.perf_counter()
        fn()
        synchronize(device)
        once += time.perf_counter() - start
    runs = int(min(max_runs, max(min_runs, budget_s / max(once, 1e-6))))
    times = [[] for _ in fns]
    if device.type == "cuda":
        graphs = [captured(fn) for fn in fns]
        replays = [fn if graph is None else graph.replay for fn, graph in zip(fns, graphs)]
        for replay in replays:
            replay()
        events = [[(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) for _ in fns]
                  for _ in range(runs)]
        for run_events in events:
            for replay, (begin, end) in zip(replays, run_events):
                begin.record()
                replay()
                end.record()
        synchronize(device)
        for run_events in events:
            for fn_times, (begin, end) in zip(times, run_events):
                fn_times.append(begin.elapsed_time(end))
    else:
        for _ in range(runs):
            for fn, fn_times in zip(fns, times):
                start = time.perf_counter()
                fn()
                synchronize(device)
                fn_times.append(1e3 * (time.perf_counter() - start))
    return [(statistics.median(t), min(t), max(t), runs) for t in times]


def saved_bytes(forward, x):
    """Bytes of the distinct tensors autograd saves for backward."""
    storages = {}

    def pack(t):
        storages[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        forward(x.detach().requires_grad_())
    return sum(storages.values())


def peak_extra_bytes(step, device):
    """Peak memory above what was allocated before a forward+backward, where the allocator says."""
    if device.type != "cuda":
        return None
    synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    before = torch.cuda.memory_allocated(device)
    step()
    synchronize(device)
    return torch.cuda.max_memory_allocated(device) - before


def general_power(x, kernel_width, kernel_height, beta, **settings):
    """Ours with the general float32 power: beta moved by 2^-20, off every fast exponent."""
    return sn.spatial_normalization(x, kernel_width, kernel_height, beta=beta + 2**-20, **settings)


def implementations(compile_composite):
    impls = {"ours": sn.spatial_normalization, "general": general_power, "eager": composite}
    if compile_composite:
        # One specialization per kernel size, shape and grad mode: more than dynamo's default
        # limit of 8, past which it would silently fall back to eager.
        torch._dynamo.config.recompile_limit = 256
        impls["compiled"] = torch.compile(composite, dynamic=False)
    return impls


def run(args):
    device = torch.device(args.device)
    dtype = getattr(torch, args.dtype)
    impls = implementations(not args.no_compile)
    rows = []
    for shape_name in args.shapes:
        shape = SHAPES[device.type][shape_name]
        generator = torch.Generator().manual_seed(0)
        x = torch.randn(shape, generator=generator).to(device, dtype)
        dy = torch.randn(shape, generator=generator).to(device, dtype)
        # The memory-bound floor: a copy reads and writes the input once, as the forward does; the
        # backward moves 3 tensors more (reads X and dY, writes dX).
        with torch.no_grad():
            copy_ms = measure([lambda: x.clone()], device, args.budget)[0][0]
        for k in args.kernels:
            forwards, steps = {}, {}
            for name, fn in impls.items():
                forwards[name] = lambda t, fn=fn: fn(t, k, k, beta=args.beta, **SETTINGS)  # noqa: E731

                def step(forward=forwards[name]):
                    xg = x.detach().requires_grad_()
                    forward(xg).backward(dy)

                steps[name] = step
            # Ours and the general power side by side (their ratio is a bar); the composites, whose
            # calls take up to a thousand times longer, apart.
            groups = [["ours", "general"]] + [[name] for name in impls if name not in ("ours", "general")]
            for group in groups:
                with torch.no_grad():
                    fwds = measure([lambda f=forwards[name]: f(x) for name in group], device, args.budget)
                boths = measure([steps[name] for name in group], device, args.budget)
                for name, fwd, both in zip(group, fwds, boths):
                    rows.append(
                        dict(
                            shape="x".join(map(str, shape)), kernel=k, impl=name,
                            forward_ms=fwd[0], forward_min_ms=fwd[1], forward_max_ms=fwd[2],
                            fwd_bwd_ms=both[0], fwd_bwd_min_ms=both[1], fwd_bwd_max_ms=both[2], runs=fwd[3],
                            saved_bytes=saved_bytes(forwards[name], x), input_bytes=x.numel() * x.element_size(),
                            peak_extra_bytes=peak_extra_bytes(steps[name], device), copy_ms=copy_ms,
                        )
                    )
                    print(f"  {rows[-1]['shape']} k={k} {name}: fwd {fwd[0]:.3f} ms, fwd+bwd {both[0]:.3f} ms", flush=True)
    return rows


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


def tiny_call_rows(device, beta, calls):
    """(load, step, ours µs, relu µs) for one call on a 1x1x8x8 float32 image, idle and beside a
    busy process (one that spins on a core until it is stopped)."""
    x = torch.randn(1, 1, 8, 8, device=device).requires_grad_()
    ours = lambda t: sn.spatial_normalization(t, 3, beta=beta, **SETTINGS)  # noqa: E731

    def inference(f):
        def run():
            with torch.no_grad():
                f(x)
            synchronize(device)

        return run

    def training(f):
        def run():
            f(x).sum().backward()
            synchronize(device)

        return run

    rows = []
    for load in ("idle", "busy background process"):
        spinner = subprocess.Popen([sys.executable, "-c", "while True: pass"]) if load != "idle" else None
        try:
            for name, step in (("forward (no_grad)", inference), ("forward+backward", training)):
                rows.append((load, name, per_call_us(step(ours), calls), per_call_us(step(torch.relu), calls)))
        finally:
            if spinner is not None:
                spinner.kill()
                spinner.wait()
    return rows


def tiny_call_markdown(rows):
    lines = ["| 1x1x8x8 float32, one call | machine | ours (µs) | torch.relu (µs) | ratio |", "|---|---|---|---|---|"]
    lines += [f"| {step} | {load} | {ours:.1f} | {relu:.1f} | {ours / relu:.1f}× |" for load, step, ours, relu in rows]
    return "\n".join(lines)


def environment(device):
    info = f"torch {torch.__version__}, {device.type}, {torch.get_num_threads()} threads, {platform.processor() or platform.machine()}"
    if device.type == "cuda":
        info += f", {torch.cuda.get_device_name(device)}"
    return info


def markdown(rows, has_compiled):
    lines = [
        "| shape | k | ours fwd ms (min-max) | eager fwd | compiled fwd | ours fwd+bwd ms (min-max) | eager fwd+bwd | compiled fwd+bwd | fwd speed-up eager / compiled | fwd+bwd speed-up eager / compiled | saved for backward (× input) ours / eager / compiled | peak extra MiB ours / eager / compiled | ours' bandwidth, share of a copy's: fwd / fwd+bwd | general power's time / ours': fwd / fwd+bwd |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    by_key = {(r["shape"], r["kernel"], r["impl"]): r for r in rows}
    for shape, k in dict.fromkeys((r["shape"], r["kernel"]) for r in rows):
        ours, eager = by_key[(shape, k, "ours")], by_key[(shape, k, "eager")]
        compiled = by_key.get((shape, k, "compiled"))
        others = [eager] + ([compiled] if compiled else [])
        dash = lambda r, key: f"{r[key]:.3f}" if r else "-"  # noqa: E731
        ratio = lambda key: " / ".join(f"{o[key] / ours[key]:.1f}×" for o in others)  # noqa: E731
        saved = " / ".join(f"{r['saved_bytes'] / r['input_bytes']:.2f}" for r in [ours] + others)
        peak = " / ".join("-" if r["peak_extra_bytes"] is None else f"{r['peak_extra_bytes'] / 2**20:.0f}" for r in [ours] + others)
        bandwidth = f"{ours['copy_ms'] / ours['forward_ms']:.0%} / {2.5 * ours['copy_ms'] / ours['fwd_bwd_ms']:.0%}"
        general = by_key[(shape, k, "general")]
        versus_general = f"{general['forward_ms'] / ours['forward_ms']:.2f}× / {general['fwd_bwd_ms'] / ours['fwd_bwd_ms']:.2f}×"
        lines.append(
            f"| {shape} | {k} | {ours['forward_ms']:.3f} ({ours['forward_min_ms']:.3f}-{ours['forward_max_ms']:.3f}) | "
            f"{eager['forward_ms']:.3f} | {dash(compiled, 'forward_ms')} | "
            f"{ours['fwd_bwd_ms']:.3f} ({ours['fwd_bwd_min_ms']:.3f}-{ours['fwd_bwd_max_ms']:.3f}) | "
            f"{eager['fwd_bwd_ms']:.3f} | {dash(compiled, 'fwd_bwd_ms')} | {ratio('forward_ms')} | {ratio('fwd_bwd_ms')} | {saved} | {peak} | {bandwidth} | {versus_general} |"
        )
    return "\n".join(lines)


def plot(rows, path, title):
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed (pip install torch_spatialnorm[bench]): no plot drawn")
        return None
    shapes = list(dict.fromkeys(r["shape"] for r in rows))
    fig, axes = plt.subplots(2, len(shapes), figsize=(5 * len(shapes), 8), squeeze=False)
    for column, shape in enumerate(shapes):
        for line, (key, label) in enumerate([("forward_ms", "forward"), ("fwd_bwd_ms", "forward+backward")]):
            ax = axes[line][column]
            for impl in dict.fromkeys(r["impl"] for r in rows):
                points = [(r["kernel"], r[key]) for r in rows if r["shape"] == shape and r["impl"] == impl]
                ax.plot(*zip(*points), marker="o", label=impl)
            ax.set(xlabel="kernel size (k × k)", ylabel="ms (median)", title=f"{label}, {shape}", yscale="log")
            ax.grid(True, which="both", alpha=0.3)
            ax.legend()
    fig.suptitle(title.replace(": ", ":\n", 1), fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    return path


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda", "mps"])
    parser.add_argument("--dtype", default="float32", choices=["float32", "float16", "bfloat16", "float64"])
    parser.add_argument("--shapes", nargs="+", default=["small", "typical", "large"], choices=["small", "typical", "large"])
    parser.add_argument("--kernels", nargs="+", type=int, default=[3, 5, 9, 17, 31])
    parser.add_argument("--beta", type=float, default=0.75, help="the exponent (MPS's default is 5)")
    parser.add_argument("--budget", type=float, default=0.5, help="seconds of timed runs per measurement")
    parser.add_argument("--no-compile", action="store_true", help="leave out the torch.compile'd composite")
    parser.add_argument("--calls", type=int, default=5000, help="calls per timed repeat of the tiny-input rows")
    parser.add_argument("--out", default="benchmarks/results")
    args = parser.parse_args(argv)

    device = torch.device(args.device)
    title = f"spatial normalization, {args.dtype}, beta {args.beta}: {environment(device)}"
    print(title, flush=True)
    rows = run(args)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    stem = f"bench_{device.type}_{args.dtype}"
    with open(out / f"{stem}.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    table = markdown(rows, not args.no_compile) + "\n\n" + tiny_call_markdown(tiny_call_rows(device, args.beta, args.calls))
    (out / f"{stem}.md").write_text(f"{title}\n\n{table}\n")
    picture = plot(rows, out / f"{stem}.png", title)
    print(f"\n{title}\n\n{table}\n\nwrote {out / (stem + '.csv')}, {out / (stem + '.md')}" + (f", {picture}" if picture else ""))


if __name__ == "__main__":
    main()
