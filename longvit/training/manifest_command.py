"""``longvit manifest``: a manifest from a folder of slides and a labels CSV.

    longvit manifest slides/ --labels labels.csv --features features/ --out manifest.csv
    longvit manifest slides/ --labels tcga_brca_labels.csv --key patient --patient-from tcga \\
        --features features/ --out brca.csv && longvit split brca.csv --folds 5

Each slide file (.svs, .tif, .tiff, .ndpi, .mrxs, .scn, .vms, .bif, .svslide) of the folder
(``--recursive`` for subfolders) is matched to a row of the labels CSV by its file stem
(``--key slide_id``, the default) or by its patient (``--key patient``): the ``patient`` column
of that CSV, and for the slide the TCGA case barcode, the first 12 characters of its name
(``--patient-from tcga``: TCGA-XX-XXXX), or the whole stem. Every other column of the labels CSV
(label, time, event, ...) is copied. ``split`` is ``train`` unless the labels CSV has one: make
folds with ``longvit split``. Slides without a label row are listed and left out; labels
without a slide are counted.
"""

from __future__ import annotations

import argparse
import csv
import os
import sys
from pathlib import Path

SLIDE_SUFFIXES = (".svs", ".tif", ".tiff", ".ndpi", ".mrxs", ".scn", ".vms", ".bif", ".svslide")


def patient_of(stem: str, rule: str) -> str:
    """The patient id of a slide file stem: "tcga" (first 12 characters) or "stem"."""
    return stem[:12] if rule == "tcga" else stem


def build_manifest(
    slides_dir: str | os.PathLike,
    labels_csv: str | os.PathLike,
    out: str | os.PathLike,
    *,
    key: str = "slide_id",
    patient_from: str = "stem",
    features_dir: str | os.PathLike | None = None,
    recursive: bool = False,
) -> tuple[Path, list[str], int]:
    """Write the manifest; return (its path, slides without labels, labels without slides)."""
    slides_dir, out = Path(slides_dir), Path(out).absolute()
    if not slides_dir.is_dir():
        raise FileNotFoundError(f"{slides_dir}: not a folder of slides")
    pattern = "**/*" if recursive else "*"
    slides = sorted(p for p in slides_dir.glob(pattern) if p.suffix.lower() in SLIDE_SUFFIXES)
    if not slides:
        raise FileNotFoundError(f"{slides_dir}: no slide files ({', '.join(SLIDE_SUFFIXES)})")
    with Path(labels_csv).open(newline="") as f:
        reader = csv.DictReader(f)
        header = [h.strip() for h in reader.fieldnames or []]
        labels = [{(k or "").strip(): (v or "").strip() for k, v in r.items()} for r in reader]
    column = "slide_id" if key == "slide_id" else "patient"
    if column not in header:
        raise ValueError(f"{labels_csv}: no column {column!r} to match slides by (--key "
                         f"{key}); the header has {header}")  # fmt: skip
    by_key = {r[column]: r for r in labels}
    rows, unlabelled, used = [], [], set()
    for slide in slides:
        patient = patient_of(slide.stem, patient_from)
        match = by_key.get(slide.stem if key == "slide_id" else patient)
        if match is None:
            unlabelled.append(slide.name)
            continue
        used.add(match[column])
        row = {"slide_id": slide.stem, "patient": patient,
               "slide": os.path.relpath(slide.absolute(), out.parent)}  # fmt: skip
        if features_dir is not None:
            feature = Path(features_dir).absolute() / f"{slide.stem}.h5"
            row["features"] = os.path.relpath(feature, out.parent)
        row.update({k: v for k, v in match.items() if k not in ("slide_id", "slide")})
        row.setdefault("split", "train")
        row["split"] = row["split"] or "train"
        rows.append(row)
    if not rows:
        raise ValueError(f"no slide of {slides_dir} matches a row of {labels_csv} by {column}")
    columns: list[str] = []
    for row in rows:
        columns += [k for k in row if k not in columns]
    out.parent.mkdir(parents=True, exist_ok=True)
    with out.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=columns)
        writer.writeheader()
        writer.writerows(rows)
    return out, unlabelled, len(set(by_key) - used)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="longvit manifest", description="A manifest CSV from a slide folder and labels."
    )
    p.add_argument("slides", help="folder of whole-slide images")
    p.add_argument("--labels", required=True, help="CSV with slide_id or patient, and labels")
    p.add_argument("--out", required=True, help="the manifest CSV to write")
    p.add_argument(
        "--key",
        choices=("slide_id", "patient"),
        default="slide_id",
        help="match labels by slide file stem (default) or by patient",
    )
    p.add_argument(
        "--patient-from",
        choices=("stem", "tcga"),
        default="stem",
        help="patient of a slide: its stem, or TCGA's 12-character case barcode",
    )
    p.add_argument("--features", help="folder of the slides' feature files (<stem>.h5)")
    p.add_argument("--recursive", action="store_true", help="look for slides in subfolders")
    args = p.parse_args(argv)  # fmt: skip
    try:
        out, unlabelled, unused = build_manifest(
            args.slides, args.labels, args.out, key=args.key, patient_from=args.patient_from,
            features_dir=args.features, recursive=args.recursive,
        )  # fmt: skip
    except (ValueError, OSError) as err:
        print(f"longvit manifest: {err}", file=sys.stderr)
        return 2
    with out.open(newline="") as f:
        n = sum(1 for _ in csv.DictReader(f))
    print(f"wrote {out}: {n} slides")
    if unlabelled:
        shown = ", ".join(unlabelled[:5]) + (" ..." if len(unlabelled) > 5 else "")
        print(f"  {len(unlabelled)} slides without a label row, left out: {shown}")
    if unused:
        print(f"  {unused} label rows matched no slide")
    return 0
