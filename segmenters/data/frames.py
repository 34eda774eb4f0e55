"""Where frames come from, described and decoded: image files, a folder or glob of them, a video file, a camera
index, or an RTSP/HTTP stream. Reading them in order, with reconnects and a bounded buffer, is `monitor.streams`'.

`decode_image` is the one strict decoder of encoded images (files here, uploads in the service): truncated
files are refused rather than returned half grey, as OpenCV would."""

from __future__ import annotations

import glob
from pathlib import Path

import io

import cv2
import numpy as np
from PIL import Image, ImageOps

#: the largest image decoded by default (a 4096 x 4096 frame); beyond it a file is refused before decoding
MAX_IMAGE_PIXELS = 4096 * 4096
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp")
VIDEO_SUFFIXES = (".mp4", ".avi", ".mkv", ".mov", ".webm", ".m4v")
STREAM_SCHEMES = ("rtsp://", "rtsps://", "http://", "https://", "udp://", "tcp://")


class ImageDecodeError(ValueError):
    """Bytes that are not a complete PNG/JPEG/... image."""


class ImageTooLargeError(ImageDecodeError):
    """An image with more pixels than the decoder was allowed; refused before decoding."""


def decode_image(data: bytes, max_pixels: int = MAX_IMAGE_PIXELS) -> np.ndarray:
    """Encoded image bytes -> (H, W, 3) uint8 RGB, EXIF orientation applied. Raises `ImageDecodeError` naming
    what is wrong: empty, not an image, truncated or corrupt, or more than `max_pixels` pixels."""
    if not data:
        raise ImageDecodeError("empty image: 0 bytes")
    try:
        with Image.open(io.BytesIO(data)) as image:
            width, height = image.size
            if width * height > max_pixels:
                raise ImageTooLargeError(f"image is {width}x{height} = {width * height} pixels, over the limit of "
                                       f"{max_pixels}")
            image.load()  # decodes fully: a truncated file raises here instead of yielding grey rows
            image = ImageOps.exif_transpose(image)
            rgb = np.asarray(image.convert("RGB"), dtype=np.uint8)
    except ImageDecodeError:
        raise
    except Image.DecompressionBombError as exc:
        raise ImageTooLargeError(f"image refused as a decompression bomb: {exc}") from exc
    except Exception as exc:  # PIL raises UnidentifiedImageError, OSError, SyntaxError, ... for bad bytes
        reason = "not a recognised image format" if isinstance(exc, Image.UnidentifiedImageError) else str(exc)
        raise ImageDecodeError(f"cannot decode image ({len(data)} bytes): {reason}") from exc
    return np.ascontiguousarray(rgb)


def describe_source(source: str | int) -> str:
    if isinstance(source, int) or str(source).isdigit():
        return f"camera {int(source)}"
    text = str(source)
    if text.startswith(STREAM_SCHEMES):
        return f"stream {text}"
    path = Path(text)
    if path.is_dir():
        return f"image folder {path}"
    if path.suffix.lower() in VIDEO_SUFFIXES:
        return f"video {path}"
    return f"images {text}"


def image_files(text: str) -> list[Path]:
    path = Path(text)
    if path.is_dir():
        files = sorted(p for p in path.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
    elif path.is_file():
        files = [path]
    else:
        files = sorted(Path(p) for p in glob.glob(text) if Path(p).suffix.lower() in IMAGE_SUFFIXES)
    if not files:
        raise FileNotFoundError(f"no frames at {text!r}: expected an image, a folder or glob of images, a video "
                                f"({', '.join(VIDEO_SUFFIXES)}), a camera index or a stream URL")
    return files


def capture_fps(source: str | int, default: float = 25.0) -> float:
    """The frame rate a video file or camera reports (default when it reports none)."""
    capture = cv2.VideoCapture(int(source) if str(source).isdigit() else str(source))
    try:
        fps = capture.get(cv2.CAP_PROP_FPS) if capture.isOpened() else 0.0
    finally:
        capture.release()
    return fps if fps and fps > 0 else default
