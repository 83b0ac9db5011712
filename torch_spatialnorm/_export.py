"""``spatialnorm::forward_composite``: the forward as a composite of core ATen ops, for programs
that leave PyTorch.

Under ``torch.export`` the Python API emits this op instead of ``spatialnorm::forward``. It is a
CompositeImplicitAutograd op, so the exported program keeps it as one node, and
``run_decompositions()`` (which ``torch.onnx.export`` and Core ML's converter run too) replaces it
with pad, average pooling, pow, where and mul, which every exporter knows. Everywhere else,
eager and ``torch.compile``, the forward's kernels stay the path.

The window sum is an average pool over the squares padded with the window's reach (clipped to the
image as the kernels clip it) times the pool's size: plain ``avg_pool2d``, as exporters without
``divisor_override`` (ONNX) need it.
"""

import torch
import torch.nn.functional as F

from ._validation import check_forward_arguments
from .reference import padded_for_windows, power

torch.library.define(
    "spatialnorm::forward_composite",
    "(Tensor input, int kernel_width, int kernel_height, float alpha, float beta, float delta) -> Tensor",
)


@torch.library.impl("spatialnorm::forward_composite", "CompositeImplicitAutograd")
def forward_composite(input, kernel_width, kernel_height, alpha, beta, delta):
    check_forward_arguments(input, kernel_width, kernel_height, alpha, beta, delta)
    x = input.float() if input.dtype in (torch.float16, torch.bfloat16) else input  # as the kernels compute
    if alpha == 0:  # T = delta, whatever the window holds
        t = torch.full_like(x, delta)
    else:
        padded, pool = padded_for_windows(x * x, kernel_width, kernel_height)
        mean = F.avg_pool2d(padded, pool, stride=1)
        t = delta + mean * (alpha * pool[0] * pool[1] / (kernel_width * kernel_height))
    return (x * power(t, -beta)).to(input.dtype)


forward_composite_op = torch.ops.spatialnorm.forward_composite.default
