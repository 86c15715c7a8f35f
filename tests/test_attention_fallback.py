"""An optional backend chosen by ``auto`` (FlashAttention-4 on GPU) that fails: the op warns
once, drops it for the process and runs on the next backend; explicit requests still raise."""

import warnings

import pytest
import torch

import longvit.attention.backends as backends
import longvit.attention.dilated as dilated
from longvit.attention import BACKENDS, MultiheadDilatedAttention, dilated_attention
from longvit.attention.backends import BackendFallbackWarning, MathBackend
from tests.test_attention_values import SHAPES, _qkv, check_against_reference


class Flaky(MathBackend):
    """Available everywhere, optional, and its forward fails (a kernel that does not compile)."""

    name = "flaky"
    optional = True

    def __init__(self):
        self.calls = 0

    def forward(self, *args):
        self.calls += 1
        raise RuntimeError("kernel compilation failed")


@pytest.fixture
def flaky(monkeypatch):
    # the per-branch path, where auto chooses among these backends (the packed path's
    # variable-length kernels are not optional)
    monkeypatch.setattr(dilated, "varlen_kernel", lambda *args: None)
    backend = Flaky()
    monkeypatch.setitem(BACKENDS, backend.name, backend)
    monkeypatch.setattr(backends, "AUTO_ORDER", (backend.name, *backends.AUTO_ORDER))
    return backend


def test_auto_falls_back_once_and_stays_exact(flaky):
    b, n, h, d, ws, rs = SHAPES["LongViT rates"]
    with pytest.warns(BackendFallbackWarning, match="'flaky' failed .*kernel compilation"):
        check_against_reference(*_qkv(b, n, h, d), ws, rs, "auto", causal=True)
    assert flaky.calls == 1 and "RuntimeError" in flaky.failure
    with warnings.catch_warnings():
        warnings.simplefilter("error", BackendFallbackWarning)
        check_against_reference(*_qkv(b, n, h, d, seed=2), ws, rs, "auto")
    assert flaky.calls == 1  # dropped for the process


def test_explicit_request_raises(flaky):
    b, n, h, d, ws, rs = SHAPES["LongViT rates"]
    with pytest.raises(RuntimeError, match="kernel compilation failed"):
        dilated_attention(*_qkv(b, n, h, d), ws, rs, backend="flaky")


def test_layer_falls_back(flaky):
    """The head-chunked layer (its own forward path) falls back the same way; its backward
    then runs on the backend its forward used."""
    torch.manual_seed(0)
    layer = MultiheadDilatedAttention(48, 12, [8, 16, 32], [1, 2, 8]).double()
    ref_layer = MultiheadDilatedAttention(48, 12, [8, 16, 32], [1, 2, 8], backend="math")
    ref_layer = ref_layer.double()
    ref_layer.load_state_dict(layer.state_dict())
    x = torch.randn(2, 32, 48, dtype=torch.float64, requires_grad=True)
    with pytest.warns(BackendFallbackWarning):
        y = layer(x)
    y_ref = ref_layer(x)
    torch.testing.assert_close(y, y_ref, rtol=1e-10, atol=1e-12)
    g = torch.randn_like(y)
    (got,), (want,) = torch.autograd.grad(y, x, g), torch.autograd.grad(y_ref, x, g)
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)
