"""Dilated attention equals the dense float64 reference, values and gradients."""

import pytest
import torch

from longvit.attention import dilated_attention, dilated_attention_reference

CPU_BACKENDS = ["math", "cpu_flash"]

# (B, N, H, D, segment_lengths, dilation_rates)
SHAPES = {
    "N not a multiple of any segment": (2, 45, 4, 8, [8, 16, 32], [1, 2, 4]),
    "N below the largest segment": (1, 40, 4, 8, [16, 64, 128], [1, 2, 4]),
    "H=12 with rates 8 and 16": (1, 64, 12, 4, [16, 32, 64], [1, 8, 16]),
    "segment not a multiple of rate": (2, 30, 6, 4, [7, 10], [3, 4]),
    "single branch, dense": (2, 17, 2, 8, [17], [1]),
    "LongViT rates": (2, 96, 12, 8, [6, 12, 24, 48, 96], [1, 2, 4, 8, 16]),
}


def _qkv(b, n, h, d, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [
        torch.randn(b, n, h, d, generator=g, dtype=torch.float64).requires_grad_() for _ in range(3)
    ]


def _mask(b, n, seed=1):
    g = torch.Generator().manual_seed(seed)
    mask = torch.rand(b, n, generator=g) < 0.25
    mask[0, -n // 3 :] = True  # a padded tail, as batched slides have
    if b > 1:
        mask[1] = True  # a batch row that is all padding
    return mask


def _compare(case, causal, masked, backend):
    b, n, h, d, ws, rs = case
    q, k, v = _qkv(b, n, h, d)
    mask = _mask(b, n) if masked else None
    return check_against_reference(q, k, v, ws, rs, backend, causal=causal, key_padding_mask=mask)


def check_against_reference(q, k, v, ws, rs, backend, **kwargs):
    """dilated_attention on float64 q, k, v equals the dense reference, values and gradients."""
    out = dilated_attention(q, k, v, ws, rs, backend=backend, **kwargs)
    ref = dilated_attention_reference(q, k, v, ws, rs, **kwargs)
    torch.testing.assert_close(out, ref, rtol=1e-10, atol=1e-12)
    grad = torch.randn_like(out)
    got = torch.autograd.grad(out, (q, k, v), grad)
    want = torch.autograd.grad(ref, (q, k, v), grad)
    for name, g1, g2 in zip("qkv", got, want):
        torch.testing.assert_close(g1, g2, rtol=1e-10, atol=1e-12, msg=f"d{name}")
    return out


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
@pytest.mark.parametrize("masked", [False, True], ids=["nomask", "mask"])
@pytest.mark.parametrize("case", list(SHAPES.values()), ids=list(SHAPES))
def test_matches_reference(case, causal, masked, backend):
    _compare(case, causal, masked, backend)


def test_all_padding_row_outputs_zero_not_nan():
    b, n, h, d, ws, rs = SHAPES["LongViT rates"]
    q, k, v = _qkv(b, n, h, d)
    mask = torch.zeros(b, n, dtype=torch.bool)
    mask[1] = True
    out = dilated_attention(q, k, v, ws, rs, key_padding_mask=mask)
    assert torch.isfinite(out).all()
    assert out[1].abs().max() == 0
    out.sum().backward()
    for t in (q, k, v):
        assert torch.isfinite(t.grad).all()
    assert k.grad[1].abs().max() == 0 and v.grad[1].abs().max() == 0


def test_padding_keys_do_not_change_valid_outputs():
    """Tokens appended as padding never change what the valid tokens see."""
    b, n, h, d = 1, 50, 4, 8
    ws, rs = [8, 16, 64], [1, 2, 4]
    q, k, v = _qkv(b, 64, h, d)
    mask = torch.zeros(b, 64, dtype=torch.bool)
    mask[:, n:] = True
    padded = dilated_attention(q, k, v, ws, rs, key_padding_mask=mask)
    noisy = [t.detach().clone() for t in (q, k, v)]
    for t in noisy:
        t[:, n:] = 1e3 * torch.randn_like(t[:, n:])
    again = dilated_attention(*noisy, ws, rs, key_padding_mask=mask)
    torch.testing.assert_close(padded[:, :n], again[:, :n], rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("causal", [False, True])
def test_gradcheck(backend, causal):
    q, k, v = _qkv(1, 12, 4, 3)
    mask = torch.zeros(1, 12, dtype=torch.bool)
    mask[0, 10:] = True

    def fn(q, k, v):
        return dilated_attention(
            q, k, v, [4, 8], [1, 2], causal=causal, key_padding_mask=mask, backend=backend
        )

    assert torch.autograd.gradcheck(fn, (q, k, v), eps=1e-6, atol=1e-7)


def test_float32_and_bfloat16_close_to_reference():
    b, n, h, d, ws, rs = SHAPES["LongViT rates"]
    q, k, v = _qkv(b, n, h, d)
    ref = dilated_attention_reference(q, k, v, ws, rs)
    for dtype, tol in ((torch.float32, 1e-5), (torch.bfloat16, 2e-2)):
        out = dilated_attention(*(t.detach().to(dtype) for t in (q, k, v)), ws, rs)
        assert out.dtype == dtype
        rel = (out.double() - ref).norm() / ref.norm()
        assert rel < tol, (dtype, rel)


def test_auto_segment_lengths_match_explicit_schedule():
    from longvit.attention import segment_schedule

    q, k, v = _qkv(1, 256, 4, 8)
    rates = [1, 2, 4, 8, 16]
    auto = dilated_attention(q, k, v, "auto", rates)
    explicit = dilated_attention(q, k, v, segment_schedule(256, rates), rates)
    torch.testing.assert_close(auto, explicit, rtol=0, atol=0)


def test_scale_argument():
    b, n, h, d, ws, rs = SHAPES["N not a multiple of any segment"]
    q, k, v = _qkv(b, n, h, d)
    out = dilated_attention(q, k, v, ws, rs, scale=0.3)
    ref = dilated_attention_reference(q, k, v, ws, rs, scale=0.3)
    torch.testing.assert_close(out, ref, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_chunked_kernel_calls_are_identical(monkeypatch, backend):
    """Branches cut into many kernel calls (bounded temporaries) give the same result."""
    import longvit.attention.per_branch.rows as rows

    case = SHAPES["N not a multiple of any segment"]
    whole = _compare(case, True, True, backend)
    monkeypatch.setattr(rows, "CHUNK_ELEMENTS", 64)
    chunked = _compare(case, True, True, backend)
    torch.testing.assert_close(whole, chunked, rtol=1e-12, atol=1e-13)
    # no padding, no mask: the windowed path, its rows cut into calls as well
    case = SHAPES["LongViT rates"]
    monkeypatch.setattr(rows, "CHUNK_ELEMENTS", 2**27)
    whole = _compare(case, True, False, backend)
    monkeypatch.setattr(rows, "CHUNK_ELEMENTS", 300)
    assert all(len(step.pieces) == 1 for step in _steps(case))
    chunked = _compare(case, True, False, backend)
    torch.testing.assert_close(whole, chunked, rtol=1e-12, atol=1e-13)


def _steps(case, **tensors):
    """The op's kernel calls (and general-path branches) for a case's shapes."""
    from longvit.attention.per_branch.steps import plan_steps
    from longvit.attention.plan import make_plan

    b, n, h, d, ws, rs = case
    q = tensors.get("q", torch.zeros(b, n, h, d, dtype=torch.float64))
    plan = make_plan(
        n, d, q.device, q.dtype, ws, rs, causal=False, dropout_p=0.0, scale=None,
        backend="math", sp_group=None, needs_grad=True,
    )  # fmt: skip
    return plan_steps(plan, q, q, q, tensors.get("key_valid"))


@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
def test_branches_of_equal_length_run_as_one_kernel_call(causal, monkeypatch):
    """LongViT's rates on segments w * r have one m for every branch: the rate-1 branch is read
    in place, the four others are gathered into one buffer and run as one kernel call."""
    import longvit.attention.backends as backends

    case = SHAPES["LongViT rates"]
    steps = _steps(case)
    assert [len(step.pieces) for step in steps] == [1, 4]
    assert steps[0].is_view and steps[0].copy and not steps[1].copy
    calls = []
    forward = backends.MathBackend.forward
    monkeypatch.setattr(
        backends.MathBackend, "forward", lambda self, *a: calls.append(1) or forward(self, *a)
    )
    _compare(case, causal, False, "math")
    assert len(calls) == 2


def test_inputs_whose_batch_and_sequence_do_not_merge():
    """q, k, v laid out (N, B, H, D) (a transposed batch): the general path, same values."""
    b, n, h, d, ws, rs = SHAPES["LongViT rates"]
    g = torch.Generator().manual_seed(5)
    q, k, v = (
        torch.randn(n, b, h, d, generator=g, dtype=torch.float64).transpose(0, 1).requires_grad_()
        for _ in range(3)
    )
    assert all(isinstance(step, tuple) for step in _steps(SHAPES["LongViT rates"], q=q))
    out = dilated_attention(q, k, v, ws, rs, causal=True)
    ref = dilated_attention_reference(q, k, v, ws, rs, causal=True)
    torch.testing.assert_close(out, ref, rtol=1e-10, atol=1e-12)
    grad = torch.randn_like(out)
    for g1, g2 in zip(
        torch.autograd.grad(out, (q, k, v), grad), torch.autograd.grad(ref, (q, k, v), grad)
    ):
        torch.testing.assert_close(g1, g2, rtol=1e-10, atol=1e-12)


def test_packed_qkv_matches_separate():
    from longvit.attention import dilated_attention_packed

    b, n, h, d, ws, rs = SHAPES["H=12 with rates 8 and 16"]
    g = torch.Generator().manual_seed(3)
    qkv = torch.randn(b, n, 3, h, d, generator=g, dtype=torch.float64, requires_grad=True)
    check_packed_against_reference(qkv, ws, rs, "auto", causal=True)
    with pytest.raises(ValueError, match="qkv must have shape"):
        dilated_attention_packed(qkv[:, :, :2], ws, rs)


def check_packed_against_reference(qkv, ws, rs, backend, **kwargs):
    """dilated_attention_packed on a float64 (B, N, 3, H, D) qkv equals the reference on its
    unbound q, k, v, values and the one packed gradient."""
    from longvit.attention import dilated_attention_packed

    out = dilated_attention_packed(qkv, ws, rs, backend=backend, **kwargs)
    ref = dilated_attention_reference(*qkv.unbind(2), ws, rs, **kwargs)
    torch.testing.assert_close(out, ref, rtol=1e-10, atol=1e-12)
    grad = torch.randn_like(out)
    (got,) = torch.autograd.grad(out, qkv, grad)
    (want,) = torch.autograd.grad(ref, qkv, grad)
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)
