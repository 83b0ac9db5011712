"""The Metal kernels and their mps host code.

On Linux the kernels run in the CPU emulator (tests/metal_emulator) through the same host code
the mps device uses; on a Mac with an Apple GPU the same tests also run the real device.
"""


import pytest
import torch

import torch_spatialnorm as sn
from helpers import check_against_reference, KERNELS, SETTINGS, SHAPES, expected_forward, expected_gradient, random_image, relative_error
from metal_emulator import BindingError, compile_library, syntax_check_address_spaces
from torch_spatialnorm.mps import MetalKernels, metal_source_path

HAS_MPS = torch.backends.mps.is_available()
# float32 arithmetic; 16-bit I/O rounds the results.
METAL_TOLERANCE = {torch.float32: 2e-5, torch.float16: 2e-3, torch.bfloat16: 1e-2}


class Target:
    """Where the kernels run: the emulator on CPU tensors, or the real mps device."""

    def __init__(self, kernels, device):
        self.kernels, self.device = kernels, device


@pytest.fixture(params=["emulator", "mps"])
def target(request, emulated_library):
    if request.param == "emulator":
        return Target(MetalKernels(emulated_library), "cpu")
    if not HAS_MPS:
        pytest.skip("needs an Apple GPU (the mps device); the emulator runs the same kernels here")
    return Target(sn.mps.device_kernels(), "mps")


def run_both(target, x, dy, kernel, settings, dtype):
    check_against_reference(
        target.kernels.forward, target.kernels.backward, x, dy, kernel, settings, dtype, METAL_TOLERANCE[dtype],
        target.device,
    )


@pytest.mark.parametrize("kernel", KERNELS)
@pytest.mark.parametrize("shape", SHAPES)
def test_float32_matches_reference(target, shape, kernel, generator):
    x = random_image(shape, 3.0, generator)
    dy = random_image(shape, 1.0, generator)
    run_both(target, x, dy, kernel, SETTINGS[1], torch.float32)


