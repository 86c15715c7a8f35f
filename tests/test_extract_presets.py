"""Tile encoder presets: published architectures at full size (meta device), weights in each
published key layout loaded tensor for tensor, pooling and preprocessing as the model cards do
them, errors that name the file to download, and ``longvit extract --encoder`` end to end."""

from __future__ import annotations

import os

os.environ["HF_HUB_OFFLINE"] = "1"  # before timm: nothing may reach a hub

import numpy as np
import pytest
import safetensors.torch
import timm
import torch
from PIL import Image
from torchvision import transforms

from longvit.cli import main as longvit_main
from longvit.extract import (
    TILE_ENCODER_PRESETS,
    TileEncoderError,
    WeightsFileError,
    build_preset_encoder,
    get_preset,
    read_features_h5,
)
from longvit.extract.layouts import LAYOUT_TO_TIMM
from longvit.extract.pooling import TokenPooling

NAMES = list(TILE_ENCODER_PRESETS)
TINY = {"depth": 2, "embed_dim": 48, "num_heads": 2}  # every preset's family, shrunk
IMAGENET = ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
BIOPTIMUS = ((0.707223, 0.578729, 0.703617), (0.211883, 0.230117, 0.177517))
BICUBIC, BILINEAR = transforms.InterpolationMode.BICUBIC, transforms.InterpolationMode.BILINEAR

# What the model cards publish, written out here independently of the presets module:
# embedding width, blocks, patch size, register tokens, tokens per 224-px image, output width,
# parameters in millions (None where no card states a count).
PUBLISHED = {
    "gigapath": dict(embed=1536, depth=40, patch=16, reg=0, tokens=197, width=1536, params=1130),
    "uni": dict(embed=1024, depth=24, patch=16, reg=0, tokens=197, width=1024, params=None),
    "uni2-h": dict(embed=1536, depth=24, patch=14, reg=8, tokens=265, width=1536, params=None),
    "virchow": dict(embed=1280, depth=32, patch=14, reg=0, tokens=257, width=2560, params=632),
    "virchow2": dict(embed=1280, depth=32, patch=14, reg=4, tokens=261, width=2560, params=632),
    "h-optimus-0": dict(embed=1536, depth=40, patch=14, reg=4, tokens=261, width=1536, params=1130),
    "h-optimus-1": dict(embed=1536, depth=40, patch=14, reg=4, tokens=261, width=1536, params=1130),
    "phikon": dict(embed=768, depth=12, patch=16, reg=0, tokens=197, width=768, params=85.8),
}

# Each model card's evaluation transform, as torchvision code (the authors' own form).
MODEL_CARD_TRANSFORMS = {
    "gigapath": [transforms.Resize(256, BICUBIC), transforms.CenterCrop(224)],
    "uni": [transforms.Resize(224)],
    "uni2-h": [transforms.Resize(224), transforms.CenterCrop(224)],
    "virchow": [transforms.Resize(224, BICUBIC), transforms.CenterCrop(224)],
    "virchow2": [transforms.Resize(224, BICUBIC), transforms.CenterCrop(224)],
    "h-optimus-0": [],
    "h-optimus-1": [],
    "phikon": [transforms.Resize(224, BILINEAR)],
}
NORMALISATION = {"h-optimus-0": BIOPTIMUS, "h-optimus-1": BIOPTIMUS}
RESIZED = {"uni", "uni2-h"}  # their 256-px tiles are resized to 224; the others' are not

# Virchow's and Virchow2's model cards: the patch tokens start after the class token and, for
# Virchow2, the 4 register tokens (output[:, 1:] and output[:, 5:]).
FIRST_PATCH_TOKEN = {"virchow": 1, "virchow2": 5}


def to_published(state: dict, layout: str) -> dict:
    """timm names -> the names a published file uses (the inverse of what the loader does),
    written from transformers' ViTModel naming for "hf-vit"."""
    if layout == "timm":
        return dict(state)
    out = {}
    for key, value in state.items():
        parts = key.split(".")
        if key == "cls_token":
            out["embeddings.cls_token"] = value
        elif key == "pos_embed":
            out["embeddings.position_embeddings"] = value
        elif key.startswith("patch_embed.proj."):
            out["embeddings.patch_embeddings.projection." + parts[-1]] = value
        elif key.startswith("norm."):
            out["layernorm." + parts[-1]] = value
        elif parts[0] == "blocks":
            i, module, kind = parts[1], ".".join(parts[2:-1]), parts[-1]
            prefix = f"encoder.layer.{i}."
            if module == "attn.qkv":
                for name, piece in zip(("query", "key", "value"), value.chunk(3, dim=0)):
                    out[f"{prefix}attention.attention.{name}.{kind}"] = piece
            else:
                hf = {"norm1": "layernorm_before", "norm2": "layernorm_after",
                      "attn.proj": "attention.output.dense", "mlp.fc1": "intermediate.dense",
                      "mlp.fc2": "output.dense"}[module]  # fmt: skip
                out[f"{prefix}{hf}.{kind}"] = value
        else:
            raise AssertionError(f"unexpected timm key {key}")
    d = state["cls_token"].shape[-1]  # ViTModel's pooler: saved, not part of the embedding
    out["pooler.dense.weight"], out["pooler.dense.bias"] = torch.zeros(d, d), torch.zeros(d)
    return out


