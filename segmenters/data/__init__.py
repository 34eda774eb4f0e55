"""Datasets by name: synthetic shapes, CamVid, Cityscapes, PASCAL VOC; one builder for all of them."""

from __future__ import annotations

from pathlib import Path

import torch

from segmenters.data.common import DatasetError, default_data_root
from segmenters.data.real import CamVid, Cityscapes, VOCSegmentation
from segmenters.data.shapes import ShapesDataset
from segmenters.data.transforms import resize_to, train_augmentation
from segmenters.spec import ClassInfo

DATASETS = {"shapes": ShapesDataset, "camvid": CamVid, "cityscapes": Cityscapes, "voc": VOCSegmentation}
# Where each real dataset sits under the data root (../shared/data by default).
DEFAULT_SUBDIRS = {"camvid": "camvid", "cityscapes": "fixtures/cityscapes", "voc": "fixtures/voc"}


def dataset_classes(name: str) -> tuple[ClassInfo, ...]:
    if name not in DATASETS:
        raise DatasetError(f"unknown dataset {name!r}; expected one of {sorted(DATASETS)}")
    return DATASETS[name].classes


def build_dataset(
    name: str,
    split: str,
    *,
    root: str | Path | None = None,
    size: tuple[int, int] | None = None,
    train: bool = False,
    crop: tuple[int, int] | None = None,
    scale_range: tuple[float, float] = (0.5, 2.0),
    length: int = 2000,
    seed: int = 0,
    cache: bool = False,
) -> torch.utils.data.Dataset:
    """`size` is the (height, width) images are brought to (real data: resized; shapes: rendered at);
    `train=True` adds random scale, crop (to `crop`, default `size`) and flip to real data."""
    if name not in DATASETS:
        raise DatasetError(f"unknown dataset {name!r}; expected one of {sorted(DATASETS)}")
    if name == "shapes":
        return ShapesDataset(split=split, length=length, seed=seed, size=size or (128, 128), cache=cache)
    root = Path(root) if root else default_data_root() / DEFAULT_SUBDIRS[name]
    if train:
        if size is None:
            raise DatasetError(f"{name}: training augmentation needs a base size")
        transform = train_augmentation(size, crop or size, scale_range, ignore_index=DATASETS[name].ignore_index)
    else:
        transform = resize_to(size) if size else None
    return DATASETS[name](root, split=split, transform=transform)


__all__ = ["DATASETS", "DatasetError", "build_dataset", "dataset_classes", "default_data_root"]
