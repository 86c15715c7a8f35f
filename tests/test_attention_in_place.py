"""The in-place path: a backend that reads strided windows (FlashAttention-4 on GPU) gets each
branch's positions of q, k, v (and dout, out in the backward) as views, no gather buffer.

On CPU a float64 stand-in backend runs the math kernel on the views it is handed, so the
windows, the kernel calls per head group and the buffers they write are checked against the
dense reference; tests/test_attention_gpu.py runs FlashAttention-4 itself where installed."""

import pytest
import torch

from longvit.attention import BACKENDS, MultiheadDilatedAttention
from longvit.attention.backends import KernelState, MathBackend
from tests.test_attention_values import (
    SHAPES,
    _qkv,
    check_against_reference,
    check_packed_against_reference,
)


class StridedMath(MathBackend):
    """MathBackend behind the reads_strided interface, recording what it was handed."""

    name = "strided_math"
    reads_strided = True

    def __init__(self):
        self.calls = []  # (direction, q view) per in-place call

    def forward_into(self, q, k, v, out, lse, causal, scale):
        self.calls.append(("forward", q))
        o, s, _ = self.forward(*(t.transpose(1, 2) for t in (q, k, v)), None, causal, 0.0, scale)
        out.copy_(o.transpose(1, 2))
        lse.copy_(s)

    def backward_into(self, dout, q, k, v, out, lse, dq, dk, dv, causal, scale):
        self.calls.append(("backward", q))
        t = [x.transpose(1, 2) for x in (dout, q, k, v, out)]
        grads = self.backward(*t, lse, None, causal, 0.0, scale, KernelState())
        for dst, g in zip((dq, dk, dv), grads):
            dst.copy_(g.transpose(1, 2))


@pytest.fixture
def strided(monkeypatch):
    """The stand-in backend, registered; every call reads in place, however small."""
    import longvit.attention.per_branch.in_place as in_place

    backend = StridedMath()
    monkeypatch.setitem(BACKENDS, backend.name, backend)
    monkeypatch.setattr(in_place, "IN_PLACE_ELEMENTS_PER_CALL", 0)
    return backend


def _check(q, k, v, ws, rs, causal, **kwargs):
    check_against_reference(q, k, v, ws, rs, "strided_math", causal=causal, **kwargs)


@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
@pytest.mark.parametrize("case", list(SHAPES.values()), ids=list(SHAPES))
def test_in_place_matches_reference(case, causal, strided):
    b, n, h, d, ws, rs = case
    _check(*_qkv(b, n, h, d), ws, rs, causal)


def test_kernels_read_the_inputs_in_place_one_call_per_head_group(strided):
    """LongViT's rates with 12 heads: the rate-1 branch is one call on a view; rates 2, 4, 8
    and 16 take 2, 3, 2 and 1 in-place calls (per head group, or per head of the groups,
    whichever is fewer), each on a view of q itself."""
    b, n, h, d, ws, rs = SHAPES["LongViT rates"]
    q, k, v = _qkv(b, n, h, d)
    _check(q, k, v, ws, rs, False)
    forward = [view for direction, view in strided.calls if direction == "forward"]
    assert len(forward) == 2 + 3 + 2 + 1
    # the backward also runs the rate-1 branch in place: its gradients go straight into dq, dk, dv
    assert len(strided.calls) == 2 * len(forward) + 1
    for _, view in strided.calls:
        assert view.untyped_storage().data_ptr() == q.untyped_storage().data_ptr()
    assert sorted(view.shape[2] for view in forward) == [4, 4, 4, 6, 6, 6, 6, 12]


