"""Every switch of longvit, in one place (as timm's ``layers/config.py``).

Environment variables (``LONGVIT_TRITON`` and ``LONGVIT_FUSED_NORM`` are read once, when longvit
is imported; the others when first needed):

- ``LONGVIT_TRITON=0``: no Triton kernels for the attention's branch data movement
  (``attention/strided_ops.py``) and the extractor's fused preprocessing; ATen does the same
  work. Default on (they apply on CUDA only).
- ``LONGVIT_FUSED_NORM=0``: no compiled one-kernel LayerNorm in ``models.layers.LinearInputNorm``
  (default on, CUDA only).
- ``LONGVIT_FA4_REPLAY=1`` / ``0``: replay FlashAttention-4's recorded launches, or never
  (``attention/backends/fa4_launch.py``); unset: replay on the flash-attn-4 versions tested.
- ``TRITON_INTERPRET=1`` (Triton's own): the kernels run on CPU tensors under Triton's
  interpreter (how the tests check them without a GPU).

The functions below read and set them for this process.

The fallback rule, the one rule for every fast path that can fail where it is not tested
(a GPU or toolchain Triton cannot compile for, an optional kernel package):
a fast path that raises is switched off for the rest of the process with one warning (naming
it and the switch that turns it off without the warning),
and the same work is done again on the next path, with the same values:

- a Triton launch: ATen's kernels (``TritonFallbackWarning``; ``fall_back("triton", ...)``);
- the compiled LayerNorm: ATen's (``fall_back("fused_norm", ...)``);
- a backend that ``backend="auto"`` chose (FlashAttention-4): the next backend in
  ``attention.backends.AUTO_ORDER`` (``BackendFallbackWarning``; ``backends.drop_backend``,
  which also forgets the remembered plans). An explicitly named backend raises instead.

Setting a switch (``set_triton(True)``, ``set_fused_norm(True)``) clears its failure: the next
call tries the fast path again.
"""

from __future__ import annotations

import os
import warnings

_ON = {
    "triton": os.environ.get("LONGVIT_TRITON", "1") != "0",
    "fused_norm": os.environ.get("LONGVIT_FUSED_NORM", "1") != "0",
}
_FAILED: dict[str, bool] = {"triton": False, "fused_norm": False}


def use_triton() -> bool:
    """Whether longvit's Triton kernels may run (LONGVIT_TRITON, ``set_triton``, no failure)."""
    return _ON["triton"] and not _FAILED["triton"]


def set_triton(enable: bool = True) -> None:
    """Turn longvit's Triton kernels on or off for this process (clears a failure)."""
    _ON["triton"] = bool(enable)
    _FAILED["triton"] = False


def use_fused_norm() -> bool:
    """Whether ``LinearInputNorm`` may use its compiled LayerNorm on CUDA (LONGVIT_FUSED_NORM,
    ``set_fused_norm``; a failure is reported by ``failed("fused_norm")``)."""
    return _ON["fused_norm"]


def set_fused_norm(enable: bool = True) -> None:
    """Turn the compiled LayerNorm on or off for this process (clears a failure)."""
    _ON["fused_norm"] = bool(enable)
    _FAILED["fused_norm"] = False


def failed(switch: str) -> bool:
    """Whether the fast path ``switch`` ("triton", "fused_norm") failed in this process."""
    return _FAILED[switch]


def fall_back(switch: str, message: str, category: type[Warning], stacklevel: int = 3) -> None:
    """The fallback rule for ``switch``: mark it failed for the process and warn once."""
    _FAILED[switch] = True
    warnings.warn(message, category, stacklevel=stacklevel + 1)


def fa4_replay() -> bool | None:
    """LONGVIT_FA4_REPLAY: True (=1) or False (=0) forces FA4 launch replays; None when unset."""
    forced = os.environ.get("LONGVIT_FA4_REPLAY")
    return None if forced is None else forced != "0"


def triton_interpret() -> bool:
    """TRITON_INTERPRET=1: Triton's interpreter runs the kernels on CPU tensors."""
    return os.environ.get("TRITON_INTERPRET") == "1"
