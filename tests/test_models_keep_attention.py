"""Gradient checkpointing that keeps each block's attention output: same gradients, and the
recompute in the backward runs no attention."""

import pytest
import timm
import torch

import longvit  # noqa: F401  (registers the models)
import longvit.attention.projected as projected

# the per-branch path (keep_attention is its feature), named explicitly
TINY = dict(in_chans=48, embed_dim=32, depth=3, num_heads=4, num_classes=2, attn_backend="math")


def _model(**kwargs):
    torch.manual_seed(0)
    return timm.create_model("longvit_slide_small", **dict(TINY, **kwargs)).train()


def _inputs():
    g = torch.Generator().manual_seed(1)
    feats, coords = (
        torch.randn(2, 70, 48, generator=g),
        torch.randint(0, 30, (2, 70, 2), generator=g),
    )
    pad = torch.zeros(2, 70, dtype=torch.bool)
    pad[0, 41:] = True
    return feats, coords, pad


def _grads(m, calls=None):
    m.zero_grad()
    torch.manual_seed(7)
    m(*_inputs()).square().sum().backward()
    return {n: p.grad.clone() for n, p in m.named_parameters()}


@pytest.fixture
def attention_calls(monkeypatch):
    calls = []
    attend = projected._attend

    def counted(*args, **kwargs):
        calls.append(1)
        return attend(*args, **kwargs)

    monkeypatch.setattr(projected, "_attend", counted)
    return calls


@pytest.mark.parametrize("attn_drop", [0.0, 0.2], ids=["no dropout", "attention dropout"])
def test_kept_attention_gives_identical_gradients(attention_calls, attn_drop):
    m = _model(drop_path_rate=0.1, attn_drop_rate=attn_drop)
    ref = _grads(m)  # no checkpointing
    assert len(attention_calls) == 3
    m.set_grad_checkpointing(True)
    plain = _grads(m)
    assert len(attention_calls) == 3 + 6  # checkpointing recomputes every block's attention
    m.set_grad_checkpointing(True, keep_attention=True)
    kept = _grads(m)
    assert len(attention_calls) == 9 + 3  # the recompute reused the kept outputs
    for name in ref:
        torch.testing.assert_close(plain[name], ref[name], rtol=0, atol=0, msg=name)
        torch.testing.assert_close(kept[name], ref[name], rtol=0, atol=0, msg=name)
    assert all(len(blk.attn._kept) == 0 for blk in m.blocks)  # nothing left behind


def test_forward_without_backward_leaves_nothing_stale(attention_calls):
    m = _model()
    m.set_grad_checkpointing(True, keep_attention=True)
    feats, coords, pad = _inputs()
    m(feats * 2, coords, pad)  # a forward whose backward never comes
    assert all(len(blk.attn._kept) == 1 for blk in m.blocks)
    got = _grads(m)  # the next forward drops them; the results are still exact
    m.set_grad_checkpointing(False)
    want = _grads(m)
    for name in want:
        torch.testing.assert_close(got[name], want[name], rtol=0, atol=0, msg=name)


def test_recompute_of_an_unknown_input_computes(attention_calls):
    """A recompute that finds no kept output for its input attends again (exact either way)."""
    m = _model()
    m.set_grad_checkpointing(True, keep_attention=True)
    loss = m(*_inputs()).square().sum()
    for blk in m.blocks:
        blk.attn.clear_kept()
    before = len(attention_calls)
    loss.backward()
    assert len(attention_calls) == before + 3


def test_lightning_module_option():
    from longvit.training import SlideClassifier

    model_kwargs = {k: v for k, v in TINY.items() if k != "num_classes"}
    kw = dict(model_name="longvit_slide_small", num_classes=2, model_kwargs=model_kwargs)
    module = SlideClassifier(grad_checkpointing=True, keep_attention=True, **kw)
    assert all(blk.attn.keep_for_recompute for blk in module.model.blocks)
    with pytest.raises(ValueError, match="grad_checkpointing"):
        SlideClassifier(keep_attention=True, **kw)
