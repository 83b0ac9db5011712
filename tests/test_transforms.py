"""Every PyTorch transform on both ops, on every device's kernels: torch.func (grad, vjp, jvp,
jacrev, jacfwd, hessian, vmap, per-sample gradients) and torch.autograd.forward_ad, each compared
with the same transform of the float64 reference.

The Metal kernels run through their mps host code in the emulator, standing in for the CPU kernels
on CPU tensors (Metal has no float64, so that backend runs in float32).
"""

import contextlib

import pytest
import torch
import torch.autograd.forward_ad as forward_ad
from torch import func

import torch_spatialnorm as sn
from helpers import random_image, relative_error
from torch_spatialnorm import reference
from torch_spatialnorm.mps import MetalKernels

# Installing a kernel over the CPU one warns, once.
pytestmark = pytest.mark.filterwarnings("ignore:Warning only once for all operators")

SETTINGS = dict(kernel_width=3, kernel_height=2, alpha=0.7, beta=0.75, delta=1.5)


def forward(t, module=sn):
    return module.spatial_normalization(t, **SETTINGS)


def gradient_op(t, module=sn):
    """The gradient op as a function of one image, which it takes as both of its arguments'
    source (shifted for dY), so that every transform differentiates through both."""
    return module.spatial_normalization_gradient(t.roll(1, -1) * 0.5, t, **SETTINGS)


def forward_ad_tangent(f, x, tangent):
    with forward_ad.dual_level():
        return forward_ad.unpack_dual(f(forward_ad.make_dual(x, tangent))).tangent


# Each transform takes the function, an image x (N, C, H, W) and a second image v of its shape.
TRANSFORMS = {
    "grad": lambda f, x, v: func.grad(lambda t: (f(t) * v).sum())(x),
    "vjp": lambda f, x, v: func.vjp(f, x)[1](v),
    "jvp": lambda f, x, v: func.jvp(f, (x,), (v,)),
    "forward_ad": forward_ad_tangent,
    "jacrev": lambda f, x, v: func.jacrev(f)(x[:1, :1, :3, :4]),
    "jacfwd": lambda f, x, v: func.jacfwd(f)(x[:1, :1, :3, :4]),
    "hessian": lambda f, x, v: func.hessian(lambda t: (f(t) * v[:1, :1, :3, :4]).sum())(x[:1, :1, :3, :4]),
    "vmap": lambda f, x, v: func.vmap(f)(x),
    "vmap_over_channels": lambda f, x, v: func.vmap(f, in_dims=1, out_dims=1)(x),
    "per_sample_grad": lambda f, x, v: func.vmap(func.grad(lambda t, w: (f(t) * w).sum()))(x, v),
    "vmap_of_jvp": lambda f, x, v: func.vmap(lambda t, w: func.jvp(f, (t,), (w,))[1])(x, v),
}


class EmulatedMetal:
    """Installs the Metal kernels (emulated) as the CPU kernels of both ops while in use, and
    records which of them ran."""

    def __init__(self, library):
        self.kernels = MetalKernels(library)
        self.calls = []

    def _recorded(self, name):
        def kernel(*args):
            self.calls.append(name)
            return getattr(self.kernels, name)(*args)

        return kernel

    def __enter__(self):
        self._library = torch.library.Library("spatialnorm", "IMPL")
        for name in ("forward", "backward"):
            self._library.impl(name, self._recorded(name), "CPU")

    def __exit__(self, *exc):
        self._library._destroy()


@pytest.fixture(params=["cpu", "metal", "cuda"])
def backend(request, emulated_library):
    """(device, dtype, tolerance, context that installs the kernels)."""
    if request.param == "cuda" and not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    if request.param == "metal":
        return "cpu", torch.float32, 1e-4, EmulatedMetal(emulated_library)
    return request.param, torch.float64, 1e-10, contextlib.nullcontext()


@pytest.mark.parametrize("transform", TRANSFORMS)
@pytest.mark.parametrize("op", [forward, gradient_op])
def test_transform_matches_the_reference(backend, op, transform, generator):
    device, dtype, tolerance, kernels = backend
    x = random_image((3, 2, 5, 6), 1.5, generator)
    v = random_image((3, 2, 5, 6), 1.0, generator)
    expected = TRANSFORMS[transform](lambda t: op(t, reference), x, v)
    with kernels:
        got = TRANSFORMS[transform](op, x.to(device, dtype), v.to(device, dtype))
    got, expected = torch.utils._pytree.tree_leaves(got), torch.utils._pytree.tree_leaves(expected)
    assert len(got) == len(expected)
    for g, e in zip(got, expected):
        assert g.dtype == dtype and g.device.type == device and g.shape == e.shape
        assert relative_error(g, e) < tolerance


def test_the_metal_kernels_are_the_ones_transformed(emulated_library, generator):
    """Guards the test above: under EmulatedMetal the transforms reach the Metal host code."""
    metal = EmulatedMetal(emulated_library)
    x = random_image((2, 2, 5, 6), 1.0, generator, torch.float32)
    with metal:
        func.vmap(func.grad(lambda t: forward(t).sum()))(x)
    assert metal.calls == ["forward", "backward"]
    forward(x)  # the CPU kernel is back
    assert metal.calls == ["forward", "backward"]


@pytest.mark.parametrize("op", [forward, gradient_op])
def test_forward_mode_checks(op, generator):
    """gradcheck's forward-mode and forward-over-reverse checks, against finite differences."""
    x = random_image((2, 2, 5, 6), 1.5, generator).requires_grad_()
    assert torch.autograd.gradcheck(op, (x,), check_forward_ad=True)
    assert torch.autograd.gradgradcheck(op, (x,), check_fwd_over_rev=True)


def test_vmap_runs_the_kernel_once_for_the_whole_batch(generator, monkeypatch):
    """The vmapped dimension joins the batch (no per-sample loop of PyTorch's fallback)."""
    shapes = []
    x = random_image((4, 3, 5, 6), 1.0, generator)
    with torch.library._scoped_library("spatialnorm", "IMPL") as library:
        library.impl("forward", lambda t, *s: shapes.append(tuple(t.shape)) or reference.spatial_normalization(t, *s), "CPU")
        got = func.vmap(forward, in_dims=1)(x.unsqueeze(1).expand(4, 2, 3, 5, 6))
    assert shapes == [(8, 3, 5, 6)]
    torch.testing.assert_close(got, forward(x, reference).expand(2, 4, 3, 5, 6))
