"""The CPU kernels against the float64 reference: shapes, kernel sizes, settings and dtypes."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import torch_spatialnorm as sn
from helpers import check_against_reference, KERNELS, SETTINGS, SHAPES, TOLERANCE, expected_forward, expected_gradient, random_image, relative_error, torch_include_flags


def check_both_ways(x, dy, kernel, settings, dtype):
    pairs = check_against_reference(
        sn.spatial_normalization, sn.spatial_normalization_gradient, x, dy, kernel, settings, dtype, TOLERANCE[dtype]
    )
    for got, expected in pairs:
        # Element by element too, so that no single pixel can hide in the norm.
        torch.testing.assert_close(got.double(), expected, rtol=100 * TOLERANCE[dtype], atol=1e-3 * expected.abs().max().item())


@pytest.mark.parametrize("kernel", KERNELS)
@pytest.mark.parametrize("shape", SHAPES)
def test_matches_reference_float64(shape, kernel, generator):
    x = random_image(shape, 3.0, generator)
    dy = random_image(shape, 1.0, generator)
    check_both_ways(x, dy, kernel, SETTINGS[1], torch.float64)


@pytest.mark.parametrize("settings", SETTINGS)
@pytest.mark.parametrize("kernel", [(3, 3), (4, 4), (5, 2), (13, 13)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_matches_reference_lower_precision(dtype, kernel, settings, generator):
    shape = (2, 3, 21, 19)
    x = random_image(shape, 2.0, generator).to(dtype).double()  # exactly representable in dtype
    dy = random_image(shape, 1.0, generator).to(dtype).double()
    check_both_ways(x, dy, kernel, settings, dtype)


@pytest.mark.parametrize("height", [35, 45])
@pytest.mark.parametrize("width", [1, 3, 15, 16, 17, 33, 70])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_wide_and_tall_windows_on_planes_of_every_width(dtype, width, height, generator):
    """Windows wider than 10 are summed along rows in transposed tiles of 16 rows (8 in double),
    windows taller than 8 down the columns a vector of columns at a time (narrower vectors on
    narrower planes): planes whose rows and columns fill no whole tile or vector (a last group of
    rows under half a tile or over it), windows beyond the plane, even sizes (whose mirror window
    differs)."""
    shape = (1, 2, height, width)
    x = random_image(shape, 2.0, generator).to(dtype).double()
    dy = random_image(shape, 1.0, generator).to(dtype).double()
    for kernel in [(10, 1), (11, 2), (17, 1), (18, 3), (31, 2), (64, 5), (3, 9), (1, 20), (20, 33)]:
        check_both_ways(x, dy, kernel, SETTINGS[1], dtype)


@pytest.mark.parametrize("kernel", [(5, 5), (64, 64), (17, 64)])
def test_float32_accuracy_bar_large_images_and_values(kernel, generator):
    """The accuracy bar: float32 within 2e-5 of float64 for 300x300 images, values up to ±1e3."""
    shape = (1, 2, 300, 300)
    x = (torch.rand(shape, generator=generator, dtype=torch.float64) * 2 - 1) * 1e3
    dy = random_image(shape, 1.0, generator)
    settings = dict(alpha=1.0, beta=0.75, delta=1.0)
    x32 = x.float()
    y = sn.spatial_normalization(x32, *kernel, **settings)
    dx = sn.spatial_normalization_gradient(dy.float(), x32, *kernel, **settings)
    assert relative_error(y, expected_forward(x32.double(), *kernel, **settings)) < 2e-5
    assert relative_error(dx, expected_gradient(dy.float().double(), x32.double(), *kernel, **settings)) < 2e-5


def test_few_planes_are_split_into_bands(generator):
    """One tall plane runs as several bands of rows in parallel; their seams must not show."""
    x = random_image((1, 1, 257, 31), 2.0, generator)
    dy = random_image((1, 1, 257, 31), 1.0, generator)
    for threads in (1, 2, 5):
        previous = torch.get_num_threads()
        torch.set_num_threads(threads)
        try:
            check_both_ways(x, dy, (3, 7), SETTINGS[0], torch.float64)
        finally:
            torch.set_num_threads(previous)


def test_nan_and_inf_propagate():
    x = torch.randn(1, 1, 8, 8, dtype=torch.float64)
    x[0, 0, 4, 4] = float("nan")
    y = sn.spatial_normalization(x.float(), 3)
    expected = expected_forward(x, 3, 3, 1.0, 5.0, 1.0)
    assert torch.equal(torch.isnan(y), torch.isnan(expected))


@pytest.mark.parametrize("capability", ["avx2", "default"])
def test_block_sums_with_the_vectors_aten_cpu_capability_allows(capability):
    """The window sums' explicit vectors are as wide as the registers of the code the CPU runs, at
    most what ATEN_CPU_CAPABILITY allows (as for ATen's kernels): on a machine with AVX-512, the
    AVX2 and baseline widths run only this way. The block-sum tests again, in a fresh process."""
    files = [__file__, str(Path(__file__).with_name("test_exactness.py"))]
    tests = "every_width or (hostile_data and cpu)"
    command = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", *files, "-k", tests]
    result = subprocess.run(command, env={**os.environ, "ATEN_CPU_CAPABILITY": capability}, capture_output=True, text=True)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]  # 5 where none ran


def test_window_sums_stay_in_their_buffers(tmp_path):
    """tests/window_sums_bounds.cpp under AddressSanitizer: planes 1 to 70 wide, windows 1 to 40
    wide, float and double, of values and of their squares (squared as the sums read them),
    against direct sums, in the vectors of each ATEN_CPU_CAPABILITY. The last tile along a row
    was once transposed whole out of a buffer that ended inside it: a read past its end that
    crashed only where the buffer ended a page (the gradient at 1x64x56x56, 31x31, two threads)."""
    from torch.utils import cpp_extension

    binary = tmp_path / "window_sums_bounds"
    libraries = cpp_extension.library_paths()
    command = [
        os.environ.get("CXX", "c++"), "-std=c++17", "-O1", "-g0", "-fsanitize=address", "-fno-omit-frame-pointer",
        *torch_include_flags(), str(Path(__file__).with_name("window_sums_bounds.cpp")),
        "-o", str(binary), *(f"-L{path}" for path in libraries), *(f"-Wl,-rpath,{path}" for path in libraries),
        "-ltorch_cpu", "-lc10",
    ]
    built = subprocess.run(command, capture_output=True, text=True)
    assert built.returncode == 0, built.stderr[-3000:]
    for capability in ("avx512", "avx2", "default"):
        env = {**os.environ, "ATEN_CPU_CAPABILITY": capability, "ASAN_OPTIONS": "detect_leaks=0"}
        result = subprocess.run([str(binary)], env=env, capture_output=True, text=True)
        assert result.returncode == 0, f"{capability}: " + result.stdout[-3000:] + result.stderr[-3000:]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_power_edge_cases(dtype):
    """beta = 0 is the identity; a huge denominator underflows to 0 like the reference."""
    x = torch.randn(2, 3, 10, 10, dtype=dtype) * 1e3
    torch.testing.assert_close(sn.spatial_normalization(x, 3, beta=0.0), x)
    y = sn.spatial_normalization(x, 3, alpha=1.0, beta=20.0, delta=1.0)
    expected = expected_forward(x.double(), 3, 3, 1.0, 20.0, 1.0).to(dtype)
    torch.testing.assert_close(y, expected, rtol=1e-4, atol=0)


@pytest.mark.parametrize("beta", [5.0, 0.75, 0.5, 1.0, 2.0, 0.25, 1.5, -0.5, -2.0, 15.75, 16.0, 4.9, 0.7])
@pytest.mark.parametrize("delta", [1e-3, 1.0])
def test_float32_powers_for_every_kind_of_beta(beta, delta, generator):
    """Whole quarters up to 16 take the multiply-and-square-root powers, other betas the
    logarithm and exponential; where T or a power leaves float's normal range (magnitudes here
    span 1e-8 to 1e8), both give way to the double-range powers. Every element within a few ulp."""
    shape = (2, 3, 16, 16)
    magnitudes = 10 ** (torch.rand(shape, generator=generator, dtype=torch.float64) * 16 - 8)
    x = (random_image(shape, 1.0, generator) * magnitudes).float()
    dy = random_image(shape, 1.0, generator).float()
    settings = dict(alpha=1.0, beta=beta, delta=delta)
    y = sn.spatial_normalization(x, 3, **settings)
    expected = expected_forward(x.double(), 3, 3, **settings).float()  # inf where it overflows float
    quarters = (4 * beta) % 1 == 0 and abs(beta) < 16
    # atol: a subnormal result's last step, 2^-149.
    torch.testing.assert_close(y, expected, rtol=2e-6 if quarters else 3e-5, atol=1.5e-45)
    dx = sn.spatial_normalization_gradient(dy, x, 3, **settings).double()
    expected_dx = expected_gradient(dy.double(), x.double(), 3, 3, **settings)
    finite = torch.isfinite(expected_dx.float())
    assert torch.equal(torch.isfinite(dx), finite)
    assert relative_error(dx[finite], expected_dx[finite]) < 2e-5


@pytest.mark.parametrize("beta", [0.25, 0.5, 0.75])
def test_float32_quarter_roots_are_within_a_few_ulp(beta, generator):
    """beta 0.25, 0.5 and 0.75 take 1/sqrt by Newton steps from a guess in the bits: every
    element within 1e-6 relative of float64 over T from 1 to 1e12 (a step fewer would be 5e-6
    off), and the gradient, whose T^(-beta-1) multiplies instead of dividing, within 1e-6 as a
    whole."""
    shape = (2, 3, 32, 32)
    magnitudes = 10 ** (torch.rand(shape, generator=generator, dtype=torch.float64) * 6)
    x = (random_image(shape, 1.0, generator) * magnitudes).float()
    settings = dict(alpha=1.0, beta=beta, delta=1.0)
    y = sn.spatial_normalization(x, 1, **settings)
    torch.testing.assert_close(y.double(), expected_forward(x.double(), 1, 1, **settings), rtol=1e-6, atol=0)
    dy = random_image(shape, 1.0, generator).float()
    dx = sn.spatial_normalization_gradient(dy, x, 1, **settings)
    assert relative_error(dx.double(), expected_gradient(dy.double(), x.double(), 1, 1, **settings)) < 1e-6


def test_bands_beyond_float32_are_computed_again_in_double(generator):
    """A band is computed in float32 first; one whose squares overflow float32 (|X| above 1.8e19)
    is computed again in double, and the other bands keep their float32 results."""
    x = random_image((3, 2, 12, 11), 2.0, generator)
    dy = random_image(x.shape, 1.0, generator)
    x[1, 0, 5, 4] = 3e25
    x[2, 1, 0, 0] = -1e20
    settings = dict(alpha=1e-2, beta=0.75, delta=1.0)
    y = sn.spatial_normalization(x.float(), 3, **settings)
    dx = sn.spatial_normalization_gradient(dy.float(), x.float(), 3, **settings)
    assert torch.isfinite(y).all() and torch.isfinite(dx).all()
    torch.testing.assert_close(y.double(), expected_forward(x.float().double(), 3, 3, **settings), rtol=2e-5, atol=0)
    expected_dx = expected_gradient(dy.float().double(), x.float().double(), 3, 3, **settings)
    torch.testing.assert_close(dx.double(), expected_dx, rtol=2e-5, atol=1e-6 * expected_dx.abs().max().item())


def test_gradient_powers_below_float32_are_computed_again_in_double():
    """T^(-beta-1) below float32's normal range (T = 1e20, beta = 1) while T^-beta is not: the
    gradient's float32 attempt gives way to double."""
    x = torch.tensor([[[1e12, 3.0]]])
    dy = torch.tensor([[[0.7, -1.3]]])
    settings = dict(alpha=1e-4, beta=1.0, delta=1e-8)
    dx = sn.spatial_normalization_gradient(dy, x, 1, **settings)
    torch.testing.assert_close(dx.double(), expected_gradient(dy.double(), x.double(), 1, 1, **settings), rtol=1e-5, atol=0)


def test_settings_where_float32_squares_would_lose_t_take_double(generator):
    """delta = 1e-36 < alpha * 2^-110 with alpha = 1e10: squares of values near 1e-21 fall below
    float32's normal range (to a few digits), where T = delta + alpha / 9 * (their sum) needs them whole."""
    x = random_image((1, 2, 8, 9), 1e-21, generator).float()
    settings = dict(alpha=1e10, beta=0.5, delta=1e-36)
    y = sn.spatial_normalization(x, 3, **settings)
    torch.testing.assert_close(y.double(), expected_forward(x.double(), 3, 3, **settings), rtol=2e-5, atol=0)
