"""The tile encoder: any timm model, its own preprocessing, weights from a local file.

``build_tile_encoder("vit_base_patch16_224", weights="vit_b.safetensors")`` creates the model
with timm (``num_classes=0``: the output is the pooled pre-logits embedding), reads the weights
file without running code from it (``longvit.weights_file``: safetensors, or torch.load with
weights_only=True), hands them to timm's pretrained loading (``pretrained_cfg_overlay``, so
the model's own checkpoint filter adapts foreign layouts) and resolves the preprocessing from
the model's pretrained_cfg with ``timm.data.resolve_data_config``. Nothing is fetched from a
hub: names that point at a hub (``hf-hub:...``) are refused, and without ``weights`` the caller
must ask for random weights explicitly.

The encoder takes raw tiles, ``(B, H, W, 3)`` uint8 RGB, and does timm's evaluation transform on
the device it runs on (resize the tile to ``floor(input_size / crop_pct)``, centre crop
``input_size``, scale to [0, 1], normalise by mean/std): the DataLoader then moves 4x fewer
bytes and the CPU workers only decode.
"""

from __future__ import annotations

import contextlib
import copy
import hashlib
import importlib
import json
import logging
import math
import os
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from longvit.extract.fused_preprocess import fused_resize_normalize
from longvit.weights_file import WeightsFileError, forget_loaded_weights, weights_overlay

PRECISIONS = ("bf16", "fp16", "fp32", "bf16-true")
_AUTOCAST_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}
_TRUE_DTYPES = {"bf16-true": torch.bfloat16}  # weights and activations in this dtype
_INTERPOLATIONS = {"bicubic": "bicubic", "bilinear": "bilinear", "nearest": "nearest"}


class TileEncoderError(ValueError):
    """The model or its weights cannot be used; the message names the model/file and the fix."""


@dataclass(frozen=True)
class Preprocessing:
    """timm's evaluation transform for one model, as resolved from its pretrained_cfg.

    input_size: (3, H, W) the model's input in pixels. interpolation: "bicubic", "bilinear" or
    "nearest". mean, std: per-channel normalisation of [0, 1] pixels. crop_pct: the tile is
    resized to floor(H / crop_pct) x floor(W / crop_pct) and the centre H x W is kept (1.0 keeps
    the whole tile). crop_mode: timm's "center", "squash" or "border" (identical for square tiles
    and square inputs).
    """

    input_size: tuple[int, int, int]
    interpolation: str
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    crop_pct: float
    crop_mode: str

    @classmethod
    def from_data_config(cls, config: dict) -> Preprocessing:
        """From ``timm.data.resolve_data_config(...)``'s dict."""
        interpolation = config["interpolation"]
        if interpolation not in _INTERPOLATIONS:
            interpolation = "bicubic"  # timm's 'random'/'lanczos'/...: bicubic is its default
        return cls(
            input_size=tuple(int(v) for v in config["input_size"]),
            interpolation=interpolation,
            mean=tuple(float(v) for v in config["mean"]),
            std=tuple(float(v) for v in config["std"]),
            crop_pct=float(config["crop_pct"]),
            crop_mode=str(config.get("crop_mode") or "center"),
        )

    @property
    def scale_size(self) -> tuple[int, int]:
        """(H, W) the tile is resized to before the centre crop, pixels."""
        _, h, w = self.input_size
        return math.floor(h / self.crop_pct), math.floor(w / self.crop_pct)

    def attributes(self) -> dict:
        """HDF5 attribute values (numbers and arrays only)."""
        return {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(self).items()}


