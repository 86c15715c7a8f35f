"""Patient-level cross-validation folds: ``longvit split``.

    longvit split manifest.csv --by patient --folds 5 --stratify label
    longvit fit --config configs/abmil_features.yaml \\
        --data.init_args.manifest manifest_folds.csv --data.init_args.fold 2

Every slide of a patient lands in the same fold (a patient's slides share their biology: a
patient in train and test inflates every metric). Folds are stratified: within each class
(the patient's most frequent value of ``--stratify``), patients are shuffled with ``--seed``
and dealt, largest first, to the fold holding the fewest slides of that class, so every fold
gets about 1/K of each class. The same manifest and seed always give the same folds.

The output is the manifest with columns added (paths re-expressed relative to its folder):

- ``fold``: the fold (0..K-1) whose test set holds the slide;
- ``split_fold<k>`` for each k: ``test`` for fold k, ``val`` for fold (k + 1) mod K (with
  ``--val next-fold``, the default), ``train`` for the rest;
- ``split``: a copy of ``split_fold0``, so the file is also a plain manifest.

``FeatureDataModule(fold=k)`` / ``--data.init_args.fold k`` trains on ``split_fold<k>``.
``--clam-splits DIR`` also writes CLAM's ``splits_<k>.csv`` (columns train, val, test of
slide ids) for CLAM's ``main.py --split_dir``.
"""

from __future__ import annotations

import argparse
import csv
import os
import sys
from collections import Counter, defaultdict
from pathlib import Path

import numpy as np

from longvit.training.manifest import ManifestError


def fold_column(fold: int) -> str:
    """The manifest column holding fold ``fold``'s train / val / test assignment."""
    return f"split_fold{fold}"


def assign_folds(groups: list[str], strata: list[str], n_folds: int, seed: int = 0) -> list[int]:
    """The test fold (0..n_folds-1) of each slide, whole groups (patients) per fold.

    Args:
        groups: (N,) the patient of each slide.
        strata: (N,) the class of each slide ("" for no stratification); a patient's class is
            its most frequent one (ties: the smallest).
        n_folds: K.
        seed: the shuffling seed.
    """
    if n_folds < 2:
        raise ValueError(f"--folds must be >= 2, got {n_folds}")
    slides: dict[str, list[int]] = defaultdict(list)
    for i, g in enumerate(groups):
        slides[g].append(i)
    if len(slides) < n_folds:
        raise ValueError(f"{len(slides)} patients cannot fill {n_folds} folds; use fewer folds")
    by_stratum: dict[str, list[str]] = defaultdict(list)
    for g in sorted(slides):
        counts = Counter(strata[i] for i in slides[g])
        top = max(counts.values())
        by_stratum[min(s for s, c in counts.items() if c == top)].append(g)
    rng = np.random.default_rng(seed)
    fold_of = [0] * len(groups)
    total = np.zeros(n_folds, np.int64)  # slides per fold, all classes
    for stratum in sorted(by_stratum):
        patients = list(by_stratum[stratum])
        rng.shuffle(patients)
        patients.sort(key=lambda g: -len(slides[g]))  # stable: equal sizes keep the shuffle
        load = np.zeros(n_folds, np.int64)  # slides of this class per fold
        for g in patients:
            fold = min(range(n_folds), key=lambda f: (load[f], total[f], f))
            load[fold] += len(slides[g])
            total[fold] += len(slides[g])
            for i in slides[g]:
                fold_of[i] = fold
    return fold_of


def fold_splits(fold_of: list[int], n_folds: int, val: str = "next-fold") -> dict[str, list[str]]:
    """{``split_fold<k>``: the train / val / test of each slide} for every fold k."""
    out = {}
    for k in range(n_folds):
        val_fold = (k + 1) % n_folds if val == "next-fold" else None
        out[fold_column(k)] = [
            "test" if f == k else "val" if f == val_fold else "train" for f in fold_of
        ]
    return out


