"""The manifest: one CSV row per slide, validated before any training starts.

Columns (header names, any order; extra columns are kept and ignored):

- ``slide``: path of the whole-slide image (pixel mode; in feature mode optional, used
  for heatmap thumbnails).
- ``features``: path of the slide's feature HDF5 (feature mode): ``features`` (N, D),
  ``coords`` (N, 2) int64 level-0 (x, y), attribute ``patch_size_level0`` on ``coords``
  (the layout ``longvit extract``, TRIDENT and CLAM write).
- ``label``: class (classification): integers 0..C-1, or names (sorted names get 0..C-1).
- ``time`` and ``event``: survival time (any unit, > 0) and 1 = event observed, 0 = censored.
- ``split``: ``train``, ``val`` or ``test`` (``predict`` rows take any split).
- ``slide_id`` (optional): a name for outputs; default the file stem.

Relative paths are resolved against the manifest's folder. ``read_manifest`` raises
``ManifestError`` naming the manifest, the row and the column at the first problem, and
checks every named file exists, so a typo fails at setup, not after an epoch.
"""

from __future__ import annotations

import csv
import os
from dataclasses import dataclass, field
from pathlib import Path

SPLITS = ("train", "val", "test")
TASKS = ("classification", "survival", "none")


class ManifestError(ValueError):
    """A manifest that cannot be used; the message names the file, row and column."""


@dataclass(frozen=True)
class ManifestRow:
    """One slide. Paths are absolute; label / time / event are None when the task lacks them.

    row: 1-based line number in the CSV (the header is line 1).
    """

    slide_id: str
    split: str
    row: int
    slide: Path | None = None
    features: Path | None = None
    label: int | None = None
    time: float | None = None
    event: int | None = None
    extra: dict = field(default_factory=dict)


@dataclass(frozen=True)
class Manifest:
    """All rows of a manifest plus what was derived from them.

    class_names: the label of each class index (classification), e.g. ["0", "1"] or
    ["benign", "tumour"].
    """

    path: Path
    rows: list[ManifestRow]
    class_names: list[str]

    def split(self, name: str) -> list[ManifestRow]:
        """Rows of one split ("train", "val", "test"); "all" gives every row."""
        return list(self.rows) if name == "all" else [r for r in self.rows if r.split == name]


def read_manifest(
    path: str | os.PathLike,
    *,
    mode: str = "features",
    task: str = "classification",
    check_files: bool = True,
    split_column: str = "split",
) -> Manifest:
    """Read and validate a manifest CSV.

    Args:
        path: the CSV file.
        mode: "features" (needs a ``features`` column) or "pixels" (needs ``slide``).
        task: "classification" (needs ``label``), "survival" (``time`` and ``event``) or
            "none" (self-supervised: no targets).
        check_files: raise if a named slide / feature file does not exist.
        split_column: the column giving each row's split (``split_fold<k>`` for a fold
            written by ``longvit split``).
    """
    path = Path(path).absolute()
    if mode not in ("features", "pixels"):
        raise ManifestError(f"mode must be 'features' or 'pixels', got {mode!r}")
    if task not in TASKS:
        raise ManifestError(f"task must be one of {TASKS}, got {task!r}")
    if not path.is_file():
        raise ManifestError(f"manifest {path} does not exist (set data.manifest to a CSV file)")
    with path.open(newline="") as f:
        reader = csv.DictReader(f)
        header = [h.strip() for h in (reader.fieldnames or [])]
        records = [{(k or "").strip(): (v or "").strip() for k, v in r.items()} for r in reader]
    required = [split_column, "features" if mode == "features" else "slide"]
    required += {"classification": ["label"], "survival": ["time", "event"], "none": []}[task]
    missing = [c for c in required if c not in header]
    if missing:
        hint = ""
        if split_column in missing and split_column != "split":
            hint = f" (write fold columns with `longvit split {path.name} --folds K`)"
        raise ManifestError(
            f"{path}: missing column(s) {missing} for mode={mode!r}, task={task!r}; "
            f"the header has {header}{hint}"
        )
    if not records:
        raise ManifestError(f"{path}: no rows under the header")

    class_names = _class_names(path, records) if task == "classification" else []
    base = path.parent
    rows, seen = [], {}
    for line, rec in enumerate(records, start=2):
        where = f"{path}, line {line}"
        split = rec[split_column].lower()
        if split not in SPLITS and split != "predict":
            raise ManifestError(
                f"{where}: {split_column} must be one of {SPLITS}, got {rec[split_column]!r}"
            )
        slide = _path(base, rec.get("slide", ""))
        features = _path(base, rec.get("features", ""))
        needed = features if mode == "features" else slide
        if needed is None:
            col = "features" if mode == "features" else "slide"
            raise ManifestError(f"{where}: column {col!r} is empty")
        if check_files:
            for col, p in (("features", features), ("slide", slide)):
                if p is not None and (p is needed or mode == "pixels") and not p.is_file():
                    raise ManifestError(
                        f"{where}: {col} file {p} does not exist (fix the path in the "
                        f"manifest; relative paths are resolved against {base})"
                    )
        slide_id = rec.get("slide_id") or needed.stem
        if slide_id in seen:
            raise ManifestError(
                f"{where}: slide_id {slide_id!r} repeats line {seen[slide_id]}; add a unique "
                f"'slide_id' column"
            )
        seen[slide_id] = line
        label = time = event = None
        if task == "classification":
            label = class_names.index(rec["label"]) if rec["label"] in class_names else None
            if label is None:
                raise ManifestError(f"{where}: empty label")
        elif task == "survival":
            time, event = _survival(where, rec)
        extra = {k: v for k, v in rec.items() if k not in _KNOWN}
        rows.append(ManifestRow(slide_id, split, line, slide, features, label, time, event, extra))
    return Manifest(path, rows, class_names)


_KNOWN = {"slide", "features", "label", "time", "event", "split", "slide_id"}


def _path(base: Path, value: str) -> Path | None:
    if not value:
        return None
    p = Path(value).expanduser()
    return p if p.is_absolute() else (base / p).resolve()


def _class_names(path: Path, records: list[dict]) -> list[str]:
    values = sorted({r["label"] for r in records if r["label"] != ""})
    if not values:
        raise ManifestError(f"{path}: column 'label' is empty in every row")
    try:
        ints = sorted({int(v) for v in values})
    except ValueError:
        return values  # class names: sorted order gives the indices
    if ints != list(range(len(ints))) and min(ints) < 0:
        raise ManifestError(f"{path}: integer labels must be >= 0, got {ints}")
    return [str(i) for i in range(max(ints) + 1)]


def _survival(where: str, rec: dict) -> tuple[float, int]:
    try:
        time = float(rec["time"])
    except ValueError:
        raise ManifestError(f"{where}: time must be a number, got {rec['time']!r}") from None
    if not time > 0:
        raise ManifestError(f"{where}: time must be > 0, got {time}")
    if rec["event"] not in ("0", "1"):
        raise ManifestError(
            f"{where}: event must be 1 (observed) or 0 (censored), got {rec['event']!r}"
        )
    return time, int(rec["event"])
