"""Exact whatever the data: each output depends only on its window, nothing overflows or becomes
NaN where the exact result is finite, and the edge cases have one rule on every dtype.

Every device's kernels against the float64 reference (the CPU's, the Metal ones in the emulator,
CUDA's where a GPU is present), on targeted cases (spikes of huge values, 0 times a huge power, subnormal T) and on
property-based examples over shapes, windows, dtypes and settings.
"""

import math

import pytest
import torch
from hypothesis import HealthCheck, given, settings, strategies as st

import torch_spatialnorm as sn
from helpers import expected_forward, expected_gradient
from torch_spatialnorm.mps import MetalKernels

DTYPES = [torch.float64, torch.float32, torch.float16, torch.bfloat16]
# Per-element error bars, relative to the magnitude of the terms that make each result.
ELEMENT_TOLERANCE = {torch.float64: 1e-10, torch.float32: 2e-5, torch.float16: 4e-3, torch.bfloat16: 2e-2}


class Backend:
    """Runs the forward, the gradient op and autograd of one device's kernels on CPU tensors."""

    dtypes = DTYPES

    def __init__(self, device):
        self.device = device
        self.float32_intermediates = device != "cpu"

    def forward(self, x, *args, **kwargs):
        return sn.spatial_normalization(x.to(self.device), *args, **kwargs).cpu()

    def gradient(self, dy, x, *args, **kwargs):
        return sn.spatial_normalization_gradient(dy.to(self.device), x.to(self.device), *args, **kwargs).cpu()

    def autograd(self, dy, x, *args, **kwargs):
        x = x.to(self.device).requires_grad_(True)
        (dx,) = torch.autograd.grad(sn.spatial_normalization(x, *args, **kwargs), x, dy.to(self.device))
        return dx.cpu()


def _settings(kernel_width, kernel_height=None, alpha=1.0, beta=5.0, delta=1.0):
    return kernel_width, kernel_width if kernel_height is None else kernel_height, alpha, beta, delta


class MetalBackend:
    """The Metal kernels through their mps host code, run by the emulator (Metal has no float64)."""

    dtypes = [torch.float32, torch.float16, torch.bfloat16]
    float32_intermediates = True

    def __init__(self, library):
        self.kernels = MetalKernels(library)

    def forward(self, x, *args, **kwargs):
        return self.kernels.forward(x, *_settings(*args, **kwargs))

    def gradient(self, dy, x, *args, **kwargs):
        return self.kernels.backward(dy, x, *_settings(*args, **kwargs))


BACKENDS = {"cpu": DTYPES, "cuda": DTYPES, "metal": MetalBackend.dtypes}


@pytest.fixture(params=list(BACKENDS))
def backend(request):
    if request.param == "cuda" and not torch.cuda.is_available():
        pytest.skip("needs an NVIDIA GPU (CUDA)")
    if request.param == "metal":
        return MetalBackend(request.getfixturevalue("emulated_library"))
    return Backend(request.param)


def on_backends(cases, dtype_of=lambda case: case[0]):
    """(backend, *case) for every backend whose kernels take the case's dtype."""
    return [
        pytest.param(name, *case, id=f"{name}-{i}")
        for name, dtypes in BACKENDS.items()
        for i, case in enumerate(cases)
        if dtype_of(case) in dtypes
    ]


def forward_and_gradient(backend, x, dy, kernel, alpha, beta, delta):
    kw, kh = kernel
    return backend.forward(x, kw, kh, alpha, beta, delta), backend.gradient(dy, x, kw, kh, alpha, beta, delta)


REPROS = [
        # A spike's rounding error stayed in running sums after it left the window.
        (torch.tensor([[[1.0, 3e8, 1, 1, 1, 1, 1, 1]]]), 3, {}, None),
        (torch.tensor([[[1e4, 1e-4]]], dtype=torch.float64), 1, dict(beta=0.5, delta=1e-10), None),
        # 0 * T^-beta with T^-beta beyond float32's range.
        (torch.zeros(1, 3, 3), 3, dict(beta=5.0, delta=1e-8), torch.zeros(1, 3, 3)),
        # A subnormal T in float32.
        (torch.tensor([[[1e-20]]]), 1, dict(beta=0.5, delta=1e-39), torch.tensor([[[0.30151134]]])),
]


