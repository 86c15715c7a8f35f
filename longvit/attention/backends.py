"""Dense attention kernels behind one interface that returns the log-sum-exp.

Every backend takes q, k, v of shape (B', H, L, D) (any strides with the last
dim contiguous), an optional additive key bias (B', H, 1, L) holding 0 or -inf,
and returns (out (B', H, L, D), lse (B', H, L) float32 (float64 for float64
inputs), state). Its backward
takes the *merged* output and LSE of all branches (that is what makes the
dilated-attention gradient exact, as in ring attention) and returns dq, dk, dv.

Backends:
- ``math``: pure PyTorch, any device and dtype (the reference and CPU path).
- ``cpu_flash``: aten's fused CPU kernel, no materialised scores.
- ``cudnn``, ``flash``, ``efficient``: PyTorch's fused CUDA kernels.
- ``flash_attn``: the flash-attn package, when importable (optional extra).
- ``fa4``: FlashAttention-4 (the ``flash-attn-4`` package, ``flash_attn.cute``) on Hopper and
  Blackwell GPUs, when importable (optional extra ``longvit[fa4]``). It reads q, k, v through
  any aligned strides, so the dilated op hands it a branch's positions in place, no gather.

Masked keys on the fused CUDA kernels are handled without a mask argument:
q gets one extra channel of ones and k one of (0 or a large negative number),
so the kernel adds the bias itself and stays on its fastest, mask-free path.
"""

from __future__ import annotations

import contextlib
import functools
import math
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F

aten = torch.ops.aten

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


