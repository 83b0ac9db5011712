"""The derivatives the kernels do not compute, as composites of PyTorch ops (docs/definition.md,
"Derivatives"): the forward-mode derivative (jvp) of both ops and the reverse-mode derivative of
the gradient op. Being made of differentiable PyTorch ops, they differentiate again to any order.

Notation: T = delta + a*W(X^2), P = T^-beta, Q = T^(-beta-1), a = alpha/(kw*kh), c = 2*a*beta;
W is the forward's window sum and M its mirror image. The gradient op is dX = dY*P - c*X*M(dY*X*Q).
With alpha or beta 0 (c = 0), dX = dY*P and P does not depend on X, whatever X holds.
"""

from dataclasses import dataclass

import torch

from . import reference


@dataclass(frozen=True)
class Settings:
    kernel_width: int
    kernel_height: int
    alpha: float
    beta: float
    delta: float

    @property
    def a(self):
        return self.alpha / (self.kernel_width * self.kernel_height)

    @property
    def c(self):
        return 2.0 * self.a * self.beta

    def window_sum(self, x, mirrored=False):
        return reference.window_sum(x, self.kernel_width, self.kernel_height, mirrored=mirrored)

    def denominator(self, x):
        return reference.denominator(x, self.kernel_width, self.kernel_height, self.alpha, self.delta)


def _in_compute_dtype(function):
    """Runs ``function`` on float32 copies of 16-bit tensors (None stays None) and casts its
    results back; every tensor argument shares one dtype."""

    def wrapped(settings, *tensors):
        dtype = next(t.dtype for t in tensors if t is not None)
        compute = torch.promote_types(dtype, torch.float32)
        results = function(settings, *(None if t is None else t.to(compute) for t in tensors))
        return tuple(r.to(dtype) for r in results) if isinstance(results, tuple) else results.to(dtype)

    return wrapped


@_in_compute_dtype
def forward_jvp(s: Settings, x, x_dot):
    """Tangent of Y = X*P along X': X'*P - c*X*Q*W(X*X')."""
    if x.numel() == 0:  # (window sums of an empty image are empty, but pooling refuses one)
        return torch.zeros_like(x)
    t = s.denominator(x)
    p = reference.power(t, -s.beta)
    if s.c == 0:
        return x_dot * p
    q = reference.power(t, -s.beta - 1.0)
    return x_dot * p - s.c * x * q * s.window_sum(x * x_dot)


@_in_compute_dtype
def gradient_jvp(s: Settings, dy, x, dy_dot, x_dot):
    """Tangent of dX along (dY', X') (either may be None, meaning zero):
    dY'*P + dY*P' - c*(X'*R + X*R'), with R = M(dY*X*Q), T' = 2a*W(X*X'), P' = -beta*Q*T',
    Q' = -(beta+1)*T^(-beta-2)*T' and R' = M(dY'*X*Q + dY*X'*Q + dY*X*Q')."""
    if x.numel() == 0:
        return torch.zeros_like(x)
    t = s.denominator(x)
    p = reference.power(t, -s.beta)
    tangent = torch.zeros_like(x) if dy_dot is None else dy_dot * p
    if s.c == 0:
        return tangent
    q = reference.power(t, -s.beta - 1.0)
    terms_dot = torch.zeros_like(x) if dy_dot is None else dy_dot * x * q
    if x_dot is not None:
        t_dot = 2.0 * s.a * s.window_sum(x * x_dot)
        tangent = tangent - s.beta * dy * q * t_dot - s.c * x_dot * s.window_sum(dy * x * q, mirrored=True)
        q_dot = -(s.beta + 1.0) * reference.power(t, -s.beta - 2.0) * t_dot
        terms_dot = terms_dot + dy * x_dot * q + dy * x * q_dot
    return tangent - s.c * x * s.window_sum(terms_dot, mirrored=True)


@_in_compute_dtype
def gradient_vjp(s: Settings, dy, x, v):
    """Gradients of <V, dX> with respect to dY and X. With U = W(X*V):
    d/d(dY) = V*P - c*X*Q*U;  d/dT = -beta*V*dY*Q + c*(beta+1)*U*dY*X*Q/T;
    d/dX = -c*V*M(dY*X*Q) - c*U*dY*Q + 2a*X*M(d/dT)."""
    if x.numel() == 0:
        return torch.zeros_like(dy), torch.zeros_like(x)
    t = s.denominator(x)
    p = reference.power(t, -s.beta)
    if s.c == 0:
        return v * p, torch.zeros_like(x)
    q = reference.power(t, -s.beta - 1.0)
    u = s.window_sum(x * v)
    grad_dy = v * p - s.c * x * q * u
    grad_t = -s.beta * v * dy * q + s.c * (s.beta + 1.0) * u * dy * x * q / t
    grad_x = -s.c * v * s.window_sum(dy * x * q, mirrored=True) - s.c * u * dy * q + 2.0 * s.a * x * s.window_sum(grad_t, mirrored=True)
    return grad_dy, grad_x
