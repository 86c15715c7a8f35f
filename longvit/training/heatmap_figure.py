"""The heatmap PNG a pathologist opens: the slide thumbnail, the heatmap beside it, a colour bar.

    +-------------------------------------------------------------+
    | slide_017   tile importance (attention)                     |
    | +-----------+  +-----------+   _ 3.2e-02  (max)             |
    | | thumbnail |  |  heatmap  |  | |                           |
    | |           |  |           |  | | 1.7e-02                   |
    | +-----------+  +-----------+  |_| 1.1e-03  (min)            |
    +-------------------------------------------------------------+

The colour bar is the colour map ``draw_heatmap`` uses (JET, min-max scaled per slide), labelled
with the raw score values at its ends and middle. Drawn with OpenCV only.
"""

from __future__ import annotations

import cv2
import numpy as np

WHITE = (255, 255, 255)
BLACK = (20, 20, 20)
FONT = cv2.FONT_HERSHEY_SIMPLEX


def colour_bar(height: int, width: int = 18) -> np.ndarray:
    """(height, width, 3) uint8 RGB: JET from its top (1.0, red) to its bottom (0.0, blue)."""
    ramp = np.linspace(255, 0, max(height, 2)).astype(np.uint8)[:, None]
    bar = cv2.applyColorMap(ramp, cv2.COLORMAP_JET)[:, :, ::-1]  # (height, 1, 3) RGB
    return np.ascontiguousarray(np.repeat(bar, width, axis=1))


def _text(canvas: np.ndarray, text: str, org: tuple[int, int], scale: float, bold: int = 1):
    cv2.putText(canvas, text, org, FONT, scale, BLACK, bold, cv2.LINE_AA)


def heatmap_figure(
    thumbnail: np.ndarray | None,
    heatmap: np.ndarray,
    score_range: tuple[float, float],
    title: str = "",
    label: str = "tile importance",
) -> np.ndarray:
    """Thumbnail | heatmap | labelled colour bar, under a title line; (H, W, 3) uint8 RGB.

    Args:
        thumbnail: (h, w, 3) RGB of the slide, or None (no slide: the heatmap alone).
        heatmap: (h, w, 3) RGB from ``draw_heatmap`` (same size as the thumbnail).
        score_range: (min, max) raw scores that the colour map's ends stand for.
        title: the first words of the title line (e.g. the slide id).
        label: what the colours measure (the colour bar's caption).
    """
    h, w = heatmap.shape[:2]
    scale = float(np.clip(max(h, w) / 900, 0.45, 1.0))  # font scale for the figure's size
    line = int(round(28 * scale)) + 6
    margin = 12
    bar_h = max(40, int(h * 0.8))
    bar = colour_bar(bar_h, width=max(14, int(18 * scale)))
    lo, hi = score_range
    ticks = [(hi, 0.0, "(max)"), ((lo + hi) / 2, 0.5, ""), (lo, 1.0, "(min)")]
    text_w = max(cv2.getTextSize(f"{v:.3g} {s}", FONT, scale, 1)[0][0] for v, _, s in ticks)
    panels = [thumbnail, heatmap] if thumbnail is not None else [heatmap]
    width = margin + len(panels) * (w + margin) + bar.shape[1] + 8 + text_w + margin
    height = line + margin + max(h, bar_h + line) + margin
    canvas = np.full((height, width, 3), WHITE, np.uint8)
    _text(canvas, f"{title}   {label}".strip(), (margin, line - 4), scale * 1.05, 2)
    top = line + margin
    x = margin
    for panel in panels:
        canvas[top : top + h, x : x + w] = panel
        cv2.rectangle(canvas, (x - 1, top - 1), (x + w, top + h), (160, 160, 160), 1)
        x += w + margin
    bar_top = top + (h - bar_h) // 2 if h > bar_h + line else top
    canvas[bar_top : bar_top + bar_h, x : x + bar.shape[1]] = bar
    cv2.rectangle(canvas, (x - 1, bar_top - 1), (x + bar.shape[1], bar_top + bar_h), BLACK, 1)
    for value, at, suffix in ticks:
        y = bar_top + int(round(at * (bar_h - 1)))
        cv2.line(canvas, (x + bar.shape[1], y), (x + bar.shape[1] + 5, y), BLACK, 1)
        baseline = min(max(y + int(6 * scale), line), height - 4)
        _text(canvas, f"{value:.3g} {suffix}".strip(), (x + bar.shape[1] + 8, baseline), scale)
    caption_y = min(bar_top + bar_h + line, height - 4)
    _text(canvas, "per-slide min-max", (x - 2, caption_y), scale * 0.8)
    return canvas
