"""A ``TileEncoder`` from a preset: the published architecture, weights, preprocessing, pooling.

``build_preset_encoder("virchow2", "pytorch_model.bin")`` builds the preset's timm model with
``pretrained=False``, reads the file (safetensors, or a torch checkpoint with
``weights_only=True``), maps its published key layout to timm's names, checks that every tensor
of the model is there with its shape, loads it and wraps the model in the preset's pooling. A
file that is missing, unreadable or holds another model's weights is an error that names the
file and the one expected (its name, and the Hugging Face repository it comes from).
"""

from __future__ import annotations

import dataclasses
import logging
import os
from pathlib import Path

import torch
from torch import nn

from longvit.extract.layouts import LAYOUT_TO_TIMM
from longvit.extract.model import TileEncoder, TileEncoderError, weights_sha256
from longvit.extract.pooling import TokenPooling
from longvit.extract.presets import TileEncoderPreset, get_preset

_logger = logging.getLogger("longvit.extract")


class WeightsFileError(TileEncoderError):
    """A weights file that is not the preset's: unreadable, or holding another model."""


def missing_weights_message(preset: TileEncoderPreset) -> str:
    """What to download, from where, and how to pass it."""
    return (
        f"--encoder {preset.name} needs its weights: download {preset.weights.describe()} "
        "(accept the model's terms on that page first if it asks), then pass --weights "
        f"/path/to/{preset.weights.file} (--random-init runs random weights, for benchmarks only)"
    )


def expected_file(preset: TileEncoderPreset) -> str:
    return (
        f"expected {preset.title}'s {preset.weights.describe()} "
        f"({preset.weights.layout} key layout)"
    )


def resolve_weights_path(weights: str | os.PathLike, preset: TileEncoderPreset) -> Path:
    """The weights file: ``weights`` itself, or the preset's file inside a folder (a
    downloaded Hugging Face snapshot)."""
    path = Path(weights).expanduser()
    if path.is_dir():
        for name in (preset.weights.file, *preset.weights.also):
            if (path / name).is_file():
                return path / name
        raise WeightsFileError(f"{path}: the folder holds no {preset.weights.file}; "
                               f"{expected_file(preset)}")  # fmt: skip
    if not path.is_file():
        raise WeightsFileError(
            f"{path}: no such weights file; check --weights ({expected_file(preset)})"
        )
    return path


def read_weights(path: Path, preset: TileEncoderPreset) -> dict[str, torch.Tensor]:
    """The file's tensors under their stored names: a .safetensors file, or a torch checkpoint
    loaded with ``weights_only=True`` (of a training checkpoint, its ``state_dict`` or
    ``model`` entry)."""
    import safetensors.torch

    from longvit.models.checkpoint import unwrap_checkpoint

    try:
        if path.suffix == ".safetensors":
            state = safetensors.torch.load_file(str(path), device="cpu")
        else:
            state = torch.load(path, map_location="cpu", weights_only=True)
        state = unwrap_checkpoint(state) if isinstance(state, dict) else {}
    except Exception as err:  # noqa: BLE001 - any reader failure means: not a weights file
        raise WeightsFileError(
            f"{path}: cannot be read as model weights ({type(err).__name__}: "
            f"{str(err)[:200]}); {expected_file(preset)}"
        ) from err
    tensors = {k: v for k, v in state.items() if isinstance(v, torch.Tensor)}
    if not tensors:
        raise WeightsFileError(f"{path}: holds no tensors; {expected_file(preset)}")
    return tensors


def _shape(shape) -> str:
    return "(" + ", ".join(str(int(s)) for s in shape) + ")"


# tensors timm's checkpoint_filter_fn adapts to the model's grid (another img_size / patch)
_RESAMPLED = ("pos_embed", "patch_embed.proj.weight")


