"""The closing table of ``longvit tile`` and ``longvit extract``, and their exit code.

Every slide ends in one of three states: "done" (written), "skipped" (complete from an earlier
run) or "failed" (nothing usable written; the reason says why and what to do). A written slide
can also carry a warning (unreadable regions, no tiles, a resolution the slide cannot give):
it is shown as ``done (warning)`` and counted apart, and ``--strict`` turns it into a failure.
The exit code is 1 when any slide failed, 0 otherwise.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace

from longvit.slides.tile_job import SlideResult


def apply_strict(results: Sequence[SlideResult], strict: bool) -> list[SlideResult]:
    """With ``strict``, every result with a warning becomes "failed" (its outputs stay)."""
    if not strict:
        return list(results)
    return [
        replace(r, status="failed", reason=_join(r.reason, f"{r.warning} (--strict)"), warning="")
        if r.warning and r.status != "failed"
        else r
        for r in results
    ]


def exit_code(results: Sequence[SlideResult]) -> int:
    """1 when any slide failed, else 0."""
    return 1 if any(r.status == "failed" for r in results) else 0


def format_report(results: Sequence[SlideResult]) -> str:
    """The closing table: one row per slide (failures first, then warnings), then the counts."""
    rows = [("status", "tiles", "seconds", "slide", "reason")]

    def rank(r: SlideResult) -> tuple:
        order = {"failed": 0, "done": 2, "skipped": 3}.get(r.status, 4)
        return (order - (1 if r.warning and r.status != "failed" else 0), r.slide)

    for r in sorted(results, key=rank):
        shown = "skipped (complete)" if r.status == "skipped" else r.status
        if r.warning and r.status != "failed":
            shown += " (warning)"
        rows.append((shown, str(r.tiles), f"{r.seconds:.1f}", r.slide, _join(r.reason, r.warning)))
    widths = [max(len(row[i]) for row in rows) for i in range(4)]
    lines = ["  ".join(c.ljust(w) for c, w in zip(row, widths)) + "  " + row[4] for row in rows]
    counts = {s: sum(r.status == s for r in results) for s in ("done", "skipped", "failed")}
    warned = sum(bool(r.warning) and r.status != "failed" for r in results)
    lines.append(
        f"{counts['done']} done, {counts['skipped']} skipped as already complete, "
        f"{counts['failed']} failed" + (f"; {warned} with warnings" if warned else "")
    )
    return "\n".join(line.rstrip() for line in lines)


def _join(*parts: str) -> str:
    return "; ".join(p for p in parts if p)
