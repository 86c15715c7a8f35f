"""FlashAttention-4's kernels launched again without its Python wrapper's per-call work.

``flash_attn.cute.interface._flash_attn_fwd`` / ``_flash_attn_bwd`` spend ~0.1 ms of host time
per call (H200 host) choosing tiles, validating and building compile keys before they call
compiled kernels: TVM-FFI functions that take torch tensors and launch on the current stream.
For one call signature (shapes, strides, dtypes, alignment, device, flags) the wrapper makes
the same launches every time. ``Launches`` records them during a wrapper call (which compiled
function, with which arguments) and replays them for later calls of that signature: the
caller's tensors put in, the wrapper's own buffers allocated anew, zero-filled where the
wrapper zero-filled them. The dilated op makes up to nine such calls per direction and layer
at 65K tokens, where the host, not the GPU, sets the pace.

A record is kept only when it is complete:

- every tensor a kernel got is one of the caller's tensors (the same view of memory: same data
  pointer, shape and strides) or a buffer the wrapper allocated during the call (or a view of
  one);
- no other argument holds a tensor inside;
- the wrapper ran no PyTorch op but allocations, zero fills of its new buffers and views
  (a copy that makes an input contiguous, or a compile's own work, spoils the record).

A spoiled record leaves that call to the wrapper and the next call of the signature records
again; after ``MAX_TRIES`` spoiled records the signature stays with the wrapper.
"""

from __future__ import annotations

import dataclasses
import threading
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch.utils._python_dispatch import TorchDispatchMode, _disable_current_modes

from longvit import config

aten = torch.ops.aten

# Versions of flash-attn-4 whose wrapper was checked to launch only through its compile caches
# (GPU tests: tests/test_attention_gpu.py). LONGVIT_FA4_REPLAY=1 replays on any version,
# LONGVIT_FA4_REPLAY=0 never.
TESTED_VERSIONS = ("4.0.0b36",)
MAX_TRIES = 3
MAX_RECORDS = 4096

_ZEROED_ALLOCATIONS = {aten.zeros.default, aten.zeros_like.default, aten.new_zeros.default}
_ALLOCATIONS = _ZEROED_ALLOCATIONS | {
    aten.empty.memory_format,
    aten.empty_strided.default,
    aten.empty_like.default,
    aten.new_empty.default,
    aten.new_empty_strided.default,
}
_FILLS = {aten.zero_.default, aten.fill_.Scalar}


class _Spoiled(Exception):
    """The wrapper did something a replay would not repeat."""


@dataclasses.dataclass(frozen=True)
class _Buffer:
    """A tensor the wrapper allocated: replays allocate it anew."""

    shape: tuple[int, ...]
    stride: tuple[int, ...]
    dtype: torch.dtype
    zeroed: bool


@dataclasses.dataclass(frozen=True)
class _Caller:
    """A kernel argument that is the caller's tensor ``index`` (the same view of memory)."""

    index: int


@dataclasses.dataclass(frozen=True)
class _View:
    """A kernel argument that is buffer ``base`` itself when ``same`` is True, else
    base.as_strided(shape, stride, offset)."""

    base: int
    same: bool
    offset: int = 0
    shape: tuple[int, ...] = ()
    stride: tuple[int, ...] = ()


@dataclasses.dataclass(frozen=True)
class _Record:
    """The launches of one signature: (compiled function, args, kwargs) with _View arguments."""

    buffers: tuple[_Buffer, ...]
    launches: tuple[tuple[Callable, tuple, dict], ...]

    def replay(self, tensors: Sequence[torch.Tensor]) -> None:
        device = tensors[0].device
        bufs = []
        for b in self.buffers:
            t = torch.empty_strided(b.shape, b.stride, dtype=b.dtype, device=device)
            bufs.append(t.zero_() if b.zeroed else t)

        def arg(a):
            if isinstance(a, _Caller):
                return tensors[a.index]
            if isinstance(a, _View):
                base = bufs[a.base]
                return base if a.same else base.as_strided(a.shape, a.stride, a.offset)
            return a

        for fn, args, kwargs in self.launches:
            fn(*map(arg, args), **{k: arg(v) for k, v in kwargs.items()})


