"""A tour of torch_spatialnorm on real data that ships with scikit-learn (nothing is downloaded):

1. normalizes a photograph channel by channel and draws input, output and T^-beta for two
   kernel sizes;
2. trains a small CNN with SpatialNormalization after its convolutions, and the same CNN
   without, on the handwritten digits, and prints test accuracy and time for both;
3. checks the gradient with torch.autograd.gradcheck;
4. says where its files went.

Also runs data-parallel:  torchrun --nproc_per_node=2 -m torch_spatialnorm.demo
"""

import argparse
from pathlib import Path

import torch

import torch_spatialnorm as sn

from .picture import draw
from .training import Distributed, train


def parse(argv=None):
    parser = argparse.ArgumentParser(
        prog="python -m torch_spatialnorm.demo", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--out", type=Path, default=Path("demo_output"))
    parser.add_argument("--kernel-sizes", type=int, nargs=2, default=[5, 25], help="for the photograph")
    parser.add_argument("--skip-picture", action="store_true")
    parser.add_argument("--skip-gradcheck", action="store_true")
    return parser.parse_args(argv)


def check_gradient() -> bool:
    x = torch.randn(2, 3, 7, 9, dtype=torch.float64, requires_grad=True)
    return torch.autograd.gradcheck(lambda t: sn.spatial_normalization(t, 4, 3, alpha=0.5, beta=0.75), (x,))


def main(argv=None) -> None:
    args = parse(argv)
    distributed = Distributed(torch.device(args.device))
    say = print if distributed.is_main else (lambda *a, **k: None)
    args.out.mkdir(parents=True, exist_ok=True)
    written = []
    try:
        if not args.skip_picture and distributed.is_main:
            picture = draw(args.kernel_sizes, distributed.device, args.out / "photograph.png")
            written.append(picture)
            say(f"1. normalized the photograph with {args.kernel_sizes[0]}x{args.kernel_sizes[0]} and "
                f"{args.kernel_sizes[1]}x{args.kernel_sizes[1]} windows: {picture}")

        mode = f"{distributed.world_size} processes (DistributedDataParallel)" if distributed.enabled else "1 process"
        say(f"2. training on the digits, {args.epochs} epochs, {mode}, on {distributed.device.type}")
        results = {}
        for normalized in (True, False):
            model, accuracy, seconds = train(normalized, args.epochs, distributed)
            results[normalized] = (accuracy, seconds)
            weights = args.out / f"weights_{'normalized' if normalized else 'plain'}_rank{distributed.rank}.pt"
            torch.save(model.state_dict(), weights)
            written.append(weights)
        for normalized, (accuracy, seconds) in results.items():
            label = "with SpatialNormalization" if normalized else "without (baseline)"
            say(f"   {label:>26}: test accuracy {100 * accuracy:.1f}% in {seconds:.1f} s")

        if not args.skip_gradcheck and distributed.is_main:
            say(f"3. gradcheck of spatial_normalization (float64, 4x3 window): {'passed' if check_gradient() else 'FAILED'}")
        say(f"4. files written to {args.out.resolve()}:")
        for path in written if distributed.is_main else []:
            say(f"   {path}")
    finally:
        distributed.close()


if __name__ == "__main__":
    main()
