"""torch.fx: one symbolic trace of each model serves every form of its optional inputs.

The trace sees the optional arguments (token_mask, coords, padding_mask) as graph inputs;
the functions that branch on them are single graph calls (torch.fx.wrap) and the attention,
patch embedding and norms are leaf modules (timm's notrace registry), so the traced model
equals the model with and without masks.
"""

import pytest
import timm
import torch
import torch.fx
from timm.models import get_notrace_functions, get_notrace_modules

import longvit  # noqa: F401


class _TimmLeaves(torch.fx.Tracer):
    def is_leaf_module(self, module, name):
        return isinstance(module, tuple(get_notrace_modules())) or super().is_leaf_module(
            module, name
        )


def _trace(model):
    tracer = _TimmLeaves(autowrap_functions=tuple(get_notrace_functions()))
    return torch.fx.GraphModule(model, tracer.trace(model))


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def test_pixel_model_trace_equals_model_with_and_without_token_mask():
    model = timm.create_model("longvit_small", img_size=128, embed_dim=32, depth=2, num_heads=4,
                              num_classes=3).eval()  # fmt: skip
    traced = _trace(model)
    x = torch.randn(2, 3, 96, 128)  # 3 x 4 patches, another grid than the table's 4 x 4
    keep = torch.rand(2, 3, 4) > 0.4
    keep[:, 0, 0] = True
    with torch.no_grad():
        torch.testing.assert_close(traced(x), model(x))
        torch.testing.assert_close(traced(x, keep), model(x, token_mask=keep))


def test_slide_encoder_trace_equals_model_for_every_input_form():
    model = timm.create_model("longvit_slide_small", in_chans=8, embed_dim=32, depth=2,
                              num_heads=4, num_classes=2).eval()  # fmt: skip
    traced = _trace(model)
    feats, coords = torch.randn(2, 20, 8), torch.randint(0, 9, (2, 20, 2))
    padding = torch.zeros(2, 20, dtype=torch.bool)
    padding[1, 13:] = True
    grid = torch.randn(1, 8, 4, 5)
    with torch.no_grad():
        torch.testing.assert_close(traced(feats, coords), model(feats, coords))
        torch.testing.assert_close(traced(feats, coords, padding), model(feats, coords, padding))
        torch.testing.assert_close(traced(grid), model(grid))
    for pool in ("avg", "max"):  # pooling over the valid tokens, traced once
        model.reset_classifier(2, pool)
        traced = _trace(model)
        with torch.no_grad():
            torch.testing.assert_close(
                traced(feats, coords, padding), model(feats, coords, padding)
            )
