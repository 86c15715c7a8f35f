#!/usr/bin/env python
"""Where does GPU time go? Probes for one GPU session, printed as tables.

1. ``kernels``: the fused attention kernels longvit can call (cuDNN, PyTorch's flash, and the
   flash implementations torch lists, e.g. 'FA3', activated one after another), timed forward
   and forward+backward at ~1M tokens in total (12 heads x 64, bf16) as (B', H, L, D) batches
   of segments of length L, with the out/LSE difference to cuDNN.
2. ``step``: torch.profiler over one longvit_base training step (``tools/bench_model.py``'s),
   CUDA time per kernel family, top rows, and the copies grouped by call site.
3. ``norms``: a LayerNorm feeding a Linear at (1, tokens, 768), bf16 autocast, forward and
   forward+backward: nn.LayerNorm as autocast runs it (float32), longvit's LinearInputNorm,
   F.layer_norm on bf16 (weights cast), and LinearInputNorm on its ATen path and compiled.
4. ``preprocess``: the extractor's GPU preprocessing (uint8 224-px tiles -> vit_base_patch16_224
   input: bicubic resize to 248, centre crop, normalise) against the model's forward, per
   512-tile batch: each pass apart, a compiled variant, the host-to-device copy, and 8 batches
   run as the extraction loop does, with and without the copy + preprocessing on a side stream.
5. ``overhead``: is the dilated_attention op (forward + backward, bf16, 12 x 64 heads, LongViT
   schedules) bound by the host? Its GPU time against the host time it takes to enqueue the
   same work while the GPU is kept busy (so the host never waits): where the two are close,
   fewer ops or CUDA graphs are the lever, not the kernels. Also the time of one step started
   on an idle GPU (as bench_attention times it) against steps back to back.
6. ``strided``: cuDNN fed the dilated views in place (no gathers) against gathered inputs.
7. ``layer``: the kernel table of one MultiheadDilatedAttention layer at 1M tokens.
8. ``tiles``: the op at 65K and 262K tokens for several tile sizes of the data-movement kernels.
9. ``timeline``: a Chrome trace of one op step at 65K tokens (``--trace``) and the gaps between
   its kernels (the profiler's own buffer requests show up as gaps too: read the trace).
10. ``compile``: three longvit_base training steps in a fresh process (set TRITON_CACHE_DIR to an
   empty directory): what compiling the Triton kernels adds to the first.
11. ``fa4``: FlashAttention-4 (``flash-attn-4``, when installed) against cuDNN, dense and on
   dilated branches read in place.
12. ``inplace``: the op with every call read in place, every call gathered, and longvit's rule
   (``dilated.IN_PLACE_ELEMENTS_PER_CALL``), on a backend that reads strided windows.
13. ``host``: where the op's host time goes at 65K tokens (auto backend): the host time to
   enqueue one forward + backward while the GPU is kept busy, for each in-place choice, the
   time from an idle GPU with and without a head start for the host, host time by part, the
   forward and backward apart, and the host cost of single launches.
14. ``cpu_host``: the op's own Python, on CPU, without a GPU: LongViT's 65K call structure (the
   8192-px schedule scaled down 16x, 12 heads) on a backend whose kernels and data movement do
   nothing, ms per forward + backward for each in-place choice, and a cProfile of the in-place
   steps. What the op's code itself costs the host, measurable on the development machine.
15. ``merge``: ``strided_ops.merge_all`` (every branch in one launch, the merged LSE written
   back) against the per-window merges into a float32 accumulator and the cast it replaced,
   LongViT's 8192-px branches at 65K tokens, bf16, head dims 64 and 128: GPU time of one call
   from an idle GPU and host time per call.

    PYTHONPATH=. python tools/probe_kernels.py step norms --tokens 1048576 --keep-attention
    PYTHONPATH=. python tools/probe_kernels.py preprocess overhead
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import time
from pathlib import Path

import torch
from torch.utils._python_dispatch import TorchDispatchMode

aten = torch.ops.aten


def _time(fn, iters=5):
    fn()
    torch.cuda.synchronize()
    t = time.perf_counter()
    for _ in range(iters):
        fn()
    torch.cuda.synchronize()
    return (time.perf_counter() - t) / iters


def _synced_median(fn) -> float:
    """Median seconds of fn() started on an idle GPU, as bench_attention times it."""
    from tools.bench_attention import cuda_time

    return cuda_time(fn, warmup=1, iters=20)


def op_step(tokens: int, heads: int, head_dim: int, segments, rates):
    """One forward + backward of dilated_attention on random bf16 q, k, v (1, tokens, heads,
    head_dim) on the GPU, as a closure to time or profile."""
    from longvit.attention import dilated_attention

    q, k, v = (
        torch.randn(
            1, tokens, heads, head_dim, device="cuda", dtype=torch.bfloat16, requires_grad=True
        )  # fmt: skip
        for _ in range(3)
    )
    go = torch.randn_like(q)

    def step():
        out = dilated_attention(q, k, v, segments, rates)
        torch.autograd.grad(out, (q, k, v), go)

    return step


def probe_kernels(total_tokens: int, lengths: list[int]) -> None:
    from longvit.attention.backends import BACKENDS

    impls = []
    try:
        from torch.nn import attention as nna

        impls = list(nna.list_flash_attention_impls())
        current = nna.current_flash_attention_impl()
        print("flash attention impls listed:", impls, "current:", current)
    except Exception as e:  # noqa: BLE001  (older torch)
        print("no flash impl registry:", type(e).__name__, e)
    heads, dim = 12, 64
    print(f"{'kernel':>12} {'L':>7} {'fwd s':>9} {'TF/s':>6} {'fwd+bwd s':>10} {'TF/s':>6} "
          f"{'|out-cudnn|':>11} {'|lse-cudnn|':>11}")  # fmt: skip
    refs = {}
    variants = [("cudnn", None), ("flash", None)] + [("flash", i) for i in impls]
    for name, impl in variants:
        label = impl or name
        if impl is not None:
            try:
                nna.activate_flash_attention_impl(impl)
            except Exception as e:  # noqa: BLE001
                print(f"{label:>12} cannot activate: {type(e).__name__}: {str(e)[:200]}")
                continue
        b = BACKENDS[name]
        for length in lengths:
            try:
                t_f, t_fb, out, lse, flops = _measure(b, total_tokens, length, heads, dim)
            except Exception as e:  # noqa: BLE001
                print(f"{label:>12} {length:>7} failed: {type(e).__name__}: {str(e)[:200]}")
                continue
            if name == "cudnn":
                refs[length] = (out, lse)
                d_out = d_lse = 0.0
            else:
                ro, rl = refs[length]
                d_out = (out - ro).abs().max().item()
                d_lse = (lse - rl).abs().max().item()
            print(
                f"{label:>12} {length:>7} {t_f:>9.4f} {flops / t_f / 1e12:>6.0f} {t_fb:>10.4f} "
                f"{3.5 * flops / t_fb / 1e12:>6.0f} {d_out:>11.2e} {d_lse:>11.2e}",
                flush=True,
            )
            torch.cuda.empty_cache()


def _measure(b, total_tokens, length, heads, dim):
    """(fwd s, fwd+bwd s, out float, lse float, fwd FLOPs) of backend b on random inputs."""
    scale = dim**-0.5
    bp = max(1, total_tokens // length)
    gen = torch.Generator("cuda").manual_seed(length)
    q, k, v = (
        torch.randn(bp, heads, length, dim, device="cuda", dtype=torch.bfloat16, generator=gen)
        for _ in range(3)
    )
    out, lse, _ = b.forward(q, k, v, None, False, 0.0, scale)
    dout = torch.randn_like(out)
    t_f = _time(lambda: b.forward(q, k, v, None, False, 0.0, scale))

    def fwd_bwd():
        o, s, st = b.forward(q, k, v, None, False, 0.0, scale)
        b.backward(dout, q, k, v, o, s, None, False, 0.0, scale, st)

    t_fb = _time(fwd_bwd)
    return t_f, t_fb, out.float(), lse.float(), 4 * bp * heads * length * length * dim


def probe_fa4(total_tokens: int, lengths: list[int]) -> None:
    """FlashAttention-4 (``flash_attn.cute``, when importable) against cuDNN: forward and
    forward+backward TFLOP/s at ~total_tokens as segments of L (12 heads x 64, bf16, FA4 on
    its (B, L, H, D) layout), then dilated branches read in place by FA4 (strided windows, no
    gather) against gather + cuDNN."""
    head = f"{'kernel':>8} {'L':>7} {'fwd s':>9} {'TF/s':>6} {'fwd+bwd s':>10} {'TF/s':>6}"
    print(f"{head} {'|out-cudnn|':>11} {'|lse-cudnn|':>11} {'|dq-cudnn|':>10}")
    for length in lengths:
        _fa4_dense(total_tokens, length)
        torch.cuda.empty_cache()
    print("\none branch in place (FA4 on strided windows) against gather + cuDNN, fwd+bwd ms")
    for n, w, r in [(65536, 4096, 2), (65536, 16384, 8), (65536, 65536, 16), (262144, 65536, 8),
                    (1048576, 262144, 8)]:  # fmt: skip
        try:
            _fa4_branch(n, w, r)
        except Exception as e:  # noqa: BLE001
            print(f"  N={n:,} w={w} r={r}: failed: {type(e).__name__}: {str(e)[:300]}")
        torch.cuda.empty_cache()


def _fa4_dense(total_tokens: int, length: int, heads: int = 12, dim: int = 64) -> None:
    from flash_attn.cute import interface as fa4

    from longvit.attention.backends import BACKENDS

    cudnn, scale = BACKENDS["cudnn"], dim**-0.5
    bp = max(1, total_tokens // length)
    q, k, v, go = (
        torch.randn(bp, length, heads, dim, device="cuda", dtype=torch.bfloat16) for _ in range(4)
    )
    flops = 4 * bp * heads * length * length * dim
    tq, tk, tv, tgo = (t.transpose(1, 2) for t in (q, k, v, go))
    o_c, l_c, st = cudnn.forward(tq, tk, tv, None, False, 0.0, scale)
    g_c = cudnn.backward(tgo, tq, tk, tv, o_c, l_c, None, False, 0.0, scale, st)
    t0 = time.perf_counter()
    o_f, l_f, *_ = fa4._flash_attn_fwd(q, k, v, softmax_scale=scale, return_lse=True)
    g_f = fa4._flash_attn_bwd(q, k, v, o_f, go, l_f, softmax_scale=scale)
    torch.cuda.synchronize()
    first = time.perf_counter() - t0
    diffs = (
        (o_f.transpose(1, 2).float() - o_c.float()).abs().max().item(),
        (l_f.float() - l_c.float().reshape(l_f.shape)).abs().max().item(),
        (g_f[0].transpose(1, 2).float() - g_c[0].float()).abs().max().item(),
    )

    def c_f():
        return cudnn.forward(tq, tk, tv, None, False, 0.0, scale)

    def c_fb():
        o, s, st = c_f()
        cudnn.backward(tgo, tq, tk, tv, o, s, None, False, 0.0, scale, st)

    def f_f():
        return fa4._flash_attn_fwd(q, k, v, softmax_scale=scale, return_lse=True)

    def f_fb():
        o, s, *_ = f_f()
        fa4._flash_attn_bwd(q, k, v, o, go, s, softmax_scale=scale)

    for name, fwd, fb, d in [("cudnn", c_f, c_fb, (0, 0, 0)), ("fa4", f_f, f_fb, diffs)]:
        t_f, t_fb = _time(fwd), _time(fb)
        print(f"{name:>8} {length:>7} {t_f:>9.4f} {flops / t_f / 1e12:>6.0f} {t_fb:>10.4f} "
              f"{3.5 * flops / t_fb / 1e12:>6.0f} {d[0]:>11.2e} {d[1]:>11.2e} {d[2]:>10.2e}",
              flush=True)  # fmt: skip
    print(f"         (fa4's first forward + backward, compiling included: {first:.1f} s)")


def _fa4_branch(n: int, w: int, r: int, heads: int = 12, dim: int = 64) -> None:
    from flash_attn.cute import interface as fa4

    from longvit.attention.backends import BACKENDS
    from longvit.attention.layout import BranchLayout
    from longvit.attention.windows import call_windows, token_windows

    cudnn, scale = BACKENDS["cudnn"], dim**-0.5
    lay = BranchLayout.of(n, heads, w, r)
    full = [torch.randn(1, n, heads, dim, device="cuda", dtype=torch.bfloat16) for _ in range(4)]
    wins = [token_windows(t, lay, 0, lay.num_segments) for t in full]
    calls = [
        list(zip(*([c.view() for c in call_windows(win[run])] for win in wins)))
        for run in range(len(lay.runs))
    ]
    calls = [c for run in calls for c in run]  # (q, k, v, dout) views per kernel call

    def in_place():
        for qc, kc, vc, gc in calls:
            o, s, *_ = fa4._flash_attn_fwd(qc, kc, vc, softmax_scale=scale, return_lse=True)
            fa4._flash_attn_bwd(qc, kc, vc, o, gc, s, softmax_scale=scale)

    def gathered():
        for views in calls:
            qg, kg, vg, gg = (t.transpose(1, 2).contiguous() for t in views)
            o, s, st = cudnn.forward(qg, kg, vg, None, False, 0.0, scale)
            cudnn.backward(gg, qg, kg, vg, o, s, None, False, 0.0, scale, st)

    qc, kc, vc, _ = calls[0]
    o_p, _, *_ = fa4._flash_attn_fwd(qc, kc, vc, softmax_scale=scale, return_lse=True)
    qg, kg, vg = (t.transpose(1, 2).contiguous() for t in (qc, kc, vc))
    o_g, _, _ = cudnn.forward(qg, kg, vg, None, False, 0.0, scale)
    diff = (o_p.transpose(1, 2).float() - o_g.float()).abs().max().item()
    t_p, t_g = _time(in_place, iters=10), _time(gathered, iters=10)
    print(f"  N={n:>9,} w={w:>7} r={r:>2}: in place {t_p * 1e3:8.2f}  gathered+cudnn "
          f"{t_g * 1e3:8.2f}  calls {len(calls)}  max|diff| {diff:.2e}", flush=True)  # fmt: skip


def probe_in_place() -> None:
    """The op on a backend that reads strided windows (FlashAttention-4) with every call read
    in place against every call gathered, as bench_attention times it (from an idle GPU) and
    back to back: where does reading in place (more kernel calls, no gathers) pay?"""
    from longvit.attention import dilated
    from longvit.attention.backends import resolve_backend

    backend = resolve_backend("auto", torch.device("cuda"), torch.bfloat16, 64, 0.0)
    if not backend.reads_strided:
        print(f"in place: the auto backend ({backend.name}) reads no strided windows; skipped")
        return
    rates = [1, 2, 4, 8, 16]
    configs = [  # tokens, segments, rates
        (65536, [1024, 4096, 8192, 16384, 65536], rates),
        (262144, [1024, 4096, 16384, 65536, 262144], rates),
        (2**20, [1024, 4096, 32768, 262144, 1048576], rates),
        (2**20, [2048 * 2**i for i in range(10)], [2**i for i in range(10)]),  # LongNet
    ]
    rule = dilated.IN_PLACE_ELEMENTS_PER_CALL
    print(f"op ms (from an idle GPU / back to back), {backend.name}, 12 heads x 64, bf16")
    for n, ws, rs in configs:
        step = op_step(n, 12, 64, ws, rs)
        cells = []
        for label, elements in in_place_choices() * 2:
            dilated.IN_PLACE_ELEMENTS_PER_CALL = elements
            cells.append(f"{label} {_synced_median(step) * 1e3:.2f}/{_time(step, 6) * 1e3:.2f}")
        dilated.IN_PLACE_ELEMENTS_PER_CALL = rule
        print(f"{n:>9,} tokens, {len(ws):>2} branches: " + " | ".join(cells), flush=True)
        del step
        torch.cuda.empty_cache()


def in_place_choices() -> list[tuple[str, int]]:
    """(label, dilated.IN_PLACE_ELEMENTS_PER_CALL) for every call read in place, longvit's rule
    and every call gathered: the settings the op probes compare."""
    from longvit.attention import dilated

    return [("in place", 0), ("the rule", dilated.IN_PLACE_ELEMENTS_PER_CALL), ("gathered", 2**62)]


def host_time(fn, steps: int = 8) -> float:
    """Seconds of host time per fn() while the GPU is kept busy, so the host never waits on it."""
    fn()
    torch.cuda.synchronize()
    torch.cuda._sleep(int(2e9))  # ~1 s of GPU spinning: the host runs ahead
    t = time.perf_counter()
    for _ in range(steps):
        fn()
    host = (time.perf_counter() - t) / steps
    torch.cuda.synchronize()
    return host


def probe_host() -> None:
    """The op's host time per forward + backward at 65K tokens, and where it goes: time from an
    idle GPU, back to back, and with the host given a head start (the GPU sleeps first, that
    sleep subtracted): what the GPU waits on the host for."""
    from longvit.attention import dilated

    step = op_step(65536, 12, 64, [1024, 4096, 8192, 16384, 65536], [1, 2, 4, 8, 16])
    rule = dilated.IN_PLACE_ELEMENTS_PER_CALL
    for label, elements in in_place_choices():
        dilated.IN_PLACE_ELEMENTS_PER_CALL = elements
        host = min(host_time(step) for _ in range(3))
        idle, back = _synced_median(step), _time(step, 10)
        ahead = ", ".join(
            f"{us} us ahead {head_start(step, us) * 1e3:.2f}" for us in (200, 500, 1000)
        )
        print(f"65K {label}: host {host * 1e3:.2f} ms, from idle {idle * 1e3:.2f} ms, back to "
              f"back {back * 1e3:.2f} ms; {ahead}", flush=True)  # fmt: skip
        host_parts(step)
        phases()
    dilated.IN_PLACE_ELEMENTS_PER_CALL = rule
    launch_costs()
    from longvit.attention.backends import _fa4_launches

    launches = _fa4_launches()
    if launches is not None:
        print(
            f"FA4 replays: {launches.replays} calls replayed, {len(launches.records)} records, "
            f"{len(launches.tries)} signatures not recorded (last: {launches.last_spoiled})"
        )


def head_start(fn, us: int, iters: int = 20) -> float:
    """Median seconds of fn() from an idle GPU when the GPU first sleeps ``us`` microseconds
    (the host runs ahead meanwhile), that sleep subtracted."""
    import statistics

    cycles = int(us * 1e-6 * torch.cuda.get_device_properties(0).clock_rate * 1e3)

    def timed(with_fn: bool) -> float:
        start, stop = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        torch.cuda.synchronize()
        start.record()
        torch.cuda._sleep(cycles)
        if with_fn:
            fn()
        stop.record()
        torch.cuda.synchronize()
        return start.elapsed_time(stop) / 1e3

    fn()
    both = statistics.median(timed(True) for _ in range(iters))
    sleep = statistics.median(timed(False) for _ in range(iters))
    return both - sleep


def phases(n: int = 65536) -> None:
    """The op's forward and its backward timed apart, each from an idle GPU and back to back:
    which of the two waits on the host."""
    from longvit.attention import dilated_attention

    q, k, v = (
        torch.randn(1, n, 12, 64, device="cuda", dtype=torch.bfloat16, requires_grad=True)
        for _ in range(3)
    )
    go = torch.randn_like(q)
    ws, rs = [1024, 4096, 8192, 16384, 65536], [1, 2, 4, 8, 16]
    saved = {}

    def forward():
        saved["out"] = dilated_attention(q, k, v, ws, rs)

    def backward():
        torch.autograd.grad(saved["out"], (q, k, v), go, retain_graph=True)

    forward()
    cells = [f"forward {_synced_median(forward) * 1e3:.2f}/{_time(forward, 10) * 1e3:.2f}"]
    cells.append(f"backward {_synced_median(backward) * 1e3:.2f}/{_time(backward, 10) * 1e3:.2f}")
    print("    ms from idle / back to back: " + ", ".join(cells), flush=True)


def probe_cpu_host(top: int) -> None:
    """The op's own host time on CPU, kernels and data movement replaced by no-ops."""
    import cProfile
    import pstats

    from longvit.attention import BACKENDS, dilated, dilated_attention
    from longvit.attention.backends import MathBackend

    class Idle(MathBackend):  # reads strided windows; every kernel call does nothing
        name, reads_strided = "idle", True

        def forward_into(self, *args):
            pass

        def backward_into(self, *args):
            pass

        def forward(self, q, k, v, bias, causal, dropout_p, scale):
            return torch.empty_like(q), q.new_empty(q.shape[:-1], dtype=torch.float32), None

        def backward(self, dout, q, k, v, out, lse, bias, causal, dropout_p, scale, state):
            return [torch.empty_like(q) for _ in range(3)]

    BACKENDS["idle"] = Idle()
    saved = {n: getattr(dilated, n) for n in ("merge_rows", "merge_all", "copy_rows",
                                                "copy_rows_many", "add_rows_many")}  # fmt: skip
    for name in saved:
        setattr(dilated, name, lambda *args, **kwargs: None)
    n, ws = 4096, [64, 256, 512, 1024, 4096]  # 65K's calls and head groups, 16x fewer tokens
    q, k, v = (torch.randn(1, n, 12, 8, requires_grad=True) for _ in range(3))
    go = torch.randn(1, n, 12, 8)

    def step():
        out = dilated_attention(q, k, v, ws, [1, 2, 4, 8, 16], backend="idle")
        torch.autograd.grad(out, (q, k, v), go)

    rule = dilated.IN_PLACE_ELEMENTS_PER_CALL
    try:
        for label, elements in in_place_choices():
            dilated.IN_PLACE_ELEMENTS_PER_CALL = elements
            for _ in range(3):
                step()
            times = []
            for _ in range(30):
                t = time.perf_counter()
                step()
                times.append(time.perf_counter() - t)
            print(f"{label}: {sorted(times)[15] * 1e3:.2f} ms of host time per step (median of 30)")
        dilated.IN_PLACE_ELEMENTS_PER_CALL = 0
        prof = cProfile.Profile()
        prof.enable()
        for _ in range(20):
            step()
        prof.disable()
        pstats.Stats(prof).sort_stats("tottime").print_stats(top)
    finally:
        dilated.IN_PLACE_ELEMENTS_PER_CALL = rule
        for name, fn in saved.items():
            setattr(dilated, name, fn)
        del BACKENDS["idle"]


