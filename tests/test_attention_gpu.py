"""Fused CUDA backends against the float64 reference (skipped without CUDA).

Run on the GPU machine: PYTHONPATH=. python -m pytest tests/test_attention_gpu.py
"""

import warnings

import pytest
import torch

from longvit.attention import BACKENDS, dilated_attention, dilated_attention_reference

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA"),
]

FUSED = ["cudnn", "flash", "fa4", "auto"]  # fa4: where flash-attn-4 is installed

CASES = {
    # (B, N, H, D, segment_lengths, dilation_rates, causal, masked)
    "longvit": (1, 1024, 12, 64, [64, 128, 256, 512, 1024], [1, 2, 4, 8, 16], False, False),
    "odd N, padded tail": (2, 1000, 12, 64, [128, 256, 512, 2048], [1, 2, 8, 16], False, True),
    "causal": (1, 1536, 8, 64, [256, 512, 1536], [1, 2, 4], True, False),
    "causal and mask": (2, 700, 12, 64, [128, 512, 1024], [1, 4, 16], True, True),
    "head dim 128": (1, 512, 4, 128, [128, 512], [1, 4], False, False),
    "16 heads of 24": (1, 1024, 16, 24, [128, 256, 1024], [1, 2, 8], False, False),
}


def _rel(a, b):
    return ((a.double() - b).norm() / b.norm().clamp_min(1e-30)).item()


def _usable(backend, dtype, d):
    if backend == "auto":
        return True
    return BACKENDS[backend].available(torch.device("cuda"), dtype, d)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("backend", FUSED)
