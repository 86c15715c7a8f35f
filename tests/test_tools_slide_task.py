"""tools/bench_slide_task.py runs end to end on CPU at its smoke size."""

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def run_tool(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "NO_ALBUMENTATIONS_UPDATE": "1"}
    return subprocess.run(
        [sys.executable, str(ROOT / "tools" / "bench_slide_task.py"), *args],
        capture_output=True, text=True, env=env, timeout=600,
    )  # fmt: skip


def test_smoke_run_trains_full_and_local_with_the_default_regime(tmp_path):
    out = tmp_path / "slide_task.json"
    done = run_tool("--device", "cpu", "--small", "--out", str(out))
    assert done.returncode == 0, done.stderr[-2000:]
    summary = json.loads(out.read_text())
    full, local = summary["results"]
    assert (full["model"], local["model"]) == ("full", "local")
    # the default full model: rates 1 2, a local segment and one over the longest slide, and
    # one register; the local model: the first branch of the auto schedule only
    assert full["model_kwargs"]["dilation_rates"] == [1, 2]
    assert full["model_kwargs"]["segment_lengths"] == [256, 400 + 1 + 1]
    assert full["model_kwargs"]["reg_tokens"] == 1
    assert local["model_kwargs"]["dilation_rates"] == [1]
    assert all(r["steps_done"] == 10 and 0.0 <= r["test_auroc"] <= 1.0 for r in (full, local))


def test_bad_segments_are_refused_naming_the_flag():
    done = run_tool("--device", "cpu", "--small", "--segments", "256")
    assert done.returncode == 2 and "--segments needs one length per rate (2)" in done.stderr
