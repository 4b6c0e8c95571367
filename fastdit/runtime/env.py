"""Facts about the process this runs in, readable without importing torch."""

from __future__ import annotations

import os


def under_torchrun() -> bool:
    """Whether torchrun (or any launcher setting RANK and WORLD_SIZE) started this process as one rank."""
    return "RANK" in os.environ and "WORLD_SIZE" in os.environ
