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
    `period` frames), elevation +-`tilt_deg` at a third of that rate, distance x(1 +- `zoom`)."""

    sweep_deg: float = 12.0
    tilt_deg: float = 3.0
    zoom: float = 0.05
    period: int = 120
    phase: float = 0.0  # radians: where on the swing the clip starts

    def at(self, camera, frame: int):
        t = 2.0 * math.pi * frame / self.period + self.phase
        return replace(camera, azimuth=camera.azimuth + self.sweep_deg * math.sin(t),
                       elevation=camera.elevation + self.tilt_deg * math.sin(t / 3.0),
                       distance=camera.distance * (1.0 + self.zoom * math.sin(t / 2.0)))


class SyntheticCamera(FrameSource):
    """A moving camera over shapes scene (`split`, `index`). With a `patch` ((3, s, s) in [0, 1], as a campaign
    stores it) the patch is printed as a decal on object `instance` (1-based) from frame `onset` on, sized and
    placed as the audit's physical check does. `frames` bounds the clip (None: endless).

    Each frame's truth says whether the decal is visible, and, when `labeler` ((N, H, W, 3) uint8 frames -> label
    maps) is given,
    how many of the object's pixels outside the decal read differently than in the same view without it: the
    flips the patch actually caused, which is what a detector can be scored on."""

    def __init__(self, index: int, split: str = "val", *, size: tuple[int, int] = (128, 128), frames: int | None = 120,
                 path: CameraPath = CameraPath(), patch: np.ndarray | None = None, instance: int | None = None,
                 onset: int = 0, noise: float = 0.01, fps: float | None = None, labeler=None, seed: int = 0,
                 name: str | None = None):
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
        self._frame = 0
        self._next_time = 0.0

    @property
    def finite(self) -> bool:
        return self.frames is not None

    def open(self) -> None:
        self._frame = 0
        self._next_time = time.monotonic()

    def render(self, frame: int, with_patch: bool):
        """The `ShapesSample` of view `frame` (image, semantic and instance maps, decal mask)."""
        from segmenters.data.shapes import render

        camera = self.path.at(self.sample.camera, frame)
        rendered = render(self.sample.scene, camera, *self.size,
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
                 "semantic": view.semantic, "decal": decal, "instances": instances}
        frame_rgb = to_uint8(image)
        if patched and self.labeler is not None and decal.any():
            clean = to_uint8(self.render(frame, False).image)
            before, after = self.labeler(np.stack([clean, frame_rgb]))
            region = (instances == self.instance) & ~decal
            flipped = region & (after != before)
            truth.update(flipped=int(flipped.sum()), object_pixels=int(region.sum()))
        return frame_rgb, truth


def trial_camera(run_dir, trial_id: str, onset: int = 15, frames: int | None = None, fps: float | None = None,
                 labeler=None) -> SyntheticCamera:
    """A synthetic camera over a shapes campaign trial's scene, its found patch appearing on its object at
    `onset`: what the monitor should catch."""
    import json
    import sqlite3
    from pathlib import Path

    run = Path(run_dir)
    with sqlite3.connect(run / "trials.sqlite") as db:
        row = db.execute("SELECT image_index, object_id FROM trials WHERE id = ?", (trial_id,)).fetchone()
    if row is None:
        raise ValueError(f"no trial {trial_id!r} in {run}")
    images = json.loads((run / "campaign.json").read_text())["images"]
    if images["dataset"] != "shapes":
        raise ValueError(f"trial {trial_id} is on {images['dataset']}: only shapes scenes can be re-rendered")
    patch = np.load(run / "trials" / trial_id / "patch.npy")
    split = images["split"]
    return SyntheticCamera(int(row[0]), split, frames=frames, patch=patch, instance=int(row[1]), onset=onset,
                           fps=fps, labeler=labeler, name=f"trial {trial_id[:8]} (scene {row[0]})")


