"""Published key layouts of tile encoder weights, mapped to timm's ViT names.

A layout is a function ``state_dict -> state_dict`` taking a file's tensors under their
published names and returning them under the names of timm's ``VisionTransformer``:

- ``"timm"``: the file already uses timm's names (Prov-GigaPath, UNI, UNI2-h, Virchow, Virchow2,
  H-optimus): nothing to rename;
- ``"hf-vit"``: Hugging Face transformers' ``ViTModel`` (Phikon): ``embeddings.*``,
  ``encoder.layer.N.*`` with separate query/key/value projections, ``layernorm``; the pooler
  (not part of the embedding) is dropped. Files saved by transformers 5, which names the
  blocks ``layers.N.attention.q_proj`` / ``o_proj`` / ``mlp.fc1``, are read too.

Wrappers around either (``module.``, ``model.``, a Lightning checkpoint) are removed later by
``longvit.models.checkpoint.strip_module_prefix``.
"""

from __future__ import annotations

import re
from collections.abc import Callable

import torch

_HF_VIT_RENAMES = (
    (r"^embeddings\.cls_token$", "cls_token"),
    (r"^embeddings\.position_embeddings$", "pos_embed"),
    (r"^embeddings\.patch_embeddings\.projection\.", "patch_embed.proj."),
    (r"^encoder\.layer\.(\d+)\.layernorm_before\.", r"blocks.\1.norm1."),
    (r"^encoder\.layer\.(\d+)\.attention\.output\.dense\.", r"blocks.\1.attn.proj."),
    (r"^encoder\.layer\.(\d+)\.layernorm_after\.", r"blocks.\1.norm2."),
    (r"^encoder\.layer\.(\d+)\.intermediate\.dense\.", r"blocks.\1.mlp.fc1."),
    (r"^encoder\.layer\.(\d+)\.output\.dense\.", r"blocks.\1.mlp.fc2."),
    (r"^layernorm\.", "norm."),
    # transformers 5's names for the same tensors
    (r"^layers\.(\d+)\.layernorm_before\.", r"blocks.\1.norm1."),
    (r"^layers\.(\d+)\.attention\.o_proj\.", r"blocks.\1.attn.proj."),
    (r"^layers\.(\d+)\.layernorm_after\.", r"blocks.\1.norm2."),
    (r"^layers\.(\d+)\.mlp\.(fc1|fc2)\.", r"blocks.\1.mlp.\2."),
)
_HF_QKV = re.compile(
    r"^(?:encoder\.layer|layers)\.(\d+)\.attention\.(?:attention\.)?"
    r"(query|key|value|q_proj|k_proj|v_proj)\.(weight|bias)$"
)
_QKV_PART = {"q_proj": "query", "k_proj": "key", "v_proj": "value"}


def hf_vit_to_timm(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """transformers ``ViTModel`` names -> timm ``VisionTransformer`` names.

    query/key/value (each (D, D) and (D,)) become one ``attn.qkv`` of (3D, D) and (3D,), in
    that order, as timm's attention splits it. A ``vit.`` prefix (a ``ViTFor...`` model's
    backbone) is removed; ``pooler.*`` is dropped; names this layout does not know are kept as
    they are (the loader reports them).
    """
    if any(k.startswith("vit.") for k in state):
        state = {k.removeprefix("vit."): v for k, v in state.items() if k.startswith("vit.")}
    out: dict[str, torch.Tensor] = {}
    qkv: dict[tuple[str, str], dict[str, torch.Tensor]] = {}
    for key, value in state.items():
        if key.startswith("pooler."):
            continue
        match = _HF_QKV.match(key)
        if match:
            layer, part, kind = match.groups()
            qkv.setdefault((layer, kind), {})[_QKV_PART.get(part, part)] = value
            continue
        for pattern, repl in _HF_VIT_RENAMES:
            new, n = re.subn(pattern, repl, key)
            if n:
                key = new
                break
        out[key] = value
    for (layer, kind), parts in sorted(qkv.items()):
        if set(parts) != {"query", "key", "value"}:  # an incomplete file: keep what is there
            for part, value in parts.items():
                out[f"encoder.layer.{layer}.attention.attention.{part}.{kind}"] = value
            continue
        out[f"blocks.{layer}.attn.qkv.{kind}"] = torch.cat(
            [parts["query"], parts["key"], parts["value"]], dim=0
        )
    return out


LAYOUT_TO_TIMM: dict[str, Callable[[dict], dict]] = {
    "timm": dict,
    "hf-vit": hf_vit_to_timm,
}
