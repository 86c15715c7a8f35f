"""longvit_slide_base.gigapath: Prov-GigaPath's slide encoder, its weights, positions and padding.

The always-on tests need no code of theirs: the key mapping is checked against their key
names and shapes written here, the position embedding against MAE's 2-D sin-cos written
here in NumPy, the zero-padded keys against ``dilated_attention_reference``. The opt-in
test at the end runs their encoder itself: set LONGVIT_GIGAPATH_CODE to a folder holding
their ``gigapath/`` package (from github.com/prov-gigapath/prov-gigapath, with
``get_optimal_segment_length`` returning ``str([int(s) for s in segment_length])`` under
NumPy 2), stand-ins for ``fairscale`` and einops importable.
"""

from __future__ import annotations

import importlib
import math
import os
import sys

import numpy as np
import pytest
import timm
import torch
import torch.nn.functional as F

import longvit  # noqa: F401
from longvit.attention import dilated_attention_reference
from longvit.models.gigapath import CheckpointFileError, gigapath_checkpoint_filter_fn
from longvit.models.tile_positions import TilePositionError

NAME = "longvit_slide_base.gigapath"
TINY = dict(embed_dim=64, depth=2, num_heads=8, in_chans=24)


def their_state_dict(dim: int, depth: int, in_chans: int, device="cpu", seed=0) -> dict:
    """Prov-GigaPath's slide-encoder keys and shapes (``{"model": ...}`` of slide_encoder.pth),
    random values (norms too), as their LongNetViT names them."""
    g = torch.Generator().manual_seed(seed)

    def t(*shape):
        if device == "meta":
            return torch.empty(*shape, device="meta")
        return torch.randn(*shape, generator=g) * 0.05

    sd = {"cls_token": t(1, 1, dim), "patch_embed.proj.weight": t(dim, in_chans)}
    sd["patch_embed.proj.bias"] = t(dim)
    for i in range(depth):
        p = f"encoder.layers.{i}."
        for name in ("q_proj", "k_proj", "v_proj", "out_proj"):
            sd[p + f"self_attn.{name}.weight"] = t(dim, dim)
            sd[p + f"self_attn.{name}.bias"] = t(dim)
        for norm in ("self_attn.inner_attn_ln", "self_attn_layer_norm", "final_layer_norm"):
            sd[p + norm + ".weight"], sd[p + norm + ".bias"] = 1 + t(dim), t(dim)
        sd[p + "ffn.fc1.weight"], sd[p + "ffn.fc1.bias"] = t(4 * dim, dim), t(4 * dim)
        sd[p + "ffn.fc2.weight"], sd[p + "ffn.fc2.bias"] = t(dim, 4 * dim), t(dim)
        sd[p + "ffn.ffn_layernorm.weight"] = 1 + t(4 * dim)
        sd[p + "ffn.ffn_layernorm.bias"] = t(4 * dim)
    for norm in ("encoder.layer_norm", "norm"):
        sd[norm + ".weight"], sd[norm + ".bias"] = 1 + t(dim), t(dim)
    return sd


@pytest.fixture(scope="module")
def tiny_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("gigapath") / "slide_encoder.pth"
    sd = their_state_dict(TINY["embed_dim"], TINY["depth"], TINY["in_chans"])
    torch.save({"model": sd}, path)
    return path, sd


def tiny(file=None, **kwargs):
    torch.manual_seed(0)
    overlay = dict(file=str(file)) if file else None
    return timm.create_model(
        NAME, pretrained=file is not None, pretrained_cfg_overlay=overlay, num_classes=0,
        **dict(TINY, **kwargs),
    ).eval()  # fmt: skip


