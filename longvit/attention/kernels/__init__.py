"""Triton kernels of the attention op, imported only where Triton is (CUDA, or Triton's
interpreter). Their callers hold the ATen fallbacks with the same values:

- ``strided.py``: the per-branch path's row copies, adds and merges over strided windows
  (called by ``attention/strided_ops.py``);
- ``packed_rows.py``: the packed path's gathers, merge and gradient sums (called by
  ``attention/packed.py``).
"""
