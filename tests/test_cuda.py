"""The CUDA kernels: run where a GPU and the CUDA build are present, skipped elsewhere."""

import os
import subprocess
import sys

import pytest
import torch

import torch_spatialnorm as sn
from helpers import check_against_reference, KERNELS, SETTINGS, SHAPES, TOLERANCE, expected_forward, expected_gradient, random_image, relative_error

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs an NVIDIA GPU (CUDA)")


def run_both(x, dy, kernel, settings, dtype):
    check_against_reference(
        sn.spatial_normalization, sn.spatial_normalization_gradient, x, dy, kernel, settings, dtype, TOLERANCE[dtype],
        "cuda",
    )


def test_the_cuda_kernels_are_built():
    """On a GPU machine the CUDA kernel must be ours, not the reference fallback."""
    assert torch._C._dispatch_has_kernel_for_dispatch_key("spatialnorm::forward", "CUDA")


@pytest.mark.parametrize("kernel", KERNELS + [(64, 64), (65, 3), (3, 130)])
@pytest.mark.parametrize("shape", SHAPES + [(2, 3, 70, 300)])
def test_matches_reference(shape, kernel, generator):
    x = random_image(shape, 3.0, generator)
    dy = random_image(shape, 1.0, generator)
    run_both(x, dy, kernel, SETTINGS[1], torch.float64)
    run_both(x.float().double(), dy.float().double(), kernel, SETTINGS[1], torch.float32)


@pytest.mark.parametrize("width", [41, 48])  # 48: rows of 16-byte groups in every dtype
@pytest.mark.parametrize("settings", SETTINGS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_dtypes_and_settings(dtype, settings, width, generator):
    x = random_image((2, 3, 37, width), 2.0, generator).to(dtype).double()
    dy = random_image((2, 3, 37, width), 1.0, generator).to(dtype).double()
    run_both(x, dy, (5, 4), settings, dtype)


def test_float32_accuracy_bar(generator):
    x = ((torch.rand((2, 3, 300, 300), generator=generator, dtype=torch.float64) * 2 - 1) * 1e3).float().double()
    dy = random_image((2, 3, 300, 300), 1.0, generator).float().double()
    for kernel in [(5, 5), (64, 64)]:
        run_both(x, dy, kernel, dict(alpha=1.0, beta=0.75, delta=1.0), torch.float32)


@pytest.mark.parametrize("shape, kernel", [((1, 2, 6, 5000), (4801, 3)), ((1, 2, 5000, 6), (3, 4801))])
def test_line_passes(shape, kernel, generator):
    """Windows whose rings or rows do not fit a strip's shared memory take the line passes: lines
    staged in shared memory (6 long), and lines too long for it (5000) walked in device memory."""
    x = random_image(shape, 3.0, generator)
    dy = random_image(shape, 1.0, generator)
    run_both(x, dy, kernel, SETTINGS[1], torch.float64)
    run_both(x.float().double(), dy.float().double(), kernel, SETTINGS[1], torch.float32)


@pytest.mark.parametrize("width", [296, 299])  # 296: rows of 16-byte groups in every dtype; three strips
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.float16, torch.bfloat16])
def test_strips(dtype, width, generator):
    """The forward of windows from 32 rows or columns on, and their gradient up to 64, walk blocks
    down strips: a plane wider than a strip, one plane only (bands of rows), and windows taller and
    wider than a step's rows."""
    x = random_image((1, 1, 150, width), 2.0, generator).to(dtype).double()
    x.view(-1)[torch.randint(x.numel(), (3,), generator=generator)] = 1e3  # spikes well inside every dtype's range
    dy = random_image((1, 1, 150, width), 1.0, generator).to(dtype).double()
    x_on_gpu, dy_on_gpu = x.to("cuda", dtype), dy.to("cuda", dtype)
    for kernel in [(35, 33), (3, 40), (70, 5)]:
        run_both(x, dy, kernel, SETTINGS[1], dtype)
        # Each output takes the memory of the NaN-filled tensor freed just before it.
        torch.full_like(x_on_gpu, float("nan"))
        assert torch.isfinite(sn.spatial_normalization(x_on_gpu, *kernel, **SETTINGS[1])).all()
        torch.full_like(x_on_gpu, float("nan"))
        assert torch.isfinite(sn.spatial_normalization_gradient(dy_on_gpu, x_on_gpu, *kernel, **SETTINGS[1])).all()


def test_nan_and_inf_stay_in_their_windows():
    x = torch.randn(1, 2, 40, 50, dtype=torch.float64)
    x[0, 0, 5, 6] = float("nan")
    x[0, 1, 20, 30] = float("inf")
    y = sn.spatial_normalization(x.cuda(), 3, alpha=1.0, beta=0.75).cpu()
    expected = expected_forward(x, 3, 3, 1.0, 0.75, 1.0)
    assert torch.equal(torch.isnan(y), torch.isnan(expected))
    dy = torch.randn_like(x)
    dx = sn.spatial_normalization_gradient(dy.cuda(), x.cuda(), 3, alpha=1.0, beta=0.75).cpu()
    expected = expected_gradient(dy, x, 3, 3, 1.0, 0.75, 1.0)
    finite = torch.isfinite(expected)
    assert torch.equal(torch.isfinite(dx), finite) and not finite.all()
    assert relative_error(dx[finite], expected[finite]) < 1e-10


