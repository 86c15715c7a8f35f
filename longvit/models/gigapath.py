"""Prov-GigaPath's slide encoder on longvit's trunk: its settings and its checkpoint's keys.

``timm.create_model("longvit_slide_base.gigapath", pretrained=True,
pretrained_cfg_overlay=dict(file="slide_encoder.pth"), num_classes=0)`` loads the published
weights (Hugging Face ``prov-gigapath/prov-gigapath``, file ``slide_encoder.pth``,
``{"model": state_dict}``) and returns, for tiles at integer grid indices ``tile_grid``, the
768-d slide embedding that their ``gigapath_slide_enc12l768d(in_chans=1536,
global_pool=True)`` returns for ``coords = tile_grid * 256``.

What their model is, and where each part sits here:

- ``patch_embed.proj`` Linear(1536, 768) -> ``feature_proj``; ``cls_token`` (their class
  token's position row is zeros) -> ``cls_token``.
- positions: floor(coords / 256) on a 1000 x 1000 grid, row x * 1000 + y + 1 of MAE's 2-D
  sin-cos table -> ``pos_embed="gigapath"`` (``pos_embed.gigapath_pos_embed``: the same
  rows computed per tile, no 3 GB buffer; indices outside the table are an error, where
  their code indexes past it for x and wraps y into the next row).
- 12 ``encoder.layers`` (pre-LN, sub-LN, 16 heads, GELU, LayerNorm eps 1e-5) -> ``blocks``:
  ``self_attn.{q,k,v}_proj`` -> ``attn.qkv`` (rows q, k, v), ``self_attn.out_proj`` ->
  ``attn.proj``, ``self_attn.inner_attn_ln`` -> ``attn.inner_norm``,
  ``self_attn_layer_norm`` -> ``norm1``, ``ffn.fc1`` / ``ffn.ffn_layernorm`` / ``ffn.fc2`` ->
  ``mlp.fc1`` / ``mlp.norm`` / ``mlp.fc2``, ``final_layer_norm`` -> ``norm2``.
- dilated attention: segment lengths [1024, 5792, 32768, 185363, 1048576] (log-spaced,
  each capped at the sequence length N + 1), rates [1, 2, 4, 8, 16], head groups offset as
  torchscale; ``zero_padded_keys=True``: the zero keys that pad partial segments enter
  the softmax, as in their code (docs/pretrained.md).
- ``global_pool=True``: ``encoder.layer_norm`` (eps 1e-5) -> ``norm``, mean of the tile
  tokens (not the class token), then ``norm`` (eps 1e-6) -> ``fc_norm``.
"""

from __future__ import annotations

import logging
import re

import torch
from torch import nn

from longvit.models.checkpoint import checkpoint_filter_fn, unwrap_checkpoint

_logger = logging.getLogger(__name__)

GIGAPATH_SEGMENT_LENGTHS = (1024, 5792, 32768, 185363, 1048576)
GIGAPATH_DILATION_RATES = (1, 2, 4, 8, 16)
WEIGHTS_SOURCE = (
    "Prov-GigaPath's slide_encoder.pth, from https://huggingface.co/prov-gigapath/prov-gigapath "
    "(accept the model's terms there, then e.g. `huggingface-cli download "
    "prov-gigapath/prov-gigapath slide_encoder.pth --local-dir .`)"
)

# The longvit_slide_base.gigapath architecture (model kwargs applied for the tag).
GIGAPATH_MODEL_ARGS = dict(
    embed_dim=768,
    depth=12,
    num_heads=16,
    mlp_ratio=4.0,
    in_chans=1536,
    qkv_bias=True,
    sub_ln=True,
    class_token=True,
    global_pool="avg",
    fc_norm=True,
    norm_before_pool=True,
    norm_eps=1e-5,
    fc_norm_eps=1e-6,
    pos_embed="gigapath",
    segment_lengths=list(GIGAPATH_SEGMENT_LENGTHS),
    dilation_rates=list(GIGAPATH_DILATION_RATES),
    zero_padded_keys=True,
)

# their key -> ours; {i} is the layer index
_LAYER = r"encoder\.layers\.(\d+)\."
_RENAMES = [
    (r"patch_embed\.proj\.(weight|bias)", r"feature_proj.\1"),
    (r"cls_token", r"cls_token"),
    (_LAYER + r"self_attn\.out_proj\.(weight|bias)", r"blocks.\1.attn.proj.\2"),
    (_LAYER + r"self_attn\.inner_attn_ln\.(weight|bias)", r"blocks.\1.attn.inner_norm.\2"),
    (_LAYER + r"self_attn_layer_norm\.(weight|bias)", r"blocks.\1.norm1.\2"),
    (_LAYER + r"ffn\.fc1\.(weight|bias)", r"blocks.\1.mlp.fc1.\2"),
    (_LAYER + r"ffn\.fc2\.(weight|bias)", r"blocks.\1.mlp.fc2.\2"),
    (_LAYER + r"ffn\.ffn_layernorm\.(weight|bias)", r"blocks.\1.mlp.norm.\2"),
    (_LAYER + r"final_layer_norm\.(weight|bias)", r"blocks.\1.norm2.\2"),
    (r"encoder\.layer_norm\.(weight|bias)", r"norm.\1"),
    (r"norm\.(weight|bias)", r"fc_norm.\1"),
]
_QKV = re.compile(_LAYER + r"self_attn\.([qkv])_proj\.(weight|bias)")
_MARKER = "encoder.layers.0.self_attn.q_proj.weight"


