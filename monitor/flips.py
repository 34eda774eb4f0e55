"""The flip detector: per stream, catch a region whose class flips and stays flipped while the image there does
not change the way a new object would, because something small just appeared beside it: a patch's signature
(seed 000's flips reach far beyond the patch's own pixels, whose image is untouched).

A camera wider than `work_width` is watched at that width (its alarms come back at its own size): the work per
frame stays the same at any resolution, and so does what the thresholds in px mean.

What is normal is learned online, per stream, and carried from frame to frame along the image's own motion
(dense optical flow: OpenCV's DIS; skipped when the camera is still):
- a *reference label map*, updated wherever the new labels agree with it or the image itself changed there;
- a *reference image*, so that "the image changed here" means changed since the labels were established;
- per pixel, how many frames its reference label has held (`stable`), when its current run of image change
  began (`appeared_ago`), and what the image looked like just before (`before`): the view without whatever
  appeared there.

A pixel is *suspect* when its label differs from the reference, it had held its label for `min_stable` frames,
and the image there is within `image_change` of the reference. Suspect pixels keep their old reference label, so
a patch that stays keeps its region flagged, and an alarm stays active (no repeated alarms) while its region lasts.

How a patch is told from the view changing the model's mind depends on whether the detector holds the engine
(`relabel`, as the monitor always gives it):
- **with the engine: the counterfactual** (`monitor.counterfactual`). Every blob of new appearance is put back to
  how it looked before, the frame is segmented again (one batched engine call per frame that has new blobs), and
  what reverted outside the blob is what the blob made the model say. A learned scorer weighs that effect with
  cues of the blob and the view; a blob scoring `look_from` or more gets a second look on the next frame
  (`monitor.second_look`), which decides: a sticker stays put, its flip with it, while an arriving object keeps
  arriving and a lighting change keeps changing. (A first score at the scorer's own threshold alarms at once; the
  fitted threshold is 1, so every alarm waits one frame for its second look.)
- **without it: the trigger rule.** Suspect pixels are opened and grouped into regions; a region of `min_pixels`
  that stayed suspect for `persist` frames is a *candidate*, and an alarm when new appearance near it began on the
  very frame its flip began (a sticker coming into view flips its object at once; what a moving camera reveals
  comes before or after the model's change of mind). A candidate without one is counted as `untriggered`.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field
from typing import Callable, Literal

import cv2
import numpy as np
from pydantic import BaseModel, ConfigDict, Field

from monitor.counterfactual import (Blob, PatchScorer, View, blob_cues, effect_cues, flipped_object_bound, judge_effect,
                                    new_blobs)
from monitor.second_look import Look, SecondLookScorer, look_cues

#: "never" for the per-pixel frame counters (int16)
NEVER = 10_000


class FlipConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)
    image_change: float = Field(0.06, gt=0, description="mean |RGB| change in [0, 1] above which the image explains a label change")
    change_blur: int = Field(5, ge=1, description="box filter (px) over the image change: texture shimmer is not change")
    min_pixels: int = Field(25, ge=1, description="smallest flipped region that raises an alarm")
    persist: int = Field(2, ge=1, description="frames a region must stay flipped: 2 alarms on the frame after onset")
    min_stable: int = Field(3, ge=0, description="frames a pixel's label must have held before its flip counts")
    warmup: int = Field(3, ge=1, description="frames that only learn, before any alarm")
    open_px: int = Field(3, ge=1, description="opening kernel (px) that removes thin boundary flicker")
    merge_px: int = Field(9, ge=1, description="suspect pieces closer than this (px) form one region")
    appear_change: float = Field(0.06, gt=0, description="mean |RGB| change in [0, 1] that counts as new appearance "
                                 "(a sticker coming into view)")
    appear_blur: int = Field(5, ge=1, description="box filter (px) over the image change for new appearance")
    appear_open_px: int = Field(3, ge=1, description="opening kernel (px) for blobs of new appearance (1: none); a "
                                "sticker ~6 px across at the working size must survive it")
    near_px: int = Field(7, ge=1, description="new appearance within this many px of a flipped region is its trigger")
    min_trigger_pixels: int = Field(25, ge=0, description="pixels of new appearance near a flipped region that began "
                                    "on the flip's onset frame, needed for a candidate (0: every persistent "
                                    "unexplained flip is a candidate)")
    min_trigger_saturation: float = Field(0, ge=0, le=255, description="mean HSV saturation (0-255) the trigger's "
                                          "pixels need: printed patches are vivid (0: no colour cue)")
    max_trigger_share: float = Field(1.0, gt=0, le=1, description="new appearance over this share of the frame is "
                                     "something arriving (a vehicle, a person), not a sticker: no candidate")
    restore_change: float = Field(0.02, gt=0, description="mean |RGB| change in [0, 1] (blurred as new appearance) "
                                  "that marks a pixel as changed on this frame: what the counterfactual restores")
    min_blob_pixels: int = Field(12, ge=1, description="counterfactual: smallest blob of new appearance checked")
    max_blob_share: float = Field(0.03, gt=0, le=1, description="counterfactual: new appearance over this share of "
                                  "the frame is something arriving, not a sticker: not checked")
    max_checked_blobs: int = Field(6, ge=1, description="counterfactual: at most this many blobs per frame (the "
                                   "largest) go into its one batched engine call")
    footprint_change: float = Field(0.03, gt=0, description="counterfactual: mean |RGB| change in [0, 1], not blurred, "
                                    "that marks a blob's own pixels: what is restored (the blurred blob is wider than "
                                    "the sticker, and restoring its surroundings hides the flip the sticker caused)")
    footprint_px: int = Field(3, ge=1, description="counterfactual: the footprint grows by this kernel (px) within its "
                              "blob (a sticker's pixels that barely changed, its anti-aliased rim)")
    ring_px: int = Field(9, ge=1, description="counterfactual: the ring (kernel, px) around a blob whose image change "
                         "is one of its cues (a sticker changes itself; light and arriving objects their surroundings)")
    min_reverted_pixels: int = Field(10, ge=1, description="counterfactual: pixels outside a restored blob that must "
                                     "read their reference label again before the scorer weighs it")
    skip_hopeless: bool = Field(True, description="counterfactual: no engine call for a blob whose best case cannot "
                                "reach the scorer's threshold (changes no alarm; off to collect cues for a new fit)")
    scorer: PatchScorer = Field(default_factory=PatchScorer, description="the learned patch score and its threshold")
    look_from: float = Field(0.2, gt=0, le=1, description="counterfactual: a blob scoring this or more, but below the "
                             "scorer's threshold, gets a second look on the next frame (at the threshold or above: "
                             "no second looks). Lower catches more (tuning seeds: 97.0 % of patches ever score 0.2, "
                             "94.6 % 0.8) and sends more blobs to the counterfactual's engine: with it the engine "
                             "process the streams are served by, the monitor kept 56 % of its frames/s at 0.2 and "
                             "97-99 % at 0.8; with the counterfactuals on a local copy (Monitor's "
                             "counterfactual_engine, `patchwatch monitor --counterfactual-engine`) 96 % at 0.2 "
                             "(bench/monitor_throughput.py)")
    look_zone_px: int = Field(5, ge=1, description="second look: the blob grown by this kernel (px) is where it asks "
                              "whether something is still appearing")
    look_ring_px: int = Field(11, ge=1, description="second look: new appearance within this kernel (px) of the blob "
                              "is something still arriving beside it")
    second_look: SecondLookScorer = Field(default_factory=SecondLookScorer, description="the learned second-look score "
                                          "and its threshold")
    still_motion: float = Field(0.004, ge=0, description="mean |gray| change in [0, 1], at `still_width`, below which "
                                "the camera is taken as still: no optical flow, no warping (0: always flow)")
    still_width: int = Field(40, ge=8, description="width the still-camera test looks at (coarse: sensor noise averages "
                             "out, motion does not)")
    flow: Literal["dis-fast", "dis-medium", "farneback"] = Field(
        "dis-fast", description="dense optical flow: OpenCV's DIS (fast or medium preset) or Farneback")
    flow_width: int = Field(160, ge=16, description="optical flow runs at this width (speed); labels stay at the "
                            "working size")
    work_width: int = Field(128, ge=16, description="frames wider than this are watched at this width (image area-"
                            "averaged, labels nearest), so the work per frame does not grow with the camera's "
                            "resolution. The sizes in px here are at the working size, and their defaults were chosen "
                            "at 128 px wide: raise it with them, for patches smaller than ~1/30 of the view's width. "
                            "Alarms come back at the frame's own size")
    area_momentum: float = Field(0.05, gt=0, le=1, description="rate of the running per-class area statistics")


@dataclass
class FlipAlarm:
    """One alarm: where, what flipped into what, how big, and the evidence, as the event log stores it."""

    stream: str
    frame: int
    time: float
    onset_frame: int  # the first frame its pixels were suspect
    bbox: tuple[int, int, int, int]  # top, left, bottom, right (exclusive)
    pixels: int
    from_class: int
    to_class: int
    from_name: str
    to_name: str
    transitions: dict[str, int]  # "from->to" class names -> pixels
    image_change: float  # mean image change inside the region (vs the reference): low for a patch flip
    area_z: dict[str, float]  # per-class area change in spreads of its running statistics
    evidence: dict = field(default_factory=dict)  # the score and its cues (or the trigger size), e.g. VGatt
    # (H, W) bool masks, not serialised: the flipped region, and the new appearance that triggered the alarm
    region: np.ndarray | None = field(default=None, repr=False, compare=False)
    trigger: np.ndarray | None = field(default=None, repr=False, compare=False)

    def as_dict(self) -> dict:
        return {"type": "flip", **{k: v for k, v in asdict(self).items() if k not in ("region", "trigger")}}


@dataclass
class Candidate:
    """A persistent unexplained flip, before it is judged."""

    region: np.ndarray  # (H, W) bool
    onset_age: int  # frames since its flip began (persist or more)
    trigger: np.ndarray  # (H, W) bool: new appearance near it that began with it


@dataclass
class _Frame:
    """One frame's inputs and the maps derived from them, shared by the steps of `update`."""

    index: int
    rgb: np.ndarray  # at the working size
    full_rgb: np.ndarray  # as the stream delivered it (the engine's input for the counterfactual)
    image: np.ndarray  # float32 in [0, 1]
    labels: np.ndarray  # int16
    reference: np.ndarray  # reference labels, carried to this frame
    reference_image: np.ndarray
    difference: np.ndarray  # mean |image - reference_image|, per pixel
    change: np.ndarray  # the same, blurred
    suspect: np.ndarray
    suspect_age: np.ndarray
    appeared_ago: np.ndarray
    appearing: np.ndarray  # blurred change that counts as new appearance (before opening)
    quiet: np.ndarray  # frames since each pixel last changed, as of the frame before
    areas: np.ndarray


