"""The parity gate: an engine ships only if it computes what its PyTorch twin computes, on real images.

Figures, engine against twin over the same normalised inputs:
- max and median |logit difference|, and the max relative to the twin's logit range over the set;
- label agreement (share of pixels whose argmax matches);
- mIoU of the engine's label map scored against the twin's (classes present in either).
Tolerances depend on precision; a reduced-precision engine must still keep the labels (FP16 segmentation
heads are a known trap: the logits look close while thin classes vanish, so mIoU is gated too).

The gate also runs the one-class check on the twin's own labels (`segmenters.twin.TwinHealth`): an engine that
matches a twin which says one class everywhere passes, but the report records it and a WARNING line says so.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np
import torch
from pydantic import BaseModel
from tqdm import tqdm

from export.engine import Engine
from segmenters.data import build_dataset
from segmenters.data.common import read_rgb
from segmenters.data.frames import image_files
from segmenters.metrics import confusion_matrix, iou_from_confusion, nanmean
from segmenters.twin import TwinHealth, predicted_pixel_counts, warn_if_one_class
from segmenters.visualize import colorize, heatmap, save_panel, to_uint8

DATASET_SOURCES = ("camvid", "cityscapes", "voc", "shapes")


#: classes the twin gives less than this share of the gate's pixels are left out of the mIoU vs twin: there a
#: handful of flipped pixels moves the mean more than all the rest of the frames (an fp16 LR-ASPP agreeing with its
#: twin on 99.993 % of 691,200 CamVid pixels read 0.975 through one class of ~150 pixels); label agreement still
#: counts every pixel
MIOU_MIN_CLASS_SHARE = 1e-3


def twin_miou(cm: torch.Tensor) -> tuple[float, int]:
    """The engine's mIoU scored against the twin's labels (`cm` rows: twin, columns: engine) over the classes the
    twin gives at least MIOU_MIN_CLASS_SHARE of the pixels; and how many classes that is."""
    support = cm.sum(1).to(torch.float64)
    scored = (support >= MIOU_MIN_CLASS_SHARE * support.sum()).numpy()
    return nanmean(iou_from_confusion(cm)[scored]), int(scored.sum())


class ParityTolerance(BaseModel):
    max_abs_rel: float  # max |engine - twin| / (twin logits' max - min)
    label_agreement: float
    miou: float


TOLERANCES: dict[str, ParityTolerance] = {
    "fp32": ParityTolerance(max_abs_rel=1e-4, label_agreement=0.9999, miou=0.999),
    # TF32 keeps fp16's 10-bit mantissa with fp32's range. Measured on an H200 (CamVid val, DeepLabV3-R18 and the
    # ladder DenseNet): 5-7e-4 x range, 99.88-99.96 % labels, mIoU vs twin 0.978-0.998.
    "tf32": ParityTolerance(max_abs_rel=2e-3, label_agreement=0.998, miou=0.97),
    "fp16": ParityTolerance(max_abs_rel=2e-2, label_agreement=0.999, miou=0.99),
    "int8": ParityTolerance(max_abs_rel=0.25, label_agreement=0.97, miou=0.90),
}


class ParityReport(BaseModel):
    engine: dict
    #: the twin the engine was compared with: backend, device, math (fp32 means TF32 off)
    reference: dict = {}
    precision: str
    source: str
    images: int
    pixels: int
    logit_range: float
    max_abs: float
    median_abs: float
    max_abs_rel: float
    label_agreement: float
    miou: float
    #: the classes `miou` was taken over (those with MIOU_MIN_CLASS_SHARE of the twin's labels; None: all, in
    #: reports from before)
    miou_classes: int | None = None
    worst_image: str
    worst_image_agreement: float
    tolerance: ParityTolerance
    failures: list[str]
    #: the one-class check on the twin's labels over the gate's images (None in reports from before it)
    twin_health: dict | None = None
    #: what the gate noticed that does not fail it (a twin that predicts one class everywhere)
    warnings: list[str] = []

    @property
    def passed(self) -> bool:
        return not self.failures

    def text(self) -> str:
        verdict = "PASS" if self.passed else "FAIL"
        tol = self.tolerance
        lines = [
            f"parity {verdict}: {self.engine.get('backend')} {self.precision} vs twin on {self.images} images "
            f"({self.source}, {self.pixels} pixels)",
            f"  engine            {_where(self.engine)}",
            f"  twin              {_where(self.reference)}",
            f"  max |dlogit|      {self.max_abs:.3g}  = {self.max_abs_rel:.3g} x logit range {self.logit_range:.3g}"
            f"  (limit {tol.max_abs_rel:g})",
            f"  median |dlogit|   {self.median_abs:.3g}",
            f"  label agreement   {self.label_agreement:.6f}  (limit {tol.label_agreement:g})",
            f"  mIoU vs twin      {self.miou:.6f}  (limit {tol.miou:g}"
            + (f"; over {self.miou_classes} classes with >= {MIOU_MIN_CLASS_SHARE:.1%} of the twin's labels)"
               if self.miou_classes is not None else ")"),
            f"  worst image       {self.worst_image}: agreement {self.worst_image_agreement:.6f}",
        ]
        lines += [f"  FAILED: {f}" for f in self.failures]
        lines += [f"  WARNING: {w}" for w in self.warnings]
        return "\n".join(lines)


def _where(engine: dict) -> str:
    return f"{engine.get('backend', '?')} on {engine.get('device', '?')}, {engine.get('math', '?')} math"


class ParityError(RuntimeError):
    def __init__(self, report: ParityReport):
        super().__init__(report.text())
        self.report = report


def parity_images(
    source: str,
    count: int = 16,
    size: tuple[int, int] | None = None,
    root: str | None = None,
    split: str = "val",
) -> list[tuple[str, np.ndarray]]:
    """`count` real images as (name, (3, H, W) float32 in [0, 1]), spread evenly over the set.

    `source`: a dataset name (camvid, cityscapes, voc; shapes renders scenes), read from `split`, or a folder
    or glob of image files. `size` (H, W) resizes (shapes: renders at it; default 128x128); default: as stored.
    """
    if source in DATASET_SOURCES:
        dataset = build_dataset(source, split, root=root, size=size, length=max(count, 1))
        picks = np.unique(np.linspace(0, len(dataset) - 1, num=min(count, len(dataset))).round().astype(int))
        out = []
        for index in picks:
            image, _ = dataset[int(index)]
            name = Path(dataset.pairs[index][0]).name if hasattr(dataset, "pairs") else f"{source}-val-{index}"
            out.append((name, image.numpy().astype(np.float32)))
        return out
    paths = image_files(source)
    picks = np.unique(np.linspace(0, len(paths) - 1, num=min(count, len(paths))).round().astype(int))
    out = []
    for index in picks:
        image = torch.from_numpy(read_rgb(paths[index])).permute(2, 0, 1)
        if size:
            image = torch.nn.functional.interpolate(image[None], size=size, mode="bilinear", antialias=True)[0]
        out.append((paths[index].name, image.numpy().astype(np.float32)))
    return out


def _batches(images: Sequence[tuple[str, np.ndarray]], batch_size: int) -> Iterator[list[tuple[str, np.ndarray]]]:
    """Consecutive images of one size, at most `batch_size` at a time."""
    batch: list[tuple[str, np.ndarray]] = []
    for item in images:
        if batch and (len(batch) == batch_size or batch[0][1].shape != item[1].shape):
            yield batch
            batch = []
        batch.append(item)
    if batch:
        yield batch


#: |logit difference| values kept per batch for the median: enough for it, and memory stays bounded
MEDIAN_SAMPLES_PER_BATCH = 4_000_000


class _ParityTally:
    """What the gate accumulates over batches, engine against twin; memory does not grow with the image count."""

    def __init__(self, num_classes: int):
        self.num_classes = num_classes
        self.confusion = torch.zeros(num_classes, num_classes, dtype=torch.int64)  # rows: twin, columns: engine
        self.twin_counts = torch.zeros(num_classes, dtype=torch.int64)
        self.diff_samples: list[np.ndarray] = []
        self.lo, self.hi, self.max_abs = math.inf, -math.inf, 0.0
        self.agree = self.pixels = 0
        self.finite = True
        #: (name, agreement, (image, twin labels, engine labels, max |dlogit| per pixel)) of the worst image so far
        self.worst: tuple[str, float, tuple | None] = ("", 2.0, None)

    def add(self, batch: list[tuple[str, np.ndarray]], ref: np.ndarray, out: np.ndarray) -> None:
        self.finite = self.finite and bool(np.isfinite(ref).all() and np.isfinite(out).all())
        with np.errstate(invalid="ignore"):  # inf - inf: reported as non-finite logits
            diff = np.abs(out - ref)
        self.diff_samples.append(diff.ravel()[:: max(1, diff.size // MEDIAN_SAMPLES_PER_BATCH)])
        self.max_abs = max(self.max_abs, float(diff.max()))
        self.lo, self.hi = min(self.lo, float(ref.min())), max(self.hi, float(ref.max()))
        ref_labels, out_labels = ref.argmax(1), out.argmax(1)
        self.twin_counts += predicted_pixel_counts(ref_labels, self.num_classes)
        same = ref_labels == out_labels
        self.agree += int(same.sum())
        self.pixels += same.size
        # scored with the twin's labels as ground truth
        self.confusion += confusion_matrix(
            torch.from_numpy(out_labels), torch.from_numpy(ref_labels), self.num_classes, ignore_index=-1
        )
        for k, (name, image) in enumerate(batch):
            share = float(same[k].mean())
            if share < self.worst[1]:
                self.worst = (name, share, (image, ref_labels[k], out_labels[k], diff[k].max(0)))


def parity_check(
    engine: Engine,
    reference: Engine,
    images: Sequence[tuple[str, np.ndarray]],
    *,
    source: str = "images",
    tolerance: ParityTolerance | None = None,
    batch_size: int = 4,
    panel_path: str | Path | None = None,
    progress: bool = False,
) -> ParityReport:
    """Run both engines on the same [0, 1] images and compare; `panel_path` gets a picture of the worst image."""
    if engine.spec.classes != reference.spec.classes:
        raise ValueError("engine and twin disagree on the class table: not the same model")
    if not images:
        raise ValueError("parity needs at least one image")
    tally = _ParityTally(reference.spec.num_classes)
    for batch in tqdm(list(_batches(images, batch_size)), desc=f"parity {engine.backend}", disable=not progress):
        x = reference.prepare(np.stack([image for _, image in batch]))
        tally.add(batch, reference.infer(x), engine.infer(x))
    report = _report(engine, reference, tally, source, len(images), tolerance or TOLERANCES[engine.precision])
    if panel_path is not None and tally.worst[2] is not None:
        _save_worst_panel(panel_path, tally.worst, reference, engine.precision)
    return report


def _report(
    engine: Engine, reference: Engine, tally: _ParityTally, source: str, images: int, tolerance: ParityTolerance
) -> ParityReport:
    logit_range = max(tally.hi - tally.lo, 1e-12)
    miou, miou_classes = twin_miou(tally.confusion)
    health = TwinHealth.from_counts(tally.twin_counts, reference.spec.class_names, images)
    health_warning = warn_if_one_class(health, f"parity gate ({reference.spec.arch} on {source})")
    report = ParityReport(
        engine=engine.describe(),
        reference=reference.describe(),
        precision=engine.precision,
        source=source,
        images=images,
        pixels=tally.pixels,
        logit_range=logit_range,
        max_abs=tally.max_abs,
        median_abs=float(np.median(np.concatenate(tally.diff_samples))),
        max_abs_rel=tally.max_abs / logit_range,
        label_agreement=tally.agree / tally.pixels,
        miou=miou,
        miou_classes=miou_classes,
        worst_image=tally.worst[0],
        worst_image_agreement=tally.worst[1],
        tolerance=tolerance,
        failures=[],
        twin_health=health.as_dict(),
        warnings=[health_warning] if health_warning else [],
    )
    report.failures = _failures(report) + ([] if tally.finite else ["the logits are not finite (inf or NaN)"])
    return report


def _save_worst_panel(path: str | Path, worst: tuple, reference: Engine, precision: str) -> None:
    name, agreement, (image, ref_labels, out_labels, dmax) = worst
    palette = reference.spec.palette()
    save_panel(
        path,
        [
            to_uint8(image),
            colorize(ref_labels, palette),
            colorize(out_labels, palette),
            heatmap((ref_labels != out_labels).astype(np.float32)),
            heatmap(dmax, vmax=max(float(dmax.max()), 1e-12)),
        ],
        titles=[f"worst image: {name}", "twin labels", f"engine labels ({precision})",
                f"labels differ ({1 - agreement:.2%})", f"max |dlogit| per pixel (0 to {float(dmax.max()):.3g})"],
    )


def _failures(report: ParityReport) -> list[str]:
    tol, failures = report.tolerance, []
    if not report.max_abs_rel <= tol.max_abs_rel:
        failures.append(f"max |dlogit| is {report.max_abs_rel:.3g} x the logit range, over {tol.max_abs_rel:g}")
    if not report.label_agreement >= tol.label_agreement:
        failures.append(f"label agreement {report.label_agreement:.6f} is under {tol.label_agreement:g}")
    if not report.miou >= tol.miou:
        failures.append(f"mIoU vs twin {report.miou:.6f} is under {tol.miou:g}")
    return failures


def gate(report: ParityReport) -> ParityReport:
    """Raise `ParityError` (its message is the report) unless every figure is within tolerance."""
    if not report.passed:
        raise ParityError(report)
    return report
