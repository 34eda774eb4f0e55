"""Synthetic cameras for the monitor: a camera moving over a shapes scene, optionally with a campaign's
patch printed as a decal on an object from a known frame on (the ground truth the monitor's benchmark and the
demo score against)."""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, replace

import numpy as np

from monitor.streams import FrameSource, SourceExhausted, to_uint8


@dataclass(frozen=True)
class CameraPath:
    """A smooth camera motion around a scene's own camera: azimuth swings +-`sweep_deg` (one full swing every
    `period` frames), elevation +-`tilt_deg` at a third of that rate, distance x(1 +- `zoom`). With `jump_frame`
    the camera also pans abruptly: from that frame on the azimuth is `jump_deg` further (a jump between frames
    `jump_frame - 1` and `jump_frame`), as a bumped or re-aimed camera does."""

    sweep_deg: float = 12.0
    tilt_deg: float = 3.0
    zoom: float = 0.05
    period: int = 120
    phase: float = 0.0  # radians: where on the swing the clip starts
    jump_frame: int | None = None  # None: no abrupt pan
    jump_deg: float = 0.0

    def __post_init__(self):
        if self.period <= 0:
            raise ValueError(f"camera path period must be a positive number of frames, got {self.period}")
        if not 0.0 <= self.zoom < 1.0:
            raise ValueError(f"camera path zoom must be in [0, 1), got {self.zoom}")
        if self.jump_frame is not None and self.jump_frame < 1:
            raise ValueError(f"camera path jump_frame must be >= 1 (a jump between two frames), got {self.jump_frame}")

    @classmethod
    def fast(cls, sweep_deg: float = 25.0, period: int = 30, **kwargs) -> CameraPath:
        """A fast-moving camera: up to ~5 degrees of azimuth per frame (a smooth path moves under one)."""
        return cls(sweep_deg=sweep_deg, period=period, **{"tilt_deg": 6.0, "zoom": 0.1, **kwargs})

    def jumps_at(self, frame: int) -> bool:
        """Whether the abrupt pan happens between `frame - 1` and `frame`."""
        return self.jump_frame is not None and frame == self.jump_frame

    def at(self, camera, frame: int):
        t = 2.0 * math.pi * frame / self.period + self.phase
        azimuth = camera.azimuth + self.sweep_deg * math.sin(t)
        if self.jump_frame is not None and frame >= self.jump_frame:
            azimuth += self.jump_deg
        return replace(camera, azimuth=azimuth,
                       elevation=camera.elevation + self.tilt_deg * math.sin(t / 3.0),
                       distance=camera.distance * (1.0 + self.zoom * math.sin(t / 2.0)))


LIGHTING_MODES = ("ramp", "flicker")
MAX_LIGHT_FACTOR = 4.0  # a lighting change scales by at most this (a brighter scene only saturates)


@dataclass(frozen=True)
class LightingChange:
    """Every light's intensity and the ambient scaled by `factor`. "ramp": linearly from x1 to x`factor` over
    `frames` frames from frame `start` (x`factor` reached at `start + frames - 1`), then held there; `frames=1` is a
    step, a passing cloud e.g. factor 0.6 over 4 frames. "flicker": x`factor` for the first half of every `period`
    frames and x1 for the rest, for `frames` frames from `start`, then x1 again. Active while it changes:
    frames `start .. start + frames - 1`. Only the lit scene scales; the unlit backdrop stays as it is."""

    start: int
    factor: float = 0.6
    frames: int = 4
    mode: str = "ramp"
    period: int = 2  # flicker only: frames per dim/bright cycle

    def __post_init__(self):
        if self.mode not in LIGHTING_MODES:
            raise ValueError(f"lighting mode must be one of {LIGHTING_MODES}, got {self.mode!r}")
        if self.start < 0 or self.frames < 1:
            raise ValueError(f"lighting change needs start >= 0 and frames >= 1, got start={self.start} "
                             f"frames={self.frames}")
        if not 0.0 < self.factor <= MAX_LIGHT_FACTOR:
            raise ValueError(f"lighting factor must be in (0, {MAX_LIGHT_FACTOR}], got {self.factor}")
        if self.period < 2:
            raise ValueError(f"flicker period must be >= 2 frames, got {self.period}")

    def active(self, frame: int) -> bool:
        return self.start <= frame < self.start + self.frames

    def scale(self, frame: int) -> float:
        """The factor on the lights and the ambient at `frame`."""
        if frame < self.start:
            return 1.0
        step = frame - self.start
        if self.mode == "ramp":
            return 1.0 + (self.factor - 1.0) * min(1.0, (step + 1) / self.frames)
        if step >= self.frames:
            return 1.0
        return self.factor if step % self.period < self.period / 2 else 1.0


