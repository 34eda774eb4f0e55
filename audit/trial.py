"""One trial, start to finish, in whatever process runs it (a Ray worker, or in-process): build the target,
place the patch, attack the twin, measure, replay the patch on the twin's engines, and return everything the
store needs. Twins, datasets and engines are cached per process, so a worker pays for loading once."""

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


@lru_cache(maxsize=8)
def _twin(path: str):
    from segmenters.twin import load_twin

    return load_twin(path)


@lru_cache(maxsize=4)
def _dataset(images_json: str):
    from segmenters.data import build_dataset

    images = ImageSet.model_validate_json(images_json)
    return build_dataset(images.dataset, images.split, root=images.root,
                         size=tuple(images.size) if images.size else None)


@lru_cache(maxsize=8)
def _engine(path: str):
    from export import load_engine

    return load_engine(path)


def build_target(campaign: CampaignConfig, trial: Trial, twin, image: torch.Tensor, labels: np.ndarray) -> Target:
    if trial.target.kind == "switch":
        for object_id, _, mask in object_masks(campaign.images, trial.image_index, labels, {trial.source_class}):
            if object_id == trial.object_id:
                return class_switch_target(mask, trial.to_class, trial.source_class)
        raise ValueError(f"object {trial.object_id} is not in image {trial.image_index}")
    if trial.target.kind == "mask":
        return mask_target(trial.target.masks[trial.image_index], twin.spec.num_classes, tuple(labels.shape))
    with torch.no_grad():
        logits = twin.logits(image[None])[0].numpy()
    return disappear_target(logits, trial.source_class)


def _png(array: np.ndarray) -> bytes:
    from PIL import Image

    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="PNG")
    return buffer.getvalue()


def replay_on_engines(paths: list[str], patched: np.ndarray, clean: np.ndarray, attacked: np.ndarray, target: Target,
                      covered: np.ndarray) -> dict:
    """The twin's attacked image through each engine. A flip reproduces when the engine shows at least 90 % of
    the pixels the twin flipped as intended (outside the patch) the way the twin does; a trial whose twin
    flipped nothing has nothing to reproduce (None)."""
    intended = target.region & (attacked != clean) & achieved(attacked, target) & ~covered
    replay = {}
    for path in paths:
        engine = _engine(path)
        engine_labels = engine.labels(engine.prepare(patched))[0]
        share = float((engine_labels[intended] == attacked[intended]).mean()) if intended.any() else float("nan")
        replay[os.path.basename(path)] = {
            "backend": engine.backend, "precision": engine.precision,
            "success": success_rate(engine_labels, target, exclude=covered),
            "agreement_with_twin": float((engine_labels == attacked).mean()),
            "intended_reproduced": share, "reproduces": None if np.isnan(share) else share >= 0.9,
        }
    return replay


def execute_trial(campaign_json: str, trial: Trial) -> dict:
    """Run one trial; returns {"metrics", "replay", "artefacts", "worker", "seconds"}."""
    from segmenters.visualize import colorize, overlay, to_uint8

    started = time.perf_counter()
    campaign = CampaignConfig.model_validate_json(campaign_json)
    torch.manual_seed(trial.seed)
    twin = _twin(trial.model)
    image, labels = _dataset(campaign.images.model_dump_json())[trial.image_index]
    labels = labels.numpy()
    target = build_target(campaign, trial, twin, image, labels)
    top, left = patch_position(target.region, trial.size)
    result = patch_attack(twin, image, target, trial.size, top, left, campaign.attack, seed=trial.seed)
    metrics = measure_trial(twin, image, result.patch, top, left, target, campaign.attack.eot,
                            eot_draws=campaign.eot_eval_draws, seed=trial.seed + 1).as_dict()
    metrics.update(top=top, left=left, steps=result.steps, final_loss=result.losses[-1],
                   target_pixels=int(target.region.sum()), description=target.description)

    patched, covered = paste(image[None], torch.as_tensor(result.patch), top, left)
    with torch.no_grad():
        clean = twin.labels(image[None])[0].numpy()
        attacked = twin.labels(patched)[0].numpy()
    replay = replay_on_engines(campaign.engines.get(trial.model, []), patched.numpy(), clean, attacked, target,
                               covered.numpy())
    palette = twin.spec.palette()
    physical_png = None
    if campaign.physical_views and trial.target.kind == "switch":
        from audit.physical import physical_check

        check = physical_check(twin, campaign.images.split, trial.image_index, trial.object_id, result.patch,
                               trial.to_class, tuple(image.shape[1:]), views=campaign.physical_views)
        panels = check.pop("panels")
        metrics.update({f"physical_{key}": value for key, value in check.items()})
        if panels:
            physical_png = _png(np.concatenate(
                [np.concatenate([to_uint8(rgb), overlay(rgb, labels_, palette)], axis=0) for rgb, labels_ in panels],
                axis=1))
    target_view = np.where(target.region, target.labels, twin.spec.ignore_index)
    artefacts = {
        "patch.npy": result.patch.astype(np.float32),
        "patch.png": _png(to_uint8(result.patch)),
        "before.png": _png(overlay(image.numpy(), clean, palette, ignore_index=twin.spec.ignore_index)),
        "after.png": _png(overlay(patched[0].numpy(), attacked, palette, ignore_index=twin.spec.ignore_index)),
        "target.png": _png(colorize(target_view, palette, twin.spec.ignore_index)),
        "losses.npy": np.asarray(result.losses, np.float32),
    }
    if physical_png is not None:
        artefacts["physical.png"] = physical_png
    return {"metrics": metrics, "replay": replay, "artefacts": artefacts,
            "worker": f"{socket.gethostname()}:{os.getpid()}", "seconds": time.perf_counter() - started}
