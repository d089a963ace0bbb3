"""Model cost from the architecture name alone: parameters and forward FLOPs per image.

Counted by ``torch.utils.flop_counter.FlopCounterMode`` on a freshly built network, so no logged
weights are needed. FlopCounterMode counts a multiply-add as 2 FLOPs and covers convolutions and
matrix products only (BatchNorm, ReLU, pooling and the shortcut additions are left out, as in the
papers' "FLOPs" columns, which count multiply-adds: divide by 2 to compare with them).
"""

from __future__ import annotations

from functools import lru_cache
from typing import Any

import torch
from torch.utils.flop_counter import FlopCounterMode

from .models import count_parameters, create_model


@lru_cache(maxsize=64)
def _cost(architecture: str, num_classes: int, channels: int, image_size: int, args: tuple[tuple[str, Any], ...]) -> tuple[int, int]:
    model = create_model(architecture, num_classes, channels, **dict(args)).eval()
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        model(torch.zeros(1, channels, image_size, image_size))
    return count_parameters(model), int(counter.get_total_flops())


def model_cost(architecture: str, num_classes: int, channels: int, image_size: int,
               model_args: dict[str, Any] | None = None) -> tuple[int, int]:
    """(parameters, forward FLOPs for one image) of ``architecture`` at this input shape."""
    return _cost(architecture, num_classes, channels, image_size, tuple(sorted((model_args or {}).items())))
