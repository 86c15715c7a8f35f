"""Run a test file as a script under Triton's interpreter (TRITON_INTERPRET=1).

The interpreter runs Triton kernels on CPU tensors, but has to be set before Triton compiles
anything, so the checks run in a child process. Usage (from tests:
``from triton_interpreter import run_under_interpreter``)::

    run = run_under_interpreter(__file__)   # the file's ``if __name__ == "__main__"`` part
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
"""

import os
import subprocess
import sys
from pathlib import Path


def run_under_interpreter(script: str, timeout: float = 600) -> subprocess.CompletedProcess:
    env = dict(os.environ, TRITON_INTERPRET="1", LONGVIT_TRITON="1")
    root = Path(__file__).resolve().parents[1]
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(root), env.get("PYTHONPATH")]))
    return subprocess.run(
        [sys.executable, script], env=env, capture_output=True, text=True, timeout=timeout
    )
