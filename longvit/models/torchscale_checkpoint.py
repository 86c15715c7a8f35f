"""torchscale's LongViT weights (examples/longvit) loaded into longvit's LongViT.

The published weights, ``longvit_small_patch32_1024.pth`` (DINO on 1024 px TCGA crops),
are DINO's training checkpoint: ``{"teacher": ..., "student": ..., "optimizer": ...,
"args": ...}``. Its ``teacher`` dict (what their fine-tuning loads) holds

    backbone.patch_embed.proj.{weight,bias}      Conv2d(3, 384, 32, stride 32)
    backbone.pos_embed                           (1, 1024, 384): a 32 x 32 grid, row-major
    backbone.encoder.layers.N.                   torchscale encoder layer N (0..11):
        self_attn_layer_norm.*                     pre-norm of the attention
        self_attn.{q,k,v}_proj.*                   three Linear(384, 384), with bias
        self_attn.inner_attn_ln.*                  sub-LN before the output projection
        self_attn.out_proj.*
        final_layer_norm.*                         pre-norm of the feed-forward
        ffn.fc1.*, ffn.ffn_layernorm.*, ffn.fc2.*  Linear(384, 1536), GELU, sub-LN, Linear
    backbone.norm.*                              DINO's token norm (not used, see below)
    head.*                                       DINO's projection head (not used)

and becomes ``patch_embed.proj``, ``pos_embed``, ``blocks.N.{norm1, attn.qkv (q, k, v
stacked), attn.inner_norm, attn.proj, norm2, mlp.fc1, mlp.norm, mlp.fc2}``. Their
fine-tuning model has no final norm: it mean-pools the encoder's tokens, then a fresh
LayerNorm and Linear (``fc_norm``, ``head``), which is longvit's avg pooling, so
``backbone.norm`` is left out as their fine-tuning leaves it out, and ``fc_norm`` / ``head``
keep the model's fresh initialisation.

The settings those weights were trained with (``TORCHSCALE_LONGVIT_ARGS``, the model
settings of the ``longvit_small.tcga_dino`` tag): every LayerNorm at eps 1e-5 (PyTorch's
default; torchscale's ``layernorm_eps``), LongViT's per-size segment lengths, and the
position table resampled to other grids with plain bicubic as their fine-tuning does.
"""

from __future__ import annotations

import argparse
import math
import os
import re

import torch
from torch import nn

from longvit.models.checkpoint import checkpoint_filter_fn
from longvit.models.pos_embed import resample_pos_embed

PUBLISHED_FILE = "longvit_small_patch32_1024.pth"
PUBLISHED_URL = (
    "https://github.com/wenhui0924/longvit_ckpts/releases/download/longvit/"
    "longvit_small_patch32_1024.pth"
)

TORCHSCALE_LONGVIT_ARGS = dict(
    norm_eps=1e-5,  # torchscale's layernorm_eps; their fine-tuning's fc_norm is nn.LayerNorm()
    segment_lengths="longvit",  # their per-image-size table (longvit_schedule)
    pos_embed_antialias=False,  # F.interpolate(bicubic, align_corners=False), no antialias
)

EXPECTED_LAYOUT = (
    f"torchscale's LongViT DINO checkpoint ({PUBLISHED_FILE}): a dict whose 'teacher' "
    "entry holds 'backbone.patch_embed.proj.weight', 'backbone.pos_embed' and "
    "'backbone.encoder.layers.N.*' (or that teacher dict itself), or a state dict of "
    "this longvit model"
)

# torchscale encoder layer -> longvit Block, per parameter (weight and bias alike)
_LAYER_NAMES = {
    "self_attn_layer_norm": "norm1",
    "self_attn.inner_attn_ln": "attn.inner_norm",
    "self_attn.out_proj": "attn.proj",
    "final_layer_norm": "norm2",
    "ffn.fc1": "mlp.fc1",
    "ffn.ffn_layernorm": "mlp.norm",
    "ffn.fc2": "mlp.fc2",
}
_QKV = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj")
_LAYER_KEY = re.compile(r"^encoder\.layers\.(\d+)\.(.+)\.(weight|bias)$")
_UNUSED = ("norm.weight", "norm.bias")  # DINO's token norm, not in their fine-tuning model


class CheckpointError(ValueError):
    """A weights file that is not what the model's pretrained tag loads (names the file)."""


