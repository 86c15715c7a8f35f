import os

os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")

import pytest  # noqa: E402


@pytest.fixture(autouse=True)
def _fresh_attention_plans():
    """Tests swap attention backends (monkeypatch): the op's remembered plans must not outlive
    a test (in a process the backends do not change, except when one is dropped)."""
    from longvit.attention.plan import forget_plans

    forget_plans()
    yield
    forget_plans()
