"""``fa4``: FlashAttention-4 (the ``flash-attn-4`` package, ``flash_attn.cute``) on Hopper and
Blackwell GPUs, when importable (optional extra ``longvit[fa4]``). It reads q, k, v through any
aligned strides, so the dilated op hands it a branch's positions in place, no gather.
"""

from __future__ import annotations

import contextlib
import functools

import torch

from longvit.attention.backends import fa4_launch
from longvit.attention.backends.base import Backend, KernelState, accumulator_dtype, drop_backend
from longvit.attention.backends.fused_cuda import CUDNN, FLASH, FusedCudaBackend


class FlashAttn4Backend(FusedCudaBackend):
    """FlashAttention-4 (``flash-attn-4``: ``flash_attn.cute``), Hopper (sm90) and Blackwell
    (sm100) GPUs, bf16/fp16, head dim a multiple of 8. On an H200 it runs 10-19% faster than
    cuDNN at head dim 64 (docs/benchmarks.md). Its layout is (B', L, H, D) with any strides
    aligned to 16 bytes, and it writes into given out/LSE/gradient tensors: the dilated op
    runs it on a branch's strided positions in place (``forward_into``/``backward_into``)."""

    name = "fa4"
    supports_dropout = False
    reads_strided = True
    optional = True

    def available(self, device, dtype, head_dim):
        if not (super().available(device, dtype, head_dim) and head_dim % 8 == 0):
            return False
        if torch.compiler.is_compiling():  # its CuTe DSL calls are not traceable
            return False
        major = torch.cuda.get_device_capability(device)[0]
        return major in (9, 10) and fa4_interface() is not None

    # Calls with a key bias (masked or padded branches, the general path) go to cuDNN, or
    # PyTorch's flash kernel above head dim 128: the bias channel makes the head dim 8k + 8
    # (72 for 64), where FA4's backward gave dq off by 70-80% on an H200 (flash-attn-4
    # 4.0.0b36; docs/benchmarks.md).
    def forward(self, q, k, v, key_bias, causal, dropout_p, scale):
        if key_bias is not None:
            return self._masked(q).forward(q, k, v, key_bias, causal, dropout_p, scale)
        return super().forward(q, k, v, key_bias, causal, dropout_p, scale)

    def backward(self, dout, q, k, v, out, lse, key_bias, causal, dropout_p, scale, state):
        if key_bias is not None:
            masked = self._masked(q)
            return masked.backward(dout, q, k, v, out, lse, key_bias, causal, dropout_p, scale,
                                   state)  # fmt: skip
        return super().backward(dout, q, k, v, out, lse, key_bias, causal, dropout_p, scale, state)

    @staticmethod
    def _masked(q) -> Backend:
        cudnn = CUDNN
        return cudnn if cudnn.available(q.device, q.dtype, q.shape[-1]) else FLASH

    def _forward(self, q, k, v, causal, dropout_p, scale):
        t = [x.transpose(1, 2) for x in (q, k, v)]
        out = torch.empty_like(t[0], memory_format=torch.contiguous_format)
        lse = q.new_empty(q.shape[:3], dtype=accumulator_dtype(q.dtype))  # float32 on a GPU
        self._run_forward(*t, out, lse, causal, scale)
        return out.transpose(1, 2), lse, KernelState()

    def _backward(self, dout, q, k, v, out, lse, causal, dropout_p, scale, state):
        t = [x.transpose(1, 2) for x in (dout, q, k, v, out)]
        grads = [torch.empty_like(x) for x in t[1:4]]
        self._run_backward(*t, lse, *grads, causal, scale)
        return tuple(g.transpose(1, 2) for g in grads)

    def forward_into(self, q, k, v, out, lse, causal, scale) -> None:
        """q, k, v, out (B', L, H, D) and lse (B', H, L) float32, any aligned strides."""
        self._run_forward(q, k, v, out, lse, causal, scale)

    def backward_into(self, dout, q, k, v, out, lse, dq, dk, dv, causal, scale) -> None:
        """Gradients of one call written into dq, dk, dv (B', L, H, D); lse is the merged
        LSE (B', H, L) of the positions, out the merged output."""
        self._run_backward(dout, q, k, v, out, lse, dq, dk, dv, causal, scale)

    def _run_forward(self, q, k, v, out, lse, causal, scale) -> None:
        """FA4's forward on (B', L, H, D) tensors, on their GPU, into out and lse."""
        tensors = {"q": q, "k": k, "v": v, "out": out, "lse": lse}
        flags = {"softmax_scale": scale, "causal": causal, "return_lse": True}
        with on_device_of(q):
            fa4_call(fa4_interface()._flash_attn_fwd, tensors, flags)

    def _run_backward(self, dout, q, k, v, out, lse, dq, dk, dv, causal, scale) -> None:
        """FA4's backward on (B', L, H, D) tensors, on their GPU, into dq, dk, dv. Under
        torch.use_deterministic_algorithms it does not sum dq with atomics (as torch's own
        FA4 hook)."""
        tensors = {"q": q, "k": k, "v": v, "out": out, "dout": dout, "lse": lse, "dq": dq,
                   "dk": dk, "dv": dv}  # fmt: skip
        flags = {
            "softmax_scale": scale,
            "causal": causal,
            "deterministic": torch.are_deterministic_algorithms_enabled(),
        }
        with on_device_of(q), self._explained():
            fa4_call(fa4_interface()._flash_attn_bwd, tensors, flags)

    @contextlib.contextmanager
    def _explained(self):
        """A failing backward cannot fall back (the forward ran on FA4): say what to do, and
        drop FA4 from auto for the next steps."""
        try:
            yield
        except torch.OutOfMemoryError:
            raise
        except Exception as e:
            if self.failure is None:
                drop_backend(self, e)
            raise RuntimeError(
                f"FlashAttention-4's backward failed ({type(e).__name__}: {e}); backend='auto' "
                "takes the next backend from the next forward on. Pass backend='cudnn' to skip "
                "FlashAttention-4."
            ) from e


def on_device_of(x: torch.Tensor):
    """x's GPU as the current device (FA4 launches on the current device's stream)."""
    if x.device.index is None or x.device.index == torch.cuda.current_device():
        return contextlib.nullcontext()
    return torch.cuda.device(x.device)


def fa4_call(fn, tensors: dict, flags: dict) -> None:
    """fn(**tensors, **flags), replayed from a record of its launches where it can be
    (``fa4_launch``: ~0.1 ms less host time per call)."""
    launches = fa4_launches()
    if launches is None:
        fn(**tensors, **flags)
    else:
        launches.call(fn, tensors, flags)


@functools.cache
def fa4_launches():
    """The record of FA4's launches per call signature, or None where replays are off."""
    if fa4_interface() is None or not fa4_launch.replay_enabled(fa4_launch.fa4_version()):
        return None
    return fa4_launch.Launches(fa4_interface())


@functools.cache
def fa4_interface():
    """flash_attn.cute.interface, or None where FlashAttention-4 does not import (not
    installed, or its CuTe DSL cannot load on this machine: then a warning says why)."""
    try:
        from flash_attn.cute import interface  # type: ignore[import-not-found]
    except ImportError:
        return None
    except Exception as e:  # noqa: BLE001  (the DSL checks the CUDA driver on import)
        import warnings

        warnings.warn(
            f"flash-attn-4 is installed but does not load ({e}); using cuDNN", stacklevel=2
        )
        return None
    return interface
