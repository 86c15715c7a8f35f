"""Extraction as jobs: find tile files, plan (skip what is complete), assemble and write each
slide's features, report per slide. ``extract_features`` (``api.py``) is the Python API.

A slide's features are assembled in memory (N x D float32: 300 MB for 100,000 tiles of a
768-d model) from batches that may span slides, and written atomically the moment its last
tile arrives, so a killed run loses at most the slides in flight and a rerun skips the rest.
A tile that cannot be decoded is left out (its row listed in ``failed_tile_index``); a slide
that cannot be opened, or whose every tile fails, is a failed row in the report; neither stops
the run. ``judge_extracted`` decides the rest: more unreadable tiles than
``max_failed_fraction`` fails the slide (its readable tiles' features are kept in the file),
fewer is a warning, and so is a slide without tiles. The judgement is made again when a rerun
skips a complete file, so a changed threshold applies without extracting again.
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import h5py
import numpy as np

from longvit.extract.dataset import SlideJob, slide_path_for
from longvit.extract.model import TileEncoder
from longvit.extract.writer import coords_sha1, feature_path, features_complete, write_features_h5
from longvit.slides.io import read_tiles_h5
from longvit.slides.tile_job import SlideResult


def judge_extracted(
    n_tiles: int, failed_rows: int, first_reason: str, max_failed_fraction: float, path: str
) -> tuple[str, str, str]:
    """(status, reason, warning) of a slide whose feature file ``path`` holds ``n_tiles -
    failed_rows`` tiles; ``first_reason``: why the first unreadable tile failed."""
    if n_tiles == 0:
        return "done", "", "no tiles in the tile file (see longvit tile's report); features empty"
    if not failed_rows:
        return "done", "", ""
    share = failed_rows / n_tiles
    what = f"{failed_rows} of {n_tiles} tiles ({share:.1%}) unreadable, first: {first_reason}"
    if share > max_failed_fraction:
        return (
            "failed",
            (
                f"{what}; above --max-failed-fraction {max_failed_fraction:g} (the readable tiles' "
                f"features are in {path}; raise --max-failed-fraction to accept them)"
            ),
            "",
        )
    return "done", "", f"{what}; left out (failed_tile_index)"


def find_tile_files(inputs: Iterable[str | os.PathLike]) -> list[Path]:
    """Tile-coordinate files: ``.h5`` files named directly, or in the given folders (a
    ``longvit tile`` output folder is searched in its ``patches/`` subfolder)."""
    files: list[Path] = []
    for item in inputs:
        path = Path(item)
        if path.is_dir():
            folder = path / "patches" if (path / "patches").is_dir() else path
            files.extend(sorted(p for p in folder.glob("*.h5") if not p.name.startswith(".")))
        else:
            files.append(path)  # named explicitly: tried even if missing, and reported
    return files


def plan_extraction(
    tile_files: Sequence[Path],
    out_dir: str | os.PathLike,
    identity: dict,
    *,
    slide_dir: str | os.PathLike | None = None,
    mpp_override: float | None = None,
    max_failed_fraction: float = 0.05,
) -> tuple[list[SlideJob], list[SlideResult]]:
    """(jobs to run, results known already): complete outputs are "skipped" (judged again, see
    ``judge_extracted``), unreadable tile files and name clashes "failed". ``identity``:
    ``TileEncoder.identity()``."""
    jobs: list[SlideJob] = []
    results: list[SlideResult] = []
    owners: dict[str, Path] = {}
    slide_dir = Path(slide_dir) if slide_dir is not None else None
    for tiles_h5 in tile_files:
        name = tiles_h5.stem
        if name in owners:
            reason = f"output name {name!r} is already used by {owners[name]}; rename one file"
            results.append(SlideResult(str(tiles_h5), "failed", reason=reason))
            continue
        owners[name] = tiles_h5
        try:
            coords, attrs = read_tiles_h5(tiles_h5)
        except (OSError, KeyError) as err:
            reason = f"cannot read the tile file ({type(err).__name__}: {err}); run longvit tile"
            results.append(SlideResult(str(tiles_h5), "failed", reason=reason))
            continue
        slide = slide_path_for(tiles_h5, attrs, slide_dir)
        job = SlideJob(name, str(tiles_h5), slide, len(coords), mpp_override, coords_sha1(coords))
        done = feature_path(out_dir, name)
        if features_complete(done, {**identity, **job_identity(job)}):
            results.append(_skipped(slide or str(tiles_h5), done, max_failed_fraction))
            continue
        jobs.append(job)
    return jobs, results


def _skipped(shown: str, path: Path, max_failed_fraction: float) -> SlideResult:
    with h5py.File(path, "r") as f:
        kept, listed = len(f["features"]), int(f["features"].attrs.get("tiles_listed", 0))
    failed = max(0, listed - kept)
    status, reason, warning = judge_extracted(
        listed, failed, "(see the earlier run)", max_failed_fraction, str(path)
    )
    return SlideResult(shown, "failed" if status == "failed" else "skipped", kept, reason,
                       warning=warning)  # fmt: skip


def job_identity(job: SlideJob) -> dict:
    """The tile-side part of a feature file's identity."""
    return {"tiles_sha1": job.tiles_sha1, "tiles_listed": job.n_tiles}


@dataclass
class _Pending:
    """A slide being assembled."""

    features: np.ndarray | None = None  # (n_tiles, D) float32, allocated at its first tile
    received: np.ndarray | None = None  # (n_tiles,) bool
    failed: dict[int, str] = field(default_factory=dict)  # tile row -> reason
    started: float = field(default_factory=time.perf_counter)


