"""The image endpoint: an upload checked against the request's memory budget from its header alone, then
decoded; and its answers: a label-map PNG (palette PNG whose pixel values are class indices and whose palette is
the spec's colours), a colour overlay, or class areas as JSON. The client chooses with `?output=` or, failing
that, with its Accept header."""

from __future__ import annotations

import io

import numpy as np
from PIL import Image

from segmenters.data.frames import ImageDecodeError, decode_image
from segmenters.spec import ModelSpec
from segmenters.visualize import label_image, overlay
from serving.config import ModelConfig
from serving.model import check_budget
from serving.protocol import ProtocolError

IMAGE_OUTPUTS = ("labels", "overlay", "areas")
UPLOAD_TYPES = ("image/png", "image/jpeg", "image/jpg", "image/webp", "image/bmp", "image/tiff",
                "application/octet-stream")
#: bytes a pixel of PIL's decoded image (every multi-band mode is 4 bytes a pixel inside PIL)
PIL_BYTES_PER_PIXEL = 4
#: the ingress's peak while decoding an upload, a pixel: PIL's decoded image, its EXIF-rotated copy and its RGB
#: conversion (PIL's 4 bytes each), then the (H, W, 3) uint8 array handed on (3 bytes)
DECODE_BYTES_PER_PIXEL = 3 * PIL_BYTES_PER_PIXEL + 3
#: the uint8 RGB frame sent to the replica, a pixel
FRAME_BYTES_PER_PIXEL = 3


def upload_memory_bytes(width: int, height: int, model: ModelConfig) -> int:
    """What an upload of width x height pixels needs: decoding it, its frame, and the engine's run on it."""
    return width * height * (DECODE_BYTES_PER_PIXEL + FRAME_BYTES_PER_PIXEL + model.bytes_per_pixel)


def image_size(data: bytes) -> tuple[int, int]:
    """(width, height) from an encoded image's header; no pixel is decoded (PIL reads sizes lazily)."""
    if not data:
        raise ProtocolError("empty image: 0 bytes")
    try:
        with Image.open(io.BytesIO(data)) as image:
            return image.size
    except Image.DecompressionBombError as exc:  # PIL's own refusal, past twice its MAX_IMAGE_PIXELS
        raise ProtocolError(f"image refused before decoding: {exc}", status=413) from None
    except Exception as exc:  # PIL raises UnidentifiedImageError, OSError, SyntaxError, ... for bad bytes
        reason = "not a recognised image format" if isinstance(exc, Image.UnidentifiedImageError) else str(exc)
        raise ProtocolError(f"cannot decode image ({len(data)} bytes): {reason}") from None


def decode_upload(data: bytes, model: ModelConfig, budget_bytes: int) -> np.ndarray:
    """An uploaded image -> (H, W, 3) uint8 RGB, or a 413 naming its size and the budget when decoding and
    running it would need more than `budget_bytes` (judged from the header, before any pixel is decoded)."""
    width, height = image_size(data)
    check_budget(f"image {width}x{height} ({width * height} pixels)", upload_memory_bytes(width, height, model),
                 budget_bytes)
    try:
        return decode_image(data, max_pixels=width * height)
    except ImageDecodeError as exc:
        raise ProtocolError(str(exc)) from None


def choose_output(output: str | None, accept: str | None) -> str:
    if output is not None:
        if output not in IMAGE_OUTPUTS:
            raise ProtocolError(f"output={output!r} is not one of {', '.join(IMAGE_OUTPUTS)}")
        return output
    accept = (accept or "").lower()
    if "application/json" in accept:
        return "areas"
    if "image/jpeg" in accept:
        return "overlay"
    return "labels"


def check_upload_type(content_type: str | None) -> None:
    kind = (content_type or "").split(";")[0].strip().lower()
    if kind not in UPLOAD_TYPES:
        raise ProtocolError(f"Content-Type {content_type!r} is not an image upload: send the file's bytes as "
                            f"{', '.join(UPLOAD_TYPES[:2])} (or application/octet-stream)", status=415)


def label_png(labels: np.ndarray, spec: ModelSpec) -> bytes:
    """(H, W) class indices -> a palette PNG: values are class indices, the palette shows the classes' colours."""
    return _encode(label_image(labels, spec.palette()), "PNG")


def overlay_image(rgb: np.ndarray, labels: np.ndarray, spec: ModelSpec, jpeg: bool) -> bytes:
    blended = overlay(rgb, labels, spec.palette(), alpha=0.5, ignore_index=spec.ignore_index)
    return _encode(Image.fromarray(blended), "JPEG" if jpeg else "PNG")


def class_areas(labels: np.ndarray, spec: ModelSpec) -> dict:
    """Pixels and share of the image per class, every class listed (zero where absent)."""
    counts = np.bincount(labels.reshape(-1).astype(np.int64), minlength=spec.num_classes)
    total = int(labels.size)
    return {
        "height": int(labels.shape[0]), "width": int(labels.shape[1]),
        "classes": [
            {"index": index, "name": info.name, "color": list(info.color), "pixels": int(counts[index]),
             "fraction": float(counts[index]) / total}
            for index, info in enumerate(spec.classes)
        ],
    }


def _encode(image: Image.Image, fmt: str) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **({"quality": 90} if fmt == "JPEG" else {}))
    return buffer.getvalue()