@dataclass(frozen=True)
class EnteringObject:
    """A new object of the shapes classes that slides on the ground along a straight line into the view: from a
    point just outside the image on side `side` (+1 right, -1 left) to the ground point seen at
    `to = (column, row)` (fractions of the image) over `frames` frames from frame `start`, then stays there. Absent
    before `start`; at `start` it is just outside the view, at `start + frames` it has arrived. Active while it
    moves (frames `start .. start + frames - 1`). It may pass in
    front of (or through) the scene's objects: it occludes them as a passer-by would."""

    start: int
    frames: int = 20
    shape: str = "cube"
    size: str = "large"
    color: str = "gray"
    material: str = "rubber"
    side: int = 1
    to: tuple[float, float] = (0.5, 0.7)
    rotation: float = 0.0  # radians about the vertical axis

    def __post_init__(self):
        from segmenters.data.shapes import CLEVR_COLORS, CLEVR_SIZES, MATERIALS, SHAPES

        for field, value, allowed in (("shape", self.shape, SHAPES), ("size", self.size, tuple(CLEVR_SIZES)),
                                      ("color", self.color, tuple(CLEVR_COLORS)),
                                      ("material", self.material, MATERIALS), ("side", self.side, (-1, 1))):
            if value not in allowed:
                raise ValueError(f"entering object {field} must be one of {allowed}, got {value!r}")
        if self.start < 0 or self.frames < 1:
            raise ValueError(f"entering object needs start >= 0 and frames >= 1, got start={self.start} "
                             f"frames={self.frames}")
        if len(self.to) != 2 or not all(0.0 < v < 1.0 for v in self.to):
            raise ValueError(f"entering object `to` must be (column, row) fractions inside (0, 1), got {self.to}")

    def active(self, frame: int) -> bool:
        return self.start <= frame < self.start + self.frames

    def progress(self, frame: int) -> float | None:
        """How far along its line the object is at `frame` (0 outside the view, 1 arrived); None before `start`."""
        return None if frame < self.start else min(1.0, (frame - self.start) / self.frames)


@dataclass(frozen=True)
class SceneChanges:
    """Clean-scene disturbances of a `SyntheticCamera`, each off (None) by default: a lighting change and an
    object entering the view. (Camera disturbances, fast motion and an abrupt pan, are `CameraPath`'s.)"""

    lighting: LightingChange | None = None
    entering: EnteringObject | None = None


OUTSIDE_STEP = 0.1  # world units: how finely the entering object's start is searched for outside the view
OUTSIDE_MAX = 80.0  # world units: how far from its end point it may start


def _ground_point(camera, to: tuple[float, float], height: float, size: tuple[int, int]) -> np.ndarray:
    """The world point at `height` above the ground seen through image point `to` = (column, row) fractions."""
    rows, cols = size
    origin, dirs = camera.rays(rows, cols)
    direction = dirs[min(int(to[1] * rows), rows - 1) * cols + min(int(to[0] * cols), cols - 1)]
    t = (height - origin[2]) / direction[2] if direction[2] < -1e-6 else -1.0
    if t <= 0:
        raise ValueError(f"entering object `to` {to} looks at or above the horizon: no ground point to stop at")
    return origin + t * direction