def load_published_weights(vit: nn.Module, path: Path, preset: TileEncoderPreset) -> None:
    """Load ``path`` into ``vit`` (the preset's timm model), every tensor checked.

    Steps: read; map the preset's published layout to timm names; strip a wrapper prefix
    (``model.``, a Lightning module's attribute path); timm's own ``checkpoint_filter_fn``
    (resamples the position table when the model was built for another img_size). Missing
    tensors or tensors of another shape are a ``WeightsFileError``; extra tensors are logged
    and left out.
    """
    from timm.models.vision_transformer import checkpoint_filter_fn

    from longvit.models.checkpoint import strip_module_prefix

    expected = vit.state_dict()
    state = LAYOUT_TO_TIMM[preset.weights.layout](read_weights(path, preset))
    state = strip_module_prefix(state, set(expected))
    stored = {k: tuple(v.shape) for k, v in state.items()}
    missing = [k for k in expected if k not in state]
    wrong = [k for k in expected if k in state and k not in _RESAMPLED
             and state[k].shape != expected[k].shape]  # fmt: skip
    if not missing and not wrong:
        try:
            state = checkpoint_filter_fn(state, vit)
        except Exception:  # noqa: BLE001 - timm cannot adapt the table: another model's
            wrong = [k for k in _RESAMPLED if state[k].shape != expected[k].shape]
        else:
            wrong = [k for k in expected if state[k].shape != expected[k].shape]
    if missing or wrong:
        parts = []
        if missing:
            names = ", ".join(missing[:4]) + (" ..." if len(missing) > 4 else "")
            parts.append(f"{len(missing)} of the model's {len(expected)} tensors are missing "
                         f"({names})")  # fmt: skip
        if wrong:
            shown = "; ".join(
                f"{k} is {_shape(stored[k])} in the file, {_shape(expected[k].shape)} in "
                f"{preset.title}"
                for k in wrong[:3]
            )
            parts.append(f"{len(wrong)} have another shape ({shown})")
        raise WeightsFileError(
            f"{path}: not {preset.title}'s weights: {' and '.join(parts)}; {expected_file(preset)}"
        )
    unexpected = sorted(k for k in state if k not in expected)
    if unexpected:
        _logger.warning("%s: %d tensors not part of %s left out (%s)", path, len(unexpected),
                        preset.title, ", ".join(unexpected[:5]))  # fmt: skip
    vit.load_state_dict({k: state[k] for k in expected}, strict=True)


def build_preset_encoder(
    name: str,
    weights: str | os.PathLike | None = None,
    *,
    random_init: bool = False,
    precision: str = "fp32",
    compile: str | None = None,
    crop_pct: float | None = None,
    model_kwargs: dict | None = None,
) -> TileEncoder:
    """A ``TileEncoder`` for the preset ``name`` (see ``longvit.extract.presets``).

    Args:
        name: the preset, e.g. "gigapath", "uni2-h", "virchow2" (``format_presets()`` lists
            them).
        weights: the downloaded file (or the folder it is in).
        random_init: random weights instead (benchmarks, tests).
        precision: "bf16", "fp16" (autocast), "bf16-true" (bf16 weights) or "fp32".
        compile: a ``torch.compile`` backend, e.g. "inductor".
        crop_pct: override the preset's crop_pct (1.0 keeps the whole tile).
        model_kwargs: overrides of the preset's timm arguments (a larger img_size for
            models built with dynamic_img_size; smaller depth/embed_dim in tests). The
            weights must still fit the model.
    """
    import timm

    preset = get_preset(name)
    if weights is None and not random_init:
        raise TileEncoderError(missing_weights_message(preset))
    if weights is not None and random_init:
        raise TileEncoderError("pass either weights or random_init, not both")
    path = resolve_weights_path(weights, preset) if weights is not None else None
    overrides = dict(model_kwargs or {})
    try:
        vit = timm.create_model(
            preset.architecture, pretrained=False, num_classes=0, **preset.timm_kwargs(overrides)
        )
    except (TypeError, ValueError, RuntimeError) as err:
        raise TileEncoderError(
            f"cannot build {preset.title} ({preset.architecture}) with --model-kwargs "
            f"{overrides}: {err}"
        ) from err
    digest, source = "random-init", "random-init"
    if path is not None:
        load_published_weights(vit, path, preset)
        digest, source = weights_sha256(path), str(path.resolve())
    preprocessing = preset.preprocessing
    if crop_pct is not None:
        preprocessing = dataclasses.replace(preprocessing, crop_pct=float(crop_pct))
    if "img_size" in overrides:
        size = overrides["img_size"]
        h, w = (size, size) if isinstance(size, int) else size
        preprocessing = dataclasses.replace(preprocessing, input_size=(3, int(h), int(w)))
    return TileEncoder(
        TokenPooling(vit, preset.pooling),
        preprocessing,
        model_name=preset.architecture,
        weights=source,
        weights_sha256=digest,
        model_kwargs={**preset.model_kwargs, **overrides},
        precision=precision,
        compile=compile,
        encoder_name=preset.name,
        pooling=preset.pooling,
    )
