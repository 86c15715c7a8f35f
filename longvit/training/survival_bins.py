"""Discrete survival targets: time bins from quantiles of the observed event times.

As in Patch-GCN / MCAT / LongViT's survival fine-tuning, the time axis is cut into
``n_bins`` intervals at the quantiles of the *uncensored* training times; the first edge is 0
and the last infinity, so every time (any split) falls in a bin.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np


def quantile_bin_edges(
    times: Sequence[float], events: Sequence[int], n_bins: int = 4
) -> list[float]:
    """Edges [0, q_1, ..., q_{n-1}, inf] (n_bins + 1 values) from the uncensored times.

    Raises ValueError when fewer than n_bins events are observed (the bins would be empty).
    """
    times, events = np.asarray(times, np.float64), np.asarray(events)
    observed = times[events == 1]
    if len(observed) < n_bins:
        raise ValueError(
            f"need at least n_bins={n_bins} observed events (event=1) in the training split "
            f"to place the time bins, got {len(observed)}"
        )
    inner = np.quantile(observed, np.linspace(0, 1, n_bins + 1)[1:-1])
    return [0.0, *(float(q) for q in inner), float("inf")]


def time_to_bin(time: float, edges: Sequence[float]) -> int:
    """Index of the bin [edges[i], edges[i + 1]) holding ``time``."""
    return int(np.clip(np.searchsorted(edges, time, side="right") - 1, 0, len(edges) - 2))
