"""The SAFL recognition service: a FastAPI app with a dynamic batcher in front of the model.

``create_app(Settings(...))`` builds the app; ``safl serve`` runs it under uvicorn and
``safl recognize`` runs the same decode → preprocess → model path locally.
"""

from .app import create_app
from .settings import DEFAULT_WEIGHTS, Settings

__all__ = ["DEFAULT_WEIGHTS", "Settings", "create_app"]
