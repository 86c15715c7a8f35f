"""Slide survival: discrete-time negative log-likelihood over quantile time bins; c-index.

The network outputs K logits per slide (K = the DataModule's ``n_time_bins``, 4 by default:
LongViT / Patch-GCN). hazard_k = sigmoid(logit_k) is the probability of the event in bin k
given survival to it; S_k = prod_{j <= k} (1 - hazard_j). For a slide whose time falls in
bin y, the loss (Zadeh & Schmauch, 2020) is

    event observed:  -log S_{y-1} - log hazard_y          (S_{-1} = 1)
    censored:        -log S_y

optionally weighted ``(1 - alpha) * all + alpha * uncensored only``. The risk score is
-sum_k S_k (higher = shorter survival), evaluated with Harrell's concordance index.
"""

from __future__ import annotations

import torch
from torchmetrics import Metric

from longvit.training.heatmap import IMPORTANCE_METHODS, importance_batch, tile_importance
from longvit.training.slide_module import SlideModule


def nll_survival_loss(
    logits: torch.Tensor,
    time_bin: torch.Tensor,
    event: torch.Tensor,
    alpha: float = 0.0,
    eps: float = 1e-7,
) -> torch.Tensor:
    """Mean discrete-time survival NLL. logits (B, K); time_bin (B,) int in [0, K); event (B,)
    1 = observed, 0 = censored."""
    hazards = torch.sigmoid(logits.float())
    survival = torch.cumprod(1 - hazards, dim=1)  # (B, K)
    survival_padded = torch.cat([torch.ones_like(survival[:, :1]), survival], dim=1)
    y = time_bin.long().view(-1, 1)
    c = 1.0 - event.float().view(-1, 1)
    s_before = survival_padded.gather(1, y).clamp(min=eps)  # S_{y-1}
    h_at = hazards.gather(1, y).clamp(min=eps)
    s_at = survival_padded.gather(1, y + 1).clamp(min=eps)  # S_y
    uncensored = -(1 - c) * (torch.log(s_before) + torch.log(h_at))
    censored = -c * torch.log(s_at)
    loss = (1 - alpha) * (uncensored + censored) + alpha * uncensored
    return loss.mean()


def risk_score(logits: torch.Tensor) -> torch.Tensor:
    """(B, K) logits -> (B,) risk = -sum_k S_k (higher = earlier event)."""
    survival = torch.cumprod(1 - torch.sigmoid(logits.float()), dim=1)
    return -survival.sum(dim=1)


def concordance_index(risk: torch.Tensor, time: torch.Tensor, event: torch.Tensor) -> torch.Tensor:
    """Harrell's c-index: over pairs (i, j) with time_i < time_j and event_i = 1, the share
    where risk_i > risk_j (ties in risk count 1/2). NaN when there is no comparable pair."""
    risk, time, event = risk.double(), time.double(), event.bool()
    comparable = (time[:, None] < time[None, :]) & event[:, None]  # (n, n), i earlier
    concordant = (risk[:, None] > risk[None, :]).double() + 0.5 * (risk[:, None] == risk[None, :])
    total = comparable.sum()
    if total == 0:
        return torch.tensor(float("nan"))
    return (concordant * comparable).sum() / total


class ConcordanceIndex(Metric):
    """torchmetrics wrapper of ``concordance_index`` (accumulates risk, time, event)."""

    higher_is_better = True
    full_state_update = False

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.add_state("risk", default=[], dist_reduce_fx="cat")
        self.add_state("time", default=[], dist_reduce_fx="cat")
        self.add_state("event", default=[], dist_reduce_fx="cat")

    def update(self, risk: torch.Tensor, time: torch.Tensor, event: torch.Tensor) -> None:
        self.risk.append(risk.detach().float())
        self.time.append(time.detach().float())
        self.event.append(event.detach().float())

    def compute(self) -> torch.Tensor:
        def cat(x):
            return torch.cat(x) if isinstance(x, list) else x

        return concordance_index(cat(self.risk), cat(self.time), cat(self.event))


class SlideSurvival(SlideModule):
    """Survival prediction from whole slides.

    Args:
        n_time_bins: K, the model's outputs; must equal the DataModule's n_time_bins.
        alpha: weight of the uncensored-only term (0: the plain NLL).
        importance: per-tile importance for predict heatmaps ("attention", "gradxinput" of
            the risk score, or "none").
        **kwargs: ``SlideModule``'s.

    Batches need ``time_bin``, ``event`` and ``time`` (``ManifestDataModule`` task="survival").
    Logged: {train,val,test}/loss, {val,test}/c_index. predict_step returns risk (B,).
    """

    def __init__(
        self, n_time_bins: int = 4, alpha: float = 0.0, importance: str = "attention", **kwargs
    ):
        if n_time_bins < 2:
            raise ValueError(f"model.n_time_bins must be >= 2, got {n_time_bins}")
        if not 0 <= alpha <= 1:
            raise ValueError(f"model.alpha must be in [0, 1], got {alpha}")
        if importance not in IMPORTANCE_METHODS:
            raise ValueError(
                f"model.importance must be one of {IMPORTANCE_METHODS}, got {importance!r}"
            )
        super().__init__(num_classes=n_time_bins, **kwargs)
        self.save_hyperparameters()
        self.n_time_bins, self.alpha, self.importance = n_time_bins, alpha, importance
        self.val_cindex = ConcordanceIndex()
        self.test_cindex = ConcordanceIndex()

    def on_fit_start(self) -> None:
        super().on_fit_start()
        data = getattr(self.trainer, "datamodule", None)
        bins = getattr(data, "n_time_bins", None)
        if bins is not None and bins != self.n_time_bins:
            raise ValueError(
                f"data.n_time_bins ({bins}) and model.n_time_bins ({self.n_time_bins}) differ"
            )

    def _loss(self, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
        logits = self.forward_model(batch)
        return nll_survival_loss(logits, batch["time_bin"], batch["event"], self.alpha), logits

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        loss, _ = self._loss(batch)
        self.log("train/loss", loss, prog_bar=True, batch_size=len(batch["event"]))
        return loss

    def _eval_step(self, batch: dict, metric: ConcordanceIndex, stage: str) -> None:
        loss, logits = self._loss(batch)
        metric.update(risk_score(logits), batch["time"], batch["event"])
        self.log(f"{stage}/loss", loss, prog_bar=True, batch_size=len(batch["event"]))

    def validation_step(self, batch: dict, batch_idx: int) -> None:
        self._eval_step(batch, self.val_cindex, "val")

    def on_validation_epoch_end(self) -> None:
        self.log("val/c_index", self.val_cindex.compute(), prog_bar=True)
        self.val_cindex.reset()

    def test_step(self, batch: dict, batch_idx: int) -> None:
        self._eval_step(batch, self.test_cindex, "test")

    def on_test_epoch_end(self) -> None:
        self.log("test/c_index", self.test_cindex.compute())
        self.test_cindex.reset()

    def predict_step(self, batch: dict, batch_idx: int) -> dict:
        logits = self.forward_model(batch)
        out = {
            "slide_id": batch["slide_id"],
            "risk": risk_score(logits).cpu(),
            "time": batch["time"].cpu() if "time" in batch else None,
            "event": batch["event"].cpu() if "event" in batch else None,
        }
        if self.importance != "none":
            scores = tile_importance(self, batch, self.importance, target=risk_score)
            out.update(importance_batch(batch, scores))
        return out
