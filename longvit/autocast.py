"""What autocast does on a device, for code that makes autocast's casts itself."""

from __future__ import annotations

import torch


def autocast_dtype(device_type: str) -> torch.dtype | None:
    """Autocast's dtype when autocast is on for device_type, else None (also for devices
    that have no autocast, such as "meta")."""
    if torch.amp.is_autocast_available(device_type) and torch.is_autocast_enabled(device_type):
        return torch.get_autocast_dtype(device_type)
    return None
