"""The public API: modules, settings, serialization, bad input, empty and strided tensors."""

import copy
import io
import pickle

import pytest
import torch

import torch_spatialnorm as sn
from helpers import expected_forward, expected_gradient, random_image


def test_defaults_are_mps_defaults():
    m = sn.SpatialNormalization(3)
    assert (m.kernel_width, m.kernel_height, m.alpha, m.beta, m.delta) == (3, 3, 1.0, 5.0, 1.0)


def test_kernel_sizes_are_read_only():
    m = sn.SpatialNormalization(3, 5)
    with pytest.raises(AttributeError):
        m.kernel_width = 4
    with pytest.raises(AttributeError):
        m.kernel_height = 4
    assert (m.kernel_width, m.kernel_height) == (3, 5)


def test_settings_are_validated_on_set():
    m = sn.SpatialNormalization(3, alpha=0.5, beta=0.75, delta=2.0)
    for name, bad in [("alpha", -1.0), ("alpha", float("inf")), ("beta", float("nan")), ("delta", float("inf")), ("beta", "x")]:
        with pytest.raises((ValueError, TypeError), match=name if name != "beta" or bad != "x" else "beta"):
            setattr(m, name, bad)
    assert (m.alpha, m.beta, m.delta) == (0.5, 0.75, 2.0)
    m.alpha, m.beta, m.delta = 2, -1, 3
    assert (m.alpha, m.beta, m.delta) == (2.0, -1.0, 3.0)


def test_repr_shows_every_setting():
    text = repr(sn.SpatialNormalizationGradient(3, 4, alpha=0.5, beta=0.75, delta=2.0))
    assert text == "SpatialNormalizationGradient(kernel_width=3, kernel_height=4, alpha=0.5, beta=0.75, delta=2.0)"


@pytest.mark.parametrize("cls", [sn.SpatialNormalization, sn.SpatialNormalizationGradient])
def test_copy_pickle_and_save_keep_every_setting(cls):
    m = cls(3, 7, alpha=0.25, beta=0.5, delta=3.0)
    buffer = io.BytesIO()
    torch.save(m, buffer)
    buffer.seek(0)
    for clone in (copy.deepcopy(m), pickle.loads(pickle.dumps(m)), torch.load(buffer, weights_only=False)):
        assert type(clone) is cls and clone.settings() == m.settings()


def test_module_and_gradient_module_match_the_functions(generator):
    forward = sn.SpatialNormalization(5, 3, alpha=0.5, beta=0.75, delta=2.0)
    gradient = sn.SpatialNormalizationGradient.from_forward(forward)
    assert gradient.settings() == forward.settings()
    x = random_image((2, 3, 8, 9), 1.0, generator)
    dy = random_image((2, 3, 8, 9), 1.0, generator)
    torch.testing.assert_close(forward(x), expected_forward(x, 5, 3, 0.5, 0.75, 2.0))
    torch.testing.assert_close(gradient(dy, x), expected_gradient(dy, x, 5, 3, 0.5, 0.75, 2.0))
    with pytest.raises(TypeError, match="SpatialNormalization"):
        sn.SpatialNormalizationGradient.from_forward(gradient)


BAD_SETTINGS = [
    (dict(kernel_width=0), ValueError, r"kernel_width must be an integer in \[1, 2147483647\]"),
    (dict(kernel_width=2.0), ValueError, r"kernel_width must be an integer in \[1, 2147483647\]"),
    (dict(kernel_width=True), ValueError, r"kernel_width must be an integer in \[1, 2147483647\]"),
    (dict(kernel_width=2**31), ValueError, r"kernel_width must be an integer in \[1, 2147483647\], got 2147483648"),
    (dict(kernel_width=3, kernel_height=2**63), ValueError, r"kernel_height must be an integer in \[1, 2147483647\]"),
    (dict(kernel_width=3, kernel_height=-2), ValueError, r"kernel_height must be an integer in \[1, 2147483647\]"),
    (dict(kernel_width=3, alpha=-0.1), ValueError, "alpha must be finite and >= 0"),
    (dict(kernel_width=3, alpha=float("nan")), ValueError, "alpha must be finite and >= 0"),
    (dict(kernel_width=3, beta=float("inf")), ValueError, "beta must be finite"),
    (dict(kernel_width=3, delta=float("-inf")), ValueError, "delta must be finite"),
]


@pytest.mark.parametrize("settings,error,message", BAD_SETTINGS)
def test_bad_settings_are_rejected(settings, error, message):
    x = torch.randn(1, 2, 5, 5)
    before = x.clone()
    for call in (
        lambda: sn.SpatialNormalization(**settings),
        lambda: sn.spatial_normalization(x, **settings),
        lambda: sn.spatial_normalization_gradient(x, x, **settings),
    ):
        with pytest.raises(error, match=message):
            call()
    assert torch.equal(x, before)


@pytest.mark.parametrize(
    "op_args,error,message",
    [
        ((0, 3, 1.0, 5.0, 1.0), ValueError, r"kernel_width must be an integer in \[1, 2147483647\]"),
        ((3, 0, 1.0, 5.0, 1.0), ValueError, r"kernel_height must be an integer in \[1, 2147483647\]"),
        ((2**32, 2**32, 1.0, 5.0, 1.0), ValueError, r"kernel_width must be an integer in \[1, 2147483647\]"),
        ((3, 3, -1.0, 5.0, 1.0), ValueError, "alpha must be finite and >= 0"),
        ((3, 3, 1.0, float("nan"), 1.0), ValueError, "beta must be finite"),
        ((3, 3, 1.0, 5.0, float("inf")), ValueError, "delta must be finite"),
    ],
)
def test_the_raw_ops_check_their_arguments_too(op_args, error, message):
    x = torch.randn(1, 2, 5, 5)
    with pytest.raises(error, match=message):
        torch.ops.spatialnorm.forward(x, *op_args)
    with pytest.raises(error, match=message):
        torch.ops.spatialnorm.backward(x, x, *op_args)


