"""The branch data movement of dilated attention as Triton kernels on CUDA.

A branch reads and writes the sequence at its dilated positions through strided
views (``layout.dilated_parts``): shape (C, m, groups, G', X), the last dim
contiguous, the others with arbitrary strides. ATen copies such views with its
generic element-wise kernels, which index every element and reach about half
of the memory bandwidth; and a merge of a branch into the accumulators takes
six of them (a cast, a difference, a sigmoid, a lerp, a logaddexp, a copy).

Here each operation is one kernel over tiles of *rows* (a row: the X contiguous values of
one position and head; a tile: a few positions x all heads), four strides per tensor:

- ``copy_rows(dst, src)``: dst = src (a gather when src is a dilated view);
- ``add_rows(dst, src)``: dst += src (a gradient into a dilated view);
- ``merge_rows(acc, acc_lse, o, lse, copy)``: the two-way LSE merge of a branch
  (o, lse) into float32 accumulators, in one pass.

Each falls back to the ATen ops with the same values where Triton does not apply
(CPU tensors, no Triton, a last dim that is not contiguous, inside torch.compile)
or when ``LONGVIT_TRITON=0`` / ``set_triton(False)`` turns the kernels off. A launch that
fails (a GPU Triton cannot compile for) turns them off with one warning.
"""

from __future__ import annotations

import contextlib
import functools
import math
import os
import warnings
from collections.abc import Callable
from typing import NamedTuple

import torch

_enabled = os.environ.get("LONGVIT_TRITON", "1") != "0"
# Under Triton's interpreter (TRITON_INTERPRET=1) the kernels run on CPU tensors: the tests' way
# to check them without a GPU.
_INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"


class TritonFallbackWarning(RuntimeWarning):
    """A Triton kernel failed to launch and longvit went back to ATen's kernels."""


def set_triton(enable: bool = True) -> None:
    """Turn the Triton kernels of the branch data movement on or off (for this process)."""
    global _enabled
    _enabled = bool(enable)


@functools.cache
def _kernels():
    """(rows_kernel, merge_kernel), or None when Triton cannot be imported."""
    try:
        from longvit.attention import _strided_kernels as k
    except Exception:  # noqa: BLE001 - any import failure means: use ATen
        return None
    return k.rows_kernel, k.merge_kernel


_BLOCK_ELEMENTS = 4096  # values per program: BLOCK_I1 positions x BLOCK_H heads x BLOCK_X
# Below this many elements a tensor goes through ATen: a Triton launch costs ~9 us of host
# time against ATen's ~7 us (H200 host), which tiny copies do not win back on the GPU.
MIN_ELEMENTS = 2**22


class Strided(NamedTuple):
    """A strided window of ``base``: what ``base.as_strided(shape, strides, offset)`` would view
    (offset in elements from base's first element), without building the view. The kernels
    take the base, the offset and the strides as numbers, so a caller that knows the layout
    pays no PyTorch call per window."""

    base: torch.Tensor
    offset: int
    shape: tuple[int, ...]
    strides: tuple[int, ...]

    @classmethod
    def of(cls, t: torch.Tensor) -> Strided:
        """The window that is all of t."""
        return t if type(t) is Strided else cls(t, 0, tuple(t.shape), t.stride())

    def view(self) -> torch.Tensor:
        """The window as a tensor view (the ATen path)."""
        b = self.base
        return b.as_strided(self.shape, self.strides, b.storage_offset() + self.offset)

    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def dtype(self) -> torch.dtype:
        return self.base.dtype


def _usable(*windows: torch.Tensor | Strided, elements: int | None = None) -> bool:
    """Whether the kernels apply to these windows (``elements``: what one launch moves, the
    first window's size by default; below MIN_ELEMENTS ATen's one launch does as well)."""
    if not _enabled or torch.compiler.is_compiling():
        return False
    windows = [Strided.of(w) for w in windows]
    for w in windows:
        if not (w.base.is_cuda or _INTERPRET) or len(w.shape) != 5:
            return False
        if w.strides[-1] != 1 and w.shape[-1] > 1:
            return False
    if elements is None:
        elements = windows[0].numel()
    if not _INTERPRET and elements < MIN_ELEMENTS:
        return False
    return _kernels() is not None