def test_layouts(generator):
    x = random_image((2, 5, 17, 16), 1.0, generator, torch.float32)
    dy = random_image((2, 5, 17, 16), 1.0, generator, torch.float32)
    cl, dcl = (t.cuda().to(memory_format=torch.channels_last) for t in (x, dy))
    y = sn.spatial_normalization(cl, 3, alpha=0.5, beta=0.75)
    dx = sn.spatial_normalization_gradient(dcl, cl, 3, alpha=0.5, beta=0.75)
    assert y.is_contiguous(memory_format=torch.channels_last) and dx.is_contiguous(memory_format=torch.channels_last)
    float32 = dict(rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(y.cpu().double(), expected_forward(x, 3, 3, 0.5, 0.75, 1.0), **float32)
    torch.testing.assert_close(dx.cpu().double(), expected_gradient(dy, x, 3, 3, 0.5, 0.75, 1.0), **float32)
    sliced = x.cuda()[:, 1:, ::2, 1:]
    expected = expected_forward(sliced.cpu(), 4, 4, 1.0, 5.0, 1.0)
    torch.testing.assert_close(sn.spatial_normalization(sliced, 4).cpu().double(), expected, **float32)


def test_autograd_opcheck_and_compile(generator):
    x = random_image((2, 2, 9, 10), 1.0, generator).cuda().requires_grad_()
    f = lambda t: sn.spatial_normalization(t, 3, 4, alpha=0.5, beta=0.75)  # noqa: E731
    assert torch.autograd.gradcheck(f, (x,))
    assert torch.autograd.gradgradcheck(f, (x,))
    xf = x.detach().float()
    torch.library.opcheck(torch.ops.spatialnorm.forward.default, (xf.requires_grad_(), 3, 3, 1.0, 0.75, 1.0))
    torch.library.opcheck(torch.ops.spatialnorm.backward.default, (torch.randn_like(xf), xf.detach(), 3, 3, 1.0, 0.75, 1.0))
    torch._dynamo.reset()
    compiled = torch.compile(lambda t: sn.spatial_normalization(t, 5, alpha=0.5, beta=0.75) * 2, fullgraph=True)
    torch.testing.assert_close(compiled(xf.detach()), sn.spatial_normalization(xf.detach(), 5, alpha=0.5, beta=0.75) * 2)


def test_more_than_two_to_the_31_elements():
    """64-bit indexing: 2^31 + a few elements in half precision (4 GiB)."""
    if torch.cuda.get_device_properties(0).total_memory < 24 * 2**30:
        pytest.skip("needs a GPU with 24 GiB of memory")
    planes, height, width = 2**17 + 1, 128, 128
    x = torch.randn(planes, height, width, device="cuda", dtype=torch.float16)
    y = sn.spatial_normalization(x[None], 3, alpha=0.5, beta=0.75)[0]
    for plane in (0, planes // 2, planes - 1):
        expected = expected_forward(x[plane : plane + 1].cpu(), 3, 3, 0.5, 0.75, 1.0)
        assert relative_error(y[plane : plane + 1], expected) < TOLERANCE[torch.float16]
    del x, y


@pytest.mark.parametrize("tool", ["memcheck", "racecheck"])
def test_compute_sanitizer_is_clean(tool):
    script = (
        "import torch, torch_spatialnorm as sn\n"
        "x = torch.randn(2, 3, 20, 37, device='cuda'); g = torch.randn_like(x)\n"
        "sn.spatial_normalization(x, 5, 3); sn.spatial_normalization_gradient(g, x, 4, 6)\n"
        "sn.spatial_normalization_gradient(g, x, 41, 3)\n"
        "for dtype, width in ((torch.float32, 40), (torch.bfloat16, 48)):\n"  # 16-byte groups
        "    x = torch.randn(2, 3, 20, width, device='cuda', dtype=dtype); g = torch.randn_like(x)\n"
        "    sn.spatial_normalization(x, 5, 3); sn.spatial_normalization_gradient(g, x, 9, 6)\n"
        "    sn.spatial_normalization(x, 5); sn.spatial_normalization(x[:, :, :7], 2)\n"  # in registers
        "    sn.spatial_normalization(x, 9); sn.spatial_normalization(x, 13)\n"  # rings in shared memory
        "    xs = torch.randn(1, 2, 90, 300, device='cuda', dtype=dtype)\n"  # strips
        "    sn.spatial_normalization(xs, 35, 33); sn.spatial_normalization_gradient(torch.randn_like(xs), xs, 35, 33)\n"
        "    sn.spatial_normalization_gradient(g, x, 3); sn.spatial_normalization_gradient(g[:, :, :7], x[:, :, :7], 2)\n"
        "    sn.spatial_normalization_gradient(g, x, 5); sn.spatial_normalization_gradient(g, x, 9)\n"  # in shared memory
        "torch.cuda.synchronize()\n"
    )
    result = subprocess.run(
        ["compute-sanitizer", f"--tool={tool}", "--error-exitcode=1", sys.executable, "-c", script],
        capture_output=True, text=True, env={**os.environ, "PYTORCH_NO_CUDA_MEMORY_CACHING": "1"},
    )
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-4000:]
