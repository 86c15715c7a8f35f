"""OpenSlide's own tiny test slides (``tests/fixtures/`` of openslide-python's sdist on PyPI).

``openslide_fixture(name)`` downloads the sdist once with pip (``pip download
openslide-python==<installed version> --no-binary :all:``, so the machine's pip settings and
index apply), keeps its fixtures in ``.cache/openslide-fixtures/<version>/`` at the repository
root (git-ignored) and returns the path of one; ``OpenSlideFixturesUnavailable`` says why it
could not, and tests skip on it.
"""

from __future__ import annotations

import os
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

CACHE = Path(__file__).resolve().parent.parent / ".cache" / "openslide-fixtures"


class OpenSlideFixturesUnavailable(RuntimeError):
    """The sdist could not be fetched; the message says why and how to provide the files."""


def openslide_fixture(name: str, timeout_s: float = 120) -> Path:
    """Path of ``tests/fixtures/<name>`` of the installed openslide-python's sdist."""
    import openslide

    version = openslide.__version__
    folder = CACHE / version
    if not (folder / name).is_file():
        _fetch(version, folder, timeout_s)
    if not (folder / name).is_file():
        raise OpenSlideFixturesUnavailable(f"openslide-python {version}'s sdist has no {name}")
    return folder / name


def _fetch(version: str, folder: Path, timeout_s: float) -> None:
    how = f"run once with access to PyPI, or put its tests/fixtures/ files in {folder}"
    with tempfile.TemporaryDirectory() as tmp:
        command = [
            sys.executable, "-m", "pip", "download", f"openslide-python=={version}",
            "--no-binary", ":all:", "--no-deps", "--quiet", "--retries", "1", "--timeout", "30",
            "--dest", tmp,
        ]  # fmt: skip
        try:
            done = subprocess.run(command, capture_output=True, text=True, timeout=timeout_s)
        except (OSError, subprocess.TimeoutExpired) as err:
            raise OpenSlideFixturesUnavailable(f"pip download failed ({err}); {how}") from err
        archives = sorted(Path(tmp).glob("openslide_python-*.tar.gz"))
        if done.returncode != 0 or not archives:
            last = (done.stderr or done.stdout).strip().splitlines()[-1:] or ["no sdist"]
            raise OpenSlideFixturesUnavailable(f"pip download: {last[0]}; {how}")
        folder.mkdir(parents=True, exist_ok=True)
        with tarfile.open(archives[0]) as archive:
            for member in archive.getmembers():
                parts = member.name.split("/")  # openslide_python-<v>/tests/fixtures/<file>
                if member.isfile() and parts[1:3] == ["tests", "fixtures"] and len(parts) == 4:
                    partial = folder / f".{parts[3]}.{os.getpid()}.part"
                    partial.write_bytes(archive.extractfile(member).read())
                    partial.replace(folder / parts[3])  # atomic for concurrent runs