@pytest.mark.parametrize(
    "backend,x,kernel,settings,expected", on_backends(REPROS, lambda case: case[0].dtype), indirect=["backend"]
)
def test_forward_repros(backend, x, kernel, settings, expected):
    got = backend.forward(x, kernel, **settings)
    exact = expected_forward(x, kernel, kernel, **{**dict(alpha=1.0, beta=5.0, delta=1.0), **settings})
    if expected is not None:
        torch.testing.assert_close(exact, expected.double(), rtol=1e-6, atol=0)
    torch.testing.assert_close(got.double(), exact.to(x.dtype).double(), rtol=2e-6, atol=0)


def test_squares_beyond_float32_on_the_cpu():
    """The CPU takes squares beyond float32 again in double (the GPUs sum in float32: docs/definition.md)."""
    got = sn.spatial_normalization(torch.tensor([[[1e20, -3e19]]]), 1, beta=0.5)
    torch.testing.assert_close(got, torch.tensor([[[1.0, -1.0]]]))


def test_gradient_repros(backend):
    # alpha = 0: the second term is 0 even where G overflows float32.
    got = backend.gradient(torch.ones(1, 1, 1), torch.full((1, 1, 1), 0.5), 1, alpha=0.0, beta=1.0, delta=1e-20)
    torch.testing.assert_close(got, torch.full((1, 1, 1), 1e20))
    # One nonzero pixel in zeros: T^(-beta-1) beyond float32's range times X = 0.
    x = torch.zeros(1, 1, 6, 6)
    x[0, 0, 2, 3] = 0.7
    dy = torch.randn(1, 1, 6, 6)
    got = backend.gradient(dy, x, 3, beta=5.0, delta=1e-7)
    torch.testing.assert_close(got.double(), expected_gradient(dy, x, 3, 3, 1.0, 5.0, 1e-7), rtol=1e-5, atol=0)


@pytest.mark.parametrize("beta", [-0.5, -2.0])
def test_infinite_input_with_negative_beta(backend, beta):
    """T^(-beta-1) at T = inf is 0 or inf, not inf/inf: the gradient is what the formula says."""
    x = torch.tensor([[[1.0, float("inf"), 2.0, 0.5]]], dtype=torch.float64)
    dy = torch.tensor([[[1.0, 1.0, -1.0, 2.0]]], dtype=torch.float64)
    for dtype in [dtype for dtype in (torch.float64, torch.float32) if dtype in backend.dtypes]:
        got = backend.gradient(dy.to(dtype), x.to(dtype), 3, beta=beta)
        torch.testing.assert_close(got.double(), expected_gradient(dy, x, 3, 3, 1.0, beta, 1.0), equal_nan=True)


@pytest.mark.parametrize(
    "backend,dtype,spike", on_backends([(torch.float32, 1e30), (torch.float64, 1e300), (torch.float16, 6e4)]),
    indirect=["backend"],
)
# (12, 9), (31, 20): the CPU sums along rows by blocks in transposed tiles past 10 wide, down columns
# past 8.
@pytest.mark.parametrize("kernel", [(3, 3), (5, 4), (12, 9), (31, 20)])
def test_a_spike_changes_no_window_that_does_not_hold_it(backend, dtype, spike, kernel, generator):
    shape = (1, 2, 40, 37)
    x = torch.randn(shape, generator=generator, dtype=torch.float64).to(dtype)
    dy = torch.randn(shape, generator=generator, dtype=torch.float64).to(dtype)
    x[0, 1, 11, 7] = spike
    kw, kh = kernel
    settings = dict(alpha=1e-2, beta=0.75, delta=1.0)
    y, dx = forward_and_gradient(backend, x, dy, kernel, **settings)
    # Outputs whose forward window W holds the spike; the gradient reaches through W then M.
    holds = torch.zeros(shape, dtype=torch.float64)
    holds[0, 1, 11, 7] = 1.0
    in_w = sn.reference.window_sum(holds, kw, kh, mirrored=True) > 0
    in_w_or_m = sn.reference.window_sum(sn.reference.window_sum(holds, kw, kh, mirrored=True), kw, kh) > 0
    for got, expected, touched in (
        (y, expected_forward(x.double(), kw, kh, **settings), in_w),
        (dx, expected_gradient(dy.double(), x.double(), kw, kh, **settings), in_w_or_m),
    ):
        away = ~touched
        assert away.sum() > 1000
        torch.testing.assert_close(
            got.double()[away], expected[away], rtol=ELEMENT_TOLERANCE[dtype], atol=1e-6 * expected[away].abs().max().item()
        )


