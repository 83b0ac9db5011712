"""A short tour: a small CNN with SpatialNormalization, one training step, and a gradient check.

Run with ``python -m torch_spatialnorm.demo``.
"""

import argparse
import time

import torch
from torch import nn

import torch_spatialnorm as sn


def small_cnn() -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(3, 16, 3, padding=1),
        sn.SpatialNormalization(5, alpha=1e-2, beta=0.75, delta=1.0),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(16, 10),
    )


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args(argv)

    torch.manual_seed(0)
    model = small_cnn().to(args.device)
    print(model)
    images = torch.randn(8, 3, 32, 32, device=args.device)
    labels = torch.randint(0, 10, (8,), device=args.device)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)

    start = time.perf_counter()
    loss = nn.functional.cross_entropy(model(images), labels)
    optimizer.zero_grad()
    loss.backward()
    optimizer.step()
    print(f"one training step on {args.device}: loss {loss.item():.4f} in {1e3 * (time.perf_counter() - start):.1f} ms")

    x = torch.randn(2, 3, 9, 9, dtype=torch.float64, requires_grad=True)
    ok = torch.autograd.gradcheck(lambda t: sn.spatial_normalization(t, 4, 3, alpha=0.5, beta=0.75), (x,))
    print(f"gradcheck of spatial_normalization (4x3 window, float64): {'passed' if ok else 'FAILED'}")


if __name__ == "__main__":
    main()
