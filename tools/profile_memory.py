"""Where the memory of a LongViT training step goes: live tensor bytes at the peak, by cause.

Runs the step of ``tools/bench_model.py`` (forward_patches on streamed uint8
patches, bf16 autocast, gradient checkpointing per block, AdamW) under a
``TorchDispatchMode`` that sees every tensor an op creates. Each untyped storage
is counted once, from the op that created it until it is freed (a weakref
callback on the storage). Every allocation is labelled with

- the phase: forward, recompute (a checkpointed forward re-run in the backward),
  backward, optimizer;
- the module that ran it (``blocks.3.attn.qkv``) or, in the backward, the
  autograd node (``NativeLayerNormBackward0``) and the block being recomputed;
- the op, dtype and shape.

Parameter gradients and optimizer state (sized by the model, not by the token
count) are kept apart; the peak reported is the peak of everything else, the
part that grows with the tokens. It is given in bytes per token, split by
category; the attention core (``MultiheadDilatedAttention`` minus its
projections and norm) is a category of its own because it runs different
kernels on CPU than on CUDA. Two sizes give the marginal bytes per token.

    PYTHONPATH=. python tools/profile_memory.py --tokens 16384 32768
    PYTHONPATH=. python tools/profile_memory.py --tokens 4096 --depth 2 --scale 256  # CPU
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import re
import time
import weakref
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from tools.bench_model import build, make_inputs, train_step

KIB = 1024


@dataclass
class Allocation:
    """One untyped storage: who made it, how big (bytes), and whether it scales with N."""

    nbytes: int
    phase: str  # inputs / forward / recompute / backward / optimizer
    module: str  # module path, "" outside any module
    block: int | None  # block index (for the backward: the block last recomputed)
    op: str  # aten op, or "<node>: <op>" in the backward
    dtype: str
    shape: tuple[int, ...]
    per_token: bool = True  # False for parameter gradients and optimizer state


class MemoryProfiler(TorchDispatchMode):
    """Tracks live storage bytes created inside the mode, their peak and what was live then."""

    def __init__(self, model: torch.nn.Module, device_type: str = "cpu"):
        super().__init__()
        self.device_type = device_type  # storages elsewhere (pinned host memory) are not counted
        self.live: dict[int, Allocation] = {}
        self.current = 0  # per-token bytes live now
        self.fixed = 0  # parameter gradients + optimizer state live now
        self.peak = 0
        self.peak_fixed = 0
        self.peak_where = ""
        self.peak_snapshot: list[Allocation] | None = None
        self._at_peak = False
        self.phase = "inputs"
        self.block: int | None = None
        self._stack: list[str] = []
        self._names = {id(m): name for name, m in model.named_modules()}
        # anything shaped like a parameter (its gradient, its autocast copy, its optimizer
        # state) is sized by the model, not by the token count; avoid N in these shapes
        self._param_shapes = {tuple(p.shape) for p in model.parameters()}
        # storages that exist before the step (parameters, buffers): views of them are no
        # allocation
        self._foreign = {t.untyped_storage()._cdata for t in model.state_dict().values()}
        self._hooks = []

    # ---------------------------------------------------------- module stack
    def __enter__(self):
        pre = torch.nn.modules.module.register_module_forward_pre_hook(self._push)
        post = torch.nn.modules.module.register_module_forward_hook(self._pop, always_call=True)
        self._hooks = [pre, post]
        return super().__enter__()

    def __exit__(self, *exc):
        for hook in self._hooks:
            hook.remove()
        return super().__exit__(*exc)

    def _push(self, module, args):
        name = self._names.get(id(module))
        if name is not None:
            self._stack.append(name)
            match = re.match(r"blocks\.(\d+)$", name)
            if match:
                self.block = int(match.group(1))

    def _pop(self, module, args, output):
        if self._names.get(id(module)) is not None and self._stack:
            self._stack.pop()

    def set_phase(self, phase: str) -> None:
        self.phase = phase

    # ------------------------------------------------------------- tracking
    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_flatten(out)[0]:
            if isinstance(t, torch.Tensor) and t.device.type == self.device_type:
                self._track(t, func)
        return out

    def _track(self, t: torch.Tensor, func) -> None:
        st = t.untyped_storage()
        key = st._cdata
        if key in self.live or key in self._foreign or st.nbytes() == 0:
            return
        phase = self.phase
        module = self._stack[-1] if self._stack else ""
        in_block = re.match(r"blocks\.(\d+)", module)
        block = int(in_block.group(1)) if in_block else None
        op = func.__name__
        if phase == "backward":
            if self._stack:
                phase = "recompute"
            else:
                node = torch._C._current_autograd_node()
                op = f"{node.name() if node is not None else '?'}: {op}"
                block = self.block  # the block last recomputed
        shape = tuple(t.shape)
        fixed = phase == "optimizer" or shape in self._param_shapes
        rec = Allocation(
            st.nbytes(), phase, module, block, op, str(t.dtype).replace("torch.", ""),
            shape, per_token=not fixed,
        )  # fmt: skip
        self.live[key] = rec
        weakref.finalize(st, self._free, key)
        if fixed:
            self.fixed += rec.nbytes
            self.peak_fixed = max(self.peak_fixed, self.fixed)
            return
        self.current += rec.nbytes
        if self.current > self.peak:
            self.peak = self.current
            self.peak_where = f"{phase} {module or op}"
            self._at_peak = True

    def _free(self, key: int) -> None:
        rec = self.live.get(key)
        if rec is None:
            return
        if rec.per_token and self._at_peak:  # leaving a new peak: remember what made it
            self.peak_snapshot = [r for r in self.live.values() if r.per_token]
            self._at_peak = False
        del self.live[key]
        if rec.per_token:
            self.current -= rec.nbytes
        else:
            self.fixed -= rec.nbytes

    def finish(self) -> None:
        if self._at_peak:
            self.peak_snapshot = [r for r in self.live.values() if r.per_token]
            self._at_peak = False


@contextlib.contextmanager
def cuda_autocast_policy(device_type: str):
    """On CPU, run F.layer_norm under autocast the way CUDA's autocast does.

    CUDA's autocast runs layer_norm in float32 (a float32 copy of the input in,
    float32 out); CPU's runs it in bf16. The profile is of the CUDA step, so on CPU
    F.layer_norm is made to do what it does there.
    """
    original = F.layer_norm

    def layer_norm(x, normalized_shape, weight=None, bias=None, eps=1e-5):
        if not torch.is_autocast_enabled(device_type):
            return original(x, normalized_shape, weight, bias, eps)
        with torch.autocast(device_type, enabled=False):
            w, b = (None if t is None else t.float() for t in (weight, bias))
            return original(x.float(), normalized_shape, w, b, eps)

    F.layer_norm = layer_norm
    try:
        yield
    finally:
        F.layer_norm = original


# --------------------------------------------------------------- categories
def category(rec: Allocation) -> str:
    """A short cause for an allocation: which part of the model made it, in which phase."""
    mod = re.sub(r"^blocks\.\d+\.?", "block.", rec.module) if rec.module else ""
    if rec.phase == "backward":
        node = rec.op.split(":")[0]
        if "DilatedAttention" in node:
            return "attention core (black box): backward"
        return f"backward: {node}"
    if mod == "block.attn":
        return f"attention core (black box): {rec.phase}"
    return f"{rec.phase}: {mod or '(top level)'} {rec.op.split('.')[0]}"


def breakdown(snapshot: list[Allocation], n_tokens: int, current_block: int | None):
    """Per-token bytes at the peak by category; checkpointed block outputs kept apart."""
    groups: dict[str, list] = defaultdict(lambda: [0, 0, set()])
    for rec in snapshot:
        key = category(rec)
        if rec.phase == "forward" and rec.block is not None and rec.block != current_block:
            key = f"forward, kept: {key.split(': ', 1)[1]} (other blocks)"
        g = groups[key]
        g[0] += rec.nbytes
        g[1] += 1
        g[2].add(f"{rec.dtype}{list(rec.shape)}")
    rows = [
        dict(category=k, bytes_per_token=v[0] / n_tokens, tensors=v[1], examples=sorted(v[2])[:3])
        for k, v in groups.items()
    ]
    return sorted(rows, key=lambda r: -r["bytes_per_token"])


def profile(args, n: int) -> dict:
    model, opt = build(args, **({} if args.depth is None else dict(depth=args.depth)))
    model.set_activation_offload(args.offload)
    depth = len(model.blocks)
    dtype = getattr(torch, args.dtype)
    gc.collect()
    cuda = args.device.startswith("cuda")
    if cuda:  # the allocator's own peak, to check the profiler against
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
    prof = MemoryProfiler(model, torch.device(args.device).type)
    t0 = time.perf_counter()
    policy = (
        cuda_autocast_policy(args.device)
        if args.device == "cpu" and args.cuda_policy
        else contextlib.nullcontext()
    )
    with policy, prof:
        inputs = make_inputs(n, args.device, args.patches_on_host)  # phase "inputs"
        train_step(model, opt, inputs, dtype, args.device, on_phase=prof.set_phase)
        prof.finish()
    seconds = time.perf_counter() - t0
    allocator_peak = torch.cuda.max_memory_allocated() - base if cuda else None
    snapshot = prof.peak_snapshot or []
    # the block whose backward is running at the peak: the lowest index recomputed and alive
    recomputed = [r.block for r in snapshot if r.phase in ("recompute", "backward")]
    current = min((b for b in recomputed if b is not None), default=None)
    rows = breakdown(snapshot, n, current)
    # what each earlier block leaves alive for the backward (its checkpointed output)
    kept = [r for r in snapshot if r.phase == "forward" and r.block not in (None, current)]
    kept_per_block = sum(r.nbytes for r in kept) / max(1, len({r.block for r in kept}))
    attn = sum(r["bytes_per_token"] for r in rows if r["category"].startswith("attention core"))
    return dict(
        tokens=n,
        seconds=seconds,
        peak_bytes=prof.peak,
        peak_bytes_per_token=prof.peak / n,
        attention_core_bytes_per_token=attn,
        peak_where=prof.peak_where,
        peak_block=current,
        fixed_peak_bytes=prof.peak_fixed,
        cuda_allocator_peak_bytes=allocator_peak,
        depth=depth,
        kept_bytes_per_block_per_token=kept_per_block / n,
        peak_bytes_per_token_at_depth={
            d: (prof.peak + (d - depth) * kept_per_block) / n for d in sorted({depth, 12, 24})
        },
        breakdown=rows,
    )


def print_profile(res: dict, top: int) -> None:
    n = res["tokens"]
    print(
        f"\n{n:,} tokens: peak {res['peak_bytes'] / 2**20:,.1f} MiB of per-token tensors = "
        f"{res['peak_bytes_per_token'] / KIB:.2f} KiB/token (attention core "
        f"{res['attention_core_bytes_per_token'] / KIB:.2f}, the rest "
        f"{(res['peak_bytes_per_token'] - res['attention_core_bytes_per_token']) / KIB:.2f}); "
        f"at '{res['peak_where']}', block {res['peak_block']}; + parameter gradients and "
        f"optimizer state {res['fixed_peak_bytes'] / 2**20:,.0f} MiB; step {res['seconds']:.1f} s",
        flush=True,
    )
    if res["cuda_allocator_peak_bytes"] is not None:
        print(
            f"  CUDA allocator peak above the model: "
            f"{res['cuda_allocator_peak_bytes'] / 2**30:.2f} GiB (profiler: per-token peak "
            f"{res['peak_bytes'] / 2**30:.2f} GiB + fixed up to "
            f"{res['fixed_peak_bytes'] / 2**30:.2f} GiB)"
        )
    at_depth = ", ".join(
        f"{d} blocks {v / KIB:.2f}" for d, v in res["peak_bytes_per_token_at_depth"].items()
    )
    print(
        f"  each earlier block keeps {res['kept_bytes_per_block_per_token'] / KIB:.2f} KiB/token; "
        f"peak with the same working set at depth: {at_depth} KiB/token"
    )
    print(f"  {'KiB/token':>9}  {'tensors':>7}  category  (examples)")
    for row in res["breakdown"][:top]:
        print(
            f"  {row['bytes_per_token'] / KIB:9.3f}  {row['tensors']:7d}  {row['category']}  "
            f"({', '.join(row['examples'])})"
        )


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="longvit_base")
    p.add_argument("--device", default="cpu")
    p.add_argument("--tokens", type=int, nargs="+", default=[16384, 32768])
    p.add_argument("--dtype", choices=["bfloat16", "float32"], default="bfloat16")
    p.add_argument("--patch-chunk", type=int, default=65536)
    p.add_argument("--mlp-chunk", type=int, default=262144)
    p.add_argument("--patches-on-host", action="store_true", help="as in bench_model.py")
    p.add_argument(
        "--scale", type=int, default=1,
        help="divide --patch-chunk and --mlp-chunk by this (a small run with the chunk "
        "to sequence ratio of a large one: --tokens 16384 --scale 64 is 1M tokens' ratio)",
    )  # fmt: skip
    p.add_argument("--attn-backend", default="auto")
    p.add_argument(
        "--depth", type=int, default=None,
        help="override the model's depth (CPU: 2 blocks run in minutes; the peak is then "
        "extrapolated to 12 and 24 blocks from what each earlier block keeps)",
    )  # fmt: skip
    p.add_argument("--residual-dtype", choices=["float32", "bfloat16"], default="float32")
    p.add_argument("--no-checkpointing", action="store_true")
    p.add_argument("--offload", action="store_true")
    p.add_argument(
        "--cuda-policy", action=argparse.BooleanOptionalAction, default=True,
        help="on CPU, run layer_norm under autocast in float32 as CUDA does (default on)",
    )  # fmt: skip
    p.add_argument("--top", type=int, default=25, help="categories printed")
    p.add_argument("--json", type=Path, default=None)
    args = p.parse_args(argv)
    args.patch_chunk //= args.scale
    args.mlp_chunk //= args.scale
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    torch.manual_seed(0)
    print(
        f"{args.model}, {args.device}, autocast {args.dtype}, checkpointing "
        f"{'off' if args.no_checkpointing else 'on'}, patch chunk {args.patch_chunk}, "
        f"MLP chunk {args.mlp_chunk}, torch {torch.__version__}",
        flush=True,
    )
    results = []
    for n in args.tokens:
        res = profile(args, n)
        print_profile(res, args.top)
        results.append(res)
    if len(results) >= 2:
        a, b = results[0], results[-1]
        marginal = (b["peak_bytes"] - a["peak_bytes"]) / (b["tokens"] - a["tokens"])
        span = f"{a['tokens']:,} -> {b['tokens']:,}"
        print(f"\nmarginal: {marginal / KIB:.2f} KiB per token ({span})")
    if args.json is not None:
        args.json.write_text(json.dumps(results, indent=2, default=str))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
