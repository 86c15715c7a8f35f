"""torchscale's LongViT DINO checkpoint through timm: longvit_small.tcga_dino.

The checkpoints here are random, written in the published layout (DINO's training
checkpoint: a 'teacher' dict of 'backbone.' and 'head.' keys, a 'student' under 'module.',
argparse args) with torch.save. The expected outputs come from a float64 re-implementation
of torchscale's LongViT forward written in this file from its semantics (their encoder
layer, dilated attention and fine-tuning head), independent of longvit's attention code.
Sizes are tiny (dim 64, 16 heads as published, 2 layers, 8 px patches) so that the token
counts of LongViT's segment table (1,024 and 16,384) are reached with small images; at
4,096 and 16,384 tokens one layer is checked at 302 of its outputs (the reference's cost).
"""

from __future__ import annotations

import argparse
import math

import pytest
import timm
import torch
import torch.nn.functional as F

import longvit  # noqa: F401  (registers the models)
from longvit.attention.schedule import LONGVIT_SEGMENT_LENGTHS, longvit_schedule
from longvit.models.torchscale_checkpoint import CheckpointError

DIM, HEADS, DEPTH, PATCH, MLP = 64, 16, 2, 8, 256
TINY = dict(embed_dim=DIM, num_heads=HEADS, depth=DEPTH, patch_size=PATCH, img_size=256)
GRID = 256 // PATCH  # the checkpoint's table: 32 x 32, as the published 1024 px / 32 px


def published_checkpoint(path, seed=0, depth=DEPTH):
    """A random checkpoint laid out as longvit_small_patch32_1024.pth; returns the teacher."""
    g = torch.Generator().manual_seed(seed)

    def rand(*shape, scale=0.05, offset=0.0):
        return (torch.randn(*shape, generator=g) * scale + offset).float()

    def norm(prefix, width):  # affine far from (1, 0): a norm mapped to the wrong place shows
        return {
            f"{prefix}.weight": rand(width, scale=0.2, offset=1.0),
            f"{prefix}.bias": rand(width),
        }

    def linear(prefix, fan_out, fan_in):
        return {
            f"{prefix}.weight": rand(fan_out, fan_in, scale=fan_in**-0.5),
            f"{prefix}.bias": rand(fan_out),
        }

    backbone = {
        "pos_embed": rand(1, GRID * GRID, DIM, scale=0.5),
        "patch_embed.proj.weight": rand(DIM, 3, PATCH, PATCH, scale=(3 * PATCH * PATCH) ** -0.5),
        "patch_embed.proj.bias": rand(DIM),
    }
    for i in range(depth):
        p = f"encoder.layers.{i}."
        for name in ("k_proj", "v_proj", "q_proj", "out_proj"):
            backbone.update(linear(p + f"self_attn.{name}", DIM, DIM))
        backbone.update(norm(p + "self_attn.inner_attn_ln", DIM))
        backbone.update(norm(p + "self_attn_layer_norm", DIM))
        backbone.update(linear(p + "ffn.fc1", MLP, DIM))
        backbone.update(linear(p + "ffn.fc2", DIM, MLP))
        backbone.update(norm(p + "ffn.ffn_layernorm", MLP))
        backbone.update(norm(p + "final_layer_norm", DIM))
    backbone.update(norm("norm", DIM))  # DINO's token norm, unused by their fine-tuning
    head = {
        "head.mlp.0.weight": rand(32, DIM),
        "head.mlp.0.bias": rand(32),
        "head.last_layer.weight_g": rand(128, 1),
        "head.last_layer.weight_v": rand(128, 16),
    }
    teacher = {f"backbone.{k}": v for k, v in backbone.items()} | head
    student = {f"module.{k}": v + 1.0 for k, v in teacher.items()}  # must not be loaded
    args = argparse.Namespace(arch="vit_small", patch_size=32, out_dim=65536)
    torch.save({"student": student, "teacher": teacher, "epoch": 100, "args": args}, path)
    return teacher


def create(path, overlay=None, **kwargs):
    overlay = dict(overlay or {}, file=str(path))
    args = {**TINY, "num_classes": 0, **kwargs}
    return timm.create_model(
        "longvit_small.tcga_dino", pretrained=True, pretrained_cfg_overlay=overlay, **args
    ).eval()


# ------------------------------------------------------------------ reference
def their_layer_norm(x, sd, prefix):
    return F.layer_norm(x, x.shape[-1:], sd[prefix + ".weight"], sd[prefix + ".bias"], 1e-5)