def vit(name: str, overrides: dict | None = None, **extra) -> torch.nn.Module:
    preset = get_preset(name)
    kwargs = {**preset.timm_kwargs(overrides), **extra}
    return timm.create_model(preset.architecture, pretrained=False, num_classes=0, **kwargs)


def randomised(model: torch.nn.Module, seed: int) -> dict:
    """Random weights of O(1) effect everywhere (LayerScale's 1e-5 init would hide the blocks)."""
    g = torch.Generator().manual_seed(seed)
    state = {}
    for key, value in model.state_dict().items():
        noise = torch.randn(value.shape, generator=g)
        if key.endswith(".gamma"):
            state[key] = 0.5 * noise
        elif "norm" in key and key.endswith("weight"):
            state[key] = 1 + 0.1 * noise
        else:
            state[key] = 0.05 * noise
    return state


def save_published(state: dict, name: str, folder) -> str:
    weights = get_preset(name).weights
    published = to_published(state, weights.layout)
    path = folder / weights.file
    if path.suffix == ".safetensors":
        safetensors.torch.save_file(published, path)
    else:
        torch.save(published, path)
    return path


def smooth_tiles(n: int, size: int, seed: int = 0) -> torch.Tensor:
    """(n, size, size, 3) uint8 tiles of smooth colour waves (resamplers agree on them)."""
    g = np.random.default_rng(seed)
    y, x = np.mgrid[0:size, 0:size].astype(np.float32)
    tiles = []
    for _ in range(n):
        f = g.uniform(0.02, 0.08, size=(3, 2))
        phase = g.uniform(0, 6.3, size=3)
        channels = [127 + 90 * np.sin(f[c, 0] * x + f[c, 1] * y + phase[c]) for c in range(3)]
        tiles.append(np.stack(channels, -1).round().clip(0, 255).astype(np.uint8))
    return torch.from_numpy(np.stack(tiles))


@pytest.mark.parametrize("name", NAMES)
def test_full_size_architecture_and_key_layout(name):
    """At full size, on the meta device: the published widths, depth, patch, registers, tokens
    and parameter count; and a file in the published layout maps onto every tensor, shape for
    shape."""
    facts, preset = PUBLISHED[name], get_preset(name)
    with torch.device("meta"):
        model = vit(name)
    state = model.state_dict()
    assert model.embed_dim == facts["embed"] and len(model.blocks) == facts["depth"]
    assert tuple(state["patch_embed.proj.weight"].shape) == (facts["embed"], 3, facts["patch"],
                                                             facts["patch"])  # fmt: skip
    assert model.num_reg_tokens == facts["reg"]
    assert ("reg_token" in state) == (facts["reg"] > 0)
    assert model.num_prefix_tokens + model.patch_embed.num_patches == facts["tokens"]
    assert TokenPooling(model, preset.pooling).num_features == facts["width"] == preset.feature_dim
    if facts["params"]:
        params = sum(v.numel() for v in state.values()) / 1e6
        assert abs(params - facts["params"]) / facts["params"] < 0.01, params
    mapped = LAYOUT_TO_TIMM[preset.weights.layout](to_published(state, preset.weights.layout))
    assert sorted(mapped) == sorted(state)
    assert all(mapped[k].shape == state[k].shape for k in state)
    assert preset.tile_size in (224, 256) and preset.mpp == 0.5
    assert preset.weights.url.startswith("https://huggingface.co/")


