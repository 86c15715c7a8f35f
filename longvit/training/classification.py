"""Slide classification: cross-entropy with label smoothing; AUROC, balanced accuracy, accuracy."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torchmetrics import MetricCollection
from torchmetrics.classification import MulticlassAccuracy, MulticlassAUROC

from longvit.training.heatmap import IMPORTANCE_METHODS, importance_batch, tile_importance
from longvit.training.slide_module import SlideModule


class SlideClassifier(SlideModule):
    """Classify whole slides (feature or pixel batches; see ``SlideModule.forward_model``).

    Args:
        num_classes: number of classes C (>= 2); must match the manifest's labels.
        label_smoothing: cross-entropy label smoothing in [0, 1).
        importance: per-tile importance written by ``predict`` for the heatmaps:
            "attention" (the class token's or the mean query's attention in the last block),
            "gradxinput" (|gradient x input| of the predicted class at the first block's input
            tokens) or "none".
        **kwargs: ``SlideModule``'s (model_name, model_kwargs, lr, layer_decay, ...).

    Logged: {train,val,test}/loss, and for val / test auroc (macro one-vs-rest), bal_acc,
    acc. predict_step returns slide ids, probabilities (B, C), predicted class, and the tile
    importance (B, N) with the batch's coordinates.
    """

    def __init__(
        self,
        num_classes: int = 2,
        label_smoothing: float = 0.0,
        importance: str = "attention",
        **kwargs,
    ):
        if num_classes < 2:
            raise ValueError(f"model.num_classes must be >= 2, got {num_classes}")
        if not 0 <= label_smoothing < 1:
            raise ValueError(f"model.label_smoothing must be in [0, 1), got {label_smoothing}")
        if importance not in IMPORTANCE_METHODS:
            raise ValueError(
                f"model.importance must be one of {IMPORTANCE_METHODS}, got {importance!r}"
            )
        super().__init__(num_classes=num_classes, **kwargs)
        self.save_hyperparameters()
        self.num_classes, self.label_smoothing, self.importance = (
            num_classes,
            label_smoothing,
            importance,
        )
        metrics = MetricCollection(
            {
                "auroc": MulticlassAUROC(num_classes, average="macro"),
                "bal_acc": MulticlassAccuracy(num_classes, average="macro"),
                "acc": MulticlassAccuracy(num_classes, average="micro"),
            }
        )
        self.val_metrics = metrics.clone(prefix="val/")
        self.test_metrics = metrics.clone(prefix="test/")

    def on_fit_start(self) -> None:
        super().on_fit_start()
        self.check_classes()

    def on_test_start(self) -> None:
        self.check_data()
        self.check_classes()

    def check_classes(self) -> None:
        data = getattr(self.trainer, "datamodule", None)
        manifest = getattr(data, "manifest", None)
        if manifest is not None and manifest.class_names:
            if len(manifest.class_names) > self.num_classes:
                raise ValueError(
                    f"the manifest {manifest.path} has {len(manifest.class_names)} classes "
                    f"{manifest.class_names} but model.num_classes is {self.num_classes}"
                )

    def loss(self, logits: torch.Tensor, label: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(logits.float(), label, label_smoothing=self.label_smoothing)

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        loss = self.loss(self.forward_model(batch), batch["label"])
        self.log("train/loss", loss, prog_bar=True, batch_size=len(batch["label"]))
        return loss

    def _eval_step(self, batch: dict, metrics: MetricCollection, stage: str) -> None:
        logits = self.forward_model(batch).float()
        loss = self.loss(logits, batch["label"])
        metrics.update(logits.softmax(-1), batch["label"])
        self.log(f"{stage}/loss", loss, prog_bar=True, batch_size=len(batch["label"]))

    def validation_step(self, batch: dict, batch_idx: int) -> None:
        self._eval_step(batch, self.val_metrics, "val")

    def on_validation_epoch_end(self) -> None:
        self.log_dict(self.val_metrics.compute(), prog_bar=True)
        self.val_metrics.reset()

    def test_step(self, batch: dict, batch_idx: int) -> None:
        self._eval_step(batch, self.test_metrics, "test")

    def on_test_epoch_end(self) -> None:
        self.log_dict(self.test_metrics.compute())
        self.test_metrics.reset()

    def predict_step(self, batch: dict, batch_idx: int) -> dict:
        logits = self.forward_model(batch).float()
        probs = logits.softmax(-1)
        out = {
            "slide_id": batch["slide_id"],
            "probs": probs.cpu(),
            "pred": probs.argmax(-1).cpu(),
            "label": batch["label"].cpu() if "label" in batch else None,
        }
        if self.importance != "none":
            scores = tile_importance(self, batch, self.importance, target=out["pred"])
            out.update(importance_batch(batch, scores))
        return out