def probe_merge(n: int = 65536, heads: int = 12) -> None:
    """merge_all against the merges it replaced (``_merge_calls``: one merge_rows per window
    into float32 accumulators, then the cast), on random branch outputs of LongViT's 8192-px
    schedule at n tokens."""
    print("merge of LongViT's 8192-px branches, 65K tokens, bf16: GPU ms from idle / host ms")
    for d in (64, 128):
        for name, fn in _merges(n, heads, d):
            gpu, host = _synced_median(fn), host_time(fn, steps=50)
            print(f"  D = {d:>3}  {name:<18} {gpu * 1e3:7.3f} / {host * 1e3:6.3f}")


def _merges(n: int, heads: int, d: int):
    """[(name, fn)]: merge_all and the per-window merges, on the same random branch outputs."""
    from longvit.attention import strided_ops
    from longvit.attention.layout import BranchLayout
    from longvit.attention.windows import kernel_windows, token_windows

    dev, bf16 = torch.device("cuda"), torch.bfloat16
    entries, branches = [], []
    for w, r in [(1024, 1), (4096, 2), (8192, 4), (16384, 8), (65536, 16)]:
        lay = BranchLayout.of(n, heads, w, r)
        rows = lay.num_segments
        o = torch.randn(rows, lay.m, heads, d, dtype=bf16, device=dev).transpose(1, 2)
        lse = torch.randn(rows, heads, lay.m, device=dev)
        wins = zip(lay.runs, kernel_windows(o, lay, 0, rows), kernel_windows(lse, lay, 0, rows))
        for (offset, first, _, _), o_win, lse_win in wins:
            entries.append(strided_ops.MergeEntry(o_win, lse_win, w, r, offset, first, 0))
        branches.append((lay, rows, o, lse))
    out = torch.empty(1, n, heads, d, dtype=bf16, device=dev)
    out_lse = torch.empty(1, n, heads, device=dev)

    def fused():
        strided_ops.merge_all(out, out_lse, entries, write_back=True)

    def per_window():
        acc = torch.empty(1, n, heads, d, device=dev)
        acc_lse = torch.empty(1, n, heads, 1, device=dev)
        for i, (lay, rows, o, lse) in enumerate(branches):
            for parts in zip(
                token_windows(acc, lay, 0, rows), token_windows(acc_lse, lay, 0, rows),
                kernel_windows(o, lay, 0, rows), kernel_windows(lse, lay, 0, rows),
            ):  # fmt: skip
                strided_ops.merge_rows(*parts, i == 0)
        return acc.to(bf16)

    return [("merge_all", fused), ("per window + cast", per_window)]


