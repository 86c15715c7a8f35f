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
- ``merge_all(out, out_lse, entries, write_back)``: the LSE merge of every branch at once,
  written in the output's dtype (and the merged LSE back into each branch's own LSE).

Each falls back to the ATen ops with the same values where Triton does not apply
(CPU tensors, no Triton, a last dim that is not contiguous, inside torch.compile)
or when ``LONGVIT_TRITON=0`` / ``set_triton(False)`` turns the kernels off. A launch that
fails (a GPU Triton cannot compile for) turns them off with one warning.
"""

from __future__ import annotations

import contextlib
import functools
import math
import struct
from collections.abc import Callable
from typing import NamedTuple

import torch

from longvit import config

# Under Triton's interpreter (TRITONINTERPRET=1) the kernels run on CPU tensors: the tests' way
# to check them without a GPU.
INTERPRET = config.triton_interpret()


class TritonFallbackWarning(RuntimeWarning):
    """A Triton kernel failed to launch and longvit went back to ATen's kernels."""


def set_triton(enable: bool = True) -> None:
    """Turn the Triton kernels of the branch data movement on or off (for this process):
    ``longvit.config.set_triton``."""
    config.set_triton(enable)


@functools.cache
def _kernels():
    """(rows_kernel, merge_kernel), or None when Triton cannot be imported."""
    try:
        from longvit.attention.kernels import strided as k
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
    if not config.use_triton() or torch.compiler.is_compiling():
        return False
    windows = [Strided.of(w) for w in windows]
    for w in windows:
        if not (w.base.is_cuda or INTERPRET) or len(w.shape) != 5:
            return False
        if w.strides[-1] != 1 and w.shape[-1] > 1:
            return False
    if elements is None:
        elements = windows[0].numel()
    if not INTERPRET and elements < MIN_ELEMENTS:
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
    try:
        with _on(device):
            launch()
        return True
    except Exception as error:  # noqa: BLE001 - any failure: fall back, say so once
        config.fall_back(
            "triton",
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


# The LSE of a row that attends to no key (the one definition; dilated imports it): finite,
# so that merges stay free of inf - inf.
NO_KEY = -1.0e30
MAX_MERGE_ENTRIES = 32  # entries one launch of merge_all's kernel takes (its table's rows)
MAX_MERGE_D = 256  # head dims it takes: a tile holds BLOCK_D values of every head of a row
_ROW_COLUMNS = 16  # an entry's scalars in the kernel's table (12 used), before its head columns


class MergeEntry(NamedTuple):
    """One window of one branch's kernel output, and where its rows sit in the sequence.

    Window element (i0, i, g, k) holds the row of head first_head + g * G + k (G = o.shape[3])
    at sequence row P = (first_row + i0) * w + j, j = offset + g + i * r (P = b * N + p, w the
    segment length, r the dilation rate), if j < w: ``token_windows``' layout. Elements past
    the segment (padding) or the sequence belong to no row."""

    o: Strided  # (C, m, groups, G, D) window of the branch output, any float dtype
    lse: Strided  # (C, m, groups, G, 1) window of the branch LSE, float32
    segment_length: int  # w
    dilation_rate: int  # r
    offset: int  # position offset (within a segment) of the window's first group
    first_head: int  # the head of group 0, head-in-group 0
    first_row: int  # c0: the segment row (global row = P // w, P = b * N + p) of window row 0


@functools.cache
def _merge_all_kernel():
    """merge_all_kernel, or None when Triton cannot be imported. Apart from ``_kernels()``,
    whose pair callers (tests) unpack or stand in for."""
    if _kernels() is None:
        return None
    from longvit.attention.kernels import strided as k

    return k.merge_all_kernel


def merge_all(
    out: torch.Tensor,
    out_lse: torch.Tensor | None,
    entries,
    write_back: bool,
) -> None:
    """Merge every branch's output into out, in one pass: the softmax over the branches'
    denominators, row by row.

    out (B, N, H, D): contiguous, any float dtype; out_lse (B, N, H): contiguous float32, or
    None. Both are overwritten whole. entries: ``MergeEntry`` windows of the branches'
    kernel outputs (tensors or Strided), all o of one float dtype, all lse float32. A row (P, h),
    P = b * N + p, gets L = log(sum_e exp(lse_e)) and out = sum_e exp(lse_e - L) * o_e over
    the entries that cover it (computed in float32, with the largest lse taken out first),
    out_lse = L; a row no entry covers gets 0 and NO_KEY. An entry's LSE may be NO_KEY too:
    the running-max logsumexp never makes inf - inf. With ``write_back`` each entry's lse
    window then holds L at every row it covers (what the backward wants: the merged LSE at
    the branch's positions); no two entries' lse windows may share an element.

    One Triton launch where it applies (CUDA or the interpreter, D <= MAX_MERGE_D, at most
    MAX_MERGE_ENTRIES entries, D contiguous in every o), else ATen: float32 accumulators
    merged into window by window.
    """
    if out.dim() != 4 or not out.is_contiguous() or not out.is_floating_point():
        raise ValueError(f"merge_all: out must be a contiguous float (B, N, H, D), got {out.shape}")
    b, n, h, d = out.shape
    if out_lse is not None and (
        out_lse.shape != out.shape[:3]
        or out_lse.dtype != torch.float32
        or not out_lse.is_contiguous()
    ):
        raise ValueError(
            f"merge_all: out_lse must be a contiguous float32 {(b, n, h)}, got "
            f"{out_lse.dtype} {tuple(out_lse.shape)}"
        )
    block_h = 1 << (h - 1).bit_length()
    checked, layouts, dtypes = [], [], set()
    for e in entries:
        if type(e.o) is not Strided or type(e.lse) is not Strided:
            e = e._replace(o=Strided.of(e.o), lse=Strided.of(e.lse))
        o, lse = e.o, e.lse
        layout = _entry_layout(
            tuple(o.shape),
            tuple(o.strides),
            tuple(lse.shape),
            tuple(lse.strides),
            *e[2:],
            d,
            h,
            block_h,
            b * n,
        )  # fmt: skip  (raises ValueError for windows that are not an entry's)
        dtypes.add(o.base.dtype)
        if lse.base.dtype != torch.float32 or not o.base.is_floating_point():
            raise ValueError(
                f"merge_all: o must be float, lse float32, got {o.dtype} / {lse.dtype}"
            )
        if layout is not None:  # None: an empty window, no row
            checked.append(e)
            layouts.append(layout)
    if len(dtypes) > 1:
        raise ValueError(f"merge_all: o dtypes differ: {sorted(map(str, dtypes))}")
    if _merge_all_usable(out, out_lse, checked, layouts):
        table = _merge_all_table(out, checked, layouts)
        if table is not None and _merge_all_triton(
            out, out_lse, checked, write_back, table, block_h
        ):
            return
    _merge_all_aten(out, out_lse, checked, write_back)


class _Layout(NamedTuple):
    """What merge_all takes from an entry's sizes and strides alone (cached)."""

    before: bytes  # its table row up to the o and lse offsets
    after: bytes  # after them: strides, padding, the head columns
    divisor: int  # gcd of the o strides (the VEC of the kernel's loads)
    triton: bool  # whether the kernel takes it (int32 sizes, D contiguous)


@functools.lru_cache(maxsize=4096)
def _entry_layout(o_shape, o_strides, l_shape, l_strides, w, r, offset, first_head, first_row,
                  d, heads, block_h, rows) -> _Layout | None:  # fmt: skip
    """An entry's checks (ValueError) and table parts, None for an empty window. The table row
    (int64, see ``merge_all_kernel``): w, r, m, C, offset, first_row, the o and lse offsets
    (elements from the first entry's bases: per call), the o and lse strides of C and m,
    zeros to _ROW_COLUMNS, then ``_head_columns``."""
    if len(o_shape) != 5 or o_shape[-1] != d or tuple(l_shape) != (*o_shape[:4], 1):
        raise ValueError(
            f"merge_all: an entry's o {tuple(o_shape)} / lse {tuple(l_shape)} are not "
            f"(C, m, groups, G, {d}) / (C, m, groups, G, 1)"
        )
    if w < 1 or r < 1:
        raise ValueError(f"merge_all: segment length and rate must be >= 1, got {w}, {r}")
    c, m, groups, g_heads, _ = o_shape
    if not c * m * groups * g_heads * d:
        return None
    limit = 2**31 - _BLOCK_ELEMENTS  # the kernel's row arithmetic is int32 (p of a tile too)
    small = max(c, m, w, r, abs(offset), abs(first_row), abs(first_head), rows) < limit
    before = struct.pack("6q", w, r, m, c, offset, first_row)
    after = struct.pack(
        f"{_ROW_COLUMNS - 8}q", o_strides[0], o_strides[1], l_strides[0], l_strides[1],
        *[0] * (_ROW_COLUMNS - 12),
    ) + _head_columns(
        heads, block_h, first_head, groups, g_heads, r, *o_strides[2:4], o_strides[1],
        *l_strides[2:4], l_strides[1],
    )  # fmt: skip
    divisor = math.gcd(*o_strides[:4])
    return _Layout(before, after, divisor, small and (o_strides[4] == 1 or d == 1))


def _merge_all_usable(out, out_lse, entries: list[MergeEntry], layouts) -> bool:
    """Whether one launch of merge_all_kernel does the merge (see merge_all)."""
    if not entries or not config.use_triton() or torch.compiler.is_compiling():
        return False
    device = out.device
    if not (device.type == "cuda" or INTERPRET) or out.shape[-1] > MAX_MERGE_D:
        return False
    if len(entries) > MAX_MERGE_ENTRIES or not all(lay.triton for lay in layouts):
        return False
    if out_lse is not None and out_lse.device != device:
        return False
    bases = {id(w.base): w.base for e in entries for w in (e.o, e.lse)}
    if any(t.device != device for t in bases.values()):
        return False
    return _merge_all_kernel() is not None


def _merge_all_table(out, entries: list[MergeEntry], layouts: list[_Layout]):
    """(table, VEC) for merge_all_kernel, or None where some entry's window is not a whole
    number of elements from the first entry's base (never, for tensors of one allocator).

    table (E, _ROW_COLUMNS + 4 * BLOCK_H) int64 on out's device: per entry its ``_Layout``
    parts around its o and lse offsets, in elements from the first entry's bases. VEC: the
    largest power of two (up to 16 bytes) dividing every o offset and stride, so that the
    kernel's loads of D values stay vectorised."""
    o0, l0 = entries[0].o.base, entries[0].lse.base
    o_ptr, l_ptr = o0.data_ptr(), l0.data_ptr()
    o_size, l_size = o0.element_size(), l0.element_size()
    parts, common = [], 0
    for e, lay in zip(entries, layouts):
        o_apart, l_apart = e.o.base.data_ptr() - o_ptr, e.lse.base.data_ptr() - l_ptr
        if o_apart % o_size or l_apart % l_size:
            return None
        o_off = o_apart // o_size + e.o.offset
        parts += (lay.before, struct.pack("2q", o_off, l_apart // l_size + e.lse.offset), lay.after)
        common = math.gcd(common, o_off, lay.divisor)
    vec = 16 // o_size
    while common % vec:  # common == 0 (one element, say): any VEC holds
        vec //= 2
    return _device_table(b"".join(parts), out.device), vec


_TABLES: dict = {}  # (device, table bytes) -> the table there, oldest first
_MAX_TABLES = 256


def _device_table(data: bytes, device: torch.device) -> torch.Tensor:
    """The int64 table with these bytes on device. Kept (never written, so shared): a training
    loop's steps tend to get the same addresses from the caching allocator, and thus the same
    tables, which then cost no copy. A new one goes through pinned memory: a copy from
    pageable memory would wait for the GPU's queued work first."""
    key = (device, data)
    table = _TABLES.get(key)
    if table is None:
        table = torch.frombuffer(bytearray(data), dtype=torch.int64)
        if device.type == "cuda":
            pinned = torch.empty(table.shape, dtype=torch.int64, pin_memory=True)
            table = pinned.copy_(table).to(device, non_blocking=True)
        if len(_TABLES) >= _MAX_TABLES:
            _TABLES.pop(next(iter(_TABLES)))
        _TABLES[key] = table
    return table


@functools.lru_cache(maxsize=4096)
def _head_columns(heads, block_h, first, groups, g_heads, r, so_g, so_h, so_m, sl_g, sl_h, sl_m):
    """The head columns of an entry's table row, as bytes: for head h = first + g * G + k of
    the window (group g, head k in group) and g = qg * r + rg, the head's parts of the o and
    lse offsets, g * s_g + k * s_h - qg * s_m (position t // r = qa - qg: its qg part), then
    qg, then rg; rg = -1 (no position matches) for heads the window does not hold."""
    cols = [[0] * block_h, [0] * block_h, [0] * block_h, [-1] * block_h]
    for h in range(max(first, 0), min(first + groups * g_heads, heads)):
        g, k = divmod(h - first, g_heads)
        qg, rg = divmod(g, r)
        cols[0][h] = g * so_g + k * so_h - qg * so_m
        cols[1][h] = g * sl_g + k * sl_h - qg * sl_m
        cols[2][h], cols[3][h] = qg, rg
    return struct.pack(f"{4 * block_h}q", *(v for col in cols for v in col))


def _merge_all_triton(out, out_lse, entries, write_back: bool, table, block_h: int) -> bool:
    """One launch of merge_all_kernel; False if it failed (nothing written then)."""
    b, n, h, d = out.shape
    tab, vec = table
    rows = b * n
    block_d = 1 << (d - 1).bit_length()
    block_p = max(1, min(_BLOCK_ELEMENTS // (block_h * block_d), 1 << (rows - 1).bit_length()))
    grid = (_cdiv(rows, block_p),)
    # one warp per 4096 values (128 a thread): on an H200 (65K tokens, 12 heads, LongViT's five
    # branches) 159 us at D = 64 and 302 us at D = 128 (within 2% of the best tile tried),
    # against 230 us and 456 us with four warps
    warps = max(1, block_p * block_h * block_d // _BLOCK_ELEMENTS)
    kernel = _merge_all_kernel()
    lse_out = out if out_lse is None else out_lse  # never written without HAS_LSE
    return launched(
        lambda: kernel[grid](
            out, lse_out, entries[0].o.base, entries[0].lse.base, tab, len(entries), rows, h,
            D=d, K=_ROW_COLUMNS + 4 * block_h, BLOCK_P=block_p, BLOCK_H=block_h,
            BLOCK_D=block_d, VEC=vec, HAS_LSE=out_lse is not None, WRITE_BACK=write_back,
            num_warps=warps,
        ),
        out.device,
    )  # fmt: skip


def _merge_all_aten(out, out_lse, entries: list[MergeEntry], write_back: bool) -> None:
    """merge_all with ATen ops, the kernel's online logsumexp window by window: float32 running
    max (from -inf), sum of exp(lse - max) and sum of weighted outputs, rescaled as the max
    grows. (Two-way merges would not do: where three entries' LSE is NO_KEY, NO_KEY + log 2
    rounds to NO_KEY and the weights come out 1/4, 1/4, 1/2.) Views only, no data-dependent
    shapes (torch.compile traces this path)."""
    b, n, h, _ = out.shape
    if out.dtype == torch.float32:
        acc = out.zero_()
    else:
        acc = out.new_zeros(out.shape, dtype=torch.float32)
    if out_lse is not None:
        top = out_lse.unsqueeze(-1)
    else:
        top = out.new_empty((b, n, h, 1), dtype=torch.float32)
    top.fill_(-math.inf)
    total = out.new_zeros((b, n, h, 1), dtype=torch.float32)
    blocks = [(e, block) for e in entries for block in _merge_blocks(e, b * n, h)]
    for e, block in blocks:
        a, hi, s = (_token_block(t, e, block) for t in (acc, top, total))
        lse = _window_block(e.lse, block)
        new_hi = torch.maximum(hi, lse)
        scale = torch.exp(hi - new_hi)  # 0 where nothing was merged yet (hi = -inf)
        weight = torch.exp(lse - new_hi)
        a.mul_(scale).addcmul_(_window_block(e.o, block).float(), weight)
        s.mul_(scale).add_(weight)
        hi.copy_(new_hi)
    hit = total > 0  # rows some entry covers
    acc.div_(torch.where(hit, total, 1.0))
    top.copy_(torch.where(hit, top + torch.log(total), NO_KEY))
    if write_back:
        for e, block in blocks:
            _window_block(e.lse, block).copy_(_token_block(top, e, block))
    if acc is not out:
        out.copy_(acc)


def _merge_blocks(e: MergeEntry, rows: int, heads: int) -> list[tuple[int, ...]]:
    """The entry's window cut into blocks (c0, c1, i0, i1, g0, g1, k0, k1) of its first four
    dims whose elements all are rows of the sequence (P < rows, a position 0 <= j < w in
    its segment, a head in 0..heads-1): the whole window for a branch without padding, else
    one or two blocks per group (the sequence's last, partial segment row apart)."""
    w, r, off, first, c0 = e.segment_length, e.dilation_rate, e.offset, e.first_head, e.first_row
    n_c, m, groups, g_heads, _ = e.o.shape
    last = (c0 + n_c - 1) * w + off + groups - 1 + (m - 1) * r  # the window's last row
    if min(c0, off, first) >= 0 and off + groups - 1 + (m - 1) * r < w and last < rows:
        if first + groups * g_heads <= heads:
            return [(0, n_c, 0, m, 0, groups, 0, g_heads)]
    full = rows // w  # segment rows wholly in the sequence; the next one holds rows % w
    spans = [(max(c0, 0), min(c0 + n_c, full), w)]
    if rows % w and c0 <= full < c0 + n_c:
        spans.append((full, full + 1, rows % w))
    blocks = []
    for g in range(groups):
        k0, k1 = max(0, -first - g * g_heads), min(g_heads, heads - first - g * g_heads)
        for ca, cb, limit in spans:
            # the positions off + g + i * r in 0..limit-1
            i0, i1 = max(0, -((off + g) // r)), min(m, -((off + g - limit) // r))
            if ca < cb and i0 < i1 and k0 < k1:
                blocks.append((ca - c0, cb - c0, i0, i1, g, g + 1, k0, k1))
    return blocks


def _window_block(win: Strided, block: tuple[int, ...]) -> torch.Tensor:
    """A block (c0, c1, i0, i1, g0, g1, k0, k1) of a window, as a view."""
    starts, ends = block[::2], block[1::2]
    at = sum(s * st for s, st in zip(starts, win.strides))
    shape = (*(e - s for s, e in zip(starts, ends)), win.shape[-1])
    return win._replace(offset=win.offset + at, shape=shape).view()


def _token_block(x: torch.Tensor, e: MergeEntry, block: tuple[int, ...]) -> torch.Tensor:
    """The rows of x (B, N, H, X), contiguous, that a block of the entry's window covers: a
    view shaped like the block."""
    _, _, heads, width = x.shape
    w, r, g_heads, row = e.segment_length, e.dilation_rate, e.o.shape[3], heads * width
    c, i, g, k = block[::2]
    p = (e.first_row + c) * w + e.offset + g + i * r
    return x.as_strided(
        (*(end - start for start, end in zip(block[::2], block[1::2])), width),
        (w * row, r * row, row + g_heads * width, width, 1),
        x.storage_offset() + (p * heads + e.first_head + g * g_heads + k) * width,
    )
