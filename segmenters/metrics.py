"""Segmentation metrics: confusion-matrix mIoU / per-class IoU / F1, the E-measure (Fan et al. 2018),
boundary / non-boundary trimap mIoU (thesis section 3.4.4), and prediction-entropy maps."""

from __future__ import annotations

import math

import numpy as np
import torch

from segmenters.edges import boundary_band

DEFAULT_BANDS = (1, 2, 3, 5, 10, 20)


def confusion_matrix(
    pred: torch.Tensor, target: torch.Tensor, num_classes: int, ignore_index: int = 255, region: torch.Tensor | None = None
) -> torch.Tensor:
    """(C, C) counts, rows = ground truth, columns = prediction; ignored (and out-of-region) pixels skipped."""
    if pred.shape != target.shape:
        raise ValueError(f"prediction shape {tuple(pred.shape)} differs from target shape {tuple(target.shape)}")
    keep = target != ignore_index
    if region is not None:
        keep &= region
    t = target[keep].to(torch.int64)
    p = pred[keep].to(torch.int64)
    if t.numel() and (int(t.max()) >= num_classes or int(t.min()) < 0):
        raise ValueError(f"target has labels outside 0..{num_classes - 1} (and ignore {ignore_index})")
    if p.numel() and (int(p.max()) >= num_classes or int(p.min()) < 0):
        raise ValueError(f"prediction has labels outside 0..{num_classes - 1}")
    return torch.bincount(t * num_classes + p, minlength=num_classes**2).reshape(num_classes, num_classes)


def iou_from_confusion(cm: torch.Tensor) -> np.ndarray:
    """Per-class IoU = TP / (TP + FP + FN); NaN for a class absent from both ground truth and prediction."""
    cm = cm.to(torch.float64)
    tp = cm.diag()
    union = cm.sum(0) + cm.sum(1) - tp
    return torch.where(union > 0, tp / union.clamp_min(1), torch.full_like(tp, math.nan)).numpy()


def f1_from_confusion(cm: torch.Tensor) -> np.ndarray:
    cm = cm.to(torch.float64)
    tp = cm.diag()
    denom = cm.sum(0) + cm.sum(1)
    return torch.where(denom > 0, 2 * tp / denom.clamp_min(1), torch.full_like(tp, math.nan)).numpy()


def region_miou(cm: torch.Tensor) -> float | None:
    """mIoU inside a trimap region, over the classes with ground truth there. A class that is only
    predicted in the region still lowers the IoU of the classes it steals from, but does not enter the mean
    itself: far from boundaries few classes remain, and one stray class would otherwise swing the figure."""
    iou = iou_from_confusion(cm)
    iou[(cm.sum(1) == 0).numpy()] = math.nan
    return _num(nanmean(iou))


def nanmean(values: np.ndarray) -> float:
    values = np.asarray(values, dtype=np.float64)
    return float(np.nanmean(values)) if np.isfinite(values).any() else math.nan


def e_measure(pred: np.ndarray, gt: np.ndarray) -> float:
    """Enhanced-alignment measure of a binary prediction against a binary ground truth (Fan et al. 2018).

    xi = 2 phi(GT) o phi(pred) / (phi(GT) o phi(GT) + phi(pred) o phi(pred)), phi(X) = X - mean(X),
    enhanced by f(x) = (1 + x)^2 / 4 and averaged over positions. When the ground truth is all one value the
    bias matrix vanishes; as in the authors' code the score is then the agreement with that value.
    """
    pred = np.asarray(pred, dtype=np.float64).ravel()
    gt = np.asarray(gt, dtype=np.float64).ravel()
    if pred.shape != gt.shape:
        raise ValueError(f"e_measure: prediction has {pred.size} values, ground truth {gt.size}")
    if gt.size == 0:
        return math.nan
    if gt.sum() == 0:
        return float(np.mean(1.0 - pred))
    if gt.sum() == gt.size:
        return float(np.mean(pred))
    phi_gt = gt - gt.mean()
    phi_pred = pred - pred.mean()
    align = 2.0 * phi_gt * phi_pred / (phi_gt * phi_gt + phi_pred * phi_pred + 1e-12)
    return float(np.mean((1.0 + align) ** 2 / 4.0))


