"""The Triton kernels of the branch data movement equal the ATen ops they replace.

Without a GPU they run under Triton's interpreter (TRITON_INTERPRET=1, CPU tensors), which has
to be set before Triton compiles anything: so the checks run in a child process, this file run
as a script. tests/test_attention_gpu.py runs the same comparison compiled, on CUDA.
"""

import warnings

import pytest
import torch
from triton_interpreter import run_under_interpreter, skip_without_runtime_loops

from longvit import config
from longvit.attention import dilated_attention, dilated_attention_reference, strided_ops
from longvit.attention.layout import BranchLayout, dilated_parts, gather_segments

# (B, N, H, D, segment_lengths, dilation_rates): padding, H not divisible by r, several runs
CASES = [
    (2, 45, 4, 8, [8, 16, 32], [1, 2, 4]),
    (1, 64, 12, 4, [16, 32, 64], [1, 8, 16]),
    (2, 30, 6, 4, [7, 10], [3, 4]),
    (2, 96, 12, 8, [6, 12, 24, 48, 96], [1, 2, 4, 8, 16]),
]


def _op(case, causal, masked, dtype, triton: bool):
    b, n, h, d, ws, rs = case
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(b, n, h, d, generator=g, dtype=dtype).requires_grad_() for _ in "qkv")
    mask = None
    if masked:
        mask = torch.rand(b, n, generator=g) < 0.25
        mask[-1] = True  # a batch row that is all padding
    strided_ops.set_triton(triton)
    try:
        # the per-branch path, whose data movement these kernels are (named: auto packs)
        out = dilated_attention(
            q, k, v, ws, rs, causal=causal, key_padding_mask=mask, backend="cpu_flash"
        )
        grads = torch.autograd.grad(out, (q, k, v), torch.ones_like(out))
    finally:
        strided_ops.set_triton(True)
    return (q, k, v, mask), out, grads