# ----------------------------------------------------------------- the weights
def test_every_weight_lands_where_it_belongs(tiny_file):
    file, sd = tiny_file
    m = tiny(file)
    own = m.state_dict()
    assert torch.equal(own["feature_proj.weight"], sd["patch_embed.proj.weight"])
    assert torch.equal(own["cls_token"], sd["cls_token"])
    assert torch.equal(own["norm.weight"], sd["encoder.layer_norm.weight"])
    assert torch.equal(own["fc_norm.bias"], sd["norm.bias"])
    used = {"patch_embed.proj.weight", "patch_embed.proj.bias", "cls_token"}
    used |= {f"{n}.{k}" for n in ("encoder.layer_norm", "norm") for k in ("weight", "bias")}
    for i in range(TINY["depth"]):
        p, b = f"encoder.layers.{i}.", f"blocks.{i}."
        for kind in ("weight", "bias"):
            qkv = torch.cat([sd[p + f"self_attn.{x}_proj.{kind}"] for x in "qkv"])
            assert torch.equal(own[b + f"attn.qkv.{kind}"], qkv)
            pairs = {
                "self_attn.out_proj": "attn.proj", "self_attn.inner_attn_ln": "attn.inner_norm",
                "self_attn_layer_norm": "norm1", "ffn.fc1": "mlp.fc1", "ffn.fc2": "mlp.fc2",
                "ffn.ffn_layernorm": "mlp.norm", "final_layer_norm": "norm2",
            }  # fmt: skip
            for theirs, ours in pairs.items():
                assert torch.equal(own[b + f"{ours}.{kind}"], sd[p + f"{theirs}.{kind}"])
                used.add(p + f"{theirs}.{kind}")
            used |= {p + f"self_attn.{x}_proj.{kind}" for x in "qkv"}
    assert used == set(sd)  # every key of theirs was checked above
    assert len(own) == len(sd) - 2 * 2 * TINY["depth"]  # q, k, v -> qkv


def test_published_architecture_and_full_size_keys():
    m = timm.create_model(NAME, device="meta", num_classes=0)
    assert (m.embed_dim, len(m.blocks), m.in_chans) == (768, 12, 1536)
    assert m.global_pool == "avg" and m.cls_token is not None
    for blk in m.blocks:
        attn = blk.attn
        assert attn.num_heads == 16 and attn.zero_padded_keys
        assert attn.segment_lengths == [1024, 5792, 32768, 185363, 1048576]
        assert attn.dilation_rates == [1, 2, 4, 8, 16]
        for norm in (blk.norm1, attn.inner_norm, blk.mlp.norm, blk.norm2):
            assert isinstance(norm, torch.nn.LayerNorm) and norm.eps == 1e-5
        assert isinstance(blk.mlp.act, torch.nn.GELU) and blk.mlp.act.approximate == "none"
    assert m.norm.eps == 1e-5 and m.fc_norm.eps == 1e-6
    assert not any(b.numel() for b in m.buffers())  # no position table
    sd = their_state_dict(768, 12, 1536, device="meta")
    assert len(sd) == 247  # their gigapath_slide_enc12l768d's state dict
    mapped = gigapath_checkpoint_filter_fn({"model": sd}, m)
    assert set(mapped) == set(m.state_dict())
    # longvit's own model is unchanged
    own = timm.create_model("longvit_slide_base", device="meta")
    assert own.global_pool == "token" and own.pos_embed_type == "sincos"
    assert own.norm.eps == 1e-6 and isinstance(own.fc_norm, torch.nn.Identity)
    assert not own.blocks[0].attn.zero_padded_keys


def test_bad_files_name_the_file(tmp_path, tiny_file):
    junk = tmp_path / "junk.pth"
    junk.write_bytes(b"not a checkpoint at all")
    with pytest.raises(CheckpointFileError, match=r"junk\.pth: cannot be read.*slide_encoder"):
        tiny(junk)
    with pytest.raises(CheckpointFileError, match=r"absent\.pth: no such file"):
        tiny(tmp_path / "absent.pth")
    other = tmp_path / "other.pth"
    torch.save({"state_dict": {"backbone.conv.weight": torch.zeros(3)}}, other)
    with pytest.raises(CheckpointFileError, match=r"other\.pth: no Prov-GigaPath.*expected"):
        tiny(other)
    wide = tmp_path / "wide.pth"
    torch.save({"model": their_state_dict(32, 2, 24)}, wide)
    with pytest.raises(CheckpointFileError, match=r"wide\.pth: .*shapes differ"):
        tiny(wide)
    extra = tmp_path / "extra.pth"
    torch.save({"model": {**tiny_file[1], "decoder_pred.weight": torch.zeros(2)}}, extra)
    with pytest.raises(CheckpointFileError, match=r"extra\.pth: keys with no place.*decoder"):
        tiny(extra)
    with pytest.raises(CheckpointFileError, match=r"pretrained_cfg_overlay=dict\(file="):
        timm.create_model(NAME, pretrained=True)


