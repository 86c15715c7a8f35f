"""Counting the operations a piece of code dispatches: the host's share of its work.

``with CountOps() as counted: model(x)`` then ``counted.total`` (and ``counted.ops``, a Counter
by op name) is the number of aten (or registered) ops it ran, views included: each costs host
time, and on a GPU most of them are kernel launches. Tests bound it per layer; tools print it.
"""

from __future__ import annotations

from collections import Counter

from torch.utils._python_dispatch import TorchDispatchMode


class CountOps(TorchDispatchMode):
    """Every aten (or registered) op a region dispatches, views included."""

    def __init__(self):
        super().__init__()
        self.ops: Counter = Counter()

    @property
    def total(self) -> int:
        return sum(self.ops.values())

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops[str(func)] += 1
        return func(*args, **(kwargs or {}))