def launch_costs(calls: int = 100) -> None:
    """Host microseconds per call, the GPU kept busy: merge_rows (longvit's wrapper and the bare
    Triton launch), FA4's forward and backward on a small call (its wrapper and the replay)."""
    from longvit.attention import strided_ops
    from longvit.attention.backends import BACKENDS, _fa4

    def per_call(fn) -> float:
        return host_time(fn, calls) * 1e6

    dev = torch.device("cuda")
    acc = torch.zeros(32, 256, 2, 6, 64, device=dev)
    acc_lse = torch.zeros(32, 256, 2, 6, 1, device=dev)
    o = torch.randn(32, 256, 2, 6, 64, device=dev, dtype=torch.bfloat16)
    lse = torch.zeros(32, 256, 2, 6, 1, device=dev)
    grid, n1, n_heads, meta = strided_ops._geometry(tuple(acc.shape))
    _, merge_kernel = strided_ops._kernels()

    def bare():
        merge_kernel[grid](
            acc, acc_lse, o, lse, 0, 0, 0, 0, n1, n_heads,
            *acc.stride()[:4], *acc_lse.stride()[:4], *o.stride()[:4], *lse.stride()[:4],
            COPY=False, **meta,
        )  # fmt: skip

    cells = [
        f"merge_rows {per_call(lambda: strided_ops.merge_rows(acc, acc_lse, o, lse, False)):.1f}",
        f"bare Triton merge launch {per_call(bare):.1f}",
        f"ATen copy_ {per_call(lambda: acc.copy_(o)):.1f}",
    ]
    fa4 = BACKENDS["fa4"]
    if fa4.available(dev, torch.bfloat16, 64):
        q, k, v, out, dout = (
            torch.randn(16, 512, 6, 64, device=dev, dtype=torch.bfloat16) for _ in range(5)
        )
        lse4 = torch.zeros(16, 6, 512, device=dev)
        dq, dk, dv = (torch.empty_like(q) for _ in range(3))
        fwd, bwd = _fa4()._flash_attn_fwd, _fa4()._flash_attn_bwd
        cells += [
            f"FA4 forward wrapper {per_call(lambda: fwd(q, k, v, softmax_scale=0.125, causal=False, return_lse=True, out=out, lse=lse4)):.1f}",  # noqa: E501
            f"replayed {per_call(lambda: fa4.forward_into(q, k, v, out, lse4, False, 0.125)):.1f}",
            f"FA4 backward wrapper {per_call(lambda: bwd(q, k, v, out, dout, lse4, softmax_scale=0.125, causal=False, dq=dq, dk=dk, dv=dv)):.1f}",  # noqa: E501
            f"replayed {per_call(lambda: fa4.backward_into(dout, q, k, v, out, lse4, dq, dk, dv, False, 0.125)):.1f}",  # noqa: E501
        ]
    print("host us per call: " + ", ".join(cells), flush=True)


