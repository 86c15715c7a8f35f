"""Tile encoder presets: the public pathology encoders timm can build, one record each.

``longvit extract --encoder NAME --weights FILE`` reads everything else from here: the timm
architecture and its keyword arguments, the preprocessing, how the tokens are pooled into one
embedding, the tile size and resolution to tile at, and which file to download from where.

Every value below is taken from the authors' model card, README or loading code (named in each
record's comment); a value nobody published is said to be ours. Layer classes appear by name
(``"mlp_layer": "SwiGLUPacked"``) so that the arguments are JSON and go into the feature files'
attributes as they are; ``timm_kwargs()`` turns the names into the classes.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from longvit.extract.model import Preprocessing, TileEncoderError

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
# H-optimus-0's own normalisation (bioptimus/releases, models/h-optimus/v0/README.md)
BIOPTIMUS_MEAN = (0.707223, 0.578729, 0.703617)
BIOPTIMUS_STD = (0.211883, 0.230117, 0.177517)

POOLINGS = ("cls", "cls+mean")
# key layouts a published file may have (longvit.extract.layouts maps each to timm's names)
LAYOUTS = ("timm", "hf-vit")


@dataclass(frozen=True)
class PublishedWeights:
    """The file to download. file: its name in the repository; repo: the Hugging Face model
    repository it lives in (most ask you to accept their terms before downloading); layout:
    the key layout of the file ("timm": the timm model's own names; "hf-vit": Hugging Face
    transformers' ViTModel); also: other names the same weights are published under."""

    file: str
    repo: str
    layout: str = "timm"
    also: tuple[str, ...] = ()

    @property
    def url(self) -> str:
        return f"https://huggingface.co/{self.repo}"

    def describe(self) -> str:
        """``pytorch_model.bin from https://huggingface.co/org/repo``."""
        return f"{self.file} from {self.url}"


@dataclass(frozen=True)
class TileEncoderPreset:
    """One published tile encoder.

    name: what ``--encoder`` takes. title: the encoder's published name. architecture: the timm
    model name; model_kwargs: its ``timm.create_model`` arguments (JSON; layer classes by name).
    preprocessing: the authors' evaluation transform. pooling: "cls" (the class token after the
    final norm) or "cls+mean" (the class token concatenated with the mean of the patch tokens,
    register tokens excluded). feature_dim: the output width. tile_size: tile side in pixels at
    mpp microns per pixel, what to run ``longvit tile`` with. weights: the file to download.
    notes: what a user should know (training magnifications, our own choices).
    """

    name: str
    title: str
    architecture: str
    model_kwargs: dict
    preprocessing: Preprocessing
    pooling: str
    feature_dim: int
    tile_size: int
    mpp: float
    weights: PublishedWeights
    notes: str = ""
    aliases: tuple[str, ...] = field(default=())

    def timm_kwargs(self, overrides: dict | None = None) -> dict:
        """``timm.create_model`` arguments with the layer names resolved to classes
        (``overrides``: e.g. a smaller depth for tests, or a larger img_size)."""
        kwargs = {**self.model_kwargs, **(overrides or {})}
        for key in ("mlp_layer", "act_layer"):
            if isinstance(kwargs.get(key), str):
                kwargs[key] = _layer(kwargs[key])
        return kwargs


def _layer(name: str):
    import timm.layers
    import torch.nn

    table = {"SwiGLUPacked": timm.layers.SwiGLUPacked, "SiLU": torch.nn.SiLU}
    if name not in table:
        raise TileEncoderError(f"unknown layer {name!r} in a preset; known: {sorted(table)}")
    return table[name]


def _preprocessing(interpolation: str, crop_pct: float, mean=IMAGENET_MEAN, std=IMAGENET_STD):
    return Preprocessing(
        input_size=(3, 224, 224), interpolation=interpolation, mean=tuple(mean), std=tuple(std),
        crop_pct=crop_pct, crop_mode="center",
    )  # fmt: skip


_SWIGLU = {"mlp_layer": "SwiGLUPacked", "act_layer": "SiLU"}

PRESETS: tuple[TileEncoderPreset, ...] = (
    # Prov-GigaPath's tile encoder. Architecture: the model's config.json on the Hub, as the
    # Prov-GigaPath README's timm.create_model("hf_hub:prov-gigapath/prov-gigapath") builds it:
    # vit_giant_patch14_dinov2 with patch_size 16 (so 14 x 14 patches at 224 px, not 16 x 16),
    # SwiGLU and LayerScale from the architecture. Transform (README): Resize(256, bicubic),
    # CenterCrop(224), ImageNet mean/std. Tiles: 256 px at 0.5 um/px (the paper's tiling).
    TileEncoderPreset(
        name="gigapath",
        title="Prov-GigaPath tile encoder",
        architecture="vit_giant_patch14_dinov2",
        model_kwargs={
            "img_size": 224,
            "in_chans": 3,
            "patch_size": 16,
            "embed_dim": 1536,
            "depth": 40,
            "num_heads": 24,
            "init_values": 1e-5,
            "mlp_ratio": 5.33334,
        },  # fmt: skip
        preprocessing=_preprocessing("bicubic", 224 / 256),
        pooling="cls",
        feature_dim=1536,
        tile_size=256,
        mpp=0.5,
        weights=PublishedWeights("pytorch_model.bin", "prov-gigapath/prov-gigapath"),
        notes="ViT-g with 16-px patches, 1.13B parameters",
        aliases=("prov-gigapath",),
    ),
    # UNI (MahmoodLab/UNI README, local-checkpoint recipe): vit_large_patch16_224, img_size 224,
    # patch_size 16, init_values 1e-5, dynamic_img_size; transform Resize(224) (torchvision's
    # default, bilinear) without a crop, ImageNet mean/std; output [1, 1024]. Tile size and mpp:
    # not in the README; 256 px at 20x is TRIDENT's setting for UNI (same lab).
    TileEncoderPreset(
        name="uni",
        title="UNI",
        architecture="vit_large_patch16_224",
        model_kwargs={
            "img_size": 224,
            "patch_size": 16,
            "init_values": 1e-5,
            "dynamic_img_size": True,
        },  # fmt: skip
        preprocessing=_preprocessing("bilinear", 1.0),
        pooling="cls",
        feature_dim=1024,
        tile_size=256,
        mpp=0.5,
        weights=PublishedWeights("pytorch_model.bin", "MahmoodLab/UNI"),
        notes="ViT-L/16; tile size and mpp are TRIDENT's, the model card states none",
        aliases=("uni-v1", "uni_v1"),
    ),
    # UNI2-h (MahmoodLab/UNI README, local-checkpoint recipe): model_name vit_giant_patch14_224
    # with every size given (the same network as vit_huge_patch14_224 with these arguments),
    # transform Resize(224) + CenterCrop(224) (bilinear), ImageNet mean/std; output [1, 1536].
    TileEncoderPreset(
        name="uni2-h",
        title="UNI2-h",
        architecture="vit_giant_patch14_224",
        model_kwargs={
            "img_size": 224,
            "patch_size": 14,
            "depth": 24,
            "num_heads": 24,
            "init_values": 1e-5,
            "embed_dim": 1536,
            "mlp_ratio": 2.66667 * 2,
            "no_embed_class": True,
            **_SWIGLU,
            "reg_tokens": 8,
            "dynamic_img_size": True,
        },  # fmt: skip
        preprocessing=_preprocessing("bilinear", 1.0),
        pooling="cls",
        feature_dim=1536,
        tile_size=256,
        mpp=0.5,
        weights=PublishedWeights("pytorch_model.bin", "MahmoodLab/UNI2-h"),
        notes="ViT-H/14 with 8 registers; tile size and mpp are TRIDENT's",
        aliases=("uni2", "uni-v2", "uni_v2"),
    ),
    # Virchow (paige-ai/Virchow model card and config.json): vit_huge_patch14_224, img_size 224,
    # init_values 1e-5, mlp_ratio 5.3375, SwiGLUPacked + SiLU, dynamic_img_size; preprocessing
    # from its pretrained_cfg (bicubic, crop_pct 1.0, ImageNet mean/std); embedding = class token
    # concatenated with the mean of the patch tokens (2 x 1280). Input 224 x 224; tiles of
    # 224 px at 20x are TRIDENT's setting.
    TileEncoderPreset(
        name="virchow",
        title="Virchow",
        architecture="vit_huge_patch14_224",
        model_kwargs={
            "img_size": 224,
            "init_values": 1e-5,
            "mlp_ratio": 5.3375,
            "dynamic_img_size": True,
            **_SWIGLU,
        },  # fmt: skip
        preprocessing=_preprocessing("bicubic", 1.0),
        pooling="cls+mean",
        feature_dim=2560,
        tile_size=224,
        mpp=0.5,
        weights=PublishedWeights(
            "pytorch_model.bin", "paige-ai/Virchow", also=("model.safetensors",)
        ),  # fmt: skip
        notes="ViT-H/14; class token + mean patch token",
    ),
    # Virchow2 (paige-ai/Virchow2 model card and config.json): as Virchow with 4 register
    # tokens; the model card's embedding is cat(output[:, 0], output[:, 5:].mean(1)), the
    # registers (tokens 1-4) left out. Trained on tiles from 5x, 10x, 20x and 40x (the paper);
    # 224 px at 0.5 um/px is our default.
    TileEncoderPreset(
        name="virchow2",
        title="Virchow2",
        architecture="vit_huge_patch14_224",
        model_kwargs={
            "img_size": 224,
            "init_values": 1e-5,
            "reg_tokens": 4,
            "mlp_ratio": 5.3375,
            "dynamic_img_size": True,
            **_SWIGLU,
        },  # fmt: skip
        preprocessing=_preprocessing("bicubic", 1.0),
        pooling="cls+mean",
        feature_dim=2560,
        tile_size=224,
        mpp=0.5,
        weights=PublishedWeights(
            "pytorch_model.bin", "paige-ai/Virchow2", also=("model.safetensors",)
        ),  # fmt: skip
        notes="ViT-H/14 with 4 registers, trained at 5x-40x; class token + mean patch token",
    ),
    # H-optimus-0 (bioptimus/releases README: ViT-g/14, 4 registers, 40 blocks, 24 heads,
    # 1536-d, GluMlp(SiLU, gate_last=False) at mlp_ratio 5.33334, no_embed_class: timm's
    # vit_giant_patch14_reg4_dinov2, as the Hub card creates it with img_size 224,
    # init_values 1e-5, dynamic_img_size False). "expects images of size 224x224, extracted
    # at 0.5 microns per pixel"; transform ToTensor + Normalize(its own mean/std), no resize
    # (bicubic, our choice, for other tile sizes).
    TileEncoderPreset(
        name="h-optimus-0",
        title="H-optimus-0",
        architecture="vit_giant_patch14_reg4_dinov2",
        model_kwargs={"img_size": 224, "init_values": 1e-5, "dynamic_img_size": False},
        preprocessing=_preprocessing("bicubic", 1.0, BIOPTIMUS_MEAN, BIOPTIMUS_STD),
        pooling="cls",
        feature_dim=1536,
        tile_size=224,
        mpp=0.5,
        weights=PublishedWeights(
            "pytorch_model.bin", "bioptimus/H-optimus-0", also=("checkpoint.pth",)
        ),  # the README's own download
        notes="ViT-g/14 with 4 registers, 1.1B parameters; its own mean/std",
        aliases=("hoptimus0", "h-optimus"),
    ),
    # H-optimus-1: the same architecture and normalisation as H-optimus-0, pytorch_model.bin in
    # bioptimus/H-optimus-1 (TRIDENT's loader; not checked against Bioptimus' own card).
    TileEncoderPreset(
        name="h-optimus-1",
        title="H-optimus-1",
        architecture="vit_giant_patch14_reg4_dinov2",
        model_kwargs={"img_size": 224, "init_values": 1e-5, "dynamic_img_size": False},
        preprocessing=_preprocessing("bicubic", 1.0, BIOPTIMUS_MEAN, BIOPTIMUS_STD),
        pooling="cls",
        feature_dim=1536,
        tile_size=224,
        mpp=0.5,
        weights=PublishedWeights("pytorch_model.bin", "bioptimus/H-optimus-1"),
        notes="as H-optimus-0 (settings from TRIDENT's loader)",
        aliases=("hoptimus1",),
    ),
    # Phikon (owkin/phikon): a transformers ViTModel (config.json: ViT-B/16, 768-d, 12 layers,
    # 12 heads, 224 px, qkv bias), i.e. timm's vit_base_patch16_224 under other key names; the
    # embedding is last_hidden_state[:, 0] (TRIDENT's Phikon encoder). LayerNorm eps: timm's
    # 1e-6 (the repository's config says 1e-12; a change to 1e-6 "to match timm" was proposed
    # there; with random weights the two give features within 1e-6).
    # Preprocessing: resize to 224, ImageNet mean/std; bilinear is TRIDENT's choice.
    TileEncoderPreset(
        name="phikon",
        title="Phikon",
        architecture="vit_base_patch16_224",
        model_kwargs={"img_size": 224},
        preprocessing=_preprocessing("bilinear", 1.0),
        pooling="cls",
        feature_dim=768,
        tile_size=224,
        mpp=0.5,
        weights=PublishedWeights(
            "pytorch_model.bin", "owkin/phikon", layout="hf-vit", also=("model.safetensors",)
        ),  # fmt: skip
        notes="ViT-B/16 (iBOT) in transformers' ViTModel layout",
    ),
)

TILE_ENCODER_PRESETS: dict[str, TileEncoderPreset] = {p.name: p for p in PRESETS}


def _key(name: str) -> str:
    return name.strip().lower().replace("_", "-")


_LOOKUP = {_key(alias): p for p in PRESETS for alias in (p.name, *p.aliases)}


def get_preset(name: str) -> TileEncoderPreset:
    """The preset called ``name`` (case and ``_``/``-`` do not matter; aliases such as
    "prov-gigapath" work). Unknown names are a ``TileEncoderError`` listing the known ones."""
    preset = _LOOKUP.get(_key(name))
    if preset is None:
        known = ", ".join(TILE_ENCODER_PRESETS)
        raise TileEncoderError(
            f"no tile encoder preset named {name!r}; known: {known} "
            "(`longvit extract --encoder list` shows them)"
        )
    return preset


def format_presets() -> str:
    """The presets as a table: name, output width, tile size, mpp, pooling, file to download."""
    rows = [("encoder", "width", "tile", "mpp", "pooling", "file", "from")]
    for p in PRESETS:
        rows.append((p.name, str(p.feature_dim), f"{p.tile_size} px", f"{p.mpp:g}", p.pooling,
                     p.weights.file, p.weights.url))  # fmt: skip
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]) - 1)]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r[:-1], widths)) + "  " + r[-1] for r in rows]
    usage = (
        "\nTile at the listed size and mpp (`longvit tile --tile-size N --target-mpp M`), then:\n"
        "  longvit extract --encoder NAME --weights FILE --tiles DIR --out DIR"
    )
    return "\n".join(lines) + "\n" + usage
