"""A captioner learns a report that depends on the slide: the label lives in one tile.

Synthetic slides of 40-56 noise tiles (16 dims); a positive slide holds one marker tile.
A tiny captioner trains on the reports, then writes the held-out slides' reports greedily:
with its memory they name the finding, with the memory zeroed (the decoder alone) they
cannot beat chance.
"""

import csv

import h5py
import numpy as np
import torch

from longvit.demo.feature_cohort import make_feature_cohort
from longvit.training.captioning import SlideCaptioningModule
from longvit.training.feature_statistics import feature_statistics
from longvit.training.text_data import (
    IGNORE_INDEX,
    SlideTextDataset,
    collate_slide_text,
    read_manifest,
)

REPORTS = {"0": "benign", "1": "focus"}
STEPS = 400


def _cohort(tmp_path):
    manifest = make_feature_cohort(
        tmp_path, n_slides=48, tiles=(40, 56), dim=16, task="rare", n_markers=1, signal=6.0,
        splits=(0.67, 0.0, 0.33), seed=1,
    )  # fmt: skip
    rows = list(csv.DictReader(manifest.open()))
    reports = tmp_path / "reports.csv"
    with reports.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=[*rows[0], "text"])
        writer.writeheader()
        writer.writerows([dict(r, text=REPORTS[r["label"]]) for r in rows])
    return reports


def _train_and_score(reports, zero_memory: bool) -> float:
    torch.manual_seed(0)
    module = SlideCaptioningModule(
        encoder_kwargs=dict(in_chans=16, embed_dim=32, depth=1, num_heads=2),
        decoder_kwargs=dict(embed_dim=32, depth=1, num_heads=2, segment_lengths=[16],
                            dilation_rates=[1]),
        tokenizer="byte",
    )  # fmt: skip
    model = module.model
    if zero_memory:
        encode = model.encode
        model.encode = lambda *a: (lambda m, mask: (torch.zeros_like(m), mask))(*encode(*a))
    train_rows = read_manifest(reports, "train")
    model.set_feature_statistics(*feature_statistics([r["features"] for r in train_rows]))
    train = SlideTextDataset(train_rows, module.tokenizer)
    test = SlideTextDataset(read_manifest(reports, "test"), module.tokenizer)
    items = [train[i] for i in range(len(train))]
    opt = torch.optim.AdamW(module.parameters(), lr=2e-3, betas=(0.9, 0.98))
    warmup = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: min(1.0, (step + 1) / 50))
    gen = torch.Generator().manual_seed(0)
    for _ in range(STEPS):
        pick = torch.randint(len(items), (8,), generator=gen).tolist()
        b = collate_slide_text([items[i] for i in pick], module.tokenizer.pad_id)
        loss = model.loss(b["features"], b["coords"], b["tokens"], b["targets"],
                          b["padding_mask"], ignore_index=IGNORE_INDEX)  # fmt: skip
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(module.parameters(), 1.0)
        opt.step()
        warmup.step()
    b = collate_slide_text([test[i] for i in range(len(test))], module.tokenizer.pad_id)
    texts = module.generate_text(b["features"], b["coords"], b["padding_mask"],
                                 max_new_tokens=8, temperature=0.0)  # fmt: skip
    return sum(t == ref for t, ref in zip(texts, b["texts"])) / len(texts)


def test_report_follows_the_slide_and_not_without_its_memory(tmp_path):
    reports = _cohort(tmp_path)
    assert _train_and_score(reports, zero_memory=False) >= 0.9
    assert _train_and_score(reports, zero_memory=True) <= 0.7  # 16 slides, balanced


def test_feature_statistics_are_the_cohorts_mean_and_std(tmp_path):
    manifest = make_feature_cohort(tmp_path, n_slides=4, tiles=(20, 30), dim=8, scale=3.0)
    paths = [r["features"] for r in read_manifest(manifest)]
    mean, std = feature_statistics(paths)
    x = np.concatenate([h5py.File(p, "r")["features"][:] for p in paths]).astype(np.float64)
    torch.testing.assert_close(mean, torch.from_numpy(x.mean(0)).float(), rtol=0, atol=1e-5)
    torch.testing.assert_close(std, torch.from_numpy(x.std(0)).float(), rtol=0, atol=1e-5)
    sub_mean, _ = feature_statistics(paths, max_tiles_per_slide=5)  # a bounded read per slide
    assert not torch.equal(sub_mean, mean)