@pytest.mark.parametrize("backend", ["cpu", "cuda"], indirect=True)  # Metal's large windows: test_metal.py
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("kernel", [(13, 4), (31, 20), (18, 33), (64, 5)])
@pytest.mark.parametrize(
    "settings_", [dict(alpha=1.0, beta=5.0, delta=1e-8), dict(alpha=30.0, beta=0.75, delta=1e-3), dict(alpha=1e-4, beta=-1.5, delta=1e3)]
)
def test_wide_and_tall_windows_on_hostile_data(backend, dtype, kernel, settings_, generator):
    """The property test's planes (at most 9 wide) never reach the CPU's block sums along rows past
    10 wide: these planes do, with spikes of huge values, NaN, infinities and a tiny delta."""
    kw, kh = kernel
    for spike in (1e6, float("nan"), float("inf")):
        scale = 10.0 ** torch.randint(-3, 4, (1,), generator=generator).item()
        x = (torch.randn(1, 2, 45, 70, generator=generator, dtype=torch.float64) * scale).to(dtype)
        dy = torch.randn(1, 2, 45, 70, generator=generator, dtype=torch.float64).to(dtype)
        x.view(-1)[torch.randint(x.numel(), (3,), generator=generator)] = spike * (1.0 if math.isnan(spike) else scale)
        y, dx = forward_and_gradient(backend, x, dy, kernel, **settings_)
        y_scale, dx_scale = _term_scales(x, dy, kw, kh, **settings_)
        _assert_close_elementwise(y, expected_forward(x, kw, kh, **settings_), y_scale, dtype)
        _assert_gradient_close(backend, dx, dy, x, kw, kh, settings_, dx_scale, dtype)


