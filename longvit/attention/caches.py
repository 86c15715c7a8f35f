"""The attention op's host-side caches (plans, kernel-call steps), forgotten together.

Working out a plan or a branch's steps costs ~0.07-0.1 ms of host time per call before the
first kernel, so both are remembered per plain arguments. What they remember depends on the
backends ``auto`` may choose: ``forget_all`` (``plan.forget_plans``) clears every cache made
here, and ``backends.drop_backend`` calls it when a backend is dropped.
"""

from __future__ import annotations

_CACHES: list[dict] = []


def new_cache() -> dict:
    """An empty dict that ``forget_all`` clears."""
    cache: dict = {}
    _CACHES.append(cache)
    return cache


def forget_all() -> None:
    """Clear every cache made by ``new_cache``."""
    for cache in _CACHES:
        cache.clear()
