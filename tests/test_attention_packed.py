"""The packed path (one gather, one variable-length call, one merge) against the float64
reference, and the host work it orders per layer."""

import math

import pytest
import timm
import torch

import longvit  # noqa: F401  (registers the models)
import longvit.attention.dilated as dilated
import longvit.attention.varlen as varlen
from longvit.attention import dilated_attention_reference
from longvit.attention.packed import packed_attention
from longvit.attention.packed_plan import build_plan
from longvit.op_count import CountOps

CASES = {
    # (B, N, H, D, segment_lengths, dilation_rates, causal, masked, zero_padded_keys)
    "odd N": (1, 37, 4, 8, [8, 16, 37], [1, 2, 4], False, False, False),
    "batch": (2, 50, 6, 8, [8, 16, 32], [1, 2, 4], False, False, False),
    "causal": (2, 50, 6, 8, [8, 16, 32], [1, 2, 4], True, False, False),
    "key mask": (2, 50, 6, 8, [8, 16, 32], [1, 2, 4], False, True, False),
    "unused offsets": (1, 45, 3, 8, [7, 45], [2, 5], False, False, False),
    "zero-padded keys": (1, 45, 16, 8, [16, 23, 45, 45, 45], [1, 2, 4, 8, 16], False, False, True),
    "Prov-GigaPath's schedule": (
        1, 1001, 16, 4, [1024, 5792, 32768, 185363, 1048576], [1, 2, 4, 8, 16], False, False, True
    ),
}  # fmt: skip


@pytest.mark.parametrize("kernel", ["math", "cpu_flash"])
@pytest.mark.parametrize("packed", [False, True], ids=["q, k, v", "packed qkv"])
@pytest.mark.parametrize("case", list(CASES))
def test_values_and_gradients_equal_the_reference(case, packed, kernel):
    b, n, h, d, ws, rs, causal, masked, zpk = CASES[case]
    g = torch.Generator().manual_seed(hash(case) % 2**31)
    mask = torch.rand(b, n, generator=g) < 0.3 if masked else None
    if masked:
        mask[0, :5] = True  # a whole first segment without keys
    plan = build_plan(
        b, n, h, tuple(zip(ws, rs)), causal=causal, key_padding_mask=mask, zero_padded_keys=zpk
    )
    x = torch.randn(b, n, 3, h, d, dtype=torch.float64, generator=g, requires_grad=True)
    q, k, v = x.unbind(2)
    args = (x, None, None) if packed else (q, k, v)
    out = packed_attention(*args, plan, kernel, 0.0, 1 / math.sqrt(d))
    ref = dilated_attention_reference(
        q, k, v, ws, rs, causal=causal, key_padding_mask=mask, zero_padded_keys=zpk
    )
    torch.testing.assert_close(out, ref, rtol=1e-10, atol=1e-12)
    grad = torch.randn(out.shape, dtype=out.dtype, generator=g)
    (got,), (want,) = torch.autograd.grad(out, x, grad), torch.autograd.grad(ref, x, grad)
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)


def test_zero_padded_keys_change_the_result_only_where_segments_pad():
    torch.manual_seed(0)
    q, k, v = torch.randn(3, 1, 64, 4, 8, dtype=torch.float64)
    exact = dilated_attention_reference(q, k, v, [16, 32, 64], [1, 2, 4])
    padded = dilated_attention_reference(q, k, v, [16, 32, 64], [1, 2, 4], zero_padded_keys=True)
    torch.testing.assert_close(exact, padded)  # 64 tokens: no segment pads
    q, k, v = torch.randn(3, 1, 60, 4, 8, dtype=torch.float64)
    exact = dilated_attention_reference(q, k, v, [16, 32, 64], [1, 2, 4])
    padded = dilated_attention_reference(q, k, v, [16, 32, 64], [1, 2, 4], zero_padded_keys=True)
    assert (exact - padded).abs().max() > 1e-3
    torch.testing.assert_close(exact[:, :32], padded[:, :32])  # their segments are whole


