"""Pixel mode: each slide streamed as one sequence of LongViT's 32 x 32 pixel patches.

Per item, ``longvit.slides.read_patch_sequence`` reads the slide's tissue patches at
``target_mpp`` block by block (never a whole level). In training at most ``max_tokens`` patches
are kept, a random subset drawn from the item's seed before any pixel is read. Augmentation is
albumentations applied to the whole sequence at once (the patches laid side by side in one
strip), so a colour transform shifts the slide's stain consistently; geometric transforms that
would move content between patches do not belong here (positions stay as read).

Batch: ``patches`` (B, N, 3, P, P) uint8, ``positions`` (B, N, 2) int64 (x, y) = (col, row)
on the slide's patch grid, ``grid_size`` (B, 2) (rows, cols) of that grid (the learned position
table is stretched over it), ``coords_level0`` (B, N, 2), ``padding_mask`` (B, N), targets.
"""

from __future__ import annotations

import os

import numpy as np
import torch
from torch.utils.data import Dataset

from longvit.slides import Slide, SlideError, TissueMask, read_patch_sequence
from longvit.training.datamodule import ManifestDataModule
from longvit.training.manifest import ManifestError, ManifestRow
from longvit.training.sampling import split_key


def default_augmentation():
    """LongViT-style colour augmentation for H&E: brightness / contrast / hue-saturation."""
    import albumentations as A

    return A.Compose(
        [
            A.RandomBrightnessContrast(brightness_limit=0.1, contrast_limit=0.1, p=0.8),
            A.HueSaturationValue(hue_shift_limit=8, sat_shift_limit=12, val_shift_limit=8, p=0.8),
        ]
    )


def augment_sequence(patches: np.ndarray, transform, seed: int) -> np.ndarray:
    """Apply one albumentations transform to all patches (N, P, P, 3) uint8 with shared draws."""
    if len(patches) == 0:
        return patches
    n, p = patches.shape[:2]
    strip = np.ascontiguousarray(patches.reshape(n * p, p, 3))
    transform.set_random_seed(seed)
    out = transform(image=strip)["image"]
    if out.shape != strip.shape:
        raise ValueError(
            f"the augmentation changed the patch strip's shape {strip.shape} -> {out.shape}; "
            f"use pixel-wise (colour) transforms in pixel mode"
        )
    return out.reshape(n, p, p, 3)


class PixelSlideDataset(Dataset):
    """One item per slide: its tissue patches (see the module docstring for the fields)."""

    def __init__(
        self,
        rows: list[ManifestRow],
        targets,
        *,
        target_mpp: float,
        patch_size: int,
        min_tissue: float,
        max_tokens: int | None,
        mpp_override: float | None,
        detect_tissue: bool,
        transform=None,
    ):
        self.rows, self.targets = rows, targets
        self.target_mpp, self.patch_size, self.min_tissue = target_mpp, patch_size, min_tissue
        self.max_tokens, self.mpp_override = max_tokens, mpp_override
        self.detect_tissue, self.transform = detect_tissue, transform

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, key) -> dict:
        index, seed = split_key(key)
        seed = index if seed is None else seed
        row = self.rows[index]
        with Slide(row.slide, mpp_override=self.mpp_override) as slide:
            tissue = None if self.detect_tissue else TissueMask.everything(slide.dimensions)
            seq = read_patch_sequence(
                slide, self.target_mpp, patch_size=self.patch_size, min_tissue=self.min_tissue,
                tissue=tissue, max_patches=self.max_tokens, seed=seed % 2**32,
            )  # fmt: skip
        if len(seq) == 0:
            raise ManifestError(
                f"{row.slide}: no tissue patch at {self.target_mpp} um/px (min_tissue "
                f"{self.min_tissue}); lower data.min_tissue or remove the slide"
            )
        patches = seq.patches
        if self.transform is not None:
            patches = augment_sequence(patches, self.transform, seed % 2**32)
        grid = seq.grid
        return {
            "patches": torch.from_numpy(np.ascontiguousarray(patches)).permute(0, 3, 1, 2),
            "positions": torch.from_numpy(seq.rowcol[:, ::-1].copy()),  # (row, col) -> (x, y)
            "grid_size": torch.tensor(grid.shape),
            "coords_level0": torch.from_numpy(seq.coords),
            "patch_size_level0": float(grid.tile_size_level0),
            "slide_id": row.slide_id,
            "slide_path": str(row.slide),
            **self.targets(row),
        }


class PixelDataModule(ManifestDataModule):
    """Pixel-mode DataModule: slides named in the manifest's ``slide`` column, streamed.

    Args:
        manifest, task, batch_size, num_workers, max_tokens, max_tokens_eval, n_time_bins,
            seed, predict_split: see ``ManifestDataModule``.
        target_mpp: microns per pixel the patches are read at (LongViT: about 0.5-1.0).
        patch_size: patch side in pixels (LongViT: 32).
        min_tissue: smallest tissue fraction of a kept patch.
        mpp_override: level-0 mpp for slides without usable metadata.
        detect_tissue: False keeps every patch of the slide.
        augment: colour augmentation in training (``default_augmentation``).
    """

    mode = "pixels"

    def __init__(
        self,
        manifest: str | os.PathLike,
        target_mpp: float = 1.0,
        patch_size: int = 32,
        min_tissue: float = 0.5,
        mpp_override: float | None = None,
        detect_tissue: bool = True,
        augment: bool = True,
        **kwargs,
    ):
        super().__init__(manifest, **kwargs)
        if not target_mpp > 0:
            raise ValueError(f"data.target_mpp must be > 0 microns per pixel, got {target_mpp}")
        if patch_size < 1:
            raise ValueError(f"data.patch_size must be >= 1 pixel, got {patch_size}")
        self.target_mpp, self.patch_size, self.min_tissue = target_mpp, patch_size, min_tissue
        self.mpp_override, self.detect_tissue, self.augment = mpp_override, detect_tissue, augment

    def check_inputs(self, rows: list[ManifestRow]) -> None:
        for row in rows:
            try:
                with Slide(row.slide, mpp_override=self.mpp_override) as slide:
                    slide.mpp  # noqa: B018  (raises MissingMPPError naming the override)
            except SlideError as err:
                raise ManifestError(
                    f"{self.manifest_path}, line {row.row}: {err} (set data.mpp_override "
                    f"for slides without mpp metadata)"
                ) from err

    def make_dataset(self, rows: list[ManifestRow], max_tokens: int | None, split: str) -> Dataset:
        training = split == "train"
        return PixelSlideDataset(
            rows, self.targets, target_mpp=self.target_mpp, patch_size=self.patch_size,
            min_tissue=self.min_tissue, max_tokens=max_tokens, mpp_override=self.mpp_override,
            detect_tissue=self.detect_tissue,
            transform=default_augmentation() if (self.augment and training) else None,
        )  # fmt: skip