class TilePreprocess(nn.Module):
    """(B, H, W, 3) uint8 RGB tiles -> (B, 3, h, w) float32 normalised, channels_last.

    A resize on the GPU runs as one Triton kernel (``fused_preprocess``) with F.interpolate's
    own weights; elsewhere as F.interpolate, crop and a multiply-add.

    Equal to timm's evaluation transform on the same tiles up to resampling round-off (the
    resize runs on tensors with antialiasing, then rounds to whole pixel values as PIL does);
    when no resize is needed it is the same arithmetic up to float round-off: x / 255, then
    (x - mean) / std, computed as one multiply-add.
    """

    def __init__(self, preprocessing: Preprocessing):
        super().__init__()
        self.preprocessing = preprocessing
        self.register_buffer("mean", torch.tensor(preprocessing.mean).view(1, 3, 1, 1), False)
        self.register_buffer("std", torch.tensor(preprocessing.std).view(1, 3, 1, 1), False)

    def forward(self, tiles_BHWC: torch.Tensor) -> torch.Tensor:
        p = self.preprocessing
        # a permuted NHWC tensor is already channels_last in memory: no copy
        x_BCHW = tiles_BHWC.permute(0, 3, 1, 2)
        tile_h, tile_w = x_BCHW.shape[-2:]
        _, out_h, out_w = p.input_size
        scale_h, scale_w = p.scale_size
        if p.crop_mode != "squash" and scale_h != scale_w:
            scale_h = scale_w = max(scale_h, scale_w)  # keep the tile square, crop the rest
        top = int(round((scale_h - out_h) / 2.0))  # torchvision's CenterCrop offsets
        left = int(round((scale_w - out_w) / 2.0))
        scale = 1.0 / (255.0 * self.std)
        shift = -self.mean / self.std
        if (scale_h, scale_w) != (tile_h, tile_w):
            mode = _INTERPOLATIONS[p.interpolation]
            fused = fused_resize_normalize(
                tiles_BHWC, (scale_h, scale_w), (out_h, out_w), (top, left), mode,
                scale.flatten(), shift.flatten(),
            )  # fmt: skip
            if fused is not None:  # one Triton pass on the GPU
                return fused
            extra = {} if mode == "nearest" else {"antialias": True, "align_corners": False}
            x_BCHW = F.interpolate(x_BCHW.float(), size=(scale_h, scale_w), mode=mode, **extra)
            x_BCHW = x_BCHW.clamp_(0, 255).round_()
        if (scale_h, scale_w) != (out_h, out_w):
            x_BCHW = x_BCHW[..., top : top + out_h, left : left + out_w]
        # (x / 255 - mean) / std as one pass: x * (1 / (255 std)) + (-mean / std), reading the
        # uint8 (or resized float) pixels and writing float32 channels_last
        out = torch.addcmul(shift, x_BCHW, scale)
        return out.contiguous(memory_format=torch.channels_last)


