"""The demo's report stage: a slide captioner that writes one sentence per held-out slide.

Every slide's label becomes a report (``REPORTS``); the captioner (``longvit_slide_small``
made tiny, cross-attended by a 2-layer ``longnet_decoder_small`` of width 96, byte tokens)
trains on the training split with ``SlideCaptioningModule`` (tile features standardised with
the training split's statistics) and writes a report for every test slide, greedily, in
batched calls. A report is right when it names its slide's finding: it holds the label word
of its reference (``LABEL_WORDS``) and not the other one.
"""

from __future__ import annotations

import csv
import time
from dataclasses import dataclass, field
from pathlib import Path

REPORTS = {0: "benign tissue, no focus seen", 1: "tissue with a dark focus, suspicious"}
LABEL_WORDS = {0: "benign", 1: "suspicious"}


@dataclass
class ReportResult:
    """What the report stage did: right of total held-out reports, rows, paths, seconds."""

    right: int
    total: int
    rows: list[dict] = field(default_factory=list)  # slide, reference, generated
    reports_csv: Path | None = None
    checkpoint: Path | None = None
    seconds: float = 0.0


def write_reports_manifest(manifest: Path, path: Path) -> Path:
    """The demo manifest with a ``text`` column: each slide's label written as its report
    (``path`` beside ``manifest``: the feature paths are relative to its folder)."""
    with manifest.open(newline="") as f:
        rows = list(csv.DictReader(f))
    with path.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=[*rows[0], "text"])
        writer.writeheader()
        writer.writerows([dict(r, text=REPORTS[int(r["label"])]) for r in rows])
    return path


def names_finding(generated: str, label: int) -> bool:
    """The report holds the label word of its slide's finding and not the other one."""
    text = generated.lower()
    other = LABEL_WORDS[1 - label]
    return LABEL_WORDS[label] in text and other not in text


def train_report_writer(
    manifest: Path,
    out: Path,
    seed: int = 0,
    steps: int = 400,
    batch_size: int = 8,
    accelerator: str = "cpu",
    standardize_features: bool = True,
) -> ReportResult:
    """Train the captioner on the manifest's training split, write the test slides' reports
    to ``out/predictions/reports.csv`` (slide, reference, generated); returns the counts.

    standardize_features=False trains on the raw features (the captioner then writes the
    language without reading the slide: ``longvit.training.feature_statistics``)."""
    import lightning.pytorch as pl
    import torch

    from longvit.training.captioning import SlideCaptioningModule
    from longvit.training.text_data import SlideTextDataModule, collate_slide_text

    start = time.perf_counter()
    reports = write_reports_manifest(manifest, manifest.with_name("reports_manifest.csv"))
    pl.seed_everything(seed, verbose=False)
    data = SlideTextDataModule(str(reports), tokenizer="byte", batch_size=batch_size,
                               max_tiles=256)  # fmt: skip
    feature_dim = data._dataset("train", train=False)[0]["features"].shape[1]
    model = SlideCaptioningModule(
        encoder="longvit_slide_small",
        encoder_kwargs=dict(in_chans=feature_dim, embed_dim=96, depth=2, num_heads=4),
        decoder="longnet_decoder_small",
        decoder_kwargs=dict(
            embed_dim=96, depth=2, num_heads=4, segment_lengths=[64, 128], dilation_rates=[1, 2]
        ),  # fmt: skip
        tokenizer="byte",
        lr=1e-3,
        warmup_steps=max(1, steps // 6),
        standardize_features=standardize_features,
    )
    trainer = pl.Trainer(
        accelerator=accelerator, devices=1, max_steps=steps, logger=False,
        enable_checkpointing=False, limit_val_batches=0, num_sanity_val_steps=0,
        enable_model_summary=False, default_root_dir=out, gradient_clip_val=1.0,
    )  # fmt: skip
    trainer.fit(model, data)
    checkpoint = out / "checkpoints" / "reports.ckpt"
    trainer.save_checkpoint(checkpoint, weights_only=True)

    model.eval()
    test = data._dataset("test", train=False)
    rows, right = [], 0
    for lo in range(0, len(test), 16):
        items = [test[i] for i in range(lo, min(lo + 16, len(test)))]
        batch = collate_slide_text(items, model.tokenizer.pad_id)
        with torch.no_grad():
            texts = model.generate_text(
                batch["features"].to(model.device), batch["coords"].to(model.device),
                batch["padding_mask"].to(model.device), max_new_tokens=48, temperature=0.0,
            )  # fmt: skip
        for row, item, text in zip(test.rows[lo:], items, texts):
            label = int(row["label"])
            right += names_finding(text, label)
            rows.append({"slide": row.get("slide_id") or Path(item["path"]).stem,
                         "reference": item["text"], "generated": text})  # fmt: skip
    reports_csv = out / "predictions" / "reports.csv"
    reports_csv.parent.mkdir(parents=True, exist_ok=True)
    with reports_csv.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=["slide", "reference", "generated"])
        writer.writeheader()
        writer.writerows(rows)
    return ReportResult(right, len(rows), rows, reports_csv, checkpoint,
                        time.perf_counter() - start)  # fmt: skip
