"""Pictures people look at: colour label maps, overlays, entropy maps, titled side-by-side panels, and label
maps as palette PNGs (the one way served and edge labels are written)."""

from __future__ import annotations

from pathlib import Path

import matplotlib
import numpy as np
from PIL import Image

matplotlib.use("Agg")
from matplotlib import colormaps  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402

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


def save_panel(path: str | Path, tiles: list[np.ndarray], titles: list[str], min_height: int = 256,
               dpi: int = 100) -> None:
    """Tiles (H, W, 3) uint8 side by side, each under its title, written as PNG; small tiles are drawn enlarged
    (nearest neighbour) to at least `min_height` pixels. A `Figure` of its own, not pyplot: safe in threads."""
    if len(titles) != len(tiles):
        raise ValueError(f"a panel needs one title per tile: {len(tiles)} tiles, {len(titles)} titles")
    height = max(t.shape[0] for t in tiles)
    scale = max(1.0, min_height / height)
    widths = [t.shape[1] * scale for t in tiles]
    figure = Figure(figsize=(sum(widths) / dpi, height * scale / dpi + 0.4))  # + a line of title
    axes = figure.subplots(1, len(tiles), squeeze=False, gridspec_kw={"width_ratios": widths})[0]
    for ax, tile, title in zip(axes, tiles, titles):
        ax.imshow(tile, interpolation="nearest")
        ax.set_title(title, fontsize=9)
        ax.set_axis_off()
    figure.tight_layout(pad=0.3)
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=dpi, format="png")


#: a PNG palette holds at most this many colours; label maps of more classes are written as 16-bit greyscale
PNG_PALETTE_SIZE = 256


def label_image(labels: np.ndarray, palette: np.ndarray) -> Image.Image:
    """(H, W) class indices -> a palette ("P") image whose pixel values are the class indices and whose palette
    is `palette` (the spec's colours), so viewers show colours and readers get indices; beyond 256 classes a
    16-bit greyscale ("I;16") image of the indices."""
    labels = np.asarray(labels)
    if labels.ndim != 2:
        raise ValueError(f"a label map is (H, W) class indices, got shape {labels.shape}")
    if len(palette) > PNG_PALETTE_SIZE:
        return Image.fromarray(labels.astype(np.uint16))
    image = Image.fromarray(labels.astype(np.uint8), mode="P")
    colours = np.zeros((PNG_PALETTE_SIZE, 3), np.uint8)
    colours[: len(palette)] = palette
    image.putpalette(colours.reshape(-1).tolist())
    return image


def save_label_png(path: str | Path, labels: np.ndarray, palette: np.ndarray) -> None:
    """A label map as a palette PNG at `path` (see `label_image`)."""
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    label_image(labels, palette).save(path, format="PNG")
