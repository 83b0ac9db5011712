"""Autograd (first and second order), opcheck and torch.compile on the CPU."""

import pytest
import torch
from torch import nn

import torch_spatialnorm as sn
from helpers import expected_forward, random_image

CASES = [((2, 2, 6, 7), 3, 3), ((1, 2, 5, 6), 4, 2), ((3, 5, 4), 2, 5), ((1, 1, 4, 4), 9, 9)]
SETTINGS = dict(alpha=0.7, beta=0.75, delta=1.5)


@pytest.mark.parametrize("shape,kw,kh", CASES)
def test_gradcheck_and_gradgradcheck(shape, kw, kh, generator):
    x = random_image(shape, 1.5, generator).requires_grad_()
    f = lambda t: sn.spatial_normalization(t, kw, kh, **SETTINGS)  # noqa: E731
    assert torch.autograd.gradcheck(f, (x,))
    assert torch.autograd.gradgradcheck(f, (x,))


@pytest.mark.parametrize("shape,kw,kh", CASES[:2])
def test_gradient_op_has_exact_derivatives(shape, kw, kh, generator):
    """Differentiating the gradient kernel itself, in both of its tensor arguments."""
    x = random_image(shape, 1.5, generator).requires_grad_()
    dy = random_image(shape, 1.0, generator).requires_grad_()
    f = lambda g, t: sn.spatial_normalization_gradient(g, t, kw, kh, **SETTINGS)  # noqa: E731
    assert torch.autograd.gradcheck(f, (dy, x))


def test_backward_saves_only_the_input(generator):
    x = random_image((2, 3, 8, 8), 1.0, generator, torch.float32).requires_grad_()
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        sn.spatial_normalization(x, 5).sum().backward()
    assert len(saved) == 1 and saved[0] is x


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_opcheck(dtype, generator):
    x = random_image((2, 3, 9, 8), 1.0, generator, dtype).requires_grad_()
    dy = random_image((2, 3, 9, 8), 1.0, generator, dtype)
    torch.library.opcheck(torch.ops.spatialnorm.forward.default, (x, 3, 4, 1.0, 0.75, 1.0))
    torch.library.opcheck(torch.ops.spatialnorm.backward.default, (dy, x.detach(), 5, 2, 1.0, 0.75, 1.0))
    cl = x.detach().to(memory_format=torch.channels_last)
    torch.library.opcheck(torch.ops.spatialnorm.forward.default, (cl, 3, 3, 1.0, 0.75, 1.0))


def test_compile_fullgraph_forward_and_backward(generator):
    torch._dynamo.reset()
    model = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), sn.SpatialNormalization(3, alpha=1e-1, beta=0.75), nn.ReLU())
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
    x = random_image((2, 3, 12, 12), 1.0, generator, torch.float32)
    expected = model(x)
    got = compiled(x)
    torch.testing.assert_close(got, expected)
    got.sum().backward()
    grads = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    expected.sum().backward()
    for g, p in zip(grads, model.parameters()):
        torch.testing.assert_close(g, p.grad)


def test_compile_inductor_no_graph_break(generator):
    torch._dynamo.reset()
    f = torch.compile(lambda t: sn.spatial_normalization(t * 2, 5, 3, alpha=0.5, beta=0.75) + 1, fullgraph=True)
    x = random_image((1, 2, 10, 11), 1.0, generator, torch.float32)
    torch.testing.assert_close(f(x), sn.spatial_normalization(x * 2, 5, 3, alpha=0.5, beta=0.75) + 1)


def test_compiled_module_takes_new_settings_without_a_graph_break(generator):
    torch._dynamo.reset()
    module = sn.SpatialNormalization(3, alpha=0.5, beta=0.75)
    compiled = torch.compile(module, fullgraph=True)
    x = random_image((2, 3, 8, 9), 1.0, generator, torch.float32)
    torch.testing.assert_close(compiled(x), module(x))
    module.alpha, module.beta, module.delta = 3.0, 1.5, 0.25
    torch.testing.assert_close(compiled(x), module(x))
    torch.testing.assert_close(compiled(x).double(), expected_forward(x, 3, 3, 3.0, 1.5, 0.25), rtol=1e-5, atol=1e-6)


def test_dynamic_compile_with_symbolic_settings_and_sizes(generator):
    torch._dynamo.reset()
    f = torch.compile(
        lambda t, alpha: sn.spatial_normalization(t, t.shape[-1] // 2, alpha=alpha, beta=0.75), fullgraph=True, dynamic=True
    )
    for shape, alpha in [((2, 3, 8, 9), 0.5), ((1, 2, 6, 11), 2.5), ((1, 1, 5, 7), 0.0)]:
        x = random_image(shape, 1.0, generator, torch.float32)
        expected = expected_forward(x, shape[-1] // 2, shape[-1] // 2, alpha, 0.75, 1.0)
        torch.testing.assert_close(f(x, alpha).double(), expected, rtol=1e-5, atol=1e-6)
    # ValueError from the kernel (older torch wraps it in dynamo's TorchRuntimeError).
    with pytest.raises((ValueError, RuntimeError), match="alpha must be finite and >= 0, got -1"):
        f(x, -1.0)


def test_export(generator):
    module = sn.SpatialNormalization(3, 5, alpha=0.5)
    x = random_image((1, 2, 8, 8), 1.0, generator, torch.float32)
    exported = torch.export.export(module, (x,))
    torch.testing.assert_close(exported.module()(x), module(x))


def test_trains_inside_sequential(generator):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), sn.SpatialNormalization(3, alpha=1e-1, beta=0.75), nn.Flatten(), nn.Linear(4 * 8 * 8, 2))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    x = random_image((16, 1, 8, 8), 1.0, generator, torch.float32)
    target = (x.mean(dim=(1, 2, 3)) > 0).long()
    losses = []
    for _ in range(20):
        optimizer.zero_grad()
        loss = nn.functional.cross_entropy(model(x), target)
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters())
    assert losses[-1] < losses[0]


def test_reference_autograd_agrees_with_the_gradient_kernel(generator):
    """The kernel's gradient equals autograd through the float64 reference forward."""
    x = random_image((2, 3, 7, 9), 1.0, generator).requires_grad_()
    dy = random_image((2, 3, 7, 9), 1.0, generator)
    (expected,) = torch.autograd.grad(expected_forward(x, 4, 3, **SETTINGS), x, dy)
    torch.testing.assert_close(sn.spatial_normalization_gradient(dy, x.detach(), 4, 3, **SETTINGS), expected)