@functools.lru_cache(maxsize=1024)
def _geometry(shape: tuple[int, ...]):
    """Launch geometry of a (n0, n1, n2, n3, X) window: (grid, n1, n2 * n3, constexprs)."""
    n0, n1, n2, n3, x = shape
    block_x = 1 << (x - 1).bit_length()
    block_h = 1 << (n2 * n3 - 1).bit_length()
    block_i1 = max(1, min(_BLOCK_ELEMENTS // (block_x * block_h), 1 << (n1 - 1).bit_length()))
    grid = (n0 * _cdiv(n1, block_i1),)
    meta = {"G": n3, "X": x, "BLOCK_X": block_x, "BLOCK_I1": block_i1, "BLOCK_H": block_h}
    return grid, n1, n2 * n3, meta  # meta is shared: callers pass it on as **meta, never edit it


def _cdiv(a: int, b: int) -> int:
    return (a + b - 1) // b


def _on(device: torch.device):
    """The CUDA device context for a launch (none where the device is already current, or for
    the interpreter's CPU tensors)."""
    if device.type != "cuda" or device.index == torch.cuda.current_device():
        return contextlib.nullcontext()
    return torch.cuda.device(device)


def launched(launch: Callable[[], None], device: torch.device) -> bool:
    """Run a Triton launch on device; False (after turning longvit's Triton kernels off with a
    warning, once) when it fails, e.g. on a GPU or toolchain Triton cannot compile for. The
    caller then does the same work with ATen. Compilation fails before anything is written."""
    global _enabled
    try:
        with _on(device):
            launch()
        return True
    except Exception as error:  # noqa: BLE001 - any failure: fall back, say so once
        _enabled = False
        warnings.warn(
            f"longvit: a Triton kernel failed ({type(error).__name__}: {str(error)[:300]}); "
            "using ATen's kernels from now on (slower). Set LONGVIT_TRITON=0 to choose that "
            "without this warning.",
            TritonFallbackWarning,
            stacklevel=3,
        )
        return False


MAX_WINDOWS = 5  # windows per side that one launch of the rows kernel moves


def _deltas(windows: list[Strided]) -> list[int] | None:
    """Element offsets of windows 1.. from window 0 (across tensors: data pointers apart), or
    None when they cannot share a launch (shapes, strides or dtypes differ)."""
    first = windows[0]
    if len(windows) == 1:
        return []
    size = first.base.element_size()
    ptr0 = first.base.data_ptr()
    out = []
    for w in windows[1:]:
        if w.shape != first.shape or w.strides != first.strides or w.dtype != first.dtype:
            return None
        apart = w.base.data_ptr() - ptr0
        if apart % size or w.base.device != first.base.device:
            return None
        out.append(apart // size + w.offset - first.offset)
    return out


def _rows(dst: Strided, src: Strided, d_apart, s_apart, t: int, add: bool) -> bool:
    """One launch for t (dst, src) pairs of one shape: the first pair, and the others
    d_apart / s_apart elements from it. False if the launch failed."""
    if dst.numel() == 0:
        return True
    pad = [0] * (MAX_WINDOWS - t)
    grid, n1, n_heads, meta = _geometry(dst.shape)
    rows_kernel, _ = _kernels()
    return launched(
        lambda: rows_kernel[(grid[0], t)](
            dst.base, src.base, dst.offset, src.offset, n1, n_heads,
            *dst.strides[:4], *src.strides[:4], *d_apart, *pad, *s_apart, *pad,
            ADD=add, T=t, **meta,
        ),
        dst.base.device,
    )  # fmt: skip


def _move(name: str, dsts, srcs, add: bool) -> None:
    dsts = [Strided.of(w) for w in dsts]
    srcs = [Strided.of(w) for w in srcs]
    if len(dsts) != len(srcs):
        raise ValueError(f"{name}: {len(dsts)} destinations for {len(srcs)} sources")
    for dst, src in zip(dsts, srcs):
        if dst.shape != src.shape:
            raise ValueError(f"{name}: shapes differ, {tuple(dst.shape)} and {tuple(src.shape)}")
    dst, src = dsts[0], srcs[0]
    d_apart = s_apart = None
    if len(dsts) <= MAX_WINDOWS and (not add or dst.dtype == src.dtype):
        d_apart, s_apart = _deltas(dsts), _deltas(srcs)
    if d_apart is None or s_apart is None:
        if len(dsts) > 1:  # windows that cannot share a launch: one at a time
            for d, s in zip(dsts, srcs):
                _move(name, [d], [s], add)
            return
    elif _usable(dst, src, elements=dst.numel() * len(dsts)):
        if _rows(dst, src, d_apart, s_apart, len(dsts), add):
            return
    for d, s in zip(dsts, srcs):  # ATen, window by window
        d.view().add_(s.view()) if add else d.view().copy_(s.view())


def copy_rows(dst: torch.Tensor | Strided, src: torch.Tensor | Strided) -> None:
    """dst.copy_(src) for two (n0, n1, n2, n3, X) tensors or windows of one shape, any
    strides."""
    _move("copy_rows", [dst], [src], add=False)


def add_rows(dst: torch.Tensor | Strided, src: torch.Tensor | Strided) -> None:
    """dst.add_(src) for two (n0, n1, n2, n3, X) tensors or windows of one shape, any
    strides."""
    _move("add_rows", [dst], [src], add=True)


def copy_rows_many(dsts, srcs) -> None:
    """copy_rows for each pair; windows with one shape and strides per side (q, k and v of
    a branch) move in one launch."""
    _move("copy_rows", dsts, srcs, add=False)


def add_rows_many(dsts, srcs) -> None:
    """add_rows for each pair, in one launch where copy_rows_many would use one."""
    _move("add_rows", dsts, srcs, add=True)


def merge_rows(
    acc: torch.Tensor | Strided,
    acc_lse: torch.Tensor | Strided,
    o: torch.Tensor | Strided,
    lse: torch.Tensor | Strided,
    copy: bool,
) -> None:
    """Merge a branch into the accumulators, in place.

    acc (n0, n1, n2, n3, D) and acc_lse (n0, n1, n2, n3, 1): float32 views (or windows) of
    the merged output and LSE at the branch's positions; o (same shape as acc, any float
    dtype) and lse (same shape as acc_lse): the branch's output and LSE. With ``copy``
    nothing has been merged there yet and the branch's result is copied. Otherwise
    acc = lerp(acc, o, sigmoid(lse - acc_lse)) and acc_lse = logaddexp(acc_lse, lse):
    the softmax over the two denominators (rows with no key carry a finite NO_KEY LSE,
    so no inf - inf appears).
    """
    acc, acc_lse, o, lse = (Strided.of(t) for t in (acc, acc_lse, o, lse))
    if tuple(acc.shape) != tuple(o.shape) or tuple(acc_lse.shape) != tuple(lse.shape):
        raise ValueError(
            f"merge_rows: acc {tuple(acc.shape)} / o {tuple(o.shape)} or acc_lse "
            f"{tuple(acc_lse.shape)} / lse {tuple(lse.shape)} differ"
        )
    # whatever its size: ATen takes six launches for one merge
    fast = acc.dtype == acc_lse.dtype == torch.float32 and _usable(
        acc, acc_lse, o, lse, elements=MIN_ELEMENTS
    )
    if fast and acc.numel() == 0:
        return
    if fast:
        grid, n1, n_heads, meta = _geometry(acc.shape)
        _, merge_kernel = _kernels()
        fast = launched(
            lambda: merge_kernel[grid](
                acc.base, acc_lse.base, o.base, lse.base,
                acc.offset, acc_lse.offset, o.offset, lse.offset, n1, n_heads,
                *acc.strides[:4], *acc_lse.strides[:4], *o.strides[:4], *lse.strides[:4],
                COPY=copy, **meta,
            ),
            acc.base.device,
        )  # fmt: skip
    if not fast:
        _merge_aten(acc.view(), acc_lse.view(), o.view(), lse.view(), copy)


def _merge_aten(acc, acc_lse, o, lse, copy: bool) -> None:
    if copy:
        acc.copy_(o)
        acc_lse.copy_(lse)
        return
    lse = lse.to(acc_lse.dtype)
    acc.lerp_(o.to(acc.dtype), torch.sigmoid(lse - acc_lse))
    acc_lse.copy_(torch.logaddexp(acc_lse, lse))
