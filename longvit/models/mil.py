"""Multiple-instance baselines over tile features: gated attention MIL and a mean-pool probe.

The baselines a pathology lab runs beside a slide encoder, with the slide encoders' interface
(``forward_features(features, coords, padding_mask)`` then ``forward_head(x, pre_logits,
padding_mask)``), so ``SlideClassifier(model_name="abmil")`` trains, tests and draws heatmaps
exactly as it does for ``longvit_slide_*``:

- ``abmil``: gated attention MIL (Ilse, Tomczak and Welling, ICML 2018). Each tile feature is
  embedded, h = ReLU(W x) (dropout); a score per tile s = w^T (tanh(V h) * sigmoid(U h)); the
  slide is the attention-weighted mean z = sum_i a_i h_i with a = softmax(s) over the slide's
  tiles (padding excluded); a linear head classifies z. ``tile_attention`` returns a, the map
  the heatmaps draw.
- ``meanpool_linear``: the mean of the slide's tile features, dropout, then a linear head
  (a linear probe of the tile encoder at slide level).

Coordinates are accepted and ignored: both models are permutation invariant.
"""

from __future__ import annotations

import torch
from timm.models import build_model_with_cfg, generate_default_cfgs, register_model
from torch import nn


def masked_softmax(scores: torch.Tensor, padding_mask: torch.Tensor | None) -> torch.Tensor:
    """softmax over tiles (B, N) with padding (True) given weight 0."""
    if padding_mask is not None:
        scores = scores.masked_fill(padding_mask, float("-inf"))
    return torch.softmax(scores.float(), dim=-1).nan_to_num(0.0).to(scores.dtype)


def masked_mean(x: torch.Tensor, padding_mask: torch.Tensor | None) -> torch.Tensor:
    """Mean over tiles of (B, N, C) -> (B, C), padding (True) excluded."""
    if padding_mask is None:
        return x.mean(1)
    valid = (~padding_mask).to(x.dtype)[..., None]  # (B, N, 1)
    return (x * valid).sum(1) / valid.sum(1).clamp(min=1)


class GatedAttention(nn.Module):
    """Per-tile attention scores s = w^T (tanh(V h) * sigmoid(U h)) (gated) or w^T tanh(V h)."""

    def __init__(self, dim: int, attn_dim: int, gated: bool = True, drop: float = 0.0):
        super().__init__()
        self.attention_v = nn.Linear(dim, attn_dim)
        self.attention_u = nn.Linear(dim, attn_dim) if gated else None
        self.drop = nn.Dropout(drop)
        self.attention_w = nn.Linear(attn_dim, 1)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        """(B, N, C) tile embeddings -> (B, N) scores (before the softmax)."""
        a = torch.tanh(self.attention_v(h))
        if self.attention_u is not None:
            a = a * torch.sigmoid(self.attention_u(h))
        return self.attention_w(self.drop(a)).squeeze(-1)


