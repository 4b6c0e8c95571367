"""One process prepares a model folder, the others wait for it.

Under torchrun every rank resolves `--model` itself: without coordination each would download the same Hub repo
or build the tiny model at once, and a rank rebuilding a folder could delete it under another rank that is
already loading it. `exclusive(name)` is a file lock (in FASTDIT_CACHE, so ranks on one machine share it): the
first process to take it prepares the folder, the others block until it is done and then find it ready. It needs
no process group, so it works before torch.distributed is initialized, and between unrelated runs too.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import re
from collections.abc import Iterator
from pathlib import Path


def lock_dir() -> Path:
    root = os.environ.get("FASTDIT_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "fastdit")
    return Path(root) / "locks"


@contextlib.contextmanager
def exclusive(name: str) -> Iterator[None]:
    """Hold the lock `name` (any string: a repo id, a folder) for the duration of the block."""
    folder = lock_dir()
    folder.mkdir(parents=True, exist_ok=True)
    with open(folder / (re.sub(r"[^\w.-]+", "_", name) + ".lock"), "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)
