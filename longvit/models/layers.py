"""The transformer block both encoders stack, and the patch embedding of the pixel encoder.

One Block serves the pixel encoder (LongViT) and the slide encoder: pre-norm,
dilated attention (``MultiheadDilatedAttention``), MLP, optional LayerScale and
drop path. ``sub_ln`` adds LongNet's sub-LayerNorm inside the attention (before
its output projection) and inside the MLP (before fc2), as LongViT does.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from timm.layers import DropPath, LayerScale, Mlp, register_notrace_module
from torch import nn
from torch.utils.checkpoint import checkpoint

from longvit import config
from longvit.attention import MultiheadDilatedAttention
from longvit.attention.schedule import DEFAULT_DILATION_RATES
from longvit.autocast import autocast_dtype

# torch.fx (timm's FX feature extraction, torchvision's create_feature_extractor) keeps these
# as one call each: the attention runs a schedule that depends on the input's length, the
# patch embedding checks the image, the norm reads autocast's state
register_notrace_module(MultiheadDilatedAttention)


class Block(nn.Module):
    """Pre-norm transformer block whose attention is dilated attention.

    Args:
        dim: channels C of the tokens (B, N, C).
        num_heads: attention heads.
        mlp_ratio: MLP hidden width as a multiple of dim.
        qkv_bias: bias in the q/k/v projection.
        segment_lengths, dilation_rates: the dilated-attention branches (a schedule
            name, "auto" or "longvit", derives the lengths from each input's token count).
        sub_ln: LongNet sub-LayerNorm in attention and MLP (LongViT uses it).
        norm_layer: every norm of the block (each feeds a Linear); default
            ``LinearInputNorm`` (nn.LayerNorm's values, no float32 copies under autocast).
        proj_drop, attn_drop, drop_path: dropout rates.
        init_values: LayerScale initial value; None disables LayerScale.
        mlp_chunk_size: run the MLP over at most this many tokens at a time, each
            chunk recomputed in the backward (activation memory of the MLP drops
            from N x hidden to chunk x hidden); None runs it in one piece.
        attn_backend: kernel choice for ``dilated_attention``.
        zero_padded_keys: Prov-GigaPath's padding semantics in the attention, for its
            weights (``dilated_attention``).
    """

    def __init__(
        self,
        dim: int,
        num_heads: int,
        mlp_ratio: float = 4.0,
        qkv_bias: bool = True,
        segment_lengths: Sequence[int] | str = "auto",
        dilation_rates: Sequence[int] = DEFAULT_DILATION_RATES,
        sub_ln: bool = False,
        proj_drop: float = 0.0,
        attn_drop: float = 0.0,
        init_values: float | None = None,
        drop_path: float = 0.0,
        act_layer: Callable[..., nn.Module] = nn.GELU,
        norm_layer: Callable[..., nn.Module] | None = None,
        attn_layer: Callable[..., nn.Module] = MultiheadDilatedAttention,
        mlp_layer: Callable[..., nn.Module] = Mlp,
        mlp_chunk_size: int | None = None,
        attn_backend: str = "auto",
        zero_padded_keys: bool = False,
    ):
        super().__init__()
        norm_layer = norm_layer or LinearInputNorm
        self.norm1 = norm_layer(dim)
        self.attn = attn_layer(
            dim, num_heads, segment_lengths=segment_lengths, dilation_rates=dilation_rates,
            qkv_bias=qkv_bias, attn_drop=attn_drop, proj_drop=proj_drop, sub_ln=sub_ln,
            backend=attn_backend, norm_layer=norm_layer,
            **({"zero_padded_keys": True} if zero_padded_keys else {}),
        )  # fmt: skip
        self.ls1 = LayerScale(dim, init_values) if init_values else nn.Identity()
        self.drop_path1 = DropPath(drop_path) if drop_path > 0.0 else nn.Identity()
        self.norm2 = norm_layer(dim)
        self.mlp = mlp_layer(
            in_features=dim, hidden_features=int(dim * mlp_ratio), act_layer=act_layer,
            norm_layer=norm_layer if sub_ln else None, drop=proj_drop,
        )  # fmt: skip
        self.ls2 = LayerScale(dim, init_values) if init_values else nn.Identity()
        self.drop_path2 = DropPath(drop_path) if drop_path > 0.0 else nn.Identity()
        self.mlp_chunk_size = mlp_chunk_size

    def forward(
        self, x: torch.Tensor, key_padding_mask: torch.Tensor | None = None, plan=None
    ) -> torch.Tensor:
        """x: (B, N, C); key_padding_mask: (B, N) bool, True = padding. Returns (B, N, C).

        plan: the attention's ``packed_plan`` for this input, built once per forward."""
        attn = self.attn(self.norm1(x), key_padding_mask, **({"plan": plan} if plan else {}))
        x = x + self.drop_path1(self.ls1(attn))
        x = x + self.drop_path2(self.ls2(self._mlp(self.norm2(x))))
        return x

    def _mlp(self, x: torch.Tensor) -> torch.Tensor:
        chunk = self.mlp_chunk_size
        if chunk is None or x.shape[1] <= chunk:
            return self.mlp(x)
        recompute = torch.is_grad_enabled() and x.requires_grad
        parts = []
        # split, not slicing: the backward of a slice fills a zero (B, N, C) gradient per chunk
        for piece in x.split(chunk, dim=1):
            if recompute:  # keep only the chunk's input; its hidden activations are recomputed
                parts.append(checkpoint(self.mlp, piece, use_reentrant=False))
            else:
                parts.append(self.mlp(piece))
        return torch.cat(parts, dim=1)


@register_notrace_module
class PatchEmbed(nn.Module):
    """Non-overlapping patches to tokens: a Conv2d with kernel = stride = patch_size.

    Two input forms give the same tokens for the same pixels:
    - ``forward(x)``: an image (B, C, H, W) -> tokens (B, H // p * W // p, D) in
      row-major grid order (pixels past the last whole patch are dropped);
    - ``forward_patches(patches)``: patches already cut, (B, N, C, p, p) -> (B, N, D),
      run ``chunk_size`` patches at a time. uint8 patches (0-255) are scaled to
      [0, 1] and normalised with ``mean`` / ``std`` inside each chunk, and with
      gradients enabled each chunk is recomputed in the backward, so no float copy
      of all N patches ever exists. The patches may stay on the host (best pinned):
      each chunk is copied to the weights' device when it is embedded, in the
      forward and again in the backward's recompute, so the device never holds
      all N (3 KB per 32 x 32 RGB uint8 patch).
    """

    def __init__(
        self,
        patch_size: int = 32,
        in_chans: int = 3,
        embed_dim: int = 768,
        chunk_size: int = 65536,
        mean: Sequence[float] | None = None,
        std: Sequence[float] | None = None,
    ):
        super().__init__()
        if patch_size < 1:
            raise ValueError(f"patch_size must be a positive number of pixels, got {patch_size}")
        self.patch_size = int(patch_size)
        self.in_chans = int(in_chans)
        self.chunk_size = int(chunk_size)
        self.proj = nn.Conv2d(in_chans, embed_dim, kernel_size=patch_size, stride=patch_size)
        mean = (0.0,) * in_chans if mean is None else tuple(float(m) for m in mean)
        std = (1.0,) * in_chans if std is None else tuple(float(s) for s in std)
        if len(mean) != in_chans or len(std) != in_chans:
            raise ValueError(
                f"mean and std need one value per channel ({in_chans}), got {mean} and {std}"
            )
        self.uint8_mean, self.uint8_std = mean, std

    def grid_size(self, height: int, width: int) -> tuple[int, int]:
        """Token grid (rows, cols) of an image of height x width pixels."""
        return height // self.patch_size, width // self.patch_size

    def check_image(self, x: torch.Tensor) -> None:
        p = self.patch_size
        if x.dim() != 4 or x.shape[1] != self.in_chans:
            raise ValueError(
                f"expected an image of shape (B, {self.in_chans}, H, W), got {tuple(x.shape)}"
            )
        if x.shape[2] < p or x.shape[3] < p:
            raise ValueError(
                f"image of {x.shape[2]} x {x.shape[3]} pixels (shape {tuple(x.shape)}) is "
                f"smaller than one {p} x {p} patch; expected H >= {p} and W >= {p}"
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: (B, C, H, W) float -> (B, (H // p) * (W // p), D)."""
        self.check_image(x)
        return self.proj(x).flatten(2).transpose(1, 2)

    def check_patches(self, patches: torch.Tensor) -> None:
        p, c = self.patch_size, self.in_chans
        if patches.dim() != 5 or tuple(patches.shape[2:]) != (c, p, p):
            raise ValueError(
                f"expected patches of shape (B, N, {c}, {p}, {p}), got {tuple(patches.shape)}"
            )

    def forward_patches(self, patches: torch.Tensor) -> torch.Tensor:
        """patches: (B, N, C, p, p) float or uint8 -> (B, N, D)."""
        self.check_patches(patches)
        b, n = patches.shape[:2]
        if n == 0:
            raise ValueError(f"expected at least one patch, got shape {tuple(patches.shape)}")
        recompute = torch.is_grad_enabled() and (
            self.proj.weight.requires_grad or patches.requires_grad
        )
        parts = []
        for start in range(0, n, self.chunk_size):
            piece = patches[:, start : start + self.chunk_size]
            if recompute:
                parts.append(checkpoint(self._embed_chunk, piece, use_reentrant=False))
            else:
                parts.append(self._embed_chunk(piece))
        return parts[0] if len(parts) == 1 else torch.cat(parts, dim=1)

    def _embed_chunk(self, piece: torch.Tensor) -> torch.Tensor:
        b, n = piece.shape[:2]
        weight = self.proj.weight
        piece = piece.to(weight.device, non_blocking=True)  # patches may wait on the host
        x = piece.reshape(b * n, -1)
        if not piece.dtype.is_floating_point:
            x = self._normalise_uint8(x, weight)
        # the conv over one patch is a matrix product with the flattened kernel
        out = F.linear(x.to(_compute_dtype(weight)), weight.flatten(1), self.proj.bias)
        return out.reshape(b, n, -1)

    def _normalise_uint8(self, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        c = self.in_chans
        mean = torch.tensor(self.uint8_mean, device=x.device, dtype=torch.float32)
        std = torch.tensor(self.uint8_std, device=x.device, dtype=torch.float32)
        x = x.view(x.shape[0], c, -1).to(torch.float32) / 255.0
        x = (x - mean[:, None]) / std[:, None]
        return x.reshape(x.shape[0], -1)


@register_notrace_module
class LinearInputNorm(nn.LayerNorm):
    """A LayerNorm whose output feeds a Linear: under autocast it keeps nothing in float32.

    Under autocast (CUDA's policy) F.layer_norm runs in float32: it casts its
    (B, N, C) bf16 input to a float32 copy, which it saves for the backward
    (4 bytes per element), and returns float32, which the next Linear casts back
    to bf16. This norm does the same float32 arithmetic but returns the autocast dtype
    and saves its input as it came (2 bytes per element; a block's input is saved anyway)
    with the float32 mean and rstd (B, N, 1). For a consumer that casts to the autocast
    dtype, a Linear, the values and the gradients are those of nn.LayerNorm under autocast;
    a norm whose output is used otherwise (pooled, added) must stay an nn.LayerNorm.
    Without autocast it is nn.LayerNorm.

    On CUDA, for inputs of at least FUSED_NORM_TOKENS rows, the float32 arithmetic runs
    as one kernel per direction that torch.compile generates (bf16 in, float32 math, bf16
    out: no float32 copy is ever written; at 1M x 768
    tokens forward + backward take 3.4 ms against 16.7 ms for the same arithmetic through
    ATen's kernels and casts, docs/benchmarks.md). Its values equal the ATen path's to float32
    round-off (a different summation order). ``set_fused_norm(False)`` or the environment
    variable ``LONGVIT_FUSED_NORM=0`` turns it off; where torch.compile cannot build the
    kernel (no Triton, say) the norm warns once and stays on the ATen path.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out_dtype = autocast_dtype(x.device.type)
        if out_dtype is None or self.weight is None:
            return super().forward(x)
        if not out_dtype.is_floating_point or x.dtype not in (out_dtype, torch.float32):
            return super().forward(x)
        if x.is_cuda and config.use_fused_norm() and x.numel() >= FUSED_NORM_TOKENS * x.shape[-1]:
            out = _fused_layer_norm(x, self.weight, self.bias, self.eps, out_dtype)
            if out is not None:
                return out
        return _LayerNormToAutocast.apply(
            x, self.weight, self.bias, self.normalized_shape, self.eps, out_dtype
        )


# The compiled kernel pays where one sequence is long (1M x 768 tokens: 3.4 against 16.7 ms);
# below, its guarded call costs host time (longvit_slide_base at 4,000 tiles: 34 ms of
# inference with it, 14 ms without) and each new slide size can compile again (a cohort's
# first pass took 1.8x its second). One H200, bf16; docs/benchmarks.md.
FUSED_NORM_TOKENS = 2**17


def set_fused_norm(enable: bool = True) -> None:
    """Use the compiled one-kernel LayerNorm in ``LinearInputNorm`` on CUDA (default on):
    ``longvit.config.set_fused_norm``."""
    config.set_fused_norm(enable)


class _FusedNormState:
    compiled = None  # the compiled layer_norm_float32_math, made on first use


_fused = _FusedNormState()


def layer_norm_float32_math(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    eps: float,
    out_dtype: torch.dtype,
) -> torch.Tensor:
    """LayerNorm over the last dim of x in float32 (weights too), returned in out_dtype."""
    b = None if bias is None else bias.float()
    return F.layer_norm(x.float(), x.shape[-1:], weight.float(), b, eps).to(out_dtype)


def _fused_layer_norm(x, weight, bias, eps, out_dtype) -> torch.Tensor | None:
    """layer_norm_float32_math compiled (rows dynamic, so every sequence length shares one
    kernel); None when it cannot be compiled here."""
    if config.failed("fused_norm"):
        return None
    if torch.compiler.is_compiling():  # inside the user's torch.compile: it fuses this itself
        return layer_norm_float32_math(x, weight, bias, eps, out_dtype)
    if _fused.compiled is None:
        _fused.compiled = torch.compile(layer_norm_float32_math, dynamic=None)
    rows = x.reshape(-1, x.shape[-1])
    torch._dynamo.maybe_mark_dynamic(rows, 0)
    try:
        with torch.autocast(x.device.type, enabled=False):
            out = _fused.compiled(rows, weight, bias, eps, out_dtype)
    except Exception as error:  # noqa: BLE001  (no Triton, an old GPU: stay on ATen)
        config.fall_back(
            "fused_norm",
            f"longvit: the compiled LayerNorm is unavailable ({type(error).__name__}: "
            f"{str(error)[:200]}); using ATen's kernels (slower). Set LONGVIT_FUSED_NORM=0 to "
            "skip the attempt.",
            UserWarning,
            stacklevel=3,
        )
        return None
    return out.view(x.shape)


class _LayerNormToAutocast(torch.autograd.Function):
    """F.layer_norm in float32 on x, output in out_dtype; saves x as it is (see LinearInputNorm)."""

    @staticmethod
    def forward(ctx, x, weight, bias, normalized_shape, eps, out_dtype):
        with torch.autocast(x.device.type, enabled=False):
            out, mean, rstd = torch.ops.aten.native_layer_norm(
                x.float(), normalized_shape, weight.float(), _float(bias), eps
            )
        ctx.save_for_backward(x, weight, bias, mean, rstd)
        ctx.normalized_shape = normalized_shape
        return out.to(out_dtype)

    @staticmethod
    def backward(ctx, grad_out):
        x, weight, bias, mean, rstd = ctx.saved_tensors
        mask = [
            ctx.needs_input_grad[0],
            ctx.needs_input_grad[1],
            bias is not None and ctx.needs_input_grad[2],
        ]
        with torch.autocast(x.device.type, enabled=False):
            dx, dw, db = torch.ops.aten.native_layer_norm_backward(
                grad_out.float(), x.float(), ctx.normalized_shape, mean, rstd,
                weight.float(), _float(bias), mask,
            )  # fmt: skip
        dx = None if dx is None else dx.to(x.dtype)
        dw = None if dw is None else dw.to(weight.dtype)
        db = None if db is None else db.to(bias.dtype)
        return dx, dw, db, None, None, None


def _float(t: torch.Tensor | None) -> torch.Tensor | None:
    return None if t is None else t.float()


def _compute_dtype(weight: torch.Tensor) -> torch.dtype:
    """The dtype F.linear will run in: autocast's when it is on, else the weight's."""
    dtype = autocast_dtype(weight.device.type)
    return weight.dtype if dtype is None else dtype


def drop_path_rates(depth: int, drop_path_rate: float) -> list[float]:
    """Stochastic depth rising linearly from 0 at the first block to ``drop_path_rate`` at the
    last (timm's ViT rule)."""
    return [x.item() for x in torch.linspace(0, drop_path_rate, depth, device="cpu")]


def build_blocks(depth: int, drop_path_rate: float = 0.0, **block_kwargs) -> list[Block]:
    """``depth`` ``Block``s of the same settings (``Block``'s arguments, but ``drop_path``),
    with drop-path rates from ``drop_path_rates``: the block list of every longvit model."""
    return [Block(drop_path=p, **block_kwargs) for p in drop_path_rates(depth, drop_path_rate)]