class TileEncoder(nn.Module):
    """Preprocessing + a timm model: (B, H, W, 3) uint8 tiles -> (B, D) float32 features.

    precision: "bf16" / "fp16" run the model under autocast on the tiles' device; "bf16-true"
    casts the weights to bfloat16 once and runs without autocast (no per-op casts, a bf16
    residual stream: features differ from "bf16"'s by bf16 round-off); "fp32" as is.
    compile: a ``torch.compile`` backend ("inductor"; None: eager). A ViT is compiled block by
    block (one compilation serves every block); batches smaller than the largest seen are
    padded to it, so a short last batch never recompiles.
    encoder_name, pooling: a preset's name and pooling ("cls", "cls+mean"), when built from one
    (``build_preset_encoder``); they become part of the feature files' identity.
    """

    def __init__(
        self,
        model: nn.Module,
        preprocessing: Preprocessing,
        *,
        model_name: str,
        weights: str = "",
        weights_sha256: str = "",
        model_kwargs: dict | None = None,
        precision: str = "fp32",
        compile: str | None = None,
        encoder_name: str = "",
        pooling: str = "",
    ):
        super().__init__()
        if precision not in PRECISIONS:
            raise TileEncoderError(f"precision must be one of {PRECISIONS}, got {precision!r}")
        self.model = model.eval()
        if precision in _TRUE_DTYPES:
            self.model.to(_TRUE_DTYPES[precision])
        self.preprocess = TilePreprocess(preprocessing)
        self.preprocessing = preprocessing
        self.model_name = model_name
        self.weights = weights
        self.weights_sha256 = weights_sha256
        self.model_kwargs = dict(model_kwargs or {})
        self.precision = precision
        self.compile_backend = compile
        self.encoder_name = encoder_name
        self.pooling = pooling
        self.feature_dim = int(
            getattr(model, "head_hidden_size", None) or getattr(model, "num_features", 0)
        )
        self._padded_batch = 0  # with compile: the batch every call is padded to
        if compile:
            compile_regions(self.model, compile)

    def forward(self, tiles_BHWC: torch.Tensor) -> torch.Tensor:
        return self.encode(self.preprocess(tiles_BHWC))

    def encode(self, x_BCHW: torch.Tensor) -> torch.Tensor:
        """The model alone on a preprocessed batch: (B, 3, h, w) float -> (B, D) float32, in
        this encoder's precision (what ``forward`` runs after ``preprocess``)."""
        batch = x_BCHW.shape[0]
        if self.compile_backend and 0 < batch < self._padded_batch:
            pad = x_BCHW.new_zeros((self._padded_batch - batch, *x_BCHW.shape[1:]))
            x_BCHW = torch.cat([x_BCHW, pad]).contiguous(memory_format=torch.channels_last)
        self._padded_batch = max(self._padded_batch, x_BCHW.shape[0])
        true_dtype = _TRUE_DTYPES.get(self.precision)
        if true_dtype is not None:
            x_BCHW = x_BCHW.to(true_dtype)
        dtype = _AUTOCAST_DTYPES.get(self.precision)
        autocast = (
            torch.autocast(x_BCHW.device.type, dtype=dtype)
            if dtype is not None
            else contextlib.nullcontext()
        )
        with autocast:
            features_BD = self.model(x_BCHW)
        if features_BD.ndim != 2:
            raise TileEncoderError(
                f"model {self.model_name!r} returned features of shape {tuple(features_BD.shape)}; "
                "a tile encoder must return (B, D): use a timm model whose num_classes=0 output is "
                "pooled (set global_pool in --model-kwargs for models without pooling)"
            )
        return features_BD[:batch].float()

    def replace(self, *, precision: str | None = None, compile: str | None = None) -> TileEncoder:
        """A copy of this encoder (its model deep-copied) with another precision or compile
        backend ("" for none): benchmarks compare settings on the same weights (bf16-rounded
        ones when this encoder is "bf16-true")."""
        compiled = {m: m._compiled_call_impl for m in self.model.modules()
                    if getattr(m, "_compiled_call_impl", None) is not None}  # fmt: skip
        try:  # copy the eager modules; the copy compiles on its own
            for module in compiled:
                module._compiled_call_impl = None
            model = copy.deepcopy(self.model)
        finally:
            for module, impl in compiled.items():
                module._compiled_call_impl = impl
        if self.precision in _TRUE_DTYPES:
            model.float()
        return TileEncoder(
            model,
            self.preprocessing,
            model_name=self.model_name,
            weights=self.weights,
            weights_sha256=self.weights_sha256,
            model_kwargs=self.model_kwargs,
            precision=precision or self.precision,
            compile=self.compile_backend if compile is None else (compile or None),
            encoder_name=self.encoder_name,
            pooling=self.pooling,
        )

    def identity(self) -> dict:
        """What a complete feature file must match to be skipped on a rerun."""
        identity = {
            "model": self.model_name,
            "model_kwargs": json.dumps(self.model_kwargs, sort_keys=True),
            "weights_sha256": self.weights_sha256,
            "precision": self.precision,
            "preprocessing": json.dumps(self.preprocessing.attributes(), sort_keys=True),
        }
        if self.encoder_name:
            identity.update(encoder_preset=self.encoder_name, pooling=self.pooling)
        return identity

    def attributes(self) -> dict:
        """HDF5 attributes naming the model, its weights and its preprocessing."""
        return {
            **self.identity(),
            "encoder": self.encoder_name or self.model_name,
            "weights": self.weights,
            "feature_dim": self.feature_dim,
            **{f"preprocessing_{k}": v for k, v in self.preprocessing.attributes().items()},
        }


