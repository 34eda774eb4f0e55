"""Joint image/mask augmentation on torchvision's transforms v2, which keeps a `Mask` aligned with its image
(nearest-neighbour resizing, the ignore label as fill), as torchvision's segmentation references do."""

from __future__ import annotations

import torch
from torchvision import tv_tensors
from torchvision.transforms import v2


class JointTransform:
    def __init__(self, transforms: list[v2.Transform]):
        self.pipeline = v2.Compose(transforms)

    def __call__(self, image: torch.Tensor, label: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        out_image, out_label = self.pipeline(tv_tensors.Image(image), tv_tensors.Mask(label))
        return out_image.as_subclass(torch.Tensor), out_label.as_subclass(torch.Tensor)


def resize_to(size: tuple[int, int]) -> JointTransform:
    """Evaluation: a fixed (height, width), nearest for the label."""
    return JointTransform([v2.Resize(list(size), antialias=True)])


def train_augmentation(
    base_size: tuple[int, int],
    crop_size: tuple[int, int],
    scale_range: tuple[float, float] = (0.5, 2.0),
    hflip: float = 0.5,
    ignore_index: int = 255,
) -> JointTransform:
    """Random scale of the base size, random crop (padded with the ignore label), random horizontal flip."""
    short = min(base_size)
    lo, hi = scale_range
    if not 0 < lo <= hi:
        raise ValueError(f"scale_range must satisfy 0 < min <= max, got {scale_range}")
    return JointTransform(
        [
            # RandomResize draws the shorter side uniformly in [min, max).
            v2.RandomResize(max(8, int(short * lo)), max(9, int(short * hi) + 1), antialias=True),
            v2.RandomCrop(list(crop_size), pad_if_needed=True, fill={tv_tensors.Mask: ignore_index, "others": 0}),
            v2.RandomHorizontalFlip(hflip),
        ]
    )
