"""Slide-conditioned text generation: a slide encoder whose tokens a LongNet decoder cross-attends.

Why cross-attention rather than a prefix. A prefix would put the slide's N
tokens (10^3 - 10^5 tiles) in front of the text in the decoder's own causal
sequence; dilated attention then lets a text token see the slide tokens of its
own segments only, sparsely (1 in r) for all but the smallest segment, and
none at all once the slide is longer than the largest segment: the text would
be conditioned on a dilated sample of the slide's last tiles. (Compressing the
slide to a few prefix tokens avoids that but throws the tile tokens away.)
Cross-attention gives every text token dense, exact attention over all N slide
tokens at O(T N) cost (T, the report length, is short), the slide's keys and
values are computed once per generated report, the decoder's self-attention
stays the plain language model (positions start at the report's first token),
and with gated cross-attention a pretrained LongNet LM is the starting point
unchanged.

The memory is the encoder's per-tile tokens, not a pooled vector: a label that lives in a
few tiles (a small focus) survives in them, where a mean over the slide would dilute it by
the tile count. The tile features are standardised per dimension before the encoder
(``set_feature_statistics``, the training cohort's mean and std; identity until set): with
raw, uncentred encoder features the tile-to-tile differences are a few percent of each
memory token, beside the position embedding, and the decoder learns the report's language
while ignoring the slide (``longvit.training.feature_statistics``).
"""

from __future__ import annotations

import torch
from torch import nn

from longvit.models.decoder import LongNetDecoder


class SlideCaptioner(nn.Module):
    """Slide encoder (tile features + coords) -> memory tokens -> cross-attending decoder.

    Args:
        encoder: a ``LongViTSlideEncoder`` (its ``forward_features`` gives the
            memory (B, 1 + N, C_enc): class token and tile tokens).
        decoder: a ``LongNetDecoder`` built with cross_attention=True and
            memory_dim = C_enc.
    """

    def __init__(self, encoder: nn.Module, decoder: LongNetDecoder):
        super().__init__()
        if decoder.cross_blocks is None:
            raise ValueError("decoder must be built with cross_attention=True")
        if decoder.memory_dim != encoder.embed_dim:
            raise ValueError(
                f"decoder memory_dim ({decoder.memory_dim}) must equal the encoder width "
                f"({encoder.embed_dim})"
            )
        self.encoder = encoder
        self.decoder = decoder
        d_in = int(encoder.in_chans)
        # per-dimension standardisation of the tile features (identity until set)
        self.register_buffer("feature_mean", torch.zeros(d_in))
        self.register_buffer("feature_std", torch.ones(d_in))
        self.register_buffer("feature_statistics_set", torch.tensor(False))

    @torch.no_grad()
    def set_feature_statistics(self, mean: torch.Tensor, std: torch.Tensor) -> None:
        """Standardise tile features as (features - mean) / std; mean, std (D_in,)."""
        d_in = self.feature_mean.shape[0]
        if tuple(mean.shape) != (d_in,) or tuple(std.shape) != (d_in,):
            raise ValueError(
                f"feature statistics must have shape ({d_in},) (the encoder's in_chans), got "
                f"mean {tuple(mean.shape)} and std {tuple(std.shape)}"
            )
        if not bool((std > 0).all()):
            raise ValueError("feature statistics: std must be positive in every dimension")
        self.feature_mean.copy_(mean)
        self.feature_std.copy_(std)
        self.feature_statistics_set.fill_(True)

    def encode(
        self,
        features: torch.Tensor,
        coords: torch.Tensor,
        padding_mask: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """features (B, N, D_in), coords (B, N, 2) tile-grid (x, y), padding_mask (B, N) ->
        (memory (B, P + N, C_enc), memory_padding_mask (B, P + N) or None), P prefix tokens."""
        features = (features - self.feature_mean.to(features.dtype)) / self.feature_std.to(
            features.dtype
        )
        memory = self.encoder.forward_features(features, coords, padding_mask)
        if padding_mask is None:
            return memory, None
        prefix = memory.shape[1] - padding_mask.shape[1]
        return memory, torch.cat([padding_mask.new_zeros(memory.shape[0], prefix),
                                  padding_mask], dim=1)  # fmt: skip

    def forward(self, features, coords, tokens, padding_mask=None) -> torch.Tensor:
        """Tile features + text tokens (B, T) -> logits (B, T, vocab_size)."""
        memory, memory_mask = self.encode(features, coords, padding_mask)
        return self.decoder(tokens, memory, memory_mask)

    def loss(self, features, coords, tokens, targets, padding_mask=None, ignore_index=-100):
        """Mean next-token cross-entropy; targets (B, T) with ignore_index on padding."""
        memory, memory_mask = self.encode(features, coords, padding_mask)
        return self.decoder.loss(tokens, targets, memory, memory_mask, ignore_index=ignore_index)

    @torch.no_grad()
    def generate(
        self,
        features: torch.Tensor,
        coords: torch.Tensor,
        prompt: torch.Tensor,
        max_new_tokens: int,
        padding_mask: torch.Tensor | None = None,
        **sampling,
    ) -> torch.Tensor:
        """prompt (B, T0) (e.g. the start token) -> (B, T0 + max_new_tokens).

        The slide is encoded once; ``sampling`` goes to ``LongNetDecoder.generate``
        (temperature, top_k, top_p, stop_token, generator).
        """
        was_training = self.training
        self.eval()
        try:
            memory, memory_mask = self.encode(features, coords, padding_mask)
            return self.decoder.generate(
                prompt, max_new_tokens, memory=memory, memory_padding_mask=memory_mask,
                **sampling,
            )  # fmt: skip
        finally:
            self.train(was_training)
