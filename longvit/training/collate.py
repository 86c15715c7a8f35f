"""Batching slides of different lengths: pad every token sequence, return a padding mask.

A batch is a dict of tensors (plus lists of strings such as ``slide_id``). Sequence fields
(B, N, ...) are padded with zeros at the end to the longest slide's N, and
``padding_mask`` (B, N) bool is True at the padding, the convention of every longvit model.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

# per-token fields of an item: (N, ...) tensors padded together
SEQUENCE_KEYS = ("features", "coords", "coords_level0", "patches", "positions", "rowcol")


def pad_collate(items: Sequence[dict]) -> dict:
    """Items with per-token tensors (N_i, ...) -> a batch with (B, max N_i, ...) and padding_mask.

    Scalars and equal-shaped tensors are stacked; strings and other objects become lists.
    """
    if not items:
        raise ValueError("pad_collate got an empty list of items")
    batch: dict = {}
    seq_keys = [k for k in SEQUENCE_KEYS if k in items[0]]
    lengths = torch.tensor([len(it[seq_keys[0]]) for it in items]) if seq_keys else None
    for key in items[0]:
        values = [it[key] for it in items]
        if key in seq_keys:
            batch[key] = pad_sequences(values)
        elif isinstance(values[0], torch.Tensor):
            batch[key] = torch.stack(values)
        elif isinstance(values[0], (int, float)) and not isinstance(values[0], bool):
            batch[key] = torch.tensor(values)
        else:
            batch[key] = list(values)
    if lengths is not None:
        n = int(lengths.max())
        batch["padding_mask"] = torch.arange(n)[None, :] >= lengths[:, None]
    return batch


def pad_sequences(values: Sequence[torch.Tensor]) -> torch.Tensor:
    """(N_i, ...) tensors -> (B, max N_i, ...) zero-padded at the end of each sequence."""
    n = max(v.shape[0] for v in values)
    out = values[0].new_zeros((len(values), n, *values[0].shape[1:]))
    for i, v in enumerate(values):
        out[i, : v.shape[0]] = v
    return out
