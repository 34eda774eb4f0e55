"""Seeds from attribution maps (thesis 002, section 4.4.1), and their quality against ground truth.

For each class present, threshold its attribution map at `k` times its maximum; a pixel that is a seed of
several classes goes to the class with the smallest seed area; a pixel whose attribution is negative for every
class is background (when the label set has one); the rest are unknown. Quality (section 4.4.2): pixel
accuracy over seed and background pixels, and area ratio = those pixels / all pixels.
"""

from __future__ import annotations

import numpy as np

UNKNOWN = 255


def attribution_seeds(maps: dict[int, np.ndarray], k: float, background: int | None = None) -> np.ndarray:
    """`maps`: class -> (H, W) attribution at image resolution. Returns (H, W) uint8 seeds, UNKNOWN elsewhere."""
    if not maps:
        raise ValueError("no attribution maps: seeds need at least one class")
    if not 0 < k <= 1:
        raise ValueError(f"k is a fraction of each map's maximum, in (0, 1]; got {k}")
    shapes = {m.shape for m in maps.values()}
    if len(shapes) != 1:
        raise ValueError(f"attribution maps differ in shape: {sorted(shapes)}")
    shape = shapes.pop()
    seeds = np.full(shape, UNKNOWN, np.uint8)
    masks = {c: (m > 0) & (m >= k * m.max()) if m.max() > 0 else np.zeros(shape, bool) for c, m in maps.items()}
    # smallest seed area wins where seeds overlap: paint the largest first, smaller ones over them
    for cls in sorted(masks, key=lambda c: (-int(masks[c].sum()), c)):
        seeds[masks[cls]] = cls
    if background is not None:
        negative = np.all(np.stack([m < 0 for m in maps.values()]), axis=0)
        seeds[negative & (seeds == UNKNOWN)] = background
    return seeds


def seed_quality(seeds: np.ndarray, truth: np.ndarray, ignore_index: int | None = None) -> dict:
    """Pixel accuracy over the pixels given a label (seed or background) and the area ratio they cover; pixels
    whose ground truth is `ignore_index` count in neither."""
    valid = np.ones(truth.shape, bool) if ignore_index is None else truth != ignore_index
    labelled = (seeds != UNKNOWN) & valid
    total, correct = int(valid.sum()), int((seeds[labelled] == truth[labelled]).sum())
    return {"pixel_accuracy": correct / int(labelled.sum()) if labelled.any() else float("nan"),
            "area_ratio": float(labelled.sum()) / total if total else float("nan"),
            "correct_pixels": correct, "seed_pixels": int(labelled.sum()), "valid_pixels": total}