def check_checkpoint_file(path: str | os.PathLike) -> None:
    """Check that `path` reads as a torchscale LongViT checkpoint before timm loads it.

    Reads with ``torch.load(weights_only=True)`` (memory-mapped: the tensors are not read)
    and checks the layout, so that a missing file, a file that is not a PyTorch checkpoint
    or a checkpoint of another layout fails here with a message naming the file and what
    was expected. Raises FileNotFoundError or CheckpointError.
    """
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(
            f"{path}: no such file; expected {PUBLISHED_FILE}, downloaded from {PUBLISHED_URL}"
        )
    if path.endswith(".safetensors"):
        from safetensors import safe_open

        try:
            with safe_open(path, "pt") as f:
                keys = list(f.keys())
        except Exception as err:  # noqa: BLE001  (any unreadable file: say which and why)
            raise CheckpointError(
                f"{path}: not a readable safetensors file ({type(err).__name__}: {err}); "
                f"expected {EXPECTED_LAYOUT}"
            ) from err
        checkpoint: dict = dict.fromkeys(keys)
    else:
        checkpoint = _load(path)
    if not isinstance(checkpoint, dict):
        raise CheckpointError(
            f"{path}: holds a {type(checkpoint).__name__}, not a dict; expected {EXPECTED_LAYOUT}"
        )
    if _backbone(checkpoint) is None and not _is_longvit_layout(checkpoint):
        raise CheckpointError(f"{path}: {_describe(checkpoint)}; expected {EXPECTED_LAYOUT}")


def torchscale_filter_fn(state_dict: dict, model: nn.Module) -> dict[str, torch.Tensor]:
    """timm's pretrained_filter_fn for torchscale LongViT weights (see the module docstring).

    Accepts the DINO checkpoint, its teacher dict, or a state dict already in longvit's
    layout (a saved ``longvit_small.tcga_dino`` model, passed to ``checkpoint_filter_fn``).
    The position table is resampled to the model's grid when they differ.
    """
    source = _source(model)
    backbone = _backbone(state_dict)
    if backbone is None:
        if _is_longvit_layout(state_dict):
            return checkpoint_filter_fn(state_dict, model)
        raise CheckpointError(f"{source}: {_describe(state_dict)}; expected {EXPECTED_LAYOUT}")
    model_state = model.state_dict()
    out = convert_backbone(backbone, source)
    grid = getattr(model, "pos_grid", None)
    pos = out["pos_embed"]
    if grid is not None and pos.shape[1] != grid[0] * grid[1]:
        side = math.isqrt(pos.shape[1])
        antialias = getattr(model, "pos_embed_antialias", False)
        out["pos_embed"] = resample_pos_embed(pos, (side, side), tuple(grid), antialias)
    mismatched = [
        f"{k}: checkpoint {tuple(v.shape)}, model {tuple(model_state[k].shape)}"
        for k, v in out.items()
        if k in model_state and v.shape != model_state[k].shape and not _other_in_chans(k, v, model)
    ]
    extra = sorted(set(out) - set(model_state))
    fresh = ("fc_norm.", "head.")
    absent = sorted(k for k in set(model_state) - set(out) if not k.startswith(fresh))
    if mismatched or extra or absent:
        details = "; ".join(
            mismatched
            + [f"{k} has no place in the model" for k in extra[:4]]
            + [f"the model's {k} is not in it" for k in absent[:4]]
        )
        raise CheckpointError(
            f"{source}: a torchscale LongViT of another size than the model ({details}); "
            "the published weights are LongViT small: timm.create_model("
            "'longvit_small.tcga_dino', ...) without size arguments"
        )
    for key in model_state:
        if key.startswith(fresh):  # fresh, as in their fine-tuning model
            out[key] = model_state[key]
    return out


