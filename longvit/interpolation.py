"""F.interpolate's resampling weights, read off the call itself.

Resizing an identity basis with the same F.interpolate call gives that call's operator as a
matrix, whatever kernel computes it (antialiasing, borders and mode included). The position
embeddings (``models.pos_embed``) and the extractor's fused preprocessing
(``extract.fused_preprocess``) sample their resizes through it.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def interpolation_matrix(
    size_in: int,
    size_out: int,
    mode: str = "bicubic",
    dtype: torch.dtype = torch.float32,
    antialias: bool = True,
) -> torch.Tensor:
    """(size_out, size_in): the 1-D resize of ``F.interpolate(..., mode=mode)`` along one
    axis of an image (align_corners=False and antialiased unless antialias=False, except
    "nearest"), in dtype."""
    # channel j holds e_j along H; W is a dummy axis of 4 kept at 4 (a width of 1 takes
    # another code path in F.interpolate that does not act like the 2-D resize)
    basis = torch.eye(size_in, dtype=dtype)[None, :, :, None].expand(1, size_in, size_in, 4)
    extra = {} if mode == "nearest" else {"antialias": antialias, "align_corners": False}
    resized = F.interpolate(basis.contiguous(), size=(size_out, 4), mode=mode, **extra)
    return resized[0, :, :, 0].T.contiguous()