@pytest.mark.parametrize("case", list(CASES.values()), ids=list(CASES))
def test_fused_matches_reference(case, backend, dtype):
    b, n, h, d, ws, rs, causal, masked = case
    if not _usable(backend, dtype, d):
        pytest.skip(f"{backend} unavailable for {dtype}, D={d}")
    g = torch.Generator(device="cuda").manual_seed(0)
    q, k, v = (
        torch.randn(b, n, h, d, device="cuda", dtype=torch.float64, generator=g).requires_grad_()
        for _ in range(3)
    )
    mask = None
    if masked:
        mask = torch.zeros(b, n, dtype=torch.bool, device="cuda")
        mask[0, n - n // 3 :] = True
        mask[-1, : n // 5] = True
    ref = dilated_attention_reference(q, k, v, ws, rs, causal=causal, key_padding_mask=mask)
    grad = torch.randn_like(ref)
    want = torch.autograd.grad(ref, (q, k, v), grad)

    lo = [t.detach().to(dtype).requires_grad_() for t in (q, k, v)]
    out = dilated_attention(*lo, ws, rs, causal=causal, key_padding_mask=mask, backend=backend)
    got = torch.autograd.grad(out, lo, grad.to(dtype))
    assert out.dtype == dtype
    assert _rel(out, ref) < 1e-2
    for name, g1, g2 in zip("qkv", got, want):
        assert _rel(g1, g2) < 1e-2, f"d{name}: {_rel(g1, g2)}"


def test_efficient_is_forward_only():
    q, k, v = (torch.randn(1, 777, 6, 32, device="cuda", dtype=torch.float64) for _ in range(3))
    ref = dilated_attention_reference(q, k, v, [64, 256, 1024], [1, 2, 4])
    lo = [t.bfloat16() for t in (q, k, v)]
    out = dilated_attention(*lo, [64, 256, 1024], [1, 2, 4], backend="efficient")
    assert _rel(out, ref) < 1e-2
    with pytest.raises(ValueError, match="forward-only"):
        dilated_attention(*(t.requires_grad_() for t in lo), [64], [1], backend="efficient")


def test_float32_efficient_and_math():
    q, k, v = (torch.randn(1, 777, 6, 32, device="cuda", dtype=torch.float64) for _ in range(3))
    ref = dilated_attention_reference(q, k, v, [64, 256, 1024], [1, 2, 4])
    for backend in ("efficient", "math", "auto"):
        out = dilated_attention(
            *(t.float() for t in (q, k, v)), [64, 256, 1024], [1, 2, 4], backend=backend
        )
        assert _rel(out, ref) < 1e-4, backend


def test_float64_on_gpu_is_exact():
    q, k, v = (
        torch.randn(2, 300, 12, 16, device="cuda", dtype=torch.float64).requires_grad_()
        for _ in range(3)
    )
    out = dilated_attention(q, k, v, [32, 64, 128], [1, 8, 16], causal=True)
    ref = dilated_attention_reference(q, k, v, [32, 64, 128], [1, 8, 16], causal=True)
    torch.testing.assert_close(out, ref, rtol=1e-10, atol=1e-12)


def _layer_peak(n, dim, heads, ws, rs):
    from longvit.attention import MultiheadDilatedAttention

    layer = MultiheadDilatedAttention(dim, heads, ws, rs).cuda().to(torch.bfloat16)
    x = torch.randn(1, n, dim, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    torch.cuda.synchronize()
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    layer(x).sum().backward()
    torch.cuda.synchronize()
    return torch.cuda.max_memory_allocated() - base, x.numel() * x.element_size()


def test_layer_peak_memory_does_not_grow_with_dilation():
    """No diag_embed-style (.., r, r) tensors: rates up to 512 cost what rates up to 16 cost,
    and the peak is a small multiple of one (N, C) activation."""
    n = 2**20
    small, token_bytes = _layer_peak(n, 768, 12, [n // 16 * 2**i for i in range(5)],
                                     [1, 2, 4, 8, 16])  # fmt: skip
    large, _ = _layer_peak(n, 768, 12, [2048 * 2**i for i in range(10)],
                           [2**i for i in range(10)])  # fmt: skip
    assert large < 1.1 * small, (large / 2**30, small / 2**30)
    assert small < 14 * token_bytes, small / token_bytes


@pytest.mark.parametrize("masked", [True, False], ids=["mask", "nomask"])
@pytest.mark.parametrize("backend", FUSED)
def test_head_chunked_layer_on_gpu_matches_reference(monkeypatch, backend, masked):
    """The layer's head-chunked projection + attention (uneven chunks, partial head groups)
    under bf16 autocast against projection + the float64 reference, values and gradients
    (without a mask, FlashAttention-4 reads the chunks' packed q, k, v in place)."""
    import longvit.attention.module as module
    from longvit.attention import MultiheadDilatedAttention

    if not _usable(backend, torch.bfloat16, 64):
        pytest.skip(f"{backend} unavailable")
    monkeypatch.setattr(module, "head_chunks", lambda *a: [(0, 5), (5, 7), (7, 12)])
    torch.manual_seed(0)
    dim, heads, ws, rs = 768, 12, [128, 512, 2048], [1, 8, 16]
    layer = MultiheadDilatedAttention(dim, heads, ws, rs, backend=backend).cuda()
    ref_layer = MultiheadDilatedAttention(dim, heads, ws, rs).cuda().double()
    ref_layer.load_state_dict(layer.state_dict())
    x = torch.randn(2, 3000, dim, device="cuda", dtype=torch.float64)
    mask = torch.zeros(2, 3000, dtype=torch.bool, device="cuda")
    mask[1, 2000:] = True
    mask = mask if masked else None
    grad = torch.randn(2, 3000, dim, device="cuda", dtype=torch.float64)

    xr = x.clone().requires_grad_()
    b, n, c = x.shape
    q, k, v = ref_layer.qkv(xr).view(b, n, 3, heads, c // heads).unbind(2)
    ref = ref_layer.proj(
        dilated_attention_reference(q, k, v, ws, rs, key_padding_mask=mask).reshape(b, n, c)
    )
    (want,) = torch.autograd.grad(ref, xr, grad)

    xl = x.float().requires_grad_()
    with torch.autocast("cuda", dtype=torch.bfloat16):
        out = layer(xl, key_padding_mask=mask)
    (got,) = torch.autograd.grad(out.float(), xl, grad.float())
    assert _rel(out, ref) < 1e-2
    assert _rel(got, want) < 1e-2


@pytest.mark.parametrize("case", list(CASES.values()), ids=list(CASES))
def test_triton_data_movement_equals_aten(case, monkeypatch):
    """The Triton gathers, merges and gradient adds give the ATen path's values (bf16)."""
    from longvit.attention import strided_ops

    monkeypatch.setattr(strided_ops, "MIN_ELEMENTS", 0)  # these sizes would go through ATen
    assert strided_ops._usable(torch.empty(1, 1, 1, 1, 8, device="cuda")), "Triton unavailable"

    b, n, h, d, ws, rs, causal, masked = case
    g = torch.Generator(device="cuda").manual_seed(0)
    q, k, v = (
        torch.randn(b, n, h, d, device="cuda", dtype=torch.bfloat16, generator=g).requires_grad_()
        for _ in range(3)
    )
    mask = None
    if masked:
        mask = torch.zeros(b, n, dtype=torch.bool, device="cuda")
        mask[0, n - n // 3 :] = True
    grad = torch.randn(b, n, h, d, device="cuda", dtype=torch.bfloat16, generator=g)
    results = []
    for on in (True, False):
        strided_ops.set_triton(on)
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("error", strided_ops.TritonFallbackWarning)
                out = dilated_attention(q, k, v, ws, rs, causal=causal, key_padding_mask=mask)
                results.append((out, *torch.autograd.grad(out, (q, k, v), grad)))
        finally:
            strided_ops.set_triton(True)
    for name, fast, aten in zip(["out", "dq", "dk", "dv"], *results):
        assert _rel(fast, aten.double()) < 2e-3, f"{name}: {_rel(fast, aten.double())}"


def _fa4_or_skip():
    if not _usable("fa4", torch.bfloat16, 64):
        pytest.skip("flash-attn-4 not installed (or not a Hopper/Blackwell GPU)")


@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
def test_fa4_in_place_equals_gathered(causal, monkeypatch):
    """FlashAttention-4 reading the branches in place gives what it gives on gathered copies
    (LongViT's 8192-px schedule at 16K tokens, bf16), outputs and gradients."""
    _fa4_or_skip()
    fa4 = BACKENDS["fa4"]
    g = torch.Generator(device="cuda").manual_seed(0)
    q, k, v, grad = (
        torch.randn(1, 16384, 12, 64, device="cuda", dtype=torch.bfloat16, generator=g)
        for _ in range(4)
    )
    ws, rs = [1024, 2048, 4096, 8192, 16384], [1, 2, 4, 8, 16]
    results = []
    for in_place in (True, False):
        monkeypatch.setattr(fa4, "reads_strided", in_place)
        lo = [t.clone().requires_grad_() for t in (q, k, v)]
        out = dilated_attention(*lo, ws, rs, causal=causal, backend="fa4")
        results.append((out, *torch.autograd.grad(out, lo, grad)))
    for a, b in zip(*results):  # equal up to rounding: dq sums with atomics
        assert ((a.float() - b.float()).norm() / b.float().norm()).item() < 1e-3


def test_fa4_is_first_in_auto_where_installed():
    _fa4_or_skip()
    from longvit.attention.backends import resolve_backend

    dev = torch.device("cuda")
    assert resolve_backend("auto", dev, torch.bfloat16, 64, 0.0).name == "fa4"
    assert resolve_backend("auto", dev, torch.bfloat16, 64, 0.1).name == "cudnn"  # dropout
    assert resolve_backend("auto", dev, torch.float32, 64, 0.0).name != "fa4"


def test_fa4_deterministic_mode_repeats_gradients():
    """Under torch.use_deterministic_algorithms, FA4's backward does not sum dq with atomics:
    two runs give the same bits."""
    _fa4_or_skip()
    g = torch.Generator(device="cuda").manual_seed(1)
    q, k, v, grad = (
        torch.randn(1, 8192, 12, 64, device="cuda", dtype=torch.bfloat16, generator=g)
        for _ in range(4)
    )
    ws, rs = [1024, 2048, 8192], [1, 2, 8]
    before = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True, warn_only=True)
    try:
        runs = []
        for _ in range(2):
            lo = [t.clone().requires_grad_() for t in (q, k, v)]
            out = dilated_attention(*lo, ws, rs, backend="fa4")
            runs.append(torch.autograd.grad(out, lo, grad))
    finally:
        torch.use_deterministic_algorithms(before)
    for a, b in zip(*runs):
        assert torch.equal(a, b)


@pytest.mark.parametrize("deterministic", [True, False], ids=["deterministic", "atomics"])
def test_fa4_replays_equal_the_wrapper(deterministic, monkeypatch):
    """FA4's launches replayed from records (attention/backends/fa4_launch.py) give what FA4's own
    wrapper gives, in place and gathered, forward and backward: the same bits where dq is summed
    deterministically (the semaphores are zero-filled again in each replay)."""
    _fa4_or_skip()
    import longvit.attention.backends.fa4 as fa4_backend
    import longvit.attention.per_branch.in_place as in_place
    from longvit.attention.backends import fa4_launch

    g = torch.Generator(device="cuda").manual_seed(2)
    q, k, v, grad = (
        torch.randn(1, 16384, 12, 64, device="cuda", dtype=torch.bfloat16, generator=g)
        for _ in range(4)
    )
    ws, rs = [1024, 2048, 4096, 8192, 16384], [1, 2, 4, 8, 16]
    before = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(deterministic, warn_only=True)
    try:
        for elements in (0, 2**62):  # every call in place; every call gathered
            monkeypatch.setattr(in_place, "IN_PLACE_ELEMENTS_PER_CALL", elements)
            results = []
            for launches in (None, fa4_launch.Launches(fa4_backend.fa4_interface())):
                monkeypatch.setattr(fa4_backend, "fa4_launches", lambda launches=launches: launches)
                for _ in range(3):  # records, then replays
                    lo = [t.clone().requires_grad_() for t in (q, k, v)]
                    out = dilated_attention(*lo, ws, rs, backend="fa4")
                    step = (out, *torch.autograd.grad(out, lo, grad))
                results.append(step)
            assert launches.replays > 0 and launches.records, launches.last_spoiled
            for a, b in zip(*results):
                if deterministic:
                    assert torch.equal(a, b)
                else:
                    assert ((a.float() - b.float()).norm() / b.float().norm()).item() < 1e-3
    finally:
        torch.use_deterministic_algorithms(before)
