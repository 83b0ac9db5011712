"""Autograd and vmap of the ``spatialnorm`` operators, on every device.

Each op is differentiated by an ``autograd.Function`` (with ``setup_context``, ``jvp`` and ``vmap``),
so that it composes with everything PyTorch differentiates with: reverse mode to any order,
forward mode (``torch.autograd.forward_ad``, ``torch.func.jvp``), and the ``torch.func``
transforms (``grad``, ``vjp``, ``jacrev``, ``jacfwd``, ``hessian``, ``vmap`` of them). The forward's
backward is the gradient op (a kernel); the rest are composites in torch_spatialnorm/_derivatives.py.
The Python API calls the Functions through :func:`call_forward` and :func:`call_gradient`; the
ops' own Autograd kernels run them for calls of ``torch.ops.spatialnorm.*``. Calls that need no
derivative skip the Function and go straight to the kernel.
"""

import torch
from torch._functorch.utils import unwrap_dead_wrappers
from torch.autograd import forward_ad
from torch.autograd.function import _SingleLevelFunction

from . import _C  # noqa: F401  (registers the schema)
from ._derivatives import Settings, forward_jvp, gradient_jvp, gradient_vjp
from ._export import forward_composite_op

forward_op = torch.ops.spatialnorm.forward.default
backward_op = torch.ops.spatialnorm.backward.default


def _below_autograd(op, *args):
    with torch._C._AutoDispatchBelowAutograd():
        return op(*args)


def _call(function, op, tensor_count, *args):
    """``op`` on ``args``, differentiable in every mode, with the least overhead per call."""
    if torch.compiler.is_compiling():  # traced as one op; its Autograd kernel runs the Function
        return op(*args)
    # A torch.func transform must meet the Function before the dispatcher does (it cannot run one
    # from an Autograd kernel); plain autograd gains a dispatch into Python by meeting it here too.
    if torch._C._are_functorch_transforms_active() or _needs_derivatives(args[:tensor_count]):
        return function.apply(*args)
    return _below_autograd(op, *args)


def call_forward(input, *settings):
    """spatialnorm::forward, differentiable in every mode; under torch.export the composite that
    exporters can decompose (torch_spatialnorm/_export.py)."""
    if torch.compiler.is_exporting():
        return forward_composite_op(input, *settings)
    return _call(SpatialNormalizationFunction, forward_op, 1, input, *settings)


def call_gradient(grad_output, input, *settings):
    """spatialnorm::backward, differentiable in every mode."""
    return _call(SpatialNormalizationGradientFunction, backward_op, 2, grad_output, input, *settings)


def _batched(op, tensor_count):
    """The vmap rule of ``op``, whose first ``tensor_count`` arguments are images: planes are
    independent, so the vmapped dimension joins the batch dimension and ``op`` runs once."""

    def rule(info, in_dims, *args):
        images, settings = args[:tensor_count], args[tensor_count:]
        images = [
            image.movedim(dim, 0) if dim is not None else image.expand(info.batch_size, *image.shape)
            for image, dim in zip(images, in_dims)
        ]
        shape = images[0].shape
        if len(shape) == 5:  # (B, N, C, H, W): one batch of B*N images
            images = [image.flatten(0, 1) for image in images]
        return op(*images, *settings).reshape(shape), 0

    return rule


_forward_vmap = _batched(call_forward, 1)
_gradient_vmap = _batched(call_gradient, 2)


class _PositionalFunction(torch.autograd.Function):
    """An autograd.Function called with positional arguments only. ``Function.apply`` binds them
    to ``forward``'s signature with ``inspect`` on every call, which takes longer than the kernel
    on a small image; that binding is only needed by the torch.func transforms, so it is skipped
    while none is active."""

    @classmethod
    def apply(cls, *args):
        if torch._C._are_functorch_transforms_active():
            return super().apply(*args)
        return super(_SingleLevelFunction, cls).apply(*unwrap_dead_wrappers(args))


class SpatialNormalizationFunction(_PositionalFunction):
    @staticmethod
    def forward(input, *settings):
        return _below_autograd(forward_op, input, *settings)

    @staticmethod
    def setup_context(ctx, inputs, output):
        input, *settings = inputs
        ctx.settings = settings
        ctx.save_for_backward(input)
        ctx.save_for_forward(input)

    @staticmethod
    def backward(ctx, grad_output):
        (input,) = ctx.saved_tensors
        return call_gradient(grad_output, input, *ctx.settings), None, None, None, None, None

    @staticmethod
    def jvp(ctx, input_tangent, *_):
        (input,) = ctx.saved_tensors
        return forward_jvp(Settings(*ctx.settings), input, input_tangent)

    vmap = staticmethod(_forward_vmap)


class SpatialNormalizationGradientFunction(_PositionalFunction):
    @staticmethod
    def forward(grad_output, input, *settings):
        return _below_autograd(backward_op, grad_output, input, *settings)

    @staticmethod
    def setup_context(ctx, inputs, output):
        grad_output, input, *settings = inputs
        ctx.settings = settings
        ctx.save_for_backward(grad_output, input)
        ctx.save_for_forward(grad_output, input)

    @staticmethod
    def backward(ctx, v):
        grad_output, input = ctx.saved_tensors
        return (*gradient_vjp(Settings(*ctx.settings), grad_output, input, v), None, None, None, None, None)

    @staticmethod
    def jvp(ctx, grad_output_tangent, input_tangent, *_):
        grad_output, input = ctx.saved_tensors
        return gradient_jvp(Settings(*ctx.settings), grad_output, input, grad_output_tangent, input_tangent)

    vmap = staticmethod(_gradient_vmap)


def _needs_derivatives(tensors) -> bool:
    """Whether a call may be differentiated, by reverse mode or by forward mode (a dual level is open)."""
    return (torch.is_grad_enabled() and any(t.requires_grad for t in tensors)) or forward_ad._current_level >= 0


def _autograd_kernel(function, op, tensor_count):
    """The op's Autograd kernel, for calls of the op itself (torch.ops.spatialnorm.*)."""

    def kernel(keyset, *args):
        if _needs_derivatives(args[:tensor_count]):
            return function.apply(*args)
        with torch._C._AutoDispatchBelowAutograd():
            return op.redispatch(keyset & torch._C._after_autograd_keyset, *args)

    return kernel


_library = torch.library.Library("spatialnorm", "IMPL")
_library.impl("forward", _autograd_kernel(SpatialNormalizationFunction, forward_op, 1), "Autograd", with_keyset=True)
_library.impl(
    "backward", _autograd_kernel(SpatialNormalizationGradientFunction, backward_op, 2), "Autograd", with_keyset=True
)
torch.library.register_vmap("spatialnorm::forward", _forward_vmap, lib=_library)
torch.library.register_vmap("spatialnorm::backward", _gradient_vmap, lib=_library)
