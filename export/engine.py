"""The one inference interface: serving, monitoring, engine replay and the edge runner hold an `Engine` and
nothing else.

`segment(frames)` is the call callers make: uint8 camera frames (or float images in the spec's value range) in,
uint8 label maps out. On a GPU, normalisation and argmax run on the device and only uint8 crosses to the host
(float32 logits of 19 classes at 2 MPix are 159 MB a frame, where the labels are 2 MB). `infer` takes what the
network itself takes, (N, 3, H, W) float32 normalised by the spec, and returns (N, C, H, W) float32 logits;
`labels` is `segment` of normalised input. `prepare` turns frames or images into normalised input, the one place
the normalisation arithmetic lives (`frames_to_images`), so every engine and twin sees equal inputs.
"""

from __future__ import annotations

import warnings
from abc import ABC, abstractmethod
from collections.abc import Sequence

import numpy as np
import torch

from segmenters.device import describe_device, fp32_math
from segmenters.spec import ModelSpec
from segmenters.twin import Twin

#: the precisions a PyTorch twin computes in; tf32 is fp32 weights with TF32 tensor-core math (CUDA only)
TORCH_PRECISIONS = ("fp32", "tf32", "fp16", "bf16")


class EngineError(RuntimeError):
    """An engine could not be built, loaded or run."""


class EngineInputError(ValueError):
    """The input given to `Engine.infer` has the wrong rank, channel count, dtype or values."""


class Engine(ABC):
    spec: ModelSpec
    #: what runs the network, e.g. "torch:cpu", "onnxruntime:CPUExecutionProvider", "tensorrt"
    backend: str
    #: precision of the computation: fp32 (TF32 off), tf32, fp16, bf16 or int8
    precision: str = "fp32"
    #: where the network runs: "cpu", "cuda:0", or where a remote engine is reached
    device: str = "cpu"

    @abstractmethod
    def _run(self, images: np.ndarray) -> np.ndarray:
        """Validated (N, 3, H, W) float32 C-contiguous input -> (N, C, H, W) float32 logits."""

    def _labels(self, images: np.ndarray) -> np.ndarray:
        """Validated normalised input -> (N, H, W) labels. Device engines override it: argmax where the logits are."""
        return self._run(images).argmax(axis=1).astype(label_dtype(self.spec))

    def _segment_frames(self, frames: np.ndarray) -> np.ndarray:
        """Validated (N, H, W, 3) uint8 frames -> labels. Device engines override it: normalise on the device."""
        return self._labels(prepare_images(frames, self.spec))

    def infer(self, images: np.ndarray) -> np.ndarray:
        """(N, 3, H, W) float32 normalised images -> (N, C, H, W) float32 logits."""
        images = check_input(images)
        logits = self._run(images)
        expected = (images.shape[0], self.spec.num_classes, *images.shape[2:])
        if logits.shape != expected:
            raise EngineError(f"{self.backend} returned logits of shape {logits.shape}, expected {expected}")
        return logits

    def labels(self, images: np.ndarray) -> np.ndarray:
        """(N, 3, H, W) normalised images -> (N, H, W) uint8 (int32 beyond 256 classes) class indices."""
        images = check_input(images)
        return self._checked_labels(self._labels(images), images.shape[0], images.shape[2:])

    def segment(self, frames: np.ndarray | Sequence[np.ndarray]) -> np.ndarray:
        """Frames or images -> (N, H, W) label maps: the call callers make.

        Takes what `prepare` takes: (N, H, W, 3) / (H, W, 3) uint8 RGB frames, or float (N, 3, H, W) / (3, H, W)
        images in the spec's value range. On the CPU it equals `labels(prepare(frames))` bit for bit."""
        frames = as_batch(frames)
        if frames.dtype != np.uint8:
            return self.labels(self.prepare(frames))
        frames = check_frames(frames)
        return self._checked_labels(self._segment_frames(frames), frames.shape[0], frames.shape[1:3])

    def _checked_labels(self, labels: np.ndarray, count: int, size: tuple[int, ...]) -> np.ndarray:
        expected = (count, *size)
        if labels.shape != expected:
            raise EngineError(f"{self.backend} returned labels of shape {labels.shape}, expected {expected}")
        return labels

    def prepare(self, frames: np.ndarray | Sequence[np.ndarray]) -> np.ndarray:
        """Frames -> normalised engine input, the one place images are normalised for engines.

        Accepts (H, W, 3) or (N, H, W, 3) uint8 RGB frames (0..255), or float (N, 3, H, W) / (3, H, W)
        images in the spec's value range.
        """
        return prepare_images(frames, self.spec)

    def release_memory(self) -> None:
        """Give memory kept from past runs (a runtime's pool) back to the OS; engines that keep none do nothing."""

    @property
    def math(self) -> str:
        """The arithmetic the network really runs in here (what a parity report records)."""
        return self.precision

    def describe(self) -> dict:
        return {"backend": self.backend, "precision": self.precision, "arch": self.spec.arch, "device": self.device,
                "math": self.math}


def label_dtype(spec: ModelSpec) -> type:
    """uint8 label maps, int32 beyond 256 classes."""
    return np.uint8 if spec.num_classes <= 256 else np.int32


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


def as_batch(frames: np.ndarray | Sequence[np.ndarray]) -> np.ndarray:
    """A frame or image, a batch of them, or a sequence of them -> one array with a batch axis."""
    if not isinstance(frames, np.ndarray):
        frames = np.stack([np.asarray(f) for f in frames])
    if frames.dtype == np.uint8 and frames.ndim == 3:
        return frames[None]
    if np.issubdtype(frames.dtype, np.floating) and frames.ndim == 3:
        return frames[None]
    return frames


