"""Bad arguments raise ValueError naming the argument."""

import pytest
import torch

from longvit.attention import MultiheadDilatedAttention, dilated_attention


def _qkv(shape=(1, 16, 4, 8), dtype=torch.float32):
    return [torch.randn(shape, dtype=dtype) for _ in range(3)]


@pytest.mark.parametrize(
    "kwargs, words",
    [
        (dict(segment_lengths=[4, 8], dilation_rates=[1]), "same length"),
        (dict(segment_lengths=[0, 8], dilation_rates=[1, 2]), "segment_lengths"),
        (dict(segment_lengths=[4, 8], dilation_rates=[1, -2]), "dilation_rates"),
        (dict(segment_lengths=[], dilation_rates=[]), "segment_lengths"),
        (dict(segment_lengths="big", dilation_rates=[1]), "segment_lengths"),
        (dict(segment_lengths=[4.5], dilation_rates=[1]), "segment_lengths"),
    ],
)
def test_bad_schedule(kwargs, words):
    with pytest.raises(ValueError, match=words):
        dilated_attention(*_qkv(), **kwargs)


def test_bad_shapes_and_dtypes():
    q, k, v = _qkv()
    with pytest.raises(ValueError, match="q must have shape"):
        dilated_attention(q[0], k, v, [4], [1])
    with pytest.raises(ValueError, match="same shape"):
        dilated_attention(q, k[:, :8], v, [4], [1])
    with pytest.raises(ValueError, match="share a dtype"):
        dilated_attention(q, k.double(), v, [4], [1])
    with pytest.raises(ValueError, match="floating-point"):
        dilated_attention(q.long(), k.long(), v.long(), [4], [1])


def test_bad_mask():
    q, k, v = _qkv()
    with pytest.raises(ValueError, match="key_padding_mask must have shape"):
        dilated_attention(q, k, v, [4], [1], key_padding_mask=torch.zeros(1, 15, dtype=torch.bool))
    with pytest.raises(ValueError, match="key_padding_mask must be a bool"):
        dilated_attention(q, k, v, [4], [1], key_padding_mask=torch.zeros(1, 16))


def test_bad_backend_and_dropout():
    q, k, v = _qkv()
    with pytest.raises(ValueError, match="backend"):
        dilated_attention(q, k, v, [4], [1], backend="nope")
    with pytest.raises(ValueError, match="backend='cudnn'"):
        dilated_attention(q, k, v, [4], [1], backend="cudnn")
    with pytest.raises(ValueError, match="dropout_p"):
        dilated_attention(q, k, v, [4], [1], dropout_p=1.5)


def test_module_errors():
    with pytest.raises(ValueError, match="divisible"):
        MultiheadDilatedAttention(10, 3)
    with pytest.raises(ValueError, match="same length"):
        MultiheadDilatedAttention(12, 3, [4, 8], [1])
    layer = MultiheadDilatedAttention(12, 3, [4, 8], [1, 2])
    with pytest.raises(ValueError, match=r"x must have shape \(B, N, 12\)"):
        layer(torch.randn(1, 8, 10))


def test_plans_are_remembered_until_a_backend_is_dropped():
    """make_plan's result is kept per plain arguments (host time before the first kernel);
    dropping a backend makes auto choose again."""
    from longvit.attention import dilated
    from longvit.attention.backends import BACKENDS, drop_backend

    args = (64, 8, torch.device("cpu"), torch.float32, [16, 32], [1, 2])
    kw = dict(causal=False, dropout_p=0.0, scale=None, backend="auto", sp_group=None,
              needs_grad=True)  # fmt: skip
    plan = dilated.make_plan(*args, **kw)
    assert dilated.make_plan(*args, **kw) is plan
    assert dilated.make_plan(*args, **{**kw, "causal": True}) is not plan
    tensor_rates = (*args[:5], [torch.tensor(1), torch.tensor(2)])
    assert dilated.make_plan(*tensor_rates, **kw) is not dilated.make_plan(*tensor_rates, **kw)
    cpu_flash = BACKENDS["cpu_flash"]
    assert plan.backend is cpu_flash
    try:
        with pytest.warns(Warning):
            drop_backend(cpu_flash, RuntimeError("test"))
        assert dilated.make_plan(*args, **kw).backend is BACKENDS["math"]
    finally:
        cpu_flash.failure = None