def test_own_keys_load_back(tmp_path, tiny_file):
    m = tiny(tiny_file[0])
    path = tmp_path / "saved.pth"
    torch.save(m.state_dict(), path)
    again = tiny(path)
    for k, v in m.state_dict().items():
        assert torch.equal(again.state_dict()[k], v), k


# --------------------------------------------------------------- the positions
def mae_1d(dim: int, pos: np.ndarray) -> np.ndarray:
    omega = np.arange(dim // 2, dtype=float) / (dim / 2.0)
    omega = 1.0 / 10000**omega
    out = np.einsum("m,d->md", pos.reshape(-1).astype(np.float32), omega)
    return np.concatenate([np.sin(out), np.cos(out)], axis=1)


def their_table_rows(dim: int, x: np.ndarray, y: np.ndarray) -> torch.Tensor:
    """Rows x * 1000 + y + 1 of MAE's get_2d_sincos_pos_embed(dim, 1000, cls_token=True):
    its meshgrid(w, h) makes row i * 1000 + j encode j in the first half, i in the second."""
    row = x * 1000 + y  # without the class token's row
    i, j = row // 1000, row % 1000
    emb = np.concatenate([mae_1d(dim // 2, j), mae_1d(dim // 2, i)], axis=1)
    return torch.from_numpy(emb).float()


def test_position_embedding_is_their_table():
    m = timm.create_model(NAME, num_classes=0, depth=1)
    g = torch.Generator().manual_seed(1)
    grid = torch.randint(0, 1000, (500, 2), generator=g)
    grid = torch.cat([grid, torch.tensor([[0, 0], [999, 999], [0, 999], [999, 0], [3, 7]])])
    expected = their_table_rows(768, grid[:, 0].numpy(), grid[:, 1].numpy())
    torch.testing.assert_close(m.position_embedding(grid), expected, rtol=0, atol=0)
    # what the tokens get: projection + that row
    feats = torch.randn(1, len(grid), 1536)
    tokens = m.embed(feats, grid[None])[0]
    torch.testing.assert_close(tokens, m.feature_proj(feats) + expected, rtol=0, atol=0)


# ---------------------------------------------------- the coordinate arguments
def test_level0_pixels_and_grid_indices_give_the_same_tiles():
    m = tiny()
    g = torch.Generator().manual_seed(2)
    grid = torch.randint(0, 1000, (1, 40, 2), generator=g)
    feats = torch.randn(1, 40, 24, generator=g)
    ref = m(feats, grid)
    inside = torch.randint(0, 256, (1, 40, 2), generator=g)  # anywhere inside the tile
    got = m(feats, coords_level0=grid * 256 + inside, tile_size_level0=256)
    torch.testing.assert_close(got, ref, rtol=0, atol=0)
    got = m(feats, coords_level0=(grid * 512).float(), tile_size_level0=torch.tensor([512.0]))
    torch.testing.assert_close(got, ref, rtol=0, atol=0)


def test_confused_coordinates_raise_naming_the_other_form():
    m = tiny()
    feats = torch.randn(1, 40, 24)
    grid = torch.randint(0, 100, (1, 40, 2))
    with pytest.raises(TilePositionError, match=r"integer tile-grid indices.*coords_level0="):
        m(feats, grid.float())
    with pytest.raises(TilePositionError, match=r"look like level-0 pixel.*coords_level0="):
        m(feats, grid * 256)
    with pytest.raises(TilePositionError, match=r"look like tile-grid indices.*tile_grid"):
        m(feats, coords_level0=grid, tile_size_level0=256)
    with pytest.raises(TilePositionError, match=r"needs tile_size_level0"):
        m(feats, coords_level0=grid * 256)
    with pytest.raises(TilePositionError, match=r"tile_size_level0 goes with coords_level0"):
        m(feats, grid, tile_size_level0=256)
    with pytest.raises(TilePositionError, match=r"not both"):
        m(feats, grid, coords_level0=grid * 256, tile_size_level0=256)
    with pytest.raises(TilePositionError, match=r"positive number"):
        m(feats, coords_level0=grid * 256, tile_size_level0=0)
    with pytest.raises(TilePositionError, match=r"start at 0"):
        m(feats, grid - 100)
    # longvit's own model: real-valued grid positions stay allowed, pixels do not
    own = timm.create_model("longvit_slide_small", embed_dim=32, depth=1, num_heads=4, in_chans=24)
    assert torch.isfinite(own(feats, grid.float() / 2)).all()
    with pytest.raises(TilePositionError, match=r"level-0 pixel"):
        own(feats, grid.float() * 256 + 20_000)
    with pytest.raises(TilePositionError, match=r"NaN"):
        own(feats, torch.full((1, 40, 2), float("nan")))


@pytest.mark.parametrize("axis", [0, 1])
def test_grid_past_their_table_raises(axis):
    """Their code indexes past its table for x = 1000 and wraps y = 1000 into row x + 1."""
    m = tiny()
    feats = torch.randn(1, 40, 24)
    grid = torch.randint(0, 1000, (1, 40, 2))
    grid[0, 7, axis] = 1000
    with pytest.raises(TilePositionError, match=r"tile_grid reaches grid index 1000.*1000 x 1000"):
        m(feats, grid)
    with pytest.raises(TilePositionError, match=r"coords_level0 // tile_size_level0 reaches"):
        m(feats, coords_level0=grid * 256, tile_size_level0=256)
    pad = torch.zeros(1, 40, dtype=torch.bool)
    pad[0, 7] = True  # a padded tile's position is never used, so it is not checked
    m.forward_features(feats, grid, pad)


# ------------------------------------------------------------ zero-padded keys
def reference_forward(m, feats: torch.Tensor, grid: torch.Tensor, zero_padded_keys: bool):
    """The model's forward with dilated_attention_reference as its attention (float64)."""
    x, _, _ = m.embed(feats, grid)
    x = torch.cat([m.cls_token.expand(x.shape[0], -1, -1), x], dim=1)
    for blk in m.blocks:
        attn = blk.attn
        b, n, c = x.shape
        qkv = F.linear(blk.norm1(x), attn.qkv.weight, attn.qkv.bias)
        q, k, v = qkv.view(b, n, 3, attn.num_heads, -1).unbind(2)
        o = dilated_attention_reference(
            q, k, v, attn.schedule(n), attn.dilation_rates, zero_padded_keys=zero_padded_keys
        )
        x = x + attn.proj(attn.inner_norm(o.reshape(b, n, c)))
        x = x + blk.mlp(blk.norm2(x))
    return m.fc_norm(m.norm(x)[:, 1:].mean(1))


@pytest.mark.parametrize("tiles", [20, 37, 64])
def test_zero_padded_keys_match_the_reference(tiles, tiny_file):
    # segments of 8 / 12 / 24 / 48 / 96 tokens: 21, 38 and 65 tokens pad every branch
    m = tiny(tiny_file[0], segment_lengths=[8, 12, 24, 48, 96]).double()
    g = torch.Generator().manual_seed(tiles)
    feats = torch.randn(1, tiles, 24, generator=g, dtype=torch.float64)
    grid = torch.randint(0, 1000, (1, tiles, 2), generator=g)
    with torch.no_grad():
        out = m(feats, grid)
        ref = reference_forward(m, feats, grid, zero_padded_keys=True)
        masked = reference_forward(m, feats, grid, zero_padded_keys=False)
    torch.testing.assert_close(out, ref, rtol=1e-10, atol=1e-10)
    assert (out - masked).abs().max() > 1e-4  # the padding changes the embedding


def test_no_padding_no_difference(tiny_file):
    m = tiny(tiny_file[0], segment_lengths=[8, 16, 32, 64, 64]).double()
    exact = tiny(tiny_file[0], segment_lengths=[8, 16, 32, 64, 64], zero_padded_keys=False)
    exact = exact.double()
    feats = torch.randn(1, 63, 24, dtype=torch.float64)  # 64 tokens: every segment whole
    grid = torch.randint(0, 1000, (1, 63, 2))
    with torch.no_grad():
        torch.testing.assert_close(m(feats, grid), exact(feats, grid), rtol=1e-12, atol=1e-12)


def test_layer_states_are_before_the_encoder_norm(tiny_file):
    m = tiny(tiny_file[0])
    feats, grid = torch.randn(1, 30, 24), torch.randint(0, 1000, (1, 30, 2))
    with torch.no_grad():
        tokens = m.embed(feats, grid)[0]
        final, states = m.forward_intermediates(feats, tile_grid=grid, output_fmt="NLC")
        layer_embeds = [m.fc_norm(s.mean(1)) for s in [tokens, *states]]
        assert len(layer_embeds) == 1 + TINY["depth"]
        torch.testing.assert_close(final[:, 1:], m.norm(states[-1]))
        torch.testing.assert_close(m.fc_norm(m.norm(states[-1]).mean(1)), m(feats, grid))


# ------------------------------------------------- opt-in: their code itself
def _their_code():
    folder = os.environ.get("LONGVIT_GIGAPATH_CODE")
    if not folder:
        pytest.skip("set LONGVIT_GIGAPATH_CODE to a folder with Prov-GigaPath's gigapath/")
    sys.path.insert(0, folder)
    try:
        module = importlib.import_module("gigapath.slide_encoder")
    except ImportError as error:
        pytest.skip(f"their gigapath package does not import from {folder}: {error}")
    attention = sys.modules["torchscale.component.multihead_attention"]
    if attention.flash_attn_func is None:  # on CPU their module sets it to None
        attention.flash_attn_func = _plain_flash_attn_func
    return module


def _plain_flash_attn_func(q, k, v, dropout=0.0, bias=None, softmax_scale=None, is_causal=False):
    """Their flash_attn_func wrapper's contract in plain float64 math: (b, l, h, d) in,
    (out (b, l, h, d), lse (b, h, l) float32) out, no mask."""
    assert bias is None and not is_causal and dropout == 0.0
    scale = softmax_scale or 1.0 / math.sqrt(q.shape[-1])
    s = torch.einsum("blhd,bmhd->bhlm", q.double(), k.double()) * scale
    lse = torch.logsumexp(s, dim=-1)
    out = torch.einsum("bhlm,bmhd->blhd", torch.exp(s - lse[..., None]), v.double())
    return out.to(q.dtype), lse.float()


def test_their_encoder_gives_the_same_embedding(tmp_path):
    gse = _their_code()
    torch.manual_seed(0)
    theirs = gse.gigapath_slide_enc12l768d(in_chans=1536, global_pool=True).eval()
    with torch.no_grad():
        for name, p in theirs.named_parameters():
            if name.endswith(".weight") and p.dim() == 1:
                p.add_(0.2 * torch.randn_like(p))
            elif name.endswith(".bias"):
                p.add_(0.02 * torch.randn_like(p))
    file = tmp_path / "slide_encoder.pth"
    torch.save({"model": theirs.state_dict()}, file)
    ours = timm.create_model(
        NAME, pretrained=True, pretrained_cfg_overlay=dict(file=str(file)), num_classes=0
    ).eval()
    n = 1100  # 1101 tokens: a partial 1024-segment and every whole-sequence branch padded
    g = torch.Generator().manual_seed(n)
    feats = torch.randn(1, n, 1536, generator=g)
    cells = torch.randperm(1000 * 1000, generator=g)[:n]
    grid = torch.stack([cells // 1000, cells % 1000], -1)[None]
    with torch.no_grad():
        ref = theirs(feats, grid.float() * 256)[0]
        torch.testing.assert_close(ours(feats, grid), ref, rtol=1e-5, atol=2e-5)
        their_layers = theirs(feats, grid.float() * 256, all_layer_embed=True)
        tokens = ours.embed(feats, grid)[0]
        _, states = ours.forward_intermediates(feats, tile_grid=grid, output_fmt="NLC")
        our_layers = [ours.fc_norm(s.mean(1)) for s in [tokens, *states]]
    assert len(their_layers) == len(our_layers) == 13
    for a, b in zip(our_layers, their_layers):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=2e-5)