def split_manifest(
    manifest: str | os.PathLike,
    out: str | os.PathLike,
    *,
    by: str = "patient",
    n_folds: int = 5,
    stratify: str | None = "label",
    seed: int = 0,
    val: str = "next-fold",
) -> Path:
    """Write ``out``: the manifest with ``fold``, ``split_fold<k>`` and ``split`` columns."""
    manifest, out = Path(manifest).absolute(), Path(out).absolute()
    if val not in ("next-fold", "none"):
        raise ValueError(f"--val must be 'next-fold' or 'none', got {val!r}")
    if val == "next-fold" and n_folds < 3:
        raise ValueError("--val next-fold needs --folds >= 3 (test, val and train folds); "
                         "pass --val none for 2 folds")  # fmt: skip
    with manifest.open(newline="") as f:
        reader = csv.DictReader(f)
        header = [h.strip() for h in reader.fieldnames or []]
        rows = [{(k or "").strip(): (v or "").strip() for k, v in r.items()} for r in reader]
    for option, column in (("--by", by), ("--stratify", stratify)):
        if column and column not in header:
            raise ManifestError(
                f"{manifest}: no column {column!r} for {option}; the header has {header}"
                + (" (add a patient column, e.g. TCGA's first 12 barcode characters, or pass "
                   "--by slide_id to split by slide)" if option == "--by" else "")
            )  # fmt: skip
    if not rows:
        raise ManifestError(f"{manifest}: no rows under the header")
    groups = [r[by] for r in rows]
    empty = [i + 2 for i, g in enumerate(groups) if not g]
    if empty:
        raise ManifestError(f"{manifest}, line {empty[0]}: column {by!r} is empty")
    strata = [r[stratify] if stratify else "" for r in rows]
    fold_of = assign_folds(groups, strata, n_folds, seed)
    splits = fold_splits(fold_of, n_folds, val)
    for i, row in enumerate(rows):
        for column in ("slide", "features"):
            if row.get(column) and not Path(row[column]).is_absolute():
                path = (manifest.parent / row[column]).resolve()
                row[column] = os.path.relpath(path, out.parent)
        row["fold"] = fold_of[i]
        for column, values in splits.items():
            row[column] = values[i]
        row["split"] = splits[fold_column(0)][i]
    columns = [c for c in header if c not in splits and c != "fold"]
    columns += [c for c in ("split", "fold") if c not in columns] + list(splits)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
    with tmp.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=columns)
        writer.writeheader()
        writer.writerows(rows)
    os.replace(tmp, out)
    return out


def write_clam_splits(manifest: str | os.PathLike, out_dir: str | os.PathLike) -> list[Path]:
    """CLAM's ``splits_<k>.csv`` (an index column, then train, val, test slide ids, columns of
    unequal length padded with empty cells) from a manifest ``split_manifest`` wrote."""
    with Path(manifest).open(newline="") as f:
        rows = list(csv.DictReader(f))
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    k, written = 0, []
    while rows and fold_column(k) in rows[0]:
        ids = {s: [r.get("slide_id") or Path(r.get("slide") or r["features"]).stem
                   for r in rows if r[fold_column(k)] == s]
               for s in ("train", "val", "test")}  # fmt: skip
        length = max(len(v) for v in ids.values())
        path = out_dir / f"splits_{k}.csv"
        with path.open("w", newline="") as f:
            writer = csv.writer(f)
            writer.writerow(["", "train", "val", "test"])
            for i in range(length):
                writer.writerow([i] + [v[i] if i < len(v) else "" for v in ids.values()])
        written.append(path)
        k += 1
    return written


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="longvit split",
        description="Patient-level, stratified, seeded cross-validation folds of a manifest.",
    )
    p.add_argument("manifest", help="the manifest CSV (longvit.training.manifest)")
    p.add_argument(
        "--by",
        default="patient",
        help="column grouping slides that must share a fold (default patient)",
    )
    p.add_argument("--folds", type=int, default=5, help="number of folds K (default 5)")
    p.add_argument(
        "--stratify",
        default="label",
        help="column to balance over folds (default label; 'none' for none)",
    )
    p.add_argument("--seed", type=int, default=0, help="shuffling seed (default 0)")
    p.add_argument(
        "--val",
        default="next-fold",
        choices=("next-fold", "none"),
        help="validation set of fold k: fold k+1 (default) or none",
    )
    p.add_argument("--out", help="output CSV (default <manifest>_folds.csv beside it)")
    p.add_argument("--clam-splits", metavar="DIR",
                   help="also write CLAM's splits_<k>.csv into DIR")  # fmt: skip
    return p


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    source = Path(args.manifest)
    out = Path(args.out) if args.out else source.with_name(f"{source.stem}_folds.csv")
    stratify = None if args.stratify in ("", "none") else args.stratify
    try:
        path = split_manifest(source, out, by=args.by, n_folds=args.folds, stratify=stratify,
                              seed=args.seed, val=args.val)  # fmt: skip
    except (ValueError, OSError) as err:
        print(f"longvit split: {err}", file=sys.stderr)
        return 2
    with path.open(newline="") as f:
        rows = list(csv.DictReader(f))
    print(f"wrote {path}: {len(rows)} slides, {len({r[args.by] for r in rows})} "
          f"{args.by} groups, {args.folds} folds")  # fmt: skip
    for k in range(args.folds):
        test = [r for r in rows if r["fold"] == str(k)]
        counts = Counter(r[stratify] for r in test) if stratify else {}
        detail = ", ".join(f"{c}: {n}" for c, n in sorted(counts.items()))
        print(f"  fold {k}: {len(test)} test slides" + (f" ({detail})" if detail else ""))
    if args.clam_splits:
        for p in write_clam_splits(path, args.clam_splits):
            print(f"wrote {p}")
    print(f"train fold k with: longvit fit ... --data.init_args.manifest {path} "
          "--data.init_args.fold k")  # fmt: skip
    return 0