@pytest.mark.parametrize(
    "make,error,message",
    [
        (lambda: torch.randn(5, 5), ValueError, "must be a 3-D .* or 4-D .* tensor, got a 2-D tensor"),
        (lambda: torch.randn(1, 1, 1, 5, 5), ValueError, "must be a 3-D .* or 4-D .* tensor, got a 5-D tensor"),
        (lambda: torch.arange(25).reshape(1, 5, 5), TypeError, "must have dtype float32, float64, float16 or bfloat16"),
        (lambda: torch.randn(1, 5, 5, dtype=torch.complex64), TypeError, "must have dtype float32, float64, float16 or"),
        (lambda: torch.randn(1, 5, 5).to(torch.float8_e4m3fn), TypeError, r"must have dtype .*, got (torch\.float8_e4m3fn|Float8_e4m3fn)"),
    ],
)
def test_bad_tensors_are_rejected(make, error, message):
    x = make()
    with pytest.raises(error, match="input " + message):
        sn.spatial_normalization(x, 3)
    with pytest.raises(error, match="input " + message):
        torch.ops.spatialnorm.forward(x, 3, 3, 1.0, 5.0, 1.0)
    with pytest.raises(error, match="source_image " + message):
        sn.spatial_normalization_gradient(torch.randn(1, 5, 5), x, 3)


@pytest.mark.parametrize(
    "gradient,error,message",
    [
        (torch.randn(1, 2, 5, 4), ValueError, "same shape"),
        (torch.randn(1, 2, 5, 5, dtype=torch.float64), TypeError, "same dtype"),
        (torch.randn(1, 2, 5, 5, device="meta"), ValueError, "same device"),
    ],
)
def test_mismatched_gradient_and_image_are_rejected(gradient, error, message):
    image = torch.randn(1, 2, 5, 5)
    with pytest.raises(error, match="source_gradient and source_image must have the " + message):
        sn.spatial_normalization_gradient(gradient, image, 3)
    if gradient.device == image.device:
        with pytest.raises(error, match="grad_output and input must have the " + message):
            torch.ops.spatialnorm.backward(gradient, image, 3, 3, 1.0, 5.0, 1.0)


@pytest.mark.parametrize("shape", [(0, 3, 5, 5), (2, 0, 5, 5), (2, 3, 0, 5), (3, 5, 0)])
def test_empty_tensors_give_empty_results(shape):
    x = torch.randn(shape, requires_grad=True)
    y = sn.spatial_normalization(x, 3)
    assert y.shape == x.shape
    y.sum().backward()
    assert x.grad.shape == x.shape
    assert sn.spatial_normalization_gradient(x.detach(), x.detach(), 3).shape == x.shape


def test_channels_last_keeps_its_layout(generator):
    x = random_image((2, 5, 7, 6), 1.0, generator, torch.float32).to(memory_format=torch.channels_last)
    dy = random_image((2, 5, 7, 6), 1.0, generator, torch.float32).to(memory_format=torch.channels_last)
    y = sn.spatial_normalization(x, 3, alpha=0.5, beta=0.75)
    dx = sn.spatial_normalization_gradient(dy, x, 3, alpha=0.5, beta=0.75)
    assert y.is_contiguous(memory_format=torch.channels_last) and dx.is_contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(y, expected_forward(x, 3, 3, 0.5, 0.75, 1.0).float())
    torch.testing.assert_close(dx, expected_gradient(dy, x, 3, 3, 0.5, 0.75, 1.0).float())


def test_non_contiguous_inputs(generator):
    base = random_image((3, 6, 10, 12), 1.0, generator)
    x = base[:, ::2, 1:, ::3]  # strided, with an offset
    dy = random_image((3, 6, 12, 9), 1.0, generator).transpose(2, 3)[:, ::2, :, ::3]
    assert not x.is_contiguous() and not dy.is_contiguous() and x.shape == dy.shape
    torch.testing.assert_close(sn.spatial_normalization(x, 3, 2, alpha=0.5, beta=0.75), expected_forward(x, 3, 2, 0.5, 0.75, 1.0))
    torch.testing.assert_close(
        sn.spatial_normalization_gradient(dy, x, 3, 2, alpha=0.5, beta=0.75), expected_gradient(dy, x, 3, 2, 0.5, 0.75, 1.0)
    )


def test_unbatched_input_matches_batched(generator):
    x = random_image((4, 9, 8), 1.0, generator)
    torch.testing.assert_close(sn.spatial_normalization(x, 3), sn.spatial_normalization(x[None], 3)[0])


def test_devices_without_a_kernel_use_the_reference_and_say_so(generator):
    """The meta device has no kernel of ours: the fallback runs (shapes only) and warns once."""
    from torch_spatialnorm import _ops

    _ops._warned_device_types.discard("meta")
    x = torch.empty(2, 3, 8, 8, device="meta")
    with pytest.warns(UserWarning, match="no kernel for the meta device"):
        _ops._forward_reference(x, 3, 3, 1.0, 5.0, 1.0)
    assert _ops._backward_reference(x, x, 3, 3, 1.0, 5.0, 1.0).shape == x.shape
