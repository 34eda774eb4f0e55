"""The counterfactual check and the patch scorer: what the flip detector does when it holds the engine.

Every blob of new appearance (something came into view on this very frame, at most `max_blob_share` of it) is
put back to how it looked just before, and the frame is segmented again, all blobs in one batched engine call.
Pixels outside the blob that read their reference label again are what the blob *made* the model say: seed 000's
patches flip regions far beyond their own pixels, which is exactly what this counterfactual measures, while what
a moving camera reveals or an object entering the view brings changes the labels mostly under itself.

A blob that reverted at least `min_reverted_pixels` is scored: a logistic regression over cues of the blob (size,
colour, texture gained, how long the place had been quiet), of its effect (pixels reverted, their share of all
that changed, whether they had held their label, how close to the blob) and of the view (camera motion, how many
blobs appeared at once). The weights are fitted on clips of tuning seeds only (`bench/monitor_detection.py
--fit-scorer`, which prints a `PatchScorer` to use) and live here as named numbers, like any threshold.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import ClassVar

import cv2
import numpy as np
from pydantic import BaseModel, ConfigDict, Field, model_validator

#: the cues the scorer weighs, in a fixed order (the fit and the score agree on it)
BLOB_CUES = ("log_blob_pixels", "log_blob_pixels_sq", "blob_aspect", "saturation", "saturation_gain", "texture_gain",
             "image_change", "log_quiet_frames", "motion_px", "log_blobs", "blob_relabelled", "colour_spread_gain",
             "ring_change", "border_distance")  # known before the engine call
EFFECT_CUES = ("log_reverted_pixels", "reverted_share", "reverted_stable", "reverted_near",
               "on_flipped_object")  # in [0, 1] but the first
CUES = BLOB_CUES + EFFECT_CUES

#: how many frames of quiet a cue counts at most (older than this is simply "quiet")
QUIET_CAP = 60


class LogisticScorer(BaseModel):
    """P = sigmoid(bias + sum(weights[cue] * cue)) over the named cues `CUE_NAMES`; an alarm needs P >= threshold.
    Fitted on tuning seeds only; the subclasses carry the fitted numbers as their defaults."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    CUE_NAMES: ClassVar[tuple[str, ...]] = ()
    weights: dict[str, float]
    bias: float
    threshold: float = Field(gt=0, le=1, description="probability that raises an alarm")

    @model_validator(mode="after")
    def _names_every_cue(self) -> LogisticScorer:
        names = set(self.CUE_NAMES)
        if set(self.weights) != names:
            missing, unknown = sorted(names - set(self.weights)), sorted(set(self.weights) - names)
            raise ValueError(f"scorer weights must name each cue once: missing {missing}, unknown {unknown}")
        return self

    def probability(self, cues: dict[str, float]) -> float:
        return self._sigmoid(self.bias + sum(self.weights[name] * cues[name] for name in self.CUE_NAMES))

    @staticmethod
    def _sigmoid(logit: float) -> float:
        return 1.0 / (1.0 + math.exp(-max(-60.0, min(60.0, logit))))


class PatchScorer(LogisticScorer):
    """The counterfactual's score of a blob, over `CUES`. Fitted on tuning seeds (see the module docstring); refit
    for another engine or camera with the same command."""

    CUE_NAMES: ClassVar[tuple[str, ...]] = CUES
    weights: dict[str, float] = Field(default_factory=lambda: dict(FITTED_WEIGHTS))
    bias: float = Field(default=-19.433, description="the fit's intercept (cues in their own units)")
    threshold: float = Field(1.0, gt=0, le=1, description="probability that raises an alarm on the first look (1: "
                             "none does, every alarm waits for its second look; chosen together with the second "
                             "look's: bench/fit_second_look.py)")

    def best_case(self, blob_cues: dict[str, float], stable: np.ndarray, near: np.ndarray,
                  min_reverted: int = 1, on_flipped_object: float = 1.0) -> float:
        """The highest probability a blob can reach whatever its counterfactual shows (below the threshold, the
        engine call would be wasted). Only pixels whose label differs from the reference outside what is restored
        can revert: `stable` and `near` say, for each of them, whether its label had held `min_stable` frames and
        whether it lies within `near_px` of the blob, which is all the effect cues ask of a reverted pixel. Exact:
        for each count of reverted pixels from `min_reverted` up (fewer are not scored), the best set of that size
        is the one whose pixels weigh most, and the share of the labels that changed at whichever end of (0, 1]
        its weight favours. `on_flipped_object` is the most that cue can read (`flipped_object_bound`)."""
        if len(stable) < min_reverted:
            return 0.0
        weights = self.weights
        values = np.sort(weights["reverted_stable"] * stable.astype(float) + weights["reverted_near"] * near)[::-1]
        count = np.arange(1, len(values) + 1)
        effect = weights["log_reverted_pixels"] * np.log1p(count) + np.cumsum(values) / count
        logit = self.bias + sum(weights[name] * blob_cues[name] for name in BLOB_CUES)
        logit += float(effect[max(min_reverted, 1) - 1:].max()) + max(weights["reverted_share"], 0.0)
        logit += max(weights["on_flipped_object"] * on_flipped_object, 0.0)  # which object reverts is unknown yet
        return self._sigmoid(logit)


