"""The Metal kernels and their mps host code.

On Linux the kernels run in the CPU emulator (tests/metal_emulator) through the same host code
the mps device uses; on a Mac with an Apple GPU the same tests also run the real device.
"""


import pytest
import torch

import torch_spatialnorm as sn
from helpers import check_against_reference, KERNELS, SETTINGS, SHAPES, expected_forward, expected_gradient, random_image, relative_error
from metal_emulator import EmulatorError, compile_library, syntax_check_address_spaces
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


def mutated_library(tmp_path, old, new):
    source = metal_source_path().read_text()
    assert old in source
    path = tmp_path / "mutated.metal"
    path.write_text(source.replace(old, new, 1))
    return compile_library(path, tmp_path)


def test_a_wrong_window_bound_is_caught(tmp_path, generator):
    """The suite's comparison catches a kernel whose window is one element off."""
    kernels = MetalKernels(mutated_library(tmp_path, "terms(first + position + window - 1)", "terms(first + position + window)"))
    x = random_image((1, 2, 10, 11), 1.0, generator)
    try:
        y = kernels.forward(x.float(), 3, 3, 1.0, 0.75, 1.0)
    except EmulatorError as error:  # the window's last term lies past the threadgroup rows written
        assert "which no lane has written" in str(error) or "out-of-bounds" in str(error)
    else:
        assert relative_error(y, expected_forward(x, 3, 3, 1.0, 0.75, 1.0)) > 1e-3


# Barriers of the tiled kernels, counted from the first in the source: the forward's last one (the
# store still reads slots the next block's loads overwrite), the gradient's after G (its row sums
# read G), and the gradient's before dX (dX's column sums read G's row sums).
@pytest.mark.parametrize("barrier", [3, 6, 7])
def test_each_barrier_of_the_tiled_kernels_is_needed(tmp_path, generator, barrier):
    pieces = metal_source_path().read_text().split("threadgroup_barrier(mem_flags::mem_threadgroup);")
    assert len(pieces) == 10  # 4 in the forward, 5 in the gradient
    path = tmp_path / "missing_barrier.metal"
    path.write_text("threadgroup_barrier(mem_flags::mem_threadgroup);".join(pieces[: barrier + 1]) + ";" + "threadgroup_barrier(mem_flags::mem_threadgroup);".join(pieces[barrier + 1 :]))
    kernels = MetalKernels(compile_library(path, tmp_path))
    x, dy = random_image((1, 2, 20, 19), 1.0, generator).float(), random_image((1, 2, 20, 19), 1.0, generator).float()
    # Depending on the lanes' order, a lane reads before or after another writes.
    with pytest.raises(EmulatorError, match="data race on threadgroup memory|which no lane has written"):
        kernels.forward(x, 3, 3, 1.0, 0.75, 1.0)
        kernels.backward(dy, x, 3, 3, 1.0, 0.75, 1.0)


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


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("kernel_size", [3, 9])
def test_tiled_kernels_move_the_floors_bytes_coalesced(emulated_library, generator, kernel_size, dtype):
    """By the emulator's traffic model, on planes as wide as 8x64x56x56's: one dispatch each way,
    at most 1.25x the floor's bytes (X in, Y out; X and dY in, dX out), >= 90% of each touched
    64-byte segment used, and no scratch tensor in device memory (no other buffer is bound)."""
    kernels = MetalKernels(emulated_library)
    x = random_image((1, 64, 16, 56), 1.0, generator).to(dtype)
    dy = random_image((1, 64, 16, 56), 1.0, generator).to(dtype)
    with emulated_library.recording() as forward:
        kernels.forward(x, kernel_size, kernel_size, 1.0, 0.75, 1.0)
    with emulated_library.recording() as gradient:
        kernels.backward(dy, x, kernel_size, kernel_size, 1.0, 0.75, 1.0)
    for log, tensors in [(forward, 2), (gradient, 3)]:
        (dispatch,) = log
        floor = tensors * x.element_size()
        assert (dispatch.bytes_read + dispatch.bytes_written) / x.numel() <= 1.25 * floor
        assert dispatch.coalescing >= 0.9
        assert dispatch.threadgroup_bytes <= 32 * 1024