class AttentionMIL(nn.Module):
    """Gated attention MIL over tile features (module docstring).

    Args:
        in_chans: tile feature width D.
        num_classes: outputs of the linear head (0: no head, forward returns z).
        embed_dim: width C of the tile embedding h (Ilse et al.: 500; CLAM: 512).
        attn_dim: width of the attention branch (V and U).
        gated: tanh(V h) * sigmoid(U h) (True) or tanh(V h) (the ungated form).
        drop_rate: dropout on the embeddings and in the attention branch.
    """

    num_prefix_tokens = 0

    def __init__(
        self,
        in_chans: int = 1536,
        num_classes: int = 0,
        embed_dim: int = 512,
        attn_dim: int = 256,
        gated: bool = True,
        drop_rate: float = 0.25,
    ):
        super().__init__()
        self.in_chans, self.num_classes = in_chans, num_classes
        self.num_features = self.head_hidden_size = self.embed_dim = embed_dim
        self.feature_proj = nn.Linear(in_chans, embed_dim)
        self.act = nn.ReLU()
        self.drop = nn.Dropout(drop_rate)
        self.attention = GatedAttention(embed_dim, attn_dim, gated, drop_rate)
        self.head = nn.Linear(embed_dim, num_classes) if num_classes > 0 else nn.Identity()

    def forward_features(
        self,
        features: torch.Tensor,
        coords: torch.Tensor | None = None,
        padding_mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """(B, N, D) tile features -> (B, N, C) tile embeddings h."""
        return self.drop(self.act(self.feature_proj(features)))

    def attention_weights(
        self, h: torch.Tensor, padding_mask: torch.Tensor | None = None
    ) -> torch.Tensor:
        """(B, N, C) embeddings -> (B, N) weights a (sum 1 over each slide's tiles)."""
        return masked_softmax(self.attention(h), padding_mask)

    def forward_head(
        self,
        x: torch.Tensor,
        pre_logits: bool = False,
        padding_mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """(B, N, C) embeddings -> z (B, C) with pre_logits, else the head's (B, num_classes)."""
        a = self.attention_weights(x, padding_mask)
        z = torch.einsum("bn,bnc->bc", a, x)
        return z if pre_logits else self.head(z)

    def forward(
        self,
        features: torch.Tensor,
        coords: torch.Tensor | None = None,
        padding_mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        return self.forward_head(self.forward_features(features, coords, padding_mask),
                                 padding_mask=padding_mask)  # fmt: skip

    @torch.no_grad()
    def tile_attention(
        self,
        features: torch.Tensor,
        coords: torch.Tensor | None = None,
        padding_mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """(B, N) attention weight of each tile (0 at padding): what the heatmaps draw."""
        return self.attention_weights(self.forward_features(features, coords, padding_mask),
                                      padding_mask)  # fmt: skip

    def get_classifier(self) -> nn.Module:
        return self.head

    def reset_classifier(self, num_classes: int, global_pool: str | None = None) -> None:
        self.num_classes = num_classes
        self.head = nn.Linear(self.embed_dim, num_classes) if num_classes > 0 else nn.Identity()

    def no_weight_decay(self) -> set[str]:
        return set()

    def group_matcher(self, coarse: bool = False) -> dict:
        return {"stem": r"^feature_proj", "blocks": [(r"^attention", (0,))]}

    def set_grad_checkpointing(self, enable: bool = True, **kwargs) -> None:
        if enable:
            raise ValueError("the MIL baselines have no blocks to checkpoint; set "
                             "model.grad_checkpointing: false")  # fmt: skip


class MeanPoolLinear(AttentionMIL):
    """Mean of the tile features, dropout, linear head: a slide-level linear probe.

    Args:
        in_chans: tile feature width D (the head reads D values).
        num_classes: outputs of the head (0: forward returns the mean feature).
        drop_rate: dropout on the mean feature.
    """

    def __init__(self, in_chans: int = 1536, num_classes: int = 0, drop_rate: float = 0.0):
        nn.Module.__init__(self)
        self.in_chans, self.num_classes = in_chans, num_classes
        self.num_features = self.head_hidden_size = self.embed_dim = in_chans
        self.drop = nn.Dropout(drop_rate)
        self.head = nn.Linear(in_chans, num_classes) if num_classes > 0 else nn.Identity()

    def forward_features(self, features, coords=None, padding_mask=None) -> torch.Tensor:
        """(B, N, D) tile features, as they are."""
        return features

    def attention_weights(self, h, padding_mask=None) -> torch.Tensor:
        """(B, N) uniform weights 1 / N over each slide's tiles (the mean)."""
        return masked_softmax(torch.zeros(h.shape[:2], dtype=h.dtype, device=h.device),
                              padding_mask)  # fmt: skip

    def forward_head(self, x, pre_logits: bool = False, padding_mask=None) -> torch.Tensor:
        z = self.drop(masked_mean(x, padding_mask))
        return z if pre_logits else self.head(z)

    @torch.no_grad()
    def tile_attention(self, features, coords=None, padding_mask=None) -> torch.Tensor:
        """(B, N) each tile's share of the predicted logit, |w_c . x_i| / N (c: the largest
        logit), which is what a linear probe of the mean attends to."""
        logits = self.forward(features, coords, padding_mask)
        if not isinstance(self.head, nn.Linear):
            return self.attention_weights(features, padding_mask)
        weight = self.head.weight[logits.argmax(-1)]  # (B, D)
        share = torch.einsum("bnd,bd->bn", features, weight).abs()
        return share * self.attention_weights(features, padding_mask)

    def group_matcher(self, coarse: bool = False) -> dict:
        return {"stem": r"^$", "blocks": []}


# ------------------------------------------------------------ registration
def _cfg(**kwargs) -> dict:
    # input_size is (D_in, H, W) of a tile-feature grid, as for the slide encoders
    return {
        "url": "",
        "num_classes": 0,
        "input_size": (1536, 32, 32),
        "pool_size": None,
        "fixed_input_size": False,
        "mean": (0.0,),
        "std": (1.0,),
        "first_conv": None,
        "classifier": "head",
        "license": "mit",
        **kwargs,
    }


default_cfgs = generate_default_cfgs(
    {
        "abmil": _cfg(paper_ids="arXiv:1802.04712",
                      paper_name="Attention-based Deep Multiple Instance Learning"),
        "meanpool_linear": _cfg(),
    }
)  # fmt: skip


def _create(cls: type, variant: str, pretrained: bool = False, **kwargs) -> nn.Module:
    return build_model_with_cfg(cls, variant, pretrained, **kwargs)


@register_model
def abmil(pretrained: bool = False, **kwargs) -> AttentionMIL:
    """Gated attention MIL: embedding 512, attention branch 256, dropout 0.25 (as CLAM)."""
    return _create(AttentionMIL, "abmil", pretrained, **kwargs)


@register_model
def meanpool_linear(pretrained: bool = False, **kwargs) -> MeanPoolLinear:
    """Mean of the tile features, then a linear head."""
    return _create(MeanPoolLinear, "meanpool_linear", pretrained, **kwargs)