def host_parts(step, steps: int = 8) -> None:
    """Host time per step by part (wall clock around each call, the GPU kept busy)."""
    from longvit.attention import dilated
    from longvit.attention.backends import BACKENDS

    spent: dict[str, float] = {}

    def timed(name, fn):
        def run(*args, **kwargs):
            t = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                spent[name] = spent.get(name, 0.0) + time.perf_counter() - t

        return run

    patched = []
    for name in ("merge_rows", "copy_rows", "copy_rows_many", "add_rows_many", "_steps",
                 "make_plan", "_forward", "_backward", "backward_lse"):  # fmt: skip
        patched.append((dilated, name, getattr(dilated, name)))
    backend = BACKENDS["fa4"] if BACKENDS["fa4"].available(
        torch.device("cuda"), torch.bfloat16, 64
    ) else BACKENDS["cudnn"]  # fmt: skip
    for name in ("forward", "backward", "forward_into", "backward_into"):
        if hasattr(backend, name):
            patched.append((backend, name, getattr(backend, name)))
    for owner, name, fn in patched:
        setattr(owner, name, timed(name, fn))
    try:
        step()
        spent.clear()
        total = host_time(step, steps)
    finally:
        for owner, name, fn in patched:
            if owner is backend:
                delattr(owner, name)  # back to the class's method
            else:
                setattr(owner, name, fn)
    parts = ", ".join(f"{k} {v / (steps + 1) * 1e3:.2f}" for k, v in sorted(spent.items()))
    print(f"    host ms per step by part (step {total * 1e3:.2f}): {parts}", flush=True)


