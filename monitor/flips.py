"""The flip detector: per stream, catch a region whose class flips and stays flipped while the image there does
not change the way a new object would (a patch's signature: seed 000's flips reach far beyond the patch's
own pixels, whose image is untouched).

What is normal is learned online, per stream:
- a *reference label map*, carried from frame to frame along the image's own motion (dense optical flow:
  OpenCV's DIS, a tenth of Farneback's cost at equal detection in the benchmark) and updated wherever the new
  labels agree with it or the image itself changed there;
- a *reference image*, carried the same way, so that "the image changed here" means changed since the labels
  were established, not just since the previous frame;
- per pixel, how many frames its reference label has held (`stable`), when the image there last changed and
  when its current run of change began (`appeared`), and per class the share of the frame it covers (a running
  mean and spread of per-class areas).

A pixel is *suspect* when its label differs from the (motion-compensated) reference, it had held its label for
`min_stable` frames, and the image there is within `image_change` of the reference. Suspect pixels are opened
(thin boundary flicker goes) and grouped into connected regions. A region of `min_pixels` or more whose pixels
stayed suspect for `persist` frames raises one `FlipAlarm` if new appearance (a blob of image change) began near
it on the very frame the flip began: the *trigger*, a sticker coming into view. A flip with no such trigger is
counted as `untriggered` and set aside: the view changed the model's mind, as moving cameras do. An alarm stays
active (no repeated alarms) while its region lasts; suspect pixels keep their old reference label, so a patch
that stays keeps the region flagged.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field
from typing import Literal

import cv2
import numpy as np
from pydantic import BaseModel, ConfigDict, Field


class FlipConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)
    image_change: float = Field(0.06, gt=0, description="mean |RGB| change in [0, 1] above which the image explains a label change")
    change_blur: int = Field(5, ge=1, description="box filter (px) over the image change: texture shimmer is not change")
    min_pixels: int = Field(25, ge=1, description="smallest flipped region that raises an alarm")
    persist: int = Field(2, ge=1, description="frames a region must stay flipped: 2 alarms on the frame after onset")
    min_stable: int = Field(3, ge=0, description="frames a pixel's label must have held before its flip counts")
    warmup: int = Field(3, ge=1, description="frames that only learn, before any alarm")
    open_px: int = Field(3, ge=1, description="opening kernel (px) that removes thin boundary flicker")
    min_trigger_pixels: int = Field(25, ge=0, description="pixels of new appearance near a flipped region that began "
                                    "on the flip's onset frame, needed for an alarm (0: alarm on any persistent "
                                    "unexplained flip)")
    merge_px: int = Field(9, ge=1, description="suspect pieces closer than this (px) form one region")
    trigger_open_px: int = Field(5, ge=1, description="opening kernel (px) for blobs of new appearance")
    flow: Literal["dis-fast", "dis-medium", "farneback"] = Field(
        "dis-fast", description="dense optical flow: OpenCV's DIS (fast or medium preset) or Farneback")
    flow_width: int = Field(160, ge=16, description="optical flow runs at this width (speed); labels stay full size")
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
    evidence: dict = field(default_factory=dict)  # e.g. a VGatt confirmation on the twin
    # (H, W) bool masks, not serialised: the flipped region, and the new appearance that triggered the alarm
    region: np.ndarray | None = field(default=None, repr=False, compare=False)
    trigger: np.ndarray | None = field(default=None, repr=False, compare=False)

    def as_dict(self) -> dict:
        return {"type": "flip", **{k: v for k, v in asdict(self).items() if k not in ("region", "trigger")}}


def _warp(array: np.ndarray, map_x: np.ndarray, map_y: np.ndarray, nearest: bool) -> np.ndarray:
    interpolation = cv2.INTER_NEAREST if nearest else cv2.INTER_LINEAR
    return cv2.remap(array, map_x, map_y, interpolation, borderMode=cv2.BORDER_REPLICATE)


class FlipDetector:
    """`update(index, rgb, labels)` per frame of one stream, in order; returns the alarms it raised."""

    def __init__(self, class_names: list[str], stream: str = "stream", config: FlipConfig = FlipConfig()):
        self.names, self.stream, self.config = list(class_names), stream, config
        self.frames = 0
        self.active: list[np.ndarray] = []  # masks of regions already alarmed, carried along the motion
        self.ignored: list[np.ndarray] = []  # persistent flips judged untriggered, carried the same way
        self._gray = self._image = self._labels = self._stable = self._suspect_age = self._changed_ago = None
        self._appeared_ago = None
        classes = len(self.names)
        self._area_mean = np.zeros(classes)
        self._area_var = np.zeros(classes)
        self.last_suspect = None  # (H, W) bool of the last frame: for overlays
        self._dis = None  # the DIS flow object (holds its own buffers; one per stream)
        self.untriggered = 0  # persistent unexplained flips with no new appearance near them (not alarmed)

    # ---------------------------------------------------------------------------------------------- motion
    def _flow_maps(self, gray: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Maps taking each pixel of this frame to where it was in the previous one."""
        height, width = gray.shape
        scale = min(1.0, self.config.flow_width / width)
        small = (max(8, round(width * scale)), max(8, round(height * scale)))
        now = cv2.resize(gray, small, interpolation=cv2.INTER_AREA)
        before = cv2.resize(self._gray, small, interpolation=cv2.INTER_AREA)
        if self.config.flow == "farneback":
            flow = cv2.calcOpticalFlowFarneback(now, before, None, 0.5, 3, 15, 3, 5, 1.2, 0)
        else:
            if self._dis is None:
                preset = {"dis-fast": cv2.DISOPTICAL_FLOW_PRESET_FAST, "dis-medium": cv2.DISOPTICAL_FLOW_PRESET_MEDIUM}
                self._dis = cv2.DISOpticalFlow_create(preset[self.config.flow])
            flow = self._dis.calc(now, before, None)
        flow = cv2.resize(flow, (width, height), interpolation=cv2.INTER_LINEAR)
        flow[..., 0] *= width / small[0]
        flow[..., 1] *= height / small[1]
        grid_x, grid_y = np.meshgrid(np.arange(width, dtype=np.float32), np.arange(height, dtype=np.float32))
        return grid_x + flow[..., 0], grid_y + flow[..., 1]

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
        config = self.config
        image = rgb.astype(np.float32) / 255.0
        gray = cv2.cvtColor(rgb, cv2.COLOR_RGB2GRAY)
        labels16 = labels.astype(np.int16)
        areas = np.bincount(labels.reshape(-1), minlength=len(self.names))[:len(self.names)] / labels.size
        self.frames += 1
        if self._labels is None or self._labels.shape != labels.shape:
            self._gray, self._image, self._labels = gray, image, labels16
            self._stable = np.ones(labels.shape, np.int16)
            self._suspect_age = np.zeros(labels.shape, np.int16)
            self._changed_ago = np.full(labels.shape, 10_000, np.int16)
            self._appeared_ago = np.full(labels.shape, 10_000, np.int16)
            self.active, self.ignored = [], []
            self._learn_areas(areas)
            return []

        map_x, map_y = self._flow_maps(gray)
        reference = _warp(self._labels, map_x, map_y, nearest=True)
        reference_image = _warp(self._image, map_x, map_y, nearest=False)
        stable = _warp(self._stable, map_x, map_y, nearest=True)
        suspect_age = _warp(self._suspect_age, map_x, map_y, nearest=True)
        changed_ago = _warp(self._changed_ago, map_x, map_y, nearest=True)
        appeared_ago = _warp(self._appeared_ago, map_x, map_y, nearest=True)
        carry = lambda masks: [_warp(m.astype(np.uint8), map_x, map_y, nearest=True).astype(bool) for m in masks]  # noqa: E731
        self.active, self.ignored = carry(self.active), carry(self.ignored)

        change = np.abs(image - reference_image).mean(axis=2)
        change = cv2.blur(change, (config.change_blur, config.change_blur))
        explained = change > config.image_change
        differs = labels16 != reference
        # a label that was not settled (flicker, ambiguity) flipping is not evidence of anything
        suspect = differs & ~explained & ((stable >= config.min_stable) | (suspect_age > 0))
        kernel = cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (config.open_px, config.open_px))
        suspect = cv2.morphologyEx(suspect.astype(np.uint8), cv2.MORPH_OPEN, kernel).astype(bool)
        suspect_age = np.where(suspect, suspect_age + 1, 0).astype(np.int16)
        # blobs of new appearance (a sticker coming into view), not the slivers of occlusion edges
        blob_kernel = cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (config.trigger_open_px,) * 2)
        blobs = cv2.morphologyEx(explained.astype(np.uint8), cv2.MORPH_OPEN, blob_kernel).astype(bool)
        # when the current run of change at a pixel began: a sticker's texture may keep registering as change
        # under imperfect flow, but it appeared once
        appeared_ago = np.where(blobs & (changed_ago > 0), 0, np.minimum(appeared_ago + 1, 10_000)).astype(np.int16)
        changed_ago = np.where(blobs, 0, np.minimum(changed_ago + 1, 10_000)).astype(np.int16)

        alarms = []
        if self.frames > config.warmup:
            alarms = self._alarms(index, suspect, suspect_age, changed_ago, appeared_ago, reference, labels16, change,
                                  areas)

        # what is normal now: agreed or image-explained labels are adopted; suspect pixels keep the old label
        self._labels = np.where(suspect, reference, labels16).astype(np.int16)
        self._stable = np.where(differs & ~suspect, 1, np.minimum(stable + 1, 10_000)).astype(np.int16)
        self._image = np.where(suspect[..., None], reference_image, image).astype(np.float32)
        self._gray, self._suspect_age, self._changed_ago = gray, suspect_age, changed_ago
        self._appeared_ago = appeared_ago
        keep = lambda masks: [m & suspect for m in masks if (m & suspect).sum() >= config.min_pixels // 2]  # noqa: E731
        self.active, self.ignored = keep(self.active), keep(self.ignored)
        self.last_suspect = suspect
        if not suspect.any():
            self._learn_areas(areas)
        return alarms

    def _alarms(self, index, suspect, suspect_age, changed_ago, appeared_ago, reference, labels, change,
                areas) -> list[FlipAlarm]:
        config = self.config
        persistent = suspect & (suspect_age >= config.persist)
        if persistent.sum() < config.min_pixels:
            return []
        # pieces of one flip are one region: suspect pixels within `merge_px` of each other, or bridged by what
        # just appeared (a patch splits the flip it causes into pieces around itself)
        grouped = cv2.dilate(suspect.astype(np.uint8), np.ones((config.merge_px, config.merge_px), np.uint8))
        grouped |= (changed_ago <= config.persist).astype(np.uint8)
        count, components = cv2.connectedComponents(grouped, connectivity=8)
        alarms = []
        z = self._area_z(areas)
        ignored = np.zeros(suspect.shape, bool)
        for mask in self.ignored:
            ignored |= mask
        for component in range(1, count):
            region = (components == component) & suspect
            if any((region & mask).sum() >= config.min_pixels // 2 for mask in self.active):
                continue  # this flip already raised its alarm
            # a flip already judged ambiguous is set aside; a new flip beside it (a patch on an object the model
            # was already unsure of) is judged on its own pixels, with its own onset
            region &= ~ignored
            if (region & persistent).sum() < config.min_pixels:
                continue
            pairs = np.stack([reference[region], labels[region]], axis=1)
            unique, counts = np.unique(pairs, axis=0, return_counts=True)
            order = np.argsort(-counts)
            transitions = {f"{self._name(a)}->{self._name(b)}": int(n) for (a, b), n in zip(unique[order], counts[order])}
            from_class, to_class = (int(v) for v in unique[order[0]])
            rows, cols = np.nonzero(region)
            top, left, bottom, right = int(rows.min()), int(cols.min()), int(rows.max()) + 1, int(cols.max()) + 1
            near = cv2.dilate(region.astype(np.uint8), np.ones((7, 7), np.uint8)).astype(bool)
            # the new appearance must have begun on the very frame the flip began: a sticker coming into view
            # flips its object at once, while what a moving camera reveals comes before or after the model's
            # change of mind (bench/monitor.py: this cut clean-clip false alarms about tenfold). A region may hold
            # an older, smaller flip too, so each onset that a sizeable part of it shares is tried.
            ages, sizes = np.unique(suspect_age[region], return_counts=True)
            onsets = [int(a) for a, n in zip(ages, sizes) if a >= config.persist and n >= config.min_pixels // 2]
            age, trigger_mask = max(((a, near & (appeared_ago == a - 1)) for a in onsets or [int(ages.max())]),
                                    key=lambda item: int(item[1].sum()))
            trigger = int(trigger_mask.sum())
            if trigger < config.min_trigger_pixels:
                # the view changed the model's mind with nothing new in sight: ambiguity, not a patch
                self.untriggered += 1
                self.ignored.append(region)
                continue
            self.active.append(region)
            alarms.append(FlipAlarm(
                stream=self.stream, frame=index, time=time.time(),
                onset_frame=index - age + 1,
                bbox=(top, left, bottom, right), pixels=int(region.sum()),
                from_class=from_class, to_class=to_class, from_name=self._name(from_class),
                to_name=self._name(to_class), transitions=transitions,
                image_change=float(change[region].mean()),
                evidence={"trigger_pixels": trigger}, region=region, trigger=trigger_mask,
                area_z={self.names[c]: round(float(z[c]), 2) for c in {from_class, to_class} if 0 <= c < len(self.names)}))
        return alarms

    def _name(self, label: int) -> str:
        return self.names[label] if 0 <= label < len(self.names) else str(label)