@pytest.mark.parametrize("settings", SETTINGS)
@pytest.mark.parametrize("kernel", [(3, 3), (4, 4), (5, 2), (13, 13)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_every_dtype_and_setting(target, dtype, kernel, settings, generator):
    shape = (2, 3, 21, 19)
    x = random_image(shape, 2.0, generator).to(dtype).double()
    dy = random_image(shape, 1.0, generator).to(dtype).double()
    run_both(target, x, dy, kernel, settings, dtype)


def test_large_values_and_kernels_keep_float32_accuracy(target, generator):
    """Wide windows of values up to ±1e3 stay within the float32 bar."""
    x = (torch.rand((1, 2, 300, 300), generator=generator, dtype=torch.float64) * 2 - 1) * 1e3
    dy = random_image((1, 2, 300, 300), 1.0, generator)
    run_both(target, x.float().double(), dy.float().double(), (64, 64), dict(alpha=1.0, beta=0.75, delta=1.0), torch.float32)


def test_nan_stays_in_its_windows(target):
    x = torch.randn(1, 1, 12, 12, dtype=torch.float64)
    x[0, 0, 5, 6] = float("nan")
    x[0, 0, 9, 2] = float("inf")
    y = target.kernels.forward(x.float().to(target.device), 3, 3, 1.0, 0.75, 1.0).cpu()
    expected = expected_forward(x, 3, 3, 1.0, 0.75, 1.0)
    assert torch.equal(torch.isnan(y), torch.isnan(expected))


def test_layouts_and_empty_tensors(target, generator):
    x = random_image((2, 5, 7, 6), 1.0, generator, torch.float32).to(target.device)
    cl = x.to(memory_format=torch.channels_last)
    y = target.kernels.forward(cl, 3, 3, 1.0, 0.75, 1.0)
    assert y.is_contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(y.cpu().double(), expected_forward(x, 3, 3, 1.0, 0.75, 1.0))
    sliced = x[:, 1:, ::2]
    torch.testing.assert_close(target.kernels.forward(sliced, 2, 3, 1.0, 0.75, 1.0).cpu().double(), expected_forward(sliced, 2, 3, 1.0, 0.75, 1.0))
    empty = torch.empty(0, 3, 4, 4, device=target.device)
    assert target.kernels.backward(empty, empty, 3, 3, 1.0, 0.75, 1.0).shape == empty.shape


def test_float64_is_a_clear_error(target):
    x = torch.randn(1, 2, 5, 5, dtype=torch.float64)
    with pytest.raises(TypeError, match="float64 is not supported by the Metal kernels"):
        target.kernels.forward(x.to(target.device) if target.device == "cpu" else x, 3, 3, 1.0, 5.0, 1.0)


def test_bad_settings_are_rejected_before_any_dispatch(target):
    x = torch.randn(1, 2, 5, 5, device=target.device)
    with pytest.raises(ValueError, match="alpha must be finite and >= 0"):
        target.kernels.forward(x, 3, 3, -1.0, 5.0, 1.0)
    with pytest.raises(ValueError, match="grad_output and input must have the same shape"):
        target.kernels.backward(x[..., 1:], x, 3, 3, 1.0, 5.0, 1.0)


@pytest.mark.skipif(not HAS_MPS, reason="needs an Apple GPU (the mps device)")
def test_the_mps_device_runs_the_registered_ops(generator):
    x = random_image((2, 3, 9, 8), 1.0, generator, torch.float32)
    xm = x.to("mps").requires_grad_()
    y = sn.spatial_normalization(xm, 3, alpha=0.5, beta=0.75)
    y.sum().backward()
    torch.testing.assert_close(y.cpu().double(), expected_forward(x, 3, 3, 0.5, 0.75, 1.0), rtol=1e-4, atol=1e-5)
    expected_dx = expected_gradient(torch.ones_like(x), x, 3, 3, 0.5, 0.75, 1.0)
    torch.testing.assert_close(xm.grad.cpu().double(), expected_dx, rtol=1e-4, atol=1e-5)


# The emulator's own checks: what it must refuse, as the real binding would go wrong there.

BROKEN_SOURCE = """
#include <metal_stdlib>
using namespace metal;
kernel void write_one_past(device float* out [[buffer(0)]], constant long& n [[buffer(1)]],
                           uint i [[thread_position_in_grid]]) {
  out[i + 1] = float(n);
}
kernel void narrow_scalar(device float* out [[buffer(0)]], constant int& n [[buffer(1)]],
                          uint i [[thread_position_in_grid]]) {
  out[i] = float(n);
}
"""


@pytest.fixture(scope="module")
def broken_library(tmp_path_factory):
    path = tmp_path_factory.mktemp("broken") / "broken.metal"
    path.write_text(BROKEN_SOURCE)
    return compile_library(path, path.parent)


def test_out_of_bounds_writes_are_caught(broken_library):
    with pytest.raises(RuntimeError, match="out-of-bounds write to buffer 'out'"):
        broken_library.write_one_past(torch.zeros(8), 3, threads=8)


def test_scalar_and_tensor_bindings_are_checked(broken_library, emulated_library):
    with pytest.raises(BindingError, match=r"sent as 8 bytes \(int64\), but the kernel declares `constant int& n`"):
        broken_library.narrow_scalar(torch.zeros(4), 3, threads=4)
    with pytest.raises(BindingError, match="sent as 4 bytes"):
        broken_library.write_one_past(torch.zeros(4), 3.0, threads=3)
    with pytest.raises(BindingError, match="dtype torch.float64 bound to `device float\\* out`"):
        broken_library.write_one_past(torch.zeros(4, dtype=torch.float64), 3, threads=3)
    with pytest.raises(BindingError, match="takes 2 arguments, got 1"):
        broken_library.write_one_past(torch.zeros(4), threads=3)
    with pytest.raises(AttributeError, match="no kernel named"):
        emulated_library.not_a_kernel


def test_double_does_not_compile(tmp_path):
    path = tmp_path / "uses_double.metal"
    path.write_text(BROKEN_SOURCE.replace("float(n)", "float(double(n))"))
    with pytest.raises(RuntimeError, match="poisoned"):
        compile_library(path, tmp_path)


def mutated_library(tmp_path, old, new):
    source = metal_source_path().read_text()
    assert old in source
    path = tmp_path / "mutated.metal"
    path.write_text(source.replace(old, new, 1))
    return compile_library(path, tmp_path)


def test_a_wrong_window_bound_is_caught(tmp_path, generator):
    """The suite's comparison catches a kernel whose window is one element off."""
    kernels = MetalKernels(mutated_library(tmp_path, "term(first + position + window - 1)", "term(first + position + window)"))
    x = random_image((1, 2, 10, 11), 1.0, generator)
    y = kernels.forward(x.float(), 3, 3, 1.0, 0.75, 1.0)
    assert relative_error(y, expected_forward(x, 3, 3, 1.0, 0.75, 1.0)) > 1e-3


def test_clang_checks_address_spaces():
    syntax_check_address_spaces(metal_source_path())


def test_a_wrong_address_space_is_caught(tmp_path):
    """Writing window sums through a `constant` pointer fails in both compilers, as in Metal."""
    with pytest.raises(RuntimeError, match="compiling the Metal source as C\\+\\+ failed"):
        mutated_library(tmp_path, "device float* sums [[buffer(1)]],\n                                constant long& width",
                        "constant float* sums [[buffer(1)]],\n                                constant long& width")
    source = metal_source_path().read_text().replace("inline long column_start(uint index", "inline long column_start(device uint& index")
    path = tmp_path / "mixed.metal"
    path.write_text(source)
    with pytest.raises(RuntimeError, match="address-space check with clang failed"):
        syntax_check_address_spaces(path)