# --------------------------------------------------------------------------- math
class MathBackend(Backend):
    """Pure PyTorch; scores are materialised one block of queries at a time."""

    name = "math"
    block_bytes = 256 * 2**20

    def available(self, device, dtype, head_dim):
        return dtype.is_floating_point

    @staticmethod
    def _compute_dtype(dtype):
        return dtype if dtype in (torch.float32, torch.float64) else torch.float32

    def _blocks(self, q):
        bp, h, length, _ = q.shape
        rows = max(1, self.block_bytes // max(1, bp * h * length * 4))
        return range(0, length, rows), rows

    def _scores(self, q, k, key_bias, causal, scale, start, stop):
        ct = self._compute_dtype(q.dtype)
        s = torch.matmul(q[:, :, start:stop].to(ct), k.to(ct).transpose(-1, -2)) * scale
        if key_bias is not None:
            s = s + key_bias.to(ct)
        if causal:
            qi = torch.arange(start, stop, device=q.device)[:, None]
            ki = torch.arange(k.shape[2], device=q.device)[None, :]
            s = s.masked_fill(ki > qi, float("-inf"))
        return s

    @staticmethod
    def _dropout_mask(seed, shape, device, dropout_p, start):
        gen = torch.Generator(device=device)
        gen.manual_seed(seed + 1_000_003 * start)
        keep = torch.rand(shape, generator=gen, device=device) >= dropout_p
        return keep.to(torch.float32) / (1.0 - dropout_p)

    def forward(self, q, k, v, key_bias, causal, dropout_p, scale):
        ct = self._compute_dtype(q.dtype)
        bp, h, length, _ = q.shape
        out = torch.empty(bp, h, length, v.shape[-1], dtype=q.dtype, device=q.device)
        lse = torch.empty(bp, h, length, dtype=ct, device=q.device)
        seed = int(torch.randint(0, 2**62, (1,)).item()) if dropout_p > 0 else 0
        blocks, rows = self._blocks(q)
        for start in blocks:
            stop = min(start + rows, length)
            s = self._scores(q, k, key_bias, causal, scale, start, stop)
            m = s.amax(dim=-1, keepdim=True)
            m = torch.where(torch.isinf(m), torch.zeros_like(m), m)
            p = torch.exp(s - m)
            z = p.sum(dim=-1, keepdim=True)
            lse_blk = (torch.log(z) + m).squeeze(-1)
            p = p / torch.where(z == 0, torch.ones_like(z), z)
            if dropout_p > 0:
                p = p * self._dropout_mask(seed, p.shape, q.device, dropout_p, start).to(ct)
            out[:, :, start:stop] = torch.matmul(p, v.to(ct)).to(q.dtype)
            lse[:, :, start:stop] = lse_blk
        return out, lse, KernelState({"seed": seed})

    def backward(self, dout, q, k, v, out, lse, key_bias, causal, dropout_p, scale, state):
        ct = self._compute_dtype(q.dtype)
        dq = torch.empty(q.shape, dtype=q.dtype, device=q.device)
        dk = torch.zeros(k.shape, dtype=ct, device=q.device)
        dv = torch.zeros(v.shape, dtype=ct, device=q.device)
        length = q.shape[2]
        blocks, rows = self._blocks(q)
        kc, vc = k.to(ct), v.to(ct)
        for start in blocks:
            stop = min(start + rows, length)
            s = self._scores(q, k, key_bias, causal, scale, start, stop)
            p = torch.exp(s - lse[:, :, start:stop, None].to(ct))  # merged probabilities
            do = dout[:, :, start:stop].to(ct)
            dp = torch.matmul(do, vc.transpose(-1, -2))
            if dropout_p > 0:
                z = self._dropout_mask(state.extras["seed"], p.shape, q.device, dropout_p, start)
                z = z.to(ct)
                dv += torch.matmul((p * z).transpose(-1, -2), do)
                dp = dp * z
            else:
                dv += torch.matmul(p.transpose(-1, -2), do)
            delta = (do * out[:, :, start:stop].to(ct)).sum(-1, keepdim=True)
            ds = p * (dp - delta) * scale
            dq[:, :, start:stop] = torch.matmul(ds, kc).to(q.dtype)
            dk += torch.matmul(ds.transpose(-1, -2), q[:, :, start:stop].to(ct))
        return dq, dk.to(k.dtype), dv.to(v.dtype)


# ---------------------------------------------------------------------- cpu flash
class CpuFlashBackend(Backend):
    """aten::_scaled_dot_product_flash_attention_for_cpu and its backward op."""

    name = "cpu_flash"
    supports_dropout = False

    def available(self, device, dtype, head_dim):
        return device.type == "cpu" and dtype in (
            torch.float64,
            torch.float32,
            torch.bfloat16,
            torch.float16,
        )

    @staticmethod
    def _mask(key_bias, q):
        if key_bias is None:
            return None
        return key_bias.to(q.dtype).expand(-1, -1, q.shape[2], -1)

    def forward(self, q, k, v, key_bias, causal, dropout_p, scale):
        out, lse = aten._scaled_dot_product_flash_attention_for_cpu(
            q, k, v, 0.0, causal, attn_mask=self._mask(key_bias, q), scale=scale
        )
        return out, lse, KernelState()

    def backward(self, dout, q, k, v, out, lse, key_bias, causal, dropout_p, scale, state):
        dq, dk, dv = aten._scaled_dot_product_flash_attention_for_cpu_backward(
            dout.contiguous(), q, k, v, out, lse.to(accumulator_dtype(q.dtype)), 0.0, causal,
            attn_mask=self._mask(key_bias, q), scale=scale,
        )  # fmt: skip
        return dq, dk, dv


# --------------------------------------------------------------------- CUDA fused
def _bias_channel(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, key_bias: torch.Tensor, scale: float
):
    """Fold a (B', H, 1, L) key bias of 0/-inf into one extra q/k channel (D padded to 8)."""
    d = q.shape[-1]
    d_new = (d + 1 + 7) // 8 * 8
    big = 6.0e4 if q.dtype == torch.float16 else 1.0e6
    big = min(big, 1.0e4 / scale)
    masked = torch.isinf(key_bias.squeeze(2))  # (B', H, L)
    qa = F.pad(q, (0, d_new - d))
    qa[..., d] = 1.0
    ka = F.pad(k, (0, d_new - d))
    ka[..., d] = torch.where(masked, -big, 0.0).to(k.dtype)
    va = F.pad(v, (0, d_new - d))
    return qa, ka, va


class _FusedCuda(Backend):
    """Shared handling of the key bias for the mask-free fused CUDA kernels."""

    dtypes: tuple[torch.dtype, ...] = (torch.float16, torch.bfloat16)
    max_head_dim = 256

    def available(self, device, dtype, head_dim):
        return device.type == "cuda" and dtype in self.dtypes and head_dim <= self.max_head_dim

    def forward(self, q, k, v, key_bias, causal, dropout_p, scale):
        d = q.shape[-1]
        if key_bias is not None:
            q, k, v = _bias_channel(q, k, v, key_bias, scale)
        out, lse, state = self._forward(q, k, v, causal, dropout_p, scale)
        return out[..., :d], lse, state

    def backward(self, dout, q, k, v, out, lse, key_bias, causal, dropout_p, scale, state):
        d = q.shape[-1]
        if key_bias is not None:
            q, k, v = _bias_channel(q, k, v, key_bias, scale)
            out = F.pad(out, (0, q.shape[-1] - d))
            dout = F.pad(dout, (0, q.shape[-1] - d))
        dq, dk, dv = self._backward(dout, q, k, v, out, lse, causal, dropout_p, scale, state)
        return dq[..., :d], dk[..., :d], dv[..., :d]


class FlashBackend(_FusedCuda):
    name = "flash"

    def _forward(self, q, k, v, causal, dropout_p, scale):
        res = aten._scaled_dot_product_flash_attention(
            q, k, v, dropout_p, causal, False, scale=scale
        )
        out, lse, cq, ck, mq, mk, seed, offset = res[:8]
        return (
            out,
            lse,
            KernelState({"cq": cq, "ck": ck, "mq": mq, "mk": mk, "rng": (seed, offset)}),
        )

    def _backward(self, dout, q, k, v, out, lse, causal, dropout_p, scale, state):
        e = state.extras
        return aten._scaled_dot_product_flash_attention_backward(
            dout, q, k, v, out, lse, e["cq"], e["ck"], e["mq"], e["mk"], dropout_p, causal,
            *e["rng"], scale=scale,
        )  # fmt: skip


class CudnnBackend(_FusedCuda):
    name = "cudnn"

    def available(self, device, dtype, head_dim):
        return (
            super().available(device, dtype, head_dim)
            and head_dim <= 128
            and torch.backends.cuda.cudnn_sdp_enabled()
        )

    def _forward(self, q, k, v, causal, dropout_p, scale):
        res = aten._scaled_dot_product_cudnn_attention(
            q, k, v, None, True, dropout_p, causal, False, scale=scale
        )
        out, lse, cq, ck, mq, mk, seed, offset = res[:8]
        lse = lse.reshape(q.shape[:3])  # some versions return (B', H, L, 1)
        return (
            out,
            lse,
            KernelState({"cq": cq, "ck": ck, "mq": mq, "mk": mk, "rng": (seed, offset)}),
        )

    def _backward(self, dout, q, k, v, out, lse, causal, dropout_p, scale, state):
        e = state.extras
        # cuDNN wants dout laid out like out
        if dout.stride() != out.stride():
            dout = _like(dout, out)
        dq, dk, dv = aten._scaled_dot_product_cudnn_attention_backward(
            dout, q, k, v, out, lse.unsqueeze(-1).contiguous(), *e["rng"], None,
            e["cq"], e["ck"], e["mq"], e["mk"], dropout_p, causal, scale=scale,
        )  # fmt: skip
        return dq, dk, dv


class EfficientBackend(_FusedCuda):
    """Forward only. Its backward op does not honour a merged LSE: measured on an H200
    (torch 2.11), dq was off by 3-64% against the float64 reference whenever more than
    one branch was merged, while one branch alone was exact. So it serves inference;
    training picks cuDNN or flash (bf16/fp16) or math (float32)."""

    name = "efficient"
    dtypes = (torch.float16, torch.bfloat16, torch.float32)
    supports_backward = False

    def _forward(self, q, k, v, causal, dropout_p, scale):
        out, lse, seed, offset = aten._scaled_dot_product_efficient_attention(
            q, k, v, None, True, dropout_p, causal, scale=scale
        )
        padded_len = lse.shape[-1]  # some versions pad the LSE to a multiple of 32
        lse = lse[..., : q.shape[2]]
        return out, lse, KernelState({"rng": (seed, offset), "lse_len": padded_len})

    def _backward(self, dout, q, k, v, out, lse, causal, dropout_p, scale, state):
        e = state.extras
        lse = F.pad(lse, (0, e["lse_len"] - lse.shape[-1])).contiguous()
        dq, dk, dv, _ = aten._scaled_dot_product_efficient_attention_backward(
            dout, q, k, v, None, out, lse, *e["rng"], dropout_p, [True, True, True, False],
            causal, scale=scale,
        )  # fmt: skip
        return dq, dk, dv


def accumulator_dtype(dtype: torch.dtype) -> torch.dtype:
    """Dtype of LSEs and merged outputs: float64 stays float64 (exact checks), else float32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def _like(x: torch.Tensor, ref: torch.Tensor) -> torch.Tensor:
    """x copied into ref's memory layout (strides)."""
    y = torch.empty_strided(ref.shape, ref.stride(), dtype=x.dtype, device=x.device)
    y.copy_(x)
    return y


# ----------------------------------------------------------------- flash-attn pkg
class FlashAttnBackend(_FusedCuda):
    """The flash-attn package (optional extra ``longvit[flash]``); layout (B', L, H, D)."""

    name = "flash_attn"

    def available(self, device, dtype, head_dim):
        return super().available(device, dtype, head_dim) and _flash_attn() is not None

    def _forward(self, q, k, v, causal, dropout_p, scale):
        fa = _flash_attn()
        out, lse, _ = fa.flash_attn_func(
            q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), dropout_p=dropout_p,
            softmax_scale=scale, causal=causal, return_attn_probs=True,
        )  # fmt: skip
        if dropout_p > 0:
            raise NotImplementedError("flash_attn backend: use another backend for dropout")
        return out.transpose(1, 2), lse, KernelState()

    def _backward(self, dout, q, k, v, out, lse, causal, dropout_p, scale, state):
        from flash_attn.flash_attn_interface import _flash_attn_backward

        t = [x.transpose(1, 2) for x in (dout, q, k, v, out)]
        dq, dk, dv = (torch.empty_like(x) for x in t[1:4])
        _flash_attn_backward(
            t[0].contiguous(), *t[1:], lse.contiguous(), dq, dk, dv, dropout_p=0.0,
            softmax_scale=scale, causal=causal, window_size_left=-1, window_size_right=-1,
            softcap=0.0, alibi_slopes=None, deterministic=False,
        )  # fmt: skip
        return dq.transpose(1, 2), dk.transpose(1, 2), dv.transpose(1, 2)


