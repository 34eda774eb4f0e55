"""The one inference interface: serving, monitoring, engine replay and the edge runner hold an `Engine` and
nothing else.

`infer` takes what the network itself takes, (N, 3, H, W) float32 already normalised by the spec, and returns
(N, C, H, W) float32 logits. `prepare` turns camera frames or [0, 1] images into that input, so every caller
normalises the same way, from the spec.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence

import numpy as np
import torch

from segmenters.spec import ModelSpec
from segmenters.twin import Twin


class EngineError(RuntimeError):
    """An engine could not be built, loaded or run."""


class EngineInputError(ValueError):
    """The input given to `Engine.infer` has the wrong rank, channel count, dtype or values."""


class Engine(ABC):
    spec: ModelSpec
    #: what runs the network, e.g. "torch:cpu", "onnxruntime:CPUExecutionProvider", "tensorrt"
    backend: str
    #: precision of the computation: fp32, fp16 or int8
    precision: str = "fp32"

    @abstractmethod
    def _run(self, images: np.ndarray) -> np.ndarray:
        """Validated (N, 3, H, W) float32 C-contiguous input -> (N, C, H, W) float32 logits."""

    def infer(self, images: np.ndarray) -> np.ndarray:
        """(N, 3, H, W) float32 normalised images -> (N, C, H, W) float32 logits."""
        images = check_input(images)
        logits = self._run(images)
        expected = (images.shape[0], self.spec.num_classes, *images.shape[2:])
        if logits.shape != expected:
            raise EngineError(f"{self.backend} returned logits of shape {logits.shape}, expected {expected}")
        return logits

    def labels(self, images: np.ndarray) -> np.ndarray:
        """(N, 3, H, W) normalised images -> (N, H, W) uint8 (or int32 beyond 256 classes) class indices."""
        dtype = np.uint8 if self.spec.num_classes <= 256 else np.int32
        return self.infer(images).argmax(axis=1).astype(dtype)

    def segment(self, frames: np.ndarray | Sequence[np.ndarray]) -> np.ndarray:
        """Frames or images -> (N, H, W) label maps: the call callers make.

        Takes what `prepare` takes ((N, H, W, 3) / (H, W, 3) uint8 RGB frames, or float (N, 3, H, W) / (3, H, W)
        images in the spec's value range). Engines on a GPU override it so that normalisation and argmax run on
        the device and only uint8 crosses to the host; this default equals `labels(prepare(frames))`."""
        return self.labels(self.prepare(frames))

    def prepare(self, frames: np.ndarray | Sequence[np.ndarray]) -> np.ndarray:
        """Frames -> normalised engine input, the one place images are normalised for engines.

        Accepts (H, W, 3) or (N, H, W, 3) uint8 RGB frames (0..255), or float (N, 3, H, W) / (3, H, W)
        images in the spec's value range.
        """
        return prepare_images(frames, self.spec)

    def describe(self) -> dict:
        return {"backend": self.backend, "precision": self.precision, "arch": self.spec.arch}


def check_input(images: np.ndarray) -> np.ndarray:
    if not isinstance(images, np.ndarray):
        raise EngineInputError(f"engine input must be a numpy array, got {type(images).__name__}")
    if images.ndim != 4 or images.shape[1] != 3:
        raise EngineInputError(f"engine input must be (N, 3, H, W), got shape {images.shape}")
    if images.shape[0] == 0 or images.shape[2] == 0 or images.shape[3] == 0:
        raise EngineInputError(f"engine input is empty: shape {images.shape}")
    if images.dtype != np.float32:
        raise EngineInputError(f"engine input must be float32 (normalised), got {images.dtype}")
    if not np.isfinite(images).all():
        raise EngineInputError("engine input contains NaN or infinite values")
    return np.ascontiguousarray(images)


def prepare_images(frames: np.ndarray | Sequence[np.ndarray], spec: ModelSpec) -> np.ndarray:
    if not isinstance(frames, np.ndarray):
        frames = np.stack([np.asarray(f) for f in frames])
    if frames.dtype == np.uint8:
        if frames.ndim == 3:
            frames = frames[None]
        if frames.ndim != 4 or frames.shape[-1] != 3:
            raise EngineInputError(f"uint8 frames must be (H, W, 3) or (N, H, W, 3) RGB, got shape {frames.shape}")
        low, high = spec.normalization.value_range
        # Same arithmetic as reading an image file to [0, 1] (x / 255), so engines and twins see equal inputs.
        images = (frames.transpose(0, 3, 1, 2).astype(np.float32) / np.float32(255.0)) * np.float32(high - low)
        images += np.float32(low)
    elif np.issubdtype(frames.dtype, np.floating):
        images = frames[None] if frames.ndim == 3 else frames
        if images.ndim != 4 or images.shape[1] != 3:
            raise EngineInputError(f"float images must be (3, H, W) or (N, 3, H, W), got shape {frames.shape}")
    else:
        raise EngineInputError(f"frames must be uint8 RGB or float images, got {frames.dtype}")
    normalised = spec.normalization.normalize(torch.from_numpy(np.ascontiguousarray(images, dtype=np.float32)))
    return normalised.numpy()


class TorchEngine(Engine):
    """The PyTorch twin behind the engine interface: the reference every other engine is gated against."""

    def __init__(self, twin: Twin, device: str | torch.device = "cpu"):
        self.device = torch.device(device)
        self.model = twin.model.to(self.device).eval()
        self.spec = twin.spec
        self.backend = f"torch:{self.device.type}"

    @torch.inference_mode()
    def _run(self, images: np.ndarray) -> np.ndarray:
        logits = self.model(torch.from_numpy(images).to(self.device))
        return logits.float().cpu().numpy()
