"""Helpers shared by the test files: random inputs and comparison against the float64 reference."""

import torch

from torch_spatialnorm import reference

# The cases every device's kernels are run over.
KERNELS = [(1, 1), (2, 2), (3, 3), (4, 4), (5, 5), (8, 8), (13, 13), (3, 5), (8, 3), (1, 7), (40, 40)]
SHAPES = [(2, 3, 17, 23), (1, 2, 9, 9), (4, 6, 5), (1, 1, 1, 1), (3, 1, 30, 2)]
SETTINGS = [
    dict(alpha=1.0, beta=5.0, delta=1.0),
    dict(alpha=1e-2, beta=0.75, delta=2.0),
    dict(alpha=3.0, beta=-0.5, delta=0.5),
]

# ‖got − ref‖ / ‖ref‖ bars by compute dtype (16-bit types compute in float32 but round their I/O).
TOLERANCE = {torch.float64: 1e-10, torch.float32: 2e-5, torch.float16: 2e-3, torch.bfloat16: 1e-2}


def torch_include_flags():
    """-I flags for compiling against PyTorch's C++ headers, as its extensions do."""
    from torch.utils import cpp_extension

    return [f"-I{path}" for path in cpp_extension.include_paths()]


def relative_error(got: torch.Tensor, expected: torch.Tensor) -> float:
    got, expected = got.double().cpu(), expected.double().cpu()
    return ((got - expected).norm() / expected.norm().clamp_min(1e-300)).item()


def random_image(shape, scale=1.0, generator=None, dtype=torch.float64):
    """Fresh values in roughly [-scale, scale], with a spread of magnitudes."""
    x = torch.randn(shape, generator=generator, dtype=torch.float64) * scale
    return x.to(dtype)


def expected_forward(x, kernel_width, kernel_height, alpha, beta, delta):
    return reference.spatial_normalization(x.double().cpu(), kernel_width, kernel_height, alpha, beta, delta)


def expected_gradient(dy, x, kernel_width, kernel_height, alpha, beta, delta):
    return reference.spatial_normalization_gradient(
        dy.double().cpu(), x.double().cpu(), kernel_width, kernel_height, alpha, beta, delta
    )


def check_against_reference(forward, gradient, x, dy, kernel, settings, dtype, tolerance, device="cpu"):
    """Runs ``forward(x, kw, kh, **settings)`` and ``gradient(dy, x, kw, kh, **settings)`` on ``device`` in
    ``dtype`` and compares both with the float64 reference: right dtype, shape and device, every
    element written and finite, ‖got − ref‖ / ‖ref‖ under ``tolerance``. Returns the (got, expected) pairs."""
    kw, kh = kernel
    on_device = lambda t: t.to(device=device, dtype=dtype)  # noqa: E731
    pairs = [
        (forward(on_device(x), kw, kh, **settings), expected_forward(x, kw, kh, **settings)),
        (gradient(on_device(dy), on_device(x), kw, kh, **settings), expected_gradient(dy, x, kw, kh, **settings)),
    ]
    for got, expected in pairs:
        assert got.dtype == dtype and got.shape == x.shape and got.device.type == torch.device(device).type
        assert torch.isfinite(got).all(), "an output element was not written or overflowed"
        assert relative_error(got, expected) < tolerance
    return pairs
