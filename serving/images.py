"""The image endpoint's answers: a label-map PNG (palette PNG whose pixel values are class indices and whose
palette is the spec's colours), a colour overlay, or class areas as JSON. The client chooses with `?output=`
or, failing that, with its Accept header."""

from __future__ import annotations

import io

import numpy as np
from PIL import Image

from segmenters.spec import ModelSpec
from segmenters.visualize import label_image, overlay
from serving.protocol import ProtocolError

IMAGE_OUTPUTS = ("labels", "overlay", "areas")
UPLOAD_TYPES = ("image/png", "image/jpeg", "image/jpg", "image/webp", "image/bmp", "image/tiff",
                "application/octet-stream")


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
