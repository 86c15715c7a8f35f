"""Slide encoder over tile features: variable-length batches, coords, grid form, errors."""

import pytest
import timm
import torch

import longvit  # noqa: F401
from longvit.models import LongViTSlideEncoder
from longvit.models.pos_embed import grid_positions

TINY = dict(embed_dim=64, depth=2, num_heads=4, in_chans=48)


def tiny(**kwargs) -> LongViTSlideEncoder:
    torch.manual_seed(0)
    return timm.create_model("longvit_slide_small", **dict(TINY, **kwargs)).eval()


def test_published_sizes():
    m = timm.create_model("longvit_slide_base", device="meta")
    assert (m.embed_dim, len(m.blocks), m.blocks[0].attn.num_heads) == (768, 12, 16)
    assert m.in_chans == 1536 and m.feature_proj.in_features == 1536
    assert m.global_pool == "token" and m.cls_token is not None
    assert m.blocks[0].attn.dilation_rates == [1, 2, 4, 8, 16]
    s = timm.create_model("longvit_slide_small", device="meta", in_chans=1024)
    assert s.embed_dim == 384 and s.feature_proj.in_features == 1024
    assert not any(b.numel() > 0 for b in m.buffers())  # no position buffer


def test_forward_on_meta_device():
    """Shapes without values (timm builds models on "meta" to check them): 1 + 30 tokens
    need padded segments, whose key mask must not be read as values."""
    m = timm.create_model("longvit_slide_small", device="meta", **TINY).eval()
    feats, coords = torch.randn(2, 30, 48, device="meta"), torch.zeros(2, 30, 2, device="meta")
    assert m.forward_features(feats, coords).shape == (2, 31, 64)
    assert m(torch.randn(1, 48, 5, 6, device="meta")).shape == (1, 64)


def test_shapes_and_num_classes():
    m = tiny(num_classes=3)
    feats, coords = torch.randn(2, 30, 48), torch.randint(0, 50, (2, 30, 2))
    assert m.forward_features(feats, coords).shape == (2, 31, 64)
    assert m(feats, coords).shape == (2, 3)
    assert tiny()(feats, coords).shape == (2, 64)  # num_classes=0: pooled features


def test_bad_input_raises_with_shapes():
    m = tiny()
    feats = torch.randn(2, 30, 48)
    with pytest.raises(
        ValueError, match=r"tile_grid must have shape \(B, N, 2\) = \(2, 30, 2\).*got \(2, 29, 2\)"
    ):
        m(feats, torch.zeros(2, 29, 2))
    with pytest.raises(ValueError, match=r"got None"):
        m(feats)
    with pytest.raises(ValueError, match=r"\(B, N, 48\).*got \(2, 30, 40\)"):
        m(torch.randn(2, 30, 40), torch.zeros(2, 30, 2))
    with pytest.raises(ValueError, match=r"padding_mask must be .* \(2, 30\)"):
        m(feats, torch.zeros(2, 30, 2), torch.zeros(2, 31, dtype=torch.bool))
    with pytest.raises(ValueError, match=r"\(B, 48, H, W\), got \(1, 40, 3, 3\)"):
        m(torch.randn(1, 40, 3, 3))


def test_padding_tiles_never_change_valid_tiles():
    m = tiny(num_classes=2)
    torch.manual_seed(3)
    feats, coords = torch.randn(2, 50, 48), torch.randint(0, 40, (2, 50, 2))
    pad = torch.zeros(2, 50, dtype=torch.bool)
    pad[1, 21:] = True
    out = m.forward_features(feats, coords, pad)
    feats2, coords2 = feats.clone(), coords.clone()
    feats2[1, 21:] = 1e3 * torch.randn(29, 48)
    coords2[1, 21:] = 9999
    out2 = m.forward_features(feats2, coords2, pad)
    valid = torch.cat([torch.ones(2, 1, dtype=torch.bool), ~pad], 1)  # class token is valid
    torch.testing.assert_close(out[valid], out2[valid], rtol=0, atol=0)
    torch.testing.assert_close(m(feats, coords, pad), m(feats2, coords2, pad), rtol=0, atol=0)


@pytest.mark.parametrize("global_pool", ["token", "avg", "max"])
def test_padded_batch_equals_slide_alone_with_fixed_segments(global_pool):
    m = tiny(num_classes=2, segment_lengths=[8, 16, 32, 64, 64], global_pool=global_pool)
    torch.manual_seed(4)
    feats, coords = torch.randn(3, 57, 48), torch.randint(0, 40, (3, 57, 2))
    counts = [57, 20, 41]
    pad = torch.arange(57)[None] >= torch.tensor(counts)[:, None]
    batched = m(feats, coords, pad)
    for i, n in enumerate(counts):
        alone = m(feats[i : i + 1, :n], coords[i : i + 1, :n])
        torch.testing.assert_close(batched[i : i + 1], alone, rtol=1e-5, atol=1e-5)


def test_grid_form_equals_sequence_with_grid_coords():
    m = tiny(num_classes=2)
    grid = torch.randn(2, 48, 4, 5)
    seq = grid.flatten(2).transpose(1, 2)
    coords = grid_positions(4, 5).expand(2, -1, -1)
    torch.testing.assert_close(m(grid), m(seq, coords))
    _, inter = m.forward_intermediates(grid, indices=[0])
    assert inter[0].shape == (2, 64, 4, 5)
    _, inter = m.forward_intermediates(seq, tile_grid=coords, indices=[0], output_fmt="NLC")
    assert inter[0].shape == (2, 20, 64)


def test_coordinates_change_the_output():
    m = tiny(num_classes=2)
    feats, coords = torch.randn(1, 20, 48), torch.randint(0, 30, (1, 20, 2))
    assert not torch.allclose(m(feats, coords), m(feats, coords + 5))
    # large slides: positions far beyond any fixed grid buffer (Prov-GigaPath's 1000) are fine
    assert torch.isfinite(m(feats, coords + 5_000)).all()


def test_gradient_checkpointing_gives_identical_gradients():
    m = tiny(num_classes=2, drop_path_rate=0.1).train()
    feats, coords = torch.randn(2, 33, 48), torch.randint(0, 30, (2, 33, 2))
    pad = torch.zeros(2, 33, dtype=torch.bool)
    pad[0, 20:] = True

    def grads():
        m.zero_grad()
        torch.manual_seed(7)
        m(feats, coords, pad).square().sum().backward()
        return {n: p.grad.clone() for n, p in m.named_parameters()}

    ref = grads()
    m.set_grad_checkpointing(True)
    got = grads()
    for name in ref:
        torch.testing.assert_close(got[name], ref[name], rtol=0, atol=0, msg=name)