@pytest.mark.parametrize("name", NAMES)
def test_published_weights_load_pool_and_preprocess(name, tmp_path):
    """Random weights saved in the preset's published layout load into every tensor; the
    features equal the model card's recipe (its transform on PIL tiles, then the timm model and
    its pooling), computed here without longvit."""
    preset = get_preset(name)
    state = randomised(vit(name, TINY), seed=NAMES.index(name))
    path = save_published(state, name, tmp_path)
    encoder = build_preset_encoder(name, path, model_kwargs=TINY)
    loaded = encoder.model.vit.state_dict()
    assert sorted(loaded) == sorted(state)
    assert all(torch.equal(loaded[k], state[k]) for k in state)  # every tensor, none left random
    assert encoder.weights_sha256 != "random-init" and encoder.encoder_name == preset.name

    # the model card's recipe: PIL tiles -> its transform -> the timm model -> its pooling
    mean, std = NORMALISATION.get(name, IMAGENET)
    card = transforms.Compose([*MODEL_CARD_TRANSFORMS[name], transforms.ToTensor(),
                               transforms.Normalize(mean, std)])  # fmt: skip
    tiles = smooth_tiles(3, preset.tile_size, seed=1)
    x_card = torch.stack([card(Image.fromarray(t.numpy())) for t in tiles])
    if name in FIRST_PATCH_TOKEN:  # the card's model returns every token (global_pool="")
        reference = vit(name, TINY, global_pool="").eval()
        reference.load_state_dict(state)
        with torch.no_grad():
            tokens = reference(x_card)
        want = torch.cat([tokens[:, 0], tokens[:, FIRST_PATCH_TOKEN[name] :].mean(1)], dim=-1)
        assert want.shape[1] == 2 * TINY["embed_dim"]
    else:  # the class token (timm's global_pool="token")
        reference = vit(name, TINY).eval()
        reference.load_state_dict(state)
        with torch.no_grad():
            want = reference(x_card)
        assert want.shape[1] == TINY["embed_dim"]
    with torch.no_grad():
        x_ours = encoder.preprocess(tiles)
        got = encoder(tiles)
    assert x_ours.shape == x_card.shape == (3, 3, 224, 224)
    # PIL and antialiased tensor resampling differ by round-off of single pixel values
    resized = name in RESIZED
    pixel = 1 / 255 / min(std)
    assert (x_ours - x_card).abs().max() <= (3 * pixel if resized else 1e-5)
    assert got.shape == want.shape == (3, encoder.feature_dim)
    tol = (2e-2 if resized else 1e-4) * want.abs().max()
    torch.testing.assert_close(got, want, rtol=0, atol=tol)


def test_phikon_saved_by_transformers_5_loads(tmp_path):
    """transformers 5 names ViTModel's blocks layers.N.attention.q_proj/.../o_proj, mlp.fc1/2
    (as its state_dict() shows); such a file loads the same tensors as the published one."""
    renames = (("encoder.layer.", "layers."), ("attention.attention.query", "attention.q_proj"),
               ("attention.attention.key", "attention.k_proj"),
               ("attention.attention.value", "attention.v_proj"),
               ("attention.output.dense", "attention.o_proj"),
               ("intermediate.dense", "mlp.fc1"), ("output.dense", "mlp.fc2"))  # fmt: skip
    state = randomised(vit("phikon", TINY), seed=11)
    v5 = {}
    for key, value in to_published(state, "hf-vit").items():
        for old, new in renames:
            key = key.replace(old, new)
        v5[key] = value
    assert "layers.1.attention.q_proj.weight" in v5 and "layers.0.mlp.fc2.bias" in v5
    torch.save(v5, tmp_path / "pytorch_model.bin")
    loaded = build_preset_encoder("phikon", tmp_path, model_kwargs=TINY).model.vit.state_dict()
    assert sorted(loaded) == sorted(state)
    assert all(torch.equal(loaded[k], state[k]) for k in state)


def test_prefixed_checkpoint_and_snapshot_folder_load(tmp_path):
    """A training checkpoint ({"state_dict": {"model.<key>": ...}}) and a folder holding the
    published file (a Hugging Face snapshot) load the same tensors."""
    state = randomised(vit("uni2-h", TINY), seed=7)
    lightning = tmp_path / "finetuned.ckpt"
    torch.save({"state_dict": {f"model.{k}": v for k, v in state.items()}, "epoch": 3}, lightning)
    snapshot = tmp_path / "UNI2-h"
    snapshot.mkdir()
    save_published(state, "uni2-h", snapshot)
    for weights in (lightning, snapshot):
        loaded = build_preset_encoder("uni2-h", weights, model_kwargs=TINY).model.vit.state_dict()
        assert all(torch.equal(loaded[k], state[k]) for k in state)