def check_ops() -> None:
    """The three kernels against ATen on dilated views, and the whole op against both the
    ATen path and the float64 reference (float32 inputs: float32 accumulators, the kernels'
    domain)."""
    torch.manual_seed(0)
    assert strided_ops._kernels() is not None, "Triton did not import"
    # a failing launch must not fall back quietly
    warnings.simplefilter("error", strided_ops.TritonFallbackWarning)
    # gathers, grad adds and merges on every run of a head-chunked layout
    for n, heads, w, r, start, total in [(64, 12, 16, 4, 0, None), (60, 5, 12, 8, 3, 12)]:
        lay = BranchLayout.of(n, heads, w, r, start, total)
        rows = torch.randn(n // lay.segment_length + 1, lay.padded_length, heads, 8)
        strided_ops.set_triton(False)
        want = gather_segments(rows, lay)
        strided_ops.set_triton(True)
        assert torch.equal(gather_segments(rows, lay), want), "gather"
        for part in dilated_parts(rows, lay):
            assert strided_ops._usable(part), "the kernels did not run"
            src = torch.randn(part.shape)
            want = part + src
            strided_ops.add_rows(part, src)
            torch.testing.assert_close(part, want, rtol=0, atol=0)
        acc = torch.randn(*rows.shape[:-1], 8)
        acc_lse = torch.randn(*rows.shape[:-1], 1)
        acc_lse[0] = -1.0e30  # rows with no key so far (NO_KEY)
        for part, lse_part in zip(dilated_parts(acc, lay), dilated_parts(acc_lse, lay)):
            o = torch.randn(part.shape).to(torch.bfloat16)
            lse = torch.randn(lse_part.shape)
            lse[:, 0] = -1.0e30
            for copy in (False, True):
                a, al = part.clone(), lse_part.clone()
                strided_ops._merge_aten(a, al, o, lse, copy)
                strided_ops.merge_rows(part, lse_part, o, lse, copy)
                torch.testing.assert_close(part, a, rtol=1e-6, atol=1e-6)
                torch.testing.assert_close(lse_part, al, rtol=1e-6, atol=1e-6)
    # several windows per launch: separate tensors (their data pointers apart), views with offsets
    srcs = [torch.randn(2, 9, 4, 3, 8)[:, 1:8:2] for _ in range(3)]
    dsts = [torch.zeros(2, 4, 3, 5, 8).permute(0, 3, 1, 2, 4)[:, 1:] for _ in range(3)]
    assert strided_ops._deltas([strided_ops.Strided.of(t) for t in dsts]) is not None
    for add in (False, True):
        want = [d + s if add else s.clone() for d, s in zip(dsts, srcs)]
        (strided_ops.add_rows_many if add else strided_ops.copy_rows_many)(dsts, srcs)
        for d, w in zip(dsts, want):
            torch.testing.assert_close(d, w, rtol=0, atol=0)
    for case in CASES:
        for causal, masked in [(False, False), (True, False), (True, True), (False, True)]:
            _, out, grads = _op(case, causal, masked, torch.float32, triton=True)
            (q, k, v, mask), out_aten, grads_aten = _op(case, causal, masked, torch.float32, False)
            torch.testing.assert_close(out, out_aten, rtol=1e-5, atol=1e-6)
            for g1, g2 in zip(grads, grads_aten):
                torch.testing.assert_close(g1, g2, rtol=1e-5, atol=1e-5)
            q, k, v = (t.detach().double().requires_grad_() for t in (q, k, v))
            ref = dilated_attention_reference(q, k, v, *case[4:], causal=causal,
                                              key_padding_mask=mask)  # fmt: skip
            torch.testing.assert_close(out.double(), ref, rtol=1e-4, atol=1e-5)
    print("strided ops: all checks passed")


def test_kernels_under_the_interpreter():
    pytest.importorskip("triton")
    skip_without_runtime_loops()
    run = run_under_interpreter(__file__)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    assert "all checks passed" in run.stdout


def test_off_switch_and_cpu_fall_back_to_aten():
    """Without the interpreter, CPU tensors take ATen; set_triton(False) forces ATen too."""
    x = torch.randn(2, 4, 3, 2, 8)
    if not strided_ops.INTERPRET:
        assert not strided_ops._usable(x)
    strided_ops.set_triton(False)
    try:
        assert not strided_ops._usable(x)
        y = torch.zeros_like(x)
        strided_ops.add_rows(y, x)
        assert torch.equal(y, x)
    finally:
        strided_ops.set_triton(True)


class _Failing:
    """A stand-in Triton kernel whose launch fails, as compiling for an unsupported GPU would."""

    def __getitem__(self, grid):
        def launch(*args, **kwargs):
            raise RuntimeError("no compiler for this device")

        return launch


def test_a_failing_launch_warns_once_and_falls_back_to_aten(monkeypatch):
    monkeypatch.setattr(strided_ops, "_usable", lambda *tensors, **kw: config.use_triton())
    monkeypatch.setattr(strided_ops, "_kernels", lambda: (_Failing(), _Failing()))
    src = torch.randn(2, 4, 3, 2, 8)
    dst = torch.zeros_like(src)
    try:
        warning = strided_ops.TritonFallbackWarning
        with pytest.warns(warning, match="Triton kernel failed.*LONGVIT_TRITON=0"):
            strided_ops.add_rows(dst, src)
        assert torch.equal(dst, src)
        assert not config.use_triton()
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # no second warning: ATen from now on
            acc, acc_lse = torch.zeros(2, 4, 3, 2, 8), torch.zeros(2, 4, 3, 2, 1)
            strided_ops.merge_rows(acc, acc_lse, src, torch.ones(2, 4, 3, 2, 1), copy=True)
        assert torch.equal(acc, src) and bool((acc_lse == 1).all())
    finally:
        strided_ops.set_triton(True)


def test_shape_mismatch_is_a_value_error():
    with pytest.raises(ValueError, match="shapes differ"):
        strided_ops.copy_rows(torch.zeros(1, 2, 3, 4, 5), torch.zeros(1, 2, 3, 4, 6))


if __name__ == "__main__":
    check_ops()