class CheckpointFileError(ValueError):
    """A weight file that cannot be read, or holds another model's weights."""


def is_gigapath_state_dict(state_dict: dict) -> bool:
    """Whether a state dict has Prov-GigaPath's slide-encoder keys."""
    return _MARKER in state_dict


def gigapath_to_longvit(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Their keys -> longvit_slide_base.gigapath's (q, k, v projections stacked into qkv).

    Raises CheckpointFileError listing keys that have no place in the model (their
    ``pos_embed`` buffer, if a checkpoint carries it, is dropped: it is computed).
    """
    out: dict[str, torch.Tensor] = {}
    qkv: dict[tuple[str, str], dict[str, torch.Tensor]] = {}
    unknown = []
    for key, value in state_dict.items():
        if key == "pos_embed":
            continue
        match = _QKV.fullmatch(key)
        if match:
            layer, which, kind = match.groups()
            qkv.setdefault((layer, kind), {})[which] = value
            continue
        for pattern, target in _RENAMES:
            if re.fullmatch(pattern, key):
                out[re.sub(pattern, target, key)] = value
                break
        else:
            unknown.append(key)
    if unknown:
        raise CheckpointFileError(
            f"keys with no place in Prov-GigaPath's slide encoder: {_few(unknown)}"
        )
    for (layer, kind), parts in sorted(qkv.items()):
        if set(parts) != {"q", "k", "v"}:
            missing = sorted({"q", "k", "v"} - set(parts))
            raise CheckpointFileError(
                f"layer {layer} lacks self_attn.{'/'.join(missing)}_proj.{kind}"
            )
        out[f"blocks.{layer}.attn.qkv.{kind}"] = torch.cat([parts["q"], parts["k"], parts["v"]])
    return out


def gigapath_checkpoint_filter_fn(state_dict: dict, model: nn.Module) -> dict[str, torch.Tensor]:
    """timm's pretrained filter for longvit_slide_base.gigapath.

    Takes Prov-GigaPath's checkpoint (``{"model": state_dict}`` or the state dict) and
    maps its keys; a checkpoint already in longvit's keys (this model saved) passes
    through ``checkpoint_filter_fn``. Anything else, and any key, shape or missing weight
    that does not fit, is a CheckpointFileError naming the file.
    """
    file = (getattr(model, "pretrained_cfg", None) or {}).get("file") or "the checkpoint"
    state_dict = unwrap_checkpoint(state_dict)
    if not isinstance(state_dict, dict) or not all(
        isinstance(v, torch.Tensor) for v in state_dict.values()
    ):
        raise CheckpointFileError(f"{file}: not a state dict of tensors; expected {WEIGHTS_SOURCE}")
    try:
        if is_gigapath_state_dict(state_dict):
            state_dict = gigapath_to_longvit(state_dict)
        else:
            own = set(model.state_dict())
            if not any(k in own for k in state_dict):
                raise CheckpointFileError(
                    f"no Prov-GigaPath slide-encoder keys (such as {_MARKER!r}) and none of "
                    f"this model's; found {_few(list(state_dict))}"
                )
            state_dict = checkpoint_filter_fn(state_dict, model)
        _check_fits(state_dict, model)
    except CheckpointFileError as error:
        raise CheckpointFileError(f"{file}: {error}; expected {WEIGHTS_SOURCE}") from None
    return state_dict


def _check_fits(state_dict: dict[str, torch.Tensor], model: nn.Module) -> None:
    """Every weight of the model is given (a new classifier head aside) with its shape."""
    own = model.state_dict()
    missing = [k for k in own if k not in state_dict and not k.startswith("head.")]
    unexpected = [k for k in state_dict if k not in own]
    wrong = [
        f"{k} {tuple(v.shape)} (model: {tuple(own[k].shape)})"
        for k, v in state_dict.items()
        if k in own and tuple(v.shape) != tuple(own[k].shape)
    ]
    problems = []
    if missing:
        problems.append(f"missing {_few(missing)}")
    if unexpected:
        problems.append(f"unexpected {_few(unexpected)}")
    if wrong:
        problems.append(f"shapes differ: {_few(wrong)}")
    if problems:
        raise CheckpointFileError(
            "does not fit longvit_slide_base.gigapath (12 layers, dim 768, 16 heads, 1536-d "
            "tile features): " + "; ".join(problems)
        )


def _few(items: list[str], limit: int = 6) -> str:
    shown = ", ".join(repr(i) for i in items[:limit])
    more = f" and {len(items) - limit} more" if len(items) > limit else ""
    return f"{shown}{more}"
