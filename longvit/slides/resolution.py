"""Resolution metadata: level-0 microns per pixel, objective power, pyramid level choice.

Everything here is a pure function of a slide's property map (OpenSlide's ``properties``), so
it can be tested without a slide. The search order for level-0 mpp is:

1. ``openslide.mpp-x`` / ``openslide.mpp-y`` (OpenSlide's normalised value, set for Aperio,
   Hamamatsu, MIRAX, Leica, Philips, Ventana, DICOM and TIFFs with a centimetre/inch unit);
2. vendor keys OpenSlide leaves un-normalised (``aperio.MPP``, Philips' pixel spacing in mm);
3. the TIFF resolution tags (``tiff.XResolution`` with ``tiff.ResolutionUnit`` inch/centimetre).

A value outside ``PLAUSIBLE_MPP`` (e.g. the 72 dpi default of image editors, 352.8 um/px) is
treated as absent, never as a resolution.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

# Convention used across pathology tools (TRIDENT, CLAM): 40x ~ 0.25 um/px, 20x ~ 0.5 um/px.
MAGNIFICATION_TIMES_MPP = 10.0
# Microscopy scans lie well inside this range (um per level-0 pixel).
PLAUSIBLE_MPP = (0.01, 100.0)

_UNIT_MICRONS = {"centimeter": 1e4, "inch": 25400.0, "millimeter": 1e3, "micrometer": 1.0}


@dataclass(frozen=True)
class LevelZeroResolution:
    """Level-0 pixel size in microns (x and y) and the metadata key it came from."""

    mpp_x: float
    mpp_y: float
    source: str

    @property
    def mpp(self) -> float:
        """Mean of x and y (scanners write square pixels; non-square ones differ by < 1%)."""
        return 0.5 * (self.mpp_x + self.mpp_y)


def magnification_to_mpp(magnification: float) -> float:
    """Nominal mpp of an objective magnification (20 -> 0.5 um/px)."""
    if magnification <= 0:
        raise ValueError(f"magnification must be positive, got {magnification}")
    return MAGNIFICATION_TIMES_MPP / magnification


def mpp_to_magnification(mpp: float) -> float:
    """Nominal objective magnification of a pixel size (0.25 um/px -> 40)."""
    if mpp <= 0:
        raise ValueError(f"mpp must be positive, got {mpp}")
    return MAGNIFICATION_TIMES_MPP / mpp


def _float(value: str | None) -> float | None:
    try:
        return float(value) if value is not None else None
    except ValueError:
        return None


def _plausible(value: float | None) -> bool:
    return value is not None and PLAUSIBLE_MPP[0] <= value <= PLAUSIBLE_MPP[1]


def level0_resolution(properties: Mapping[str, str]) -> LevelZeroResolution | None:
    """Level-0 microns per pixel from a slide's property map, or None when none is usable."""
    x, y = _float(properties.get("openslide.mpp-x")), _float(properties.get("openslide.mpp-y"))
    if _plausible(x):
        return LevelZeroResolution(x, y if _plausible(y) else x, "openslide.mpp-x")
    aperio = _float(properties.get("aperio.MPP"))
    if _plausible(aperio):
        return LevelZeroResolution(aperio, aperio, "aperio.MPP")
    spacing = properties.get("philips.DICOM_PIXEL_SPACING", "").replace('"', "").split()
    if len(spacing) == 2:  # millimetres per pixel, (row, column) order
        sy, sx = (_float(s) for s in spacing)
        if sx and sy and _plausible(sx * 1e3):
            return LevelZeroResolution(sx * 1e3, sy * 1e3, "philips.DICOM_PIXEL_SPACING")
    unit = _UNIT_MICRONS.get(properties.get("tiff.ResolutionUnit", "").lower())
    rx, ry = _float(properties.get("tiff.XResolution")), _float(properties.get("tiff.YResolution"))
    if unit and rx and rx > 0:  # pixels per unit
        mx = unit / rx
        my = unit / ry if ry and ry > 0 else mx
        if _plausible(mx) and _plausible(my):
            return LevelZeroResolution(mx, my, "tiff.XResolution")
    return None


def describe_resolution_metadata(properties: Mapping[str, str]) -> str:
    """The resolution-related keys a slide does carry, for error messages."""
    keys = ("openslide.mpp-x", "aperio.MPP", "tiff.XResolution", "tiff.ResolutionUnit")
    found = [f"{k}={properties[k]!r}" for k in keys if k in properties]
    return "found " + ", ".join(found) if found else "no resolution keys at all"


def objective_power(properties: Mapping[str, str]) -> float | None:
    """Scanner objective magnification (e.g. 40.0), or None when the slide does not state it."""
    for key in ("openslide.objective-power", "aperio.AppMag", "hamamatsu.SourceLens"):
        value = _float(properties.get(key))
        if value and value > 0:
            return value
    return None


def best_level_for_downsample(level_downsamples: Sequence[float], downsample: float) -> int:
    """Index of the coarsest pyramid level that is still at least as fine as ``downsample``.

    ``downsample`` is in level-0 pixels per output pixel. Reading that level and shrinking it
    never loses detail; a level within 0.1% of the target counts as equal (scanners round level
    sizes). Targets finer than level 0 read level 0 and enlarge.
    """
    best = 0
    for index, level_downsample in enumerate(level_downsamples):
        if level_downsample <= downsample * 1.001 and level_downsample >= level_downsamples[best]:
            best = index
    return best
