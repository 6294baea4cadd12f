"""The SAFL recognition service: a FastAPI app with a dynamic batcher in front of the model.

``create_app(Settings(...))`` builds the app; ``safl serve`` runs it under uvicorn and
``safl recognize`` runs the same decode → preprocess → model path locally.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .app import create_app
    from .settings import DEFAULT_WEIGHTS, Settings

__all__ = ["DEFAULT_WEIGHTS", "Settings", "create_app"]

#: Public name -> the submodule that defines it: imported on first use, so the ``safl``
#: command (``service.cli``) starts without FastAPI and PyTorch when it needs neither.
_HOMES = {"create_app": "app", "DEFAULT_WEIGHTS": "settings", "Settings": "settings"}


def __getattr__(name: str) -> Any:
    home = _HOMES.get(name)
    if home is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f".{home}", __name__), name)
