"""Pictures people look at: colour label maps, overlays, entropy maps, side-by-side panels."""

from __future__ import annotations

from pathlib import Path

import cv2
import matplotlib
import numpy as np

matplotlib.use("Agg")
from matplotlib import colormaps  # noqa: E402

IGNORE_COLOR = (255, 255, 255)


def colorize(labels: np.ndarray, palette: np.ndarray, ignore_index: int = 255) -> np.ndarray:
    """(H, W) labels -> (H, W, 3) uint8 using the spec's palette; ignored pixels white."""
    labels = np.asarray(labels)
    out = np.empty(labels.shape + (3,), dtype=np.uint8)
    valid = (labels >= 0) & (labels < len(palette))
    out[valid] = palette[labels[valid]]
    out[~valid] = IGNORE_COLOR
    out[labels == ignore_index] = IGNORE_COLOR
    return out


def to_uint8(image: np.ndarray) -> np.ndarray:
    """(H, W, 3) float [0, 1] or (3, H, W) -> (H, W, 3) uint8."""
    image = np.asarray(image)
    if image.ndim == 3 and image.shape[0] == 3 and image.shape[2] != 3:
        image = image.transpose(1, 2, 0)
    if image.dtype != np.uint8:
        image = (np.clip(image, 0.0, 1.0) * 255.0 + 0.5).astype(np.uint8)
    return image


def overlay(image: np.ndarray, labels: np.ndarray, palette: np.ndarray, alpha: float = 0.5, ignore_index: int = 255):
    base = to_uint8(image).astype(np.float32)
    colours = colorize(labels, palette, ignore_index).astype(np.float32)
    return (base * (1 - alpha) + colours * alpha + 0.5).astype(np.uint8)


def heatmap(values: np.ndarray, vmin: float = 0.0, vmax: float = 1.0, cmap: str = "inferno") -> np.ndarray:
    scaled = np.clip((np.asarray(values, dtype=np.float64) - vmin) / max(vmax - vmin, 1e-12), 0.0, 1.0)
    return (colormaps[cmap](scaled)[..., :3] * 255.0 + 0.5).astype(np.uint8)


def save_panel(path: str | Path, tiles: list[np.ndarray], gap: int = 4, min_height: int = 256) -> None:
    """Tiles (H, W, 3) uint8 side by side, written as PNG; small tiles are enlarged (nearest, integer factor)."""
    height = max(t.shape[0] for t in tiles)
    factor = max(1, -(-min_height // height))
    if factor > 1:
        tiles = [np.repeat(np.repeat(t, factor, axis=0), factor, axis=1) for t in tiles]
        height *= factor
    padded = [np.pad(t, ((0, height - t.shape[0]), (0, gap), (0, 0)), constant_values=255) for t in tiles]
    panel = np.concatenate(padded, axis=1)[:, :-gap]
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    if not cv2.imwrite(str(path), cv2.cvtColor(panel, cv2.COLOR_RGB2BGR)):
        raise OSError(f"could not write {path}")
