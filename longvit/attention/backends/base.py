"""What every backend is: the interface, its state, and the helpers they share.

A backend takes q, k, v of shape (B', H, L, D) (any strides with the last dim contiguous), an
optional additive key bias (B', H, 1, L) holding 0 or -inf, and returns (out (B', H, L, D),
lse (B', H, L) float32 (float64 for float64 inputs), state). Its backward takes the *merged*
output and LSE of all branches (that is what makes the dilated-attention gradient exact, as in
ring attention) and returns dq, dk, dv.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass, field
from typing import Any

import torch

from longvit.attention import caches

# Rows of the merged LSE with no key at all are given this value in the backward,
# so that exp(score - lse) is exactly 0 there.
NO_KEY_LSE = 1e30


@dataclass
class KernelState:
    """What a backend's backward needs from its forward (RNG state, sizes)."""

    extras: dict[str, Any] = field(default_factory=dict)


class BackendFallbackWarning(RuntimeWarning):
    """An optional backend (FlashAttention-4) failed, and ``backend="auto"`` went on with the
    next one for the rest of the process."""


class Backend:
    name = "base"
    supports_dropout = True
    # An optional package's kernels (FA4): if a call chosen by "auto" fails, the op warns once,
    # drops the backend for this process (``failure`` says why) and runs the call again on the
    # next one. Explicit requests (backend="fa4") still use it and raise its errors.
    optional = False
    failure: str | None = None
    # Whether backward() is exact when handed the merged output and LSE of all branches.
    supports_backward = True
    # Whether forward_into/backward_into read strided (B', L, H, D) windows in place: the
    # dilated op then passes a branch's positions without gathering them.
    reads_strided = False

    def available(self, device: torch.device, dtype: torch.dtype, head_dim: int) -> bool:
        raise NotImplementedError

    def forward(self, q, k, v, key_bias, causal, dropout_p, scale):
        raise NotImplementedError

    def backward(self, dout, q, k, v, out, lse, key_bias, causal, dropout_p, scale, state):
        raise NotImplementedError


def accumulator_dtype(dtype: torch.dtype) -> torch.dtype:
    """Dtype of LSEs and merged outputs: float64 stays float64 (exact checks), else float32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def like(x: torch.Tensor, ref: torch.Tensor) -> torch.Tensor:
    """x copied into ref's memory layout (strides)."""
    y = torch.empty_strided(ref.shape, ref.stride(), dtype=x.dtype, device=x.device)
    y.copy_(x)
    return y


def default_scale(head_dim: int, scale: float | None) -> float:
    """The softmax scale: 1 / sqrt(head_dim) unless given."""
    return 1.0 / math.sqrt(head_dim) if scale is None else float(scale)


def drop_backend(backend: Backend, error: BaseException) -> None:
    """Stop ``auto`` from choosing an optional backend after it failed (warns once), and
    forget the remembered plans that chose it (``caches.forget_all``)."""
    backend.failure = f"{type(error).__name__}: {error}"
    caches.forget_all()
    warnings.warn(
        f"backend {backend.name!r} failed ({backend.failure[:500]}); backend='auto' uses the "
        f"next one from now on. Pass backend='cudnn' to skip it.",
        BackendFallbackWarning,
        stacklevel=3,
    )
