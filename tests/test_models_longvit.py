"""LongViT pixel encoder: sizes, token selection, streamed patches, checkpointing, errors."""

import pytest
import timm
import torch

import longvit  # noqa: F401
from longvit.models import LongViT, pack_tokens

TINY = dict(embed_dim=64, depth=2, num_heads=4, img_size=256)


def tiny(**kwargs) -> LongViT:
    torch.manual_seed(0)
    return timm.create_model("longvit_small", **dict(TINY, **kwargs)).eval()


def cut_patches(image: torch.Tensor, p: int = 32):
    """(B, C, H, W) -> patches (B, N, C, p, p) and (x, y) positions (B, N, 2), row-major."""
    b, c, h, w = image.shape
    gh, gw = h // p, w // p
    patches = image[:, :, : gh * p, : gw * p].reshape(b, c, gh, p, gw, p)
    patches = patches.permute(0, 2, 4, 1, 3, 5).reshape(b, gh * gw, c, p, p)
    ys, xs = torch.meshgrid(torch.arange(gh), torch.arange(gw), indexing="ij")
    pos = torch.stack([xs.reshape(-1), ys.reshape(-1)], -1).expand(b, -1, -1)
    return patches, pos


def test_published_sizes():
    for name, (dim, depth, heads, hidden) in {
        "longvit_small": (384, 12, 16, 1536),
        "longvit_base": (768, 12, 12, 3072),
        "longvit_large": (1024, 24, 16, 4096),
    }.items():
        m = timm.create_model(name, device="meta")
        blk = m.blocks[0]
        assert (m.embed_dim, len(m.blocks), blk.attn.num_heads) == (dim, depth, heads)
        assert blk.mlp.fc1.out_features == hidden
        assert m.patch_size == 32 and m.img_size == (1024, 1024) and m.pos_grid == (32, 32)
        assert blk.attn.dilation_rates == [1, 2, 4, 8, 16]
        assert blk.attn.segment_lengths == "auto"
        assert blk.attn.schedule(1024) == [64, 128, 256, 512, 1024]  # LongViT at 1024 px
        assert m.cls_token is None and m.global_pool == "avg"


def test_create_model_kwargs():
    m = timm.create_model(
        "longvit_small", num_classes=3, drop_path_rate=0.1, in_chans=4, patch_size=16,
        segment_lengths=[16, 32, 64], dilation_rates=[1, 2, 4], **TINY,
    )  # fmt: skip
    assert m.num_classes == 3 and m.head.out_features == 3
    assert m.blocks[0].attn.segment_lengths == [16, 32, 64]
    assert m(torch.randn(1, 4, 64, 48)).shape == (1, 3)
    with pytest.raises(TypeError):
        timm.create_model("longvit_small", not_an_arg=1)


