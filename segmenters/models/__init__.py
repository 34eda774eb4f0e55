"""The segmenter zoo: one builder per architecture, one registry.

Every model maps a normalised (N, 3, H, W) batch to (N, C, H, W) logits at the input resolution, for any
H, W (the ones with strided stages pad internally where they must). Weights are never downloaded.
"""

from __future__ import annotations

from collections.abc import Callable

from torch import nn

MODELS: dict[str, Callable[[int], nn.Module]] = {}


def register(name: str):
    def wrap(builder: Callable[[int], nn.Module]):
        if name in MODELS:
            raise ValueError(f"model {name!r} registered twice")
        MODELS[name] = builder
        return builder

    return wrap


def build_model(arch: str, num_classes: int) -> nn.Module:
    if arch not in MODELS:
        raise ValueError(f"unknown architecture {arch!r}; the zoo has {sorted(MODELS)}")
    if num_classes < 2:
        raise ValueError(f"num_classes must be at least 2, got {num_classes}")
    return MODELS[arch](num_classes)


# Importing the modules fills the registry.
from segmenters.models import deeplab, ladder_densenet, unet  # noqa: E402,F401
