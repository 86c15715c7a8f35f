"""LinearInputNorm: nn.LayerNorm's values and gradients under autocast, without float32 copies."""

import warnings

import pytest
import torch
from torch import nn

from longvit import config
from longvit.models import layers
from longvit.models.layers import LinearInputNorm, layer_norm_float32_math, set_fused_norm


def cuda_autocast_reference(norm: nn.LayerNorm, x: torch.Tensor) -> torch.Tensor:
    """What CUDA's autocast does with F.layer_norm: float32 copy in, float32 out.

    (CPU's autocast runs layer_norm in bf16; the block's norms are compared with
    the CUDA behaviour, which is what trains.)
    """
    with torch.autocast(x.device.type, enabled=False):
        return nn.functional.layer_norm(
            x.float(), norm.normalized_shape, norm.weight, norm.bias, norm.eps
        )


def run(norm_fn, norm, linear, x, device_type="cpu"):
    x = x.detach().requires_grad_(True)
    with torch.autocast(device_type, dtype=torch.bfloat16):
        y = linear(norm_fn(norm, x))
    y.float().square().sum().backward()
    grads = [x.grad] + [p.grad for p in (*norm.parameters(), *linear.parameters())]
    return y.detach(), grads


@pytest.mark.parametrize("in_dtype", [torch.bfloat16, torch.float32])
def test_values_and_gradients_equal_layer_norm_under_autocast(in_dtype):
    torch.manual_seed(0)
    norm, linear = LinearInputNorm(48, eps=1e-6), nn.Linear(48, 20)
    nn.init.normal_(norm.weight, 1.0, 0.5)
    nn.init.normal_(norm.bias, 0.0, 0.5)
    x = (torch.randn(2, 37, 48) * 3 + 1).to(in_dtype)
    y_ref, g_ref = run(cuda_autocast_reference, norm, linear, x)
    for p in (*norm.parameters(), *linear.parameters()):
        p.grad = None
    y, g = run(lambda n, t: n(t), norm, linear, x)
    assert y.dtype == torch.bfloat16
    assert torch.equal(y, y_ref)
    for a, b in zip(g, g_ref, strict=True):
        assert a.dtype == b.dtype and torch.equal(a, b)


def test_output_is_the_autocast_dtype_and_saves_no_float32_copy():
    norm = LinearInputNorm(64)
    x = torch.randn(1, 100, 64, dtype=torch.bfloat16, requires_grad=True)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = norm(x)
    assert out.dtype == torch.bfloat16
    big = [t for t in saved if t.numel() >= x.numel()]
    assert big and all(t.dtype == torch.bfloat16 for t in big)


def test_without_autocast_it_is_layer_norm():
    torch.manual_seed(0)
    norm, ref = LinearInputNorm(16), nn.LayerNorm(16)
    ref.load_state_dict(norm.state_dict())
    x = torch.randn(3, 5, 16)
    assert torch.equal(norm(x), ref(x))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA (autocast's CUDA policy)")
@pytest.mark.parametrize("fused", [False, True])
@pytest.mark.parametrize("in_dtype", [torch.bfloat16, torch.float32])
def test_equals_layer_norm_under_cuda_autocast(fused, in_dtype, monkeypatch):
    """ATen path: bit for bit. Compiled path: the same float32 math, summed in another order."""
    monkeypatch.setattr(layers, "FUSED_NORM_TOKENS", 0)  # the compiled path at every size
    torch.manual_seed(0)
    norm, linear = LinearInputNorm(768, eps=1e-6).cuda(), nn.Linear(768, 2304).cuda()
    ref = nn.LayerNorm(768, eps=1e-6).cuda()
    nn.init.normal_(norm.weight, 1.0, 0.5)
    nn.init.normal_(norm.bias, 0.0, 0.5)
    ref.load_state_dict(norm.state_dict())
    y_ref, g_ref = None, None
    set_fused_norm(fused)
    try:
        for n in (4096, 1000, 1):  # sequence lengths vary (slides): one kernel serves all
            x = (torch.randn(1, n, 768, device="cuda") * 3 + 1).to(in_dtype)
            for module in (ref, norm, linear):
                module.zero_grad(set_to_none=True)
            y_ref, g_ref = run(lambda n, t: ref(t), ref, linear, x, "cuda")
            for module in (ref, norm, linear):
                module.zero_grad(set_to_none=True)
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                y, g = run(lambda n, t: n(t), norm, linear, x, "cuda")
            # the compiled path must not have fallen back to ATen's kernels
            assert not [w for w in caught if "compiled LayerNorm" in str(w.message)]
            if not fused:
                assert torch.equal(y, y_ref)
                for a, b in zip(g, g_ref, strict=True):
                    assert a.dtype == b.dtype and torch.equal(a, b)
                continue
            assert y.dtype == torch.bfloat16
            torch.testing.assert_close(y.float(), y_ref.float(), rtol=8e-3, atol=1e-2)
            for a, b in zip(g, g_ref, strict=True):
                assert a.dtype == b.dtype
                tol = 2e-2 * b.float().abs().max().item()
                torch.testing.assert_close(a.float(), b.float(), rtol=2e-2, atol=tol)
    finally:
        set_fused_norm(True)


def test_fused_norm_math_equals_layer_norm_in_float64():
    """The function the CUDA path compiles: float32 LayerNorm math, output in out_dtype."""
    torch.manual_seed(0)
    x = torch.randn(3, 50, 64, dtype=torch.float64) * 2 + 0.5
    w, b = torch.randn(64, dtype=torch.float64), torch.randn(64, dtype=torch.float64)
    want = nn.functional.layer_norm(x, (64,), w, b, 1e-6)
    got = layer_norm_float32_math(x.to(torch.bfloat16), w.float(), b.float(), 1e-6, torch.float32)
    assert got.dtype == torch.float32
    # the only error left is the input's bf16 rounding, amplified by |w| / std(x)
    torch.testing.assert_close(got.double(), want, rtol=0, atol=0.05)
    exact = layer_norm_float32_math(x.float(), w.float(), None, 1e-6, torch.float64)
    torch.testing.assert_close(exact, want - b, rtol=1e-5, atol=1e-5)


def test_fused_norm_falls_back_once_with_a_warning(monkeypatch):
    """Where torch.compile cannot build the kernel, the norm warns once and stays on ATen."""

    def broken(*args, **kwargs):
        raise RuntimeError("no Triton here")

    monkeypatch.setattr(layers._fused, "compiled", broken)
    set_fused_norm(True)  # no failure yet
    x, w, b = torch.randn(2, 5, 8), torch.ones(8), torch.zeros(8)
    with pytest.warns(UserWarning, match="compiled LayerNorm is unavailable .*no Triton here"):
        assert layers._fused_layer_norm(x, w, b, 1e-6, torch.bfloat16) is None
    assert config.failed("fused_norm")
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no second warning: the attempt is not repeated
        assert layers._fused_layer_norm(x, w, b, 1e-6, torch.bfloat16) is None
    set_fused_norm(True)  # re-enabling clears the failure: the next call tries again
    assert not config.failed("fused_norm")
