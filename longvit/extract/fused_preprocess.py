"""The extractor's resize + centre crop + normalisation as one Triton kernel on the GPU.

On a 512-tile batch of 224-px tiles for vit_base_patch16_224 (resize to 248, crop 224),
F.interpolate and the passes around it take ~3.7 ms on an H200 against a ~55 ms model
forward (docs/benchmarks.md). Here every output pixel is computed in one pass straight from
the uint8 tile: out[b, c, y, x] = round(clamp(sum_i sum_j Wy[y, i] Wx[x, j] tile[b, i, j, c]))
* scale[c] + shift[c], written float32 channels_last, for the cropped pixels only.

Wy and Wx are F.interpolate's own weights (``longvit.interpolation``: antialiasing, border
handling and the interpolation mode are exactly that call's), stored per output
pixel as the first source index and K weights. ``fused_resize_normalize`` returns None where
the kernel does not apply (no Triton, CPU tensors outside Triton's interpreter,
``LONGVIT_TRITON=0``, or a launch that failed: see ``strided_ops.launched``); the caller then
runs the ATen passes.
"""

from __future__ import annotations

import functools

import torch

from longvit import config  # one switch (LONGVIT_TRITON) for longvit's kernels
from longvit.attention import strided_ops
from longvit.interpolation import interpolation_matrix

BLOCK = 128  # output pixels per program


def _enabled() -> bool:
    return config.use_triton() and not torch.compiler.is_compiling()


@functools.cache
def _kernel():
    try:
        from longvit.extract import preprocess_kernel as k
    except Exception:  # noqa: BLE001 - any import failure means: use ATen
        return None
    return k.resize_normalize_kernel


@functools.cache
def resize_taps(size_in: int, size_out: int, mode: str, start: int, count: int):
    """F.interpolate's 1-D weights from size_in to size_out pixels, for output pixels
    start..start+count-1: (first source index (count,) int32, weights (count, K) float32).
    ``mode``: "bicubic" or "bilinear" (antialiased, align_corners=False) or "nearest"."""
    w = interpolation_matrix(size_in, size_out, mode, torch.float64)[start : start + count]
    nonzero = w != 0
    first = torch.where(nonzero.any(1), nonzero.float().argmax(1), 0)
    last = size_in - 1 - nonzero.flip(1).float().argmax(1)
    k = max(1, int((last - first).max()) + 1)
    first = first.clamp(max=size_in - k)  # keep the window inside the tile
    cols = first[:, None] + torch.arange(k)
    taps = w.gather(1, cols)
    if not torch.allclose(taps.sum(1), w.sum(1), atol=1e-12):
        raise AssertionError("interpolation weights are not one window")  # cannot happen
    return first.to(torch.int32), taps.to(torch.float32)


@functools.cache
def _taps_on(device: torch.device, *args) -> tuple[torch.Tensor, torch.Tensor]:
    """resize_taps(*args) on device, copied there once."""
    return tuple(t.to(device) for t in resize_taps(*args))


def fused_resize_normalize(
    tiles_BHWC: torch.Tensor,
    scale_hw: tuple[int, int],
    out_hw: tuple[int, int],
    top_left: tuple[int, int],
    mode: str,
    scale_C: torch.Tensor,
    shift_C: torch.Tensor,
) -> torch.Tensor | None:
    """(B, H, W, 3) uint8 -> (B, 3, h, w) float32 channels_last: resize to scale_hw, crop
    out_hw at top_left, round to whole pixel values, then x * scale_C + shift_C per channel.
    None where the kernel does not apply."""
    if not _enabled() or not (tiles_BHWC.is_cuda or strided_ops.INTERPRET):
        return None
    if tiles_BHWC.dtype != torch.uint8 or tiles_BHWC.dim() != 4 or tiles_BHWC.shape[-1] != 3:
        return None
    kernel = _kernel()
    if kernel is None:
        return None
    b, h_in, w_in, _ = tiles_BHWC.shape
    (h_out, w_out), (top, left) = out_hw, top_left
    dev = tiles_BHWC.device
    y0, wy = _taps_on(dev, h_in, scale_hw[0], mode, top, h_out)
    x0, wx = _taps_on(dev, w_in, scale_hw[1], mode, left, w_out)
    out = torch.empty(b, 3, h_out, w_out, device=dev, dtype=torch.float32,
                      memory_format=torch.channels_last)  # fmt: skip
    if out.numel() == 0:
        return out
    tiles = tiles_BHWC.contiguous()
    scale_C, shift_C = (t.to(dev, torch.float32).contiguous() for t in (scale_C, shift_C))
    grid = (b, (h_out * w_out + BLOCK - 1) // BLOCK)
    ok = strided_ops.launched(
        lambda: kernel[grid](
            tiles, out, y0, wy, x0, wx, scale_C, shift_C, h_in, w_in,
            H_OUT=h_out, W_OUT=w_out, KY=wy.shape[1], KX=wx.shape[1], BLOCK=BLOCK,
        ),
        dev,
    )  # fmt: skip
    return out if ok else None