def entropy_map(logits: torch.Tensor, normalized: bool = True) -> torch.Tensor:
    """Per-pixel entropy of the softmax, (N, C, H, W) -> (N, H, W); in [0, 1] when normalised by log C."""
    logp = logits.log_softmax(dim=1)
    entropy = -(logp.exp() * logp).sum(dim=1)
    return entropy / math.log(logits.shape[1]) if normalized else entropy


class SegmentationMetrics:
    """Accumulates everything `patchwatch eval` reports over a dataset, batch by batch."""

    def __init__(self, num_classes: int, ignore_index: int = 255, bands: tuple[int, ...] = DEFAULT_BANDS):
        self.num_classes, self.ignore_index, self.bands = num_classes, ignore_index, tuple(bands)
        self.cm = torch.zeros(num_classes, num_classes, dtype=torch.int64)
        self.band_cm = {w: torch.zeros_like(self.cm) for w in self.bands}
        self.outside_cm = {w: torch.zeros_like(self.cm) for w in self.bands}
        self.e_scores: list[list[float]] = [[] for _ in range(num_classes)]
        self.entropy_sum = 0.0
        self.entropy_count = 0

    def update(self, logits_or_pred: torch.Tensor, target: torch.Tensor) -> None:
        """`logits_or_pred` is (N, C, H, W) logits or (N, H, W) labels; `target` (N, H, W)."""
        if logits_or_pred.dim() == 4:
            pred = logits_or_pred.argmax(dim=1)
            ent = entropy_map(logits_or_pred)
            valid = target != self.ignore_index
            self.entropy_sum += float(ent[valid].sum())
            self.entropy_count += int(valid.sum())
        else:
            pred = logits_or_pred
        pred, target = pred.cpu(), target.cpu()
        self.cm += confusion_matrix(pred, target, self.num_classes, self.ignore_index)
        for w in self.bands:
            band = boundary_band(target, w, self.ignore_index)
            self.band_cm[w] += confusion_matrix(pred, target, self.num_classes, self.ignore_index, region=band)
            self.outside_cm[w] += confusion_matrix(pred, target, self.num_classes, self.ignore_index, region=~band)
        for p, t in zip(pred.numpy(), target.numpy()):
            valid = t != self.ignore_index
            for c in np.unique(t[valid]):
                self.e_scores[int(c)].append(e_measure(p[valid] == c, t[valid] == c))

    def report(self, class_names: list[str] | None = None) -> dict:
        names = class_names or [str(i) for i in range(self.num_classes)]
        iou = iou_from_confusion(self.cm)
        f1 = f1_from_confusion(self.cm)
        e = np.array([np.mean(s) if s else math.nan for s in self.e_scores])
        total = int(self.cm.sum())
        return {
            "miou": _num(nanmean(iou)),
            "pixel_accuracy": float(self.cm.diag().sum()) / total if total else None,
            "mean_f1": _num(nanmean(f1)),
            "mean_e_measure": _num(nanmean(e)),
            "mean_entropy": self.entropy_sum / self.entropy_count if self.entropy_count else None,
            "per_class": {
                name: {"iou": _num(iou[i]), "f1": _num(f1[i]), "e_measure": _num(e[i])} for i, name in enumerate(names)
            },
            "trimap": [
                {
                    "band_width": w,
                    "boundary_miou": region_miou(self.band_cm[w]),
                    "non_boundary_miou": region_miou(self.outside_cm[w]),
                    "boundary_pixels": int(self.band_cm[w].sum()),
                }
                for w in self.bands
            ],
            "pixels": total,
            "confusion_matrix": self.cm.tolist(),
        }


def _num(value: float) -> float | None:
    return None if value is None or (isinstance(value, float) and math.isnan(value)) else float(value)