def _outside_view(camera, end: np.ndarray, radius: float, side: int, size: tuple[int, int]) -> np.ndarray:
    """The nearest point to `end`, along the camera's horizontal right axis on `side`, from which an object of
    half-size `radius` at `end`'s height is wholly outside the image."""
    rows, cols = size
    _, _, right, _ = camera.basis()
    along = np.array([right[0], right[1], 0.0]) * side / math.hypot(right[0], right[1])
    reach = radius * math.sqrt(3.0)  # the bounding box of any shape of this size
    corners = np.array([[dx, dy, dz] for dx in (-reach, reach) for dy in (-reach, reach) for dz in (-reach, reach)])
    for k in range(1, int(OUTSIDE_MAX / OUTSIDE_STEP) + 1):
        point = end + along * k * OUTSIDE_STEP
        col = camera.project(point + corners, rows, cols)[:, 1]
        if (side > 0 and col.min() > cols) or (side < 0 and col.max() < -1.0):
            return point
    raise ValueError(f"no start outside the view within {OUTSIDE_MAX} units of {end[:2]} on side {side}")


class SyntheticCamera(FrameSource):
    """A moving camera over shapes scene (`split`, `index`). With a `patch` ((3, s, s) in [0, 1], as a campaign
    stores it) the patch is printed as a decal on object `instance` (1-based) from frame `onset` on, sized and
    placed as the audit's physical check does. `frames` bounds the clip (None: endless).

    Each frame's truth says whether the decal is visible, and, when `labeler` ((N, H, W, 3) uint8 frames -> label
    maps) is given,
    how many of the object's pixels outside the decal read differently than in the same view without it: the
    flips the patch actually caused, which is what a detector can be scored on.

    `changes` adds clean-scene disturbances (a lighting change, an object entering the view; see `SceneChanges`);
    the path may pan abruptly (`CameraPath.jump_frame`). Each frame's truth lists the active ones under
    "disturbances" (names among "pan", "lighting", "flicker", "entering"), with "light_scale" (the factor on the
    lights) and "entering_instance" (the entering object's instance number while it is in the scene, else None).
    Without them the frames are exactly those of the plain camera."""

    def __init__(self, index: int, split: str = "val", *, size: tuple[int, int] = (128, 128), frames: int | None = 120,
                 path: CameraPath = CameraPath(), patch: np.ndarray | None = None, instance: int | None = None,
                 onset: int = 0, noise: float = 0.01, fps: float | None = None, labeler=None, seed: int = 0,
                 name: str | None = None, changes: SceneChanges | None = None):
        from segmenters.data.shapes import patch_decal, render_sample

        if patch is not None and instance is None:
            raise ValueError("a patch needs the instance (1-based object number) to print it on")
        self.sample = render_sample(0, split, index)
        if instance is not None and not 1 <= instance <= len(self.sample.scene.objects):
            raise ValueError(f"instance {instance} out of range: scene {split}/{index} has "
                             f"{len(self.sample.scene.objects)} objects")
        self.size, self.frames, self.path, self.noise = size, frames, path, noise
        self.instance, self.onset, self.fps, self.labeler, self.seed = instance, onset, fps, labeler, seed
        self.name = name or f"synthetic {split}/{index}" + (f" patch@{onset}" if patch is not None else "")
        self.decal = None if patch is None else patch_decal(self.sample.scene, instance - 1, self.sample.camera,
                                                            patch, *size)
        if changes is not None and not isinstance(changes, SceneChanges):
            raise ValueError(f"changes must be a SceneChanges, got {type(changes).__name__}")
        self.changes = changes
        self._track = None if changes is None or changes.entering is None else self._entering_track(changes.entering)
        self._frame = 0
        self._next_time = 0.0

    @property
    def finite(self) -> bool:
        return self.frames is not None

    def open(self) -> None:
        self._frame = 0
        self._next_time = time.monotonic()

    def light_scale(self, frame: int) -> float:
        lighting = None if self.changes is None else self.changes.lighting
        return 1.0 if lighting is None else lighting.scale(frame)

    def entering_object(self, frame: int):
        """The entering `SceneObject` where it is at `frame`, None before it enters (or without one)."""
        progress = None if self._track is None else self.changes.entering.progress(frame)
        if progress is None:
            return None
        prototype, start, end = self._track
        x, y = start + (end - start) * progress
        return replace(prototype, x=float(x), y=float(y))

    def entering_instance(self, frame: int) -> int | None:
        """The entering object's instance number (after the scene's own objects) while it is in the scene."""
        return None if self.entering_object(frame) is None else len(self.sample.scene.objects) + 1

    def scene_at(self, frame: int):
        """The scene at `frame`: the sample's own scene, lit and peopled as `changes` say."""
        scene = self.sample.scene
        scale = self.light_scale(frame)
        if scale != 1.0:
            scene = replace(scene, ambient=scene.ambient * scale,
                            lights=tuple(replace(light, intensity=light.intensity * scale) for light in scene.lights))
        entering = self.entering_object(frame)
        if entering is not None:
            scene = replace(scene, objects=scene.objects + (entering,))
        return scene

    def disturbances(self, frame: int) -> list[str]:
        """The clean-scene disturbances active at `frame` (see the class docstring)."""
        active = ["pan"] if self.path.jumps_at(frame) else []
        lighting = None if self.changes is None else self.changes.lighting
        if lighting is not None and lighting.active(frame):
            active.append("lighting" if lighting.mode == "ramp" else "flicker")
        if self._track is not None and self.changes.entering.active(frame):
            active.append("entering")
        return active

    def _entering_track(self, entering: EnteringObject):
        """(object, start, end): the entering `SceneObject` and its ground positions (x, y): end where the camera
        sees `entering.to` when it arrives, start just outside the image on its side as the camera sees it when it
        enters."""
        from segmenters.data.shapes import SceneObject

        prototype = SceneObject(shape=entering.shape, size=entering.size, color=entering.color,
                                material=entering.material, x=0.0, y=0.0, rotation=entering.rotation)
        arrival = self.path.at(self.sample.camera, entering.start + entering.frames)
        end = _ground_point(arrival, entering.to, prototype.radius, self.size)
        start = _outside_view(self.path.at(self.sample.camera, entering.start), end, prototype.radius,
                              entering.side, self.size)
        return prototype, start[:2], end[:2]

    def render(self, frame: int, with_patch: bool):
        """The `ShapesSample` of view `frame` (image, semantic and instance maps, decal mask)."""
        from segmenters.data.shapes import render

        camera = self.path.at(self.sample.camera, frame)
        rendered = render(self.scene_at(frame), camera, *self.size,
                          textures=[self.decal] if with_patch and self.decal is not None else [],
                          noise=self.noise, rng=np.random.default_rng([self.seed, frame]))
        return rendered

    def read(self) -> tuple[np.ndarray, dict | None]:
        if self.frames is not None and self._frame >= self.frames:
            raise SourceExhausted(self.name)
        if self.fps:  # pace like a real camera
            self._next_time += 1.0 / self.fps
            time.sleep(max(0.0, self._next_time - time.monotonic()))
        frame = self._frame
        self._frame += 1
        patched = self.decal is not None and frame >= self.onset
        view = self.render(frame, patched)
        image, instances, decal = view.image, view.instances, view.texture_mask
        truth = {"frame": frame, "patched": patched, "decal_pixels": int(decal.sum()), "instance": self.instance,
                 "semantic": view.semantic, "decal": decal, "instances": instances,
                 "disturbances": self.disturbances(frame), "light_scale": self.light_scale(frame),
                 "entering_instance": self.entering_instance(frame)}
        frame_rgb = to_uint8(image)
        if patched and self.labeler is not None and decal.any():
            clean = to_uint8(self.render(frame, False).image)
            before, after = self.labeler(np.stack([clean, frame_rgb]))
            region = (instances == self.instance) & ~decal
            flipped = region & (after != before)
            truth.update(flipped=int(flipped.sum()), object_pixels=int(region.sum()))
        return frame_rgb, truth