def convert_backbone(backbone: dict, source: str = "checkpoint") -> dict[str, torch.Tensor]:
    """torchscale LongViT backbone keys (without ``backbone.``) -> longvit LongViT keys.

    Every key must be known and every layer complete: anything else is a CheckpointError
    naming `source` and the keys.
    """
    out: dict[str, torch.Tensor] = {}
    layers: dict[int, dict[str, torch.Tensor]] = {}
    unknown = []
    for key, value in backbone.items():
        if key in ("patch_embed.proj.weight", "patch_embed.proj.bias", "pos_embed"):
            out[key] = value
            continue
        if key in _UNUSED:
            continue
        match = _LAYER_KEY.match(key)
        if match is None:
            unknown.append(key)
            continue
        index, name, kind = int(match.group(1)), match.group(2), match.group(3)
        if name not in _LAYER_NAMES and name not in _QKV:
            unknown.append(key)
            continue
        layers.setdefault(index, {})[f"{name}.{kind}"] = value
    stem = ("patch_embed.proj.weight", "patch_embed.proj.bias", "pos_embed")
    missing = [k for k in stem if k not in out]
    if layers and sorted(layers) != list(range(len(layers))):
        missing.append(f"encoder.layers {sorted(set(range(max(layers) + 1)) - set(layers))}")
    for index, params in sorted(layers.items()):
        names = [f"{n}.{kind}" for n in (*_LAYER_NAMES, *_QKV) for kind in ("weight", "bias")]
        absent = [n for n in names if n not in params]
        if absent:
            missing.append(f"encoder.layers.{index}.{{{', '.join(absent)}}}")
            continue
        prefix = f"blocks.{index}."
        for name, target in _LAYER_NAMES.items():
            for kind in ("weight", "bias"):
                out[prefix + f"{target}.{kind}"] = params[f"{name}.{kind}"]
        for kind in ("weight", "bias"):
            out[prefix + f"attn.qkv.{kind}"] = torch.cat([params[f"{n}.{kind}"] for n in _QKV])
    if not layers:
        missing.append("encoder.layers.N.*")
    if missing or unknown:
        parts = []
        if missing:
            parts.append(f"missing backbone keys {missing}")
        if unknown:
            parts.append(f"unknown backbone keys {sorted(unknown)[:8]}")
        raise CheckpointError(
            f"{source}: not a complete torchscale LongViT backbone ({'; '.join(parts)}); "
            f"expected {EXPECTED_LAYOUT}"
        )
    pos = out["pos_embed"]
    side = math.isqrt(pos.shape[1]) if pos.dim() == 3 else 0
    if pos.dim() != 3 or pos.shape[0] != 1 or side * side != pos.shape[1]:
        raise CheckpointError(
            f"{source}: backbone.pos_embed has shape {tuple(pos.shape)}; expected (1, H * W, C) "
            "on a square grid (1, 1024, 384 for the published weights)"
        )
    return out


def _other_in_chans(key: str, value: torch.Tensor, model: nn.Module) -> bool:
    """The patch embedding of an RGB checkpoint for a model of other in_chans: timm's loader
    adapts it (``adapt_input_conv``) after this filter."""
    target = model.state_dict()[key]
    return (
        key == "patch_embed.proj.weight"
        and value.dim() == 4
        and value.shape[:1] + value.shape[2:] == target.shape[:1] + target.shape[2:]
    )


def _backbone(checkpoint: dict) -> dict | None:
    """The teacher's backbone entries (keys without ``backbone.``), or None if not that layout."""
    teacher = checkpoint.get("teacher")
    if isinstance(teacher, dict):
        checkpoint = teacher
    keys = [k for k in checkpoint if isinstance(k, str)]
    for prefix in ("backbone.", ""):
        if f"{prefix}pos_embed" in checkpoint and any(
            k.startswith(f"{prefix}encoder.layers.") for k in keys
        ):
            return {k[len(prefix) :]: checkpoint[k] for k in keys if k.startswith(prefix)}
    return None


def _is_longvit_layout(checkpoint: dict) -> bool:
    """Keys of longvit's own LongViT (possibly under a wrapper prefix)."""
    return any(
        isinstance(k, str) and re.search(r"(^|\.)blocks\.0\.attn\.qkv\.weight$", k)
        for k in checkpoint
    )


def _load(path: str):
    """torch.load with weights_only=True (DINO's checkpoints keep their argparse args)."""
    kwargs = dict(map_location="cpu", weights_only=True)
    try:
        with torch.serialization.safe_globals([argparse.Namespace]):
            try:
                return torch.load(path, mmap=True, **kwargs)
            except RuntimeError as err:
                if "mmap" not in str(err):  # an old (non-zip) torch.save file: read it whole
                    raise
                return torch.load(path, **kwargs)
    except Exception as err:  # noqa: BLE001  (any unreadable file: say which and why)
        raise CheckpointError(
            f"{path}: not readable as a PyTorch checkpoint with weights_only=True "
            f"({type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}); "
            f"expected {EXPECTED_LAYOUT}"
        ) from err


def _describe(checkpoint: dict) -> str:
    keys = [str(k) for k in checkpoint][:6]
    teacher = checkpoint.get("teacher")
    if isinstance(teacher, dict):
        return f"its 'teacher' dict has keys {[str(k) for k in teacher][:6]}, no LongViT backbone"
    return f"has keys {keys}{' ...' if len(checkpoint) > 6 else ''}, no LongViT backbone"


def _source(model: nn.Module) -> str:
    cfg = getattr(model, "pretrained_cfg", None) or {}
    return str(cfg.get("file") or "the given state dict")
