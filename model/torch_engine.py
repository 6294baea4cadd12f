"""The PyTorch engine (``model.engine.Engine``): the network read on its own device, greedy
crops, beam search and lexicons alike (``model.search``), with autocast where asked."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from .reading import Recognition
from .safl import SAFL
from .search import DecodeOptions


class TorchEngine:
    """``model`` read by PyTorch: ``SAFL.recognize`` and ``SAFL.rectify``."""

    name = "torch"

    def __init__(self, model: SAFL) -> None:
        self.model = model

    def recognize(
        self, images: torch.Tensor, amp_dtype: torch.dtype | None = None, options: DecodeOptions | Sequence[DecodeOptions] | None = None
    ) -> list[Recognition]:
        """``model.engine.Engine.recognize``: ``SAFL.recognize`` on the model's device."""
        return self.model.recognize(images, amp_dtype=amp_dtype, options=options)

    def rectify(self, images: torch.Tensor) -> torch.Tensor:
        return self.model.rectify(images)
