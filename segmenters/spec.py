"""`ModelSpec`: the one record that travels with a model everywhere.

Checkpoints, ONNX metadata, bundle manifests and served model metadata all carry the same JSON. Anything
that needs to know what class 3 means, or how to normalise an image, reads it from here, never from a
constant.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import torch
from pydantic import BaseModel, ConfigDict, Field, field_validator

SPEC_VERSION = 1


class ClassInfo(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")  # one record, read strictly wherever it travels

    name: str
    color: tuple[int, int, int]

    @field_validator("color")
    @classmethod
    def _in_byte_range(cls, value: tuple[int, int, int]) -> tuple[int, int, int]:
        if any(not 0 <= c <= 255 for c in value):
            raise ValueError(f"colour components must lie in 0..255, got {value}")
        return value


class Normalization(BaseModel):
    """Images enter models as float RGB in `value_range`, then `(x - mean) / std` per channel."""

    model_config = ConfigDict(frozen=True, extra="forbid")  # one record, read strictly wherever it travels

    mean: tuple[float, float, float] = (0.485, 0.456, 0.406)
    std: tuple[float, float, float] = (0.229, 0.224, 0.225)
    value_range: tuple[float, float] = (0.0, 1.0)

    def _stats(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        shape = (3, 1, 1) if images.dim() == 3 else (1, 3, 1, 1)
        mean = torch.tensor(self.mean, dtype=images.dtype, device=images.device).view(shape)
        std = torch.tensor(self.std, dtype=images.dtype, device=images.device).view(shape)
        return mean, std

    def normalize(self, images: torch.Tensor) -> torch.Tensor:
        """N,3,H,W (or 3,H,W) images in `value_range` -> normalised model input."""
        mean, std = self._stats(images)
        return (images - mean) / std

    def denormalize(self, images: torch.Tensor) -> torch.Tensor:
        mean, std = self._stats(images)
        return images * std + mean


class ModelSpec(BaseModel):
    """What a model is: architecture, label set, input convention, provenance."""

    model_config = ConfigDict(frozen=True, extra="forbid")  # one record, read strictly wherever it travels

    spec_version: int = SPEC_VERSION
    arch: str
    classes: tuple[ClassInfo, ...]
    ignore_index: int = 255
    normalization: Normalization = Field(default_factory=Normalization)
    input_size: tuple[int, int] = Field(description="nominal (height, width) the model was trained at")
    dataset: str
    checkpoint_digest: str | None = None
    training: dict = Field(default_factory=dict, description="loss, steps, seed: how the weights came to be")

    @field_validator("classes")
    @classmethod
    def _at_least_two(cls, value: tuple[ClassInfo, ...]) -> tuple[ClassInfo, ...]:
        if len(value) < 2:
            raise ValueError("a segmentation model needs at least two classes")
        return value

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    @property
    def class_names(self) -> list[str]:
        return [c.name for c in self.classes]

    def palette(self) -> np.ndarray:
        """(num_classes, 3) uint8 colours, indexable by a label map."""
        return np.array([c.color for c in self.classes], dtype=np.uint8)

    def to_json(self) -> str:
        return self.model_dump_json()

    @classmethod
    def from_json(cls, text: str | bytes) -> ModelSpec:
        return cls.model_validate_json(text)

    def with_updates(self, **changes) -> ModelSpec:
        return self.model_validate({**self.model_dump(), **changes})


def file_digest(path: str | Path) -> str:
    sha = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            sha.update(block)
    return "sha256:" + sha.hexdigest()


def state_dict_digest(state_dict: dict[str, torch.Tensor]) -> str:
    """Digest of the weights themselves, independent of how the checkpoint file was pickled."""
    sha = hashlib.sha256()
    for key in sorted(state_dict):
        tensor = state_dict[key].detach().cpu().contiguous()
        sha.update(key.encode())
        sha.update(json.dumps([str(tensor.dtype), list(tensor.shape)]).encode())
        sha.update(tensor.numpy().tobytes() if tensor.dtype != torch.bfloat16 else tensor.float().numpy().tobytes())
    return "sha256:" + sha.hexdigest()