def probe_step(tokens: int, keep_attention: bool, top: int, device: str = "cuda") -> None:
    from torch.profiler import ProfilerActivity, profile

    from tools import bench_model

    args = bench_model.parse_args(["--tokens", str(tokens), "--device", device])
    args.keep_attention = keep_attention
    model, opt = bench_model.build(args)
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    inputs = bench_model.make_inputs(tokens, device)
    bench_model.train_step(model, opt, inputs, dtype, device)
    bench_model.sync(device)
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device == "cuda" else [])
    with profile(activities=activities, with_stack=True) as prof:
        t = time.perf_counter()
        bench_model.train_step(model, opt, inputs, dtype, device)
        bench_model.sync(device)
        wall = time.perf_counter() - t
    print(f"profiled step: {tokens:,} tokens, keep_attention={keep_attention}, {wall:.3f} s "
          "(profiler on)")  # fmt: skip
    events = prof.key_averages()

    def own(e):  # the op's own GPU time (its kernels); CPU time on a CPU run
        return e.self_device_time_total if device == "cuda" else e.self_cpu_time_total

    total = sum(own(e) for e in events) / 1e6
    print(f"total self {device} time {total:.3f} s")
    print(f"{'self s':>11} {'calls':>7}  name")
    for e in sorted(events, key=own, reverse=True)[:top]:
        print(f"{own(e) / 1e6:>11.3f} {e.count:>7}  {e.key[:110]}")
    copies_by_site(prof.events(), device, top)


def copies_by_site(events, device: str, top: int) -> None:
    """Where the copies come from: time of every copy-like op, grouped by its parent ops and
    the innermost longvit (or timm/torch.nn) source line of its Python stack."""
    names = {"aten::copy_", "aten::clone", "aten::_to_copy", "aten::cat", "aten::contiguous"}
    sites: dict[str, list[float]] = {}
    for e in events:
        if e.name not in names or (e.cpu_parent is not None and e.cpu_parent.name in names):
            continue
        spent = e.device_time_total if device == "cuda" else e.cpu_time_total
        parents, p = [], e.cpu_parent
        while p is not None and len(parents) < 2:
            parents.append(p.name.split(": ")[-1][:40])
            p = p.cpu_parent
        frames = [f for f in (e.stack or []) if "longvit/" in f or "timm/" in f]
        where = frames[0].split("longvit/")[-1][:60] if frames else "-"
        key = f"{e.name} < {' < '.join(parents) or '-'} @ {where}"
        sites.setdefault(key, [0.0, 0])
        sites[key][0] += spent
        sites[key][1] += 1
    print(f"copies by site ({device} time):")
    for key, (spent, count) in sorted(sites.items(), key=lambda kv: -kv[1][0])[:top]:
        print(f"{spent / 1e6:>11.3f} {count:>7}  {key[:150]}")