CLEAN_KINDS = ("smooth", "fast", "pan", "lighting", "flicker", "entering")


@dataclass(frozen=True)
class CleanRanges:
    """The ranges `clean_variants` draws from (uniform; (lo, hi) inclusive for frame counts). Speeds: a smooth
    path turns at most 2*pi*sweep/period degrees per frame (0.2-1.1), a fast one 3-9, a pan jumps 4-10 at once."""

    sweep_deg: tuple[float, float] = (6.0, 15.0)
    tilt_deg: tuple[float, float] = (1.0, 4.0)
    zoom: tuple[float, float] = (0.02, 0.06)
    period: tuple[int, int] = (90, 180)
    fast_sweep_deg: tuple[float, float] = (18.0, 30.0)
    fast_tilt_deg: tuple[float, float] = (4.0, 8.0)
    fast_zoom: tuple[float, float] = (0.05, 0.12)
    fast_period: tuple[int, int] = (20, 40)
    pan_deg: tuple[float, float] = (4.0, 10.0)  # either sign
    dim: tuple[float, float] = (0.5, 0.75)  # lighting factor when it darkens (half the clips) ...
    brighten: tuple[float, float] = (1.25, 1.6)  # ... and when it brightens
    ramp_frames: tuple[int, int] = (1, 8)  # 1: a step
    flicker_factor: tuple[float, float] = (0.5, 0.8)
    flicker_frames: tuple[int, int] = (6, 16)
    flicker_period: tuple[int, int] = (2, 4)
    enter_frames: tuple[int, int] = (10, 30)
    enter_column: tuple[float, float] = (0.3, 0.7)
    enter_row: tuple[float, float] = (0.55, 0.8)
    event_start: tuple[float, float] = (0.25, 0.6)  # where in the clip an event begins, as fractions of its length
    min_frames: int = 16  # the shortest clip the events fit in


