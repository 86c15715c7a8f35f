"""Dense attention kernels behind one interface that returns the log-sum-exp.

One file per backend; ``base.py`` states the interface (``Backend``: forward returns
(out, lse, state), backward takes the merged output and LSE of all branches).

- ``math``: pure PyTorch, any device and dtype (the reference and CPU path): ``math.py``.
- ``cpu_flash``: aten's fused CPU kernel, no materialised scores: ``cpu_flash.py``.
- ``cudnn``, ``flash``, ``efficient``: PyTorch's fused CUDA kernels: ``fused_cuda.py``.
- ``flash_attn``: the flash-attn package, when importable (optional extra): ``flash_attn.py``.
- ``fa4``: FlashAttention-4 (``flash_attn.cute``) on Hopper and Blackwell GPUs, when importable
  (optional extra ``longvit[fa4]``): ``fa4.py``, its launches replayed by ``fa4_launch.py``.

``resolve_backend("auto", ...)`` takes the first backend of ``AUTO_ORDER`` that runs the inputs.

The fallback rule (``longvit.config`` states it for every fast path): a backend that "auto"
chose and that raises (only optional ones, FlashAttention-4, are given this chance) is dropped
for the rest of the process with one ``BackendFallbackWarning`` (``drop_backend``, which also
forgets the remembered plans), and the call runs again on the next backend in AUTO_ORDER
(``plan.run_with_fallback``). A backend named explicitly raises its errors.
"""

from __future__ import annotations

import torch

from longvit.attention.backends.base import (
    NO_KEY_LSE,
    Backend,
    BackendFallbackWarning,
    KernelState,
    accumulator_dtype,
    default_scale,
    drop_backend,
)
from longvit.attention.backends.cpu_flash import CpuFlashBackend
from longvit.attention.backends.fa4 import FlashAttn4Backend
from longvit.attention.backends.flash_attn import FlashAttnBackend
from longvit.attention.backends.fused_cuda import (
    CUDNN,
    EFFICIENT,
    FLASH,
    CudnnBackend,
    EfficientBackend,
    FlashBackend,
)
from longvit.attention.backends.math import MathBackend

__all__ = [
    "AUTO_ORDER",
    "BACKENDS",
    "NO_KEY_LSE",
    "Backend",
    "BackendFallbackWarning",
    "CpuFlashBackend",
    "CudnnBackend",
    "EfficientBackend",
    "FlashAttn4Backend",
    "FlashAttnBackend",
    "FlashBackend",
    "KernelState",
    "MathBackend",
    "accumulator_dtype",
    "default_scale",
    "drop_backend",
    "resolve_backend",
]

BACKENDS: dict[str, Backend] = {
    b.name: b
    for b in (
        MathBackend(),
        CpuFlashBackend(),
        CUDNN,
        FLASH,
        EFFICIENT,
        FlashAttnBackend(),
        FlashAttn4Backend(),
    )
}

# Fastest first, as measured on an H200 (cuDNN > flash > efficient; FA4, when installed,
# beats cuDNN: docs/benchmarks.md).
AUTO_ORDER = ("fa4", "cudnn", "flash", "efficient", "cpu_flash", "math")


def resolve_backend(
    name: str,
    device: torch.device,
    dtype: torch.dtype,
    head_dim: int,
    dropout_p: float,
    needs_grad: bool = False,
) -> Backend:
    """The backend called `name`, or for "auto" the fastest one that runs these inputs."""
    if name == "auto":
        for candidate in AUTO_ORDER:
            b = BACKENDS[candidate]
            if (
                b.failure is None
                and b.available(device, dtype, head_dim)
                and (dropout_p == 0 or b.supports_dropout)
                and (b.supports_backward or not needs_grad)
            ):
                return b
        return BACKENDS["math"]
    if name not in BACKENDS:
        raise ValueError(f"backend must be 'auto' or one of {sorted(BACKENDS)}, got {name!r}")
    b = BACKENDS[name]
    if not b.available(device, dtype, head_dim):
        raise ValueError(
            f"backend={name!r} cannot run {dtype} tensors with head dim {head_dim} on "
            f"{device}; use backend='auto' or 'math'"
        )
    if dropout_p > 0 and not b.supports_dropout:
        raise ValueError(f"backend={name!r} has no attention dropout; use 'auto' or 'math'")
    if needs_grad and not b.supports_backward:
        raise ValueError(
            f"backend={name!r} is forward-only (its backward is not exact for merged "
            "branches); use backend='auto', 'cudnn', 'flash' or 'math' when training"
        )
    return b