def test_auto_takes_the_packed_path_where_branches_pad():
    assert dilated.packed_kernel(
        "auto", torch.device("cpu"), torch.float32, 64, 0.0, False, None, None
    ) == "cpu_flash"  # fmt: skip
    assert dilated.packed_kernel("cudnn", torch.device("cpu"), torch.float32, 64, 0.0, False,
                                 None, None) is None  # fmt: skip
    big = dict(elements=dilated.PER_BRANCH_ELEMENTS, tokens=65536)
    aligned = lambda: ((1024, 1), (65536, 16))  # noqa: E731
    padded = lambda: ((1000, 1), (65536, 16))  # noqa: E731
    cpu = (torch.device("cpu"), torch.float32, 64, 0.0, False, None, None, False)
    assert dilated.packed_kernel("auto", *cpu, branches=aligned, **big) is None
    assert dilated.packed_kernel("auto", *cpu, branches=padded, **big) == "cpu_flash"


def _ops_per_layer(model, n: int) -> float:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(1, n, model.in_chans, generator=g)
    coords = torch.randint(0, 200, (1, n, 2), generator=g)
    with torch.no_grad(), CountOps() as counter:
        model(x, coords)
    return sum(counter.ops.values()) / len(model.blocks)


def _slide_encoder():
    """longvit_slide_base's depth, heads and schedule, narrow (the count does not depend on
    the width)."""
    return timm.create_model(
        "longvit_slide_base", in_chans=16, embed_dim=128, num_classes=2
    ).eval()  # fmt: skip


# A layer forward on the packed path dispatches a bounded number of ops at any N: the
# variable-length call and the merge are one registered op each (one launch on CUDA, where
# the merge is a Triton kernel), the plan is built once per forward.
OPS_PER_LAYER = 60


@pytest.mark.parametrize("n", [1000, 4096, 10001])
def test_slide_encoder_dispatches_few_ops_per_layer(n):
    assert _ops_per_layer(_slide_encoder(), n) <= OPS_PER_LAYER


def test_gpu_code_path_dispatches_few_ops_per_layer(monkeypatch):
    """The path CUDA takes (the flash kernel's one call), with a stand-in for the kernel."""

    calls = []

    def forward(q, k, v, plan, kernel, dropout_p, scale):
        assert kernel == "flash"
        calls.append(1)
        return real_forward(q, k, v, plan, "cpu_flash", dropout_p, scale)

    real_forward = varlen.varlen_forward
    monkeypatch.setattr(dilated, "varlen_kernel", lambda *args: "flash")
    monkeypatch.setattr("longvit.attention.packed.varlen_forward", forward)
    assert _ops_per_layer(_slide_encoder(), 4096) <= OPS_PER_LAYER
    assert len(calls) == 12  # one call per layer


gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


@pytest.mark.gpu
@gpu
@pytest.mark.parametrize("case", list(CASES))
def test_cuda_flash_and_merge_kernel_against_the_reference(case):
    b, n, h, d, ws, rs, causal, masked, zpk = CASES[case]
    d = max(d, 16)
    torch.manual_seed(0)
    mask = (torch.rand(b, n, device="cuda") < 0.3) if masked else None
    plan = build_plan(b, n, h, tuple(zip(ws, rs)), causal=causal, key_padding_mask=mask,
                      zero_padded_keys=zpk, device="cuda")  # fmt: skip
    x = torch.randn(b, n, 3, h, d, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    out = packed_attention(x, None, None, plan, "flash", 0.0, 1 / math.sqrt(d))
    xr = x.detach().double().requires_grad_()
    ref = dilated_attention_reference(*xr.unbind(2), ws, rs, causal=causal, key_padding_mask=mask,
                                      zero_padded_keys=zpk)  # fmt: skip
    rel = lambda a, b: ((a.double() - b).norm() / b.norm()).item()  # noqa: E731
    assert rel(out, ref) < 1e-2
    g = torch.randn_like(ref)
    (got,), (want,) = torch.autograd.grad(out, x, g.bfloat16()), torch.autograd.grad(ref, xr, g)
    assert rel(got, want) < 2e-2


def test_every_key_masked_gives_zeros_and_zero_gradients():
    q = torch.randn(1, 30, 6, 4, requires_grad=True)
    mask = torch.ones(1, 30, dtype=torch.bool)
    out = dilated.dilated_attention(q, q, q, [7, 10], [3, 4], key_padding_mask=mask)
    out.sum().backward()
    assert torch.equal(out, torch.zeros_like(out)) and torch.equal(q.grad, torch.zeros_like(q))