def test_packed_qkv_and_masks(strided):
    """Packed q, k, v (strides of (B, N, 3, H, D)) read in place; a key mask takes the general
    path (gathered inputs) on the same backend. Both equal the reference."""
    b, n, h, d, ws, rs = SHAPES["H=12 with rates 8 and 16"]
    g = torch.Generator().manual_seed(3)
    qkv = torch.randn(b, n, 3, h, d, generator=g, dtype=torch.float64, requires_grad=True)
    check_packed_against_reference(qkv, ws, rs, "strided_math", causal=True)
    assert strided.calls
    mask = torch.zeros(b, n, dtype=torch.bool)
    mask[:, -n // 4 :] = True
    strided.calls.clear()
    _check(*_qkv(b, n, h, d), ws, rs, False, key_padding_mask=mask)
    assert not strided.calls  # masked branches are gathered


def test_unaligned_inputs_are_gathered(strided):
    """Strides a TMA-fed kernel cannot address (here heads 40 bytes apart, D = 4 values of a
    row of 5) take the gather path: same values, no in-place call."""
    q, k, v = (t.detach()[..., :4].requires_grad_() for t in _qkv(1, 64, 4, 5))
    _check(q, k, v, [16, 32, 64], [1, 2, 4], False)
    assert not strided.calls


def test_head_chunked_layer_reads_in_place(strided, monkeypatch):
    """The head-chunked projected layer (chunks of heads of a packed qkv; head offsets count
    from the layer's first head) on the in-place path equals the same layer on the math path."""
    import longvit.attention.module as module

    monkeypatch.setattr(module, "head_chunks", lambda *a: [(0, 5), (5, 12)])
    _check_layer("strided_math")
    assert strided.calls


def test_small_calls_with_many_head_groups_gather(strided, monkeypatch):
    """At the default size rule, a small call that would take several in-place kernel calls
    (LongViT's rates: 8 head groups in one batched call) is gathered into one call, while a
    call of one head group (rate 16 with 12 heads: one diagonal window) still reads in place.
    The rate-1 branch's backward always writes its gradients straight into dq, dk, dv."""
    import longvit.attention.per_branch.in_place as in_place

    monkeypatch.setattr(in_place, "IN_PLACE_ELEMENTS_PER_CALL", 2**24)
    b, n, h, d, ws, rs = SHAPES["LongViT rates"]
    _check(*_qkv(b, n, h, d), ws, rs, False)
    assert [direction for direction, _ in strided.calls] == ["backward"]
    strided.calls.clear()
    _check(*_qkv(b, n, h, d), [12, 96], [1, 16], True)
    assert [direction for direction, _ in strided.calls] == ["forward", "backward", "backward"]


class FakeFA4Interface:
    """A CPU stand-in for flash_attn.cute.interface: the two entry points longvit calls, with
    FA4's argument names and layouts ((B', L, H, D) tensors, lse (B', H, L)), computed by the
    math kernel. It pins how FlashAttn4Backend calls FA4 where CI has no GPU."""

    math = MathBackend()

    def _flash_attn_fwd(self, q, k, v, softmax_scale, causal, return_lse, out=None, lse=None):
        assert return_lse
        t = [x.transpose(1, 2) for x in (q, k, v)]
        o, s, _ = self.math.forward(*t, None, causal, 0.0, softmax_scale)
        out = torch.empty_like(q) if out is None else out
        out.copy_(o.transpose(1, 2))
        lse = s.clone() if lse is None else lse.copy_(s)
        return out, lse, None, None, None

    def _flash_attn_bwd(
        self, q, k, v, out, dout, lse, softmax_scale, causal, deterministic, dq=None, dk=None,
        dv=None,
    ):  # fmt: skip
        t = [x.transpose(1, 2) for x in (dout, q, k, v, out)]
        grads = self.math.backward(*t, lse, None, causal, 0.0, softmax_scale, KernelState())
        given = [dq, dk, dv]
        result = []
        for dst, g, like in zip(given, grads, (q, k, v)):
            dst = torch.empty_like(like) if dst is None else dst
            result.append(dst.copy_(g.transpose(1, 2)))
        return tuple(result)


@pytest.mark.parametrize("in_place", [True, False], ids=["in place", "gathered"])
def test_fa4_backend_calls_fa4_as_documented(in_place, monkeypatch):
    """The fa4 backend, on a CPU stand-in of FA4's interface: in place and gathered calls,
    the rate-1 view, masked branches (those go to the next backend) and the head-chunked layer
    all equal the float64 reference."""
    import longvit.attention.backends.fa4 as fa4_backend
    import longvit.attention.per_branch.in_place as in_place_rule

    fa4 = BACKENDS["fa4"]
    monkeypatch.setattr(fa4_backend, "fa4_interface", lambda: FakeFA4Interface())
    monkeypatch.setattr(type(fa4), "available", lambda self, *a: True)
    monkeypatch.setattr(type(fa4), "_masked", staticmethod(lambda q: BACKENDS["math"]))
    monkeypatch.setattr(in_place_rule, "IN_PLACE_ELEMENTS_PER_CALL", 0 if in_place else 2**62)
    b, n, h, d, ws, rs = SHAPES["LongViT rates"]
    for causal in (False, True):
        check_against_reference(*_qkv(b, n, h, d), ws, rs, "fa4", causal=causal)
    mask = torch.zeros(b, n, dtype=torch.bool)
    mask[-1, : n // 3] = True
    check_against_reference(*_qkv(b, n, h, d), ws, rs, "fa4", key_padding_mask=mask)
    b, n, h, d, ws, rs = SHAPES["N not a multiple of any segment"]  # padded branches
    check_against_reference(*_qkv(b, n, h, d), ws, rs, "fa4", causal=True)
    _check_layer("fa4")


def _check_layer(backend: str) -> None:
    """A float64 MultiheadDilatedAttention on `backend` equals the same layer on math."""
    torch.manual_seed(0)
    args = (48, 12, [8, 16, 32], [1, 2, 8])
    layer = MultiheadDilatedAttention(*args, backend=backend).double()
    ref_layer = MultiheadDilatedAttention(*args, backend="math").double()
    ref_layer.load_state_dict(layer.state_dict())
    x = torch.randn(2, 32, 48, dtype=torch.float64, requires_grad=True)
    y, y_ref = layer(x), ref_layer(x)
    torch.testing.assert_close(y, y_ref, rtol=1e-10, atol=1e-12)
    g = torch.randn_like(y)
    (got,), (want,) = torch.autograd.grad(y, x, g), torch.autograd.grad(y_ref, x, g)
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("defer", [True, False], ids=["merges last", "merges between"])
def test_merges_wait_for_the_kernels_on_small_inputs(defer, strided, monkeypatch):
    """Below DEFER_MERGES_ELEMENTS the forward runs every kernel call before merging (the GPU
    gets its long kernels first); above, each call is merged as it comes. Same values either
    way, with padded (general-path) branches in between as well."""
    import longvit.attention.per_branch.attention as per_branch
    import longvit.attention.per_branch.rows as rows
    import longvit.attention.per_branch.windowed as windowed

    monkeypatch.setattr(per_branch, "DEFER_MERGES_ELEMENTS", 2**62 if defer else 0)
    events = []
    merge_rows = windowed.merge_rows
    for where in (windowed, rows):  # the windowed calls' merges and the general path's
        monkeypatch.setattr(
            where, "merge_rows", lambda *a: (events.append("merge"), merge_rows(*a))[1]
        )
    forward_into = strided.forward_into
    monkeypatch.setattr(
        strided, "forward_into", lambda *a: (events.append("kernel"), forward_into(*a))[1]
    )
    b, n, h, d, ws, rs = SHAPES["LongViT rates"]
    _check(*_qkv(b, n, h, d), ws, rs, False)
    first_merge = events.index("merge")
    assert ("kernel" in events[first_merge:]) is not defer
    for case in ("N not a multiple of any segment", "H=12 with rates 8 and 16"):
        b, n, h, d, ws, rs = SHAPES[case]
        _check(*_qkv(b, n, h, d), ws, rs, True)