class SlideAssembler:
    """Collects (slide, tile row, feature) rows from batches and writes each slide when whole.

    ``add`` takes a batch's rows; ``results`` lists each finished slide's ``SlideResult``.
    """

    def __init__(
        self,
        jobs: Sequence[SlideJob],
        encoder: TileEncoder,
        out_dir: str | os.PathLike,
        max_failed_fraction: float = 0.05,
    ):
        self.jobs = list(jobs)
        self.max_failed_fraction = max_failed_fraction
        self.out_dir = Path(out_dir)
        self.features_attrs = encoder.attributes()
        self.feature_dim = encoder.feature_dim
        self.pending: dict[int, _Pending] = {}
        self.results: list[SlideResult] = []
        self.tiles_done = 0
        for slide, job in enumerate(self.jobs):
            if job.n_tiles == 0:  # nothing to read: an empty file says so
                self.pending[slide] = _Pending()
                self._finish(slide)

    def add(
        self,
        slide_BN: np.ndarray,
        index_BN: np.ndarray,
        features_BND: np.ndarray | None,
        failed: Sequence[tuple[int, int, str]] = (),
    ) -> None:
        """Rows of one batch: features (n, D) of tiles (slide_BN[i], index_BN[i]); failed
        (slide, row, reason) tuples. Finished slides are written before this returns."""
        touched = set()
        for slide in np.unique(slide_BN):
            slide = int(slide)
            rows = slide_BN == slide
            state = self.pending.setdefault(slide, _Pending())
            if state.features is None:
                n, d = self.jobs[slide].n_tiles, features_BND.shape[1]
                state.features = np.zeros((n, d), np.float32)
                state.received = np.zeros(n, bool)
            state.features[index_BN[rows]] = features_BND[rows]
            state.received[index_BN[rows]] = True
            touched.add(slide)
        for slide, index, reason in failed:
            self.pending.setdefault(slide, _Pending()).failed[int(index)] = reason
            touched.add(slide)
        self.tiles_done += len(slide_BN) + len(failed)
        for slide in sorted(touched):
            state = self.pending[slide]
            got = 0 if state.received is None else int(state.received.sum())
            if got + len(state.failed) >= self.jobs[slide].n_tiles:
                self._finish(slide)

    def finish_all(self) -> None:
        """At the end of the data: any slide still pending lost tiles (should not happen)."""
        for slide in sorted(self.pending):
            state = self.pending[slide]
            got = 0 if state.received is None else int(state.received.sum())
            missing = self.jobs[slide].n_tiles - got - len(state.failed)
            for index in range(self.jobs[slide].n_tiles):
                if missing <= 0:
                    break
                if index not in state.failed and not (
                    state.received is not None and state.received[index]
                ):
                    state.failed[index] = "never delivered by the data loader"
                    missing -= 1
            self._finish(slide)

    def _finish(self, slide: int) -> None:
        state = self.pending.pop(slide)
        job = self.jobs[slide]
        shown = job.slide_path or job.tiles_h5
        seconds = time.perf_counter() - state.started
        n = job.n_tiles
        ok = np.zeros(n, bool) if state.received is None else state.received
        failed_rows = np.array(sorted(state.failed), np.int64)
        if n and not ok.any():
            reasons = sorted(set(state.failed.values()))
            reason = reasons[0] if len(reasons) == 1 else f"all {n} tiles unreadable: {reasons[0]}"
            self.results.append(SlideResult(shown, "failed", 0, reason, seconds))
            return
        try:
            with h5py.File(job.tiles_h5, "r") as f:
                grid_rowcol = f["grid_rowcol"][()] if "grid_rowcol" in f else None
            coords, coords_attrs = read_tiles_h5(job.tiles_h5)
            kept = np.flatnonzero(ok)
            features = (
                state.features[kept]
                if state.features is not None
                else np.zeros((0, self.feature_dim), np.float32)
            )
            coords_attrs.pop("complete", None)
            features_attrs = {
                **self.features_attrs,
                **job_identity(job),
                "name": job.name,
                "tiles_h5": str(Path(job.tiles_h5).resolve()),
                "slide_path": job.slide_path or "",
            }
            write_features_h5(
                feature_path(self.out_dir, job.name),
                features=features,
                coords=coords[kept],
                tile_index=kept,
                failed_tile_index=failed_rows,
                grid_rowcol=None if grid_rowcol is None else grid_rowcol[kept],
                coords_attrs=coords_attrs,
                features_attrs=features_attrs,
            )
        except Exception as err:  # a write that fails is this slide's failure, not the run's
            reason = f"cannot write features ({type(err).__name__}: {err})"
            self.results.append(SlideResult(shown, "failed", 0, reason, seconds))
            return
        first = state.failed[int(failed_rows[0])] if len(failed_rows) else ""
        status, reason, warning = judge_extracted(
            n, len(failed_rows), first, self.max_failed_fraction,
            str(feature_path(self.out_dir, job.name)),
        )  # fmt: skip
        self.results.append(SlideResult(shown, status, len(kept), reason, seconds, warning))


@dataclass(frozen=True)
class ExtractRun:
    """What ``extract_features`` did: one result per slide (all ranks'), this process's rank
    (only rank 0 should print or exit on it when running on several devices) and its rate once
    the pipeline was full (tiles per second, start-up excluded)."""

    results: list[SlideResult]
    rank: int = 0
    world_size: int = 1
    steady_tiles_per_second: float = 0.0  # this rank, from its first batch written to the end

    @property
    def failed(self) -> bool:
        return any(r.status == "failed" for r in self.results)
