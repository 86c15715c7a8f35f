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


def skip_without_runtime_loops() -> None:
    """Skip where the interpreter cannot run a loop whose bound is a kernel argument
    (merge_all's kernel has one): Triton before 3.7 passes scalar arguments as 1-element arrays,
    which NumPy 2.4 and later no longer turn into a Python int (the compiled kernels are not
    affected; tests/test_merge_all.py checks them on CUDA)."""
    import numpy
    import pytest
    import triton

    major, minor = (int(x) for x in triton.__version__.split(".")[:2])
    if (major, minor) >= (3, 7):
        return
    try:
        int(numpy.array([1]))
    except TypeError:
        pytest.skip(f"Triton {triton.__version__}'s interpreter with NumPy {numpy.__version__}")
