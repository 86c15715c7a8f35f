"""Errors a user can catch: every one names the slide and, where there is one, the fix."""

from __future__ import annotations

from os import PathLike


class SlideError(Exception):
    """A slide (or one of its tiles) could not be used. ``path`` names the slide."""

    def __init__(self, path: str | PathLike, message: str):
        self.path = str(path)
        self.reason = message
        super().__init__(f"{self.path}: {message}")


class SlideOpenError(SlideError):
    """The file is missing, truncated, corrupt or in a format OpenSlide and Pillow cannot read."""


class MissingMPPError(SlideError):
    """The slide states no usable level-0 microns per pixel, and no override was given."""

    def __init__(self, path: str | PathLike, found: str = ""):
        detail = f" ({found})" if found else ""
        super().__init__(
            path,
            "no usable microns-per-pixel in the slide's metadata"
            f"{detail}; longvit never guesses a resolution. Pass the scanner's level-0 resolution "
            "with --mpp-override MPP (Python: Slide(path, mpp_override=MPP)).",
        )


class TileReadError(SlideError):
    """One region could not be decoded (a corrupt tile); the slide handle has been reopened."""

    def __init__(self, path: str | PathLike, location: tuple[int, int], level: int, reason: str):
        self.location = (int(location[0]), int(location[1]))
        self.level = int(level)
        super().__init__(
            path,
            f"cannot read the region at level-0 (x, y) = {self.location}, level {level}: {reason}",
        )
