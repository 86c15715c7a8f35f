"""Per-tile importance of a slide prediction, and heatmaps of it over the slide thumbnail.

Two measures, both O(N) in memory (no N x N matrix is ever built):

- ``"attention"``: the attention of the pooled query in the last block, averaged over heads.
  With class-token pooling it is the class token's exact attention row under dilated
  attention: ``softmax(q_0 k^T * scale + log M[0, :])`` where M[0, k] counts the branches in
  which position 0 attends key k (``longvit.attention.reference``). Position 0 sees, per
  branch (w, r), only the keys k < w with k mod r == 0 and only in the heads of offset 0, so
  this map is sparse by construction: tiles outside the class token's dilation pattern get 0
  (they reach the class token through earlier layers). With mean pooling (no class token)
  the query is the mean of the valid tokens' queries, attending to every valid key.
- ``"gradxinput"``: |sum over channels of gradient x input| at the first block's input
  tokens (features or patches projected, positions added) for the predicted class (or any
  scalar of the output): dense, and it covers every path through the network.

Models without transformer blocks (the MIL baselines of ``longvit.models.mil``) answer
``"attention"`` with their own ``tile_attention`` (ABMIL's softmax weights), and
``"gradxinput"`` is then taken at the tile features themselves.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import cv2
import numpy as np
import torch

from longvit.attention.reference import head_offsets

IMPORTANCE_METHODS = ("attention", "gradxinput", "none")


def tile_importance(
    module,
    batch: dict,
    method: str,
    target: torch.Tensor | Callable[[torch.Tensor], torch.Tensor] | None = None,
) -> torch.Tensor:
    """Importance (B, N) of each token of a batch (0 at padding).

    Args:
        module: a ``SlideModule`` (its ``model`` and ``forward_model`` are used).
        batch: the batch as ``forward_model`` takes it.
        method: "attention" or "gradxinput".
        target: gradxinput: class indices (B,) whose logit is explained, or a function of the
            model output (B, ...) giving one scalar per slide (B,); None: the largest logit.
    """
    if method == "attention":
        scores = attention_importance(module, batch)
    elif method == "gradxinput":
        scores = gradient_input_importance(module, batch, target)
    else:
        raise ValueError(f"importance method must be 'attention' or 'gradxinput', got {method!r}")
    mask = batch.get("padding_mask")
    return scores if mask is None else scores.masked_fill(mask, 0.0)


def _capture_block_input(block: torch.nn.Module, replace_with_leaf: bool = False):
    store: dict = {}

    def hook(_module, args):
        x = args[0]
        if replace_with_leaf:
            x = x.detach().requires_grad_(True)
            store.setdefault("x", x)
            return (x, *args[1:])
        store.setdefault("x", x.detach())
        store.setdefault("mask", args[1] if len(args) > 1 else None)
        return None

    return store, block.register_forward_pre_hook(hook)


@torch.no_grad()
def attention_importance(module, batch: dict) -> torch.Tensor:
    """(B, N) attention of the pooled / class-token query in the last block (module docstring)."""
    model = module.model
    if hasattr(model, "tile_attention"):  # a MIL model: its own attention weights (B, N)
        return model.tile_attention(batch["features"], batch.get("coords"),
                                    batch.get("padding_mask")).float()  # fmt: skip
    block = model.blocks[-1]
    store, handle = _capture_block_input(block)
    try:
        module.forward_model(batch)
    finally:
        handle.remove()
    x, mask = store["x"], store["mask"]  # (B, P + N, C), (B, P + N) or None
    attn = block.attn
    b, length, _ = x.shape
    heads, head_dim = attn.num_heads, attn.head_dim
    qkv = attn.qkv(block.norm1(x)).view(b, length, 3, heads, head_dim).float()
    q, k = qkv[:, :, 0], qkv[:, :, 1]  # (B, L, H, D)
    scale = attn.scale if attn.scale is not None else 1.0 / math.sqrt(head_dim)
    prefix = model.num_prefix_tokens
    if model.global_pool == "token":
        query = q[:, 0]  # (B, H, D)
        log_m = class_token_log_multiplicity(
            length, heads, attn.schedule(length), attn.dilation_rates, x.device
        )  # (H, L)
    else:
        valid = torch.ones(b, length, device=x.device) if mask is None else (~mask).float()
        valid[:, :prefix] = 0
        query = (q * valid[:, :, None, None]).sum(1) / valid.sum(1).clamp(min=1)[:, None, None]
        log_m = torch.zeros(heads, length, device=x.device)
    scores = torch.einsum("bhd,blhd->bhl", query, k) * scale + log_m[None]
    if mask is not None:
        scores = scores.masked_fill(mask[:, None, :], float("-inf"))
    probs = torch.softmax(scores, dim=-1).nan_to_num(0.0)  # (B, H, L)
    return probs.mean(1)[:, prefix:]


def class_token_log_multiplicity(
    length: int, heads: int, segment_lengths, dilation_rates, device=None
) -> torch.Tensor:
    """log M[h, 0, k] (H, L): in how many branches query 0 attends key k for head h.

    The row for position 0 of ``longvit.attention.reference.multiplicity`` in O(H * L).
    """
    m = torch.zeros(heads, length, device=device)
    keys = torch.arange(length, device=device)
    for w, r in zip(segment_lengths, dilation_rates):
        w = min(w, length)
        sees = ((keys < w) & (keys % r == 0)).float()  # keys in segment 0 on offset 0
        offsets = torch.tensor(head_offsets(heads, r), device=device)
        m += (offsets == 0).float()[:, None] * sees[None, :]  # only heads of offset 0
    return torch.log(m)


def gradient_input_importance(module, batch: dict, target=None) -> torch.Tensor:
    """(B, N) |sum_c grad * x| at the first block's input tokens (module docstring)."""
    model = module.model
    # predict runs under inference mode: leave it and copy the batch's tensors out of it
    with torch.inference_mode(False), torch.enable_grad():
        batch = {k: v.clone() if isinstance(v, torch.Tensor) else v for k, v in batch.items()}
        if not hasattr(model, "blocks"):  # a MIL model: the tile features are its input tokens
            batch["features"] = batch["features"].float().requires_grad_(True)
            store, handle = {"x": batch["features"]}, None
        else:
            store, handle = _capture_block_input(model.blocks[0], replace_with_leaf=True)
        try:
            out = module.forward_model(batch).float()
        finally:
            if handle is not None:
                handle.remove()
        if callable(target):
            objective = target(out)
        else:
            index = out.argmax(-1) if target is None else target.clone().to(out.device)
            objective = out.gather(1, index.view(-1, 1)).squeeze(1)
        x = store["x"]
        (grad,) = torch.autograd.grad(objective.sum(), x)
    scores = (grad * x).sum(-1).abs().detach()
    return scores[:, getattr(model, "num_prefix_tokens", 0) :]