def _key(tensors: Sequence[torch.Tensor]) -> tuple:
    """Each tensor's shape, strides, dtype, alignment and requires_grad, and which of them
    are the same view of memory."""
    views = [(t.data_ptr(), tuple(t.shape), t.stride()) for t in tensors]
    same = tuple(views.index(x) for x in views)
    return (*((t.dtype, x[0] % 32, x[1], x[2], t.requires_grad) for t, x in zip(tensors, views)),
            same)  # fmt: skip


def _holds_tensor(x, depth: int = 0) -> bool:
    """Whether x is or holds a tensor (in containers, dataclasses, attributes); deeper than
    four levels counts as holding one."""
    if isinstance(x, torch.Tensor) or depth > 4:
        return True
    if x is None or isinstance(x, (bool, int, float, complex, str, bytes, torch.dtype)):
        return False
    if isinstance(x, (tuple, list, set, frozenset)):
        return any(_holds_tensor(y, depth + 1) for y in x)
    if isinstance(x, dict):
        return any(_holds_tensor(y, depth + 1) for y in x.values())
    fields = list(getattr(x, "__dict__", {}).values())
    slots = getattr(type(x), "__slots__", ())
    fields += [getattr(x, n, None) for n in ((slots,) if isinstance(slots, str) else slots)]
    return any(_holds_tensor(y, depth + 1) for y in fields)


class _Recorder(TorchDispatchMode):
    """Watches one wrapper call: its allocations (buffers), its other PyTorch ops (which spoil
    the record) and, through the compile caches, its kernel launches."""

    def __init__(self, tensors: Sequence[torch.Tensor]):
        super().__init__()
        self.tensors = list(tensors)
        self.buffers: list[_Buffer] = []
        self.buffer_tensors: list[torch.Tensor] = []
        self.used: set[int] = set()  # buffers a launch has had
        self.launches: list[tuple[Callable, tuple, dict]] = []
        self.spoiled: str | None = None

    # -- PyTorch ops
    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        if self.spoiled is None:
            try:
                self._see(func, args, out)
            except _Spoiled as e:
                self.spoiled = str(e)
        return out

    def _see(self, func, args, out) -> None:
        if func in _ALLOCATIONS:
            t = out
            if t.device != self.tensors[0].device:
                raise _Spoiled(f"{func} on {t.device}")
            zeroed = func in _ZEROED_ALLOCATIONS
            self.buffers.append(_Buffer(tuple(t.shape), t.stride(), t.dtype, zeroed))
            self.buffer_tensors.append(t)
            return
        if func in _FILLS:
            i = self._buffer_of(args[0])
            whole = i is not None and self._is_whole(args[0], i)
            zero = func is aten.zero_.default or args[1] == 0
            if not (whole and zero and i not in self.used):
                raise _Spoiled(f"{func} on a tensor other than a new buffer")
            self.buffers[i] = dataclasses.replace(self.buffers[i], zeroed=True)
            return
        if not func.is_view and func not in (aten.detach.default, aten.alias.default):
            raise _Spoiled(f"the wrapper ran {func}")

    def _buffer_of(self, t: torch.Tensor) -> int | None:
        ptr = t.untyped_storage().data_ptr()
        for i in range(len(self.buffer_tensors) - 1, -1, -1):  # the newest owns reused memory
            if self.buffer_tensors[i].untyped_storage().data_ptr() == ptr:
                return i
        return None

    def _is_whole(self, t: torch.Tensor, i: int) -> bool:
        return _same_view(t, self.buffer_tensors[i])

    # -- kernel launches
    def launch(self, fn: Callable, args: tuple, kwargs: dict):
        if self.spoiled is None:
            try:
                view_args = tuple(self._arg(a) for a in args)
                view_kwargs = {k: self._arg(v) for k, v in kwargs.items()}
                self.launches.append((fn, view_args, view_kwargs))
            except _Spoiled as e:
                self.spoiled = str(e)
        with _disable_current_modes():  # what runs inside a kernel is not the wrapper's doing
            return fn(*args, **kwargs)

    def _arg(self, a):
        if not isinstance(a, torch.Tensor):
            if _holds_tensor(a):
                raise _Spoiled(f"a launch argument holds tensors inside ({type(a).__name__})")
            return a
        for i, t in enumerate(self.tensors):
            if _same_view(a, t):
                return _Caller(i)
        i = self._buffer_of(a)
        if i is None:
            raise _Spoiled("a launch got a tensor that is neither the caller's nor a new buffer")
        self.used.add(i)
        b = self.buffer_tensors[i]
        if a.dtype != b.dtype:
            raise _Spoiled("a launch got a buffer viewed as another dtype")
        if _same_view(a, b):
            return _View(i, True)
        return _View(i, False, a.storage_offset(), tuple(a.shape), a.stride())

    def record(self) -> _Record:
        if self.spoiled is not None:
            raise _Spoiled(self.spoiled)
        if not self.launches:
            raise _Spoiled("the wrapper launched nothing through its compile caches")
        return _Record(tuple(self.buffers), tuple(self.launches))


