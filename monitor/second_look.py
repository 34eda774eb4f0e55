"""The second look: a blob whose counterfactual scored `look_from` or more (and below the first look's own
threshold, which as fitted no score reaches) is looked at again on the next frame, and only then alarmed or let go.

A printed sticker appears once and then stays put, and the flip it causes stays with it. What else makes a blob
whose restoring reverts labels keeps going: an object entering the view keeps arriving beside where it was, a
lighting change keeps changing the image, and a flip the view caused comes and goes. One frame later, with the
blob and what it reverted carried along the camera's motion, the second look asks how much is still appearing
around the blob, whether the flip is still there and still unexplained by the image, and weighs that with
everything the first look measured (its score's log-odds and its cues). It needs no engine call: it reads the maps
the detector makes every frame.

The weighing is a small ensemble of gradient-boosted decision trees (depth 2): what the look sees means different
things for a large blob and a small one, for a still camera and a moving one, which one weight per cue cannot say
(left one tuning seed out, at the same false alarms, the trees catch about 1 point more of the patches than a
logistic regression over the same cues). They are fitted on clips of tuning seeds only (`bench/fit_second_look.py`,
scikit-learn's `GradientBoostingClassifier`) and live here as named numbers: each tree is `(cue, cut, below,
above)`, where `below` (cue <= cut) and `above` are a tree again or a leaf's log-odds.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Union

import cv2
import numpy as np
from pydantic import BaseModel, ConfigDict, Field, model_validator
from typing_extensions import TypeAliasType

from monitor.counterfactual import CUES

#: the cues of the look itself, in a fixed order (the fit and the score agree on it); the first is the first score's
LOOK_CUES = ("first_logit", "appearing_around", "log_new_around", "flip_kept", "flip_suspect", "blob_change")
#: what the second look weighs: its own cues and the first look's
SECOND_LOOK_CUES = LOOK_CUES + CUES

#: log-odds of the first score are clipped to this magnitude (a probability of 0 or 1 has none)
LOGIT_CAP = 20.0

#: one decision tree: (cue, cut, below, above), `below` taken when the cue is <= cut; each branch a tree or a leaf
Tree = TypeAliasType("Tree", "tuple[str, float, Union[Tree, float], Union[Tree, float]]")


class SecondLookScorer(BaseModel):
    """P(patch) one frame after the blob appeared: sigmoid(bias + the sum of each tree's leaf) over
    `SECOND_LOOK_CUES`; an alarm needs P >= threshold. No trees: the bias alone decides."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    trees: tuple[Tree, ...] = Field(default_factory=lambda: FITTED_LOOK_TREES)
    bias: float = Field(default=0.0, description="log-odds before any tree (the fit's prior: 0 with the classes balanced)")
    threshold: float = Field(0.31, gt=0, le=1, description="probability that raises an alarm")

    @model_validator(mode="after")
    def _trees_name_known_cues(self) -> SecondLookScorer:
        unknown = sorted({cue for tree in self.trees for cue in _cues_of(tree)} - set(SECOND_LOOK_CUES))
        if unknown:
            raise ValueError(f"second-look trees split on unknown cues {unknown}; known: {list(SECOND_LOOK_CUES)}")
        return self

    def probability(self, cues: dict[str, float]) -> float:
        return _sigmoid(self.bias + sum(_leaf(tree, cues) for tree in self.trees))


def _leaf(tree, cues: dict[str, float]) -> float:
    while isinstance(tree, tuple):
        cue, cut, below, above = tree
        tree = below if cues[cue] <= cut else above
    return tree


def _cues_of(tree) -> set[str]:
    if not isinstance(tree, tuple):
        return set()
    cue, _, below, above = tree
    return {cue} | _cues_of(below) | _cues_of(above)


def _sigmoid(log_odds: float) -> float:
    return 1.0 / (1.0 + math.exp(-max(-60.0, min(60.0, log_odds))))


#: the trees `bench/fit_second_look.py` fitted on tuning seeds 0-5 and 20-46 (100 of depth 2, a leaf holding 50 looks
#: or more; see the README)
FITTED_LOOK_TREES = (
    ('first_logit', 1.858429, ('saturation', 0.8072374, -0.1739, 0.0243), ('log_new_around', 3.817652, 0.1967, -0.0612)),
    ('first_logit', 1.712872, ('saturation', 0.6542267, -0.167, -0.0981), ('ring_change', 0.04821505, 0.1782, -0.0783)),
    ('first_logit', 1.712872, ('saturation', 0.8072374, -0.146, 0.0271), ('log_new_around', 3.817652, 0.165, -0.065)),
    ('first_logit', 2.486122, ('saturation', 0.6203647, -0.1433, -0.0705), ('ring_change', 0.04302421, 0.1572, -0.0007)),
    ('first_logit', 1.763701, ('saturation', 0.8072374, -0.127, 0.0333), ('ring_change', 0.04821505, 0.1463, -0.0677)),
    ('first_logit', 1.712872, ('saturation', 0.6542267, -0.1276, -0.0639), ('log_new_around', 3.817652, 0.1394, -0.0621)),
    ('first_logit', 2.442076, ('saturation', 0.8118158, -0.1094, 0.1009), ('ring_change', 0.04335604, 0.1362, -0.0208)),
    ('first_logit', 1.712872, ('log_quiet_frames', 0.804719, -0.0451, -0.1125), ('log_new_around', 3.817652, 0.1288, -0.0573)),
    ('first_logit', 1.484022, ('saturation', 0.8085746, -0.1033, 0.0416), ('ring_change', 0.0488726, 0.1237, -0.0741)),
    ('first_logit', 2.544642, ('saturation', 0.6568216, -0.1052, -0.0248), ('log_blob_pixels_sq', 25.50088, 0.1238, -0.0167)),
    ('first_logit', 1.484022, ('log_quiet_frames', 0.804719, -0.0287, -0.1001), ('blob_change', 0.1088426, 0.1158, -0.0892)),
    ('first_logit', 2.544642, ('saturation', 0.8118158, -0.0844, 0.1002), ('ring_change', 0.04286215, 0.1187, -0.0231)),
    ('first_logit', 1.072116, ('log_quiet_frames', 0.804719, -0.0258, -0.0949), ('log_new_around', 3.970114, 0.1094, -0.1049)),
    ('first_logit', 1.072116, ('log_quiet_frames', 0.804719, -0.0236, -0.091), ('log_new_around', 3.970114, 0.1058, -0.0979)),
    ('first_logit', 2.253655, ('saturation', 0.6568216, -0.0886, -0.0061), ('log_blob_pixels_sq', 25.50088, 0.1108, -0.0661)),
    ('first_logit', 2.544642, ('saturation', 0.8118158, -0.0698, 0.0983), ('ring_change', 0.04286215, 0.111, -0.0346)),
    ('first_logit', 1.072116, ('colour_spread_gain', 0.2317549, -0.0738, 0.0599), ('log_new_around', 3.970114, 0.0993, -0.0917)),
    ('first_logit', 3.034799, ('saturation', 0.6203647, -0.0814, 0.0037), ('log_blob_pixels', 5.049835, 0.1101, -0.0158)),
    ('first_logit', 1.072116, ('log_quiet_frames', 0.804719, 0.0001, -0.0757), ('blob_change', 0.1116016, 0.0937, -0.098)),
    ('first_logit', 3.034799, ('saturation', 0.8146425, -0.0563, 0.1196), ('log_blob_pixels_sq', 25.50088, 0.108, -0.0205)),
    ('first_logit', 0.654563, ('saturation', 0.8024701, -0.0659, 0.0598), ('log_new_around', 4.102609, 0.0858, -0.1038)),
    ('first_logit', 3.034799, ('saturation', 0.6203647, -0.0712, 0.0106), ('log_blob_pixels', 5.049835, 0.1062, -0.0222)),
    ('first_logit', 3.034799, ('saturation', 0.8146425, -0.0477, 0.1016), ('log_blob_pixels', 5.049835, 0.1052, -0.0198)),
    ('first_logit', 0.654563, ('log_reverted_pixels', 3.020127, 0.035, -0.0618), ('log_new_around', 4.102609, 0.0794, -0.0992)),
    ('first_logit', 2.253655, ('colour_spread_gain', 0.2413267, -0.046, 0.1185), ('ring_change', 0.04335604, 0.1003, -0.0707)),
    ('saturation', 0.6199194, ('first_logit', 3.147318, -0.062, 0.0809), ('log_quiet_frames', 0.8958797, 0.1769, 0.0458)),
    ('first_logit', 0.3079436, ('log_quiet_frames', 0.804719, 0.0209, -0.0644), ('log_new_around', 4.297262, 0.0678, -0.1161)),
    ('first_logit', 3.396711, ('saturation', 0.8199346, -0.0374, 0.1147), ('log_blob_pixels', 5.040189, 0.1051, -0.0226)),
    ('saturation', 0.5939086, ('log_new_around', 3.314021, -0.0349, -0.1085), ('log_quiet_frames', 0.804719, 0.1421, 0.0369)),
    ('first_logit', 3.396711, ('log_reverted_pixels', 4.363078, -0.0034, -0.0653), ('log_blob_pixels_sq', 25.40351, 0.1045, -0.0193)),
    ('log_blob_pixels_sq', 13.69922, ('colour_spread_gain', 0.2354049, -0.0505, 0.0795), ('ring_change', 0.04341323, 0.084, -0.0726)),
    ('first_logit', 0.3079436, ('log_quiet_frames', 0.804719, 0.0245, -0.0554), ('log_new_around', 4.297262, 0.0597, -0.1134)),
    ('saturation', 0.5939086, ('border_distance', 0.2304688, -0.0759, -0.0178), ('log_quiet_frames', 0.804719, 0.1217, 0.0303)),
    ('log_blob_pixels', 3.701226, ('border_distance', 0.2304688, -0.0765, -0.0168), ('blob_aspect', 0.596875, -0.0885, 0.073)),
    ('saturation_gain', 0.4067647, ('saturation', 0.5939086, -0.0308, 0.0481), ('saturation', 0.5817122, -0.1034, -0.1211)),
    ('log_blob_pixels_sq', 13.69922, ('colour_spread_gain', 0.2354049, -0.0438, 0.0723), ('log_new_around', 3.795426, 0.0732, -0.0833)),
    ('saturation_gain', 0.4067647, ('image_change', 0.09601725, -0.0214, 0.0604), ('saturation', 0.5817122, -0.102, -0.1178)),
    ('first_logit', 3.396711, ('border_distance', 0.1835938, -0.0705, -0.0046), ('log_blob_pixels', 5.040189, 0.1031, -0.0322)),
    ('blob_change', 0.1252436, ('log_blob_pixels_sq', 13.69922, -0.0294, 0.054), ('saturation', 0.5341243, -0.1084, -0.1149)),
    ('saturation', 0.6199194, ('ring_change', 0.04245377, -0.0193, -0.0984), ('log_quiet_frames', 0.8958797, 0.1229, 0.0211)),
    ('saturation_gain', 0.4067647, ('log_quiet_frames', 0.804719, 0.0653, 0.0012), ('saturation', 0.5817122, -0.0998, -0.1155)),
    ('log_new_around', 3.198465, ('log_blob_pixels', 3.860674, -0.0229, 0.0789), ('reverted_near', 0.5265167, -0.0992, -0.0017)),
    ('saturation', 0.5939086, ('blob_aspect', 0.6858553, -0.0857, -0.0159), ('log_quiet_frames', 0.804719, 0.0997, 0.0179)),
    ('image_change', 0.09601725, ('reverted_share', 0.2925, 0.1076, -0.0315), ('ring_change', 0.04174778, 0.0961, -0.0678)),
    ('saturation_gain', 0.4067647, ('log_quiet_frames', 0.804719, 0.0561, 0.0008), ('saturation', 0.5817122, -0.0975, -0.1134)),
    ('log_new_around', 3.198465, ('log_blob_pixels_sq', 10.98306, -0.03, 0.0486), ('reverted_near', 0.5265167, -0.0959, -0.0007)),
    ('log_blob_pixels_sq', 26.10155, ('image_change', 0.09601725, -0.0216, 0.0611), -0.1212),
    ('blob_aspect', 0.6602564, ('saturation_gain', 0.0824823, -0.0073, -0.1085), ('log_blob_pixels_sq', 12.94017, -0.0266, 0.0631)),
    ('blob_change', 0.1252436, ('log_reverted_pixels', 3.020127, 0.0793, -0.0003), ('saturation', 0.5341243, -0.1063, -0.1091)),
    ('flip_suspect', 0.08265027, ('reverted_share', 0.3900966, 0.0642, -0.0451), ('on_flipped_object', 0.01961538, 0.1362, 0.0174)),
    ('log_blob_pixels', 5.108967, ('image_change', 0.09601725, -0.0186, 0.0546), -0.1172),
    ('log_new_around', 3.941535, ('log_reverted_pixels', 3.020127, 0.0814, 0.0008), ('texture_gain', 0.1991013, -0.1034, -0.0285)),
    ('saturation_gain', 0.2907893, ('log_quiet_frames', 0.804719, 0.0546, 0.0024), ('saturation', 0.6245245, -0.0565, -0.0957)),
    ('saturation_gain', -0.2899599, ('image_change', 0.07871116, -0.0004, -0.1227), ('log_quiet_frames', 0.804719, 0.0538, -0.0014)),
    ('blob_aspect', 0.6220238, ('reverted_near', 0.6267857, -0.0873, 0.0332), ('log_blob_pixels_sq', 13.32686, -0.0242, 0.0538)),
    ('blob_change', 0.1252436, ('motion_px', 1.23304, 0.0102, -0.129), ('saturation', 0.5341243, -0.1053, -0.1058)),
    ('flip_suspect', 0.08265027, ('reverted_share', 0.3900966, 0.0585, -0.0416), ('first_logit', -0.5924933, -0.0361, 0.0479)),
    ('log_new_around', 3.198465, ('on_flipped_object', 0.02552846, 0.1184, 0.0057), ('reverted_near', 0.5257888, -0.0915, 0.0008)),
    ('saturation_gain', 0.4067647, ('log_quiet_frames', 0.804719, 0.0443, -0.0001), ('saturation', 0.5817122, -0.0951, -0.0995)),
    ('saturation_gain', -0.2899599, ('image_change', 0.07871116, 0.0011, -0.1204), ('blob_aspect', 0.730303, -0.0365, 0.0254)),
    ('ring_change', 0.06270501, ('image_change', 0.09817046, -0.0166, 0.0568), ('on_flipped_object', 0.3470356, -0.1046, -0.1091)),
    ('log_blob_pixels_sq', 25.59774, ('log_blob_pixels', 3.860674, -0.0182, 0.0449), ('texture_gain', 0.1298949, -0.1592, 0.0026)),
    ('border_distance', 0.2148438, ('first_logit', 3.396711, -0.0495, 0.0698), ('log_quiet_frames', 0.804719, 0.0658, 0.0093)),
    ('motion_px', 1.084025, ('blob_change', 0.1252436, 0.0105, -0.103), ('image_change', 0.122264, -0.1169, 0.0049)),
    ('image_change', 0.06747482, -0.073, ('saturation', 0.6563295, -0.0192, 0.0406)),
    ('log_new_around', 4.102609, ('log_reverted_pixels', 2.673554, 0.0929, 0.0023), ('saturation', 0.5874445, -0.104, -0.0813)),
    ('texture_gain', 0.05492303, ('saturation', 0.7564059, -0.0278, -0.1042), ('saturation_gain', -0.2732665, -0.0692, 0.0192)),
    ('saturation_gain', 0.4067647, ('log_quiet_frames', 0.804719, 0.0391, -0.0003), ('saturation', 0.5817122, -0.0932, -0.0932)),
    ('motion_px', 1.236819, ('ring_change', 0.04341323, 0.0113, -0.0497), -0.1266),
    ('image_change', 0.06747482, -0.0699, ('reverted_near', 0.1891852, -0.0365, 0.0165)),
    ('flip_suspect', 0.08265027, ('reverted_share', 0.3900966, 0.0565, -0.0372), ('first_logit', -0.5924933, -0.0321, 0.0427)),
    ('log_blob_pixels_sq', 26.16314, ('image_change', 0.09601725, -0.0154, 0.049), -0.116),
    ('log_new_around', 3.198465, ('on_flipped_object', 0.02552846, 0.098, 0.0047), ('texture_gain', 0.2193556, -0.0787, 0.0091)),
    ('border_distance', 0.2148438, ('saturation_gain', -0.2750989, -0.1253, -0.0206), ('log_quiet_frames', 0.804719, 0.0525, 0.0083)),
    ('saturation_gain', 0.08253676, ('on_flipped_object', 0.02459182, 0.119, 0.0106), ('saturation', 0.2905526, 0.183, -0.0426)),
    ('on_flipped_object', 0.8578167, ('colour_spread_gain', 0.2440677, -0.0195, 0.098), ('log_quiet_frames', 2.249905, -0.0503, 0.0699)),
    ('texture_gain', -0.0005381182, ('texture_gain', -0.01605975, -0.0351, -0.1121), ('saturation_gain', 0.4067647, 0.0117, -0.0952)),
    ('saturation_gain', -0.3278531, ('image_change', 0.07871116, -0.0006, -0.1193), ('log_quiet_frames', 0.804719, 0.0381, -0.0019)),
    ('motion_px', 1.084025, ('blob_change', 0.1252436, 0.0091, -0.1004), ('image_change', 0.122264, -0.1134, 0.0111)),
    ('image_change', 0.06747482, -0.0662, ('reverted_near', 0.136675, -0.042, 0.0126)),
    ('blob_aspect', 0.6858553, ('on_flipped_object', 0.9555336, -0.0562, 0.0812), ('log_blob_pixels', 3.481122, -0.0224, 0.0537)),
    ('log_new_around', 3.839394, ('log_reverted_pixels', 3.020127, 0.0525, 0.0002), ('flip_suspect', 0.4274267, -0.0908, 0.0155)),
    ('border_distance', 0.00390625, ('on_flipped_object', 0.6947649, -0.0453, -0.1134), ('reverted_stable', 0.3920916, 0.0625, -0.0024)),
    ('motion_px', 1.23304, ('texture_gain', 0.01656813, -0.0449, 0.0094), -0.1255),
    ('log_blobs', 0.8958797, ('reverted_share', 0.381919, 0.138, 0.0118), ('blob_aspect', 0.730303, -0.0549, 0.0013)),
    ('flip_suspect', 0.3794947, ('log_reverted_pixels', 4.350257, 0.0028, -0.0566), ('on_flipped_object', 0.04928152, 0.096, 0.0209)),
    ('image_change', 0.09817046, ('ring_change', 0.03397183, -0.0307, 0.0351), ('log_blob_pixels', 3.817652, -0.1008, 0.0564)),
    ('log_blob_pixels', 5.05942, ('image_change', 0.09817046, -0.012, 0.0484), ('texture_gain', 0.1298949, -0.1614, 0.0125)),
    ('ring_change', 0.04341323, ('reverted_share', 0.2925, 0.0714, 0.0028), ('texture_gain', 0.2338808, -0.0809, 0.0576)),
    ('log_new_around', 3.839394, ('on_flipped_object', 0.2338297, 0.0477, -0.0016), ('flip_suspect', 0.4274267, -0.0891, 0.0081)),
    ('border_distance', 0.09765625, ('log_blob_pixels', 3.970114, -0.084, -0.0091), ('reverted_near', 0.1307912, -0.0464, 0.017)),
    ('blob_change', 0.1252436, ('image_change', 0.09817046, -0.0112, 0.0486), ('on_flipped_object', 0.4871223, -0.0922, -0.105)),
    ('saturation_gain', -0.3278531, ('border_distance', 0.2382812, -0.1165, 0.0136), ('log_quiet_frames', 0.804719, 0.0365, -0.0025)),
    ('motion_px', 0.9888155, ('border_distance', 0.2148438, -0.0259, 0.0179), ('image_change', 0.1223, -0.0981, 0.0017)),
    ('flip_suspect', 0.7787815, ('colour_spread_gain', 0.3060062, -0.0113, 0.1458), ('image_change', 0.07509125, 0.1282, 0.0458)),
    ('image_change', 0.06747482, -0.0601, ('image_change', 0.07536064, 0.0349, -0.0071)),
    ('on_flipped_object', 0.8578167, ('colour_spread_gain', 0.2440677, -0.0166, 0.0839), ('saturation_gain', -0.07919449, 0.12, 0.0178)),
    ('log_blob_pixels_sq', 25.59774, ('log_blob_pixels_sq', 14.90492, -0.0137, 0.0369), ('texture_gain', 0.1298949, -0.1606, 0.0166)),
    ('motion_px', 0.4286243, ('reverted_share', 0.5196154, 0.0724, -0.0026), ('reverted_share', 0.755098, -0.0615, 0.0172)),
    ('border_distance', 0.00390625, ('on_flipped_object', 0.6947649, -0.0351, -0.1058), ('reverted_stable', 0.3920916, 0.0502, -0.0018)),
)


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
