"""One trial, start to finish, in whatever process runs it (a Ray worker, or in-process): build the target,
place the patch, attack the twin, measure, replay the patch on the twin's engines, and return everything the
store needs. Twins (per device), datasets and engines are cached per process, so a worker pays for loading
once. The twin, the attack, the measurements and the physical check run on the trial's device; datasets stay
on the CPU and only the image being attacked moves."""

from __future__ import annotations

import io
import os
import socket
import time
from functools import lru_cache

import numpy as np
import torch

from audit.attack import (Target, achieved, class_switch_target, disappear_target, mask_target, measure_trial,
                          patch_attack, success_rate)
from audit.campaign import CampaignConfig, ImageSet, Trial, object_masks
from audit.patches import paste, patch_position
from segmenters.device import describe_device, resolve_device


@lru_cache(maxsize=8)
def _twin(path: str, device: torch.device):
    from segmenters.twin import load_twin

    return load_twin(path, map_location=device)


@lru_cache(maxsize=4)
def _dataset(images_json: str):
    return ImageSet.model_validate_json(images_json).build()


#: a flip reproduces on an engine that shows at least this share of the twin's intended flips as the twin does
REPRODUCED_SHARE = 0.9


@lru_cache(maxsize=8)
def _engine(path: str):
    from export import load_engine

    return load_engine(path)


def build_target(campaign: CampaignConfig, trial: Trial, twin, image: torch.Tensor, labels: np.ndarray) -> Target:
    """The trial's target; a "disappear" target from the twin's logits on `image` (on the twin's device)."""
    if trial.target.kind == "switch":
        for object_id, _, mask in object_masks(campaign.images, trial.image_index, labels, {trial.source_class}):
            if object_id == trial.object_id:
                return class_switch_target(mask, trial.to_class, trial.source_class)
        raise ValueError(f"object {trial.object_id} is not in image {trial.image_index}")
    if trial.target.kind == "mask":
        return mask_target(trial.target.masks[trial.image_index], twin.spec.num_classes, tuple(labels.shape))
    with torch.no_grad():
        logits = twin.logits(image[None])[0].cpu().numpy()
    return disappear_target(logits, trial.source_class)


def _png(array: np.ndarray) -> bytes:
    from PIL import Image

    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="PNG")
    return buffer.getvalue()


def replay_on_engines(paths: list[str], patched: np.ndarray, clean: np.ndarray, attacked: np.ndarray, target: Target,
                      covered: np.ndarray) -> dict:
    """The twin's attacked image ((N, 3, H, W) float in [0, 1]) through each engine's `segment`. A flip
    reproduces when the engine shows at least `REPRODUCED_SHARE` of the pixels the twin flipped as intended
    (outside the patch) the way the twin does; a trial whose twin flipped nothing has nothing to reproduce
    (None)."""
    intended = target.region & (attacked != clean) & achieved(attacked, target) & ~covered
    replay = {}
    for path in paths:
        engine = _engine(path)
        engine_labels = engine.segment(patched)[0]
        share = float((engine_labels[intended] == attacked[intended]).mean()) if intended.any() else float("nan")
        replay[os.path.basename(path)] = {
            "backend": engine.backend, "precision": engine.precision,
            "success": success_rate(engine_labels, target, exclude=covered),
            "agreement_with_twin": float((engine_labels == attacked).mean()),
            "intended_reproduced": share, "reproduces": None if np.isnan(share) else share >= REPRODUCED_SHARE,
        }
    return replay


def execute_trial(campaign_json: str, trial: Trial, device: torch.device | None = None) -> dict:
    """Run one trial on `device` (default: the campaign's `device`, resolved in this process); returns
    {"metrics", "replay", "artefacts", "worker", "seconds"}."""
    started = time.perf_counter()
    campaign = CampaignConfig.model_validate_json(campaign_json)
    device = resolve_device(campaign.device) if device is None else device
    torch.manual_seed(trial.seed)
    twin = _twin(trial.model, device)
    image, labels = _dataset(campaign.images.model_dump_json())[trial.image_index]
    image, labels = image.to(device), labels.numpy()
    target = build_target(campaign, trial, twin, image, labels)
    top, left = patch_position(target.region, trial.size)
    result = patch_attack(twin, image, target, trial.size, top, left, campaign.attack, seed=trial.seed)
    metrics = measure_trial(twin, image, result.patch, top, left, target, campaign.attack.eot,
                            eot_draws=campaign.eot_eval_draws, seed=trial.seed + 1,
                            batch=campaign.eot_eval_batch).as_dict()
    metrics.update(top=top, left=left, steps=result.steps, final_loss=result.losses[-1],
                   target_pixels=int(target.region.sum()), description=target.description,
                   device=describe_device(device))
    patched, covered = paste(image[None], torch.as_tensor(result.patch, device=device), top, left)
    with torch.no_grad():
        clean = twin.labels(image[None])[0].cpu().numpy()
        attacked = twin.labels(patched)[0].cpu().numpy()
    patched, covered = patched.cpu(), covered.cpu().numpy()
    replay = replay_on_engines(campaign.engines.get(trial.model, []), patched.numpy(), clean, attacked, target,
                               covered)
    artefacts = _artefacts(twin, image.cpu(), patched[0], clean, attacked, target, result)
    if campaign.physical_views and trial.target.kind == "switch":
        physical, physical_png = _physical(campaign, trial, twin, result.patch, tuple(image.shape[1:]))
        metrics.update(physical)
        if physical_png is not None:
            artefacts["physical.png"] = physical_png
    return {"metrics": metrics, "replay": replay, "artefacts": artefacts,
            "worker": f"{socket.gethostname()}:{os.getpid()}", "seconds": time.perf_counter() - started}


def _artefacts(twin, image: torch.Tensor, patched: torch.Tensor, clean: np.ndarray, attacked: np.ndarray,
               target: Target, result) -> dict:
    """The pictures and arrays a stored trial keeps (host tensors in)."""
    from segmenters.visualize import colorize, overlay, to_uint8

    palette = twin.spec.palette()
    target_view = np.where(target.region, target.labels, twin.spec.ignore_index)
    return {
        "patch.npy": result.patch.astype(np.float32),
        "patch.png": _png(to_uint8(result.patch)),
        "before.png": _png(overlay(image.numpy(), clean, palette, ignore_index=twin.spec.ignore_index)),
        "after.png": _png(overlay(patched.numpy(), attacked, palette, ignore_index=twin.spec.ignore_index)),
        "target.png": _png(colorize(target_view, palette, twin.spec.ignore_index)),
        "losses.npy": np.asarray(result.losses, np.float32),
    }


def _physical(campaign: CampaignConfig, trial: Trial, twin, patch: np.ndarray,
              image_size: tuple[int, int]) -> tuple[dict, bytes | None]:
    """The held-out-view decal check (metrics prefixed physical_) and its panel picture, if any view saw it."""
    from audit.physical import physical_check
    from segmenters.visualize import overlay, to_uint8

    check = physical_check(twin, campaign.images.split, trial.image_index, trial.object_id, patch, trial.to_class,
                           image_size, views=campaign.physical_views)
    panels = check.pop("panels")
    picture = None
    if panels:
        palette = twin.spec.palette()
        picture = _png(np.concatenate(
            [np.concatenate([to_uint8(rgb), overlay(rgb, labels, palette)], axis=0) for rgb, labels in panels],
            axis=1))
    return {f"physical_{key}": value for key, value in check.items()}, picture