@functools.cache
def _flash_attn():
    try:
        import flash_attn  # type: ignore[import-not-found]
    except ImportError:
        return None
    # flash-attn-4 alone installs flash_attn as a namespace package holding only .cute
    return flash_attn if hasattr(flash_attn, "flash_attn_func") else None


# ---------------------------------------------------------------------- FA4 (cute)
class FlashAttn4Backend(_FusedCuda):
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
        return major in (9, 10) and _fa4() is not None

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
        cudnn = BACKENDS["cudnn"]
        return cudnn if cudnn.available(q.device, q.dtype, q.shape[-1]) else BACKENDS["flash"]

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
        with _on_device_of(q):
            _fa4_call(_fa4()._flash_attn_fwd, tensors, flags)

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
        with _on_device_of(q), self._explained():
            _fa4_call(_fa4()._flash_attn_bwd, tensors, flags)

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


def _on_device_of(x: torch.Tensor):
    """x's GPU as the current device (FA4 launches on the current device's stream)."""
    if x.device.index is None or x.device.index == torch.cuda.current_device():
        return contextlib.nullcontext()
    return torch.cuda.device(x.device)


def _fa4_call(fn, tensors: dict, flags: dict) -> None:
    """fn(**tensors, **flags), replayed from a record of its launches where it can be
    (``fa4_launch``: ~0.1 ms less host time per call)."""
    launches = _fa4_launches()
    if launches is None:
        fn(**tensors, **flags)
    else:
        launches.call(fn, tensors, flags)