def check_frames(frames: np.ndarray) -> np.ndarray:
    """(N, H, W, 3) uint8 RGB frames, non-empty, C-contiguous."""
    if frames.ndim != 4 or frames.shape[-1] != 3:
        raise EngineInputError(f"uint8 frames must be (H, W, 3) or (N, H, W, 3) RGB, got shape {frames.shape}")
    if 0 in frames.shape:
        raise EngineInputError(f"frames are empty: shape {frames.shape}")
    return np.ascontiguousarray(frames)


def host_tensor(array: np.ndarray) -> torch.Tensor:
    """A tensor viewing `array` without a copy. Received buffers are often read-only; the tensor is only read,
    so torch's warning about writing to it does not apply."""
    if array.flags.writeable:
        return torch.from_numpy(array)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
        return torch.from_numpy(array)


def frames_to_images(frames: torch.Tensor, spec: ModelSpec) -> torch.Tensor:
    """(N, H, W, 3) uint8 frames (any device) -> (N, 3, H, W) float32 in the spec's value range.

    The same arithmetic as reading an image file to [0, 1] (x / 255), in float32 0-d tensors so that the CPU and
    every device compute the same IEEE operations in the same order."""
    low, high = spec.normalization.value_range
    scalar = {"dtype": torch.float32, "device": frames.device}
    images = frames.permute(0, 3, 1, 2).to(torch.float32) / torch.tensor(255.0, **scalar)
    return images * torch.tensor(high - low, **scalar) + torch.tensor(low, **scalar)


def prepare_images(frames: np.ndarray | Sequence[np.ndarray], spec: ModelSpec) -> np.ndarray:
    frames = as_batch(frames)
    if frames.dtype == np.uint8:
        images = frames_to_images(host_tensor(check_frames(frames)), spec)
    elif np.issubdtype(frames.dtype, np.floating):
        if frames.ndim != 4 or frames.shape[1] != 3:
            raise EngineInputError(f"float images must be (3, H, W) or (N, 3, H, W), got shape {frames.shape}")
        images = host_tensor(np.ascontiguousarray(frames, dtype=np.float32))
    else:
        raise EngineInputError(f"frames must be uint8 RGB or float images, got {frames.dtype}")
    return spec.normalization.normalize(images).contiguous().numpy()


def frames_on_device(frames: np.ndarray, spec: ModelSpec, device: torch.device) -> torch.Tensor:
    """uint8 frames -> normalised (N, 3, H, W) float32 on `device`: only the uint8 frames cross the bus."""
    # a pageable copy: pinning a fresh buffer per call costs more than it saves at these sizes
    on_device = host_tensor(frames).to(device)
    return spec.normalization.normalize(frames_to_images(on_device, spec)).contiguous()


def labels_to_host(logits: torch.Tensor, spec: ModelSpec) -> np.ndarray:
    """Device logits -> host label maps; the argmax runs where the logits are, only labels cross."""
    dtype = torch.uint8 if label_dtype(spec) is np.uint8 else torch.int32
    return logits.argmax(dim=1).to(dtype).cpu().numpy()


class TorchEngine(Engine):
    """The PyTorch twin behind the engine interface: the reference every other engine is gated against.

    `precision`: fp32 (TF32 off on CUDA, so fp32 means fp32), tf32 (CUDA tensor-core math on fp32 weights), fp16
    or bf16 (autocast). `device`: where to put the twin (default: where its model already is)."""

    def __init__(self, twin: Twin, device: str | torch.device | None = None, precision: str = "fp32"):
        if precision not in TORCH_PRECISIONS:
            raise ValueError(f"unknown precision {precision!r} for a PyTorch engine; expected one of {TORCH_PRECISIONS}")
        target = torch.device(device) if device is not None else next(twin.model.parameters()).device
        if target.type != "cuda" and precision == "tf32":
            raise ValueError(f"tf32 is a CUDA math mode; {target} computes fp32")
        self.torch_device = target
        self.model = twin.model.to(target).eval()
        if target.type == "cuda":  # tensor cores read NHWC
            self.model = self.model.to(memory_format=torch.channels_last)
        self.spec, self.precision = twin.spec, precision
        self.device = describe_device(target)
        self.backend = f"torch:{target}"

    def _math_context(self):
        if self.precision in ("fp16", "bf16"):
            dtype = torch.float16 if self.precision == "fp16" else torch.bfloat16
            return torch.autocast(self.torch_device.type, dtype=dtype)
        return fp32_math(self.precision == "fp32" and self.torch_device.type == "cuda")

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """Normalised images already on the device -> logits on the device."""
        if self.torch_device.type == "cuda":
            images = images.contiguous(memory_format=torch.channels_last)
        with torch.inference_mode(), self._math_context():
            return self.model(images)

    def _to_device(self, images: np.ndarray) -> torch.Tensor:
        return host_tensor(images).to(self.torch_device)

    def _run(self, images: np.ndarray) -> np.ndarray:
        return self.forward(self._to_device(images)).float().cpu().numpy()

    def _labels(self, images: np.ndarray) -> np.ndarray:
        return labels_to_host(self.forward(self._to_device(images)), self.spec)

    def _segment_frames(self, frames: np.ndarray) -> np.ndarray:
        return labels_to_host(self.forward(frames_on_device(frames, self.spec, self.torch_device)), self.spec)
