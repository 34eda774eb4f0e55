"""The second look: a blob whose counterfactual scored `look_from` or more (and below the first look's own
threshold, which as fitted no score reaches) is looked at again on the next frame, and only then alarmed or let go.

A printed sticker appears once and then stays put, and the flip it causes stays with it. What else makes a blob
whose restoring reverts labels keeps going: an object entering the view keeps arriving beside where it was, a
lighting change keeps changing the image, and a flip the view caused comes and goes. One frame later, with the
blob and what it reverted carried along the camera's motion, the second look asks how much is still appearing
around the blob, whether the flip is still there and still unexplained by the image, and weighs that with the
blob's first score (its log-odds). It needs no engine call: it reads the maps the detector makes every frame.

The weights are fitted on clips of tuning seeds only (`bench/fit_second_look.py`) and live here as named numbers.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar

import cv2
import numpy as np
from pydantic import Field

from monitor.counterfactual import LogisticScorer

#: the cues the second look weighs, in a fixed order (the fit and the score agree on it)
LOOK_CUES = ("first_logit", "appearing_around", "log_new_around", "flip_kept", "flip_suspect", "blob_change")

#: log-odds of the first score are clipped to this magnitude (a probability of 0 or 1 has none)
LOGIT_CAP = 20.0

#: the range each cue but the first can take (None: unbounded), for the lowest first score that can still alarm
LOOK_CUE_RANGES = {"appearing_around": (0.0, 1.0), "log_new_around": (0.0, None), "flip_kept": (0.0, 1.0),
                   "flip_suspect": (0.0, 1.0), "blob_change": (0.0, 1.0)}


class SecondLookScorer(LogisticScorer):
    """P(patch) one frame after the blob appeared, over `LOOK_CUES`; an alarm needs P >= threshold."""

    CUE_NAMES: ClassVar[tuple[str, ...]] = LOOK_CUES
    weights: dict[str, float] = Field(default_factory=lambda: dict(FITTED_LOOK_WEIGHTS))
    bias: float = Field(default=-1.7531, description="the fit's intercept (cues in their own units)")
    threshold: float = Field(0.18, gt=0, le=1, description="probability that raises an alarm")

    def lowest_first_probability(self) -> float:
        """The lowest first score whose second look can reach the threshold, whatever the look sees (a blob
        scoring less can never alarm: its engine call would be wasted). Exact: each other cue at whichever end of
        its range its weight favours."""
        best = self.bias
        for name, (low, high) in LOOK_CUE_RANGES.items():
            weight = self.weights[name]
            if weight > 0 and high is None:
                return 0.0  # no bound
            best += max(weight * low, weight * high) if high is not None else weight * low
        needed = logit(self.threshold) - best  # what first_logit * its weight must bring
        weight = self.weights["first_logit"]
        if weight <= 0:
            return 0.0 if needed <= weight * -LOGIT_CAP else 1.0
        return 1.0 / (1.0 + math.exp(-max(-LOGIT_CAP, min(LOGIT_CAP, needed / weight))))


#: the weights `bench/fit_second_look.py` found on tuning seeds 0-5 and 20-30 (see the README)
FITTED_LOOK_WEIGHTS = {
    "first_logit": 0.9076,
    "appearing_around": 1.6385,
    "log_new_around": -0.3352,
    "flip_kept": 0.4131,
    "flip_suspect": 0.5032,
    "blob_change": -6.3863,
}


@dataclass
class Look:
    """A blob waiting for its second look, and what the look found."""

    pixels: np.ndarray  # (H, W) bool: the blob, carried along the motion
    reverted: np.ndarray  # (H, W) bool: what its counterfactual reverted, carried the same way
    first_frame: int  # the frame the blob appeared on
    first_probability: float  # its patch score there
    first_cues: dict[str, float]
    cues: dict[str, float] | None = None
    probability: float | None = None


def _disk(size: int) -> np.ndarray:
    return cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (size, size))


def logit(probability: float) -> float:
    if probability <= 0.0:
        return -LOGIT_CAP
    if probability >= 1.0:
        return LOGIT_CAP
    return max(-LOGIT_CAP, min(LOGIT_CAP, math.log(probability / (1.0 - probability))))


def look_cues(look: Look, frame, zone_px: int, ring_px: int) -> dict[str, float]:
    """The second look's cues on this frame. `frame` holds the detector's maps of it: `labels`, `reference`,
    `suspect`, `difference` (mean |RGB| change against the reference image), `appearing` (blurred change that counts
    as new appearance) and `appeared_ago` (0 where new appearance began on this frame)."""
    zone = cv2.dilate(look.pixels.astype(np.uint8), _disk(zone_px)).astype(bool)
    ring = cv2.dilate(look.pixels.astype(np.uint8), _disk(ring_px)).astype(bool)
    reverted = look.reverted
    return {
        "first_logit": logit(look.first_probability),
        "appearing_around": float(frame.appearing[zone].mean()),
        "log_new_around": math.log1p(int(((frame.appeared_ago == 0) & ring).sum())),
        "flip_kept": float((frame.labels[reverted] != frame.reference[reverted]).mean()),
        "flip_suspect": float(frame.suspect[reverted].mean()),
        "blob_change": float(frame.difference[look.pixels].mean()),
    }