@pytest.mark.parametrize("backend", ["cpu", "cuda"], indirect=True)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("size", [*range(2, 14), 16, 17])
def test_square_windows_over_rows_of_groups_of_four(backend, dtype, size, generator):
    """CUDA takes the forward (2x2 to 17x17) and the gradient (to 9x9) of square windows over rows
    of whole groups of four values with each thread's sums to itself (register_forward.cu,
    register_backward.cu; a thread of the 16-bit forward owns eight columns up to 11x11, of the
    16-bit gradient up to 5x5, where the rows are groups of eight, here all widths but 4 and 124,
    and their rings lie in shared memory from 3x3; from 5x5 in the four-column forward and the
    float32 gradient, from 6x6 in the 16-bit four-column gradient, they lie in shared memory and go
    down the columns by blocks; the float32 gradient at 9x9 loads X again for its output; with four
    columns two lanes on each side of a segment only lend from 10x10 in the forward, from 6x6 in
    the gradient), larger ones in tiles: planes 4 to 124 wide take segments of 4 to 32 lanes, one
    or several across a row, and bands of 16 to 64 rows, a plane's last one shorter (or the whole
    plane, where it is shorter than that).
    Spikes, NaN and infinities stay in their windows; the zero rows with delta 1e-8 and beta 5 make
    powers beyond float32's range."""
    settings_ = [dict(alpha=1.0, beta=5.0, delta=1e-8), dict(alpha=30.0, beta=0.75, delta=1e-3), dict(alpha=1e-2, beta=-1.5, delta=1.0)]
    spikes = [10.0, float("nan"), float("inf")]
    for i, (height, width) in enumerate([(1, 4), (5, 8), (37, 24), (70, 56), (9, 112), (33, 124)]):
        x = torch.randn(2, 1, height, width, generator=generator, dtype=torch.float64).to(dtype)
        dy = torch.randn(2, 1, height, width, generator=generator, dtype=torch.float64).to(dtype)
        x[0, 0, : height // 3] = 0.0
        x.view(-1)[torch.randint(x.numel(), (2,), generator=generator)] = spikes[i % 3]
        case = settings_[i % 3]
        y, dx = forward_and_gradient(backend, x, dy, (size, size), **case)
        y_scale, dx_scale = _term_scales(x, dy, size, size, **case)
        _assert_close_elementwise(y, expected_forward(x, size, size, **case), y_scale, dtype)
        _assert_gradient_close(backend, dx, dy, x, size, size, case, dx_scale, dtype)


@pytest.mark.parametrize("backend,dtype", on_backends([(dtype,) for dtype in DTYPES]), indirect=["backend"])
def test_nonpositive_t_is_nan_on_every_dtype(backend, dtype):
    """delta <= 0: T <= 0 is undefined (as in MPS); every device and dtype gives NaN there."""
    x = torch.tensor([[[0.0, 3.0, 0.0, 0.0, 0.0]]], dtype=dtype)
    y, dx = forward_and_gradient(backend, x, torch.ones_like(x), (1, 1), 1.0, 2.0, -1.0)
    assert torch.isnan(y).tolist() == [[[True, False, True, True, True]]]
    assert torch.isnan(dx).tolist() == [[[True, False, True, True, True]]]
    y, _ = forward_and_gradient(backend, x, torch.ones_like(x), (1, 1), 1.0, 2.0, 0.0)
    assert torch.isnan(y).tolist() == [[[True, False, True, True, True]]]


@pytest.mark.parametrize("shape", [(2, 0, 4, 4), (1, 2, 0, 4), (0, 4, 4)])
def test_double_backward_of_empty_tensors(shape):
    x = torch.randn(shape, dtype=torch.float64, requires_grad=True)
    (grad,) = torch.autograd.grad(sn.spatial_normalization(x, 3).sum(), x, create_graph=True)
    (grad_grad,) = torch.autograd.grad(grad.sum(), x)
    assert grad_grad.shape == x.shape


@pytest.mark.parametrize("alpha,beta", [(0.0, 2.0), (1.0, 0.0)])
def test_double_backward_without_the_window_term(alpha, beta, generator):
    """alpha or beta 0: dX = dY * T^-beta with T^-beta independent of X, whatever X holds."""
    x = torch.randn(1, 2, 6, 5, generator=generator, dtype=torch.float64)
    x[0, 0, 2, 2] = float("inf")
    dy = torch.randn_like(x).requires_grad_(True)
    x.requires_grad_(True)
    dx = sn.spatial_normalization_gradient(dy, x, 3, alpha=alpha, beta=beta, delta=2.0)
    v = torch.randn_like(x)
    grad_dy, grad_x = torch.autograd.grad(dx, (dy, x), v)
    torch.testing.assert_close(grad_dy, v * 2.0 ** -beta)
    torch.testing.assert_close(grad_x, torch.zeros_like(x))


def test_huge_kernel_sizes_are_windows_larger_than_the_image(backend, generator):
    dtype = backend.dtypes[0]  # the most precise the kernels take
    x = torch.randn(1, 2, 5, 7, generator=generator, dtype=torch.float64).to(dtype)
    dy = torch.randn(1, 2, 5, 7, generator=generator, dtype=torch.float64).to(dtype)
    for kernel in [(2**31 - 1, 5), (3, 2**31 - 1)]:
        settings = dict(alpha=1e9, beta=0.75, delta=1.0)
        y, dx = forward_and_gradient(backend, x, dy, kernel, **settings)
        tolerance = dict(rtol=ELEMENT_TOLERANCE[dtype], atol=0)
        torch.testing.assert_close(y.double(), expected_forward(x, *kernel, **settings), **tolerance)
        torch.testing.assert_close(dx.double(), expected_gradient(dy, x, *kernel, **settings), **tolerance)


# Property-based: the float64 reference as the oracle, and an error bar per element scaled by the
# magnitudes of the terms the result is made of, so that cancellation in the gradient is allowed
# for but no single element can hide.


def _term_scales(x, dy, kw, kh, alpha, beta, delta):
    """|Y| and |dY| T^-beta + c |X| M(|dY X| T^(-beta-1)) from the float64 reference."""
    x, dy = x.double(), dy.double()
    t = sn.reference.denominator(x, kw, kh, alpha, delta)
    first = dy.abs() * t.pow(-beta)
    c = 2.0 * alpha * abs(beta) / (kw * kh)
    if c == 0:
        return (x * t.pow(-beta)).abs(), first
    neighbours = sn.reference.window_sum((dy * x).abs() * t.pow(-beta - 1.0), kw, kh, mirrored=True)
    return (x * t.pow(-beta)).abs(), first + c * x.abs() * neighbours


def _gradient_intermediates_fit_float32(x, dy, kw, kh, alpha, beta, delta):
    """Where dY T^-beta, G = dY X T^(-beta-1), its sums over M and c X (sum of G) all lie within
    float32's range: the GPUs keep them in float32 (docs/definition.md), the CPU in double.
    Below float32's normal range they round to its smallest step: _float32_intermediate_rounding."""
    x, dy = x.double(), dy.double()
    t = sn.reference.denominator(x, kw, kh, alpha, delta)
    largest = torch.finfo(torch.float32).max
    fits = (dy.abs() * sn.reference.power(t, -beta)).nan_to_num(0.0) <= largest
    c = 2.0 * alpha * abs(beta) / (kw * kh)
    if c != 0:
        g = ((dy * x).abs() * sn.reference.power(t, -beta - 1.0)).nan_to_num(0.0).clamp_max(largest * 2)
        neighbours = sn.reference.window_sum(g, kw, kh, mirrored=True)
        fits &= (neighbours <= largest) & (c * x.abs() * neighbours <= largest)
    return fits


def _assert_close_elementwise(got, expected, scale, dtype, compared=None, allowance=None):
    """got == expected within the dtype's bar, plus `allowance` (an absolute error per element) if
    given, for each element (of those `compared`, if given)."""
    allowance = torch.zeros_like(scale) if allowance is None else allowance
    if compared is not None:
        got, expected, scale, allowance = got[compared], expected[compared], scale[compared], allowance[compared]
    expected_in_dtype = expected.to(dtype).double()
    got = got.double()
    special = ~torch.isfinite(expected_in_dtype)
    assert torch.equal(torch.isnan(got), torch.isnan(expected_in_dtype))
    assert torch.equal(got[special & ~torch.isnan(got)], expected_in_dtype[special & ~torch.isnan(got)])
    ok = ~special
    # Results below the dtype's normal range carry an absolute error of its smallest step.
    floor = torch.finfo(dtype).tiny if dtype != torch.float64 else 0.0
    bar = ELEMENT_TOLERANCE[dtype] * scale[ok] + 2 * floor + allowance[ok]
    excess = (got[ok] - expected[ok]).abs() - bar
    assert (excess <= 0).all(), f"largest excess {excess.max().item():.3g} over the bar"


def _float32_intermediate_rounding(x, kw, kh, alpha, beta, delta):
    """The absolute error dX can carry from float32 intermediates below float32's normal range:
    dY T^-beta and each G of M rounded to a multiple of 2^-149 (the last scaled by c |X|)."""
    step = 2.0**-149
    c = 2.0 * alpha * abs(beta) / (kw * kh)
    terms = sn.reference.window_sum(torch.ones_like(x, dtype=torch.float64), kw, kh, mirrored=True)
    magnitude = x.double().abs().nan_to_num(0.0, posinf=0.0)  # dX is NaN or infinite there anyway
    return step * (1.0 + c * magnitude * terms)


def _assert_gradient_close(backend, dx, dy, x, kw, kh, settings_, scale, dtype):
    compared = allowance = None
    if backend.float32_intermediates and dtype != torch.float64:
        compared = _gradient_intermediates_fit_float32(x, dy, kw, kh, **settings_)
        allowance = _float32_intermediate_rounding(x, kw, kh, **settings_)
    _assert_close_elementwise(
        dx, expected_gradient(dy, x, kw, kh, **settings_), scale, dtype, compared, allowance
    )


@st.composite
def cases(draw, dtypes):
    dtype = draw(st.sampled_from(dtypes))
    batch = draw(st.sampled_from([(), (1,), (2,)]))
    channels, height, width = draw(st.integers(0, 2)), draw(st.integers(0, 9)), draw(st.integers(0, 9))
    kw, kh = draw(st.integers(1, 12)), draw(st.integers(1, 12))
    alpha = draw(st.sampled_from([0.0, 1e-4, 1e-2, 1.0, 30.0]))
    # Whole quarters take the CPU's multiply-and-square-root powers, the others its log/exp ones.
    beta = draw(st.sampled_from([-1.5, -0.5, 0.0, 0.5, 0.75, 1.0, 2.0, 5.0, 8.0, -1.3, 0.7, 4.9]))
    delta = draw(st.sampled_from([1e-8, 1e-3, 1.0, 2.0, 1e3]))
    # Magnitudes within what the dtype holds, so that the float64 reference is exact on the same inputs.
    top = {torch.float16: 2, torch.bfloat16: 6}.get(dtype, 8)
    scale = 10.0 ** draw(st.integers(-6, top))
    seed = draw(st.integers(0, 2**31 - 1))
    spikes = draw(st.sampled_from([None, 1e3, 1e6, float("nan"), float("inf")]))
    return dtype, (*batch, channels, height, width), (kw, kh), dict(alpha=alpha, beta=beta, delta=delta), scale, seed, spikes


def _inputs(dtype, shape, scale, seed, spike):
    generator = torch.Generator().manual_seed(seed)
    x = (torch.randn(shape, generator=generator, dtype=torch.float64) * scale).to(dtype)
    dy = torch.randn(shape, generator=generator, dtype=torch.float64).to(dtype)
    if spike is not None and x.numel():
        flat = x.view(-1)
        flat[torch.randint(flat.numel(), (1,), generator=generator)] = spike * (1.0 if math.isnan(spike) else scale)
    return x, dy


# The backend fixture holds no state, so its examples may share it.
PROPERTY_SETTINGS = settings(
    max_examples=400, derandomize=True, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture], database=None
)


