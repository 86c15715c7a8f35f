"""Survival: the discrete-time NLL against its definition, the c-index against brute force,
quantile bins, and a short fit through the DataModule."""

import itertools
import math

import lightning.pytorch as pl
import numpy as np
import pytest
import torch

from longvit.demo.feature_cohort import make_feature_cohort
from longvit.training import FeatureDataModule, SlideSurvival
from longvit.training.survival import concordance_index, nll_survival_loss, risk_score
from longvit.training.survival_bins import quantile_bin_edges, time_to_bin


def test_nll_matches_definition():
    torch.manual_seed(0)
    logits = torch.randn(6, 4)
    bins = torch.tensor([0, 1, 2, 3, 1, 3])
    event = torch.tensor([1, 1, 0, 1, 0, 0])
    want = []
    for i in range(6):
        h = torch.sigmoid(logits[i]).tolist()
        s = [math.prod(1 - x for x in h[: k + 1]) for k in range(4)]
        y = int(bins[i])
        if event[i]:
            s_before = 1.0 if y == 0 else s[y - 1]
            want.append(-math.log(s_before) - math.log(h[y]))
        else:
            want.append(-math.log(s[y]))
    assert float(nll_survival_loss(logits, bins, event)) == pytest.approx(np.mean(want), rel=1e-5)


def test_c_index_matches_brute_force_and_extremes():
    rng = np.random.default_rng(0)
    time, event, risk = rng.exponential(5, 30), rng.integers(0, 2, 30), rng.normal(size=30)
    risk[3] = risk[4]  # a tie
    num = den = 0.0
    for i, j in itertools.permutations(range(30), 2):
        if time[i] < time[j] and event[i]:
            den += 1
            num += 1.0 if risk[i] > risk[j] else 0.5 if risk[i] == risk[j] else 0.0
    got = concordance_index(*(torch.tensor(a) for a in (risk, time, event)))
    assert float(got) == pytest.approx(num / den)
    t = torch.arange(1.0, 11.0)
    ones = torch.ones(10)
    assert float(concordance_index(-t, t, ones)) == 1.0  # earlier = riskier
    assert float(concordance_index(t, t, ones)) == 0.0


def test_bins_from_uncensored_quantiles():
    edges = quantile_bin_edges([1, 2, 3, 4, 5, 100], [1, 1, 1, 1, 1, 0], n_bins=4)
    assert edges[0] == 0 and edges[-1] == math.inf and len(edges) == 5
    assert edges[1:4] == pytest.approx([2, 3, 4])  # quantiles of 1..5, not of 100
    assert [time_to_bin(t, edges) for t in (0.5, 2.5, 4.5, 1e9)] == [0, 1, 3, 3]
    with pytest.raises(ValueError, match="at least n_bins=4 observed events"):
        quantile_bin_edges([1, 2, 3], [1, 1, 0], 4)


def test_risk_is_higher_for_early_hazard():
    early = torch.tensor([[5.0, 0.0, 0.0, 0.0]])
    late = torch.tensor([[-5.0, -5.0, -5.0, 5.0]])
    assert risk_score(early) > risk_score(late)


def test_fit_survival_learns_the_marker_risk(tmp_path):
    manifest = make_feature_cohort(
        tmp_path, n_slides=40, tiles=(20, 30), dim=8, task="survival", signal=8.0,
        splits=(0.7, 0.3, 0.0),
    )  # fmt: skip
    pl.seed_everything(0)
    data = FeatureDataModule(manifest, task="survival", batch_size=2, max_tokens=None)
    model = SlideSurvival(  # no sub-LN: a tiny model learns faster without it
        model_kwargs=dict(in_chans=8, embed_dim=32, depth=2, num_heads=4, class_token=False,
                          global_pool="avg", sub_ln=False),
        lr=1e-2, importance="none",
    )  # fmt: skip
    trainer = pl.Trainer(
        accelerator="cpu", max_epochs=10, logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False,
    )  # fmt: skip
    trainer.fit(model, data)
    batch = next(iter(data.val_dataloader()))
    assert set(batch) >= {"time", "event", "time_bin", "padding_mask"}
    assert float(trainer.callback_metrics["val/c_index"]) > 0.65