def probe_norms(tokens: int, dim: int = 768) -> None:
    import torch.nn.functional as F

    from longvit.models.layers import LinearInputNorm, set_fused_norm

    x0 = torch.randn(1, tokens, dim, device="cuda", dtype=torch.bfloat16)
    grad = torch.randn(1, tokens, dim, device="cuda", dtype=torch.bfloat16)
    plain = torch.nn.LayerNorm(dim, eps=1e-6).cuda()
    ours = LinearInputNorm(dim, eps=1e-6).cuda()

    def bf16_weights(x):
        with torch.autocast("cuda", enabled=False):
            return F.layer_norm(x, (dim,), plain.weight.bfloat16(), plain.bias.bfloat16(), 1e-6)

    def ours_with(fused: bool):
        def run(x):
            set_fused_norm(fused)
            try:
                return ours(x)
            finally:
                set_fused_norm(True)

        return run

    variants = [
        ("nn.LayerNorm (autocast)", plain),
        ("LinearInputNorm, ATen path", ours_with(False)),
        ("F.layer_norm bf16", bf16_weights),
        ("LinearInputNorm, compiled", ours_with(True)),
    ]
    print(f"{'norm at ' + format(tokens, ',') + ' x ' + str(dim):>28} {'fwd ms':>8} "
          f"{'fwd+bwd ms':>11} {'max |out - plain|':>18}")  # fmt: skip
    with torch.autocast("cuda", dtype=torch.bfloat16):
        ref = plain(x0).float()
        for name, fn in variants:
            x = x0.detach().requires_grad_(True)
            try:
                out = fn(x)
                diff = (out.float() - ref).abs().max().item()
                t_f = _time(lambda fn=fn, x=x: fn(x))

                g = grad.to(out.dtype)

                def fb(fn=fn, x=x, g=g):
                    fn(x).backward(g)

                t_fb = _time(fb)
            except Exception as e:  # noqa: BLE001
                print(f"{name:>28} failed: {type(e).__name__}: {str(e)[:160]}")
                continue
            print(f"{name:>28} {t_f * 1e3:>8.2f} {t_fb * 1e3:>11.2f} {diff:>18.2e}", flush=True)
    cast = _time(lambda: x0.float())
    print(f"{'bf16 -> float32 copy':>28} {cast * 1e3:>8.2f}")


def probe_preprocess(batch: int = 512) -> None:
    import timm
    import torch.nn.functional as F

    from longvit.attention import strided_ops
    from longvit.extract.model import TilePreprocess, build_tile_encoder

    encoder = build_tile_encoder("vit_base_patch16_224", random_init=True, precision="bf16")
    encoder = encoder.cuda()
    encoder.model.to(memory_format=torch.channels_last)
    torch.backends.cudnn.benchmark = True
    tiles = torch.randint(0, 256, (batch, 224, 224, 3), dtype=torch.uint8, device="cuda")
    _, h, w = encoder.preprocessing.input_size
    ready = torch.randn(batch, 3, h, w, device="cuda").contiguous(memory_format=torch.channels_last)
    no_resize = TilePreprocess(dataclasses.replace(encoder.preprocessing, crop_pct=1.0)).cuda()
    pre = encoder.preprocess
    scale_hw = pre.preprocessing.scale_size
    compiled = torch.compile(pre.forward, dynamic=False)
    host = tiles.cpu().pin_memory()

    def to_float():
        return tiles.permute(0, 3, 1, 2).float()

    x_cl = to_float()
    x_nchw = x_cl.contiguous()

    def resize(x):
        return F.interpolate(x, size=scale_hw, mode="bicubic", antialias=True, align_corners=False)

    resized = resize(x_cl)

    top, left = (round((s - o) / 2) for s, o in zip(scale_hw, (h, w)))  # the centre crop

    def normalise():
        crop = resized[..., top : top + h, left : left + w]
        return torch.addcmul(-pre.mean / pre.std, crop, 1 / (255 * pre.std))

    rows = {}
    with torch.inference_mode():
        rows["preprocess, fused Triton kernel"] = _time(lambda: pre(tiles), iters=20)
        strided_ops.set_triton(False)
        rows["preprocess, ATen (resize 248, crop)"] = _time(lambda: pre(tiles), iters=20)
        strided_ops.set_triton(True)
        rows["preprocess (crop_pct 1)"] = _time(lambda: no_resize(tiles), iters=20)
        rows["  uint8 -> float32 (channels_last)"] = _time(to_float, iters=20)
        rows["  resize, channels_last input"] = _time(lambda: resize(x_cl), iters=20)
        rows["  resize, NCHW input"] = _time(lambda: resize(x_nchw), iters=20)
        rows["  clamp_ + round_"] = _time(lambda: resized.clamp_(0, 255).round_(), iters=20)
        rows["  crop + normalise (addcmul)"] = _time(normalise, iters=20)
        rows["  .contiguous(channels_last)"] = _time(
            lambda: normalise().contiguous(memory_format=torch.channels_last), iters=20
        )
        try:
            compiled(tiles)
            rows["preprocess, torch.compile'd"] = _time(lambda: compiled(tiles), iters=20)
        except Exception as e:  # noqa: BLE001
            print(f"compiled preprocess failed: {type(e).__name__}: {str(e)[:200]}")
        rows["H2D copy of the pinned uint8 batch"] = _time(
            lambda: host.to("cuda", non_blocking=True), iters=20
        )
        with torch.autocast("cuda", dtype=torch.bfloat16):
            rows["model forward"] = _time(lambda: encoder.model(ready), iters=10)
        rows["encoder (preprocess + model)"] = _time(lambda: encoder(tiles), iters=10)
        with torch.autocast("cuda", dtype=torch.bfloat16):  # clocks drift: the model again
            rows["model forward, again"] = _time(lambda: encoder.model(ready), iters=10)
        # the extraction loop's GPU side over 8 batches: H2D copy, preprocessing and model in
        # one stream, or copy + preprocessing on a side stream overlapping the previous model
        side = torch.cuda.Stream()

        def pipeline(overlap: bool, batches: int = 8):
            main = torch.cuda.current_stream()
            for _ in range(batches):
                if overlap:
                    with torch.cuda.stream(side):
                        x = pre(host.to("cuda", non_blocking=True))
                    main.wait_stream(side)
                    x.record_stream(main)
                else:
                    x = pre(host.to("cuda", non_blocking=True))
                with torch.autocast("cuda", dtype=torch.bfloat16):
                    encoder.model(x)

        rows["8 batches: copy, preprocess, model"] = _time(lambda: pipeline(False), 2) / 8
        rows["8 batches: copy + preprocess on a side stream"] = _time(lambda: pipeline(True), 2) / 8
    print(f"timm {timm.__version__}; batch {batch}, {encoder.preprocessing}")
    for name, t in rows.items():
        print(f"{name:>36} {t * 1e3:>8.2f} ms  {batch / t:>9.0f} tiles/s")