@PROPERTY_SETTINGS
@given(data=st.data())
def test_forward_and_gradient_op_match_the_reference(backend, data):
    dtype, shape, (kw, kh), settings_, scale, seed, spike = data.draw(cases(backend.dtypes))
    x, dy = _inputs(dtype, shape, scale, seed, spike)
    y, dx = forward_and_gradient(backend, x, dy, (kw, kh), **settings_)
    assert y.shape == dx.shape == x.shape and y.dtype == dx.dtype == dtype
    if x.numel() == 0:
        return
    y_scale, dx_scale = _term_scales(x, dy, kw, kh, **settings_)
    _assert_close_elementwise(y, expected_forward(x, kw, kh, **settings_), y_scale, dtype)
    _assert_gradient_close(backend, dx, dy, x, kw, kh, settings_, dx_scale, dtype)


@pytest.mark.parametrize("backend", ["cpu", "cuda"], indirect=True)  # the mps autograd is the same C++ formula
@PROPERTY_SETTINGS
@given(data=st.data())
def test_autograd_matches_the_reference(backend, data):
    dtype, shape, (kw, kh), settings_, scale, seed, spike = data.draw(cases(backend.dtypes))
    x, dy = _inputs(dtype, shape, scale, seed, spike)
    dx = backend.autograd(dy, x, kw, kh, **settings_)
    assert dx.shape == x.shape and dx.dtype == dtype
    if x.numel() == 0:
        return
    _, dx_scale = _term_scales(x, dy, kw, kh, **settings_)
    _assert_gradient_close(backend, dx, dy, x, kw, kh, settings_, dx_scale, dtype)