#: the weights `bench/fit_flip_scorer.py` found on tuning seeds 0-5 and 20-30 (see the README)
FITTED_WEIGHTS = {
    "log_blob_pixels": 1.0679,
    "log_blob_pixels_sq": 0.0806,
    "blob_aspect": 3.4232,
    "saturation": 3.9636,
    "saturation_gain": -1.0421,
    "texture_gain": 3.04,
    "image_change": 20.4254,
    "log_quiet_frames": 0.2677,
    "motion_px": -1.6277,
    "log_blobs": -0.9564,
    "blob_relabelled": 0.7411,
    "colour_spread_gain": 4.8466,
    "ring_change": -19.7005,
    "border_distance": 2.9035,
    "log_reverted_pixels": 1.2247,
    "reverted_share": -0.3199,
    "reverted_stable": 1.1718,
    "reverted_near": 0.9316,
    "on_flipped_object": 1.8463,
}


@dataclass
class Blob:
    """One blob of new appearance and what its counterfactual showed."""

    pixels: np.ndarray  # (H, W) bool, at the working size
    restored: np.ndarray  # (H, W) bool: the pixels put back (the blob's footprint: what changed within it)
    reverted: np.ndarray | None = None  # (H, W) bool: outside `restored`, back to the reference label
    changed: int = 0  # pixels outside `restored` whose label changed at all
    cues: dict[str, float] | None = None  # the blob's cues, then the effect's too once it has been judged
    probability: float | None = None


def _disk(size: int) -> np.ndarray:
    return cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (size, size))


def new_blobs(appeared_now: np.ndarray, difference: np.ndarray, footprint_change: float, min_pixels: int,
              max_share: float, footprint_px: int) -> list[Blob]:
    """The blobs of new appearance worth a counterfactual: `min_pixels` up to `max_share` of the frame, each with
    its footprint, the pixels to restore: those of the blob whose `difference` (not blurred) clears
    `footprint_change`, grown by `footprint_px` within the blob. A blob whose pixels barely changed has nothing to
    restore and is not checked."""
    if not appeared_now.any():  # most frames: nothing new in view, nothing to label
        return []
    count, components, stats, _ = cv2.connectedComponentsWithStats(appeared_now.astype(np.uint8), connectivity=8)
    blobs = []
    for index in range(1, count):
        if not min_pixels <= stats[index, cv2.CC_STAT_AREA] <= max_share * appeared_now.size:
            continue
        pixels = components == index
        footprint = pixels & (difference > footprint_change)
        if not footprint.any():
            continue
        if footprint_px > 1:
            footprint = cv2.dilate(footprint.astype(np.uint8), _disk(footprint_px)).astype(bool) & pixels
        blobs.append(Blob(pixels, footprint))
    return blobs


def judge_effect(blob: Blob, relabelled: np.ndarray, labels: np.ndarray, reference: np.ndarray) -> None:
    """What restoring the blob did to the labels outside what was restored."""
    outside = ~blob.restored
    changed = outside & (relabelled != labels)
    blob.changed = int(changed.sum())
    blob.reverted = changed & (relabelled == reference)


@dataclass
class View:
    """What the cues need of the frame: images at the working size, the detector's per-pixel state."""

    rgb: np.ndarray  # uint8, now
    before: np.ndarray  # uint8, each pixel as it looked before its latest change
    change: np.ndarray  # blurred mean |image - reference image|
    stable: np.ndarray  # frames each pixel's reference label has held
    reference: np.ndarray  # the reference labels
    quiet: np.ndarray  # frames since each pixel last changed, before this frame
    min_stable: int
    motion_px: float
    blobs: int
    near_px: int
    labels: np.ndarray  # the labels now
    ring_px: int
    texture: np.ndarray = field(init=False)  # |Laplacian| of the grey image now, in [0, 1] units
    texture_before: np.ndarray = field(init=False)  # the same of `before`

    def __post_init__(self):  # once per frame with blobs, not once per blob
        self.texture, self.texture_before = texture(self.rgb), texture(self.before)