@dataclass(frozen=True)
class CleanVariant:
    """One named clean-clip setting: a camera path and scene changes, no patch."""

    kind: str
    path: CameraPath
    changes: SceneChanges | None = None

    def camera(self, index: int, split: str = "val", **kwargs) -> SyntheticCamera:
        """A `SyntheticCamera` over scene (`split`, `index`) with this setting; `kwargs` (size, frames, seed,
        noise...) go to it."""
        kwargs.setdefault("name", f"synthetic {split}/{index} clean {self.kind}")
        return SyntheticCamera(index, split, path=self.path, changes=self.changes, **kwargs)

    def describe(self) -> dict:
        """The setting as plain data (for a benchmark's report)."""
        from dataclasses import asdict

        return {"kind": self.kind, "path": asdict(self.path),
                "changes": None if self.changes is None else asdict(self.changes)}


def clean_variants(seed: int | np.random.Generator, frames: int = 60, kinds=CLEAN_KINDS,
                   ranges: CleanRanges = CleanRanges()) -> list[CleanVariant]:
    """One clean-clip setting per kind in `kinds` (of `CLEAN_KINDS`), parameters drawn from `ranges` with `seed`,
    its event (pan, lighting change, entering object) placed to begin and end inside a clip of `frames` frames.
    Every kind but "fast" moves along the same smooth path, so the "smooth" clip is the others' control."""
    unknown = [k for k in kinds if k not in CLEAN_KINDS]
    if unknown:
        raise ValueError(f"unknown clean clip kinds {unknown}; expected some of {CLEAN_KINDS}")
    if frames < ranges.min_frames:
        raise ValueError(f"clean clips need at least {ranges.min_frames} frames for their events, got {frames}")
    rng = seed if isinstance(seed, np.random.Generator) else np.random.default_rng(seed)
    # one stream per kind, drawn for all kinds: a kind's setting does not depend on which others are asked for
    streams = dict(zip(CLEAN_KINDS, rng.integers(0, 2**63, size=len(CLEAN_KINDS))))
    smooth = _path(rng, ranges.sweep_deg, ranges.tilt_deg, ranges.zoom, ranges.period)
    return [_variant(kind, np.random.default_rng(streams[kind]), smooth, frames, ranges) for kind in kinds]


def _path(rng: np.random.Generator, sweep_deg, tilt_deg, zoom, period) -> CameraPath:
    return CameraPath(sweep_deg=float(rng.uniform(*sweep_deg)), tilt_deg=float(rng.uniform(*tilt_deg)),
                      zoom=float(rng.uniform(*zoom)), period=int(rng.integers(period[0], period[1] + 1)),
                      phase=float(rng.uniform(0.0, 2.0 * math.pi)))


