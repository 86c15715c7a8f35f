"""Models: the LongViT pixel encoder and the slide encoder, registered with timm.

Importing this package (``import longvit`` does) registers ``longvit_small``,
``longvit_base``, ``longvit_large``, ``longvit_slide_small`` and
``longvit_slide_base`` so that ``timm.create_model`` builds them, and the multiple-instance
baselines ``abmil`` and ``meanpool_linear`` (``longvit.models.mil``).
"""

from longvit.models.checkpoint import checkpoint_filter_fn
from longvit.models.encoder import DilatedEncoder
from longvit.models.layers import Block, PatchEmbed
from longvit.models.longvit import LongViT, pack_tokens
from longvit.models.mil import AttentionMIL, MeanPoolLinear
from longvit.models.pos_embed import resample_pos_embed, sample_pos_embed, sincos_2d
from longvit.models.slide_encoder import LongViTSlideEncoder

__all__ = [
    "AttentionMIL",
    "Block",
    "DilatedEncoder",
    "LongViT",
    "LongViTSlideEncoder",
    "MeanPoolLinear",
    "PatchEmbed",
    "checkpoint_filter_fn",
    "pack_tokens",
    "resample_pos_embed",
    "sample_pos_embed",
    "sincos_2d",
]