class _OpCount(TorchDispatchMode):
    """Counts the ATen ops dispatched inside it (views included)."""

    def __init__(self):
        super().__init__()
        self.calls = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.calls += 1
        return func(*args, **(kwargs or {}))


def probe_overhead() -> None:
    from longvit.attention import strided_ops

    longvit_rates = [1, 2, 4, 8, 16]
    configs = [  # tokens, heads, head dim, segments, rates
        (65536, 12, 64, [1024, 4096, 8192, 16384, 65536], longvit_rates),
        (262144, 12, 64, [1024, 4096, 16384, 65536, 262144], longvit_rates),
        (2**20, 12, 64, [2048 * 2**i for i in range(10)], [2**i for i in range(10)]),  # LongNet
        (2**20, 16, 24, [1024, 4096, 32768, 262144, 1048576], longvit_rates),
    ]
    _launch_costs()
    print(f"{'tokens':>9} {'GPU ms':>8} {'host enqueue ms':>16} {'ops per step':>13}")
    for n, heads, dim, ws, rates in configs:
        step = op_step(n, heads, dim, ws, rates)
        strided_ops.set_triton(False)
        aten_gpu = _time(step, iters=10)
        strided_ops.set_triton(True)
        gpu = _time(step, iters=10)
        print(f"{n:>9,} ATen data movement {aten_gpu * 1e3:.2f} ms, Triton {gpu * 1e3:.2f} ms")
        synced = _synced_median(step)
        print(f"{n:>9,} one step from an idle GPU (as bench_attention times it): "
              f"{synced * 1e3:.2f} ms; back to back {gpu * 1e3:.2f} ms")  # fmt: skip
        host = host_time(step, 10)
        with _OpCount() as count:
            step()
        print(f"{n:>9,} {gpu * 1e3:>8.2f} {host * 1e3:>16.2f} {count.calls:>13}")
        kernel_table(step)


def probe_compile(tokens: int = 16384) -> None:
    """The first calls' cost of compiling longvit's Triton kernels: a longvit_base training step
    (bench_model's) timed three times in a fresh process. Run it with TRITON_CACHE_DIR set to an
    empty directory for a cold cache (Triton keeps compiled kernels on disk across runs)."""
    import os

    from tools import bench_model

    print(f"TRITON_CACHE_DIR={os.environ.get('TRITON_CACHE_DIR', '(default: ~/.triton/cache)')}")
    args = bench_model.parse_args(["--tokens", str(tokens)])
    model, opt = bench_model.build(args)
    inputs = bench_model.make_inputs(tokens, "cuda")
    for i in range(3):
        t = time.perf_counter()
        bench_model.train_step(model, opt, inputs, torch.bfloat16, "cuda")
        torch.cuda.synchronize()
        print(f"longvit_base step {i + 1}, {tokens:,} tokens: {time.perf_counter() - t:.2f} s")


def probe_timeline(path: Path) -> None:
    """Where the GPU waits in one op step at 65K tokens started on an idle GPU, every call read in
    place and by longvit's rule: the kernels in order (start after the first CPU op, duration)
    and the gaps between them (a Chrome trace of each step is written next to path)."""
    from torch.profiler import ProfilerActivity, profile

    from longvit.attention import dilated

    step = op_step(65536, 12, 64, [1024, 4096, 8192, 16384, 65536], [1, 2, 4, 8, 16])
    rule = dilated.IN_PLACE_ELEMENTS_PER_CALL
    for label, elements in in_place_choices()[:2]:
        dilated.IN_PLACE_ELEMENTS_PER_CALL = elements
        for _ in range(5):
            step()
        torch.cuda.synchronize()
        with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
            step()
            torch.cuda.synchronize()
        out = path.with_name(f"{path.stem}_{label.replace(' ', '_')}{path.suffix}")
        out.parent.mkdir(parents=True, exist_ok=True)
        prof.export_chrome_trace(str(out))
        events = json.loads(out.read_text())["traceEvents"]
        gpu = ("kernel", "gpu_memcpy", "gpu_memset")
        kernels = sorted((e["ts"], e["ts"] + e["dur"], e["name"]) for e in events
                         if e.get("cat") in gpu)  # fmt: skip
        first_cpu = min(e["ts"] for e in events if e.get("cat") == "cpu_op")
        busy = sum(end - start for start, end, _ in kernels)
        span = kernels[-1][1] - first_cpu
        print(f"{label}: first CPU op to last kernel {span / 1e3:.2f} ms, kernels busy "
              f"{busy / 1e3:.2f} ms; kernels (start us, duration us, gap before us):")  # fmt: skip
        last = first_cpu
        for start, end, name in kernels:
            print(f"  {start - first_cpu:7.0f} {end - start:6.0f} {start - last:6.0f} {name[:40]}")
            last = end
    dilated.IN_PLACE_ELEMENTS_PER_CALL = rule


def probe_tiles() -> None:
    """The op's time for several tile sizes of the data-movement kernels (values per program)."""
    from longvit.attention import strided_ops

    rates = [1, 2, 4, 8, 16]
    configs = [
        (65536, [1024, 4096, 8192, 16384, 65536]),
        (262144, [1024, 4096, 16384, 65536, 262144]),
    ]
    default = strided_ops._BLOCK_ELEMENTS
    for n, ws in configs:
        step = op_step(n, 12, 64, ws, rates)
        for block in (2048, 4096, 8192, 16384):
            strided_ops._BLOCK_ELEMENTS = block
            strided_ops._geometry.cache_clear()
            b2b = _time(step, iters=20)
            print(f"{n:>9,} tile {block:>6} values: back to back {b2b * 1e3:.2f} ms, "
                  f"from an idle GPU {_synced_median(step) * 1e3:.2f} ms")  # fmt: skip
    strided_ops._BLOCK_ELEMENTS = default
    strided_ops._geometry.cache_clear()