def _variant(kind: str, rng: np.random.Generator, smooth: CameraPath, frames: int, ranges: CleanRanges):
    if kind == "smooth":
        return CleanVariant(kind, smooth)
    if kind == "fast":
        return CleanVariant(kind, _path(rng, ranges.fast_sweep_deg, ranges.fast_tilt_deg, ranges.fast_zoom,
                                        ranges.fast_period))
    if kind == "pan":
        jump = float(rng.uniform(*ranges.pan_deg)) * (1.0 if rng.random() < 0.5 else -1.0)
        return CleanVariant(kind, replace(smooth, jump_frame=max(1, _event_start(rng, frames, ranges)), jump_deg=jump))
    if kind == "entering":
        return CleanVariant(kind, smooth, SceneChanges(entering=_entering(rng, frames, ranges)))
    lighting = _lighting(rng, frames, ranges) if kind == "lighting" else _flicker(rng, frames, ranges)
    return CleanVariant(kind, smooth, SceneChanges(lighting=lighting))


def _event_start(rng: np.random.Generator, frames: int, ranges: CleanRanges) -> int:
    lo, hi = ranges.event_start
    return int(rng.integers(int(lo * frames), int(hi * frames) + 1))


def _span(rng: np.random.Generator, start: int, frames: int, bounds: tuple[int, int]) -> int:
    """A duration drawn from `bounds`, cut to end inside the clip."""
    return max(1, min(int(rng.integers(bounds[0], bounds[1] + 1)), frames - 1 - start))


def _lighting(rng: np.random.Generator, frames: int, ranges: CleanRanges) -> LightingChange:
    start = _event_start(rng, frames, ranges)
    factor = float(rng.uniform(*(ranges.dim if rng.random() < 0.5 else ranges.brighten)))
    return LightingChange(start=start, factor=factor, frames=_span(rng, start, frames, ranges.ramp_frames))


def _flicker(rng: np.random.Generator, frames: int, ranges: CleanRanges) -> LightingChange:
    start = _event_start(rng, frames, ranges)
    return LightingChange(start=start, factor=float(rng.uniform(*ranges.flicker_factor)), mode="flicker",
                          frames=_span(rng, start, frames, ranges.flicker_frames),
                          period=int(rng.integers(ranges.flicker_period[0], ranges.flicker_period[1] + 1)))


def _entering(rng: np.random.Generator, frames: int, ranges: CleanRanges) -> EnteringObject:
    from segmenters.data.shapes import CLEVR_COLORS, CLEVR_SIZES, MATERIALS, SHAPES

    start = _event_start(rng, frames, ranges)
    return EnteringObject(start=start, frames=_span(rng, start, frames, ranges.enter_frames),
                          shape=str(rng.choice(SHAPES)), size=str(rng.choice(list(CLEVR_SIZES))),
                          color=str(rng.choice(list(CLEVR_COLORS))), material=str(rng.choice(MATERIALS)),
                          side=int(rng.choice([-1, 1])), rotation=float(rng.uniform(0.0, 2.0 * math.pi)),
                          to=(float(rng.uniform(*ranges.enter_column)), float(rng.uniform(*ranges.enter_row))))


def trial_camera(scene, onset: int = 15, frames: int | None = None, fps: float | None = None,
                 labeler=None) -> SyntheticCamera:
    """A synthetic camera over a shapes campaign trial's scene, its found patch appearing on its object at
    `onset`: what the monitor should catch. `scene` is what `audit.store.trial_scene` returns (anything with
    `trial`, `dataset`, `split`, `image_index`, `object_id` and `patch`): the CLI reads the run, not this."""
    if scene.dataset != "shapes":
        raise ValueError(f"trial {scene.trial} is on {scene.dataset}: only shapes scenes can be re-rendered")
    return SyntheticCamera(int(scene.image_index), scene.split, frames=frames, patch=scene.patch,
                           instance=int(scene.object_id), onset=onset, fps=fps, labeler=labeler,
                           name=f"trial {scene.trial[:8]} (scene {scene.image_index})")