@pytest.mark.parametrize("size", [(256, 256), (64, 96), (160, 128), (100, 70), (32, 32)])
def test_dynamic_image_size(size):
    m = tiny(num_classes=5)
    x = torch.randn(2, 3, *size)
    feats = m.forward_features(x)
    assert feats.shape == (2, (size[0] // 32) * (size[1] // 32), 64)
    assert m(x).shape == (2, 5)
    assert torch.isfinite(feats).all()


def test_bad_input_raises_with_shapes():
    m = tiny()
    with pytest.raises(ValueError, match=r"\(B, 3, H, W\), got \(1, 4, 64, 64\)"):
        m(torch.randn(1, 4, 64, 64))
    with pytest.raises(ValueError, match=r"smaller than one 32 x 32 patch"):
        m(torch.randn(1, 3, 16, 64))
    with pytest.raises(ValueError, match=r"token_mask must have shape .* \(1, 2, 2\)"):
        m(torch.randn(1, 3, 64, 64), token_mask=torch.ones(1, 3, 3, dtype=torch.bool))
    with pytest.raises(ValueError, match=r"positions must be .* \(1, 4, 2\)"):
        m.forward_patches(torch.randn(1, 4, 3, 32, 32), torch.zeros(1, 5, 2, dtype=torch.long))
    with pytest.raises(ValueError, match=r"patches of shape \(B, N, 3, 32, 32\)"):
        m.forward_patches(torch.randn(1, 4, 3, 16, 16), torch.zeros(1, 4, 2, dtype=torch.long))
    with pytest.raises(ValueError, match=r"0 <= x < 2"):
        m.forward_patches(
            torch.randn(1, 2, 3, 32, 32), torch.tensor([[[0, 0], [2, 0]]]), grid_size=(2, 2)
        )


def test_token_mask_keeping_everything_equals_no_mask():
    m = tiny()
    x = torch.randn(2, 3, 128, 96)
    full = m.forward_features(x)
    kept = m.forward_features(x, token_mask=torch.ones(2, 4, 3, dtype=torch.bool))
    torch.testing.assert_close(kept, full)


def test_token_mask_equals_streamed_patches_of_those_tokens():
    """Image + tissue mask and streamed patches + positions are the same computation."""
    m = tiny(num_classes=2)
    x = torch.randn(2, 3, 160, 128)  # grid 5 x 4
    mask = torch.rand(2, 5, 4) > 0.4
    mask[:, 0, 0] = True
    feats, padding = m.forward_features(x, token_mask=mask, return_padding_mask=True)
    patches, pos = cut_patches(x)
    keep = mask.reshape(2, -1)
    n = int(keep.sum(1).max())
    sel_p, sel_pos, pad = [], [], []
    for b in range(2):
        idx = keep[b].nonzero().squeeze(1)
        fill = n - idx.numel()
        sel_p.append(torch.cat([patches[b, idx], torch.zeros(fill, 3, 32, 32)]))
        sel_pos.append(torch.cat([pos[b, idx], torch.zeros(fill, 2, dtype=torch.long)]))
        pad.append(torch.arange(n) >= idx.numel())
    patch_pad = torch.stack(pad)
    streamed = m.forward_patches_features(
        torch.stack(sel_p), torch.stack(sel_pos), patch_pad, grid_size=(5, 4)
    )
    if padding is None:
        assert not patch_pad.any()
    else:
        assert torch.equal(padding, patch_pad)
    valid = ~patch_pad
    torch.testing.assert_close(streamed[valid], feats[valid], rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(
        m.forward_patches(torch.stack(sel_p), torch.stack(sel_pos), patch_pad, grid_size=(5, 4)),
        m(x, token_mask=mask), rtol=1e-4, atol=1e-4,
    )  # fmt: skip


def test_uint8_patches_are_normalised_like_float_input():
    m = tiny()
    raw = torch.randint(0, 256, (1, 6, 3, 32, 32), dtype=torch.uint8)
    mean = torch.tensor(m.pretrained_cfg["mean"])[None, None, :, None, None]
    std = torch.tensor(m.pretrained_cfg["std"])[None, None, :, None, None]
    normalised = (raw.float() / 255 - mean) / std
    pos = torch.tensor([[[0, 0], [1, 0], [2, 0], [0, 1], [1, 1], [2, 1]]])
    torch.testing.assert_close(
        m.forward_patches_features(raw, pos), m.forward_patches_features(normalised, pos),
        rtol=1e-5, atol=1e-5,
    )  # fmt: skip


def test_padding_never_changes_valid_tokens():
    m = tiny(num_classes=3)
    torch.manual_seed(1)
    patches = torch.randn(2, 40, 3, 32, 32)
    pos = torch.randint(0, 10, (2, 40, 2))
    pad = torch.zeros(2, 40, dtype=torch.bool)
    pad[0, 25:] = True
    out = m.forward_patches_features(patches, pos, pad, grid_size=(10, 10))
    patches2, pos2 = patches.clone(), pos.clone()
    patches2[0, 25:] = torch.randn(15, 3, 32, 32) * 100
    pos2[0, 25:] = 7
    out2 = m.forward_patches_features(patches2, pos2, pad, grid_size=(10, 10))
    torch.testing.assert_close(out[~pad], out2[~pad], rtol=0, atol=0)
    logits = m.forward_patches(patches, pos, pad, grid_size=(10, 10))
    logits2 = m.forward_patches(patches2, pos2, pad, grid_size=(10, 10))
    torch.testing.assert_close(logits, logits2, rtol=0, atol=0)


def test_padded_batch_equals_sample_alone_with_fixed_segments():
    m = tiny(num_classes=3, segment_lengths=[8, 16, 32, 64, 64])
    torch.manual_seed(2)
    patches = torch.randn(2, 48, 3, 32, 32)
    pos = torch.randint(0, 12, (2, 48, 2))
    pad = torch.zeros(2, 48, dtype=torch.bool)
    pad[0, 30:] = True
    batched = m.forward_patches(patches, pos, pad, grid_size=(12, 12))
    alone = m.forward_patches(patches[:1, :30], pos[:1, :30], grid_size=(12, 12))
    torch.testing.assert_close(batched[:1], alone, rtol=1e-5, atol=1e-5)


def test_pack_tokens():
    tokens = torch.arange(12.0).reshape(2, 6, 1)
    keep = torch.tensor([[1, 0, 1, 0, 0, 1], [0, 1, 0, 0, 0, 0]], dtype=torch.bool)
    packed, padding = pack_tokens(tokens, keep)
    assert packed[..., 0].tolist() == [[0.0, 2.0, 5.0], [7.0, 0.0, 0.0]]
    assert padding.tolist() == [[False, False, False], [False, True, True]]


def _grads(model, fn):
    model.zero_grad()
    fn(model).square().mean().backward()
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("offload", [False, True])
def test_gradient_checkpointing_gives_identical_gradients(offload):
    m = tiny(num_classes=3, drop_path_rate=0.2).train()
    x = torch.randn(2, 3, 128, 128)

    def run(model):
        torch.manual_seed(5)  # drop path draws the same masks in both runs
        return model(x)

    ref = _grads(m, run)
    m.set_grad_checkpointing(True)
    m.set_activation_offload(offload)
    got = _grads(m, run)
    assert ref.keys() == got.keys() and len(ref) == len(list(m.parameters()))
    for name in ref:
        torch.testing.assert_close(got[name], ref[name], rtol=0, atol=0, msg=name)


def test_chunked_patch_embedding_and_mlp_give_identical_gradients():
    torch.manual_seed(0)
    patches = torch.randint(0, 256, (1, 50, 3, 32, 32), dtype=torch.uint8)
    pos = torch.randint(0, 8, (1, 50, 2))
    m = tiny(num_classes=2).train()
    ref = _grads(m, lambda mm: mm.forward_patches(patches, pos, grid_size=(8, 8)))
    m.patch_embed.chunk_size = 7
    for blk in m.blocks:
        blk.mlp_chunk_size = 9
    m.set_grad_checkpointing(True)
    got = _grads(m, lambda mm: mm.forward_patches(patches, pos, grid_size=(8, 8)))
    for name in ref:
        torch.testing.assert_close(got[name], ref[name], rtol=1e-5, atol=1e-6, msg=name)


def test_features_only_and_intermediates():
    torch.manual_seed(0)
    fm = timm.create_model("longvit_small", features_only=True, out_indices=(0, 1), **TINY)
    outs = fm(torch.randn(1, 3, 96, 128))
    assert [tuple(o.shape) for o in outs] == [(1, 64, 3, 4), (1, 64, 3, 4)]
    assert fm.feature_info.channels() == [64, 64] and fm.feature_info.reduction() == [32, 32]
    m = tiny()
    x = torch.randn(1, 3, 96, 128)
    mask = torch.rand(1, 3, 4) > 0.5
    mask[0, 0, 0] = True
    final, inter = m.forward_intermediates(x, token_mask=mask, output_fmt="NLC")
    assert inter[-1].shape == (1, int(mask.sum()), 64)
    torch.testing.assert_close(final, m.forward_features(x, token_mask=mask))
    with pytest.raises(ValueError, match="NLC"):
        m.forward_intermediates(x, token_mask=mask)


def test_head_pooling_and_reset():
    m = tiny(num_classes=4)
    x = torch.randn(2, 3, 64, 64)
    feats = m.forward_features(x)
    torch.testing.assert_close(m.forward_head(feats, pre_logits=True), m.fc_norm(feats.mean(1)))
    m.reset_classifier(7)
    assert m(x).shape == (2, 7) and m.get_classifier().out_features == 7
    m.reset_classifier(0, "")
    assert m(x).shape == (2, 4, 64)
    with pytest.raises(ValueError, match="class_token"):
        m.reset_classifier(0, "token")
    c = tiny(class_token=True, global_pool="token", num_classes=2)
    assert c.forward_features(x).shape == (2, 5, 64) and c(x).shape == (2, 2)


def test_layer_decay_through_timm_optimizer_factory():
    from timm.optim import create_optimizer_v2

    m = tiny(num_classes=3)
    opt = create_optimizer_v2(m, "adamw", lr=1e-3, weight_decay=0.05, layer_decay=0.5)
    scale = {}
    for group in opt.param_groups:
        for p in group["params"]:
            scale[id(p)] = (group["lr_scale"], group["weight_decay"])
    params = dict(m.named_parameters())
    assert scale[id(params["pos_embed"])] == (0.125, 0.0)  # stem, no weight decay
    assert scale[id(params["blocks.0.attn.qkv.weight"])][0] == 0.25
    assert scale[id(params["blocks.1.attn.qkv.weight"])][0] == 0.5
    assert scale[id(params["head.weight"])] == (1.0, 0.05)


def test_bf16_residual_stream_keeps_outputs_close_and_trains():
    import timm

    torch.manual_seed(0)
    model = timm.create_model(
        "longvit_small",
        img_size=128,
        depth=2,
        num_classes=3,
        segment_lengths=[4, 16],
        dilation_rates=[1, 2],
    )
    x = torch.randn(2, 3, 128, 128)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        ref = model(x).float()
        model.set_residual_dtype(torch.bfloat16)
        model.set_grad_checkpointing(True)
        out = model(x)
    assert out.dtype == torch.bfloat16
    assert torch.equal(model(x), model(x))  # outside autocast the option does nothing
    rel = (out.float() - ref).norm() / ref.norm()
    assert rel < 3e-2, rel
    out.float().sum().backward()
    assert all(p.grad is not None for p in model.parameters() if p.requires_grad)