def compile_regions(model: nn.Module, backend: str = "inductor") -> None:
    """``torch.compile`` in place: each of a ViT's ``blocks`` (found on the model or on its
    ``vit`` attribute) when they are all alike, else the whole model. Identical blocks share
    one compilation (torch >= 2.5 treats module parameters as inputs), so a 40-block ViT-g
    compiles about as fast as one block; the parts between blocks stay eager. Blocks that
    differ (a CNN's stages) would each compile anew, past dynamo's recompile limit."""
    blocks = getattr(getattr(model, "vit", model), "blocks", None)
    if isinstance(blocks, (nn.Sequential, nn.ModuleList)) and _all_alike(blocks):
        for block in blocks:
            block.compile(backend=backend, dynamic=False)
    else:
        model.compile(backend=backend, dynamic=False)


def _all_alike(blocks: nn.Module) -> bool:
    """Whether every block has the same class and parameter shapes (one compiled graph)."""
    kinds = {(type(b), tuple((n, p.shape) for n, p in b.named_parameters())) for b in blocks}
    return len(kinds) == 1


def weights_sha256(path: str | os.PathLike) -> str:
    """Hex SHA-256 of a weights file (read in 16 MiB pieces)."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for piece in iter(lambda: f.read(16 << 20), b""):
            digest.update(piece)
    return digest.hexdigest()


def _register_longvit_models() -> None:
    """Import longvit's timm registrations, when this installation has them."""
    with contextlib.suppress(ImportError):
        importlib.import_module("longvit.models")


def _read_weights(path: Path, model_name: str, overlay: dict) -> dict:
    """timm's overlay with the file's state dict, or TileEncoderError naming the file."""
    try:
        return weights_overlay(path, f"tile encoder weights for {model_name!r}", overlay)
    except WeightsFileError as err:
        raise TileEncoderError(f"{err}; check --weights") from err


def _shorten(text: str, limit: int = 300) -> str:
    return text if len(text) <= limit else text[:limit] + " ..."


class _KeyReport(logging.Handler):
    """Collects timm's report of missing / unexpected keys while weights load."""

    def __init__(self):
        super().__init__(logging.INFO)
        self.missing: str = ""
        self.unexpected: str = ""

    def emit(self, record: logging.LogRecord) -> None:
        message = record.getMessage()
        if message.startswith("Missing keys"):
            self.missing = message
        elif message.startswith("Unexpected keys"):
            self.unexpected = message