@functools.cache
def _fa4_launches():
    """The record of FA4's launches per call signature, or None where replays are off."""
    from longvit.attention import fa4_launch

    if _fa4() is None or not fa4_launch.replay_enabled(fa4_launch.fa4_version()):
        return None
    return fa4_launch.Launches(_fa4())


@functools.cache
def _fa4():
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


# ------------------------------------------------------------------------ registry
BACKENDS: dict[str, Backend] = {
    b.name: b
    for b in (
        MathBackend(),
        CpuFlashBackend(),
        CudnnBackend(),
        FlashBackend(),
        EfficientBackend(),
        FlashAttnBackend(),
        FlashAttn4Backend(),
    )
}

# Fastest first, as measured on an H200 (cuDNN > flash > efficient; FA4, when installed,
# beats cuDNN: docs/benchmarks.md).
AUTO_ORDER = ("fa4", "cudnn", "flash", "efficient", "cpu_flash", "math")


DROPPED = 0  # backends dropped so far (a choice remembered before a drop is stale)


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


def drop_backend(backend: Backend, error: BaseException) -> None:
    """Stop ``auto`` from choosing an optional backend after it failed (warns once)."""
    import warnings

    global DROPPED
    DROPPED += 1
    backend.failure = f"{type(error).__name__}: {error}"
    warnings.warn(
        f"backend {backend.name!r} failed ({backend.failure[:500]}); backend='auto' uses the "
        f"next one from now on. Pass backend='cudnn' to skip it.",
        BackendFallbackWarning,
        stacklevel=3,
    )


def default_scale(head_dim: int, scale: float | None) -> float:
    return 1.0 / math.sqrt(head_dim) if scale is None else float(scale)