def _warp(array: np.ndarray, maps, nearest: bool) -> np.ndarray:
    if maps is None:  # a still camera: nothing moved
        return array
    interpolation = cv2.INTER_NEAREST if nearest else cv2.INTER_LINEAR
    return cv2.remap(array, maps[0], maps[1], interpolation, borderMode=cv2.BORDER_REPLICATE)


def _disk(size: int) -> np.ndarray:
    return cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (size, size))


def _select(mask: np.ndarray, where_true: np.ndarray, where_false: np.ndarray) -> np.ndarray:
    """`np.where(mask[..., None], where_true, where_false)` for images, through OpenCV (about 50x faster)."""
    out = where_false.copy()
    cv2.copyTo(where_true, mask.astype(np.uint8), out)
    return out


def _resize_labels(labels: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Label map to (width, height), nearest: OpenCV resizes up to 32-bit integers, labels fit in 16."""
    if labels.dtype not in (np.uint8, np.int16, np.uint16):
        labels = labels.astype(np.int16)
    return cv2.resize(labels, size, interpolation=cv2.INTER_NEAREST)


def _saturation(rgb: np.ndarray, mask: np.ndarray) -> float:
    """Mean HSV saturation (0-255) of the masked pixels."""
    pixels = rgb[mask].reshape(-1, 1, 3)
    return float(cv2.cvtColor(pixels, cv2.COLOR_RGB2HSV)[..., 1].mean())


def _open(mask: np.ndarray, size: int) -> np.ndarray:
    if size <= 1:
        return mask
    return cv2.morphologyEx(mask.astype(np.uint8), cv2.MORPH_OPEN, _disk(size)).astype(bool)


class FlipDetector:
    """`update(index, rgb, labels)` per frame of one stream, in order; returns the alarms it raised.

    `relabel` ((N, H, W, 3) uint8 frames -> (N, H, W) labels: the engine that labelled the stream) enables the
    counterfactual check and its scorer; without it the trigger rule decides."""

    def __init__(self, class_names: list[str], stream: str = "stream", config: FlipConfig = FlipConfig(),
                 relabel: Callable[[np.ndarray], np.ndarray] | None = None):
        self.names, self.stream, self.config, self.relabel = list(class_names), stream, config, relabel
        self.untriggered = 0  # persistent unexplained flips with no new appearance near them (not alarmed)
        self.checks = 0  # extra engine calls made by the counterfactual (one per frame with new blobs)
        self.scored = 0  # blobs whose counterfactual reverted enough to be scored
        self.below_threshold = 0  # scored blobs the scorer did not find patch-like enough
        self.skipped = 0  # new blobs that could not reach the threshold whatever the engine said: not checked
        self.second_looks = 0  # blobs looked at again on the frame after they scored between `look_from` and threshold
        self.last_blobs: list[Blob] = []  # the last frame's checked blobs, with their cues (for fitting the scorer)
        self.last_looks: list[Look] = []  # the last frame's second looks, with their cues (for fitting their scorer)
        self.motion_px = 0.0  # the last frame's median optical flow (px/frame at the working size)
        self._dis = None  # the DIS flow object (holds its own buffers; one per stream)
        self._grid = None  # (x, y) pixel coordinates at the working size: the flow's maps add to them
        self.flows = 0  # frames whose motion was estimated (the others came from a still camera)
        self.reset()

    def reset(self) -> None:
        """Forget what is normal (a scene cut, a camera that was moved): the next frames only learn."""
        self.frames = 0
        self.active: list[np.ndarray] = []  # masks of regions already alarmed, carried along the motion
        self.ignored: list[np.ndarray] = []  # persistent flips judged not to be patches, carried the same way
        self.looks: list[Look] = []  # blobs waiting for their second look on the next frame
        self._grays = self._image = self._before = self._labels = None  # _grays: the last frame's `_downsized`
        self._stable = self._suspect_age = self._changed_ago = self._appeared_ago = self._touched_ago = None
        self._area_mean = np.zeros(len(self.names))
        self._area_var = np.zeros(len(self.names))
        self.last_suspect = None  # (H, W) bool of the last frame: for overlays
        self.still = False  # whether the last frame was taken as from a still camera

    # ---------------------------------------------------------------------------------------------- motion
    def _downsized(self, gray: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """The grey frame at the flow's width and, from that, at the still test's width: made once per frame, and
        kept for the next frame's comparison (each frame is downsized once, not twice)."""
        height, width = gray.shape
        scale = min(1.0, self.config.flow_width / width)
        size = (max(8, round(width * scale)), max(8, round(height * scale)))
        small = gray if size == (width, height) else cv2.resize(gray, size, interpolation=cv2.INTER_AREA)
        coarse = (self.config.still_width, max(4, round(size[1] * self.config.still_width / size[0])))
        return small, (cv2.resize(small, coarse, interpolation=cv2.INTER_AREA) if size[0] > coarse[0] else small)

    def _flow_maps(self, grays: tuple[np.ndarray, np.ndarray], shape: tuple[int, int]):
        """Maps taking each pixel of this frame (`shape`, its `_downsized` greys) to where it was in the previous
        one; None for a still camera."""
        height, width = shape
        (now, now_coarse), (before, before_coarse) = grays, self._grays
        small = now.shape[::-1]
        self.motion_px = 0.0
        if self._is_still(now_coarse, before_coarse):
            return None
        self.flows += 1
        if self.config.flow == "farneback":
            flow = cv2.calcOpticalFlowFarneback(now, before, None, 0.5, 3, 15, 3, 5, 1.2, 0)
        else:
            if self._dis is None:
                preset = {"dis-fast": cv2.DISOPTICAL_FLOW_PRESET_FAST, "dis-medium": cv2.DISOPTICAL_FLOW_PRESET_MEDIUM}
                self._dis = cv2.DISOpticalFlow_create(preset[self.config.flow])
            flow = self._dis.calc(now, before, None)
        if small != (width, height):
            flow = cv2.resize(flow, (width, height), interpolation=cv2.INTER_LINEAR)
            flow[..., 0] *= width / small[0]
            flow[..., 1] *= height / small[1]
        self.motion_px = float(np.median(cv2.magnitude(flow[..., 0], flow[..., 1])))
        if self._grid is None or self._grid[0].shape != (height, width):
            self._grid = np.meshgrid(np.arange(width, dtype=np.float32), np.arange(height, dtype=np.float32))
        return self._grid[0] + flow[..., 0], self._grid[1] + flow[..., 1]

    def _is_still(self, now: np.ndarray, before: np.ndarray) -> bool:
        """Whether the camera stood still, from the grey frames at the still test's width."""
        change = float(cv2.absdiff(now, before).mean()) / 255.0
        self.still = change < self.config.still_motion
        return self.still

    def _area_z(self, areas: np.ndarray) -> np.ndarray:
        return (areas - self._area_mean) / np.sqrt(self._area_var + 1e-4)

    def _learn_areas(self, areas: np.ndarray) -> None:
        rate = 1.0 if self.frames == 1 else self.config.area_momentum
        delta = areas - self._area_mean
        self._area_mean += rate * delta
        self._area_var = (1 - rate) * (self._area_var + rate * delta ** 2)

    # ----------------------------------------------------------------------------------------------- update
    def update(self, index: int, rgb: np.ndarray, labels: np.ndarray) -> list[FlipAlarm]:
        labels = np.asarray(labels)
        if rgb.shape[:2] != labels.shape:
            raise ValueError(f"labels {labels.shape} do not match the frame {rgb.shape[:2]}")
        full_rgb, self.last_blobs, self.last_looks = rgb, [], []
        rgb, labels = self._working_size(rgb, labels)
        grays = self._downsized(cv2.cvtColor(rgb, cv2.COLOR_RGB2GRAY))
        image = rgb.astype(np.float32) / 255.0
        labels16 = labels.astype(np.int16)
        areas = np.bincount(labels.reshape(-1), minlength=len(self.names))[:len(self.names)] / labels.size
        self.frames += 1
        if self._labels is None or self._labels.shape != labels.shape:
            self._start(grays, image, labels16, areas)
            return []
        frame = self._compare(index, rgb, full_rgb, image, labels16, areas, self._flow_maps(grays, labels16.shape))
        alarms = self._judge(frame) if self.frames > self.config.warmup else []
        self._learn(frame, grays)
        return [self._full_size(alarm, full_rgb.shape[:2]) for alarm in alarms]

    def _working_size(self, rgb: np.ndarray, labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        height, width = labels.shape
        if width <= self.config.work_width:
            return rgb, labels
        size = (self.config.work_width, max(1, round(height * self.config.work_width / width)))
        return (cv2.resize(rgb, size, interpolation=cv2.INTER_AREA),
                _resize_labels(labels, size))

    @staticmethod
    def _full_size(alarm: FlipAlarm, shape: tuple[int, int]) -> FlipAlarm:
        """An alarm found at the working size, its masks, box and pixel count at the frame's own size."""
        if alarm.region is None or alarm.region.shape == shape:
            return alarm

        def up(mask: np.ndarray) -> np.ndarray:
            return cv2.resize(mask.astype(np.uint8), shape[::-1], interpolation=cv2.INTER_NEAREST).astype(bool)

        alarm.region, alarm.trigger = up(alarm.region), up(alarm.trigger)
        rows, cols = np.nonzero(alarm.region)
        if len(rows):
            alarm.bbox = (int(rows.min()), int(cols.min()), int(rows.max()) + 1, int(cols.max()) + 1)
        alarm.pixels = int(alarm.region.sum())
        return alarm

    def _start(self, grays, image, labels16, areas) -> None:
        self._grays, self._image, self._before, self._labels = grays, image, image, labels16
        self._stable = np.ones(labels16.shape, np.int16)
        self._suspect_age = np.zeros(labels16.shape, np.int16)
        self._changed_ago = np.full(labels16.shape, NEVER, np.int16)
        self._touched_ago = np.full(labels16.shape, NEVER, np.int16)
        self._appeared_ago = np.full(labels16.shape, NEVER, np.int16)
        self.active, self.ignored, self.looks = [], [], []
        self._learn_areas(areas)

    def _compare(self, index, rgb, full_rgb, image, labels16, areas, maps) -> _Frame:
        """This frame against the reference carried along the motion: suspect pixels and new appearance."""
        config = self.config
        reference = _warp(self._labels, maps, nearest=True)
        reference_image = _warp(self._image, maps, nearest=False)
        stable = _warp(self._stable, maps, nearest=True)
        suspect_age = _warp(self._suspect_age, maps, nearest=True)
        changed_ago = _warp(self._changed_ago, maps, nearest=True)
        appeared_ago = _warp(self._appeared_ago, maps, nearest=True)
        before = _warp(self._before, maps, nearest=False)
        touched_ago = _warp(self._touched_ago, maps, nearest=True)
        carry = lambda masks: [_warp(m.astype(np.uint8), maps, nearest=True).astype(bool) for m in masks]  # noqa: E731
        self.active, self.ignored = carry(self.active), carry(self.ignored)
        for look in self.looks:
            look.pixels, look.reverted = carry([look.pixels, look.reverted])
        self._stable = stable

        channels = cv2.absdiff(image, reference_image)
        difference = (channels[..., 0] + channels[..., 1] + channels[..., 2]) / np.float32(3)  # 15x numpy's mean
        change = cv2.blur(difference, (config.change_blur, config.change_blur))
        # a label that was not settled (flicker, ambiguity) flipping is not evidence of anything
        suspect = (labels16 != reference) & (change <= config.image_change)
        suspect &= (stable >= config.min_stable) | (suspect_age > 0)
        suspect = _open(suspect, config.open_px)
        suspect_age = np.where(suspect, suspect_age + 1, 0).astype(np.int16)
        # when the current run of change at a pixel began (a sticker's texture may keep registering as change under
        # imperfect flow, but it appeared once), and how the pixel looked just before
        appear = cv2.blur(difference, (config.appear_blur, config.appear_blur)) > config.appear_change
        blobs = _open(appear, config.appear_open_px)
        began = blobs & (changed_ago > 0)
        self._remember_before(difference, image, reference_image, before, touched_ago)
        appeared_ago = np.where(began, 0, np.minimum(appeared_ago + 1, NEVER)).astype(np.int16)
        self._changed_ago = np.where(blobs, 0, np.minimum(changed_ago + 1, NEVER)).astype(np.int16)
        return _Frame(index, rgb, full_rgb, image, labels16, reference, reference_image, difference, change, suspect,
                      suspect_age, appeared_ago, appear, changed_ago, areas)

    def _remember_before(self, difference, image, reference_image, before, touched_ago) -> None:
        """How each pixel looked before its latest change (what the counterfactual restores): set when a change
        begins, kept while the pixel keeps changing and for `persist` + 1 frames after (a sticker stops registering
        as change once the reference has taken it in), then following the image again."""
        config = self.config
        touched = cv2.blur(difference, (config.appear_blur, config.appear_blur)) > config.restore_change
        settled = touched_ago > config.persist + 1
        self._before = _select(touched & (touched_ago > 0), reference_image, _select(settled & ~touched, image, before))
        self._touched_ago = np.where(touched, 0, np.minimum(touched_ago + 1, NEVER)).astype(np.int16)

    def _learn(self, frame: _Frame, grays: tuple[np.ndarray, np.ndarray]) -> None:
        """What is normal now: agreed or image-explained labels are adopted; suspect pixels keep the old label."""
        config, suspect = self.config, frame.suspect
        differs = frame.labels != frame.reference
        self._labels = np.where(suspect, frame.reference, frame.labels).astype(np.int16)
        self._stable = np.where(differs & ~suspect, 1, np.minimum(self._stable + 1, NEVER)).astype(np.int16)
        self._image = _select(suspect, frame.reference_image, frame.image)
        self._grays, self._suspect_age, self._appeared_ago = grays, frame.suspect_age, frame.appeared_ago
        keep = lambda masks: [m & suspect for m in masks if (m & suspect).sum() >= config.min_pixels // 2]  # noqa: E731
        self.active, self.ignored = keep(self.active), keep(self.ignored)
        self.last_suspect = suspect
        if not suspect.any():
            self._learn_areas(frame.areas)

    # ------------------------------------------------------------------------------------------------ judge
    def _judge(self, frame: _Frame) -> list[FlipAlarm]:
        """With the engine: the counterfactual of every new blob, scored. Without: the trigger rule."""
        if self.relabel is not None:
            return self._judge_counterfactual(frame)
        alarms = []
        for candidate in self._candidates(frame):
            self.active.append(candidate.region)
            alarms.append(self._alarm(frame, candidate))
        return alarms

    def _judge_counterfactual(self, frame: _Frame) -> list[FlipAlarm]:
        alarms = self._take_second_looks(frame)
        blobs, view = self._promising_blobs(frame)
        self.last_blobs = blobs
        if not blobs:
            return alarms
        for blob, relabelled in zip(blobs, self._relabel_restored(frame, blobs, view.before)):
            judge_effect(blob, relabelled, frame.labels, frame.reference)
        for blob in blobs:
            if blob.reverted.sum() < self.config.min_reverted_pixels or self._already_alarmed(blob.reverted):
                blob.cues = None  # not scored
                continue
            self.scored += 1
            blob.cues |= effect_cues(blob, view)
            blob.probability = self.config.scorer.probability(blob.cues)
            if blob.probability < self.config.scorer.threshold:
                self.below_threshold += 1
                if blob.probability >= self.config.look_from:
                    self.looks.append(Look(blob.pixels, blob.reverted, frame.index, blob.probability, blob.cues))
                continue
            self.active.append(blob.reverted)
            alarms.append(self._alarm(frame, Candidate(blob.reverted, 1, blob.pixels), self._evidence(blob)))
        return alarms

    @staticmethod
    def _evidence(blob: Blob) -> dict:
        return {"score": round(blob.probability, 3), "reverted_pixels": int(blob.reverted.sum()),
                "blob_pixels": int(blob.pixels.sum()), "cues": {k: round(v, 3) for k, v in blob.cues.items()}}

    def _take_second_looks(self, frame: _Frame) -> list[FlipAlarm]:
        """The blobs that scored between `look_from` and the threshold on the frame before, looked at again now:
        an alarm for each whose second-look score reaches its threshold; all are then let go."""
        config, looks, self.looks = self.config, self.looks, []
        alarms = []
        for look in looks:
            if not look.reverted.any() or not look.pixels.any() or self._already_alarmed(look.reverted):
                continue  # carried out of view, or its flip was alarmed meanwhile
            self.second_looks += 1
            look.cues = look_cues(look, frame, config.look_zone_px, config.look_ring_px)
            look.probability = config.second_look.probability(look.first_cues | look.cues)
            self.last_looks.append(look)
            if look.probability < config.second_look.threshold:
                continue
            self.active.append(look.reverted)
            evidence = {"score": round(look.first_probability, 3), "second_look": round(look.probability, 3),
                        "reverted_pixels": int(look.reverted.sum()), "blob_pixels": int(look.pixels.sum()),
                        "cues": {k: round(v, 3) for k, v in (look.first_cues | look.cues).items()}}
            flipped = look.reverted & (frame.labels != frame.reference)
            region = flipped if flipped.any() else look.reverted
            alarms.append(self._alarm(frame, Candidate(region, frame.index - look.first_frame + 1, look.pixels),
                                      evidence))
        return alarms

    def _promising_blobs(self, frame: _Frame) -> tuple[list[Blob], View | None]:
        """The new blobs worth an engine call: the largest `max_checked_blobs`, each with enough differing labels
        outside it to revert and a best case that reaches the lowest score that can still alarm, now or at a second
        look (skipping the others changes no alarm: it only saves the engine's time)."""
        config = self.config
        blobs = new_blobs(frame.appeared_ago == 0, frame.difference, config.footprint_change, config.min_blob_pixels,
                          config.max_blob_share, config.footprint_px)
        blobs = sorted(blobs, key=lambda b: -int(b.pixels.sum()))[:config.max_checked_blobs]
        if not blobs:  # most frames: nothing new in view
            return [], None
        view = View(frame.rgb, self._before_uint8(), frame.change, self._stable, frame.reference, frame.quiet,
                    config.min_stable, self.motion_px, len(blobs), config.merge_px, frame.labels, config.ring_px)
        differs = frame.labels != frame.reference
        promising = []
        for blob in blobs:
            could_revert = differs & ~blob.restored
            if could_revert.sum() < config.min_reverted_pixels:
                continue
            blob.cues = blob_cues(blob, view)
            if not config.skip_hopeless or self._best_case(blob, could_revert, view) >= self._lowest_useful_score():
                promising.append(blob)
        self.skipped += len(blobs) - len(promising)
        return promising, view

    def _lowest_useful_score(self) -> float:
        """A blob scoring less raises no alarm, now or at its second look."""
        return min(self.config.look_from, self.config.scorer.threshold)

    def _best_case(self, blob: Blob, could_revert: np.ndarray, view: View) -> float:
        near = cv2.dilate(blob.restored.astype(np.uint8), _disk(view.near_px)).astype(bool)
        return self.config.scorer.best_case(blob.cues, self._stable[could_revert] >= self.config.min_stable,
                                            near[could_revert], self.config.min_reverted_pixels,
                                            flipped_object_bound(blob.pixels, could_revert, view.reference))

    def _already_alarmed(self, region: np.ndarray) -> bool:
        return any((region & mask).sum() >= self.config.min_pixels // 2 for mask in self.active)

    def _before_uint8(self) -> np.ndarray:
        return (np.clip(self._before, 0.0, 1.0) * 255.0 + 0.5).astype(np.uint8)

    def _relabel_restored(self, frame: _Frame, blobs: list[Blob], before: np.ndarray) -> np.ndarray:
        """The engine's labels (at the working size) of the frame with each blob put back as it looked `before`
        (uint8, working size): one batched call on full-size frames."""
        full_shape = frame.full_rgb.shape[:2]
        if full_shape != frame.labels.shape:
            before = cv2.resize(before, full_shape[::-1], interpolation=cv2.INTER_LINEAR)
        restored = []
        for blob in blobs:
            mask = blob.restored
            if full_shape != mask.shape:
                mask = cv2.resize(mask.astype(np.uint8), full_shape[::-1], interpolation=cv2.INTER_NEAREST)
            restored.append(_select(mask, before, frame.full_rgb))
        self.checks += 1
        labels = np.asarray(self.relabel(np.stack(restored)))
        if labels.shape[1:] != frame.labels.shape:
            labels = np.stack([_resize_labels(label, frame.labels.shape[::-1]) for label in labels])
        return labels

    def _candidates(self, frame: _Frame) -> list[Candidate]:
        """Persistent unexplained flips not yet judged, with the new appearance that began with them."""
        config = self.config
        persistent = frame.suspect & (frame.suspect_age >= config.persist)
        if persistent.sum() < config.min_pixels:
            return []
        # pieces of one flip are one region: suspect pixels within `merge_px` of each other, or bridged by what
        # just appeared (a patch splits the flip it causes into pieces around itself)
        grouped = cv2.dilate(frame.suspect.astype(np.uint8), np.ones((config.merge_px, config.merge_px), np.uint8))
        grouped |= (frame.appeared_ago <= config.persist).astype(np.uint8)
        count, components = cv2.connectedComponents(grouped, connectivity=8)
        ignored = np.zeros(frame.suspect.shape, bool)
        for mask in self.ignored:
            ignored |= mask
        candidates = []
        for component in range(1, count):
            region = (components == component) & frame.suspect
            if any((region & mask).sum() >= config.min_pixels // 2 for mask in self.active):
                continue  # this flip already raised its alarm
            # a flip already set aside stays aside; a new flip beside it (a patch on an object the model was
            # already unsure of) is judged on its own pixels, with its own onset
            region &= ~ignored
            if (region & persistent).sum() < config.min_pixels:
                continue
            age, trigger = self._trigger(frame, region)
            if trigger.sum() > config.max_trigger_share * trigger.size:
                self.ignored.append(region)  # something big arrived and changed the view: not a sticker
                continue
            if trigger.any() and _saturation(frame.rgb, trigger) < config.min_trigger_saturation:
                self.ignored.append(region)  # a dull change (shade, a surface turning): not a printed patch
                continue
            if trigger.sum() < config.min_trigger_pixels or (config.min_trigger_pixels and not trigger.any()):
                self.untriggered += 1  # the view changed the model's mind with nothing new in sight
                self.ignored.append(region)
                continue
            candidates.append(Candidate(region, age, trigger))
        return candidates

    def _trigger(self, frame: _Frame, region: np.ndarray) -> tuple[int, np.ndarray]:
        """The flip's onset (frames ago) and the new appearance near the region that began on that frame. A
        region may hold an older, smaller flip too, so each onset a sizeable part of it shares is tried."""
        config = self.config
        near = cv2.dilate(region.astype(np.uint8), np.ones((config.near_px, config.near_px), np.uint8)).astype(bool)
        ages, sizes = np.unique(frame.suspect_age[region], return_counts=True)
        onsets = [int(a) for a, n in zip(ages, sizes) if a >= config.persist and n >= config.min_pixels // 2]
        return max(((a, near & (frame.appeared_ago == a - 1)) for a in onsets or [int(ages.max())]),
                   key=lambda item: int(item[1].sum()))

    def _alarm(self, frame: _Frame, candidate: Candidate, evidence: dict | None = None) -> FlipAlarm:
        region, index = candidate.region, frame.index
        pairs = np.stack([frame.reference[region], frame.labels[region]], axis=1)
        unique, counts = np.unique(pairs, axis=0, return_counts=True)
        order = np.argsort(-counts)
        transitions = {f"{self._name(a)}->{self._name(b)}": int(n) for (a, b), n in zip(unique[order], counts[order])}
        from_class, to_class = (int(v) for v in unique[order[0]])
        rows, cols = np.nonzero(region)
        z = self._area_z(frame.areas)
        evidence = evidence or {"trigger_pixels": int(candidate.trigger.sum())}
        return FlipAlarm(
            stream=self.stream, frame=index, time=time.time(), onset_frame=index - candidate.onset_age + 1,
            bbox=(int(rows.min()), int(cols.min()), int(rows.max()) + 1, int(cols.max()) + 1),
            pixels=int(region.sum()), from_class=from_class, to_class=to_class, from_name=self._name(from_class),
            to_name=self._name(to_class), transitions=transitions, image_change=float(frame.change[region].mean()),
            evidence=evidence, region=region, trigger=candidate.trigger,
            area_z={self.names[c]: round(float(z[c]), 2) for c in {from_class, to_class} if 0 <= c < len(self.names)})

    def _name(self, label: int) -> str:
        return self.names[label] if 0 <= label < len(self.names) else str(label)