def probe_layer(tokens: int = 2**20) -> None:
    """One MultiheadDilatedAttention layer (dim 768, 12 heads, LongViT 32768 schedule) forward +
    backward in bf16, as bench_attention times it: GPU time by kernel."""
    from longvit.attention import MultiheadDilatedAttention

    ws = [1024, 4096, 32768, 262144, 1048576]
    layer = MultiheadDilatedAttention(768, 12, segment_lengths=ws, dilation_rates=[1, 2, 4, 8, 16])
    layer = layer.cuda().to(torch.bfloat16)
    x = torch.randn(1, tokens, 768, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    gy = torch.randn_like(x)

    def step():
        layer.zero_grad(set_to_none=True)
        layer(x).backward(gy)

    print(f"layer, {tokens:,} tokens: {_time(step, iters=3) * 1e3:.1f} ms")
    kernel_table(step, top=24)


def _launch_costs() -> None:
    """Host time of one launch: the Triton row copy against ATen's copy_, on a tiny view."""
    from longvit.attention import strided_ops

    src = torch.randn(4, 8, 3, 2, 64, device="cuda", dtype=torch.bfloat16)[:, ::2]
    dst = torch.empty(src.shape, device="cuda", dtype=torch.bfloat16)
    for name, fn in [("Triton copy_rows", lambda: strided_ops.copy_rows(dst, src)),
                     ("ATen copy_", lambda: dst.copy_(src))]:  # fmt: skip
        fn()
        torch.cuda.synchronize()
        t = time.perf_counter()
        for _ in range(200):
            fn()
        host = (time.perf_counter() - t) / 200
        torch.cuda.synchronize()
        print(f"launch cost, {name}: {host * 1e6:.1f} us of host time")


def probe_strided() -> None:
    """Can cuDNN read a branch's dilated positions in place? Its forward + backward on the
    strided views of dilated_parts (one call per head group) against the gathered copy."""
    from longvit.attention.backends import BACKENDS
    from longvit.attention.layout import BranchLayout, dilated_parts, gather_segments

    cudnn = BACKENDS["cudnn"]
    head = f"{'tokens':>9} {'w':>8} {'r':>3} {'gathered ms':>12} {'in place ms':>12}"
    print(f"{head} {'max diff':>9}")
    for n, w, r in [(262144, 262144, 16), (262144, 65536, 8), (262144, 4096, 2), (65536, 16384, 8)]:
        lay = BranchLayout.of(n, 12, w, r)
        rows = [
            torch.randn(n // w, w, 12, 64, device="cuda", dtype=torch.bfloat16) for _ in range(3)
        ]
        go = torch.randn(n // w, 12, lay.m, 64, device="cuda", dtype=torch.bfloat16)

        def gathered(lay=lay, rows=rows, go=go):
            q, k, v = (gather_segments(t, lay).transpose(1, 2) for t in rows)
            out, lse, st = cudnn.forward(q, k, v, None, False, 0.0, 0.125)
            cudnn.backward(go, q, k, v, out, lse, None, False, 0.0, 0.125, st)
            return out

        def in_place(lay=lay, rows=rows, go=go):
            outs = []
            views = [dilated_parts(t, lay) for t in rows]
            start = 0
            for q, k, v in zip(*views):  # (C, m, groups, G', D) per run
                c, m, groups, heads, d = q.shape
                per = [[t[:, :, g].transpose(1, 2) for g in range(groups)] for t in (q, k, v)]
                if heads == 1:  # one stride between groups: one call
                    per = [[t.squeeze(3).transpose(1, 2)] for t in (q, k, v)]
                for qg, kg, vg in zip(*per):
                    h = qg.shape[1]
                    out, lse, st = cudnn.forward(qg, kg, vg, None, False, 0.0, 0.125)
                    dog = go[:, start : start + h]
                    cudnn.backward(dog, qg, kg, vg, out, lse, None, False, 0.0, 0.125, st)
                    outs.append(out)
                    start += h
            return torch.cat(outs, dim=1)

        try:
            diff = (gathered().float() - in_place().float()).abs().max().item()
            t_in = _time(in_place, iters=10)
        except Exception as e:  # noqa: BLE001
            print(f"{n:>9,} {w:>8} {r:>3} in place failed: {type(e).__name__}: {str(e)[:150]}")
            continue
        t_g = _time(gathered, iters=10)
        print(f"{n:>9,} {w:>8} {r:>3} {t_g * 1e3:>12.2f} {t_in * 1e3:>12.2f} {diff:>9.2e}")


def kernel_table(fn, top: int = 14) -> None:
    """GPU time of one call of fn by kernel name (the profiler's self GPU time)."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        fn()
        torch.cuda.synchronize()
    events = [e for e in prof.key_averages() if e.self_device_time_total > 0]
    total = sum(e.self_device_time_total for e in events)
    print(f"    GPU kernels: {total / 1e3:.2f} ms in all")
    for e in sorted(events, key=lambda e: -e.self_device_time_total)[:top]:
        print(f"    {e.self_device_time_total / 1e3:>8.2f} ms {e.count:>5}  {e.key[:90]}")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    probes = ["kernels", "step", "norms", "preprocess", "overhead", "strided", "layer", "tiles",
              "timeline", "compile", "fa4", "inplace", "host", "cpu_host", "merge"]  # fmt: skip
    p.add_argument("probes", nargs="+", choices=probes)
    p.add_argument("--tokens", type=int, default=2**20)
    p.add_argument("--lengths", type=int, nargs="+", default=[1024, 8192, 65536])
    p.add_argument("--keep-attention", action="store_true")
    p.add_argument("--top", type=int, default=30)
    p.add_argument("--trace", type=Path, default=Path("bench_results/op_65k_trace.json"))
    p.add_argument("--device", default="cuda", help="cpu: a quick check of the step probe")
    args = p.parse_args(argv)
    if "step" in args.probes:  # first: activating a flash impl is for the whole process
        probe_step(args.tokens, args.keep_attention, args.top, args.device)
        if args.device == "cuda":
            torch.cuda.empty_cache()
    if "norms" in args.probes:
        probe_norms(args.tokens)
    if "preprocess" in args.probes:
        probe_preprocess()
    if "overhead" in args.probes:
        probe_overhead()
    if "strided" in args.probes:
        probe_strided()
    if "layer" in args.probes:
        probe_layer()
    if "fa4" in args.probes:  # before kernels, which activates flash impls process-wide
        probe_fa4(args.tokens, args.lengths)
    if "inplace" in args.probes:
        probe_in_place()
    if "host" in args.probes:
        probe_host()
    if "cpu_host" in args.probes:
        probe_cpu_host(args.top)
    if "merge" in args.probes:
        probe_merge()
    if "kernels" in args.probes:
        probe_kernels(args.tokens, args.lengths)
    if "tiles" in args.probes:
        probe_tiles()
    if "timeline" in args.probes:
        probe_timeline(args.trace)
    if "compile" in args.probes:
        probe_compile()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