def importance_batch(batch: dict, scores: torch.Tensor) -> dict:
    """What the prediction writer needs to draw heatmaps: scores and coordinates on the CPU."""
    return {
        "importance": scores.float().cpu(),
        "padding_mask": batch["padding_mask"].cpu(),
        "coords_level0": batch["coords_level0"].cpu(),
        "patch_size_level0": torch.as_tensor(batch["patch_size_level0"]).float().cpu(),
        "slide_path": batch.get("slide_path"),
    }


# ------------------------------------------------------------------ drawing
def draw_heatmap(
    thumbnail: np.ndarray | None,
    downsample: tuple[float, float],
    coords_level0: np.ndarray,
    tile_size_level0: float,
    scores: np.ndarray,
    alpha: float = 0.55,
) -> np.ndarray:
    """Scores drawn as coloured tiles (JET colormap, min-max scaled per slide) over a thumbnail.

    Args:
        thumbnail: (h, w, 3) uint8 RGB, or None for a white canvas covering the tiles.
        downsample: (dx, dy) level-0 pixels per thumbnail pixel.
        coords_level0: (N, 2) level-0 (x, y) of each tile's top-left corner.
        tile_size_level0: tile side in level-0 pixels.
        scores: (N,) importance per tile.

    Returns:
        (h, w, 3) uint8 RGB.
    """
    coords_level0 = np.asarray(coords_level0, np.float64).reshape(-1, 2)
    dx, dy = downsample
    if thumbnail is None:
        extent = coords_level0.max(0) + tile_size_level0 if len(coords_level0) else (1, 1)
        w, h = int(math.ceil(extent[0] / dx)), int(math.ceil(extent[1] / dy))
        thumbnail = np.full((max(h, 1), max(w, 1), 3), 255, np.uint8)
    canvas = thumbnail.copy()
    overlay = thumbnail.copy()
    scores = np.asarray(scores, np.float64)
    span = scores.max() - scores.min() if len(scores) else 0.0
    scaled = (scores - scores.min()) / span if span > 0 else np.zeros_like(scores)
    colours = cv2.applyColorMap((scaled * 255).astype(np.uint8)[:, None], cv2.COLORMAP_JET)
    colours = colours[:, 0, ::-1]  # BGR -> RGB, (N, 3)
    for (x, y), colour in zip(coords_level0, colours):
        p0 = (int(round(x / dx)), int(round(y / dy)))
        p1 = (
            max(p0[0], int(round((x + tile_size_level0) / dx)) - 1),
            max(p0[1], int(round((y + tile_size_level0) / dy)) - 1),
        )
        cv2.rectangle(overlay, p0, p1, tuple(int(c) for c in colour), thickness=-1)
    covered = np.any(overlay != thumbnail, axis=-1, keepdims=True)
    blended = (alpha * overlay + (1 - alpha) * canvas).astype(np.uint8)
    return np.where(covered, blended, canvas)


def heatmap_canvas_downsample(
    coords_level0: np.ndarray, tile_size_level0: float, max_size: int
) -> tuple[float, float]:
    """(d, d) that fits the tiles' extent into max_size pixels (no thumbnail available)."""
    extent = float(np.max(np.asarray(coords_level0)) + tile_size_level0)
    d = max(1.0, extent / max_size)
    return d, d