def test_wrong_missing_and_junk_weights_name_the_file_to_download(tmp_path):
    with pytest.raises(TileEncoderError, match=r"pytorch_model\.bin from "
                       r"https://huggingface\.co/paige-ai/Virchow2"):  # fmt: skip
        build_preset_encoder("virchow2")
    junk = tmp_path / "pytorch_model.bin"
    junk.write_bytes(b"<html>Access to this model is restricted</html>")
    with pytest.raises(WeightsFileError, match="cannot be read as model weights") as err:
        build_preset_encoder("gigapath", junk, model_kwargs=TINY)
    assert str(junk) in str(err.value) and "prov-gigapath/prov-gigapath" in str(err.value)
    with pytest.raises(WeightsFileError, match="no such weights file"):
        build_preset_encoder("uni", tmp_path / "nothing.bin", model_kwargs=TINY)
    # Virchow's weights for Virchow2: the register tokens are missing
    virchow = save_published(randomised(vit("virchow", TINY), 0), "virchow", tmp_path)
    with pytest.raises(WeightsFileError, match=r"1 of the model's \d+ tensors are missing "
                       r"\(reg_token\).*paige-ai/Virchow2") as err:  # fmt: skip
        build_preset_encoder("virchow2", virchow, model_kwargs=TINY)
    assert "not Virchow2's weights" in str(err.value)
    # UNI's (GELU MLP) for Prov-GigaPath (SwiGLU): the MLP shapes differ
    (tmp_path / "uni").mkdir()
    uni = save_published(randomised(vit("uni", TINY), 0), "uni", tmp_path / "uni")
    with pytest.raises(WeightsFileError, match=r"blocks\.0\.mlp\.fc1\.weight is \(192, 48\) in "
                       r"the file, \(256, 48\) in Prov-GigaPath"):  # fmt: skip
        build_preset_encoder("gigapath", uni, model_kwargs=TINY)
    with pytest.raises(TileEncoderError, match="no tile encoder preset named 'conch'"):
        build_preset_encoder("conch", random_init=True)


def test_presets_by_any_spelling():
    assert get_preset("Prov-GigaPath") is get_preset("gigapath")
    assert get_preset("UNI2_h") is get_preset("uni2-h") and get_preset("hoptimus0").name == (
        "h-optimus-0"
    )


def test_cli_lists_presets_and_needs_weights(capsys):
    for argv in (["extract", "--encoder"], ["extract", "--encoder", "list"]):
        assert longvit_main(argv) == 0
        listing = capsys.readouterr().out
        for preset in TILE_ENCODER_PRESETS.values():
            row = next(line for line in listing.splitlines() if line.startswith(preset.name + " "))
            assert str(preset.feature_dim) in row and f"{preset.tile_size} px" in row
            assert preset.weights.url in row and preset.weights.file in row
    code = longvit_main(["extract", "--encoder", "gigapath", "--tiles", "t", "--out", "o"])
    assert code == 2
    message = capsys.readouterr().err
    assert "pytorch_model.bin" in message
    assert "https://huggingface.co/prov-gigapath/prov-gigapath" in message


def test_cli_extracts_with_a_preset(tmp_path, capsys):
    """`longvit extract --encoder virchow2 --weights FILE` on a tiled synthetic slide: features
    of the preset's width (class token + mean patch token) in the HDF5 file."""
    from slide_factory import write_slide

    from longvit.slides import TileSettings, tile_slide

    write_slide(tmp_path / "s.tif", 448, 448, mpp=0.5, mpp_style="tiff", compression="zlib",
                levels=(1, 4))  # fmt: skip
    settings = TileSettings(target_mpp=0.5, tile_size=224, detect_tissue=False, thumbnail_size=128)
    assert tile_slide(tmp_path / "s.tif", tmp_path / "tiles", settings).status == "done"
    small = {"depth": 1, "embed_dim": 32, "num_heads": 2}
    weights = save_published(randomised(vit("virchow2", small), 3), "virchow2", tmp_path)
    out = tmp_path / "features"
    code = longvit_main(["extract", "--encoder", "virchow2", "--weights", str(weights),
                         "--model-kwargs", '{"depth": 1, "embed_dim": 32, "num_heads": 2}',
                         "--tiles", str(tmp_path / "tiles"), "--out", str(out),
                         "--batch-size", "3", "--workers", "0", "--accelerator", "cpu",
                         "--no-progress"])  # fmt: skip
    assert code == 0 and "1 done" in capsys.readouterr().out
    got = read_features_h5(out / "s.h5")
    assert got.features.shape == (4, 64) and np.isfinite(got.features).all()
    attrs = got.features_attrs
    assert attrs["encoder"] == "virchow2" and attrs["pooling"] == "cls+mean"
    assert attrs["model"] == "vit_huge_patch14_224" and attrs["feature_dim"] == 64
    assert list(attrs["preprocessing_mean"]) == pytest.approx(IMAGENET[0])
    # the same tiles through the same encoder, called directly
    from longvit.slides import Slide

    encoder = build_preset_encoder("virchow2", weights, model_kwargs=small)
    with Slide(tmp_path / "s.tif") as slide:
        tiles = np.stack([slide.read_region_at_mpp((int(x), int(y)), (224, 224), 0.5)
                          for x, y in got.coords])  # fmt: skip
    with torch.no_grad():
        want = encoder(torch.from_numpy(tiles)).numpy()
    np.testing.assert_allclose(got.features, want, rtol=1e-4, atol=1e-4)
