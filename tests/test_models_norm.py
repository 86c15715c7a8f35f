"""LinearInputNorm: nn.LayerNorm's values and gradients under autocast, without float32 copies."""

import pytest
import torch
from torch import nn

from longvit.models.layers import LinearInputNorm


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
def test_equals_layer_norm_under_cuda_autocast():
    torch.manual_seed(0)
    norm, linear = LinearInputNorm(768, eps=1e-6).cuda(), nn.Linear(768, 2304).cuda()
    ref = nn.LayerNorm(768, eps=1e-6).cuda()
    nn.init.normal_(norm.weight, 1.0, 0.5)
    ref.load_state_dict(norm.state_dict())
    x = torch.randn(1, 4096, 768, device="cuda").to(torch.bfloat16)
    y_ref, g_ref = run(lambda n, t: ref(t), ref, linear, x, "cuda")
    linear.zero_grad(set_to_none=True)
    y, g = run(lambda n, t: n(t), norm, linear, x, "cuda")
    assert torch.equal(y, y_ref)
    for a, b in zip(g, g_ref, strict=True):
        assert a.dtype == b.dtype and torch.equal(a, b)
