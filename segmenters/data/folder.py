"""A folder (or glob) of the user's own photos as a dataset without ground truth: what an audit of a model
nobody here trained runs on. Every label is the "no label" value, so only targets that need no ground truth
(a class made to disappear from the model's own prediction, a drawn mask) can use it."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from torch.nn import functional as F

from segmenters.data.common import read_rgb
from segmenters.data.frames import image_files

#: the label of every pixel of an unlabelled photo (the spec's default ignore index)
NO_LABEL = 255


class ImageFolder(torch.utils.data.Dataset):
    """(image (3, H, W) float in [0, 1], labels (H, W) all `NO_LABEL`), files in sorted order, resized to `size`."""

    def __init__(self, root: str | Path, size: tuple[int, int] | None = None):
        self.files = image_files(str(root))
        self.size = tuple(size) if size else None
        self.pairs = [(str(path), None) for path in self.files]

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        image = torch.from_numpy(np.ascontiguousarray(read_rgb(self.files[index]))).permute(2, 0, 1)
        if self.size and tuple(image.shape[1:]) != self.size:
            image = F.interpolate(image[None], size=self.size, mode="bilinear", antialias=True)[0]
        return image.float().clamp(0, 1), torch.full(image.shape[1:], NO_LABEL, dtype=torch.long)
