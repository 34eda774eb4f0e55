"""Reading images and label maps with errors that name the file, and the folder-dataset base."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

from segmenters.data.transforms import JointTransform
from segmenters.spec import ClassInfo


class DatasetError(ValueError):
    """A dataset file is missing, unreadable or inconsistent; the message names it."""


def default_data_root() -> Path:
    """`$PATCHWATCH_DATA`, else `../shared/data` beside the project checkout."""
    env = os.environ.get("PATCHWATCH_DATA")
    if env:
        return Path(env)
    return Path(__file__).resolve().parents[2].parent / "shared" / "data"


def _open(path: Path) -> Image.Image:
    if not path.is_file():
        raise DatasetError(f"missing file: {path}")
    try:
        image = Image.open(path)
        image.load()  # decode now so a truncated file fails here, naming itself
    except (UnidentifiedImageError, OSError, SyntaxError) as exc:
        raise DatasetError(f"cannot decode image {path}: {exc}") from exc
    return image


def read_rgb(path: str | Path) -> np.ndarray:
    """(H, W, 3) float32 in [0, 1]."""
    image = _open(Path(path))
    return np.asarray(image.convert("RGB"), dtype=np.float32) / 255.0


def read_label_image(path: str | Path) -> Image.Image:
    return _open(Path(path))


def read_index_label(path: str | Path) -> np.ndarray:
    """A single-channel label PNG (L, P or I;16) as an int64 array."""
    image = _open(Path(path))
    if image.mode not in ("L", "P", "I", "I;16"):
        raise DatasetError(f"label map {path} has mode {image.mode}, expected a single-channel PNG")
    return np.asarray(image).astype(np.int64)


class SegmentationFolder(torch.utils.data.Dataset):
    """Pairs of (image file, label file) -> ((3,H,W) float [0,1] image, (H,W) int64 label) tensors."""

    name = "folder"
    classes: tuple[ClassInfo, ...] = ()
    ignore_index = 255

    def __init__(self, pairs: list[tuple[Path, Path]], transform: JointTransform | None = None):
        if not pairs:
            raise DatasetError(f"{self.name}: no image/label pairs found")
        for image_path, label_path in pairs:
            for path in (image_path, label_path):
                if not Path(path).is_file():
                    raise DatasetError(f"{self.name}: missing file {path}")
        self.pairs = pairs
        self.transform = transform

    def __len__(self) -> int:
        return len(self.pairs)

    def load_label(self, path: Path) -> np.ndarray:
        """Label file -> train ids in 0..C-1 plus `ignore_index`."""
        return read_index_label(path)

    def load(self, index: int) -> tuple[np.ndarray, np.ndarray]:
        image_path, label_path = self.pairs[index]
        image = read_rgb(image_path)
        label = self.load_label(label_path)
        if image.shape[:2] != label.shape:
            raise DatasetError(
                f"{self.name}: image {image_path} is {image.shape[1]}x{image.shape[0]} but label "
                f"{label_path} is {label.shape[1]}x{label.shape[0]}"
            )
        valid = (label == self.ignore_index) | ((label >= 0) & (label < len(self.classes)))
        if not valid.all():
            bad = np.unique(label[~valid])[:10].tolist()
            raise DatasetError(f"{self.name}: label {label_path} has values {bad} outside the class table")
        return image, label

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        image, label = self.load(index)
        image_t = torch.from_numpy(image).permute(2, 0, 1).contiguous()
        label_t = torch.from_numpy(label)
        if self.transform is not None:
            image_t, label_t = self.transform(image_t, label_t)
        return image_t, label_t
