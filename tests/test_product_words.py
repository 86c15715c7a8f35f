"""The product speaks of the product: no words of how it was made in code, docs or tools."""

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PLACES = ("longvit", "docs", "tools", "configs", "tests", "data", "README.md", "Makefile")
SUFFIXES = {".py", ".md", ".yaml", ".yml", ".sh", ".toml", ".txt", ".csv", ""}
PROCESS = re.compile(
    r"session|review pass|issue \d|item \d|device time|\.\./shared|anchors\.md", re.IGNORECASE
)


def _files():
    for place in PLACES:
        path = ROOT / place
        paths = [path] if path.is_file() else sorted(path.rglob("*")) if path.is_dir() else []
        for p in paths:
            if p.is_file() and p.suffix in SUFFIXES and "__pycache__" not in p.parts:
                yield p


def test_no_process_words():
    me = Path(__file__).resolve()
    hits = [
        f"{p.relative_to(ROOT)}:{n}: {line.strip()}"
        for p in _files()
        if p.resolve() != me
        for n, line in enumerate(p.read_text(errors="replace").splitlines(), 1)
        if PROCESS.search(line)
    ]
    assert not hits, "words about the making, not the product:\n" + "\n".join(hits)
