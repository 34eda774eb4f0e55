"""Loaders for the real datasets: CamVid (SegNet copy), Cityscapes (official layout), PASCAL VOC."""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path

import numpy as np
from cityscapesscripts.helpers.labels import labels as cityscapes_labels

from segmenters.data.common import DatasetError, SegmentationFolder, read_label_image
from segmenters.data.transforms import JointTransform
from segmenters.spec import ClassInfo

# ------------------------------------------------------------------------------------------------ CamVid
CAMVID_CLASSES = tuple(
    ClassInfo(name=n, color=c)
    for n, c in [
        ("Sky", (128, 128, 128)),
        ("Building", (128, 0, 0)),
        ("Pole", (192, 192, 128)),
        ("Road", (128, 64, 128)),
        ("Pavement", (60, 40, 222)),
        ("Tree", (128, 128, 0)),
        ("SignSymbol", (192, 128, 128)),
        ("Fence", (64, 64, 128)),
        ("Car", (64, 0, 128)),
        ("Pedestrian", (64, 64, 0)),
        ("Bicyclist", (0, 128, 192)),
    ]
)
CAMVID_VOID = 11


class CamVid(SegmentationFolder):
    """SegNet's CamVid copy: `{split}/*.png` with `{split}annot/*.png` holding 0..10 and 11 = void."""

    name = "camvid"
    classes = CAMVID_CLASSES

    def __init__(self, root: str | Path, split: str = "train", transform: JointTransform | None = None):
        root = Path(root)
        if split not in ("train", "val", "test"):
            raise DatasetError(f"camvid: unknown split {split!r}; expected train, val or test")
        image_dir, label_dir = root / split, root / f"{split}annot"
        if not image_dir.is_dir():
            raise DatasetError(f"camvid: missing image folder {image_dir}")
        if not label_dir.is_dir():
            raise DatasetError(f"camvid: missing label folder {label_dir}")
        pairs = [(p, label_dir / p.name) for p in sorted(image_dir.glob("*.png"))]
        super().__init__(pairs, transform)

    def load_label(self, path: Path) -> np.ndarray:
        label = super().load_label(path)
        label[label == CAMVID_VOID] = self.ignore_index
        return label


# -------------------------------------------------------------------------------------------- Cityscapes
CITYSCAPES_CLASSES = tuple(
    ClassInfo(name=label.name, color=tuple(label.color))
    for label in sorted(
        (lab for lab in cityscapes_labels if 0 <= lab.trainId < 255), key=lambda lab: lab.trainId
    )
)


@lru_cache(maxsize=1)
def cityscapes_label_to_train_id() -> np.ndarray:
    """labelId -> trainId lookup table from the official `cityscapesscripts` table (255 = ignore)."""
    table = np.full(256, 255, dtype=np.int64)
    for label in cityscapes_labels:
        if 0 <= label.id < 256:
            table[label.id] = label.trainId if 0 <= label.trainId < 255 else 255
    return table


class Cityscapes(SegmentationFolder):
    """Official layout: leftImg8bit/{split}/{city}/X_leftImg8bit.png + gtFine/{split}/{city}/X_gtFine_labelIds.png."""

    name = "cityscapes"
    classes = CITYSCAPES_CLASSES

    def __init__(self, root: str | Path, split: str = "val", transform: JointTransform | None = None):
        root = Path(root)
        image_dir = root / "leftImg8bit" / split
        if not image_dir.is_dir():
            raise DatasetError(f"cityscapes: missing image folder {image_dir}")
        pairs = []
        for image_path in sorted(image_dir.glob("*/*_leftImg8bit.png")):
            stem = image_path.name[: -len("_leftImg8bit.png")]
            label_path = root / "gtFine" / split / image_path.parent.name / f"{stem}_gtFine_labelIds.png"
            pairs.append((image_path, label_path))
        super().__init__(pairs, transform)

    def load_label(self, path: Path) -> np.ndarray:
        label_ids = super().load_label(path)
        if label_ids.max() > 255 or label_ids.min() < 0:
            raise DatasetError(f"cityscapes: {path} is not a labelIds map (values outside 0..255)")
        return cityscapes_label_to_train_id()[label_ids]


# --------------------------------------------------------------------------------------------------- VOC
VOC_NAMES = (
    "background", "aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair", "cow",
    "diningtable", "dog", "horse", "motorbike", "person", "pottedplant", "sheep", "sofa", "train", "tvmonitor",
)


def voc_colormap(n: int = 256) -> np.ndarray:
    """PASCAL VOC's bit-interleaved palette (the devkit's labelcolormap)."""
    cmap = np.zeros((n, 3), dtype=np.uint8)
    for i in range(n):
        r = g = b = 0
        c = i
        for j in range(8):
            r |= ((c >> 0) & 1) << (7 - j)
            g |= ((c >> 1) & 1) << (7 - j)
            b |= ((c >> 2) & 1) << (7 - j)
            c >>= 3
        cmap[i] = (r, g, b)
    return cmap


VOC_CLASSES = tuple(ClassInfo(name=n, color=tuple(int(v) for v in voc_colormap()[i])) for i, n in enumerate(VOC_NAMES))


class VOCSegmentation(SegmentationFolder):
    """VOC-style pairs. Either the VOC2012 layout (JPEGImages/ + SegmentationClass/ + ImageSets list)
    or flat `N_image.png` / `N_target.png` pairs. Targets may be palette PNGs or RGB colour PNGs."""

    name = "voc"
    classes = VOC_CLASSES

    def __init__(self, root: str | Path, split: str = "val", transform: JointTransform | None = None):
        root = Path(root)
        split_file = root / "ImageSets" / "Segmentation" / f"{split}.txt"
        if split_file.is_file():
            ids = [line.strip() for line in split_file.read_text().splitlines() if line.strip()]
            pairs = [(root / "JPEGImages" / f"{i}.jpg", root / "SegmentationClass" / f"{i}.png") for i in ids]
        elif root.is_dir():
            images = sorted(root.glob("*_image.png"), key=lambda p: p.name)
            pairs = [(p, p.with_name(p.name.replace("_image.png", "_target.png"))) for p in images]
        else:
            raise DatasetError(f"voc: missing folder {root}")
        super().__init__(pairs, transform)

    def load_label(self, path: Path) -> np.ndarray:
        image = read_label_image(path)
        if image.mode in ("P", "L"):
            return np.asarray(image).astype(np.int64)  # palette index = class id, 255 = void
        rgb = np.asarray(image.convert("RGB")).astype(np.int64)
        codes = (rgb[..., 0] << 16) | (rgb[..., 1] << 8) | rgb[..., 2]
        cmap = voc_colormap().astype(np.int64)
        lookup = {int((c[0] << 16) | (c[1] << 8) | c[2]): i for i, c in enumerate(cmap[: len(VOC_NAMES)])}
        lookup[int((cmap[255, 0] << 16) | (cmap[255, 1] << 8) | cmap[255, 2])] = 255
        label = np.full(codes.shape, -1, dtype=np.int64)
        for code in np.unique(codes):
            if int(code) not in lookup:
                color = ((code >> 16) & 255, (code >> 8) & 255, code & 255)
                raise DatasetError(f"voc: target {path} has colour {tuple(map(int, color))} not in the VOC palette")
            label[codes == code] = lookup[int(code)]
        return label
