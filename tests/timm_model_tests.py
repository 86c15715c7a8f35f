"""timm's own model tests (tests/test_models.py), for the timm version installed.

The file ships in timm's source distribution on PyPI, not in its wheel. ``timm_test_file``
downloads that sdist once with pip (``pip download timm==<version> --no-binary :all:``, so
the machine's pip settings and index apply), keeps tests/test_models.py in
``.cache/timm-tests/<version>/`` at the repository root (git-ignored) and returns its path;
``load_timm_tests`` imports it as a module whose test functions the contract tests call.
"""

from __future__ import annotations

import importlib.util
import os
import re
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path
from types import ModuleType

CACHE = Path(__file__).resolve().parent.parent / ".cache" / "timm-tests"
MEMBER = "tests/test_models.py"
# markers pytest defines itself (timm's file also uses pytest-timeout's "timeout")
BUILTIN_MARKERS = {"parametrize", "skip", "skipif", "xfail", "usefixtures", "filterwarnings"}


class TimmTestsUnavailable(RuntimeError):
    """timm's test file could not be fetched; the message says why and how to provide it."""


def timm_test_file(version: str, timeout_s: float = 300) -> Path:
    """tests/test_models.py of timm `version`, fetched from PyPI on first use."""
    target = CACHE / version / "test_models.py"
    if target.is_file():
        return target
    how = f"run once with access to PyPI, or put timm {version}'s {MEMBER} at {target}"
    with tempfile.TemporaryDirectory() as tmp:
        command = [
            sys.executable, "-m", "pip", "download", f"timm=={version}", "--no-binary", ":all:",
            "--no-deps", "--quiet", "--retries", "1", "--timeout", "30", "--dest", tmp,
        ]  # fmt: skip
        try:
            done = subprocess.run(command, capture_output=True, text=True, timeout=timeout_s)
        except (OSError, subprocess.TimeoutExpired) as err:
            message = f"pip download of timm {version} failed ({err}); {how}"
            raise TimmTestsUnavailable(message) from err
        archives = sorted(Path(tmp).glob("timm-*.tar.gz"))
        if done.returncode != 0 or not archives:
            last = (done.stderr or done.stdout).strip().splitlines()[-1:] or ["no sdist"]
            raise TimmTestsUnavailable(f"pip download of timm {version}: {last[0]}; {how}")
        with tarfile.open(archives[0]) as archive:
            member = next((m for m in archive.getmembers() if _is_member(m.name)), None)
            if member is None or not member.isfile():
                raise TimmTestsUnavailable(f"timm {version}'s sdist has no {MEMBER}; {how}")
            text = archive.extractfile(member).read()
    target.parent.mkdir(parents=True, exist_ok=True)
    partial = target.with_suffix(f".{os.getpid()}.part")
    partial.write_bytes(text)
    partial.replace(target)  # atomic: a concurrent or killed run never leaves half a file
    return target


def load_timm_tests(path: Path, config) -> ModuleType:
    """Import timm's test file; its pytest markers are registered first (--strict-markers)."""
    known = {line.split(":")[0].strip() for line in config.getini("markers")}
    for name in sorted(set(re.findall(r"@pytest\.mark\.(\w+)", path.read_text()))):
        if name not in known and name not in BUILTIN_MARKERS:
            config.addinivalue_line("markers", f"{name}: timm's tests/test_models.py marker")
    spec = importlib.util.spec_from_file_location("timm_test_models", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _is_member(name: str) -> bool:
    parts = name.split("/")  # timm-<version>/tests/test_models.py
    return len(parts) == 3 and "/".join(parts[1:]) == MEMBER