def blob_cues(blob: Blob, view: View) -> dict[str, float]:
    """The cues known before the engine call: the blob itself and the view."""
    pixels = blob.pixels
    rows, cols = np.nonzero(pixels)
    height, width = rows.max() - rows.min() + 1, cols.max() - cols.min() + 1
    saturation_now = _mean_saturation(view.rgb, pixels)
    log_pixels = math.log1p(int(pixels.sum()))
    return {
        "log_blob_pixels": log_pixels,
        "log_blob_pixels_sq": log_pixels ** 2,
        "blob_aspect": float(min(height, width) / max(height, width)),
        "saturation": saturation_now,
        "saturation_gain": saturation_now - _mean_saturation(view.before, pixels),
        "texture_gain": float(view.texture[pixels].mean() - view.texture_before[pixels].mean()),
        "image_change": float(view.change[pixels].mean()),
        "log_quiet_frames": math.log1p(float(np.median(np.minimum(view.quiet[pixels], QUIET_CAP)))),
        "motion_px": view.motion_px,
        "log_blobs": math.log1p(view.blobs),
        "blob_relabelled": float((view.labels[pixels] != view.reference[pixels]).mean()),
        "colour_spread_gain": _colour_spread(view.rgb, pixels) - _colour_spread(view.before, pixels),
        "ring_change": _ring_change(pixels, view),
        "border_distance": float(min(rows.min(), cols.min(), pixels.shape[0] - 1 - rows.max(),
                                     pixels.shape[1] - 1 - cols.max())) / pixels.shape[1],
    }


def _colour_spread(rgb: np.ndarray, mask: np.ndarray) -> float:
    """Mean over channels of the standard deviation, in [0, 1] units, of the masked pixels: printed texture is
    many colours, a surface in new light one."""
    return float(rgb[mask].std(axis=0).mean()) / 255.0


def _ring_change(pixels: np.ndarray, view: View) -> float:
    """Mean image change in a ring of `ring_px` around the blob: a sticker changes itself, light and arrivals
    change their surroundings too."""
    ring = cv2.dilate(pixels.astype(np.uint8), _disk(view.ring_px)).astype(bool) & ~pixels
    return float(view.change[ring].mean()) if ring.any() else 0.0


def effect_cues(blob: Blob, view: View) -> dict[str, float]:
    """The cues of what the counterfactual showed (after `judge_effect`)."""
    reverted = blob.reverted
    near = cv2.dilate(blob.restored.astype(np.uint8), _disk(view.near_px)).astype(bool)
    flipped = int(reverted.sum())
    return {
        "log_reverted_pixels": math.log1p(flipped),
        "reverted_share": flipped / max(blob.changed, 1),
        "reverted_stable": float((view.stable[reverted] >= view.min_stable).mean()) if flipped else 0.0,
        "reverted_near": float((reverted & near).sum()) / max(flipped, 1),
        "on_flipped_object": _on_flipped_object(blob, view.reference),
    }


def _on_flipped_object(blob: Blob, reference: np.ndarray) -> float:
    """Share of the blob's pixels whose reference label is the one most reverted pixels held: a sticker sits on the
    object it flips, while an object arriving beside another flips its neighbour."""
    held = reference[blob.reverted]
    if not held.size:
        return 0.0
    flipped_object = np.bincount(held.astype(np.int64)).argmax()
    return float((reference[blob.pixels] == flipped_object).mean())


def flipped_object_bound(blob_pixels: np.ndarray, could_revert: np.ndarray, reference: np.ndarray) -> float:
    """The most `on_flipped_object` can read before the engine call: the object that reverts is one whose reference
    label some pixel that could revert holds, so the share is at most the blob's largest share on such a label."""
    held = np.bincount(reference[could_revert].ravel().astype(np.int64))
    under = np.bincount(reference[blob_pixels].ravel().astype(np.int64), minlength=held.size)[:held.size]
    return float(under[held > 0].max(initial=0)) / max(int(blob_pixels.sum()), 1)


def _mean_saturation(rgb: np.ndarray, mask: np.ndarray) -> float:
    """Mean HSV saturation in [0, 1] of the masked pixels."""
    pixels = rgb[mask].reshape(-1, 1, 3)
    return float(cv2.cvtColor(pixels, cv2.COLOR_RGB2HSV)[..., 1].mean()) / 255.0


def texture(rgb: np.ndarray) -> np.ndarray:
    """|Laplacian| of the grey image in [0, 1] units: printed texture is sharp."""
    gray = cv2.cvtColor(rgb, cv2.COLOR_RGB2GRAY)
    return np.abs(cv2.Laplacian(gray, cv2.CV_32F)) / np.float32(255.0)