class _Cache:
    """Stands in for a wrapper's compile cache while it is watched: lookups hand out the
    compiled function wrapped so that its launches are recorded."""

    def __init__(self, cache, recorder: _Recorder):
        self.cache, self.recorder = cache, recorder

    def __contains__(self, key) -> bool:
        return key in self.cache

    def __setitem__(self, key, fn) -> None:
        self.cache[key] = fn

    def __getitem__(self, key):
        fn = self.cache[key]
        recorder = self.recorder
        return lambda *args, **kwargs: recorder.launch(fn, args, kwargs)

    def __getattr__(self, name):
        return getattr(self.cache, name)


class Launches:
    """Records and replays the launches of FA4's entry points per call signature.

    ``call(fn, tensors, flags)`` runs ``fn(**tensors, **flags)`` (a wrapper; its return value
    is dropped, so every output must be among ``tensors``) or replays its record. ``flags``
    are hashable: everything besides the tensors that the wrapper's choices depend on."""

    def __init__(self, interface):
        self.interface = interface
        self.records: dict[tuple, _Record] = {}
        self.tries: dict[tuple, int] = {}
        self.lock = threading.Lock()
        self.replays = 0  # calls served by a record (for tests and probes)
        self.last_spoiled: str | None = None  # why the last record was not kept

    def call(self, fn: Callable, tensors: dict[str, torch.Tensor], flags: dict) -> None:
        values = list(tensors.values())
        key = (fn, *tensors, *flags.items(), values[0].device, _key(values))
        record = self.records.get(key)
        if record is not None:
            self.replays += 1
            record.replay(values)
            return
        if self.tries.get(key, 0) >= MAX_TRIES:
            fn(**tensors, **flags)
            return
        with self.lock:
            self._record(key, lambda: fn(**tensors, **flags), values)

    def _record(self, key, run: Callable[[], Any], tensors: list[torch.Tensor]) -> None:
        recorder = _Recorder(tensors)
        owners = [f for f in vars(self.interface).values() if hasattr(f, "compile_cache")]
        caches = [f.compile_cache for f in owners]
        try:
            for f, c in zip(owners, caches):
                f.compile_cache = _Cache(c, recorder)
            with recorder:
                run()
        finally:
            for f, c in zip(owners, caches):
                f.compile_cache = c
        try:
            record = recorder.record()
        except _Spoiled as e:
            self.tries[key] = self.tries.get(key, 0) + 1
            self.last_spoiled = str(e)
            return
        if len(self.records) >= MAX_RECORDS:
            self.records.clear()
        self.records[key] = record


def _same_view(a: torch.Tensor, b: torch.Tensor) -> bool:
    return (
        a.data_ptr() == b.data_ptr()
        and a.dtype == b.dtype
        and a.shape == b.shape
        and a.stride() == b.stride()
    )


def replay_enabled(version: str | None) -> bool:
    """LONGVIT_FA4_REPLAY=1/0 forces replays on or off; else on for the tested versions."""
    forced = config.fa4_replay()
    if forced is not None:
        return forced
    return version in TESTED_VERSIONS


def fa4_version() -> str | None:
    from importlib import metadata

    try:
        return metadata.version("flash-attn-4")
    except metadata.PackageNotFoundError:
        return None
