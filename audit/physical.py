"""The physical check of seed 000 §3.1, simulated: the patch found in the image is printed as a decal on the
object's surface (the face turned most towards the attack camera), and the scene is re-rendered from held-out
camera poses and lighting. Success is measured on the object's pixels of each new view: the patch must work as
a sticker in the world, not only as pixels pasted into one image."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import torch

from segmenters.data.shapes import Camera, Light, Scene, ShapesConfig, patch_decal, render, render_sample


def held_out_views(camera: Camera, scene: Scene, count: int, seed: int,
                   config: ShapesConfig = ShapesConfig()) -> list[tuple[Camera, Scene]]:
    """Cameras around the attack view (azimuth +-25 deg, elevation +-10 deg within the dataset's range,
    distance +-10 %) and relit scenes (light intensity x0.7..1.3, ambient x0.8..1.2), from their own seed."""
    views = []
    for view in range(count):
        rng = np.random.default_rng([seed, view])
        cam = replace(camera,
                      azimuth=camera.azimuth + float(rng.uniform(-25, 25)),
                      elevation=float(np.clip(camera.elevation + rng.uniform(-10, 10), *config.elevation)),
                      distance=camera.distance * float(rng.uniform(0.9, 1.1)))
        lights = tuple(Light(l.direction, l.intensity * float(rng.uniform(0.7, 1.3))) for l in scene.lights)
        views.append((cam, Scene(scene.objects, lights, scene.ambient * float(rng.uniform(0.8, 1.2)))))
    return views


@torch.no_grad()
def physical_check(twin, split: str, index: int, instance: int, patch: np.ndarray, to_class: int,
                   image_size: tuple[int, int], views: int = 8, seed: int = 1000, min_pixels: int = 30) -> dict:
    """Success of the patch as a decal on object `instance` (1-based, as in the shapes instance map) of shapes
    scene `index`, over `views` held-out renders; also the same views without the decal, as the baseline.
    Renders on the CPU, segments on the twin's device."""
    device = next(twin.model.parameters()).device
    sample = render_sample(0, split, index)
    height, width = image_size
    k = instance - 1
    decal = patch_decal(sample.scene, k, sample.camera, patch, height, width)
    successes, baselines, panels = [], [], []
    for view, (camera, scene) in enumerate(held_out_views(sample.camera, sample.scene, views, seed + index)):
        rng = np.random.default_rng([seed, index, view])
        clean = render(scene, camera, height, width, noise=0.01, rng=rng)
        stickered = render(scene, camera, height, width, textures=[decal], noise=0.01,
                           rng=np.random.default_rng([seed, index, view]))
        # the object's pixels outside the decal: the decal's own pixels would count the patch as its effect
        mask = (clean.instances == instance) & ~stickered.texture_mask
        if mask.sum() < min_pixels or not stickered.texture_mask.any():
            continue  # the object (or the decal's face) is out of this view
        images = torch.from_numpy(np.stack([clean.image, stickered.image]).transpose(0, 3, 1, 2).copy())
        before, after = twin.labels(images.to(device)).cpu().numpy()
        successes.append(float((after[mask] == to_class).mean()))
        baselines.append(float((before[mask] == to_class).mean()))
        panels.append((stickered.image, after))
    return {"views": len(successes), "face": decal.face, "decal_size": decal.size,
            "success_mean": float(np.mean(successes)) if successes else float("nan"),
            "success_min": float(np.min(successes)) if successes else float("nan"),
            "baseline_mean": float(np.mean(baselines)) if baselines else float("nan"),
            "panels": panels[:4]}