def build_tile_encoder(
    model_name: str,
    weights: str | os.PathLike | None = None,
    *,
    random_init: bool = False,
    precision: str = "fp32",
    crop_pct: float | None = None,
    model_kwargs: dict | None = None,
    compile: str | None = None,
) -> TileEncoder:
    """A ``TileEncoder`` for any timm model name (longvit's registered models included).

    Args:
        model_name: a timm model name, e.g. "vit_base_patch16_224" or "resnet50.a1_in1k".
        weights: a local .safetensors / .pth / .bin checkpoint (a state dict, or a dict with
            "state_dict" / "model"; EMA weights are preferred when present).
        random_init: use the model's random initialisation (benchmarks, tests); required when
            no weights are given, so a forgotten --weights never yields silent noise features.
        precision: "bf16", "fp16" (autocast), "bf16-true" (bf16 weights) or "fp32".
        crop_pct: override the pretrained_cfg's crop_pct (1.0 keeps the whole tile).
        model_kwargs: passed to ``timm.create_model`` (e.g. img_size, global_pool).
        compile: a ``torch.compile`` backend, e.g. "inductor" (see ``TileEncoder``).
    """
    import timm  # imported here: the slides layer and the CLI's help stay light
    from timm.data import resolve_data_config

    if model_name.startswith(("hf-hub:", "hf_hub:", "local-dir:")):
        raise TileEncoderError(
            f"{model_name!r} names a hub or directory model; longvit never fetches from a hub. "
            "Pass the timm architecture name with --model and the downloaded checkpoint with "
            "--weights FILE"
        )
    _register_longvit_models()
    if not timm.is_model(model_name.split(".")[0]) and not timm.is_model(model_name):
        raise TileEncoderError(
            f"timm has no model named {model_name!r}; list names with timm.list_models('*vit*')"
        )
    kwargs = dict(model_kwargs or {})
    if weights is None and not random_init:
        raise TileEncoderError(
            f"no weights given for {model_name!r}: pass --weights FILE (a local checkpoint), or "
            "--random-init to run with random weights (benchmarks and tests only)"
        )
    if weights is not None and random_init:
        raise TileEncoderError("pass either weights or random_init, not both")
    digest, source = "random-init", "random-init"
    report = _KeyReport()
    builder_log = logging.getLogger("timm.models._builder")
    if weights is not None:
        path = Path(weights)
        if not path.is_file():
            raise TileEncoderError(f"{path}: no such weights file; check --weights")
        digest, source = weights_sha256(path), str(path.resolve())
        # source="" so a name's hf-hub default source is never used. custom_load only for JAX
        # .npz files (timm reads them with allow_pickle=False): tags such as vit_*.augreg set
        # it, and timm (1.0.29, at least) then hands any file to the model's .npz loader
        overlay = {"file": source, "source": "", "custom_load": path.suffix == ".npz"}
        if path.suffix != ".npz":  # read here, without running code from the file
            overlay = _read_weights(path, model_name, overlay)
        kwargs["pretrained_cfg_overlay"] = {**kwargs.get("pretrained_cfg_overlay", {}), **overlay}
    builder_log.addHandler(report)
    previous_level = builder_log.level
    builder_log.setLevel(logging.INFO)
    try:
        model = timm.create_model(
            model_name, pretrained=weights is not None, num_classes=0, **kwargs
        )
    except (RuntimeError, KeyError, ValueError) as err:
        where = f"the weights in {weights}" if weights else "the model"
        raise TileEncoderError(
            f"cannot build {model_name!r} with {where}: {err}. Check that --model names the "
            "architecture the checkpoint was trained with (and --model-kwargs its options)"
        ) from err
    finally:
        builder_log.removeHandler(report)
        builder_log.setLevel(previous_level)
        kwargs.pop("pretrained_cfg_overlay", None)
    forget_loaded_weights(model)
    if report.missing:
        raise TileEncoderError(
            f"{weights}: these weights leave parts of {model_name!r} uninitialised "
            f"({_shorten(report.missing)}); check that --model names the checkpoint's "
            "architecture"
        )
    if report.unexpected:
        logging.getLogger("longvit.extract").warning("%s: %s", weights, report.unexpected)
    args: dict = {"crop_pct": crop_pct} if crop_pct is not None else {}
    if "img_size" in kwargs:  # the model was built for another size than its pretrained_cfg's
        size = kwargs["img_size"]
        h, w = (size, size) if isinstance(size, int) else size
        args["input_size"] = (3, int(h), int(w))
    preprocessing = Preprocessing.from_data_config(resolve_data_config(args, model=model))
    return TileEncoder(
        model,
        preprocessing,
        model_name=model_name,
        weights=source,
        weights_sha256=digest,
        model_kwargs=kwargs,
        precision=precision,
        compile=compile,
    )