def their_dilated_attention(q, k, v, segment_lengths, rates, rows):
    """LongNet's dilated attention as torchscale computes it, at query positions `rows`.

    q, k, v: (N, H, D) float64; rows: (R,) positions. Returns (R, H, D). Per branch (w, r):
    segments of min(w, N) tokens; heads in r groups of ceil(H / r); group o keeps the
    positions p with p % r == o inside each segment, which attend to each other; branches
    merged by the softmax weights of their log-sum-exps.
    """
    n, h, d = q.shape
    outs, lses = [], []
    for w, r in zip(segment_lengths, rates):
        w = min(w, n)
        assert n % w == 0 and w % r == 0, "whole segments (as at all the table's sizes)"
        group = math.ceil(h / r)
        out = q.new_zeros(len(rows), h, d)
        lse = q.new_full((len(rows), h), -math.inf)
        for head in range(h):
            o = head // group
            hit = (rows % w) % r == o  # the queries of this branch for this head
            p = rows[hit]
            keys = (p // w * w + o)[:, None] + r * torch.arange(w // r)  # (R', w / r)
            s = (q[p, head, None, :] * k[keys, head]).sum(-1) / math.sqrt(d)  # (R', w / r)
            lse[hit, head] = torch.logsumexp(s, dim=-1)
            out[hit, head] = (torch.softmax(s, dim=-1)[..., None] * v[keys, head]).sum(1)
        outs.append(out)
        lses.append(lse)
    weights = torch.softmax(torch.stack(lses), dim=0)  # (branches, R, H)
    return sum(wt[..., None] * o for wt, o in zip(weights, outs))


def their_tokens(teacher, image, segment_lengths, rows=None):
    """torchscale LongViT (examples/longvit) tokens for one image (3, H, W), float64.

    rows: positions (R,) whose output tokens to compute (all when None); the last layer
    computes only those (its attention needs every key, but only their queries)."""
    sd = {k[len("backbone.") :]: v.double() for k, v in teacher.items() if "backbone." in k}
    x = F.conv2d(
        image[None].double(),
        sd["patch_embed.proj.weight"],
        sd["patch_embed.proj.bias"],
        stride=PATCH,
    )
    grid = tuple(x.shape[2:])
    x = x.flatten(2).transpose(1, 2)[0]  # (N, C), row-major
    table = sd["pos_embed"].reshape(1, GRID, GRID, DIM).permute(0, 3, 1, 2)
    if grid != (GRID, GRID):  # their fine-tuning loader's resize, in float32 as theirs
        table = F.interpolate(table.float(), size=grid, mode="bicubic", align_corners=False)
        table = table.double()  # (their loader then rounds it to float16; longvit keeps float32)
    x = x + table.permute(0, 2, 3, 1).reshape(-1, DIM)
    n = x.shape[0]
    depth = len({k.split(".")[2] for k in sd if k.startswith("encoder.layers.")})
    everything = torch.arange(n)
    for i in range(depth):
        p = f"encoder.layers.{i}."
        keep = rows if i == depth - 1 and rows is not None else everything
        y = their_layer_norm(x, sd, p + "self_attn_layer_norm")
        q, k, v = (
            F.linear(
                y, sd[p + f"self_attn.{t}_proj.weight"], sd[p + f"self_attn.{t}_proj.bias"]
            ).view(n, HEADS, -1)
            for t in "qkv"
        )
        a = their_dilated_attention(q, k, v, segment_lengths, [1, 2, 4, 8, 16], keep)
        a = their_layer_norm(a.reshape(len(keep), DIM), sd, p + "self_attn.inner_attn_ln")
        out_proj = sd[p + "self_attn.out_proj.weight"], sd[p + "self_attn.out_proj.bias"]
        x = x[keep] + F.linear(a, *out_proj)
        y = their_layer_norm(x, sd, p + "final_layer_norm")
        y = F.gelu(F.linear(y, sd[p + "ffn.fc1.weight"], sd[p + "ffn.fc1.bias"]))
        y = their_layer_norm(y, sd, p + "ffn.ffn_layernorm")
        x = x + F.linear(y, sd[p + "ffn.fc2.weight"], sd[p + "ffn.fc2.bias"])
    return x  # their encoder has no final norm


# ---------------------------------------------------------------------- tests
def test_every_weight_arrives_from_the_teacher(tmp_path):
    path = tmp_path / "longvit_small_patch32_1024.pth"
    teacher = published_checkpoint(path)
    model = create(path)
    got = model.state_dict()
    t = {k[len("backbone.") :]: v for k, v in teacher.items() if k.startswith("backbone.")}
    expected = {
        "patch_embed.proj.weight": t["patch_embed.proj.weight"],
        "patch_embed.proj.bias": t["patch_embed.proj.bias"],
        "pos_embed": t["pos_embed"],
    }
    for i in range(DEPTH):
        src, dst = f"encoder.layers.{i}.", f"blocks.{i}."
        for kind in ("weight", "bias"):
            qkv = [t[f"{src}self_attn.{n}_proj.{kind}"] for n in "qkv"]
            expected[f"{dst}attn.qkv.{kind}"] = torch.cat(qkv)
            for a, b in [
                ("self_attn_layer_norm", "norm1"),
                ("self_attn.inner_attn_ln", "attn.inner_norm"),
                ("self_attn.out_proj", "attn.proj"),
                ("final_layer_norm", "norm2"),
                ("ffn.fc1", "mlp.fc1"),
                ("ffn.ffn_layernorm", "mlp.norm"),
                ("ffn.fc2", "mlp.fc2"),
            ]:
                expected[f"{dst}{b}.{kind}"] = t[f"{src}{a}.{kind}"]
    assert set(got) == set(expected) | {"fc_norm.weight", "fc_norm.bias"}
    for key, value in expected.items():
        torch.testing.assert_close(got[key], value, rtol=0, atol=0, msg=key)
    # their fine-tuning head: a fresh LayerNorm (PyTorch's eps) after the mean
    torch.testing.assert_close(got["fc_norm.weight"], torch.ones(DIM))
    torch.testing.assert_close(got["fc_norm.bias"], torch.zeros(DIM))
    norms = [m for m in model.modules() if isinstance(m, torch.nn.LayerNorm)]
    assert len(norms) == 4 * DEPTH + 1 and {m.eps for m in norms} == {1e-5}
    assert isinstance(model.norm, torch.nn.Identity)


@pytest.mark.parametrize(
    "image_px, segment_lengths, rows",
    [
        (256, [64, 128, 256, 512, 1024], None),  # 1,024 tokens: LongViT's 1024 px lengths
        (128, [64, 128, 256, 512, 1024], None),  # 256 tokens (a 512 px DINO local crop's)
        (512, [64, 128, 256, 512, 1024], 300),  # 4,096 tokens: not in the table
        (1024, [1024, 2048, 4096, 8192, 16384], 300),  # 16,384: LongViT's 4096 px lengths
    ],
)
def test_tokens_equal_their_forward(tmp_path, image_px, segment_lengths, rows):
    depth = DEPTH if rows is None else 1  # one layer, checked at some of its outputs
    path = tmp_path / "w.pth"
    teacher = published_checkpoint(path, seed=image_px, depth=depth)
    model = create(path, num_classes=3, depth=depth).double()
    n = (image_px // PATCH) ** 2
    assert model.blocks[0].attn.schedule(n) == longvit_schedule(n) == segment_lengths
    g = torch.Generator().manual_seed(1)
    image = torch.randn(1, 3, image_px, image_px, generator=g)
    if rows is not None:  # the last layer's outputs at some positions, the first and last too
        rows = torch.cat([torch.tensor([0, n - 1]), torch.randperm(n, generator=g)[:rows]])
    expected = their_tokens(teacher, image[0], segment_lengths, rows)
    with torch.no_grad():
        tokens = model.forward_features(image.double())
        logits = model(image.double())
    if rows is not None:
        torch.testing.assert_close(tokens[0, rows], expected, rtol=1e-9, atol=1e-9)
        return
    torch.testing.assert_close(tokens[0], expected, rtol=1e-9, atol=1e-9)
    # their LongViTForTCGAClassification: head(fc_norm(mean over tokens))
    pooled = F.layer_norm(expected.mean(0), (DIM,), model.fc_norm.weight, model.fc_norm.bias, 1e-5)
    torch.testing.assert_close(logits[0], model.head(pooled), rtol=1e-9, atol=1e-9)


def test_table_resampled_at_load_as_their_fine_tuning(tmp_path):
    path = tmp_path / "w.pth"
    teacher = published_checkpoint(path)
    big = create(path, img_size=512)  # a 64 x 64 grid, built for the larger image
    table = teacher["backbone.pos_embed"].reshape(1, GRID, GRID, DIM).permute(0, 3, 1, 2)
    theirs = F.interpolate(table, size=(64, 64), mode="bicubic", align_corners=False)
    torch.testing.assert_close(big.pos_embed[0], theirs.permute(0, 2, 3, 1).reshape(-1, DIM))
    # the 1024 px-grid model resamples the same way at run time, and for streamed patches
    small = create(path)
    image = torch.randn(1, 3, 512, 512)
    with torch.no_grad():
        torch.testing.assert_close(small.forward_features(image), big.forward_features(image))
        positions = torch.tensor([[[0, 0], [63, 5], [17, 40]]])
        sampled = small.pos_embed_at(positions, grid_size=(64, 64))
    rows = positions[0, :, 1] * 64 + positions[0, :, 0]
    torch.testing.assert_close(sampled[0], big.pos_embed[0, rows])


def test_segment_lengths_follow_the_published_table():
    published = {
        1024: [64, 128, 256, 512, 1024],
        4096: [1024, 2048, 4096, 8192, 16384],
        8192: [1024, 4096, 8192, 16384, 65536],
        16384: [1024, 4096, 16384, 65536, 262144],
        32768: [1024, 4096, 32768, 262144, 1048576],
    }
    assert {n: list(v) for n, v in LONGVIT_SEGMENT_LENGTHS.items()} == {
        (px // 32) ** 2: v for px, v in published.items()
    }
    model = timm.create_model("longvit_small.tcga_dino", **dict(TINY, depth=1))
    for px, lengths in published.items():
        assert model.blocks[0].attn.schedule((px // 32) ** 2) == lengths
    assert model.blocks[0].attn.dilation_rates == [1, 2, 4, 8, 16]
    # longvit's own models keep their settings
    own = timm.create_model("longvit_small", **dict(TINY, depth=1))
    assert own.blocks[0].attn.segment_lengths == "auto" and own.pos_embed_antialias
    assert own.blocks[0].norm1.eps == 1e-6
    with pytest.raises(ValueError, match="longvit"):
        timm.create_model("longvit_small.tcga_dino", **dict(TINY, dilation_rates=[1, 2]))


def test_student_and_dino_head_are_not_loaded_and_own_state_dict_reloads(tmp_path):
    path = tmp_path / "w.pth"
    teacher = published_checkpoint(path)
    model = create(path, num_classes=2)
    torch.testing.assert_close(model.pos_embed, teacher["backbone.pos_embed"], rtol=0, atol=0)
    resaved = tmp_path / "fine_tuned.pth"
    torch.save(model.state_dict(), resaved)
    again = create(resaved, overlay=dict(num_classes=2), num_classes=2)  # a 2-class head
    for key, value in model.state_dict().items():
        torch.testing.assert_close(again.state_dict()[key], value, rtol=0, atol=0, msg=key)


class NotAWeight:  # a pickled object: torch.load(weights_only=True) refuses it
    pass


@pytest.mark.parametrize(
    "content, message",
    [
        (b"this is not a checkpoint\n", "not readable as a PyTorch checkpoint"),
        ({"model": {"blocks.0.mlp.fc1.weigth": torch.zeros(1)}}, "no LongViT backbone"),
        ({"teacher": {"backbone.cls_token": torch.zeros(1)}}, "'teacher' dict"),
        (
            {"teacher": {"backbone.pos_embed": torch.zeros(1, 1024, 64), "x": NotAWeight()}},
            "weights_only",
        ),
    ],
)
def test_wrong_files_name_the_file_and_the_expected_layout(tmp_path, content, message):
    path = tmp_path / "downloaded.pth"
    if isinstance(content, bytes):
        path.write_bytes(content)
    else:
        torch.save(content, path)
    with pytest.raises(CheckpointError, match=message) as caught:
        create(path)
    assert str(path) in str(caught.value) and "teacher" in str(caught.value)


def test_incomplete_or_other_size_checkpoints_are_refused(tmp_path):
    path = tmp_path / "w.pth"
    teacher = published_checkpoint(path)
    del teacher["backbone.encoder.layers.1.ffn.fc2.weight"]
    cut = tmp_path / "cut.pth"
    torch.save({"teacher": teacher}, cut)
    with pytest.raises(
        CheckpointError, match=r"encoder\.layers\.1\.\{ffn\.fc2\.weight\}"
    ) as caught:
        create(cut)
    assert str(cut) in str(caught.value)
    with pytest.raises(CheckpointError, match="another size") as caught:
        create(path, embed_dim=128, num_heads=16)  # the checkpoint is dim 64
    assert str(path) in str(caught.value)
    with pytest.raises(FileNotFoundError, match="longvit_small_patch32_1024.pth"):
        create(tmp_path / "missing.pth")
    with pytest.raises(FileNotFoundError, match="pretrained_cfg_overlay"):
        timm.create_model("longvit_small.tcga_dino", pretrained=True)


def test_grey_model_takes_the_rgb_patch_embedding_as_timm_adapts_it(tmp_path):
    path = tmp_path / "w.pth"
    teacher = published_checkpoint(path)
    grey = create(path, in_chans=1)
    rgb = teacher["backbone.patch_embed.proj.weight"]
    torch.testing.assert_close(grey.patch_embed.proj.weight, rgb.sum(dim=1, keepdim=True))
