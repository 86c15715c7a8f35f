"""What the feature-mode and pixel-mode DataModules share: the manifest, targets, loaders."""

from __future__ import annotations

import os

import lightning.pytorch as pl
from torch.utils.data import DataLoader, Dataset

from longvit.training.collate import pad_collate
from longvit.training.manifest import Manifest, ManifestRow, read_manifest
from longvit.training.sampling import EpochSampler
from longvit.training.splits import fold_column
from longvit.training.survival_bins import quantile_bin_edges, time_to_bin


class ManifestDataModule(pl.LightningDataModule):
    """Base DataModule over a manifest CSV (see ``longvit.training.manifest``).

    Args:
        manifest: the CSV file.
        task: "classification", "survival" or "none" (self-supervised).
        batch_size: slides per batch (padded to the longest; ``padding_mask`` True = padding).
        num_workers: DataLoader worker processes.
        max_tokens: training only: at most this many tokens per slide, a random subset drawn
            anew each epoch (None: all). Bounds memory and acts as augmentation.
        max_tokens_eval: the same for val / test / predict (None: the whole slide).
        n_time_bins: survival: number of quantile time bins.
        seed: seed of the shuffling and token subsets (reproducible across resumes).
        predict_split: the split ``predict`` runs on ("test", "val", "train", "all").
        fold: cross-validation fold k: the splits come from the manifest's ``split_fold<k>``
            column (``longvit split``) instead of ``split``; None: ``split``.
    """

    mode = "features"

    def __init__(
        self,
        manifest: str | os.PathLike,
        task: str = "classification",
        batch_size: int = 1,
        num_workers: int = 0,
        max_tokens: int | None = 4096,
        max_tokens_eval: int | None = None,
        n_time_bins: int = 4,
        seed: int = 0,
        predict_split: str = "test",
        fold: int | None = None,
    ):
        super().__init__()
        if fold is not None and fold < 0:
            raise ValueError(f"data.fold must be >= 0 or null, got {fold}")
        self.fold = fold
        if batch_size < 1:
            raise ValueError(f"data.batch_size must be >= 1, got {batch_size}")
        for name, value in (("max_tokens", max_tokens), ("max_tokens_eval", max_tokens_eval)):
            if value is not None and value < 1:
                raise ValueError(f"data.{name} must be >= 1 or null (no limit), got {value}")
        if predict_split not in ("train", "val", "test", "all", "predict"):
            raise ValueError(
                f"data.predict_split must be train, val, test, predict or all, got "
                f"{predict_split!r}"
            )
        self.manifest_path = manifest
        self.task, self.batch_size, self.num_workers = task, batch_size, num_workers
        self.max_tokens, self.max_tokens_eval = max_tokens, max_tokens_eval
        self.n_time_bins, self.seed, self.predict_split = n_time_bins, seed, predict_split
        self.manifest: Manifest | None = None
        self.bin_edges: list[float] | None = None
        self.datasets: dict[str, Dataset] = {}

    # ------------------------------------------------------------------ setup
    def load_manifest(self) -> Manifest:
        """Read and validate the manifest (every named file must exist); idempotent."""
        if self.manifest is None:
            column = "split" if self.fold is None else fold_column(self.fold)
            self.manifest = read_manifest(
                self.manifest_path, mode=self.mode, task=self.task, split_column=column
            )
            if self.task == "survival":
                train = self.manifest.split("train")
                self.bin_edges = quantile_bin_edges(
                    [r.time for r in train], [r.event for r in train], self.n_time_bins
                )
            self.check_inputs(self.manifest.rows)
        return self.manifest

    def setup(self, stage: str | None = None) -> None:
        manifest = self.load_manifest()
        for split in ("train", "val", "test", "predict"):
            source = self.predict_split if split == "predict" else split
            rows = manifest.split(source)
            if rows:
                train = split == "train"
                self.datasets[split] = self.make_dataset(
                    rows, self.max_tokens if train else self.max_tokens_eval, split
                )

    @property
    def num_classes(self) -> int:
        return len(self.load_manifest().class_names)

    def targets(self, row: ManifestRow) -> dict:
        """The target fields of one item for the task."""
        if self.task == "classification":
            return {"label": row.label}
        if self.task == "survival":
            return {
                "time": float(row.time),
                "event": int(row.event),
                "time_bin": time_to_bin(row.time, self.bin_edges),
            }
        return {}

    # ------------------------------------------------------------- subclasses
    def check_inputs(self, rows: list[ManifestRow]) -> None:
        """Open every input once and raise naming the file if it cannot be used."""

    def make_dataset(self, rows: list[ManifestRow], max_tokens: int | None, split: str) -> Dataset:
        """The Dataset of one split ("train", "val", "test", "predict") (subclasses)."""
        raise NotImplementedError(f"{type(self).__name__} must define make_dataset")

    # ---------------------------------------------------------------- loaders
    def _loader(self, split: str, shuffle: bool) -> DataLoader:
        if split not in self.datasets:
            raise ValueError(
                f"the manifest {self.manifest_path} has no rows with split "
                f"{self.predict_split if split == 'predict' else split!r}"
            )
        dataset = self.datasets[split]
        return DataLoader(
            dataset,
            batch_size=self.batch_size,
            sampler=EpochSampler(len(dataset), shuffle=shuffle, seed=self.seed),
            num_workers=self.num_workers,
            collate_fn=pad_collate,
            persistent_workers=self.num_workers > 0,
        )

    def train_dataloader(self) -> DataLoader:
        return self._loader("train", shuffle=True)

    def val_dataloader(self) -> DataLoader:
        return self._loader("val", shuffle=False)

    def test_dataloader(self) -> DataLoader:
        return self._loader("test", shuffle=False)

    def predict_dataloader(self) -> DataLoader:
        return self._loader("predict", shuffle=False)
