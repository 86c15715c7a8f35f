"""``longvit folds-summary``: the metrics of cross-validation runs as mean ± sd over folds.

    longvit folds-summary runs/abmil_fold*            (a glob, quoted or expanded by the shell)
    longvit folds-summary runs/fold0 runs/fold1 ... --csv summary.csv

Each run folder is searched for Lightning ``CSVLogger`` files (``metrics.csv``, any depth). A
run's figures are its ``test/*`` metrics, the last value logged (``longvit test`` on the fold's
best checkpoint writes them); a run without test metrics gives the ``val/*`` metrics of its
last validation instead, and the table says so. sd is the sample standard deviation (n - 1).
"""

from __future__ import annotations

import argparse
import csv
import glob
import math
import sys
from pathlib import Path


def run_metrics(run_dir: str | Path) -> tuple[dict[str, float], str]:
    """({metric: value}, "test" or "val") of one run folder; ({}, "") when nothing is logged.

    Files are read oldest first, so a later ``longvit test`` overrides an earlier one.
    """
    files = sorted(Path(run_dir).rglob("metrics.csv"), key=lambda p: p.stat().st_mtime)
    last: dict[str, float] = {}
    for path in files:
        with path.open(newline="") as f:
            for row in csv.DictReader(f):
                for key, value in row.items():
                    if key and value not in (None, "") and key.startswith(("test/", "val/")):
                        last[key] = float(value)
    for stage in ("test", "val"):
        found = {k: v for k, v in last.items() if k.startswith(f"{stage}/")}
        if found:
            return found, stage
    return {}, ""


def mean_sd(values: list[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (0 for one value)."""
    n = len(values)
    mean = sum(values) / n
    sd = math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1)) if n > 1 else 0.0
    return mean, sd


def summarise(run_dirs: list[str | Path]) -> tuple[list[dict], list[tuple[str, str]]]:
    """(rows of metric, n, mean, sd and one value per run; the (run, stage) of each run)."""
    per_run, stages = [], []
    for run in run_dirs:
        metrics, stage = run_metrics(run)
        if metrics:
            per_run.append(metrics)
            stages.append((str(run), stage))
    names = sorted({k for m in per_run for k in m})
    rows = []
    for name in names:
        values = [m[name] for m in per_run if name in m]
        mean, sd = mean_sd(values)
        row = {"metric": name, "n": len(values), "mean": mean, "sd": sd}
        row.update({run: m.get(name, "") for (run, _), m in zip(stages, per_run)})
        rows.append(row)
    return rows, stages


def _expand(patterns: list[str]) -> list[str]:
    runs = []
    for pattern in patterns:
        matched = sorted(glob.glob(pattern)) if glob.has_magic(pattern) else [pattern]
        runs += [m for m in matched if Path(m).is_dir() and m not in runs]
    return runs


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="longvit folds-summary",
        description="Mean ± sd over cross-validation runs of their test (or val) metrics.",
    )
    p.add_argument("runs", nargs="+", help="run folders or globs (each holds a metrics.csv)")
    p.add_argument("--csv", help="also write the table (one column per run) to this CSV")
    args = p.parse_args(argv)
    runs = _expand(args.runs)
    if not runs:
        print(f"longvit folds-summary: no folder matches {args.runs}", file=sys.stderr)
        return 2
    rows, stages = summarise(runs)
    if not rows:
        why = f"no metrics.csv with test/ or val/ metrics under {runs}"
        fix = "log with CSVLogger and run `longvit test` on each fold"
        print(f"longvit folds-summary: {why}; {fix}", file=sys.stderr)
        return 2
    missing = [r for r in runs if r not in {run for run, _ in stages}]
    width = max(len(r["metric"]) for r in rows)
    print(f"{len(stages)} runs: " + ", ".join(f"{run} ({stage})" for run, stage in stages))
    for row in rows:
        values = " ".join(f"{row[run]:.4f}" if row[run] != "" else "-" for run, _ in stages)
        print(f"{row['metric'].ljust(width)}  {row['mean']:.4f} ± {row['sd']:.4f}  "
              f"(n={row['n']})  [{values}]")  # fmt: skip
    for run in missing:
        print(f"  {run}: no test/ or val/ metrics found", file=sys.stderr)
    if args.csv:
        with open(args.csv, "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=list(rows[0]))
            writer.writeheader()
            writer.writerows(rows)
        print(f"wrote {args.csv}")
    return 0
